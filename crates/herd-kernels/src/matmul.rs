//! Products of stored weight matrices with `f32` activation rows.
//!
//! A weight is a borrowed byte slice plus its element type and layout. Two layouts occur in
//! checkpoints: `nn.Linear`'s `[out, in]` (most weights) and input-major `[in, out]` (Llama 4's
//! fused expert tensors). Both are used in place, never transposed or copied at load.
//!
//! Each output element is reduced in the same order whatever the number of rows in the batch,
//! so batching never changes results.

use crate::dtype::{DType, decode_into};
use crate::pool::{self, SharedMut, ThreadPool};
use crate::quant;

/// How a 2-D weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[out_features, in_features]`, row-major (`nn.Linear`): `y = x·Wᵀ`.
    OutMajor,
    /// `[in_features, out_features]`, row-major: `y = x·W`.
    InMajor,
}

/// A borrowed weight matrix.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
    pub in_features: usize,
    pub out_features: usize,
    pub layout: Layout,
}

impl<'a> MatRef<'a> {
    /// A matrix view; `None` if the byte length does not match the shape.
    pub fn new(
        bytes: &'a [u8],
        dtype: DType,
        in_features: usize,
        out_features: usize,
        layout: Layout,
    ) -> Option<Self> {
        (bytes.len() == dtype.bytes_for(in_features * out_features)).then_some(Self {
            bytes,
            dtype,
            in_features,
            out_features,
            layout,
        })
    }

    /// Number of stored rows and their length in elements.
    fn stored_rows(&self) -> (usize, usize) {
        match self.layout {
            Layout::OutMajor => (self.out_features, self.in_features),
            Layout::InMajor => (self.in_features, self.out_features),
        }
    }

    /// Decode stored row `r` into `out` (an embedding lookup when the matrix is `[vocab, hidden]`).
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        let (rows, len) = self.stored_rows();
        assert!(
            r < rows && out.len() == len,
            "decode_row: row {r} of {rows}"
        );
        let row_bytes = self.dtype.bytes_for(len);
        decode_into(
            self.dtype,
            &self.bytes[r * row_bytes..(r + 1) * row_bytes],
            out,
        );
    }
}

/// `out[n_rows, out_features] = x[n_rows, in_features] · W` (W as its layout says), split over
/// the global thread pool by output columns.
pub fn matmul(x: &[f32], n_rows: usize, w: &MatRef<'_>, out: &mut [f32]) {
    matmul_with(pool::global(), x, n_rows, w, out)
}

/// [`matmul`] on a given pool.
pub fn matmul_with(pool: &ThreadPool, x: &[f32], n_rows: usize, w: &MatRef<'_>, out: &mut [f32]) {
    let (k, n) = (w.in_features, w.out_features);
    assert_eq!(x.len(), n_rows * k, "matmul: input shape");
    assert_eq!(out.len(), n_rows * n, "matmul: output shape");
    if n_rows == 0 || n == 0 {
        return;
    }
    let chunk = chunk_size(n, pool.n_threads());
    let n_chunks = n.div_ceil(chunk);
    let shared = SharedMut::new(out);
    match w.layout {
        Layout::OutMajor if w.dtype.is_quantized() => {
            // Quantize each activation row once to the weight type's dot-product partner.
            let at = w.dtype.vec_dot_type();
            let row_bytes = at.bytes_for(k);
            let mut act = vec![0u8; n_rows * row_bytes];
            let act_out = SharedMut::new(&mut act);
            pool.run(n_rows.div_ceil(ACT_ROWS_PER_TASK), |c| {
                for t in c * ACT_ROWS_PER_TASK..((c + 1) * ACT_ROWS_PER_TASK).min(n_rows) {
                    // SAFETY: tasks quantize disjoint rows.
                    let ar = unsafe { act_out.slice(t * row_bytes, row_bytes) };
                    quant::quantize_activation(at, &x[t * k..(t + 1) * k], ar);
                }
            });
            let w_row = w.dtype.bytes_for(k);
            pool.run(n_chunks, |c| {
                let outputs = c * chunk..((c + 1) * chunk).min(n);
                // Weight rows are requested PREFETCH_ROWS ahead of the row being read (into
                // L2): the hardware prefetcher alone leaves the memory bus partly idle here.
                let mut fetched = outputs.start;
                let act_row = |t: usize| &act[t * row_bytes..(t + 1) * row_bytes];
                for o in outputs {
                    let want = (o + PREFETCH_ROWS).min(n);
                    if fetched < want {
                        prefetch(&w.bytes[fetched * w_row..want * w_row]);
                        fetched = want;
                    }
                    // One weight row at a time (each thread reads one sequential stream), its
                    // blocks unpacked once for four activation rows; the rest one by one.
                    let wr = &w.bytes[o * w_row..(o + 1) * w_row];
                    let put = |t: usize, v: f32| {
                        // SAFETY: chunks own disjoint output columns o.
                        unsafe { shared.slice(t * n + o, 1)[0] = v };
                    };
                    let mut t = 0;
                    while t + 4 <= n_rows {
                        let ar = [t, t + 1, t + 2, t + 3].map(act_row);
                        let v = quant::vec_dot_x4(w.dtype, [wr; 4], ar, k);
                        (0..4).for_each(|i| put(t + i, v[i]));
                        t += 4;
                    }
                    for t in t..n_rows {
                        put(t, quant::vec_dot(w.dtype, wr, act_row(t), k));
                    }
                }
            });
        }
        Layout::OutMajor => pool.run(n_chunks, |c| {
            let mut row = vec![0.0f32; k];
            for o in c * chunk..((c + 1) * chunk).min(n) {
                w.decode_row(o, &mut row);
                for t in 0..n_rows {
                    // SAFETY: chunks own disjoint output columns o.
                    unsafe { shared.slice(t * n + o, 1)[0] = dot(&x[t * k..(t + 1) * k], &row) };
                }
            }
        }),
        Layout::InMajor => {
            assert!(
                !w.dtype.is_quantized(),
                "input-major weights must be plain floats"
            );
            pool.run(n_chunks, |c| {
                let cols = c * chunk..((c + 1) * chunk).min(n);
                let width = cols.len();
                let elem = w.dtype.bytes_for(1);
                let mut row = vec![0.0f32; width];
                for t in 0..n_rows {
                    // SAFETY: chunks own disjoint output column ranges.
                    unsafe { shared.slice(t * n + cols.start, width).fill(0.0) };
                }
                for i in 0..k {
                    let start = (i * n + cols.start) * elem;
                    decode_into(w.dtype, &w.bytes[start..start + width * elem], &mut row);
                    for t in 0..n_rows {
                        // SAFETY: as above.
                        let o = unsafe { shared.slice(t * n + cols.start, width) };
                        axpy(x[t * k + i], &row, o);
                    }
                }
            });
        }
    }
}

/// Activation rows quantized per pool task (a batch's rows are quantized in parallel).
const ACT_ROWS_PER_TASK: usize = 16;

/// How many weight rows ahead of the current one the quantized product asks for.
const PREFETCH_ROWS: usize = 16;

/// Ask the CPU to start loading `bytes` into its L2 cache (a hint; never faults).
#[inline]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes.len()).step_by(64) {
        let p = bytes.as_ptr().wrapping_add(off) as *const i8;
        // SAFETY: prefetch is a hint on an in-bounds address; it reads nothing architecturally.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p) };
    }
}

/// Output columns per task: a few tasks per thread for balance, at least 16 columns each.
fn chunk_size(n: usize, threads: usize) -> usize {
    n.div_ceil(threads * 4).max(16)
}

/// Sequential dot product (the reference reduction order).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |s, (x, y)| s + x * y)
}

/// `y += a·x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn both_layouts_compute_the_same_product() {
        // W as [out=3, in=2] and its transpose as [in=2, out=3].
        let w_out = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w_in = [1.0, 3.0, 5.0, 2.0, 4.0, 6.0];
        let x = [1.0, -1.0, 0.5, 2.0];
        let (b_out, b_in) = (bytes(&w_out), bytes(&w_in));
        let a = MatRef::new(&b_out, DType::F32, 2, 3, Layout::OutMajor).unwrap();
        let b = MatRef::new(&b_in, DType::F32, 2, 3, Layout::InMajor).unwrap();
        let (mut ya, mut yb) = ([0.0; 6], [0.0; 6]);
        matmul(&x, 2, &a, &mut ya);
        matmul(&x, 2, &b, &mut yb);
        assert_eq!(ya, [-1.0, -1.0, -1.0, 4.5, 9.5, 14.5]);
        assert_eq!(ya, yb);
    }

    #[test]
    fn rejects_wrong_byte_length() {
        assert!(MatRef::new(&[0u8; 7], DType::F32, 1, 2, Layout::OutMajor).is_none());
    }
}

#[cfg(test)]
mod quantized_tests {
    use super::*;
    use crate::testing::rand_vec;

    /// Quantized matmul equals per-element scalar dot products, for any thread count and any
    /// batch size (each output is computed the same way whatever else is in the batch).
    #[test]
    fn quantized_matmul_is_thread_and_batch_invariant() {
        let (k, n) = (512, 37);
        for wt in [DType::Q8_0, DType::Q4_0, DType::Q4K, DType::Q6K, DType::Q5K] {
            let wf = rand_vec(k * n, 3, 1.0);
            let mut wq = vec![0u8; wt.bytes_for(k * n)];
            quant::quantize(wt, &wf, &mut wq);
            let w = MatRef::new(&wq, wt, k, n, Layout::OutMajor).unwrap();
            let x = rand_vec(3 * k, 4, 1.0);
            let mut one = vec![0.0; 3 * n];
            matmul_with(&ThreadPool::new(1), &x, 3, &w, &mut one);
            let mut three = vec![0.0; 3 * n];
            matmul_with(&ThreadPool::new(3), &x, 3, &w, &mut three);
            assert_eq!(one, three, "{wt}: thread count changed results");
            let mut single = vec![0.0; n];
            matmul_with(&ThreadPool::new(2), &x[k..2 * k], 1, &w, &mut single);
            assert_eq!(&one[n..2 * n], &single[..], "{wt}: batch changed results");
        }
    }
}
