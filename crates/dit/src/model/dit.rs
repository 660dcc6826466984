//! The Diffusion Transformer: patchify, add positions, condition on timestep + class through
//! the blocks (adaLN-Zero, or one of the paper's other designs), final layer, unpatchify.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::block::{Condition, DiTBlock, FinalLayer, Frames, TextTokens};
use super::embed::{
    sincos_2d, sincos_3d, sincos_table, unpatchify_tubes, LabelEmbedder, PatchEmbed,
    PooledTextEmbedder, TimestepEmbedder, TubeEmbed,
};
use super::pack::{Packing, Routing};
use crate::config::BlockDesign;
use crate::config::DiTConfig;

/// Which output channels classifier-free guidance mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuidedChannels {
    /// The reference's choice: only the first 3 eps channels are guided (kept "for exact
    /// reproducibility" of the released samples); the 4th follows the conditional prediction.
    #[default]
    Reference,
    /// The standard form: every eps channel is guided.
    All,
}

/// Encoded prompts for a text-conditioned (GenTron) model: the text encoder's tokens (N, S, C),
/// their mask (N, S: 1 real, 0 padding) and pooled embedding (N, P); with two encoders, the
/// second one's tokens and mask too.
#[derive(Debug, Clone)]
pub struct TextBatch {
    pub tokens: Tensor,
    pub mask: Tensor,
    pub pooled: Tensor,
    pub second: Option<SecondText>,
}

/// A second text encoder's tokens (N, S2, C2) and mask (N, S2) (GenTron's T5 beside CLIP).
#[derive(Debug, Clone)]
pub struct SecondText {
    pub tokens: Tensor,
    pub mask: Tensor,
}

impl TextBatch {
    /// Each encoder's tokens and mask, in the order the blocks take turns with them.
    pub fn token_sets(&self) -> Vec<TextTokens<'_>> {
        let first = TextTokens {
            tokens: &self.tokens,
            mask: Some(&self.mask),
        };
        let second = self.second.as_ref().map(|s| TextTokens {
            tokens: &s.tokens,
            mask: Some(&s.mask),
        });
        std::iter::once(first).chain(second).collect()
    }

    /// Applies `f` to every tensor (first tokens, mask, pooled, then the second encoder's tokens
    /// and mask), keeping the structure.
    pub fn try_map(&self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            tokens: f(&self.tokens)?,
            mask: f(&self.mask)?,
            pooled: f(&self.pooled)?,
            second: match &self.second {
                Some(s) => Some(SecondText {
                    tokens: f(&s.tokens)?,
                    mask: f(&s.mask)?,
                }),
                None => None,
            },
        })
    }

    /// [`Self::try_map`] over two batches of the same structure, tensor by tensor.
    pub fn try_zip(
        &self,
        other: &Self,
        mut f: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        let second = match (&self.second, &other.second) {
            (Some(a), Some(b)) => Some(SecondText {
                tokens: f(&a.tokens, &b.tokens)?,
                mask: f(&a.mask, &b.mask)?,
            }),
            (None, None) => None,
            _ => candle_core::bail!("text batches from different numbers of encoders"),
        };
        Ok(Self {
            tokens: f(&self.tokens, &other.tokens)?,
            mask: f(&self.mask, &other.mask)?,
            pooled: f(&self.pooled, &other.pooled)?,
            second,
        })
    }

    pub fn len(&self) -> Result<usize> {
        self.tokens.dim(0)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        self.try_map(|t| t.narrow(0, start, len))
    }

    /// These prompts, then `copies` times as many rows of `empty` (one row: the empty prompt's
    /// encoding): the unconditional halves (thirds) of a guided batch.
    pub fn followed_by_empty(&self, empty: &TextBatch, copies: usize) -> Result<Self> {
        let n = self.len()?;
        self.try_zip(empty, |a, e| {
            let mut shape = e.dims().to_vec();
            shape[0] = n;
            let e = e.to_dtype(a.dtype())?.broadcast_as(shape)?;
            let parts: Vec<Tensor> = std::iter::once(a.clone())
                .chain(std::iter::repeat_n(e, copies))
                .collect();
            Tensor::cat(&parts, 0)
        })
    }

    /// The rows where `drop` is set replaced by `empty` (one row: the empty prompt's encoding),
    /// classifier-free guidance's text dropout.
    pub fn with_dropped(&self, drop: &[bool], empty: &TextBatch) -> Result<Self> {
        let n = self.len()?;
        let d: Vec<f32> = drop.iter().map(|&b| f32::from(u8::from(b))).collect();
        let d = Tensor::from_vec(d, n, self.tokens.device())?;
        let mix = |x: &Tensor, e: &Tensor| -> Result<Tensor> {
            let shape: Vec<usize> = std::iter::once(n)
                .chain(std::iter::repeat_n(1, x.rank() - 1))
                .collect();
            let d = d.reshape(shape)?.to_dtype(x.dtype())?;
            let e = e.to_dtype(x.dtype())?.broadcast_as(x.shape())?;
            x.broadcast_mul(&(1.0 - &d)?)? + e.broadcast_mul(&d)?
        };
        self.try_zip(empty, mix)
    }
}

/// Patchify: per image (or frame), or spacetime tubes of a clip.
#[derive(Debug, Clone)]
enum Embedder {
    Patches(PatchEmbed),
    Tubes(TubeEmbed),
}

#[derive(Debug, Clone)]
pub struct DiT {
    pub config: DiTConfig,
    x_embedder: Embedder,
    t_embedder: TimestepEmbedder,
    /// Class models: the label table; text models: the pooled-text MLP.
    y_embedder: Option<LabelEmbedder>,
    pooled_embedder: Option<PooledTextEmbedder>,
    pos_embed: Tensor,
    blocks: Vec<DiTBlock>,
    final_layer: FinalLayer,
}

impl DiT {
    /// Builds the model from `vb`, whose tensor names are those of the reference checkpoints.
    /// `pos_embed` is computed, not read: it is a fixed function of the grid.
    pub fn new(config: &DiTConfig, vb: VarBuilder) -> Result<Self> {
        let c = config;
        let (d, p, vx) = (c.hidden_size, c.patch_size, vb.pp("x_embedder"));
        let x_embedder = match c.video.and_then(|v| v.tubelet) {
            Some(pt) => Embedder::Tubes(TubeEmbed::new(c.in_channels, d, pt, p, vx)?),
            None => Embedder::Patches(PatchEmbed::new(c.in_channels, d, p, vx)?),
        };
        let t_embedder = TimestepEmbedder::new(c.hidden_size, vb.pp("t_embedder"))?;
        let (y_embedder, pooled_embedder) = match c.text {
            None => (
                Some(LabelEmbedder::new(
                    c.num_classes,
                    c.hidden_size,
                    vb.pp("y_embedder"),
                )?),
                None,
            ),
            Some(text) => (
                None,
                Some(PooledTextEmbedder::new(
                    text.pooled_dim,
                    c.hidden_size,
                    vb.pp("pooled_embedder"),
                )?),
            ),
        };
        let g = c.grid_size();
        let pos_embed = sincos_2d(c.hidden_size, g, g, vb.device(), vb.dtype())?;
        let blocks = (0..c.depth)
            .map(|i| {
                DiTBlock::new(
                    c.block,
                    c.hidden_size,
                    c.num_heads,
                    c.mlp_hidden(),
                    c.text.map(|t| t.context_dim_of(i)),
                    c.temporal_attention(),
                    vb.pp(format!("blocks.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        // Spacetime patches: each token predicts its whole tube.
        let final_layer = FinalLayer::new(
            c.block,
            c.hidden_size,
            c.patch_size,
            c.tubelet() * c.out_channels(),
            vb.pp("final_layer"),
        )?;
        Ok(Self {
            config: config.clone(),
            x_embedder,
            t_embedder,
            y_embedder,
            pooled_embedder,
            pos_embed,
            blocks,
            final_layer,
        })
    }

    pub fn device(&self) -> &candle_core::Device {
        self.pos_embed.device()
    }

    pub fn dtype(&self) -> DType {
        self.pos_embed.dtype()
    }

    /// The label of "no class" (the label table's last row; 0 rows for a text model).
    pub fn null_class(&self) -> usize {
        self.config.num_classes
    }

    /// x: (N, C, H, W) latents, t: (N,) timesteps (original 0..1000 indices), y: (N,) u32 labels
    /// (the null class allowed). Returns (N, out_channels, H, W).
    pub fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        let Some(y_embedder) = &self.y_embedder else {
            candle_core::bail!("a text-conditioned model takes text: use forward_text");
        };
        self.forward_conditioned(x, t, &y_embedder.forward(y)?, &[], None)
    }

    /// A text-conditioned (GenTron) model: `texts` holds each text encoder's tokens (N, S, C)
    /// and mask (N, S), one per encoder of the config (block i reads `texts[i % len]`);
    /// `pooled` is the first encoder's pooled embedding (N, P). Classifier-free guidance's
    /// unconditional input is the empty prompt's encoding.
    pub fn forward_text(
        &self,
        x: &Tensor,
        t: &Tensor,
        texts: &[TextTokens],
        pooled: &Tensor,
    ) -> Result<Tensor> {
        self.forward_text_motion(x, t, texts, pooled, None)
    }

    /// [`Self::forward_text`] for a video model with, per clip, whether its frames see each
    /// other (`motion` (N,) of 1 or 0: 0 is motion-free guidance's identity temporal mask).
    pub fn forward_text_motion(
        &self,
        x: &Tensor,
        t: &Tensor,
        texts: &[TextTokens],
        pooled: &Tensor,
        motion: Option<&Tensor>,
    ) -> Result<Tensor> {
        if motion.is_some() && !self.config.temporal_attention() {
            candle_core::bail!(
                "motion flags need a video model with temporal attention (spacetime-patch models attend over all frames at once)"
            );
        }
        let (pooled, tokens) = self.embed_text(texts, pooled)?;
        let texts = with_tokens(texts, &tokens);
        self.forward_conditioned(x, t, &pooled, &texts, motion)
    }

    /// A text model's pooled embedding (N, D) and its encoders' tokens in the model's dtype.
    fn embed_text(&self, texts: &[TextTokens], pooled: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let (Some(pooled_embedder), Some(tc)) = (&self.pooled_embedder, self.config.text) else {
            candle_core::bail!("a class-conditional model takes labels: use forward");
        };
        if texts.len() != tc.encoders() {
            candle_core::bail!(
                "the model reads {} text encoder(s), given {}",
                tc.encoders(),
                texts.len()
            );
        }
        let tokens = texts
            .iter()
            .map(|t| t.tokens.to_dtype(self.dtype()))
            .collect::<Result<Vec<_>>>()?;
        Ok((pooled_embedder.forward(pooled)?, tokens))
    }

    /// Patchify with positions: images (N, C, H, W), each frame of clips (N, C, T, H, W), or
    /// their spacetime tubes. Returns the tokens, the frames per sample that travel as rows of
    /// their own (1 but for per-frame video), and the token grid (frames, rows, columns).
    fn embed(&self, x: &Tensor) -> Result<(Tensor, usize, (usize, usize, usize))> {
        let p = self.config.patch_size;
        let (h, w) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            candle_core::bail!(
                "input of shape {:?}: height and width must be multiples of the patch size {p}",
                x.dims()
            );
        }
        let x = x.to_dtype(self.dtype())?;
        Ok(match (&self.x_embedder, x.dims()) {
            (Embedder::Tubes(tubes), &[_, _, f, h, w]) => {
                let pt = self.config.tubelet();
                if !f.is_multiple_of(pt) {
                    candle_core::bail!("{f} frames do not split into spacetime patches of {pt}");
                }
                let grid = (f / pt, h / p, w / p);
                let pos = sincos_3d(self.config.hidden_size, grid, x.device(), self.dtype())?;
                (tubes.forward(&x)?.broadcast_add(&pos)?, 1, grid)
            }
            (Embedder::Patches(patches), &[n, c, f, h, w]) => {
                let x = x.permute((0, 2, 1, 3, 4))?.reshape((n * f, c, h, w))?;
                let x = patches
                    .forward(&x)?
                    .broadcast_add(&self.positions(h / p, w / p)?)?;
                (x, f, (1, h / p, w / p))
            }
            (Embedder::Patches(patches), &[_, _, h, w]) => {
                let x = patches
                    .forward(&x)?
                    .broadcast_add(&self.positions(h / p, w / p)?)?;
                (x, 1, (1, h / p, w / p))
            }
            _ => candle_core::bail!("input of shape {:?} does not fit the model", x.dims()),
        })
    }

    /// The token grid (frames, rows, columns) of an input ([`Self::embed`]'s third value).
    fn grid_of(&self, x: &Tensor) -> Result<(usize, usize, usize)> {
        let p = self.config.patch_size;
        let (h, w) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
        let frames = match (&self.x_embedder, x.rank()) {
            (Embedder::Tubes(_), 5) => x.dim(2)? / self.config.tubelet(),
            _ => 1,
        };
        Ok((frames, h / p, w / p))
    }

    /// The final layer's tokens back to images (N, C, H, W) or clips (N, C, T, H, W).
    fn unembed(&self, x: &Tensor, frames: usize, grid: (usize, usize, usize)) -> Result<Tensor> {
        let (c, p) = (self.config.out_channels(), self.config.patch_size);
        if let Embedder::Tubes(_) = self.x_embedder {
            return unpatchify_tubes(x, c, self.config.tubelet(), p, grid);
        }
        let out = self.unpatchify(x, grid.1, grid.2)?;
        match self.config.video {
            // (N*T, C, H, W) -> (N, C, T, H, W)
            Some(_) => {
                let (nt, c, h, w) = out.dims4()?;
                out.reshape((nt / frames, frames, c, h, w))?
                    .permute((0, 2, 1, 3, 4))?
                    .contiguous()
            }
            None => Ok(out),
        }
    }

    /// The network given the condition's embedding `y_emb` (label or pooled text), added to the
    /// timestep embedding, and a text model's token sets (which the blocks take in turn). A
    /// video model runs its clips (N, C, T, H, W) as N*T frames, conditions repeated per frame.
    fn forward_conditioned(
        &self,
        x: &Tensor,
        t: &Tensor,
        y_emb: &Tensor,
        texts: &[TextTokens],
        motion: Option<&Tensor>,
    ) -> Result<Tensor> {
        if (x.rank() == 5) != self.config.video.is_some() {
            candle_core::bail!(
                "input of shape {:?}: a video model takes clips (N, C, T, H, W), an image model images (N, C, H, W)",
                x.dims()
            );
        }
        let (x, frames, grid) = self.embed(x)?;
        let t_emb = per_frame(&self.t_embedder.forward(t)?, frames)?;
        let y_emb = per_frame(y_emb, frames)?;
        let c = (&t_emb + &y_emb)?;
        let tokens = Tensor::stack(&[&t_emb, &y_emb], 1)?; // (N, 2, D)
        let text_rows: Vec<(Tensor, Option<Tensor>)> = texts
            .iter()
            .map(|t| {
                let mask = t.mask.map(|m| per_frame(m, frames)).transpose()?;
                Ok((per_frame(t.tokens, frames)?, mask))
            })
            .collect::<Result<_>>()?;
        let texts: Vec<TextTokens> = text_rows
            .iter()
            .map(|(tokens, mask)| TextTokens {
                tokens,
                mask: mask.as_ref(),
            })
            .collect();
        let positions = match self.config.temporal_attention() {
            true => Some(sincos_table(
                self.config.hidden_size,
                frames,
                x.device(),
                self.dtype(),
            )?),
            false => None,
        };
        let cond = Condition {
            c: &c,
            tokens: &tokens,
            text: None,
            frames: positions.as_ref().map(|positions| Frames {
                count: frames,
                positions,
                motion,
            }),
            packed: None,
        };
        let in_context = self.config.block == BlockDesign::InContext;
        let mut x = match in_context {
            true => Tensor::cat(&[&tokens, &x], 1)?,
            false => x,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let text = (!texts.is_empty()).then(|| texts[i % texts.len()]);
            x = block.forward(&x, &Condition { text, ..cond })?;
        }
        if in_context {
            let extra = self.config.block.extra_tokens();
            x = x.narrow(1, extra, x.dim(1)? - extra)?;
        }
        let x = self.final_layer.forward(&x, &c)?;
        self.unembed(&x, frames, grid)
    }

    /// Patch n' pack: images (each (1, C, H_i, W_i), any sizes that are multiples of the patch;
    /// for a spacetime-patch model clips (1, C, T_i, H_i, W_i)) run as the few sequences of
    /// `packing` (built from their token counts, e.g. [`Packing::greedy`]). Each image attends
    /// only to itself and is conditioned on its own timestep `t[i]` and `cond` row, so its
    /// output equals running it alone. Returns the outputs, shaped as the inputs.
    pub fn forward_packed(
        &self,
        images: &[Tensor],
        t: &Tensor,
        cond: PackedConditions,
        packing: &Packing,
    ) -> Result<Vec<Tensor>> {
        let tokens = self.forward_packed_tokens(images, None, t, cond, packing)?;
        images
            .iter()
            .zip(&tokens)
            .map(|(x, tok)| self.unembed(tok, 1, self.grid_of(x)?))
            .collect()
    }

    /// [`Self::forward_packed`] with token dropping (`keep[i]`: the kept patches of image i,
    /// u32 row-major indices; the packing counts kept tokens), returning each image's output
    /// tokens (1, kept, p*p*C_out) ([`super::pack::channels_first`] views them as the losses
    /// take images).
    pub fn forward_packed_tokens(
        &self,
        images: &[Tensor],
        keep: Option<&[Tensor]>,
        t: &Tensor,
        cond: PackedConditions,
        packing: &Packing,
    ) -> Result<Vec<Tensor>> {
        if self.config.temporal_attention() {
            candle_core::bail!(
                "packing runs image models and spacetime-patch video models; a model with temporal attention takes clips of one shape (forward_text)"
            );
        }
        if !self.config.block.uses_ada_ln() {
            candle_core::bail!(
                "packing routes the adaLN conditioning of each image to its tokens; the {:?} design has none",
                self.config.block
            );
        }
        let n = images.len();
        if n != packing.images() || t.dim(0)? != n || keep.is_some_and(|k| k.len() != n) {
            candle_core::bail!(
                "{n} images, {} timesteps, {} keep lists for a packing of {} images",
                t.dim(0)?,
                keep.map_or(n, |k| k.len()),
                packing.images()
            );
        }
        let tokens = images
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if x.dim(0)? != 1 {
                    candle_core::bail!(
                        "packed image {i} has shape {:?}: one per tensor, (1, C, H, W)",
                        x.dims()
                    );
                }
                let (tok, _, _) = self.embed(x)?;
                match keep {
                    Some(k) => tok.index_select(&k[i], 1),
                    None => Ok(tok),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let x = packing.pack(&tokens)?;
        let routing = Routing::new(packing.clone(), x.device())?;
        let (y_emb, text_tokens) = match cond {
            PackedConditions::Labels(y) => {
                let Some(y_embedder) = &self.y_embedder else {
                    candle_core::bail!(
                        "a text-conditioned model takes text: PackedConditions::Text"
                    );
                };
                (y_embedder.forward(y)?, Vec::new())
            }
            PackedConditions::Text { texts, pooled } => self.embed_text(texts, pooled)?,
        };
        let texts = match cond {
            PackedConditions::Text { texts, .. } => with_tokens(texts, &text_tokens),
            PackedConditions::Labels(_) => Vec::new(),
        };
        let t_emb = self.t_embedder.forward(t)?;
        let c = (&t_emb + &y_emb)?;
        let tokens = Tensor::stack(&[&t_emb, &y_emb], 1)?;
        let cond = Condition {
            c: &c,
            tokens: &tokens,
            text: None,
            frames: None,
            packed: Some(&routing),
        };
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let text = (!texts.is_empty()).then(|| texts[i % texts.len()]);
            x = block.forward(&x, &Condition { text, ..cond })?;
        }
        let x = self.final_layer.forward_packed(&x, &c, Some(&routing))?;
        packing.unpack(&x)
    }

    /// The 2-D sin-cos positions of an h x w patch grid: the config's table for its own grid,
    /// computed for any other, so one model runs at several sizes and aspect ratios.
    fn positions(&self, h: usize, w: usize) -> Result<Tensor> {
        let g = self.config.grid_size();
        if (h, w) == (g, g) {
            return Ok(self.pos_embed.clone());
        }
        sincos_2d(self.config.hidden_size, h, w, self.device(), self.dtype())
    }

    /// Classifier-free guidance in one batched forward pass: the conditional and null-class
    /// predictions of the same `x` are mixed as uncond + scale * (cond - uncond) on the guided
    /// eps channels; the other channels (and the learned variance) come from the conditional half.
    /// Returns N outputs for N inputs.
    pub fn forward_with_cfg(
        &self,
        x: &Tensor,
        t: &Tensor,
        y: &Tensor,
        scale: f64,
        channels: GuidedChannels,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let null = Tensor::full(self.null_class() as u32, n, y.device())?;
        let out = self.forward(
            &Tensor::cat(&[x, x], 0)?,
            &Tensor::cat(&[t, t], 0)?,
            &Tensor::cat(&[y, &null], 0)?,
        )?;
        self.mix_guidance(&out, scale, channels)
    }

    /// Classifier-free guidance for a text model: the prompts' and the empty prompt's (`empty`,
    /// one row) predictions in one batched pass, mixed as [`Self::forward_with_cfg`] does.
    pub fn forward_text_with_cfg(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &TextBatch,
        empty: &TextBatch,
        scale: f64,
        channels: GuidedChannels,
    ) -> Result<Tensor> {
        let both = text.followed_by_empty(empty, 1)?;
        let out = self.forward_text(
            &Tensor::cat(&[x, x], 0)?,
            &Tensor::cat(&[t, t], 0)?,
            &both.token_sets(),
            &both.pooled,
        )?;
        self.mix_guidance(&out, scale, channels)
    }

    /// (cond; uncond) stacked predictions -> uncond + scale * (cond - uncond) on the guided eps
    /// channels, the other channels (and the learned variance) from the conditional half.
    pub fn mix_guidance(
        &self,
        out: &Tensor,
        scale: f64,
        channels: GuidedChannels,
    ) -> Result<Tensor> {
        let n = out.dim(0)? / 2;
        let (cond, uncond) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
        let guided = self.guided_channels(channels);
        let (ce, ue) = (cond.narrow(1, 0, guided)?, uncond.narrow(1, 0, guided)?);
        let eps = (&ue + ((&ce - &ue)? * scale)?)?;
        let rest = cond.narrow(1, guided, cond.dim(1)? - guided)?;
        Tensor::cat(&[eps, rest], 1)
    }

    /// Motion-free guidance for a video model (GenTron §3.3.2): in one batched pass, the
    /// prompts with motion, the empty prompt with motion and the empty prompt without (frames
    /// attending only to themselves), mixed as
    /// e(0,0) + text_scale (e(T,M) - e(0,M)) + motion_scale (e(0,M) - e(0,0)) on the guided eps
    /// channels; the other channels from e(T,M).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_video_with_mfg(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &TextBatch,
        empty: &TextBatch,
        text_scale: f64,
        motion_scale: f64,
        channels: GuidedChannels,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let three = text.followed_by_empty(empty, 2)?;
        let mut motion = vec![1f32; 2 * n];
        motion.resize(3 * n, 0.0);
        let motion = Tensor::from_vec(motion, 3 * n, x.device())?;
        let out = self.forward_text_motion(
            &Tensor::cat(&[x, x, x], 0)?,
            &Tensor::cat(&[t, t, t], 0)?,
            &three.token_sets(),
            &three.pooled,
            Some(&motion),
        )?;
        let (tm, zm, zz) = (
            out.narrow(0, 0, n)?,
            out.narrow(0, n, n)?,
            out.narrow(0, 2 * n, n)?,
        );
        let guided = self.guided_channels(channels);
        let e = |o: &Tensor| o.narrow(1, 0, guided);
        let eps = ((e(&zz)? + ((e(&tm)? - e(&zm)?)? * text_scale)?)?
            + ((e(&zm)? - e(&zz)?)? * motion_scale)?)?;
        let rest = tm.narrow(1, guided, tm.dim(1)? - guided)?;
        Tensor::cat(&[eps, rest], 1)
    }

    /// How many eps channels guidance mixes.
    fn guided_channels(&self, channels: GuidedChannels) -> usize {
        let c = self.config.in_channels;
        match channels {
            GuidedChannels::Reference => c.min(3),
            GuidedChannels::All => c,
        }
    }

    /// (N, h*w, p*p*C) tokens -> (N, C, h*p, w*p) image.
    fn unpatchify(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (p, c) = (self.config.patch_size, self.config.out_channels());
        let n = x.dim(0)?;
        x.reshape((n, h, w, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((n, c, h * p, w * p))
    }
}

/// What the images of a packed batch are conditioned on, one row per image: class labels (N,)
/// u32 (the null class allowed), or each text encoder's tokens and mask with the pooled
/// embedding, as [`DiT::forward_text`] takes them.
#[derive(Clone, Copy)]
pub enum PackedConditions<'a> {
    Labels(&'a Tensor),
    Text {
        texts: &'a [TextTokens<'a>],
        pooled: &'a Tensor,
    },
}

/// `texts` with their tokens replaced by `tokens` (the same masks).
fn with_tokens<'a>(texts: &[TextTokens<'a>], tokens: &'a [Tensor]) -> Vec<TextTokens<'a>> {
    texts
        .iter()
        .zip(tokens)
        .map(|(t, tokens)| TextTokens {
            tokens,
            mask: t.mask,
        })
        .collect()
}

/// Rows (N, ...) repeated for each of `frames` consecutive frames: (N * frames, ...).
fn per_frame(x: &Tensor, frames: usize) -> Result<Tensor> {
    if frames == 1 {
        return Ok(x.clone());
    }
    let mut shape = x.dims().to_vec();
    shape.insert(1, frames);
    let mut flat = x.dims().to_vec();
    flat[0] *= frames;
    x.unsqueeze(1)?
        .broadcast_as(shape)?
        .contiguous()?
        .reshape(flat)
}
