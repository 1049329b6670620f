//! The per-row passes of a layer (norms, residual adds, activations) split over the global
//! thread pool by whole rows ([`herd_kernels::pool::ThreadPool::for_row_runs`]).
//!
//! A prefill step's batch is hundreds of rows: run on the calling thread alone, these passes
//! leave the pool's other cores idle between two products (about a sixth of a Scout-shaped
//! pp512 on two cores). Every row's arithmetic is what the one-thread loop did, in the same
//! order, so the results do not depend on the thread count or on how the rows are cut; a
//! decode step's few rows make one run on the calling thread.

use herd_kernels::ops::{rms_norm, silu};
use herd_kernels::pool;

use crate::weights::set_len;

/// `out ← rms_norm(x)` by rows of `weight.len()` (`x`, `out`: `[rows, hidden]`; `out` is
/// resized to `x`'s length).
pub(crate) fn norm_into(x: &[f32], out: &mut Vec<f32>, weight: &[f32], eps: f32) {
    let h = weight.len();
    // Every value is written below.
    set_len(out, x.len());
    pool::global().for_row_runs(out, h, |first, rows| {
        rows.copy_from_slice(&x[first * h..first * h + rows.len()]);
        rms_norm(rows, weight, eps);
    });
}

/// `x ← rms_norm(x)` in place, by rows of `weight.len()`.
pub(crate) fn norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    pool::global().for_row_runs(x, weight.len(), |_, rows| rms_norm(rows, weight, eps));
}

/// `acc ← acc + y` (the residual stream; both `[rows, row_len]`).
///
/// # Panics
/// If the lengths differ.
pub(crate) fn add_into(acc: &mut [f32], y: &[f32], row_len: usize) {
    assert_eq!(acc.len(), y.len(), "add_into: lengths");
    pool::global().for_row_runs(acc, row_len, |first, rows| {
        let y = &y[first * row_len..first * row_len + rows.len()];
        rows.iter_mut().zip(y).for_each(|(a, b)| *a += b);
    });
}

/// `up ← act(gate) ⊙ up`, element by element (a gated feed-forward's gating, GeGLU's or
/// SwiGLU's; both `[rows, width]`).
///
/// # Panics
/// If the lengths differ.
pub(crate) fn gate_mul_into(
    up: &mut [f32],
    gate: &[f32],
    width: usize,
    act: impl Fn(f32) -> f32 + Sync,
) {
    assert_eq!(up.len(), gate.len(), "gate_mul_into: lengths");
    pool::global().for_row_runs(up, width, |first, rows| {
        let gate = &gate[first * width..first * width + rows.len()];
        rows.iter_mut().zip(gate).for_each(|(u, g)| *u *= act(*g));
    });
}

/// SwiGLU's gating: [`gate_mul_into`] with `silu`.
pub(crate) fn silu_mul_into(up: &mut [f32], gate: &[f32], width: usize) {
    gate_mul_into(up, gate, width, silu);
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_kernels::testing::rand_vec;

    /// Each pass equals its one-thread loop bit for bit, on a batch big enough to be split
    /// over the pool and on one row.
    #[test]
    fn passes_equal_the_one_thread_loops() {
        let h = 2048;
        for rows in [1, 300] {
            let x = rand_vec(rows * h, 1, 3.0);
            let y = rand_vec(rows * h, 2, 3.0);
            let weight = rand_vec(h, 3, 1.0);

            let mut want = x.clone();
            rms_norm(&mut want, &weight, 1e-5);
            let mut got = vec![f32::NAN; 7];
            norm_into(&x, &mut got, &weight, 1e-5);
            assert_eq!(bits(&got), bits(&want), "norm_into, {rows} rows");
            let mut got = x.clone();
            norm_in_place(&mut got, &weight, 1e-5);
            assert_eq!(bits(&got), bits(&want), "norm_in_place, {rows} rows");

            let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
            let mut got = x.clone();
            add_into(&mut got, &y, h);
            assert_eq!(bits(&got), bits(&want), "add_into, {rows} rows");

            let want: Vec<f32> = x.iter().zip(&y).map(|(u, g)| u * silu(*g)).collect();
            let mut got = x.clone();
            silu_mul_into(&mut got, &y, h);
            assert_eq!(bits(&got), bits(&want), "silu_mul_into, {rows} rows");
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
