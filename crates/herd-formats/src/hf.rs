//! A Hugging Face model directory: `config.json` plus safetensors weights.

use std::path::{Path, PathBuf};

use crate::safetensors::find_weights;
use crate::{Error, Result, TensorSet, io_err};

/// The files of an HF checkpoint, opened and validated, with the config still untyped: the model
/// crate that recognises `model_type` parses it.
#[derive(Debug)]
pub struct HfModelDir {
    pub path: PathBuf,
    pub config: serde_json::Value,
    pub tensors: TensorSet,
}

impl HfModelDir {
    pub fn open(path: &Path) -> Result<Self> {
        let config = read_json(&path.join("config.json"))?;
        let (weights, sharded) = find_weights(path)?;
        let tensors = if sharded {
            TensorSet::open_index(&weights)?
        } else {
            TensorSet::open_file(&weights)?
        };
        tracing::info!(path = %path.display(), tensors = tensors.len(), "opened model directory");
        Ok(Self {
            path: path.to_path_buf(),
            config,
            tensors,
        })
    }
}

/// Read and parse a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
