//! Hostile requests against a real `herd serve` child process (the process must survive what a
//! single request can do to it): grammars large enough to overflow an async worker's stack,
//! clients that send half a request or stop reading, and how the process stops on signals.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Served {
    child: Child,
    port: u16,
    /// The server's stderr lines so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn model() -> PathBuf {
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/downloaded/gemma-3-270m-q4_k_m.gguf");
    assert!(model.exists(), "run tests/fixtures/fetch.sh first");
    model
}

fn serve() -> Served {
    serve_with(&[])
}

fn serve_with(extra: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["serve", model().to_str().unwrap(), "--port", "0"])
        .args(extra)
        .args([
            "--served-model-name",
            "org/m",
            "--ctx-size",
            "1024",
            "-t",
            "2",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = log.next().unwrap().unwrap();
    let port = first
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {first:?}"));
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = lines.clone();
    std::thread::spawn(move || {
        log.map_while(Result::ok).for_each(|l| {
            eprintln!("serve: {l}");
            keep.lock().unwrap().push(l);
        })
    });
    let served = Served {
        child,
        port,
        log: lines,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while served.get("/health") != 200 {
        assert!(Instant::now() < deadline, "herd serve did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    served
}

impl Served {
    fn get(&self, path: &str) -> u16 {
        agent()
            .get(format!("http://127.0.0.1:{}{path}", self.port))
            .call()
            .map_or(0, |r| r.status().as_u16())
    }

    fn chat(&self, extra: Value) -> (u16, Value) {
        let mut body = json!({
            "model": "org/m",
            "messages": [{"role": "user", "content": "Fill in the form."}],
            "max_tokens": 4,
            "temperature": 0,
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let mut r = agent()
            .post(format!(
                "http://127.0.0.1:{}/v1/chat/completions",
                self.port
            ))
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        let text = r.body_mut().read_to_string().unwrap();
        (
            r.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

/// An object schema of `n` required integer properties. (With optional ones, llguidance's
/// parser refuses the second step: one row then holds ~4 items per property, over its limit of
/// 2,000; issue 18 item 5, not this test's subject.)
fn wide_object(n: usize) -> Value {
    let props: serde_json::Map<String, Value> = (0..n)
        .map(|i| (format!("p{i}"), json!({"type": "integer"})))
        .collect();
    let required: Vec<&String> = props.keys().collect();
    json!({"type": "object", "properties": props, "required": required})
}

#[test]
fn huge_grammars_are_answered_and_the_server_keeps_serving() {
    let s = serve();
    // 3,000 properties (a 100 KB body) compile on their own thread, off the async workers
    // (whose 2 MiB stacks llguidance's recursion overflowed at ~4,500 optional properties in a
    // release build, aborting the process; the compile-level test in herd-engine shows it on
    // a small stack).
    let schema = json!({"type": "json_schema",
                        "json_schema": {"name": "form", "schema": wide_object(3_000)}});
    let (status, body) = s.chat(json!({"response_format": schema}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    assert_eq!(s.get("/health"), 200, "the server survived");

    // A forced call to a tool with 3,000 parameters: its listing in the prompt is far over the
    // context, which is said before any grammar is compiled. (Tokenizing that prompt took
    // minutes before special tokens were found in one pass; 300 parameters took 23 s.)
    let tool = json!({"type": "function",
                      "function": {"name": "fill", "parameters": wide_object(3_000)}});
    let (status, body) = s.chat(json!({"tools": [tool], "tool_choice": "required"}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    assert_eq!(s.get("/health"), 200, "the server survived");

    // Beyond the limit: a 400 that says so, before any compilation.
    let schema = json!({"type": "json_schema",
                        "json_schema": {"name": "form", "schema": wide_object(4_000)}});
    let (status, body) = s.chat(json!({"response_format": schema}));
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("too large"), "{message}");
    assert_eq!(body["error"]["code"], "invalid_grammar");

    // A wide object of optional properties compiles, then overflows a parser row of
    // llguidance at its second token: the request's fault, a 400, not a 500 with the parser's
    // state in it.
    let props: serde_json::Map<String, Value> = (0..1_000)
        .map(|i| (format!("p{i}"), json!({"type": "integer"})))
        .collect();
    let schema = json!({"type": "json_schema", "json_schema": {"name": "form",
                        "schema": {"type": "object", "properties": props}}});
    let (status, body) = s.chat(json!({"response_format": schema, "max_tokens": 8}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_grammar", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(!message.contains("<state>"), "no internal dump: {message}");
    assert!(
        message.contains("cannot go on"),
        "failed mid-generation, not at compile time: {message}"
    );

    // A schema that only refers to itself accepts no output: refused before the response
    // starts, streamed or not.
    for stream in [false, true] {
        let schema = json!({"type": "json_schema",
                            "json_schema": {"name": "loop", "schema": {"$ref": "#"}}});
        let (status, body) = s.chat(json!({"response_format": schema, "stream": stream}));
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "invalid_grammar", "{body}");
    }
    let (status, body) = s.chat(json!({"guided_grammar": "start: a\na: a"}));
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_grammar")),
        "{body}"
    );

    let (status, body) = s.chat(json!({}));
    assert_eq!(status, 200, "an ordinary request after them: {body}");
}

/// A completion prompt far over the context is refused by its size, before tokenizing it
/// (`"a\n" × 8000` took 34 s to tokenize when that was quadratic).
#[test]
fn a_prompt_far_over_the_context_is_refused_before_tokenizing() {
    let s = serve();
    let mut r = agent()
        .post(format!("http://127.0.0.1:{}/v1/completions", s.port))
        .header("content-type", "application/json")
        .send(
            json!({"model": "org/m", "prompt": "a\n".repeat(600_000), "max_tokens": 1}).to_string(),
        )
        .unwrap();
    let body: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("bytes"), "refused by size: {message}");
    assert_eq!(s.get("/health"), 200);
    // A served name with a slash (the default name is the model argument, often a path) is
    // found by `models.retrieve`.
    assert_eq!(s.get("/v1/models/org/m"), 200);
    assert_eq!(s.get("/v1/models/org/other"), 404);
}

/// Send `signal` (`TERM`, `INT`) to the child.
fn signal(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} failed");
}

/// The child's exit status if it exits within `limit`.
fn exits_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A streamed completion of `tokens` tokens on a raw connection, its head read and nothing
/// more (the caller decides whether to read on).
fn start_stream(port: u16, tokens: usize) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = json!({"model": "org/m", "prompt": "Once upon a time", "max_tokens": tokens,
                      "ignore_eos": true, "stream": true, "temperature": 0})
    .to_string();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = [0u8; 12];
    c.read_exact(&mut head).unwrap();
    assert_eq!(&head[9..12], b"200", "{}", String::from_utf8_lossy(&head));
    c
}

/// Read from `c` until the server closes it or `limit` passes; returns what was read and when
/// the connection ended (None: still open).
fn read_until_closed(c: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let t = Instant::now();
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t.elapsed() < limit {
        match c.read(&mut buf) {
            Ok(0) => {
                return (
                    String::from_utf8_lossy(&got).into_owned(),
                    Some(t.elapsed()),
                );
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                return (
                    String::from_utf8_lossy(&got).into_owned(),
                    Some(t.elapsed()),
                );
            }
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), None)
}

/// Issue 18 item 4: half a request head, a body that never completes, and a stream reader that
/// never reads are cut off by their timeouts; SIGTERM waits at most the shutdown grace for
/// in-flight requests. Also CORS for an allowed origin.
#[test]
fn slow_and_silent_clients_are_cut_off_and_shutdown_is_bounded() {
    let mut s = serve_with(&[
        "--header-timeout",
        "2",
        "--stall-timeout",
        "2",
        "--shutdown-grace",
        "3",
        "--cors-origin",
        "http://app.example",
    ]);
    // Half a head: closed after the header timeout.
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (_, closed) = read_until_closed(&mut c, Duration::from_secs(20));
    let closed = closed.expect("a half-sent head holds its connection");
    assert!(
        closed >= Duration::from_millis(1500),
        "closed early: {closed:?}"
    );

    // A whole head and a tenth of the body: 408 after the stall timeout.
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"model\": ",
    )
    .unwrap();
    let (answer, _) = read_until_closed(&mut c, Duration::from_secs(20));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive"), "{answer}");

    // CORS: a preflight from the allowed origin is answered, and so are its calls.
    let preflight = agent()
        .run(
            ureq::http::Request::builder()
                .method("OPTIONS")
                .uri(format!("http://127.0.0.1:{}/v1/chat/completions", s.port))
                .header("origin", "http://app.example")
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization,content-type,x-stainless-os",
                )
                .body(())
                .unwrap(),
        )
        .unwrap();
    assert_eq!(preflight.status().as_u16(), 200);
    let allowed = |r: &ureq::http::Response<ureq::Body>| {
        r.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(allowed(&preflight).as_deref(), Some("http://app.example"));
    // The official JavaScript client's own headers are allowed too.
    let headers = preflight
        .headers()
        .get("access-control-allow-headers")
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        .unwrap_or_default();
    assert!(headers.contains("x-stainless-os"), "{headers}");
    let r = agent()
        .get(format!("http://127.0.0.1:{}/v1/models", s.port))
        .header("origin", "http://elsewhere.example")
        .call()
        .unwrap();
    assert_eq!(allowed(&r), None, "another origin gets no CORS header");
    assert_eq!(s.get("/health"), 200, "still serving");

    // A stream whose reader never reads holds a request in flight; SIGTERM stops the process
    // within the grace (3 s) rather than waiting on it forever.
    let _silent = start_stream(s.port, 900);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    signal(&s.child, "TERM");
    let status = exits_within(&mut s.child, Duration::from_secs(20));
    assert!(
        status.is_some(),
        "herd serve still running 20 s after SIGTERM"
    );
    let took = t.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // It waited the grace for the stream (900 tokens take far longer), then stopped it.
    assert!(took >= Duration::from_millis(2500), "took {took:?}");
    std::thread::sleep(Duration::from_millis(200));
    let log = s.log.lock().unwrap().join("\n");
    assert!(
        log.contains("did not finish within the shutdown grace"),
        "{log}"
    );
}

/// A second signal exits at once, without waiting for in-flight requests.
#[test]
fn a_second_signal_exits_at_once() {
    let mut s = serve_with(&["--shutdown-grace", "300"]);
    let mut stream = start_stream(s.port, 900);
    let reader = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    std::thread::sleep(Duration::from_millis(500));
    signal(&s.child, "TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "the first signal waits for the request in flight"
    );
    let t = Instant::now();
    signal(&s.child, "TERM");
    let status = exits_within(&mut s.child, Duration::from_secs(10)).expect("still running");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(143), "128 + SIGTERM");
    let _ = reader.join();
}

/// Issue 18 item 6: a cache smaller than one context could accept a request and fail it after
/// generating: refused at start (once the model's own context is known).
#[test]
fn a_kv_cache_smaller_than_a_context_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["serve", model().to_str().unwrap(), "--port", "0"])
        .args(["--ctx-size", "1024", "--kv-tokens", "256"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--kv-tokens 256") && err.contains("--ctx-size"),
        "{err}"
    );
}
