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
use crate::distributed::{GradientReducer, SingleProcess};
use crate::model::pack::{channels_first, patch_tokens};
pub use crate::model::TextBatch;
use crate::model::{DiT, PackedConditions, Packing};
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
        let is_norm = name.contains(".norm");
        let t = if is_norm && name.ends_with(".weight") {
            zeros.ones_like()? // LayerNorm affine: the identity
        } else if name.ends_with(".bias")
            || name.contains("adaLN_modulation")
            || name.starts_with("final_layer.linear")
            // GenTron's text cross-attention and temporal attention start closed: the block is
            // its image self.
            || (cfg.text.is_some() && name.contains("cross_attn.proj"))
            || name.contains("temporal_attn.proj")
        {
            zeros
        } else if name == "y_embedder.embedding_table.weight"
            || name.starts_with("t_embedder.mlp")
            || name.starts_with("pooled_embedder.mlp")
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

/// A video model (`cfg.video`) from an image model's weights: every image weight kept, the
/// temporal attention layers initialised as [`reference_init`] does (output projection zero), so
/// the video model starts as the image model applied frame by frame. Any other missing or
/// misshapen tensor is an error naming it.
pub fn video_from_image(image: &Tensors, cfg: &DiTConfig, rng: &mut NoiseRng) -> Result<Tensors> {
    let fresh = reference_init(cfg, rng)?;
    let mut out = Tensors::new();
    for (name, init) in fresh {
        let t = match image.get(&name) {
            Some(t) => t.to_dtype(DType::F32)?,
            None if name.contains("temporal") => init,
            None => {
                return Err(crate::Error::Checkpoint(format!(
                    "the image model has no {name}"
                )))
            }
        };
        out.insert(name, t);
    }
    crate::checkpoint::validate(cfg, &out)?;
    Ok(out)
}

/// Fine-tuning on a dataset with `num_classes` classes: every pretrained weight is kept except
/// the label table, whose class rows are drawn afresh (N(0, 0.02), as the reference init) while
/// the pretrained null row, the unconditional embedding guidance relies on, moves to the new
/// last row. A table of the right size is left as it is. The positional table is not a weight
/// (it is recomputed for the model's grid), so it is dropped.
pub fn resize_label_table(
    weights: &mut Tensors,
    num_classes: usize,
    rng: &mut NoiseRng,
) -> Result<()> {
    const NAME: &str = "y_embedder.embedding_table.weight";
    weights.remove("pos_embed");
    let table = weights
        .get(NAME)
        .ok_or_else(|| crate::Error::Checkpoint(format!("no {NAME} to resize")))?;
    let (rows, hidden) = table.dims2()?;
    if rows == num_classes + 1 {
        return Ok(());
    }
    let null = table.narrow(0, rows - 1, 1)?.to_dtype(DType::F32)?;
    let fresh = (rng.randn_like(&Tensor::zeros(
        (num_classes, hidden),
        DType::F32,
        table.device(),
    )?)? * 0.02)?;
    weights.insert(NAME.to_string(), Tensor::cat(&[fresh, null], 0)?);
    Ok(())
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
    /// Video models: probability that a clip trains motion-free (its frames attend only to
    /// themselves), GenTron's motion-free guidance; with an image repeated over the frames, this
    /// is joint image-video training.
    pub motion_free: f64,
    /// Joint image-video training: a motion-free clip shows its first frame throughout (an
    /// image repeated over the frames), so the model also learns still images.
    pub still_motion_free: bool,
    /// Steps of linear learning-rate warm-up (0: none, as the paper).
    pub warmup_steps: usize,
    /// Optimiser steps over which the learning rate follows a half cosine from `lr` down to
    /// `min_lr` (and stays there after); None: constant, as the paper. A final decay settles
    /// fine detail that a constant rate keeps stirring.
    pub decay: Option<std::ops::Range<usize>>,
    pub min_lr: f64,
    /// The regression loss on the prediction (the paper: MSE).
    pub loss: crate::diffusion::LossKind,
    /// The dtype of the forward and backward passes. F32: plain training. BF16: mixed
    /// precision, as torch's autocast: the weights, their gradients, the optimiser moments and
    /// the EMA stay f32; each step computes with bf16 casts of the weights (GPU only).
    pub compute_dtype: DType,
    /// Packed training (patch n' pack): the share of each image's patches left out
    /// (NaViT's token dropping; 0: none).
    pub token_drop: f64,
}

impl TrainConfig {
    /// The learning rate of optimiser step `step` (1-based): warm-up, then constant or decayed.
    pub fn lr_at(&self, step: usize) -> f64 {
        let warm = if self.warmup_steps > 0 {
            (step as f64 / self.warmup_steps as f64).min(1.0)
        } else {
            1.0
        };
        let lr = match &self.decay {
            Some(d) if step > d.start => {
                let done = ((step - d.start) as f64 / d.len().max(1) as f64).min(1.0);
                self.min_lr
                    + (self.lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * done).cos())
            }
            _ => self.lr,
        };
        lr * warm
    }
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
            motion_free: 0.1,
            still_motion_free: false,
            warmup_steps: 0,
            decay: None,
            min_lr: 0.0,
            loss: Default::default(),
            compute_dtype: DType::F32,
            token_drop: 0.0,
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
        grads: &HashMap<String, Tensor>,
    ) -> Result<()> {
        self.step += 1;
        let lr = cfg.lr_at(self.step);
        let (b1, b2) = cfg.betas;
        let c1 = 1.0 - b1.powi(self.step as i32);
        let c2 = 1.0 - b2.powi(self.step as i32);
        for (name, var) in params {
            let Some(g) = grads.get(name) else {
                continue;
            };
            let h = crate::ops::AdamWStep {
                lr: lr as f32,
                b1: b1 as f32,
                b2: b2 as f32,
                eps: cfg.eps as f32,
                wd: cfg.weight_decay as f32,
                c1: c1 as f32,
                c2: c2 as f32,
            };
            let (m, v) = (&self.m[name], &self.v[name]);
            if let Some((theta, m, v)) = crate::ops::adamw(var.as_tensor(), g, m, v, h)? {
                var.set(&theta)?;
                self.m.insert(name.clone(), m);
                self.v.insert(name.clone(), v);
                continue;
            }
            let m = ((&self.m[name] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[name] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + cfg.eps)?)?;
            let theta = ((var.as_tensor() * (1.0 - lr * cfg.weight_decay))? - (step * lr)?)?;
            var.set(&theta)?;
            // Detached: gradients carry their backward graph, which must not outlive the step.
            self.m.insert(name.clone(), m.detach());
            self.v.insert(name.clone(), v.detach());
        }
        Ok(())
    }
}

/// What one training batch is conditioned on.
#[derive(Debug, Clone, Copy)]
pub enum Conditions<'a> {
    Labels(&'a [usize]),
    Text(&'a TextBatch),
}

/// Conditions after dropout, as the model takes them; a video model's motion flags (1: frames
/// see each other, 0: motion-free).
enum ModelInput {
    Labels(Vec<u32>),
    Text(TextBatch, Option<Vec<f32>>),
}

impl ModelInput {
    fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(match self {
            Self::Labels(y) => Self::Labels(y[start..start + len].to_vec()),
            Self::Text(t, m) => Self::Text(
                t.narrow(start, len)?,
                m.as_ref().map(|m| m[start..start + len].to_vec()),
            ),
        })
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
    /// A text model's empty-prompt encoding (one row), what text dropout substitutes.
    pub empty_prompt: Option<TextBatch>,
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
        if cfg.compute_dtype != DType::F32 && device.is_cpu() {
            return Err(crate::Error::Input(format!(
                "{:?} mixed-precision training runs on a GPU; on the CPU train in f32",
                cfg.compute_dtype
            )));
        }
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
        let mut diffusion =
            GaussianDiffusion::for_model(model_cfg.schedule, model_cfg.prediction, "")?;
        diffusion.loss = cfg.loss;
        Ok(Self {
            model,
            params,
            ema,
            opt,
            cfg,
            diffusion,
            rng: NoiseRng::new(seed),
            empty_prompt: None,
        })
    }

    /// One optimisation step on a batch of clean images (N, C, H, W) and labels; returns the loss.
    pub fn step(&mut self, x0: &Tensor, labels: &[usize]) -> Result<f32> {
        self.step_accumulated(x0, labels, labels.len())
    }

    /// One optimisation step on a global batch run as micro-batches of at most `micro` samples
    /// (gradient accumulation): each micro-batch's mean-loss gradient is weighted by its share
    /// of the batch and summed, so the update is the one-batch update up to float rounding.
    /// The random draws (timesteps, label dropout, noise) are made for the whole batch first, in
    /// the same order whatever `micro` is.
    pub fn step_accumulated(&mut self, x0: &Tensor, labels: &[usize], micro: usize) -> Result<f32> {
        let n = labels.len();
        self.step_sharded(x0, labels, 0..n, n, micro, &SingleProcess)
    }

    /// One data-parallel step: this worker holds rows `rows` (x0 and labels) of a global batch
    /// of `global` samples; the draws are made for the whole global batch (the same on every
    /// worker) and this worker's rows taken, its share-weighted gradients are summed over the
    /// workers by `reducer`, and every worker applies the same update. Returns the global loss.
    pub fn step_sharded(
        &mut self,
        x0: &Tensor,
        labels: &[usize],
        rows: std::ops::Range<usize>,
        global: usize,
        micro: usize,
        reducer: &dyn GradientReducer,
    ) -> Result<f32> {
        let cond = Conditions::Labels(labels);
        self.step_conditioned(x0, cond, rows, global, micro, reducer)
    }

    /// One step of a text-conditioned model on images and their encoded prompts, in micro-batches
    /// of at most `micro`; dropped prompts (probability `class_dropout`) become
    /// [`Self::empty_prompt`].
    pub fn step_text(&mut self, x0: &Tensor, text: &TextBatch, micro: usize) -> Result<f32> {
        let n = text.len()?;
        self.step_conditioned(x0, Conditions::Text(text), 0..n, n, micro, &SingleProcess)
    }

    /// [`Self::step_sharded`] for either kind of condition.
    pub fn step_conditioned(
        &mut self,
        x0: &Tensor,
        cond: Conditions,
        rows: std::ops::Range<usize>,
        global: usize,
        micro: usize,
        reducer: &dyn GradientReducer,
    ) -> Result<f32> {
        let n = match cond {
            Conditions::Labels(l) => l.len(),
            Conditions::Text(t) => t.len()?,
        };
        if rows.len() != n || x0.dim(0)? != n || rows.end > global {
            return Err(crate::Error::Input(format!(
                "rows {rows:?} of a batch of {global} do not match {n} conditions and {} images",
                x0.dim(0)?
            )));
        }
        let t_all: Vec<usize> = (0..global)
            .map(|_| self.rng.below(self.diffusion.num_timesteps()))
            .collect();
        let dropped: Vec<bool> = (0..global)
            .map(|_| self.rng.uniform() < self.cfg.class_dropout)
            .collect();
        // (Drawn for video models only: image runs keep their random stream.)
        let temporal = self.model.config.temporal_attention();
        let motion: Option<Vec<f32>> = temporal.then(|| {
            (0..global)
                .map(|_| f32::from(u8::from(self.rng.uniform() >= self.cfg.motion_free)))
                .collect()
        });
        let mut global_shape = x0.dims().to_vec();
        global_shape[0] = global;
        let noise_all = self.rng.randn_like(&Tensor::zeros(
            global_shape.as_slice(),
            x0.dtype(),
            x0.device(),
        )?)?;
        let t = &t_all[rows.clone()];
        let drop = &dropped[rows.clone()];
        let motion = motion.map(|m| m[rows.clone()].to_vec());
        let y = self.model_input(cond, drop, motion)?;
        let noise = noise_all.narrow(0, rows.start, rows.len())?;
        let x0 = match (&y, self.cfg.still_motion_free) {
            (ModelInput::Text(_, Some(motion)), true) => stills(x0, motion)?,
            _ => x0.clone(),
        };
        let x0 = &x0;
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut total = Tensor::zeros((), DType::F32, x0.device())?;
        for start in (0..n).step_by(micro.max(1)) {
            let len = micro.max(1).min(n - start);
            let share = len as f64 / global as f64;
            let loss = self.loss_with(
                &x0.narrow(0, start, len)?,
                &t[start..start + len],
                &noise.narrow(0, start, len)?,
                &y.narrow(start, len)?,
            )?;
            total = (total + (loss.detach() * share)?)?;
            self.accumulate_gradients(&loss, (len != global).then_some(share), &mut grads)?;
        }
        self.apply_gradients(grads, total, reducer)
    }

    /// Conditions after dropout (`drop`: the rows whose label or prompt is dropped), as the
    /// model takes them, with a video model's motion flags.
    fn model_input(
        &self,
        cond: Conditions,
        drop: &[bool],
        motion: Option<Vec<f32>>,
    ) -> Result<ModelInput> {
        Ok(match cond {
            Conditions::Labels(labels) => {
                let null = self.model.null_class() as u32;
                let y = labels.iter().zip(drop);
                ModelInput::Labels(y.map(|(&l, &d)| if d { null } else { l as u32 }).collect())
            }
            Conditions::Text(text) => {
                let empty = self.empty_prompt.as_ref().ok_or_else(|| {
                    crate::Error::Input(
                        "text training needs the empty prompt's encoding (Trainer::empty_prompt) \
                         for text dropout"
                            .into(),
                    )
                })?;
                ModelInput::Text(text.with_dropped(drop, empty)?, motion)
            }
        })
    }

    /// Adds the gradients of `loss` (scaled by `share` when given) to `grads`.
    fn accumulate_gradients(
        &self,
        loss: &Tensor,
        share: Option<f64>,
        grads: &mut HashMap<String, Tensor>,
    ) -> Result<()> {
        let store = loss.backward()?;
        for (name, var) in &self.params {
            let Some(g) = store.get(var.as_tensor()) else {
                continue;
            };
            let g = match share {
                None => g.clone(),
                Some(share) => (g * share)?,
            };
            let sum = match grads.remove(name) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            grads.insert(name.clone(), sum.detach());
        }
        Ok(())
    }

    /// Sums the gradients and the loss `total` over the workers, then the AdamW update and the
    /// EMA. Returns the (global) loss.
    fn apply_gradients(
        &mut self,
        mut grads: HashMap<String, Tensor>,
        mut total: Tensor,
        reducer: &dyn GradientReducer,
    ) -> Result<f32> {
        {
            // Summed over the workers (a no-op for a single process): the same names in the
            // same (sorted) order on every worker, the loss last.
            let names: Vec<String> = self
                .params
                .iter()
                .filter(|(n, _)| grads.contains_key(n))
                .map(|(n, _)| n.clone())
                .collect();
            let mut all: Vec<Tensor> = names.iter().map(|n| grads[n].clone()).collect();
            all.push(total);
            reducer.all_reduce_sum(&mut all)?;
            total = all.pop().expect("the loss was pushed");
            grads = names.into_iter().zip(all).collect();
        }
        let total = total.to_scalar::<f32>()?;
        self.opt.update(&self.cfg, &self.params, &grads)?;
        // EMA: ema = d ema + (1 - d) theta.
        let d = self.cfg.ema_decay;
        for (name, var) in &self.params {
            if let Some(e) = crate::ops::ema(&self.ema[name], var.as_tensor(), d)? {
                self.ema.insert(name.clone(), e);
                continue;
            }
            let e = ((&self.ema[name] * d)? + (var.as_tensor() * (1.0 - d))?)?;
            self.ema.insert(name.clone(), e.detach());
        }
        Ok(total)
    }

    /// One step on images of mixed sizes (each (1, C, H_i, W_i), sides multiples of the patch)
    /// run packed into sequences of `seq_len` tokens (patch n' pack; `seq_len` 0: the padded
    /// baseline, one image per sequence). With [`TrainConfig::token_drop`] that share of each
    /// image's patches is left out and its loss covers the kept ones. The loss is each image's
    /// hybrid loss, averaged over the images; timesteps, dropout and noise are drawn per image.
    pub fn step_packed(
        &mut self,
        images: &[Tensor],
        cond: Conditions,
        seq_len: usize,
    ) -> Result<f32> {
        let n = images.len();
        let conds = match cond {
            Conditions::Labels(l) => l.len(),
            Conditions::Text(t) => t.len()?,
        };
        if n == 0 || conds != n {
            return Err(crate::Error::Input(format!(
                "a packed step takes images and their conditions, one each: {n} images, {conds} conditions"
            )));
        }
        if self.cfg.compute_dtype != DType::F32 {
            return Err(crate::Error::Input("packed training runs in f32".into()));
        }
        let t: Vec<usize> = (0..n)
            .map(|_| self.rng.below(self.diffusion.num_timesteps()))
            .collect();
        let dropped: Vec<bool> = (0..n)
            .map(|_| self.rng.uniform() < self.cfg.class_dropout)
            .collect();
        let noise = images
            .iter()
            .map(|x| self.rng.randn_like(x))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let p = self.model.config.patch_size;
        let counts: Vec<usize> = images
            .iter()
            .map(|x| Ok((x.dim(2)? / p) * (x.dim(3)? / p)))
            .collect::<Result<_>>()?;
        let keep = match self.cfg.token_drop {
            0.0 => None,
            f => Some(
                counts
                    .iter()
                    .map(|&c| {
                        let k = crate::model::pack::keep_tokens(&mut self.rng, c, f);
                        Tensor::new(k.as_slice(), images[0].device())
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?,
            ),
        };
        let counts: Vec<usize> = match &keep {
            Some(k) => k.iter().map(|k| k.elem_count()).collect(),
            None => counts,
        };
        let packing = match seq_len {
            0 => Packing::padded(&counts)?,
            l => Packing::greedy(&counts, l)?,
        };
        let y = self.model_input(cond, &dropped, None)?;
        let loss = self.loss_packed(images, &t, &noise, &y, keep.as_deref(), &packing)?;
        let mut grads = HashMap::new();
        self.accumulate_gradients(&loss, None, &mut grads)?;
        self.apply_gradients(grads, loss.detach(), &SingleProcess)
    }

    /// The packed step's loss: each image noised at its step, the model run on the packed
    /// batch, each image's hybrid loss over its (kept) patches, averaged over the images.
    fn loss_packed(
        &self,
        images: &[Tensor],
        t: &[usize],
        noise: &[Tensor],
        y: &ModelInput,
        keep: Option<&[Tensor]>,
        packing: &Packing,
    ) -> Result<Tensor> {
        let d = &self.diffusion;
        let x_t = images
            .iter()
            .zip(noise)
            .zip(t)
            .map(|((x, e), &t)| d.q_sample(x, &[t], e))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let dev = images[0].device();
        let timesteps = d.model_timesteps(t, dev)?;
        let labels;
        let sets;
        let cond = match y {
            ModelInput::Labels(y) => {
                labels = Tensor::new(y.as_slice(), dev)?;
                PackedConditions::Labels(&labels)
            }
            ModelInput::Text(text, _) => {
                sets = text.token_sets();
                PackedConditions::Text {
                    texts: &sets,
                    pooled: &text.pooled,
                }
            }
        };
        let out = self
            .model
            .forward_packed_tokens(&x_t, keep, &timesteps, cond, packing)?;
        let (c, p) = (self.model.config.in_channels, self.model.config.patch_size);
        let c_out = self.model.config.out_channels();
        let losses = (0..images.len())
            .map(|i| {
                let kept = keep.map(|k| &k[i]);
                let view = |x: &Tensor| channels_first(&patch_tokens(x, p, kept)?, c);
                let terms = d.training_losses(
                    &channels_first(&out[i], c_out)?,
                    &view(&images[i])?,
                    &view(&x_t[i])?,
                    &view(&noise[i])?,
                    &t[i..i + 1],
                )?;
                Ok(terms.loss)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&losses, 0)?.mean_all()?)
    }

    /// The hybrid loss, averaged over the batch, for given timesteps, noise and labels (after
    /// dropout; the null class is `num_classes`). Differentiable in the model's variables.
    pub fn loss(&self, x0: &Tensor, t: &[usize], noise: &Tensor, y: &[u32]) -> Result<Tensor> {
        self.loss_with(x0, t, noise, &ModelInput::Labels(y.to_vec()))
    }

    /// The same for a text model and encoded prompts (after dropout).
    pub fn loss_text(
        &self,
        x0: &Tensor,
        t: &[usize],
        noise: &Tensor,
        text: &TextBatch,
    ) -> Result<Tensor> {
        self.loss_with(x0, t, noise, &ModelInput::Text(text.clone(), None))
    }

    fn loss_with(
        &self,
        x0: &Tensor,
        t: &[usize],
        noise: &Tensor,
        y: &ModelInput,
    ) -> Result<Tensor> {
        let x_t = self.diffusion.q_sample(x0, t, noise)?;
        let timesteps = self.diffusion.model_timesteps(t, x0.device())?;
        let dtype = self.cfg.compute_dtype;
        let run = |model: &DiT, x_t: &Tensor| -> Result<Tensor> {
            Ok(match y {
                ModelInput::Labels(y) => {
                    model.forward(x_t, &timesteps, &Tensor::new(y.as_slice(), x0.device())?)?
                }
                ModelInput::Text(text, motion) => {
                    let motion = match motion {
                        Some(m) => Some(Tensor::new(m.as_slice(), x0.device())?),
                        None => None,
                    };
                    let sets = text.token_sets();
                    model.forward_text_motion(
                        x_t,
                        &timesteps,
                        &sets,
                        &text.pooled,
                        motion.as_ref(),
                    )?
                }
            })
        };
        let out = if dtype == DType::F32 {
            run(&self.model, &x_t)?
        } else {
            // Autocast: a model over casts of the f32 variables. The casts are recorded, so the
            // gradients flow back to the f32 variables (and arrive there in f32).
            let casts: HashMap<String, Tensor> = self
                .params
                .iter()
                .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(dtype)?)))
                .collect::<Result<_>>()?;
            let model = DiT::new(
                &self.model.config,
                VarBuilder::from_tensors(casts, dtype, x0.device()),
            )?;
            run(&model, &x_t.to_dtype(dtype)?)?.to_dtype(DType::F32)?
        };
        Ok(self
            .diffusion
            .training_losses(&out, x0, &x_t, noise, t)?
            .loss
            .mean_all()?)
    }
}

/// Clips (N, C, T, H, W) where `motion[i]` is 0 replaced by their first frame repeated.
fn stills(x0: &Tensor, motion: &[f32]) -> Result<Tensor> {
    let first = x0.narrow(2, 0, 1)?.broadcast_as(x0.shape())?;
    let keep = Tensor::new(motion, x0.device())?
        .to_dtype(x0.dtype())?
        .reshape((motion.len(), 1, 1, 1, 1))?;
    Ok((first.broadcast_add(&(x0 - &first)?.broadcast_mul(&keep)?)?).contiguous()?)
}

/// What a checkpoint records besides tensors (written as `state.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckpointState {
    pub step: usize,
    pub model: DiTConfig,
    pub rng_seed: Vec<u8>,
    /// The noise stream's word position, as a decimal string (u128).
    pub rng_word_pos: String,
    /// Samples consumed from the data stream.
    pub data_position: usize,
}

impl Trainer {
    /// Writes `dir/step-NNNNNNN/` atomically (a temporary folder renamed into place) with
    /// `weights.safetensors` (model, EMA and optimiser moments) and `state.json`.
    pub fn save(&self, dir: &std::path::Path, data_position: usize) -> Result<std::path::PathBuf> {
        let io = |path: &std::path::Path| {
            let path = path.display().to_string();
            move |source| crate::Error::Io {
                path: path.clone(),
                source,
            }
        };
        let final_dir = dir.join(format!("step-{:07}", self.opt.step));
        let tmp = dir.join(format!(".tmp-step-{:07}", self.opt.step));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let mut tensors = Tensors::new();
        for (name, var) in &self.params {
            tensors.insert(format!("model.{name}"), var.as_tensor().clone());
            tensors.insert(format!("ema.{name}"), self.ema[name].clone());
            tensors.insert(format!("opt.m.{name}"), self.opt.m[name].clone());
            tensors.insert(format!("opt.v.{name}"), self.opt.v[name].clone());
        }
        crate::checkpoint::save_safetensors(&tensors, &tmp.join("weights.safetensors"))?;
        let (seed, pos) = self.rng.state();
        let state = CheckpointState {
            step: self.opt.step,
            model: self.model.config.clone(),
            rng_seed: seed.to_vec(),
            rng_word_pos: pos.to_string(),
            data_position,
        };
        let json =
            serde_json::to_string_pretty(&state).map_err(|e| crate::Error::Input(e.to_string()))?;
        std::fs::write(tmp.join("state.json"), json).map_err(io(&tmp))?;
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        Ok(final_dir)
    }

    /// Restores a run from a checkpoint folder written by [`Self::save`]; returns the trainer and
    /// the data position to continue from.
    pub fn resume(
        ckpt: &std::path::Path,
        cfg: TrainConfig,
        device: &Device,
    ) -> Result<(Self, usize)> {
        let bad = |m: String| {
            crate::Error::Checkpoint(format!("cannot resume from {}: {m}", ckpt.display()))
        };
        let text =
            std::fs::read_to_string(ckpt.join("state.json")).map_err(|e| bad(e.to_string()))?;
        let state: CheckpointState = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let all = candle_core::safetensors::load(ckpt.join("weights.safetensors"), device)
            .map_err(|e| bad(e.to_string()))?;
        let part = |prefix: &str| -> Tensors {
            all.iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
                .collect()
        };
        let model = part("model.");
        crate::checkpoint::validate(&state.model, &model)?;
        let mut tr = Self::new(&state.model, model, cfg, 0, device)?;
        tr.ema = part("ema.");
        tr.opt.m = part("opt.m.");
        tr.opt.v = part("opt.v.");
        tr.opt.step = state.step;
        let seed: [u8; 32] = state
            .rng_seed
            .as_slice()
            .try_into()
            .map_err(|_| bad("bad rng seed".into()))?;
        let pos: u128 = state
            .rng_word_pos
            .parse()
            .map_err(|_| bad("bad rng position".into()))?;
        tr.rng = NoiseRng::from_state(seed, pos);
        Ok((tr, state.data_position))
    }
}

/// Batches from an in-memory labelled set, in a fresh seeded permutation each epoch; the stream
/// is a pure function of (seed, position), so a resumed run continues exactly.
pub fn batch_indices(n: usize, seed: u64, position: usize, batch: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut out = Vec::with_capacity(batch);
    let mut pos = position;
    let mut epoch_perm: Option<(usize, Vec<usize>)> = None;
    while out.len() < batch {
        let (epoch, i) = (pos / n, pos % n);
        if epoch_perm.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..n).collect();
            perm.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
                seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
            epoch_perm = Some((epoch, perm));
        }
        out.push(epoch_perm.as_ref().expect("set above").1[i]);
        pos += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn motion_free_stills_repeat_the_first_frame_of_those_clips_only() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 2.0, &dev)
            .unwrap()
            .reshape((2, 1, 3, 2, 1))
            .unwrap();
        let s = stills(&x, &[1.0, 0.0]).unwrap();
        assert_eq!(max_abs_diff(&s.get(0).unwrap(), &x.get(0).unwrap()), 0.0);
        let second = s
            .get(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(second, [6.0, 7.0, 6.0, 7.0, 6.0, 7.0]);
    }
    use crate::test_util::{max_abs, max_abs_diff};

    fn tiny() -> DiTConfig {
        DiTConfig {
            input_size: 28,
            patch_size: 4,
            in_channels: 1,
            hidden_size: 64,
            depth: 2,
            num_heads: 4,
            num_classes: 10,
            ..Default::default()
        }
    }

    /// `n` built-in digits `stride` apart, with their labels.
    fn digits(n: u32, stride: u32) -> (Tensor, Vec<usize>) {
        let dev = Device::Cpu;
        let data = crate::data::mnist(&dev).unwrap();
        let idx: Vec<u32> = (0..n).map(|i| i * stride).collect();
        let x0 = data
            .images
            .index_select(&Tensor::new(idx.as_slice(), &dev).unwrap(), 0)
            .unwrap();
        let labels = idx.iter().map(|&i| data.labels[i as usize]).collect();
        (x0, labels)
    }

    /// Two trainers from the same init and seed, and a batch of built-in digits.
    fn twin_trainers(cfg: TrainConfig) -> (Trainer, Trainer, Tensor, Vec<usize>) {
        let dev = Device::Cpu;
        let (x0, labels) = digits(6, 1601);
        let init = || reference_init(&tiny(), &mut NoiseRng::new(3)).unwrap();
        let make = || Trainer::new(&tiny(), init(), cfg.clone(), 5, &dev).unwrap();
        (make(), make(), x0, labels)
    }

    fn max_param_diff(a: &Trainer, b: &Trainer) -> f32 {
        a.params
            .iter()
            .zip(&b.params)
            .map(|((_, x), (_, y))| max_abs_diff(x.as_tensor(), y.as_tensor()))
            .fold(0.0, f32::max)
    }

    /// Every block design trains: the loss on a fixed batch falls, and every weight moves (none
    /// is cut off from the gradient), except label rows the batch never uses.
    #[test]
    fn every_block_design_trains() {
        use crate::config::BlockDesign;
        let dev = Device::Cpu;
        let (x0, labels) = digits(8, 1201);
        for block in [
            BlockDesign::AdaLnZero,
            BlockDesign::AdaLn,
            BlockDesign::CrossAttention,
            BlockDesign::InContext,
        ] {
            let cfg = DiTConfig { block, ..tiny() };
            let init = reference_init(&cfg, &mut NoiseRng::new(1)).unwrap();
            let tc = TrainConfig {
                lr: 1e-3,
                ..Default::default()
            };
            let mut tr = Trainer::new(&cfg, init.clone(), tc, 2, &dev).unwrap();
            // Same timesteps and noise every step: the loss of one fixed problem.
            let losses: Vec<f32> = (0..30)
                .map(|_| {
                    tr.rng = NoiseRng::new(7);
                    tr.step(&x0, &labels).unwrap()
                })
                .collect();
            let (first, last) = (losses[0], losses[29]);
            assert!(last < 0.7 * first, "{block:?}: loss {first} -> {last}");
            for (name, var) in &tr.params {
                if name.starts_with("y_embedder") {
                    continue;
                }
                let moved = max_abs_diff(var.as_tensor(), &init[name]);
                assert!(moved > 0.0, "{block:?}: {name} never updated");
            }
        }
    }

    /// A GenTron text model trains on encoded prompts: text dropout substitutes the empty prompt
    /// row for row, the loss on a fixed problem falls, and the text path's weights (pooled MLP,
    /// cross-attention, its zero-initialised projection included) all learn.
    #[test]
    fn a_text_model_trains_with_text_dropout() {
        use crate::config::TextConditioning;
        let dev = Device::Cpu;
        let (x0, digit_labels) = digits(8, 1201);
        // "Prompts": per digit a fixed random 5-token sequence, the last 2 tokens padding for
        // odd digits; pooled = the mean of the real tokens.
        let (s, c, p) = (5, 16, 16);
        let vocab = Tensor::randn(0f32, 1.0, (10, s, c), &dev).unwrap();
        let labels: Vec<u32> = digit_labels.iter().map(|&l| l as u32).collect();
        let tokens = vocab
            .index_select(&Tensor::new(labels.as_slice(), &dev).unwrap(), 0)
            .unwrap();
        let mask: Vec<f32> = labels
            .iter()
            .flat_map(|&l| (0..s).map(move |j| if l % 2 == 1 && j >= 3 { 0.0 } else { 1.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (8, s), &dev).unwrap();
        let pooled = tokens
            .broadcast_mul(&mask.unsqueeze(2).unwrap())
            .unwrap()
            .sum(1)
            .unwrap()
            .broadcast_div(&mask.sum_keepdim(1).unwrap())
            .unwrap();
        let text = TextBatch {
            tokens,
            mask,
            pooled,
            second: None,
        };
        let empty = TextBatch {
            tokens: Tensor::zeros((1, s, c), DType::F32, &dev).unwrap(),
            mask: Tensor::new(&[[1f32, 0., 0., 0., 0.]], &dev).unwrap(),
            pooled: Tensor::zeros((1, p), DType::F32, &dev).unwrap(),
            second: None,
        };
        // Dropout replaces exactly the dropped rows.
        let drop = [false, true, false, false, true, false, false, false];
        let d = text.with_dropped(&drop, &empty).unwrap();
        for (i, &dropped) in drop.iter().enumerate() {
            let (row, orig) = (d.narrow(i, 1).unwrap(), text.narrow(i, 1).unwrap());
            let want = if dropped { &empty } else { &orig };
            assert_eq!(max_abs_diff(&row.tokens, &want.tokens), 0.0);
            assert_eq!(max_abs_diff(&row.mask, &want.mask), 0.0);
            assert_eq!(max_abs_diff(&row.pooled, &want.pooled), 0.0);
        }

        let cfg = DiTConfig {
            num_classes: 0,
            text: Some(TextConditioning {
                pooled_dim: p,
                ..TextConditioning::single(c, s)
            }),
            video: None,
            ..tiny()
        };
        let init = reference_init(&cfg, &mut NoiseRng::new(1)).unwrap();
        let tc = TrainConfig {
            lr: 1e-3,
            ..Default::default()
        };
        let mut tr = Trainer::new(&cfg, init.clone(), tc, 2, &dev).unwrap();
        let err = tr.step_text(&x0, &text, 8).unwrap_err().to_string();
        assert!(err.contains("empty prompt"), "{err}");
        tr.empty_prompt = Some(empty);
        let losses: Vec<f32> = (0..30)
            .map(|_| {
                tr.rng = NoiseRng::new(7);
                tr.step_text(&x0, &text, 5).unwrap()
            })
            .collect();
        assert!(
            losses[29] < 0.7 * losses[0],
            "loss {} -> {}",
            losses[0],
            losses[29]
        );
        for (name, var) in &tr.params {
            let moved = max_abs_diff(var.as_tensor(), &init[name]);
            assert!(moved > 0.0, "{name} never updated");
        }
        // Labels are refused by a text model, clearly.
        assert!(tr.step(&x0, &[0; 8]).is_err());
    }

    #[test]
    fn fine_tuning_resizes_only_the_label_table() {
        let mut w = reference_init(&tiny(), &mut NoiseRng::new(0)).unwrap();
        let before = w.clone();
        let old = &before["y_embedder.embedding_table.weight"];
        resize_label_table(&mut w, 3, &mut NoiseRng::new(1)).unwrap();
        let new = &w["y_embedder.embedding_table.weight"];
        assert_eq!(new.dims(), [4, 64]);
        // The null row (last) is carried over; the other weights are untouched.
        let (rows, _) = old.dims2().unwrap();
        assert_eq!(
            max_abs_diff(&new.get(3).unwrap(), &old.get(rows - 1).unwrap()),
            0.0
        );
        assert_eq!(
            max_abs_diff(
                &w["blocks.0.attn.qkv.weight"],
                &before["blocks.0.attn.qkv.weight"]
            ),
            0.0
        );
        let cfg = DiTConfig {
            num_classes: 3,
            ..tiny()
        };
        crate::checkpoint::validate(&cfg, &w).unwrap();
    }

    #[test]
    fn gradient_accumulation_matches_one_batch() {
        let (mut whole, mut parts, x0, labels) = twin_trainers(TrainConfig {
            lr: 1e-3,
            ..Default::default()
        });
        for _ in 0..3 {
            let a = whole.step(&x0, &labels).unwrap();
            let b = parts.step_accumulated(&x0, &labels, 4).unwrap(); // micro-batches 4 + 2
            assert!((a - b).abs() < 1e-5 * a.abs(), "loss {a} vs {b}");
        }
        let diff = max_param_diff(&whole, &parts);
        // Adam's update is ~lr per step whatever the gradient's size: differences of rounding
        // stay far below one step (1e-3), a wrong weighting of the parts would not.
        assert!(diff < 5e-5, "parameters differ by {diff}");
    }

    /// Workers as threads of one process: a reducer that sums through shared memory.
    struct ThreadGroup {
        rank: usize,
        world: usize,
        slots: std::sync::Arc<std::sync::Mutex<Vec<Option<Vec<Tensor>>>>>,
        barrier: std::sync::Arc<std::sync::Barrier>,
    }

    impl GradientReducer for ThreadGroup {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
            self.slots.lock().unwrap()[self.rank] = Some(tensors.to_vec());
            self.barrier.wait();
            {
                let slots = self.slots.lock().unwrap();
                for (i, t) in tensors.iter_mut().enumerate() {
                    let mut sum = slots[0].as_ref().unwrap()[i].clone();
                    for s in slots.iter().skip(1) {
                        sum = (sum + &s.as_ref().unwrap()[i])?;
                    }
                    *t = sum;
                }
            }
            self.barrier.wait(); // nobody overwrites a slot before all have read
            Ok(())
        }
    }

    #[test]
    fn data_parallel_workers_match_one_worker_on_the_global_batch() {
        // Two workers with three rows each (micro-batches of 2 + 1) against one worker on all
        // six rows: same losses, same parameters after three steps.
        let cfg = TrainConfig {
            lr: 1e-3,
            ..Default::default()
        };
        let (mut whole, _, x0, labels) = twin_trainers(cfg.clone());
        let (world, global) = (2, labels.len());
        let slots = std::sync::Arc::new(std::sync::Mutex::new(vec![None, None]));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(world));
        let workers: Vec<_> = (0..world)
            .map(|rank| {
                let (slots, barrier) = (slots.clone(), barrier.clone());
                let (x0, labels, cfg) = (x0.clone(), labels.clone(), cfg.clone());
                std::thread::spawn(move || {
                    let (mut tr, _, _, _) = twin_trainers(cfg);
                    let group = ThreadGroup {
                        rank,
                        world,
                        slots,
                        barrier,
                    };
                    let rows = crate::distributed::shard(global, rank, world).unwrap();
                    let x = x0.narrow(0, rows.start, rows.len()).unwrap();
                    let losses: Vec<f32> = (0..3)
                        .map(|_| {
                            tr.step_sharded(
                                &x,
                                &labels[rows.clone()],
                                rows.clone(),
                                global,
                                2,
                                &group,
                            )
                            .unwrap()
                        })
                        .collect();
                    (tr, losses)
                })
            })
            .collect();
        let results: Vec<(Trainer, Vec<f32>)> =
            workers.into_iter().map(|w| w.join().unwrap()).collect();
        for step in 0..3 {
            let a = whole.step(&x0, &labels).unwrap();
            for (rank, (_, losses)) in results.iter().enumerate() {
                let b = losses[step];
                assert!(
                    (a - b).abs() < 1e-5 * a.abs(),
                    "step {step} rank {rank}: loss {a} vs {b}"
                );
            }
        }
        for (rank, (tr, _)) in results.iter().enumerate() {
            let diff = max_param_diff(&whole, tr);
            assert!(diff < 5e-5, "rank {rank}: parameters differ by {diff}");
        }
        // And the workers agree with each other exactly: same gradients, same update.
        assert_eq!(max_param_diff(&results[0].0, &results[1].0), 0.0);
    }

    #[test]
    fn warm_up_scales_the_first_steps() {
        let (mut plain, mut warm, x0, labels) = twin_trainers(TrainConfig::default());
        warm.cfg.warmup_steps = 4;
        let before: Vec<Tensor> = plain
            .params
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        plain.step(&x0, &labels).unwrap();
        warm.step(&x0, &labels).unwrap();
        // Adam's first step moves every parameter with a gradient by lr (times g / (|g| + eps)).
        let moved = |tr: &Trainer| {
            tr.params
                .iter()
                .zip(&before)
                .map(|((_, v), b)| max_abs_diff(v.as_tensor(), b))
                .fold(0.0, f32::max)
        };
        let (p, w) = (moved(&plain), moved(&warm));
        assert!((p - 1e-4).abs() < 1e-6, "{p}");
        assert!((w - 0.25e-4).abs() < 1e-6, "{w}");
    }

    #[test]
    fn learning_rate_warms_up_then_decays_along_a_half_cosine() {
        let cfg = TrainConfig {
            lr: 1e-3,
            warmup_steps: 10,
            decay: Some(100..200),
            min_lr: 1e-4,
            ..Default::default()
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(cfg.lr_at(5), 0.5e-3));
        assert!(close(cfg.lr_at(50), 1e-3));
        assert!(close(cfg.lr_at(100), 1e-3));
        // Halfway down the cosine: the mean of the two rates; a quarter: 1/2 + 1/(2 sqrt 2).
        assert!(close(cfg.lr_at(150), 0.55e-3));
        assert!(close(
            cfg.lr_at(125),
            1e-4 + 9e-4 * (0.5 + 0.5 / 2f64.sqrt())
        ));
        assert!(close(cfg.lr_at(200), 1e-4));
        assert!(close(cfg.lr_at(300), 1e-4));
        // Without a decay the paper's constant rate.
        let constant = TrainConfig::default();
        assert!(close(constant.lr_at(1), 1e-4) && close(constant.lr_at(1_000_000), 1e-4));
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
        let max = max_abs(&w["blocks.0.attn.qkv.weight"]);
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
        assert_eq!(max_abs(&out), 0.0);
    }

    #[test]
    fn training_lowers_the_loss_and_tracks_the_ema() {
        let dev = Device::Cpu;
        let (x0, labels) = digits(16, 625);
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
        let init_copy: HashMap<String, Tensor> = tr
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
            .collect();
        tr.step(&x0, &labels).unwrap();
        // EMA after one step with decay 0.5: the mean of the initial and the new weights.
        let (name, var) = &tr.params[0];
        let want = ((theta0 + var.as_tensor()).unwrap() * 0.5).unwrap();
        let diff = max_abs_diff(&tr.ema[name], &want);
        assert!(diff < 1e-6, "EMA off by {diff}");
        for _ in 0..40 {
            assert!(tr.step(&x0, &labels).unwrap().is_finite());
        }
        let after = eval(&tr);
        eprintln!("fixed-batch eps MSE {before} -> {after} after 41 steps");
        assert!(after < 0.7 * before, "eps MSE {before} -> {after}");
        assert_eq!(tr.opt.step, 41);
        // Every parameter learns, the patch embedding included (gradients cross every norm).
        for (name, var) in &tr.params {
            if name.ends_with("weight") {
                let moved = max_abs_diff(var.as_tensor(), &init_copy[name]);
                assert!(moved > 0.0, "{name} never changed");
            }
        }
        // Stored state holds no backward graph (it would keep every step's graph alive: a leak
        // that grew a real run past 24 GB).
        for (name, _) in &tr.params {
            assert!(
                !tr.ema[name].track_op()
                    && !tr.opt.m[name].track_op()
                    && !tr.opt.v[name].track_op(),
                "{name}"
            );
        }
    }

    #[test]
    fn n_steps_resume_n_steps_equals_2n_steps_bit_for_bit() {
        let dev = Device::Cpu;
        let data = crate::data::mnist(&dev).unwrap();
        let cfg = TrainConfig {
            lr: 1e-3,
            ..Default::default()
        };
        let run = |tr: &mut Trainer, from: usize, steps: usize| {
            let mut pos = from;
            for _ in 0..steps {
                let idx = batch_indices(10_000, 5, pos, 4);
                let ids = Tensor::new(
                    idx.iter().map(|&i| i as u32).collect::<Vec<_>>().as_slice(),
                    &dev,
                )
                .unwrap();
                let x = data.images.index_select(&ids, 0).unwrap();
                let labels: Vec<usize> = idx.iter().map(|&i| data.labels[i]).collect();
                tr.step(&x, &labels).unwrap();
                pos += 4;
            }
            pos
        };
        let init = || reference_init(&tiny(), &mut NoiseRng::new(2)).unwrap();
        let mut straight = Trainer::new(&tiny(), init(), cfg.clone(), 11, &dev).unwrap();
        run(&mut straight, 0, 6);

        let dir = tempfile_dir();
        let mut first = Trainer::new(&tiny(), init(), cfg.clone(), 11, &dev).unwrap();
        let pos = run(&mut first, 0, 3);
        let saved = first.save(&dir, pos).unwrap();
        drop(first);
        let (mut resumed, pos) = Trainer::resume(&saved, cfg, &dev).unwrap();
        run(&mut resumed, pos, 3);

        for ((n, a), (_, b)) in straight.params.iter().zip(&resumed.params) {
            let d = max_abs_diff(a.as_tensor(), b.as_tensor());
            assert_eq!(d, 0.0, "{n} differs after resume");
            let d = max_abs_diff(&straight.ema[n], &resumed.ema[n]);
            assert_eq!(d, 0.0, "EMA {n} differs after resume");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("dit-resume-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
