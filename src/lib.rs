//! rfid-moe: compress Mixture-of-Experts checkpoints with RFID-MoE (routing frequency +
//! information density) and run the result with candle.

pub mod chat;
pub mod checkpoint;
pub mod error;
pub mod eval;
pub mod export;
pub mod format;
pub mod generate;
pub mod hub;
pub mod inspect;
pub mod linalg;
pub mod model_card;
pub mod models;
pub mod named;
pub mod pipeline;
pub mod progress;
pub mod quant;
pub mod residual;
pub mod rng;
pub mod safety;
pub mod sweep;
pub mod text;

pub use error::{Error, Result};
pub use pipeline::{compress, compress_with_progress, CompressOptions, Report};
pub use progress::{Progress, Silent};
