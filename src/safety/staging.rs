//! Staging paths (a `.NAME.partial-PID` directory or `.NAME.tmp-PID` file next to each output):
//! a registry of the live ones that a SIGINT/SIGTERM handler removes before exiting, removal of
//! the ones dead processes left behind, and the atomic swap that puts a finished output in place.

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

/// The staging directory name of output `name` for process `pid`: `.NAME.partial-PID`.
pub fn staging_name(name: &str, pid: u32) -> String {
    format!(".{name}.partial-{pid}")
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

/// Installs a SIGINT/SIGTERM handler that removes the staging paths of live writers and exits
/// with 130 (SIGINT) or 143 (SIGTERM). Call once at the start of a command-line program; later
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
        loop {
            // SAFETY: reads at most one byte into `byte`, which lives across the call.
            let n = unsafe { libc::read(read_end, (&mut byte as *mut u8).cast(), 1) };
            if n == 1 {
                break;
            }
            if n == 0 {
                return;
            }
        }
        // Held until exit, so no writer can move its staging path into place meanwhile.
        let mut registry = super::lock_registry();
        super::remove_registered(&mut registry);
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
