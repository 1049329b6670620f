//! The arithmetic of attention over a KV cache, and the exponentials a sampler weighs with.
//!
//! Attention is computed the flash-attention way (online softmax: Milakov & Gimelshein 2018,
//! "Online normalizer calculation for softmax"; Dao et al. 2022, "FlashAttention"): keys and
//! values stream by in tiles, and each query row keeps a running maximum `m`, a running sum
//! `l` and unnormalised outputs `o`. For a tile of scores `s_j` with maximum `m' > m`, the
//! state is first rescaled by `e^(m − m')`; then `p_j = e^(s_j − m)`, `l += Σ p_j`,
//! `o += Σ p_j·v_j`, and the result is `o / l`. Nothing of size context length is kept, so a
//! long context costs one pass over its cache, read in whatever element type the cache stores
//! ([`KV_TYPES`]: f32, f16, bf16, or Q8_0 blocks of 32).
//!
//! One order for every row whatever the batch: a row's result depends only on its query, the
//! cached keys and values it sees and the tiles they come in (the caller's: herd_models takes
//! tiles of 16 absolute positions), so batching, prompt splitting and cached prefixes never
//! change it.
//!
//! The scalar reference of each kernel is in `scalar.rs`, the AVX2 + FMA + F16C forms (chosen
//! at run time) in `avx2.rs`; they return the same bits.

mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;

use crate::DType;

pub use scalar::expf_ggml;

/// Lanes of one accumulation register.
pub const LANES: usize = 8;

/// Eight lanes added as one AVX register folded in halves: `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.
#[inline]
pub fn hsum8(l: &[f32; LANES]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// Groups of eight weights summed in f32 (two alternating eight-lane sums) before their sum
/// joins the f64 total of [`exp_weights`]: at most 64 values of at most 1 per f32 lane.
const SUM_BLOCK: usize = 64;

#[cfg(target_arch = "x86_64")]
fn simd() -> bool {
    crate::quant::has_avx2()
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
/// order (a sampler's candidates, found in the same pass). Each value is [`expf_ggml`]'s; the
/// sum, the same on every CPU, adds each block of 64 groups of eight in two alternating f32
/// eight-lane sums, those into four f64 lanes (`lane l += (a[l] + b[l]) + (a[l + 4] +
/// b[l + 4])`), the lanes as `(l0 + l1) + (l2 + l3)`, then the leftovers in order (relative
/// error about 1e-6 at worst).
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
    scalar::exp_weights(x, max, scale, out, at_least, above)
}

/// `x[i] = e^(x[i] − max)` ([`expf_ggml`]) in place, and the sum of the results in f32 (lane
/// `i % 8` of the whole groups of eight in order, the lanes as [`hsum8`], then the leftovers).
pub fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX2 and FMA confirmed at run time.
        return unsafe { avx2::exp_sub_sum(x, max) };
    }
    scalar::exp_sub_sum(x, max)
}

/// Element types a KV cache can store.
pub const KV_TYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::Q8_0];

/// Can rows of `d` elements (one head) be cached as `ty`? Q8_0 needs whole blocks of 32.
pub fn kv_type_fits(ty: DType, d: usize) -> bool {
    KV_TYPES.contains(&ty) && d.is_multiple_of(ty.block_size())
}

/// Encode `x` (whole heads of a key or value row) as `ty` into `out` (`ty.bytes_for(x.len())`
/// bytes): f16/bf16 round to nearest even; Q8_0 as an activation row (`d = amax/127`, rounded
/// half to even, as ggml quantizes its Q8_0 cache).
///
/// # Panics
/// If `ty` is not one of [`KV_TYPES`], `x` is not whole blocks of it or `out` is the wrong size.
pub fn encode_kv(ty: DType, x: &[f32], out: &mut [u8]) {
    assert!(
        kv_type_fits(ty, x.len()),
        "encode_kv: {ty} rows of {}",
        x.len()
    );
    crate::quant::quantize_activation(ty, x, out)
}

fn check_kv(ty: DType, n: usize, bytes: &[u8]) {
    assert!(kv_type_fits(ty, n), "KV kernels: {ty} rows of {n}");
    assert!(bytes.len() >= ty.bytes_for(n), "KV kernels: row too short");
}

/// A score `q·k` for one head: `q` has `d` elements, `k` is a cached row of type `ty` holding
/// at least `d` elements (`ty.bytes_for(d)` bytes; the rest is ignored). Order: per chunk of
/// 32, element `32c + 8j + l` into register `j`, lane `l`, by fused multiply-add; registers
/// added as `(r0 + r1) + (r2 + r3)`, lanes as [`hsum8`], leftovers one by one.
pub fn kv_dot(ty: DType, q: &[f32], k: &[u8]) -> f32 {
    check_kv(ty, q.len(), k);
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX2, FMA and F16C confirmed at run time; type and length checked above.
        return unsafe { avx2::kv_dot(ty, q, k) };
    }
    scalar::kv_dot(ty, q, k)
}

/// `acc += p·v` for one head: `v` is a cached row of type `ty` holding at least `acc.len()`
/// elements. Each element by one fused multiply-add.
pub fn kv_axpy(ty: DType, acc: &mut [f32], p: f32, v: &[u8]) {
    check_kv(ty, acc.len(), v);
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX2, FMA and F16C confirmed at run time; type and length checked above.
        return unsafe { avx2::kv_axpy(ty, acc, p, v) };
    }
    scalar::kv_axpy(ty, acc, p, v)
}

/// The running state of one query row and head: maximum score, sum of weights, and the
/// unnormalised output (`d` values). See the module documentation for the math.
#[derive(Debug, Default)]
pub struct OnlineSoftmax {
    max: f32,
    sum: f32,
    out: Vec<f32>,
}

impl OnlineSoftmax {
    /// Start a row of `d` outputs (keeps the allocation).
    pub fn reset(&mut self, d: usize) {
        self.max = f32::NEG_INFINITY;
        self.sum = 0.0;
        self.out.clear();
        self.out.resize(d, 0.0);
    }

    /// Fold in one tile: `scores[j]` (already scaled) belongs to the value `value(j)`, a cached
    /// row of type `ty` (at least `d` elements). `scores` is overwritten with the tile's
    /// weights. An empty tile changes nothing.
    pub fn add_tile<'a>(
        &mut self,
        ty: DType,
        scores: &mut [f32],
        value: impl Fn(usize) -> &'a [u8],
    ) {
        let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if tile_max == f32::NEG_INFINITY {
            return;
        }
        if tile_max > self.max {
            if self.max != f32::NEG_INFINITY {
                let c = expf_ggml(self.max - tile_max);
                self.sum *= c;
                self.out.iter_mut().for_each(|o| *o *= c);
            }
            self.max = tile_max;
        }
        self.sum += exp_sub_sum(scores, self.max);
        for (j, &p) in scores.iter().enumerate() {
            kv_axpy(ty, &mut self.out, p, value(j));
        }
    }

    /// The attention output `o / l` into `out` (`d` values; zeros if no key was seen).
    pub fn finish(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.out.len(), "OnlineSoftmax::finish: shapes");
        let inv = if self.sum > 0.0 { 1.0 / self.sum } else { 0.0 };
        for (o, &v) in out.iter_mut().zip(&self.out) {
            *o = v * inv;
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
            scalar::exp_weights(&x, max, 0.7, &mut portable, 1e-3, &mut portable_above);
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

    /// A random cached row of `d` elements of type `ty`, and its exact f32 values.
    fn kv_row(ty: DType, d: usize, seed: u64, scale: f32) -> (Vec<u8>, Vec<f32>) {
        let x = rand_vec(d, seed, scale);
        let mut bytes = vec![0u8; ty.bytes_for(d)];
        encode_kv(ty, &x, &mut bytes);
        let exact = crate::dtype::decode(ty, &bytes, d);
        (bytes, exact)
    }

    fn sizes(ty: DType) -> Vec<usize> {
        if ty == DType::Q8_0 {
            vec![32, 64, 96, 128, 256]
        } else {
            (1..=40)
                .chain([63, 64, 65, 127, 128, 129, 200, 256, 264])
                .collect()
        }
    }

    /// Every KV kernel's SIMD form returns its reference's bits, on random rows of every KV
    /// type, head sizes whole and ragged, several scales.
    #[test]
    fn kv_kernels_simd_equal_scalar() {
        if !check_simd() {
            return;
        }
        for ty in KV_TYPES {
            for (seed, d) in sizes(ty).into_iter().enumerate() {
                let seed = seed as u64;
                let scale = [1.0, 30.0, 1e-3][seed as usize % 3];
                let q = rand_vec(d, seed, scale);
                let (k, _) = kv_row(ty, d, 100 + seed, 2.0);
                assert_eq!(
                    kv_dot(ty, &q, &k).to_bits(),
                    scalar::kv_dot(ty, &q, &k).to_bits(),
                    "{ty} d = {d}"
                );
                let (mut a, mut b) = (rand_vec(d, 7 + seed, 1.0), rand_vec(d, 7 + seed, 1.0));
                kv_axpy(ty, &mut a, 0.37, &k);
                scalar::kv_axpy(ty, &mut b, 0.37, &k);
                assert_eq!(a, b, "{ty} d = {d}");
            }
        }
        for n in [0, 1, 7, 8, 9, 16, 31, 100] {
            let x = rand_vec(n, n as u64, 20.0);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (mut a, mut b) = (x.clone(), x);
            let (sa, sb) = (exp_sub_sum(&mut a, max), scalar::exp_sub_sum(&mut b, max));
            assert_eq!((a, sa.to_bits()), (b, sb.to_bits()), "n = {n}");
        }
    }

    /// The KV kernels compute the dot product and update they claim, on the exact values of the
    /// stored row (f64 reference; relative to the sum of magnitudes), and encoding loses no
    /// more than the type's rounding.
    #[test]
    fn kv_kernels_match_f64() {
        for ty in KV_TYPES {
            for (seed, d) in sizes(ty).into_iter().enumerate() {
                let q = rand_vec(d, seed as u64, 3.0);
                let (k, exact) = kv_row(ty, d, 50 + seed as u64, 2.0);
                let want: f64 = q
                    .iter()
                    .zip(&exact)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                let mag: f64 = q
                    .iter()
                    .zip(&exact)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                let got = kv_dot(ty, &q, &k) as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * mag + 1e-30,
                    "{ty} d = {d}: {got} vs {want}"
                );
                let mut acc = vec![0.5f32; d];
                kv_axpy(ty, &mut acc, -1.5, &k);
                for (a, e) in acc.iter().zip(&exact) {
                    assert_eq!(*a, (-1.5f32).mul_add(*e, 0.5));
                }
                // Encoding error: f16 half an ulp (2^-11 relative), bf16 2^-8, Q8_0 half a step
                // of amax/127 per block plus the f16 rounding of that step (times up to 127).
                let x = rand_vec(d, 50 + seed as u64, 2.0);
                for (i, (a, e)) in x.iter().zip(&exact).enumerate() {
                    let tol = match ty {
                        DType::F32 => 0.0,
                        DType::F16 => a.abs() * 4.9e-4 + 1e-7,
                        DType::BF16 => a.abs() * 3.91e-3,
                        _ => {
                            let b = i / 32 * 32;
                            let amax = x[b..b + 32].iter().fold(0f32, |m, v| m.max(v.abs()));
                            amax / 127.0 * 0.5 + amax * 4.9e-4 + 1e-6
                        }
                    };
                    assert!((a - e).abs() <= tol, "{ty} {i}: {a} vs {e}");
                }
            }
        }
    }

    /// Online softmax over tiles equals softmax(q·kᵀ)·v computed in f64 on the same stored
    /// rows, whatever the tiling (one tile, blocks of 16, single keys, ragged tiles), with
    /// scores large enough that later tiles raise the maximum.
    #[test]
    fn online_softmax_matches_f64_attention() {
        for ty in KV_TYPES {
            let d = 64;
            let n = 77;
            let q = rand_vec(d, 1, 1.0);
            let rows: Vec<_> = (0..n)
                .map(|j| (kv_row(ty, d, 10 + j, 2.0), kv_row(ty, d, 500 + j, 1.0)))
                .collect();
            let stride = ty.bytes_for(d);
            let keys: Vec<u8> = rows.iter().flat_map(|r| r.0.0.clone()).collect();
            let values: Vec<u8> = rows.iter().flat_map(|r| r.1.0.clone()).collect();
            // Scores grow along the sequence so that the maximum moves tile after tile.
            let score = |j: usize| kv_dot(ty, &q, &keys[j * stride..]) * 0.9 + j as f32 * 0.15;
            let s64: Vec<f64> = (0..n as usize).map(|j| score(j) as f64).collect();
            let m = s64.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s64.iter().map(|s| (s - m).exp()).sum();
            let want: Vec<f64> = (0..d)
                .map(|e| {
                    (0..n as usize)
                        .map(|j| (s64[j] - m).exp() / z * rows[j].1.1[e] as f64)
                        .sum()
                })
                .collect();
            for tiles in [
                vec![77],
                vec![16, 16, 16, 16, 13],
                vec![1; 77],
                vec![5, 30, 2, 40],
            ] {
                let mut state = OnlineSoftmax::default();
                state.reset(d);
                let mut at = 0;
                for t in tiles {
                    let mut s: Vec<f32> = (at..at + t).map(score).collect();
                    state.add_tile(ty, &mut s, |j| &values[(at + j) * stride..]);
                    at += t;
                }
                state.add_tile(ty, &mut [], |_| &[]);
                let mut out = vec![0.0; d];
                state.finish(&mut out);
                for (o, w) in out.iter().zip(&want) {
                    assert!((*o as f64 - w).abs() < 2e-6, "{ty}: {o} vs {w}");
                }
            }
        }
    }
}
