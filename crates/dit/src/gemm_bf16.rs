//! A bf16 GEMM for `Linear` layers on x86-64 CPUs with AVX512-BF16, the one op candle 0.11's
//! CPU backend lacks for bf16 models.
//!
//! y (M x N) = x (M x K) W^T + b, bf16 inputs, f32 accumulation (`vdpbf16ps` multiplies pairs of
//! bf16 along K and accumulates in f32). W is packed once, at load time, into panels of 32
//! output columns with K interleaved in pairs, so the kernel streams it with plain loads.
//! Other CPUs, devices and dtypes keep candle's matmul.

use candle_core::{DType, Module, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::ops::{with_avx512, SharedOut};

/// Output columns per packed panel (two 16-lane f32 accumulators).
const NR: usize = 32;
/// Rows per micro-kernel call: 12 x 2 accumulators + 2 weight vectors + 1 broadcast fit the
/// 32 vector registers.
const MR: usize = 12;
/// K per cache block: a panel block (32 x 512 bf16 = 32 KiB) stays in L1/L2 across the rows.
const KC: usize = 512;

/// Whether this CPU has the instructions the kernel needs.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// W (N x K) packed as [panel][k pair][column 0..32][2], zero-padded to whole panels and pairs.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    data: Vec<bf16>,
    n: usize,
    k: usize,
    k_pairs: usize,
}

impl PackedWeight {
    pub fn new(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let w = w.to_dtype(DType::BF16)?.to_vec2::<bf16>()?;
        let (panels, k_pairs) = (n.div_ceil(NR), k.div_ceil(2));
        let mut data = vec![bf16::ZERO; panels * k_pairs * NR * 2];
        for (col, row) in w.iter().enumerate() {
            let (p, j) = (col / NR, col % NR);
            for (kk, &v) in row.iter().enumerate() {
                data[((p * k_pairs + kk / 2) * NR + j) * 2 + kk % 2] = v;
            }
        }
        Ok(Self {
            data,
            n,
            k,
            k_pairs,
        })
    }
}

/// x (M x K, bf16, contiguous rows) times the packed W^T, plus bias, into bf16 (M x N).
fn gemm(x: &[bf16], m: usize, w: &PackedWeight, bias: Option<&[f32]>) -> Vec<bf16> {
    let (n, k, kp) = (w.n, w.k, w.k_pairs);
    // x with K padded to even, so every pair is one aligned 32-bit broadcast.
    let k2 = 2 * kp;
    let xp: Vec<bf16> = if k2 == k {
        x.to_vec()
    } else {
        x.chunks_exact(k)
            .flat_map(|r| r.iter().copied().chain(std::iter::once(bf16::ZERO)))
            .collect()
    };
    let mut out = vec![bf16::ZERO; m * n];
    let dst = SharedOut(out.as_mut_ptr());
    // One task per panel: all rows of its 32 columns, accumulated in an f32 tile.
    (0..n.div_ceil(NR)).into_par_iter().for_each_init(
        || vec![0f32; m * NR],
        |c, p| {
            c.iter_mut().for_each(|v| *v = 0.0);
            let wp = &w.data[p * kp * NR * 2..(p + 1) * kp * NR * 2];
            for k0 in (0..kp).step_by(KC / 2) {
                let k1 = (k0 + KC / 2).min(kp);
                for m0 in (0..m).step_by(MR) {
                    let rows = MR.min(m - m0);
                    // SAFETY: `Linear` packs only where `available()`; indices stay inside
                    // xp (m x k2), wp (kp x NR x 2) and c (m x NR).
                    unsafe {
                        kernel(
                            &xp[m0 * k2..],
                            k2,
                            &wp[k0 * NR * 2..],
                            k0,
                            k1,
                            &mut c[m0 * NR..],
                            rows,
                        )
                    };
                }
            }
            let cols = NR.min(n - p * NR);
            let bias: [f32; NR] = std::array::from_fn(|j| match bias {
                Some(b) if j < cols => b[p * NR + j],
                _ => 0.0,
            });
            with_avx512!(avx512, {
                for (i, row) in c.chunks_exact(NR).enumerate() {
                    // SAFETY: columns p*NR .. p*NR + cols of every row belong to this task only.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(dst.ptr().add(i * n + p * NR), cols)
                    };
                    for ((o, v), b) in out.iter_mut().zip(row).zip(&bias) {
                        *o = bf16::from_f32(v + b);
                    }
                }
            })
        },
    );
    out
}

/// C[R x 32] += x[R rows, pairs k0..k1] W-panel. R is a constant so the accumulators live in
/// registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_rows<const R: usize>(
    x: &[bf16],
    ldx: usize,
    wp: &[bf16],
    k0: usize,
    k1: usize,
    c: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for (i, a) in acc.iter_mut().enumerate() {
        a[0] = _mm512_loadu_ps(c.as_ptr().add(i * NR));
        a[1] = _mm512_loadu_ps(c.as_ptr().add(i * NR + 16));
    }
    let xp = x.as_ptr() as *const u32;
    let mut wv = wp.as_ptr() as *const __m512i;
    for kk in k0..k1 {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wv));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(wv.add(1)));
        wv = wv.add(2);
        for (i, a) in acc.iter_mut().enumerate() {
            let pair = *xp.add(i * ldx / 2 + kk);
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
            a[0] = _mm512_dpbf16_ps(a[0], av, b0);
            a[1] = _mm512_dpbf16_ps(a[1], av, b1);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.as_mut_ptr().add(i * NR), a[0]);
        _mm512_storeu_ps(c.as_mut_ptr().add(i * NR + 16), a[1]);
    }
}

/// [`kernel_rows`] for any 1..=MR rows.
#[cfg(target_arch = "x86_64")]
unsafe fn kernel(
    x: &[bf16],
    ldx: usize,
    wp: &[bf16],
    k0: usize,
    k1: usize,
    c: &mut [f32],
    rows: usize,
) {
    macro_rules! dispatch {
        ($($r:literal)*) => {
            match rows {
                $($r => kernel_rows::<$r>(x, ldx, wp, k0, k1, c),)*
                _ => unreachable!("at most MR rows"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: &[bf16], _: usize, _: &[bf16], _: usize, _: usize, _: &mut [f32], _: usize) {
    unreachable!("the bf16 kernel is only selected where `available()`")
}

/// A `Linear` layer that runs bf16 CPU inputs through the packed kernel (when the CPU has it)
/// and everything else through candle.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    packed: Option<(PackedWeight, Option<Vec<f32>>)>,
    /// Fixed f32 CPU weights stored transposed, W^T (K, N) row-major: the GEMM packs its panels
    /// with vector copies instead of a gather across W's rows (a quarter of the time of
    /// 16-token images). `inner` then holds the (N, K) view of the same storage.
    transposed: Option<Tensor>,
}

impl Linear {
    pub fn new(inner: candle_nn::Linear) -> Result<Self> {
        let w = inner.weight();
        let fixed_cpu = w.device().is_cpu() && !w.track_op();
        let packed = if fixed_cpu && w.dtype() == DType::BF16 && available() {
            let bias = inner
                .bias()
                .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
                .transpose()?;
            Some((PackedWeight::new(w)?, bias))
        } else {
            None
        };
        if fixed_cpu && w.dtype() == DType::F32 && inner.bias().is_some() {
            let wt = w.t()?.contiguous()?;
            let inner = candle_nn::Linear::new(wt.t()?, inner.bias().cloned());
            return Ok(Self {
                inner,
                packed,
                transposed: Some(wt),
            });
        }
        Ok(Self {
            inner,
            packed,
            transposed: None,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (Some(wt), Some(b)) = (&self.transposed, self.inner.bias()) {
            if x.dtype() == DType::F32 && x.device().is_cpu() && !x.track_op() {
                return on_rows(x, wt.dim(1)?, |rows| {
                    crate::ops::linear_transposed(rows, wt, b)
                });
            }
        }
        match &self.packed {
            Some((w, bias)) if x.dtype() == DType::BF16 && !x.track_op() => {
                let dims = x.dims().to_vec();
                let k = *dims.last().unwrap_or(&0);
                let m = x.elem_count() / k.max(1);
                let xs = x.flatten_all()?.to_vec1::<bf16>()?;
                let y = gemm(&xs, m, w, bias.as_deref());
                let mut shape = dims;
                *shape.last_mut().expect("rank >= 1") = w.n;
                Tensor::from_vec(y, shape, x.device())
            }
            _ => {
                // All rows as one 2-D GEMM onto the bias (its backward pass: GEMMs too; GPUs: the
                // fused bias kernel after it). candle-nn's Linear broadcasts the weight over the
                // batch, which runs one GEMM per sample and packs the weight again for each.
                let w = self.inner.weight();
                on_rows(x, w.dim(0)?, |rows| match self.inner.bias() {
                    Some(b) => crate::ops::linear(rows, w, b),
                    None => rows.matmul(&w.t()?),
                })
            }
        }
    }
}

/// `f` of x's rows as one (M, K) matrix, its (M, n) result shaped as x with `n` last.
fn on_rows(x: &Tensor, n: usize, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    let k = *shape.last().unwrap_or(&0);
    let rows = x.contiguous()?.reshape((x.elem_count() / k.max(1), k))?;
    *shape.last_mut().expect("rank >= 1") = n;
    f(&rows)?.reshape(shape)
}

/// `candle_nn::linear`, wrapped in [`Linear`].
pub fn linear(in_dim: usize, out_dim: usize, vb: candle_nn::VarBuilder) -> Result<Linear> {
    Linear::new(candle_nn::linear(in_dim, out_dim, vb)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, max_abs_diff};
    use candle_core::Device;

    #[test]
    fn bf16_linear_matches_f32_matmul_of_the_same_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (m, k, n) in [(1, 2, 1), (13, 7, 33), (30, 1100, 70), (2, 64, 32)] {
            let dev = Device::Cpu;
            // Values exactly representable in bf16, so the only difference is accumulation order.
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let lin = Linear::new(candle_nn::Linear::new(w.clone(), Some(b.clone()))).unwrap();
            assert!(lin.packed.is_some());
            let got = lin.forward(&x).unwrap().to_dtype(DType::F32).unwrap();
            let (xf, wf, bf) = (
                x.to_dtype(DType::F32).unwrap(),
                w.to_dtype(DType::F32).unwrap(),
                b.to_dtype(DType::F32).unwrap(),
            );
            let want = xf
                .matmul(&wf.t().unwrap())
                .unwrap()
                .broadcast_add(&bf)
                .unwrap();
            let err = max_abs_diff(&got, &want);
            let scale = max_abs(&want);
            // The result is rounded to bf16 (8 bits of mantissa).
            assert!(err <= scale * 1e-2, "({m}, {k}, {n}): err {err} of {scale}");
        }
    }
}
