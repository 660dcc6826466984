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
    let prompts = [
        "a red circle in the top left on a blue background",
        "",
        "Two GREEN squares!",
        "a very long prompt that goes on and on well past the sixteen tokens it may keep",
    ];
    // Tokenisation: ids and the padding mask, the long prompt cut to 16.
    let (ids, mask) = enc.tokenize(&prompts).unwrap();
    let as_i64 = |t: &Tensor| t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    assert_eq!(as_i64(&ids), as_i64(&f["ids"]));
    assert_eq!(as_i64(&mask), as_i64(&f["mask"]));
    let batch = enc.encode(&prompts).unwrap();
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

/// A CLIP text tower (tiny, random weights, saved by `transformers`, with a byte-level BPE
/// tokenizer in CLIP's layout) against `transformers`' CLIPTextModel: ids, mask, the hidden
/// states of the real tokens, and the pooled end-of-text state.
#[test]
fn clip_text_model_matches_transformers() {
    let f =
        candle_core::safetensors::load(common::fixture("tiny_clip_io.safetensors"), &Device::Cpu)
            .unwrap();
    let enc = TextEncoder::load(&common::fixture("tiny_clip"), 12, &Device::Cpu).unwrap();
    assert_eq!(enc.width(), 32);
    let prompts = [
        "a red circle in the top left on a blue background",
        "",
        "Two GREEN squares!",
        "a very long prompt that goes on and on well past the sixteen tokens it may keep",
    ];
    let (ids, mask) = enc.tokenize(&prompts).unwrap();
    let as_i64 = |t: &Tensor| t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    assert_eq!(as_i64(&ids), as_i64(&f["ids"]));
    assert_eq!(as_i64(&mask), as_i64(&f["mask"]));
    let batch = enc.encode(&prompts).unwrap();
    // Padded positions are masked downstream (and transformers masks them differently): compare
    // the real ones.
    let m = batch.mask.unsqueeze(2).unwrap();
    let d = common::max_abs_diff(
        &batch.tokens.broadcast_mul(&m).unwrap(),
        &f["tokens"].broadcast_mul(&m).unwrap(),
    );
    assert!(d < 1e-5, "token embeddings differ by {d}");
    let d = common::max_abs_diff(&batch.pooled, &f["pooled"]);
    assert!(d < 1e-5, "pooled embeddings differ by {d}");
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
