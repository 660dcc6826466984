//! The DiT block's fused ops on CUDA (src/cuda/kernels.cu), with their backward passes, for f32
//! and bf16. `crate::ops` routes CUDA tensors here; `DIT_CUDA_KERNELS=0` turns them off (candle's
//! generic ops then run, e.g. to compare).
//!
//! The token reductions of the backward passes (dshift, dscale, dgate, dbias) are matrix
//! products with a row of ones, so they run on cuBLAS.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Tensor,
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

/// One launch of a kernel of kernels.cu, its parameters fixed by the caller (who knows the
/// shapes): applied as a custom op to 1, 2 or 3 tensors, the kernel's inputs in that order.
#[derive(Clone)]
struct Kernel {
    name: &'static str,
    shape: Shape,
    ints: Vec<u32>,
    floats: Vec<f32>,
    grid: Grid,
}

impl Kernel {
    fn new(name: &'static str, shape: impl Into<Shape>, ints: &[usize], grid: Grid) -> Self {
        Self {
            name,
            shape: shape.into(),
            ints: ints.iter().map(|&i| u(i)).collect(),
            floats: Vec::new(),
            grid,
        }
    }

    fn floats(mut self, floats: &[f32]) -> Self {
        self.floats = floats.to_vec();
        self
    }

    fn run(&self, inputs: &[(&CudaStorage, &Layout)]) -> Result<(CudaStorage, Shape)> {
        launch(
            self.name,
            inputs,
            self.shape.clone(),
            &self.ints,
            &self.floats,
            self.grid,
        )
    }

    /// What `cuda_forward!` runs (for an `Op`, its forward kernel).
    fn kernel(&self) -> &Kernel {
        self
    }

    /// An element-wise kernel over `x`'s elements, writing x's shape.
    fn elementwise(name: &'static str, x: &Tensor, ints: &[usize]) -> Self {
        let mut all = ints.to_vec();
        all.push(x.elem_count());
        Self::new(
            name,
            x.shape().clone(),
            &all,
            Grid::Elements(x.elem_count()),
        )
    }
}

fn cpu_unsupported(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name} is a CUDA kernel (ops routes CPU tensors elsewhere)")
}

/// The CPU side of a CUDA-only custom op, and its CUDA forward: `self.kernel`. Invoked with one
/// (storage, layout) name pair per input: `cuda_forward!(s1 l1, s2 l2)` for a `CustomOp2`.
macro_rules! cuda_forward {
    ($($s:ident $l:ident),+) => {
        #[allow(clippy::too_many_arguments)]
        fn cpu_fwd(&self, $($s: &CpuStorage, $l: &Layout),+) -> Result<(CpuStorage, Shape)> {
            let _ = ($($s, $l),+);
            cpu_unsupported(self.kernel().name)
        }
        #[allow(clippy::too_many_arguments)]
        fn cuda_fwd(&self, $($s: &CudaStorage, $l: &Layout),+) -> Result<(CudaStorage, Shape)> {
            self.kernel().run(&[$(($s, $l)),+])
        }
    };
}

// A kernel outside autograd (the backward passes' own kernels, the optimiser).
impl CustomOp1 for Kernel {
    fn name(&self) -> &'static str {
        self.name
    }
    cuda_forward!(s l);
}

impl CustomOp2 for Kernel {
    fn name(&self) -> &'static str {
        self.name
    }
    cuda_forward!(s1 l1, s2 l2);
}

impl CustomOp3 for Kernel {
    fn name(&self) -> &'static str {
        self.name
    }
    cuda_forward!(s1 l1, s2 l2, s3 l3);
}

/// Sum over the tokens of (N, T, D) -> (N, D), as a batched product with a row of ones.
fn sum_tokens(x: &Tensor) -> Result<Tensor> {
    let (n, t, _) = x.dims3()?;
    let ones = Tensor::ones((n, 1, t), x.dtype(), x.device())?;
    ones.matmul(&x.contiguous()?)?.squeeze(1)
}

/// A differentiable op: its forward kernel and what its backward pass needs.
struct Op<B> {
    kernel: Kernel,
    backward: B,
}

impl<B> Op<B> {
    fn kernel(&self) -> &Kernel {
        &self.kernel
    }
}

// ------------------------------------------------------------------ LayerNorm + modulation

struct ModLnBackward;

impl CustomOp3 for Op<ModLnBackward> {
    fn name(&self) -> &'static str {
        "dit-modln"
    }
    cuda_forward!(s1 l1, s2 l2, s3 l3);
    fn bwd(
        &self,
        x: &Tensor,
        _shift: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // dx, and grad * xhat (summed over the tokens into dscale), in one pass.
        let grad = grad.contiguous()?;
        let (n, t, d) = x.dims3()?;
        let bwd = Kernel::new("modln_bwd", (2, n, t, d), &[n * t, t, d], Grid::Rows(n * t))
            .floats(&[EPS]);
        let packed = x.apply_op3_no_bwd(scale, &grad, &bwd)?;
        Ok((
            Some(packed.get(0)?),
            Some(sum_tokens(&grad)?),
            Some(sum_tokens(&packed.get(1)?)?),
        ))
    }
}

/// LayerNorm (eps 1e-6, no affine) of x (N, T, D), then x (1 + scale) + shift, (N, D) each.
pub fn modulated_layer_norm(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let (n, t, d) = x.dims3()?;
    let op = Op {
        kernel: Kernel::new(
            "modln_fwd",
            x.shape().clone(),
            &[n * t, t, d],
            Grid::Rows(n * t),
        )
        .floats(&[EPS]),
        backward: ModLnBackward,
    };
    x.contiguous()?
        .apply_op3(&shift.contiguous()?, &scale.contiguous()?, op)
}

// ------------------------------------------------------------------ gated residual

struct GatedBackward;

impl CustomOp3 for Op<GatedBackward> {
    fn name(&self) -> &'static str {
        "dit-gated-residual"
    }
    cuda_forward!(s1 l1, s2 l2, s3 l3);
    fn bwd(
        &self,
        _x: &Tensor,
        gate: &Tensor,
        h: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (_, t, d) = grad.dims3()?;
        let scale_rows = Kernel::elementwise("scale_rows", &grad, &[t * d, d]);
        Ok((
            Some(grad.clone()),
            // h detached: a gradient recording ops would keep h and grad alive (see ops.rs).
            Some(sum_tokens(&(&grad * h.detach())?)?),
            Some(grad.apply_op2_no_bwd(gate, &scale_rows)?),
        ))
    }
}

/// x + gate * h with x, h (N, T, D), gate (N, D).
pub fn gated_residual(x: &Tensor, gate: &Tensor, h: &Tensor) -> Result<Tensor> {
    let (_, t, d) = x.dims3()?;
    let op = Op {
        kernel: Kernel::elementwise("gated_res", x, &[t * d, d]),
        backward: GatedBackward,
    };
    x.contiguous()?
        .apply_op3(&gate.contiguous()?, &h.contiguous()?, op)
}

// ------------------------------------------------------------------ linear layers

struct BiasBackward;

impl CustomOp2 for Op<BiasBackward> {
    fn name(&self) -> &'static str {
        "dit-bias-add"
    }
    cuda_forward!(s1 l1, s2 l2);
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
    let y = x.matmul(&w.t()?)?;
    let op = Op {
        kernel: Kernel::elementwise("bias_add", &y, &[b.elem_count()]),
        backward: BiasBackward,
    };
    y.apply_op2(&b.contiguous()?, op)
}

// ------------------------------------------------------------------ GELU

struct GeluBackward;

impl CustomOp1 for Op<GeluBackward> {
    fn name(&self) -> &'static str {
        "dit-gelu-tanh"
    }
    cuda_forward!(s l);
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // g * GELU'(x) in one pass (candle's own GELU backward takes about ten).
        let bwd = Kernel::elementwise("gelu_bwd", arg, &[]);
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &bwd)?))
    }
}

/// GELU with the tanh approximation.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let op = Op {
        kernel: Kernel::elementwise("gelu_fwd", x, &[]),
        backward: GeluBackward,
    };
    x.contiguous()?.apply_op1(op)
}

// ------------------------------------------------------------------ attention

/// The head layouts of attention: qkv (N, T, 3, H, hd) <-> (3, N, H, T, hd) with q scaled by
/// `scale` (its gradient too), and o (N, H, T, hd) <-> (N, T, H hd). The kernel of each
/// direction is one permutation pass; `inverse` selects the way back.
#[derive(Clone, Copy)]
struct Heads {
    n: usize,
    t: usize,
    h: usize,
    hd: usize,
    /// Some(scale): the qkv split; None: the output merge.
    qkv_scale: Option<f32>,
}

impl Heads {
    fn kernel(&self, inverse: bool) -> Kernel {
        let Self { n, t, h, hd, .. } = *self;
        match self.qkv_scale {
            Some(scale) => {
                let total = 3 * n * t * h * hd;
                let shape: Shape = if inverse {
                    (n, t, 3 * h * hd).into()
                } else {
                    (3, n, h, t, hd).into()
                };
                let ints = [n, t, h, hd, total, inverse as usize];
                Kernel::new("permute_qkv", shape, &ints, Grid::Elements(total)).floats(&[scale])
            }
            None => {
                let total = n * t * h * hd;
                let shape: Shape = if inverse {
                    (n, h, t, hd).into()
                } else {
                    (n, t, h * hd).into()
                };
                let ints = [t, h, hd, total, inverse as usize];
                Kernel::new("permute_heads", shape, &ints, Grid::Elements(total))
            }
        }
    }
}

impl CustomOp1 for Op<Heads> {
    fn name(&self) -> &'static str {
        "dit-attention-heads"
    }
    cuda_forward!(s l);
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = self.backward.kernel(true);
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

struct SoftmaxBackward;

impl CustomOp1 for Op<SoftmaxBackward> {
    fn name(&self) -> &'static str {
        "dit-softmax"
    }
    cuda_forward!(s l);
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // From the output p: dx = p (g - sum(g p)), per row.
        let mut bwd = self.kernel.clone();
        bwd.name = "softmax_bwd";
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &bwd)?))
    }
}

/// softmax(q k^T / sqrt(hd)) v per head from a fused qkv projection (N, T, 3 D) -> (N, T, D):
/// the head split and merge are single permutation passes, the products cuBLAS batched GEMMs.
pub fn self_attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (n, t, d3) = qkv.dims3()?;
    let hd = d3 / 3 / heads;
    let split = Heads {
        n,
        t,
        h: heads,
        hd,
        qkv_scale: Some((hd as f32).powf(-0.5)),
    };
    let qkv = qkv.contiguous()?.apply_op1(Op {
        kernel: split.kernel(false),
        backward: split,
    })?;
    let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
    let logits = q.matmul(&k.t()?)?;
    let rows = n * heads * t;
    let p = logits.apply_op1(Op {
        kernel: Kernel::new(
            "softmax_fwd",
            logits.shape().clone(),
            &[rows, t],
            Grid::Rows(rows),
        ),
        backward: SoftmaxBackward,
    })?;
    let merge = Heads {
        qkv_scale: None,
        ..split
    };
    p.matmul(&v)?.apply_op1(Op {
        kernel: merge.kernel(false),
        backward: merge,
    })
}

// ------------------------------------------------------------------ optimiser

/// Whether the optimiser kernels take these tensors (CUDA, f32).
pub fn applies_f32(ts: &[&Tensor]) -> bool {
    applies(ts) && ts[0].dtype() == DType::F32
}

/// One AdamW step in two fused passes: returns (theta', m', v').
pub fn adamw(
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: crate::ops::AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = theta.elem_count();
    let flat = |t: &Tensor| t.flatten_all()?.contiguous();
    let moments =
        Kernel::new("adamw_moments", (2, n), &[n], Grid::Elements(n)).floats(&[h.b1, h.b2]);
    let mv = flat(g)?.apply_op3_no_bwd(&flat(m)?, &flat(v)?, &moments)?;
    let update = Kernel::new("adamw_theta", n, &[n], Grid::Elements(n))
        .floats(&[h.lr, h.c1, h.c2, h.eps, h.wd]);
    let theta2 = flat(theta)?.apply_op2_no_bwd(&mv, &update)?;
    let shape = theta.shape();
    Ok((
        theta2.reshape(shape)?,
        mv.get(0)?.reshape(shape)?,
        mv.get(1)?.reshape(shape)?,
    ))
}

/// decay * ema + (1 - decay) * theta in one pass.
pub fn ema(ema: &Tensor, theta: &Tensor, decay: f64) -> Result<Tensor> {
    let kernel = Kernel::elementwise("ema", ema, &[]).floats(&[decay as f32, (1.0 - decay) as f32]);
    ema.contiguous()?
        .apply_op2_no_bwd(&theta.contiguous()?, &kernel)
}
