//! The official `openai` Python client (tests/fixtures/fetch.sh installs it) against a real
//! `herd serve` on 127.0.0.1, started and stopped here: tests/openai/test_client.py checks chat
//! and completions (whole and streamed) against each other and against `herd run`, 32 concurrent
//! streams against sequential runs, the error statuses and a disconnect;
//! tests/openai/test_structured.py checks 33 JSON schemas (validated with `jsonschema`), JSON
//! mode, regex and Lark grammars and schema errors; tests/ollama/test_client.py checks the
//! official `ollama` client on the `/api` routes (listings, generate and chat whole and
//! streamed against the OpenAI routes, schemas, a tool round trip, errors);
//! tests/anthropic/test_client.py checks the official `anthropic` client on `/v1/messages`
//! (whole and streamed against the OpenAI route, count_tokens, stop sequences, forced tool
//! calls whole and streamed, a tool round trip in Claude Code's shapes, typed errors);
//! tests/ui/test_chat_page.py drives the chat page at `/` in Debian's headless Chromium with
//! Playwright (the CSP and no requests elsewhere, the 401 and the key, a streamed greedy reply
//! sent by Enter against the same request made directly, tokens/s, Stop cancelling the request
//! on the server and freeing its KV blocks, labels and Tab order, a screenshot). Then SIGTERM
//! must stop the server cleanly.
//!
//! The browser is /usr/bin/chromium or `$HERD_CHROMIUM`; without one the test fails, unless
//! `HERD_SKIP_BROWSER=1` skips the chat page check (and says so).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn health(port: u16) -> Option<u16> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    agent
        .get(format!("http://127.0.0.1:{port}/health"))
        .call()
        .ok()
        .map(|r| r.status().as_u16())
}

/// The Chromium the chat page check drives, or `None` when `HERD_SKIP_BROWSER=1` skips it.
fn chromium() -> Option<PathBuf> {
    if std::env::var("HERD_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!(
            "\n*** HERD_SKIP_BROWSER=1: the chat page check (tests/ui/test_chat_page.py) \
             was SKIPPED ***\n"
        );
        return None;
    }
    let path = PathBuf::from(
        std::env::var("HERD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
    );
    assert!(
        path.exists(),
        "no browser at {}: install Debian's `chromium` package (apt-get install chromium, or run \
         tests/fixtures/fetch.sh as root), set HERD_CHROMIUM to a Chromium binary, or set \
         HERD_SKIP_BROWSER=1 to skip the chat page check",
        path.display()
    );
    Some(path)
}

#[test]
fn official_openai_client_against_herd_serve() {
    let root = root();
    // Checked first: a missing browser fails at once, not after the other clients' checks.
    let browser = chromium();
    let model = root.join("tests/fixtures/downloaded/gemma-3-270m-q4_k_m.gguf");
    let python = root.join("tests/fixtures/downloaded/venv/bin/python");
    assert!(
        model.exists() && python.exists(),
        "run tests/fixtures/fetch.sh first (model and openai client)"
    );
    let herd = env!("CARGO_BIN_EXE_herd");
    let mut server = Command::new(herd)
        .args(["serve", model.to_str().unwrap(), "--port", "0"])
        .args([
            "--served-model-name",
            "gemma3:270m",
            "--api-key",
            "test-key",
        ])
        .args(["--ctx-size", "2048"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(server.stderr.take().unwrap()).lines();
    let first = log.next().unwrap().unwrap();
    let port: u16 = first
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {first:?}"));
    // Keep draining the server's stderr so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || log.map_while(Result::ok).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(120);
    while health(port) != Some(200) {
        assert!(Instant::now() < deadline, "herd serve did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let base = format!("http://127.0.0.1:{port}");
    // One script against the server: `SCRIPT BASE MODEL KEY EXTRA…`, its output shown, its
    // success and last words kept for the asserts after the server has stopped.
    let run = |script: &str, extra: &[&std::ffi::OsStr], browser: Option<&Path>| {
        let mut cmd = Command::new(&python);
        cmd.arg(root.join(script))
            .args([base.as_str(), "gemma3:270m", "test-key"])
            .args(extra);
        if let Some(browser) = browser {
            cmd.env("HERD_CHROMIUM", browser);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let passed = out.status.success() && stdout.contains("all checks passed");
        (script.to_string(), passed)
    };
    let mut results = vec![
        run(
            "tests/openai/test_client.py",
            &[herd.as_ref(), model.as_os_str()],
            None,
        ),
        run("tests/openai/test_structured.py", &[], None),
        run("tests/ollama/test_client.py", &[], None),
        run("tests/anthropic/test_client.py", &[], None),
    ];
    match &browser {
        Some(browser) => {
            let screenshot =
                std::env::temp_dir().join(format!("herd-chat-page-{}.png", server.id()));
            results.push(run(
                "tests/ui/test_chat_page.py",
                &[screenshot.as_os_str()],
                Some(browser),
            ));
            eprintln!("chat page screenshot: {}", screenshot.display());
        }
        None => eprintln!("\n*** the chat page check was SKIPPED (HERD_SKIP_BROWSER=1) ***\n"),
    }

    let term = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = server.wait().unwrap();
    let log = drain.join().unwrap();
    for (script, passed) in &results {
        assert!(passed, "{script}: its checks failed (output above)");
    }
    if browser.is_none() {
        eprintln!("\n*** the chat page check was SKIPPED (HERD_SKIP_BROWSER=1) ***\n");
    }
    assert!(
        status.success(),
        "herd serve exited with {status} after SIGTERM: {log:?}"
    );
    assert!(log.iter().any(|l| l.contains("SIGTERM")), "{log:?}");
    assert!(log.iter().any(|l| l.contains("herd: stopped")), "{log:?}");
}
