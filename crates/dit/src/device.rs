//! Choosing where the tensors live: `cpu`, `cuda` or `cuda:N` (the `--device` flag).

use candle_core::Device;

use crate::{Error, Result};

/// Parses a device name: `cpu`, `cuda` (GPU 0) or `cuda:N`. A CUDA name in a build without the
/// `cuda` feature is an error that says how to get one, not a silent fall-back to the CPU.
pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let ordinal = match spec.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        s => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::Input(format!(
                    "unknown device {spec:?}: expected cpu, cuda or cuda:N"
                ))
            })?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Input(format!(
            "device {spec:?}: this build has no CUDA support; rebuild with `--features cuda` \
             (see tools/setup-cuda.sh)"
        )));
    }
    let device = Device::new_cuda(ordinal)
        .map_err(|e| Error::Input(format!("device {spec:?} cannot be opened: {e}")))?;
    #[cfg(feature = "cuda")]
    tune_cuda(&device, ordinal);
    Ok(device)
}

/// Settings for a single-stream program, made before any tensor exists:
/// - no CUDA events per tensor: they guard use across streams, which we never do, and cost
///   two event creations per allocation plus a record and a wait per kernel argument;
/// - freed memory stays in the stream-ordered pool (release threshold: never), as torch's
///   caching allocator keeps it, instead of going back to the driver at each synchronisation.
#[cfg(feature = "cuda")]
fn tune_cuda(device: &Device, ordinal: usize) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(cuda) = device else {
        return;
    };
    // SAFETY: candle runs every kernel of a device on its one stream (see the function doc).
    unsafe { cuda.disable_event_tracking() };
    // SAFETY: plain driver calls with valid out-pointers; the pool handle is the device's own.
    let kept = unsafe {
        let mut dev: sys::CUdevice = 0;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold = u64::MAX;
        sys::cuDeviceGet(&mut dev, ordinal as i32) == sys::CUresult::CUDA_SUCCESS
            && sys::cuDeviceGetDefaultMemPool(&mut pool, dev) == sys::CUresult::CUDA_SUCCESS
            && sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            ) == sys::CUresult::CUDA_SUCCESS
    };
    if !kept {
        tracing::warn!("could not set the CUDA memory pool's release threshold");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse(" CPU ").unwrap().is_cpu());
        let e = parse("tpu:0").unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        let e = parse("cuda:x").unwrap_err().to_string();
        assert!(e.contains("cuda:x"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        let e = parse("cuda:0").unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
