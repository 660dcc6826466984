//! 3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Why: the VAE's 3x3 convolutions already ran at this CPU's GEMM peak as nine accumulated
//! GEMMs ([`crate::ops::conv3x3`]), so only fewer multiplications could make them faster. Here
//! each 2x2 output tile reads a 4x4 input patch d, and
//!
//! ```text
//! Y = Aᵀ [ Σ_c (G g_oc Gᵀ) ⊙ (Bᵀ d_c B) ] A
//! ```
//!
//! so over a block of tiles the input becomes 16 matrices V_ξ (C_in x tiles), each multiplied by
//! the transformed kernels U_ξ (C_out x C_in), then transformed back: 16 GEMMs for four output
//! pixels per tile instead of 36, 2.25x less arithmetic. Blocks (whole tile rows of one image)
//! are sized so that V and the products M stay in cache: transforming the whole image at once
//! costs more memory traffic than the multiplications it saves.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use crate::ops::{with_avx512, zero_padded, SharedOut};

thread_local! {
    /// Each worker's V and M, kept between blocks and calls (no zeroing, no page faults).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Floats of V and M (16 (C_in + C_out) per tile) one block may hold: 4 MB.
const BLOCK_FLOATS: usize = 1 << 20;

/// A 3x3 kernel, transformed once for [`Winograd3x3::forward`].
#[derive(Debug, Clone)]
pub struct Winograd3x3 {
    /// U_ξ = G g Gᵀ for the 16 positions ξ, each (C_out x C_in) row-major.
    u: Vec<f32>,
    c_in: usize,
    c_out: usize,
}

impl Winograd3x3 {
    /// weight: (C_out, C_in, 3, 3), any float dtype and device (read once to the CPU).
    pub fn new(weight: &Tensor) -> Result<Self> {
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("winograd: kernel {:?} is not 3x3", weight.dims());
        }
        let g = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let plane = c_out * c_in;
        let mut u = vec![0f32; 16 * plane];
        // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
        let g_times = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
        for (oi, k) in g.chunks_exact(9).enumerate() {
            let cols = [0, 1, 2].map(|j| g_times(k[j], k[3 + j], k[6 + j])); // (G g) by column
            for i in 0..4 {
                let row = g_times(cols[0][i], cols[1][i], cols[2][i]); // row i of (G g) Gᵀ
                for (j, v) in row.into_iter().enumerate() {
                    u[(4 * i + j) * plane + oi] = v;
                }
            }
        }
        Ok(Self { u, c_in, c_out })
    }

    /// x: (N, C_in, H, W) f32 on the CPU, any H and W; bias: (C_out). Returns (N, C_out, H, W).
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (n, c_in, h, w) = x.dims4()?;
        if c_in != self.c_in || !x.device().is_cpu() || x.dtype() != DType::F32 {
            candle_core::bail!(
                "winograd: input {:?} {:?} on {:?} does not fit a CPU f32 kernel with {} input channels",
                x.dims(),
                x.dtype(),
                x.device(),
                self.c_in
            );
        }
        let c_out = self.c_out;
        if n * h * w == 0 {
            return Tensor::zeros((n, c_out, h, w), DType::F32, x.device());
        }
        let bias = match bias {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0f32; c_out],
        };
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let (hp, wp) = (2 * th + 2, 2 * tw + 2);
        let xpad = zero_padded(x, hp, wp)?;

        // Whole tile rows per block, within the cache budget, and at least two blocks per thread.
        let per_tile = 16 * (c_in + c_out);
        let mut rows = (BLOCK_FLOATS / per_tile / tw).clamp(1, th);
        let want = 2 * rayon::current_num_threads();
        rows = rows.min((th / want.div_ceil(n)).max(1));
        let per_image = th.div_ceil(rows);

        let mut out = vec![0f32; n * c_out * h * w];
        let dst = SharedOut(out.as_mut_ptr());
        (0..n * per_image).into_par_iter().for_each(|job| {
            let (s, ty0) = (job / per_image, (job % per_image) * rows);
            let rows = rows.min(th - ty0);
            let tiles = rows * tw;
            let src = &xpad[s * c_in * hp * wp..][..c_in * hp * wp];
            SCRATCH.with_borrow_mut(|(v, m)| {
                v.resize(16 * c_in * tiles, 0.0);
                m.resize(16 * c_out * tiles, 0.0);
                input_transform(src, (c_in, hp, wp), ty0, rows, tw, v);
                for xi in 0..16 {
                    // SAFETY: U_ξ is C_out x C_in row-major inside `u`, V_ξ is C_in x tiles and M_ξ
                    // C_out x tiles, both row-major inside `v` and `m` (sized 16 x that above).
                    unsafe {
                        gemm::gemm(
                            c_out,
                            tiles,
                            c_in,
                            m.as_mut_ptr().add(xi * c_out * tiles),
                            1,
                            tiles as isize,
                            false,
                            self.u.as_ptr().add(xi * c_out * c_in),
                            1,
                            c_in as isize,
                            v.as_ptr().add(xi * c_in * tiles),
                            1,
                            tiles as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
                // SAFETY: `out` holds N images (C_out, H, W); this job alone writes output rows
                // 2 ty0 .. 2 (ty0 + rows) of image s (bounds checked inside).
                let image = unsafe { dst.ptr().add(s * c_out * h * w) };
                unsafe { output_transform(m, image, (c_out, h, w), &bias, ty0, rows, tw) };
            });
        });
        Tensor::from_vec(out, (n, c_out, h, w), x.device())
    }
}

/// V_ξ = (Bᵀ d B)_ξ for the tiles of tile rows ty0 .. ty0 + rows of one padded image, into
/// `v`: 16 matrices (C, rows·tw) row-major. Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0],
/// [0, 1, 0, -1]]. The loops run over contiguous slices, so they vectorise.
fn input_transform(
    src: &[f32],
    (c, hp, wp): (usize, usize, usize),
    ty0: usize,
    rows: usize,
    tw: usize,
    v: &mut [f32],
) {
    with_avx512!(avx512, {
        let tiles = rows * tw;
        // Bᵀ d at the even and at the odd columns (tw + 1 each): tiles start at even columns.
        let mut even: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0f32; tw + 1]);
        let mut odd: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0f32; tw + 1]);
        for ci in 0..c {
            let plane = &src[ci * hp * wp..][..hp * wp];
            for r in 0..rows {
                let y = 2 * (ty0 + r);
                let d: [&[f32]; 4] = std::array::from_fn(|k| &plane[(y + k) * wp..][..wp]);
                for (parity, t) in [(0, &mut even), (1, &mut odd)] {
                    let [t0, t1, t2, t3] = t;
                    for x in 0..tw + 1 {
                        let at = 2 * x + parity;
                        let (d0, d1, d2, d3) = (d[0][at], d[1][at], d[2][at], d[3][at]);
                        t0[x] = d0 - d2;
                        t1[x] = d1 + d2;
                        t2[x] = d2 - d1;
                        t3[x] = d1 - d3;
                    }
                }
                // Then (Bᵀ d) B: tile tx reads columns 2 tx, 2 tx + 1, 2 tx + 2 and 2 tx + 3.
                for i in 0..4 {
                    let (e, o) = (&even[i][..tw + 1], &odd[i][..tw + 1]);
                    let rest = &mut v[((4 * i) * c + ci) * tiles + r * tw..];
                    let (v0, rest) = rest.split_at_mut(c * tiles);
                    let (v1, rest) = rest.split_at_mut(c * tiles);
                    let (v2, v3) = rest.split_at_mut(c * tiles);
                    let (v0, v1, v2, v3) =
                        (&mut v0[..tw], &mut v1[..tw], &mut v2[..tw], &mut v3[..tw]);
                    for tx in 0..tw {
                        let (a0, a1, a2, a3) = (e[tx], o[tx], e[tx + 1], o[tx + 1]);
                        v0[tx] = a0 - a2;
                        v1[tx] = a1 + a2;
                        v2[tx] = a2 - a1;
                        v3[tx] = a1 - a3;
                    }
                }
            }
        }
    })
}

/// Y = Aᵀ M A + bias for each tile, written into one image (C, H, W), cropping the tiles
/// that overhang an odd side. Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]].
///
/// # Safety
/// `image` points to C·H·W writable floats of which no one else touches rows 2 ty0 .. 2 (ty0 + rows).
#[allow(clippy::too_many_arguments)]
unsafe fn output_transform(
    m: &[f32],
    image: *mut f32,
    (c, h, w): (usize, usize, usize),
    bias: &[f32],
    ty0: usize,
    rows: usize,
    tw: usize,
) {
    let image = SharedOut(image);
    with_avx512!(avx512, {
        let image = image.ptr();
        let tiles = rows * tw;
        // One output row pair of one channel: its even and odd columns.
        let mut y: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0f32; tw]);
        for (o, &bo) in bias.iter().enumerate().take(c) {
            for r in 0..rows {
                let mx: [&[f32]; 16] =
                    std::array::from_fn(|xi| &m[(xi * c + o) * tiles + r * tw..][..tw]);
                let [y0e, y0o, y1e, y1o] = &mut y;
                let (y0e, y0o, y1e, y1o) = (
                    &mut y0e[..tw],
                    &mut y0o[..tw],
                    &mut y1e[..tw],
                    &mut y1o[..tw],
                );
                for tx in 0..tw {
                    let e = |i: usize, j: usize| mx[4 * i + j][tx];
                    // s = Aᵀ M (2 x 4), then Y = s A (2 x 2).
                    let s0: [f32; 4] = std::array::from_fn(|j| e(0, j) + e(1, j) + e(2, j));
                    let s1: [f32; 4] = std::array::from_fn(|j| e(1, j) - e(2, j) - e(3, j));
                    y0e[tx] = s0[0] + s0[1] + s0[2] + bo;
                    y0o[tx] = s0[1] - s0[2] - s0[3] + bo;
                    y1e[tx] = s1[0] + s1[1] + s1[2] + bo;
                    y1o[tx] = s1[1] - s1[2] - s1[3] + bo;
                }
                let oy = 2 * (ty0 + r);
                for (dy, (ye, yo)) in [(&*y0e, &*y0o), (&*y1e, &*y1o)].into_iter().enumerate() {
                    if oy + dy >= h {
                        break;
                    }
                    // SAFETY (this is inside the unsafe fn): row oy + dy < H of channel o,
                    // which this call alone writes.
                    let row = std::slice::from_raw_parts_mut(image.add((o * h + oy + dy) * w), w);
                    for (pair, (&a, &b)) in row.chunks_exact_mut(2).zip(ye.iter().zip(yo)) {
                        pair[0] = a;
                        pair[1] = b;
                    }
                    if w % 2 == 1 {
                        row[w - 1] = ye[w / 2];
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against candle's direct convolution: odd and even sides, batches, channel counts that
    /// leave partial GEMM panels, and blocks of one tile row (many channels) or many.
    #[test]
    fn matches_direct_convolution() {
        let dev = Device::Cpu;
        for (n, c_in, c_out, h, w) in [
            (1, 3, 5, 4, 4),
            (2, 7, 9, 5, 7),
            (1, 16, 8, 9, 6),
            (3, 4, 4, 1, 1),
            (1, 1024, 40, 6, 10),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, c_out, &dev).unwrap();
            let want = x
                .conv2d(&k, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
                .unwrap();
            let got = Winograd3x3::new(&k).unwrap().forward(&x, Some(&b)).unwrap();
            assert_eq!(got.dims(), want.dims());
            let scale = (c_in as f32 * 9.0).sqrt();
            let d = crate::test_util::max_abs_diff(&got, &want) / scale;
            assert!(d < 1e-5, "{n}x{c_in}x{h}x{w} -> {c_out}: {d}");
        }
    }

    #[test]
    fn refuses_inputs_that_do_not_fit() {
        let dev = Device::Cpu;
        let k = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap();
        let wg = Winograd3x3::new(&k).unwrap();
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev).unwrap();
        assert!(wg.forward(&x, None).is_err());
        let k5 = Tensor::zeros((4, 3, 5, 5), DType::F32, &dev).unwrap();
        assert!(Winograd3x3::new(&k5).is_err());
    }
}
