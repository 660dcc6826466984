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
pub mod train;
pub mod vae;

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
