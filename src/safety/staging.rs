//! Staging paths (a `.NAME.partial` directory guarded by a `.NAME.lock` file, or a `.NAME.tmp-PID`
//! file, next to each output): a registry of the live ones that a SIGINT/SIGTERM handler removes
//! before exiting, removal of the ones dead processes left behind, the lock that keeps two runs
//! out of one staging directory, cooperative interruption of resumable runs (a signal sets a flag
//! that the run checks at safe points), fault injection for tests, and the atomic swap that puts
//! a finished output in place.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// Staging paths of live writers, removed by the signal handler.
static STAGING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Locks the registry; a writer holds it while it moves its staging path into place so that a
/// signal is handled either before the move (staging removed, old output kept) or after it.
pub(crate) fn lock_registry() -> MutexGuard<'static, Vec<PathBuf>> {
    STAGING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Records `path` as a staging path to remove if the process is interrupted.
pub fn register_staging(path: &Path) {
    lock_registry().push(path.to_path_buf());
}

/// Forgets `path` (it was moved into place or removed).
pub fn unregister_staging(path: &Path) {
    lock_registry().retain(|p| p != path);
}

/// Removes every registered staging path (files and directories); used on interruption.
fn remove_registered(registry: &mut Vec<PathBuf>) {
    for path in registry.drain(..) {
        remove_path(&path);
    }
}

/// Removes a file or directory tree, retrying a few times in case a writer was still adding to it.
pub(crate) fn remove_path(path: &Path) {
    for _ in 0..3 {
        let removed = match std::fs::symlink_metadata(path) {
            Err(_) => return,
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
            Ok(_) => std::fs::remove_file(path),
        };
        if removed.is_ok() {
            return;
        }
    }
}

/// The staging directory name of output `name` for process `pid`: `.NAME.partial-PID` (the name
/// older versions used; their leftovers are still removed).
pub fn staging_name(name: &str, pid: u32) -> String {
    format!(".{name}.partial-{pid}")
}

/// The staging directory name of output `name`: `.NAME.partial`, one per output (not per process)
/// so that a later run can resume it; guarded by [`lock_name`].
pub fn resumable_staging_name(name: &str) -> String {
    format!(".{name}.partial")
}

/// The lock file of output `name`'s staging directory: `.NAME.lock`.
pub fn lock_name(name: &str) -> String {
    format!(".{name}.lock")
}

/// An exclusive `flock` on a staging directory's lock file, held while a run writes it. The
/// kernel drops it when the process dies however it dies, so a staging directory whose lock is
/// free belongs to no live run.
#[derive(Debug)]
pub struct StagingLock {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl StagingLock {
    /// Takes the lock at `path` (created if missing) without waiting; `what` names the output in
    /// the error when another process holds it.
    pub fn acquire(path: &Path, what: &Path) -> Result<Self> {
        // The holder unlinks the file when done: a lock taken on an unlinked file is retried.
        for _ in 0..8 {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            if !try_lock_exclusive(&file).map_err(|e| Error::io(path, e))? {
                return Err(Error::InvalidArgument(format!(
                    "another rfid-moe run is writing {} (it holds {}); wait for it to end or stop \
                     it first",
                    what.display(),
                    path.display()
                )));
            }
            if same_file(&file, path) {
                return Ok(Self {
                    path: path.to_path_buf(),
                    file: Some(file),
                });
            }
        }
        Err(Error::InvalidArgument(format!(
            "cannot lock {}: the lock file keeps being replaced",
            path.display()
        )))
    }

    /// Removes the lock file and releases the lock.
    pub fn release(mut self) {
        self.unlink_and_close();
    }

    fn unlink_and_close(&mut self) {
        if let Some(file) = self.file.take() {
            let _ = std::fs::remove_file(&self.path);
            drop(file);
        }
    }
}

impl Drop for StagingLock {
    fn drop(&mut self) {
        self.unlink_and_close();
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another process holds the lock.
#[cfg(unix)]
fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(error),
    }
}

/// No advisory locks here: every lock is granted.
#[cfg(not(unix))]
fn try_lock_exclusive(_file: &std::fs::File) -> std::io::Result<bool> {
    Ok(true)
}

/// Whether the open `file` is still the file at `path` (same device and inode).
#[cfg(unix)]
fn same_file(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether the open `file` is still the file at `path` (assumed where inodes are unknown).
#[cfg(not(unix))]
fn same_file(_file: &std::fs::File, path: &Path) -> bool {
    path.exists()
}

/// Writes `bytes` to `path` durably: a temporary sibling, fsync, rename, fsync of the directory.
/// A kill at any instant leaves either the old file (or none) or the new one, never a torn one.
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = temporary_sibling(path);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_parent(path)
}

/// The temporary name [`write_durable`] and shard writers use next to `path`: `NAME.tmp`.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Flushes a written file's data to the disk.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Flushes the directory holding `path`, so that a rename into it survives a power loss.
pub fn sync_parent(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(parent, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Whether process `pid` is alive: `Some` on Linux (from `/proc`), `None` where unknown.
pub fn process_alive(pid: u32) -> Option<bool> {
    if cfg!(target_os = "linux") {
        Some(Path::new("/proc").join(pid.to_string()).exists())
    } else {
        None
    }
}

/// Removes the staging entries `.NAME.<kind>-PID` in `parent` left by processes that are no
/// longer alive (Linux only; elsewhere nothing is removed). Returns the paths removed.
pub fn remove_stale_staging(parent: &Path, name: &str, kind: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for (path, pid) in entries_of_other_processes(parent, &format!(".{name}.{kind}-")) {
        if process_alive(pid) == Some(false) {
            remove_path(&path);
            removed.push(path);
        }
    }
    removed
}

/// The entries `PREFIX<pid>` of `parent` made by processes other than this one, with their pid.
fn entries_of_other_processes(parent: &Path, prefix: &str) -> Vec<(PathBuf, u32)> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry
                .file_name()
                .to_str()?
                .strip_prefix(prefix)?
                .parse::<u32>()
                .ok()?;
            (pid != std::process::id()).then(|| (entry.path(), pid))
        })
        .collect()
}

/// Swaps two existing paths atomically (Linux `renameat2(RENAME_EXCHANGE)`). `Ok(false)` where
/// the system or filesystem cannot (then the caller falls back to two renames).
#[cfg(target_os = "linux")]
pub fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_path = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| {
            Error::InvalidArgument(format!("path {} contains a NUL byte", p.display()))
        })
    };
    let (ca, cb) = (c_path(a)?, c_path(b)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call; the syscall
    // only reads them.
    let status = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if status == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(Error::io(b, error)),
    }
}

/// Swaps two existing paths atomically; not available on this system.
#[cfg(not(target_os = "linux"))]
pub fn exchange(_a: &Path, _b: &Path) -> Result<bool> {
    Ok(false)
}

/// The backup name of output `name` during a two-rename replacement: `.NAME.old-PID`.
pub fn backup_name(name: &str, pid: u32) -> String {
    format!(".{name}.old-{pid}")
}

/// Repairs an interrupted two-rename replacement of `out` (the fallback where no atomic exchange
/// exists): when `out` is missing and a backup `.NAME.old-PID` of a dead process exists, the backup
/// is moved back; when `out` exists, such backups are removed. Returns the restored backup.
pub fn recover_interrupted_replacement(out: &Path) -> Result<Option<PathBuf>> {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name().and_then(|n| n.to_str()))
    else {
        return Ok(None);
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let mut restored = None;
    for (backup, pid) in entries_of_other_processes(parent, &format!(".{name}.old-")) {
        if process_alive(pid) == Some(true) {
            continue;
        }
        if restored.is_none() && std::fs::symlink_metadata(out).is_err() {
            std::fs::rename(&backup, out).map_err(|e| Error::io(&backup, e))?;
            restored = Some(backup);
        } else if process_alive(pid) == Some(false) {
            remove_path(&backup);
        }
    }
    Ok(restored)
}

/// Runs that stop by themselves at a safe point when interrupted (see [`InterruptScope`]).
static COOPERATIVE_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The signal that asked the cooperative runs to stop (0: none).
static INTERRUPT_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// While alive, a SIGINT/SIGTERM does not end the process: it is recorded for [`interrupted`],
/// which the run checks at its safe points (a second signal ends the process at once).
#[derive(Debug)]
pub struct InterruptScope(());

impl InterruptScope {
    /// Enters cooperative mode (nested scopes count).
    pub fn enter() -> Self {
        COOPERATIVE_RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(())
    }
}

impl Drop for InterruptScope {
    fn drop(&mut self) {
        COOPERATIVE_RUNS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The signal number of a pending interruption of a cooperative run, if any.
pub fn interrupted() -> Option<i32> {
    match INTERRUPT_SIGNAL.load(std::sync::atomic::Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// Asks cooperative runs to stop at their next safe point, as a SIGINT/SIGTERM does (`signal` is
/// the number reported back, e.g. `libc::SIGTERM`); for programs that embed the library.
pub fn request_interrupt(signal: i32) {
    INTERRUPT_SIGNAL.store(signal.max(1), std::sync::atomic::Ordering::SeqCst);
}

/// The environment variable of [`fault_point`]: a comma-separated list of point names at which
/// the process aborts (as a kill would end it), `pause-ms:N` to sleep N ms at every point and
/// `pause-ms:N@POINT` to sleep at one point (a pause ends early when the run is interrupted).
pub const FAULT_INJECT_VAR: &str = "RFID_MOE_FAULT_INJECT";

/// A named point of a run where tests simulate a kill: aborts the process if `RFID_MOE_FAULT_INJECT`
/// lists `point` (e.g. `layer-committed:1`, `shard-write:layer-00002`, `finish:renamed`), or
/// pauses there. Does nothing when the variable is unset, which is every real run.
pub fn fault_point(point: &str) {
    let Some(spec) = std::env::var_os(FAULT_INJECT_VAR) else {
        return;
    };
    let spec = spec.to_string_lossy();
    for entry in spec.split(',').map(str::trim) {
        if let Some(pause) = entry.strip_prefix("pause-ms:") {
            let (ms, at) = match pause.split_once('@') {
                Some((ms, at)) => (ms, Some(at)),
                None => (pause, None),
            };
            if at.is_none_or(|at| at == point) {
                pause_unless_interrupted(ms.parse().unwrap_or(0));
            }
        } else if entry == point {
            std::process::abort();
        }
    }
}

/// Sleeps `ms` milliseconds in short slices, returning early once the run is interrupted.
fn pause_unless_interrupted(ms: u64) {
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    while std::time::Instant::now() < until && interrupted().is_none() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Installs a SIGINT/SIGTERM handler that removes the staging paths of live writers and exits
/// with 130 (SIGINT) or 143 (SIGTERM); while an [`InterruptScope`] is alive the first signal is
/// only recorded for [`interrupted`]. Call once at the start of a command-line program; later
/// calls do nothing. A no-op outside Unix.
pub fn install_signal_cleanup() -> Result<()> {
    #[cfg(unix)]
    {
        static INSTALLED: std::sync::OnceLock<std::result::Result<(), String>> =
            std::sync::OnceLock::new();
        INSTALLED
            .get_or_init(signals::install)
            .clone()
            .map_err(Error::InvalidArgument)
    }
    #[cfg(not(unix))]
    {
        Ok(())
    }
}

#[cfg(unix)]
mod signals {
    //! The handler writes the signal number to a pipe (async-signal-safe); a thread reads it,
    //! removes the registered staging paths and exits.

    use std::sync::atomic::{AtomicI32, Ordering};

    static PIPE_WRITE_END: AtomicI32 = AtomicI32::new(-1);

    extern "C" fn on_signal(signal: libc::c_int) {
        let fd = PIPE_WRITE_END.load(Ordering::Relaxed);
        if fd >= 0 {
            let byte = signal as u8;
            // SAFETY: write(2) is async-signal-safe; the buffer is one valid byte.
            unsafe {
                libc::write(fd, (&byte as *const u8).cast(), 1);
            }
        }
    }

    pub(super) fn install() -> std::result::Result<(), String> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(format!(
                "cannot install the interrupt handler: pipe failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        for fd in fds {
            // SAFETY: fd is a descriptor we just created; FD_CLOEXEC keeps it from children.
            unsafe {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        let read_end = fds[0];
        PIPE_WRITE_END.store(fds[1], Ordering::Relaxed);
        std::thread::Builder::new()
            .name("rfid-moe-signals".into())
            .spawn(move || wait_and_clean(read_end))
            .map_err(|e| format!("cannot start the interrupt handler thread: {e}"))?;
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid; the
            // handler only performs an async-signal-safe write.
            let installed = unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut())
            };
            if installed != 0 {
                return Err(format!(
                    "cannot install the handler for signal {signal}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(())
    }

    fn wait_and_clean(read_end: libc::c_int) {
        let mut byte = 0u8;
        let second = loop {
            // SAFETY: reads at most one byte into `byte`, which lives across the call.
            let n = unsafe { libc::read(read_end, (&mut byte as *mut u8).cast(), 1) };
            if n == 0 {
                return;
            }
            if n != 1 {
                continue;
            }
            // A resumable run stops by itself at its next safe point; a second signal, or one
            // with no such run, ends the process now.
            let cooperative = super::COOPERATIVE_RUNS.load(Ordering::SeqCst) > 0;
            if cooperative && super::interrupted().is_none() {
                super::request_interrupt(byte as i32);
                continue;
            }
            break cooperative;
        };
        // Held until exit, so no writer can move its staging path into place meanwhile.
        let mut registry = super::lock_registry();
        super::remove_registered(&mut registry);
        if second {
            // The run was already stopping at its next safe point; say why it ends sooner.
            eprintln!(
                "interrupted again (signal {byte}): stopping at once; what was finished is kept \
                 for the same command to resume"
            );
        }
        std::process::exit(128 + byte as i32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn exchange_swaps_two_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(a.join("f"), "from a").unwrap();
        std::fs::write(b.join("f"), "from b").unwrap();
        assert!(
            exchange(&a, &b).unwrap(),
            "tmpfs/ext4 support RENAME_EXCHANGE"
        );
        assert_eq!(std::fs::read_to_string(a.join("f")).unwrap(), "from b");
        assert_eq!(std::fs::read_to_string(b.join("f")).unwrap(), "from a");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stale_staging_of_dead_processes_is_removed_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp.path().join(staging_name("out", 999_999_999));
        let live = tmp.path().join(staging_name("out", std::process::id()));
        let other = tmp.path().join(staging_name("other", 999_999_999));
        for dir in [&dead, &live, &other] {
            std::fs::create_dir(dir).unwrap();
        }
        let removed = remove_stale_staging(tmp.path(), "out", "partial");
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists() && live.exists() && other.exists());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn interrupted_two_rename_replacement_is_restored() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let backup = tmp.path().join(backup_name("out", 999_999_999));
        std::fs::create_dir(&backup).unwrap();
        std::fs::write(backup.join("config.json"), "{}").unwrap();
        assert_eq!(
            recover_interrupted_replacement(&out).unwrap(),
            Some(backup.clone())
        );
        assert!(out.join("config.json").exists() && !backup.exists());
    }
}
