//! `Gemma3TextConfig` with transformers' defaults (reference note gemma3 §a), and the same
//! hyperparameters as llama.cpp reads them from a GGUF file (§c.4).

use herd_formats::gguf::{GgufFile, Value};
use serde_json::Value as Json;

use crate::config_json::{
    Object, as_object, f64_or, flag_or, model_type, opt_string_list, token_ids, usize_or,
};
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Scores are scaled by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: f64,
    /// Keys a sliding layer sees, the query's own included.
    pub sliding_window: usize,
    /// Per layer: sliding (true) or full attention.
    pub sliding: Vec<bool>,
    /// RoPE base of full layers, and the linear scaling factor applied to them only.
    pub rope_theta: f64,
    pub rope_linear_factor: Option<f64>,
    /// RoPE base of sliding layers.
    pub rope_local_base_freq: f64,
    pub rms_norm_eps: f64,
    /// Logits become `c·tanh(logits/c)`. (`attn_logit_softcapping` is accepted in configs but,
    /// as in transformers' Gemma 3 — unlike Gemma 2 — never applied.)
    pub final_logit_softcapping: Option<f64>,
    pub max_position_embeddings: usize,
    pub bos_token_id: Vec<u32>,
    pub eos_token_id: Vec<u32>,
}

fn opt_f64(t: &Object, key: &str) -> Result<Option<f64>> {
    match t.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::Config(format!("key {key} must be a number"))),
    }
}

impl Gemma3Config {
    /// `gemma3_text` (flat) or `gemma3` (text fields under `text_config`).
    pub fn from_json(config: &Json) -> Result<Self> {
        let root = as_object(config, "config.json")?;
        let t = match model_type(config)?.as_str() {
            "gemma3" => as_object(
                root.get("text_config")
                    .ok_or_else(|| Error::Config("model_type gemma3 needs text_config".into()))?,
                "text_config",
            )?,
            "gemma3_text" => root,
            other => {
                return Err(Error::UnknownArchitecture {
                    model_type: other.to_string(),
                });
            }
        };
        let n_layers = usize_or(t, "num_hidden_layers", 26)?;
        let sliding: Vec<bool> = match opt_string_list(t, "layer_types")? {
            Some(list) => list
                .iter()
                .map(|s| match s.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(Error::Config(format!("unknown layer type {other:?}"))),
                })
                .collect::<Result<_>>()?,
            None => {
                let p = usize_or(
                    t,
                    "sliding_window_pattern",
                    usize_or(t, "_sliding_window_pattern", 6)?,
                )?
                .max(1);
                (0..n_layers).map(|i| (i + 1) % p != 0).collect()
            }
        };
        // v4: rope_theta / rope_local_base_freq / rope_scaling; v5: rope_parameters per layer type.
        let (mut theta, mut local, mut factor) = (
            f64_or(t, "rope_theta", 1e6)?,
            f64_or(t, "rope_local_base_freq", 1e4)?,
            None,
        );
        let linear = |s: &Object| -> Result<Option<f64>> {
            match s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Json::as_str)
            {
                None | Some("default") => Ok(None),
                Some("linear") => Ok(Some(f64_or(s, "factor", 1.0)?).filter(|f| *f != 1.0)),
                Some(other) => Err(Error::Config(format!(
                    "RoPE type {other:?} is not supported for gemma3"
                ))),
            }
        };
        if let Some(s) = t.get("rope_scaling").and_then(Json::as_object) {
            factor = linear(s)?;
        }
        if let Some(p) = t.get("rope_parameters").and_then(Json::as_object) {
            if let Some(full) = p.get("full_attention").and_then(Json::as_object) {
                theta = f64_or(full, "rope_theta", theta)?;
                factor = linear(full)?;
            }
            if let Some(sl) = p.get("sliding_attention").and_then(Json::as_object) {
                local = f64_or(sl, "rope_theta", local)?;
            }
        }
        let c = Self {
            vocab_size: usize_or(t, "vocab_size", 262208)?,
            hidden_size: usize_or(t, "hidden_size", 2304)?,
            intermediate_size: usize_or(t, "intermediate_size", 9216)?,
            num_hidden_layers: n_layers,
            num_attention_heads: usize_or(t, "num_attention_heads", 8)?,
            num_key_value_heads: usize_or(t, "num_key_value_heads", 4)?,
            head_dim: usize_or(t, "head_dim", 256)?,
            query_pre_attn_scalar: f64_or(t, "query_pre_attn_scalar", 256.0)?,
            sliding_window: usize_or(t, "sliding_window", 4096)?,
            sliding,
            rope_theta: theta,
            rope_linear_factor: factor,
            rope_local_base_freq: local,
            rms_norm_eps: f64_or(t, "rms_norm_eps", 1e-6)?,
            final_logit_softcapping: opt_f64(t, "final_logit_softcapping")?,
            max_position_embeddings: usize_or(t, "max_position_embeddings", 131072)?,
            bos_token_id: token_ids(t, "bos_token_id")?,
            eos_token_id: token_ids(t, "eos_token_id")?,
        };
        if !flag_or(
            t,
            "tie_word_embeddings",
            flag_or(root, "tie_word_embeddings", true)?,
        )? {
            return Err(Error::Config(
                "gemma3 with an untied output head is not supported".into(),
            ));
        }
        c.validate()?;
        Ok(c)
    }

    /// As llama.cpp reads a GGUF `gemma3` file: no local base, pattern or query scalar are stored,
    /// so sliding layers are `i % 6 < 5` with base 10000 and scores use `1/sqrt(head_dim)`.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let key = |k: &str| f.get(&format!("gemma3.{k}"));
        let need = |k: &str| -> Result<usize> {
            key(k)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| Error::Config(format!("GGUF key gemma3.{k} is missing")))
        };
        let float = |k: &str, d: f64| key(k).and_then(Value::as_f64).unwrap_or(d);
        let n_layers = need("block_count")?;
        let heads = need("attention.head_count")?;
        let hidden = need("embedding_length")?;
        let head_dim = key("attention.key_length")
            .and_then(Value::as_u64)
            .map_or(hidden / heads.max(1), |v| v as usize);
        let window = key("attention.sliding_window")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let sliding: Vec<bool> = match key("attention.sliding_window_pattern") {
            Some(Value::Array(_, items)) => {
                items.iter().map(|v| v.as_bool().unwrap_or(false)).collect()
            }
            Some(v) => {
                let p = v.as_u64().unwrap_or(6).max(1) as usize;
                (0..n_layers).map(|i| window > 0 && i % p < p - 1).collect()
            }
            None => (0..n_layers).map(|i| window > 0 && i % 6 < 5).collect(),
        };
        let vocab_size = match f.tensor_info("token_embd.weight") {
            Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
            _ => {
                return Err(Error::MissingTensor {
                    name: "token_embd.weight".into(),
                });
            }
        };
        let id = |k: &str| {
            f.get(k)
                .and_then(Value::as_u64)
                .map(|v| v as u32)
                .into_iter()
                .collect::<Vec<_>>()
        };
        let c = Self {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: n_layers,
            num_attention_heads: heads,
            num_key_value_heads: key("attention.head_count_kv")
                .and_then(Value::as_u64)
                .map_or(heads, |v| v as usize),
            head_dim,
            query_pre_attn_scalar: head_dim as f64,
            sliding_window: window.max(1),
            sliding,
            rope_theta: float("rope.freq_base", 1e6),
            rope_linear_factor: key("rope.scaling.factor")
                .and_then(Value::as_f64)
                .filter(|f| *f != 0.0 && *f != 1.0),
            rope_local_base_freq: float("rope.freq_base_swa", 1e4),
            rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-6),
            // llama.cpp's iSWA graph (every released Gemma 3) applies no soft-capping.
            final_logit_softcapping: None,
            max_position_embeddings: key("context_length")
                .and_then(Value::as_u64)
                .map_or(32768, |v| v as usize),
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_id: id("tokenizer.ggml.eos_token_id"),
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "{} attention heads cannot share {} kv heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even", self.head_dim));
        }
        if self.sliding.len() != self.num_hidden_layers {
            return bad(format!(
                "{} layer types for {} layers",
                self.sliding.len(),
                self.num_hidden_layers
            ));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.sliding_window == 0 {
            return bad("hidden_size, vocab_size and sliding_window must be positive".into());
        }
        Ok(())
    }

    /// RoPE inverse frequencies for a layer: local base on sliding layers; global base with the
    /// linear factor on full layers.
    pub fn inv_freq(&self, sliding: bool) -> Vec<f32> {
        let d = self.head_dim;
        let base = if sliding {
            self.rope_local_base_freq
        } else {
            self.rope_theta
        } as f32;
        let scale = if sliding {
            1.0
        } else {
            self.rope_linear_factor.unwrap_or(1.0) as f32
        };
        (0..d / 2)
            .map(|j| 1.0 / base.powf((2 * j) as f32 / d as f32) / scale)
            .collect()
    }
}
