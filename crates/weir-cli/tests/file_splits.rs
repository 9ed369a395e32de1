//! File source splits are identified by file path (issue 7 item 8): a restore matches each
//! file's position by its name, not by its place in the directory listing. A file added before
//! a restore is read from its start; a file that vanished fails the job at start, naming it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const JOB: &str = "file-splits";
const LINES: usize = 100_000;

/// `LINES` distinct lines named after the file, so that a line read from another file's offset
/// or twice shows.
fn write_input(dir: &Path, name: &str, expected: &mut BTreeMap<String, usize>) {
    let stem = name.trim_end_matches(".txt");
    let text: String = (0..LINES).map(|i| format!("{stem}-{i:06}\n")).collect();
    for line in text.lines() {
        *expected.entry(line.to_string()).or_default() += 1;
    }
    std::fs::write(dir.join(name), text).unwrap();
}

/// Lines of the files of `input` to `out`, small batches and one in flight (a few thousand
/// lines a second), so that a kill lands between checkpoints. Restarts are allowed (5 s
/// apart): a deterministic failure must not use them.
fn job(tmp: &TempDir, parallelism: u32) -> Command {
    let job = tmp.join(&format!("job-{parallelism}.yaml"));
    std::fs::write(
        &job,
        format!(
            "name: {JOB}\nconfig:\n  parallelism.default: {parallelism}\n  execution.checkpointing.interval: 50ms\n  \
             execution.checkpointing.dir: {}\n  weir.source.batch-size: 64\n  weir.source.max-inflight-batches: 1\n  \
             restart-strategy.type: fixed-delay\n  restart-strategy.fixed-delay.attempts: 3\n  restart-strategy.fixed-delay.delay: 5s\n\
             source: {{type: file, path: {}}}\nsink: {{type: file, path: {}}}\n",
            tmp.join("ck").display(),
            tmp.join("in").display(),
            tmp.join("out").display()
        ),
    )
    .unwrap();
    let mut c = weir();
    c.arg("run").arg(job);
    c
}

/// Run at parallelism 2 over b, c and d until two checkpoints completed, then SIGKILL; the newest
/// checkpoint must have caught the files partly read. Returns the expected output of all three.
fn run_and_kill(tmp: &TempDir) -> BTreeMap<String, usize> {
    let input = tmp.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let mut expected = BTreeMap::new();
    for name in ["b.txt", "c.txt", "d.txt"] {
        write_input(&input, name, &mut expected);
    }
    let job_dir = tmp.join("ck").join(JOB);
    let mut child = spawn(&mut job(tmp, 2));
    assert!(wait_for_checkpoint_after(&mut child, &job_dir, 1, Duration::from_secs(60)), "no checkpoints before the job ended");
    kill9(&mut child);
    let bytes = std::fs::read(job_dir.join(format!("chk-{}", latest_checkpoint(&job_dir))).join("_metadata")).unwrap();
    // The JSON body, without the checksum trailer.
    let meta: serde_json::Value = serde_json::Deserializer::from_slice(&bytes).into_iter().next().unwrap().unwrap();
    assert_eq!(meta["is_final"], false, "the kill came after the end");
    let splits: Vec<&serde_json::Value> =
        meta["subtasks"].as_array().unwrap().iter().flat_map(|t| t[1]["splits"].as_array().unwrap()).collect();
    let size = (LINES * "b-000000\n".len()) as u64;
    let partly = splits.iter().filter(|s| s["offset"].as_u64().is_some_and(|o| o > 0 && o < size)).count();
    assert!(partly > 0, "no file was partly read at the checkpoint: {splits:?}");
    expected
}

fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files.push((e.path(), e.metadata().unwrap().len()));
            }
        }
    }
    files.sort();
    files
}

/// A file whose name sorts first is added before the restore (at another parallelism): it
/// shifts every other file's place in the listing, yet each file resumes at its own offset and
/// the new one is read from its start: every line of every file once.
#[test]
fn a_file_added_before_a_restore_is_read_from_its_start() {
    let tmp = TempDir::new("file-splits-added");
    let mut expected = run_and_kill(&tmp);
    write_input(&tmp.join("in"), "a.txt", &mut expected);
    let mut child = spawn(job(&tmp, 3).args(["--restore", "latest"]));
    assert!(wait_success(&mut child, Duration::from_secs(120)), "the restored job failed");
    assert_exactly_once(&expected, &committed_lines(&tmp.join("out")));
}

/// A file of the restored checkpoint that is gone fails the job at start, naming the file,
/// without restarting and without touching the output.
#[test]
fn a_file_gone_before_a_restore_fails_the_job_naming_it() {
    let tmp = TempDir::new("file-splits-gone");
    run_and_kill(&tmp);
    std::fs::remove_file(tmp.join("in").join("c.txt")).unwrap();
    let out = tmp.join("out");
    let before = files_under(&out);
    let start = Instant::now();
    let run = job(&tmp, 2).args(["--restore", "latest"]).output().unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "the restored job succeeded:\n{log}");
    assert!(log.contains(&format!("file {} is gone", tmp.join("in").join("c.txt").display())), "does not name the file:\n{log}");
    assert!(!log.contains("restart 1"), "restarted:\n{log}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert_eq!(files_under(&out), before, "the failed restore changed the output");
}
