//! Element types of stored weights, and decoding them to `f32`.

use std::fmt;

/// How the elements of a stored tensor are encoded. Quantized block formats join this list
/// with the GGUF issue; every type decodes to `f32` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes taken by `n` elements.
    pub fn bytes_for(self, n: usize) -> usize {
        n * match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
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
    fn decodes_each_type() {
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
}
