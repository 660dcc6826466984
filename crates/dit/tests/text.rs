//! The text encoder against Hugging Face `transformers` and `tokenizers` (fixture from
//! tools/make_text_fixtures.py) with the real all-MiniLM-L6-v2 weights.

mod common;

use candle_core::{DType, Device, Tensor};
use dit::text::TextEncoder;

#[test]
fn minilm_matches_transformers_and_sentence_transformers_pooling() {
    let Some(dir) = common::fetched("DIT_MINILM", "all-MiniLM-L6-v2", "fetch-minilm.sh") else {
        return;
    };
    let f = candle_core::safetensors::load(common::fixture("minilm.safetensors"), &Device::Cpu)
        .unwrap();
    let enc = TextEncoder::load(&dir, 16, &Device::Cpu).unwrap();
    assert_eq!(enc.width(), 384);
    // Tokenisation: ids and the padding mask, the long prompt cut to 16.
    let (ids, mask) = enc.tokenize(&PROMPTS).unwrap();
    let as_i64 = |t: &Tensor| t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    assert_eq!(as_i64(&ids), as_i64(&f["ids"]));
    assert_eq!(as_i64(&mask), as_i64(&f["mask"]));
    let batch = enc.encode(&PROMPTS).unwrap();
    assert_eq!(batch.tokens.dims(), [4, 16, 384]);
    // Padded positions' hidden states are not used downstream (the mask hides them), but
    // transformers computes them too: compare everything.
    let d = common::max_abs_diff(&batch.tokens, &f["tokens"]);
    assert!(d < 1e-4, "token embeddings differ by {d}");
    let d = common::max_abs_diff(&batch.pooled, &f["pooled"]);
    assert!(d < 1e-5, "pooled embeddings differ by {d}");
    // Different prompts, different embeddings (not a constant network).
    let p = batch.pooled.to_vec2::<f32>().unwrap();
    let dot: f32 = p[0].iter().zip(&p[2]).map(|(a, b)| a * b).sum();
    assert!(dot < 0.9, "{dot}");
}

const PROMPTS: [&str; 4] = [
    "a red circle in the top left on a blue background",
    "",
    "Two GREEN squares!",
    "a very long prompt that goes on and on well past the sixteen tokens it may keep",
];

/// A tiny random encoder saved by `transformers` with a tokenizer in its family's layout
/// (tools/make_text_fixtures.py) against `transformers` itself: ids, mask, the hidden states of
/// the real tokens (padded positions are masked downstream), and the pooled embedding.
fn check_tiny_encoder(name: &str, width: usize) {
    let io = format!("{name}_io.safetensors");
    let f = candle_core::safetensors::load(common::fixture(&io), &Device::Cpu).unwrap();
    let enc = TextEncoder::load(&common::fixture(name), 12, &Device::Cpu).unwrap();
    assert_eq!(enc.width(), width);
    let (ids, mask) = enc.tokenize(&PROMPTS).unwrap();
    let as_i64 = |t: &Tensor| t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    assert_eq!(as_i64(&ids), as_i64(&f["ids"]), "{name} ids");
    assert_eq!(as_i64(&mask), as_i64(&f["mask"]), "{name} mask");
    let batch = enc.encode(&PROMPTS).unwrap();
    let m = batch.mask.unsqueeze(2).unwrap();
    let d = common::max_abs_diff(
        &batch.tokens.broadcast_mul(&m).unwrap(),
        &f["tokens"].broadcast_mul(&m).unwrap(),
    );
    assert!(d < 1e-5, "{name} token embeddings differ by {d}");
    let d = common::max_abs_diff(&batch.pooled, &f["pooled"]);
    assert!(d < 1e-5, "{name} pooled embeddings differ by {d}");
}

/// CLIP's text tower (GenTron's CLIP-L family): causal attention, end-of-text pooled state.
#[test]
fn clip_text_model_matches_transformers() {
    check_tiny_encoder("tiny_clip", 32);
}

/// T5's encoder (GenTron's Flan-T5 family; gated GELU): bidirectional attention under the padding
/// mask, mean-pooled.
#[test]
fn t5_encoder_matches_transformers() {
    check_tiny_encoder("tiny_t5", 32);
}

#[test]
fn unsupported_or_missing_encoders_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("dit-text-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = TextEncoder::load(&dir, 8, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let err = TextEncoder::load(&dir, 8, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("gpt2"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The caption cache holds what the encoder gives (trimmed to the longest caption, where the
/// rest is masked padding), survives a save/load, is rebuilt for other captions or another
/// encoder, and a damaged file is an error.
#[test]
fn text_cache_keeps_the_encodings_and_knows_when_it_is_stale() {
    use dit::data::text_cache::TextCache;
    let dev = Device::Cpu;
    let enc = TextEncoder::load(&common::fixture("tiny_clip"), 12, &dev).unwrap();
    let captions: Vec<String> = ["a red circle", "a blue square on grey", "x"]
        .map(String::from)
        .to_vec();
    let path =
        std::env::temp_dir().join(format!("dit-text-cache-{}.safetensors", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let load = |caps: &[String], id: &str| {
        TextCache::load_or_build(
            &path,
            caps,
            id,
            || {
                Ok(vec![TextEncoder::load(
                    &common::fixture("tiny_clip"),
                    12,
                    &dev,
                )?])
            },
            |_| {},
            &dev,
        )
        .unwrap()
    };
    let (cache, built) = load(&captions, "clip");
    assert!(built);
    let (cache2, built) = load(&captions, "clip");
    assert!(!built);
    let full = enc
        .encode(&["a blue square on grey", "a red circle"])
        .unwrap();
    let s = cache.batch(&[0]).unwrap().tokens.dim(1).unwrap();
    let every = enc
        .encode(&["a red circle", "a blue square on grey", "x", ""])
        .unwrap();
    let real = every.mask.sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        s,
        real.iter().fold(0f32, |a, &b| a.max(b)) as usize,
        "trimmed to the longest caption"
    );
    // Beyond s the full encoding's mask is zero: nothing the model sees is lost.
    assert_eq!(
        full.mask
            .narrow(1, s, 12 - s)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    for c in [&cache, &cache2] {
        let got = c.batch(&[1, 0]).unwrap();
        assert!(common::max_abs_diff(&got.tokens, &full.tokens.narrow(1, 0, s).unwrap()) < 1e-6);
        assert!(common::max_abs_diff(&got.mask, &full.mask.narrow(1, 0, s).unwrap()) == 0.0);
        assert!(common::max_abs_diff(&got.pooled, &full.pooled) < 1e-6);
        let empty = enc.encode(&[""]).unwrap();
        assert!(common::max_abs_diff(&c.empty.pooled, &empty.pooled) < 1e-6);
    }
    assert!(cache.batch(&[3]).is_err());
    // Other captions or another encoder: rebuilt.
    assert!(load(&captions[..2], "clip").1);
    assert!(load(&captions[..2], "other").1);
    // A truncated file is an error, not a panic.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(TextCache::load(&path, &dev).is_err());
    std::fs::remove_file(&path).ok();
}

/// Sharded weights (`model.safetensors.index.json`, as Flan-T5-XXL ships) load like one file.
#[test]
fn sharded_encoder_weights_load_like_one_file() {
    let dev = Device::Cpu;
    let src = common::fixture("tiny_t5");
    let dir = std::env::temp_dir().join(format!("dit-sharded-t5-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        if f.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &dev).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let tensors: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(&file)).unwrap();
        for n in part.iter() {
            map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let whole = TextEncoder::load(&src, 12, &dev).unwrap();
    let sharded = TextEncoder::load(&dir, 12, &dev).unwrap();
    let (x, y) = (
        whole.encode(&PROMPTS).unwrap(),
        sharded.encode(&PROMPTS).unwrap(),
    );
    assert_eq!(common::max_abs_diff(&x.tokens, &y.tokens), 0.0);
    // A folder with neither weights file is a clear error.
    std::fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    let err = TextEncoder::load(&dir, 12, &dev).err().unwrap().to_string();
    assert!(err.contains("model.safetensors.index.json"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
