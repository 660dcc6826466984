//! `dit extract-latents`: encode an image folder once with the VAE (each image and its mirror,
//! as fast-DiT), so training reads latents instead of running the encoder every step.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use dit::data::folder::{
    aspect_buckets, nearest_bucket, read_rgb, resize_crop, to_tensor, ImageFolder,
};
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
    /// Keep each image's aspect ratio: resize and crop it to the nearest of the aspect-ratio
    /// buckets of about --image-size squared pixels (1:4 to 4:1, sides multiples of
    /// --bucket-multiple) instead of the centre square. Train such a store with `--pack`.
    #[arg(long)]
    keep_aspect: bool,
    /// Side multiple of the buckets in pixels (64: latent sides multiples of 8, for any patch).
    #[arg(long, default_value_t = 64)]
    bucket_multiple: u32,
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
    let buckets = match a.keep_aspect {
        true => {
            if a.bucket_multiple == 0 || !a.bucket_multiple.is_multiple_of(vae.factor as u32) {
                bail!(
                    "--bucket-multiple must be a multiple of the VAE's factor {}",
                    vae.factor
                );
            }
            store = store.bucketed();
            aspect_buckets(a.image_size as u32, a.bucket_multiple)
        }
        false => vec![(a.image_size as u32, a.image_size as u32)],
    };
    let mut per_bucket = vec![0usize; buckets.len()];
    let mut rng = NoiseRng::new(a.seed);
    let bar = ProgressBar::new(folder.items.len() as u64).with_style(ProgressStyle::with_template(
        "encoding [{bar:40}] {pos}/{len} images {elapsed_precise} eta {eta} {msg}",
    )?);
    let mut skipped = 0usize;
    for chunk in folder.items.chunks(a.batch_size) {
        // Per bucket: the chunk's images cropped to it, and their labels.
        let mut groups: Vec<(Vec<_>, Vec<usize>)> =
            buckets.iter().map(|_| (Vec::new(), Vec::new())).collect();
        for (path, label) in chunk {
            match read_rgb(path) {
                Ok(img) => {
                    let b = nearest_bucket(&buckets, img.width(), img.height());
                    let k = buckets.iter().position(|&x| x == b).expect("a bucket");
                    groups[k].0.push(resize_crop(&img, b.0, b.1));
                    groups[k].1.push(*label);
                    per_bucket[k] += 1;
                }
                Err(e) => {
                    skipped += 1;
                    bar.suspend(|| eprintln!("skipped: {e}"));
                    bar.set_message(format!("{skipped} skipped"));
                }
            }
        }
        bar.inc(chunk.len() as u64);
        for (images, labels) in groups.iter().filter(|g| !g.0.is_empty()) {
            let x = to_tensor(images, 3, device)?.to_dtype(dtype)?;
            let flipped = dit::data::flip_horizontal(&x)?;
            let z = vae
                .encode(&x, &mut rng)?
                .to_dtype(candle_core::DType::F32)?;
            let zf = vae
                .encode(&flipped, &mut rng)?
                .to_dtype(candle_core::DType::F32)?;
            store.push(&z, &zf, labels)?;
        }
    }
    bar.finish();
    if a.keep_aspect {
        let used: Vec<String> = buckets
            .iter()
            .zip(&per_bucket)
            .filter(|(_, &n)| n > 0)
            .map(|((w, h), n)| format!("{w}x{h}: {n}"))
            .collect();
        println!(
            "aspect-ratio buckets (width x height: images): {}",
            used.join(", ")
        );
    }
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
