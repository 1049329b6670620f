//! A Hugging Face Llama 4 checkpoint as GGUF tensors and metadata, laid out exactly as llama.cpp's
//! `convert_hf_to_gguf.py` writes them (reference note §c.2): names, ggml dimension order, the
//! fused expert tensors split and transposed, llama3 RoPE scaling as `rope_freqs`, and the
//! swapped feed-forward length keys. `herd quantize` feeds this to the quantizer.

use herd_formats::gguf::Value;
use herd_formats::hf::bpe_tokenizer_gguf_metadata;
use herd_formats::quantize::{GgufPlan, ModelShape, SourceTensor};
use herd_formats::{HfModelDir, TensorBytes};
use herd_kernels::DType;

use super::Llama4Config;
use crate::{Error, Result};

/// Metadata, tensors (in the converter's order) and the shape facts the quantizer needs.
pub fn gguf_from_hf(dir: &HfModelDir) -> Result<GgufPlan> {
    let c = Llama4Config::from_json(&dir.config)?;
    let (prefix, head_prefix) = crate::weights::hf_prefixes(&dir.tensors)?;
    let head = format!("{head_prefix}lm_head.weight");
    let head = head.as_str();

    let mut tensors = Vec::new();
    if c.rope_scaling.is_some() {
        let factors = rope_freq_factors(&c);
        let bytes: Vec<u8> = factors.iter().flat_map(|f| f.to_le_bytes()).collect();
        tensors.push(SourceTensor::stored(
            "rope_freqs.weight",
            vec![factors.len() as u64],
            DType::F32,
            TensorBytes::owned(bytes),
        ));
    }
    let plain = |hf: &str, gguf: &str, tensors: &mut Vec<SourceTensor>| -> Result<()> {
        let t = dir.tensors.get(hf).ok_or_else(|| Error::MissingTensor {
            name: hf.to_string(),
        })?;
        let dtype = t.dtype.clone().map_err(|dtype| Error::TensorDtype {
            name: hf.to_string(),
            dtype,
        })?;
        let dims = t.shape.iter().rev().map(|&d| d as u64).collect();
        tensors.push(SourceTensor::stored(gguf, dims, dtype, t.bytes.clone()));
        Ok(())
    };
    if !c.tie_word_embeddings || dir.tensors.contains(head) {
        plain(head, "output.weight", &mut tensors)?;
    }
    plain(
        &format!("{prefix}embed_tokens.weight"),
        "token_embd.weight",
        &mut tensors,
    )?;
    plain(
        &format!("{prefix}norm.weight"),
        "output_norm.weight",
        &mut tensors,
    )?;
    for i in 0..c.num_hidden_layers {
        let p = format!("{prefix}layers.{i}");
        let b = format!("blk.{i}");
        for (hf, gguf) in [
            ("input_layernorm.weight", "attn_norm.weight"),
            ("self_attn.q_proj.weight", "attn_q.weight"),
            ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.v_proj.weight", "attn_v.weight"),
            ("self_attn.o_proj.weight", "attn_output.weight"),
            ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ] {
            plain(&format!("{p}.{hf}"), &format!("{b}.{gguf}"), &mut tensors)?;
        }
        if c.is_moe_layer(i) {
            plain(
                &format!("{p}.feed_forward.router.weight"),
                &format!("{b}.ffn_gate_inp.weight"),
                &mut tensors,
            )?;
            for (hf, gguf) in [
                ("gate_proj", "ffn_gate_shexp"),
                ("up_proj", "ffn_up_shexp"),
                ("down_proj", "ffn_down_shexp"),
            ] {
                plain(
                    &format!("{p}.feed_forward.shared_expert.{hf}.weight"),
                    &format!("{b}.{gguf}.weight"),
                    &mut tensors,
                )?;
            }
            tensors.extend(experts(dir, &c, &p, &b)?);
        } else {
            for (hf, gguf) in [
                ("gate_proj", "ffn_gate"),
                ("up_proj", "ffn_up"),
                ("down_proj", "ffn_down"),
            ] {
                plain(
                    &format!("{p}.feed_forward.{hf}.weight"),
                    &format!("{b}.{gguf}.weight"),
                    &mut tensors,
                )?;
            }
        }
    }

    let mut meta = gguf_metadata(&c);
    meta.extend(bpe_tokenizer_gguf_metadata(
        &dir.path,
        "llama4",
        c.vocab_size,
        text_config(&dir.config),
    )?);
    let shape = ModelShape {
        n_layers: c.num_hidden_layers,
        n_experts: c.num_local_experts,
        n_attn_v: c.num_hidden_layers,
        tied_embeddings: !tensors.iter().any(|t| t.name == "output.weight"),
        n_gqa: c.num_attention_heads / c.num_key_value_heads.max(1),
        imatrix: false,
    };
    Ok(GgufPlan {
        metadata: meta,
        tensors,
        shape,
    })
}

/// Every tensor llama.cpp's converter writes for a Llama 4 config, in its order: the GGUF name
/// and ggml dimensions (row length first). `rope_freqs` comes first when the config scales RoPE.
pub fn gguf_tensor_table(c: &Llama4Config) -> Vec<(String, Vec<u64>)> {
    let (h, d, v) = (c.hidden_size as u64, c.head_dim as u64, c.vocab_size as u64);
    let (nh, nkv, e) = (
        c.num_attention_heads as u64,
        c.num_key_value_heads as u64,
        c.num_local_experts as u64,
    );
    let (i, im) = (c.intermediate_size as u64, c.intermediate_size_mlp as u64);
    let mut list: Vec<(String, Vec<u64>)> = Vec::new();
    if c.rope_scaling.is_some() {
        list.push(("rope_freqs.weight".into(), vec![d / 2]));
    }
    if !c.tie_word_embeddings {
        list.push(("output.weight".into(), vec![h, v]));
    }
    list.push(("token_embd.weight".into(), vec![h, v]));
    list.push(("output_norm.weight".into(), vec![h]));
    for l in 0..c.num_hidden_layers {
        let b = |n: &str| format!("blk.{l}.{n}.weight");
        list.push((b("attn_norm"), vec![h]));
        list.push((b("attn_q"), vec![h, nh * d]));
        list.push((b("attn_k"), vec![h, nkv * d]));
        list.push((b("attn_v"), vec![h, nkv * d]));
        list.push((b("attn_output"), vec![nh * d, h]));
        list.push((b("ffn_norm"), vec![h]));
        if c.is_moe_layer(l) {
            list.push((b("ffn_gate_inp"), vec![h, e]));
            list.push((b("ffn_gate_shexp"), vec![h, i]));
            list.push((b("ffn_up_shexp"), vec![h, i]));
            list.push((b("ffn_down_shexp"), vec![i, h]));
            list.push((b("ffn_gate_exps"), vec![h, i, e]));
            list.push((b("ffn_up_exps"), vec![h, i, e]));
            list.push((b("ffn_down_exps"), vec![i, h, e]));
        } else {
            list.push((b("ffn_gate"), vec![h, im]));
            list.push((b("ffn_up"), vec![h, im]));
            list.push((b("ffn_down"), vec![im, h]));
        }
    }
    list
}

/// The facts the quantizer's type rules need about a Llama 4 config.
pub fn gguf_model_shape(c: &Llama4Config) -> ModelShape {
    ModelShape {
        n_layers: c.num_hidden_layers,
        n_experts: c.num_local_experts,
        n_attn_v: c.num_hidden_layers,
        tied_embeddings: c.tie_word_embeddings,
        n_gqa: c.num_attention_heads / c.num_key_value_heads.max(1),
        imatrix: false,
    }
}

/// The model keys llama.cpp's converter writes for a Llama 4 config (no tokenizer keys).
pub(crate) fn gguf_metadata(c: &Llama4Config) -> Vec<(String, Value)> {
    let u32v = |v: usize| Value::U32(v as u32);
    let mut meta = vec![
        ("general.architecture".to_string(), Value::string("llama4")),
        ("general.type".to_string(), Value::string("model")),
        ("llama4.block_count".to_string(), u32v(c.num_hidden_layers)),
        (
            "llama4.context_length".to_string(),
            u32v(c.max_position_embeddings),
        ),
        ("llama4.embedding_length".to_string(), u32v(c.hidden_size)),
        // The converter swaps the two widths: dense layers here, experts below.
        (
            "llama4.feed_forward_length".to_string(),
            u32v(c.intermediate_size_mlp),
        ),
        (
            "llama4.attention.head_count".to_string(),
            u32v(c.num_attention_heads),
        ),
        (
            "llama4.attention.head_count_kv".to_string(),
            u32v(c.num_key_value_heads),
        ),
        (
            "llama4.rope.freq_base".to_string(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "llama4.attention.layer_norm_rms_epsilon".to_string(),
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("llama4.expert_count".to_string(), u32v(c.num_local_experts)),
        (
            "llama4.expert_used_count".to_string(),
            u32v(c.num_experts_per_tok),
        ),
        ("llama4.attention.key_length".to_string(), u32v(c.head_dim)),
        (
            "llama4.attention.value_length".to_string(),
            u32v(c.head_dim),
        ),
        ("llama4.vocab_size".to_string(), u32v(c.vocab_size)),
        ("llama4.rope.dimension_count".to_string(), u32v(c.head_dim)),
        (
            "llama4.interleave_moe_layer_step".to_string(),
            u32v(moe_step(c)),
        ),
        (
            "llama4.expert_feed_forward_length".to_string(),
            u32v(c.intermediate_size),
        ),
    ];
    if c.layer_types
        .iter()
        .all(|k| *k == super::AttentionKind::Full)
    {
        meta.push(("llama4.attention.sliding_window".to_string(), Value::U32(0)));
    }
    meta
}

fn text_config(config: &serde_json::Value) -> &serde_json::Value {
    config.get("text_config").unwrap_or(config)
}

/// The MoE step llama.cpp derives its MoE layers from; explicit `moe_layers` lists must follow it.
fn moe_step(c: &Llama4Config) -> usize {
    c.moe_layers.first().map_or(0, |&l| l + 1)
}

/// `rope_freqs`: per-frequency divisors equivalent to llama3 scaling, in f32 as the converter
/// computes them.
pub(crate) fn rope_freq_factors(c: &Llama4Config) -> Vec<f32> {
    let s = c.rope_scaling.as_ref().expect("llama3 scaling");
    let (factor, lo, hi) = (
        s.factor as f32,
        s.low_freq_factor as f32,
        s.high_freq_factor as f32,
    );
    let old = s.original_max_position_embeddings as f32;
    let base = c.rope_theta as f32;
    (0..c.head_dim / 2)
        .map(|j| {
            let freq = 1.0 / base.powf((2 * j) as f32 / c.head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < old / hi {
                1.0
            } else if wavelen > old / lo {
                factor
            } else {
                let smooth = (old / wavelen - lo) / (hi - lo);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// The fused input-major expert tensors split into llama.cpp's three stacks of `[out, in]`.
fn experts(dir: &HfModelDir, c: &Llama4Config, p: &str, b: &str) -> Result<Vec<SourceTensor>> {
    let (e, h, inter) = (c.num_local_experts, c.hidden_size, c.intermediate_size);
    let load = |name: String, shape: [usize; 3]| -> Result<(TensorBytes, DType)> {
        let t = dir
            .tensors
            .get(&name)
            .ok_or_else(|| Error::MissingTensor { name: name.clone() })?;
        if t.shape != shape {
            return Err(Error::TensorShape {
                name,
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        let dtype = t
            .dtype
            .clone()
            .map_err(|dtype| Error::TensorDtype { name, dtype })?;
        Ok((t.bytes.clone(), dtype))
    };
    let (gate_up, gu_type) = load(
        format!("{p}.feed_forward.experts.gate_up_proj"),
        [e, h, 2 * inter],
    )?;
    let (down, d_type) = load(format!("{p}.feed_forward.experts.down_proj"), [e, inter, h])?;
    // out[e][o][i] = src[e][i][col0 + o] for a [e, rows, cols] source.
    let transposed = move |bytes: TensorBytes,
                           dtype: DType,
                           rows: usize,
                           cols: usize,
                           col0: usize,
                           width: usize| {
        move || -> herd_formats::Result<Vec<f32>> {
            let src = herd_kernels::dtype::decode(dtype, bytes.as_slice(), e * rows * cols);
            let mut out = vec![0.0f32; e * width * rows];
            for ex in 0..e {
                for i in 0..rows {
                    for o in 0..width {
                        out[(ex * width + o) * rows + i] = src[(ex * rows + i) * cols + col0 + o];
                    }
                }
            }
            Ok(out)
        }
    };
    let stack =
        |name: &str,
         dims: Vec<u64>,
         dtype: DType,
         read: Box<dyn Fn() -> herd_formats::Result<Vec<f32>> + Send + Sync>| {
            SourceTensor {
                name: format!("{b}.{name}"),
                dims,
                dtype,
                raw: None,
                read,
            }
        };
    Ok(vec![
        stack(
            "ffn_gate_exps.weight",
            vec![h as u64, inter as u64, e as u64],
            gu_type,
            Box::new(transposed(gate_up.clone(), gu_type, h, 2 * inter, 0, inter)),
        ),
        stack(
            "ffn_up_exps.weight",
            vec![h as u64, inter as u64, e as u64],
            gu_type,
            Box::new(transposed(gate_up, gu_type, h, 2 * inter, inter, inter)),
        ),
        stack(
            "ffn_down_exps.weight",
            vec![inter as u64, h as u64, e as u64],
            d_type,
            Box::new(transposed(down, d_type, inter, h, 0, h)),
        ),
    ])
}
