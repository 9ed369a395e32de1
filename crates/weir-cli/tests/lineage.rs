//! Recovery policy end to end: lineage after restoring an older checkpoint, fallback only on
//! proven corruption, no fresh start over committed output, withdrawn (never deleted) output.
//! Every test asserts that the committed output is exactly once in the end.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const JOB: &str = "keyed-sum";

fn keyed_sum(out: &Path, ck: &Path, extra: &[&str]) -> Command {
    let mut args = vec!["-D", "restart-strategy.fixed-delay.delay=100ms"];
    args.extend_from_slice(extra);
    keyed_sum_cmd(out, ck, 2_000_000, 100_000, "200ms", &args)
}

fn reference(tmp: &TempDir) -> std::collections::BTreeMap<String, usize> {
    let out = tmp.join("ref-out");
    run_ok(&mut keyed_sum(&out, &tmp.join("ref-ck"), &[]));
    committed_lines(&out)
}

/// Run slowly until the job directory holds `n` more completed checkpoints, then SIGKILL.
fn run_until_checkpoints(out: &Path, ck: &Path, n: u64, extra: &[&str]) -> Vec<u64> {
    let job_dir = ck.join(JOB);
    let mut args = vec!["--set", "source.rate=1000000"];
    args.extend_from_slice(extra);
    let mut child = spawn(&mut keyed_sum(out, ck, &args));
    let before = latest_checkpoint(&job_dir);
    assert!(wait_for_checkpoint_after(&mut child, &job_dir, before + n - 1, Duration::from_secs(60)), "no checkpoints");
    kill9(&mut child);
    completed_checkpoints(&job_dir)
}

/// Files under `<out>/.withdrawn`, recursively.
fn withdrawn_files(out: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![out.join(".withdrawn")];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files
}

/// Issue 7, item 1: `--restore chk-k` while newer checkpoints exist, then a crash before the
/// run's first checkpoint: `--restore latest` must restore chk-k again (the newer ones were
/// abandoned), not the newest, whose epochs' output the first restore already withdrew.
#[test]
fn restoring_an_older_checkpoint_abandons_the_newer_ones() {
    let tmp = TempDir::new("lineage");
    let expected = reference(&tmp);
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let job_dir = ck.join(JOB);
    let ids = run_until_checkpoints(&out, &ck, 4, &["-D", "execution.checkpointing.num-retained=10"]);
    let older = ids[ids.len() - 3];
    let newer: Vec<u64> = ids.iter().copied().filter(|&i| i > older).collect();
    let committed_before: usize = committed_lines(&out).values().sum();

    // Restore the older checkpoint; die once the sink has withdrawn the newer epochs' output,
    // long before the run's first checkpoint (1 h interval).
    let chk = job_dir.join(format!("chk-{older}"));
    let mut child = spawn(&mut keyed_sum(
        &out,
        &ck,
        &["--restore", chk.to_str().unwrap(), "--set", "source.rate=100000", "-D", "execution.checkpointing.interval=1h"],
    ));
    let mut log = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("withdrew") {
            break;
        }
    }
    kill9(&mut child);
    assert!(log.contains("withdrew"), "the sink withdraws the newer epochs' output:\n{log}");
    assert!(log.contains("abandoned"), "the newer checkpoints are abandoned:\n{log}");
    let withdrawn = withdrawn_files(&out);
    assert!(!withdrawn.is_empty(), "withdrawn files are kept under .withdrawn/");
    let visible: usize = committed_lines(&out).values().sum();
    let kept: usize = withdrawn.iter().map(|p| std::fs::read_to_string(p).unwrap().lines().count()).sum();
    assert_eq!(visible + kept, committed_before, "no committed line is destroyed, only withdrawn");

    // The abandoned checkpoints are listed as such and never restored, not even by path.
    let list = run_ok(weir().args(["checkpoints", "list", job_dir.to_str().unwrap()]));
    let list = String::from_utf8_lossy(&list.stdout);
    for id in &newer {
        assert!(
            list.lines().any(|l| l.trim_start().starts_with(&format!("{id} ")) && l.contains("ABANDONED")),
            "chk-{id} listed as ABANDONED:\n{list}"
        );
    }
    let abandoned = job_dir.join(format!("chk-{}", newer[newer.len() - 1]));
    let refused = keyed_sum(&out, &ck, &["--restore", abandoned.to_str().unwrap()]).output().unwrap();
    assert!(!refused.status.success(), "an abandoned checkpoint is never restored");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("abandoned"), "{}", String::from_utf8_lossy(&refused.stderr));

    let done = run_ok(&mut keyed_sum(&out, &ck, &["--restore", "latest"]));
    let log = String::from_utf8_lossy(&done.stderr);
    assert!(log.contains(&format!("restoring {JOB} from checkpoint {older} ")), "restores the run's restore point:\n{log}");
    assert_exactly_once(&expected, &committed_lines(&out));
    let new_ids = completed_checkpoints(&job_dir);
    assert!(new_ids.iter().all(|&i| i <= older || i > *newer.last().unwrap()), "new ids stay above every existing id: {new_ids:?}");
}

/// Issue 7, item 3: `num-retained: 1`, the only checkpoint corrupt: `--restore latest` fails
/// listing the checkpoint and its fault, instead of starting fresh and writing every committed
/// record a second time.
#[test]
fn no_valid_checkpoint_is_an_error_not_a_fresh_start() {
    let tmp = TempDir::new("novalid");
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    // One retained checkpoint (an older one may linger if the kill beat its deletion).
    let ids = run_until_checkpoints(&out, &ck, 2, &["-D", "execution.checkpointing.num-retained=1"]);
    for id in &ids {
        let state = first_state_file(&ck.join(JOB).join(format!("chk-{id}")));
        let mut bytes = std::fs::read(&state).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        std::fs::write(&state, bytes).unwrap();
    }
    let before = committed_lines(&out);
    assert!(!before.is_empty());

    let run = keyed_sum(&out, &ck, &["--restore", "latest"]).output().unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "must fail:\n{log}");
    for id in &ids {
        assert!(log.contains(&format!("chk-{id}: ")), "lists chk-{id}:\n{log}");
    }
    assert!(log.contains("checksum mismatch"), "names the fault:\n{log}");
    assert!(!log.contains("restart 1"), "no restart can fix it:\n{log}");
    assert_eq!(committed_lines(&out), before, "nothing written");
}

/// Issue 7, item 2: a read error that does not prove corruption (here ELOOP from a symlink
/// loop standing in for EIO) fails the attempt; it never makes the restore fall back to an
/// older checkpoint. Once the file is readable again the job resumes from the newest one.
#[test]
fn transient_read_error_fails_instead_of_falling_back() {
    let tmp = TempDir::new("transient");
    let expected = reference(&tmp);
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let ids = run_until_checkpoints(&out, &ck, 2, &[]);
    let latest = *ids.last().unwrap();
    let chk = ck.join(JOB).join(format!("chk-{latest}"));
    let state = first_state_file(&chk);
    let aside = tmp.join("aside.state");
    std::fs::rename(&state, &aside).unwrap();
    std::os::unix::fs::symlink(&state, &state).unwrap();

    let run = keyed_sum(&out, &ck, &["--restore", "latest", "-D", "restart-strategy.fixed-delay.attempts=1"]).output().unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "a transient error fails the job:\n{log}");
    assert!(!log.contains("restoring keyed-sum from checkpoint"), "no fallback to an older checkpoint:\n{log}");
    assert!(log.contains("restart 1"), "the restart strategy retries:\n{log}");
    assert!(log.contains(state.file_name().unwrap().to_str().unwrap()), "names the file:\n{log}");
    assert!(withdrawn_files(&out).is_empty(), "nothing withdrawn");

    std::fs::remove_file(&state).unwrap();
    std::fs::rename(&aside, &state).unwrap();
    let done = run_ok(&mut keyed_sum(&out, &ck, &["--restore", "latest"]));
    assert!(String::from_utf8_lossy(&done.stderr).contains(&format!("restoring {JOB} from checkpoint {latest} ")));
    assert_exactly_once(&expected, &committed_lines(&out));
}

/// Issue 7, items 4 and 5: a fallback past a corrupt checkpoint withdraws (never deletes) the
/// committed files of its epochs; a fresh start into a sink with committed output is refused.
#[test]
fn fallback_withdraws_and_fresh_start_into_used_sink_is_refused() {
    let tmp = TempDir::new("withdraw");
    let expected = reference(&tmp);
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let ids = run_until_checkpoints(&out, &ck, 4, &["-D", "execution.checkpointing.num-retained=10"]);
    // Corrupt the two newest, so the fallback passes epochs whose output surely committed.
    let target = ids[ids.len() - 3];
    for &id in &ids[ids.len() - 2..] {
        let state = first_state_file(&ck.join(JOB).join(format!("chk-{id}")));
        let len = std::fs::metadata(&state).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&state).unwrap().set_len(len - 10).unwrap();
    }
    let newer_parts: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("part-") && n.rsplit('-').next().unwrap().parse::<u64>().unwrap() > target)
        .collect();
    assert!(!newer_parts.is_empty(), "output of epochs after chk-{target} was committed");
    // Forgetting --restore after the crash: refused at once, nothing touched.
    let before = committed_lines(&out);
    let fresh = keyed_sum(&out, &ck, &[]).output().unwrap();
    let log = String::from_utf8_lossy(&fresh.stderr);
    assert!(!fresh.status.success(), "{log}");
    assert!(log.contains("--restore latest") && log.contains("empty directory"), "says how to resume:\n{log}");
    assert!(!log.contains("restart 1"), "refused at start, not retried:\n{log}");
    assert_eq!(committed_lines(&out), before);
    assert_eq!(completed_checkpoints(&ck.join(JOB)), ids, "a refused start leaves the checkpoints in the lineage");

    let done = run_ok(&mut keyed_sum(&out, &ck, &["--restore", "latest"]));
    let log = String::from_utf8_lossy(&done.stderr);
    assert!(log.contains("withdrew"), "{log}");
    assert!(log.contains(&format!("restoring {JOB} from checkpoint {target} ")), "{log}");
    for name in &newer_parts {
        let epoch: u64 = name.rsplit('-').next().unwrap().parse().unwrap();
        let kept = out.join(".withdrawn").join(format!("chk-{epoch}")).join(name);
        assert!(kept.exists(), "{name} withdrawn to {}, not deleted", kept.display());
    }
    assert_exactly_once(&expected, &committed_lines(&out));
}

fn first_state_file(chk: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chk)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "state") && std::fs::metadata(p).is_ok_and(|m| m.len() > 200))
        .collect();
    files.sort();
    files.into_iter().next().expect("a state file")
}

/// Issue 7, item 6: in a two-process job, process 0 chooses the restore point and the others
/// check theirs against it: a process that would restore another checkpoint fails the job
/// before anything is rolled back, instead of running with a mixed state.
#[test]
fn processes_that_disagree_on_the_restore_point_fail() {
    let tmp = TempDir::new("agree");
    let expected = reference(&tmp);
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let ids = run_until_checkpoints(&out, &ck, 3, &["-D", "execution.checkpointing.num-retained=10"]);
    let older = ck.join(JOB).join(format!("chk-{}", ids[0]));
    let cluster = |restores: [&str; 2]| spawn_cluster(&tmp.0, 2, |p| keyed_sum(&out, &ck, &["--restore", restores[p]]));
    let before = committed_lines(&out);
    // Process 1 is given the oldest checkpoint by path, process 0 restores the latest: a
    // final disagreement, before process 0 abandons anything. (A process asked for `latest`
    // takes process 0's choice instead.)
    let mut procs = cluster(["latest", older.to_str().unwrap()]);
    for (i, p) in procs.iter_mut().enumerate() {
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(st) = p.try_wait().unwrap() {
                break st;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "process {i} hangs");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(!status.success(), "process {i}: a disagreement fails the job");
    }
    let logs: Vec<String> = procs
        .iter_mut()
        .map(|p| {
            use std::io::Read;
            let mut s = String::new();
            p.stderr.take().unwrap().read_to_string(&mut s).unwrap();
            s
        })
        .collect();
    for log in &logs {
        assert!(log.contains("restore point disagreement"), "{log}");
        assert!(!log.contains("restart 1"), "a disagreement is final:\n{log}");
    }
    assert_eq!(completed_checkpoints(&ck.join(JOB)), ids, "nothing abandoned before the processes agreed");
    assert!(withdrawn_files(&out).is_empty(), "nothing rolled back");
    assert_eq!(committed_lines(&out), before);

    let mut procs = cluster(["latest", "latest"]);
    for p in procs.iter_mut() {
        assert!(wait_success(p, Duration::from_secs(120)), "the agreeing cluster run failed");
    }
    assert_exactly_once(&expected, &committed_lines(&out));
}

/// Issue 7, item 12: SIGTERM to any process of a job cancels the whole job (both exit 130,
/// the retention policy applies); `NO_EXTERNALIZED_CHECKPOINTS` deletes checkpoints when the
/// job finishes, as Flink does.
#[test]
fn a_signal_to_any_process_cancels_the_job() {
    let tmp = TempDir::new("cancel-any");
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let job_dir = ck.join(JOB);
    let policy = "execution.checkpointing.externalized-checkpoint-retention=DELETE_ON_CANCELLATION";
    let mut procs = spawn_cluster(&tmp.0, 2, |_| {
        keyed_sum(&out, &ck, &["-D", "restart-strategy.type=none", "--set", "source.rate=500000", "-D", policy])
    });
    assert!(wait_for_checkpoint_after(&mut procs[0], &job_dir, 0, Duration::from_secs(60)), "cluster checkpoints");
    let ok = Command::new("kill").args(["-TERM", &procs[1].id().to_string()]).status().unwrap().success();
    assert!(ok);
    for (i, p) in procs.iter_mut().enumerate() {
        let start = std::time::Instant::now();
        let code = loop {
            if let Some(st) = p.try_wait().unwrap() {
                break st.code();
            }
            if start.elapsed() > Duration::from_secs(30) {
                kill9(p);
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(code, Some(130), "process {i} ends as cancelled");
    }
    assert!(completed_checkpoints(&job_dir).is_empty(), "DELETE_ON_CANCELLATION applies to the whole job");

    // NO_EXTERNALIZED_CHECKPOINTS: a finished job leaves no checkpoint behind.
    let (out2, ck2) = (tmp.join("out2"), tmp.join("ck2"));
    let policy = "execution.checkpointing.externalized-checkpoint-retention=NO_EXTERNALIZED_CHECKPOINTS";
    run_ok(&mut keyed_sum(&out2, &ck2, &["--set", "source.count=300000", "-D", policy]));
    assert!(!committed_lines(&out2).is_empty());
    let left: Vec<_> = std::fs::read_dir(ck2.join(JOB)).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("chk-")).collect();
    assert!(left.is_empty(), "no checkpoint left: {left:?}");

    // A run refused at start deletes nothing of what an earlier run left to resume from.
    let (out3, ck3) = (tmp.join("out3"), tmp.join("ck3"));
    let ids = run_until_checkpoints(&out3, &ck3, 2, &[]);
    let refused = keyed_sum(&out3, &ck3, &["-D", policy]).output().unwrap();
    assert!(!refused.status.success());
    assert_eq!(completed_checkpoints(&ck3.join(JOB)), ids, "the earlier run's checkpoints are kept");
}
