//! Adapter discovery, selection and the memory budget.

use std::sync::{Arc, Mutex};

use crate::pool::DevicePool;
use crate::transfer::TransferMode;
use crate::GpuError;

/// `weir.gpu.enabled`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuMode {
    /// Use a GPU if one is found, else the CPU path (one log line says so).
    Auto,
    /// A GPU is required: fail at start without one.
    On,
    /// Always the CPU path.
    Off,
}

/// GPU settings of a job.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuConfig {
    /// `weir.gpu.enabled`: auto | true | false.
    pub mode: GpuMode,
    /// `weir.gpu.device`: an adapter index, or a substring of its name.
    pub device: Option<String>,
    /// `taskmanager.gpu.fraction`: share of the device memory this process may use.
    pub fraction: f64,
    /// `taskmanager.gpu.memory`: device memory in bytes (wgpu does not report it).
    pub memory: u64,
    /// `external-resource.gpu.amount`: GPUs a process may use (0 = CPU path).
    pub amount: u32,
    /// `weir.gpu.transfer.mode`: auto | staged | direct.
    pub transfer: TransferMode,
    /// `weir.gpu.transfer.ring-size`: staging slots shared by the process's GPU operators.
    pub ring_size: usize,
    /// `weir.gpu.tuning.file`: where per-adapter tuning is cached (`weir gpu tune`); `None`: the
    /// built-in values.
    pub tuning_file: Option<std::path::PathBuf>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self { mode: GpuMode::Auto, device: None, fraction: 0.5, memory: 1 << 30, amount: 1, transfer: TransferMode::Auto, ring_size: 4, tuning_file: crate::kernels::tune::default_tuning_file() }
    }
}

impl GpuConfig {
    /// `WEIR_REQUIRE_GPU=1` (set by CI) turns `auto` into `true`: a missing adapter fails loudly.
    pub fn from_env_default() -> Self {
        let mut c = GpuConfig::default();
        if std::env::var("WEIR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            c.mode = GpuMode::On;
        }
        c
    }
}

/// What an adapter is.
#[derive(Clone, Debug)]
pub struct AdapterDesc {
    /// Index in discovery order.
    pub index: usize,
    /// Name.
    pub name: String,
    /// AMD, NVIDIA, Intel, … or the PCI vendor id.
    pub vendor: String,
    /// Discrete, integrated, virtual, CPU.
    pub device_type: String,
    /// Backend (Vulkan).
    pub backend: String,
    /// Driver and version.
    pub driver: String,
    /// Largest buffer.
    pub max_buffer_size: u64,
    /// Largest storage binding.
    pub max_storage_binding: u64,
    /// Whether device memory is host-visible (integrated GPUs, lavapipe) and wgpu can map
    /// storage buffers there: the direct transfer path, which skips the staging copies.
    pub unified_memory: bool,
}

fn vendor_name(id: u32) -> String {
    match id {
        0x1002 => "AMD".into(),
        0x10de => "NVIDIA".into(),
        0x8086 => "Intel".into(),
        0x10005 => "Mesa (CPU)".into(),
        other => format!("0x{other:04x}"),
    }
}

fn instance() -> wgpu::Instance {
    // Vulkan only: a GL fallback through llvmpipe would hide a missing Vulkan driver.
    wgpu::Instance::new(wgpu::InstanceDescriptor { backends: wgpu::Backends::VULKAN, ..wgpu::InstanceDescriptor::new_without_display_handle_from_env() })
}

fn describe(index: usize, a: &wgpu::Adapter) -> AdapterDesc {
    let info = a.get_info();
    let limits = a.limits();
    let unified = matches!(info.device_type, wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::Cpu)
        && a.features().contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
    AdapterDesc {
        index,
        name: info.name.clone(),
        vendor: vendor_name(info.vendor),
        device_type: format!("{:?}", info.device_type),
        backend: format!("{:?}", info.backend),
        driver: format!("{} {}", info.driver, info.driver_info),
        max_buffer_size: limits.max_buffer_size,
        max_storage_binding: limits.max_storage_buffer_binding_size,
        unified_memory: unified,
    }
}

/// Every adapter wgpu finds on Vulkan.
pub fn discover() -> Vec<AdapterDesc> {
    let adapters = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::VULKAN));
    adapters.iter().enumerate().map(|(i, a)| describe(i, a)).collect()
}

/// An open device with its queue, memory pool and compiled kernels.
pub struct GpuContext {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue (one submission queue shared by every operator and worker of the process).
    pub queue: wgpu::Queue,
    /// What it is.
    pub adapter: AdapterDesc,
    /// The memory pool, within the budget.
    pub pool: Mutex<DevicePool>,
    pub(crate) pipelines: Mutex<std::collections::HashMap<&'static str, Arc<wgpu::ComputePipeline>>>,
    /// Kernels may bind host-mapped buffers (host-visible device memory and wgpu's
    /// `MAPPABLE_PRIMARY_BUFFERS`): the direct transfer path.
    pub direct_capable: bool,
    /// The configured transfer path and ring size.
    pub(crate) transfer: (TransferMode, usize),
    /// m·n·k from which GEMM takes the tiled kernel: cached tuning or the built-in value.
    pub(crate) gemm_tiled_min_work: std::sync::atomic::AtomicUsize,
    /// Whether the tiled GEMM takes K steps of 16 (tuned; else 8).
    pub(crate) gemm_deep: std::sync::atomic::AtomicBool,
    /// Whether the Gaussian and Sobel kernels run tiled (tuned; else on every adapter but a CPU).
    pub(crate) image_tiled: std::sync::atomic::AtomicBool,
    /// Whether those come from a tuning pass.
    pub(crate) tuned: std::sync::atomic::AtomicBool,
    /// Whether the device ends an invocation's loops early: a CPU device (Mesa's llvmpipe,
    /// lavapipe) silently stops them after 65,535 iterations in all.
    pub(crate) loops_capped: bool,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuContext({})", self.adapter.name)
    }
}

impl GpuContext {
    /// Open the configured device: `Ok(None)` means the CPU path.
    pub fn select(cfg: &GpuConfig) -> Result<Option<Arc<GpuContext>>, GpuError> {
        if !(0.0..=1.0).contains(&cfg.fraction) || cfg.fraction == 0.0 {
            return Err(GpuError::Config { key: "taskmanager.gpu.fraction".into(), message: format!("expected a number in (0, 1], got {}", cfg.fraction) });
        }
        if cfg.mode == GpuMode::Off || cfg.amount == 0 {
            tracing::info!("GPU disabled by configuration: kernels run on the CPU path");
            return Ok(None);
        }
        let inst = instance();
        let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::VULKAN));
        let descs: Vec<AdapterDesc> = adapters.iter().enumerate().map(|(i, a)| describe(i, a)).collect();
        let chosen = match &cfg.device {
            None => (0..adapters.len()).min_by_key(|&i| match adapters[i].get_info().device_type {
                wgpu::DeviceType::DiscreteGpu => 0,
                wgpu::DeviceType::IntegratedGpu => 1,
                wgpu::DeviceType::VirtualGpu => 2,
                wgpu::DeviceType::Cpu => 3,
                wgpu::DeviceType::Other => 4,
            }),
            Some(sel) => match sel.parse::<usize>() {
                Ok(i) => (i < adapters.len()).then_some(i),
                Err(_) => descs.iter().position(|d| d.name.to_lowercase().contains(&sel.to_lowercase())),
            },
        };
        let Some(i) = chosen else {
            let found: Vec<String> = descs.iter().map(|d| format!("{}: {}", d.index, d.name)).collect();
            let what = match &cfg.device {
                Some(sel) => format!("weir.gpu.device '{sel}' matches no adapter (found: {})", if found.is_empty() { "none".into() } else { found.join(", ") }),
                None => "no Vulkan adapter found (install a Vulkan driver, e.g. Debian's mesa-vulkan-drivers)".into(),
            };
            if cfg.mode == GpuMode::On {
                return Err(GpuError::NoDevice(what));
            }
            tracing::warn!("{what}: kernels run on the CPU path");
            return Ok(None);
        };
        let adapter = &adapters[i];
        let limits = adapter.limits();
        // Host-visible device memory: ask for mappable storage buffers, so kernels can bind
        // mapped memory (never on a discrete GPU, where it would put buffers in host memory).
        let direct_capable = descs[i].unified_memory;
        if cfg.transfer == TransferMode::Direct && !direct_capable {
            return Err(crate::transfer::direct_refused(&descs[i]));
        }
        let direct = direct_capable && cfg.transfer != TransferMode::Staged;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("weir"),
            required_features: if direct_capable { wgpu::Features::MAPPABLE_PRIMARY_BUFFERS } else { wgpu::Features::empty() },
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| GpuError::Device(e.to_string()))?;
        let desc = descs[i].clone();
        let budget = (cfg.memory as f64 * cfg.fraction) as u64;
        tracing::info!(
            "GPU: {} ({}, {}, {}), budget {} MiB, {} transfers, ring of {} slots",
            desc.name,
            desc.vendor,
            desc.device_type,
            desc.backend,
            budget >> 20,
            if direct { "direct (host-visible, no staging copy)" } else { "staged" },
            cfg.ring_size
        );
        let pool = DevicePool::new(budget, limits.max_storage_buffer_binding_size as u64);
        let tuned = cfg.tuning_file.as_deref().and_then(|f| crate::kernels::tune::cached(f, &desc));
        if let Some(t) = &tuned {
            tracing::info!(
                "GPU tuning of {} from {}: GEMM tiled from m·n·k = {}, K steps of {}, image kernels {}",
                desc.name,
                cfg.tuning_file.as_deref().unwrap_or(std::path::Path::new("")).display(),
                t.tiled_min_work,
                if t.deep { 16 } else { 8 },
                if t.image_tiled { "tiled" } else { "per value" }
            );
        }
        let tuned_any = tuned.is_some();
        // Untuned, the image kernels are tiled except on a CPU "device" (lavapipe), whose
        // workgroup memory is ordinary memory: there tiling only adds barriers (measured 2× slower).
        let cpu = adapter.get_info().device_type == wgpu::DeviceType::Cpu;
        let (tiled_min_work, deep, image_tiled) = tuned.map_or((crate::kernels::gpu::GEMM_TILED_MIN_WORK, false, !cpu), |t| (t.tiled_min_work, t.deep, t.image_tiled));
        Ok(Some(Arc::new(GpuContext {
            device,
            queue,
            adapter: desc,
            pool: Mutex::new(pool),
            pipelines: Mutex::default(),
            direct_capable,
            transfer: (cfg.transfer, cfg.ring_size),
            gemm_tiled_min_work: std::sync::atomic::AtomicUsize::new(tiled_min_work),
            gemm_deep: std::sync::atomic::AtomicBool::new(deep),
            image_tiled: std::sync::atomic::AtomicBool::new(image_tiled),
            tuned: std::sync::atomic::AtomicBool::new(tuned_any),
            loops_capped: cpu,
        })))
    }
}
