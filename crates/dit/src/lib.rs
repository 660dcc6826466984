//! dit: Diffusion Transformers (Peebles & Xie, "Scalable Diffusion Models with Transformers",
//! 2022) in Rust on candle.
//!
//! - [`config`]: the paper's named configs and custom ones.
//! - [`model`]: the network, tensor names as the reference checkpoints.
//! - [`diffusion`]: schedules, respacing, the Gaussian diffusion and the DDPM / DDIM samplers.
//! - [`checkpoint`]: loading `.pt` (bare or train.py) and `.safetensors`, validation, saving.
//! - [`vae`]: Stable Diffusion's VAE through candle-transformers.
//! - [`pipeline`]: class-conditional sampling end to end.

pub mod builtin;
pub mod checkpoint;
pub mod config;
pub mod conv;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod distributed;
pub mod eval;
pub mod gemm_bf16;
pub mod image_io;
pub mod model;
pub mod ops;
#[cfg(feature = "cuda")]
pub mod ops_cuda;
pub mod pipeline;
pub mod plot;
pub mod rng;
pub mod text;
pub mod torchscript;
pub mod train;
pub mod vae;
pub mod winograd;

pub use config::DiTConfig;
pub use model::DiT;

/// Errors of the library. Each message names the file, tensor or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Checkpoint(String),
    #[error("{0}")]
    Input(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::Tensor;

    /// The real photograph of the editing tests (tests/fixtures/photo_cat.png, 32x32 RGB, from
    /// tools/make_photo_fixture.py) as (1, 3, 32, 32) in [-1, 1].
    pub fn photo() -> Tensor {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/photo_cat.png");
        let img = crate::data::folder::read_rgb(&path).unwrap();
        crate::data::folder::to_tensor(&[img], 3, &candle_core::Device::Cpu).unwrap()
    }

    /// max |a - b| over all elements.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    /// max |t| over all elements.
    pub fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}
