//! AVX2 integer dot products. Each computes the same per-block integer sums as the scalar
//! reference (exact) and combines them in f32 in the same order, so results are bit-identical.

use std::arch::x86_64::*;

use super::dot::{combine_k, q8k_bsum};
use super::{f16_at, f32_at, scale_min_k4};
use crate::DType;

/// `Some(result)` when there is an AVX2 kernel for `wtype`. Callers check `has_avx2()` first.
pub(crate) fn vec_dot(wtype: DType, w: &[u8], a: &[u8], n: usize) -> Option<f32> {
    let nb = n / wtype.block_size();
    assert!(w.len() >= nb * wtype.type_size() && a.len() >= nb * wtype.vec_dot_type().type_size());
    // SAFETY: has_avx2() confirmed AVX2 and FMA at run time; the slices hold nb whole blocks
    // (asserted above) and every load below stays inside its block.
    unsafe {
        match wtype {
            DType::Q8_0 => Some(q8_0_q8_0(w, a, nb)),
            DType::Q4_0 => Some(q4_0_q8_0(w, a, nb)),
            DType::Q5_0 => Some(q5_0_q8_0(w, a, nb)),
            DType::Q4K => Some(q4_k_q8_k(w, a, nb)),
            DType::Q5K => Some(q5_k_q8_k(w, a, nb)),
            DType::Q6K => Some(q6_k_q8_k(w, a, nb)),
            _ => None,
        }
    }
}

/// Four dot products at once, pairs `(w[r], a[r])`, for the types with a four-pair kernel. Each
/// result has the bits of the one-pair kernel: the block sums are exact integers (any reduction
/// order gives them), and the f32 part is the same multiply and add, one lane per pair.
pub(crate) fn vec_dot_x4(wtype: DType, w: [&[u8]; 4], a: [&[u8]; 4], n: usize) -> Option<[f32; 4]> {
    let nb = n / wtype.block_size();
    let (wt, at) = (wtype.type_size(), wtype.vec_dot_type().type_size());
    assert!(w.iter().all(|r| r.len() >= nb * wt) && a.iter().all(|r| r.len() >= nb * at));
    // Weight blocks are unpacked once when all four pairs share the weight row (a batch).
    let same_w = w.iter().all(|r| std::ptr::eq(r.as_ptr(), w[0].as_ptr()));
    // SAFETY: has_avx2() confirmed AVX2, FMA and F16C at run time; every row holds nb whole
    // blocks (asserted above) and every load below stays inside its block.
    unsafe {
        match wtype {
            DType::Q8_0 => Some(q8_0_q8_0_x4(w, a, nb)),
            DType::Q5_0 => Some(q5_0_q8_0_x4(w, a, nb, same_w)),
            _ => None,
        }
    }
}

/// Lane r: the sum of the eight i32 lanes of `s[r]`.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum4_i32(s: [__m256i; 4]) -> __m128i {
    let h01 = _mm256_hadd_epi32(s[0], s[1]);
    let h23 = _mm256_hadd_epi32(s[2], s[3]);
    let h = _mm256_hadd_epi32(h01, h23);
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
}

/// Four f16 values (raw bits) as f32 lanes (exact).
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn f16x4(h: [i16; 4]) -> __m128 {
    _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, h[3], h[2], h[1], h[0]))
}

/// The f16 at byte `off` of row `r`, as raw bits.
#[inline(always)]
fn f16_bits(r: &[u8], off: usize) -> i16 {
    i16::from_le_bytes([r[off], r[off + 1]])
}

#[inline]
#[target_feature(enable = "avx2")]
fn store4(v: __m128) -> [f32; 4] {
    let mut out = [0.0f32; 4];
    // SAFETY: out holds four f32; unaligned store.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), v) };
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_q8_0_x4(w: [&[u8]; 4], a: [&[u8]; 4], nb: usize) -> [f32; 4] {
    let mut acc = _mm_setzero_ps();
    for i in 0..nb {
        let o = 34 * i;
        let mut s = [_mm256_setzero_si256(); 4];
        for r in 0..4 {
            // SAFETY: bytes 2..34 of block i of each row.
            let (x, y) = unsafe { (load(w[r], o + 2), load(a[r], o + 2)) };
            s[r] = dot_i8(x, y);
        }
        let dw = f16x4([0, 1, 2, 3].map(|r| f16_bits(w[r], o)));
        let da = f16x4([0, 1, 2, 3].map(|r| f16_bits(a[r], o)));
        let d = _mm_mul_ps(dw, da);
        acc = _mm_add_ps(acc, _mm_mul_ps(_mm_cvtepi32_ps(hsum4_i32(s)), d));
    }
    store4(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_q8_0_x4(w: [&[u8]; 4], a: [&[u8]; 4], nb: usize, same_w: bool) -> [f32; 4] {
    let mut acc = _mm_setzero_ps();
    for i in 0..nb {
        let (ow, oa) = (22 * i, 34 * i);
        let mut s = [_mm256_setzero_si256(); 4];
        let mut x = _mm256_setzero_si256();
        for r in 0..4 {
            if r == 0 || !same_w {
                x = unpack_q5_0(&w[r][ow..ow + 22]);
            }
            // SAFETY: bytes 2..34 of activation block i.
            let y = unsafe { load(a[r], oa + 2) };
            s[r] = dot_i8(x, y);
        }
        let dw = f16x4([0, 1, 2, 3].map(|r| f16_bits(w[r], ow)));
        let da = f16x4([0, 1, 2, 3].map(|r| f16_bits(a[r], oa)));
        let d = _mm_mul_ps(dw, da);
        acc = _mm_add_ps(acc, _mm_mul_ps(_mm_cvtepi32_ps(hsum4_i32(s)), d));
    }
    store4(acc)
}

/// The 32 signed 5-bit weights of a Q5_0 block (−16..15) as bytes.
#[inline]
#[target_feature(enable = "avx2")]
fn unpack_q5_0(wb: &[u8]) -> __m256i {
    let low = _mm_set1_epi8(0x0F);
    // SAFETY: 16 nibble bytes at 6..22 of the 22-byte block.
    let q = unsafe { _mm_loadu_si128(wb.as_ptr().add(6) as *const __m128i) };
    let lo = _mm_and_si128(q, low);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), low);
    let qh = u32::from_le_bytes([wb[2], wb[3], wb[4], wb[5]]);
    let fifth = _mm256_and_si256(bytes_from_bits(qh), _mm256_set1_epi8(0x10));
    _mm256_sub_epi8(
        _mm256_or_si256(_mm256_set_m128i(hi, lo), fifth),
        _mm256_set1_epi8(16),
    )
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load(p: &[u8], off: usize) -> __m256i {
    debug_assert!(off + 32 <= p.len());
    // SAFETY: callers keep off + 32 within the block; unaligned load.
    unsafe { _mm256_loadu_si256(p.as_ptr().add(off) as *const __m256i) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Σ x·y over 32 signed bytes each, as eight i32 lanes (abs/sign trick for maddubs).
#[inline]
#[target_feature(enable = "avx2")]
fn dot_i8(x: __m256i, y: __m256i) -> __m256i {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0_q8_0(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..nb {
        let (wb, ab) = (&w[34 * i..34 * i + 34], &a[34 * i..34 * i + 34]);
        // SAFETY: bytes 2..34 of each 34-byte block.
        let (x, y) = unsafe { (load(wb, 2), load(ab, 2)) };
        let sumi = hsum_i32(dot_i8(x, y));
        sum += sumi as f32 * (f16_at(wb, 0) * f16_at(ab, 0));
    }
    sum
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q4_0_q8_0(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0.0f32;
    let low = _mm256_set1_epi8(0x0F);
    let eight = _mm256_set1_epi8(8);
    for i in 0..nb {
        let (wb, ab) = (&w[18 * i..18 * i + 18], &a[34 * i..34 * i + 34]);
        // SAFETY: 16 nibble bytes at 2..18 of the 18-byte block.
        let q = unsafe { _mm_loadu_si128(wb.as_ptr().add(2) as *const __m128i) };
        let lo = _mm_and_si128(q, _mm256_castsi256_si128(low));
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), _mm256_castsi256_si128(low));
        let x = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), eight);
        // SAFETY: bytes 2..34 of the Q8_0 block.
        let y = unsafe { load(ab, 2) };
        let sumi = hsum_i32(dot_i8(x, y));
        sum += sumi as f32 * (f16_at(wb, 0) * f16_at(ab, 0));
    }
    sum
}

/// 32 bytes, 0xFF where bit `k` of `x` is set (byte `k` tests bit `k`).
#[inline]
#[target_feature(enable = "avx2")]
fn bytes_from_bits(x: u32) -> __m256i {
    // Byte k takes byte k/8 of x, then every bit but bit k%8 is forced on: all ones iff set.
    let spread = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), spread);
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
    _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi64x(-1))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q5_0_q8_0(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..nb {
        let (wb, ab) = (&w[22 * i..22 * i + 22], &a[34 * i..34 * i + 34]);
        let x = unpack_q5_0(wb);
        // SAFETY: bytes 2..34 of the Q8_0 block.
        let y = unsafe { load(ab, 2) };
        let sumi = hsum_i32(dot_i8(x, y));
        sum += sumi as f32 * (f16_at(wb, 0) * f16_at(ab, 0));
    }
    sum
}

/// Unsigned bytes (0..63) times signed activations, widened to i32 lanes and multiplied by one
/// 16-bit scale per half (elements 0..15 and 16..31).
#[inline]
#[target_feature(enable = "avx2")]
fn scaled_dot_u8(q: __m256i, y: __m256i, sc_lo: i16, sc_hi: i16) -> __m256i {
    let p = _mm256_maddubs_epi16(q, y);
    let sc = _mm256_set_m128i(_mm_set1_epi16(sc_hi), _mm_set1_epi16(sc_lo));
    _mm256_madd_epi16(p, sc)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q4_k_q8_k(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0.0f32;
    let mask = _mm256_set1_epi8(0x0F);
    for i in 0..nb {
        let (wb, ab) = (&w[144 * i..144 * i + 144], &a[292 * i..292 * i + 292]);
        let mut acc = _mm256_setzero_si256();
        let mut summ = 0i32;
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, &wb[4..16]);
            let (sc2, m2) = scale_min_k4(2 * c + 1, &wb[4..16]);
            // SAFETY: qs chunk c is bytes 16+32c..48+32c; activations 4+64c..68+64c.
            let (q, y1, y2) = unsafe {
                (
                    load(wb, 16 + 32 * c),
                    load(ab, 4 + 64 * c),
                    load(ab, 36 + 64 * c),
                )
            };
            let lo = _mm256_and_si256(q, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask);
            acc = _mm256_add_epi32(acc, scaled_dot_u8(lo, y1, sc1 as i16, sc1 as i16));
            acc = _mm256_add_epi32(acc, scaled_dot_u8(hi, y2, sc2 as i16, sc2 as i16));
            summ += m1 as i32 * (q8k_bsum(ab, 4 * c) + q8k_bsum(ab, 4 * c + 1))
                + m2 as i32 * (q8k_bsum(ab, 4 * c + 2) + q8k_bsum(ab, 4 * c + 3));
        }
        sum += combine_k(
            f32_at(ab, 0),
            f16_at(wb, 0),
            f16_at(wb, 2),
            hsum_i32(acc),
            summ,
        );
    }
    sum
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q5_k_q8_k(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0.0f32;
    let mask = _mm256_set1_epi8(0x0F);
    let sixteen = _mm256_set1_epi8(16);
    for i in 0..nb {
        let (wb, ab) = (&w[176 * i..176 * i + 176], &a[292 * i..292 * i + 292]);
        // SAFETY: qh is bytes 16..48.
        let qh = unsafe { load(wb, 16) };
        let mut acc = _mm256_setzero_si256();
        let mut summ = 0i32;
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, &wb[4..16]);
            let (sc2, m2) = scale_min_k4(2 * c + 1, &wb[4..16]);
            // SAFETY: ql chunk c is bytes 48+32c..80+32c; activations as in Q4_K.
            let (q, y1, y2) = unsafe {
                (
                    load(wb, 48 + 32 * c),
                    load(ab, 4 + 64 * c),
                    load(ab, 36 + 64 * c),
                )
            };
            let bit1 = _mm256_set1_epi8((1u8 << (2 * c)) as i8);
            let bit2 = _mm256_set1_epi8((2u8 << (2 * c)) as i8);
            let h1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit1), bit1), sixteen);
            let h2 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit2), bit2), sixteen);
            let lo = _mm256_add_epi8(_mm256_and_si256(q, mask), h1);
            let hi = _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16::<4>(q), mask), h2);
            acc = _mm256_add_epi32(acc, scaled_dot_u8(lo, y1, sc1 as i16, sc1 as i16));
            acc = _mm256_add_epi32(acc, scaled_dot_u8(hi, y2, sc2 as i16, sc2 as i16));
            summ += m1 as i32 * (q8k_bsum(ab, 4 * c) + q8k_bsum(ab, 4 * c + 1))
                + m2 as i32 * (q8k_bsum(ab, 4 * c + 2) + q8k_bsum(ab, 4 * c + 3));
        }
        sum += combine_k(
            f32_at(ab, 0),
            f16_at(wb, 0),
            f16_at(wb, 2),
            hsum_i32(acc),
            summ,
        );
    }
    sum
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q6_k_q8_k(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0.0f32;
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    for i in 0..nb {
        let (wb, ab) = (&w[210 * i..210 * i + 210], &a[292 * i..292 * i + 292]);
        let sc = |j: usize| wb[192 + j] as i8 as i16;
        let mut acc = _mm256_setzero_si256();
        // Σ_g scale_g · bsum_g: the −32 offset of every 6-bit value, applied once.
        let offset: i32 = (0..16).map(|g| sc(g) as i32 * q8k_bsum(ab, g)).sum();
        for half in 0..2 {
            let (ql0, qh0, a0, s0) = (64 * half, 128 + 32 * half, 4 + 128 * half, 8 * half);
            // SAFETY: ql half is 64 bytes at ql0, qh half 32 bytes at qh0, activations 128 at a0.
            let (l1, l2, h) = unsafe { (load(wb, ql0), load(wb, ql0 + 32), load(wb, qh0)) };
            let q1 = _mm256_or_si256(
                _mm256_and_si256(l1, m4),
                _mm256_slli_epi16::<4>(_mm256_and_si256(h, m2)),
            );
            let q2 = _mm256_or_si256(
                _mm256_and_si256(l2, m4),
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(h), m2)),
            );
            let q3 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(h), m2)),
            );
            let q4 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(l2), m4),
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(h), m2)),
            );
            // SAFETY: four 32-byte activation groups inside the half.
            let (y1, y2, y3, y4) = unsafe {
                (
                    load(ab, a0),
                    load(ab, a0 + 32),
                    load(ab, a0 + 64),
                    load(ab, a0 + 96),
                )
            };
            acc = _mm256_add_epi32(acc, scaled_dot_u8(q1, y1, sc(s0), sc(s0 + 1)));
            acc = _mm256_add_epi32(acc, scaled_dot_u8(q2, y2, sc(s0 + 2), sc(s0 + 3)));
            acc = _mm256_add_epi32(acc, scaled_dot_u8(q3, y3, sc(s0 + 4), sc(s0 + 5)));
            acc = _mm256_add_epi32(acc, scaled_dot_u8(q4, y4, sc(s0 + 6), sc(s0 + 7)));
        }
        let sumi = hsum_i32(acc) - 32 * offset;
        sum += f32_at(ab, 0) * f16_at(wb, 208) * sumi as f32;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize, vec_dot_scalar};
    use crate::testing::rand_vec;

    /// Every AVX2 kernel returns exactly the scalar reference's bits, on random data of several
    /// scales and every row length from one block up (ragged block counts).
    #[test]
    fn four_pair_kernels_equal_scalar() {
        if !super::super::has_avx2() {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        for wt in [DType::Q8_0, DType::Q5_0] {
            let at = wt.vec_dot_type();
            for blocks in [1, 2, 5, 9, 20] {
                let n = blocks * wt.block_size();
                let rows = |seed: u64, t: DType| -> Vec<Vec<u8>> {
                    (0..4)
                        .map(|r| {
                            let scale = [1.0, 1e-3, 40.0, 3.0][r];
                            let x = rand_vec(n, seed + r as u64, scale);
                            let mut q = vec![0u8; t.bytes_for(n)];
                            quantize(t, &x, &mut q);
                            q
                        })
                        .collect()
                };
                let (ws, acts) = (rows(blocks as u64, wt), rows(100 + blocks as u64, at));
                let a = [0, 1, 2, 3].map(|r| acts[r].as_slice());
                // Four different weight rows (decode), then one weight row for four
                // activation rows (a batch).
                for w in [
                    [0, 1, 2, 3].map(|r| ws[r].as_slice()),
                    [ws[2].as_slice(); 4],
                ] {
                    let fast = vec_dot_x4(wt, w, a, n).unwrap();
                    for r in 0..4 {
                        let slow = vec_dot_scalar(wt, w[r], a[r], n);
                        assert_eq!(fast[r].to_bits(), slow.to_bits(), "{wt} n={n} pair {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn avx2_equals_scalar() {
        if !super::super::has_avx2() {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        for wt in [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q5_0,
            DType::Q4K,
            DType::Q5K,
            DType::Q6K,
        ] {
            let bs = wt.block_size();
            for blocks in 1..=9 {
                let n = blocks * bs;
                for (seed, scale) in [(1, 1.0), (2, 1e-3), (3, 40.0)] {
                    let x = rand_vec(n, seed, scale);
                    let y = rand_vec(n, seed + 10, scale);
                    let mut wq = vec![0u8; wt.bytes_for(n)];
                    quantize(wt, &x, &mut wq);
                    let at = wt.vec_dot_type();
                    let mut aq = vec![0u8; at.bytes_for(n)];
                    quantize(at, &y, &mut aq);
                    let fast = vec_dot(wt, &wq, &aq, n).unwrap();
                    let slow = vec_dot_scalar(wt, &wq, &aq, n);
                    assert_eq!(
                        fast.to_bits(),
                        slow.to_bits(),
                        "{wt} n={n}: {fast} vs {slow}"
                    );
                }
            }
        }
    }
}
