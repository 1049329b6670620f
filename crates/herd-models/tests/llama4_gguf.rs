//! Llama 4 from GGUF files written by llama.cpp's own converter (tests/fixtures/llama4_gguf,
//! made by tests/fixtures/gen/gen_llama4_gguf.py): f32 equals the safetensors path and
//! transformers; q8_0 equals llama.cpp's own logits on the same file.

use std::path::{Path, PathBuf};

use herd_formats::TensorSet;
use herd_kernels::DType;
use herd_models::{Batch, CausalLm, load_model};

/// The oracles compute in f32 (llama.cpp with an f32 cache) or f64, so the comparison is made
/// with an f32 KV cache; herd's default f16 cache is judged by the KL oracle (gemma3_kl.rs).
const ORACLE_KV: DType = DType::F32;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama4_gguf")
}

fn tokens() -> Vec<u32> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("oracle.json")).unwrap()).unwrap();
    meta["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

fn oracle(name: &str) -> Vec<f32> {
    let set = TensorSet::open_file(&dir().join("oracle.safetensors")).unwrap();
    let t = set.get(name).unwrap();
    herd_kernels::dtype::decode(DType::F32, t.bytes.as_slice(), t.shape.iter().product())
}

fn logits(model: &dyn CausalLm, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache_of(ORACLE_KV).unwrap();
    model
        .forward(&Batch::sequence(0, tokens, 0), &mut cache, None)
        .unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let max_ref = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / max_ref
}

fn argmax(logits: &[f32], vocab: usize) -> Vec<usize> {
    logits
        .chunks_exact(vocab)
        .map(|r| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        })
        .collect()
}

#[test]
fn f32_gguf_equals_safetensors_transformers_and_llama_cpp() {
    let tokens = tokens();
    let from_gguf = logits(
        load_model(&dir().join("tiny-f32.gguf")).unwrap().as_ref(),
        &tokens,
    );
    let from_st = logits(load_model(&dir()).unwrap().as_ref(), &tokens);
    let e = rel_err(&from_gguf, &from_st);
    assert!(e < 1e-5, "GGUF f32 vs safetensors: {e:e}");
    let e = rel_err(&from_gguf, &oracle("hf"));
    assert!(e < 1e-4, "GGUF f32 vs transformers: {e:e}");
    let e = rel_err(&from_gguf, &oracle("llama_cpp_f32"));
    assert!(e < 1e-4, "GGUF f32 vs llama.cpp: {e:e}");
    assert_eq!(argmax(&from_gguf, 128), argmax(&oracle("hf"), 128));
}

/// Both engines quantize each activation row to Q8_0 and take the same integer dot products,
/// so they agree to f32 round-off (measured: 5e-8).
const Q8_TOLERANCE: f32 = 1e-5;

#[test]
fn q8_0_gguf_equals_llama_cpp() {
    let tokens = tokens();
    let model = load_model(&dir().join("tiny-q8_0.gguf")).unwrap();
    let got = logits(model.as_ref(), &tokens);
    let want = oracle("llama_cpp_q8_0");
    let e = rel_err(&got, &want);
    eprintln!("q8_0 vs llama.cpp: relative error {e:.2e}");
    assert!(e < Q8_TOLERANCE, "q8_0 vs llama.cpp: {e:e}");
    assert_eq!(
        argmax(&got, 128),
        argmax(&want, 128),
        "argmax at every position"
    );
}

/// llama-quantize's Q4_K_M of the tiny model (rows of 32 fall back to Q5_0 and Q8_0).
#[test]
fn q4_k_m_gguf_equals_llama_cpp() {
    let tokens = tokens();
    let model = load_model(&dir().join("tiny-q4_k_m.llama-quantize.gguf")).unwrap();
    let got = logits(model.as_ref(), &tokens);
    let want = oracle("llama_cpp_q4_k_m");
    let e = rel_err(&got, &want);
    assert!(e < Q8_TOLERANCE, "q4_k_m vs llama.cpp: {e:e}");
    assert_eq!(
        argmax(&got, 128),
        argmax(&want, 128),
        "argmax at every position"
    );
}

/// The same file split by llama.cpp's `llama-gguf-split` into four shards loads from any shard
/// and computes the unsplit file's logits, bit for bit.
#[test]
fn split_set_equals_the_unsplit_file() {
    let tokens = tokens();
    let whole = logits(
        load_model(&dir().join("tiny-q4_k_m.llama-quantize.gguf"))
            .unwrap()
            .as_ref(),
        &tokens,
    );
    for shard in ["00001", "00003"] {
        let path = dir().join(format!("split/tiny-q4_k_m-{shard}-of-00004.gguf"));
        let got = logits(load_model(&path).unwrap().as_ref(), &tokens);
        let same = got
            .iter()
            .zip(&whole)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same && got.len() == whole.len(),
            "opened from shard {shard}"
        );
    }
}
