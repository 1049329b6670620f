//! The engine around a model: tokenizers and chat templates (this issue), and later the sampler,
//! constraints, KV-cache manager and scheduler that the server and CLI drive.
//!
//! Nothing here does tensor arithmetic (that is `herd-models` and `herd-kernels`) or speaks
//! HTTP (that is `herd-server`).

pub mod card;
pub mod chat;
pub mod constraint;
pub mod detokenize;
pub mod generate;
pub mod registry;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;

pub use card::{ModelCard, model_card};
pub use chat::{ChatTemplate, Message};
pub use detokenize::{StopMatcher, StreamDecoder};
pub use tokenizer::Tokenizer;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Format(#[from] herd_formats::Error),
    #[error("{path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Encode(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Registry(String),
    #[error(transparent)]
    Model(#[from] herd_models::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A model ready to generate: weights, tokenizer and family (for the built-in chat template).
pub struct Loaded {
    pub model: Box<dyn herd_models::CausalLm>,
    pub tokenizer: Tokenizer,
    pub family: String,
    pub path: PathBuf,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Loaded({}, {})", self.family, self.path.display())
    }
}

/// Resolve a model reference (path, alias) and load model and tokenizer.
pub fn load(reference: &str) -> Result<Loaded> {
    load_with(reference, &herd_models::LoadOptions::default())
}

/// [`load`] with model-loading options (quantization at load).
pub fn load_with(reference: &str, options: &herd_models::LoadOptions) -> Result<Loaded> {
    let resolved = registry::resolve(reference)?;
    let path = resolved.path;
    let model_err = |e: herd_models::Error| Error::Registry(format!("{}: {e}", path.display()));
    if path.is_dir() {
        let config = herd_formats::hf::read_json(&path.join("config.json"))?;
        let family = herd_models::config_json::model_type(&config)
            .map_err(model_err)?
            .trim_end_matches("_text")
            .to_string();
        let model = herd_models::load_hf_dir_with(&path, options).map_err(model_err)?;
        let tokenizer = Tokenizer::from_hf_dir(&path)?;
        Ok(Loaded {
            model,
            tokenizer,
            family,
            path,
        })
    } else {
        let file = herd_formats::GgufFile::open(&path)?;
        let family = file
            .architecture()
            .map(str::to_owned)
            .or(resolved.family.map(str::to_owned))
            .unwrap_or_default();
        let tokenizer = Tokenizer::from_gguf(&file)?;
        drop(file);
        let model = herd_models::load_gguf_with(&path, options).map_err(model_err)?;
        Ok(Loaded {
            model,
            tokenizer,
            family,
            path,
        })
    }
}
