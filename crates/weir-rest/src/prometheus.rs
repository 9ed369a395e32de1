//! GET /metrics: the job's metrics in the Prometheus text format, under Flink's metric names
//! prefixed `weir_`.
//!
//! Each scrape records a [`JobView`] into a fresh [`PrometheusRecorder`] installed for this
//! thread only ([`metrics::with_local_recorder`]): no global recorder, so many jobs (and tests)
//! share a process, and series of subtasks that went away do not linger.

use metrics::{counter, describe_counter, describe_gauge, gauge, with_local_recorder, Label};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use weir::monitor::{JobView, SubtaskMetrics};

/// Flink's metrics (and Weir's GPU ones), described once per scrape.
const COUNTERS: &[(&str, &str)] = &[
    ("weir_numRecordsIn", "Records received by the subtask."),
    ("weir_numRecordsOut", "Records emitted by the subtask."),
    ("weir_numberOfCompletedCheckpoints", "Completed checkpoints since the job started."),
    ("weir_numberOfFailedCheckpoints", "Failed checkpoints since the job started."),
    ("weir_totalNumberOfCheckpoints", "Checkpoints triggered since the job started."),
    ("weir_numRestarts", "Restarts of the job."),
];
const GAUGES: &[(&str, &str)] = &[
    ("weir_numRecordsInPerSecond", "Records received per second over the last report interval."),
    ("weir_numRecordsOutPerSecond", "Records emitted per second over the last report interval."),
    ("weir_busyTimeMsPerSecond", "Time busy, ms per second."),
    ("weir_backPressuredTimeMsPerSecond", "Time back-pressured, ms per second."),
    ("weir_checkpointAlignmentTime", "Trigger to barrier through the input in the latest completed checkpoint, ns."),
    ("weir_checkpointStartDelayNanos", "Start delay of the latest completed checkpoint, ns (trigger → the first record of a later epoch at the input)."),
    ("weir_latency", "Source to operator latency over the last report windows, ms."),
    ("weir_lastCheckpointDuration", "Duration of the latest completed checkpoint, ms."),
    ("weir_lastCheckpointSize", "Bytes written by the latest completed checkpoint."),
    ("weir_lastCheckpointFullSize", "Bytes of state the latest completed checkpoint references."),
    ("weir_numberOfInProgressCheckpoints", "Checkpoints pending now."),
    ("weir_lastCheckpointRestoreTimestamp", "When the job last restored from a checkpoint, ms since the epoch (-1: never)."),
    ("weir_uptime", "Time since the job started, ms."),
    ("weir_gpu_pool_reserved_bytes", "Bytes the GPU memory pool took from the device."),
    ("weir_gpu_pool_in_use_bytes", "Bytes of the GPU memory pool handed out."),
    ("weir_gpu_pool_peak_bytes", "Peak bytes of the GPU memory pool handed out."),
    ("weir_gpu_batches_in_flight", "Batches on the GPU transfer ring now."),
    ("weir_gpu_kernel_time_ms", "Device kernel time of the GPU operator, ms in total."),
    ("weir_gpu_transfer_time_ms", "Host-device transfer time of the GPU operator, ms in total."),
    ("weir_gpu_speedup", "CPU time over GPU time of the GPU operator, measured live."),
];

/// The text of `view`'s metrics, `now` ms since the epoch.
pub fn render(view: &JobView, now: u64) -> String {
    let recorder: PrometheusRecorder = PrometheusBuilder::new().build_recorder();
    with_local_recorder(&recorder, || record(view, now));
    recorder.handle().render()
}

fn record(v: &JobView, now: u64) {
    for (name, help) in COUNTERS {
        describe_counter!(*name, *help);
    }
    for (name, help) in GAUGES {
        describe_gauge!(*name, *help);
    }
    let job = vec![Label::new("job_id", v.job_id.clone()), Label::new("job_name", v.name.clone())];
    let with = |extra: &[(&'static str, String)]| {
        let mut l = job.clone();
        l.extend(extra.iter().map(|(k, x)| Label::new(*k, x.clone())));
        l
    };
    let latest = v.checkpoints.latest_completed.as_ref();
    for x in &v.vertices {
        for s in &x.subtasks {
            let labels = with(&[("task_name", x.name.clone()), ("operator_id", x.id.clone()), ("subtask_index", s.subtask.to_string())]);
            subtask(s, &labels);
            let barrier_us = latest
                .into_iter()
                .flat_map(|c| c.tasks.iter().filter(|t| t.vertex == x.index))
                .flat_map(|t| t.subtasks.iter().filter(|a| a.subtask == s.subtask))
                .map(|a| (a.barrier_us, a.alignment_us))
                .max();
            if let Some((barrier, alignment)) = barrier_us {
                gauge!("weir_checkpointAlignmentTime", labels.clone()).set(alignment as f64 * 1e3);
                gauge!("weir_checkpointStartDelayNanos", labels.clone()).set(barrier.saturating_sub(alignment) as f64 * 1e3);
            }
            if let Some(l) = s.latency {
                for (q, ms) in [("0.5", l.p50), ("0.95", l.p95), ("0.99", l.p99), ("1", l.max)] {
                    let mut ql = labels.clone();
                    ql.push(Label::new("quantile", q));
                    gauge!("weir_latency", ql).set(ms);
                }
            }
        }
    }
    let c = &v.checkpoints;
    if let Some(l) = latest {
        gauge!("weir_lastCheckpointDuration", job.clone()).set(l.end_to_end_duration as f64);
        gauge!("weir_lastCheckpointSize", job.clone()).set(l.checkpointed_size as f64);
        gauge!("weir_lastCheckpointFullSize", job.clone()).set(l.state_size as f64);
    }
    counter!("weir_numberOfCompletedCheckpoints", job.clone()).absolute(c.counts.completed);
    counter!("weir_numberOfFailedCheckpoints", job.clone()).absolute(c.counts.failed);
    counter!("weir_totalNumberOfCheckpoints", job.clone()).absolute(c.counts.total);
    gauge!("weir_numberOfInProgressCheckpoints", job.clone()).set(c.counts.in_progress as f64);
    gauge!("weir_lastCheckpointRestoreTimestamp", job.clone()).set(c.restored.as_ref().map_or(-1.0, |r| r.restore_timestamp as f64));
    counter!("weir_numRestarts", job.clone()).absolute(u64::from(v.restarts));
    gauge!("weir_uptime", job.clone()).set(v.end_time.unwrap_or(now).saturating_sub(v.start_time) as f64);
    if let Some(g) = &v.gpu {
        gauge!("weir_gpu_pool_reserved_bytes", job.clone()).set(g.pool_reserved_bytes as f64);
        gauge!("weir_gpu_pool_in_use_bytes", job.clone()).set(g.pool_in_use_bytes as f64);
        gauge!("weir_gpu_pool_peak_bytes", job.clone()).set(g.pool_peak_bytes as f64);
        gauge!("weir_gpu_batches_in_flight", job.clone()).set(g.batches_in_flight as f64);
        for op in &g.operators {
            let labels = with(&[("operator_name", op.name.clone())]);
            gauge!("weir_gpu_kernel_time_ms", labels.clone()).set(op.kernel_ms);
            gauge!("weir_gpu_transfer_time_ms", labels.clone()).set(op.transfer_ms);
            if let Some(s) = op.speedup {
                gauge!("weir_gpu_speedup", labels).set(s);
            }
        }
    }
}

fn subtask(s: &SubtaskMetrics, labels: &[Label]) {
    counter!("weir_numRecordsIn", labels.to_vec()).absolute(s.records_in);
    counter!("weir_numRecordsOut", labels.to_vec()).absolute(s.records_out);
    gauge!("weir_numRecordsInPerSecond", labels.to_vec()).set(s.records_in_per_second);
    gauge!("weir_numRecordsOutPerSecond", labels.to_vec()).set(s.records_out_per_second);
    gauge!("weir_busyTimeMsPerSecond", labels.to_vec()).set(s.busy_ms_per_second);
    gauge!("weir_backPressuredTimeMsPerSecond", labels.to_vec()).set(s.backpressured_ms_per_second);
}
