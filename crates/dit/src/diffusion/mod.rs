//! Diffusion maths: schedules and respacing, the Gaussian diffusion, and the samplers.

pub mod gaussian;
pub mod sampler;
pub mod schedule;

pub use gaussian::{GaussianDiffusion, LossKind, LossTerms, MeanVariance, Prediction};
pub use sampler::{reverse_step, sample_loop, sample_loop_from, Sampler};
pub use schedule::{cosine_betas, linear_betas, respace_betas, space_timesteps, Schedule};
