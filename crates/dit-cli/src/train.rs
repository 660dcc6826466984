//! `dit train`: train a class-conditional DiT on the built-in MNIST digits (pixel space).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use dit::rng::NoiseRng;
use dit::train::{batch_indices, reference_init, TrainConfig, Trainer};
use dit::DiTConfig;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct TrainArgs {
    /// Output folder: log.jsonl and step-NNNNNNN checkpoints.
    #[arg(long, default_value = "runs/builtin")]
    out: PathBuf,
    /// Continue from a checkpoint folder (step-NNNNNNN) of an earlier run.
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long, default_value_t = 10_000)]
    steps: usize,
    /// Images per optimisation step.
    #[arg(long, alias = "batch-size", default_value_t = 64)]
    global_batch_size: usize,
    /// Images per forward/backward pass; smaller than the global batch means gradient
    /// accumulation (same update, less memory). Default: the global batch.
    #[arg(long)]
    micro_batch_size: Option<usize>,
    /// Linear learning-rate warm-up over this many steps (0: constant, as the paper).
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Mirror each training image with probability 1/2 (the paper's augmentation; off for
    /// digits, which are not mirror-symmetric).
    #[arg(long)]
    flip: bool,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.9999)]
    ema_decay: f64,
    #[arg(long, default_value_t = 6)]
    depth: usize,
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    patch: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 50)]
    log_every: usize,
    #[arg(long, default_value_t = 1000)]
    ckpt_every: usize,
    /// Checkpoints kept (the newest).
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Write a grid of EMA samples (two per class) to OUT/samples/ every N steps (0: never).
    #[arg(long, default_value_t = 1000)]
    sample_every: usize,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let dev = Device::Cpu;
    let micro = a.micro_batch_size.unwrap_or(a.global_batch_size);
    if a.global_batch_size == 0 || a.steps == 0 || micro == 0 {
        bail!("--steps, --global-batch-size and --micro-batch-size must be at least 1");
    }
    let data = dit::data::mnist(&dev)?;
    let cfg = TrainConfig {
        lr: a.lr,
        ema_decay: a.ema_decay,
        warmup_steps: a.warmup,
        ..Default::default()
    };
    let (mut tr, mut pos) = match &a.resume {
        Some(dir) => Trainer::resume(dir, cfg, &dev)?,
        None => {
            let model = DiTConfig {
                input_size: 28,
                patch_size: a.patch,
                in_channels: 1,
                hidden_size: a.hidden,
                depth: a.depth,
                num_heads: a.heads,
                mlp_ratio: 4.0,
                num_classes: data.num_classes,
                learn_sigma: true,
            };
            model.validate()?;
            let init = reference_init(&model, &mut NoiseRng::new(a.seed))?;
            (Trainer::new(&model, init, cfg, a.seed, &dev)?, 0)
        }
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let log_path = a.out.join("log.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let start_step = tr.opt.step;
    let bar = ProgressBar::new(a.steps as u64).with_style(ProgressStyle::with_template(
        "training [{bar:40}] {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
    )?);
    bar.set_position(start_step.min(a.steps) as u64);
    let (mut window_loss, mut window_start, mut last_ckpt) = (0f64, Instant::now(), None);
    let n = data.labels.len();
    while tr.opt.step < a.steps {
        let idx = batch_indices(n, a.seed, pos, a.global_batch_size);
        let ids = Tensor::new(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>().as_slice(),
            &dev,
        )?;
        let mut x = data.images.index_select(&ids, 0)?;
        if a.flip {
            x = dit::data::random_flips(&x, a.seed, pos)?;
        }
        let labels: Vec<usize> = idx.iter().map(|&i| data.labels[i]).collect();
        let loss = tr.step_accumulated(&x, &labels, micro)?;
        pos += a.global_batch_size;
        if !loss.is_finite() {
            bail!(
                "loss became {loss} at step {}; stopping. The last good checkpoint is {}",
                tr.opt.step,
                last_ckpt
                    .as_ref()
                    .map_or("none (no checkpoint yet)".to_string(), |p: &PathBuf| p
                        .display()
                        .to_string())
            );
        }
        window_loss += loss as f64;
        let step = tr.opt.step;
        bar.set_position(step as u64);
        if step % a.log_every == 0 || step == a.steps {
            let steps_in = (step - start_step).min(a.log_every).max(1);
            let secs = window_start.elapsed().as_secs_f64();
            let mean = window_loss / steps_in as f64;
            let line = serde_json::json!({
                "step": step, "loss": mean, "steps_per_s": steps_in as f64 / secs,
                "images_per_s": (steps_in * a.global_batch_size) as f64 / secs,
            });
            writeln!(log, "{line}")?;
            bar.set_message(format!("loss {mean:.4}"));
            window_loss = 0.0;
            window_start = Instant::now();
        }
        if step % a.ckpt_every == 0 || step == a.steps {
            last_ckpt = Some(tr.save(&a.out, pos)?);
            prune(&a.out, a.keep)?;
            plot_loss(&log_path, &a.out.join("loss.png"))?;
        }
        if a.sample_every > 0 && (step % a.sample_every == 0 || step == a.steps) {
            let path = a.out.join("samples").join(format!("step-{step:07}.png"));
            bar.suspend(|| sample_grid(&tr, &path))?;
        }
    }
    bar.finish();
    if let Some(p) = &last_ckpt {
        println!(
            "wrote {} (sample with: dit sample --ckpt {})",
            p.display(),
            p.display()
        );
    }
    Ok(())
}

/// Two samples per class from the EMA weights (50 DDPM steps, guidance 4), as one grid.
fn sample_grid(tr: &Trainer, path: &std::path::Path) -> Result<()> {
    let cfg = &tr.model.config;
    let ema = tr.ema.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let model = dit::checkpoint::build_model(cfg, ema, candle_core::DType::F32, &Device::Cpu)?;
    let labels: Vec<usize> = (0..2).flat_map(|_| 0..cfg.num_classes.min(10)).collect();
    let mut rng = NoiseRng::new(0);
    let shape = (
        labels.len(),
        cfg.in_channels,
        cfg.input_size,
        cfg.input_size,
    );
    let noise = rng.randn_like(&Tensor::zeros(
        shape,
        candle_core::DType::F32,
        &Device::Cpu,
    )?)?;
    let opts = dit::pipeline::SampleOptions {
        steps: 50,
        clip_denoised: true,
        ..Default::default()
    };
    let x = dit::pipeline::sample_latents(&model, &labels, noise, &opts, &mut rng, |_| {})?;
    let rgb = dit::image_io::to_rgb_images(&x.clamp(-1f32, 1f32)?)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    dit::image_io::save_png(
        &dit::image_io::make_grid(&rgb, cfg.num_classes.min(10), 2),
        path,
    )?;
    Ok(())
}

/// Renders the loss column of a training log to a PNG.
pub fn plot_loss(log: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let points = dit::plot::read_loss_log(log)?;
    if points.is_empty() {
        return Ok(());
    }
    dit::image_io::save_png(&dit::plot::loss_curve(&points, 800, 500)?, out)?;
    Ok(())
}

/// Removes all but the newest `keep` step folders.
fn prune(dir: &std::path::Path, keep: usize) -> Result<()> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with("step-"))
        })
        .collect();
    steps.sort();
    for old in steps.iter().rev().skip(keep.max(1)) {
        std::fs::remove_dir_all(old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}
