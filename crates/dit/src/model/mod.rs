//! The DiT network (Peebles & Xie 2022), module by module as in the reference `models.py`.

pub mod block;
pub mod dit;
pub mod embed;
pub mod pack;

pub use block::{DiTBlock, FinalLayer, TextTokens};
pub use dit::{DiT, GuidedChannels, PackedConditions, SecondText, TextBatch};
pub use embed::{LabelEmbedder, PatchEmbed, PooledTextEmbedder, TimestepEmbedder};
pub use pack::{Packing, Segment};
