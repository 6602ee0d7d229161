//! `shadowmoe serve` end to end: the real binary on 127.0.0.1 with the bundled reference model
//! and its experts on disk (`--capacity 160`), driven by the official `openai` and `anthropic`
//! Python SDKs (serve/tests/clients.py), its `/metrics` read by `prometheus_client`'s parser;
//! its greedy text compared with `shadowmoe generate`'s. A port in use is a one-line error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shadowmoe"))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model() -> String {
    root()
        .join("models/reference/checkpoint")
        .to_string_lossy()
        .into_owned()
}

/// A server process, killed if the test fails before it is stopped.
struct Server {
    child: Child,
    base: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = bin()
            .args(["serve", "--model", &model(), "--port", "0", "--threads", "2"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("shadowmoe serve: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not start: {}", log.lock().unwrap());
            }
        };
        Server { child, base, log }
    }

    /// SIGTERM, then the exit status and the log.
    fn stop(mut self) -> (bool, String) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        std::thread::sleep(Duration::from_millis(200));
        (status.success(), self.log.lock().unwrap().clone())
    }
}

/// `shadowmoe generate`'s greedy text and prompt length.
fn generate(flag: &str, prompt: &str, tokens: usize) -> serde_json::Value {
    let o = bin()
        .args([
            "generate",
            "--model",
            &model(),
            flag,
            prompt,
            "--threads",
            "2",
            "--capacity",
            "160",
        ])
        .args(["--max-new-tokens", &tokens.to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let text = String::from_utf8(o.stdout).unwrap();
    let text = text.strip_suffix('\n').unwrap().to_string();
    let prompt_tokens: usize = err
        .split("prefill: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no prefill line in {err}"));
    let generated: usize = err
        .split("decode: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(
        generated, tokens,
        "the reference stopped early at an end-of-sequence token: pick another prompt"
    );
    serde_json::json!({"prompt": prompt, "tokens": tokens, "text": text, "prompt_tokens": prompt_tokens})
}

fn python_with_sdks() -> Option<String> {
    let python = std::env::var("SHADOWMOE_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import openai, anthropic, prometheus_client"])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var_os("SHADOWMOE_REQUIRE_PYARROW").is_none()
            && std::env::var_os("SHADOWMOE_REQUIRE_SDKS").is_none(),
        "the openai, anthropic and prometheus_client packages are required here: \
         pip install openai==3.57.0 anthropic==2.16.0 prometheus_client==0.26.0 (or set SHADOWMOE_PYTHON)"
    );
    eprintln!(
        "openai/anthropic/prometheus_client not installed for {python}: the SDK checks are skipped (CI runs them)"
    );
    None
}

#[test]
fn real_sdks_against_the_server() {
    let Some(python) = python_with_sdks() else {
        return;
    };
    let completion = generate("--prompt", "def parse_args(argv):", 24);
    let chat = generate("--chat", "Write a function that reverses a list.", 16);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("cache-state.json");
    let server = Server::start(&[
        "--capacity",
        "160",
        "--max-input-tokens",
        "256",
        "--queue-depth",
        "16",
        "--cache-state",
        state.to_str().unwrap(),
    ]);
    let busy = Server::start(&["--queue-depth", "0"]);
    let cfg = tmp.path().join("clients.json");
    let model = model();
    std::fs::write(
        &cfg,
        serde_json::json!({
            "base": server.base,
            "busy_base": busy.base,
            "model": model,
            "max_input_tokens": 256,
            "completion": completion,
            "chat": chat,
        })
        .to_string(),
    )
    .unwrap();
    let o = Command::new(&python)
        .arg(root().join("serve/tests/clients.py"))
        .arg(&cfg)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("{out}");
    let (ok, log) = server.stop();
    assert!(
        o.status.success(),
        "clients.py failed:\n{out}\n{}\nserver log:\n{log}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("all checks passed"), "{out}");
    assert!(ok, "the server did not exit cleanly on SIGTERM:\n{log}");
    // The saved warm-start state: the resident set, least used first, with usage counts.
    let st: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(st["version"], 2, "{st}");
    let usage: std::collections::HashMap<(u64, u64), u64> = st["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                (u[0].as_u64().unwrap(), u[1].as_u64().unwrap()),
                u[2].as_u64().unwrap(),
            )
        })
        .collect();
    let counts: Vec<u64> = st["experts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| usage[&(e[0].as_u64().unwrap(), e[1].as_u64().unwrap())])
        .collect();
    assert!(!counts.is_empty() && counts.iter().all(|&n| n > 0), "{st}");
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "not least used first: {counts:?}"
    );
    assert!(
        log.contains("experts: hit rate"),
        "no closing cache summary:\n{log}"
    );
    let _ = busy.stop();
}

#[test]
fn a_port_in_use_is_a_one_line_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let o = bin()
        .args(["serve", "--model", &model(), "--port", &port])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    // A cache state of another model: one line, before serving.
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state.json");
    std::fs::write(
        &state,
        r#"{"format":"shadowmoe-cache-state","version":1,"config_sha256":"00ff","experts":[[0,1]]}"#,
    )
    .unwrap();
    let o = bin()
        .args(["serve", "--model", &model(), "--port", "0", "--capacity", "160"])
        .args(["--cache-state", state.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(
        lines.len() == 1 && lines[0].contains("cache state of another model"),
        "{err}"
    );
    // Bad flags: one line each.
    let o = bin()
        .args(["serve", "--model", &model(), "--port", "0", "--temperature=-1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--temperature"), "{err}");
}
