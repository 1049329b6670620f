//! The AVX2 + FMA + F16C forms of the attention kernels, chosen at run time
//! ([`crate::quant::has_avx2`]); each returns the bits of its reference in `scalar.rs`.

use std::arch::x86_64::*;

use super::scalar::{self, CHUNK};
use super::{BF16, F16, F32, LANES, SUM_BLOCK};
use crate::DType;

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn at(p: &[f32], i: usize) -> __m256 {
    debug_assert!(i + LANES <= p.len());
    // SAFETY: callers keep i + 8 within p; unaligned load.
    unsafe { _mm256_loadu_ps(p.as_ptr().add(i)) }
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp_weights(
    x: &[f32],
    max: f32,
    scale: f32,
    out: &mut [f32],
    at_least: f32,
    above: &mut Vec<u32>,
) -> f64 {
    let whole = x.len() / LANES * LANES;
    let (m, s) = (_mm256_set1_ps(max), _mm256_set1_ps(scale));
    let (ninf, floor) = (_mm256_set1_ps(f32::NEG_INFINITY), _mm256_set1_ps(at_least));
    let mut lanes = _mm256_setzero_pd();
    // Per block of groups: the f32 sums, and the candidates' bit masks, turned into
    // indices after the block so that the arithmetic loop makes no calls.
    let mut masks = [0u8; SUM_BLOCK];
    let mut hits = [0u32; SUM_BLOCK * LANES];
    // One group of eight: weights stored, candidates' mask kept, f32 sum returned.
    let group = |i: usize, acc: __m256, mask: &mut u8, out: &mut [f32]| {
        // SAFETY: callers keep i + 8 <= x.len() = out.len(); AVX2 and FMA are enabled in
        // this function (and so in the closure).
        unsafe {
            let v = at(x, i);
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
            let arg = _mm256_blendv_ps(_mm256_mul_ps(_mm256_sub_ps(v, m), s), ninf, nan);
            let e = exp8_m256(arg);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), e);
            *mask = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(e, floor)) as u8;
            _mm256_add_ps(acc, e)
        }
    };
    for start in (0..whole).step_by(SUM_BLOCK * LANES) {
        let n = (whole - start).min(SUM_BLOCK * LANES) / LANES;
        // Even groups into one sum, odd into the other.
        let mut acc = [_mm256_setzero_ps(); 2];
        for g in (0..n).step_by(2) {
            acc[0] = group(start + g * LANES, acc[0], &mut masks[g], out);
            if g + 1 < n {
                acc[1] = group(start + (g + 1) * LANES, acc[1], &mut masks[g + 1], out);
            }
        }
        let b = _mm256_add_ps(acc[0], acc[1]);
        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(b));
        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(b));
        lanes = _mm256_add_pd(lanes, _mm256_add_pd(lo, hi));
        let mut found = 0;
        for (g, &mask) in masks[..n].iter().enumerate() {
            let mut bits = u32::from(mask);
            while bits != 0 {
                hits[found] = (start + g * LANES) as u32 + bits.trailing_zeros();
                found += 1;
                bits &= bits - 1;
            }
        }
        above.extend_from_slice(&hits[..found]);
    }
    let mut l = [0.0f64; 4];
    // SAFETY: l holds four values.
    unsafe { _mm256_storeu_pd(l.as_mut_ptr(), lanes) };
    scalar::exp_weights_tail(x, whole, max, scale, out, l, at_least, above)
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp8(x: [f32; LANES]) -> [f32; LANES] {
    // SAFETY: x holds eight values.
    let e = exp8_m256(unsafe { _mm256_loadu_ps(x.as_ptr()) });
    let mut out = [0.0f32; LANES];
    // SAFETY: out holds eight values.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), e) };
    out
}

/// `ggml_v_expf` of eight values in a register.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8_m256(x: __m256) -> __m256 {
    let set = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
    let r = set(0x4b40_0000);
    let z = _mm256_fmadd_ps(x, set(0x3fb8_aa3b), r);
    let n = _mm256_sub_ps(z, r);
    let b = _mm256_fnmadd_ps(
        n,
        set(0x35bf_be8e),
        _mm256_fnmadd_ps(n, set(0x3f31_7200), x),
    );
    let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
    let k = _mm256_castsi256_ps(_mm256_add_epi32(
        e,
        _mm256_castps_si256(_mm256_set1_ps(1.0)),
    ));
    let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    let c = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0)));
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(set(0x3c07_2010), b, set(0x3d2b_9f17)),
            u,
            _mm256_fmadd_ps(set(0x3e2a_af33), b, set(0x3eff_fedb)),
        ),
        u,
        _mm256_mul_ps(set(0x3f7f_fff6), b),
    );
    if _mm256_movemask_ps(_mm256_castsi256_ps(c)) == 0 {
        _mm256_fmadd_ps(j, k, k)
    } else {
        let g = _mm256_and_si256(
            _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
            _mm256_set1_epi32(0x8200_0000u32 as i32),
        );
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let d = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0)));
        let (c, d) = (_mm256_castsi256_ps(c), _mm256_castsi256_ps(d));
        _mm256_or_ps(
            _mm256_and_ps(d, _mm256_mul_ps(s1, s1)),
            _mm256_andnot_ps(
                d,
                _mm256_or_ps(
                    _mm256_and_ps(c, _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
                    _mm256_andnot_ps(c, _mm256_fmadd_ps(k, j, k)),
                ),
            ),
        )
    }
}

/// Eight elements `e..e + 8` (`e` a multiple of 8) of a cached row of type `T`, widened exactly
/// to f32.
///
/// # Safety
/// The row must hold them (the callers check `row.len() ≥ ty.bytes_for(d)` with `e + 8 ≤ d`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const T: u8>(row: &[u8], e: usize) -> __m256 {
    // SAFETY: the row holds elements e..e + 8 (caller); every load below stays inside it,
    // unaligned.
    unsafe {
        match T {
            F32 => _mm256_loadu_ps(row.as_ptr().add(4 * e).cast()),
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * e).cast())),
            BF16 => {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(row.as_ptr().add(2 * e).cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            }
            _ => {
                let b = row.as_ptr().add(e / 32 * 34);
                let d = _mm256_cvtph_ps(_mm_set1_epi16(std::ptr::read_unaligned(b.cast::<i16>())));
                let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(2 + e % 32).cast()));
                _mm256_mul_ps(_mm256_cvtepi32_ps(q), d)
            }
        }
    }
}

/// [`super::hsum8`] of a register: halves added, then pairs, then the two.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum8_m256(s: __m256) -> f32 {
    let t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let u = _mm_add_ps(t, _mm_movehl_ps(t, t));
    _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps::<1>(u, u)))
}

/// Query heads per step of [`kv_scores`] (four registers each: eight accumulators, the key's
/// four groups of eight in registers).
const SCORE_HEADS: usize = 2;

/// Query heads per step of [`kv_weighted_sum`] (two groups of eight outputs each: eight
/// accumulators, leaving registers for the operands).
const SUM_HEADS: usize = 4;

/// [`super::kv_scores`]: each key's chunk of 32 elements loaded once for `H` heads.
///
/// # Safety
/// AVX2, FMA and F16C must be present; every key holds `ty.bytes_for(d)` bytes; `q` is whole
/// heads of `d` and `out` holds `heads · keys.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn kv_scores(
    ty: DType,
    d: usize,
    q: &[f32],
    keys: &[&[u8]],
    scale: f32,
    out: &mut [f32],
) {
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
#[target_feature(enable = "avx2,fma,f16c")]
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
    for (j, k) in keys.iter().enumerate() {
        let mut acc = [[_mm256_setzero_ps(); 4]; H];
        for c in (0..whole).step_by(CHUNK) {
            // SAFETY: c + 32 <= d: inside every key (caller) and every head of q.
            unsafe {
                let kc: [__m256; 4] = std::array::from_fn(|r| load8::<T>(k, c + LANES * r));
                for (h, acc) in acc.iter_mut().enumerate() {
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(at(qh(h), c + LANES * r), kc[r], *acc);
                    }
                }
            }
        }
        for (h, r) in acc.iter().enumerate() {
            let s = _mm256_add_ps(_mm256_add_ps(r[0], r[1]), _mm256_add_ps(r[2], r[3]));
            out[(h0 + h) * n + j] = scalar::dot_tail(ty, qh(h), k, whole, hsum8_m256(s)) * scale;
        }
    }
}

/// [`super::kv_weighted_sum`]: `H` heads' outputs, sixteen elements at a time, held in
/// registers while every value row of the tile passes (each group of eight loaded once for
/// all heads).
///
/// # Safety
/// AVX2, FMA and F16C must be present; every value row holds `ty.bytes_for(d)` bytes; `acc` is
/// whole heads of `d` and `weights` holds `heads · values.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
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

/// Heads `h0..h0 + H` of [`kv_weighted_sum`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_heads<const T: u8, const H: usize>(
    ty: DType,
    d: usize,
    weights: &[f32],
    values: &[&[u8]],
    acc: &mut [f32],
    h0: usize,
) {
    let n = values.len();
    let whole = d / LANES * LANES;
    let w = |h: usize, j: usize| _mm256_set1_ps(weights[(h0 + h) * n + j]);
    let ptr = acc.as_mut_ptr();
    let mut e = 0;
    while e + 2 * LANES <= whole {
        // SAFETY: e + 16 <= d: inside every head of acc and (caller) every value row.
        unsafe {
            let mut r: [[__m256; 2]; H] = std::array::from_fn(|h| {
                let p = ptr.add((h0 + h) * d + e);
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(LANES))]
            });
            for (j, v) in values.iter().enumerate() {
                let (a, b) = (load8::<T>(v, e), load8::<T>(v, e + LANES));
                for (h, r) in r.iter_mut().enumerate() {
                    let p = w(h, j);
                    r[0] = _mm256_fmadd_ps(p, a, r[0]);
                    r[1] = _mm256_fmadd_ps(p, b, r[1]);
                }
            }
            for (h, r) in r.iter().enumerate() {
                let p = ptr.add((h0 + h) * d + e);
                _mm256_storeu_ps(p, r[0]);
                _mm256_storeu_ps(p.add(LANES), r[1]);
            }
        }
        e += 2 * LANES;
    }
    if e < whole {
        // SAFETY: e + 8 <= d, as above.
        unsafe {
            let mut r: [__m256; H] =
                std::array::from_fn(|h| _mm256_loadu_ps(ptr.add((h0 + h) * d + e)));
            for (j, v) in values.iter().enumerate() {
                let a = load8::<T>(v, e);
                for (h, r) in r.iter_mut().enumerate() {
                    *r = _mm256_fmadd_ps(w(h, j), a, *r);
                }
            }
            for (h, r) in r.iter().enumerate() {
                _mm256_storeu_ps(ptr.add((h0 + h) * d + e), *r);
            }
        }
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

/// [`super::exp_sub_sum`].
///
/// # Safety
/// AVX2 and FMA must be present.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
    let whole = x.len() / LANES * LANES;
    let m = _mm256_set1_ps(max);
    let mut lanes = _mm256_setzero_ps();
    for i in (0..whole).step_by(LANES) {
        // SAFETY: i + 8 <= whole <= x.len().
        unsafe {
            let e = exp8_m256(_mm256_sub_ps(at(x, i), m));
            _mm256_storeu_ps(x.as_mut_ptr().add(i), e);
            lanes = _mm256_add_ps(lanes, e);
        }
    }
    let mut sum = hsum8_m256(lanes);
    for v in &mut x[whole..] {
        *v = scalar::expf_ggml(*v - max);
        sum += *v;
    }
    sum
}
