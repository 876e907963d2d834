//! rfid-moe: compress Mixture-of-Experts checkpoints with RFID-MoE (routing frequency +
//! information density) and run the result with candle.

pub mod allocation;
pub mod analysis;
pub mod calibration;
pub mod checkpoint;
pub mod compress;
pub mod error;
pub mod eval;
pub mod factorize;
pub mod format;
pub mod inspect;
pub mod linalg;
pub mod models;
pub mod plot;
pub mod residual;
pub mod sweep;
pub mod text;

pub use compress::{compress, CompressOptions, Report};
pub use error::{Error, Result};
