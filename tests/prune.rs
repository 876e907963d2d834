//! Expert pruning (`--method prune`, `prune+lowrank`): the output is a normal checkpoint with
//! fewer experts whose logits equal the original model with those experts removed in memory,
//! with the right parameter count, config and report; routing constraints are checked.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rfid_moe::checkpoint::experts::ExpertMatrix;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::models::experts::DenseExpert;
use rfid_moe::models::moe::{RoutedExperts, RoutingRule};
use rfid_moe::models::{FeedForward, Model};
use rfid_moe::pipeline::methods::prune::Saliency;
use rfid_moe::pipeline::{read_layer_reports, CompressOptions, LayerReport};

/// Deterministic pseudo-random token windows written as `input_ids` (i64 [n, seq]).
fn calibration_file(dir: &Path, vocab: u32) -> PathBuf {
    let path = dir.join("calibration.safetensors");
    common::random_token_windows(&path, vocab, 16, 32, 0x0bad_5eed_1234_5678)
}

/// Removal alone (the rest kept as stored).
const PRUNE: &[&str] = &["prune", "keep"];
/// The paper's low-rank alone.
const LOWRANK: &[&str] = &["lowrank", "keep"];
/// Removal, then the paper's low-rank of the kept experts.
const PRUNE_LOWRANK: &[&str] = &["prune", "lowrank", "keep"];

/// The paper's preset (a fraction of gate's and up's parameters) with `methods`.
fn options(model: &Path, out: &Path, methods: &[&str], ratio: f64) -> CompressOptions {
    let calibration = calibration_file(out.parent().unwrap(), vocab(model));
    let mut options = CompressOptions {
        model: model.to_path_buf(),
        ..rfid_moe::pipeline::presets::paper()
    };
    options.calibration.data = calibration;
    options.calibration.samples = 16;
    options.calibration.seq_len = 32;
    options.calibration.batch_size = 4;
    options.budget.ratio = ratio;
    options.methods = methods.iter().map(|m| m.to_string()).collect();
    options
        .settings
        .retain(|name, _| methods.contains(&name.as_str()));
    options.output.out = Some(out.to_path_buf());
    options
}

fn vocab(model: &Path) -> u32 {
    let config = rfid_moe::checkpoint::read_json(&model.join("config.json")).unwrap();
    config["vocab_size"].as_u64().unwrap() as u32
}

/// The checkpoint `out` runs on `model`'s reference ids and gives finite logits.
fn assert_finite_logits(out: &Path, model: &Path) {
    let logits = common::logits_of(out, &reference_ids(model));
    let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| v.is_finite()), "{}", out.display());
}

fn reference_ids(model: &Path) -> Tensor {
    let reference =
        rfid_moe::checkpoint::load_all(&model.join("reference.safetensors"), &Device::Cpu).unwrap();
    reference["input_ids"].clone()
}

/// The original model with each report's removed experts taken out in memory: router rows (and
/// DeepSeek-V3's correction bias) cut to the kept experts, the kept experts as dense matrices.
fn pruned_in_memory(original: &Path, reports: &[LayerReport]) -> Model {
    let checkpoint = Checkpoint::open(original).unwrap();
    let mut model = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    for report in reports {
        let pruning = report.pruning.as_ref().expect("a pruned layer");
        let FeedForward::Moe(block) = &mut model.layers[report.layer].feed_forward else {
            panic!("layer {} is not a MoE layer", report.layer);
        };
        let kept: Vec<u32> = pruning.kept.iter().map(|&e| e as u32).collect();
        let index = Tensor::from_vec(kept, pruning.kept.len(), &Device::Cpu).unwrap();
        block.router.weight = block.router.weight.index_select(&index, 0).unwrap();
        if let RoutingRule::SigmoidGroupLimited {
            correction_bias, ..
        } = &mut block.router.rule
        {
            *correction_bias = correction_bias.index_select(&index, 0).unwrap();
        }
        let experts = pruning
            .kept
            .iter()
            .map(|&e| DenseExpert {
                gate: block.dense_matrix(e, ExpertMatrix::Gate).unwrap(),
                up: block.dense_matrix(e, ExpertMatrix::Up).unwrap(),
                down: block.dense_matrix(e, ExpertMatrix::Down).unwrap(),
            })
            .collect();
        block.experts = RoutedExperts::Dense(experts);
    }
    model
}

fn parameters(dir: &Path) -> u64 {
    let checkpoint = Checkpoint::open(dir).unwrap();
    checkpoint
        .tensor_names()
        .into_iter()
        .filter_map(|name| checkpoint.info(name))
        .map(|(info, _)| info.numel() as u64)
        .sum()
}

#[test]
fn pruned_checkpoints_equal_the_model_with_those_experts_removed() {
    // Softmax with and without renormalisation, group-limited sigmoid with correction bias.
    for family in [
        "tiny-qwen3_moe",
        "tiny-mixtral",
        "tiny-olmoe",
        "tiny-qwen2_moe",
        "tiny-deepseek_v2",
        "tiny-deepseek_v3",
    ] {
        let model = common::fixture(family);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pruned");
        let report = rfid_moe::compress(&options(&model, &out, PRUNE, 0.4)).unwrap();
        let reports = read_layer_reports(&out).unwrap();
        assert!(!reports.is_empty(), "{family}: no MoE layer reported");
        let ids = reference_ids(&model);
        let written = common::logits_of(&out, &ids);
        let expected = pruned_in_memory(&model, &reports)
            .forward(&ids, None)
            .unwrap()
            .logits;
        let diff = common::max_abs_diff(&written, &expected);
        assert!(diff < 1e-5, "{family}: pruned checkpoint differs by {diff}");
        let original = common::logits_of(&model, &ids);
        assert!(
            common::max_abs_diff(&original, &written) > 1e-4,
            "{family}: pruning changed nothing"
        );

        // Parameters: every removed expert's three matrices are gone, nothing else.
        let layout = Checkpoint::open(&model).unwrap();
        let spec = rfid_moe::models::ArchConfig::from_checkpoint(&layout)
            .unwrap()
            .spec();
        let expert_size = spec
            .moe_layers
            .iter()
            .flatten()
            .map(|l| 3 * l.hidden_size * l.intermediate_size)
            .next()
            .unwrap() as u64;
        let removed: u64 = reports
            .iter()
            .map(|r| r.pruning.as_ref().unwrap().removed.len() as u64)
            .sum();
        let router_rows: u64 = reports
            .iter()
            .map(|r| r.pruning.as_ref().unwrap().removed.len() as u64)
            .sum::<u64>()
            * (spec.hidden_size as u64 + u64::from(family.starts_with("tiny-deepseek_v3")));
        assert_eq!(
            parameters(&model) - parameters(&out),
            removed * expert_size + router_rows,
            "{family}: parameter count"
        );
        let routed_before = (reports.len() as u64)
            * spec.moe_layers.iter().flatten().next().unwrap().num_experts as u64
            * expert_size;
        let saved = report.routed_expert_reduction * routed_before as f64;
        assert!(
            (saved - (removed * expert_size) as f64).abs() < 1.0,
            "{family}: report says {saved} routed parameters removed"
        );

        // A normal checkpoint: the family's expert count, no compression record.
        let config = rfid_moe::checkpoint::read_json(&out.join("config.json")).unwrap();
        let original_config = rfid_moe::checkpoint::read_json(&model.join("config.json")).unwrap();
        let kept = reports[0].pruning.as_ref().unwrap().kept.len();
        for key in ["num_experts", "num_local_experts", "n_routed_experts"] {
            if original_config.get(key).is_some_and(|v| !v.is_null()) {
                assert_eq!(config[key], kept, "{family}: {key}");
            }
        }
        assert!(config.get("compression").is_none(), "{family}");
        assert_eq!(
            config["num_experts_per_tok"],
            original_config["num_experts_per_tok"]
        );
    }
}

#[test]
fn reap_and_frequency_rank_the_experts_they_say() {
    let model = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    for saliency in [Saliency::Reap, Saliency::Frequency] {
        let out = tmp.path().join(saliency.name());
        let mut options = options(&model, &out, PRUNE, 0.3);
        common::prune_settings(&mut options, |s| s.saliency = saliency);
        rfid_moe::compress(&options).unwrap();
        for report in read_layer_reports(&out).unwrap() {
            let p = report.pruning.unwrap();
            // 16 experts, ρ = 0.3 of gate and up alone: 0.3 · 16 · 2/3 = 3.2 experts' worth,
            // so 4 are removed for the rest to fit the budget.
            assert_eq!((p.removed.len(), p.kept.len()), (4, 12));
            let least_kept = p.kept.iter().map(|&e| p.scores[e]).fold(f64::MAX, f64::min);
            for &e in &p.removed {
                assert!(
                    p.scores[e] <= least_kept,
                    "{saliency}: removed {e} over a kept one"
                );
            }
            for (e, &count) in p.routing_counts.iter().enumerate() {
                match saliency {
                    Saliency::Frequency => assert_eq!(p.scores[e], count as f64),
                    Saliency::Reap => assert_eq!(p.scores[e] > 0.0, count > 0, "expert {e}"),
                }
            }
            // The layer's routing counts are the kept experts', renumbered.
            let kept_counts: Vec<u64> = p.kept.iter().map(|&e| p.routing_counts[e]).collect();
            assert_eq!(report.routing_counts, kept_counts);
        }
    }
}

#[test]
fn prune_plus_lowrank_spends_the_same_budget() {
    let model = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let ratio = 0.4;
    let lowrank = rfid_moe::compress(&options(
        &model,
        &tmp.path().join("lowrank"),
        LOWRANK,
        ratio,
    ))
    .unwrap();
    let out = tmp.path().join("both");
    let both = rfid_moe::compress(&options(&model, &out, PRUNE_LOWRANK, ratio)).unwrap();
    // Default split: round(ρ·n/3) = 2 of 16 experts pruned, the rest factored.
    let reports = read_layer_reports(&out).unwrap();
    assert!(reports
        .iter()
        .all(|r| r.pruning.as_ref().unwrap().kept.len() == 14 && !r.matrices.is_empty()));
    let gap = (both.routed_expert_reduction - lowrank.routed_expert_reduction).abs();
    assert!(
        gap < 0.02,
        "routed reduction {} vs low-rank {}",
        both.routed_expert_reduction,
        lowrank.routed_expert_reduction
    );
    // The factored checkpoint loads, with a compression record in the new numbering.
    let config = rfid_moe::checkpoint::read_json(&out.join("config.json")).unwrap();
    assert_eq!(config["num_local_experts"], 14);
    assert!(config.get("compression").is_some());
    assert_finite_logits(&out, &model);
}

#[test]
fn prune_plus_lowrank_with_a_model_wide_budget_factors_the_kept_experts() {
    let model = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model-scope");
    let mut options = options(&model, &out, PRUNE_LOWRANK, 0.4);
    options.budget.scope = rfid_moe::pipeline::BudgetScope::Model;
    let report = rfid_moe::compress(&options).unwrap();
    let layer_scope = rfid_moe::compress(&self::options(
        &model,
        &tmp.path().join("layer-scope"),
        PRUNE_LOWRANK,
        0.4,
    ))
    .unwrap();
    let reports = read_layer_reports(&out).unwrap();
    assert!(reports
        .iter()
        .all(|r| r.pruning.as_ref().unwrap().kept.len() == 14 && !r.matrices.is_empty()));
    let gap = (report.routed_expert_reduction - layer_scope.routed_expert_reduction).abs();
    assert!(gap < 0.02, "model scope {report:?} vs layer scope");
    assert_finite_logits(&out, &model);
}

#[test]
fn pruning_refuses_what_routing_cannot_run() {
    let tmp = tempfile::tempdir().unwrap();
    let error = |family: &str, fraction: f64| {
        let model = common::fixture(family);
        let out = tmp.path().join(format!("{family}-{fraction}"));
        let mut options = options(&model, &out, PRUNE_LOWRANK, 0.9);
        common::prune_settings(&mut options, |s| s.fraction = Some(fraction));
        rfid_moe::compress(&options).unwrap_err().to_string()
    };
    // Mixtral: 8 experts, top-2; removing 7 leaves 1.
    let message = error("tiny-mixtral", 0.9);
    assert!(
        message.contains("fewer than num_experts_per_tok = 2"),
        "{message}"
    );
    // DeepSeek-V3: 2 groups, topk_group 1, top-2; removing 6 leaves one expert per group.
    let message = error("tiny-deepseek_v3", 0.75);
    assert!(message.contains("topk_group = 1"), "{message}");
    // Removal alone that keeps more than the budget, and more than the ratio pays for.
    let model = common::fixture("tiny-qwen3_moe");
    let mut options = options(&model, &tmp.path().join("x"), PRUNE, 0.4);
    common::prune_settings(&mut options, |s| s.fraction = Some(0.25));
    let message = rfid_moe::compress(&options).unwrap_err().to_string();
    assert!(message.contains("the budget cannot be met"), "{message}");
    let mut options = self::options(&model, &tmp.path().join("y"), PRUNE_LOWRANK, 0.1);
    common::prune_settings(&mut options, |s| s.fraction = Some(0.25));
    let message = rfid_moe::compress(&options).unwrap_err().to_string();
    assert!(
        message.contains("more than --ratio 0.1 pays for"),
        "{message}"
    );
}

#[test]
fn deepseek_groups_lose_the_same_number_of_experts() {
    let model = common::fixture("tiny-deepseek_v3");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    // ρ = 0.6: 0.6 · 8 · 2/3 = 3.2 experts, rounded to a multiple of n_group = 2: 4.
    rfid_moe::compress(&options(&model, &out, PRUNE, 0.6)).unwrap();
    for report in read_layer_reports(&out).unwrap() {
        let p = report.pruning.unwrap();
        assert_eq!(p.kept.len(), 4);
        assert_eq!(p.kept.iter().filter(|&&e| e < 4).count(), 2, "{:?}", p.kept);
    }
    let checkpoint = Checkpoint::open(&out).unwrap();
    let bias = checkpoint
        .info("model.layers.1.mlp.gate.e_score_correction_bias")
        .unwrap()
        .0;
    assert_eq!(bias.shape, vec![4]);
}
