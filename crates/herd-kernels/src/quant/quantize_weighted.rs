//! Importance-guided quantizers of the K-quants and the 32-value types: ggml's
//! `quantize_row_{q2_K,q3_K,q4_K,q5_K,q6_K,q4_0,q4_1,q5_0,q5_1}_impl`, which `llama-quantize`
//! runs for every tensor its importance matrix covers, step for step (same f32 operations and
//! order, so the bytes are ggml's). Each value's weight is its importance times
//! `sqrt(σ² + x²)`, σ² the mean square of its super-block (K-quants; doubled except for Q2_K) or
//! of its whole row (32-value types); Q6_K takes the importances as they are. Group scales and
//! mins are then fitted by weighted least squares (`make_qkx2_quants`, `make_qx_quants`) and
//! the super-block's scales quantized the same way (`make_qp_quants`) rather than against the
//! largest, as the reference quantizers do.

use super::quantize::{
    k_quant_requantize, make_qkx2_quants, make_qp_quants, make_qx_quants, pack_five_bit,
    pack_scale_min_k4, q2_k_finish, q3_k_finish, q4_k_pack, q5_k_pack, q6_k_with,
};
use super::{QK_K, put_f16};
use crate::DType;

/// Whether [`quantize_row_weighted`] writes `dtype`.
pub(crate) fn is_weighted_type(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q2K
            | DType::Q3K
            | DType::Q4K
            | DType::Q5K
            | DType::Q6K
            | DType::Q4_0
            | DType::Q4_1
            | DType::Q5_0
            | DType::Q5_1
    )
}

/// Quantize one row `x` with the importances `qw` of its columns into `out`.
///
/// Panics if `dtype` is not [`is_weighted_type`] or the lengths are wrong.
pub(crate) fn quantize_row_weighted(dtype: DType, x: &[f32], qw: &[f32], out: &mut [u8]) {
    assert!(is_weighted_type(dtype), "{dtype} has no weighted quantizer");
    assert_eq!(
        x.len(),
        qw.len(),
        "quantize_row_weighted: importances per column"
    );
    assert_eq!(
        out.len(),
        dtype.bytes_for(x.len()),
        "quantize_row_weighted: output size"
    );
    let (bs, ts) = (dtype.block_size(), dtype.type_size());
    // The 32-value types take σ² over the whole row.
    let row_sigma2 = x.iter().fold(0.0f32, |s, v| s + v * v) / x.len() as f32;
    for ((xb, qb), ob) in x
        .chunks_exact(bs)
        .zip(qw.chunks_exact(bs))
        .zip(out.chunks_exact_mut(ts))
    {
        match dtype {
            DType::Q2K => q2_k(xb, qb, ob),
            DType::Q3K => q3_k(xb, qb, ob),
            DType::Q4K => q45_k(xb, qb, ob, 15),
            DType::Q5K => q45_k(xb, qb, ob, 31),
            DType::Q6K => q6_k_with(xb, ob, Some(qb)),
            _ => small_block(dtype, xb, qb, row_sigma2, ob),
        }
    }
}

/// Σx² in ggml's order.
fn sum_squares(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |s, v| s + v * v)
}

/// `qw·sqrt(σ² + x²)` per value, and their sum.
fn weights<const N: usize>(x: &[f32], qw: &[f32], sigma2: f32) -> ([f32; N], f32) {
    let w: [f32; N] = std::array::from_fn(|i| qw[i] * (sigma2 + x[i] * x[i]).sqrt());
    let sum = w.iter().fold(0.0f32, |s, v| s + v);
    (w, sum)
}

/// ggml's `quantize_row_q2_K_impl`: per 16 values an asymmetric (scale, min) pair by
/// `make_qkx2_quants` (36 candidate steps from −0.9 by 0.05, squared error), the 16 scales
/// and 16 mins each quantized to 4 bits by `make_qp_quants` weighted by the groups' weights.
fn q2_k(x: &[f32], qw: &[f32], b: &mut [u8]) {
    let sigma2 = sum_squares(x) / QK_K as f32;
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins, mut sw) = ([0f32; 16], [0f32; 16], [0f32; 16]);
    for j in 0..16 {
        let g = 16 * j..16 * j + 16;
        let (w, sum) = weights::<16>(&x[g.clone()], &qw[g.clone()], sigma2);
        sw[j] = sum;
        (scales[j], mins[j]) =
            make_qkx2_quants(3, &x[g.clone()], &w, &mut l[g], -0.9, 0.05, 36, false);
    }
    let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
    let dm = make_qp_quants(15, &scales, &mut ls, &sw);
    let mm = make_qp_quants(15, &mins, &mut lm, &sw);
    put_f16(b, 80, dm);
    put_f16(b, 82, mm);
    for j in 0..16 {
        b[j] = ls[j] | (lm[j] << 4);
    }
    q2_k_finish(x, &mut l, b);
}

/// ggml's `quantize_row_q3_K_impl`: per 16 values a symmetric scale by `make_qx_quants`
/// weighted, the 16 scales quantized to 6 bits by `make_qx_quants` weighted by the groups'
/// weights.
fn q3_k(x: &[f32], qw: &[f32], b: &mut [u8]) {
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let mut l = [0i8; QK_K];
    let (mut scales, mut sw) = ([0f32; 16], [0f32; 16]);
    for j in 0..16 {
        let g = 16 * j..16 * j + 16;
        let (w, sum) = weights::<16>(&x[g.clone()], &qw[g.clone()], sigma2);
        sw[j] = sum;
        scales[j] = make_qx_quants(4, &x[g.clone()], &mut l[g], Some(&w));
    }
    let mut ls = [0i8; 16];
    let d_block = make_qx_quants(32, &scales, &mut ls, Some(&sw));
    let packed = &mut b[96..108];
    packed.fill(0);
    for (j, &q) in ls.iter().enumerate() {
        let q = q as u8;
        if j < 8 {
            packed[j] = q & 0xF;
        } else {
            packed[j - 8] |= (q & 0xF) << 4;
        }
        packed[8 + j % 4] |= (q >> 4) << (2 * (j / 4));
    }
    put_f16(b, 108, d_block);
    q3_k_finish(x, &mut l, b);
}

/// ggml's `quantize_row_q4_K_impl` / `quantize_row_q5_K_impl` (`nmax` 15 / 31): per 32 values
/// a (scale, min) pair by `make_qkx2_quants` (36 steps from −0.9 by 0.05), the eight scales and
/// eight mins quantized to 6 bits by `make_qp_quants` weighted by the groups' weights.
fn q45_k(x: &[f32], qw: &[f32], b: &mut [u8], nmax: i32) {
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins, mut sw) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    for j in 0..8 {
        let g = 32 * j..32 * j + 32;
        let (w, sum) = weights::<32>(&x[g.clone()], &qw[g.clone()], sigma2);
        sw[j] = sum;
        (scales[j], mins[j]) =
            make_qkx2_quants(nmax, &x[g.clone()], &w, &mut l[g], -0.9, 0.05, 36, false);
    }
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
    let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
    pack_scale_min_k4(
        &ls.map(|v| v.min(63)),
        &lm.map(|v| v.min(63)),
        &mut b[4..16],
    );
    put_f16(b, 0, d_block);
    put_f16(b, 2, m_block);
    k_quant_requantize(x, b, nmax, &mut l);
    if nmax == 15 {
        q4_k_pack(&l, b);
    } else {
        q5_k_pack(&l, b);
    }
}

/// ggml's `quantize_row_{q4_0,q4_1,q5_0,q5_1}_impl` for one 32-value block: the symmetric
/// types' scale by `make_qx_quants`, the asymmetric ones' (scale, min) by `make_qkx2_quants`
/// (36 steps from −0.9 by 0.05), weighted; σ² is the whole row's mean square.
fn small_block(dtype: DType, x: &[f32], qw: &[f32], sigma2: f32, b: &mut [u8]) {
    let (w, _) = weights::<32>(x, qw, sigma2);
    match dtype {
        DType::Q4_0 | DType::Q5_0 => {
            let nmax = if dtype == DType::Q4_0 { 8 } else { 16 };
            let mut l = [0i8; 32];
            let d = make_qx_quants(nmax, x, &mut l, Some(&w));
            put_f16(b, 0, d);
            let l = l.map(|v| v as u8);
            if dtype == DType::Q4_0 {
                for j in 0..16 {
                    b[2 + j] = l[j] | (l[j + 16] << 4);
                }
            } else {
                pack_five_bit(&l, b, 2, 6);
            }
        }
        DType::Q4_1 | DType::Q5_1 => {
            let nmax = if dtype == DType::Q4_1 { 15 } else { 31 };
            let mut l = [0u8; 32];
            let (d, min) = make_qkx2_quants(nmax, x, &w, &mut l, -0.9, 0.05, 36, false);
            put_f16(b, 0, d);
            put_f16(b, 2, -min);
            if dtype == DType::Q4_1 {
                for j in 0..16 {
                    b[4 + j] = l[j] | (l[j + 16] << 4);
                }
            } else {
                pack_five_bit(&l, b, 4, 8);
            }
        }
        other => unreachable!("{other} is not a 32-value type"),
    }
}
