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

/// GGUF tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) for a byte-level BPE
/// `tokenizer.json`, as llama.cpp's converter writes it for GPT-2-style vocabularies.
/// `pre` names the pre-tokenizer (e.g. `llama4`); `vocab_size` pads missing ids as `[PAD{id}]`.
pub fn bpe_tokenizer_gguf_metadata(
    dir: &Path,
    pre: &str,
    vocab_size: usize,
    config: &serde_json::Value,
) -> Result<Vec<(String, crate::gguf::Value)>> {
    use crate::gguf::Value;
    let path = dir.join("tokenizer.json");
    let tok = read_json(&path)?;
    let bad = |reason: &str| Error::Tokenizer {
        path: path.clone(),
        reason: reason.to_string(),
    };
    let model = tok.get("model").ok_or_else(|| bad("no model section"))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(bad("only BPE tokenizers can be written to GGUF"));
    }
    let vocab = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| bad("no vocab"))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let mut place = |id: u64, text: &str| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            bad(&format!(
                "token id {id} exceeds the vocabulary ({vocab_size})"
            ))
        })?;
        *slot = Some(text.to_string());
        Ok(())
    };
    for (text, id) in vocab {
        place(
            id.as_u64()
                .ok_or_else(|| bad("vocab ids must be integers"))?,
            text,
        )?;
    }
    for added in tok
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        let id = added
            .get("id")
            .and_then(|i| i.as_u64())
            .ok_or_else(|| bad("added token without id"))?;
        let text = added
            .get("content")
            .and_then(|c| c.as_str())
            .ok_or_else(|| bad("added token without content"))?;
        place(id, text)?;
        let special = added
            .get("special")
            .and_then(|s| s.as_bool())
            .unwrap_or(false);
        types[id as usize] = if special { 3 } else { 4 };
    }
    let merges: Vec<Value> = match model.get("merges").and_then(|m| m.as_array()) {
        Some(list) => list
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(Value::string(s)),
                serde_json::Value::Array(pair) if pair.len() == 2 => Ok(Value::string(&format!(
                    "{} {}",
                    pair[0].as_str().unwrap_or_default(),
                    pair[1].as_str().unwrap_or_default()
                ))),
                _ => Err(bad("merges must be strings or pairs")),
            })
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    let mut tokens_out = Vec::with_capacity(vocab_size);
    for (id, t) in tokens.into_iter().enumerate() {
        tokens_out.push(Value::string(&t.unwrap_or_else(|| {
            types[id] = 5;
            format!("[PAD{id}]")
        })));
    }
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), Value::string("gpt2")),
        ("tokenizer.ggml.pre".to_string(), Value::string(pre)),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(8, tokens_out),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(5, types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(8, merges)),
    ];
    let first_id = |key: &str| match config.get(key) {
        Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()),
        Some(v) => v.as_u64(),
        None => None,
    };
    for (key, gguf_key) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = first_id(key) {
            meta.push((gguf_key.to_string(), Value::U32(id as u32)));
        }
    }
    if let Ok(tc) = read_json(&dir.join("tokenizer_config.json"))
        && let Some(t) = tc.get("chat_template").and_then(|t| t.as_str())
    {
        meta.push(("tokenizer.chat_template".to_string(), Value::string(t)));
    }
    Ok(meta)
}
