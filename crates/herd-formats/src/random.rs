//! Random tensors for benchmark models (vLLM's "dummy" load format): what such a model measures
//! is speed, so its values only need to be finite, small and normal-looking like trained
//! weights, and its quantized blocks valid ones that any reader decodes.
//!
//! ggml's reference quantizers are far too slow to quantize billions of random values, so a
//! quantized tensor is assembled from a pool of blocks quantized once from normal values, each
//! block drawn at random from the pool: every block is a real quantized block, and the order of
//! blocks has no pattern a cache or a predictor could use.

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
    quant::quantize(dtype, &normals(POOL_BLOCKS * block), &mut pool);
    let mut out = Vec::with_capacity(dtype.bytes_for(n));
    for _ in 0..n / block {
        let b = (rng.next_u64() % POOL_BLOCKS as u64) as usize;
        out.extend_from_slice(&pool[b * block_bytes..(b + 1) * block_bytes]);
    }
    out
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
}
