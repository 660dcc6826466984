//! Training as in the paper: the reference initialisation, AdamW (lr 1e-4, no weight decay),
//! EMA of the weights (0.9999), label dropout for guidance, uniform timesteps, the hybrid loss.
//!
//! The optimiser is written here rather than taken from candle-nn because its moments must be
//! saved in checkpoints and restored on resume, and candle-nn's `AdamW` keeps them private.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use crate::checkpoint::{expected_shapes, Tensors};
use crate::config::DiTConfig;
use crate::diffusion::GaussianDiffusion;
use crate::model::DiT;
use crate::rng::NoiseRng;
use crate::Result;

/// Initial weights as the reference's `initialize_weights`: Xavier-uniform linears (the patch
/// conv as a linear over C*p*p inputs) with zero biases, N(0, 0.02) label table and timestep
/// MLP weights, and zero adaLN modulation and final linear (adaLN-Zero: blocks start as the
/// identity).
pub fn reference_init(cfg: &DiTConfig, rng: &mut NoiseRng) -> Result<Tensors> {
    let mut out = Tensors::new();
    for (name, shape) in expected_shapes(cfg) {
        if name == "pos_embed" {
            continue;
        }
        let zeros = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?;
        let t = if name.ends_with(".bias")
            || name.contains("adaLN_modulation")
            || name.starts_with("final_layer.linear")
        {
            zeros
        } else if name == "y_embedder.embedding_table.weight" || name.starts_with("t_embedder.mlp")
        {
            (rng.randn_like(&zeros)? * 0.02)?
        } else {
            let (fan_out, fan_in) = (shape[0], shape[1..].iter().product::<usize>());
            let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
            ((rng.uniform_like(&zeros)? * (2.0 * bound))? - bound)?
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Hyper-parameters of a run (the paper's by default).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub ema_decay: f64,
    /// Probability of replacing a label by the null class (classifier-free guidance).
    pub class_dropout: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            ema_decay: 0.9999,
            class_dropout: 0.1,
        }
    }
}

/// AdamW (decoupled weight decay), as torch.optim.AdamW, with its state in the open.
#[derive(Debug)]
pub struct AdamW {
    pub step: usize,
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
}

impl AdamW {
    pub fn new(params: &[(String, Var)]) -> Result<Self> {
        let zeros = |v: &Var| v.zeros_like();
        let m = params
            .iter()
            .map(|(n, v)| Ok((n.clone(), zeros(v)?)))
            .collect::<Result<_>>()?;
        let v = params
            .iter()
            .map(|(n, v)| Ok((n.clone(), zeros(v)?)))
            .collect::<Result<_>>()?;
        Ok(Self { step: 0, m, v })
    }

    /// One update: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    /// theta = theta (1 - lr wd) - lr m^ / (sqrt(v^) + eps) with bias-corrected m^, v^.
    pub fn update(
        &mut self,
        cfg: &TrainConfig,
        params: &[(String, Var)],
        grads: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        self.step += 1;
        let (b1, b2) = cfg.betas;
        let c1 = 1.0 - b1.powi(self.step as i32);
        let c2 = 1.0 - b2.powi(self.step as i32);
        for (name, var) in params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.m[name] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[name] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + cfg.eps)?)?;
            let theta =
                ((var.as_tensor() * (1.0 - cfg.lr * cfg.weight_decay))? - (step * cfg.lr)?)?;
            var.set(&theta)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }
}

/// A model being trained: its variables, the EMA copy, the optimiser, the noise stream.
pub struct Trainer {
    pub model: DiT,
    pub params: Vec<(String, Var)>,
    pub ema: Tensors,
    pub opt: AdamW,
    pub cfg: TrainConfig,
    pub diffusion: GaussianDiffusion,
    pub rng: NoiseRng,
}

impl Trainer {
    /// Starts from `weights` (e.g. [`reference_init`]); the EMA starts as a copy.
    pub fn new(
        model_cfg: &DiTConfig,
        weights: Tensors,
        cfg: TrainConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut params: Vec<(String, Var)> = weights
            .iter()
            .map(|(n, t)| Ok((n.clone(), Var::from_tensor(&t.to_device(device)?)?)))
            .collect::<Result<_>>()?;
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let vars: HashMap<String, Tensor> = params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let model = DiT::new(
            model_cfg,
            VarBuilder::from_tensors(vars, DType::F32, device),
        )?;
        let ema = params
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        let opt = AdamW::new(&params)?;
        Ok(Self {
            model,
            params,
            ema,
            opt,
            cfg,
            diffusion: GaussianDiffusion::dit("")?,
            rng: NoiseRng::new(seed),
        })
    }

    /// One optimisation step on a batch of clean images (N, C, H, W) and labels; returns the loss.
    pub fn step(&mut self, x0: &Tensor, labels: &[usize]) -> Result<f32> {
        let n = labels.len();
        let t: Vec<usize> = (0..n)
            .map(|_| self.rng.below(self.diffusion.num_timesteps()))
            .collect();
        let null = self.model.null_class();
        let y: Vec<u32> = labels
            .iter()
            .map(|&l| {
                if self.rng.uniform() < self.cfg.class_dropout {
                    null as u32
                } else {
                    l as u32
                }
            })
            .collect();
        let noise = self.rng.randn_like(x0)?;
        let x_t = self.diffusion.q_sample(x0, &t, &noise)?;
        let y = Tensor::from_vec(y, n, x0.device())?;
        let out =
            self.model
                .forward(&x_t, &self.diffusion.model_timesteps(&t, x0.device())?, &y)?;
        let loss = self
            .diffusion
            .training_losses(&out, x0, &x_t, &noise, &t)?
            .loss
            .mean_all()?;
        let grads = loss.backward()?;
        self.opt.update(&self.cfg, &self.params, &grads)?;
        // EMA: ema = d ema + (1 - d) theta.
        let d = self.cfg.ema_decay;
        for (name, var) in &self.params {
            let e = ((&self.ema[name] * d)? + (var.as_tensor() * (1.0 - d))?)?;
            self.ema.insert(name.clone(), e);
        }
        Ok(loss.to_scalar::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> DiTConfig {
        DiTConfig {
            input_size: 28,
            patch_size: 4,
            in_channels: 1,
            hidden_size: 64,
            depth: 2,
            num_heads: 4,
            mlp_ratio: 4.0,
            num_classes: 10,
            learn_sigma: true,
        }
    }

    #[test]
    fn reference_init_zeroes_adaln_and_the_final_layer() {
        let w = reference_init(&tiny(), &mut NoiseRng::new(0)).unwrap();
        let abs_sum = |n: &str| {
            w[n].abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(abs_sum("blocks.1.adaLN_modulation.1.weight"), 0.0);
        assert_eq!(abs_sum("final_layer.linear.weight"), 0.0);
        assert_eq!(abs_sum("blocks.0.attn.qkv.bias"), 0.0);
        // Xavier-uniform bound for qkv: sqrt(6 / (64 + 192)).
        let max = w["blocks.0.attn.qkv.weight"]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(max <= (6f32 / 256.0).sqrt() && max > 0.1, "{max}");
        let std = w["y_embedder.embedding_table.weight"]
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((std - 0.02).abs() < 0.002, "{std}");
        // adaLN-Zero: the initial model is the identity on tokens, so its output is exactly 0.
        let model = DiT::new(
            &tiny(),
            VarBuilder::from_tensors(w, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
        let out = model
            .forward(
                &x,
                &Tensor::new(&[3f32, 700.0], &Device::Cpu).unwrap(),
                &Tensor::new(&[1u32, 10], &Device::Cpu).unwrap(),
            )
            .unwrap();
        assert_eq!(
            out.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn training_lowers_the_loss_and_tracks_the_ema() {
        let dev = Device::Cpu;
        let data = crate::data::mnist(&dev).unwrap();
        let idx: Vec<u32> = (0..16).map(|i| i * 625).collect();
        let x0 = data
            .images
            .index_select(&Tensor::new(idx.as_slice(), &dev).unwrap(), 0)
            .unwrap();
        let labels: Vec<usize> = idx.iter().map(|&i| data.labels[i as usize]).collect();
        let cfg = TrainConfig {
            lr: 2e-3,
            ema_decay: 0.5,
            ..Default::default()
        };
        let mut tr = Trainer::new(
            &tiny(),
            reference_init(&tiny(), &mut NoiseRng::new(1)).unwrap(),
            cfg,
            7,
            &dev,
        )
        .unwrap();
        // A fixed evaluation: same timesteps and noise before and after training.
        let ts: Vec<usize> = (0..16).map(|i| 30 + i * 60).collect();
        let noise = NoiseRng::new(99).randn_like(&x0).unwrap();
        let eval = |tr: &Trainer| {
            let x_t = tr.diffusion.q_sample(&x0, &ts, &noise).unwrap();
            let y = Tensor::from_vec(
                labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
                16,
                &dev,
            )
            .unwrap();
            let out = tr
                .model
                .forward(&x_t, &tr.diffusion.model_timesteps(&ts, &dev).unwrap(), &y)
                .unwrap();
            let terms = tr
                .diffusion
                .training_losses(&out, &x0, &x_t, &noise, &ts)
                .unwrap();
            terms.mse.mean_all().unwrap().to_scalar::<f32>().unwrap()
        };
        let before = eval(&tr);
        let theta0 = tr.params[0].1.as_tensor().copy().unwrap();
        tr.step(&x0, &labels).unwrap();
        // EMA after one step with decay 0.5: the mean of the initial and the new weights.
        let (name, var) = &tr.params[0];
        let want = ((theta0 + var.as_tensor()).unwrap() * 0.5).unwrap();
        let diff = (&tr.ema[name] - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "EMA off by {diff}");
        for _ in 0..40 {
            assert!(tr.step(&x0, &labels).unwrap().is_finite());
        }
        let after = eval(&tr);
        eprintln!("fixed-batch eps MSE {before} -> {after} after 41 steps");
        assert!(after < 0.7 * before, "eps MSE {before} -> {after}");
        assert_eq!(tr.opt.step, 41);
    }
}
