//! The `--text-encoder` flag shared by `train`, `sample` and `eval-shapes`: one encoder folder,
//! or two (GenTron's CLIP then T5, alternating over the blocks).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use dit::config::TextConditioning;
use dit::text::TextEncoder;

/// The folders given (or the snapshot folders of the hub repo ids given), or the default:
/// `$DIT_MINILM`, else the folder `tools/fetch-minilm.sh` writes (~/.cache/dit/all-MiniLM-L6-v2).
pub fn dirs(given: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if given.len() > 2 {
        bail!(
            "{} --text-encoder folders given; GenTron alternates at most two",
            given.len()
        );
    }
    if !given.is_empty() {
        // Folders as they are; hub repo ids from the Hugging Face cache (or downloaded).
        return given
            .iter()
            .map(|g| Ok(dit::text::resolve(&g.to_string_lossy())?))
            .collect();
    }
    let default = std::env::var_os("DIT_MINILM")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dit/all-MiniLM-L6-v2"))
        })
        .context("no --text-encoder and no HOME")?;
    Ok(vec![default])
}

/// Loads the encoders, prompts cut to `max_tokens`.
pub fn load(dirs: &[PathBuf], max_tokens: usize, device: &Device) -> Result<Vec<TextEncoder>> {
    dirs.iter()
        .map(|d| {
            TextEncoder::load(d, max_tokens, device).with_context(|| {
                "run tools/fetch-minilm.sh for the default encoder, or pass --text-encoder"
            })
        })
        .collect()
}

/// Loads the encoders a model of `text` conditioning reads, checking their number and widths.
pub fn load_for(
    given: &[PathBuf],
    text: &TextConditioning,
    device: &Device,
) -> Result<Vec<TextEncoder>> {
    let dirs = dirs(given)?;
    if dirs.len() != text.encoders() {
        bail!(
            "the model reads {} text encoder(s) (blocks alternate between two); {} --text-encoder given",
            text.encoders(),
            dirs.len()
        );
    }
    let encoders = load(&dirs, text.max_tokens, device)?;
    let want = [Some(text.context_dim), text.second_context_dim];
    for (i, (enc, dir)) in encoders.iter().zip(&dirs).enumerate() {
        if Some(enc.width()) != want[i] {
            bail!(
                "the text encoder at {} gives {}-wide tokens but the model's {} encoder takes {}",
                dir.display(),
                enc.width(),
                ["first", "second"][i],
                want[i].unwrap_or(0)
            );
        }
    }
    if encoders[0].width() != text.pooled_dim {
        bail!(
            "the text encoder at {} gives a {}-wide pooled embedding but the model takes {}",
            dirs[0].display(),
            encoders[0].width(),
            text.pooled_dim
        );
    }
    Ok(encoders)
}

/// How a cache names the encoders it was made with.
pub fn identity(dirs: &[PathBuf], max_tokens: usize) -> String {
    let names: Vec<String> = dirs
        .iter()
        .map(|d| {
            d.canonicalize()
                .unwrap_or_else(|_| d.clone())
                .display()
                .to_string()
        })
        .collect();
    format!("{} max_tokens={max_tokens}", names.join(" + "))
}
