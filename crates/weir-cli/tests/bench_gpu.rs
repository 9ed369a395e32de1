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
    let out = weir().args(["bench", "gpu", "--sizes", "quick"]).output().unwrap();
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
