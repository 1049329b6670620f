//! herd's copy of llama-quantize's type rules against llama-quantize itself: for every file
//! type, the type of every tensor of two Llama 4 shapes as `llama-quantize --dry-run` picks it
//! (tests/fixtures/quant_types, made by tests/fixtures/gen/gen_quant_types.py; no importance
//! matrix). `herd plan` predicts sizes from these types, so they must be exact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use herd_formats::quantize::{FileType, choose_types};
use herd_kernels::DType;
use herd_models::llama4::Llama4Config;
use herd_models::llama4::export::{gguf_model_shape, gguf_tensor_table};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn check(label: &str, c: &Llama4Config) {
    let text =
        std::fs::read_to_string(fixtures().join(format!("quant_types/{label}.json"))).unwrap();
    let table: BTreeMap<String, BTreeMap<String, String>> = serde_json::from_str(&text).unwrap();
    assert!(table.len() >= 19, "{label}: {} file types", table.len());
    let tensors = gguf_tensor_table(c);
    let shape = gguf_model_shape(c);
    for (ft_name, want) in &table {
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
            assert_eq!(got.name(), want, "{label} {ft_name}: {name}");
            compared += 1;
        }
        assert_eq!(
            compared,
            want.len(),
            "{label} {ft_name}: every tensor compared"
        );
    }
}

#[test]
fn small_llama4_types_equal_llama_quantize() {
    let json = herd_formats::hf::read_json(&fixtures().join("llama4_iq/config.json")).unwrap();
    check("llama4-iq", &Llama4Config::from_json(&json).unwrap());
}

#[test]
fn scout_shaped_types_equal_llama_quantize() {
    let p = herd_models::presets::preset("llama4:scout-4b").unwrap();
    check("scout-4b", &Llama4Config::from_json(&p.config()).unwrap());
}
