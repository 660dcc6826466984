//! ImageNet-style image folders: one sub-folder per class, class index = sorted folder order
//! (as torchvision's `ImageFolder`), and ADM's centre crop. Captioned sets
//! ([`super::captions`]) use the same type, their labels indexing captions instead.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{imageops, DynamicImage, RgbImage};

use crate::{Error, Result};

const EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "JPEG", "JPG"];

/// The files of an image folder with their labels.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    /// Class names (sub-folder names), sorted; a label indexes this list. Empty for a captioned
    /// set.
    pub classes: Vec<String>,
    pub items: Vec<(PathBuf, usize)>,
    /// A captioned set's distinct captions, sorted; its labels index this list.
    pub captions: Option<Vec<String>>,
}

/// Whether a path names an image file this crate reads.
pub fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e))
}

impl ImageFolder {
    /// A captioned set ([`super::captions::open`]) when `path` is one, else a class folder.
    pub fn open_any(path: &Path) -> Result<Self> {
        match super::captions::open(path)? {
            Some(set) => Ok(set),
            None => Self::open(path),
        }
    }

    pub fn open(root: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: root.display().to_string(),
            source,
        };
        let mut classes: Vec<String> = std::fs::read_dir(root)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        classes.sort();
        let mut items = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|source| Error::Io {
                    path: dir.display().to_string(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_image(p))
                .collect();
            files.sort();
            items.extend(files.into_iter().map(|p| (p, label)));
        }
        if items.is_empty() {
            return Err(Error::Input(format!(
                "{}: no images found (expected one sub-folder of .png / .jpg files per class)",
                root.display()
            )));
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            items,
            captions: None,
        })
    }
}

/// ADM's `center_crop_arr`: halve with a box filter while the short side is at least twice the
/// target, resize bicubically so the short side is `size`, then crop the centre square.
/// (The box halving averages 2x2 blocks; PIL's BOX resize matches it on even sizes.)
pub fn center_crop(img: &RgbImage, size: u32) -> RgbImage {
    resize_crop(img, size, size)
}

/// [`center_crop`] to any `width` x `height`: box-halve while both sides are at least twice
/// the target, resize bicubically to just cover the target, crop the centre.
pub fn resize_crop(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let mut img = img.clone();
    while img.width() >= 2 * width && img.height() >= 2 * height {
        img = halve(&img);
    }
    let scale = (width as f64 / img.width() as f64).max(height as f64 / img.height() as f64);
    let (w, h) = (
        ((img.width() as f64 * scale).round() as u32).max(width),
        ((img.height() as f64 * scale).round() as u32).max(height),
    );
    let img = imageops::resize(&img, w, h, imageops::FilterType::CatmullRom);
    let (x0, y0) = ((w - width) / 2, (h - height) / 2);
    imageops::crop_imm(&img, x0, y0, width, height).to_image()
}

/// Aspect-ratio buckets of about `size` x `size` pixels: (width, height) pairs, both multiples
/// of `multiple`, from 1:4 to 4:1, narrowest first (as `extract-latents --keep-aspect` uses them).
pub fn aspect_buckets(size: u32, multiple: u32) -> Vec<(u32, u32)> {
    let area = f64::from(size) * f64::from(size);
    let m = multiple.max(1);
    // Tall buckets (width up to the square's), then their mirrors: symmetric by construction.
    let mut tall: Vec<(u32, u32)> = Vec::new();
    let mut w = m;
    while w <= size {
        let h = ((area / f64::from(w) / f64::from(m)).round() as u32) * m;
        if h <= 4 * w && !tall.iter().any(|b| b.1 == h) {
            tall.push((w, h));
        }
        w += m;
    }
    let wide = tall
        .iter()
        .rev()
        .filter(|b| b.0 != b.1)
        .map(|&(w, h)| (h, w));
    let mut out: Vec<(u32, u32)> = tall.clone();
    out.extend(wide);
    out
}

/// The bucket whose aspect ratio is nearest (in log ratio) to that of a `width` x `height`
/// image: the one its resize-and-crop loses least to.
pub fn nearest_bucket(buckets: &[(u32, u32)], width: u32, height: u32) -> (u32, u32) {
    let ratio = (f64::from(width) / f64::from(height.max(1))).ln();
    let off = |b: &(u32, u32)| ((f64::from(b.0) / f64::from(b.1)).ln() - ratio).abs();
    *buckets
        .iter()
        .min_by(|a, b| off(a).total_cmp(&off(b)))
        .expect("at least one bucket")
}

/// 2x2 box average (odd last row / column dropped).
fn halve(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width() / 2, img.height() / 2);
    RgbImage::from_fn(w, h, |x, y| {
        let mut acc = [0u32; 3];
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            let p = img.get_pixel(2 * x + dx, 2 * y + dy);
            for c in 0..3 {
                acc[c] += p[c] as u32;
            }
        }
        image::Rgb(acc.map(|v| ((v + 2) / 4) as u8))
    })
}

/// Reads an image file as RGB. Transparency is composited onto white (emoji and icons are drawn
/// for light pages; PIL's `convert("RGB")` would show whatever colour hides under alpha 0).
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let img: DynamicImage = image::open(path)
        .map_err(|e| Error::Input(format!("cannot read image {}: {e}", path.display())))?;
    if !img.color().has_alpha() {
        return Ok(img.to_rgb8());
    }
    let rgba = img.to_rgba8();
    Ok(RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y);
        let a = p[3] as u32;
        image::Rgb([0, 1, 2].map(|c| ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8))
    }))
}

/// Square RGB images to (N, C, H, W) in [-1, 1]; `channels` 1 takes the luma (ITU-R 601, as PIL's
/// "L"), 3 keeps RGB.
pub fn to_tensor(images: &[RgbImage], channels: usize, device: &Device) -> Result<Tensor> {
    let (w, h) = images
        .first()
        .map(|i| (i.width() as usize, i.height() as usize))
        .ok_or_else(|| Error::Input("no images".into()))?;
    let mut data = Vec::with_capacity(images.len() * channels * w * h);
    for img in images {
        if (img.width() as usize, img.height() as usize) != (w, h) {
            return Err(Error::Input(
                "images of different sizes in one batch".into(),
            ));
        }
        match channels {
            1 => data.extend(
                image::DynamicImage::ImageRgb8(img.clone())
                    .to_luma8()
                    .pixels()
                    .map(|p| p[0] as f32 / 127.5 - 1.0),
            ),
            3 => {
                for c in 0..3 {
                    data.extend(img.pixels().map(|p| p[c] as f32 / 127.5 - 1.0));
                }
            }
            _ => {
                return Err(Error::Input(format!(
                    "images have 1 or 3 channels, not {channels}"
                )))
            }
        }
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), channels, h, w),
        device,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aspect_buckets_cover_the_ratios_at_about_the_area() {
        let b = aspect_buckets(256, 64);
        assert!(b.contains(&(256, 256)));
        assert!(b.contains(&(128, 512)) && b.contains(&(512, 128)));
        for &(w, h) in &b {
            assert!(w % 64 == 0 && h % 64 == 0);
            let area = f64::from(w * h) / 65536.0;
            assert!((0.7..=1.3).contains(&area), "{w}x{h}");
        }
        // A 1200x600 photo goes to the 2:1-ish bucket, a portrait to a tall one.
        let (w, h) = nearest_bucket(&b, 1200, 600);
        assert!(
            w > h && (f64::from(w) / f64::from(h) - 2.0).abs() < 0.5,
            "{w}x{h}"
        );
        let (w, h) = nearest_bucket(&b, 300, 400);
        assert!(h > w, "{w}x{h}");
        assert_eq!(nearest_bucket(&b, 500, 500), (256, 256));
        // resize_crop gives the asked size and keeps the centre.
        let img = RgbImage::from_fn(400, 200, |x, _| {
            image::Rgb([if x < 200 { 0 } else { 255 }; 3])
        });
        let out = resize_crop(&img, 192, 64);
        assert_eq!((out.width(), out.height()), (192, 64));
        assert!(out.get_pixel(10, 32)[0] < 20 && out.get_pixel(181, 32)[0] > 235);
    }

    #[test]
    fn centre_crop_keeps_the_centre_and_the_size() {
        // 300x200 image, a white square at the centre on black: after cropping to 64 the
        // square is still centred.
        let img = RgbImage::from_fn(300, 200, |x, y| {
            let inside = (130..170).contains(&x) && (80..120).contains(&y);
            image::Rgb(if inside { [255; 3] } else { [0; 3] })
        });
        let out = center_crop(&img, 64);
        assert_eq!(out.dimensions(), (64, 64));
        // 200 -> halved once to 150x100, scaled by 0.64 to 96x64, crop x from 16: the square
        // spans 0.64 * (65..85) - 16 = 25.6..38.4 in x, 0.64 * (40..60) = 25.6..38.4 in y.
        assert_eq!(out.get_pixel(32, 32)[0], 255);
        assert!(out.get_pixel(20, 32)[0] < 30 && out.get_pixel(44, 32)[0] < 30);
        assert!(out.get_pixel(32, 20)[0] < 30 && out.get_pixel(32, 44)[0] < 30);
    }

    #[test]
    fn transparency_is_composited_onto_white() {
        let path = std::env::temp_dir().join(format!("dit-rgba-{}.png", std::process::id()));
        let mut img = image::RgbaImage::new(3, 1);
        img.put_pixel(0, 0, image::Rgba([255, 0, 0, 0])); // invisible red
        img.put_pixel(1, 0, image::Rgba([0, 0, 0, 128])); // half black
        img.put_pixel(2, 0, image::Rgba([10, 200, 30, 255]));
        img.save(&path).unwrap();
        let rgb = read_rgb(&path).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [127; 3]);
        assert_eq!(rgb.get_pixel(2, 0).0, [10, 200, 30]);
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn folder_labels_follow_sorted_class_names() {
        let dir = std::env::temp_dir().join(format!("dit-folder-{}", std::process::id()));
        for (class, n) in [("zebra", 2), ("ant", 1)] {
            std::fs::create_dir_all(dir.join(class)).unwrap();
            for i in 0..n {
                RgbImage::new(4, 4)
                    .save(dir.join(class).join(format!("{i}.png")))
                    .unwrap();
            }
        }
        std::fs::write(dir.join("ant/notes.txt"), "not an image").unwrap();
        let f = ImageFolder::open(&dir).unwrap();
        assert_eq!(f.classes, ["ant", "zebra"]);
        assert_eq!(f.items.iter().map(|i| i.1).collect::<Vec<_>>(), [0, 1, 1]);
        let t = to_tensor(&[read_rgb(&f.items[0].0).unwrap()], 3, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), [1, 3, 4, 4]);
        assert_eq!(t.min_all().unwrap().to_scalar::<f32>().unwrap(), -1.0);
        std::fs::remove_dir_all(&dir).ok();
        assert!(ImageFolder::open(&dir).is_err());
    }
}
