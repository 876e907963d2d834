//! The `quantise` method: experts stored in 2–8-bit block formats with GPTQ codes, bit-widths
//! chosen per expert by the solver. Outputs meet the budget (`--bpw` included), run with their
//! blocks resident (giving the logits of dequantising them at load), beat round-to-nearest at
//! the same bytes, and report the experts whose statistics were filled in.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rfid_moe::checkpoint::weight::Int8Holding;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::models::moe::RoutedExperts;
use rfid_moe::models::{ArchConfig, FeedForward, Model};
use rfid_moe::pipeline::methods::quantise::{
    Algorithm, CandidateErrors, QuantiseSettings, SAMPLED_ROWS,
};
use rfid_moe::pipeline::CompressOptions;
use rfid_moe::quant::Scheme;

/// Options for mini-moe-docs with `methods`, enough calibration text (32 windows of 128
/// tokens) for per-expert statistics, writing `out`.
fn mini_options(out: &Path, ratio: f64, methods: &[&str]) -> CompressOptions {
    let model = common::mini_model();
    let mut options =
        common::small_default_options(&model, &model.join("calibration.txt"), out, ratio);
    options.calibration.samples = 32;
    options.calibration.seq_len = 128;
    options.calibration.batch_size = 16;
    options.methods = methods.iter().map(|m| m.to_string()).collect();
    options
}

fn schemes(names: &[&str]) -> Vec<Scheme> {
    names.iter().map(|n| Scheme::parse(n).unwrap()).collect()
}

fn compress(options: &CompressOptions) -> PathBuf {
    rfid_moe::compress(options).unwrap();
    options.output.out.clone().unwrap()
}

/// Every member storage the output's compression record names.
fn storages(out: &Path) -> Vec<String> {
    let config = common::read_config(out);
    let mut found = Vec::new();
    for layer in config["compression"]["layers"].as_array().unwrap() {
        for matrix in layer["matrices"].as_object().unwrap().values() {
            for group in matrix["groups"].as_array().unwrap() {
                for s in group["storage"].as_array().into_iter().flatten() {
                    found.push(s.as_str().unwrap().to_string());
                }
            }
        }
    }
    found
}

/// Mean KL(reference ‖ candidate) per token of two logits tensors [batch, seq, vocab].
fn mean_kl(reference: &Tensor, candidate: &Tensor) -> f64 {
    let p = candle_nn::ops::log_softmax(&reference.to_dtype(DType::F64).unwrap(), 2).unwrap();
    let q = candle_nn::ops::log_softmax(&candidate.to_dtype(DType::F64).unwrap(), 2).unwrap();
    let kl = (p.exp().unwrap() * (&p - &q).unwrap()).unwrap();
    let tokens = (kl.dims()[0] * kl.dims()[1]) as f64;
    kl.sum_all().unwrap().to_scalar::<f64>().unwrap() / tokens
}

/// `checkpoint`'s model in f32 with its experts loaded as `holding` says.
fn model_holding(checkpoint: &Checkpoint, holding: Int8Holding) -> Model {
    let spec = ArchConfig::from_checkpoint(checkpoint).unwrap().spec();
    let compression = rfid_moe::models::compression_record(checkpoint).unwrap();
    let mut model = Model::load(checkpoint, DType::F32, &Device::Cpu).unwrap();
    for (layer, layout) in spec.moe_layers.iter().enumerate() {
        let Some(layout) = layout else { continue };
        let at = (DType::F32, &Device::Cpu);
        let experts = RoutedExperts::load_holding_int8(
            layout,
            checkpoint,
            layer,
            compression.as_ref(),
            at,
            holding,
        )
        .unwrap();
        let FeedForward::Moe(block) = &mut model.layers[layer].feed_forward else {
            panic!("layer {layer} has no MoE block");
        };
        block.experts = experts;
    }
    model
}

/// How many routed-expert matrices of `model` are held as packed blocks.
fn packed_members(model: &Model) -> usize {
    model
        .layers
        .iter()
        .filter_map(|layer| match &layer.feed_forward {
            FeedForward::Moe(block) => Some(&block.experts),
            _ => None,
        })
        .map(|experts| match experts {
            RoutedExperts::Factored(f) => [&f.gate, &f.up, &f.down]
                .iter()
                .map(|p| p.dense_members().filter(|w| w.is_packed()).count())
                .sum(),
            _ => 0,
        })
        .sum()
}

#[test]
fn bits_per_weight_sizes_the_output_and_its_blocks_run_as_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::mini_model();
    let mut options = mini_options(&tmp.path().join("q"), 0.0, &["quantise", "keep"]);
    options.budget.bits_per_weight = Some(4.0);
    options
        .update_settings::<QuantiseSettings>(|s| {
            s.schemes = schemes(&[
                "int2-g64-asym",
                "int3-g64-asym",
                "int4-g64-asym",
                "q4_0",
                "q8_0",
            ])
        })
        .unwrap();
    let out = compress(&options);
    // 4 bits of the input's 16 per weight, within half a point.
    let kept = common::kept_share(&model, &out);
    assert!((kept - 0.25).abs() <= 0.005, "kept {kept}");
    let used = storages(&out);
    for scheme in ["int2-g64-asym", "int3-g64-asym", "int4-g64-asym"] {
        assert!(
            used.iter().any(|s| s == scheme),
            "{scheme} never chosen: {used:?}"
        );
    }
    // Packed matrices count the parameters they stand for: nothing was removed.
    let counted = |dir: &Path| {
        rfid_moe::inspect::parameter_counts(&Checkpoint::open(dir).unwrap()).routed_experts
    };
    assert_eq!(counted(&out), counted(&model));
    // The runtime keeps the blocks (ggml ones through candle's quantised matmul) and gives the
    // logits of dequantising them at load: exactly for the integer groups, within the 8-bit
    // activation rounding of ggml's kernels for its blocks.
    let checkpoint = Checkpoint::open(&out).unwrap();
    let resident = model_holding(&checkpoint, Int8Holding::Resident);
    let reference = model_holding(&checkpoint, Int8Holding::Dequantised);
    assert!(packed_members(&resident) > 0);
    assert_eq!(packed_members(&reference), 0);
    assert!(resident.routed_expert_bytes() < reference.routed_expert_bytes() / 6);
    let ids = common::mini_ids();
    let got = resident.forward(&ids, None).unwrap().logits;
    let want = reference.forward(&ids, None).unwrap().logits;
    let ggml = used.iter().any(|s| s.starts_with('q'));
    let kl = mean_kl(&want, &got);
    match ggml {
        true => assert!(kl < 1e-3, "resident vs dequantised KL {kl}"),
        false => assert!(common::max_abs_diff(&got, &want) < 1e-4),
    }
    // And close to the original model: 4 bits per weight costs little.
    let original = common::logits_of(&model, &ids);
    let kl = mean_kl(&original, &got);
    assert!(kl < 0.05, "KL to the original {kl}");
}

#[test]
fn integer_groups_are_held_resident_at_their_stored_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = mini_options(&tmp.path().join("q"), 0.7, &["quantise"]);
    options
        .update_settings::<QuantiseSettings>(|s| s.schemes = schemes(&["int4-g64-sym"]))
        .unwrap();
    let out = compress(&options);
    let checkpoint = Checkpoint::open(&out).unwrap();
    let stored: u64 = checkpoint
        .tensor_names()
        .iter()
        .filter(|n| n.ends_with(".int4-g64-sym"))
        .map(|n| checkpoint.raw_bytes(n).unwrap().len() as u64)
        .sum();
    assert!(stored > 0);
    let model = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.routed_expert_bytes(), stored);
    let ids = common::mini_ids();
    let logits = model.forward(&ids, None).unwrap().logits;
    let finite = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(finite.iter().all(|v| v.is_finite()));
}

#[test]
fn gptq_codes_beat_round_to_nearest_at_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::mini_model();
    let ids = common::mini_ids();
    let original = common::logits_of(&model, &ids);
    // Rounding to nearest has no GPTQ codes to refine: its saved settings say none ran.
    let expected_passes = |algorithm| match algorithm {
        Algorithm::Rtn => 0,
        _ => QuantiseSettings::default().refine_passes,
    };
    let run = |name: &str, algorithm: Algorithm| {
        let mut options = mini_options(&tmp.path().join(name), 0.7, &["quantise"]);
        options
            .update_settings::<QuantiseSettings>(|s| {
                s.schemes = schemes(&["int3-g64-asym"]);
                s.algorithm = algorithm;
            })
            .unwrap();
        let out = compress(&options);
        let report = rfid_moe::checkpoint::read_json(&out.join("compression_report.json")).unwrap();
        let estimated = report["budget"]["estimated_error"].as_f64().unwrap();
        let kl = mean_kl(&original, &common::logits_of(&out, &ids));
        let saved = std::fs::read_to_string(out.join("compress.toml")).unwrap();
        let passes = format!("refine_passes = {}\n", expected_passes(algorithm));
        assert!(saved.contains(&passes), "{passes} in {saved}");
        (common::kept_share(&model, &out), estimated, kl)
    };
    let (gptq_kept, gptq_estimate, gptq_kl) = run("gptq", Algorithm::Gptq);
    let (rtn_kept, rtn_estimate, rtn_kl) = run("rtn", Algorithm::Rtn);
    assert_eq!(gptq_kept, rtn_kept);
    assert!(
        gptq_estimate < 0.8 * rtn_estimate,
        "estimated {gptq_estimate} vs {rtn_estimate}"
    );
    assert!(gptq_kl < 0.9 * rtn_kl, "measured KL {gptq_kl} vs {rtn_kl}");
}

#[test]
fn experts_with_few_tokens_are_filled_in_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let filled = |name: &str, min_tokens: usize| {
        let mut options = mini_options(&tmp.path().join(name), 0.7, &["quantise"]);
        options
            .update_settings::<QuantiseSettings>(|s| {
                s.schemes = schemes(&["int4-g64-asym"]);
                s.min_tokens = min_tokens;
            })
            .unwrap();
        let out = compress(&options);
        let report = rfid_moe::checkpoint::read_json(&out.join("compression_report.json")).unwrap();
        report["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|layer| {
                let q = &layer["quantisation"];
                let counts: Vec<u64> = layer["routing_counts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_u64().unwrap())
                    .collect();
                let named: Vec<(usize, u64)> = q["filled_in"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| (e[0].as_u64().unwrap() as usize, e[1].as_u64().unwrap()))
                    .collect();
                (counts, named)
            })
            .collect::<Vec<_>>()
    };
    // Every expert below the threshold is named with its routed tokens, and no other.
    let threshold = 400;
    for (counts, named) in filled("some", threshold) {
        let below: Vec<(usize, u64)> = counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| (c as usize) < threshold)
            .map(|(e, &c)| (e, c))
            .collect();
        assert_eq!(named, below);
    }
    assert!(filled("none", 0).iter().all(|(_, named)| named.is_empty()));
}

#[test]
fn a_packed_tensor_that_is_not_blocks_of_bytes_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = mini_options(&tmp.path().join("q"), 0.7, &["quantise"]);
    options
        .update_settings::<QuantiseSettings>(|s| s.schemes = schemes(&["int4-g64-asym"]))
        .unwrap();
    let out = compress(&options);
    let shard = common::shard_holding(&out, |n| n.ends_with(".int4-g64-asym"));
    let path = out.join(&shard);
    let (mut header, data) = common::read_safetensors_raw(&path);
    let name = header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| k.ends_with(".int4-g64-asym"))
        .unwrap()
        .clone();
    // The same bytes read as f16: a float tensor under a packed name.
    let shape = header[&name]["shape"].as_array().unwrap().clone();
    let (rows, row_bytes) = (shape[0].as_u64().unwrap(), shape[1].as_u64().unwrap());
    header[&name]["shape"] = serde_json::json!([rows, row_bytes / 2]);
    header[&name]["dtype"] = serde_json::json!("F16");
    common::write_safetensors_raw(&path, &header, &data);
    let error = Checkpoint::open(&out).unwrap_err().to_string();
    assert!(error.contains(&name) && error.contains("F16"), "{error}");
}

/// A copy of the tiny Qwen3-MoE fixture whose experts have `intermediate` rows in gate and up
/// (and columns in down), filled with seeded random values.
fn tall_experts_copy(intermediate: usize, out: &Path) -> PathBuf {
    let source = common::fixture("tiny-qwen3_moe");
    let checkpoint = Checkpoint::open(&source).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for name in checkpoint.tensor_names() {
        let tensor = checkpoint
            .load(name, DType::F32, &Device::Cpu, "test")
            .unwrap();
        tensors.insert(name.to_string(), tensor);
    }
    let mut rng = rfid_moe::rng::SplitMix64::new(0x7a11);
    for (name, tensor) in tensors.iter_mut() {
        if !name.contains(".experts.") {
            continue;
        }
        let (rows, cols) = tensor.dims2().unwrap();
        let shape = match name.contains("down_proj") {
            true => (rows, intermediate),
            false => (intermediate, cols),
        };
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| 0.08 * rng.normal() as f32)
            .collect();
        *tensor = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
    }
    common::write_checkpoint(&checkpoint, tensors, out);
    common::edit_config(out, |c| {
        c["moe_intermediate_size"] = serde_json::json!(intermediate)
    });
    out.to_path_buf()
}

#[test]
fn sampled_estimates_hold_on_matrices_taller_than_the_row_sample() {
    let tmp = tempfile::tempdir().unwrap();
    // gate and up get more rows than the estimates sample, so their sampled rows stand for
    // the rest by their share of the energy.
    let intermediate = SAMPLED_ROWS + 32;
    let model = tall_experts_copy(intermediate, &tmp.path().join("tall"));
    let calibration = common::random_token_windows(
        &tmp.path().join("calibration.safetensors"),
        256,
        16,
        64,
        0x5eed,
    );
    let run = |name: &str, errors: CandidateErrors| {
        let out = tmp.path().join(name);
        let mut options = common::small_default_options(&model, &calibration, &out, 0.78);
        options.methods = vec!["quantise".into(), "keep".into()];
        options
            .update_settings::<QuantiseSettings>(|s| {
                s.schemes = schemes(&["int2-g32-asym", "int3-g32-asym", "int4-g32-asym"]);
                s.errors = errors;
            })
            .unwrap();
        let report = rfid_moe::compress(&options).unwrap();
        let estimated = report.budget.estimated_error;
        let ids = Tensor::new(&[[1i64, 5, 9, 2, 7, 3]], &Device::Cpu).unwrap();
        let kl = mean_kl(
            &common::logits_of(&model, &ids),
            &common::logits_of(&out, &ids),
        );
        (common::kept_share(&model, &out), estimated, kl)
    };
    let (exact_kept, exact_estimate, exact_kl) = run("exact", CandidateErrors::Gptq);
    let (sampled_kept, sampled_estimate, sampled_kl) = run("sampled", CandidateErrors::Sampled);
    assert!(
        exact_kept <= 0.225 && sampled_kept <= 0.225,
        "{exact_kept} {sampled_kept}"
    );
    assert!(
        (sampled_kept - exact_kept).abs() < 0.01,
        "{exact_kept} {sampled_kept}"
    );
    let ratio = sampled_estimate / exact_estimate;
    eprintln!("estimate ratio {ratio:.4}, KL exact {exact_kl:.5} sampled {sampled_kl:.5}");
    assert!(
        (0.9..1.1).contains(&ratio),
        "estimated {sampled_estimate} vs {exact_estimate}"
    );
    assert!(sampled_kl < 1.1 * exact_kl, "KL {sampled_kl} vs {exact_kl}");
}
