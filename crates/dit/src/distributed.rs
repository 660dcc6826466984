//! Data-parallel training: each worker (one per GPU) runs its share of the global batch, and the
//! gradients are summed over the workers before the identical optimiser step on every worker.
//!
//! The random draws of a step (timesteps, label dropout, noise) are made for the whole global
//! batch on every worker from the same stream, and each worker takes its rows, so N workers give
//! the update of one worker on the global batch (up to float summation order).
//!
//! Workers are processes: `dit train --gpus N` starts N of them on one machine; on several
//! machines, start one per GPU with the environment below (as torchrun does).
//!
//! | variable | meaning |
//! |---|---|
//! | `DIT_WORLD_SIZE` | number of workers in all |
//! | `DIT_RANK` | this worker's index, 0-based (rank 0 writes checkpoints and logs) |
//! | `DIT_LOCAL_RANK` | the GPU of this worker on its machine (default: `DIT_RANK`) |
//! | `DIT_NCCL_ID_FILE` | a file on a file system all workers share: rank 0 writes NCCL's id there, the others wait for it |
//! | `DIT_NCCL_ID` | the id as hex, set by `dit train --gpus N` for its workers |
//!
//! NCCL's id names a bootstrap service that lives in the process that made the id, so that
//! process must outlive the workers' start: the launcher makes it and waits for its workers;
//! across machines rank 0 makes it itself.

use candle_core::Tensor;

use crate::{Error, Result};

/// How the gradients of one step are combined across workers.
pub trait GradientReducer {
    /// This worker's index in `0..world_size()`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces every tensor by its sum over all workers. Every worker passes tensors of the
    /// same shapes in the same order.
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()>;
}

/// One worker alone: the sum is the tensor itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl GradientReducer for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
}

/// This worker's place in a data-parallel run, read from the environment (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
}

impl WorkerEnv {
    /// `None` when `DIT_WORLD_SIZE` is unset (a single-process run).
    pub fn from_env() -> Result<Option<Self>> {
        let Some(world) = std::env::var_os("DIT_WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |name: &str, v: Option<std::ffi::OsString>| -> Result<usize> {
            v.and_then(|v| v.to_str()?.trim().parse().ok())
                .ok_or_else(|| Error::Input(format!("{name} must be a non-negative integer")))
        };
        let world_size = num("DIT_WORLD_SIZE", Some(world))?;
        let rank = num("DIT_RANK", std::env::var_os("DIT_RANK"))?;
        let local_rank = match std::env::var_os("DIT_LOCAL_RANK") {
            Some(v) => num("DIT_LOCAL_RANK", Some(v))?,
            None => rank,
        };
        if world_size == 0 || rank >= world_size {
            return Err(Error::Input(format!(
                "DIT_RANK {rank} is not below DIT_WORLD_SIZE {world_size}"
            )));
        }
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
        }))
    }
}

/// The rows of a global batch of `global` samples that worker `rank` of `world` runs.
pub fn shard(global: usize, rank: usize, world: usize) -> Result<std::ops::Range<usize>> {
    if world == 0 || !global.is_multiple_of(world) {
        return Err(Error::Input(format!(
            "the global batch ({global}) must divide evenly over {world} workers"
        )));
    }
    let per = global / world;
    Ok(rank * per..(rank + 1) * per)
}

/// Hex encoding of an NCCL unique id (for `DIT_NCCL_ID`).
pub fn id_to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The inverse of [`id_to_hex`].
pub fn id_from_hex(hex: &str) -> Result<Vec<u8>> {
    let hex = hex.trim();
    if !hex.len().is_multiple_of(2) {
        return Err(Error::Input("DIT_NCCL_ID: odd number of hex digits".into()));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .map_err(|_| Error::Input(format!("DIT_NCCL_ID: bad hex digits at {i}")))
        })
        .collect()
}

#[cfg(feature = "nccl")]
pub use nccl::{new_unique_id, NcclReducer};

#[cfg(feature = "nccl")]
mod nccl {
    use candle_core::cuda_backend::cudarc::nccl::{result, Comm, Id, ReduceOp};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, Device, Storage, Tensor};

    use super::{id_from_hex, id_to_hex, GradientReducer, WorkerEnv};
    use crate::{Error, Result};

    fn nccl_err(e: result::NcclError) -> Error {
        Error::Input(format!(
            "NCCL failed: {:?} (NCCL_DEBUG=WARN prints NCCL's own account)",
            e.0
        ))
    }

    /// A fresh NCCL unique id, as hex for `DIT_NCCL_ID`. The calling process hosts the id's
    /// bootstrap service: it must live until every worker has joined.
    pub fn new_unique_id() -> Result<String> {
        let id = Id::new().map_err(nccl_err)?;
        Ok(id_to_hex(&id.internal().map(|c| c as u8)))
    }

    /// Gradients summed over the workers with NCCL all-reduce, on this worker's GPU stream.
    pub struct NcclReducer {
        comm: Comm,
        device: Device,
    }

    impl NcclReducer {
        /// Joins the run described by `env` on `device` (this worker's GPU); the NCCL id comes
        /// from `DIT_NCCL_ID`, or from `DIT_NCCL_ID_FILE` (written by rank 0).
        pub fn join(env: &WorkerEnv, device: &Device) -> Result<Self> {
            let Device::Cuda(cuda) = device else {
                return Err(Error::Input(
                    "data-parallel training needs a CUDA device".into(),
                ));
            };
            let hex = match (
                std::env::var("DIT_NCCL_ID"),
                std::env::var_os("DIT_NCCL_ID_FILE"),
            ) {
                (Ok(hex), _) => hex,
                (Err(_), Some(file)) => id_via_file(std::path::Path::new(&file), env.rank)?,
                _ => {
                    return Err(Error::Input(
                        "a worker needs DIT_NCCL_ID_FILE (or DIT_NCCL_ID from the launcher)".into(),
                    ))
                }
            };
            let bytes = id_from_hex(&hex)?;
            let internal: [std::ffi::c_char; 128] = bytes
                .iter()
                .map(|&b| b as std::ffi::c_char)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|_| Error::Input("DIT_NCCL_ID must be 128 bytes".into()))?;
            let comm = Comm::from_rank(
                cuda.cuda_stream(),
                env.rank,
                env.world_size,
                Id::uninit(internal),
            )
            .map_err(nccl_err)?;
            Ok(Self {
                comm,
                device: device.clone(),
            })
        }
    }

    /// Rank 0 writes a fresh id to `file` (atomically); the others wait for it (10 minutes).
    fn id_via_file(file: &std::path::Path, rank: usize) -> Result<String> {
        let io = |e: std::io::Error| Error::Io {
            path: file.display().to_string(),
            source: e,
        };
        if rank == 0 {
            let hex = new_unique_id()?;
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, &hex).map_err(io)?;
            std::fs::rename(&tmp, file).map_err(io)?;
            return Ok(hex);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        loop {
            if let Ok(hex) = std::fs::read_to_string(file) {
                return Ok(hex);
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Input(format!(
                    "rank {rank}: no NCCL id appeared in {} within 10 minutes",
                    file.display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    impl GradientReducer for NcclReducer {
        fn rank(&self) -> usize {
            self.comm.rank()
        }
        fn world_size(&self) -> usize {
            self.comm.world_size()
        }
        fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
            let Device::Cuda(cuda) = &self.device else {
                unreachable!("checked in join")
            };
            let inputs = tensors
                .iter()
                .map(|t| t.to_dtype(candle_core::DType::F32)?.contiguous())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let mut outputs = Vec::with_capacity(inputs.len());
            // One group: NCCL fuses the many small all-reduces of a step.
            result::group_start().map_err(nccl_err)?;
            for t in &inputs {
                let (storage, layout) = t.storage_and_layout();
                let Storage::Cuda(s) = &*storage else {
                    return Err(Error::Input("NCCL all-reduce of a non-CUDA tensor".into()));
                };
                let (a, b) = layout.contiguous_offsets().expect("made contiguous above");
                let src = s.as_cuda_slice::<f32>()?.slice(a..b);
                // SAFETY: fully written by the all-reduce before use.
                let mut dst = unsafe { cuda.alloc::<f32>(b - a) }?;
                self.comm
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(nccl_err)?;
                outputs.push(dst);
            }
            result::group_end().map_err(nccl_err)?;
            for ((t, input), dst) in tensors.iter_mut().zip(&inputs).zip(outputs) {
                let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, cuda.clone()));
                let sum =
                    Tensor::from_storage(storage, input.shape().clone(), BackpropOp::none(), false);
                *t = sum.to_dtype(t.dtype())?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_and_reject_uneven_splits() {
        let parts: Vec<_> = (0..4).map(|r| shard(32, r, 4).unwrap()).collect();
        assert_eq!(parts, vec![0..8, 8..16, 16..24, 24..32]);
        assert!(shard(30, 0, 4)
            .unwrap_err()
            .to_string()
            .contains("divide evenly"));
    }

    #[test]
    fn nccl_ids_survive_hex() {
        let bytes: Vec<u8> = (0..128).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(id_from_hex(&id_to_hex(&bytes)).unwrap(), bytes);
        assert!(id_from_hex("abc").is_err());
        assert!(id_from_hex("zz").is_err());
    }
}
