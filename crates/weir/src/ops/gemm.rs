//! `gemm`: multiply a vector field of every row by a fixed matrix (`B`, `k × n`), a batch of
//! rows per kernel launch.

use std::sync::Arc;

use weir_gpu::kernels::Kernels;

use crate::ops::gpu_probe::{observe, GpuProbe};
use crate::row::{Row, Value};
use crate::stream::DataStream;

/// Replace field `idx` (a vector of `k` values) of every row by its product with `b`.
pub fn gemm_rows<'s>(stream: DataStream<'s, Row>, name: &str, kernels: Arc<dyn Kernels>, idx: usize, k: usize, n: usize, b: Arc<Vec<f32>>) -> DataStream<'s, Row> {
    let mut a: Vec<f32> = Vec::new();
    let mut probe = GpuProbe::new(name, kernels.as_ref());
    stream.map_batches_async(name, move |batch: &mut Vec<Row>| {
        a.clear();
        for r in batch.iter() {
            match r.get(idx) {
                Value::Vector(v) if v.len() == k => a.extend_from_slice(v),
                other => panic!("gemm: a {} where a vector of {k} values is expected", other.type_name()),
            }
        }
        let rows = std::mem::take(batch);
        let m = rows.len();
        observe(&mut probe, || kernels.gemm_async(&a, &b, m, n, k), |cpu, _| cpu.gemm(&a, &b, m, n, k)).map(move |c| {
            rows.into_iter()
                .zip(c.chunks(n))
                .map(|(mut r, row)| {
                    r.0[idx] = Value::Vector(Arc::new(row.to_vec()));
                    r
                })
                .collect()
        })
    })
}
