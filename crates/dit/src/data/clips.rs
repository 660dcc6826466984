//! Captioned video clips for text-to-video training: a folder holding, for each clip, either a
//! sub-folder of frames (images sorted by name) or an animated GIF, with the caption in a `.txt`
//! of the same name beside it (`walk/` or `walk.gif` with `walk.txt`). A clip is read as
//! `frames` frames taken every `stride` frames from its start, each centre-cropped as images are.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{AnimationDecoder, RgbImage};

use super::folder::{center_crop, is_image, to_tensor};
use crate::{Error, Result};

/// Where a clip's frames are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClipSource {
    /// Frame images, in order.
    Frames(Vec<PathBuf>),
    Gif(PathBuf),
}

/// The clips of a folder, labelled by caption (sorted distinct captions).
#[derive(Debug, Clone)]
pub struct ClipFolder {
    pub root: PathBuf,
    pub items: Vec<(ClipSource, usize)>,
    pub captions: Vec<String>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

impl ClipFolder {
    /// The clips of `root`, or `None` when it holds no captioned clip (then it is something else:
    /// a class folder or a captioned image set).
    pub fn open(root: &Path) -> Result<Option<Self>> {
        if !root.is_dir() {
            return Ok(None);
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(io_err(root))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        let mut pairs = Vec::new();
        for p in entries {
            let caption = p.with_extension("txt");
            let is_gif = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gif"));
            if !(p.is_dir() || is_gif) || !caption.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&caption).map_err(io_err(&caption))?;
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let source = if is_gif {
                ClipSource::Gif(p)
            } else {
                let mut frames: Vec<PathBuf> = std::fs::read_dir(&p)
                    .map_err(io_err(&p))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| is_image(f))
                    .collect();
                frames.sort();
                if frames.is_empty() {
                    return Err(Error::Input(format!(
                        "clip {} has a caption but no frames",
                        p.display()
                    )));
                }
                ClipSource::Frames(frames)
            };
            pairs.push((source, text));
        }
        if pairs.is_empty() {
            return Ok(None);
        }
        let mut captions: Vec<String> = pairs.iter().map(|(_, c)| c.clone()).collect();
        captions.sort();
        captions.dedup();
        let items = pairs
            .into_iter()
            .map(|(s, c)| {
                let label = captions.binary_search(&c).expect("caption was collected");
                (s, label)
            })
            .collect();
        Ok(Some(Self {
            root: root.to_path_buf(),
            items,
            captions,
        }))
    }
}

/// All frames of a clip as RGB (a GIF's transparency composited on white).
pub fn read_frames(source: &ClipSource) -> Result<Vec<RgbImage>> {
    match source {
        ClipSource::Frames(files) => files.iter().map(|f| super::folder::read_rgb(f)).collect(),
        ClipSource::Gif(path) => {
            let bad = |e: image::ImageError| {
                Error::Input(format!("cannot read GIF {}: {e}", path.display()))
            };
            let file = std::fs::File::open(path).map_err(io_err(path))?;
            let decoder =
                image::codecs::gif::GifDecoder::new(std::io::BufReader::new(file)).map_err(bad)?;
            decoder
                .into_frames()
                .map(|f| {
                    let rgba = f.map_err(bad)?.into_buffer();
                    Ok(RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                        let p = rgba.get_pixel(x, y);
                        let a = p[3] as u32;
                        image::Rgb(
                            [0, 1, 2]
                                .map(|c| ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8),
                        )
                    }))
                })
                .collect()
        }
    }
}

/// `frames` frames taken every `stride` frames from the clip's start, centre-cropped to `size`.
pub fn sample_frames(
    source: &ClipSource,
    frames: usize,
    stride: usize,
    size: u32,
) -> Result<Vec<RgbImage>> {
    let all = read_frames(source)?;
    let need = (frames.max(1) - 1) * stride.max(1) + 1;
    if all.len() < need {
        let name = match source {
            ClipSource::Frames(f) => f[0].parent().unwrap_or(Path::new("")).display().to_string(),
            ClipSource::Gif(p) => p.display().to_string(),
        };
        return Err(Error::Input(format!(
            "clip {name} has {} frames; {frames} frames every {stride} need {need}",
            all.len()
        )));
    }
    Ok((0..frames)
        .map(|i| center_crop(&all[i * stride.max(1)], size))
        .collect())
}

/// Clips (lists of equal-size square frames) to (N, C, T, H, W) in [-1, 1].
pub fn clips_to_tensor(
    clips: &[Vec<RgbImage>],
    channels: usize,
    device: &Device,
) -> Result<Tensor> {
    let per_clip = clips
        .iter()
        .map(|frames| {
            // (T, C, H, W) -> (C, T, H, W)
            Ok(to_tensor(frames, channels, device)?.transpose(0, 1)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&per_clip, 0)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_folders_and_gifs_with_captions_are_clips() {
        let d = std::env::temp_dir().join(format!("dit-clips-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("walk")).unwrap();
        // A folder clip: 5 frames whose red channel is the frame number * 40.
        for f in 0..5u8 {
            RgbImage::from_pixel(6, 6, image::Rgb([f * 40, 0, 0]))
                .save(d.join(format!("walk/{f:03}.png")))
                .unwrap();
        }
        std::fs::write(d.join("walk.txt"), "a walk\n").unwrap();
        // A GIF clip of 3 frames (blue = 100 * frame), and an uncaptioned GIF that is ignored.
        let frames: Vec<RgbImage> = (0..3u8)
            .map(|f| RgbImage::from_pixel(6, 6, image::Rgb([0, 0, f * 100])))
            .collect();
        crate::image_io::save_gif(&frames, 100, &d.join("spin.gif")).unwrap();
        std::fs::write(d.join("spin.txt"), "a spin").unwrap();
        crate::image_io::save_gif(&frames, 100, &d.join("loose.gif")).unwrap();
        let c = ClipFolder::open(&d).unwrap().unwrap();
        assert_eq!(c.captions, ["a spin", "a walk"]);
        assert_eq!(c.items.len(), 2);
        assert!(matches!(&c.items[0].0, ClipSource::Gif(_)) && c.items[0].1 == 0);
        assert!(matches!(&c.items[1].0, ClipSource::Frames(f) if f.len() == 5));
        // Every second frame of the walk: frames 0, 2, 4.
        let walk = sample_frames(&c.items[1].0, 3, 2, 4).unwrap();
        let reds: Vec<u8> = walk.iter().map(|f| f.get_pixel(1, 1)[0]).collect();
        assert_eq!(reds, [0, 80, 160]);
        let spin = sample_frames(&c.items[0].0, 3, 1, 4).unwrap();
        let blues: Vec<u8> = spin.iter().map(|f| f.get_pixel(1, 1)[2]).collect();
        assert!(
            blues[0] < 10 && (95..=105).contains(&blues[1]) && blues[2] > 190,
            "{blues:?}"
        );
        // Too short for the request: an error naming the clip.
        let err = sample_frames(&c.items[0].0, 3, 2, 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("spin.gif") && err.contains("need 5"), "{err}");
        let x = clips_to_tensor(&[walk, spin], 3, &Device::Cpu).unwrap();
        assert_eq!(x.dims(), [2, 3, 3, 4, 4]);
        // A class folder is not a clip folder.
        let classes = d.join("classes");
        std::fs::create_dir_all(classes.join("cat")).unwrap();
        RgbImage::new(4, 4).save(classes.join("cat/0.png")).unwrap();
        assert!(ClipFolder::open(&classes).unwrap().is_none());
        std::fs::remove_dir_all(&d).ok();
    }
}
