//! A synthetic captioned dataset for proving that text conditioning works, measurably: one
//! coloured shape (circle, square, triangle) in one quadrant of a plain background, captioned
//! "a red circle in the top left on a black background". Every attribute of a generated image
//! can be read back from its pixels ([`analyse`]), so "how often do colour, shape and position
//! match the caption" needs no learned classifier.
//!
//! 4 colours x 3 shapes x 4 positions x 4 backgrounds = 192 scenes; [`Scene::held_out`] keeps a
//! fifth of the combinations out of training (every attribute value still occurs in training),
//! to test generalisation to unseen combinations.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 30, 30]),
    ("green", [30, 180, 40]),
    ("blue", [40, 70, 230]),
    ("yellow", [235, 215, 30]),
];
pub const BACKGROUNDS: [(&str, [u8; 3]); 4] = [
    ("black", [10, 10, 10]),
    ("white", [245, 245, 245]),
    ("grey", [128, 128, 128]),
    ("purple", [110, 40, 130]),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
pub const POSITIONS: [&str; 4] = ["top left", "top right", "bottom left", "bottom right"];

/// One scene: indices into [`COLOURS`], [`SHAPES`], [`POSITIONS`], [`BACKGROUNDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scene {
    pub colour: usize,
    pub shape: usize,
    pub position: usize,
    pub background: usize,
}

impl Scene {
    /// All 192 scenes.
    pub fn all() -> Vec<Scene> {
        let mut v = Vec::new();
        for colour in 0..COLOURS.len() {
            for shape in 0..SHAPES.len() {
                for position in 0..POSITIONS.len() {
                    for background in 0..BACKGROUNDS.len() {
                        v.push(Scene {
                            colour,
                            shape,
                            position,
                            background,
                        });
                    }
                }
            }
        }
        v
    }

    /// The caption, e.g. "a red circle in the top left on a black background".
    pub fn caption(&self) -> String {
        format!(
            "a {} {} in the {} on a {} background",
            COLOURS[self.colour].0,
            SHAPES[self.shape],
            POSITIONS[self.position],
            BACKGROUNDS[self.background].0
        )
    }

    /// Combinations kept out of training: a fifth of them, spread so that each attribute value
    /// appears both in and out.
    pub fn held_out(&self) -> bool {
        (self.colour + 2 * self.shape + 3 * self.position + self.background).is_multiple_of(5)
    }

    /// Renders the scene at `size` x `size` pixels, RGB, row-major; `seed` jitters the shape's
    /// size (±10%) and place (±size/16) so that no two renderings are identical.
    pub fn render(&self, size: usize, seed: u64) -> Vec<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let s = size as f32;
        let radius = s * 0.19 * rng.random_range(0.9f32..1.1);
        let jitter = s / 16.0;
        let (qx, qy) = (self.position % 2, self.position / 2);
        let cx = s * (0.25 + 0.5 * qx as f32) + rng.random_range(-jitter..jitter);
        let cy = s * (0.25 + 0.5 * qy as f32) + rng.random_range(-jitter..jitter);
        let (fg, bg) = (COLOURS[self.colour].1, BACKGROUNDS[self.background].1);
        draw(size, self.shape, (cx, cy), radius, fg, bg)
    }
}

/// Whether shape `shape` of `radius` covers the point (dx, dy) from its centre.
fn covers(shape: usize, dx: f32, dy: f32, radius: f32) -> bool {
    match shape {
        0 => dx * dx + dy * dy <= radius * radius,
        1 => dx.abs() <= radius * SQUARE_HALF_SIDE && dy.abs() <= radius * SQUARE_HALF_SIDE,
        // Upward triangle: apex at the top, base at the bottom.
        _ => {
            let t = (dy + radius) / (2.0 * radius); // 0 at the apex, 1 at the base
            (0.0..=1.0).contains(&t) && dx.abs() <= t * radius
        }
    }
}

/// A square's half side, in units of the scene's radius.
const SQUARE_HALF_SIDE: f32 = 0.85;

/// A `size` x `size` RGB image (row-major) of `bg` with shape `shape` (an index into [`SHAPES`])
/// of `radius` centred at `centre` in `fg`.
pub(crate) fn draw(
    size: usize,
    shape: usize,
    (cx, cy): (f32, f32),
    radius: f32,
    fg: [u8; 3],
    bg: [u8; 3],
) -> Vec<u8> {
    let mut img = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            // Pixel centres.
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let inside = covers(shape, dx, dy, radius);
            img.extend_from_slice(if inside { &fg } else { &bg });
        }
    }
    img
}

fn nearest(palette: &[(&str, [u8; 3])], c: [f32; 3]) -> usize {
    let dist = |p: [u8; 3]| -> f32 { (0..3).map(|i| (p[i] as f32 - c[i]).powi(2)).sum() };
    (0..palette.len())
        .min_by(|&a, &b| dist(palette[a].1).total_cmp(&dist(palette[b].1)))
        .expect("non-empty palette")
}

/// Reads a scene back from an RGB image (row-major, `size` x `size`): the background is the
/// border's colour, the shape the largest connected region of pixels that differ from it; its
/// colour is the nearest palette colour to their mean, its position the quadrant of their
/// centroid, and its kind the rendered shape that overlaps the region best. `None` when no shape
/// is visible.
pub fn analyse(img: &[u8], size: usize) -> Option<Scene> {
    let found = find(img, size)?;
    let half = size as f32 / 2.0;
    let (cx, cy) = found.centroid;
    Some(Scene {
        colour: found.colour,
        shape: found.shape,
        position: usize::from(cx >= half) + 2 * usize::from(cy >= half),
        background: found.background,
    })
}

/// A shape read from an image: palette indices and the centroid of its pixels.
pub(crate) struct Found {
    pub colour: usize,
    pub shape: usize,
    pub background: usize,
    pub centroid: (f32, f32),
}

/// What [`analyse`] reads, with the centroid instead of the quadrant.
pub(crate) fn find(img: &[u8], size: usize) -> Option<Found> {
    let px = |x: usize, y: usize| -> [f32; 3] {
        let i = (y * size + x) * 3;
        [img[i] as f32, img[i + 1] as f32, img[i + 2] as f32]
    };
    let mut border = [0f32; 3];
    let mut n = 0.0;
    for i in 0..size {
        for (x, y) in [(i, 0), (i, size - 1), (0, i), (size - 1, i)] {
            let p = px(x, y);
            (0..3).for_each(|c| border[c] += p[c]);
            n += 1.0;
        }
    }
    let bg_mean = border.map(|v| v / n);
    let background = nearest(&BACKGROUNDS, bg_mean);
    let bg = BACKGROUNDS[background].1.map(f32::from);
    let differs = |x: usize, y: usize| {
        let p = px(x, y);
        (0..3).map(|c| (p[c] - bg[c]).powi(2)).sum::<f32>().sqrt() > 60.0
    };
    // The shape is the largest 4-connected region of such pixels: stray specks elsewhere (a
    // generated image's noise) are not part of it.
    let mut region = vec![0u32; size * size];
    let (mut best, mut best_len) = (0u32, 0usize);
    let mut next = 0u32;
    for start in 0..size * size {
        if region[start] != 0 || !differs(start % size, start / size) {
            continue;
        }
        next += 1;
        region[start] = next;
        let (mut stack, mut len) = (vec![start], 0usize);
        while let Some(i) = stack.pop() {
            len += 1;
            let (x, y) = (i % size, i / size);
            let around = [
                (x > 0).then(|| i - 1),
                (x + 1 < size).then(|| i + 1),
                (y > 0).then(|| i - size),
                (y + 1 < size).then(|| i + size),
            ];
            for j in around.into_iter().flatten() {
                if region[j] == 0 && differs(j % size, j / size) {
                    region[j] = next;
                    stack.push(j);
                }
            }
        }
        if len > best_len {
            (best, best_len) = (next, len);
        }
    }
    let shape_mask: Vec<bool> = region.iter().map(|&r| best != 0 && r == best).collect();
    let (mut sum, mut count) = ([0f32; 3], 0usize);
    let (mut sx, mut sy) = (0f32, 0f32);
    for (i, _) in shape_mask.iter().enumerate().filter(|(_, &m)| m) {
        let (x, y) = (i % size, i / size);
        let p = px(x, y);
        (0..3).for_each(|c| sum[c] += p[c]);
        count += 1;
        sx += x as f32;
        sy += y as f32;
    }
    if count < (size * size) / 100 {
        return None;
    }
    let k = count as f32;
    let colour = nearest(&COLOURS, sum.map(|v| v / k));
    let shape = nearest_shape(&shape_mask, size, k, (sx / k, sy / k));
    Some(Found {
        colour,
        shape,
        background,
        centroid: (sx / k, sy / k),
    })
}

/// Which of [`SHAPES`] a mask (of `area` pixels) shows: the one whose rendering overlaps it best (intersection
/// over union). Each candidate is drawn with the mask's area and centroid, then moved by up to a
/// pixel and scaled by up to 10% to its best fit. Measures of the bounding box were tried first
/// and misread generated shapes: one stray pixel stretches a box, and a square with a ragged edge
/// or a one-pixel notch filled its box no better than a circle; an overlap of areas is not swayed
/// by a few pixels either way, and favours no shape over another.
fn nearest_shape(mask: &[bool], size: usize, area: f32, centroid: (f32, f32)) -> usize {
    // The pixel centres' centroid, in the drawing's coordinates (pixel centres at +0.5).
    let (mx, my) = (centroid.0 + 0.5, centroid.1 + 0.5);
    let overlap = |shape: usize, (cx, cy): (f32, f32), radius: f32| {
        let (mut both, mut either) = (0u32, 0u32);
        for (i, &m) in mask.iter().enumerate() {
            let (dx, dy) = ((i % size) as f32 + 0.5 - cx, (i / size) as f32 + 0.5 - cy);
            let t = covers(shape, dx, dy, radius);
            both += u32::from(m && t);
            either += u32::from(m || t);
        }
        both as f32 / either.max(1) as f32
    };
    let best_fit = |shape: usize| {
        // The radius that gives the mask's area; a triangle's centroid lies a third of the
        // radius below its centre.
        let radius = match shape {
            0 => (area / std::f32::consts::PI).sqrt(),
            1 => area.sqrt() / (2.0 * SQUARE_HALF_SIDE),
            _ => (area / 2.0).sqrt(),
        };
        let cy = if shape == 2 { my - radius / 3.0 } else { my };
        let moves = [-1.0, -0.5, 0.0, 0.5, 1.0];
        let mut best = 0f32;
        for scale in [0.9, 1.0, 1.1] {
            for ox in moves {
                for oy in moves {
                    best = best.max(overlap(shape, (mx + ox, cy + oy), radius * scale));
                }
            }
        }
        best
    };
    let fits: Vec<f32> = (0..SHAPES.len()).map(best_fit).collect();
    (0..SHAPES.len())
        .max_by(|&a, &b| fits[a].total_cmp(&fits[b]))
        .unwrap_or(0)
}

/// `n` renderings of `scenes` (cycled), as (n, 3, size, size) in [-1, 1], and their scenes.
pub fn dataset(
    scenes: &[Scene],
    n: usize,
    size: usize,
    seed: u64,
    device: &candle_core::Device,
) -> crate::Result<(candle_core::Tensor, Vec<Scene>)> {
    let picked: Vec<Scene> = (0..n).map(|i| scenes[i % scenes.len()]).collect();
    let pixels: Vec<f32> = picked
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.render(size, seed.wrapping_mul(1_000_003).wrapping_add(i as u64)))
        .map(|v| v as f32 / 127.5 - 1.0)
        .collect();
    let hwc = candle_core::Tensor::from_vec(pixels, (n, size, size, 3), device)?;
    Ok((hwc.permute((0, 3, 1, 2))?.contiguous()?, picked))
}

/// The built-in captioned training set: `per_scene` renderings of each scene not
/// [`Scene::held_out`], at `size` pixels, labelled by caption. (Not to be mirrored: a flip moves
/// the shape to the other side of the caption's "left" or "right".)
pub fn training_set(
    size: usize,
    per_scene: usize,
    seed: u64,
    device: &candle_core::Device,
) -> crate::Result<super::LabelledImages> {
    let scenes: Vec<Scene> = Scene::all().into_iter().filter(|s| !s.held_out()).collect();
    let (images, picked) = dataset(&scenes, scenes.len() * per_scene, size, seed, device)?;
    let labels = picked
        .iter()
        .map(|p| {
            scenes
                .iter()
                .position(|s| s == p)
                .expect("picked from scenes")
        })
        .collect();
    Ok(super::LabelledImages {
        images,
        labels,
        num_classes: 0,
        captions: Some(scenes.iter().map(Scene::caption).collect()),
    })
}

/// How often generated images show what their captions asked for, attribute by attribute.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AttributeAccuracy {
    pub colour: f64,
    pub shape: f64,
    pub position: f64,
    pub background: f64,
    /// All four at once.
    pub all: f64,
    pub images: usize,
    /// How the shapes asked for (rows: [`SHAPES`]) were read (columns: [`SHAPES`], then no
    /// shape found): where a model that misses the shape goes wrong.
    pub shape_read: [[usize; 4]; 3],
}

/// Scores images (N, 3, size, size) in [-1, 1] against the scenes they were asked for.
pub fn measure(images: &candle_core::Tensor, wanted: &[Scene]) -> crate::Result<AttributeAccuracy> {
    let (n, _, size, _) = images.dims4()?;
    let u8s = ((images.clamp(-1.0, 1.0)? + 1.0)? * 127.5)?
        .round()?
        .permute((0, 2, 3, 1))?
        .to_dtype(candle_core::DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let mut hits = Hits::default();
    let mut shape_read = [[0usize; 4]; 3];
    for (i, want) in wanted.iter().enumerate().take(n) {
        let got = analyse(&u8s[i * size * size * 3..][..size * size * 3], size);
        shape_read[want.shape][got.map_or(SHAPES.len(), |g| g.shape)] += 1;
        let Some(got) = got else { continue };
        hits.add([
            got.colour == want.colour,
            got.shape == want.shape,
            got.position == want.position,
            got.background == want.background,
        ]);
    }
    let [colour, shape, position, background, all] = hits.rates(n);
    Ok(AttributeAccuracy {
        colour,
        shape,
        position,
        background,
        all,
        images: n,
        shape_read,
    })
}

/// Counts of four attribute checks, and of all four at once, over the samples measured.
#[derive(Default)]
pub(crate) struct Hits([usize; 5]);

impl Hits {
    pub(crate) fn add(&mut self, checks: [bool; 4]) {
        for (h, c) in self.0.iter_mut().zip(checks) {
            *h += usize::from(c);
        }
        self.0[4] += usize::from(checks.iter().all(|&c| c));
    }

    /// Each count as a share of `n` samples (a sample with nothing readable counts as a miss).
    pub(crate) fn rates(&self, n: usize) -> [f64; 5] {
        self.0.map(|h| h as f64 / n.max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rendered_scene_is_read_back_exactly() {
        let scenes = Scene::all();
        assert_eq!(scenes.len(), 192);
        for (i, scene) in scenes.iter().enumerate() {
            for seed in 0..3 {
                let img = scene.render(32, (i * 3 + seed) as u64);
                assert_eq!(analyse(&img, 32), Some(*scene), "{}", scene.caption());
            }
        }
        // A blank image has no shape.
        let blank: Vec<u8> = (0..32 * 32).flat_map(|_| [10u8, 10, 10]).collect();
        assert_eq!(analyse(&blank, 32), None);
    }

    #[test]
    fn captions_are_distinct_and_every_value_is_seen_in_training() {
        let scenes = Scene::all();
        let captions: std::collections::HashSet<String> =
            scenes.iter().map(Scene::caption).collect();
        assert_eq!(captions.len(), 192);
        assert_eq!(
            scenes[0].caption(),
            "a red circle in the top left on a black background"
        );
        let (held, train): (Vec<Scene>, Vec<Scene>) = scenes.iter().partition(|s| s.held_out());
        assert!(held.len() > 30 && held.len() < 45, "{}", held.len());
        for s in &held {
            // Each held-out attribute value occurs in some training scene.
            assert!(train.iter().any(|t| t.colour == s.colour));
            assert!(train.iter().any(|t| t.shape == s.shape));
            assert!(train.iter().any(|t| t.position == s.position));
            assert!(train.iter().any(|t| t.background == s.background));
        }
        // Renderings differ with the seed.
        assert_ne!(scenes[5].render(32, 1), scenes[5].render(32, 2));
    }

    #[test]
    fn stray_specks_are_not_part_of_the_shape() {
        // A green circle in the top left on black, with two specks of green in the far corner
        // (a generated image's noise): still a circle in the top left, not a sparse "triangle"
        // spanning the image.
        let scene = Scene {
            colour: 1,
            shape: 0,
            position: 0,
            background: 0,
        };
        let mut img = scene.render(32, 4);
        for (x, y) in [(29, 29), (27, 30)] {
            img[(y * 32 + x) * 3..][..3].copy_from_slice(&COLOURS[1].1);
        }
        assert_eq!(analyse(&img, 32), Some(scene));
    }

    #[test]
    fn bumps_on_the_edge_do_not_change_the_shape_read() {
        // Generated shapes come with one- or two-pixel bumps on their edges; two of them
        // (above and left of the shape) stretch a square's bounding box to a circle's fill.
        for shape in 0..3 {
            let scene = Scene {
                colour: 2,
                shape,
                position: 3,
                background: 1,
            };
            let mut img = scene.render(32, 9);
            let fg = COLOURS[2].1;
            let is_fg = |img: &[u8], x: usize, y: usize| img[(y * 32 + x) * 3..][..3] == fg;
            let (ys, xs): (Vec<usize>, Vec<usize>) = (0..32 * 32)
                .filter(|&i| is_fg(&img, i % 32, i / 32))
                .map(|i| (i / 32, i % 32))
                .unzip();
            let (top, left) = (*ys.iter().min().unwrap(), *xs.iter().min().unwrap());
            // The topmost row's first pixel gets a bump above it, the leftmost column's first
            // pixel one to its left (two pixels wide, one deep).
            let tx = (0..32).find(|&x| is_fg(&img, x, top)).unwrap();
            let ly = (0..32).find(|&y| is_fg(&img, left, y)).unwrap();
            for (x, y) in [
                (tx, top - 1),
                (tx + 1, top - 1),
                (left - 1, ly),
                (left - 1, ly + 1),
            ] {
                img[(y * 32 + x) * 3..][..3].copy_from_slice(&fg);
            }
            assert_eq!(analyse(&img, 32), Some(scene), "{}", scene.caption());
        }
    }

    #[test]
    fn ragged_edges_do_not_change_the_shape_read() {
        // Generated edges are ragged: flip each pixel on the boundary between shape and
        // background to the other side with probability 0.1 (the bounding-box reader this one
        // replaced misread a fifth of such shapes, mostly squares as circles), for every scene.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (i, scene) in Scene::all().iter().enumerate() {
            let clean = scene.render(32, 1000 + i as u64);
            let fg = COLOURS[scene.colour].1;
            let is_fg = |x: usize, y: usize| clean[(y * 32 + x) * 3..][..3] == fg;
            let mut img = clean.clone();
            for (x, y) in (0..32 * 32).map(|j| (j % 32, j / 32)) {
                let neighbours =
                    [(0, 1), (2, 1), (1, 0), (1, 2)].map(|(ox, oy): (usize, usize)| {
                        (x + ox).checked_sub(1).zip((y + oy).checked_sub(1))
                    });
                let on_boundary = neighbours
                    .into_iter()
                    .flatten()
                    .any(|(u, v)| u < 32 && v < 32 && is_fg(u, v) != is_fg(x, y));
                if on_boundary && rng.random_bool(0.1) {
                    let flipped = if is_fg(x, y) {
                        BACKGROUNDS[scene.background].1
                    } else {
                        fg
                    };
                    img[(y * 32 + x) * 3..][..3].copy_from_slice(&flipped);
                }
            }
            assert_ne!(img, clean);
            assert_eq!(analyse(&img, 32), Some(*scene), "{}", scene.caption());
        }
    }

    #[test]
    fn a_notched_square_with_a_bump_is_still_a_square() {
        // As generated squares were drawn: a one-pixel notch cut three pixels up into the base,
        // and a bump two pixels out of the left side and three tall, which a 3 x 3 opening
        // keeps (it stretched the box: the bounding-box reader saw a circle).
        let scene = Scene {
            colour: 0,
            shape: 1,
            position: 1,
            background: 2,
        };
        let mut img = scene.render(32, 3);
        let fg = COLOURS[0].1;
        let body: Vec<(usize, usize)> = (0..32 * 32)
            .map(|j| (j % 32, j / 32))
            .filter(|&(x, y)| img[(y * 32 + x) * 3..][..3] == fg)
            .collect();
        let (x0, x1) = (
            body.iter().map(|p| p.0).min().unwrap(),
            body.iter().map(|p| p.0).max().unwrap(),
        );
        let (y0, y1) = (
            body.iter().map(|p| p.1).min().unwrap(),
            body.iter().map(|p| p.1).max().unwrap(),
        );
        let bg = BACKGROUNDS[2].1;
        for d in 0..3 {
            img[((y1 - d) * 32 + x1 - 3) * 3..][..3].copy_from_slice(&bg);
            for out in 1..=2 {
                img[((y0 + 2 + d) * 32 + x0 - out) * 3..][..3].copy_from_slice(&fg);
            }
        }
        assert_eq!(analyse(&img, 32), Some(scene));
    }

    #[test]
    fn measuring_the_dataset_itself_scores_one_and_wrong_captions_score_less() {
        let dev = candle_core::Device::Cpu;
        let scenes = Scene::all();
        let (images, picked) = dataset(&scenes, 40, 32, 7, &dev).unwrap();
        assert_eq!(images.dims(), [40, 3, 32, 32]);
        let acc = measure(&images, &picked).unwrap();
        assert_eq!((acc.all, acc.colour, acc.images), (1.0, 1.0, 40));
        let asked = |k| picked.iter().filter(|s| s.shape == k).count();
        for (k, row) in acc.shape_read.iter().enumerate() {
            let mut want = [0; 4];
            want[k] = asked(k);
            assert_eq!(*row, want, "{}", SHAPES[k]);
        }
        // Asking for the next colour over: colour never matches, the rest still does.
        let shifted: Vec<Scene> = picked
            .iter()
            .map(|s| Scene {
                colour: (s.colour + 1) % COLOURS.len(),
                ..*s
            })
            .collect();
        let acc = measure(&images, &shifted).unwrap();
        assert_eq!((acc.colour, acc.shape, acc.all), (0.0, 1.0, 0.0));
        // Asking for the next shape over: the circles drawn land in the square row's circle column.
        let next: Vec<Scene> = picked
            .iter()
            .map(|s| Scene {
                shape: (s.shape + 1) % SHAPES.len(),
                ..*s
            })
            .collect();
        let acc = measure(&images, &next).unwrap();
        assert_eq!(acc.shape, 0.0);
        assert_eq!(acc.shape_read[1][0], asked(0), "circles asked as squares");
    }
}
