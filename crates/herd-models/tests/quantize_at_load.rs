//! Quantization at load (`--quantize`): a float checkpoint quantized while it loads computes what
//! llama.cpp computes on the GGUF its own tools make from the same weights
//! (tests/fixtures/llama4_gguf: `convert_hf_to_gguf.py --outtype q8_0` and `llama-quantize
//! Q4_K_M`, logits from llama.cpp in oracle.safetensors), whether the source is the Hugging Face
//! directory or the f32 GGUF.

use std::path::{Path, PathBuf};

use herd_formats::TensorSet;
use herd_formats::quantize::FileType;
use herd_kernels::DType;
use herd_models::{Batch, CausalLm, LoadOptions, load_model, load_model_with};

/// The oracles ran with an f32 KV cache.
const ORACLE_KV: DType = DType::F32;

/// Same weights bytes, same activation quantization, same integer dot products as llama.cpp:
/// what is left is f32 round-off (the GGUF tests of the same files use the same bound).
const SAME_FILE_TOLERANCE: f32 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn llama4_dir() -> PathBuf {
    fixtures().join("llama4_gguf")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tokens(dir: &Path) -> Vec<u32> {
    json(&dir.join("oracle.json"))["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

fn oracle(dir: &Path, name: &str) -> Vec<f32> {
    let set = TensorSet::open_file(&dir.join("oracle.safetensors")).unwrap();
    let t = set.get(name).unwrap();
    herd_kernels::dtype::decode(DType::F32, t.bytes.as_slice(), t.shape.iter().product())
}

fn logits(model: &dyn CausalLm, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache_of(ORACLE_KV).unwrap();
    model
        .forward(&Batch::sequence(0, tokens, 0), &mut cache, None)
        .unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let max_ref = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / max_ref
}

fn argmax(logits: &[f32], vocab: usize) -> Vec<usize> {
    logits
        .chunks_exact(vocab)
        .map(|r| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        })
        .collect()
}

fn quantized(path: &Path, ft: FileType) -> Box<dyn CausalLm> {
    let options = LoadOptions {
        quantize: Some(ft),
        ..LoadOptions::default()
    };
    load_model_with(path, &options).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn llama4_quantized_at_load_equals_llama_cpp_on_its_own_quantized_file() {
    let dir = llama4_dir();
    let tokens = tokens(&dir);
    for (ft, want) in [
        (FileType::Q8_0, "llama_cpp_q8_0"),
        (FileType::Q4KM, "llama_cpp_q4_k_m"),
    ] {
        let want = oracle(&dir, want);
        for source in [dir.clone(), dir.join("tiny-f32.gguf")] {
            let got = logits(quantized(&source, ft).as_ref(), &tokens);
            let e = rel_err(&got, &want);
            let what = format!("{} --quantize {}", source.display(), ft.name());
            eprintln!("{what}: relative error {e:.2e} against llama.cpp");
            assert!(e < SAME_FILE_TOLERANCE, "{what}: {e:e}");
            assert_eq!(argmax(&got, 128), argmax(&want, 128), "{what}: argmax");
        }
    }
}

#[test]
fn llama4_quantized_at_load_is_batch_and_split_invariant() {
    let dir = llama4_dir();
    let model = quantized(&dir, FileType::Q4KM);
    let tokens = tokens(&dir);
    let whole = logits(model.as_ref(), &tokens);
    // The same prompt in two steps gives the same bits for the positions of the second step.
    let mut cache = model.new_cache_of(ORACLE_KV).unwrap();
    let (a, b) = tokens.split_at(tokens.len() / 2);
    model
        .forward(&Batch::sequence(0, a, 0), &mut cache, None)
        .unwrap();
    let second = model
        .forward(&Batch::sequence(0, b, a.len()), &mut cache, None)
        .unwrap();
    assert_eq!(second, whole[a.len() * 128..]);
}

/// Gemma 3 has no HF-to-GGUF converter here, so the quantized model is judged against
/// transformers in float64 on the float weights: the error is q8_0's (a few parts in a
/// thousand on these tiny random models), far below what a misplaced row or a wrong type would
/// give, and every position keeps its top token.
#[test]
fn gemma3_quantized_at_load_stays_close_to_transformers() {
    for name in ["core", "mqa"] {
        let dir = fixtures().join("gemma3").join(name);
        let tokens = tokens(&dir);
        let want = oracle(&dir, "logits");
        let float = logits(load_model(&dir).unwrap().as_ref(), &tokens);
        let got = logits(quantized(&dir, FileType::Q8_0).as_ref(), &tokens);
        let (e_float, e) = (rel_err(&float, &want), rel_err(&got, &want));
        eprintln!("gemma3 {name}: float {e_float:.2e}, q8_0 at load {e:.2e}");
        assert!(e < 2e-2, "gemma3 {name} q8_0: {e:e}");
        assert!(e > e_float, "gemma3 {name}: the weights were quantized");
        let vocab = want.len() / tokens.len();
        assert_eq!(
            argmax(&got, vocab),
            argmax(&want, vocab),
            "gemma3 {name}: argmax"
        );
    }
}
