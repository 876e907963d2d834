//! Decode-speed benchmark of rfid-moe's runtime (issue 13): random checkpoints with
//! Qwen3-30B-A3B's layer shapes, original and compressed, timed against candle-transformers'
//! own `qwen3_moe` on the same weights. The `decode` binary drives it.

pub mod compressed;
pub mod measure;
pub mod report;
pub mod synthetic;
