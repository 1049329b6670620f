//! Llama 4 text decoder (Scout, Maverick), as in `shared/reference/llama4.md` §b:
//!
//! ```text
//! h = embed[ids]
//! for each layer:  h += attention(rms_norm(h))          (RoPE+chunked, or NoPE+temperature)
//!                  h += moe_or_mlp(rms_norm(h))          (sigmoid top-k router scales the input)
//! logits = lm_head(rms_norm(h))
//! ```

pub mod config;
pub mod export;
pub mod random;

pub use config::{AttentionKind, Llama4Config};

use std::sync::Mutex;

use herd_formats::HfModelDir;
use herd_formats::gguf::GgufFile;
use herd_kernels::ops::{rms_norm_unweighted, rope_interleaved};

use crate::attention::{Heads, attend, begin_step, cache_rows, logit_rows};
use crate::moe::{Expert, Mlp, MlpWork, Moe, MoeWork, Routing};
use crate::rows::{add_into, norm_in_place, norm_into};
use herd_formats::quantize::ModelShape;

use crate::weights::{
    GgufLoader, LoadQuantization, Matrix, WeightLoader, hf_prefixes, matmul_same_input,
};
use crate::{Batch, CausalLm, KvCache, LoadOptions, Result, Window};

#[derive(Debug)]
enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug)]
struct Layer {
    input_norm: Vec<f32>,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    o: Matrix,
    post_attention_norm: Vec<f32>,
    ffn: FeedForward,
    use_rope: bool,
    /// Weightless RMS norm of q and k after RoPE (RoPE layers with use_qk_norm only).
    qk_norm: bool,
    kind: AttentionKind,
}

#[derive(Debug)]
pub struct Llama4 {
    pub config: Llama4Config,
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Matrix,
    inv_freq: Vec<f32>,
    /// Buffers of one forward pass, kept for the next so a decode step allocates nothing.
    work: Mutex<Workspace>,
}

/// The activations of one forward pass (see [`Llama4::forward_into`]).
#[derive(Debug, Default)]
struct Workspace {
    hidden: Vec<f32>,
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    out: Vec<f32>,
    mlp: MlpWork,
    moe: MoeWork,
    rows: Vec<f32>,
}

/// Where Llama 4 weights come from. Names are the HF ones without the decoder prefix
/// (`layers.3.self_attn.q_proj.weight`); each source translates to its own naming and layout.
trait Source {
    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<Matrix>;
    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>>;
    /// The routed experts of MoE layer `layer`.
    fn experts(&self, layer: usize, c: &Llama4Config) -> Result<Vec<Expert>>;
    fn has_lm_head(&self) -> bool;
    /// Per-frequency divisors of the RoPE angles (GGUF `rope_freqs`), if the file carries them.
    fn rope_freq_factors(&self, n: usize) -> Result<Option<Vec<f32>>>;
}

/// A Hugging Face checkpoint: `Llama4ForCausalLM` (`model.…`, `lm_head.weight`) or the
/// multimodal `Llama4ForConditionalGeneration` (`language_model.model.…`).
struct HfSource<'a> {
    decoder: WeightLoader<'a>,
    head: WeightLoader<'a>,
    /// Quantize each matrix as it loads (`--quantize`).
    quantize: Option<LoadQuantization>,
}

impl<'a> HfSource<'a> {
    fn new(dir: &'a HfModelDir, c: &Llama4Config, options: &LoadOptions) -> Result<Self> {
        let (decoder, head) = hf_prefixes(&dir.tensors)?;
        let head = WeightLoader::new(&dir.tensors, head);
        let shape = model_shape(c, head.has("lm_head.weight"));
        Ok(Self {
            decoder: WeightLoader::new(&dir.tensors, decoder),
            head,
            quantize: options.quantization(shape, dir.tensors.total_bytes()),
        })
    }
}

/// What the quantization type rules need to know about a Llama 4 model.
fn model_shape(c: &Llama4Config, has_lm_head: bool) -> ModelShape {
    ModelShape {
        n_layers: c.num_hidden_layers,
        n_experts: c.num_local_experts,
        n_attn_v: c.num_hidden_layers,
        tied_embeddings: c.tie_word_embeddings && !has_lm_head,
        n_gqa: c.num_attention_heads / c.num_key_value_heads.max(1),
        imatrix: false,
    }
}

/// `m` quantized for the CPU kernels as the tensor `gguf_name` when quantizing at load, else `m`.
/// The token embedding stays in row order for lookups (a tied head is repacked from it).
fn quantized(q: &Option<LoadQuantization>, m: Matrix, gguf_name: &str) -> Result<Matrix> {
    let Some(q) = q else { return Ok(m) };
    let m = q.apply(m, gguf_name)?;
    Ok(if gguf_name == "token_embd.weight" {
        m
    } else {
        m.repacked_for_cpu()
    })
}

impl Source for HfSource<'_> {
    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<Matrix> {
        let loader = if name == "lm_head.weight" {
            &self.head
        } else {
            &self.decoder
        };
        let m = loader.linear(name, out_features, in_features)?;
        quantized(&self.quantize, m, &GgufSource::gguf_name(name))
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        self.decoder.vector(name, n)
    }

    fn experts(&self, layer: usize, c: &Llama4Config) -> Result<Vec<Expert>> {
        let (e, h, inter) = (c.num_local_experts, c.hidden_size, c.intermediate_size);
        let f = format!("layers.{layer}.feed_forward.experts");
        let gate_up =
            self.decoder
                .stacked_in_major(&format!("{f}.gate_up_proj"), e, h, 2 * inter)?;
        let down = self
            .decoder
            .stacked_in_major(&format!("{f}.down_proj"), e, inter, h)?;
        // Quantized, a fused gate-up matrix gets the type of GGUF's gate and up expert tensors.
        let (gate_up_name, down_name) = (
            format!("blk.{layer}.ffn_gate_exps.weight"),
            format!("blk.{layer}.ffn_down_exps.weight"),
        );
        gate_up
            .into_iter()
            .zip(down)
            .map(|(gate_up, down)| {
                Ok(Expert::Fused {
                    gate_up: quantized(&self.quantize, gate_up, &gate_up_name)?,
                    down: quantized(&self.quantize, down, &down_name)?,
                })
            })
            .collect()
    }

    fn has_lm_head(&self) -> bool {
        self.head.has("lm_head.weight")
    }

    fn rope_freq_factors(&self, _n: usize) -> Result<Option<Vec<f32>>> {
        Ok(None)
    }
}

/// A GGUF file with llama.cpp's `llama4` tensor names (reference note §c.2).
struct GgufSource<'a> {
    file: GgufLoader<'a>,
    /// Requantize each matrix as it loads (`--quantize`).
    quantize: Option<LoadQuantization>,
}

impl GgufSource<'_> {
    /// The GGUF name of an HF-style weight name.
    fn gguf_name(name: &str) -> String {
        let Some(rest) = name.strip_prefix("layers.") else {
            return match name {
                "embed_tokens.weight" => "token_embd.weight",
                "norm.weight" => "output_norm.weight",
                "lm_head.weight" => "output.weight",
                other => other,
            }
            .to_string();
        };
        let (layer, part) = rest.split_once('.').unwrap_or((rest, ""));
        let part = match part {
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "feed_forward.router.weight" => "ffn_gate_inp.weight",
            "feed_forward.gate_proj.weight" => "ffn_gate.weight",
            "feed_forward.up_proj.weight" => "ffn_up.weight",
            "feed_forward.down_proj.weight" => "ffn_down.weight",
            "feed_forward.shared_expert.gate_proj.weight" => "ffn_gate_shexp.weight",
            "feed_forward.shared_expert.up_proj.weight" => "ffn_up_shexp.weight",
            "feed_forward.shared_expert.down_proj.weight" => "ffn_down_shexp.weight",
            other => other,
        };
        format!("blk.{layer}.{part}")
    }
}

impl Source for GgufSource<'_> {
    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<Matrix> {
        let gguf = Self::gguf_name(name);
        if name == "embed_tokens.weight" {
            // Row lookups only (a tied output head is repacked from it below).
            let m = self.file.embedding(&gguf, out_features, in_features)?;
            return quantized(&self.quantize, m, &gguf);
        }
        if self.quantize.is_some() {
            let m = self.file.embedding(&gguf, out_features, in_features)?;
            return quantized(&self.quantize, m, &gguf);
        }
        self.file.linear(&gguf, out_features, in_features)
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        self.file.vector(&Self::gguf_name(name), n)
    }

    fn experts(&self, layer: usize, c: &Llama4Config) -> Result<Vec<Expert>> {
        let (e, h, inter) = (c.num_local_experts, c.hidden_size, c.intermediate_size);
        let stack = |part: &str, out: usize, inp: usize| -> Result<Vec<Matrix>> {
            let name = format!("blk.{layer}.{part}.weight");
            if self.quantize.is_none() {
                return self.file.stacked(&name, e, out, inp);
            }
            self.file
                .stacked_as_stored(&name, e, out, inp)?
                .into_iter()
                .map(|m| quantized(&self.quantize, m, &name))
                .collect()
        };
        let gate = stack("ffn_gate_exps", inter, h)?;
        let up = stack("ffn_up_exps", inter, h)?;
        let down = stack("ffn_down_exps", h, inter)?;
        Ok(gate
            .into_iter()
            .zip(up)
            .zip(down)
            .map(|((gate, up), down)| Expert::Split(Mlp { gate, up, down }))
            .collect())
    }

    fn has_lm_head(&self) -> bool {
        self.file.has("output.weight")
    }

    fn rope_freq_factors(&self, n: usize) -> Result<Option<Vec<f32>>> {
        if !self.file.has("rope_freqs.weight") {
            return Ok(None);
        }
        self.file.vector("rope_freqs.weight", n).map(Some)
    }
}

impl Llama4 {
    /// Load from a Hugging Face directory.
    pub fn from_hf(dir: &HfModelDir) -> Result<Self> {
        Self::from_hf_with(dir, &LoadOptions::default())
    }

    /// [`Llama4::from_hf`] with options (quantization at load).
    pub fn from_hf_with(dir: &HfModelDir, options: &LoadOptions) -> Result<Self> {
        let config = Llama4Config::from_json(&dir.config)?;
        let source = HfSource::new(dir, &config, options)?;
        Self::build(config, &source)
    }

    /// Load from a GGUF file (`general.architecture = llama4`), weights in place in the map.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        Self::from_gguf_with(file, &LoadOptions::default(), 0)
    }

    /// [`Llama4::from_gguf`] with options (requantization at load; `total_bytes`: the file's
    /// tensor bytes, for progress).
    pub fn from_gguf_with(
        file: &GgufFile,
        options: &LoadOptions,
        total_bytes: u64,
    ) -> Result<Self> {
        let config = config::gguf::config(file)?;
        let file = GgufLoader { file };
        let shape = model_shape(&config, file.has("output.weight"));
        let source = GgufSource {
            file,
            quantize: options.quantization(shape, total_bytes),
        };
        Self::build(config, &source)
    }

    fn build(config: Llama4Config, w: &dyn Source) -> Result<Self> {
        let c = &config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let mlp = |p: &str, width: usize| -> Result<Mlp> {
            Ok(Mlp {
                gate: w.linear(&format!("{p}.gate_proj.weight"), width, h)?,
                up: w.linear(&format!("{p}.up_proj.weight"), width, h)?,
                down: w.linear(&format!("{p}.down_proj.weight"), h, width)?,
            })
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("layers.{i}");
            let ffn = if c.is_moe_layer(i) {
                FeedForward::Moe(Moe {
                    router: w.linear(
                        &format!("{p}.feed_forward.router.weight"),
                        c.num_local_experts,
                        h,
                    )?,
                    experts: w.experts(i, c)?,
                    shared: Some(mlp(
                        &format!("{p}.feed_forward.shared_expert"),
                        c.intermediate_size,
                    )?),
                    routing: Routing::SigmoidScalesInput,
                    top_k: c.num_experts_per_tok,
                })
            } else {
                FeedForward::Dense(mlp(&format!("{p}.feed_forward"), c.intermediate_size_mlp)?)
            };
            layers.push(Layer {
                input_norm: w.vector(&format!("{p}.input_layernorm.weight"), h)?,
                q: w.linear(
                    &format!("{p}.self_attn.q_proj.weight"),
                    c.num_attention_heads * d,
                    h,
                )?,
                k: w.linear(
                    &format!("{p}.self_attn.k_proj.weight"),
                    c.num_key_value_heads * d,
                    h,
                )?,
                v: w.linear(
                    &format!("{p}.self_attn.v_proj.weight"),
                    c.num_key_value_heads * d,
                    h,
                )?,
                o: w.linear(
                    &format!("{p}.self_attn.o_proj.weight"),
                    h,
                    c.num_attention_heads * d,
                )?,
                post_attention_norm: w
                    .vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                ffn,
                use_rope: c.use_rope[i],
                qk_norm: c.use_qk_norm && c.use_rope[i],
                kind: c.layer_types[i],
            });
        }
        let embed = w.linear("embed_tokens.weight", c.vocab_size, h)?;
        let lm_head = if c.tie_word_embeddings && !w.has_lm_head() {
            embed.clone().repacked_for_cpu()
        } else {
            w.linear("lm_head.weight", c.vocab_size, h)?
        };
        let norm = w.vector("norm.weight", h)?;
        let mut inv_freq = config.rope_inv_freq();
        if let Some(factors) = w.rope_freq_factors(d / 2)? {
            inv_freq.iter_mut().zip(&factors).for_each(|(f, k)| *f /= k);
        }
        tracing::info!(
            layers = c.num_hidden_layers,
            experts = c.num_local_experts,
            moe_layers = c.moe_layers.len(),
            weights = %embed.dtype(),
            "loaded llama4"
        );
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            work: Mutex::new(Workspace::default()),
        })
    }

    /// Keys a query sees: causal, and on chunked layers only its own position-aligned chunk.
    fn window(&self, layer: &Layer) -> Window {
        match (layer.kind, self.config.attention_chunk_size) {
            (AttentionKind::Chunked, Some(chunk)) => Window::Chunked(chunk),
            _ => Window::Full,
        }
    }

    fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// Self-attention of layer `li` for the normed activations `w.x` `[T, hidden]` (§b.1), into
    /// `w.out`.
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
        // Per row: RoPE, the QK norm, and on the layers without RoPE the queries' temperature.
        let pool = herd_kernels::pool::global();
        let positions = &batch.positions;
        let (q_len, k_len) = (batch.len() * nh * d, batch.len() * nkv * d);
        for (x, width, queries) in [
            (&mut w.q[..q_len], nh * d, true),
            (&mut w.k[..k_len], nkv * d, false),
        ] {
            pool.for_row_runs(x, width, |first, rows| {
                for (xr, &pos) in rows.chunks_exact_mut(width).zip(&positions[first..]) {
                    if layer.use_rope {
                        rope_interleaved(xr, d, pos, &self.inv_freq);
                    }
                    if layer.qk_norm {
                        rms_norm_unweighted(xr, d, self.eps());
                    }
                    if queries && !layer.use_rope && c.attn_temperature_tuning {
                        let s = c.attn_temperature(pos);
                        xr.iter_mut().for_each(|v| *v *= s);
                    }
                }
            });
        }
        cache_rows(&w.k, &w.v, batch, cache, li, nkv * d);
        let scale = 1.0 / (d as f32).sqrt();
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

impl CausalLm for Llama4 {
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
        w.hidden.clear();
        w.hidden.resize(t * h, 0.0);
        for (row, &tok) in w.hidden.chunks_exact_mut(h).zip(&batch.tokens) {
            self.embed.as_ref().decode_row(tok as usize, row);
        }
        let mut record = |state: &[f32]| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push(state.to_vec());
            }
        };
        record(&w.hidden);
        for (li, layer) in self.layers.iter().enumerate() {
            norm_into(&w.hidden, &mut w.x, &layer.input_norm, self.eps());
            self.attention(li, layer, w, batch, cache);
            add_into(&mut w.hidden, &w.out, h);

            norm_into(&w.hidden, &mut w.x, &layer.post_attention_norm, self.eps());
            match &layer.ffn {
                FeedForward::Dense(mlp) => mlp.forward(&w.x, t, &mut w.mlp, &mut w.out),
                // §b.3: the top-k experts by raw router logit, each chosen expert's input scaled
                // by sigmoid(logit), plus the shared expert.
                FeedForward::Moe(moe) => moe.forward(&w.x, t, &mut w.moe, &mut w.out),
            };
            add_into(&mut w.hidden, &w.out, h);
            record(&w.hidden);
        }
        norm_in_place(&mut w.hidden, &self.norm, self.eps());
        record(&w.hidden);

        logit_rows(&w.hidden, batch, h, &mut w.rows);
        self.lm_head
            .matmul_into(&w.rows, batch.n_logit_rows(), logits);
        Ok(())
    }
}
