//! Reading (and writing) the files models come in: safetensors (single and sharded, memory
//! mapped), Hugging Face model directories, and `.npy` arrays for exchanging results with other
//! implementations, and GGUF (read in place from the memory map, and written).
//!
//! Nothing here knows what a tensor means: names, shapes and element types come out, and the
//! model crates decide what to do with them. Every file is validated before any byte of it is
//! trusted; bad files give an [`Error`] that names the file, never a panic.

mod bytes;
mod download;
pub mod gguf;
pub mod hf;
pub mod hub;
pub mod imatrix;
pub mod npy;
pub mod pypi;
pub mod quantize;
pub mod random;
pub mod safetensors;

pub use bytes::TensorBytes;
pub use gguf::GgufFile;
pub use hf::HfModelDir;
pub use safetensors::{TensorInfo, TensorSet};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: shard {shard} named in the index is missing")]
    MissingShard { path: PathBuf, shard: String },
    #[error("tensor {name} is present in both {first} and {second}")]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "{path}: no safetensors weights found (expected model.safetensors or model.safetensors.index.json)"
    )]
    NoWeights { path: PathBuf },
    #[error("{path}: not a valid GGUF file: {reason}")]
    Gguf { path: PathBuf, reason: String },
    #[error("{path}: not an importance matrix (llama-imatrix's GGUF or legacy .dat): {reason}")]
    Imatrix { path: PathBuf, reason: String },
    #[error("{path}: GGUF split set: {reason}")]
    GgufSplit { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("hub: {0}")]
    Hub(String),
    /// A download that failed or did not match its checksum (the message names the URL or file).
    #[error("{0}")]
    Download(String),
    #[error("package index: {0}")]
    PackageIndex(String),
    #[error("quantize: {0}")]
    Quantize(String),
    #[error("{path}: {reason}")]
    Npy { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
