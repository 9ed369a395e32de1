//! The file source's `repeat: N` across a SIGKILL: killed in the second pass over the files and
//! restored (at another parallelism), the job resumes in that pass: every line is in the output
//! exactly N times.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const JOB: &str = "file-repeat";
const LINES: usize = 3_000;
const REPEAT: usize = 3;
/// A pass's share of a checkpointed file offset (`weir::source::FileSource`'s encoding).
const PASS_UNIT: u64 = 1 << 48;

/// `LINES` distinct lines per file, each expected `REPEAT` times.
fn write_input(dir: &Path, expected: &mut BTreeMap<String, usize>) {
    std::fs::create_dir_all(dir).unwrap();
    for stem in ["b", "c", "d"] {
        let text: String = (0..LINES).map(|i| format!("{stem}-{i:06}\n")).collect();
        for line in text.lines() {
            *expected.entry(line.to_string()).or_default() += REPEAT;
        }
        std::fs::write(dir.join(format!("{stem}.txt")), text).unwrap();
    }
}

/// The file job over `in` with `repeat: REPEAT`; small batches and one in flight, so that the
/// passes take seconds and checkpoints (50 ms) land inside each.
fn job(tmp: &TempDir, parallelism: u32) -> Command {
    let job = tmp.join(&format!("job-{parallelism}.yaml"));
    std::fs::write(
        &job,
        format!(
            "name: {JOB}\nconfig:\n  parallelism.default: {parallelism}\n  execution.checkpointing.interval: 50ms\n  \
             execution.checkpointing.dir: {}\n  weir.source.batch-size: 64\n  weir.source.max-inflight-batches: 1\n\
             source: {{type: file, path: {}, repeat: {REPEAT}}}\nsink: {{type: file, path: {}}}\n",
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

/// Start `cmd` with its log in `log` (a long run logs more than a pipe holds).
fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    cmd.stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap()).spawn().unwrap()
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The split offsets of checkpoint `id` and whether it is the final one; `None` while it is
/// being written or already discarded.
fn checkpoint_splits(job_dir: &Path, id: u64) -> Option<(Vec<u64>, bool)> {
    let bytes = std::fs::read(job_dir.join(format!("chk-{id}")).join("_metadata")).ok()?;
    // The JSON body, without the checksum trailer.
    let meta: serde_json::Value = serde_json::Deserializer::from_slice(&bytes).into_iter().next()?.ok()?;
    let subtasks = meta["subtasks"].as_array()?;
    let offsets = subtasks.iter().filter_map(|t| t[1]["splits"].as_array()).flatten().filter_map(|s| s["offset"].as_u64()).collect();
    Some((offsets, meta["is_final"].as_bool()?))
}

/// Whether a checkpoint caught a file in the middle of its second pass.
fn in_second_pass(offsets: &[u64]) -> bool {
    let size = (LINES * "b-000000\n".len()) as u64;
    offsets.iter().any(|&o| o / PASS_UNIT == 1 && (1..size).contains(&(o % PASS_UNIT)))
}

#[test]
fn killed_in_the_second_pass_a_restore_outputs_every_line_repeat_times() {
    let tmp = TempDir::new("file-repeat");
    let mut expected = BTreeMap::new();
    write_input(&tmp.join("in"), &mut expected);
    let job_dir = tmp.join("ck").join(JOB);
    let (log1, log2) = (tmp.join("run.log"), tmp.join("restore.log"));
    let mut child = spawn_logged(&mut job(&tmp, 2), &log1);
    let start = Instant::now();
    let mut seen = 0;
    loop {
        if start.elapsed() > Duration::from_secs(120) {
            kill9(&mut child);
            panic!("no checkpoint in the second pass within 120 s:\n{}", log_tail(&log1));
        }
        assert!(child.try_wait().unwrap().is_none(), "the job ended before a checkpoint caught the second pass:\n{}", log_tail(&log1));
        let latest = latest_checkpoint(&job_dir);
        if latest > seen {
            seen = latest;
            if checkpoint_splits(&job_dir, latest).is_some_and(|(o, _)| in_second_pass(&o)) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    kill9(&mut child);
    let latest = latest_checkpoint(&job_dir);
    let (offsets, is_final) = checkpoint_splits(&job_dir, latest).expect("the newest checkpoint's _metadata");
    assert!(!is_final, "the kill came after the end");
    assert!(offsets.iter().any(|&o| o >= PASS_UNIT), "the restore point is past the first pass: {offsets:?}");
    let mut child = spawn_logged(job(&tmp, 3).args(["--restore", "latest"]), &log2);
    assert!(wait_success(&mut child, Duration::from_secs(180)), "the restored job failed:\n{}", log_tail(&log2));
    assert_exactly_once(&expected, &committed_lines(&tmp.join("out")));
}
