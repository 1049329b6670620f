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
//! The scalar reference of each kernel is in `scalar.rs`, the AVX2 + FMA + F16C forms in
//! `avx2.rs` and the AVX-512 forms of [`kv_scores`] and [`kv_weighted_sum`] in `avx512.rs`
//! (each chosen at run time); they return the same bits.

mod scalar;

/// The KV element types as const parameters of the SIMD kernels (`avx2.rs`, `avx512.rs`): each
/// kernel is compiled once per type, with its loads inlined and no branch on the type in the
/// inner loops.
#[cfg(target_arch = "x86_64")]
const F32: u8 = 0;
#[cfg(target_arch = "x86_64")]
const F16: u8 = 1;
#[cfg(target_arch = "x86_64")]
const BF16: u8 = 2;
#[cfg(target_arch = "x86_64")]
const Q8_0: u8 = 3;

/// `$kernel::<T, $heads>($args)` with `T` the const parameter of the KV type `$ty`.
#[cfg(target_arch = "x86_64")]
macro_rules! for_type {
    ($ty:expr, $kernel:ident, $heads:expr, ($($arg:expr),*)) => {
        match $ty {
            DType::F32 => $kernel::<{ super::F32 }, $heads>($($arg),*),
            DType::F16 => $kernel::<{ super::F16 }, $heads>($($arg),*),
            DType::BF16 => $kernel::<{ super::BF16 }, $heads>($($arg),*),
            DType::Q8_0 => $kernel::<{ super::Q8_0 }, $heads>($($arg),*),
            _ => unreachable!("KV type checked by the caller"),
        }
    };
}

/// `$kernel::<T, H>($args)` for the heads `0..$heads` in blocks of `$block`, `$h0` bound to
/// each block's first head: `H = $block`, or for a last, shorter block of `h` heads `H = h`
/// (each such `h` listed in `[$n, …]`).
#[cfg(target_arch = "x86_64")]
macro_rules! for_head_blocks {
    (
        $ty:expr, $heads:expr, $kernel:ident, $block:expr, [$($n:literal),*],
        |$h0:ident| $args:tt
    ) => {{
        let mut $h0 = 0;
        while $h0 < $heads {
            let h1 = ($h0 + $block).min($heads);
            match h1 - $h0 {
                $($n => for_type!($ty, $kernel, $n, $args),)*
                _ => for_type!($ty, $kernel, $block, $args),
            }
            $h0 = h1;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

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

#[cfg(target_arch = "x86_64")]
fn simd512() -> bool {
    crate::quant::has_avx512f()
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

fn check_rows(ty: DType, d: usize, rows: &[&[u8]]) {
    assert!(
        d > 0 && kv_type_fits(ty, d),
        "KV kernels: {ty} heads of {d}"
    );
    let bytes = ty.bytes_for(d);
    assert!(
        rows.iter().all(|r| r.len() >= bytes),
        "KV kernels: a cached row is shorter than a head"
    );
}

/// Attention scores of a group of query heads that share one kv head, against a tile of its
/// cached keys: `out[h·n + j] = scale · (q_h · k_j)` for the `heads = q.len() / d` heads of `q`
/// (`[heads, d]`) and the `n = keys.len()` keys, each a cached row of type `ty` holding at
/// least `d` elements (`ty.bytes_for(d)` bytes; the rest is ignored). Each key is read once for
/// all heads.
///
/// Order (every key and head alike): per chunk of 32, element `32c + 8r + l` into register
/// `r`, lane `l`, by fused multiply-add; the registers added as `(r0 + r1) + (r2 + r3)`, the
/// lanes as [`hsum8`], the leftovers after the whole chunks one by one; then the product by
/// `scale`.
///
/// # Panics
/// If `d` is 0 or `ty` cannot hold heads of `d` ([`kv_type_fits`]), a key is shorter than a
/// head, `q` is not whole heads or `out` does not hold `heads · n` scores.
pub fn kv_scores(ty: DType, d: usize, q: &[f32], keys: &[&[u8]], scale: f32, out: &mut [f32]) {
    check_rows(ty, d, keys);
    assert!(
        q.len().is_multiple_of(d) && out.len() == q.len() / d * keys.len(),
        "kv_scores: shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if simd512() {
        // SAFETY: AVX2, FMA, F16C and AVX-512 F confirmed at run time; type and shapes
        // checked above.
        return unsafe { avx512::kv_scores(ty, d, q, keys, scale, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX2, FMA and F16C confirmed at run time; type and shapes checked above.
        return unsafe { avx2::kv_scores(ty, d, q, keys, scale, out) };
    }
    scalar::kv_scores(ty, d, q, keys, scale, out)
}

/// The weighted sum of a tile of cached values into a group of heads' outputs: `acc[h·d + i]
/// += Σ_j weights[h·n + j] · v_j[i]` for the `heads = acc.len() / d` heads of `acc`
/// (`[heads, d]`) and the `n = values.len()` values (cached rows of type `ty`, at least `d`
/// elements each). Each element by one fused multiply-add per value, `j` in order; each value
/// is read once for all heads.
///
/// # Panics
/// As [`kv_scores`], for `values`, `acc` and `weights` (`heads · n`).
pub fn kv_weighted_sum(ty: DType, d: usize, weights: &[f32], values: &[&[u8]], acc: &mut [f32]) {
    check_rows(ty, d, values);
    assert!(
        acc.len().is_multiple_of(d) && weights.len() == acc.len() / d * values.len(),
        "kv_weighted_sum: shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if simd512() {
        // SAFETY: AVX2, FMA, F16C and AVX-512 F confirmed at run time; type and shapes
        // checked above.
        return unsafe { avx512::kv_weighted_sum(ty, d, weights, values, acc) };
    }
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX2, FMA and F16C confirmed at run time; type and shapes checked above.
        return unsafe { avx2::kv_weighted_sum(ty, d, weights, values, acc) };
    }
    scalar::kv_weighted_sum(ty, d, weights, values, acc)
}

/// The running state of one query row for a group of heads (those sharing a kv head): per
/// head the maximum score and the sum of weights, and the unnormalised outputs (`[heads, d]`).
/// See the module documentation for the math. Each head's arithmetic is its own: grouping
/// heads differently gives the same bits.
#[derive(Debug, Default)]
pub struct OnlineSoftmax {
    d: usize,
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

impl OnlineSoftmax {
    /// Start a row of `heads` heads of `d` outputs (keeps the allocations).
    pub fn reset(&mut self, heads: usize, d: usize) {
        self.d = d;
        self.max.clear();
        self.max.resize(heads, f32::NEG_INFINITY);
        self.sum.clear();
        self.sum.resize(heads, 0.0);
        self.out.clear();
        self.out.resize(heads * d, 0.0);
    }

    /// Fold in one tile: `scores[h·n + j]` (already scaled, from [`kv_scores`]) belongs to
    /// head `h` and the value `values[j]`, a cached row of type `ty` (at least `d` elements),
    /// `n = values.len()`. `scores` is overwritten with the tile's weights. An empty tile
    /// changes nothing.
    ///
    /// # Panics
    /// If `scores` does not hold `heads · n` values, or as [`kv_weighted_sum`].
    pub fn add_tile(&mut self, ty: DType, scores: &mut [f32], values: &[&[u8]]) {
        let n = values.len();
        assert_eq!(scores.len(), self.max.len() * n, "add_tile: shapes");
        if n == 0 {
            return;
        }
        let d = self.d;
        for (h, s) in scores.chunks_exact_mut(n).enumerate() {
            let tile_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if tile_max == f32::NEG_INFINITY {
                s.fill(0.0);
                continue;
            }
            if tile_max > self.max[h] {
                if self.max[h] != f32::NEG_INFINITY {
                    let c = expf_ggml(self.max[h] - tile_max);
                    self.sum[h] *= c;
                    self.out[h * d..(h + 1) * d]
                        .iter_mut()
                        .for_each(|o| *o *= c);
                }
                self.max[h] = tile_max;
            }
            self.sum[h] += exp_sub_sum(s, self.max[h]);
        }
        kv_weighted_sum(ty, d, scores, values, &mut self.out);
    }

    /// The attention outputs `o / l` into `out` (`[heads, d]`; zeros for a head that saw no
    /// key).
    pub fn finish(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.out.len(), "OnlineSoftmax::finish: shapes");
        for ((o, v), &sum) in out
            .chunks_exact_mut(self.d.max(1))
            .zip(self.out.chunks_exact(self.d.max(1)))
            .zip(&self.sum)
        {
            let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            for (o, &v) in o.iter_mut().zip(v) {
                *o = v * inv;
            }
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

    /// `n` random cached rows of `d` elements of type `ty` (seeds from `seed`), and their exact
    /// values.
    fn kv_rows(ty: DType, d: usize, n: usize, seed: u64, scale: f32) -> Vec<(Vec<u8>, Vec<f32>)> {
        (0..n as u64)
            .map(|j| kv_row(ty, d, seed + 1000 * j, scale))
            .collect()
    }

    /// Every KV kernel's SIMD form returns its reference's bits, on random rows of every KV
    /// type, head sizes whole and ragged, 1 to 9 heads (more than one register block) and 0
    /// to 19 keys (odd and even), several scales.
    #[test]
    fn kv_kernels_simd_equal_scalar() {
        if !check_simd() {
            return;
        }
        for ty in KV_TYPES {
            for (seed, d) in sizes(ty).into_iter().enumerate() {
                let seed = seed as u64;
                let scale = [1.0, 30.0, 1e-3][seed as usize % 3];
                let heads = 1 + seed as usize % 9;
                let n = (seed as usize * 7) % 20;
                let q = rand_vec(heads * d, seed, scale);
                let rows = kv_rows(ty, d, n, 100 + seed, 2.0);
                let keys: Vec<&[u8]> = rows.iter().map(|r| &r.0[..]).collect();
                let (mut a, mut b) = (vec![0.0; heads * n], vec![0.0; heads * n]);
                kv_scores(ty, d, &q, &keys, 0.3, &mut a);
                scalar::kv_scores(ty, d, &q, &keys, 0.3, &mut b);
                assert_eq!(a, b, "scores {ty} d = {d}, {heads} heads, {n} keys");
                let w = rand_vec(heads * n, 9 + seed, 1.0);
                let (mut a, mut b) = (rand_vec(heads * d, 7, 1.0), rand_vec(heads * d, 7, 1.0));
                kv_weighted_sum(ty, d, &w, &keys, &mut a);
                scalar::kv_weighted_sum(ty, d, &w, &keys, &mut b);
                assert_eq!(a, b, "weighted sum {ty} d = {d}, {heads} heads, {n} values");
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

    /// The KV kernels compute the scores and weighted sums they claim, on the exact values of
    /// the stored rows (f64 reference; relative to the sum of magnitudes), and encoding loses
    /// no more than the type's rounding.
    #[test]
    fn kv_kernels_match_f64() {
        for ty in KV_TYPES {
            for (seed, d) in sizes(ty).into_iter().enumerate() {
                let (heads, n) = (3, 5);
                let q = rand_vec(heads * d, seed as u64, 3.0);
                let rows = kv_rows(ty, d, n, 50 + seed as u64, 2.0);
                let keys: Vec<&[u8]> = rows.iter().map(|r| &r.0[..]).collect();
                let mut scores = vec![0.0; heads * n];
                kv_scores(ty, d, &q, &keys, 0.5, &mut scores);
                for h in 0..heads {
                    for (j, (_, exact)) in rows.iter().enumerate() {
                        let qh = &q[h * d..(h + 1) * d];
                        let prods = qh.iter().zip(exact).map(|(a, b)| *a as f64 * *b as f64);
                        let want: f64 = prods.clone().sum::<f64>() * 0.5;
                        let mag: f64 = prods.map(f64::abs).sum::<f64>() * 0.5;
                        let got = scores[h * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * mag + 1e-30,
                            "{ty} d = {d}: {got} vs {want}"
                        );
                    }
                }
                let w = rand_vec(heads * n, 3, 1.0);
                let mut acc = vec![0.5f32; heads * d];
                kv_weighted_sum(ty, d, &w, &keys, &mut acc);
                for h in 0..heads {
                    for i in 0..d {
                        let want = rows
                            .iter()
                            .enumerate()
                            .fold(0.5f32, |a, (j, r)| w[h * n + j].mul_add(r.1[i], a));
                        assert_eq!(acc[h * d + i], want, "{ty} d = {d}");
                    }
                }
                // Encoding error: f16 half an ulp (2^-11 relative), bf16 2^-8, Q8_0 half a step
                // of amax/127 per block plus the f16 rounding of that step (times up to 127).
                let x = rand_vec(d, 50 + seed as u64, 2.0);
                let exact = &rows[0].1;
                for (i, (a, e)) in x.iter().zip(exact).enumerate() {
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
    /// rows, for each of a group of heads, whatever the tiling (one tile, blocks of 16, single
    /// keys, ragged tiles), with scores large enough that later tiles raise the maximum; and a
    /// head's result does not depend on the heads grouped with it.
    #[test]
    fn online_softmax_matches_f64_attention() {
        for ty in KV_TYPES {
            let (d, n, heads) = (64, 77, 3);
            let q = rand_vec(heads * d, 1, 1.0);
            let keys = kv_rows(ty, d, n, 10, 2.0);
            let values = kv_rows(ty, d, n, 500, 1.0);
            let k: Vec<&[u8]> = keys.iter().map(|r| &r.0[..]).collect();
            let v: Vec<&[u8]> = values.iter().map(|r| &r.0[..]).collect();
            // Scores grow along the sequence so that the maximum moves tile after tile.
            let mut raw = vec![0.0; heads * n];
            kv_scores(ty, d, &q, &k, 0.9, &mut raw);
            let score = |h: usize, j: usize| raw[h * n + j] + j as f32 * 0.15;
            for tiles in [
                vec![77],
                vec![16, 16, 16, 16, 13],
                vec![1; 77],
                vec![5, 30, 2, 40],
            ] {
                let mut state = OnlineSoftmax::default();
                state.reset(heads, d);
                let mut at = 0;
                for t in tiles {
                    let mut s: Vec<f32> = (0..heads)
                        .flat_map(|h| (at..at + t).map(move |j| (h, j)))
                        .map(|(h, j)| score(h, j))
                        .collect();
                    state.add_tile(ty, &mut s, &v[at..at + t]);
                    at += t;
                }
                state.add_tile(ty, &mut [], &[]);
                let mut out = vec![0.0; heads * d];
                state.finish(&mut out);
                for h in 0..heads {
                    let s64: Vec<f64> = (0..n).map(|j| score(h, j) as f64).collect();
                    let m = s64.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s64.iter().map(|s| (s - m).exp()).sum();
                    for e in 0..d {
                        let want: f64 = (0..n)
                            .map(|j| (s64[j] - m).exp() / z * values[j].1[e] as f64)
                            .sum();
                        let o = out[h * d + e] as f64;
                        assert!((o - want).abs() < 2e-6, "{ty} head {h}: {o} vs {want}");
                    }
                }
            }
            // The middle head alone, in tiles of 16, gives the same bits as in its group.
            let mut alone = OnlineSoftmax::default();
            alone.reset(1, d);
            for t0 in (0..n).step_by(16) {
                let t1 = (t0 + 16).min(n);
                let mut s: Vec<f32> = (t0..t1).map(|j| score(1, j)).collect();
                alone.add_tile(ty, &mut s, &v[t0..t1]);
            }
            let mut out = vec![0.0; d];
            alone.finish(&mut out);
            let mut grouped = OnlineSoftmax::default();
            grouped.reset(heads, d);
            for t0 in (0..n).step_by(16) {
                let t1 = (t0 + 16).min(n);
                let mut s: Vec<f32> = (0..heads)
                    .flat_map(|h| (t0..t1).map(move |j| (h, j)))
                    .map(|(h, j)| score(h, j))
                    .collect();
                grouped.add_tile(ty, &mut s, &v[t0..t1]);
            }
            let mut all = vec![0.0; heads * d];
            grouped.finish(&mut all);
            assert_eq!(out, all[d..2 * d], "{ty}: a head alone and in its group");
        }
    }
}
