//! `weir run --savepoint-on-stop`: SIGTERM stops the job with a savepoint (exit 0, `savepoint:
//! PATH` on stdout), the savepoint resumes it on the other backend at another parallelism, and
//! the output is exactly once.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;

#[test]
fn sigterm_stops_with_a_savepoint_that_resumes_on_the_other_backend() {
    let tmp = TempDir::new("savepoint");
    let out_ref = tmp.join("ref-out");
    run_ok(&mut keyed_sum_cmd(&out_ref, &tmp.join("ref-ck"), 1_000_000, 50_000, "200ms", &[]));
    let expected = committed_lines(&out_ref);
    let (out, ck, sp) = (tmp.join("out"), tmp.join("ck"), tmp.join("savepoints"));
    let sp_dir = format!("execution.checkpointing.savepoint-dir={}", sp.display());
    let mut child = keyed_sum_cmd(&out, &ck, 1_000_000, 50_000, "200ms", &["--set", "source.rate=200000", "-D", &sp_dir, "-D", "state.backend.type=rocksdb"])
        .arg("--savepoint-on-stop")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for_checkpoint_after(&mut child, &ck.join("keyed-sum"), 1, Duration::from_secs(60)), "no checkpoint");
    let ok = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM");
    let status = child.wait().unwrap();
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert_eq!(status.code(), Some(0), "stop with a savepoint ends the job normally");
    let path = stdout.lines().find_map(|l| l.strip_prefix("savepoint: ")).unwrap_or_else(|| panic!("no savepoint printed: {stdout}"));
    let partial = committed_lines(&out).values().sum::<usize>();
    assert!(partial > 0 && partial < 1_000_000, "stopped mid-input: {partial} lines");
    // Retention never touches the savepoint: remove the job's checkpoints altogether.
    std::fs::remove_dir_all(&ck).unwrap();
    run_ok(&mut keyed_sum_cmd(&out, &ck, 1_000_000, 50_000, "200ms", &["--restore", path, "-D", "parallelism.default=2", "-D", "state.backend.type=hashmap"]));
    assert_exactly_once(&expected, &committed_lines(&out));
}
