//! A sharded on-disk store of VAE latents and labels: written by `dit extract-latents`, read by
//! training with random access (memory-mapped shards, so a store larger than RAM works).
//!
//! Layout: `DIR/index.json` (counts, shapes, class names, shard files) and `DIR/shard-NNNNN.safetensors`,
//! each with `latents` and `latents_flip` (f32, (n, C, h, w): the image and its mirror, as
//! fast-DiT extracts them) and `labels` (i64, (n)). Files are written to a temporary name and
//! renamed, so a killed extraction never leaves a half-written shard under a real name.
//!
//! A bucketed store (`extract-latents --keep-aspect`) holds latents of several sizes, each shard
//! one size (`shard_shapes`); its samples are read one by one ([`LatentStore::samples`]) and
//! trained packed.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreIndex {
    pub count: usize,
    /// (C, h, w) of one latent.
    pub latent_shape: [usize; 3],
    pub image_size: usize,
    pub classes: Vec<String>,
    /// A captioned set's distinct captions (then `labels` index them and `classes` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captions: Option<Vec<String>>,
    /// (file name, samples) per shard, in order.
    pub shards: Vec<(String, usize)>,
    /// (C, h, w) of each shard's latents; empty (stores written before buckets): all
    /// `latent_shape`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shard_shapes: Vec<[usize; 3]>,
}

impl StoreIndex {
    /// The latent shape of shard `s`.
    pub fn shard_shape(&self, s: usize) -> [usize; 3] {
        self.shard_shapes
            .get(s)
            .copied()
            .unwrap_or(self.latent_shape)
    }

    /// Whether the store holds latents of more than one size.
    pub fn is_bucketed(&self) -> bool {
        self.shard_shapes.iter().any(|&s| s != self.latent_shape)
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Accumulates latents and writes a shard every `shard_size` samples (of one size: a bucketed
/// writer keeps one pending shard per size).
pub struct LatentStoreWriter {
    dir: PathBuf,
    shard_size: usize,
    index: StoreIndex,
    bucketed: bool,
    pending: std::collections::BTreeMap<[usize; 3], Pending>,
}

#[derive(Default)]
struct Pending {
    latents: Vec<f32>,
    flipped: Vec<f32>,
    labels: Vec<i64>,
}

impl LatentStoreWriter {
    pub fn create(
        dir: &Path,
        latent_shape: [usize; 3],
        image_size: usize,
        classes: Vec<String>,
        captions: Option<Vec<String>>,
        shard_size: usize,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            shard_size: shard_size.max(1),
            index: StoreIndex {
                count: 0,
                latent_shape,
                image_size,
                classes,
                captions,
                shards: Vec::new(),
                shard_shapes: Vec::new(),
            },
            bucketed: false,
            pending: Default::default(),
        })
    }

    /// Takes latents of any spatial size (aspect-ratio buckets); `latent_shape` is then the
    /// nominal (square) size a model of the store is built for.
    pub fn bucketed(mut self) -> Self {
        self.bucketed = true;
        self
    }

    /// Adds latents (n, C, h, w) of n images, those of their mirrors, and their labels.
    pub fn push(&mut self, latents: &Tensor, flipped: &Tensor, labels: &[usize]) -> Result<()> {
        let [c, h, w] = self.index.latent_shape;
        let want = match (self.bucketed, latents.dims()) {
            (true, &[_, lc, lh, lw]) if lc == c => [labels.len(), c, lh, lw],
            _ => [labels.len(), c, h, w],
        };
        for t in [latents, flipped] {
            if t.dims() != want {
                return Err(Error::Input(format!(
                    "latents of shape {:?} do not fit the store's {want:?}",
                    t.dims()
                )));
            }
        }
        let shape = [want[1], want[2], want[3]];
        let p = self.pending.entry(shape).or_default();
        p.latents.extend(latents.flatten_all()?.to_vec1::<f32>()?);
        p.flipped.extend(flipped.flatten_all()?.to_vec1::<f32>()?);
        p.labels.extend(labels.iter().map(|&l| l as i64));
        while self.pending[&shape].labels.len() >= self.shard_size {
            self.write_shard(shape, self.shard_size)?;
        }
        Ok(())
    }

    fn write_shard(&mut self, shape: [usize; 3], n: usize) -> Result<()> {
        let [c, h, w] = shape;
        let per = c * h * w;
        let name = format!("shard-{:05}.safetensors", self.index.shards.len());
        let dev = Device::Cpu;
        let p = self.pending.get_mut(&shape).expect("pending shape");
        let lat: Vec<f32> = p.latents.drain(..n * per).collect();
        let flip: Vec<f32> = p.flipped.drain(..n * per).collect();
        let labels: Vec<i64> = p.labels.drain(..n).collect();
        let tensors = [
            ("latents", Tensor::from_vec(lat, (n, c, h, w), &dev)?),
            ("latents_flip", Tensor::from_vec(flip, (n, c, h, w), &dev)?),
            ("labels", Tensor::from_vec(labels, n, &dev)?),
        ];
        let path = self.dir.join(&name);
        let tmp = path.with_extension("tmp");
        let tensors = tensors
            .map(|(k, t)| (k.to_string(), t))
            .into_iter()
            .collect();
        crate::checkpoint::save_safetensors(&tensors, &tmp)?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.index.shards.push((name, n));
        self.index.shard_shapes.push(shape);
        self.index.count += n;
        Ok(())
    }

    /// Writes the last partial shards and the index; returns the number of samples stored.
    pub fn finish(mut self) -> Result<usize> {
        let rest: Vec<([usize; 3], usize)> = self
            .pending
            .iter()
            .map(|(s, p)| (*s, p.labels.len()))
            .filter(|(_, n)| *n > 0)
            .collect();
        for (shape, n) in rest {
            self.write_shard(shape, n)?;
        }
        let json =
            serde_json::to_string_pretty(&self.index).map_err(|e| Error::Input(e.to_string()))?;
        write_atomic(&self.dir.join("index.json"), json.as_bytes())?;
        Ok(self.index.count)
    }
}

/// A store opened for reading.
pub struct LatentStore {
    pub index: StoreIndex,
    shards: Vec<memmap2::Mmap>,
    /// First global sample index of each shard.
    starts: Vec<usize>,
}

impl LatentStore {
    /// Whether `dir` holds a latent store (has an `index.json`).
    pub fn is_store(dir: &Path) -> bool {
        dir.join("index.json").is_file()
    }

    pub fn open(dir: &Path) -> Result<Self> {
        let bad = |m: String| Error::Input(format!("latent store {}: {m}", dir.display()));
        let path = dir.join("index.json");
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let index: StoreIndex = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if !index.shard_shapes.is_empty() && index.shard_shapes.len() != index.shards.len() {
            return Err(bad(format!(
                "{} shard shapes for {} shards",
                index.shard_shapes.len(),
                index.shards.len()
            )));
        }
        let (mut shards, mut starts, mut start) = (Vec::new(), Vec::new(), 0);
        for (k, (name, n)) in index.shards.iter().enumerate() {
            let [c, h, w] = index.shard_shape(k);
            let p = dir.join(name);
            let file = std::fs::File::open(&p).map_err(io_err(&p))?;
            // SAFETY: the shard is only read; a store is not modified while a run reads it.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(&p))?;
            let st = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| bad(format!("{name}: {e}")))?;
            for (key, shape, dtype) in [
                ("latents", vec![*n, c, h, w], safetensors::Dtype::F32),
                ("latents_flip", vec![*n, c, h, w], safetensors::Dtype::F32),
                ("labels", vec![*n], safetensors::Dtype::I64),
            ] {
                let t = st
                    .tensor(key)
                    .map_err(|e| bad(format!("{name}: {key}: {e}")))?;
                if t.shape() != shape.as_slice() || t.dtype() != dtype {
                    return Err(bad(format!(
                        "{name}: {key} is {:?} {:?}, expected {dtype:?} {shape:?}",
                        t.dtype(),
                        t.shape()
                    )));
                }
            }
            starts.push(start);
            start += n;
            shards.push(mmap);
        }
        if start != index.count {
            return Err(bad(format!(
                "shards hold {start} samples, index says {}",
                index.count
            )));
        }
        Ok(Self {
            index,
            shards,
            starts,
        })
    }

    pub fn len(&self) -> usize {
        self.index.count
    }

    pub fn is_empty(&self) -> bool {
        self.index.count == 0
    }

    /// Latents (N, C, h, w) and labels of samples `idx`, the mirrored version where `flip[i]`
    /// (all of one size: [`Self::samples`] reads a bucketed store's mixed sizes).
    pub fn batch(
        &self,
        idx: &[usize],
        flip: &[bool],
        device: &Device,
    ) -> Result<(Tensor, Vec<usize>)> {
        let (xs, labels) = self.samples(idx, flip, device)?;
        if let Some(x) = xs.iter().find(|x| x.dims() != xs[0].dims()) {
            return Err(Error::Input(format!(
                "a batch of latents of sizes {:?} and {:?}: this store is bucketed by aspect ratio, train it packed (dit train --pack)",
                xs[0].dims(),
                x.dims()
            )));
        }
        Ok((Tensor::cat(&xs, 0)?, labels))
    }

    /// Each sample's latent (1, C, h, w), the mirrored version where `flip[i]`, and labels.
    pub fn samples(
        &self,
        idx: &[usize],
        flip: &[bool],
        device: &Device,
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        let mut xs = Vec::with_capacity(idx.len());
        let mut labels = Vec::with_capacity(idx.len());
        for (k, &i) in idx.iter().enumerate() {
            if i >= self.len() {
                return Err(Error::Input(format!(
                    "sample {i} of a store of {}",
                    self.len()
                )));
            }
            let s = self.starts.partition_point(|&st| st <= i) - 1;
            let j = i - self.starts[s];
            let [c, h, w] = self.index.shard_shape(s);
            let per = c * h * w;
            let st = safetensors::SafeTensors::deserialize(&self.shards[s])
                .map_err(|e| Error::Input(e.to_string()))?;
            let key = if flip.get(k).copied().unwrap_or(false) {
                "latents_flip"
            } else {
                "latents"
            };
            let bytes = st.tensor(key).map_err(|e| Error::Input(e.to_string()))?;
            let bytes = &bytes.data()[j * per * 4..(j + 1) * per * 4];
            let data: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            xs.push(Tensor::from_vec(data, (1, c, h, w), device)?);
            let lb = st
                .tensor("labels")
                .map_err(|e| Error::Input(e.to_string()))?;
            let lb = &lb.data()[j * 8..(j + 1) * 8];
            labels.push(i64::from_le_bytes(lb.try_into().expect("8 bytes")) as usize);
        }
        Ok((xs, labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_across_shards_with_flips() {
        let dir = std::env::temp_dir().join(format!("dit-store-{}", std::process::id()));
        let dev = Device::Cpu;
        let mut w =
            LatentStoreWriter::create(&dir, [2, 2, 2], 16, vec!["a".into(), "b".into()], None, 3)
                .unwrap();
        let lat = Tensor::arange(0f32, 7.0 * 8.0, &dev)
            .unwrap()
            .reshape((7, 2, 2, 2))
            .unwrap();
        let flip = (lat.neg().unwrap() - 1.0).unwrap();
        let labels = [0, 1, 1, 0, 1, 0, 0];
        w.push(
            &lat.narrow(0, 0, 4).unwrap(),
            &flip.narrow(0, 0, 4).unwrap(),
            &labels[..4],
        )
        .unwrap();
        w.push(
            &lat.narrow(0, 4, 3).unwrap(),
            &flip.narrow(0, 4, 3).unwrap(),
            &labels[4..],
        )
        .unwrap();
        assert!(w
            .push(&lat, &lat.narrow(0, 0, 6).unwrap(), &labels)
            .is_err());
        assert_eq!(w.finish().unwrap(), 7);
        let s = LatentStore::open(&dir).unwrap();
        assert_eq!((s.len(), s.index.shards.len()), (7, 3)); // 3 + 3 + 1
        let (x, l) = s.batch(&[6, 0, 4], &[false, true, false], &dev).unwrap();
        assert_eq!(l, [0, 0, 1]);
        let want = Tensor::cat(
            &[
                lat.get(6).unwrap().unsqueeze(0).unwrap(),
                flip.get(0).unwrap().unsqueeze(0).unwrap(),
                lat.get(4).unwrap().unsqueeze(0).unwrap(),
            ],
            0,
        )
        .unwrap();
        assert_eq!(crate::test_util::max_abs_diff(&x, &want), 0.0);
        assert!(s.batch(&[7], &[false], &dev).is_err());
        // A truncated shard is an error naming it, not a panic.
        let shard = dir.join("shard-00001.safetensors");
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
        let err = LatentStore::open(&dir).err().unwrap().to_string();
        assert!(err.contains("shard-00001"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_bucketed_store_keeps_each_size() {
        let dir = std::env::temp_dir().join(format!("dit-buckets-{}", std::process::id()));
        let dev = Device::Cpu;
        let mut w = LatentStoreWriter::create(&dir, [2, 4, 4], 32, vec!["a".into()], None, 2)
            .unwrap()
            .bucketed();
        let wide = Tensor::arange(0f32, 3.0 * 16.0, &dev)
            .unwrap()
            .reshape((3, 2, 2, 4))
            .unwrap();
        let square = Tensor::ones((1, 2, 4, 4), candle_core::DType::F32, &dev).unwrap();
        w.push(&wide, &wide.neg().unwrap(), &[0, 0, 0]).unwrap();
        w.push(&square, &square, &[0]).unwrap();
        // The channels must still match.
        let bad = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(w.push(&bad, &bad, &[0]).is_err());
        assert_eq!(w.finish().unwrap(), 4);
        let s = LatentStore::open(&dir).unwrap();
        assert!(s.index.is_bucketed());
        // Shards: two wide (full), then the last wide and the square one.
        let (xs, _) = s.samples(&[0, 2, 3], &[false, true, false], &dev).unwrap();
        let shapes: Vec<Vec<usize>> = xs.iter().map(|x| x.dims().to_vec()).collect();
        assert_eq!(shapes.iter().filter(|d| *d == &[1, 2, 2, 4]).count(), 2);
        let total: f32 = xs
            .iter()
            .map(|x| x.sum_all().unwrap().to_scalar::<f32>().unwrap())
            .sum();
        // Samples 0 and 2 are wide rows 0 and 2 (the second mirrored), 3 the square one... in
        // shard order: [wide 0, wide 1], [wide 2], [square].
        let row = |i: usize| {
            wide.get(i)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(total, row(0) - row(2) + 32.0);
        let err = s
            .batch(&[0, 3], &[false, false], &dev)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--pack"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
