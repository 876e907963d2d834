//! Atomic checkpoint output: everything goes to a staging sibling directory (`.NAME.partial`,
//! locked by `.NAME.lock`) that is renamed into place only when complete, so a crash never leaves
//! a half-written checkpoint that looks whole; a resumable writer keeps its staging directory
//! across kills so that a later run can adopt the shards already written. A `--force` replacement swaps the new directory with the old one in one step
//! (`renameat2(RENAME_EXCHANGE)` on Linux), so a kill at any instant leaves one of them in place;
//! staging paths are registered for the interrupt handler and those of dead runs are removed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::INDEX_FILE;
use crate::error::{Error, Result};
use crate::safety::staging::{self, lock_registry};

/// Writes a single safetensors file atomically (temporary file in the same directory, then
/// rename); a float tensor holding NaN or ±Inf is refused by name and nothing is written.
pub fn save_safetensors_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    check_finite_tensors(tensors, path)?;
    write_via_temporary(path, |tmp| save_with_int8(tensors, &HashSet::new(), tmp))
}

/// Refuses to write a float tensor holding NaN or ±Inf: the error names the tensor and the file
/// it was meant for.
fn check_finite_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        crate::safety::finite::check_tensor(&tensors[name], || {
            format!("tensor `{name}` to be written to {}", path.display())
        })?;
    }
    Ok(())
}

/// A tensor as the safetensors writer sees it: its own dtype, or `I8` for int8 codes held in a
/// `U8` tensor.
struct ShardTensor<'a> {
    tensor: &'a Tensor,
    int8: bool,
}

impl safetensors::View for ShardTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self.int8 {
            true => safetensors::Dtype::I8,
            false => self.tensor.dtype().into(),
        }
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        safetensors::View::data(&self.tensor)
    }

    fn data_len(&self) -> usize {
        safetensors::View::data_len(&self.tensor)
    }
}

/// Saves `tensors` as one safetensors file at `path`, the `U8` tensors named in `int8` as `I8`
/// (the same bytes as candle's writer otherwise); errors name `path`.
fn save_with_int8(
    tensors: &HashMap<String, Tensor>,
    int8: &HashSet<String>,
    path: &Path,
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let is_int8 = int8.contains(name);
        if is_int8 && tensor.dtype() != candle_core::DType::U8 {
            return Err(Error::InvalidArgument(format!(
                "int8 tensor `{name}` for {} holds {:?} (expected its codes as U8 bytes)",
                path.display(),
                tensor.dtype()
            )));
        }
        views.push((
            name.as_str(),
            ShardTensor {
                tensor,
                int8: is_int8,
            },
        ));
    }
    safetensors::serialize_to_file(views, None, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => Error::io(path, source),
        other => Error::Safetensors {
            path: path.to_path_buf(),
            message: format!("writing the shard: {other}"),
        },
    })
}

/// Writes bytes to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_via_temporary(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Writes `path` through a registered private directory `.NAME.tmp-PID` next to it: the file is
/// written inside it (with any temporary the writer makes of its own) and renamed into place, and
/// the directory removed. A signal removes the directory, the next writer of `path` removes those
/// of dead processes, and a failed write removes its own, so no temporary outlives its run.
fn write_via_temporary(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::InvalidArgument(format!("invalid output path {}", path.display())))?;
    let parent = parent_dir(path);
    staging::remove_stale_staging(&parent, &name, "tmp");
    let tmp_dir = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    staging::register_staging(&tmp_dir);
    staging::remove_path(&tmp_dir);
    let tmp = tmp_dir.join(&name);
    let written = std::fs::create_dir(&tmp_dir)
        .map_err(|e| Error::io(&tmp_dir, e))
        .and_then(|()| write(&tmp))
        .and_then(|()| readable_like_new_files(&tmp))
        .and_then(|()| {
            staging::fault_point(&format!("tmp-written:{name}"));
            let _registry = lock_registry();
            std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
        });
    staging::remove_path(&tmp_dir);
    staging::unregister_staging(&tmp_dir);
    // The temporary is ours; the path the caller asked for is what the user knows.
    written.map_err(|error| match error {
        Error::Io { path: at, source } if at.starts_with(&tmp_dir) => Error::io(path, source),
        other => other,
    })
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

/// The subdirectory of a staging directory that belongs to the caller (a resume journal): kept
/// across resumes, ignored by [`CheckpointWriter::retain_adopted`], removed just before the
/// directory is moved into place.
pub const JOURNAL_DIR: &str = ".resume";

/// A shard written into a staging directory: its file name there, its tensor names (sorted), the
/// bytes of its tensor data, and the size and checksum of the file as written (what a resumed run
/// checks before adopting it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardEntry {
    /// File name inside the staging directory.
    pub file: String,
    /// Tensor names, sorted.
    pub names: Vec<String>,
    /// Bytes of tensor data (for the index's `total_size`).
    pub bytes: u64,
    /// Size of the file in bytes.
    pub file_bytes: u64,
    /// Checksum of the file ([`crate::safety::checksum::file_checksum`]).
    pub checksum: String,
}

/// What to do with the staging directory an earlier, dead run left for the same output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagingMode {
    /// Remove it and start empty; the staging directory is removed again on interruption.
    Fresh,
    /// Keep it for the caller to resume from; it also survives interruption and kills.
    Resume,
    /// Remove it and start empty, but survive interruption and kills as [`Self::Resume`] does.
    Restart,
}

/// Streams a checkpoint directory shard by shard into a staging directory `.NAME.partial` (locked
/// by `.NAME.lock`) and moves it into place on [`CheckpointWriter::finish`]; dropped unfinished,
/// a fresh writer deletes what it wrote and a resumable one keeps it.
#[derive(Debug)]
pub struct CheckpointWriter {
    final_dir: PathBuf,
    tmp_dir: PathBuf,
    shard_files: Vec<(String, Vec<String>)>,
    total_bytes: u64,
    finished: bool,
    mode: StagingMode,
    reused: bool,
    lock: Option<staging::StagingLock>,
}

impl CheckpointWriter {
    /// Starts writing to `out`; refuses an existing `out` unless `force` (which replaces it at the
    /// end). First repairs an interrupted replacement of `out` and removes staging directories of
    /// `out` left by dead processes.
    pub fn create(out: &Path, force: bool) -> Result<Self> {
        Self::open(out, force, StagingMode::Fresh)
    }

    /// Starts writing to `out` as [`CheckpointWriter::create`] does; with [`StagingMode::Resume`]
    /// the staging directory of a dead run of the same output is kept ([`Self::reused`]) for the
    /// caller to adopt its shards, and it is not removed on interruption.
    pub fn open(out: &Path, force: bool, mode: StagingMode) -> Result<Self> {
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
        let lock = staging::StagingLock::acquire(&parent.join(staging::lock_name(&name)), out)?;
        let tmp_dir = parent.join(staging::resumable_staging_name(&name));
        let reused = mode == StagingMode::Resume && tmp_dir.is_dir();
        if !reused && std::fs::symlink_metadata(&tmp_dir).is_ok() {
            staging::remove_path(&tmp_dir);
        }
        if mode == StagingMode::Fresh {
            staging::register_staging(&tmp_dir);
        }
        std::fs::create_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
        Ok(Self {
            final_dir: out.to_path_buf(),
            tmp_dir,
            shard_files: Vec::new(),
            total_bytes: 0,
            finished: false,
            mode,
            reused,
            lock: Some(lock),
        })
    }

    /// The temporary directory being written.
    pub fn staging_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// The caller's journal directory inside the staging directory ([`JOURNAL_DIR`]).
    pub fn journal_dir(&self) -> PathBuf {
        self.tmp_dir.join(JOURNAL_DIR)
    }

    /// Whether the staging directory was left by an earlier run (resumable mode only).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Writes one shard holding `tensors` (names kept as given).
    pub fn write_shard(&mut self, tensors: HashMap<String, Tensor>) -> Result<()> {
        let file = format!("shard-{:05}.safetensors", self.shard_files.len() + 1);
        self.write_shard_as(&file, tensors).map(|_| ())
    }

    /// Writes one shard holding `tensors` under `file` in the staging directory, durably (a
    /// temporary file, fsync, rename), and returns its entry; `None` when `tensors` is empty.
    pub fn write_shard_as(
        &mut self,
        file: &str,
        tensors: HashMap<String, Tensor>,
    ) -> Result<Option<ShardEntry>> {
        self.write_shard_with_int8(file, tensors, &HashSet::new())
    }

    /// [`Self::write_shard_as`], storing the `U8` tensors named in `int8` as `I8` (int8 codes,
    /// see [`super::int8`]; candle has no int8 dtype).
    pub fn write_shard_with_int8(
        &mut self,
        file: &str,
        tensors: HashMap<String, Tensor>,
        int8: &HashSet<String>,
    ) -> Result<Option<ShardEntry>> {
        if tensors.is_empty() {
            return Ok(None);
        }
        let path = self.tmp_dir.join(file);
        check_finite_tensors(&tensors, &path)?;
        let tmp = staging::temporary_sibling(&path);
        let bytes = tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum::<u64>();
        save_with_int8(&tensors, int8, &tmp)?;
        readable_like_new_files(&tmp)?;
        staging::sync_file(&tmp)?;
        let (file_bytes, checksum) = crate::safety::checksum::file_checksum(&tmp)?;
        staging::fault_point(&format!(
            "shard-write:{}",
            file.trim_end_matches(".safetensors")
        ));
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        let mut names: Vec<String> = tensors.into_keys().collect();
        names.sort();
        let entry = ShardEntry {
            file: file.to_string(),
            names,
            bytes,
            file_bytes,
            checksum,
        };
        self.adopt_shard(&entry);
        Ok(Some(entry))
    }

    /// Checks that the staging directory holds the shard `entry` describes, as it was written:
    /// the file (under its step name, or under the final name of shard `k` of `count` that an
    /// interrupted finish gave it, which is renamed back), its size, its checksum and the tensor
    /// names of its header. `Err` says what differs.
    pub fn check_staged_shard(
        &self,
        entry: &ShardEntry,
        k: usize,
        count: usize,
    ) -> std::result::Result<(), String> {
        let path = self.tmp_dir.join(&entry.file);
        let renamed = self.tmp_dir.join(final_shard_name(k, count));
        if !path.is_file() && renamed.is_file() {
            std::fs::rename(&renamed, &path)
                .map_err(|e| format!("cannot rename {} back: {e}", renamed.display()))?;
        }
        let meta = std::fs::metadata(&path)
            .map_err(|e| format!("its shard {} cannot be read ({e})", entry.file))?;
        if meta.len() != entry.file_bytes {
            return Err(format!(
                "its shard {} is {} bytes, but {} were written (truncated or replaced)",
                entry.file,
                meta.len(),
                entry.file_bytes
            ));
        }
        let (_, checksum) = crate::safety::checksum::file_checksum(&path)
            .map_err(|e| format!("its shard {} cannot be read ({e})", entry.file))?;
        if checksum != entry.checksum {
            return Err(format!(
                "its shard {} does not hold the bytes that were written (checksum {checksum}, \
                 expected {})",
                entry.file, entry.checksum
            ));
        }
        let names = shard_tensor_names(&path).map_err(|e| e.to_string())?;
        if names != entry.names {
            return Err(format!(
                "its shard {} holds {} tensors but its journal entry lists {} (first difference: \
                 {})",
                entry.file,
                names.len(),
                entry.names.len(),
                first_difference(&names, &entry.names)
            ));
        }
        Ok(())
    }

    /// Counts a shard an earlier run wrote into this staging directory as written by this one.
    pub fn adopt_shard(&mut self, entry: &ShardEntry) {
        self.total_bytes += entry.bytes;
        self.shard_files
            .push((entry.file.clone(), entry.names.clone()));
    }

    /// Removes everything in the staging directory except the shards written or adopted so far
    /// and the journal: files of steps that an earlier run did not finish.
    pub fn retain_adopted(&self) -> Result<()> {
        let entries = std::fs::read_dir(&self.tmp_dir).map_err(|e| Error::io(&self.tmp_dir, e))?;
        // An interrupted finish may have given the shards their final names already.
        let count = self.shard_files.len();
        let final_names: Vec<String> = (0..count).map(|k| final_shard_name(k, count)).collect();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let kept = name == JOURNAL_DIR
                || final_names.contains(&name)
                || self.shard_files.iter().any(|(f, _)| *f == name);
            if !kept {
                staging::remove_path(&entry.path());
            }
        }
        Ok(())
    }

    /// Writes an auxiliary file (config, report, ...) into the checkpoint, flushed to disk.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.tmp_dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        staging::sync_file(&path)
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
        staging::sync_file(&dst)
    }

    /// Names shards `model-XXXXX-of-NNNNN.safetensors` (a rename already done by an interrupted
    /// finish is accepted), writes the index, removes the journal and moves the directory into
    /// place.
    pub fn finish(self) -> Result<PathBuf> {
        self.finish_with(|_| Ok(()))
    }

    /// [`Self::finish`], with `convert` rewriting the complete staged checkpoint in its
    /// directory (into another file format) before the journal is removed and the directory
    /// moved into place; a failure or a kill inside it leaves the run resumable.
    pub fn finish_with(mut self, convert: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let count = self.shard_files.len();
        let mut weight_map = BTreeMap::new();
        for (k, (file, names)) in self.shard_files.iter().enumerate() {
            let final_name = final_shard_name(k, count);
            let from = self.tmp_dir.join(file);
            let to = self.tmp_dir.join(&final_name);
            if from.exists() || !to.exists() {
                std::fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
            }
            for name in names {
                weight_map.insert(name.clone(), final_name.clone());
            }
        }
        staging::fault_point("finish:renamed");
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
        staging::fault_point("finish:written");
        convert(&self.tmp_dir)?;
        staging::remove_path(&self.journal_dir());
        staging::sync_parent(&self.tmp_dir.join(INDEX_FILE))?;
        self.move_into_place()?;
        self.finished = true;
        if let Some(lock) = self.lock.take() {
            lock.release();
        }
        Ok(self.final_dir.clone())
    }

    /// Removes the staging directory and what it holds, resumable or not (nothing worth resuming).
    pub fn discard(mut self) {
        self.mode = StagingMode::Fresh;
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

/// The sorted tensor names in the header of the safetensors file at `path`.
fn shard_tensor_names(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is only read, and only while this function runs.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let header = super::header::parse(path, &map)?;
    Ok(header.tensors.into_keys().collect())
}

/// The first name that is in one sorted list and not the other, quoted, saying which.
fn first_difference(found: &[String], listed: &[String]) -> String {
    let extra = found.iter().find(|n| listed.binary_search(n).is_err());
    let missing = listed.iter().find(|n| found.binary_search(n).is_err());
    match (extra, missing) {
        (Some(name), _) => format!("`{name}` is not in the entry"),
        (None, Some(name)) => format!("`{name}` is not in the shard"),
        (None, None) => "the order".to_string(),
    }
}

/// The name of shard `k` of `count` in a finished checkpoint.
fn final_shard_name(k: usize, count: usize) -> String {
    if count == 1 {
        super::SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, count)
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
        if !self.finished && self.mode == StagingMode::Fresh {
            staging::remove_path(&self.tmp_dir);
            staging::unregister_staging(&self.tmp_dir);
        }
        // The lock goes last, so no other run can take the staging directory before this one
        // is done with it.
        self.lock.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn one_shard(dir: &Path) -> (CheckpointWriter, ShardEntry) {
        let mut writer =
            CheckpointWriter::open(&dir.join("out"), false, StagingMode::Resume).unwrap();
        let tensors = HashMap::from([
            (
                "a".to_string(),
                Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            ),
        ]);
        let entry = writer
            .write_shard_as("layer-00000.safetensors", tensors)
            .unwrap()
            .unwrap();
        (writer, entry)
    }

    #[test]
    fn a_staged_shard_is_checked_against_its_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let (writer, entry) = one_shard(tmp.path());
        assert_eq!(writer.check_staged_shard(&entry, 0, 1), Ok(()));
        let mut fewer = entry.clone();
        fewer.names.remove(0);
        let problem = writer.check_staged_shard(&fewer, 0, 1).unwrap_err();
        assert!(problem.contains("`a` is not in the entry"), "{problem}");
        let mut other = entry.clone();
        other.checksum = "0000000000000000".into();
        let problem = writer.check_staged_shard(&other, 0, 1).unwrap_err();
        assert!(problem.contains("does not hold the bytes"), "{problem}");
        std::fs::remove_file(writer.staging_dir().join(&entry.file)).unwrap();
        let problem = writer.check_staged_shard(&entry, 0, 1).unwrap_err();
        assert!(problem.contains("cannot be read"), "{problem}");
    }

    #[test]
    fn a_failed_write_names_the_output_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("report.json");
        let full = || std::io::Error::from_raw_os_error(libc::ENOSPC);
        let message = write_via_temporary(&out, |at| Err(Error::io(at, full())))
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with(&format!("{}: ", out.display()))
                && message.contains("No space left on device"),
            "{message}"
        );
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn non_finite_tensors_are_never_written() {
        let tmp = tempfile::tempdir().unwrap();
        let mut writer =
            CheckpointWriter::open(&tmp.path().join("out"), false, StagingMode::Fresh).unwrap();
        let tensors = HashMap::from([(
            "model.layers.0.mlp.experts.0.gate_proj.lowrank_a".to_string(),
            Tensor::new(&[1.0f32, f32::NAN], &Device::Cpu).unwrap(),
        )]);
        let message = writer
            .write_shard_as("layer-00000.safetensors", tensors.clone())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("`model.layers.0.mlp.experts.0.gate_proj.lowrank_a`")
                && message.contains("NaN at element 1"),
            "{message}"
        );
        assert!(!writer
            .staging_dir()
            .join("layer-00000.safetensors")
            .exists());
        let file = tmp.path().join("logits.safetensors");
        assert!(save_safetensors_atomic(&file, &tensors).is_err());
        let leftovers: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains("logits") || name.starts_with(".tmp"))
            .collect();
        assert_eq!(leftovers, Vec::<String>::new());
    }
}
