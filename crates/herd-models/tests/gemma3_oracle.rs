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

/// llama.cpp's top-16 logits at every position of 277 tokens of text: herd's argmax equals
/// llama.cpp's everywhere and the top logits agree within the drift llama.cpp's own shortcuts
/// (fp16 GELU table) allow.
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
    let (mut max_diff, mut agree, mut mismatches) = (0.0f32, 0, Vec::new());
    for (p, row) in logits.chunks_exact(v).enumerate() {
        let want = &top_ids[p * 16..(p + 1) * 16];
        if argmax(row) as i32 == want[0] {
            agree += 1;
        } else {
            mismatches.push((p, top_logits[p * 16] - top_logits[p * 16 + 1]));
        }
        for k in 0..16 {
            max_diff = max_diff.max((row[want[k] as usize] - top_logits[p * 16 + k]).abs());
        }
        if p == 0 {
            // One token: no attention mixing, every kernel on the path is bit-compatible.
            assert!(max_diff < 1e-3, "position 0 differs by {max_diff}");
        }
    }
    eprintln!(
        "argmax equal at {agree} of {} positions; mismatches (position, llama.cpp's top-2 gap): {mismatches:?}; \
         max |herd - llama.cpp| over top-16 logits: {max_diff}",
        tokens.len()
    );
    assert!(
        agree * 100 >= tokens.len() * 97,
        "argmax agreement {agree}/{}",
        tokens.len()
    );
    assert!(max_diff < 1.5, "top logits differ by {max_diff}");
}

/// Greedy continuations of fixed prompts against llama.cpp's. Agreement holds until the first
/// near-tie that the two engines' f32 arithmetic resolves differently (attention now follows
/// llama.cpp's orders; the quantized products' f32 accumulation does not yet: llama.cpp sums
/// Q4_K blocks in its repacked 8×8 kernels' lanes); every prompt must agree for its first 8
/// tokens, and most for all 16 (the goal is all 16 everywhere: see the generation issue).
#[test]
fn real_gemma3_270m_greedy_continuations_match_llama_cpp() {
    let model = real_model();
    let oracle = json(&fixtures().join("gemma3_270m/oracle.json"));
    let mut full = 0;
    let prompts = oracle["continuations"].as_array().unwrap();
    for c in prompts {
        let prompt = ids(&c["prompt_ids"]);
        let want = ids(&c["greedy_ids"]);
        let mut cache = model.new_cache();
        let mut logits = model
            .forward(&Batch::sequence(0, &prompt, 0), &mut cache, None)
            .unwrap();
        let v = model.vocab_size();
        let mut got = Vec::new();
        for step in 0..16 {
            let next = argmax(&logits[logits.len() - v..]) as u32;
            got.push(next);
            let mut b = Batch::new();
            b.push(0, next, prompt.len() + step, true);
            logits = model.forward(&b, &mut cache, None).unwrap();
        }
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{:?}: {same} of 16 greedy tokens equal llama.cpp's",
            c["prompt"]
        );
        assert!(
            same >= 8,
            "prompt {:?}: herd {got:?}, llama.cpp {:?}",
            c["prompt"],
            &want[..16]
        );
        full += usize::from(same == 16);
    }
    assert!(
        full * 2 >= prompts.len(),
        "only {full} of {} prompts agree for 16 tokens",
        prompts.len()
    );
}
