//! `dit sample-many`: the reference `sample_ddp.py` as one resumable command: N samples with
//! seeded random (or balanced) labels, written in shards as they finish (a rerun skips finished
//! shards), then gathered into one `.npz` with `arr_0`, uint8 (N, H, W, 3), as the ADM
//! evaluation suite reads it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use dit::rng::NoiseRng;

use crate::sample::{sample_batched, to_images, ModelArgs, SamplingArgs};

#[derive(Clone, Copy, ValueEnum)]
pub enum LabelMode {
    /// Uniform random classes from the seed (as sample_ddp.py).
    Random,
    /// The same number of samples of every class, in class order.
    Balanced,
}

#[derive(Args)]
pub struct SampleManyArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long, default_value_t = 50_000)]
    num_samples: usize,
    #[arg(long, value_enum, default_value = "random")]
    labels: LabelMode,
    /// Samples per shard (the unit of resumption).
    #[arg(long, default_value_t = 1000)]
    shard_size: usize,
    /// Samples per forward batch (guidance doubles it).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The output .npz.
    #[arg(long)]
    npz: PathBuf,
    /// Where finished shards are kept (default: the .npz path with `.shards` appended).
    #[arg(long)]
    shard_dir: Option<PathBuf>,
}

pub fn run(a: SampleManyArgs, device: &Device) -> Result<()> {
    if a.num_samples == 0 || a.shard_size == 0 || a.batch_size == 0 {
        bail!("--num-samples, --shard-size and --batch-size must be at least 1");
    }
    let (dtype, model) = a.model.load(device)?;
    let cfg = model.config.clone();
    let opts = a.sampling.options(&cfg, 250)?;
    let vae = a.model.vae_for(&cfg, dtype, device)?;
    let dir = a.shard_dir.clone().unwrap_or_else(|| {
        let mut p = a.npz.clone().into_os_string();
        p.push(".shards");
        p.into()
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let k = cfg.num_classes;
    let shards = a.num_samples.div_ceil(a.shard_size);
    let mut parts = Vec::with_capacity(shards);
    for s in 0..shards {
        let start = s * a.shard_size;
        let n = a.shard_size.min(a.num_samples - start);
        let path = dir.join(format!("shard-{s:05}.npy"));
        if let Ok(t) = Tensor::read_npy(&path) {
            if t.dim(0).ok() == Some(n) && t.dtype() == DType::U8 {
                println!("shard {}/{shards}: done before, kept", s + 1);
                parts.push(t);
                continue;
            }
        }
        // Each shard's labels and noise come from its own seeded stream, so a rerun that skips
        // finished shards draws the others exactly as an uninterrupted run.
        let mut rng = NoiseRng::new(a.seed.wrapping_mul(1_000_003).wrapping_add(s as u64));
        let labels: Vec<usize> = (start..start + n)
            .map(|i| match a.labels {
                LabelMode::Random => rng.below(k),
                LabelMode::Balanced => i * k / a.num_samples,
            })
            .collect();
        let shape = (n, cfg.in_channels, cfg.input_size, cfg.input_size);
        let noise = rng.randn_like(&Tensor::zeros(shape, DType::F32, device)?)?;
        println!("shard {}/{shards}: sampling {n}", s + 1);
        let latents = sample_batched(&model, &labels, &noise, &opts, a.batch_size, &mut rng)?;
        let images = to_images(&latents, vae.as_ref(), dtype, &cfg)?
            .context("no VAE to decode the latents")?;
        let u8s = dit::image_io::to_uint8_nhwc(&images)?;
        let tmp = path.with_extension("tmp.npy");
        u8s.write_npy(&tmp)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        parts.push(u8s);
    }
    let all = Tensor::cat(&parts, 0)?;
    let tmp = a.npz.with_extension("tmp.npz");
    Tensor::write_npz(&[("arr_0", &all)], &tmp)?;
    std::fs::rename(&tmp, &a.npz).with_context(|| format!("cannot write {}", a.npz.display()))?;
    println!("wrote {} ({:?} uint8)", a.npz.display(), all.dims());
    Ok(())
}
