//! Helpers for end-to-end tests that run the `weir` binary and break things.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn weir() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weir"));
    c.current_dir(repo_root()).env("WEIR_LOG", "info").env("NO_COLOR", "1");
    c
}

pub fn repo_root() -> PathBuf {
    // Cargo sets CARGO_MANIFEST_DIR when it runs a test too: prefer that to the compile-time
    // path, which is stale when a shared target directory reuses a build from another clone.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    dir.join("../..").canonicalize().unwrap()
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let p = std::env::temp_dir().join(format!("weir-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Committed output lines of a sink directory (hidden files are not output), as a multiset.
pub fn committed_lines(dir: &Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return m };
    for e in rd {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        for line in std::fs::read_to_string(e.path()).unwrap().lines() {
            *m.entry(line.to_string()).or_default() += 1;
        }
    }
    m
}

/// Differences between two multisets, for assertion messages: (lost, duplicated/extra).
pub fn diff(expected: &BTreeMap<String, usize>, got: &BTreeMap<String, usize>) -> (usize, usize) {
    let mut lost = 0;
    let mut extra = 0;
    for (k, &n) in expected {
        let g = got.get(k).copied().unwrap_or(0);
        lost += n.saturating_sub(g);
        extra += g.saturating_sub(n);
    }
    for (k, &g) in got {
        if !expected.contains_key(k) {
            extra += g;
        }
    }
    (lost, extra)
}

pub fn assert_exactly_once(expected: &BTreeMap<String, usize>, got: &BTreeMap<String, usize>) {
    let (lost, extra) = diff(expected, got);
    assert!(lost == 0 && extra == 0, "not exactly once: {lost} line(s) lost, {extra} duplicated or wrong");
    assert!(!expected.is_empty());
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "weir failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

pub fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Completed checkpoints (with `_metadata`) in a job directory.
pub fn completed_checkpoints(job_dir: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(job_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("_metadata").exists())
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("chk-")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// The newest completed checkpoint, 0 if none.
pub fn latest_checkpoint(job_dir: &Path) -> u64 {
    completed_checkpoints(job_dir).last().copied().unwrap_or(0)
}

/// Wait until `job_dir` holds a completed checkpoint newer than `id`, or the child exits.
pub fn wait_for_checkpoint_after(child: &mut Child, job_dir: &Path, id: u64, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if latest_checkpoint(job_dir) > id {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// SIGKILL (no chance to clean up) and reap.
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Wait for a child with a deadline; kill it past the deadline. Returns whether it exited
/// by itself, successfully.
pub fn wait_success(child: &mut Child, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.success();
        }
        if start.elapsed() > timeout {
            kill9(child);
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A small deterministic PRNG for test choices, seeded from the clock and printed, so a failing
/// run can be repeated with WEIR_TEST_SEED.
pub struct Rng(u64);

impl Rng {
    pub fn from_env(test: &str) -> Self {
        let seed = std::env::var("WEIR_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        eprintln!("{test}: WEIR_TEST_SEED={seed}");
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `weir run examples/keyed_sum.yaml` over `count` records and `keys` keys, written to `out`,
/// with checkpoints in `ck` every `interval`; `extra` arguments come last (they win).
pub fn keyed_sum_cmd(out: &Path, ck: &Path, count: u64, keys: u64, interval: &str, extra: &[&str]) -> Command {
    let mut c = weir();
    c.args(["run", "examples/keyed_sum.yaml"])
        .arg("--set")
        .arg(format!("source.count={count}"))
        .arg("--set")
        .arg(format!("source.keys={keys}"))
        .arg("--set")
        .arg(format!("sink.path={}", out.display()))
        .arg("-D")
        .arg(format!("execution.checkpointing.dir={}", ck.display()))
        .arg("-D")
        .arg(format!("execution.checkpointing.interval={interval}"))
        .args(extra);
    c
}

/// Start `n` processes of one job on loopback (fresh ports, a host file in `dir`): `make(p)`
/// gives process `p`'s command, to which `--process p --hostfile …` is added.
pub fn spawn_cluster(dir: &Path, n: usize, make: impl Fn(usize) -> Command) -> Vec<Child> {
    let hosts = dir.join("hosts.txt");
    let lines: String = (0..n).map(|_| format!("127.0.0.1:{}\n", free_port())).collect();
    std::fs::write(&hosts, lines).unwrap();
    (0..n)
        .map(|p| {
            let mut c = make(p);
            c.arg("--process").arg(p.to_string()).arg("--hostfile").arg(&hosts);
            spawn(&mut c)
        })
        .collect()
}
