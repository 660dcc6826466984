//! 2-D convolution on channel-major activations (C, B, H, W): im2col + one matrix product.
//!
//! Why: on the CPU candle's `conv2d` reaches 14-90 GFLOP/s on the FID Inception's layers (its
//! tiled im2col copies element by element, its 1x1 path re-copies every input), while a matrix
//! product runs at ~400 GFLOP/s here. With channels first and the batch second, a convolution is
//! W (Cout, C·kh·kw) × cols (C·kh·kw, B·Ho·Wo) and its result is already (Cout, B, Ho, Wo): a 1x1
//! convolution is a bare product, concatenating channels joins contiguous blocks, and the
//! product's width spans the whole batch (17x17 maps alone are too narrow for it). The im2col
//! copies whole rows and takes asymmetric padding (1x7 / 7x1 kernels) without a padded copy.
//! Other devices permute to NCHW for candle's convolution.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conv2dGeometry {
    pub kernel: (usize, usize),
    pub stride: usize,
    /// Zero padding (height, width), each applied on both sides.
    pub pad: (usize, usize),
}

impl Conv2dGeometry {
    fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let (kh, kw) = self.kernel;
        let (ph, pw) = self.pad;
        (
            (h + 2 * ph - kh) / self.stride + 1,
            (w + 2 * pw - kw) / self.stride + 1,
        )
    }
}

/// The largest im2col matrix built at once (floats): 256 MB.
const MAX_COLS: usize = 64 << 20;

/// x (C, B, H, W) convolved with w (Cout, C, kh, kw), no bias: (Cout, B, Ho, Wo).
pub fn conv2d(x: &Tensor, w: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
    conv2d_bounded(x, w, g, MAX_COLS)
}

fn conv2d_bounded(x: &Tensor, w: &Tensor, g: Conv2dGeometry, max_cols: usize) -> Result<Tensor> {
    let (c, b, h, wd) = x.dims4()?;
    let (cout, cin, kh, kw) = w.dims4()?;
    if cin != c || (kh, kw) != g.kernel {
        candle_core::bail!(
            "conv2d: input {:?}, kernel {:?}, geometry {g:?} do not fit",
            x.dims(),
            w.dims()
        );
    }
    let (ho, wo) = g.out_size(h, wd);
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        let (ph, pw) = g.pad;
        let x = x.permute((1, 0, 2, 3))?;
        let x = match ph == pw {
            true => x,
            false => x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?,
        };
        let p = if ph == pw { ph } else { 0 };
        return x.conv2d(w, p, g.stride, 1, 1)?.permute((1, 0, 2, 3));
    }
    let rows = c * kh * kw;
    if rows * b * ho * wo > max_cols && b > 1 {
        // Bound the im2col matrix's memory: convolve the batch in parts.
        let per = (max_cols / (rows * ho * wo)).clamp(1, b - 1);
        let parts = (0..b)
            .step_by(per)
            .map(|i| conv2d_bounded(&x.narrow(1, i, per.min(b - i))?, w, g, max_cols))
            .collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&parts, 1);
    }
    let w = w.reshape((cout, rows))?;
    let cols = if (kh, kw, g.stride, g.pad) == (1, 1, 1, (0, 0)) {
        x.reshape((c, b * h * wd))?
    } else {
        x.contiguous()?.apply_op1_no_bwd(&Im2Col(g))?
    };
    w.matmul(&cols)?.reshape((cout, b, ho, wo))
}

/// (C, B, H, W) -> (C·kh·kw, B·Ho·Wo), rows ordered (c, ky, kx) like a flattened kernel.
struct Im2Col(Conv2dGeometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (c, b, h, w) = layout.shape().dims4()?;
        let (ho, wo) = g.out_size(h, w);
        let (kh, kw) = g.kernel;
        let (ph, pw) = (g.pad.0 as isize, g.pad.1 as isize);
        let (a, z) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("im2col: input must be contiguous".into()))?;
        let src = &storage.as_slice::<f32>()?[a..z];
        let rows = c * kh * kw;
        let mut out = vec![0f32; rows * b * ho * wo];
        // One (tap (c, ky, kx), image) pair per task: Ho·Wo outputs.
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(task, dst)| {
                let (r, img) = (task / b, task % b);
                let (ch, ky, kx) = (r / (kh * kw), r / kw % kh, r % kw);
                let plane = &src[(ch * b + img) * h * w..][..h * w];
                for oy in 0..ho {
                    let iy = (oy * g.stride + ky) as isize - ph;
                    let dst = &mut dst[oy * wo..][..wo];
                    if iy < 0 || iy >= h as isize {
                        continue; // zero padding: already zero
                    }
                    let line = &plane[iy as usize * w..][..w];
                    if g.stride == 1 {
                        // Output pixels ox read ix = ox + kx - pw: one contiguous run.
                        let shift = kx as isize - pw;
                        let lo = (-shift).clamp(0, wo as isize) as usize;
                        let hi = (w as isize - shift).clamp(lo as isize, wo as isize) as usize;
                        if hi > lo {
                            let from = (lo as isize + shift) as usize;
                            dst[lo..hi].copy_from_slice(&line[from..from + (hi - lo)]);
                        }
                        continue;
                    }
                    for (ox, d) in dst.iter_mut().enumerate() {
                        let ix = (ox * g.stride + kx) as isize - pw;
                        if ix >= 0 && ix < w as isize {
                            *d = line[ix as usize];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((rows, b * ho * wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against candle's own convolution, for the kernel shapes, strides and paddings the
    /// Inception network uses (and an asymmetric padding candle does by a padded copy).
    #[test]
    fn matches_candle_conv2d() {
        let dev = Device::Cpu;
        for (k, stride, pad, hw) in [
            ((3, 3), 2, (0, 0), (11, 9)),
            ((3, 3), 1, (1, 1), (7, 8)),
            ((1, 7), 1, (0, 3), (6, 9)),
            ((7, 1), 1, (3, 0), (9, 6)),
            ((5, 5), 1, (2, 2), (7, 7)),
            ((1, 1), 1, (0, 0), (5, 4)),
            ((1, 1), 2, (0, 0), (5, 4)),
        ] {
            let x = Tensor::randn(0f32, 1.0, (3, 3, hw.0, hw.1), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (4, 3, k.0, k.1), &dev).unwrap();
            let g = Conv2dGeometry {
                kernel: k,
                stride,
                pad,
            };
            let want = x
                .pad_with_zeros(2, pad.0, pad.0)
                .unwrap()
                .pad_with_zeros(3, pad.1, pad.1)
                .unwrap()
                .conv2d(&w, 0, stride, 1, 1)
                .unwrap();
            let cbhw = x.permute((1, 0, 2, 3)).unwrap().contiguous().unwrap();
            let got = conv2d(&cbhw, &w, g).unwrap().permute((1, 0, 2, 3)).unwrap();
            assert_eq!(got.dims(), want.dims(), "{g:?}");
            // The batch in parts of two and one image gives the same.
            let (_, _, ho, wo) = want.dims4().unwrap();
            let limit = 2 * 3 * k.0 * k.1 * ho * wo;
            let parts = conv2d_bounded(&cbhw, &w, g, limit).unwrap();
            let parts = parts.permute((1, 0, 2, 3)).unwrap();
            let same = (&parts - &got).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0, "{g:?}");
            let d = crate::test_util::max_abs_diff(&got, &want);
            assert!(d < 1e-4, "{g:?}: {d}");
        }
    }
}
