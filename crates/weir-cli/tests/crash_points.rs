//! Crash-point tests of the commit protocol: the process aborts (no unwinding, no cleanup) at
//! each step between writing state and publishing output, then the job is restored; the
//! committed output must equal a failure-free run's every time. The crash points exist only in
//! test builds (weir's `failpoints` feature) and are armed with `FAILPOINTS=<name>=...`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const JOB: &str = "keyed-sum";

fn keyed_sum(out: &Path, ck: &Path, extra: &[&str]) -> Command {
    let mut args = vec!["-D", "execution.checkpointing.num-retained=10"];
    args.extend_from_slice(extra);
    keyed_sum_cmd(out, ck, 1_000_000, 50_000, "100ms", &args)
}

/// Run armed with `failpoints`; the process must die at the crash point (SIGABRT), not finish.
fn crash_at(cmd: &mut Command, failpoints: &str) {
    let out = cmd.env("FAILPOINTS", failpoints).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{failpoints}: the job should have crashed:\n{log}");
    let name = failpoints.split('=').next().unwrap();
    assert!(log.contains(&format!("crash point {name}: aborting")), "{failpoints}: crashed elsewhere:\n{log}");
}

/// Every crash point of a checkpoint's commit: crash at a random hit (so at different
/// checkpoints), restore, and compare with the reference.
#[test]
fn crash_at_every_step_of_the_commit_protocol() {
    let tmp = TempDir::new("crash");
    let ref_out = tmp.join("ref-out");
    run_ok(&mut keyed_sum(&ref_out, &tmp.join("ref-ck"), &[]));
    let expected = committed_lines(&ref_out);
    let mut rng = Rng::from_env("crash_points");
    for point in ["checkpoint-before-metadata", "checkpoint-before-notify", "file-sink-before-publish", "between-sink-commits"] {
        let (out, ck) = (tmp.join(&format!("out-{point}")), tmp.join(&format!("ck-{point}")));
        let skip = rng.range(1, 5);
        crash_at(&mut keyed_sum(&out, &ck, &["--set", "source.rate=400000"]), &format!("{point}={skip}*off->return"));
        let done = run_ok(&mut keyed_sum(&out, &ck, &["--restore", "latest"]));
        let log = String::from_utf8_lossy(&done.stderr);
        assert!(log.contains("restoring keyed-sum from checkpoint") || completed_before_crash_is_empty(&log), "{point}: {log}");
        let (lost, extra) = diff(&expected, &committed_lines(&out));
        assert!(lost == 0 && extra == 0, "{point} (after {skip} hits): {lost} line(s) lost, {extra} duplicated");
    }
}

fn completed_before_crash_is_empty(log: &str) -> bool {
    log.contains("no checkpoint in")
}

/// A crash while a restore withdraws the output of abandoned epochs: the next restore
/// withdraws the rest, and nothing is lost or doubled.
#[test]
fn crash_during_the_sink_rollback_of_a_restore() {
    let tmp = TempDir::new("crash-rollback");
    let ref_out = tmp.join("ref-out");
    run_ok(&mut keyed_sum(&ref_out, &tmp.join("ref-ck"), &[]));
    let expected = committed_lines(&ref_out);
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let job_dir = ck.join(JOB);
    let mut child = spawn(&mut keyed_sum(&out, &ck, &["--set", "source.rate=300000", "-D", "parallelism.default=1"]));
    assert!(wait_for_checkpoint_after(&mut child, &job_dir, 4, Duration::from_secs(60)), "no checkpoints");
    kill9(&mut child);
    // Restore the oldest on purpose: several committed epochs must be withdrawn.
    let ids = completed_checkpoints(&job_dir);
    let chk: PathBuf = job_dir.join(format!("chk-{}", ids[0]));
    let before: usize = committed_lines(&out).values().sum();
    crash_at(
        &mut keyed_sum(&out, &ck, &["--restore", chk.to_str().unwrap(), "-D", "parallelism.default=1"]),
        "file-sink-rollback=1*off->return",
    );
    let withdrawn = std::fs::read_dir(out.join(".withdrawn")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(withdrawn, 2, "the crash came after the second withdrawn epoch");
    assert!(committed_lines(&out).values().sum::<usize>() < before);
    // The lineage was fixed before the rollback: `latest` is the restore point again.
    let done = run_ok(&mut keyed_sum(&out, &ck, &["--restore", "latest", "-D", "parallelism.default=1"]));
    let log = String::from_utf8_lossy(&done.stderr);
    assert!(log.contains(&format!("restoring keyed-sum from checkpoint {} ", ids[0])), "{log}");
    assert_exactly_once(&expected, &committed_lines(&out));
}

/// Issue 7, item 9: the wall clock steps back an hour mid-run (an NTP step): checkpoints go
/// on at their interval, because the coordinator keeps monotonic time.
#[test]
fn a_wall_clock_jump_does_not_stall_checkpoints() {
    let tmp = TempDir::new("clock");
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let run = keyed_sum(&out, &ck, &["--set", "source.rate=400000"])
        .env("FAILPOINTS", "wall-clock-jump-back-ms=10*off->return(3600000)")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{log}");
    let completed = log.lines().filter(|l| l.contains("checkpoint") && l.contains("complete in")).count();
    // 2.5 s at 100 ms: about 25 checkpoints; a coordinator on wall time stops triggering at the
    // jump and completes only the first few and the final one.
    assert!(completed >= 10, "only {completed} checkpoints completed:\n{log}");
}
