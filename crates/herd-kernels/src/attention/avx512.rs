//! The AVX-512 forms of the attention kernels (chosen at run time where the CPU has AVX-512 F,
//! [`crate::quant::has_avx512f`]); each returns the bits of its reference in `scalar.rs`.
//!
//! A 512-bit register holds two of the reference's eight-lane registers side by side, so
//! [`kv_scores`] keeps each (head, key) pair's four registers in two (`[r0 | r1]` and
//! `[r2 | r3]`: sixteen consecutive elements each) and adds them in the reference's order two
//! pairs at a time, and [`kv_weighted_sum`] moves sixteen outputs per instruction.

use std::arch::x86_64::*;

use super::scalar::{self, CHUNK};
use super::{BF16, F16, F32};
use crate::DType;

/// Sixteen elements `e..e + 16` (`e` a multiple of 16) of a cached row of type `T`, widened
/// exactly to f32 (Q8_0: `d·q`, the reference's product).
///
/// # Safety
/// The row must hold them (the callers check `row.len() ≥ ty.bytes_for(d)` with `e + 16 ≤ d`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn load16<const T: u8>(row: &[u8], e: usize) -> __m512 {
    // SAFETY: the row holds elements e..e + 16 (caller); every load below stays inside it
    // (Q8_0: e % 32 is 0 or 16, so bytes 2 + e % 32.. + 16 of the 34-byte block), unaligned.
    unsafe {
        match T {
            F32 => _mm512_loadu_ps(row.as_ptr().add(4 * e).cast()),
            F16 => _mm512_cvtph_ps(_mm256_loadu_si256(row.as_ptr().add(2 * e).cast())),
            BF16 => {
                let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(row.as_ptr().add(2 * e).cast()));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
            }
            _ => {
                let b = row.as_ptr().add(e / 32 * 34);
                let d =
                    _mm512_cvtph_ps(_mm256_set1_epi16(std::ptr::read_unaligned(b.cast::<i16>())));
                let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2 + e % 32).cast()));
                _mm512_mul_ps(_mm512_cvtepi32_ps(q), d)
            }
        }
    }
}

/// Two (head, key) pairs' dot products before their leftovers, in the reference's order:
/// `a[p]` holds pair `p`'s registers `[r0 | r1]`, `b[p]` its `[r2 | r3]`; each pair's
/// `(r0 + r1) + (r2 + r3)`, its lanes added as [`super::hsum8`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
fn hsum_pairs(a: [__m512; 2], b: [__m512; 2]) -> [f32; 2] {
    // [pair 0's low half | pair 1's low half] + [their high halves]: r0 + r1 of both pairs.
    let s01 = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x44>(a[0], a[1]),
        _mm512_shuffle_f32x4::<0xEE>(a[0], a[1]),
    );
    let s23 = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x44>(b[0], b[1]),
        _mm512_shuffle_f32x4::<0xEE>(b[0], b[1]),
    );
    let s = _mm512_add_ps(s01, s23);
    // Per eight lanes l: (l0 + l4, …, l3 + l7), then (t0 + t2, t1 + t3), then their sum.
    let t = _mm512_add_ps(s, _mm512_shuffle_f32x4::<0xB1>(s, s));
    let u = _mm512_add_ps(t, _mm512_permute_ps::<0xEE>(t));
    let v = _mm512_add_ps(u, _mm512_permute_ps::<0x01>(u));
    [
        _mm512_cvtss_f32(v),
        _mm_cvtss_f32(_mm512_extractf32x4_ps::<2>(v)),
    ]
}

/// Query heads per step of [`kv_scores`]: two heads by two keys is eight accumulators.
const SCORE_HEADS: usize = 2;

/// Query heads per step of [`kv_weighted_sum`]: four heads by 64 outputs is sixteen
/// accumulators.
const SUM_HEADS: usize = 4;

/// [`super::kv_scores`]: two keys at a time, each key's sixteen elements loaded once for `H`
/// heads. Heads of fewer than 32 elements (no whole chunk) go to the AVX2 form.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F must be present; every key holds `ty.bytes_for(d)` bytes; `q`
/// is whole heads of `d` and `out` holds `heads · keys.len()`.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub(super) unsafe fn kv_scores(
    ty: DType,
    d: usize,
    q: &[f32],
    keys: &[&[u8]],
    scale: f32,
    out: &mut [f32],
) {
    if d < CHUNK {
        // SAFETY: forwarded from this function's contract.
        return unsafe { super::avx2::kv_scores(ty, d, q, keys, scale, out) };
    }
    let heads = q.len() / d;
    // SAFETY: forwarded from this function's contract.
    unsafe {
        for_head_blocks!(ty, heads, scores_heads, SCORE_HEADS, [1], |h0| (
            ty, d, q, h0, keys, scale, out
        ))
    }
}

/// Heads `h0..h0 + H` of [`kv_scores`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn scores_heads<const T: u8, const H: usize>(
    ty: DType,
    d: usize,
    q: &[f32],
    h0: usize,
    keys: &[&[u8]],
    scale: f32,
    out: &mut [f32],
) {
    let n = keys.len();
    let whole = d / CHUNK * CHUNK;
    let qh = |h: usize| &q[(h0 + h) * d..(h0 + h + 1) * d];
    for j in (0..n).step_by(2) {
        // An odd last key is computed twice (as both pairs) and stored once.
        let pair = [keys[j], keys[(j + 1).min(n - 1)]];
        let zero = _mm512_setzero_ps();
        let (mut a, mut b) = ([[zero; 2]; H], [[zero; 2]; H]);
        for c in (0..whole).step_by(CHUNK) {
            // SAFETY: c + 32 <= d: inside every key (caller) and every head of q; unaligned.
            unsafe {
                let ka = pair.map(|k| load16::<T>(k, c));
                let kb = pair.map(|k| load16::<T>(k, c + 16));
                for h in 0..H {
                    let qa = _mm512_loadu_ps(qh(h).as_ptr().add(c));
                    let qb = _mm512_loadu_ps(qh(h).as_ptr().add(c + 16));
                    for p in 0..2 {
                        a[h][p] = _mm512_fmadd_ps(qa, ka[p], a[h][p]);
                        b[h][p] = _mm512_fmadd_ps(qb, kb[p], b[h][p]);
                    }
                }
            }
        }
        for h in 0..H {
            let s = hsum_pairs(a[h], b[h]);
            for (p, &sum) in s.iter().enumerate().take(n - j) {
                out[(h0 + h) * n + j + p] =
                    scalar::dot_tail(ty, qh(h), pair[p], whole, sum) * scale;
            }
        }
    }
}

/// [`super::kv_weighted_sum`]: `H` heads' outputs, 64 elements at a time (then 16), held in
/// registers while every value row of the tile passes, each value's sixteen elements loaded
/// once for all heads; the leftovers past the last sixteen by the reference.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F must be present; every value row holds `ty.bytes_for(d)`
/// bytes; `acc` is whole heads of `d` and `weights` holds `heads · values.len()`.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub(super) unsafe fn kv_weighted_sum(
    ty: DType,
    d: usize,
    weights: &[f32],
    values: &[&[u8]],
    acc: &mut [f32],
) {
    let heads = acc.len() / d;
    // SAFETY: forwarded from this function's contract.
    unsafe {
        for_head_blocks!(ty, heads, weighted_sum_heads, SUM_HEADS, [1, 2, 3], |h0| (
            ty, d, weights, values, acc, h0
        ))
    }
}

/// Elements `e..e + 16·R` of heads `h0..h0 + H` of [`kv_weighted_sum`], in registers across
/// the values.
///
/// # Safety
/// As [`kv_weighted_sum`], with `e + 16·R ≤ d`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn weighted_sum_run<const T: u8, const H: usize, const R: usize>(
    d: usize,
    weights: &[f32],
    values: &[&[u8]],
    acc: &mut [f32],
    h0: usize,
    e: usize,
) {
    let n = values.len();
    let ptr = acc.as_mut_ptr();
    // SAFETY: e + 16·R <= d: inside every head of acc and (caller) every value row;
    // unaligned loads and stores.
    unsafe {
        let mut r: [[__m512; R]; H] = std::array::from_fn(|h| {
            std::array::from_fn(|i| _mm512_loadu_ps(ptr.add((h0 + h) * d + e + 16 * i)))
        });
        for (j, v) in values.iter().enumerate() {
            let x: [__m512; R] = std::array::from_fn(|i| load16::<T>(v, e + 16 * i));
            for (h, r) in r.iter_mut().enumerate() {
                let p = _mm512_set1_ps(weights[(h0 + h) * n + j]);
                for (r, x) in r.iter_mut().zip(&x) {
                    *r = _mm512_fmadd_ps(p, *x, *r);
                }
            }
        }
        for (h, r) in r.iter().enumerate() {
            for (i, r) in r.iter().enumerate() {
                _mm512_storeu_ps(ptr.add((h0 + h) * d + e + 16 * i), *r);
            }
        }
    }
}

/// Heads `h0..h0 + H` of [`kv_weighted_sum`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn weighted_sum_heads<const T: u8, const H: usize>(
    ty: DType,
    d: usize,
    weights: &[f32],
    values: &[&[u8]],
    acc: &mut [f32],
    h0: usize,
) {
    let n = values.len();
    let whole = d / 16 * 16;
    let mut e = 0;
    while e + 64 <= whole {
        // SAFETY: e + 64 <= whole <= d, as weighted_sum_run asks; the rest is forwarded from
        // this function's contract.
        unsafe { weighted_sum_run::<T, H, 4>(d, weights, values, acc, h0, e) };
        e += 64;
    }
    while e + 16 <= whole {
        // SAFETY: e + 16 <= whole <= d, as above.
        unsafe { weighted_sum_run::<T, H, 1>(d, weights, values, acc, h0, e) };
        e += 16;
    }
    if whole < d {
        for (j, v) in values.iter().enumerate() {
            for h in 0..H {
                let head = (h0 + h) * d..(h0 + h + 1) * d;
                scalar::axpy_tail(ty, &mut acc[head], weights[(h0 + h) * n + j], v, whole);
            }
        }
    }
}
