//! The ADM suite's sample-quality metrics on Inception features:
//!
//! - FID / sFID: Fréchet distance of Gaussians fitted to pool / spatial features
//!   ([`super::frechet`]); statistics accumulated batch by batch in f64 ([`StatsAccumulator`]).
//! - Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), averaged over splits
//!   of 5,000 samples as the ADM suite does.
//! - Precision and recall (Kynkäänniemi et al. 2019), k = 3: a sample is "precise" when it lies
//!   inside some reference feature's k-NN ball; a reference feature is "recalled" when it lies
//!   inside some sample's ball.

use candle_core::{DType, Device, Tensor, D};
use nalgebra::{DMatrix, DVector};

use super::frechet::GaussianStats;
use crate::{Error, Result};

/// The ADM suite's Inception Score split and precision/recall neighbourhood.
pub const IS_SPLIT: usize = 5000;
pub const PR_K: usize = 3;

/// Mean and covariance of feature rows fed in batches, in f64. Rows are shifted by the first
/// batch's mean before the sums, so the covariance does not suffer cancellation.
pub struct StatsAccumulator {
    n: usize,
    shift: Option<Tensor>,
    sum: Option<Tensor>,
    sum_sq: Option<Tensor>,
}

impl Default for StatsAccumulator {
    fn default() -> Self {
        Self::new()
    }
}

impl StatsAccumulator {
    pub fn new() -> Self {
        Self {
            n: 0,
            shift: None,
            sum: None,
            sum_sq: None,
        }
    }

    /// Adds a (B, d) batch of features (any float dtype, any device).
    pub fn add(&mut self, features: &Tensor) -> Result<()> {
        let x = features.to_dtype(DType::F64)?;
        let shift = match &self.shift {
            Some(s) => s.clone(),
            None => self.shift.insert(x.mean_keepdim(0)?).clone(),
        };
        let x = x.broadcast_sub(&shift)?;
        let (s, ss) = (x.sum_keepdim(0)?, x.t()?.matmul(&x)?);
        self.sum = Some(match self.sum.take() {
            Some(a) => (a + s)?,
            None => s,
        });
        self.sum_sq = Some(match self.sum_sq.take() {
            Some(a) => (a + ss)?,
            None => ss,
        });
        self.n += x.dim(0)?;
        Ok(())
    }

    pub fn count(&self) -> usize {
        self.n
    }

    /// Mean and unbiased covariance (numpy's `mean(0)` and `cov(rowvar=False)`).
    pub fn finish(&self) -> Result<GaussianStats> {
        let (Some(shift), Some(sum), Some(sum_sq)) = (&self.shift, &self.sum, &self.sum_sq) else {
            return Err(Error::Input("no features to take statistics of".into()));
        };
        if self.n < 2 {
            return Err(Error::Input(format!(
                "statistics need at least 2 feature rows, got {}",
                self.n
            )));
        }
        let n = self.n as f64;
        let vec = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.flatten_all()?.to_vec1::<f64>()?) };
        let m = DVector::from_vec(vec(&(sum / n)?)?);
        let d = m.len();
        let ss = DMatrix::from_row_slice(d, d, &vec(sum_sq)?);
        let sigma = (ss - &m * m.transpose() * n) / (n - 1.0);
        let mu = m + DVector::from_vec(vec(shift)?);
        Ok(GaussianStats { mu, sigma })
    }
}

/// Inception Score of class probabilities (N, classes): the mean over consecutive splits of
/// `split` rows of exp(mean_i KL(p_i || mean_j p_j)). Computed in f64; 0 log 0 counts as 0.
pub fn inception_score(probs: &Tensor, split: usize) -> Result<f64> {
    let (n, _) = probs.dims2()?;
    if n == 0 || split == 0 {
        return Err(Error::Input("Inception Score of no samples".into()));
    }
    let p = probs.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
    let mut scores = Vec::new();
    for start in (0..n).step_by(split) {
        let part = p.narrow(0, start, split.min(n - start))?;
        let marginal = part.mean_keepdim(0)?;
        // p (log p - log marginal), with p = 0 terms dropped (their limit is 0).
        let log_ratio = part
            .clamp(1e-300, 1.0)?
            .log()?
            .broadcast_sub(&marginal.clamp(1e-300, 1.0)?.log()?)?;
        let kl = log_ratio.broadcast_mul(&part)?.sum(1)?.mean_all()?;
        scores.push(kl.to_scalar::<f64>()?.exp());
    }
    Ok(scores.iter().sum::<f64>() / scores.len() as f64)
}

/// Rows per block of the pairwise-distance computations (bounds memory at rows x N floats).
const BLOCK: usize = 1024;

/// Squared Euclidean distances between the rows of `a` (m, d) and `b` (n, d), (m, n), f32.
fn squared_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a2 = a.sqr()?.sum_keepdim(1)?;
    let b2 = b.sqr()?.sum_keepdim(1)?.t()?;
    let ab = a.matmul(&b.t()?)?;
    Ok(a2.broadcast_add(&b2)?.broadcast_sub(&(ab * 2.0)?)?.relu()?)
}

/// Squared distance from each row to its k-th nearest other row (the k-NN ball radii).
pub fn knn_radii(features: &Tensor, k: usize) -> Result<Tensor> {
    let x = features.to_dtype(DType::F32)?;
    let n = x.dim(0)?;
    if n <= k {
        return Err(Error::Input(format!(
            "k-NN radii with k = {k} need more than {k} features, got {n}"
        )));
    }
    let mut radii = Vec::with_capacity(n);
    for start in (0..n).step_by(BLOCK) {
        let rows = x.narrow(0, start, BLOCK.min(n - start))?;
        let d = squared_distances(&rows, &x)?.to_device(&Device::Cpu)?;
        for mut row in d.to_vec2::<f32>()? {
            // Index k of the sorted row: index 0 is the row itself (distance 0).
            let (_, kth, _) = row.select_nth_unstable_by(k, f32::total_cmp);
            radii.push(*kth);
        }
    }
    Ok(Tensor::from_vec(radii, n, x.device())?)
}

/// For each row of `a`, whether it lies within the ball of some row of `b` (radii `b_radii`).
fn inside_any_ball(a: &Tensor, b: &Tensor, b_radii: &Tensor) -> Result<Vec<bool>> {
    let n = a.dim(0)?;
    let r = b_radii.unsqueeze(0)?;
    let mut inside = Vec::with_capacity(n);
    for start in (0..n).step_by(BLOCK) {
        let rows = a.narrow(0, start, BLOCK.min(n - start))?;
        let hit = squared_distances(&rows, b)?
            .broadcast_le(&r)?
            .max(D::Minus1)?;
        inside.extend(hit.to_vec1::<u8>()?.into_iter().map(|h| h != 0));
    }
    Ok(inside)
}

/// (precision, recall) of `samples` against `reference` features with k-NN balls.
pub fn precision_recall(reference: &Tensor, samples: &Tensor, k: usize) -> Result<(f64, f64)> {
    let (real, fake) = (
        reference.to_dtype(DType::F32)?,
        samples.to_dtype(DType::F32)?,
    );
    let fraction = |v: Vec<bool>| v.iter().filter(|&&b| b).count() as f64 / v.len() as f64;
    let precision = fraction(inside_any_ball(&fake, &real, &knn_radii(&real, k)?)?);
    let recall = fraction(inside_any_ball(&real, &fake, &knn_radii(&fake, k)?)?);
    Ok((precision, recall))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulated_statistics_equal_the_one_shot_ones() {
        let rows: Vec<Vec<f32>> = (0..37)
            .map(|i| {
                (0..5)
                    .map(|j| ((i * 13 + j * 7) % 11) as f32 + 100.0)
                    .collect()
            })
            .collect();
        let want = GaussianStats::from_rows(&rows).unwrap();
        let flat: Vec<f32> = rows.concat();
        let t = Tensor::from_vec(flat, (37, 5), &Device::Cpu).unwrap();
        let mut acc = StatsAccumulator::new();
        for (s, l) in [(0, 10), (10, 20), (30, 7)] {
            acc.add(&t.narrow(0, s, l).unwrap()).unwrap();
        }
        let got = acc.finish().unwrap();
        assert_eq!(acc.count(), 37);
        assert!((got.mu - want.mu).amax() < 1e-9);
        assert!((got.sigma - want.sigma).amax() < 1e-9);
        assert!(StatsAccumulator::new().finish().is_err());
    }

    #[test]
    fn radii_are_the_kth_neighbour_excluding_the_point_itself() {
        // Points on a line at 0, 1, 3, 6: from 0 the neighbours are 1, 3, 6 (squared 1, 9, 36).
        let x = Tensor::new(&[[0f32], [1.], [3.], [6.]], &Device::Cpu).unwrap();
        let r = knn_radii(&x, 1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(r, [1., 1., 4., 9.]);
        let r = knn_radii(&x, 3).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(r, [36., 25., 9., 36.]);
        assert!(knn_radii(&x, 4).is_err());
    }
}
