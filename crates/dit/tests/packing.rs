//! Patch n' pack (NaViT): a packed batch of images of different sizes gives, image by image, the
//! outputs of running each image alone; nothing crosses from one image to another (values or
//! gradients); packed training's loss is the mean of the images' own losses. And any grid: one
//! model runs at several sizes and aspect ratios.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use dit::checkpoint::{self, Tensors};
use dit::config::{TextConditioning, VideoConfig};
use dit::model::pack::{channels_first, keep_tokens, patch_tokens};
use dit::model::{PackedConditions, Packing, TextTokens};
use dit::rng::NoiseRng;
use dit::{DiT, DiTConfig};

use common::{abs_max, abs_sum, max_abs_diff};

fn dev() -> Device {
    Device::Cpu
}

fn config() -> DiTConfig {
    DiTConfig {
        input_size: 8,
        hidden_size: 32,
        depth: 2,
        num_heads: 2,
        num_classes: 5,
        ..Default::default()
    }
}

/// Every weight random (the reference initialisation zeroes the gates and the final layer, which
/// would make every output zero and every comparison vacuous).
fn random_weights(cfg: &DiTConfig, seed: u64) -> Tensors {
    let mut rng = NoiseRng::new(seed);
    let init = dit::train::reference_init(cfg, &mut rng).unwrap();
    init.iter()
        .map(|(k, v)| (k.clone(), (rng.randn_like(v).unwrap() * 0.2).unwrap()))
        .collect()
}

fn model(cfg: &DiTConfig, seed: u64) -> DiT {
    checkpoint::build_model(cfg, random_weights(cfg, seed), DType::F32, &dev()).unwrap()
}

/// Images (1, C, h, w) of the given sizes, random.
fn images(sizes: &[(usize, usize)], channels: usize, seed: u64) -> Vec<Tensor> {
    let mut rng = NoiseRng::new(seed);
    sizes
        .iter()
        .map(|&(h, w)| {
            rng.randn_like(&Tensor::zeros((1, channels, h, w), DType::F32, &dev()).unwrap())
                .unwrap()
        })
        .collect()
}

const SIZES: [(usize, usize); 5] = [(8, 8), (4, 12), (12, 8), (6, 6), (2, 10)];

fn token_counts(xs: &[Tensor], p: usize) -> Vec<usize> {
    xs.iter()
        .map(|x| (x.dim(2).unwrap() / p) * (x.dim(3).unwrap() / p))
        .collect()
}

#[test]
fn packed_class_batch_equals_each_image_alone() {
    let cfg = config();
    let m = model(&cfg, 1);
    let xs = images(&SIZES, 4, 2);
    let t = Tensor::new(&[10f32, 500.0, 999.0, 0.0, 250.0], &dev()).unwrap();
    let y = Tensor::new(&[0u32, 4, 5, 2, 1], &dev()).unwrap(); // 5: the null class
    let packing = Packing::greedy(&token_counts(&xs, 2), 32).unwrap();
    assert!(
        packing.sequences() < xs.len(),
        "several images share a sequence"
    );
    let packed = m
        .forward_packed(&xs, &t, PackedConditions::Labels(&y), &packing)
        .unwrap();
    for (i, x) in xs.iter().enumerate() {
        let alone = m
            .forward(x, &t.narrow(0, i, 1).unwrap(), &y.narrow(0, i, 1).unwrap())
            .unwrap();
        assert_eq!(packed[i].dims(), alone.dims());
        assert_eq!(alone.dim(1).unwrap(), 8, "eps and variance channels");
        let d = max_abs_diff(&packed[i], &alone);
        assert!(d < 1e-4, "image {i} ({:?}): {d}", x.dims());
    }
    // The padded layout (one image per sequence) gives the same outputs.
    let padded = Packing::padded(&token_counts(&xs, 2)).unwrap();
    let out = m
        .forward_packed(&xs, &t, PackedConditions::Labels(&y), &padded)
        .unwrap();
    for (a, b) in out.iter().zip(&packed) {
        assert!(max_abs_diff(a, b) < 1e-4);
    }
}

#[test]
fn packed_text_batch_equals_each_image_alone() {
    let mut cfg = config();
    cfg.num_classes = 0;
    cfg.text = Some(TextConditioning::single(12, 6));
    let m = model(&cfg, 3);
    let xs = images(&SIZES[..4], 4, 4);
    let mut rng = NoiseRng::new(5);
    let tokens = rng
        .randn_like(&Tensor::zeros((4, 6, 12), DType::F32, &dev()).unwrap())
        .unwrap();
    let pooled = rng
        .randn_like(&Tensor::zeros((4, 12), DType::F32, &dev()).unwrap())
        .unwrap();
    // Prompts of different lengths: 6, 3, 1 and 4 real tokens.
    let lens = [6usize, 3, 1, 4];
    let mask: Vec<f32> = lens
        .iter()
        .flat_map(|&l| (0..6).map(move |j| f32::from(u8::from(j < l))))
        .collect();
    let mask = Tensor::from_vec(mask, (4, 6), &dev()).unwrap();
    let t = Tensor::new(&[3f32, 700.0, 100.0, 42.0], &dev()).unwrap();
    let texts = [TextTokens {
        tokens: &tokens,
        mask: Some(&mask),
    }];
    let packing = Packing::greedy(&token_counts(&xs, 2), 40).unwrap();
    let cond = PackedConditions::Text {
        texts: &texts,
        pooled: &pooled,
    };
    let packed = m.forward_packed(&xs, &t, cond, &packing).unwrap();
    for (i, x) in xs.iter().enumerate() {
        let row = |v: &Tensor| v.narrow(0, i, 1).unwrap();
        let (tok, msk) = (row(&tokens), row(&mask));
        let one = [TextTokens {
            tokens: &tok,
            mask: Some(&msk),
        }];
        let alone = m.forward_text(x, &row(&t), &one, &row(&pooled)).unwrap();
        let d = max_abs_diff(&packed[i], &alone);
        assert!(d < 1e-4, "image {i}: {d}");
    }
}

#[test]
fn nothing_crosses_between_packed_images() {
    let cfg = config();
    let m = model(&cfg, 6);
    let xs = images(&SIZES, 4, 7);
    let t = Tensor::new(&[1f32, 2.0, 3.0, 4.0, 5.0], &dev()).unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 3, 4], &dev()).unwrap();
    let packing = Packing::greedy(&token_counts(&xs, 2), 32).unwrap();
    let run = |xs: &[Tensor]| {
        m.forward_packed(xs, &t, PackedConditions::Labels(&y), &packing)
            .unwrap()
    };
    let base = run(&xs);
    // Change image 1 completely: every other image's output stays exactly the same.
    let mut changed = xs.clone();
    changed[1] = (&xs[1] * -3.0).unwrap();
    let after = run(&changed);
    for i in [0, 2, 3, 4] {
        assert_eq!(max_abs_diff(&base[i], &after[i]), 0.0, "image {i} moved");
    }
    assert!(max_abs_diff(&base[1], &after[1]) > 1e-3);
    // Gradients: image 0's output depends on image 0's input only.
    let vars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = m
        .forward_packed(&inputs, &t, PackedConditions::Labels(&y), &packing)
        .unwrap();
    let grads = out[0].sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let norm = |v: &Var| grads.get(v.as_tensor()).map(abs_sum).unwrap_or(0.0);
    assert!(norm(&vars[0]) > 0.0);
    for (i, v) in vars.iter().enumerate().skip(1) {
        assert_eq!(norm(v), 0.0, "gradient reached image {i}");
    }
}

#[test]
fn dropped_tokens_are_left_out_and_the_rest_packs() {
    let cfg = config();
    let m = model(&cfg, 8);
    let xs = images(&SIZES[..3], 4, 9);
    let t = Tensor::new(&[5f32, 50.0, 500.0], &dev()).unwrap();
    let y = Tensor::new(&[1u32, 2, 3], &dev()).unwrap();
    let counts = token_counts(&xs, 2);
    let mut rng = NoiseRng::new(10);
    let keep: Vec<Tensor> = counts
        .iter()
        .map(|&n| Tensor::new(keep_tokens(&mut rng, n, 0.5).as_slice(), &dev()).unwrap())
        .collect();
    let kept: Vec<usize> = keep.iter().map(|k| k.elem_count()).collect();
    assert_eq!(kept, vec![8, 6, 12]);
    let packing = Packing::greedy(&kept, 16).unwrap();
    let cond = PackedConditions::Labels(&y);
    let out = m
        .forward_packed_tokens(&xs, Some(&keep), &t, cond, &packing)
        .unwrap();
    // Each image as a packing of its own, with the same kept patches: the same tokens.
    for i in 0..3 {
        let alone = Packing::greedy(&kept[i..i + 1], 16).unwrap();
        let yi = y.narrow(0, i, 1).unwrap();
        let one = m
            .forward_packed_tokens(
                &xs[i..i + 1],
                Some(&keep[i..i + 1]),
                &t.narrow(0, i, 1).unwrap(),
                PackedConditions::Labels(&yi),
                &alone,
            )
            .unwrap();
        assert_eq!(out[i].dims(), &[1, kept[i], 2 * 2 * 8]);
        assert!(max_abs_diff(&out[i], &one[0]) < 1e-5);
    }
    // Keeping every patch gives the full output's tokens.
    let all: Vec<Tensor> = counts
        .iter()
        .map(|&n| Tensor::arange(0u32, n as u32, &dev()).unwrap())
        .collect();
    let full_packing = Packing::greedy(&counts, 32).unwrap();
    let tokens = m
        .forward_packed_tokens(&xs, Some(&all), &t, cond, &full_packing)
        .unwrap();
    let images = m.forward_packed(&xs, &t, cond, &full_packing).unwrap();
    for (tok, img) in tokens.iter().zip(&images) {
        let d = max_abs_diff(tok, &patch_tokens(img, 2, None).unwrap());
        assert!(d < 1e-5, "{d}");
    }
}

#[test]
fn spacetime_clips_of_different_shapes_pack() {
    let mut cfg = config();
    cfg.video = Some(VideoConfig {
        frames: 4,
        tubelet: Some(2),
    });
    let m = model(&cfg, 11);
    let mut rng = NoiseRng::new(12);
    let clips: Vec<Tensor> = [(4, 8, 8), (2, 4, 12), (6, 6, 4)]
        .iter()
        .map(|&(f, h, w)| {
            rng.randn_like(&Tensor::zeros((1, 4, f, h, w), DType::F32, &dev()).unwrap())
                .unwrap()
        })
        .collect();
    let counts: Vec<usize> = clips
        .iter()
        .map(|c| {
            let d = c.dims();
            d[2] / 2 * (d[3] / 2) * (d[4] / 2)
        })
        .collect();
    assert_eq!(counts, vec![32, 12, 18]);
    let t = Tensor::new(&[1f32, 400.0, 900.0], &dev()).unwrap();
    let y = Tensor::new(&[0u32, 3, 4], &dev()).unwrap();
    let packing = Packing::greedy(&counts, 32).unwrap();
    assert_eq!(packing.sequences(), 2);
    let out = m
        .forward_packed(&clips, &t, PackedConditions::Labels(&y), &packing)
        .unwrap();
    for (i, c) in clips.iter().enumerate() {
        let alone = m
            .forward(c, &t.narrow(0, i, 1).unwrap(), &y.narrow(0, i, 1).unwrap())
            .unwrap();
        assert_eq!(out[i].dims(), alone.dims());
        assert!(max_abs_diff(&out[i], &alone) < 1e-4, "clip {i}");
    }
}

#[test]
fn packing_refuses_what_it_cannot_route() {
    let mut cfg = config();
    cfg.video = Some(VideoConfig::frames(2));
    let m = model(&cfg, 13);
    let clip = Tensor::zeros((1, 4, 2, 4, 4), DType::F32, &dev()).unwrap();
    let t = Tensor::new(&[1f32], &dev()).unwrap();
    let y = Tensor::new(&[0u32], &dev()).unwrap();
    let packing = Packing::greedy(&[4], 8).unwrap();
    let err = m
        .forward_packed(&[clip], &t, PackedConditions::Labels(&y), &packing)
        .unwrap_err();
    assert!(err.to_string().contains("temporal attention"), "{err}");
    // Token counts that disagree with the packing are named.
    let m = model(&config(), 14);
    let x = Tensor::zeros((1, 4, 4, 4), DType::F32, &dev()).unwrap();
    let packing = Packing::greedy(&[5], 8).unwrap();
    let err = m
        .forward_packed(&[x], &t, PackedConditions::Labels(&y), &packing)
        .unwrap_err();
    assert!(err.to_string().contains("(1, 5, D)"), "{err}");
}

#[test]
fn any_grid_runs_and_the_trained_grid_is_unchanged() {
    let cfg = config();
    let m = model(&cfg, 15);
    let t = Tensor::new(&[100f32], &dev()).unwrap();
    let y = Tensor::new(&[2u32], &dev()).unwrap();
    // A wide input: its positions are the 2-D table of its own 2 x 8 grid.
    let x = images(&[(4, 16)], 4, 16).remove(0);
    let out = m.forward(&x, &t, &y).unwrap();
    assert_eq!(out.dims(), &[1, 8, 4, 16]);
    // Positions of a 3 x 5 grid are the square 5 x 5 table's first three rows.
    let small = dit::model::embed::sincos_2d(32, 3, 5, &dev(), DType::F32).unwrap();
    let square = dit::model::embed::sincos_2d(32, 5, 5, &dev(), DType::F32).unwrap();
    assert_eq!(max_abs_diff(&small, &square.narrow(1, 0, 15).unwrap()), 0.0);
    // Sides that are not multiples of the patch are refused with the shape.
    let bad = Tensor::zeros((1, 4, 5, 8), DType::F32, &dev()).unwrap();
    let err = m.forward(&bad, &t, &y).unwrap_err();
    assert!(err.to_string().contains("multiples of the patch"), "{err}");
}

#[test]
fn packed_training_loss_is_the_mean_of_each_images_loss() {
    let cfg = config();
    let weights = random_weights(&cfg, 17);
    let tcfg = dit::train::TrainConfig {
        class_dropout: 0.0,
        ..Default::default()
    };
    let xs = images(&SIZES, 4, 18);
    let labels = [0usize, 1, 2, 3, 4];
    let mut packed =
        dit::train::Trainer::new(&cfg, weights.clone(), tcfg.clone(), 19, &dev()).unwrap();
    let loss = packed
        .step_packed(&xs, dit::train::Conditions::Labels(&labels), 32)
        .unwrap();
    // The same draws, in the same order, replayed image by image through the plain loss.
    let plain = dit::train::Trainer::new(&cfg, weights.clone(), tcfg, 19, &dev()).unwrap();
    let mut rng = NoiseRng::new(19);
    let t: Vec<usize> = (0..5).map(|_| rng.below(1000)).collect();
    let _dropped: Vec<f64> = (0..5).map(|_| rng.uniform()).collect();
    let noise: Vec<Tensor> = xs.iter().map(|x| rng.randn_like(x).unwrap()).collect();
    let mean: f32 = (0..5)
        .map(|i| {
            plain
                .loss(&xs[i], &t[i..i + 1], &noise[i], &[labels[i] as u32])
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum::<f32>()
        / 5.0;
    assert!(
        (loss - mean).abs() < 1e-4 * mean.abs().max(1.0),
        "{loss} vs {mean}"
    );
    // The step moved the weights, and the padded layout trains too.
    let moved = packed
        .params
        .iter()
        .any(|(n, v)| max_abs_diff(v.as_tensor(), &weights[n]) > 0.0);
    assert!(moved);
    assert!(packed
        .step_packed(&xs, dit::train::Conditions::Labels(&labels), 0)
        .unwrap()
        .is_finite());
    // Token dropping trains on the kept patches.
    packed.cfg.token_drop = 0.5;
    assert!(packed
        .step_packed(&xs, dit::train::Conditions::Labels(&labels), 32)
        .unwrap()
        .is_finite());
    // channels_first keeps each element's channel: the eps channels come first.
    let tok = patch_tokens(&xs[0], 2, None).unwrap();
    let cf = channels_first(&tok, 4).unwrap();
    assert_eq!(cf.dims(), &[1, 4, 16, 4]);
    let c0 = xs[0].narrow(1, 0, 1).unwrap().sum_all().unwrap();
    let d = (cf.narrow(1, 0, 1).unwrap().sum_all().unwrap() - c0)
        .unwrap()
        .abs()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4);
}

#[test]
fn packed_sampling_runs_each_images_own_chain() {
    use dit::diffusion::Sampler;
    use dit::pipeline::{sample_latents, sample_packed, SampleOptions};
    let cfg = config();
    let m = model(&cfg, 20);
    let labels = [1usize, 4, 0];
    let noise = images(&[(8, 8), (4, 12), (6, 10)], 4, 21);
    for sampler in [Sampler::Ddim { eta: 0.0 }, Sampler::DpmSolverPp] {
        let opts = SampleOptions {
            steps: 4,
            sampler,
            cfg_scale: 3.0,
            ..Default::default()
        };
        let mut rng = NoiseRng::new(0);
        let packed = sample_packed(&m, &labels, noise.clone(), &opts, 0, &mut rng, |_| {}).unwrap();
        for (i, x) in noise.iter().enumerate() {
            let alone =
                sample_latents(&m, &labels[i..i + 1], x.clone(), &opts, &mut rng, |_| {}).unwrap();
            // Random weights make large latents: compare relative to their size.
            let scale = abs_max(&alone);
            let d = max_abs_diff(&packed[i], &alone) / scale.max(1.0);
            assert!(d < 1e-5, "{sampler:?} image {i}: {d} (of {scale})");
            assert!(max_abs_diff(&packed[i], x) > 0.1, "the chain moved");
        }
    }
}

#[test]
fn packed_text_training_loss_is_the_mean_of_each_images_loss() {
    use dit::model::TextBatch;
    let mut cfg = config();
    cfg.num_classes = 0;
    cfg.text = Some(TextConditioning::single(12, 5));
    let weights = random_weights(&cfg, 30);
    let tcfg = dit::train::TrainConfig {
        class_dropout: 0.0,
        ..Default::default()
    };
    let xs = images(&SIZES[..3], 4, 31);
    let mut rng = NoiseRng::new(32);
    let mut randn = |shape: (usize, usize, usize)| {
        rng.randn_like(&Tensor::zeros(shape, DType::F32, &dev()).unwrap())
            .unwrap()
    };
    let text = TextBatch {
        tokens: randn((3, 5, 12)),
        mask: Tensor::new(
            &[
                [1f32, 1., 1., 0., 0.],
                [1., 0., 0., 0., 0.],
                [1., 1., 1., 1., 1.],
            ],
            &dev(),
        )
        .unwrap(),
        pooled: randn((3, 1, 12)).squeeze(1).unwrap(),
        second: None,
    };
    let empty = text.narrow(0, 1).unwrap();
    let mut packed =
        dit::train::Trainer::new(&cfg, weights.clone(), tcfg.clone(), 33, &dev()).unwrap();
    packed.empty_prompt = Some(empty.clone());
    let loss = packed
        .step_packed(&xs, dit::train::Conditions::Text(&text), 24)
        .unwrap();
    let plain = dit::train::Trainer::new(&cfg, weights, tcfg, 33, &dev()).unwrap();
    let mut rng = NoiseRng::new(33);
    let t: Vec<usize> = (0..3).map(|_| rng.below(1000)).collect();
    let _dropped: Vec<f64> = (0..3).map(|_| rng.uniform()).collect();
    let noise: Vec<Tensor> = xs.iter().map(|x| rng.randn_like(x).unwrap()).collect();
    let mean: f32 = (0..3)
        .map(|i| {
            plain
                .loss_text(&xs[i], &t[i..i + 1], &noise[i], &text.narrow(i, 1).unwrap())
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum::<f32>()
        / 3.0;
    assert!(
        (loss - mean).abs() < 1e-4 * mean.abs().max(1.0),
        "{loss} vs {mean}"
    );
}
