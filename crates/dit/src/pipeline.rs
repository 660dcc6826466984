//! Class-conditional sampling end to end, as the reference `sample.py`: noise, the respaced
//! reverse chain with classifier-free guidance, final latents.

use candle_core::{DType, Tensor};

use crate::diffusion::{sample_loop, GaussianDiffusion, Sampler};
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
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            steps: 250,
            sampler: Sampler::Ddpm,
            cfg_scale: 4.0,
            cfg_channels: GuidedChannels::Reference,
            clip_denoised: false,
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

/// Checks a starting noise array against the model's latent shape for `n` samples.
pub fn check_noise(model: &DiT, noise: &Tensor, n: usize) -> Result<()> {
    let c = &model.config;
    let want = [n, c.in_channels, c.input_size, c.input_size];
    if noise.dims() != want {
        return Err(Error::Input(format!(
            "noise has shape {:?} but {n} samples of this model need {want:?} (N, C, H, W)",
            noise.dims()
        )));
    }
    Ok(())
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
    check_labels(model, labels)?;
    check_noise(model, &noise, labels.len())?;
    let mut diffusion = GaussianDiffusion::dit(&opts.steps.to_string())?;
    diffusion.clip_denoised = opts.clip_denoised;
    let y = Tensor::from_vec(
        labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
        labels.len(),
        noise.device(),
    )?;
    // The chain itself stays in f32 whatever the model's dtype (as under torch autocast).
    let noise = noise.to_dtype(DType::F32)?;
    let guided = opts.cfg_scale > 1.0;
    let x0 = sample_loop(
        &diffusion,
        |x: &Tensor, t: &Tensor| {
            let out = if guided {
                model.forward_with_cfg(x, t, &y, opts.cfg_scale, opts.cfg_channels)
            } else {
                model.forward(x, t, &y)
            };
            out?.to_dtype(DType::F32)
        },
        noise,
        opts.sampler,
        rng,
        on_step,
    )?;
    Ok(x0)
}
