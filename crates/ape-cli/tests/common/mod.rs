//! What the `ape` binary's integration tests share: the test model, the binary, a real
//! `redis-server` and a running `ape serve`.

#![allow(dead_code)] // each test file uses its own part of this module

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn model() -> PathBuf {
    model_file("smollm2-135m-instruct-q4_1.gguf")
}

/// A test model by its file name in `models/`.
pub(crate) fn model_file(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name);
    assert!(
        path.exists(),
        "run `ape model pull` (or `bash scripts/test.sh`) first"
    );
    path
}

/// The `ape` binary on two threads, ignoring the user's store folder.
pub(crate) fn ape(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ape"));
    command
        .args(["--threads", "2"])
        .args(args)
        .env_remove("APE_CACHE_DIR");
    command
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` on a free loopback port for the length of a test.
pub(crate) struct RedisServer {
    child: Child,
    pub url: String,
}

impl RedisServer {
    pub(crate) fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    /// A fresh, empty `redis-server` on `port`.
    pub(crate) fn start_on(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: run `bash scripts/test.sh`, which installs it with apt-get");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ape serve` on the test model and a free port, until dropped.
pub(crate) struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl Server {
    /// Start the server with `extra` arguments and wait until it listens.
    pub(crate) fn start(extra: &[&str]) -> Server {
        Server::start_model(&model(), extra)
    }

    /// [`Server::start`] on another model file.
    pub(crate) fn start_model(model: &Path, extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--model", model.to_str().unwrap(), "--port", "0"];
        args.extend_from_slice(extra);
        let mut child = ape(&args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("ape serve starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("ape serve exited before listening")
                .unwrap();
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining the server's log so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, url }
    }

    pub(crate) fn get(&self, path: &str) -> reqwest::blocking::Response {
        reqwest::blocking::get(format!("{}{path}", self.url)).expect("the server answers")
    }

    pub(crate) fn post(&self, path: &str, body: &serde_json::Value) -> reqwest::blocking::Response {
        reqwest::blocking::Client::new()
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .expect("the server answers")
    }

    /// The value of one sample line of `/metrics`, e.g. `ape_requests_refused_total`.
    pub(crate) fn metric(&self, sample: &str) -> f64 {
        let text = self.get("/metrics").text().unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no `{sample}` in /metrics:\n{text}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
