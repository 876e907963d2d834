//! Reading a settings file (`compress.toml`): this build's schema, or the schema before
//! `version` existed, which [`super::legacy`] converts with its old meaning.

use std::path::Path;

use super::legacy;
use super::options::{CompressOptions, SETTINGS_VERSION};
use crate::error::{Error, Result};

/// A settings file as read: of this build's schema, or of the one before `version` existed.
#[derive(Debug, Clone)]
pub enum SettingsFile {
    /// A file with `version = 2`.
    Current(Box<CompressOptions>),
    /// A file without `version`, to be converted with [`legacy::LegacyOptions::convert`].
    Legacy(Box<legacy::LegacyOptions>),
}

/// Reads a settings file (`compress.toml`), telling the two schemas apart by `version`.
pub fn read_settings_file(path: &Path) -> Result<SettingsFile> {
    let text = crate::safety::read_text_bounded(path, 1 << 20, "a UTF-8 TOML settings file")?;
    let bad = |message: String| Error::Config {
        path: path.to_path_buf(),
        message,
    };
    let value: toml::Value = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    // Without `version`, a file that uses a key only this schema has (`[budget]`, `methods`,
    // `[settings]`) cannot be an old one; any other file keeps its old meaning.
    let current_only = ["budget", "methods", "settings"]
        .iter()
        .any(|key| value.get(key).is_some());
    match value.get("version") {
        None if current_only => toml::from_str::<CompressOptions>(&text)
            .map(|options| SettingsFile::Current(Box::new(options)))
            .map_err(|e| bad(e.to_string())),
        None => toml::from_str::<legacy::LegacyOptions>(&text)
            .map(|legacy| SettingsFile::Legacy(Box::new(legacy)))
            .map_err(|e| bad(format!("(read as a settings file without `version`) {e}"))),
        Some(toml::Value::Integer(2)) => toml::from_str::<CompressOptions>(&text)
            .map(|options| SettingsFile::Current(Box::new(options)))
            .map_err(|e| bad(e.to_string())),
        Some(other) => Err(bad(format!(
            "`version = {other}` is not a settings version this build reads (it writes \
             {SETTINGS_VERSION}; a file without `version` is read with its old meaning)"
        ))),
    }
}
