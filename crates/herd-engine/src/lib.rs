//! The engine around a model: tokenizers and chat templates (this issue), and later the sampler,
//! constraints, KV-cache manager and scheduler that the server and CLI drive.
//!
//! Nothing here does tensor arithmetic (that is `herd-models` and `herd-kernels`) or speaks
//! HTTP (that is `herd-server`).

pub mod chat;
pub mod detokenize;
pub mod tokenizer;

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
}

pub type Result<T> = std::result::Result<T, Error>;
