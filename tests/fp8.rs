//! FP8 checkpoints as DeepSeek-V3/R1 and the Qwen3 FP8 releases ship them (`F8_E4M3` weights
//! with `*_scale_inv` block scales): exact decoding, dequantisation on load, compression that
//! copies every uncompressed tensor through byte for byte, and clear errors for bad scales.
//!
//! The FP8 checkpoint is built here from `tests/fixtures/tiny-deepseek_v3`: every 2-D linear
//! weight except embeddings, `lm_head`, norms and router gates is quantised to E4M3 with 16×16
//! blocks (so the fixture's 64/32/24/96/128-wide matrices span several blocks, some partial),
//! and a copy of the last layer is added at index `num_hidden_layers` as a fake
//! multi-token-prediction layer (DeepSeek-V3's `model.layers.61.*`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rfid_moe::checkpoint::fp8::E4M3FN_TABLE;
use rfid_moe::checkpoint::{Checkpoint, StoredDType};
use rfid_moe::models::Model;
use rfid_moe::pipeline::CompressOptions;

const FIXTURE: &str = "tiny-deepseek_v3";
const BLOCK: [usize; 2] = [16, 16];
/// Layers of the fixture; the fake MTP layer gets this index.
const NUM_LAYERS: usize = 3;

/// E4M3FN by its definition: sign, 4-bit exponent with bias 7, 3-bit mantissa, subnormals at
/// exponent 0, no infinities, and S.1111.111 the only NaN.
fn e4m3fn_by_formula(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f64 } else { 1.0 };
    let exponent = i32::from((code >> 3) & 0x0F);
    let mantissa = f64::from(code & 0x07);
    if exponent == 15 && mantissa == 7.0 {
        return f32::NAN;
    }
    let value = if exponent == 0 {
        mantissa / 8.0 * 2f64.powi(-6)
    } else {
        (1.0 + mantissa / 8.0) * 2f64.powi(exponent - 7)
    };
    (sign * value) as f32
}

/// The nearest E4M3FN code to `x` (|x| ≤ 448), from the formula's table.
fn encode_e4m3(x: f32) -> u8 {
    let positive: Vec<f32> = (0..=0x7Eu8).map(e4m3fn_by_formula).collect();
    let magnitude = x.abs();
    let above = positive.partition_point(|&v| v < magnitude).min(0x7E);
    let code = match above {
        0 => 0,
        k if magnitude - positive[k - 1] <= positive[k] - magnitude => k - 1,
        k => k,
    } as u8;
    code | if x < 0.0 { 0x80 } else { 0 }
}

/// Whether the fixture weight `name` is quantised, as DeepSeek-V3's FP8 release does it.
fn is_quantised(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.ends_with(".weight")
        && !name.contains("embed_tokens")
        && !name.starts_with("lm_head")
        && !name.contains("norm")
        && !name.ends_with("mlp.gate.weight")
}

/// One quantised matrix: codes, block scales, and the exact values they stand for.
struct Quantised {
    codes: Vec<u8>,
    scales: Vec<f32>,
    dequantised: Vec<f32>,
}

/// Quantises a [rows, cols] matrix in `BLOCK` blocks: scale = block amax / 448 (rounded to bf16
/// when `bf16_scales`, as some releases store them), code = nearest E4M3 of value / scale.
fn quantise(values: &[f32], rows: usize, cols: usize, bf16_scales: bool) -> Quantised {
    let (block_rows, block_cols) = (rows.div_ceil(BLOCK[0]), cols.div_ceil(BLOCK[1]));
    let mut scales = vec![0f32; block_rows * block_cols];
    for r in 0..rows {
        for c in 0..cols {
            let s = &mut scales[(r / BLOCK[0]) * block_cols + c / BLOCK[1]];
            *s = s.max(values[r * cols + c].abs());
        }
    }
    for s in &mut scales {
        *s = (*s / 448.0).max(1e-12);
        if bf16_scales {
            // Rounded up so that no value of the block exceeds 448 after division.
            let rounded = half::bf16::from_f32(*s).to_f32();
            *s = if rounded < *s {
                half::bf16::from_bits(half::bf16::from_f32(*s).to_bits() + 1).to_f32()
            } else {
                rounded
            };
        }
    }
    let table: Vec<f32> = (0..=255u8).map(e4m3fn_by_formula).collect();
    let mut codes = vec![0u8; values.len()];
    let mut dequantised = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            let scale = scales[(r / BLOCK[0]) * block_cols + c / BLOCK[1]];
            let code = encode_e4m3(values[r * cols + c] / scale);
            codes[r * cols + c] = code;
            dequantised[r * cols + c] = table[code as usize] * scale;
        }
    }
    Quantised {
        codes,
        scales,
        dequantised,
    }
}

/// The fixture's tensors with the fake MTP layer added (a copy of the last layer at index
/// `NUM_LAYERS`, plus DeepSeek-V3's `eh_proj`, `enorm` and `hnorm`), as f32.
fn original_tensors() -> BTreeMap<String, Tensor> {
    let checkpoint = Checkpoint::open(common::fixture(FIXTURE)).unwrap();
    let mut tensors = BTreeMap::new();
    let last = format!("model.layers.{}.", NUM_LAYERS - 1);
    let mtp = format!("model.layers.{NUM_LAYERS}.");
    for name in checkpoint.tensor_names() {
        let tensor = checkpoint
            .load(name, DType::F32, &Device::Cpu, "test")
            .unwrap();
        if let Some(rest) = name.strip_prefix(&last) {
            tensors.insert(format!("{mtp}{rest}"), (&tensor * 0.5).unwrap());
        }
        tensors.insert(name.to_string(), tensor);
    }
    let ramp = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * scale)
            .collect()
    };
    let eh = Tensor::from_vec(ramp(64 * 128, 0.05), (64, 128), &Device::Cpu).unwrap();
    tensors.insert(format!("{mtp}eh_proj.weight"), eh);
    for norm in ["enorm", "hnorm"] {
        let ones = Tensor::ones(64, DType::F32, &Device::Cpu).unwrap();
        tensors.insert(format!("{mtp}{norm}.weight"), ones);
    }
    tensors
}

/// Checkpoints built from the fixture: the FP8 one, one holding the exact dequantised weights
/// in f32, and the original f32 one (all with the fake MTP layer).
struct Built {
    _tmp: tempfile::TempDir,
    fp8: PathBuf,
    dequantised: PathBuf,
    original: PathBuf,
    /// The FP8 checkpoint's tensors, to write variants of it.
    fp8_tensors: HashMap<String, Tensor>,
}

fn write_checkpoint(dir: &Path, tensors: &HashMap<String, Tensor>, fp8: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture(FIXTURE).join("config.json")).unwrap(),
    )
    .unwrap();
    if fp8 {
        config["quantization_config"] = serde_json::json!({
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": BLOCK,
        });
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
    std::fs::copy(
        common::fixture(FIXTURE).join("reference.safetensors"),
        dir.join("reference.safetensors"),
    )
    .unwrap();
}

fn build() -> Built {
    let tmp = tempfile::tempdir().unwrap();
    let (mut fp8, mut dequantised, mut original) = (HashMap::new(), HashMap::new(), HashMap::new());
    for (name, tensor) in original_tensors() {
        original.insert(name.clone(), tensor.clone());
        if !is_quantised(&name, tensor.dims()) {
            fp8.insert(name.clone(), tensor.clone());
            dequantised.insert(name, tensor);
            continue;
        }
        let (rows, cols) = tensor.dims2().unwrap();
        let values: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        // o_proj scales are stored as bf16, as some releases do.
        let bf16_scales = name.ends_with("o_proj.weight");
        let q = quantise(&values, rows, cols, bf16_scales);
        let codes = Tensor::from_raw_buffer(&q.codes, DType::F8E4M3, &[rows, cols], &Device::Cpu);
        fp8.insert(name.clone(), codes.unwrap());
        let scale_shape = (rows.div_ceil(BLOCK[0]), cols.div_ceil(BLOCK[1]));
        let mut scales = Tensor::from_vec(q.scales, scale_shape, &Device::Cpu).unwrap();
        if bf16_scales {
            scales = scales.to_dtype(DType::BF16).unwrap();
        }
        fp8.insert(format!("{name}_scale_inv"), scales);
        let exact = Tensor::from_vec(q.dequantised, (rows, cols), &Device::Cpu).unwrap();
        dequantised.insert(name, exact);
    }
    let paths = ["fp8", "dequantised", "original"].map(|n| tmp.path().join(n));
    write_checkpoint(&paths[0], &fp8, true);
    write_checkpoint(&paths[1], &dequantised, false);
    write_checkpoint(&paths[2], &original, false);
    let [fp8_path, dequantised_path, original_path] = paths;
    Built {
        _tmp: tmp,
        fp8: fp8_path,
        dequantised: dequantised_path,
        original: original_path,
        fp8_tensors: fp8,
    }
}

fn logits(dir: &Path) -> Tensor {
    let reference = rfid_moe::checkpoint::load_all(
        &common::fixture(FIXTURE).join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    common::logits_of(dir, &reference["input_ids"])
}

fn load_error(dir: &Path) -> String {
    let checkpoint = Checkpoint::open(dir).unwrap();
    match Model::load(&checkpoint, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_e4m3fn_table_is_the_format_definition_on_all_256_codes() {
    for code in 0..=255u8 {
        let (ours, reference) = (E4M3FN_TABLE[code as usize], e4m3fn_by_formula(code));
        if reference.is_nan() {
            assert!(ours.is_nan(), "code {code:#04x}: {ours} (expected NaN)");
        } else {
            // Bitwise, so that -0.0 keeps its sign.
            assert_eq!(
                ours.to_bits(),
                reference.to_bits(),
                "code {code:#04x}: {ours} vs {reference}"
            );
        }
    }
    assert_eq!(E4M3FN_TABLE.iter().filter(|v| v.is_nan()).count(), 2);
    assert!(E4M3FN_TABLE.iter().all(|v| !v.is_infinite()));
}

#[test]
fn fp8_weights_are_dequantised_on_load_and_logits_stay_close() {
    let built = build();
    let fp8_logits = logits(&built.fp8);
    let exact = logits(&built.dequantised);
    let original = logits(&built.original);
    let finite: Vec<f32> = fp8_logits.flatten_all().unwrap().to_vec1().unwrap();
    assert!(finite.iter().all(|v| v.is_finite()));
    // Dequantisation on load gives exactly the values fp8 × scale (same f32 products), so the
    // FP8 model is the f32 model of those values up to nothing at all.
    let same = common::max_abs_diff(&fp8_logits, &exact);
    assert!(
        same <= 1e-6,
        "FP8 load vs exact dequantised weights: {same}"
    );
    // Against the unquantised model. Each weight is rounded to 3 mantissa bits, at most half an
    // ulp = 2^-4 of its magnitude (values under the smallest normal, 2^-6·scale, are rare at
    // amax/448 scaling), so every quantised matrix's relative error ε_W = ‖W − Ŵ‖/‖W‖ ≤ 2^-4.
    let weight_error = max_weight_error(&built);
    assert!(
        weight_error <= 2f64.powi(-4),
        "a weight's relative error is {weight_error}"
    );
    // To first order each quantised matrix on a token's path adds a relative error of about
    // ε_W to the hidden state, independently (separate roundings), so they add in quadrature:
    // with D matrices in sequence the logits are off by about √D·ε_W. D = 5 per layer (q_a → q_b
    // or kv_a → kv_b → o_proj, then gate/up → down) × 3 layers = 15. Routing is discontinuous:
    // a token whose top-k choice was nearly tied can switch experts, so that bound is for the
    // median token (factor 2 for the norms' and activations' gains, which first order ignores),
    // and the mean, flips included, is held to the linear first-order sum D·ε_W.
    let per_token = per_token_relative_error(&fp8_logits, &original);
    let depth = 15f64;
    let median = per_token[per_token.len() / 2];
    let mean = per_token.iter().sum::<f64>() / per_token.len() as f64;
    assert!(
        median <= 2.0 * depth.sqrt() * weight_error,
        "median relative logit error {median} > 2·√15·{weight_error}"
    );
    assert!(
        mean <= depth * weight_error,
        "mean relative logit error {mean} > 15·{weight_error}"
    );
    // And the weights really were quantised (the bounds above are not met by doing nothing).
    assert!(
        median > 1e-3,
        "median relative logit error {median}: FP8 changed nothing?"
    );
}

/// The largest ‖W − Ŵ‖/‖W‖ over the FP8 weights (Ŵ dequantised on load).
fn max_weight_error(built: &Built) -> f64 {
    let (original, fp8) = (
        Checkpoint::open(&built.original).unwrap(),
        Checkpoint::open(&built.fp8).unwrap(),
    );
    let norm = |t: &Tensor| {
        f64::from(
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
        .sqrt()
    };
    fp8.tensor_names()
        .into_iter()
        .filter(|name| fp8.info(name).unwrap().0.dtype == StoredDType::F8E4M3)
        .map(|name| {
            let w = original
                .load(name, DType::F32, &Device::Cpu, "test")
                .unwrap();
            let q = fp8.load(name, DType::F32, &Device::Cpu, "test").unwrap();
            norm(&(&w - &q).unwrap()) / norm(&w)
        })
        .fold(0.0, f64::max)
}

/// ‖Δlogits‖/‖logits‖ of every token position, sorted.
fn per_token_relative_error(logits: &Tensor, reference: &Tensor) -> Vec<f64> {
    let vocab = reference.dim(candle_core::D::Minus1).unwrap();
    let rows = |t: &Tensor| -> Vec<Vec<f32>> {
        let flat: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        flat.chunks(vocab).map(<[f32]>::to_vec).collect()
    };
    let mut errors: Vec<f64> = rows(logits)
        .iter()
        .zip(rows(reference))
        .map(|(a, b)| {
            let diff: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum();
            let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
            (diff / norm).sqrt()
        })
        .collect();
    errors.sort_by(f64::total_cmp);
    errors
}

#[test]
fn fp8_weights_count_once_and_report_their_dtype() {
    let built = build();
    let fp8 = Checkpoint::open(&built.fp8).unwrap();
    let dense = Checkpoint::open(&built.dequantised).unwrap();
    assert_eq!(
        rfid_moe::inspect::parameter_counts(&fp8),
        rfid_moe::inspect::parameter_counts(&dense)
    );
    assert_eq!(fp8.dominant_dtype(), StoredDType::F8E4M3);
    let name = "model.layers.1.self_attn.q_a_proj.weight";
    assert!(fp8.is_fp8_scale(&format!("{name}_scale_inv")));
    assert!(!fp8.is_fp8_scale(name));
    // As stored: bf16 (FP8 dequantised); verbatim: the FP8 bytes themselves.
    assert_eq!(fp8.load_stored(name, "test").unwrap().dtype(), DType::BF16);
    let verbatim = fp8.load_verbatim(name, "test").unwrap();
    assert_eq!(verbatim.dtype(), DType::F8E4M3);
}

/// Every tensor of `dir` with its dtype, shape and bytes.
fn raw_tensors(dir: &Path) -> BTreeMap<String, (StoredDType, Vec<usize>, Vec<u8>)> {
    let checkpoint = Checkpoint::open(dir).unwrap();
    checkpoint
        .tensor_names()
        .into_iter()
        .map(|name| {
            let (info, _) = checkpoint.info(name).unwrap();
            let bytes = checkpoint.raw_bytes(name).unwrap().to_vec();
            (name.to_string(), (info.dtype, info.shape.clone(), bytes))
        })
        .collect()
}

/// Deterministic pseudo-random token windows written as `input_ids` (i64 [n, seq]).
fn calibration_file(dir: &Path, windows: usize, seq: usize) -> PathBuf {
    let path = dir.join("calibration.safetensors");
    common::random_token_windows(&path, 256, windows, seq, 0x1234_5678_9abc_def0)
}

#[test]
fn compressing_fp8_copies_uncompressed_tensors_byte_for_byte() {
    let built = build();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let mut options = CompressOptions {
        model: built.fp8.clone(),
        ..rfid_moe::pipeline::presets::paper()
    };
    options.calibration.data = calibration_file(work.path(), 16, 32);
    options.calibration.samples = 16;
    options.calibration.seq_len = 32;
    options.calibration.batch_size = 4;
    options.budget.ratio = 0.5;
    options.output.out = Some(out.clone());
    rfid_moe::compress(&options).unwrap();

    let input = raw_tensors(&built.fp8);
    let output = raw_tensors(&out);
    let compressed = Checkpoint::open(&out).unwrap();
    let record = rfid_moe::models::compression_record(&compressed)
        .unwrap()
        .unwrap();
    // Expert matrices of factored groups are replaced; everything else must be copied.
    let mut replaced = Vec::new();
    for layer in &record.layers {
        for (matrix, matrix_record) in &layer.matrices {
            for group in matrix_record.groups.iter().filter(|g| !g.dense) {
                for expert in &group.experts {
                    let weight = format!(
                        "model.layers.{}.mlp.experts.{expert}.{matrix}.weight",
                        layer.layer
                    );
                    replaced.push(format!("{weight}_scale_inv"));
                    replaced.push(weight);
                }
            }
        }
    }
    assert!(replaced.len() >= 8, "nothing was factored: {replaced:?}");
    for (name, stored) in &input {
        if replaced.contains(name) {
            // No orphan: neither the FP8 weight nor its scales survive.
            assert!(
                !output.contains_key(name),
                "replaced `{name}` still in the output"
            );
            continue;
        }
        let copied = output
            .get(name)
            .unwrap_or_else(|| panic!("`{name}` was not copied"));
        assert!(
            copied == stored,
            "`{name}` changed: {:?} {:?} -> {:?} {:?}",
            stored.0,
            stored.1,
            copied.0,
            copied.1
        );
    }
    let mtp = format!("model.layers.{NUM_LAYERS}.");
    assert!(input.keys().filter(|n| n.starts_with(&mtp)).count() > 30);
    assert!(output.contains_key(&format!("{mtp}mlp.experts.0.gate_proj.weight_scale_inv")));
    // Factors are bf16, never FP8; every scale left belongs to an FP8 weight.
    for (name, (dtype, _, _)) in &output {
        if name.ends_with(".lowrank_a") || name.ends_with(".basis") {
            assert_eq!(*dtype, StoredDType::BF16, "`{name}`");
        }
        if let Some(weight) = name.strip_suffix("_scale_inv") {
            assert!(
                output
                    .get(weight)
                    .is_some_and(|w| w.0 == StoredDType::F8E4M3),
                "orphan scale `{name}`"
            );
        }
    }
    assert!(output.keys().any(|n| n.ends_with(".lowrank_a")));
    assert_eq!(
        compressed.config()["quantization_config"],
        Checkpoint::open(&built.fp8).unwrap().config()["quantization_config"]
    );
    // Our runtime loads and runs it.
    let result = logits(&out);
    let values: Vec<f32> = result.flatten_all().unwrap().to_vec1().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    assert_eq!(result.dims(), logits(&built.fp8).dims());
}

#[test]
fn the_default_meets_a_byte_budget_on_fp8_and_copies_the_prediction_layer() {
    let built = build();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let calibration = calibration_file(work.path(), 16, 32);
    let ratio = 0.5;
    let options = common::small_default_options(&built.fp8, &calibration, &out, ratio);
    let report = rfid_moe::compress(&options).unwrap();
    let before = rfid_moe::sweep::tensor_bytes(&built.fp8)
        .unwrap()
        .routed_experts;
    let after = rfid_moe::sweep::tensor_bytes(&out).unwrap().routed_experts;
    assert_eq!(report.budget.routed_bytes_before, before);
    let kept = after as f64 / before as f64;
    // The copied prediction layer is part of the routed bytes; the rest meets the budget.
    assert!(
        (kept - (1.0 - ratio)).abs() <= 0.005,
        "kept {kept:.4} of the routed bytes (prediction layer included)"
    );
    // The multi-token-prediction layer is copied byte for byte, scales and all.
    let (input, output) = (raw_tensors(&built.fp8), raw_tensors(&out));
    let mtp = format!("model.layers.{NUM_LAYERS}.");
    let copied: Vec<_> = input.keys().filter(|n| n.starts_with(&mtp)).collect();
    assert!(copied.len() > 30);
    for name in copied {
        assert_eq!(output.get(name), input.get(name), "`{name}`");
    }
    let values: Vec<f32> = logits(&out).flatten_all().unwrap().to_vec1().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
}

#[test]
fn a_missing_or_misshapen_scale_is_a_clear_error() {
    let built = build();
    let weight = "model.layers.1.self_attn.o_proj.weight";
    let scale = format!("{weight}_scale_inv");
    let tmp = tempfile::tempdir().unwrap();

    let mut missing = built.fp8_tensors.clone();
    missing.remove(&scale);
    let dir = tmp.path().join("missing");
    write_checkpoint(&dir, &missing, true);
    let message = load_error(&dir);
    assert!(
        message.contains(&format!("`{scale}`")) && message.contains(&format!("`{weight}`")),
        "{message}"
    );

    let mut misshapen = built.fp8_tensors.clone();
    misshapen.insert(
        scale.clone(),
        Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = tmp.path().join("misshapen");
    write_checkpoint(&dir, &misshapen, true);
    let message = load_error(&dir);
    assert!(
        message.contains(&format!("`{scale}`"))
            && message.contains(&format!("`{weight}`"))
            && message.contains("[4, 4]")
            && message.contains("[2, 2]"),
        "{message}"
    );

    // A wrong block size in the config is the same error, seen from the other side.
    let dir = tmp.path().join("block");
    write_checkpoint(&dir, &built.fp8_tensors, true);
    common::edit_config(&dir, |c| {
        c["quantization_config"]["weight_block_size"] = serde_json::json!([32, 32])
    });
    let message = load_error(&dir);
    assert!(
        message.contains("weight_block_size") && message.contains("_scale_inv`"),
        "{message}"
    );

    // NaN codes (0x7F) are refused by name, like NaN in any other dtype.
    let mut nan = built.fp8_tensors.clone();
    let mut codes = vec![0x38u8; 64 * 64];
    codes[5] = 0x7F;
    let codes = Tensor::from_raw_buffer(&codes, DType::F8E4M3, &[64, 64], &Device::Cpu).unwrap();
    nan.insert(weight.to_string(), codes);
    let dir = tmp.path().join("nan");
    write_checkpoint(&dir, &nan, true);
    let message = load_error(&dir);
    assert!(
        message.contains(&format!("`{weight}`"))
            && message.contains("NaN")
            && message.contains("element 5"),
        "{message}"
    );
}

#[test]
fn one_expert_of_a_fused_fp8_stack_dequantises_like_the_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (n, rows, cols) = (3, 20, 40);
    let codes: Vec<u8> = (0..n * rows * cols)
        .map(|i| (i * 37 % 0x7E) as u8 | ((i % 2) as u8) << 7)
        .collect();
    // Blocks of 8 rows × 16 columns (not square, so rows and columns cannot be mixed up):
    // scales [n, ⌈20/8⌉, ⌈40/16⌉] = [3, 3, 3].
    let scales: Vec<f32> = (0..n * 3 * 3).map(|i| 0.5 + i as f32).collect();
    let tensors = HashMap::from([
        (
            "w".to_string(),
            Tensor::from_raw_buffer(&codes, DType::F8E4M3, &[n, rows, cols], &Device::Cpu).unwrap(),
        ),
        (
            "w_scale_inv".to_string(),
            Tensor::from_vec(scales, (n, 3, 3), &Device::Cpu).unwrap(),
        ),
    ]);
    write_checkpoint(tmp.path(), &tensors, true);
    common::edit_config(tmp.path(), |c| {
        c["quantization_config"]["weight_block_size"] = serde_json::json!([8, 16])
    });
    let checkpoint = Checkpoint::open(tmp.path()).unwrap();
    let whole = checkpoint
        .load("w", DType::F32, &Device::Cpu, "test")
        .unwrap();
    for expert in 0..n {
        let one = checkpoint
            .load_index(
                "w",
                &[n, rows, cols],
                expert,
                DType::F32,
                &Device::Cpu,
                "test",
            )
            .unwrap();
        assert_eq!(common::max_abs_diff(&one, &whole.get(expert).unwrap()), 0.0);
    }
    // Spot-check one element against the definition: expert 1, row 17, column 35 lies in
    // block (2, 2) of that expert.
    let index = (rows + 17) * cols + 35;
    let expected = e4m3fn_by_formula(codes[index]) * (0.5 + (9 + 2 * 3 + 2) as f32);
    let got: f32 = whole
        .get(1)
        .unwrap()
        .get(17)
        .unwrap()
        .get(35)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(got, expected);
}
