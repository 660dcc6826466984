//! Patch n' pack (NaViT, Dehghani et al. 2023): images of different sizes travel as a few long
//! token sequences, several images per sequence, instead of one padded row each.
//!
//! A [`Packing`] says where each image's tokens sit: one contiguous [`Segment`] of a sequence,
//! the rest of the sequence padding. Attention is block-diagonal (a token sees only its own
//! image's tokens, [`Packing::attention_mask`]); the network computes exactly those blocks, one
//! per segment, so no score is spent on a masked pair and padding is never seen. Everything
//! else in a DiT is per token, with each image's conditioning (adaLN shift, scale and gate from
//! its timestep and class or text) routed to its tokens.

use candle_core::{Device, Result, Tensor};

use crate::rng::NoiseRng;

/// One image's run of tokens: `len` tokens from `start` in sequence `sequence`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub image: usize,
    pub sequence: usize,
    pub start: usize,
    pub len: usize,
}

/// Where the tokens of a batch of images sit in `sequences` rows of `seq_len` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    seq_len: usize,
    sequences: usize,
    /// Ordered by (sequence, start); each sequence's segments are contiguous from 0.
    segments: Vec<Segment>,
    /// `by_image[i]`: the index in `segments` of image i.
    by_image: Vec<usize>,
}

impl Packing {
    /// First-fit decreasing: the images, longest first, each go into the first sequence with
    /// room for all of its tokens (`token_counts[i]` for image i), a new one when none has.
    pub fn greedy(token_counts: &[usize], seq_len: usize) -> Result<Self> {
        if let Some((i, &n)) = token_counts
            .iter()
            .enumerate()
            .find(|(_, &n)| n > seq_len || n == 0)
        {
            candle_core::bail!(
                "image {i} has {n} tokens: packing takes 1 to {seq_len} (the sequence length) per image"
            );
        }
        let mut order: Vec<usize> = (0..token_counts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(token_counts[i]));
        let mut fill: Vec<usize> = Vec::new();
        let mut placed = vec![(0, 0); token_counts.len()];
        for i in order {
            let n = token_counts[i];
            let seq = match fill.iter().position(|&f| f + n <= seq_len) {
                Some(s) => s,
                None => {
                    fill.push(0);
                    fill.len() - 1
                }
            };
            placed[i] = (seq, fill[seq]);
            fill[seq] += n;
        }
        Ok(Self::from_placement(token_counts, &placed, seq_len))
    }

    /// The padded baseline: one image per sequence, every sequence as long as the longest image.
    pub fn padded(token_counts: &[usize]) -> Result<Self> {
        let longest = token_counts.iter().copied().max().unwrap_or(0);
        if token_counts.contains(&0) {
            candle_core::bail!("an image with no tokens cannot be packed");
        }
        let placed: Vec<(usize, usize)> = (0..token_counts.len()).map(|i| (i, 0)).collect();
        Ok(Self::from_placement(token_counts, &placed, longest))
    }

    fn from_placement(counts: &[usize], placed: &[(usize, usize)], seq_len: usize) -> Self {
        let mut segments: Vec<Segment> = placed
            .iter()
            .zip(counts)
            .enumerate()
            .map(|(image, (&(sequence, start), &len))| Segment {
                image,
                sequence,
                start,
                len,
            })
            .collect();
        segments.sort_by_key(|s| (s.sequence, s.start));
        let mut by_image = vec![0; counts.len()];
        for (k, s) in segments.iter().enumerate() {
            by_image[s.image] = k;
        }
        let sequences = placed.iter().map(|p| p.0 + 1).max().unwrap_or(0);
        Self {
            seq_len,
            sequences,
            segments,
            by_image,
        }
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn sequences(&self) -> usize {
        self.sequences
    }

    pub fn images(&self) -> usize {
        self.segments.len()
    }

    /// The segments in sequence order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn segment_of(&self, image: usize) -> Segment {
        self.segments[self.by_image[image]]
    }

    /// The image tokens, all sequences together.
    pub fn tokens(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// The share of the sequences' positions holding image tokens (1: no padding).
    pub fn fill(&self) -> f64 {
        self.tokens() as f64 / (self.sequences * self.seq_len).max(1) as f64
    }

    /// For each of the `sequences * seq_len` positions, the image whose token sits there.
    pub fn token_images(&self) -> Vec<Option<usize>> {
        let mut out = vec![None; self.sequences * self.seq_len];
        for s in &self.segments {
            let at = s.sequence * self.seq_len + s.start;
            out[at..at + s.len].fill(Some(s.image));
        }
        out
    }

    /// The block-diagonal attention mask (sequences, seq_len, seq_len): 1 where query and key are
    /// tokens of the same image, 0 elsewhere (across images, and at padding).
    pub fn attention_mask(&self, device: &Device) -> Result<Tensor> {
        let (l, owners) = (self.seq_len, self.token_images());
        let mut mask = vec![0u8; self.sequences * l * l];
        for (s, row) in owners.chunks(l.max(1)).enumerate() {
            for (q, a) in row.iter().enumerate() {
                for (k, b) in row.iter().enumerate() {
                    if a.is_some() && a == b {
                        mask[(s * l + q) * l + k] = 1;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (self.sequences, l, l), device)
    }

    /// Per-segment tensors (1, len, D), in [`Self::segments`] order, laid out as the packed batch
    /// (sequences, seq_len, D) with zeros at padding.
    pub fn assemble(&self, parts: &[Tensor]) -> Result<Tensor> {
        if parts.len() != self.segments.len() {
            candle_core::bail!("{} parts for {} segments", parts.len(), self.segments.len());
        }
        let Some(first) = parts.first() else {
            candle_core::bail!("an empty packing has nothing to assemble");
        };
        let d = first.dim(2)?;
        let mut rows = Vec::with_capacity(self.sequences);
        let mut k = 0;
        for seq in 0..self.sequences {
            let mut row: Vec<Tensor> = Vec::new();
            let mut used = 0;
            while k < parts.len() && self.segments[k].sequence == seq {
                row.push(parts[k].clone());
                used += self.segments[k].len;
                k += 1;
            }
            if used < self.seq_len {
                row.push(Tensor::zeros(
                    (1, self.seq_len - used, d),
                    first.dtype(),
                    first.device(),
                )?);
            }
            rows.push(Tensor::cat(&row, 1)?);
        }
        Tensor::cat(&rows, 0)
    }

    /// Images' tokens (each (1, n_i, D), in image order) packed into (sequences, seq_len, D).
    pub fn pack(&self, per_image: &[Tensor]) -> Result<Tensor> {
        if per_image.len() != self.images() {
            candle_core::bail!(
                "{} images for a packing of {}",
                per_image.len(),
                self.images()
            );
        }
        for (i, x) in per_image.iter().enumerate() {
            let want = self.segment_of(i).len;
            if x.dims().len() != 3 || x.dim(0)? != 1 || x.dim(1)? != want {
                candle_core::bail!(
                    "image {i}: tokens of shape {:?}, the packing expects (1, {want}, D)",
                    x.dims()
                );
            }
        }
        let parts: Vec<Tensor> = self
            .segments
            .iter()
            .map(|s| per_image[s.image].clone())
            .collect();
        self.assemble(&parts)
    }

    /// Segment `s`'s tokens (1, len, D) of a packed batch (sequences, seq_len, D).
    pub fn slice(&self, x: &Tensor, s: &Segment) -> Result<Tensor> {
        x.narrow(0, s.sequence, 1)?.narrow(1, s.start, s.len)
    }

    /// Each image's tokens (1, n_i, D), in image order, from a packed batch.
    pub fn unpack(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        (0..self.images())
            .map(|i| self.slice(x, &self.segment_of(i)))
            .collect()
    }

    /// `f` applied to each segment's tokens (with its image index), the results assembled: how
    /// attention runs block by block.
    pub fn per_segment(
        &self,
        x: &Tensor,
        mut f: impl FnMut(&Tensor, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let parts = self
            .segments
            .iter()
            .map(|s| f(&self.slice(x, s)?, s.image))
            .collect::<Result<Vec<_>>>()?;
        self.assemble(&parts)
    }
}

/// A packing with, on a device, the index that routes per-image rows to the tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    pub packing: Packing,
    /// (sequences * seq_len,) u32: each position's image (padding: image 0, whose values there
    /// are never read).
    index: Tensor,
}

impl Routing {
    pub fn new(packing: Packing, device: &Device) -> Result<Self> {
        let index: Vec<u32> = packing
            .token_images()
            .into_iter()
            .map(|i| i.unwrap_or(0) as u32)
            .collect();
        let index = Tensor::from_vec(index, packing.sequences * packing.seq_len, device)?;
        Ok(Self { packing, index })
    }

    /// Per-image rows (N, D) as per-token rows (sequences * seq_len, D).
    pub fn route(&self, per_image: &Tensor) -> Result<Tensor> {
        per_image.contiguous()?.index_select(&self.index, 0)
    }

    /// A packed batch (S, L, D) viewed as one token per row (S*L, 1, D), as the per-sample
    /// fused ops (adaLN modulation, gated residual) take it with routed rows.
    pub fn rows(&self, x: &Tensor) -> Result<Tensor> {
        let (s, l, d) = x.dims3()?;
        x.reshape((s * l, 1, d))
    }

    /// The inverse of [`Self::rows`].
    pub fn unrows(&self, x: &Tensor) -> Result<Tensor> {
        let p = &self.packing;
        x.reshape((p.sequences, p.seq_len, ()))
    }
}

/// Token dropping (NaViT §3.1): a random `fraction` of an image's `n` patches left out, the kept
/// ones' indices in ascending (row-major) order; at least one patch is kept.
pub fn keep_tokens(rng: &mut NoiseRng, n: usize, fraction: f64) -> Vec<u32> {
    let keep = ((n as f64 * (1.0 - fraction)).round() as usize).clamp(1, n.max(1));
    // A partial Fisher-Yates shuffle picks `keep` distinct indices.
    let mut idx: Vec<u32> = (0..n as u32).collect();
    for i in 0..keep.min(n) {
        let j = i + rng.below(n - i);
        idx.swap(i, j);
    }
    let mut kept = idx[..keep.min(n)].to_vec();
    kept.sort_unstable();
    kept
}

/// Image-shaped tokens (1, k, p*p*C) (a packed model's output, or [`patch_tokens`]) viewed with
/// the channels second, (1, C, k, p*p), as the diffusion losses take images: every element keeps
/// its channel, and means over the rest are means over the kept patches.
pub fn channels_first(tokens: &Tensor, channels: usize) -> Result<Tensor> {
    let (n, k, ppc) = tokens.dims3()?;
    tokens
        .reshape((n, k, ppc / channels, channels))?
        .permute((0, 3, 1, 2))
}

/// An image (1, C, H, W) as patch tokens (1, H/p * W/p, p*p*C), row-major, each patch's values
/// ordered (row, column, channel) as the final layer predicts them; `keep` selects patches.
pub fn patch_tokens(x: &Tensor, p: usize, keep: Option<&Tensor>) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let t = x
        .reshape((n, c, h / p, p, w / p, p))?
        .permute((0, 2, 4, 3, 5, 1))?
        .reshape((n, (h / p) * (w / p), p * p * c))?;
    match keep {
        Some(k) => t.index_select(k, 1),
        None => Ok(t),
    }
}

/// The packed sizes of a set of images: how many sequences each way, for reports.
pub fn describe(packing: &Packing) -> String {
    format!(
        "{} images in {} sequences of {} tokens ({:.0}% filled)",
        packing.images(),
        packing.sequences(),
        packing.seq_len(),
        packing.fill() * 100.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_packing_places_every_token_once() {
        let counts = [16, 64, 9, 36, 64, 4, 25];
        let p = Packing::greedy(&counts, 80).unwrap();
        // Every image once, with its own length, inside its sequence, no overlaps.
        let owners = p.token_images();
        for (i, &n) in counts.iter().enumerate() {
            assert_eq!(owners.iter().filter(|o| **o == Some(i)).count(), n);
        }
        assert!(p.segments().iter().all(|s| s.start + s.len <= 80));
        // 218 tokens need at least 3 sequences of 80; first-fit decreasing finds 3.
        assert_eq!(p.sequences(), 3);
        assert!(Packing::greedy(&[81], 80).is_err());
        let padded = Packing::padded(&counts).unwrap();
        assert_eq!((padded.sequences(), padded.seq_len()), (7, 64));
        assert!(padded.fill() < p.fill());
    }

    #[test]
    fn attention_mask_is_block_diagonal() {
        let p = Packing::greedy(&[2, 3, 1], 4).unwrap();
        let m = p.attention_mask(&Device::Cpu).unwrap();
        let m: Vec<Vec<Vec<u8>>> = m.to_vec3().unwrap();
        let owners = p.token_images();
        for (s, seq) in m.iter().enumerate() {
            for (q, row) in seq.iter().enumerate() {
                for (k, &v) in row.iter().enumerate() {
                    let (a, b) = (owners[s * 4 + q], owners[s * 4 + k]);
                    assert_eq!(v == 1, a.is_some() && a == b, "seq {s} q {q} k {k}");
                }
            }
        }
    }

    #[test]
    fn segment_attention_is_attention_under_the_block_diagonal_mask() {
        let dev = Device::Cpu;
        let p = Packing::greedy(&[3, 2, 4, 1], 5).unwrap();
        let (s, l, d, heads) = (p.sequences(), 5, 8, 2);
        let hd = d / heads;
        let mut rng = NoiseRng::new(4);
        let qkv = rng
            .randn_like(&Tensor::zeros((s, l, 3 * d), candle_core::DType::F32, &dev).unwrap())
            .unwrap();
        let ours = p
            .per_segment(&qkv, |x, _| crate::ops::self_attention(x, heads))
            .unwrap();
        // Dense attention over whole sequences, masked pairs pushed to -1e9 before the softmax.
        let qkv5 = qkv
            .reshape((s, l, 3, heads, hd))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap();
        let part = |i: usize| qkv5.get(i).unwrap().contiguous().unwrap();
        let (q, k, v) = (part(0), part(1), part(2));
        let mask = p
            .attention_mask(&dev)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let bias = ((mask - 1.0).unwrap() * 1e9).unwrap().unsqueeze(1).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&bias).unwrap()).unwrap();
        let dense = probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((s, l, d))
            .unwrap();
        let a: Vec<Vec<Vec<f32>>> = ours.to_vec3().unwrap();
        let b: Vec<Vec<Vec<f32>>> = dense.to_vec3().unwrap();
        let owners = p.token_images();
        for (pos, owner) in owners.iter().enumerate() {
            if owner.is_some() {
                let (si, ti) = (pos / l, pos % l);
                for (x, y) in a[si][ti].iter().zip(&b[si][ti]) {
                    assert!((x - y).abs() < 1e-5, "position {pos}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn pack_then_unpack_is_the_identity() {
        let dev = Device::Cpu;
        let counts = [3, 5, 2, 4];
        let p = Packing::greedy(&counts, 6).unwrap();
        let xs: Vec<Tensor> = counts
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                Tensor::arange(0f32, (n * 2) as f32, &dev)
                    .unwrap()
                    .affine(1.0, 100.0 * i as f64)
                    .unwrap()
                    .reshape((1, n, 2))
                    .unwrap()
            })
            .collect();
        let packed = p.pack(&xs).unwrap();
        assert_eq!(packed.dims(), &[p.sequences(), 6, 2]);
        for (a, b) in p.unpack(&packed).unwrap().iter().zip(&xs) {
            assert_eq!(a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap());
        }
        // Padding is zero.
        let real: usize = counts.iter().sum();
        let total: f32 = packed
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let expected: f32 = xs
            .iter()
            .map(|x| x.sum_all().unwrap().to_scalar::<f32>().unwrap())
            .sum();
        assert_eq!(total, expected);
        assert!(real < p.sequences() * 6);
        assert!(p.pack(&xs[..3]).is_err());
    }

    #[test]
    fn token_dropping_keeps_the_asked_share_in_order() {
        let mut rng = NoiseRng::new(3);
        let kept = keep_tokens(&mut rng, 64, 0.25);
        assert_eq!(kept.len(), 48);
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        assert!(kept.iter().all(|&k| k < 64));
        assert_eq!(keep_tokens(&mut rng, 4, 0.99).len(), 1);
        assert_eq!(
            keep_tokens(&mut rng, 10, 0.0),
            (0..10).collect::<Vec<u32>>()
        );
    }

    #[test]
    fn patch_tokens_match_the_final_layer_order() {
        // (1, C=2, 4, 4) with p = 2: token 1 is the patch at row 0, column 1; its values are
        // ordered (row, column, channel).
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 32.0, &dev)
            .unwrap()
            .reshape((1, 2, 4, 4))
            .unwrap();
        let t: Vec<Vec<f32>> = patch_tokens(&x, 2, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        // channel c, pixel (y, x) = c*16 + y*4 + x; patch (0, 1) covers x = 2, 3, y = 0, 1.
        assert_eq!(t[1], vec![2.0, 18.0, 3.0, 19.0, 6.0, 22.0, 7.0, 23.0]);
        let cf = channels_first(&patch_tokens(&x, 2, None).unwrap(), 2).unwrap();
        assert_eq!(cf.dims(), &[1, 2, 4, 4]);
        let ch0: f32 = cf
            .narrow(1, 0, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(ch0, (0..16).sum::<i32>() as f32);
    }
}
