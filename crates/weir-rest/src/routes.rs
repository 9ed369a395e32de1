//! The endpoints: each reads one [`JobMonitor::view`] copy (or queues a command with
//! [`JobMonitor::submit`]) and answers; none waits on the job.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use weir::monitor::{wall_ms, CommandError, JobCommand, JobMonitor, JobView, VertexView};

use crate::flink::{self, TriggerKind};
use crate::{auth, prometheus};

const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");
const DASHBOARD_JS: &str = include_str!("../assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../assets/dashboard.css");

/// What the handlers share.
pub(crate) struct App {
    pub(crate) monitor: Arc<JobMonitor>,
    pub(crate) token: String,
}

type AppState = State<Arc<App>>;

/// An error in Flink's shape: `{"errors": [message]}`.
pub(crate) struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({"errors": [self.1]}))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

fn not_found(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, message.into())
}

type Answer = Result<Response, ApiError>;

fn ok(v: Value) -> Answer {
    Ok(Json(v).into_response())
}

fn accepted(v: Value) -> Answer {
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

/// The routes, with every error (axum's own rejections included) in Flink's shape.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", DASHBOARD_HTML) }))
        .route("/index.html", get(|| async { asset("text/html; charset=utf-8", DASHBOARD_HTML) }))
        .route("/assets/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) }))
        .route("/assets/dashboard.css", get(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) }))
        .route("/config", get(|| async { Json(flink::config()) }))
        .route("/overview", get(|State(a): AppState| async move { Json(flink::overview(&a.monitor.view())) }))
        .route("/metrics", get(metrics))
        .route("/jobs", get(|State(a): AppState| async move { Json(flink::jobs(&a.monitor.view())) }))
        .route("/jobs/overview", get(|State(a): AppState| async move { Json(flink::jobs_overview(&a.monitor.view(), wall_ms())) }))
        .route("/jobs/{jid}", get(job_detail).patch(patch_job))
        .route("/jobs/{jid}/cancel", post(cancel))
        .route("/jobs/{jid}/stop", post(stop))
        .route("/jobs/{jid}/savepoints", post(savepoint))
        .route("/jobs/{jid}/savepoints/{trigger}", get(savepoint_status))
        .route("/jobs/{jid}/checkpoints", get(checkpoints).post(checkpoint))
        .route("/jobs/{jid}/checkpoints/config", get(checkpoint_config))
        .route("/jobs/{jid}/checkpoints/{trigger}", get(checkpoint_status))
        .route("/jobs/{jid}/checkpoints/details/{cid}", get(checkpoint_detail))
        .route("/jobs/{jid}/checkpoints/details/{cid}/subtasks/{vid}", get(checkpoint_task))
        .route("/jobs/{jid}/vertices/{vid}", get(vertex))
        .route("/jobs/{jid}/vertices/{vid}/backpressure", get(backpressure))
        .route("/jobs/{jid}/latency", get(latency))
        .route("/jobs/{jid}/gpu", get(gpu))
        .fallback(|uri: Uri| async move { not_found(format!("Not found: {}", uri.path())) })
        .layer(axum::middleware::map_response(flink_errors))
        .with_state(app)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")], body).into_response()
}

/// axum's rejections (405, 413, bad path encodings, ...) come as text; Flink's clients expect
/// `{"errors": [..]}` from every failed call.
async fn flink_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.map(|b| String::from_utf8_lossy(&b).trim().to_string()).unwrap_or_default();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    let body = json!({"errors": [message]}).to_string();
    parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

/// The view, if `jid` is the job's id or name.
fn job(a: &App, jid: &str) -> Result<JobView, ApiError> {
    let v = a.monitor.view();
    if jid == v.job_id || jid == v.name {
        Ok(v)
    } else {
        Err(not_found(format!("Job {jid} not found")))
    }
}

fn find_vertex<'a>(v: &'a JobView, vid: &str) -> Result<&'a VertexView, ApiError> {
    v.vertices.iter().find(|x| x.id == vid).ok_or_else(|| not_found(format!("Vertex {vid} not found in job {}", v.job_id)))
}

fn checkpoint_id(cid: &str) -> Result<u64, ApiError> {
    cid.parse().map_err(|_| bad_request(format!("path parameter 'checkpointid': '{cid}' is not a checkpoint id (a non-negative integer)")))
}

fn authorize(a: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    if auth::bearer_matches(headers.get(AUTHORIZATION).map(|h| h.as_bytes()), &a.token) {
        return Ok(());
    }
    Err(ApiError(
        StatusCode::UNAUTHORIZED,
        "this call needs 'Authorization: Bearer <token>' with the job's REST token (rest.token-file, or the file named at start)".into(),
    ))
}

fn submit(a: &App, cmd: JobCommand) -> Result<String, ApiError> {
    a.monitor.submit(cmd).map_err(|e: CommandError| {
        let status = if matches!(e, CommandError::Busy(_)) { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::CONFLICT };
        ApiError(status, e.to_string())
    })
}

/// A JSON object body; an empty body is an empty object (every field is optional).
fn body_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(bad_request(format!("request body: expected a JSON object, not {}", kind(&other)))),
        Err(e) => Err(bad_request(format!("request body: malformed JSON: {e}"))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A string field (absent, null and "" are none).
fn opt_string(m: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone()).filter(|s| !s.is_empty())),
        Some(other) => Err(bad_request(format!("field '{field}': expected a string or null, not {}", kind(other)))),
    }
}

fn opt_bool(m: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad_request(format!("field '{field}': expected true or false, not {}", kind(other)))),
    }
}

/// A string field that must be one of `allowed` (absent or null: none).
fn opt_enum(m: &Map<String, Value>, field: &str, allowed: &[&str]) -> Result<Option<String>, ApiError> {
    match opt_string(m, field)? {
        Some(s) if !allowed.contains(&s.as_str()) => Err(bad_request(format!("field '{field}': '{s}' is not one of {}", allowed.join(", ")))),
        s => Ok(s),
    }
}

async fn metrics(State(a): AppState) -> Response {
    let text = prometheus::render(&a.monitor.view(), wall_ms());
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn job_detail(State(a): AppState, Path(jid): Path<String>) -> Answer {
    let v = job(&a, &jid)?;
    ok(flink::job_detail(&v, a.monitor.config(), wall_ms()))
}

/// Flink's `PATCH /jobs/:jid?mode=cancel` (mode defaults to cancel, as in Flink).
async fn patch_job(State(a): AppState, headers: HeaderMap, Path(jid): Path<String>, query: Result<Query<HashMap<String, String>>, QueryRejection>) -> Answer {
    authorize(&a, &headers)?;
    job(&a, &jid)?;
    let Query(q) = query.map_err(|e| bad_request(format!("query: {e}")))?;
    match q.get("mode").map(String::as_str) {
        None | Some("cancel") => {}
        Some("stop") => return Err(bad_request("query parameter 'mode': 'stop' is not supported here; POST /jobs/:jid/stop stops with a savepoint")),
        Some(m) => return Err(bad_request(format!("query parameter 'mode': '{m}' is not 'cancel'"))),
    }
    submit(&a, JobCommand::Cancel)?;
    accepted(json!({}))
}

async fn cancel(State(a): AppState, headers: HeaderMap, Path(jid): Path<String>) -> Answer {
    authorize(&a, &headers)?;
    job(&a, &jid)?;
    submit(&a, JobCommand::Cancel)?;
    accepted(json!({}))
}

/// `{"targetDirectory": str|null, "drain": bool}`. Weir's stop always ends the sources and
/// takes the final checkpoint as a savepoint, so `drain` is checked but changes nothing.
async fn stop(State(a): AppState, headers: HeaderMap, Path(jid): Path<String>, body: Bytes) -> Answer {
    authorize(&a, &headers)?;
    job(&a, &jid)?;
    let m = body_object(&body)?;
    let target = opt_string(&m, "targetDirectory")?;
    opt_bool(&m, "drain")?;
    let id = submit(&a, JobCommand::StopWithSavepoint { target })?;
    accepted(json!({"request-id": id}))
}

/// `{"target-directory": str|null, "cancel-job": bool, "formatType": "CANONICAL"}`.
async fn savepoint(State(a): AppState, headers: HeaderMap, Path(jid): Path<String>, body: Bytes) -> Answer {
    authorize(&a, &headers)?;
    job(&a, &jid)?;
    let m = body_object(&body)?;
    let target = opt_string(&m, "target-directory")?;
    let cancel = opt_bool(&m, "cancel-job")?.unwrap_or(false);
    if opt_enum(&m, "formatType", &["CANONICAL", "NATIVE"])?.as_deref() == Some("NATIVE") {
        return Err(bad_request("field 'formatType': Weir writes CANONICAL savepoints only"));
    }
    let cmd = if cancel { JobCommand::StopWithSavepoint { target } } else { JobCommand::Savepoint { target } };
    let id = submit(&a, cmd)?;
    accepted(json!({"request-id": id}))
}

/// `{"checkpointType": "FULL"|"INCREMENTAL"|"CONFIGURED"}`, body optional. The monitor's
/// checkpoint command has no type: every manual checkpoint is taken as configured.
async fn checkpoint(State(a): AppState, headers: HeaderMap, Path(jid): Path<String>, body: Bytes) -> Answer {
    authorize(&a, &headers)?;
    job(&a, &jid)?;
    let m = body_object(&body)?;
    opt_enum(&m, "checkpointType", &["FULL", "INCREMENTAL", "CONFIGURED"])?;
    let id = submit(&a, JobCommand::Checkpoint)?;
    accepted(json!({"request-id": id}))
}

fn trigger(a: &App, jid: &str, trigger: &str, kind: TriggerKind) -> Answer {
    job(a, jid)?;
    let status = a.monitor.trigger_status(trigger).ok_or_else(|| not_found(format!("Operation {trigger} not found (the trigger id is unknown)")))?;
    ok(flink::trigger(&status, kind))
}

async fn savepoint_status(State(a): AppState, Path((jid, t)): Path<(String, String)>) -> Answer {
    trigger(&a, &jid, &t, TriggerKind::Savepoint)
}

async fn checkpoint_status(State(a): AppState, Path((jid, t)): Path<(String, String)>) -> Answer {
    trigger(&a, &jid, &t, TriggerKind::Checkpoint)
}

async fn checkpoints(State(a): AppState, Path(jid): Path<String>) -> Answer {
    ok(flink::checkpoints(&job(&a, &jid)?))
}

async fn checkpoint_config(State(a): AppState, Path(jid): Path<String>) -> Answer {
    job(&a, &jid)?;
    ok(flink::checkpoint_config(a.monitor.config()))
}

async fn checkpoint_detail(State(a): AppState, Path((jid, cid)): Path<(String, String)>) -> Answer {
    let v = job(&a, &jid)?;
    let id = checkpoint_id(&cid)?;
    let c = flink::find_checkpoint(&v, id).ok_or_else(|| not_found(format!("Checkpoint {id} not found in the history")))?;
    ok(flink::checkpoint_entry(&v, c))
}

async fn checkpoint_task(State(a): AppState, Path((jid, cid, vid)): Path<(String, String, String)>) -> Answer {
    let v = job(&a, &jid)?;
    let id = checkpoint_id(&cid)?;
    let c = flink::find_checkpoint(&v, id).ok_or_else(|| not_found(format!("Checkpoint {id} not found in the history")))?;
    ok(flink::checkpoint_task(c, find_vertex(&v, &vid)?))
}

async fn vertex(State(a): AppState, Path((jid, vid)): Path<(String, String)>) -> Answer {
    let v = job(&a, &jid)?;
    ok(flink::vertex_detail(&v, a.monitor.config(), find_vertex(&v, &vid)?, wall_ms()))
}

async fn backpressure(State(a): AppState, Path((jid, vid)): Path<(String, String)>) -> Answer {
    let v = job(&a, &jid)?;
    ok(flink::backpressure(&v, find_vertex(&v, &vid)?, wall_ms()))
}

async fn latency(State(a): AppState, Path(jid): Path<String>) -> Answer {
    let v = job(&a, &jid)?;
    ok(flink::latencies(&v, a.monitor.config()))
}

async fn gpu(State(a): AppState, Path(jid): Path<String>) -> Answer {
    ok(flink::gpu(&job(&a, &jid)?))
}
