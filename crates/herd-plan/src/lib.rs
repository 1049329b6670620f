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

/// Aliases the planner knows without a file (the catalog's models).
pub fn aliases() -> Vec<&'static str> {
    herd_models::presets::PRESETS
        .iter()
        .map(|p| p.alias)
        .collect()
}

/// `hf:org/repo` (its config.json) or `hf:org/repo:file.gguf` (the file's header only, by
/// ranged requests): nothing else is downloaded.
fn resolve_hub(reference: &str, ft: Option<FileType>) -> Result<ModelFacts> {
    let model_err = |e: String| Error::Model(format!("{reference}: {e}"));
    let (repo, file) = herd_formats::hub::parse_reference(reference)
        .ok_or_else(|| model_err("expected hf:org/repo or hf:org/repo:file.gguf".into()))?;
    let hub = herd_formats::hub::Hub::from_env();
    match file {
        Some(name) => {
            // A file (with the rest of its split set, if it is a shard) or a quantization name:
            // every file's header, merged for a split set.
            let is_file = name.to_ascii_lowercase().ends_with(".gguf");
            let files = if is_file && !herd_formats::hub::is_split_shard(&name) {
                vec![name]
            } else {
                let listing = hub
                    .list_files(&repo)
                    .map_err(|e| model_err(e.to_string()))?;
                if is_file {
                    herd_formats::hub::with_split_siblings(&repo, &listing, &name)
                } else {
                    herd_formats::hub::pick_quantization(&repo, &listing, &name)
                }
                .map_err(|e| model_err(e.to_string()))?
            };
            let headers = files
                .iter()
                .map(|f| hub.gguf_header(&repo, f))
                .collect::<herd_formats::Result<Vec<_>>>()
                .map_err(|e| model_err(e.to_string()))?;
            let gguf = if headers.len() == 1 {
                headers.into_iter().next().expect("one header")
            } else {
                GgufFile::merge_split_headers(reference, headers)
                    .map_err(|e| model_err(e.to_string()))?
            };
            facts_from_gguf(reference, &gguf, ft)
        }
        None => {
            let bytes = hub
                .read(&repo, "config.json")
                .map_err(|e| model_err(e.to_string()))?;
            let config: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| model_err(format!("config.json: {e}")))?;
            facts_from_config(reference, &config, ft.unwrap_or(FileType::BF16))
                .map_err(|e| model_err(e.to_string()))
        }
    }
}

/// A `config.json` (Gemma 3 or Llama 4, by its `model_type`) as the planner sees it, typed for
/// `ft`.
fn facts_from_config(
    reference: &str,
    config: &serde_json::Value,
    ft: FileType,
) -> Result<ModelFacts> {
    let model_err = |e: herd_models::Error| Error::Model(e.to_string());
    match herd_models::config_json::model_type(config)
        .map_err(model_err)?
        .as_str()
    {
        "gemma3" | "gemma3_text" => {
            let c = herd_models::gemma3::Gemma3Config::from_json(config).map_err(model_err)?;
            Ok(ModelFacts::from_gemma3(reference, &c, ft))
        }
        _ => {
            let c = Llama4Config::from_json(config).map_err(model_err)?;
            Ok(ModelFacts::from_llama4(reference, &c, ft))
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
    if let Some(p) = herd_models::presets::preset(reference) {
        // The published default model is Q4_K_M; the released Llama 4 weights are bf16.
        let default = if p.family == "gemma3" {
            FileType::Q4KM
        } else {
            FileType::BF16
        };
        return facts_from_config(reference, &p.config(), ft.unwrap_or(default));
    }
    if reference.starts_with("hf:") {
        return resolve_hub(reference, ft);
    }
    let path = Path::new(reference);
    if path.is_dir() {
        let config = herd_formats::hf::read_json(&path.join("config.json"))
            .map_err(|e| Error::Model(e.to_string()))?;
        return facts_from_config(reference, &config, ft.unwrap_or(FileType::BF16));
    }
    if path.is_file() {
        let f = GgufFile::open(path).map_err(|e| Error::Model(e.to_string()))?;
        return facts_from_gguf(reference, &f, ft);
    }
    Err(Error::Model(format!(
        "{reference:?} is not a GGUF file, a model directory, or a known alias ({})",
        aliases().join(", ")
    )))
}
