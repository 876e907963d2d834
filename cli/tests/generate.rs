//! `rfid-moe generate`: greedy output equals the library's, text streams as the tokenizer
//! decodes it, sampling is reproducible, and what cannot run well is refused clearly.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device};
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::generate::{generate, GenerateOptions, Sampling};
use rfid_moe::models::Model;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rfid-moe"))
        .args(args)
        .output()
        .unwrap()
}

fn succeed(args: &[&str]) -> Output {
    let output = run(args);
    assert!(
        output.status.success(),
        "rfid-moe {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn ids_of(output: &Output) -> Vec<u32> {
    serde_json::from_slice(&output.stdout).unwrap()
}

const PROMPT: &str = "The compressed checkpoint";

#[test]
fn greedy_ids_and_streamed_text_match_the_library() {
    let model_dir = common::mini_model();
    let model = model_dir.to_str().unwrap();
    let common_args = [
        "generate",
        "--model",
        model,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "24",
        "--ignore-eos",
    ];
    let ids = ids_of(&succeed(&[&common_args[..], &["--ids"]].concat()));

    let tokenizer = rfid_moe::text::load_tokenizer(&model_dir).unwrap();
    let prompt = tokenizer.encode(PROMPT, true).unwrap().get_ids().to_vec();
    let checkpoint = Checkpoint::open(&model_dir).unwrap();
    let loaded = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 24,
        sampling: Sampling::greedy(),
        stop_tokens: Vec::new(),
    };
    let expected = generate(&loaded, &prompt, &options, &mut |_| Ok(true)).unwrap();
    assert_eq!(ids, expected.tokens);
    assert_eq!(ids.len(), 24);

    let text = succeed(&common_args);
    let streamed = String::from_utf8(text.stdout).unwrap();
    assert_eq!(
        streamed.trim_end_matches('\n'),
        tokenizer.decode(&ids, true).unwrap()
    );
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn sampling_is_reproducible_by_seed_and_stops_at_stop_tokens() {
    let model_dir = common::mini_model();
    let sample = |seed: &str, extra: &[&str]| {
        let args = [
            &[
                "generate",
                "--model",
                model_dir.to_str().unwrap(),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "16",
                "--ignore-eos",
                "--temperature",
                "1.0",
                "--top-p",
                "0.95",
                "--seed",
                seed,
                "--ids",
            ][..],
            extra,
        ]
        .concat();
        ids_of(&succeed(&args))
    };
    let first = sample("1", &[]);
    assert_eq!(first, sample("1", &[]), "same seed, same tokens");
    let others: Vec<Vec<u32>> = ["2", "3", "4"].iter().map(|s| sample(s, &[])).collect();
    assert!(
        others.iter().any(|o| *o != first),
        "different seeds never changed the sample"
    );
    // Stopping at the fourth sampled token keeps it as the last one.
    let stop = first[3].to_string();
    let stopped = sample("1", &["--stop-token", &stop]);
    let at = first.iter().position(|t| t.to_string() == stop).unwrap();
    assert_eq!(stopped, first[..=at].to_vec());
}

#[test]
fn chat_without_a_template_and_bad_sampling_are_refused() {
    let model_dir = common::mini_model();
    let model = model_dir.to_str().unwrap();
    let output = run(&["generate", "--model", model, "--prompt", "hi", "--chat"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("chat template"), "{stderr}");
    let output = run(&[
        "generate", "--model", model, "--prompt", "hi", "--top-p", "2",
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("top-p"));
}

#[test]
fn chat_uses_the_models_template() {
    let (_tmp, dir) = copy_mini_model();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({
            "eos_token": "<|endoftext|>",
            "chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
        })
        .to_string(),
    )
    .unwrap();
    let model = dir.to_str().unwrap();
    let chat = |extra: &[&str]| {
        let args = [
            &[
                "generate",
                "--model",
                model,
                "--prompt",
                "hello",
                "--max-new-tokens",
                "8",
                "--ignore-eos",
                "--ids",
            ][..],
            extra,
        ]
        .concat();
        ids_of(&succeed(&args))
    };
    let with_template = chat(&["--chat", "--system", "be brief"]);
    // The same ids as the rendered text given as a plain prompt (the mini tokenizer adds no
    // special tokens, so the two encodings agree).
    let rendered = "system: be brief\nuser: hello\nassistant:";
    let plain = chat_plain(model, rendered);
    assert_eq!(with_template, plain);
}

fn chat_plain(model: &str, prompt: &str) -> Vec<u32> {
    ids_of(&succeed(&[
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--ids",
    ]))
}

fn copy_mini_model() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(common::mini_model()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn compress(model: &Path, out: &Path, residual: &str) {
    succeed(&[
        "compress",
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--calibration",
        model.join("calibration.txt").to_str().unwrap(),
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--preset",
        "paper",
        "--ratio",
        "0.5",
        "--residual",
        residual,
        "--out",
        out.to_str().unwrap(),
    ]);
}

#[test]
fn compressed_models_generate_and_a_residual_needs_consent() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::mini_model();
    let plain = tmp.path().join("plain");
    compress(&model, &plain, "off");
    let generated = |dir: &Path, extra: &[&str]| {
        let args = [
            &[
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "8",
                "--ids",
            ][..],
            extra,
        ]
        .concat();
        run(&args)
    };
    let output = generated(&plain, &[]);
    assert!(output.status.success());
    assert!(!ids_of(&output).is_empty());

    let residual = tmp.path().join("residual");
    compress(&model, &residual, "on");
    let output = generated(&residual, &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("residual") && stderr.contains("--expand-residual"),
        "{stderr}"
    );
    let output = generated(&residual, &["--expand-residual"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `generate --ids` of the bundled model with prompt arguments `prompt_args` and `stdin`.
fn ids_with(prompt_args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let model = common::mini_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rfid-moe"))
        .args(["generate", "--model", model.to_str().unwrap()])
        .args(prompt_args)
        .args(["--max-new-tokens", "6", "--ignore-eos", "--ids"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A run refused before it reads stdin closes the pipe first: that is not this test's error.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

#[test]
fn prompts_may_start_with_a_hyphen_and_come_from_a_file_or_stdin() {
    let prompt = "--ours:: a prompt that looks like a flag";
    let given = ids_with(&["--prompt", prompt], "");
    assert!(
        given.status.success(),
        "{}",
        String::from_utf8_lossy(&given.stderr)
    );
    let tokenizer = rfid_moe::text::load_tokenizer(&common::mini_model()).unwrap();
    let prompt_ids = tokenizer.encode(prompt, true).unwrap().get_ids().to_vec();
    let checkpoint = Checkpoint::open(common::mini_model()).unwrap();
    let loaded = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 6,
        sampling: Sampling::greedy(),
        stop_tokens: Vec::new(),
    };
    let expected = generate(&loaded, &prompt_ids, &options, &mut |_| Ok(true)).unwrap();
    assert_eq!(ids_of(&given), expected.tokens);

    let from_stdin = ids_with(&["--prompt-file", "-"], prompt);
    assert!(from_stdin.status.success());
    assert_eq!(ids_of(&from_stdin), expected.tokens);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompt.txt");
    std::fs::write(&file, prompt).unwrap();
    let from_file = ids_with(&["--prompt-file", file.to_str().unwrap()], "");
    assert!(from_file.status.success());
    assert_eq!(ids_of(&from_file), expected.tokens);
}

#[test]
fn a_prompt_is_required_once() {
    let both = ids_with(&["--prompt", "hi", "--prompt-file", "-"], "hi");
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert_eq!(both.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--prompt")
            && stderr.contains("--prompt-file")
            && stderr.contains("cannot be used with"),
        "{stderr}"
    );
    let neither = ids_with(&[], "");
    let stderr = String::from_utf8_lossy(&neither.stderr);
    assert!(
        !neither.status.success() && neither.stdout.is_empty(),
        "{stderr}"
    );
    assert!(
        stderr.contains("no prompt: give --prompt TEXT, or --prompt-file PATH"),
        "{stderr}"
    );
    let missing = ids_with(&["--prompt-file", "/nonexistent/prompt.txt"], "");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("/nonexistent/prompt.txt"),
        "{stderr}"
    );
}
