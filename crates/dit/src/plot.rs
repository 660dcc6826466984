//! The training loss curve as a PNG (plotters, drawn into an RGB buffer). Axis labels need a
//! TrueType font: the first of a few usual system fonts is used; without one the curve is
//! drawn without text.

use std::path::Path;
use std::sync::OnceLock;

use image::RgbImage;
use plotters::prelude::*;

use crate::{Error, Result};

const FONTS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a system font as plotters' "sans-serif" once; whether one was found.
fn have_font() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        FONTS.iter().any(|p| {
            std::fs::read(p).ok().is_some_and(|bytes| {
                plotters::style::register_font(
                    "sans-serif",
                    FontStyle::Normal,
                    Box::leak(bytes.into_boxed_slice()),
                )
                .is_ok()
            })
        })
    })
}

/// (step, loss) pairs from a `dit train` log (JSON lines with "step" and "loss").
pub fn read_loss_log(path: &Path) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::Input(format!("{} line {}: {e}", path.display(), i + 1)))?;
        match (v["step"].as_f64(), v["loss"].as_f64()) {
            (Some(s), Some(l)) => out.push((s, l)),
            _ => {
                return Err(Error::Input(format!(
                    "{} line {}: no numeric \"step\" and \"loss\"",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(out)
}

/// Draws loss against step, the loss on a log scale (diffusion losses fall by orders of
/// magnitude early and then slowly).
pub fn loss_curve(points: &[(f64, f64)], width: u32, height: u32) -> Result<RgbImage> {
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(s, l)| s.is_finite() && l.is_finite() && *l > 0.0)
        .collect();
    if finite.is_empty() {
        return Err(Error::Input("no positive finite losses to plot".into()));
    }
    let (x0, x1) = finite
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = finite
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (x1, y1) = (x1.max(x0 + 1.0), y1.max(y0 * 1.01));
    let mut buf = vec![0u8; (width * height * 3) as usize];
    let labelled = have_font();
    let draw = |buf: &mut [u8]| -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::with_buffer(buf, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root);
        chart.margin(12);
        if labelled {
            chart
                .caption("training loss", ("sans-serif", 18))
                .x_label_area_size(36)
                .y_label_area_size(56);
        }
        let mut chart = chart.build_cartesian_2d(x0..x1, (y0 * 0.95..y1 * 1.05).log_scale())?;
        let mut mesh = chart.configure_mesh();
        if labelled {
            mesh.x_desc("step")
                .y_desc("loss")
                .x_label_formatter(&|x| format!("{x:.0}"));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw()?;
        chart.draw_series(LineSeries::new(
            finite.iter().copied(),
            BLUE.stroke_width(2),
        ))?;
        root.present()?;
        Ok(())
    };
    draw(&mut buf).map_err(|e| Error::Input(format!("plotting the loss: {e}")))?;
    RgbImage::from_raw(width, height, buf).ok_or_else(|| Error::Input("plot buffer size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_the_curve_and_reads_logs() {
        let dir = std::env::temp_dir().join(format!("dit-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log.jsonl");
        let lines: Vec<String> = (1..=50)
            .map(|s| format!("{{\"step\":{},\"loss\":{}}}", s * 10, 1.0 / s as f64))
            .collect();
        std::fs::write(&log, lines.join("\n")).unwrap();
        let pts = read_loss_log(&log).unwrap();
        assert_eq!(pts.len(), 50);
        assert_eq!(pts[49], (500.0, 0.02));
        let img = loss_curve(&pts, 320, 240).unwrap();
        assert_eq!(img.dimensions(), (320, 240));
        // The curve is drawn in blue: some strongly blue pixels, and a white background.
        let blue = img
            .pixels()
            .filter(|p| p[2] > 200 && p[0] < 80 && p[1] < 80)
            .count();
        let white = img.pixels().filter(|p| p.0 == [255, 255, 255]).count();
        assert!(blue > 100, "{blue} blue pixels");
        assert!(white > 320 * 240 / 2);
        std::fs::write(&log, "{\"step\":1}\n").unwrap();
        assert!(read_loss_log(&log)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
