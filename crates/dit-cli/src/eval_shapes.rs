//! `dit eval-shapes` and `dit eval-motion`: does a text model draw what its captions say?
//! Generates for the built-in captions (the held-out combinations, never seen in training, and
//! the seen ones) and reads the attributes back from the pixels: colour, shape, position and
//! background of a still (`dit::data::shapes`), or colour, shape, background and direction of
//! travel of a clip (`dit::data::moving_shapes`), with and without motion-free guidance.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use dit::data::moving_shapes::{self, Motion};
use dit::data::shapes::{self, Scene};
use dit::model::TextBatch;
use dit::pipeline::SampleOptions;
use dit::rng::NoiseRng;
use dit::text::TextEncoder;
use indicatif::{ProgressBar, ProgressStyle};

use crate::sample::{ModelArgs, SamplingArgs};

/// What both commands take.
#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Generated images (clips) per caption.
    #[arg(long, default_value_t = 4)]
    per_caption: usize,
    /// Only the held-out captions (skip the seen ones).
    #[arg(long)]
    held_out_only: bool,
    /// Samples per forward batch (guidance doubles it; motion-free guidance triples it).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The model's text encoder(s) (default: `$DIT_MINILM`, else ~/.cache/dit/all-MiniLM-L6-v2).
    #[arg(long)]
    text_encoder: Vec<PathBuf>,
    /// Also write the held-out captions' samples: a PNG grid (one row per caption, at most 8
    /// rows; clips also as a GIF beside it) and the captions (.txt).
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Also write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The model, its encoders, the empty prompt's encoding and the sampling options.
struct Setup {
    model: dit::DiT,
    encoders: Vec<TextEncoder>,
    empty: TextBatch,
    opts: SampleOptions,
}

fn setup(a: &EvalArgs, video: bool, device: &Device) -> Result<Setup> {
    let (what, command) = match video {
        false => ("text-to-image", "--builtin shapes"),
        true => ("text-to-video", "--builtin moving-shapes"),
    };
    if a.per_caption == 0 || a.batch_size == 0 {
        bail!("--per-caption and --batch-size must be at least 1");
    }
    let (_, model) = a.model.load(device)?;
    let cfg = model.config.clone();
    let text = match cfg.text {
        Some(t) if cfg.video.is_some() == video && cfg.in_channels == 3 => t,
        _ => bail!(
            "this scores RGB pixel-space {what} models (trained with `dit train {command}`); this one is not"
        ),
    };
    let opts = a.sampling.options(&cfg, 50)?;
    let encoders = crate::text_encoders::load_for(&a.text_encoder, &text, device)?;
    let empty = dit::text::encode_all(&encoders, &[""])?;
    Ok(Setup {
        model,
        encoders,
        empty,
        opts,
    })
}

fn save_json(a: &EvalArgs, mut report: serde_json::Map<String, serde_json::Value>) -> Result<()> {
    if let Some(p) = &a.json {
        report.insert("per_caption".into(), a.per_caption.into());
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

/// The shapes asked for against the shapes read, one row per shape asked.
fn print_shape_read(read: &[[usize; 4]; 3]) {
    println!(
        "          shape asked -> read as {} / none",
        shapes::SHAPES.join(" / ")
    );
    for (asked, row) in shapes::SHAPES.iter().zip(read) {
        println!(
            "          {asked:>8}: {:>5} {:>5} {:>5} {:>5}",
            row[0], row[1], row[2], row[3]
        );
    }
}

fn pct(v: f64) -> String {
    format!("{:5.1}%", v * 100.0)
}

pub fn run_shapes(a: EvalArgs, device: &Device) -> Result<()> {
    let s = setup(&a, false, device)?;
    let (held, seen): (Vec<Scene>, Vec<Scene>) =
        Scene::all().into_iter().partition(Scene::held_out);
    let mut groups = vec![("held-out", held)];
    if !a.held_out_only {
        groups.push(("seen", seen));
    }
    let mut report = serde_json::Map::new();
    for (name, scenes) in &groups {
        let wanted: Vec<Scene> = scenes
            .iter()
            .flat_map(|s| std::iter::repeat_n(*s, a.per_caption))
            .collect();
        let captions: Vec<String> = wanted.iter().map(Scene::caption).collect();
        let images = generate(&s, &s.opts, &captions, None, &a)?;
        let acc = shapes::measure(&images, &wanted)?;
        println!(
            "{name:>8} captions ({} x {} images): colour {}  shape {}  position {}  background {}  all four {}",
            scenes.len(),
            a.per_caption,
            pct(acc.colour),
            pct(acc.shape),
            pct(acc.position),
            pct(acc.background),
            pct(acc.all)
        );
        print_shape_read(&acc.shape_read);
        report.insert(name.to_string(), serde_json::to_value(acc)?);
        if let (Some(p), "held-out") = (&a.grid, *name) {
            let rows: Vec<String> = scenes.iter().map(Scene::caption).collect();
            write_grid(&images, &rows, a.per_caption, p)?;
        }
    }
    let o = &s.opts;
    println!(
        "({} steps {:?}, guidance {}, {}x{} pixels)",
        o.steps, o.sampler, o.cfg_scale, s.model.config.input_size, s.model.config.input_size
    );
    report.insert("steps".into(), o.steps.into());
    report.insert("cfg_scale".into(), o.cfg_scale.into());
    save_json(&a, report)
}

pub fn run_motion(a: EvalArgs, device: &Device) -> Result<()> {
    let s = setup(&a, true, device)?;
    let frames = s.model.config.video.map_or(8, |v| v.frames);
    let (held, seen): (Vec<Motion>, Vec<Motion>) =
        Motion::all().into_iter().partition(Motion::held_out);
    let mut groups = vec![("held-out", held)];
    if !a.held_out_only {
        groups.push(("seen", seen));
    }
    // Text guidance alone, then motion-free guidance (text scale = --cfg-scale).
    let motion_scale = s.opts.motion_scale.unwrap_or(1.2);
    let mut runs = vec![("text guidance", None)];
    // (Spacetime-patch models have no temporal attention to mask.)
    if s.model.config.temporal_attention() {
        runs.push(("motion-free guidance", Some(motion_scale)));
    }
    let mut report = serde_json::Map::new();
    for (name, motions) in &groups {
        let wanted: Vec<Motion> = motions
            .iter()
            .flat_map(|m| std::iter::repeat_n(*m, a.per_caption))
            .collect();
        let captions: Vec<String> = wanted.iter().map(Motion::caption).collect();
        for &(run, scale) in &runs {
            let opts = SampleOptions {
                motion_scale: scale,
                ..s.opts.clone()
            };
            let clips = generate(&s, &opts, &captions, Some(frames), &a)?;
            let acc = moving_shapes::measure(&clips, &wanted)?;
            println!(
                "{name:>8} captions ({} x {} clips), {run:>20}: direction {}  colour {}  shape {}  background {}  all four {}",
                motions.len(),
                a.per_caption,
                pct(acc.direction),
                pct(acc.colour),
                pct(acc.shape),
                pct(acc.background),
                pct(acc.all)
            );
            report.insert(format!("{name} / {run}"), serde_json::to_value(acc)?);
            let last = runs.last().is_some_and(|l| l.0 == run);
            if let (Some(p), "held-out", true) = (&a.grid, *name, last) {
                let rows: Vec<String> = motions.iter().map(Motion::caption).collect();
                write_grid(&clips, &rows, a.per_caption, p)?;
            }
        }
    }
    let o = &s.opts;
    println!(
        "({} steps {:?}, text scale {}, motion scale {motion_scale}, {frames} frames of {}x{} pixels)",
        o.steps, o.sampler, o.cfg_scale, s.model.config.input_size, s.model.config.input_size
    );
    report.insert("steps".into(), o.steps.into());
    report.insert("cfg_scale".into(), o.cfg_scale.into());
    report.insert("motion_scale".into(), motion_scale.into());
    save_json(&a, report)
}

/// Samples for `captions` (images, or clips of `frames`) in batches, rounded to 8 bits as a
/// user would see them. The noise comes from `--seed` afresh, so runs that differ only in
/// guidance start from the same noise.
fn generate(
    s: &Setup,
    opts: &SampleOptions,
    captions: &[String],
    frames: Option<usize>,
    a: &EvalArgs,
) -> Result<Tensor> {
    let size = s.model.config.input_size;
    let batches = captions.len().div_ceil(a.batch_size);
    let bar =
        ProgressBar::new((batches * opts.steps) as u64).with_style(ProgressStyle::with_template(
            "sampling [{bar:40}] {pos}/{len} steps {elapsed_precise} eta {eta}",
        )?);
    let mut rng = NoiseRng::new(a.seed);
    let mut out = Vec::with_capacity(batches);
    for (b, chunk) in captions.chunks(a.batch_size).enumerate() {
        let prompts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let text = dit::text::encode_all(&s.encoders, &prompts)?;
        let mut shape = vec![chunk.len(), 3, size, size];
        if let Some(f) = frames {
            shape.insert(2, f);
        }
        let noise = rng.randn_like(&Tensor::zeros(shape, DType::F32, s.model.device())?)?;
        let x = dit::pipeline::sample_latents_text(
            &s.model,
            &text,
            &s.empty,
            noise,
            opts,
            &mut rng,
            |i| bar.set_position((b * opts.steps + i + 1) as u64),
        )?;
        out.push(x.clamp(-1f32, 1f32)?);
    }
    bar.finish_and_clear();
    let x = Tensor::cat(&out, 0)?;
    Ok(((((x + 1.0)? * 127.5)?.round()? / 127.5)? - 1.0)?)
}

/// The first samples of the first (at most 8) captions: one row each; clips also as a GIF.
fn write_grid(
    samples: &Tensor,
    captions: &[String],
    per: usize,
    path: &std::path::Path,
) -> Result<()> {
    let rows = captions.len().min(8);
    let device = samples.device();
    if samples.rank() == 5 {
        // One clip per caption: a row of frames each, and the GIF.
        let pick: Vec<u32> = (0..rows).map(|r| (r * per) as u32).collect();
        let clips = samples.index_select(&Tensor::new(pick.as_slice(), device)?, 0)?;
        dit::image_io::save_clips(&clips, path, &path.with_extension("gif"))?;
    } else {
        let cols = per.min(8);
        let pick: Vec<u32> = (0..rows)
            .flat_map(|r| (0..cols).map(move |c| (r * per + c) as u32))
            .collect();
        let pick = samples.index_select(&Tensor::new(pick.as_slice(), device)?, 0)?;
        let rgb = dit::image_io::to_rgb_images(&pick)?;
        dit::image_io::save_png(&dit::image_io::make_grid(&rgb, cols, 2), path)?;
    }
    std::fs::write(
        path.with_extension("txt"),
        captions[..rows].join("\n") + "\n",
    )?;
    println!("wrote {}", path.display());
    Ok(())
}
