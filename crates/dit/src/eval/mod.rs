//! Evaluation: forward-pass Gflops; the ADM suite's FID, sFID, Inception Score and
//! precision/recall on the FID Inception network; the built-in set's classifier.

pub mod classifier;
pub mod flops;
pub mod frechet;
pub mod inception;
pub mod metrics;
pub mod npz;
pub mod suite;

pub use frechet::{frechet_distance, GaussianStats};
