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
//! (`weir.gpu.max-inflight-batches`), so none can fill the ring alone.

use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::device::GpuContext;
use crate::pool::{Block, MIN_BLOCK};
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
    /// Staging buffers created (grows only while the ring warms up or batches grow).
    pub staging_creations: u64,
    /// Host time spent writing inputs into mapped memory.
    pub pack: Duration,
    /// Host time spent reading results out of mapped memory.
    pub unpack: Duration,
    /// Most batches in flight at once.
    pub max_in_flight: usize,
    /// Times a submitter waited for a free slot.
    pub slot_waits: u64,
}

/// Receives a batch's mapped output bytes.
trait Deliver: Send + Sync {
    fn deliver(&self, bytes: Result<&[u8], GpuError>);
}

type Finish<T> = Box<dyn FnOnce(&[u8]) -> Result<T, GpuError> + Send>;

/// Where a GPU batch's result lands: the conversion runs on the mapped bytes, once.
struct Cell<T> {
    inner: Mutex<(Option<Finish<T>>, Option<Result<T, GpuError>>)>,
}

impl<T: Send> Deliver for Cell<T> {
    fn deliver(&self, bytes: Result<&[u8], GpuError>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let result = match (g.0.take(), bytes) {
            (Some(f), Ok(b)) => f(b),
            (_, Err(e)) => Err(e),
            (None, Ok(_)) => return,
        };
        g.1 = Some(result);
    }
}

trait PollResult<T> {
    /// The result once done; `block` waits for it.
    fn poll(&mut self, block: bool) -> Option<Result<T, GpuError>>;
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
}

struct All<T> {
    parts: Vec<Pending<T>>,
    done: Vec<T>,
}

impl<T: 'static> PollResult<Vec<T>> for All<T> {
    fn poll(&mut self, block: bool) -> Option<Result<Vec<T>, GpuError>> {
        while self.done.len() < self.parts.len() {
            match self.parts[self.done.len()].0.poll(block)? {
                Ok(v) => self.done.push(v),
                Err(e) => return Some(Err(e)),
            }
        }
        self.parts.clear();
        Some(Ok(std::mem::take(&mut self.done)))
    }
}

struct OnGpu<T> {
    cell: Arc<Cell<T>>,
    engine: Arc<Engine>,
    index: wgpu::SubmissionIndex,
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
        Pending(Box::new(All { parts, done }))
    }

    /// Transform the result when it arrives (on the caller's thread).
    pub fn map<U: 'static>(self, f: impl FnOnce(T) -> U + 'static) -> Pending<U> {
        Pending(Box::new(Mapped { inner: self, f: Some(f) }))
    }
}

struct Slot {
    upload: Option<wgpu::Buffer>,
    download: Option<wgpu::Buffer>,
    free: bool,
    /// The upload buffer is mapped for writing (after creation, or re-mapped after its batch).
    upload_mapped: Arc<AtomicBool>,
}

struct InFlight {
    slot: usize,
    index: wgpu::SubmissionIndex,
    read_len: u64,
    /// 0 running, 1 output mapped, 2 mapping failed.
    state: Arc<AtomicU8>,
    blocks: Vec<Block>,
    sink: Arc<dyn Deliver>,
}

struct Ring {
    slots: Vec<Slot>,
    next_ticket: u64,
    serving: u64,
    in_flight: VecDeque<InFlight>,
    stats: TransferStats,
}

/// The ring of staging slots and the submission queue of one device (shared by every
/// [`GpuKernels`](crate::kernels::gpu::GpuKernels) on it with the same path).
pub(crate) struct Engine {
    ctx: Arc<GpuContext>,
    direct: bool,
    ring: Mutex<Ring>,
    freed: Condvar,
    /// Bench only: submit the copies but not the kernels (to measure transfer time).
    pub(crate) skip_compute: AtomicBool,
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

impl Engine {
    pub(crate) fn new(ctx: Arc<GpuContext>, mode: TransferMode, slots: usize) -> Result<Arc<Self>, GpuError> {
        let direct = match mode {
            TransferMode::Staged => false,
            TransferMode::Auto => ctx.direct_capable,
            TransferMode::Direct if ctx.direct_capable => true,
            TransferMode::Direct => return Err(direct_refused(&ctx.adapter)),
        };
        let slots = (0..slots.max(1))
            .map(|_| Slot { upload: None, download: None, free: true, upload_mapped: Arc::new(AtomicBool::new(true)) })
            .collect();
        let ring = Ring { slots, next_ticket: 0, serving: 0, in_flight: VecDeque::new(), stats: TransferStats::default() };
        Ok(Arc::new(Engine { ctx, direct, ring: Mutex::new(ring), freed: Condvar::new(), skip_compute: AtomicBool::new(false) }))
    }

    pub(crate) fn direct(&self) -> bool {
        self.direct
    }

    pub(crate) fn slots(&self) -> usize {
        self.lock().slots.len()
    }

    pub(crate) fn stats(&self) -> TransferStats {
        self.lock().stats
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
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
        self.ctx.device.poll(wgpu::PollType::Poll).map_err(dev_err)?;
        if ring.in_flight.iter().all(|f| f.state.load(Ordering::Acquire) == 0) {
            return Ok(());
        }
        let mut pool = self.ctx.pool.lock().unwrap_or_else(|p| p.into_inner());
        let mut i = 0;
        while i < ring.in_flight.len() {
            let st = ring.in_flight[i].state.load(Ordering::Acquire);
            if st == 0 {
                i += 1;
                continue;
            }
            let f = ring.in_flight.remove(i).expect("index in range");
            let dl = ring.slots[f.slot].download.clone().expect("a submitted slot has a download buffer");
            let t = Instant::now();
            if st == 1 {
                match dl.slice(0..f.read_len).get_mapped_range() {
                    Ok(view) => f.sink.deliver(Ok(&view)),
                    Err(e) => f.sink.deliver(Err(dev_err(e))),
                }
                dl.unmap();
            } else {
                f.sink.deliver(Err(GpuError::Device("mapping a batch's output failed (device lost?)".into())));
            }
            ring.stats.unpack += t.elapsed();
            ring.stats.bytes_down += f.read_len;
            for b in f.blocks {
                pool.free(b);
            }
            ring.slots[f.slot].free = true;
        }
        drop(pool);
        self.freed.notify_all();
        Ok(())
    }

    /// Take a slot, first come first served.
    fn acquire(&self) -> Result<usize, GpuError> {
        let mut ring = self.lock();
        let me = ring.next_ticket;
        ring.next_ticket += 1;
        let mut waited = false;
        loop {
            if ring.serving == me {
                self.harvest(&mut ring)?;
                if let Some(i) = ring.slots.iter().position(|s| s.free && s.upload_mapped.load(Ordering::Acquire)) {
                    ring.slots[i].free = false;
                    ring.serving += 1;
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

    fn release(&self, slot: usize) {
        self.lock().slots[slot].free = true;
        self.freed.notify_all();
    }

    /// Pool blocks for `lens`, waiting for batches in flight to finish while the budget is full.
    fn alloc_blocks(&self, lens: &[Option<u64>]) -> Result<Vec<Option<Block>>, GpuError> {
        loop {
            let mut pool = self.ctx.pool.lock().unwrap_or_else(|p| p.into_inner());
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
            let oldest = self.lock().in_flight.front().map(|f| f.index.clone());
            match (oldest, e) {
                (Some(idx), GpuError::OutOfMemory { .. }) => self.wait_for(&idx)?,
                (_, e) => return Err(e),
            }
        }
    }

    /// The slot's upload and download buffers, grown to `up` and `down` bytes. A slot that
    /// grows grows every free slot with it (batches of a job are alike), so the ring is warm
    /// after the first batch of a size. On the direct path they are device memory and count
    /// against the budget.
    fn slot_buffers(&self, slot: usize, up: u64, down: u64) -> Result<(wgpu::Buffer, wgpu::Buffer, Arc<AtomicBool>), GpuError> {
        let mut ring = self.lock();
        let Ring { slots, stats, .. } = &mut *ring;
        let small = |s: &Slot| s.upload.as_ref().is_none_or(|b| b.size() < up) || s.download.as_ref().is_none_or(|b| b.size() < down);
        if small(&slots[slot]) {
            for (i, s) in slots.iter_mut().enumerate() {
                if (i == slot || s.free) && small(s) {
                    self.grow(s, stats, up, down)?;
                }
            }
        }
        let s = &slots[slot];
        Ok((s.upload.clone().expect("upload"), s.download.clone().expect("download"), s.upload_mapped.clone()))
    }

    fn grow(&self, s: &mut Slot, stats: &mut TransferStats, up: u64, down: u64) -> Result<(), GpuError> {
        let extra = if self.direct { wgpu::BufferUsages::STORAGE } else { wgpu::BufferUsages::empty() };
        let mut one = |cur: &mut Option<wgpu::Buffer>, need: u64, usage: wgpu::BufferUsages, mapped: bool, label: &str| -> Result<(), GpuError> {
            if cur.as_ref().is_some_and(|b| b.size() >= need) {
                return Ok(());
            }
            let size = need.next_power_of_two().max(ALIGN);
            if self.direct {
                let old = cur.as_ref().map_or(0, |b| b.size());
                self.ctx.pool.lock().unwrap_or_else(|p| p.into_inner()).reserve_external(size, old)?;
            }
            *cur = Some(self.ctx.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage: usage | extra, mapped_at_creation: mapped }));
            stats.staging_creations += 1;
            Ok(())
        };
        let had = s.upload.as_ref().map(|b| b.size());
        one(&mut s.upload, up, wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC, true, "weir-upload")?;
        if s.upload.as_ref().map(|b| b.size()) != had {
            // A fresh buffer, mapped at creation (a stale re-map callback sets the old flag).
            s.upload_mapped = Arc::new(AtomicBool::new(true));
        }
        one(&mut s.download, down, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST, false, "weir-download")
    }

    /// Submit one batch: `passes` (pipeline, workgroups x, y) over `bindings`, result read from
    /// binding `read` and converted by `finish`. One submission; returns at once.
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
        let block_lens: Vec<Option<u64>> =
            bindings
            .iter()
            .enumerate()
            .map(|(i, b)| match b {
                Bind::Resident(..) => None,
                _ => (!self.direct || (matches!(b, Bind::Out(_)) && i != read)).then_some(lens[i]),
            })
            .collect();

        let slot = self.acquire()?;
        let blocks = match self.alloc_blocks(&block_lens) {
            Ok(b) => b,
            Err(e) => {
                self.release(slot);
                return Err(e);
            }
        };
        let buffers = self.slot_buffers(slot, up_total, read_len);
        let (upload, download, upload_mapped) = match buffers {
            Ok(b) => b,
            Err(e) => {
                let mut pool = self.ctx.pool.lock().unwrap_or_else(|p| p.into_inner());
                for b in blocks.iter().flatten() {
                    pool.free(*b);
                }
                drop(pool);
                self.release(slot);
                return Err(e);
            }
        };
        let fail = |e: GpuError| {
            let mut pool = self.ctx.pool.lock().unwrap_or_else(|p| p.into_inner());
            for b in blocks.iter().flatten() {
                pool.free(*b);
            }
            drop(pool);
            self.release(slot);
            e
        };
        // Pack the inputs straight into mapped memory (no intermediate copy).
        let t = Instant::now();
        for (i, b) in bindings.iter().enumerate() {
            if let Bind::In(bytes) = b {
                if bytes.is_empty() {
                    continue;
                }
                let mut view = upload.slice(up_offsets[i]..up_offsets[i] + bytes.len() as u64).get_mapped_range_mut().map_err(|e| fail(dev_err(e)))?;
                view.copy_from_slice(bytes);
            }
        }
        upload.unmap();
        upload_mapped.store(false, Ordering::Release);
        let pack = t.elapsed();

        let pool = self.ctx.pool.lock().unwrap_or_else(|p| p.into_inner());
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
        drop(pool);
        let state = Arc::new(AtomicU8::new(0));
        let st = state.clone();
        encoder.map_buffer_on_submit(&download, wgpu::MapMode::Read, 0..read_len, move |r| st.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release));
        let um = upload_mapped.clone();
        encoder.map_buffer_on_submit(&upload, wgpu::MapMode::Write, .., move |r| um.store(r.is_ok(), Ordering::Release));
        let cell = Arc::new(Cell { inner: Mutex::new((Some(finish), None)) });
        let index = self.ctx.queue.submit([encoder.finish()]);
        let mut ring = self.lock();
        ring.in_flight.push_back(InFlight {
            slot,
            index: index.clone(),
            read_len,
            state,
            blocks: blocks.into_iter().flatten().collect(),
            sink: cell.clone(),
        });
        ring.stats.batches += 1;
        ring.stats.bytes_up += bindings.iter().map(|b| if let Bind::In(x) = b { x.len() as u64 } else { 0 }).sum::<u64>();
        ring.stats.pack += pack;
        ring.stats.max_in_flight = ring.stats.max_in_flight.max(ring.in_flight.len());
        drop(ring);
        Ok(Pending(Box::new(OnGpu { cell, engine: self.clone(), index })))
    }
}

impl Drop for Engine {
    /// The direct path's buffers were counted against the budget: give them back.
    fn drop(&mut self) {
        if !self.direct {
            return;
        }
        let ring = self.ring.get_mut().unwrap_or_else(|p| p.into_inner());
        let held: u64 = ring.slots.iter().flat_map(|s| [&s.upload, &s.download]).flatten().map(|b| b.size()).sum();
        let _ = self.ctx.pool.lock().unwrap_or_else(|p| p.into_inner()).reserve_external(0, held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_and_mapped_results() {
        let p = Pending::ready(Ok(20)).map(|x| x + 1).map(|x| x * 2);
        assert_eq!(p.wait().unwrap(), 42);
        let mut e: Pending<u32> = Pending::ready(Err(GpuError::Input("bad".into())));
        assert!(matches!(e.poll(false), Some(Err(GpuError::Input(_)))));
        let all = Pending::all(vec![Pending::ready(Ok(1)), Pending::ready(Ok(2)).map(|x| x * 10)]);
        assert_eq!(all.wait().unwrap(), vec![1, 20]);
        let failed = Pending::all(vec![Pending::ready(Ok(1)), Pending::ready(Err(GpuError::Input("second".into())))]);
        assert!(matches!(failed.wait(), Err(GpuError::Input(m)) if m == "second"));
    }
}
