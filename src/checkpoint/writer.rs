//! Atomic checkpoint output: everything goes to a temporary sibling directory that is renamed
//! into place only when complete, so a crash never leaves a half-written checkpoint that looks
//! whole. A `--force` replacement swaps the new directory with the old one in one step
//! (`renameat2(RENAME_EXCHANGE)` on Linux), so a kill at any instant leaves one of them in place;
//! staging paths are registered for the interrupt handler and those of dead runs are removed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::INDEX_FILE;
use crate::error::{Error, Result};
use crate::safety::staging::{self, lock_registry};

/// Writes a single safetensors file atomically (temporary file in the same directory, then rename).
pub fn save_safetensors_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    write_via_temporary(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(Error::from)
    })
}

/// Writes bytes to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_via_temporary(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Writes `path` through a registered temporary sibling `.NAME.tmp-PID` renamed into place;
/// temporaries of dead processes are removed first, and a failed write removes its own.
fn write_via_temporary(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::InvalidArgument(format!("invalid output path {}", path.display())))?;
    let parent = parent_dir(path);
    staging::remove_stale_staging(&parent, &name, "tmp");
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    staging::register_staging(&tmp);
    let written = write(&tmp)
        .and_then(|()| readable_like_new_files(&tmp))
        .and_then(|()| {
            let mut registry = lock_registry();
            let renamed = std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e));
            registry.retain(|p| p != &tmp);
            renamed
        });
    if written.is_err() {
        staging::remove_path(&tmp);
        staging::unregister_staging(&tmp);
    }
    written
}

/// Gives `path` the permissions a newly created file gets (`0666` less the umask): the
/// safetensors writer goes through a private `0600` temporary, which would make checkpoints
/// unreadable to anyone but their writer.
fn readable_like_new_files(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = 0o666 & !process_umask();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The process umask, read once (umask can only be read by setting it, so it is set back at
/// once, before any file of ours is created).
#[cfg(unix)]
fn process_umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        // SAFETY: umask only swaps the process's file-creation mask; the old mask is restored
        // immediately.
        unsafe {
            let old = libc::umask(0o022);
            libc::umask(old);
            old as u32
        }
    })
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
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
    /// Starts writing to `out`; refuses an existing `out` unless `force` (which replaces it at the
    /// end). First repairs an interrupted replacement of `out` and removes staging directories of
    /// `out` left by dead processes.
    pub fn create(out: &Path, force: bool) -> Result<Self> {
        let name = out
            .file_name()
            .ok_or_else(|| {
                Error::InvalidArgument(format!("invalid output path {}", out.display()))
            })?
            .to_string_lossy()
            .into_owned();
        let parent = parent_dir(out);
        staging::recover_interrupted_replacement(out)?;
        staging::remove_stale_staging(&parent, &name, "partial");
        if out.exists() && !force {
            return Err(Error::InvalidArgument(format!(
                "output directory {} already exists; pass --force to replace it",
                out.display()
            )));
        }
        check_replaceable(out)?;
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let tmp_dir = parent.join(staging::staging_name(&name, std::process::id()));
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
        }
        staging::register_staging(&tmp_dir);
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
        readable_like_new_files(&path)?;
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

    /// Copies `src` into the checkpoint under its own file name; `src` must resolve inside its own
    /// directory (a symlink out of a model directory is not copied into the output).
    pub fn copy_file(&self, src: &Path) -> Result<()> {
        let name = src.file_name().ok_or_else(|| {
            Error::InvalidArgument(format!("cannot copy {}: no file name", src.display()))
        })?;
        let dir = parent_dir(src);
        crate::safety::confined_file(&dir, &name.to_string_lossy(), &dir, "auxiliary file")?;
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
        self.move_into_place()?;
        self.finished = true;
        Ok(self.final_dir.clone())
    }
}

impl CheckpointWriter {
    /// Puts the staging directory at `final_dir`. An existing output is swapped out atomically and
    /// then deleted; where no atomic swap exists it is renamed to `.NAME.old-PID` first, which
    /// [`staging::recover_interrupted_replacement`] restores if the run dies between the renames.
    fn move_into_place(&self) -> Result<()> {
        let (final_dir, tmp_dir) = (&self.final_dir, &self.tmp_dir);
        let mut registry = lock_registry();
        if std::fs::symlink_metadata(final_dir).is_err() {
            std::fs::rename(tmp_dir, final_dir).map_err(|e| Error::io(final_dir, e))?;
            registry.retain(|p| p != tmp_dir);
            return Ok(());
        }
        if staging::exchange(tmp_dir, final_dir)? {
            // The staging path now holds the old output; it stays registered until removed.
            drop(registry);
            staging::remove_path(tmp_dir);
            staging::unregister_staging(tmp_dir);
            return Ok(());
        }
        let name = final_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let backup = parent_dir(final_dir).join(staging::backup_name(&name, std::process::id()));
        std::fs::rename(final_dir, &backup).map_err(|e| Error::io(final_dir, e))?;
        if let Err(e) = std::fs::rename(tmp_dir, final_dir) {
            let _ = std::fs::rename(&backup, final_dir);
            return Err(Error::io(final_dir, e));
        }
        registry.retain(|p| p != tmp_dir);
        drop(registry);
        staging::remove_path(&backup);
        Ok(())
    }
}

/// `--force` replaces only what a run could have written: nothing, an empty directory or a model
/// directory (one with `config.json`). Anything else is someone's files, refused by name.
fn check_replaceable(out: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "output {} exists and is not a directory; refusing to replace it (expected a model \
             directory or a new path)",
            out.display()
        )));
    }
    let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    if entries.next().is_none() || out.join(super::CONFIG_FILE).is_file() {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "output directory {} exists and is not a model directory (no {}); refusing to replace it \
         even with --force: choose a new path or empty it yourself",
        out.display(),
        super::CONFIG_FILE
    )))
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.finished {
            staging::remove_path(&self.tmp_dir);
            staging::unregister_staging(&self.tmp_dir);
        }
    }
}
