//! `herd bench`: prompt processing, token generation and batched decode speeds, in the spirit of
//! llama-bench (pp: one prompt of `-p` random tokens in one pass, logits for its last token;
//! tg: `-n` tokens decoded one at a time; batched: B sequences with a `--batched-prompt`-token
//! prompt each, then `--batched-gen` steps of B tokens). With `-d N` (llama-bench's
//! `--n-depth`) pp and tg start after N tokens of context already in the cache (filled untimed,
//! once, then reused through the prefix cache). Each test runs once to warm up, then `-r`
//! times; the roofline compares decode with memory bandwidth.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use herd_kernels::rng::SplitMix64;
use herd_models::{Batch, CausalLm, KvCache};
use herd_plan::model::Part;
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A GGUF file, an HF directory or a catalog alias; omit with --random-weights.
    model: Option<String>,
    /// Prompt tokens of the pp test (0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Generated tokens of the tg test (0 skips it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Tokens of context already cached when pp and tg start (llama-bench's `-d`).
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    n_depth: usize,
    /// Element type of the KV cache: f16, bf16, f32 or q8_0.
    #[arg(long, default_value = "f16", value_parser = crate::parse_kv_type)]
    kv_type: herd_kernels::DType,
    /// Threads (default: HERD_THREADS or one per CPU).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Timed repetitions of each test (after one warm-up run).
    #[arg(short = 'r', long, default_value_t = 3)]
    repetitions: usize,
    /// Concurrent sequences of the batched-decode test, comma-separated (0 skips it).
    #[arg(short = 'b', long, value_delimiter = ',', default_value = "1,2,4,8")]
    batched: Vec<usize>,
    /// Prompt tokens of each sequence in the batched test.
    #[arg(long, default_value_t = 128)]
    batched_prompt: usize,
    /// Tokens each sequence decodes in the batched test.
    #[arg(long, default_value_t = 128)]
    batched_gen: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Bench a model with random weights in a preset's shape instead of a file.
    #[arg(long)]
    random_weights: bool,
    /// The shape for --random-weights: llama4:scout-4b, llama4:scout, llama4:maverick, or a
    /// Llama 4 config.json.
    #[arg(long, default_value = "llama4:scout-4b")]
    preset: String,
    /// Weight types for --random-weights, as `herd quantize --type`.
    #[arg(long = "type", default_value = "q4_k_m")]
    file_type: String,
    /// Seed of the random weights and of the random prompt tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    load: crate::load::LoadArgs,
}

/// Mean and sample standard deviation of a test's tokens/s over its repetitions.
#[derive(Debug)]
struct Rate {
    runs: Vec<f64>,
}

impl Rate {
    fn mean(&self) -> f64 {
        self.runs.iter().sum::<f64>() / self.runs.len().max(1) as f64
    }
    fn std(&self) -> f64 {
        let n = self.runs.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        (self.runs.iter().map(|r| (r - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    }
    fn to_json(&self) -> serde_json::Value {
        json!({"mean": self.mean(), "std": self.std(), "runs": self.runs})
    }
    fn show(&self) -> String {
        format!("{:.2} ± {:.2}", self.mean(), self.std())
    }
}

pub fn run(a: &BenchArgs) -> Result<()> {
    if let Some(t) = a.threads
        && !herd_kernels::pool::init_global(t)
    {
        bail!("the thread pool was already started with another size");
    }
    if a.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    // A random-weight model is written to a temporary GGUF, so it loads exactly as a file does.
    let mut _temp = None;
    let (label, path): (String, PathBuf) = match (&a.model, a.random_weights) {
        (Some(_), true) => bail!("give a model or --random-weights, not both"),
        (None, false) => bail!("give a model (file, directory or alias) or --random-weights"),
        (Some(m), false) => (m.clone(), herd_engine::registry::resolve(m)?.path),
        (None, true) => {
            let file = random_model_file(&a.preset, &a.file_type, a.seed)?;
            let path = file.path().to_path_buf();
            _temp = Some(file);
            (format!("{} (random, {})", a.preset, a.file_type), path)
        }
    };
    let model = a.load.load_model(&path)?;
    // The tensor table for the roofline (the types --quantize gave), read before minutes of
    // benchmarking rather than after.
    let facts = herd_plan::resolve(&path.to_string_lossy(), a.load.file_type()?)
        .map_err(|e| anyhow::anyhow!("reading the model's tensor table: {e}"))?;
    let model: &dyn CausalLm = model.as_ref();
    let threads = herd_kernels::pool::global().n_threads();
    let mut rng = SplitMix64::new(a.seed);
    let vocab = model.vocab_size() as u64;
    let mut tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect() };

    let timed = |what: &str, f: &mut dyn FnMut() -> Result<f64>| -> Result<Rate> {
        eprintln!("{what}: warm-up");
        f()?;
        let mut runs = Vec::with_capacity(a.repetitions);
        for r in 0..a.repetitions {
            let rate = f()?;
            eprintln!(
                "{what}: run {}/{}: {rate:.2} tokens/s",
                r + 1,
                a.repetitions
            );
            runs.push(rate);
        }
        Ok(Rate { runs })
    };

    let depth = tokens(a.n_depth);
    let at_depth = |name: String| {
        if a.n_depth > 0 {
            format!("{name} @ d{}", a.n_depth)
        } else {
            name
        }
    };
    let pp = if a.n_prompt > 0 {
        let prompt = tokens(a.n_prompt);
        let mut ctx = DepthContext::new(model, a.kv_type, &depth)?;
        Some(timed(&at_depth(format!("pp{}", a.n_prompt)), &mut || {
            prompt_rate(model, &mut ctx, &prompt)
        })?)
    } else {
        None
    };
    let tg = if a.n_gen > 0 {
        let first = tokens(1)[0];
        let mut ctx = DepthContext::new(model, a.kv_type, &depth)?;
        Some(timed(&at_depth(format!("tg{}", a.n_gen)), &mut || {
            generation_rate(model, &mut ctx, first, a.n_gen)
        })?)
    } else {
        None
    };
    let mut batched = Vec::new();
    for &b in a.batched.iter().filter(|&&b| b > 0) {
        let prompts: Vec<Vec<u32>> = (0..b).map(|_| tokens(a.batched_prompt.max(1))).collect();
        let rate = timed(&format!("batched x{b}"), &mut || {
            batched_rate(model, a.kv_type, &prompts, a.batched_gen)
        })?;
        batched.push((b, rate));
    }

    // Roofline: what one decoded token must read (the weights it uses, its cache) against the
    // bandwidth this machine measures with the same threads.
    let weight_bytes: f64 = facts
        .tensors
        .iter()
        .map(|t| t.bytes() as f64 * facts.read_fraction(Part::of(&t.name)))
        .sum();
    // A tg run's tokens see on average the depth and half the tokens it generates.
    let elem_bytes = a.kv_type.type_size() as f64 / a.kv_type.block_size() as f64;
    let kv_bytes = facts.kv_bytes(a.n_depth + a.n_gen / 2, elem_bytes).1;
    let bytes_per_token = weight_bytes + kv_bytes;
    eprintln!("measuring memory read bandwidth ({threads} threads)");
    let bandwidth = herd_plan::hardware::measure_read_bandwidth();
    let bound = bandwidth / bytes_per_token;
    let tg_mean = tg.as_ref().map(Rate::mean);

    if a.json {
        let report = json!({
            "model": label,
            "path": path.display().to_string(),
            "threads": threads,
            "repetitions": a.repetitions,
            "n_prompt": a.n_prompt,
            "n_gen": a.n_gen,
            "n_depth": a.n_depth,
            "kv_type": a.kv_type.name().to_ascii_lowercase(),
            "pp_tokens_per_s": pp.as_ref().map(Rate::mean),
            "tg_tokens_per_s": tg_mean,
            "pp": pp.as_ref().map(Rate::to_json),
            "tg": tg.as_ref().map(Rate::to_json),
            "batched": batched.iter().map(|(b, r)| json!({
                "sequences": b,
                "prompt_tokens": a.batched_prompt,
                "gen_tokens": a.batched_gen,
                "tokens_per_s": r.to_json(),
            })).collect::<Vec<_>>(),
            "roofline": {
                "bytes_per_token": bytes_per_token,
                "weight_bytes_per_token": weight_bytes,
                "kv_bytes_per_token": kv_bytes,
                "bandwidth_bytes_per_s": bandwidth,
                "bound_tokens_per_s": bound,
                "fraction_of_bound": tg_mean.map(|t| t / bound),
            },
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model: {label}\nthreads: {threads}, repetitions: {}, KV cache: {}\n",
        a.repetitions,
        a.kv_type.name().to_ascii_lowercase()
    );
    println!("| test | tokens/s |\n|---|---:|");
    if let Some(pp) = &pp {
        println!(
            "| {} | {} |",
            at_depth(format!("pp{}", a.n_prompt)),
            pp.show()
        );
    }
    if let Some(tg) = &tg {
        println!("| {} | {} |", at_depth(format!("tg{}", a.n_gen)), tg.show());
    }
    for (b, r) in &batched {
        println!(
            "| batched x{b} (pp{} + tg{} each), decode | {} |",
            a.batched_prompt,
            a.batched_gen,
            r.show()
        );
    }
    println!(
        "\nroofline: {:.3} GB read per decoded token ({:.3} GB weights, {:.4} GB cache), \
         memory read bandwidth {:.1} GB/s → bound {:.1} tokens/s",
        bytes_per_token / 1e9,
        weight_bytes / 1e9,
        kv_bytes / 1e9,
        bandwidth / 1e9,
        bound
    );
    if let Some(t) = tg_mean {
        println!("tg achieves {:.0}% of the bound", 100.0 * t / bound);
        if t > bound {
            println!("(above 100%: this model's weights are served from CPU caches, not memory)");
        }
    }
    Ok(())
}

/// A cache holding the depth context for the pp and tg runs: each run is a new sequence that
/// starts on the depth tokens, reused from the prefix cache (only the few after the last whole
/// block are computed again, untimed); the previous run's sequence is released first.
struct DepthContext {
    cache: KvCache,
    depth: Vec<u32>,
    seq: u64,
}

impl DepthContext {
    fn new(model: &dyn CausalLm, kv_type: herd_kernels::DType, depth: &[u32]) -> Result<Self> {
        Ok(Self {
            cache: model.new_cache_of(kv_type)?,
            depth: depth.to_vec(),
            seq: 0,
        })
    }

    /// A fresh sequence with the depth tokens cached: its id and first free position.
    fn start(&mut self, model: &dyn CausalLm) -> Result<(u64, usize)> {
        self.cache.remove(self.seq);
        self.seq += 1;
        let reused = self.cache.attach_prefix(self.seq, &self.depth)?;
        let mut batch = Batch::new();
        for (i, chunk) in self.depth[reused..].chunks(512).enumerate() {
            batch.clear();
            batch.push_sequence(self.seq, chunk, reused + i * 512, false);
            model.forward(&batch, &mut self.cache, None)?;
        }
        Ok((self.seq, self.depth.len()))
    }
}

/// One prompt in one pass after the depth context, logits for its last token: tokens/s.
fn prompt_rate(model: &dyn CausalLm, ctx: &mut DepthContext, prompt: &[u32]) -> Result<f64> {
    let (seq, at) = ctx.start(model)?;
    let mut batch = Batch::new();
    batch.push_sequence(seq, prompt, at, false);
    let start = Instant::now();
    std::hint::black_box(model.forward(&batch, &mut ctx.cache, None)?);
    Ok(prompt.len() as f64 / start.elapsed().as_secs_f64())
}

/// `n` single-token steps after the depth context (each step feeds the previous token back, as
/// decoding does; the token is fixed because sampling is not what is measured): tokens/s.
fn generation_rate(
    model: &dyn CausalLm,
    ctx: &mut DepthContext,
    token: u32,
    n: usize,
) -> Result<f64> {
    let (seq, at) = ctx.start(model)?;
    let (mut batch, mut logits) = (Batch::new(), Vec::new());
    let start = Instant::now();
    for pos in at..at + n {
        batch.clear();
        batch.push(seq, token, pos, true);
        model.forward_into(&batch, &mut ctx.cache, None, &mut logits)?;
        std::hint::black_box(&logits);
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Prefill every prompt (untimed), then `n` steps that decode one token of every sequence:
/// aggregate decode tokens/s.
fn batched_rate(
    model: &dyn CausalLm,
    kv_type: herd_kernels::DType,
    prompts: &[Vec<u32>],
    n: usize,
) -> Result<f64> {
    let mut cache = model.new_cache_of(kv_type)?;
    let mut prefill = Batch::new();
    for (s, p) in prompts.iter().enumerate() {
        prefill.push_sequence(s as u64, p, 0, false);
    }
    model.forward(&prefill, &mut cache, None)?;
    let (mut batch, mut logits) = (Batch::new(), Vec::new());
    let start = Instant::now();
    for step in 0..n {
        batch.clear();
        for (s, p) in prompts.iter().enumerate() {
            batch.push(s as u64, p[step % p.len()], p.len() + step, true);
        }
        model.forward_into(&batch, &mut cache, None, &mut logits)?;
        std::hint::black_box(&logits);
    }
    Ok((n * prompts.len()) as f64 / start.elapsed().as_secs_f64())
}

/// Write a random-weight model of `preset` to a temporary GGUF, if it fits in memory.
fn random_model_file(preset: &str, file_type: &str, seed: u64) -> Result<tempfile::NamedTempFile> {
    let ft = crate::quantize::file_type(file_type)?;
    let plan = crate::quantize::random_plan(preset, ft, seed)?;
    let bytes = crate::quantize::random_plan_bytes(&plan) as f64;
    let available = herd_plan::hardware::this_machine_available_ram().unwrap_or(f64::INFINITY);
    if bytes > 0.9 * available {
        bail!(
            "{preset} at {file_type} takes {:.1} GB, more than this machine's {:.1} GB of available \
             memory; choose a smaller preset (llama4:scout-4b) or type",
            bytes / 1e9,
            available / 1e9
        );
    }
    let file = tempfile::Builder::new()
        .prefix("herd-random-")
        .suffix(".gguf")
        .tempfile()
        .context("creating a temporary file for the random-weight model")?;
    eprintln!(
        "writing {preset} with random weights ({file_type}, {:.2} GB) to {}",
        bytes / 1e9,
        file.path().display()
    );
    crate::quantize::write_with_progress(&plan, ft, file.path())?;
    Ok(file)
}
