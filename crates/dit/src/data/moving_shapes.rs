//! A synthetic captioned video set for proving that a text-to-video model follows the motion
//! its caption asks for, measurably: one coloured shape gliding left, right, up or down across
//! a plain background over the clip ("a red circle moving left on a black background"). Colour,
//! shape, background and the direction of travel are read back from the frames ([`analyse`]).
//!
//! 4 colours x 3 shapes x 4 directions x 4 backgrounds = 192 captions; [`Motion::held_out`] keeps
//! a fifth of the combinations out of training, every attribute value still seen.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::shapes::{draw, find, Hits, BACKGROUNDS, COLOURS, SHAPES};

pub const DIRECTIONS: [&str; 4] = ["left", "right", "up", "down"];

/// Unit steps (x, y) of [`DIRECTIONS`] in image coordinates (y down).
const STEPS: [(f32, f32); 4] = [(-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0)];

/// One clip's content: indices into [`COLOURS`], [`SHAPES`], [`DIRECTIONS`], [`BACKGROUNDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Motion {
    pub colour: usize,
    pub shape: usize,
    pub direction: usize,
    pub background: usize,
}

impl Motion {
    /// All 192 combinations.
    pub fn all() -> Vec<Motion> {
        let mut v = Vec::new();
        for colour in 0..COLOURS.len() {
            for shape in 0..SHAPES.len() {
                for direction in 0..DIRECTIONS.len() {
                    for background in 0..BACKGROUNDS.len() {
                        v.push(Motion {
                            colour,
                            shape,
                            direction,
                            background,
                        });
                    }
                }
            }
        }
        v
    }

    /// The caption, e.g. "a red circle moving left on a black background".
    pub fn caption(&self) -> String {
        format!(
            "a {} {} moving {} on a {} background",
            COLOURS[self.colour].0,
            SHAPES[self.shape],
            DIRECTIONS[self.direction],
            BACKGROUNDS[self.background].0
        )
    }

    /// Combinations kept out of training: a fifth, each attribute value still seen in training.
    pub fn held_out(&self) -> bool {
        (self.colour + 2 * self.shape + 3 * self.direction + self.background).is_multiple_of(5)
    }

    /// `frames` RGB frames (row-major, `size` x `size` each): the shape travels 40% of the side
    /// at constant speed through the middle; `seed` jitters its size (±10%), the middle of its
    /// path (±size/16) and the distance (±15%).
    pub fn render(&self, size: usize, frames: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let s = size as f32;
        let radius = s * 0.17 * rng.random_range(0.9f32..1.1);
        let jitter = s / 16.0;
        let (mx, my) = (
            s * 0.5 + rng.random_range(-jitter..jitter),
            s * 0.5 + rng.random_range(-jitter..jitter),
        );
        let travel = s * 0.4 * rng.random_range(0.85f32..1.15);
        let (dx, dy) = STEPS[self.direction];
        let (fg, bg) = (COLOURS[self.colour].1, BACKGROUNDS[self.background].1);
        (0..frames)
            .map(|f| {
                // -1/2 .. 1/2 of the way along the path.
                let u = if frames > 1 {
                    f as f32 / (frames - 1) as f32 - 0.5
                } else {
                    0.0
                };
                let centre = (mx + dx * travel * u, my + dy * travel * u);
                draw(size, self.shape, centre, radius, fg, bg)
            })
            .collect()
    }
}

/// What [`analyse`] reads from a clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub colour: usize,
    pub shape: usize,
    pub background: usize,
    /// The dominant axis and sign of the shape's travel from the first frame to the last;
    /// `None` when it moved less than a sixteenth of the side.
    pub direction: Option<usize>,
}

/// Reads a clip back: colour, shape and background from its first frame (as
/// [`super::shapes::analyse`]), the direction from the centroid's travel between the first and
/// last frames. `None` when a frame shows no shape.
pub fn analyse(frames: &[&[u8]], size: usize) -> Option<Read> {
    let first = find(frames.first()?, size)?;
    let last = find(frames.last()?, size)?;
    let (ddx, ddy) = (
        last.centroid.0 - first.centroid.0,
        last.centroid.1 - first.centroid.1,
    );
    let direction = if ddx.abs().max(ddy.abs()) < size as f32 / 16.0 {
        None
    } else if ddx.abs() >= ddy.abs() {
        Some(if ddx < 0.0 { 0 } else { 1 })
    } else {
        Some(if ddy < 0.0 { 2 } else { 3 })
    };
    Some(Read {
        colour: first.colour,
        shape: first.shape,
        background: first.background,
        direction,
    })
}

/// `n` renderings of `motions` (cycled) as clips (n, 3, frames, size, size) in [-1, 1].
pub fn dataset(
    motions: &[Motion],
    n: usize,
    size: usize,
    frames: usize,
    seed: u64,
    device: &candle_core::Device,
) -> crate::Result<(candle_core::Tensor, Vec<Motion>)> {
    let picked: Vec<Motion> = (0..n).map(|i| motions[i % motions.len()]).collect();
    let pixels: Vec<f32> = picked
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            let seed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
            m.render(size, frames, seed).into_iter().flatten()
        })
        .map(|v| v as f32 / 127.5 - 1.0)
        .collect();
    // (n, T, H, W, 3) -> (n, 3, T, H, W)
    let x = candle_core::Tensor::from_vec(pixels, (n, frames, size, size, 3), device)?;
    Ok((x.permute((0, 4, 1, 2, 3))?.contiguous()?, picked))
}

/// The built-in captioned video set: `per_caption` renderings of each combination not held out.
pub fn training_set(
    size: usize,
    frames: usize,
    per_caption: usize,
    seed: u64,
    device: &candle_core::Device,
) -> crate::Result<super::LabelledImages> {
    let motions: Vec<Motion> = Motion::all()
        .into_iter()
        .filter(|m| !m.held_out())
        .collect();
    let n = motions.len() * per_caption;
    let (images, picked) = dataset(&motions, n, size, frames, seed, device)?;
    let labels = picked
        .iter()
        .map(|p| {
            motions
                .iter()
                .position(|m| m == p)
                .expect("picked from motions")
        })
        .collect();
    Ok(super::LabelledImages {
        images,
        labels,
        num_classes: 0,
        captions: Some(motions.iter().map(Motion::caption).collect()),
    })
}

/// How often generated clips show what their captions asked for.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MotionAccuracy {
    pub direction: f64,
    pub colour: f64,
    pub shape: f64,
    pub background: f64,
    /// All four at once.
    pub all: f64,
    pub clips: usize,
}

/// Scores clips (N, 3, T, size, size) in [-1, 1] against the motions they were asked for.
pub fn measure(clips: &candle_core::Tensor, wanted: &[Motion]) -> crate::Result<MotionAccuracy> {
    let (n, _, t, size, _) = clips.dims5()?;
    // (N, T, H, W, 3) bytes.
    let u8s = ((clips.clamp(-1.0, 1.0)? + 1.0)? * 127.5)?
        .round()?
        .permute((0, 2, 3, 4, 1))?
        .to_dtype(candle_core::DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let frame = size * size * 3;
    let mut hits = Hits::default();
    for (i, want) in wanted.iter().enumerate().take(n) {
        let frames: Vec<&[u8]> = (0..t)
            .map(|f| &u8s[(i * t + f) * frame..][..frame])
            .collect();
        let Some(got) = analyse(&frames, size) else {
            continue;
        };
        hits.add([
            got.direction == Some(want.direction),
            got.colour == want.colour,
            got.shape == want.shape,
            got.background == want.background,
        ]);
    }
    let [direction, colour, shape, background, all] = hits.rates(n);
    Ok(MotionAccuracy {
        direction,
        colour,
        shape,
        background,
        all,
        clips: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rendered_clip_is_read_back_exactly() {
        for (i, m) in Motion::all().iter().enumerate() {
            for seed in 0..2 {
                let frames = m.render(32, 6, (i * 2 + seed) as u64);
                let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
                let got = analyse(&refs, 32).unwrap_or_else(|| panic!("{}", m.caption()));
                assert_eq!(
                    (got.colour, got.shape, got.background, got.direction),
                    (m.colour, m.shape, m.background, Some(m.direction)),
                    "{}",
                    m.caption()
                );
            }
        }
        // A still clip has no direction.
        let m = Motion::all()[0];
        let still = m.render(32, 1, 0);
        let refs = [still[0].as_slice(), still[0].as_slice()];
        assert_eq!(analyse(&refs, 32).unwrap().direction, None);
    }

    #[test]
    fn captions_and_held_out_combinations() {
        let all = Motion::all();
        assert_eq!(all.len(), 192);
        assert_eq!(
            all[0].caption(),
            "a red circle moving left on a black background"
        );
        let (held, train): (Vec<Motion>, Vec<Motion>) = all.iter().partition(|m| m.held_out());
        assert!(held.len() > 30 && held.len() < 45, "{}", held.len());
        for m in &held {
            assert!(train.iter().any(|t| t.direction == m.direction));
            assert!(train.iter().any(|t| t.colour == m.colour));
        }
    }

    #[test]
    fn measuring_the_dataset_scores_one_and_reversed_clips_lose_the_direction() {
        let dev = candle_core::Device::Cpu;
        let (clips, picked) = dataset(&Motion::all(), 24, 32, 5, 3, &dev).unwrap();
        assert_eq!(clips.dims(), [24, 3, 5, 32, 32]);
        let acc = measure(&clips, &picked).unwrap();
        assert_eq!((acc.all, acc.direction, acc.clips), (1.0, 1.0, 24));
        // Played backwards, every clip moves the other way: direction never matches, the rest
        // still does.
        let rev = clips
            .index_select(
                &candle_core::Tensor::new(&[4u32, 3, 2, 1, 0], &dev).unwrap(),
                2,
            )
            .unwrap();
        let acc = measure(&rev, &picked).unwrap();
        assert_eq!((acc.direction, acc.colour, acc.shape), (0.0, 1.0, 1.0));
    }
}
