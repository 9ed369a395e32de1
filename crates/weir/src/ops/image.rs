//! Image steps (`resize`, `filter`): one kernel submission per image.

use std::sync::Arc;

use weir_gpu::kernels::{Image, Kernels};
use weir_gpu::Pending;

use crate::ops::gpu_probe::{observe, GpuProbe};
use crate::row::{Row, Value};
use crate::stream::DataStream;

/// An image kernel over batches: one submission per image of field `idx` (rows without an
/// image there pass unchanged), all of a batch in flight together. The operator is not in the
/// monitor's GPU panel (it cannot tell its kernels' path): prefer [`image_kernel_batches`].
pub fn image_batches<'s>(stream: DataStream<'s, Row>, name: &str, idx: usize, kernel: impl Fn(&Image) -> Pending<Image> + 'static) -> DataStream<'s, Row> {
    stream.map_batches_async(name, move |batch: &mut Vec<Row>| {
        let rows = std::mem::take(batch);
        let pending = submit(&rows, idx, &kernel);
        pending.map(move |imgs| replace(rows, idx, imgs))
    })
}

/// [`image_batches`] with `kernel` run on `kernels` (`kernel(k, img)` calls one of `k`'s image
/// kernels): on the GPU path the operator is in the monitor's GPU panel, with its speedup over
/// the same kernel on the CPU path measured on sampled batches.
pub fn image_kernel_batches<'s>(
    stream: DataStream<'s, Row>,
    name: &str,
    idx: usize,
    kernels: Arc<dyn Kernels>,
    kernel: impl Fn(&dyn Kernels, &Image) -> Pending<Image> + 'static,
) -> DataStream<'s, Row> {
    let mut probe = GpuProbe::new(name, kernels.as_ref());
    stream.map_batches_async(name, move |batch: &mut Vec<Row>| {
        let rows = std::mem::take(batch);
        let gpu = || submit(&rows, idx, &|img: &Image| kernel(kernels.as_ref(), img));
        let twin = |cpu: &weir_gpu::kernels::cpu::CpuKernels, _: &Vec<Option<Image>>| {
            let on_cpu: Vec<Result<Image, weir_gpu::GpuError>> = rows
                .iter()
                .filter_map(|r| match r.get(idx) {
                    Value::Image(img) => Some(kernel(cpu, img).wait()),
                    _ => None,
                })
                .collect();
            on_cpu
        };
        let pending = observe(&mut probe, gpu, twin);
        pending.map(move |imgs| replace(rows, idx, imgs))
    })
}

/// One submission per image of field `idx`, all in flight together.
fn submit(rows: &[Row], idx: usize, kernel: &dyn Fn(&Image) -> Pending<Image>) -> Pending<Vec<Option<Image>>> {
    let parts = rows
        .iter()
        .map(|r| match r.get(idx) {
            Value::Image(img) => kernel(img).map(Some),
            _ => Pending::ready(Ok(None)),
        })
        .collect();
    Pending::all(parts)
}

/// The rows with their images replaced by the kernel's.
fn replace(rows: Vec<Row>, idx: usize, imgs: Vec<Option<Image>>) -> Vec<Row> {
    rows.into_iter()
        .zip(imgs)
        .map(|(mut r, img)| {
            if let Some(img) = img {
                r.0[idx] = Value::Image(Arc::new(img));
            }
            r
        })
        .collect()
}
