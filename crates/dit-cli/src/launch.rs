//! `dit train --gpus N`: one worker process per GPU (as torchrun), joined by NCCL. The workers
//! run this same command line with the environment of `dit::distributed` set.

use anyhow::{bail, Result};
use dit::distributed::WorkerEnv;

/// The device and gradient reducer of this process: a worker's GPU and NCCL group when
/// `DIT_WORLD_SIZE` is set, else `device` alone.
pub fn worker(
    device: &candle_core::Device,
) -> Result<(
    candle_core::Device,
    Option<WorkerEnv>,
    Box<dyn dit::distributed::GradientReducer>,
)> {
    let Some(env) = WorkerEnv::from_env()? else {
        return Ok((
            device.clone(),
            None,
            Box::new(dit::distributed::SingleProcess),
        ));
    };
    let dev = dit::device::parse(&format!("cuda:{}", env.local_rank))?;
    #[cfg(feature = "nccl")]
    {
        let reducer = dit::distributed::NcclReducer::join(&env, &dev)?;
        Ok((dev, Some(env), Box::new(reducer)))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = dev;
        bail!(
            "DIT_WORLD_SIZE is set but this build has no NCCL: rebuild with `--features cuda,nccl`"
        )
    }
}

/// Starts `gpus` workers running this command line on GPUs 0..gpus and waits for them; when
/// one fails, the others are stopped.
pub fn launch(gpus: usize) -> Result<()> {
    #[cfg(not(feature = "nccl"))]
    bail!("--gpus {gpus}: this build has no NCCL; rebuild with `--features cuda,nccl`");
    #[cfg(feature = "nccl")]
    {
        use anyhow::Context as _;
        let id = dit::distributed::new_unique_id()?;
        let exe = std::env::current_exe().context("cannot find the dit executable")?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut children = Vec::with_capacity(gpus);
        for rank in 0..gpus {
            let child = std::process::Command::new(&exe)
                .args(&args)
                .env("DIT_WORLD_SIZE", gpus.to_string())
                .env("DIT_RANK", rank.to_string())
                .env("DIT_LOCAL_RANK", rank.to_string())
                .env("DIT_NCCL_ID", &id)
                .spawn()
                .with_context(|| format!("cannot start worker {rank}"))?;
            children.push(child);
        }
        // Poll until every worker has ended or one has failed.
        let mut failed = None;
        let mut running = vec![true; children.len()];
        while failed.is_none() && running.iter().any(|&r| r) {
            std::thread::sleep(std::time::Duration::from_millis(200));
            for (rank, child) in children.iter_mut().enumerate() {
                if let (true, Some(status)) = (running[rank], child.try_wait()?) {
                    running[rank] = false;
                    if !status.success() {
                        failed = Some((rank, status));
                    }
                }
            }
        }
        if let Some((rank, status)) = failed {
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            bail!("worker {rank} failed ({status}); stopped the others");
        }
        Ok(())
    }
}
