//! Upload of a compressed output to a Hub repository through the Hub's HTTP API, as
//! `huggingface_hub`'s `upload_folder` does it: create the repository (if asked), ask which
//! files go through LFS (`preupload`), send those to the LFS storage (batch API, single or
//! multi-part `PUT`), then one commit (NDJSON: a header, small files inline in base64, LFS
//! files by SHA-256).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::http::{self, Target};
use super::{HubConfig, RepoRef, Token};
use crate::error::{Error, Result};
use crate::progress::{Progress, Task};

/// Whether a repository created by `upload --create` is private or public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Visible only to its owner (the default: a compressed model is reviewed before it is
    /// shared).
    Private,
    /// Visible to everyone.
    Public,
}

/// What to upload and how.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// The target repository and branch.
    pub repo: RepoRef,
    /// Create the repository first (an existing one is used as it is).
    pub create: bool,
    /// Visibility of a created repository.
    pub visibility: Visibility,
    /// The commit's summary line.
    pub message: String,
    /// Files given in memory, by path in the repository; they replace files of the same path
    /// in the directory (e.g. a regenerated `README.md`).
    pub overrides: BTreeMap<String, Vec<u8>>,
    /// Extra files from elsewhere on disk, by path in the repository (e.g. charts).
    pub extra: BTreeMap<String, PathBuf>,
}

/// What an upload did.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadSummary {
    /// The files committed (paths in the repository).
    pub files: Vec<String>,
    /// How many of them went through LFS.
    pub lfs_files: usize,
    /// Bytes sent to the LFS storage (files it already had are not sent again).
    pub lfs_bytes_sent: u64,
    /// The commit's URL, as the Hub reported it.
    pub commit_url: Option<String>,
}

/// One file of the commit.
struct Entry {
    path: String,
    source: Source,
    size: u64,
    sha256: String,
    sample: Vec<u8>,
}

enum Source {
    Disk(PathBuf),
    Memory(Vec<u8>),
}

impl Entry {
    fn bytes(&self) -> Result<Vec<u8>> {
        match &self.source {
            Source::Memory(bytes) => Ok(bytes.clone()),
            Source::Disk(path) => std::fs::read(path).map_err(|e| Error::io(path, e)),
        }
    }
}

/// Refuses `dir` unless it is a finished rfid-moe output: not a staging directory (`.NAME.partial-PID`
/// or any hidden name), with `config.json` carrying a `compression` section,
/// `compression_report.json`, `compress.toml`, and weights that open as a checkpoint.
pub fn check_upload_dir(dir: &Path) -> Result<()> {
    let refuse = |message: String| Error::InvalidInput {
        path: dir.to_path_buf(),
        message,
    };
    let name = std::path::absolute(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if name.starts_with('.') || name.contains(".partial-") {
        return Err(refuse(
            "a staging directory of an unfinished run, not a finished output: finish (or \
             resume) the compression, then upload its output directory"
                .into(),
        ));
    }
    if !dir.is_dir() {
        return Err(refuse("not a directory".into()));
    }
    for file in [crate::format::REPORT_FILE, crate::format::OPTIONS_FILE] {
        if !dir.join(file).is_file() {
            return Err(refuse(format!(
                "no {file}: not a complete rfid-moe output (upload takes the directory that \
                 `rfid-moe compress --out` wrote)"
            )));
        }
    }
    let checkpoint = crate::checkpoint::Checkpoint::open(dir)?;
    if checkpoint
        .config()
        .get(crate::format::COMPRESSION_KEY)
        .is_none()
    {
        return Err(refuse(
            "config.json has no `compression` section: not an rfid-moe compressed output".into(),
        ));
    }
    Ok(())
}

/// Uploads every file of `dir` (recursively, hidden entries skipped), with `options`'
/// overrides and extras, as one commit to `options.repo`. Needs a token.
pub fn upload_folder(
    config: &HubConfig,
    dir: &Path,
    options: &UploadOptions,
    progress: &dyn Progress,
) -> Result<UploadSummary> {
    let token = config.token.as_ref().ok_or_else(|| {
        Error::InvalidArgument(
            "upload needs a Hub token with write access: set HF_TOKEN or log in with \
             `huggingface-cli login` (the token file)"
                .into(),
        )
    })?;
    if config.offline {
        return Err(Error::InvalidArgument(
            "upload is impossible in offline mode (HF_HUB_OFFLINE is set)".into(),
        ));
    }
    let entries = collect_entries(dir, options)?;
    let session = Session {
        config,
        token,
        agent: http::agent(),
        repo: &options.repo,
        progress,
    };
    if options.create {
        session.create_repo(options.visibility)?;
    }
    let modes = session.preupload(&entries)?;
    let mut lfs = Vec::new();
    let mut regular = Vec::new();
    for entry in &entries {
        match modes.get(&entry.path).map(String::as_str) {
            Some("ignore") => {}
            Some("lfs") => lfs.push(entry),
            _ => regular.push(entry),
        }
    }
    let lfs_bytes_sent = session.upload_lfs(&lfs)?;
    let commit_url = session.commit(&options.message, &regular, &lfs)?;
    Ok(UploadSummary {
        files: regular.iter().chain(&lfs).map(|e| e.path.clone()).collect(),
        lfs_files: lfs.len(),
        lfs_bytes_sent,
        commit_url,
    })
}

/// The files of `dir` plus the options' extras and overrides, hashed.
fn collect_entries(dir: &Path, options: &UploadOptions) -> Result<Vec<Entry>> {
    let mut sources: BTreeMap<String, Source> = BTreeMap::new();
    walk(dir, "", &mut sources)?;
    for (path, file) in &options.extra {
        sources.insert(path.clone(), Source::Disk(file.clone()));
    }
    for (path, bytes) in &options.overrides {
        sources.insert(path.clone(), Source::Memory(bytes.clone()));
    }
    sources
        .into_iter()
        .map(|(path, source)| {
            let (size, sha256, sample) = digest(&source)?;
            Ok(Entry {
                path,
                source,
                size,
                sha256,
                sample,
            })
        })
        .collect()
}

fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Source>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(Error::InvalidInput {
                path: entry.path(),
                message: "file name is not UTF-8: the Hub cannot store it".into(),
            });
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let relative = format!("{prefix}{name}");
        let kind = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            walk(&path, &format!("{relative}/"), out)?;
        } else if kind.is_file() {
            out.insert(relative, Source::Disk(path));
        }
    }
    Ok(())
}

/// Size, SHA-256 (hex) and the first 512 bytes of a file.
fn digest(source: &Source) -> Result<(u64, String, Vec<u8>)> {
    let hex = |hasher: Sha256| -> String {
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    match source {
        Source::Memory(bytes) => {
            let mut hasher = Sha256::new();
            hasher.update(bytes);
            Ok((
                bytes.len() as u64,
                hex(hasher),
                bytes[..bytes.len().min(512)].to_vec(),
            ))
        }
        Source::Disk(path) => {
            let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let mut hasher = Sha256::new();
            let mut buffer = vec![0u8; 1 << 20];
            let mut size = 0u64;
            let mut sample = Vec::new();
            loop {
                let n = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
                if n == 0 {
                    break;
                }
                if sample.len() < 512 {
                    let take = (512 - sample.len()).min(n);
                    sample.extend_from_slice(&buffer[..take]);
                }
                hasher.update(&buffer[..n]);
                size += n as u64;
            }
            Ok((size, hex(hasher), sample))
        }
    }
}

/// One upload's connection state.
struct Session<'a> {
    config: &'a HubConfig,
    token: &'a Token,
    agent: ureq::Agent,
    repo: &'a RepoRef,
    progress: &'a dyn Progress,
}

impl Session<'_> {
    fn post_json(&self, url: &str, what: &str, body: &Value) -> Result<Value> {
        let request = http::authorized(self.agent.post(url), Some(self.token));
        let response = request
            .send_json(body)
            .map_err(|e| http::request_error(self.config, url, Target::Call(what), e))?;
        response.into_json().map_err(|e| Error::Hub {
            url: url.to_string(),
            message: format!("unreadable answer while {what}: {e}"),
        })
    }

    /// `POST /api/repos/create`; an existing repository (409) is fine.
    fn create_repo(&self, visibility: Visibility) -> Result<()> {
        let url = format!("{}/api/repos/create", self.config.endpoint);
        let (organization, name) = self.repo.id.split_once('/').unwrap_or(("", &self.repo.id));
        let body = json!({
            "name": name,
            "organization": organization,
            "type": "model",
            "private": visibility == Visibility::Private,
        });
        let request = http::authorized(self.agent.post(&url), Some(self.token));
        match request.send_json(&body) {
            Ok(_) | Err(ureq::Error::Status(409, _)) => Ok(()),
            Err(e) => Err(http::request_error(
                self.config,
                &url,
                Target::Call("creating the repository"),
                e,
            )),
        }
    }

    /// `POST /api/models/{repo}/preupload/{revision}`: each file's upload mode (`lfs`,
    /// `regular`, or `ignore` for files the repository's .gitignore excludes).
    fn preupload(&self, entries: &[Entry]) -> Result<BTreeMap<String, String>> {
        let url = format!(
            "{}/api/models/{}/preupload/{}",
            self.config.endpoint,
            self.repo.id,
            http::encode_segment(&self.repo.revision)
        );
        let mut modes = BTreeMap::new();
        let engine = base64::engine::general_purpose::STANDARD;
        for chunk in entries.chunks(256) {
            let files: Vec<Value> = chunk
                .iter()
                .map(
                    |e| json!({"path": e.path, "sample": engine.encode(&e.sample), "size": e.size}),
                )
                .collect();
            let answer = self.post_json(
                &url,
                "asking the Hub how to upload each file (preupload)",
                &json!({ "files": files }),
            )?;
            let listed = answer
                .get("files")
                .and_then(Value::as_array)
                .ok_or_else(|| Error::Hub {
                    url: url.clone(),
                    message: "preupload answer has no `files` list".into(),
                })?;
            for file in listed {
                let path = file.get("path").and_then(Value::as_str).unwrap_or_default();
                let ignore = file.get("shouldIgnore").and_then(Value::as_bool) == Some(true);
                let mode = file
                    .get("uploadMode")
                    .and_then(Value::as_str)
                    .unwrap_or("regular");
                modes.insert(
                    path.to_string(),
                    if ignore { "ignore" } else { mode }.to_string(),
                );
            }
        }
        Ok(modes)
    }

    /// Sends the LFS files the storage does not have yet; returns the bytes sent.
    fn upload_lfs(&self, files: &[&Entry]) -> Result<u64> {
        if files.is_empty() {
            return Ok(0);
        }
        let url = format!(
            "{}/{}.git/info/lfs/objects/batch",
            self.config.endpoint, self.repo.id
        );
        let objects: Vec<Value> = files
            .iter()
            .map(|e| json!({"oid": e.sha256, "size": e.size}))
            .collect();
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": objects,
            "hash_algo": "sha256",
            "ref": { "name": self.repo.revision },
        });
        let what = "asking the LFS storage where to send the large files (batch)";
        let request = http::authorized(self.agent.post(&url), Some(self.token))
            .set("Accept", "application/vnd.git-lfs+json")
            .set("Content-Type", "application/vnd.git-lfs+json");
        let answer: Value = request
            .send_string(&body.to_string())
            .map_err(|e| http::request_error(self.config, &url, Target::Call(what), e))?
            .into_json()
            .map_err(|e| Error::Hub {
                url: url.clone(),
                message: format!("unreadable LFS batch answer: {e}"),
            })?;
        let transfer = answer
            .get("transfer")
            .and_then(Value::as_str)
            .unwrap_or("basic");
        let objects = answer
            .get("objects")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::Hub {
                url: url.clone(),
                message: "LFS batch answer has no `objects` list".into(),
            })?;
        let mut sent = 0;
        for object in objects {
            let oid = object
                .get("oid")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let entry = files
                .iter()
                .find(|e| e.sha256 == oid)
                .ok_or_else(|| Error::Hub {
                    url: url.clone(),
                    message: format!(
                        "LFS batch answer names object {oid}, which was not asked for"
                    ),
                })?;
            if let Some(error) = object.get("error") {
                return Err(Error::Hub {
                    url: url.clone(),
                    message: format!("LFS storage refused {}: {error}", entry.path),
                });
            }
            let Some(actions) = object.get("actions") else {
                continue; // already stored
            };
            if let Some(upload) = actions.get("upload") {
                if transfer == "multipart" {
                    self.put_multipart(entry, upload)?;
                } else {
                    self.put_single(entry, upload)?;
                }
                sent += entry.size;
            }
            if let Some(verify) = actions.get("verify") {
                self.verify(entry, verify)?;
            }
        }
        Ok(sent)
    }

    fn put_single(&self, entry: &Entry, action: &Value) -> Result<()> {
        let href = action_href(action, &entry.path)?;
        let mut request = self
            .agent
            .put(href)
            .set("Content-Length", &entry.size.to_string());
        for (name, value) in action_headers(action) {
            request = request.set(&name, &value);
        }
        let task = Task::start(self.progress, format!("upload {}", entry.path), entry.size);
        let result = match &entry.source {
            Source::Memory(bytes) => request.send_bytes(bytes),
            Source::Disk(path) => {
                let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
                request.send(Counting {
                    inner: file,
                    task: &task,
                })
            }
        };
        result.map_err(|e| {
            http::request_error(
                self.config,
                href,
                Target::Call("sending a file to LFS storage"),
                e,
            )
        })?;
        Ok(())
    }

    /// Multi-part transfer: the action's header holds `chunk_size` and one URL per part
    /// (`00001`, ...); each part's ETag goes into the completion request.
    fn put_multipart(&self, entry: &Entry, action: &Value) -> Result<()> {
        let href = action_href(action, &entry.path)?;
        let headers: BTreeMap<String, String> = action_headers(action).into_iter().collect();
        let chunk_size: u64 = headers
            .get("chunk_size")
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::Hub {
                url: href.to_string(),
                message: format!("multi-part upload of {} has no chunk_size", entry.path),
            })?;
        let parts: Vec<(&String, &String)> = headers
            .iter()
            .filter(|(k, _)| k.chars().all(|c| c.is_ascii_digit()))
            .collect();
        let bytes = entry.bytes()?;
        let task = Task::start(self.progress, format!("upload {}", entry.path), entry.size);
        let mut completed = Vec::new();
        for (index, (number, url)) in parts.iter().enumerate() {
            let start = (index as u64 * chunk_size).min(entry.size) as usize;
            let end = ((index as u64 + 1) * chunk_size).min(entry.size) as usize;
            let response = self
                .agent
                .put(url)
                .send_bytes(&bytes[start..end])
                .map_err(|e| {
                    http::request_error(self.config, url, Target::Call("sending a file part"), e)
                })?;
            let etag = response.header("etag").unwrap_or_default().to_string();
            completed.push(json!({"partNumber": number.parse::<u64>().unwrap_or(0), "etag": etag}));
            task.advance((end - start) as u64);
        }
        let body = json!({"oid": entry.sha256, "parts": completed});
        self.agent
            .post(href)
            .set("Accept", "application/vnd.git-lfs+json")
            .set("Content-Type", "application/vnd.git-lfs+json")
            .send_string(&body.to_string())
            .map_err(|e| {
                http::request_error(
                    self.config,
                    href,
                    Target::Call("completing a multi-part upload"),
                    e,
                )
            })?;
        Ok(())
    }

    fn verify(&self, entry: &Entry, action: &Value) -> Result<()> {
        let href = action_href(action, &entry.path)?;
        // The token goes to the verify URL only when it is on the Hub itself.
        let on_hub = http::origin(href) == http::origin(&self.config.endpoint);
        let mut request = http::authorized(self.agent.post(href), on_hub.then_some(self.token));
        for (name, value) in action_headers(action) {
            request = request.set(&name, &value);
        }
        request
            .send_json(json!({"oid": entry.sha256, "size": entry.size}))
            .map_err(|e| {
                http::request_error(
                    self.config,
                    href,
                    Target::Call("verifying an LFS upload"),
                    e,
                )
            })?;
        Ok(())
    }

    /// `POST /api/models/{repo}/commit/{revision}` with the NDJSON body.
    fn commit(&self, message: &str, regular: &[&Entry], lfs: &[&Entry]) -> Result<Option<String>> {
        let url = format!(
            "{}/api/models/{}/commit/{}",
            self.config.endpoint,
            self.repo.id,
            http::encode_segment(&self.repo.revision)
        );
        let engine = base64::engine::general_purpose::STANDARD;
        let mut lines =
            vec![json!({"key": "header", "value": {"summary": message, "description": ""}})];
        for entry in regular {
            lines.push(json!({"key": "file", "value": {
                "content": engine.encode(entry.bytes()?),
                "path": entry.path,
                "encoding": "base64",
            }}));
        }
        for entry in lfs {
            lines.push(json!({"key": "lfsFile", "value": {
                "path": entry.path,
                "algo": "sha256",
                "oid": entry.sha256,
            }}));
        }
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let what = "committing the files";
        let answer: Value = http::authorized(self.agent.post(&url), Some(self.token))
            .set("Content-Type", "application/x-ndjson")
            .send_string(&body)
            .map_err(|e| http::request_error(self.config, &url, Target::Call(what), e))?
            .into_json()
            .unwrap_or(Value::Null);
        Ok(answer
            .get("commitUrl")
            .and_then(Value::as_str)
            .map(str::to_string))
    }
}

fn action_href<'v>(action: &'v Value, path: &str) -> Result<&'v str> {
    action
        .get("href")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Hub {
            url: String::new(),
            message: format!("LFS action for {path} has no `href`"),
        })
}

fn action_headers(action: &Value) -> Vec<(String, String)> {
    action
        .get("header")
        .and_then(Value::as_object)
        .map(|map| {
            map.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A reader that reports what it has read to a progress task.
struct Counting<'a, R> {
    inner: R,
    task: &'a Task<'a>,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.task.advance(n as u64);
        Ok(n)
    }
}
