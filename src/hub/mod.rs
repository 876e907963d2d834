//! Models from and to the Hugging Face Hub: the cache layout, Hub ids and the environment are
//! always available; the network (download, upload) needs the cargo feature `hub`.
//! With it, `org/name[@revision]` resolves to a
//! snapshot directory of the standard cache that Python's `huggingface_hub` shares
//! (`HF_HUB_CACHE`, `HF_HOME`), downloading only the files a run needs; `upload` commits a
//! compressed output to a repository through the Hub's HTTP API.
//!
//! The protocol is spoken directly over `ureq` (rustls): the `hf-hub` crate's blocking client
//! pulls indicatif into the library, ignores `HF_HUB_CACHE` and `HF_HUB_OFFLINE`, does not check
//! the length of what it received, hides the Hub's error headers, and has no upload.

mod cache;
#[cfg(feature = "hub")]
mod download;
#[cfg(feature = "hub")]
mod http;
#[cfg(feature = "hub")]
mod upload;

use std::path::{Path, PathBuf};

pub use cache::{repo_id_of_snapshot, CacheRepo};
#[cfg(feature = "hub")]
pub use download::{download_model, model_files};
#[cfg(feature = "hub")]
pub use upload::{check_upload_dir, upload_folder, UploadOptions, UploadSummary, Visibility};

use crate::error::{Error, Result};
#[cfg(feature = "hub")]
use crate::progress::Progress;

/// The public Hub, used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The revision used when a Hub id names none.
pub const DEFAULT_REVISION: &str = "main";

/// An access token; its `Debug` form is redacted and it has no `Display`, so it cannot end up in
/// a message or a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token from its text (surrounding whitespace removed); `None` when empty.
    pub fn new(text: &str) -> Option<Self> {
        let trimmed = text.trim();
        (!trimmed.is_empty()).then(|| Self(trimmed.to_string()))
    }

    /// The `Authorization` header value.
    #[cfg(feature = "hub")]
    fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// The secret itself (for checks that output does not contain it).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Where the Hub is, where its cache lives, the token and whether the network may be used.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Base URL of the Hub, without a trailing slash (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The cache holding `models--org--name` directories (`HF_HUB_CACHE`).
    pub cache_dir: PathBuf,
    /// Token sent as `Authorization: Bearer` (`HF_TOKEN`, else the token file).
    pub token: Option<Token>,
    /// Use only the cache (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubConfig {
    /// The configuration from the process environment, as `huggingface_hub` reads it.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The configuration from the variables `var` returns: `HF_ENDPOINT`; the cache is
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`; the token is `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else
    /// `HF_HOME/token`; `HF_HUB_OFFLINE` = 1/true/yes/on means offline.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let hf_home = match set("HF_HOME") {
            Some(home) => PathBuf::from(home),
            None => {
                let cache = match set("XDG_CACHE_HOME") {
                    Some(xdg) => PathBuf::from(xdg),
                    None => PathBuf::from(set("HOME").ok_or_else(|| {
                        Error::InvalidArgument(
                            "cannot locate the Hugging Face cache: none of HF_HUB_CACHE, HF_HOME, \
                             XDG_CACHE_HOME or HOME is set"
                                .into(),
                        )
                    })?)
                    .join(".cache"),
                };
                cache.join("huggingface")
            }
        };
        let cache_dir = set("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = match set("HF_TOKEN") {
            Some(token) => Token::new(&token),
            None => {
                let path = set("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                read_token_file(&path)?
            }
        };
        let endpoint = set("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let offline = set("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Ok(Self {
            endpoint: endpoint.trim().trim_end_matches('/').to_string(),
            cache_dir,
            token,
            offline,
        })
    }
}

/// The token in `path`, if that file exists (its content is never echoed in errors).
fn read_token_file(path: &Path) -> Result<Option<Token>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Token::new(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// A repository on the Hub and a revision of it (`org/name` or `org/name@revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    /// `org/name`.
    pub id: String,
    /// Branch, tag or commit hash (`main` when none was given).
    pub revision: String,
}

impl RepoRef {
    /// Parses `org/name[@revision]`; `None` unless `spec` has that form (exactly one `/`, names
    /// of letters, digits, `-`, `_` and `.`, no `..` or `--`, not ending in `.git`).
    pub fn parse(spec: &str) -> Option<Self> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, revision)) => (id, Some(revision)),
            None => (spec, None),
        };
        let (org, name) = id.split_once('/')?;
        if !is_repo_name_part(org) || !is_repo_name_part(name) || name.ends_with(".git") {
            return None;
        }
        let revision = match revision {
            Some(r) if is_revision(r) => r.to_string(),
            Some(_) => return None,
            None => DEFAULT_REVISION.to_string(),
        };
        Some(Self {
            id: id.to_string(),
            revision,
        })
    }

    /// Whether the revision is a full commit hash (40 hexadecimal digits).
    pub fn is_pinned(&self) -> bool {
        is_commit_hash(&self.revision)
    }
}

impl std::fmt::Display for RepoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.id, self.revision)
    }
}

fn is_repo_name_part(part: &str) -> bool {
    (1..=96).contains(&part.len())
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !part.starts_with(['-', '.'])
        && !part.ends_with(['-', '.'])
        && !part.contains("..")
        && !part.contains("--")
}

fn is_revision(revision: &str) -> bool {
    !revision.is_empty()
        && revision.len() <= 256
        && !revision.starts_with('/')
        && !revision.contains("..")
        && revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// Whether `text` is a full commit hash.
pub fn is_commit_hash(text: &str) -> bool {
    text.len() == 40 && text.chars().all(|c| c.is_ascii_hexdigit())
}

/// What a `--model` argument names: an existing local path always wins; otherwise a string of
/// the form `org/name[@revision]` is a Hub repository; anything else is a local path (that the
/// command will report missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local directory (or a path that does not exist and is not a Hub id).
    Local(PathBuf),
    /// A Hub repository at a revision.
    Hub(RepoRef),
}

impl ModelSource {
    /// Classifies `arg` (see the type's documentation).
    pub fn classify(arg: &Path) -> Self {
        if std::fs::symlink_metadata(arg).is_ok() {
            return Self::Local(arg.to_path_buf());
        }
        match arg.to_str().and_then(RepoRef::parse) {
            Some(repo) => Self::Hub(repo),
            None => Self::Local(arg.to_path_buf()),
        }
    }
}

/// The local directory for `arg`: itself when it is local (see [`ModelSource::classify`]), else
/// the cache snapshot of the Hub repository, downloaded first if needed (or taken from the cache
/// alone when `config.offline`).
#[cfg(feature = "hub")]
pub fn resolve_model(arg: &Path, config: &HubConfig, progress: &dyn Progress) -> Result<PathBuf> {
    match ModelSource::classify(arg) {
        ModelSource::Local(path) => Ok(path),
        ModelSource::Hub(repo) => download_model(config, &repo, progress),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> HubConfig {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubConfig::from_vars(|name| map.get(name).cloned()).unwrap()
    }

    #[test]
    fn repo_ids_parse_with_and_without_revision() {
        assert_eq!(
            RepoRef::parse("Qwen/Qwen3-30B-A3B"),
            Some(RepoRef {
                id: "Qwen/Qwen3-30B-A3B".into(),
                revision: "main".into()
            })
        );
        let pinned = RepoRef::parse("org/m.v1@refs/pr/3").unwrap();
        assert_eq!(
            (pinned.id.as_str(), pinned.revision.as_str()),
            ("org/m.v1", "refs/pr/3")
        );
        assert!(!pinned.is_pinned());
        assert!(
            RepoRef::parse(&format!("a/b@{}", &"0123456789abcdef".repeat(3)[..40]))
                .unwrap()
                .is_pinned()
        );
        for bad in [
            "name",
            "a/b/c",
            "/abs/path",
            "./a/b",
            "a/../b",
            "a--x/b",
            "a/b.git",
            "a/b@",
            "a/b@x y",
            "a/b@../x",
            "-a/b",
            "a/",
            "~/b",
        ] {
            assert_eq!(RepoRef::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_existing_local_path_wins_over_a_hub_id() {
        let tmp = tempfile::tempdir().unwrap();
        let local = tmp.path().join("org/name");
        std::fs::create_dir_all(&local).unwrap();
        assert_eq!(
            ModelSource::classify(&local),
            ModelSource::Local(local.clone())
        );
        let relative = Path::new("surely-no-such-org/model");
        assert!(matches!(
            ModelSource::classify(relative),
            ModelSource::Hub(RepoRef { ref id, .. }) if id == "surely-no-such-org/model"
        ));
        let not_an_id = Path::new("no/such/dir");
        assert_eq!(
            ModelSource::classify(not_an_id),
            ModelSource::Local(not_an_id.into())
        );
    }

    #[test]
    fn environment_is_read_like_huggingface_hub() {
        let c = config(&[("HOME", "/home/u")]);
        assert_eq!(c.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(c.cache_dir, Path::new("/home/u/.cache/huggingface/hub"));
        assert!(!c.offline && c.token.is_none());
        let c = config(&[
            ("HF_HOME", "/hf"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_TOKEN", " hf_secret \n"),
        ]);
        assert_eq!(c.cache_dir, Path::new("/hf/hub"));
        assert_eq!(c.endpoint, "http://127.0.0.1:9");
        assert!(c.offline);
        assert_eq!(c.token.as_ref().unwrap().expose(), "hf_secret");
        assert!(!format!("{c:?}").contains("hf_secret"));
        let c = config(&[
            ("HF_HOME", "/hf"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_HUB_OFFLINE", "0"),
        ]);
        assert_eq!(c.cache_dir, Path::new("/c"));
        assert!(!c.offline);
    }

    #[test]
    fn the_token_file_is_used_when_hf_token_is_unset() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("token"), "hf_from_file\n").unwrap();
        let home = tmp.path().to_str().unwrap();
        let c = config(&[("HF_HOME", home)]);
        assert_eq!(c.token.unwrap().expose(), "hf_from_file");
        let c = config(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")]);
        assert_eq!(c.token.unwrap().expose(), "hf_env");
    }
}
