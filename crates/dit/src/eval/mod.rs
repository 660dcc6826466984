//! Evaluation: forward-pass Gflops, Fréchet distances between feature statistics, and the
//! built-in set's classifier.

pub mod classifier;
pub mod flops;
pub mod frechet;

pub use frechet::{frechet_distance, GaussianStats};
