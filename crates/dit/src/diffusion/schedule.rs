//! Noise schedules and respacing (IDDPM's `get_named_beta_schedule` and `space_timesteps`).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The noise schedule a model was trained with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// DDPM's linear betas (DiT's).
    #[default]
    Linear,
    /// IDDPM's cosine schedule.
    Cosine,
}

impl Schedule {
    pub fn betas(self, num_steps: usize) -> Vec<f64> {
        match self {
            Self::Linear => linear_betas(num_steps),
            Self::Cosine => cosine_betas(num_steps),
        }
    }
}

/// IDDPM's cosine schedule: abar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2) with s = 0.008,
/// beta_i = min(1 - abar((i + 1) / T) / abar(i / T), 0.999).
pub fn cosine_betas(num_steps: usize) -> Vec<f64> {
    let abar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    let n = num_steps as f64;
    (0..num_steps)
        .map(|i| (1.0 - abar((i + 1) as f64 / n) / abar(i as f64 / n)).min(0.999))
        .collect()
}

/// The linear schedule of DDPM, scaled so that any number of steps spans the same noise range:
/// betas from 1e-4 to 0.02 at 1000 steps.
pub fn linear_betas(num_steps: usize) -> Vec<f64> {
    let scale = 1000.0 / num_steps as f64;
    let (start, end) = (scale * 1e-4, scale * 0.02);
    if num_steps == 1 {
        return vec![start];
    }
    (0..num_steps)
        .map(|i| start + (end - start) * i as f64 / (num_steps - 1) as f64)
        .collect()
}

/// Which of the `num_steps` original timesteps a respaced sampler visits, sorted ascending.
///
/// `spec` is either `"ddimN"` (a fixed integer stride giving exactly N steps, as IDDPM's DDIM
/// option) or comma-separated counts, one per equal section of the original steps; each section
/// takes its count evenly spread from its first to its last step, rounding fractional strides.
/// `"250"` is what the reference sampler uses for 250 steps.
pub fn space_timesteps(num_steps: usize, spec: &str) -> Result<Vec<usize>> {
    let bad = |m: String| Err(Error::Config(m));
    if let Some(n) = spec.strip_prefix("ddim") {
        let n: usize = n
            .parse()
            .map_err(|_| Error::Config(format!("bad respacing '{spec}'")))?;
        for stride in 1..num_steps {
            let steps: Vec<usize> = (0..num_steps).step_by(stride).collect();
            if steps.len() == n {
                return Ok(steps);
            }
        }
        return bad(format!(
            "cannot create exactly {n} steps with an integer stride"
        ));
    }
    let counts = spec
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| {
            Error::Config(format!(
                "bad respacing '{spec}': expected counts like 250 or 10,15,20"
            ))
        })?;
    let sections = counts.len();
    let (size_per, extra) = (num_steps / sections, num_steps % sections);
    let mut start = 0;
    let mut all = Vec::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if count == 0 || count > size {
            return bad(format!(
                "cannot take {count} steps from a section of {size} (of {num_steps} steps)"
            ));
        }
        let stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            all.push(start + round_half_even(cur) as usize);
            cur += stride;
        }
        start += size;
    }
    all.sort_unstable();
    all.dedup();
    Ok(all)
}

/// Python's `round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// New betas for the kept timesteps so the respaced chain has the same alpha-bars there:
/// beta'_i = 1 - abar[t_i] / abar[t_{i-1}].
pub fn respace_betas(betas: &[f64], use_timesteps: &[usize]) -> Vec<f64> {
    let mut last = 1.0;
    let mut abar = 1.0;
    let mut out = Vec::with_capacity(use_timesteps.len());
    let mut keep = use_timesteps.iter().peekable();
    for (i, b) in betas.iter().enumerate() {
        abar *= 1.0 - b;
        if keep.peek() == Some(&&i) {
            keep.next();
            out.push(1.0 - abar / last);
            last = abar;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_betas_span_the_ddpm_range() {
        let b = linear_betas(1000);
        assert_eq!(b.len(), 1000);
        assert!((b[0] - 1e-4).abs() < 1e-15 && (b[999] - 0.02).abs() < 1e-15);
    }

    #[test]
    fn spacing_rounds_like_python() {
        // 1000 steps into 3: stride 499.5 -> 0, round(499.5)=500 (even), 999.
        assert_eq!(space_timesteps(1000, "3").unwrap(), vec![0, 500, 999]);
        // 10 into 5: stride 2.25 -> 0, 2.25, 4.5 (rounds to even: 4), 6.75, 9.
        assert_eq!(space_timesteps(10, "5").unwrap(), vec![0, 2, 4, 7, 9]);
        let s = space_timesteps(1000, "250").unwrap();
        assert_eq!((s.len(), s[0], s[1], s[249]), (250, 0, 4, 999));
        assert_eq!(
            space_timesteps(1000, "1000").unwrap(),
            (0..1000).collect::<Vec<_>>()
        );
        assert_eq!(
            space_timesteps(100, "ddim10").unwrap(),
            (0..100).step_by(10).collect::<Vec<_>>()
        );
        // Sections: first half gets 2 steps, second 3.
        assert_eq!(space_timesteps(10, "2,3").unwrap(), vec![0, 4, 5, 7, 9]);
        assert!(space_timesteps(1000, "0").is_err());
        assert!(space_timesteps(1000, "1001").is_err());
        assert!(space_timesteps(1000, "abc").is_err());
    }

    #[test]
    fn respacing_keeps_alpha_bars() {
        let betas = linear_betas(1000);
        let keep = space_timesteps(1000, "7").unwrap();
        let nb = respace_betas(&betas, &keep);
        let abar = |bs: &[f64], n: usize| bs[..=n].iter().map(|b| 1.0 - b).product::<f64>();
        for (i, &t) in keep.iter().enumerate() {
            assert!((abar(&nb, i) - abar(&betas, t)).abs() < 1e-12);
        }
    }
}
