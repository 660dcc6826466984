//! The DiT block's fused ops on CUDA (src/cuda/kernels.cu), with their backward passes, for f32
//! and bf16. `crate::ops` routes CUDA tensors here; `DIT_CUDA_KERNELS=0` turns them off (candle's
//! generic ops then run, e.g. to compare).
//!
//! The token reductions of the backward passes (dshift, dscale, dgate, dbias) are matrix
//! products with a row of ones, so they run on cuBLAS.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Storage, Tensor,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dit_kernels.ptx"));
const MODULE: &str = "dit_kernels";
const EPS: f32 = 1e-6;

/// Whether the fused kernels take these tensors: all on a CUDA device, one dtype (f32 or bf16),
/// and the kernels not turned off.
pub fn applies(ts: &[&Tensor]) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("DIT_CUDA_KERNELS").map_or(true, |v| v != "0"));
    let x = ts[0];
    on && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && ts
            .iter()
            .all(|t| t.dtype() == x.dtype() && t.device().same_device(x.device()))
}

/// Launches `kernel` (`_f32` / `_bf16` chosen by dtype) on contiguous inputs, writing a new
/// tensor of `shape`; the kernel takes the inputs, the output, `ints`, then `floats`.
/// `threads`: one thread per element of that count, or with `rows`, one warp per row.
fn launch(
    kernel: &str,
    inputs: &[(&CudaStorage, &Layout)],
    shape: Shape,
    ints: &[u32],
    floats: &[f32],
    grid: Grid,
) -> Result<(CudaStorage, Shape)> {
    let (first, _) = inputs[0];
    let dev = first.device().clone();
    match first.dtype() {
        DType::F32 => launch_as::<f32>(
            &dev,
            &format!("{kernel}_f32"),
            inputs,
            shape,
            ints,
            floats,
            grid,
        ),
        DType::BF16 => launch_as::<half::bf16>(
            &dev,
            &format!("{kernel}_bf16"),
            inputs,
            shape,
            ints,
            floats,
            grid,
        ),
        dt => candle_core::bail!("{kernel}: no CUDA kernel for {dt:?}"),
    }
}

#[derive(Clone, Copy)]
enum Grid {
    /// One thread per element.
    Elements(usize),
    /// One warp per row.
    Rows(usize),
}

fn launch_as<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    kernel: &str,
    inputs: &[(&CudaStorage, &Layout)],
    shape: Shape,
    ints: &[u32],
    floats: &[f32],
    grid: Grid,
) -> Result<(CudaStorage, Shape)> {
    let views = inputs
        .iter()
        .map(|(s, l)| {
            let (a, b) = l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg(format!("{kernel}: non-contiguous input"))
            })?;
            Ok(s.as_cuda_slice::<T>()?.slice(a..b))
        })
        .collect::<Result<Vec<_>>>()?;
    if shape.elem_count() >= u32::MAX as usize {
        candle_core::bail!(
            "{kernel}: {} elements exceed 32-bit indexing",
            shape.elem_count()
        );
    }
    // SAFETY: every element is written by the kernel before it is read.
    let out = unsafe { dev.alloc::<T>(shape.elem_count()) }?;
    let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
    let mut b = func.builder();
    for v in &views {
        b.arg(v);
    }
    b.arg(&out);
    for i in ints {
        b.arg(i);
    }
    for f in floats {
        b.arg(f);
    }
    let blocks = |n: usize| n.div_ceil(256).max(1) as u32;
    let cfg = LaunchConfig {
        grid_dim: (
            match grid {
                Grid::Elements(n) => blocks(n),
                Grid::Rows(r) => blocks(r * 32),
            },
            1,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches the kernel's signature in kernels.cu, and the grid
    // covers exactly the elements / rows the kernel bounds-checks.
    unsafe { b.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

fn u(n: usize) -> u32 {
    n as u32
}

fn cpu_unsupported(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name} is a CUDA kernel (ops routes CPU tensors elsewhere)")
}

/// Sum over the tokens of (N, T, D) -> (N, D), as a batched product with a row of ones.
fn sum_tokens(x: &Tensor) -> Result<Tensor> {
    let (n, t, _) = x.dims3()?;
    let ones = Tensor::ones((n, 1, t), x.dtype(), x.device())?;
    ones.matmul(&x.contiguous()?)?.squeeze(1)
}

// ------------------------------------------------------------------ LayerNorm + modulation

struct ModLn;

impl CustomOp3 for ModLn {
    fn name(&self) -> &'static str {
        "dit-modln"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        shift: &CudaStorage,
        ls: &Layout,
        scale: &CudaStorage,
        lc: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, t, d) = lx.shape().dims3()?;
        launch(
            "modln_fwd",
            &[(x, lx), (shift, ls), (scale, lc)],
            lx.shape().clone(),
            &[u(n * t), u(t), u(d)],
            &[EPS],
            Grid::Rows(n * t),
        )
    }
    fn bwd(
        &self,
        x: &Tensor,
        _shift: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let packed = x.apply_op3_no_bwd(scale, &grad, &ModLnBwd)?;
        Ok((
            Some(packed.get(0)?),
            Some(sum_tokens(&grad)?),
            Some(sum_tokens(&packed.get(1)?)?),
        ))
    }
}

/// (x, scale, grad) -> (2, N, T, D): dx, and grad * xhat (for dscale).
struct ModLnBwd;

impl CustomOp3 for ModLnBwd {
    fn name(&self) -> &'static str {
        "dit-modln-bwd"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        scale: &CudaStorage,
        ls: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, t, d) = lx.shape().dims3()?;
        launch(
            "modln_bwd",
            &[(x, lx), (scale, ls), (g, lg)],
            Shape::from((2, n, t, d)),
            &[u(n * t), u(t), u(d)],
            &[EPS],
            Grid::Rows(n * t),
        )
    }
}

/// LayerNorm (eps 1e-6, no affine) of x (N, T, D), then x (1 + scale) + shift, (N, D) each.
pub fn modulated_layer_norm(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&shift.contiguous()?, &scale.contiguous()?, ModLn)
}

// ------------------------------------------------------------------ gated residual

struct GatedResidual;

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "dit-gated-residual"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        gate: &CudaStorage,
        lg: &Layout,
        h: &CudaStorage,
        lh: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, t, d) = lx.shape().dims3()?;
        let total = lx.shape().elem_count();
        launch(
            "gated_res",
            &[(x, lx), (gate, lg), (h, lh)],
            lx.shape().clone(),
            &[u(t * d), u(d), u(total)],
            &[],
            Grid::Elements(total),
        )
    }
    fn bwd(
        &self,
        _x: &Tensor,
        gate: &Tensor,
        h: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        Ok((
            Some(grad.clone()),
            Some(sum_tokens(&(&grad * h)?)?),
            Some(grad.apply_op2_no_bwd(gate, &ScaleRows)?),
        ))
    }
}

/// y * gate[n] for y (N, T, D), gate (N, D).
struct ScaleRows;

impl CustomOp2 for ScaleRows {
    fn name(&self) -> &'static str {
        "dit-scale-rows"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        ly: &Layout,
        gate: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, t, d) = ly.shape().dims3()?;
        let total = ly.shape().elem_count();
        launch(
            "scale_rows",
            &[(y, ly), (gate, lg)],
            ly.shape().clone(),
            &[u(t * d), u(d), u(total)],
            &[],
            Grid::Elements(total),
        )
    }
}

/// x + gate * h with x, h (N, T, D), gate (N, D).
pub fn gated_residual(x: &Tensor, gate: &Tensor, h: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&gate.contiguous()?, &h.contiguous()?, GatedResidual)
}

// ------------------------------------------------------------------ linear layers

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "dit-bias-add"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        ly: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let total = ly.shape().elem_count();
        launch(
            "bias_add",
            &[(y, ly), (b, lb)],
            ly.shape().clone(),
            &[u(lb.shape().elem_count()), u(total)],
            &[],
            Grid::Elements(total),
        )
    }
    fn bwd(
        &self,
        y: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, _) = y.dims2()?;
        let ones = Tensor::ones((1, m), grad.dtype(), grad.device())?;
        let db = ones.matmul(&grad.contiguous()?)?.squeeze(0)?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// x W^T + b for x (M, K), W (N, K), b (N): a cuBLAS product, then the bias in one pass.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)?.apply_op2(&b.contiguous()?, BiasAdd)
}

// ------------------------------------------------------------------ GELU

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "dit-gelu-tanh"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let total = l.shape().elem_count();
        launch(
            "gelu_fwd",
            &[(s, l)],
            l.shape().clone(),
            &[u(total)],
            &[],
            Grid::Elements(total),
        )
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBwd)?))
    }
}

/// g * GELU'(x) in one pass (candle's own GELU backward takes about ten).
struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "dit-gelu-tanh-bwd"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let total = lx.shape().elem_count();
        launch(
            "gelu_bwd",
            &[(x, lx), (g, lg)],
            lx.shape().clone(),
            &[u(total)],
            &[],
            Grid::Elements(total),
        )
    }
}

/// GELU with the tanh approximation.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

// ------------------------------------------------------------------ attention

/// qkv (N, T, 3 D) -> (3, N, H, T, hd) with q scaled by 1 / sqrt(hd); backward: the inverse.
struct SplitHeads {
    heads: usize,
    scale: f32,
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "dit-split-qkv"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, t, d3) = l.shape().dims3()?;
        let hd = d3 / 3 / self.heads;
        launch(
            "permute_qkv",
            &[(s, l)],
            Shape::from((3, n, self.heads, t, hd)),
            &[u(n), u(t), u(self.heads), u(hd), u(n * t * d3), 0],
            &[self.scale],
            Grid::Elements(n * t * d3),
        )
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let merge = MergeQkvGrad { scale: self.scale };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&merge)?))
    }
}

struct MergeQkvGrad {
    scale: f32,
}

impl CustomOp1 for MergeQkvGrad {
    fn name(&self) -> &'static str {
        "dit-merge-qkv-grad"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (_, n, h, t, hd) = l.shape().dims5()?;
        let total = l.shape().elem_count();
        launch(
            "permute_qkv",
            &[(s, l)],
            Shape::from((n, t, 3 * h * hd)),
            &[u(n), u(t), u(h), u(hd), u(total), 1],
            &[self.scale],
            Grid::Elements(total),
        )
    }
}

/// o (N, H, T, hd) -> (N, T, H hd) (`inverse`: back).
#[derive(Clone, Copy)]
struct PermuteHeads {
    heads: usize,
    tokens: usize,
    inverse: bool,
}

impl CustomOp1 for PermuteHeads {
    fn name(&self) -> &'static str {
        "dit-permute-heads"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let total = l.shape().elem_count();
        let (h, t) = (self.heads, self.tokens);
        let n = l.dims()[0];
        let hd = total / (n * h * t);
        let shape = if self.inverse {
            Shape::from((n, h, t, hd))
        } else {
            Shape::from((n, t, h * hd))
        };
        launch(
            "permute_heads",
            &[(s, l)],
            shape,
            &[u(t), u(h), u(hd), u(total), self.inverse as u32],
            &[],
            Grid::Elements(total),
        )
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = PermuteHeads {
            inverse: !self.inverse,
            ..*self
        };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

/// Softmax over the last dimension; backward from the output.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "dit-softmax"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let cols = *l.dims().last().unwrap_or(&1);
        let rows = l.shape().elem_count() / cols.max(1);
        launch(
            "softmax_fwd",
            &[(s, l)],
            l.shape().clone(),
            &[u(rows), u(cols)],
            &[],
            Grid::Rows(rows),
        )
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?,
        ))
    }
}

struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "dit-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(
        &self,
        p: &CudaStorage,
        lp: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let cols = *lp.dims().last().unwrap_or(&1);
        let rows = lp.shape().elem_count() / cols.max(1);
        launch(
            "softmax_bwd",
            &[(p, lp), (g, lg)],
            lp.shape().clone(),
            &[u(rows), u(cols)],
            &[],
            Grid::Rows(rows),
        )
    }
}

/// softmax(q k^T / sqrt(hd)) v per head from a fused qkv projection (N, T, 3 D) -> (N, T, D):
/// the head split and merge are single permutation passes, the products cuBLAS batched GEMMs.
pub fn self_attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (_, t, d3) = qkv.dims3()?;
    let hd = d3 / 3 / heads;
    let split = SplitHeads {
        heads,
        scale: (hd as f32).powf(-0.5),
    };
    let qkv = qkv.contiguous()?.apply_op1(split)?;
    let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
    let p = q.matmul(&k.t()?)?.apply_op1(Softmax)?;
    p.matmul(&v)?.apply_op1(PermuteHeads {
        heads,
        tokens: t,
        inverse: false,
    })
}

// ------------------------------------------------------------------ optimiser

/// Runs `kernel` on tensors outside autograd (optimiser state), giving an untracked tensor.
fn launch_untracked(
    kernel: &str,
    inputs: &[&Tensor],
    shape: Shape,
    ints: &[u32],
    floats: &[f32],
) -> Result<Tensor> {
    let inputs = inputs
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = inputs.iter().map(|t| t.storage_and_layout()).collect();
    let pairs = guards
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cuda(c) => Ok((c, *l)),
            _ => candle_core::bail!("{kernel}: not a CUDA tensor"),
        })
        .collect::<Result<Vec<_>>>()?;
    let n = shape.elem_count();
    let (storage, shape) = launch(kernel, &pairs, shape, ints, floats, Grid::Elements(n))?;
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// Whether the optimiser kernels take these tensors (CUDA, f32).
pub fn applies_f32(ts: &[&Tensor]) -> bool {
    applies(ts) && ts[0].dtype() == DType::F32
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

/// One AdamW step in two fused passes: returns (theta', m', v').
pub fn adamw(
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = theta.elem_count();
    let mv = launch_untracked(
        "adamw_moments",
        &[g, m, v],
        Shape::from((2, n)),
        &[u(n)],
        &[h.b1, h.b2],
    )?;
    let theta2 = launch_untracked(
        "adamw_theta",
        &[theta, &mv],
        Shape::from(n),
        &[u(n)],
        &[h.lr, h.c1, h.c2, h.eps, h.wd],
    )?;
    let shape = theta.shape();
    Ok((
        theta2.reshape(shape)?,
        mv.get(0)?.reshape(shape)?,
        mv.get(1)?.reshape(shape)?,
    ))
}

/// decay * ema + (1 - decay) * theta in one pass.
pub fn ema(ema: &Tensor, theta: &Tensor, decay: f32) -> Result<Tensor> {
    let n = ema.elem_count();
    launch_untracked("ema", &[ema, theta], Shape::from(n), &[u(n)], &[decay])?.reshape(ema.shape())
}
