//! With the `cuda` feature: compiles src/cuda/kernels.cu to PTX with nvcc (which candle's own
//! CUDA kernels need anyway), for the compute capability in CUDA_COMPUTE_CAP (default 80; the
//! driver compiles PTX for newer GPUs).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("dit_kernels.ptx");
    let cap: String = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "80".into())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("src/cuda/kernels.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (see tools/setup-cuda.sh): {e}"));
    assert!(status.success(), "nvcc failed on src/cuda/kernels.cu");
}
