//! The default run: `--ratio` counts the routed experts' stored bytes, and the default method
//! (prune + low-rank of gate, up and down, int8 factors) removes that share of them.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use rfid_moe::pipeline::{BudgetUnit, CompressMethod, CompressOptions};

/// The routed experts' share of stored bytes the output at `out` keeps, measured on its files.
fn kept_share(source: &Path, out: &Path) -> f64 {
    let before = rfid_moe::sweep::tensor_bytes(source)
        .unwrap()
        .routed_experts;
    let after = rfid_moe::sweep::tensor_bytes(out).unwrap().routed_experts;
    after as f64 / before as f64
}

/// The first calibration window of mini-moe-docs as `input_ids` [1, 64].
fn mini_ids() -> Tensor {
    let ids: Vec<i64> = (0..64).map(|i| (i * 37 % 500 + 3) as i64).collect();
    Tensor::from_vec(ids, (1, 64), &Device::Cpu).unwrap()
}

#[test]
fn the_default_removes_the_asked_share_of_routed_bytes_on_every_family() {
    for family in common::FAMILIES {
        let source = common::fixture(family);
        let tmp = tempfile::tempdir().unwrap();
        let calibration = common::random_token_windows(
            &tmp.path().join("calibration.safetensors"),
            256,
            16,
            32,
            0x5eed_b17e,
        );
        let out = tmp.path().join("out");
        // The fixtures are f32: int8 alone keeps about a quarter, so ask for more than that.
        let ratio = 0.85;
        let options = common::small_default_options(&source, &calibration, &out, ratio);
        let report = rfid_moe::compress(&options).unwrap();
        let budget = report.byte_budget.clone().expect("a byte budget");
        assert_eq!(budget.byte_ratio, ratio, "{family}");
        assert!(budget.parameter_ratio > 0.0, "{family}: {budget:?}");
        let kept = kept_share(&source, &out);
        assert_eq!(report.routed_bytes_kept(), Some(kept), "{family}");
        eprintln!(
            "{family}: kept {kept:.4}, parameter ratio {:.4}",
            budget.parameter_ratio
        );
        // int8 scales of narrow factors cost a little more than the nominal 1/32 byte.
        assert!(
            kept <= 1.0 - ratio + 0.005 && kept >= 1.0 - ratio - 0.02,
            "{family}: kept {kept:.4} of the routed bytes for --ratio {ratio}"
        );
        // The saved settings say what was asked for, not the derived parameter ratio.
        assert_eq!(report.options.allocation.budget, BudgetUnit::Bytes);
        assert_eq!(report.options.allocation.ratio, ratio);
        let logits = common::logits_of(
            &out,
            &Tensor::new(&[[1i64, 5, 9, 2]], &Device::Cpu).unwrap(),
        );
        let finite = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(finite.iter().all(|v| v.is_finite()), "{family}");
    }
}

#[test]
fn storage_alone_meets_a_small_byte_budget_and_beats_the_paper_at_equal_bytes() {
    let model = common::mini_model();
    let calibration = model.join("calibration.txt");
    let tmp = tempfile::tempdir().unwrap();
    let ids = mini_ids();
    let original = common::logits_of(&model, &ids);
    let run = |name: &str, options: CompressOptions| {
        let report = rfid_moe::compress(&options).unwrap();
        let out = tmp.path().join(name);
        (
            report,
            kept_share(&model, &out),
            common::logits_of(&out, &ids),
        )
    };
    let ratio = 0.4;
    let default = common::small_default_options(&model, &calibration, &tmp.path().join("d"), ratio);
    let (report, kept, logits) = run("d", default);
    // bf16 in, int8 out: nothing needs to be factored away, the output keeps ~52%.
    let budget = report.byte_budget.clone().unwrap();
    assert_eq!(budget.parameter_ratio, 0.0);
    assert_eq!(budget.input_bytes_per_parameter, 2.0);
    assert!((0.50..=0.53).contains(&kept), "kept {kept}");
    assert_eq!(report.targeted_reduction, 0.0);
    let default_error = common::mean_abs_diff(&logits, &original);

    // The paper's method at the same share of bytes: gate and up lose 60% of their parameters.
    let mut paper =
        common::small_compress_options(&model, &calibration, &tmp.path().join("p"), 0.0);
    paper.allocation.budget = BudgetUnit::Bytes;
    paper.allocation.ratio = ratio;
    let (report, paper_kept, logits) = run("p", paper);
    assert!((report.byte_budget.unwrap().parameter_ratio - 0.6).abs() < 1e-12);
    assert!(
        (paper_kept - (1.0 - ratio)).abs() < 0.01,
        "paper kept {paper_kept}"
    );
    let paper_error = common::mean_abs_diff(&logits, &original);
    eprintln!(
        "mean |Δ logit|: default {default_error}, paper {paper_error}; kept {kept} / {paper_kept}"
    );
    assert!(
        default_error * 10.0 < paper_error,
        "default {default_error} vs paper {paper_error} (mean |Δ logit|)"
    );
}

#[test]
fn a_larger_byte_budget_prunes_and_factors_all_three_matrices() {
    let model = common::mini_model();
    let calibration = model.join("calibration.txt");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let ratio = 0.7;
    let options = common::small_default_options(&model, &calibration, &out, ratio);
    assert_eq!(options.pruning.method, CompressMethod::PruneLowRank);
    let report = rfid_moe::compress(&options).unwrap();
    let budget = report.byte_budget.clone().unwrap();
    // (1 − ρ') · b_out = (1 − ρ) · 2, where b_out ≥ 1 + 4/128 counts the int8 scales of
    // factors of the ranks this ratio gives.
    let nominal = 1.0 - (1.0 - ratio) * 2.0 / (1.0 + 4.0 / 128.0);
    let implied = (1.0 - ratio) * 2.0 / (1.0 - budget.parameter_ratio);
    assert!(budget.parameter_ratio > nominal, "{budget:?}");
    assert!(
        (implied - budget.output_bytes_per_parameter).abs() < 1e-9,
        "{budget:?}"
    );
    let layer = &report.layers[0];
    assert!(!layer.pruning.as_ref().unwrap().removed.is_empty());
    assert_eq!(layer.matrices.len(), 3, "gate, up and down are factored");
    let summary =
        rfid_moe::inspect::summarize(&rfid_moe::checkpoint::Checkpoint::open(&out).unwrap())
            .unwrap();
    assert_eq!(summary.factor_storage.as_deref(), Some("int8-row128"));
    let kept = kept_share(&model, &out);
    eprintln!("mini at 0.7: kept {kept:.4}");
    assert!(
        kept <= 1.0 - ratio + 0.005 && kept >= 1.0 - ratio - 0.02,
        "kept {kept:.4} of the routed bytes for --ratio {ratio}"
    );
}

#[test]
fn saved_settings_without_a_method_or_budget_mean_what_they_meant() {
    // compress.toml of a low-rank run leaves [pruning] out; reading it back keeps low-rank.
    let paper = CompressOptions::paper();
    let text = toml::to_string(&paper).unwrap();
    assert!(!text.contains("[pruning]"), "{text}");
    let read: CompressOptions = toml::from_str(&text).unwrap();
    assert_eq!(read.pruning.method, CompressMethod::LowRank);
    assert_eq!(read.allocation.budget, BudgetUnit::Parameters);
    // A file written before byte budgets (no `budget`, no [pruning], no `matrices`) and a
    // hand-written partial one mean the paper preset's values for what they leave out.
    let old: CompressOptions = toml::from_str(
        "model = \"m\"\n[allocation]\nratio = 0.4\n[factorization]\nwhiten = false\n",
    )
    .unwrap();
    assert_eq!(old.allocation.budget, BudgetUnit::Parameters);
    assert_eq!(
        old.allocation.matrices,
        rfid_moe::pipeline::options::PAPER_MATRICES
    );
    assert_eq!(old.factorization.factor_dtype, "auto");
    assert!(!old.factorization.whiten);
    assert_eq!(old.pruning.method, CompressMethod::LowRank);
    let partial: CompressOptions = toml::from_str("[pruning]\nsaliency = \"frequency\"\n").unwrap();
    assert_eq!(partial.pruning.method, CompressMethod::LowRank);
    // The default is written out in full.
    let text = toml::to_string(&CompressOptions::default()).unwrap();
    assert!(text.contains("method = \"prune+lowrank\""), "{text}");
    assert!(text.contains("budget = \"bytes\""), "{text}");
    let read: CompressOptions = toml::from_str(&text).unwrap();
    assert_eq!(read.pruning, CompressOptions::default().pruning);
}
