//! `kiln serve` end to end: a real server process on a loopback port, driven by the official
//! `openai` Python package, `curl`, raw HTTP, and the load-test script.
//!
//! Needs `../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf` and `python3` with `openai`; skipped with
//! a note when missing, unless `KILN_REQUIRE_SHARED=1` / `KILN_REQUIRE_PYTHON=1` (set by `.ci/run`).

use crate::common;

use common::{python_has, shared};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// A `kiln serve` process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        Server { child, addr }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// One HTTP/1.1 request; returns the status and the (de-chunked) body.
    fn request(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, Vec<u8>) {
        let mut stream = TcpStream::connect(&self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(300)))
            .unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
        let status = head[9..12].parse().unwrap();
        let body = raw[split + 4..].to_vec();
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(&body)
        } else {
            body
        };
        (status, body)
    }

    fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, body) = self.request(
            "POST",
            path,
            &["Content-Type: application/json"],
            body.to_string().as_bytes(),
        );
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.request("GET", "/metrics", &[], b"");
        String::from_utf8(body)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    fn wait_for_metric(&self, name: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.metric(name) != want {
            assert!(Instant::now() < deadline, "{name} never became {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&body[..eol]).unwrap().trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[eol + 2..eol + 2 + size]);
        body = &body[eol + 2 + size + 2..];
    }
}

fn kiln_generate(model: &Path, prompt: &str, max_tokens: usize) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            prompt,
        ])
        .args([
            "--temperature",
            "0",
            "--max-tokens",
            &max_tokens.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_owned()
}

#[test]
fn openai_python_client() {
    let Some(model) = shared(MODEL) else { return };
    if !python_has("openai") {
        return;
    }
    let server = Server::start(&model, &["--api-key", "sk-kiln-test"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_openai_client.py");
    let out = Command::new("python3")
        .arg(script)
        .args([&server.base_url(), "sk-kiln-test"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // /health and /metrics stay open without the key.
    let (status, body) = server.request("GET", "/health", &[], b"");
    assert_eq!((status, body), (200, br#"{"status":"ok"}"#.to_vec()));
    assert!(server.metric("kiln_generation_tokens_total") > 0.0);
}

#[test]
fn curl_sees_server_sent_events() {
    let Some(model) = shared(MODEL) else { return };
    let has_curl = Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_curl {
        assert!(
            std::env::var("KILN_REQUIRE_PYTHON").as_deref() != Ok("1"),
            "curl is required (.ci/run installs it)"
        );
        eprintln!("note: curl not found; skipping");
        return;
    }
    let server = Server::start(&model, &[]);
    let body = json!({
        "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let out = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "-i",
            "-H",
            "Content-Type: application/json",
            "-d",
        ])
        .arg(body.to_string())
        .arg(format!("{}/completions", server.base_url()))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, events) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    // Every event is one `data: ` line followed by a blank line; the last is [DONE].
    let events: Vec<&str> = events.split_terminator("\n\n").collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{events:?}");
    let objects: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    let tokens: Vec<&Value> = objects
        .iter()
        .filter(|o| o["choices"][0]["finish_reason"].is_null() && o["usage"].is_null())
        .collect();
    let text: String = tokens
        .iter()
        .map(|o| o["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, kiln_generate(&model, "The capital of France is", 6));
    let n = objects.len();
    assert_eq!(objects[n - 2]["choices"][0]["finish_reason"], "length");
    assert_eq!(objects[n - 1]["choices"], json!([]));
    assert_eq!(objects[n - 1]["usage"]["completion_tokens"], tokens.len());
    assert!(objects.iter().all(|o| o["object"] == "text_completion"));
}

#[test]
fn greedy_output_equals_kiln_generate_alone_and_in_a_full_batch() {
    let Some(model) = shared(MODEL) else { return };
    let prompts = [
        "The capital of France is",
        "Once upon a time, there was a little",
        "Rust is a programming language that",
        "The best way to learn to cook is",
        "In 1969, the first humans",
        "Water boils at",
        "My favourite animal is the",
        "def fibonacci(n):",
    ];
    let n_tokens = 20;
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| kiln_generate(&model, p, n_tokens))
        .collect();
    let server = Server::start(&model, &["--max-batch-size", "8"]);
    let ask = |prompt: &str| {
        let (status, body) = server.post_json(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": n_tokens, "temperature": 0}),
        );
        assert_eq!(status, 200, "{body}");
        body["choices"][0]["text"].as_str().unwrap().to_owned()
    };
    // Alone.
    assert_eq!(ask(prompts[0]), expected[0]);
    // Eight at once: they share decode steps (and prefill chunks) in one batch.
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().map(|p| s.spawn(|| ask(p))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((prompt, got), want) in prompts.iter().zip(&answers).zip(&expected) {
        assert_eq!(got, want, "prompt {prompt:?}");
    }
    assert!(server.metric("kiln_decode_steps_total") < (2 * n_tokens) as f64 + 5.0);
}

#[test]
fn bad_requests_get_openai_errors_and_never_hurt_the_server() {
    let Some(model) = shared(MODEL) else { return };
    let server = Server::start(&model, &["--ctx-size", "64", "--max-body-bytes", "4096"]);
    let post = |path: &str, body: &[u8]| {
        let (status, body) =
            server.request("POST", path, &["Content-Type: application/json"], body);
        let json: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
            panic!(
                "error body is not JSON: {:?}",
                String::from_utf8_lossy(&body)
            )
        });
        let error = &json["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{json}"
        );
        assert!(error["type"].is_string(), "{json}");
        assert!(
            error.get("param").is_some() && error.get("code").is_some(),
            "{json}"
        );
        (status, error["param"].clone())
    };
    let long_prompt = "word ".repeat(100);
    let big = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(5000));
    let cases: Vec<(&str, Vec<u8>, u16, Value)> = vec![
        ("/v1/completions", b"{not json".to_vec(), 400, Value::Null),
        ("/v1/completions", b"\xff\xfe".to_vec(), 400, Value::Null),
        (
            "/v1/completions",
            br#"{"prompt": 5}"#.to_vec(),
            400,
            json!("prompt"),
        ),
        (
            "/v1/completions",
            br#"{"prompt": "a", "max_tokens": "many"}"#.to_vec(),
            400,
            json!("max_tokens"),
        ),
        (
            "/v1/completions",
            br#"{"prompt": "a", "max_tokens": 0}"#.to_vec(),
            400,
            json!("max_tokens"),
        ),
        (
            "/v1/completions",
            br#"{"prompt": "a", "max_tokens": -1}"#.to_vec(),
            400,
            json!("max_tokens"),
        ),
        (
            "/v1/completions",
            br#"{"prompt": "a", "max_tokens": 1000}"#.to_vec(),
            400,
            json!("max_tokens"),
        ),
        (
            "/v1/completions",
            format!(r#"{{"prompt": "{long_prompt}"}}"#).into_bytes(),
            400,
            json!("prompt"),
        ),
        (
            "/v1/completions",
            br#"{"prompt": [99999999]}"#.to_vec(),
            400,
            json!("prompt"),
        ),
        (
            "/v1/completions",
            br#"{"prompt": "a", "model": "gpt-4"}"#.to_vec(),
            404,
            json!("model"),
        ),
        (
            "/v1/completions",
            br#"{"prompt": "a", "n": 3}"#.to_vec(),
            400,
            json!("n"),
        ),
        ("/v1/completions", big.into_bytes(), 413, Value::Null),
        (
            "/v1/chat/completions",
            br#"{"messages": []}"#.to_vec(),
            400,
            json!("messages"),
        ),
        (
            "/v1/chat/completions",
            br#"{"messages": [{"role": "user"}]}"#.to_vec(),
            400,
            json!("messages[0].content"),
        ),
        (
            "/v1/chat/completions",
            br#"{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}"#.to_vec(),
            400,
            json!("temperature"),
        ),
        ("/v1/nothing", b"{}".to_vec(), 404, Value::Null),
    ];
    for (path, body, status, param) in cases {
        let (got, got_param) = post(path, &body);
        assert_eq!(
            (got, &got_param),
            (status, &param),
            "{path} {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    // Still serving.
    let (status, body) = server.post_json(
        "/v1/completions",
        &json!({"prompt": "Water boils at", "max_tokens": 3}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert!(
        server.metric("kiln_requests_total{endpoint=\"/v1/completions\",status=\"400\"}") >= 9.0
    );
}

#[test]
fn full_queue_429_disconnect_cancels_and_timeout() {
    let Some(model) = shared(MODEL) else { return };
    let server = Server::start(
        &model,
        &[
            "--max-batch-size",
            "1",
            "--max-queue",
            "1",
            "--request-timeout",
            "4",
        ],
    );
    // A: a long stream holding the only batch slot.
    let mut a = TcpStream::connect(&server.addr).unwrap();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": true, "stream": true})
        .to_string();
    write!(
        a,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let _ = a.read(&mut first).unwrap();
    server.wait_for_metric("kiln_running_requests", 1.0);
    // B waits in the queue; C finds it full.
    std::thread::scope(|s| {
        let b = s.spawn(|| {
            server.post_json("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}))
        });
        server.wait_for_metric("kiln_queue_depth", 1.0);
        let (status, body) =
            server.post_json("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"]["code"], "queue_full");
        // A's client goes away: its generation is cancelled and B gets the slot.
        drop(a);
        let (status, body) = b.join().unwrap();
        assert_eq!(status, 200, "{body}");
    });
    assert_eq!(server.metric("kiln_requests_cancelled_total"), 1.0);
    // A request running past --request-timeout ends with 504.
    let (status, body) = server.post_json(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": true}),
    );
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "timeout");
    server.wait_for_metric("kiln_running_requests", 0.0);
}

#[test]
fn load_test_32_streaming_clients() {
    let Some(model) = shared(MODEL) else { return };
    let server = Server::start(&model, &["--max-batch-size", "16"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/load_test.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--base-url", &server.base_url()])
        .args([
            "--clients",
            "32",
            "--requests",
            "8",
            "--max-tokens",
            "8",
            "--strict",
        ])
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_str(summary.trim()).unwrap();
    assert_eq!(summary["requests"], 256);
    assert_eq!(summary["errors"], 0);
    assert_eq!(summary["all_done"], true);
    let counted = server.metric("kiln_generation_tokens_total");
    assert_eq!(summary["generated_tokens"].as_f64().unwrap(), counted);
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits() {
    let Some(model) = shared(MODEL) else { return };
    let mut server = Server::start(&model, &[]);
    std::thread::scope(|s| {
        let pending = s.spawn(|| {
            server.post_json(
                "/v1/completions",
                &json!({"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": true}),
            )
        });
        server.wait_for_metric("kiln_running_requests", 1.0);
        let killed = Command::new("kill")
            .args(["-TERM", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let (status, body) = pending.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 40);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(TcpStream::connect(&server.addr).is_err(), "still accepting");
}
