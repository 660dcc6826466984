//! Stable Diffusion's KL autoencoder (sd-vae-ft-ema / sd-vae-ft-mse) through candle-transformers.
//! Latents are `encode(x) * 0.18215`; images are in [-1, 1].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};

use crate::{Error, Result};

/// The scale that makes SD latents roughly unit variance.
pub const LATENT_SCALE: f64 = 0.18215;
const WEIGHTS: [&str; 2] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
];

/// The autoencoder of Stable Diffusion 1.x (the one DiT uses): 4 latent channels, factor 8.
pub fn sd_vae_config() -> AutoEncoderKLConfig {
    AutoEncoderKLConfig {
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        latent_channels: 4,
        norm_num_groups: 32,
        use_quant_conv: true,
        use_post_quant_conv: true,
    }
}

pub struct Vae {
    inner: AutoEncoderKL,
}

/// Finds the weight file for `source`: a file, a diffusers folder (`vae/` sub-folder allowed),
/// `ema` / `mse` (the reference's names for stabilityai/sd-vae-ft-*), or a Hugging Face repo id,
/// looked up in the local cache first and downloaded when online.
pub fn resolve_weights(source: &str) -> Result<PathBuf> {
    let p = Path::new(source);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.is_dir() {
        for dir in [p.to_path_buf(), p.join("vae")] {
            if let Some(f) = WEIGHTS.iter().map(|w| dir.join(w)).find(|f| f.is_file()) {
                return Ok(f);
            }
        }
        return Err(Error::Input(format!(
            "VAE folder {source} has no {}",
            WEIGHTS.join(" or ")
        )));
    }
    let repo = match source {
        "ema" | "mse" => format!("stabilityai/sd-vae-ft-{source}"),
        s if s.contains('/') && !s.starts_with('.') && !s.starts_with('/') => s.to_string(),
        _ => {
            return Err(Error::Input(format!(
                "VAE {source} is neither a file, a folder nor a hub repo id"
            )))
        }
    };
    let cache = hf_hub::Cache::from_env().model(repo.clone());
    if let Some(f) = cache.get(WEIGHTS[0]) {
        return Ok(f);
    }
    let api = hf_hub::api::sync::Api::new().map_err(|e| Error::Input(format!("hub: {e}")))?;
    api.model(repo.clone()).get(WEIGHTS[0]).map_err(|e| {
        Error::Input(format!(
            "VAE {repo} is not in the Hugging Face cache and could not be downloaded: {e}"
        ))
    })
}

impl Vae {
    /// Loads weights in diffusers naming from a `.safetensors` or PyTorch file.
    pub fn load(
        weights: &Path,
        config: AutoEncoderKLConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let bad = |e: candle_core::Error| {
            Error::Checkpoint(format!("cannot load VAE {}: {e}", weights.display()))
        };
        let vb = if weights.extension().is_some_and(|e| e == "safetensors") {
            // SAFETY: the file is memory-mapped read-only; safetensors validates its header.
            unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, device) }
                .map_err(bad)?
        } else {
            VarBuilder::from_pth(weights, dtype, device).map_err(bad)?
        };
        let inner = AutoEncoderKL::new(vb, 3, 3, config).map_err(bad)?;
        Ok(Self { inner })
    }

    /// Latents (N, 4, h, w), already multiplied by [`LATENT_SCALE`], to images (N, 3, 8h, 8w) in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        per_item(latents, |z| self.inner.decode(&(z / LATENT_SCALE)?))
    }

    /// Images (N, 3, H, W) in [-1, 1] to a latent sample times [`LATENT_SCALE`].
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        per_item(images, |x| self.inner.encode(x)?.sample()? * LATENT_SCALE)
    }
}

/// Runs `f` on each item of the batch separately. candle 0.11.1's CPU `Linear` on a transposed
/// (non-contiguous) input with batch > 1 returns wrong values, and the VAE's attention block
/// feeds it exactly that; with batch 1 the result is exact (tests/parity.rs checks a batch of 2).
fn per_item(x: &Tensor, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Tensor> {
    let items = (0..x.dim(0)?)
        .map(|i| f(&x.narrow(0, i, 1)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&items, 0)?)
}
