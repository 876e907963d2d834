//! A compression split into units (`compress --plan`, `--unit N`, `--solve`, `--merge`) through
//! the `rfid-moe` binary: the merged output equals a single-process run's byte for byte (the
//! bundled model with a model-wide and a per-layer budget and with the paper's method and its
//! held-out windows, a fused-expert and a DeepSeek fixture), whatever order the units run in
//! and after a unit is killed in either wave; a step of other options, a damaged input and an
//! unfinished unit are refused by name.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A writable copy of a model, the compress arguments for it and the output path.
struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    args: Vec<String>,
    out: PathBuf,
}

impl Setup {
    /// The bundled model with its calibration text (4 layers, a few windows).
    fn bundled() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let model = root.join("mini");
        common::copy_dir(&common::mini_model(), &model);
        let calibration = model.join("calibration.txt");
        Self::with_model(tmp, &model, &calibration)
    }

    /// A fixture model (made by `make`, given the temporary root) calibrated on random tokens.
    fn fixture(make: impl FnOnce(&Path) -> PathBuf) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let model = make(tmp.path());
        let vocab = common::read_config(&model)["vocab_size"].as_u64().unwrap() as u32;
        let calibration = common::random_token_windows(
            &tmp.path().join("calibration.safetensors"),
            vocab,
            8,
            32,
            7,
        );
        Self::with_model(tmp, &model, &calibration)
    }

    fn with_model(tmp: tempfile::TempDir, model: &Path, calibration: &Path) -> Self {
        let root = tmp.path().to_path_buf();
        let args = [
            "compress",
            "--quiet",
            "--samples",
            "8",
            "--seq-len",
            "32",
            "--model",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            model.display().to_string(),
            "--calibration".into(),
            calibration.display().to_string(),
            "--out".into(),
            root.join("out").display().to_string(),
        ])
        .collect();
        Self {
            out: root.join("out"),
            root,
            args,
            _tmp: tmp,
        }
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rfid-moe"));
        command
            .args(&self.args)
            .args(extra)
            .env_remove("RFID_MOE_FAULT_INJECT");
        command
    }

    fn run(&self, extra: &[&str]) -> Output {
        self.command(extra).output().unwrap()
    }

    fn ok(&self, extra: &[&str]) -> Output {
        let output = self.run(extra);
        assert!(
            output.status.success(),
            "{extra:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn refused(&self, extra: &[&str]) -> String {
        let output = self.run(extra);
        assert!(!output.status.success(), "{extra:?} was not refused");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// A single-process run of `extra`, moved aside so that the split run writes the same path.
    fn reference(&self, extra: &[&str]) -> PathBuf {
        self.ok(extra);
        let reference = self.root.join("reference");
        std::fs::rename(&self.out, &reference).unwrap();
        reference
    }

    fn status(&self, extra: &[&str]) -> serde_json::Value {
        let mut with_status = extra.to_vec();
        with_status.push("--status");
        let output = self.ok(&with_status);
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Runs the split run's steps as a driver does, by `--status`, each wave's units in reverse
    /// order; returns the steps run.
    fn drive(&self, extra: &[&str]) -> Vec<String> {
        self.drive_killing_merge(extra, None)
    }

    /// [`Self::drive`], the merge killed at fault point `merge_fault` when given.
    fn drive_killing_merge(&self, extra: &[&str], merge_fault: Option<&str>) -> Vec<String> {
        let mut steps = Vec::new();
        loop {
            let status = self.status(extra);
            let next = status["next"].as_str().unwrap().to_string();
            let mut pending: Vec<u64> = status["pending"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u.as_u64().unwrap())
                .collect();
            pending.reverse();
            match next.as_str() {
                "done" => return steps,
                "offer" | "apply" => {
                    for unit in pending {
                        let unit = unit.to_string();
                        self.ok(&[extra, &["--unit", &unit]].concat());
                        steps.push(format!("{next} {unit}"));
                    }
                }
                "merge" if merge_fault.is_some() => {
                    let killed = self
                        .command(&[extra, &["--merge"]].concat())
                        .env("RFID_MOE_FAULT_INJECT", merge_fault.unwrap_or_default())
                        .output()
                        .unwrap();
                    assert!(!killed.status.success(), "the merge was not killed");
                    steps.push("merge (killed)".to_string());
                }
                step => {
                    self.ok(&[extra, &[&format!("--{step}")]].concat());
                    steps.push(step.to_string());
                }
            }
            assert!(steps.len() < 64, "the run does not converge: {steps:?}");
        }
    }
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_split_run_of_the_bundled_model_equals_one_process_byte_for_byte() {
    let setup = Setup::bundled();
    let reference = setup.reference(&[]);
    setup.ok(&["--plan", "--units", "3"]);
    let status = setup.status(&[]);
    assert_eq!(
        status["unit_layers"],
        serde_json::json!([[0, 2], [2, 3], [3, 4]])
    );
    assert_eq!(status["scope"], "model");
    // Unit 0 (layers 0–1) dies after saving layer 0's offer; its rerun keeps that offer.
    let killed = setup
        .command(&["--unit", "0"])
        .env("RFID_MOE_FAULT_INJECT", "offered:0")
        .output()
        .unwrap();
    assert!(!killed.status.success());
    let offers = setup.root.join("out.run/offers");
    let saved = modified(&offers.join("layer-00000.json"));
    assert!(!offers.join("layer-00001.json").exists());
    setup.ok(&["--unit", "0"]);
    assert_eq!(modified(&offers.join("layer-00000.json")), saved);
    assert!(offers.join("layer-00001.json").is_file());
    let steps = setup.drive(&[]);
    assert_eq!(
        steps,
        ["offer 2", "offer 1", "solve", "apply 2", "apply 1", "apply 0", "merge"]
    );
    common::assert_same_files(&reference, &setup.out);
    // The units' inputs and files are gone; the plan and the merge's record stay.
    let run = setup.root.join("out.run");
    assert_eq!(names(&run), ["merged.json", "run.json"]);
    assert_eq!(common::staging_leftovers(&setup.out), Vec::<String>::new());
    assert_eq!(setup.status(&[])["next"], "done");
    // A finished run's steps change nothing.
    setup.ok(&["--merge"]);
    setup.ok(&["--unit", "0"]);
    assert_eq!(names(&run), ["merged.json", "run.json"]);
    common::assert_same_files(&reference, &setup.out);
}

#[test]
fn a_per_layer_budget_splits_without_a_solve_and_a_killed_unit_resumes() {
    let setup = Setup::bundled();
    let layer = ["--budget-scope", "layer"];
    let reference = setup.reference(&layer);
    setup.ok(&[&layer[..], &["--plan", "--units", "2"]].concat());
    assert!(setup
        .refused(&[&layer[..], &["--solve"]].concat())
        .contains("nothing to solve"));
    // Unit 1 (layers 2–3) dies right after committing layer 2; its rerun starts from its
    // input, runs layer 2 through without statistics and keeps its shard.
    let killed = setup
        .command(&[&layer[..], &["--unit", "1"]].concat())
        .env("RFID_MOE_FAULT_INJECT", "layer-committed:2")
        .output()
        .unwrap();
    assert!(!killed.status.success());
    let status = setup.status(&layer);
    assert_eq!(status["next"], "apply");
    assert_eq!(status["pending"], serde_json::json!([0, 1]));
    let merge_early = setup.refused(&[&layer[..], &["--merge"]].concat());
    assert!(
        merge_early.contains("unit 0 (layers 0–1: 0 finished)")
            && merge_early.contains("unit 1 (layers 2–3: 1 finished)"),
        "{merge_early}"
    );
    let shard = setup
        .root
        .join("out.run/units/.unit-0001.partial/layer-00002.safetensors");
    let written = modified(&shard);
    setup.ok(&[&layer[..], &["--unit", "1"]].concat());
    assert_eq!(modified(&shard), written);
    // The merge dies after the output is in place: the run is merged, its cleanup is left to
    // the next step.
    let steps = setup.drive_killing_merge(&layer, Some("split-merged"));
    assert_eq!(steps, ["apply 0", "merge (killed)"]);
    common::assert_same_files(&reference, &setup.out);
    let run = setup.root.join("out.run");
    assert!(run.join("inputs").exists());
    setup.ok(&[&layer[..], &["--merge"]].concat());
    assert_eq!(names(&run), ["merged.json", "run.json"]);
    common::assert_same_files(&reference, &setup.out);
}

#[test]
fn the_papers_method_with_held_out_windows_splits_like_one_process() {
    // `--xi auto` carries held-out windows through every layer: the units' inputs hold them.
    let setup = Setup::bundled();
    let paper = ["--preset", "paper", "--ratio", "0.4", "--xi", "auto"];
    let reference = setup.reference(&paper);
    setup.ok(&[&paper[..], &["--plan", "--units", "2"]].concat());
    assert_eq!(setup.status(&paper)["scope"], "layer");
    let steps = setup.drive(&paper);
    assert_eq!(steps, ["apply 1", "apply 0", "merge"]);
    common::assert_same_files(&reference, &setup.out);
}

#[test]
fn a_fused_expert_fixture_and_a_deepseek_fixture_split_like_one_process() {
    let fused = Setup::fixture(|root| {
        common::fused_copy(
            &common::fixture("tiny-qwen3_moe"),
            &root.join("fused"),
            false,
        )
    });
    let deepseek = Setup::fixture(|root| {
        let model = root.join("deepseek");
        common::copy_dir(&common::fixture("tiny-deepseek_v3"), &model);
        model
    });
    for setup in [fused, deepseek] {
        let reference = setup.reference(&[]);
        setup.ok(&["--plan", "--units", "8"]);
        let layers = common::read_config(&reference)["num_hidden_layers"]
            .as_u64()
            .unwrap() as usize;
        assert_eq!(setup.status(&[])["units"], layers);
        setup.drive(&[]);
        common::assert_same_files(&reference, &setup.out);
    }
}

#[test]
fn steps_of_other_options_a_damaged_input_and_a_missing_unit_are_refused_by_name() {
    let setup = Setup::bundled();
    setup.ok(&["--plan", "--units", "2"]);
    let other = setup.refused(&["--ratio", "0.5", "--unit", "0"]);
    assert!(
        other.contains("is a split run of a different") && other.contains("budget.ratio"),
        "{other}"
    );
    assert!(setup
        .refused(&["--unit", "2"])
        .contains("there is no unit 2"));
    assert!(setup
        .refused(&["--solve"])
        .contains("units 0, 1 have not saved their offers"));
    let input = setup.root.join("out.run/inputs/unit-0001.safetensors");
    let mut bytes = std::fs::read(&input).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&input, bytes).unwrap();
    let damaged = setup.refused(&["--unit", "1"]);
    assert!(
        damaged.contains("unit-0001.safetensors is not the input the plan step wrote for unit 1"),
        "{damaged}"
    );
    assert!(setup
        .refused(&["--dry-run", "--plan"])
        .contains("a split run writes its output"));
    assert!(setup
        .refused(&["--run", "elsewhere"])
        .contains("add the step"));
    assert!(setup
        .refused(&["--plan", "--units", "3"])
        .contains("is planned in 2 units already"));
    assert!(setup
        .refused(&["--restart", "--unit", "0"])
        .contains("--restart does not apply to a split run"));
    let disagreeing = setup
        .command(&["--unit-from-env"])
        .env("RFID_MOE_UNIT", "0")
        .env("SLURM_ARRAY_TASK_ID", "1")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&disagreeing.stderr)
        .contains("RFID_MOE_UNIT=0 and SLURM_ARRAY_TASK_ID=1 name different units"));
}

#[test]
fn an_offer_of_another_run_is_not_taken() {
    let setup = Setup::bundled();
    setup.ok(&["--plan", "--units", "2"]);
    let other_run = setup.root.join("other.run").display().to_string();
    let other = ["--run", other_run.as_str(), "--ratio", "0.5"];
    setup.ok(&[&other[..], &["--plan", "--units", "2"]].concat());
    setup.ok(&[&other[..], &["--unit", "0"]].concat());
    // Layer 0's offer of the other run copied into this run: it is not this run's.
    let (from, to) = (
        setup.root.join("other.run/offers/layer-00000.json"),
        setup.root.join("out.run/offers/layer-00000.json"),
    );
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(&from, &to).unwrap();
    assert_eq!(setup.status(&[])["pending"], serde_json::json!([0, 1]));
    setup.ok(&["--unit", "0"]);
    assert_ne!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
}
