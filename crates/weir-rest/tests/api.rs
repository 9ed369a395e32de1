//! The REST API over a real socket: a server on port 0 serves a `JobMonitor` filled by hand
//! through the runtime's side of its API, and a tiny HTTP/1.1 client reads it back.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use weir::config::{JobConfig, RestSettings};
use weir::monitor::{
    JobCommand, JobMonitor, JobState, LatencyHistogram, MetricsReport, OpSample, RestoredCheckpoint, SubtaskCheckpointStats, TriggerStatus,
    VertexKind, VertexView,
};
use weir_rest::{RestError, RestServer};

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The single message of a Flink error body.
    fn error(&self) -> String {
        let v = self.json();
        let errors = v["errors"].as_array().unwrap_or_else(|| panic!("not Flink's error shape: {v}"));
        assert_eq!(errors.len(), 1, "{v}");
        errors[0].as_str().unwrap().to_string()
    }
}

/// One request on a fresh connection (`Connection: close`: the response ends at EOF).
fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req += &format!("Authorization: Bearer {t}\r\n");
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req += "Content-Type: application/json\r\n";
    }
    req += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {text}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_string() };
    Response { status, headers, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out += &rest[..n];
        s = &rest[n + 2..];
    }
}

fn get(addr: SocketAddr, path: &str) -> Response {
    http(addr, "GET", path, None, None)
}

fn temp_dir() -> std::path::PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!("weir-rest-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Settings for a loopback server on a free port, with the token in a file of the test's own.
fn settings(token: &str) -> RestSettings {
    let file = temp_dir().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    RestSettings { enabled: true, address: "127.0.0.1".into(), port: 0, token_file: Some(file.to_string_lossy().into_owned()) }
}

const TOKEN: &str = "test-token-0123456789abcdef";
const T0: u64 = 1_700_000_000_000;

fn vertex(index: usize, name: &str, kind: VertexKind, inputs: Vec<usize>) -> VertexView {
    VertexView { index, id: format!("{:032x}", 0xabc0 + index), name: name.into(), kind, inputs, parallelism: 2, subtasks: Vec::new() }
}

fn config() -> JobConfig {
    JobConfig::from_pairs([
        ("execution.checkpointing.dir", "/tmp/weir-rest-test-checkpoints"),
        ("execution.checkpointing.interval", "10 s"),
        ("parallelism.default", "2"),
        ("metrics.latency.interval", "1 s"),
    ])
    .unwrap()
}

/// A running job of three operators on two workers, with four checkpoints (completed, a
/// savepoint, failed, in progress) and one metrics report per worker.
fn job() -> Arc<JobMonitor> {
    let m = JobMonitor::new("word-count", &config());
    m.set_graph(
        vec![
            vertex(0, "source", VertexKind::Source, vec![]),
            vertex(1, "count", VertexKind::Keyed, vec![0]),
            vertex(2, "sink", VertexKind::Sink, vec![1]),
        ],
        1,
        Some(10_000),
    );
    m.set_state(JobState::Running, None);
    m.on_restored(RestoredCheckpoint { id: 7, restore_timestamp: T0 - 5, is_savepoint: true, external_path: "/sp/savepoint-7".into() });
    let ack = |subtask, state| SubtaskCheckpointStats {
        subtask,
        ack_timestamp: T0 + 50,
        barrier_us: 3_000,
        alignment_us: 2_000,
        sync_us: 1_400,
        async_us: 12_600,
        checkpointed_size: 40,
        state_size: state,
    };
    for id in 1..=4 {
        m.on_trigger(id, T0, id == 2, false, 6);
        for v in 0..3 {
            for s in 0..2 {
                if id != 4 || (v, s) == (0, 0) {
                    m.on_ack(id, v, ack(s, 100));
                }
            }
        }
    }
    m.on_complete(1, T0 + 120, true, Some("/tmp/weir-rest-test-checkpoints/chk-1".into()));
    m.on_complete(2, T0 + 200, false, Some("/tmp/weir-rest-test-checkpoints/chk-2".into()));
    m.on_savepoint(2, "/sp/savepoint-2");
    m.on_failed(3, "declined by subtask 1".into());
    for worker in 0..2u32 {
        let mut latency = LatencyHistogram::default();
        latency.record(2_000, 10);
        let ops = vec![
            OpSample { vertex: 0, records_in: 0, records_out: 1000 + worker as u64, busy_us_delta: 250_000, backpressured_us_delta: 600_000, ..Default::default() },
            OpSample { vertex: 1, records_in: 1000 + worker as u64, records_out: 10, busy_us_delta: 100_000, latency, ..Default::default() },
            OpSample { vertex: 2, records_in: 10, ..Default::default() },
        ];
        m.on_metrics(0, &MetricsReport { worker, interval_us: 1_000_000, ops });
    }
    m
}

fn serve(m: &Arc<JobMonitor>) -> RestServer {
    weir_rest::start(m.clone(), &settings(TOKEN)).unwrap()
}

#[test]
fn overview_jobs_and_config() {
    let m = job();
    let s = serve(&m);
    let a = s.addr();
    let jid = m.job_id().to_string();
    assert_eq!(s.url(), format!("http://127.0.0.1:{}", a.port()));

    let o = get(a, "/overview").json();
    assert_eq!(o["taskmanagers"], 1);
    assert_eq!(o["slots-total"], 2);
    assert_eq!(o["slots-available"], 0);
    assert_eq!((o["jobs-running"].as_u64(), o["jobs-finished"].as_u64(), o["jobs-cancelled"].as_u64(), o["jobs-failed"].as_u64()), (Some(1), Some(0), Some(0), Some(0)));
    assert!(o["flink-version"].as_str().unwrap().starts_with("weir "));

    assert_eq!(get(a, "/jobs").json(), json!({"jobs": [{"id": jid, "status": "RUNNING"}]}));
    let c = get(a, "/config").json();
    assert_eq!(c["features"], json!({"web-submit": false, "web-cancel": true}));
    assert_eq!(c["refresh-interval"], 1000);

    let jo = get(a, "/jobs/overview").json();
    let j = &jo["jobs"][0];
    assert_eq!((j["jid"].as_str(), j["name"].as_str(), j["state"].as_str()), (Some(jid.as_str()), Some("word-count"), Some("RUNNING")));
    assert_eq!(j["end-time"], -1);
    assert_eq!(j["tasks"]["total"], 6);
    assert_eq!(j["tasks"]["running"], 6);
    assert_eq!(j["start-time"].as_u64(), Some(m.view().start_time));
}

#[test]
fn job_detail_by_id_and_by_name() {
    let m = job();
    let s = serve(&m);
    let a = s.addr();
    let jid = m.job_id().to_string();
    let by_id = get(a, &format!("/jobs/{jid}")).json();
    let by_name = get(a, "/jobs/word-count").json();
    assert_eq!(by_id["jid"], jid);
    assert_eq!(by_name["jid"], jid);
    assert_eq!(by_id["plan"], by_name["plan"]);
    assert_eq!(by_id["name"], "word-count");
    assert_eq!(by_id["state"], "RUNNING");
    assert_eq!(by_id["isStoppable"], true);
    assert_eq!(by_id["maxParallelism"], 128);
    assert_eq!(by_id["end-time"], -1);
    assert!(by_id["timestamps"]["RUNNING"].as_u64().unwrap() > 0);
    assert_eq!(by_id["timestamps"]["FINISHED"], 0);
    assert_eq!(by_id["status-counts"]["RUNNING"], 3);

    let vs = by_id["vertices"].as_array().unwrap();
    assert_eq!(vs.len(), 3);
    let source = &vs[0];
    assert_eq!(source["id"], format!("{:032x}", 0xabc0));
    assert_eq!((source["name"].as_str(), source["parallelism"].as_u64(), source["status"].as_str()), (Some("source"), Some(2), Some("RUNNING")));
    assert_eq!(source["tasks"]["RUNNING"], 2);
    assert_eq!(source["metrics"]["write-records"], 2001);
    assert_eq!(source["metrics"]["read-records"], 0);
    assert_eq!(source["metrics"]["write-records-complete"], true);
    assert_eq!(source["metrics"]["accumulated-backpressured-time"], 600);
    assert_eq!(source["metrics"]["accumulated-busy-time"], 250);
    assert_eq!(source["metrics"]["accumulated-idle-time"], 150);
    assert_eq!(vs[1]["metrics"]["read-records"], 2001);

    let nodes = by_id["plan"]["nodes"].as_array().unwrap();
    assert_eq!(by_id["plan"]["type"], "STREAMING");
    assert_eq!(nodes[0]["inputs"], json!([]));
    assert_eq!(nodes[1]["description"], "count");
    assert_eq!(nodes[1]["inputs"], json!([{"num": 0, "id": source["id"], "ship_strategy": "HASH", "exchange": "pipelined_bounded"}]));
    assert_eq!(nodes[2]["inputs"][0]["ship_strategy"], "FORWARD");

    assert_eq!(by_id["weir"], json!({"restarts": 0, "records-read": 2001, "records-total": 10_000, "failure": null}));

    let missing = get(a, "/jobs/0123456789abcdef0123456789abcdef");
    assert_eq!(missing.status, 404);
    assert!(missing.error().contains("0123456789abcdef0123456789abcdef"));
}

#[test]
fn checkpoints_counts_summary_latest_and_history() {
    let m = job();
    let s = serve(&m);
    let a = s.addr();
    let c = get(a, "/jobs/word-count/checkpoints").json();
    assert_eq!(c["counts"], json!({"restored": 1, "total": 4, "in_progress": 1, "completed": 2, "failed": 1}));
    let e2e = &c["summary"]["end_to_end_duration"];
    assert_eq!((e2e["min"].as_u64(), e2e["max"].as_u64(), e2e["avg"].as_u64()), (Some(120), Some(200), Some(160)));
    assert_eq!(e2e["p50"].as_f64(), Some(120.0));
    assert_eq!(e2e["p99"].as_f64(), Some(200.0));
    assert_eq!(c["summary"]["state_size"]["max"], 600);
    assert_eq!(c["summary"]["checkpointed_size"]["avg"], 240);
    assert_eq!(c["summary"]["alignment_buffered"]["max"], 0);
    assert_eq!(c["latest"]["restored"], json!({"id": 7, "restore_timestamp": T0 - 5, "is_savepoint": true, "external_path": "/sp/savepoint-7"}));
    assert_eq!(c["latest"]["completed"]["id"], 2);
    assert_eq!(c["latest"]["savepoint"]["id"], 2);
    assert_eq!(c["latest"]["savepoint"]["external_path"], "/sp/savepoint-2");
    assert_eq!(c["latest"]["failed"]["failure_message"], "declined by subtask 1");

    let h = c["history"].as_array().unwrap();
    assert_eq!(h.iter().map(|e| e["id"].as_u64().unwrap()).collect::<Vec<_>>(), vec![4, 3, 2, 1], "newest first");
    assert_eq!(h.iter().map(|e| e["status"].as_str().unwrap()).collect::<Vec<_>>(), vec!["IN_PROGRESS", "FAILED", "COMPLETED", "COMPLETED"]);
    assert_eq!(h[0]["className"], ".PendingCheckpointStatistics");
    assert_eq!(h[1]["className"], ".FailedCheckpointStatistics");
    assert!(h[1]["failure_timestamp"].as_u64().unwrap() >= T0);
    let sp = &h[2];
    assert_eq!(sp["className"], ".CompletedCheckpointStatistics");
    assert_eq!((sp["is_savepoint"].as_bool(), sp["savepointFormat"].as_str(), sp["checkpoint_type"].as_str()), (Some(true), Some("CANONICAL"), Some("SAVEPOINT")));
    let first = &h[3];
    assert_eq!(first["savepointFormat"], Value::Null);
    assert_eq!(first["checkpoint_type"], "CHECKPOINT");
    assert_eq!(first["external_path"], "/tmp/weir-rest-test-checkpoints/chk-1");
    assert_eq!(first["discarded"], false);
    assert_eq!((first["trigger_timestamp"].as_u64(), first["latest_ack_timestamp"].as_u64()), (Some(T0), Some(T0 + 50)));
    assert_eq!((first["end_to_end_duration"].as_u64(), first["state_size"].as_u64(), first["checkpointed_size"].as_u64()), (Some(120), Some(600), Some(240)));
    assert_eq!((first["num_subtasks"].as_u64(), first["num_acknowledged_subtasks"].as_u64()), (Some(6), Some(6)));
    assert_eq!(first["weir"], json!({"incremental": true, "is_final": false, "barrier_ms": 3, "sync_ms": 1, "async_ms": 13}));

    let task = &first["tasks"][format!("{:032x}", 0xabc1)];
    assert_eq!((task["num_subtasks"].as_u64(), task["num_acknowledged_subtasks"].as_u64(), task["state_size"].as_u64()), (Some(2), Some(2), Some(200)));
    assert_eq!(task["latest_ack_timestamp"].as_u64(), Some(T0 + 50));
    let sub = &task["subtasks"][1];
    assert_eq!(sub["index"], 1);
    assert_eq!(sub["end_to_end_duration"], 50);
    assert_eq!(sub["checkpoint"], json!({"sync": 1, "async": 13}));
    assert_eq!(sub["alignment"], json!({"duration": 2, "buffered": 0, "processed": 0, "persisted": 0}));
    assert_eq!(sub["start_delay"], 1, "barrier 3 ms, of which 2 ms alignment");
    assert_eq!(h[0]["tasks"][format!("{:032x}", 0xabc2)]["num_acknowledged_subtasks"], 0);

    let detail = get(a, "/jobs/word-count/checkpoints/details/1").json();
    assert_eq!(&detail, first);
    let sub = get(a, &format!("/jobs/word-count/checkpoints/details/4/subtasks/{:032x}", 0xabc0)).json();
    assert_eq!(sub["num_acknowledged_subtasks"], 1);
    assert_eq!(sub["subtasks"][0]["status"], "completed");
    assert_eq!(sub["subtasks"][0]["checkpoint"]["async"], 13);
    assert_eq!(sub["subtasks"][0]["unaligned_checkpoint"], false);
    assert_eq!(sub["subtasks"][1], json!({"index": 1, "status": "pending_or_failed"}));
    assert_eq!(sub["summary"]["checkpoint_duration"]["sync"]["max"], 1);
    assert_eq!(sub["summary"]["alignment"]["duration"]["max"], 2);
    assert_eq!(sub["summary"]["start_delay"]["max"], 1);

    let bad = get(a, "/jobs/word-count/checkpoints/details/latest");
    assert_eq!(bad.status, 400);
    assert!(bad.error().contains("checkpointid"), "{}", bad.body);
    assert_eq!(get(a, "/jobs/word-count/checkpoints/details/99").status, 404);
    assert_eq!(get(a, "/jobs/word-count/checkpoints/details/1/subtasks/nope").status, 404);
    assert_eq!(get(a, "/jobs/other/checkpoints").status, 404);
}

#[test]
fn checkpoint_config() {
    let m = job();
    let s = serve(&m);
    let c = get(s.addr(), &format!("/jobs/{}/checkpoints/config", m.job_id())).json();
    assert_eq!(c["mode"], "exactly_once");
    assert_eq!(c["interval"], 10_000);
    assert_eq!(c["timeout"], 600_000);
    assert_eq!(c["max_concurrent"], 1);
    assert_eq!(c["externalization"], json!({"enabled": true, "delete_on_cancellation": false}));
    assert_eq!(c["state_backend"], "HashMapStateBackend");
    assert_eq!(c["checkpoint_storage"], "FileSystemCheckpointStorage");
    assert_eq!(c["unaligned_checkpoints"], false);
    assert_eq!(c["changelog_periodic_materialization_interval"], -1);
    assert_eq!(
        c["weir"],
        json!({"incremental": false, "local_backup": false, "dir": "/tmp/weir-rest-test-checkpoints", "savepoint_dir": "/tmp/weir-rest-test-checkpoints/savepoints"})
    );
}

#[test]
fn vertex_backpressure_latency_and_gpu() {
    let m = job();
    let s = serve(&m);
    let a = s.addr();
    let source = format!("{:032x}", 0xabc0);
    let v = get(a, &format!("/jobs/word-count/vertices/{source}")).json();
    assert_eq!((v["id"].as_str(), v["name"].as_str(), v["parallelism"].as_u64()), (Some(source.as_str()), Some("source"), Some(2)));
    let st = v["subtasks"].as_array().unwrap();
    assert_eq!(st.len(), 2);
    assert_eq!(st[1]["subtask"], 1);
    assert_eq!(st[1]["status"], "RUNNING");
    assert_eq!(st[1]["attempt"], 0);
    assert_eq!(st[1]["endpoint"], "process-0");
    assert_eq!(st[1]["taskmanager-id"], "process-0");
    assert_eq!(st[1]["end-time"], -1);
    assert_eq!(st[1]["metrics"]["write-records"], 1001);
    assert_eq!(st[1]["weir"]["records-out-per-second"], 1001.0);
    assert_eq!(st[1]["weir"]["backpressured-ms-per-second"], 600.0);
    assert_eq!(st[1]["weir"]["latency"], Value::Null);
    let count = get(a, &format!("/jobs/word-count/vertices/{:032x}", 0xabc1)).json();
    assert_eq!(count["subtasks"][0]["weir"]["latency"], json!({"p50": 2.0, "p95": 2.0, "p99": 2.0, "max": 2.0, "count": 10}));
    assert_eq!(get(a, "/jobs/word-count/vertices/ffff").status, 404);

    let bp = get(a, &format!("/jobs/word-count/vertices/{source}/backpressure")).json();
    assert_eq!(bp["status"], "ok");
    assert_eq!(bp["backpressure-level"], "high");
    assert!(bp["end-timestamp"].as_u64().unwrap() >= T0);
    let sub = &bp["subtasks"][0];
    assert_eq!((sub["subtask"].as_u64(), sub["attempt-number"].as_u64()), (Some(0), Some(0)));
    assert_eq!(sub["backpressure-level"], "high");
    assert_eq!((sub["ratio"].as_f64(), sub["busyRatio"].as_f64()), (Some(0.6), Some(0.25)));
    assert!((sub["idleRatio"].as_f64().unwrap() - 0.15).abs() < 1e-9);
    let calm = get(a, &format!("/jobs/word-count/vertices/{:032x}/backpressure", 0xabc1)).json();
    assert_eq!(calm["backpressure-level"], "ok");

    let l = get(a, "/jobs/word-count/latency").json();
    assert_eq!(l["interval_ms"], 1000);
    assert_eq!(l["vertices"][0]["subtasks"], json!([]));
    assert_eq!(l["vertices"][1]["name"], "count");
    assert_eq!(l["vertices"][1]["subtasks"][1], json!({"subtask": 1, "p50": 2.0, "p95": 2.0, "p99": 2.0, "max": 2.0, "count": 10}));

    assert_eq!(get(a, "/jobs/word-count/gpu").json(), json!({"available": false}));
    m.set_gpu(Some(weir::monitor::GpuView { adapter: "Test GPU".into(), pool_in_use_bytes: 4096, ..Default::default() }));
    let g = get(a, "/jobs/word-count/gpu").json();
    assert_eq!((g["available"].as_bool(), g["adapter"].as_str(), g["pool_in_use_bytes"].as_u64()), (Some(true), Some("Test GPU"), Some(4096)));
}

#[test]
fn static_assets_with_their_content_types() {
    let m = job();
    let s = serve(&m);
    for (path, ty, body) in [
        ("/", "text/html", include_str!("../assets/dashboard.html")),
        ("/index.html", "text/html", include_str!("../assets/dashboard.html")),
        ("/assets/dashboard.js", "text/javascript", include_str!("../assets/dashboard.js")),
        ("/assets/dashboard.css", "text/css", include_str!("../assets/dashboard.css")),
    ] {
        let r = get(s.addr(), path);
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("content-type").unwrap().starts_with(ty), "{path}: {:?}", r.header("content-type"));
        assert_eq!(r.body, body, "{path}");
    }
    let r = get(s.addr(), "/assets/nothing.js");
    assert_eq!(r.status, 404);
    assert!(r.error().contains("/assets/nothing.js"));
    // axum's own 405 comes in Flink's error shape too.
    let r = http(s.addr(), "DELETE", "/jobs", None, None);
    assert_eq!(r.status, 405);
    assert!(!r.error().is_empty());
    // So do its path and query rejections (not UTF-8 after percent-decoding).
    let r = get(s.addr(), "/jobs/%FF/checkpoints");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(!r.error().is_empty());
    let r = http(s.addr(), "PATCH", &format!("/jobs/{}?mode=%FF", m.job_id()), Some(TOKEN), None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().contains("query"), "{}", r.body);
}

/// Every mutating call, with a body that would be accepted.
fn mutating(jid: &str) -> Vec<(&'static str, String, Option<&'static str>)> {
    vec![
        ("POST", format!("/jobs/{jid}/savepoints"), Some(r#"{"target-directory": "/tmp/sp", "cancel-job": false}"#)),
        ("POST", format!("/jobs/{jid}/stop"), Some(r#"{"targetDirectory": null, "drain": false}"#)),
        ("POST", format!("/jobs/{jid}/checkpoints"), None),
        ("PATCH", format!("/jobs/{jid}?mode=cancel"), None),
        ("POST", format!("/jobs/{jid}/cancel"), None),
    ]
}

#[test]
fn mutating_calls_need_the_token() {
    let m = job();
    let s = serve(&m);
    assert_eq!(s.token(), TOKEN);
    for (method, path, body) in mutating(m.job_id()) {
        for token in [None, Some("wrong"), Some("test-token-0123456789abcdeX"), Some("")] {
            let r = http(s.addr(), method, &path, token, body);
            assert_eq!(r.status, 401, "{method} {path} with {token:?}: {}", r.body);
            assert!(r.error().contains("Bearer"));
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
    }
    assert!(m.take_commands().is_empty(), "nothing was queued");
}

#[test]
fn commands_are_queued_and_their_triggers_polled() {
    let m = job();
    let s = serve(&m);
    let a = s.addr();
    let t = Some(TOKEN);

    let r = http(a, "POST", "/jobs/word-count/savepoints", t, Some(r#"{"target-directory": "/tmp/sp", "cancel-job": false, "formatType": "CANONICAL"}"#));
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["request-id"].as_str().unwrap().to_string();
    assert_eq!(m.take_commands(), vec![(id.clone(), JobCommand::Savepoint { target: Some("/tmp/sp".into()) })]);
    let poll = |path: &str| get(a, &format!("/jobs/word-count/{path}/{id}")).json();
    assert_eq!(poll("savepoints"), json!({"status": {"id": "IN_PROGRESS"}, "operation": null}));
    m.resolve_trigger(&id, TriggerStatus::Completed { location: Some("/tmp/sp/savepoint-5".into()), checkpoint: Some(5) });
    assert_eq!(poll("savepoints"), json!({"status": {"id": "COMPLETED"}, "operation": {"location": "/tmp/sp/savepoint-5"}}));
    assert_eq!(poll("checkpoints"), json!({"status": {"id": "COMPLETED"}, "operation": {"checkpointId": 5}}));
    m.resolve_trigger(&id, TriggerStatus::Failed { message: "disk full".into() });
    assert_eq!(
        poll("savepoints"),
        json!({"status": {"id": "COMPLETED"}, "operation": {"failure-cause": {"class": "weir.SavepointFailure", "stack-trace": "disk full", "serialized-throwable": null}}})
    );
    let unknown = get(a, "/jobs/word-count/savepoints/nope");
    assert_eq!(unknown.status, 404);
    assert!(!unknown.error().is_empty());
    assert_eq!(get(a, "/jobs/word-count/checkpoints/nope").status, 404);
    assert_eq!(get(a, &format!("/jobs/other/savepoints/{id}")).status, 404);

    let expect = |method: &str, path: &str, body: Option<&str>, cmd: JobCommand| {
        let r = http(a, method, path, t, body);
        assert_eq!(r.status, 202, "{method} {path}: {}", r.body);
        let queued = m.take_commands();
        assert_eq!(queued.len(), 1, "{method} {path}");
        assert_eq!(queued[0].1, cmd, "{method} {path}");
        if cmd != JobCommand::Cancel {
            assert_eq!(r.json()["request-id"].as_str(), Some(queued[0].0.as_str()));
            assert_eq!(m.trigger_status(&queued[0].0), Some(TriggerStatus::InProgress));
        } else {
            assert_eq!(r.json(), json!({}));
        }
    };
    let jid = m.job_id().to_string();
    expect("POST", "/jobs/word-count/savepoints", Some(r#"{"cancel-job": true}"#), JobCommand::StopWithSavepoint { target: None });
    expect("POST", &format!("/jobs/{jid}/stop"), Some(r#"{"targetDirectory": "/tmp/final", "drain": true}"#), JobCommand::StopWithSavepoint { target: Some("/tmp/final".into()) });
    expect("POST", &format!("/jobs/{jid}/stop"), None, JobCommand::StopWithSavepoint { target: None });
    expect("POST", &format!("/jobs/{jid}/checkpoints"), Some(r#"{"checkpointType": "FULL"}"#), JobCommand::Checkpoint);
    expect("POST", &format!("/jobs/{jid}/checkpoints"), None, JobCommand::Checkpoint);
    expect("PATCH", &format!("/jobs/{jid}?mode=cancel"), None, JobCommand::Cancel);
    expect("PATCH", &format!("/jobs/{jid}"), None, JobCommand::Cancel);
    expect("POST", &format!("/jobs/{jid}/cancel"), None, JobCommand::Cancel);

    // A second stop while the first is still queued is refused.
    assert_eq!(http(a, "POST", &format!("/jobs/{jid}/stop"), t, None).status, 202);
    let r = http(a, "POST", &format!("/jobs/{jid}/cancel"), t, None);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("already"), "{}", r.body);
    assert_eq!(m.take_commands().len(), 1);

    assert_eq!(http(a, "POST", "/jobs/other/cancel", t, None).status, 404);
}

#[test]
fn malformed_input_is_a_400_naming_the_field() {
    let m = job();
    let s = serve(&m);
    let a = s.addr();
    let jid = m.job_id().to_string();
    let sp = format!("/jobs/{jid}/savepoints");
    let stop = format!("/jobs/{jid}/stop");
    let chk = format!("/jobs/{jid}/checkpoints");
    for (method, path, body, names) in [
        ("POST", sp.as_str(), r#"{"target-directory": "/x""#, "malformed JSON"),
        ("POST", sp.as_str(), "[1, 2]", "JSON object"),
        ("POST", sp.as_str(), r#"{"target-directory": 5}"#, "target-directory"),
        ("POST", sp.as_str(), r#"{"cancel-job": "yes"}"#, "cancel-job"),
        ("POST", sp.as_str(), r#"{"formatType": "NATIVE"}"#, "formatType"),
        ("POST", sp.as_str(), r#"{"formatType": "PRETTY"}"#, "formatType"),
        ("POST", stop.as_str(), r#"{"drain": 1}"#, "drain"),
        ("POST", stop.as_str(), r#"{"targetDirectory": ["a"]}"#, "targetDirectory"),
        ("POST", chk.as_str(), r#"{"checkpointType": "SOMETIMES"}"#, "checkpointType"),
        ("POST", chk.as_str(), "nonsense", "malformed JSON"),
    ] {
        let r = http(a, method, path, Some(TOKEN), Some(body));
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.error().contains(names), "{body}: {}", r.body);
    }
    for mode in ["explode", "stop"] {
        let r = http(a, "PATCH", &format!("/jobs/{jid}?mode={mode}"), Some(TOKEN), None);
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.error().contains("mode"), "{}", r.body);
    }
    assert!(m.take_commands().is_empty());
}

#[test]
fn commands_to_a_job_that_is_not_running_are_a_409() {
    let m = JobMonitor::new("idle", &config());
    let s = serve(&m);
    for (method, path, body) in mutating(m.job_id()) {
        let r = http(s.addr(), method, &path, Some(TOKEN), body);
        assert_eq!(r.status, 409, "{method} {path}: {}", r.body);
        assert!(r.error().contains("CREATED") || r.error().contains("Created"), "{}", r.body);
    }
    m.set_state(JobState::Running, None);
    m.set_state(JobState::Finished, None);
    let r = http(s.addr(), "POST", &format!("/jobs/{}/cancel", m.job_id()), Some(TOKEN), None);
    assert_eq!(r.status, 409);
    let o = get(s.addr(), "/overview").json();
    assert_eq!((o["jobs-running"].as_u64(), o["jobs-finished"].as_u64()), (Some(0), Some(1)));
}

#[test]
fn prometheus_metrics() {
    let m = job();
    let s = serve(&m);
    let r = get(s.addr(), "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let scrape = prometheus_parse::Scrape::parse(r.body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let jid = m.job_id().to_string();
    let find = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let hits: Vec<_> = scrape
            .samples
            .iter()
            .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .collect();
        assert_eq!(hits.len(), 1, "{name} {labels:?} in\n{}", r.body);
        assert_eq!(hits[0].labels.get("job_id"), Some(jid.as_str()));
        assert_eq!(hits[0].labels.get("job_name"), Some("word-count"));
        match hits[0].value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    };
    let source = format!("{:032x}", 0xabc0);
    let count = format!("{:032x}", 0xabc1);
    let op = |id: &'static str, sub: &'static str| [("task_name", id), ("subtask_index", sub)];
    assert_eq!(find("weir_numRecordsOut", &[("operator_id", &source), ("subtask_index", "1")]), 1001.0);
    assert_eq!(find("weir_numRecordsIn", &[("operator_id", &count), ("task_name", "count"), ("subtask_index", "0")]), 1000.0);
    assert_eq!(find("weir_numRecordsIn", &op("count", "1")), 1001.0);
    assert_eq!(find("weir_numRecordsOutPerSecond", &op("source", "0")), 1000.0);
    assert_eq!(find("weir_backPressuredTimeMsPerSecond", &op("source", "0")), 600.0);
    assert_eq!(find("weir_busyTimeMsPerSecond", &op("count", "1")), 100.0);
    assert_eq!(find("weir_checkpointAlignmentTime", &op("sink", "1")), 2_000_000.0);
    assert_eq!(find("weir_checkpointStartDelayNanos", &op("sink", "1")), 1_000_000.0);
    assert_eq!(find("weir_latency", &[("task_name", "count"), ("subtask_index", "0"), ("quantile", "0.99")]), 2.0);
    assert_eq!(find("weir_latency", &[("task_name", "count"), ("subtask_index", "0"), ("quantile", "1")]), 2.0);
    assert_eq!(find("weir_numberOfCompletedCheckpoints", &[]), 2.0);
    assert_eq!(find("weir_numberOfFailedCheckpoints", &[]), 1.0);
    assert_eq!(find("weir_numberOfInProgressCheckpoints", &[]), 1.0);
    assert_eq!(find("weir_totalNumberOfCheckpoints", &[]), 4.0);
    assert_eq!(find("weir_lastCheckpointDuration", &[]), 200.0);
    assert_eq!(find("weir_lastCheckpointSize", &[]), 240.0);
    assert_eq!(find("weir_lastCheckpointFullSize", &[]), 600.0);
    assert_eq!(find("weir_lastCheckpointRestoreTimestamp", &[]), (T0 - 5) as f64);
    assert_eq!(find("weir_numRestarts", &[]), 0.0);
    assert!(find("weir_uptime", &[]) >= 0.0);
    assert!(scrape.samples.iter().all(|x| !x.metric.starts_with("weir_gpu")), "no GPU, no GPU metrics");
    assert!(matches!(
        scrape.samples.iter().find(|x| x.metric == "weir_numRecordsIn").map(|x| &x.value),
        Some(prometheus_parse::Value::Counter(_))
    ));

    m.set_gpu(Some(weir::monitor::GpuView {
        pool_reserved_bytes: 1 << 20,
        pool_in_use_bytes: 4096,
        operators: vec![weir::monitor::GpuOperatorView { name: "embed".into(), kernel_ms: 12.5, speedup: Some(3.0), ..Default::default() }],
        ..Default::default()
    }));
    let r = get(s.addr(), "/metrics");
    let scrape = prometheus_parse::Scrape::parse(r.body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let gpu = |name: &str, op: Option<&str>| {
        let x = scrape.samples.iter().find(|x| x.metric == name && op.is_none_or(|o| x.labels.get("operator_name") == Some(o)));
        match x.map(|x| &x.value) {
            Some(prometheus_parse::Value::Gauge(v)) => *v,
            other => panic!("{name}: {other:?}\n{}", r.body),
        }
    };
    assert_eq!(gpu("weir_gpu_pool_reserved_bytes", None), 1048576.0);
    assert_eq!(gpu("weir_gpu_pool_in_use_bytes", None), 4096.0);
    assert_eq!(gpu("weir_gpu_kernel_time_ms", Some("embed")), 12.5);
    assert_eq!(gpu("weir_gpu_speedup", Some("embed")), 3.0);
}

#[test]
fn a_non_loopback_address_needs_a_token_file() {
    let m = job();
    let open = RestSettings { enabled: true, address: "0.0.0.0".into(), port: 0, token_file: None };
    let e = weir_rest::start(m.clone(), &open).err().expect("refused");
    assert!(matches!(e, RestError::PublicWithoutToken { .. }), "{e}");
    assert!(e.to_string().contains("rest.token-file") && e.to_string().contains("0.0.0.0"), "{e}");
    let with_token = RestSettings { address: "0.0.0.0".into(), ..settings(TOKEN) };
    let s = weir_rest::start(m, &with_token).unwrap();
    assert_eq!(s.url(), format!("http://127.0.0.1:{}", s.addr().port()));
    assert_eq!(get(s.addr(), "/jobs").status, 200);
}

#[test]
fn a_taken_port_fails_at_start_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let e = weir_rest::start(job(), &RestSettings { port, ..settings(TOKEN) }).err().expect("refused");
    assert!(matches!(e, RestError::Bind { .. }));
    assert!(e.to_string().contains("rest.port") && e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[test]
fn a_token_file_is_read_trimmed_and_must_not_be_empty() {
    let mut s = settings("  spaced-token \n");
    let server = weir_rest::start(job(), &s).unwrap();
    assert_eq!(server.token(), "spaced-token");
    assert_eq!(server.token_file().to_str(), s.token_file.as_deref());
    drop(server);
    let empty = temp_dir().join("empty");
    std::fs::write(&empty, " \n").unwrap();
    s.token_file = Some(empty.to_string_lossy().into_owned());
    let e = weir_rest::start(job(), &s).err().expect("refused");
    assert!(e.to_string().contains("rest.token-file") && e.to_string().contains("empty"), "{e}");
    s.token_file = Some(temp_dir().join("missing").to_string_lossy().into_owned());
    let e = weir_rest::start(job(), &s).err().expect("refused");
    assert!(matches!(e, RestError::TokenFile { .. }), "{e}");
}

#[cfg(unix)]
#[test]
fn a_generated_token_goes_to_a_file_only_the_user_reads() {
    use std::os::unix::fs::PermissionsExt;
    let m = job();
    let s = weir_rest::start(m.clone(), &RestSettings { enabled: true, address: "127.0.0.1".into(), port: 0, token_file: None }).unwrap();
    let file = s.token_file().to_path_buf();
    assert_eq!(file, weir_rest::default_token_file(s.addr().port()));
    assert!(file.to_string_lossy().ends_with(&format!("rest-{}.token", s.addr().port())));
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(file.parent().unwrap()).unwrap().permissions().mode() & 0o077, 0, "the directory is the user's only");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), s.token());
    assert_eq!(s.token().len(), 64);
    assert!(s.token().bytes().all(|c| c.is_ascii_hexdigit()));
    let r = http(s.addr(), "POST", "/jobs/word-count/checkpoints", Some(s.token()), None);
    assert_eq!(r.status, 202, "{}", r.body);
    let addr = s.addr();
    s.shutdown();
    assert!(!file.exists(), "the token goes with the server");
    assert!(TcpStream::connect(addr).is_err(), "nothing listens after shutdown");
}
