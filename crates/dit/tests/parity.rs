//! Parity with the independent torch implementation (tools/make_fixtures.py, cross-checked there
//! against diffusers): forward pass, guidance, one DDPM step, DDIM sampling, respacing, the VAE.

mod common;

use common::{abs_max, abs_sum, fixture};
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use dit::checkpoint;
use dit::diffusion::{GaussianDiffusion, Sampler};
use dit::model::GuidedChannels;
use dit::pipeline::{sample_latents, SampleOptions};
use dit::rng::NoiseRng;

/// The device under test: `DIT_TEST_DEVICE` (cpu, cuda, cuda:N), the CPU by default. The same
/// fixtures and tolerances hold on every device.
fn dev() -> Device {
    dit::device::parse(&std::env::var("DIT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())).unwrap()
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &dev()).unwrap()
}

/// Relative L2 error ||a - b|| / ||b||.
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (
        a.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
    let sq_sum = |t: Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (sq_sum((&a - &b).unwrap()) / sq_sum(b)).sqrt()
}

fn labels(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

fn check_model(name: &str, heads: usize, steps: usize) {
    let f = load(&format!("{name}.safetensors"));
    // The config is inferred from the checkpoint, except the number of heads, which a state dict
    // does not record (these widths are not the paper's).
    let tensors = checkpoint::read_tensors(&fixture(&format!("{name}.pt"))).unwrap();
    let mut cfg = checkpoint::infer_config(&tensors, None).unwrap();
    cfg.num_heads = heads;
    let model = checkpoint::build_model(&cfg, tensors, DType::F32, &dev()).unwrap();
    let y = f["y"].to_dtype(DType::U32).unwrap();
    let out = model.forward(&f["x"], &f["t"], &y).unwrap();
    let e = rel_l2(&out, &f["out"]);
    assert!(e < 1e-5, "{name} forward rel L2 {e}");
    for (key, ch) in [
        ("out_cfg4", GuidedChannels::Reference),
        ("out_cfg4_all", GuidedChannels::All),
    ] {
        let g = model
            .forward_with_cfg(&f["x"], &f["t"], &y, 4.0, ch)
            .unwrap();
        let e = rel_l2(&g, &f[key]);
        assert!(e < 1e-5, "{name} {key} rel L2 {e}");
    }
    // The two guidance forms really differ (the test above would not notice a swap otherwise).
    assert!(rel_l2(&f["out_cfg4"], &f["out_cfg4_all"]) > 1e-3);

    // One step of the 250-step DDPM chain at respaced step 100: mean and log variance.
    let d = GaussianDiffusion::dit("250").unwrap();
    let ts = vec![100; 3];
    let t_model = d.model_timesteps(&ts, &dev()).unwrap();
    let mo = model.forward(&f["x"], &t_model, &y).unwrap();
    assert!(rel_l2(&mo, &f["ddpm_out"]) < 1e-5);
    let mv = d.p_mean_variance(&f["ddpm_out"], &f["x"], &ts).unwrap();
    for (got, key) in [
        (&mv.mean, "ddpm_mean"),
        (&mv.log_variance, "ddpm_logvar"),
        (&mv.pred_xstart, "ddpm_x0"),
    ] {
        let e = rel_l2(got, &f[key]);
        assert!(e < 1e-6, "{name} {key} rel L2 {e}");
    }

    // DDIM sampling from the same noise, guidance 1 and 4: the done-when criterion (< 1e-4).
    for scale in [1.0, 4.0] {
        let x = ddim_from_fixture_noise(&model, &f, steps, scale);
        let key = format!("ddim{steps}_cfg{}", scale as i32);
        let e = rel_l2(&x, &f[&key]);
        assert!(e < 1e-4, "{name} {key} rel L2 {e}");
    }
}

/// Deterministic DDIM (eta 0) from the fixture's noise and labels, guided as the reference.
fn ddim_from_fixture_noise(
    model: &dit::DiT,
    f: &HashMap<String, Tensor>,
    steps: usize,
    cfg_scale: f64,
) -> Tensor {
    let opts = SampleOptions {
        steps,
        sampler: Sampler::Ddim { eta: 0.0 },
        cfg_scale,
        cfg_channels: GuidedChannels::Reference,
        clip_denoised: false,
        motion_scale: None,
    };
    let labels = labels(&f["labels"]);
    sample_latents(
        model,
        &labels,
        f["noise"].clone(),
        &opts,
        &mut NoiseRng::new(0),
        |_| {},
    )
    .unwrap()
}

#[test]
fn thousand_class_256px_model_bare_state_dict() {
    check_model("dit_c1000_256", 4, 10);
}

#[test]
fn ten_class_128px_model_trainpy_checkpoint_uses_ema() {
    check_model("dit_c10_128", 6, 25);
}

#[test]
fn bf16_forward_and_sampling_stay_close_to_f32() {
    if dev().is_cpu() && !dit::gemm_bf16::available() {
        eprintln!("skipped: no AVX512-BF16 on this CPU");
        return;
    }
    let f = load("dit_c1000_256.safetensors");
    let tensors = checkpoint::read_tensors(&fixture("dit_c1000_256.pt")).unwrap();
    let mut cfg = checkpoint::infer_config(&tensors, None).unwrap();
    cfg.num_heads = 4;
    let model = checkpoint::build_model(&cfg, tensors, DType::BF16, &dev()).unwrap();
    let y = f["y"].to_dtype(DType::U32).unwrap();
    let out = model.forward(&f["x"], &f["t"], &y).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    let e = rel_l2(&out, &f["out"]);
    // bf16 keeps 8 bits of mantissa: ~0.4% per rounding; a wrong kernel is off by O(1).
    eprintln!("bf16 forward rel L2 vs f32 reference: {e:.2e}");
    assert!(e < 2e-2, "bf16 forward rel L2 {e}");
    let x = ddim_from_fixture_noise(&model, &f, 10, 4.0);
    let e = rel_l2(&x, &f["ddim10_cfg4"]);
    eprintln!("bf16 10-step DDIM latents rel L2 vs f32 reference: {e:.2e}");
    assert!(e < 2e-2, "bf16 DDIM rel L2 {e}");
}

/// The paper's other block designs (§3.2, Figure 3) against the torch implementation of
/// tools/make_fixtures.py, each inferred from its tensor names, and each validated against its
/// own tensor list (a design's weights do not load as another design).
#[test]
fn block_designs_match_torch() {
    use dit::config::BlockDesign;
    let f = load("block_designs.safetensors");
    let y = f["y"].to_dtype(DType::U32).unwrap();
    for (name, design) in [
        ("adaln", BlockDesign::AdaLn),
        ("cross-attention", BlockDesign::CrossAttention),
        ("in-context", BlockDesign::InContext),
    ] {
        let prefix = format!("{name}/");
        let tensors: checkpoint::Tensors = f
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v.clone())))
            .filter(|(k, _)| k != "out")
            .collect();
        let mut cfg = checkpoint::infer_config(&tensors, None).unwrap();
        assert_eq!(cfg.block, design, "{name} inferred from its tensors");
        cfg.num_heads = 4;
        let other = dit::DiTConfig {
            block: BlockDesign::AdaLnZero,
            ..cfg.clone()
        };
        assert!(checkpoint::validate(&other, &tensors).is_err(), "{name}");
        let model = checkpoint::build_model(&cfg, tensors, DType::F32, &dev()).unwrap();
        let out = model.forward(&f["x"], &f["t"], &y).unwrap();
        let e = rel_l2(&out, &f[&format!("{name}/out")]);
        assert!(e < 1e-5, "{name} forward rel L2 {e}");
    }
}

/// A text-model fixture's weights (all but its `in.*` inputs) and the config inferred from them.
fn weights_and_config(
    f: &std::collections::HashMap<String, Tensor>,
) -> (checkpoint::Tensors, dit::DiTConfig) {
    let tensors: checkpoint::Tensors = f
        .iter()
        .filter(|(k, _)| !k.starts_with("in."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let cfg = checkpoint::infer_config(&tensors, None).unwrap();
    (tensors, cfg)
}

/// GenTron's two text encoders alternating over the blocks (blocks 0 and 2 read the first
/// encoder's tokens, block 1 the second's, of another width) against the torch implementation:
/// the second width inferred from the tensors, the forward pass with both prompts padded, each
/// mask honoured, and each encoder's tokens reaching the output.
#[test]
fn gentron_with_two_alternating_encoders_matches_torch() {
    use dit::model::TextTokens;
    let f = load("gentron_pair.safetensors");
    let inp = |k: &str| f[&format!("in.{k}")].clone();
    let (tensors, mut cfg) = weights_and_config(&f);
    let tc = cfg.text.expect("a text model");
    assert_eq!(
        (tc.context_dim, tc.second_context_dim, tc.pooled_dim),
        (48, Some(24), 48)
    );
    assert_eq!(
        (
            tc.context_dim_of(0),
            tc.context_dim_of(1),
            tc.context_dim_of(2)
        ),
        (48, 24, 48)
    );
    cfg.num_heads = 2;
    let model = checkpoint::build_model(&cfg, tensors, DType::F32, &dev()).unwrap();
    let (x, t, pooled) = (inp("x"), inp("t"), inp("pooled"));
    let (m0, m1) = (inp("mask0"), inp("mask1"));
    let run = |a: &Tensor, b: &Tensor| {
        let sets = [
            TextTokens {
                tokens: a,
                mask: Some(&m0),
            },
            TextTokens {
                tokens: b,
                mask: Some(&m1),
            },
        ];
        model.forward_text(&x, &t, &sets, &pooled).unwrap()
    };
    let out = run(&inp("text0"), &inp("text1"));
    let e = rel_l2(&out, &inp("out"));
    assert!(e < 1e-5, "two-encoder GenTron forward rel L2 {e}");
    // Garbage under either mask changes nothing; each encoder's real tokens matter.
    let regarble = |text: &Tensor, mask: &Tensor| {
        let keep = mask.unsqueeze(2).unwrap();
        let noise = Tensor::randn(0f32, 30.0, text.shape(), &dev()).unwrap();
        (text.broadcast_mul(&keep).unwrap() + noise.broadcast_mul(&(1.0 - &keep).unwrap()).unwrap())
            .unwrap()
    };
    assert!(
        rel_l2(
            &run(&regarble(&inp("text0"), &m0), &regarble(&inp("text1"), &m1)),
            &out
        ) < 1e-6
    );
    assert!(rel_l2(&run(&inp("text0"), &inp("text1").neg().unwrap()), &out) > 1e-3);
    assert!(rel_l2(&run(&inp("text0").neg().unwrap(), &inp("text1")), &out) > 1e-3);
    // One token set for a two-encoder model is an error, not a silent reuse.
    let one = [TextTokens {
        tokens: &inp("text0"),
        mask: Some(&m0),
    }];
    assert!(model.forward_text(&x, &t, &one, &pooled).is_err());
}

/// GenTron's text conditioning against the torch implementation of tools/make_fixtures.py: the
/// config inferred from the tensors, the forward pass with a padded prompt, the mask hiding the
/// padding, and a new text model starting as the identity in every block.
#[test]
fn gentron_text_model_matches_torch_and_honours_the_mask() {
    use dit::model::TextTokens;
    let f = load("gentron.safetensors");
    let inp = |k: &str| f[&format!("in.{k}")].clone();
    let (tensors, mut cfg) = weights_and_config(&f);
    let text_cfg = cfg.text.expect("recognised as a text model");
    assert_eq!((text_cfg.context_dim, text_cfg.pooled_dim), (48, 40));
    assert_eq!(cfg.num_classes, 0);
    cfg.num_heads = 4;
    let model = checkpoint::build_model(&cfg, tensors, DType::F32, &dev()).unwrap();
    let (x, t, pooled, mask) = (inp("x"), inp("t"), inp("pooled"), inp("mask"));
    let run = |text: &Tensor, mask: Option<&Tensor>| {
        let tokens = TextTokens { tokens: text, mask };
        model.forward_text(&x, &t, &[tokens], &pooled).unwrap()
    };
    let out = run(&inp("text"), Some(&mask));
    let e = rel_l2(&out, &inp("out"));
    assert!(e < 1e-5, "GenTron forward rel L2 {e}");
    // Other garbage under the mask changes nothing; unmasked, the garbage shows.
    let keep = mask.unsqueeze(2).unwrap();
    let noise = Tensor::randn(0f32, 30.0, inp("text").shape(), &dev()).unwrap();
    let text2 = (inp("text").broadcast_mul(&keep).unwrap()
        + noise.broadcast_mul(&(1.0 - &keep).unwrap()).unwrap())
    .unwrap();
    let e = rel_l2(&run(&text2, Some(&mask)), &out);
    assert!(e < 1e-6, "padding leaked through the mask: {e}");
    assert!(rel_l2(&run(&inp("text"), None), &out) > 1e-3);
    // A class model's entry point refuses a text model.
    let y = Tensor::new(&[0u32, 0], &dev()).unwrap();
    assert!(model.forward(&x, &t, &y).is_err());
    // Guidance in one batched pass equals uncond + s (cond - uncond) from two separate passes,
    // the empty prompt (one row, first token real) broadcast over the batch.
    let text = dit::model::TextBatch {
        tokens: inp("text"),
        mask: mask.clone(),
        pooled: pooled.clone(),
        second: None,
    };
    let mut empty_mask = vec![0f32; 7];
    empty_mask[0] = 1.0;
    let empty = dit::model::TextBatch {
        tokens: Tensor::randn(0f32, 1.0, (1, 7, 48), &dev()).unwrap(),
        mask: Tensor::from_vec(empty_mask, (1, 7), &dev()).unwrap(),
        pooled: Tensor::randn(0f32, 1.0, (1, 40), &dev()).unwrap(),
        second: None,
    };
    let guided = model
        .forward_text_with_cfg(&x, &t, &text, &empty, 4.0, GuidedChannels::All)
        .unwrap();
    let b = |e: &Tensor| e.repeat(2).unwrap();
    let tokens = b(&empty.tokens);
    let uncond_in = TextTokens {
        tokens: &tokens,
        mask: Some(&b(&empty.mask)),
    };
    let uncond = model
        .forward_text(&x, &t, &[uncond_in], &b(&empty.pooled))
        .unwrap();
    let want = (&uncond + ((&out - &uncond).unwrap() * 4.0).unwrap()).unwrap();
    let e = rel_l2(
        &guided.narrow(1, 0, 4).unwrap(),
        &want.narrow(1, 0, 4).unwrap(),
    );
    assert!(e < 1e-5, "batched text guidance vs two passes: {e}");
    // Sampling from prompts: deterministic DDIM, different prompts give different latents.
    let opts = dit::pipeline::SampleOptions {
        steps: 3,
        sampler: dit::diffusion::Sampler::Ddim { eta: 0.0 },
        ..Default::default()
    };
    let sample = |text: &dit::model::TextBatch| {
        let mut rng = dit::rng::NoiseRng::new(0);
        dit::pipeline::sample_latents_text(&model, text, &empty, x.clone(), &opts, &mut rng, |_| {})
            .unwrap()
    };
    let (s1, s1b) = (sample(&text), sample(&text));
    assert_eq!(rel_l2(&s1, &s1b), 0.0);
    let swapped = dit::model::TextBatch {
        tokens: inp("text").flip(&[0]).unwrap(),
        mask: mask.flip(&[0]).unwrap(),
        pooled: pooled.flip(&[0]).unwrap(),
        second: None,
    };
    assert!(rel_l2(&sample(&swapped), &s1) > 1e-3);

    // At initialisation every block is the identity (zero adaLN gates, zero cross-attention
    // output): with a non-zero final linear, the text makes no difference yet.
    let mut init = dit::train::reference_init(&cfg, &mut dit::rng::NoiseRng::new(0)).unwrap();
    let fl = init["final_layer.linear.weight"].clone();
    init.insert(
        "final_layer.linear.weight".into(),
        (fl.ones_like().unwrap() * 0.1).unwrap(),
    );
    let fresh = checkpoint::build_model(&cfg, init, DType::F32, &dev()).unwrap();
    let run = |text: &Tensor| {
        let tokens = TextTokens {
            tokens: text,
            mask: Some(&mask),
        };
        fresh.forward_text(&x, &t, &[tokens], &pooled).unwrap()
    };
    let (a, b) = (run(&inp("text")), run(&text2.neg().unwrap()));
    assert!(rel_l2(&a, &b) < 1e-7 && abs_sum(&a) > 0.0);
}

#[test]
fn respacing_visits_the_reference_timesteps() {
    let f = load("respacing.safetensors");
    for s in [250, 50, 27] {
        let d = GaussianDiffusion::dit(&s.to_string()).unwrap();
        let want: Vec<usize> = labels(&f[&format!("map{s}")]);
        assert_eq!(d.timestep_map, want, "{s} steps");
        let betas = f[&format!("betas{s}")].to_vec1::<f64>().unwrap();
        for (a, b) in d.betas.iter().zip(&betas) {
            assert!((a - b).abs() < 1e-12 * b.abs().max(1e-3));
        }
    }
}

#[test]
fn vae_decode_and_encode_match_diffusers() {
    let io = load("tiny_vae_io.safetensors");
    let weights = dit::vae::resolve_weights(fixture("tiny_vae_folder").to_str().unwrap()).unwrap();
    let cfg = dit::vae::VaeConfig::beside(&weights).unwrap();
    assert_eq!(
        (cfg.block_out_channels.as_slice(), cfg.layers_per_block),
        ([32, 64].as_slice(), 1)
    );
    let vae = dit::vae::Vae::load(&weights, &cfg, DType::F32, &dev()).unwrap();
    // A batch of 2: candle-transformers' VAE got this wrong (see vae.rs).
    let img = vae.decode(&io["latents"]).unwrap();
    let e = rel_l2(&img, &io["decoded"]);
    assert!(e < 1e-5, "decode rel L2 {e}");
    let mean = vae.encode_mean(&io["image"]).unwrap();
    let e = rel_l2(
        &mean,
        &(&io["encoded_mean"] * dit::vae::LATENT_SCALE).unwrap(),
    );
    assert!(e < 1e-5, "encode rel L2 {e}");
    // A sample is the mean plus noise of the predicted scale: seeded, so reproducible.
    let a = vae.encode(&io["image"], &mut NoiseRng::new(3)).unwrap();
    let b = vae.encode(&io["image"], &mut NoiseRng::new(3)).unwrap();
    assert_eq!(rel_l2(&a, &b), 0.0);
    assert!(rel_l2(&a, &mean) > 1e-4);
}

#[test]
fn hybrid_training_loss_matches_the_reference_terms() {
    let f = load("losses.safetensors");
    let d = GaussianDiffusion::dit("").unwrap();
    let ts = labels(&f["t"]);
    // q_sample as the reference.
    let xt = d.q_sample(&f["x0"], &ts, &f["noise"]).unwrap();
    assert!(rel_l2(&xt, &f["x_t"]) < 1e-6);
    let terms = d
        .training_losses(&f["model_out"], &f["x0"], &f["x_t"], &f["noise"], &ts)
        .unwrap();
    for (got, key) in [
        (&terms.mse, "mse"),
        (terms.vb.as_ref().unwrap(), "vb"),
        (&terms.loss, "loss"),
    ] {
        let e = rel_l2(got, &f[key]);
        assert!(e < 1e-5, "{key} rel L2 {e}: {got} vs {}", f[key]);
    }
    // The t = 0 sample takes the decoder NLL branch, the others the KL: both are exercised.
    assert_eq!(ts[0], 0);

    // Stop-gradient: the VB term reaches the variance channels only.
    let out = candle_core::Var::from_tensor(&f["model_out"]).unwrap();
    let terms = d
        .training_losses(out.as_tensor(), &f["x0"], &f["x_t"], &f["noise"], &ts)
        .unwrap();
    let grads = terms.vb.unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(out.as_tensor()).unwrap();
    assert_eq!(
        abs_sum(&g.narrow(1, 0, 4).unwrap()),
        0.0,
        "VB gradient leaked into eps"
    );
    assert!(
        abs_sum(&g.narrow(1, 4, 4).unwrap()) > 0.0,
        "no VB gradient on the variance"
    );
}

#[test]
fn builtin_mnist_holds_the_source_digits() {
    let digits = dit::data::mnist_u8().unwrap();
    assert_eq!(digits.len(), 10_000);
    // First and last digit of each class, written from the package's JSON by tools/build_mnist.py.
    let want = Tensor::read_npy(fixture("mnist_first_last.npy")).unwrap();
    assert_eq!(want.dims(), [10, 2, 28, 28]);
    let want = want.to_dtype(DType::U32).unwrap().flatten_from(2).unwrap();
    for label in 0..10 {
        let of_class: Vec<&Vec<u8>> = digits
            .iter()
            .filter(|(l, _)| *l == label)
            .map(|(_, d)| d)
            .collect();
        assert!(of_class.len() > 800, "class {label}: {}", of_class.len());
        for (k, d) in [of_class[0], of_class[of_class.len() - 1]]
            .into_iter()
            .enumerate()
        {
            let w: Vec<u8> = want
                .get(label)
                .unwrap()
                .get(k)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
                .iter()
                .map(|&v| v as u8)
                .collect();
            assert_eq!(d, &w, "class {label} digit {k}");
        }
    }
    let set = dit::data::mnist(&dev()).unwrap();
    assert_eq!(set.images.dims(), [10_000, 1, 28, 28]);
    let (lo, hi) = (
        set.images.min_all().unwrap().to_scalar::<f32>().unwrap(),
        set.images.max_all().unwrap().to_scalar::<f32>().unwrap(),
    );
    assert_eq!((lo, hi), (-1.0, 1.0));
}

#[test]
fn clip_denoised_clamps_x0_before_the_posterior() {
    let f = load("dit_c1000_256.safetensors");
    let mut d = GaussianDiffusion::dit("250").unwrap();
    d.clip_denoised = true;
    let ts = vec![100; 3];
    let mv = d.p_mean_variance(&f["ddpm_out"], &f["x"], &ts).unwrap();
    let clamped = f["ddpm_x0"].clamp(-1f32, 1f32).unwrap();
    // The unclipped x0 of this fixture leaves [-1, 1], so the clamp is exercised.
    assert!(abs_max(&f["ddpm_x0"]) > 1.0);
    assert!(rel_l2(&mv.pred_xstart, &clamped) < 1e-6);
    let (mean, _, _) = d.q_posterior(&clamped, &f["x"], &ts).unwrap();
    assert!(rel_l2(&mv.mean, &mean) < 1e-6);
}

#[test]
fn training_gradients_match_torch_autograd() {
    check_training_gradients(DType::F32, 1e-5, 1e-4);
}

#[test]
fn mixed_precision_gradients_stay_close_to_torch_f32() {
    // bf16 autocast (GPU only): the same loss and gradients within bf16's precision, and the
    // gradients arrive in f32 on the f32 variables.
    if dev().is_cpu() {
        let f = load("grads.safetensors");
        let cfg = dit::train::TrainConfig {
            compute_dtype: DType::BF16,
            ..Default::default()
        };
        let weights: checkpoint::Tensors = f
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("weight.")?.to_string(), v.clone())))
            .collect();
        let model = checkpoint::infer_config(&weights, Some(8)).unwrap();
        let err = dit::train::Trainer::new(&model, weights, cfg, 0, &dev())
            .err()
            .expect("bf16 training is refused on the CPU");
        assert!(err.to_string().contains("GPU"), "{err}");
        return;
    }
    check_training_gradients(DType::BF16, 2e-2, 5e-2);
}

/// A tiny DiT (random non-zero weights, so every parameter gets a gradient), the hybrid loss
/// averaged over a batch with a dropped label, differentiated by torch (f32) and by us computing
/// in `dtype`; loss and gradients within the given relative tolerances.
fn check_training_gradients(dtype: DType, loss_tol: f32, grad_tol: f64) {
    let f = load("grads.safetensors");
    let weights: checkpoint::Tensors = f
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("weight.")?.to_string(), v.clone())))
        .collect();
    let cfg = checkpoint::infer_config(&weights, Some(8)).unwrap();
    let cfg = dit::DiTConfig {
        num_heads: 2,
        ..cfg
    };
    let tc = dit::train::TrainConfig {
        compute_dtype: dtype,
        ..Default::default()
    };
    let tr = dit::train::Trainer::new(&cfg, weights, tc, 0, &dev()).unwrap();
    let ts = labels(&f["t"]);
    let y: Vec<u32> = labels(&f["y"]).iter().map(|&l| l as u32).collect();
    let loss = tr.loss(&f["x0"], &ts, &f["noise"], &y).unwrap();
    let want = f["loss"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got - want).abs() < loss_tol * want.abs(),
        "{dtype:?}: loss {got} vs {want}"
    );
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (name, var) in &tr.params {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dtype(), DType::F32, "gradient of {name}");
        let e = rel_l2(g, &f[&format!("grad.{name}")]);
        assert!(e < grad_tol, "{dtype:?}: gradient of {name}: rel L2 {e}");
        checked += 1;
    }
    assert_eq!(checked, f.keys().filter(|k| k.starts_with("grad.")).count());
}

#[test]
fn dpm_solver_pp_matches_diffusers() {
    // diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2) on the 12-step respaced
    // schedule, with the analytic model eps(x, t) = 0.3 x + 0.05 t / 12 (t the respaced index).
    let f = load("dpm_solver.safetensors");
    let d = GaussianDiffusion::dit("12").unwrap();
    let mut t = 12;
    let x0 = dit::diffusion::sample_loop(
        &d,
        |x: &Tensor, _ts: &Tensor| {
            t -= 1;
            let eps = ((x * 0.3)? + 0.05 * t as f64 / 12.0)?;
            Tensor::cat(&[&eps, &eps.zeros_like()?], 1)
        },
        f["x_t"].clone(),
        Sampler::DpmSolverPp,
        &mut NoiseRng::new(0),
        |_| {},
    )
    .unwrap();
    let e = rel_l2(&x0, &f["x_0"]);
    assert!(e < 1e-5, "rel L2 {e}");
}

#[test]
fn cosine_schedule_and_v_target_match_diffusers() {
    use dit::diffusion::{cosine_betas, Prediction, Schedule};
    let f = load("targets.safetensors");
    let want = f["cosine_betas"].to_vec1::<f64>().unwrap();
    let got = cosine_betas(1000);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-9 + 1e-6 * w, "beta {i}: {g} vs {w}");
    }
    let d = GaussianDiffusion::for_model(Schedule::Cosine, Prediction::V, "").unwrap();
    let ts = labels(&f["t"]);
    let v = d.training_target(&f["x0"], &f["noise"], &ts).unwrap();
    assert!(rel_l2(&v, &f["v"]) < 1e-5);
}

#[test]
fn cuda_kernels_match_candle_ops_and_their_gradients() {
    // The fused CUDA kernels (ops routes GPU tensors to them) against candle's generic ops, in
    // value and in the gradient of every input. Runs where DIT_TEST_DEVICE is a GPU.
    let dev = dev();
    if dev.is_cpu() {
        eprintln!("skipped: DIT_TEST_DEVICE is the CPU");
        return;
    }
    use candle_core::Var;
    use dit::ops;
    let (n, t, d, heads) = (2, 24, 64, 4);
    let var = |shape: &[usize]| {
        Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
    };
    let (x, h, qkv) = (var(&[n, t, d]), var(&[n, t, d]), var(&[n, t, 3 * d]));
    let (shift, scale, gate) = (var(&[n, d]), var(&[n, d]), var(&[n, d]));
    let (x2, w, b) = (var(&[n * t, d]), var(&[2 * d, d]), var(&[2 * d]));
    type Case<'a> = (&'a str, Vec<&'a Var>, Box<dyn Fn(bool) -> Tensor + 'a>);
    let cases: Vec<Case> = vec![
        (
            "modulated_layer_norm",
            vec![&x, &shift, &scale],
            Box::new(|fused| {
                let f = if fused {
                    ops::modulated_layer_norm
                } else {
                    ops::modulated_layer_norm_unfused
                };
                f(&x, &shift, &scale).unwrap()
            }),
        ),
        (
            "gated_residual",
            vec![&x, &gate, &h],
            Box::new(|fused| {
                let f = if fused {
                    ops::gated_residual
                } else {
                    ops::gated_residual_unfused
                };
                f(&x, &gate, &h).unwrap()
            }),
        ),
        (
            "self_attention",
            vec![&qkv],
            Box::new(|fused| {
                let f = if fused {
                    ops::self_attention
                } else {
                    ops::self_attention_unfused
                };
                f(&qkv, heads).unwrap()
            }),
        ),
        (
            "gelu_tanh",
            vec![&h],
            Box::new(|fused| {
                if fused {
                    ops::gelu_tanh(&h).unwrap()
                } else {
                    h.gelu().unwrap()
                }
            }),
        ),
        (
            "linear",
            vec![&x2, &w, &b],
            Box::new(|fused| {
                if fused {
                    ops::linear(&x2, &w, &b).unwrap()
                } else {
                    x2.matmul(&w.t().unwrap())
                        .unwrap()
                        .broadcast_add(&b)
                        .unwrap()
                }
            }),
        ),
    ];
    for (name, inputs, f) in cases {
        let (fused, plain) = (f(true), f(false));
        let e = rel_l2(&fused, &plain);
        assert!(e < 1e-5, "{name}: rel L2 {e}");
        let r = Tensor::randn(0f32, 1.0, fused.shape(), &dev).unwrap();
        let gf = (&fused * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (&plain * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (a, b) = (
                gf.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            );
            let e = rel_l2(a, b);
            assert!(e < 1e-4, "{name}: gradient of input {i}: rel L2 {e}");
        }
    }
}

#[test]
fn fused_adamw_and_ema_follow_the_formulas() {
    // The fused optimiser passes (CPU loops, or CUDA kernels under DIT_TEST_DEVICE=cuda)
    // against torch.optim.AdamW's update written out in f32, element by element.
    let dev = dev();
    use dit::ops::{adamw, ema, AdamWStep};
    let r = || Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap();
    let (theta, g, m, v) = (r(), r(), r(), r().sqr().unwrap());
    let h = AdamWStep {
        lr: 1e-2,
        b1: 0.9,
        b2: 0.999,
        eps: 1e-8,
        wd: 0.1,
        c1: 1.0 - 0.9f32.powi(3),
        c2: 1.0 - 0.999f32.powi(3),
    };
    let (t2, m2, v2) = adamw(&theta, &g, &m, &v, h).unwrap().expect("f32 applies");
    let e2 = ema(&theta, &g, 0.99).unwrap().expect("f32 applies");
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (th, gv, mv, vv) = (flat(&theta), flat(&g), flat(&m), flat(&v));
    let (t2, m2, v2, e2) = (flat(&t2), flat(&m2), flat(&v2), flat(&e2));
    for i in 0..th.len() {
        let mi = 0.9 * mv[i] + 0.1 * gv[i];
        let vi = 0.999 * vv[i] + 0.001 * gv[i] * gv[i];
        let ti = th[i] * (1.0 - h.lr * h.wd) - h.lr * (mi / h.c1) / ((vi / h.c2).sqrt() + h.eps);
        let ei = 0.99 * th[i] + 0.01 * gv[i];
        for (got, want, what) in [
            (m2[i], mi, "m"),
            (v2[i], vi, "v"),
            (t2[i], ti, "theta"),
            (e2[i], ei, "ema"),
        ] {
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{what}[{i}]: {got} vs {want}"
            );
        }
    }
}
