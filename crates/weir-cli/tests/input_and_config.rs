//! End-to-end: what the `weir` binary does with awkward input and overrides. CSV output that
//! any reader reads back, `--set` switching a sink's type, malformed input failing the job at
//! once (file and line, no restart), and a bounded source restored past its bound.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// The output of `cmd`, which must fail.
fn run_err(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "weir succeeded:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every committed record of a CSV sink directory, read with the csv crate.
fn csv_records(dir: &Path) -> Vec<Vec<String>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    let mut records = Vec::new();
    for f in files {
        let mut r = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_path(&f).unwrap();
        for rec in r.records() {
            records.push(rec.unwrap().iter().map(String::from).collect());
        }
    }
    records
}

/// Issue 7 item 14: strings holding commas, quotes and newlines read back as themselves.
#[test]
fn csv_sink_output_reads_back_with_a_csv_reader() {
    let tmp = TempDir::new("csv");
    let texts = ["plain", "a,b", "say \"hi\"", "two\nlines", "cr\r\nlf", "", " padded ", "\"", "ünï,\"code\""];
    let input: String = texts.iter().enumerate().map(|(i, t)| serde_json::json!({"id": i, "text": t}).to_string() + "\n").collect();
    std::fs::write(tmp.join("in.json"), input).unwrap();
    let job = tmp.join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "name: csv\nconfig: {{parallelism.default: 2}}\nsource: {{type: file, path: {}, format: json, fields: [id, text]}}\nsink: {{type: file, path: {}}}\n",
            tmp.join("in.json").display(),
            tmp.join("out").display()
        ),
    )
    .unwrap();
    run_ok(weir().arg("run").arg(&job));
    let mut got = csv_records(&tmp.join("out"));
    got.sort_by_key(|r| r[0].parse::<usize>().unwrap());
    let want: Vec<Vec<String>> = texts.iter().enumerate().map(|(i, t)| vec![i.to_string(), t.to_string()]).collect();
    assert_eq!(got, want);
}

/// Issue 7 item 15: the benchmark command of `examples/keyed_sum.yaml` and the README.
#[test]
fn set_sink_type_blackhole_drops_the_file_sinks_path() {
    let tmp = TempDir::new("blackhole");
    let out = run_ok(
        weir()
            .args(["run", "examples/keyed_sum.yaml", "--set", "sink.type=blackhole", "--set", "source.count=20000"])
            .arg("-D")
            .arg(format!("execution.checkpointing.dir={}", tmp.join("ck").display())),
    );
    let log = stderr(&out);
    let warn = log.lines().find(|l| l.contains("WARN") && l.contains("sink.type=blackhole")).unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(warn.contains("'sink.path'"), "{warn}");
}

/// A job over `input` that sums `v` per `k` after the steps `before`, with checkpoints and 3
/// restarts 5 s apart.
fn summing_job(tmp: &TempDir, input: &[u8], before: &str) -> Command {
    let path = tmp.join("in.json");
    std::fs::write(&path, input).unwrap();
    let job = tmp.join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "name: sums\nconfig:\n  execution.checkpointing.interval: 100ms\n  execution.checkpointing.dir: {}\n  \
             restart-strategy.type: fixed-delay\n  restart-strategy.fixed-delay.attempts: 3\n  restart-strategy.fixed-delay.delay: 5s\n\
             source: {{type: file, path: {}, format: json, fields: [k, v]}}\npipeline:\n{before}  - key_by: k\n  - aggregate: [sum(v), count]\n\
             sink: {{type: file, path: {}}}\n",
            tmp.join("ck").display(),
            path.display(),
            tmp.join("out").display()
        ),
    )
    .unwrap();
    let mut c = weir();
    c.arg("run").arg(job);
    c
}

/// Issue 7 item 16: malformed input fails the job at once, naming the file and line, instead
/// of after the restart strategy's 3 attempts 5 s apart.
#[test]
fn malformed_input_fails_at_once_naming_file_and_line() {
    let good = "{\"k\": \"a\", \"v\": 1}\n{\"k\": \"b\", \"v\": 2.5}\n{\"k\": \"a\"}\n";
    let long = format!("{{\"k\": \"a\", \"v\": {}}}\n", "1".repeat(200));
    let cases: [(Vec<u8>, &[&str], &str); 4] = [
        ([good, "{\"k\": \"a\", \"v\": 3\n"].concat().into_bytes(), &[], "in.json:4: not a JSON object"),
        ([good.as_bytes(), b"\n{\"k\": \"\xc3\x28\", \"v\": 3}\n"].concat(), &[], "in.json:5: not UTF-8"),
        // An untyped sum of a string is an error, not a silent 0.
        ([good, "{\"k\": \"a\", \"v\": \"lots\"}\n"].concat().into_bytes(), &[], "in.json:4: field 'v' is a string (\"lots\"), not a number"),
        ([good, &long].concat().into_bytes(), &["-D", "weir.source.max-line-bytes=100"], "in.json:4: line longer than weir.source.max-line-bytes (100 bytes)"),
    ];
    for (input, args, want) in cases {
        let tmp = TempDir::new("malformed");
        let start = Instant::now();
        let out = run_err(summing_job(&tmp, &input, "").args(args));
        let log = stderr(&out);
        assert!(!log.contains("restart 1"), "restarted:\n{log}");
        assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
        assert!(log.contains(want), "expected '{want}' in:\n{log}");
    }
}

/// Behind a filter, only the aggregate can tell a row that reaches it: it fails the job at
/// once too, naming the step, the key and the value.
#[test]
fn non_numeric_sum_behind_a_filter_fails_at_once() {
    let tmp = TempDir::new("sum-filter");
    let input = b"{\"k\": \"a\", \"v\": 1}\n{\"k\": \"b\", \"v\": \"skipped\"}\n{\"k\": \"a\", \"v\": \"lots\"}\n";
    let start = Instant::now();
    let out = run_err(&mut summing_job(&tmp, input, "  - filter: {field: k, op: eq, value: a}\n"));
    let log = stderr(&out);
    assert!(!log.contains("restart 1"), "restarted:\n{log}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert!(log.contains("pipeline[2].aggregate: sum(v) of key \"a\" got a string (\"lots\"), not a number"), "{log}");
}

/// Transient errors still restart: a source path that is not there (yet) is an I/O error.
#[test]
fn io_errors_still_restart() {
    let tmp = TempDir::new("transient");
    let mut cmd = summing_job(&tmp, b"", "");
    std::fs::remove_file(tmp.join("in.json")).unwrap();
    let out = run_err(cmd.args(["-D", "restart-strategy.fixed-delay.delay=50ms", "-D", "restart-strategy.fixed-delay.attempts=2"]));
    let log = stderr(&out);
    assert!(log.contains("restart 2") && log.contains("in.json"), "{log}");
}

fn keyed_sum(out: &Path, ck: &Path, count: u64, extra: &[&str]) -> Command {
    keyed_sum_cmd(out, ck, count, 1000, "100ms", extra)
}

/// Issue 7 item 11: restored with a smaller `source.count` than it ran with, the generator is
/// past its bound: the job ends at once and writes nothing new (it used to generate forever).
#[test]
fn bounded_source_restored_past_its_bound_finishes_at_once() {
    let tmp = TempDir::new("bound");
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    run_ok(&mut keyed_sum(&out, &ck, 200_000, &[]));
    let before = committed_lines(&out);
    assert_eq!(before.values().sum::<usize>(), 200_000);
    let mut child = spawn(&mut keyed_sum(&out, &ck, 1_000, &["--restore", "latest"]));
    assert!(wait_success(&mut child, Duration::from_secs(60)), "the restored job did not finish");
    assert_eq!(committed_lines(&out), before, "the restored job wrote records");
}

/// The same after a kill mid-run: whatever the restored checkpoint holds, the job ends and
/// every committed line is one that a full run writes (no record of a key beyond its count).
#[test]
fn killed_then_restored_with_a_smaller_count_finishes() {
    let tmp = TempDir::new("bound-kill");
    let reference = tmp.join("ref");
    run_ok(&mut keyed_sum(&reference, &tmp.join("ref-ck"), 400_000, &[]));
    let reference = committed_lines(&reference);
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let mut child = spawn(&mut keyed_sum(&out, &ck, 400_000, &["--set", "source.rate=200000"]));
    // Two checkpoints, 100 ms apart at 200 k records/s: far past 1000 records' bound.
    assert!(wait_for_checkpoint_after(&mut child, &ck.join("keyed-sum"), 1, Duration::from_secs(60)), "no checkpoints");
    kill9(&mut child);
    let mut child = spawn(&mut keyed_sum(&out, &ck, 1_000, &["--restore", "latest"]));
    assert!(wait_success(&mut child, Duration::from_secs(60)), "the restored job did not finish");
    let got = committed_lines(&out);
    assert!(!got.is_empty());
    let extra: Vec<_> = got.keys().filter(|l| !reference.contains_key(*l)).take(3).collect();
    assert!(extra.is_empty(), "lines no full run writes: {extra:?}");
}

/// `weir config | head -1`: the reader goes away first; the process ends quietly (no panic, no
/// backtrace), as a Unix tool does.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let mut child = weir().arg("config").stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}
