//! Will a model fit, where should each part live, and how fast can it run: answered from a
//! config or a GGUF header alone, before anything is downloaded or loaded.
//!
//! Memory follows the total parameter count (every expert must be resident), speed follows the
//! bytes a token reads (its routed experts, not all of them). Bounds are physics, not
//! predictions: decode ≤ bandwidth ÷ bytes read per token, prefill ≤ FLOP/s ÷ FLOPs per token.
//! This crate does not run models.

pub mod hardware;
pub mod model;
pub mod plan;
pub mod render;

use std::path::Path;

use herd_formats::GgufFile;
use herd_formats::quantize::FileType;
use herd_models::llama4::Llama4Config;

pub use model::ModelFacts;
pub use plan::{Hardware, KvType, Report, Request, plan};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Hardware(String),
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    Request(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Released Llama 4 text configs (reference note §a.1), for planning without a download.
const SCOUT: &str = r#"{"model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120,
  "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
  "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_local_experts": 16,
  "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "max_position_embeddings": 10485760,
  "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 16.0,
  "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
  "attention_chunk_size": 8192, "use_qk_norm": true}"#;
const MAVERICK: &str = r#"{"model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120,
  "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
  "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_local_experts": 128,
  "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "max_position_embeddings": 1048576,
  "rope_theta": 500000.0, "attention_chunk_size": 8192, "use_qk_norm": false}"#;

/// Gemma 3 270M's text config (the default model; reference note gemma3 §a.1).
const GEMMA3_270M: &str = r#"{"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
  "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
  "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512, "rope_theta": 1000000.0,
  "rope_local_base_freq": 10000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6}"#;

/// Aliases the planner knows without a file (the catalog's models).
pub const ALIASES: &[&str] = &["llama4:scout", "llama4:maverick", "gemma3:270m"];

/// `hf:org/repo` (its config.json) or `hf:org/repo:file.gguf` (the file's header only, by
/// ranged requests): nothing else is downloaded.
fn resolve_hub(reference: &str, ft: Option<FileType>) -> Result<ModelFacts> {
    let model_err = |e: String| Error::Model(format!("{reference}: {e}"));
    let (repo, file) = herd_formats::hub::parse_reference(reference)
        .ok_or_else(|| model_err("expected hf:org/repo or hf:org/repo:file.gguf".into()))?;
    let hub = herd_formats::hub::Hub::from_env();
    match file {
        Some(f) if f.ends_with(".gguf") => {
            let gguf = hub
                .gguf_header(&repo, &f)
                .map_err(|e| model_err(e.to_string()))?;
            facts_from_gguf(reference, &gguf, ft)
        }
        Some(f) => Err(model_err(format!(
            "{f}: planning needs a .gguf file or the repository's config.json"
        ))),
        None => {
            let bytes = hub
                .read(&repo, "config.json")
                .map_err(|e| model_err(e.to_string()))?;
            let config: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| model_err(format!("config.json: {e}")))?;
            let c = Llama4Config::from_json(&config).map_err(|e| model_err(e.to_string()))?;
            Ok(ModelFacts::from_llama4(
                reference,
                &c,
                ft.unwrap_or(FileType::BF16),
            ))
        }
    }
}

fn facts_from_gguf(reference: &str, f: &GgufFile, ft: Option<FileType>) -> Result<ModelFacts> {
    let Some(ft) = ft else {
        return ModelFacts::from_gguf(reference, f);
    };
    if f.architecture() != Some("llama4") {
        return Err(Error::Model(
            "--type with a GGUF file is supported for llama4 files".into(),
        ));
    }
    let c =
        herd_models::llama4::config::gguf::config(f).map_err(|e| Error::Model(e.to_string()))?;
    Ok(ModelFacts::from_llama4(reference, &c, ft))
}

/// Resolve a model reference: a built-in alias, a GGUF file (exact tensor table; `ft` ignored
/// unless given, then predicted as if requantized), an HF directory (`ft` defaults to bf16), or
/// `hf:org/repo[:file.gguf]` (config.json or the GGUF header, fetched from `HF_ENDPOINT`).
pub fn resolve(reference: &str, ft: Option<FileType>) -> Result<ModelFacts> {
    let config_json = match reference {
        "llama4:scout" => Some(SCOUT),
        "llama4:maverick" => Some(MAVERICK),
        _ => None,
    };
    if reference == "gemma3:270m" {
        let config = serde_json::from_str(GEMMA3_270M).expect("built-in config is valid JSON");
        let c = herd_models::gemma3::Gemma3Config::from_json(&config)
            .map_err(|e| Error::Model(e.to_string()))?;
        // The published default model is Q4_K_M.
        return Ok(ModelFacts::from_gemma3(
            reference,
            &c,
            ft.unwrap_or(FileType::Q4KM),
        ));
    }
    if let Some(text) = config_json {
        let c = Llama4Config::from_json(
            &serde_json::from_str(text).expect("built-in config is valid JSON"),
        )
        .map_err(|e| Error::Model(e.to_string()))?;
        return Ok(ModelFacts::from_llama4(
            reference,
            &c,
            ft.unwrap_or(FileType::BF16),
        ));
    }
    if reference.starts_with("hf:") {
        return resolve_hub(reference, ft);
    }
    let path = Path::new(reference);
    if path.is_dir() {
        let config = herd_formats::hf::read_json(&path.join("config.json"))
            .map_err(|e| Error::Model(e.to_string()))?;
        let c = Llama4Config::from_json(&config).map_err(|e| Error::Model(e.to_string()))?;
        return Ok(ModelFacts::from_llama4(
            reference,
            &c,
            ft.unwrap_or(FileType::BF16),
        ));
    }
    if path.is_file() {
        let f = GgufFile::open(path).map_err(|e| Error::Model(e.to_string()))?;
        return facts_from_gguf(reference, &f, ft);
    }
    Err(Error::Model(format!(
        "{reference:?} is not a GGUF file, a model directory, or a known alias ({})",
        ALIASES.join(", ")
    )))
}
