//! Fast CPU kernels for the hot spots of the DiT forward pass outside the big GEMMs.
//!
//! - GELU: candle's CPU unary ops run on one thread and its GELU calls `tanhf` per element; in
//!   DiT-XL/2 the MLP's GELU over (N, T, 4D) was ~15% of the forward pass. Here it is
//!   multi-threaded and written as x * sigmoid(2u) (= 0.5 x (1 + tanh u)): one `exp` per element.
//! - Self-attention: softmax(q k^T / sqrt(d)) v read straight out of the fused qkv projection,
//!   one (sample, head) per task, with single-threaded GEMMs. candle's path copies q, k and v
//!   out of qkv, runs many tiny multi-threaded GEMMs (T x 64 x T) and a separate softmax pass.
//!
//! GELU, attention, LayerNorm+modulation and the gated residual have backward passes (training
//! runs them too: candle's composite ops were 5x slower per step); the VAE's convolution and
//! GroupNorm kernels have none, so on tensors that track gradients they take candle's path.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Runs `$body` compiled for AVX-512 (or else AVX2) when the CPU has it: the crate is built
/// for baseline x86-64, where these element-wise loops would run four floats wide.
/// `$name` names the compiled copies (`…::avx512` in a profile).
macro_rules! with_avx512 {
    ($name:ident, $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn $name<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            /// `level` 2: AVX-512F, 1: AVX2, as detected below.
            fn run<R>(level: u8, f: impl FnOnce() -> R) -> R {
                // SAFETY: the caller detected the level's features on this CPU.
                unsafe {
                    match level {
                        2 => $name(f),
                        _ => avx2(f),
                    }
                }
            }
            if std::is_x86_feature_detected!("avx512f") {
                return run(
                    2,
                    #[inline(always)]
                    || $body,
                );
            }
            if std::is_x86_feature_detected!("avx2") {
                return run(
                    1,
                    #[inline(always)]
                    || $body,
                );
            }
        }
        $body
    }};
}
pub(crate) use with_avx512;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// Elements per parallel task: large enough that scheduling is negligible.
const CHUNK: usize = 1 << 14;

/// exp(x) in f32 without a libm call, so loops over it vectorise: 2^k e^r with k = round(x / ln 2)
/// (by the add-and-subtract-1.5*2^23 trick) and a degree-6 Taylor polynomial on |r| <= ln 2 / 2.
/// Relative error below 3e-7 on the clamped range [-87, 88].
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    f32::from_bits(((k as i32 + 127) as u32) << 23) * p
}

#[inline]
fn gelu_tanh_f32(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x);
    x / (1.0 + fast_exp(-2.0 * u))
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh-par"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("gelu: input must be contiguous".into()))?;
        let out = match storage {
            CpuStorage::F32(v) => {
                let src = &v[start..end];
                let mut out = vec![0f32; src.len()];
                out.par_chunks_mut(CHUNK)
                    .zip(src.par_chunks(CHUNK))
                    .for_each(|(o, s)| {
                        with_avx512!(avx512, {
                            o.iter_mut()
                                .zip(s)
                                .for_each(|(o, &x)| *o = gelu_tanh_f32(x))
                        })
                    });
                CpuStorage::F32(out)
            }
            CpuStorage::BF16(v) => {
                let src = &v[start..end];
                let mut out = vec![half::bf16::ZERO; src.len()];
                out.par_chunks_mut(CHUNK)
                    .zip(src.par_chunks(CHUNK))
                    .for_each(|(o, s)| {
                        with_avx512!(avx512, {
                            o.iter_mut().zip(s).for_each(|(o, x)| {
                                *o = half::bf16::from_f32(gelu_tanh_f32(x.to_f32()))
                            })
                        })
                    });
                CpuStorage::BF16(out)
            }
            _ => candle_core::bail!("gelu: only f32 and bf16 have a CPU kernel here"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_dtype(DType::F32)?.contiguous()?;
        let dx = arg
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op2_no_bwd(&g, &GeluTanhGrad)?;
        Ok(Some(dx.to_dtype(arg.dtype())?))
    }
}

/// d/dx of x * s with s = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3):
/// s + 2 x s (1 - s) u'(x).
#[inline]
fn gelu_tanh_grad_f32(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x);
    let s = 1.0 / (1.0 + fast_exp(-2.0 * u));
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x);
    s + 2.0 * x * s * (1.0 - s) * du
}

/// grad * GELU'(x), f32.
struct GeluTanhGrad;

impl candle_core::CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (cpu_slice::<f32>(s1, l1)?, cpu_slice::<f32>(s2, l2)?);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| {
                with_avx512!(avx512, {
                    for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                        *o = g * gelu_tanh_grad_f32(x);
                    }
                })
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GELU with the tanh approximation (timm's `GELU(approximate="tanh")`). Multi-threaded on the
/// CPU for f32 / bf16; candle's own op elsewhere.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::ops_cuda::applies(&[x]) {
        return crate::ops_cuda::gelu_tanh(x);
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        x.contiguous()?.apply_op1(GeluTanh)
    } else {
        x.gelu()
    }
}

/// x W^T + b for x (M, K), W (N, K), b (N): one GEMM accumulating onto the bias rows, f32 on the
/// CPU (candle's ops elsewhere). As one op it keeps only its inputs for the backward pass, as
/// torch's addmm does; a matmul followed by a bias add kept the (M, N) product alive twice.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::ops_cuda::applies(&[x, w, b]) {
        return crate::ops_cuda::linear(x, w, b);
    }
    if fusable(&[x, w, b]) && x.dtype() == DType::F32 {
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearOp)
    } else {
        x.matmul(&w.t()?)?.broadcast_add(b)
    }
}

struct LinearOp;

/// x (m x k, row-major) times the k x n matrix at `rhs` with (column, row) strides, onto the
/// bias b (n) in every row: one multi-threaded GEMM.
fn gemm_onto_bias(
    x: &[f32],
    (m, k, n): (usize, usize, usize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (usize, usize),
    b: &[f32],
) -> Vec<f32> {
    assert!(x.len() >= m * k && rhs.len() >= k * n && b.len() == n);
    assert!((k.max(1) - 1) * rhs_rs + (n.max(1) - 1) * rhs_cs < rhs.len().max(1));
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    for _ in 0..m {
        out.extend_from_slice(b);
    }
    // SAFETY: out is m x n (row stride n), x is m x k (row stride k), rhs is read at
    // kk * rhs_rs + j * rhs_cs for kk < k, j < n: all in bounds (asserted above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    out
}

/// Inference x W^T + b for x (M, K) and a weight stored transposed, wt = W^T (K, N) row-major,
/// f32 on the CPU (no gradient).
pub fn linear_transposed(x: &Tensor, wt: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ((m, k), (k2, n)) = (x.dims2()?, wt.dims2()?);
    if k != k2 || b.dims1()? != n {
        candle_core::bail!(
            "linear: x {:?}, W^T {:?}, b {:?}",
            x.shape(),
            wt.shape(),
            b.shape()
        );
    }
    let b = b.to_vec1::<f32>()?;
    let out = with_f32_slice(x, |x| {
        with_f32_slice(wt, |w| gemm_onto_bias(x, (m, k, n), w, (1, n), &b))
    })??;
    Tensor::from_vec(out, (m, n), &candle_core::Device::Cpu)
}

impl candle_core::CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 || l3.shape().dims1()? != n {
            candle_core::bail!(
                "linear: x {:?}, w {:?}, b {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let (x, w, b) = (
            cpu_slice::<f32>(s1, l1)?,
            cpu_slice::<f32>(s2, l2)?,
            cpu_slice::<f32>(s3, l3)?,
        );
        // W^T (k x n) read from the n x k row-major w: column stride k, row stride 1.
        let out = gemm_onto_bias(x, (m, k, n), w, (k, 1), b);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    /// dx = g W, dW = g^T x, db = 1^T g (a GEMM, not a strided reduction).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads3> {
        let (x, w) = (x.detach(), w.detach()); // see `RowWise3::bwd`
        let m = x.dim(0)?;
        let n = w.dim(0)?;
        let g = grad.contiguous()?;
        let ones = Tensor::ones((1, m), DType::F32, x.device())?;
        Ok((
            Some(g.matmul(&w)?),
            Some(g.t()?.matmul(&x)?),
            Some(ones.matmul(&g)?.reshape(n)?),
        ))
    }
}

/// softmax(q k^T / sqrt(hd)) v for every head, from the output of a fused qkv projection.
/// qkv: (N, T, 3 * D) with q, k, v each split into `num_heads` heads of D / num_heads channels
/// (the layout of timm's `Attention`); returns (N, T, D) with the heads concatenated.
pub fn self_attention(qkv: &Tensor, num_heads: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::ops_cuda::applies(&[qkv]) {
        return crate::ops_cuda::self_attention(qkv, num_heads);
    }
    if qkv.device().is_cpu() && qkv.dtype() == DType::BF16 && !qkv.track_op() {
        // Attention is a small share of the work; run it in f32 (as autocast does for softmax).
        return self_attention(&qkv.to_dtype(DType::F32)?, num_heads)?.to_dtype(DType::BF16);
    }
    if qkv.device().is_cpu() && qkv.dtype() == DType::F32 {
        qkv.contiguous()?
            .apply_op1(FusedSelfAttention { num_heads })
    } else {
        self_attention_unfused(qkv, num_heads)
    }
}

/// The same computation with candle's tensor ops (any device and dtype).
pub fn self_attention_unfused(qkv: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (n, t, d3) = qkv.dims3()?;
    let (d, hd) = (d3 / 3, d3 / 3 / num_heads);
    // (N, T, 3, H, hd) -> (3, N, H, T, hd)
    let qkv = qkv
        .reshape((n, t, 3, num_heads, hd))?
        .permute((2, 0, 3, 1, 4))?;
    let q = (qkv.get(0)? * (hd as f64).powf(-0.5))?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let attn = candle_nn::ops::softmax(&q.matmul(&k.t()?)?, D::Minus1)?;
    attn.matmul(&v)?.transpose(1, 2)?.reshape((n, t, d))
}

struct FusedSelfAttention {
    num_heads: usize,
}

/// A pointer that parallel tasks share to write disjoint parts of one buffer. Whoever creates
/// one must make every task write a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<T>(pub(crate) *mut T);
// SAFETY: tasks write disjoint elements (the creator's obligation, see above).
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw field.
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}

impl CustomOp1 for FusedSelfAttention {
    fn name(&self) -> &'static str {
        "fused-self-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, t, d3) = layout.shape().dims3()?;
        let h = self.num_heads;
        if d3 % (3 * h) != 0 {
            candle_core::bail!("attention: qkv width {d3} is not 3 x heads ({h}) x head size");
        }
        let (d, hd) = (d3 / 3, d3 / 3 / h);
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("attention: qkv must be contiguous".into()))?;
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("attention: f32 only")
        };
        let src = &v[start..end];
        let mut out = vec![0f32; n * t * d];
        let dst = SharedOut(out.as_mut_ptr());
        let scale = (hd as f32).powf(-0.5);
        let (d3i, di, ti) = (d3 as isize, d as isize, t as isize);
        (0..n * h).into_par_iter().for_each_init(
            || vec![0f32; t * t],
            |scores, bh| {
                let (b, head) = (bh / h, bh % h);
                let q = src[b * t * d3 + head * hd..].as_ptr();
                // SAFETY: q, k, v index rows of `src` with row stride 3D within sample b; the
                // output head occupies columns head*hd.. of sample b's rows, written by this task only.
                unsafe {
                    let (k, v) = (q.add(d), q.add(2 * d));
                    // scores (T x T) = scale * q (T x hd) k^T (hd x T)
                    let sc = scores.as_mut_ptr();
                    head_gemm((t, t, hd), sc, ti, q, (1, d3i), k, (d3i, 1), scale);
                    softmax_rows(scores, t);
                    // out (T x hd) = scores (T x T) v (T x hd)
                    let o = dst.ptr().add(b * t * d + head * hd);
                    head_gemm(
                        (t, hd, t),
                        o,
                        di,
                        scores.as_ptr(),
                        (1, ti),
                        v,
                        (1, d3i),
                        1.0,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n, t, d))))
    }

    /// Recomputes the probabilities P (the forward pass keeps none), in one fused pass per
    /// (sample, head): see [`FusedSelfAttentionGrad`].
    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let op = FusedSelfAttentionGrad {
            num_heads: self.num_heads,
        };
        // (An op without a backward pass records nothing: the gradient holds no graph.)
        let dqkv = qkv
            .contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &op)?;
        Ok(Some(dqkv))
    }
}

/// c (m x n, row stride `rs_c`) = alpha a b, for a (m x k) and b (k x n) given as pointers with
/// (column, row) strides (so a transposed operand is the same memory with its strides swapped);
/// single-threaded, as each attention task runs one head.
///
/// # Safety
/// Every element the shapes and strides address must be in bounds; no one else writes `c`'s.
#[allow(clippy::too_many_arguments)]
unsafe fn head_gemm(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    rs_c: isize,
    a: *const f32,
    (a_cs, a_rs): (isize, isize),
    b: *const f32,
    (b_cs, b_rs): (isize, isize),
    alpha: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        rs_c,
        false,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        0.0,
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Softmax of each row (length `t`) of `x`, in place.
fn softmax_rows(x: &mut [f32], t: usize) {
    with_avx512!(avx512, {
        for row in x.chunks_exact_mut(t) {
            let max = lanes_fold(row, f32::NEG_INFINITY, f32::max);
            row.iter_mut().for_each(|x| *x = fast_exp(*x - max));
            let inv = 1.0 / lanes_fold(row, 0.0, |a, b| a + b);
            row.iter_mut().for_each(|x| *x *= inv);
        }
    })
}

/// Σ f(x) in 16 independent lanes (vectorisable; see [`lanes_fold`]).
#[inline(always)]
fn lanes_sum<T: Elem>(x: &[T], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| f(v.get())).sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += f(c[i].get());
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Folds `x` with `f` in 16 independent lanes, then folds the lanes: a reduction the compiler
/// can vectorise (a single running value is a serial dependency it may not reorder).
#[inline(always)]
fn lanes_fold(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    for c in chunks {
        for i in 0..16 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    acc.into_iter().fold(tail, f)
}

/// The gradient of [`FusedSelfAttention`] with respect to qkv, given dO (N, T, D). Per (sample,
/// head), with S = scale Q K^T and P = softmax(S) recomputed into a T x T buffer:
/// dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dP P)), dQ = scale dS K, dK = scale dS^T Q.
/// Two T x T buffers per thread instead of five (N, H, T, T) tensors.
struct FusedSelfAttentionGrad {
    num_heads: usize,
}

impl candle_core::CustomOp2 for FusedSelfAttentionGrad {
    fn name(&self) -> &'static str {
        "fused-self-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, t, d3) = l1.shape().dims3()?;
        let h = self.num_heads;
        let (d, hd) = (d3 / 3, d3 / 3 / h);
        if l2.shape().dims3()? != (n, t, d) {
            candle_core::bail!("attention grad: qkv {:?}, dO {:?}", l1.shape(), l2.shape());
        }
        let (qkv, d_o) = (cpu_slice::<f32>(s1, l1)?, cpu_slice::<f32>(s2, l2)?);
        let mut out = vec![0f32; n * t * d3];
        let dst = SharedOut(out.as_mut_ptr());
        let scale = (hd as f32).powf(-0.5);
        let (d3i, di, ti) = (d3 as isize, d as isize, t as isize);
        (0..n * h).into_par_iter().for_each_init(
            || (vec![0f32; t * t], vec![0f32; t * t]),
            |(p, dp), bh| {
                let (b, head) = (bh / h, bh % h);
                let off = b * t * d3 + head * hd;
                // SAFETY (every product below): operands are the T x T buffers or head slices
                // of sample b's rows of qkv / dO / out; this task alone writes head `head` of
                // sample b in `out`.
                unsafe {
                    let q = qkv.as_ptr().add(off);
                    let (k, v) = (q.add(d), q.add(2 * d));
                    let g = d_o.as_ptr().add(b * t * d + head * hd);
                    let dq = dst.ptr().add(off);
                    let (dk, dv) = (dq.add(d), dq.add(2 * d));
                    // P = softmax(scale Q K^T), row by row.
                    head_gemm(
                        (t, t, hd),
                        p.as_mut_ptr(),
                        ti,
                        q,
                        (1, d3i),
                        k,
                        (d3i, 1),
                        scale,
                    );
                    softmax_rows(p, t);
                    // dV = P^T dO; dP = dO V^T.
                    head_gemm((t, hd, t), dv, d3i, p.as_ptr(), (ti, 1), g, (1, di), 1.0);
                    head_gemm(
                        (t, t, hd),
                        dp.as_mut_ptr(),
                        ti,
                        g,
                        (1, di),
                        v,
                        (d3i, 1),
                        1.0,
                    );
                    // dS = P (dP - rowsum(dP P)), in place of dP.
                    for (pr, dr) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
                        let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                        for (pv, dv) in pr.iter().zip(dr.iter_mut()) {
                            *dv = pv * (*dv - dot);
                        }
                    }
                    // dQ = scale dS K; dK = scale dS^T Q.
                    head_gemm(
                        (t, hd, t),
                        dq,
                        d3i,
                        dp.as_ptr(),
                        (1, ti),
                        k,
                        (1, d3i),
                        scale,
                    );
                    head_gemm(
                        (t, hd, t),
                        dk,
                        d3i,
                        dp.as_ptr(),
                        (ti, 1),
                        q,
                        (1, d3i),
                        scale,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n, t, d3))))
    }
}

/// 3x3 convolution, stride 1, padding 1 (the VAE's workhorse) as nine accumulated GEMMs.
///
/// With the input zero-padded to (C, H + 2, W + 2) and flattened, the tap (kh, kw) of every
/// output pixel is one contiguous run of the padded input, if the output is computed W + 2 wide
/// (two garbage columns per row, cropped at the end). So each tap is a plain
/// (C_out x C_in) x (C_in x H (W + 2)) GEMM into the same output, with no im2col buffer.
/// x: (N, C_in, H, W), weight: (C_out, C_in, 3, 3), bias: (C_out). CPU f32; candle's conv elsewhere.
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let tracked = x.track_op() || weight.track_op();
    if !(x.device().is_cpu() && x.dtype() == DType::F32) || tracked {
        let y = x.conv2d(weight, 1, 1, 1, 1)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        };
    }
    let (n, c_in, h, w) = x.dims4()?;
    let (c_out, wc, kh, kw) = weight.dims4()?;
    if (wc, kh, kw) != (c_in, 3, 3) {
        candle_core::bail!(
            "conv3x3: weight {:?} does not fit input {:?}",
            weight.dims(),
            x.dims()
        );
    }
    let x = x.contiguous()?;
    let wv = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let xpad = padded_input(&x)?;
    let taps: Vec<Tap> = (0..9)
        .map(|t| Tap {
            w: &wv[t..],
            w_cs: 9,
            w_rs: c_in * 9,
            dy: t / 3,
            dx: t % 3,
        })
        .collect();
    let wide = accumulate_taps(&xpad, (n, c_in, h, w), c_out, &taps);
    // Crop the two garbage columns of each row and add the bias, in one pass.
    let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    let mut y = vec![0f32; n * c_out * h * w];
    y.par_chunks_mut(h * w)
        .zip(wide.par_chunks(h * (w + 2)))
        .enumerate()
        .for_each(|(nc, (dst, src))| {
            let b = bias.as_ref().map_or(0.0, |b| b[nc % c_out]);
            for (d, s) in dst.chunks_exact_mut(w).zip(src.chunks_exact(w + 2)) {
                d.iter_mut().zip(&s[..w]).for_each(|(d, s)| *d = s + b);
            }
        });
    Tensor::from_vec(y, (n, c_out, h, w), x.device())
}

/// Nearest-neighbour 2x upsampling followed by a 3x3 convolution (stride 1, padding 1), without
/// materialising the upsampled image: each of the four output phases (row and column parity) is
/// a 2x2 convolution of the low-resolution input whose taps are sums of the 3x3 taps. 16 taps at
/// low resolution instead of 9 at high resolution: 2.25x less arithmetic, same result.
pub fn upsample2x_conv3x3(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let tracked = x.track_op() || weight.track_op();
    if !(x.device().is_cpu() && x.dtype() == DType::F32) || tracked {
        let (_, _, h, w) = x.dims4()?;
        return conv3x3(&x.upsample_nearest2d(2 * h, 2 * w)?, weight, bias);
    }
    let (n, c_in, h, w) = x.dims4()?;
    let (c_out, wc, kh, kw) = weight.dims4()?;
    if (wc, kh, kw) != (c_in, 3, 3) {
        candle_core::bail!(
            "upsample conv: weight {:?} does not fit input {:?}",
            weight.dims(),
            x.dims()
        );
    }
    let x = x.contiguous()?;
    let wv = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    // Which 3x3 rows (or columns) fold into 2x2 tap i of output phase a: the upsampled rows
    // 2y + a - 1 .. 2y + a + 1 come from input rows y + a - 1 + i.
    let fold = |a: usize, i: usize| -> &'static [usize] {
        match (a, i) {
            (0, 0) => &[0],
            (0, _) => &[1, 2],
            (_, 0) => &[0, 1],
            _ => &[2],
        }
    };
    let xpad = padded_input(&x)?;
    let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    let (h2, w2) = (2 * h, 2 * w);
    let mut y = vec![0f32; n * c_out * h2 * w2];
    for (a, b) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        // Folded 2x2 weights of this phase, each (C_out x C_in) row-major.
        let folded: Vec<Vec<f32>> = (0..4)
            .map(|ij| {
                let (i, j) = (ij / 2, ij % 2);
                let mut m = vec![0f32; c_out * c_in];
                for (oc, v) in m.iter_mut().enumerate() {
                    for &dy in fold(a, i) {
                        for &dx in fold(b, j) {
                            *v += wv[oc * 9 + dy * 3 + dx];
                        }
                    }
                }
                m
            })
            .collect();
        let taps: Vec<Tap> = (0..4)
            .map(|ij| Tap {
                w: &folded[ij],
                w_cs: 1,
                w_rs: c_in,
                dy: a + ij / 2,
                dx: b + ij % 2,
            })
            .collect();
        let wide = accumulate_taps(&xpad, (n, c_in, h, w), c_out, &taps);
        // Scatter this phase into every other row and column, adding the bias.
        y.par_chunks_mut(h2 * w2)
            .zip(wide.par_chunks(h * (w + 2)))
            .enumerate()
            .for_each(|(nc, (dst, src))| {
                let bv = bias.as_ref().map_or(0.0, |bv| bv[nc % c_out]);
                for (r, s) in src.chunks_exact(w + 2).enumerate() {
                    let row = &mut dst[(2 * r + a) * w2..(2 * r + a + 1) * w2];
                    for (c, v) in s[..w].iter().enumerate() {
                        row[2 * c + b] = v + bv;
                    }
                }
            });
    }
    Tensor::from_vec(y, (n, c_out, h2, w2), x.device())
}

/// One tap of a convolution as a GEMM: weights (C_out x C_in, with the given column and row
/// strides) times the padded input shifted by (dy, dx).
struct Tap<'a> {
    w: &'a [f32],
    w_cs: usize,
    w_rs: usize,
    dy: usize,
    dx: usize,
}

/// Runs `f` on the data of a contiguous f32 CPU tensor, without copying it out.
fn with_f32_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor")
    };
    Ok(f(cpu_slice::<f32>(cpu, layout)?))
}

/// x (N, C, H, W) zero-padded to (N, C, H + 3, W + 2): one pixel around, plus a spare row so
/// the last taps may read past the final padded row.
fn padded_input(x: &Tensor) -> Result<Vec<f32>> {
    let (_, _, h, w) = x.dims4()?;
    zero_padded(x, h + 3, w + 2)
}

/// x (N, C, H, W) zero-padded to (N, C, hp, wp): one row and column before the image, the
/// rest after it (hp >= H + 2, wp >= W + 2).
pub(crate) fn zero_padded(x: &Tensor, hp: usize, wp: usize) -> Result<Vec<f32>> {
    let (n, c, h, w) = x.dims4()?;
    let mut out = vec![0f32; n * c * hp * wp];
    with_f32_slice(x, |xv| {
        out.par_chunks_mut(hp * wp)
            .zip(xv.par_chunks(h * w))
            .for_each(|(p, src)| {
                for (y, row) in src.chunks_exact(w).enumerate() {
                    p[(y + 1) * wp + 1..][..w].copy_from_slice(row);
                }
            })
    })?;
    Ok(out)
}

/// Sum over taps of W_tap x shift(x, dy, dx) for every sample, computed W + 2 wide (two garbage
/// columns per row; with the input padded, each tap's operand is one contiguous run per
/// channel). Returns (N, C_out, H, W + 2).
///
/// Work is split in column tiles whose output block (C_out x tile) stays in cache across the
/// taps, one tile per task with single-threaded GEMMs (1024 measured best for C_out 128-512; at
/// least two tasks per thread for balance).
fn accumulate_taps(
    xpad: &[f32],
    (n, c_in, h, w): (usize, usize, usize, usize),
    c_out: usize,
    taps: &[Tap],
) -> Vec<f32> {
    let wp = w + 2;
    let plane = (h + 3) * wp;
    let cols = h * wp;
    let mut out = vec![0f32; n * c_out * cols];
    let tile = cols
        .div_ceil(2 * rayon::current_num_threads())
        .clamp(64, 1024);
    let tiles = cols.div_ceil(tile);
    let dst = SharedOut(out.as_mut_ptr());
    (0..n * tiles).into_par_iter().for_each(|bt| {
        let (b, t0) = (bt / tiles, (bt % tiles) * tile);
        let len = tile.min(cols - t0);
        let src = &xpad[b * c_in * plane + t0..];
        for (k, tap) in taps.iter().enumerate() {
            // SAFETY: lhs is C_out x C_in inside `tap.w` by its strides; rhs rows are channels of
            // the padded input (stride `plane`), each read for `len` elements from column
            // t0 + dy (W + 2) + dx, inside the padded buffer (spare row); the output block
            // (all rows, columns t0..t0 + len of sample b) is this task's alone.
            unsafe {
                gemm::gemm(
                    c_out,
                    len,
                    c_in,
                    dst.ptr().add(b * c_out * cols + t0),
                    1,
                    cols as isize,
                    k > 0,
                    tap.w.as_ptr(),
                    tap.w_cs as isize,
                    tap.w_rs as isize,
                    src[tap.dy * wp + tap.dx..].as_ptr(),
                    1,
                    plane as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    out
}

/// GroupNorm with affine parameters, optionally followed by SiLU, in one pass over memory per
/// (sample, group) task. x: (N, C, ...); weight, bias: (C). Statistics in f64. CPU f32; candle's
/// ops elsewhere.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let tracked = x.track_op() || weight.track_op() || bias.track_op();
    if !(x.device().is_cpu() && x.dtype() == DType::F32) || tracked {
        let (n, c) = (x.dim(0)?, x.dim(1)?);
        let shape = x.shape().clone();
        let g = x.reshape((n, groups, ()))?;
        let mean = g.mean_keepdim(2)?;
        let g = g.broadcast_sub(&mean)?;
        let var = g.sqr()?.mean_keepdim(2)?;
        let g = g.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(&shape)?;
        let mut affine = vec![1usize; shape.rank()];
        affine[1] = c;
        let y = g
            .broadcast_mul(&weight.reshape(affine.clone())?)?
            .broadcast_add(&bias.reshape(affine)?)?;
        return if silu { y.silu() } else { Ok(y) };
    }
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    if c % groups != 0 {
        candle_core::bail!("group norm: {c} channels are not divisible into {groups} groups");
    }
    let x = x.contiguous()?;
    let per_channel = x.elem_count() / (n * c);
    let cpg = c / groups;
    let group_len = cpg * per_channel;
    let (w, b) = (weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
    let mut out = vec![0f32; x.elem_count()];
    with_f32_slice(&x, |xs| {
        out.par_chunks_mut(group_len)
            .zip(xs.par_chunks(group_len))
            .enumerate()
            .for_each(|(ng, (o, src))| {
                with_avx512!(avx512, {
                    let g = ng % groups;
                    // Sums in f64 of f32 partial sums over short runs (16 lanes, so they vectorise).
                    let (mut sum, mut sq) = (0f64, 0f64);
                    for run in src.chunks(1024) {
                        let (mut s, mut q) = ([0f32; 16], [0f32; 16]);
                        let lanes = run.chunks_exact(16);
                        for (i, &v) in lanes.remainder().iter().enumerate() {
                            s[i] += v;
                            q[i] += v * v;
                        }
                        for l in lanes {
                            for i in 0..16 {
                                s[i] += l[i];
                                q[i] += l[i] * l[i];
                            }
                        }
                        sum += s.iter().map(|&v| v as f64).sum::<f64>();
                        sq += q.iter().map(|&v| v as f64).sum::<f64>();
                    }
                    let mean = sum / group_len as f64;
                    let var = (sq / group_len as f64 - mean * mean).max(0.0);
                    let inv = 1.0 / (var + eps).sqrt();
                    for ch in 0..cpg {
                        let cc = g * cpg + ch;
                        // y = (x - mean) * inv * w + b = x * a + shift
                        let a = (inv * w[cc] as f64) as f32;
                        let shift = (b[cc] as f64 - mean * inv * w[cc] as f64) as f32;
                        let range = ch * per_channel..(ch + 1) * per_channel;
                        for (o, &v) in o[range.clone()].iter_mut().zip(&src[range]) {
                            let y = v * a + shift;
                            *o = if silu { y / (1.0 + fast_exp(-y)) } else { y };
                        }
                    }
                })
            });
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

/// Element types the fused element-wise kernels read and write (computing in f32).
trait Elem: Copy + Send + Sync + 'static {
    fn get(self) -> f32;
    fn put(v: f32) -> Self;
}

impl Elem for f32 {
    fn get(self) -> f32 {
        self
    }
    fn put(v: f32) -> Self {
        v
    }
}

impl Elem for half::bf16 {
    fn get(self) -> f32 {
        self.to_f32()
    }
    fn put(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// The contiguous slice of a CPU storage of element type T.
fn cpu_slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// A function of three tensors: a CUDA kernel or the unfused fallback of a [`RowWise3`].
type Op3 = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

/// `Some(kernel)` in a CUDA build, `None` in others (where the path does not exist).
macro_rules! cuda_kernel {
    ($kernel:path) => {{
        #[cfg(feature = "cuda")]
        let k: Option<Op3> = Some($kernel);
        #[cfg(not(feature = "cuda"))]
        let k: Option<Op3> = None;
        k
    }};
}

/// Row-wise kernel over x (N, T, D) with per-sample vectors u, v (N, D): `f(x_row, u_row, v_row,
/// out_row)`; rows in parallel.
fn rows_op<T: Elem + candle_core::WithDType>(
    x: &[T],
    u: &[T],
    v: &[T],
    d: usize,
    t: usize,
    f: impl Fn(&[T], &[T], &[T], &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::put(0.0); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(r, (o, xr))| {
            let nn = r / t;
            with_avx512!(avx512, {
                f(xr, &u[nn * d..(nn + 1) * d], &v[nn * d..(nn + 1) * d], o)
            })
        });
    out
}

/// LayerNorm without affine (eps 1e-6) then adaLN modulation, x * (1 + scale) + shift, in one
/// pass: x (N, T, D), shift and scale (N, D).
pub fn modulated_layer_norm(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let on_gpu = cuda_kernel!(crate::ops_cuda::modulated_layer_norm);
    MODULATED_LN.run([x, shift, scale], on_gpu, modulated_layer_norm_unfused)
}

const MODULATED_LN: RowWise3 = RowWise3 {
    name: "modulated-layer-norm",
    f32: modulated_ln_rows,
    bf16: modulated_ln_rows,
    bwd: modulated_ln_bwd,
};

/// The same computation with candle's tensor ops (any device and dtype).
pub fn modulated_layer_norm_unfused(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (ones, zeros) = (
        Tensor::ones(d, x.dtype(), x.device())?,
        Tensor::zeros(d, x.dtype(), x.device())?,
    );
    // candle_nn's fused `layer_norm` has no backward pass (gradients would silently stop
    // at every block); the composite one has.
    let y = candle_nn::ops::layer_norm_slow(x, &ones, &zeros, 1e-6)?;
    y.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// Gradients of y = xhat (1 + scale) + shift with xhat = (x - mean) / sigma, per row:
/// dshift = sum_T g, dscale = sum_T g xhat, and with gs = g (1 + scale),
/// dx = (gs - mean(gs) - xhat mean(gs xhat)) / sigma. Computed in f32 by one kernel.
fn modulated_ln_bwd(x: &Tensor, _shift: &Tensor, scale: &Tensor, grad: &Tensor) -> Result<Grads3> {
    let (n, t, d) = x.dims3()?;
    let f32c = |a: &Tensor| a.to_dtype(DType::F32)?.contiguous();
    let packed = f32c(x)?.apply_op3_no_bwd(&f32c(scale)?, &f32c(grad)?, &ModulatedLnGrad)?;
    let back = |a: Tensor| a.to_dtype(x.dtype());
    Ok((
        Some(back(packed.narrow(1, 0, t)?)?),
        Some(back(packed.narrow(1, t, 1)?.reshape((n, d))?)?),
        Some(back(packed.narrow(1, t + 1, 1)?.reshape((n, d))?)?),
    ))
}

/// (x, scale, grad) -> (N, T + 2, D): dx in rows 0..T, dshift in row T, dscale in row T + 1.
struct ModulatedLnGrad;

impl candle_core::CustomOp3 for ModulatedLnGrad {
    fn name(&self) -> &'static str {
        "modulated-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, t, d) = l1.shape().dims3()?;
        let (x, scale, g) = (
            cpu_slice::<f32>(s1, l1)?,
            cpu_slice::<f32>(s2, l2)?,
            cpu_slice::<f32>(s3, l3)?,
        );
        let mut out = vec![0f32; n * (t + 2) * d];
        out.par_chunks_mut((t + 2) * d)
            .enumerate()
            .for_each(|(b, o)| {
                let (dx, sums) = o.split_at_mut(t * d);
                let (dshift, dscale) = sums.split_at_mut(d);
                let sc = &scale[b * d..(b + 1) * d];
                let mut xhat = vec![0f32; d];
                let mut gs = vec![0f32; d];
                for r in 0..t {
                    let xr = &x[(b * t + r) * d..(b * t + r + 1) * d];
                    let gr = &g[(b * t + r) * d..(b * t + r + 1) * d];
                    let mean = xr.iter().sum::<f32>() / d as f32;
                    let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / d as f32;
                    let inv = 1.0 / (var + 1e-6).sqrt();
                    let (mut a, mut c) = (0f32, 0f32);
                    for j in 0..d {
                        xhat[j] = (xr[j] - mean) * inv;
                        gs[j] = gr[j] * (1.0 + sc[j]);
                        a += gs[j];
                        c += gs[j] * xhat[j];
                        dshift[j] += gr[j];
                        dscale[j] += gr[j] * xhat[j];
                    }
                    let (a, c) = (a / d as f32, c / d as f32);
                    for j in 0..d {
                        dx[r * d + j] = (gs[j] - a - xhat[j] * c) * inv;
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, t + 2, d))))
    }
}

fn modulated_ln_rows<T: Elem + candle_core::WithDType>(
    x: &[T],
    shift: &[T],
    scale: &[T],
    d: usize,
    t: usize,
) -> Vec<T> {
    rows_op(
        x,
        shift,
        scale,
        d,
        t,
        #[inline(always)]
        |xr, sh, sc, o| {
            let mean = lanes_sum(xr, |v| v) / d as f32;
            let var = lanes_sum(xr, |v| (v - mean) * (v - mean)) / d as f32;
            let inv = 1.0 / (var + 1e-6).sqrt();
            for j in 0..d {
                o[j] = T::put((xr[j].get() - mean) * inv * (1.0 + sc[j].get()) + sh[j].get());
            }
        },
    )
}

/// The gated residual of adaLN-Zero, x + gate * h, in one pass: x, h (N, T, D), gate (N, D).
pub fn gated_residual(x: &Tensor, gate: &Tensor, h: &Tensor) -> Result<Tensor> {
    let on_gpu = cuda_kernel!(crate::ops_cuda::gated_residual);
    GATED_RESIDUAL.run([x, gate, h], on_gpu, gated_residual_unfused)
}

const GATED_RESIDUAL: RowWise3 = RowWise3 {
    name: "gated-residual",
    f32: gated_rows,
    bf16: gated_rows,
    bwd: gated_residual_bwd,
};

/// The same computation with candle's tensor ops (any device and dtype).
pub fn gated_residual_unfused(x: &Tensor, gate: &Tensor, h: &Tensor) -> Result<Tensor> {
    x + h.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// dx = g, dgate = sum_T g h, dh = g gate.
fn gated_residual_bwd(_x: &Tensor, gate: &Tensor, h: &Tensor, grad: &Tensor) -> Result<Grads3> {
    Ok((
        Some(grad.clone()),
        Some((grad * h)?.sum(1)?),
        Some(grad.broadcast_mul(&gate.unsqueeze(1)?)?),
    ))
}

fn gated_rows<T: Elem + candle_core::WithDType>(
    x: &[T],
    gate: &[T],
    h: &[T],
    d: usize,
    t: usize,
) -> Vec<T> {
    let mut out = vec![T::put(0.0); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(h.par_chunks(d)))
        .enumerate()
        .for_each(|(r, (o, (xr, hr)))| {
            let g = &gate[(r / t) * d..(r / t + 1) * d];
            with_avx512!(avx512, {
                for j in 0..d {
                    o[j] = T::put(xr[j].get() + g[j].get() * hr[j].get());
                }
            })
        });
    out
}

/// A fused row-wise op of three same-dtype CPU tensors (x, per-sample u, per-sample v or
/// per-row h), with one kernel per element type.
#[derive(Clone, Copy)]
struct RowWise3 {
    name: &'static str,
    f32: RowKernel<f32>,
    bf16: RowKernel<half::bf16>,
    /// (arg1, arg2, arg3, grad of the output) -> gradients of the arguments.
    bwd: fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads3>,
}

/// (x, u, v, row length d, rows per sample t) -> output.
type RowKernel<T> = fn(&[T], &[T], &[T], usize, usize) -> Vec<T>;

impl RowWise3 {
    /// This op on the CPU, `on_gpu` where its CUDA kernels take the tensors, `unfused` (candle's
    /// ops) anywhere else.
    fn run(self, args: [&Tensor; 3], on_gpu: Option<Op3>, unfused: Op3) -> Result<Tensor> {
        let [x, u, v] = args;
        #[cfg(feature = "cuda")]
        if let Some(kernel) = on_gpu.filter(|_| crate::ops_cuda::applies(&args)) {
            return kernel(x, u, v);
        }
        #[cfg(not(feature = "cuda"))]
        let _ = on_gpu;
        if !fusable(&args) {
            return unfused(x, u, v);
        }
        x.contiguous()?
            .apply_op3(&u.contiguous()?, &v.contiguous()?, self)
    }
}

/// Gradients of the three arguments of a ternary op.
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl candle_core::CustomOp3 for RowWise3 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, t, d) = l1.shape().dims3()?;
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32((self.f32)(
                cpu_slice(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
                d,
                t,
            )),
            CpuStorage::BF16(_) => CpuStorage::BF16((self.bf16)(
                cpu_slice(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
                d,
                t,
            )),
            _ => candle_core::bail!("{}: f32 or bf16 only", self.name),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<Grads3> {
        // Gradients computed from the tracked arguments would themselves record ops holding
        // those arguments and this gradient; a parameter's gradient then kept its layer's
        // output gradient alive until the backward pass ended (9 activations per DiT block).
        (self.bwd)(&a1.detach(), &a2.detach(), &a3.detach(), grad_res)
    }
}

/// Whether the fused CPU row-wise kernels apply: CPU, one dtype (f32 or bf16).
fn fusable(ts: &[&Tensor]) -> bool {
    let x = ts[0];
    x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && ts.iter().all(|t| t.dtype() == x.dtype())
}

/// Hyper-parameters of one AdamW step: lr, (b1, b2), eps, weight decay, and the bias
/// corrections c1 = 1 - b1^t, c2 = 1 - b2^t.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f32,
    pub b1: f32,
    pub b2: f32,
    pub eps: f32,
    pub wd: f32,
    pub c1: f32,
    pub c2: f32,
}

/// One AdamW step of an f32 parameter, fused per element (one pass instead of a dozen tensor
/// ops): (theta', m', v'), on the CPU or a GPU. `None` where it does not apply (other dtypes),
/// for the caller's tensor-op path.
pub fn adamw(
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: AdamWStep,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    if crate::ops_cuda::applies_f32(&[theta, g, m, v]) {
        return crate::ops_cuda::adamw(theta, g, m, v, h).map(Some);
    }
    let n = theta.elem_count();
    let out = with_cpu_f32(&[theta, g, m, v], |s| {
        let (th, g, m, v) = (s[0], s[1], s[2], s[3]);
        let (mut t2, mut m2, mut v2) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        const CHUNK: usize = 1 << 14;
        t2.par_chunks_mut(CHUNK)
            .zip(m2.par_chunks_mut(CHUNK))
            .zip(v2.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, ((t2, m2), v2))| {
                for j in 0..t2.len() {
                    let i = c * CHUNK + j;
                    let mi = h.b1 * m[i] + (1.0 - h.b1) * g[i];
                    let vi = h.b2 * v[i] + (1.0 - h.b2) * g[i] * g[i];
                    let step = (mi / h.c1) / ((vi / h.c2).sqrt() + h.eps);
                    t2[j] = th[i] * (1.0 - h.lr * h.wd) - h.lr * step;
                    m2[j] = mi;
                    v2[j] = vi;
                }
            });
        (t2, m2, v2)
    })?;
    let Some((t2, m2, v2)) = out else {
        return Ok(None);
    };
    let back = |x: Vec<f32>| Tensor::from_vec(x, theta.shape(), theta.device());
    Ok(Some((back(t2)?, back(m2)?, back(v2)?)))
}

/// decay * ema + (1 - decay) * theta in one pass (f32, CPU or GPU); `None` where it does not
/// apply.
pub fn ema(ema: &Tensor, theta: &Tensor, decay: f64) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if crate::ops_cuda::applies_f32(&[ema, theta]) {
        return crate::ops_cuda::ema(ema, theta, decay).map(Some);
    }
    // 1 - decay in f64: in f32, 1 - 0.9999 is off by 2e-4 relative.
    let (keep, rest) = (decay as f32, (1.0 - decay) as f32);
    let out = with_cpu_f32(&[ema, theta], |s| {
        s[0].par_iter()
            .zip(s[1].par_iter())
            .map(|(e, t)| keep * e + rest * t)
            .collect::<Vec<f32>>()
    })?;
    out.map(|e| Tensor::from_vec(e, ema.shape(), ema.device()))
        .transpose()
}

/// Runs `f` on the f32 elements of CPU tensors of one shape (made contiguous); `None` if any is
/// elsewhere or of another dtype.
fn with_cpu_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<Option<R>> {
    if !ts
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.shape() == ts[0].shape())
    {
        return Ok(None);
    }
    let owned = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let candle_core::Storage::Cpu(cpu) = &**storage else {
            return Ok(None);
        };
        let (a, b) = layout.contiguous_offsets().expect("made contiguous above");
        slices.push(&cpu.as_slice::<f32>()?[a..b]);
    }
    Ok(Some(f(&slices)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, max_abs_diff};
    use candle_core::Device;

    #[test]
    fn fused_attention_matches_candle_ops() {
        for (n, t, d, h) in [(2, 16, 24, 3), (3, 64, 64, 1), (1, 7, 32, 4)] {
            let qkv =
                (Tensor::randn(0f32, 1.0, (n, t, 3 * d), &Device::Cpu).unwrap() * 2.0).unwrap();
            let fused = self_attention(&qkv, h).unwrap();
            let plain = self_attention_unfused(&qkv, h).unwrap();
            let diff = max_abs_diff(&fused, &plain);
            assert!(diff < 1e-5, "n={n} t={t} d={d} h={h}: max diff {diff}");
        }
    }

    #[test]
    fn linear_with_transposed_weights_matches_matmul() {
        let dev = Device::Cpu;
        for (n, t, k, o) in [(2, 5, 7, 3), (3, 16, 64, 96), (1, 1, 1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (n, t, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (o, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, o, &dev).unwrap();
            let want = x
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let rows = x.reshape((n * t, k)).unwrap();
            let got = linear_transposed(&rows, &w.t().unwrap().contiguous().unwrap(), &b).unwrap();
            let diff = max_abs_diff(&got.reshape((n, t, o)).unwrap(), &want);
            assert!(diff < 1e-4, "{n} {t} {k} {o}: {diff}");
            // The model's Linear stores such weights transposed and still reports W (o, k).
            let layer =
                crate::gemm_bf16::Linear::new(candle_nn::Linear::new(w.clone(), Some(b))).unwrap();
            assert_eq!(layer.weight().dims(), &[o, k]);
            assert_eq!(max_abs_diff(layer.weight(), &w), 0.0);
            let diff = max_abs_diff(&candle_core::Module::forward(&layer, &x).unwrap(), &want);
            assert!(diff < 1e-4, "Linear {n} {t} {k} {o}: {diff}");
        }
        let bad = linear_transposed(
            &Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
            &Tensor::zeros((4, 5), DType::F32, &dev).unwrap(),
            &Tensor::zeros(5, DType::F32, &dev).unwrap(),
        );
        assert!(bad.unwrap_err().to_string().contains("[4, 5]"));
    }

    #[test]
    fn conv3x3_matches_candle_conv() {
        for (n, ci, co, h, w) in [(2, 5, 7, 6, 9), (1, 32, 16, 16, 16), (1, 3, 4, 1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (n, ci, h, w), &Device::Cpu).unwrap();
            let k = Tensor::randn(0f32, 1.0, (co, ci, 3, 3), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 1.0, co, &Device::Cpu).unwrap();
            let ours = conv3x3(&x, &k, Some(&b)).unwrap();
            let theirs = x
                .conv2d(&k, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let diff = max_abs_diff(&ours, &theirs);
            assert!(diff < 1e-4, "{n} {ci} {co} {h} {w}: {diff}");
        }
    }

    #[test]
    fn fused_adaln_ops_match_candle_ops() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 5, 16), &dev).unwrap();
        let (a, b) = (
            Tensor::randn(0f32, 1.0, (2, 16), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (2, 16), &dev).unwrap(),
        );
        let h = Tensor::randn(0f32, 1.0, (2, 5, 16), &dev).unwrap();
        let (ones, zeros) = (
            Tensor::ones(16, DType::F32, &dev).unwrap(),
            Tensor::zeros(16, DType::F32, &dev).unwrap(),
        );
        let ln = candle_nn::ops::layer_norm(&x, &ones, &zeros, 1e-6).unwrap();
        let want = ln
            .broadcast_mul(&(b.unsqueeze(1).unwrap() + 1.0).unwrap())
            .unwrap()
            .broadcast_add(&a.unsqueeze(1).unwrap())
            .unwrap();
        assert!(max_abs_diff(&modulated_layer_norm(&x, &a, &b).unwrap(), &want) < 1e-5);
        let want = (&x + h.broadcast_mul(&a.unsqueeze(1).unwrap()).unwrap()).unwrap();
        assert!(max_abs_diff(&gated_residual(&x, &a, &h).unwrap(), &want) < 1e-6);
        // bf16 in, bf16 out, close to the f32 result.
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = modulated_layer_norm(&bf(&x), &bf(&a), &bf(&b)).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = modulated_layer_norm(&x, &a, &b).unwrap();
        assert!(max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want) < 0.1);
    }

    #[test]
    fn upsample_conv_matches_upsample_then_conv() {
        for (n, ci, co, h, w) in [(2, 5, 7, 3, 4), (1, 32, 16, 8, 8), (1, 3, 4, 1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (n, ci, h, w), &Device::Cpu).unwrap();
            let k = Tensor::randn(0f32, 1.0, (co, ci, 3, 3), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 1.0, co, &Device::Cpu).unwrap();
            let ours = upsample2x_conv3x3(&x, &k, Some(&b)).unwrap();
            let up = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
            let theirs = up
                .conv2d(&k, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let diff = max_abs_diff(&ours, &theirs);
            assert!(diff < 1e-4, "{n} {ci} {co} {h} {w}: {diff}");
        }
    }

    #[test]
    fn group_norm_matches_candle_nn() {
        let x = ((Tensor::randn(0f32, 1.0, (2, 8, 5, 3), &Device::Cpu).unwrap() * 3.0).unwrap()
            + 1.0)
            .unwrap();
        let w = Tensor::randn(0f32, 1.0, 8, &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, 8, &Device::Cpu).unwrap();
        let reference = candle_nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-6).unwrap();
        let want = candle_core::Module::forward(&reference, &x).unwrap();
        for silu in [false, true] {
            let got = group_norm(&x, 4, &w, &b, 1e-6, silu).unwrap();
            let want = if silu {
                want.silu().unwrap()
            } else {
                want.clone()
            };
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "silu={silu}: {diff}");
        }
    }

    #[test]
    fn gradients_flow_through_every_op() {
        // Training needs gradients: tracked inputs must take the differentiable path.
        let x = candle_core::Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (1, 4, 3, 3), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &Device::Cpu).unwrap();
        let (w, b) = (
            Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let y = conv3x3(x.as_tensor(), &k, None).unwrap();
        assert!(y.track_op(), "conv3x3");
        let y = group_norm(&y, 1, &w, &b, 1e-6, true).unwrap();
        assert!(y.track_op(), "group_norm");
        let y = gelu_tanh(
            &y.reshape((1, 2, 9))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .repeat((1, 1, 3))
                .unwrap(),
        )
        .unwrap();
        assert!(y.track_op(), "gelu");
        let y = self_attention(&y, 1).unwrap();
        assert!(y.track_op(), "attention");
        let (sh, sc) = (
            Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap(),
            Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap(),
        );
        let y = modulated_layer_norm(&y, &sh, &sc).unwrap();
        let y = gated_residual(&y, &sc, &y).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("no gradient reached the input");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }

    /// Gradients of sum(w * f(args)) for random w, with respect to every argument.
    fn grads_of(f: impl Fn(&[Tensor]) -> Result<Tensor>, args: &[Tensor]) -> Vec<Tensor> {
        let vars: Vec<candle_core::Var> = args
            .iter()
            .map(|a| candle_core::Var::from_tensor(a).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        // A fixed, non-constant weighting so both paths see the same upstream gradient.
        let w = Tensor::arange(0f32, y.elem_count() as f32, &Device::Cpu)
            .unwrap()
            .affine(0.37, 0.0)
            .unwrap()
            .sin()
            .unwrap()
            .reshape(y.shape())
            .unwrap();
        let grads = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        ts.iter().map(|t| grads.get(t).unwrap().clone()).collect()
    }

    #[test]
    fn fused_backward_passes_match_candle_autograd() {
        let dev = &Device::Cpu;
        let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, dev).unwrap();
        let check = |name: &str, a: Vec<Tensor>, b: Vec<Tensor>| {
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                let scale = max_abs(b);
                let err = max_abs_diff(a, b);
                assert!(
                    err < 2e-4 * scale.max(1.0),
                    "{name} arg {i}: {err} (scale {scale})"
                );
            }
        };
        let x = (r(&[2, 5, 48]) * 2.0).unwrap();
        check(
            "gelu",
            grads_of(|a| gelu_tanh(&a[0]), std::slice::from_ref(&x)),
            grads_of(|a| a[0].gelu(), std::slice::from_ref(&x)),
        );
        let args = [x.clone(), r(&[2, 48]), r(&[2, 48])];
        check(
            "modulated layer norm",
            grads_of(|a| modulated_layer_norm(&a[0], &a[1], &a[2]), &args),
            grads_of(|a| modulated_layer_norm_unfused(&a[0], &a[1], &a[2]), &args),
        );
        let args = [x.clone(), r(&[2, 48]), r(&[2, 5, 48])];
        check(
            "gated residual",
            grads_of(|a| gated_residual(&a[0], &a[1], &a[2]), &args),
            grads_of(|a| gated_residual_unfused(&a[0], &a[1], &a[2]), &args),
        );
        let args = [r(&[9, 20]), r(&[7, 20]), r(&[7])];
        let unfused = |a: &[Tensor]| a[0].matmul(&a[1].t()?)?.broadcast_add(&a[2]);
        check(
            "linear",
            grads_of(|a| linear(&a[0], &a[1], &a[2]), &args),
            grads_of(unfused, &args),
        );
        let y = linear(&args[0], &args[1], &args[2]).unwrap();
        assert!(max_abs_diff(&y, &unfused(&args).unwrap()) < 1e-5);
        let qkv = r(&[2, 7, 3 * 12]);
        check(
            "attention",
            grads_of(|a| self_attention(&a[0], 3), std::slice::from_ref(&qkv)),
            grads_of(
                |a| self_attention_unfused(&a[0], 3),
                std::slice::from_ref(&qkv),
            ),
        );
    }

    #[test]
    fn fused_gradients_hold_no_graph() {
        // A gradient that recorded its own ops would keep the tensors it was computed from
        // (the layer's output gradient, its input) alive for as long as it lives: for a
        // parameter, until the end of the backward pass.
        let dev = &Device::Cpu;
        let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, dev).unwrap();
        let x = r(&[2, 5, 48]);
        let ops: [(&str, Vec<Tensor>, OpUnderTest); 5] = [
            ("gelu", vec![x.clone()], |a| gelu_tanh(&a[0])),
            (
                "modulated layer norm",
                vec![x.clone(), r(&[2, 48]), r(&[2, 48])],
                |a| modulated_layer_norm(&a[0], &a[1], &a[2]),
            ),
            (
                "gated residual",
                vec![x.clone(), r(&[2, 48]), x.clone()],
                |a| gated_residual(&a[0], &a[1], &a[2]),
            ),
            ("linear", vec![r(&[9, 20]), r(&[7, 20]), r(&[7])], |a| {
                linear(&a[0], &a[1], &a[2])
            }),
            ("attention", vec![r(&[2, 7, 36])], |a| {
                self_attention(&a[0], 3)
            }),
        ];
        for (name, args, f) in ops {
            for (i, g) in grads_of(f, &args).iter().enumerate() {
                assert!(
                    !g.track_op(),
                    "{name}: the gradient of argument {i} records ops"
                );
            }
        }
    }

    type OpUnderTest = fn(&[Tensor]) -> Result<Tensor>;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 1e-4;
            let (got, want) = (fast_exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(-1e4), fast_exp(-87.0));
        assert!(fast_exp(0.0) == 1.0);
    }

    #[test]
    fn matches_the_tanh_formula() {
        let v: Vec<f32> = (-400..400)
            .map(|i| i as f32 * 0.05)
            .chain([-1e4, 1e4, 0.0])
            .collect();
        let x = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        let got = gelu_tanh(&x).unwrap().to_vec1::<f32>().unwrap();
        for (&x, g) in v.iter().zip(got) {
            let x64 = x as f64;
            let want = 0.5
                * x64
                * (1.0 + (0.797_884_560_802_865_4 * (x64 + 0.044715 * x64.powi(3))).tanh());
            assert!(
                (g as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "x={x}: {g} vs {want}"
            );
        }
    }
}
