//! `herd random-model` and `herd bench` end to end on a tiny Llama 4 shape: the random GGUF is
//! typed as llama-quantize would type it, loads and runs; the benchmark reports every test and a
//! roofline computed from the file's own tensor table.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use herd_formats::GgufFile;
use herd_kernels::DType;
use herd_models::{Batch, load_gguf};

fn herd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_herd"))
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "herd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A small Llama 4 shape (every layer MoE, 4 experts top-1, Scout's RoPE scaling and QK norm),
/// with rows that are whole 256-blocks so K-quants apply.
fn tiny_config(dir: &Path) -> PathBuf {
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        r#"{"model_type": "llama4_text", "vocab_size": 512, "hidden_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "intermediate_size": 256, "intermediate_size_mlp": 512, "num_local_experts": 4,
        "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "max_position_embeddings": 4096,
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 16.0,
        "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
        "attention_chunk_size": 8192, "use_qk_norm": true}"#,
    )
    .unwrap();
    path
}

fn random_model(config: &Path, out: &Path, file_type: &str, seed: &str) {
    ok(herd()
        .arg("random-model")
        .arg(config)
        .arg(out)
        .args(["--type", file_type, "--seed", seed])
        .output()
        .unwrap());
}

#[test]
fn random_model_is_typed_like_llama_quantize_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path());
    let (a, b, c) = (
        tmp.path().join("a.gguf"),
        tmp.path().join("b.gguf"),
        tmp.path().join("c.gguf"),
    );
    random_model(&config, &a, "q4_k_m", "1");
    random_model(&config, &b, "q4_k_m", "1");
    random_model(&config, &c, "q4_k_m", "2");
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(bytes(&a), bytes(&b), "the seed fixes every byte");
    assert_ne!(bytes(&a), bytes(&c), "another seed, other weights");

    let f = GgufFile::open(&a).unwrap();
    assert_eq!(f.architecture(), Some("llama4"));
    let dtype = |name: &str| f.tensor_info(name).unwrap().dtype;
    // Q4_K_M: Q6_K output, Q4_K elsewhere except use_more_bits layers of attn_v / ffn_down
    // (for 4 layers: 2 and 3); routers and norms stay f32.
    assert_eq!(dtype("output.weight"), DType::Q6K);
    assert_eq!(dtype("token_embd.weight"), DType::Q4K);
    assert_eq!(dtype("blk.1.attn_q.weight"), DType::Q4K);
    assert_eq!(dtype("blk.2.attn_v.weight"), DType::Q6K);
    assert_eq!(dtype("blk.1.attn_v.weight"), DType::Q4K);
    assert_eq!(dtype("blk.0.ffn_down_exps.weight"), DType::Q4K);
    assert_eq!(dtype("blk.3.ffn_down_exps.weight"), DType::Q6K);
    assert_eq!(dtype("blk.2.ffn_gate_exps.weight"), DType::Q4K);
    assert_eq!(dtype("blk.2.ffn_gate_inp.weight"), DType::F32);
    assert_eq!(dtype("blk.2.attn_norm.weight"), DType::F32);
    assert_eq!(dtype("rope_freqs.weight"), DType::F32);
    let tokens = f.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(tokens.len(), 512, "a vocabulary as large as the embedding");

    let model = load_gguf(&a).unwrap();
    let mut cache = model.new_cache();
    let logits = model
        .forward(&Batch::sequence(0, &[1, 300, 7, 42], 0), &mut cache, None)
        .unwrap();
    assert_eq!(logits.len(), 4 * 512);
    assert!(logits.iter().all(|v| v.is_finite()));
    let spread = logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(spread > 1e-3, "random weights give non-trivial logits");
}

/// Bytes one decoded token reads from the file's weights: every tensor whole, except one row of
/// the embedding and the chosen share (top-1 of 4) of the routed experts.
fn expected_weight_bytes(path: &Path) -> f64 {
    let f = GgufFile::open(path).unwrap();
    f.tensors()
        .iter()
        .map(|t| {
            let bytes = t.dtype.bytes_for(t.n_elements() as usize) as f64;
            if t.name == "token_embd.weight" {
                bytes / 512.0
            } else if t.name.contains("_exps") {
                bytes / 4.0
            } else {
                bytes
            }
        })
        .sum()
}

fn bench_json(args: &[&str], model: Option<&Path>) -> serde_json::Value {
    let mut cmd = herd();
    cmd.arg("bench");
    if let Some(m) = model {
        cmd.arg(m);
    }
    let out = ok(cmd
        .args(args)
        .args(["-p", "16", "-n", "4", "-r", "2", "-b", "1,3"])
        .args(["--batched-prompt", "4", "--batched-gen", "2", "--json"])
        .output()
        .unwrap());
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

#[test]
fn bench_reports_every_test_and_the_roofline() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path());
    let file = tmp.path().join("m.gguf");
    random_model(&config, &file, "q8_0", "0");
    let r = bench_json(&["-t", "2"], Some(&file));
    assert_eq!(r["threads"], 2);
    for key in ["pp_tokens_per_s", "tg_tokens_per_s"] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}");
    }
    for test in ["pp", "tg"] {
        let runs = r[test]["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "{test}: one value per repetition");
        let mean = runs.iter().map(|v| v.as_f64().unwrap()).sum::<f64>() / 2.0;
        assert!((r[test]["mean"].as_f64().unwrap() - mean).abs() < 1e-9 * mean);
    }
    assert_eq!(r["pp_tokens_per_s"], r["pp"]["mean"]);
    let batched = r["batched"].as_array().unwrap();
    assert_eq!(batched.len(), 2);
    assert_eq!(batched[1]["sequences"], 3);
    assert!(batched[1]["tokens_per_s"]["mean"].as_f64().unwrap() > 0.0);

    let roof = &r["roofline"];
    let weights = roof["weight_bytes_per_token"].as_f64().unwrap();
    let expected = expected_weight_bytes(&file);
    assert!(
        (weights - expected).abs() < 1e-9 * expected,
        "{weights} vs {expected}"
    );
    // The default f16 cache: K and V of 2 kv heads × 64 × 2 bytes per layer per position,
    // 4 layers, tg4 → 2 positions on average.
    assert_eq!(r["kv_type"], "f16");
    assert_eq!(
        roof["kv_bytes_per_token"].as_f64().unwrap(),
        512.0 * 4.0 * 2.0
    );
    let bandwidth = roof["bandwidth_bytes_per_s"].as_f64().unwrap();
    assert!(bandwidth > 1e8, "a measured bandwidth: {bandwidth}");
    let bound = roof["bound_tokens_per_s"].as_f64().unwrap();
    assert!((bound - bandwidth / (weights + 4096.0)).abs() < 1e-6 * bound);
    let fraction = roof["fraction_of_bound"].as_f64().unwrap();
    let tg = r["tg_tokens_per_s"].as_f64().unwrap();
    assert!((fraction - tg / bound).abs() < 1e-9);

    // After 40 tokens of context in a Q8_0 cache (128 values per row: 4 blocks of 34 bytes),
    // tg4 sees 42 positions on average.
    let r = bench_json(&["-t", "2", "-d", "40", "--kv-type", "q8_0"], Some(&file));
    assert_eq!(
        (r["n_depth"].as_u64(), r["kv_type"].as_str()),
        (Some(40), Some("q8_0"))
    );
    assert!(r["pp_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["tg_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(
        r["roofline"]["kv_bytes_per_token"].as_f64().unwrap(),
        2.0 * 136.0 * 4.0 * 42.0
    );
}

#[test]
fn bench_refuses_a_kv_type_the_model_cannot_hold() {
    let out = herd()
        .args(["bench", "--kv-type", "q4_0", "--random-weights"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"q4_0\" is not a KV cache type: choose one of f32, f16, bf16, q8_0"),
        "{err}"
    );
}

#[test]
fn bench_runs_random_weights_without_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path());
    let r = bench_json(
        &[
            "--random-weights",
            "--preset",
            config.to_str().unwrap(),
            "--type",
            "q4_0",
        ],
        None,
    );
    assert!(r["model"].as_str().unwrap().contains("random"));
    assert!(r["tg_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["path"].as_str().unwrap().contains("herd-random-"));
}

#[test]
fn bench_refuses_what_it_cannot_do() {
    let fails = |args: &[&str], needle: &str| {
        let out = herd().arg("bench").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    fails(&[], "--random-weights");
    fails(
        &["--random-weights", "--preset", "llama4:nope"],
        "unknown preset",
    );
    fails(
        &["--random-weights", "--preset", "gemma3:270m"],
        "llama4 shapes only",
    );
    // Maverick at Q4_K_M is about 240 GB: more memory than any test machine has.
    fails(
        &["--random-weights", "--preset", "llama4:maverick"],
        "available memory",
    );
    fails(&["/nonexistent/model.gguf"], "nonexistent");
}

/// `--quantize` at load: a float Hugging Face directory benchmarks with the types llama-quantize
/// gives the same model, and its roofline counts those types' bytes (the llama-quantize file of
/// the same weights reads the same).
#[test]
fn bench_quantizes_a_float_checkpoint_at_load() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama4_gguf");
    let at_load = bench_json(&["-t", "2", "--quantize", "q4_k_m"], Some(&fixture));
    let file = bench_json(
        &["-t", "2"],
        Some(&fixture.join("tiny-q4_k_m.llama-quantize.gguf")),
    );
    let bytes = |r: &serde_json::Value| r["roofline"]["weight_bytes_per_token"].as_f64().unwrap();
    assert_eq!(bytes(&at_load), bytes(&file));
    let float = bench_json(&["-t", "2"], Some(&fixture));
    assert!(
        bytes(&float) > 2.0 * bytes(&at_load),
        "f32 weights are larger"
    );
    assert!(at_load["tg_tokens_per_s"].as_f64().unwrap() > 0.0);

    let out = herd()
        .args(["bench", "--quantize", "q3_x"])
        .arg(&fixture)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown --quantize \"q3_x\""), "{err}");
}
