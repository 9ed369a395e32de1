//! `weir bench rest`: what the job's operating surface costs. The keyed-sum job with 1 s
//! checkpoints, as a user runs it with the REST API served and scraped (the defaults), against
//! the same job with no server; and a third run with latency tracking on as well
//! (`metrics.latency.interval: 1 s`). Runs alternate (off, on, latency, off, ...) so that a slow
//! moment of the machine hits all three.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use weir::job::JobPlan;
use weir::StreamEnv;

use super::BenchArgs;
use crate::http::{request, Url};

/// How often the scraper polls, as a dashboard or Prometheus at a short interval would.
const SCRAPE_EVERY: Duration = Duration::from_millis(100);

/// What the scraper did in one run.
#[derive(Default)]
struct Scrapes {
    ok: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
}

/// One run: wall time, and the scraper's requests (zero when off).
struct RestRun {
    secs: f64,
    requests: u64,
    failed: u64,
    bytes: u64,
}

/// `on`: a REST server, scraped; `latency`: latency tracking on.
fn run_job(args: &BenchArgs, records: u64, on: bool, latency: bool, run: usize) -> Result<RestRun> {
    let job = format!("bench-rest-{}-{run}", std::process::id());
    let yaml = format!(
        "name: {job}\nsource: {{type: generator, count: {records}, keys: {}, seed: 1}}\npipeline:\n  - key_by: key\n  - aggregate: [sum(value), count]\nsink: {{type: blackhole}}\n",
        args.keys
    );
    let spec = serde_json::from_value(weir::job::parse_yaml(&yaml).map_err(anyhow::Error::msg)?)?;
    let mut defines = vec![
        ("parallelism.default".to_string(), args.parallelism.to_string()),
        ("execution.checkpointing.dir".to_string(), args.dir.clone()),
        ("execution.checkpointing.interval".to_string(), "1s".to_string()),
    ];
    defines.push(("metrics.latency.interval".into(), if latency { "1 s" } else { "off" }.into()));
    let plan = JobPlan::from_spec(spec, &defines).map_err(anyhow::Error::msg)?;
    let env = StreamEnv::new(&plan.name, plan.config.clone());
    let scrapes = Arc::new(Scrapes::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut surface = None;
    if on {
        let monitor = env.monitor();
        let settings = weir::config::RestSettings { port: 0, ..plan.config.rest.clone() };
        let server = weir_rest::start(monitor.clone(), &settings).context("starting the REST API")?;
        let base = Url::parse(&server.url())?;
        let paths = ["/metrics".to_string(), format!("/jobs/{}/checkpoints", monitor.view().job_id)];
        let (scrapes, stop) = (scrapes.clone(), stop.clone());
        let scraper = std::thread::Builder::new().name("bench-scraper".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                for p in &paths {
                    match request("GET", &base.with_path(p), None, None) {
                        Ok(r) if r.status == 200 => {
                            scrapes.ok.fetch_add(1, Ordering::Relaxed);
                            scrapes.bytes.fetch_add(r.body.len() as u64, Ordering::Relaxed);
                        }
                        _ => {
                            scrapes.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                std::thread::sleep(SCRAPE_EVERY.saturating_sub(t0.elapsed()));
            }
        })?;
        surface = Some((server, scraper));
    }
    let start = Instant::now();
    let p2 = plan.clone();
    let result = env.execute(move |j| p2.build(j));
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some((server, scraper)) = surface {
        let _ = scraper.join();
        server.shutdown();
    }
    let _ = std::fs::remove_dir_all(std::path::Path::new(&args.dir).join(&job));
    result?;
    Ok(RestRun {
        secs,
        requests: scrapes.ok.load(Ordering::Relaxed),
        failed: scrapes.failed.load(Ordering::Relaxed),
        bytes: scrapes.bytes.load(Ordering::Relaxed),
    })
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let records = args.records;
    let repeat = args.repeat.unwrap_or(3).max(1);
    println!(
        "keyed sum: {records} records, {} keys, parallelism {}, blackhole sink, heap state backend, 1 s checkpoints; \
         off = no REST server, on = REST server (port 0) scraped every {} ms (/metrics and /jobs/<id>/checkpoints), \
         latency = on and metrics.latency.interval 1 s; runs alternate, median of {repeat} each",
        args.keys,
        args.parallelism,
        SCRAPE_EVERY.as_millis()
    );
    let (mut off, mut on, mut lat) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..repeat {
        off.push(run_job(args, records, false, false, 3 * rep)?);
        on.push(run_job(args, records, true, false, 3 * rep + 1)?);
        lat.push(run_job(args, records, true, true, 3 * rep + 2)?);
    }
    println!();
    println!("{:<8} {:>4} {:>9} {:>8} {:>10} {:>8} {:>10}", "run", "#", "M rec/s", "s", "requests", "failed", "KB read");
    for rep in 0..repeat {
        for (label, r) in [("off", &off[rep]), ("on", &on[rep]), ("latency", &lat[rep])] {
            println!(
                "{label:<8} {:>4} {:>9.2} {:>8.2} {:>10} {:>8} {:>10.1}",
                rep + 1,
                records as f64 / r.secs / 1e6,
                r.secs,
                r.requests,
                r.failed,
                r.bytes as f64 / 1e3
            );
        }
    }
    let failed: u64 = on.iter().chain(&lat).map(|r| r.failed).sum();
    let median = |v: &[RestRun]| {
        let mut s: Vec<f64> = v.iter().map(|r| r.secs).collect();
        s.sort_by(f64::total_cmp);
        records as f64 / s[s.len() / 2] / 1e6
    };
    let (m_on, m_off, m_lat) = (median(&on), median(&off), median(&lat));
    println!();
    println!("rest+metrics on vs off: {m_on:.2} vs {m_off:.2} M rec/s ({:+.1}%)", 100.0 * (m_on / m_off - 1.0));
    println!("rest+metrics+latency tracking vs off: {m_lat:.2} vs {m_off:.2} M rec/s ({:+.1}%)", 100.0 * (m_lat / m_off - 1.0));
    if failed > 0 {
        bail!("{failed} scrapes failed");
    }
    Ok(())
}
