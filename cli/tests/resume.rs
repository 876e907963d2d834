//! Resume of `compress` after a kill, through the `rfid-moe` binary: runs are
//! killed at chosen points (`RFID_MOE_FAULT_INJECT` makes the library abort there, as a kill
//! would), by SIGTERM and by SIGKILL; the same command then continues from the first unfinished
//! layer and must produce an output identical to an uninterrupted run's, without redoing the
//! finished layers. A changed option, calibration text or model is refused by name.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

// A writable copy of the bundled model and an output path, with this file's commands.
use common::ModelCopy as Setup;

impl Setup {
    fn staging(&self) -> PathBuf {
        self.root.join(".out.partial")
    }

    fn journal_entry(&self, layer: usize) -> PathBuf {
        self.staging()
            .join(format!(".resume/layer-{layer:05}.json"))
    }

    /// The compress command (4 layers, a few windows: well under a second), with `extra` flags.
    fn command(&self, extra: &[&str], fault: Option<&str>) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rfid-moe"));
        command
            .args(["compress", "--quiet", "--samples", "8", "--seq-len", "64"])
            .arg("--model")
            .arg(&self.model)
            .arg("--calibration")
            .arg(self.model.join("calibration.txt"))
            .arg("--out")
            .arg(&self.out)
            .args(extra)
            .env_remove("RFID_MOE_FAULT_INJECT");
        if let Some(fault) = fault {
            command.env("RFID_MOE_FAULT_INJECT", fault);
        }
        command
    }

    fn run(&self, extra: &[&str], fault: Option<&str>) -> Output {
        self.command(extra, fault).output().unwrap()
    }

    fn spawn(&self, extra: &[&str], fault: &str) -> Child {
        self.command(extra, Some(fault))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// An uninterrupted run's output, moved aside to `reference` (the output path stays the same
    /// for every run, since compress.toml records it).
    fn reference(&self, extra: &[&str]) -> PathBuf {
        let output = self.run(extra, None);
        assert_success(&output);
        let reference = self.root.join("reference");
        std::fs::rename(&self.out, &reference).unwrap();
        reference
    }

    /// Runs with `fault` (which must abort the run), and checks the staging directory is kept.
    fn killed_at(&self, extra: &[&str], fault: &str) {
        let output = self.run(extra, Some(fault));
        assert_aborted(&output, fault);
        assert!(!self.out.exists(), "{fault}: no output may appear");
        assert!(self.staging().is_dir(), "{fault}: staging kept");
    }

    /// Device and inode of each finished layer's shard in the staging directory (None once an
    /// interrupted finish renamed it).
    fn finished_shards(&self) -> BTreeMap<usize, Option<(u64, u64)>> {
        (0..)
            .map_while(|layer| {
                let entry = std::fs::read_to_string(self.journal_entry(layer)).ok()?;
                let entry: serde_json::Value = serde_json::from_str(&entry).unwrap();
                let file = entry["shards"]["compressed"]["file"].as_str().unwrap();
                let shard = self.staging().join(file);
                Some((layer, shard.exists().then(|| inode(&shard))))
            })
            .collect()
    }
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[cfg(unix)]
fn assert_aborted(output: &Output, fault: &str) {
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGABRT),
        "{fault}: {:?} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

#[cfg(not(unix))]
fn assert_aborted(output: &Output, fault: &str) {
    assert!(!output.status.success(), "{fault}");
}

#[cfg(unix)]
fn inode(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn inode(path: &Path) -> (u64, u64) {
    (std::fs::metadata(path).unwrap().len(), 0)
}

/// Every file of `out` equals `reference`'s byte for byte (the report included: run measurements
/// such as seconds and peak memory are not written into the output).
fn assert_identical(reference: &Path, out: &Path) {
    let names = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(reference), names(out), "same files");
    for name in names(reference) {
        let (a, b) = (
            std::fs::read(reference.join(&name)).unwrap(),
            std::fs::read(out.join(&name)).unwrap(),
        );
        assert!(a == b, "{name} differs from the uninterrupted run's");
    }
}

/// Resumes (the same command, no fault) and checks: it says where it resumed, the output equals
/// `reference`, the finished layers' shards were adopted (same inodes in the output: not
/// rewritten) and nothing is left next to the output.
fn resume_and_check(setup: &Setup, extra: &[&str], reference: &Path, resumed_at: usize) {
    assert_eq!(
        setup.finished_shards().len(),
        resumed_at,
        "finished layers in the journal"
    );
    resume_and_check_after(setup, extra, reference, resumed_at, &[]);
}

/// [`resume_and_check`] where the journal holds more layers than are kept (some of its work was
/// damaged): the run must say so on stderr, naming each of `culprits`, and redo them.
fn resume_and_check_after(
    setup: &Setup,
    extra: &[&str],
    reference: &Path,
    resumed_at: usize,
    culprits: &[&str],
) {
    let mut finished = setup.finished_shards();
    finished.retain(|&layer, _| layer < resumed_at);
    let output = setup.run(extra, None);
    assert_success(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    match resumed_at {
        0 => assert!(!stdout.contains("resumed at"), "{stdout}"),
        _ => assert!(
            stdout.contains(&format!("resumed at layer {resumed_at}:")),
            "{stdout}"
        ),
    }
    for culprit in culprits {
        assert!(
            stderr.contains(culprit),
            "should name `{culprit}`: {stderr}"
        );
    }
    assert_identical(reference, &setup.out);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(setup.out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    for (layer, before) in finished {
        let Some(before) = before else {
            continue;
        };
        let name = format!("model.layers.{layer}.mlp.gate.weight");
        let file = index["weight_map"][&name].as_str().unwrap();
        assert_eq!(
            inode(&setup.out.join(file)),
            before,
            "layer {layer}'s shard must be the one the killed run wrote"
        );
    }
    assert_eq!(common::hidden_entries(&setup.root), Vec::<String>::new());
}

#[test]
fn a_run_killed_after_a_layer_resumes_at_the_next_layer_with_identical_output() {
    let setup = Setup::bundled();
    let reference = setup.reference(&[]);
    setup.killed_at(&[], "layer-committed:0");
    resume_and_check(&setup, &[], &reference, 1);
}

#[test]
fn a_run_killed_mid_layer_resumes_that_layer_with_identical_output() {
    let setup = Setup::bundled();
    let reference = setup.reference(&[]);
    // After layer 1 was factored, before its shard was written.
    setup.killed_at(&[], "factored:1");
    resume_and_check(&setup, &[], &reference, 1);
    std::fs::remove_dir_all(&setup.out).unwrap();
    // After the last layer's statistics were collected.
    setup.killed_at(&[], "calibrated:3");
    resume_and_check(&setup, &[], &reference, 3);
}

#[test]
fn a_run_killed_mid_write_resumes_with_identical_output() {
    let setup = Setup::bundled();
    let reference = setup.reference(&[]);
    // Layer 2's shard written to its temporary file, not yet renamed.
    setup.killed_at(&[], "shard-write:layer-00002");
    assert!(setup.staging().join("layer-00002.safetensors.tmp").exists());
    resume_and_check(&setup, &[], &reference, 2);
    // During finish: shards renamed to their final names, index not written yet.
    std::fs::remove_dir_all(&setup.out).unwrap();
    setup.killed_at(&[], "finish:renamed");
    assert!(setup
        .staging()
        .join("model-00002-of-00005.safetensors")
        .exists());
    resume_and_check(&setup, &[], &reference, 4);
    // During finish: everything written, the directory not yet moved into place.
    std::fs::remove_dir_all(&setup.out).unwrap();
    setup.killed_at(&[], "finish:written");
    resume_and_check(&setup, &[], &reference, 4);
}

#[test]
fn a_model_wide_budget_resumes_from_its_saved_plan_with_identical_output() {
    let setup = Setup::bundled();
    let model_scope = ["--budget-scope", "model"];
    let reference = setup.reference(&model_scope);
    setup.killed_at(&model_scope, "layer-committed:1");
    assert!(setup.staging().join(".resume/plans.json").exists());
    resume_and_check(&setup, &model_scope, &reference, 2);
}

#[test]
fn xi_auto_resumes_with_identical_output_and_reports_each_layers_choice() {
    let setup = Setup::bundled();
    let auto = ["--preset", "paper", "--xi", "auto"];
    let reference = setup.reference(&auto);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference.join("compression_report.json")).unwrap())
            .unwrap();
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    for layer in layers {
        let search = &layer["xi_search"];
        let candidates = search["candidates"].as_array().unwrap();
        assert_eq!(candidates.len(), 6, "{search}");
        // 8 windows of 64 tokens: one window held out.
        assert_eq!(search["held_out_tokens"], 64);
        let best = candidates
            .iter()
            .min_by(|a, b| {
                let error = |c: &serde_json::Value| c["output_error"].as_f64().unwrap();
                error(a).total_cmp(&error(b))
            })
            .unwrap();
        assert_eq!(search["chosen"], best["xi"], "{search}");
    }
    // Killed after layer 1 was factored: layer 1's held-out activations are recomputed.
    setup.killed_at(&auto, "factored:1");
    resume_and_check(&setup, &auto, &reference, 1);
}

#[test]
fn a_different_option_calibration_or_model_is_refused_by_name_and_restart_starts_over() {
    let setup = Setup::bundled();
    setup.killed_at(&[], "layer-committed:0");
    let refused = |extra: &[&str], culprits: &[&str]| {
        let output = setup.run(extra, None);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "must be refused: {stderr}");
        for culprit in culprits.iter().chain(&["--restart", ".out.partial"]) {
            assert!(
                stderr.contains(culprit),
                "should name `{culprit}`: {stderr}"
            );
        }
        assert!(setup.journal_entry(0).exists(), "the journal is kept");
    };
    refused(&["--ratio", "0.5"], &["option `budget.ratio` (0.4 → 0.5)"]);
    let calibration = setup.model.join("calibration.txt");
    let text = std::fs::read_to_string(&calibration).unwrap();
    std::fs::write(&calibration, text.replacen('a', "b", 50)).unwrap();
    refused(&[], &["calibration data (fingerprint"]);
    std::fs::write(&calibration, &text).unwrap();
    common::edit_config(&setup.model, |config| {
        config["rope_parameters"]["rope_theta"] = serde_json::json!(20000.0);
    });
    refused(&[], &["model file `config.json` ("]);

    let output = setup.run(&["--ratio", "0.5", "--restart"], None);
    assert_success(&output);
    assert!(!String::from_utf8_lossy(&output.stdout).contains("resumed"));
    let saved = std::fs::read_to_string(setup.out.join("compress.toml")).unwrap();
    assert!(saved.contains("ratio = 0.5"), "{saved}");
    assert!(!saved.contains("restart"), "{saved}");
    assert_eq!(common::hidden_entries(&setup.root), Vec::<String>::new());
}

/// Waits until `path` exists (the child must still be running meanwhile).
fn wait_for(child: &mut Child, path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {} appeared",
            path.display()
        );
        assert!(started.elapsed() < Duration::from_secs(120), "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(unix)]
fn send(child: &Child, signal: libc::c_int) {
    // SAFETY: sends a signal to the child we spawned.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
}

#[cfg(unix)]
#[test]
fn sigterm_stops_at_a_safe_point_says_how_to_resume_and_resuming_gives_identical_output() {
    let setup = Setup::bundled();
    let reference = setup.reference(&[]);
    // A pause after each layer is committed leaves time to signal the run mid-way.
    let mut child = setup.spawn(&[], "pause-ms:400@layer-committed:0");
    wait_for(&mut child, &setup.journal_entry(0));
    send(&child, libc::SIGTERM);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    assert!(
        stderr.contains("1 finished layer(s)")
            && stderr.contains("kept in")
            && stderr.contains("run the same command again")
            && stderr.contains("--out"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        common::hidden_entries(&setup.root),
        vec![".out.partial".to_string()],
        "the lock is released; the finished layer is kept"
    );
    resume_and_check(&setup, &[], &reference, 1);
}

#[cfg(unix)]
#[test]
fn sigint_before_any_layer_is_finished_leaves_nothing_behind() {
    let setup = Setup::bundled();
    let mut child = setup.spawn(&[], "pause-ms:20000@calibrated:0");
    wait_for(&mut child, &setup.staging().join(".resume/ends.json"));
    send(&child, libc::SIGINT);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("nothing was kept"), "{stderr}");
    assert_eq!(common::hidden_entries(&setup.root), Vec::<String>::new());
    assert!(!setup.out.exists());
}

#[cfg(unix)]
#[test]
fn sigkill_mid_run_resumes_with_identical_output_and_the_lock_keeps_a_second_run_out() {
    let setup = Setup::bundled();
    let reference = setup.reference(&[]);
    let mut child = setup.spawn(&[], "pause-ms:150");
    wait_for(&mut child, &setup.journal_entry(1));
    // While the first run holds the staging directory, the same command is refused.
    let second = setup.run(&[], None);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        stderr.contains("another rfid-moe run is writing") && stderr.contains(".out.lock"),
        "{stderr}"
    );
    send(&child, libc::SIGKILL);
    child.wait().unwrap();
    let finished = setup.finished_shards().len();
    assert!((2..=4).contains(&finished), "{finished} finished layers");
    resume_and_check(&setup, &[], &reference, finished);
}

#[test]
fn int8_factors_resume_with_identical_output() {
    let setup = Setup::bundled();
    let int8 = ["--factor-dtype", "int8"];
    let reference = setup.reference(&int8);
    setup.killed_at(&int8, "layer-committed:1");
    resume_and_check(&setup, &int8, &reference, 2);
}

#[test]
fn quantised_experts_resume_with_identical_output() {
    let setup = Setup::bundled();
    let low_bit = ["--bpw", "3"];
    let reference = setup.reference(&low_bit);
    let index = std::fs::read_to_string(reference.join("model.safetensors.index.json"))
        .or_else(|_| std::fs::read_to_string(reference.join("compression_report.json")))
        .unwrap();
    assert!(
        ["int2-", "int3-", "int4-", "q3_k", "q4_k"]
            .iter()
            .any(|s| index.contains(s)),
        "no packed matrix in the reference output"
    );
    setup.killed_at(&low_bit, "layer-committed:1");
    resume_and_check(&setup, &low_bit, &reference, 2);
}

/// Kills a run after layer 2 was committed, so that the journal holds layers 0–2.
fn three_finished_layers(setup: &Setup) {
    setup.killed_at(&[], "layer-committed:2");
    assert_eq!(setup.finished_shards().len(), 3);
}

#[test]
fn an_edited_journal_entry_is_not_trusted_and_its_layer_is_redone() {
    let setup = Setup::bundled();
    let reference = setup.reference(&[]);
    three_finished_layers(&setup);
    // Drop a tensor from layer 1's list: adopted as it stands, the index would miss it.
    let path = setup.journal_entry(1);
    let mut entry: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let names = entry["shards"]["compressed"]["names"]
        .as_array_mut()
        .unwrap();
    let removed = names.remove(0);
    std::fs::write(&path, serde_json::to_vec(&entry).unwrap()).unwrap();
    assert!(!std::fs::read_to_string(&path)
        .unwrap()
        .contains(removed.as_str().unwrap()));
    resume_and_check_after(
        &setup,
        &[],
        &reference,
        1,
        &[
            "finished layer 1",
            "layer-00001.json was changed after it was written",
            "it is recomputed with finished layer 2",
        ],
    );
}

/// Overwrites the last `count` bytes of `path` with zeros, keeping its size.
fn zero_tail(path: &Path, count: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let len = bytes.len();
    assert!(bytes[len - count..].iter().any(|&b| b != 0));
    bytes[len - count..].fill(0);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_zeroed_staged_shard_is_not_adopted_and_its_layer_is_redone() {
    let setup = Setup::bundled();
    let reference = setup.reference(&[]);
    three_finished_layers(&setup);
    zero_tail(&setup.staging().join("layer-00002.safetensors"), 64);
    resume_and_check_after(
        &setup,
        &[],
        &reference,
        2,
        &[
            "finished layer 2",
            "layer-00002.safetensors does not hold the bytes that were written",
        ],
    );
}

#[test]
fn a_truncated_staged_shard_is_redone_at_once_and_never_fails_a_rerun() {
    let setup = Setup::bundled();
    let reference = setup.reference(&[]);
    three_finished_layers(&setup);
    let shard = setup.staging().join("layer-00001.safetensors");
    let size = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let truncated = format!("is {} bytes, but {size} were written", size / 2);
    resume_and_check_after(
        &setup,
        &[],
        &reference,
        1,
        &["finished layer 1", truncated.as_str()],
    );
    // A damaged ends shard (embedding, norm, head) takes every layer with it.
    std::fs::remove_dir_all(&setup.out).unwrap();
    three_finished_layers(&setup);
    let ends = setup.staging().join("ends.safetensors");
    let size = std::fs::metadata(&ends).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ends)
        .unwrap()
        .set_len(size - 1)
        .unwrap();
    resume_and_check_after(
        &setup,
        &[],
        &reference,
        0,
        &["(ends)", "it is recomputed with finished layers 0–2"],
    );
}

#[cfg(unix)]
#[test]
fn a_second_signal_stops_at_once_and_says_so() {
    let setup = Setup::bundled();
    let reference = setup.reference(&[]);
    let mut child = setup.spawn(&[], "pause-ms:20000@layer-committed:0");
    wait_for(&mut child, &setup.journal_entry(0));
    // Two different signals, so that the second is not merged into the first (the kernel may
    // deliver them in either order).
    send(&child, libc::SIGINT);
    send(&child, libc::SIGTERM);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let second = match output.status.code() {
        Some(130) => 2,
        Some(143) => 15,
        other => panic!("{other:?}: {stderr}"),
    };
    assert!(
        stderr.contains(&format!(
            "interrupted again (signal {second}): stopping at once"
        )),
        "{stderr}"
    );
    assert!(!setup.out.exists());
    resume_and_check(&setup, &[], &reference, 1);
}
