//! The DiT block and final layer, in the four designs of Figure 3 of the paper.
//!
//! - adaLN-Zero (the paper's choice): the conditioning vector c = t_emb + y_emb regresses,
//!   through SiLU + Linear, a shift, a scale and a gate for each of the two residual branches.
//!   The gates are zero-initialised, so every block starts as the identity.
//! - adaLN: the same shift and scale, no gates.
//! - Cross-attention: LayerNorm blocks with a cross-attention layer after self-attention, over
//!   the two-token sequence [t_emb, y_emb].
//! - In-context: plain ViT blocks; [t_emb, y_emb] travel as two extra tokens.

use candle_core::{Module, Result, Tensor, D};

use crate::config::BlockDesign;
use candle_nn::VarBuilder;

use super::pack::Routing;
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

    /// Self-attention over each row of x (N, T, D), or, for a packed batch, over each image's
    /// segment only: the block-diagonal mask, computed block by block.
    pub fn forward_packed(&self, x: &Tensor, packed: Option<&Routing>) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let out = match packed {
            None => crate::ops::self_attention(&qkv, self.num_heads)?,
            Some(r) => r.packing.per_segment(&qkv, |seg, _| {
                crate::ops::self_attention(seg, self.num_heads)
            })?,
        };
        self.proj.forward(&out)
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_packed(x, None)
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

/// LayerNorm with a learned affine (`norm1`, `norm2`, `norm3`, `norm_final`; eps 1e-6) for the
/// designs without adaLN. It runs through the fused adaLN kernel with shift = bias and
/// scale = weight - 1 for every sample, which is the same function.
#[derive(Debug, Clone)]
pub struct AffineLayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl AffineLayerNorm {
    pub fn new(hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(hidden, "weight")?,
            bias: vb.get(hidden, "bias")?,
        })
    }
}

impl Module for AffineLayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, d) = (x.dim(0)?, self.bias.dim(0)?);
        let per_sample = |v: &Tensor| v.unsqueeze(0)?.broadcast_as((n, d))?.contiguous();
        norm_modulate(
            x,
            &per_sample(&self.bias)?,
            &per_sample(&(&self.weight - 1.0)?)?,
        )
    }
}

/// Multi-head cross-attention: queries from the tokens x, keys and values from a context
/// sequence (`q`, `kv`, `proj`), with an optional mask of the context positions to attend to.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    q: Linear,
    kv: Linear,
    proj: Linear,
    num_heads: usize,
}

impl CrossAttention {
    pub fn new(hidden: usize, context: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q: linear(hidden, hidden, vb.pp("q"))?,
            kv: linear(context, 2 * hidden, vb.pp("kv"))?,
            proj: linear(hidden, hidden, vb.pp("proj"))?,
            num_heads,
        })
    }

    /// x: (N, T, D), context: (N, S, C), mask: (N, S) with 1 where attended, 0 for padding.
    pub fn forward(&self, x: &Tensor, context: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (n, t, d) = x.dims3()?;
        let (s, h) = (context.dim(1)?, self.num_heads);
        let dh = d / h;
        let q = self.q.forward(x)?.reshape((n, t, h, dh))?.transpose(1, 2)?;
        let kv = self.kv.forward(context)?.reshape((n, s, 2, h, dh))?;
        let kv = kv.permute((2, 0, 3, 1, 4))?; // (2, N, heads, S, dh)
        let (k, v) = (kv.get(0)?.contiguous()?, kv.get(1)?.contiguous()?);
        let mut scores = (q.contiguous()?.matmul(&k.t()?)? * (dh as f64).powf(-0.5))?;
        if let Some(m) = mask {
            // Padded positions get -1e9 before the softmax: exp underflows to exactly 0.
            let bias = ((m.to_dtype(scores.dtype())? - 1.0)? * 1e9)?.reshape((n, 1, 1, s))?;
            scores = scores.broadcast_add(&bias)?;
        }
        // The composite softmax: candle's fused softmax_last_dim has no backward pass.
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((n, t, d))?;
        self.proj.forward(&out)
    }
}

/// What a block is conditioned on: c = t_emb + y_emb (adaLN designs; t_emb + pooled text for
/// GenTron), the two-token sequence [t_emb, y_emb] (cross-attention design), and a text model's
/// text tokens (those of the encoder this block reads), and a video model's frames.
#[derive(Clone, Copy)]
pub struct Condition<'a> {
    pub c: &'a Tensor,
    pub tokens: &'a Tensor,
    pub text: Option<TextTokens<'a>>,
    pub frames: Option<Frames<'a>>,
    /// A packed batch (x is (sequences, seq_len, D); c and the text hold one row per image).
    pub packed: Option<&'a Routing>,
}

impl Condition<'_> {
    /// adaLN chunks (N, D) of the images, as rows for [`Self::rows`]: per token when packed.
    fn route(&self, chunks: Vec<Tensor>) -> Result<Vec<Tensor>> {
        match self.packed {
            None => Ok(chunks),
            Some(r) => chunks.iter().map(|m| r.route(m)).collect(),
        }
    }

    /// x as the fused per-sample ops take it: unchanged, or one token per row when packed.
    fn rows(&self, x: &Tensor) -> Result<Tensor> {
        match self.packed {
            None => Ok(x.clone()),
            Some(r) => r.rows(x),
        }
    }

    /// The inverse of [`Self::rows`].
    fn unrows(&self, x: Tensor) -> Result<Tensor> {
        match self.packed {
            None => Ok(x),
            Some(r) => r.unrows(&x),
        }
    }
}

/// How the rows of a video model's batch form clips: `count` consecutive rows (frames) per clip,
/// their position features (count, D), and per clip whether its frames see each other (`motion`,
/// (clips,) of 1 or 0; 0 is motion-free guidance's identity temporal mask; None: all see).
#[derive(Clone, Copy)]
pub struct Frames<'a> {
    pub count: usize,
    pub positions: &'a Tensor,
    pub motion: Option<&'a Tensor>,
}

/// A text encoder's output for a batch: tokens (N, S, C) and the mask of real (1) and padding (0)
/// tokens (N, S).
#[derive(Clone, Copy)]
pub struct TextTokens<'a> {
    pub tokens: &'a Tensor,
    pub mask: Option<&'a Tensor>,
}

/// GenTron's text cross-attention: x + cross_attn(LN(x), text) after self-attention. Its output
/// projection starts at zero, so a block starts as its image-only self.
#[derive(Debug, Clone)]
struct TextCrossAttention {
    norm: AffineLayerNorm,
    attn: CrossAttention,
}

/// GenTron's temporal self-attention: x + proj(attn over the frames of each spatial position).
/// Its input is LN(x) plus the frame positions, its output projection starts at zero: a new video
/// block is its image self, and the positions reach nothing else.
#[derive(Debug, Clone)]
struct TemporalAttention {
    norm: AffineLayerNorm,
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
}

impl TemporalAttention {
    /// x: (clips * frames, L, D).
    fn forward(&self, x: &Tensor, frames: Frames) -> Result<Tensor> {
        let (rows, l, d) = x.dims3()?;
        let (t, clips) = (frames.count, rows / frames.count);
        // (clips, T, L, D) -> (clips * L, T, D): one sequence over the frames per position.
        let h = self
            .norm
            .forward(x)?
            .reshape((clips, t, l, d))?
            .transpose(1, 2)?
            .reshape((clips * l, t, d))?
            .broadcast_add(&frames.positions.to_dtype(x.dtype())?)?;
        let qkv = self.qkv.forward(&h)?;
        let mut out = crate::ops::self_attention(&qkv, self.num_heads)?;
        if let Some(motion) = frames.motion {
            // A frame that attends only to itself gets its own value: the identity mask.
            let own = qkv.narrow(2, 2 * d, d)?;
            let m = motion
                .to_dtype(x.dtype())?
                .reshape((clips, 1, 1, 1))?
                .broadcast_as((clips, l, 1, 1))?
                .reshape((clips * l, 1, 1))?;
            out = (&own + (out - &own)?.broadcast_mul(&m)?)?;
        }
        let out = self
            .proj
            .forward(&out)?
            .reshape((clips, l, t, d))?
            .transpose(1, 2)?
            .reshape((rows, l, d))?;
        x + out
    }
}

/// The design-specific part of a block.
#[derive(Debug, Clone)]
enum Conditioning {
    AdaLn {
        modulation: Linear,
        gated: bool,
    },
    CrossAttention {
        norms: [AffineLayerNorm; 3],
        cross: Box<CrossAttention>,
    },
    InContext {
        norms: [AffineLayerNorm; 2],
    },
}

/// One DiT block: self-attention and MLP, conditioned as its design says; GenTron's text
/// cross-attention between them in a text model.
#[derive(Debug, Clone)]
pub struct DiTBlock {
    attn: Attention,
    mlp: Mlp,
    cond: Conditioning,
    text: Option<Box<TextCrossAttention>>,
    temporal: Option<Box<TemporalAttention>>,
}

impl DiTBlock {
    /// `text_dim`: the text tokens' width in a text-conditioned (GenTron) model; `video`: a
    /// temporal self-attention layer too.
    pub fn new(
        design: BlockDesign,
        hidden: usize,
        num_heads: usize,
        mlp_hidden: usize,
        text_dim: Option<usize>,
        video: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let norm = |name: &str| AffineLayerNorm::new(hidden, vb.pp(name));
        let cond = match design {
            BlockDesign::AdaLnZero | BlockDesign::AdaLn => {
                let gated = design == BlockDesign::AdaLnZero;
                let chunks = if gated { 6 } else { 4 };
                Conditioning::AdaLn {
                    modulation: linear(hidden, chunks * hidden, vb.pp("adaLN_modulation.1"))?,
                    gated,
                }
            }
            BlockDesign::CrossAttention => Conditioning::CrossAttention {
                norms: [norm("norm1")?, norm("norm2")?, norm("norm3")?],
                cross: Box::new(CrossAttention::new(
                    hidden,
                    hidden,
                    num_heads,
                    vb.pp("cross_attn"),
                )?),
            },
            BlockDesign::InContext => Conditioning::InContext {
                norms: [norm("norm1")?, norm("norm2")?],
            },
        };
        let text = match text_dim {
            Some(dim) => Some(Box::new(TextCrossAttention {
                norm: norm("norm_cross")?,
                attn: CrossAttention::new(hidden, dim, num_heads, vb.pp("cross_attn"))?,
            })),
            None => None,
        };
        let temporal = match video {
            true => Some(Box::new(TemporalAttention {
                norm: norm("norm_temporal")?,
                qkv: linear(hidden, 3 * hidden, vb.pp("temporal_attn.qkv"))?,
                proj: linear(hidden, hidden, vb.pp("temporal_attn.proj"))?,
                num_heads,
            })),
            false => None,
        };
        Ok(Self {
            attn: Attention::new(hidden, num_heads, vb.pp("attn"))?,
            mlp: Mlp::new(hidden, mlp_hidden, vb.pp("mlp"))?,
            cond,
            text,
            temporal,
        })
    }

    /// GenTron's video step: x + temporal_attn(LN(x) + frame positions), or x for an image model.
    fn attend_across_frames(&self, x: Tensor, cond: &Condition) -> Result<Tensor> {
        match (&self.temporal, cond.frames) {
            (Some(t), Some(frames)) => t.forward(&x, frames),
            (Some(_), None) => candle_core::bail!("a video block needs its clips' frame count"),
            (None, _) => Ok(x),
        }
    }

    /// GenTron's text step: x + cross_attn(LN(x), text tokens), or x for an image model.
    fn attend_to_text(&self, x: Tensor, cond: &Condition) -> Result<Tensor> {
        match (&self.text, cond.text) {
            (Some(t), Some(text)) => {
                let h = t.norm.forward(&x)?;
                let h = match cond.packed {
                    None => t.attn.forward(&h, text.tokens, text.mask)?,
                    // Each image's tokens attend to its own prompt.
                    Some(r) => r.packing.per_segment(&h, |seg, image| {
                        let mask = text.mask.map(|m| m.narrow(0, image, 1)).transpose()?;
                        t.attn
                            .forward(seg, &text.tokens.narrow(0, image, 1)?, mask.as_ref())
                    })?,
                };
                &x + h
            }
            (Some(_), None) => candle_core::bail!("a text-conditioned block needs text tokens"),
            (None, _) => Ok(x),
        }
    }

    /// x: (N, T, D) tokens.
    pub fn forward(&self, x: &Tensor, cond: &Condition) -> Result<Tensor> {
        match &self.cond {
            Conditioning::AdaLn {
                modulation,
                gated: true,
            } => {
                let m = cond.route(ada_ln_chunks(modulation, cond.c, 6)?)?;
                let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
                let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);
                // x + gate * attn(modulate(norm(x))), then the same with the MLP.
                let rows = cond.rows(x)?;
                let h = cond.unrows(norm_modulate(&rows, shift_msa, scale_msa)?)?;
                let h = cond.rows(&self.attn.forward_packed(&h, cond.packed)?)?;
                let x = cond.unrows(gated_residual(&rows, gate_msa, &h)?)?;
                let x = self.attend_to_text(x, cond)?;
                let rows = cond.rows(&self.attend_across_frames(x, cond)?)?;
                let h = self
                    .mlp
                    .forward(&norm_modulate(&rows, shift_mlp, scale_mlp)?)?;
                cond.unrows(gated_residual(&rows, gate_mlp, &h)?)
            }
            Conditioning::AdaLn {
                modulation,
                gated: false,
            } => {
                let m = cond.route(ada_ln_chunks(modulation, cond.c, 4)?)?;
                let h = cond.unrows(norm_modulate(&cond.rows(x)?, &m[0], &m[1])?)?;
                let x = (x + self.attn.forward_packed(&h, cond.packed)?)?;
                let rows = cond.rows(&x)?;
                cond.unrows((&rows + self.mlp.forward(&norm_modulate(&rows, &m[2], &m[3])?)?)?)
            }
            Conditioning::CrossAttention { norms, cross } => {
                let x = (x + self.attn.forward(&norms[0].forward(x)?)?)?;
                let x = (&x + cross.forward(&norms[1].forward(&x)?, cond.tokens, None)?)?;
                &x + self.mlp.forward(&norms[2].forward(&x)?)?
            }
            Conditioning::InContext { norms } => {
                let x = (x + self.attn.forward(&norms[0].forward(x)?)?)?;
                &x + self.mlp.forward(&norms[1].forward(&x)?)?
            }
        }
    }
}

/// The final layer: a norm (adaLN shift and scale in the adaLN designs, an affine LayerNorm
/// otherwise), then a linear to p*p*out_channels per token.
#[derive(Debug, Clone)]
pub struct FinalLayer {
    norm: FinalNorm,
    linear: Linear,
}

#[derive(Debug, Clone)]
enum FinalNorm {
    AdaLn(Linear),
    Affine(AffineLayerNorm),
}

impl FinalLayer {
    pub fn new(
        design: BlockDesign,
        hidden: usize,
        patch: usize,
        out_channels: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let norm = match design.uses_ada_ln() {
            true => FinalNorm::AdaLn(linear(hidden, 2 * hidden, vb.pp("adaLN_modulation.1"))?),
            false => FinalNorm::Affine(AffineLayerNorm::new(hidden, vb.pp("norm_final"))?),
        };
        Ok(Self {
            norm,
            linear: linear(hidden, patch * patch * out_channels, vb.pp("linear"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        self.forward_packed(x, c, None)
    }

    /// [`Self::forward`] on a packed batch: each image's shift and scale routed to its tokens.
    pub fn forward_packed(
        &self,
        x: &Tensor,
        c: &Tensor,
        packed: Option<&Routing>,
    ) -> Result<Tensor> {
        let h = match (&self.norm, packed) {
            (FinalNorm::AdaLn(modulation), None) => {
                let m = ada_ln_chunks(modulation, c, 2)?;
                norm_modulate(x, &m[0], &m[1])?
            }
            (FinalNorm::AdaLn(modulation), Some(r)) => {
                let m = ada_ln_chunks(modulation, c, 2)?;
                let (shift, scale) = (r.route(&m[0])?, r.route(&m[1])?);
                r.unrows(&norm_modulate(&r.rows(x)?, &shift, &scale)?)?
            }
            (FinalNorm::Affine(norm), _) => norm.forward(x)?,
        };
        self.linear.forward(&h)
    }
}
