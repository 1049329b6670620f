//! Numbers only: element types, the CPU kernels the forward passes are built from, and (later)
//! quantized block formats and the thread pool.
//!
//! This crate does no I/O and knows nothing about models or files: callers hand it byte slices
//! with a [`DType`] and plain `f32` activations. Every kernel has a plain scalar form; faster
//! variants (SIMD, integer dot products) must agree with it and are chosen at run time.

pub mod dtype;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod quant;

pub use dtype::DType;
pub use matmul::{Layout, MatRef};
