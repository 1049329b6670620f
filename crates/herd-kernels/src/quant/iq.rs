//! ggml's importance-matrix ("IQ") block formats and MXFP4: byte layouts, dequantization (in
//! ggml's element and arithmetic order, so the values equal gguf-py's bit for bit) and the
//! integer dot products against 8-bit activations (`shared/reference/gguf.md`; ggml's
//! `dequantize_row_*` in ggml-quants.c and `ggml_vec_dot_*_generic` in ggml-cpu/quants.c).
//!
//! Layouts (offsets in bytes; `d` an f16 scale; integers little-endian):
//! - IQ2_XXS (66 B / 256): `d`@0, 32 × u16 @2. Each 32 values are two u32: four bytes that
//!   index `IQ2XXS_GRID` (8 magnitudes each), then four 7-bit sign indexes and a 4-bit scale.
//! - IQ2_XS (74 B): `d`@0, 32 × u16 @2 (9-bit `IQ2XS_GRID` index, 7-bit sign index), 8 × u8
//!   scales @66 (two 4-bit scales per 32 values).
//! - IQ2_S (82 B): `d`@0, 32 grid-index low bytes @2, 32 sign bytes @34, 8 × u8 high index bits
//!   @66, 8 × u8 scales @74; `IQ2S_GRID` (1024 entries).
//! - IQ3_XXS (98 B): `d`@0, 64 `IQ3XXS_GRID` indexes @2 (4 magnitudes each), 8 × u32 of sign
//!   indexes and a 4-bit scale @66.
//! - IQ3_S (110 B): `d`@0, 64 grid-index low bytes @2, 8 high-bit bytes @66, 32 sign bytes @74,
//!   4 × u8 scales @106; `IQ3S_GRID` (512 entries).
//! - IQ1_S (50 B): `d`@0, 32 grid-index low bytes @2, 8 × u16 @34 (four 3-bit high index parts,
//!   a 3-bit scale, the sign of the ±1/8 shift); `IQ1S_GRID` (2048 entries of −1, 0, 1).
//! - IQ1_M (56 B): 32 grid-index low bytes @0, 16 bytes @32 (3 high index bits and the shift
//!   sign per 8 values), 8 bytes @48 of 3-bit scales whose top nibbles hold the f16 `d`.
//! - IQ4_NL (18 B / 32): `d`@0, 16 bytes of 4-bit `KVALUES_IQ4NL` indexes @2 (Q4_0's order).
//! - IQ4_XS (136 B / 256): `d`@0, u16 high scale bits @2, 4 bytes of low scale nibbles @4,
//!   128 bytes of 4-bit indexes @8; 6-bit scales offset by −32.
//! - MXFP4 (17 B / 32): an E8M0 exponent byte, 16 bytes of 4-bit E2M1 codes (`KVALUES_MXFP4`,
//!   doubled, so the scale is halved).
//!
//! Dot products. Each block's integer sum is exact; the f32 part has one order per type:
//! - IQ4_NL and MXFP4 (against Q8_0): `acc = isum·(d_w·d_a) + acc` per 32-value block by fused
//!   multiply-add, as Q4_0.
//! - The 256-value types (against Q8_K): one exact integer `isum` per super-block (block scales
//!   applied in integers), `acc = isum·(d_w·d_a) + acc` by fused multiply-add, and the row's
//!   result `acc·c` with the type's constant `c` (1/8 for IQ2_*, 1/4 for IQ3_XXS, 1 for IQ3_S
//!   and IQ4_XS; IQ1_* sum `8·Σ ls·q·a + Σ ls·shift·bsum` so their ±1/8 shift stays an integer,
//!   and take 1/8). ggml sums the IQ1/IQ2/IQ3 super-blocks in the same integers and differs
//!   only in where it applies `c`; for IQ4_XS it adds an f32 per 32 values, where herd's one
//!   exact integer per super-block rounds less.

use super::iq_tables::*;
use super::{QK_K, f16_at};
use crate::DType;

/// ggml's `IQ1S_DELTA` (= `IQ1M_DELTA`): the shift of IQ1 grid values.
const IQ1_DELTA: f32 = 0.125;

/// The dequantizer of one block of an IQ type or MXFP4.
///
/// Panics for other types.
pub(crate) fn block_dequantizer(dtype: DType) -> fn(&[u8], &mut [f32]) {
    match dtype {
        DType::IQ2XXS => |b, y| signed_grid_block(DType::IQ2XXS, b, y),
        DType::IQ2XS => |b, y| signed_grid_block(DType::IQ2XS, b, y),
        DType::IQ2S => |b, y| signed_grid_block(DType::IQ2S, b, y),
        DType::IQ3XXS => |b, y| signed_grid_block(DType::IQ3XXS, b, y),
        DType::IQ3S => |b, y| signed_grid_block(DType::IQ3S, b, y),
        DType::IQ1S => iq1_s,
        DType::IQ1M => iq1_m,
        DType::IQ4NL => iq4_nl,
        DType::IQ4XS => iq4_xs,
        DType::MXFP4 => mxfp4,
        other => unreachable!("{other} is not an IQ type"),
    }
}

#[inline]
fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

#[inline]
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The `j`th byte of a grid entry (bytes in little-endian order).
#[inline]
fn grid_byte(entry: u64, j: usize) -> u8 {
    (entry >> (8 * j)) as u8
}

/// Whether sign byte `signs` makes value `j` (0..8) of its group negative.
#[inline]
fn negative(signs: u8, j: usize) -> bool {
    signs & KMASK_IQ2XS[j] != 0
}

/// ggml's `ggml_e8m0_to_fp32_half`: 2^(e − 128) for an E8M0 exponent `e`, built from its bits
/// (subnormal for e < 2).
#[inline]
pub(crate) fn e8m0_to_f32_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        (e as u32 - 1) << 23
    };
    f32::from_bits(bits)
}

/// Eight values `db · grid[j] · ±1` of one grid entry and sign byte.
#[inline]
fn signed_grid8(y: &mut [f32], db: f32, entry: u64, signs: u8) {
    for (j, v) in y[..8].iter_mut().enumerate() {
        let s = if negative(signs, j) { -1.0 } else { 1.0 };
        *v = db * grid_byte(entry, j) as f32 * s;
    }
}

/// Value group `l` (values `8l..8l+8`) of 32-value sub-block `ib` of a signed-grid block
/// (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S): its eight grid magnitudes (the bytes of the
/// entry, or of two four-value entries) and its sign byte.
#[inline]
fn signed_group(wtype: DType, b: &[u8], ib: usize, l: usize) -> (u64, u8) {
    match wtype {
        DType::IQ2XXS => {
            let aux = u32_at(b, 6 + 8 * ib);
            let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
            (IQ2XXS_GRID[b[2 + 8 * ib + l] as usize], signs)
        }
        DType::IQ2XS => {
            let q = u16_at(b, 2 + 2 * (4 * ib + l));
            (
                IQ2XS_GRID[(q & 511) as usize],
                KSIGNS_IQ2XS[(q >> 9) as usize],
            )
        }
        DType::IQ2S => {
            let index = b[2 + 4 * ib + l] as usize | ((b[66 + ib] as usize) << (8 - 2 * l) & 0x300);
            (IQ2S_GRID[index], b[34 + 4 * ib + l])
        }
        DType::IQ3XXS => {
            let aux = u32_at(b, 66 + 4 * ib);
            let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
            let g1 = IQ3XXS_GRID[b[2 + 8 * ib + 2 * l] as usize] as u64;
            let g2 = IQ3XXS_GRID[b[3 + 8 * ib + 2 * l] as usize] as u64;
            (g1 | g2 << 32, signs)
        }
        DType::IQ3S => {
            let qs = &b[2 + 8 * ib..10 + 8 * ib];
            let qh = b[66 + ib] as usize;
            let i1 = qs[2 * l] as usize | ((qh << (8 - 2 * l)) & 256);
            let i2 = qs[2 * l + 1] as usize | ((qh << (7 - 2 * l)) & 256);
            let entry = IQ3S_GRID[i1] as u64 | (IQ3S_GRID[i2] as u64) << 32;
            (entry, b[74 + 4 * ib + l])
        }
        other => unreachable!("{other} is not a signed-grid type"),
    }
}

/// The block scale of value group `l` of sub-block `ib` of a signed-grid block, as the odd
/// integer `2s + 1` of its stored scale `s` (IQ2_XS and IQ2_S keep one per 16 values).
#[inline]
fn group_scale(wtype: DType, b: &[u8], ib: usize, l: usize) -> i32 {
    let s = match wtype {
        DType::IQ2XXS => u32_at(b, 6 + 8 * ib) >> 28,
        DType::IQ3XXS => u32_at(b, 66 + 4 * ib) >> 28,
        DType::IQ2XS | DType::IQ2S => {
            let sc = b[if wtype == DType::IQ2XS { 66 } else { 74 } + ib];
            (if l < 2 { sc & 0xF } else { sc >> 4 }) as u32
        }
        DType::IQ3S => {
            let sc = b[106 + ib / 2];
            ((sc >> (4 * (ib % 2))) & 0xF) as u32
        }
        other => unreachable!("{other} is not a signed-grid type"),
    };
    2 * s as i32 + 1
}

/// One signed-grid block dequantized in ggml's arithmetic: each value `db · grid · ±1`, where
/// `db` is `d·(0.5 + s)·0.25` for IQ2 (`0.5 + s` is exactly `(2s + 1)·0.5`), `d·(0.5 + s)·0.5`
/// for IQ3_XXS and `d·(2s + 1)` for IQ3_S.
fn signed_grid_block(wtype: DType, b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for ib in 0..QK_K / 32 {
        for l in 0..4 {
            let ls = group_scale(wtype, b, ib, l) as f32;
            let db = match wtype {
                DType::IQ3S => d * ls,
                DType::IQ3XXS => d * (ls * 0.5) * 0.5,
                _ => d * (ls * 0.5) * 0.25,
            };
            let (entry, signs) = signed_group(wtype, b, ib, l);
            signed_grid8(&mut y[32 * ib + 8 * l..], db, entry, signs);
        }
    }
}

/// Eight values `dl · (grid[j] + delta)` of one signed IQ1 grid entry.
#[inline]
fn iq1_grid8(y: &mut [f32], dl: f32, delta: f32, entry: u64) {
    for (j, v) in y[..8].iter_mut().enumerate() {
        *v = dl * (grid_byte(entry, j) as i8 as f32 + delta);
    }
}

fn iq1_s(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for ib in 0..QK_K / 32 {
        let qh = u16_at(b, 34 + 2 * ib) as usize;
        let dl = d * (2 * ((qh >> 12) & 7) + 1) as f32;
        let delta = if qh & 0x8000 != 0 {
            -IQ1_DELTA
        } else {
            IQ1_DELTA
        };
        for l in 0..4 {
            let idx = b[2 + 4 * ib + l] as usize | (((qh >> (3 * l)) & 7) << 8);
            iq1_grid8(&mut y[32 * ib + 8 * l..], dl, delta, IQ1S_GRID[idx]);
        }
    }
}

/// IQ1_M's f16 super-block scale, held in the top nibbles of its four u16 scale words.
#[inline]
pub(crate) fn iq1_m_d(b: &[u8]) -> f32 {
    let sc = |i: usize| u16_at(b, 48 + 2 * i);
    let bits = (sc(0) >> 12) | ((sc(1) >> 8) & 0x00F0) | ((sc(2) >> 4) & 0x0F00) | (sc(3) & 0xF000);
    half::f16::from_bits(bits).to_f32()
}

/// IQ1_M's two 3-bit scales (as `2s + 1`) of 32-value block `ib`.
#[inline]
fn iq1_m_scales(b: &[u8], ib: usize) -> [i32; 2] {
    let sc = u16_at(b, 48 + 2 * (ib / 2)) as i32;
    let shift = 6 * (ib % 2);
    [
        2 * ((sc >> shift) & 7) + 1,
        2 * ((sc >> (shift + 3)) & 7) + 1,
    ]
}

/// IQ1_M's grid index and shift sign (true: −1/8) for values `8l..8l+8` of block `ib`.
#[inline]
fn iq1_m_group(b: &[u8], ib: usize, l: usize) -> (usize, bool) {
    let qh = b[32 + 2 * ib + l / 2] as usize;
    let qh = qh >> (4 * (l % 2));
    (b[4 * ib + l] as usize | ((qh & 7) << 8), qh & 8 != 0)
}

fn iq1_m(b: &[u8], y: &mut [f32]) {
    let d = iq1_m_d(b);
    for ib in 0..QK_K / 32 {
        let ls = iq1_m_scales(b, ib);
        for l in 0..4 {
            let dl = d * ls[l / 2] as f32;
            let (idx, neg) = iq1_m_group(b, ib, l);
            let delta = if neg { -IQ1_DELTA } else { IQ1_DELTA };
            iq1_grid8(&mut y[32 * ib + 8 * l..], dl, delta, IQ1S_GRID[idx]);
        }
    }
}

/// 32 values `d · table[q]` of 16 bytes of 4-bit indexes (low nibbles first, as Q4_0).
#[inline]
fn table16(y: &mut [f32], d: f32, qs: &[u8], table: &[i8; 16]) {
    for j in 0..16 {
        y[j] = d * table[(qs[j] & 0xF) as usize] as f32;
        y[j + 16] = d * table[(qs[j] >> 4) as usize] as f32;
    }
}

fn iq4_nl(b: &[u8], y: &mut [f32]) {
    table16(y, f16_at(b, 0), &b[2..18], &KVALUES_IQ4NL);
}

/// IQ4_XS's 6-bit scale of 32-value block `ib`, offset by −32.
#[inline]
pub(crate) fn iq4_xs_scale(b: &[u8], ib: usize) -> i32 {
    let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF;
    let high = (u16_at(b, 2) >> (2 * ib)) & 3;
    (low as i32 | (high as i32) << 4) - 32
}

fn iq4_xs(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for ib in 0..QK_K / 32 {
        let dl = d * iq4_xs_scale(b, ib) as f32;
        table16(
            &mut y[32 * ib..],
            dl,
            &b[8 + 16 * ib..24 + 16 * ib],
            &KVALUES_IQ4NL,
        );
    }
}

fn mxfp4(b: &[u8], y: &mut [f32]) {
    let d = e8m0_to_f32_half(b[0]);
    for j in 0..16 {
        y[j] = KVALUES_MXFP4[(b[1 + j] & 0xF) as usize] as f32 * d;
        y[j + 16] = KVALUES_MXFP4[(b[1 + j] >> 4) as usize] as f32 * d;
    }
}

// ---- dot products ----

/// Signed 8-bit activations.
#[inline]
fn i8_at(a: &[u8], i: usize) -> i32 {
    a[i] as i8 as i32
}

/// Q8_K activation block: f32 scale at 0, values at 4, i16 sums of each 16 at 260.
#[inline]
fn q8k_value(a: &[u8], e: usize) -> i32 {
    i8_at(a, 4 + e)
}

/// `Σ grid[j]·±1·a[e0 + j]` over eight values of one grid entry and sign byte.
#[inline]
fn signed_dot8(entry: u64, signs: u8, a: &[u8], e0: usize) -> i32 {
    (0..8)
        .map(|j| {
            let v = grid_byte(entry, j) as i32 * q8k_value(a, e0 + j);
            if negative(signs, j) { -v } else { v }
        })
        .sum()
}

/// The constant a 256-value IQ type's accumulated sum is multiplied by at the end.
pub(crate) fn row_constant(wtype: DType) -> f32 {
    match wtype {
        DType::IQ2XXS | DType::IQ2XS | DType::IQ2S | DType::IQ1S | DType::IQ1M => 0.125,
        DType::IQ3XXS => 0.25,
        _ => 1.0,
    }
}

/// The f16 super-block scale of a 256-value IQ block.
#[inline]
pub(crate) fn super_scale(wtype: DType, w: &[u8]) -> f32 {
    if wtype == DType::IQ1M {
        iq1_m_d(w)
    } else {
        f16_at(w, 0)
    }
}

/// One 256-value IQ block against one Q8_K block: the exact integer sum described in the
/// module notes.
pub(crate) fn super_block_isum(wtype: DType, w: &[u8], a: &[u8]) -> i32 {
    let mut isum = 0i32;
    for ib in 0..QK_K / 32 {
        let e = 32 * ib;
        isum += match wtype {
            DType::IQ2XXS | DType::IQ2XS | DType::IQ2S | DType::IQ3XXS | DType::IQ3S => (0..4)
                .map(|l| {
                    let (entry, signs) = signed_group(wtype, w, ib, l);
                    group_scale(wtype, w, ib, l) * signed_dot8(entry, signs, a, e + 8 * l)
                })
                .sum::<i32>(),
            DType::IQ1S => {
                let qh = u16_at(w, 34 + 2 * ib) as usize;
                let ls = 2 * ((qh >> 12) & 7) as i32 + 1;
                let s: i32 = (0..4)
                    .map(|l| {
                        let idx = w[2 + 4 * ib + l] as usize | (((qh >> (3 * l)) & 7) << 8);
                        grid_dot8(IQ1S_GRID[idx], a, e + 8 * l)
                    })
                    .sum();
                let shift = if qh & 0x8000 != 0 { -1 } else { 1 };
                let bsum = super::dot::q8k_bsum(a, 2 * ib) + super::dot::q8k_bsum(a, 2 * ib + 1);
                ls * (8 * s + shift * bsum)
            }
            DType::IQ1M => {
                let ls = iq1_m_scales(w, ib);
                (0..4)
                    .map(|l| {
                        let (idx, neg) = iq1_m_group(w, ib, l);
                        let s = grid_dot8(IQ1S_GRID[idx], a, e + 8 * l);
                        let sum: i32 = (0..8).map(|j| q8k_value(a, e + 8 * l + j)).sum();
                        ls[l / 2] * (8 * s + if neg { -sum } else { sum })
                    })
                    .sum()
            }
            DType::IQ4XS => {
                let qs = &w[8 + 16 * ib..24 + 16 * ib];
                let s: i32 = (0..16)
                    .map(|j| {
                        KVALUES_IQ4NL[(qs[j] & 0xF) as usize] as i32 * q8k_value(a, e + j)
                            + KVALUES_IQ4NL[(qs[j] >> 4) as usize] as i32 * q8k_value(a, e + 16 + j)
                    })
                    .sum();
                iq4_xs_scale(w, ib) * s
            }
            other => unreachable!("{other} is not a 256-value IQ type"),
        };
    }
    isum
}

/// `Σ grid[j]·a[e0 + j]` over the eight signed values of an IQ1 grid entry.
#[inline]
fn grid_dot8(entry: u64, a: &[u8], e0: usize) -> i32 {
    (0..8)
        .map(|j| grid_byte(entry, j) as i8 as i32 * q8k_value(a, e0 + j))
        .sum()
}

/// An IQ4_NL or MXFP4 block against a Q8_0 activation block: `(d_w·d_a, exact integer sum)`.
pub(crate) fn q8_0_pair(wtype: DType, w: &[u8], a: &[u8]) -> (f32, i32) {
    let (dw, qs, table) = match wtype {
        DType::IQ4NL => (f16_at(w, 0), &w[2..18], &KVALUES_IQ4NL),
        DType::MXFP4 => (e8m0_to_f32_half(w[0]), &w[1..17], &KVALUES_MXFP4),
        other => unreachable!("{other} does not pair with Q8_0"),
    };
    let isum = (0..16)
        .map(|j| {
            table[(qs[j] & 0xF) as usize] as i32 * i8_at(a, 2 + j)
                + table[(qs[j] >> 4) as usize] as i32 * i8_at(a, 18 + j)
        })
        .sum();
    (dw * f16_at(a, 0), isum)
}

/// Whether `wtype` is one of this module's 256-value types (dot against Q8_K).
pub(crate) fn is_super_block_type(wtype: DType) -> bool {
    matches!(
        wtype,
        DType::IQ2XXS
            | DType::IQ2XS
            | DType::IQ2S
            | DType::IQ3XXS
            | DType::IQ3S
            | DType::IQ1S
            | DType::IQ1M
            | DType::IQ4XS
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_halves_are_powers_of_two() {
        assert_eq!(e8m0_to_f32_half(128), 1.0);
        assert_eq!(e8m0_to_f32_half(127), 0.5);
        assert_eq!(e8m0_to_f32_half(130), 4.0);
        // Subnormal: 2^-127 and 2^-128.
        assert_eq!(e8m0_to_f32_half(1), 2f32.powi(-127));
        assert_eq!(e8m0_to_f32_half(0), 2f32.powi(-128));
    }

    #[test]
    fn sign_table_keeps_an_even_number_of_negatives() {
        for (i, &s) in KSIGNS_IQ2XS.iter().enumerate() {
            assert_eq!(s & 127, i as u8);
            assert_eq!(s.count_ones() % 2, 0);
        }
    }
}
