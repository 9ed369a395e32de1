//! A real S3-compatible server for tests: moto in server mode on a free loopback port, with
//! one bucket, killed on drop. `scripts/install-test-deps.sh` installs it and `scripts/test.sh`
//! sets `WEIR_MOTO_SERVER`; without it the test fails (never skips).
//!
//! Shared by weir-storage's and weir-cli's tests (`#[path]`-included), so it uses std only.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto server with one bucket.
pub struct Moto {
    child: Option<Child>,
    /// The loopback port it listens on (kept across [`Moto::restart`]).
    pub port: u16,
    /// The bucket it holds.
    pub bucket: String,
    log: PathBuf,
}

/// The moto_server binary from `WEIR_MOTO_SERVER`; a test panics with what to do when it is
/// missing.
pub fn moto_server_binary() -> PathBuf {
    const HOW: &str = "run scripts/install-test-deps.sh, then export WEIR_MOTO_SERVER=${WEIR_TEST_DEPS:-$HOME/.cache/weir-test-deps}/moto-venv/bin/moto_server (scripts/test.sh does both)";
    let Some(p) = std::env::var_os("WEIR_MOTO_SERVER") else {
        panic!("WEIR_MOTO_SERVER is not set: this test needs a real S3 server (moto); {HOW}");
    };
    let p = PathBuf::from(p);
    assert!(p.is_file(), "WEIR_MOTO_SERVER={} does not exist: {HOW}", p.display());
    p
}

impl Moto {
    /// Start a server on a free loopback port and create `bucket`.
    pub fn start(bucket: &str) -> Moto {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::env::temp_dir().join(format!("weir-moto-{}-{port}.log", std::process::id()));
        let mut m = Moto { child: None, port, bucket: bucket.to_string(), log };
        m.launch();
        m
    }

    fn launch(&mut self) {
        let bin = moto_server_binary();
        let log = std::fs::File::create(&self.log).unwrap();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        self.child = Some(child);
        let start = Instant::now();
        // Retried: a port just freed by a killed server may take a moment to bind again.
        while self.request("GET", "/").is_none() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("moto_server exited ({st}) on port {}: {}", self.port, self.log_tail());
            }
            assert!(start.elapsed() < Duration::from_secs(60), "moto_server did not answer on port {} within 60 s: {}", self.port, self.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = self.request("PUT", &format!("/{}", self.bucket)).expect("create bucket");
        assert_eq!(status, 200, "creating bucket {}: HTTP {status}: {}", self.bucket, self.log_tail());
    }

    /// A plain HTTP request without a body; the response status, `None` if nothing answered.
    fn request(&self, method: &str, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.port).ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).ok()?;
        // "HTTP/1.1 200"
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    }

    /// The server's request log so far (one line per request: method, path, status).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://bucket/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The storage options (Flink's keys) that reach this server.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("s3.endpoint", self.endpoint()),
            ("s3.access-key", "weir-test".to_string()),
            ("s3.secret-key", "weir-test-secret".to_string()),
            ("s3.region", "us-east-1".to_string()),
            ("s3.path.style.access", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The same options as `-D key=value` arguments of `weir run`.
    pub fn defines(&self) -> Vec<String> {
        self.options().into_iter().flat_map(|(k, v)| ["-D".to_string(), format!("{k}={v}")]).collect()
    }

    /// Kill the server (SIGKILL): the store becomes unreachable.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port. moto keeps nothing across restarts: the bucket is
    /// created again, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}
