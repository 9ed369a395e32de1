//! Image steps (`resize`, `filter`): one kernel submission per image.

use std::sync::Arc;

use crate::row::{Row, Value};
use crate::stream::DataStream;

/// An image kernel over batches: one submission per image of field `idx` (rows without an
/// image there pass unchanged), all of a batch in flight together.
pub fn image_batches<'s>(
    stream: DataStream<'s, Row>,
    name: &str,
    idx: usize,
    kernel: impl Fn(&weir_gpu::kernels::Image) -> weir_gpu::Pending<weir_gpu::kernels::Image> + 'static,
) -> DataStream<'s, Row> {
    stream.map_batches_async(name, move |batch: &mut Vec<Row>| {
        let rows = std::mem::take(batch);
        let parts = rows
            .iter()
            .map(|r| match r.get(idx) {
                Value::Image(img) => kernel(img).map(Some),
                _ => weir_gpu::Pending::ready(Ok(None)),
            })
            .collect();
        weir_gpu::Pending::all(parts).map(move |imgs: Vec<Option<weir_gpu::kernels::Image>>| {
            rows.into_iter()
                .zip(imgs)
                .map(|(mut r, img)| {
                    if let Some(img) = img {
                        r.0[idx] = Value::Image(Arc::new(img));
                    }
                    r
                })
                .collect()
        })
    })
}

