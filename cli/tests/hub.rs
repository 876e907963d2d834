//! Hub download and upload against a local Hub look-alike (`hub_server`): download then run,
//! cache reuse, offline mode, revision pinning, 404s, a gated repository, a network failure, a
//! truncated transfer, the model card of `compress`, and `upload`. Environment variables are set
//! only on the child processes.

#[path = "../../tests/common/mod.rs"]
mod common;
mod hub_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use hub_server::{sha256_hex, FakeHub, Files};

const REPO: &str = "test-org/tiny-moe";
const COMMIT_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const COMMIT_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const TOKEN: &str = "hf_test_secret_token_0123456789";

/// A fake Hub holding `test-org/tiny-moe`: commit A (`v1`) is the tiny Qwen3-MoE fixture,
/// commit B (`main`) the same with a marker key in config.json.
fn hub() -> FakeHub {
    let hub = FakeHub::start();
    let mut files = FakeHub::files_of(&common::fixture("tiny-qwen3_moe"));
    files.remove("reference.safetensors");
    hub.add_commit(REPO, "v1", COMMIT_A, files.clone());
    let mut config: serde_json::Value = serde_json::from_slice(&files["config.json"]).unwrap();
    config["rfid_test_revision"] = "B".into();
    files.insert(
        "config.json".into(),
        serde_json::to_vec_pretty(&config).unwrap(),
    );
    hub.add_commit(REPO, "main", COMMIT_B, files);
    hub
}

/// Runs the binary with the Hub environment pointing at `hub` and `home`, plus `env`.
fn rfid_moe(hub: &FakeHub, home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rfid-moe"));
    command.args(args);
    for name in [
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "XDG_CACHE_HOME",
    ] {
        command.env_remove(name);
    }
    command
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HOME", home);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn ok(output: Output) -> Output {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn failure(output: Output) -> String {
    assert!(!output.status.success(), "unexpectedly succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn file_gets(hub: &FakeHub) -> usize {
    hub.requests()
        .iter()
        .filter(|r| {
            r.method == "GET" && (r.path.contains("/resolve/") || r.path.starts_with("/cdn/"))
        })
        .count()
}

fn cache_repo(home: &Path) -> PathBuf {
    home.join("hub/models--test-org--tiny-moe")
}

/// `inspect --json` output without its `path` (which differs between a local and a Hub run).
fn inspect_json(output: &Output) -> serde_json::Value {
    let mut value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    value.as_object_mut().unwrap().remove("path");
    value
}

#[test]
fn download_runs_reuses_the_cache_and_works_offline() {
    let hub = hub();
    let home = tempfile::tempdir().unwrap();
    let local = ok(rfid_moe(
        &hub,
        home.path(),
        &[
            "inspect",
            "--json",
            common::fixture("tiny-qwen3_moe").to_str().unwrap(),
        ],
        &[],
    ));
    assert_eq!(
        hub.requests().len(),
        0,
        "a local path must not touch the Hub"
    );
    let remote = ok(rfid_moe(
        &hub,
        home.path(),
        &["inspect", "--json", REPO],
        &[],
    ));
    assert_eq!(inspect_json(&remote), inspect_json(&local));
    // config, index and two shards; each shard is a redirect plus a CDN download.
    assert_eq!(file_gets(&hub), 6);
    let repo = cache_repo(home.path());
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT_B
    );
    let shard = repo.join(format!(
        "snapshots/{COMMIT_B}/model-00001-of-00002.safetensors"
    ));
    let link = std::fs::read_link(&shard).unwrap();
    let bytes =
        std::fs::read(common::fixture("tiny-qwen3_moe").join("model-00001-of-00002.safetensors"))
            .unwrap();
    assert_eq!(link, Path::new("../../blobs").join(sha256_hex(&bytes)));
    assert_eq!(std::fs::read(&shard).unwrap(), bytes);

    let before = hub.requests().len();
    ok(rfid_moe(
        &hub,
        home.path(),
        &["inspect", "--json", REPO],
        &[],
    ));
    assert_eq!(
        file_gets(&hub),
        6,
        "a cached snapshot is not downloaded again"
    );
    assert_eq!(hub.requests().len(), before + 1, "only the revision lookup");

    let before = hub.requests().len();
    let offline = ok(rfid_moe(
        &hub,
        home.path(),
        &["inspect", "--json", REPO],
        &[("HF_HUB_OFFLINE", "1")],
    ));
    assert_eq!(inspect_json(&offline), inspect_json(&local));
    assert_eq!(
        hub.requests().len(),
        before,
        "offline mode makes no request"
    );
    let error = failure(rfid_moe(
        &hub,
        home.path(),
        &["inspect", &format!("{REPO}@v1")],
        &[("HF_HUB_OFFLINE", "1")],
    ));
    assert!(
        error.contains("offline") && error.contains("HF_HUB_OFFLINE") && error.contains("v1"),
        "{error}"
    );
    assert_eq!(hub.requests().len(), before);
}

#[test]
fn revisions_pin_their_own_content() {
    let hub = hub();
    let home = tempfile::tempdir().unwrap();
    let config_at = |commit: &str| -> serde_json::Value {
        let path = cache_repo(home.path()).join(format!("snapshots/{commit}/config.json"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    ok(rfid_moe(
        &hub,
        home.path(),
        &["inspect", &format!("{REPO}@{COMMIT_A}")],
        &[],
    ));
    assert!(config_at(COMMIT_A).get("rfid_test_revision").is_none());
    assert!(!cache_repo(home.path())
        .join(format!("snapshots/{COMMIT_B}"))
        .exists());
    ok(rfid_moe(
        &hub,
        home.path(),
        &["inspect", &format!("{REPO}@v1")],
        &[],
    ));
    assert_eq!(
        std::fs::read_to_string(cache_repo(home.path()).join("refs/v1")).unwrap(),
        COMMIT_A
    );
    ok(rfid_moe(&hub, home.path(), &["inspect", REPO], &[]));
    assert_eq!(config_at(COMMIT_B)["rfid_test_revision"], "B");
    // Shards shared by both commits are stored once.
    let blobs = std::fs::read_dir(cache_repo(home.path()).join("blobs"))
        .unwrap()
        .count();
    assert_eq!(blobs, 5, "two configs, one index, two shards");
}

#[test]
fn missing_repositories_files_gated_repos_and_dead_endpoints_fail_clearly() {
    let hub = hub();
    let home = tempfile::tempdir().unwrap();
    let error = failure(rfid_moe(
        &hub,
        home.path(),
        &["inspect", "test-org/nope"],
        &[],
    ));
    assert!(
        error.contains("404") && error.contains("repository test-org/nope not found"),
        "{error}"
    );
    assert!(
        error.contains(&hub.endpoint) && error.contains("no token was sent"),
        "{error}"
    );
    let error = failure(rfid_moe(
        &hub,
        home.path(),
        &["inspect", &format!("{REPO}@nope")],
        &[],
    ));
    assert!(error.contains("revision `nope` not found"), "{error}");

    let mut files: Files = hub.branch_files(REPO, "main").unwrap();
    files.insert("tokenizer.json".into(), b"{}".to_vec());
    hub.add_commit("test-org/hidden", "main", COMMIT_A, files.clone());
    hub.hide("tokenizer.json");
    let error = failure(rfid_moe(
        &hub,
        home.path(),
        &["inspect", "test-org/hidden"],
        &[],
    ));
    assert!(
        error.contains("file `tokenizer.json` not found in test-org/hidden@main"),
        "{error}"
    );

    hub.add_commit("test-org/gated", "main", COMMIT_A, files);
    hub.gate("test-org/gated");
    let error = failure(rfid_moe(
        &hub,
        home.path(),
        &["inspect", "test-org/gated"],
        &[("HF_TOKEN", TOKEN)],
    ));
    assert!(
        error.contains("403") && error.contains("gated") && error.contains("is restricted"),
        "{error}"
    );
    assert!(
        error.contains("does not grant access") && !error.contains(TOKEN),
        "{error}"
    );

    let dead = Command::new(env!("CARGO_BIN_EXE_rfid-moe"))
        .args(["inspect", REPO])
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let error = failure(dead);
    assert!(
        error.contains("could not reach")
            && error.contains("http://127.0.0.1:9/api/models/test-org/tiny-moe/revision/main"),
        "{error}"
    );
}

#[test]
fn a_truncated_transfer_fails_and_leaves_nothing_complete_looking() {
    let hub = hub();
    let home = tempfile::tempdir().unwrap();
    hub.truncate("model-00002-of-00002.safetensors");
    let error = failure(rfid_moe(&hub, home.path(), &["inspect", REPO], &[]));
    assert!(
        error.contains("interrupted") && error.contains("/cdn/"),
        "{error}"
    );
    let repo = cache_repo(home.path());
    let shard =
        std::fs::read(common::fixture("tiny-qwen3_moe").join("model-00002-of-00002.safetensors"))
            .unwrap();
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !blobs.iter().any(|b| b.contains(&sha256_hex(&shard))),
        "{blobs:?}"
    );
    assert!(
        !blobs.iter().any(|b| b.ends_with(".incomplete")),
        "{blobs:?}"
    );
    assert!(!repo
        .join(format!(
            "snapshots/{COMMIT_B}/model-00002-of-00002.safetensors"
        ))
        .exists());
    assert!(
        !repo.join("refs/main").exists(),
        "an incomplete snapshot is not recorded"
    );
    let error = failure(rfid_moe(
        &hub,
        home.path(),
        &["inspect", REPO],
        &[("HF_HUB_OFFLINE", "1")],
    ));
    assert!(error.contains("offline"), "{error}");
}

/// Compresses the Hub model into `out` (quick settings).
fn compress_from_hub(hub: &FakeHub, home: &Path, work: &Path) -> PathBuf {
    let ids: Vec<i64> = (0..8 * 16).map(|i| (i * 31 % 256) as i64).collect();
    let calibration = work.join("calibration.safetensors");
    common::write_input_ids(
        &calibration,
        candle_core::Tensor::from_vec(ids, (8, 16), &Device::Cpu).unwrap(),
    );
    let out = work.join("compressed");
    ok(rfid_moe(
        hub,
        home,
        &[
            "compress",
            "--quiet",
            "--samples",
            "8",
            "--seq-len",
            "16",
            "--model",
            REPO,
            "--calibration",
            calibration.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    ));
    out
}

#[test]
fn compress_writes_a_card_and_upload_commits_everything() {
    let hub = hub();
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = compress_from_hub(&hub, home.path(), work.path());
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nbase_model: test-org/tiny-moe\n"),
        "{card}"
    );
    assert!(
        card.contains("library_name: rfid-moe") && card.contains("| ratio"),
        "{card}"
    );
    assert!(
        card.contains("rfid-moe generate --model ORG/NAME"),
        "{card}"
    );

    let target = "test-org/tiny-moe-rfid";
    let error = failure(rfid_moe(
        &hub,
        home.path(),
        &["upload", out.to_str().unwrap(), target],
        &[],
    ));
    assert!(error.contains("HF_TOKEN"), "{error}");
    let staging = work.path().join(".compressed.partial-4242");
    std::fs::create_dir(&staging).unwrap();
    let error = failure(rfid_moe(
        &hub,
        home.path(),
        &["upload", staging.to_str().unwrap(), target],
        &[("HF_TOKEN", TOKEN)],
    ));
    assert!(error.contains("staging directory"), "{error}");
    let error = failure(rfid_moe(
        &hub,
        home.path(),
        &["upload", out.to_str().unwrap(), target],
        &[("HF_TOKEN", TOKEN)],
    ));
    assert!(
        error.contains("404") && error.contains("test-org/tiny-moe-rfid"),
        "{error}"
    );

    let eval = work.path().join("eval.json");
    std::fs::write(&eval, serde_json::json!({
        "model": "x", "reference": "y", "options": {"seq_len": 16},
        "perplexity": [], "multiple_choice": [],
        "divergence": [{"dataset": "/data/test.txt", "windows": 2, "tokens": 30, "mean_kl": 0.0123,
            "median_kl": 0.01, "p99_kl": 0.05, "max_kl": 0.1, "top1_agreement": 0.9375,
            "reference": {"perplexity": 12.5}, "candidate": {"perplexity": 13.25}}],
        "seconds": 1.0
    }).to_string()).unwrap();
    let requests_before = hub.requests().len();
    let output = ok(rfid_moe(
        &hub,
        home.path(),
        &[
            "upload",
            out.to_str().unwrap(),
            target,
            "--create",
            "--quiet",
            "--eval-report",
            eval.to_str().unwrap(),
        ],
        &[("HF_TOKEN", TOKEN)],
    ));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!printed.contains(TOKEN), "{printed}");
    assert!(printed.contains("uploaded"), "{printed}");

    check_upload_requests(&hub.requests()[requests_before..]);
    check_committed_files(&hub, target, &out, &card);
}

/// The upload's requests: the repository created private, every API call with the token, the
/// LFS upload with the action's headers and never the token.
fn check_upload_requests(requests: &[hub_server::Recorded]) {
    let step = |method: &str, part: &str| {
        requests
            .iter()
            .find(|r| r.method == method && r.path.contains(part))
            .unwrap_or_else(|| panic!("no {method} {part}"))
            .clone()
    };
    let create = step("POST", "/api/repos/create");
    let body: serde_json::Value = serde_json::from_slice(&create.body).unwrap();
    assert_eq!(
        (body["name"].as_str(), body["organization"].as_str()),
        (Some("tiny-moe-rfid"), Some("test-org"))
    );
    assert_eq!(body["private"], true, "private by default");
    for r in [
        create,
        step("POST", "/preupload/main"),
        step("POST", ".git/info/lfs/objects/batch"),
        step("POST", "/commit/main"),
    ] {
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{}",
            r.path
        );
    }
    let put = step("PUT", "/lfs-upload/");
    assert_eq!(
        put.headers.get("x-amz-test").map(String::as_str),
        Some("1"),
        "the action's headers are sent"
    );
    assert!(
        !put.headers.contains_key("authorization"),
        "the token never goes to the storage"
    );
}

/// Every file of `out` committed byte for byte, the card regenerated for the repository with
/// the quality table and the charts, and `out` itself unchanged.
fn check_committed_files(hub: &FakeHub, target: &str, out: &Path, card: &str) {
    let committed = hub.branch_files(target, "main").unwrap();
    for entry in std::fs::read_dir(out).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "README.md" {
            continue;
        }
        let local = std::fs::read(entry.path()).unwrap();
        assert_eq!(sha256_hex(&committed[&name]), sha256_hex(&local), "{name}");
    }
    let uploaded_card = String::from_utf8(committed["README.md"].clone()).unwrap();
    assert!(
        uploaded_card.contains("rfid-moe generate --model test-org/tiny-moe-rfid"),
        "{uploaded_card}"
    );
    assert!(uploaded_card
        .contains("from_pretrained(\"test-org/tiny-moe-rfid\", trust_remote_code=True)"));
    assert!(
        uploaded_card.contains("## Quality")
            && uploaded_card.contains("| test.txt | 12.500 | 13.250 | 0.0123 | 0.9375 |"),
        "{uploaded_card}"
    );
    assert!(
        uploaded_card.contains("![routing frequency](charts/routing_frequency.png)"),
        "{uploaded_card}"
    );
    assert_eq!(
        &committed["charts/routing_frequency.png"][..8],
        b"\x89PNG\r\n\x1a\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("README.md")).unwrap(),
        card,
        "upload leaves DIR unchanged"
    );
}
