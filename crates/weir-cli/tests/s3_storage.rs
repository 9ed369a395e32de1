//! End to end on S3 (`execution.checkpointing.dir: s3://…`, a real moto server on loopback):
//! SIGKILL and restore from the bucket, and a store outage mid-run (checkpoints declined, the
//! job goes on, checkpoints complete again once the store is back). Every time, the committed
//! output equals a failure-free run's.

mod common;
#[path = "../../weir-storage/tests/common/moto.rs"]
mod moto;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use moto::Moto;
use weir_storage::CheckpointStorage;

const COUNT: u64 = 1_000_000;
const KEYS: u64 = 50_000;

fn keyed_sum(out: &Path, ck: &str, extra: &[String]) -> Command {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    keyed_sum_cmd(out, Path::new(ck), COUNT, KEYS, "200ms", &extra)
}

fn reference(tmp: &TempDir) -> std::collections::BTreeMap<String, usize> {
    let out = tmp.join("ref-out");
    run_ok(&mut keyed_sum_cmd(&out, &tmp.join("ref-ck"), COUNT, KEYS, "200ms", &[]));
    let lines = committed_lines(&out);
    assert_eq!(lines.values().sum::<usize>(), COUNT as usize, "one line per record");
    lines
}

/// A child whose stderr is drained into a string as it comes (a full pipe would stall it).
fn spawn_logged(cmd: &mut Command) -> (Child, Arc<Mutex<String>>) {
    let mut child = spawn(cmd);
    let log = Arc::new(Mutex::new(String::new()));
    let mut err = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (child, log)
}

/// The newest completed checkpoint in the bucket (0 if none, or the store is down).
fn latest_on_s3(s: &CheckpointStorage) -> u64 {
    s.completed_checkpoints().ok().and_then(|ids| ids.last().copied()).unwrap_or(0)
}

/// Wait until the bucket holds a completed checkpoint newer than `id`, or the child exits.
fn wait_for_s3_checkpoint_after(child: &mut Child, s: &CheckpointStorage, id: u64, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if latest_on_s3(s) > id {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn args(m: &Moto, more: &[&str]) -> Vec<String> {
    let mut a = m.defines();
    a.extend(more.iter().map(|s| s.to_string()));
    a
}

#[test]
fn sigkill_at_random_moments_then_restore_from_s3() {
    let m = Moto::start("weir-e2e-kill");
    let tmp = TempDir::new("s3-kill");
    let expected = reference(&tmp);
    let mut rng = Rng::from_env("s3-sigkill");
    let (out, ck) = (tmp.join("out"), m.url("ck"));
    let s = CheckpointStorage::open_with(&ck, "keyed-sum", &m.options()).unwrap();
    let rate = ["--set", "source.rate=200000"];
    for round in 0..3 {
        let mut extra = args(&m, &rate);
        if round > 0 {
            extra.extend(["--restore".to_string(), "latest".to_string()]);
        }
        let mut child = spawn(&mut keyed_sum(&out, &ck, &extra));
        let before = latest_on_s3(&s);
        assert!(wait_for_s3_checkpoint_after(&mut child, &s, before, Duration::from_secs(60)), "round {round}: no checkpoint reached the bucket");
        std::thread::sleep(Duration::from_millis(rng.range(0, 600)));
        kill9(&mut child);
    }
    let newest = latest_on_s3(&s);
    assert!(newest >= 3, "checkpoints of every round are in the bucket: {newest}");
    // The store unreachable at restore: the run fails (after its restarts), never a fresh start.
    let before = committed_lines(&out);
    let dead = format!("s3.endpoint=http://127.0.0.1:{}", free_port());
    let unreachable = keyed_sum(&out, &ck, &args(&m, &["-D", &dead, "-D", "restart-strategy.type=none", "--restore", "latest"])).output().unwrap();
    let log = String::from_utf8_lossy(&unreachable.stderr);
    assert!(!unreachable.status.success(), "a restore from an unreachable store must fail:\n{log}");
    assert!(log.contains("s3://weir-e2e-kill/ck/keyed-sum/") && !log.contains("starting fresh"), "{log}");
    assert_eq!(committed_lines(&out), before, "nothing was written by the failed run");

    let done = run_ok(&mut keyed_sum(&out, &ck, &args(&m, &["--restore", "latest"])));
    let log = String::from_utf8_lossy(&done.stderr);
    assert!(log.contains("restoring keyed-sum from checkpoint"), "restored from the bucket:\n{log}");
    assert_exactly_once(&expected, &committed_lines(&out));
    assert!(!repo_root().join("s3:").exists(), "nothing was written to a local directory named after the URL");
    // `weir checkpoints list` reads the bucket with the same -D settings.
    let mut list = weir();
    list.args(["checkpoints", "list", &format!("{ck}/keyed-sum")]).args(m.defines());
    let listed = run_ok(&mut list);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.lines().any(|l| l.trim_start().starts_with(&s.completed_checkpoints().unwrap().last().unwrap().to_string())), "{text}");
}

#[test]
fn checkpoints_are_declined_while_the_store_is_down_and_complete_once_it_is_back() {
    let mut m = Moto::start("weir-e2e-outage");
    let tmp = TempDir::new("s3-outage");
    let expected = reference(&tmp);
    let (out, ck) = (tmp.join("out"), m.url("ck"));
    let s = CheckpointStorage::open_with(&ck, "keyed-sum", &m.options()).unwrap();
    // About twenty seconds of input (the run is killed long before, whatever the load); failed
    // checkpoints are tolerated (the job must go on).
    let run = args(&m, &["--set", "source.rate=50000", "-D", "execution.checkpointing.tolerable-failed-checkpoints=100000"]);
    let (mut child, log) = spawn_logged(&mut keyed_sum(&out, &ck, &run));
    assert!(wait_for_s3_checkpoint_after(&mut child, &s, 0, Duration::from_secs(60)), "no checkpoint before the outage");

    m.stop();
    let down_at = log.lock().unwrap().len();
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "the job goes on while the store is down:\n{}", log.lock().unwrap());
    let during = log.lock().unwrap()[down_at..].to_string();
    assert!(during.contains("s3://weir-e2e-outage/ck/keyed-sum/"), "failed checkpoints name the object:\n{during}");

    // Back, empty (moto keeps nothing): checkpoints complete again.
    m.restart();
    assert!(wait_for_s3_checkpoint_after(&mut child, &s, 0, Duration::from_secs(60)), "no checkpoint after the outage:\n{}", log.lock().unwrap());
    let after = latest_on_s3(&s);
    kill9(&mut child);

    // The checkpoint taken after the outage restores: no loss, no duplicate.
    let done = run_ok(&mut keyed_sum(&out, &ck, &args(&m, &["--restore", "latest"])));
    let text = String::from_utf8_lossy(&done.stderr);
    let restored = text.split("restoring keyed-sum from checkpoint ").nth(1).and_then(|t| t.split_whitespace().next()).and_then(|n| n.parse::<u64>().ok());
    assert!(restored.is_some_and(|r| r >= after), "restored a checkpoint taken after the outage (>= {after}):\n{text}");
    assert_exactly_once(&expected, &committed_lines(&out));
}
