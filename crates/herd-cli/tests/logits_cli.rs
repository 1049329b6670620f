//! `herd logits` end to end: the binary's .npy output equals transformers' logits.

use std::path::{Path, PathBuf};
use std::process::Command;

use herd_formats::{TensorSet, npy};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/llama4")
        .join(name)
}

fn herd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_herd"))
}

#[test]
fn writes_logits_and_hidden_states_matching_the_oracle() {
    let dir = fixture("scout_like");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("oracle.json")).unwrap()).unwrap();
    let tokens: Vec<String> = meta["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.npy");
    let hidden = tmp.path().join("hidden");
    let status = herd()
        .args(["logits", "--model"])
        .arg(&dir)
        .args(["--tokens", &tokens.join(","), "--out"])
        .arg(&out)
        .arg("--hidden-states")
        .arg(&hidden)
        .status()
        .unwrap();
    assert!(status.success());

    let (shape, logits) = npy::read_f32(&out).unwrap();
    assert_eq!(shape, [tokens.len(), 128]);
    let oracle = TensorSet::open_file(&dir.join("oracle.safetensors")).unwrap();
    let want = decode_f32(oracle.get("logits").unwrap());
    let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let max_diff = logits
        .iter()
        .zip(&want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        max_diff / max_ref < 1e-4,
        "relative error {}",
        max_diff / max_ref
    );

    // Embeddings, 4 layers, final norm.
    for i in 0..6 {
        let (shape, state) = npy::read_f32(&hidden.join(format!("hidden_{i:02}.npy"))).unwrap();
        assert_eq!(shape, [tokens.len(), 32]);
        let want = decode_f32(oracle.get(&format!("hidden.{i}")).unwrap());
        let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let max_diff = state
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(max_diff / max_ref < 1e-4, "hidden {i}");
    }
    assert!(!hidden.join("hidden_06.npy").exists());
}

fn decode_f32(t: &herd_formats::TensorInfo) -> Vec<f32> {
    t.bytes
        .as_slice()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("l.npy");
    let cases: [(Vec<String>, &str); 3] = [
        (
            vec![
                "--model".into(),
                "/nonexistent/model".into(),
                "--tokens".into(),
                "1".into(),
            ],
            "/nonexistent/model",
        ),
        (
            vec![
                "--model".into(),
                fixture("scout_like").display().to_string(),
                "--tokens".into(),
                "1,500".into(),
            ],
            "outside the vocabulary",
        ),
        (
            vec![
                "--model".into(),
                fixture("scout_like").display().to_string(),
                "--tokens".into(),
                "1,x".into(),
            ],
            "invalid",
        ),
    ];
    for (args, needle) in cases {
        let output = herd()
            .arg("logits")
            .args(&args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(if needle == "invalid" { 2 } else { 1 }),
            "{stderr}"
        );
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(!out.exists());
}
