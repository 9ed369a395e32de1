//! Flow control: a deliberately slow sink holds the source back, so resident memory stays
//! bounded over a long input (timely itself has no backpressure).

use std::time::{Duration, Instant};

use weir::sink::{Sink, SinkContext, SinkError, SinkWriter};
use weir::source::GeneratorSource;
use weir::{JobConfig, Row, StreamEnv};

struct SlowSink;
struct SlowWriter;

impl Sink<Row> for SlowSink {
    fn open(&self, _: &SinkContext) -> Result<Box<dyn SinkWriter<Row>>, SinkError> {
        Ok(Box::new(SlowWriter))
    }
}

impl SinkWriter<Row> for SlowWriter {
    fn write(&mut self, _: u64, batch: &mut Vec<Row>) -> Result<(), SinkError> {
        // ~4 µs per record: about 250 k records/s per worker, far slower than the generator.
        std::thread::sleep(Duration::from_micros(4 * batch.len() as u64));
        batch.clear();
        Ok(())
    }
    fn pre_commit(&mut self, _: u64) -> Result<u64, SinkError> {
        Ok(0)
    }
    fn commit(&mut self, _: u64) -> Result<(), SinkError> {
        Ok(())
    }
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn slow_sink_keeps_memory_bounded() {
    const RECORDS: u64 = 1_500_000;
    let before = rss_bytes();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !d2.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(rss_bytes());
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    });
    let config = JobConfig::from_pairs([("parallelism.default", "2")]).unwrap();
    let start = Instant::now();
    StreamEnv::new("flow", config)
        .execute(|job| {
            job.source("gen", GeneratorSource { count: RECORDS, keys: 1000, seed: 1, rate: None })
                .map(|r: Row| r)
                .sink("slow", SlowSink);
        })
        .unwrap();
    let took = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let growth = peak.saturating_sub(before);
    // Unbounded, the source would materialise all rows (~100 bytes each: ~150 MB) within
    // milliseconds; the flow-control window is 16 batches of 4096 rows per worker (~13 MB).
    eprintln!("peak RSS growth {} MB over {took:?}", growth >> 20);
    assert!(growth < 60 << 20, "resident memory grew by {} MB", growth >> 20);
    assert!(took >= Duration::from_millis(2 * RECORDS / 1000), "the sink really was slow: {took:?}");
}

/// A source instance that has finished (here: one with no split at all) must not hold back
/// the flow control of the others: with checkpoints off, the job's only barrier comes after
/// every source has finished, so a held-back source would never finish.
#[test]
fn a_finished_source_instance_does_not_stall_the_others() {
    for interval in ["off", "20ms"] {
        finished_source_instance_case(interval);
    }
}

/// The case of [`a_finished_source_instance_does_not_stall_the_others`] with checkpoints
/// `interval`: with checkpoints, a finished instance must stay out of the way after every
/// barrier too, or the others move one batch per checkpoint.
fn finished_source_instance_case(interval: &str) {
    use weir::connectors::memory::{CollectSink, VecSource};
    let config = JobConfig::from_pairs([
        ("parallelism.default", "2"),
        ("weir.source.batch-size", "64"),
        ("weir.source.max-inflight-batches", "4"),
        ("execution.checkpointing.interval", interval),
        ("execution.checkpointing.dir", std::env::temp_dir().join(format!("weir-finished-source-{}", std::process::id())).to_str().unwrap()),
    ])
    .unwrap();
    // 5,000 batches: at one batch per 20 ms checkpoint that would take 100 s.
    let data: Vec<u64> = (0..64 * 5000).collect();
    let sink = CollectSink::new();
    let out = sink.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = StreamEnv::new("one-split", config).execute(move |job| {
            job.source("v", VecSource::new(data.clone())).sink("out", out.clone());
        });
        let _ = tx.send(r.map(|_| ()));
    });
    let r = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("checkpoints {interval}: the job did not finish in 30 s (a finished source instance stalled the other)"));
    r.unwrap();
    let mut got = sink.take();
    got.sort_unstable();
    assert_eq!(got, (0..64 * 5000).collect::<Vec<u64>>());
}
