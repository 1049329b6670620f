//! f32 → blocks, following ggml's reference quantizers (`quantize_row_*_ref`) step for step, so
//! the bytes equal what llama.cpp writes without an importance matrix. ggml builds these in plain
//! f32 without fused multiply-add; Rust never fuses implicitly, so the arithmetic matches.

pub use super::quantize_iq::requires_importance;
use super::{QK_K, nearest_int, put_f16, scale_min_k4};
use super::{quantize_iq, quantize_weighted};
use crate::DType;

/// Types [`quantize`] can produce: every type herd reads except those whose ggml quantizer
/// requires an importance matrix (IQ2_XXS, IQ2_XS, IQ1_S: [`requires_importance`]), which
/// [`quantize_with_importance`] writes.
pub fn quantize_supported(dtype: DType) -> bool {
    !requires_importance(dtype)
}

/// Types [`quantize_with_importance`] takes an importance matrix for: every quantized type
/// whose ggml quantizer reads one (all but Q8_0, MXFP4 and the activation types).
pub fn importance_supported(dtype: DType) -> bool {
    matches!(dtype, DType::IQ4NL | DType::IQ4XS)
        || quantize_iq::is_lattice_type(dtype)
        || quantize_weighted::is_weighted_type(dtype)
}

/// Quantize one row `x` guided by `importance` (one weight per column, llama-imatrix's mean
/// squared activation), as ggml's quantizers do when given `quant_weights`.
///
/// Panics if `dtype` is not [`importance_supported`] or the lengths differ.
pub fn quantize_with_importance(dtype: DType, x: &[f32], importance: &[f32], out: &mut [u8]) {
    assert!(
        importance_supported(dtype),
        "no importance-guided quantizer for {dtype}"
    );
    assert_eq!(
        x.len(),
        importance.len(),
        "quantize_with_importance: length mismatch"
    );
    assert_eq!(
        out.len(),
        dtype.bytes_for(x.len()),
        "quantize_with_importance: length mismatch"
    );
    if quantize_weighted::is_weighted_type(dtype) {
        return quantize_weighted::quantize_row_weighted(dtype, x, importance, out);
    }
    let bs = dtype.block_size();
    for ((xb, qw), ob) in x
        .chunks_exact(bs)
        .zip(importance.chunks_exact(bs))
        .zip(out.chunks_exact_mut(dtype.type_size()))
    {
        if quantize_iq::is_lattice_type(dtype) {
            quantize_iq::quantize_iq(dtype, xb, Some(qw), ob);
        } else {
            iq4(xb, ob, bs, Some(qw));
        }
    }
}

/// Quantize `x` (a whole number of blocks) into `out` (exactly `dtype.bytes_for(x.len())` bytes).
///
/// Panics if `dtype` is not [`quantize_supported`].
pub fn quantize(dtype: DType, x: &[f32], out: &mut [u8]) {
    assert_eq!(
        out.len(),
        dtype.bytes_for(x.len()),
        "quantize: length mismatch"
    );
    let f: fn(&[f32], &mut [u8]) = match dtype {
        DType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
            return;
        }
        DType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
            return;
        }
        DType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
            return;
        }
        DType::Q4_0 => q4_0,
        DType::Q4_1 => q4_1,
        DType::Q5_0 => q5_0,
        DType::Q5_1 => q5_1,
        DType::Q8_0 => q8_0,
        DType::Q8_1 => q8_1,
        DType::Q4K => q4_k,
        DType::Q5K => q5_k,
        DType::Q6K => |x: &[f32], b: &mut [u8]| q6_k_with(x, b, None),
        DType::IQ4NL => |x: &[f32], b: &mut [u8]| iq4(x, b, 32, None),
        DType::IQ4XS => |x: &[f32], b: &mut [u8]| iq4(x, b, QK_K, None),
        DType::MXFP4 => mxfp4,
        DType::Q8K => q8_k,
        DType::Q2K => q2_k,
        DType::Q3K => q3_k,
        DType::IQ2S => |x: &[f32], b: &mut [u8]| quantize_iq::quantize_iq(DType::IQ2S, x, None, b),
        DType::IQ3XXS => {
            |x: &[f32], b: &mut [u8]| quantize_iq::quantize_iq(DType::IQ3XXS, x, None, b)
        }
        DType::IQ3S => |x: &[f32], b: &mut [u8]| quantize_iq::quantize_iq(DType::IQ3S, x, None, b),
        DType::IQ1M => |x: &[f32], b: &mut [u8]| quantize_iq::quantize_iq(DType::IQ1M, x, None, b),
        other => panic!("quantization to {other} is not supported"),
    };
    let (bs, ts) = (dtype.block_size(), dtype.type_size());
    for (xb, ob) in x.chunks_exact(bs).zip(out.chunks_exact_mut(ts)) {
        f(xb, ob);
    }
}

/// Quantize one activation row for the integer dot products. Q8_0 and Q8_1 follow ggml's CPU
/// path (`quantize_row_q8_0`: scale `127/amax`, round half to even) rather than the reference
/// file quantizer (`1/(amax/127)`, round half away from zero), so that a GGUF model computes the
/// same activations here as in llama.cpp; Q8_K's CPU path is the reference one.
pub fn quantize_activation(dtype: DType, x: &[f32], out: &mut [u8]) {
    let (bs, ts) = (dtype.block_size(), dtype.type_size());
    assert_eq!(
        out.len(),
        dtype.bytes_for(x.len()),
        "quantize_activation: length mismatch"
    );
    match dtype {
        #[cfg(target_arch = "x86_64")]
        DType::Q8_0 if super::has_avx2() => {
            for (xb, b) in x.chunks_exact(bs).zip(out.chunks_exact_mut(ts)) {
                super::avx2::quantize_q8_0(xb, b);
            }
        }
        DType::Q8_0 | DType::Q8_1 => {
            for (xb, b) in x.chunks_exact(bs).zip(out.chunks_exact_mut(ts)) {
                q8_activation_block(dtype, xb, b);
            }
        }
        #[cfg(target_arch = "x86_64")]
        DType::Q8K if super::has_avx2() => {
            for (xb, b) in x.chunks_exact(bs).zip(out.chunks_exact_mut(ts)) {
                super::avx2::quantize_q8_k(xb, b);
            }
        }
        _ => quantize(dtype, x, out),
    }
}

/// One Q8_0 or Q8_1 activation block, the scalar reference (ggml's `quantize_row_q8_0`/`_q8_1`).
pub(crate) fn q8_activation_block(dtype: DType, xb: &[f32], b: &mut [u8]) {
    let values_at = if dtype == DType::Q8_0 { 2 } else { 4 };
    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    put_f16(b, 0, d);
    let mut sum = 0i32;
    for j in 0..32 {
        let q = nearest_int(xb[j] * id);
        b[values_at + j] = q as i8 as u8;
        sum += q;
    }
    if dtype == DType::Q8_1 {
        put_f16(b, 2, sum as f32 * d);
    }
}

/// The element of largest magnitude, sign kept (the first one on ties), and that magnitude.
pub(super) fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

fn q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    for j in 0..32 {
        // roundf: half away from zero.
        b[2 + j] = (x[j] * id).round() as i8 as u8;
    }
}

fn q8_1(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    let mut sum = 0i32;
    for j in 0..32 {
        let q = (x[j] * id).round() as i8;
        b[4 + j] = q as u8;
        sum += q as i32;
    }
    put_f16(b, 2, sum as f32 * d);
}

fn q4_0(x: &[f32], b: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    for j in 0..16 {
        // C: (int8_t)(x*id + 8.5f), truncation toward zero, then MIN(15, ·).
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        b[2 + j] = q0 | (q1 << 4);
    }
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

fn q4_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    for j in 0..16 {
        let q0 = ((((x[j] - min) * id) + 0.5) as i8).min(15) as u8;
        let q1 = ((((x[j + 16] - min) * id) + 0.5) as i8).min(15) as u8;
        b[4 + j] = q0 | (q1 << 4);
    }
}

/// Pack 32 five-bit values: nibbles at `qs`, fifth bits into the u32 at `qh`.
pub(super) fn pack_five_bit(q: &[u8; 32], b: &mut [u8], qh_off: usize, qs_off: usize) {
    let mut qh = 0u32;
    for j in 0..16 {
        b[qs_off + j] = (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4);
        qh |= (((q[j] & 0x10) >> 4) as u32) << j;
        qh |= (((q[j + 16] & 0x10) >> 4) as u32) << (j + 16);
    }
    b[qh_off..qh_off + 4].copy_from_slice(&qh.to_le_bytes());
}

fn q5_0(x: &[f32], b: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    let mut q = [0u8; 32];
    for j in 0..32 {
        q[j] = ((x[j] * id + 16.5) as i8).min(31) as u8;
    }
    pack_five_bit(&q, b, 2, 6);
}

fn q5_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    let mut q = [0u8; 32];
    for j in 0..32 {
        q[j] = (((x[j] - min) * id) + 0.5) as u8;
    }
    pack_five_bit(&q, b, 4, 8);
}

fn q8_k(x: &[f32], b: &mut [u8]) {
    let (max, amax) = signed_absmax(x);
    if amax == 0.0 {
        b.fill(0);
        return;
    }
    // −127, not −128: keeps every value within ±127.
    let iscale = -127.0 / max;
    for j in 0..QK_K {
        b[4 + j] = nearest_int(iscale * x[j]).min(127) as i8 as u8;
    }
    for g in 0..16 {
        let sum: i32 = (0..16).map(|i| b[4 + 16 * g + i] as i8 as i32).sum();
        b[260 + 2 * g..262 + 2 * g].copy_from_slice(&(sum as i16).to_le_bytes());
    }
    b[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

/// ggml's `make_qkx2_quants`: the (scale, −min) pair for one sub-block minimising the weighted
/// squared error (absolute error with `use_mad`), searching `nstep + 1` candidate inverse
/// scales. Fills `l` with 0..=nmax.
#[allow(clippy::too_many_arguments)]
pub(super) fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    w: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let error = |diff: f32| if use_mad { diff.abs() } else { diff * diff };
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += w[i] * error(diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let lf = q as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += w[i] * error(diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Shared part of Q4_K and Q5_K: per 32-element sub-block (scale, min) search, 6-bit codes packed
/// into `scales`, fp16 super-scales, and the final 0..=nmax values in `l`.
fn k_quant_asymmetric(
    x: &[f32],
    b: &mut [u8],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    l: &mut [u8; QK_K],
) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().fold(0.0, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut w = [0f32; 32];
        for (wi, v) in w.iter_mut().zip(xs) {
            *wi = av_x + v.abs();
        }
        let l = &mut l[32 * j..32 * j + 32];
        let (s, m) = make_qkx2_quants(nmax, xs, &w, l, rmin, 0.1, nstep, false);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let ls = scales.map(|v| (nearest_int(inv_scale * v) as u8).min(63));
    let lm = mins.map(|v| (nearest_int(inv_min * v) as u8).min(63));
    pack_scale_min_k4(&ls, &lm, &mut b[4..16]);
    put_f16(b, 0, max_scale / 63.0);
    put_f16(b, 2, max_min / 63.0);
    k_quant_requantize(x, b, nmax, l);
}

/// Q4_K's and Q5_K's requantization against the stored (f16) scales and mins, shared with the
/// importance-guided quantizers; a sub-block whose scale is zero keeps the search's values.
pub(super) fn k_quant_requantize(x: &[f32], b: &[u8], nmax: i32, l: &mut [u8; QK_K]) {
    let (d, dmin) = (super::f16_at(b, 0), super::f16_at(b, 2));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &b[4..16]);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue; // keeps the search's values, as ggml does
        }
        let dm = dmin * m as f32;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
}

/// The eight 6-bit (scale, min) pairs of Q4_K/Q5_K into their 12 bytes (`scale_min_k4` reads
/// them back).
pub(super) fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8], packed: &mut [u8]) {
    packed.fill(0);
    for j in 0..8 {
        let (ls, lm) = (ls[j], lm[j]);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
}

/// Four 2-bit values per byte as ggml packs Q2_K and Q3_K quants: byte `32h + l` holds values
/// `128h + l`, `+32`, `+64`, `+96` at bits 0, 2, 4, 6.
pub(super) fn pack_two_bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for h in 0..2 {
        for i in 0..32 {
            let at = 128 * h + i;
            qs[32 * h + i] = l[at] | (l[at + 32] << 2) | (l[at + 64] << 4) | (l[at + 96] << 6);
        }
    }
}

/// ggml's `quantize_row_q2_K_ref` for one super-block (84 bytes: 16 scale/min nibble pairs, 64
/// bytes of 2-bit quants, `d`, `dmin`): per 16 values an asymmetric (scale, min) pair by
/// `make_qkx2_quants` weighted by |x| with the absolute error, both quantized to 4 bits against
/// the block's largest.
fn q2_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 16], [0f32; 16]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let w: [f32; 16] = std::array::from_fn(|i| xs[i].abs());
        let lj = &mut l[16 * j..16 * j + 16];
        (scales[j], mins[j]) = make_qkx2_quants(3, xs, &w, lj, -0.5, 0.1, 15, true);
        max_scale = max_scale.max(scales[j]);
        max_min = max_min.max(mins[j]);
    }
    let sc = &mut b[0..16];
    sc.fill(0);
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        put_f16(b, 80, max_scale / 15.0);
    } else {
        put_f16(b, 80, 0.0);
    }
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for j in 0..16 {
            b[j] |= (nearest_int(iscale * mins[j]) as u8) << 4;
        }
        put_f16(b, 82, max_min / 15.0);
    } else {
        put_f16(b, 82, 0.0);
    }
    q2_k_finish(x, &mut l, b);
}

/// Q2_K's last step, shared with the importance-guided quantizer: each 16 values requantized
/// against the block's stored (f16) scale and min, then packed.
pub(super) fn q2_k_finish(x: &[f32], l: &mut [u8; QK_K], b: &mut [u8]) {
    let (d, dmin) = (super::f16_at(b, 80), super::f16_at(b, 82));
    for j in 0..16 {
        let dj = d * (b[j] & 0xF) as f32;
        if dj == 0.0 {
            continue; // keeps the search's values, as ggml does
        }
        let dm = dmin * (b[j] >> 4) as f32;
        for i in 0..16 {
            l[16 * j + i] = nearest_int((x[16 * j + i] + dm) / dj).clamp(0, 3) as u8;
        }
    }
    pack_two_bit(l, &mut b[16..80]);
}

/// ggml's `make_q3_quants` with `do_rmse`: symmetric values in `-nmax..nmax` for one group,
/// refined five rounds toward the least x²-weighted squared error; returns the scale and leaves
/// `l` offset by `nmax` (all zero, unoffset, for an all-zero group, as ggml does).
fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (li, &v) in l.iter_mut().zip(x) {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *li = q as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (li, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let cur = *li as f32;
            let mut slx = sumlx - w * v * cur;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * cur * cur;
                let new = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new != *li as i32 {
                    slx += w * v * new as f32;
                    sl2 += w * new as f32 * new as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *li = new as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for li in l.iter_mut() {
        *li += nmax as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// ggml's `quantize_row_q3_K_ref` for one super-block (110 bytes: 32 bytes of high bits, 64 of
/// 2-bit quants, 12 of packed 6-bit signed scales, `d`): per 16 values a symmetric scale by
/// `make_q3_quants`, scales quantized to −32..31 against the largest in magnitude.
fn q3_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        if scales[j].abs() > amax {
            amax = scales[j].abs();
            max_scale = scales[j];
        }
    }
    let packed = &mut b[96..108];
    packed.fill(0);
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            let q = (nearest_int(iscale * scales[j]).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                packed[j] = q & 0xF;
            } else {
                packed[j - 8] |= (q & 0xF) << 4;
            }
            packed[8 + j % 4] |= (q >> 4) << (2 * (j / 4));
        }
        put_f16(b, 108, 1.0 / iscale);
    } else {
        put_f16(b, 108, 0.0);
    }
    q3_k_finish(x, &mut l, b);
}

/// Q3_K's last step, shared with the importance-guided quantizer: each 16 values requantized
/// against the stored scales, third bits into `hmask`, low bits packed.
pub(super) fn q3_k_finish(x: &[f32], l: &mut [i8; QK_K], b: &mut [u8]) {
    let d = super::f16_at(b, 108);
    let sc = super::q3k_scales(&b[96..108]);
    for j in 0..16 {
        let dj = d * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / dj).clamp(-4, 3) + 4) as i8;
        }
    }
    // The third bit of value j goes to bit j / 32 of hmask byte j % 32.
    let hmask = &mut b[0..32];
    hmask.fill(0);
    let mut low = [0u8; QK_K];
    for (j, &v) in l.iter().enumerate() {
        let mut v = v as u8;
        if v > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            v -= 4;
        }
        low[j] = v;
    }
    pack_two_bit(&low, &mut b[32..96]);
}

fn q4_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; QK_K];
    k_quant_asymmetric(x, b, 15, -1.0, 20, &mut l);
    q4_k_pack(&l, b);
}

/// Q4_K's nibbles: byte `32c + i` holds values `64c + i` and `64c + 32 + i`.
pub(super) fn q4_k_pack(l: &[u8; QK_K], b: &mut [u8]) {
    for c in 0..4 {
        for i in 0..32 {
            b[16 + 32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
        }
    }
}

fn q5_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; QK_K];
    k_quant_asymmetric(x, b, 31, -0.5, 15, &mut l);
    q5_k_pack(&l, b);
}

/// Q5_K's fifth bits (`qh`) and nibbles.
pub(super) fn q5_k_pack(l: &[u8; QK_K], b: &mut [u8]) {
    let (qh, ql) = b[16..176].split_at_mut(32);
    qh.fill(0);
    for c in 0..4 {
        let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for j in 0..32 {
            let (mut l1, mut l2) = (l[64 * c + j], l[64 * c + 32 + j]);
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * c + j] = l1 | (l2 << 4);
        }
    }
}

/// ggml's `make_qx_quants` with rmse_type 1: a signed scale for one group, each value weighted
/// by its importance `qw` when given, else by x². Leaves `l` offset by `nmax`.
pub(super) fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let weight = |i: usize| qw.map_or(x[i] * x[i], |q| q[i]);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..x.len() {
        let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = (q + nmax) as i8;
        let w = weight(i);
        sumlx += w * x[i] * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for (i, &v) in x.iter().enumerate() {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            let w = weight(i);
            sumlx += w * v * q as f32;
            suml2 += w * q as f32 * q as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..x.len() {
                l[i] = (nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `quantize_row_q6_K_ref` (`qw` None) or `quantize_row_q6_K_impl` (importances `qw`,
/// used as the group weights directly) for one super-block.
pub(super) fn q6_k_with(x: &[f32], b: &mut [u8], qw: Option<&[f32]>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for ib in 0..16 {
        let s = make_qx_quants(
            32,
            &x[16 * ib..16 * ib + 16],
            &mut l[16 * ib..16 * ib + 16],
            qw.map(|q| &q[16 * ib..16 * ib + 16]),
        );
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        b.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(b, 208, 1.0 / iscale);
    for ib in 0..16 {
        b[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let d = super::f16_at(b, 208);
    for j in 0..16 {
        let dj = d * b[192 + j] as i8 as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    for half in 0..2 {
        let lh = &l[128 * half..128 * half + 128];
        for i in 0..32 {
            let (q1, q2, q3, q4) = (
                lh[i] as u8,
                lh[i + 32] as u8,
                lh[i + 64] as u8,
                lh[i + 96] as u8,
            );
            b[64 * half + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            b[64 * half + 32 + i] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            b[128 + 32 * half + i] =
                (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

/// ggml's `quantize_row_mxfp4_ref`: the E8M0 exponent `floor(log2(amax)) − 2` (biased by 127),
/// then each value's nearest of the 16 E2M1 values at that scale (the first of equals).
fn mxfp4(x: &[f32], b: &mut [u8]) {
    let values = &super::iq_tables::KVALUES_MXFP4;
    let amax = x
        .iter()
        .fold(0.0f32, |m, v| if m < v.abs() { v.abs() } else { m });
    let e = if amax > 0.0 {
        (amax.log2().floor() - 2.0 + 127.0) as u8
    } else {
        0
    };
    let d = super::iq::e8m0_to_f32_half(e);
    let best = |v: f32| {
        let mut best = (0usize, (values[0] as f32 * d - v).abs());
        for (i, &q) in values.iter().enumerate().skip(1) {
            let err = (q as f32 * d - v).abs();
            if err < best.1 {
                best = (i, err);
            }
        }
        best.0 as u8
    };
    b[0] = e;
    for j in 0..16 {
        b[1 + j] = best(x[j]) | (best(x[16 + j]) << 4);
    }
}

/// ggml's `make_qp_quants`: levels `0..=nmax` for non-negative `x` and the weighted
/// least-squares scale, refined by moving single levels.
pub(super) fn make_qp_quants(nmax: i32, x: &[f32], l: &mut [u8], w: &[f32]) -> f32 {
    let max = x.iter().fold(0.0f32, |m, &v| if m > v { m } else { v });
    if max < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for (o, &v) in l.iter_mut().zip(x) {
        *o = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..x.len() {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += w[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..x.len() {
            let li = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * li as f32;
            mse += w[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..x.len() {
        let li = nearest_int(iscale * x[i]).min(nmax);
        l[i] = li as u8;
        sumlx += w[i] * x[i] * li as f32;
        suml2 += w[i] * li as f32 * li as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..x.len() {
            let li = l[i] as f32;
            let mut slx = sumlx - w[i] * x[i] * li;
            let mut sl2 = suml2 - w[i] * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l[i] as i32 {
                    slx += w[i] * x[i] * new_l as f32;
                    sl2 += w[i] * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// ggml's `GROUP_MAX_EPS`: groups whose largest magnitude is below it quantize to zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `best_index_int8`: the index of the table value nearest `x` (ties to the larger).
fn best_index_int8(values: &[i8; 16], x: f32) -> usize {
    if x <= values[0] as f32 {
        return 0;
    }
    if x >= values[15] as f32 {
        return 15;
    }
    let (mut ml, mut mu) = (0, 15);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < values[mav] as f32 {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - (values[mu - 1] as f32) < values[mu] as f32 - x {
        mu - 1
    } else {
        mu
    }
}

/// ggml's `quantize_row_iq4_nl_impl` as `quantize_iq4_nl` / `quantize_iq4_xs` call it (`ntry`
/// 7: the scale of each 32 values searched over 15 candidates; each value's weight its square,
/// or with importances `qw`, `qw·sqrt(σ² + x²)` where σ² is twice the block's mean square): one
/// IQ4_NL block (`super_block` 32) or IQ4_XS super-block (256, the 32-value scales then
/// quantized to 6 bits against one f16 scale).
fn iq4(x: &[f32], b: &mut [u8], super_block: usize, qw: Option<&[f32]>) {
    const NTRY: i32 = 7;
    let values = &super::iq_tables::KVALUES_IQ4NL;
    let nb = super_block / 32;
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; QK_K / 32];
    let (mut max_scale, mut amax_scale) = (0.0f32, 0.0f32);
    let mut sigma2 = 0.0f32;
    for &v in &x[..super_block] {
        sigma2 += v * v;
    }
    sigma2 *= 2.0 / super_block as f32;
    for ib in 0..nb {
        let xb = &x[32 * ib..32 * ib + 32];
        let weight: [f32; 32] = std::array::from_fn(|j| match qw {
            Some(qw) => qw[32 * ib + j] * (sigma2 + xb[j] * xb[j]).sqrt(),
            None => xb[j] * xb[j],
        });
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        let sums = |id: f32, lb: Option<&mut [u8]>| {
            let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
            let mut lb = lb;
            for j in 0..32 {
                let k = best_index_int8(values, id * xb[j]);
                if let Some(lb) = lb.as_deref_mut() {
                    lb[j] = k as u8;
                }
                let q = values[k] as f32;
                sumqx += weight[j] * q * xb[j];
                sumq2 += weight[j] * q * q;
            }
            (sumqx, sumq2)
        };
        let d = -max / values[0] as f32;
        let (sumqx, sumq2) = sums(1.0 / d, Some(&mut l[32 * ib..32 * ib + 32]));
        let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
        let mut best = d * sumqx;
        for itry in -NTRY..=NTRY {
            let id = (itry + values[0] as i32) as f32 / max;
            let (sumqx, sumq2) = sums(id, None);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scales[ib] = d;
        if d.abs() > amax_scale {
            amax_scale = d.abs();
            max_scale = d;
        }
    }
    let qs_at = if nb > 1 {
        // IQ4_XS: f16 d @0, scales_h u16 @2, scales_l @4..8, quants @8.
        b[..8].fill(0);
        let d = -max_scale / 32.0;
        put_f16(b, 0, d);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut scales_h = 0u16;
        for ib in 0..nb {
            let ls = nearest_int(id * scales[ib]).clamp(-32, 31);
            let dl = d * ls as f32;
            let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            for j in 0..32 {
                l[32 * ib + j] = best_index_int8(values, idl * x[32 * ib + j]) as u8;
            }
            let ls = (ls + 32) as u8;
            b[4 + ib / 2] |= (ls & 0xF) << (4 * (ib % 2));
            scales_h |= ((ls >> 4) as u16) << (2 * ib);
        }
        b[2..4].copy_from_slice(&scales_h.to_le_bytes());
        8
    } else {
        // IQ4_NL: f16 d @0, quants @2.
        put_f16(b, 0, scales[0]);
        let id = if scales[0] != 0.0 {
            1.0 / scales[0]
        } else {
            0.0
        };
        for j in 0..32 {
            l[j] = best_index_int8(values, id * x[j]) as u8;
        }
        2
    };
    for i in 0..super_block / 32 {
        for j in 0..16 {
            b[qs_at + 16 * i + j] = l[32 * i + j] | (l[32 * i + 16 + j] << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::quantize;
    use crate::DType;
    use crate::testing::rand_vec;

    /// Beyond the ggml oracle's blocks (tests/fixtures/gguf): every quantizer, on data of several
    /// scales (all-zero groups included), decodes to values within its type's error, relative
    /// to the data's RMS. Bounds hold for ggml's quantizers with margin (2-bit: about a third).
    #[test]
    fn every_type_decodes_near_its_input() {
        let n = 256 * 24;
        for (t, bound) in [
            (DType::Q2K, 0.45),
            (DType::Q3K, 0.25),
            (DType::Q4K, 0.12),
            (DType::Q5K, 0.06),
            (DType::Q6K, 0.03),
            (DType::Q4_0, 0.15),
            (DType::Q8_0, 0.01),
            (DType::IQ4NL, 0.12),
            (DType::IQ4XS, 0.12),
            (DType::MXFP4, 0.2),
        ] {
            for scale in [1e-3f32, 1.0, 300.0] {
                let mut x = rand_vec(n, 7, scale);
                x[256..512].fill(0.0);
                let mut q = vec![0u8; t.bytes_for(n)];
                quantize(t, &x, &mut q);
                let y = crate::dtype::decode(t, &q, n);
                let rms = (x.iter().map(|v| v * v).sum::<f32>() / n as f32).sqrt();
                let err = (x
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    / n as f32)
                    .sqrt();
                assert!(
                    err <= bound * rms,
                    "{t} at scale {scale}: rms error {err} of {rms}"
                );
                assert!(y[256..512].iter().all(|v| *v == 0.0), "{t}: zero group");
            }
        }
    }
}
