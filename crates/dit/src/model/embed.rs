//! The embedders of the DiT input: image patches, timesteps, class labels, and the fixed 2-D
//! sin-cos positions.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use crate::gemm_bf16::{linear, Linear};

/// Patchify: a strided convolution turns (N, C, H, W) into (N, H/p * W/p, hidden) tokens,
/// row-major over the patch grid.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Conv2d,
}

impl PatchEmbed {
    pub fn new(in_channels: usize, hidden: usize, patch: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride: patch,
            ..Default::default()
        };
        let proj = candle_nn::conv2d(in_channels, hidden, patch, cfg, vb.pp("proj"))?;
        Ok(Self { proj })
    }
}

impl Module for PatchEmbed {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.device().is_cpu() && x.dtype() == DType::BF16 {
            // candle's CPU convolution has no bf16 path; this one is small, run it in f32.
            let w = self.proj.weight().to_dtype(DType::F32)?;
            let b = self
                .proj
                .bias()
                .expect("patch conv has a bias")
                .to_dtype(DType::F32)?;
            let (stride, pad) = (self.proj.config().stride, self.proj.config().padding);
            x.to_dtype(DType::F32)?
                .conv2d(&w, pad, stride, 1, 1)?
                .broadcast_add(&b.reshape((1, (), 1, 1))?)?
                .to_dtype(DType::BF16)?
        } else {
            self.proj.forward(x)? // (N, D, h, w)
        };
        x.flatten_from(2)?.transpose(1, 2)?.contiguous()
    }
}

/// Spacetime patches (Sora): clips (N, C, T, H, W) cut into tubes of `tubelet` frames x
/// `patch` x `patch`, each projected to `hidden` (`x_embedder.proj`, a Conv3d's weight
/// (hidden, C, tubelet, patch, patch)); tokens row-major over (t, h, w).
#[derive(Debug, Clone)]
pub struct TubeEmbed {
    /// (hidden, C * tubelet * patch * patch)
    weight: Tensor,
    bias: Tensor,
    tubelet: usize,
    patch: usize,
}

impl TubeEmbed {
    pub fn new(
        in_channels: usize,
        hidden: usize,
        tubelet: usize,
        patch: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let w = vb.get((hidden, in_channels, tubelet, patch, patch), "proj.weight")?;
        Ok(Self {
            weight: w.reshape((hidden, ()))?,
            bias: vb.get(hidden, "proj.bias")?,
            tubelet,
            patch,
        })
    }
}

impl Module for TubeEmbed {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let tubes = patchify_tubes(&x.to_dtype(self.weight.dtype())?, self.tubelet, self.patch)?;
        tubes
            .broadcast_matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)
    }
}

/// Clips (N, C, T, H, W) to tubes (N, T/pt * H/p * W/p, C * pt * p * p): row-major over
/// (t, h, w), each tube's values ordered (c, frame, row, column) as a Conv3d weight.
pub fn patchify_tubes(x: &Tensor, pt: usize, p: usize) -> Result<Tensor> {
    let (n, c, t, h, w) = x.dims5()?;
    let (tt, hh, ww) = (t / pt, h / p, w / p);
    // Per frame: (N*T, H', W', C, p, p).
    let frames = x
        .permute((0, 2, 1, 3, 4))?
        .reshape((n * t, c, hh, p, ww, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((n * tt, pt, hh * ww, c, p * p))?;
    // Gather each tube's pt frames, channel-major: (N*T', H'W', C, pt, p*p).
    frames
        .permute((0, 2, 3, 1, 4))?
        .reshape((n, tt * hh * ww, c * pt * p * p))
}

/// Tokens (N, T'*H'*W', pt * p * p * C) back to clips (N, C, T'*pt, H'*p, W'*p): each token's
/// values ordered (frame, row, column, channel), as DiT's unpatchify orders (row, column,
/// channel).
pub fn unpatchify_tubes(
    x: &Tensor,
    c: usize,
    pt: usize,
    p: usize,
    (tt, hh, ww): (usize, usize, usize),
) -> Result<Tensor> {
    let n = x.dim(0)?;
    // (N*T', H'W', pt, p*p*C) -> (N*T'*pt, H', W', p, p, C): one frame's patches each.
    let frames = x
        .reshape((n * tt, hh * ww, pt, p * p * c))?
        .transpose(1, 2)?
        .reshape((n * tt * pt, hh, ww, p, p, c))?;
    frames
        .permute((0, 5, 1, 3, 2, 4))?
        .reshape((n, tt * pt, c, hh * p, ww * p))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()
}

/// Sinusoidal features of the (possibly fractional) timesteps `t` (N,): cos first, then sin,
/// frequencies exp(-ln(max_period) * i / half), as the reference's `timestep_embedding`.
pub fn timestep_features(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    let half = dim / 2;
    // In f32 step by step as the reference computes it: at t ~ 1000 an ulp of frequency is
    // visible in the cosines.
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(max_period.ln() as f32) * i as f32) / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let mut emb = Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?;
    if dim % 2 == 1 {
        emb = emb.pad_with_zeros(D::Minus1, 0, 1)?;
    }
    Ok(emb)
}

/// Timestep embedder: 256 sinusoidal features, then Linear, SiLU, Linear (`t_embedder.mlp.{0,2}`).
#[derive(Debug, Clone)]
pub struct TimestepEmbedder {
    fc1: Linear,
    fc2: Linear,
    frequency_dim: usize,
}

impl TimestepEmbedder {
    pub const FREQUENCY_DIM: usize = 256;

    pub fn new(hidden: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("mlp");
        let fc1 = linear(Self::FREQUENCY_DIM, hidden, vb.pp("0"))?;
        let fc2 = linear(hidden, hidden, vb.pp("2"))?;
        Ok(Self {
            fc1,
            fc2,
            frequency_dim: Self::FREQUENCY_DIM,
        })
    }

    /// `t`: (N,) timesteps of any dtype; returns (N, hidden) in the weights' dtype.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let dtype = self.fc1.weight().dtype();
        let freq = timestep_features(t, self.frequency_dim, 10_000.0)?.to_dtype(dtype)?;
        self.fc2.forward(&self.fc1.forward(&freq)?.silu()?)
    }
}

/// Class-label embedding table with `num_classes + 1` rows: the last is the "null" class that
/// classifier-free guidance conditions on (`y_embedder.embedding_table`).
#[derive(Debug, Clone)]
pub struct LabelEmbedder {
    table: candle_nn::Embedding,
    num_classes: usize,
}

impl LabelEmbedder {
    pub fn new(num_classes: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let table = candle_nn::embedding(num_classes + 1, hidden, vb.pp("embedding_table"))?;
        Ok(Self { table, num_classes })
    }

    /// The label used for "no class".
    pub fn null_class(&self) -> usize {
        self.num_classes
    }

    /// `y`: (N,) u32 labels in `0..=num_classes`. Label dropout for training is applied by the
    /// caller (it replaces labels by [`Self::null_class`]), which keeps this a pure lookup.
    pub fn forward(&self, y: &Tensor) -> Result<Tensor> {
        self.table.forward(y)
    }
}

/// GenTron's pooled-text embedder: Linear, SiLU, Linear from the text encoder's pooled embedding
/// to the width (`pooled_embedder.mlp.{0,2}`), summed with the timestep embedding.
#[derive(Debug, Clone)]
pub struct PooledTextEmbedder {
    fc1: Linear,
    fc2: Linear,
}

impl PooledTextEmbedder {
    pub fn new(pooled_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("mlp");
        Ok(Self {
            fc1: linear(pooled_dim, hidden, vb.pp("0"))?,
            fc2: linear(hidden, hidden, vb.pp("2"))?,
        })
    }
}

impl Module for PooledTextEmbedder {
    fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        let pooled = pooled.to_dtype(self.fc1.weight().dtype())?;
        self.fc2.forward(&self.fc1.forward(&pooled)?.silu()?)
    }
}

/// 1-D sin-cos embedding of positions, `dim` channels: sin of the first half, cos of the second,
/// frequencies 1/10000^(i/(dim/2)). Computed in f64 as the reference does with numpy.
fn sincos_1d(dim: usize, positions: &[f64]) -> Vec<Vec<f64>> {
    let half = dim / 2;
    positions
        .iter()
        .map(|&p| {
            let args: Vec<f64> = (0..half)
                .map(|i| p / 10_000f64.powf(i as f64 / half as f64))
                .collect();
            args.iter()
                .map(|a| a.sin())
                .chain(args.iter().map(|a| a.cos()))
                .collect()
        })
        .collect()
}

/// Fixed 1-D sin-cos table (n, dim) of positions 0..n (a video model's frame positions).
pub fn sincos_table(dim: usize, n: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let positions: Vec<f64> = (0..n).map(|i| i as f64).collect();
    let table: Vec<f32> = sincos_1d(dim, &positions)
        .into_iter()
        .flatten()
        .map(|v| v as f32)
        .collect();
    Tensor::from_vec(table, (n, dim), device)?.to_dtype(dtype)
}

/// Fixed 3-D sin-cos position table (1, t*h*w, dim) for spacetime patches, row-major over
/// (t, h, w): a quarter of the channels (rounded to even) encodes the frame, the rest the 2-D
/// position as [`sincos_2d`] does.
pub fn sincos_3d(
    dim: usize,
    (t, h, w): (usize, usize, usize),
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    // Even, and leaving a multiple of 4 for the two spatial axes (dim is even).
    let mut dt = 2 * (dim / 8);
    if !(dim - dt).is_multiple_of(4) {
        dt += 2;
    }
    let frames = sincos_table(dt, t, device, DType::F32)?; // (t, dt)
    let grid = sincos_2d(dim - dt, h, w, device, DType::F32)?.squeeze(0)?; // (h*w, dim - dt)
    let frames = frames.unsqueeze(1)?.broadcast_as((t, h * w, dt))?;
    let grid = grid.unsqueeze(0)?.broadcast_as((t, h * w, dim - dt))?;
    Tensor::cat(&[frames, grid], 2)?
        .reshape((1, t * h * w, dim))?
        .to_dtype(dtype)
}

/// Fixed 2-D sin-cos position table (1, h*w, dim) for a grid of `h` rows and `w` columns,
/// row-major: the first half of the channels encodes the column, the second half the row
/// (the MAE convention the reference checkpoints were trained with).
pub fn sincos_2d(dim: usize, h: usize, w: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let cols: Vec<f64> = (0..w).map(|x| x as f64).collect();
    let rows: Vec<f64> = (0..h).map(|y| y as f64).collect();
    let (ec, er) = (sincos_1d(dim / 2, &cols), sincos_1d(dim / 2, &rows));
    let mut table = Vec::with_capacity(h * w * dim);
    for r in &er {
        for c in &ec {
            table.extend(c.iter().chain(r.iter()).map(|&v| v as f32));
        }
    }
    Tensor::from_vec(table, (1, h * w, dim), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sincos_2d_encodes_column_then_row() {
        let pe = sincos_2d(8, 2, 3, &Device::Cpu, DType::F32).unwrap();
        let pe = pe.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        // token 4 = row 1, column 1. First 4 channels: column 1 -> sin(1), sin(1/100), cos(1), cos(1/100).
        let expect = [1f64.sin(), 0.01f64.sin(), 1f64.cos(), 0.01f64.cos()];
        for (a, b) in pe[4][..4].iter().zip(expect) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
        // token 2 = row 0, column 2: the row half is position 0 -> sin 0 = 0, cos 0 = 1.
        assert_eq!(&pe[2][4..], &[0.0, 0.0, 1.0, 1.0]);
        assert!((pe[2][0] as f64 - 2f64.sin()).abs() < 1e-6);
    }

    #[test]
    fn timestep_features_are_cos_then_sin() {
        let t = Tensor::new(&[0f32, 10.0], &Device::Cpu).unwrap();
        let f = timestep_features(&t, 4, 10_000.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(f[0], vec![1.0, 1.0, 0.0, 0.0]);
        // freqs = [1, 0.01]
        let e = [10f32.cos(), 0.1f32.cos(), 10f32.sin(), 0.1f32.sin()];
        for (a, b) in f[1].iter().zip(e) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
