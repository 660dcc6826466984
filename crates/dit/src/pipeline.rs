//! Class-conditional sampling end to end, as the reference `sample.py`: noise, the respaced
//! reverse chain with classifier-free guidance, final latents.

use candle_core::{DType, Tensor};

use crate::diffusion::{reverse_step, sample_loop, sample_loop_from, GaussianDiffusion, Sampler};
use crate::model::{DiT, GuidedChannels};
use crate::rng::NoiseRng;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Respaced steps, e.g. 250 (the reference's default).
    pub steps: usize,
    pub sampler: Sampler,
    /// Guidance scale; 1 disables guidance (one forward pass per step).
    pub cfg_scale: f64,
    pub cfg_channels: GuidedChannels,
    /// Clamp predicted x_0 to [-1, 1] at each step (pixel-space models; DiT's latents: off).
    pub clip_denoised: bool,
    /// Video text models: motion-free guidance with this motion scale (GenTron: 1.0 to 1.3),
    /// `cfg_scale` then being the text scale; None: plain text guidance.
    pub motion_scale: Option<f64>,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            steps: 250,
            sampler: Sampler::Ddpm,
            cfg_scale: 4.0,
            cfg_channels: GuidedChannels::Reference,
            clip_denoised: false,
            motion_scale: None,
        }
    }
}

/// Checks labels against the model's classes.
pub fn check_labels(model: &DiT, labels: &[usize]) -> Result<()> {
    let n = model.config.num_classes;
    match labels.iter().find(|&&l| l >= n) {
        Some(l) => Err(Error::Input(format!(
            "label {l} is out of range: the model has {n} classes (0..={})",
            n - 1
        ))),
        None => Ok(()),
    }
}

/// Checks a starting noise array against the model's latents for `n` samples: images
/// (N, C, H, W), or clips (N, C, T, H, W) of any frame count for a video model, at any height and
/// width that are multiples of the patch (the positions are computed for the grid).
pub fn check_noise(model: &DiT, noise: &Tensor, n: usize) -> Result<()> {
    let c = &model.config;
    let (rank, layout) = match c.video {
        Some(_) => (5, "(N, C, T, H, W)"),
        None => (4, "(N, C, H, W)"),
    };
    let d = noise.dims();
    let fits = d.len() == rank
        && d[0] == n
        && d[1] == c.in_channels
        && d[2..].iter().all(|&s| s > 0)
        && d[rank - 2..].iter().all(|s| s.is_multiple_of(c.patch_size));
    if !fits {
        return Err(Error::Input(format!(
            "noise has shape {d:?} but {n} samples of this model need {layout} with N = {n}, C = {}, and H and W multiples of the patch {} (trained at {})",
            c.in_channels, c.patch_size, c.input_size
        )));
    }
    Ok(())
}

/// The chain's diffusion, labels tensor and guided model function for `opts`.
fn setup(
    model: &DiT,
    labels: &[usize],
    x: &Tensor,
    opts: &SampleOptions,
) -> Result<(GaussianDiffusion, Tensor)> {
    check_labels(model, labels)?;
    check_noise(model, x, labels.len())?;
    let c = &model.config;
    let mut diffusion =
        GaussianDiffusion::for_model(c.schedule, c.prediction, &opts.steps.to_string())?;
    diffusion.clip_denoised = opts.clip_denoised;
    let y = Tensor::from_vec(
        labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
        labels.len(),
        x.device(),
    )?;
    Ok((diffusion, y))
}

/// The model output at (x, t) with guidance as `opts` says, in f32 (the chain stays in f32
/// whatever the model's dtype, as under torch autocast).
fn guided(model: &DiT, y: &Tensor, opts: &SampleOptions, x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let out = if opts.cfg_scale > 1.0 {
        model.forward_with_cfg(x, t, y, opts.cfg_scale, opts.cfg_channels)?
    } else {
        model.forward(x, t, y)?
    };
    Ok(out.to_dtype(DType::F32)?)
}

/// Samples latents for `labels` starting from `noise` (N, C, H, W). Randomness of DDPM (and of
/// DDIM with eta > 0) comes from `rng`.
pub fn sample_latents(
    model: &DiT,
    labels: &[usize],
    noise: Tensor,
    opts: &SampleOptions,
    rng: &mut NoiseRng,
    on_step: impl FnMut(usize),
) -> Result<Tensor> {
    let (diffusion, y) = setup(model, labels, &noise, opts)?;
    let noise = noise.to_dtype(DType::F32)?;
    Ok(sample_loop(
        &diffusion,
        |x: &Tensor, t: &Tensor| guided(model, &y, opts, x, t).map_err(candle_error),
        noise,
        opts.sampler,
        rng,
        on_step,
    )?)
}

/// Samples latents for encoded prompts (a text-conditioned model), guidance against the empty
/// prompt's encoding `empty` (one row).
pub fn sample_latents_text(
    model: &DiT,
    text: &crate::model::TextBatch,
    empty: &crate::model::TextBatch,
    noise: Tensor,
    opts: &SampleOptions,
    rng: &mut NoiseRng,
    on_step: impl FnMut(usize),
) -> Result<Tensor> {
    check_noise(model, &noise, text.len()?)?;
    let c = &model.config;
    let mut diffusion =
        GaussianDiffusion::for_model(c.schedule, c.prediction, &opts.steps.to_string())?;
    diffusion.clip_denoised = opts.clip_denoised;
    let guided = |x: &Tensor, t: &Tensor| -> candle_core::Result<Tensor> {
        let out = if let (Some(motion), Some(_)) = (opts.motion_scale, c.video) {
            let (lt, ch) = (opts.cfg_scale, opts.cfg_channels);
            model.forward_video_with_mfg(x, t, text, empty, lt, motion, ch)?
        } else if opts.cfg_scale > 1.0 {
            model.forward_text_with_cfg(x, t, text, empty, opts.cfg_scale, opts.cfg_channels)?
        } else {
            model.forward_text(x, t, &text.token_sets(), &text.pooled)?
        };
        out.to_dtype(DType::F32)
    };
    let noise = noise.to_dtype(DType::F32)?;
    Ok(sample_loop(
        &diffusion,
        guided,
        noise,
        opts.sampler,
        rng,
        on_step,
    )?)
}

/// Samples class-conditional images of several sizes at once, packed (patch n' pack): image i
/// starts from `noise[i]` (1, C, h_i, w_i) and is drawn for `labels[i]`. Each step runs the
/// model once on the packed batch (with guidance, each image's conditional and null-class
/// copies are both in it), then steps every image's own chain: the result is each image's
/// unpacked chain, to float rounding. `seq_len` 0: the longest image's tokens (x 2 with
/// guidance, so an image and its copy can share a sequence).
pub fn sample_packed(
    model: &DiT,
    labels: &[usize],
    noise: Vec<Tensor>,
    opts: &SampleOptions,
    seq_len: usize,
    rng: &mut NoiseRng,
    mut on_step: impl FnMut(usize),
) -> Result<Vec<Tensor>> {
    check_labels(model, labels)?;
    if noise.len() != labels.len() || noise.is_empty() {
        return Err(Error::Input(format!(
            "{} noise tensors for {} labels",
            noise.len(),
            labels.len()
        )));
    }
    for x in &noise {
        check_noise(model, x, 1)?;
    }
    let c = &model.config;
    let mut diffusion =
        GaussianDiffusion::for_model(c.schedule, c.prediction, &opts.steps.to_string())?;
    diffusion.clip_denoised = opts.clip_denoised;
    let guided = opts.cfg_scale > 1.0;
    let n = labels.len();
    let dev = noise[0].device().clone();
    let mut y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    if guided {
        y.extend(std::iter::repeat_n(model.null_class() as u32, n));
    }
    let y = Tensor::new(y.as_slice(), &dev)?;
    let p = c.patch_size;
    let mut counts: Vec<usize> = noise
        .iter()
        .map(|x| (x.dim(2).unwrap_or(0) / p) * (x.dim(3).unwrap_or(0) / p))
        .collect();
    if guided {
        counts.extend_from_within(..);
    }
    let longest = counts.iter().copied().max().unwrap_or(1);
    let seq_len = match seq_len {
        0 => longest * if guided { 2 } else { 1 },
        l => l,
    };
    let packing = crate::model::Packing::greedy(&counts, seq_len)?;
    let mut xs: Vec<Tensor> = noise
        .into_iter()
        .map(|x| x.to_dtype(DType::F32))
        .collect::<candle_core::Result<_>>()?;
    let mut prev: Vec<Option<(Tensor, f64)>> = vec![None; n];
    for (done, t) in (0..diffusion.num_timesteps()).rev().enumerate() {
        let copies = if guided { 2 } else { 1 };
        let ts = diffusion.model_timesteps(&vec![t; n * copies], &dev)?;
        let inputs: Vec<Tensor> = (0..copies).flat_map(|_| xs.iter().cloned()).collect();
        let cond = crate::model::PackedConditions::Labels(&y);
        let outs = model.forward_packed(&inputs, &ts, cond, &packing)?;
        for i in 0..n {
            let out = match guided {
                true => {
                    let both = Tensor::cat(&[&outs[i], &outs[n + i]], 0)?;
                    model.mix_guidance(&both, opts.cfg_scale, opts.cfg_channels)?
                }
                false => outs[i].clone(),
            };
            let out = out.to_dtype(DType::F32)?;
            xs[i] = reverse_step(&diffusion, &out, &xs[i], t, opts.sampler, rng, &mut prev[i])?;
        }
        on_step(done + 1);
    }
    Ok(xs)
}

/// The number of respaced steps image-to-image runs for `strength` in [0, 1] out of `steps`.
pub fn edit_steps(strength: f64, steps: usize) -> Result<usize> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::Input(format!(
            "strength must be in [0, 1], got {strength}"
        )));
    }
    Ok((strength * steps as f64).round() as usize)
}

/// Image-to-image (SDEdit): the input `x0` (model space, e.g. VAE latents) is noised to the
/// respaced step given by `strength` (0: none, the input comes back; 1: the chain starts from
/// `noise` alone, as sampling) with `noise`, then denoised from there for the labels.
#[allow(clippy::too_many_arguments)]
pub fn edit_latents(
    model: &DiT,
    labels: &[usize],
    x0: &Tensor,
    strength: f64,
    noise: Tensor,
    opts: &SampleOptions,
    rng: &mut NoiseRng,
    on_step: impl FnMut(usize),
) -> Result<Tensor> {
    let (diffusion, y) = setup(model, labels, x0, opts)?;
    let k = edit_steps(strength, diffusion.num_timesteps())?;
    let x0 = x0.to_dtype(DType::F32)?;
    if k == 0 {
        return Ok(x0);
    }
    let noise = noise.to_dtype(DType::F32)?;
    // The full chain starts from pure noise, as sampling does (the schedule's last step would
    // still keep sqrt(abar) = 0.6% of the input).
    let x = if k == diffusion.num_timesteps() {
        noise
    } else {
        diffusion.q_sample(&x0, &vec![k - 1; labels.len()], &noise)?
    };
    Ok(sample_loop_from(
        &diffusion,
        |x: &Tensor, t: &Tensor| guided(model, &y, opts, x, t).map_err(candle_error),
        x,
        k,
        opts.sampler,
        rng,
        on_step,
        |_, x| Ok(x),
    )?)
}

/// Inpainting: where `mask` is 1 the result keeps `x0`, elsewhere the model fills in. After
/// every step the known region is replaced by `x0` forward-noised to that step's level (the
/// exact `x0` after the last step), so the model sees it at the right noise level throughout.
/// `resample` > 1 repeats each step that many times, renoising the result by one step in
/// between (RePaint's harmonisation), so the generated region agrees with the known one.
/// `mask`: (N or 1, 1, H, W) of 0 / 1 in the model's space.
#[allow(clippy::too_many_arguments)]
pub fn inpaint_latents(
    model: &DiT,
    labels: &[usize],
    x0: &Tensor,
    mask: &Tensor,
    noise: Tensor,
    opts: &SampleOptions,
    resample: usize,
    rng: &mut NoiseRng,
    mut on_step: impl FnMut(usize),
) -> Result<Tensor> {
    let (diffusion, y) = setup(model, labels, x0, opts)?;
    let x0 = x0.to_dtype(DType::F32)?;
    let keep = mask.to_dtype(DType::F32)?;
    let free = (1.0 - &keep)?;
    let n = labels.len();
    let paste = |known: &Tensor, x: &Tensor| -> Result<Tensor> {
        Ok((known.broadcast_mul(&keep)? + x.broadcast_mul(&free)?)?)
    };
    let last = diffusion.num_timesteps() - 1;
    let noise = noise.to_dtype(DType::F32)?;
    let mut x = paste(&diffusion.q_sample(&x0, &vec![last; n], &noise)?, &noise)?;
    let mut prev = None;
    for (done, t) in (0..=last).rev().enumerate() {
        let ts = diffusion.model_timesteps(&vec![t; n], x.device())?;
        for r in 0..resample.max(1) {
            let out = guided(model, &y, opts, &x, &ts)?;
            let stepped = reverse_step(&diffusion, &out, &x, t, opts.sampler, rng, &mut prev)?;
            let known = if t == 0 {
                x0.clone()
            } else {
                diffusion.q_sample(&x0, &vec![t - 1; n], &rng.randn_like(&x0)?)?
            };
            let stepped = paste(&known, &stepped)?;
            if r + 1 < resample.max(1) && t > 0 {
                // Back up one step: x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t).
                let beta = diffusion.betas[t];
                x = ((stepped * (1.0 - beta).sqrt())? + (rng.randn_like(&x0)? * beta.sqrt())?)?;
                prev = None;
            } else {
                x = stepped;
            }
        }
        on_step(done + 1);
    }
    Ok(x)
}

fn candle_error(e: Error) -> candle_core::Error {
    match e {
        Error::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, max_abs_diff};
    use candle_core::Device;

    /// A tiny pixel-space DiT for 32x32 RGB images with random weights (non-zero everywhere).
    fn tiny_model() -> DiT {
        let cfg = crate::DiTConfig {
            input_size: 32,
            patch_size: 4,
            in_channels: 3,
            hidden_size: 32,
            depth: 1,
            num_heads: 2,
            num_classes: 3,
            ..Default::default()
        };
        let mut rng = NoiseRng::new(9);
        let tensors = crate::checkpoint::expected_shapes(&cfg)
            .into_iter()
            .filter(|(n, _)| n != "pos_embed")
            .map(|(n, s)| {
                let z = Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
                (n, (rng.randn_like(&z).unwrap() * 0.1).unwrap())
            })
            .collect();
        crate::checkpoint::build_model(&cfg, tensors, DType::F32, &Device::Cpu).unwrap()
    }

    fn opts() -> SampleOptions {
        SampleOptions {
            steps: 10,
            sampler: Sampler::Ddim { eta: 0.0 },
            cfg_scale: 1.0,
            clip_denoised: true,
            ..Default::default()
        }
    }

    #[test]
    fn edit_strength_endpoints() {
        // A real photograph and its mirror image, two samples each.
        let model = tiny_model();
        let mut rng = NoiseRng::new(1);
        let photo = crate::test_util::photo();
        let a = Tensor::cat(&[&photo, &photo], 0).unwrap();
        let b = a.flip(&[3]).unwrap();
        let noise = rng.randn_like(&a).unwrap();
        let run = |x0: &Tensor, s: f64| {
            edit_latents(
                &model,
                &[0, 2],
                x0,
                s,
                noise.clone(),
                &opts(),
                &mut NoiseRng::new(2),
                |_| {},
            )
            .unwrap()
        };
        // Strength 0: the input comes back unchanged.
        assert_eq!(max_abs_diff(&run(&a, 0.0), &a), 0.0);
        // Strength 1: plain sampling from the same noise, whatever the input; at 0.5 the input
        // still shapes the result.
        let sampled = sample_latents(
            &model,
            &[0, 2],
            noise.clone(),
            &opts(),
            &mut NoiseRng::new(2),
            |_| {},
        )
        .unwrap();
        assert_eq!(max_abs_diff(&run(&a, 1.0), &sampled), 0.0);
        assert_eq!(max_abs_diff(&run(&b, 1.0), &sampled), 0.0);
        assert!(max_abs_diff(&run(&a, 0.5), &run(&b, 0.5)) > 0.5);
        assert!(edit_steps(1.5, 10).is_err());
    }

    #[test]
    fn inpainting_keeps_the_known_region() {
        let model = tiny_model();
        let dev = Device::Cpu;
        let mut rng = NoiseRng::new(3);
        let x0 = crate::test_util::photo();
        // Keep the photograph's left half, regenerate the right half.
        let keep = Tensor::from_vec(
            (0..32 * 32)
                .map(|i| if i % 32 < 16 { 1f32 } else { 0.0 })
                .collect::<Vec<_>>(),
            (1, 1, 32, 32),
            &dev,
        )
        .unwrap();
        for resample in [1, 3] {
            let out = inpaint_latents(
                &model,
                &[1],
                &x0,
                &keep,
                rng.randn_like(&x0).unwrap(),
                &opts(),
                resample,
                &mut NoiseRng::new(4),
                |_| {},
            )
            .unwrap();
            let known = |t: &Tensor| t.broadcast_mul(&keep).unwrap();
            assert!(max_abs_diff(&known(&out), &known(&x0)) < 1e-6);
            // The other half is generated: it differs from the input.
            let free = (1.0 - &keep).unwrap();
            let diff = (&out - &x0).unwrap();
            assert!(max_abs(&diff.broadcast_mul(&free).unwrap()) > 0.1);
        }
    }
}
