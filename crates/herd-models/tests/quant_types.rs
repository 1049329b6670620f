//! herd's copy of llama-quantize's type rules against llama-quantize itself: for every file
//! type, the type of every tensor of three Llama 4 shapes as `llama-quantize --dry-run` picks
//! it, with and without an importance matrix (tests/fixtures/quant_types, made by
//! tests/fixtures/gen/gen_quant_types.py). `herd plan` predicts sizes from these types, so they
//! must be exact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use herd_formats::quantize::{FileType, ModelShape, choose_types};
use herd_kernels::DType;
use herd_models::llama4::Llama4Config;
use herd_models::llama4::export::{gguf_model_shape, gguf_tensor_table};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The file types the fixtures hold (llama-quantize's names).
const FILE_TYPES: [&str; 19] = [
    "Q2_K",
    "Q2_K_S",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "IQ1_S",
    "IQ1_M",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "IQ2_M",
    "IQ3_XXS",
    "IQ3_XS",
    "IQ3_S",
    "IQ3_M",
    "IQ4_NL",
    "IQ4_XS",
    "MXFP4_MOE",
    "Q4_K_M",
];

fn check(label: &str, c: &Llama4Config, with_imatrix: bool) {
    let path = fixtures().join(format!("quant_types/{label}.json"));
    let table: BTreeMap<String, BTreeMap<String, String>> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for ft in FILE_TYPES {
        assert!(table.contains_key(ft), "{label}: {ft} missing");
        let key = format!("{ft}+imatrix");
        assert_eq!(table.contains_key(&key), with_imatrix, "{label}: {key}");
    }
    let tensors = gguf_tensor_table(c);
    for (key, want) in &table {
        let (ft_name, imatrix) = match key.strip_suffix("+imatrix") {
            Some(name) => (name, true),
            None => (key.as_str(), false),
        };
        let shape = ModelShape {
            imatrix,
            ..gguf_model_shape(c)
        };
        let ft = FileType::from_name(ft_name)
            .unwrap_or_else(|| panic!("herd has no file type {ft_name}"));
        let types = choose_types(
            ft,
            &shape,
            tensors
                .iter()
                .map(|(n, d)| (n.as_str(), d.as_slice(), DType::F32)),
        );
        let mut compared = 0;
        for ((name, _), got) in tensors.iter().zip(types) {
            // random-model leaves out rope_freqs (llama.cpp computes nothing from its values).
            let Some(want) = want.get(name) else { continue };
            assert_eq!(got.name(), want, "{label} {key}: {name}");
            compared += 1;
        }
        assert_eq!(compared, want.len(), "{label} {key}: every tensor compared");
    }
}

fn small_config() -> serde_json::Value {
    herd_formats::hf::read_json(&fixtures().join("llama4_iq/config.json")).unwrap()
}

#[test]
fn small_llama4_types_equal_llama_quantize() {
    check(
        "llama4-iq",
        &Llama4Config::from_json(&small_config()).unwrap(),
        true,
    );
}

/// Eight experts and four query heads per kv head (llama.cpp's special cases for both), 16
/// layers (so its first-eighth and first-sixteenth thresholds are not 0).
#[test]
fn eight_expert_llama4_types_equal_llama_quantize() {
    let mut json = small_config();
    json["num_hidden_layers"] = 16.into();
    json["num_local_experts"] = 8.into();
    json["num_attention_heads"] = 8.into();
    check("llama4-8e", &Llama4Config::from_json(&json).unwrap(), true);
}

#[test]
fn scout_shaped_types_equal_llama_quantize() {
    let p = herd_models::presets::preset("llama4:scout-4b").unwrap();
    check(
        "scout-4b",
        &Llama4Config::from_json(&p.config()).unwrap(),
        false,
    );
}
