//! `--matrices gate,up,down`: down_proj factored with an output-side shared basis on every
//! fixture family: the budget covers the three matrices, the checkpoint holds what the format
//! says, it runs, and it computes exactly what its dense export computes.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use rfid_moe::checkpoint::experts::ExpertMatrix;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::models::ArchConfig;
use rfid_moe::pipeline::methods::lowrank::FactorizerKind;
use rfid_moe::pipeline::CompressOptions;

use common::FAMILIES;

fn calibration_file(dir: &Path) -> PathBuf {
    let path = dir.join("calibration.safetensors");
    common::random_token_windows(&path, 256, 16, 32, 0x1234_5678_9abc_def0)
}

/// The fixtures' small options with gate, up and down factored.
fn options(model: &Path, calibration: &Path, out: &Path, ratio: f64) -> CompressOptions {
    let mut options = common::small_compress_options(model, calibration, out, ratio);
    options.budget.matrices = ExpertMatrix::ALL.to_vec();
    options
}

fn logits(dir: &Path, source: &Path) -> candle_core::Tensor {
    let reference =
        rfid_moe::checkpoint::load_all(&source.join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    common::logits_of(dir, &reference["input_ids"])
}

/// Σ over MoE layers of the routed experts' parameters of one matrix type (n·p·d).
fn one_matrix_parameters(source: &Path) -> u64 {
    let spec = ArchConfig::from_checkpoint(&Checkpoint::open(source).unwrap())
        .unwrap()
        .spec();
    spec.moe_layers
        .iter()
        .flatten()
        .map(|l| (l.num_experts * l.intermediate_size * l.hidden_size) as u64)
        .sum()
}

/// The checkpoint's down_proj tensors of `layer` agree with its record: factored members have
/// `lowrank_c` [K, p] and no weight, each factored group a basis [d, K], dense ones a weight.
fn check_down_tensors(out: &Path, layer: usize) -> usize {
    let checkpoint = Checkpoint::open(out).unwrap();
    let spec = ArchConfig::from_checkpoint(&checkpoint).unwrap().spec();
    let layout = spec.moe_layers[layer].as_ref().unwrap();
    let (d, p) = (layout.hidden_size, layout.intermediate_size);
    let record = rfid_moe::models::compression_record(&checkpoint)
        .unwrap()
        .unwrap();
    let name = layout.name(ExpertMatrix::Down);
    let groups = &record.layer(layer).unwrap().matrices[name].groups;
    let shape = |tensor: String| checkpoint.info(&tensor).map(|(info, _)| info.shape.clone());
    let mut factored = 0;
    for (g, group) in groups.iter().enumerate() {
        let basis = format!("{}.expert_groups.{g}.{name}.basis", layout.block);
        match group.dense {
            true => assert_eq!(shape(basis), None),
            false => assert_eq!(shape(basis), Some(vec![d, group.rank])),
        }
        for &expert in &group.experts {
            let c = format!("{}.experts.{expert}.{name}.lowrank_c", layout.block);
            let weight = layout.dense_name(expert, ExpertMatrix::Down);
            if group.dense {
                assert_eq!(shape(c), None);
                assert_eq!(shape(weight), Some(vec![d, p]));
            } else {
                assert_eq!(shape(c), Some(vec![group.rank, p]));
                assert_eq!(shape(weight.clone()), None, "{weight} of a factored group");
                factored += 1;
            }
        }
    }
    factored
}

#[test]
fn every_family_compresses_down_proj_within_budget_and_matches_its_dense_export() {
    for family in FAMILIES {
        let source = common::fixture(family);
        let tmp = tempfile::tempdir().unwrap();
        let calibration = calibration_file(tmp.path());
        let out = tmp.path().join("factored");
        let dense = tmp.path().join("dense");
        let ratio = 0.4;
        let mut opts = options(&source, &calibration, &out, ratio);
        common::lowrank_settings(&mut opts, |s| s.factor_dtype = "f32".into());
        opts.output.export_dense = Some(dense.clone());
        let report = rfid_moe::compress(&opts).unwrap();

        // The budget covers gate, up and down: 3·n·p·d per MoE layer, (1 − ρ) of it kept.
        assert_eq!(
            report.targeted_parameters_before,
            3 * one_matrix_parameters(&source),
            "{family}"
        );
        assert!(
            (report.targeted_reduction - ratio).abs() <= 0.005,
            "{family}: reduction {}",
            report.targeted_reduction
        );
        assert!((report.routed_expert_reduction - report.targeted_reduction).abs() < 1e-12);
        let layer = &report.layers[0];
        assert!(layer.matrices.keys().any(|m| m == "down_proj" || m == "w2"));
        let down_groups = layer
            .matrices
            .iter()
            .find(|(m, _)| *m == "down_proj" || *m == "w2")
            .unwrap()
            .1;
        assert!(down_groups.iter().any(|g| !g.dense), "{family}");
        assert!(down_groups
            .iter()
            .filter(|g| !g.dense)
            .all(|g| g.activation_error.is_some_and(|e| e > 0.0 && e < 1.0)));

        // The checkpoint's parameters shrink by exactly what the report says, all in the
        // routed experts.
        common::assert_routed_parameters_saved(
            &source,
            &out,
            report.targeted_parameters_before - report.targeted_parameters_after,
            family,
        );
        assert!(check_down_tensors(&out, layer.layer) > 0, "{family}");

        // The dense export has the original's names and shapes, and the same function.
        let original = Checkpoint::open(&source).unwrap();
        let exported = Checkpoint::open(&dense).unwrap();
        let mut names = original.tensor_names();
        let mut exported_names = exported.tensor_names();
        names.sort();
        exported_names.sort();
        assert_eq!(names, exported_names, "{family}");
        let (factored_logits, dense_logits) = (logits(&out, &source), logits(&dense, &source));
        let diff = common::max_abs_diff(&factored_logits, &dense_logits);
        assert!(
            diff <= 1e-4,
            "{family}: factored vs dense export differ by {diff}"
        );
        let from_original = common::max_abs_diff(&factored_logits, &logits(&source, &source));
        assert!(
            from_original > 1e-3 && from_original.is_finite(),
            "{family}: {from_original}"
        );
    }
}

#[test]
fn down_proj_alone_leaves_gate_and_up_dense() {
    let source = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path());
    let out = tmp.path().join("down-only");
    let mut opts = options(&source, &calibration, &out, 0.3);
    opts.budget.matrices = vec![ExpertMatrix::Down];
    let report = rfid_moe::compress(&opts).unwrap();
    assert_eq!(
        report.targeted_parameters_before,
        one_matrix_parameters(&source)
    );
    assert!((report.targeted_reduction - 0.3).abs() <= 0.01);
    assert!(report.table().contains("targeted (down) parameters"));
    for layer in &report.layers {
        assert_eq!(layer.matrices.keys().collect::<Vec<_>>(), ["down_proj"]);
    }
    let text = std::fs::read_to_string(out.join("compress.toml")).unwrap();
    assert!(text.contains("matrices = [\"down\"]"), "{text}");
    let inputs = rfid_moe::model_card::CardInputs {
        repo_id: None,
        eval_report: None,
        charts: Vec::new(),
    };
    let card = rfid_moe::model_card::render_model_card(&out, &inputs).unwrap();
    assert!(
        card.contains("experts' down projections compressed"),
        "{card}"
    );
    let diff = common::max_abs_diff(&logits(&out, &source), &logits(&source, &source));
    assert!(diff > 1e-4 && diff.is_finite(), "{diff}");
}

#[test]
fn unsupported_combinations_with_down_are_refused() {
    let source = common::fixture("tiny-olmoe");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path());
    let out = tmp.path().join("refused");
    let refused = |edit: &dyn Fn(&mut CompressOptions), what: &str| {
        let mut opts = options(&source, &calibration, &out, 0.4);
        edit(&mut opts);
        let message = rfid_moe::compress(&opts).unwrap_err().to_string();
        assert!(
            message.contains("--matrices") && message.contains(what),
            "{message}"
        );
        assert!(!out.exists());
    };
    refused(
        &|o| common::lowrank_settings(o, |s| s.factorizer = FactorizerKind::Basis),
        "--factorizer basis",
    );
    refused(
        &|o| common::lowrank_settings(o, |s| s.residual = true),
        "--residual",
    );
    refused(
        &|o| common::lowrank_settings(o, |s| s.xi_auto = true),
        "--xi auto",
    );
    refused(
        &|o| o.calibration.statistics_cache = Some(tmp.path().join("stats.safetensors")),
        "statistics cache",
    );
    refused(
        &|o| o.budget.matrices = vec![ExpertMatrix::Up, ExpertMatrix::Up],
        "twice",
    );
    refused(&|o| o.budget.matrices.clear(), "at least one");
    // The default factors all three, the paper's preset gate and up; both are written into
    // the settings.
    let defaults = CompressOptions::default();
    assert_eq!(defaults.budget.matrices, ExpertMatrix::ALL);
    let toml = defaults.to_toml().unwrap();
    assert!(
        toml.contains("matrices = [\"gate\", \"up\", \"down\"]"),
        "{toml}"
    );
    let toml = rfid_moe::pipeline::presets::paper().to_toml().unwrap();
    assert!(toml.contains("matrices = [\"gate\", \"up\"]"), "{toml}");
}

#[test]
fn prune_plus_lowrank_with_down_spends_the_budget_over_three_matrices() {
    for (family, experts) in [("tiny-qwen3_moe", 16), ("tiny-mixtral", 8)] {
        let source = common::fixture(family);
        let tmp = tempfile::tempdir().unwrap();
        let calibration = calibration_file(tmp.path());
        let out = tmp.path().join("pruned-factored");
        let dense = tmp.path().join("dense");
        let ratio = 0.4;
        let mut opts = options(&source, &calibration, &out, ratio);
        opts.methods = vec!["prune".into(), "lowrank".into(), "keep".into()];
        common::lowrank_settings(&mut opts, |s| s.factor_dtype = "f32".into());
        opts.output.export_dense = Some(dense.clone());
        let report = rfid_moe::compress(&opts).unwrap();
        // Half of the budget prunes: round(ρ·n/2) experts (all three matrices are covered), at
        // most an eighth of them.
        let removed = (ratio * experts as f64 / 2.0)
            .min(experts as f64 / 8.0)
            .round() as usize;
        let default = rfid_moe::pipeline::methods::prune::default_removal(
            rfid_moe::pipeline::BudgetUnit::Parameters,
            ratio,
            (experts, 3),
            (4.0, None),
        );
        assert_eq!(removed as f64, default.round());
        let layer = &report.layers[0];
        let pruning = layer.pruning.as_ref().unwrap();
        assert_eq!(pruning.removed.len(), removed, "{family}");
        assert!(layer.matrices.keys().any(|m| m == "down_proj" || m == "w2"));
        // Pruning and factoring together remove ρ of the routed experts (all targeted).
        assert_eq!(
            report.targeted_parameters_before,
            3 * one_matrix_parameters(&source),
            "{family}"
        );
        assert!((report.routed_expert_reduction - report.targeted_reduction).abs() < 1e-12);
        assert!(
            (report.routed_expert_reduction - ratio).abs() <= 0.02,
            "{family}: routed reduction {}",
            report.routed_expert_reduction
        );
        let before = rfid_moe::inspect::parameter_counts(&Checkpoint::open(&source).unwrap());
        let after = rfid_moe::inspect::parameter_counts(&Checkpoint::open(&out).unwrap());
        let saved = (before.routed_experts - after.routed_experts) as f64;
        assert!(
            (saved / before.routed_experts as f64 - report.routed_expert_reduction).abs() < 1e-9,
            "{family}: saved {saved}"
        );
        let diff = common::max_abs_diff(&logits(&out, &source), &logits(&dense, &source));
        assert!(
            diff <= 1e-4,
            "{family}: factored vs dense export differ by {diff}"
        );
    }
}

#[test]
fn int8_down_factors_stay_close_to_float_factors() {
    let source = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path());
    let run = |dtype: &str| {
        let out = tmp.path().join(dtype);
        let mut opts = options(&source, &calibration, &out, 0.4);
        common::lowrank_settings(&mut opts, |s| s.factor_dtype = dtype.into());
        rfid_moe::compress(&opts).unwrap();
        out
    };
    let (float, int8) = (run("f32"), run("int8"));
    let checkpoint = Checkpoint::open(&int8).unwrap();
    let names = checkpoint.tensor_names();
    for suffix in [".down_proj.lowrank_c_scale", ".down_proj.basis_scale"] {
        assert!(names.iter().any(|n| n.ends_with(suffix)), "no {suffix}");
    }
    let original = logits(&source, &source);
    let (float_logits, int8_logits) = (logits(&float, &source), logits(&int8, &source));
    let quantisation = common::mean_abs_diff(&int8_logits, &float_logits);
    let factoring = common::mean_abs_diff(&float_logits, &original);
    assert!(
        quantisation > 0.0 && quantisation < 0.1 * factoring,
        "int8 vs f32 factors {quantisation}, f32 factors vs original {factoring}"
    );
}
