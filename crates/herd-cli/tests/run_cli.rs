//! `herd run` / `herd chat` / `herd pull` end to end on the default model's file (fetched by
//! tests/fixtures/fetch.sh).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model() -> PathBuf {
    let p = fixtures().join("downloaded/gemma-3-270m-q4_k_m.gguf");
    assert!(
        p.exists(),
        "{} is missing: run tests/fixtures/fetch.sh",
        p.display()
    );
    p
}

/// `herd run` streams exactly the greedy continuation the library generates, for the prompts
/// of the llama.cpp oracle, with its speed report on stderr.
#[test]
fn run_streams_the_greedy_continuation() {
    let oracle: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gemma3_270m/oracle.json")).unwrap(),
    )
    .unwrap();
    let loaded = herd_engine::load(model().to_str().unwrap()).unwrap();
    for c in oracle["continuations"].as_array().unwrap() {
        let prompt = c["prompt"].as_str().unwrap();
        let want = herd_engine::generate::generate(
            loaded.model.as_ref(),
            &loaded.tokenizer,
            &herd_engine::generate::Request {
                prompt: loaded.tokenizer.encode(prompt, true).unwrap(),
                max_tokens: 16,
                stop: Vec::new(),
                sampling: herd_engine::sampler::SamplingParams::default(),
            },
            |_| {},
        )
        .unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_herd"))
            .arg("run")
            .arg(model())
            .args([prompt, "-n", "16"])
            .output()
            .unwrap();
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert!(o.status.success(), "{err}");
        assert_eq!(out.trim_end_matches('\n'), want.text, "prompt {prompt:?}");
        assert!(!want.text.trim().is_empty(), "prompt {prompt:?}");
        assert!(err.contains("prefill"), "{err}");
        assert!(
            err.contains("tok/s") && err.contains("finish: length"),
            "{err}"
        );
    }
}

#[test]
fn same_seed_same_text() {
    let run = |seed: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_herd"))
            .arg("run")
            .arg(model())
            .args([
                "Once upon a time",
                "-n",
                "12",
                "--temperature",
                "0.9",
                "--top-p",
                "0.95",
                "--seed",
                seed,
            ])
            .output()
            .unwrap();
        assert!(o.status.success());
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(run("7"), run("7"));
}

#[test]
fn chat_uses_the_family_template_when_the_file_has_none() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("chat")
        .arg(model())
        .args(["-n", "8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello there\n/exit\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("built-in gemma3 template").count(), 1, "{err}");
    assert!(err.contains("decode"), "{err}");
}

#[test]
fn bad_model_references_are_clear_errors() {
    for (model, needle) in [
        ("gemma9:1t", "unknown model alias"),
        ("/nope/model.gguf", "no such file"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(["run", model, "hi"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // A file that is not a model.
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not gguf").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("run")
        .arg(&junk)
        .arg("hi")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("not a valid GGUF"), "{err}");
}
