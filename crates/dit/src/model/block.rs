//! The DiT block with adaLN-Zero (Figure 3 of the paper) and the final adaLN layer.
//!
//! The conditioning vector c = t_emb + y_emb regresses, through SiLU + Linear, a shift, a scale
//! and a gate for each of the two residual branches. The gates are zero-initialised, so every
//! block starts as the identity.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::gemm_bf16::{linear, Linear};
// norm_modulate(x, shift, scale) = LayerNorm(x) * (1 + scale) + shift (no affine, eps 1e-6),
// the adaLN of the paper, fused into one pass.
use crate::ops::{gated_residual, modulated_layer_norm as norm_modulate};

/// SiLU then Linear from c to `n` chunks of `hidden` (`adaLN_modulation.1`).
fn ada_ln_chunks(linear: &Linear, c: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    linear.forward(&c.silu()?)?.chunk(n, D::Minus1)
}

/// Multi-head self-attention with a fused qkv projection (`attn.qkv`, `attn.proj`).
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
}

impl Attention {
    pub fn new(hidden: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            qkv: linear(hidden, 3 * hidden, vb.pp("qkv"))?,
            proj: linear(hidden, hidden, vb.pp("proj"))?,
            num_heads,
        })
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = crate::ops::self_attention(&self.qkv.forward(x)?, self.num_heads)?;
        self.proj.forward(&out)
    }
}

/// The pointwise MLP: fc1, GELU (tanh approximation), fc2.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(hidden: usize, mlp_hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(hidden, mlp_hidden, vb.pp("fc1"))?,
            fc2: linear(mlp_hidden, hidden, vb.pp("fc2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2
            .forward(&crate::ops::gelu_tanh(&self.fc1.forward(x)?)?)
    }
}

/// One DiT block with adaLN-Zero conditioning.
#[derive(Debug, Clone)]
pub struct DiTBlock {
    attn: Attention,
    mlp: Mlp,
    ada_ln: Linear,
}

impl DiTBlock {
    pub fn new(hidden: usize, num_heads: usize, mlp_hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attn: Attention::new(hidden, num_heads, vb.pp("attn"))?,
            mlp: Mlp::new(hidden, mlp_hidden, vb.pp("mlp"))?,
            ada_ln: linear(hidden, 6 * hidden, vb.pp("adaLN_modulation.1"))?,
        })
    }

    /// x: (N, T, D) tokens, c: (N, D) conditioning.
    pub fn forward(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let m = ada_ln_chunks(&self.ada_ln, c, 6)?;
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);

        // x + gate * attn(modulate(norm(x))), then the same with the MLP.
        let h = self
            .attn
            .forward(&norm_modulate(x, shift_msa, scale_msa)?)?;
        let x = gated_residual(x, gate_msa, &h)?;
        let h = self
            .mlp
            .forward(&norm_modulate(&x, shift_mlp, scale_mlp)?)?;
        gated_residual(&x, gate_mlp, &h)
    }
}

/// The final layer: adaLN (shift, scale; no gate), then a linear to p*p*out_channels per token.
#[derive(Debug, Clone)]
pub struct FinalLayer {
    ada_ln: Linear,
    linear: Linear,
}

impl FinalLayer {
    pub fn new(hidden: usize, patch: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            ada_ln: linear(hidden, 2 * hidden, vb.pp("adaLN_modulation.1"))?,
            linear: linear(hidden, patch * patch * out_channels, vb.pp("linear"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let m = ada_ln_chunks(&self.ada_ln, c, 2)?;
        self.linear.forward(&norm_modulate(x, &m[0], &m[1])?)
    }
}
