//! One module per command: its flags and what it runs.

pub mod compress;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod plot;
pub mod sweep;
pub mod upload;

use std::path::Path;

use anyhow::Result;
use rfid_moe::checkpoint::writer;

/// Writes `value` as pretty JSON to `path`, atomically.
fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    writer::write_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())?;
    Ok(())
}
