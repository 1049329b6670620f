//! The scalar reference of the float products' dot product.

use crate::attention::hsum8;

/// [`super::dot`]'s order on slices of equal length: element `i` into lane `i % 8` (whole
/// groups of eight; multiply, then add), the lanes as [`hsum8`], then the leftovers in order.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a, b) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (a.remainder(), b.remainder());
    let mut l = [0.0f32; 8];
    for (x, y) in a.zip(b) {
        for i in 0..8 {
            l[i] += x[i] * y[i];
        }
    }
    let mut s = hsum8(&l);
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}
