//! The device checks: every runtime path that has a CUDA implementation, run on the test device
//! and compared with transformers' logits or with the same model on the CPU.
//!
//! The test device is the CPU unless `RFID_MOE_TEST_DEVICE` names another (`cuda`, `cuda:N`;
//! `scripts/gpu-check.sh` sets it on a GPU machine). On the CPU every check still runs end to
//! end (the comparisons with the CPU are then exact), so a broken check shows in CI before a GPU
//! is lent; on CUDA they are the parity, fused-kernel, factored, quantised and calibration
//! checks of the GPU paths.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs_diff};
use rfid_moe::checkpoint::{self, Checkpoint};
use rfid_moe::models::{FeedForward, Model};
use rfid_moe::pipeline::CompressOptions;

/// |Δlogits| allowed against transformers (f32), as `tests/parity.rs`.
const PARITY_TOLERANCE: f32 = 1e-4;

/// |Δ| allowed between the fused bf16 expert GEMM and the per-expert path: both round their
/// products to bf16 (8 bits of mantissa, 4e-3 relative) in a different order, on outputs of
/// order one.
const FUSED_TOLERANCE: f32 = 2e-2;

/// |Δlogits| allowed between a compressed model on the test device and on the CPU (f32): the
/// same weights, only the order of floating-point sums differs.
const DEVICE_TOLERANCE: f32 = 1e-4;

/// The fixture the compression checks use: sharded, q/k norms, fused-kernel-friendly shapes.
const COMPRESS_FIXTURE: &str = "tiny-qwen3_moe";

/// The fixture's reference token ids.
fn reference_ids(name: &str) -> Tensor {
    let dir = fixture(name);
    let reference = checkpoint::load_all(&dir.join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors");
    reference["input_ids"].clone()
}

/// f32 logits of the checkpoint in `dir` loaded on `device`, returned on the CPU.
fn logits_on(dir: &Path, device: &Device, ids: &Tensor) -> Tensor {
    let checkpoint = Checkpoint::open(dir).unwrap();
    let model = Model::load(&checkpoint, DType::F32, device)
        .unwrap_or_else(|e| panic!("loading {} on {device:?}: {e}", dir.display()));
    model
        .forward(&ids.to_device(device).unwrap(), None)
        .unwrap()
        .logits
        .to_device(&Device::Cpu)
        .unwrap()
}

#[test]
fn every_family_matches_transformers_on_the_test_device() {
    let (name, device) = common::test_device();
    for family in common::FAMILIES {
        let dir = fixture(family);
        let reference =
            checkpoint::load_all(&dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        let logits = logits_on(&dir, &device, &reference["input_ids"]);
        let diff = max_abs_diff(&logits, &reference["logits"]);
        println!("{family} on {name}: max |Δlogits| vs transformers = {diff:.3e}");
        assert!(diff <= PARITY_TOLERANCE, "{family} on {name}: {diff}");
    }
}

/// On CUDA the fused MoE GEMM (stacked bf16 experts) gives the per-expert path's result; on
/// the CPU there is no fused kernel, and `forward_fused` must say so rather than run something
/// else.
#[test]
fn fused_experts_match_the_per_expert_path_on_the_test_device() {
    use rfid_moe::models::moe::ExpertDispatch;
    let (name, device) = common::test_device();
    let checkpoint = Checkpoint::open(fixture(COMPRESS_FIXTURE)).unwrap();
    let model = Model::load(&checkpoint, DType::BF16, &device).unwrap();
    let x = Tensor::randn(0f32, 1.0, (13, model.spec.hidden_size), &device)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let mut checked = 0;
    for layer in &model.layers {
        let FeedForward::Moe(block) = &layer.feed_forward else {
            continue;
        };
        let routing = block.router.route(&x).unwrap();
        let fused = block.experts.forward_fused(&x, &routing).unwrap();
        if !device.is_cuda() {
            assert!(fused.is_none(), "a fused expert path ran on {name}");
            println!(
                "layer {}: no fused kernel on {name} (expected)",
                layer.index
            );
            checked += 1;
            continue;
        }
        let fused = fused.expect("stacked bf16 experts on CUDA run fused");
        let dispatch = ExpertDispatch::new(&routing, block.experts.len()).unwrap();
        let reference = block.experts.forward(&x, &dispatch).unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let diff = max_abs_diff(&f32(&fused), &f32(&reference));
        println!(
            "layer {} on {name}: fused vs per-expert max |Δ| = {diff:.3e}",
            layer.index
        );
        assert!(diff < FUSED_TOLERANCE, "layer {}: {diff}", layer.index);
        checked += 1;
    }
    assert!(checked > 0, "the fixture has no MoE layer");
}

/// `base` (its methods, budget and settings) on the fixture with small calibration windows, a
/// ratio of 0.4, calibrating on `device`, writing `out`.
fn fixture_options(
    mut options: CompressOptions,
    calibration: &Path,
    out: &Path,
    device: &str,
) -> CompressOptions {
    options.model = fixture(COMPRESS_FIXTURE);
    options.device = device.into();
    options.calibration.data = calibration.to_path_buf();
    options.calibration.samples = 16;
    options.calibration.seq_len = 32;
    options.calibration.batch_size = 4;
    options.budget.ratio = 0.4;
    options.output.out = Some(out.to_path_buf());
    options
}

/// Calibration windows for the fixture (vocabulary 256 or more in every family).
fn calibration(dir: &Path) -> PathBuf {
    common::random_token_windows(
        &dir.join("calibration.safetensors"),
        256,
        16,
        32,
        0xde71_ce00,
    )
}

/// Whether any tensor of the checkpoint in `dir` is stored as int8 codes.
fn stores_int8(dir: &Path) -> bool {
    let checkpoint = Checkpoint::open(dir).unwrap();
    checkpoint.tensor_names().iter().any(|n| {
        checkpoint
            .info(n)
            .is_some_and(|(info, _)| info.dtype == checkpoint::StoredDType::I8)
    })
}

/// Compressed checkpoints (factored gate/up, int8 factors, and the default mix of pruning,
/// low-rank and int8 experts) give on the test device the logits they give on the CPU.
#[test]
fn compressed_models_match_the_cpu_on_the_test_device() {
    let (name, device) = common::test_device();
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration(tmp.path());
    let mut int8_factors = rfid_moe::pipeline::presets::paper();
    int8_factors
        .update_settings::<rfid_moe::pipeline::methods::lowrank::LowRankSettings>(|s| {
            s.factor_dtype = "int8".into()
        })
        .unwrap();
    let runs = [
        ("factored", rfid_moe::pipeline::presets::paper()),
        ("int8-factors", int8_factors),
        ("default-mix", CompressOptions::default()),
    ];
    let ids = reference_ids(COMPRESS_FIXTURE);
    let mut quantised = 0;
    for (label, base) in runs {
        let out = tmp.path().join(label);
        let options = fixture_options(base, &calibration, &out, "cpu");
        rfid_moe::compress(&options).unwrap_or_else(|e| panic!("{label}: {e}"));
        quantised += usize::from(stores_int8(&out));
        let cpu = logits_on(&out, &Device::Cpu, &ids);
        let on_device = logits_on(&out, &device, &ids);
        let diff = max_abs_diff(&on_device, &cpu);
        println!("{label}: {name} vs cpu max |Δlogits| = {diff:.3e}");
        assert!(diff <= DEVICE_TOLERANCE, "{label} on {name}: {diff}");
    }
    assert!(quantised >= 1, "no run stored int8 experts or factors");
}

/// ‖a − b‖_F / ‖b‖_F.
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt() as f64
    };
    norm(&(a - b).unwrap()) / norm(b)
}

/// Calibrating on the test device (its forward passes and Gram statistics there) compresses as
/// well as calibrating on the CPU: within the byte budget, and an error against the original
/// within a quarter of the CPU run's. Near-ties in routing may flip on another device and
/// regroup experts, so the outputs need not be identical.
#[test]
fn calibration_on_the_test_device_compresses_as_well_as_on_the_cpu() {
    let (name, _) = common::test_device();
    let tmp = tempfile::tempdir().unwrap();
    let calibration = calibration(tmp.path());
    let ids = reference_ids(COMPRESS_FIXTURE);
    let original = logits_on(&fixture(COMPRESS_FIXTURE), &Device::Cpu, &ids);
    let mut errors = Vec::new();
    for (run, device) in ["cpu", name.as_str()].into_iter().enumerate() {
        let out = tmp.path().join(format!("run-{run}-calibrated-on-{device}"));
        let options = fixture_options(CompressOptions::default(), &calibration, &out, device);
        let report = rfid_moe::compress(&options).unwrap_or_else(|e| panic!("{device}: {e}"));
        let budget = &report.budget;
        assert!(
            budget.planned <= budget.target,
            "calibrated on {device}: the plan keeps {} of {}",
            budget.planned,
            budget.target
        );
        let error = relative_error(&logits_on(&out, &Device::Cpu, &ids), &original);
        println!(
            "calibrated on {device}: keeps {:.0} of {:.0} bytes, relative logit error {error:.4e}",
            budget.planned, budget.target
        );
        errors.push(error);
    }
    let (cpu_error, device_error) = (errors[0], errors[1]);
    assert!(cpu_error > 0.0, "compression changed nothing");
    assert!(
        device_error <= 1.25 * cpu_error,
        "calibrated on {name}: error {device_error:.4e} against {cpu_error:.4e} on the cpu"
    );
}
