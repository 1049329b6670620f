//! A Llama 4 model with random weights, for benchmarks (issue 9): any config's shape written as
//! a GGUF that both herd and llama.cpp load, tensor types chosen by the same rules as
//! `llama-quantize` (Q4_K_M's Q6_K output and `use_more_bits` layers, …).
//!
//! Weights are N(0, 0.02²) (transformers' initializer range), norms are ones, and the
//! vocabulary is a synthetic SentencePiece one (`<unk>`, `<s>`, `</s>`, the 256 byte tokens,
//! then placeholder pieces) so that tools that sample random token ids know its size.

use herd_formats::TensorBytes;
use herd_formats::gguf::Value;
use herd_formats::quantize::{FileType, GgufPlan, ModelShape, SourceTensor, choose_types};
use herd_formats::random::random_tensor;
use herd_kernels::DType;

use super::Llama4Config;
use super::export::{gguf_metadata, gguf_model_shape, gguf_tensor_table, rope_freq_factors};

/// Standard deviation of the random weights.
const WEIGHT_STD: f32 = 0.02;

/// A synthetic SentencePiece vocabulary of `n` tokens (at least 259).
fn synthetic_vocab(n: usize) -> Vec<(String, Value)> {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    types.extend([6; 256]);
    let specials = tokens.len();
    tokens.extend((specials..n).map(|i| format!("\u{2581}t{i}")));
    types.resize(n.max(specials), 1);
    let string_array =
        |v: Vec<String>| Value::Array(8, v.iter().map(|s| Value::string(s)).collect());
    vec![
        ("tokenizer.ggml.model".into(), Value::string("llama")),
        ("tokenizer.ggml.tokens".into(), string_array(tokens)),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(6, (0..n).map(|i| Value::F32(-(i as f32))).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(5, types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
    ]
}

/// The GGUF plan of a random-weight model of shape `c`, typed for `ft`; `seed` fixes every value.
pub fn random_gguf_plan(c: &Llama4Config, ft: FileType, seed: u64) -> GgufPlan {
    // rope_freqs holds the config's frequency factors, not random values.
    let table: Vec<(String, Vec<u64>)> = gguf_tensor_table(c)
        .into_iter()
        .filter(|(name, _)| name != "rope_freqs.weight")
        .collect();
    // Typed as published files of `ft` are (with an importance matrix for the IQ types).
    let shape = ModelShape {
        imatrix: ft.made_with_imatrix(),
        ..gguf_model_shape(c)
    };
    let types = choose_types(
        ft,
        &shape,
        table
            .iter()
            .map(|(name, dims)| (name.as_str(), dims.as_slice(), DType::F32)),
    );
    let mut tensors = Vec::new();
    if c.rope_scaling.is_some() {
        let factors: Vec<u8> = rope_freq_factors(c)
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        tensors.push(SourceTensor::stored(
            "rope_freqs.weight",
            vec![c.head_dim as u64 / 2],
            DType::F32,
            TensorBytes::owned(factors),
        ));
    }
    tensors.extend(
        table
            .into_iter()
            .zip(types)
            .enumerate()
            .map(|(i, ((name, dims), dtype))| {
                let n = dims.iter().product::<u64>() as usize;
                let norm = name.ends_with("norm.weight");
                let tensor_seed = seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let raw = move || {
                    TensorBytes::owned(if norm {
                        1.0f32.to_le_bytes().repeat(n)
                    } else {
                        random_tensor(dtype, n, WEIGHT_STD, tensor_seed)
                    })
                };
                let raw_read = raw;
                SourceTensor {
                    name,
                    dims,
                    dtype,
                    raw: Some(Box::new(raw)),
                    read: Box::new(move || {
                        Ok(herd_kernels::dtype::decode(dtype, raw_read().as_slice(), n))
                    }),
                }
            }),
    );
    let mut metadata = vec![(
        "general.name".to_string(),
        Value::string("random-weight llama4"),
    )];
    metadata.extend(gguf_metadata(c));
    metadata.extend(synthetic_vocab(c.vocab_size));
    GgufPlan {
        metadata,
        tensors,
        shape,
    }
}
