//! Pre-computed text embeddings of a captioned set: every distinct caption encoded once, before
//! training, and kept on disk, so a training step never runs the text encoder (GenTron freezes
//! it) and a resumed run reuses the file.
//!
//! One safetensors file: `tokens` (N, S, C), `mask` (N, S), `pooled` (N, P) for the N captions and
//! `empty.*` for the empty prompt (what text dropout substitutes); the metadata records the
//! captions and the encoder, and a file made for other captions or by another encoder is rebuilt.
//! S is the longest caption's token count rather than the encoder's padded length: the dropped
//! positions are padding the mask hides anyway, so the model's outputs are unchanged.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::model::TextBatch;
use crate::text::TextEncoder;
use crate::{Error, Result};

/// Encoded captions, indexed like the captions they were built from.
pub struct TextCache {
    pub captions: Vec<String>,
    /// What encoded them (see [`TextCache::load_or_build`]).
    pub encoder: String,
    all: TextBatch,
    pub empty: TextBatch,
}

fn trim(b: &TextBatch, s: usize) -> Result<TextBatch> {
    Ok(TextBatch {
        tokens: b.tokens.narrow(1, 0, s)?.contiguous()?,
        mask: b.mask.narrow(1, 0, s)?.contiguous()?,
        pooled: b.pooled.clone(),
    })
}

impl TextCache {
    /// Encodes `captions` (and the empty prompt) in batches of `batch`; `on_batch(done)` after
    /// each.
    pub fn build(
        encoder: &TextEncoder,
        encoder_id: &str,
        captions: &[String],
        batch: usize,
        mut on_batch: impl FnMut(usize),
    ) -> Result<Self> {
        let mut parts = Vec::new();
        for (i, chunk) in captions.chunks(batch.max(1)).enumerate() {
            let prompts: Vec<&str> = chunk.iter().map(String::as_str).collect();
            parts.push(encoder.encode(&prompts)?);
            on_batch((i * batch.max(1) + chunk.len()).min(captions.len()));
        }
        let empty = encoder.encode(&[""])?;
        let cat = |f: fn(&TextBatch) -> &Tensor| -> Result<Tensor> {
            let v: Vec<Tensor> = parts.iter().map(|p| f(p).clone()).collect();
            Ok(Tensor::cat(&v, 0)?)
        };
        let all = if parts.is_empty() {
            trim(&empty, 0)?.narrow(0, 0)?
        } else {
            TextBatch {
                tokens: cat(|b| &b.tokens)?,
                mask: cat(|b| &b.mask)?,
                pooled: cat(|b| &b.pooled)?,
            }
        };
        // Keep the positions some caption uses.
        let longest = |m: &Tensor| -> Result<usize> {
            if m.dim(0)? == 0 {
                return Ok(0);
            }
            let per: Vec<f32> = m.sum(1)?.to_vec1()?;
            Ok(per.into_iter().fold(0f32, f32::max) as usize)
        };
        let s = longest(&all.mask)?.max(longest(&empty.mask)?).max(1);
        Ok(Self {
            captions: captions.to_vec(),
            encoder: encoder_id.to_string(),
            all: trim(&all, s)?,
            empty: trim(&empty, s)?,
        })
    }

    /// Writes the cache atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let captions =
            serde_json::to_string(&self.captions).map_err(|e| Error::Input(e.to_string()))?;
        let meta = HashMap::from([
            ("captions".to_string(), captions),
            ("encoder".to_string(), self.encoder.clone()),
        ]);
        let tensors = [
            ("tokens", &self.all.tokens),
            ("mask", &self.all.mask),
            ("pooled", &self.all.pooled),
            ("empty.tokens", &self.empty.tokens),
            ("empty.mask", &self.empty.mask),
            ("empty.pooled", &self.empty.pooled),
        ];
        // f32 bytes (the safetensors version that takes metadata is not candle's).
        let bytes = tensors
            .iter()
            .map(|(_, t)| {
                let v = t
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
            })
            .collect::<Result<Vec<_>>>()?;
        let views = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, t), b)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    t.dims().to_vec(),
                    b,
                )
                .map_err(|e| Error::Input(format!("{name}: {e}")))?;
                Ok((*name, view))
            })
            .collect::<Result<Vec<_>>>()?;
        let tmp = path.with_extension("safetensors.tmp");
        safetensors::serialize_to_file(views, Some(meta), &tmp)
            .map_err(|e| Error::Input(format!("cannot write {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Reads a cache written by [`Self::save`]; shapes are checked, a damaged file is an error.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bad = |m: String| Error::Input(format!("text cache {}: {m}", path.display()));
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let captions: Vec<String> = serde_json::from_str(
            meta.get("captions")
                .ok_or_else(|| bad("no caption list".into()))?,
        )
        .map_err(|e| bad(e.to_string()))?;
        let encoder = meta.get("encoder").cloned().unwrap_or_default();
        let mut t = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| bad(e.to_string()))?;
        let mut take = |k: &str| t.remove(k).ok_or_else(|| bad(format!("no tensor {k}")));
        let all = TextBatch {
            tokens: take("tokens")?,
            mask: take("mask")?,
            pooled: take("pooled")?,
        };
        let empty = TextBatch {
            tokens: take("empty.tokens")?,
            mask: take("empty.mask")?,
            pooled: take("empty.pooled")?,
        };
        let (n, s, c) = all.tokens.dims3().map_err(|e| bad(e.to_string()))?;
        let want = [
            (&all.mask, vec![n, s]),
            (&all.pooled, vec![n, all.pooled.dim(1).unwrap_or(0)]),
            (&empty.tokens, vec![1, s, c]),
            (&empty.mask, vec![1, s]),
            (&empty.pooled, vec![1, all.pooled.dim(1).unwrap_or(0)]),
        ];
        for (t, shape) in want {
            if t.dims() != shape.as_slice() {
                return Err(bad(format!(
                    "a tensor of shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
        }
        if n != captions.len() {
            return Err(bad(format!(
                "{n} encodings for {} captions",
                captions.len()
            )));
        }
        Ok(Self {
            captions,
            encoder,
            all,
            empty,
        })
    }

    /// The cache at `path` if it holds exactly `captions` encoded by `encoder_id`, else a new one
    /// built with `encoder()` and saved there. Returns whether it was built.
    pub fn load_or_build(
        path: &Path,
        captions: &[String],
        encoder_id: &str,
        encoder: impl FnOnce() -> Result<TextEncoder>,
        on_batch: impl FnMut(usize),
        device: &Device,
    ) -> Result<(Self, bool)> {
        if let Ok(c) = Self::load(path, device) {
            if c.captions == captions && c.encoder == encoder_id {
                return Ok((c, false));
            }
        }
        let c = Self::build(&encoder()?, encoder_id, captions, 64, on_batch)?;
        c.save(path)?;
        Ok((c, true))
    }

    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// Width of the token and pooled embeddings.
    pub fn widths(&self) -> Result<(usize, usize)> {
        Ok((self.all.tokens.dim(2)?, self.all.pooled.dim(1)?))
    }

    /// The encodings of captions `ids`, on the cache's device.
    pub fn batch(&self, ids: &[usize]) -> Result<TextBatch> {
        if let Some(&bad) = ids.iter().find(|&&i| i >= self.len()) {
            return Err(Error::Input(format!(
                "caption {bad} of a cache of {}",
                self.len()
            )));
        }
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let ids = Tensor::new(ids.as_slice(), self.all.tokens.device())?;
        Ok(TextBatch {
            tokens: self.all.tokens.index_select(&ids, 0)?,
            mask: self.all.mask.index_select(&ids, 0)?,
            pooled: self.all.pooled.index_select(&ids, 0)?,
        })
    }
}
