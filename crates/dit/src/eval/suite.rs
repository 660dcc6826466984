//! The ADM evaluation suite end to end: features of a sample batch and a reference batch
//! (`.npz` with `arr_0` uint8 images, or cached statistics), then FID, sFID, Inception Score,
//! precision and recall — what `dit eval --samples A.npz --ref B.npz` prints.
//!
//! Statistics files use the ADM reference batches' keys: `mu`, `sigma` (pool features), `mu_s`,
//! `sigma_s` (spatial features), all f64; ours add `pool_3` (the pool features, f32) so precision
//! and recall need not re-read 50K images. When a batch holds both images and `mu` / `sigma` (as
//! ADM's `VIRTUAL_imagenet256_labeled.npz` does), its stored statistics are used for FID, like
//! the ADM evaluator, and the images only for the other metrics.

use std::io::BufReader;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use nalgebra::{DMatrix, DVector};
use serde::Serialize;

use super::frechet::{frechet_distance, GaussianStats};
use super::inception::InceptionV3;
use super::metrics::{inception_score, precision_recall, StatsAccumulator, IS_SPLIT, PR_K};
use super::npz::ImageBatches;
use crate::{Error, Result};

/// What the metrics need of one batch of images.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    /// (N, 2048) pool features, f32 on the CPU (precision / recall).
    pub pool: Option<Tensor>,
    pub pool_stats: GaussianStats,
    pub spatial_stats: Option<GaussianStats>,
    /// (N, 1008) class probabilities (Inception Score), when the network has its classifier.
    pub probs: Option<Tensor>,
}

/// The suite's numbers (`None` where the inputs do not allow one).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub inception_score: Option<f64>,
    pub fid: f64,
    pub sfid: Option<f64>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub num_samples: Option<usize>,
    pub num_reference: Option<usize>,
}

/// The arrays an .npz holds (names without `.npy`).
pub fn npz_members(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| Error::Input(format!("{} is not an .npz file: {e}", path.display())))?;
    Ok(zip
        .file_names()
        .filter_map(|n| n.ok())
        .map(|n| n.trim_end_matches(".npy").to_string())
        .collect())
}

/// Whether computing this file's features needs the network (it holds images).
pub fn needs_network(path: &Path) -> Result<bool> {
    let is_npy = path.extension().is_some_and(|e| e == "npy");
    Ok(is_npy || npz_members(path)?.iter().any(|m| m == "arr_0"))
}

impl FeatureSet {
    /// Features of every image, `batch` at a time; `on_batch(n)` after each batch of n.
    pub fn from_images(
        net: &InceptionV3,
        images: &mut ImageBatches,
        batch: usize,
        mut on_batch: impl FnMut(usize),
    ) -> Result<Self> {
        let (mut pool_acc, mut spatial_acc) = (StatsAccumulator::new(), StatsAccumulator::new());
        let (mut pools, mut probs) = (Vec::new(), Vec::new());
        while let Some(x) = images.next_batch(batch.max(1), net.device())? {
            let f = net.features_u8(&x)?;
            pool_acc.add(&f.pool)?;
            spatial_acc.add(&f.spatial)?;
            pools.push(f.pool.to_device(&Device::Cpu)?);
            if let Some(p) = f.probs {
                probs.push(p.to_device(&Device::Cpu)?);
            }
            on_batch(x.dim(0)?);
        }
        Ok(Self {
            pool: Some(Tensor::cat(&pools, 0)?),
            pool_stats: pool_acc.finish()?,
            spatial_stats: Some(spatial_acc.finish()?),
            probs: (!probs.is_empty())
                .then(|| Tensor::cat(&probs, 0))
                .transpose()?,
        })
    }

    /// Reads a batch file: images (`arr_0`, through `net`), stored statistics, or both.
    pub fn load(
        path: &Path,
        net: Option<&InceptionV3>,
        batch: usize,
        on_batch: impl FnMut(usize),
    ) -> Result<Self> {
        let members = match path.extension().is_some_and(|e| e == "npy") {
            true => vec!["arr_0".to_string()],
            false => npz_members(path)?,
        };
        let has = |k: &str| members.iter().any(|m| m == k);
        let read = |keys: &[&str]| -> Result<Vec<Tensor>> {
            let t = Tensor::read_npz_by_name(path, keys)
                .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
            Ok(t)
        };
        let stats = |mu: &str, sigma: &str| -> Result<Option<GaussianStats>> {
            match has(mu) && has(sigma) {
                true => {
                    let t = read(&[mu, sigma])?;
                    Ok(Some(stats_from_tensors(&t[0], &t[1], path)?))
                }
                false => Ok(None),
            }
        };
        let (stored, stored_s) = (stats("mu", "sigma")?, stats("mu_s", "sigma_s")?);
        let mut set = if has("arr_0") {
            let net = net.ok_or_else(|| {
                Error::Input(format!(
                    "{} holds images: the Inception network is needed",
                    path.display()
                ))
            })?;
            FeatureSet::from_images(net, &mut ImageBatches::open(path)?, batch, on_batch)?
        } else {
            let pool_stats = stored.clone().ok_or_else(|| {
                Error::Input(format!(
                    "{} holds neither images (arr_0) nor statistics (mu, sigma)",
                    path.display()
                ))
            })?;
            let pool = match has("pool_3") {
                true => Some(read(&["pool_3"])?.remove(0).to_dtype(DType::F32)?),
                false => None,
            };
            FeatureSet {
                pool,
                pool_stats,
                spatial_stats: None,
                probs: None,
            }
        };
        if let Some(s) = stored {
            set.pool_stats = s;
        }
        if let Some(s) = stored_s {
            set.spatial_stats = Some(s);
        }
        Ok(set)
    }

    /// Writes the statistics (and pool features) as an .npz, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dev = Device::Cpu;
        let vec = |s: &GaussianStats| -> Result<(Tensor, Tensor)> {
            let d = s.mu.len();
            let mu = Tensor::from_slice(s.mu.as_slice(), d, &dev)?;
            // nalgebra is column-major; sigma is symmetric, but write it row-major regardless.
            let sigma = Tensor::from_slice(s.sigma.transpose().as_slice(), (d, d), &dev)?;
            Ok((mu, sigma))
        };
        let (mu, sigma) = vec(&self.pool_stats)?;
        let mut arrays = vec![("mu", mu), ("sigma", sigma)];
        if let Some(s) = &self.spatial_stats {
            let (mu_s, sigma_s) = vec(s)?;
            arrays.extend([("mu_s", mu_s), ("sigma_s", sigma_s)]);
        }
        if let Some(p) = &self.pool {
            arrays.push(("pool_3", p.to_dtype(DType::F32)?));
        }
        let tmp = path.with_extension("tmp.npz");
        let refs: Vec<(&str, &Tensor)> = arrays.iter().map(|(k, v)| (*k, v)).collect();
        Tensor::write_npz(&refs, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }

    fn len(&self) -> Option<usize> {
        self.pool.as_ref().and_then(|p| p.dim(0).ok())
    }
}

fn stats_from_tensors(mu: &Tensor, sigma: &Tensor, path: &Path) -> Result<GaussianStats> {
    let d = mu.elem_count();
    if sigma.dims() != [d, d] {
        return Err(Error::Input(format!(
            "{}: sigma has shape {:?}, expected [{d}, {d}] to match mu",
            path.display(),
            sigma.dims()
        )));
    }
    let f64s = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
    };
    Ok(GaussianStats {
        mu: DVector::from_vec(f64s(mu)?),
        sigma: DMatrix::from_row_slice(d, d, &f64s(sigma)?),
    })
}

/// All the metrics the two sets allow; the pairwise distances of precision / recall run on
/// `device`.
pub fn evaluate(samples: &FeatureSet, reference: &FeatureSet, device: &Device) -> Result<Report> {
    let fid = frechet_distance(&samples.pool_stats, &reference.pool_stats)?;
    let sfid = match (&samples.spatial_stats, &reference.spatial_stats) {
        (Some(a), Some(b)) => Some(frechet_distance(a, b)?),
        _ => None,
    };
    let inception_score = samples
        .probs
        .as_ref()
        .map(|p| inception_score(p, IS_SPLIT))
        .transpose()?;
    let (precision, recall) = match (&samples.pool, &reference.pool) {
        (Some(s), Some(r)) => {
            let (p, r) = precision_recall(&r.to_device(device)?, &s.to_device(device)?, PR_K)?;
            (Some(p), Some(r))
        }
        _ => (None, None),
    };
    Ok(Report {
        inception_score,
        fid,
        sfid,
        precision,
        recall,
        num_samples: samples.len(),
        num_reference: reference.len(),
    })
}
