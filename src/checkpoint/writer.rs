//! Atomic checkpoint output: everything goes to a temporary sibling directory that is renamed
//! into place only when complete, so a crash never leaves a half-written checkpoint that looks
//! whole.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::INDEX_FILE;
use crate::error::{Error, Result};

/// Writes a single safetensors file atomically (temporary file in the same directory, then rename).
pub fn save_safetensors_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = temporary_sibling(path);
    candle_core::safetensors::save(tensors, &tmp).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes bytes to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_sibling(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Streams a checkpoint directory shard by shard into a temporary directory and moves it into
/// place on [`CheckpointWriter::finish`]; dropped unfinished, it deletes what it wrote.
#[derive(Debug)]
pub struct CheckpointWriter {
    final_dir: PathBuf,
    tmp_dir: PathBuf,
    shard_files: Vec<(String, Vec<String>)>,
    total_bytes: u64,
    finished: bool,
}

impl CheckpointWriter {
    /// Starts writing to `out`; refuses an existing `out` unless `force` (which replaces it at the end).
    pub fn create(out: &Path, force: bool) -> Result<Self> {
        if out.exists() && !force {
            return Err(Error::InvalidArgument(format!(
                "output directory {} already exists; pass --force to replace it",
                out.display()
            )));
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = out
            .file_name()
            .ok_or_else(|| {
                Error::InvalidArgument(format!("invalid output path {}", out.display()))
            })?
            .to_string_lossy()
            .into_owned();
        let tmp_dir = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
        }
        std::fs::create_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
        Ok(Self {
            final_dir: out.to_path_buf(),
            tmp_dir,
            shard_files: Vec::new(),
            total_bytes: 0,
            finished: false,
        })
    }

    /// The temporary directory being written.
    pub fn staging_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// Writes one shard holding `tensors` (names kept as given).
    pub fn write_shard(&mut self, tensors: HashMap<String, Tensor>) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let file = format!("shard-{:05}.safetensors", self.shard_files.len() + 1);
        let path = self.tmp_dir.join(&file);
        self.total_bytes += tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum::<u64>();
        candle_core::safetensors::save(&tensors, &path)?;
        let mut names: Vec<String> = tensors.into_keys().collect();
        names.sort();
        self.shard_files.push((file, names));
        Ok(())
    }

    /// Writes an auxiliary file (config, report, ...) into the checkpoint.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.tmp_dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))
    }

    /// Copies `src` into the checkpoint under its own file name.
    pub fn copy_file(&self, src: &Path) -> Result<()> {
        let name = src.file_name().ok_or_else(|| {
            Error::InvalidArgument(format!("cannot copy {}: no file name", src.display()))
        })?;
        let dst = self.tmp_dir.join(name);
        std::fs::copy(src, &dst).map_err(|e| Error::io(src, e))?;
        Ok(())
    }

    /// Names shards `model-XXXXX-of-NNNNN.safetensors`, writes the index and moves the directory into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        let count = self.shard_files.len();
        let mut weight_map = BTreeMap::new();
        for (k, (file, names)) in self.shard_files.iter().enumerate() {
            let final_name = if count == 1 {
                super::SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, count)
            };
            let from = self.tmp_dir.join(file);
            let to = self.tmp_dir.join(&final_name);
            std::fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
            for name in names {
                weight_map.insert(name.clone(), final_name.clone());
            }
        }
        if count > 1 {
            let index = serde_json::json!({
                "metadata": { "total_size": self.total_bytes },
                "weight_map": weight_map,
            });
            let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Json {
                path: self.tmp_dir.join(INDEX_FILE),
                message: e.to_string(),
            })?;
            self.write_file(INDEX_FILE, text.as_bytes())?;
        }
        if self.final_dir.exists() {
            // --force: move the old output aside first so that a failure never loses both.
            let backup = self.tmp_dir.with_extension("old");
            std::fs::rename(&self.final_dir, &backup).map_err(|e| Error::io(&self.final_dir, e))?;
            std::fs::rename(&self.tmp_dir, &self.final_dir)
                .map_err(|e| Error::io(&self.final_dir, e))?;
            std::fs::remove_dir_all(&backup).map_err(|e| Error::io(&backup, e))?;
        } else {
            std::fs::rename(&self.tmp_dir, &self.final_dir)
                .map_err(|e| Error::io(&self.final_dir, e))?;
        }
        self.finished = true;
        Ok(self.final_dir.clone())
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.tmp_dir);
        }
    }
}
