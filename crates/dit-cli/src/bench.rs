//! `dit bench`: images/s of our forward pass (and VAE decode), or training steps/s, for the
//! comparison scripts in bench/.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Args;
use dit::{DiT, DiTConfig};

use crate::sample::DTypeArg;

#[derive(Args)]
pub struct BenchArgs {
    /// Named configs to time.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "DiT-S/2,DiT-B/2,DiT-XL/2"
    )]
    models: Vec<String>,
    #[arg(long, default_value_t = 256)]
    image_size: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Timed iterations after one warm-up.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// Also time the SD VAE decode of one image of this size (random weights).
    #[arg(long)]
    vae: bool,
    /// Time training steps (forward, backward, AdamW, EMA) instead of the forward pass; with
    /// `--dtype bf16`, mixed precision.
    #[arg(long)]
    train: bool,
    /// Time whole guided sampling loops (DDIM, this many steps, guidance 4: each step runs
    /// the model on twice the batch) instead of single forward passes.
    #[arg(long)]
    sample_steps: Option<usize>,
    /// Time FID Inception features (`dit eval`'s network, these weights) of `--batch-size`
    /// uint8 images of `--image-size` instead of a DiT.
    #[arg(long)]
    inception: Option<std::path::PathBuf>,
    /// Patch n' pack: time training steps on a mixed-size set (`--batch-size` latents at a
    /// half, three quarters and all of `--image-size`, in aspect-ratio buckets from 1:4 to
    /// 4:1), packed into sequences of this many tokens against the padded layout (one image
    /// per sequence, as long as the longest), side by side.
    #[arg(long)]
    pack: Option<usize>,
    /// With --pack: also time packed steps with this share of the patches dropped.
    #[arg(long)]
    token_drop: Option<f64>,
}

/// The mixed-size set of `--pack`: `n` latents (1, 4, h, w) whose pixel sizes cycle through
/// three scales of `image_size` and, at each, its aspect-ratio buckets.
fn mixed_sizes(image_size: usize, n: usize, dev: &Device) -> Result<Vec<Tensor>> {
    use dit::data::folder::aspect_buckets;
    let sizes: Vec<(u32, u32)> = [2, 3, 4]
        .iter()
        .flat_map(|&q| aspect_buckets(image_size as u32 * q / 4, 64))
        .collect();
    (0..n)
        .map(|i| {
            // A stride coprime with the list spreads consecutive images over sizes.
            let (w, h) = sizes[(i * 7) % sizes.len()];
            let shape = (1, 4, h as usize / 8, w as usize / 8);
            Ok(Tensor::randn(0f32, 1.0, shape, dev)?)
        })
        .collect()
}

/// Packed against padded training steps/s on [`mixed_sizes`].
fn bench_pack(a: &BenchArgs, seq_len: usize, dev: &Device) -> Result<()> {
    use dit::model::Packing;
    use dit::rng::NoiseRng;
    use dit::train::{reference_init, Conditions, TrainConfig, Trainer};
    let images = mixed_sizes(a.image_size, a.batch_size, dev)?;
    let labels: Vec<usize> = (0..images.len()).map(|i| i * 131 % 1000).collect();
    for name in &a.models {
        let cfg = DiTConfig::named(name, a.image_size)?;
        let p = cfg.patch_size;
        let counts: Vec<usize> = images
            .iter()
            .map(|x| (x.dim(2).unwrap_or(0) / p) * (x.dim(3).unwrap_or(0) / p))
            .collect();
        let init = reference_init(&cfg, &mut NoiseRng::new(0))?;
        let mut tr = Trainer::new(&cfg, init, TrainConfig::default(), 0, dev)?;
        let mut run = |layout: &str, seq: usize, drop: f64, packing: &Packing| -> Result<f64> {
            tr.cfg.token_drop = drop;
            let s = time(dev, a.iters, || {
                tr.step_packed(&images, Conditions::Labels(&labels), seq)?;
                Ok(())
            })?;
            let line = serde_json::json!({
                "what": format!("train_step_{layout}"), "model": name, "images": images.len(),
                "tokens": packing.tokens(), "sequences": packing.sequences(),
                "seq_len": packing.seq_len(), "fill": packing.fill(), "token_drop": drop,
                "seconds": s, "images_per_s": images.len() as f64 / s,
            });
            println!("{line}");
            Ok(s)
        };
        let packed = Packing::greedy(&counts, seq_len)?;
        let padded = Packing::padded(&counts)?;
        let sp = run("packed", seq_len, 0.0, &packed)?;
        let sd = run("padded", 0, 0.0, &padded)?;
        println!(
            "{name}: packed {:.2} images/s ({}), padded {:.2} images/s ({}): packed/padded = {:.2}x",
            images.len() as f64 / sp,
            dit::model::pack::describe(&packed),
            images.len() as f64 / sd,
            dit::model::pack::describe(&padded),
            sd / sp
        );
        if let Some(drop) = a.token_drop {
            let kept: Vec<usize> = counts
                .iter()
                .map(|&c| ((c as f64 * (1.0 - drop)).round() as usize).clamp(1, c))
                .collect();
            let s = run(
                "packed_dropped",
                seq_len,
                drop,
                &Packing::greedy(&kept, seq_len)?,
            )?;
            println!(
                "{name}: packed with {:.0}% of the tokens dropped {:.2} images/s: {:.2}x padded",
                drop * 100.0,
                images.len() as f64 / s,
                sd / s
            );
        }
    }
    Ok(())
}

/// Inception features/s on random uint8 images (resize to 299 included).
fn bench_inception(a: &BenchArgs, weights: &std::path::Path, dev: &Device) -> Result<()> {
    let net = dit::eval::inception::InceptionV3::load(weights, dev)?;
    let (n, s) = (a.batch_size, a.image_size);
    let images = (Tensor::rand(0f32, 255.0, (n, s, s, 3), dev)?).to_dtype(DType::U8)?;
    let secs = time(dev, a.iters, || {
        net.features_u8(&images)?
            .pool
            .sum_all()?
            .to_scalar::<f32>()?;
        Ok(())
    })?;
    println!("{{\"what\": \"inception\", \"size\": {s}, \"batch\": {n}, \"seconds\": {secs:.4}, \"images_per_s\": {:.3}}}", n as f64 / secs);
    Ok(())
}

/// Peak resident memory of this process (VmHWM), in MiB; 0 where /proc is unavailable.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Training steps/s of each model on random latents (N, 4, h, w) and labels.
fn bench_train(a: &BenchArgs, dtype: DType, dev: &Device) -> Result<()> {
    use dit::rng::NoiseRng;
    use dit::train::{reference_init, TrainConfig, Trainer};
    for name in &a.models {
        let cfg = DiTConfig::named(name, a.image_size)?;
        let init = reference_init(&cfg, &mut NoiseRng::new(0))?;
        let tc = TrainConfig {
            compute_dtype: dtype,
            ..Default::default()
        };
        let mut tr = Trainer::new(&cfg, init, tc, 0, dev)?;
        let n = a.batch_size;
        let x = Tensor::randn(0f32, 1.0, (n, 4, cfg.input_size, cfg.input_size), dev)?;
        let labels: Vec<usize> = (0..n).map(|i| i * 131 % 1000).collect();
        let s = time(dev, a.iters, || {
            tr.step(&x, &labels)?;
            Ok(())
        })?;
        // Peak memory of the training steps (before the timing below adds its own).
        let peak = peak_rss_mib();
        // The forward and backward passes alone; the rest of a step is the optimiser and EMA.
        let t: Vec<usize> = (0..n).map(|i| i * 97 % 1000).collect();
        let y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
        let noise = Tensor::randn(0f32, 1.0, x.shape(), dev)?;
        let fb = time(dev, a.iters, || {
            tr.loss(&x, &t, &noise, &y)?.backward()?;
            Ok(())
        })?;
        println!("{{\"what\": \"train_step\", \"model\": \"{name}\", \"batch\": {n}, \"seconds\": {s:.4}, \"forward_backward_seconds\": {fb:.4}, \"steps_per_s\": {:.4}, \"peak_rss_mib\": {peak:.0}}}", 1.0 / s);
    }
    Ok(())
}

/// Mean seconds per call after one warm-up; the device is synchronised around the timed calls
/// (GPU work is asynchronous).
fn time<F: FnMut() -> Result<()>>(dev: &Device, iters: usize, mut f: F) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / iters as f64)
}

/// Builds a module with candle's default random initialisation, as plain tensors: weights that
/// are `Var`s track gradients, which would route the forward pass around the fused kernels.
fn random_weights<M, E>(
    build: impl Fn(VarBuilder) -> std::result::Result<M, E>,
    dtype: DType,
    dev: &Device,
) -> Result<M>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let varmap = candle_nn::VarMap::new();
    build(VarBuilder::from_varmap(&varmap, dtype, dev))?;
    let tensors = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect();
    Ok(build(VarBuilder::from_tensors(tensors, dtype, dev))?)
}

pub fn run(a: BenchArgs, dev: &Device) -> Result<()> {
    let dtype = a.dtype.dtype_on(dev)?;
    if let Some(seq_len) = a.pack {
        return bench_pack(&a, seq_len, dev);
    }
    if a.train {
        return bench_train(&a, dtype, dev);
    }
    if let Some(w) = &a.inception {
        return bench_inception(&a, w, dev);
    }
    for name in &a.models {
        let cfg = DiTConfig::named(name, a.image_size)?;
        // Random weights: timing does not depend on the values.
        let model = random_weights(|vb| DiT::new(&cfg, vb), dtype, dev)?;
        let n = a.batch_size;
        let x = Tensor::randn(0f32, 1.0, (n, 4, cfg.input_size, cfg.input_size), dev)?
            .to_dtype(dtype)?;
        let t = Tensor::from_vec(
            (0..n).map(|i| (i * 97 % 1000) as f32).collect::<Vec<_>>(),
            n,
            dev,
        )?;
        let y = Tensor::from_vec(
            (0..n).map(|i| (i * 131 % 1000) as u32).collect::<Vec<_>>(),
            n,
            dev,
        )?;
        if let Some(steps) = a.sample_steps {
            let labels: Vec<usize> = (0..n).map(|i| i * 131 % 1000).collect();
            let opts = dit::pipeline::SampleOptions {
                steps,
                sampler: dit::diffusion::Sampler::Ddim { eta: 0.0 },
                ..Default::default()
            };
            let mut rng = dit::rng::NoiseRng::new(0);
            let s = time(dev, a.iters, || {
                let noise = x.to_dtype(DType::F32)?;
                dit::pipeline::sample_latents(&model, &labels, noise, &opts, &mut rng, |_| {})?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                Ok(())
            })?;
            println!("{{\"what\": \"sample\", \"model\": \"{name}\", \"batch\": {n}, \"steps\": {steps}, \"dtype\": \"{dtype:?}\", \"seconds\": {s:.4}, \"images_per_s\": {:.3}}}", n as f64 / s);
            continue;
        }
        let s = time(dev, a.iters, || {
            model
                .forward(&x, &t, &y)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            Ok(())
        })?;
        println!("{{\"what\": \"forward\", \"model\": \"{name}\", \"batch\": {n}, \"dtype\": \"{dtype:?}\", \"seconds\": {s:.4}, \"images_per_s\": {:.3}}}", n as f64 / s);
    }
    if a.vae {
        let vae = random_weights(
            |vb| dit::vae::Vae::new(&dit::vae::VaeConfig::sd(), vb),
            dtype,
            dev,
        )?;
        let l = a.image_size / 8;
        let z = Tensor::randn(0f32, 1.0, (1, 4, l, l), dev)?.to_dtype(dtype)?;
        let s = time(dev, a.iters, || {
            vae.decode(&z)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            Ok(())
        })?;
        println!("{{\"what\": \"vae_decode\", \"size\": {}, \"dtype\": \"{dtype:?}\", \"seconds\": {s:.4}, \"images_per_s\": {:.3}}}", a.image_size, 1.0 / s);
    }
    Ok(())
}
