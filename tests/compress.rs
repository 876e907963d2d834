//! The compression pipeline on the fixture models: budgets, closeness to the original, monotone
//! error in the ratio, whitening, dense export, atomic output and bounded memory.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, D};
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::models::Model;
use rfid_moe::pipeline::methods::lowrank::RankAllocation;
use rfid_moe::pipeline::{BudgetScope, CompressOptions, OutputFormat, Report};

use common::FAMILIES;

/// Deterministic pseudo-random token windows written as `input_ids` (i64 [n, seq]).
fn calibration_file(dir: &Path, vocab: u32, windows: usize, seq: usize) -> PathBuf {
    let path = dir.join("calibration.safetensors");
    common::random_token_windows(&path, vocab, windows, seq, 0x1234_5678_9abc_def0)
}

fn options(model: &Path, calibration: &Path, out: &Path, ratio: f64) -> CompressOptions {
    common::small_compress_options(model, calibration, out, ratio)
}

/// Mean per-token KL(original ‖ compressed) and max |Δlogit| on the reference inputs.
fn divergence(original: &Path, compressed: &Path) -> (f64, f32) {
    let reference =
        rfid_moe::checkpoint::load_all(&original.join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = &reference["input_ids"];
    let run = |dir: &Path| {
        let checkpoint = Checkpoint::open(dir).unwrap();
        Model::load(&checkpoint, DType::F32, &Device::Cpu)
            .unwrap()
            .forward(ids, None)
            .unwrap()
            .logits
    };
    let (p_logits, q_logits) = (run(original), run(compressed));
    let log_p = candle_nn::ops::log_softmax(&p_logits, D::Minus1).unwrap();
    let log_q = candle_nn::ops::log_softmax(&q_logits, D::Minus1).unwrap();
    let kl = (log_p.exp().unwrap() * (&log_p - &log_q).unwrap())
        .unwrap()
        .sum(D::Minus1)
        .unwrap();
    let mean_kl = kl.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    (mean_kl, common::max_abs_diff(&p_logits, &q_logits))
}

#[test]
fn every_family_meets_the_budget_and_degrades_monotonically() {
    for family in FAMILIES {
        let source = common::fixture(family);
        let tmp = tempfile::tempdir().unwrap();
        let calibration = calibration_file(tmp.path(), 256, 16, 32);
        let mut previous_kl = 0.0;
        for ratio in [0.2, 0.4, 0.6] {
            let out = tmp.path().join(format!("out-{ratio}"));
            let report = rfid_moe::compress(&options(&source, &calibration, &out, ratio)).unwrap();
            // One rank of a group costs k·p + d parameters (up to 1.2% of a layer's matrix on
            // these fixtures); rounding to the nearest total keeps the error within 0.5%.
            let tolerance = 0.005;
            assert!(
                (report.targeted_reduction - ratio).abs() <= tolerance,
                "{family} at {ratio}: reduction {}",
                report.targeted_reduction
            );
            let (kl, max_err) = divergence(&source, &out);
            println!(
                "{family} ρ={ratio}: reduction {:.4}, KL {kl:.3e}, max|Δlogit| {max_err:.3e}",
                report.targeted_reduction
            );
            assert!(kl.is_finite() && kl > 0.0, "{family}: KL {kl}");
            assert!(
                kl > previous_kl,
                "{family}: KL must grow with the ratio ({previous_kl} then {kl} at {ratio})"
            );
            previous_kl = kl;
            // The compressed checkpoint reports fewer routed-expert parameters, the rest unchanged.
            common::assert_routed_parameters_saved(
                &source,
                &out,
                report.targeted_parameters_before - report.targeted_parameters_after,
                family,
            );
        }
    }
}

fn mean_activation_error(report: &Report) -> f64 {
    let errors: Vec<f64> = report
        .layers
        .iter()
        .flat_map(|l| l.matrices.values().flatten())
        .filter_map(|g| g.activation_error)
        .collect();
    assert!(!errors.is_empty());
    errors.iter().sum::<f64>() / errors.len() as f64
}

#[test]
fn whitening_lowers_output_error_on_calibration_activations() {
    let source = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path(), 256, 16, 32);
    let mut plain = options(&source, &calibration, &tmp.path().join("plain"), 0.4);
    common::lowrank_settings(&mut plain, |s| s.whiten = false);
    let mut whitened = options(&source, &calibration, &tmp.path().join("whitened"), 0.4);
    common::lowrank_settings(&mut whitened, |s| s.whiten = true);
    let plain = rfid_moe::compress(&plain).unwrap();
    let whitened = rfid_moe::compress(&whitened).unwrap();
    let (e_plain, e_white) = (
        mean_activation_error(&plain),
        mean_activation_error(&whitened),
    );
    println!("activation error: plain {e_plain:.4}, whitened {e_white:.4}");
    assert!(e_white < e_plain);
}

#[test]
fn dense_export_matches_factored_model_and_keeps_names() {
    let source = common::fixture("tiny-mixtral");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path(), 256, 16, 32);
    let mut opts = options(&source, &calibration, &tmp.path().join("factored"), 0.4);
    common::lowrank_settings(&mut opts, |s| {
        s.factor_dtype = "f32".into();
        s.residual = true;
    });
    opts.output.export_dense = Some(tmp.path().join("dense"));
    rfid_moe::compress(&opts).unwrap();
    let original = Checkpoint::open(&source).unwrap();
    let dense = Checkpoint::open(tmp.path().join("dense")).unwrap();
    let mut names: Vec<&str> = original.tensor_names();
    let mut dense_names: Vec<&str> = dense.tensor_names();
    names.sort();
    dense_names.sort();
    assert_eq!(names, dense_names);
    for name in names {
        assert_eq!(
            original.info(name).unwrap().0.shape,
            dense.info(name).unwrap().0.shape,
            "{name}"
        );
    }
    let reference =
        rfid_moe::checkpoint::load_all(&source.join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    let logits = |dir: &Path| common::logits_of(dir, &reference["input_ids"]);
    let diff = common::max_abs_diff(
        &logits(&tmp.path().join("factored")),
        &logits(&tmp.path().join("dense")),
    );
    assert!(diff <= 1e-4, "factored vs dense export differ by {diff}");
}

#[test]
fn output_is_refused_if_it_exists_and_input_is_never_overwritten() {
    let source = common::fixture("tiny-olmoe");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path(), 256, 16, 32);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let error = rfid_moe::compress(&options(&source, &calibration, &out, 0.4))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("already exists") && error.contains("--force"),
        "{error}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );
    let error = rfid_moe::compress(&options(&source, &calibration, &source, 0.4))
        .unwrap_err()
        .to_string();
    assert!(error.contains("overwrite the input"), "{error}");
    // --force replaces a previous output, but never a directory that is not a model.
    let mut forced = options(&source, &calibration, &out, 0.4);
    forced.output.force = true;
    let error = rfid_moe::compress(&forced).unwrap_err().to_string();
    assert!(error.contains("not a model directory"), "{error}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );
    std::fs::remove_file(out.join("keep.txt")).unwrap();
    rfid_moe::compress(&forced).unwrap();
    let first = std::fs::read(out.join("compression_report.json")).unwrap();
    forced.budget.ratio = 0.5;
    rfid_moe::compress(&forced).unwrap();
    assert!(out.join("config.json").exists());
    assert_ne!(
        std::fs::read(out.join("compression_report.json")).unwrap(),
        first,
        "the previous output was replaced"
    );
    // No temporary directories are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn dry_run_writes_nothing_and_previews_the_same_ranks() {
    let source = common::fixture("tiny-deepseek_v2");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path(), 256, 16, 32);
    let mut dry = options(&source, &calibration, &tmp.path().join("dry"), 0.4);
    dry.output.dry_run = true;
    let preview = rfid_moe::compress(&dry).unwrap();
    assert!(!tmp.path().join("dry").exists());
    let real = rfid_moe::compress(&options(
        &source,
        &calibration,
        &tmp.path().join("real"),
        0.4,
    ))
    .unwrap();
    let ranks = |r: &Report| -> Vec<usize> {
        r.layers
            .iter()
            .flat_map(|l| l.matrices.values().flatten().map(|g| g.rank))
            .collect()
    };
    assert_eq!(ranks(&preview), ranks(&real));
    assert!(preview.table().contains("targeted (gate+up) parameters"));
}

#[test]
fn routing_counts_sum_to_tokens_times_top_k() {
    let source = common::fixture("tiny-qwen2_moe");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path(), 256, 16, 32);
    let mut dry = options(&source, &calibration, &tmp.path().join("x"), 0.4);
    dry.output.dry_run = true;
    let report = rfid_moe::compress(&dry).unwrap();
    for layer in &report.layers {
        let total: u64 = layer.routing_counts.iter().sum();
        assert_eq!(total, 16 * 32 * 2, "layer {}", layer.layer);
        let frequency_sum: f64 = layer.frequencies.iter().sum();
        assert!((frequency_sum - 1.0).abs() < 1e-9);
        // Every stage is timed, and the stages account for no more than the whole run.
        let stages = layer.stage_seconds;
        assert!(stages.calibrate > 0.0 && stages.offer > 0.0, "{stages:?}");
        assert!(stages.total() <= report.seconds, "{stages:?}");
    }
}

#[test]
fn allocation_policies_spend_the_same_budget() {
    let source = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path(), 256, 16, 32);
    for allocation in [
        RankAllocation::Uniform,
        RankAllocation::Frequency,
        RankAllocation::Density,
        RankAllocation::Rfid,
    ] {
        let mut opts = options(&source, &calibration, &tmp.path().join("x"), 0.4);
        common::lowrank_settings(&mut opts, |s| s.allocation = allocation);
        opts.output.dry_run = true;
        let report = rfid_moe::compress(&opts).unwrap();
        assert!(
            (report.targeted_reduction - 0.4).abs() <= 0.005,
            "{allocation:?}: {}",
            report.targeted_reduction
        );
    }
}

#[test]
fn cached_statistics_reproduce_the_same_compression() {
    let source = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path(), 256, 16, 32);
    let cache = tmp.path().join("stats.safetensors");
    let mut first = options(&source, &calibration, &tmp.path().join("a"), 0.4);
    first.calibration.statistics_cache = Some(cache.clone());
    let a = rfid_moe::compress(&first).unwrap();
    assert!(cache.exists());
    let mut second = options(&source, &calibration, &tmp.path().join("b"), 0.4);
    second.calibration.statistics_cache = Some(cache.clone());
    let b = rfid_moe::compress(&second).unwrap();
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        assert_eq!(la.routing_counts, lb.routing_counts);
        for (ga, gb) in la
            .matrices
            .values()
            .flatten()
            .zip(lb.matrices.values().flatten())
        {
            assert_eq!(ga.rank, gb.rank);
            assert!((ga.relative_error - gb.relative_error).abs() < 1e-9);
        }
    }
    // Different calibration data must not reuse the cache.
    let other = calibration_file(&tmp.path().join("other").tap_mkdir(), 256, 8, 32);
    let mut third = options(&source, &other, &tmp.path().join("c"), 0.4);
    third.calibration.samples = 8;
    third.calibration.statistics_cache = Some(cache);
    let c = rfid_moe::compress(&third).unwrap();
    let total: u64 = c.layers[0].routing_counts.iter().sum();
    assert_eq!(total, 8 * 32 * 4);
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn model_scope_budget_is_met_across_layers() {
    let source = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path(), 256, 16, 32);
    let mut opts = options(&source, &calibration, &tmp.path().join("model-scope"), 0.4);
    opts.budget.scope = BudgetScope::Model;
    let progress = common::ProgressRecorder::default();
    let report = rfid_moe::compress_with_progress(&opts, &progress).unwrap();
    // Both passes report every decoder layer.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(source.join("config.json")).unwrap()).unwrap();
    let layers = config["num_hidden_layers"].as_u64().unwrap();
    assert_eq!(
        progress.completed_tasks(),
        [
            ("planning".to_string(), layers),
            ("layers".to_string(), layers)
        ]
    );
    // One budget for all layers: the granularity is one rank of one group over the whole model.
    assert!(
        (report.targeted_reduction - 0.4).abs() <= 0.005f64.max(report.rank_granularity),
        "{}",
        report.targeted_reduction
    );
    let per_layer: Vec<u64> = report
        .layers
        .iter()
        .map(|l| {
            l.matrices["gate_proj"]
                .iter()
                .map(|g| g.parameters_after)
                .sum()
        })
        .collect();
    println!("gate_proj parameters after, per layer: {per_layer:?}");
    let (divergence_kl, _) = divergence(&source, &tmp.path().join("model-scope"));
    assert!(divergence_kl.is_finite());
    // The output loads and runs like any other compressed checkpoint (divergence() ran it).
}

#[test]
fn ratio_zero_is_a_plain_conversion_without_calibration() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::mini_model();
    let input = Checkpoint::open(&model).unwrap();
    let ids = common::mini_ids();
    let original = common::logits_of(&model, &ids);
    for format in [OutputFormat::Safetensors, OutputFormat::Gguf] {
        let out = tmp.path().join(format.to_string());
        // No calibration file at all: nothing is calibrated.
        let mut options = common::small_default_options(&model, Path::new(""), &out, 0.0);
        options.set_format(format);
        let report = rfid_moe::compress(&options).unwrap();
        assert_eq!(report.calibration_tokens, 0, "{format}");
        assert_eq!(
            common::max_abs_diff(&original, &common::logits_of(&out, &ids)),
            0.0,
            "{format}"
        );
        if format == OutputFormat::Safetensors {
            let output = Checkpoint::open(&out).unwrap();
            let mut names = output.tensor_names();
            names.sort();
            let mut expected = input.tensor_names();
            expected.sort();
            assert_eq!(names, expected);
            for name in &expected {
                assert!(input.raw_bytes(name) == output.raw_bytes(name), "{name}");
            }
        }
    }
    // Quantising every expert (no method keeps them as stored) changes the model at ratio 0.
    let out = tmp.path().join("quantised");
    let mut options =
        common::small_default_options(&model, &model.join("calibration.txt"), &out, 0.0);
    options.methods = vec!["quantise".into()];
    let report = rfid_moe::compress(&options).unwrap();
    assert!(report.calibration_tokens > 0);
    assert!(common::max_abs_diff(&original, &common::logits_of(&out, &ids)) > 0.0);
    // Removing a fraction of the experts changes the model at any ratio: that needs calibration.
    let mut options =
        common::small_default_options(&model, Path::new(""), &tmp.path().join("pruned"), 0.0);
    common::prune_settings(&mut options, |s| s.fraction = Some(0.125));
    let error = rfid_moe::compress(&options).unwrap_err().to_string();
    assert!(error.contains("--calibration is required"), "{error}");
    assert!(!tmp.path().join("pruned").exists());
}

#[test]
fn automatic_group_size_is_one_expert_where_the_grams_fit_and_is_saved_resolved() {
    let source = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration_file(tmp.path(), 256, 16, 32);
    let run = |name: &str, paper: bool| {
        let out = tmp.path().join(name);
        let mut opts = match paper {
            true => options(&source, &calibration, &out, 0.4),
            false => common::small_default_options(&source, &calibration, &out, 0.4),
        };
        opts.methods = vec!["lowrank".into(), "keep".into()];
        let report = rfid_moe::compress(&opts).unwrap();
        let sizes: Vec<usize> = report
            .layers
            .iter()
            .flat_map(|l| l.matrices.values().flatten().map(|g| g.experts.len()))
            .collect();
        let saved = std::fs::read_to_string(out.join("compress.toml")).unwrap();
        (sizes, saved)
    };
    let (sizes, saved) = run("auto", false);
    assert!(
        !sizes.is_empty() && sizes.iter().all(|&k| k == 1),
        "{sizes:?}"
    );
    assert!(saved.contains("group_size = 1\n"), "{saved}");
    let (sizes, saved) = run("paper", true);
    assert!(sizes.contains(&4), "{sizes:?}");
    assert!(saved.contains("group_size = 4\n"), "{saved}");
}
