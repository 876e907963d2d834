//! Checks on the paths a run reads and writes, made before anything is written: no output may
//! equal, contain or sit inside an input or another output, and files named by a model directory
//! (index entries, auxiliary files) must stay inside it.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// A path the run reads or writes, with the name the user gave it (a flag such as `--model`).
#[derive(Debug, Clone, Copy)]
pub struct RunPath<'a> {
    /// How the path is named in errors, e.g. `--out`.
    pub role: &'a str,
    /// The path as given.
    pub path: &'a Path,
}

impl<'a> RunPath<'a> {
    /// A path named `role`.
    pub fn new(role: &'a str, path: &'a Path) -> Self {
        Self { role, path }
    }

    /// A path named `role` if given (for optional outputs such as `--json`).
    pub fn optional(role: &'a str, path: Option<&'a Path>) -> Option<Self> {
        path.map(|path| Self { role, path })
    }

    /// A path named `role` unless it is empty (an input the run does not read, such as the
    /// calibration data of a plain conversion).
    pub fn unless_empty(role: &'a str, path: &'a Path) -> Option<Self> {
        Self::optional(role, (!path.as_os_str().is_empty()).then_some(path))
    }
}

/// Refuses a run in which an output equals, contains or sits inside an input, or two outputs
/// overlap, comparing both the lexically normalised absolute paths and the symlink-resolved ones
/// (and, for existing files, their identity, so hard links count as the same file).
pub fn check_run_paths(inputs: &[RunPath], outputs: &[RunPath]) -> Result<()> {
    let resolve_all = |paths: &[RunPath]| -> Result<Vec<ResolvedPath>> {
        paths.iter().map(|p| ResolvedPath::new(p.path)).collect()
    };
    let resolved_inputs = resolve_all(inputs)?;
    let resolved_outputs = resolve_all(outputs)?;
    for (output, resolved_output) in outputs.iter().zip(&resolved_outputs) {
        for (input, resolved_input) in inputs.iter().zip(&resolved_inputs) {
            if let Some(relation) = resolved_output.relation_to(resolved_input) {
                return Err(Error::PathConflict(format!(
                    "{} {} {relation} the input {} {}: writing there would overwrite the input \
                     (an output may not equal, contain or sit inside a path the run reads; \
                     choose another output path)",
                    output.role,
                    output.path.display(),
                    input.role,
                    input.path.display()
                )));
            }
        }
    }
    for (i, (first, resolved_first)) in outputs.iter().zip(&resolved_outputs).enumerate() {
        for (second, resolved_second) in outputs.iter().zip(&resolved_outputs).skip(i + 1) {
            if let Some(relation) = resolved_first.relation_to(resolved_second) {
                return Err(Error::PathConflict(format!(
                    "{} {} {relation} the output {} {}: two outputs of one run may not overlap \
                     (expected separate paths)",
                    first.role,
                    first.path.display(),
                    second.role,
                    second.path.display()
                )));
            }
        }
    }
    Ok(())
}

/// One path in the forms [`check_run_paths`] compares.
#[derive(Debug)]
struct ResolvedPath {
    /// Absolute, with `.` and `..` removed lexically.
    lexical: PathBuf,
    /// The existing part canonicalised (symlinks resolved), the rest appended lexically.
    resolved: PathBuf,
    /// Device and inode when the path exists (Unix).
    identity: Option<(u64, u64)>,
}

impl ResolvedPath {
    fn new(path: &Path) -> Result<Self> {
        let absolute = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            lexical: normalize_lexically(&absolute),
            resolved: resolve_path(&absolute),
            identity: file_identity(path),
        })
    }

    /// How `self` (as an output) relates to `other`: "is", "contains" or "sits inside".
    fn relation_to(&self, other: &ResolvedPath) -> Option<&'static str> {
        let by_path = [
            (&self.lexical, &other.lexical),
            (&self.resolved, &other.resolved),
        ]
        .into_iter()
        .find_map(|(a, b)| {
            if a == b {
                Some("is")
            } else if b.starts_with(a) {
                Some("contains")
            } else if a.starts_with(b) {
                Some("sits inside")
            } else {
                None
            }
        });
        let same_file = self.identity.is_some() && self.identity == other.identity;
        by_path.or(same_file.then_some("is the same file as"))
    }
}

#[cfg(unix)]
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_identity(_path: &Path) -> Option<(u64, u64)> {
    None
}

/// Removes `.` and resolves `..` against the preceding component, without touching the disk.
pub fn normalize_lexically(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The path as the filesystem will see it: the longest existing prefix canonicalised (symlinks
/// resolved), the not-yet-existing rest appended with `.` and `..` applied lexically.
pub fn resolve_path(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let components: Vec<Component> = absolute.components().collect();
    for split in (1..=components.len()).rev() {
        let prefix: PathBuf = components[..split].iter().collect();
        if let Ok(mut resolved) = prefix.canonicalize() {
            for component in &components[split..] {
                match component {
                    Component::CurDir => {}
                    Component::ParentDir => {
                        resolved.pop();
                    }
                    other => resolved.push(other.as_os_str()),
                }
            }
            return resolved;
        }
    }
    normalize_lexically(&absolute)
}

/// Resolves `entry`, a file named by `listed_in` (an index or the directory itself), inside the
/// model directory `dir`: refuses absolute paths, `..`, and symlinks that resolve outside `dir`
/// (except into the `blobs/` store of a Hugging Face cache when `dir` is one of its snapshots).
/// `what` names the reference in errors, e.g. "weight_map entry for tensor `x`".
pub fn confined_file(dir: &Path, entry: &str, listed_in: &Path, what: &str) -> Result<PathBuf> {
    let refuse = |message: String| Error::UnsafePath {
        path: listed_in.to_path_buf(),
        message,
    };
    let relative = Path::new(entry);
    let plain = !entry.is_empty()
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(refuse(format!(
            "{what} names `{entry}`: expected a file name inside the model directory {} \
             (absolute paths, `.` and `..` are refused)",
            dir.display()
        )));
    }
    let joined = dir.join(relative);
    let Ok(target) = joined.canonicalize() else {
        // Missing files are reported by the caller, which knows what it expected.
        return Ok(joined);
    };
    let root = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    if target.starts_with(&root) || in_hub_cache_blobs(&root, &target) {
        return Ok(joined);
    }
    Err(refuse(format!(
        "{what} names `{entry}`, which resolves to {} outside the model directory {} \
         (expected a file inside the model directory)",
        target.display(),
        root.display()
    )))
}

/// Whether `target` is in the `blobs/` store of the Hugging Face cache repository whose snapshot
/// `root` is (`…/models--org--name/snapshots/REV` links its files to `…/models--org--name/blobs`).
fn in_hub_cache_blobs(root: &Path, target: &Path) -> bool {
    let Some(snapshots) = root.parent() else {
        return false;
    };
    if snapshots.file_name().is_none_or(|n| n != "snapshots") {
        return false;
    }
    snapshots
        .parent()
        .is_some_and(|repo| target.starts_with(repo.join("blobs")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_normalisation_applies_dot_dot() {
        assert_eq!(
            normalize_lexically(Path::new("/a/b/../c/./d")),
            PathBuf::from("/a/c/d")
        );
    }

    #[test]
    fn missing_tail_is_appended_to_the_canonical_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let path = tmp.path().join("x/../y/z");
        assert_eq!(resolve_path(&path), root.join("y/z"));
    }

    #[test]
    fn hub_cache_blobs_are_allowed_only_from_a_snapshot() {
        let repo = Path::new("/c/models--a--b");
        let snapshot = repo.join("snapshots/rev");
        assert!(in_hub_cache_blobs(&snapshot, &repo.join("blobs/123")));
        assert!(!in_hub_cache_blobs(&snapshot, Path::new("/etc/passwd")));
        assert!(!in_hub_cache_blobs(
            Path::new("/c/models--a--b/other/rev"),
            &repo.join("blobs/123")
        ));
    }
}
