//! Model configurations: the paper's twelve named DiTs and custom ones.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Everything needed to build a [`crate::model::DiT`]. One source of truth: parameter counts and
/// Gflops are computed from it, checkpoints are validated against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiTConfig {
    /// Side of the (square) latent or pixel input, in pixels of that space (32 for 256 px images).
    pub input_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub hidden_size: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    /// Real classes; the label table has one more row, the "null" class used for guidance.
    pub num_classes: usize,
    /// Output eps and the variance interpolation v (2x the input channels) instead of eps only.
    pub learn_sigma: bool,
    /// The noise schedule it was trained with (DiT: linear).
    #[serde(default)]
    pub schedule: crate::diffusion::Schedule,
    /// What its output predicts (DiT: eps).
    #[serde(default)]
    pub prediction: crate::diffusion::Prediction,
    /// How the timestep and class reach the blocks (DiT: adaLN-Zero).
    #[serde(default)]
    pub block: BlockDesign,
    /// Text conditioning (GenTron) instead of classes: `num_classes` is then 0.
    #[serde(default)]
    pub text: Option<TextConditioning>,
    /// A video model (GenTron's text-to-video): inputs are clips (N, C, T, H, W) and each block
    /// gets a temporal self-attention layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<VideoConfig>,
}

/// GenTron's text-to-video extension (arXiv 2312.04557, §3.3): in every adaLN-Zero block, after
/// the cross-attention and before the MLP, each spatial position attends across the frames of
/// its clip. The layer's output projection starts at zero, so a video model made from an image
/// checkpoint is, frame by frame, that image model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoConfig {
    /// Frames per clip the model is trained and sampled with (any count runs: the frame positions
    /// are fixed sin-cos features).
    pub frames: usize,
    /// Spacetime patches (Sora): clips cut into tubes of this many frames x patch x patch, with
    /// 3-D sin-cos positions and self-attention over all of a clip's tubes, instead of per-frame
    /// patches with temporal attention. Frame counts are then multiples of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tubelet: Option<usize>,
}

impl VideoConfig {
    /// Per-frame patches with temporal attention.
    pub fn frames(frames: usize) -> Self {
        Self {
            frames,
            tubelet: None,
        }
    }
}

/// GenTron's text conditioning (arXiv 2312.04557, §3.2): in every adaLN-Zero block a
/// cross-attention layer after self-attention, image tokens querying the text encoder's tokens
/// (padded ones masked out); the pooled text embedding, through an MLP, is added to the
/// timestep embedding that drives adaLN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextConditioning {
    /// Width of the text encoder's token embeddings (CLIP-L 768, T5-XXL 4096, MiniLM 384).
    pub context_dim: usize,
    /// Width of its pooled embedding.
    pub pooled_dim: usize,
    /// Text tokens per prompt (the encoder's padded length; used for costing).
    pub max_tokens: usize,
    /// A second text encoder's token width (GenTron's CLIP + T5): blocks then alternate, even
    /// blocks cross-attending to the first encoder's tokens and odd ones to the second's. The
    /// pooled embedding stays the first encoder's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_context_dim: Option<usize>,
}

impl TextConditioning {
    /// One text encoder of width `width` for both tokens and pooled embedding.
    pub fn single(width: usize, max_tokens: usize) -> Self {
        Self {
            context_dim: width,
            pooled_dim: width,
            max_tokens,
            second_context_dim: None,
        }
    }

    /// How many text encoders the blocks take turns with (1 or 2).
    pub fn encoders(&self) -> usize {
        1 + usize::from(self.second_context_dim.is_some())
    }

    /// Width of the tokens block `i` cross-attends to.
    pub fn context_dim_of(&self, block: usize) -> usize {
        match self.second_context_dim {
            Some(second) if block % 2 == 1 => second,
            _ => self.context_dim,
        }
    }
}

/// The four ways §3.2 and Figure 3 of the paper condition a transformer block on the timestep
/// embedding t and the class embedding y.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockDesign {
    /// adaLN with zero-initialised gates on both residual branches: each block starts as the
    /// identity (the paper's choice and the released models).
    #[default]
    AdaLnZero,
    /// LayerNorm's shift and scale regressed from c = t + y (no gates).
    AdaLn,
    /// [t, y] as a separate two-token sequence, attended to by a cross-attention layer after
    /// self-attention (about 15% more Gflops).
    CrossAttention,
    /// t and y appended to the image tokens as two extra tokens (standard ViT blocks), dropped
    /// before the final layer.
    InContext,
}

impl BlockDesign {
    /// Whether the blocks and the final layer are modulated by adaLN.
    pub fn uses_ada_ln(self) -> bool {
        matches!(self, Self::AdaLnZero | Self::AdaLn)
    }

    /// Extra tokens the blocks see besides the image's.
    pub fn extra_tokens(self) -> usize {
        match self {
            Self::InContext => 2,
            _ => 0,
        }
    }
}

/// (name, depth, hidden, heads) of the paper's model sizes (Table 1).
const SIZES: [(&str, usize, usize, usize); 4] = [
    ("S", 12, 384, 6),
    ("B", 12, 768, 12),
    ("L", 24, 1024, 16),
    ("XL", 28, 1152, 16),
];

/// (name, depth, hidden, MLP width) of GenTron's text-to-image models (Table 1 of the GenTron
/// paper). Heads are not given there: 72-wide (XL, as DiT-XL's) and 104-wide (G) heads, 16 each.
const GENTRON_SIZES: [(&str, usize, usize, usize); 2] = [
    ("GenTron-XL/2", 28, 1152, 4608),
    ("GenTron-G/2", 48, 1664, 6656),
];

/// DiT-XL/2 for 256 px ImageNet latents, the paper's headline model. Other configs are this with
/// some fields changed (`DiTConfig { depth: 2, ..Default::default() }`), so a new field needs a
/// default in one place only.
impl Default for DiTConfig {
    fn default() -> Self {
        Self {
            input_size: 32,
            patch_size: 2,
            in_channels: 4,
            hidden_size: 1152,
            depth: 28,
            num_heads: 16,
            mlp_ratio: 4.0,
            num_classes: 1000,
            learn_sigma: true,
            schedule: Default::default(),
            prediction: Default::default(),
            block: Default::default(),
            text: None,
            video: None,
        }
    }
}

impl DiTConfig {
    /// A GenTron text-to-image config (`GenTron-XL/2`, `GenTron-G/2`) on SD-VAE latents of
    /// `image_size` pixels, for a text encoder of these widths and padded length.
    pub fn gentron(name: &str, image_size: usize, text: TextConditioning) -> Result<Self> {
        let &(_, depth, hidden_size, mlp) = GENTRON_SIZES
            .iter()
            .find(|(n, ..)| *n == name)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown GenTron model '{name}'; known: GenTron-XL/2, GenTron-G/2"
                ))
            })?;
        let cfg = Self {
            input_size: latent_size(image_size)?,
            patch_size: 2,
            in_channels: 4,
            hidden_size,
            depth,
            num_heads: 16,
            mlp_ratio: mlp as f64 / hidden_size as f64,
            num_classes: 0,
            learn_sigma: true,
            schedule: Default::default(),
            prediction: Default::default(),
            block: BlockDesign::AdaLnZero,
            text: Some(text),
            video: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The twelve names of the paper, `DiT-S/2` … `DiT-XL/8`.
    pub fn names() -> Vec<String> {
        SIZES
            .iter()
            .flat_map(|(s, ..)| [2, 4, 8].map(|p| format!("DiT-{s}/{p}")))
            .collect()
    }

    /// A named config (`DiT-XL/2`, also `DiT-XL-2`) for ImageNet latents of `image_size` pixels.
    pub fn named(name: &str, image_size: usize) -> Result<Self> {
        let unknown = || {
            Error::Config(format!(
                "unknown model '{name}'; known: {}",
                Self::names().join(", ")
            ))
        };
        let rest = name.strip_prefix("DiT-").ok_or_else(unknown)?;
        let (size, patch) = rest.split_once(['/', '-']).ok_or_else(unknown)?;
        let patch: usize = patch.parse().map_err(|_| unknown())?;
        let &(_, depth, hidden_size, num_heads) = SIZES
            .iter()
            .find(|(s, ..)| *s == size)
            .ok_or_else(unknown)?;
        if ![2, 4, 8].contains(&patch) {
            return Err(unknown());
        }
        let cfg = Self {
            input_size: latent_size(image_size)?,
            patch_size: patch,
            hidden_size,
            depth,
            num_heads,
            ..Self::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The default number of heads for a width: the paper's where the width is one of its sizes,
    /// otherwise 64-wide heads.
    pub fn default_heads(hidden_size: usize) -> usize {
        SIZES
            .iter()
            .find(|(_, _, h, _)| *h == hidden_size)
            .map(|(.., heads)| *heads)
            .unwrap_or((hidden_size / 64).max(1))
    }

    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Frames per spacetime patch (1 for images and per-frame video patches).
    pub fn tubelet(&self) -> usize {
        self.video.and_then(|v| v.tubelet).unwrap_or(1)
    }

    /// Whether the blocks have GenTron's temporal attention (video without spacetime patches).
    pub fn temporal_attention(&self) -> bool {
        self.video.is_some_and(|v| v.tubelet.is_none())
    }

    /// Tokens per side of the patch grid.
    pub fn grid_size(&self) -> usize {
        self.input_size / self.patch_size
    }

    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    /// Checks the invariants the model relies on; every error says what to change.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        match self.video {
            Some(v) if v.frames == 0 => return bad("a video model needs at least one frame".into()),
            Some(VideoConfig {
                frames,
                tubelet: Some(pt),
            }) if pt == 0 || !frames.is_multiple_of(pt) => {
                return bad(format!(
                    "{frames} frames do not split into spacetime patches of {pt} frames"
                ))
            }
            Some(VideoConfig {
                tubelet: Some(_), ..
            }) if !self.hidden_size.is_multiple_of(2) || self.hidden_size < 8 => {
                return bad("spacetime patches need an even hidden size of at least 8".into())
            }
            Some(_) if self.block != BlockDesign::AdaLnZero => {
                return bad("video models are built on adaLN-Zero blocks (GenTron)".into())
            }
            _ => {}
        }
        if self.patch_size == 0 || !self.input_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "input size {} is not divisible by the patch size {}",
                self.input_size, self.patch_size
            ));
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden size {} is not divisible by the number of heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.hidden_size.is_multiple_of(4) {
            return bad(format!(
                "hidden size {} must be divisible by 4 for the 2-D sin-cos positions",
                self.hidden_size
            ));
        }
        if self.depth == 0 || self.in_channels == 0 {
            return bad("depth and in-channels must be positive".into());
        }
        match self.text {
            None if self.num_classes == 0 => {
                return bad("a class-conditional model needs at least one class".into())
            }
            Some(_) if self.num_classes != 0 => {
                return bad("a text-conditioned model has no classes (num_classes 0)".into())
            }
            Some(_) if self.block != BlockDesign::AdaLnZero => {
                return bad("text conditioning is built on adaLN-Zero blocks (GenTron)".into())
            }
            Some(t)
                if t.context_dim == 0
                    || t.pooled_dim == 0
                    || t.max_tokens == 0
                    || t.second_context_dim == Some(0) =>
            {
                return bad("text widths and token count must be positive".into())
            }
            _ => {}
        }
        Ok(())
    }
}

/// Latent side for an image side: the SD VAE downsamples by 8.
pub fn latent_size(image_size: usize) -> Result<usize> {
    if image_size == 0 || !image_size.is_multiple_of(8) {
        return Err(Error::Config(format!(
            "image size {image_size} is not divisible by 8 (the VAE's downsampling factor)"
        )));
    }
    Ok(image_size / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twelve_named_configs_parse_with_the_papers_sizes() {
        let names = DiTConfig::names();
        assert_eq!(names.len(), 12);
        for n in &names {
            DiTConfig::named(n, 256).unwrap();
        }
        let xl = DiTConfig::named("DiT-XL/2", 256).unwrap();
        assert_eq!(
            (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size),
            (28, 1152, 16, 2)
        );
        assert_eq!(
            (xl.input_size, xl.num_patches(), xl.out_channels()),
            (32, 256, 8)
        );
        assert_eq!(
            (xl.mlp_ratio, xl.num_classes, xl.in_channels, xl.learn_sigma),
            (4.0, 1000, 4, true)
        );
        assert_eq!(xl, DiTConfig::default());
        assert_eq!(DiTConfig::named("DiT-S-8", 512).unwrap().num_patches(), 64);
    }

    #[test]
    fn bad_names_and_sizes_are_errors() {
        assert!(DiTConfig::named("DiT-M/2", 256).is_err());
        assert!(DiTConfig::named("DiT-S/3", 256).is_err());
        assert!(DiTConfig::named("DiT-S/2", 250).is_err());
        // 72 px -> 9x9 latent, not divisible by 2.
        let err = DiTConfig::named("DiT-S/2", 72).unwrap_err().to_string();
        assert!(err.contains("not divisible by the patch size"), "{err}");
    }
}
