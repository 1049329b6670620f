//! Repacking quantized matrices at load (interleaved row groups for the CPU kernels) changes no
//! result: the same GGUF loaded with and without repacking gives bit-identical logits for a
//! prompt and for decode steps after it, on the tiny Llama 4 files (Q5_0 and Q8_0 matrices) and
//! the real Gemma 3 270M Q4_K_M (Q4_K, Q5_0, Q8_0 and Q6_K, the tied Q8_0 head). On a CPU
//! without the group kernels (or with `HERD_NO_SIMD`) both loads keep the file's layout, and
//! the test only confirms that.
//!
//! One test in this binary: it switches the process-wide repacking setting between loads.

use std::path::Path;

use herd_models::weights::set_weight_repacking;
use herd_models::{Batch, CausalLm, load_model};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Logits of a 19-token prompt (last row) and of five greedy decode steps after it.
fn run(model: &dyn CausalLm) -> Vec<f32> {
    let v = model.vocab_size();
    let vocab = model.vocab_size() as u32;
    let prompt: Vec<u32> = (0..19).map(|i| (i * 11 + 5) % (vocab - 2) + 2).collect();
    let mut cache = model.new_cache();
    let mut logits = Vec::new();
    model
        .forward_into(
            &Batch::sequence(0, &prompt, 0),
            &mut cache,
            None,
            &mut logits,
        )
        .unwrap();
    let mut all = logits[logits.len() - v..].to_vec();
    let mut batch = Batch::new();
    for pos in prompt.len()..prompt.len() + 5 {
        let last = &logits[logits.len() - v..];
        let next = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap();
        batch.clear();
        batch.push(0, next as u32, pos, true);
        model
            .forward_into(&batch, &mut cache, None, &mut logits)
            .unwrap();
        all.extend_from_slice(&logits[logits.len() - v..]);
    }
    all
}

#[test]
fn repacked_and_file_layouts_give_the_same_logits() {
    let gemma = fixtures().join("downloaded/gemma-3-270m-q4_k_m.gguf");
    assert!(
        gemma.exists(),
        "{} is missing: run tests/fixtures/fetch.sh",
        gemma.display()
    );
    for path in [
        fixtures().join("llama4_gguf/tiny-q4_k_m.llama-quantize.gguf"),
        fixtures().join("llama4_gguf/tiny-q8_0.gguf"),
        gemma,
    ] {
        set_weight_repacking(true);
        let packed = run(load_model(&path).unwrap().as_ref());
        set_weight_repacking(false);
        let plain = run(load_model(&path).unwrap().as_ref());
        assert_eq!(packed.len(), plain.len());
        let differ = packed
            .iter()
            .zip(&plain)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{}: {differ} logits differ", path.display());
        assert!(packed.iter().all(|x| x.is_finite()));
    }
}
