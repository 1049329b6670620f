//! What a model is made of: its tensors (GGUF names, ggml dims, types), either read from a GGUF
//! header or derived from a config for a chosen file type with llama-quantize's rules, and the
//! facts per token (which parts every token reads, which experts).

use herd_formats::GgufFile;
use herd_formats::quantize::{FileType, ModelShape, choose_types};
use herd_kernels::DType;
use herd_models::llama4::{AttentionKind, Llama4Config};
use serde::Serialize;

/// The parts a report splits parameters and bytes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    Embeddings,
    Attention,
    SharedExperts,
    RoutedExperts,
    Router,
    DenseFfn,
    Output,
    Norms,
}

impl Part {
    pub const ALL: [Part; 8] = [
        Part::Embeddings,
        Part::Attention,
        Part::SharedExperts,
        Part::RoutedExperts,
        Part::Router,
        Part::DenseFfn,
        Part::Output,
        Part::Norms,
    ];

    pub fn of(name: &str) -> Part {
        if name == "token_embd.weight" {
            Part::Embeddings
        } else if name == "output.weight" {
            Part::Output
        } else if name.contains("_exps") {
            Part::RoutedExperts
        } else if name.contains("_shexp") {
            Part::SharedExperts
        } else if name.contains("ffn_gate_inp") {
            Part::Router
        } else if name.contains("norm") || name.starts_with("rope_freqs") {
            Part::Norms
        } else if name.contains("attn_") {
            Part::Attention
        } else {
            Part::DenseFfn
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Part::Embeddings => "embeddings",
            Part::Attention => "attention",
            Part::SharedExperts => "shared experts",
            Part::RoutedExperts => "routed experts",
            Part::Router => "routers",
            Part::DenseFfn => "dense FFN",
            Part::Output => "output",
            Part::Norms => "norms",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: DType,
}

impl Tensor {
    pub fn params(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn bytes(&self) -> u64 {
        self.dtype
            .checked_bytes_for(self.params())
            .unwrap_or(u64::MAX)
    }
}

/// Types for a derived tensor list, as llama-quantize picks them for `ft` (tensors the rules
/// never quantize are written as f32 by the converter).
///
/// IQ file types are predicted as made with an importance matrix, as the files people publish
/// are (llama-quantize requires one for the 1- and 2-bit types).
fn with_types(list: Vec<(String, Vec<u64>)>, shape: &ModelShape, ft: FileType) -> Vec<Tensor> {
    let shape = ModelShape {
        imatrix: ft.made_with_imatrix(),
        ..*shape
    };
    let types = choose_types(
        ft,
        &shape,
        list.iter()
            .map(|(n, d)| (n.as_str(), d.as_slice(), DType::F32)),
    );
    list.into_iter()
        .zip(types)
        .map(|((name, dims), dtype)| Tensor { name, dims, dtype })
        .collect()
}

/// A model as the planner sees it.
#[derive(Clone, Debug)]
pub struct ModelFacts {
    pub name: String,
    pub tensors: Vec<Tensor>,
    pub n_layers: usize,
    pub n_experts: usize,
    pub n_experts_used: usize,
    pub vocab: usize,
    pub hidden: usize,
    pub head_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Per layer: does its cache keep only the current chunk (Llama 4 RoPE layers)?
    pub chunked: Vec<bool>,
    pub chunk: Option<usize>,
    pub max_context: usize,
}

impl ModelFacts {
    /// From a Llama 4 config, with tensor types chosen for `ft` as llama-quantize (or the HF
    /// converter for float types) would.
    pub fn from_llama4(name: &str, c: &Llama4Config, ft: FileType) -> Self {
        let list = herd_models::llama4::export::gguf_tensor_table(c);
        let shape = herd_models::llama4::export::gguf_model_shape(c);
        let tensors = with_types(list, &shape, ft);
        Self {
            name: name.to_string(),
            tensors,
            n_layers: c.num_hidden_layers,
            n_experts: c.num_local_experts,
            n_experts_used: c.num_experts_per_tok,
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            head_dim: c.head_dim,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            chunked: c
                .layer_types
                .iter()
                .map(|k| *k == AttentionKind::Chunked)
                .collect(),
            chunk: c.attention_chunk_size,
            max_context: c.max_position_embeddings,
        }
    }

    /// From a Gemma 3 config, with tensor types for `ft` as llama-quantize picks them (the
    /// embedding doubles as the output head, so it takes the output's type).
    pub fn from_gemma3(name: &str, c: &herd_models::gemma3::Gemma3Config, ft: FileType) -> Self {
        let (h, d, v, f) = (
            c.hidden_size as u64,
            c.head_dim as u64,
            c.vocab_size as u64,
            c.intermediate_size as u64,
        );
        let (nh, nkv) = (c.num_attention_heads as u64, c.num_key_value_heads as u64);
        let mut list: Vec<(String, Vec<u64>)> = vec![
            ("token_embd.weight".into(), vec![h, v]),
            ("output_norm.weight".into(), vec![h]),
        ];
        for l in 0..c.num_hidden_layers {
            let b = |n: &str| format!("blk.{l}.{n}.weight");
            for (n, dims) in [
                ("attn_norm", vec![h]),
                ("attn_q", vec![h, nh * d]),
                ("attn_k", vec![h, nkv * d]),
                ("attn_v", vec![h, nkv * d]),
                ("attn_output", vec![nh * d, h]),
                ("attn_q_norm", vec![d]),
                ("attn_k_norm", vec![d]),
                ("post_attention_norm", vec![h]),
                ("ffn_norm", vec![h]),
                ("ffn_gate", vec![h, f]),
                ("ffn_up", vec![h, f]),
                ("ffn_down", vec![f, h]),
                ("post_ffw_norm", vec![h]),
            ] {
                list.push((b(n), dims));
            }
        }
        let shape = ModelShape {
            n_layers: c.num_hidden_layers,
            n_experts: 0,
            n_attn_v: c.num_hidden_layers,
            tied_embeddings: true,
            n_gqa: c.num_attention_heads / c.num_key_value_heads.max(1),
            imatrix: false,
        };
        let tensors = with_types(list, &shape, ft);
        Self {
            name: name.to_string(),
            tensors,
            n_layers: c.num_hidden_layers,
            n_experts: 0,
            n_experts_used: 0,
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            head_dim: c.head_dim,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            // Sliding layers keep at most one window, like chunked layers keep one chunk.
            chunked: c.sliding.clone(),
            chunk: Some(c.sliding_window),
            max_context: c.max_position_embeddings,
        }
    }

    /// From a GGUF file: the exact tensor table, and the architecture's keys.
    pub fn from_gguf(name: &str, f: &GgufFile) -> crate::Result<Self> {
        let arch = f.architecture().unwrap_or_default().to_string();
        let key = |k: &str| f.arch_usize(k);
        let need = |k: &str| {
            key(k).ok_or_else(|| crate::Error::Model(format!("GGUF key {arch}.{k} is missing")))
        };
        let tensors: Vec<Tensor> = f
            .tensors()
            .iter()
            .map(|t| Tensor {
                name: t.name.clone(),
                dims: t.dims.clone(),
                dtype: t.dtype,
            })
            .collect();
        let (n_layers, hidden, n_heads) = (
            need("block_count")?,
            need("embedding_length")?,
            need("attention.head_count")?,
        );
        let vocab = f
            .tensor_info("token_embd.weight")
            .map_or(0, |t| t.dims.get(1).copied().unwrap_or(0) as usize);
        let (chunked, chunk) = if arch == "llama4" {
            let c = herd_models::llama4::config::gguf::config(f)
                .map_err(|e| crate::Error::Model(e.to_string()))?;
            (
                c.layer_types
                    .iter()
                    .map(|k| *k == AttentionKind::Chunked)
                    .collect(),
                c.attention_chunk_size,
            )
        } else {
            (vec![false; n_layers], None)
        };
        Ok(Self {
            name: name.to_string(),
            tensors,
            n_layers,
            n_experts: key("expert_count").unwrap_or(0),
            n_experts_used: key("expert_used_count").unwrap_or(0),
            vocab,
            hidden,
            head_dim: key("attention.key_length")
                .or(key("rope.dimension_count"))
                .unwrap_or(hidden / n_heads.max(1)),
            n_heads,
            n_kv_heads: key("attention.head_count_kv").unwrap_or(n_heads),
            chunked,
            chunk,
            max_context: key("context_length").unwrap_or(0),
        })
    }

    /// Fraction of a part's weights one token uses.
    pub fn active_fraction(&self, part: Part) -> f64 {
        match part {
            Part::RoutedExperts if self.n_experts > 0 => {
                self.n_experts_used as f64 / self.n_experts as f64
            }
            _ => 1.0,
        }
    }

    /// Fraction of a part's bytes one decoded token reads: the routed experts it picks, one
    /// embedding row, everything else whole.
    pub fn read_fraction(&self, part: Part) -> f64 {
        match part {
            Part::Embeddings if self.vocab > 0 => 1.0 / self.vocab as f64,
            other => self.active_fraction(other),
        }
    }

    /// KV-cache bytes per token per layer (K and V) for elements of `elem_bytes`.
    pub fn kv_bytes_per_token_layer(&self, elem_bytes: f64) -> f64 {
        2.0 * (self.n_kv_heads * self.head_dim) as f64 * elem_bytes
    }

    /// KV bytes held for one sequence of `ctx` tokens: naive (every layer keeps everything) and
    /// chunk-aware (chunked layers keep at most one chunk).
    pub fn kv_bytes(&self, ctx: usize, elem_bytes: f64) -> (f64, f64) {
        let per = self.kv_bytes_per_token_layer(elem_bytes);
        let naive = per * (ctx * self.n_layers) as f64;
        let aware: f64 = self
            .chunked
            .iter()
            .map(|&c| {
                per * if c {
                    ctx.min(self.chunk.unwrap_or(ctx))
                } else {
                    ctx
                } as f64
            })
            .sum();
        (naive, aware)
    }
}
