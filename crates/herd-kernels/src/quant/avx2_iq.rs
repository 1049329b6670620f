//! AVX2 dot products of the 256-value IQ types against Q8_K activations. Each super-block's
//! integer sum is the scalar reference's (`iq.rs`), exact in i32 lanes, and the f32 steps are
//! the reference's, so results are bit-identical.
//!
//! Every type is unpacked the same way, one 32-value sub-block at a time, into a [`Sub`]: the
//! grid entries gathered into one register of unsigned magnitudes (`_mm256_set_epi64x` of table
//! loads, as ggml's AVX2 kernels do), the signs to give the activations (bytes 0x01 or 0xFF for
//! `_mm256_sign_epi8`; Q8_K values lie in −127..127, so negation never wraps) and the i16 block
//! scales. `maddubs` then forms pair sums in i16 (at most 2·62·127 for the grids, 2·127·127 for
//! IQ4_XS's table) and `madd` multiplies them by the scales into i32 lanes. Decode uses each
//! sub-block once ([`row`]); a few activation rows share each unpacked sub-block
//! ([`rows_x4`]); batches of eight rows and more unpack eight weight rows once into plain
//! offset bytes ([`unpack_x8`]) for a multiply-add micro-kernel ([`rows_unpacked`]): there the
//! table lookups, not the multiplies, were most of the work.
//!
//! IQ1_S's delta term and the unpacked kernels' offset are taken from the Q8_K block's sums of
//! 16 where the reference sums the values (or the other way round): the same integers, so the
//! same bits, for activations written by `quantize_activation` (whose sums are those of its
//! values).

use std::arch::x86_64::*;

use super::avx2::{broadcast_i32, f16_ptr, f32_ptr, hsum_i32, table_nibbles};
use super::iq::{self, iq1_m_d};
use super::iq_tables::*;
use crate::DType;

/// Bytes of a Q8_K block; its values start at 4 and its sums of 16 at 260.
const Q8K_BYTES: usize = 292;

/// The kinds of [`sub`] (const generic parameters select the unpacking at compile time).
const IQ2_XXS: u8 = 0;
const IQ2_XS: u8 = 1;
const IQ2_S: u8 = 2;
const IQ3_XXS: u8 = 3;
const IQ3_S: u8 = 4;
const IQ1_S: u8 = 5;
const IQ1_M: u8 = 6;
const IQ4_XS: u8 = 7;

/// `$f::<KIND, G…>(args)` with `$wtype`'s kind (a 256-value IQ type) as the first generic
/// argument and `G…` (if any) after it.
macro_rules! by_kind {
    ($wtype:expr, $f:ident $(<$($g:tt),*>)? ($($arg:expr),*)) => {
        match $wtype {
            DType::IQ2XXS => $f::<IQ2_XXS $($(, $g)*)?>($($arg),*),
            DType::IQ2XS => $f::<IQ2_XS $($(, $g)*)?>($($arg),*),
            DType::IQ2S => $f::<IQ2_S $($(, $g)*)?>($($arg),*),
            DType::IQ3XXS => $f::<IQ3_XXS $($(, $g)*)?>($($arg),*),
            DType::IQ3S => $f::<IQ3_S $($(, $g)*)?>($($arg),*),
            DType::IQ1S => $f::<IQ1_S $($(, $g)*)?>($($arg),*),
            DType::IQ1M => $f::<IQ1_M $($(, $g)*)?>($($arg),*),
            DType::IQ4XS => $f::<IQ4_XS $($(, $g)*)?>($($arg),*),
            other => unreachable!("{other} is not a 256-value IQ type"),
        }
    };
}

/// One row of a 256-value IQ type: `nb` super-blocks of `w` against `nb` Q8_K blocks of `a`.
/// The caller has checked AVX2, FMA and F16C and that both rows hold `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn row(wtype: DType, w: &[u8], a: &[u8], nb: usize) -> f32 {
    // SAFETY: the features are enabled here; the caller's promise bounds every block.
    let [acc] = unsafe { by_kind!(wtype, rows_of<1>(wtype, w, [a], nb)) };
    acc * iq::row_constant(wtype)
}

/// One weight row `w` of a 256-value IQ type against four activation rows, each result equal
/// to [`row`] of that pair. The caller has checked AVX2, FMA and F16C and that every row holds
/// `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows_x4(wtype: DType, w: &[u8], a: [&[u8]; 4], nb: usize) -> [f32; 4] {
    // SAFETY: the features are enabled here; the caller's promise bounds every block.
    let acc = unsafe { by_kind!(wtype, rows_of<4>(wtype, w, a, nb)) };
    acc.map(|r| r * iq::row_constant(wtype))
}

/// The reference's f32 steps over one weight row against `N` activation rows: per
/// super-block, its exact integer sum times the two scales, added by fused multiply-add; each
/// sub-block is unpacked once for the `N` rows.
///
/// # Safety
/// AVX2, FMA and F16C; every row holds `nb` blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_of<const T: u8, const N: usize>(
    wtype: DType,
    w: &[u8],
    a: [&[u8]; N],
    nb: usize,
) -> [f32; N] {
    let ts = wtype.type_size();
    debug_assert!(w.len() >= nb * ts && a.iter().all(|r| r.len() >= nb * Q8K_BYTES));
    let mut acc = [0.0f32; N];
    for i in 0..nb {
        // SAFETY: block i of each row is in bounds (the caller's promise).
        unsafe {
            let wb = w.as_ptr().add(i * ts);
            let ab = a.map(|r| r.as_ptr().add(i * Q8K_BYTES));
            let dw = super_scale::<T>(wb, ts);
            let sums = isums::<T, N>(wb, ab);
            for r in 0..N {
                let d = dw * f32_ptr(ab[r]);
                acc[r] = (sums[r] as f32).mul_add(d, acc[r]);
            }
        }
    }
    acc
}

/// The f16 super-block scale (IQ1_M's, spread over its scale bytes).
///
/// # Safety
/// F16C; `wb` points at a whole block of `ts` bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn super_scale<const T: u8>(wb: *const u8, ts: usize) -> f32 {
    // SAFETY: the caller's block.
    unsafe {
        if T == IQ1_M {
            iq1_m_d(std::slice::from_raw_parts(wb, ts))
        } else {
            f16_ptr(wb)
        }
    }
}

/// One super-block's exact integer sums against `N` Q8_K blocks.
///
/// # Safety
/// AVX2; whole blocks at `wb` and every `ab`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn isums<const T: u8, const N: usize>(wb: *const u8, ab: [*const u8; N]) -> [i32; N] {
    let mut s = [_mm256_setzero_si256(); N];
    for ib in 0..8 {
        // SAFETY: sub-block ib of every block.
        unsafe {
            let w = sub::<T>(wb, ib);
            for r in 0..N {
                s[r] = _mm256_add_epi32(s[r], w.dot(q8(ab[r], 32 * ib)));
            }
        }
    }
    s.map(|v| hsum_i32(v))
}

/// One 32-value sub-block of weights, ready for `maddubs`.
#[derive(Clone, Copy)]
struct Sub {
    /// |w|, unsigned bytes.
    mag: __m256i,
    /// The sign of each w, given to the activations by `_mm256_sign_epi8` (any byte of the
    /// sign wanted, or 0 where |w| is 0).
    sign: __m256i,
    /// The i16 multiplier of each pair sum (the block scales).
    scale: __m256i,
}

impl Sub {
    /// Σ scale·w·y over the 32 activations `y`, in eight i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot(self, y: __m256i) -> __m256i {
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(self.mag, _mm256_sign_epi8(y, self.sign)),
            self.scale,
        )
    }
}

/// Sub-block `ib` (values 32·ib..32·ib+32) of the super-block of kind `T` at `wb`.
///
/// # Safety
/// AVX2; a whole block at `wb`; `ib < 8`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn sub<const T: u8>(wb: *const u8, ib: usize) -> Sub {
    // SAFETY: the caller's block.
    unsafe {
        match T {
            IQ2_XXS => iq2_xxs(wb, ib),
            IQ2_XS => iq2_xs(wb, ib),
            IQ2_S => iq2_s(wb, ib),
            IQ3_XXS => iq3_xxs(wb, ib),
            IQ3_S => iq3_s(wb, ib),
            IQ1_S => iq1_s(wb, ib),
            IQ1_M => iq1_m(wb, ib),
            _ => iq4_xs(wb, ib),
        }
    }
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

/// For each scale byte of IQ2_XS and IQ2_S, its two 4-bit scales `l` as the i16 pair
/// multipliers `2l + 1` (low nibble for values 0..16, high for 16..32): one load from a table
/// instead of two broadcasts on the shuffle port, the kernels' busiest.
static PAIR_SCALES: Aligned<[[i16; 16]; 256]> = Aligned(pair_scales());

/// For each 4-bit scale `l` of IQ2_XXS, IQ3_XXS and IQ3_S, `2l + 1` in sixteen i16 lanes.
static ODD_SCALES: Aligned<[[i16; 16]; 16]> = Aligned(odd_scales());

#[repr(align(32))]
struct Aligned<T>(T);

const fn pair_scales() -> [[i16; 16]; 256] {
    let mut t = [[0i16; 16]; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 16 {
            let nibble = if j < 8 { b & 0xF } else { b >> 4 };
            t[b][j] = 2 * nibble as i16 + 1;
            j += 1;
        }
        b += 1;
    }
    t
}

const fn odd_scales() -> [[i16; 16]; 16] {
    let mut t = [[0i16; 16]; 16];
    let mut l = 0;
    while l < 16 {
        t[l] = [2 * l as i16 + 1; 16];
        l += 1;
    }
    t
}

/// Row `i` of a table of sixteen i16 as a register.
#[inline]
#[target_feature(enable = "avx2")]
fn scale_row<const N: usize>(table: &'static Aligned<[[i16; 16]; N]>, i: usize) -> __m256i {
    // SAFETY: row i (bounds-checked) is 32 bytes, 32-byte aligned (the table is, and rows are
    // 32 bytes).
    unsafe { _mm256_load_si256(table.0[i].as_ptr() as *const __m256i) }
}

/// One scale for values 0..16 and another for 16..32, as i16 pair multipliers.
#[inline]
#[target_feature(enable = "avx2")]
fn two_scales(lo: i32, hi: i32) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi as i16), _mm_set1_epi16(lo as i16))
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq2_xxs(wb: *const u8, ib: usize) -> Sub {
    // SAFETY: bytes 2 + 8·ib .. 10 + 8·ib of the 66-byte block.
    let (idx, aux) = unsafe { (u32_ptr(wb.add(2 + 8 * ib)), u32_ptr(wb.add(6 + 8 * ib))) };
    let g = |l: u32| IQ2XXS_GRID[((idx >> (8 * l)) & 0xFF) as usize] as i64;
    let signs = [0, 1, 2, 3].map(|l| ((aux >> (7 * l)) & 127) as usize);
    Sub {
        mag: _mm256_set_epi64x(g(3), g(2), g(1), g(0)),
        sign: even_sign_bytes(signs),
        scale: scale_row(&ODD_SCALES, (aux >> 28) as usize),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq2_xs(wb: *const u8, ib: usize) -> Sub {
    // SAFETY: four u16 at 2 + 8·ib and the scale byte at 66 + ib of the 74-byte block.
    let (q, sc) = unsafe {
        (
            [0, 1, 2, 3].map(|l| u16_ptr(wb.add(2 + 8 * ib + 2 * l))),
            *wb.add(66 + ib),
        )
    };
    let g = |l: usize| IQ2XS_GRID[(q[l] & 511) as usize] as i64;
    Sub {
        mag: _mm256_set_epi64x(g(3), g(2), g(1), g(0)),
        sign: even_sign_bytes(q.map(|v| (v >> 9) as usize)),
        scale: scale_row(&PAIR_SCALES, sc as usize),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq2_s(wb: *const u8, ib: usize) -> Sub {
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
    Sub {
        mag: _mm256_set_epi64x(g(3), g(2), g(1), g(0)),
        sign: sign_bytes(signs),
        scale: scale_row(&PAIR_SCALES, sc as usize),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq3_xxs(wb: *const u8, ib: usize) -> Sub {
    // SAFETY: eight index bytes at 2 + 8·ib and the u32 at 66 + 4·ib of the 98-byte block.
    let (idx, aux) = unsafe {
        (
            [0, 1, 2, 3, 4, 5, 6, 7].map(|k| *wb.add(2 + 8 * ib + k) as usize),
            u32_ptr(wb.add(66 + 4 * ib)),
        )
    };
    let g = |k: usize| IQ3XXS_GRID[idx[k]] as i32;
    let signs = [0, 1, 2, 3].map(|l| ((aux >> (7 * l)) & 127) as usize);
    Sub {
        mag: _mm256_set_epi32(g(7), g(6), g(5), g(4), g(3), g(2), g(1), g(0)),
        sign: even_sign_bytes(signs),
        scale: scale_row(&ODD_SCALES, (aux >> 28) as usize),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq3_s(wb: *const u8, ib: usize) -> Sub {
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
    let ls = if ib.is_multiple_of(2) {
        sc & 0xF
    } else {
        sc >> 4
    };
    Sub {
        mag: _mm256_set_epi32(g(7), g(6), g(5), g(4), g(3), g(2), g(1), g(0)),
        sign: sign_bytes(signs),
        scale: scale_row(&ODD_SCALES, ls as usize),
    }
}

/// IQ1_S's grid and delta terms in one: Σ ls·(8·g ± 1)·y, the delta's sign per sub-block
/// (the reference adds its delta term from the activations' sums of 16; the integer is the
/// same).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq1_s(wb: *const u8, ib: usize) -> Sub {
    // SAFETY: index bytes at 2 + 4·ib and the u16 at 34 + 2·ib of the 50-byte block.
    let (lo, qh) = unsafe {
        (
            [0, 1, 2, 3].map(|l| *wb.add(2 + 4 * ib + l) as usize),
            u16_ptr(wb.add(34 + 2 * ib)) as usize,
        )
    };
    let g = |l: usize| IQ1S_GRID[lo[l] | (((qh >> (3 * l)) & 7) << 8)] as i64;
    let grid = _mm256_set_epi64x(g(3), g(2), g(1), g(0));
    let delta = _mm256_set1_epi8(if qh & 0x8000 != 0 { -1 } else { 1 });
    // 8·g ± 1 lies in −9..9.
    let w = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), grid), delta);
    Sub {
        mag: _mm256_abs_epi8(w),
        sign: w,
        scale: _mm256_set1_epi16((2 * ((qh >> 12) & 7) + 1) as i16),
    }
}

/// IQ1_M's grid and delta terms in one: Σ ls·(8·g ± 1)·y, the delta's sign per group of eight.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq1_m(wb: *const u8, ib: usize) -> Sub {
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
    let grid = _mm256_set_epi64x(g(3), g(2), g(1), g(0));
    let delta = |l: usize| (if high(l) & 8 != 0 { 0xFFu64 } else { 0x01 }) * 0x0101_0101_0101_0101;
    let deltas = _mm256_set_epi64x(
        delta(3) as i64,
        delta(2) as i64,
        delta(1) as i64,
        delta(0) as i64,
    );
    // 8·g ± 1 lies in −9..9.
    let w = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), grid), deltas);
    let k = 6 * (ib % 2);
    let (ls1, ls2) = (2 * ((sc >> k) & 7) + 1, 2 * ((sc >> (k + 3)) & 7) + 1);
    Sub {
        mag: _mm256_abs_epi8(w),
        sign: w,
        scale: two_scales(ls1, ls2),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq4_xs(wb: *const u8, ib: usize) -> Sub {
    // SAFETY: the table holds 16 bytes; the high scale bits at 2, the low ones at 4..8 and the
    // 16 index bytes at 8 + 16·ib of the 136-byte block.
    let (table, h, l, q) = unsafe {
        (
            _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i),
            u16_ptr(wb.add(2)) as i32,
            u32_ptr(wb.add(4)) as i32,
            _mm_loadu_si128(wb.add(8 + 16 * ib) as *const __m128i),
        )
    };
    let x = table_nibbles(table, q);
    let ls = (((l >> (4 * ib)) & 0xF) | (((h >> (2 * ib)) & 3) << 4)) - 32;
    Sub {
        mag: _mm256_abs_epi8(x),
        sign: x,
        scale: _mm256_set1_epi16(ls as i16),
    }
}

/// Bytes of one super-block of eight weight rows unpacked by [`unpack_x8`]: at 0 the values
/// plus 64 as unsigned bytes, ordered `[h: 16][c: 4][row: 8][4]` (four values `16h + 4c..` of
/// each row side by side, one 32-byte register per `(h, c)`); at 2048 each row's i16 scale of
/// the 16 values `16h..16h + 16`, twice per i32 lane (`[h: 16][row: 8]`, `madd` multipliers);
/// at 2560 the offset's multipliers `64·scale` of value groups `2p` and `2p + 1` as an i16 pair
/// (`[p: 8][row: 8]`); at 2816 each row's f32 super-block scale.
pub(super) const UNPACKED_BLOCK: usize = 2848;

/// Eight consecutive weight rows `w` of a 256-value IQ type (not IQ4_XS, whose values do not
/// fit the offset form), `nb` super-blocks each, unpacked into `out` (`nb·UNPACKED_BLOCK`
/// bytes) for [`rows_unpacked`]: once per eight rows, then shared by every activation row, as
/// llama.cpp's tiled CPU products unpack their weights. The caller has checked AVX2, FMA and
/// F16C and the lengths.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack_x8(wtype: DType, w: &[u8], nb: usize, out: &mut [u8]) {
    assert!(wtype != DType::IQ4XS, "IQ4_XS has no unpacked form");
    // SAFETY: the features are enabled here; the caller's promise bounds every block.
    unsafe { by_kind!(wtype, unpack_x8_of(wtype, w, nb, out)) }
}

/// # Safety
/// AVX2, FMA and F16C; `w` holds eight rows of `nb` blocks, `out` `nb` unpacked blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_x8_of<const T: u8>(wtype: DType, w: &[u8], nb: usize, out: &mut [u8]) {
    let ts = wtype.type_size();
    let row = nb * ts;
    assert!(w.len() >= 8 * row && out.len() >= nb * UNPACKED_BLOCK);
    let offset = _mm256_set1_epi8(64);
    for b in 0..nb {
        let ob = &mut out[b * UNPACKED_BLOCK..(b + 1) * UNPACKED_BLOCK];
        let mut scales = [[0i16; 8]; 16];
        let mut dw = [0.0f32; 8];
        for ib in 0..8 {
            let mut rows = [_mm256_setzero_si256(); 8];
            for (m, r) in rows.iter_mut().enumerate() {
                // SAFETY: block b of row m is in bounds (asserted above).
                unsafe {
                    let wb = w.as_ptr().add(m * row + b * ts);
                    if ib == 0 {
                        dw[m] = super_scale::<T>(wb, ts);
                    }
                    let s = sub::<T>(wb, ib);
                    *r = _mm256_add_epi8(_mm256_sign_epi8(s.mag, s.sign), offset);
                    scales[2 * ib][m] = _mm256_extract_epi16::<0>(s.scale) as i16;
                    scales[2 * ib + 1][m] = _mm256_extract_epi16::<8>(s.scale) as i16;
                }
            }
            // Row m's dword d (values 32·ib + 4d..) to lane m of register 8·ib + d.
            for (d, v) in transpose_8x8_epi32(rows).into_iter().enumerate() {
                let at = 32 * (8 * ib + d);
                // SAFETY: 32 bytes inside `ob`.
                unsafe { _mm256_storeu_si256(ob[at..at + 32].as_mut_ptr() as *mut __m256i, v) };
            }
        }
        let lane = |lo: i16, hi: i16| (lo as u16 as u32 | (hi as u16 as u32) << 16).to_le_bytes();
        for (h, sh) in scales.iter().enumerate() {
            for (m, &sc) in sh.iter().enumerate() {
                let at = 2048 + 4 * (8 * h + m);
                ob[at..at + 4].copy_from_slice(&lane(sc, sc));
            }
        }
        for (p, two) in scales.chunks_exact(2).enumerate() {
            for (m, (&s0, &s1)) in two[0].iter().zip(&two[1]).enumerate() {
                let at = 2560 + 4 * (8 * p + m);
                ob[at..at + 4].copy_from_slice(&lane(64 * s0, 64 * s1));
            }
        }
        for (m, d) in dw.iter().enumerate() {
            ob[2816 + 4 * m..2820 + 4 * m].copy_from_slice(&d.to_le_bytes());
        }
    }
}

/// An 8×8 matrix of i32 (one row per register) transposed.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose_8x8_epi32(r: [__m256i; 8]) -> [__m256i; 8] {
    let t: [__m256i; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(a, b)
        } else {
            _mm256_unpackhi_epi32(a, b)
        }
    });
    // u[4q + j]: dwords j and j + 4 of rows 4q..4q + 4 (low and high 128-bit lanes).
    let u: [__m256i; 8] = std::array::from_fn(|i| {
        let (q, j) = (i / 4, i % 4);
        let (a, b) = (t[4 * q + j / 2], t[4 * q + 2 + j / 2]);
        if j % 2 == 0 {
            _mm256_unpacklo_epi64(a, b)
        } else {
            _mm256_unpackhi_epi64(a, b)
        }
    });
    std::array::from_fn(|d| {
        if d < 4 {
            _mm256_permute2x128_si256::<0x20>(u[d], u[4 + d])
        } else {
            _mm256_permute2x128_si256::<0x31>(u[d - 4], u[d])
        }
    })
}

/// Eight weight rows unpacked by [`unpack_x8`] (`u`, `nb` blocks) against `N` Q8_K activation
/// rows: `out[r][m]`, each equal to [`row`] of weight row `m` and activation row `r`. Per
/// `(h, c)` one weight register serves the `N` rows, each multiplied by four broadcast
/// activations (`maddubs`, pair sums at most 2·126·127) and its 16 values' scale (`madd`);
/// the offset's `64·Σ scale·(Σ of 16 activations)` comes off with the Q8_K block's sums; the
/// exact integer then takes the reference's f32 steps, one weight row per lane.
/// The caller has checked AVX2, FMA and F16C and the lengths.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows_unpacked<const N: usize>(
    wtype: DType,
    u: &[u8],
    a: [&[u8]; N],
    nb: usize,
) -> [[f32; 8]; N] {
    assert!(u.len() >= nb * UNPACKED_BLOCK && a.iter().all(|r| r.len() >= nb * Q8K_BYTES));
    let at = |p: *const u8, off: usize| {
        // SAFETY: callers keep `off + 32` inside the block at `p`.
        unsafe { _mm256_loadu_si256(p.add(off) as *const __m256i) }
    };
    let four = |p: *const u8, off: usize| {
        // SAFETY: AVX2 is enabled here; callers keep `off + 4` inside the block at `p`.
        unsafe { broadcast_i32(p.add(off)) }
    };
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        // SAFETY: block b of `u` and of every activation row (asserted above).
        let (ub, ab) = unsafe {
            (
                u.as_ptr().add(b * UNPACKED_BLOCK),
                a.map(|r| r.as_ptr().add(b * Q8K_BYTES)),
            )
        };
        let mut blk = [_mm256_setzero_si256(); N];
        for h in 0..16 {
            let sc = at(ub, 2048 + 32 * h);
            for c in 0..4 {
                let wv = at(ub, 32 * (4 * h + c));
                for t in 0..N {
                    let y = four(ab[t], 4 + 16 * h + 4 * c);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, y), sc);
                    blk[t] = _mm256_add_epi32(blk[t], p);
                }
            }
        }
        // SAFETY: the eight f32 scales at 2816.
        let dw = unsafe { _mm256_loadu_ps(ub.add(2816) as *const f32) };
        for t in 0..N {
            let mut offset = _mm256_setzero_si256();
            for p in 0..8 {
                let sums = four(ab[t], 260 + 4 * p);
                offset = _mm256_add_epi32(offset, _mm256_madd_epi16(at(ub, 2560 + 32 * p), sums));
            }
            let isum = _mm256_sub_epi32(blk[t], offset);
            // SAFETY: the activation block's f32 scale at 0.
            let d = _mm256_mul_ps(dw, _mm256_set1_ps(unsafe { f32_ptr(ab[t]) }));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc[t]);
        }
    }
    let rc = _mm256_set1_ps(iq::row_constant(wtype));
    acc.map(|v| {
        let mut o = [0.0f32; 8];
        // SAFETY: eight f32 into `o`.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(v, rc)) };
        o
    })
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
                let w = random_blocks(wt, n, &mut rng);
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

    /// Random bytes as valid blocks of `wt` (each index selects a table entry), the f16
    /// scales set to finite values.
    fn random_blocks(wt: DType, n: usize, rng: &mut SplitMix64) -> Vec<u8> {
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
        w
    }

    /// Eight rows unpacked once, against four activation rows and one: the scalar reference's
    /// bits for every pair, activations at ±127 included.
    #[test]
    fn unpacked_rows_equal_scalar_on_random_blocks() {
        use crate::quant::{
            unpack_x8, unpack_x8_supported, unpacked_x8_bytes, vec_dot_unpacked_x8,
        };
        if !crate::quant::has_avx2() {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let mut rng = SplitMix64::new(9);
        // Every type the dispatch sends here (IQ1–IQ3).
        let types: Vec<DType> = DType::ALL
            .into_iter()
            .filter(|&t| unpack_x8_supported(t))
            .collect();
        assert_eq!(types.len(), 7, "{types:?}");
        for wt in types {
            for blocks in [1, 3] {
                let n = blocks * 256;
                let row = wt.bytes_for(n);
                let w = random_blocks(wt, 8 * n, &mut rng);
                let mut u = vec![0u8; unpacked_x8_bytes(n)];
                unpack_x8(wt, &w, n, &mut u);
                let at = wt.vec_dot_type();
                let mut acts: Vec<Vec<u8>> = (0..5)
                    .map(|r| {
                        let y: Vec<f32> = if r == 4 {
                            (0..n)
                                .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
                                .collect()
                        } else {
                            rand_vec(n, 40 + r, [1.0, 1e-3, 40.0, 1.0][r as usize])
                        };
                        let mut aq = vec![0u8; at.bytes_for(n)];
                        quantize_activation(at, &y, &mut aq);
                        aq
                    })
                    .collect();
                let want =
                    |m: usize, r: &[u8]| vec_dot_scalar(wt, &w[m * row..(m + 1) * row], r, n);
                let four =
                    vec_dot_unpacked_x8::<4>(wt, &u, std::array::from_fn(|r| &acts[r][..]), n);
                for (r, got) in four.iter().enumerate() {
                    for (m, v) in got.iter().enumerate() {
                        assert_eq!(
                            v.to_bits(),
                            want(m, &acts[r]).to_bits(),
                            "{wt} n={n} row {r}, weight row {m}"
                        );
                    }
                }
                let extreme = acts.pop().unwrap();
                let [one] = vec_dot_unpacked_x8(wt, &u, [&extreme[..]], n);
                for (m, v) in one.iter().enumerate() {
                    assert_eq!(
                        v.to_bits(),
                        want(m, &extreme).to_bits(),
                        "{wt} n={n} extreme, weight row {m}"
                    );
                }
            }
        }
    }
}
