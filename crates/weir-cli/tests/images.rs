//! The thumbnail job (resize, then Sobel) over real photographs, on the CPU path and on the GPU
//! path (lavapipe in CI): the same pictures within rounding, the right size, real edges.

mod common;

use common::*;

fn thumbnails(out: &std::path::Path, gpu: &str) -> Vec<(String, image::RgbImage)> {
    let ck = out.with_extension("ck");
    run_ok(weir()
        .args(["run", "examples/thumbnails.yaml", "-D", &format!("weir.gpu.enabled={gpu}")])
        .arg("-D")
        .arg(format!("execution.checkpointing.dir={}", ck.display()))
        .arg("--set")
        .arg(format!("sink.path={}", out.display())));
    let mut files: Vec<_> = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), image::open(&p).unwrap().to_rgb8()))
        .collect()
}

#[test]
fn thumbnail_job_matches_on_cpu_and_gpu_paths() {
    let tmp = TempDir::new("thumbs");
    let cpu = thumbnails(&tmp.join("cpu"), "false");
    let gpu = thumbnails(&tmp.join("gpu"), "true");
    let names: Vec<&str> = cpu.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["china.png", "flower.png"], "one PNG per photograph, nothing hidden left");
    for ((name, c), (_, g)) in cpu.iter().zip(&gpu) {
        assert_eq!(c.dimensions(), (320, 214), "{name}: 640×427 resized to 320 wide keeps the aspect");
        assert_eq!(c.dimensions(), g.dimensions());
        let max_diff = c.as_raw().iter().zip(g.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(max_diff <= 2, "{name}: CPU and GPU paths differ by {max_diff}");
        // Sobel of a photograph: mostly dark, with bright edges.
        let raw = c.as_raw();
        let mean = raw.iter().map(|&v| v as f64).sum::<f64>() / raw.len() as f64;
        let bright = raw.iter().filter(|&&v| v > 128).count() as f64 / raw.len() as f64;
        assert!(mean > 5.0 && mean < 120.0 && bright > 0.01, "{name}: mean {mean}, bright share {bright}");
    }
}
