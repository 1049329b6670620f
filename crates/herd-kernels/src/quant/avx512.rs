//! AVX-512 group kernels on 512-bit registers: two interleaved groups of eight rows side by
//! side, lanes 0..8 the first group's rows and 8..16 the second's, so each broadcast
//! activation feeds sixteen weight rows per instruction (`vpdpbusd`; Q6_K's `maddubs` and
//! `vpdpwssd`), where the 256-bit forms in `avx2.rs` feed eight. The integers and the f32
//! steps per output are those of the scalar reference (`dot.rs`), so the results are
//! bit-identical to it and to the 256-bit forms (Q6_K has only this one).

use std::arch::x86_64::*;

use super::avx2::{
    IQ4_NL, Q4_0, Q5_0, Q8_0, iq4_nl_table, iq4_xs_scales, q0_size, q4_k_scales_mins, q8_k_sum32,
};
use super::repack::{GROUP, X8_BLOCK};
use crate::DType;

/// Does this CPU have AVX-512 F/BW and VNNI for the 512-bit group kernels? Checked once;
/// `HERD_NO_AVX512` turns it off (with the 256-bit VNNI forms).
pub(crate) fn has_avx512_vnni() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        super::has_vnni()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
    })
}

/// Whether [`rows_x16`] has a kernel for `wtype` (on a CPU with [`has_avx512_vnni`]).
pub(crate) fn has_kernel(wtype: DType) -> bool {
    matches!(
        wtype,
        DType::Q4K
            | DType::Q6K
            | DType::Q8_0
            | DType::Q4_0
            | DType::Q5_0
            | DType::IQ4NL
            | DType::IQ4XS
    )
}

/// How many activation rows a [`rows_x16`] call should take at most: eight where the kernel
/// holds a block's sixteen weight rows in registers for every activation row (the 32-value
/// formats) and for Q4_K, whose eight rows' two i32 chains (16 registers) still fit beside the
/// unpacked weights: each unpacked weight register then feeds eight `vpdpbusd` instead of four
/// (Q4_K kernel samples −14% in a pp512 profile, the integers and f32 steps unchanged). Four
/// for Q6_K and IQ4_XS, whose per-row sums would not fit beside eight rows.
pub(crate) fn rows_per_call(wtype: DType) -> usize {
    match wtype {
        DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::IQ4NL | DType::Q4K => 8,
        _ => 4,
    }
}

/// `out[r][m]`: row `m` of the two interleaved groups `g0` (rows 0..8) and `g1` (rows 8..16)
/// with activation row `a[r]` (and its block sums `sums[r]` where `x8_wants_block_sums`),
/// each equal to `vec_dot` of that pair. `None` for types without a 512-bit kernel
/// ([`has_kernel`]). Callers check [`has_avx512_vnni`] first. The Q4_K, Q6_K and IQ4_XS
/// kernels take the activations' 16-value sums from their Q8_K blocks, which must be those of
/// their values (as `quantize_activation` writes them).
pub(crate) fn rows_x16<const N: usize>(
    wtype: DType,
    g0: &[u8],
    g1: &[u8],
    a: [&[u8]; N],
    sums: [&[i32]; N],
    n: usize,
) -> Option<[[f32; 16]; N]> {
    let nb = n / wtype.block_size();
    let at = wtype.vec_dot_type().type_size();
    let gbytes = nb * super::repack::group_block_bytes(wtype);
    assert!(g0.len() >= gbytes && g1.len() >= gbytes && a.iter().all(|r| r.len() >= nb * at));
    if super::x8_wants_block_sums(wtype) {
        assert!(
            sums.iter().all(|s| s.len() >= nb),
            "rows_x16: block sums missing"
        );
    }
    // SAFETY: has_avx512_vnni() confirmed AVX2, FMA, F16C, AVX-512 F/BW/VL/VNNI at run time;
    // both groups hold nb whole blocks and every activation row nb whole blocks (asserted).
    unsafe {
        match wtype {
            DType::Q4K => Some(q4_k_x16(g0, g1, a, nb)),
            DType::Q6K => Some(q6_k_x16(g0, g1, a, nb)),
            DType::Q8_0 => Some(q0_x16::<Q8_0, N>(g0, g1, a, sums, nb)),
            DType::Q4_0 => Some(q0_x16::<Q4_0, N>(g0, g1, a, sums, nb)),
            DType::Q5_0 => Some(q0_x16::<Q5_0, N>(g0, g1, a, sums, nb)),
            DType::IQ4NL => Some(q0_x16::<IQ4_NL, N>(g0, g1, a, sums, nb)),
            DType::IQ4XS => Some(iq4_xs_x16(g0, g1, a, nb)),
            _ => None,
        }
    }
}

/// 32 bytes at `p0` in the low half, 32 at `p1` in the high half.
///
/// # Safety
/// AVX-512 F; 32 readable bytes at each pointer.
#[inline(always)]
unsafe fn load_pair(p0: *const u8, p1: *const u8) -> __m512i {
    // SAFETY: forwarded to the caller.
    unsafe {
        let lo = _mm256_loadu_si256(p0 as *const __m256i);
        let hi = _mm256_loadu_si256(p1 as *const __m256i);
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }
}

/// Eight bytes at `p0` in the low half, eight at `p1` in the high half (a row-indexed byte
/// per row of the two groups: lane `m` of 0..16).
///
/// # Safety
/// SSE2; 8 readable bytes at each pointer.
#[inline(always)]
unsafe fn bytes8_pair(p0: *const u8, p1: *const u8) -> __m128i {
    // SAFETY: forwarded to the caller.
    unsafe {
        _mm_unpacklo_epi64(
            _mm_loadl_epi64(p0 as *const __m128i),
            _mm_loadl_epi64(p1 as *const __m128i),
        )
    }
}

/// The sum of the first `chains` (1, 2 or 4) of a row's independent i32 accumulator chains
/// ([`super::independent_chains`]); the others were never used.
///
/// # Safety
/// AVX-512 F.
#[inline(always)]
unsafe fn join_chains([c0, c1, c2, c3]: [__m512i; 4], chains: usize) -> __m512i {
    // SAFETY: forwarded to the caller.
    unsafe {
        match chains {
            1 => c0,
            2 => _mm512_add_epi32(c0, c1),
            _ => _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
        }
    }
}

/// Sixteen f16 values as f32: eight at `p0`, then eight at `p1`.
///
/// # Safety
/// AVX-512 F; 16 readable bytes at each pointer.
#[inline(always)]
unsafe fn f16_pair(p0: *const u8, p1: *const u8) -> __m512 {
    // SAFETY: forwarded to the caller.
    unsafe {
        let lo = _mm_loadu_si128(p0 as *const __m128i);
        let hi = _mm_loadu_si128(p1 as *const __m128i);
        _mm512_cvtph_ps(_mm256_set_m128i(hi, lo))
    }
}

/// Sixteen interleaved Q4_K rows (groups `g0` and `g1`, `nb` super-blocks each) against `N`
/// Q8_K activation rows: lane `m` is weight row `m`. Per sub-block, each step's four quants of
/// every row against four broadcast activations by `vpdpbusd` into the row's i32 lane, times
/// the rows' scales; the mins against the activations' 32-value sums by `vpdpwssd`. Lane `m` of
/// `sumi` and `summ` is then row `m`'s exact super-block sums and the f32 steps are the
/// reference's: `acc += sumi·(d·d_a)`, `acc_min += summ·(dmin·d_a)`, `acc − acc_min`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_k_x16<const N: usize>(
    g0: &[u8],
    g1: &[u8],
    a: [&[u8]; N],
    nb: usize,
) -> [[f32; 16]; N] {
    // SAFETY: the features are enabled here; rows_x16 checked that both groups hold nb group
    // super-blocks (X8_BLOCK bytes each) and every activation row nb Q8_K blocks (292 bytes),
    // and every load below stays inside block b of those, every prefetch address inside block
    // b + 1 (taken only when b + 1 < nb).
    unsafe {
        let (m4, zero) = (_mm512_set1_epi8(0x0F), _mm512_setzero_si512());
        let (mut acc, mut acc_min) = ([_mm512_setzero_ps(); N], [_mm512_setzero_ps(); N]);
        let (mut sc0, mut mn0, mut sc1, mut mn1) = ([0u8; 64], [0u8; 64], [0u8; 64], [0u8; 64]);
        for b in 0..nb {
            let (p0, p1) = (g0.as_ptr().add(X8_BLOCK * b), g1.as_ptr().add(X8_BLOCK * b));
            let ab: [*const u8; N] = a.map(|r| r.as_ptr().add(292 * b));
            q4_k_scales_mins(p0, &mut sc0, &mut mn0);
            q4_k_scales_mins(p1, &mut sc1, &mut mn1);
            // Lane m (0..16) of sub-block j's scales (or mins): group 0's then group 1's.
            let lanes = |x0: &[u8; 64], x1: &[u8; 64], j: usize| {
                _mm512_cvtepu8_epi32(bytes8_pair(x0.as_ptr().add(8 * j), x1.as_ptr().add(8 * j)))
            };

            let mut sumi = [_mm512_setzero_si512(); N];
            for c in 0..4 {
                // One row (decode) is bound by memory: the next block's bytes of both groups
                // (two streams a group apart) go into L1 a quarter per sub-block pair, as in
                // the Q6_K kernel, ahead of the hardware prefetcher.
                if N == 1 && b + 1 < nb {
                    for line in 5 * c..(5 * c + 5).min(19) {
                        let at = (X8_BLOCK + 64 * line).min(2 * X8_BLOCK - 1);
                        _mm_prefetch::<_MM_HINT_T0>(p0.add(at) as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(p1.add(at) as *const i8);
                    }
                }
                let (q0, q1) = (p0.add(128 + 256 * c), p1.add(128 + 256 * c));
                // Steps k go to chain k % chains (exact integer sums: the split changes
                // nothing), so that few rows still keep several `vpdpbusd` in flight.
                let chains = super::independent_chains(N);
                let (mut lo, mut hi) = ([[zero; 4]; N], [[zero; 4]; N]);
                for k in 0..8 {
                    let v = load_pair(q0.add(32 * k), q1.add(32 * k));
                    let wl = _mm512_and_si512(v, m4);
                    let wh = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                    for r in 0..N {
                        // Activations 64c + 4k.. (low nibbles) and 64c + 32 + 4k.. (high).
                        let at = ab[r].add(4 + 64 * c + 4 * k);
                        let yl = _mm512_set1_epi32(std::ptr::read_unaligned(at as *const i32));
                        let yh =
                            _mm512_set1_epi32(std::ptr::read_unaligned(at.add(32) as *const i32));
                        let (l, h) = (&mut lo[r][k % chains], &mut hi[r][k % chains]);
                        *l = _mm512_dpbusd_epi32(*l, wl, yl);
                        *h = _mm512_dpbusd_epi32(*h, wh, yh);
                    }
                }
                let join = |c| join_chains(c, chains);
                let (lo, hi) = (lo.map(join), hi.map(join));
                let (s_lo, s_hi) = (lanes(&sc0, &sc1, 2 * c), lanes(&sc0, &sc1, 2 * c + 1));
                for r in 0..N {
                    let t = _mm512_add_epi32(
                        _mm512_mullo_epi32(lo[r], s_lo),
                        _mm512_mullo_epi32(hi[r], s_hi),
                    );
                    sumi[r] = _mm512_add_epi32(sumi[r], t);
                }
            }

            // Mins: i16 lanes 2m, 2m + 1 of `mins[i]` hold row m's mins of sub-blocks 2i and
            // 2i + 1; their products with the activations' sums of those sub-blocks, added
            // pairwise (`vpdpwssd`), give lane m.
            let mins: [__m512i; 4] = std::array::from_fn(|i| {
                let pairs = |x: &[u8; 64]| {
                    _mm_unpacklo_epi8(
                        _mm_loadl_epi64(x.as_ptr().add(16 * i) as *const __m128i),
                        _mm_loadl_epi64(x.as_ptr().add(16 * i + 8) as *const __m128i),
                    )
                };
                _mm512_cvtepu8_epi16(_mm256_set_m128i(pairs(&mn1), pairs(&mn0)))
            });
            let dw = f16_pair(p0, p1);
            let dmw = f16_pair(p0.add(16), p1.add(16));
            for r in 0..N {
                // i16 lane j of `sums`: the sum of sub-block j's 32 activations (|·| ≤ 4064),
                // from the 16-value sums at 260..
                let bsums = _mm256_loadu_si256(ab[r].add(260) as *const __m256i);
                let sums = _mm_hadd_epi16(
                    _mm256_castsi256_si128(bsums),
                    _mm256_extracti128_si256::<1>(bsums),
                );
                let mut pair = [0i32; 4];
                _mm_storeu_si128(pair.as_mut_ptr() as *mut __m128i, sums);
                let mut summ = _mm512_setzero_si512();
                for (mi, &pi) in mins.iter().zip(&pair) {
                    // madd and add in one `vpdpwssd` (the same exact i32 sums).
                    summ = _mm512_dpwssd_epi32(summ, *mi, _mm512_set1_epi32(pi));
                }
                let ad = _mm512_set1_ps(super::avx2::f32_ptr(ab[r]));
                acc[r] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[r]), _mm512_mul_ps(dw, ad), acc[r]);
                acc_min[r] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_mul_ps(dmw, ad), acc_min[r]);
            }
        }
        std::array::from_fn(|r| {
            let mut out = [0.0f32; 16];
            // out holds sixteen f32; unaligned store.
            _mm512_storeu_ps(out.as_mut_ptr(), _mm512_sub_ps(acc[r], acc_min[r]));
            out
        })
    }
}

/// Sixteen interleaved Q6_K rows (groups `g0` and `g1`, `nb` super-blocks each) against `N`
/// Q8_K activation rows, keeping ggml's eight lanes per row (`dot::q6_k_lanes`): step
/// `(h, k, j)` (values `128h + 32k + 4j..+4`) belongs to lane `j`. Its six-bit quants of
/// sixteen rows against four broadcast activations by `maddubs` (pairs of products, at most
/// 2·63·128 in i16), then `vpdpwssd` with the rows' sub-block scales (each in both halves of
/// the row's lane) adds the scaled step into lane `j`'s i32 sum, which starts at the
/// reference's `−32·(sc(2j)·bsum(2j) + sc(2j+1)·bsum(2j+1))`. Lane `j` is then the reference's
/// exact integer, and the f32 steps are its: `lane_acc[j] = lane·(d_w·d_a) + lane_acc[j]` per
/// super-block, the eight lanes added as `hsum8` at the end.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6_k_x16<const N: usize>(
    g0: &[u8],
    g1: &[u8],
    a: [&[u8]; N],
    nb: usize,
) -> [[f32; 16]; N] {
    const GBB: usize = GROUP * 210;
    // SAFETY: the features are enabled here; rows_x16 checked that both groups hold nb group
    // blocks (GBB bytes each) and every activation row nb Q8_K blocks (292 bytes); every load
    // below stays inside block b of those, and every prefetch address inside block b + 1
    // (taken only when b + 1 < nb).
    unsafe {
        let m4 = _mm512_set1_epi8(0x0F);
        let m30 = _mm512_set1_epi8(0x30);
        // Lane j's f32 sums of each activation row: rows in the sixteen f32 lanes.
        let mut lane_acc = [[_mm512_setzero_ps(); 8]; N];
        for b in 0..nb {
            let (p0, p1) = (g0.as_ptr().add(GBB * b), g1.as_ptr().add(GBB * b));
            let ab: [*const u8; N] = a.map(|r| r.as_ptr().add(292 * b));
            // Sixteen rows' scales of sub-block i: eight bytes of each group at 16 + 8i.
            let scales = |i: usize| bytes8_pair(p0.add(16 + 8 * i), p1.add(16 + 8 * i));
            // Bytes x[m] and y[m] of sixteen rows as the i16 pair (x[m], y[m]) of lane m.
            let pairs = |x: __m128i, y: __m128i| {
                _mm512_cvtepi8_epi16(_mm256_set_m128i(
                    _mm_unpackhi_epi8(x, y),
                    _mm_unpacklo_epi8(x, y),
                ))
            };
            let dw = f16_pair(p0, p1);
            let d: [__m512; N] = std::array::from_fn(|r| {
                _mm512_mul_ps(_mm512_set1_ps(super::avx2::f32_ptr(ab[r])), dw)
            });
            for jh in 0..2 {
                // Row m's scale of sub-block 8h + 2k + jh in both i16 halves of lane m, for
                // hk = 4h + k.
                let sc: [__m512i; 8] = std::array::from_fn(|hk| {
                    let v = scales(8 * (hk / 4) + 2 * (hk % 4) + jh);
                    pairs(v, v)
                });
                for jj in 0..4 {
                    let j = 4 * jh + jj;
                    // The next block's bytes of this lane into L1 while this one computes
                    // (the two groups are two streams a group apart; the hardware prefetcher
                    // alone left one-row decode ~10% slower than the file layout).
                    if b + 1 < nb {
                        for line in 0..3 {
                            let at = GBB + 144 + 192 * j + 64 * line;
                            _mm_prefetch::<_MM_HINT_T0>(p0.add(at) as *const i8);
                            _mm_prefetch::<_MM_HINT_T0>(p1.add(at) as *const i8);
                        }
                        // The header (scales) in the first lanes' turns, the block's last
                        // bytes (a line the eighth lane may start) in the last one's.
                        let extra = match j {
                            0..3 => Some(GBB + 64 * j),
                            7 => Some(2 * GBB - 1),
                            _ => None,
                        };
                        if let Some(at) = extra {
                            _mm_prefetch::<_MM_HINT_T0>(p0.add(at) as *const i8);
                            _mm_prefetch::<_MM_HINT_T0>(p1.add(at) as *const i8);
                        }
                    }
                    // (−32·sc(2j), −32·sc(2j + 1)) per row, against the activations' 16-value
                    // sums 2j and 2j + 1 (one i32 at 260 + 4j): the lane's starting value.
                    let sc_j = pairs(scales(2 * j), scales(2 * j + 1));
                    let neg32 =
                        _mm512_sub_epi16(_mm512_setzero_si512(), _mm512_slli_epi16::<5>(sc_j));
                    // Independent chains per row (by run k), so that several `vpdpwssd` are
                    // in flight: four for one row (decode), two for more. The first starts at
                    // the offset term; they are added before the lane's f32 step.
                    let chains = if N == 1 { 4 } else { 2 };
                    let mut lane: [[__m512i; 4]; N] = std::array::from_fn(|r| {
                        let bsums = std::ptr::read_unaligned(ab[r].add(260 + 4 * j) as *const i32);
                        let mut c = [_mm512_setzero_si512(); 4];
                        c[0] = _mm512_madd_epi16(neg32, _mm512_set1_epi32(bsums));
                        c
                    });
                    for h in 0..2 {
                        let run = 144 + 192 * j + 96 * h;
                        let qh = load_pair(p0.add(run), p1.add(run));
                        for kk in 0..2 {
                            let at = run + 32 * (1 + kk);
                            let v = load_pair(p0.add(at), p1.add(at));
                            // Run kk: low nibbles with qh bits 2kk.. moved to bits 4, 5; run
                            // kk + 2: high nibbles with qh bits 2kk + 4.. (16-bit shifts: the
                            // masks keep only bits that stayed inside their byte).
                            let lo = _mm512_or_si512(
                                _mm512_and_si512(v, m4),
                                _mm512_and_si512(
                                    if kk == 0 {
                                        _mm512_slli_epi16::<4>(qh)
                                    } else {
                                        _mm512_slli_epi16::<2>(qh)
                                    },
                                    m30,
                                ),
                            );
                            let hi = _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4),
                                _mm512_and_si512(
                                    if kk == 0 {
                                        qh
                                    } else {
                                        _mm512_srli_epi16::<2>(qh)
                                    },
                                    m30,
                                ),
                            );
                            for (k, w) in [(kk, lo), (kk + 2, hi)] {
                                for r in 0..N {
                                    let y = std::ptr::read_unaligned(
                                        ab[r].add(4 + 128 * h + 32 * k + 4 * j) as *const i32,
                                    );
                                    let p = _mm512_maddubs_epi16(w, _mm512_set1_epi32(y));
                                    let c = &mut lane[r][k % chains];
                                    *c = _mm512_dpwssd_epi32(*c, p, sc[4 * h + k]);
                                }
                            }
                        }
                    }
                    for r in 0..N {
                        let [c0, c1, c2, c3] = lane[r];
                        let sum =
                            _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3));
                        lane_acc[r][j] =
                            _mm512_fmadd_ps(d[r], _mm512_cvtepi32_ps(sum), lane_acc[r][j]);
                    }
                }
            }
        }
        std::array::from_fn(|r| {
            let mut l = [[0.0f32; 16]; 8];
            for (lj, v) in l.iter_mut().zip(&lane_acc[r]) {
                // lj holds sixteen f32; unaligned store.
                _mm512_storeu_ps(lj.as_mut_ptr(), *v);
            }
            std::array::from_fn(|m| crate::attention::hsum8(&std::array::from_fn(|j| l[j][m])))
        })
    }
}

/// Sixteen interleaved rows of a 32-value format (groups `g0` and `g1` of kind `T`, `nb`
/// blocks each) against `N` Q8_0 activation rows (up to eight): lane `m` is weight row `m`.
/// Per block, the eight steps of four quants of every row are unpacked once into registers as
/// unsigned bytes (Q4_0's and Q5_0's as stored; Q8_0's and IQ4_NL's values offset by 128) and
/// serve every activation row: four broadcast activations per step by `vpdpbusd`, starting
/// from minus the offset times the activations' block sum (`sums[r][b]`). Lane `m` of `raw`
/// is then row `m`'s exact block sum, and `acc = raw·(d_w·d_a) + acc` is the reference's f32
/// step.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q0_x16<const T: u8, const N: usize>(
    g0: &[u8],
    g1: &[u8],
    a: [&[u8]; N],
    sums: [&[i32]; N],
    nb: usize,
) -> [[f32; 16]; N] {
    // SAFETY: the features are enabled here; rows_x16 checked that both groups hold nb group
    // blocks (GROUP · q0_size bytes each), every activation row nb Q8_0 blocks (34 bytes) and
    // every sums row nb values; every load below stays inside block b of those.
    unsafe {
        let gbb = GROUP * q0_size::<T>();
        let m4 = _mm512_set1_epi8(0x0F);
        let flip = _mm512_set1_epi8(-128);
        let table = _mm512_xor_si512(
            _mm512_broadcast_i64x4(iq4_nl_table()),
            _mm512_set1_epi8(-128),
        );
        let offset = match T {
            Q4_0 => 8,
            Q5_0 => 16,
            _ => 128,
        };
        // Eight rows are eight independent chains already; one chain each leaves the
        // registers to the eight steps' weights (two each spilled them).
        let chains = if N >= 8 {
            1
        } else {
            super::independent_chains(N).max(2)
        };
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..nb {
            let (p0, p1) = (g0.as_ptr().add(gbb * b), g1.as_ptr().add(gbb * b));
            let plane = if T == Q5_0 {
                load_pair(p0.add(16), p1.add(16))
            } else {
                m4
            };
            // Step s's four values of the sixteen rows, as unsigned bytes.
            let w: [__m512i; 8] = std::array::from_fn(|s| {
                if T == Q8_0 {
                    _mm512_xor_si512(load_pair(p0.add(16 + 32 * s), p1.add(16 + 32 * s)), flip)
                } else {
                    // Step s < 4: the low nibbles of run s; s ≥ 4: the high of s − 4.
                    let body = if T == Q5_0 { 48 } else { 16 };
                    let at = body + 32 * (s % 4);
                    let v = load_pair(p0.add(at), p1.add(at));
                    let nib = if s < 4 {
                        _mm512_and_si512(v, m4)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4)
                    };
                    match T {
                        IQ4_NL => _mm512_shuffle_epi8(table, nib),
                        Q5_0 => {
                            // Bit s of each plane byte, moved to bit 4 (16-bit shifts: the mask
                            // keeps only bits that stayed inside their byte).
                            let moved = if s <= 4 {
                                _mm512_sll_epi16(plane, _mm_cvtsi32_si128(4 - s as i32))
                            } else {
                                _mm512_srl_epi16(plane, _mm_cvtsi32_si128(s as i32 - 4))
                            };
                            _mm512_or_si512(nib, _mm512_and_si512(moved, _mm512_set1_epi8(0x10)))
                        }
                        _ => nib,
                    }
                }
            });
            let dw = f16_pair(p0, p1);
            for r in 0..N {
                let ab = a[r].as_ptr().add(34 * b);
                // Step s goes to chain s % chains (exact integer sums: the split changes
                // nothing); the first starts at minus the offset times the row's block sum.
                // Unchecked: rows_x16 asserted nb sums per row (a bounds check here costs a
                // reload from the stack per row and block).
                let mut c = [_mm512_setzero_si512(); 4];
                c[0] = _mm512_set1_epi32(-offset * *sums[r].as_ptr().add(b));
                for (s, ws) in w.iter().enumerate() {
                    let y = std::ptr::read_unaligned(ab.add(2 + 4 * s) as *const i32);
                    let cs = &mut c[s % chains];
                    *cs = _mm512_dpbusd_epi32(*cs, *ws, _mm512_set1_epi32(y));
                }
                // The activation block's f16 scale, converted in the vector unit.
                let da = _mm512_cvtph_ps(_mm256_set1_epi16(std::ptr::read_unaligned(
                    ab as *const i16,
                )));
                let raw = join_chains(c, chains);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(raw), _mm512_mul_ps(dw, da), acc[r]);
            }
        }
        acc.map(|v| {
            let mut out = [0.0f32; 16];
            // out holds sixteen f32; unaligned store.
            _mm512_storeu_ps(out.as_mut_ptr(), v);
            out
        })
    }
}

/// Sixteen interleaved IQ4_XS rows (groups `g0` and `g1`, `nb` super-blocks each) against `N`
/// Q8_K activation rows: lane `m` is weight row `m`. Per 32-value block, the values offset by
/// 128 as unsigned bytes against broadcast activations by `vpdpbusd`, 128 times the block's
/// activation sum off, times the rows' block scales; one exact integer per super-block and
/// the reference's f32 step (`acc = isum·(d_w·d_a) + acc`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn iq4_xs_x16<const N: usize>(
    g0: &[u8],
    g1: &[u8],
    a: [&[u8]; N],
    nb: usize,
) -> [[f32; 16]; N] {
    const GBB: usize = GROUP * 136;
    // SAFETY: the features are enabled here; rows_x16 checked that both groups hold nb group
    // super-blocks (GBB bytes each) and every activation row nb Q8_K blocks (292 bytes); every
    // load below stays inside block b of those.
    unsafe {
        let m4 = _mm512_set1_epi8(0x0F);
        let table = _mm512_xor_si512(
            _mm512_broadcast_i64x4(iq4_nl_table()),
            _mm512_set1_epi8(-128),
        );
        let mut acc = [_mm512_setzero_ps(); N];
        let (mut sc0, mut sc1) = ([0i8; 64], [0i8; 64]);
        for b in 0..nb {
            let (p0, p1) = (g0.as_ptr().add(GBB * b), g1.as_ptr().add(GBB * b));
            let ab: [*const u8; N] = a.map(|r| r.as_ptr().add(292 * b));
            iq4_xs_scales(p0, &mut sc0);
            iq4_xs_scales(p1, &mut sc1);
            let mut isum = [_mm512_setzero_si512(); N];
            for j in 0..8 {
                let scale = _mm512_cvtepi8_epi32(bytes8_pair(
                    sc0.as_ptr().add(8 * j).cast(),
                    sc1.as_ptr().add(8 * j).cast(),
                ));
                let (q0, q1) = (p0.add(64 + 128 * j), p1.add(64 + 128 * j));
                // Independent chains (exact integer sums: the split changes nothing), so that
                // few rows still keep several `vpdpbusd` in flight.
                let chains = super::independent_chains(N);
                let mut blk = [[_mm512_setzero_si512(); 4]; N];
                for k in 0..4 {
                    let v = load_pair(q0.add(32 * k), q1.add(32 * k));
                    let wl = _mm512_shuffle_epi8(table, _mm512_and_si512(v, m4));
                    let wh =
                        _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4));
                    for r in 0..N {
                        // Values 4k.. (low nibbles) and 16 + 4k.. (high) of block j.
                        let at = ab[r].add(4 + 32 * j + 4 * k);
                        let yl = _mm512_set1_epi32(std::ptr::read_unaligned(at as *const i32));
                        let yh =
                            _mm512_set1_epi32(std::ptr::read_unaligned(at.add(16) as *const i32));
                        let cl = &mut blk[r][(2 * k) % chains];
                        *cl = _mm512_dpbusd_epi32(*cl, wl, yl);
                        let ch = &mut blk[r][(2 * k + 1) % chains];
                        *ch = _mm512_dpbusd_epi32(*ch, wh, yh);
                    }
                }
                for r in 0..N {
                    let sum = join_chains(blk[r], chains);
                    let offset = _mm512_set1_epi32(128 * q8_k_sum32(ab[r], j));
                    let raw = _mm512_sub_epi32(sum, offset);
                    isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(raw, scale));
                }
            }
            let dw = f16_pair(p0, p1);
            for r in 0..N {
                let ad = _mm512_set1_ps(super::avx2::f32_ptr(ab[r]));
                acc[r] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(dw, ad), acc[r]);
            }
        }
        acc.map(|v| {
            let mut out = [0.0f32; 16];
            // out holds sixteen f32; unaligned store.
            _mm512_storeu_ps(out.as_mut_ptr(), v);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize, quantize_activation, repack::repack, vec_dot_x8_scalar};
    use crate::testing::rand_vec;

    /// The 512-bit kernels equal the scalar reference bit for bit on random weights and
    /// activations of 1..=4 blocks, for one to four activation rows and eight (the most
    /// [`rows_per_call`] asks).
    #[test]
    fn x16_kernels_equal_the_scalar_reference() {
        if !has_avx512_vnni() {
            eprintln!("no AVX-512 F/BW/VNNI on this CPU (or HERD_NO_AVX512): nothing to compare");
            return;
        }
        fn check<const N: usize>(
            t: DType,
            g: &[u8],
            acts: &[Vec<u8>],
            sums: &[Vec<i32>],
            k: usize,
        ) {
            let half = g.len() / 2;
            let a: [&[u8]; N] = std::array::from_fn(|r| &acts[r][..]);
            let s: [&[i32]; N] = std::array::from_fn(|r| &sums[r][..]);
            let got = rows_x16(t, &g[..half], &g[half..], a, s, k).unwrap();
            let want0 = vec_dot_x8_scalar(t, &g[..half], a, k);
            let want1 = vec_dot_x8_scalar(t, &g[half..], a, k);
            for r in 0..N {
                for m in 0..16 {
                    let want = if m < 8 { want0[r][m] } else { want1[r][m - 8] };
                    assert_eq!(
                        got[r][m].to_bits(),
                        want.to_bits(),
                        "{t}: N {N}, k {k}, row {m}"
                    );
                }
            }
        }
        for t in crate::quant::repack::GROUP_TYPES {
            for nb in 1..=4 {
                let k = t.block_size() * nb;
                let mut wq = vec![0u8; t.bytes_for(16 * k)];
                quantize(t, &rand_vec(16 * k, 80 + nb as u64, 3.0), &mut wq);
                let g = repack(t, &wq, 16, k);
                let at = t.vec_dot_type();
                let acts: Vec<Vec<u8>> = (0..8)
                    .map(|r| {
                        let mut a = vec![0u8; at.bytes_for(k)];
                        quantize_activation(at, &rand_vec(k, 90 + r, 1.0 + r as f32), &mut a);
                        a
                    })
                    .collect();
                let sums: Vec<Vec<i32>> = acts
                    .iter()
                    .map(|a| {
                        let mut s = Vec::new();
                        if crate::quant::x8_wants_block_sums(t) {
                            crate::quant::q8_0_block_sums(a, k, &mut s);
                        }
                        s
                    })
                    .collect();
                check::<1>(t, &g, &acts, &sums, k);
                check::<2>(t, &g, &acts, &sums, k);
                check::<3>(t, &g, &acts, &sums, k);
                check::<4>(t, &g, &acts, &sums, k);
                check::<8>(t, &g, &acts, &sums, k);
            }
        }
        // Q6_K blocks of random bytes (any bytes are a valid block: every quant, high-bit
        // pattern and sub-block scale from −128 to 127 occurs, rows differing), `d` finite,
        // against activations at ±127 in places.
        let t = DType::Q6K;
        for nb in 1..=5 {
            let k = 256 * nb;
            let mut wq: Vec<u8> = rand_vec(16 * 210 * nb, 95 + nb as u64, 1.0)
                .iter()
                .map(|x| (x.to_bits() >> 7) as u8)
                .collect();
            for blk in wq.chunks_exact_mut(210) {
                blk[208..210].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            }
            let g = repack(t, &wq, 16, k);
            let acts: Vec<Vec<u8>> = (0..4)
                .map(|r| {
                    let mut x = rand_vec(k, 99 + r, 1.0);
                    x.iter_mut().step_by(5).for_each(|v| *v = v.signum() * 4.0);
                    let mut a = vec![0u8; DType::Q8K.bytes_for(k)];
                    quantize_activation(DType::Q8K, &x, &mut a);
                    a
                })
                .collect();
            let sums = vec![Vec::new(); 4];
            check::<1>(t, &g, &acts, &sums, k);
            check::<4>(t, &g, &acts, &sums, k);
        }
    }
}
