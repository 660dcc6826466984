//! Seeded noise. Every random draw of the library comes from here, so a seed fixes the result
//! on any device (draws happen on the CPU and are copied over).

use candle_core::{Result, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// A ChaCha8 stream: portable and stable across platforms and crate versions.
#[derive(Debug, Clone)]
pub struct NoiseRng(rand_chacha::ChaCha8Rng);

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        Self(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }

    /// Standard normal noise of `like`'s shape, dtype and device.
    pub fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let n = like.elem_count();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut self.0)).collect();
        Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(like.dtype())
    }

    /// The stream's position, to save in a checkpoint: (seed, word position).
    pub fn state(&self) -> ([u8; 32], u128) {
        (self.0.get_seed(), self.0.get_word_pos())
    }

    /// A stream restored from [`Self::state`].
    pub fn from_state(seed: [u8; 32], word_pos: u128) -> Self {
        let mut r = rand_chacha::ChaCha8Rng::from_seed(seed);
        r.set_word_pos(word_pos);
        Self(r)
    }

    /// Uniform [0, 1) noise of `like`'s shape, dtype and device.
    pub fn uniform_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let v: Vec<f32> = (0..like.elem_count())
            .map(|_| self.uniform() as f32)
            .collect();
        Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(like.dtype())
    }

    /// A uniform draw in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        use rand::Rng;
        self.0.random::<f64>()
    }

    /// Uniform integers in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        use rand::Rng;
        self.0.random_range(0..n)
    }
}
