//! Dot products of one quantized weight row with one activation row quantized to the weight
//! type's `vec_dot_type` (Q8_0, Q8_1 or Q8_K): exact integer sums inside each block, then f32.
//!
//! The f32 part is evaluated block by block in a fixed order, identical in the SIMD kernels, so
//! every kernel returns the same bits as this scalar reference.

use super::dequant::five_bit;
use super::{f16_at, f32_at, q3k_scales, scale_min_k4};
use crate::DType;

/// `Σ w·a` over `n` elements: `w` is a row of `wtype`, `a` the activations already quantized to
/// `wtype.vec_dot_type()`. Uses the fastest kernel this CPU supports.
pub fn vec_dot(wtype: DType, w: &[u8], a: &[u8], n: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2()
        && let Some(v) = super::avx2::vec_dot(wtype, w, a, n)
    {
        return v;
    }
    vec_dot_scalar(wtype, w, a, n)
}

/// Four dot products `w[r]·a[r]`, each equal to `vec_dot(wtype, w[r], a[r], n)` bit for bit;
/// faster where a four-pair kernel exists (one reduction for four pairs, and one unpacking of a
/// weight block shared by four activation rows).
pub fn vec_dot_x4(wtype: DType, w: [&[u8]; 4], a: [&[u8]; 4], n: usize) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2()
        && let Some(v) = super::avx2::vec_dot_x4(wtype, w, a, n)
    {
        return v;
    }
    std::array::from_fn(|r| vec_dot(wtype, w[r], a[r], n))
}

/// `out[j]` = [`vec_dot_x4`] of weight row `j` (rows stored one after another in `w`) with the
/// four activation rows `a`: one call for a tile of weight rows, so the kernel choice and checks
/// are paid once per tile rather than per row.
pub fn vec_dot_x4_rows(wtype: DType, w: &[u8], a: [&[u8]; 4], n: usize, out: &mut [[f32; 4]]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() && super::avx2::rows_x4(wtype, w, a, n, out).is_some() {
        return;
    }
    // No shared-weight kernel for this type (or CPU): the one-pair kernels give the same bits.
    let row = wtype.bytes_for(n);
    for (wr, o) in w.chunks_exact(row).zip(out.iter_mut()) {
        *o = a.map(|ar| vec_dot(wtype, wr, ar, n));
    }
}

/// The scalar reference every other kernel must equal.
pub fn vec_dot_scalar(wtype: DType, w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = n / wtype.block_size();
    let (wt, at) = (wtype.type_size(), wtype.vec_dot_type().type_size());
    debug_assert_eq!(w.len(), nb * wt);
    debug_assert_eq!(a.len(), nb * at);
    let block: fn(&[u8], &[u8]) -> f32 = match wtype {
        DType::Q4_0 => q4_0_q8_0,
        DType::Q4_1 => q4_1_q8_1,
        DType::Q5_0 => q5_0_q8_0,
        DType::Q5_1 => q5_1_q8_1,
        DType::Q8_0 => q8_0_q8_0,
        DType::Q2K => q2_k_q8_k,
        DType::Q3K => q3_k_q8_k,
        DType::Q4K => q4_k_q8_k,
        DType::Q5K => q5_k_q8_k,
        DType::Q6K => q6_k_q8_k,
        other => panic!("no integer dot product for weights of type {other}"),
    };
    let mut sum = 0.0f32;
    for (wb, ab) in w.chunks_exact(wt).zip(a.chunks_exact(at)) {
        sum += block(wb, ab);
    }
    sum
}

#[inline]
fn i8s(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    b.iter().map(|&v| v as i8 as i32)
}

/// Q8_0 activations: scale at 0, values at 2.
pub(crate) fn q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let sumi: i32 = i8s(&w[2..34]).zip(i8s(&a[2..34])).map(|(x, y)| x * y).sum();
    sumi as f32 * (f16_at(w, 0) * f16_at(a, 0))
}

pub(crate) fn q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumi = 0i32;
    for j in 0..16 {
        let q = w[2 + j];
        sumi += ((q & 0xF) as i32 - 8) * a[2 + j] as i8 as i32;
        sumi += ((q >> 4) as i32 - 8) * a[18 + j] as i8 as i32;
    }
    sumi as f32 * (f16_at(w, 0) * f16_at(a, 0))
}

pub(crate) fn q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let q = five_bit(w, 2, 6);
    let sumi: i32 = q
        .iter()
        .zip(i8s(&a[2..34]))
        .map(|(&x, y)| (x as i32 - 16) * y)
        .sum();
    sumi as f32 * (f16_at(w, 0) * f16_at(a, 0))
}

/// Q8_1 activations: scale at 0, scaled sum at 2, values at 4.
pub(crate) fn q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumi = 0i32;
    for j in 0..16 {
        let q = w[4 + j];
        sumi += (q & 0xF) as i32 * a[4 + j] as i8 as i32;
        sumi += (q >> 4) as i32 * a[20 + j] as i8 as i32;
    }
    (f16_at(w, 0) * f16_at(a, 0)) * sumi as f32 + f16_at(w, 2) * f16_at(a, 2)
}

pub(crate) fn q5_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let q = five_bit(w, 4, 8);
    let sumi: i32 = q
        .iter()
        .zip(i8s(&a[4..36]))
        .map(|(&x, y)| x as i32 * y)
        .sum();
    (f16_at(w, 0) * f16_at(a, 0)) * sumi as f32 + f16_at(w, 2) * f16_at(a, 2)
}

/// Q8_K activations: f32 scale at 0, values at 4, i16 sums of each 16 at 260.
#[inline]
pub(crate) fn q8k_bsum(a: &[u8], g: usize) -> i32 {
    i16::from_le_bytes([a[260 + 2 * g], a[261 + 2 * g]]) as i32
}

/// Combine one super-block's integer sums: `ad · (wd · Σ sc·q·a − wdmin · Σ m·bsum)`.
#[inline]
pub(crate) fn combine_k(ad: f32, wd: f32, wdmin: f32, sumi: i32, summ: i32) -> f32 {
    ad * wd * sumi as f32 - ad * wdmin * summ as f32
}

pub(crate) fn q4_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let (mut sumi, mut summ) = (0i32, 0i32);
    for c in 0..4 {
        let q = &w[16 + 32 * c..48 + 32 * c];
        let (sc1, m1) = scale_min_k4(2 * c, &w[4..16]);
        let (sc2, m2) = scale_min_k4(2 * c + 1, &w[4..16]);
        let a1 = &a[4 + 64 * c..36 + 64 * c];
        let a2 = &a[36 + 64 * c..68 + 64 * c];
        let d1: i32 = q
            .iter()
            .zip(i8s(a1))
            .map(|(&x, y)| (x & 0xF) as i32 * y)
            .sum();
        let d2: i32 = q
            .iter()
            .zip(i8s(a2))
            .map(|(&x, y)| (x >> 4) as i32 * y)
            .sum();
        sumi += sc1 as i32 * d1 + sc2 as i32 * d2;
        summ += m1 as i32 * (q8k_bsum(a, 4 * c) + q8k_bsum(a, 4 * c + 1))
            + m2 as i32 * (q8k_bsum(a, 4 * c + 2) + q8k_bsum(a, 4 * c + 3));
    }
    combine_k(f32_at(a, 0), f16_at(w, 0), f16_at(w, 2), sumi, summ)
}

pub(crate) fn q5_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let qh = &w[16..48];
    let (mut sumi, mut summ) = (0i32, 0i32);
    for c in 0..4 {
        let ql = &w[48 + 32 * c..80 + 32 * c];
        let (sc1, m1) = scale_min_k4(2 * c, &w[4..16]);
        let (sc2, m2) = scale_min_k4(2 * c + 1, &w[4..16]);
        let (mut d1, mut d2) = (0i32, 0i32);
        for l in 0..32 {
            let h1 = ((qh[l] >> (2 * c)) & 1) as i32 * 16;
            let h2 = ((qh[l] >> (2 * c + 1)) & 1) as i32 * 16;
            d1 += ((ql[l] & 0xF) as i32 + h1) * a[4 + 64 * c + l] as i8 as i32;
            d2 += ((ql[l] >> 4) as i32 + h2) * a[36 + 64 * c + l] as i8 as i32;
        }
        sumi += sc1 as i32 * d1 + sc2 as i32 * d2;
        summ += m1 as i32 * (q8k_bsum(a, 4 * c) + q8k_bsum(a, 4 * c + 1))
            + m2 as i32 * (q8k_bsum(a, 4 * c + 2) + q8k_bsum(a, 4 * c + 3));
    }
    combine_k(f32_at(a, 0), f16_at(w, 0), f16_at(w, 2), sumi, summ)
}

pub(crate) fn q6_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumi = 0i32;
    for half in 0..2 {
        let ql = &w[64 * half..64 * half + 64];
        let qh = &w[128 + 32 * half..160 + 32 * half];
        let sc = &w[192 + 8 * half..200 + 8 * half];
        let aa = &a[4 + 128 * half..132 + 128 * half];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            sumi += sc[is] as i8 as i32 * q1 * aa[l] as i8 as i32;
            sumi += sc[is + 2] as i8 as i32 * q2 * aa[l + 32] as i8 as i32;
            sumi += sc[is + 4] as i8 as i32 * q3 * aa[l + 64] as i8 as i32;
            sumi += sc[is + 6] as i8 as i32 * q4 * aa[l + 96] as i8 as i32;
        }
    }
    f32_at(a, 0) * f16_at(w, 208) * sumi as f32
}

pub(crate) fn q3_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let (hmask, qs) = (&w[0..32], &w[32..96]);
    let scales = q3k_scales(&w[96..108]);
    let mut sumi = 0i32;
    let mut e = 0;
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for (k, shift) in [0, 2, 4, 6].into_iter().enumerate() {
            let m = 1u8 << (4 * half + k);
            for part in 0..2 {
                let mut s = 0i32;
                for l in 0..16 {
                    let i = 16 * part + l;
                    let v = ((q[i] >> shift) & 3) as i32 - if hmask[i] & m != 0 { 0 } else { 4 };
                    s += v * a[4 + e + l] as i8 as i32;
                }
                sumi += scales[e / 16] as i32 * s;
                e += 16;
            }
        }
    }
    f32_at(a, 0) * f16_at(w, 108) * sumi as f32
}

pub(crate) fn q2_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let (scales, qs) = (&w[0..16], &w[16..80]);
    let (mut sumi, mut summ) = (0i32, 0i32);
    let mut e = 0;
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[e / 16];
                let s: i32 = (0..16)
                    .map(|l| ((q[16 * part + l] >> shift) & 3) as i32 * a[4 + e + l] as i8 as i32)
                    .sum();
                sumi += (sc & 0xF) as i32 * s;
                summ += (sc >> 4) as i32 * q8k_bsum(a, e / 16);
                e += 16;
            }
        }
    }
    combine_k(f32_at(a, 0), f16_at(w, 80), f16_at(w, 82), sumi, summ)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize};
    use crate::testing::rand_vec;

    /// The integer dot product equals the f32 dot of the two dequantized rows (up to rounding).
    #[test]
    fn integer_dot_equals_dequantized_dot() {
        let n = 512;
        for wt in [
            DType::Q4_0,
            DType::Q4_1,
            DType::Q5_0,
            DType::Q5_1,
            DType::Q8_0,
            DType::Q4K,
            DType::Q5K,
            DType::Q6K,
        ] {
            let x = rand_vec(n, 1, 1.0);
            let y = rand_vec(n, 2, 1.0);
            let mut wq = vec![0u8; wt.bytes_for(n)];
            quantize(wt, &x, &mut wq);
            let at = wt.vec_dot_type();
            let mut aq = vec![0u8; at.bytes_for(n)];
            quantize(at, &y, &mut aq);
            let (mut wd, mut ad) = (vec![0.0; n], vec![0.0; n]);
            dequantize(wt, &wq, &mut wd);
            dequantize(at, &aq, &mut ad);
            let want: f32 = wd.iter().zip(&ad).map(|(a, b)| a * b).sum();
            let got = vec_dot_scalar(wt, &wq, &aq, n);
            assert!(
                (got - want).abs() < 1e-3 * want.abs().max(1.0),
                "{wt}: {got} vs {want}"
            );
        }
    }
}
