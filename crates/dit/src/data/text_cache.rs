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

use crate::config::TextConditioning;
use crate::model::{SecondText, TextBatch};
use crate::text::{encode_all, TextEncoder};
use crate::{Error, Result};

/// Encoded captions, indexed like the captions they were built from.
pub struct TextCache {
    pub captions: Vec<String>,
    /// What encoded them (see [`TextCache::load_or_build`]).
    pub encoder: String,
    all: TextBatch,
    pub empty: TextBatch,
}

/// The largest number of real tokens in any row of `mask` (N, S).
fn longest(mask: &Tensor) -> Result<usize> {
    if mask.dim(0)? == 0 {
        return Ok(0);
    }
    let per: Vec<f32> = mask.sum(1)?.to_vec1()?;
    Ok(per.into_iter().fold(0f32, f32::max) as usize)
}

/// `all` and `empty` cut, encoder by encoder, to the positions some row uses.
fn trim(all: &TextBatch, empty: &TextBatch) -> Result<(TextBatch, TextBatch)> {
    let keep =
        |a: &Tensor, e: &Tensor| -> Result<usize> { Ok(longest(a)?.max(longest(e)?).max(1)) };
    let s1 = keep(&all.mask, &empty.mask)?;
    let s2 = match (&all.second, &empty.second) {
        (Some(a), Some(e)) => keep(&a.mask, &e.mask)?,
        _ => 0,
    };
    let cut = |b: &TextBatch| -> Result<TextBatch> {
        let mut k = 0;
        Ok(b.try_map(|t| {
            // try_map's order: tokens, mask, pooled, second tokens, second mask.
            k += 1;
            match k {
                1 | 2 => t.narrow(1, 0, s1)?.contiguous(),
                3 => Ok(t.clone()),
                _ => t.narrow(1, 0, s2)?.contiguous(),
            }
        })?)
    };
    Ok((cut(all)?, cut(empty)?))
}

/// The tensors of a batch by name (`prefix` + tokens, mask, pooled, second.tokens, second.mask).
fn named<'a>(b: &'a TextBatch, prefix: &str) -> Vec<(String, &'a Tensor)> {
    let mut v = vec![
        (format!("{prefix}tokens"), &b.tokens),
        (format!("{prefix}mask"), &b.mask),
        (format!("{prefix}pooled"), &b.pooled),
    ];
    if let Some(s) = &b.second {
        v.push((format!("{prefix}second.tokens"), &s.tokens));
        v.push((format!("{prefix}second.mask"), &s.mask));
    }
    v
}

impl TextCache {
    /// Encodes `captions` (and the empty prompt) with one encoder or two ([`encode_all`]) in
    /// batches of `batch`; `on_batch(done)` after each.
    pub fn build(
        encoders: &[TextEncoder],
        encoder_id: &str,
        captions: &[String],
        batch: usize,
        mut on_batch: impl FnMut(usize),
    ) -> Result<Self> {
        let empty = encode_all(encoders, &[""])?;
        let mut all = empty.narrow(0, 0)?;
        for (i, chunk) in captions.chunks(batch.max(1)).enumerate() {
            let prompts: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let part = encode_all(encoders, &prompts)?;
            all = all.try_zip(&part, |a, b| Tensor::cat(&[a, b], 0))?;
            on_batch((i * batch.max(1) + chunk.len()).min(captions.len()));
        }
        let (all, empty) = trim(&all, &empty)?;
        Ok(Self {
            captions: captions.to_vec(),
            encoder: encoder_id.to_string(),
            all,
            empty,
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
        let mut tensors = named(&self.all, "");
        tensors.extend(named(&self.empty, "empty."));
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
                Ok((name.clone(), view))
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
        let two = t.contains_key("second.tokens");
        let mut batch = |prefix: &str| -> Result<TextBatch> {
            let mut take = |k: &str| {
                t.remove(&format!("{prefix}{k}"))
                    .ok_or_else(|| bad(format!("no tensor {prefix}{k}")))
            };
            let (tokens, mask, pooled) = (take("tokens")?, take("mask")?, take("pooled")?);
            let second = match two {
                true => Some(SecondText {
                    tokens: take("second.tokens")?,
                    mask: take("second.mask")?,
                }),
                false => None,
            };
            Ok(TextBatch {
                tokens,
                mask,
                pooled,
                second,
            })
        };
        let all = batch("")?;
        let empty = batch("empty.")?;
        // Rows: N captions, 1 empty prompt; within each encoder, tokens and mask agree.
        for (b, rows) in [(&all, captions.len()), (&empty, 1)] {
            let sets = b.token_sets();
            for set in &sets {
                let (n, s, _) = set.tokens.dims3().map_err(|e| bad(e.to_string()))?;
                let mask = set.mask.map(|m| m.dims().to_vec());
                if n != rows || mask != Some(vec![n, s]) {
                    return Err(bad(format!(
                        "tokens {:?} and mask {mask:?} for {rows} prompts",
                        set.tokens.dims()
                    )));
                }
            }
            if b.pooled.dims().first() != Some(&rows) || b.pooled.rank() != 2 {
                return Err(bad(format!(
                    "pooled {:?} for {rows} prompts",
                    b.pooled.dims()
                )));
            }
        }
        Ok(Self {
            captions,
            encoder,
            all,
            empty,
        })
    }

    /// The cache at `path` if it holds exactly `captions` encoded by `encoder_id`, else a new one
    /// built with `encoders()` and saved there. Returns whether it was built.
    pub fn load_or_build(
        path: &Path,
        captions: &[String],
        encoder_id: &str,
        encoders: impl FnOnce() -> Result<Vec<TextEncoder>>,
        on_batch: impl FnMut(usize),
        device: &Device,
    ) -> Result<(Self, bool)> {
        if let Ok(c) = Self::load(path, device) {
            if c.captions == captions && c.encoder == encoder_id {
                return Ok((c, false));
            }
        }
        let c = Self::build(&encoders()?, encoder_id, captions, 64, on_batch)?;
        c.save(path)?;
        Ok((c, true))
    }

    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// What a model reading these encodings takes: token widths (one per encoder), pooled width,
    /// and `max_tokens`.
    pub fn conditioning(&self, max_tokens: usize) -> Result<TextConditioning> {
        Ok(TextConditioning {
            pooled_dim: self.all.pooled.dim(1)?,
            second_context_dim: match &self.all.second {
                Some(s) => Some(s.tokens.dim(2)?),
                None => None,
            },
            ..TextConditioning::single(self.all.tokens.dim(2)?, max_tokens)
        })
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
        Ok(self.all.try_map(|t| t.index_select(&ids, 0))?)
    }
}
