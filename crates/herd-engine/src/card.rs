//! What a model file is, in the terms APIs describe models with (Ollama's `/api/tags` and
//! `/api/show`, `herd inspect`): format, architecture, parameter count, bytes, quantization,
//! context length and licence, read from the GGUF header or the Hugging Face directory's
//! `config.json` and safetensors headers (no tensor data is read).

use std::path::Path;
use std::time::SystemTime;

use herd_formats::GgufFile;
use herd_formats::quantize::FileType;

use crate::{Error, Result};

/// A model's description.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelCard {
    /// `gguf` or `safetensors`.
    pub format: &'static str,
    /// `general.architecture` (GGUF) or `model_type` (config.json): `llama4`, `gemma3`, …
    pub architecture: String,
    /// Weights, summed over every tensor.
    pub parameters: u64,
    /// Bytes on disk of the weights (every shard of a split set or checkpoint).
    pub bytes: u64,
    /// The file type in llama.cpp's upper-case spelling (`Q4_K_M`), or for a checkpoint its
    /// tensors' most common element type (`BF16`).
    pub quantization: String,
    /// The context length the model was trained for, when the file says.
    pub context_length: Option<usize>,
    /// `general.license` (GGUF) or config.json's `license`, when present.
    pub license: Option<String>,
    /// The weights' modification time.
    pub modified: Option<SystemTime>,
}

impl ModelCard {
    /// The parameter count as model listings write it: `268.1M`, `108.6B`.
    pub fn parameter_size(&self) -> String {
        let p = self.parameters as f64;
        if p >= 1e9 {
            format!("{:.1}B", p / 1e9)
        } else if p >= 1e6 {
            format!("{:.1}M", p / 1e6)
        } else {
            format!("{}", self.parameters)
        }
    }
}

/// Describe the model at `path`: a GGUF file (or any shard of a split set) or a Hugging Face
/// checkpoint directory.
///
/// Errors: the file or directory cannot be read, or is not a model herd loads.
pub fn model_card(path: &Path) -> Result<ModelCard> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if path.is_dir() {
        return checkpoint_card(path, modified);
    }
    let file = GgufFile::open(path)?;
    let tensors = file.tensors();
    let parameters = tensors.iter().map(|t| t.n_elements()).sum();
    let quantization = file
        .get("general.file_type")
        .and_then(|v| v.as_u64())
        .and_then(|id| FileType::ALL.into_iter().find(|t| u64::from(t.id()) == id))
        .map(|t| t.name().to_ascii_uppercase())
        .unwrap_or_else(|| {
            most_common(tensors.iter().map(|t| (t.dtype.name(), t.n_elements())))
                .to_ascii_uppercase()
        });
    Ok(ModelCard {
        format: "gguf",
        architecture: file.architecture().unwrap_or_default().to_string(),
        parameters,
        bytes: file.file_len(),
        quantization,
        context_length: file.arch_usize("context_length"),
        license: file
            .get("general.license")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        modified,
    })
}

fn checkpoint_card(dir: &Path, modified: Option<SystemTime>) -> Result<ModelCard> {
    let config = herd_formats::hf::read_json(&dir.join("config.json"))?;
    let architecture = herd_models::config_json::model_type(&config)
        .map_err(|e| Error::Registry(format!("{}: {e}", dir.display())))?
        .to_string();
    let text = config.get("text_config").unwrap_or(&config);
    let context_length = text["max_position_embeddings"]
        .as_u64()
        .and_then(|v| usize::try_from(v).ok());
    let index = dir.join("model.safetensors.index.json");
    let set = if index.is_file() {
        herd_formats::safetensors::TensorSet::open_index(&index)?
    } else {
        herd_formats::safetensors::TensorSet::open_file(&dir.join("model.safetensors"))?
    };
    let mut parameters = 0u64;
    let mut types: Vec<(&str, u64)> = Vec::new();
    for name in set.names() {
        let Some(t) = set.get(name) else { continue };
        let n: u64 = t.shape.iter().map(|&d| d as u64).product();
        parameters += n;
        types.push((t.dtype.as_ref().map_or("other", |d| d.name()), n));
    }
    Ok(ModelCard {
        format: "safetensors",
        architecture,
        parameters,
        bytes: set.total_bytes(),
        quantization: most_common(types.into_iter()).to_ascii_uppercase(),
        context_length,
        license: config["license"].as_str().map(str::to_string),
        modified,
    })
}

/// The name with the most weight (elements) among `(name, weight)` pairs.
fn most_common<'a>(items: impl Iterator<Item = (&'a str, u64)>) -> &'a str {
    let mut totals: Vec<(&str, u64)> = Vec::new();
    for (name, n) in items {
        match totals.iter_mut().find(|(k, _)| *k == name) {
            Some((_, t)) => *t += n,
            None => totals.push((name, n)),
        }
    }
    totals
        .into_iter()
        .max_by_key(|&(_, n)| n)
        .map_or("unknown", |(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_sizes_read_as_listings_write_them() {
        let card = |parameters| ModelCard {
            parameters,
            ..ModelCard::default()
        };
        assert_eq!(card(268_098_176).parameter_size(), "268.1M");
        assert_eq!(card(108_641_000_000).parameter_size(), "108.6B");
        assert_eq!(card(4096).parameter_size(), "4096");
    }

    #[test]
    fn the_most_common_type_is_by_elements() {
        let items = [("q4_K", 10), ("q6_K", 30), ("q4_K", 25), ("f32", 1)];
        assert_eq!(most_common(items.into_iter()), "q4_K");
        assert_eq!(most_common(std::iter::empty()), "unknown");
    }
}
