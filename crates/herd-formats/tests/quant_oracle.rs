//! Block formats against llama.cpp and gguf-py (tests/fixtures/gguf/quants.gguf, made by
//! tests/fixtures/gen/gen_quants.py): dequantization equals gguf-py's bit for bit, and
//! quantization equals ggml's reference quantizer byte for byte.

use std::path::Path;

use herd_formats::GgufFile;
use herd_kernels::DType;
use herd_kernels::dtype::decode;
use herd_kernels::quant::quantize;

fn fixture() -> GgufFile {
    GgufFile::open(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/quants.gguf"),
    )
    .unwrap()
}

fn f32_tensor(f: &GgufFile, name: &str) -> Vec<f32> {
    let info = f
        .tensor_info(name)
        .unwrap_or_else(|| panic!("{name} in fixture"));
    assert_eq!(info.dtype, DType::F32);
    decode(
        DType::F32,
        f.tensor_bytes(info).as_slice(),
        info.n_elements() as usize,
    )
}

const TYPES: [DType; 13] = [
    DType::F16,
    DType::BF16,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q2K,
    DType::Q3K,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
    DType::Q8K,
];

#[test]
fn dequantization_equals_the_oracle_bit_for_bit() {
    let f = fixture();
    for t in TYPES {
        let name = t.name().to_lowercase();
        let q = f.tensor_info(&format!("{name}.q")).unwrap();
        assert_eq!(q.dtype, t);
        let got = decode(t, f.tensor_bytes(q).as_slice(), q.n_elements() as usize);
        let want = f32_tensor(&f, &format!("{name}.deq"));
        let mismatches = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            mismatches,
            0,
            "{t}: {mismatches} of {} values differ",
            want.len()
        );
    }
}

#[test]
fn quantization_equals_llama_cpp_byte_for_byte() {
    let f = fixture();
    for t in TYPES {
        let name = t.name().to_lowercase();
        let src = f32_tensor(&f, &format!("{name}.src"));
        let info = f.tensor_info(&format!("{name}.q")).unwrap();
        let want = f.tensor_bytes(info);
        let mut got = vec![0u8; want.len()];
        quantize(t, &src, &mut got);
        let bad_blocks = got
            .chunks_exact(t.type_size())
            .zip(want.as_slice().chunks_exact(t.type_size()))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            bad_blocks, 0,
            "{t}: {bad_blocks} blocks differ from llama.cpp"
        );
    }
}
