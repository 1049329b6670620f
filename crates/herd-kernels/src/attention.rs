//! The f32 arithmetic of attention over cached keys and values, one order for every row
//! whatever the batch (so batching, prompt splitting and cached prefixes never change a result);
//! the orders are ggml's CPU ones (0c1e57098, AVX2 + FMA), which cost nothing here:
//!
//! - Scores are `ggml_vec_dot_f32`'s ([`dot_f32`]): four registers of eight lanes over each 32
//!   elements, element `i` into register `(i % 32) / 8`, lane `i % 8`, by fused multiply-add;
//!   the registers added pairwise, then [`hsum8_hadd`]; leftovers after the last whole 32 one
//!   by one.
//! - Probabilities are `ggml_vec_soft_max_f32`'s: `ggml_v_expf` of `s − max` over groups of
//!   eight cache cells (aligned to cell 0), each group summed as [`hsum8`] into an f64 total,
//!   then every value times `(f32)(1/total)`.
//! - Outputs (the value cache times the probabilities) accumulate `p·v` in lane `cell % 8` by
//!   fused multiply-add, then [`hsum8`] (tinyBLAS's order). See [`Accum`].
//!
//! Every function has a portable form (the reference: `f32::mul_add` is an exact fused
//! multiply-add on every platform) and an AVX2 + FMA form that returns the same bits.

/// Lanes of one accumulation register.
pub const LANES: usize = 8;

/// Eight lanes added as one AVX register folded in halves: `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.
#[inline]
pub fn hsum8(l: &[f32; LANES]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// Eight lanes added as ggml's `GGML_F32x8_REDUCE` ends (two `hadd`s):
/// `((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7))`.
#[inline]
pub fn hsum8_hadd(l: &[f32; LANES]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

#[cfg(target_arch = "x86_64")]
fn simd() -> bool {
    crate::quant::has_avx2()
}

/// A score `q·k` (`ggml_vec_dot_f32` order). `q` and `k` have the same length.
pub fn dot_f32(q: &[f32], k: &[f32]) -> f32 {
    assert_eq!(q.len(), k.len());
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX2 and FMA confirmed at run time; lengths checked above.
        return unsafe { avx2::dot_f32(q, k) };
    }
    dot_f32_portable(q, k)
}

fn dot_f32_portable(q: &[f32], k: &[f32]) -> f32 {
    let whole = q.len() / 32 * 32;
    let mut r = [[0.0f32; LANES]; 4];
    for i in (0..whole).step_by(32) {
        for (j, rj) in r.iter_mut().enumerate() {
            for (l, acc) in rj.iter_mut().enumerate() {
                let e = i + LANES * j + l;
                *acc = q[e].mul_add(k[e], *acc);
            }
        }
    }
    let mut s = [0.0f32; LANES];
    for l in 0..LANES {
        s[l] = (r[0][l] + r[2][l]) + (r[1][l] + r[3][l]);
    }
    let mut sum = hsum8_hadd(&s);
    for (x, y) in q[whole..].iter().zip(&k[whole..]) {
        sum += x * y;
    }
    sum
}

/// ggml's `ggml_v_expf` (AVX2 form) on one value, a reference for [`exp8`]: `e^x` to about one
/// ulp, 0 at −∞.
pub fn expf_ggml(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let c = n.abs() > 126.0;
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010) // 0x1.0e4020p-7
        .mul_add(b, f32::from_bits(0x3d2b_9f17)) // 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)), // 0x1.555e66p-3, 0x1.fffdb6p-2
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6) * b); // 0x1.ffffecp-1
    if !c {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// [`expf_ggml`] of eight values.
pub fn exp8(x: [f32; LANES]) -> [f32; LANES] {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX2 and FMA confirmed at run time.
        return unsafe { avx2::exp8(x) };
    }
    x.map(expf_ggml)
}

/// Softmax weights before normalisation: `out[i] = e^((x[i] − max)·scale)` (0 where `x[i]` is
/// NaN or −∞), and their sum in f64. With `max` the largest `x` and `scale = 1/temperature`
/// these are a sampler's relative probabilities, the largest exactly 1. `out` has `x.len()`
/// elements; the indices of the weights of at least `at_least` are appended to `above`, in
/// order (a sampler's candidates, found in the same pass). Each value is [`expf_ggml`]'s (the
/// AVX2 form gives the same bits); the sum, the same on every CPU, adds each block of
/// [`SUM_BLOCK`] groups of eight in two alternating f32 eight-lane sums, those into four f64
/// lanes (`lane l += (a[l] + b[l]) + (a[l + 4] + b[l + 4])`), the lanes as
/// `(l0 + l1) + (l2 + l3)`, then the leftovers in order (relative error about 1e-6 at worst).
pub fn exp_weights(
    x: &[f32],
    max: f32,
    scale: f32,
    out: &mut [f32],
    at_least: f32,
    above: &mut Vec<u32>,
) -> f64 {
    assert_eq!(x.len(), out.len(), "exp_weights: shapes");
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX2 and FMA confirmed at run time; lengths checked above.
        return unsafe { avx2::exp_weights(x, max, scale, out, at_least, above) };
    }
    exp_weights_portable(x, max, scale, out, at_least, above)
}

fn exp_weights_portable(
    x: &[f32],
    max: f32,
    scale: f32,
    out: &mut [f32],
    at_least: f32,
    above: &mut Vec<u32>,
) -> f64 {
    let mut lanes = [0.0f64; 4];
    let whole = x.len() / LANES * LANES;
    for (b, block) in x[..whole].chunks(SUM_BLOCK * LANES).enumerate() {
        let mut acc = [[0.0f32; LANES]; 2];
        for (g, xs) in block.chunks_exact(LANES).enumerate() {
            let first = (b * SUM_BLOCK + g) * LANES;
            for (l, &v) in xs.iter().enumerate() {
                let e = expf_ggml(weight_arg(v, max, scale));
                out[first + l] = e;
                if e >= at_least {
                    above.push((first + l) as u32);
                }
                acc[g % 2][l] += e;
            }
        }
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += f64::from(acc[0][l] + acc[1][l]) + f64::from(acc[0][l + 4] + acc[1][l + 4]);
        }
    }
    exp_weights_tail(x, whole, max, scale, out, lanes, at_least, above)
}

/// Groups of eight weights summed in f32 (two alternating eight-lane sums) before their sum
/// joins the f64 total: at most 64 values of at most 1 per f32 lane.
const SUM_BLOCK: usize = 64;

/// The exponent of one softmax weight: NaN counts as −∞.
#[inline]
fn weight_arg(v: f32, max: f32, scale: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        (v - max) * scale
    }
}

/// [`exp_weights`] from element `from` on (after the whole groups of eight): the leftovers,
/// and the total.
#[allow(clippy::too_many_arguments)]
fn exp_weights_tail(
    x: &[f32],
    from: usize,
    max: f32,
    scale: f32,
    out: &mut [f32],
    lanes: [f64; 4],
    at_least: f32,
    above: &mut Vec<u32>,
) -> f64 {
    let mut total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for i in from..x.len() {
        out[i] = expf_ggml(weight_arg(x[i], max, scale));
        total += f64::from(out[i]);
        if out[i] >= at_least {
            above.push(i as u32);
        }
    }
    total
}

/// Softmax in place of the scores of cache cells `first..first + s.len()`: `ggml_v_expf` of
/// `s − max` per group of eight cells aligned to cell 0 (cells outside the slice count as
/// zeros), each group's sum by [`hsum8`] into an f64 total, then every value times
/// `(f32)(1/total)`.
pub fn softmax(s: &mut [f32], first: usize) {
    if s.is_empty() {
        return;
    }
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f64;
    // Cells first..first+len, walked in aligned groups of eight.
    let (start, end) = (first, first + s.len());
    let mut g = start / LANES * LANES;
    while g < end {
        let mut x = [f32::NEG_INFINITY; LANES];
        for (l, xl) in x.iter_mut().enumerate() {
            if (start..end).contains(&(g + l)) {
                *xl = s[g + l - start] - max;
            }
        }
        let e = exp8(x);
        for (l, &el) in e.iter().enumerate() {
            if (start..end).contains(&(g + l)) {
                s[g + l - start] = el;
            }
        }
        total += f64::from(hsum8(&e));
        g += LANES;
    }
    let inv = (1.0 / total) as f32;
    for v in s.iter_mut() {
        *v *= inv;
    }
}

/// Per-lane partial sums of one attention output (the product of the value cache with a row of
/// probabilities), in one order whatever the batch: lane `cell % 8` gathers `p·v` of its cells
/// by fused multiply-add, the lanes added at the end as [`hsum8`] (tinyBLAS's order). Cells are
/// numbered from the sequence's first cache position; cells a row does not see add nothing.
#[derive(Debug, Default)]
pub struct Accum {
    lanes: Vec<f32>,
    d: usize,
}

impl Accum {
    /// Zeroed sums for outputs of `d` values.
    pub fn reset(&mut self, d: usize) {
        self.d = d;
        self.lanes.clear();
        self.lanes.resize(LANES * d, 0.0);
    }

    /// Add `p·v` for the value `v` (`d` values) of cache cell `cell`.
    pub fn add(&mut self, cell: usize, p: f32, v: &[f32]) {
        let (d, slot) = (self.d, cell % LANES);
        let lane = &mut self.lanes[slot * d..(slot + 1) * d];
        assert_eq!(v.len(), d);
        #[cfg(target_arch = "x86_64")]
        if simd() {
            // SAFETY: AVX2 and FMA confirmed at run time; lane and v hold d values.
            return unsafe { avx2::fma_into(lane, p, v) };
        }
        fma_into_portable(lane, p, v)
    }

    /// The outputs: each element's eight lanes added as [`hsum8`].
    pub fn finish(&self, out: &mut [f32]) {
        let d = self.d;
        assert_eq!(out.len(), d);
        for (e, o) in out.iter_mut().enumerate() {
            *o = hsum8(&std::array::from_fn(|i| self.lanes[i * d + e]));
        }
    }
}

fn fma_into_portable(acc: &mut [f32], p: f32, v: &[f32]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a = p.mul_add(*x, *a);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::LANES;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn at(p: &[f32], i: usize) -> __m256 {
        debug_assert!(i + LANES <= p.len());
        // SAFETY: callers keep i + 8 within p; unaligned load.
        unsafe { _mm256_loadu_ps(p.as_ptr().add(i)) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32(q: &[f32], k: &[f32]) -> f32 {
        let whole = q.len() / 32 * 32;
        let mut r = [_mm256_setzero_ps(); 4];
        for i in (0..whole).step_by(32) {
            for (j, rj) in r.iter_mut().enumerate() {
                // SAFETY: i + 32 <= whole <= both lengths.
                *rj = unsafe { _mm256_fmadd_ps(at(q, i + 8 * j), at(k, i + 8 * j), *rj) };
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(r[0], r[2]), _mm256_add_ps(r[1], r[3]));
        let t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let t = _mm_hadd_ps(t, t);
        let mut sum = _mm_cvtss_f32(_mm_hadd_ps(t, t));
        for (x, y) in q[whole..].iter().zip(&k[whole..]) {
            sum += x * y;
        }
        sum
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
        let mut masks = [0u8; super::SUM_BLOCK];
        let mut hits = [0u32; super::SUM_BLOCK * LANES];
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
        for start in (0..whole).step_by(super::SUM_BLOCK * LANES) {
            let n = (whole - start).min(super::SUM_BLOCK * LANES) / LANES;
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
        super::exp_weights_tail(x, whole, max, scale, out, l, at_least, above)
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

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma_into(acc: &mut [f32], p: f32, v: &[f32]) {
        let whole = acc.len() / LANES * LANES;
        let pv = _mm256_set1_ps(p);
        for i in (0..whole).step_by(LANES) {
            // SAFETY: i + 8 <= whole <= both lengths (equal, checked by the caller).
            unsafe {
                let a = _mm256_fmadd_ps(pv, at(v, i), at(acc, i));
                _mm256_storeu_ps(acc.as_mut_ptr().add(i), a);
            }
        }
        for (a, x) in acc[whole..].iter_mut().zip(&v[whole..]) {
            *a = p.mul_add(*x, *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::rand_vec;

    #[test]
    fn exp_weights_are_exponentials() {
        // Ragged length (not a multiple of eight), NaN and −∞ give zero weight.
        let mut x = crate::testing::rand_vec(1003, 9, 12.0);
        x[5] = f32::NAN;
        x[700] = f32::NEG_INFINITY;
        let max = x
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f32::MIN, f32::max);
        let mut w = vec![0.0; x.len()];
        let mut above = Vec::new();
        let total = exp_weights(&x, max, 0.7, &mut w, 1e-3, &mut above);
        // The portable form gives the same bits and candidates.
        let (mut portable, mut portable_above) = (vec![0.0; x.len()], Vec::new());
        let portable_total =
            exp_weights_portable(&x, max, 0.7, &mut portable, 1e-3, &mut portable_above);
        assert_eq!((portable, portable_above), (w.clone(), above.clone()));
        assert_eq!(portable_total.to_bits(), total.to_bits());
        let want_above: Vec<u32> = (0..x.len() as u32)
            .filter(|&i| w[i as usize] >= 1e-3)
            .collect();
        assert_eq!(above, want_above);
        assert!(!above.is_empty() && above.len() < x.len());
        let mut want_total = 0.0f64;
        for (i, (&v, &got)) in x.iter().zip(&w).enumerate() {
            let want = if v.is_nan() {
                0.0
            } else {
                (f64::from(v - max) * 0.7).exp()
            };
            want_total += want;
            // The argument (x − max)·scale is rounded to f32 first (|arg| ≤ 17 here: ~1e-6).
            assert!(
                (f64::from(got) - want).abs() <= 4e-6 * want + 1e-30,
                "{i}: {got} vs {want}"
            );
        }
        assert_eq!((w[5], w[700]), (0.0, 0.0));
        assert!((total - want_total).abs() < 4e-6 * want_total);
        assert!(w.contains(&1.0), "the maximum's weight is exactly 1");
    }

    fn check_simd() -> bool {
        #[cfg(target_arch = "x86_64")]
        if simd() {
            return true;
        }
        eprintln!("no AVX2 + FMA on this CPU: nothing to compare");
        false
    }

    #[test]
    fn exp_is_accurate_and_simd_agrees() {
        let xs: Vec<f32> = (0..4000)
            .map(|i| -100.0 + i as f32 * 0.0271)
            .chain([
                0.0,
                -0.0,
                -87.0,
                -88.5,
                -103.0,
                -150.0,
                -200.0,
                f32::NEG_INFINITY,
                80.0,
            ])
            .collect();
        for &x in &xs {
            let (got, want) = (expf_ggml(x), (x as f64).exp());
            if want > 1e-37 {
                assert!(
                    ((got as f64 - want) / want).abs() < 3e-7,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                assert!(got as f64 <= 2e-37, "exp({x}) = {got}");
            }
        }
        assert_eq!(expf_ggml(f32::NEG_INFINITY), 0.0);
        if check_simd() {
            for c in xs.chunks_exact(LANES) {
                let x: [f32; LANES] = c.try_into().unwrap();
                let want = x.map(expf_ggml).map(f32::to_bits);
                assert_eq!(exp8(x).map(f32::to_bits), want, "{x:?}");
            }
        }
    }

    /// The AVX2 dot products and output accumulation equal the portable forms bit for bit, on
    /// random data of several scales, head sizes 8..=264 (whole and ragged 32s).
    #[test]
    fn simd_dots_and_accumulation_equal_portable() {
        if !check_simd() {
            return;
        }
        for (seed, d) in (8..=264).step_by(8).enumerate() {
            let scale = [1.0, 30.0, 1e-3][seed % 3];
            let (q, k) = (
                rand_vec(d, seed as u64, scale),
                rand_vec(d, 1000 + seed as u64, 2.0),
            );
            assert_eq!(
                dot_f32(&q, &k).to_bits(),
                dot_f32_portable(&q, &k).to_bits()
            );
            let (mut a, mut b) = (rand_vec(d + 3, 7, 1.0), rand_vec(d + 3, 7, 1.0));
            let v = rand_vec(d + 3, 8, 5.0);
            // SAFETY: this test runs only where check_simd() confirmed AVX2 and FMA.
            unsafe { avx2::fma_into(&mut a, 0.37, &v) };
            fma_into_portable(&mut b, 0.37, &v);
            assert_eq!(a, b, "d = {d}");
        }
    }

    /// Softmax: probabilities sum to one, follow the scores' order, do not depend on where the
    /// group boundaries fall beyond the rounding of the sum, and equal the f64 softmax closely.
    #[test]
    fn softmax_matches_f64_and_is_aligned_to_cells() {
        for (first, n) in [(0, 1), (0, 8), (3, 5), (5, 37), (250, 300)] {
            let s = rand_vec(n, n as u64, 12.0);
            let mut p = s.clone();
            softmax(&mut p, first);
            let max = s
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, |m, v| m.max(v as f64));
            let z: f64 = s.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (pi, si) in p.iter().zip(&s) {
                let want = (*si as f64 - max).exp() / z;
                assert!(
                    (*pi as f64 - want).abs() < 1e-6 * want.max(1e-3),
                    "{pi} vs {want}"
                );
            }
            let total: f32 = p.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "sum {total}");
        }
    }

    /// The output order sums exactly where every partial sum is exact, and equals its
    /// definition (lanes by cell % 8, then `hsum8`) on random data.
    #[test]
    fn accum_order() {
        let mut acc = Accum::default();
        acc.reset(2);
        for cell in 3..20 {
            acc.add(cell, 0.5, &[cell as f32, 1.0]);
        }
        let mut out = [0.0; 2];
        acc.finish(&mut out);
        assert_eq!(out, [(3..20).sum::<usize>() as f32 * 0.5, 17.0 * 0.5]);
        let n = 300;
        let (p, v) = (rand_vec(n, 1, 1.0), rand_vec(n, 2, 3.0));
        let mut out = [0.0];
        acc.reset(1);
        let mut lanes = [0.0f32; LANES];
        for c in 0..n {
            acc.add(c, p[c], &v[c..=c]);
            lanes[c % LANES] = p[c].mul_add(v[c], lanes[c % LANES]);
        }
        acc.finish(&mut out);
        assert_eq!(out[0].to_bits(), hsum8(&lanes).to_bits());
    }
}
