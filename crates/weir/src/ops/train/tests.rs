//! The operator driven by hand (no job): mini-batches across calls and epochs, reports from the
//! slot's window, the same reports on both paths, rows that are no samples.

use std::sync::Arc;

use weir_gpu::kernels::cpu::CpuKernels;
use weir_gpu::kernels::Kernels;
use weir_state::keygroup::KeyGroupRange;

use super::*;

const SHAPE: CnnShape = CnnShape { in_c: 1, h: 4, w: 4, conv_c: 2, classes: 3 };

/// Sample `i`: a 4×4 image and its class (the class sets which rows are bright).
fn sample(i: usize) -> Row {
    let class = i % 3;
    let px: Vec<f32> = (0..16).map(|p| if p / 4 == class { 1.0 } else { 0.1 * ((i * 7 + p) % 5) as f32 }).collect();
    Row::new([Value::Vector(Arc::new(px)), Value::Int(class as i64)])
}

struct Driver {
    op: StreamingCnnTraining,
    tables: StateTables<Value>,
    out: Vec<(u64, Row)>,
}

impl Driver {
    fn new(kernels: Arc<dyn Kernels>) -> Driver {
        let mut op = StreamingCnnTraining::new(SHAPE, 0, 1, kernels).batch_size(4).report_every(10).seed(5);
        let mut tables = StateTables::new(KeyGroupRange::for_operator(128, 1, 0), 128);
        op.open(&mut tables);
        Driver { op, tables, out: Vec::new() }
    }

    /// Hand `rows` of `key` over as one batch of `epoch`, flush, and collect what is done.
    fn feed(&mut self, epoch: u64, key: &str, rows: impl IntoIterator<Item = Row>) {
        let key = Value::text(key);
        let mut batch: Vec<Row> = rows.into_iter().collect();
        let mut ready = Vec::new();
        self.op.process_batch(&mut KeyedContext { key: &key, tables: &mut self.tables, epoch }, &mut batch, &mut ready);
        assert!(ready.is_empty(), "reports come from poll, tagged by epoch");
        self.op.flush(&mut self.tables, epoch);
    }

    /// Poll until nothing is in flight; the reports as (epoch, key, samples, loss, accuracy).
    fn reports(&mut self) -> Vec<(u64, String, i64, f64, f64)> {
        while self.op.poll(&mut self.tables, &mut self.out).is_some() {
            std::thread::yield_now();
        }
        self.out
            .drain(..)
            .map(|(e, r)| match (r.get(0), r.get(1), r.get(2), r.get(3)) {
                (k, Value::Int(n), Value::Float(l), Value::Float(a)) => (e, k.to_string(), *n, *l, *a),
                _ => panic!("a report row {r:?}"),
            })
            .collect()
    }

    fn held(&mut self, key: &str) -> usize {
        let key = Value::text(key);
        let mut ctx = KeyedContext { key: &key, tables: &mut self.tables, epoch: 0 };
        self.op.held.clone().unwrap().get(&mut ctx).map_or(0, |h| h.labels.len())
    }
}

fn gpu() -> Option<Arc<dyn Kernels>> {
    let required = std::env::var("WEIR_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let cfg = weir_gpu::GpuConfig { mode: if required { weir_gpu::GpuMode::On } else { weir_gpu::GpuMode::Auto }, ..weir_gpu::GpuConfig::default() };
    let k = weir_gpu::kernels::shared_kernels(&cfg).expect("WEIR_REQUIRE_GPU=1 but no GPU adapter");
    if k.as_gpu().is_none() {
        eprintln!("no GPU adapter: the GPU path is not tested");
        return None;
    }
    Some(k)
}

/// Two keys, samples in odd-sized pieces over three epochs: each key trains in mini-batches of 4
/// whatever the pieces, the rest waits in host state; a report every 12 samples (10 rounded up to
/// whole mini-batches), tagged with the epoch of the step that closed the window.
fn run(kernels: Arc<dyn Kernels>) -> Vec<(u64, String, i64, f64, f64)> {
    let mut d = Driver::new(kernels);
    d.feed(1, "a", (0..7).map(sample));
    d.feed(1, "b", (0..3).map(sample));
    assert_eq!((d.held("a"), d.held("b")), (3, 3), "a: one step and 3 waiting; b: none yet");
    d.feed(2, "a", (7..13).map(sample));
    d.feed(2, "b", (3..30).map(sample));
    assert_eq!((d.held("a"), d.held("b")), (1, 2));
    d.feed(3, "a", (13..25).map(sample));
    let reports = d.reports();
    assert_eq!(d.held("a"), 1);
    reports
}

#[test]
fn mini_batches_and_reports_on_the_cpu_path() {
    let reports = run(Arc::new(CpuKernels::new(1)));
    let shown: Vec<(u64, &str, i64)> = reports.iter().map(|(e, k, n, ..)| (*e, k.as_str(), *n)).collect();
    // a: steps at 4 (epoch 1), 8, 12 (epoch 2), 16, 20, 24 (epoch 3); b: 4 .. 28 in epoch 2.
    assert_eq!(shown, [(2, "a", 12), (2, "b", 12), (2, "b", 24), (3, "a", 24)]);
    for (_, k, _, loss, acc) in &reports {
        assert!(loss.is_finite() && *loss > 0.0 && (0.0..=1.0).contains(acc), "{k}: loss {loss}, accuracy {acc}");
    }
    // Training on easy classes: the later window of a key does better.
    assert!(reports[2].3 < reports[1].3, "b's loss falls: {reports:?}");
}

#[test]
fn both_paths_report_alike() {
    let Some(g) = gpu() else { return };
    let cpu = run(Arc::new(CpuKernels::new(1)));
    let gpu = run(g);
    assert_eq!(cpu.len(), gpu.len());
    for (c, g) in cpu.iter().zip(&gpu) {
        assert_eq!((c.0, &c.1, c.2), (g.0, &g.1, g.2));
        assert!((c.3 - g.3).abs() < 1e-4 && (c.4 - g.4).abs() < 1e-9, "cpu {c:?} gpu {g:?}");
    }
}

#[test]
fn a_model_of_another_shape_is_refused_as_init() {
    let other = CnnShape { classes: 4, ..SHAPE }.model_from_slot(&CnnShape { classes: 4, ..SHAPE }.init_slot(1)).unwrap();
    let e = StreamingCnnTraining::new(SHAPE, 0, 1, Arc::new(CpuKernels::new(1))).init_model(&other).err().expect("refused");
    assert!(e.to_string().contains("classes: 4"), "{e}");
    let same = SHAPE.model_from_slot(&SHAPE.init_slot(9)).unwrap();
    let t = StreamingCnnTraining::new(SHAPE, 0, 1, Arc::new(CpuKernels::new(1))).init_model(&same).unwrap().seed(3);
    let want: Vec<u32> = CnnShape::slot_from_model(&same).iter().map(|x| x.to_bits()).collect();
    assert_eq!(t.init[..SHAPE.slot_words()], want[..], "a seed does not replace the initial model");
}

#[test]
#[should_panic(expected = "cnn_train: key a: field 1 7 is not a class of 0..3")]
fn a_label_beyond_the_classes_is_named() {
    let mut d = Driver::new(Arc::new(CpuKernels::new(1)));
    let mut bad = sample(0);
    bad.0[1] = Value::Int(7);
    d.feed(1, "a", [sample(1), bad]);
}
