//! `herd`: the command-line front end. Thin by design: it parses flags and calls the crates that
//! do the work.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use herd_formats::npy;
use herd_models::{Batch, load_model};

mod bench;
mod generate;
mod inspect;
mod load;
mod plan;
mod quantize;
mod serve;

#[derive(Parser, Debug)]
#[command(
    name = "herd",
    version,
    about = "Run Mixture-of-Experts language models (Llama 4 first)"
)]
struct Cli {
    /// Log more (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one forward pass over given token ids and write the logits as a float32 .npy file
    /// of shape [n_tokens, vocab], to compare herd with another implementation.
    Logits {
        /// A GGUF file or a Hugging Face model directory (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        /// Output .npy file.
        #[arg(long)]
        out: PathBuf,
        /// Also write hidden states [n_tokens, hidden] to this directory: hidden_00.npy is the
        /// embedding output, hidden_{i+1} the output of layer i, the last one after the final norm.
        #[arg(long)]
        hidden_states: Option<PathBuf>,
        /// Element type of the KV cache: f32 (the default here, for comparisons with reference
        /// implementations), f16 (what run and serve use), bf16 or q8_0.
        #[arg(long, default_value = "f32", value_parser = parse_kv_type)]
        kv_type: herd_kernels::DType,
    },
    /// Generate a continuation of a prompt, streamed to stdout (speeds on stderr).
    Run {
        /// A GGUF file, an HF directory or a catalog alias (see `herd models`), e.g. gemma3:270m.
        model: String,
        prompt: String,
        #[command(flatten)]
        sampling: generate::SamplingArgs,
        #[command(flatten)]
        load: load::LoadArgs,
    },
    /// Chat interactively, multi-turn, through the model's chat template.
    Chat {
        #[arg(default_value = herd_engine::registry::DEFAULT_MODEL)]
        model: String,
        /// A system message.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: generate::SamplingArgs,
        #[command(flatten)]
        load: load::LoadArgs,
    },
    /// Serve the OpenAI API (chat, completions, streaming) with continuous batching.
    Serve(serve::ServeArgs),
    /// Download a catalog model into the cache (once) and print its path.
    Pull { model: String },
    /// List the model catalog and the cache directory.
    Models,
    /// Print a GGUF file's metadata and tensor table (name, type, shape, bytes), or a Hugging
    /// Face directory's summary; and the model's licence (Llama 4's terms named).
    Inspect {
        file: PathBuf,
        /// Print every element of long arrays (the vocabulary, say) instead of the first few.
        #[arg(long)]
        full: bool,
    },
    /// Will a model fit this hardware, where should each part live, how fast can it run.
    Plan(plan::PlanArgs),
    /// Measure prompt processing, token generation and batched decode speeds (like llama-bench),
    /// with the memory-bandwidth roofline.
    Bench(bench::BenchArgs),
    /// Write a GGUF with random weights in a preset's shape (for benchmarks; llama.cpp loads it).
    RandomModel {
        /// llama4:scout-4b (the benchmark shape), llama4:scout, llama4:maverick, or a Llama 4
        /// config.json.
        preset: String,
        output: PathBuf,
        /// Weight types, as `herd quantize --type`.
        #[arg(long = "type", short = 't', default_value = "q4_k_m")]
        file_type: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a quantized GGUF from a GGUF file or a Hugging Face directory, choosing each
    /// tensor's type and quantizing it as llama-quantize does (byte for byte).
    Quantize {
        input: PathBuf,
        output: PathBuf,
        /// f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k,
        /// q2_k, q2_k_s, q3_k_s, q3_k_m, q3_k_l, iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq2_m,
        /// iq3_xxs, iq3_xs, iq3_s, iq3_m, iq4_nl, iq4_xs, mxfp4_moe (iq1_*, iq2_*, iq3_xxs,
        /// iq3_xs and q2_k_s need --imatrix)
        #[arg(long = "type", short = 't')]
        file_type: String,
        /// Write a split set (as llama.cpp's llama-gguf-split does) of files holding at most
        /// this much tensor data each: N followed by M (10^6 bytes) or G (10^9 bytes), e.g.
        /// 48G. The files are OUTPUT without .gguf, then -00001-of-0000N.gguf, …
        #[arg(long, value_name = "SIZE", conflicts_with = "split_max_tensors")]
        split_max_size: Option<String>,
        /// Write a split set of files holding at most this many tensors each.
        #[arg(long, value_name = "N")]
        split_max_tensors: Option<usize>,
        /// An importance matrix from llama.cpp's llama-imatrix (GGUF or legacy .dat) to guide
        /// the quantization of every tensor it covers, as llama-quantize --imatrix.
        #[arg(long, value_name = "FILE")]
        imatrix: Option<PathBuf>,
        /// Quantize the tensors whose names match the regular expression PATTERN to TYPE (a
        /// tensor type: q4_k, iq2_xxs, q8_0, …), instead of the file type's choice; repeatable,
        /// the first match wins. E.g. `--tensor-type 'ffn_.*_exps=iq2_xxs'`.
        #[arg(long, value_name = "PATTERN=TYPE")]
        tensor_type: Vec<String>,
        /// The type of the output matrix (output.weight).
        #[arg(long, value_name = "TYPE")]
        output_tensor_type: Option<String>,
        /// The type of the token embedding.
        #[arg(long, value_name = "TYPE")]
        token_embedding_type: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A closed stdout (`herd inspect f | head`) is the reader's choice, not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>().map(|e| e.kind())
                == Some(std::io::ErrorKind::BrokenPipe) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            // The whole cause chain on one line, no backtrace: errors here are the user's to read.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Logits {
            model,
            tokens,
            out,
            hidden_states,
            kv_type,
        } => logits(&model, &tokens, &out, hidden_states.as_deref(), kv_type),
        Command::Inspect { file, full } => inspect::run(&file, full),
        Command::Plan(args) => plan::run(&args),
        Command::Run {
            model,
            prompt,
            sampling,
            load,
        } => generate::run(&load.load(&model)?, &prompt, &sampling),
        Command::Chat {
            model,
            system,
            sampling,
            load,
        } => generate::chat(&load.load(&model)?, system.as_deref(), &sampling),
        Command::Serve(args) => serve::run(&args),
        Command::Pull { model } => generate::pull(&model),
        Command::Models => generate::list(),
        Command::Bench(args) => bench::run(&args),
        Command::RandomModel {
            preset,
            output,
            file_type,
            seed,
        } => quantize::random_model(&preset, &output, &file_type, seed),
        Command::Quantize {
            input,
            output,
            file_type,
            split_max_size,
            split_max_tensors,
            imatrix,
            tensor_type,
            output_tensor_type,
            token_embedding_type,
        } => {
            let split = quantize::split_limit(split_max_size.as_deref(), split_max_tensors)?;
            let overrides = quantize::type_overrides(
                &tensor_type,
                output_tensor_type.as_deref(),
                token_embedding_type.as_deref(),
            )?;
            quantize::run(
                &input,
                &output,
                &file_type,
                split,
                imatrix.as_deref(),
                &overrides,
            )
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// A `--kv-type` value: one of the element types a KV cache can store.
pub(crate) fn parse_kv_type(s: &str) -> std::result::Result<herd_kernels::DType, String> {
    let types = herd_kernels::attention::KV_TYPES;
    herd_kernels::DType::from_name(&s.to_ascii_lowercase())
        .filter(|t| types.contains(t))
        .ok_or_else(|| {
            let names: Vec<String> = types
                .iter()
                .map(|t| t.name().to_ascii_lowercase())
                .collect();
            format!(
                "{s:?} is not a KV cache type: choose one of {}",
                names.join(", ")
            )
        })
}

fn logits(
    model_dir: &Path,
    tokens: &[u32],
    out: &Path,
    hidden_dir: Option<&Path>,
    kv_type: herd_kernels::DType,
) -> Result<()> {
    if tokens.is_empty() {
        bail!("--tokens needs at least one token id");
    }
    let model =
        load_model(model_dir).with_context(|| format!("loading {}", model_dir.display()))?;
    let mut cache = model.new_cache_of(kv_type)?;
    let mut trace = Vec::new();
    let batch = Batch::sequence(0, tokens, 0);
    let logits = model.forward(
        &batch,
        &mut cache,
        hidden_dir.is_some().then_some(&mut trace),
    )?;
    npy::write_f32(out, &[tokens.len(), model.vocab_size()], &logits)?;
    if let Some(dir) = hidden_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (i, state) in trace.iter().enumerate() {
            npy::write_f32(
                &dir.join(format!("hidden_{i:02}.npy")),
                &[tokens.len(), model.hidden_size()],
                state,
            )?;
        }
    }
    eprintln!(
        "wrote logits [{}, {}] to {}",
        tokens.len(),
        model.vocab_size(),
        out.display()
    );
    if let Some(peak) = peak_resident_bytes() {
        eprintln!("peak resident memory: {peak} bytes");
    }
    Ok(())
}

/// Peak resident set size of this process (Linux `VmHWM`), for comparing with `herd plan`.
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
