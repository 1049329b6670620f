//! Chat templates rendered by herd equal transformers' apply_chat_template
//! (tests/fixtures/tokenizers/templates.json), for the official templates and for herd's
//! built-in ones; the rendered prompt tokenizes with exactly one BOS.

use std::path::{Path, PathBuf};

use herd_engine::Tokenizer;
use herd_engine::chat::{ChatTemplate, RenderOptions, builtin};
use herd_formats::GgufFile;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizers/templates.json")).unwrap(),
    )
    .unwrap()
}

fn render_all(t: &ChatTemplate, cases: &serde_json::Value, bos: &str, what: &str) {
    for (i, case) in cases.as_array().unwrap().iter().enumerate() {
        let opts = RenderOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            bos_token: bos.into(),
            eos_token: String::new(),
            tools: case.get("tools").and_then(|t| t.as_array().cloned()),
        };
        let got = t
            .render(case["messages"].as_array().unwrap(), &opts)
            .unwrap_or_else(|e| panic!("{what} case {i}: {e}"));
        assert_eq!(got, case["rendered"].as_str().unwrap(), "{what} case {i}");
    }
}

#[test]
fn llama4_official_and_builtin_templates_match_transformers() {
    let e = expected();
    let official = ChatTemplate::new(e["llama4_template"].as_str().unwrap()).unwrap();
    render_all(
        &official,
        &e["llama4"],
        "<|begin_of_text|>",
        "official Llama 4 template",
    );
    let ours = ChatTemplate::new(builtin("llama4").unwrap()).unwrap();
    render_all(
        &ours,
        &e["llama4"],
        "<|begin_of_text|>",
        "herd's Llama 4 template",
    );
}

#[test]
fn gemma3_official_and_builtin_templates_match_transformers() {
    let e = expected();
    let tok = Tokenizer::from_hf_dir(&fixtures().join("downloaded/tokenizers/gemma3")).unwrap();
    let official = ChatTemplate::new(
        tok.chat_template
            .as_deref()
            .expect("gemma3 ships a template"),
    )
    .unwrap();
    render_all(
        &official,
        &e["gemma3"],
        "<bos>",
        "official Gemma 3 template",
    );
    let ours = ChatTemplate::new(builtin("gemma3").unwrap()).unwrap();
    render_all(&ours, &e["gemma3"], "<bos>", "herd's Gemma 3 template");
}

#[test]
fn rendered_prompt_has_one_bos() {
    let e = expected();
    let f = GgufFile::open(&fixtures().join("downloaded/gemma-3-270m-q4_k_m.gguf")).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    let rendered = e["gemma3"][0]["rendered"].as_str().unwrap();
    assert!(rendered.starts_with("<bos>"));
    let ids = tok.encode_prompt(rendered).unwrap();
    assert_eq!(ids[0], tok.bos.unwrap());
    assert_ne!(ids[1], tok.bos.unwrap(), "BOS doubled: {ids:?}");
    // Without a BOS in the text, encode_prompt adds it.
    let ids = tok.encode_prompt("<start_of_turn>user\nHi").unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == tok.bos.unwrap()).count(), 1);
}

#[test]
fn template_errors_are_clear() {
    let ours = ChatTemplate::new(builtin("gemma3").unwrap()).unwrap();
    let msgs = vec![serde_json::json!({"role": "assistant", "content": "first"})];
    let err = ours.render(&msgs, &RenderOptions::default()).unwrap_err();
    assert!(err.to_string().contains("alternate"), "{err}");
    let llama = ChatTemplate::new(builtin("llama4").unwrap()).unwrap();
    let opts = RenderOptions {
        tools: Some(vec![serde_json::json!({"type": "function"})]),
        ..Default::default()
    };
    let err = llama.render(&[], &opts).unwrap_err();
    assert!(err.to_string().contains("no first user message"), "{err}");
    assert!(
        ChatTemplate::new("{% for %}")
            .unwrap_err()
            .to_string()
            .contains("chat template")
    );
}
