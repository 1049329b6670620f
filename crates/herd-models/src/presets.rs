//! Built-in model shapes: the released configs of the catalog's models (for planning and
//! random-weight benchmarks without a download) and the benchmark shape `llama4:scout-4b`.

/// A named config, as the model's `config.json` (text part) would give it.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    pub alias: &'static str,
    /// `llama4` or `gemma3`.
    pub family: &'static str,
    pub description: &'static str,
    pub config_json: &'static str,
}

/// Llama 4 Scout 17B-16E (reference note llama4 §a.1).
const SCOUT: &str = r#"{"model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120,
  "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
  "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_local_experts": 16,
  "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "max_position_embeddings": 10485760,
  "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 16.0,
  "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
  "attention_chunk_size": 8192, "use_qk_norm": true}"#;

/// Llama 4 Maverick 17B-128E (reference note llama4 §a.1).
const MAVERICK: &str = r#"{"model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120,
  "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
  "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_local_experts": 128,
  "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "max_position_embeddings": 1048576,
  "rope_theta": 500000.0, "attention_chunk_size": 8192, "use_qk_norm": false}"#;

/// Scout's architecture scaled to fit a small machine (4.15B total, 0.87B active per token):
/// hidden 2048, 16 layers, 16 / 8 heads of 128, 16 experts top-1 plus the shared expert, expert
/// width 2048, every layer MoE, vocab 128256; Scout's RoPE, chunking, NoPE and QK-norm pattern.
/// The benchmark shape of docs/performance.md: keep it fixed so numbers stay comparable.
const SCOUT_4B: &str = r#"{"model_type": "llama4_text", "vocab_size": 128256, "hidden_size": 2048,
  "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
  "intermediate_size": 2048, "intermediate_size_mlp": 4096, "num_local_experts": 16,
  "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "max_position_embeddings": 10485760,
  "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 16.0,
  "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
  "attention_chunk_size": 8192, "use_qk_norm": true}"#;

/// Gemma 3 270M's text config (the default model; reference note gemma3 §a.1).
const GEMMA3_270M: &str = r#"{"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
  "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
  "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512, "rope_theta": 1000000.0,
  "rope_local_base_freq": 10000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6}"#;

pub const PRESETS: &[Preset] = &[
    Preset {
        alias: "llama4:scout",
        family: "llama4",
        description: "Llama 4 Scout 17B-16E (109B total)",
        config_json: SCOUT,
    },
    Preset {
        alias: "llama4:maverick",
        family: "llama4",
        description: "Llama 4 Maverick 17B-128E (400B total)",
        config_json: MAVERICK,
    },
    Preset {
        alias: "llama4:scout-4b",
        family: "llama4",
        description: "Scout's shape scaled to 4.15B (benchmarks)",
        config_json: SCOUT_4B,
    },
    Preset {
        alias: "gemma3:270m",
        family: "gemma3",
        description: "Gemma 3 270M (the default model)",
        config_json: GEMMA3_270M,
    },
];

/// The preset called `alias`.
pub fn preset(alias: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.alias == alias)
}

impl Preset {
    pub fn config(&self) -> serde_json::Value {
        serde_json::from_str(self.config_json).expect("built-in config is valid JSON")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama4::Llama4Config;

    #[test]
    fn every_preset_parses() {
        for p in PRESETS {
            match p.family {
                "llama4" => drop(Llama4Config::from_json(&p.config()).unwrap()),
                "gemma3" => drop(crate::gemma3::Gemma3Config::from_json(&p.config()).unwrap()),
                other => panic!("{other}"),
            }
        }
    }
}
