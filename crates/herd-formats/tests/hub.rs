//! The hub client against a local stand-in for the Hugging Face endpoints it uses
//! (`/{repo}/resolve/main/{file}` with Range requests and SHA-256 ETags).

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use herd_formats::hub::Hub;
use herd_formats::hub::mock::serve;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/llama4_gguf")
        .join(name)
}

#[test]
fn downloads_resumes_and_verifies() {
    let hub = Hub::new(&serve(fixture(""), false, 10), None);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("m.gguf");
    let want = std::fs::read(fixture("tiny-q8_0.gguf")).unwrap();
    // A partial file from an interrupted download is resumed, not restarted.
    std::fs::write(tmp.path().join("m.gguf.partial"), &want[..1000]).unwrap();
    let mut calls = 0;
    hub.download("org/tiny", "tiny-q8_0.gguf", &dest, |done, total| {
        calls += 1;
        assert!(done <= total);
    })
    .unwrap();
    assert!(calls > 0);
    assert_eq!(std::fs::read(&dest).unwrap(), want);
    assert!(!tmp.path().join("m.gguf.partial").exists());

    let (head, total) = hub.head_bytes("org/tiny", "tiny-q8_0.gguf", 64).unwrap();
    assert_eq!((head.as_slice(), total), (&want[..64], want.len() as u64));
    let f = hub.gguf_header("org/tiny", "tiny-q8_0.gguf").unwrap();
    assert_eq!(f.tensors().len(), 48);
    let err = hub
        .read("org/tiny", "missing.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn a_corrupt_download_is_removed() {
    let hub = Hub::new(&serve(fixture(""), true, 2), None);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("m.gguf");
    let err = hub
        .download("org/tiny", "tiny-q8_0.gguf", &dest, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!dest.exists() && !tmp.path().join("m.gguf.partial").exists());
}

#[test]
fn unreachable_hub_is_a_clear_error() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hub = Hub::new(&format!("http://127.0.0.1:{port}"), None);
    let err = hub.read("org/repo", "config.json").unwrap_err().to_string();
    assert!(err.contains("127.0.0.1"), "{err}");
}
