//! Checkpoints: the released DiT `.pt` files (a bare state dict), reference train.py checkpoints
//! (a dict whose `ema` entry is used) and `.safetensors`; config inference and validation against
//! the tensors; atomic saving.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::{BlockDesign, DiTConfig, TextConditioning};
use crate::model::DiT;
use crate::{Error, Result};

pub type Tensors = HashMap<String, Tensor>;

fn ckpt_err(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Checkpoint(format!("cannot read checkpoint {}: {what}", path.display()))
}

/// Reads every tensor of a checkpoint onto the CPU. `.safetensors` by extension; anything else is
/// read as a PyTorch zip pickle, taking the `ema` entry of a train.py checkpoint when present.
pub fn read_tensors(path: &Path) -> Result<Tensors> {
    if !path.is_file() {
        return Err(Error::Checkpoint(format!(
            "checkpoint {} does not exist",
            path.display()
        )));
    }
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let tensors: Vec<(String, Tensor)> = if is_safetensors {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| ckpt_err(path, e))?
            .into_iter()
            .collect()
    } else {
        match candle_core::pickle::read_all_with_key(path, Some("ema")) {
            Ok(t) => t,
            // A bare state dict has no `ema` key.
            Err(e) if e.to_string().contains("key ema not found") => {
                candle_core::pickle::read_all_with_key(path, None).map_err(|e| ckpt_err(path, e))?
            }
            Err(e) => return Err(ckpt_err(path, e)),
        }
    };
    // A TorchScript archive pickles a module tree, not a flat state dict: candle's reader finds
    // no tensors in it.
    let tensors = if tensors.is_empty() && !is_safetensors {
        crate::torchscript::read(path)?
    } else {
        tensors
    };
    if tensors.is_empty() {
        return Err(ckpt_err(
            path,
            "it holds no tensors (is it a DiT state dict?)",
        ));
    }
    Ok(tensors.into_iter().collect())
}

/// A training checkpoint folder written by [`crate::train::Trainer::save`]: its model config and
/// its EMA weights (what sampling uses, as the reference's `ema`).
pub fn read_training_dir(dir: &Path) -> Result<(DiTConfig, Tensors)> {
    let bad = |m: String| {
        Error::Checkpoint(format!(
            "cannot read training checkpoint {}: {m}",
            dir.display()
        ))
    };
    let text = std::fs::read_to_string(dir.join("state.json")).map_err(|e| bad(e.to_string()))?;
    let state: crate::train::CheckpointState =
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let all = candle_core::safetensors::load(dir.join("weights.safetensors"), &Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    let ema: Tensors = all
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("ema.")?.to_string(), v)))
        .collect();
    Ok((state.model, ema))
}

fn dims<'a>(t: &'a Tensors, name: &str) -> Result<&'a [usize]> {
    t.get(name).map(|t| t.dims()).ok_or_else(|| {
        Error::Checkpoint(format!(
            "checkpoint lacks tensor {name}: is it a DiT checkpoint?"
        ))
    })
}

/// Infers the architecture from tensor shapes. The number of heads is not stored in a state
/// dict: the paper's value for the width is used (override with an explicit config).
/// The config written beside exported weights (`dit convert` writes `OUT.json` next to
/// `OUT.safetensors`), if there is one: it records what shapes cannot (heads, schedule,
/// prediction target).
pub fn config_beside(weights: &Path) -> Result<Option<DiTConfig>> {
    let json = weights.with_extension("json");
    if !json.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&json).map_err(|source| Error::Io {
        path: json.display().to_string(),
        source,
    })?;
    let cfg = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", json.display())))?;
    Ok(Some(cfg))
}

/// `input_size` comes from `pos_embed` when stored, else from `latent_size`.
pub fn infer_config(t: &Tensors, latent_size: Option<usize>) -> Result<DiTConfig> {
    let bad = |m: String| Err(Error::Checkpoint(m));
    let xw = dims(t, "x_embedder.proj.weight")?;
    // A Conv2d's weight, or a Conv3d's for spacetime patches (tubelet frames deep).
    let (xw, tubelet) = match xw {
        [d, c, pt, p, q] => (vec![*d, *c, *p, *q], Some(*pt)),
        _ => (xw.to_vec(), None),
    };
    let [hidden_size, in_channels, patch_size, _] = xw[..] else {
        return bad(format!(
            "x_embedder.proj.weight has shape {xw:?}, expected 4 dimensions (5 for spacetime patches)"
        ));
    };
    let (hidden_size, in_channels, patch_size) = (hidden_size, in_channels, patch_size);
    // A text-conditioned (GenTron) model has a pooled-text MLP where a class model has its label
    // table; the padded text length is not recorded (77, CLIP's, unless a config says). Two
    // encoders show as blocks 0 and 1 reading different widths (equal widths need the config).
    let text = match t.get("pooled_embedder.mlp.0.weight") {
        Some(p) => {
            let first = dims(t, "blocks.0.cross_attn.kv.weight")?[1];
            let second = t
                .get("blocks.1.cross_attn.kv.weight")
                .map(|w| w.dims()[1])
                .filter(|&w| w != first);
            Some(TextConditioning {
                second_context_dim: second,
                pooled_dim: p.dims()[1],
                ..TextConditioning::single(first, 77)
            })
        }
        None => None,
    };
    let rows = match text {
        Some(_) => 1,
        None => dims(t, "y_embedder.embedding_table.weight")?[0],
    };
    let depth = t
        .keys()
        .filter_map(|k| {
            k.strip_prefix("blocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |d| d + 1);
    let fc1 = dims(t, "blocks.0.mlp.fc1.weight")?[0];
    let out =
        dims(t, "final_layer.linear.weight")?[0] / (patch_size * patch_size * tubelet.unwrap_or(1));
    let input_size = match t.get("pos_embed") {
        Some(p) => {
            ((p.dims().get(1).copied().unwrap_or(0) as f64)
                .sqrt()
                .round() as usize)
                * patch_size
        }
        None => latent_size.ok_or_else(|| {
            Error::Checkpoint("checkpoint has no pos_embed: give the image size".into())
        })?,
    };
    // The block design shows in the first block's tensors.
    let block = if text.is_some() {
        BlockDesign::AdaLnZero
    } else if t.contains_key("blocks.0.cross_attn.q.weight") {
        BlockDesign::CrossAttention
    } else if let Some(m) = t.get("blocks.0.adaLN_modulation.1.weight") {
        match m.dim(0)? / hidden_size {
            4 => BlockDesign::AdaLn,
            _ => BlockDesign::AdaLnZero,
        }
    } else if t.contains_key("blocks.0.norm1.weight") {
        BlockDesign::InContext
    } else {
        BlockDesign::AdaLnZero // validation names what is missing
    };
    let cfg = DiTConfig {
        input_size: latent_size.unwrap_or(input_size),
        patch_size,
        in_channels,
        hidden_size,
        depth,
        num_heads: DiTConfig::default_heads(hidden_size),
        mlp_ratio: fc1 as f64 / hidden_size as f64,
        num_classes: rows.saturating_sub(1),
        learn_sigma: out == 2 * in_channels,
        schedule: Default::default(),
        prediction: Default::default(),
        block,
        text,
        // A video model has temporal attention or spacetime patches; its clip length is not
        // recorded (8, or one tube, unless a config says).
        video: match tubelet {
            Some(pt) => Some(crate::config::VideoConfig {
                frames: pt * 8usize.div_ceil(pt),
                tubelet: Some(pt),
            }),
            None => t
                .contains_key("blocks.0.temporal_attn.qkv.weight")
                .then_some(crate::config::VideoConfig::frames(8)),
        },
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Every tensor a model of `cfg` has, with its shape, in checkpoint naming.
pub fn expected_shapes(cfg: &DiTConfig) -> Vec<(String, Vec<usize>)> {
    let (d, p, m) = (cfg.hidden_size, cfg.patch_size, cfg.mlp_hidden());
    let mut v: Vec<(String, Vec<usize>)> = vec![
        (
            "x_embedder.proj.weight".into(),
            match cfg.video.and_then(|v| v.tubelet) {
                Some(pt) => vec![d, cfg.in_channels, pt, p, p],
                None => vec![d, cfg.in_channels, p, p],
            },
        ),
        ("x_embedder.proj.bias".into(), vec![d]),
        ("pos_embed".into(), vec![1, cfg.num_patches(), d]),
        ("t_embedder.mlp.0.weight".into(), vec![d, 256]),
        ("t_embedder.mlp.0.bias".into(), vec![d]),
        ("t_embedder.mlp.2.weight".into(), vec![d, d]),
        ("t_embedder.mlp.2.bias".into(), vec![d]),
    ];
    let linear = |v: &mut Vec<(String, Vec<usize>)>, name: String, out: usize, inp: usize| {
        v.push((format!("{name}.weight"), vec![out, inp]));
        v.push((format!("{name}.bias"), vec![out]));
    };
    let norm = |v: &mut Vec<(String, Vec<usize>)>, name: String| {
        v.push((format!("{name}.weight"), vec![d]));
        v.push((format!("{name}.bias"), vec![d]));
    };
    match cfg.text {
        None => v.push((
            "y_embedder.embedding_table.weight".into(),
            vec![cfg.num_classes + 1, d],
        )),
        Some(text) => {
            linear(&mut v, "pooled_embedder.mlp.0".into(), d, text.pooled_dim);
            linear(&mut v, "pooled_embedder.mlp.2".into(), d, d);
        }
    }
    for i in 0..cfg.depth {
        let b = format!("blocks.{i}");
        linear(&mut v, format!("{b}.attn.qkv"), 3 * d, d);
        linear(&mut v, format!("{b}.attn.proj"), d, d);
        linear(&mut v, format!("{b}.mlp.fc1"), m, d);
        linear(&mut v, format!("{b}.mlp.fc2"), d, m);
        match cfg.block {
            BlockDesign::AdaLnZero => linear(&mut v, format!("{b}.adaLN_modulation.1"), 6 * d, d),
            BlockDesign::AdaLn => linear(&mut v, format!("{b}.adaLN_modulation.1"), 4 * d, d),
            BlockDesign::CrossAttention => {
                for n in ["norm1", "norm2", "norm3"] {
                    norm(&mut v, format!("{b}.{n}"));
                }
                linear(&mut v, format!("{b}.cross_attn.q"), d, d);
                linear(&mut v, format!("{b}.cross_attn.kv"), 2 * d, d);
                linear(&mut v, format!("{b}.cross_attn.proj"), d, d);
            }
            BlockDesign::InContext => {
                norm(&mut v, format!("{b}.norm1"));
                norm(&mut v, format!("{b}.norm2"));
            }
        }
        if let Some(text) = cfg.text {
            norm(&mut v, format!("{b}.norm_cross"));
            linear(&mut v, format!("{b}.cross_attn.q"), d, d);
            linear(
                &mut v,
                format!("{b}.cross_attn.kv"),
                2 * d,
                text.context_dim_of(i),
            );
            linear(&mut v, format!("{b}.cross_attn.proj"), d, d);
        }
        if cfg.temporal_attention() {
            norm(&mut v, format!("{b}.norm_temporal"));
            linear(&mut v, format!("{b}.temporal_attn.qkv"), 3 * d, d);
            linear(&mut v, format!("{b}.temporal_attn.proj"), d, d);
        }
    }
    match cfg.block.uses_ada_ln() {
        true => linear(&mut v, "final_layer.adaLN_modulation.1".into(), 2 * d, d),
        false => norm(&mut v, "final_layer.norm_final".into()),
    }
    linear(
        &mut v,
        "final_layer.linear".into(),
        p * p * cfg.tubelet() * cfg.out_channels(),
        d,
    );
    if cfg.video.is_some_and(|v| v.tubelet.is_some()) {
        // Spacetime positions depend on the clip length: computed, never stored.
        v.retain(|(n, _)| n != "pos_embed");
    }
    v
}

/// Checks that the tensors are exactly those of `cfg` (`pos_embed` may be absent: it is computed).
/// The error names the first offending tensor and both shapes.
pub fn validate(cfg: &DiTConfig, t: &Tensors) -> Result<()> {
    let expected = expected_shapes(cfg);
    for (name, shape) in &expected {
        match t.get(name) {
            Some(x) if x.dims() != shape.as_slice() => {
                return Err(Error::Checkpoint(format!(
                    "tensor {name} has shape {:?} in the checkpoint but the model config expects {shape:?}{}",
                    x.dims(),
                    if name == "pos_embed" { " (check --image-size)" } else { "" }
                )))
            }
            None if name != "pos_embed" => {
                return Err(Error::Checkpoint(format!(
                    "checkpoint lacks tensor {name} (expected shape {shape:?}); is the depth right?"
                )))
            }
            _ => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<&String> = t.keys().filter(|k| !known.contains(k.as_str())).collect();
    extra.sort();
    if let Some(first) = extra.first() {
        return Err(Error::Checkpoint(format!(
            "checkpoint has {} tensor(s) the model config does not, first {first} with shape {:?}",
            extra.len(),
            t[*first].dims()
        )));
    }
    Ok(())
}

/// Total number of parameters of a config (the learned ones: `pos_embed` is fixed).
pub fn parameter_count(cfg: &DiTConfig) -> usize {
    expected_shapes(cfg)
        .iter()
        .filter(|(n, _)| n != "pos_embed")
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// Builds a DiT from checkpoint tensors, validating them against `cfg`.
pub fn build_model(
    cfg: &DiTConfig,
    tensors: Tensors,
    dtype: DType,
    device: &Device,
) -> Result<DiT> {
    validate(cfg, &tensors)?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    Ok(DiT::new(cfg, vb)?)
}

/// Loads a checkpoint. With `config` None the architecture is inferred from the tensors.
pub fn load_dit(
    path: &Path,
    config: Option<&DiTConfig>,
    latent_size: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<DiT> {
    let tensors = read_tensors(path)?;
    let cfg = match config {
        Some(c) => c.clone(),
        None => infer_config(&tensors, latent_size)?,
    };
    build_model(&cfg, tensors, dtype, device)
}

/// Writes tensors as safetensors at `path`, readable by whoever may read a file created there
/// any other way: the safetensors crate writes through a private temporary file (mode 0600),
/// which would leave checkpoints and latent shards unreadable to the rest of a group.
pub fn save_safetensors(tensors: &Tensors, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path)?;
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let probe = path.with_extension("permissions-probe");
    let usual = std::fs::File::create(&probe)
        .and_then(|f| f.metadata())
        .map_err(io)?
        .permissions();
    let _ = std::fs::remove_file(&probe);
    std::fs::set_permissions(path, usual).map_err(io)
}

/// Writes tensors as safetensors atomically: a temporary file beside the target, then a rename,
/// so a crash never leaves a half-written checkpoint under the final name.
pub fn save_safetensors_atomic(tensors: &Tensors, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    save_safetensors(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_tensors_get_the_permissions_of_any_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap();
        let tensors = Tensors::from([("w".to_string(), t.clone())]);
        save_safetensors_atomic(&tensors, &path).unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions();
        assert_eq!(mode(&path), mode(&plain));
        // Nothing left beside it, and the tensors read back.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(
            back["w"].to_vec1::<f32>().unwrap(),
            t.to_vec1::<f32>().unwrap()
        );
    }
}
