//! `dit train`: train a DiT on the built-in MNIST digits (pixel space, the default) or shapes, a
//! latent store from `dit extract-latents`, or an image folder. Class folders train
//! class-conditional models; captioned sets (`.txt` beside images, JSON Lines, the emoji package,
//! the built-in shapes) train text-conditioned (GenTron) ones on cached text embeddings.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use dit::config::{BlockDesign, TextConditioning};
use dit::data::text_cache::TextCache;
use dit::data::TrainingSet;
use dit::diffusion::{LossKind, Prediction, Schedule};
use dit::rng::NoiseRng;
use dit::train::{batch_indices, reference_init, Conditions, TrainConfig, Trainer};
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

/// The embedded training sets.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BuiltinArg {
    /// 10,000 MNIST digits, 28x28 grey, 10 classes.
    Mnist,
    /// Rendered captioned shapes ("a red circle in the top left on a black background"), RGB;
    /// the held-out caption combinations are left out (`dit eval-shapes` measures them).
    Shapes,
    /// Captioned clips of a shape gliding across ("a red circle moving left on a black
    /// background"): trains a text-to-video model (`--frames`; `dit eval-motion` measures it).
    MovingShapes,
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
    /// Captioned data trains a text-conditioned model: a folder of images with `.txt` captions
    /// beside them, a `.jsonl` of file_name / text pairs (or a folder with `metadata.jsonl`), or
    /// the npm package `emoji-datasource-google`'s folder. Captioned clips (sub-folders of frames
    /// or GIFs, each with a `.txt` of the same name) train a text-to-video model.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Without --data: which embedded set.
    #[arg(long, value_enum, default_value = "mnist")]
    builtin: BuiltinArg,
    /// Image folders: centre-crop size in pixels [default: 256; built-in shapes: 32].
    #[arg(long)]
    image_size: Option<usize>,
    /// Built-in shapes: renderings of each training caption.
    #[arg(long, default_value_t = 16)]
    per_caption: usize,
    /// Video data (built-in moving shapes, clip folders): frames per clip.
    #[arg(long, default_value_t = 8)]
    frames: usize,
    /// Clip folders: take every Nth frame.
    #[arg(long, default_value_t = 1)]
    frame_stride: usize,
    /// New video models: spacetime patches (Sora) of this many frames x patch x patch, attended
    /// all at once, instead of per-frame patches with temporal attention.
    #[arg(long)]
    tubelet: Option<usize>,
    /// Video models: probability that a clip trains motion-free (frames attending only to
    /// themselves), for motion-free guidance (GenTron §3.3.2).
    #[arg(long, default_value_t = 0.1)]
    motion_free: f64,
    /// Video models: joint image-video training; motion-free clips show their first frame
    /// throughout (an image repeated over the frames).
    #[arg(long)]
    joint_images: bool,
    /// Captioned data: the text encoder folder or Hugging Face repo id (default: `$DIT_MINILM`, else the folder
    /// `tools/fetch-minilm.sh` writes, ~/.cache/dit/all-MiniLM-L6-v2); twice for GenTron's two
    /// encoders alternating over the blocks (the first also gives the pooled embedding: CLIP,
    /// then T5). Captions are encoded once into OUT/text-embeddings.safetensors.
    #[arg(long)]
    text_encoder: Vec<PathBuf>,
    /// Captioned data: captions are cut to this many tokens.
    #[arg(long, default_value_t = 77)]
    max_tokens: usize,
    /// Image folders without --vae: train in pixel space on 1 (grey) or 3 (RGB) channels.
    #[arg(long, default_value_t = 3)]
    channels: usize,
    /// Image folders: encode each batch with this VAE (a latent model), as `dit sample --vae`.
    #[arg(long)]
    vae: Option<String>,
    /// A named config (DiT-S/2 … DiT-XL/8; GenTron-XL/2, GenTron-G/2 for captioned data)
    /// instead of --depth/--hidden/--heads/--patch.
    #[arg(long)]
    model: Option<String>,
    /// Noise schedule [default: linear (DiT's) for a new model, the checkpoint's with --init].
    #[arg(long, value_enum)]
    schedule: Option<ScheduleArg>,
    /// What the model predicts [default: eps (DiT's) for a new model, the checkpoint's with
    /// --init; fine-tuning to another target retrains the output to it].
    #[arg(long, value_enum)]
    prediction: Option<PredictionArg>,
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
    /// From this optimiser step on, decay the learning rate along a half cosine to --min-lr at
    /// --steps (default: constant, as the paper).
    #[arg(long)]
    decay_from: Option<usize>,
    /// The learning rate at the end of the decay.
    #[arg(long, default_value_t = 0.0, requires = "decay_from")]
    min_lr: f64,
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
    /// Patch n' pack (NaViT): run each batch as sequences of this many tokens, several images
    /// per sequence, attention block-diagonal (needed for a store of mixed sizes from
    /// `extract-latents --keep-aspect`; 0: off).
    #[arg(long, default_value_t = 0)]
    pack: usize,
    /// With --pack: the share of each image's patches left out (NaViT's token dropping).
    #[arg(long, default_value_t = 0.0)]
    token_drop: f64,
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
    if a.pack > 0 && (a.gpus > 1 || worker.is_some() || micro != a.global_batch_size) {
        bail!("--pack trains on one device without micro-batches");
    }
    if !(0.0..1.0).contains(&a.token_drop) || (a.token_drop > 0.0 && a.pack == 0) {
        bail!("--token-drop takes a share in [0, 1) and needs --pack");
    }
    let data = training_set(&a, dev)?;
    if data.is_bucketed() && a.pack == 0 {
        bail!("this latent store holds several aspect-ratio buckets: train it with --pack SEQ_LEN");
    }
    let (channels, size) = data.input()?;
    // Captioned data: every caption encoded once, up front (the encoder is frozen).
    let text = match data.captions() {
        Some(captions) => Some(text_cache(&a, captions, dev)?),
        None => None,
    };
    let conditioning = text
        .as_ref()
        .map(|t| t.conditioning(a.max_tokens))
        .transpose()?;
    let cfg = TrainConfig {
        // With no --data, the embedded model's recipe (a short run); otherwise the paper's.
        lr: a.lr.unwrap_or(if a.data.is_none() { 3e-4 } else { 1e-4 }),
        ema_decay: a
            .ema_decay
            .unwrap_or(if a.data.is_none() { 0.999 } else { 0.9999 }),
        warmup_steps: a.warmup,
        decay: a.decay_from.map(|from| from..a.steps.max(from)),
        min_lr: a.min_lr,
        loss: match a.loss {
            LossArg::Mse => LossKind::Mse,
            LossArg::L1 => LossKind::L1,
        },
        compute_dtype: a.dtype.dtype_on(dev)?,
        motion_free: a.motion_free,
        still_motion_free: a.joint_images,
        token_drop: a.token_drop,
        ..Default::default()
    };
    let (mut tr, mut pos) = match &a.resume {
        Some(dir) => Trainer::resume(dir, cfg, dev)?,
        None => {
            let input = NewModel {
                channels,
                size,
                frames: data.frames()?,
                num_classes: data.num_classes(),
                text: conditioning,
            };
            let (model, init) = initial_weights(&a, &input)?;
            (Trainer::new(&model, init, cfg, a.seed, dev)?, 0)
        }
    };
    let mc = &tr.model.config;
    match (&mc.text, conditioning) {
        (None, Some(_)) => bail!("the data is captioned but the model is class-conditional"),
        (Some(_), None) => bail!("the model is text-conditioned but the data has no captions"),
        (Some(m), Some(d))
            if (m.context_dim, m.second_context_dim, m.pooled_dim)
                != (d.context_dim, d.second_context_dim, d.pooled_dim) =>
        {
            bail!(
                "the model reads text tokens of widths {:?} and pooled text of width {}; the text encoders give {:?} and {}",
                [Some(m.context_dim), m.second_context_dim],
                m.pooled_dim,
                [Some(d.context_dim), d.second_context_dim],
                d.pooled_dim
            )
        }
        _ => {}
    }
    let frames = data.frames()?;
    if mc.video.is_some() != frames.is_some() {
        bail!(
            "the model takes {} but the data are {}",
            if mc.video.is_some() {
                "clips"
            } else {
                "images"
            },
            if frames.is_some() { "clips" } else { "images" }
        );
    }
    if (mc.in_channels, mc.input_size) != (channels, size) || mc.num_classes < data.num_classes() {
        bail!(
            "the model takes {} channels at {}x{} with {} classes but the data has {channels} at {size}x{size} with {}",
            mc.in_channels, mc.input_size, mc.input_size, mc.num_classes, data.num_classes()
        );
    }
    tr.empty_prompt = text.as_ref().map(|t| t.empty.clone());
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
        // Packed: one tensor per sample (a bucketed store's keep their sizes); else one batch.
        let (packed, dense, labels) = if a.pack > 0 {
            let (xs, labels) = data.samples(mine, a.flip, a.seed, pos, dev)?;
            (xs, None, labels)
        } else {
            let (x, labels) = data.batch(mine, a.flip, a.seed, pos + rows.start, dev)?;
            (Vec::new(), Some(x), labels)
        };
        let prompts = text.as_ref().map(|t| t.batch(&labels)).transpose()?;
        let cond = match &prompts {
            Some(p) => Conditions::Text(p),
            None => Conditions::Labels(&labels),
        };
        let loss = match &dense {
            None => tr.step_packed(&packed, cond, a.pack)?,
            Some(x) => tr.step_conditioned(
                x,
                cond,
                rows.clone(),
                a.global_batch_size,
                micro,
                reducer.as_ref(),
            )?,
        };
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
                "step": step, "loss": mean, "lr": tr.cfg.lr_at(step),
                "steps_per_s": steps_in as f64 / secs,
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
            bar.suspend(|| sample_grid(&tr, text.as_ref(), &path))?;
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
        return Ok(TrainingSet::Images(match a.builtin {
            BuiltinArg::Mnist => dit::data::mnist(dev)?,
            BuiltinArg::Shapes => {
                if a.flip {
                    bail!(
                        "--flip would swap the shapes' left and right, which their captions name"
                    );
                }
                let size = a.image_size.unwrap_or(32);
                dit::data::shapes::training_set(size, a.per_caption.max(1), a.seed, dev)?
            }
            BuiltinArg::MovingShapes => {
                if a.flip {
                    bail!("--flip would swap left and right, which the captions name");
                }
                let size = a.image_size.unwrap_or(32);
                let (per, frames) = (a.per_caption.max(1), a.frames.max(1));
                dit::data::moving_shapes::training_set(size, frames, per, a.seed, dev)?
            }
        }));
    };
    if LatentStore::is_store(dir) {
        return Ok(TrainingSet::Latents(LatentStore::open(dir)?));
    }
    let image_size = a.image_size.unwrap_or(256);
    let vae = match &a.vae {
        Some(v) => {
            let vae = dit::vae::Vae::open(v, candle_core::DType::F32, dev)?;
            if !image_size.is_multiple_of(vae.factor) {
                bail!(
                    "--image-size must be a multiple of the VAE's factor {}",
                    vae.factor
                );
            }
            Some(Box::new(vae))
        }
        None => None,
    };
    if let Some(folder) = dit::data::clips::ClipFolder::open(dir)? {
        return Ok(TrainingSet::Clips {
            folder,
            size: image_size,
            channels: a.channels,
            frames: a.frames.max(1),
            stride: a.frame_stride.max(1),
            vae,
        });
    }
    Ok(TrainingSet::Folder {
        folder: dit::data::folder::ImageFolder::open_any(dir)?,
        size: image_size,
        channels: a.channels,
        vae,
    })
}

/// What the data asks of a new model.
struct NewModel {
    channels: usize,
    size: usize,
    /// Clips of this many frames: a video model.
    frames: Option<usize>,
    num_classes: usize,
    /// Captioned data: the text encoder's widths.
    text: Option<TextConditioning>,
}

/// The captions' embeddings: OUT/text-embeddings.safetensors if it was made for these captions
/// by this encoder, else encoded now (with a progress bar) and saved there.
fn text_cache(a: &TrainArgs, captions: &[String], dev: &Device) -> Result<TextCache> {
    let dirs = crate::text_encoders::dirs(&a.text_encoder)?;
    let id = crate::text_encoders::identity(&dirs, a.max_tokens);
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let path = a.out.join("text-embeddings.safetensors");
    let bar = ProgressBar::new(captions.len() as u64).with_style(ProgressStyle::with_template(
        "encoding captions [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}",
    )?);
    let (cache, built) = TextCache::load_or_build(
        &path,
        captions,
        &id,
        || {
            crate::text_encoders::load(&dirs, a.max_tokens, dev)
                .map_err(|e| dit::Error::Input(format!("{e:#}")))
        },
        |done| bar.set_position(done as u64),
        dev,
    )?;
    bar.finish_and_clear();
    if built {
        println!(
            "encoded {} captions with {} into {}",
            cache.len(),
            id,
            path.display()
        );
    }
    Ok(cache)
}

/// The config and starting weights of a new run: fine-tuned from `--init`, a named config, or
/// the custom dimensions; reference initialisation for the latter two.
fn initial_weights(a: &TrainArgs, m: &NewModel) -> Result<(DiTConfig, dit::checkpoint::Tensors)> {
    let (channels, size, num_classes) = (m.channels, m.size, m.num_classes);
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
        // Image weights for clips: a video model that starts as the image model per frame.
        if let (Some(frames), None) = (m.frames, cfg.video) {
            cfg.video = Some(dit::config::VideoConfig::frames(frames));
            w = dit::train::video_from_image(&w, &cfg, &mut NoiseRng::new(a.seed))?;
        }
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
        if cfg.text.is_none() {
            dit::train::resize_label_table(&mut w, num_classes, &mut NoiseRng::new(a.seed))?;
            cfg.num_classes = num_classes;
        }
        let cfg = with_target(cfg, a);
        dit::checkpoint::validate(&cfg, &w)
            .with_context(|| format!("fine-tuning from {}", path.display()))?;
        return Ok((cfg, w));
    }
    let model = match &a.model {
        Some(name) => {
            let mut cfg = match (name.starts_with("GenTron-"), m.text) {
                (true, Some(text)) => DiTConfig::gentron(name, size * 8, text)?,
                (true, None) => {
                    bail!("{name} is a text-to-image model: train it on captioned data")
                }
                (false, _) => DiTConfig::named(name, size * 8)?,
            };
            (cfg.in_channels, cfg.input_size, cfg.num_classes) = (channels, size, num_classes);
            cfg.text = m.text;
            cfg.video = video_config(m.frames, a.tubelet);
            if m.text.is_none() && m.frames.is_none() {
                cfg.block = a.block.into();
            }
            cfg
        }
        None => DiTConfig {
            input_size: size,
            patch_size: a.patch.unwrap_or(if a.data.is_none() { 4 } else { 2 }),
            in_channels: channels,
            hidden_size: a.hidden,
            depth: a.depth,
            num_heads: a.heads,
            num_classes,
            block: a.block.into(),
            text: m.text,
            video: video_config(m.frames, a.tubelet),
            ..Default::default()
        },
    };
    let model = with_target(model, a);
    model.validate()?;
    let init = reference_init(&model, &mut NoiseRng::new(a.seed))?;
    Ok((model, init))
}

/// A new model's video settings: clips of `frames`, with `--tubelet` spacetime patches.
fn video_config(frames: Option<usize>, tubelet: Option<usize>) -> Option<dit::config::VideoConfig> {
    frames.map(|frames| dit::config::VideoConfig { frames, tubelet })
}

/// The schedule and prediction target chosen on the command line; what `cfg` has otherwise.
fn with_target(mut cfg: DiTConfig, a: &TrainArgs) -> DiTConfig {
    if let Some(schedule) = a.schedule {
        cfg.schedule = match schedule {
            ScheduleArg::Linear => Schedule::Linear,
            ScheduleArg::Cosine => Schedule::Cosine,
        };
    }
    if let Some(prediction) = a.prediction {
        cfg.prediction = match prediction {
            PredictionArg::Eps => Prediction::Eps,
            PredictionArg::X0 => Prediction::X0,
            PredictionArg::V => Prediction::V,
        };
    }
    cfg
}

/// From the EMA weights (50 DDPM steps, guidance 4), one grid: two samples per class (the first
/// ten), or for a text model two per prompt of eight captions spread over the list.
fn sample_grid(tr: &Trainer, text: Option<&TextCache>, path: &std::path::Path) -> Result<()> {
    let cfg = &tr.model.config;
    let ema = tr.ema.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let dev = tr.model.device();
    let model = dit::checkpoint::build_model(cfg, ema, candle_core::DType::F32, dev)?;
    let per_row = match text {
        Some(t) => t.len().min(8),
        None => cfg.num_classes.min(10),
    };
    // Row-major grid: the same classes (captions) in both rows.
    let ids: Vec<usize> = match text {
        Some(t) => (0..per_row).map(|i| i * t.len() / per_row).collect(),
        None => (0..per_row).collect(),
    };
    // Images: two rows; clips: one clip (a row of frames) each.
    let ids: Vec<usize> = match cfg.video {
        None => ids.iter().chain(&ids).copied().collect(),
        Some(_) => ids,
    };
    let mut rng = NoiseRng::new(0);
    let mut shape = vec![ids.len(), cfg.in_channels, cfg.input_size, cfg.input_size];
    if let Some(v) = cfg.video {
        shape.insert(2, v.frames);
    }
    let noise = rng.randn_like(&Tensor::zeros(shape, candle_core::DType::F32, dev)?)?;
    let opts = dit::pipeline::SampleOptions {
        steps: 50,
        clip_denoised: true,
        ..Default::default()
    };
    let x = match text {
        Some(t) => {
            let prompts = t.batch(&ids)?;
            dit::pipeline::sample_latents_text(
                &model,
                &prompts,
                &t.empty,
                noise,
                &opts,
                &mut rng,
                |_| {},
            )?
        }
        None => dit::pipeline::sample_latents(&model, &ids, noise, &opts, &mut rng, |_| {})?,
    };
    let x = x.clamp(-1f32, 1f32)?;
    match cfg.video {
        Some(_) => dit::image_io::save_clips(&x, path, &path.with_extension("gif"))?,
        None => {
            let rgb = dit::image_io::to_rgb_images(&x)?;
            dit::image_io::save_png(&dit::image_io::make_grid(&rgb, per_row, 2), path)?;
        }
    }
    if let Some(t) = text {
        // Which caption each column shows.
        let names: Vec<&str> = ids[..per_row]
            .iter()
            .map(|&i| t.captions[i].as_str())
            .collect();
        std::fs::write(path.with_extension("txt"), names.join("\n") + "\n")?;
    }
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
