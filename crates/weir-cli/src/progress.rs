//! What `weir run` shows of a running job: a progress bar on a terminal, a log line every 10 s
//! otherwise. Both read the job's [`JobMonitor`] from a thread of their own, so the job's hot
//! path never waits on them.
//!
//! Log lines and the bar share stderr: the log writer ([`stderr_log`]) hides the bar while it
//! writes a line and redraws it after, so neither tears the other.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};
use weir::monitor::{JobMonitor, JobView};

/// How often the monitor is read.
const TICK: Duration = Duration::from_millis(200);
/// How often a log line is written when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// The window the rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(2);

/// The bar on screen, if any: the log writer hides it around each line.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn bar_slot() -> std::sync::MutexGuard<'static, Option<ProgressBar>> {
    BAR.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer of `tracing`'s log lines: stderr, around the progress bar if one is drawn.
pub fn stderr_log() -> LogWriter {
    LogWriter
}

/// See [`stderr_log`].
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // tracing writes each event in one call, so a line is never split around a redraw.
        let bar = bar_slot().clone();
        match bar {
            Some(b) if !b.is_hidden() => b.suspend(|| std::io::stderr().write_all(buf))?,
            _ => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The running display; [`Progress::finish`] (or drop) stops it and clears the bar.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Start showing `monitor`'s job: a bar where stderr is a terminal, log lines otherwise.
    pub fn start(monitor: Arc<JobMonitor>) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let tty = std::io::stderr().is_terminal();
        let thread = std::thread::Builder::new().name("weir-progress".into()).spawn(move || show(&monitor, &s, tty)).ok();
        Progress { stop, thread }
    }

    /// Stop and clear the bar (before the job's final log lines and output).
    pub fn finish(mut self) {
        self.end();
    }

    fn end(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // Wake it from its tick: the job's end is not held up by up to a tick.
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.end();
    }
}

/// Records per second over the last [`RATE_WINDOW`].
#[derive(Default)]
struct Rate(VecDeque<(Instant, u64)>);

impl Rate {
    fn add(&mut self, now: Instant, records: u64) -> f64 {
        self.0.push_back((now, records));
        while self.0.len() > 2 && now.duration_since(self.0[0].0) > RATE_WINDOW {
            self.0.pop_front();
        }
        let (t0, r0) = self.0[0];
        let secs = now.duration_since(t0).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        records.saturating_sub(r0) as f64 / secs
    }
}

/// `RUNNING, 12 checkpoints` (and restarts, where there were some).
fn status(v: &JobView) -> String {
    let state = serde_json::to_value(v.state).ok().and_then(|s| s.as_str().map(str::to_string)).unwrap_or_default();
    let c = v.checkpoints.counts.completed;
    let mut s = format!("{state}, {c} checkpoint{}", if c == 1 { "" } else { "s" });
    if v.checkpoints.counts.failed > 0 {
        s.push_str(&format!(" ({} failed)", v.checkpoints.counts.failed));
    }
    if v.restarts > 0 {
        s.push_str(&format!(", {} restart{}", v.restarts, if v.restarts == 1 { "" } else { "s" }));
    }
    s
}

fn show(monitor: &JobMonitor, stop: &AtomicBool, tty: bool) {
    let bar = tty.then(|| {
        let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(5));
        b.set_style(spinner_style());
        b.enable_steady_tick(Duration::from_millis(120));
        *bar_slot() = Some(b.clone());
        b
    });
    let mut rate = Rate::default();
    let mut has_len = false;
    let mut last_log = Instant::now();
    loop {
        let ending = stop.load(Ordering::SeqCst);
        let v = monitor.view();
        let now = Instant::now();
        let read = v.records_read();
        let per_sec = rate.add(now, read);
        match &bar {
            Some(b) => {
                if let (Some(total), false) = (v.records_total, has_len) {
                    b.set_length(total);
                    b.set_style(bar_style());
                    has_len = true;
                }
                b.set_position(read);
                b.set_message(format!("{}/s, {}", HumanCount(per_sec as u64), status(&v)));
            }
            None if now.duration_since(last_log) >= LOG_EVERY => {
                last_log = now;
                let of = v.records_total.map(|t| format!(" of {}", HumanCount(t))).unwrap_or_default();
                tracing::info!("job {}: {} records read{of} ({}/s), {}", v.name, HumanCount(read), HumanCount(per_sec as u64), status(&v));
            }
            None => {}
        }
        if ending || v.state.is_terminal() {
            break;
        }
        std::thread::park_timeout(TICK);
    }
    if let Some(b) = bar {
        bar_slot().take();
        b.finish_and_clear();
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} [{elapsed_precise}] {human_pos} records, {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {human_pos}/{human_len} records, {msg} (ETA {eta})")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_measured_over_the_recent_window() {
        let t = Instant::now();
        let mut r = Rate::default();
        assert_eq!(r.add(t, 0), 0.0);
        assert_eq!(r.add(t + Duration::from_secs(1), 1_000), 1_000.0);
        // A stall: the window moves past the fast second.
        r.add(t + Duration::from_secs(4), 1_000);
        assert_eq!(r.add(t + Duration::from_secs(5), 1_000), 0.0);
    }
}
