//! `cnn_infer`: classify the image vector of every row with a small CNN, a batch of rows per
//! kernel launch.

use std::sync::Arc;

use weir_gpu::cnn::SmallCnn;
use weir_gpu::kernels::Kernels;

use crate::ops::gpu_probe::{observe, GpuProbe};
use crate::row::{Row, Value};
use crate::stream::DataStream;

/// Append the predicted class of field `idx` (the model's input pixels) to every row.
pub fn classify_rows<'s>(stream: DataStream<'s, Row>, name: &str, kernels: Arc<dyn Kernels>, idx: usize, model: Arc<SmallCnn>) -> DataStream<'s, Row> {
    let mut pixels: Vec<f32> = Vec::new();
    let mut probe = GpuProbe::new(name, kernels.as_ref());
    stream.map_batches_async(name, move |batch: &mut Vec<Row>| {
        pixels.clear();
        for r in batch.iter() {
            match r.get(idx) {
                Value::Vector(v) if v.len() == model.input_len() => pixels.extend_from_slice(v),
                other => panic!(
                    "cnn_infer: a {} of {} values where {} pixels are expected",
                    other.type_name(),
                    match other {
                        Value::Vector(v) => v.len(),
                        _ => 0,
                    },
                    model.input_len()
                ),
            }
        }
        let rows = std::mem::take(batch);
        let classes = model.classes;
        let n = rows.len();
        observe(&mut probe, || kernels.cnn_forward_async(&model, &pixels, n), |cpu, _| cpu.cnn_forward(&model, &pixels, n)).map(move |logits| {
            rows.into_iter()
                .zip(weir_gpu::cnn::argmax(&logits, classes))
                .map(|(mut r, c)| {
                    r.0.push(Value::Int(c as i64));
                    r
                })
                .collect()
        })
    })
}
