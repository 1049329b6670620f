//! AVX2 integer dot products. Each computes the same exact integer sums as the scalar
//! reference (the group kernels with one lane per weight row, the others in the reference's
//! lanes) and the same f32 operations (the order `dot.rs` defines), so results are
//! bit-identical.

use std::arch::x86_64::*;

use super::dot::{combine_k, q4_k_add};
use super::repack::{GROUP, X8_BLOCK};
use super::{f16_at, f32_at};
use crate::DType;

/// `Some(result)` when there is an AVX2 kernel for `wtype`. Callers check `has_avx2()` first.
pub(crate) fn vec_dot(wtype: DType, w: &[u8], a: &[u8], n: usize) -> Option<f32> {
    let nb = n / wtype.block_size();
    assert!(w.len() >= nb * wtype.type_size() && a.len() >= nb * wtype.vec_dot_type().type_size());
    // SAFETY: has_avx2() confirmed AVX2, FMA and F16C at run time; the slices hold nb whole
    // blocks (asserted above) and every load below stays inside its block.
    unsafe {
        match wtype {
            DType::Q8_0 => Some(q0_row::<Q8_0>(w, a, nb)),
            DType::Q4_0 => Some(q0_row::<Q4_0>(w, a, nb)),
            DType::Q5_0 => Some(q0_row::<Q5_0>(w, a, nb)),
            DType::Q4K => Some(q4_k_row(w, a, nb)),
            DType::Q5K => Some(q5_k_rows::<1>(w, [a], nb)[0]),
            DType::Q2K => Some(q2_k_rows::<1>(w, [a], nb)[0]),
            DType::Q3K => Some(q3_k_rows::<1>(w, [a], nb)[0]),
            DType::Q6K => Some(q6_k_row(w, a, nb)),
            DType::IQ4NL => Some(q0_row::<IQ4_NL>(w, a, nb)),
            DType::MXFP4 => Some(q0_row::<MXFP4>(w, a, nb)),
            t if super::iq::is_super_block_type(t) => Some(super::avx2_iq::row(t, w, a, nb)),
            _ => None,
        }
    }
}

/// `out[j]` = the four products of weight row `j` of `w` (consecutive rows of `nb` blocks) with
/// the activation rows `a`, each equal to [`vec_dot`] of that pair; the weight block is
/// unpacked once for the four rows. `None` for types without such a kernel.
pub(crate) fn rows_x4(
    wtype: DType,
    w: &[u8],
    a: [&[u8]; 4],
    n: usize,
    out: &mut [[f32; 4]],
) -> Option<()> {
    let nb = n / wtype.block_size();
    let (wt, at) = (wtype.type_size(), wtype.vec_dot_type().type_size());
    let row = nb * wt;
    assert!(w.len() == out.len() * row && a.iter().all(|r| r.len() >= nb * at));
    let rows = w.chunks_exact(row).zip(out.iter_mut());
    // SAFETY: has_avx2() confirmed AVX2, FMA and F16C at run time; every row holds nb whole
    // blocks (asserted above) and every load stays inside its block.
    unsafe {
        match wtype {
            DType::Q4K => rows.for_each(|(wr, o)| *o = q4_k_rows_x4(wr, a, nb)),
            DType::Q6K => rows.for_each(|(wr, o)| *o = q6_k_rows_x4(wr, a, nb)),
            DType::Q2K => rows.for_each(|(wr, o)| *o = q2_k_rows::<4>(wr, a, nb)),
            DType::Q5K => rows.for_each(|(wr, o)| *o = q5_k_rows::<4>(wr, a, nb)),
            DType::Q3K => rows.for_each(|(wr, o)| *o = q3_k_rows::<4>(wr, a, nb)),
            DType::Q8_0 => rows.for_each(|(wr, o)| *o = q0_rows_x4::<Q8_0>(wr, a, nb)),
            DType::Q5_0 => rows.for_each(|(wr, o)| *o = q0_rows_x4::<Q5_0>(wr, a, nb)),
            DType::Q4_0 => rows.for_each(|(wr, o)| *o = q0_rows_x4::<Q4_0>(wr, a, nb)),
            DType::IQ4NL => rows.for_each(|(wr, o)| *o = q0_rows_x4::<IQ4_NL>(wr, a, nb)),
            DType::MXFP4 => rows.for_each(|(wr, o)| *o = q0_rows_x4::<MXFP4>(wr, a, nb)),
            t if super::iq::is_super_block_type(t) => {
                rows.for_each(|(wr, o)| *o = super::avx2_iq::rows_x4(t, wr, a, nb))
            }
            _ => return None,
        }
    }
    Some(())
}

/// `out[r][m]`: row `m` of one interleaved group (`g`, the layout of `repack`) with activation
/// row `a[r]`, each equal to [`vec_dot`] of that pair. `None` for types without a group kernel.
pub(crate) fn rows_x8<const N: usize>(
    wtype: DType,
    g: &[u8],
    a: [&[u8]; N],
    sums: [&[i32]; N],
    n: usize,
) -> Option<[[f32; 8]; N]> {
    let nb = n / wtype.block_size();
    let at = wtype.vec_dot_type().type_size();
    assert!(g.len() >= nb * GROUP * wtype.type_size() && a.iter().all(|r| r.len() >= nb * at));
    if super::x8_wants_block_sums(wtype) {
        assert!(
            sums.iter().all(|s| s.len() >= nb),
            "rows_x8: block sums missing"
        );
    }
    // SAFETY: has_avx2() confirmed AVX2, FMA and F16C at run time; the group holds nb whole
    // blocks and every activation row nb whole blocks (asserted above), and every sums row
    // nb values where the kernel reads them.
    unsafe {
        if super::has_vnni() {
            match wtype {
                DType::Q4K => Some(q4_k_x8_vnni(g, a, nb)),
                DType::Q8_0 => Some(q0_x8_vnni::<Q8_0, N>(g, a, sums, nb)),
                DType::Q4_0 => Some(q0_x8_vnni::<Q4_0, N>(g, a, sums, nb)),
                DType::Q5_0 => Some(q0_x8_vnni::<Q5_0, N>(g, a, sums, nb)),
                DType::IQ4NL => Some(q0_x8_vnni::<IQ4_NL, N>(g, a, sums, nb)),
                DType::IQ4XS => Some(iq4_xs_x8_vnni(g, a, nb)),
                _ => None,
            }
        } else {
            match wtype {
                DType::Q4K => Some(q4_k_x8(g, a, nb)),
                DType::Q8_0 => Some(q0_x8::<Q8_0, N>(g, a, sums, nb)),
                DType::Q4_0 => Some(q0_x8::<Q4_0, N>(g, a, sums, nb)),
                DType::Q5_0 => Some(q0_x8::<Q5_0, N>(g, a, sums, nb)),
                DType::IQ4NL => Some(q0_x8::<IQ4_NL, N>(g, a, sums, nb)),
                DType::IQ4XS => Some(iq4_xs_x8(g, a, nb)),
                _ => None,
            }
        }
    }
}

/// How far ahead (bytes) the one-row kernels ask for their weights (the group kernels for one
/// activation row, the file-layout Q6_K row kernel on every call): they do little work per
/// byte, and with Zen 3's hardware prefetcher alone Scout-shaped decode read 61–73% of the
/// bandwidth bound. Alternating tg256 runs, means of four (docs/performance.md): Q8_0 18.4 →
/// 20.8 / 21.0 tok/s at 1024 / 1536 bytes ahead, Q4_K_M 28.7 → 33.1 / 32.9 at 1152 / 2304.
const PREFETCH_AHEAD: usize = 1536;

/// Ask for the `bytes` bytes [`PREFETCH_AHEAD`] past `p` into L1. The address may lie past
/// the data (the last blocks of a matrix): a prefetch never faults.
#[inline(always)]
fn prefetch_ahead(p: *const u8, bytes: usize) {
    for at in (0..bytes).step_by(64) {
        let ahead = p.wrapping_add(PREFETCH_AHEAD + at);
        // SAFETY: a prefetch is a hint: it reads no memory architecturally and never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8) };
    }
}

/// The four bytes at `p` in every 32-bit lane. `inline(always)` and a plain function, not a
/// closure holding the intrinsic: a closure in a helper without target features that LLVM
/// leaves out of line turns each intrinsic into a call (see `q4_k_x8_sub_block`).
///
/// # Safety
/// AVX2; `p` points at four readable bytes.
#[inline(always)]
pub(super) unsafe fn broadcast_i32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees AVX2 and four readable bytes at p (unaligned read).
    unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32)) }
}

/// The eight f32 lanes added as ggml's `hsum_float_8` (the reference's `hsum8`).
#[inline]
#[target_feature(enable = "avx")]
fn hsum_ps(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
}

/// Block kinds of the 32-value formats paired with Q8_0 activations (const parameters): one
/// scale at byte 0 (f16, or MXFP4's E8M0 exponent byte).
pub(super) const Q8_0: u8 = 0;
pub(super) const Q4_0: u8 = 1;
pub(super) const Q5_0: u8 = 2;
pub(super) const IQ4_NL: u8 = 3;
const MXFP4: u8 = 4;

/// Bytes per block of kind `T`.
pub(super) const fn q0_size<const T: u8>() -> usize {
    match T {
        Q8_0 => 34,
        Q4_0 | IQ4_NL => 18,
        MXFP4 => 17,
        _ => 22,
    }
}

/// The weight scale of a block of kind `T`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn q0_scale<const T: u8>(wb: &[u8]) -> f32 {
    if T == MXFP4 {
        super::iq::e8m0_to_f32_half(wb[0])
    } else {
        // SAFETY: every other kind's block starts with its f16 scale.
        unsafe { f16_ptr(wb.as_ptr()) }
    }
}

/// 32 values of a 16-value table indexed by the nibbles of `q` (low nibbles are elements
/// 0..16), as signed bytes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn table_nibbles(table: __m128i, q: __m128i) -> __m256i {
    let low = _mm_set1_epi8(0x0F);
    let lo = _mm_shuffle_epi8(table, _mm_and_si128(q, low));
    let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16::<4>(q), low));
    _mm256_set_m128i(hi, lo)
}

/// The 32 signed weights of a block of kind `T` as bytes, element order.
#[inline]
#[target_feature(enable = "avx2")]
fn q0_weights<const T: u8>(wb: &[u8]) -> __m256i {
    match T {
        // SAFETY: bytes 2..34 of the 34-byte block.
        Q8_0 => unsafe { load(wb, 2) },
        Q4_0 => unpack_q4_0(wb),
        IQ4_NL | MXFP4 => {
            let (table, at) = if T == IQ4_NL {
                (&super::iq_tables::KVALUES_IQ4NL, 2)
            } else {
                (&super::iq_tables::KVALUES_MXFP4, 1)
            };
            // SAFETY: the table holds 16 bytes; the block 16 index bytes at `at`.
            let (t, q) = unsafe {
                (
                    _mm_loadu_si128(table.as_ptr() as *const __m128i),
                    _mm_loadu_si128(wb.as_ptr().add(at) as *const __m128i),
                )
            };
            table_nibbles(t, q)
        }
        _ => unpack_q5_0(wb),
    }
}

/// One row of Q8_0/Q4_0/Q5_0 weights with Q8_0 activations: per block, the exact integer sum
/// times `d_w·d_a` added to one f32 sum by fused multiply-add (the reference's order).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q0_row<const T: u8>(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let wt = q0_size::<T>();
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, ab) = (&w[wt * i..wt * (i + 1)], &a[34 * i..34 * (i + 1)]);
        // SAFETY: bytes 2..34 of the Q8_0 block; its scale is its first two bytes.
        let (y, d) = unsafe { (load(ab, 2), q0_scale::<T>(wb) * f16_ptr(ab.as_ptr())) };
        let isum = hsum_i32(dot_i8(q0_weights::<T>(wb), y));
        acc = (isum as f32).mul_add(d, acc);
    }
    acc
}

/// [`q0_row`] for one weight row and four activation rows (lane r of each f32 step).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q0_rows_x4<const T: u8>(w: &[u8], a: [&[u8]; 4], nb: usize) -> [f32; 4] {
    let wt = q0_size::<T>();
    let mut acc = _mm_setzero_ps();
    for i in 0..nb {
        let wb = &w[wt * i..wt * (i + 1)];
        let x = q0_weights::<T>(wb);
        // SAFETY: the weight block's scale is its first two bytes; each activation block's
        // values are bytes 2..34 and its scale the first two.
        unsafe {
            let dw = q0_scale::<T>(wb);
            let ab = a.map(|r| r.as_ptr().add(34 * i));
            let sums =
                hsum4_i32(ab.map(|p| dot_i8(x, _mm256_loadu_si256(p.add(2) as *const __m256i))));
            let da = _mm_set_ps(
                f16_ptr(ab[3]),
                f16_ptr(ab[2]),
                f16_ptr(ab[1]),
                f16_ptr(ab[0]),
            );
            let d = _mm_mul_ps(_mm_set1_ps(dw), da);
            acc = _mm_fmadd_ps(_mm_cvtepi32_ps(sums), d, acc);
        }
    }
    let mut out = [0.0f32; 4];
    // SAFETY: out holds four f32; unaligned store.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

/// The 32 signed 4-bit weights of a Q4_0 block (−8..7) as bytes.
#[inline]
#[target_feature(enable = "avx2")]
fn unpack_q4_0(wb: &[u8]) -> __m256i {
    let low = _mm_set1_epi8(0x0F);
    // SAFETY: 16 nibble bytes at 2..18 of the 18-byte block.
    let q = unsafe { _mm_loadu_si128(wb[2..18].as_ptr() as *const __m128i) };
    let lo = _mm_and_si128(q, low);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), low);
    _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8))
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
pub(super) unsafe fn load(p: &[u8], off: usize) -> __m256i {
    debug_assert!(off + 32 <= p.len());
    // SAFETY: callers keep off + 32 within the block; unaligned load.
    unsafe { _mm256_loadu_si256(p.as_ptr().add(off) as *const __m256i) }
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum_i32(v: __m256i) -> i32 {
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

/// Scales and mins of a Q4_K/Q5_K super-block (12 packed bytes at `s`) as sixteen i16 lanes:
/// the eight 6-bit scales, then the eight 6-bit mins (ggml's `utmp` unpacking).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn k4_scales_mins(s: *const u8) -> __m256i {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    // SAFETY: the caller's block holds 12 scale bytes at s.
    let u: [u32; 3] = unsafe { std::ptr::read_unaligned(s as *const [u32; 3]) };
    let scales_hi = (u[2] & KMASK2) | (((u[0] >> 6) & KMASK3) << 4);
    let mins_hi = ((u[2] >> 4) & KMASK2) | (((u[1] >> 6) & KMASK3) << 4);
    let packed = _mm_set_epi32(
        mins_hi as i32,
        (u[1] & KMASK1) as i32,
        scales_hi as i32,
        (u[0] & KMASK1) as i32,
    );
    _mm256_cvtepu8_epi16(packed)
}

/// A shuffle that broadcasts i16 lane `j` (0..8) of each 128-bit half across that half.
#[inline]
#[target_feature(enable = "avx2")]
fn broadcast_i16_lane(j: usize) -> __m256i {
    let b = (2 * j) as i16;
    _mm256_set1_epi16(((b + 1) << 8) | b)
}

/// One Q4_K × Q8_K super-block's exact integer sums: `Σ scale·q·a` of each 64-value part `c`
/// (sub-blocks `2c`, `2c+1`) as eight i32 lanes still to be added up, and `Σ min·bsum` of each
/// part in lane `c`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_k_block(w: *const u8, a: *const u8) -> ([__m256i; 4], __m128i) {
    let m4 = _mm256_set1_epi8(0x0F);
    // The caller passes w at a 144-byte Q4_K block and a at a 292-byte Q8_K block.
    // SAFETY: scale bytes 4..16 of the Q4_K block.
    let sm = unsafe { k4_scales_mins(w.add(4)) };
    // SAFETY: bsums (16 i16) end at byte 292 of the Q8_K block.
    let bsums = unsafe { _mm256_loadu_si256(a.add(260) as *const __m256i) };
    // Sub-block j of 32 values has bsums 2j and 2j+1 (16 values each).
    let pair_sums = _mm_hadd_epi16(
        _mm256_castsi256_si128(bsums),
        _mm256_extracti128_si256::<1>(bsums),
    );
    let mins = _mm_madd_epi16(_mm256_extracti128_si256::<1>(sm), pair_sums);
    let sc = _mm256_castsi256_si128(sm);
    let scales = _mm256_set_m128i(sc, sc);
    let parts = std::array::from_fn(|c| {
        // SAFETY: qs chunk c is bytes 16+32c..48+32c; activations 4+64c..68+64c.
        let (q, y1, y2) = unsafe {
            (
                _mm256_loadu_si256(w.add(16 + 32 * c) as *const __m256i),
                _mm256_loadu_si256(a.add(4 + 64 * c) as *const __m256i),
                _mm256_loadu_si256(a.add(36 + 64 * c) as *const __m256i),
            )
        };
        let lo = _mm256_and_si256(q, m4);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
        let s1 = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * c));
        let s2 = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * c + 1));
        let p1 = _mm256_madd_epi16(s1, _mm256_maddubs_epi16(lo, y1));
        let p2 = _mm256_madd_epi16(s2, _mm256_maddubs_epi16(hi, y2));
        _mm256_add_epi32(p1, p2)
    });
    (parts, mins)
}

/// [`q4_k_block`] for one weight block and four activation blocks, the weight's nibbles and
/// scales unpacked once: lane `r` holds row `r`'s `(Σ scale·q·a, Σ min·bsum)` over the block.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_k_block_x4(w: *const u8, a: [*const u8; 4]) -> (__m128i, __m128i) {
    let m4 = _mm256_set1_epi8(0x0F);
    // The caller passes w at a 144-byte Q4_K block and each a[r] at a 292-byte Q8_K block.
    // SAFETY: scale bytes 4..16 of the Q4_K block.
    let sm = unsafe { k4_scales_mins(w.add(4)) };
    let mins_w = _mm256_extracti128_si256::<1>(sm);
    // Lane c of mins[r]: row r's part c.
    let mins = a.map(|ar| {
        // SAFETY: bsums (16 i16) end at byte 292 of the Q8_K block.
        let bsums = unsafe { _mm256_loadu_si256(ar.add(260) as *const __m256i) };
        let pair_sums = _mm_hadd_epi16(
            _mm256_castsi256_si128(bsums),
            _mm256_extracti128_si256::<1>(bsums),
        );
        _mm_madd_epi16(mins_w, pair_sums)
    });
    let sc = _mm256_castsi256_si128(sm);
    let scales = _mm256_set_m128i(sc, sc);
    let mut totals = [_mm256_setzero_si256(); 4];
    for c in 0..4 {
        // SAFETY: qs chunk c is bytes 16+32c..48+32c of the Q4_K block.
        let q = unsafe { _mm256_loadu_si256(w.add(16 + 32 * c) as *const __m256i) };
        let lo = _mm256_and_si256(q, m4);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
        let s1 = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * c));
        let s2 = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * c + 1));
        for (total, ar) in totals.iter_mut().zip(a) {
            // SAFETY: activations 4+64c..68+64c of the Q8_K block.
            let (y1, y2) = unsafe {
                (
                    _mm256_loadu_si256(ar.add(4 + 64 * c) as *const __m256i),
                    _mm256_loadu_si256(ar.add(36 + 64 * c) as *const __m256i),
                )
            };
            let p1 = _mm256_madd_epi16(s1, _mm256_maddubs_epi16(lo, y1));
            let p2 = _mm256_madd_epi16(s2, _mm256_maddubs_epi16(hi, y2));
            *total = _mm256_add_epi32(*total, _mm256_add_epi32(p1, p2));
        }
    }
    let m = transpose4(mins);
    let min_totals = _mm_add_epi32(_mm_add_epi32(m[0], m[1]), _mm_add_epi32(m[2], m[3]));
    (hsum4_i32(totals), min_totals)
}

/// The 6-bit scales and mins of one Q4_K group super-block at `gb` (layout of `repack`), as
/// bytes `8j + m` (sub-block `j`, row `m`) of `sc` and `mn`.
///
/// # Safety
/// AVX2; `gb` points at a whole group super-block.
#[inline(always)]
pub(super) unsafe fn q4_k_scales_mins(gb: *const u8, sc: &mut [u8; 64], mn: &mut [u8; 64]) {
    // SAFETY: bytes 32..128 of the group block; the stores go to the 64-byte arrays.
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let m30 = _mm256_set1_epi8(0x30);
        let lo0 = _mm256_loadu_si256(gb.add(32) as *const __m256i);
        let lo1 = _mm256_loadu_si256(gb.add(64) as *const __m256i);
        let hi = _mm256_loadu_si256(gb.add(96) as *const __m256i);
        let top = |v: __m256i| _mm256_and_si256(v, m30);
        let sc0 = _mm256_or_si256(_mm256_and_si256(lo0, m4), top(_mm256_slli_epi16::<4>(hi)));
        let sc1 = _mm256_or_si256(_mm256_and_si256(lo1, m4), top(_mm256_slli_epi16::<2>(hi)));
        let mn0 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(lo0), m4), top(hi));
        let mn1 = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(lo1), m4),
            top(_mm256_srli_epi16::<2>(hi)),
        );
        _mm256_storeu_si256(sc.as_mut_ptr() as *mut __m256i, sc0);
        _mm256_storeu_si256(sc.as_mut_ptr().add(32) as *mut __m256i, sc1);
        _mm256_storeu_si256(mn.as_mut_ptr() as *mut __m256i, mn0);
        _mm256_storeu_si256(mn.as_mut_ptr().add(32) as *mut __m256i, mn1);
    }
}

/// Eight interleaved Q4_K rows (one group, `nb` super-blocks) against `N` activation rows: lane
/// `m` of each vector is weight row `m`. Per super-block and sub-block `j`: four quants of each
/// row times four broadcast activations by `maddubs` (eight steps summed in i16: at most
/// 8·2·15·128 = 30720), times the rows' scales by `madd`; then lane `m` of `sumi` and `summ`
/// holds row `m`'s exact block sums, and the f32 steps are the reference's.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_x8<const N: usize>(g: &[u8], a: [&[u8]; N], nb: usize) -> [[f32; 8]; N] {
    // SAFETY: forwarded (the features are enabled here).
    unsafe { q4_k_x8_body::<N, false>(g, a, nb) }
}

/// [`q4_k_x8`] with AVX-512 VNNI on 256-bit registers: `vpdpbusd` sums each four quants times
/// four activations straight into the row's i32 lane (no i16 step), and the sub-block's sum is
/// multiplied by its scale in i32. The same exact integers, so the same result.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn q4_k_x8_vnni<const N: usize>(g: &[u8], a: [&[u8]; N], nb: usize) -> [[f32; 8]; N] {
    // SAFETY: forwarded (the features are enabled here).
    unsafe { q4_k_x8_body::<N, true>(g, a, nb) }
}

/// The body of [`q4_k_x8`] and [`q4_k_x8_vnni`].
///
/// # Safety
/// AVX2, FMA and F16C (and AVX-512 VNNI + VL if `VNNI`); the slices as `rows_x8` checks them.
#[inline(always)]
unsafe fn q4_k_x8_body<const N: usize, const VNNI: bool>(
    g: &[u8],
    a: [&[u8]; N],
    nb: usize,
) -> [[f32; 8]; N] {
    // SAFETY: the caller guarantees the target features and the slice sizes (see above).
    unsafe {
        let (mut acc, mut acc_min) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        let (mut sc, mut mn) = ([0u8; 64], [0u8; 64]);
        for b in 0..nb {
            if N == 1 {
                prefetch_ahead(g.as_ptr().wrapping_add(X8_BLOCK * b), X8_BLOCK);
            }
            // In bounds: block b of the group is X8_BLOCK bytes at X8_BLOCK·b and block b of each
            // activation row 292 bytes at 292·b (checked by rows_x8); every load below is inside
            // them, and the stores go to the 64-byte arrays above.
            {
                let gb = g.as_ptr().add(X8_BLOCK * b);
                let ab: [*const u8; N] = a.map(|r| r.as_ptr().add(292 * b));
                q4_k_scales_mins(gb, &mut sc, &mut mn);

                let mut sumi = [_mm256_setzero_si256(); N];
                for c in 0..4 {
                    let q = gb.add(128 + 256 * c);
                    if VNNI {
                        let lo =
                            q4_k_x8_sub_block::<N, false, true>(q, ab.map(|ar| ar.add(4 + 64 * c)));
                        let hi =
                            q4_k_x8_sub_block::<N, true, true>(q, ab.map(|ar| ar.add(36 + 64 * c)));
                        let scale = |j: usize| {
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                sc.as_ptr().add(8 * j) as *const __m128i
                            ))
                        };
                        let (s_lo, s_hi) = (scale(2 * c), scale(2 * c + 1));
                        for r in 0..N {
                            let t = _mm256_add_epi32(
                                _mm256_mullo_epi32(lo[r], s_lo),
                                _mm256_mullo_epi32(hi[r], s_hi),
                            );
                            sumi[r] = _mm256_add_epi32(sumi[r], t);
                        }
                        continue;
                    }
                    let lo =
                        q4_k_x8_sub_block::<N, false, false>(q, ab.map(|ar| ar.add(4 + 64 * c)));
                    let hi =
                        q4_k_x8_sub_block::<N, true, false>(q, ab.map(|ar| ar.add(36 + 64 * c)));
                    // Row m's scale of sub-blocks 2c and 2c + 1 in both i16 halves of lane m.
                    let scale = |j: usize| {
                        let s8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            sc.as_ptr().add(8 * j) as *const __m128i
                        ));
                        _mm256_or_si256(s8, _mm256_slli_epi32::<16>(s8))
                    };
                    let (s_lo, s_hi) = (scale(2 * c), scale(2 * c + 1));
                    for r in 0..N {
                        let t = _mm256_add_epi32(
                            _mm256_madd_epi16(lo[r], s_lo),
                            _mm256_madd_epi16(hi[r], s_hi),
                        );
                        sumi[r] = _mm256_add_epi32(sumi[r], t);
                    }
                }

                // Mins: lane m of madd(pairs of row m's mins of sub-blocks 2i, 2i+1, pairs of the
                // activations' 32-value sums).
                let mins: [__m256i; 4] = std::array::from_fn(|i| {
                    let m_even = _mm_loadl_epi64(mn.as_ptr().add(16 * i) as *const __m128i);
                    let m_odd = _mm_loadl_epi64(mn.as_ptr().add(16 * i + 8) as *const __m128i);
                    _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m_even, m_odd))
                });
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(gb as *const __m128i));
                let dmw = _mm256_cvtph_ps(_mm_loadu_si128(gb.add(16) as *const __m128i));
                for r in 0..N {
                    let bsums = _mm256_loadu_si256(ab[r].add(260) as *const __m256i);
                    // i16 lane j: the sum of sub-block j's 32 activations.
                    let sums = _mm_hadd_epi16(
                        _mm256_castsi256_si128(bsums),
                        _mm256_extracti128_si256::<1>(bsums),
                    );
                    let pair = |i: usize| _mm256_set1_epi32(extract_i32(sums, i));
                    let mut summ = _mm256_madd_epi16(mins[0], pair(0));
                    for (i, mi) in mins.iter().enumerate().skip(1) {
                        summ = _mm256_add_epi32(summ, _mm256_madd_epi16(*mi, pair(i)));
                    }
                    let ad = _mm256_set1_ps(f32_ptr(ab[r]));
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r]), _mm256_mul_ps(dw, ad), acc[r]);
                    acc_min[r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(summ),
                        _mm256_mul_ps(dmw, ad),
                        acc_min[r],
                    );
                }
            }
        }
        std::array::from_fn(|r| {
            let mut out = [0.0f32; 8];
            // out holds eight f32; unaligned store.
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(acc[r], acc_min[r]));
            out
        })
    }
}

/// One sub-block of eight interleaved Q4_K rows (the low nibbles of the part at `q`, or the
/// high ones if `HI`) against the 32 activations at each `a[r]`. Without `VNNI`, lane pair
/// `2m, 2m + 1` of result `r` (i16) sums row `m`'s quants times the activations; with it
/// (`vpdpbusd`), lane `m` (i32) holds row `m`'s sum.
///
/// # Safety
/// AVX2 (and AVX-512 VNNI + VL if `VNNI`); `q` points at 256 readable bytes and each `a[r]` at
/// 32.
#[inline(always)]
unsafe fn q4_k_x8_sub_block<const N: usize, const HI: bool, const VNNI: bool>(
    q: *const u8,
    a: [*const u8; N],
) -> [__m256i; N] {
    // SAFETY: forwarded to the caller (the features and the byte ranges above).
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        // Steps k go to chain k % chains: with few rows, one chain per row would leave the
        // eight steps waiting on each other's latency. The sums are exact integers, so the
        // split does not change them.
        let chains = super::independent_chains(N);
        let mut p = [[_mm256_setzero_si256(); 4]; N];
        for k in 0..8 {
            let v = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
            let w = if HI {
                _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4)
            } else {
                _mm256_and_si256(v, m4)
            };
            for (pr, ar) in p.iter_mut().zip(a) {
                let y = broadcast_i32(ar.add(4 * k));
                let c = &mut pr[k % chains];
                *c = if VNNI {
                    _mm256_dpbusd_epi32(*c, w, y)
                } else {
                    _mm256_add_epi16(*c, _mm256_maddubs_epi16(w, y))
                };
            }
        }
        // A loop, not `map` with a closure: a closure has only its enclosing function's target
        // features, and this helper has none, so where LLVM left the closure out of line (for
        // one row, once the kernel grew) every intrinsic in it became a call (decode ~4.5×
        // slower).
        let mut sums = [_mm256_setzero_si256(); N];
        for (sum, c) in sums.iter_mut().zip(p) {
            *sum = c[0];
            for &ck in &c[1..chains] {
                *sum = if VNNI {
                    _mm256_add_epi32(*sum, ck)
                } else {
                    _mm256_add_epi16(*sum, ck)
                };
            }
        }
        sums
    }
}

/// Eight interleaved Q8_0/Q4_0/Q5_0/IQ4_NL rows (one group, `nb` blocks) against `N` Q8_0
/// activation rows: lane `m` is weight row `m`. Per block, step `s` takes four quants of each
/// row against four broadcast activations by `maddubs`. Q8_0's signed quants and IQ4_NL's
/// (its nibbles looked up in `KVALUES_IQ4NL`) go through the sign trick, each step widened to
/// i32 by `madd`; Q4_0's and Q5_0's go in unsigned (0..15, 0..31), four
/// steps summed in i16 (at most 4·2·31·128 = 31744), and the offset (8 or 16) times the
/// activations' block sum (`sums[r][b]`) is subtracted. Lane `m` of `isum` is then row `m`'s
/// exact block sum, and the f32 step is the reference's (`acc = isum·(d_w·d_a) + acc`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q0_x8<const T: u8, const N: usize>(
    g: &[u8],
    a: [&[u8]; N],
    sums: [&[i32]; N],
    nb: usize,
) -> [[f32; 8]; N] {
    // SAFETY: forwarded (the features are enabled here).
    unsafe { q0_x8_body::<T, N, false>(g, a, sums, nb) }
}

/// [`q0_x8`] with AVX-512 VNNI on 256-bit registers: `vpdpbusd` adds each step's four
/// products per row straight into the row's i32 lane; Q8_0's and IQ4_NL's signed weights go
/// in offset by 128 (unsigned), and 128 times the activations' block sum comes off. The same
/// exact integers.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn q0_x8_vnni<const T: u8, const N: usize>(
    g: &[u8],
    a: [&[u8]; N],
    sums: [&[i32]; N],
    nb: usize,
) -> [[f32; 8]; N] {
    // SAFETY: forwarded (the features are enabled here).
    unsafe { q0_x8_body::<T, N, true>(g, a, sums, nb) }
}

/// The body of [`q0_x8`] and [`q0_x8_vnni`].
///
/// # Safety
/// AVX2, FMA and F16C (and AVX-512 VNNI + VL if `VNNI`); the slices as `rows_x8` checks them.
#[inline(always)]
unsafe fn q0_x8_body<const T: u8, const N: usize, const VNNI: bool>(
    g: &[u8],
    a: [&[u8]; N],
    sums: [&[i32]; N],
    nb: usize,
) -> [[f32; 8]; N] {
    // SAFETY: the caller guarantees the target features and the slice sizes (see above).
    unsafe {
        let gbb = GROUP * q0_size::<T>();
        let ones = _mm256_set1_epi16(1);
        let m4 = _mm256_set1_epi8(0x0F);
        let iq4_table = iq4_nl_table();
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); N];
        for b in 0..nb {
            if N == 1 {
                prefetch_ahead(g.as_ptr().wrapping_add(gbb * b), gbb);
            }
            // In bounds: group block b is gbb bytes at gbb·b and activation block b 34 bytes at 34·b
            // (checked by rows_x8); every load below is inside them.
            {
                let gb = g.as_ptr().add(gbb * b);
                let ab: [*const u8; N] = a.map(|r| r.as_ptr().add(34 * b));
                let mut isum = [_mm256_setzero_si256(); N];
                if T == Q8_0 || T == IQ4_NL {
                    for s in 0..8 {
                        let w = if T == Q8_0 {
                            _mm256_loadu_si256(gb.add(16 + 32 * s) as *const __m256i)
                        } else {
                            // Step s < 4: the low nibbles of run s; s ≥ 4: the high of s − 4.
                            let v = _mm256_loadu_si256(gb.add(16 + 32 * (s % 4)) as *const __m256i);
                            let nib = if s < 4 {
                                _mm256_and_si256(v, m4)
                            } else {
                                _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4)
                            };
                            _mm256_shuffle_epi8(iq4_table, nib)
                        };
                        if VNNI {
                            // w + 128 as unsigned bytes; 128 times the block sum comes off below.
                            let uw = _mm256_xor_si256(w, flip);
                            for (acc_i, &ar) in isum.iter_mut().zip(&ab) {
                                *acc_i = _mm256_dpbusd_epi32(
                                    *acc_i,
                                    uw,
                                    broadcast_i32(ar.add(2 + 4 * s)),
                                );
                            }
                            continue;
                        }
                        let aw = _mm256_sign_epi8(w, w);
                        for (acc_i, &ar) in isum.iter_mut().zip(&ab) {
                            let p = _mm256_maddubs_epi16(
                                aw,
                                _mm256_sign_epi8(broadcast_i32(ar.add(2 + 4 * s)), w),
                            );
                            *acc_i = _mm256_add_epi32(*acc_i, _mm256_madd_epi16(p, ones));
                        }
                    }
                    if VNNI {
                        for (acc_i, sr) in isum.iter_mut().zip(&sums) {
                            *acc_i = _mm256_sub_epi32(*acc_i, _mm256_set1_epi32(128 * sr[b]));
                        }
                    }
                } else {
                    let body = if T == Q5_0 { 48 } else { 16 };
                    let plane = _mm256_loadu_si256(gb.add(16) as *const __m256i);
                    for high in [false, true] {
                        let mut p = [_mm256_setzero_si256(); N];
                        for k in 0..4 {
                            let s = k + if high { 4 } else { 0 };
                            let v = _mm256_loadu_si256(gb.add(body + 32 * k) as *const __m256i);
                            let nib = if high {
                                _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4)
                            } else {
                                _mm256_and_si256(v, m4)
                            };
                            let w = if T == Q5_0 {
                                // Bit s of each plane byte, moved to bit 4 (16-bit shifts: the
                                // mask keeps only bits that stayed inside their byte).
                                let moved = if s <= 4 {
                                    _mm256_sll_epi16(plane, _mm_cvtsi32_si128(4 - s as i32))
                                } else {
                                    _mm256_srl_epi16(plane, _mm_cvtsi32_si128(s as i32 - 4))
                                };
                                _mm256_or_si256(
                                    nib,
                                    _mm256_and_si256(moved, _mm256_set1_epi8(0x10)),
                                )
                            } else {
                                nib
                            };
                            if VNNI {
                                for (acc_i, &ar) in isum.iter_mut().zip(&ab) {
                                    *acc_i = _mm256_dpbusd_epi32(
                                        *acc_i,
                                        w,
                                        broadcast_i32(ar.add(2 + 4 * s)),
                                    );
                                }
                            } else {
                                for (pr, &ar) in p.iter_mut().zip(&ab) {
                                    *pr = _mm256_add_epi16(
                                        *pr,
                                        _mm256_maddubs_epi16(w, broadcast_i32(ar.add(2 + 4 * s))),
                                    );
                                }
                            }
                        }
                        if !VNNI {
                            for (acc_i, pr) in isum.iter_mut().zip(p) {
                                *acc_i = _mm256_add_epi32(*acc_i, _mm256_madd_epi16(pr, ones));
                            }
                        }
                    }
                    let offset = if T == Q5_0 { 16 } else { 8 };
                    for (acc_i, sr) in isum.iter_mut().zip(&sums) {
                        *acc_i = _mm256_sub_epi32(*acc_i, _mm256_set1_epi32(offset * sr[b]));
                    }
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(gb as *const __m128i));
                for r in 0..N {
                    let da = _mm256_set1_ps(f16_ptr(ab[r]));
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(dw, da), acc[r]);
                }
            }
        }
        acc.map(|v| {
            let mut out = [0.0f32; 8];
            // out holds eight f32; unaligned store.
            _mm256_storeu_ps(out.as_mut_ptr(), v);
            out
        })
    }
}

/// `KVALUES_IQ4NL` in both 128-bit halves, for `vpshufb` lookups of nibbles.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn iq4_nl_table() -> __m256i {
    // SAFETY: the table holds 16 bytes.
    let t = unsafe { _mm_loadu_si128(super::iq_tables::KVALUES_IQ4NL.as_ptr() as *const __m128i) };
    _mm256_broadcastsi128_si256(t)
}

/// The sum of activations `32j..32j + 32` of the Q8_K block at `ab`: its two 16-value sums
/// (i16 at 260..).
///
/// # Safety
/// `ab` points at a whole 292-byte Q8_K block and `j < 8`.
#[inline(always)]
pub(super) unsafe fn q8_k_sum32(ab: *const u8, j: usize) -> i32 {
    // SAFETY: bytes 260 + 4j..264 + 4j of the block (the caller's contract).
    let bs = |i: usize| unsafe { std::ptr::read_unaligned(ab.add(260 + 2 * i) as *const i16) };
    bs(2 * j) as i32 + bs(2 * j + 1) as i32
}

/// The 6-bit scales of one IQ4_XS group super-block at `gb` (layout of `repack`), offset by
/// −32, as bytes `8j + m` (block `j`, row `m`) of `sc`. Entry `e`'s low four bits are the
/// nibbles at 16.. (entries 0..32 low, 32..64 high); its top two bits are at 48..64, entries
/// 0..16 at bits 0-1 of byte `e`, 16..32 at bits 2-3 of byte `e − 16`, and so on: the 16
/// top-bit bytes go into both halves of `h`, and each half moves its pair of bits to bits 4-5.
///
/// # Safety
/// AVX2; `gb` points at a whole group super-block.
#[inline(always)]
pub(super) unsafe fn iq4_xs_scales(gb: *const u8, sc: &mut [i8; 64]) {
    // SAFETY: bytes 16..64 of the group block; the stores go to the 64-byte array.
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let m30 = _mm256_set1_epi8(0x30);
        let lo = _mm256_loadu_si256(gb.add(16) as *const __m256i);
        let h = _mm256_broadcastsi128_si256(_mm_loadu_si128(gb.add(48) as *const __m128i));
        let top_a =
            _mm256_blend_epi32::<0xF0>(_mm256_slli_epi16::<4>(h), _mm256_slli_epi16::<2>(h));
        let top_b = _mm256_blend_epi32::<0xF0>(h, _mm256_srli_epi16::<2>(h));
        let off = _mm256_set1_epi8(32);
        let sc_a = _mm256_or_si256(_mm256_and_si256(lo, m4), _mm256_and_si256(top_a, m30));
        let sc_b = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(lo), m4),
            _mm256_and_si256(top_b, m30),
        );
        _mm256_storeu_si256(sc.as_mut_ptr() as *mut __m256i, _mm256_sub_epi8(sc_a, off));
        _mm256_storeu_si256(
            sc.as_mut_ptr().add(32) as *mut __m256i,
            _mm256_sub_epi8(sc_b, off),
        );
    }
}

/// Eight interleaved IQ4_XS rows (one group, `nb` super-blocks, the layout of `repack`)
/// against `N` Q8_K activation rows: lane `m` is weight row `m`. Per 32-value block `j`, each
/// step's four indexes of each row are looked up in `KVALUES_IQ4NL` and taken against four
/// broadcast activations through the sign trick (`maddubs`: at most 2·127·127 = 32258 per
/// i16), then `madd` by the rows' block scales (−32..31) into i32. Lane `m` of `isum` is then
/// row `m`'s exact super-block sum (at most 8·32·32·127·127 < 2³¹), and the f32 step is the
/// reference's (`acc = isum·(d_w·d_a) + acc`; IQ4_XS's row constant is 1).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq4_xs_x8<const N: usize>(g: &[u8], a: [&[u8]; N], nb: usize) -> [[f32; 8]; N] {
    // SAFETY: forwarded (the features are enabled here).
    unsafe { iq4_xs_x8_body::<N, false>(g, a, nb) }
}

/// [`iq4_xs_x8`] with AVX-512 VNNI on 256-bit registers: the values go in offset by 128 as
/// unsigned bytes, `vpdpbusd` sums each block's steps into the row's i32 lane, 128 times the
/// block's activation sum comes off, and the block scale multiplies. The same integers.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn iq4_xs_x8_vnni<const N: usize>(g: &[u8], a: [&[u8]; N], nb: usize) -> [[f32; 8]; N] {
    // SAFETY: forwarded (the features are enabled here).
    unsafe { iq4_xs_x8_body::<N, true>(g, a, nb) }
}

/// The body of [`iq4_xs_x8`] and [`iq4_xs_x8_vnni`].
///
/// # Safety
/// AVX2, FMA and F16C (and AVX-512 VNNI + VL if `VNNI`); the slices as `rows_x8` checks them.
#[inline(always)]
unsafe fn iq4_xs_x8_body<const N: usize, const VNNI: bool>(
    g: &[u8],
    a: [&[u8]; N],
    nb: usize,
) -> [[f32; 8]; N] {
    const GBB: usize = GROUP * 136;
    // SAFETY: the caller guarantees the target features and the slice sizes (see above).
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let low16 = _mm256_set1_epi32(0xFFFF);
        let table = if VNNI {
            _mm256_xor_si256(iq4_nl_table(), _mm256_set1_epi8(-128))
        } else {
            iq4_nl_table()
        };
        let mut acc = [_mm256_setzero_ps(); N];
        let mut sc = [0i8; 64];
        for b in 0..nb {
            if N == 1 {
                prefetch_ahead(g.as_ptr().wrapping_add(GBB * b), GBB);
            }
            // In bounds: group block b is GBB bytes at GBB·b and activation block b 292 bytes at
            // 292·b (checked by rows_x8); every load below is inside them, and the stores go to
            // the 64-byte array above.
            let gb = g.as_ptr().add(GBB * b);
            let ab: [*const u8; N] = a.map(|r| r.as_ptr().add(292 * b));
            iq4_xs_scales(gb, &mut sc);

            let mut isum = [_mm256_setzero_si256(); N];
            for j in 0..8 {
                // Lane m: row m's scale of block j.
                let s32 =
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(sc.as_ptr().add(8 * j) as *const __m128i));
                // ... and in both i16 halves of lane m, for `madd`.
                let pair =
                    _mm256_or_si256(_mm256_and_si256(s32, low16), _mm256_slli_epi32::<16>(s32));
                let q = gb.add(64 + 128 * j);
                let mut blk = [_mm256_setzero_si256(); N];
                for k in 0..4 {
                    let v = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
                    for (s, nib) in [
                        (k, _mm256_and_si256(v, m4)),
                        (k + 4, _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4)),
                    ] {
                        if VNNI {
                            // The values + 128 as unsigned bytes (the table is stored so).
                            let uw = _mm256_shuffle_epi8(table, nib);
                            for r in 0..N {
                                blk[r] = _mm256_dpbusd_epi32(
                                    blk[r],
                                    uw,
                                    broadcast_i32(ab[r].add(4 + 32 * j + 4 * s)),
                                );
                            }
                            continue;
                        }
                        let w = _mm256_shuffle_epi8(table, nib);
                        let aw = _mm256_sign_epi8(w, w);
                        for r in 0..N {
                            let p = _mm256_maddubs_epi16(
                                aw,
                                _mm256_sign_epi8(broadcast_i32(ab[r].add(4 + 32 * j + 4 * s)), w),
                            );
                            isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(p, pair));
                        }
                    }
                }
                if VNNI {
                    for r in 0..N {
                        let offset = _mm256_set1_epi32(128 * q8_k_sum32(ab[r], j));
                        let raw = _mm256_sub_epi32(blk[r], offset);
                        isum[r] = _mm256_add_epi32(isum[r], _mm256_mullo_epi32(raw, s32));
                    }
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(gb as *const __m128i));
            for r in 0..N {
                let ad = _mm256_set1_ps(f32_ptr(ab[r]));
                acc[r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(dw, ad), acc[r]);
            }
        }
        acc.map(|v| {
            let mut out = [0.0f32; 8];
            // out holds eight f32; unaligned store.
            _mm256_storeu_ps(out.as_mut_ptr(), v);
            out
        })
    }
}

/// i32 lane `i` (0..4) of `v`.
#[inline]
#[target_feature(enable = "avx2")]
fn extract_i32(v: __m128i, i: usize) -> i32 {
    match i {
        0 => _mm_extract_epi32::<0>(v),
        1 => _mm_extract_epi32::<1>(v),
        2 => _mm_extract_epi32::<2>(v),
        _ => _mm_extract_epi32::<3>(v),
    }
}

/// A 4×4 transpose of i32 lanes: lane `j` of element `i` goes to lane `i` of element `j`.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose4(m: [__m128i; 4]) -> [__m128i; 4] {
    let t01 = _mm_unpacklo_epi32(m[0], m[1]);
    let t23 = _mm_unpacklo_epi32(m[2], m[3]);
    let u01 = _mm_unpackhi_epi32(m[0], m[1]);
    let u23 = _mm_unpackhi_epi32(m[2], m[3]);
    [
        _mm_unpacklo_epi64(t01, t23),
        _mm_unpackhi_epi64(t01, t23),
        _mm_unpacklo_epi64(u01, u23),
        _mm_unpackhi_epi64(u01, u23),
    ]
}

#[inline]
#[target_feature(enable = "avx2")]
fn hsum128_i32(v: __m128i) -> i32 {
    let s = _mm_add_epi32(v, _mm_shuffle_epi32::<0b01_00_11_10>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// An f16 (raw little-endian bits at p) as f32, exactly.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn f16_ptr(p: *const u8) -> f32 {
    // SAFETY: the caller's block holds two bytes at p.
    let bits = unsafe { std::ptr::read_unaligned(p as *const u16) };
    // black_box makes the whole register exist: seeing only lane 0 used, the compiler would
    // otherwise insert the 16 bits into whatever register is at hand, e.g. a kernel's running
    // sum, and every block's scale load would wait for the previous block's arithmetic
    // (measured: Q8_0 decode 30% slower).
    let v = std::hint::black_box(_mm_cvtsi32_si128(bits as i32));
    _mm_cvtss_f32(_mm_cvtph_ps(v))
}

#[inline]
pub(super) unsafe fn f32_ptr(p: *const u8) -> f32 {
    // SAFETY: the caller's block holds four bytes at p.
    unsafe { std::ptr::read_unaligned(p as *const f32) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_row(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut acc = [0.0f32; 2];
    for i in 0..nb {
        // SAFETY: block i of each row is in bounds (checked by vec_dot).
        unsafe {
            let (wb, ab) = (w.as_ptr().add(144 * i), a.as_ptr().add(292 * i));
            let (p, mins) = q4_k_block(wb, ab);
            let ad = f32_ptr(ab);
            let (d, dmin) = (f16_ptr(wb) * ad, f16_ptr(wb.add(2)) * ad);
            // Only the block's totals matter (exact integers: any summation order).
            let total =
                _mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3]));
            q4_k_add(&mut acc, hsum_i32(total), hsum128_i32(mins), d, dmin);
        }
    }
    acc[0] - acc[1]
}

/// One Q4_K row against four activation rows: lane r of two f32 sums, one fused multiply-add
/// each per block.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_rows_x4(w: &[u8], a: [&[u8]; 4], nb: usize) -> [f32; 4] {
    let (mut acc, mut acc_min) = (_mm_setzero_ps(), _mm_setzero_ps());
    for i in 0..nb {
        // SAFETY: block i of every row is in bounds (checked by rows_x4).
        unsafe {
            let wb = w.as_ptr().add(144 * i);
            let ab = a.map(|r| r.as_ptr().add(292 * i));
            let (total, mins) = q4_k_block_x4(wb, ab);
            let ad = _mm_set_ps(
                f32_ptr(ab[3]),
                f32_ptr(ab[2]),
                f32_ptr(ab[1]),
                f32_ptr(ab[0]),
            );
            let d = _mm_mul_ps(_mm_set1_ps(f16_ptr(wb)), ad);
            let dmin = _mm_mul_ps(_mm_set1_ps(f16_ptr(wb.add(2))), ad);
            acc = _mm_fmadd_ps(_mm_cvtepi32_ps(total), d, acc);
            acc_min = _mm_fmadd_ps(_mm_cvtepi32_ps(mins), dmin, acc_min);
        }
    }
    let mut out = [0.0f32; 4];
    // SAFETY: out holds four f32; unaligned store.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), _mm_sub_ps(acc, acc_min)) };
    out
}

/// Sixteen i16 scales of a super-block (one per 16 values) as two registers holding scales
/// 0..8 and 8..16 in both 128-bit lanes, for [`pair_scale`].
#[inline]
#[target_feature(enable = "avx2")]
fn scales_by_lane(s: __m256i) -> [__m256i; 2] {
    [
        _mm256_permute2x128_si256::<0x00>(s, s),
        _mm256_permute2x128_si256::<0x11>(s, s),
    ]
}

/// The i16 multipliers of values `32j..32j+32`: scale `2j` for the first 16, `2j + 1` for the
/// next 16 (a byte shuffle of [`scales_by_lane`]'s registers).
#[inline]
#[target_feature(enable = "avx2")]
fn pair_scale(s: &[__m256i; 2], j: usize) -> __m256i {
    let m = (2 * j % 8) as u16;
    let lo = (((2 * m + 1) << 8) | (2 * m)) as i16;
    let hi = (((2 * m + 3) << 8) | (2 * m + 2)) as i16;
    _mm256_shuffle_epi8(
        s[j / 4],
        _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo)),
    )
}

/// `acc[r] += Σ sc·u·y` in eight i32 lanes, for the 32 values `y` at byte `at` of each
/// activation block `ab[r]`: unsigned quants `u` (at most 63, so `maddubs` pair sums fit in
/// i16) and the i16 multiplier of each pair sum `sc`.
///
/// # Safety
/// AVX2; `at + 32` bytes in every `ab[r]`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn add_scaled<const R: usize>(
    acc: &mut [__m256i; R],
    u: __m256i,
    sc: __m256i,
    ab: [&[u8]; R],
    at: usize,
) {
    for (acc, ab) in acc.iter_mut().zip(ab) {
        // SAFETY: the caller's bound.
        let y = unsafe { load(ab, at) };
        *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), sc));
    }
}

/// The sixteen i16 sums of 16 activations of a Q8_K block.
///
/// # Safety
/// AVX2; `ab` holds a whole 292-byte block.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q8k_sums(ab: &[u8]) -> __m256i {
    // SAFETY: bytes 260..292 of the block.
    unsafe { load(ab, 260) }
}

/// `nb` Q2_K super-blocks of one weight row (84 bytes: 16 scale/min bytes, 64 bytes of 2-bit
/// quants, f16 d and dmin) against `R` activation rows, each result equal to the reference's
/// `block_sums` of `q2_k_q8_k`: per block the exact `Σ sc·q·a` and `Σ m·bsum`, combined in
/// f32 by `combine_k`. The quants and scales are unpacked once for the `R` rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2_k_rows<const R: usize>(w: &[u8], a: [&[u8]; R], nb: usize) -> [f32; R] {
    let mut sum = [0.0f32; R];
    let low2 = _mm256_set1_epi8(3);
    let nibble = _mm_set1_epi8(0xF);
    for i in 0..nb {
        let wb = &w[84 * i..84 * i + 84];
        let ab = a.map(|r| &r[292 * i..292 * i + 292]);
        // SAFETY: the 16 scale bytes at 0.
        let sm = unsafe { _mm_loadu_si128(wb.as_ptr() as *const __m128i) };
        let scales = scales_by_lane(_mm256_cvtepu8_epi16(_mm_and_si128(sm, nibble)));
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sm), nibble));
        let mut acc = [_mm256_setzero_si256(); R];
        for half in 0..2 {
            // SAFETY: 32 quant bytes at 16 + 32·half.
            let q = unsafe { load(wb, 16 + 32 * half) };
            for k in 0..4 {
                let j = 4 * half + k;
                let u =
                    _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * k as i32)), low2);
                let sc = pair_scale(&scales, j);
                // SAFETY: values 32j..32j+32 of each Q8_K block.
                unsafe { add_scaled(&mut acc, u, sc, ab, 4 + 32 * j) };
            }
        }
        let (d, dmin) = (f16_at(wb, 80), f16_at(wb, 82));
        for r in 0..R {
            // SAFETY: the Q8_K block's sums.
            let summ = hsum_i32(_mm256_madd_epi16(mins, unsafe { q8k_sums(ab[r]) }));
            sum[r] += combine_k(f32_at(ab[r], 0), d, dmin, hsum_i32(acc[r]), summ);
        }
    }
    sum
}

/// `nb` Q3_K super-blocks of one weight row (110 bytes: 32 high-bit mask bytes, 64 bytes of
/// 2-bit quants, 12 bytes of 6-bit scales, f16 d) against `R` activation rows, each result
/// equal to the reference's `block_sums` of `q3_k_q8_k`. Each value is `u − 4` with `u` the
/// three bits (low two, and 4 where the mask bit is set), so a block's exact integer sum is
/// `Σ sc·Σ u·a − 4·Σ sc·bsum`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3_k_rows<const R: usize>(w: &[u8], a: [&[u8]; R], nb: usize) -> [f32; R] {
    let mut sum = [0.0f32; R];
    let low2 = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    for i in 0..nb {
        let wb = &w[110 * i..110 * i + 110];
        let ab = a.map(|r| &r[292 * i..292 * i + 292]);
        let sc8 = super::q3k_scales(&wb[96..108]);
        // SAFETY: 16 bytes of `sc8`.
        let sc16 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(sc8.as_ptr() as *const __m128i) });
        let scales = scales_by_lane(sc16);
        // SAFETY: the 32 mask bytes at 0.
        let hmask = unsafe { load(wb, 0) };
        let mut acc = [_mm256_setzero_si256(); R];
        for half in 0..2 {
            // SAFETY: 32 quant bytes at 32 + 32·half.
            let q = unsafe { load(wb, 32 + 32 * half) };
            for k in 0..4 {
                let j = 4 * half + k;
                let bit = _mm256_set1_epi8((1u8 << j) as i8);
                let high =
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hmask, bit), bit), four);
                let low =
                    _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * k as i32)), low2);
                let u = _mm256_or_si256(low, high);
                let sc = pair_scale(&scales, j);
                // SAFETY: values 32j..32j+32 of each Q8_K block.
                unsafe { add_scaled(&mut acc, u, sc, ab, 4 + 32 * j) };
            }
        }
        let d = f16_at(wb, 108);
        for r in 0..R {
            // SAFETY: the Q8_K block's sums.
            let offset = hsum_i32(_mm256_madd_epi16(sc16, unsafe { q8k_sums(ab[r]) }));
            let sumi = hsum_i32(acc[r]) - 4 * offset;
            sum[r] += f32_at(ab[r], 0) * d * sumi as f32;
        }
    }
    sum
}

/// `nb` Q5_K super-blocks of one weight row (176 bytes: f16 d and dmin, 12 bytes of 6-bit
/// scales and mins, 32 high-bit bytes, 128 bytes of low nibbles) against `R` activation rows,
/// each result equal to the reference's `block_sums` of `q5_k_q8_k`: per block the exact
/// `Σ sc·q·a` and `Σ m·bsum`, combined in f32 by `combine_k`. Scales, mins and quants are
/// unpacked once for the `R` rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_rows<const R: usize>(w: &[u8], a: [&[u8]; R], nb: usize) -> [f32; R] {
    let mut sum = [0.0f32; R];
    let mask = _mm256_set1_epi8(0x0F);
    let sixteen = _mm256_set1_epi8(16);
    for i in 0..nb {
        let wb = &w[176 * i..176 * i + 176];
        let ab = a.map(|r| &r[292 * i..292 * i + 292]);
        // SAFETY: the 12 scale bytes at 4 and the 32 high-bit bytes at 16.
        let (sm, qh) = unsafe { (k4_scales_mins(wb.as_ptr().add(4)), load(wb, 16)) };
        let sc = _mm256_castsi256_si128(sm);
        let scales = _mm256_set_m128i(sc, sc);
        let mins = _mm256_extracti128_si256::<1>(sm);
        let mut acc = [_mm256_setzero_si256(); R];
        for c in 0..4 {
            // SAFETY: low nibbles of part c at 48 + 32c.
            let q = unsafe { load(wb, 48 + 32 * c) };
            let bit1 = _mm256_set1_epi8((1u8 << (2 * c)) as i8);
            let bit2 = _mm256_set1_epi8((2u8 << (2 * c)) as i8);
            let h1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit1), bit1), sixteen);
            let h2 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit2), bit2), sixteen);
            let lo = _mm256_add_epi8(_mm256_and_si256(q, mask), h1);
            let hi = _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16::<4>(q), mask), h2);
            let s1 = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * c));
            let s2 = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * c + 1));
            // SAFETY: values 64c..64c + 64 of each Q8_K block.
            unsafe {
                add_scaled(&mut acc, lo, s1, ab, 4 + 64 * c);
                add_scaled(&mut acc, hi, s2, ab, 36 + 64 * c);
            }
        }
        let (d, dmin) = (f16_at(wb, 0), f16_at(wb, 2));
        for r in 0..R {
            // SAFETY: the Q8_K block's sums of 16 at 260; sub-block j has sums 2j and 2j + 1.
            let bsums = unsafe { load(ab[r], 260) };
            let pair_sums = _mm_hadd_epi16(
                _mm256_castsi256_si128(bsums),
                _mm256_extracti128_si256::<1>(bsums),
            );
            let m = _mm_madd_epi16(mins, pair_sums);
            let m = _mm_add_epi32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
            let m = _mm_add_epi32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
            let summ = _mm_cvtsi128_si32(m);
            sum[r] += combine_k(f32_at(ab[r], 0), d, dmin, hsum_i32(acc[r]), summ);
        }
    }
    sum
}

/// The 128 unsigned 6-bit values (0..63) of half `half` of a Q6_K block, as four groups of 32
/// bytes (values 0..31, 32..63, 64..95, 96..127 of the half).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6_k_half(w: *const u8, half: usize) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    // SAFETY: ql and qh of this half lie in the Q6_K block.
    let (l1, l2, h) = unsafe {
        (
            _mm256_loadu_si256(w.add(64 * half) as *const __m256i),
            _mm256_loadu_si256(w.add(64 * half + 32) as *const __m256i),
            _mm256_loadu_si256(w.add(128 + 32 * half) as *const __m256i),
        )
    };
    [
        _mm256_or_si256(
            _mm256_and_si256(l1, m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(h, m2)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(l2, m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(h), m2)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(h), m2)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(l2), m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(h), m2)),
        ),
    ]
}

/// A shuffle picking, for value group k (0..4) of a Q6_K half, scale 2k in the low 128-bit lane
/// and 2k+1 in the high lane, from the half's eight i16 scales held in both lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn q6_k_scale_pick(k: usize) -> __m256i {
    let (lo, hi) = ((4 * k) as i16, (4 * k + 2) as i16);
    _mm256_set_m128i(
        _mm_set1_epi16(((hi + 1) << 8) | hi),
        _mm_set1_epi16(((lo + 1) << 8) | lo),
    )
}

/// One Q6_K × Q8_K super-block's exact integer sum as lanes: (Σ scale·q·a with q unsigned
/// 0..63 over eight i32 lanes, Σ scale·bsum over eight i32 lanes); the block's sum is
/// `first − 32·second` (the −32 offset of every value, applied once).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6_k_block(w: *const u8, a: *const u8) -> (__m256i, __m256i) {
    // The caller passes w at a 210-byte Q6_K block and a at a 292-byte Q8_K block.
    // SAFETY: the 16 scales are bytes 192..208 of the Q6_K block.
    let scales = unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(192) as *const __m128i)) };
    // SAFETY: bsums (16 i16) end at byte 292 of the Q8_K block.
    let bsums = unsafe { _mm256_loadu_si256(a.add(260) as *const __m256i) };
    let offset = _mm256_madd_epi16(scales, bsums);
    let mut acc = _mm256_setzero_si256();
    for half in 0..2 {
        // The half's eight scales in both 128-bit lanes; group pair k takes scale 2k in the low
        // lane (values 0..15 of the group) and 2k+1 in the high lane (values 16..31).
        let sc = if half == 0 {
            _mm256_permute2x128_si256::<0x00>(scales, scales)
        } else {
            _mm256_permute2x128_si256::<0x11>(scales, scales)
        };
        // SAFETY: the caller's w is a whole Q6_K block.
        let q = unsafe { q6_k_half(w, half) };
        for (k, &qk) in q.iter().enumerate() {
            // SAFETY: activation group k of this half lies in the Q8_K block.
            let y = unsafe { _mm256_loadu_si256(a.add(4 + 128 * half + 32 * k) as *const __m256i) };
            let s = _mm256_shuffle_epi8(sc, q6_k_scale_pick(k));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s, _mm256_maddubs_epi16(qk, y)));
        }
    }
    (acc, offset)
}

/// [`q6_k_block`] for one weight block and four activation blocks, unpacking the weight once.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6_k_block_shared_w(w: *const u8, a: [*const u8; 4]) -> ([__m256i; 4], [__m256i; 4]) {
    // The caller passes w at a 210-byte Q6_K block and each a[r] at a 292-byte Q8_K block.
    // SAFETY: the 16 scales are bytes 192..208 of the Q6_K block.
    let scales = unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(192) as *const __m128i)) };
    let offset = a.map(|ar| {
        // SAFETY: bsums (16 i16) end at byte 292 of the Q8_K block.
        let bsums = unsafe { _mm256_loadu_si256(ar.add(260) as *const __m256i) };
        _mm256_madd_epi16(scales, bsums)
    });
    let mut acc = [_mm256_setzero_si256(); 4];
    for half in 0..2 {
        let sc = if half == 0 {
            _mm256_permute2x128_si256::<0x00>(scales, scales)
        } else {
            _mm256_permute2x128_si256::<0x11>(scales, scales)
        };
        // SAFETY: the caller's w is a whole Q6_K block.
        let q = unsafe { q6_k_half(w, half) };
        for (k, &qk) in q.iter().enumerate() {
            let s = _mm256_shuffle_epi8(sc, q6_k_scale_pick(k));
            for r in 0..4 {
                // SAFETY: activation group k of this half lies in the Q8_K block.
                let y = unsafe {
                    _mm256_loadu_si256(a[r].add(4 + 128 * half + 32 * k) as *const __m256i)
                };
                acc[r] =
                    _mm256_add_epi32(acc[r], _mm256_madd_epi16(s, _mm256_maddubs_epi16(qk, y)));
            }
        }
    }
    (acc, offset)
}

/// One Q6_K row: ggml's eight f32 lanes, one fused multiply-add per super-block.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_row(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        prefetch_ahead(w.as_ptr().wrapping_add(210 * i), 210);
        // SAFETY: block i of each row is in bounds (checked by vec_dot).
        unsafe {
            let (wb, ab) = (w.as_ptr().add(210 * i), a.as_ptr().add(292 * i));
            let (sum, offset) = q6_k_block(wb, ab);
            let lanes = _mm256_sub_epi32(sum, _mm256_slli_epi32::<5>(offset));
            let (wd, ad) = (f16_ptr(wb.add(208)), f32_ptr(ab));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(ad * wd), _mm256_cvtepi32_ps(lanes), acc);
        }
    }
    hsum_ps(acc)
}

/// One Q6_K row against four activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_rows_x4(w: &[u8], a: [&[u8]; 4], nb: usize) -> [f32; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in 0..nb {
        // SAFETY: block i of every row is in bounds (checked by rows_x4).
        unsafe {
            let wb = w.as_ptr().add(210 * i);
            let ab = a.map(|r| r.as_ptr().add(292 * i));
            let (sum, offset) = q6_k_block_shared_w(wb, ab);
            let wd = f16_ptr(wb.add(208));
            for r in 0..4 {
                let lanes = _mm256_sub_epi32(sum[r], _mm256_slli_epi32::<5>(offset[r]));
                let d = _mm256_set1_ps(f32_ptr(ab[r]) * wd);
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r]);
            }
        }
    }
    acc.map(|v| hsum_ps(v))
}

/// The Q8_0 activation quantizer for one 32-value block (the scalar path of
/// `quantize_activation`, bit for bit): scale `amax/127` stored as f16, values `x·(127/amax)`
/// rounded half to even. Inputs are finite (NaN converts differently).
pub(crate) fn quantize_q8_0(x: &[f32], b: &mut [u8]) {
    assert!(x.len() == 32 && b.len() == 34);
    // SAFETY: callers check has_avx2(); x holds 32 values and b 34 bytes (asserted above).
    unsafe { quantize_q8_0_avx2(x, b) }
}

#[target_feature(enable = "avx2")]
unsafe fn quantize_q8_0_avx2(x: &[f32], b: &mut [u8]) {
    let sign = _mm256_set1_ps(-0.0);
    // SAFETY: every load reads 8 of the 32 values of x.
    let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) });
    // max_ps returns its second operand when either is NaN: NaNs are skipped, as f32::max does.
    let mut m = _mm256_setzero_ps();
    for vi in v {
        m = _mm256_max_ps(_mm256_andnot_ps(sign, vi), m);
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    super::put_f16(b, 0, d);
    let q = v.map(|vi| {
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(vi, _mm256_set1_ps(id)),
        );
        _mm256_cvtps_epi32(r)
    });
    // Packing works per 128-bit half: restore element order with one cross-lane permute.
    let p = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: bytes 2..34 of b.
    unsafe { _mm256_storeu_si256(b.as_mut_ptr().add(2) as *mut __m256i, p) };
}

/// ggml's Q8_K activation quantizer for one 256-value block (the scalar `q8_k`, bit for bit):
/// the value of largest magnitude (first on ties) sets `iscale = −127/max`, values round half to
/// even, and each 16 values' sum is stored as i16. Inputs are finite (NaN rounds differently).
pub(crate) fn quantize_q8_k(x: &[f32], b: &mut [u8]) {
    assert!(x.len() == 256 && b.len() == 292);
    // SAFETY: callers check has_avx2(); x holds 256 values and b 292 bytes (asserted above).
    unsafe { quantize_q8_k_avx2(x, b) }
}

#[target_feature(enable = "avx2")]
unsafe fn quantize_q8_k_avx2(x: &[f32], b: &mut [u8]) {
    let sign = _mm256_set1_ps(-0.0);
    let xp = x.as_ptr();
    // SAFETY: every load reads 8 of the 256 values of x.
    let ld = |i: usize| unsafe { _mm256_loadu_ps(xp.add(8 * i)) };
    // max_ps returns its second operand when either is NaN: NaNs are skipped, as in the scalar
    // scan (whose `amax < |v|` is false for NaN).
    let mut m = _mm256_setzero_ps();
    for i in 0..32 {
        m = _mm256_max_ps(_mm256_andnot_ps(sign, ld(i)), m);
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
    if amax == 0.0 {
        b.fill(0);
        return;
    }
    let max = x
        .iter()
        .copied()
        .find(|v| v.abs() == amax)
        .expect("the maximum magnitude is one of the values");
    let iscale = -127.0 / max;
    let vs = _mm256_set1_ps(iscale);
    let hi = _mm256_set1_epi32(127);
    let ones = _mm256_set1_epi16(1);
    let bp = b.as_mut_ptr();
    for g in 0..8 {
        // 32 values: four vectors of eight, rounded half to even, capped at 127.
        let q = [0, 1, 2, 3].map(|j| {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(vs, ld(4 * g + j)),
            );
            _mm256_min_epi32(_mm256_cvtps_epi32(r), hi)
        });
        // packs interleaves 128-bit lanes; the permute restores element order.
        let w01 = _mm256_packs_epi32(q[0], q[1]);
        let w23 = _mm256_packs_epi32(q[2], q[3]);
        let w01 = _mm256_permute4x64_epi64::<0b11_01_10_00>(w01);
        let w23 = _mm256_permute4x64_epi64::<0b11_01_10_00>(w23);
        let bytes = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(w01, w23));
        // w01 holds values 0..16 of the 32 and w23 values 16..32: each group's sum is the
        // horizontal sum of its pair sums.
        let zero = _mm256_setzero_si256();
        let sums = hsum4_i32([
            _mm256_madd_epi16(w01, ones),
            _mm256_madd_epi16(w23, ones),
            zero,
            zero,
        ]);
        let sums16 = _mm_packs_epi32(sums, sums);
        // SAFETY: values 32g..32g+32 at bytes 4..260, sums 2g..2g+2 at bytes 260..292.
        unsafe {
            _mm256_storeu_si256(bp.add(4 + 32 * g) as *mut __m256i, bytes);
            std::ptr::copy_nonoverlapping(
                &sums16 as *const __m128i as *const u8,
                bp.add(260 + 4 * g),
                4,
            );
        }
    }
    b[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize, vec_dot_scalar};
    use crate::testing::rand_vec;

    /// The AVX2 Q8_K activation quantizer writes the scalar quantizer's bytes: random blocks of
    /// several scales, an all-zero block, ties for the largest magnitude (first one wins, either
    /// sign) and values that round exactly half-way.
    #[test]
    fn q8_k_activation_quantizer_equals_scalar() {
        if !super::super::has_avx2() {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let mut blocks: Vec<Vec<f32>> = [1.0, 1e-3, 40.0, 3e5]
            .iter()
            .enumerate()
            .map(|(i, &s)| rand_vec(256, 7 + i as u64, s))
            .collect();
        blocks.push(vec![0.0; 256]);
        let mut tie = rand_vec(256, 11, 1.0);
        (tie[3], tie[200]) = (-2.0, 2.0);
        blocks.push(tie.clone());
        (tie[3], tie[200]) = (2.0, -2.0);
        blocks.push(tie);
        // max 127 → iscale −1: every k + 0.5 is a tie between two integers.
        blocks.push((0..256).map(|i| (i as f32 - 128.0) * 0.5).collect());
        blocks.last_mut().unwrap()[0] = 127.0;
        for (i, x) in blocks.iter().enumerate() {
            let (mut want, mut got) = (vec![0u8; 292], vec![0u8; 292]);
            quantize(DType::Q8K, x, &mut want);
            quantize_q8_k(x, &mut got);
            assert_eq!(want, got, "block {i}");
        }
    }

    #[test]
    fn q8_0_activation_quantizer_equals_scalar() {
        if !super::super::has_avx2() {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let mut blocks: Vec<Vec<f32>> = [1.0, 1e-3, 40.0, 3e5, 1e-30]
            .iter()
            .enumerate()
            .map(|(i, &s)| rand_vec(32, 17 + i as u64, s))
            .collect();
        blocks.push(vec![0.0; 32]);
        // amax 127 → scale 1: every k + 0.5 is a tie between two integers.
        blocks.push((0..32).map(|i| (i as f32 - 16.0) * 2.5).collect());
        blocks.last_mut().unwrap()[0] = 127.0;
        blocks.push(
            (0..32)
                .map(|i| if i % 2 == 0 { -0.0 } else { 0.0 })
                .collect(),
        );
        for (i, x) in blocks.iter().enumerate() {
            let (mut want, mut got) = (vec![0u8; 34], vec![0u8; 34]);
            crate::quant::quantize::q8_activation_block(DType::Q8_0, x, &mut want);
            quantize_q8_0(x, &mut got);
            assert_eq!(want, got, "block {i}");
        }
    }

    /// The four-row kernels return exactly the scalar reference's bits for each pair, on random
    /// data of several scales and ragged block counts.
    #[test]
    fn four_row_kernels_equal_scalar() {
        if !super::super::has_avx2() {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        for wt in [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q5_0,
            DType::Q4K,
            DType::Q6K,
        ] {
            let at = wt.vec_dot_type();
            for blocks in [1, 2, 5, 9, 20] {
                let n = blocks * wt.block_size();
                let quantized = |seed: u64, t: DType, r: usize| -> Vec<u8> {
                    let scale = [1.0, 1e-3, 40.0, 3.0][r % 4];
                    let x = rand_vec(n, seed + r as u64, scale);
                    let mut q = vec![0u8; t.bytes_for(n)];
                    quantize(t, &x, &mut q);
                    q
                };
                // Three weight rows stored one after another (a tile), four activation rows.
                let w: Vec<u8> = (0..3)
                    .flat_map(|r| quantized(blocks as u64, wt, r))
                    .collect();
                let acts: Vec<Vec<u8>> = (0..4)
                    .map(|r| quantized(100 + blocks as u64, at, r))
                    .collect();
                let a = [0, 1, 2, 3].map(|r| acts[r].as_slice());
                let mut out = [[0.0f32; 4]; 3];
                assert!(rows_x4(wt, &w, a, n, &mut out).is_some(), "{wt}");
                let row = wt.bytes_for(n);
                if wt == DType::Q6K {
                    // The AVX2 form directly, as the dispatch may take another one.
                    for (j, o) in out.iter().enumerate() {
                        // SAFETY: AVX2/FMA/F16C checked above; the row holds `blocks` blocks.
                        let got = unsafe { q6_k_rows_x4(&w[j * row..(j + 1) * row], a, blocks) };
                        assert_eq!(got.map(f32::to_bits), o.map(f32::to_bits), "Q6_K AVX2");
                    }
                }
                for (j, o) in out.iter().enumerate() {
                    for r in 0..4 {
                        let wr = &w[j * row..(j + 1) * row];
                        let slow = vec_dot_scalar(wt, wr, a[r], n);
                        assert_eq!(o[r].to_bits(), slow.to_bits(), "{wt} n={n} ({j}, {r})");
                    }
                }
            }
        }
    }

    /// The AVX2 and the AVX-512 VNNI group kernels both equal the scalar reference (the
    /// dispatch picks one; this runs each that the CPU supports), for one, two and four
    /// activation rows.
    #[test]
    fn every_group_kernel_variant_equals_scalar() {
        use crate::quant::{repack::repack, vec_dot_x8_scalar};
        if !super::super::has_avx2() {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let vnni = is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
        if !vnni {
            eprintln!("no AVX-512 VNNI on this CPU: the AVX2 kernels only");
        }
        // Q6_K's group kernel is 512-bit only (avx512.rs).
        for t in crate::quant::repack::GROUP_TYPES
            .into_iter()
            .filter(|&t| t != DType::Q6K)
        {
            // Random blocks, and extreme ones: weights all −1 (the largest magnitudes of the
            // signed types), activations ±127 (the i16 sums of the AVX2 forms at their limit).
            for (nb, extreme) in [(1, false), (3, false), (2, true)] {
                let k = t.block_size() * nb;
                let mut wq = vec![0u8; t.bytes_for(8 * k)];
                let wf = if extreme {
                    vec![-1.0; 8 * k]
                } else {
                    rand_vec(8 * k, 60 + nb as u64, 3.0)
                };
                quantize(t, &wf, &mut wq);
                let g = repack(t, &wq, 8, k);
                let at = t.vec_dot_type();
                let acts: Vec<Vec<u8>> = (0..4)
                    .map(|r| {
                        let mut a = vec![0u8; at.bytes_for(k)];
                        let x = if extreme {
                            (0..k)
                                .map(|i| {
                                    if (i + r as usize).is_multiple_of(3) {
                                        -1.0
                                    } else {
                                        1.0
                                    }
                                })
                                .collect()
                        } else {
                            rand_vec(k, 70 + r, 1.0 + r as f32)
                        };
                        quantize(at, &x, &mut a);
                        a
                    })
                    .collect();
                // Block sums of the Q8_0 activations (the kernels of Q8_K types take none).
                let sums: Vec<Vec<i32>> = acts
                    .iter()
                    .map(|a| {
                        let mut s = Vec::new();
                        if at == DType::Q8_0 {
                            crate::quant::q8_0_block_sums(a, k, &mut s);
                        }
                        s
                    })
                    .collect();
                let a: [&[u8]; 4] = std::array::from_fn(|r| &acts[r][..]);
                let sm: [&[i32]; 4] = std::array::from_fn(|r| &sums[r][..]);
                let want = vec_dot_x8_scalar(t, &g, a, k);
                // Four rows, and one and two (their own accumulator chains).
                let mut got: Vec<(usize, Vec<[f32; 8]>)> = Vec::new();
                got.extend(variants::<4>(t, &g, a, sm, nb, vnni).map(|(i, v)| (i, v.to_vec())));
                got.extend(
                    variants::<1>(t, &g, [a[0]], [sm[0]], nb, vnni).map(|(i, v)| (i, v.to_vec())),
                );
                let (a2, s2) = ([a[0], a[1]], [sm[0], sm[1]]);
                got.extend(variants::<2>(t, &g, a2, s2, nb, vnni).map(|(i, v)| (i, v.to_vec())));
                for (i, rows) in &got {
                    let n = rows.len();
                    for (gr, wr) in rows.iter().zip(&want) {
                        for (x, y) in gr.iter().zip(wr) {
                            assert_eq!(
                                x.to_bits(),
                                y.to_bits(),
                                "{t} variant {i}, {n} rows, nb {nb}"
                            );
                        }
                    }
                }
            }
        }

        /// Each group kernel the CPU supports (variant 0 the AVX2 one, 1 the VNNI one where
        /// `vnni`) for `N` activation rows.
        fn variants<const N: usize>(
            t: DType,
            g: &[u8],
            a: [&[u8]; N],
            sm: [&[i32]; N],
            nb: usize,
            vnni: bool,
        ) -> impl Iterator<Item = (usize, [[f32; 8]; N])> {
            // SAFETY: the caller checked AVX2/FMA/F16C, and VNNI + VL where `vnni`; the group
            // and activation rows hold nb whole blocks.
            unsafe {
                let mut v = vec![match t {
                    DType::Q4K => q4_k_x8(g, a, nb),
                    DType::Q8_0 => q0_x8::<Q8_0, N>(g, a, sm, nb),
                    DType::Q4_0 => q0_x8::<Q4_0, N>(g, a, sm, nb),
                    DType::IQ4NL => q0_x8::<IQ4_NL, N>(g, a, sm, nb),
                    DType::IQ4XS => iq4_xs_x8(g, a, nb),
                    _ => q0_x8::<Q5_0, N>(g, a, sm, nb),
                }];
                if vnni {
                    v.push(match t {
                        DType::Q4K => q4_k_x8_vnni(g, a, nb),
                        DType::Q8_0 => q0_x8_vnni::<Q8_0, N>(g, a, sm, nb),
                        DType::Q4_0 => q0_x8_vnni::<Q4_0, N>(g, a, sm, nb),
                        DType::IQ4NL => q0_x8_vnni::<IQ4_NL, N>(g, a, sm, nb),
                        DType::IQ4XS => iq4_xs_x8_vnni(g, a, nb),
                        _ => q0_x8_vnni::<Q5_0, N>(g, a, sm, nb),
                    });
                }
                v.into_iter().enumerate()
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
            DType::Q2K,
            DType::Q3K,
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

    /// Q2_K, Q3_K and Q5_K on random blocks (every bit pattern of quants, masks and scales is a valid
    /// block; the f16 scales set finite), one and four activation rows, and activations at
    /// ±127 (the largest pair sums).
    #[test]
    fn k_quants_without_group_kernels_equal_scalar_on_random_blocks() {
        use crate::quant::{quantize_activation, vec_dot_x4_rows};
        use crate::rng::SplitMix64;
        if !super::super::has_avx2() {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let mut rng = SplitMix64::new(11);
        for (wt, scales_at) in [
            (DType::Q2K, [80, 82]),
            (DType::Q3K, [108, 108]),
            (DType::Q5K, [0, 2]),
        ] {
            for blocks in [1, 2, 5] {
                let n = blocks * 256;
                let mut w: Vec<u8> = (0..wt.bytes_for(n)).map(|_| rng.next_u64() as u8).collect();
                for b in w.chunks_exact_mut(wt.type_size()) {
                    for (k, at) in scales_at.into_iter().enumerate() {
                        let d = half::f16::from_f32(0.01 + (b[k] as f32) / 1000.0);
                        b[at..at + 2].copy_from_slice(&d.to_le_bytes());
                    }
                }
                let at = wt.vec_dot_type();
                let quantized = |y: &[f32]| {
                    let mut aq = vec![0u8; at.bytes_for(n)];
                    quantize_activation(at, y, &mut aq);
                    aq
                };
                let mut acts: Vec<Vec<u8>> = (0..4)
                    .map(|r| quantized(&rand_vec(n, 30 + r, 1.0)))
                    .collect();
                let extreme: Vec<f32> = (0..n)
                    .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
                    .collect();
                acts.push(quantized(&extreme));
                for aq in &acts {
                    let fast = vec_dot(wt, &w, aq, n).unwrap();
                    let slow = vec_dot_scalar(wt, &w, aq, n);
                    assert_eq!(
                        fast.to_bits(),
                        slow.to_bits(),
                        "{wt} n={n}: {fast} vs {slow}"
                    );
                }
                let row = wt.bytes_for(n);
                // A second, different weight row after the first (catches a wrong row stride).
                let mut second = w.clone();
                second.reverse();
                for b in second.chunks_exact_mut(wt.type_size()) {
                    for at in scales_at {
                        let d = half::f16::from_f32(0.02);
                        b[at..at + 2].copy_from_slice(&d.to_le_bytes());
                    }
                }
                let two_rows = [&w[..], &second[..]].concat();
                let mut out = [[0.0f32; 4]; 2];
                let four = std::array::from_fn(|r| &acts[r + 1][..]);
                vec_dot_x4_rows(wt, &two_rows, four, n, &mut out);
                for (o, got) in out.iter().enumerate() {
                    for (r, v) in got.iter().enumerate() {
                        let want =
                            vec_dot_scalar(wt, &two_rows[o * row..(o + 1) * row], four[r], n);
                        assert_eq!(v.to_bits(), want.to_bits(), "{wt} n={n} four rows, {o}/{r}");
                    }
                }
            }
        }
    }
}
