//! A small CNN classifier for the built-in digits, trained by this project, to measure samples:
//! the accuracy of its predictions on generated images of each requested class, and a Fréchet
//! distance in its 128-d feature space (the penultimate layer), as FID does with Inception.
//!
//! conv 3x3 (1 -> 32) - ReLU - max-pool 2 - conv 3x3 (32 -> 64) - ReLU - max-pool 2 -
//! linear (64*7*7 -> 128) - ReLU [features] - linear (128 -> classes).

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Conv2d, Conv2dConfig, Linear, Optimizer, VarBuilder, VarMap};

use crate::checkpoint::Tensors;
use crate::data::LabelledImages;
use crate::rng::NoiseRng;
use crate::{Error, Result};

pub const FEATURES: usize = 128;

#[derive(Debug, Clone)]
pub struct Classifier {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
    pub num_classes: usize,
}

/// Parameter names and shapes.
fn shapes(num_classes: usize) -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("conv1.weight", vec![32, 1, 3, 3]),
        ("conv1.bias", vec![32]),
        ("conv2.weight", vec![64, 32, 3, 3]),
        ("conv2.bias", vec![64]),
        ("fc1.weight", vec![FEATURES, 64 * 7 * 7]),
        ("fc1.bias", vec![FEATURES]),
        ("fc2.weight", vec![num_classes, FEATURES]),
        ("fc2.bias", vec![num_classes]),
    ]
}

impl Classifier {
    /// Builds the network on 28x28 single-channel inputs from `vb` (names as [`shapes`]).
    pub fn new(num_classes: usize, vb: VarBuilder) -> Result<Self> {
        let conv = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv1: candle_nn::conv2d(1, 32, 3, conv, vb.pp("conv1"))?,
            conv2: candle_nn::conv2d(32, 64, 3, conv, vb.pp("conv2"))?,
            fc1: candle_nn::linear(64 * 7 * 7, FEATURES, vb.pp("fc1"))?,
            fc2: candle_nn::linear(FEATURES, num_classes, vb.pp("fc2"))?,
            num_classes,
        })
    }

    /// Loads weights written by [`train`] (any float dtype), checking every shape.
    pub fn from_tensors(tensors: &Tensors, device: &Device) -> Result<Self> {
        let num_classes = tensors
            .get("fc2.bias")
            .ok_or_else(|| Error::Checkpoint("classifier: missing tensor fc2.bias".into()))?
            .dim(0)?;
        for (name, shape) in shapes(num_classes) {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::Checkpoint(format!("classifier: missing tensor {name}")))?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Checkpoint(format!(
                    "classifier tensor {name} has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
        }
        let f32s: Tensors = tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?.to_device(device)?)))
            .collect::<Result<_>>()?;
        Self::new(
            num_classes,
            VarBuilder::from_tensors(f32s, DType::F32, device),
        )
    }

    /// Penultimate-layer features (N, 128) of images (N, 1, 28, 28) in [-1, 1].
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(x)?.relu()?.max_pool2d(2)?;
        let h = self.conv2.forward(&h)?.relu()?.max_pool2d(2)?;
        Ok(self.fc1.forward(&h.flatten_from(1)?)?.relu()?)
    }

    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(&self.features(x)?)?)
    }

    /// Predicted classes and features, in batches of 256.
    pub fn predict(&self, x: &Tensor) -> Result<(Vec<usize>, Vec<Vec<f32>>)> {
        let n = x.dim(0)?;
        let (mut classes, mut feats) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for start in (0..n).step_by(256) {
            let xb = x.narrow(0, start, 256.min(n - start))?;
            let f = self.features(&xb)?;
            let logits = self.fc2.forward(&f)?;
            classes.extend(
                logits
                    .argmax(D::Minus1)?
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|c| c as usize),
            );
            feats.extend(f.to_vec2::<f32>()?);
        }
        Ok((classes, feats))
    }
}

/// The held-out split of the built-in set: every tenth image.
pub fn is_held_out(index: usize) -> bool {
    index.is_multiple_of(10)
}

/// Trains a classifier on the images not held out (seeded: Kaiming-uniform weights as torch's
/// default, a seeded batch order; Adam lr 1e-3), returning it and its weights.
pub fn train(
    data: &LabelledImages,
    epochs: usize,
    seed: u64,
    mut on_epoch: impl FnMut(usize, f32),
) -> Result<(Classifier, Tensors)> {
    let device = data.images.device().clone();
    let mut rng = NoiseRng::new(seed);
    let varmap = VarMap::new();
    {
        let mut vars = varmap.data().lock().expect("fresh VarMap");
        for (name, shape) in shapes(data.num_classes) {
            let fan_in: usize = if name.ends_with(".bias") {
                shapes(data.num_classes)
                    .iter()
                    .find(|(n, _)| *n == name.replace(".bias", ".weight"))
                    .map_or(1, |(_, s)| s[1..].iter().product())
            } else {
                shape[1..].iter().product()
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            let u = rng.uniform_like(&Tensor::zeros(shape, DType::F32, &device)?)?;
            vars.insert(
                name.to_string(),
                Var::from_tensor(&((u * (2.0 * bound))? - bound)?)?,
            );
        }
    }
    let model = Classifier::new(
        data.num_classes,
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let train_idx: Vec<usize> = (0..data.labels.len())
        .filter(|&i| !is_held_out(i))
        .collect();
    let batch = 128;
    for epoch in 0..epochs {
        let mut order = train_idx.clone();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut total = 0f32;
        let mut batches = 0;
        for chunk in order.chunks(batch) {
            let ids = Tensor::from_vec(
                chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                chunk.len(),
                &device,
            )?;
            let x = data.images.index_select(&ids, 0)?;
            let y = Tensor::from_vec(
                chunk
                    .iter()
                    .map(|&i| data.labels[i] as u32)
                    .collect::<Vec<_>>(),
                chunk.len(),
                &device,
            )?;
            let loss = candle_nn::loss::cross_entropy(&model.logits(&x)?, &y)?;
            opt.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()?;
            batches += 1;
        }
        on_epoch(epoch, total / batches as f32);
    }
    let tensors = varmap
        .data()
        .lock()
        .expect("VarMap")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    Ok((model, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_weights_of_the_wrong_shape() {
        let dev = Device::Cpu;
        let mut t: Tensors = shapes(10)
            .into_iter()
            .map(|(n, s)| (n.to_string(), Tensor::zeros(s, DType::F32, &dev).unwrap()))
            .collect();
        assert!(Classifier::from_tensors(&t, &dev).is_ok());
        t.insert(
            "fc1.weight".into(),
            Tensor::zeros((128, 10), DType::F32, &dev).unwrap(),
        );
        let err = Classifier::from_tensors(&t, &dev).unwrap_err().to_string();
        assert!(
            err.contains("fc1.weight") && err.contains("[128, 10]"),
            "{err}"
        );
    }
}
