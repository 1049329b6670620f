//! Llama 4 against transformers: every fixture in tests/fixtures/llama4 (made by
//! tests/fixtures/gen/gen_llama4.py) must match layer by layer and at the logits.

use std::path::{Path, PathBuf};

use herd_formats::TensorSet;
use herd_kernels::DType;
use herd_models::{Batch, CausalLm, load_hf_dir};

/// The oracles compute in f32 (llama.cpp with an f32 cache) or f64, so the comparison is made
/// with an f32 KV cache; herd's default f16 cache is judged by the KL oracle (gemma3_kl.rs).
const ORACLE_KV: DType = DType::F32;

/// f32 on both sides: agreement is limited by summation order only.
const ORACLE_TOLERANCE: f32 = 1e-4;
/// Same kernels, different batching: the only differences allowed are none at all, in practice.
const BATCHING_TOLERANCE: f32 = 1e-5;

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama4");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures/llama4 exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("oracle.json").is_file())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 6,
        "expected the six generated fixtures, found {dirs:?}"
    );
    dirs
}

struct Oracle {
    tokens: Vec<u32>,
    logits: Vec<f32>,
    hidden: Vec<Vec<f32>>,
}

fn oracle(dir: &Path) -> Oracle {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("oracle.json")).unwrap()).unwrap();
    let tokens = meta["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let set = TensorSet::open_file(&dir.join("oracle.safetensors")).unwrap();
    let read = |name: &str| {
        let t = set.get(name).unwrap_or_else(|| panic!("{name} in oracle"));
        assert_eq!(t.dtype, Ok(DType::F32));
        herd_kernels::dtype::decode(DType::F32, t.bytes.as_slice(), t.shape.iter().product())
    };
    let hidden = (0..)
        .map(|i| format!("hidden.{i}"))
        .take_while(|n| set.contains(n))
        .map(|n| read(&n))
        .collect();
    Oracle {
        tokens,
        logits: read("logits"),
        hidden,
    }
}

/// max |a − b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let max_ref = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let max_diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    max_diff / max_ref
}

fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<usize> {
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

fn prefill(model: &dyn CausalLm, tokens: &[u32], kv: DType) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut cache = model.new_cache_of(kv).unwrap();
    let mut trace = Vec::new();
    let logits = model
        .forward(&Batch::sequence(0, tokens, 0), &mut cache, Some(&mut trace))
        .unwrap();
    (logits, trace)
}

#[test]
fn every_layer_and_the_logits_match_transformers() {
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = load_hf_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = oracle(&dir);
        let (logits, trace) = prefill(model.as_ref(), &want.tokens, ORACLE_KV);
        assert_eq!(
            trace.len(),
            model.num_layers() + 2,
            "{name}: embeddings, layers, final norm"
        );
        assert_eq!(
            trace.len(),
            want.hidden.len(),
            "{name}: oracle hidden states"
        );
        for (i, (got, exp)) in trace.iter().zip(&want.hidden).enumerate() {
            let e = rel_err(got, exp);
            assert!(
                e < ORACLE_TOLERANCE,
                "{name}: hidden state {i} relative error {e:e}"
            );
        }
        let e = rel_err(&logits, &want.logits);
        assert!(e < ORACLE_TOLERANCE, "{name}: logits relative error {e:e}");
        let vocab = model.vocab_size();
        assert_eq!(
            argmax_rows(&logits, vocab),
            argmax_rows(&want.logits, vocab),
            "{name}: argmax"
        );
        eprintln!("{name}: logits relative error {e:.2e}");
    }
}

/// In every KV cache type the tiny models hold (their heads of 16 are too small for Q8_0's
/// blocks of 32).
#[test]
fn prefill_decode_and_batching_agree() {
    for (dir, kv) in fixtures()
        .into_iter()
        .flat_map(|d| [DType::F32, DType::F16, DType::BF16].map(|kv| (d.clone(), kv)))
    {
        let name = format!("{} ({kv})", dir.file_name().unwrap().to_string_lossy());
        let model = load_hf_dir(&dir).unwrap();
        let tokens = oracle(&dir).tokens;
        let vocab = model.vocab_size();
        let (full, _) = prefill(model.as_ref(), &tokens, kv);

        // Prefill a prefix, then decode one token at a time through the cache.
        let mut cache = model.new_cache_of(kv).unwrap();
        let split = 13;
        let mut stepwise = model
            .forward(&Batch::sequence(7, &tokens[..split], 0), &mut cache, None)
            .unwrap();
        for (i, &tok) in tokens.iter().enumerate().skip(split) {
            let mut b = Batch::new();
            b.push(7, tok, i, true);
            stepwise.extend(model.forward(&b, &mut cache, None).unwrap());
        }
        let e = rel_err(&stepwise, &full);
        assert!(e <= BATCHING_TOLERANCE, "{name}: decode vs prefill {e:e}");

        // Two different sequences in one batch, interleaved, each equal to its own run.
        let other: Vec<u32> = tokens.iter().rev().take(30).copied().collect();
        let (other_alone, _) = prefill(model.as_ref(), &other, kv);
        let mut b = Batch::new();
        for i in 0..tokens.len().max(other.len()) {
            if let Some(&t) = tokens.get(i) {
                b.push(1, t, i, true);
            }
            if let Some(&t) = other.get(i) {
                b.push(2, t, i, true);
            }
        }
        let mut cache = model.new_cache_of(kv).unwrap();
        let both = model.forward(&b, &mut cache, None).unwrap();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        for (row, seq) in both.chunks_exact(vocab).zip(&b.seq_ids) {
            if *seq == 1 {
                first.extend_from_slice(row)
            } else {
                second.extend_from_slice(row)
            }
        }
        assert!(
            rel_err(&first, &full) <= BATCHING_TOLERANCE,
            "{name}: batched seq 1"
        );
        assert!(
            rel_err(&second, &other_alone) <= BATCHING_TOLERANCE,
            "{name}: batched seq 2"
        );
        assert_eq!(cache.seq_len(1), tokens.len());
        assert_eq!(cache.seq_len(2), other.len());
    }
}

/// A 16-bit cache changes the logits by about its rounding (f16: 2^-11 of each key and value,
/// bf16: 2^-8; Q8_0: half a step of amax/127 per block of 32), and a type whose blocks do not
/// divide the head size is refused with an error that says why (heads of 16 here, except in
/// hf_defaults, whose heads of 128 take Q8_0).
#[test]
fn kv_cache_types_stay_close_to_f32() {
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = load_hf_dir(&dir).unwrap();
        let tokens = oracle(&dir).tokens;
        let (exact, _) = prefill(model.as_ref(), &tokens, DType::F32);
        for (kv, bound) in [(DType::F16, 1e-3), (DType::BF16, 8e-3)] {
            let (got, _) = prefill(model.as_ref(), &tokens, kv);
            let e = rel_err(&got, &exact);
            assert!(e < bound, "{name} {kv}: relative error {e:e}");
            eprintln!("{name} {kv}: logits relative error to an f32 cache {e:.2e}");
        }
        if model.head_dim().is_multiple_of(32) {
            let (got, _) = prefill(model.as_ref(), &tokens, DType::Q8_0);
            let e = rel_err(&got, &exact);
            assert!(e < 2e-2, "{name} Q8_0: relative error {e:e}");
            eprintln!("{name} Q8_0: logits relative error to an f32 cache {e:.2e}");
        } else {
            let err = model.new_cache_of(DType::Q8_0).unwrap_err().to_string();
            let want = format!(
                "Q8_0 stores blocks of 32 elements, and this model's heads have {}",
                model.head_dim()
            );
            assert!(err.contains(&want), "{err}");
        }
        let err = model.new_cache_of(DType::Q4K).unwrap_err().to_string();
        assert!(
            err.contains("Q4_K is not a KV cache type: choose one of f32, f16, bf16, q8_0"),
            "{err}"
        );
    }
}

/// transformers 5.x writes RoPE settings as `rope_parameters`; the same weights must give the
/// same logits under either config style.
#[test]
fn v5_style_config_loads_the_same_model() {
    for name in ["scout_like", "multimodal_layout"] {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/llama4")
            .join(name);
        let tmp = tempfile::tempdir().unwrap();
        for f in ["model.safetensors", "oracle.json", "oracle.safetensors"] {
            std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
        }
        std::fs::copy(src.join("config.v5.json"), tmp.path().join("config.json")).unwrap();
        let text = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
        assert!(text.contains("rope_parameters") && !text.contains("rope_scaling"));
        let model = load_hf_dir(tmp.path()).unwrap();
        let want = oracle(&src);
        let (logits, _) = prefill(model.as_ref(), &want.tokens, ORACLE_KV);
        assert!(rel_err(&logits, &want.logits) < ORACLE_TOLERANCE, "{name}");
    }
}
