//! herd plan's numbers against the reference note and against real files.

use std::path::{Path, PathBuf};

use herd_formats::GgufFile;
use herd_formats::quantize::FileType;
use herd_plan::hardware::{self, GIB};
use herd_plan::model::Part;
use herd_plan::plan::Pricing;
use herd_plan::{Hardware, KvType, Request, plan, resolve};

fn request(hw: Hardware) -> Request {
    Request {
        context: 8192,
        sequences: 1,
        kv_type: KvType::F16,
        hardware: hw,
        pricing: Pricing::default(),
    }
}

fn within(got: f64, want: f64, rel: f64) -> bool {
    ((got - want) / want).abs() <= rel
}

#[test]
fn scout_and_maverick_parameter_counts_match_the_reference() {
    for (alias, total, active) in [
        ("llama4:scout", 107.77e9, 17.17e9),
        ("llama4:maverick", 400.71e9, 17.19e9),
    ] {
        let r = plan(
            &resolve(alias, None).unwrap(),
            &request(Hardware::default()),
        )
        .unwrap();
        assert!(
            within(r.params_total as f64, total, 1e-3),
            "{alias} total {}",
            r.params_total
        );
        assert!(
            within(r.params_active, active, 1e-3),
            "{alias} active {}",
            r.params_active
        );
        assert_eq!(
            r.kv.bytes_per_token, 196_608.0,
            "{alias}: KV bytes per token at f16"
        );
    }
}

#[test]
fn chunk_aware_kv_matches_the_reference() {
    // §f: 12 global layers keep everything, 36 chunked layers at most 8192 tokens.
    let scout = resolve("llama4:scout", None).unwrap();
    let mut req = request(Hardware::default());
    req.context = 131072;
    let r = plan(&scout, &req).unwrap();
    assert_eq!(r.kv.naive_total, 196_608.0 * 131072.0);
    assert_eq!(
        r.kv.chunk_aware_total,
        4096.0 * (12.0 * 131072.0 + 36.0 * 8192.0)
    );
    assert!(
        within(r.kv.chunk_aware_total / GIB, 7.125, 1e-3),
        "≈ 7.2 GiB at 128K"
    );
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/llama4_gguf")
        .join(name)
}

fn file_bytes(path: &Path) -> u64 {
    GgufFile::open(path)
        .unwrap()
        .tensors()
        .iter()
        .map(|t| t.n_bytes)
        .sum()
}

/// Predicted from config.json and a type, the weight bytes equal those of the file llama.cpp's
/// tools write, type by type and tensor by tensor; and a GGUF file plans at its own bytes.
#[test]
fn predicted_weight_bytes_equal_real_files_exactly() {
    let dir = fixture("");
    let request = |hw| Request {
        context: 64,
        ..request(hw)
    };
    for (ft, file) in [
        (FileType::F32, "tiny-f32.gguf"),
        (FileType::Q8_0, "tiny-q8_0.gguf"),
        (FileType::Q4KM, "tiny-q4_k_m.llama-quantize.gguf"),
    ] {
        let facts = resolve(dir.to_str().unwrap(), Some(ft)).unwrap();
        let f = GgufFile::open(&fixture(file)).unwrap();
        for t in f.tensors() {
            let p = facts
                .tensors
                .iter()
                .find(|p| p.name == t.name)
                .unwrap_or_else(|| panic!("{file}: {}", t.name));
            assert_eq!((p.dtype, &p.dims), (t.dtype, &t.dims), "{file}: {}", t.name);
        }
        assert_eq!(
            facts.tensors.len(),
            f.tensors().len(),
            "{file}: tensor count"
        );
        let r = plan(&facts, &request(Hardware::default())).unwrap();
        assert_eq!(r.weight_bytes, file_bytes(&fixture(file)), "{file}");
    }
    for file in [
        "tiny-f32.gguf",
        "tiny-q8_0.gguf",
        "tiny-q4_k_m.llama-quantize.gguf",
    ] {
        let path = fixture(file);
        let r = plan(
            &resolve(path.to_str().unwrap(), None).unwrap(),
            &request(Hardware::default()),
        )
        .unwrap();
        assert_eq!(r.weight_bytes, file_bytes(&path), "{file}");
    }
}

/// The question everyone asks: Scout at Q4_K_M on one 24 GB GPU.
#[test]
fn scout_q4_k_m_on_a_24_gb_gpu() {
    let scout = resolve("llama4:scout", Some(FileType::Q4KM)).unwrap();
    let (gpu, n) = hardware::parse_gpu("rtx4090").unwrap();
    let hw = Hardware {
        gpu: Some(gpu.clone()),
        gpu_count: n,
        ram: Some(128.0 * GIB),
        ram_bandwidth: Some(90e9),
        cpu_flops: Some(2e12),
    };
    let r = plan(&scout, &request(hw)).unwrap();
    let gpu_only = &r.placements[0];
    assert!(
        gpu_only.name.starts_with("all on GPU") && !gpu_only.fits,
        "{}",
        gpu_only.name
    );
    assert!(
        r.weight_bytes as f64 > 60.0 * GIB,
        "Scout Q4_K_M is about 65 GB"
    );

    let split = &r.placements[1];
    assert!(split.name.starts_with("routed experts in system RAM") && split.fits);
    let part = |p: Part| r.parts.iter().find(|x| x.part == p).unwrap();
    let routed = part(Part::RoutedExperts);
    assert_eq!(
        split.ram_bytes_needed,
        routed.bytes as f64 + herd_plan::plan::PROCESS_BASE_BYTES
    );
    assert!(split.ram_bytes_needed > 50.0 * GIB && split.ram_bytes_needed < 60.0 * GIB);
    // The bound by hand: everything but the routed experts (one embedding row, 1 of 16 experts)
    // streams from the GPU, one expert in 16 from system RAM, plus the KV cache read.
    let kv_read = 196_608.0 * 8192.0 / 48.0 * (12.0 + 36.0);
    let gpu_read: f64 = r
        .parts
        .iter()
        .filter(|p| p.part != Part::RoutedExperts)
        .map(|p| {
            if p.part == Part::Embeddings {
                p.bytes as f64 / 202048.0
            } else {
                p.bytes as f64
            }
        })
        .sum::<f64>()
        + kv_read;
    let ram_read = routed.bytes as f64 / 16.0;
    let want = 1.0 / (gpu_read / gpu.bandwidth + ram_read / 90e9);
    let got = split.decode_tokens_per_s.unwrap();
    assert!(within(got, want, 1e-9), "bound {got} vs arithmetic {want}");
    assert!(
        r.recommendation.starts_with("routed experts in system RAM"),
        "{}",
        r.recommendation
    );
}

#[test]
fn impossible_requests_are_clear_errors() {
    assert!(
        hardware::parse_gpu("gtx9090")
            .unwrap_err()
            .to_string()
            .contains("unknown GPU")
    );
    assert!(
        hardware::parse_bytes("0GiB")
            .unwrap_err()
            .to_string()
            .contains("positive")
    );
    let scout = resolve("llama4:scout", None).unwrap();
    let mut req = request(Hardware::default());
    req.context = 20_000_000;
    assert!(
        plan(&scout, &req)
            .unwrap_err()
            .to_string()
            .contains("over the model's maximum")
    );
    req.context = 0;
    assert!(plan(&scout, &req).is_err());
    assert!(
        resolve("llama4:giant", None)
            .unwrap_err()
            .to_string()
            .contains("known alias")
    );
    assert!(
        resolve("hf:not-a-repo", None)
            .unwrap_err()
            .to_string()
            .contains("expected hf:org/repo")
    );
}

/// The default model's file (tests/fixtures/fetch.sh) plans at exactly its tensor bytes, and its
/// parameter count is the 268.1M the reference note gives.
#[test]
fn default_model_plans_at_its_file_size() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/downloaded/gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.exists(),
        "{} is missing: run tests/fixtures/fetch.sh",
        path.display()
    );
    let r = plan(
        &resolve(path.to_str().unwrap(), None).unwrap(),
        &request(Hardware::default()),
    )
    .unwrap();
    assert_eq!(r.weight_bytes, file_bytes(&path));
    assert!(
        within(r.params_total as f64, 268.1e6, 1e-3),
        "{}",
        r.params_total
    );
}

/// The default model predicted from its config alone at Q4_K_M equals the published file exactly,
/// tensor by tensor: llama-quantize's rules, including its fallbacks for rows of 640.
#[test]
fn default_model_alias_predicts_the_published_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/downloaded/gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.exists(),
        "{} is missing: run tests/fixtures/fetch.sh",
        path.display()
    );
    let facts = resolve("gemma3:270m", None).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(facts.tensors.len(), f.tensors().len());
    for t in f.tensors() {
        let p = facts
            .tensors
            .iter()
            .find(|p| p.name == t.name)
            .unwrap_or_else(|| panic!("{}", t.name));
        assert_eq!((p.dtype, &p.dims), (t.dtype, &t.dims), "{}", t.name);
    }
    let r = plan(&facts, &request(Hardware::default())).unwrap();
    assert_eq!(r.weight_bytes, file_bytes(&path));
}

/// A Gemma 3 Hugging Face directory is planned as Gemma 3 (its config's shape), not as Llama 4.
#[test]
fn gemma3_directories_are_planned_from_their_own_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gemma3/core");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let m = herd_plan::resolve(dir.to_str().unwrap(), None).unwrap();
    assert_eq!(
        m.n_layers as u64,
        config["num_hidden_layers"].as_u64().unwrap()
    );
    assert_eq!(m.hidden as u64, config["hidden_size"].as_u64().unwrap());
    assert_eq!(m.n_experts, 0);
}

/// Cost per million tokens is the price per second over tokens per second: the catalog's
/// per-GPU price times the count for GPU placements, the user's price for every placement when
/// given (the CPU-only placement has no catalog price), and a measured throughput costed at the
/// recommended placement's price.
#[test]
fn costs_per_million_tokens_follow_the_price_and_the_bounds() {
    let facts = resolve("llama4:scout", Some(FileType::Q4KM)).unwrap();
    let (gpu, n) = hardware::parse_gpu("h100x2").unwrap();
    let catalog_price = gpu.price_per_hour.unwrap();
    let hw = Hardware {
        gpu: Some(gpu),
        gpu_count: n,
        ram: Some(256.0 * GIB),
        ram_bandwidth: Some(90e9),
        cpu_flops: Some(2e12),
    };
    let r = plan(&facts, &request(hw.clone())).unwrap();
    let all_gpu = &r.placements[0];
    assert!(all_gpu.fits, "{}", all_gpu.name);
    assert_eq!(all_gpu.price_per_hour, Some(2.0 * catalog_price));
    let decode = all_gpu.decode_tokens_per_s.unwrap();
    let want = 2.0 * catalog_price / 3600.0 / decode * 1e6;
    assert!(within(
        all_gpu.output_cost_per_million.unwrap(),
        want,
        1e-12
    ));
    let prefill = all_gpu.prefill_tokens_per_s.unwrap();
    let want = 2.0 * catalog_price / 3600.0 / prefill * 1e6;
    assert!(within(all_gpu.input_cost_per_million.unwrap(), want, 1e-12));
    let cpu = r.placements.last().unwrap();
    assert_eq!(cpu.price_per_hour, None);
    assert_eq!(cpu.output_cost_per_million, None);
    assert_eq!(r.measured_output_cost_per_million, None);

    // A measured throughput without a price: the recommended placement's (all on the GPUs).
    let measured = Request {
        pricing: Pricing {
            price_per_hour: None,
            measured_tokens_per_s: Some(100.0),
        },
        ..request(hw.clone())
    };
    let m = plan(&facts, &measured).unwrap();
    assert!(
        m.recommendation.starts_with("all on GPU"),
        "{}",
        m.recommendation
    );
    assert_eq!(m.measured_price_per_hour, Some(2.0 * catalog_price));
    let want = 2.0 * catalog_price / 3600.0 / 100.0 * 1e6;
    assert!(within(
        m.measured_output_cost_per_million.unwrap(),
        want,
        1e-12
    ));

    let priced = Request {
        pricing: Pricing {
            price_per_hour: Some(1.5),
            measured_tokens_per_s: Some(50.0),
        },
        ..request(hw)
    };
    let r = plan(&facts, &priced).unwrap();
    for p in &r.placements {
        assert_eq!(p.price_per_hour, Some(1.5), "{}", p.name);
        let want = 1.5 / 3600.0 / p.decode_tokens_per_s.unwrap() * 1e6;
        assert!(within(p.output_cost_per_million.unwrap(), want, 1e-12));
    }
    // 50 tokens/s at $1.50 an hour: 180,000 tokens for $1.50, so $8.33 per million.
    assert!(within(
        r.measured_output_cost_per_million.unwrap(),
        1.5 / 0.18,
        1e-12
    ));
    let text = herd_plan::render::text(&r);
    assert!(text.contains("per million output tokens"), "{text}");
    assert!(text.contains("$8.33 per million output tokens"), "{text}");
}
