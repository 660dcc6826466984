//! Images in and out: tensors in [-1, 1] to 8-bit RGB, PNG grids as torchvision's `save_image`.

use std::path::Path;

use candle_core::{DType, Tensor};
use image::{Rgb, RgbImage};

use crate::{Error, Result};

/// (N, C, H, W) in [-1, 1] (C = 1 or 3) to RGB images, rounding as torchvision does:
/// floor(clamp((x + 1) / 2, 0, 1) * 255 + 0.5).
pub fn to_rgb_images(x: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, c, h, w) = x.dims4()?;
    if c != 1 && c != 3 {
        return Err(Error::Input(format!("cannot make images of {c} channels")));
    }
    let x = ((x.to_dtype(DType::F32)? + 1.0)? / 2.0)?.clamp(0f32, 1f32)?;
    let x = ((x * 255.0)? + 0.5)?.clamp(0f32, 255f32)?.floor()?;
    let data = x.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
    Ok((0..n)
        .map(|i| {
            let img = &data[i * c * h * w..(i + 1) * c * h * w];
            RgbImage::from_fn(w as u32, h as u32, |px, py| {
                let at = |ch: usize| img[ch * h * w + py as usize * w + px as usize];
                if c == 1 {
                    Rgb([at(0); 3])
                } else {
                    Rgb([at(0), at(1), at(2)])
                }
            })
        })
        .collect())
}

/// (N, C, H, W) in [-1, 1] (C = 1 or 3) to uint8 (N, H, W, 3) as the reference `sample_ddp.py`
/// converts samples for the ADM evaluation suite: clamp(127.5 x + 128, 0, 255), truncated; one
/// channel is repeated to three.
pub fn to_uint8_nhwc(x: &Tensor) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let x = match c {
        3 => x.clone(),
        1 => x.repeat((1, 3, 1, 1))?,
        _ => return Err(Error::Input(format!("cannot make images of {c} channels"))),
    };
    let x = ((x.to_dtype(DType::F32)? * 127.5)? + 128.0)?
        .clamp(0f32, 255f32)?
        .floor()?;
    Ok(x.permute((0, 2, 3, 1))?.contiguous()?.to_dtype(DType::U8)?)
}

/// Tiles images into rows of `nrow` with `padding` black pixels around each (torchvision's
/// `make_grid` layout); images of different sizes each get a cell of the largest size.
pub fn make_grid(images: &[RgbImage], nrow: usize, padding: u32) -> RgbImage {
    if images.is_empty() {
        return RgbImage::new(0, 0);
    }
    let w = images.iter().map(|i| i.width()).max().unwrap_or(0);
    let h = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let cols = nrow.min(images.len()).max(1);
    let rows = images.len().div_ceil(cols);
    let mut grid = RgbImage::new(
        cols as u32 * (w + padding) + padding,
        rows as u32 * (h + padding) + padding,
    );
    for (i, img) in images.iter().enumerate() {
        let (x0, y0) = (
            (i % cols) as u32 * (w + padding) + padding,
            (i / cols) as u32 * (h + padding) + padding,
        );
        image::imageops::replace(&mut grid, img, x0 as i64, y0 as i64);
    }
    grid
}

/// Clips (N, C, T, H, W) in [-1, 1] to their frames as RGB images, clip by clip: N rows of T.
pub fn clip_frames(x: &Tensor) -> Result<Vec<Vec<RgbImage>>> {
    let (n, c, t, h, w) = x.dims5()?;
    let frames = x.permute((0, 2, 1, 3, 4))?.reshape((n * t, c, h, w))?;
    let mut images = to_rgb_images(&frames)?.into_iter();
    Ok((0..n).map(|_| images.by_ref().take(t).collect()).collect())
}

/// Clips (N, C, T, H, W) in [-1, 1] as a PNG grid (one row of frames per clip) and an animated
/// GIF of all clips side by side (8 to a row), 8 frames per second.
pub fn save_clips(clips: &Tensor, png: &Path, gif: &Path) -> Result<()> {
    let rows = clip_frames(clips)?;
    let t = rows.first().map_or(0, Vec::len);
    let all: Vec<RgbImage> = rows.iter().flatten().cloned().collect();
    save_png(&make_grid(&all, t, 2), png)?;
    let per_frame: Vec<RgbImage> = (0..t)
        .map(|f| {
            let frame: Vec<RgbImage> = rows.iter().map(|clip| clip[f].clone()).collect();
            make_grid(&frame, 8, 2)
        })
        .collect();
    save_gif(&per_frame, 125, gif)
}

/// Writes an animated GIF (looping, `delay_ms` per frame).
pub fn save_gif(frames: &[RgbImage], delay_ms: u32, path: &Path) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let file = std::fs::File::create(path).map_err(io)?;
    let mut enc = GifEncoder::new_with_speed(std::io::BufWriter::new(file), 10);
    let gif_err = |e: image::ImageError| Error::Input(format!("{}: {e}", path.display()));
    enc.set_repeat(Repeat::Infinite).map_err(gif_err)?;
    for f in frames {
        let rgba = image::DynamicImage::ImageRgb8(f.clone()).to_rgba8();
        let delay = image::Delay::from_numer_denom_ms(delay_ms, 1);
        enc.encode_frame(image::Frame::from_parts(rgba, 0, 0, delay))
            .map_err(gif_err)?;
    }
    Ok(())
}

pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    img.save(path)
        .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pixel_rounding_matches_torchvision() {
        // -1 -> 0, 1 -> 255, 0 -> floor(127.5 + 0.5) = 128, out of range clamps.
        let x = Tensor::new(&[-1f32, 1.0, 0.0, 3.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 2))
            .unwrap();
        let img = &to_rgb_images(&x).unwrap()[0];
        let px: Vec<u8> = img.pixels().map(|p| p[0]).collect();
        assert_eq!(px, vec![0, 255, 128, 255]);
    }

    #[test]
    fn grid_layout_has_padding_between_and_around() {
        let imgs = vec![RgbImage::from_pixel(3, 2, Rgb([9, 9, 9])); 5];
        let g = make_grid(&imgs, 4, 2);
        assert_eq!(g.dimensions(), (4 * 5 + 2, 2 * 4 + 2));
        assert_eq!(g.get_pixel(2, 2)[0], 9);
        assert_eq!(g.get_pixel(1, 2)[0], 0);
        assert_eq!(g.get_pixel(2, 6)[0], 9); // second row, first image
        assert_eq!(g.get_pixel(7, 6)[0], 0); // second row, second cell: empty
    }
}
