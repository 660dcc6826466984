//! Gaussian diffusion with a learned-range variance (Nichol & Dhariwal 2021, as DiT uses it).
//!
//! Symbols: beta_t the noise schedule, alpha_t = 1 - beta_t, abar_t = prod alpha_s (s <= t).
//! Forward:  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).
//! Posterior: q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I) with
//!   c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t), c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t),
//!   beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).
//! The model predicts eps and v in [-1, 1]; log Sigma = frac log beta_t + (1 - frac) log beta~_t,
//! frac = (v + 1) / 2.
//!
//! All coefficients are computed in f64 and applied per sample as (N, 1, 1, 1) tensors in the
//! dtype of x, as the reference does.

use candle_core::{Device, Result, Tensor};

use serde::{Deserialize, Serialize};

use super::schedule::{linear_betas, respace_betas, space_timesteps, Schedule};

/// What the network's first C output channels predict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    /// The noise eps (DiT's).
    #[default]
    Eps,
    /// The clean sample x_0.
    X0,
    /// v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022).
    V,
}

/// The regression loss on the prediction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    #[default]
    Mse,
    L1,
}

#[derive(Debug, Clone)]
pub struct GaussianDiffusion {
    /// Original timestep index (what the model was trained with) of each respaced step.
    pub timestep_map: Vec<usize>,
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    sqrt_alphas_cumprod: Vec<f64>,
    sqrt_one_minus_alphas_cumprod: Vec<f64>,
    sqrt_recip_alphas_cumprod: Vec<f64>,
    sqrt_recipm1_alphas_cumprod: Vec<f64>,
    pub posterior_variance: Vec<f64>,
    pub posterior_log_variance_clipped: Vec<f64>,
    posterior_mean_coef1: Vec<f64>,
    posterior_mean_coef2: Vec<f64>,
    /// Clamp the predicted x_0 to [-1, 1] before forming the posterior (IDDPM's
    /// `clip_denoised`): right for pixel-space models, off for DiT's unbounded latents.
    pub clip_denoised: bool,
    pub prediction: Prediction,
    pub loss: LossKind,
}

/// The model's p(x_{t-1} | x_t): mean, variance (and its log), and the implied x_0.
#[derive(Debug, Clone)]
pub struct MeanVariance {
    pub mean: Tensor,
    pub variance: Tensor,
    pub log_variance: Tensor,
    pub pred_xstart: Tensor,
    pub eps: Tensor,
}

impl GaussianDiffusion {
    /// DiT's diffusion: 1000 linear steps respaced by `spec` ("250", "ddim50", "" for all).
    pub fn dit(spec: &str) -> crate::Result<Self> {
        Self::respaced(&linear_betas(1000), spec)
    }

    /// A model's diffusion: its schedule over 1000 steps and its prediction target, respaced
    /// by `spec`.
    pub fn for_model(
        schedule: Schedule,
        prediction: Prediction,
        spec: &str,
    ) -> crate::Result<Self> {
        let mut d = Self::respaced(&schedule.betas(1000), spec)?;
        d.prediction = prediction;
        Ok(d)
    }

    pub fn respaced(base_betas: &[f64], spec: &str) -> crate::Result<Self> {
        let n = base_betas.len();
        let keep = if spec.is_empty() {
            (0..n).collect()
        } else {
            space_timesteps(n, spec)?
        };
        Ok(Self::new(respace_betas(base_betas, &keep), keep))
    }

    pub fn new(betas: Vec<f64>, timestep_map: Vec<usize>) -> Self {
        let mut acp = Vec::with_capacity(betas.len());
        let mut prod = 1.0;
        for b in &betas {
            prod *= 1.0 - b;
            acp.push(prod);
        }
        let acp_prev: Vec<f64> = std::iter::once(1.0)
            .chain(acp[..acp.len() - 1].iter().copied())
            .collect();
        let map = |f: &dyn Fn(usize) -> f64| (0..betas.len()).map(f).collect::<Vec<f64>>();
        let posterior_variance = map(&|t| betas[t] * (1.0 - acp_prev[t]) / (1.0 - acp[t]));
        // beta~_0 = 0: the log is clipped to beta~_1 at t = 0.
        let pv1 = posterior_variance
            .get(1)
            .copied()
            .unwrap_or(posterior_variance[0]);
        let posterior_log_variance_clipped = map(&|t| {
            if t == 0 {
                pv1.ln()
            } else {
                posterior_variance[t].ln()
            }
        });
        Self {
            sqrt_alphas_cumprod: map(&|t| acp[t].sqrt()),
            sqrt_one_minus_alphas_cumprod: map(&|t| (1.0 - acp[t]).sqrt()),
            sqrt_recip_alphas_cumprod: map(&|t| (1.0 / acp[t]).sqrt()),
            sqrt_recipm1_alphas_cumprod: map(&|t| (1.0 / acp[t] - 1.0).sqrt()),
            posterior_mean_coef1: map(&|t| betas[t] * acp_prev[t].sqrt() / (1.0 - acp[t])),
            posterior_mean_coef2: map(&|t| {
                (1.0 - acp_prev[t]) * (1.0 - betas[t]).sqrt() / (1.0 - acp[t])
            }),
            posterior_variance,
            posterior_log_variance_clipped,
            alphas_cumprod: acp,
            alphas_cumprod_prev: acp_prev,
            timestep_map,
            clip_denoised: false,
            prediction: Prediction::Eps,
            loss: LossKind::Mse,
            betas,
        }
    }

    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// The original timesteps of respaced steps `ts`, as the f32 tensor the model takes.
    pub fn model_timesteps(&self, ts: &[usize], device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = ts.iter().map(|&t| self.timestep_map[t] as f32).collect();
        Tensor::from_vec(v, ts.len(), device)
    }

    /// arr[t] for each sample, shaped (N, 1, 1, 1) in `like`'s dtype.
    fn extract(arr: &[f64], ts: &[usize], like: &Tensor) -> Result<Tensor> {
        let v: Vec<f32> = ts.iter().map(|&t| arr[t] as f32).collect();
        let mut shape = vec![ts.len()];
        shape.resize(like.rank(), 1);
        Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())
    }

    /// q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
    pub fn q_sample(&self, x0: &Tensor, ts: &[usize], noise: &Tensor) -> Result<Tensor> {
        let a = Self::extract(&self.sqrt_alphas_cumprod, ts, x0)?;
        let s = Self::extract(&self.sqrt_one_minus_alphas_cumprod, ts, x0)?;
        x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?
    }

    /// Mean, variance and log variance of q(x_{t-1} | x_t, x_0).
    pub fn q_posterior(
        &self,
        x0: &Tensor,
        xt: &Tensor,
        ts: &[usize],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c1 = Self::extract(&self.posterior_mean_coef1, ts, xt)?;
        let c2 = Self::extract(&self.posterior_mean_coef2, ts, xt)?;
        let mean = (x0.broadcast_mul(&c1)? + xt.broadcast_mul(&c2)?)?;
        let var = Self::extract(&self.posterior_variance, ts, xt)?.broadcast_as(xt.shape())?;
        let log_var = Self::extract(&self.posterior_log_variance_clipped, ts, xt)?
            .broadcast_as(xt.shape())?;
        Ok((mean, var, log_var))
    }

    /// x_0 = x_t / sqrt(abar_t) - sqrt(1 / abar_t - 1) eps.
    pub fn predict_xstart_from_eps(
        &self,
        xt: &Tensor,
        ts: &[usize],
        eps: &Tensor,
    ) -> Result<Tensor> {
        let a = Self::extract(&self.sqrt_recip_alphas_cumprod, ts, xt)?;
        let b = Self::extract(&self.sqrt_recipm1_alphas_cumprod, ts, xt)?;
        xt.broadcast_mul(&a)? - eps.broadcast_mul(&b)?
    }

    /// eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1).
    pub fn predict_eps_from_xstart(
        &self,
        xt: &Tensor,
        ts: &[usize],
        x0: &Tensor,
    ) -> Result<Tensor> {
        let a = Self::extract(&self.sqrt_recip_alphas_cumprod, ts, xt)?;
        let b = Self::extract(&self.sqrt_recipm1_alphas_cumprod, ts, xt)?;
        (xt.broadcast_mul(&a)? - x0)?.broadcast_div(&b)
    }

    /// (x_0, eps) implied by the model's prediction `pred` at x_t.
    pub fn x0_and_eps(&self, pred: &Tensor, xt: &Tensor, ts: &[usize]) -> Result<(Tensor, Tensor)> {
        match self.prediction {
            Prediction::Eps => Ok((self.predict_xstart_from_eps(xt, ts, pred)?, pred.clone())),
            Prediction::X0 => Ok((pred.clone(), self.predict_eps_from_xstart(xt, ts, pred)?)),
            Prediction::V => {
                // x_0 = sqrt(abar) x_t - sqrt(1 - abar) v, eps = sqrt(1 - abar) x_t + sqrt(abar) v.
                let a = Self::extract(&self.sqrt_alphas_cumprod, ts, xt)?;
                let s = Self::extract(&self.sqrt_one_minus_alphas_cumprod, ts, xt)?;
                let x0 = (xt.broadcast_mul(&a)? - pred.broadcast_mul(&s)?)?;
                let eps = (xt.broadcast_mul(&s)? + pred.broadcast_mul(&a)?)?;
                Ok((x0, eps))
            }
        }
    }

    /// What the model learns to output for x_0 and the noise at steps ts.
    pub fn training_target(&self, x0: &Tensor, noise: &Tensor, ts: &[usize]) -> Result<Tensor> {
        match self.prediction {
            Prediction::Eps => Ok(noise.clone()),
            Prediction::X0 => Ok(x0.clone()),
            Prediction::V => {
                let a = Self::extract(&self.sqrt_alphas_cumprod, ts, x0)?;
                let s = Self::extract(&self.sqrt_one_minus_alphas_cumprod, ts, x0)?;
                noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?
            }
        }
    }

    /// p(x_{t-1} | x_t) from a model output (N, 2C, H, W) = [eps, v] (learned range) or
    /// (N, C, H, W) = eps (fixed small variance beta~_t). x_0 is not clipped, as in DiT's sampler.
    pub fn p_mean_variance(
        &self,
        model_out: &Tensor,
        xt: &Tensor,
        ts: &[usize],
    ) -> Result<MeanVariance> {
        let c = xt.dim(1)?;
        let (x0, eps) = self.x0_and_eps(&model_out.narrow(1, 0, c)?, xt, ts)?;
        let (variance, log_variance) = if model_out.dim(1)? == 2 * c {
            let v = model_out.narrow(1, c, c)?;
            let min_log = Self::extract(&self.posterior_log_variance_clipped, ts, xt)?;
            let max_log = Self::extract(
                &self.betas.iter().map(|b| b.ln()).collect::<Vec<_>>(),
                ts,
                xt,
            )?;
            let frac = ((v + 1.0)? / 2.0)?;
            // frac * max_log + (1 - frac) * min_log
            let log_var =
                (frac.broadcast_mul(&max_log)? + (1.0 - &frac)?.broadcast_mul(&min_log)?)?;
            (log_var.exp()?, log_var)
        } else {
            let (_, var, log_var) = self.q_posterior(xt, xt, ts)?;
            (var, log_var)
        };
        let mut pred_xstart = x0;
        if self.clip_denoised {
            pred_xstart = pred_xstart.clamp(-1f32, 1f32)?;
        }
        let (mean, _, _) = self.q_posterior(&pred_xstart, xt, ts)?;
        Ok(MeanVariance {
            mean,
            variance,
            log_variance,
            pred_xstart,
            eps,
        })
    }

    /// One ancestral (DDPM) step: x_{t-1} = mean + exp(log_var / 2) noise, no noise at t = 0.
    pub fn p_sample(
        &self,
        model_out: &Tensor,
        xt: &Tensor,
        t: usize,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let ts = vec![t; xt.dim(0)?];
        let out = self.p_mean_variance(model_out, xt, &ts)?;
        if t == 0 {
            return Ok(out.mean);
        }
        out.mean + ((out.log_variance * 0.5)?.exp()? * noise)?
    }

    /// One DDIM step (Song et al. 2020, eq. 12) with the given eta (0: deterministic):
    /// x_{t-1} = x_0 sqrt(abar_{t-1}) + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma noise,
    /// sigma = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}).
    pub fn ddim_sample(
        &self,
        model_out: &Tensor,
        xt: &Tensor,
        t: usize,
        eta: f64,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let ts = vec![t; xt.dim(0)?];
        let out = self.p_mean_variance(model_out, xt, &ts)?;
        // eps re-derived from x_0, as the reference does.
        let eps = self.predict_eps_from_xstart(xt, &ts, &out.pred_xstart)?;
        let (ab, abp) = (self.alphas_cumprod[t], self.alphas_cumprod_prev[t]);
        let sigma = eta * ((1.0 - abp) / (1.0 - ab)).sqrt() * (1.0 - ab / abp).sqrt();
        let mean = ((out.pred_xstart * abp.sqrt())? + (eps * (1.0 - abp - sigma * sigma).sqrt())?)?;
        if t == 0 || sigma == 0.0 {
            return Ok(mean);
        }
        mean + (noise * sigma)?
    }

    /// One step of DPM-Solver++(2M) (Lu et al. 2022, multistep, second order, data prediction)
    /// from respaced step t to the previous one, in log-SNR time lambda = log(alpha / sigma)
    /// with alpha = sqrt(abar), sigma = sqrt(1 - abar) and h = lambda_{t-1} - lambda_t:
    ///   x_{t-1} = (sigma_{t-1} / sigma_t) x_t - alpha_{t-1} (e^{-h} - 1) D,
    /// D = x0_t (first order), or with the previous step's x0 and r = h_prev / h,
    /// D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev. The final step (to abar = 1, sigma = 0) is first
    /// order and returns x0_t. `prev` is the x0 prediction of the step before, and its lambda.
    /// Returns x_{t-1}, and this step's (x0, lambda) to pass on.
    pub fn dpm_solver_pp_step(
        &self,
        model_out: &Tensor,
        xt: &Tensor,
        t: usize,
        prev: Option<&(Tensor, f64)>,
    ) -> Result<(Tensor, (Tensor, f64))> {
        let ts = vec![t; xt.dim(0)?];
        let x0 = self.p_mean_variance(model_out, xt, &ts)?.pred_xstart;
        let (ab, abp) = (self.alphas_cumprod[t], self.alphas_cumprod_prev[t]);
        let lambda = |a: f64| 0.5 * (a / (1.0 - a)).ln();
        let lambda_t = lambda(ab);
        if abp >= 1.0 {
            return Ok((x0.clone(), (x0, lambda_t)));
        }
        let (alpha_n, sigma_n, sigma_t) = (abp.sqrt(), (1.0 - abp).sqrt(), (1.0 - ab).sqrt());
        let h = lambda(abp) - lambda_t;
        let d = match prev {
            Some((x0_prev, lambda_prev)) => {
                let r = (lambda_t - lambda_prev) / h;
                ((&x0 * (1.0 + 0.5 / r))? - (x0_prev * (0.5 / r))?)?
            }
            None => x0.clone(),
        };
        let next = ((xt * (sigma_n / sigma_t))? - (d * (alpha_n * ((-h).exp() - 1.0)))?)?;
        Ok((next, (x0, lambda_t)))
    }

    /// The reference's hybrid training loss (IDDPM `training_losses` with a learned-range
    /// variance and plain MSE): per sample, mse = mean (eps - eps_theta)^2, plus the variational
    /// bound term in bits per dimension computed with the predicted mean frozen (so it trains only
    /// the variance): KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the discretised
    /// Gaussian decoder NLL at t = 0. `model_out` is the model's output at `x_t`.
    pub fn training_losses(
        &self,
        model_out: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        noise: &Tensor,
        ts: &[usize],
    ) -> Result<LossTerms> {
        let c = x_t.dim(1)?;
        let pred = model_out.narrow(1, 0, c)?;
        let err = (self.training_target(x_start, noise, ts)? - &pred)?;
        let mse = match self.loss {
            LossKind::Mse => mean_flat(&err.sqr()?)?,
            LossKind::L1 => mean_flat(&err.abs()?)?,
        };
        if model_out.dim(1)? != 2 * c {
            return Ok(LossTerms {
                loss: mse.clone(),
                mse,
                vb: None,
            });
        }
        // Stop-gradient on the mean: the VB term only shapes the variance.
        let frozen = Tensor::cat(&[pred.detach(), model_out.narrow(1, c, c)?], 1)?;
        let p = self.p_mean_variance(&frozen, x_t, ts)?;
        let (true_mean, _, true_log_var) = self.q_posterior(x_start, x_t, ts)?;
        let ln2 = std::f64::consts::LN_2;
        let kl = (mean_flat(&normal_kl(
            &true_mean,
            &true_log_var,
            &p.mean,
            &p.log_variance,
        )?)? / ln2)?;
        let nll = (mean_flat(&discretized_gaussian_log_likelihood(
            x_start,
            &p.mean,
            &(&p.log_variance * 0.5)?,
        )?)? / (-ln2))?;
        let at_zero: Vec<u8> = ts.iter().map(|&t| u8::from(t == 0)).collect();
        let at_zero = Tensor::from_vec(at_zero, ts.len(), x_t.device())?;
        let vb = at_zero.where_cond(&nll, &kl)?;
        Ok(LossTerms {
            loss: (&mse + &vb)?,
            mse,
            vb: Some(vb),
        })
    }
}

/// Per-sample loss terms, each (N,).
#[derive(Debug, Clone)]
pub struct LossTerms {
    pub loss: Tensor,
    pub mse: Tensor,
    /// The variational-bound term (bits per dimension); None for fixed-variance models.
    pub vb: Option<Tensor>,
}

/// Mean over every dimension but the batch.
fn mean_flat(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(1)?.mean(1)
}

/// KL divergence between two diagonal Gaussians given means and log variances, element-wise.
pub fn normal_kl(
    mean1: &Tensor,
    logvar1: &Tensor,
    mean2: &Tensor,
    logvar2: &Tensor,
) -> Result<Tensor> {
    // 0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2))
    let t = ((logvar2 - logvar1)? + (logvar1 - logvar2)?.exp()?)?;
    let t = (t + (mean1 - mean2)?.sqr()?.mul(&logvar2.neg()?.exp()?)?)?;
    (t - 1.0)? * 0.5
}

/// A fast approximation of the standard normal CDF (the one IDDPM uses).
fn approx_standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * (2.0 / std::f64::consts::PI).sqrt())?;
    (inner.tanh()? + 1.0)? * 0.5
}

/// Log-likelihood of images in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2),
/// element-wise; the edge bins take the whole tails.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Result<Tensor> {
    let centered = (x - means)?;
    let inv_std = log_scales.neg()?.exp()?;
    let cdf_plus = approx_standard_normal_cdf(&((&centered + 1.0 / 255.0)? * &inv_std)?)?;
    let cdf_min = approx_standard_normal_cdf(&((&centered - 1.0 / 255.0)? * &inv_std)?)?;
    let log_cdf_plus = cdf_plus.clamp(1e-12, f64::INFINITY)?.log()?;
    let log_one_minus_cdf_min = (1.0 - &cdf_min)?.clamp(1e-12, f64::INFINITY)?.log()?;
    let log_cdf_delta = (&cdf_plus - &cdf_min)?.clamp(1e-12, f64::INFINITY)?.log()?;
    let upper = x
        .gt(0.999)?
        .where_cond(&log_one_minus_cdf_min, &log_cdf_delta)?;
    x.lt(-0.999)?.where_cond(&log_cdf_plus, &upper)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;

    #[test]
    fn every_schedule_and_target_round_trips() {
        // x0 -> (x_t, target) -> the model output "target" gives back x0 and the noise, on a
        // real photograph (four copies, one per timestep).
        let dev = Device::Cpu;
        let photo = crate::test_util::photo();
        let x0 = Tensor::cat(&[&photo, &photo, &photo, &photo], 0).unwrap();
        let noise = Tensor::randn(0f32, 1.0, x0.shape(), &dev).unwrap();
        let ts = [1, 100, 600, 990];
        for schedule in [Schedule::Linear, Schedule::Cosine] {
            for prediction in [Prediction::Eps, Prediction::X0, Prediction::V] {
                let d = GaussianDiffusion::for_model(schedule, prediction, "").unwrap();
                let xt = d.q_sample(&x0, &ts, &noise).unwrap();
                let target = d.training_target(&x0, &noise, &ts).unwrap();
                let (x0_back, eps_back) = d.x0_and_eps(&target, &xt, &ts).unwrap();
                let (ex, en) = (max_abs_diff(&x0_back, &x0), max_abs_diff(&eps_back, &noise));
                // eps from x0 divides by sqrt(1 - abar), small at t = 1: allow for f32 there.
                assert!(
                    ex < 2e-3 && en < 2e-2,
                    "{schedule:?} {prediction:?}: x0 {ex}, eps {en}"
                );
                // The perfect prediction has zero loss whatever the target.
                let out = Tensor::cat(&[&target, &target.zeros_like().unwrap()], 1).unwrap();
                let mse = d.training_losses(&out, &x0, &xt, &noise, &ts).unwrap().mse;
                assert!(mse.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-10);
            }
        }
    }
}
