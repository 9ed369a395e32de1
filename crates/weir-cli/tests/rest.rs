//! Operating a running job through its REST API: `weir run --rest-port 0` serves it, checkpoints
//! show up under Flink's field names, `weir list` lists the job, mutating calls need the token
//! and reject malformed bodies, `weir savepoint` takes a savepoint while the job goes on, `weir
//! stop --savepoint` stops it, and a run restored from that savepoint completes the output
//! exactly once. `weir cancel` ends a job; a taken port fails `weir run` at start.

mod common;
#[allow(dead_code)]
#[path = "../src/http.rs"]
mod http;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A `weir run` serving its REST API; a thread collects its stderr.
struct Running {
    child: Child,
    server: http::Url,
    token_file: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Running {
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        kill9(&mut self.child);
    }
}

/// Commands of one test see their own HOME (where the job writes its token) and no token
/// from the environment.
fn with_home(mut c: Command, home: &Path) -> Command {
    c.env("HOME", home).env_remove("WEIR_REST_TOKEN");
    c
}

/// Spawn `cmd` and wait for its `REST API and dashboard at URL (token in FILE)` line.
fn start(mut cmd: Command) -> Running {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split_once("REST API and dashboard at ").map(|(_, r)| r.to_string()) {
                let _ = tx.send(rest);
            }
            let mut l = l.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
        kill9(&mut child);
        panic!("weir run printed no `REST API and dashboard at URL (token in FILE)` line:\n{}", log.lock().unwrap());
    };
    let (url, file) = line.split_once(" (token in ").unwrap_or_else(|| panic!("no token file in {line:?}"));
    let server = http::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e:#}"));
    Running { child, server, token_file: PathBuf::from(file.trim_end_matches(')')), log }
}

fn call(server: &http::Url, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let r = http::request_raw(method, &server.with_path(path), token, body).unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    let v = if r.body.is_empty() { Value::Null } else { r.json().unwrap_or_else(|e| panic!("{method} {path}: {e:#}")) };
    (r.status, v)
}

fn get(server: &http::Url, path: &str) -> Value {
    let (status, v) = call(server, "GET", path, None, None);
    assert_eq!(status, 200, "GET {path}: {v}");
    v
}

fn has_fields(v: &Value, what: &str, fields: &[&str]) {
    for f in fields {
        assert!(v.get(f).is_some(), "{what} has no field {f:?} (Flink's name): {v}");
    }
}

/// `weir ARGS` with the test's HOME.
fn weir_cli(home: &Path, args: &[&str]) -> Output {
    with_home(weir(), home).args(args).output().unwrap()
}

fn savepoint_line(out: &Output, what: &str) -> PathBuf {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed ({}):\n{stderr}", out.status);
    let path = stdout.lines().find_map(|l| l.strip_prefix("savepoint: ")).unwrap_or_else(|| panic!("{what} printed no `savepoint: PATH`: {stdout}\n{stderr}"));
    PathBuf::from(path)
}

/// A savepoint directory: `_metadata` in it, or in its one `chk-<id>`.
fn is_savepoint(p: &Path) -> bool {
    p.join("_metadata").exists() || std::fs::read_dir(p).is_ok_and(|rd| rd.filter_map(|e| e.ok()).any(|e| e.path().join("_metadata").exists()))
}

/// The job's id through GET /jobs, once the job is running.
fn running_job(run: &mut Running) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = get(&run.server, "/jobs");
        let job = v["jobs"].as_array().and_then(|j| j.first()).cloned().unwrap_or(Value::Null);
        if job["status"] == "RUNNING" {
            return job["id"].as_str().unwrap().to_string();
        }
        assert!(run.child.try_wait().unwrap().is_none(), "weir run ended before RUNNING:\n{}", run.log());
        assert!(Instant::now() < deadline, "GET /jobs: no RUNNING job after 60 s (is the runtime setting the monitor's state?): {v}\n{}", run.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn savepoint_and_stop_through_the_rest_api_resume_exactly_once() {
    const N: u64 = 1_000_000;
    const KEYS: u64 = 50_000;
    let tmp = TempDir::new("rest");
    let home = tmp.join("home");
    let out_ref = tmp.join("ref-out");
    run_ok(&mut keyed_sum_cmd(&out_ref, &tmp.join("ref-ck"), N, KEYS, "200ms", &["--no-rest"]));
    let expected = committed_lines(&out_ref);
    let (out, ck, sp1, sp2) = (tmp.join("out"), tmp.join("ck"), tmp.join("sp-now"), tmp.join("sp-stop"));
    let cmd = keyed_sum_cmd(&out, &ck, N, KEYS, "200ms", &["--set", "source.rate=50000", "--rest-port", "0", "-D", "metrics.latency.interval=1s"]);
    let mut run = start(with_home(cmd, &home));
    assert!(run.token_file.starts_with(&home), "the generated token goes under $HOME/.weir: {}", run.token_file.display());
    let token = std::fs::read_to_string(&run.token_file).unwrap().trim().to_string();
    assert_eq!(token.len(), 64, "a token of 32 random bytes in hex");
    let jid = running_job(&mut run);
    let server = run.server.clone();

    // Checkpoints, as Flink's REST API names them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let cps = loop {
        let v = get(&server, &format!("/jobs/{jid}/checkpoints"));
        if v["counts"]["completed"].as_u64().unwrap_or(0) >= 2 {
            break v;
        }
        assert!(run.child.try_wait().unwrap().is_none(), "weir run ended early:\n{}", run.log());
        let on_disk = completed_checkpoints(&ck.join("keyed-sum")).len();
        assert!(
            Instant::now() < deadline,
            "GET /jobs/{jid}/checkpoints shows fewer than 2 completed checkpoints after 60 s while {on_disk} are on disk \
             (is the runtime reporting checkpoints to the job's monitor?): {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    has_fields(&cps, "checkpoints", &["counts", "summary", "latest", "history"]);
    has_fields(&cps["counts"], "counts", &["restored", "total", "in_progress", "completed", "failed"]);
    for s in ["checkpointed_size", "state_size", "end_to_end_duration"] {
        has_fields(&cps["summary"][s], s, &["min", "max", "avg", "p50", "p90", "p95", "p99", "p999"]);
    }
    let latest = &cps["latest"]["completed"];
    has_fields(
        latest,
        "latest.completed",
        &[
            "className", "id", "status", "is_savepoint", "trigger_timestamp", "latest_ack_timestamp", "checkpointed_size", "state_size",
            "end_to_end_duration", "num_subtasks", "num_acknowledged_subtasks", "checkpoint_type", "external_path", "tasks",
        ],
    );
    assert_eq!(latest["className"], ".CompletedCheckpointStatistics");
    assert_eq!(latest["status"], "COMPLETED");
    assert_eq!(latest["checkpoint_type"], "CHECKPOINT");
    assert_eq!(latest["num_acknowledged_subtasks"], latest["num_subtasks"]);
    assert!(latest["state_size"].as_u64().unwrap() > 0, "a keyed sum has state: {latest}");
    let ids: Vec<u64> = cps["history"].as_array().unwrap().iter().map(|c| c["id"].as_u64().unwrap()).collect();
    assert!(ids.len() >= 2 && ids.windows(2).all(|w| w[0] > w[1]), "history newest first: {ids:?}");

    // Prometheus: /metrics of the running job parses as the text format, under Flink's names.
    // (Operators report about once a second: wait for the first report.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let raw = http::request_raw("GET", &server.with_path("/metrics"), None, None).unwrap();
        assert_eq!(raw.status, 200);
        let text = String::from_utf8(raw.body).unwrap();
        if text.contains("weir_numRecordsOut{") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"));
    let value = |name: &str, labels: &[(&str, &str)]| -> Vec<f64> {
        let matching = scrape.samples.iter().filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
        matching
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .collect()
    };
    let completed = value("weir_numberOfCompletedCheckpoints", &[("job_id", &jid), ("job_name", "keyed-sum")]);
    assert!(completed.len() == 1 && completed[0] >= 2.0, "weir_numberOfCompletedCheckpoints: {completed:?}\n{text}");
    let read: f64 = value("weir_numRecordsOut", &[("job_id", &jid)]).iter().sum();
    assert!(read > 0.0, "weir_numRecordsOut of the job: {read}\n{text}");
    for name in ["weir_numRecordsIn", "weir_numRecordsInPerSecond", "weir_lastCheckpointDuration", "weir_lastCheckpointSize", "weir_numberOfFailedCheckpoints", "weir_numberOfInProgressCheckpoints", "weir_checkpointAlignmentTime", "weir_checkpointStartDelayNanos"] {
        assert!(!value(name, &[("job_id", &jid)]).is_empty(), "/metrics has no {name}:\n{text}");
    }
    let p99 = value("weir_latency", &[("job_id", &jid), ("quantile", "0.99")]);
    assert!(!p99.is_empty() && p99.iter().all(|v| v.is_finite() && *v >= 0.0), "weir_latency p99 per operator subtask: {p99:?}");

    // weir list shows it.
    let listed = weir_cli(&home, &["list", "--address", &server.base()]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "weir list: {}", String::from_utf8_lossy(&listed.stderr));
    let line = text.lines().find(|l| l.starts_with(&jid)).unwrap_or_else(|| panic!("weir list does not show {jid}:\n{text}"));
    assert!(line.contains("keyed-sum") && line.contains("RUNNING"), "weir list: {line}");

    // Mutating calls: the token, then a well-formed body.
    let sp_path = format!("/jobs/{jid}/savepoints");
    let body = json!({"target-directory": sp1, "cancel-job": false}).to_string();
    for t in [None, Some("0".repeat(64))] {
        let (status, v) = call(&server, "POST", &sp_path, t.as_deref(), Some(&body));
        assert_eq!(status, 401, "POST without the right token: {v}");
        assert!(!v["errors"][0].as_str().unwrap_or("").is_empty(), "401 with a message: {v}");
    }
    let (status, v) = call(&server, "POST", &sp_path, Some(&token), Some("{\"target-directory\": "));
    assert_eq!(status, 400, "a malformed body: {v}");
    assert!(!v["errors"][0].as_str().unwrap_or("").is_empty(), "400 with a message: {v}");
    let (status, v) = call(&server, "POST", &sp_path, Some(&token), Some(r#"{"cancel-job": "yes"}"#));
    assert_eq!(status, 400, "a field of the wrong type: {v}");
    assert!(v["errors"][0].as_str().unwrap_or("").contains("cancel-job"), "the message names the field: {v}");

    // A savepoint; the job goes on.
    let out1 = weir_cli(&home, &["savepoint", &server.base(), sp1.to_str().unwrap()]);
    let p1 = savepoint_line(&out1, "weir savepoint");
    assert!(p1.starts_with(&sp1) && is_savepoint(&p1), "weir savepoint: {} is no savepoint under {}", p1.display(), sp1.display());
    assert!(run.child.try_wait().unwrap().is_none(), "the job goes on after a savepoint:\n{}", run.log());

    // Stop with a savepoint, by the job's URL.
    let job_url = format!("{}/jobs/{jid}", server.base());
    let out2 = weir_cli(&home, &["stop", "--savepoint", sp2.to_str().unwrap(), &job_url]);
    let p2 = savepoint_line(&out2, "weir stop");
    assert!(p2.starts_with(&sp2) && is_savepoint(&p2), "weir stop: {} is no savepoint under {}", p2.display(), sp2.display());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = run.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "weir run still running 60 s after weir stop:\n{}", run.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "a stop with a savepoint ends the job normally:\n{}", run.log());
    let mut stdout = String::new();
    run.child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(stdout.contains(&format!("savepoint: {}", p2.display())), "weir run names the savepoint it stopped with: {stdout}");
    let partial = committed_lines(&out).values().sum::<usize>();
    assert!(partial > 0 && (partial as u64) < N, "stopped mid-input: {partial} lines");

    // Resume from the stop's savepoint: every line once.
    let p2s = p2.to_str().unwrap();
    run_ok(&mut keyed_sum_cmd(&out, &ck, N, KEYS, "200ms", &["--restore", p2s, "--no-rest"]));
    assert_exactly_once(&expected, &committed_lines(&out));
}

#[test]
fn cancel_ends_the_job_and_a_missing_token_is_named() {
    let tmp = TempDir::new("rest-cancel");
    let home = tmp.join("home");
    let cmd = keyed_sum_cmd(&tmp.join("out"), &tmp.join("ck"), 1_000_000, 1_000, "200ms", &["--set", "source.rate=20000", "--rest-port", "0"]);
    let mut run = start(with_home(cmd, &home));
    let jid = running_job(&mut run);
    let url = format!("{}/jobs/{jid}", run.server.base());

    // Another HOME has no token file: the error says where it looked.
    let elsewhere = tmp.join("elsewhere");
    let out = weir_cli(&elsewhere, &["cancel", &url]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cancel without a token");
    let expected_file = elsewhere.join(".weir").join(format!("rest-{}.token", run.server.port));
    assert!(err.contains(&expected_file.display().to_string()), "the error names {}: {err}", expected_file.display());
    assert!(run.child.try_wait().unwrap().is_none(), "the job goes on");

    let out = weir_cli(&home, &["cancel", &url]);
    assert!(out.status.success(), "weir cancel: {}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = run.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "weir run still running 60 s after weir cancel:\n{}", run.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130), "a cancelled job exits as an interrupted one:\n{}", run.log());
}

#[test]
fn a_taken_port_fails_the_run_at_start_naming_the_key() {
    let tmp = TempDir::new("rest-port");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let mut cmd = with_home(keyed_sum_cmd(&tmp.join("out"), &tmp.join("ck"), 1_000, 10, "1s", &["--rest-port", &port]), &tmp.join("home"));
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "weir run on a taken port must fail:\n{err}");
    assert!(err.contains("rest.port") && err.contains(&port), "the error names rest.port and the port:\n{err}");
    assert!(!tmp.join("out").exists() || committed_lines(&tmp.join("out")).is_empty(), "nothing ran");
}

/// Process 1 of a two-process job reports its operators to process 0 over the job's control
/// channel: process 0's REST API shows its subtasks, with records, and no other process serves
/// an API of its own.
#[test]
fn process_0_shows_the_subtasks_of_every_process() {
    let tmp = TempDir::new("rest-cluster");
    let home = tmp.join("home");
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let hosts = tmp.join("hosts.txt");
    std::fs::write(&hosts, format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port())).unwrap();
    let args = ["--set", "source.rate=20000", "-D", "parallelism.default=2", "--rest-port", "0", "--hostfile", hosts.to_str().unwrap()];
    let mut p1 = keyed_sum_cmd(&out, &ck, 1_000_000, 1_000, "200ms", &args);
    p1.arg("--process").arg("1").stdout(Stdio::null()).stderr(Stdio::from(std::fs::File::create(tmp.join("p1.log")).unwrap()));
    let mut p1 = with_home(p1, &home).spawn().unwrap();
    let mut p0 = keyed_sum_cmd(&out, &ck, 1_000_000, 1_000, "200ms", &args);
    p0.arg("--process").arg("0");
    let mut run = start(with_home(p0, &home));
    let jid = running_job(&mut run);
    let job = get(&run.server, &format!("/jobs/{jid}"));
    let source = job["vertices"][0]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = get(&run.server, &format!("/jobs/{jid}/vertices/{source}"));
        let subtasks = v["subtasks"].as_array().cloned().unwrap_or_default();
        let of = |p: &str| subtasks.iter().find(|s| s["endpoint"] == p).map(|s| s["metrics"]["write-records"].as_u64().unwrap_or(0));
        if of("process-0").is_some_and(|n| n > 0) && of("process-1").is_some_and(|n| n > 0) {
            break;
        }
        assert!(Instant::now() < deadline, "no records of process 1's source subtask at process 0 after 60 s: {v}\n{}", run.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log1 = std::fs::read_to_string(tmp.join("p1.log")).unwrap();
    assert!(!log1.contains("REST API and dashboard at"), "only process 0 serves the API:\n{log1}");
    let cancelled = weir_cli(&home, &["cancel", &run.server.base()]);
    assert!(cancelled.status.success(), "weir cancel: {}", String::from_utf8_lossy(&cancelled.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    while p1.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            kill9(&mut p1);
            panic!("process 1 still running 60 s after the job was cancelled");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
