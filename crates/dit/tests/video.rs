//! GenTron's text-to-video model (arXiv 2312.04557, §3.3): temporal self-attention after the
//! cross-attention, against the torch implementation of tools/make_fixtures.py; a video model
//! made from an image model is that image model frame by frame; the identity temporal mask makes
//! frames independent; motion-free guidance mixes three predictions as the paper's formula says.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use dit::checkpoint::{self, Tensors};
use dit::config::VideoConfig;
use dit::model::{GuidedChannels, TextBatch, TextTokens};
use dit::rng::NoiseRng;

fn dev() -> Device {
    Device::Cpu
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap() as f64 / n.to_scalar::<f32>().unwrap() as f64).sqrt()
}

/// The video fixture's weights, its config (frames 3, heads 2) and its inputs by name.
fn video_fixture() -> (Tensors, dit::DiTConfig, HashMap<String, Tensor>) {
    let f = candle_core::safetensors::load(common::fixture("gentron_video.safetensors"), &dev())
        .unwrap();
    let weights: Tensors = f
        .iter()
        .filter(|(k, _)| !k.starts_with("in."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let inputs = f
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("in.")?.to_string(), v.clone())))
        .collect();
    let mut cfg = checkpoint::infer_config(&weights, None).unwrap();
    assert!(cfg.video.is_some(), "temporal layers recognised");
    cfg.video = Some(VideoConfig::frames(3));
    cfg.num_heads = 2;
    (weights, cfg, inputs)
}

#[test]
fn temporal_attention_matches_torch_with_and_without_motion() {
    let (weights, cfg, inp) = video_fixture();
    let model = checkpoint::build_model(&cfg, weights, DType::F32, &dev()).unwrap();
    let tokens = TextTokens {
        tokens: &inp["text"],
        mask: Some(&inp["mask"]),
    };
    let out = model
        .forward_text_motion(
            &inp["x"],
            &inp["t"],
            &[tokens],
            &inp["pooled"],
            Some(&inp["motion"]),
        )
        .unwrap();
    assert_eq!(out.dims(), [2, 8, 3, 4, 4]);
    let e = rel_l2(&out, &inp["out"]);
    assert!(e < 1e-5, "video forward rel L2 {e}");
    // The first clip has motion: its frames see each other, so changing its last frame changes
    // its first frame's output. The second is motion-free: its frames are independent.
    let x = &inp["x"];
    let bumped = {
        let mut frames: Vec<Tensor> = (0..3).map(|f| x.narrow(2, f, 1).unwrap()).collect();
        frames[2] = (&frames[2] + 1.0).unwrap();
        Tensor::cat(&frames, 2).unwrap()
    };
    let out2 = model
        .forward_text_motion(
            &bumped,
            &inp["t"],
            &[tokens],
            &inp["pooled"],
            Some(&inp["motion"]),
        )
        .unwrap();
    let first_frame = |o: &Tensor, clip: usize| o.get(clip).unwrap().narrow(1, 0, 1).unwrap();
    assert!(rel_l2(&first_frame(&out2, 0), &first_frame(&out, 0)) > 1e-4);
    assert!(rel_l2(&first_frame(&out2, 1), &first_frame(&out, 1)) < 1e-6);
    // An image-shaped input to a video model is a clear error.
    let err = model
        .forward_text(
            &x.narrow(2, 0, 1).unwrap().squeeze(2).unwrap(),
            &inp["t"],
            &[tokens],
            &inp["pooled"],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("(N, C, T, H, W)"), "{err}");
}

/// A video model made from an image model (temporal layers freshly initialised: output
/// projection zero) gives, frame by frame, exactly the image model's output.
#[test]
fn a_video_model_from_an_image_model_is_that_model_frame_by_frame() {
    let (weights, video_cfg, inp) = video_fixture();
    let image_weights: Tensors = weights
        .iter()
        .filter(|(k, _)| !k.contains("temporal"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let image_cfg = dit::DiTConfig {
        video: None,
        ..video_cfg.clone()
    };
    let image =
        checkpoint::build_model(&image_cfg, image_weights.clone(), DType::F32, &dev()).unwrap();
    let init =
        dit::train::video_from_image(&image_weights, &video_cfg, &mut NoiseRng::new(3)).unwrap();
    assert!(common::abs_sum(&init["blocks.1.temporal_attn.qkv.weight"]) > 0.0);
    let video = checkpoint::build_model(&video_cfg, init, DType::F32, &dev()).unwrap();
    let (x, t) = (&inp["x"], &inp["t"]);
    let tokens = TextTokens {
        tokens: &inp["text"],
        mask: Some(&inp["mask"]),
    };
    let clip_out = video.forward_text(x, t, &[tokens], &inp["pooled"]).unwrap();
    // The same frames as a batch of images, each with its clip's timestep and prompt.
    let frames = x
        .permute((0, 2, 1, 3, 4))
        .unwrap()
        .reshape((6, 4, 4, 4))
        .unwrap();
    let rep = |v: &Tensor| {
        let idx = Tensor::new(&[0u32, 0, 0, 1, 1, 1], &dev()).unwrap();
        v.index_select(&idx, 0).unwrap()
    };
    let (text, mask) = (rep(&inp["text"]), rep(&inp["mask"]));
    let image_tokens = TextTokens {
        tokens: &text,
        mask: Some(&mask),
    };
    let image_out = image
        .forward_text(&frames, &rep(t), &[image_tokens], &rep(&inp["pooled"]))
        .unwrap()
        .reshape((2, 3, 8, 4, 4))
        .unwrap()
        .permute((0, 2, 1, 3, 4))
        .unwrap();
    let d = common::max_abs_diff(&clip_out, &image_out);
    assert!(d < 1e-5, "video at init vs image frame by frame: {d}");
    // A weight the image model lacks (other than the temporal layers) is an error naming it.
    let mut missing = image_weights.clone();
    missing.remove("blocks.0.mlp.fc1.weight");
    let err = dit::train::video_from_image(&missing, &video_cfg, &mut NoiseRng::new(3))
        .unwrap_err()
        .to_string();
    assert!(err.contains("blocks.0.mlp.fc1.weight"), "{err}");
}

/// Motion-free guidance in one batched pass equals the paper's combination of three separate
/// passes: e(0,0) + lt (e(T,M) - e(0,M)) + lm (e(0,M) - e(0,0)).
#[test]
fn motion_free_guidance_combines_three_predictions() {
    let (weights, cfg, inp) = video_fixture();
    let model = checkpoint::build_model(&cfg, weights, DType::F32, &dev()).unwrap();
    let text = TextBatch {
        tokens: inp["text"].clone(),
        mask: inp["mask"].clone(),
        pooled: inp["pooled"].clone(),
        second: None,
    };
    let mut m = vec![0f32; 5];
    m[0] = 1.0;
    let empty = TextBatch {
        tokens: Tensor::randn(0f32, 1.0, (1, 5, 24), &dev()).unwrap(),
        mask: Tensor::from_vec(m, (1, 5), &dev()).unwrap(),
        pooled: Tensor::randn(0f32, 1.0, (1, 16), &dev()).unwrap(),
        second: None,
    };
    let (x, t) = (&inp["x"], &inp["t"]);
    let (lt, lm) = (7.5, 1.2);
    let guided = model
        .forward_video_with_mfg(x, t, &text, &empty, lt, lm, GuidedChannels::All)
        .unwrap();
    let pass = |b: &TextBatch, motion: f32| {
        let two = |v: &Tensor| Tensor::cat(&[v, v], 0).unwrap();
        let (tokens, mask, pooled) = match b.tokens.dim(0).unwrap() {
            1 => (two(&b.tokens), two(&b.mask), two(&b.pooled)),
            _ => (b.tokens.clone(), b.mask.clone(), b.pooled.clone()),
        };
        let m = Tensor::new(&[motion, motion], &dev()).unwrap();
        let set = TextTokens {
            tokens: &tokens,
            mask: Some(&mask),
        };
        model
            .forward_text_motion(x, t, &[set], &pooled, Some(&m))
            .unwrap()
    };
    let (tm, zm, zz) = (pass(&text, 1.0), pass(&empty, 1.0), pass(&empty, 0.0));
    let eps = |o: &Tensor| o.narrow(1, 0, 4).unwrap();
    let want = ((eps(&zz) + ((eps(&tm) - eps(&zm)).unwrap() * lt).unwrap()).unwrap()
        + ((eps(&zm) - eps(&zz)).unwrap() * lm).unwrap())
    .unwrap();
    let e = rel_l2(&guided.narrow(1, 0, 4).unwrap(), &want);
    assert!(
        e < 1e-5,
        "batched motion-free guidance vs three passes: {e}"
    );
    // The learned-variance channels come from the text-and-motion prediction.
    let e = rel_l2(
        &guided.narrow(1, 4, 4).unwrap(),
        &tm.narrow(1, 4, 4).unwrap(),
    );
    assert!(e < 1e-5, "{e}");
    // The three predictions differ, so the test can tell them apart.
    assert!(rel_l2(&zm, &zz) > 1e-4 && rel_l2(&tm, &zm) > 1e-4);
}

/// A small text-to-video model trains (motion-free clips drawn at the configured rate, gradients
/// reaching the zero-initialised temporal layers) and samples clips with motion-free guidance.
#[test]
fn a_text_video_model_trains_and_samples_with_motion_free_guidance() {
    use dit::train::{reference_init, TrainConfig, Trainer};
    let cfg = dit::DiTConfig {
        input_size: 8,
        patch_size: 4,
        in_channels: 3,
        hidden_size: 32,
        depth: 2,
        num_heads: 2,
        num_classes: 0,
        text: Some(dit::config::TextConditioning::single(16, 4)),
        video: Some(VideoConfig::frames(3)),
        ..Default::default()
    };
    let init = reference_init(&cfg, &mut NoiseRng::new(0)).unwrap();
    let tc = TrainConfig {
        lr: 1e-3,
        motion_free: 0.5,
        ..Default::default()
    };
    let mut tr = Trainer::new(&cfg, init, tc, 1, &dev()).unwrap();
    let batch = |n: usize, seed: u64| {
        let mut rng = NoiseRng::new(seed);
        let mut z = |shape: &[usize]| {
            rng.randn_like(&Tensor::zeros(shape, DType::F32, &dev()).unwrap())
                .unwrap()
        };
        TextBatch {
            tokens: z(&[n, 4, 16]),
            mask: Tensor::ones((n, 4), DType::F32, &dev()).unwrap(),
            pooled: z(&[n, 16]),
            second: None,
        }
    };
    tr.empty_prompt = Some(batch(1, 9));
    let text = batch(4, 2);
    let x0 = NoiseRng::new(5)
        .randn_like(&Tensor::zeros((4, 3, 3, 8, 8), DType::F32, &dev()).unwrap())
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap();
    for _ in 0..4 {
        let loss = tr.step_text(&x0, &text, 4).unwrap();
        assert!(loss.is_finite(), "{loss}");
    }
    let proj = tr
        .params
        .iter()
        .find(|(n, _)| n == "blocks.0.temporal_attn.proj.weight")
        .unwrap()
        .1
        .as_tensor()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(proj > 0.0, "the temporal layer received no gradient");
    // Sampling clips: the default frame count, deterministic, and motion-free guidance changes
    // the result.
    let model = &tr.model;
    let noise = NoiseRng::new(7)
        .randn_like(&Tensor::zeros((2, 3, 3, 8, 8), DType::F32, &dev()).unwrap())
        .unwrap();
    let sample = |motion_scale: Option<f64>| {
        let opts = dit::pipeline::SampleOptions {
            steps: 3,
            sampler: dit::diffusion::Sampler::Ddim { eta: 0.0 },
            motion_scale,
            clip_denoised: true,
            ..Default::default()
        };
        let empty = tr.empty_prompt.as_ref().unwrap();
        dit::pipeline::sample_latents_text(
            model,
            &text.narrow(0, 2).unwrap(),
            empty,
            noise.clone(),
            &opts,
            &mut NoiseRng::new(0),
            |_| {},
        )
        .unwrap()
    };
    let (a, b) = (sample(Some(1.3)), sample(Some(1.3)));
    assert_eq!(a.dims(), [2, 3, 3, 8, 8]);
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    assert!(common::max_abs_diff(&a, &sample(None)) > 0.0);
    // Image-shaped noise for a video model is a clear error.
    let flat = noise.narrow(2, 0, 1).unwrap().squeeze(2).unwrap();
    let opts = dit::pipeline::SampleOptions::default();
    let err = dit::pipeline::sample_latents_text(
        model,
        &text.narrow(0, 2).unwrap(),
        tr.empty_prompt.as_ref().unwrap(),
        flat,
        &opts,
        &mut NoiseRng::new(0),
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("(N, C, T, H, W)"), "{err}");
}

/// Spacetime patches (Sora): each tube's values land where a Conv3d reads them, and come back
/// from where the unpatchify puts each token's (frame, row, column, channel) outputs.
#[test]
fn spacetime_patches_index_and_round_trip() {
    use dit::model::embed::{patchify_tubes, unpatchify_tubes};
    let (n, c, t, h, w, pt, p) = (2, 3, 4, 6, 4, 2, 2);
    let x = Tensor::arange(0f32, (n * c * t * h * w) as f32, &dev())
        .unwrap()
        .reshape((n, c, t, h, w))
        .unwrap();
    let tubes = patchify_tubes(&x, pt, p).unwrap();
    let (tt, hh, ww) = (t / pt, h / p, w / p);
    assert_eq!(tubes.dims(), [n, tt * hh * ww, c * pt * p * p]);
    let tv = tubes.to_vec3::<f32>().unwrap();
    let xv = |b: usize, ch: usize, f: usize, y: usize, xx: usize| {
        ((((b * c + ch) * t + f) * h + y) * w + xx) as f32
    };
    for (b, clip) in tv.iter().enumerate() {
        for (tok, row) in clip.iter().enumerate() {
            let (ti, hi, wi) = (tok / (hh * ww), tok / ww % hh, tok % ww);
            for (k, &v) in row.iter().enumerate() {
                // Conv3d order: (channel, frame, row, column).
                let (ch, f, y, xx) = (k / (pt * p * p), k / (p * p) % pt, k / p % p, k % p);
                assert_eq!(v, xv(b, ch, ti * pt + f, hi * p + y, wi * p + xx));
            }
        }
    }
    // The output side orders (frame, row, column, channel): reorder the values accordingly and
    // the clip comes back exactly.
    let reordered = tubes
        .reshape((n, tt * hh * ww, c, pt * p * p))
        .unwrap()
        .transpose(2, 3)
        .unwrap()
        .reshape((n, tt * hh * ww, pt * p * p * c))
        .unwrap();
    let back = unpatchify_tubes(&reordered, c, pt, p, (tt, hh, ww)).unwrap();
    assert_eq!(back.dims(), x.dims());
    assert_eq!(common::max_abs_diff(&back, &x), 0.0);
}

/// A class-conditional DiT on spacetime patches against the torch implementation (Conv3d
/// tubes, 3-D sin-cos positions, attention over all of a clip's tokens); the config is read
/// from the tensors; bad frame counts are errors.
#[test]
fn a_spacetime_patch_model_matches_torch() {
    let f = candle_core::safetensors::load(common::fixture("tubes.safetensors"), &dev()).unwrap();
    let weights: Tensors = f
        .iter()
        .filter(|(k, _)| !k.starts_with("in."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut cfg = checkpoint::infer_config(&weights, Some(4)).unwrap();
    let v = cfg.video.expect("a video model");
    assert_eq!((v.tubelet, cfg.temporal_attention()), (Some(2), false));
    assert_eq!(
        (cfg.in_channels, cfg.num_classes, cfg.patch_size),
        (3, 5, 2)
    );
    cfg.num_heads = 2;
    let model = checkpoint::build_model(&cfg, weights, DType::F32, &dev()).unwrap();
    let y = f["in.y"].to_dtype(DType::U32).unwrap();
    let out = model.forward(&f["in.x"], &f["in.t"], &y).unwrap();
    let e = rel_l2(&out, &f["in.out"]);
    assert!(e < 1e-5, "spacetime-patch forward rel L2 {e}");
    // Frames that do not split into tubes.
    let odd = f["in.x"].narrow(2, 0, 3).unwrap();
    assert!(model.forward(&odd, &f["in.t"], &y).is_err());
    let bad = dit::DiTConfig {
        video: Some(VideoConfig {
            frames: 5,
            tubelet: Some(2),
        }),
        ..cfg.clone()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("5 frames"));
}
