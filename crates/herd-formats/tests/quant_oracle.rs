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

/// herd's dequantization of the fixture's `<t>.q` equals its `<t>.deq`, bit for bit.
fn assert_dequantization_matches(f: &GgufFile, t: DType) {
    let name = t.name().to_lowercase();
    let q = f.tensor_info(&format!("{name}.q")).unwrap();
    assert_eq!(q.dtype, t);
    let got = decode(t, f.tensor_bytes(q).as_slice(), q.n_elements() as usize);
    let want = f32_tensor(f, &format!("{name}.deq"));
    let mismatches = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        mismatches,
        0,
        "{t}: {mismatches} of {} values differ from the oracle",
        want.len()
    );
    assert!(want.iter().any(|v| *v != 0.0), "{t}: an all-zero oracle");
}

#[test]
fn dequantization_equals_the_oracle_bit_for_bit() {
    let f = fixture();
    for t in TYPES {
        assert_dequantization_matches(&f, t);
    }
}

/// herd's quantization of `src` to `t` equals the fixture's `<t>.q` (ggml's bytes), block for
/// block.
fn assert_quantization_matches(f: &GgufFile, t: DType, src: &[f32]) {
    let info = f
        .tensor_info(&format!("{}.q", t.name().to_lowercase()))
        .unwrap();
    let want = f.tensor_bytes(info);
    let mut got = vec![0u8; want.len()];
    quantize(t, src, &mut got);
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

#[test]
fn quantization_equals_llama_cpp_byte_for_byte() {
    let f = fixture();
    for t in TYPES {
        let src = f32_tensor(&f, &format!("{}.src", t.name().to_lowercase()));
        assert_quantization_matches(&f, t, &src);
    }
}

/// The importance-matrix types and MXFP4: quantized by ggml (with the fixture's importance
/// matrix where ggml requires one), dequantized by gguf-py.
const IQ_TYPES: [DType; 10] = [
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

#[test]
fn iq_dequantization_equals_gguf_py_bit_for_bit() {
    let f = fixture();
    for t in IQ_TYPES {
        assert_dequantization_matches(&f, t);
    }
}

/// herd's IQ4_NL, IQ4_XS and MXFP4 quantizers (ggml's, without an importance matrix) write the
/// bytes ggml's `ggml_quantize_chunk` wrote for the fixture's rows.
#[test]
fn iq4_and_mxfp4_quantization_equals_llama_cpp_byte_for_byte() {
    let f = fixture();
    let src = f32_tensor(&f, "q4_0.src");
    for t in [DType::IQ4NL, DType::IQ4XS, DType::MXFP4] {
        assert_quantization_matches(&f, t, &src);
    }
}

/// herd's quantizers write the bytes ggml's `ggml_quantize_chunk` wrote for the fixture's rows
/// (`q4_0.src`) in each case the fixture holds: the IQ1–IQ3 types as their `.q` (with the
/// fixture's importance matrix for the types ggml requires one for, IQ1_M too; without for the
/// others), every type whose quantizer reads a matrix with it (`.qw`: ggml's
/// `quantize_row_*_impl`, what llama-quantize runs with `--imatrix`), and IQ1_M without
/// (`iq1_m.q0`).
#[test]
fn importance_guided_quantization_equals_llama_cpp_byte_for_byte() {
    use herd_kernels::quant::quantize_with_importance;
    let f = fixture();
    let src = f32_tensor(&f, "q4_0.src");
    let imatrix = f32_tensor(&f, "imatrix");
    let n = imatrix.len();
    let mut cases: Vec<(String, DType, bool)> = Vec::new();
    for t in [DType::IQ2XXS, DType::IQ2XS, DType::IQ1S, DType::IQ1M] {
        cases.push((format!("{}.q", t.name().to_lowercase()), t, true));
    }
    for t in [DType::IQ2S, DType::IQ3XXS, DType::IQ3S] {
        cases.push((format!("{}.q", t.name().to_lowercase()), t, false));
    }
    for t in [
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::IQ2S,
        DType::IQ3XXS,
        DType::IQ3S,
        DType::IQ4NL,
        DType::IQ4XS,
    ] {
        cases.push((format!("{}.qw", t.name().to_lowercase()), t, true));
    }
    cases.push(("iq1_m.q0".into(), DType::IQ1M, false));
    for (name, t, with_matrix) in cases {
        let info = f.tensor_info(&name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(info.dtype, t, "{name}");
        let want = f.tensor_bytes(info);
        let want = want.as_slice();
        let mut got = vec![0u8; want.len()];
        let row_bytes = t.bytes_for(n);
        for (x, out) in src.chunks_exact(n).zip(got.chunks_exact_mut(row_bytes)) {
            if with_matrix {
                quantize_with_importance(t, x, &imatrix, out);
            } else {
                quantize(t, x, out);
            }
        }
        let bad: Vec<usize> = got
            .chunks_exact(t.type_size())
            .zip(want.chunks_exact(t.type_size()))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i)
            .collect();
        assert!(
            bad.is_empty(),
            "{name}: blocks {bad:?} of {} differ from llama.cpp",
            want.len() / t.type_size()
        );
    }
}

/// Each IQ row's integer dot product (the kernel this CPU runs, and the scalar reference)
/// against another fixture row quantized as llama.cpp pairs them (Q8_0 or Q8_K) equals the f64
/// dot product of the two dequantized rows, to f32 rounding: |error| ≤ 1e-5 · Σ|w·a|.
#[test]
fn iq_dot_products_equal_the_dequantized_rows() {
    use herd_kernels::quant::{quantize_activation, vec_dot, vec_dot_scalar};
    let f = fixture();
    let src = f32_tensor(&f, "q4_0.src");
    let n = 512;
    let rows = src.len() / n;
    for t in IQ_TYPES {
        let name = t.name().to_lowercase();
        let q = f.tensor_info(&format!("{name}.q")).unwrap();
        let wq = f.tensor_bytes(q);
        let wq = wq.as_slice();
        let at = t.vec_dot_type();
        for r in 0..rows {
            let w_row = &wq[r * t.bytes_for(n)..(r + 1) * t.bytes_for(n)];
            let w_deq = decode(t, w_row, n);
            for ar in 0..rows {
                let mut aq = vec![0u8; at.bytes_for(n)];
                quantize_activation(at, &src[ar * n..(ar + 1) * n], &mut aq);
                let a_deq = decode(at, &aq, n);
                let (want, mag) = w_deq
                    .iter()
                    .zip(&a_deq)
                    .fold((0f64, 0f64), |(s, m), (w, a)| {
                        let p = *w as f64 * *a as f64;
                        (s + p, m + p.abs())
                    });
                let scalar = vec_dot_scalar(t, w_row, &aq, n);
                let fast = vec_dot(t, w_row, &aq, n);
                for (what, got) in [("scalar", scalar), ("dispatched", fast)] {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * mag.max(1e-30),
                        "{t} row {r} · activations {ar} ({what}): {got} against {want} (Σ|w·a| {mag})"
                    );
                }
            }
        }
    }
}
