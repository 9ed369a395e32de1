//! The DataStream API: [`StreamEnv`], [`Job`], [`DataStream`], [`KeyedStream`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::operator::source as timely_source;
use timely::dataflow::operators::vec::{Filter, Map};
use timely::dataflow::operators::{Operator, Probe};
use timely::dataflow::{Scope, StreamVec};
use weir_checkpoint::{SplitOffset, SubtaskSnapshot, SubtaskStats, TaskId};
use weir_state::keygroup::{key_group, operator_for_key_group, KeyGroupRange};

use crate::epoch::{epoch_of, epoch_start, Aligned, EpochAligner, Time};
use crate::monitor::VertexKind;
use crate::runtime::control::AckMsg;
use crate::runtime::metrics::OpMetrics;
use crate::runtime::{now_us, run_job, ClusterConfig, JobCtx, JobError, JobResult, Restore};
use crate::sink::{Sink, SinkContext};
use crate::source::{Poll, Source, SourceContext};
use crate::state::local::{LocalBackup, StateReader};
use crate::state::snapshot::{RestoreSource, SnapshotSpec, TablesJob};
use crate::state::{KeyedBatchFunction, KeyedContext, KeyedProcessFunction, StateTables, ValueState};
use crate::{Data, JobConfig, Key};

/// Where and how a job runs: its name, configuration, cluster and restore point.
pub struct StreamEnv {
    name: String,
    config: JobConfig,
    cluster: ClusterConfig,
    restore: Restore,
    cancel: Arc<std::sync::atomic::AtomicBool>,
    monitor: std::sync::OnceLock<Arc<crate::monitor::JobMonitor>>,
}

impl StreamEnv {
    /// An environment for job `name`.
    pub fn new(name: &str, config: JobConfig) -> Self {
        Self { name: name.to_string(), config, cluster: ClusterConfig::default(), restore: Restore::None, cancel: Arc::default(), monitor: Default::default() }
    }

    /// A flag that cancels the running job when set (e.g. from a signal handler).
    pub fn cancel_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.cancel.clone()
    }

    /// Run as one process of a cluster.
    pub fn cluster(mut self, cluster: ClusterConfig) -> Self {
        self.cluster = cluster;
        self
    }

    /// Start from a checkpoint.
    pub fn restore(mut self, restore: Restore) -> Self {
        self.restore = restore;
        self
    }

    /// Restore even where the checkpoint holds state that no operator of the job has the uid
    /// of, dropping that state with a warning (Flink's `--allowNonRestoredState`); without it
    /// such a restore fails at start. Also set by `execution.state-recovery.ignore-unclaimed-state`.
    pub fn allow_non_restored_state(mut self, allow: bool) -> Self {
        self.config.allow_non_restored_state = allow;
        self
    }

    /// Take a savepoint when the job finishes or is stopped by a signal (Flink's
    /// stop-with-savepoint): sources stop, the final checkpoint is written in full in the
    /// canonical format and copied to `execution.checkpointing.savepoint-dir`
    /// ([`JobResult::savepoint`] names it), sinks commit, and the job ends.
    pub fn savepoint_on_stop(mut self, on: bool) -> Self {
        self.config.savepoint_on_stop = on;
        self
    }

    /// The job's monitor: what the REST API, the dashboard, the metrics and the progress bar
    /// read, and where they send commands (savepoint, stop, cancel). Configure the environment
    /// before taking it: it keeps the configuration it was created with.
    pub fn monitor(&self) -> Arc<crate::monitor::JobMonitor> {
        self.monitor.get_or_init(|| crate::monitor::JobMonitor::new(&self.name, &self.config)).clone()
    }

    /// The configuration.
    pub fn config(&self) -> &JobConfig {
        &self.config
    }

    /// Build the job on every worker with `build` and run it until its sources end (or forever,
    /// for unbounded sources), restarting per the restart strategy.
    pub fn execute<F>(&self, build: F) -> Result<JobResult, JobError>
    where
        F: Fn(&mut Job<'_>) + Send + Sync + 'static,
    {
        run_job(&self.name, self.config.clone(), &self.cluster, &self.restore, self.cancel.clone(), self.monitor(), Arc::new(build))
    }
}

/// A job under construction on one worker.
pub struct Job<'s> {
    scope: Scope<'s, Time>,
    ctx: Rc<JobCtx>,
    /// The uid of the next source (see [`Job::uid`]).
    next_uid: Option<String>,
}

/// Fails the job deterministically from inside an operator: see [`Job::input_error_handle`].
pub(crate) struct InputErrorHandle(Rc<JobCtx>);

impl InputErrorHandle {
    /// End the job with `message`, without restarting.
    pub(crate) fn fail(&self, message: String) {
        self.0.fail_deterministic(message);
    }
}

/// A stream of `T`.
pub struct DataStream<'s, T> {
    stream: StreamVec<'s, Time, T>,
    ctx: Rc<JobCtx>,
    /// The uid of the next operator that registers (see [`DataStream::uid`]).
    uid: Option<String>,
    /// The vertex (for metrics) whose output this is.
    vertex: Option<usize>,
}

/// A stream partitioned by key.
pub struct KeyedStream<'s, K, T> {
    stream: StreamVec<'s, Time, T>,
    ctx: Rc<JobCtx>,
    key: Rc<dyn Fn(&T) -> K>,
    /// The uid of the next keyed operator (see [`KeyedStream::uid`]).
    uid: Option<String>,
    vertex: Option<usize>,
}

impl<'s> Job<'s> {
    pub(crate) fn new(scope: Scope<'s, Time>, ctx: Rc<JobCtx>) -> Self {
        Self { scope, ctx, next_uid: None }
    }

    /// Set the uid (Flink's `uid()`) of the next source: a restore gives it the positions the
    /// checkpoint holds under the same uid. Without one a source's uid is derived from its
    /// name and position, which an edit of the job may change. It comes before the operator,
    /// unlike Flink's, because an operator's state is restored as it is created.
    pub fn uid(&mut self, uid: &str) -> &mut Self {
        self.next_uid = Some(uid.to_string());
        self
    }

    /// This worker's index.
    pub fn worker_index(&self) -> usize {
        self.ctx.index
    }

    /// Workers in all.
    pub fn parallelism(&self) -> usize {
        self.ctx.peers
    }

    /// Fail the job at start with `message` (a build-time error: bad configuration, no device).
    pub fn fail(&self, message: String) {
        self.ctx.fail_build(message);
    }

    /// A handle for an operator to fail the job, while it runs, on input that no restart can
    /// fix (the job ends without restarting).
    pub(crate) fn input_error_handle(&self) -> InputErrorHandle {
        InputErrorHandle(self.ctx.clone())
    }

    /// Add a replayable source.
    pub fn source<T: Data, S: Source<T>>(&mut self, name: &str, source: S) -> DataStream<'s, T> {
        let ctx = self.ctx.clone();
        let op = ctx.register(self.next_uid.take(), name, true);
        let (index, peers) = (ctx.index as u32, ctx.peers as u32);
        let task = TaskId::new(op, index);
        let restored: Vec<SplitOffset> = ctx.restored_subtasks(op).flat_map(|s| s.splits.iter().cloned()).collect();
        let sctx = SourceContext { subtask: index, parallelism: peers, max_line_bytes: ctx.config.max_line_bytes };
        let reader = crate::source::assign_splits(&source, &sctx, &restored).and_then(|mine| source.open(&sctx, mine));
        let mut reader = match reader {
            Ok(r) => Some(r),
            Err(e) if e.is_deterministic() => {
                ctx.fail_deterministic(format!("source '{name}': {e}"));
                None
            }
            Err(e) => {
                ctx.fail_build(format!("source '{name}': {e}"));
                None
            }
        };
        let name_owned = name.to_string();
        let (vertex, metrics) = ctx.vertex(name, Some(op), VertexKind::Source, Vec::new());
        let stream = timely_source::<_, CapacityContainerBuilder<Vec<T>>, _, _>(self.scope, name, |cap, info| {
            let activator = self.scope.activator_for(info.address);
            let sidx = {
                let mut sh = ctx.shared.borrow_mut();
                sh.activators.push(activator.clone());
                sh.source_triggers.push(VecDeque::new());
                sh.source_triggers.len() - 1
            };
            let mut epoch = ctx.first_epoch;
            let mut seq: u64 = 0;
            let mut cap = Some(cap);
            if let Some(c) = cap.as_mut() {
                c.downgrade(&epoch_start(epoch));
            }
            let batch = ctx.config.source_batch;
            let window = ctx.config.max_inflight_batches;
            let mut inflight: VecDeque<Time> = VecDeque::with_capacity(window);
            let mut exhausted = false;
            let mut buf: Vec<T> = Vec::with_capacity(batch);
            let ctx = ctx.clone();
            let latency = ctx.shared.borrow().latency_on;
            // Since when the flow-control window has held the source back.
            let mut blocked_since: Option<Instant> = None;
            move |output| {
                let Some(c) = cap.as_mut() else { return };
                let Some(r) = reader.as_mut() else { return };
                let t0 = Instant::now();
                if let Some(b) = blocked_since.take() {
                    metrics.backpressured(t0.duration_since(b).as_micros() as u64);
                }
                let _busy = BusyGuard(&metrics, t0);
                // Barriers: record offsets, then move to the next epoch.
                loop {
                    let trig = ctx.shared.borrow_mut().source_triggers[sidx].pop_front();
                    let Some(trig) = trig else { break };
                    if trig.id < epoch {
                        continue;
                    }
                    let t0 = Instant::now();
                    let splits = r.offsets();
                    let snapshot = SubtaskSnapshot {
                        operator_name: name_owned.clone(),
                        uid: ctx.uid_of(op),
                        state_files: Vec::new(),
                        splits,
                        stats: SubtaskStats { sync_us: t0.elapsed().as_micros() as u64, ..Default::default() },
                    };
                    ctx.shared.borrow_mut().outbox.push(AckMsg::Ack { id: trig.id, task, snapshot });
                    if trig.is_final {
                        cap = None;
                        return;
                    }
                    epoch = trig.id + 1;
                    seq = 0;
                    if exhausted {
                        finish_epoch(c, epoch);
                    } else {
                        c.downgrade(&epoch_start(epoch));
                    }
                }
                if exhausted {
                    return; // the final barrier wakes us
                }
                if ctx.shared.borrow().stop_sources {
                    // Stop with a savepoint: end here, as if the input ended.
                    exhausted = true;
                    finish_epoch(c, epoch);
                    ctx.shared.borrow_mut().outbox.push(AckMsg::SourceFinished { task });
                    return;
                }
                while inflight.front().is_some_and(|t| !ctx.probe.less_equal(t)) {
                    inflight.pop_front();
                }
                let mut emitted = false;
                if latency {
                    // The next batch's time carries its emit time (see runtime::metrics): once
                    // here, for a source that waited since its last batch, and then after each
                    // batch, so a batch costs one downgrade (one progress update), as without.
                    let t = crate::runtime::metrics::stamp(&ctx.shared.borrow(), epoch, *c.time(), now_us());
                    c.downgrade(&t);
                }
                while inflight.len() < window {
                    let status = match r.poll(&mut buf, batch) {
                        Ok(s) => s,
                        Err(e) => {
                            let message = format!("source '{name_owned}': {e}");
                            // Malformed input fails the same way after any restart: end the job now.
                            if e.is_deterministic() {
                                ctx.fail_deterministic(message);
                            } else {
                                ctx.shared.borrow_mut().set_fail(message);
                            }
                            return;
                        }
                    };
                    if !buf.is_empty() {
                        let t = *c.time();
                        metrics.out(buf.len());
                        output.session(&*c).give_container(&mut buf);
                        buf.clear();
                        inflight.push_back(t);
                        seq = (seq + 1).max(t - epoch_start(epoch) + 1);
                        if seq > u32::MAX as u64 {
                            // The next time would be the next epoch's: only a barrier may go there.
                            let message = format!("source '{name_owned}': 2^32 batches in epoch {epoch}, the most one epoch holds; enable checkpointing (execution.checkpointing.interval) or raise weir.source.batch-size");
                            ctx.fail_deterministic(message);
                            return;
                        }
                        let next = epoch_start(epoch) + seq;
                        let next = if latency { crate::runtime::metrics::stamp(&ctx.shared.borrow(), epoch, next, now_us()) } else { next };
                        seq = next - epoch_start(epoch);
                        c.downgrade(&next);
                        emitted = true;
                    }
                    match status {
                        Poll::More => {}
                        Poll::Idle => break,
                        Poll::Finished => {
                            exhausted = true;
                            finish_epoch(c, epoch);
                            ctx.shared.borrow_mut().outbox.push(AckMsg::SourceFinished { task });
                            return;
                        }
                    }
                }
                if inflight.len() >= window {
                    blocked_since = Some(Instant::now());
                }
                if emitted {
                    activator.activate();
                } else {
                    activator.activate_after(Duration::from_micros(200));
                }
            }
        });
        DataStream { stream, ctx: self.ctx.clone(), uid: None, vertex: Some(vertex) }
    }
}

impl<'s, T: Data> DataStream<'s, T> {
    /// Set the uid (Flink's `uid()`) of the next operator applied to this stream that takes
    /// part in checkpoints (a keyed operator or a sink; stateless steps before it, such as
    /// `map`, `filter` or `key_by`, pass it on): a restore gives that operator the state the
    /// checkpoint holds under the same uid, wherever the operator now stands in the job.
    /// Without one the uid is derived from the operator's name and position. It comes before
    /// the operator, unlike Flink's, because an operator's state is restored as it is created.
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.to_string());
        self
    }

    /// Apply `f` to every record.
    pub fn map<U: Data>(self, f: impl FnMut(T) -> U + 'static) -> DataStream<'s, U> {
        DataStream { stream: self.stream.map(f), ctx: self.ctx, uid: self.uid, vertex: self.vertex }
    }

    /// Keep the records for which `f` holds.
    pub fn filter(self, f: impl FnMut(&T) -> bool + 'static) -> DataStream<'s, T> {
        DataStream { stream: self.stream.filter(f), ctx: self.ctx, uid: self.uid, vertex: self.vertex }
    }

    /// Replace each record by zero or more.
    pub fn flat_map<U: Data, I: IntoIterator<Item = U>>(self, f: impl FnMut(T) -> I + 'static) -> DataStream<'s, U> {
        DataStream { stream: self.stream.flat_map(f), ctx: self.ctx, uid: self.uid, vertex: self.vertex }
    }

    /// Partition by key: records of one key go to the worker owning the key's key group.
    pub fn key_by<K: Key>(self, key: impl Fn(&T) -> K + 'static) -> KeyedStream<'s, K, T> {
        KeyedStream { stream: self.stream, ctx: self.ctx, key: Rc::new(key), uid: self.uid, vertex: self.vertex }
    }

    /// Apply `f` to batches of records (for GPU operators without state): records of the open
    /// epoch are collected up to `weir.gpu.batch.max-records`, or for at most
    /// `weir.gpu.batch.max-latency`, or until the epoch closes; `f` turns a batch into output.
    /// A capability is held only while records wait, so checkpoints stay exact.
    pub fn map_batches<U: Data>(self, name: &str, mut f: impl FnMut(&mut Vec<T>, &mut Vec<U>) + 'static) -> DataStream<'s, U> {
        let mut ready: Vec<U> = Vec::new();
        self.batched(Pipeline, name, None, move |ev: BatchEvent<'_, T, U>| match ev {
            BatchEvent::Batch(e, items, out) => {
                f(items, &mut ready);
                out.extend(ready.drain(..).map(|u| (e, u)));
            }
            BatchEvent::Poll { oldest, .. } => *oldest = None,
            BatchEvent::Close(..) => {}
        })
    }

    /// Like [`DataStream::map_batches`], with results that come back later (a GPU kernel's
    /// [`Pending`](weir_gpu::Pending)): `f` submits a batch and returns at once, so the next
    /// batch is collected and uploaded while this one computes. Up to
    /// `weir.gpu.max-inflight-batches` batches are in flight; results are emitted in batch
    /// order, each under its epoch. An epoch's close does not wait for its batches: the operator
    /// keeps a capability per epoch with batches in flight, so the epoch's barrier passes
    /// downstream only after its results, and the next epoch's batches are submitted meanwhile.
    /// A failed batch fails the job (and the restart strategy replays from the last checkpoint).
    pub fn map_batches_async<U: Data>(self, name: &str, mut f: impl FnMut(&mut Vec<T>) -> weir_gpu::Pending<Vec<U>> + 'static) -> DataStream<'s, U> {
        let max = self.ctx.config.gpu_max_inflight.max(1);
        let mut q: VecDeque<(u64, weir_gpu::Pending<Vec<U>>)> = VecDeque::new();
        let op = name.to_string();
        let take = move |e: u64, r: Result<Vec<U>, weir_gpu::GpuError>, out: &mut Vec<(u64, U)>| match r {
            Ok(v) => out.extend(v.into_iter().map(|u| (e, u))),
            Err(err) => panic!("{op}: {err}"),
        };
        self.batched(Pipeline, name, None, move |ev: BatchEvent<'_, T, U>| match ev {
            BatchEvent::Batch(e, items, out) => {
                // Back-pressure: the oldest batch must be done before another is submitted.
                while q.len() >= max {
                    let (pe, p) = q.pop_front().expect("non-empty");
                    take(pe, p.wait(), out);
                }
                q.push_back((e, f(items)));
            }
            BatchEvent::Poll { out, oldest } => {
                while let Some(r) = q.front_mut().and_then(|(_, p)| p.poll(false)) {
                    let (e, _) = q.pop_front().expect("non-empty");
                    take(e, r, out);
                }
                *oldest = q.front().map(|(e, _)| *e);
            }
            BatchEvent::Close(..) => {}
        })
    }

    /// The batching operator behind [`DataStream::map_batches`] and
    /// [`KeyedStream::process_batches`]: collects records of the open epoch, hands them to
    /// `handler` as a batch when `weir.gpu.batch.max-records` wait, when the oldest has waited
    /// `weir.gpu.batch.max-latency`, or when the epoch closes. Work the handler has in flight is
    /// polled on every activation and emitted under the capability of the epoch it belongs to.
    /// When an epoch closes, its last batch is handed over and `Close` follows at once: nothing
    /// waits for the device. The operator holds one capability per epoch that has records
    /// waiting or work in flight, so the frontier (and the flow-control probe) moves on as soon
    /// as an epoch's work is done, and a checkpoint holds exactly the batches of its epochs.
    fn batched<U: Data>(
        self,
        pact: impl timely::dataflow::channels::pact::ParallelizationContract<Time, Vec<T>>,
        name: &str,
        keyed_op: Option<u32>,
        mut handler: impl FnMut(BatchEvent<'_, T, U>) + 'static,
    ) -> DataStream<'s, U> {
        type Cap = timely::dataflow::operators::Capability<Time>;
        /// How soon an operator with batches in flight looks at them again.
        const POLL_INTERVAL: Duration = Duration::from_micros(200);
        let ctx = self.ctx.clone();
        let kind = if keyed_op.is_some() { VertexKind::Keyed } else { VertexKind::Batch };
        let (vertex, metrics) = ctx.vertex(name, keyed_op, kind, self.vertex.into_iter().collect());
        let (max_records, max_latency) = (ctx.config.gpu_batch_records, ctx.config.gpu_batch_latency);
        let mut aligner: EpochAligner<Cap, T> = EpochAligner::new(ctx.first_epoch);
        let mut pending: Vec<T> = Vec::new();
        let mut out: Vec<(u64, U)> = Vec::new();
        let mut run: Vec<U> = Vec::new();
        let mut oldest: Option<Instant> = None;
        let mut caps: BTreeMap<u64, Cap> = BTreeMap::new();
        // The oldest epoch with work in flight.
        let mut in_flight: Option<u64> = None;
        let scope = self.stream.scope();
        let stream = self.stream.unary_frontier::<CapacityContainerBuilder<Vec<U>>, _, _, _>(pact, name, move |_, info| {
            let activator = scope.activator_for(info.address);
            move |(input, frontier), output| {
                let t0 = Instant::now();
                let _busy = BusyGuard(&metrics, t0);
                let now = ctx.shared.borrow().latency_on.then(now_us);
                let port = output.output_index();
                // Hand over what waits, collect finished work, emit it under its epoch's
                // capability, release the capabilities of epochs with nothing left; on an
                // epoch's close, tell the handler after its last batch.
                let mut step = |pending: &mut Vec<T>, caps: &mut BTreeMap<u64, Cap>, oldest: &mut Option<Instant>, in_flight: &mut Option<u64>, epoch: u64, submit: bool, close: Option<(u64, u64)>| {
                    let submitted = submit && !pending.is_empty();
                    if submitted {
                        handler(BatchEvent::Batch(epoch, pending, &mut out));
                        pending.clear();
                        *oldest = None;
                    }
                    if submitted || in_flight.is_some() || close.is_some() {
                        handler(BatchEvent::Poll { out: &mut out, oldest: in_flight });
                    }
                    let mut i = 0;
                    while i < out.len() {
                        let e = out[i].0;
                        let n = out[i..].iter().take_while(|(x, _)| *x == e).count();
                        run.extend(out.drain(i..i + n).map(|(_, u)| u));
                        let c = caps.get(&e).unwrap_or_else(|| panic!("output of epoch {e} without its capability"));
                        metrics.out(run.len());
                        output.session(c).give_container(&mut run);
                        run.clear();
                        i = 0;
                    }
                    caps.retain(|&e, _| (e == epoch && !pending.is_empty()) || in_flight.is_some_and(|o| e >= o));
                    if let Some((e, alignment_us)) = close {
                        handler(BatchEvent::Close(e, alignment_us));
                    }
                };
                input.for_each(|c, data| {
                    let t = *c.least().expect("records carry a time");
                    metrics.batch_in(&ctx.shared.borrow(), t, data.len(), now);
                    let e = epoch_of(t);
                    if e <= aligner.epoch() {
                        caps.entry(e).or_insert_with(|| c.retain_least(port).expect("records carry a time"));
                        pending.append(data);
                        oldest.get_or_insert_with(Instant::now);
                    } else {
                        aligner.stash(e, c.retain_least(port).expect("records carry a time"), std::mem::take(data));
                    }
                });
                let full = pending.len() >= max_records || oldest.is_some_and(|t| t.elapsed() >= max_latency);
                step(&mut pending, &mut caps, &mut oldest, &mut in_flight, aligner.epoch(), full, None);
                let fe = frontier.frontier().first().map(|t| epoch_of(*t));
                let last = ctx.shared.borrow().final_id;
                while let Some(ev) = aligner.next(fe, last) {
                    match ev {
                        Aligned::Stashed(c, mut data) => {
                            caps.entry(aligner.epoch()).or_insert(c);
                            pending.append(&mut data);
                            oldest.get_or_insert_with(Instant::now);
                        }
                        Aligned::Close(e) => {
                            let alignment = aligner.take_alignment_us();
                            step(&mut pending, &mut caps, &mut oldest, &mut in_flight, e, true, Some((e, alignment)))
                        }
                    }
                }
                if in_flight.is_some() {
                    activator.activate_after(POLL_INTERVAL);
                } else if !pending.is_empty() {
                    activator.activate_after(max_latency);
                }
            }
        });
        DataStream { stream, ctx: self.ctx, uid: self.uid, vertex: Some(vertex) }
    }

    /// Write into a transactional sink; the sink's output is exactly once.
    pub fn sink<S: Sink<T>>(self, name: &str, sink: S) {
        let ctx = self.ctx.clone();
        let op = ctx.register(self.uid.clone(), name, false);
        let task = TaskId::new(op, ctx.index as u32);
        let sctx = SinkContext {
            subtask: ctx.index as u32,
            parallelism: ctx.peers as u32,
            restored: ctx.restored.as_ref().map(|m| m.id),
            newest_checkpoint: ctx.newest_completed,
        };
        // An attempt that cannot run (a source whose restored file is gone) leaves the output
        // as it is: opening would recover, commit or withdraw files.
        if ctx.build_failed() {
            return;
        }
        if let Err(e) = sink.preflight(&sctx) {
            ctx.fail_deterministic(format!("sink '{name}': {e}"));
            return;
        }
        let writer = match sink.open(&sctx) {
            Ok(w) => Rc::new(std::cell::RefCell::new(w)),
            Err(e) => {
                ctx.fail_build(format!("sink '{name}': {e}"));
                return;
            }
        };
        let committer = writer.clone();
        let sink_name = name.to_string();
        ctx.shared
            .borrow_mut()
            .committers
            .push(Box::new(move |upto| committer.borrow_mut().commit(upto).map_err(|e| format!("sink '{sink_name}': {e}"))));
        let mut aligner: EpochAligner<(), T> = EpochAligner::new(ctx.first_epoch);
        let name_owned = name.to_string();
        let (_, metrics) = ctx.vertex(name, Some(op), VertexKind::Sink, self.vertex.into_iter().collect());
        self.stream.probe_with(&ctx.probe).sink(Pipeline, name, move |(input, frontier)| {
            let t0 = Instant::now();
            let _busy = BusyGuard(&metrics, t0);
            let now = ctx.shared.borrow().latency_on.then(now_us);
            let mut w = writer.borrow_mut();
            let mut failed = None;
            input.for_each(|cap, data| {
                let t = *cap.least().expect("records carry a time");
                metrics.batch_in(&ctx.shared.borrow(), t, data.len(), now);
                let e = epoch_of(t);
                if e <= aligner.epoch() {
                    if let Err(err) = w.write(e, data) {
                        failed.get_or_insert(err);
                    }
                } else {
                    aligner.stash(e, (), std::mem::take(data));
                }
            });
            let fe = frontier.frontier().first().map(|t| epoch_of(*t));
            let last = ctx.shared.borrow().final_id;
            while let Some(ev) = aligner.next(fe, last) {
                match ev {
                    Aligned::Stashed((), mut data) => {
                        if let Err(err) = w.write(aligner.epoch(), &mut data) {
                            failed.get_or_insert(err);
                        }
                    }
                    Aligned::Close(e) => {
                        let barrier_us = barrier_us(&ctx, e);
                        let alignment_us = aligner.take_alignment_us();
                        let t0 = Instant::now();
                        match w.pre_commit(e) {
                            Ok(bytes) => {
                                let stats = SubtaskStats {
                                    barrier_us,
                                    alignment_us,
                                    sync_us: t0.elapsed().as_micros() as u64,
                                    bytes,
                                    ..Default::default()
                                };
                                let snapshot = SubtaskSnapshot {
                                    operator_name: name_owned.clone(),
                                    uid: ctx.uid_of(op),
                                    state_files: vec![],
                                    splits: vec![],
                                    stats,
                                };
                                ctx.shared.borrow_mut().outbox.push(AckMsg::Ack { id: e, task, snapshot });
                            }
                            Err(err) => {
                                ctx.shared.borrow_mut().outbox.push(AckMsg::Decline { id: e, task, reason: err.to_string() });
                                failed.get_or_insert(err);
                            }
                        }
                    }
                }
            }
            if let Some(err) = failed {
                ctx.shared.borrow_mut().set_fail(format!("sink '{name_owned}': {err}"));
            }
        });
    }
}

/// A source that has finished holds its capability at the last time of its epoch, until the
/// barrier: at the time of its last batch it would hold back the flow-control probe, and with it
/// the other source instances, whose later batches could then never be seen through.
fn finish_epoch(cap: &mut timely::dataflow::operators::Capability<Time>, epoch: u64) {
    cap.downgrade(&(epoch_start(epoch + 1) - 1));
}

/// Adds the time from its start to its drop to an operator's busy time.
struct BusyGuard<'a>(&'a OpMetrics, Instant);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.busy_since(self.1);
    }
}

fn barrier_us(ctx: &JobCtx, epoch: u64) -> u64 {
    let trig = ctx.shared.borrow().trigger_us.get(&epoch).copied();
    trig.map(|t| now_us().saturating_sub(t)).unwrap_or(0)
}

/// Make a file name part out of an operator or state name.
pub(crate) fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// What the batching operator hands its handler.
enum BatchEvent<'a, T, U> {
    /// A batch of records of epoch `e` (drain it), and the output buffer: start its work; its
    /// output (tagged with its epoch) may come now or at a later `Poll`.
    Batch(u64, &'a mut Vec<T>, &'a mut Vec<(u64, U)>),
    /// Emit finished work into `out`, tagged with its epoch, without waiting; set `oldest` to
    /// the oldest epoch with work still in flight.
    Poll { out: &'a mut Vec<(u64, U)>, oldest: &'a mut Option<u64> },
    /// Epoch `n` closed at this operator, after its last batch was handed over.
    Close(u64, u64),
}

/// What every keyed stateful operator starts with.
struct KeyedSetup<K> {
    task: TaskId,
    tables: StateTables<K>,
    file_prefix: String,
}

impl<'s, K: Key, T: Data> KeyedStream<'s, K, T> {
    /// Set the uid (Flink's `uid()`) of the next keyed operator on this stream (`process`,
    /// `reduce`, `sum`, `process_batches`): see [`DataStream::uid`].
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.to_string());
        self
    }

    /// Register a keyed stateful operator: its task id, its states (registered by `open`, then
    /// restored from the checkpoint being restored, key groups of this worker only).
    fn setup(&self, name: &str, open: impl FnOnce(&mut StateTables<K>)) -> KeyedSetup<K> {
        let ctx = &self.ctx;
        let op = ctx.register(self.uid.clone(), name, false);
        let mp = ctx.config.max_parallelism;
        let range = KeyGroupRange::for_operator(mp, ctx.peers as u32, ctx.index as u32);
        let file_prefix = format!("op{op}-{}", sanitize(name));
        let task = TaskId::new(op, ctx.index as u32);
        let c = &ctx.config.checkpoint;
        let uid = ctx.uid_of(op);
        let local = (c.local_backup || c.local_recovery).then(|| Arc::new(LocalBackup::new(c.local_dir.as_deref(), &ctx.job, &uid, ctx.index as u32)));
        let restore_local = local.clone().filter(|_| c.local_recovery);
        let mut reader = ctx.restore_storage.as_ref().map(|s| StateReader::new(s, restore_local.as_deref()));
        let (backend, native_restored) = match state_backend(ctx, op, name, reader.as_mut()) {
            Ok(b) => b,
            Err(e) => {
                ctx.fail_build(format!("operator '{name}': {e}"));
                (crate::state::Backend::Heap { track_changes: false }, None)
            }
        };
        let mut tables = StateTables::with_backend(range, mp, backend);
        tables.local = local.filter(|_| c.local_backup && ctx.storage.is_some());
        open(&mut tables);
        let started = Instant::now();
        if let (crate::state::Backend::Rocks(inst), Some(_)) = (&tables.backend, native_restored) {
            // A database restored as it was may hold states the operator no longer registers:
            // the same rule as for any restored state that nothing claims.
            let registered: Vec<&str> = tables.tables.iter().map(|t| t.name()).collect();
            for state in inst.db.states().unwrap_or_default().into_iter().filter(|s| !registered.contains(&s.as_str())) {
                if ctx.config.allow_non_restored_state {
                    tracing::warn!("operator '{name}': ignoring restored state '{state}' that the operator does not register (--allow-non-restored-state)");
                } else {
                    ctx.fail_build(format!("operator '{name}': checkpoint holds state '{state}' that the operator does not register (--allow-non-restored-state drops it)"));
                }
            }
        }
        if let Some(e) = tables.open_error.take() {
            ctx.fail_build(format!("operator '{name}': {e}"));
        } else if let Some(reader) = reader {
            match restore_tables(ctx, op, &mut tables, native_restored, reader) {
                Ok((local, remote)) if local + remote > 0 => tracing::info!(
                    "operator '{name}' subtask {}: restored {} entries in {} ms ({local} bytes from local copies, {remote} from checkpoint storage)",
                    ctx.index,
                    tables.entries(),
                    started.elapsed().as_millis()
                ),
                Ok(_) => {}
                Err(e) => ctx.fail_build(format!("operator '{name}': {e}")),
            }
        }
        if let Some(local) = &tables.local {
            let restored = ctx.restored_instance(op, ctx.index as u32).map(|s| s.state_files.iter().map(|f| f.path.clone()).collect::<Vec<_>>());
            local.start(&restored.unwrap_or_default());
        }
        KeyedSetup { task, tables, file_prefix }
    }

    /// The exchange that sends each record to the worker owning its key's key group.
    fn exchange(&self) -> impl timely::dataflow::channels::pact::ParallelizationContract<Time, Vec<T>> {
        let (peers, mp) = (self.ctx.peers as u32, self.ctx.config.max_parallelism);
        let key = self.key.clone();
        Exchange::new(move |x: &T| operator_for_key_group(mp, peers, key_group(&key(x), mp)) as u64)
    }

    /// Run a keyed process function over the stream.
    pub fn process<O: Data, P: KeyedProcessFunction<K, T, O>>(self, name: &str, mut func: P) -> DataStream<'s, O> {
        let ctx = self.ctx.clone();
        let KeyedSetup { task, mut tables, file_prefix } = self.setup(name, |t| func.open(t));
        let exchange = self.exchange();
        let key = self.key;
        let mut aligner: EpochAligner<timely::dataflow::operators::Capability<Time>, T> = EpochAligner::new(ctx.first_epoch);
        let mut out: Vec<O> = Vec::new();
        let name_owned = name.to_string();
        let (vertex, metrics) = ctx.vertex(name, Some(task.operator), VertexKind::Keyed, self.vertex.into_iter().collect());
        let stream = self.stream.unary_frontier::<CapacityContainerBuilder<Vec<O>>, _, _, _>(exchange, name, move |_, _| {
            move |(input, frontier), output| {
                let t0 = Instant::now();
                let _busy = BusyGuard(&metrics, t0);
                let now = ctx.shared.borrow().latency_on.then(now_us);
                let mut run = |data: &mut Vec<T>, tables: &mut StateTables<K>, out: &mut Vec<O>, epoch: u64| {
                    for x in data.drain(..) {
                        let k = key(&x);
                        let mut kc = KeyedContext { key: &k, tables, epoch };
                        func.process(&mut kc, x, out);
                    }
                };
                input.for_each(|cap, data| {
                    let t = *cap.least().expect("records carry a time");
                    metrics.batch_in(&ctx.shared.borrow(), t, data.len(), now);
                    let e = epoch_of(t);
                    if e <= aligner.epoch() {
                        run(data, &mut tables, &mut out, e);
                        if !out.is_empty() {
                            metrics.out(out.len());
                            output.session(&cap).give_container(&mut out);
                            out.clear();
                        }
                    } else {
                        let c = cap.retain_least(output.output_index()).expect("records carry a time");
                        aligner.stash(e, c, std::mem::take(data));
                    }
                });
                let fe = frontier.frontier().first().map(|t| epoch_of(*t));
                let last = ctx.shared.borrow().final_id;
                while let Some(ev) = aligner.next(fe, last) {
                    match ev {
                        Aligned::Stashed(cap, mut data) => {
                            run(&mut data, &mut tables, &mut out, aligner.epoch());
                            if !out.is_empty() {
                                metrics.out(out.len());
                                output.session(&cap).give_container(&mut out);
                                out.clear();
                            }
                        }
                        Aligned::Close(e) => {
                            let alignment = aligner.take_alignment_us();
                            snapshot_tables(&ctx, &mut tables, e, task, &name_owned, &file_prefix, None, Instant::now(), alignment)
                        }
                    }
                }
            }
        });
        DataStream { stream, ctx: self.ctx, uid: None, vertex: Some(vertex) }
    }

    /// Run a keyed batch function (for GPU operators): records are collected per key and handed
    /// over in batches of up to `weir.gpu.batch.max-records` (or after
    /// `weir.gpu.batch.max-latency`, or when the epoch closes), so one kernel launch serves many
    /// records and keys. At an epoch's close the host states are forked (copy-on-write) and the
    /// function's device-resident state is copied on the device after the epoch's kernels; the
    /// worker goes on with the next epoch at once, and the snapshot writer acknowledges the
    /// checkpoint when both are durable.
    pub fn process_batches<O: Data, P: KeyedBatchFunction<K, T, O>>(self, name: &str, mut func: P) -> DataStream<'s, O> {
        let ctx = self.ctx.clone();
        let KeyedSetup { task, mut tables, file_prefix } = self.setup(name, |t| func.open(t));
        let owner = format!("operator '{name}' ({}) subtask {}", ctx.uid_of(task.operator), ctx.index);
        if let Some(arena) = func.resident() {
            arena.attach(&ctx, task.operator, &owner, &file_prefix);
            if !ctx.build_failed() {
                if let Err(e) = arena.restore(&ctx, task.operator) {
                    ctx.fail_build(format!("operator '{name}': {e}"));
                }
            }
        }
        let exchange = self.exchange();
        let key = self.key;
        let mut groups: HashMap<K, Vec<T>> = HashMap::new();
        let mut ready: Vec<O> = Vec::new();
        // Output of batches a blocking snapshot waited for, emitted at the next poll (their
        // epochs' capabilities are held until then).
        let mut drained: Vec<(u64, O)> = Vec::new();
        let name_owned = name.to_string();
        DataStream { stream: self.stream, ctx: self.ctx, uid: None, vertex: self.vertex }.batched(exchange, name, Some(task.operator), move |ev: BatchEvent<'_, T, O>| match ev {
            BatchEvent::Batch(epoch, items, out) => {
                for x in items.drain(..) {
                    groups.entry(key(&x)).or_default().push(x);
                }
                for (k, batch) in groups.iter_mut().filter(|(_, b)| !b.is_empty()) {
                    func.process_batch(&mut KeyedContext { key: k, tables: &mut tables, epoch }, batch, &mut ready);
                    batch.clear();
                }
                func.flush(&mut tables, epoch);
                out.extend(ready.drain(..).map(|o| (epoch, o)));
            }
            BatchEvent::Poll { out, oldest } => {
                out.append(&mut drained);
                *oldest = func.poll(&mut tables, out);
            }
            BatchEvent::Close(e, alignment) => {
                groups.clear();
                let started = Instant::now();
                // The naive baseline (`weir.gpu.state.snapshot-mode: blocking`) first waits for
                // every batch in flight; its snapshot then reads the whole state back here.
                if ctx.storage.is_some() && ctx.config.gpu_state_blocking_snapshots && func.resident().is_some() {
                    while func.poll(&mut tables, &mut drained).is_some() {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
                // Checkpointing off: nothing is persisted, and the device state is not copied.
                // A savepoint (the final checkpoint with --savepoint-on-stop) is full and self-contained.
                let savepoint = ctx.shared.borrow().is_savepoint(e);
                let resident = match (ctx.storage.is_some(), func.resident()) {
                    (true, Some(arena)) => Some(arena.snapshot(e, savepoint)),
                    _ => None,
                };
                snapshot_tables(&ctx, &mut tables, e, task, &name_owned, &file_prefix, resident, started, alignment);
            }
        })
    }

    /// Flink's `reduce`: combine each record with its key's running value; emit the new value.
    pub fn reduce(self, f: impl Fn(&T, &T) -> T + 'static) -> DataStream<'s, T>
    where
        T: Sync,
    {
        struct Reduce<F, T> {
            f: F,
            state: Option<ValueState<T>>,
        }
        impl<K: Key, T: Data + Sync, F: Fn(&T, &T) -> T + 'static> KeyedProcessFunction<K, T, T> for Reduce<F, T> {
            fn open(&mut self, states: &mut StateTables<K>) {
                self.state = Some(states.value_state("reduce"));
            }
            fn process(&mut self, ctx: &mut KeyedContext<'_, K>, value: T, out: &mut Vec<T>) {
                let s = self.state.as_ref().expect("opened");
                let next = match s.get(ctx) {
                    Some(acc) => (self.f)(acc, &value),
                    None => value,
                };
                out.push(next.clone());
                s.set(ctx, next);
            }
        }
        self.process("reduce", Reduce { f, state: None })
    }

    /// Running sum of `f(record)` per key; emits `(key, sum)` on every update.
    pub fn sum<N>(self, f: impl Fn(&T) -> N + 'static) -> DataStream<'s, (K, N)>
    where
        N: Data + Sync + Copy + Default + std::ops::Add<Output = N>,
    {
        struct Sum<F, N> {
            f: F,
            state: Option<ValueState<N>>,
        }
        impl<K: Key, T: Data, N, F> KeyedProcessFunction<K, T, (K, N)> for Sum<F, N>
        where
            N: Data + Sync + Copy + Default + std::ops::Add<Output = N>,
            F: Fn(&T) -> N + 'static,
        {
            fn open(&mut self, states: &mut StateTables<K>) {
                self.state = Some(states.value_state("sum"));
            }
            fn process(&mut self, ctx: &mut KeyedContext<'_, K>, value: T, out: &mut Vec<(K, N)>) {
                let add = (self.f)(&value);
                let s = self.state.as_ref().expect("opened");
                let acc = s.get_or_insert_with(ctx, N::default);
                *acc = *acc + add;
                let v = *acc;
                out.push((ctx.key().clone(), v));
            }
        }
        self.process("sum", Sum { f, state: None })
    }
}

/// The synchronous part of a keyed snapshot (freeze the copy-on-write maps), then the
/// asynchronous part on the snapshot pool: serialise, write, ack. `started`: when the worker's
/// pause for this barrier began (before a device-state snapshot it took), so `sync_us` holds all of it.
#[allow(clippy::too_many_arguments)]
fn snapshot_tables<K: Key>(
    ctx: &Rc<JobCtx>,
    tables: &mut StateTables<K>,
    epoch: u64,
    task: TaskId,
    name: &str,
    prefix: &str,
    resident: Option<Result<crate::ops::resident::ResidentJob, String>>,
    started: Instant,
    alignment_us: u64,
) {
    let t0 = started;
    // A state backend error (RocksDB could not read or write) fails the job, checkpoints or
    // not: declining the checkpoint would let the job go on without the lost writes.
    if let Err(e) = tables.flush() {
        ctx.shared.borrow_mut().set_fail(format!("operator '{name}' subtask {}: {e}", task.subtask));
        return;
    }
    let barrier_us = barrier_us(ctx, epoch).saturating_sub(t0.elapsed().as_micros() as u64);
    let uid = ctx.uid_of(task.operator);
    let Some(storage) = ctx.storage.clone() else {
        // Checkpointing off: only the final barrier passes, and nothing is persisted.
        let snapshot = SubtaskSnapshot {
            operator_name: name.to_string(),
            uid,
            state_files: vec![],
            splits: vec![],
            stats: SubtaskStats { barrier_us, alignment_us, ..Default::default() },
        };
        ctx.shared.borrow_mut().outbox.push(AckMsg::Ack { id: epoch, task, snapshot });
        return;
    };
    let c = &ctx.config.checkpoint;
    let spec = SnapshotSpec {
        epoch,
        prefix: prefix.to_string(),
        subtask: task.subtask,
        incremental: c.incremental,
        max_delta_share: c.max_delta_share,
        local: tables.local.clone(),
        savepoint: ctx.shared.borrow().is_savepoint(epoch),
    };
    let jobs = match tables.snapshot(spec) {
        Ok(job) => job,
        Err(reason) => {
            ctx.shared.borrow_mut().outbox.push(AckMsg::Decline { id: epoch, task, reason });
            return;
        }
    };
    let entries = tables.entries() as u64;
    let sync_us = t0.elapsed().as_micros() as u64;
    let resident = match resident.transpose() {
        Ok(r) => r,
        Err(reason) => {
            ctx.shared.borrow_mut().outbox.push(AckMsg::Decline { id: epoch, task, reason });
            return;
        }
    };
    let tx = ctx.ack_tx.clone();
    let name = name.to_string();
    ctx.executor.submit(move || {
        // A panic while writing declines the checkpoint at once instead of leaving it to time out.
        let decline = tx.clone();
        let wrote = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || write_snapshot_files(storage, jobs, resident, tx, epoch, task, name, uid, (barrier_us, alignment_us), sync_us, entries)));
        if let Err(panic) = wrote {
            let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            let _ = decline.send(AckMsg::Decline { id: epoch, task, reason: format!("writing the snapshot panicked: {what}") });
        }
    });
}

/// The asynchronous part of a keyed snapshot: write the host states' files, then the
/// device-resident state's, then ack (or decline) the checkpoint.
fn write_snapshot_files(
    storage: weir_storage::CheckpointStorage,
    job: TablesJob,
    resident: Option<crate::ops::resident::ResidentJob>,
    tx: std::sync::mpsc::Sender<AckMsg>,
    epoch: u64,
    task: TaskId,
    name: String,
    uid: String,
    (barrier_us, alignment_us): (u64, u64),
    sync_us: u64,
    entries: u64,
) {
    let t1 = Instant::now();
    let (mut files, mut bytes) = match job(&storage) {
        Ok(w) => (w.files, w.bytes),
        Err(reason) => {
            let _ = tx.send(AckMsg::Decline { id: epoch, task, reason });
            return;
        }
    };
    let mut entries = entries;
    if let Some(job) = resident {
        match job.run(&storage) {
            Ok(w) => {
                bytes += w.bytes;
                entries += w.entries;
                files.extend(w.files);
            }
            Err(reason) => {
                let _ = tx.send(AckMsg::Decline { id: epoch, task, reason });
                return;
            }
        }
    }
    let stats = SubtaskStats { barrier_us, alignment_us, sync_us, async_us: t1.elapsed().as_micros() as u64, bytes, state_entries: entries };
    let snapshot = SubtaskSnapshot { operator_name: name, uid, state_files: files, splits: vec![], stats };
    let _ = tx.send(AckMsg::Ack { id: epoch, task, snapshot });
}

/// The backend of a keyed operator instance (`state.backend.type`): heap maps, or a RocksDB of
/// its own, opened from the restored checkpoint's RocksDB files when they are this very
/// instance's (same parallelism). Returns the subtask whose RocksDB checkpoint became the database.
fn state_backend(ctx: &JobCtx, op: u32, name: &str, reader: Option<&mut StateReader<'_>>) -> Result<(crate::state::Backend, Option<u32>), String> {
    use crate::state::Backend;
    let incremental = ctx.storage.is_some() && ctx.config.checkpoint.incremental;
    match ctx.config.state_backend {
        crate::StateBackendKind::Heap => Ok((Backend::Heap { track_changes: incremental }, None)),
        crate::StateBackendKind::RocksDb => {
            let owner = format!("operator '{name}' subtask {}", ctx.index);
            let mine = ctx.restored_instance(op, ctx.index as u32);
            let restore = reader.zip(mine);
            let same_dir = ctx.restore_storage.as_ref().zip(ctx.storage.as_ref()).is_some_and(|(r, s)| r.location() == s.location());
            let dir = format!("op{op}-{}", ctx.index);
            let (inst, restored) = crate::state::rocks::RocksInstance::open(ctx.config.rocksdb_dir.as_deref(), &dir, &owner, ctx.index as u32, restore, same_dir)?;
            Ok((Backend::Rocks(inst), restored.then_some(ctx.index as u32)))
        }
    }
}

/// Load this instance's key groups of operator `op` from every file of the restored checkpoint
/// (reading only the blocks of its key groups).
fn restore_tables<K: Key>(ctx: &JobCtx, op: u32, tables: &mut StateTables<K>, native_restored: Option<u32>, reader: StateReader<'_>) -> Result<(u64, u64), String> {
    let Some(m) = &ctx.restored else { return Ok((0, 0)) };
    if m.max_parallelism != ctx.config.max_parallelism {
        return Err(format!(
            "checkpoint {} has pipeline.max-parallelism {}, the job {}: key groups cannot be remapped",
            m.id, m.max_parallelism, ctx.config.max_parallelism
        ));
    }
    let scratch = ctx.config.rocksdb_dir.as_ref().map(std::path::PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("weir-rocksdb"));
    let scratch = scratch.join(format!("restore-{}-{}-op{op}", std::process::id(), ctx.index));
    let mut src = RestoreSource { reader, parallelism: m.parallelism, native_restored, scratch };
    let r = tables.restore(&mut src, ctx.restored_tasks(op));
    let _ = std::fs::remove_dir_all(&src.scratch);
    r.map(|()| (src.reader.read_local, src.reader.read_remote))
}
