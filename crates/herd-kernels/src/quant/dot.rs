//! Dot products of one quantized weight row with one activation row quantized to the weight
//! type's `vec_dot_type` (Q8_0, Q8_1 or Q8_K): exact integer sums inside each block, then f32.
//!
//! The f32 part has one order per type, whatever the batch or the weights' layout (so
//! batching, prompt splitting, prefix caching and repacking never change a result):
//! - Q8_0, Q5_0, Q4_0: one f32 sum, `acc = isum·(d_w·d_a) + acc` per block by fused
//!   multiply-add, `isum` the block's exact integer sum (what a kernel with one lane per weight
//!   row, as the interleaved-row kernels have, computes without a horizontal step).
//! - Q6_K: the same eight lanes per super-block, each lane's integer being its elements'
//!   `scale·q·a` minus `32·scale·bsum` of the lane's two 16-value groups, times `d_a·d_w`.
//! - Q4_K: one f32 sum of `sumi·(d_w·d_a)` and one of `summ·(dmin_w·d_a)` over super-blocks by
//!   fused multiply-add, subtracted at the end.
//! - The other types: each block reduced to one f32 and the blocks summed in order.
//!
//! The SIMD kernels return the same bits as this scalar reference. Model outputs are judged by
//! KL divergence against an f64 reference, not by equality with another engine's bits.

use super::dequant::five_bit;
use super::iq;
use super::{f16_at, f32_at, q3k_scales, scale_min_k4};
use crate::DType;
use crate::attention::hsum8;

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

/// Whether [`vec_dot`] for `wtype` asks for its own weights ahead (into L1) on this CPU, so a
/// caller that streams weight rows through it should not also prefetch them: AVX2's Q6_K row
/// kernel. With both, Scout-shaped Q4_K_M decode (its Q6_K output head) was ~10% slower
/// (docs/performance.md).
pub fn vec_dot_prefetches(wtype: DType) -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::has_avx2() && wtype == DType::Q6K;
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = wtype;
        false
    }
}

/// Whether this CPU computes batched products with `wtype` weights by unpacking each eight
/// weight rows once ([`unpack_x8`], [`vec_dot_unpacked_x8`]): the IQ1–IQ3 types, whose grid
/// lookups cost more than the multiply-adds, with AVX2.
pub fn unpack_x8_supported(wtype: DType) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        return iq::is_super_block_type(wtype) && wtype != DType::IQ4XS;
    }
    let _ = wtype;
    false
}

/// Bytes [`unpack_x8`] writes for eight rows of `n` values.
pub fn unpacked_x8_bytes(n: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    return n / super::QK_K * super::avx2_iq::UNPACKED_BLOCK;
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = n;
        0
    }
}

/// Eight consecutive weight rows of `n` values (`w`) unpacked into `out`
/// ([`unpacked_x8_bytes`] long) for [`vec_dot_unpacked_x8`].
///
/// # Panics
/// If [`unpack_x8_supported`] is false for `wtype` or the slices are short.
pub fn unpack_x8(wtype: DType, w: &[u8], n: usize, out: &mut [u8]) {
    assert!(
        unpack_x8_supported(wtype),
        "{wtype} has no unpacked form here"
    );
    let nb = n / super::QK_K;
    assert!(w.len() >= 8 * wtype.bytes_for(n) && out.len() >= unpacked_x8_bytes(n));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: unpack_x8_supported() confirmed AVX2, FMA and F16C; lengths asserted above.
    unsafe {
        super::avx2_iq::unpack_x8(wtype, w, nb, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = nb;
}

/// `out[r][m]`: row `m` of eight weight rows unpacked by [`unpack_x8`] (`u`) with activation
/// row `a[r]` (Q8_K), each equal to [`vec_dot`] of that pair.
///
/// # Panics
/// If [`unpack_x8_supported`] is false for `wtype` or the slices are short.
pub fn vec_dot_unpacked_x8<const N: usize>(
    wtype: DType,
    u: &[u8],
    a: [&[u8]; N],
    n: usize,
) -> [[f32; 8]; N] {
    assert!(
        unpack_x8_supported(wtype),
        "{wtype} has no unpacked form here"
    );
    let nb = n / super::QK_K;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: unpack_x8_supported() confirmed AVX2, FMA and F16C; the kernel asserts lengths.
    unsafe {
        super::avx2_iq::rows_unpacked(wtype, u, a, nb)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (u, a, nb);
        unreachable!()
    }
}

/// `out[j][r]` = [`vec_dot`] of weight row `j` (rows stored one after another in `w`) with
/// activation row `a[r]`: one call for a tile of weight rows and four activation rows, so each
/// unpacked weight block serves four rows.
pub fn vec_dot_x4_rows(wtype: DType, w: &[u8], a: [&[u8]; 4], n: usize, out: &mut [[f32; 4]]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() && super::avx2::rows_x4(wtype, w, a, n, out).is_some() {
        return;
    }
    // No shared-weight kernel for this type (or CPU): the one-pair kernels give the same bits.
    let row = wtype.bytes_for(n);
    for (wr, o) in w.chunks_exact(row).zip(out.iter_mut()) {
        *o = std::array::from_fn(|r| vec_dot(wtype, wr, a[r], n));
    }
}

/// The scalar reference every other kernel must equal.
pub fn vec_dot_scalar(wtype: DType, w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = n / wtype.block_size();
    let (wt, at) = (wtype.type_size(), wtype.vec_dot_type().type_size());
    debug_assert_eq!(w.len(), nb * wt);
    debug_assert_eq!(a.len(), nb * at);
    let blocks = w.chunks_exact(wt).zip(a.chunks_exact(at));
    match wtype {
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => block_fma(blocks, |w, a| q0_block(wtype, w, a)),
        DType::Q6K => eight_lanes(blocks, q6_k_block),
        DType::Q4K => {
            let mut acc = [0.0f32; 2];
            for (wb, ab) in blocks {
                q4_k_step(&mut acc, wb, ab);
            }
            acc[0] - acc[1]
        }
        DType::Q4_1 => block_sums(blocks, q4_1_q8_1),
        DType::Q5_1 => block_sums(blocks, q5_1_q8_1),
        DType::Q2K => block_sums(blocks, q2_k_q8_k),
        DType::Q3K => block_sums(blocks, q3_k_q8_k),
        DType::Q5K => block_sums(blocks, q5_k_q8_k),
        DType::IQ4NL | DType::MXFP4 => block_fma(blocks, |w, a| iq::q8_0_pair(wtype, w, a)),
        t if iq::is_super_block_type(t) => {
            let acc = blocks.fold(0.0f32, |acc, (wb, ab)| iq_super_block_step(t, wb, ab, acc));
            acc * iq::row_constant(t)
        }
        other => panic!("no integer dot product for weights of type {other}"),
    }
}

/// (weight block, activation block) pairs of one row.
type Blocks<'a> = std::iter::Zip<std::slice::ChunksExact<'a, u8>, std::slice::ChunksExact<'a, u8>>;

/// ggml's eight f32 lanes: `lanes_of` gives each block's f32 scale and eight integer lane sums,
/// added by fused multiply-add; the lanes are added at the end as [`hsum8`].
fn eight_lanes(blocks: Blocks<'_>, lanes_of: impl Fn(&[u8], &[u8]) -> (f32, [i32; 8])) -> f32 {
    let mut acc = [0.0f32; 8];
    for (wb, ab) in blocks {
        add_lanes(&mut acc, lanes_of(wb, ab));
    }
    hsum8(&acc)
}

/// One block's step of [`eight_lanes`]: `acc[l] = lanes[l]·d + acc[l]` by fused multiply-add.
fn add_lanes(acc: &mut [f32; 8], (d, lanes): (f32, [i32; 8])) {
    for (l, v) in acc.iter_mut().zip(lanes) {
        *l = d.mul_add(v as f32, *l);
    }
}

/// A Q6_K × Q8_K super-block for [`eight_lanes`]: `(d_a·d_w, ggml's eight lane sums)`.
fn q6_k_block(w: &[u8], a: &[u8]) -> (f32, [i32; 8]) {
    (f32_at(a, 0) * f16_at(w, 208), q6_k_lanes(w, a))
}

/// One f32 sum over the blocks in order: `acc = isum·d + acc` by fused multiply-add, where
/// `block` gives each block's f32 scale `d` and exact integer sum `isum`.
fn block_fma(blocks: Blocks<'_>, block: impl Fn(&[u8], &[u8]) -> (f32, i32)) -> f32 {
    blocks.fold(0.0, |acc, (wb, ab)| {
        let (d, isum) = block(wb, ab);
        (isum as f32).mul_add(d, acc)
    })
}

/// Each block reduced to one f32 by `block`, the blocks summed in order.
fn block_sums(blocks: Blocks<'_>, block: fn(&[u8], &[u8]) -> f32) -> f32 {
    blocks.map(|(wb, ab)| block(wb, ab)).fold(0.0, |s, t| s + t)
}

/// The 32 signed weights of a Q8_0 block.
fn q8_0_values(w: &[u8]) -> [i32; 32] {
    std::array::from_fn(|j| w[2 + j] as i8 as i32)
}

/// The 32 signed weights of a Q4_0 block (nibble − 8; low nibbles are elements 0..16).
fn q4_0_values(w: &[u8]) -> [i32; 32] {
    std::array::from_fn(|j| {
        let q = w[2 + j % 16];
        (if j < 16 { q & 0xF } else { q >> 4 }) as i32 - 8
    })
}

/// The 32 signed weights of a Q5_0 block (five bits − 16).
fn q5_0_values(w: &[u8]) -> [i32; 32] {
    let q = five_bit(w, 2, 6);
    std::array::from_fn(|j| q[j] as i32 - 16)
}

/// Σ weight × activation over a block (a Q8_0 activation block's values at 2).
fn q0_sum(w: &[i32; 32], a: &[u8]) -> i32 {
    w.iter().zip(i8s(&a[2..34])).map(|(x, y)| x * y).sum()
}

/// ggml's eight AVX2 lanes of one Q6_K × Q8_K super-block: lane `L` holds elements
/// `4L..4L+4` of every 32-value group (weights unsigned 0..63, times their group's scale), less
/// `32·(sc[2L]·bsum[2L] + sc[2L+1]·bsum[2L+1])` for the −32 offset of every weight.
fn q6_k_lanes(w: &[u8], a: &[u8]) -> [i32; 8] {
    let sc = |i: usize| w[192 + i] as i8 as i32;
    let mut lanes = [0i32; 8];
    for half in 0..2 {
        let ql = &w[64 * half..64 * half + 64];
        let qh = &w[128 + 32 * half..160 + 32 * half];
        for l in 0..32 {
            let q = [
                (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &qk) in q.iter().enumerate() {
                let e = 128 * half + 32 * k + l;
                lanes[l / 4] += sc(8 * half + 2 * k + l / 16) * qk as i32 * a[4 + e] as i8 as i32;
            }
        }
    }
    for (lane, v) in lanes.iter_mut().enumerate() {
        *v -= 32
            * (sc(2 * lane) * q8k_bsum(a, 2 * lane) + sc(2 * lane + 1) * q8k_bsum(a, 2 * lane + 1));
    }
    lanes
}

/// One Q4_K × Q8_K super-block of the reference: its exact integer sums, then
/// [`q4_k_add`] with `d = d_w·d_a`, `dmin = dmin_w·d_a`.
fn q4_k_step(acc: &mut [f32; 2], wb: &[u8], ab: &[u8]) {
    let (sumi, summ) = q4_k_parts(wb, ab);
    let ad = f32_at(ab, 0);
    let (d, dmin) = (f16_at(wb, 0) * ad, f16_at(wb, 2) * ad);
    q4_k_add(acc, sumi.iter().sum(), summ.iter().sum(), d, dmin);
}

/// `out[r][m]` = [`vec_dot`] of row `m` of one group of eight interleaved rows (`g`: the
/// group's super-blocks in the layout of [`repack`](super::repack)) with activation row `a[r]`,
/// `n` elements each: the same bits as the rows in the file's layout give.
///
/// Panics if `wtype` has no interleaved layout or the slices are short. Allocates the
/// activations' block sums where the type needs them: hot loops call [`vec_dot_x8_sums`].
pub fn vec_dot_x8<const N: usize>(
    wtype: DType,
    g: &[u8],
    a: [&[u8]; N],
    n: usize,
) -> [[f32; 8]; N] {
    let sums = a.map(|ar| {
        let mut s = Vec::new();
        if x8_wants_block_sums(wtype) {
            q8_0_block_sums(ar, n, &mut s);
        }
        s
    });
    vec_dot_x8_sums(wtype, g, a, std::array::from_fn(|r| &sums[r][..]), n)
}

/// Whether [`vec_dot_x8_sums`] needs the activations' block sums for `wtype` on this CPU:
/// Q4_0's and Q5_0's kernels take the unsigned quants and subtract the offset times the sum,
/// and so do Q8_0's and IQ4_NL's AVX-512 VNNI kernels (`vpdpbusd` multiplies unsigned by
/// signed bytes: the signed weights go in offset by 128). The Q8_K types' kernels (Q4_K,
/// Q6_K, IQ4_XS) take the sums stored in the activation blocks instead, so the activations
/// must be those [`quantize_activation`](super::quantize_activation) wrote.
pub fn x8_wants_block_sums(wtype: DType) -> bool {
    match wtype {
        DType::Q4_0 | DType::Q5_0 => true,
        #[cfg(target_arch = "x86_64")]
        DType::Q8_0 | DType::IQ4NL => super::has_vnni(),
        _ => false,
    }
}

/// The exact integer sum of each block of the Q8_0 activation row `a` (`n` values), appended
/// to `out`.
pub fn q8_0_block_sums(a: &[u8], n: usize, out: &mut Vec<i32>) {
    out.extend(
        a[..DType::Q8_0.bytes_for(n)]
            .chunks_exact(34)
            .map(|b| i8s(&b[2..]).sum::<i32>()),
    );
}

/// [`vec_dot_x8`] with `sums[r]` the block sums of `a[r]` ([`q8_0_block_sums`]) where
/// [`x8_wants_block_sums`], anything (e.g. empty) otherwise.
pub fn vec_dot_x8_sums<const N: usize>(
    wtype: DType,
    g: &[u8],
    a: [&[u8]; N],
    sums: [&[i32]; N],
    n: usize,
) -> [[f32; 8]; N] {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2()
        && let Some(v) = super::avx2::rows_x8(wtype, g, a, sums, n)
    {
        return v;
    }
    if has_x16_kernel(wtype) {
        // A type whose group kernels are 512-bit only (Q6_K): the group beside itself, half
        // the work thrown away (callers pair groups through `vec_dot_x16_sums`; this serves a
        // last odd one).
        return vec_dot_x16_sums(wtype, g, g, a, sums, n).map(|r| std::array::from_fn(|m| r[m]));
    }
    let _ = sums;
    vec_dot_x8_scalar(wtype, g, a, n)
}

/// Whether this CPU has a 512-bit kernel for two groups of `wtype` at once
/// ([`vec_dot_x16_sums`]). Where it does, products with a repacked `wtype` matrix take their
/// groups in pairs through it whatever the batch, one-row decode included: with independent
/// `vpdpbusd` chains per row (four for Q4_K and IQ4_XS; two for the 32-value formats when
/// measured, four since `q0_x16` follows `independent_chains` for one row) and Q4_K's next
/// block prefetched, the 512-bit kernels streamed the Scout-shaped model faster than the
/// 256-bit ones (Xeon with AVX-512 VNNI, `-t 2` tg128, alternating runs: Q4_K_M 25.4 → 29.9,
/// Q8_0 17.3 → 19.9, IQ4_XS 24.7 → 31.5 tokens/s; docs/performance.md).
pub fn has_x16_kernel(wtype: DType) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::has_avx512_vnni() {
        return super::avx512::has_kernel(wtype);
    }
    let _ = wtype;
    false
}

/// The most activation rows one [`vec_dot_x16_sums`] call should take for `wtype` (8 or 4);
/// callers give it that many while they have them, then four, then one. 4 where the CPU has
/// no 512-bit kernel for the type.
pub fn x16_rows_per_call(wtype: DType) -> usize {
    #[cfg(target_arch = "x86_64")]
    if has_x16_kernel(wtype) {
        return super::avx512::rows_per_call(wtype);
    }
    let _ = wtype;
    4
}

/// [`vec_dot_x8_sums`] of two groups at once (`g0`, then `g1`: `out[r][m]` for `m` in 0..16),
/// by the 512-bit kernels, the same bits as two [`vec_dot_x8_sums`] calls.
///
/// Panics if the CPU has no such kernel for `wtype` ([`has_x16_kernel`]) or the slices are
/// short.
pub fn vec_dot_x16_sums<const N: usize>(
    wtype: DType,
    g0: &[u8],
    g1: &[u8],
    a: [&[u8]; N],
    sums: [&[i32]; N],
    n: usize,
) -> [[f32; 16]; N] {
    assert!(has_x16_kernel(wtype), "no 512-bit group kernel for {wtype}");
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = super::avx512::rows_x16(wtype, g0, g1, a, sums, n) {
        return v;
    }
    unreachable!("has_x16_kernel promised a kernel for {wtype}")
}

/// The scalar reference of [`vec_dot_x8`]: each row's blocks restored to the file's layout and
/// taken through [`vec_dot_scalar`]'s steps.
pub fn vec_dot_x8_scalar<const N: usize>(
    wtype: DType,
    g: &[u8],
    a: [&[u8]; N],
    n: usize,
) -> [[f32; 8]; N] {
    assert!(
        super::repack::repack_supported(wtype),
        "no interleaved kernel for {wtype}"
    );
    let nb = n / wtype.block_size();
    let (tb, at) = (wtype.type_size(), wtype.vec_dot_type().type_size());
    let gbb = super::repack::group_block_bytes(wtype);
    assert!(g.len() >= nb * gbb && a.iter().all(|r| r.len() >= nb * at));
    // Per output: Q6_K's eight lanes, Q4_K's two sums, or the other formats' one (in [0]).
    let mut acc = [[[0.0f32; 8]; 8]; N];
    let mut block = [0u8; 210];
    for b in 0..nb {
        for m in 0..8 {
            let wb = &mut block[..tb];
            super::repack::unpack_block(wtype, &g[b * gbb..(b + 1) * gbb], m, wb);
            for (acc_r, ar) in acc.iter_mut().zip(&a) {
                let ab = &ar[b * at..(b + 1) * at];
                let acc = &mut acc_r[m];
                match wtype {
                    DType::Q4K => q4_k_step(acc.first_chunk_mut().unwrap(), wb, ab),
                    DType::Q6K => add_lanes(acc, q6_k_block(wb, ab)),
                    DType::IQ4XS => acc[0] = iq_super_block_step(wtype, wb, ab, acc[0]),
                    _ => {
                        let (d, isum) = q0_block(wtype, wb, ab);
                        acc[0] = (isum as f32).mul_add(d, acc[0]);
                    }
                }
            }
        }
    }
    // IQ4_XS's row constant is 1 (see `iq::row_constant`): its result is the sum itself.
    debug_assert!(wtype != DType::IQ4XS || iq::row_constant(wtype) == 1.0);
    acc.map(|r| {
        r.map(|l| match wtype {
            DType::Q6K => hsum8(&l),
            _ => l[0] - l[1],
        })
    })
}

/// One 256-value IQ super-block of the reference: `acc + isum·(d_w·d_a)` by fused
/// multiply-add (the row constant is applied at the end of the row).
fn iq_super_block_step(wtype: DType, w: &[u8], a: &[u8], acc: f32) -> f32 {
    let d = iq::super_scale(wtype, w) * f32_at(a, 0);
    (iq::super_block_isum(wtype, w, a) as f32).mul_add(d, acc)
}

/// A Q8_0/Q4_0/Q5_0/IQ4_NL block against a Q8_0 activation block: `(d_w·d_a, exact integer
/// sum)`.
fn q0_block(wtype: DType, w: &[u8], a: &[u8]) -> (f32, i32) {
    if wtype == DType::IQ4NL {
        return iq::q8_0_pair(wtype, w, a);
    }
    let values = match wtype {
        DType::Q4_0 => q4_0_values(w),
        DType::Q5_0 => q5_0_values(w),
        _ => q8_0_values(w),
    };
    (f16_at(w, 0) * f16_at(a, 0), q0_sum(&values, a))
}

/// One Q4_K super-block: `acc += [sumi·d, summ·dmin]`, each by fused multiply-add.
#[inline]
pub(crate) fn q4_k_add(acc: &mut [f32; 2], sumi: i32, summ: i32, d: f32, dmin: f32) {
    acc[0] = (sumi as f32).mul_add(d, acc[0]);
    acc[1] = (summ as f32).mul_add(dmin, acc[1]);
}

/// One Q4_K × Q8_K super-block's integer sums by 64-value part `c`: `Σ scale·q·a` and
/// `Σ min·bsum` of sub-blocks `2c` and `2c+1`.
fn q4_k_parts(w: &[u8], a: &[u8]) -> ([i32; 4], [i32; 4]) {
    let (mut sumi, mut summ) = ([0i32; 4], [0i32; 4]);
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
        sumi[c] = sc1 as i32 * d1 + sc2 as i32 * d2;
        summ[c] = m1 as i32 * (q8k_bsum(a, 4 * c) + q8k_bsum(a, 4 * c + 1))
            + m2 as i32 * (q8k_bsum(a, 4 * c + 2) + q8k_bsum(a, 4 * c + 3));
    }
    (sumi, summ)
}

#[inline]
fn i8s(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    b.iter().map(|&v| v as i8 as i32)
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
