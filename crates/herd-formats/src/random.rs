//! Random tensors for benchmark models (vLLM's "dummy" load format): what such a model measures
//! is speed, so its values only need to be finite, small and normal-looking like trained
//! weights, and its quantized blocks valid ones that any reader decodes.
//!
//! ggml's reference quantizers are far too slow to quantize billions of random values, so a
//! quantized tensor is assembled from a pool of blocks quantized once from normal values, each
//! block drawn at random from the pool: every block is a real quantized block, and the order of
//! blocks has no pattern a cache or a predictor could use.
//!
//! Types herd does not quantize to (IQ1–IQ3, whose quantizers need an importance matrix or are
//! not written yet) get a pool of random bytes instead, every bit pattern being a
//! valid block of them, with the block scales set so the values have the requested spread.

use herd_kernels::rng::SplitMix64;
use herd_kernels::{DType, quant};

/// Blocks in the pool a quantized tensor is drawn from.
const POOL_BLOCKS: usize = 1024;

/// `n` values drawn from N(0, std²), stored as `dtype` (`n` a whole number of its blocks).
pub fn random_tensor(dtype: DType, n: usize, std: f32, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    let mut normals =
        |count: usize| -> Vec<f32> { (0..count).map(|_| rng.normal() * std).collect() };
    if !dtype.is_quantized() {
        let mut out = vec![0u8; dtype.bytes_for(n)];
        quant::quantize(dtype, &normals(n), &mut out);
        return out;
    }
    let (block, block_bytes) = (dtype.block_size(), dtype.bytes_for(dtype.block_size()));
    assert!(
        n.is_multiple_of(block),
        "random_tensor: {n} values are not whole {dtype} blocks"
    );
    let mut pool = vec![0u8; POOL_BLOCKS * block_bytes];
    if quant::quantize_supported(dtype) {
        quant::quantize(dtype, &normals(POOL_BLOCKS * block), &mut pool);
    } else {
        random_blocks(dtype, &mut pool, std, &mut rng);
    }
    let mut out = Vec::with_capacity(dtype.bytes_for(n));
    for _ in 0..n / block {
        let b = (rng.next_u64() % POOL_BLOCKS as u64) as usize;
        out.extend_from_slice(&pool[b * block_bytes..(b + 1) * block_bytes]);
    }
    out
}

/// Random bytes as blocks of `dtype` (an IQ type or MXFP4), each block's scale set so the
/// values' root mean square is about `std`.
fn random_blocks(dtype: DType, pool: &mut [u8], std: f32, rng: &mut SplitMix64) {
    for b in pool.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    let rms = |pool: &[u8]| {
        let v = herd_kernels::dtype::decode(
            dtype,
            pool,
            pool.len() / dtype.type_size() * dtype.block_size(),
        );
        (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    let block_bytes = dtype.type_size();
    for b in pool.chunks_exact_mut(block_bytes) {
        set_block_scale(dtype, b, 1.0);
    }
    let scale = (std as f64 / rms(pool)) as f32;
    for b in pool.chunks_exact_mut(block_bytes) {
        set_block_scale(dtype, b, scale);
    }
}

/// Set the scale of one block of an IQ type or MXFP4 (the nearest MXFP4 power of two).
fn set_block_scale(dtype: DType, b: &mut [u8], d: f32) {
    match dtype {
        DType::MXFP4 => b[0] = (d.log2().round() as i32 + 128).clamp(2, 254) as u8,
        // IQ1_M keeps its f16 scale in the top nibbles of the u16 words at 48, 50, 52, 54.
        DType::IQ1M => {
            let bits = half::f16::from_f32(d).to_bits();
            for i in 0..4 {
                let nibble = ((bits >> (4 * i)) & 0xF) as u8;
                b[49 + 2 * i] = (b[49 + 2 * i] & 0x0F) | (nibble << 4);
            }
        }
        _ => b[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_kernels::dtype::decode;

    #[test]
    fn random_tensors_decode_to_the_requested_spread() {
        for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4K, DType::Q6K] {
            let n = 256 * 64;
            let bytes = random_tensor(dtype, n, 0.02, 7);
            assert_eq!(bytes.len(), dtype.bytes_for(n), "{dtype}");
            let v = decode(dtype, &bytes, n);
            let mean = v.iter().sum::<f32>() / n as f32;
            let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n as f32).sqrt();
            assert!(v.iter().all(|x| x.is_finite()), "{dtype}");
            assert!(mean.abs() < 0.002, "{dtype}: mean {mean}");
            assert!((0.016..0.024).contains(&std), "{dtype}: std {std}");
            assert_eq!(bytes, random_tensor(dtype, n, 0.02, 7), "{dtype}: seeded");
            assert_ne!(
                bytes,
                random_tensor(dtype, n, 0.02, 8),
                "{dtype}: seed matters"
            );
        }
    }

    /// The IQ types and MXFP4 (random bytes for IQ1–IQ3, quantized normals for the others):
    /// valid blocks of about the requested spread (MXFP4's scale is a power of two).
    #[test]
    fn random_tensors_of_iq_and_mxfp4_types() {
        for dtype in [
            DType::IQ1S,
            DType::IQ1M,
            DType::IQ2XXS,
            DType::IQ2XS,
            DType::IQ2S,
            DType::IQ3XXS,
            DType::IQ3S,
            DType::IQ4NL,
            DType::IQ4XS,
            DType::MXFP4,
        ] {
            let n = 256 * 64;
            let bytes = random_tensor(dtype, n, 0.02, 7);
            let v = decode(dtype, &bytes, n);
            let rms = (v.iter().map(|x| x * x).sum::<f32>() / n as f32).sqrt();
            assert!(v.iter().all(|x| x.is_finite()), "{dtype}");
            assert!((0.014..0.029).contains(&rms), "{dtype}: rms {rms}");
        }
    }
}
