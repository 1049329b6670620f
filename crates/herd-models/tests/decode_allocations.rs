//! A warm decode step allocates nothing: the models keep their activation buffers, the kernels
//! their quantized activations and attention scratch, the cache its batch bookkeeping. Counted by
//! a global allocator over every thread (the pool's workers included), on Llama 4 from GGUF
//! (Q4_K_M: quantized kernels, MoE routing) and from safetensors (f32), and on Gemma 3.
//!
//! The measured steps stay inside one cache block: a sequence's block table grows, and a
//! sliding window releases a block, once per block (16 positions); those are the cache's only
//! allocations while decoding.
//!
//! Per-thread scratch (attention scores, quantized activations) grows the first time a thread
//! runs a task that needs more than it holds, and which pool thread claims which task varies
//! from run to run: on a busy machine a worker may sit out the warm-up steps and grow its
//! scratch in the measured ones. So each model is measured up to [`ROUNDS`] times, each on a
//! fresh cache with the same tokens, and must reach a round without allocations; an allocation
//! made by every step (the regression this guards against) fails every round.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use herd_models::{Batch, CausalLm, load_model};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn fixture(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

/// Allocations made by decode steps at positions 23..=31 (inside the cache block 16..32), after
/// a 21-token prompt and two warm-up steps (the sliding layers' first block is released by then).
fn decode_allocations(model: &dyn CausalLm) -> usize {
    let prompt: Vec<u32> = (0..21).map(|i| (i * 7 + 3) % 50).collect();
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
    let mut batch = Batch::new();
    let mut step = |pos: usize, logits: &mut Vec<f32>, batch: &mut Batch| {
        let next = (logits.len() - model.vocab_size()..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap()
            - (logits.len() - model.vocab_size());
        batch.clear();
        batch.push(0, next as u32, pos, true);
        model.forward_into(batch, &mut cache, None, logits).unwrap();
    };
    step(21, &mut logits, &mut batch);
    step(22, &mut logits, &mut batch);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for pos in 23..=31 {
        step(pos, &mut logits, &mut batch);
    }
    assert!(logits.iter().all(|v| v.is_finite()));
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

/// Measurement rounds per model (see the module note).
const ROUNDS: usize = 4;

#[test]
fn warm_decode_steps_allocate_nothing() {
    for rel in [
        "llama4_gguf/tiny-q4_k_m.llama-quantize.gguf",
        "llama4_gguf",
        "llama4/scout_like",
        "gemma3/core",
    ] {
        let path = fixture(rel);
        let model = load_model(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let counts: Vec<usize> = (0..ROUNDS)
            .scan(false, |clean, _| {
                if *clean {
                    return None;
                }
                let n = decode_allocations(model.as_ref());
                *clean = n == 0;
                Some(n)
            })
            .collect();
        assert_eq!(
            counts.last(),
            Some(&0),
            "{rel}: allocations in 9 warm decode steps, per round: {counts:?}"
        );
    }
}
