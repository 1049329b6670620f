//! `Llama4TextConfig`, parsed with exactly the defaults of transformers' config class
//! (reference note §a.1): a tiny test config that omits `head_dim` gets 128, not hidden/heads.

use serde_json::Value;

use crate::config_json::{
    Object, as_object, f64_or, flag_or, model_type, opt_string_list, opt_usize, opt_usize_list,
    token_ids, usize_or,
};
use crate::{Error, Result};

/// Llama 3-style RoPE frequency scaling (Scout uses it; Maverick does not).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Which keys a query may see in a layer (reference note §b.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    /// Causal and within the same fixed, position-aligned chunk (the RoPE layers).
    Chunked,
    /// Plain causal (the NoPE layers).
    Full,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Llama4Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Width of each routed expert and of the shared expert.
    pub intermediate_size: usize,
    /// Width of the dense (non-MoE) feed-forward layers.
    pub intermediate_size_mlp: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_layers: Vec<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub attention_chunk_size: Option<usize>,
    /// Per layer: does it rotate q/k (HF's inverted-by-name `no_rope_layers`, 1 = RoPE).
    pub use_rope: Vec<bool>,
    pub layer_types: Vec<AttentionKind>,
    pub use_qk_norm: bool,
    pub attn_temperature_tuning: bool,
    pub floor_scale: f64,
    pub attn_scale: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Vec<u32>,
    pub eos_token_id: Vec<u32>,
}

impl Llama4Config {
    /// Parse a whole `config.json`: `model_type` `llama4` (text fields under `text_config`) or
    /// `llama4_text` (flat).
    pub fn from_json(config: &Value) -> Result<Self> {
        let root = as_object(config, "config.json")?;
        let text = match model_type(config)?.as_str() {
            "llama4" => match root.get("text_config") {
                Some(t) => as_object(t, "text_config")?,
                None => {
                    return Err(Error::Config(
                        "model_type llama4 needs the required key text_config".into(),
                    ));
                }
            },
            "llama4_text" => root,
            other => {
                return Err(Error::UnknownArchitecture {
                    model_type: other.to_string(),
                });
            }
        };
        // tie_word_embeddings may sit at the top level of a multimodal config.
        let tie = flag_or(
            text,
            "tie_word_embeddings",
            flag_or(root, "tie_word_embeddings", false)?,
        )?;
        Self::from_text_config(text, tie)
    }

    fn from_text_config(t: &Object, tie_word_embeddings: bool) -> Result<Self> {
        let hidden_size = usize_or(t, "hidden_size", 5120)?;
        let num_attention_heads = usize_or(t, "num_attention_heads", 40)?;
        let num_hidden_layers = usize_or(t, "num_hidden_layers", 48)?;
        // Absent → 128 (the dataclass default); explicitly null → hidden / heads.
        let head_dim = match t.get("head_dim") {
            None => 128,
            Some(Value::Null) => hidden_size / num_attention_heads.max(1),
            Some(_) => usize_or(t, "head_dim", 128)?,
        };
        let (rope_theta, rope_scaling) = parse_rope(t)?;

        let interval = usize_or(t, "no_rope_layer_interval", 4)?;
        let use_rope: Vec<bool> = match opt_usize_list(t, "no_rope_layers")? {
            // An empty list means "derive", as in HF.
            Some(list) if !list.is_empty() => list.iter().map(|&v| v != 0).collect(),
            _ => {
                if interval == 0 {
                    return Err(Error::Config(
                        "no_rope_layer_interval must be positive".into(),
                    ));
                }
                (0..num_hidden_layers)
                    .map(|i| (i + 1) % interval != 0)
                    .collect()
            }
        };
        let step = usize_or(t, "interleave_moe_layer_step", 1)?;
        let moe_layers = match opt_usize_list(t, "moe_layers")? {
            Some(list) => list,
            None if step == 0 => {
                return Err(Error::Config(
                    "interleave_moe_layer_step must be positive".into(),
                ));
            }
            None => (step - 1..num_hidden_layers).step_by(step).collect(),
        };
        let layer_types = match opt_string_list(t, "layer_types")? {
            Some(list) => list
                .iter()
                .map(|s| match s.as_str() {
                    "chunked_attention" => Ok(AttentionKind::Chunked),
                    "full_attention" => Ok(AttentionKind::Full),
                    other => Err(Error::Config(format!(
                        "unknown layer type {other:?} in layer_types"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?,
            None => use_rope
                .iter()
                .map(|&r| {
                    if r {
                        AttentionKind::Chunked
                    } else {
                        AttentionKind::Full
                    }
                })
                .collect(),
        };

        let config = Self {
            vocab_size: usize_or(t, "vocab_size", 202048)?,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: usize_or(t, "num_key_value_heads", 8)?,
            head_dim,
            intermediate_size: usize_or(t, "intermediate_size", 8192)?,
            intermediate_size_mlp: usize_or(t, "intermediate_size_mlp", 16384)?,
            num_local_experts: usize_or(t, "num_local_experts", 16)?,
            num_experts_per_tok: usize_or(t, "num_experts_per_tok", 1)?,
            moe_layers,
            rms_norm_eps: f64_or(t, "rms_norm_eps", 1e-5)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_or(t, "max_position_embeddings", 131072)?,
            attention_chunk_size: match t.get("attention_chunk_size") {
                None => Some(8192),
                Some(_) => opt_usize(t, "attention_chunk_size")?,
            },
            use_rope,
            layer_types,
            use_qk_norm: flag_or(t, "use_qk_norm", true)?,
            attn_temperature_tuning: flag_or(t, "attn_temperature_tuning", true)?,
            floor_scale: f64_or(t, "floor_scale", 8192.0)?,
            attn_scale: f64_or(t, "attn_scale", 0.1)?,
            tie_word_embeddings,
            bos_token_id: token_ids(t, "bos_token_id")?,
            eos_token_id: token_ids(t, "eos_token_id")?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
        ] {
            if v == 0 {
                return bad(format!("{key} must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return bad(format!(
                "num_experts_per_tok ({}) exceeds num_local_experts ({})",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        if let Some(&l) = self
            .moe_layers
            .iter()
            .find(|&&l| l >= self.num_hidden_layers)
        {
            return bad(format!(
                "moe_layers names layer {l} of {}",
                self.num_hidden_layers
            ));
        }
        if self.use_rope.len() != self.num_hidden_layers {
            return bad(format!(
                "no_rope_layers has {} entries for {} layers",
                self.use_rope.len(),
                self.num_hidden_layers
            ));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return bad(format!(
                "layer_types has {} entries for {} layers",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if self.attention_chunk_size == Some(0) {
            return bad("attention_chunk_size must be positive".into());
        }
        if self.layer_types.contains(&AttentionKind::Chunked) && self.attention_chunk_size.is_none()
        {
            return bad("chunked_attention layers need attention_chunk_size".into());
        }
        if self.floor_scale <= 0.0 {
            return bad("floor_scale must be positive".into());
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return bad("rope_theta must be positive".into());
        }
        Ok(())
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe_layers.contains(&layer)
    }

    /// RoPE inverse frequencies `[head_dim / 2]`, in f32 as transformers computes them, with
    /// llama3 scaling applied when configured.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..d / 2)
            .map(|j| 1.0 / base.powf((2 * j) as f32 / d as f32))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return inv;
        };
        let (factor, lo, hi) = (
            s.factor as f32,
            s.low_freq_factor as f32,
            s.high_freq_factor as f32,
        );
        let old_len = s.original_max_position_embeddings as f32;
        let (low_freq_wavelen, high_freq_wavelen) = (old_len / lo, old_len / hi);
        inv.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_freq_wavelen {
                    f
                } else if wavelen > low_freq_wavelen {
                    f / factor
                } else if hi == lo {
                    // An empty middle band: only the boundary itself lands here.
                    f
                } else {
                    let smooth = (old_len / wavelen - lo) / (hi - lo);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
    }

    /// The attention temperature for a query at absolute position `pos` (NoPE layers only).
    pub fn attn_temperature(&self, pos: usize) -> f32 {
        let steps = ((pos as f32 + 1.0) / self.floor_scale as f32).floor();
        steps.ln_1p() * self.attn_scale as f32 + 1.0
    }
}

/// RoPE settings in either style: v4 (`rope_theta` + `rope_scaling`) or v5 (`rope_parameters`).
fn parse_rope(t: &Object) -> Result<(f64, Option<Llama3RopeScaling>)> {
    let (theta, params) = match t.get("rope_parameters").filter(|v| !v.is_null()) {
        Some(p) => {
            let p = as_object(p, "rope_parameters")?;
            (
                f64_or(p, "rope_theta", f64_or(t, "rope_theta", 500000.0)?)?,
                Some(p),
            )
        }
        None => {
            let scaling = match t.get("rope_scaling").filter(|v| !v.is_null()) {
                Some(s) => Some(as_object(s, "rope_scaling")?),
                None => None,
            };
            (f64_or(t, "rope_theta", 500000.0)?, scaling)
        }
    };
    let Some(p) = params else {
        return Ok((theta, None));
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str);
    match kind {
        Some("default") => Ok((theta, None)),
        // transformers 4.x treats any non-null rope_scaling on Llama 4 as llama3.
        Some("llama3") | None => Ok((
            theta,
            Some(Llama3RopeScaling {
                factor: f64_or(p, "factor", 8.0)?,
                low_freq_factor: f64_or(p, "low_freq_factor", 1.0)?,
                high_freq_factor: f64_or(p, "high_freq_factor", 4.0)?,
                original_max_position_embeddings: usize_or(
                    p,
                    "original_max_position_embeddings",
                    8192,
                )?,
            }),
        )),
        Some(other) => Err(Error::Config(format!(
            "RoPE type {other:?} is not supported for llama4 (supported: default, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Llama4Config> {
        Llama4Config::from_json(&v)
    }

    #[test]
    fn defaults_match_hf_for_absent_keys() {
        let c = parse(json!({"model_type": "llama4_text"})).unwrap();
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads
            ),
            (202048, 5120, 48, 40)
        );
        assert_eq!(
            (c.num_key_value_heads, c.head_dim, c.intermediate_size),
            (8, 128, 8192)
        );
        assert_eq!(
            (
                c.intermediate_size_mlp,
                c.num_local_experts,
                c.num_experts_per_tok
            ),
            (16384, 16, 1)
        );
        assert_eq!(c.moe_layers, (0..48).collect::<Vec<_>>());
        assert_eq!(c.attention_chunk_size, Some(8192));
        assert!(c.use_qk_norm && c.attn_temperature_tuning && !c.tie_word_embeddings);
        assert_eq!(
            (c.floor_scale, c.attn_scale, c.rope_theta, c.rms_norm_eps),
            (8192.0, 0.1, 500000.0, 1e-5)
        );
        assert_eq!(c.rope_scaling, None);
        let nope: Vec<usize> = (0..48).filter(|&i| !c.use_rope[i]).collect();
        assert_eq!(nope, (0..12).map(|k| 4 * k + 3).collect::<Vec<_>>());
        assert_eq!(c.layer_types[3], AttentionKind::Full);
        assert_eq!(c.layer_types[2], AttentionKind::Chunked);
    }

    #[test]
    fn maverick_interleaving_and_null_head_dim() {
        let c = parse(
            json!({"model_type": "llama4_text", "interleave_moe_layer_step": 2,
            "num_hidden_layers": 6, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": null,
            "no_rope_layers": []}),
        )
        .unwrap();
        assert_eq!(c.moe_layers, [1, 3, 5]);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.use_rope, [true, true, true, false, true, true]);
    }

    #[test]
    fn scout_style_integer_flag_and_multimodal_nesting() {
        let c = parse(json!({"model_type": "llama4", "tie_word_embeddings": false,
            "text_config": {"attn_temperature_tuning": 4, "eos_token_id": [200001, 200007, 200008],
            "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
            "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}}}))
        .unwrap();
        assert!(c.attn_temperature_tuning);
        assert_eq!(c.eos_token_id, [200001, 200007, 200008]);
        assert_eq!(c.rope_scaling.unwrap().factor, 16.0);
    }

    #[test]
    fn v4_and_v5_rope_styles_agree() {
        let v4 = parse(json!({"model_type": "llama4_text", "rope_theta": 1000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}))
        .unwrap();
        let v5 = parse(
            json!({"model_type": "llama4_text", "rope_parameters": {"rope_type": "llama3",
            "rope_theta": 1000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}}),
        )
        .unwrap();
        assert_eq!(v4, v5);
        let plain = parse(json!({"model_type": "llama4_text",
            "rope_parameters": {"rope_type": "default", "rope_theta": 10.0}}))
        .unwrap();
        assert_eq!((plain.rope_theta, plain.rope_scaling), (10.0, None));
    }

    #[test]
    fn llama3_scaling_bands() {
        let c = parse(
            json!({"model_type": "llama4_text", "head_dim": 16, "rope_theta": 10000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        )
        .unwrap();
        let f = c.rope_inv_freq();
        let plain: Vec<f32> = (0..8)
            .map(|j| 1.0 / 10000f32.powf(j as f32 / 8.0))
            .collect();
        assert_eq!(f[0], plain[0], "high-frequency band unchanged");
        assert_eq!(
            f[7],
            plain[7] / 16.0,
            "low-frequency band divided by the factor"
        );
        assert!(
            f[1] < plain[1] && f[1] > plain[1] / 16.0,
            "middle band interpolated"
        );
    }

    #[test]
    fn temperature_steps_with_position() {
        let c = parse(json!({"model_type": "llama4_text"})).unwrap();
        assert_eq!(c.attn_temperature(0), 1.0);
        assert_eq!(c.attn_temperature(8190), 1.0);
        assert!((c.attn_temperature(8191) - (1.0 + 0.1 * 2f32.ln())).abs() < 1e-6);
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let cases = [
            (json!({"hidden_size": 8}), "model_type"),
            (json!({"model_type": "llama4"}), "text_config"),
            (
                json!({"model_type": "llama4_text", "hidden_size": "big"}),
                "hidden_size",
            ),
            (
                json!({"model_type": "llama4_text", "num_key_value_heads": 7}),
                "multiple",
            ),
            (
                json!({"model_type": "llama4_text", "rope_scaling": {"rope_type": "yarn"}}),
                "yarn",
            ),
            (
                json!({"model_type": "llama4_text", "num_hidden_layers": 2, "moe_layers": [5]}),
                "moe_layers",
            ),
            (
                json!({"model_type": "llama4_text", "layer_types": ["sliding"]}),
                "sliding",
            ),
        ];
        for (json, needle) in cases {
            let err = parse(json.clone()).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
        assert!(matches!(
            parse(json!({"model_type": "mistral"})),
            Err(Error::UnknownArchitecture { .. })
        ));
    }
}

/// Llama 4 hyperparameters as llama.cpp reads them from a GGUF file (`arch = llama4`).
///
/// llama.cpp fixes several values instead of reading them (reference note §e.14-16), and so does
/// this loader, so that a GGUF file means the same model here as there: chunk 8192, temperature
/// floor 8192 and scale 0.1 on every NoPE layer, NoPE on every 4th layer, q/k norm unless the
/// model has 128 experts. `attention.sliding_window = 0` turns chunking off (MobileLLM-style).
pub mod gguf {
    use herd_formats::gguf::{GgufFile, Value};

    use super::{AttentionKind, Llama4Config};
    use crate::{Error, Result};

    fn key<'a>(f: &'a GgufFile, k: &str) -> Option<&'a Value> {
        f.get(&format!("llama4.{k}"))
    }

    fn required(f: &GgufFile, k: &str) -> Result<usize> {
        let v =
            key(f, k).ok_or_else(|| Error::Config(format!("GGUF key llama4.{k} is missing")))?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                Error::Config(format!(
                    "GGUF key llama4.{k} must be a non-negative integer"
                ))
            })
    }

    fn optional(f: &GgufFile, k: &str) -> Result<Option<usize>> {
        key(f, k).map(|_| required(f, k)).transpose()
    }

    fn float(f: &GgufFile, k: &str, default: f64) -> Result<f64> {
        match key(f, k) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Error::Config(format!("GGUF key llama4.{k} must be a number"))),
        }
    }

    fn token_id(f: &GgufFile, k: &str) -> Vec<u32> {
        f.get(k)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .into_iter()
            .collect()
    }

    pub fn config(f: &GgufFile) -> Result<Llama4Config> {
        let hidden_size = required(f, "embedding_length")?;
        let n_layers = required(f, "block_count")?;
        let n_heads = required(f, "attention.head_count")?;
        let n_experts = required(f, "expert_count")?;
        let head_dim = match optional(f, "rope.dimension_count")? {
            Some(d) => d,
            None => optional(f, "attention.key_length")?.unwrap_or(hidden_size / n_heads.max(1)),
        };
        let vocab_size = match f.tensor_info("token_embd.weight") {
            Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
            _ => {
                return Err(Error::MissingTensor {
                    name: "token_embd.weight".into(),
                });
            }
        };
        let step = required(f, "interleave_moe_layer_step")?;
        let chunking = optional(f, "attention.sliding_window")? != Some(0);
        let (use_rope, layer_types): (Vec<bool>, Vec<AttentionKind>) = if chunking {
            let chunked: Vec<bool> = match key(f, "attention.sliding_window_pattern") {
                Some(Value::Array(_, items)) => {
                    items.iter().map(|v| v.as_bool().unwrap_or(false)).collect()
                }
                Some(v) => {
                    let p = v.as_u64().filter(|&p| p > 0).ok_or_else(|| {
                        Error::Config(
                            "llama4.attention.sliding_window_pattern must be positive".into(),
                        )
                    })? as usize;
                    (0..n_layers).map(|i| (i + 1) % p != 0).collect()
                }
                None => (0..n_layers).map(|i| (i + 1) % 4 != 0).collect(),
            };
            let kinds = chunked
                .iter()
                .map(|&c| {
                    if c {
                        AttentionKind::Chunked
                    } else {
                        AttentionKind::Full
                    }
                })
                .collect();
            ((0..n_layers).map(|i| (i + 1) % 4 != 0).collect(), kinds)
        } else {
            // llama.cpp sets the NoPE step to the layer count: only the last layer skips RoPE.
            (
                (0..n_layers).map(|i| (i + 1) % n_layers != 0).collect(),
                vec![AttentionKind::Full; n_layers],
            )
        };
        let config = Llama4Config {
            vocab_size,
            hidden_size,
            num_hidden_layers: n_layers,
            num_attention_heads: n_heads,
            num_key_value_heads: optional(f, "attention.head_count_kv")?.unwrap_or(n_heads),
            head_dim,
            intermediate_size: required(f, "expert_feed_forward_length")?,
            intermediate_size_mlp: optional(f, "feed_forward_length")?.unwrap_or(0),
            num_local_experts: n_experts,
            num_experts_per_tok: required(f, "expert_used_count")?,
            moe_layers: if step == 0 {
                Vec::new()
            } else {
                (step - 1..n_layers).step_by(step).collect()
            },
            rms_norm_eps: float(f, "attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_theta: float(f, "rope.freq_base", 10000.0)?,
            // llama3 scaling arrives as the rope_freqs tensor, applied by the model.
            rope_scaling: None,
            max_position_embeddings: optional(f, "context_length")?.unwrap_or(8192),
            attention_chunk_size: chunking.then_some(8192),
            use_rope,
            layer_types,
            use_qk_norm: n_experts != 128,
            attn_temperature_tuning: chunking,
            floor_scale: 8192.0,
            attn_scale: 0.1,
            tie_word_embeddings: f.tensor_info("output.weight").is_none(),
            bos_token_id: token_id(f, "tokenizer.ggml.bos_token_id"),
            eos_token_id: token_id(f, "tokenizer.ggml.eos_token_id"),
        };
        config.validate()?;
        Ok(config)
    }
}
