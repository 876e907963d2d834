//! compressed-tensors output (docs/FORMAT.md, "compressed-tensors output"): quantised experts
//! written as `pack-quantized` integer groups read back into rfid-moe with the logits of the
//! checkpoint they came from, bit for bit; a plain checkpoint converts to itself; layouts the
//! format or rfid-moe cannot hold are refused by name; transformers (with the PyPI
//! `compressed-tensors` package, no remote code) loads the output with rfid-moe's logits; and,
//! opt-in, vLLM on the CPU scores it as rfid-moe does.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use rfid_moe::checkpoint::experts::ExpertMatrix;
use rfid_moe::checkpoint::packed::packed_name;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::export::compressed_tensors;
use rfid_moe::models::{ArchConfig, Model};
use rfid_moe::pipeline::methods::quantise::QuantiseSettings;
use rfid_moe::pipeline::OutputFormat;
use rfid_moe::quant::Scheme;
use serde_json::{json, Value};

/// Set to `1` to skip the transformers test (loudly) where its Python cannot be installed.
const SKIP_PYTHON_VAR: &str = "RFID_MOE_SKIP_PYTHON_TESTS";
/// A Python with torch, transformers 5 and compressed-tensors, instead of the pinned one.
const PYTHON_VAR: &str = "RFID_MOE_PYTHON";
/// Set to `1` to run the vLLM test (it fails when vLLM cannot be had).
const VLLM_VAR: &str = "RFID_MOE_VLLM";
/// The logits tolerance against transformers (f32 on the CPU in both runtimes).
const TOLERANCE: f32 = 1e-4;
/// The mean logits tolerance where transformers runs the experts in bf16 (seen: 0.0077).
const ROUNDED_MEAN_TOLERANCE: f32 = 0.02;

/// Compresses mini-moe-docs into `out`: 2 of the 16 experts of each layer removed, the others
/// quantised in `schemes`, `ratio` of the routed experts' bytes removed in all (4 windows of 64
/// calibration tokens).
fn quantised_mini(out: &Path, schemes: &[&str], ratio: f64) -> PathBuf {
    let model = common::mini_model();
    let mut options =
        common::small_default_options(&model, &model.join("calibration.txt"), out, ratio);
    options.calibration.samples = 4;
    options.calibration.seq_len = 64;
    options.calibration.batch_size = 4;
    options.methods = vec!["prune".into(), "quantise".into()];
    common::prune_settings(&mut options, |s| s.fraction = Some(0.125));
    let schemes: Vec<Scheme> = schemes.iter().map(|s| Scheme::parse(s).unwrap()).collect();
    options
        .update_settings::<QuantiseSettings>(|s| s.schemes = schemes)
        .unwrap();
    rfid_moe::compress(&options).unwrap();
    out.to_path_buf()
}

/// Writes `source` as compressed-tensors into a new directory `out`.
fn export(source: &Path, out: &Path) -> rfid_moe::Result<PathBuf> {
    std::fs::create_dir_all(out).unwrap();
    compressed_tensors::write(&Checkpoint::open(source).unwrap(), out)?;
    Ok(out.to_path_buf())
}

/// The schemes of the packed tensors of the checkpoint at `dir`, with how many use each.
fn packed_schemes(dir: &Path) -> HashMap<String, usize> {
    let checkpoint = Checkpoint::open(dir).unwrap();
    let mut found = HashMap::new();
    for name in checkpoint.tensor_names() {
        if let Some((_, scheme)) = rfid_moe::checkpoint::packed::parse_packed_name(name) {
            *found.entry(scheme.name()).or_insert(0) += 1;
        }
    }
    found
}

/// Asserts that the compressed-tensors checkpoint `ct` written from `source` reads back as the
/// same packed matrices and gives `source`'s f32 logits bit for bit.
fn assert_round_trip(source: &Path, ct: &Path, ids: &Tensor) {
    let ours = Checkpoint::open(source).unwrap();
    let back = Checkpoint::open(ct).unwrap();
    let mut packed = 0;
    for name in ours.tensor_names() {
        match rfid_moe::checkpoint::packed::parse_packed_name(name) {
            Some((matrix, _)) => {
                let (info, bytes) = ours.packed_bytes(matrix).unwrap();
                let (back_info, back_bytes) = back.packed_bytes(matrix).unwrap();
                assert_eq!(info.scheme, back_info.scheme, "{name}");
                assert!(bytes == back_bytes, "{name}: repacked bytes differ");
                packed += 1;
            }
            None => assert_eq!(ours.raw_bytes(name), back.raw_bytes(name), "{name}"),
        }
    }
    let model = Model::load(&back, DType::F32, &Device::Cpu).unwrap();
    let reference = Model::load(&ours, DType::F32, &Device::Cpu).unwrap();
    // Held as blocks, as rfid-moe's own quantised checkpoints are.
    let stored: u64 = ours
        .tensor_names()
        .iter()
        .filter(|n| rfid_moe::checkpoint::packed::parse_packed_name(n).is_some())
        .map(|n| ours.raw_bytes(n).unwrap().len() as u64)
        .sum();
    if packed > 0 {
        assert_eq!(model.routed_expert_bytes(), stored, "{packed} packed");
    }
    let got = model.forward(ids, None).unwrap().logits;
    let want = reference.forward(ids, None).unwrap().logits;
    let diff = common::max_abs_diff(&got, &want);
    assert_eq!(
        diff,
        0.0,
        "logits of {} vs {}",
        ct.display(),
        source.display()
    );
}

/// The stored tensor names of the checkpoint files in `dir` (every shard).
fn stored_names(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let (header, _) = common::read_safetensors_raw(&path);
            names.extend(
                header
                    .as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| *k != "__metadata__")
                    .cloned(),
            );
        }
    }
    names.sort();
    names
}

#[test]
fn pruned_int4_experts_round_trip_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let source = quantised_mini(&tmp.path().join("q4"), &["int4-g32-sym"], 0.6);
    let schemes = packed_schemes(&source);
    assert_eq!(schemes.keys().collect::<Vec<_>>(), vec!["int4-g32-sym"]);
    let config = common::read_config(&source);
    let experts = |c: &Value| c["num_local_experts"].as_u64().unwrap();
    assert_eq!(experts(&config), 14, "2 of 16 experts removed per layer");
    let ct = export(&source, &tmp.path().join("ct")).unwrap();
    let ct_config = common::read_config(&ct);
    assert_eq!(ct_config["model_type"], "qwen3_moe");
    assert_eq!(ct_config["architectures"], json!(["Qwen3MoeForCausalLM"]));
    assert!(ct_config.get("compression").is_none() && ct_config.get("auto_map").is_none());
    let q = &ct_config["quantization_config"];
    assert_eq!(q["quant_method"], "compressed-tensors");
    assert_eq!(q["format"], "pack-quantized");
    assert_eq!(q["quantization_status"], "compressed");
    let groups = q["config_groups"].as_object().unwrap();
    assert_eq!(groups.len(), 1);
    let group = &groups["group_0"];
    assert_eq!(group["weights"]["num_bits"], 4);
    assert_eq!(group["weights"]["group_size"], 32);
    assert_eq!(group["weights"]["symmetric"], true);
    assert_eq!(group["weights"]["strategy"], "group");
    // One target per layer and matrix; every float linear module ignored.
    assert_eq!(group["targets"].as_array().unwrap().len(), 4 * 3);
    let ignore: Vec<&str> = q["ignore"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for module in [
        "lm_head",
        "model.layers.0.mlp.gate",
        "model.layers.3.self_attn.q_proj",
    ] {
        assert!(ignore.contains(&module), "{module} not ignored: {ignore:?}");
    }
    assert!(!ignore.iter().any(|m| m.contains(".experts.")));
    // The triple of one expert matrix, and no rfid-moe names left.
    let names = stored_names(&ct);
    let expert = "model.layers.0.mlp.experts.0.down_proj";
    for suffix in ["weight_packed", "weight_scale", "weight_shape"] {
        assert!(names.contains(&format!("{expert}.{suffix}")), "{suffix}");
    }
    assert!(!names
        .iter()
        .any(|n| n.ends_with("-sym") || n.contains("lowrank")));
    assert!(ct.join("tokenizer.json").is_file());
    assert_round_trip(&source, &ct, &common::mini_ids());
}

#[test]
fn int8_experts_round_trip_in_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let source = quantised_mini(&tmp.path().join("q8"), &["int8-g64-sym"], 0.4);
    assert_eq!(
        packed_schemes(&source).keys().collect::<Vec<_>>(),
        vec!["int8-g64-sym"]
    );
    let ct = tmp.path().join("ct");
    std::fs::create_dir(&ct).unwrap();
    let checkpoint = Checkpoint::open(&source).unwrap();
    let options = compressed_tensors::WriteOptions {
        max_shard_bytes: 1 << 20,
        ..Default::default()
    };
    compressed_tensors::write_with(&checkpoint, &ct, &options).unwrap();
    let index = rfid_moe::checkpoint::read_json(&ct.join("model.safetensors.index.json")).unwrap();
    let files: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(files.len() > 1, "{files:?}");
    assert!(!ct.join("model.safetensors").exists());
    assert!(common::hidden_entries(&ct).is_empty());
    let q = &common::read_config(&ct)["quantization_config"];
    assert_eq!(q["config_groups"]["group_0"]["weights"]["num_bits"], 8);
    assert_eq!(q["config_groups"]["group_0"]["weights"]["group_size"], 64);
    assert_round_trip(&source, &ct, &common::mini_ids());
}

#[test]
fn a_checkpoint_with_nothing_quantised_converts_to_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let source = common::mini_model();
    let ct = export(&source, &tmp.path().join("plain")).unwrap();
    let config = common::read_config(&ct);
    assert!(config.get("quantization_config").is_none());
    assert_eq!(config["architectures"], json!(["Qwen3MoeForCausalLM"]));
    assert_eq!(stored_names(&ct), stored_names(&source));
    let ids = common::mini_ids();
    let got = common::logits_of(&ct, &ids);
    assert_eq!(
        common::max_abs_diff(&got, &common::logits_of(&source, &ids)),
        0.0
    );
}

/// A copy of `source` at `out` whose routed-expert matrices are packed as `scheme_of` says
/// (round to nearest; None keeps the matrix as it is stored), without a compression record.
fn packed_copy(
    source: &Path,
    out: &Path,
    scheme_of: impl Fn(usize, usize, ExpertMatrix) -> Option<Scheme>,
) -> PathBuf {
    let checkpoint = Checkpoint::open(source).unwrap();
    let spec = ArchConfig::from_checkpoint(&checkpoint).unwrap().spec();
    let mut packed = HashMap::new();
    for (layer, layout) in spec.moe_layers.iter().enumerate() {
        let Some(layout) = layout else { continue };
        for matrix in ExpertMatrix::ALL {
            for expert in 0..layout.num_experts {
                if let Some(scheme) = scheme_of(layer, expert, matrix) {
                    packed.insert(layout.dense_name(expert, matrix), scheme);
                }
            }
        }
    }
    let mut tensors = HashMap::new();
    for name in checkpoint.tensor_names() {
        let tensor = checkpoint.load_stored(name, "test").unwrap();
        match packed.get(name) {
            Some(&scheme) => {
                let (rows, cols) = tensor.dims2().unwrap();
                let values = tensor.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                let bytes = scheme
                    .quantise_nearest(&values.to_vec1::<f32>().unwrap(), cols, None)
                    .unwrap();
                let stored = Tensor::from_vec(bytes, (rows, scheme.row_bytes(cols)), &Device::Cpu);
                tensors.insert(packed_name(name, scheme), stored.unwrap());
            }
            None => {
                tensors.insert(name.to_string(), tensor);
            }
        }
    }
    std::fs::create_dir_all(out).unwrap();
    rfid_moe::checkpoint::writer::save_safetensors_atomic(&out.join("model.safetensors"), &tensors)
        .unwrap();
    std::fs::copy(source.join("config.json"), out.join("config.json")).unwrap();
    out.to_path_buf()
}

#[test]
fn fixture_families_with_shared_experts_and_mla_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let calibration =
        common::random_token_windows(&tmp.path().join("ids.safetensors"), 256, 16, 32, 7);
    let ids = Tensor::from_vec(
        (0..64).map(|i| (i * 37 % 256) as i64).collect::<Vec<_>>(),
        (2, 32),
        &Device::Cpu,
    )
    .unwrap();
    for family in ["tiny-qwen2_moe", "tiny-deepseek_v2"] {
        let out = tmp.path().join(family);
        let mut options =
            common::small_default_options(&common::fixture(family), &calibration, &out, 0.6);
        options.methods = vec!["prune".into(), "quantise".into()];
        common::prune_settings(&mut options, |s| s.fraction = Some(0.25));
        options
            .update_settings::<QuantiseSettings>(|s| {
                s.schemes = vec![Scheme::parse("int4-g32-sym").unwrap()]
            })
            .unwrap();
        rfid_moe::compress(&options).unwrap();
        assert_eq!(
            packed_schemes(&out).keys().collect::<Vec<_>>(),
            vec!["int4-g32-sym"],
            "{family}"
        );
        let ct = export(&out, &tmp.path().join(format!("{family}-ct"))).unwrap();
        let q = &common::read_config(&ct)["quantization_config"];
        // f32 fixtures: f32 scales.
        let names = stored_names(&ct);
        let scale = names.iter().find(|n| n.ends_with(".weight_scale")).unwrap();
        let shard = ct.join("model.safetensors");
        let (header, _) = common::read_safetensors_raw(&shard);
        assert_eq!(header[scale]["dtype"], "F32", "{family}");
        let ignore = q["ignore"].as_array().unwrap();
        assert!(ignore
            .iter()
            .any(|m| m.as_str().unwrap().contains("shared_expert")));
        assert_round_trip(&out, &ct, &ids);
    }
}

#[test]
fn layouts_the_format_cannot_hold_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let mini = common::mini_model();
    let int4 = Scheme::parse("int4-g32-sym").unwrap();
    let int8 = Scheme::parse("int8-g32-sym").unwrap();
    let message = |source: &Path, name: &str| {
        let error = export(source, &tmp.path().join(name)).unwrap_err();
        assert!(std::fs::read_dir(tmp.path().join(name))
            .unwrap()
            .next()
            .is_none());
        error.to_string()
    };
    // Two schemes in layer 2.
    let mixed = packed_copy(&mini, &tmp.path().join("mixed"), |layer, expert, _| {
        Some(if layer == 2 && expert == 5 {
            int8
        } else {
            int4
        })
    });
    let error = message(&mixed, "mixed-ct");
    assert!(
        error.contains("layer 2") && error.contains("int8-g32-sym"),
        "{error}"
    );
    assert!(error.contains("int4-g32-sym"), "{error}");
    // Floats beside packed experts in one layer.
    let partial = packed_copy(&mini, &tmp.path().join("partial"), |layer, expert, m| {
        (layer != 1 || expert != 0 || m != ExpertMatrix::Up).then_some(int4)
    });
    let error = message(&partial, "partial-ct");
    assert!(
        error.contains("layer 1") && error.contains("float"),
        "{error}"
    );
    // An asymmetric scheme, named with its tensor.
    let asym = Scheme::parse("int4-g32-asym").unwrap();
    let asymmetric = packed_copy(&mini, &tmp.path().join("asym"), |_, _, _| Some(asym));
    let error = message(&asymmetric, "asym-ct");
    assert!(
        error.contains("model.layers.0.mlp.experts.0.gate_proj.weight.int4-g32-asym"),
        "{error}"
    );
    // Group 256 is not among Marlin's groups.
    let wide = Scheme::parse("int4-g256-sym").unwrap();
    assert!(!compressed_tensors::holds(wide));
}

/// Rewrites the `quantization_config` of the compressed-tensors checkpoint at `dir` with `edit`
/// and returns the error of opening it.
fn open_error(dir: &Path, edit: impl FnOnce(&mut Value)) -> String {
    let saved = std::fs::read(dir.join("config.json")).unwrap();
    common::edit_config(dir, |c| edit(&mut c["quantization_config"]));
    let error = Checkpoint::open(dir).unwrap_err().to_string();
    std::fs::write(dir.join("config.json"), saved).unwrap();
    error
}

#[test]
fn compressed_tensors_layouts_rfid_moe_cannot_run_are_refused_by_key() {
    let tmp = tempfile::tempdir().unwrap();
    let int4 = Scheme::parse("int4-g32-sym").unwrap();
    let source = packed_copy(&common::mini_model(), &tmp.path().join("q"), |_, _, _| {
        Some(int4)
    });
    let ct = export(&source, &tmp.path().join("ct")).unwrap();
    assert_round_trip(&source, &ct, &common::mini_ids());
    let cases: [(&str, fn(&mut Value)); 5] = [
        ("quantization_config.format", |q| {
            q["format"] = json!("float-quantized")
        }),
        ("config_groups.group_0.weights.symmetric", |q| {
            q["config_groups"]["group_0"]["weights"]["symmetric"] = json!(false)
        }),
        ("config_groups.group_0.weights.strategy", |q| {
            q["config_groups"]["group_0"]["weights"]["strategy"] = json!("channel")
        }),
        ("config_groups.group_0.input_activations", |q| {
            q["config_groups"]["group_0"]["input_activations"] = json!({"num_bits": 8})
        }),
        ("config_groups.group_0.weights.num_bits", |q| {
            q["config_groups"]["group_0"]["weights"]["num_bits"] = json!(3)
        }),
    ];
    for (key, edit) in cases {
        let error = open_error(&ct, edit);
        assert!(error.contains(key), "{key}: {error}");
    }
    let error = open_error(&ct, |q| q["format"] = json!("marlin-24"));
    assert!(error.contains("marlin-24"), "{error}");
    // A group size the stored scales contradict.
    let error = open_error(&ct, |q| {
        q["config_groups"]["group_0"]["weights"]["group_size"] = json!(64)
    });
    assert!(
        error.contains("weight_packed") || error.contains("match none"),
        "{error}"
    );
}

/// The Python to use, or None when the user opted out (`test` names the test skipped).
fn pinned_python(test: &str) -> Option<PathBuf> {
    common::external_tool(
        &common::ExternalTool {
            skip_var: SKIP_PYTHON_VAR,
            path_var: PYTHON_VAR,
            script: "scripts/python-env.sh",
            unchecked: "transformers' reading of compressed-tensors output",
            usable: |path| path.exists(),
            skip_if_uninstallable: false,
        },
        test,
    )
}

/// transformers' fused expert tensors of `ours` (a checkpoint rfid-moe reads) for MoE layer
/// `layer`: `gate_up_proj` [n, 2p, d] and `down_proj` [n, d, p] as rfid-moe dequantises them.
fn fused_experts(ours: &Checkpoint, layer: usize) -> (Tensor, Tensor) {
    let spec = ArchConfig::from_checkpoint(ours).unwrap().spec();
    let layout = spec.moe_layers[layer].as_ref().unwrap();
    let stack = |m| {
        Tensor::stack(
            &layout
                .load_matrix(ours, m, DType::F32, &Device::Cpu)
                .unwrap(),
            0,
        )
        .unwrap()
    };
    let gate_up = Tensor::cat(&[stack(ExpertMatrix::Gate), stack(ExpertMatrix::Up)], 1).unwrap();
    (gate_up, stack(ExpertMatrix::Down))
}

#[test]
fn transformers_loads_the_output_without_remote_code() {
    let Some(python) = pinned_python("transformers_loads_the_output_without_remote_code") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let int4 = Scheme::parse("int4-g32-sym").unwrap();
    // A pipeline output of the bf16 mini model, and an f32 fixture with shared experts.
    let mini = quantised_mini(&work.join("mini-q4"), &["int4-g32-sym"], 0.6);
    let fixture = packed_copy(
        &common::fixture("tiny-qwen2_moe"),
        &work.join("qwen2-q4"),
        |_, _, _| Some(int4),
    );
    let f32_scales = work.join("mini-ct-f32");
    std::fs::create_dir(&f32_scales).unwrap();
    let options = compressed_tensors::WriteOptions {
        scales: compressed_tensors::ScaleDtype::F32,
        ..Default::default()
    };
    let checkpoint = Checkpoint::open(&mini).unwrap();
    compressed_tensors::write_with(&checkpoint, &f32_scales, &options).unwrap();
    // (name, directory, whether transformers rounds the expert weights to bf16 (bf16 scales),
    // whether anything is quantised)
    let mut cases = vec![
        (
            "mini".to_string(),
            export(&mini, &work.join("mini-ct")).unwrap(),
            true,
            true,
        ),
        ("mini f32 scales".to_string(), f32_scales, false, true),
        (
            "qwen2_moe".to_string(),
            export(&fixture, &work.join("qwen2-ct")).unwrap(),
            false,
            true,
        ),
    ];
    // Every other family transformers runs, pruned and quantised by the pipeline (f32 fixtures:
    // f32 scales, so transformers' values are ours exactly), at a ratio that leaves room for
    // float layers: the format packs every layer it can, since transformers 5.17 reads a
    // compressed-tensors model's experts only in packed form. tiny-mixtral's down_proj has 48
    // input columns, which no group of 32, 64 or 128 divides: the format cannot quantise it, so
    // it is only pruned.
    for (family, ratio, quantised) in [
        ("mixtral", 0.25, false),
        ("olmoe", 0.4, true),
        ("qwen3_moe", 0.4, true),
        ("deepseek_v2", 0.4, true),
        ("deepseek_v3", 0.4, true),
    ] {
        let out = pruned_and_quantised_fixture(&format!("tiny-{family}"), work, ratio, quantised);
        cases.push((family.to_string(), out, false, quantised));
    }
    let ids = common::mini_ids().narrow(0, 0, 2).unwrap();
    let ids = ids.clamp(0i64, 255i64).unwrap();
    common::write_input_ids(&work.join("ids.safetensors"), ids.clone());
    let job = json!({
        "input_ids": work.join("ids.safetensors"),
        "tensors_out": work.join("py.safetensors"),
        "results_out": work.join("py.json"),
        "cases": cases.iter().map(|(n, d, ..)| json!({"name": n, "dir": d})).collect::<Vec<_>>(),
    });
    std::fs::write(work.join("job.json"), job.to_string()).unwrap();
    common::run_python_driver(&python, "tests/ct_transformers.py", &work.join("job.json"));
    let results: Value =
        serde_json::from_slice(&std::fs::read(work.join("py.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(work.join("py.safetensors"), &Device::Cpu).unwrap();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(name, dir, rounded, quantised)| {
            let case = LoadedCase {
                name,
                dir,
                rounded: *rounded,
                quantised: *quantised,
            };
            check_loaded_case(&case, &results[name.as_str()], &tensors, &ids)
        })
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
}

/// One output transformers loaded: its name in the job, directory, whether transformers rounds
/// its expert weights to bf16 (bf16 scales), and whether anything is quantised.
struct LoadedCase<'a> {
    name: &'a str,
    dir: &'a Path,
    rounded: bool,
    quantised: bool,
}

/// Checks what transformers made of `case` (its `result` and the `tensors` it wrote) against
/// rfid-moe's own reading: the expert weights exactly (asserted), the logits on `ids` within
/// tolerance (a failure message when not).
fn check_loaded_case(
    case: &LoadedCase,
    result: &Value,
    tensors: &HashMap<String, Tensor>,
    ids: &Tensor,
) -> Option<String> {
    let LoadedCase {
        name,
        dir,
        rounded,
        quantised,
    } = *case;
    assert!(result.get("error").is_none(), "{name}: {}", result["error"]);
    let method = quantised.then_some("compressed-tensors");
    assert_eq!(result["quant_method"], json!(method), "{name}");
    assert_eq!(
        result["report"],
        json!({}),
        "{name}: weights not all loaded"
    );
    let ours = Checkpoint::open(dir).unwrap();
    // transformers decompressed our codes and scales into our values: exactly, or rounded
    // to bf16 where it multiplies in the bf16 of the scales.
    let layers = ArchConfig::from_checkpoint(&ours)
        .unwrap()
        .spec()
        .moe_layer_indices();
    for layer in layers {
        let (gate_up, down) = fused_experts(&ours, layer);
        for (key, want) in [("gate_up_proj", gate_up), ("down_proj", down)] {
            let want = match rounded {
                true => want
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
                false => want,
            };
            let got = &tensors[&format!("{name}/model.layers.{layer}.mlp.experts.{key}")];
            let diff = common::max_abs_diff(got, &want);
            assert_eq!(diff, 0.0, "{name} layer {layer} {key}");
        }
    }
    let want = common::logits_of(dir, ids);
    let got = &tensors[&format!("{name}/logits")];
    let (diff, mean) = (
        common::max_abs_diff(got, &want),
        common::mean_abs_diff(got, &want),
    );
    // transformers keeps experts decompressed from bf16 scales as bf16 parameters even in
    // an f32 model, so only their values, checked above, can be held to rfid-moe's.
    let within = match rounded {
        false => diff <= TOLERANCE,
        true => mean <= ROUNDED_MEAN_TOLERANCE,
    };
    (!within).then(|| format!("{name}: logits differ by {diff} (mean {mean})"))
}

/// `compress --format compressed-tensors` of fixture `name` (in `work`) at `ratio` with a
/// quarter of its experts removed and, when `quantised`, kept experts quantised.
fn pruned_and_quantised_fixture(name: &str, work: &Path, ratio: f64, quantised: bool) -> PathBuf {
    let model = work.join(name);
    common::copy_dir(&common::fixture(name), &model);
    let calibration =
        common::random_token_windows(&work.join(format!("{name}.safetensors")), 256, 16, 32, 5);
    let out = work.join(format!("{name}-ct"));
    let mut options = common::small_default_options(&model, &calibration, &out, ratio);
    options.methods = vec!["prune".into(), "quantise".into(), "keep".into()];
    options.set_format(OutputFormat::CompressedTensors);
    common::prune_settings(&mut options, |s| s.fraction = Some(0.25));
    rfid_moe::compress(&options).unwrap();
    let config = common::read_config(&out);
    assert_eq!(
        config.get("quantization_config").is_some(),
        quantised,
        "{name}: quantised"
    );
    common::assert_a_quarter_of_experts_removed(&out, name);
    out
}

/// rfid-moe's perplexity of the checkpoint at `dir` on `ids` (f32, every token after the first
/// of each window).
fn perplexity(dir: &Path, ids: &Tensor) -> f64 {
    let logits = common::logits_of(dir, ids).to_dtype(DType::F64).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, 2).unwrap();
    let ids: Vec<Vec<i64>> = ids.to_vec2().unwrap();
    let mut nll = 0.0;
    let mut tokens = 0;
    for (w, window) in ids.iter().enumerate() {
        for (t, &next) in window.iter().enumerate().skip(1) {
            let row = logp.get(w).unwrap().get(t - 1).unwrap();
            nll -= row.get(next as usize).unwrap().to_scalar::<f64>().unwrap();
            tokens += 1;
        }
    }
    (nll / tokens as f64).exp()
}

#[test]
fn vllm_scores_the_output_as_rfid_moe_does() {
    if !std::env::var(VLLM_VAR).is_ok_and(|v| v == "1") {
        let warning = format!(
            "\n!!! SKIPPING `vllm_scores_the_output_as_rfid_moe_does`: set {VLLM_VAR}=1 to load \
             compressed-tensors output in vLLM (scripts/vllm-env.sh, about 6 GB) !!!\n"
        );
        std::io::Write::write_all(&mut std::io::stderr(), warning.as_bytes()).unwrap();
        return;
    }
    let script = common::repo_root().join("scripts/vllm-env.sh");
    let output = Command::new("bash").arg(&script).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let python = PathBuf::from(stdout.lines().last().map(str::trim).unwrap_or_default());
    assert!(
        output.status.success() && python.exists(),
        "{VLLM_VAR}=1 but vLLM could not be installed with {} ({}):\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let ids = common::mini_ids();
    let windows: Vec<Vec<i64>> = ids.to_vec2().unwrap();
    // (name, scheme, ratio, relative perplexity tolerance). Group 64: vLLM's CPU kernels take
    // 4-bit groups of 64 or more (AMX) or any multiple of 4 (AMD Zen); its GPU kernels take both.
    // Both tolerances cover vLLM computing activations in bf16 where we compute in f32.
    let cases = [
        ("int8", "int8-g64-sym", 0.4, 2e-3),
        ("int4", "int4-g64-sym", 0.6, 1e-2),
    ];
    let mut failures = Vec::new();
    for (name, scheme, ratio, tolerance) in cases {
        let source = quantised_mini(&work.join(name), &[scheme], ratio);
        let ct = export(&source, &work.join(format!("{name}-ct"))).unwrap();
        let ours = perplexity(&ct, &ids);
        let job = json!({
            "dir": ct, "windows": windows, "dtypes": ["float32", "bfloat16"],
            "results_out": work.join(format!("{name}.json")),
        });
        let job_path = work.join(format!("{name}-job.json"));
        std::fs::write(&job_path, job.to_string()).unwrap();
        let run = common::run_python_driver(&python, "tests/ct_vllm.py", &job_path);
        let result: Value =
            serde_json::from_slice(&std::fs::read(work.join(format!("{name}.json"))).unwrap())
                .unwrap();
        // vLLM logs to stdout, its worker processes' tracebacks included.
        let log = String::from_utf8_lossy(&run.stdout).into_owned()
            + &String::from_utf8_lossy(&run.stderr);
        let Some(theirs) = result["perplexity"].as_f64() else {
            // Every dtype refused for that reason (one such line per attempt), not another.
            let refusals = result["refused"].as_object().map_or(0, |o| o.len());
            let no_kernel = log.matches(NO_CPU_KERNEL).count() >= refusals.max(1);
            if name == "int8" && result["device"] == "cpu" && no_kernel {
                let note = format!(
                    "\n!!! {name}: not scored: vLLM's CPU build has no 8-bit integer MoE kernel \
                     (\"{NO_CPU_KERNEL}\"); this case is checked on a CUDA machine !!!\n"
                );
                std::io::Write::write_all(&mut std::io::stderr(), note.as_bytes()).unwrap();
                continue;
            }
            failures.push(format!(
                "{name}: vLLM refused every dtype ({:?}); its log's errors:\n{}",
                result["refused"]
                    .as_object()
                    .map(|o| o.keys().collect::<Vec<_>>()),
                error_lines(&log)
            ));
            continue;
        };
        let backend = log
            .lines()
            .find_map(|l| {
                l.split_once("Using '")
                    .and_then(|(_, r)| r.split_once('\''))
            })
            .map_or("?", |(backend, _)| backend);
        let report = format!(
            "{name}: vLLM ({}, {} on {}) perplexity {theirs:.4}, rfid-moe (f32) {ours:.4}, \
             relative difference {:.2e}",
            result["dtype"],
            backend,
            result["device"],
            (theirs - ours) / ours
        );
        std::io::Write::write_all(&mut std::io::stderr(), format!("{report}\n").as_bytes())
            .unwrap();
        if ((theirs - ours) / ours).abs() > tolerance {
            failures.push(report);
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// What vLLM's CPU build says when no MoE kernel takes a quantisation scheme.
const NO_CPU_KERNEL: &str = "No WNA16 MoE backend supports the deployment configuration";

/// The lines of an engine's log that report errors, each once.
fn error_lines(log: &str) -> String {
    let mut errors: Vec<&str> = log
        .lines()
        .filter(|l| {
            ["rror", "xception", "upported"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    errors.dedup();
    errors.join("\n")
}

#[test]
fn compress_writes_compressed_tensors_with_the_weights_of_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::mini_model();
    let options_for = |out: &Path| {
        let mut options =
            common::small_default_options(&model, &model.join("calibration.txt"), out, 0.65);
        options.calibration.samples = 8;
        options.calibration.seq_len = 128;
        options.calibration.batch_size = 8;
        options
    };
    let ct = tmp.path().join("ct");
    let mut options = options_for(&ct);
    options.set_format(rfid_moe::pipeline::OutputFormat::CompressedTensors);
    assert_eq!(options.methods, ["prune", "quantise", "keep"]);
    assert_eq!(
        options.budget.granularity,
        rfid_moe::pipeline::Granularity::Layer
    );
    rfid_moe::compress(&options).unwrap();

    let same = tmp.path().join("st");
    let mut safetensors = options_for(&same);
    safetensors.methods = options.methods.clone();
    safetensors.budget.granularity = rfid_moe::pipeline::Granularity::Layer;
    safetensors
        .update_settings::<QuantiseSettings>(|s| s.schemes = compressed_tensors::schemes_it_holds())
        .unwrap();
    rfid_moe::compress(&safetensors).unwrap();

    let config = common::read_config(&ct);
    assert_eq!(config["quantization_config"]["format"], "pack-quantized");
    assert!(config.get("compression").is_none());
    assert!(!ct.join("modeling_rfid_moe.py").exists());
    assert!(!ct.join(".compressed-tensors").exists());
    for file in [
        "compression_report.json",
        "compress.toml",
        "README.md",
        "tokenizer.json",
    ] {
        assert!(ct.join(file).is_file(), "{file}");
    }
    let ids = common::mini_ids();
    let a = common::logits_of(&ct, &ids);
    let b = common::logits_of(&same, &ids);
    assert_eq!(
        common::max_abs_diff(&a, &b),
        0.0,
        "same weights, same logits"
    );

    let mut refused = options_for(&tmp.path().join("no"));
    refused.set_format(rfid_moe::pipeline::OutputFormat::CompressedTensors);
    refused
        .update_settings::<QuantiseSettings>(|s| {
            s.schemes = vec![Scheme::parse("int4-g64-asym").unwrap()]
        })
        .unwrap();
    let e = rfid_moe::compress(&refused).unwrap_err().to_string();
    assert!(e.contains("int4-g64-asym"), "{e}");
}
