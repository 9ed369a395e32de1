//! Per-adapter tuning: the size from which the tiled GEMM (128×128 tiles) beats the 64×64 one,
//! its K step, and whether the image kernels gain from tiling through workgroup memory depend on
//! the adapter (its cores, occupancy, caches; on a CPU "device" such as lavapipe workgroup memory
//! is ordinary memory and tiling only adds barriers), so they are measured on the adapter (`weir
//! gpu tune`, or [`GpuKernels::tune`]) and cached in a file
//! (`weir.gpu.tuning.file`; default `$XDG_CACHE_HOME/weir/gpu-tuning.json`, else
//! `~/.cache/weir/gpu-tuning.json`) under a key of the adapter, its driver and the kernels'
//! source, so that a new driver or a changed kernel is measured again rather than trusted. A
//! device opened with a cached entry takes its values; without one, the built-in ones:
//! [`GEMM_TILED_MIN_WORK`](super::gpu::GEMM_TILED_MIN_WORK), K steps of 8, and tiled image
//! kernels on every adapter but a CPU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::gpu::{GemmKernel, GpuKernels};
use super::Image;
use crate::device::AdapterDesc;
use crate::GpuError;

/// The default tuning file: `$XDG_CACHE_HOME/weir/gpu-tuning.json`, else
/// `$HOME/.cache/weir/gpu-tuning.json`; `None` without either.
pub fn default_tuning_file() -> Option<PathBuf> {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    non_empty("XDG_CACHE_HOME").or_else(|| non_empty("HOME").map(|h| h.join(".cache"))).map(|d| d.join("weir").join("gpu-tuning.json"))
}

/// One adapter's tuned values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterTuning {
    /// The adapter's name, for the reader of the file.
    pub adapter: String,
    /// Its driver and version.
    pub driver: String,
    /// m·n·k from which GEMM takes the tiled kernel (`usize::MAX`: never).
    pub tiled_min_work: usize,
    /// Whether the tiled kernel takes K steps of 16 (32 KiB of workgroup memory) rather than 8.
    #[serde(default)]
    pub deep: bool,
    /// Whether the Gaussian and Sobel kernels run tiled through workgroup memory.
    #[serde(default)]
    pub image_tiled: bool,
    /// When it was measured (seconds since the Unix epoch).
    pub measured_at: u64,
}

/// FNV-1a, 64 bits: a hash that stays the same across Rust releases (the key of a file).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The key of an adapter's entry: its name, driver and the tuned kernels' source.
pub(crate) fn tuning_key(adapter: &AdapterDesc) -> String {
    let sources = super::gpu::tuned_sources();
    let mut parts = vec![adapter.name.as_str(), adapter.driver.as_str()];
    parts.extend(sources.iter().copied());
    format!("{:016x}", fnv1a(&parts))
}

/// The entries of a tuning file; an empty map where there is none.
fn read_file(path: &Path) -> Result<BTreeMap<String, AdapterTuning>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The cached tuning of `adapter` in `path`, if any. A file that cannot be read or parsed is
/// logged (naming it) and ignored: the built-in values are always correct, only slower.
pub(crate) fn cached(path: &Path, adapter: &AdapterDesc) -> Option<AdapterTuning> {
    match read_file(path) {
        Ok(mut entries) => entries.remove(&tuning_key(adapter)),
        Err(e) => {
            tracing::warn!("GPU tuning file ignored ({e}); delete it or run `weir gpu tune` again");
            None
        }
    }
}

/// Store `tuning` for `adapter` in `path`, keeping the other adapters' entries. Writers take an
/// exclusive lock on `<path>.lock` for the read-modify-write (two `weir gpu tune` at once keep
/// both entries); the file is written to a temporary file of its own, synced and renamed over
/// the old one, so a reader never sees half a file. A file that cannot be read (other than
/// missing) is not overwritten; one that does not parse is replaced, with a warning.
pub(crate) fn store(path: &Path, adapter: &AdapterDesc, tuning: &AdapterTuning) -> Result<(), GpuError> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static TMP: AtomicU64 = AtomicU64::new(0);
    let io = |e: std::io::Error| GpuError::Device(format!("GPU tuning file {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // flock needs no write access: a lock file another user created serves too.
    let lock_path = path.with_extension("json.lock");
    let lock = std::fs::File::open(&lock_path)
        .or_else(|_| std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path))
        .map_err(io)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(GpuError::Device(format!("GPU tuning file {}: {} held by another writer for 60 s", path.display(), lock_path.display())))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
    }
    let mut entries = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!("GPU tuning file {} does not parse ({e}): replaced", path.display());
            BTreeMap::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(io(e)),
    };
    entries.insert(tuning_key(adapter), tuning.clone());
    let tmp = path.with_extension(format!("json.tmp.{}.{}", std::process::id(), TMP.fetch_add(1, Ordering::Relaxed)));
    let json = serde_json::to_vec_pretty(&entries).map_err(|e| GpuError::Device(e.to_string()))?;
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// One size of a tuning pass: milliseconds per n×n×n product (median of the repetitions).
#[derive(Clone, Debug)]
pub struct TuneRow {
    /// The size.
    pub n: usize,
    /// The 64×64 kernel.
    pub small_ms: f64,
    /// The tiled kernel with K steps of 8.
    pub tiled_ms: f64,
    /// The tiled kernel with K steps of 16, where the device's workgroup memory admits it.
    pub deep_ms: Option<f64>,
}

/// What a tuning pass measured, and the values chosen.
#[derive(Clone, Debug)]
pub struct TuneReport {
    /// Per GEMM size, in increasing order.
    pub rows: Vec<TuneRow>,
    /// Per image kernel: its name, ms per value and ms tiled (median of the repetitions).
    pub image_rows: Vec<(String, f64, f64)>,
    /// The threshold chosen (m·n·k).
    pub tuning: AdapterTuning,
    /// Where it was stored, if anywhere.
    pub file: Option<PathBuf>,
}

/// The threshold from measured `(n, small ms, tiled ms)` rows in increasing n: the smallest n³
/// from which the tiled kernel is at least as fast at that and every larger n; `usize::MAX`
/// when it never is. Below the smallest measured size the 64×64 kernel keeps the shape.
pub(crate) fn threshold(rows: &[(usize, f64, f64)]) -> usize {
    let mut t = usize::MAX;
    for &(n, small, tiled) in rows.iter().rev() {
        if tiled > small {
            break;
        }
        t = n * n * n;
    }
    t
}

impl GpuKernels {
    /// The m·n·k from which GEMM takes the tiled kernel on this device.
    pub fn gemm_tiled_min_work(&self) -> usize {
        self.ctx.gemm_tiled_min_work.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the tiled GEMM takes K steps of 16 on this device (else 8).
    pub fn gemm_deep(&self) -> bool {
        self.ctx.gemm_deep.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the Gaussian and Sobel kernels run tiled through workgroup memory on this device.
    pub fn image_tiled(&self) -> bool {
        self.ctx.image_tiled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether this device's choices come from a tuning pass (cached or run here).
    pub fn tuned(&self) -> bool {
        self.ctx.tuned.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Measure the kernels whose variant is chosen per adapter, `reps` times each after a
    /// warm-up (the median counts): GEMM on square products of `sizes` (increasing; multiples of
    /// 4 take the vec4 variants) through the 64×64 kernel and the tiled one with K steps of 8
    /// and, where the device admits 32 KiB of workgroup memory, of 16; the Gaussian (σ = 2) and
    /// Sobel on a 1280×720 RGB image, tiled and per value. Choose the GEMM threshold, the K step
    /// (the faster at the largest size) and the image path (the faster in total), apply them to
    /// this device and store them in `file` (if given) for the devices opened later.
    pub fn tune(&self, sizes: &[usize], reps: usize, file: Option<&Path>) -> Result<TuneReport, GpuError> {
        let median = |f: &dyn Fn() -> Result<(), GpuError>| -> Result<f64, GpuError> {
            f()?;
            let mut times: Vec<f64> = (0..reps.max(1))
                .map(|_| {
                    let t = Instant::now();
                    f().map(|_| t.elapsed().as_secs_f64() * 1e3)
                })
                .collect::<Result<_, _>>()?;
            times.sort_by(f64::total_cmp);
            Ok(times[times.len() / 2])
        };
        let mut rows = Vec::with_capacity(sizes.len());
        for &n in sizes {
            let a: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            let vec4 = GemmKernel::Tiled { vec4: true, deep: false }.admits(n, n);
            let time = |kernel: GemmKernel| median(&|| self.gemm_with(kernel, &a, &a, n, n, n).wait().map(drop));
            let deep = GemmKernel::Tiled { vec4, deep: true };
            rows.push(TuneRow {
                n,
                small_ms: time(GemmKernel::Small)?,
                tiled_ms: time(GemmKernel::Tiled { vec4, deep: false })?,
                deep_ms: if self.gemm_fits(deep) { Some(time(deep)?) } else { None },
            });
        }
        let (w, h) = (1280, 720);
        let img = Image { w, h, c: 3, data: (0..w * h * 3).map(|i| ((i * 7919) % 256) as f32).collect() };
        let mut image_rows = Vec::new();
        for name in ["gaussian σ=2 1280×720 rgb", "sobel 1280×720 rgb"] {
            let run = |tiled: bool| {
                median(&|| if name.starts_with("sobel") { self.sobel_with(&img, tiled) } else { self.gaussian_blur_with(&img, 2.0, tiled) }.wait().map(drop))
            };
            image_rows.push((name.to_string(), run(false)?, run(true)?));
        }
        let image_tiled = image_rows.iter().map(|r| r.2).sum::<f64>() <= image_rows.iter().map(|r| r.1).sum::<f64>();
        let measured_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let adapter = &self.ctx.adapter;
        // The K step that wins at the largest size, then the threshold of that variant (the one
        // the device will run).
        let deep = rows.last().and_then(|r| r.deep_ms.map(|d| d < r.tiled_ms)).unwrap_or(false);
        let chosen = |r: &TuneRow| if deep { r.deep_ms.unwrap_or(r.tiled_ms) } else { r.tiled_ms };
        let tiled_min_work = threshold(&rows.iter().map(|r| (r.n, r.small_ms, chosen(r))).collect::<Vec<_>>());
        let tuning = AdapterTuning { adapter: adapter.name.clone(), driver: adapter.driver.clone(), tiled_min_work, deep, image_tiled, measured_at };
        self.ctx.gemm_tiled_min_work.store(tuning.tiled_min_work, std::sync::atomic::Ordering::Relaxed);
        self.ctx.gemm_deep.store(tuning.deep, std::sync::atomic::Ordering::Relaxed);
        self.ctx.image_tiled.store(tuning.image_tiled, std::sync::atomic::Ordering::Relaxed);
        self.ctx.tuned.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(f) = file {
            store(f, adapter, &tuning)?;
        }
        Ok(TuneReport { rows, image_rows, tuning, file: file.map(Path::to_path_buf) })
    }
}
