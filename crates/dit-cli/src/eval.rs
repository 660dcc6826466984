//! `dit eval --samples A.npz --ref B.npz`: the ADM evaluation suite (FID, sFID, Inception Score,
//! precision, recall) on the FID Inception network, as the DiT paper reports them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use dit::eval::inception::InceptionV3;
use dit::eval::npz::ImageBatches;
use dit::eval::suite::{self, FeatureSet};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct EvalArgs {
    /// Samples: .npz with `arr_0` uint8 (N, H, W, 3) (`dit sample-many`), or a statistics file
    /// written by `--save-sample-stats`.
    #[arg(long)]
    samples: PathBuf,
    /// Reference batch: ADM's `VIRTUAL_imagenet256_labeled.npz` (images and mu/sigma), any
    /// image .npz, or statistics cached by `--save-ref-stats`.
    #[arg(long = "ref")]
    reference: PathBuf,
    /// FID Inception weights: TorchScript (`tools/fetch-inception.sh` fetches them; default
    /// `$DIT_INCEPTION`, else ~/.cache/dit/inception-2015-12-05.pt), pytorch-fid's .pth, or
    /// safetensors from `dit convert --inception`.
    #[arg(long)]
    inception: Option<PathBuf>,
    /// Images per Inception batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Cache the reference's statistics and features here (.npz), to skip its images next time.
    #[arg(long)]
    save_ref_stats: Option<PathBuf>,
    /// The same for the samples.
    #[arg(long)]
    save_sample_stats: Option<PathBuf>,
    /// Also write the metrics as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The weights' path: the flag, `$DIT_INCEPTION`, or the fetch script's default place.
pub fn inception_path(flag: Option<PathBuf>) -> Result<PathBuf> {
    let path = flag
        .or_else(|| std::env::var_os("DIT_INCEPTION").map(PathBuf::from))
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/dit/inception-2015-12-05.pt"))
        })
        .context("no --inception and no HOME")?;
    anyhow::ensure!(
        path.is_file(),
        "FID Inception weights not found at {} (run tools/fetch-inception.sh, or pass --inception)",
        path.display()
    );
    Ok(path)
}

fn features(
    path: &Path,
    what: &str,
    net: &mut Option<InceptionV3>,
    inception: &Option<PathBuf>,
    batch: usize,
    device: &Device,
) -> Result<FeatureSet> {
    let images = suite::needs_network(path)?;
    if images && net.is_none() {
        let weights = inception_path(inception.clone())?;
        *net = Some(InceptionV3::load(&weights, device)?);
    }
    let bar = match images {
        true => {
            let n = ImageBatches::open(path)?.len();
            ProgressBar::new(n as u64).with_style(ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} images {elapsed_precise} eta {eta}",
            )?)
        }
        false => ProgressBar::hidden(),
    }
    .with_message(format!("Inception features of the {what}"));
    let set = FeatureSet::load(path, net.as_ref(), batch, |n| bar.inc(n as u64))
        .with_context(|| format!("reading the {what} {}", path.display()))?;
    bar.finish_and_clear();
    Ok(set)
}

pub fn run(a: EvalArgs, device: &Device) -> Result<()> {
    let mut net = None;
    let reference = features(
        &a.reference,
        "reference",
        &mut net,
        &a.inception,
        a.batch_size,
        device,
    )?;
    if let Some(p) = &a.save_ref_stats {
        reference.save(p)?;
        println!("wrote {}", p.display());
    }
    let samples = features(
        &a.samples,
        "samples",
        &mut net,
        &a.inception,
        a.batch_size,
        device,
    )?;
    if let Some(p) = &a.save_sample_stats {
        samples.save(p)?;
        println!("wrote {}", p.display());
    }
    let r = suite::evaluate(&samples, &reference, device)?;
    let show = |v: Option<f64>, why: &str| v.map_or(format!("n/a ({why})"), |v| format!("{v}"));
    println!(
        "Inception Score: {}",
        show(
            r.inception_score,
            "the Inception weights lack the 1008-way classifier (pytorch-fid's .pth has it)"
        )
    );
    println!("FID: {}", r.fid);
    println!("sFID: {}", show(r.sfid, "a statistics file without mu_s"));
    let no_pr = "needs pool features of both sets";
    println!("Precision: {}", show(r.precision, no_pr));
    println!("Recall: {}", show(r.recall, no_pr));
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)?)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}
