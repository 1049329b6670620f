//! Gemma 3 text decoder (270M … 27B), as in `shared/reference/gemma3.md` §b:
//!
//! ```text
//! h = embed[ids] · sqrt(hidden)
//! for each layer:  h += post_attn_norm(attention(in_norm(h)))    (q/k norms, NeoX RoPE; sliding
//!                                                                  window and local base on sliding layers)
//!                  h += post_ffn_norm(down(gelu_tanh(gate(x)) ⊙ up(x))),  x = pre_ffn_norm(h)
//! logits = norm(h) · embedᵀ                                       (tied)
//! ```
//! RMS norms scale by `(1 + w)` with HF weights; GGUF files store `1 + w` already.

pub mod config;

pub use config::Gemma3Config;

use std::sync::Mutex;

use herd_formats::HfModelDir;
use herd_formats::gguf::GgufFile;
use herd_kernels::ops::{Rope, gelu_tanh, gelu_tanh_f16_table, rms_norm, softcap};

use crate::attention::{Heads, attend, begin_step, cache_rows, logit_rows};
use crate::rows::{add_into, gate_mul_into, norm_in_place, norm_into};
use herd_formats::quantize::ModelShape;

use crate::weights::{
    GgufLoader, LoadQuantization, Matrix, WeightLoader, hf_prefixes, matmul_same_input,
};
use crate::{Batch, CausalLm, KvCache, LoadOptions, Result, Window};

#[derive(Debug)]
struct Layer {
    input_norm: Vec<f32>,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    o: Matrix,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    pre_ffn_norm: Vec<f32>,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
    post_ffn_norm: Vec<f32>,
    sliding: bool,
}

#[derive(Debug)]
pub struct Gemma3 {
    pub config: Gemma3Config,
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    rope_local: Rope,
    rope_global: Rope,
    /// GELU as ggml evaluates it (GGUF files: llama.cpp's numbers), or exactly (HF checkpoints).
    gelu: fn(f32) -> f32,
    /// Buffers of one forward pass, kept for the next so a decode step allocates nothing.
    work: Mutex<Workspace>,
}

/// The activations of one forward pass (see [`Gemma3::forward_into`]).
#[derive(Debug, Default)]
struct Workspace {
    hidden: Vec<f32>,
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    out: Vec<f32>,
    gate: Vec<f32>,
    act: Vec<f32>,
    rows: Vec<f32>,
}

/// Weights by (HF name, GGUF name) within a layer, or whole-model names.
struct Source<'a> {
    files: Files<'a>,
    /// Quantize each matrix as it loads (`--quantize`), typed by its GGUF name.
    quantize: Option<LoadQuantization>,
}

enum Files<'a> {
    Hf(WeightLoader<'a>),
    Gguf(GgufLoader<'a>),
}

impl Source<'_> {
    fn linear(&self, hf: &str, gguf: &str, out: usize, inp: usize) -> Result<Matrix> {
        let Some(q) = &self.quantize else {
            return match &self.files {
                Files::Hf(w) => w.linear(hf, out, inp),
                Files::Gguf(g) => g.linear(gguf, out, inp),
            };
        };
        let stored = match &self.files {
            Files::Hf(w) => w.linear(hf, out, inp)?,
            Files::Gguf(g) => g.embedding(gguf, out, inp)?,
        };
        Ok(q.apply(stored, gguf)?.repacked_for_cpu())
    }

    /// A norm's effective gain: HF stores the offset from 1, GGUF the gain itself.
    fn norm(&self, hf: &str, gguf: &str, n: usize) -> Result<Vec<f32>> {
        match &self.files {
            Files::Hf(w) => Ok(w.vector(hf, n)?.into_iter().map(|v| 1.0 + v).collect()),
            Files::Gguf(g) => g.vector(gguf, n),
        }
    }
}

/// What the quantization type rules need to know about a Gemma 3 model (the embedding is the
/// output head).
fn model_shape(c: &Gemma3Config) -> ModelShape {
    ModelShape {
        n_layers: c.num_hidden_layers,
        n_experts: 0,
        n_attn_v: c.num_hidden_layers,
        tied_embeddings: true,
        n_gqa: c.num_attention_heads / c.num_key_value_heads.max(1),
        imatrix: false,
    }
}

impl Gemma3 {
    pub fn from_hf(dir: &HfModelDir) -> Result<Self> {
        Self::from_hf_with(dir, &LoadOptions::default())
    }

    /// [`Gemma3::from_hf`] with options (quantization at load).
    pub fn from_hf_with(dir: &HfModelDir, options: &LoadOptions) -> Result<Self> {
        let config = Gemma3Config::from_json(&dir.config)?;
        let (prefix, _) = hf_prefixes(&dir.tensors)?;
        let rope = [true, false].map(|sliding| Rope::Table(config.inv_freq(sliding)));
        let source = Source {
            files: Files::Hf(WeightLoader::new(&dir.tensors, prefix)),
            quantize: options.quantization(model_shape(&config), dir.tensors.total_bytes()),
        };
        Self::build(config, &source, gelu_tanh, rope)
    }

    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        Self::from_gguf_with(file, &LoadOptions::default(), 0)
    }

    /// [`Gemma3::from_gguf`] with options (requantization at load; `total_bytes`: the file's
    /// tensor bytes, for progress).
    pub fn from_gguf_with(
        file: &GgufFile,
        options: &LoadOptions,
        total_bytes: u64,
    ) -> Result<Self> {
        let config = Gemma3Config::from_gguf(file)?;
        let d = config.head_dim;
        let global_factor = config.rope_linear_factor.unwrap_or(1.0) as f32;
        let rope = [
            Rope::ggml(config.rope_local_base_freq as f32, d, 1.0),
            Rope::ggml(config.rope_theta as f32, d, global_factor),
        ];
        let source = Source {
            files: Files::Gguf(GgufLoader { file }),
            quantize: options.quantization(model_shape(&config), total_bytes),
        };
        Self::build(config, &source, gelu_tanh_f16_table, rope)
    }

    /// `rope`: the angles of sliding layers, then of full layers.
    fn build(
        config: Gemma3Config,
        w: &Source,
        gelu: fn(f32) -> f32,
        rope: [Rope; 2],
    ) -> Result<Self> {
        let c = &config;
        let (h, d, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let hf = |n: &str| format!("layers.{i}.{n}");
            let gg = |n: &str| format!("blk.{i}.{n}");
            layers.push(Layer {
                input_norm: w.norm(&hf("input_layernorm.weight"), &gg("attn_norm.weight"), h)?,
                q: w.linear(&hf("self_attn.q_proj.weight"), &gg("attn_q.weight"), qd, h)?,
                k: w.linear(&hf("self_attn.k_proj.weight"), &gg("attn_k.weight"), kvd, h)?,
                v: w.linear(&hf("self_attn.v_proj.weight"), &gg("attn_v.weight"), kvd, h)?,
                o: w.linear(
                    &hf("self_attn.o_proj.weight"),
                    &gg("attn_output.weight"),
                    h,
                    qd,
                )?,
                q_norm: w.norm(&hf("self_attn.q_norm.weight"), &gg("attn_q_norm.weight"), d)?,
                k_norm: w.norm(&hf("self_attn.k_norm.weight"), &gg("attn_k_norm.weight"), d)?,
                post_attention_norm: w.norm(
                    &hf("post_attention_layernorm.weight"),
                    &gg("post_attention_norm.weight"),
                    h,
                )?,
                pre_ffn_norm: w.norm(
                    &hf("pre_feedforward_layernorm.weight"),
                    &gg("ffn_norm.weight"),
                    h,
                )?,
                gate: w.linear(&hf("mlp.gate_proj.weight"), &gg("ffn_gate.weight"), f, h)?,
                up: w.linear(&hf("mlp.up_proj.weight"), &gg("ffn_up.weight"), f, h)?,
                down: w.linear(&hf("mlp.down_proj.weight"), &gg("ffn_down.weight"), h, f)?,
                post_ffn_norm: w.norm(
                    &hf("post_feedforward_layernorm.weight"),
                    &gg("post_ffw_norm.weight"),
                    h,
                )?,
                sliding: c.sliding[i],
            });
        }
        let embed = w.linear("embed_tokens.weight", "token_embd.weight", c.vocab_size, h)?;
        let norm = w.norm("norm.weight", "output_norm.weight", h)?;
        tracing::info!(layers = c.num_hidden_layers, weights = %embed.dtype(), "loaded gemma3");
        let [rope_local, rope_global] = rope;
        Ok(Self {
            rope_local,
            rope_global,
            config,
            embed,
            layers,
            norm,
            gelu,
            work: Mutex::new(Workspace::default()),
        })
    }

    /// Sliding layers see the last `sliding_window` positions, the query's own included.
    fn window(&self, layer: &Layer) -> Window {
        if layer.sliding {
            Window::Sliding(self.config.sliding_window)
        } else {
            Window::Full
        }
    }

    fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// Self-attention of layer `li` on the normed activations `w.x`, into `w.out`.
    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        w: &mut Workspace,
        batch: &Batch,
        cache: &mut KvCache,
    ) {
        let c = &self.config;
        let d = c.head_dim;
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        matmul_same_input(
            &w.x,
            batch.len(),
            [
                (&layer.q, &mut w.q),
                (&layer.k, &mut w.k),
                (&layer.v, &mut w.v),
            ],
        );
        let rope = if layer.sliding {
            &self.rope_local
        } else {
            &self.rope_global
        };
        // Per row and head: the QK norm, then RoPE.
        let pool = herd_kernels::pool::global();
        let (positions, eps) = (&batch.positions, self.eps());
        let (q_len, k_len) = (batch.len() * nh * d, batch.len() * nkv * d);
        for (x, width, norm) in [
            (&mut w.q[..q_len], nh * d, &layer.q_norm),
            (&mut w.k[..k_len], nkv * d, &layer.k_norm),
        ] {
            pool.for_row_runs(x, width, |first, rows| {
                for (xr, &pos) in rows.chunks_exact_mut(width).zip(&positions[first..]) {
                    rms_norm(xr, norm, eps);
                    rope.apply_neox(xr, d, pos);
                }
            });
        }
        cache_rows(&w.k, &w.v, batch, cache, li, nkv * d);
        let scale = (c.query_pre_attn_scalar as f32).powf(-0.5);
        let heads = Heads {
            q: nh,
            kv: nkv,
            dim: d,
            scale,
        };
        let window = self.window(layer);
        let first_key = |pos| window.first_visible(pos);
        attend(&w.q, batch, cache, li, heads, first_key, &mut w.attn);
        layer.o.matmul_into(&w.attn, batch.len(), &mut w.out);
    }
}

impl CausalLm for Gemma3 {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn num_layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    fn kv_dim(&self) -> usize {
        self.config.num_key_value_heads * self.config.head_dim
    }

    fn layer_windows(&self) -> Vec<Window> {
        self.layers.iter().map(|l| self.window(l)).collect()
    }

    fn head_dim(&self) -> usize {
        self.config.head_dim
    }
    fn max_context(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn forward_into(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        mut trace: Option<&mut Vec<Vec<f32>>>,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let c = &self.config;
        begin_step(batch, cache, c.vocab_size)?;
        let mut guard = self.work.lock().unwrap_or_else(|e| e.into_inner());
        let w = &mut *guard;
        let (t, h) = (batch.len(), c.hidden_size);
        let scale = (h as f32).sqrt();
        w.hidden.clear();
        w.hidden.resize(t * h, 0.0);
        for (row, &tok) in w.hidden.chunks_exact_mut(h).zip(&batch.tokens) {
            self.embed.as_ref().decode_row(tok as usize, row);
            row.iter_mut().for_each(|v| *v *= scale);
        }
        let mut record = |s: &[f32]| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push(s.to_vec());
            }
        };
        record(&w.hidden);
        for (li, layer) in self.layers.iter().enumerate() {
            norm_into(&w.hidden, &mut w.x, &layer.input_norm, self.eps());
            self.attention(li, layer, w, batch, cache);
            norm_in_place(&mut w.out, &layer.post_attention_norm, self.eps());
            add_into(&mut w.hidden, &w.out, h);

            norm_into(&w.hidden, &mut w.x, &layer.pre_ffn_norm, self.eps());
            matmul_same_input(
                &w.x,
                batch.len(),
                [(&layer.gate, &mut w.gate), (&layer.up, &mut w.act)],
            );
            gate_mul_into(&mut w.act, &w.gate, layer.gate.out_features, self.gelu);
            layer.down.matmul_into(&w.act, batch.len(), &mut w.out);
            norm_in_place(&mut w.out, &layer.post_ffn_norm, self.eps());
            add_into(&mut w.hidden, &w.out, h);
            record(&w.hidden);
        }
        norm_in_place(&mut w.hidden, &self.norm, self.eps());
        record(&w.hidden);
        logit_rows(&w.hidden, batch, h, &mut w.rows);
        self.embed
            .matmul_into(&w.rows, batch.n_logit_rows(), logits);
        if let Some(cap) = c.final_logit_softcapping {
            softcap(logits, cap as f32);
        }
        Ok(())
    }
}
