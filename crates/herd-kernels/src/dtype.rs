//! Element types of stored tensors (plain floats and ggml's quantized block formats), and
//! decoding them to `f32`.

use std::fmt;

use crate::quant;

/// How the elements of a stored tensor are encoded. Quantized types store `block_size()`
/// elements in `type_size()` bytes with the exact GGUF layout (see `quant`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    /// Activation-side: Q8_0 plus the scaled sum of each block (for Q4_1 / Q5_1 dot products).
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// Activation-side: 256 int8 values with an f32 scale and 16-element sums.
    Q8K,
    /// Importance-matrix types: lattice grids (`quant::iq` describes the layouts).
    IQ2XXS,
    IQ2XS,
    IQ2S,
    IQ3XXS,
    IQ3S,
    IQ1S,
    IQ1M,
    /// A 16-value non-linear table, 32 per block (IQ4_NL) or 256 with 6-bit block scales (IQ4_XS).
    IQ4NL,
    IQ4XS,
    /// OCP microscaling FP4: E2M1 values with one E8M0 exponent per 32.
    MXFP4,
}

impl DType {
    pub const ALL: [DType; 25] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q8_1,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::Q8K,
        DType::IQ2XXS,
        DType::IQ2XS,
        DType::IQ2S,
        DType::IQ3XXS,
        DType::IQ3S,
        DType::IQ1S,
        DType::IQ1M,
        DType::IQ4NL,
        DType::IQ4XS,
        DType::MXFP4,
    ];

    /// The type id in GGUF files (`ggml_type`).
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q8_1 => 9,
            DType::Q2K => 10,
            DType::Q3K => 11,
            DType::Q4K => 12,
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::Q8K => 15,
            DType::IQ2XXS => 16,
            DType::IQ2XS => 17,
            DType::IQ3XXS => 18,
            DType::IQ1S => 19,
            DType::IQ4NL => 20,
            DType::IQ3S => 21,
            DType::IQ2S => 22,
            DType::IQ4XS => 23,
            DType::IQ1M => 29,
            DType::BF16 => 30,
            DType::MXFP4 => 39,
        }
    }

    pub fn from_ggml_id(id: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// Elements per block (1 for plain floats).
    pub fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0
            | DType::Q4_1
            | DType::Q5_0
            | DType::Q5_1
            | DType::Q8_0
            | DType::Q8_1
            | DType::IQ4NL
            | DType::MXFP4 => 32,
            DType::Q2K
            | DType::Q3K
            | DType::Q4K
            | DType::Q5K
            | DType::Q6K
            | DType::Q8K
            | DType::IQ2XXS
            | DType::IQ2XS
            | DType::IQ2S
            | DType::IQ3XXS
            | DType::IQ3S
            | DType::IQ1S
            | DType::IQ1M
            | DType::IQ4XS => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            DType::Q8_1 => 36,
            DType::Q2K => 84,
            DType::Q3K => 110,
            DType::Q4K => 144,
            DType::Q5K => 176,
            DType::Q6K => 210,
            DType::Q8K => 292,
            DType::IQ2XXS => 66,
            DType::IQ2XS => 74,
            DType::IQ2S => 82,
            DType::IQ3XXS => 98,
            DType::IQ3S => 110,
            DType::IQ1S => 50,
            DType::IQ1M => 56,
            DType::IQ4NL => 18,
            DType::IQ4XS => 136,
            DType::MXFP4 => 17,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes taken by `n` elements (`n` a multiple of the block size).
    pub fn bytes_for(self, n: usize) -> usize {
        debug_assert_eq!(
            n % self.block_size(),
            0,
            "{self}: {n} elements is not whole blocks"
        );
        n / self.block_size() * self.type_size()
    }

    /// Checked form of [`bytes_for`](Self::bytes_for) for sizes read from files.
    pub fn checked_bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q8_1 => "Q8_1",
            DType::Q2K => "Q2_K",
            DType::Q3K => "Q3_K",
            DType::Q4K => "Q4_K",
            DType::Q5K => "Q5_K",
            DType::Q6K => "Q6_K",
            DType::Q8K => "Q8_K",
            DType::IQ2XXS => "IQ2_XXS",
            DType::IQ2XS => "IQ2_XS",
            DType::IQ2S => "IQ2_S",
            DType::IQ3XXS => "IQ3_XXS",
            DType::IQ3S => "IQ3_S",
            DType::IQ1S => "IQ1_S",
            DType::IQ1M => "IQ1_M",
            DType::IQ4NL => "IQ4_NL",
            DType::IQ4XS => "IQ4_XS",
            DType::MXFP4 => "MXFP4",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// The activation type this weight type's integer dot product takes (ggml's `vec_dot_type`);
    /// plain-float weights take f32.
    pub fn vec_dot_type(self) -> DType {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => DType::F32,
            DType::Q4_0 | DType::Q5_0 | DType::Q8_0 | DType::IQ4NL | DType::MXFP4 => DType::Q8_0,
            DType::Q4_1 | DType::Q5_1 => DType::Q8_1,
            DType::Q8_1 => DType::Q8_1,
            DType::Q2K
            | DType::Q3K
            | DType::Q4K
            | DType::Q5K
            | DType::Q6K
            | DType::Q8K
            | DType::IQ2XXS
            | DType::IQ2XS
            | DType::IQ2S
            | DType::IQ3XXS
            | DType::IQ3S
            | DType::IQ1S
            | DType::IQ1M
            | DType::IQ4XS => DType::Q8K,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decode `out.len()` elements of type `dtype` from little-endian `bytes` into `out`.
///
/// `bytes` need not be aligned (safetensors data offsets are not). Panics if `bytes` is not
/// exactly `dtype.bytes_for(out.len())` long: callers check shapes when they load a tensor.
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        bytes.len(),
        dtype.bytes_for(out.len()),
        "decode_into: length mismatch"
    );
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                // bf16 is the top half of an f32: widening is a shift, exact.
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        _ => quant::dequantize(dtype, bytes, out),
    }
}

/// Decode a whole tensor into a new vector.
pub fn decode(dtype: DType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    decode_into(dtype, bytes, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_float_type() {
        let v = [1.5f32, -2.25, 0.0, 65504.0];
        let f32_bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(decode(DType::F32, &f32_bytes, 4), v);
        let f16_bytes: Vec<u8> = v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(decode(DType::F16, &f16_bytes, 4), v);
        let bf16_bytes: Vec<u8> = v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let back = decode(DType::BF16, &bf16_bytes, 4);
        for (a, b) in back.iter().zip(v) {
            assert_eq!(*a, half::bf16::from_f32(b).to_f32());
        }
    }

    #[test]
    fn decodes_unaligned_bytes() {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&3.0f32.to_le_bytes());
        assert_eq!(decode(DType::F32, &bytes[1..], 1), [3.0]);
    }

    #[test]
    fn ggml_ids_round_trip_and_sizes_match_the_spec() {
        for t in DType::ALL {
            assert_eq!(DType::from_ggml_id(t.ggml_id()), Some(t));
            assert_eq!(DType::from_name(t.name()), Some(t));
        }
        assert_eq!(DType::Q4K.bytes_for(512), 288);
        // shared/reference/gguf.md's table: bits per weight of the IQ types and MXFP4.
        for (t, bpw) in [
            (DType::IQ2XXS, 2.0625),
            (DType::IQ2XS, 2.3125),
            (DType::IQ2S, 2.5625),
            (DType::IQ3XXS, 3.0625),
            (DType::IQ3S, 3.4375),
            (DType::IQ1S, 1.5625),
            (DType::IQ1M, 1.75),
            (DType::IQ4NL, 4.5),
            (DType::IQ4XS, 4.25),
            (DType::MXFP4, 4.25),
        ] {
            assert_eq!(
                8.0 * t.type_size() as f64 / t.block_size() as f64,
                bpw,
                "{t}"
            );
        }
        assert_eq!(DType::from_ggml_id(4), None, "removed Q4_2");
    }
}
