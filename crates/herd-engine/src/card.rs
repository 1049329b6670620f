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
    /// The licence identifier: `general.license` (GGUF), or `license` in the model card's
    /// front matter (README.md) or config.json of a Hugging Face directory: an SPDX-style id
    /// (`apache-2.0`), or `other` with a name.
    pub license: Option<String>,
    /// `general.license.name` (GGUF) or the front matter's `license_name` (`llama4`).
    pub license_name: Option<String>,
    /// `general.license.link` (GGUF) or the front matter's `license_link`.
    pub license_link: Option<String>,
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

    /// The licence in one line (`other (llama4): https://…`), when the model says anything.
    pub fn license_summary(&self) -> Option<String> {
        let id = self.license.as_deref();
        let name = self.license_name.as_deref().filter(|n| Some(*n) != id);
        let mut s = match (id, name) {
            (Some(id), Some(name)) => format!("{id} ({name})"),
            (Some(one), None) | (None, Some(one)) => one.to_string(),
            (None, None) => String::new(),
        };
        if let Some(link) = &self.license_link {
            if !s.is_empty() {
                s.push_str(": ");
            }
            s.push_str(link);
        }
        (!s.is_empty()).then_some(s)
    }

    /// Whether Meta's Llama 4 licence governs the weights: a Llama 4 architecture, or a licence
    /// that names Llama 4 (fine-tunes and quantizations keep it).
    pub fn is_llama4_licensed(&self) -> bool {
        let names_llama4 = |s: &String| mentions_llama4(s);
        // `llama4`, and `llama4_text` for text-only checkpoints.
        self.architecture.starts_with("llama4")
            || [&self.license, &self.license_name, &self.license_link]
                .into_iter()
                .flatten()
                .any(names_llama4)
    }
}

/// What `herd inspect` says about Llama 4 weights.
pub const LLAMA4_LICENSE_NOTICE: &str = "\
Llama 4 is licensed under the Llama 4 Community License Agreement, and its use is subject
to the Llama 4 Acceptable Use Policy. Read both before you use or share this model or its
output:
  licence:         https://www.llama.com/llama4/license/
  acceptable use:  https://www.llama.com/llama4/use-policy/
  (copies in https://github.com/meta-llama/llama-models/tree/main/models/llama4)";

/// Describe the model at `path`: a GGUF file (or any shard of a split set) or a Hugging Face
/// checkpoint directory.
///
/// Errors: the file or directory cannot be read, or is not a model herd loads.
pub fn model_card(path: &Path) -> Result<ModelCard> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if path.is_dir() {
        return checkpoint_card(path, modified);
    }
    Ok(gguf_card(&GgufFile::open(path)?, modified))
}

/// Describe an open GGUF file (or split set); `modified` is the weights' modification time.
pub fn gguf_card(file: &GgufFile, modified: Option<SystemTime>) -> ModelCard {
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
    ModelCard {
        format: "gguf",
        architecture: file.architecture().unwrap_or_default().to_string(),
        parameters,
        bytes: file.file_len(),
        quantization,
        context_length: file.arch_usize("context_length"),
        license: gguf_string(file, "general.license"),
        license_name: gguf_string(file, "general.license.name"),
        license_link: gguf_string(file, "general.license.link"),
        modified,
    }
}

fn checkpoint_card(dir: &Path, modified: Option<SystemTime>) -> Result<ModelCard> {
    let config = herd_formats::hf::read_json(&dir.join("config.json"))?;
    // The model card, where the licence is declared (a missing one says nothing).
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap_or_default();
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
        license: front_matter(&readme, "license")
            .or_else(|| config["license"].as_str().map(str::to_string)),
        license_name: front_matter(&readme, "license_name"),
        license_link: front_matter(&readme, "license_link"),
        modified,
    })
}

/// `llama4`, `Llama 4`, `llama-4`, `LLAMA_4`, … as a name of its own: not `TinyLlama-42M` or
/// `Llama-400M` (no digit may follow the 4).
fn mentions_llama4(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    let b = s.as_bytes();
    s.match_indices("llama").any(|(at, _)| {
        let mut i = at + "llama".len();
        if matches!(b.get(i), Some(b' ' | b'-' | b'_')) {
            i += 1;
        }
        b.get(i) == Some(&b'4') && !b.get(i + 1).is_some_and(u8::is_ascii_digit)
    })
}

fn gguf_string(file: &GgufFile, key: &str) -> Option<String> {
    file.get(key).and_then(|v| v.as_str()).map(str::to_string)
}

/// A top-level scalar of a Hugging Face model card's YAML front matter (the block between
/// `---` lines that opens README.md): `key: value`, quoted or not, or a folded `>-` / `|`
/// value on the indented lines after it; a `# comment` after a plain value is dropped. Lists,
/// nested maps and a block that is never closed are not read (None).
fn front_matter(readme: &str, key: &str) -> Option<String> {
    let mut lines = readme.lines();
    if lines.next()?.trim_end() != "---" {
        return None;
    }
    let rest: Vec<&str> = lines.collect();
    let end = rest.iter().position(|l| l.trim_end() == "---")?;
    let body = &rest[..end];
    let at = body
        .iter()
        .position(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let value = body[at][key.len() + 1..].trim();
    let value = if value.is_empty() || value.starts_with('>') || value.starts_with('|') {
        // A block scalar (or a nested value): the indented lines that follow, joined.
        let block: Vec<&str> = body[at + 1..]
            .iter()
            .take_while(|l| l.starts_with(' ') || l.is_empty())
            .map(|l| l.trim())
            .collect();
        // A list (`- item`) or a nested map (`name: x`) is not a scalar.
        if value.is_empty()
            && block
                .first()
                .is_some_and(|l| l.starts_with('-') || l.contains(": "))
        {
            return None;
        }
        block.join(" ").trim().to_string()
    } else {
        let value = match value.find(" #") {
            Some(at) if !value.starts_with(['"', '\'']) => value[..at].trim_end(),
            _ => value,
        };
        value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value)
            .to_string()
    };
    (!value.is_empty()).then_some(value)
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
    fn licences_are_read_from_front_matter() {
        let readme = "---\nlanguage:\n- en\nlicense: other\nlicense_name: llama4\n\
            license_link: >-\n  https://example.com/\n  LICENSE\nbase_model: 'x'\n---\n# Title\n\
            license: not-this\n";
        assert_eq!(front_matter(readme, "license").as_deref(), Some("other"));
        assert_eq!(
            front_matter(readme, "license_name").as_deref(),
            Some("llama4")
        );
        assert_eq!(
            front_matter(readme, "license_link").as_deref(),
            Some("https://example.com/ LICENSE")
        );
        assert_eq!(front_matter(readme, "base_model").as_deref(), Some("x"));
        assert_eq!(front_matter(readme, "language"), None);
        assert_eq!(front_matter(readme, "tags"), None);
        assert_eq!(
            front_matter("# no front matter\nlicense: mit\n", "license"),
            None
        );
        assert_eq!(
            front_matter("---\nlicense: mit\n# never closed\n", "license"),
            None
        );
        assert_eq!(
            front_matter("---\nlicense: mit # SPDX\n---\n", "license").as_deref(),
            Some("mit")
        );
        assert_eq!(
            front_matter("---\nlicense:\n  name: x\n---\n", "license"),
            None,
            "a nested map"
        );
        for (name, llama4) in [
            ("llama4", true),
            ("Llama 4 Community License", true),
            ("meta-llama/Llama-4-Scout-17B-16E", true),
            ("LLAMA_4", true),
            ("TinyLlama-42M", false),
            ("Llama-400M", false),
            ("llama3.1", false),
        ] {
            assert_eq!(mentions_llama4(name), llama4, "{name}");
        }

        let card = ModelCard {
            architecture: "gemma3".into(),
            license: front_matter(readme, "license"),
            license_name: front_matter(readme, "license_name"),
            ..ModelCard::default()
        };
        assert_eq!(card.license_summary().as_deref(), Some("other (llama4)"));
        assert!(
            card.is_llama4_licensed(),
            "a Llama 4 licence on another architecture"
        );
        let apache = ModelCard {
            architecture: "gemma3".into(),
            license: Some("apache-2.0".into()),
            ..ModelCard::default()
        };
        assert!(!apache.is_llama4_licensed());
        let llama4 = ModelCard {
            architecture: "llama4".into(),
            ..ModelCard::default()
        };
        assert!(llama4.is_llama4_licensed());
        assert_eq!(llama4.license_summary(), None);
    }

    #[test]
    fn the_most_common_type_is_by_elements() {
        let items = [("q4_K", 10), ("q6_K", 30), ("q4_K", 25), ("f32", 1)];
        assert_eq!(most_common(items.into_iter()), "q4_K");
        assert_eq!(most_common(std::iter::empty()), "unknown");
    }
}
