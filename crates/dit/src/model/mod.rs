//! The DiT network (Peebles & Xie 2022), module by module as in the reference `models.py`.

pub mod block;
pub mod dit;
pub mod embed;

pub use block::{DiTBlock, FinalLayer, TextTokens};
pub use dit::{DiT, GuidedChannels, SecondText, TextBatch};
pub use embed::{LabelEmbedder, PatchEmbed, PooledTextEmbedder, TimestepEmbedder};
