//! `--factor-dtype int8` (docs/FORMAT.md "Int8 factors"): the quantiser's error bound,
//! an int8 checkpoint read back against the same run with f32 factors (tensors and logits), the
//! bytes it saves, and the named errors of a missing or misshapen scale; int8 factors stay int8
//! in memory: exactly the logits of dequantising at load, in their stored bytes.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rfid_moe::checkpoint::experts::ExpertMatrix;
use rfid_moe::checkpoint::int8::{self, BLOCK};
use rfid_moe::checkpoint::weight::{Int8Holding, Weight};
use rfid_moe::checkpoint::{Checkpoint, StoredDType};
use rfid_moe::generate::{generate, GenerateOptions, Sampling};
use rfid_moe::models::moe::RoutedExperts;
use rfid_moe::models::{ArchConfig, FeedForward, Model};
use rfid_moe::pipeline::methods::lowrank::FactorizerKind;
use rfid_moe::pipeline::CompressOptions;

/// Relative slack on the half-step bound for the f32 rounding of `x / scale` and `code · scale`:
/// each is off by up to half an ulp of a value of up to 127 steps, 127 · 2⁻²⁴ ≈ 7.6e-6 of a step,
/// so 1e-4 of half a step covers both (measured: 3.6e-6).
const F32_SLACK: f32 = 1e-4;

/// Deterministic values in (−1, 1) from an LCG.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Checks one quantised matrix against its input: codes in range, each block's scale its absmax
/// / 127 with a ±127 code at the absmax (an all-zero block: scale 1, codes 0), every element
/// within half a step, zeros exact.
fn check_quantised(x: &[f32], rows: usize, cols: usize) {
    let q = int8::quantise(x, rows, cols);
    let blocks = cols.div_ceil(BLOCK);
    assert_eq!(q.scales.len(), rows * blocks);
    assert_eq!(int8::scale_shape(rows, cols), [rows, blocks]);
    let back = q.dequantise();
    for row in 0..rows {
        for block in 0..blocks {
            let columns = block * BLOCK..((block + 1) * BLOCK).min(cols);
            let at = |c: usize| row * cols + c;
            let absmax = columns.clone().map(|c| x[at(c)].abs()).fold(0f32, f32::max);
            let scale = q.scales[row * blocks + block];
            let expected = match absmax {
                0.0 => int8::ZERO_BLOCK_SCALE,
                _ => absmax / 127.0,
            };
            assert_eq!(scale, expected, "row {row} block {block}");
            if absmax > 0.0 {
                let top = columns.clone().map(|c| q.codes[at(c)].unsigned_abs()).max();
                assert_eq!(
                    top,
                    Some(127),
                    "row {row} block {block}: absmax gets code ±127"
                );
            }
            for c in columns {
                let (v, w) = (x[at(c)], back[at(c)]);
                assert!((-127..=127).contains(&q.codes[at(c)]));
                assert!(
                    (v - w).abs() <= scale * 0.5 * (1.0 + F32_SLACK),
                    "[{row}, {c}] {v} → {w}, scale {scale}"
                );
                if v == 0.0 {
                    assert_eq!(w, 0.0, "[{row}, {c}] a zero stays exactly zero");
                }
            }
        }
    }
}

#[test]
fn quantise_then_dequantise_is_within_half_a_step_of_each_block() {
    for (rows, cols) in [(3, 1), (4, 127), (4, 128), (5, 129), (3, 300), (2, 512)] {
        let mut x = values(rows * cols, (rows * 1000 + cols) as u64);
        // Rows of very different magnitudes, exact zeros, and an all-zero last row.
        for (i, v) in x.iter_mut().enumerate() {
            let row = i / cols;
            *v *= 10f32.powi(row as i32 - 2);
            if i % 7 == 3 {
                *v = 0.0;
            }
            if row == rows - 1 {
                *v = 0.0;
            }
        }
        check_quantised(&x, rows, cols);
        let q = int8::quantise(&x, rows, cols);
        let last = &q.scales[(rows - 1) * cols.div_ceil(BLOCK)..];
        assert!(
            last.iter().all(|&s| s == int8::ZERO_BLOCK_SCALE),
            "an all-zero row has the zero-block scale, which load accepts"
        );
        assert_eq!(int8::first_bad_scale(&q.scales), None);
        // A block that is one outlier among small values still keeps the outlier exactly.
        let mut spike = vec![1e-3f32; cols.max(2)];
        spike[1] = -50.0;
        check_quantised(&spike, 1, spike.len());
    }
}

#[test]
fn tensors_round_trip_through_codes_and_scales() {
    let x = values(6 * 200, 7);
    let tensor = Tensor::from_vec(x.clone(), (6, 200), &Device::Cpu).unwrap();
    let q = int8::Int8Matrix::from_tensor(&tensor).unwrap();
    assert_eq!(q, int8::quantise(&x, 6, 200));
    let (codes, scales) = q.to_tensors().unwrap();
    assert_eq!(codes.dtype(), DType::U8);
    assert_eq!(codes.dims(), &[6, 200]);
    assert_eq!(scales.dims(), &[6, 2]);
    let bytes: Vec<u8> = codes.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(int8::codes_from_bytes(&bytes), q.codes);
}

/// Compresses mini-moe-docs at ρ = 0.4 into `out` with `factor_dtype` (fixed calibration).
fn compress_mini(work: &Path, name: &str, factor_dtype: &str) -> PathBuf {
    compress_mini_with(work, name, factor_dtype, |_| {})
}

/// [`compress_mini`] with `tweak` applied to the options.
fn compress_mini_with(
    work: &Path,
    name: &str,
    factor_dtype: &str,
    tweak: impl FnOnce(&mut CompressOptions),
) -> PathBuf {
    let calibration = work.join("calibration.safetensors");
    if !calibration.exists() {
        common::random_token_windows(&calibration, 4096, 16, 64, 0x1617);
    }
    let out = work.join(name);
    let mut options = CompressOptions {
        model: common::mini_model(),
        ..rfid_moe::pipeline::presets::paper()
    };
    options.calibration.data = calibration;
    options.calibration.samples = 16;
    options.calibration.seq_len = 64;
    options.budget.ratio = 0.4;
    common::lowrank_settings(&mut options, |s| s.factor_dtype = factor_dtype.into());
    options.output.out = Some(out.clone());
    tweak(&mut options);
    rfid_moe::compress(&options).unwrap();
    out
}

/// The names of the int8 tensors of `checkpoint`.
fn int8_names(checkpoint: &Checkpoint) -> Vec<String> {
    checkpoint
        .tensor_names()
        .into_iter()
        .filter(|n| checkpoint.info(n).unwrap().0.dtype == StoredDType::I8)
        .map(str::to_string)
        .collect()
}

fn load(checkpoint: &Checkpoint, name: &str) -> Vec<f32> {
    checkpoint
        .load(name, DType::F32, &Device::Cpu, "test")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn an_int8_checkpoint_reads_back_within_half_a_step_of_the_f32_run_with_close_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let f32_out = compress_mini(tmp.path(), "f32", "f32");
    let int8_out = compress_mini(tmp.path(), "int8", "int8");
    let (exact, quantised) = (
        Checkpoint::open(&f32_out).unwrap(),
        Checkpoint::open(&int8_out).unwrap(),
    );
    let config = quantised.config()["compression"].clone();
    assert_eq!(config["factor_storage"], "int8-row128");
    assert_eq!(
        config["settings"]["settings"]["lowrank"]["factor_dtype"],
        "int8"
    );
    assert!(exact.config()["compression"]
        .get("factor_storage")
        .is_none());
    // Every compressor tensor is int8 (coefficients, bases, dense members of gate/up), nothing
    // else is, and the rest of the output is byte for byte the f32 run's.
    let names = int8_names(&quantised);
    let is_compressor = |n: &str| {
        n.ends_with(".lowrank_a")
            || n.ends_with(".basis")
            || (n.contains(".experts.") && !n.contains("down_proj") && n.ends_with("proj.weight"))
    };
    let expected: Vec<String> = exact
        .tensor_names()
        .into_iter()
        .filter(|n| is_compressor(n))
        .map(str::to_string)
        .collect();
    assert_eq!(names, expected);
    assert!(names.iter().any(|n| n.ends_with(".lowrank_a")) && names.len() > 100);
    for name in exact.tensor_names() {
        if !is_compressor(name) {
            assert_eq!(exact.raw_bytes(name), quantised.raw_bytes(name), "{name}");
        }
    }
    // Read back: within half a step of its block of the f32 run's value; some differ.
    let mut changed = 0usize;
    for name in &names {
        let (x, y) = (load(&exact, name), load(&quantised, name));
        let scales = load(&quantised, &int8::scale_name(name));
        let cols = quantised.info(name).unwrap().0.shape[1];
        let blocks = cols.div_ceil(BLOCK);
        for (i, (a, b)) in x.iter().zip(&y).enumerate() {
            let scale = scales[(i / cols) * blocks + (i % cols) / BLOCK];
            assert!(
                (a - b).abs() <= scale * 0.5 * (1.0 + F32_SLACK),
                "{name}[{i}]: {a} vs {b}, scale {scale}"
            );
            changed += usize::from(a != b);
        }
    }
    assert!(changed > 1000, "int8 storage changed only {changed} values");
    // Parameters are counted once: the scales are storage.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(int8_out.join("compression_report.json")).unwrap())
            .unwrap();
    let count = |key: &str| report[key].as_u64().unwrap();
    assert_eq!(
        rfid_moe::inspect::parameter_counts(&quantised).total,
        count("model_parameters_before") - count("targeted_parameters_before")
            + count("targeted_parameters_after")
    );
    // Logits: int8 storage moves them far less than the compression itself does.
    let ids = Tensor::from_vec(
        values(4 * 48, 99)
            .iter()
            .map(|v| ((v + 1.0) * 2047.0) as i64)
            .collect::<Vec<_>>(),
        (4, 48),
        &Device::Cpu,
    )
    .unwrap();
    let original = common::logits_of(&common::mini_model(), &ids);
    let (f32_logits, int8_logits) = (
        common::logits_of(&f32_out, &ids),
        common::logits_of(&int8_out, &ids),
    );
    // The mean |Δlogit| over 4 × 48 positions × 4096 logits: int8 storage moves the logits by a
    // small fraction of what the compression itself does (measured: 0.0121 against 0.193, 6%;
    // maxima 1.39 against 4.56); not quantising would leave them equal.
    let storage = common::mean_abs_diff(&int8_logits, &f32_logits);
    let compression = common::mean_abs_diff(&f32_logits, &original);
    println!(
        "mean |Δlogit|: int8 vs f32 factors {storage:.5}, f32 factors vs original {compression:.5}; \
         max {:.3} vs {:.3}",
        common::max_abs_diff(&int8_logits, &f32_logits),
        common::max_abs_diff(&f32_logits, &original)
    );
    assert!(storage > 0.0, "int8 factors left the logits unchanged");
    assert!(
        storage < 0.1 * compression,
        "int8 storage moved the logits by {storage} on average, the compression by {compression}"
    );
}

/// Bytes of a tensor of `shape` stored as int8 with its scales, and as bf16.
fn int8_and_bf16_bytes(shape: &[usize]) -> (u64, u64) {
    let (rows, cols) = (shape[0] as u64, shape[1] as u64);
    (
        rows * cols + 4 * rows * cols.div_ceil(BLOCK as u64),
        2 * rows * cols,
    )
}

#[test]
fn int8_routed_expert_bytes_follow_from_the_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let bf16_out = compress_mini(tmp.path(), "bf16", "auto");
    let int8_out = compress_mini(tmp.path(), "int8", "int8");
    let bf16 = rfid_moe::sweep::tensor_bytes(&bf16_out).unwrap();
    let int8 = rfid_moe::sweep::tensor_bytes(&int8_out).unwrap();
    let quantised = Checkpoint::open(&int8_out).unwrap();
    let (mut as_int8, mut as_bf16) = (0u64, 0u64);
    for name in int8_names(&quantised) {
        let shape = &quantised.info(&name).unwrap().0.shape;
        let (i, b) = int8_and_bf16_bytes(shape);
        as_int8 += i;
        as_bf16 += b;
    }
    // The report records the stored bytes as the finished checkpoint has them.
    for (out, bytes) in [(&bf16_out, &bf16), (&int8_out, &int8)] {
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("compression_report.json")).unwrap())
                .unwrap();
        let stored = &report["stored_bytes"];
        assert_eq!(stored["total"].as_u64(), Some(bytes.total));
        assert_eq!(
            stored["routed_experts"].as_u64(),
            Some(bytes.routed_experts)
        );
    }
    // Same allocation, so the outputs differ exactly by the compressor tensors' storage.
    assert_eq!(int8.routed_experts, bf16.routed_experts - as_bf16 + as_int8);
    assert_eq!(int8.total, bf16.total - as_bf16 + as_int8);
    let down_proj = bf16.routed_experts - as_bf16;
    println!(
        "routed experts: bf16 {} B, int8 {} B (compressor tensors {as_bf16} → {as_int8} B, down_proj {down_proj} B)",
        bf16.routed_experts, int8.routed_experts
    );
    // d = 128, p = 64: scales add at most 4 bytes per row of ≤ 128 values: ≤ 53% of bf16... for
    // rows of ≥ 128 columns; `lowrank_a` rows [p, K] with small K carry relatively more.
    assert!(as_int8 * 100 <= as_bf16 * 60, "{as_int8} vs {as_bf16}");
    assert!(as_int8 * 2 > as_bf16);
}

/// A copy of `dir` (a sharded checkpoint) for editing.
fn copy_dir(dir: &Path, out: &Path) -> PathBuf {
    std::fs::create_dir_all(out).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    out.to_path_buf()
}

fn load_error(dir: &Path) -> String {
    let checkpoint = Checkpoint::open(dir).unwrap();
    match rfid_moe::models::Model::load(&checkpoint, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(error) => error.to_string(),
    }
}

#[test]
fn a_missing_or_misshapen_scale_is_an_error_naming_the_tensor_and_the_expected_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let int8_out = compress_mini(tmp.path(), "int8", "int8");
    let quantised = Checkpoint::open(&int8_out).unwrap();
    let name = int8_names(&quantised)
        .into_iter()
        .find(|n| n.ends_with(".basis"))
        .unwrap();
    let scale = int8::scale_name(&name);
    let rows = quantised.info(&name).unwrap().0.shape[0];
    assert!(rows > 1, "a basis of rank > 1 to transpose its scales");
    let shard = quantised.info(&name).unwrap().1.to_path_buf();
    drop(quantised);

    // Missing: the index no longer lists the scales.
    let missing = copy_dir(&int8_out, &tmp.path().join("missing"));
    let index_path = missing.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"].as_object_mut().unwrap().remove(&scale);
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let message = load_error(&missing);
    for needle in [
        format!("`{scale}`"),
        format!("I8 tensor `{name}`"),
        format!("[{rows}, 1]"),
        shard.file_name().unwrap().to_string_lossy().into_owned(),
    ] {
        assert!(message.contains(&needle), "{needle:?} not in: {message}");
    }

    // Misshapen: the same bytes as [1, rows].
    let misshapen = copy_dir(&int8_out, &tmp.path().join("misshapen"));
    let file = misshapen.join(shard.file_name().unwrap());
    let (mut header, data) = common::read_safetensors_raw(&file);
    header[&scale]["shape"] = serde_json::json!([1, rows]);
    common::write_safetensors_raw(&file, &header, &data);
    let message = load_error(&misshapen);
    for needle in [
        format!("`{scale}`"),
        format!("I8 tensor `{name}`"),
        format!("F32 [{rows}, 1]"),
        format!("[1, {rows}]"),
    ] {
        assert!(message.contains(&needle), "{needle:?} not in: {message}");
    }

    // A bare I8 tensor read from its file alone (no checkpoint to find the scales in).
    let file = rfid_moe::checkpoint::SafetensorsFile::open(&shard).unwrap();
    let error = file.load(&name, DType::F32, &Device::Cpu).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&format!("`{name}` is I8")) && message.contains(&format!("`{scale}`")),
        "{message}"
    );
}

#[test]
fn the_dense_export_and_the_residual_of_an_int8_run_stay_in_the_checkpoint_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = tmp.path().join("dense");
    let int8_out = compress_mini_with(tmp.path(), "int8", "int8", |o| {
        o.output.export_dense = Some(dense.clone());
        common::lowrank_settings(o, |s| s.residual = true);
    });
    let (quantised, export) = (
        Checkpoint::open(&int8_out).unwrap(),
        Checkpoint::open(&dense).unwrap(),
    );
    let etas: Vec<&str> = quantised
        .tensor_names()
        .into_iter()
        .filter(|n| n.ends_with(".residual_eta"))
        .collect();
    assert!(!etas.is_empty());
    for name in etas {
        assert_eq!(
            quantised.info(name).unwrap().0.dtype,
            StoredDType::BF16,
            "{name}"
        );
    }
    let names = export.tensor_names();
    assert!(names.iter().all(|n| !n.ends_with(int8::SCALE_SUFFIX)));
    for name in names.iter().filter(|n| n.contains(".experts.")) {
        assert_eq!(
            export.info(name).unwrap().0.dtype,
            StoredDType::BF16,
            "{name}"
        );
    }
}

/// The experts of `checkpoint`'s MoE layers loaded with int8 tensors held as `holding`.
fn experts_holding(checkpoint: &Checkpoint, dtype: DType, holding: Int8Holding) -> Vec<Experts> {
    let spec = ArchConfig::from_checkpoint(checkpoint).unwrap().spec();
    let compression = rfid_moe::models::compression_record(checkpoint).unwrap();
    spec.moe_layers
        .iter()
        .enumerate()
        .filter_map(|(layer, layout)| layout.as_ref().map(|l| (layer, l)))
        .map(|(layer, layout)| {
            let at = (dtype, &Device::Cpu);
            let experts = RoutedExperts::load_holding_int8(
                layout,
                checkpoint,
                layer,
                compression.as_ref(),
                at,
                holding,
            )
            .unwrap();
            (layer, experts)
        })
        .collect()
}

/// A change to the compress options of one run.
type Tweak = Box<dyn FnOnce(&mut CompressOptions)>;

/// One MoE layer's index and experts.
type Experts = (usize, RoutedExperts);

/// `checkpoint`'s model in f32 with the experts of [`experts_holding`] swapped in.
fn model_holding(checkpoint: &Checkpoint, holding: Int8Holding) -> Model {
    let mut model = Model::load(checkpoint, DType::F32, &Device::Cpu).unwrap();
    for (layer, experts) in experts_holding(checkpoint, DType::F32, holding) {
        let FeedForward::Moe(block) = &mut model.layers[layer].feed_forward else {
            panic!("layer {layer} has no MoE block");
        };
        block.experts = experts;
    }
    model
}

/// Whether any routed-expert matrix of `model` is held as int8 codes.
fn holds_int8(model: &Model) -> bool {
    model.layers.iter().any(|layer| match &layer.feed_forward {
        FeedForward::Moe(block) => match &block.experts {
            RoutedExperts::Factored(f) => [&f.gate, &f.up, &f.down].iter().any(|p| {
                p.groups()
                    .iter()
                    .any(|g| g.basis.is_int8() || g.coefficients.iter().any(Weight::is_int8))
            }),
            _ => false,
        },
        FeedForward::Dense(_) => false,
    })
}

/// Bytes the int8 tensors of `checkpoint` save against holding them as f32 (codes and scales
/// against 4 bytes per value).
fn int8_saving_against_f32(checkpoint: &Checkpoint) -> u64 {
    int8_names(checkpoint)
        .iter()
        .map(|n| {
            let shape = &checkpoint.info(n).unwrap().0.shape;
            let (as_int8, as_bf16) = int8_and_bf16_bytes(shape);
            2 * as_bf16 - as_int8
        })
        .sum()
}

fn token_ids() -> Tensor {
    Tensor::from_vec(
        values(2 * 40, 5)
            .iter()
            .map(|v| ((v + 1.0) * 2047.0) as u32)
            .collect::<Vec<_>>(),
        (2, 40),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn resident_int8_experts_give_exactly_the_logits_of_dequantising_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let all = |o: &mut CompressOptions| o.budget.matrices = ExpertMatrix::ALL.to_vec();
    let runs: [(&str, Tweak); 3] = [
        ("gate-up", Box::new(|_| {})),
        ("down", Box::new(all)),
        (
            "pruned-down",
            Box::new(move |o| {
                all(o);
                o.methods = vec!["prune".into(), "lowrank".into(), "keep".into()];
            }),
        ),
    ];
    let ids = token_ids();
    for (name, tweak) in runs {
        let out = compress_mini_with(tmp.path(), name, "int8", tweak);
        let checkpoint = Checkpoint::open(&out).unwrap();
        let resident = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
        let reference = model_holding(&checkpoint, Int8Holding::Dequantised);
        assert!(holds_int8(&resident), "{name}: nothing held as int8");
        assert!(!holds_int8(&reference), "{name}: the reference holds int8");
        // The reference holds every int8 tensor as f32: 4 bytes per code, no scales.
        assert_eq!(
            resident.routed_expert_bytes() + int8_saving_against_f32(&checkpoint),
            reference.routed_expert_bytes(),
            "{name}"
        );
        let got = resident.forward(&ids, None).unwrap().logits;
        let want = reference.forward(&ids, None).unwrap().logits;
        assert_eq!(common::max_abs_diff(&got, &want), 0.0, "{name}");
        // Per expert (the observers' path) and as dense matrices, the same values too.
        for (layer, (r, d)) in resident.layers.iter().zip(&reference.layers).enumerate() {
            let (FeedForward::Moe(r), FeedForward::Moe(d)) = (&r.feed_forward, &d.feed_forward)
            else {
                continue;
            };
            for m in ExpertMatrix::ALL {
                for e in [0, r.experts.len() - 1] {
                    let (a, b) = (
                        r.experts.dense_matrix(e, m).unwrap(),
                        d.experts.dense_matrix(e, m).unwrap(),
                    );
                    assert_eq!(
                        common::max_abs_diff(&a, &b),
                        0.0,
                        "{name} layer {layer} {m} {e}"
                    );
                }
            }
        }
    }
}

/// Bytes of the int8 bases of `checkpoint` (codes and scales) and of the same bases in bf16.
fn int8_basis_bytes(checkpoint: &Checkpoint) -> (u64, u64) {
    int8_names(checkpoint)
        .iter()
        .filter(|n| n.ends_with(".basis") && !n.contains("down_proj"))
        .map(|n| int8_and_bf16_bytes(&checkpoint.info(n).unwrap().0.shape))
        .fold((0, 0), |(a, b), (i, f)| (a + i, b + f))
}

/// The routed experts' bytes held by `checkpoint`'s model loaded in bf16 (its stored dtype).
fn resident_bf16(checkpoint: &Checkpoint) -> u64 {
    experts_holding(checkpoint, DType::BF16, Int8Holding::Resident)
        .iter()
        .map(|(_, e)| e.resident_bytes())
        .sum()
}

#[test]
fn resident_bytes_of_int8_experts_are_their_stored_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let all = |o: &mut CompressOptions| o.budget.matrices = ExpertMatrix::ALL.to_vec();
    let bf16_out = compress_mini(tmp.path(), "bf16", "auto");
    let bf16_resident = resident_bf16(&Checkpoint::open(&bf16_out).unwrap());
    assert_eq!(
        bf16_resident,
        rfid_moe::sweep::tensor_bytes(&bf16_out)
            .unwrap()
            .routed_experts
    );
    let silu = |o: &mut CompressOptions| {
        common::lowrank_settings(o, |s| s.factorizer = FactorizerKind::Basis)
    };
    // The defaults: every method under the solver, a ratio of the bytes.
    let defaults = |o: &mut CompressOptions| {
        let defaults = CompressOptions::default();
        o.methods = defaults.methods;
        o.budget = defaults.budget;
        o.budget.ratio = 0.6;
        o.settings.clear();
    };
    let runs: [(&str, Tweak); 4] = [
        ("int8", Box::new(|_| {})),
        ("int8-down", Box::new(all)),
        ("int8-silu", Box::new(silu)),
        ("int8-defaults", Box::new(defaults)),
    ];
    for (name, tweak) in runs {
        let out = compress_mini_with(tmp.path(), name, "int8", tweak);
        let checkpoint = Checkpoint::open(&out).unwrap();
        let stored = rfid_moe::sweep::tensor_bytes(&out).unwrap().routed_experts;
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("compression_report.json")).unwrap())
                .unwrap();
        assert_eq!(
            report["stored_bytes"]["routed_experts"].as_u64(),
            Some(stored)
        );
        // A SiLU basis is held activated in the compute dtype (bf16 here); an identity basis
        // stays int8.
        let silu_basis = checkpoint.config()["compression"]["basis_activation"] == "silu";
        let (as_int8, as_bf16) = match silu_basis {
            true => int8_basis_bytes(&checkpoint),
            false => (0, 0),
        };
        assert_eq!(silu_basis, name == "int8-silu", "{name}");
        assert!(!silu_basis || as_int8 > 0, "{name}: no int8 basis");
        let resident = resident_bf16(&checkpoint);
        println!(
            "{name}: routed experts resident {resident} B, stored {stored} B; bf16 factors \
             resident {bf16_resident} B"
        );
        assert_eq!(resident, stored - as_int8 + as_bf16, "{name}");
        assert!(
            resident < bf16_resident,
            "{name}: {resident} vs {bf16_resident}"
        );
    }
}

#[test]
fn generation_with_resident_int8_experts_matches_dequantising_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let out = compress_mini_with(tmp.path(), "int8", "int8", |o| {
        o.budget.matrices = ExpertMatrix::ALL.to_vec();
    });
    let checkpoint = Checkpoint::open(&out).unwrap();
    let resident = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let reference = model_holding(&checkpoint, Int8Holding::Dequantised);
    let options = GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling::greedy(),
        stop_tokens: Vec::new(),
    };
    let prompt: Vec<u32> = token_ids().get(0).unwrap().to_vec1().unwrap();
    let run = |model: &Model| generate(model, &prompt, &options, &mut |_| Ok(true)).unwrap();
    let (got, want) = (run(&resident), run(&reference));
    assert_eq!(got.tokens.len(), 12);
    assert_eq!(got.tokens, want.tokens);
    assert!(got.kv_cache_bytes > 0 && got.kv_cache_bytes == want.kv_cache_bytes);
    assert_eq!(got.routed_expert_bytes, resident.routed_expert_bytes());
    assert_eq!(
        got.routed_expert_bytes + int8_saving_against_f32(&checkpoint),
        want.routed_expert_bytes
    );
    // The cached path's last logits are the full forward's last position's.
    let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = resident.new_cache();
    let split = prompt.len() / 2;
    resident
        .forward_cached(&ids.narrow(1, 0, split).unwrap(), &mut cache)
        .unwrap();
    let cached = resident
        .forward_cached(
            &ids.narrow(1, split, prompt.len() - split).unwrap(),
            &mut cache,
        )
        .unwrap();
    let full = resident.forward(&ids, None).unwrap().logits;
    let last = full.get(0).unwrap().get(prompt.len() - 1).unwrap();
    let diff = common::max_abs_diff(&cached.squeeze(0).unwrap(), &last);
    assert!(diff < 1e-3, "cached vs full last logits: {diff}");
}
