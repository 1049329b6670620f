//! Llama 4 text decoder (Scout, Maverick), as in `shared/reference/llama4.md` §b:
//!
//! ```text
//! h = embed[ids]
//! for each layer:  h += attention(rms_norm(h))          (RoPE+chunked, or NoPE+temperature)
//!                  h += moe_or_mlp(rms_norm(h))          (sigmoid top-k router scales the input)
//! logits = lm_head(rms_norm(h))
//! ```

pub mod config;

pub use config::{AttentionKind, Llama4Config};

use herd_formats::HfModelDir;
use herd_kernels::matmul::{axpy, dot};
use herd_kernels::ops::{rms_norm, rms_norm_unweighted, rope_interleaved, sigmoid, silu, softmax};

use crate::weights::{Matrix, WeightLoader};
use crate::{Batch, CausalLm, Error, KvCache, Result};

/// SwiGLU feed-forward: `down(silu(gate(x)) ⊙ up(x))` (dense layers and the shared expert).
#[derive(Debug)]
struct Mlp {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

/// One routed expert, stored input-major as in HF: `gate_up` `[hidden, 2·I]` (gate first), `down` `[I, hidden]`.
#[derive(Debug)]
struct Expert {
    gate_up: Matrix,
    down: Matrix,
}

#[derive(Debug)]
struct Moe {
    router: Matrix,
    experts: Vec<Expert>,
    shared: Mlp,
}

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
}

/// Where a checkpoint keeps the decoder (`…embed_tokens`, `…layers`) and the output head.
fn find_prefixes(dir: &HfModelDir) -> Result<(&'static str, &'static str)> {
    const LAYOUTS: [(&str, &str); 3] = [
        ("model.", ""),                               // Llama4ForCausalLM
        ("language_model.model.", "language_model."), // Llama4ForConditionalGeneration
        ("model.language_model.", ""),                // transformers 5 multimodal layout
    ];
    LAYOUTS
        .into_iter()
        .find(|(decoder, _)| {
            dir.tensors
                .contains(&format!("{decoder}embed_tokens.weight"))
        })
        .ok_or_else(|| Error::MissingTensor {
            name: "model.embed_tokens.weight (or language_model.model.embed_tokens.weight)".into(),
        })
}

impl Llama4 {
    pub fn from_hf(dir: &HfModelDir) -> Result<Self> {
        let config = Llama4Config::from_json(&dir.config)?;
        let (decoder_prefix, head_prefix) = find_prefixes(dir)?;
        let w = WeightLoader::new(&dir.tensors, decoder_prefix);
        let c = &config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let mlp = |w: &WeightLoader, p: &str, width: usize| -> Result<Mlp> {
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
                let (e, inter) = (c.num_local_experts, c.intermediate_size);
                let f = format!("{p}.feed_forward");
                let gate_up =
                    w.stacked_in_major(&format!("{f}.experts.gate_up_proj"), e, h, 2 * inter)?;
                let down = w.stacked_in_major(&format!("{f}.experts.down_proj"), e, inter, h)?;
                FeedForward::Moe(Moe {
                    router: w.linear(&format!("{f}.router.weight"), e, h)?,
                    experts: gate_up
                        .into_iter()
                        .zip(down)
                        .map(|(gate_up, down)| Expert { gate_up, down })
                        .collect(),
                    shared: mlp(&w, &format!("{f}.shared_expert"), inter)?,
                })
            } else {
                FeedForward::Dense(mlp(
                    &w,
                    &format!("{p}.feed_forward"),
                    c.intermediate_size_mlp,
                )?)
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
        let head = WeightLoader::new(&dir.tensors, head_prefix);
        let lm_head = if c.tie_word_embeddings && !head.has("lm_head.weight") {
            embed.clone()
        } else {
            head.linear("lm_head.weight", c.vocab_size, h)?
        };
        let norm = w.vector("norm.weight", h)?;
        let inv_freq = config.rope_inv_freq();
        tracing::info!(
            layers = c.num_hidden_layers,
            experts = c.num_local_experts,
            moe_layers = c.moe_layers.len(),
            "loaded llama4"
        );
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// Self-attention of layer `li` for the normed activations `x` `[T, hidden]` (§b.1).
    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        x: &[f32],
        batch: &Batch,
        cache: &mut KvCache,
    ) -> Vec<f32> {
        let c = &self.config;
        let (t, d) = (batch.len(), c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let mut q = layer.q.matmul(x, t);
        let mut k = layer.k.matmul(x, t);
        let v = layer.v.matmul(x, t);
        for (row, &pos) in batch.positions.iter().enumerate() {
            let qr = &mut q[row * nh * d..(row + 1) * nh * d];
            let kr = &mut k[row * nkv * d..(row + 1) * nkv * d];
            if layer.use_rope {
                rope_interleaved(qr, d, pos, &self.inv_freq);
                rope_interleaved(kr, d, pos, &self.inv_freq);
            }
            if layer.qk_norm {
                rms_norm_unweighted(qr, d, self.eps());
                rms_norm_unweighted(kr, d, self.eps());
            }
            if !layer.use_rope && c.attn_temperature_tuning {
                let s = c.attn_temperature(pos);
                qr.iter_mut().for_each(|v| *v *= s);
            }
        }
        for (row, &seq) in batch.seq_ids.iter().enumerate() {
            let r = row * nkv * d..(row + 1) * nkv * d;
            cache.append(seq, li, &k[r.clone()], &v[r]);
        }

        let scale = 1.0 / (d as f32).sqrt();
        let group = nh / nkv;
        let mut out = vec![0.0f32; t * nh * d];
        let mut scores = Vec::new();
        for (row, (&seq, &pos)) in batch.seq_ids.iter().zip(&batch.positions).enumerate() {
            // Keys a query sees: causal, and on chunked layers only its own position-aligned chunk.
            let start = match (layer.kind, c.attention_chunk_size) {
                (AttentionKind::Chunked, Some(chunk)) => pos / chunk * chunk,
                _ => 0,
            };
            let (keys, values) = cache.range(seq, li, start, pos);
            let n_keys = pos - start + 1;
            for head in 0..nh {
                let kvh = head / group;
                let qh = &q[(row * nh + head) * d..(row * nh + head + 1) * d];
                scores.clear();
                scores.extend(
                    (0..n_keys).map(|j| {
                        dot(qh, &keys[(j * nkv + kvh) * d..(j * nkv + kvh + 1) * d]) * scale
                    }),
                );
                softmax(&mut scores);
                let oh = &mut out[(row * nh + head) * d..(row * nh + head + 1) * d];
                for (j, &p) in scores.iter().enumerate() {
                    axpy(p, &values[(j * nkv + kvh) * d..(j * nkv + kvh + 1) * d], oh);
                }
            }
        }
        layer.o.matmul(&out, t)
    }

    /// SwiGLU MLP on `n` rows.
    fn mlp(mlp: &Mlp, x: &[f32], n: usize) -> Vec<f32> {
        let gate = mlp.gate.matmul(x, n);
        let mut act = mlp.up.matmul(x, n);
        for (a, g) in act.iter_mut().zip(&gate) {
            *a *= silu(*g);
        }
        mlp.down.matmul(&act, n)
    }

    /// Mixture of experts (§b.3): pick the top-k experts by raw router logit, scale each chosen
    /// expert's *input* by sigmoid(logit), add the shared expert. Tokens are grouped by expert so
    /// each expert's weights are read once per step.
    fn moe(&self, moe: &Moe, x: &[f32], t: usize) -> Vec<f32> {
        let c = &self.config;
        let (h, inter, top_k) = (c.hidden_size, c.intermediate_size, c.num_experts_per_tok);
        let router_logits = moe.router.matmul(x, t);
        // (token, expert, score) for every routed pair.
        let mut routes: Vec<Vec<(usize, f32)>> = vec![Vec::new(); moe.experts.len()];
        for tok in 0..t {
            let logits = &router_logits[tok * moe.experts.len()..(tok + 1) * moe.experts.len()];
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            for &e in &order[..top_k] {
                routes[e].push((tok, sigmoid(logits[e])));
            }
        }
        // Routed sum per token, accumulated in expert order as the reference does.
        let mut routed = vec![0.0f32; t * h];
        for (expert, tokens) in moe.experts.iter().zip(&routes) {
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let mut input = Vec::with_capacity(n * h);
            for &(tok, score) in tokens {
                input.extend(x[tok * h..(tok + 1) * h].iter().map(|v| v * score));
            }
            let gate_up = expert.gate_up.matmul(&input, n);
            let mut act = vec![0.0f32; n * inter];
            for (r, a) in act.chunks_exact_mut(inter).enumerate() {
                let gu = &gate_up[r * 2 * inter..(r + 1) * 2 * inter];
                let (gate, up) = gu.split_at(inter);
                for ((a, g), u) in a.iter_mut().zip(gate).zip(up) {
                    *a = u * silu(*g);
                }
            }
            let y = expert.down.matmul(&act, n);
            for (r, &(tok, _)) in tokens.iter().enumerate() {
                for (o, v) in routed[tok * h..(tok + 1) * h]
                    .iter_mut()
                    .zip(&y[r * h..(r + 1) * h])
                {
                    *o += v;
                }
            }
        }
        let mut out = Self::mlp(&moe.shared, x, t);
        for (o, r) in out.iter_mut().zip(&routed) {
            *o += r;
        }
        out
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

    fn new_cache(&self) -> KvCache {
        let c = &self.config;
        KvCache::new(c.num_hidden_layers, c.num_key_value_heads * c.head_dim)
    }

    fn forward(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        mut trace: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        cache.check_batch(batch)?;
        if let Some(&bad) = batch
            .tokens
            .iter()
            .find(|&&tok| tok as usize >= c.vocab_size)
        {
            return Err(Error::Batch(format!(
                "token id {bad} is outside the vocabulary ({})",
                c.vocab_size
            )));
        }
        let (t, h) = (batch.len(), c.hidden_size);
        let mut hidden = vec![0.0f32; t * h];
        for (row, &tok) in hidden.chunks_exact_mut(h).zip(&batch.tokens) {
            self.embed.as_ref().decode_row(tok as usize, row);
        }
        let mut record = |state: &[f32]| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push(state.to_vec());
            }
        };
        record(&hidden);
        for (li, layer) in self.layers.iter().enumerate() {
            let mut x = hidden.clone();
            rms_norm(&mut x, &layer.input_norm, self.eps());
            let attn = self.attention(li, layer, &x, batch, cache);
            hidden.iter_mut().zip(&attn).for_each(|(a, b)| *a += b);

            let mut x = hidden.clone();
            rms_norm(&mut x, &layer.post_attention_norm, self.eps());
            let ffn = match &layer.ffn {
                FeedForward::Dense(mlp) => Self::mlp(mlp, &x, t),
                FeedForward::Moe(moe) => self.moe(moe, &x, t),
            };
            hidden.iter_mut().zip(&ffn).for_each(|(a, b)| *a += b);
            record(&hidden);
        }
        rms_norm(&mut hidden, &self.norm, self.eps());
        record(&hidden);

        let rows: Vec<f32> = hidden
            .chunks_exact(h)
            .zip(&batch.logits)
            .filter(|(_, want)| **want)
            .flat_map(|(row, _)| row.iter().copied())
            .collect();
        Ok(self.lm_head.matmul(&rows, batch.n_logit_rows()))
    }
}
