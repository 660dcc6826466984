//! `dit decode`: latents saved by `dit sample --save-latents` (or any float (N, C, H, W) or
//! (N, C, T, H, W) .npy of scaled SD latents) to images through the VAE.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;

use crate::sample::{decode, save_images, DTypeArg};

#[derive(Args)]
pub struct DecodeArgs {
    /// Latents .npy: (N, C, H, W) images or (N, C, T, H, W) clips, already times 0.18215.
    latents: PathBuf,
    /// VAE: a diffusers folder or file, `ema` / `mse` (stabilityai/sd-vae-ft-*), or a hub repo id.
    #[arg(long, default_value = "ema")]
    vae: String,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// PNG grid (clips: a grid of frames, and a GIF beside it).
    #[arg(long, default_value = "decoded.png")]
    out: PathBuf,
    /// Also one PNG (clips: a GIF and frames) per sample in this folder.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Also the decoded images as float32 .npy, in [-1, 1] before any clamping.
    #[arg(long)]
    save_images: Option<PathBuf>,
}

pub fn run(a: DecodeArgs, device: &Device) -> Result<()> {
    let latents = Tensor::read_npy(&a.latents)
        .with_context(|| format!("cannot read latents {}", a.latents.display()))?;
    let dtype = a.dtype.dtype_on(device)?;
    let vae = dit::vae::Vae::open(&a.vae, dtype, device)?;
    let dims = latents.dims().to_vec();
    if !(dims.len() == 4 || dims.len() == 5) || dims[1] != vae.latent_channels {
        bail!(
            "latents {} have shape {dims:?}; the VAE takes (N, {c}, H, W) or (N, {c}, T, H, W)",
            a.latents.display(),
            c = vae.latent_channels
        );
    }
    let latents = latents.to_dtype(DType::F32)?.to_device(device)?;
    let images = decode(&latents, &vae, dtype)?.to_dtype(DType::F32)?;
    if let Some(p) = &a.save_images {
        images
            .to_device(&Device::Cpu)?
            .write_npy(p)
            .with_context(|| format!("cannot write {}", p.display()))?;
        println!("wrote images {:?} to {}", images.dims(), p.display());
    }
    save_images(&images, &a.out, a.out_dir.as_deref())
}
