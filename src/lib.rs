//! rfid-moe: compress Mixture-of-Experts checkpoints with RFID-MoE (routing frequency +
//! information density) and run the result with candle.

pub mod checkpoint;
pub mod error;
pub mod format;
pub mod inspect;
pub mod models;
pub mod residual;

pub use error::{Error, Result};
