//! `dit extract-latents`: encode an image folder once with the VAE (each image and its mirror,
//! as fast-DiT), so training reads latents instead of running the encoder every step.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use dit::data::folder::{center_crop, read_rgb, to_tensor, ImageFolder};
use dit::data::latents::LatentStoreWriter;
use dit::rng::NoiseRng;
use indicatif::{ProgressBar, ProgressStyle};

use crate::sample::DTypeArg;

#[derive(Args)]
pub struct ExtractArgs {
    /// Image folder: one sub-folder per class (class index = sorted folder order), or a captioned
    /// set (see `dit train --data`), whose captions the store keeps.
    data: PathBuf,
    /// Output folder for the latent store.
    #[arg(long)]
    out: PathBuf,
    /// Centre-crop size in pixels (ADM's crop); latents are size / 8 with SD's VAE.
    #[arg(long, default_value_t = 256)]
    image_size: usize,
    /// VAE: a diffusers folder or file, `ema` / `mse`, or a hub repo id.
    #[arg(long, default_value = "ema")]
    vae: String,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Samples per shard file.
    #[arg(long, default_value_t = 1024)]
    shard_size: usize,
    /// Seed of the latent samples (mean + std * noise, as the reference's `.sample()`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
}

pub fn run(a: ExtractArgs, device: &Device) -> Result<()> {
    if a.image_size == 0 || a.batch_size == 0 {
        bail!("--image-size and --batch-size must be at least 1");
    }
    let dtype = a.dtype.dtype_on(device)?;
    let folder = ImageFolder::open_any(&a.data)?;
    let vae = dit::vae::Vae::open(&a.vae, dtype, device)?;
    if !a.image_size.is_multiple_of(vae.factor) {
        bail!(
            "--image-size must be a multiple of the VAE's factor {}",
            vae.factor
        );
    }
    let s = a.image_size / vae.factor;
    let c = vae.latent_channels;
    let mut store = LatentStoreWriter::create(
        &a.out,
        [c, s, s],
        a.image_size,
        folder.classes.clone(),
        folder.captions.clone(),
        a.shard_size,
    )?;
    let mut rng = NoiseRng::new(a.seed);
    let bar = ProgressBar::new(folder.items.len() as u64).with_style(ProgressStyle::with_template(
        "encoding [{bar:40}] {pos}/{len} images {elapsed_precise} eta {eta} {msg}",
    )?);
    let mut skipped = 0usize;
    for chunk in folder.items.chunks(a.batch_size) {
        let mut images = Vec::new();
        let mut labels = Vec::new();
        for (path, label) in chunk {
            match read_rgb(path) {
                Ok(img) => {
                    images.push(center_crop(&img, a.image_size as u32));
                    labels.push(*label);
                }
                Err(e) => {
                    skipped += 1;
                    bar.suspend(|| eprintln!("skipped: {e}"));
                    bar.set_message(format!("{skipped} skipped"));
                }
            }
        }
        bar.inc(chunk.len() as u64);
        if images.is_empty() {
            continue;
        }
        let x = to_tensor(&images, 3, device)?.to_dtype(dtype)?;
        let flipped = dit::data::flip_horizontal(&x)?;
        let z = vae
            .encode(&x, &mut rng)?
            .to_dtype(candle_core::DType::F32)?;
        let zf = vae
            .encode(&flipped, &mut rng)?
            .to_dtype(candle_core::DType::F32)?;
        store.push(&z, &zf, &labels)?;
    }
    bar.finish();
    let n = store.finish()?;
    let labels = match &folder.captions {
        Some(c) => format!("{} captions", c.len()),
        None => format!("{} classes", folder.classes.len()),
    };
    println!(
        "wrote {n} latents ({labels}, {c}x{s}x{s}) to {}; {skipped} unreadable images skipped",
        a.out.display()
    );
    Ok(())
}
