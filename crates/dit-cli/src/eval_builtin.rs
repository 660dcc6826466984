//! `dit eval-builtin`: how good are a model's samples of the built-in digits? Generates N images
//! per class and scores them with a classifier trained here (`dit train-classifier`): accuracy on
//! the requested classes, and the Fréchet distance to real held-out digits in the classifier's
//! feature space (FID's formula; lower is better). Real-vs-real distances give the floor.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use dit::eval::classifier::{self, Classifier};
use dit::eval::{frechet_distance, GaussianStats};
use dit::rng::NoiseRng;

use crate::sample::{sample_batched, ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct EvalBuiltinArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Generated samples per class.
    #[arg(long, default_value_t = 100)]
    per_class: usize,
    /// Samples per forward batch (guidance doubles it).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classifier weights from `dit train-classifier` (default: the embedded one).
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Also write a PNG grid: one row per class, 10 samples each.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Also write the metrics as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct TrainClassifierArgs {
    /// Where to write the weights (safetensors, f16).
    #[arg(long, default_value = "weights/mnist-classifier.safetensors")]
    out: PathBuf,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Trains the evaluation classifier on the built-in set minus its held-out tenth.
pub fn train_classifier(a: TrainClassifierArgs, device: &Device) -> Result<()> {
    let data = dit::data::mnist(device)?;
    let bar = indicatif::ProgressBar::new(a.epochs as u64).with_message("training classifier");
    let (model, tensors) = classifier::train(&data, a.epochs, a.seed, |epoch, loss| {
        bar.suspend(|| println!("epoch {}: mean loss {loss:.4}", epoch + 1));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    let (acc, _) = held_out_accuracy(&model, &data)?;
    println!("held-out accuracy: {:.2}%", acc * 100.0);
    let half = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F16)?)))
        .collect::<Result<_>>()?;
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    dit::checkpoint::save_safetensors_atomic(&half, &a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

/// Accuracy on the held-out real digits, and those digits' features.
fn held_out_accuracy(
    model: &Classifier,
    data: &dit::data::LabelledImages,
) -> Result<(f64, Vec<Vec<f32>>)> {
    let idx: Vec<u32> = (0..data.labels.len())
        .filter(|&i| classifier::is_held_out(i))
        .map(|i| i as u32)
        .collect();
    let ids = Tensor::new(idx.as_slice(), data.images.device())?;
    let (pred, feats) = model.predict(&data.images.index_select(&ids, 0)?)?;
    let right = idx
        .iter()
        .zip(&pred)
        .filter(|(&i, &p)| data.labels[i as usize] == p)
        .count();
    Ok((right as f64 / idx.len() as f64, feats))
}

pub fn run(a: EvalBuiltinArgs, device: &Device) -> Result<()> {
    if a.per_class == 0 || a.batch_size == 0 {
        bail!("--per-class and --batch-size must be at least 1");
    }
    let classifier = match &a.classifier {
        Some(p) => Classifier::from_tensors(&dit::checkpoint::read_tensors(p)?, device)
            .with_context(|| format!("cannot load classifier {}", p.display()))?,
        None => dit::builtin::classifier(device)?,
    };
    let (_, model) = a.model.load(device)?;
    let cfg = model.config.clone();
    if (cfg.in_channels, cfg.input_size, cfg.num_classes) != (1, 28, classifier.num_classes) {
        bail!(
            "eval-builtin scores 28x28 single-channel models of {} classes; this one has {} channels, size {}, {} classes",
            classifier.num_classes, cfg.in_channels, cfg.input_size, cfg.num_classes
        );
    }
    let opts = a.sampling.options(&cfg, 50)?;
    let data = dit::data::mnist(device)?;
    let (real_acc, real_feats) = held_out_accuracy(&classifier, &data)?;

    let labels: Vec<usize> = (0..cfg.num_classes)
        .flat_map(|c| std::iter::repeat_n(c, a.per_class))
        .collect();
    let mut rng = NoiseRng::new(a.seed);
    let noise = rng.randn_like(&Tensor::zeros(
        (labels.len(), 1, 28, 28),
        DType::F32,
        device,
    )?)?;
    let started = std::time::Instant::now();
    let images = sample_batched(&model, &labels, &noise, &opts, a.batch_size, &mut rng)?
        .clamp(-1f32, 1f32)?;
    let secs = started.elapsed().as_secs_f64();
    // The chain ends at continuous values; score the 8-bit images a user would see.
    let images = ((((images + 1.0)? * 127.5)?.round()? / 127.5)? - 1.0)?;
    let (pred, gen_feats) = classifier.predict(&images)?;

    let mut per_class = vec![0usize; cfg.num_classes];
    for (&want, &got) in labels.iter().zip(&pred) {
        per_class[want] += usize::from(want == got);
    }
    let accuracy = per_class.iter().sum::<usize>() as f64 / labels.len() as f64;
    let gen_stats = GaussianStats::from_rows(&gen_feats)?;
    let real_stats = GaussianStats::from_rows(&real_feats)?;
    let fd = frechet_distance(&gen_stats, &real_stats)?;
    // Floor: as many real training digits (not held out) against the held-out ones.
    let train_idx: Vec<u32> = (0..data.labels.len())
        .filter(|&i| !classifier::is_held_out(i) && i % 9 == 1)
        .map(|i| i as u32)
        .collect();
    let (_, train_feats) = classifier.predict(
        &data
            .images
            .index_select(&Tensor::new(train_idx.as_slice(), device)?, 0)?,
    )?;
    let fd_real = frechet_distance(&GaussianStats::from_rows(&train_feats)?, &real_stats)?;

    println!(
        "samples: {} ({} per class), {} steps {:?}, guidance {}, {:.1} s",
        labels.len(),
        a.per_class,
        opts.steps,
        opts.sampler,
        opts.cfg_scale,
        secs
    );
    for (c, &right) in per_class.iter().enumerate() {
        println!(
            "  class {c}: {:5.1}% classified as {c}",
            100.0 * right as f64 / a.per_class as f64
        );
    }
    println!(
        "classifier accuracy on generated samples: {:.2}%",
        accuracy * 100.0
    );
    println!(
        "classifier accuracy on held-out real digits: {:.2}%",
        real_acc * 100.0
    );
    println!(
        "Fréchet distance (classifier features), generated vs held-out real: {fd:.3} ({} vs {})",
        gen_feats.len(),
        real_feats.len()
    );
    println!(
        "Fréchet distance, real training digits vs held-out real (floor): {fd_real:.3} ({} vs {})",
        train_feats.len(),
        real_feats.len()
    );
    if let Some(p) = &a.grid {
        let rows: Vec<u32> = (0..cfg.num_classes)
            .flat_map(|c| (0..a.per_class.min(10)).map(move |i| (c * a.per_class + i) as u32))
            .collect();
        let pick = images.index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
        let rgb = dit::image_io::to_rgb_images(&pick)?;
        dit::image_io::save_png(&dit::image_io::make_grid(&rgb, a.per_class.min(10), 2), p)?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &a.json {
        let json = serde_json::json!({
            "samples": labels.len(),
            "steps": opts.steps,
            "sampler": format!("{:?}", opts.sampler),
            "cfg_scale": opts.cfg_scale,
            "accuracy": accuracy,
            "per_class_accuracy": per_class.iter().map(|&r| r as f64 / a.per_class as f64).collect::<Vec<_>>(),
            "real_heldout_accuracy": real_acc,
            "frechet_distance": fd,
            "frechet_distance_real_floor": fd_real,
            "seconds": secs,
        });
        std::fs::write(p, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
