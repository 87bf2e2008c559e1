//! With the `cuda` feature, compiles every `cuda/*.cu` with nvcc (found through `NVCC`, then
//! `CUDA_ROOT`/`CUDA_PATH`/`CUDA_HOME`, then `PATH`) into a fatbin in OUT_DIR, which
//! `src/cuda.rs` embeds: sm_90 machine code, so the driver loads it without compiling (and runs
//! the very code whose registers and spills `kernels/ptx-check.sh` reports, from the same PTX
//! through the same ptxas), plus compute_90 PTX that the driver compiles on later GPUs. Without
//! the feature it does nothing, so the default build needs no CUDA.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| {
            ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
                .iter()
                .filter_map(std::env::var_os)
                .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")
        .expect("kernels/cuda")
        .map(|e| e.expect("kernels/cuda entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        let fatbin = out.join(src.with_extension("fatbin").file_name().expect("file name"));
        let status = Command::new(&nvcc)
            .args([
                "--fatbin",
                "-gencode=arch=compute_90,code=[sm_90,compute_90]",
                "-O3",
                "-std=c++17",
                "-o",
            ])
            .arg(&fatbin)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} for {} ({e}): install CUDA 13.0 (or the pip toolchain of \
                     kernels/ptx-check.sh) and set NVCC or CUDA_ROOT",
                    nvcc.display(),
                    src.display()
                )
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
