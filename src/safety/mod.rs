//! I/O that cannot destroy a user's files: path checks made before anything is written, files of
//! a model confined to its directory, bounded reads, and staging paths that interruptions and dead
//! runs do not leave behind.

pub mod checksum;
pub mod commands;
pub mod finite;
pub mod paths;
pub mod staging;

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

pub use paths::{check_run_paths, confined_file, resolve_path, RunPath};
pub use staging::{install_signal_cleanup, recover_interrupted_replacement, remove_stale_staging};

/// Largest text file read for calibration or evaluation: 2 GiB.
pub const MAX_TEXT_BYTES: u64 = 2 << 30;

/// Largest JSON file (config, index, tokenizer) read from a model directory: 1 GiB.
pub const MAX_JSON_BYTES: u64 = 1 << 30;

/// Reads a regular file of at most `limit` bytes, naming `what` it is in errors; refuses devices,
/// FIFOs and directories (e.g. `/dev/zero`), and files that are or grow larger than `limit`.
pub fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let metadata = file.metadata().map_err(|e| Error::io(path, e))?;
    if !metadata.is_file() {
        return Err(Error::InvalidInput {
            path: path.to_path_buf(),
            message: format!("is not a regular file (expected {what})"),
        });
    }
    let too_large = |size: String| Error::InvalidInput {
        path: path.to_path_buf(),
        message: format!("{size} is larger than the {limit}-byte limit for {what}"),
    };
    if metadata.len() > limit {
        return Err(too_large(format!("{} bytes", metadata.len())));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large("the file (it grew while being read)".into()));
    }
    Ok(bytes)
}

/// Reads a UTF-8 text file with [`read_bounded`], naming the first invalid byte if it is not UTF-8
/// (`what` should say UTF-8, e.g. "UTF-8 text").
pub fn read_text_bounded(path: &Path, limit: u64, what: &str) -> Result<String> {
    let bytes = read_bounded(path, limit, what)?;
    String::from_utf8(bytes).map_err(|e| Error::InvalidInput {
        path: path.to_path_buf(),
        message: format!(
            "invalid UTF-8 at byte {} (expected {what})",
            e.utf8_error().valid_up_to()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn devices_are_refused_without_reading() {
        let error = read_bounded(Path::new("/dev/zero"), 1 << 20, "text")
            .unwrap_err()
            .to_string();
        assert!(error.contains("/dev/zero") && error.contains("not a regular file"));
    }

    #[test]
    fn files_over_the_limit_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("big.txt");
        std::fs::write(&path, vec![b'a'; 101]).unwrap();
        let error = read_bounded(&path, 100, "text").unwrap_err().to_string();
        assert!(error.contains("101 bytes") && error.contains("100-byte limit"));
        assert_eq!(read_bounded(&path, 101, "text").unwrap().len(), 101);
    }

    #[test]
    fn invalid_utf8_names_the_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bad.txt");
        std::fs::write(&path, b"abc\xffdef").unwrap();
        let error = read_text_bounded(&path, 100, "text")
            .unwrap_err()
            .to_string();
        assert!(error.contains("invalid UTF-8 at byte 3"), "{error}");
    }
}
