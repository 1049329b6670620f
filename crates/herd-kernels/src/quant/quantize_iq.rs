//! f32 → IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S blocks: ggml's quantizers
//! (`quantize_row_iq*_impl` and their helpers in ggml-quants.c, llama.cpp 0c1e57098) step for
//! step, in the same f32 operations and order, so the bytes equal what `llama-quantize` writes.
//! (ggml builds these in ggml-base, for the plain x86-64 target: no fused multiply-add, and Rust
//! never fuses implicitly.)
//!
//! The shape all of them share: each 8 (IQ1, IQ2) or 4 (IQ3) magnitudes are one point of a
//! lattice subset (the type's grid, `iq_tables`). A block's scale is searched over a few
//! candidates; at each, every group is rounded to its level code and, when the code is not a
//! grid point, replaced by the best of its precomputed nearest grid points (ggml's
//! `kmap`/`kneighbors` tables, built here by [`Lattice::new`] as `iq2xs_init_impl` and
//! `iq3xs_init_impl` build them). IQ1 types choose each value among three levels exactly, by
//! sorting the block and trying every split. Weights are the importance matrix's entries times
//! `sqrt(σ² + x²)` (σ² from the super-block's mean square), or without a matrix the types'
//! fallbacks; IQ2_XXS, IQ2_XS and IQ1_S require a matrix, as in ggml.
//!
//! Where ggml would abort (a group whose every neighbour scores NaN or infinity, which only
//! non-finite input reaches), herd takes the first neighbour instead of panicking.
//! One ggml quirk is kept because it is in the files: IQ3_S advances its grid-index and sign
//! pointers only past blocks that are not all zero, so after an all-zero 32 values the later
//! blocks' low index bytes and signs sit 8 and 4 bytes early (its high index bits do not move).

use std::sync::OnceLock;

use super::iq_tables::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID};
use super::quantize::make_qp_quants;
use super::{QK_K, nearest_int, put_f16};
use crate::DType;

/// ggml's `GROUP_MAX_EPS*`: groups whose largest magnitude is below them quantize to zero.
const GROUP_MAX_EPS: f32 = 1e-15;
const GROUP_MAX_EPS_IQ3_XXS: f32 = 1e-8;
const GROUP_MAX_EPS_IQ2_S: f32 = 1e-8;
const GROUP_MAX_EPS_IQ1_M: f32 = 1e-7;
const GROUP_MAX_EPS_IQ1_S: f32 = 1e-12;
/// ggml's `IQ1S_DELTA` = `IQ1M_DELTA`.
const IQ1_DELTA: f32 = 0.125;

/// Whether [`quantize_iq`] writes `dtype`.
pub(crate) fn is_lattice_type(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::IQ1S
            | DType::IQ1M
            | DType::IQ2XXS
            | DType::IQ2XS
            | DType::IQ2S
            | DType::IQ3XXS
            | DType::IQ3S
    )
}

/// Whether ggml's quantizer for `dtype` needs an importance matrix
/// (`ggml_quantize_requires_imatrix`).
pub fn requires_importance(dtype: DType) -> bool {
    matches!(dtype, DType::IQ2XXS | DType::IQ2XS | DType::IQ1S)
}

/// Quantize one super-block `x` (256 values) of a lattice type into `b` (`dtype.type_size()`
/// bytes), with the importances `qw` of its 256 columns when given.
///
/// Panics if `dtype` is not a lattice type, the lengths are wrong, or the type requires
/// importances and `qw` is `None`.
pub(crate) fn quantize_iq(dtype: DType, x: &[f32], qw: Option<&[f32]>, b: &mut [u8]) {
    assert_eq!(x.len(), QK_K, "quantize_iq: one super-block at a time");
    assert_eq!(b.len(), dtype.type_size(), "quantize_iq: block size");
    if let Some(qw) = qw {
        assert_eq!(qw.len(), QK_K, "quantize_iq: importances per column");
    }
    assert!(
        qw.is_some() || !requires_importance(dtype),
        "{dtype} needs an importance matrix"
    );
    b.fill(0);
    match dtype {
        DType::IQ2XXS => iq2_xxs(x, qw.expect("checked above"), b),
        DType::IQ2XS => iq2_xs_s(DType::IQ2XS, x, qw, b),
        DType::IQ2S => iq2_xs_s(DType::IQ2S, x, qw, b),
        DType::IQ3XXS => iq3_xxs(x, qw, b),
        DType::IQ3S => iq3_s(x, qw, b),
        DType::IQ1S => iq1_s(x, qw.expect("checked above"), b),
        DType::IQ1M => iq1_m(x, qw, b),
        other => panic!("{other} is not a lattice type"),
    }
}

/// Where a level code lies: on the grid, or off it with its nearest grid points.
#[derive(Clone, Copy)]
enum Slot {
    /// A code no quantizer forms (a level above the clamp).
    Unused,
    OnGrid(u16),
    /// `neighbours[start..start + len]`.
    Near {
        start: u32,
        len: u16,
    },
}

/// A type's grid as ggml's quantizers search it: each point's coordinates as `2l + 1` for its
/// level `l` (`kgrid_q2xs`/`kgrid_q3xs`), where the level is the rank of the grid's value among
/// the type's distinct values (checked equal to ggml's `kgrid_*` tables by
/// tests/fixtures/gen/gen_iq_tables.py); for every level code off the grid, the grid points at
/// the `nwant` smallest squared distances, nearest first, ties by index (`kneighbors`).
struct Lattice {
    dim: usize,
    bits: u32,
    points: Vec<[i8; 8]>,
    slots: Vec<Slot>,
    neighbours: Vec<u16>,
}

impl Lattice {
    /// `raw`: each grid entry's coordinates as the table stores them (ordered as the levels).
    /// Codes are formed with levels `0..=max_level` only.
    fn new(raw: &[[i16; 8]], dim: usize, bits: u32, max_level: u8, nwant: usize) -> Lattice {
        let mut values: Vec<i16> = raw.iter().flat_map(|p| p[..dim].to_vec()).collect();
        values.sort_unstable();
        values.dedup();
        let level = |v: i16| values.binary_search(&v).expect("a grid value") as i8;
        let points: Vec<[i8; 8]> = raw
            .iter()
            .map(|p| std::array::from_fn(|i| if i < dim { 2 * level(p[i]) + 1 } else { 0 }))
            .collect();
        let code = |p: &[i8; 8]| {
            (0..dim).fold(0usize, |u, i| {
                u | (((p[i] - 1) / 2) as usize) << (bits as usize * i)
            })
        };
        let mut slots = vec![Slot::Unused; 1 << (bits as usize * dim)];
        for (j, p) in points.iter().enumerate() {
            slots[code(p)] = Slot::OnGrid(j as u16);
        }
        let mask = (1usize << bits) - 1;
        let mut neighbours = Vec::new();
        let mut dist: Vec<(i32, u16)> = Vec::with_capacity(points.len());
        for (u, slot) in slots.iter_mut().enumerate() {
            let levels: Vec<i8> = (0..dim)
                .map(|k| ((u >> (bits as usize * k)) & mask) as i8)
                .collect();
            if matches!(slot, Slot::OnGrid(_)) || levels.iter().any(|&l| l as u8 > max_level) {
                continue;
            }
            dist.clear();
            dist.extend(points.iter().enumerate().map(|(j, pg)| {
                let d2 = (0..dim)
                    .map(|k| {
                        let d = (pg[k] - (2 * levels[k] + 1)) as i32;
                        d * d
                    })
                    .sum::<i32>();
                (d2, j as u16)
            }));
            dist.sort_unstable();
            let start = neighbours.len();
            let (mut d2, mut nhave) = (dist[0].0, 1);
            for &(d, j) in &dist {
                if d > d2 {
                    if nhave == nwant {
                        break;
                    }
                    d2 = d;
                    nhave += 1;
                }
                neighbours.push(j);
            }
            *slot = Slot::Near {
                start: start as u32,
                len: (neighbours.len() - start) as u16,
            };
        }
        Lattice {
            dim,
            bits,
            points,
            slots,
            neighbours,
        }
    }

    /// The level code of `l` (one group's levels).
    fn code(&self, l: &[i8]) -> usize {
        l.iter()
            .enumerate()
            .fold(0, |u, (i, &v)| u | (v as usize) << (self.bits as usize * i))
    }

    /// The grid index of code `u`, or its neighbours.
    fn lookup(&self, u: usize) -> Result<usize, &[u16]> {
        match self.slots[u] {
            Slot::OnGrid(j) => Ok(j as usize),
            Slot::Near { start, len } => {
                Err(&self.neighbours[start as usize..start as usize + len as usize])
            }
            Slot::Unused => unreachable!("level code {u:#x} above the quantizer's clamp"),
        }
    }

    /// The levels `(2l + 1 − 1) / 2` of grid point `j` into `l`.
    fn levels_of(&self, j: usize, l: &mut [i8]) {
        for (o, &p) in l.iter_mut().zip(&self.points[j][..self.dim]) {
            *o = (p - 1) / 2;
        }
    }

    /// ggml's `iq2_find_best_neighbour` / `iq3_find_best_neighbour`: the neighbour minimizing
    /// `Σ w·(scale·q − x)²`, its levels written to `l`.
    fn best_neighbour(
        &self,
        list: &[u16],
        xval: &[f32],
        w: &[f32],
        scale: f32,
        l: &mut [i8],
    ) -> usize {
        let mut best_d2 = f32::MAX;
        let mut best = list[0] as usize;
        for &j in list {
            let pg = &self.points[j as usize];
            let mut d2 = 0.0f32;
            for i in 0..self.dim {
                let diff = scale * pg[i] as f32 - xval[i];
                d2 += w[i] * diff * diff;
            }
            if d2 < best_d2 {
                best_d2 = d2;
                best = j as usize;
            }
        }
        self.levels_of(best, l);
        best
    }

    /// The grid index for the levels in `l`, replacing them by the best neighbour's when they are
    /// off the grid (scored at `scale` against `xval` with weights `w`). Returns (index, was on
    /// the grid).
    fn snap(&self, xval: &[f32], w: &[f32], scale: f32, l: &mut [i8]) -> (usize, bool) {
        match self.lookup(self.code(l)) {
            Ok(j) => (j, true),
            Err(list) => (self.best_neighbour(list, xval, w, scale, l), false),
        }
    }

    /// ggml's scale search (its loop over `is`): at each candidate inverse scale `id`, every
    /// group's levels are rounded (clamped to `max_level`) and snapped at `1/id`; the candidate
    /// with the best weighted fit `(Σwxq)²/Σwq²` (q = 2l + 1) gives the scale, the levels `l`
    /// and which groups were on the grid. Returns `scale` unchanged if no candidate fits.
    fn search(
        &self,
        ids: impl Iterator<Item = f32>,
        mut scale: f32,
        (max_level, xval, weight, waux): BlockArgs<'_>,
        l: &mut [i8],
        on_grid: &mut [bool],
    ) -> f32 {
        let n = xval.len();
        let mut best = 0.0f32;
        let (mut laux, mut on_grid_aux) = ([0i8; 32], [true; 8]);
        for id in ids {
            let this_scale = 1.0 / id;
            for (k, on) in on_grid_aux[..n / self.dim].iter_mut().enumerate() {
                let g = self.dim * k..self.dim * (k + 1);
                round_levels(id, &xval[g.clone()], max_level, &mut laux[g.clone()]);
                *on = self
                    .snap(&xval[g.clone()], &waux[g.clone()], this_scale, &mut laux[g])
                    .1;
            }
            let (sumqx, sumq2) = sums_odd(weight, xval, &laux[..n]);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                l.copy_from_slice(&laux[..n]);
                on_grid.copy_from_slice(&on_grid_aux[..n / self.dim]);
            }
        }
        scale
    }

    /// ggml's second pass: the groups `redo` selects rounded again at `scale` and snapped to
    /// the grid, then the scale refit over all levels (kept when `Σwq² = 0`).
    fn refit(
        &self,
        scale: f32,
        (max_level, xval, weight, waux): BlockArgs<'_>,
        l: &mut [i8],
        redo: impl Fn(usize) -> bool,
    ) -> f32 {
        let id = 1.0 / scale;
        for k in (0..xval.len() / self.dim).filter(|&k| redo(k)) {
            let g = self.dim * k..self.dim * (k + 1);
            round_levels(id, &xval[g.clone()], max_level, &mut l[g.clone()]);
            self.snap(&xval[g.clone()], &waux[g.clone()], scale, &mut l[g]);
        }
        let (sumqx, sumq2) = sums_odd(weight, xval, l);
        if sumq2 > 0.0 { sumqx / sumq2 } else { scale }
    }

    /// One block's fit as every lattice quantizer does it: [`Lattice::search`] over `ids` from
    /// `start.scale`, the second pass [`Lattice::refit`] as `start.refit` says (only when the
    /// scale is positive), and a negative scale made positive by flipping the block's sign
    /// masks (`!s & sign_mask`: 127 for 7-bit even-parity signs, 255 for whole bytes). Returns
    /// the scale; `l` holds the block's grid points.
    fn fit_block(
        &self,
        ids: impl Iterator<Item = f32>,
        start: Fit,
        args: BlockArgs<'_>,
        l: &mut [i8],
        signs: &mut [u8],
        sign_mask: u8,
    ) -> f32 {
        let (_, xval, _, _) = args;
        let mut on_grid = [start.on_grid; 8];
        let on_grid = &mut on_grid[..xval.len() / self.dim];
        let mut scale = self.search(ids, start.scale, args, l, on_grid);
        let any_off = on_grid.contains(&false);
        if scale > 0.0 {
            scale = match start.refit {
                Refit::All => self.refit(scale, args, l, |_| true),
                Refit::AllIfAnyOff if any_off => self.refit(scale, args, l, |_| true),
                Refit::OffGrid if any_off => self.refit(scale, args, l, |k| !on_grid[k]),
                _ => scale,
            };
        }
        if scale < 0.0 {
            scale = -scale;
            for s in signs {
                *s = !*s & sign_mask;
            }
        }
        scale
    }
}

/// How [`Lattice::fit_block`] starts: the scale kept if no candidate fits, whether groups count
/// as on the grid before the search, and which groups the second pass re-snaps.
#[derive(Clone, Copy)]
struct Fit {
    scale: f32,
    on_grid: bool,
    refit: Refit,
}

/// Which groups ggml's second pass rounds again at the chosen scale.
#[derive(Clone, Copy)]
enum Refit {
    /// Every group, always (IQ2_XXS).
    All,
    /// Every group, when any was off the grid (IQ3_S).
    AllIfAnyOff,
    /// The groups that were off the grid (IQ2_XS, IQ2_S, IQ3_XXS).
    OffGrid,
}

/// A block's values, weights and second weights as [`Lattice::search`] reads them, with the
/// largest level: `(max_level, xval, weight, waux)`.
type BlockArgs<'a> = (i32, &'a [f32], &'a [f32], &'a [f32]);

fn grid_rows_u64(t: &[u64], signed: bool) -> Vec<[i16; 8]> {
    t.iter()
        .map(|&v| {
            std::array::from_fn(|i| {
                let b = (v >> (8 * i)) as u8;
                if signed { b as i8 as i16 } else { b as i16 }
            })
        })
        .collect()
}

fn grid_rows_u32(t: &[u32]) -> Vec<[i16; 8]> {
    t.iter()
        .map(|&v| {
            std::array::from_fn(|i| {
                if i < 4 {
                    (v >> (8 * i)) as u8 as i16
                } else {
                    0
                }
            })
        })
        .collect()
}

/// The lattice of `dtype`, built once (ggml's `nwant`: 2 for IQ2_XXS, IQ2_XS and IQ3_XXS, 1 for
/// IQ2_S, 3 for IQ1 and IQ3_S).
fn lattice(dtype: DType) -> &'static Lattice {
    static CELLS: [OnceLock<Lattice>; 6] = [const { OnceLock::new() }; 6];
    let (i, build): (usize, fn() -> Lattice) = match dtype {
        DType::IQ2XXS => (0, || {
            Lattice::new(&grid_rows_u64(&IQ2XXS_GRID, false), 8, 2, 2, 2)
        }),
        DType::IQ2XS => (1, || {
            Lattice::new(&grid_rows_u64(&IQ2XS_GRID, false), 8, 2, 2, 2)
        }),
        DType::IQ2S => (2, || {
            Lattice::new(&grid_rows_u64(&IQ2S_GRID, false), 8, 2, 2, 1)
        }),
        DType::IQ1S | DType::IQ1M => (3, || {
            Lattice::new(&grid_rows_u64(&IQ1S_GRID, true), 8, 2, 2, 3)
        }),
        DType::IQ3XXS => (4, || Lattice::new(&grid_rows_u32(&IQ3XXS_GRID), 4, 3, 7, 2)),
        DType::IQ3S => (5, || Lattice::new(&grid_rows_u32(&IQ3S_GRID), 4, 3, 7, 3)),
        other => unreachable!("{other} has no lattice"),
    };
    CELLS[i].get_or_init(build)
}

/// `Σx²` of the super-block, ggml's left-to-right f32 sum.
fn sum_squares(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |s, v| s + v * v)
}

/// Weights `qw·sqrt(σ² + x²)` with importances, else `fallback(x)`.
fn weights(
    xb: &[f32],
    qw: Option<&[f32]>,
    sigma2: f32,
    fallback: impl Fn(f32) -> f32,
    w: &mut [f32],
) {
    for (i, (o, &v)) in w.iter_mut().zip(xb).enumerate() {
        *o = match qw {
            Some(qw) => qw[i] * (sigma2 + v * v).sqrt(),
            None => fallback(v),
        };
    }
}

/// ggml's block prologue: the weights ([`weights`]) and their square roots (the neighbour
/// search's), the magnitudes with one sign mask per 8 values ([`signs_of`]), and the largest
/// magnitude.
fn prologue(
    xb: &[f32],
    qw: Option<&[f32]>,
    sigma2: f32,
    fallback: impl Fn(f32) -> f32,
    even: bool,
    (weight, waux, xval): (&mut [f32], &mut [f32], &mut [f32]),
    signs: &mut [u8],
) -> f32 {
    weights(xb, qw, sigma2, fallback, weight);
    for (r, w) in waux.iter_mut().zip(weight.iter()) {
        *r = w.sqrt();
    }
    for (k, s) in signs.iter_mut().enumerate() {
        *s = signs_of(&xb[8 * k..], &weight[8 * k..], even, &mut xval[8 * k..]);
    }
    max_of(xval)
}

/// Magnitudes of 8 values into `xval` and their sign bits. With `even`, an odd count of
/// negatives flips the least important value's sign (so 7 bits hold the signs, ggml's
/// `ksigns` parity), keeping its magnitude negated.
fn signs_of(xb: &[f32], w: &[f32], even: bool, xval: &mut [f32]) -> u8 {
    let mut s = 0u8;
    let mut nflip = 0;
    for i in 0..8 {
        if xb[i] >= 0.0 {
            xval[i] = xb[i];
        } else {
            xval[i] = -xb[i];
            nflip += 1;
            s |= 1 << i;
        }
    }
    if even && nflip % 2 == 1 {
        let mut imin = 0;
        let mut min = w[0] * xb[0] * xb[0];
        for i in 1..8 {
            let ax = w[i] * xb[i] * xb[i];
            if ax < min {
                min = ax;
                imin = i;
            }
        }
        xval[imin] = -xval[imin];
        s ^= 1 << imin;
    }
    if even { s & 127 } else { s }
}

/// `max` over `v` as ggml's `MAX` chain from `v[0]`.
fn max_of(v: &[f32]) -> f32 {
    v[1..].iter().fold(v[0], |m, &x| if m > x { m } else { x })
}

/// `(Σ w·x·q, Σ w·q²)` for `q = 2l + 1`.
fn sums_odd(w: &[f32], xval: &[f32], l: &[i8]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for i in 0..w.len() {
        let q = (2 * l[i] + 1) as f32;
        sumqx += w[i] * xval[i] * q;
        sumq2 += w[i] * q * q;
    }
    (sumqx, sumq2)
}

/// Levels `clamp(round((id·x − 1)/2), 0, max)` of one group into `l`.
fn round_levels(id: f32, xval: &[f32], max: i32, l: &mut [i8]) {
    for (o, &v) in l.iter_mut().zip(xval) {
        *o = nearest_int(0.5 * (id * v - 1.0)).clamp(0, max) as i8;
    }
}

/// The 4-bit block scale `clamp(round((s/d − 1)/2), 0, 15)` (`id` = 1/d).
fn scale_nibble(id: f32, s: f32) -> u32 {
    nearest_int(0.5 * (id * s - 1.0)).clamp(0, 15) as u32
}

/// ggml's `quantize_row_iq2_xxs_impl`: 32-value blocks, scale seeded by `make_qp_quants`,
/// 13 candidates, then every group re-snapped at the chosen scale.
fn iq2_xxs(x: &[f32], qw: &[f32], b: &mut [u8]) {
    const K_MAX_Q: i32 = 3;
    let grid = lattice(DType::IQ2XXS);
    let sigma2 = sum_squares(x) / QK_K as f32;
    let mut scales = [0.0f32; QK_K / 32];
    let mut q2 = [0u32; 2 * QK_K / 32];
    let mut max_scale = 0.0f32;
    let (mut weight, mut waux, mut xval) = ([0.0f32; 32], [0.0f32; 32], [0.0f32; 32]);
    for ib in 0..QK_K / 32 {
        let xb = &x[32 * ib..32 * ib + 32];
        let mut block_signs = [0u8; 4];
        let max = prologue(
            xb,
            Some(&qw[32 * ib..]),
            sigma2,
            |_| 0.0,
            true,
            (&mut weight, &mut waux, &mut xval),
            &mut block_signs,
        );
        if max < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        let mut lu = [0u8; 32];
        let scale = make_qp_quants(K_MAX_Q + 1, &xval, &mut lu, &weight);
        let eff_max = scale * K_MAX_Q as f32;
        if eff_max <= 0.0 {
            scales[ib] = 0.0;
            continue;
        }
        let mut l = lu.map(|v| v as i8);
        let ids = (-6..=6).map(|is| ((2 * K_MAX_Q - 1) as f32 + is as f32 * 0.1) / eff_max);
        let start = Fit {
            scale,
            on_grid: true,
            refit: Refit::All,
        };
        let block = (K_MAX_Q - 1, &xval[..], &weight[..], &waux[..]);
        let scale = grid.fit_block(ids, start, block, &mut l, &mut block_signs, 127);
        for k in 0..4 {
            let j = grid_index_of(grid, &l[8 * k..8 * k + 8]);
            q2[2 * ib] |= (j as u32) << (8 * k);
            q2[2 * ib + 1] |= (block_signs[k] as u32) << (7 * k);
        }
        scales[ib] = scale;
        max_scale = max_scale.max(scale);
    }
    if max_scale == 0.0 {
        return;
    }
    let d = max_scale / 31.0;
    put_f16(b, 0, d);
    let id = 1.0 / d;
    for ib in 0..QK_K / 32 {
        q2[2 * ib + 1] |= scale_nibble(id, scales[ib]) << 28;
    }
    for (o, v) in b[2..].chunks_exact_mut(4).zip(q2) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

/// The grid index of levels that are on the grid (ggml aborts otherwise; the searches above
/// only leave grid points).
fn grid_index_of(grid: &Lattice, l: &[i8]) -> usize {
    grid.lookup(grid.code(l))
        .expect("the scale search leaves every group on the grid")
}

/// ggml's `quantize_row_iq2_xs_impl` and `quantize_row_iq2_s_impl`: 16-value blocks, 19
/// candidate scales, off-grid groups re-snapped at the chosen one. They differ in the weights
/// without a matrix (IQ2_S: `σ²/4 + x²`; IQ2_XS requires a matrix), σ² (IQ2_S doubles it), the
/// sign parity (IQ2_XS stores 7 bits), the zero threshold, and the layout.
fn iq2_xs_s(dtype: DType, x: &[f32], qw: Option<&[f32]>, b: &mut [u8]) {
    const K_MAX_Q: i32 = 3;
    let is_s = dtype == DType::IQ2S;
    let grid = lattice(dtype);
    let sigma2 = if is_s {
        2.0 * sum_squares(x) / QK_K as f32
    } else {
        sum_squares(x) / QK_K as f32
    };
    let eps = if is_s {
        GROUP_MAX_EPS_IQ2_S
    } else {
        GROUP_MAX_EPS
    };
    let mut scales = [0.0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let (mut weight, mut waux, mut xval) = ([0.0f32; 16], [0.0f32; 16], [0.0f32; 16]);
    for ib in 0..QK_K / 16 {
        let xb = &x[16 * ib..16 * ib + 16];
        let mut block_signs = [0u8; 2];
        let max = prologue(
            xb,
            qw.map(|q| &q[16 * ib..]),
            sigma2,
            |v| 0.25 * sigma2 + v * v,
            !is_s,
            (&mut weight, &mut waux, &mut xval),
            &mut block_signs,
        );
        let mut l = [0i8; 16];
        if max < eps {
            scales[ib] = 0.0;
            continue;
        }
        let ids = (-9..=9).map(|is| ((2 * K_MAX_Q - 1) as f32 + is as f32 * 0.1) / max);
        let start = Fit {
            scale: max / (2 * K_MAX_Q - 1) as f32,
            on_grid: true,
            refit: Refit::OffGrid,
        };
        let block = (K_MAX_Q - 1, &xval[..], &weight[..], &waux[..]);
        let sign_mask = if is_s { 255 } else { 127 };
        let scale = grid.fit_block(ids, start, block, &mut l, &mut block_signs, sign_mask);
        for k in 0..2 {
            let j = grid_index_of(grid, &l[8 * k..8 * k + 8]);
            let i8 = 2 * ib + k;
            if is_s {
                // d@0, 32 low index bytes @2, 32 sign bytes @34, 8 high-bit bytes @66.
                b[2 + i8] = j as u8;
                b[66 + i8 / 4] |= ((j >> 8) << (2 * (i8 % 4))) as u8;
                b[34 + i8] = block_signs[k];
            } else {
                // d@0, 32 × u16 (9-bit index, 7-bit signs) @2.
                let v = j as u16 | (block_signs[k] as u16) << 9;
                b[2 + 2 * i8..4 + 2 * i8].copy_from_slice(&v.to_le_bytes());
            }
        }
        scales[ib] = scale;
        max_scale = max_scale.max(scale);
    }
    if max_scale == 0.0 {
        if !is_s {
            b.fill(0);
        }
        return;
    }
    let d = max_scale / 31.0;
    put_f16(b, 0, if is_s { d * 0.9875 } else { d });
    let id = 1.0 / d;
    let at = if is_s { 74 } else { 66 };
    for ib in 0..QK_K / 16 {
        b[at + ib / 2] |= (scale_nibble(id, scales[ib]) << (4 * (ib % 2))) as u8;
    }
}

/// ggml's `quantize_row_iq3_xxs_impl` (grid size 256): 32-value blocks of 4-value groups, 31
/// candidate scales, off-grid groups re-snapped at the chosen one.
fn iq3_xxs(x: &[f32], qw: Option<&[f32]>, b: &mut [u8]) {
    const K_MAX_Q: i32 = 8;
    let grid = lattice(DType::IQ3XXS);
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let mut scales = [0.0f32; QK_K / 32];
    let mut signs_and_scales = [0u32; QK_K / 32];
    let mut max_scale = 0.0f32;
    let (mut weight, mut waux, mut xval) = ([0.0f32; 32], [0.0f32; 32], [0.0f32; 32]);
    for ib in 0..QK_K / 32 {
        let xb = &x[32 * ib..32 * ib + 32];
        let mut block_signs = [0u8; 4];
        let max = prologue(
            xb,
            qw.map(|q| &q[32 * ib..]),
            sigma2,
            |v| v * v,
            true,
            (&mut weight, &mut waux, &mut xval),
            &mut block_signs,
        );
        let mut l = [0i8; 32];
        if max < GROUP_MAX_EPS_IQ3_XXS {
            scales[ib] = 0.0;
            continue;
        }
        let ids = (-15..=15).map(|is| ((2 * K_MAX_Q - 1) as f32 + is as f32 * 0.2) / max);
        let start = Fit {
            scale: max / (2 * K_MAX_Q - 1) as f32,
            on_grid: true,
            refit: Refit::OffGrid,
        };
        let block = (K_MAX_Q - 1, &xval[..], &weight[..], &waux[..]);
        let scale = grid.fit_block(ids, start, block, &mut l, &mut block_signs, 127);
        for k in 0..8 {
            // d@0, 64 index bytes @2.
            b[2 + 8 * ib + k] = grid_index_of(grid, &l[4 * k..4 * k + 4]) as u8;
        }
        signs_and_scales[ib] = block_signs[0] as u32
            | (block_signs[1] as u32) << 7
            | (block_signs[2] as u32) << 14
            | (block_signs[3] as u32) << 21;
        scales[ib] = scale;
        max_scale = max_scale.max(scale);
    }
    if max_scale == 0.0 {
        b.fill(0);
        return;
    }
    let d = max_scale / 31.0;
    put_f16(b, 0, d * 1.0125);
    let id = 1.0 / d;
    for ib in 0..QK_K / 32 {
        let v = signs_and_scales[ib] | scale_nibble(id, scales[ib]) << 28;
        // 8 × u32 of signs and scale @66.
        b[66 + 4 * ib..70 + 4 * ib].copy_from_slice(&v.to_le_bytes());
    }
}

/// ggml's `quantize_row_iq3_s_impl` (`IQ3S_BLOCK_SIZE` 32): 32-value blocks of 4-value groups,
/// 19 candidate scales, all groups re-snapped when any is off the grid; 8 sign bits per 8
/// values. Layout: d@0, 64 low index bytes @2, 8 high-bit bytes @66, 32 sign bytes @74,
/// 4 scale bytes @106.
fn iq3_s(x: &[f32], qw: Option<&[f32]>, b: &mut [u8]) {
    const K_MAX_Q: i32 = 8;
    let grid = lattice(DType::IQ3S);
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let mut scales = [0.0f32; QK_K / 32];
    let mut max_scale = 0.0f32;
    // ggml's `qs` and `signs` pointers, advanced past non-zero blocks only (module docs).
    let (mut qs_at, mut signs_at) = (2usize, 74usize);
    let (mut weight, mut waux, mut xval) = ([0.0f32; 32], [0.0f32; 32], [0.0f32; 32]);
    for ib in 0..QK_K / 32 {
        let xb = &x[32 * ib..32 * ib + 32];
        let mut block_signs = [0u8; 4];
        let max = prologue(
            xb,
            qw.map(|q| &q[32 * ib..]),
            sigma2,
            |v| v * v,
            false,
            (&mut weight, &mut waux, &mut xval),
            &mut block_signs,
        );
        let mut l = [0i8; 32];
        if max == 0.0 {
            scales[ib] = 0.0;
            continue;
        }
        let ids = (-9..=9).map(|is| ((2 * K_MAX_Q - 1) as f32 + is as f32 * 0.2) / max);
        // ggml starts IQ3_S's groups off the grid: with no fitting candidate, all are re-snapped.
        let start = Fit {
            scale: max / (2 * K_MAX_Q - 1) as f32,
            on_grid: false,
            refit: Refit::AllIfAnyOff,
        };
        let block = (K_MAX_Q - 1, &xval[..], &weight[..], &waux[..]);
        let scale = grid.fit_block(ids, start, block, &mut l, &mut block_signs, 255);
        for k in 0..8 {
            let j = grid_index_of(grid, &l[4 * k..4 * k + 4]);
            b[qs_at + k] = j as u8;
            b[66 + (8 * ib + k) / 8] |= ((j >> 8) << ((8 * ib + k) % 8)) as u8;
        }
        qs_at += 8;
        b[signs_at..signs_at + 4].copy_from_slice(&block_signs);
        signs_at += 4;
        scales[ib] = scale;
        max_scale = max_scale.max(scale);
    }
    if max_scale == 0.0 {
        return;
    }
    let d = max_scale / 31.0;
    put_f16(b, 0, d * 1.033);
    let id = 1.0 / d;
    for ib in (0..QK_K / 32).step_by(2) {
        let v = scale_nibble(id, scales[ib]) | scale_nibble(id, scales[ib + 1]) << 4;
        b[106 + ib / 2] = v as u8;
    }
}

/// The block's values sorted ascending with their positions (ggml sorts `(x, i)` pairs with
/// `qsort` on `x` alone; glibc's `qsort` is a stable merge sort, as is `sort_by` here).
fn sorted_positions<const N: usize>(xb: &[f32]) -> [usize; N] {
    let mut idx: [usize; N] = std::array::from_fn(|i| i);
    idx.sort_by(|&a, &b| {
        xb[a]
            .partial_cmp(&xb[b])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    idx
}

/// ggml's `iq1_find_best_neighbour2`: the neighbour minimizing `Σ w·(scale·xg[l] − x)²`.
fn iq1_best_neighbour(
    grid: &Lattice,
    list: &[u16],
    xb: &[f32],
    w: &[f32],
    scale: f32,
    xg: &[f32; 3],
    l: &mut [i8],
) -> usize {
    let mut best_d2 = f32::MAX;
    let mut best = list[0] as usize;
    for &j in list {
        let pg = &grid.points[j as usize];
        let mut d2 = 0.0f32;
        for i in 0..8 {
            let q = xg[((pg[i] - 1) / 2) as usize];
            let diff = scale * q - xb[i];
            d2 += w[i] * diff * diff;
        }
        if d2 < best_d2 {
            best_d2 = d2;
            best = j as usize;
        }
    }
    grid.levels_of(best, l);
    best
}

/// The IQ1 groups of 8 levels `l` to grid points `index`: a level code off the grid becomes its
/// best neighbour under the group's values `xx(k)`; if any did, the scale is refit over the
/// chosen points (kept unless both sums are positive). Returns the scale.
fn iq1_snap<'a>(
    grid: &Lattice,
    xb: &[f32],
    weight: &[f32],
    mut scale: f32,
    xx: impl Fn(usize) -> &'a [f32; 3],
    l: &mut [i8],
    index: &mut [usize],
) -> f32 {
    let mut all_on_grid = true;
    for (k, index) in index.iter_mut().enumerate() {
        let g = 8 * k..8 * k + 8;
        *index = match grid.lookup(grid.code(&l[g.clone()])) {
            Ok(j) => j,
            Err(list) => {
                all_on_grid = false;
                iq1_best_neighbour(
                    grid,
                    list,
                    &xb[g.clone()],
                    &weight[g.clone()],
                    scale,
                    xx(k),
                    &mut l[g],
                )
            }
        };
    }
    if !all_on_grid {
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for (k, &j) in index.iter().enumerate() {
            let (xx, pg) = (xx(k), &grid.points[j]);
            for i in 0..8 {
                let w = weight[8 * k + i];
                let q = xx[((pg[i] - 1) / 2) as usize];
                sumqx += w * q * xb[8 * k + i];
                sumq2 += w * q * q;
            }
        }
        if sumqx > 0.0 && sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    scale
}

/// The three IQ1 values with the shift +Δ and −Δ (ggml's `x_p`, `x_m`).
const IQ1_X_P: [f32; 3] = [-1.0 + IQ1_DELTA, IQ1_DELTA, 1.0 + IQ1_DELTA];
const IQ1_X_M: [f32; 3] = [-1.0 - IQ1_DELTA, -IQ1_DELTA, 1.0 - IQ1_DELTA];

/// Levels 0, 1, 2 by the split `(i1, i2)` of the sorted positions.
fn split_levels(idx: &[usize], i1: usize, i2: usize, l: &mut [i8]) {
    for (j, &i) in idx.iter().enumerate() {
        l[i] = if j < i1 {
            0
        } else if j < i2 {
            1
        } else {
            2
        };
    }
}

/// ggml's `quantize_row_iq1_s_impl`: each 32 values split exactly into three levels (every pair
/// of boundaries over the sorted values, with the shift +Δ or −Δ), then the groups of 8 snapped
/// to the grid. Layout: d@0, 32 low index bytes @2, 8 × u16 @34 (four 3-bit high index parts,
/// a 3-bit scale @12, the shift sign @15).
fn iq1_s(x: &[f32], qw: &[f32], b: &mut [u8]) {
    const BS: usize = 32;
    let grid = lattice(DType::IQ1S);
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let mut scales = [0.0f32; QK_K / BS];
    let mut shifts = [0i8; QK_K / BS];
    let mut qh = [0u16; QK_K / BS];
    let mut max_scale = 0.0f32;
    let mut weight = [0.0f32; BS];
    let mut l = [0i8; BS];
    for ib in 0..QK_K / BS {
        let xb = &x[BS * ib..BS * ib + BS];
        weights(xb, Some(&qw[BS * ib..]), sigma2, |_| 0.0, &mut weight);
        let max = xb[1..]
            .iter()
            .fold(xb[0].abs(), |m, v| if m > v.abs() { m } else { v.abs() });
        if max < GROUP_MAX_EPS_IQ1_S {
            scales[ib] = 0.0;
            shifts[ib] = 1;
            continue;
        }
        let idx: [usize; BS] = sorted_positions(xb);
        let (mut sumx, mut sumw) = ([0.0f32; BS + 1], [0.0f32; BS + 1]);
        for j in 0..BS {
            let i = idx[j];
            sumx[j + 1] = sumx[j] + weight[i] * xb[i];
            sumw[j + 1] = sumw[j] + weight[i];
        }
        let mut best_score = -f32::MAX;
        let mut scale = max;
        let (mut besti1, mut besti2, mut best_shift) = (usize::MAX, usize::MAX, 0i8);
        for i1 in 0..=BS {
            for i2 in i1..=BS {
                for (xs, shift) in [(&IQ1_X_P, 1), (&IQ1_X_M, -1)] {
                    let sumqx = (sumx[i1] - sumx[0]) * xs[0]
                        + (sumx[i2] - sumx[i1]) * xs[1]
                        + (sumx[BS] - sumx[i2]) * xs[2];
                    let sumq2 = (sumw[i1] - sumw[0]) * xs[0] * xs[0]
                        + (sumw[i2] - sumw[i1]) * xs[1] * xs[1]
                        + (sumw[BS] - sumw[i2]) * xs[2] * xs[2];
                    if sumq2 > 0.0 && sumqx * sumqx > best_score * sumq2 {
                        scale = sumqx / sumq2;
                        best_score = scale * sumqx;
                        (besti1, besti2, best_shift) = (i1, i2, shift);
                    }
                }
            }
        }
        if besti1 == usize::MAX || best_shift == 0 {
            scales[ib] = 0.0;
            shifts[ib] = 1;
            continue;
        }
        split_levels(&idx, besti1, besti2, &mut l);
        if scale < 0.0 {
            for v in &mut l {
                *v = 2 - *v;
            }
            scale = -scale;
            best_shift = -best_shift;
        }
        let xx = if best_shift == 1 { &IQ1_X_P } else { &IQ1_X_M };
        let mut index = [0usize; BS / 8];
        scale = iq1_snap(grid, xb, &weight, scale, |_| xx, &mut l, &mut index);
        let mut h = 0u16;
        for k in 0..BS / 8 {
            b[2 + (BS / 8) * ib + k] = index[k] as u8;
            h |= ((index[k] >> 8) as u16) << (3 * k);
        }
        qh[ib] = h;
        scales[ib] = scale;
        shifts[ib] = best_shift;
        max_scale = max_scale.max(scale);
    }
    if max_scale != 0.0 {
        let d = max_scale / 15.0;
        put_f16(b, 0, d * 1.125);
        let id = 1.0 / d;
        for ib in 0..QK_K / BS {
            let mut l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 7) as u16;
            if shifts[ib] == -1 {
                l |= 8;
            }
            qh[ib] |= l << 12;
        }
    }
    for (ib, v) in qh.iter().enumerate() {
        b[34 + 2 * ib..36 + 2 * ib].copy_from_slice(&v.to_le_bytes());
    }
}

/// ggml's `quantize_row_iq1_m_impl`: as IQ1_S over 16-value blocks whose two halves each take
/// their own shift sign (four combinations scored at once from per-half prefix sums), then the
/// super-block scale refit over the chosen points. Layout: 32 low index bytes @0, 16 bytes @32
/// (per 16 values: two 3-bit high index parts and the two shift signs 0x08, 0x80), 4 × u16 @48
/// (3-bit scales; their top nibbles hold the f16 `d`).
fn iq1_m(x: &[f32], qw: Option<&[f32]>, b: &mut [u8]) {
    const BS: usize = 16;
    const MASKS: [u8; 4] = [0x00, 0x80, 0x08, 0x88];
    let grid = lattice(DType::IQ1M);
    let (x_p, x_m) = (&IQ1_X_P, &IQ1_X_M);
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let mut scales = [0.0f32; QK_K / BS];
    let mut shifts = [0usize; QK_K / BS];
    let mut max_scale = 0.0f32;
    let mut weight = [0.0f32; BS];
    let mut l = [0i8; BS];
    // The values of group k (0: first 8, 1: second 8) under shift combination `best_k`.
    let shift_values = |best_k: usize, k: usize| {
        let plus = if k == 0 {
            best_k < 2
        } else {
            best_k.is_multiple_of(2)
        };
        if plus { x_p } else { x_m }
    };
    for ib in 0..QK_K / BS {
        let xb = &x[BS * ib..BS * ib + BS];
        weights(
            xb,
            qw.map(|q| &q[BS * ib..]),
            sigma2,
            |v| v * v,
            &mut weight,
        );
        let max = xb[1..]
            .iter()
            .fold(xb[0].abs(), |m, v| if m > v.abs() { m } else { v.abs() });
        if max < GROUP_MAX_EPS_IQ1_M {
            scales[ib] = 0.0;
            shifts[ib] = 0;
            continue;
        }
        let idx: [usize; BS] = sorted_positions(xb);
        let mut best_score = -f32::MAX;
        let mut scale = max;
        let (mut besti1, mut besti2, mut best_k) = (usize::MAX, usize::MAX, usize::MAX);
        let (mut px, mut pw) = ([[0.0f32; BS + 1]; 2], [[0.0f32; BS + 1]; 2]);
        for j in 0..BS {
            let i = idx[j];
            let h = usize::from(i >= BS / 2);
            px[h][j + 1] = px[h][j] + weight[i] * xb[i];
            px[1 - h][j + 1] = px[1 - h][j];
            pw[h][j + 1] = pw[h][j] + weight[i];
            pw[1 - h][j + 1] = pw[1 - h][j];
        }
        let txs = [px[0][BS], px[1][BS]];
        let tws = [pw[0][BS], pw[1][BS]];
        let (p2, m2) = (x_p[2], x_m[2]);
        let cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1];
        let cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2];
        let cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1];
        let cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2];
        for i1 in 0..=BS {
            for i2 in i1..=BS {
                let (mut qx_p, mut qx_m, mut q2_p, mut q2_m) =
                    ([0.0f32; 2], [0.0f32; 2], [0.0f32; 2], [0.0f32; 2]);
                for h in 0..2 {
                    let sx = px[h][i1] + px[h][i2];
                    qx_p[h] = txs[h] * p2 - sx;
                    qx_m[h] = txs[h] * m2 - sx;
                    q2_p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
                    q2_m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
                }
                let sumqx = [
                    qx_p[0] + qx_p[1],
                    qx_p[0] + qx_m[1],
                    qx_m[0] + qx_p[1],
                    qx_m[0] + qx_m[1],
                ];
                let sumq2 = [
                    q2_p[0] + q2_p[1],
                    q2_p[0] + q2_m[1],
                    q2_m[0] + q2_p[1],
                    q2_m[0] + q2_m[1],
                ];
                for k in 0..4 {
                    if sumq2[k] > 0.0 && sumqx[k] * sumqx[k] > best_score * sumq2[k] {
                        scale = sumqx[k] / sumq2[k];
                        best_score = scale * sumqx[k];
                        (besti1, besti2, best_k) = (i1, i2, k);
                    }
                }
            }
        }
        if besti1 == usize::MAX {
            scales[ib] = 0.0;
            shifts[ib] = 0;
            continue;
        }
        split_levels(&idx, besti1, besti2, &mut l);
        if scale < 0.0 {
            for v in &mut l {
                *v = 2 - *v;
            }
            scale = -scale;
            best_k = 3 - best_k;
        }
        let mut index = [0usize; BS / 8];
        let xx = |k| shift_values(best_k, k);
        scale = iq1_snap(grid, xb, &weight, scale, xx, &mut l, &mut index);
        b[2 * ib] = index[0] as u8;
        b[2 * ib + 1] = index[1] as u8;
        b[32 + ib] = ((index[0] >> 8) | ((index[1] >> 8) << 4)) as u8;
        scales[ib] = scale;
        shifts[ib] = best_k;
        max_scale = max_scale.max(scale);
    }
    if max_scale == 0.0 {
        return;
    }
    let mut sc = [0u16; 4];
    let mut d = max_scale / 15.0;
    let id = 1.0 / d;
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for ib in 0..QK_K / BS {
        let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 7);
        sc[ib / 4] |= (l as u16) << (3 * (ib % 4));
        b[32 + ib] |= MASKS[shifts[ib]];
        let xb = &x[BS * ib..BS * ib + BS];
        weights(
            xb,
            qw.map(|q| &q[BS * ib..]),
            sigma2,
            |v| v * v,
            &mut weight,
        );
        for k in 0..BS / 8 {
            let xx = shift_values(shifts[ib], k);
            let j = b[2 * ib + k] as usize + (((b[32 + ib] as usize) << (8 - 4 * k)) & 0x700);
            let pg = &grid.points[j];
            for jj in 0..8 {
                let w = weight[8 * k + jj];
                let q = xx[((pg[jj] - 1) / 2) as usize] * (2 * l + 1) as f32;
                sumqx += w * q * xb[8 * k + jj];
                sumq2 += w * q * q;
            }
        }
    }
    if sumq2 > 0.0 {
        d = sumqx / sumq2;
    }
    let s = half::f16::from_f32(d * 1.1125).to_bits();
    sc[0] |= (s & 0x000f) << 12;
    sc[1] |= (s & 0x00f0) << 8;
    sc[2] |= (s & 0x0f00) << 4;
    sc[3] |= s & 0xf000;
    for (i, v) in sc.iter().enumerate() {
        b[48 + 2 * i..50 + 2 * i].copy_from_slice(&v.to_le_bytes());
    }
}
