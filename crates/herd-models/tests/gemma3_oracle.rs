//! Gemma 3 against transformers (tiny random models, tests/fixtures/gemma3, evaluated by
//! transformers in float64: its own f32 path is ~1e-4 off on these, herd's ~3e-7), and a
//! cross-check against llama.cpp on the real Gemma 3 270M Q4_K_M GGUF (tests/fixtures/gemma3_270m;
//! the model file comes from tests/fixtures/fetch.sh).

use std::path::{Path, PathBuf};

use herd_formats::TensorSet;
use herd_kernels::DType;
use herd_models::{Batch, CausalLm, load_model};

/// The oracles compute in f32 (llama.cpp with an f32 cache) or f64, so the comparison is made
/// with an f32 KV cache; herd's default f16 cache is judged by the KL oracle (gemma3_kl.rs).
const ORACLE_KV: DType = DType::F32;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let max_ref = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / max_ref
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

fn prefill(model: &dyn CausalLm, tokens: &[u32], trace: Option<&mut Vec<Vec<f32>>>) -> Vec<f32> {
    let mut cache = model.new_cache_of(ORACLE_KV).unwrap();
    model
        .forward(&Batch::sequence(0, tokens, 0), &mut cache, trace)
        .unwrap()
}

#[test]
fn tiny_models_match_transformers_layer_by_layer() {
    for name in ["core", "linear_rope_explicit_layers", "softcap", "mqa"] {
        let dir = fixtures().join("gemma3").join(name);
        let model = load_model(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let tokens = ids(&json(&dir.join("oracle.json"))["tokens"]);
        let oracle = TensorSet::open_file(&dir.join("oracle.safetensors")).unwrap();
        let read = |n: &str| {
            let t = oracle.get(n).unwrap();
            herd_kernels::dtype::decode(DType::F32, t.bytes.as_slice(), t.shape.iter().product())
        };
        let mut trace = Vec::new();
        let logits = prefill(model.as_ref(), &tokens, Some(&mut trace));
        for (i, got) in trace.iter().enumerate() {
            let e = rel_err(got, &read(&format!("hidden.{i}")));
            assert!(e < 1e-4, "{name}: hidden state {i} relative error {e:e}");
        }
        let want = read("logits");
        let e = rel_err(&logits, &want);
        assert!(e < 1e-4, "{name}: logits relative error {e:e}");
        let v = model.vocab_size();
        for (p, (a, b)) in logits.chunks_exact(v).zip(want.chunks_exact(v)).enumerate() {
            assert_eq!(argmax(a), argmax(b), "{name}: argmax at position {p}");
        }

        // Token by token through the cache (sliding windows bind at window 4) equals prefill.
        let mut cache = model.new_cache_of(ORACLE_KV).unwrap();
        let mut step = model
            .forward(&Batch::sequence(1, &tokens[..5], 0), &mut cache, None)
            .unwrap();
        for (i, &tok) in tokens.iter().enumerate().skip(5) {
            let mut b = Batch::new();
            b.push(1, tok, i, true);
            step.extend(model.forward(&b, &mut cache, None).unwrap());
        }
        assert!(rel_err(&step, &logits) <= 1e-5, "{name}: decode vs prefill");
        // Sliding layers hold only the blocks a next query can see; full layers hold them all.
        let bs = cache.block_size();
        for (window, used) in cache.blocks_used_by_window() {
            let held = match window {
                herd_models::Window::Full => tokens.len().div_ceil(bs),
                w => tokens.len().div_ceil(bs) - w.first_visible(tokens.len() - 1) / bs,
            };
            assert_eq!(used, held, "{name}: blocks held for {window:?}");
        }
    }
}

fn real_model() -> Box<dyn CausalLm> {
    let path = fixtures().join("downloaded/gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.exists(),
        "{} is missing: run tests/fixtures/fetch.sh",
        path.display()
    );
    load_model(&path).unwrap()
}

/// A cross-check against llama.cpp's top-16 logits at every position of 277 tokens of text (its
/// AVX2 build, see gen_gemma3.py). The two engines sum in different f32 orders, and on this
/// model a last-bit difference can flip an activation's 8-bit rounding and grow through the
/// layers (as the 8-bit quantization noise both engines have against an exact reference), so
/// the logits are not equal; the judge of numerics is the KL oracle (gemma3_kl.rs). What this
/// catches is a broken kernel or layer: measured 263 of 277 argmaxes equal and a mean
/// difference of 0.17 over the top-16 logits (values around 10–25), with herd's online-softmax
/// attention (272 and 0.19 with the two-pass softmax before it, whose mean KL against the f64
/// reference was higher: 0.00448 against 0.00425 now, both with an f32 cache). The bounds are
/// 93% and 0.3: a broken kernel or layer moves most argmaxes.
#[test]
fn real_gemma3_270m_agrees_with_llama_cpp_on_text() {
    let model = real_model();
    let oracle = json(&fixtures().join("gemma3_270m/oracle.json"));
    let tokens = ids(&oracle["text_ids"]);
    assert!(tokens.len() > 250);
    let top =
        TensorSet::open_file(&fixtures().join("gemma3_270m/text_logits.safetensors")).unwrap();
    let top_ids: Vec<i32> = top
        .get("top_ids")
        .unwrap()
        .bytes
        .as_slice()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let t = top.get("top_logits").unwrap();
    let top_logits =
        herd_kernels::dtype::decode(DType::F32, t.bytes.as_slice(), t.shape.iter().product());
    let logits = prefill(model.as_ref(), &tokens, None);
    let v = model.vocab_size();
    let (mut sum_diff, mut agree) = (0.0f64, 0usize);
    for (p, row) in logits.chunks_exact(v).enumerate() {
        let want = &top_ids[p * 16..(p + 1) * 16];
        agree += usize::from(argmax(row) as i32 == want[0]);
        for k in 0..16 {
            sum_diff += f64::from((row[want[k] as usize] - top_logits[p * 16 + k]).abs());
        }
    }
    let mean_diff = sum_diff / (16 * tokens.len()) as f64;
    eprintln!(
        "argmax equal at {agree} of {} positions; mean |herd - llama.cpp| over top-16 logits: {mean_diff:.4}",
        tokens.len()
    );
    assert!(
        agree as f64 >= 0.93 * tokens.len() as f64,
        "argmax equal at only {agree} of {} positions",
        tokens.len()
    );
    assert!(mean_diff < 0.3, "mean logit difference {mean_diff}");
}
