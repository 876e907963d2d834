//! Download of the files a run needs from a Hub repository into the shared cache, and offline
//! resolution from that cache.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::cache::{is_safe_etag, CacheRepo};
use super::http::{self, Target};
use super::{HubConfig, RepoRef};
use crate::checkpoint::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::error::{Error, Result};
use crate::progress::{Progress, Task};
use crate::safety::staging;

/// Files fetched when the repository has them, besides `config.json` and the weights: what
/// generation, chat templates, tokenisation and the compressed-model charts read.
const AUXILIARY_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "compression_report.json",
    "compress.toml",
];

/// Redirects followed by hand (relative ones, i.e. a renamed repository) before giving up.
const MAX_REDIRECTS: usize = 5;

/// The snapshot directory of `repo` with every file a run needs: from the cache alone when
/// `config.offline` (an error says what is missing), else after downloading what the cache
/// lacks (files already in the snapshot are not requested again).
pub fn download_model(
    config: &HubConfig,
    repo: &RepoRef,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let cache = CacheRepo::new(&config.cache_dir, &repo.id);
    if config.offline {
        return cached_snapshot(config, &cache, repo);
    }
    let client = Client {
        config,
        agent: http::agent(),
        no_redirect: ureq::AgentBuilder::new()
            .redirects(0)
            .try_proxy_from_env(true)
            .build(),
        cache: &cache,
        repo,
        progress,
    };
    let (commit, listed) = client.revision_info()?;
    let has = |name: &str| listed.iter().any(|f| f == name);
    if !has(CONFIG_FILE) {
        return Err(Error::Hub {
            url: client.repo_url(),
            message: format!(
                "{repo} has no {CONFIG_FILE}: not a model repository rfid-moe can run"
            ),
        });
    }
    let snapshot = cache.snapshot(&commit);
    let weights = if has(INDEX_FILE) {
        client.fetch(&commit, INDEX_FILE)?;
        let mut shards = shards_of_index(&snapshot.join(INDEX_FILE))?;
        if let Some(missing) = shards.iter().find(|s| !has(s)) {
            return Err(Error::Hub {
                url: client.repo_url(),
                message: format!("{INDEX_FILE} lists `{missing}`, which {repo} does not contain"),
            });
        }
        shards.insert(0, INDEX_FILE.to_string());
        shards
    } else if has(SINGLE_FILE) {
        vec![SINGLE_FILE.to_string()]
    } else {
        return Err(Error::Hub {
            url: client.repo_url(),
            message: format!("{repo} has neither {SINGLE_FILE} nor {INDEX_FILE}"),
        });
    };
    let files = model_files(&weights, &listed);
    for file in &files {
        client.fetch(&commit, file)?;
    }
    cache.write_ref(&repo.revision, &commit)?;
    Ok(snapshot)
}

/// What a run needs from a repository listing `listed`, given its weight files: `config.json`,
/// the weights, and the auxiliary files it has.
pub fn model_files(weights: &[String], listed: &[String]) -> Vec<String> {
    let mut files = vec![CONFIG_FILE.to_string()];
    files.extend(weights.iter().cloned());
    files.extend(
        AUXILIARY_FILES
            .iter()
            .filter(|name| listed.iter().any(|f| f == *name))
            .map(|name| name.to_string()),
    );
    files
}

/// The shard files an index names (each once, in order), refusing names that are not plain
/// relative paths.
fn shards_of_index(path: &Path) -> Result<Vec<String>> {
    let map = crate::checkpoint::index_weight_map(path)?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in &map {
        let file = file
            .as_str()
            .filter(|f| is_plain_relative(f))
            .ok_or_else(|| Error::UnsafePath {
                path: path.to_path_buf(),
                message: format!(
                    "weight_map entry for tensor `{tensor}` is {file}: expected a file name \
                     inside the repository"
                ),
            })?;
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    Ok(shards)
}

fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// The snapshot of `repo` in the cache, if it holds `config.json` and complete weights.
fn cached_snapshot(config: &HubConfig, cache: &CacheRepo, repo: &RepoRef) -> Result<PathBuf> {
    let offline_error = |path: PathBuf, what: String| Error::HubCache {
        path,
        message: format!(
            "offline mode (HF_HUB_OFFLINE): {repo} is not in the cache {}: {what}; run once \
             without HF_HUB_OFFLINE to download it",
            config.cache_dir.display()
        ),
    };
    let Some(commit) = cache.commit_of(&repo.revision)? else {
        return Err(offline_error(
            cache.dir.join("refs").join(&repo.revision),
            format!("no record of revision `{}`", repo.revision),
        ));
    };
    let snapshot = cache.snapshot(&commit);
    let mut needed = vec![snapshot.join(CONFIG_FILE)];
    let index = snapshot.join(INDEX_FILE);
    if index.exists() {
        needed.extend(shards_of_index(&index)?.iter().map(|s| snapshot.join(s)));
    } else {
        needed.push(snapshot.join(SINGLE_FILE));
    }
    if let Some(missing) = needed.iter().find(|p| !p.exists()) {
        return Err(offline_error(
            missing.clone(),
            format!("`{}` is missing", missing.display()),
        ));
    }
    Ok(snapshot)
}

/// One resolution of a repository: the agents, the cache and where progress goes.
struct Client<'a> {
    config: &'a HubConfig,
    agent: ureq::Agent,
    no_redirect: ureq::Agent,
    cache: &'a CacheRepo,
    repo: &'a RepoRef,
    progress: &'a dyn Progress,
}

impl Client<'_> {
    fn repo_url(&self) -> String {
        format!("{}/{}", self.config.endpoint, self.repo.id)
    }

    /// The commit the revision points to and the files of that commit.
    fn revision_info(&self) -> Result<(String, Vec<String>)> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.config.endpoint,
            self.repo.id,
            http::encode_segment(&self.repo.revision)
        );
        let target = Target::Repo {
            id: &self.repo.id,
            revision: &self.repo.revision,
        };
        let response = http::authorized(self.agent.get(&url), self.config.token.as_ref())
            .call()
            .map_err(|e| http::request_error(self.config, &url, target, e))?;
        let bad = |message: String| Error::Hub {
            url: url.clone(),
            message,
        };
        let info: serde_json::Value = response
            .into_json()
            .map_err(|e| bad(format!("unreadable repository information: {e}")))?;
        let commit = info
            .get("sha")
            .and_then(|s| s.as_str())
            .filter(|s| super::is_commit_hash(s))
            .ok_or_else(|| bad("repository information has no 40-digit commit `sha`".into()))?;
        let files = info
            .get("siblings")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("repository information has no `siblings` file list".into()))?
            .iter()
            .filter_map(|s| s.get("rfilename").and_then(|f| f.as_str()))
            .map(str::to_string)
            .collect();
        Ok((commit.to_string(), files))
    }

    /// Puts `file` of `commit` into the snapshot unless it is there already.
    fn fetch(&self, commit: &str, file: &str) -> Result<()> {
        if self.cache.snapshot(commit).join(file).exists() {
            return Ok(());
        }
        if !is_plain_relative(file) {
            return Err(Error::UnsafePath {
                path: self.cache.dir.clone(),
                message: format!("repository file `{file}` is not a plain relative path"),
            });
        }
        let url = format!(
            "{}/{}/resolve/{}/{}",
            self.config.endpoint,
            self.repo.id,
            commit,
            http::encode_path(file)
        );
        let target = Target::File {
            id: &self.repo.id,
            revision: &self.repo.revision,
            path: file,
        };
        let fail = |e| http::request_error(self.config, &url, target, e);
        let (headers, body) = self.resolve(&url).map_err(|e| fail(*e))?;
        let etag = headers
            .linked_etag
            .or(headers.etag)
            .filter(|e| is_safe_etag(e))
            .ok_or_else(|| Error::Hub {
                url: url.clone(),
                message: "the response has no usable ETag (X-Linked-Etag or ETag) header".into(),
            })?;
        let blob = self.cache.blob(&etag);
        if !blob.exists() {
            let expected = headers
                .linked_size
                .or(body.header("content-length").and_then(|v| v.parse().ok()));
            let task = Task::start(
                self.progress,
                format!("download {file}"),
                expected.unwrap_or(0),
            );
            receive(body, &blob, expected, &etag, &url, &task)?;
        }
        self.cache.link(commit, file, &etag)?;
        Ok(())
    }

    /// The Hub's own headers for `url` (before any redirect to a CDN) and the response that
    /// carries the content. Relative redirects (renamed repositories) are followed with the
    /// token; an absolute one (the CDN) without it.
    fn resolve(
        &self,
        url: &str,
    ) -> std::result::Result<(HubHeaders, ureq::Response), Box<ureq::Error>> {
        let token = self.config.token.as_ref();
        let mut current = url.to_string();
        for _ in 0..MAX_REDIRECTS {
            let response = http::authorized(self.no_redirect.get(&current), token)
                .call()
                .map_err(Box::new)?;
            let headers = HubHeaders::of(&response);
            let location = response.header("location").map(str::to_string);
            match (response.status(), location) {
                (300..=399, Some(location)) if location.starts_with('/') => {
                    current = format!("{}{location}", http::origin(&current));
                }
                (300..=399, Some(location)) => {
                    let same_origin = http::origin(&location) == http::origin(&current);
                    let request = self.agent.get(&location);
                    let request = if same_origin {
                        http::authorized(request, token)
                    } else {
                        request
                    };
                    return Ok((headers, request.call().map_err(Box::new)?));
                }
                _ => return Ok((headers, response)),
            }
        }
        // Give the caller a transport-style failure naming the loop.
        let response = self.agent.get(&current).call().map_err(Box::new)?;
        Ok((HubHeaders::of(&response), response))
    }
}

/// The headers the Hub sets on a file's `resolve` answer.
struct HubHeaders {
    etag: Option<String>,
    linked_etag: Option<String>,
    linked_size: Option<u64>,
}

impl HubHeaders {
    fn of(response: &ureq::Response) -> Self {
        let clean = |v: &str| {
            v.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_string()
        };
        Self {
            etag: response.header("etag").map(clean),
            linked_etag: response.header("x-linked-etag").map(clean),
            linked_size: response
                .header("x-linked-size")
                .and_then(|v| v.trim().parse().ok()),
        }
    }
}

/// Streams `body` into `blob` through a temporary `ETAG.PID.incomplete` file that is renamed into
/// place only when the length (and, for LFS files, whose ETag is their SHA-256, the hash)
/// matches; on any failure or signal the temporary file is removed, and those of dead processes
/// are removed before, so nothing that looks complete, and no partial download, is left behind.
fn receive(
    body: ureq::Response,
    blob: &Path,
    expected: Option<u64>,
    etag: &str,
    url: &str,
    task: &Task,
) -> Result<()> {
    let dir = blob.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    remove_dead_downloads(dir);
    let partial = dir.join(format!("{etag}.{}.incomplete", std::process::id()));
    staging::register_staging(&partial);
    let result = write_checked(body, &partial, expected, etag, url, task).and_then(|()| {
        let _registry = staging::lock_registry();
        std::fs::rename(&partial, blob).map_err(|e| Error::io(blob, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    staging::unregister_staging(&partial);
    result
}

/// Removes the `ETAG.PID.incomplete` files in `dir` of processes that are no longer alive.
fn remove_dead_downloads(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_suffix(".incomplete"))
            .and_then(|n| n.rsplit('.').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let dead = pid.is_some_and(|pid| {
            pid != std::process::id() && staging::process_alive(pid) == Some(false)
        });
        if dead {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn write_checked(
    body: ureq::Response,
    partial: &Path,
    expected: Option<u64>,
    etag: &str,
    url: &str,
    task: &Task,
) -> Result<()> {
    let mut file = std::fs::File::create(partial).map_err(|e| Error::io(partial, e))?;
    let source = match body.get_url() {
        served if served != url => format!(", content served by {served}"),
        _ => String::new(),
    };
    let mut reader = body.into_reader();
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    let mut buffer = vec![0u8; 1 << 20];
    let truncated = |received: u64, why: String| Error::Hub {
        url: url.to_string(),
        message: format!(
            "transfer interrupted after {received} of {} bytes ({why}{source}); nothing was \
             kept, run again to retry",
            expected.map_or("?".to_string(), |n| n.to_string())
        ),
    };
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(truncated(received, e.to_string())),
        };
        file.write_all(&buffer[..n])
            .map_err(|e| Error::io(partial, e))?;
        hasher.update(&buffer[..n]);
        received += n as u64;
        task.advance(n as u64);
    }
    if let Some(expected) = expected.filter(|&e| e != received) {
        return Err(truncated(received, format!("expected {expected} bytes")));
    }
    let is_sha256 = etag.len() == 64 && etag.chars().all(|c| c.is_ascii_hexdigit());
    if is_sha256 {
        let digest: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if !digest.eq_ignore_ascii_case(etag) {
            return Err(Error::Hub {
                url: url.to_string(),
                message: format!(
                    "content has SHA-256 {digest}, but the Hub announced {etag}; nothing was kept"
                ),
            });
        }
    }
    file.sync_all().map_err(|e| Error::io(partial, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn partial_downloads_of_dead_processes_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp.path().join("0a1b.999999999.incomplete");
        let live = tmp
            .path()
            .join(format!("0a1b.{}.incomplete", std::process::id()));
        let blob = tmp.path().join("0a1b");
        for path in [&dead, &live, &blob] {
            std::fs::write(path, b"x").unwrap();
        }
        remove_dead_downloads(tmp.path());
        assert!(!dead.exists() && live.exists() && blob.exists());
    }

    #[test]
    fn a_run_needs_config_weights_and_the_auxiliary_files_present() {
        let listed: Vec<String> = [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "README.md",
            "big.bin",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            model_files(&["model.safetensors".to_string()], &listed),
            ["config.json", "model.safetensors", "tokenizer.json"]
        );
    }

    #[test]
    fn index_shards_are_listed_once_and_escapes_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("index.json");
        std::fs::write(
            &path,
            r#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            shards_of_index(&path).unwrap(),
            ["s1.safetensors", "s2.safetensors"]
        );
        std::fs::write(&path, r#"{"weight_map": {"a": "../../x"}}"#).unwrap();
        assert!(matches!(
            shards_of_index(&path),
            Err(Error::UnsafePath { .. })
        ));
    }
}
