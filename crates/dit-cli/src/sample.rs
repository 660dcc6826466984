//! `dit sample`: the reference `sample.py` as a command.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use dit::checkpoint;
use dit::diffusion::Sampler;
use dit::model::GuidedChannels;
use dit::pipeline::{sample_latents, SampleOptions};
use dit::rng::NoiseRng;
use dit::{DiT, DiTConfig};
use indicatif::{ProgressBar, ProgressStyle};

/// The paper's sample classes (sample.py): golden retriever, otter, red panda, geyser, macaw,
/// valley, balloon, arctic fox.
const PAPER_LABELS: [usize; 8] = [207, 360, 387, 974, 88, 979, 417, 279];

#[derive(Clone, Copy, ValueEnum)]
pub enum SamplerArg {
    Ddpm,
    Ddim,
    /// DPM-Solver++(2M), deterministic.
    DpmSolverPp,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CfgChannels {
    /// Guide the first 3 eps channels, as the reference (reproduces its samples).
    Reference,
    /// Guide every eps channel (the standard form).
    All,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
}

impl DTypeArg {
    /// The compute dtype on `device`. On the CPU, bf16 runs on our AVX512-BF16 kernel (candle 0.11
    /// has no CPU bf16 matmul), so it is refused up front on CPUs without it.
    pub fn dtype_on(self, device: &Device) -> Result<DType> {
        match self {
            Self::F32 => Ok(DType::F32),
            Self::Bf16 if device.is_cpu() && !dit::gemm_bf16::available() => {
                bail!("--dtype bf16 on the CPU needs AVX512-BF16, which this CPU lacks; use f32")
            }
            Self::Bf16 => Ok(DType::BF16),
        }
    }
}

/// Which model to load: a checkpoint (with optional overrides) or the embedded default.
#[derive(Args)]
pub struct ModelArgs {
    /// Named config (DiT-S/2 … DiT-XL/8); inferred from the checkpoint when omitted.
    #[arg(long)]
    model: Option<String>,
    /// Checkpoint: a released DiT .pt, a train.py checkpoint (EMA weights), .safetensors, or a
    /// `dit train` checkpoint folder. Default: the embedded model.
    #[arg(long)]
    ckpt: Option<PathBuf>,
    /// Image size in pixels (latent size x 8). Inferred from the checkpoint when omitted.
    #[arg(long)]
    image_size: Option<usize>,
    #[arg(long)]
    num_classes: Option<usize>,
    /// Attention heads; a state dict does not record them (default: the paper's for its widths,
    /// otherwise 64-wide heads).
    #[arg(long)]
    num_heads: Option<usize>,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// VAE of latent models: a diffusers folder or file, `ema` / `mse`
    /// (stabilityai/sd-vae-ft-*), or a hub repo id.
    #[arg(long, default_value = "ema")]
    vae: String,
}

/// How to sample: steps, sampler, guidance.
#[derive(Args)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 4.0)]
    cfg_scale: f64,
    #[arg(long, value_enum, default_value = "reference")]
    cfg_channels: CfgChannels,
    /// Respaced sampling steps [default: 250 for `sample`, 50 for `eval-builtin`].
    #[arg(long, alias = "num-sampling-steps")]
    steps: Option<usize>,
    #[arg(long, value_enum, default_value = "ddpm")]
    sampler: SamplerArg,
    /// DDIM eta (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Clamp the predicted x0 to [-1, 1] at each step. Default: on for pixel-space models (as
    /// IDDPM samples images), off for latent models (as the DiT reference).
    #[arg(long)]
    clip_x0: Option<bool>,
    /// Video text models: motion-free guidance with this motion scale (GenTron: 1.0 to 1.3),
    /// --cfg-scale then being the text scale (GenTron: 7.5).
    #[arg(long)]
    motion_scale: Option<f64>,
}

impl SamplingArgs {
    /// The library's options for a model of config `cfg`, after checking the values.
    pub fn options(&self, cfg: &DiTConfig, default_steps: usize) -> Result<SampleOptions> {
        let steps = self.steps.unwrap_or(default_steps);
        if steps == 0 || steps > 1000 {
            bail!("--steps must be in 1..=1000, got {steps}");
        }
        Ok(SampleOptions {
            steps,
            sampler: match self.sampler {
                SamplerArg::Ddpm => Sampler::Ddpm,
                SamplerArg::Ddim => Sampler::Ddim { eta: self.eta },
                SamplerArg::DpmSolverPp => Sampler::DpmSolverPp,
            },
            cfg_scale: self.cfg_scale,
            cfg_channels: match self.cfg_channels {
                CfgChannels::Reference => GuidedChannels::Reference,
                CfgChannels::All => GuidedChannels::All,
            },
            clip_denoised: self.clip_x0.unwrap_or(cfg.in_channels != 4),
            motion_scale: match self.motion_scale {
                Some(_) if !cfg.temporal_attention() || cfg.text.is_none() => {
                    bail!("--motion-scale is for text-to-video models with temporal attention")
                }
                m => m,
            },
        })
    }
}

#[derive(Args)]
pub struct SampleArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Class labels, comma-separated. Default: the paper's 8 classes (1000-class models) or
    /// every class.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<usize>,
    /// A text-conditioned (GenTron) model: the prompts, one image each (repeat the flag).
    #[arg(long)]
    prompt: Vec<String>,
    /// What guidance steers away from (default: the empty prompt).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// The text encoder folder or Hugging Face repo id of a text model (default: `$DIT_MINILM`, else the folder
    /// `tools/fetch-minilm.sh` writes, ~/.cache/dit/all-MiniLM-L6-v2); twice for a model that
    /// alternates two encoders (first the one that gives the pooled embedding, e.g. CLIP, then T5).
    #[arg(long)]
    text_encoder: Vec<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples per forward batch (guidance doubles it).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// PNG grid of all samples.
    #[arg(long, default_value = "sample.png")]
    out: PathBuf,
    /// Also write one PNG per sample into this folder.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Start from this float32 (N, C, H, W) .npy instead of drawing noise.
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Write the final latents, float32 (N, C, H, W), to this .npy.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Skip the VAE (no images are written unless the model works in pixel space).
    #[arg(long)]
    no_decode: bool,
    /// Video models: frames per clip (default: the model's). Clips are written as a PNG grid
    /// (a row of frames per clip) and an animated GIF beside it (OUT with .gif).
    #[arg(long)]
    frames: Option<usize>,
    /// Image height in pixels (default: the model's trained size). Any multiple of the patch
    /// (x 8 for latent models) works: positions are computed for the grid sampled.
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels (default: the model's trained size).
    #[arg(long)]
    width: Option<usize>,
    /// Several sizes at once, HxW in pixels, comma-separated (e.g. 256x256,192x320,320x192):
    /// sample i gets size i modulo the list, and all are sampled together, packed (patch n'
    /// pack) into sequences of --pack tokens. Class-conditional models.
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<String>,
    /// With --sizes: tokens per packed sequence (0: the largest image's, twice with guidance).
    #[arg(long, default_value_t = 0)]
    pack: usize,
}

impl SampleArgs {
    /// The sample's latent height and width (pixels, for pixel-space models) from `--height` and
    /// `--width`, else the model's trained size.
    fn latent_size(&self, cfg: &DiTConfig) -> Result<(usize, usize)> {
        let side = |px: Option<usize>, name: &str| match px {
            None => Ok(cfg.input_size),
            Some(px) => latent_side(cfg, px, name),
        };
        Ok((side(self.height, "height")?, side(self.width, "width")?))
    }

    /// The latent (height, width) of each `--sizes` entry.
    fn latent_sizes(&self, cfg: &DiTConfig) -> Result<Vec<(usize, usize)>> {
        self.sizes
            .iter()
            .map(|s| {
                let (h, w) = s
                    .split_once('x')
                    .and_then(|(h, w)| Some((h.trim().parse().ok()?, w.trim().parse().ok()?)))
                    .with_context(|| format!("--sizes: {s:?} is not HEIGHTxWIDTH in pixels"))?;
                Ok((
                    latent_side(cfg, h, "sizes height")?,
                    latent_side(cfg, w, "sizes width")?,
                ))
            })
            .collect()
    }
}

/// A side of `px` pixels in the model's space (latents: / 8), checked against the patch.
fn latent_side(cfg: &DiTConfig, px: usize, name: &str) -> Result<usize> {
    let scale = if cfg.in_channels == 4 { 8 } else { 1 };
    let unit = scale * cfg.patch_size;
    if px == 0 || !px.is_multiple_of(unit) {
        bail!(
            "--{name} {px}: must be a positive multiple of {unit} pixels (this model's patch, {} x {scale})",
            cfg.patch_size
        );
    }
    Ok(px / scale)
}

impl ModelArgs {
    /// The VAE a latent model (4 input channels) needs, from `--vae`; None for pixel models.
    pub fn vae_for(
        &self,
        cfg: &DiTConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<dit::vae::Vae>> {
        Ok(if cfg.in_channels == 4 {
            Some(dit::vae::Vae::open(&self.vae, dtype, device)?)
        } else {
            None
        })
    }

    /// The compute dtype and the model.
    pub fn load(&self, device: &Device) -> Result<(DType, DiT)> {
        let dtype = self.dtype.dtype_on(device)?;
        Ok((dtype, self.load_as(dtype, device)?))
    }

    fn load_as(&self, dtype: DType, device: &Device) -> Result<DiT> {
        let a = self;
        let latent = a.image_size.map(dit::config::latent_size).transpose()?;
        let Some(ckpt) = &a.ckpt else {
            if a.model.is_some() {
                bail!("--model needs --ckpt (weights to load)");
            }
            eprintln!("note: no --ckpt given: using the embedded model (a DiT trained by dit-rs on the built-in MNIST digits, 28x28, classes 0-9)");
            return Ok(dit::builtin::model(dtype, device)?);
        };
        // A folder is a `dit train` checkpoint: its own config and EMA weights.
        let (tensors, trained_cfg) = if ckpt.is_dir() {
            let (cfg, t) = checkpoint::read_training_dir(ckpt)?;
            (t, Some(cfg))
        } else {
            (
                checkpoint::read_tensors(ckpt)?,
                checkpoint::config_beside(ckpt)?,
            )
        };
        let mut cfg = match (&a.model, trained_cfg) {
            (Some(name), _) => DiTConfig::named(name, a.image_size.unwrap_or(256))?,
            (None, Some(cfg)) => cfg,
            (None, None) => checkpoint::infer_config(&tensors, latent)?,
        };
        if let Some(k) = a.num_classes {
            cfg.num_classes = k;
        }
        if let Some(h) = a.num_heads {
            cfg.num_heads = h;
        }
        cfg.validate()?;
        checkpoint::build_model(&cfg, tensors, dtype, device).with_context(|| {
            format!(
                "checkpoint {} does not fit the model config",
                ckpt.display()
            )
        })
    }
}

pub fn run(a: SampleArgs, device: &Device) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (dtype, model) = a.model.load(device)?;
    let cfg = model.config.clone();
    let opts = a.sampling.options(&cfg, 250)?;
    // Load the VAE before sampling, so a missing one fails in seconds, not after the run.
    let vae = if a.no_decode {
        None
    } else {
        a.model.vae_for(&cfg, dtype, device)?
    };
    if let Some(text) = cfg.text {
        return run_text(&a, &model, text, &opts, vae.as_ref(), dtype, device);
    }
    if !a.prompt.is_empty() {
        bail!("--prompt needs a text-conditioned model; this one is class-conditional (--labels)");
    }
    let labels: Vec<usize> = if !a.labels.is_empty() {
        a.labels.clone()
    } else if cfg.num_classes == 1000 {
        PAPER_LABELS.to_vec()
    } else {
        (0..cfg.num_classes.min(64)).collect()
    };
    dit::pipeline::check_labels(&model, &labels)?;
    if !a.sizes.is_empty() {
        return run_sizes(&a, &model, &labels, &opts, vae.as_ref(), dtype);
    }
    let n = labels.len();
    let mut rng = NoiseRng::new(a.seed);
    let (h, w) = a.latent_size(&cfg)?;
    let shape = (n, cfg.in_channels, h, w);
    let noise = match &a.noise {
        Some(p) => {
            let t = Tensor::read_npy(p)
                .with_context(|| format!("cannot read noise {}", p.display()))?;
            let t = t.to_dtype(DType::F32)?;
            dit::pipeline::check_noise(&model, &t, n)
                .with_context(|| format!("noise {} does not fit {n} labels", p.display()))?;
            t
        }
        None => rng.randn_like(&Tensor::zeros(shape, DType::F32, device)?)?,
    };
    let latents = sample_batched(&model, &labels, &noise, &opts, a.batch_size, &mut rng)?;
    write_outputs(&a, &latents, vae.as_ref(), dtype, &cfg)
}

/// `--sizes`: every label at its size, sampled together packed; a grid (each image in a cell of
/// the largest size) and, with --out-dir, one PNG each.
fn run_sizes(
    a: &SampleArgs,
    model: &DiT,
    labels: &[usize],
    opts: &SampleOptions,
    vae: Option<&dit::vae::Vae>,
    dtype: DType,
) -> Result<()> {
    let cfg = &model.config;
    let sizes = a.latent_sizes(cfg)?;
    let mut rng = NoiseRng::new(a.seed);
    let noise = labels
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let (h, w) = sizes[i % sizes.len()];
            let z = Tensor::zeros((1, cfg.in_channels, h, w), DType::F32, model.device())?;
            Ok(rng.randn_like(&z)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let bar = ProgressBar::new(opts.steps as u64).with_style(ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} steps {elapsed_precise} eta {eta}",
    )?);
    bar.set_message(format!(
        "sampling {} images of {} sizes, packed",
        labels.len(),
        sizes.len()
    ));
    let latents =
        dit::pipeline::sample_packed(model, labels, noise, opts, a.pack, &mut rng, |i| {
            bar.set_position(i as u64 + 1)
        })?;
    bar.finish_and_clear();
    let mut rgb = Vec::with_capacity(latents.len());
    for z in &latents {
        let Some(img) = to_images(z, vae, dtype, cfg)? else {
            bail!("--no-decode with --sizes writes nothing: the latents differ in size");
        };
        rgb.extend(dit::image_io::to_rgb_images(&img)?);
    }
    dit::image_io::save_png(&dit::image_io::make_grid(&rgb, 4, 2), &a.out)?;
    println!(
        "wrote {} ({} samples at {} sizes)",
        a.out.display(),
        rgb.len(),
        sizes.len()
    );
    if let Some(dir) = &a.out_dir {
        for (i, img) in rgb.iter().enumerate() {
            dit::image_io::save_png(img, &dir.join(format!("{i:06}.png")))?;
        }
        println!("wrote {} images to {}", rgb.len(), dir.display());
    }
    Ok(())
}

/// Samples a text-conditioned model for `--prompt`s, guided against `--negative-prompt`.
fn run_text(
    a: &SampleArgs,
    model: &DiT,
    text: dit::config::TextConditioning,
    opts: &SampleOptions,
    vae: Option<&dit::vae::Vae>,
    dtype: DType,
    device: &Device,
) -> Result<()> {
    if a.prompt.is_empty() {
        bail!("a text-conditioned model needs --prompt");
    }
    let encoders = crate::text_encoders::load_for(&a.text_encoder, &text, device)?;
    let prompts: Vec<&str> = a.prompt.iter().map(String::as_str).collect();
    let batch = dit::text::encode_all(&encoders, &prompts)?;
    let empty = dit::text::encode_all(&encoders, &[a.negative_prompt.as_str()])?;
    let cfg = &model.config;
    let n = prompts.len();
    let mut rng = NoiseRng::new(a.seed);
    let (h, w) = a.latent_size(cfg)?;
    let mut shape = vec![n, cfg.in_channels, h, w];
    match (cfg.video, a.frames) {
        (Some(v), frames) => shape.insert(2, frames.unwrap_or(v.frames).max(1)),
        (None, Some(_)) => bail!("--frames is for video models; this one makes images"),
        (None, None) => {}
    }
    let noise = rng.randn_like(&Tensor::zeros(shape, DType::F32, device)?)?;
    let bar = ProgressBar::new(opts.steps as u64).with_style(ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} steps {elapsed_precise} eta {eta}",
    )?);
    bar.set_message(format!("sampling {n} images"));
    let latents =
        dit::pipeline::sample_latents_text(model, &batch, &empty, noise, opts, &mut rng, |i| {
            bar.set_position(i as u64 + 1)
        })?;
    bar.finish_and_clear();
    write_outputs(a, &latents, vae, dtype, cfg)
}

/// Writes the sampled latents (`--save-latents`), and unless `--no-decode` the PNG grid
/// (`--out`) and single images (`--out-dir`).
fn write_outputs(
    a: &SampleArgs,
    latents: &Tensor,
    vae: Option<&dit::vae::Vae>,
    dtype: DType,
    cfg: &dit::DiTConfig,
) -> Result<()> {
    if let Some(p) = &a.save_latents {
        latents
            .write_npy(p)
            .with_context(|| format!("cannot write {}", p.display()))?;
        println!("wrote latents {:?} to {}", latents.dims(), p.display());
    }
    match to_images(latents, vae, dtype, cfg)? {
        Some(images) => save_images(&images, &a.out, a.out_dir.as_deref()),
        None => Ok(()),
    }
}

/// Writes images (N, 3, H, W) in [-1, 1] as a PNG grid at `out` and one PNG each in `out_dir`;
/// clips (N, 3, T, H, W) as a grid of frames, `out` with .gif, and a GIF plus frames each.
pub fn save_images(images: &Tensor, out: &Path, out_dir: Option<&Path>) -> Result<()> {
    let n = images.dim(0)?;
    if images.rank() == 5 {
        let gif = out.with_extension("gif");
        dit::image_io::save_clips(images, out, &gif)?;
        println!("wrote {} and {} ({n} clips)", out.display(), gif.display());
        if let Some(dir) = out_dir {
            for (i, clip) in dit::image_io::clip_frames(images)?.iter().enumerate() {
                dit::image_io::save_gif(clip, 125, &dir.join(format!("{i:06}.gif")))?;
                for (f, frame) in clip.iter().enumerate() {
                    dit::image_io::save_png(frame, &dir.join(format!("{i:06}/{f:03}.png")))?;
                }
            }
            println!("wrote {n} clips (GIF and frames) to {}", dir.display());
        }
        return Ok(());
    }
    let rgb = dit::image_io::to_rgb_images(images)?;
    dit::image_io::save_png(&dit::image_io::make_grid(&rgb, 4, 2), out)?;
    println!("wrote {} ({n} samples)", out.display());
    if let Some(dir) = out_dir {
        for (i, img) in rgb.iter().enumerate() {
            dit::image_io::save_png(img, &dir.join(format!("{i:06}.png")))?;
        }
        println!("wrote {n} images to {}", dir.display());
    }
    Ok(())
}

/// Samples `labels` from `noise` in batches of `batch_size`, with a progress bar over all steps.
pub fn sample_batched(
    model: &DiT,
    labels: &[usize],
    noise: &Tensor,
    opts: &SampleOptions,
    batch_size: usize,
    rng: &mut NoiseRng,
) -> Result<Tensor> {
    let n = labels.len();
    let batches = n.div_ceil(batch_size);
    let bar =
        ProgressBar::new((batches * opts.steps) as u64).with_style(ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} steps {elapsed_precise} eta {eta}",
        )?);
    bar.set_message(format!("sampling {n} images"));
    let mut latents = Vec::with_capacity(batches);
    for (b, start) in (0..n).step_by(batch_size).enumerate() {
        let len = batch_size.min(n - start);
        let done = b * opts.steps;
        let x = sample_latents(
            model,
            &labels[start..start + len],
            noise.narrow(0, start, len)?,
            opts,
            rng,
            |s| bar.set_position((done + s) as u64),
        )?;
        latents.push(x.to_dtype(DType::F32)?);
    }
    bar.finish();
    Ok(Tensor::cat(&latents, 0)?)
}

/// The images of sampled latents: a pixel-space model's samples as they are (clamped to
/// [-1, 1]), a latent model's decoded one at a time by the VAE (None without a VAE).
pub fn to_images(
    latents: &Tensor,
    vae: Option<&dit::vae::Vae>,
    dtype: DType,
    cfg: &DiTConfig,
) -> Result<Option<Tensor>> {
    if cfg.in_channels != 4 {
        return Ok(Some(latents.clamp(-1f32, 1f32)?));
    }
    match vae {
        Some(vae) => Ok(Some(decode(latents, vae, dtype)?)),
        None => Ok(None),
    }
}

/// Latents (N, C, H, W), or clips (N, C, T, H, W), decoded one image (frame) at a time by the
/// VAE, with a progress bar.
pub fn decode(latents: &Tensor, vae: &dit::vae::Vae, dtype: DType) -> Result<Tensor> {
    if let &[n, c, t, h, w] = latents.dims() {
        // Clips: decoded frame by frame.
        let frames = latents
            .permute((0, 2, 1, 3, 4))?
            .reshape((n * t, c, h, w))?;
        let images = decode(&frames, vae, dtype)?;
        let (_, ic, ih, iw) = images.dims4()?;
        let clips = images
            .reshape((n, t, ic, ih, iw))?
            .permute((0, 2, 1, 3, 4))?;
        return Ok(clips.contiguous()?);
    }
    let n = latents.dim(0)?;
    let bar = ProgressBar::new(n as u64).with_message("decoding");
    let imgs = (0..n)
        .map(|i| {
            let img = vae.decode(&latents.narrow(0, i, 1)?.to_dtype(dtype)?);
            bar.inc(1);
            img
        })
        .collect::<dit::Result<Vec<_>>>()?;
    bar.finish_and_clear();
    Ok(Tensor::cat(&imgs, 0)?)
}
