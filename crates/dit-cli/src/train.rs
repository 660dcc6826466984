//! `dit train`: train a class-conditional DiT on the built-in MNIST digits (pixel space, the
//! default), a latent store from `dit extract-latents`, or an image folder.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use dit::config::BlockDesign;
use dit::data::TrainingSet;
use dit::diffusion::{LossKind, Prediction, Schedule};
use dit::rng::NoiseRng;
use dit::train::{batch_indices, reference_init, TrainConfig, Trainer};
use dit::DiTConfig;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ScheduleArg {
    Linear,
    Cosine,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PredictionArg {
    Eps,
    X0,
    V,
}

/// The block designs of §3.2 of the paper.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BlockArg {
    AdaLnZero,
    AdaLn,
    CrossAttention,
    InContext,
}

impl From<BlockArg> for BlockDesign {
    fn from(b: BlockArg) -> Self {
        match b {
            BlockArg::AdaLnZero => BlockDesign::AdaLnZero,
            BlockArg::AdaLn => BlockDesign::AdaLn,
            BlockArg::CrossAttention => BlockDesign::CrossAttention,
            BlockArg::InContext => BlockDesign::InContext,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LossArg {
    Mse,
    L1,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Training data: a latent store (from `dit extract-latents`) or an image folder (one
    /// sub-folder per class). Default: the built-in digits.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Image folders: centre-crop size in pixels.
    #[arg(long, default_value_t = 256)]
    image_size: usize,
    /// Image folders without --vae: train in pixel space on 1 (grey) or 3 (RGB) channels.
    #[arg(long, default_value_t = 3)]
    channels: usize,
    /// Image folders: encode each batch with this VAE (a latent model), as `dit sample --vae`.
    #[arg(long)]
    vae: Option<String>,
    /// A named config (DiT-S/2 … DiT-XL/8) instead of --depth/--hidden/--heads/--patch.
    #[arg(long)]
    model: Option<String>,
    /// Noise schedule of a new model (DiT: linear).
    #[arg(long, value_enum, default_value = "linear")]
    schedule: ScheduleArg,
    /// What a new model predicts (DiT: eps).
    #[arg(long, value_enum, default_value = "eps")]
    prediction: PredictionArg,
    /// How a new model's blocks are conditioned on timestep and class (§3.2 of the paper; the
    /// released models use ada-ln-zero).
    #[arg(long, value_enum, default_value = "ada-ln-zero")]
    block: BlockArg,
    /// Regression loss on the prediction (the paper: mse; the VB term is added either way).
    #[arg(long, value_enum, default_value = "mse")]
    loss: LossArg,
    /// Fine-tune: start from this checkpoint (.pt, .safetensors or a `dit train` folder; config
    /// inferred), with the label table resized to the data's classes.
    #[arg(long)]
    init: Option<PathBuf>,
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
    /// Compute dtype: f32, or bf16 mixed precision (f32 weights, optimiser and EMA; GPU only).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: crate::sample::DTypeArg,
    /// Linear learning-rate warm-up over this many steps (0: constant, as the paper).
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Mirror each training image with probability 1/2 (the paper's augmentation; off for
    /// digits, which are not mirror-symmetric).
    #[arg(long)]
    flip: bool,
    /// Learning rate [default: the paper's 1e-4 with --data; 3e-4 for the built-in digits, the
    /// embedded model's recipe].
    #[arg(long)]
    lr: Option<f64>,
    /// EMA decay [default: the paper's 0.9999 with --data; 0.999 for the built-in digits].
    #[arg(long)]
    ema_decay: Option<f64>,
    #[arg(long, default_value_t = 6)]
    depth: usize,
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Patch size of a custom model [default: 4 for the built-in digits, 2 otherwise].
    #[arg(long)]
    patch: Option<usize>,
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
    /// Data-parallel training on this many GPUs of this machine (one process each, NCCL; needs
    /// a `--features cuda,nccl` build). The global batch is split evenly over them.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
}

pub fn run(a: TrainArgs, dev: &Device) -> Result<()> {
    let micro = a.micro_batch_size.unwrap_or(a.global_batch_size);
    if a.global_batch_size == 0 || a.steps == 0 || micro == 0 {
        bail!("--steps, --global-batch-size and --micro-batch-size must be at least 1");
    }
    if a.gpus > 1 && dit::distributed::WorkerEnv::from_env()?.is_none() {
        return crate::launch::launch(a.gpus);
    }
    let (device, worker, reducer) = crate::launch::worker(dev)?;
    let dev = &device;
    let rows = match &worker {
        Some(w) => dit::distributed::shard(a.global_batch_size, w.rank, w.world_size)?,
        None => 0..a.global_batch_size,
    };
    // Rank 0 (or a single process) writes the log, checkpoints and sample grids.
    let leader = worker.as_ref().is_none_or(|w| w.rank == 0);
    let data = training_set(&a, dev)?;
    let (channels, size) = data.input()?;
    let cfg = TrainConfig {
        // With no --data, the embedded model's recipe (a short run); otherwise the paper's.
        lr: a.lr.unwrap_or(if a.data.is_none() { 3e-4 } else { 1e-4 }),
        ema_decay: a
            .ema_decay
            .unwrap_or(if a.data.is_none() { 0.999 } else { 0.9999 }),
        warmup_steps: a.warmup,
        loss: match a.loss {
            LossArg::Mse => LossKind::Mse,
            LossArg::L1 => LossKind::L1,
        },
        compute_dtype: a.dtype.dtype_on(dev)?,
        ..Default::default()
    };
    let (mut tr, mut pos) = match &a.resume {
        Some(dir) => Trainer::resume(dir, cfg, dev)?,
        None => {
            let (model, init) = initial_weights(&a, channels, size, data.num_classes())?;
            (Trainer::new(&model, init, cfg, a.seed, dev)?, 0)
        }
    };
    let mc = &tr.model.config;
    if (mc.in_channels, mc.input_size) != (channels, size) || mc.num_classes < data.num_classes() {
        bail!(
            "the model takes {} channels at {}x{} with {} classes but the data has {channels} at {size}x{size} with {}",
            mc.in_channels, mc.input_size, mc.input_size, mc.num_classes, data.num_classes()
        );
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let log_path = a.out.join("log.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let start_step = tr.opt.step;
    let bar = if leader {
        ProgressBar::new(a.steps as u64).with_style(ProgressStyle::with_template(
            "training [{bar:40}] {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
        )?)
    } else {
        ProgressBar::hidden()
    };
    bar.set_position(start_step.min(a.steps) as u64);
    let (mut window_loss, mut window_start, mut last_ckpt) = (0f64, Instant::now(), None);
    let n = data.len();
    while tr.opt.step < a.steps {
        let idx = batch_indices(n, a.seed, pos, a.global_batch_size);
        let mine = &idx[rows.clone()];
        let (x, labels) = data.batch(mine, a.flip, a.seed, pos + rows.start, dev)?;
        let loss = tr.step_sharded(
            &x,
            &labels,
            rows.clone(),
            a.global_batch_size,
            micro,
            reducer.as_ref(),
        )?;
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
        if !leader {
            continue;
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
            bar.set_message(format!(
                "loss {mean:.4}, {:.2} steps/s, {:.1} images/s",
                steps_in as f64 / secs,
                (steps_in * a.global_batch_size) as f64 / secs
            ));
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
    if let (true, Some(p)) = (leader, &last_ckpt) {
        println!(
            "wrote {} (sample with: dit sample --ckpt {})",
            p.display(),
            p.display()
        );
    }
    Ok(())
}

fn training_set(a: &TrainArgs, dev: &Device) -> Result<TrainingSet> {
    use dit::data::latents::LatentStore;
    let Some(dir) = &a.data else {
        return Ok(TrainingSet::Images(dit::data::mnist(dev)?));
    };
    if LatentStore::is_store(dir) {
        return Ok(TrainingSet::Latents(LatentStore::open(dir)?));
    }
    let folder = dit::data::folder::ImageFolder::open(dir)?;
    let vae = match &a.vae {
        Some(v) => {
            let vae = dit::vae::Vae::open(v, candle_core::DType::F32, dev)?;
            if !a.image_size.is_multiple_of(vae.factor) {
                bail!(
                    "--image-size must be a multiple of the VAE's factor {}",
                    vae.factor
                );
            }
            Some(Box::new(vae))
        }
        None => None,
    };
    Ok(TrainingSet::Folder {
        folder,
        size: a.image_size,
        channels: a.channels,
        vae,
    })
}

/// The config and starting weights of a new run: fine-tuned from `--init`, a named config, or
/// the custom dimensions; reference initialisation for the latter two.
fn initial_weights(
    a: &TrainArgs,
    channels: usize,
    size: usize,
    num_classes: usize,
) -> Result<(DiTConfig, dit::checkpoint::Tensors)> {
    if let Some(path) = &a.init {
        let (cfg, mut w) = if path.is_dir() {
            let (cfg, w) = dit::checkpoint::read_training_dir(path)?;
            (Some(cfg), w)
        } else {
            let cfg = dit::checkpoint::config_beside(path)?;
            (cfg, dit::checkpoint::read_tensors(path)?)
        };
        let mut cfg = match (cfg, &a.model) {
            (_, Some(name)) => DiTConfig::named(name, size * 8)?,
            (Some(cfg), None) => cfg,
            (None, None) => dit::checkpoint::infer_config(&w, Some(size))?,
        };
        cfg.input_size = size;
        if cfg.in_channels != channels {
            bail!(
                "{} takes {} input channels, the data has {channels}",
                path.display(),
                cfg.in_channels
            );
        }
        for t in w.values_mut() {
            *t = t.to_dtype(candle_core::DType::F32)?;
        }
        dit::train::resize_label_table(&mut w, num_classes, &mut NoiseRng::new(a.seed))?;
        cfg.num_classes = num_classes;
        let cfg = with_target(cfg, a);
        dit::checkpoint::validate(&cfg, &w)
            .with_context(|| format!("fine-tuning from {}", path.display()))?;
        return Ok((cfg, w));
    }
    let model = match &a.model {
        Some(name) => {
            let mut cfg = DiTConfig::named(name, size * 8)?;
            (cfg.in_channels, cfg.input_size, cfg.num_classes) = (channels, size, num_classes);
            cfg.block = a.block.into();
            cfg
        }
        None => DiTConfig {
            input_size: size,
            patch_size: a.patch.unwrap_or(if a.data.is_none() { 4 } else { 2 }),
            in_channels: channels,
            hidden_size: a.hidden,
            depth: a.depth,
            num_heads: a.heads,
            mlp_ratio: 4.0,
            num_classes,
            learn_sigma: true,
            schedule: Default::default(),
            prediction: Default::default(),
            block: a.block.into(),
            text: None,
        },
    };
    let model = with_target(model, a);
    model.validate()?;
    let init = reference_init(&model, &mut NoiseRng::new(a.seed))?;
    Ok((model, init))
}

/// The schedule and prediction target chosen on the command line.
fn with_target(mut cfg: DiTConfig, a: &TrainArgs) -> DiTConfig {
    cfg.schedule = match a.schedule {
        ScheduleArg::Linear => Schedule::Linear,
        ScheduleArg::Cosine => Schedule::Cosine,
    };
    cfg.prediction = match a.prediction {
        PredictionArg::Eps => Prediction::Eps,
        PredictionArg::X0 => Prediction::X0,
        PredictionArg::V => Prediction::V,
    };
    cfg
}

/// Two samples per class from the EMA weights (50 DDPM steps, guidance 4), as one grid.
fn sample_grid(tr: &Trainer, path: &std::path::Path) -> Result<()> {
    let cfg = &tr.model.config;
    let ema = tr.ema.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let dev = tr.model.device();
    let model = dit::checkpoint::build_model(cfg, ema, candle_core::DType::F32, dev)?;
    let labels: Vec<usize> = (0..2).flat_map(|_| 0..cfg.num_classes.min(10)).collect();
    let mut rng = NoiseRng::new(0);
    let shape = (
        labels.len(),
        cfg.in_channels,
        cfg.input_size,
        cfg.input_size,
    );
    let noise = rng.randn_like(&Tensor::zeros(shape, candle_core::DType::F32, dev)?)?;
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
