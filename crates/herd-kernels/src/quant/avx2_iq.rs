//! AVX2 dot products of the 256-value IQ types against Q8_K activations. Each super-block's
//! integer sum is the scalar reference's (`iq.rs`), exact in i32 lanes, and the f32 steps are
//! the reference's, so results are bit-identical.
//!
//! Per 32 values: the grid entries are gathered into one register of unsigned magnitudes
//! (`_mm256_set_epi64x` of table loads, as ggml's AVX2 kernels do), the signs are applied to
//! the activations (`_mm256_sign_epi8` with bytes 0x01 or 0xFF; Q8_K values lie in −127..127,
//! so negation never wraps), `maddubs` forms pair sums in i16 (at most 2·62·127 for the grids,
//! 2·127·127 for IQ4_XS's table) and `madd` multiplies them by the block scales into i32 lanes.

use std::arch::x86_64::*;

use super::avx2::{f16_ptr, f32_ptr, hsum_i32, table_nibbles};
use super::iq::{self, iq1_m_d};
use super::iq_tables::*;
use crate::DType;

/// Bytes of a Q8_K block; its values start at 4 and its sums of 16 at 260.
const Q8K_BYTES: usize = 292;

/// For each 8-bit sign mask, eight bytes: 0xFF where the bit is set (negate), else 0x01.
static SIGNS8: [u64; 256] = signs8();

const fn signs8() -> [u64; 256] {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut v = 0u64;
        let mut j = 0;
        while j < 8 {
            let b: u64 = if (i >> j) & 1 == 1 { 0xFF } else { 0x01 };
            v |= b << (8 * j);
            j += 1;
        }
        t[i] = v;
        i += 1;
    }
    t
}

/// One row of a 256-value IQ type: `nb` super-blocks of `w` against `nb` Q8_K blocks of `a`.
/// The caller has checked AVX2, FMA and F16C and that both rows hold `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn row(wtype: DType, w: &[u8], a: &[u8], nb: usize) -> f32 {
    // SAFETY: the features are enabled here; each kernel reads only inside block i of `w`
    // and of `a` (checked by the caller).
    unsafe {
        let acc = match wtype {
            DType::IQ2XXS => row_of(wtype, w, a, nb, |wb, ab| iq2_xxs(wb, ab)),
            DType::IQ2XS => row_of(wtype, w, a, nb, |wb, ab| iq2_xs(wb, ab)),
            DType::IQ2S => row_of(wtype, w, a, nb, |wb, ab| iq2_s(wb, ab)),
            DType::IQ3XXS => row_of(wtype, w, a, nb, |wb, ab| iq3_xxs(wb, ab)),
            DType::IQ3S => row_of(wtype, w, a, nb, |wb, ab| iq3_s(wb, ab)),
            DType::IQ1S => row_of(wtype, w, a, nb, |wb, ab| iq1_s(wb, ab)),
            DType::IQ1M => row_of(wtype, w, a, nb, |wb, ab| iq1_m(wb, ab)),
            DType::IQ4XS => row_of(wtype, w, a, nb, |wb, ab| iq4_xs(wb, ab)),
            other => unreachable!("{other} is not a 256-value IQ type"),
        };
        acc * iq::row_constant(wtype)
    }
}

/// The reference's f32 steps over a row, `isum` giving each super-block's exact integer sum.
///
/// # Safety
/// AVX2, FMA and F16C; both rows hold `nb` blocks.
#[inline(always)]
unsafe fn row_of(
    wtype: DType,
    w: &[u8],
    a: &[u8],
    nb: usize,
    isum: impl Fn(*const u8, *const u8) -> i32,
) -> f32 {
    let ts = wtype.type_size();
    debug_assert!(w.len() >= nb * ts && a.len() >= nb * Q8K_BYTES);
    let mut acc = 0.0f32;
    for i in 0..nb {
        // SAFETY: block i of each row is in bounds (the caller's promise).
        unsafe {
            let (wb, ab) = (w.as_ptr().add(i * ts), a.as_ptr().add(i * Q8K_BYTES));
            let dw = if wtype == DType::IQ1M {
                iq1_m_d(std::slice::from_raw_parts(wb, ts))
            } else {
                f16_ptr(wb)
            };
            let d = dw * f32_ptr(ab);
            acc = (isum(wb, ab) as f32).mul_add(d, acc);
        }
    }
    acc
}

#[inline]
unsafe fn u16_ptr(p: *const u8) -> u16 {
    // SAFETY: the caller's block holds two bytes at p.
    unsafe { std::ptr::read_unaligned(p as *const u16) }
}

#[inline]
unsafe fn u32_ptr(p: *const u8) -> u32 {
    // SAFETY: the caller's block holds four bytes at p.
    unsafe { std::ptr::read_unaligned(p as *const u32) }
}

/// The 32 activations `e..e+32` of a Q8_K block.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q8(ab: *const u8, e: usize) -> __m256i {
    // SAFETY: e + 32 ≤ 256 values at 4.
    unsafe { _mm256_loadu_si256(ab.add(4 + e) as *const __m256i) }
}

/// For each 7-bit sign index of IQ2_XXS, IQ2_XS and IQ3_XXS, the sign bytes of its 8-bit mask
/// (`SIGNS8[KSIGNS_IQ2XS[i]]`: the eighth bit makes the count of negatives even), one load
/// instead of two dependent ones.
static EVEN_SIGNS8: [u64; 128] = even_signs8();

const fn even_signs8() -> [u64; 128] {
    let mut t = [0u64; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = SIGNS8[i | (((i as u32).count_ones() as usize & 1) << 7)];
        i += 1;
    }
    t
}

/// Four 7-bit sign indexes as the 32 sign bytes of their values.
#[inline]
#[target_feature(enable = "avx2")]
fn even_sign_bytes(s: [usize; 4]) -> __m256i {
    _mm256_set_epi64x(
        EVEN_SIGNS8[s[3]] as i64,
        EVEN_SIGNS8[s[2]] as i64,
        EVEN_SIGNS8[s[1]] as i64,
        EVEN_SIGNS8[s[0]] as i64,
    )
}

/// Four sign masks as the 32 sign bytes of their values.
#[inline]
#[target_feature(enable = "avx2")]
fn sign_bytes(s: [u8; 4]) -> __m256i {
    _mm256_set_epi64x(
        SIGNS8[s[3] as usize] as i64,
        SIGNS8[s[2] as usize] as i64,
        SIGNS8[s[1] as usize] as i64,
        SIGNS8[s[0] as usize] as i64,
    )
}

/// Pair sums of unsigned magnitudes `x` and signed activations `y`, times the i16 scale of
/// each pair, in eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn scaled(x: __m256i, y: __m256i, scales: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), scales)
}

/// One scale for values 0..16 and another for 16..32, as i16 pair multipliers.
#[inline]
#[target_feature(enable = "avx2")]
fn two_scales(lo: i32, hi: i32) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi as i16), _mm_set1_epi16(lo as i16))
}

#[target_feature(enable = "avx2")]
unsafe fn iq2_xxs(wb: *const u8, ab: *const u8) -> i32 {
    let mut s = _mm256_setzero_si256();
    for ib in 0..8 {
        // SAFETY: bytes 2 + 8·ib .. 10 + 8·ib of the 66-byte block.
        let (idx, aux) = unsafe { (u32_ptr(wb.add(2 + 8 * ib)), u32_ptr(wb.add(6 + 8 * ib))) };
        let g = |l: u32| IQ2XXS_GRID[((idx >> (8 * l)) & 0xFF) as usize] as i64;
        let x = _mm256_set_epi64x(g(3), g(2), g(1), g(0));
        let signs = [0, 1, 2, 3].map(|l| ((aux >> (7 * l)) & 127) as usize);
        // SAFETY: 32 values of the Q8_K block.
        let y = _mm256_sign_epi8(unsafe { q8(ab, 32 * ib) }, even_sign_bytes(signs));
        let ls = 2 * (aux >> 28) as i32 + 1;
        s = _mm256_add_epi32(s, scaled(x, y, _mm256_set1_epi16(ls as i16)));
    }
    hsum_i32(s)
}

#[target_feature(enable = "avx2")]
unsafe fn iq2_xs(wb: *const u8, ab: *const u8) -> i32 {
    let mut s = _mm256_setzero_si256();
    for ib in 0..8 {
        // SAFETY: four u16 at 2 + 8·ib and the scale byte at 66 + ib of the 74-byte block.
        let (q, sc) = unsafe {
            (
                [0, 1, 2, 3].map(|l| u16_ptr(wb.add(2 + 8 * ib + 2 * l))),
                *wb.add(66 + ib),
            )
        };
        let g = |l: usize| IQ2XS_GRID[(q[l] & 511) as usize] as i64;
        let x = _mm256_set_epi64x(g(3), g(2), g(1), g(0));
        let signs = q.map(|v| (v >> 9) as usize);
        // SAFETY: 32 values of the Q8_K block.
        let y = _mm256_sign_epi8(unsafe { q8(ab, 32 * ib) }, even_sign_bytes(signs));
        let scales = two_scales(2 * (sc & 0xF) as i32 + 1, 2 * (sc >> 4) as i32 + 1);
        s = _mm256_add_epi32(s, scaled(x, y, scales));
    }
    hsum_i32(s)
}

#[target_feature(enable = "avx2")]
unsafe fn iq2_s(wb: *const u8, ab: *const u8) -> i32 {
    let mut s = _mm256_setzero_si256();
    for ib in 0..8 {
        // SAFETY: index bytes at 2 + 4·ib, signs at 34 + 4·ib, high bits at 66 + ib and the
        // scale at 74 + ib, all inside the 82-byte block.
        let (lo, signs, qh, sc) = unsafe {
            (
                [0, 1, 2, 3].map(|l| *wb.add(2 + 4 * ib + l) as usize),
                [0, 1, 2, 3].map(|l| *wb.add(34 + 4 * ib + l)),
                *wb.add(66 + ib) as usize,
                *wb.add(74 + ib),
            )
        };
        let g = |l: usize| IQ2S_GRID[lo[l] | ((qh << (8 - 2 * l)) & 0x300)] as i64;
        let x = _mm256_set_epi64x(g(3), g(2), g(1), g(0));
        // SAFETY: 32 values of the Q8_K block.
        let y = _mm256_sign_epi8(unsafe { q8(ab, 32 * ib) }, sign_bytes(signs));
        let scales = two_scales(2 * (sc & 0xF) as i32 + 1, 2 * (sc >> 4) as i32 + 1);
        s = _mm256_add_epi32(s, scaled(x, y, scales));
    }
    hsum_i32(s)
}

#[target_feature(enable = "avx2")]
unsafe fn iq3_xxs(wb: *const u8, ab: *const u8) -> i32 {
    let mut s = _mm256_setzero_si256();
    for ib in 0..8 {
        // SAFETY: eight index bytes at 2 + 8·ib and the u32 at 66 + 4·ib of the 98-byte block.
        let (idx, aux) = unsafe {
            (
                [0, 1, 2, 3, 4, 5, 6, 7].map(|k| *wb.add(2 + 8 * ib + k) as usize),
                u32_ptr(wb.add(66 + 4 * ib)),
            )
        };
        let g = |k: usize| IQ3XXS_GRID[idx[k]] as i32;
        let x = _mm256_set_epi32(g(7), g(6), g(5), g(4), g(3), g(2), g(1), g(0));
        let signs = [0, 1, 2, 3].map(|l| ((aux >> (7 * l)) & 127) as usize);
        // SAFETY: 32 values of the Q8_K block.
        let y = _mm256_sign_epi8(unsafe { q8(ab, 32 * ib) }, even_sign_bytes(signs));
        let ls = 2 * (aux >> 28) as i32 + 1;
        s = _mm256_add_epi32(s, scaled(x, y, _mm256_set1_epi16(ls as i16)));
    }
    hsum_i32(s)
}

#[target_feature(enable = "avx2")]
unsafe fn iq3_s(wb: *const u8, ab: *const u8) -> i32 {
    let mut s = _mm256_setzero_si256();
    for ib in 0..8 {
        // SAFETY: index bytes at 2 + 8·ib, the high bits at 66 + ib, signs at 74 + 4·ib and the
        // scales at 106 + ib/2, all inside the 110-byte block.
        let (lo, qh, signs, sc) = unsafe {
            (
                [0, 1, 2, 3, 4, 5, 6, 7].map(|k| *wb.add(2 + 8 * ib + k) as usize),
                *wb.add(66 + ib) as usize,
                [0, 1, 2, 3].map(|l| *wb.add(74 + 4 * ib + l)),
                *wb.add(106 + ib / 2),
            )
        };
        // Entry k (four values): its ninth index bit is bit k of qh.
        let g = |k: usize| IQ3S_GRID[lo[k] | (((qh >> k) & 1) << 8)] as i32;
        let x = _mm256_set_epi32(g(7), g(6), g(5), g(4), g(3), g(2), g(1), g(0));
        // SAFETY: 32 values of the Q8_K block.
        let y = _mm256_sign_epi8(unsafe { q8(ab, 32 * ib) }, sign_bytes(signs));
        let ls = if ib % 2 == 0 { sc & 0xF } else { sc >> 4 };
        let scale = _mm256_set1_epi16((2 * ls as i32 + 1) as i16);
        s = _mm256_add_epi32(s, scaled(x, y, scale));
    }
    hsum_i32(s)
}

/// Σ grid·y over 32 values with the signed IQ1 grid values (−1, 0, 1) in `g`, as i16 pairs.
#[inline]
#[target_feature(enable = "avx2")]
fn ternary_pairs(g: __m256i, y: __m256i) -> __m256i {
    _mm256_maddubs_epi16(_mm256_set1_epi8(1), _mm256_sign_epi8(y, g))
}

#[target_feature(enable = "avx2")]
unsafe fn iq1_s(wb: *const u8, ab: *const u8) -> i32 {
    let mut s = _mm256_setzero_si256();
    let mut shifts = 0i32;
    for ib in 0..8 {
        // SAFETY: index bytes at 2 + 4·ib and the u16 at 34 + 2·ib of the 50-byte block; the
        // Q8_K block's sums of 16 at 260.
        let (lo, qh, bsum) = unsafe {
            (
                [0, 1, 2, 3].map(|l| *wb.add(2 + 4 * ib + l) as usize),
                u16_ptr(wb.add(34 + 2 * ib)) as usize,
                std::ptr::read_unaligned(ab.add(260 + 4 * ib) as *const i16) as i32
                    + std::ptr::read_unaligned(ab.add(262 + 4 * ib) as *const i16) as i32,
            )
        };
        let g = |l: usize| IQ1S_GRID[lo[l] | (((qh >> (3 * l)) & 7) << 8)] as i64;
        let x = _mm256_set_epi64x(g(3), g(2), g(1), g(0));
        let ls = 2 * ((qh >> 12) & 7) as i32 + 1;
        // SAFETY: 32 values of the Q8_K block.
        let p = ternary_pairs(x, unsafe { q8(ab, 32 * ib) });
        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, _mm256_set1_epi16((8 * ls) as i16)));
        shifts += ls * if qh & 0x8000 != 0 { -bsum } else { bsum };
    }
    hsum_i32(s) + shifts
}

#[target_feature(enable = "avx2")]
unsafe fn iq1_m(wb: *const u8, ab: *const u8) -> i32 {
    let mut s = _mm256_setzero_si256();
    for ib in 0..8 {
        // SAFETY: index bytes at 4·ib, high bits at 32 + 2·ib and the scales at 48 of the
        // 56-byte block.
        let (lo, qh, sc) = unsafe {
            (
                [0, 1, 2, 3].map(|l| *wb.add(4 * ib + l) as usize),
                [*wb.add(32 + 2 * ib) as usize, *wb.add(33 + 2 * ib) as usize],
                u16_ptr(wb.add(48 + 2 * (ib / 2))) as i32,
            )
        };
        let high = |l: usize| (qh[l / 2] >> (4 * (l % 2))) & 0xF;
        let g = |l: usize| IQ1S_GRID[lo[l] | ((high(l) & 7) << 8)] as i64;
        let x = _mm256_set_epi64x(g(3), g(2), g(1), g(0));
        let shift = |l: usize| if high(l) & 8 != 0 { 0xFFu8 } else { 0x01 };
        let shifts = _mm256_set_epi64x(
            (shift(3) as u64 * 0x0101_0101_0101_0101) as i64,
            (shift(2) as u64 * 0x0101_0101_0101_0101) as i64,
            (shift(1) as u64 * 0x0101_0101_0101_0101) as i64,
            (shift(0) as u64 * 0x0101_0101_0101_0101) as i64,
        );
        let k = 6 * (ib % 2);
        let (ls1, ls2) = (2 * ((sc >> k) & 7) + 1, 2 * ((sc >> (k + 3)) & 7) + 1);
        // SAFETY: 32 values of the Q8_K block.
        let y = unsafe { q8(ab, 32 * ib) };
        let grid = _mm256_madd_epi16(ternary_pairs(x, y), two_scales(8 * ls1, 8 * ls2));
        let shifted = _mm256_madd_epi16(ternary_pairs(shifts, y), two_scales(ls1, ls2));
        s = _mm256_add_epi32(s, _mm256_add_epi32(grid, shifted));
    }
    hsum_i32(s)
}

#[target_feature(enable = "avx2")]
unsafe fn iq4_xs(wb: *const u8, ab: *const u8) -> i32 {
    // SAFETY: the table holds 16 bytes.
    let table = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i) };
    // SAFETY: the high scale bits at 2 and the low nibbles at 4..8 of the 136-byte block.
    let (h, l) = unsafe { (u16_ptr(wb.add(2)) as i32, u32_ptr(wb.add(4)) as i32) };
    let mut s = _mm256_setzero_si256();
    for ib in 0..8 {
        // SAFETY: 16 index bytes at 8 + 16·ib of the block.
        let q = unsafe { _mm_loadu_si128(wb.add(8 + 16 * ib) as *const __m128i) };
        let x = table_nibbles(table, q);
        // SAFETY: 32 values of the Q8_K block.
        let y = unsafe { q8(ab, 32 * ib) };
        let ls = (((l >> (4 * ib)) & 0xF) | (((h >> (2 * ib)) & 3) << 4)) - 32;
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, _mm256_set1_epi16(ls as i16)));
    }
    hsum_i32(s)
}

#[cfg(test)]
mod tests {
    use crate::DType;
    use crate::quant::{quantize_activation, vec_dot, vec_dot_scalar, vec_dot_x4_rows};
    use crate::rng::SplitMix64;
    use crate::testing::rand_vec;

    /// Random bytes are valid blocks of every IQ type (each index selects a table entry); the
    /// f16 scales are set to finite values. Extreme activations (±127 everywhere) check the
    /// i16 pair sums.
    #[test]
    fn avx2_equals_scalar_on_random_blocks() {
        if !crate::quant::has_avx2() {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let mut rng = SplitMix64::new(5);
        for wt in [
            DType::IQ2XXS,
            DType::IQ2XS,
            DType::IQ2S,
            DType::IQ3XXS,
            DType::IQ3S,
            DType::IQ1S,
            DType::IQ1M,
            DType::IQ4XS,
            DType::IQ4NL,
            DType::MXFP4,
        ] {
            for blocks in [1, 2, 3, 7] {
                let n = blocks * wt.block_size();
                let mut w: Vec<u8> = (0..wt.bytes_for(n)).map(|_| rng.next_u64() as u8).collect();
                for b in w.chunks_exact_mut(wt.type_size()) {
                    match wt {
                        DType::MXFP4 => b[0] = 100 + b[0] % 56,
                        DType::IQ1M => {
                            // The f16 scale sits in the top nibbles of bytes 49, 51, 53, 55.
                            let d = half::f16::from_f32(0.01 + (b[1] as f32) / 1000.0).to_bits();
                            for i in 0..4 {
                                let nib = ((d >> (4 * i)) & 0xF) as u8;
                                b[49 + 2 * i] = (b[49 + 2 * i] & 0x0F) | (nib << 4);
                            }
                        }
                        _ => {
                            let d = half::f16::from_f32(0.01 + (b[2] as f32) / 1000.0);
                            b[..2].copy_from_slice(&d.to_le_bytes());
                        }
                    }
                }
                let at = wt.vec_dot_type();
                for (seed, scale) in [(1, 1.0), (2, 1e-3), (3, 40.0)] {
                    let y = rand_vec(n, seed, scale);
                    let mut aq = vec![0u8; at.bytes_for(n)];
                    quantize_activation(at, &y, &mut aq);
                    let fast = vec_dot(wt, &w, &aq, n);
                    let slow = vec_dot_scalar(wt, &w, &aq, n);
                    assert_eq!(
                        fast.to_bits(),
                        slow.to_bits(),
                        "{wt} n={n}: {fast} vs {slow}"
                    );
                }
                // Four activation rows against one weight row (the prefill tiles).
                let acts: Vec<Vec<u8>> = (0..4)
                    .map(|r| {
                        let mut aq = vec![0u8; at.bytes_for(n)];
                        quantize_activation(at, &rand_vec(n, 20 + r, 1.0), &mut aq);
                        aq
                    })
                    .collect();
                let mut out = [[0.0f32; 4]];
                vec_dot_x4_rows(wt, &w, std::array::from_fn(|r| &acts[r][..]), n, &mut out);
                for (r, got) in out[0].iter().enumerate() {
                    let want = vec_dot_scalar(wt, &w, &acts[r], n);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{wt} n={n} four rows, row {r}"
                    );
                }
                // All activations at +127 or −127.
                let y: Vec<f32> = (0..n)
                    .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
                    .collect();
                let mut aq = vec![0u8; at.bytes_for(n)];
                quantize_activation(at, &y, &mut aq);
                let fast = vec_dot(wt, &w, &aq, n);
                let slow = vec_dot_scalar(wt, &w, &aq, n);
                assert_eq!(
                    fast.to_bits(),
                    slow.to_bits(),
                    "{wt} n={n} extreme: {fast} vs {slow}"
                );
            }
        }
    }
}
