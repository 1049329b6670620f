//! The AVX forms of the float products' helpers, chosen at run time; [`dot`] returns the bits
//! of its reference in `scalar.rs`.

use std::arch::x86_64::*;

/// [`super::dot`] for slices of equal length: multiply and add (never fused, like the scalar
/// reference), the register folded in halves as [`crate::attention::hsum8`].
///
/// # Safety
/// AVX must be present; `a` and `b` have the same length.
#[target_feature(enable = "avx")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let whole = a.len() / 8 * 8;
    let mut l = _mm256_setzero_ps();
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= whole <= len of both slices (the caller passes equal lengths).
        let (x, y) = unsafe {
            (
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
            )
        };
        l = _mm256_add_ps(l, _mm256_mul_ps(x, y));
    }
    let h = _mm_add_ps(_mm256_castps256_ps128(l), _mm256_extractf128_ps::<1>(l));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let mut s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        s += x * y;
    }
    s
}

/// Ask the CPU to start loading `bytes` into its L2 cache, one request per 64-byte line (a hint:
/// SSE's prefetch, present on every x86-64; it never faults).
#[inline]
pub(super) fn prefetch_l2(bytes: &[u8]) {
    for off in (0..bytes.len()).step_by(64) {
        let p = bytes.as_ptr().wrapping_add(off) as *const i8;
        // SAFETY: prefetch is a hint on an in-bounds address; it reads nothing architecturally.
        unsafe { _mm_prefetch::<{ _MM_HINT_T1 }>(p) };
    }
}
