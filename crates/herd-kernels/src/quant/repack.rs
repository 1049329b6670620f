//! Weights repacked at load for the CPU kernels: rows interleaved in groups of eight, so that
//! one 32-byte load holds four quants of each of eight rows and one integer multiply-add fills
//! eight lanes, one per weight row (llama.cpp's `block_q4_Kx8` and ik_llama.cpp's run-time
//! repacking do the same). The products keep [`vec_dot`](super::vec_dot)'s f32 order per
//! output, so a repacked matrix gives the file layout's bits.
//!
//! A repacked `[out, in]` matrix ([`Layout::OutMajorX8`](crate::Layout::OutMajorX8)) holds its
//! first `out / 8 * 8` rows in groups of eight, each group's blocks one after another, then its
//! last `out % 8` rows as in the file. A group's block is eight rows' blocks, the same bytes
//! rearranged ([`group_block_bytes`]). In every type, "step `s`" of a row is four consecutive
//! quants, and a group stores a step's four bytes of row 0, then of row 1, … row 7.
//!
//! Q4_K (1152 bytes: eight rows × 144):
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | `d` of rows 0..8 (f16) |
//! | 16..32 | `dmin` of rows 0..8 (f16) |
//! | 32..96 | byte `8j + m`: low four bits of row `m`'s sub-block `j` scale, and of its min `<< 4` |
//! | 96..128 | byte `i` (`i = 8j + m`, `j < 4`): the top two bits of scale `i`, scale `i + 32`, min `i`, min `i + 32` at bits 0, 2, 4, 6 |
//! | 128..1152 | for part `c` 0..4, step `k` 0..8, row `m` 0..8: row `m`'s quant bytes `32c + 4k .. 32c + 4k + 4` |
//!
//! A part's byte holds sub-block `2c`'s quant in its low nibble and sub-block `2c + 1`'s in its
//! high nibble (the file's order), so step `k` of part `c` pairs with activations
//! `64c + 4k..+4` (low nibbles) and `64c + 32 + 4k..+4` (high nibbles).
//!
//! The 32-value formats hold `d` of rows 0..8 (f16) at 0..16; step `s` pairs with activations
//! `4s..4s + 4`:
//! - Q8_0 (272 bytes): at 16.., for step `s` 0..8, row `m`: row `m`'s quants `4s..4s + 4`;
//! - Q4_0 and IQ4_NL (144 bytes): at 16.., for `k` 0..4, row `m`: row `m`'s quant bytes
//!   `4k..4k + 4` (low nibbles: step `k`, high nibbles: step `k + 4`);
//! - Q5_0 (176 bytes): at 16..48, byte `4m + i` whose bit `s` is the fifth bit of quant
//!   `4s + i` of row `m` (a step's fifth bits sit at one bit position of the 32 bytes, where
//!   its quants sit in the 32 bytes of nibbles); at 48.., the nibbles as Q4_0's.
//!
//! IQ4_XS (1088 bytes: eight rows × 136), scale entry `e = 8j + m` being row `m`'s 6-bit scale
//! of its 32-value block `j`:
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | `d` of rows 0..8 (f16) |
//! | 16..48 | byte `p`: the low four bits of entry `p`, and of entry `p + 32` `<< 4` |
//! | 48..64 | byte `i`: the top two bits of entries `i`, `i + 16`, `i + 32`, `i + 48` at bits 0, 2, 4, 6 |
//! | 64..1088 | for block `j` 0..8, `k` 0..4, row `m`: row `m`'s index bytes `16j + 4k..+4` (Q4_0's order per block) |
//!
//! Q6_K (1680 bytes: eight rows × 210). In the file, value `e = 128h + 32k + l` of a row (half
//! `h`, run `k` 0..4, `l` 0..32) is a nibble of `ql[64h + 32(k mod 2) + l]` (low for `k` < 2)
//! with two high bits from `qh[32h + l]` (bits `2k`, `2k + 1`), scaled by sub-block
//! `8h + 2k + l/16`. Step `(h, k, j)` is values `l = 4j..4j + 4`; ggml's eight lanes put it in
//! lane `j`, which the kernels keep.
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | `d` of rows 0..8 (f16) |
//! | 16..144 | byte `16 + 8i + m`: row `m`'s scale of sub-block `i` (i8) |
//! | 144..1680 | for `j` 0..8, `h` 0..2 (96 bytes each, in the order the kernels read them): for row `m`, its `qh` bytes `32h + 4j..+4`; then for `kk` 0..2, row `m`: its `ql` bytes `64h + 32kk + 4j..+4` (low nibbles: step `(h, kk, j)`, high: `(h, kk + 2, j)`) |

use super::scale_min_k4;
use crate::DType;

/// Rows per interleaved group.
pub const GROUP: usize = 8;

/// Bytes of one Q4_K group block (eight super-blocks).
pub const X8_BLOCK: usize = GROUP * 144;

/// Whether this CPU runs the group kernels natively (AVX2; Q6_K's need AVX-512 VNNI, which
/// [`repack_at_load`] checks); elsewhere the interleaved layout would only be read through the
/// scalar reference, slower than the file's layout.
pub fn group_kernels_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::has_avx2();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The types with an interleaved layout and group kernels. Q6_K's kernels are 512-bit only:
/// models repack it at load only where [`repack_at_load`] says so.
pub const GROUP_TYPES: [DType; 7] = [
    DType::Q4K,
    DType::Q6K,
    DType::Q8_0,
    DType::Q4_0,
    DType::Q5_0,
    DType::IQ4NL,
    DType::IQ4XS,
];

/// Whether `dtype` has an interleaved layout (one of [`GROUP_TYPES`]).
pub fn repack_supported(dtype: DType) -> bool {
    GROUP_TYPES.contains(&dtype)
}

/// Whether a model loaded on this CPU should hold `dtype` in the interleaved layout: it has
/// one and this CPU runs its group kernels natively (Q6_K's need AVX-512 VNNI; without it the
/// file's layout and its four-row kernel are faster than the scalar group reference).
pub fn repack_at_load(dtype: DType) -> bool {
    group_kernels_available()
        && repack_supported(dtype)
        && (dtype != DType::Q6K || super::has_x16_kernel(dtype))
}

/// Bytes of one group block of `dtype`: eight of its blocks.
pub fn group_block_bytes(dtype: DType) -> usize {
    GROUP * dtype.type_size()
}

/// The file's `[rows, k]` matrix `w` (`rows` × `k` elements of `dtype`) in the interleaved
/// layout described above, the same number of bytes.
///
/// Panics if `dtype` is not [`repack_supported`] or `w` is not `rows × k` elements.
pub fn repack(dtype: DType, w: &[u8], rows: usize, k: usize) -> Vec<u8> {
    assert!(repack_supported(dtype), "no interleaved layout for {dtype}");
    let row_bytes = dtype.bytes_for(k);
    assert_eq!(w.len(), rows * row_bytes, "repack: size");
    let groups = rows / GROUP;
    let mut out = vec![0u8; w.len()];
    let group_bytes = GROUP * row_bytes;
    let (tb, gbb) = (dtype.type_size(), group_block_bytes(dtype));
    let shared = crate::pool::SharedMut::new(&mut out);
    // Groups are independent: split them over the pool (loading a model repacks gigabytes).
    let per_task = groups.div_ceil(64).max(1);
    crate::pool::global().run(groups.div_ceil(per_task), |task| {
        for g in task * per_task..((task + 1) * per_task).min(groups) {
            // SAFETY: tasks write disjoint groups' bytes, inside `out`.
            let og = unsafe { shared.slice(g * group_bytes, group_bytes) };
            for (b, ob) in og.chunks_exact_mut(gbb).enumerate() {
                let blocks: [&[u8]; GROUP] = std::array::from_fn(|m| {
                    let at = (g * GROUP + m) * row_bytes + b * tb;
                    &w[at..at + tb]
                });
                match dtype {
                    DType::Q4K => pack_group_block(blocks, ob),
                    DType::IQ4XS => pack_iq4_xs_group_block(blocks, ob),
                    DType::Q6K => pack_q6_k_group_block(blocks, ob),
                    _ => pack_q0_group_block(dtype, blocks, ob),
                }
            }
        }
    });
    let tail = groups * group_bytes;
    out[tail..].copy_from_slice(&w[tail..]);
    out
}

/// Where a 32-value format's quant bytes start in its block and how many four-byte runs
/// they make, and where a group block's quants start.
fn q0_quants(dtype: DType) -> (usize, usize, usize) {
    match dtype {
        DType::Q8_0 => (2, 8, 16),
        DType::Q4_0 | DType::IQ4NL => (2, 4, 16),
        _ => (6, 4, 48),
    }
}

/// Eight file-layout Q8_0/Q4_0/Q5_0/IQ4_NL blocks as one group block.
fn pack_q0_group_block(dtype: DType, blocks: [&[u8]; GROUP], out: &mut [u8]) {
    let (qs, runs, body) = q0_quants(dtype);
    let mut fifth = [0u8; 32];
    for (m, blk) in blocks.iter().enumerate() {
        out[2 * m..2 * m + 2].copy_from_slice(&blk[0..2]);
        for (k, q) in blk[qs..qs + 4 * runs].chunks_exact(4).enumerate() {
            let at = body + 32 * k + 4 * m;
            out[at..at + 4].copy_from_slice(q);
        }
        if dtype == DType::Q5_0 {
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            for e in 0..32 {
                fifth[4 * m + e % 4] |= (((qh >> e) & 1) as u8) << (e / 4);
            }
        }
    }
    if dtype == DType::Q5_0 {
        out[16..48].copy_from_slice(&fifth);
    }
}

/// Row `m`'s file-layout Q8_0/Q4_0/Q5_0/IQ4_NL block back from a group block `gb`.
fn unpack_q0_group_block(dtype: DType, gb: &[u8], m: usize, out: &mut [u8]) {
    let (qs, runs, body) = q0_quants(dtype);
    out[0..2].copy_from_slice(&gb[2 * m..2 * m + 2]);
    for (k, q) in out[qs..qs + 4 * runs].chunks_exact_mut(4).enumerate() {
        let at = body + 32 * k + 4 * m;
        q.copy_from_slice(&gb[at..at + 4]);
    }
    if dtype == DType::Q5_0 {
        let mut qh = 0u32;
        for e in 0..32 {
            qh |= (((gb[16 + 4 * m + e % 4] >> (e / 4)) & 1) as u32) << e;
        }
        out[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Row `m`'s file-layout block back from a group block `gb` of `dtype`.
pub(crate) fn unpack_block(dtype: DType, gb: &[u8], m: usize, out: &mut [u8]) {
    match dtype {
        DType::Q4K => unpack_group_block(gb, m, out),
        DType::IQ4XS => unpack_iq4_xs_group_block(gb, m, out),
        DType::Q6K => unpack_q6_k_group_block(gb, m, out),
        _ => unpack_q0_group_block(dtype, gb, m, out),
    }
}

/// Where row `m`'s four-byte runs of a Q6_K block go in its group block: `(file offset,
/// group offset)` of each of its 16 `qh` and 32 `ql` runs.
fn q6_k_runs(m: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..8).flat_map(move |j| {
        (0..2).flat_map(move |h| {
            let at = 144 + 192 * j + 96 * h + 4 * m;
            let qh = (128 + 32 * h + 4 * j, at);
            let ql = (0..2).map(move |kk| (64 * h + 32 * kk + 4 * j, at + 32 * (1 + kk)));
            std::iter::once(qh).chain(ql)
        })
    })
}

/// Eight file-layout Q6_K blocks (210 bytes: `ql`, `qh`, 16 scales, `d`) as one group block.
fn pack_q6_k_group_block(blocks: [&[u8]; GROUP], out: &mut [u8]) {
    for (m, blk) in blocks.iter().enumerate() {
        out[2 * m..2 * m + 2].copy_from_slice(&blk[208..210]);
        for i in 0..16 {
            out[16 + 8 * i + m] = blk[192 + i];
        }
        for (f, g) in q6_k_runs(m) {
            out[g..g + 4].copy_from_slice(&blk[f..f + 4]);
        }
    }
}

/// Row `m`'s 210-byte file-layout Q6_K block back from a group block `gb`.
fn unpack_q6_k_group_block(gb: &[u8], m: usize, out: &mut [u8]) {
    out[208..210].copy_from_slice(&gb[2 * m..2 * m + 2]);
    for i in 0..16 {
        out[192 + i] = gb[16 + 8 * i + m];
    }
    for (f, g) in q6_k_runs(m) {
        out[f..f + 4].copy_from_slice(&gb[g..g + 4]);
    }
}

/// Eight file-layout IQ4_XS blocks (136 bytes: `d`, u16 high scale bits, four bytes of low
/// scale nibbles, 128 index bytes) as one group super-block.
fn pack_iq4_xs_group_block(blocks: [&[u8]; GROUP], out: &mut [u8]) {
    let mut sc = [0u8; 64];
    for (m, blk) in blocks.iter().enumerate() {
        out[2 * m..2 * m + 2].copy_from_slice(&blk[0..2]);
        for j in 0..8 {
            // The stored 6-bit value (the file's scale reader gives it offset by −32).
            sc[8 * j + m] = (super::iq::iq4_xs_scale(blk, j) + 32) as u8;
        }
        for (s, q) in blk[8..136].chunks_exact(4).enumerate() {
            let at = 64 + 32 * s + 4 * m;
            out[at..at + 4].copy_from_slice(q);
        }
    }
    for p in 0..32 {
        out[16 + p] = (sc[p] & 15) | (sc[p + 32] & 15) << 4;
    }
    for i in 0..16 {
        out[48 + i] = (0..4).fold(0, |b, t| b | (sc[i + 16 * t] >> 4) << (2 * t));
    }
}

/// Scale entry `e = 8j + m` (row `m`'s 6-bit scale of block `j`) of an IQ4_XS group block.
fn iq4_xs_group_scale(gb: &[u8], e: usize) -> u8 {
    let low = (gb[16 + e % 32] >> (4 * (e / 32))) & 15;
    low | ((gb[48 + e % 16] >> (2 * (e / 16))) & 3) << 4
}

/// Row `m`'s 136-byte file-layout IQ4_XS block back from a group super-block `gb`.
fn unpack_iq4_xs_group_block(gb: &[u8], m: usize, out: &mut [u8]) {
    out[0..2].copy_from_slice(&gb[2 * m..2 * m + 2]);
    let sc: [u8; 8] = std::array::from_fn(|j| iq4_xs_group_scale(gb, 8 * j + m));
    let high = (0..8).fold(0u16, |h, j| h | ((sc[j] >> 4) as u16) << (2 * j));
    out[2..4].copy_from_slice(&high.to_le_bytes());
    for i in 0..4 {
        out[4 + i] = (sc[2 * i] & 15) | (sc[2 * i + 1] & 15) << 4;
    }
    for (s, q) in out[8..136].chunks_exact_mut(4).enumerate() {
        let at = 64 + 32 * s + 4 * m;
        q.copy_from_slice(&gb[at..at + 4]);
    }
}

/// Eight file-layout Q4_K blocks as one group super-block.
fn pack_group_block(blocks: [&[u8]; GROUP], out: &mut [u8]) {
    let (mut sc, mut mn) = ([0u8; 64], [0u8; 64]);
    for (m, blk) in blocks.iter().enumerate() {
        out[2 * m..2 * m + 2].copy_from_slice(&blk[0..2]);
        out[16 + 2 * m..18 + 2 * m].copy_from_slice(&blk[2..4]);
        for j in 0..8 {
            (sc[8 * j + m], mn[8 * j + m]) = scale_min_k4(j, &blk[4..16]);
        }
        // Step s = 8c + k of part c: the row's bytes 16 + 4s.. (parts are 32 bytes apart).
        for (s, q) in blk[16..144].chunks_exact(4).enumerate() {
            let at = 128 + 32 * s + 4 * m;
            out[at..at + 4].copy_from_slice(q);
        }
    }
    for i in 0..64 {
        out[32 + i] = (sc[i] & 15) | (mn[i] & 15) << 4;
    }
    for i in 0..32 {
        out[96 + i] =
            (sc[i] >> 4) | (sc[i + 32] >> 4) << 2 | (mn[i] >> 4) << 4 | (mn[i + 32] >> 4) << 6;
    }
}

/// Row `m`'s 144-byte file-layout block back from a group super-block `gb`.
fn unpack_group_block(gb: &[u8], m: usize, out: &mut [u8]) {
    out[0..2].copy_from_slice(&gb[2 * m..2 * m + 2]);
    out[2..4].copy_from_slice(&gb[16 + 2 * m..18 + 2 * m]);
    let (sc, mn): ([u8; 8], [u8; 8]) = (
        std::array::from_fn(|j| group_scale_min(gb, 8 * j + m).0),
        std::array::from_fn(|j| group_scale_min(gb, 8 * j + m).1),
    );
    out[4..16].copy_from_slice(&pack_scale_min_k4(&sc, &mn));
    for (s, q) in out[16..144].chunks_exact_mut(4).enumerate() {
        let at = 128 + 32 * s + 4 * m;
        q.copy_from_slice(&gb[at..at + 4]);
    }
}

/// Scale and min `i = 8j + m` (sub-block `j` of row `m`) of a group super-block.
fn group_scale_min(gb: &[u8], i: usize) -> (u8, u8) {
    let lo = gb[32 + i];
    let hi = gb[96 + i % 32];
    let shift = if i < 32 { 0 } else { 2 };
    (
        (lo & 15) | ((hi >> shift) & 3) << 4,
        (lo >> 4) | ((hi >> (4 + shift)) & 3) << 4,
    )
}

/// The file's 12-byte packing of eight 6-bit scales and mins (the inverse of
/// [`scale_min_k4`]).
fn pack_scale_min_k4(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | (sc[j + 4] >> 4) << 6;
        s[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6;
        s[j + 8] = (sc[j + 4] & 15) | (mn[j + 4] & 15) << 4;
    }
    s
}

/// Stored row `r` of a repacked `[rows, k]` matrix in the file's layout, into `out`
/// (`dtype.bytes_for(k)` bytes).
pub fn unpack_row(dtype: DType, w: &[u8], rows: usize, k: usize, r: usize, out: &mut [u8]) {
    assert!(
        repack_supported(dtype) && r < rows,
        "unpack_row: row {r} of {rows}"
    );
    let row_bytes = dtype.bytes_for(k);
    let groups = rows / GROUP;
    if r >= groups * GROUP {
        out.copy_from_slice(&w[r * row_bytes..(r + 1) * row_bytes]);
        return;
    }
    let (g, m) = (r / GROUP, r % GROUP);
    let (tb, gbb) = (dtype.type_size(), group_block_bytes(dtype));
    let group = &w[g * GROUP * row_bytes..(g + 1) * GROUP * row_bytes];
    for (gb, o) in group.chunks_exact(gbb).zip(out.chunks_exact_mut(tb)) {
        unpack_block(dtype, gb, m, o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize;
    use crate::testing::rand_vec;

    /// Repacking moves bytes and nothing else: every row unpacks to the file's bytes, for row
    /// counts with and without a tail.
    #[test]
    fn every_row_unpacks_to_the_file_bytes() {
        let k = 512;
        for dtype in crate::quant::repack::GROUP_TYPES {
            for rows in [1, 7, 8, 13, 24] {
                let wf = rand_vec(rows * k, 11, 2.0);
                let mut w = vec![0u8; dtype.bytes_for(rows * k)];
                quantize(dtype, &wf, &mut w);
                let packed = repack(dtype, &w, rows, k);
                assert_eq!(packed.len(), w.len());
                let row_bytes = dtype.bytes_for(k);
                let mut row = vec![0u8; row_bytes];
                for r in 0..rows {
                    unpack_row(dtype, &packed, rows, k, r, &mut row);
                    let want = &w[r * row_bytes..(r + 1) * row_bytes];
                    assert_eq!(row, want, "{dtype}: rows {rows}, row {r}");
                }
            }
        }
    }

    /// The 12-byte scale packing round-trips every 6-bit value in every position.
    #[test]
    fn scale_packing_round_trips() {
        for v in 0..64u8 {
            let sc: [u8; 8] = std::array::from_fn(|j| ((v as usize + 7 * j) % 64) as u8);
            let mn: [u8; 8] = std::array::from_fn(|j| ((v as usize * 3 + 11 * j) % 64) as u8);
            let s = pack_scale_min_k4(&sc, &mn);
            for j in 0..8 {
                assert_eq!(scale_min_k4(j, &s), (sc[j], mn[j]));
            }
        }
    }
}
