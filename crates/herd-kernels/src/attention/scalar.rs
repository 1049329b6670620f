//! The scalar reference of every attention kernel: plain Rust, the same on every CPU
//! (`f32::mul_add` is an exact fused multiply-add everywhere). The SIMD forms in the sibling
//! files return the same bits; tests compare them on random inputs with ragged sizes.

use super::{LANES, SUM_BLOCK, hsum8};
use crate::DType;

/// ggml's `ggml_v_expf` (AVX2 form) on one value: `e^x` to about one ulp, 0 at −∞.
pub fn expf_ggml(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let c = n.abs() > 126.0;
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010) // 0x1.0e4020p-7
        .mul_add(b, f32::from_bits(0x3d2b_9f17)) // 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)), // 0x1.555e66p-3, 0x1.fffdb6p-2
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6) * b); // 0x1.ffffecp-1
    if !c {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// [`super::exp_weights`], the reference.
pub fn exp_weights(
    x: &[f32],
    max: f32,
    scale: f32,
    out: &mut [f32],
    at_least: f32,
    above: &mut Vec<u32>,
) -> f64 {
    let mut lanes = [0.0f64; 4];
    let whole = x.len() / LANES * LANES;
    for (b, block) in x[..whole].chunks(SUM_BLOCK * LANES).enumerate() {
        let mut acc = [[0.0f32; LANES]; 2];
        for (g, xs) in block.chunks_exact(LANES).enumerate() {
            let first = (b * SUM_BLOCK + g) * LANES;
            for (l, &v) in xs.iter().enumerate() {
                let e = expf_ggml(weight_arg(v, max, scale));
                out[first + l] = e;
                if e >= at_least {
                    above.push((first + l) as u32);
                }
                acc[g % 2][l] += e;
            }
        }
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += f64::from(acc[0][l] + acc[1][l]) + f64::from(acc[0][l + 4] + acc[1][l + 4]);
        }
    }
    exp_weights_tail(x, whole, max, scale, out, lanes, at_least, above)
}

/// The exponent of one softmax weight: NaN counts as −∞.
#[inline]
fn weight_arg(v: f32, max: f32, scale: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        (v - max) * scale
    }
}

/// [`super::exp_weights`] from element `from` on (after the whole groups of eight): the
/// leftovers, and the total.
#[allow(clippy::too_many_arguments)]
pub(super) fn exp_weights_tail(
    x: &[f32],
    from: usize,
    max: f32,
    scale: f32,
    out: &mut [f32],
    lanes: [f64; 4],
    at_least: f32,
    above: &mut Vec<u32>,
) -> f64 {
    let mut total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for i in from..x.len() {
        out[i] = expf_ggml(weight_arg(x[i], max, scale));
        total += f64::from(out[i]);
        if out[i] >= at_least {
            above.push(i as u32);
        }
    }
    total
}

/// [`super::exp_sub_sum`], the reference: lane `i % 8` of the whole groups of eight sums in
/// order, the lanes as [`hsum8`], then the leftovers one by one.
pub fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
    let whole = x.len() / LANES * LANES;
    let mut lanes = [0.0f32; LANES];
    for g in x[..whole].chunks_exact_mut(LANES) {
        for (l, v) in g.iter_mut().enumerate() {
            *v = expf_ggml(*v - max);
            lanes[l] += *v;
        }
    }
    let mut sum = hsum8(&lanes);
    for v in &mut x[whole..] {
        *v = expf_ggml(*v - max);
        sum += *v;
    }
    sum
}

/// Eight elements `e..e + 8` (`e` a multiple of 8) of a cached row of type `ty` (F32, F16,
/// BF16 or Q8_0), exactly (each is representable in f32: Q8_0's `d·q` is an 11-bit by 8-bit
/// product).
fn decode8(ty: DType, row: &[u8], e: usize, out: &mut [f32; LANES]) {
    match ty {
        DType::Q8_0 => {
            let b = &row[e / 32 * 34..(e / 32 + 1) * 34];
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            let at = 2 + e % 32;
            for (o, &q) in out.iter_mut().zip(&b[at..at + LANES]) {
                *o = d * f32::from(q as i8);
            }
        }
        _ => {
            let w = ty.type_size();
            crate::dtype::decode_into(ty, &row[e * w..(e + LANES) * w], out);
        }
    }
}

/// Element `i` of a cached row of a float type (the leftovers after the whole groups of 8).
fn element(ty: DType, row: &[u8], i: usize) -> f32 {
    let w = ty.type_size();
    let mut out = [0.0f32];
    crate::dtype::decode_into(ty, &row[i * w..(i + 1) * w], &mut out);
    out[0]
}

/// [`super::kv_scores`], the reference: for each head `h` and key `j`, per chunk of 32
/// elements, element `32c + 8r + l` into register `r`, lane `l`, by fused multiply-add; the
/// registers added as `(r0 + r1) + (r2 + r3)`, the lanes as [`hsum8`]; the leftovers after the
/// whole chunks added one by one ([`dot_tail`]); times `scale`.
pub fn kv_scores(ty: DType, d: usize, q: &[f32], keys: &[&[u8]], scale: f32, out: &mut [f32]) {
    let n = keys.len();
    let whole = d / CHUNK * CHUNK;
    let mut kc = [0.0f32; LANES];
    for (h, qh) in q.chunks_exact(d).enumerate() {
        for (j, k) in keys.iter().enumerate() {
            let mut r = [[0.0f32; LANES]; 4];
            for c in (0..whole).step_by(CHUNK) {
                for (g, rg) in r.iter_mut().enumerate() {
                    let e = c + LANES * g;
                    decode8(ty, k, e, &mut kc);
                    for (l, acc) in rg.iter_mut().enumerate() {
                        *acc = qh[e + l].mul_add(kc[l], *acc);
                    }
                }
            }
            let lanes: [f32; LANES] =
                std::array::from_fn(|l| (r[0][l] + r[1][l]) + (r[2][l] + r[3][l]));
            out[h * n + j] = dot_tail(ty, qh, k, whole, hsum8(&lanes)) * scale;
        }
    }
}

/// Elements per step of [`kv_scores`]: one Q8_0 block, four registers of eight lanes.
pub(super) const CHUNK: usize = 32;

/// `sum` plus the products of the elements from `from` on, one by one.
pub(super) fn dot_tail(ty: DType, q: &[f32], k: &[u8], from: usize, mut sum: f32) -> f32 {
    for (i, x) in q.iter().enumerate().skip(from) {
        sum += x * element(ty, k, i);
    }
    sum
}

/// [`super::kv_weighted_sum`], the reference: `acc[h·d + i] = fma(w[h·n + j], v_j[i], …)` for
/// `j` in order.
pub fn kv_weighted_sum(ty: DType, d: usize, weights: &[f32], values: &[&[u8]], acc: &mut [f32]) {
    let n = values.len();
    let mut vc = [0.0f32; LANES];
    for (j, v) in values.iter().enumerate() {
        for (h, ah) in acc.chunks_exact_mut(d).enumerate() {
            let p = weights[h * n + j];
            for e in (0..d / LANES * LANES).step_by(LANES) {
                decode8(ty, v, e, &mut vc);
                for (a, x) in ah[e..e + LANES].iter_mut().zip(&vc) {
                    *a = p.mul_add(*x, *a);
                }
            }
            axpy_tail(ty, ah, p, v, d / LANES * LANES);
        }
    }
}

/// `acc[i] = fma(p, v[i], acc[i])` for the elements from `from` on.
pub(super) fn axpy_tail(ty: DType, acc: &mut [f32], p: f32, v: &[u8], from: usize) {
    for (i, a) in acc.iter_mut().enumerate().skip(from) {
        *a = p.mul_add(element(ty, v, i), *a);
    }
}
