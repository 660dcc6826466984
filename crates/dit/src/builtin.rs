//! What ships inside the binary: a DiT trained by this project on the built-in digits (the
//! default of `dit sample`) and the classifier that `dit eval-builtin` scores samples with.
//! Both were trained here with `dit train` / `dit train-classifier`; the README has the commands.

use candle_core::{DType, Device};

use crate::checkpoint;
use crate::config::DiTConfig;
use crate::eval::classifier::Classifier;
use crate::model::DiT;
use crate::{Error, Result};

const DIT_WEIGHTS: &[u8] = include_bytes!("../../../weights/dit-mnist.safetensors");
const DIT_CONFIG: &str = include_str!("../../../weights/dit-mnist.json");
const CLASSIFIER_WEIGHTS: &[u8] = include_bytes!("../../../weights/mnist-classifier.safetensors");

/// The config of the embedded DiT (pixel space, 28x28, one channel, 10 classes).
pub fn config() -> Result<DiTConfig> {
    serde_json::from_str(DIT_CONFIG)
        .map_err(|e| Error::Checkpoint(format!("embedded model config: {e}")))
}

/// The embedded DiT (EMA weights, stored in f16) in `dtype` on `device`.
pub fn model(dtype: DType, device: &Device) -> Result<DiT> {
    let cfg = config()?;
    let tensors = candle_core::safetensors::load_buffer(DIT_WEIGHTS, &Device::Cpu)?;
    let tensors = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect::<Result<checkpoint::Tensors>>()?;
    checkpoint::build_model(&cfg, tensors, dtype, device)
}

/// The embedded evaluation classifier of the built-in digits.
pub fn classifier(device: &Device) -> Result<Classifier> {
    let tensors = candle_core::safetensors::load_buffer(CLASSIFIER_WEIGHTS, &Device::Cpu)?;
    Classifier::from_tensors(&tensors, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_weights_load() {
        let m = model(DType::F32, &Device::Cpu).unwrap();
        assert_eq!((m.config.in_channels, m.config.input_size), (1, 28));
        assert_eq!(classifier(&Device::Cpu).unwrap().num_classes, 10);
    }
}
