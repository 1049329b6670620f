//! `herd run`, `herd chat` and `herd pull`.

use std::collections::HashMap;
use std::io::{BufRead, Write};

use anyhow::{Result, bail};
use herd_engine::chat::{ChatTemplate, RenderOptions, TemplateSource};
use herd_engine::generate::{Request, generate_in};
use herd_engine::registry;
use herd_engine::sampler::SamplingParams;

#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Random seed (same seed, same output).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Element type of the KV cache: f16, bf16, f32 or q8_0 (blocks of 32: half of f16's
    /// memory, a little less precise).
    #[arg(long, default_value = "f16", value_parser = crate::parse_kv_type)]
    pub kv_type: herd_kernels::DType,
}

impl SamplingArgs {
    fn params(&self) -> Result<SamplingParams> {
        if self.temperature < 0.0
            || !(0.0..=1.0).contains(&self.top_p)
            || !(0.0..=1.0).contains(&self.min_p)
        {
            bail!("--temperature must be ≥ 0, --top-p and --min-p within 0..1");
        }
        Ok(SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: HashMap::new(),
            seed: self.seed,
            logprobs: false,
            top_logprobs: 0,
        })
    }
}

/// `herd run MODEL PROMPT`: the prompt as raw text (BOS added as the tokenizer says), the answer
/// streamed to stdout, speeds to stderr.
pub fn run(loaded: &herd_engine::Loaded, prompt: &str, s: &SamplingArgs) -> Result<()> {
    let ids = loaded.tokenizer.encode(prompt, true)?;
    stream_answer(loaded, ids, s)?;
    Ok(())
}

/// Generate for `prompt`, streaming the text to stdout and ending it with a newline; speeds and
/// finish reason to stderr.
fn stream_answer(
    loaded: &herd_engine::Loaded,
    prompt: Vec<u32>,
    s: &SamplingArgs,
) -> Result<herd_engine::generate::Generation> {
    let req = Request {
        prompt,
        max_tokens: s.max_tokens,
        stop: s.stop.clone(),
        sampling: s.params()?,
    };
    let model = loaded.model.as_ref();
    let cache = model.new_cache_of(s.kv_type)?;
    let mut out = std::io::stdout().lock();
    let g = generate_in(cache, model, &loaded.tokenizer, &req, |t| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
    })?;
    writeln!(out)?;
    out.flush()?;
    report(&g);
    Ok(g)
}

fn report(g: &herd_engine::generate::Generation) {
    let pre = g.prompt_tokens as f64 / g.prefill_time.as_secs_f64().max(1e-9);
    let n = g.tokens.len();
    let dec = if n > 1 {
        (n - 1) as f64 / g.decode_time.as_secs_f64().max(1e-9)
    } else {
        0.0
    };
    eprintln!(
        "[prefill {} tokens at {pre:.1} tok/s; decode {n} tokens at {dec:.1} tok/s; finish: {}]",
        g.prompt_tokens,
        g.finish_reason.as_str()
    );
}

/// `herd chat MODEL`: multi-turn through the model's chat template (or its family's built-in one).
pub fn chat(loaded: &herd_engine::Loaded, system: Option<&str>, s: &SamplingArgs) -> Result<()> {
    let tok = &loaded.tokenizer;
    let (template, source) = ChatTemplate::for_model(tok.chat_template.as_deref(), &loaded.family)?;
    if source == TemplateSource::Builtin {
        eprintln!(
            "note: the model has no chat template; using herd's built-in {} template",
            loaded.family
        );
    }
    let opts = RenderOptions::generation(tok);
    let mut messages = Vec::new();
    if let Some(sys) = system {
        messages.push(serde_json::json!({"role": "system", "content": sys}));
    }
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line == "/exit" || line == "/quit" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        messages.push(serde_json::json!({"role": "user", "content": line}));
        let rendered = template.render(&messages, &opts)?;
        let ids = tok.encode_prompt(&rendered)?;
        let g = stream_answer(loaded, ids, s)?;
        messages.push(serde_json::json!({"role": "assistant", "content": g.text}));
    }
    Ok(())
}

/// `herd pull MODEL`: fetch into the cache (or confirm it is there) and print the path.
pub fn pull(model: &str) -> Result<()> {
    let r = registry::resolve(model)?;
    println!("{}", r.path.display());
    Ok(())
}

/// `herd models`: the catalog.
pub fn list() -> Result<()> {
    for e in registry::CATALOG {
        println!("{:<18} {}", e.alias, e.description);
    }
    println!("\ncache: {}", registry::cache_dir().display());
    Ok(())
}
