//! Sampling loops: ancestral DDPM, DDIM and DPM-Solver++(2M) over a respaced
//! [`GaussianDiffusion`].

use candle_core::{Result, Tensor};

use super::gaussian::GaussianDiffusion;
use crate::rng::NoiseRng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// Ancestral sampling with the model's learned variance (the reference's default).
    Ddpm,
    /// DDIM with the given eta (0: deterministic).
    Ddim { eta: f64 },
    /// DPM-Solver++(2M): deterministic, second order; 20-25 steps come close to many DDPM steps.
    DpmSolverPp,
}

/// Runs the reverse chain from `x_T` to `x_0`. `model` maps (x_t, original timesteps as an (N,)
/// f32 tensor) to the model output; conditioning and guidance live inside it. `on_step` is called
/// after each step (for progress bars).
pub fn sample_loop<M>(
    diffusion: &GaussianDiffusion,
    model: M,
    x_t: Tensor,
    sampler: Sampler,
    rng: &mut NoiseRng,
    on_step: impl FnMut(usize),
) -> Result<Tensor>
where
    M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
{
    let last = diffusion.num_timesteps();
    sample_loop_from(
        diffusion,
        model,
        x_t,
        last,
        sampler,
        rng,
        on_step,
        |_, x| Ok(x),
    )
}

/// The reverse chain from x at respaced step `start - 1` down to x_0 (`start` = all steps for a
/// full chain; fewer for image-to-image). After the step that produces x_{t-1} (x_0 for t = 0),
/// `after_step(t, x)` may replace it (inpainting pastes the known region there).
#[allow(clippy::too_many_arguments)]
pub fn sample_loop_from<M>(
    diffusion: &GaussianDiffusion,
    mut model: M,
    x_t: Tensor,
    start: usize,
    sampler: Sampler,
    rng: &mut NoiseRng,
    mut on_step: impl FnMut(usize),
    mut after_step: impl FnMut(usize, Tensor) -> Result<Tensor>,
) -> Result<Tensor>
where
    M: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
{
    let n = x_t.dim(0)?;
    let mut x = x_t;
    let mut prev: Option<(Tensor, f64)> = None;
    for (done, t) in (0..start.min(diffusion.num_timesteps())).rev().enumerate() {
        let ts = diffusion.model_timesteps(&vec![t; n], x.device())?;
        let out = model(&x, &ts)?;
        x = reverse_step(diffusion, &out, &x, t, sampler, rng, &mut prev)?;
        x = after_step(t, x)?;
        on_step(done + 1);
    }
    Ok(x)
}

/// One reverse step from respaced step t with the model output `out` at x. `prev` carries the
/// multistep state of DPM-Solver++ between steps (reset it to None after jumping the chain).
pub fn reverse_step(
    diffusion: &GaussianDiffusion,
    out: &Tensor,
    x: &Tensor,
    t: usize,
    sampler: Sampler,
    rng: &mut NoiseRng,
    prev: &mut Option<(Tensor, f64)>,
) -> Result<Tensor> {
    match sampler {
        Sampler::Ddpm => {
            let noise = rng.randn_like(x)?;
            diffusion.p_sample(out, x, t, &noise)
        }
        Sampler::Ddim { eta } => {
            // Draw only when the step is stochastic, so eta = 0 consumes no randomness.
            let noise = if eta > 0.0 {
                rng.randn_like(x)?
            } else {
                x.zeros_like()?
            };
            diffusion.ddim_sample(out, x, t, eta, &noise)
        }
        Sampler::DpmSolverPp => {
            let (next, this) = diffusion.dpm_solver_pp_step(out, x, t, prev.as_ref())?;
            *prev = Some(this);
            Ok(next)
        }
    }
}
