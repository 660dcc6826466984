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
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
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
}

pub fn run(a: TrainArgs) -> Result<()> {
    let dev = Device::Cpu;
    if a.batch_size == 0 || a.steps == 0 {
        bail!("--steps and --batch-size must be at least 1");
    }
    let data = dit::data::mnist(&dev)?;
    let cfg = TrainConfig {
        lr: a.lr,
        ema_decay: a.ema_decay,
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
        let idx = batch_indices(n, a.seed, pos, a.batch_size);
        let ids = Tensor::new(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>().as_slice(),
            &dev,
        )?;
        let x = data.images.index_select(&ids, 0)?;
        let labels: Vec<usize> = idx.iter().map(|&i| data.labels[i]).collect();
        let loss = tr.step(&x, &labels)?;
        pos += a.batch_size;
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
                "images_per_s": (steps_in * a.batch_size) as f64 / secs,
            });
            writeln!(log, "{line}")?;
            bar.set_message(format!("loss {mean:.4}"));
            window_loss = 0.0;
            window_start = Instant::now();
        }
        if step % a.ckpt_every == 0 || step == a.steps {
            last_ckpt = Some(tr.save(&a.out, pos)?);
            prune(&a.out, a.keep)?;
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
