//! A small Hugging Face Hub look-alike on 127.0.0.1 for tests: std `TcpListener`, one thread per
//! connection, HTTP/1.1 with `Connection: close`. It serves repositories with the Hub's URL
//! scheme and headers (`/api/models/{id}/revision/{rev}`, `/{id}/resolve/{rev}/{file}` with
//! `X-Repo-Commit`, `ETag`, and for `.safetensors` files a 302 to `/cdn/{sha256}` carrying
//! `X-Linked-Etag` / `X-Linked-Size`, as LFS files get; the CDN is on the same host here), answers errors with `X-Error-Code` /
//! `X-Error-Message`, implements the upload API (repo creation, preupload, LFS batch + PUT +
//! verify, NDJSON commit), and records every request.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine;
use sha2::{Digest, Sha256};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// A commit's files by path.
pub type Files = BTreeMap<String, Vec<u8>>;

#[derive(Default)]
struct Repo {
    branches: HashMap<String, String>,
    commits: HashMap<String, Files>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    gated: HashSet<String>,
    truncated: HashSet<String>,
    hidden: HashSet<String>,
    lfs: HashMap<String, Vec<u8>>,
    requests: Vec<Recorded>,
    commit_counter: u64,
}

/// The running server.
pub struct FakeHub {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl FakeHub {
    /// Starts the server on an ephemeral port; it lives until the test process ends.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let base = endpoint.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                let base = base.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &state, &base);
                });
            }
        });
        Self { endpoint, state }
    }

    /// Adds commit `commit` with `files` to repository `id` and points `branch` at it.
    pub fn add_commit(&self, id: &str, branch: &str, commit: &str, files: Files) {
        let mut state = self.state.lock().unwrap();
        let repo = state.repos.entry(id.to_string()).or_default();
        repo.commits.insert(commit.to_string(), files);
        repo.branches.insert(branch.to_string(), commit.to_string());
    }

    /// Files of a directory on disk.
    pub fn files_of(dir: &Path) -> Files {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| {
                (
                    e.file_name().to_str().unwrap().to_string(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    /// Makes `id` gated: every file answers 403 with `X-Error-Code: GatedRepo`.
    pub fn gate(&self, id: &str) {
        self.state.lock().unwrap().gated.insert(id.to_string());
    }

    /// Makes every download of `file` stop halfway (the connection closes early).
    pub fn truncate(&self, file: &str) {
        self.state
            .lock()
            .unwrap()
            .truncated
            .insert(file.to_string());
    }

    /// Makes `file` listed but missing (its download answers 404 `EntryNotFound`).
    pub fn hide(&self, file: &str) {
        self.state.lock().unwrap().hidden.insert(file.to_string());
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The files of the commit `branch` of `id` points to.
    pub fn branch_files(&self, id: &str, branch: &str) -> Option<Files> {
        let state = self.state.lock().unwrap();
        let repo = state.repos.get(id)?;
        repo.commits.get(repo.branches.get(branch)?).cloned()
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then close (a truncated transfer).
    cut_at: Option<usize>,
}

impl Response {
    fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
            cut_at: None,
        }
    }

    fn json(status: u16, value: serde_json::Value) -> Self {
        Self::new(status, value.to_string()).header("Content-Type", "application/json")
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        Self::json(status, serde_json::json!({ "error": message }))
            .header("X-Error-Code", code)
            .header("X-Error-Message", message)
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

fn read_request(stream: &mut BufReader<TcpStream>) -> std::io::Result<Recorded> {
    let mut line = String::new();
    stream.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        stream.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if let Some(length) = headers.get("content-length") {
        body.resize(length.parse().unwrap_or(0), 0);
        stream.read_exact(&mut body)?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            stream.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0u8; size + 2];
            stream.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    Ok(Recorded {
        method,
        path,
        headers,
        body,
    })
}

fn serve(stream: TcpStream, state: &Mutex<State>, base: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let request = read_request(&mut reader)?;
    state.lock().unwrap().requests.push(request.clone());
    let response = route(&request, &mut state.lock().unwrap(), base);
    let mut out = stream;
    let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", response.status);
    head.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    let end = response.cut_at.unwrap_or(response.body.len());
    out.write_all(&response.body[..end])?;
    out.flush()?;
    out.shutdown(std::net::Shutdown::Both)
}

/// `org/name` and the rest of a path after `prefix`.
fn split_repo<'a>(path: &'a str, prefix: &str) -> Option<(String, &'a str)> {
    let rest = path.strip_prefix(prefix)?;
    let mut parts = rest.splitn(3, '/');
    let org = parts.next()?;
    let name = parts.next()?;
    Some((format!("{org}/{name}"), parts.next().unwrap_or("")))
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn commit_of(repo: &Repo, revision: &str) -> Option<String> {
    if repo.commits.contains_key(revision) {
        return Some(revision.to_string());
    }
    repo.branches.get(revision).cloned()
}

fn route(request: &Recorded, state: &mut State, base: &str) -> Response {
    let path = request.path.as_str();
    match request.method.as_str() {
        "GET" if path.starts_with("/api/models/") => revision_info(path, state),
        "GET" if path.starts_with("/cdn/") => {
            let oid = &path["/cdn/".len()..];
            match state.lfs.get(oid) {
                Some(bytes) => {
                    let mut response = Response::new(200, bytes.clone());
                    if state.truncated.contains(oid) {
                        response.cut_at = Some(bytes.len() / 2);
                    }
                    response
                }
                None => Response::new(404, "no such object"),
            }
        }
        "GET" => resolve(path, state, base),
        "POST" if path == "/api/repos/create" => create_repo(request, state),
        "POST" if path.contains("/preupload/") => preupload(request, state),
        "POST" if path.ends_with(".git/info/lfs/objects/batch") => lfs_batch(request, base),
        "PUT" if path.starts_with("/lfs-upload/") => {
            let oid = &path["/lfs-upload/".len()..];
            if sha256_hex(&request.body) != oid {
                return Response::new(400, "content does not match oid");
            }
            state.lfs.insert(oid.to_string(), request.body.clone());
            Response::new(200, "")
        }
        "POST" if path.starts_with("/lfs-verify/") => {
            let oid = &path["/lfs-verify/".len()..];
            Response::new(
                if state.lfs.contains_key(oid) {
                    200
                } else {
                    404
                },
                "",
            )
        }
        "POST" if path.contains("/commit/") => commit(request, state),
        _ => Response::new(405, "unsupported"),
    }
}

fn revision_info(path: &str, state: &State) -> Response {
    let Some((id, rest)) = split_repo(path, "/api/models/") else {
        return Response::new(400, "bad path");
    };
    let Some(revision) = rest.strip_prefix("revision/") else {
        return Response::new(400, "bad path");
    };
    let revision = decode(revision);
    let Some(repo) = state.repos.get(&id) else {
        return Response::error(404, "RepoNotFound", "Repository not found");
    };
    let Some(commit) = commit_of(repo, &revision) else {
        return Response::error(
            404,
            "RevisionNotFound",
            &format!("Invalid rev id: {revision}"),
        );
    };
    let siblings: Vec<_> = repo.commits[&commit]
        .keys()
        .map(|f| serde_json::json!({ "rfilename": f }))
        .collect();
    Response::json(
        200,
        serde_json::json!({"id": id, "sha": commit, "siblings": siblings}),
    )
}

fn resolve(path: &str, state: &mut State, base: &str) -> Response {
    let Some((id, rest)) = split_repo(path, "/") else {
        return Response::new(404, "");
    };
    let Some((revision, file)) = rest
        .strip_prefix("resolve/")
        .and_then(|r| r.split_once('/'))
    else {
        return Response::new(404, "");
    };
    let (revision, file) = (decode(revision), decode(file));
    if state.gated.contains(&id) {
        return Response::error(
            403,
            "GatedRepo",
            &format!("Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in."),
        );
    }
    let Some(repo) = state.repos.get(&id) else {
        return Response::error(404, "RepoNotFound", "Repository not found");
    };
    let Some(commit) = commit_of(repo, &revision) else {
        return Response::error(404, "RevisionNotFound", "Invalid rev id");
    };
    let listed = repo.commits[&commit].get(&file).cloned();
    let Some(bytes) = listed.filter(|_| !state.hidden.contains(&file)) else {
        return Response::error(404, "EntryNotFound", &format!("{file} does not exist"));
    };
    let oid = sha256_hex(&bytes);
    if file.ends_with(".safetensors") {
        if state.truncated.contains(&file) {
            state.truncated.insert(oid.clone());
        }
        state.lfs.insert(oid.clone(), bytes.clone());
        return Response::new(302, "")
            .header("Location", &format!("{base}/cdn/{oid}"))
            .header("X-Repo-Commit", &commit)
            .header("X-Linked-Etag", &format!("\"{oid}\""))
            .header("X-Linked-Size", &bytes.len().to_string());
    }
    let mut response = Response::new(200, bytes.clone())
        .header("X-Repo-Commit", &commit)
        .header("ETag", &format!("\"{}\"", &oid[..40]));
    if state.truncated.contains(&file) {
        response.cut_at = Some(bytes.len() / 2);
    }
    response
}

fn create_repo(request: &Recorded, state: &mut State) -> Response {
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
    let id = format!(
        "{}/{}",
        body["organization"].as_str().unwrap_or(""),
        body["name"].as_str().unwrap_or("")
    );
    if state.repos.contains_key(&id) {
        return Response::error(409, "RepoExists", "You already created this model repo");
    }
    let mut repo = Repo::default();
    let initial = "0".repeat(40);
    repo.commits.insert(initial.clone(), Files::new());
    repo.branches.insert("main".into(), initial);
    state.repos.insert(id.clone(), repo);
    Response::json(200, serde_json::json!({ "url": format!("/{id}") }))
}

fn preupload(request: &Recorded, state: &State) -> Response {
    let Some((id, _)) = split_repo(&request.path, "/api/models/") else {
        return Response::new(400, "");
    };
    if !state.repos.contains_key(&id) {
        return Response::error(404, "RepoNotFound", "Repository not found");
    }
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    let files: Vec<_> = body["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let path = f["path"].as_str().unwrap();
            let lfs = path.ends_with(".safetensors") || path.ends_with(".png");
            serde_json::json!({"path": path, "uploadMode": if lfs {"lfs"} else {"regular"}, "shouldIgnore": false})
        })
        .collect();
    Response::json(200, serde_json::json!({ "files": files }))
}

fn lfs_batch(request: &Recorded, base: &str) -> Response {
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    let objects: Vec<_> = body["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let oid = o["oid"].as_str().unwrap();
            serde_json::json!({"oid": oid, "size": o["size"], "actions": {
                "upload": {"href": format!("{base}/lfs-upload/{oid}"), "header": {"x-amz-test": "1"}},
                "verify": {"href": format!("{base}/lfs-verify/{oid}")},
            }})
        })
        .collect();
    Response::json(
        200,
        serde_json::json!({"transfer": "basic", "objects": objects}),
    )
    .header("Content-Type", "application/vnd.git-lfs+json")
}

fn commit(request: &Recorded, state: &mut State) -> Response {
    let Some((id, rest)) = split_repo(&request.path, "/api/models/") else {
        return Response::new(400, "");
    };
    let branch = decode(rest.strip_prefix("commit/").unwrap_or("main"));
    let engine = base64::engine::general_purpose::STANDARD;
    state.commit_counter += 1;
    let commit_id = format!("{:040x}", 0xc0ffee_u64 + state.commit_counter);
    let lfs = state.lfs.clone();
    let Some(repo) = state.repos.get_mut(&id) else {
        return Response::error(404, "RepoNotFound", "Repository not found");
    };
    let mut files = repo
        .branches
        .get(&branch)
        .and_then(|c| repo.commits.get(c))
        .cloned()
        .unwrap_or_default();
    for line in String::from_utf8(request.body.clone()).unwrap().lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        let value = &entry["value"];
        match entry["key"].as_str().unwrap() {
            "header" => {}
            "file" => {
                let bytes = engine.decode(value["content"].as_str().unwrap()).unwrap();
                files.insert(value["path"].as_str().unwrap().to_string(), bytes);
            }
            "lfsFile" => {
                let oid = value["oid"].as_str().unwrap();
                let Some(bytes) = lfs.get(oid) else {
                    return Response::error(
                        400,
                        "BadRequest",
                        &format!("LFS object {oid} was never uploaded"),
                    );
                };
                files.insert(value["path"].as_str().unwrap().to_string(), bytes.clone());
            }
            other => return Response::error(400, "BadRequest", &format!("unknown key {other}")),
        }
    }
    repo.commits.insert(commit_id.clone(), files);
    repo.branches.insert(branch, commit_id.clone());
    Response::json(
        200,
        serde_json::json!({"commitUrl": format!("/{id}/commit/{commit_id}"), "commitOid": commit_id}),
    )
}
