//! Products of stored weight matrices with `f32` activation rows.
//!
//! A weight is a borrowed byte slice plus its element type and layout. Two layouts occur in
//! checkpoints: `nn.Linear`'s `[out, in]` (most weights) and input-major `[in, out]` (Llama 4's
//! fused expert tensors). Both are used in place, never transposed or copied at load.
//!
//! Each output element is reduced in the same order whatever the number of rows in the batch,
//! so batching never changes results.

use crate::dtype::{DType, decode_into};

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

/// `out[n_rows, out_features] = x[n_rows, in_features] · W` (W as its layout says).
pub fn matmul(x: &[f32], n_rows: usize, w: &MatRef<'_>, out: &mut [f32]) {
    let (k, n) = (w.in_features, w.out_features);
    assert_eq!(x.len(), n_rows * k, "matmul: input shape");
    assert_eq!(out.len(), n_rows * n, "matmul: output shape");
    match w.layout {
        Layout::OutMajor => {
            let mut row = vec![0.0f32; k];
            for o in 0..n {
                w.decode_row(o, &mut row);
                for t in 0..n_rows {
                    out[t * n + o] = dot(&x[t * k..(t + 1) * k], &row);
                }
            }
        }
        Layout::InMajor => {
            out.fill(0.0);
            let mut row = vec![0.0f32; n];
            for i in 0..k {
                w.decode_row(i, &mut row);
                for t in 0..n_rows {
                    axpy(x[t * k + i], &row, &mut out[t * n..(t + 1) * n]);
                }
            }
        }
    }
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
