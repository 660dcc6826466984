//! `dit eval-shapes`: does a text model draw what its captions say? Generates images for the
//! built-in shapes' captions (the held-out combinations, never seen in training, and the seen
//! ones) and reads colour, shape, position and background back from the pixels
//! (`dit::data::shapes::analyse`): the share of images where each matches the caption.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use dit::data::shapes::{measure, AttributeAccuracy, Scene};
use dit::model::TextBatch;
use dit::rng::NoiseRng;
use indicatif::{ProgressBar, ProgressStyle};

use crate::sample::{ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct EvalShapesArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Generated images per caption.
    #[arg(long, default_value_t = 4)]
    per_caption: usize,
    /// Only the held-out captions (skip the seen ones).
    #[arg(long)]
    held_out_only: bool,
    /// Images per forward batch (guidance doubles it).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The model's text encoder(s) (default: `$DIT_MINILM`, else ~/.cache/dit/all-MiniLM-L6-v2).
    #[arg(long)]
    text_encoder: Vec<PathBuf>,
    /// Also write a PNG grid of the held-out captions' images (one row per caption, at most 8
    /// rows) and their captions beside it (.txt).
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Also write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: EvalShapesArgs, device: &Device) -> Result<()> {
    if a.per_caption == 0 || a.batch_size == 0 {
        bail!("--per-caption and --batch-size must be at least 1");
    }
    let (_, model) = a.model.load(device)?;
    let cfg = model.config.clone();
    let Some(text) = cfg.text else {
        bail!("eval-shapes scores text-conditioned models (trained with `dit train --builtin shapes`); this one is class-conditional");
    };
    if cfg.in_channels != 3 {
        bail!(
            "eval-shapes scores RGB pixel models; this one takes {} channels",
            cfg.in_channels
        );
    }
    let opts = a.sampling.options(&cfg, 50)?;
    let encoders = crate::text_encoders::load_for(&a.text_encoder, &text, device)?;
    let empty = dit::text::encode_all(&encoders, &[""])?;
    let (held, seen): (Vec<Scene>, Vec<Scene>) =
        Scene::all().into_iter().partition(Scene::held_out);
    let mut groups = vec![("held-out", held)];
    if !a.held_out_only {
        groups.push(("seen", seen));
    }
    let mut rng = NoiseRng::new(a.seed);
    let mut report = serde_json::Map::new();
    for (name, scenes) in &groups {
        let wanted: Vec<Scene> = scenes
            .iter()
            .flat_map(|s| std::iter::repeat_n(*s, a.per_caption))
            .collect();
        let images = generate(&model, &encoders, &empty, &wanted, &opts, &a, &mut rng)?;
        let acc = measure(&images, &wanted)?;
        print_accuracy(name, scenes.len(), a.per_caption, &acc);
        report.insert(name.to_string(), serde_json::to_value(acc)?);
        if let (Some(p), "held-out") = (&a.grid, *name) {
            write_grid(&images, scenes, a.per_caption, p)?;
        }
    }
    println!(
        "({} DDPM-respaced steps {:?}, guidance {}, {}x{} pixels)",
        opts.steps, opts.sampler, opts.cfg_scale, cfg.input_size, cfg.input_size
    );
    if let Some(p) = &a.json {
        report.insert("steps".into(), opts.steps.into());
        report.insert("cfg_scale".into(), opts.cfg_scale.into());
        report.insert("per_caption".into(), a.per_caption.into());
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

/// Images (N, 3, S, S) in [-1, 1], rounded to 8 bits as a user would see them, for the scenes'
/// captions, in batches.
fn generate(
    model: &dit::DiT,
    encoders: &[dit::text::TextEncoder],
    empty: &TextBatch,
    wanted: &[Scene],
    opts: &dit::pipeline::SampleOptions,
    a: &EvalShapesArgs,
    rng: &mut NoiseRng,
) -> Result<Tensor> {
    let s = model.config.input_size;
    let batches = wanted.len().div_ceil(a.batch_size);
    let bar =
        ProgressBar::new((batches * opts.steps) as u64).with_style(ProgressStyle::with_template(
            "sampling [{bar:40}] {pos}/{len} steps {elapsed_precise} eta {eta}",
        )?);
    let mut out = Vec::with_capacity(batches);
    for (b, chunk) in wanted.chunks(a.batch_size).enumerate() {
        let captions: Vec<String> = chunk.iter().map(Scene::caption).collect();
        let prompts: Vec<&str> = captions.iter().map(String::as_str).collect();
        let text = dit::text::encode_all(encoders, &prompts)?;
        let noise = rng.randn_like(&Tensor::zeros(
            (chunk.len(), 3, s, s),
            DType::F32,
            model.device(),
        )?)?;
        let x = dit::pipeline::sample_latents_text(model, &text, empty, noise, opts, rng, |i| {
            bar.set_position((b * opts.steps + i + 1) as u64)
        })?;
        out.push(x.clamp(-1f32, 1f32)?);
    }
    bar.finish_and_clear();
    let x = Tensor::cat(&out, 0)?;
    Ok(((((x + 1.0)? * 127.5)?.round()? / 127.5)? - 1.0)?)
}

fn print_accuracy(name: &str, captions: usize, per: usize, acc: &AttributeAccuracy) {
    let pct = |v: f64| format!("{:5.1}%", v * 100.0);
    println!(
        "{name:>8} captions ({captions} x {per} images): colour {}  shape {}  position {}  background {}  all four {}",
        pct(acc.colour),
        pct(acc.shape),
        pct(acc.position),
        pct(acc.background),
        pct(acc.all)
    );
}

fn write_grid(images: &Tensor, scenes: &[Scene], per: usize, path: &std::path::Path) -> Result<()> {
    let rows = scenes.len().min(8);
    let cols = per.min(8);
    let pick: Vec<u32> = (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (r * per + c) as u32))
        .collect();
    let pick = images.index_select(&Tensor::new(pick.as_slice(), images.device())?, 0)?;
    let rgb = dit::image_io::to_rgb_images(&pick)?;
    dit::image_io::save_png(&dit::image_io::make_grid(&rgb, cols, 2), path)?;
    let captions: Vec<String> = scenes[..rows].iter().map(Scene::caption).collect();
    std::fs::write(path.with_extension("txt"), captions.join("\n") + "\n")?;
    println!("wrote {}", path.display());
    Ok(())
}
