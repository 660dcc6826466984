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
