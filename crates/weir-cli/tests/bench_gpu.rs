//! `weir bench gpu --sizes`: the `quick` preset runs every kernel and reports GFLOP/s and the
//! fraction of the FP32 peak (or "peak unknown", as on lavapipe); bad tokens are refused, named,
//! before anything runs. With no Vulkan adapter the smoke run is skipped, unless
//! `WEIR_REQUIRE_GPU=1` (CI, on lavapipe): then it fails.

mod common;

use common::*;

fn gpu_required() -> bool {
    std::env::var("WEIR_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

#[test]
fn bench_gpu_quick_reports_gflops_and_the_peak_fraction() {
    let info = run_ok(weir().args(["gpu", "info"]));
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    if info.contains("no Vulkan adapter found") {
        assert!(!gpu_required(), "WEIR_REQUIRE_GPU=1 but `weir gpu info` finds no adapter:\n{info}");
        eprintln!("NO GPU ADAPTER: `weir bench gpu` is not tested (set WEIR_REQUIRE_GPU=1 to fail)");
        return;
    }
    assert!(info.contains("FP32 TFLOP/s") && info.contains("FP32 peak"), "`weir gpu info` shows no FP32 peak:\n{info}");
    // A cache directory of its own: no tuning of this machine's adapter decides what runs.
    let cache = TempDir::new("bench-gpu-cache");
    let out = weir().args(["bench", "gpu", "--sizes", "quick"]).env("XDG_CACHE_HOME", &cache.0).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("CPU BLAS"), "no CPU BLAS in the header:\n{stdout}");
    // The row ends with: GFLOP/s of all CPU cores, GFLOP/s of the GPU, % of the FP32 peak.
    let row = stdout.lines().find(|l| l.starts_with("gemm n=256 ")).unwrap_or_else(|| panic!("no gemm n=256 row:\n{stdout}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    let (cpu, gpu, peak) = (cols[cols.len() - 3], cols[cols.len() - 2], cols[cols.len() - 1]);
    for (what, v) in [("CPU", cpu), ("GPU", gpu)] {
        let v: f64 = v.parse().unwrap_or_else(|e| panic!("{what} GFLOP/s '{v}' in '{row}': {e}"));
        assert!(v > 0.0, "{what} GFLOP/s {v} in '{row}'");
    }
    if peak == "-" {
        assert!(stdout.contains("peak unknown"), "'-' in the peak column but no 'peak unknown':\n{stdout}");
    } else {
        let pct: f64 = peak.trim_end_matches('%').parse().unwrap_or_else(|e| panic!("% peak '{peak}' in '{row}': {e}"));
        assert!(peak.ends_with('%') && pct > 0.0, "% peak '{peak}' in '{row}'");
    }
    for kernel in ["gemm n=128 ", "kmeans n=10000 k=64 d=32 ", "resize 320×240", "gaussian σ=2 320×240", "sobel 320×240", "cnn digits batch 256 "] {
        assert!(stdout.lines().any(|l| l.starts_with(kernel) && !l.contains("error")), "no '{kernel}' row:\n{stdout}");
    }
    assert!(!stdout.contains("gemm n=512"), "quick runs the default sizes:\n{stdout}");
}

#[test]
fn bench_gpu_refuses_bad_sizes_naming_the_token() {
    for (arg, token) in [("gemm:abc", "gemm:abc"), ("foo:3", "foo:3"), ("quick,image:640", "image:640"), ("kmeans:0", "kmeans:0")] {
        let out = weir().args(["bench", "gpu", "--sizes", arg]).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "--sizes {arg} succeeded:\n{stdout}");
        assert!(stderr.contains(&format!("'{token}'")), "--sizes {arg}: the error does not name '{token}':\n{stderr}");
        assert!(stderr.contains("quick") && stderr.contains("kmeans"), "--sizes {arg}: the error does not list the accepted forms:\n{stderr}");
        assert!(!stdout.contains("GPU:"), "--sizes {arg}: the bench started before the error:\n{stdout}");
    }
}

/// `weir gpu tune` measures the adapter, caches the result under the adapter's key, and the next
/// process that opens the adapter (here the benchmark) takes it; without the file, the built-in
/// values. Unordered sizes are refused before a device is opened.
#[test]
fn gpu_tune_caches_the_adapter_and_the_next_process_takes_it() {
    let info = run_ok(weir().args(["gpu", "info"]));
    if String::from_utf8_lossy(&info.stdout).contains("no Vulkan adapter found") {
        assert!(!gpu_required(), "WEIR_REQUIRE_GPU=1 but `weir gpu info` finds no adapter");
        return;
    }
    let cache = TempDir::new("gpu-tune-cache");
    let out = run_ok(weir().args(["gpu", "tune", "--sizes", "64,128", "--reps", "1"]).env("XDG_CACHE_HOME", &cache.0));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("128×128 K=8 ms") && stdout.lines().any(|l| l.trim_start().starts_with("128 ")), "no table:\n{stdout}");
    assert!(stdout.contains("tiled kernel from") || stdout.contains("at every size"), "no choice printed:\n{stdout}");
    let file = cache.join("weir/gpu-tuning.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let entry = json.as_object().and_then(|o| o.values().next()).unwrap_or_else(|| panic!("no entry in {json}"));
    assert!(entry["tiled_min_work"].as_u64().is_some() && entry["adapter"].as_str().is_some_and(|a| !a.is_empty()), "{json}");
    let bench = |dir: &std::path::Path| {
        let out = run_ok(weir().args(["bench", "gpu", "--sizes", "gemm:128"]).env("XDG_CACHE_HOME", dir));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tuned = bench(&cache.0);
    assert!(tuned.contains("tuned on this adapter"), "the benchmark did not take the cached tuning:\n{tuned}");
    let empty = TempDir::new("gpu-tune-none");
    assert!(bench(&empty.0).contains("built-in values"), "no file: the built-in values");
    let out = weir().args(["gpu", "tune", "--sizes", "128,64"]).env("XDG_CACHE_HOME", &empty.0).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("increasing"), "{:?}", out);
}
