//! The transfer engine and the device's submission queue.
//!
//! A batch takes one *slot* of a ring shared by every operator and worker of the process. A slot
//! owns a host-mapped upload buffer and a mappable download buffer. Submitting a batch writes
//! its inputs straight into the mapped upload buffer, records copy → compute → copy-back in one
//! command buffer, submits it, and returns a [`Pending`] at once: the caller packs batch k+1
//! into the next slot while batch k computes and batch k−1's results are read back. The upload
//! buffer is re-mapped and the download mapped by the driver when the submission completes
//! (`map_buffer_on_submit`); whichever thread polls next copies the result out and frees the
//! slot and its pool blocks, so a slot is never held by a result nobody has collected yet.
//!
//! Two paths, reported per adapter:
//! - **staged** (discrete GPUs): inputs go host → upload buffer → pooled device-local blocks;
//!   the output block is copied to the download buffer.
//! - **direct** (host-visible device memory: integrated GPUs, lavapipe, resizable BAR, with
//!   wgpu's `MAPPABLE_PRIMARY_BUFFERS`): kernels bind the mapped upload regions and write their
//!   output straight into the download buffer; no staging copy either way.
//!
//! Fair order: slots are granted first-come-first-served by ticket, so contending workers and
//! operators alternate; each operator bounds its own batches in flight
//! (`weir.gpu.max-inflight-batches`), so none can fill the ring alone. A caller that fails or
//! panics before its turn hands it on (its ticket is skipped), and one that fails or panics
//! holding a slot gives the slot and its pool blocks back.
//!
//! Staging buffers of both paths count against the pool's budget; a slot's buffers follow the
//! recent batches' needs (they grow with a batch and shrink back after a huge one). A batch
//! beyond the device's limits (a binding over `max_storage_buffer_binding_size`, a dispatch over
//! `max_compute_workgroups_per_dimension`) is refused with a typed error before anything is
//! recorded, and a device error in a submission (validation, out of memory) is caught by an
//! error scope and becomes that batch's error, never wgpu's panic.
//!
//! **Lock order**: the ring (`Engine::ring`) before the pool (`GpuContext::pool`). Code holding
//! the pool never takes the ring (`alloc_blocks` drops the pool before it looks at the ring;
//! `GpuKernels::buffer_creations` reads the ring's stats before it locks the pool); `harvest`,
//! `fit`, `trim_idle`, slot recovery and a dropped lease take the pool under the ring. A
//! batch's result conversion runs under the ring and must not touch the engine.

use std::collections::{BTreeSet, VecDeque};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::device::GpuContext;
use crate::pool::{Block, DevicePool, MIN_BLOCK};
use crate::GpuError;

/// `weir.gpu.transfer.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferMode {
    /// Direct where the adapter has host-visible device memory, else staged.
    Auto,
    /// Always through staging buffers.
    Staged,
    /// Kernels bind host-mapped memory (refused at start on an adapter without it).
    Direct,
}

/// A binding of a batch, in binding order.
pub(crate) enum Bind<'a> {
    /// Uploaded input.
    In(&'a [u8]),
    /// Zeroed output (or scratch) of this many bytes.
    Out(u64),
    #[allow(dead_code)] // used by the GPU state store
    /// Device-resident memory bound in place (`len` bytes at `offset`, aligned to 256): operator
    /// state that kernels read and update where it lives. Neither uploaded, cleared nor read back.
    Resident(&'a wgpu::Buffer, u64, u64),
}

/// Counters of the engine (cumulative).
#[derive(Clone, Copy, Debug, Default)]
pub struct TransferStats {
    /// Batches submitted (one submission each).
    pub batches: u64,
    /// Bytes written into upload buffers.
    pub bytes_up: u64,
    /// Bytes read back.
    pub bytes_down: u64,
    /// Staging buffers created (while the ring warms up, and when batches grow or shrink a lot).
    pub staging_creations: u64,
    /// Host time spent writing inputs into mapped memory.
    pub pack: Duration,
    /// Host time spent reading results out of mapped memory.
    pub unpack: Duration,
    /// Most batches in flight at once.
    pub max_in_flight: usize,
    /// Times a submitter waited for a free slot.
    pub slot_waits: u64,
    /// Staging buffers replaced after a failed mapping (their slot recovered).
    pub slot_recoveries: u64,
}

/// Receives a batch's mapped output bytes.
trait Deliver: Send + Sync {
    fn deliver(&self, bytes: Result<&[u8], GpuError>);
}

type Finish<T> = Box<dyn FnOnce(&[u8]) -> Result<T, GpuError> + Send>;

/// Where a GPU batch's result lands: the conversion runs on the mapped bytes, once.
struct Cell<T> {
    /// The conversion, the result, and the host time spent reading the output out of mapped
    /// memory and converting it (the batch's download side, for [`Pending::transfer_time`]).
    inner: Mutex<(Option<Finish<T>>, Option<Result<T, GpuError>>, Duration)>,
}

impl<T: Send> Deliver for Cell<T> {
    fn deliver(&self, bytes: Result<&[u8], GpuError>) {
        let t = Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let result = match (g.0.take(), bytes) {
            // A conversion that panics fails its own batch; it runs while harvesting holds the
            // ring, and must not unwind through the engine's bookkeeping.
            (Some(f), Ok(b)) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(b)))
                .unwrap_or_else(|_| Err(GpuError::Device("converting a batch's result panicked".into()))),
            (_, Err(e)) => Err(e),
            (None, Ok(_)) => return,
        };
        g.1 = Some(result);
        g.2 = t.elapsed();
    }
}

trait PollResult<T> {
    /// The result once done; `block` waits for it.
    fn poll(&mut self, block: bool) -> Option<Result<T, GpuError>>;

    /// Host time spent packing the inputs into and reading the output out of mapped memory,
    /// so far (zero on the CPU path).
    fn transfer(&self) -> Duration {
        Duration::ZERO
    }
}

/// A kernel result that may still be computing. On the CPU path it is ready at once; on the
/// GPU path [`Pending::poll`] without `block` never blocks and [`Pending::wait`] blocks until the
/// batch's submission completes.
pub struct Pending<T>(Box<dyn PollResult<T>>);

struct Ready<T>(Option<Result<T, GpuError>>);

impl<T> PollResult<T> for Ready<T> {
    fn poll(&mut self, _block: bool) -> Option<Result<T, GpuError>> {
        Some(self.0.take().unwrap_or_else(|| Err(GpuError::Device("result already taken".into()))))
    }
}

struct Mapped<T, F> {
    inner: Pending<T>,
    f: Option<F>,
}

impl<T, U, F: FnOnce(T) -> U> PollResult<U> for Mapped<T, F> {
    fn poll(&mut self, block: bool) -> Option<Result<U, GpuError>> {
        let r = self.inner.0.poll(block)?;
        let f = self.f.take()?;
        Some(r.map(f))
    }

    fn transfer(&self) -> Duration {
        self.inner.0.transfer()
    }
}

/// A result whose arrival is reported once to `f`, with the batch's host transfer time.
struct Observed<T, F> {
    inner: Pending<T>,
    f: Option<F>,
}

impl<T, F: FnOnce(Duration)> PollResult<T> for Observed<T, F> {
    fn poll(&mut self, block: bool) -> Option<Result<T, GpuError>> {
        let r = self.inner.0.poll(block)?;
        if let Some(f) = self.f.take() {
            f(self.inner.0.transfer());
        }
        Some(r)
    }

    fn transfer(&self) -> Duration {
        self.inner.0.transfer()
    }
}

struct All<T> {
    parts: Vec<Pending<T>>,
    done: Vec<T>,
    /// Transfer time of the parts once they are gone.
    spent: Duration,
}

impl<T: 'static> PollResult<Vec<T>> for All<T> {
    fn poll(&mut self, block: bool) -> Option<Result<Vec<T>, GpuError>> {
        while self.done.len() < self.parts.len() {
            match self.parts[self.done.len()].0.poll(block)? {
                Ok(v) => self.done.push(v),
                Err(e) => return Some(Err(e)),
            }
        }
        self.spent += self.parts.iter().map(|p| p.0.transfer()).sum::<Duration>();
        self.parts.clear();
        Some(Ok(std::mem::take(&mut self.done)))
    }

    fn transfer(&self) -> Duration {
        self.spent + self.parts.iter().map(|p| p.0.transfer()).sum::<Duration>()
    }
}

struct OnGpu<T> {
    cell: Arc<Cell<T>>,
    engine: Arc<Engine>,
    index: wgpu::SubmissionIndex,
    /// Host time spent packing the inputs into mapped memory.
    pack: Duration,
}

impl<T: Send> PollResult<T> for OnGpu<T> {
    fn poll(&mut self, block: bool) -> Option<Result<T, GpuError>> {
        loop {
            if let Some(r) = self.cell.inner.lock().unwrap_or_else(|p| p.into_inner()).1.take() {
                return Some(r);
            }
            if let Err(e) = self.engine.progress() {
                return Some(Err(e));
            }
            if let Some(r) = self.cell.inner.lock().unwrap_or_else(|p| p.into_inner()).1.take() {
                return Some(r);
            }
            if !block {
                return None;
            }
            if let Err(e) = self.engine.wait_for(&self.index) {
                return Some(Err(e));
            }
        }
    }

    fn transfer(&self) -> Duration {
        self.pack + self.cell.inner.lock().unwrap_or_else(|p| p.into_inner()).2
    }
}

impl<T: 'static> Pending<T> {
    /// A result that is already there (the CPU path, or an error found before submitting).
    pub fn ready(r: Result<T, GpuError>) -> Self {
        Pending(Box::new(Ready(Some(r))))
    }

    /// The result if the batch is done (with `block`, once it is); `None` while it runs.
    /// Take it once.
    pub fn poll(&mut self, block: bool) -> Option<Result<T, GpuError>> {
        self.0.poll(block)
    }

    /// Block until the result is there.
    pub fn wait(mut self) -> Result<T, GpuError> {
        self.0.poll(true).unwrap_or_else(|| Err(GpuError::Device("no result".into())))
    }

    /// All of `parts`, in order (the first error wins).
    pub fn all(parts: Vec<Pending<T>>) -> Pending<Vec<T>> {
        let done = Vec::with_capacity(parts.len());
        Pending(Box::new(All { parts, done, spent: Duration::ZERO }))
    }

    /// Transform the result when it arrives (on the caller's thread).
    pub fn map<U: 'static>(self, f: impl FnOnce(T) -> U + 'static) -> Pending<U> {
        Pending(Box::new(Mapped { inner: self, f: Some(f) }))
    }

    /// Call `f` once, on the thread that polls, when the result is first there (ok or not),
    /// with [`Pending::transfer_time`] then: the monitor's per-operator device and transfer
    /// times. The result is unchanged.
    pub fn on_ready(self, f: impl FnOnce(Duration) + 'static) -> Pending<T> {
        Pending(Box::new(Observed { inner: self, f: Some(f) }))
    }

    /// Host time this batch spent packing its inputs into mapped (staging or host-visible
    /// device) memory and reading its output back out, so far; zero on the CPU path. Device-side
    /// copies of the staged path are not in it (they run in the batch's submission).
    pub fn transfer_time(&self) -> Duration {
        self.0.transfer()
    }
}

/// States of a slot's upload mapping.
const MAP_PENDING: u8 = 0;
const MAPPED: u8 = 1;
/// The re-map failed (or was never requested after an unmap): the buffer is replaced before
/// the slot takes another batch.
const MAP_FAILED: u8 = 2;

/// Batches whose staging needs a slot's buffers are sized for: a buffer more than
/// `SHRINK_FACTOR` times the largest need of the last `RECENT` batches is given back.
const RECENT: usize = 16;
const SHRINK_FACTOR: u64 = 4;

struct Slot {
    upload: Option<wgpu::Buffer>,
    download: Option<wgpu::Buffer>,
    free: bool,
    /// The upload buffer's mapping: `MAPPED` after creation or once re-mapped after its batch.
    upload_state: Arc<AtomicU8>,
}

impl Slot {
    fn held(&self) -> u64 {
        [&self.upload, &self.download].into_iter().flatten().map(|b| b.size()).sum()
    }
}

struct InFlight {
    slot: usize,
    index: wgpu::SubmissionIndex,
    read_len: u64,
    /// 0 running, 1 output mapped, 2 mapping failed.
    state: Arc<AtomicU8>,
    blocks: Vec<Block>,
    sink: Arc<dyn Deliver>,
    /// The result was delivered at submission (a device error): harvesting only frees the slot.
    delivered: bool,
}

struct Ring {
    slots: Vec<Slot>,
    next_ticket: u64,
    serving: u64,
    /// Tickets whose holders gave up before being served: skipped when their turn comes.
    abandoned: BTreeSet<u64>,
    in_flight: VecDeque<InFlight>,
    /// (upload, download) bytes of the last `RECENT` batches.
    recent: VecDeque<(u64, u64)>,
    stats: TransferStats,
}

impl Ring {
    /// The next ticket's turn (past those abandoned).
    fn advance(&mut self) {
        self.serving += 1;
        while self.abandoned.remove(&self.serving) {
            self.serving += 1;
        }
    }
}

/// The device limits a batch must respect (from the device; smaller in tests).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Largest storage binding, bytes.
    pub(crate) max_binding: u64,
    /// Most workgroups of a dispatch per dimension.
    pub(crate) max_groups: u32,
}

impl Limits {
    fn of(device: &wgpu::Device) -> Self {
        let l = device.limits();
        Limits { max_binding: l.max_storage_buffer_binding_size, max_groups: l.max_compute_workgroups_per_dimension }
    }
}

/// Failures injected by tests at the points the engine must survive.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Faults {
    /// Harvests to fail (as a device poll error would).
    pub(crate) fail_harvest: std::sync::atomic::AtomicU32,
    /// Panic once after packing a batch, before submitting it.
    pub(crate) panic_after_pack: AtomicBool,
}

/// The ring of staging slots and the submission queue of one device (shared by every
/// [`GpuKernels`](crate::kernels::gpu::GpuKernels) on it with the same path).
pub(crate) struct Engine {
    ctx: Arc<GpuContext>,
    direct: bool,
    limits: Limits,
    ring: Mutex<Ring>,
    freed: Condvar,
    /// Bench only: submit the copies but not the kernels (to measure transfer time).
    pub(crate) skip_compute: AtomicBool,
    #[cfg(test)]
    pub(crate) faults: Faults,
}

/// Storage-binding offsets are aligned to this (≥ every adapter's
/// `min_storage_buffer_offset_alignment`).
const ALIGN: u64 = MIN_BLOCK;

/// `weir.gpu.transfer.mode: direct` on an adapter without host-visible device memory.
pub(crate) fn direct_refused(a: &crate::AdapterDesc) -> GpuError {
    GpuError::Config {
        key: "weir.gpu.transfer.mode".into(),
        message: format!("'direct' needs host-visible device memory; {} ({}) has none: use auto or staged", a.name, a.device_type),
    }
}

fn dev_err(e: impl std::fmt::Display) -> GpuError {
    GpuError::Device(e.to_string())
}

/// A place in the slots' queue. Dropped before it is served (an error or a panic of its
/// holder), it hands the turn on, so no later caller waits for it.
struct Ticket<'a> {
    engine: &'a Engine,
    number: u64,
    served: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.served {
            return;
        }
        let mut ring = self.engine.lock();
        if ring.serving == self.number {
            ring.advance();
        } else {
            ring.abandoned.insert(self.number);
        }
        drop(ring);
        self.engine.freed.notify_all();
    }
}

/// A slot and its pool blocks, held from `acquire` until the batch is in flight. Dropped before
/// that (an error or a panic), it gives both back; a slot whose upload buffer was already
/// unmapped gets a fresh one (no re-map will come for it).
struct Lease<'a> {
    engine: &'a Engine,
    slot: usize,
    blocks: Vec<Option<Block>>,
    unmapped: bool,
    armed: bool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut ring = self.engine.lock();
        let s = &mut ring.slots[self.slot];
        s.free = true;
        if self.unmapped {
            s.upload_state.store(MAP_FAILED, Ordering::Release);
        }
        let mut pool = self.engine.pool();
        for b in self.blocks.drain(..).flatten() {
            pool.free(b);
        }
        drop(pool);
        drop(ring);
        self.engine.freed.notify_all();
    }
}

impl Engine {
    pub(crate) fn new(ctx: Arc<GpuContext>, mode: TransferMode, slots: usize) -> Result<Arc<Self>, GpuError> {
        let limits = Limits::of(&ctx.device);
        Self::with_limits(ctx, mode, slots, limits)
    }

    /// An engine that keeps batches within `limits` (tests use limits smaller than the
    /// device's, to exercise splitting cheaply).
    pub(crate) fn with_limits(ctx: Arc<GpuContext>, mode: TransferMode, slots: usize, limits: Limits) -> Result<Arc<Self>, GpuError> {
        let direct = match mode {
            TransferMode::Staged => false,
            TransferMode::Auto => ctx.direct_capable,
            TransferMode::Direct if ctx.direct_capable => true,
            TransferMode::Direct => return Err(direct_refused(&ctx.adapter)),
        };
        let slots = (0..slots.max(1)).map(|_| Slot { upload: None, download: None, free: true, upload_state: Arc::new(AtomicU8::new(MAPPED)) }).collect();
        let ring = Ring {
            slots,
            next_ticket: 0,
            serving: 0,
            abandoned: BTreeSet::new(),
            in_flight: VecDeque::new(),
            recent: VecDeque::with_capacity(RECENT),
            stats: TransferStats::default(),
        };
        Ok(Arc::new(Engine {
            ctx,
            direct,
            limits,
            ring: Mutex::new(ring),
            freed: Condvar::new(),
            skip_compute: AtomicBool::new(false),
            #[cfg(test)]
            faults: Faults::default(),
        }))
    }

    pub(crate) fn direct(&self) -> bool {
        self.direct
    }

    /// The limits batches are kept within.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    pub(crate) fn slots(&self) -> usize {
        self.lock().slots.len()
    }

    pub(crate) fn stats(&self) -> TransferStats {
        self.lock().stats
    }

    /// The counters and the batches in flight now, under one lock.
    pub(crate) fn stats_and_in_flight(&self) -> (TransferStats, usize) {
        let ring = self.lock();
        (ring.stats, ring.in_flight.len())
    }

    /// The ring (taken before the pool, never while holding it).
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pool (taken after the ring, or alone).
    fn pool(&self) -> MutexGuard<'_, DevicePool> {
        self.ctx.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drive the device's callbacks without blocking and deliver every finished batch.
    pub(crate) fn progress(&self) -> Result<(), GpuError> {
        let mut ring = self.lock();
        self.harvest(&mut ring)
    }

    /// Block until submission `index` has completed, then deliver what finished.
    fn wait_for(&self, index: &wgpu::SubmissionIndex) -> Result<(), GpuError> {
        self.ctx.device.poll(wgpu::PollType::Wait { submission_index: Some(index.clone()), timeout: None }).map_err(dev_err)?;
        self.progress()
    }

    fn harvest(&self, ring: &mut Ring) -> Result<(), GpuError> {
        #[cfg(test)]
        if self.faults.fail_harvest.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(GpuError::Device("injected failure of a device poll".into()));
        }
        self.ctx.device.poll(wgpu::PollType::Poll).map_err(dev_err)?;
        if ring.in_flight.iter().all(|f| f.state.load(Ordering::Acquire) == 0) {
            return Ok(());
        }
        let mut pool = self.pool();
        let mut i = 0;
        while i < ring.in_flight.len() {
            let st = ring.in_flight[i].state.load(Ordering::Acquire);
            if st == 0 {
                i += 1;
                continue;
            }
            let Some(f) = ring.in_flight.remove(i) else { break };
            let slot = &mut ring.slots[f.slot];
            let t = Instant::now();
            match (st, slot.download.as_ref()) {
                (1, Some(dl)) => {
                    if !f.delivered {
                        match dl.slice(0..f.read_len).get_mapped_range() {
                            Ok(view) => f.sink.deliver(Ok(&view)),
                            Err(e) => f.sink.deliver(Err(dev_err(e))),
                        }
                    }
                    dl.unmap();
                }
                _ => {
                    if !f.delivered {
                        f.sink.deliver(Err(GpuError::Device("mapping a batch's output failed (device lost?)".into())));
                    }
                    // A download buffer whose mapping failed is not trusted again: the slot's
                    // next batch creates a fresh one.
                    if let Some(dl) = slot.download.take() {
                        pool.release_external(dl.size());
                        ring.stats.slot_recoveries += 1;
                    }
                }
            }
            ring.slots[f.slot].free = true;
            ring.stats.unpack += t.elapsed();
            ring.stats.bytes_down += f.read_len;
            for b in f.blocks {
                pool.free(b);
            }
        }
        drop(pool);
        self.freed.notify_all();
        Ok(())
    }

    /// Free slots whose upload buffer's re-map failed give it back; the slot's next batch
    /// creates a fresh, mapped one.
    fn recover_failed_slots(&self, ring: &mut Ring) {
        let Ring { slots, stats, .. } = ring;
        for s in slots.iter_mut().filter(|s| s.free && s.upload_state.load(Ordering::Acquire) == MAP_FAILED) {
            if let Some(up) = s.upload.take() {
                self.pool().release_external(up.size());
            }
            s.upload_state = Arc::new(AtomicU8::new(MAPPED));
            stats.slot_recoveries += 1;
        }
    }

    /// Take a slot, first come first served.
    fn acquire(&self) -> Result<usize, GpuError> {
        let number = {
            let mut ring = self.lock();
            ring.next_ticket += 1;
            ring.next_ticket - 1
        };
        let mut ticket = Ticket { engine: self, number, served: false };
        // Every exit of `serve` before being served (an error, a panic) drops the ticket
        // unserved, which hands the turn on.
        self.serve(&mut ticket)
    }

    fn serve(&self, ticket: &mut Ticket<'_>) -> Result<usize, GpuError> {
        let mut ring = self.lock();
        let mut waited = false;
        loop {
            if ring.serving == ticket.number {
                self.harvest(&mut ring)?;
                self.recover_failed_slots(&mut ring);
                if let Some(i) = ring.slots.iter().position(|s| s.free && s.upload_state.load(Ordering::Acquire) == MAPPED) {
                    ring.slots[i].free = false;
                    ring.advance();
                    ticket.served = true;
                    ring.stats.slot_waits += waited as u64;
                    drop(ring);
                    self.freed.notify_all();
                    return Ok(i);
                }
                waited = true;
                // At the head of the queue: drive the oldest batch to completion. (Never a
                // timed wait: wgpu-core 30 asserts when a timed-out wait races another thread's
                // poll that empties the queue.)
                match ring.in_flight.front().map(|f| f.index.clone()) {
                    Some(idx) => {
                        drop(ring);
                        self.ctx.device.poll(wgpu::PollType::Wait { submission_index: Some(idx), timeout: None }).map_err(dev_err)?;
                        ring = self.lock();
                    }
                    // Slots are being packed by other threads, or re-mapping: look again when
                    // one is released, or shortly (harvest polls the device).
                    None => ring = self.freed.wait_timeout(ring, Duration::from_micros(200)).unwrap_or_else(|p| p.into_inner()).0,
                }
            } else {
                waited = true;
                ring = self.freed.wait_timeout(ring, Duration::from_millis(5)).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
    }

    /// Give back the staging buffers of idle slots (all but `keep`): called when the budget is
    /// full. Returns the bytes given back.
    fn trim_idle(&self, ring: &mut Ring, keep: usize) -> u64 {
        let mut freed = 0;
        for (i, s) in ring.slots.iter_mut().enumerate() {
            if i != keep && s.free {
                freed += s.held();
                s.upload = None;
                s.download = None;
                s.upload_state = Arc::new(AtomicU8::new(MAPPED));
            }
        }
        if freed > 0 {
            self.pool().release_external(freed);
        }
        freed
    }

    /// Pool blocks for `lens`, waiting for batches in flight to finish (or giving back idle
    /// staging buffers) while the budget is full.
    fn alloc_blocks(&self, lens: &[Option<u64>], slot: usize) -> Result<Vec<Option<Block>>, GpuError> {
        loop {
            let mut pool = self.pool();
            let mut got: Vec<Option<Block>> = Vec::with_capacity(lens.len());
            let mut err = None;
            for len in lens {
                match len.map(|l| pool.alloc(Some(&self.ctx.device), l)).transpose() {
                    Ok(b) => got.push(b),
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            let Some(e) = err else { return Ok(got) };
            for b in got.into_iter().flatten() {
                pool.free(b);
            }
            drop(pool);
            if !matches!(e, GpuError::OutOfMemory { .. }) {
                return Err(e);
            }
            let mut ring = self.lock();
            if self.trim_idle(&mut ring, slot) > 0 {
                continue;
            }
            let oldest = ring.in_flight.front().map(|f| f.index.clone());
            drop(ring);
            match oldest {
                Some(idx) => self.wait_for(&idx)?,
                None => return Err(e),
            }
        }
    }

    /// The slot's upload and download buffers, fitted to `up` and `down` bytes. A slot that
    /// grows grows every free slot with it where the budget allows (batches of a job are alike),
    /// so the ring is warm after the first batch of a size; a buffer far larger than the recent
    /// batches need is given back (one huge batch does not pin memory for ever). Both paths'
    /// staging buffers count against the budget.
    fn slot_buffers(&self, slot: usize, up: u64, down: u64) -> Result<(wgpu::Buffer, wgpu::Buffer, Arc<AtomicU8>), GpuError> {
        let mut ring = self.lock();
        if ring.recent.len() == RECENT {
            ring.recent.pop_front();
        }
        ring.recent.push_back((up, down));
        let keep = ring.recent.iter().fold((0, 0), |(u, d), &(a, b)| (u.max(a), d.max(b)));
        let grew = match self.fit(&mut ring, slot, (up, down), keep) {
            Ok(grew) => grew,
            Err(GpuError::OutOfMemory { .. }) if self.trim_idle(&mut ring, slot) > 0 => self.fit(&mut ring, slot, (up, down), keep)?,
            Err(e) => return Err(e),
        };
        for i in 0..ring.slots.len() {
            if i != slot && ring.slots[i].free {
                // Others: best effort. Grow with this batch (warm ring) or shrink to recent needs.
                let need = if grew { (up, down) } else { (0, 0) };
                let _ = self.fit(&mut ring, i, need, keep);
            }
        }
        let s = &ring.slots[slot];
        match (&s.upload, &s.download) {
            (Some(u), Some(d)) => Ok((u.clone(), d.clone(), s.upload_state.clone())),
            _ => Err(GpuError::Device("a slot's staging buffers are missing after fitting them".into())),
        }
    }

    /// Fit slot `i`'s buffers: at least `need` bytes, at most `SHRINK_FACTOR` times `keep`
    /// (rounded up to powers of two). Returns whether a buffer grew.
    fn fit(&self, ring: &mut Ring, i: usize, need: (u64, u64), keep: (u64, u64)) -> Result<bool, GpuError> {
        let Ring { slots, stats, .. } = ring;
        let s = &mut slots[i];
        let map_write = wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC;
        let map_read = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let grew_up = self.fit_one(&mut s.upload, need.0, keep.0, map_write, true, stats)?;
        if grew_up.is_some() {
            // A fresh buffer is mapped at creation, and a missing one is created so: a new flag
            // (a stale re-map callback of the old buffer sets the old one).
            s.upload_state = Arc::new(AtomicU8::new(MAPPED));
        }
        let grew_down = self.fit_one(&mut s.download, need.1, keep.1, map_read, false, stats)?;
        Ok(grew_up == Some(true) || grew_down == Some(true))
    }

    /// Replace `cur` when it is smaller than `need` or more than `SHRINK_FACTOR` times the size
    /// `keep` asks for. `None`: unchanged; `Some(grew)`: replaced (or dropped when nothing is
    /// needed).
    fn fit_one(&self, cur: &mut Option<wgpu::Buffer>, need: u64, keep: u64, usage: wgpu::BufferUsages, mapped: bool, stats: &mut TransferStats) -> Result<Option<bool>, GpuError> {
        let size_for = |bytes: u64| bytes.max(1).next_power_of_two().max(ALIGN);
        let old = cur.as_ref().map_or(0, |b| b.size());
        let too_small = need > 0 && old < need;
        let too_large = old > SHRINK_FACTOR * size_for(keep.max(need));
        if !too_small && !too_large {
            return Ok(None);
        }
        if need == 0 {
            // Shrinking an idle slot: give the buffer back; its next batch creates one.
            *cur = None;
            self.pool().release_external(old);
            return Ok(Some(false));
        }
        let size = size_for(need);
        let extra = if self.direct { wgpu::BufferUsages::STORAGE } else { wgpu::BufferUsages::empty() };
        let mut pool = self.pool();
        pool.reserve_external(size, old)?;
        let desc = wgpu::BufferDescriptor { label: Some(if mapped { "weir-upload" } else { "weir-download" }), size, usage: usage | extra, mapped_at_creation: mapped };
        match crate::pool::create_buffer(&self.ctx.device, &desc, "a staging buffer") {
            Ok(b) => *cur = Some(b),
            Err(e) => {
                pool.release_external(size);
                // The old buffer stays accounted for while it stays.
                let _ = pool.reserve_external(old, 0);
                return Err(e);
            }
        }
        stats.staging_creations += 1;
        Ok(Some(too_small))
    }

    /// Refuse a batch the device cannot run: a binding beyond the largest storage binding, a
    /// dispatch beyond the workgroups per dimension, a resident binding outside its buffer.
    fn check(&self, bindings: &[Bind<'_>], lens: &[u64], passes: &[(Arc<wgpu::ComputePipeline>, u32, u32)]) -> Result<(), GpuError> {
        let Limits { max_binding, max_groups } = self.limits;
        for (i, (b, &len)) in bindings.iter().zip(lens).enumerate() {
            if len > max_binding {
                return Err(GpuError::Input(format!(
                    "binding {i} of a batch is {len} bytes, beyond the device's largest storage binding ({max_binding} bytes): split the batch"
                )));
            }
            if let Bind::Resident(buf, offset, len) = b {
                if offset % ALIGN != 0 || offset + len > buf.size() {
                    return Err(GpuError::Input(format!(
                        "resident binding {i}: {len} bytes at offset {offset} of a {}-byte buffer (offsets align to {ALIGN})",
                        buf.size()
                    )));
                }
            }
        }
        for (p, (_, gx, gy)) in passes.iter().enumerate() {
            if *gx > max_groups || *gy > max_groups {
                return Err(GpuError::Input(format!(
                    "pass {p} of a batch dispatches {gx}×{gy} workgroups, beyond the device's {max_groups} per dimension: split the batch"
                )));
            }
        }
        Ok(())
    }

    /// Submit one batch: `passes` (pipeline, workgroups x, y) over `bindings`, result read from
    /// binding `read` and converted by `finish`. One submission; returns at once. A device
    /// error in the batch (validation, out of memory) is its result's error.
    pub(crate) fn submit<T: Send + 'static>(
        self: &Arc<Self>,
        bindings: &[Bind<'_>],
        passes: &[(Arc<wgpu::ComputePipeline>, u32, u32)],
        read: usize,
        finish: impl FnOnce(&[u8]) -> Result<T, GpuError> + Send + 'static,
    ) -> Pending<T> {
        match self.try_submit(bindings, passes, read, Box::new(finish)) {
            Ok(p) => p,
            Err(e) => Pending::ready(Err(e)),
        }
    }

    fn try_submit<T: Send + 'static>(
        self: &Arc<Self>,
        bindings: &[Bind<'_>],
        passes: &[(Arc<wgpu::ComputePipeline>, u32, u32)],
        read: usize,
        finish: Finish<T>,
    ) -> Result<Pending<T>, GpuError> {
        let dev = &self.ctx.device;
        let size = |b: &Bind<'_>| match b {
            Bind::In(bytes) => bytes.len() as u64,
            Bind::Out(len) | Bind::Resident(_, _, len) => *len,
        }
        .max(4)
        .next_multiple_of(4);
        let lens: Vec<u64> = bindings.iter().map(size).collect();
        if read >= bindings.len() || matches!(bindings[read], Bind::Resident(..)) {
            return Err(GpuError::Input(format!("a batch reads back binding {read} of {}: it must be an input or output", bindings.len())));
        }
        self.check(bindings, &lens, passes)?;
        // Upload layout: each input at an aligned offset of the slot's upload buffer.
        let mut up_offsets = vec![0u64; bindings.len()];
        let mut up_total = 0u64;
        for (i, b) in bindings.iter().enumerate() {
            if let Bind::In(_) = b {
                up_offsets[i] = up_total;
                up_total = (up_total + lens[i]).next_multiple_of(ALIGN);
            }
        }
        let up_total = up_total.max(ALIGN);
        let read_len = lens[read];
        // Device blocks: staged, every binding; direct, only scratch outputs.
        let block_lens: Vec<Option<u64>> = bindings
            .iter()
            .enumerate()
            .map(|(i, b)| match b {
                Bind::Resident(..) => None,
                _ => (!self.direct || (matches!(b, Bind::Out(_)) && i != read)).then_some(lens[i]),
            })
            .collect();

        let slot = self.acquire()?;
        let mut lease = Lease { engine: self, slot, blocks: Vec::new(), unmapped: false, armed: true };
        lease.blocks = self.alloc_blocks(&block_lens, slot)?;
        let (upload, download, upload_state) = self.slot_buffers(slot, up_total, read_len)?;
        // Pack the inputs straight into mapped memory (no intermediate copy).
        let t = Instant::now();
        for (i, b) in bindings.iter().enumerate() {
            if let Bind::In(bytes) = b {
                if bytes.is_empty() {
                    continue;
                }
                let mut view = upload.slice(up_offsets[i]..up_offsets[i] + bytes.len() as u64).get_mapped_range_mut().map_err(dev_err)?;
                view.copy_from_slice(bytes);
            }
        }
        upload.unmap();
        lease.unmapped = true;
        upload_state.store(MAP_PENDING, Ordering::Release);
        let pack = t.elapsed();
        #[cfg(test)]
        if self.faults.panic_after_pack.swap(false, Ordering::SeqCst) {
            panic!("injected panic between packing and submitting a batch");
        }

        let blocks = &lease.blocks;
        // Device errors of this batch are caught here (wgpu's default handler panics). Scopes
        // are per thread: the whole recording and submission stays on this one.
        let validation = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let pool = self.pool();
        let mut encoder = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("weir-batch") });
        // Where each binding lives: (buffer, offset).
        let places: Vec<(&wgpu::Buffer, u64)> = bindings
            .iter()
            .enumerate()
            .map(|(i, b)| match (blocks[i], b) {
                (Some(blk), _) => (pool.buffer(blk.slab), blk.offset),
                (None, Bind::Resident(buf, off, _)) => (*buf, *off),
                (None, Bind::In(_)) => (&upload, up_offsets[i]),
                (None, Bind::Out(_)) => (&download, 0),
            })
            .collect();
        for (i, b) in bindings.iter().enumerate() {
            let (buf, off) = places[i];
            match b {
                Bind::In(bytes) if !bytes.is_empty() && blocks[i].is_some() => {
                    encoder.copy_buffer_to_buffer(&upload, up_offsets[i], buf, off, lens[i]);
                }
                Bind::In(_) | Bind::Resident(..) => {}
                Bind::Out(_) => encoder.clear_buffer(buf, off, Some(lens[i])),
            }
        }
        if !self.skip_compute.load(Ordering::Relaxed) {
            let entries: Vec<wgpu::BindGroupEntry<'_>> = places
                .iter()
                .enumerate()
                .map(|(i, (buf, off))| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: buf, offset: *off, size: NonZeroU64::new(lens[i]) }),
                })
                .collect();
            for (pipe, gx, gy) in passes {
                let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipe.get_bind_group_layout(0), entries: &entries });
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
                pass.set_pipeline(pipe);
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(*gx, *gy, 1);
            }
        }
        if let Some(blk) = blocks[read] {
            encoder.copy_buffer_to_buffer(pool.buffer(blk.slab), blk.offset, &download, 0, read_len);
        }
        drop(places);
        let state = Arc::new(AtomicU8::new(0));
        let st = state.clone();
        encoder.map_buffer_on_submit(&download, wgpu::MapMode::Read, 0..read_len, move |r| st.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release));
        let um = upload_state.clone();
        encoder.map_buffer_on_submit(&upload, wgpu::MapMode::Write, .., move |r| um.store(if r.is_ok() { MAPPED } else { MAP_FAILED }, Ordering::Release));
        let cell = Arc::new(Cell { inner: Mutex::new((Some(finish), None, Duration::ZERO)) });
        let index = self.ctx.queue.submit([encoder.finish()]);
        drop(pool);
        // Native wgpu reports errors synchronously: the futures are ready at once.
        let oom = pollster::block_on(oom.pop());
        let validation = pollster::block_on(validation.pop());
        let delivered = match oom.or(validation) {
            Some(e) => {
                cell.deliver(Err(GpuError::Device(format!("a batch of {} bindings and {} passes failed on the device: {e}", bindings.len(), passes.len()))));
                true
            }
            None => false,
        };
        let mut ring = self.lock();
        ring.in_flight.push_back(InFlight {
            slot,
            index: index.clone(),
            read_len,
            state,
            blocks: std::mem::take(&mut lease.blocks).into_iter().flatten().collect(),
            sink: cell.clone(),
            delivered,
        });
        // In flight: harvesting frees the slot and blocks from now on.
        lease.armed = false;
        ring.stats.batches += 1;
        ring.stats.bytes_up += bindings.iter().map(|b| if let Bind::In(x) = b { x.len() as u64 } else { 0 }).sum::<u64>();
        ring.stats.pack += pack;
        ring.stats.max_in_flight = ring.stats.max_in_flight.max(ring.in_flight.len());
        drop(ring);
        Ok(Pending(Box::new(OnGpu { cell, engine: self.clone(), index, pack })))
    }
}

impl Drop for Engine {
    /// The staging buffers were counted against the budget: give them back.
    fn drop(&mut self) {
        let ring = self.ring.get_mut().unwrap_or_else(|p| p.into_inner());
        let held: u64 = ring.slots.iter().map(Slot::held).sum();
        self.ctx.pool.lock().unwrap_or_else(|p| p.into_inner()).release_external(held);
    }
}

#[cfg(test)]
mod tests;
