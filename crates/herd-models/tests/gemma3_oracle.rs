//! Gemma 3 against transformers (tiny random models, tests/fixtures/gemma3, evaluated by
//! transformers in float64: its own f32 path is ~1e-4 off on these, herd's ~3e-7) and against llama.cpp
//! on the real Gemma 3 270M Q4_K_M GGUF (tests/fixtures/gemma3_270m; the model file comes from
//! tests/fixtures/fetch.sh).

use std::path::{Path, PathBuf};

use herd_formats::TensorSet;
use herd_kernels::DType;
use herd_models::{Batch, CausalLm, load_model};

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
    let mut cache = model.new_cache();
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
        let mut cache = model.new_cache();
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

/// llama.cpp's top-16 logits at every position of 277 tokens of text (its AVX2 build, see
/// gen_gemma3.py): herd computes the same bits. Every kernel on the path follows llama.cpp's
/// f32 operations for the batch llama.cpp would use (the whole text is one batch there), and
/// both call the same libm for sin, cos, pow and tanh, so the expected difference is zero; a
/// last-bit difference anywhere would show here and flip near-ties downstream.
#[test]
fn real_gemma3_270m_matches_llama_cpp_on_text() {
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
    let (mut max_diff, mut mismatches) = (0.0f32, Vec::new());
    for (p, row) in logits.chunks_exact(v).enumerate() {
        let want = &top_ids[p * 16..(p + 1) * 16];
        if argmax(row) as i32 != want[0] {
            mismatches.push(p);
        }
        for k in 0..16 {
            max_diff = max_diff.max((row[want[k] as usize] - top_logits[p * 16 + k]).abs());
        }
    }
    eprintln!(
        "argmax differs at {mismatches:?} of {} positions; max |herd - llama.cpp| over top-16 logits: {max_diff}",
        tokens.len()
    );
    assert!(mismatches.is_empty(), "argmax differs at {mismatches:?}");
    assert_eq!(max_diff, 0.0, "top logits differ by up to {max_diff}");
}

/// Greedy continuations of fixed prompts equal llama.cpp's token for token, for every token
/// llama.cpp generated (24), each prompt as one batch and each new token alone, as llama.cpp
/// ran them.
#[test]
fn real_gemma3_270m_greedy_continuations_match_llama_cpp() {
    let model = real_model();
    let oracle = json(&fixtures().join("gemma3_270m/oracle.json"));
    let prompts = oracle["continuations"].as_array().unwrap();
    assert!(prompts.len() >= 4);
    for c in prompts {
        let prompt = ids(&c["prompt_ids"]);
        let want = ids(&c["greedy_ids"]);
        assert!(want.len() >= 16);
        let mut cache = model.new_cache();
        let mut logits = model
            .forward(&Batch::sequence(0, &prompt, 0), &mut cache, None)
            .unwrap();
        let v = model.vocab_size();
        let mut got = Vec::new();
        for step in 0..want.len() {
            let next = argmax(&logits[logits.len() - v..]) as u32;
            got.push(next);
            let mut b = Batch::new();
            b.push(0, next, prompt.len() + step, true);
            logits = model.forward(&b, &mut cache, None).unwrap();
        }
        assert_eq!(got, want, "prompt {:?}", c["prompt"]);
    }
}
