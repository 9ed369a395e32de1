//! Operating a running job through its REST API (Flink's `flink list`, `savepoint`, `stop`,
//! `cancel`): `weir list`, `weir savepoint`, `weir stop --savepoint`, `weir cancel`.
//!
//! A job is named by a URL (`http://host:port/jobs/<id>`, or `http://host:port` for the one job
//! served there) or by its id or name with `--address`. Mutating calls carry the job's bearer
//! token: `--token-file`, else `WEIR_REST_TOKEN`, else the file the job wrote at start.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::http::{request, Response, Url};

/// Where `weir run` serves its REST API unless told otherwise (`rest.address`, `rest.port`).
pub const DEFAULT_ADDRESS: &str = "http://127.0.0.1:8081";

/// How often an asynchronous operation (savepoint, stop) is polled.
const POLL: Duration = Duration::from_millis(100);

/// `weir list`.
#[derive(clap::Args)]
pub struct ListArgs {
    /// The job's REST API.
    #[arg(long, default_value = DEFAULT_ADDRESS, value_name = "URL")]
    address: String,
}

/// How to reach a job and authenticate: shared by the commands that change a job.
#[derive(clap::Args)]
pub struct JobArgs {
    /// The job: its URL (`http://HOST:PORT/jobs/ID`, or `http://HOST:PORT` for the one job there),
    /// or its id or name, on the server given by --address.
    job: String,
    /// The REST API, where JOB is an id or a name.
    #[arg(long, value_name = "URL")]
    address: Option<String>,
    /// The file holding the job's REST token (`rest.token-file`). Without it: the environment
    /// variable WEIR_REST_TOKEN, else the file the job wrote at start (~/.weir/rest-<port>.token).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

/// `weir savepoint`.
#[derive(clap::Args)]
pub struct SavepointArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Where the savepoint goes (default: the job's execution.checkpointing.savepoint-dir).
    dir: Option<String>,
}

/// `weir stop`.
#[derive(clap::Args)]
pub struct StopArgs {
    /// Where the savepoint goes (default: the job's execution.checkpointing.savepoint-dir).
    #[arg(long, visible_alias = "savepoint-path", value_name = "DIR")]
    savepoint: Option<String>,
    #[command(flatten)]
    job: JobArgs,
}

/// `weir cancel`.
#[derive(clap::Args)]
pub struct CancelArgs {
    #[command(flatten)]
    job: JobArgs,
}

/// A job on a server: its API's base URL and its id.
struct Target {
    server: Url,
    jid: String,
    name: String,
}

/// A non-2xx response is an error carrying the server's message (Flink's `{"errors": [...]}`).
fn ok(resp: Response, what: &str) -> Result<Response> {
    if (200..300).contains(&resp.status) {
        return Ok(resp);
    }
    let hint = match resp.status {
        401 => " (the token is missing or wrong: see --token-file)",
        _ => "",
    };
    bail!("{what}: HTTP {} {}: {}{hint}", resp.status, resp.reason, resp.error_message())
}

fn get(server: &Url, path: &str) -> Result<Value> {
    let what = format!("GET {}{path}", server.base());
    ok(request("GET", &server.with_path(path), None, None)?, &what)?.json().with_context(|| what)
}

/// The jobs a server has (`/jobs/overview`).
fn jobs_overview(server: &Url) -> Result<Vec<Value>> {
    let v = get(server, "/jobs/overview")?;
    Ok(v.get("jobs").and_then(Value::as_array).cloned().unwrap_or_default())
}

fn field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The server JOB names, and the job it names there (`None`: the one job there). No I/O.
fn server_of(job: &str, address: Option<&str>) -> Result<(Url, Option<String>)> {
    if !job.contains("://") {
        return Ok((Url::parse(address.unwrap_or(DEFAULT_ADDRESS))?.with_path("/"), Some(job.to_string())));
    }
    if address.is_some() {
        bail!("--address is for a job given by id or name; {job} is a URL already");
    }
    let url = Url::parse(job)?;
    let path = url.path.trim_end_matches('/');
    let wanted = match path.strip_prefix("/jobs/") {
        Some(id) if !id.is_empty() && !id.contains('/') => Some(id.to_string()),
        _ if path.is_empty() => None,
        _ => bail!("{job}: expected http://HOST:PORT/jobs/ID or http://HOST:PORT"),
    };
    Ok((url.with_path("/"), wanted))
}

/// Find the job (by id or name, or the only one) on its server.
fn resolve(server: Url, wanted: Option<&str>) -> Result<Target> {
    let jobs = jobs_overview(&server)?;
    let names = || jobs.iter().map(|j| format!("{} ({})", field(j, "jid"), field(j, "name"))).collect::<Vec<_>>().join(", ");
    let found = match wanted {
        None if jobs.len() == 1 => &jobs[0],
        None if jobs.is_empty() => bail!("{}: no job there", server.base()),
        None => bail!("{}: {} jobs there, name one: {}", server.base(), jobs.len(), names()),
        Some(w) => jobs
            .iter()
            .find(|j| field(j, "jid") == w || field(j, "name") == w)
            .ok_or_else(|| anyhow!("{}: no job {w}; jobs there: {}", server.base(), names()))?,
    };
    Ok(Target { jid: field(found, "jid").to_string(), name: field(found, "name").to_string(), server })
}

/// The job JOB names, and the token to change it with (the token first: its absence is an
/// error that needs no server).
fn target_and_token(args: &JobArgs) -> Result<(Target, String)> {
    let (server, wanted) = server_of(&args.job, args.address.as_deref())?;
    let token = token(args, &server)?;
    Ok((resolve(server, wanted.as_deref())?, token))
}

/// The bearer token for the job at `server`.
fn token(args: &JobArgs, server: &Url) -> Result<String> {
    let (path, origin) = match &args.token_file {
        Some(f) => (f.clone(), "--token-file"),
        None => {
            if let Some(t) = std::env::var("WEIR_REST_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
                return Ok(t.trim().to_string());
            }
            (weir_rest::default_token_file(server.port), "the job's token file")
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        anyhow!(
            "no REST token: {origin} {}: {e} (the job writes its token there at start; give --token-file FILE \
             (the job's rest.token-file) or set WEIR_REST_TOKEN)",
            path.display()
        )
    })?;
    let t = text.trim();
    if t.is_empty() {
        bail!("no REST token: {origin} {} is empty", path.display());
    }
    Ok(t.to_string())
}

/// A mutating call: `method path` with the job's token; returns the JSON answer.
fn send(t: &Target, token: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let what = format!("{method} {}{path}", t.server.base());
    let resp = ok(request(method, &t.server.with_path(path), Some(token), body.as_ref())?, &what)?;
    if resp.body.is_empty() {
        return Ok(Value::Null);
    }
    resp.json().with_context(|| what)
}

/// Poll a savepoint (or stop) trigger until it completes; returns the savepoint's location.
fn await_savepoint(t: &Target, trigger: &str, stopping: bool) -> Result<String> {
    let path = format!("/jobs/{}/savepoints/{trigger}", t.jid);
    loop {
        let v = match get(&t.server, &path) {
            Ok(v) => v,
            // Stopping ends the job, and its API with it: a vanished server is a job that ended
            // before its answer was read, not proof of a failed savepoint.
            Err(e) if stopping => {
                return Err(e).context("the job ended before its savepoint's location could be read: see the job's log or savepoint directory")
            }
            Err(e) => return Err(e),
        };
        let status = v.pointer("/status/id").and_then(Value::as_str).unwrap_or("");
        if status == "COMPLETED" {
            let op = v.get("operation").cloned().unwrap_or(Value::Null);
            if let Some(loc) = op.get("location").and_then(Value::as_str) {
                return Ok(loc.to_string());
            }
            let cause = op.get("failure-cause");
            let msg = cause.and_then(|c| c.get("stack-trace")).and_then(Value::as_str).map(str::to_string);
            bail!("savepoint of job {} failed: {}", t.jid, msg.unwrap_or_else(|| format!("no location in the answer: {v}")));
        }
        std::thread::sleep(POLL);
    }
}

/// `weir list`: the job(s) at an address.
pub fn list(args: ListArgs) -> Result<()> {
    let server = Url::parse(&args.address)?.with_path("/");
    let jobs = jobs_overview(&server)?;
    println!("{:<32}  {:<20}  {:<11}  {:>9}  {:>11}  latest checkpoint", "job id", "name", "state", "uptime", "checkpoints");
    for j in &jobs {
        let jid = field(j, "jid");
        let cps = get(&server, &format!("/jobs/{jid}/checkpoints")).unwrap_or(Value::Null);
        let count = |k: &str| cps.pointer(&format!("/counts/{k}")).and_then(Value::as_u64).unwrap_or(0);
        let latest = cps
            .pointer("/latest/completed")
            .filter(|c| !c.is_null())
            .map(|c| {
                let id = c.get("id").and_then(Value::as_u64).unwrap_or(0);
                match c.get("external_path").and_then(Value::as_str) {
                    Some(p) => format!("{id} {p}"),
                    None => id.to_string(),
                }
            })
            .unwrap_or_else(|| "-".into());
        let uptime = j.get("duration").and_then(Value::as_u64).map(human_ms).unwrap_or_else(|| "-".into());
        let ck = format!("{}/{}", count("completed"), count("failed"));
        println!("{jid:<32}  {:<20}  {:<11}  {uptime:>9}  {ck:>11}  {latest}", field(j, "name"), field(j, "state"));
    }
    Ok(())
}

/// `weir savepoint JOB [DIR]`: a savepoint now; the job goes on.
pub fn savepoint(args: SavepointArgs) -> Result<()> {
    let (t, token) = target_and_token(&args.job)?;
    let body = json!({"target-directory": args.dir, "cancel-job": false, "formatType": "CANONICAL"});
    let v = send(&t, &token, "POST", &format!("/jobs/{}/savepoints", t.jid), Some(body))?;
    let trigger = v.get("request-id").and_then(Value::as_str).ok_or_else(|| anyhow!("no request-id in the answer: {v}"))?;
    eprintln!("weir: savepoint of job {} ({}) triggered ({trigger})", t.jid, t.name);
    println!("savepoint: {}", await_savepoint(&t, trigger, false)?);
    Ok(())
}

/// `weir stop --savepoint DIR JOB`: stop with a savepoint (Flink's `flink stop`).
pub fn stop(args: StopArgs) -> Result<()> {
    let (t, token) = target_and_token(&args.job)?;
    let body = json!({"targetDirectory": args.savepoint, "drain": false});
    let v = send(&t, &token, "POST", &format!("/jobs/{}/stop", t.jid), Some(body))?;
    let trigger = v.get("request-id").and_then(Value::as_str).ok_or_else(|| anyhow!("no request-id in the answer: {v}"))?;
    eprintln!("weir: stopping job {} ({}) with a savepoint ({trigger})", t.jid, t.name);
    println!("savepoint: {}", await_savepoint(&t, trigger, true)?);
    Ok(())
}

/// `weir cancel JOB`: stop now, without a savepoint.
pub fn cancel(args: CancelArgs) -> Result<()> {
    let (t, token) = target_and_token(&args.job)?;
    send(&t, &token, "PATCH", &format!("/jobs/{}?mode=cancel", t.jid), None)?;
    eprintln!("weir: cancelling job {} ({})", t.jid, t.name);
    Ok(())
}

/// `83 ms`, `4.2 s`, `3m 05s`, `2h 07m`, `3d 04h`.
pub fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms} ms"),
        1..=59 => format!("{:.1} s", ms as f64 / 1e3),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d {:02}h", s / 86_400, s / 3600 % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_would_write_them() {
        assert_eq!(human_ms(83), "83 ms");
        assert_eq!(human_ms(4_200), "4.2 s");
        assert_eq!(human_ms(185_000), "3m 05s");
        assert_eq!(human_ms(7_620_000), "2h 07m");
        assert_eq!(human_ms(4 * 86_400_000 + 3_600_000), "4d 01h");
    }
}
