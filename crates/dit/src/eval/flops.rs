//! Forward-pass cost of a DiT, computed from its config: multiply-accumulates of every matrix
//! product (patch-embedding convolution, linears, the two attention products), as the paper
//! counts Gflops. Normalisations, activations and the softmax are not counted (nor were they).

use crate::config::{BlockDesign, DiTConfig};

/// Multiply-accumulates of one forward pass of one sample, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardMacs {
    pub patch_embed: u64,
    pub conditioning: u64,
    /// All blocks: adaLN modulation, qkv, q k^T, attention x v, projection, MLP.
    pub blocks: u64,
    pub final_layer: u64,
}

impl ForwardMacs {
    pub fn total(&self) -> u64 {
        self.patch_embed + self.conditioning + self.blocks + self.final_layer
    }

    /// In Gflops as the paper's tables (10^9 multiply-accumulates).
    pub fn gflops(&self) -> f64 {
        self.total() as f64 / 1e9
    }
}

/// Multiply-accumulates of one sample: an image, or for a video model one clip of
/// `video.frames` frames. Per-frame video runs each frame through the blocks as an image (the
/// adaLN modulation and the text keys and values once per frame, as the frame-batched forward
/// computes them) plus each block's temporal attention across the frames; spacetime patches run
/// one sequence of all the clip's tubes. The timestep and pooled-text MLPs run once per sample.
pub fn forward_macs(cfg: &DiTConfig) -> ForwardMacs {
    let d = cfg.hidden_size as u64;
    let p = cfg.patch_size as u64;
    let g = cfg.grid_size() as u64;
    let m = cfg.mlp_hidden() as u64;
    let frames = cfg.video.map_or(1, |v| v.frames) as u64;
    let pt = cfg.tubelet() as u64;
    // Sequences the blocks attend within, and the image tokens of each.
    let (sequences, t) = match cfg.temporal_attention() {
        true => (frames, g * g),
        false => (1, frames / pt * g * g),
    };
    // The sample's image tokens.
    let tokens = sequences * t;
    // Timestep MLP (256 frequencies -> D -> D); the label lookup costs nothing; GenTron adds the
    // pooled-text MLP.
    let pooled = cfg.text.map_or(0, |tc| tc.pooled_dim as u64 * d + d * d);
    let conditioning = 256 * d + d * d + pooled;
    // Tokens each sequence's blocks process: in-context conditioning adds two.
    let n = t + cfg.block.extra_tokens() as u64;
    let design = match cfg.block {
        BlockDesign::AdaLnZero => 6 * d * d, // adaLN modulation, once per sequence
        BlockDesign::AdaLn => 4 * d * d,
        // q from every token, k and v from the 2 condition tokens, both products, projection.
        BlockDesign::CrossAttention => n * d * d + 2 * 2 * d * d + 2 * n * 2 * d + n * d * d,
        BlockDesign::InContext => 0,
    };
    let block = design
        + n * 3 * d * d   // qkv
        + 2 * n * n * d   // q k^T and attention x v over all heads
        + n * d * d       // output projection
        + 2 * n * d * m; // MLP

    // Temporal attention: qkv and projection of every token, and each spatial position's
    // frames attending to each other.
    let temporal = match cfg.temporal_attention() {
        true => tokens * 4 * d * d + 2 * frames * tokens * d,
        false => 0,
    };
    // GenTron: q from every token, k and v from the text tokens, both products, projection.
    // (Summed over the blocks: with two encoders they alternate widths.)
    let text_blocks: u64 = match cfg.text {
        Some(tc) => (0..cfg.depth)
            .map(|i| {
                let (s, cd) = (tc.max_tokens as u64, tc.context_dim_of(i) as u64);
                n * d * d + s * cd * 2 * d + 2 * n * s * d + n * d * d
            })
            .sum(),
        None => 0,
    };
    let final_modulation = if cfg.block.uses_ada_ln() {
        2 * d * d
    } else {
        0
    };
    let tube = pt * p * p;
    ForwardMacs {
        patch_embed: tokens * d * cfg.in_channels as u64 * tube,
        conditioning,
        blocks: cfg.depth as u64 * (sequences * block + temporal) + sequences * text_blocks,
        final_layer: sequences * final_modulation + tokens * d * tube * cfg.out_channels() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VideoConfig;

    #[test]
    fn matches_table_4_of_the_paper() {
        // ../shared/reference/dit-facts.md: Gflops at 256 px.
        let table = [
            ("S", [0.36f64, 1.41, 6.06]),
            ("B", [1.42, 5.56, 23.01]),
            ("L", [5.01, 19.70, 80.71]),
            ("XL", [7.39, 29.05, 118.64]),
        ];
        for (size, row) in table {
            for (patch, want) in [8, 4, 2].into_iter().zip(row) {
                let cfg = DiTConfig::named(&format!("DiT-{size}/{patch}"), 256).unwrap();
                let got = forward_macs(&cfg).gflops();
                // The table rounds to 0.01: allow that on the small models, 1% elsewhere.
                let tol = (0.01 * want).max(0.006);
                assert!(
                    (got - want).abs() <= tol,
                    "DiT-{size}/{patch}: {got:.3} vs {want}"
                );
            }
        }
        let xl512 = forward_macs(&DiTConfig::named("DiT-XL/2", 512).unwrap()).gflops();
        assert!((xl512 - 524.6).abs() < 0.01 * 524.6, "{xl512}");
        let params =
            crate::checkpoint::parameter_count(&DiTConfig::named("DiT-XL/2", 256).unwrap());
        assert!((params as f64 - 675e6).abs() < 0.01 * 675e6, "{params}");
    }

    #[test]
    fn two_alternating_text_encoders_cost_their_own_widths() {
        // GenTron-XL/2 with CLIP-L (768) alone, and with T5-XXL (4096) read by the 14 odd
        // blocks: only those blocks' key/value projections (4096 -> 2 x 1152) grow, in
        // parameters and in multiply-accumulates (77 text tokens each).
        let clip = crate::config::TextConditioning::single(768, 77);
        let both = crate::config::TextConditioning {
            second_context_dim: Some(4096),
            ..clip
        };
        let one = DiTConfig::gentron("GenTron-XL/2", 256, clip).unwrap();
        let two = DiTConfig::gentron("GenTron-XL/2", 256, both).unwrap();
        let count = crate::checkpoint::parameter_count;
        assert_eq!(count(&two) - count(&one), 14 * (4096 - 768) * 2 * 1152);
        let macs = |c: &DiTConfig| forward_macs(c).total();
        assert_eq!(macs(&two) - macs(&one), 14 * 77 * (4096 - 768) * 2 * 1152);
    }

    #[test]
    fn block_designs_cost_what_section_3_2_reports() {
        // DiT-XL/2: cross-attention 137.62 Gflops vs adaLN-Zero's 118.64 (the paper, §3.2 and
        // Figure 5); in-context adds two tokens (~0.8%); adaLN drops the gates' third of the
        // modulation.
        let gflops = |block| {
            let cfg = DiTConfig {
                block,
                ..DiTConfig::named("DiT-XL/2", 256).unwrap()
            };
            forward_macs(&cfg).gflops()
        };
        let zero = gflops(BlockDesign::AdaLnZero);
        let cross = gflops(BlockDesign::CrossAttention);
        assert!((cross - 137.62).abs() < 0.01 * 137.62, "{cross}");
        let in_context = gflops(BlockDesign::InContext);
        assert!(
            in_context > zero && in_context < 1.01 * zero,
            "{in_context}"
        );
        let ada_ln = gflops(BlockDesign::AdaLn);
        assert!(ada_ln < zero && ada_ln > 0.99 * zero, "{ada_ln}");
    }

    #[test]
    fn text_and_video_models_cost_what_torch_counts() {
        // tests/fixtures/flops.json: torch's FlopCounterMode on the forward passes of the
        // GenTron fixtures (tools/make_fixtures.py), per image or clip.
        let counted: std::collections::HashMap<String, u64> =
            serde_json::from_str(include_str!("../../../../tests/fixtures/flops.json")).unwrap();
        let small = |hidden, input_size, in_channels| DiTConfig {
            input_size,
            in_channels,
            hidden_size: hidden,
            depth: 2,
            num_heads: 2,
            num_classes: 0,
            ..Default::default()
        };
        let text = |width, pooled_dim, tokens| crate::config::TextConditioning {
            pooled_dim,
            ..crate::config::TextConditioning::single(width, tokens)
        };
        let image = DiTConfig {
            text: Some(text(48, 40, 7)),
            ..small(64, 8, 4)
        };
        let video = DiTConfig {
            text: Some(text(24, 16, 5)),
            video: Some(VideoConfig::frames(3)),
            ..small(32, 4, 4)
        };
        let tubes = DiTConfig {
            num_classes: 5,
            video: Some(VideoConfig {
                frames: 4,
                tubelet: Some(2),
            }),
            ..small(40, 4, 3)
        };
        for (name, cfg) in [
            ("gentron", image),
            ("gentron_video", video),
            ("tubes", tubes),
        ] {
            assert_eq!(forward_macs(&cfg).total(), counted[name], "{name}");
        }
    }
}
