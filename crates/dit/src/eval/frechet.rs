//! Fréchet distance between two Gaussians fitted to feature sets (the FID formula):
//!
//!   d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))
//!
//! All in f64. tr (S1 S2)^(1/2) is computed as the sum of square roots of the eigenvalues of the
//! symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2 — stable where
//! a general (non-symmetric) matrix square root is not, and no complex parts to discard. Tiny
//! negative eigenvalues from round-off are clamped to zero. The eigendecompositions (2048x2048
//! for FID) run in faer: 0.4 s each here, against 6.6 s with nalgebra.

use faer::{Mat, Side};
use nalgebra::{DMatrix, DVector};

use crate::{Error, Result};

/// Mean and covariance (unbiased, as numpy's `cov(rowvar=False)`) of the rows of `features`
/// (n rows of d values).
#[derive(Debug, Clone)]
pub struct GaussianStats {
    pub mu: DVector<f64>,
    pub sigma: DMatrix<f64>,
}

impl GaussianStats {
    pub fn from_rows(features: &[Vec<f32>]) -> Result<Self> {
        let n = features.len();
        let d = features.first().map_or(0, Vec::len);
        if n < 2 || d == 0 || features.iter().any(|f| f.len() != d) {
            return Err(Error::Input(format!(
                "statistics need at least 2 feature rows of one length, got {n}"
            )));
        }
        let x = DMatrix::from_fn(n, d, |i, j| features[i][j] as f64);
        let mu = x.row_mean().transpose();
        let centred = DMatrix::from_fn(n, d, |i, j| x[(i, j)] - mu[j]);
        let sigma = centred.transpose() * &centred / (n as f64 - 1.0);
        Ok(Self { mu, sigma })
    }
}

/// The Fréchet distance (squared, as FID reports it) between two Gaussians.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<f64> {
    let d = a.mu.len();
    if b.mu.len() != d || a.sigma.shape() != (d, d) || b.sigma.shape() != (d, d) {
        return Err(Error::Input(format!(
            "Fréchet distance of statistics of different sizes: {} and {}",
            a.mu.len(),
            b.mu.len()
        )));
    }
    let sqrt_a = psd_sqrt(&to_faer(&a.sigma))?;
    let inner = &sqrt_a * to_faer(&b.sigma) * &sqrt_a;
    let inner = symmetrised(&inner); // exact symmetry for the eigensolver
    let tr_covmean: f64 = inner
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(eig_err)?
        .iter()
        .map(|&l| l.max(0.0).sqrt())
        .sum();
    let diff = &a.mu - &b.mu;
    Ok(diff.dot(&diff) + a.sigma.trace() + b.sigma.trace() - 2.0 * tr_covmean)
}

fn eig_err(e: impl std::fmt::Debug) -> Error {
    Error::Input(format!(
        "eigendecomposition failed (non-finite covariance?): {e:?}"
    ))
}

fn to_faer(m: &DMatrix<f64>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)])
}

fn symmetrised(m: &Mat<f64>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| 0.5 * (m[(i, j)] + m[(j, i)]))
}

/// The symmetric square root of a symmetric PSD matrix via its eigendecomposition.
fn psd_sqrt(m: &Mat<f64>) -> Result<Mat<f64>> {
    let eig = symmetrised(m)
        .self_adjoint_eigen(Side::Lower)
        .map_err(eig_err)?;
    let (u, s) = (eig.U(), eig.S().column_vector());
    let scaled = Mat::from_fn(u.nrows(), u.ncols(), |i, j| {
        u[(i, j)] * s[j].max(0.0).sqrt()
    });
    Ok(&scaled * u.transpose())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(mu: &[f64], sigma: DMatrix<f64>) -> GaussianStats {
        GaussianStats {
            mu: DVector::from_column_slice(mu),
            sigma,
        }
    }

    #[test]
    fn matches_the_closed_form_for_commuting_covariances() {
        // Diagonal covariances commute: d^2 = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
        let (va, vb) = ([4.0, 1.0, 0.25], [1.0, 9.0, 0.25]);
        let a = stats(
            &[0.0, 1.0, 2.0],
            DMatrix::from_diagonal(&DVector::from_column_slice(&va)),
        );
        let b = stats(
            &[1.0, 1.0, 0.0],
            DMatrix::from_diagonal(&DVector::from_column_slice(&vb)),
        );
        let want = 1.0 + 4.0 + (2.0f64 - 1.0).powi(2) + (1.0f64 - 3.0).powi(2);
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn matches_the_closed_form_for_rotated_gaussians() {
        // B = R A R^T (same spectrum, rotated): for 2x2 with A = diag(a1, a2) and a rotation by
        // 90 degrees, B = diag(a2, a1), so tr sqrt(A B) = 2 sqrt(a1 a2).
        let a = stats(
            &[0.0, 0.0],
            DMatrix::from_row_slice(2, 2, &[4.0, 0.0, 0.0, 1.0]),
        );
        let b = stats(
            &[0.0, 0.0],
            DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 4.0]),
        );
        let want = 5.0 + 5.0 - 2.0 * 2.0 * 2.0;
        assert!((frechet_distance(&a, &b).unwrap() - want).abs() < 1e-9);
        // A non-commuting pair: the distance is symmetric and zero only for equal Gaussians.
        let c = stats(
            &[0.0, 0.0],
            DMatrix::from_row_slice(2, 2, &[2.0, 0.9, 0.9, 1.0]),
        );
        let (ac, ca) = (
            frechet_distance(&a, &c).unwrap(),
            frechet_distance(&c, &a).unwrap(),
        );
        assert!((ac - ca).abs() < 1e-9 && ac > 0.1);
        assert!(frechet_distance(&c, &c).unwrap().abs() < 1e-9);
    }

    #[test]
    fn statistics_are_numpy_mean_and_unbiased_cov() {
        let rows = vec![vec![1.0f32, 2.0], vec![3.0, 0.0], vec![5.0, 1.0]];
        let s = GaussianStats::from_rows(&rows).unwrap();
        assert_eq!(s.mu.as_slice(), &[3.0, 1.0]);
        // var x = ((−2)² + 0 + 2²) / 2 = 4; var y = (1 + 1 + 0) / 2 = 1; cov = (−2·1 + 0 + 0) / 2.
        assert_eq!(s.sigma.as_slice(), &[4.0, -1.0, -1.0, 1.0]);
        assert!(GaussianStats::from_rows(&rows[..1]).is_err());
    }
}
