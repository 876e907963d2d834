//! The Hugging Face cache layout, shared with Python's `huggingface_hub`:
//! `CACHE/models--org--name/{blobs/ETAG, snapshots/COMMIT/FILE -> ../../blobs/ETAG, refs/REVISION}`.

use std::path::{Component, Path, PathBuf};

use super::is_commit_hash;
use crate::error::{Error, Result};

/// One repository's directory in the cache.
#[derive(Debug, Clone)]
pub struct CacheRepo {
    /// `CACHE/models--org--name`.
    pub dir: PathBuf,
}

impl CacheRepo {
    /// The cache directory of model repository `id` (`org/name`) under `cache_dir`.
    pub fn new(cache_dir: &Path, id: &str) -> Self {
        Self {
            dir: cache_dir.join(format!("models--{}", id.replace('/', "--"))),
        }
    }

    /// The snapshot directory of `commit`.
    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// The file recording which commit `revision` (a branch or tag) pointed to.
    fn ref_file(&self, revision: &str) -> PathBuf {
        self.dir.join("refs").join(revision)
    }

    /// The commit `revision` names in the cache: itself for a commit hash, else what its ref
    /// file records (`None` if it has none).
    pub fn commit_of(&self, revision: &str) -> Result<Option<String>> {
        if is_commit_hash(revision) {
            return Ok(Some(revision.to_string()));
        }
        let path = self.ref_file(revision);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let commit = text.trim();
                if is_commit_hash(commit) {
                    Ok(Some(commit.to_string()))
                } else {
                    Err(Error::HubCache {
                        path,
                        message: format!("expected a 40-digit commit hash, found `{commit}`"),
                    })
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Records that `revision` points to `commit` (nothing for a commit hash itself).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.ref_file(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        crate::checkpoint::writer::write_atomic(&path, commit.as_bytes())
    }

    /// The blob holding the content whose ETag is `etag`.
    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    /// Links `snapshots/COMMIT/FILE` to the blob `etag` with a relative symlink, as Python does
    /// (replacing an existing link atomically).
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.snapshot(commit).join(file);
        let parent = pointer.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        // snapshots/COMMIT/a/b → ../../../blobs/ETAG: one `..` per directory below the repo.
        let depth = 2 + Path::new(file).components().count() - 1;
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        let staging = parent.join(format!(
            ".{}.link-{}",
            pointer
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("file"),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&staging);
        make_symlink(&target, &staging)?;
        std::fs::rename(&staging, &pointer).map_err(|e| Error::io(&pointer, e))?;
        Ok(pointer)
    }
}

#[cfg(unix)]
fn make_symlink(target: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link).map_err(|e| Error::io(link, e))
}

#[cfg(not(unix))]
fn make_symlink(target: &Path, link: &Path) -> Result<()> {
    // Without symlinks the blob is copied, as huggingface_hub does on such systems.
    let blob = link.parent().unwrap_or(Path::new(".")).join(target);
    std::fs::copy(&blob, link)
        .map(|_| ())
        .map_err(|e| Error::io(link, e))
}

/// The Hub id (`org/name`) of a cache snapshot directory
/// (`…/models--org--name/snapshots/COMMIT`), if `dir` is one.
pub fn repo_id_of_snapshot(dir: &Path) -> Option<String> {
    let mut components = dir.components().rev().filter(|c| *c != Component::CurDir);
    let _commit = components.next()?;
    let snapshots = components.next()?;
    let repo = components.next()?;
    if snapshots.as_os_str() != "snapshots" {
        return None;
    }
    let folder = repo.as_os_str().to_str()?.strip_prefix("models--")?;
    let (org, name) = folder.split_once("--")?;
    let id = format!("{org}/{name}");
    super::RepoRef::parse(&id).map(|r| r.id)
}

/// Whether `name` is safe as a file name in the blob store (an ETag).
#[cfg(any(feature = "hub", test))]
pub(super) fn is_safe_etag(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_huggingface_hub() {
        let repo = CacheRepo::new(Path::new("/c"), "org/name");
        assert_eq!(repo.dir, Path::new("/c/models--org--name"));
        assert_eq!(
            repo.blob("abc"),
            Path::new("/c/models--org--name/blobs/abc")
        );
        assert_eq!(
            repo.snapshot("deadbeef"),
            Path::new("/c/models--org--name/snapshots/deadbeef")
        );
    }

    #[test]
    fn snapshot_links_resolve_to_their_blob_and_refs_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = CacheRepo::new(tmp.path(), "o/n");
        let commit = "a".repeat(40);
        std::fs::create_dir_all(repo.dir.join("blobs")).unwrap();
        std::fs::write(repo.blob("e1"), b"top").unwrap();
        std::fs::write(repo.blob("e2"), b"nested").unwrap();
        let top = repo.link(&commit, "config.json", "e1").unwrap();
        let nested = repo.link(&commit, "sub/dir/x.json", "e2").unwrap();
        assert_eq!(std::fs::read(top).unwrap(), b"top");
        assert_eq!(std::fs::read(nested).unwrap(), b"nested");
        assert_eq!(repo.commit_of("main").unwrap(), None);
        repo.write_ref("main", &commit).unwrap();
        assert_eq!(repo.commit_of("main").unwrap(), Some(commit.clone()));
        assert_eq!(repo.commit_of(&commit).unwrap(), Some(commit.clone()));
        assert_eq!(
            repo_id_of_snapshot(&repo.snapshot(&commit)).as_deref(),
            Some("o/n")
        );
        assert_eq!(repo_id_of_snapshot(tmp.path()), None);
    }

    #[test]
    fn etags_that_are_not_plain_names_are_refused() {
        assert!(is_safe_etag(
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        ));
        for bad in ["", ".", "..", "a/b", "../x", "a b"] {
            assert!(!is_safe_etag(bad), "{bad}");
        }
    }
}
