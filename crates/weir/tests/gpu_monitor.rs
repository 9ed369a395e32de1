//! The monitor's GPU panel with live figures: a job with a GPU `gemm` shows the adapter, the
//! pool, the transfer engine, and the operator with its batches, times and a live speedup (its
//! CPU twin run on sampled batches), while every output row is still the GPU's exact product,
//! once and in order. A job on the CPU path shows no GPU panel, even in a process that opened a
//! device before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir::monitor::{GpuView, JobView};
use weir::sink::CollectSink;
use weir::source::{Poll, Source, SourceContext, SourceError, SourceReader};
use weir::{JobConfig, Row, StreamEnv, Value};
use weir_checkpoint::SplitOffset;

const K: usize = 16;
const N: usize = 8;

/// Row `i`'s vector: small integers, so every product is exact in f32 on either path.
fn vector(i: u64) -> Vec<f32> {
    (0..K as u64).map(|j| ((i * 7 + j * 3) % 11) as f32 - 5.0).collect()
}

/// Rows `(i, vector(i))` until `stop` is set (one split per subtask, a few rows per poll).
#[derive(Clone)]
struct UntilStopped {
    stop: Arc<AtomicBool>,
    emitted: Arc<AtomicU64>,
}

struct Reader {
    src: UntilStopped,
    split: u64,
    next: u64,
    step: u64,
}

impl Source<Row> for UntilStopped {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        Ok((0..2).map(|s| SplitOffset::new(s, 0)).collect())
    }

    fn open(&self, _ctx: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        let [s] = splits.as_slice() else { panic!("one split per subtask: {splits:?}") };
        Ok(Box::new(Reader { src: self.clone(), split: s.split, next: s.offset, step: 2 }))
    }
}

impl SourceReader<Row> for Reader {
    fn poll(&mut self, out: &mut Vec<Row>, max: usize) -> Result<Poll, SourceError> {
        if self.src.stop.load(Ordering::SeqCst) {
            return Ok(Poll::Finished);
        }
        for _ in 0..max.min(16) {
            let i = self.next * self.step + self.split;
            out.push(Row::new([Value::Int(i as i64), Value::Vector(Arc::new(vector(i)))]));
            self.next += 1;
            self.src.emitted.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Poll::More)
    }

    fn offsets(&self) -> Vec<SplitOffset> {
        vec![SplitOffset::new(self.split, self.next)]
    }
}

fn config(gpu: &str) -> JobConfig {
    JobConfig::from_pairs([
        ("parallelism.default", "2".to_string()),
        ("weir.gpu.enabled", gpu.into()),
        ("weir.gpu.batch.max-records", "32".into()),
        ("metrics.reporter.interval", "10ms".into()),
    ])
    .unwrap()
}

/// Run the gemm job until the monitor's view satisfies `done` (or a minute passed); returns the
/// GPU panel it showed then, the rows out, the rows the source emitted and the last panel.
fn run(gpu: &str, done: impl Fn(&JobView) -> bool + Send + 'static) -> (Option<GpuView>, Vec<Row>, u64, Option<GpuView>) {
    let config = config(gpu);
    let kernels = weir_gpu::kernels::shared_kernels(&config.gpu).unwrap();
    let b: Arc<Vec<f32>> = Arc::new((0..K * N).map(|x| (x % 5) as f32 - 2.0).collect());
    let src = UntilStopped { stop: Arc::new(AtomicBool::new(false)), emitted: Arc::new(AtomicU64::new(0)) };
    let sink = CollectSink::new();
    let env = StreamEnv::new("gpu-monitor", config);
    let monitor = env.monitor();
    let (stop, emitted) = (src.stop.clone(), src.emitted.clone());
    let watcher = std::thread::spawn(move || {
        let start = Instant::now();
        loop {
            let view = monitor.view();
            // A guard against a hang, not a timing assertion: the job stops either way.
            if done(&view) || start.elapsed() > Duration::from_secs(60) {
                stop.store(true, Ordering::SeqCst);
                return view.gpu;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let s2 = sink.clone();
    let result = env.execute(move |job| {
        let rows = job.source("until-stopped", src.clone());
        weir::ops::gemm::gemm_rows(rows, "gemm", kernels.clone(), 1, K, N, b.clone()).sink("collect", s2.clone());
    });
    result.unwrap();
    let seen = watcher.join().unwrap();
    (seen, sink.take(), emitted.load(Ordering::SeqCst), env.monitor().view().gpu)
}

/// Every row's product is exactly A·B: sampling (the CPU twin) changed no output.
fn check_rows(rows: &[Row], emitted: u64) {
    let b: Vec<f32> = (0..K * N).map(|x| (x % 5) as f32 - 2.0).collect();
    assert_eq!(rows.len() as u64, emitted, "every row once");
    let mut ids: Vec<i64> = Vec::with_capacity(rows.len());
    for r in rows {
        let (Value::Int(i), Value::Vector(c)) = (r.get(0), r.get(1)) else { panic!("{r:?}") };
        let a = vector(*i as u64);
        let want: Vec<f32> = (0..N).map(|n| (0..K).map(|k| a[k] * b[k * N + n]).sum()).collect();
        assert_eq!(c.as_slice(), want.as_slice(), "row {i}");
        ids.push(*i);
    }
    // Per subtask (split), rows keep their order.
    for split in 0..2 {
        let of: Vec<i64> = ids.iter().copied().filter(|i| i % 2 == split).collect();
        assert!(of.windows(2).all(|w| w[0] < w[1]), "split {split} out of order");
    }
}

#[test]
fn gpu_panel_shows_the_device_pool_and_a_live_speedup_per_operator() {
    let kernels = weir_gpu::kernels::shared_kernels(&config("auto").gpu).unwrap();
    if kernels.as_gpu().is_none() {
        // No adapter and WEIR_REQUIRE_GPU unset (CI sets it, so it fails there instead).
        eprintln!("no GPU: only the CPU-path half runs");
    } else {
        // Until both instances of `gemm` were sampled: S over both, batches well past it.
        let sampled = |v: &JobView| v.gpu.as_ref().is_some_and(|g| g.operators.iter().any(|o| o.name == "gemm" && o.speedup.is_some() && o.batches >= 8));
        let (seen, rows, emitted, last) = run("auto", sampled);
        let g = seen.expect("the GPU panel is shown while the job runs");
        eprintln!("{g:#?}");
        assert!(!g.adapter.is_empty() && !g.backend.is_empty() && !g.device_type.is_empty(), "{g:?}");
        assert!(g.pool_budget_bytes > 0 && g.pool_reserved_bytes > 0 && g.pool_peak_bytes > 0, "{g:?}");
        assert!(g.pool_reserved_bytes <= g.pool_budget_bytes && g.pool_in_use_bytes <= g.pool_reserved_bytes, "{g:?}");
        assert!(g.batches > 0 && g.bytes_up > 0 && g.bytes_down > 0, "{g:?}");
        let [op] = g.operators.as_slice() else { panic!("one GPU operator: {:?}", g.operators) };
        assert_eq!(op.name, "gemm");
        assert!(op.batches >= 8 && op.batches <= g.batches, "{op:?}");
        assert!(op.kernel_ms > 0.0 && op.kernel_ms.is_finite() && op.transfer_ms >= 0.0 && op.transfer_ms.is_finite(), "{op:?}");
        let s = op.speedup.expect("sampled");
        assert!(s.is_finite() && s > 0.0, "S = {s}");
        // The panel stays (the last report) after the job ends.
        assert!(last.is_some_and(|l| l.operators.iter().any(|o| o.name == "gemm" && o.batches >= op.batches)));
        check_rows(&rows, emitted);
    }
    // The CPU path: no GPU panel, though this process holds an open device from the job above.
    // Stopped once reports counted 2,000 rows read: the panel was set (to none) with them.
    let (seen, rows, emitted, last) = run("false", |v| v.records_read() >= 2000);
    assert!(seen.is_none() && last.is_none(), "{seen:?} {last:?}");
    check_rows(&rows, emitted);
}
