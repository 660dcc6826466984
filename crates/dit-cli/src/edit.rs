//! `dit edit` (image-to-image) and `dit inpaint`: start from a given picture instead of noise.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use dit::data::folder::{center_crop, read_rgb, to_tensor};
use dit::rng::NoiseRng;
use dit::DiT;
use indicatif::{ProgressBar, ProgressStyle};

use crate::sample::{to_images, ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct EditArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The input picture (centre-cropped and resized to the model's size).
    #[arg(long)]
    image: PathBuf,
    /// How far to noise the input: 0 returns it (up to the VAE), 1 ignores it.
    #[arg(long, default_value_t = 0.6)]
    strength: f64,
    /// Classes to draw (one result each), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    labels: Vec<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// PNG grid: the input, then each result.
    #[arg(long, default_value = "edit.png")]
    out: PathBuf,
}

#[derive(Args)]
pub struct InpaintArgs {
    #[command(flatten)]
    edit: EditArgs,
    /// Mask PNG (same framing as the image): white marks the region to regenerate.
    #[arg(long)]
    mask: PathBuf,
    /// Regenerate the black region instead.
    #[arg(long)]
    invert_mask: bool,
    /// Repeat each step this many times, renoising in between (RePaint's harmonisation).
    #[arg(long, default_value_t = 1)]
    resample: usize,
}

/// The model, VAE, its input picture in model space and the pixel size.
struct Prepared {
    model: DiT,
    vae: Option<dit::vae::Vae>,
    dtype: DType,
    x0: Tensor,
    pixels: usize,
}

fn prepare(a: &EditArgs, device: &Device) -> Result<Prepared> {
    let (dtype, model) = a.model.load(device)?;
    let cfg = model.config.clone();
    let vae = a.model.vae_for(&cfg, dtype, device)?;
    let pixels = cfg.input_size * vae.as_ref().map_or(1, |v| v.factor);
    let img = center_crop(&read_rgb(&a.image)?, pixels as u32);
    let x0 = match &vae {
        Some(v) => v
            .encode_mean(&to_tensor(&[img], 3, device)?.to_dtype(dtype)?)?
            .to_dtype(DType::F32)?,
        None => to_tensor(&[img], cfg.in_channels, device)?,
    };
    Ok(Prepared {
        model,
        vae,
        dtype,
        x0,
        pixels,
    })
}

fn bar(steps: usize) -> Result<ProgressBar> {
    Ok(
        ProgressBar::new(steps as u64).with_style(ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} steps {elapsed_precise} eta {eta}",
        )?),
    )
}

/// Writes the input and the results side by side.
fn write(p: &Prepared, result: &Tensor, out: &std::path::Path) -> Result<()> {
    let both = Tensor::cat(&[&p.x0, result], 0)?;
    let images = to_images(&both, p.vae.as_ref(), p.dtype, &p.model.config)?
        .context("no VAE to decode the latents")?;
    let rgb = dit::image_io::to_rgb_images(&images)?;
    dit::image_io::save_png(&dit::image_io::make_grid(&rgb, rgb.len(), 2), out)?;
    println!(
        "wrote {} (input, then {} results)",
        out.display(),
        rgb.len() - 1
    );
    Ok(())
}

pub fn edit(a: EditArgs, device: &Device) -> Result<()> {
    let p = prepare(&a, device)?;
    let opts = a.sampling.options(&p.model.config, 250)?;
    let n = a.labels.len();
    let x0 = p.x0.repeat((n, 1, 1, 1))?;
    let mut rng = NoiseRng::new(a.seed);
    let noise = rng.randn_like(&x0)?;
    let k = dit::pipeline::edit_steps(a.strength, opts.steps)?;
    let pb = bar(k)?;
    pb.set_message(format!("editing ({k} of {} steps)", opts.steps));
    let result = dit::pipeline::edit_latents(
        &p.model,
        &a.labels,
        &x0,
        a.strength,
        noise,
        &opts,
        &mut rng,
        |s| pb.set_position(s as u64),
    )?;
    pb.finish_and_clear();
    write(&p, &result, &a.out)
}

pub fn inpaint(a: InpaintArgs, device: &Device) -> Result<()> {
    let e = &a.edit;
    let p = prepare(e, device)?;
    let cfg = &p.model.config;
    let opts = e.sampling.options(cfg, 250)?;
    // The mask in model space: resized like the image, then to the latent grid; 1 = keep.
    let m = center_crop(&read_rgb(&a.mask)?, p.pixels as u32);
    let m = to_tensor(&[m], 1, device)?; // [-1, 1], white = 1
    let m = if cfg.input_size != p.pixels {
        m.interpolate2d(cfg.input_size, cfg.input_size)?
    } else {
        m
    };
    let regenerate = m.ge(0.0)?.to_dtype(DType::F32)?;
    let keep = if a.invert_mask {
        regenerate
    } else {
        (1.0 - regenerate)?
    };
    if a.resample == 0 {
        bail!("--resample must be at least 1");
    }
    let n = e.labels.len();
    let x0 = p.x0.repeat((n, 1, 1, 1))?;
    let mut rng = NoiseRng::new(e.seed);
    let noise = rng.randn_like(&x0)?;
    let pb = bar(opts.steps)?;
    pb.set_message("inpainting");
    let result = dit::pipeline::inpaint_latents(
        &p.model,
        &e.labels,
        &x0,
        &keep,
        noise,
        &opts,
        a.resample,
        &mut rng,
        |s| pb.set_position(s as u64),
    )?;
    pb.finish_and_clear();
    write(&p, &result, &e.out)
}
