//! `herd plan` from the command line, and its memory prediction against a real herd process.

use std::path::Path;
use std::process::Command;

use herd_formats::gguf::{GgufWriter, Value};
use herd_kernels::DType;

fn herd(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// [`herd`] against a hub stand-in at `endpoint`, with its cache in `cache`.
fn herd_with_hub(endpoint: &str, cache: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HERD_CACHE", cache)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn scout_on_a_24_gb_gpu_from_the_command_line() {
    let (code, out, err) = herd(&[
        "plan",
        "llama4:scout",
        "--type",
        "q4_k_m",
        "--gpu",
        "rtx4090",
        "--ram",
        "128GiB",
        "--mem-bandwidth",
        "90GB/s",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("all on GPU") && out.contains("does NOT fit"),
        "{out}"
    );
    assert!(
        out.contains("recommendation: routed experts in system RAM"),
        "{out}"
    );
    let (code, out, _) = herd(&["plan", "llama4:maverick", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["params_total"].as_u64().unwrap() > 400_000_000_000);
    assert!(
        v["placements"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"].as_str().unwrap().starts_with("CPU only"))
    );
    for (args, needle) in [
        (
            vec!["plan", "llama4:scout", "--gpu", "rtx9999"],
            "unknown GPU",
        ),
        (
            vec!["plan", "llama4:scout", "--gpu-mem", "0GiB"],
            "positive",
        ),
        (
            vec!["plan", "llama4:scout", "--context", "99999999"],
            "maximum",
        ),
        (
            vec!["plan", "llama4:scout", "--type", "q9_9"],
            "unknown --type",
        ),
    ] {
        let (code, _, err) = herd(&args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// A Llama 4 GGUF of about 140 MB with random f32 weights (top-4 of 4 experts, so every weight is
/// touched by the forward pass).
fn write_model(path: &Path) {
    let (h, layers, heads, kv, d, e, inter, vocab) =
        (512u64, 4usize, 4u64, 2u64, 128u64, 4u64, 1024u64, 1024u64);
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::string("llama4"));
    for (k, v) in [
        ("block_count", layers as u64),
        ("context_length", 256),
        ("embedding_length", h),
        ("feed_forward_length", 2048),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv),
        ("rope.dimension_count", d),
        ("expert_count", e),
        ("expert_used_count", e),
        ("expert_feed_forward_length", inter),
        ("interleave_moe_layer_step", 1),
    ] {
        w.set(&format!("llama4.{k}"), Value::U32(v as u32));
    }
    w.set("llama4.rope.freq_base", Value::F32(500000.0));
    w.set("llama4.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    let mut tensors: Vec<(String, Vec<u64>)> = vec![
        ("token_embd.weight".into(), vec![h, vocab]),
        ("output.weight".into(), vec![h, vocab]),
        ("output_norm.weight".into(), vec![h]),
    ];
    for l in 0..layers {
        for (n, dims) in [
            ("attn_norm", vec![h]),
            ("attn_q", vec![h, heads * d]),
            ("attn_k", vec![h, kv * d]),
            ("attn_v", vec![h, kv * d]),
            ("attn_output", vec![heads * d, h]),
            ("ffn_norm", vec![h]),
            ("ffn_gate_inp", vec![h, e]),
            ("ffn_gate_shexp", vec![h, inter]),
            ("ffn_up_shexp", vec![h, inter]),
            ("ffn_down_shexp", vec![inter, h]),
            ("ffn_gate_exps", vec![h, inter, e]),
            ("ffn_up_exps", vec![h, inter, e]),
            ("ffn_down_exps", vec![inter, h, e]),
        ] {
            tensors.push((format!("blk.{l}.{n}.weight"), dims));
        }
    }
    for (n, dims) in &tensors {
        w.add_tensor(n, dims, DType::F32);
    }
    let mut seed = 1u64;
    w.write(path, |i| {
        let (name, dims) = &tensors[i];
        let n: u64 = dims.iter().product();
        let norm = name.contains("norm");
        let mut out = Vec::with_capacity(n as usize * 4);
        for _ in 0..n {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
            out.extend_from_slice(&(if norm { 1.0 + r } else { r }).to_le_bytes());
        }
        Ok(out)
    })
    .unwrap();
}

#[test]
fn predicted_resident_memory_matches_a_real_process() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m.gguf");
    write_model(&model);
    let tokens: Vec<String> = (0..16).map(|t| (t * 37 % 1024).to_string()).collect();
    let (code, out, err) = herd(&[
        "plan",
        model.to_str().unwrap(),
        "--context",
        "16",
        "--kv-type",
        "f32",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    let predicted = plan["cpu_process_bytes"].as_f64().unwrap();
    let npy = tmp.path().join("l.npy");
    let (code, _, err) = herd(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
        "--out",
        npy.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let measured: f64 = err
        .lines()
        .find_map(|l| l.strip_prefix("peak resident memory: "))
        .and_then(|l| l.trim_end_matches(" bytes").parse().ok())
        .expect("herd logits reports its peak resident memory");
    let rel = (measured - predicted).abs() / predicted;
    eprintln!(
        "predicted {predicted:.0} bytes, measured {measured:.0} bytes ({:.1}%)",
        rel * 100.0
    );
    assert!(
        rel <= 0.10,
        "predicted {predicted:.0}, measured {measured:.0}"
    );
}

/// `hf:` references through HF_ENDPOINT (a local stand-in here): plan reads only the GGUF header
/// (or config.json) and predicts the file's exact bytes; pull downloads once into the cache.
#[test]
fn hub_references_plan_and_pull() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama4_gguf");
    let endpoint = herd_formats::hub::mock::serve(fixtures.clone(), false, 64);
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| herd_with_hub(&endpoint, cache.path(), args);
    let (code, out, err) = run(&[
        "plan",
        "hf:org/tiny:tiny-q8_0.gguf",
        "--context",
        "16",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    let file = herd_formats::GgufFile::open(&fixtures.join("tiny-q8_0.gguf")).unwrap();
    let bytes: u64 = file.tensors().iter().map(|t| t.n_bytes).sum();
    assert_eq!(plan["weight_bytes"].as_u64(), Some(bytes));
    let (code, out, err) = run(&[
        "plan",
        "hf:org/tiny",
        "--type",
        "q8_0",
        "--context",
        "16",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        plan["weight_bytes"].as_u64(),
        Some(bytes),
        "config.json + q8_0 predicts the converter's file"
    );

    let (code, out, err) = run(&["pull", "hf:org/tiny:tiny-q8_0.gguf"]);
    assert_eq!(code, Some(0), "{err}");
    let path = std::path::PathBuf::from(out.trim());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(fixtures.join("tiny-q8_0.gguf")).unwrap()
    );
    let (code, out2, err) = run(&["pull", "hf:org/tiny:tiny-q8_0.gguf"]);
    assert_eq!((code, out2.trim()), (Some(0), out.trim()));
    assert!(
        !err.contains("fetching"),
        "second pull must not download again: {err}"
    );
    let (code, _, err) = run(&["pull", "hf:org/tiny:missing.gguf"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not found"), "{err}");
}

/// A split set (llama.cpp's `llama-gguf-split`) is taken wherever a file is: `inspect` lists its
/// shards, `plan` predicts the same weights as the unsplit file, `bench` runs it; a missing
/// shard is a clear error.
#[test]
fn split_sets_are_taken_wherever_a_file_is() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama4_gguf");
    let whole = fixtures.join("tiny-q4_k_m.llama-quantize.gguf");
    let shard = |i: usize| fixtures.join(format!("split/tiny-q4_k_m-{i:05}-of-00004.gguf"));
    let second = shard(2);
    let (code, out, err) = herd(&["inspect", second.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("split set of 4 files"), "{out}");
    for i in 1..=4 {
        assert!(out.contains(&shard(i).display().to_string()), "{out}");
    }
    let plan = |path: &Path| {
        let (code, out, err) = herd(&["plan", path.to_str().unwrap(), "--context", "16", "--json"]);
        assert_eq!(code, Some(0), "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["weight_bytes"].as_u64()
    };
    assert!(plan(&whole).is_some());
    assert_eq!(plan(&second), plan(&whole));
    let (code, out, err) = herd(&[
        "bench",
        second.to_str().unwrap(),
        "-p",
        "8",
        "-n",
        "2",
        "-r",
        "1",
        "-b",
        "0",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("pp8") && out.contains("tg2"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    for i in [1, 2, 4] {
        let s = shard(i);
        std::fs::copy(&s, dir.path().join(s.file_name().unwrap())).unwrap();
    }
    let first = dir.path().join("tiny-q4_k_m-00001-of-00004.gguf");
    let (code, _, err) = herd(&["inspect", first.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("shard 3 of 4") && err.contains("is missing"),
        "{err}"
    );
}

/// `hf:org/repo:QUANT` picks the quantization from the repository's file list (a local
/// stand-in of the hub here): a split set is pulled whole, once, and runs; a name that matches
/// nothing lists what the repository has; one that matches two candidates names them.
#[test]
fn pulls_by_quantization_name_take_whole_split_sets() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama4_gguf");
    let repo = tempfile::tempdir().unwrap();
    std::fs::create_dir(repo.path().join("Q4_K_M")).unwrap();
    for i in 1..=4 {
        let name = format!("tiny-q4_k_m-{i:05}-of-00004.gguf");
        std::fs::copy(
            fixtures.join("split").join(&name),
            repo.path().join("Q4_K_M").join(&name),
        )
        .unwrap();
    }
    std::fs::copy(
        fixtures.join("tiny-q8_0.gguf"),
        repo.path().join("tiny-Q8_0.gguf"),
    )
    .unwrap();
    std::fs::write(repo.path().join("README.md"), "# tiny\n").unwrap();
    let endpoint = herd_formats::hub::mock::serve(repo.path().to_path_buf(), false, 64);
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| herd_with_hub(&endpoint, cache.path(), args);
    let (code, out, err) = run(&["pull", "hf:org/tiny:q4_k_m"]);
    assert_eq!(code, Some(0), "{err}");
    let first = std::path::PathBuf::from(out.trim());
    assert!(
        first.ends_with("Q4_K_M/tiny-q4_k_m-00001-of-00004.gguf"),
        "{out}"
    );
    for i in 1..=4 {
        let name = format!("tiny-q4_k_m-{i:05}-of-00004.gguf");
        assert_eq!(
            std::fs::read(first.with_file_name(&name)).unwrap(),
            std::fs::read(fixtures.join("split").join(&name)).unwrap()
        );
    }
    let (code, out2, err) = run(&["pull", "hf:org/tiny:Q4_K_M"]);
    assert_eq!((code, out2.trim()), (Some(0), out.trim()));
    assert!(
        !err.contains("fetching"),
        "second pull must not download again: {err}"
    );
    let (code, out, err) = run(&[
        "bench",
        "hf:org/tiny:Q4_K_M",
        "-p",
        "8",
        "-n",
        "2",
        "-r",
        "1",
        "-b",
        "0",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("tg2"), "{out}");

    // plan reads the four shards' headers only and predicts the unsplit file's weights.
    let weights = |out: &str| {
        let v: serde_json::Value = serde_json::from_str(out).unwrap();
        v["weight_bytes"].as_u64()
    };
    let (code, out, err) = run(&["plan", "hf:org/tiny:Q4_K_M", "--context", "16", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let whole = fixtures.join("tiny-q4_k_m.llama-quantize.gguf");
    let (code, out_whole, err) =
        run(&["plan", whole.to_str().unwrap(), "--context", "16", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(weights(&out), weights(&out_whole));
    assert!(weights(&out).is_some());
    // A shard named explicitly brings its whole set, for plan and for pull.
    let named = "hf:org/tiny:Q4_K_M/tiny-q4_k_m-00003-of-00004.gguf";
    let (code, out_named, err) = run(&["plan", named, "--context", "16", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(weights(&out_named), weights(&out_whole));
    let (code, out_pull, err) = run(&["pull", named]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::path::PathBuf::from(out_pull.trim()), first);

    let (code, _, err) = run(&["pull", "hf:org/tiny:IQ2_XXS"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no GGUF file for \"IQ2_XXS\"") && err.contains("Q4_K_M, Q8_0"),
        "{err}"
    );
    // The repository also holding a single-file Q4_K_M: two candidates, both named.
    std::fs::copy(
        fixtures.join("tiny-q4_k_m.llama-quantize.gguf"),
        repo.path().join("tiny-Q4_K_M.gguf"),
    )
    .unwrap();
    let (code, _, err) = run(&["pull", "hf:org/tiny:Q4_K_M"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("matches several") && err.contains("tiny-Q4_K_M.gguf"),
        "{err}"
    );
}

/// `hf:org/repo` without a file pulls a safetensors checkpoint whole: config, the shards its
/// index names (nothing else), tokenizer and generation files present; the directory runs. A
/// GGUF-only repository says to name a quantization, listing them.
#[test]
fn pulls_of_a_safetensors_repository_fetch_what_its_index_names() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama4_gguf");
    let repo = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixtures.join(f), repo.path().join(f)).unwrap();
    }
    let tensors = herd_formats::TensorSet::open_file(&fixtures.join("model.safetensors")).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = tensors
        .names()
        .map(|n| (n.to_string(), "model.safetensors".into()))
        .collect();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        repo.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::write(repo.path().join("unrelated.safetensors"), b"not fetched").unwrap();
    let endpoint = herd_formats::hub::mock::serve(repo.path().to_path_buf(), false, 64);
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str], endpoint: &str| herd_with_hub(endpoint, cache.path(), args);
    let (code, out, err) = run(&["pull", "hf:org/st"], &endpoint);
    assert_eq!(code, Some(0), "{err}");
    let dir = std::path::PathBuf::from(out.trim());
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(fixtures.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!dir.join("unrelated.safetensors").exists());
    let (code, out, err) = run(
        &[
            "bench",
            dir.to_str().unwrap(),
            "-p",
            "8",
            "-n",
            "2",
            "-r",
            "1",
            "-b",
            "0",
        ],
        &endpoint,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("tg2"), "{out}");

    let gguf_repo = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures.join("tiny-q8_0.gguf"),
        gguf_repo.path().join("tiny-Q8_0.gguf"),
    )
    .unwrap();
    let endpoint = herd_formats::hub::mock::serve(gguf_repo.path().to_path_buf(), false, 8);
    let (code, _, err) = run(&["pull", "hf:org/g"], &endpoint);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("holds GGUF files") && err.contains("hf:org/g:Q8_0"),
        "{err}"
    );
}

/// `herd inspect` names the licence a file or checkpoint declares, and Llama 4's licence and
/// acceptable use policy for Llama 4 weights (a GGUF file, or a checkpoint whose model card
/// names the llama4 licence).
#[test]
fn inspect_names_the_licence_and_llama4_terms() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let notice = "Llama 4 Community License Agreement";
    let gemma = root.join("downloaded/gemma-3-270m-q4_k_m.gguf");
    assert!(gemma.exists(), "run tests/fixtures/fetch.sh first");
    let (code, out, err) = herd(&["inspect", gemma.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\nlicence: gemma\n"), "{out}");
    assert!(!out.contains(notice), "{out}");
    let tiny = root.join("llama4_gguf/tiny-q8_0.gguf");
    let (code, out, err) = herd(&["inspect", tiny.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("licence: not stated in the file"), "{out}");
    assert!(out.contains(notice), "{out}");
    assert!(
        out.contains("https://www.llama.com/llama4/use-policy/"),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(root.join("llama4/hf_defaults").join(f), dir.path().join(f)).unwrap();
    }
    let (code, out, err) = herd(&["inspect", dir.path().to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("architecture    llama4_text"), "{out}");
    assert!(out.contains(notice), "{out}");
    std::fs::write(
        dir.path().join("README.md"),
        "---\nlicense: other\nlicense_name: llama4\nlicense_link: LICENSE\n---\n# Model\n",
    )
    .unwrap();
    let (code, out, err) = herd(&["inspect", dir.path().to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("licence: other (llama4): LICENSE"), "{out}");
    assert!(out.contains(notice), "{out}");
}

/// `herd plan --price-per-hour` costs each placement per million tokens; catalog GPUs carry a
/// default price; a measured throughput is costed too; a price that is not positive is refused.
#[test]
fn plan_turns_tokens_per_second_into_cost() {
    let (code, out, err) = herd(&["plan", "llama4:scout", "-t", "q4_k_m", "--gpu", "h100x2"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("per million output tokens"), "{out}");
    assert!(
        out.contains("catalog: 2x h100 at $3.35 per GPU-hour"),
        "{out}"
    );
    let (code, out, err) = herd(&[
        "plan",
        "llama4:scout",
        "-t",
        "q4_k_m",
        "--mem-bandwidth",
        "90GB/s",
        "--price-per-hour",
        "1.5",
        "--tokens-per-s",
        "50",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("at $1.50/hour (--price-per-hour)"), "{out}");
    assert!(
        out.contains(
            "measured: 50.0 tokens/s costs $8.33 per million output tokens at $1.50/hour \
             (--price-per-hour)"
        ),
        "{out}"
    );
    let (code, _, err) = herd(&["plan", "llama4:scout", "--price-per-hour", "0"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--price-per-hour must be a positive number"),
        "{err}"
    );
}
