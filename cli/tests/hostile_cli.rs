//! Hostile inputs through the `rfid-moe` binary, one test per class. Each refused
//! run must exit non-zero without panicking, name the culprit on stderr, leave its output path
//! absent and every input byte-identical.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rfid-moe"))
}

fn run(args: &[&Path]) -> Output {
    binary().args(args).output().unwrap()
}

/// Arguments as paths (flags included), so that paths and flags mix in one list.
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(AsRef::<Path>::as_ref(&$a)),*] };
}

/// Asserts a clean refusal: non-zero exit, no panic, one stderr naming every `culprit`.
fn assert_refused(output: &Output, culprits: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    println!("{stderr}");
    assert!(!output.status.success(), "must fail: {stderr}");
    assert_ne!(output.status.code(), Some(101), "panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    for culprit in culprits {
        assert!(
            stderr.contains(culprit),
            "stderr should name `{culprit}`: {stderr}"
        );
    }
    stderr
}

/// A writable copy of the bundled model (with tokenizer) in a fresh temporary directory.
fn mini_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mini");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(common::mini_model()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn small_compress<'a>(model: &'a Path, calibration: &'a Path, out: &'a Path) -> Vec<&'a Path> {
    const FLAGS: [&str; 7] = [
        "compress",
        "--quiet",
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--model",
    ];
    let mut args: Vec<&Path> = FLAGS.iter().map(Path::new).collect();
    args.extend([
        model,
        Path::new("--calibration"),
        calibration,
        Path::new("--out"),
        out,
    ]);
    args
}

// ---- 1. inputs destroyed -------------------------------------------------------------------

#[test]
fn compress_out_that_contains_the_model_is_refused_with_force() {
    let (tmp, model) = mini_copy();
    let before = common::snapshot(tmp.path());
    let calibration = model.join("calibration.txt");
    let mut args = small_compress(&model, &calibration, tmp.path());
    args.push(Path::new("--force"));
    assert_refused(&run(&args), &["--out", "contains the input --model"]);
    assert_eq!(common::snapshot(tmp.path()), before, "nothing may change");
}

#[test]
fn compress_export_dense_equal_to_the_model_is_refused_with_force() {
    let (tmp, model) = mini_copy();
    let before = common::snapshot(&model);
    let calibration = model.join("calibration.txt");
    let out = tmp.path().join("out");
    let mut args = small_compress(&model, &calibration, &out);
    args.extend([Path::new("--export-dense"), &model, Path::new("--force")]);
    assert_refused(&run(&args), &["--export-dense", "is the input --model"]);
    assert_eq!(common::snapshot(&model), before);
    assert!(!out.exists());
}

#[test]
fn json_and_logits_outputs_pointing_at_inputs_are_refused() {
    let (tmp, model) = mini_copy();
    // Text files outside the model, so that the file itself is the input that is hit.
    let (text, calibration) = (
        tmp.path().join("test.txt"),
        tmp.path().join("calibration.txt"),
    );
    std::fs::copy(model.join("test.txt"), &text).unwrap();
    std::fs::copy(model.join("calibration.txt"), &calibration).unwrap();
    let before = common::snapshot(tmp.path());
    let out = tmp.path().join("out");
    let mut compress = small_compress(&model, &calibration, &out);
    compress.extend([Path::new("--json"), &calibration]);
    assert_refused(&run(&compress), &["--json", "is the input --calibration"]);
    assert!(!out.exists());
    let eval = run(args![
        "eval", "--model", model, "--text", text, "--json", text
    ]);
    assert_refused(&eval, &["--json", "is the input --text"]);
    let work = tmp.path().join("work");
    let sweep = run(args![
        "sweep",
        "--model",
        model,
        "--calibration",
        calibration,
        "--text",
        text,
        "--work-dir",
        work,
        "--json",
        text
    ]);
    assert_refused(&sweep, &["--json", "is the input --text"]);
    assert!(!work.exists());
    let tokens = tmp.path().join("tokens.safetensors");
    common::write_input_ids(&tokens, Tensor::new(&[[1i64, 2, 3]], &Device::Cpu).unwrap());
    let tokens_before = std::fs::read(&tokens).unwrap();
    let logits = run(args![
        "logits", "--model", model, "--tokens", tokens, "--out", tokens
    ]);
    assert_refused(&logits, &["--out", "is the input --tokens"]);
    assert_eq!(std::fs::read(&tokens).unwrap(), tokens_before);
    let into_model = run(args![
        "logits",
        "--model",
        model,
        "--tokens",
        tokens,
        "--out",
        model.join("config.json")
    ]);
    assert_refused(&into_model, &["sits inside the input --model"]);
    std::fs::remove_file(&tokens).unwrap();
    assert_eq!(common::snapshot(tmp.path()), before);
}

// ---- 3. reads outside the model ------------------------------------------------------------

#[test]
fn index_entries_with_parent_paths_are_refused_by_every_command() {
    let (tmp, dir) = common::copy_fixture("tiny-qwen3_moe");
    std::fs::copy(
        dir.join("model-00002-of-00002.safetensors"),
        tmp.path().join("outside.safetensors"),
    )
    .unwrap();
    let index_path = dir.join("model.safetensors.index.json");
    let index = std::fs::read_to_string(&index_path)
        .unwrap()
        .replace("model-00002-of-00002.safetensors", "../outside.safetensors");
    std::fs::write(&index_path, index).unwrap();
    let before = common::snapshot(tmp.path());
    let culprits = [
        "model.safetensors.index.json",
        "../outside.safetensors",
        "weight_map entry for tensor",
    ];
    assert_refused(&run(args!["inspect", dir]), &culprits);
    let out = tmp.path().join("logits.safetensors");
    let logits = run(args![
        "logits",
        "--model",
        dir,
        "--tokens",
        dir.join("reference.safetensors"),
        "--out",
        out
    ]);
    assert_refused(&logits, &culprits);
    assert!(!out.exists());
    assert_eq!(common::snapshot(tmp.path()), before);
}

// ---- 4. accepted silently and 5. token ids -------------------------------------------------

#[test]
fn duplicate_tensor_names_are_refused_by_inspect() {
    let (_tmp, dir) = common::copy_fixture("tiny-mixtral");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let (header, _) = common::read_safetensors_raw(&path);
    let entry = serde_json::to_string(&header["model.norm.weight"]).unwrap();
    let text = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end();
    let text = format!(
        "{},\"model.norm.weight\":{entry}}}",
        &text[..text.len() - 1]
    );
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    assert_refused(
        &run(args!["inspect", dir]),
        &[
            "model.safetensors",
            "`model.norm.weight` appears more than once",
        ],
    );
}

#[test]
fn logits_refuses_float_negative_and_out_of_vocabulary_token_ids() {
    let dir = common::fixture("tiny-mixtral");
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(Tensor, &str); 3] = [
        (
            Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap(),
            "dtype F32",
        ),
        (
            Tensor::new(&[[1i64, 2, -7]], &Device::Cpu).unwrap(),
            "token id -7 at [0, 2]",
        ),
        (
            Tensor::new(&[[1i64], [1 << 32]], &Device::Cpu).unwrap(),
            "token id 4294967296 at [1, 0]",
        ),
    ];
    for (ids, expected) in cases {
        let tokens = tmp.path().join("ids.safetensors");
        common::write_input_ids(&tokens, ids);
        let out = tmp.path().join("logits.safetensors");
        let output = run(args![
            "logits", "--model", dir, "--tokens", tokens, "--out", out
        ]);
        assert_refused(&output, &["ids.safetensors", "input_ids", expected]);
        assert!(!out.exists());
    }
}

// ---- 6. non-finite weights -----------------------------------------------------------------

#[test]
fn nan_weights_make_logits_eval_and_compress_fail_naming_the_tensor() {
    let (tmp, model) = mini_copy();
    let name = "model.layers.2.mlp.experts.5.down_proj.weight";
    let path = model.join("model.safetensors");
    let (header, mut data) = common::read_safetensors_raw(&path);
    assert_eq!(header[name]["dtype"], "BF16");
    let begin = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    data[begin..begin + 2].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    common::write_safetensors_raw(&path, &header, &data);
    let before = common::snapshot(&model);
    let culprits = [name, "NaN", "expected finite values"];
    let tokens = tmp.path().join("ids.safetensors");
    common::write_input_ids(&tokens, Tensor::new(&[[1i64, 2, 3]], &Device::Cpu).unwrap());
    let out = tmp.path().join("out");
    let logits = run(args![
        "logits", "--model", model, "--tokens", tokens, "--out", out
    ]);
    assert_refused(&logits, &culprits);
    let json = tmp.path().join("eval.json");
    let eval = run(args![
        "eval",
        "--model",
        model,
        "--text",
        model.join("test.txt"),
        "--seq-len",
        "64",
        "--max-windows",
        "1",
        "--quiet",
        "--json",
        json
    ]);
    assert_refused(&eval, &culprits);
    let calibration = model.join("calibration.txt");
    assert_refused(&run(&small_compress(&model, &calibration, &out)), &culprits);
    assert!(!out.exists() && !json.exists());
    assert_eq!(common::staging_leftovers(&out), Vec::<String>::new());
    assert_eq!(common::snapshot(&model), before);
}

// ---- 7. panics and aborts ------------------------------------------------------------------

#[test]
fn zero_attention_heads_and_absurd_expert_counts_fail_without_panicking() {
    for (key, value, expected) in [
        ("num_attention_heads", 0u64, "num_attention_heads = 0"),
        (
            "num_local_experts",
            1_000_000_000_000,
            "= 1000000000000 is out of range",
        ),
    ] {
        let (tmp, dir) = common::copy_fixture("tiny-qwen3_moe");
        common::edit_config(&dir, |c| c[key] = value.into());
        let out = tmp.path().join("out");
        let tokens = dir.join("reference.safetensors");
        let logits = run(args![
            "logits", "--model", dir, "--tokens", tokens, "--out", out
        ]);
        assert_refused(&logits, &["config.json", expected]);
        let compress = run(&small_compress(&dir, &tokens, &out));
        assert_refused(&compress, &["config.json", expected]);
        assert!(!out.exists());
        assert_eq!(common::hidden_entries(tmp.path()), Vec::<String>::new());
    }
}

/// Runs `args`, killing the process if it has not finished within `limit`.
#[test]
fn compress_on_cuda_without_cuda_support_is_refused_not_run_on_the_cpu() {
    if candle_core::utils::cuda_is_available() {
        return; // this build can run on CUDA: nothing to refuse
    }
    let (tmp, model) = mini_copy();
    let before = common::snapshot(tmp.path());
    let calibration = model.join("calibration.txt");
    let out = tmp.path().join("out");
    let mut args = small_compress(&model, &calibration, &out);
    args.extend([Path::new("--device"), Path::new("cuda")]);
    assert_refused(&run(&args), &["cuda", "--features cuda"]);
    assert!(!out.exists());
    assert_eq!(common::snapshot(tmp.path()), before);
}

fn run_with_deadline(args: &[&Path], limit: Duration) -> Output {
    let mut child = binary()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("rfid-moe {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[cfg(unix)]
#[test]
fn dev_zero_as_text_fails_at_once_instead_of_reading_forever() {
    let (tmp, model) = mini_copy();
    let zero = Path::new("/dev/zero");
    let out = tmp.path().join("out");
    let limit = Duration::from_secs(60);
    let compress = run_with_deadline(&small_compress(&model, zero, &out), limit);
    assert_refused(&compress, &["/dev/zero", "not a regular file"]);
    let eval = run_with_deadline(args!["eval", "--model", model, "--text", zero], limit);
    assert_refused(&eval, &["/dev/zero", "not a regular file"]);
    assert!(!out.exists());
}

// ---- 8. leftovers --------------------------------------------------------------------------

/// Starts a compress of the bundled model long enough to be interrupted, waits for its staging
/// directory (a pause before the first layer is finished keeps it from finishing one), sends
/// `signal`, and checks the exit code and that nothing is left behind (no layer was finished,
/// so nothing is worth resuming; `cli/tests/resume.rs` covers interruptions after one).
#[cfg(unix)]
fn interrupt_compress(signal: libc::c_int, expected_code: i32) {
    let (tmp, model) = mini_copy();
    let before = common::snapshot(&model);
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = work.join("out");
    let calibration = model.join("calibration.txt");
    let mut args = small_compress(&model, &calibration, &out);
    args[3] = Path::new("64"); // --samples
    args[5] = Path::new("256"); // --seq-len
    let mut child = binary()
        .args(&args)
        .env("RFID_MOE_FAULT_INJECT", "pause-ms:20000@calibrated:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let staging = work.join(".out.partial");
    let started = Instant::now();
    while !staging.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "compress finished before it could be interrupted"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no staging directory"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: sends a signal to the child we spawned.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(expected_code), "{status:?}");
    assert_eq!(common::hidden_entries(&work), Vec::<String>::new());
    assert!(!out.exists());
    assert_eq!(common::snapshot(&model), before);
}

#[cfg(unix)]
#[test]
fn sigterm_mid_compress_removes_the_staging_directory_and_exits_143() {
    interrupt_compress(libc::SIGTERM, 143);
}

#[cfg(unix)]
#[test]
fn sigint_mid_compress_removes_the_staging_directory_and_exits_130() {
    interrupt_compress(libc::SIGINT, 130);
}

#[cfg(target_os = "linux")]
#[test]
fn a_stale_staging_directory_of_a_dead_run_is_removed_by_the_next_run() {
    let (tmp, model) = common::copy_fixture("tiny-olmoe");
    let stale = tmp.path().join(".out.partial-999999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("shard-00001.safetensors"), [0u8; 128]).unwrap();
    let tokens = tmp.path().join("ids.safetensors");
    let ids: Vec<i64> = (0..4 * 64).map(|i| (i * 7 % 256) as i64).collect();
    common::write_input_ids(
        &tokens,
        Tensor::from_vec(ids, (4, 64), &Device::Cpu).unwrap(),
    );
    let out = tmp.path().join("out");
    let output = run(&small_compress(&model, &tokens, &out));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(out.join("config.json").exists());
    assert!(
        !stale.exists(),
        "the dead run's staging directory must be removed"
    );
    assert_eq!(common::hidden_entries(tmp.path()), Vec::<String>::new());
}

// ---- 9. silently wrong results and leftovers ----------------------------------------------

/// `eval` of `model` on one window of its test text; the JSON report goes to `json`.
fn eval_once(model: &Path, json: &Path) -> Output {
    run(args![
        "eval",
        "--model",
        model,
        "--text",
        common::mini_model().join("test.txt"),
        "--seq-len",
        "64",
        "--max-windows",
        "1",
        "--quiet",
        "--json",
        json
    ])
}

#[test]
fn a_negative_rope_theta_is_refused_by_eval_and_compress_without_output() {
    let (tmp, model) = mini_copy();
    common::edit_config(&model, |c| {
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rope_theta"] = (-5.0).into();
    });
    let before = common::snapshot(&model);
    let culprits = ["config.json", "`rope_theta` = -5 is out of range"];
    let json = tmp.path().join("eval.json");
    assert_refused(&eval_once(&model, &json), &culprits);
    let out = tmp.path().join("out");
    let calibration = model.join("calibration.txt");
    assert_refused(&run(&small_compress(&model, &calibration, &out)), &culprits);
    assert!(!out.exists() && !json.exists());
    assert_eq!(common::staging_leftovers(&out), Vec::<String>::new());
    assert_eq!(common::snapshot(&model), before);
}

/// A compressed copy of the bundled model (int8 factors, the default method) at `tmp/name`.
fn compressed_mini(tmp: &Path, model: &Path, name: &str) -> PathBuf {
    let out = tmp.join(name);
    let calibration = model.join("calibration.txt");
    let output = run(&small_compress(model, &calibration, &out));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// Sets every scale of the int8 tensors of `dir` named by `pick` to `value`.
fn set_scales(dir: &Path, pick: impl Fn(&str) -> bool, value: f32) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let (header, mut data) = common::read_safetensors_raw(&path);
        for (name, info) in header.as_object().unwrap() {
            let Some(matrix) = name.strip_suffix("_scale").filter(|m| pick(m)) else {
                continue;
            };
            assert_eq!(header[matrix]["dtype"], "I8", "{matrix}");
            let [begin, end] = [0, 1].map(|i| info["data_offsets"][i].as_u64().unwrap() as usize);
            for chunk in data[begin..end].chunks_exact_mut(4) {
                chunk.copy_from_slice(&value.to_le_bytes());
            }
        }
        common::write_safetensors_raw(&path, &header, &data);
    }
}

#[test]
fn bad_int8_scales_never_give_a_perplexity() {
    let (tmp, model) = mini_copy();
    let out = compressed_mini(tmp.path(), &model, "out");
    let config = common::read_config(&out);
    assert_eq!(config["compression"]["factor_storage"], "int8-row128");
    // Layer 1's gate projections, whichever experts the window routes to.
    let pick = |name: &str| name.starts_with("model.layers.1.") && name.contains("gate_proj");
    let json = tmp.path().join("eval.json");
    for (value, culprits) in [
        (
            0.0f32,
            vec![
                "model.layers.1.",
                "gate_proj",
                "hold 0 at row 0",
                "expected positive scales",
            ],
        ),
        (
            -1.0,
            vec![
                "model.layers.1.",
                "gate_proj",
                "hold -1 at row 0",
                "expected positive scales",
            ],
        ),
        (
            1e30,
            vec![
                "model.layers.1.",
                "gate_proj",
                "hold 1000000000000000000000000000000 at row 0",
            ],
        ),
    ] {
        let copy = tmp.path().join("bad");
        let _ = std::fs::remove_dir_all(&copy);
        common::copy_dir(&out, &copy);
        set_scales(&copy, pick, value);
        let stderr = assert_refused(&eval_once(&copy, &json), &culprits);
        assert!(!stderr.contains("PPL") && !json.exists(), "{stderr}");
    }
}

#[test]
fn weights_that_overflow_give_an_error_naming_the_layer_not_a_perplexity() {
    let (tmp, model) = mini_copy();
    let name = "model.layers.2.input_layernorm.weight";
    let path = model.join("model.safetensors");
    let (header, mut data) = common::read_safetensors_raw(&path);
    assert_eq!(header[name]["dtype"], "BF16");
    let begin = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    for element in 0..4 {
        let at = begin + 2 * element;
        data[at..at + 2].copy_from_slice(&half::bf16::from_f32(3e38).to_le_bytes());
    }
    common::write_safetensors_raw(&path, &header, &data);
    let json = tmp.path().join("eval.json");
    let culprits = [
        "logits hold",
        "expected finite values",
        "decoder layer 2 (`model.layers.2.*`)",
    ];
    let stderr = assert_refused(&eval_once(&model, &json), &culprits);
    assert!(!stderr.contains("PPL") && !json.exists(), "{stderr}");
    let tokens = tmp.path().join("ids.safetensors");
    common::write_input_ids(&tokens, Tensor::new(&[[1i64, 2, 3]], &Device::Cpu).unwrap());
    let out = tmp.path().join("logits.safetensors");
    let logits = run(args![
        "logits", "--model", model, "--tokens", tokens, "--out", out
    ]);
    assert_refused(&logits, &culprits);
    assert!(!out.exists());
    assert_eq!(write_leftovers(&out), Vec::<String>::new());
    let generate = run(args![
        "generate",
        "--model",
        model,
        "--prompt",
        "The",
        "--max-new-tokens",
        "2",
        "--ids"
    ]);
    assert_refused(&generate, &culprits);
    assert!(generate.stdout.is_empty());
}

/// Leftovers of a write of `out` next to it: its staging entries and the temporaries of any
/// writer (`.tmpXXXXXX`).
fn write_leftovers(out: &Path) -> Vec<String> {
    let mut left = common::staging_leftovers(out);
    left.extend(
        common::hidden_entries(out.parent().unwrap())
            .into_iter()
            .filter(|n| n.starts_with(".tmp")),
    );
    left
}

#[cfg(unix)]
#[test]
fn a_killed_logits_write_leaves_nothing_and_the_next_run_cleans_up() {
    let (tmp, model) = mini_copy();
    let tokens = tmp.path().join("ids.safetensors");
    common::write_input_ids(
        &tokens,
        Tensor::new(&[[1i64, 2, 3, 4]], &Device::Cpu).unwrap(),
    );
    let reference = tmp.path().join("reference.safetensors");
    let logits = |out: &Path| -> Vec<PathBuf> {
        let flags = ["logits", "--model", "--tokens", "--out"].map(PathBuf::from);
        let [command, model_flag, tokens_flag, out_flag] = flags;
        vec![
            command,
            model_flag,
            model.clone(),
            tokens_flag,
            tokens.clone(),
            out_flag,
            out.into(),
        ]
    };
    let run_logits = |out: &Path| binary().args(logits(out)).output().unwrap();
    assert!(run_logits(&reference).status.success());
    let out_dir = tmp.path().join("logits");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("out.safetensors");
    for (signal, code) in [
        (libc::SIGTERM, Some(143)),
        (libc::SIGINT, Some(130)),
        (libc::SIGKILL, None),
    ] {
        let mut child = binary()
            .args(logits(&out))
            .env(
                "RFID_MOE_FAULT_INJECT",
                "pause-ms:20000@tmp-written:out.safetensors",
            )
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        // The whole output is written into its temporary before the pause.
        let written = |dir: &Path| {
            common::hidden_entries(dir)
                .iter()
                .any(|n| dir.join(n).join("out.safetensors").is_file())
        };
        while !written(&out_dir) {
            assert!(child.try_wait().unwrap().is_none(), "logits ended early");
            assert!(started.elapsed() < Duration::from_secs(120), "no temporary");
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: sends a signal to the child we spawned.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(!out.exists());
        match code {
            Some(_) => assert_eq!(write_leftovers(&out), Vec::<String>::new()),
            // Nothing runs on SIGKILL: the next writer of the output removes the temporary.
            None => assert_eq!(write_leftovers(&out).len(), 1),
        }
    }
    assert!(run_logits(&out).status.success());
    assert_eq!(write_leftovers(&out), Vec::<String>::new());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&reference).unwrap()
    );
}

/// Every file of directory `dir` with a hash of its bytes.
fn files_of(dir: &Path) -> std::collections::BTreeMap<String, u64> {
    use std::hash::{Hash, Hasher};
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(e.path()).unwrap().hash(&mut hasher);
            (
                e.file_name().to_string_lossy().into_owned(),
                hasher.finish(),
            )
        })
        .collect()
}

#[cfg(unix)]
#[test]
fn a_force_run_killed_before_its_model_card_leaves_the_old_output_whole() {
    use std::os::unix::process::ExitStatusExt;
    let (tmp, model) = mini_copy();
    let out = tmp.path().join("out");
    let calibration = model.join("calibration.txt");
    let mut args = small_compress(&model, &calibration, &out);
    args.push(Path::new("--force"));
    let first = run(&args);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let uninterrupted = files_of(&out);
    assert!(uninterrupted.contains_key("README.md"));
    let killed = binary()
        .args(&args)
        .env("RFID_MOE_FAULT_INJECT", "finish:card")
        .output()
        .unwrap();
    assert_eq!(killed.status.signal(), Some(libc::SIGABRT), "{killed:?}");
    assert_eq!(files_of(&out), uninterrupted, "the old output stays whole");
    // The same command finishes the replacement: complete, card included, nothing left over.
    let output = run(&args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(files_of(&out), uninterrupted);
    assert_eq!(common::staging_leftovers(&out), Vec::<String>::new());
}

/// Rewrites the JSON file `path` through `edit`.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
}

#[test]
fn plot_refuses_ranks_that_contradict_the_weights() {
    let (tmp, model) = mini_copy();
    let out = tmp.path().join("out");
    let calibration = model.join("calibration.txt");
    let mut args = small_compress(&model, &calibration, &out);
    args.extend(["--preset", "paper"].map(Path::new));
    assert!(run(&args).status.success());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("compression_report.json")).unwrap())
            .unwrap();
    let group = &report["layers"][1]["matrices"]["gate_proj"][1];
    let rank = group["rank"].as_u64().unwrap();
    assert!(rank > 1 && group["dense"] == false, "{group}");
    let charts = tmp.path().join("charts");
    let plot = || run(args!["plot", "--compressed", out, "--out", charts]);
    // The report alone says another rank.
    edit_json(&out.join("compression_report.json"), |r| {
        r["layers"][1]["matrices"]["gate_proj"][1]["rank"] = (rank - 1).into();
    });
    let expected = format!(
        "layer 1 `gate_proj` group 1 is reported with rank {}",
        rank - 1
    );
    assert_refused(
        &plot(),
        &[
            &expected,
            "config.json records rank",
            "contradicts the weights",
        ],
    );
    assert!(!charts.exists());
    // The report and config.json agree, the stored basis does not.
    edit_json(&out.join("config.json"), |c| {
        let layers = c["compression"]["layers"].as_array_mut().unwrap();
        let layer = layers.iter_mut().find(|l| l["layer"] == 1).unwrap();
        layer["matrices"]["gate_proj"]["groups"][1]["rank"] = (rank - 1).into();
    });
    let basis = "model.layers.1.mlp.expert_groups.1.gate_proj.basis";
    let expected = format!("rank {}", rank - 1);
    assert_refused(&plot(), &[basis, &format!("shape [{rank}, "), &expected]);
    assert!(!charts.exists());
}

// ---- 10. messages that name the real cause -------------------------------------------------

#[test]
fn calibration_sizes_the_text_cannot_give_and_a_zero_batch_are_refused_by_name() {
    let (tmp, model) = mini_copy();
    let out = tmp.path().join("out");
    let calibration = model.join("calibration.txt");
    let mut many = small_compress(&model, &calibration, &out);
    many[3] = Path::new("100000"); // --samples
    assert_refused(
        &run(&many),
        &[
            "calibration.txt",
            "fewer than --samples 100000",
            "lower --samples",
        ],
    );
    let mut zero_batch = small_compress(&model, &calibration, &out);
    zero_batch.extend(["--batch-size", "0"].map(Path::new));
    assert_refused(&run(&zero_batch), &["--batch-size must be at least 1"]);
    assert!(!out.exists());
    assert_eq!(common::staging_leftovers(&out), Vec::<String>::new());
}

#[test]
fn sweep_with_zero_samples_fails_before_evaluating_anything() {
    let (tmp, model) = mini_copy();
    let work = tmp.path().join("work");
    let started = Instant::now();
    let output = run(args![
        "sweep",
        "--quiet",
        "--model",
        model,
        "--calibration",
        model.join("calibration.txt"),
        "--text",
        model.join("test.txt"),
        "--work-dir",
        work,
        "--samples",
        "0"
    ]);
    assert_refused(&output, &["--samples must be ≥ 1"]);
    assert!(!work.exists(), "nothing was evaluated or written");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_missing_local_path_shaped_like_a_hub_id_says_both() {
    let tmp = tempfile::tempdir().unwrap();
    let output = binary()
        .args(["inspect", "no-such-org/no-such-model"])
        .current_dir(tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmp.path().join("hf"))
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert_refused(
        &output,
        &[
            "no-such-org/no-such-model: no such local file or directory",
            "as a Hub repository id",
        ],
    );
}
