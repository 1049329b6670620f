//! ggml's quantized block formats: byte layouts, dequantization, quantization and the integer
//! dot products of weights against 8-bit activations (`shared/reference/gguf.md` §c–§e), in
//! one f32 order per type whatever the batch (see `dot.rs`).
//!
//! Blocks are parsed by byte offset from plain `&[u8]` (memory-mapped files are not aligned for
//! wider reads). The scalar code here is the reference; `avx2` must agree with it exactly.

mod dequant;
mod dot;
mod iq;
#[rustfmt::skip]
mod iq_tables;
mod quantize;
mod quantize_iq;
mod quantize_weighted;
pub mod repack;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_iq;
#[cfg(target_arch = "x86_64")]
mod avx512;

pub use dequant::dequantize;
pub use dot::{
    has_x16_kernel, q8_0_block_sums, unpack_x8, unpack_x8_supported, unpacked_x8_bytes, vec_dot,
    vec_dot_prefetches, vec_dot_scalar, vec_dot_unpacked_x8, vec_dot_x4_rows, vec_dot_x8,
    vec_dot_x8_scalar, vec_dot_x8_sums, vec_dot_x16_sums, x8_wants_block_sums, x16_rows_per_call,
};
pub use quantize::{
    importance_supported, quantize, quantize_activation, quantize_supported,
    quantize_with_importance, requires_importance,
};

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

#[inline]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

#[inline]
pub(crate) fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
pub(crate) fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

/// ggml's `nearest_int`: round half to even, valid for |x| ≤ 4194303, by ggml's own trick:
/// adding 1.5·2²³ leaves the rounded integer in the low mantissa bits (f32 addition rounds half
/// to even). Unlike `f32::round_ties_even`, which compiles to a libm call without SSE4.1 (a
/// third of quantizing time), it is a few integer instructions on every target.
#[inline]
pub(crate) fn nearest_int(x: f32) -> i32 {
    let shifted = (x + 12_582_912.0).to_bits() as i32;
    (shifted & 0x007f_ffff) - 0x0040_0000
}

/// The 6-bit scale and min `j` (0..8) of a Q4_K / Q5_K block from its 12 packed bytes.
#[inline]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The 16 signed 6-bit scales of a Q3_K block (already offset by −32).
#[inline]
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { s[j] & 15 } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (low | (high << 4)) as i8 - 32;
    }
    out
}

/// Does this CPU also have AVX-512 VNNI with 256-bit (VL) forms, for the group kernels'
/// `vpdpbusd` variants? Checked once; `HERD_NO_AVX512` turns it off (to compare the two).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        has_avx512f()
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
    })
}

/// Does this CPU have AVX-512 F (beside AVX2, FMA and F16C), for the 512-bit attention
/// kernels? Checked once; `HERD_NO_AVX512` turns it off, as it does the VNNI forms.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512f() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        has_avx2()
            && std::env::var_os("HERD_NO_AVX512").is_none()
            && is_x86_feature_detected!("avx512f")
    })
}

/// How many independent accumulator chains (4, 2 or 1) a group kernel keeps per activation
/// row when it takes `rows` rows at once: enough that about four multiply-add chains are in
/// flight, since one chain waits a full instruction latency per step.
#[cfg(target_arch = "x86_64")]
pub(crate) const fn independent_chains(rows: usize) -> usize {
    match rows {
        1 => 4,
        2 => 2,
        _ => 1,
    }
}

/// Is the AVX2 + FMA path usable on this CPU? Checked once.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("HERD_NO_SIMD").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(test)]
mod tests {
    use super::nearest_int;

    /// ggml's trick equals round-half-to-even everywhere in its range: integers, halves (the
    /// ties), and values just off them, at both ends and around zero.
    #[test]
    fn nearest_int_rounds_half_to_even_over_its_range() {
        let mut values = Vec::new();
        for k in (0..=4096).chain(4_190_000..=4_194_303) {
            let k = k as f32;
            for x in [k, k + 0.5, k - 0.5, k + 0.25, k - 0.75] {
                values.extend([x, -x]);
            }
        }
        for x in [
            1e-30f32,
            0.49999997,
            0.50000006,
            2.4999998,
            1234.5,
            4_194_302.5,
        ] {
            values.extend([x, -x]);
        }
        for x in values.into_iter().filter(|x| x.abs() <= 4_194_303.0) {
            assert_eq!(nearest_int(x), x.round_ties_even() as i32, "{x}");
        }
    }
}
