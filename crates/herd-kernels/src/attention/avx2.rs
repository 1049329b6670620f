//! The AVX2 + FMA + F16C forms of the attention kernels, chosen at run time
//! ([`crate::quant::has_avx2`]); each returns the bits of its reference in `scalar.rs`.

use std::arch::x86_64::*;

use super::scalar::{self, CHUNK};
use super::{LANES, SUM_BLOCK};
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

/// Eight elements `32·c + 8·j ..` of a cached row of type `ty`, widened exactly to f32.
///
/// # Safety
/// The row must hold chunk `c` (the callers check `row.len() ≥ ty.bytes_for(32·(c + 1))`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8(ty: DType, row: &[u8], c: usize, j: usize) -> __m256 {
    let e = c * CHUNK + LANES * j;
    // SAFETY: the row holds chunk c (caller); every load below stays inside it, unaligned.
    unsafe {
        match ty {
            DType::F32 => _mm256_loadu_ps(row.as_ptr().add(4 * e).cast()),
            DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * e).cast())),
            DType::BF16 => {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(row.as_ptr().add(2 * e).cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            }
            DType::Q8_0 => {
                let b = row.as_ptr().add(c * 34);
                let d = half::f16::from_le_bytes([*b, *b.add(1)]).to_f32();
                let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(2 + LANES * j).cast()));
                _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(d))
            }
            _ => unreachable!("KV type checked by the caller"),
        }
    }
}

/// [`super::kv_dot`].
///
/// # Safety
/// AVX2, FMA and F16C must be present; `k` holds `ty.bytes_for(q.len())` bytes at least.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn kv_dot(ty: DType, q: &[f32], k: &[u8]) -> f32 {
    let chunks = q.len() / CHUNK;
    let mut r = [_mm256_setzero_ps(); 4];
    for c in 0..chunks {
        for (j, rj) in r.iter_mut().enumerate() {
            // SAFETY: chunk c lies within q and (caller) within k.
            *rj = unsafe { _mm256_fmadd_ps(at(q, c * CHUNK + LANES * j), load8(ty, k, c, j), *rj) };
        }
    }
    let s = _mm256_add_ps(_mm256_add_ps(r[0], r[1]), _mm256_add_ps(r[2], r[3]));
    scalar::dot_tail(ty, q, k, chunks * CHUNK, hsum8_m256(s))
}

/// [`super::hsum8`] of a register: halves added, then pairs, then the two.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum8_m256(s: __m256) -> f32 {
    let t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let u = _mm_add_ps(t, _mm_movehl_ps(t, t));
    _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps::<1>(u, u)))
}

/// [`super::kv_axpy`].
///
/// # Safety
/// AVX2, FMA and F16C must be present; `v` holds `ty.bytes_for(acc.len())` bytes at least.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn kv_axpy(ty: DType, acc: &mut [f32], p: f32, v: &[u8]) {
    let chunks = acc.len() / CHUNK;
    let pv = _mm256_set1_ps(p);
    for c in 0..chunks {
        for j in 0..4 {
            let i = c * CHUNK + LANES * j;
            // SAFETY: chunk c lies within acc and (caller) within v.
            unsafe {
                let a = _mm256_fmadd_ps(pv, load8(ty, v, c, j), at(acc, i));
                _mm256_storeu_ps(acc.as_mut_ptr().add(i), a);
            }
        }
    }
    scalar::axpy_tail(ty, acc, p, v, chunks * CHUNK);
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
