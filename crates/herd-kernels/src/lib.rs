//! Numbers only: element types, the CPU kernels the forward passes are built from, and (later)
//! quantized block formats and the thread pool.
//!
//! This crate does no I/O and knows nothing about models or files: callers hand it byte slices
//! with a [`DType`] and plain `f32` activations. Every kernel has a plain scalar form; faster
//! variants (SIMD, integer dot products) must agree with it and are chosen at run time.

pub mod attention;
pub mod dtype;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod quant;
pub mod rng;

pub use dtype::DType;
pub use matmul::{Layout, MatRef};

/// Deterministic pseudo-random data for tests and benchmarks (no dependency, same on every
/// platform).
#[doc(hidden)]
pub mod testing {
    /// `n` values uniform in `[-scale, scale)` from an LCG seeded with `seed`.
    pub fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0) * scale
            })
            .collect()
    }
}
