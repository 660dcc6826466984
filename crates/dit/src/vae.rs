//! Stable Diffusion's KL autoencoder (sd-vae-ft-ema / sd-vae-ft-mse), diffusers weight names.
//! Latents are `encode(x) * 0.18215`; images are in [-1, 1].
//!
//! Written here rather than taken from candle-transformers for speed and exactness: its
//! convolutions go through candle's tiled im2col (45-150 GFLOP/s here) where ours run as
//! Winograd F(2x2, 3x3) ([`Winograd3x3`], 2.25x fewer multiplications) or nine accumulated
//! GEMMs ([`ops::conv3x3`], thin layers), its GroupNorm is six tensor passes where
//! [`ops::group_norm`] is one (fused with the SiLU that follows it), and its attention block hits a
//! candle bug (a `Linear` on a transposed batched input gives wrong values for batch > 1).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::ops;
use crate::rng::NoiseRng;
use crate::winograd::Winograd3x3;
use crate::{Error, Result};

/// The scale that makes SD latents roughly unit variance.
pub const LATENT_SCALE: f64 = 0.18215;
const WEIGHTS: [&str; 2] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
];

/// The shape of an `AutoencoderKL` (diffusers' config names).
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
}

impl VaeConfig {
    /// The autoencoder of Stable Diffusion 1.x (the one DiT uses): 4 latent channels, factor 8.
    pub fn sd() -> Self {
        Self {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
        }
    }

    /// Reads a diffusers `config.json`; keys it lacks keep the SD values.
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let bad =
            |e: &dyn std::fmt::Display| Error::Input(format!("VAE config {}: {e}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&e))?;
        let sd = Self::sd();
        let num = |key: &str, default: usize| {
            v.get(key)
                .and_then(|x| x.as_u64())
                .map_or(default, |x| x as usize)
        };
        let block_out_channels = match v.get("block_out_channels") {
            Some(b) => serde_json::from_value(b.clone()).map_err(|e| bad(&e))?,
            None => sd.block_out_channels,
        };
        Ok(Self {
            block_out_channels,
            layers_per_block: num("layers_per_block", sd.layers_per_block),
            latent_channels: num("latent_channels", sd.latent_channels),
            norm_num_groups: num("norm_num_groups", sd.norm_num_groups),
        })
    }

    /// The config beside a weight file (`config.json` of a diffusers folder), else SD's.
    pub fn beside(weights: &Path) -> Result<Self> {
        match weights
            .parent()
            .map(|d| d.join("config.json"))
            .filter(|c| c.is_file())
        {
            Some(c) => Self::from_diffusers_json(&c),
            None => Ok(Self::sd()),
        }
    }
}

/// Finds the weight file for `source`: a file, a diffusers folder (`vae/` sub-folder allowed),
/// `ema` / `mse` (the reference's names for stabilityai/sd-vae-ft-*), or a Hugging Face repo id,
/// looked up in the local cache first and downloaded when online.
pub fn resolve_weights(source: &str) -> Result<PathBuf> {
    let p = Path::new(source);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.is_dir() {
        for dir in [p.to_path_buf(), p.join("vae")] {
            if let Some(f) = WEIGHTS.iter().map(|w| dir.join(w)).find(|f| f.is_file()) {
                return Ok(f);
            }
        }
        return Err(Error::Input(format!(
            "VAE folder {source} has no {}",
            WEIGHTS.join(" or ")
        )));
    }
    let repo = match source {
        "ema" | "mse" => format!("stabilityai/sd-vae-ft-{source}"),
        s if s.contains('/') && !s.starts_with('.') && !s.starts_with('/') => s.to_string(),
        _ => {
            return Err(Error::Input(format!(
                "VAE {source} is neither a file, a folder nor a hub repo id"
            )))
        }
    };
    let cache = hf_hub::Cache::from_env().model(repo.clone());
    if let Some(f) = cache.get(WEIGHTS[0]) {
        return Ok(f);
    }
    let api = hf_hub::api::sync::Api::new().map_err(|e| Error::Input(format!("hub: {e}")))?;
    api.model(repo.clone()).get(WEIGHTS[0]).map_err(|e| {
        Error::Input(format!(
            "VAE {repo} is not in the Hugging Face cache and could not be downloaded: {e}"
        ))
    })
}

/// A convolution with bias; 3x3 stride-1 ones take the fast paths.
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    /// The kernel transformed for Winograd's F(2x2, 3x3), made on first use on the CPU.
    winograd: Arc<OnceLock<Winograd3x3>>,
}

impl Conv {
    fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((c_out, c_in, k, k), "weight")?,
            bias: vb.get(c_out, "bias")?,
            stride,
            winograd: Arc::default(),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (c_out, c_in, k, _) = self.weight.dims4()?;
        if k == 3 && self.stride == 1 {
            // Winograd pays where the GEMMs are wide enough to dominate its transforms.
            let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
            let tracked = x.track_op() || self.weight.track_op();
            if cpu_f32 && !tracked && c_in >= 32 && c_out >= 32 {
                let wg = match self.winograd.get() {
                    Some(wg) => wg,
                    None => {
                        let wg = Winograd3x3::new(&self.weight)?;
                        self.winograd.get_or_init(|| wg)
                    }
                };
                return wg.forward(x, Some(&self.bias));
            }
            return ops::conv3x3(x, &self.weight, Some(&self.bias));
        }
        // 1x1 (no padding) or the encoder's stride-2 downsampling (padded by the caller).
        x.conv2d(&self.weight, 0, self.stride, 1, 1)?
            .broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

#[derive(Debug, Clone)]
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    fn new(groups: usize, channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
        })
    }

    fn forward(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        ops::group_norm(x, self.groups, &self.weight, &self.bias, 1e-6, silu)
    }
}

/// GroupNorm, SiLU, conv, GroupNorm, SiLU, conv, plus a (1x1-projected when widths differ) skip.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn new(c_in: usize, c_out: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(groups, c_in, vb.pp("norm1"))?,
            conv1: Conv::new(c_in, c_out, 3, 1, vb.pp("conv1"))?,
            norm2: GroupNorm::new(groups, c_out, vb.pp("norm2"))?,
            conv2: Conv::new(c_out, c_out, 3, 1, vb.pp("conv2"))?,
            shortcut: (c_in != c_out)
                .then(|| Conv::new(c_in, c_out, 1, 1, vb.pp("conv_shortcut")))
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Single-head self-attention over the pixels, with a residual.
#[derive(Debug, Clone)]
struct AttentionBlock {
    norm: GroupNorm,
    qkv: [candle_nn::Linear; 3],
    out: candle_nn::Linear,
}

impl AttentionBlock {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        // diffusers' names, or the older ones of early checkpoints (1x1-conv shaped weights too).
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let linear = |name: &str| -> candle_core::Result<candle_nn::Linear> {
            let vb = vb.pp(name);
            let w = match vb.get((c, c), "weight") {
                Ok(w) => w,
                Err(_) => vb.get((c, c, 1, 1), "weight")?.reshape((c, c))?,
            };
            Ok(candle_nn::Linear::new(w, Some(vb.get(c, "bias")?)))
        };
        Ok(Self {
            norm: GroupNorm::new(groups, c, vb.pp("group_norm"))?,
            qkv: [linear(names[0])?, linear(names[1])?, linear(names[2])?],
            out: linear(names[3])?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let t = self
            .norm
            .forward(x, false)?
            .reshape((n, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let qkv = Tensor::cat(
            &[
                self.qkv[0].forward(&t)?,
                self.qkv[1].forward(&t)?,
                self.qkv[2].forward(&t)?,
            ],
            2,
        )?;
        let o = self.out.forward(&ops::self_attention(&qkv, 1)?)?;
        x + o.transpose(1, 2)?.reshape((n, c, h, w))?
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock,
    attn: AttentionBlock,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock::new(c, c, groups, vb.pp("resnets.0"))?,
            attn: AttentionBlock::new(c, groups, vb.pp("attentions.0"))?,
            resnet1: ResnetBlock::new(c, c, groups, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.resnet1
            .forward(&self.attn.forward(&self.resnet0.forward(x)?)?)
    }
}

/// A stage of resnets followed by an optional resampling conv (down: stride 2; up: nearest x2 first).
#[derive(Debug, Clone)]
struct Stage {
    resnets: Vec<ResnetBlock>,
    resample: Option<Conv>,
}

impl Stage {
    /// `resample`: the conv's name and stride (2 downsamples; 1 follows a nearest x2 upsampling).
    fn new(
        c_in: usize,
        c_out: usize,
        layers: usize,
        groups: usize,
        resample: Option<(&str, usize)>,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let resnets = (0..layers)
            .map(|j| {
                ResnetBlock::new(
                    if j == 0 { c_in } else { c_out },
                    c_out,
                    groups,
                    vb.pp(format!("resnets.{j}")),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        let resample = resample
            .map(|(name, stride)| Conv::new(c_out, c_out, 3, stride, vb.pp(name)))
            .transpose()?;
        Ok(Self { resnets, resample })
    }
}

#[derive(Debug, Clone)]
struct Coder {
    conv_in: Conv,
    stages: Vec<Stage>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Coder {
    fn encoder(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (ch, g) = (&cfg.block_out_channels, cfg.norm_num_groups);
        let stages = (0..ch.len())
            .map(|i| {
                let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
                let down = (i + 1 < ch.len()).then_some(("downsamplers.0.conv", 2));
                Stage::new(
                    c_in,
                    ch[i],
                    cfg.layers_per_block,
                    g,
                    down,
                    vb.pp(format!("down_blocks.{i}")),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        let top = *ch.last().unwrap_or(&0);
        Ok(Self {
            conv_in: Conv::new(3, ch[0], 3, 1, vb.pp("conv_in"))?,
            stages,
            mid: MidBlock::new(top, g, vb.pp("mid_block"))?,
            norm_out: GroupNorm::new(g, top, vb.pp("conv_norm_out"))?,
            conv_out: Conv::new(top, 2 * cfg.latent_channels, 3, 1, vb.pp("conv_out"))?,
        })
    }

    fn decoder(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let g = cfg.norm_num_groups;
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let stages = (0..rev.len())
            .map(|i| {
                let c_in = if i == 0 { rev[0] } else { rev[i - 1] };
                let up = (i + 1 < rev.len()).then_some(("upsamplers.0.conv", 1));
                Stage::new(
                    c_in,
                    rev[i],
                    cfg.layers_per_block + 1,
                    g,
                    up,
                    vb.pp(format!("up_blocks.{i}")),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        let bottom = *rev.last().unwrap_or(&0);
        Ok(Self {
            conv_in: Conv::new(cfg.latent_channels, rev[0], 3, 1, vb.pp("conv_in"))?,
            stages,
            mid: MidBlock::new(rev[0], g, vb.pp("mid_block"))?,
            norm_out: GroupNorm::new(g, bottom, vb.pp("conv_norm_out"))?,
            conv_out: Conv::new(bottom, 3, 3, 1, vb.pp("conv_out"))?,
        })
    }

    fn encode(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for s in &self.stages {
            for r in &s.resnets {
                h = r.forward(&h)?;
            }
            if let Some(down) = &s.resample {
                // diffusers pads right and bottom by one before the stride-2 conv.
                h = down.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward(&h, true)?)
    }

    fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for s in &self.stages {
            for r in &s.resnets {
                h = r.forward(&h)?;
            }
            if let Some(up) = &s.resample {
                // Nearest x2 then the conv, fused (see `ops::upsample2x_conv3x3`).
                h = ops::upsample2x_conv3x3(&h, &up.weight, Some(&up.bias))?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&h, true)?)
    }
}

/// The autoencoder: encoder, decoder and the 1x1 (post-)quantisation convolutions.
#[derive(Debug, Clone)]
pub struct Vae {
    encoder: Coder,
    decoder: Coder,
    quant_conv: Conv,
    post_quant_conv: Conv,
    /// Pixels per latent along each side (8 for SD's VAE).
    pub factor: usize,
    pub latent_channels: usize,
}

impl Vae {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let l = cfg.latent_channels;
        Ok(Self {
            encoder: Coder::encoder(cfg, vb.pp("encoder"))?,
            decoder: Coder::decoder(cfg, vb.pp("decoder"))?,
            quant_conv: Conv::new(2 * l, 2 * l, 1, 1, vb.pp("quant_conv"))?,
            post_quant_conv: Conv::new(l, l, 1, 1, vb.pp("post_quant_conv"))?,
            factor: 1 << cfg.block_out_channels.len().saturating_sub(1),
            latent_channels: l,
        })
    }

    /// Resolves `source` as [`resolve_weights`] does (file, diffusers folder, `ema` / `mse`, hub
    /// id), reads the config beside the weights, and loads them.
    pub fn open(source: &str, dtype: DType, device: &Device) -> Result<Self> {
        let weights = resolve_weights(source)?;
        Self::load(&weights, &VaeConfig::beside(&weights)?, dtype, device)
    }

    /// Loads diffusers-format weights from a `.safetensors` or PyTorch file.
    pub fn load(weights: &Path, cfg: &VaeConfig, dtype: DType, device: &Device) -> Result<Self> {
        let bad = |e: &dyn std::fmt::Display| {
            Error::Checkpoint(format!("cannot load VAE {}: {e}", weights.display()))
        };
        let vb = if weights.extension().is_some_and(|e| e == "safetensors") {
            // SAFETY: the file is memory-mapped read-only; safetensors validates its header.
            unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, device) }
                .map_err(|e| bad(&e))?
        } else {
            VarBuilder::from_pth(weights, dtype, device).map_err(|e| bad(&e))?
        };
        Self::new(cfg, vb).map_err(|e| bad(&e))
    }

    /// The dtype of the weights (inputs must match).
    pub fn dtype(&self) -> DType {
        self.quant_conv.weight.dtype()
    }

    /// Latents (N, 4, h, w), already multiplied by [`LATENT_SCALE`], to images (N, 3, 8h, 8w) in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.post_quant_conv.forward(&(latents / LATENT_SCALE)?)?;
        Ok(self.decoder.decode(&z)?)
    }

    /// Mean and log variance (clamped to [-30, 20]) of the latent distribution, unscaled.
    fn moments(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let m = self.quant_conv.forward(&self.encoder.encode(images)?)?;
        let l = m.dim(1)? / 2;
        Ok((m.narrow(1, 0, l)?, m.narrow(1, l, l)?.clamp(-30f32, 20f32)?))
    }

    /// Images (N, 3, H, W) in [-1, 1] to the mean latent times [`LATENT_SCALE`].
    pub fn encode_mean(&self, images: &Tensor) -> Result<Tensor> {
        Ok((self.moments(images)?.0 * LATENT_SCALE)?)
    }

    /// Images to a latent sample mean + std * noise, times [`LATENT_SCALE`] (as the reference's
    /// feature extraction), with the noise drawn from `rng`.
    pub fn encode(&self, images: &Tensor, rng: &mut NoiseRng) -> Result<Tensor> {
        let (mean, logvar) = self.moments(images)?;
        let std = (logvar * 0.5)?.exp()?;
        let noise = rng.randn_like(&std)?;
        Ok(((mean + (std * noise)?)? * LATENT_SCALE)?)
    }
}
