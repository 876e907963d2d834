//! transformers loads what `compress` writes (docs/FORMAT.md "Loading in
//! transformers"): the factored checkpoint of every family builds through our modelling file
//! (`trust_remote_code=True`) with our logits and exactly the factored parameter count (so no
//! dense copy of an expert), loading it without remote code raises, a checkpoint missing a
//! factor is refused instead of initialised at random, the dense export of a fused input keeps
//! the fused layout and loads as a plain model, and the README's Python example runs. Packed
//! block formats (`quantise`) load as their blocks with our logits, and the modelling file's
//! dequantiser gives rfid-moe's values bit for bit for every format.
//!
//! Needs the pinned torch + transformers environment of `scripts/python-env.sh` (installed on
//! first use, cached outside the clone) or `RFID_MOE_PYTHON=/path/to/python`; fails when it
//! cannot be had unless `RFID_MOE_SKIP_PYTHON_TESTS=1` opts out. One Python process runs every
//! case, since importing torch is the slow part.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rfid_moe::checkpoint::experts::ExpertMatrix;
use rfid_moe::checkpoint::packed::parse_packed_name;
use rfid_moe::checkpoint::weight::Int8Holding;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::models::moe::RoutedExperts;
use rfid_moe::models::{ArchConfig, FeedForward, Model};
use rfid_moe::pipeline::methods::lowrank::FactorizerKind;
use rfid_moe::pipeline::methods::quantise::QuantiseSettings;
use rfid_moe::pipeline::CompressOptions;
use rfid_moe::quant::{int, GgmlKind, IntScheme, Scheme};
use serde_json::{json, Value};

/// Set to `1` to skip this test (loudly) where the Python environment cannot be installed.
const SKIP_VAR: &str = "RFID_MOE_SKIP_PYTHON_TESTS";
/// A Python interpreter with torch and transformers, used instead of the pinned environment.
const PYTHON_VAR: &str = "RFID_MOE_PYTHON";
/// The path the README's example loads; the test substitutes its own output.
const README_PATH: &str = "\"/tmp/mini-rfid\"";
/// The logits tolerance (f32 on the CPU in both runtimes).
const TOLERANCE: f32 = 1e-4;

/// The Python to use, or None when the user opted out (`test` names the test skipped).
fn pinned_python(test: &str) -> Option<PathBuf> {
    common::external_tool(
        &common::ExternalTool {
            skip_var: SKIP_VAR,
            path_var: PYTHON_VAR,
            script: "scripts/python-env.sh",
            unchecked: "reading our outputs in transformers",
            usable: |path| path.exists(),
            skip_if_uninstallable: false,
        },
        test,
    )
}

/// Deterministic token windows `input_ids` (i64 [windows, seq]) below `vocab`, written to `path`.
fn token_file(path: &Path, windows: usize, seq: usize, seed: u64) -> PathBuf {
    common::random_token_windows(path, 256, windows, seq, seed)
}

/// Compresses `source` into `out` at ρ = 0.4 with `tweak` applied to the options; returns the
/// whole-model parameter count that `compression_report.json` implies for the output.
fn compress(
    source: &Path,
    calibration: &Path,
    out: &Path,
    tweak: impl FnOnce(&mut CompressOptions),
) -> u64 {
    let mut options = common::small_compress_options(source, calibration, out, 0.4);
    tweak(&mut options);
    rfid_moe::compress(&options).unwrap();
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("compression_report.json")).unwrap())
            .unwrap();
    let count = |key: &str| report[key].as_u64().unwrap();
    count("model_parameters_before") - count("targeted_parameters_before")
        + count("targeted_parameters_after")
}

/// A copy of `source` whose routed experts are fused 3-D tensors (transformers 5's layout).
fn fused_copy(source: &Path, out: &Path) -> PathBuf {
    let checkpoint = Checkpoint::open(source).unwrap();
    let load = |name: &str| {
        checkpoint
            .load(name, DType::F32, &Device::Cpu, "test")
            .unwrap()
    };
    let mut tensors: HashMap<String, Tensor> = checkpoint
        .tensor_names()
        .into_iter()
        .filter(|name| !name.contains(".experts."))
        .map(|name| (name.to_string(), load(name)))
        .collect();
    let spec = ArchConfig::from_checkpoint(&checkpoint).unwrap().spec();
    for layout in spec.moe_layers.iter().flatten() {
        let stack = |m| {
            layout
                .load_matrix(&checkpoint, m, DType::F32, &Device::Cpu)
                .unwrap()
        };
        let (gate, up) = (stack(ExpertMatrix::Gate), stack(ExpertMatrix::Up));
        let gate_up: Vec<Tensor> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| Tensor::cat(&[g, u], 0).unwrap())
            .collect();
        let down = Tensor::stack(&stack(ExpertMatrix::Down), 0).unwrap();
        tensors.insert(
            layout.fused_name(ExpertMatrix::Gate),
            Tensor::stack(&gate_up, 0).unwrap(),
        );
        tensors.insert(layout.fused_name(ExpertMatrix::Down), down);
    }
    std::fs::create_dir_all(out).unwrap();
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).unwrap();
    std::fs::copy(source.join("config.json"), out.join("config.json")).unwrap();
    out.to_path_buf()
}

/// Copies the checkpoint `dir` to `out`, removes the first tensor whose name ends with `suffix`
/// from the index, and returns its name and shard in the copy.
fn copy_unlisting(dir: &Path, out: &Path, suffix: &str) -> (String, PathBuf) {
    std::fs::create_dir_all(out).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    let index_path = out.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let name = map.keys().find(|k| k.ends_with(suffix)).unwrap().clone();
    let shard = out.join(map.remove(&name).unwrap().as_str().unwrap());
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    (name, shard)
}

/// A copy of the compressed checkpoint `dir` without the first `lowrank_a` tensor it lists.
fn copy_without_a_factor(dir: &Path, out: &Path) -> PathBuf {
    let (name, shard) = copy_unlisting(dir, out, ".lowrank_a");
    let mut tensors = candle_core::safetensors::load(&shard, &Device::Cpu).unwrap();
    tensors.remove(&name).unwrap();
    candle_core::safetensors::save(&tensors, &shard).unwrap();
    out.to_path_buf()
}

/// A copy of the int8 checkpoint `dir` whose first `basis_scale` is gone: renamed in its shard's
/// header (candle cannot rewrite a shard holding I8 tensors) and removed from the index.
fn copy_without_a_scale(dir: &Path, out: &Path) -> PathBuf {
    let (name, shard) = copy_unlisting(dir, out, ".basis_scale");
    let (mut header, data) = common::read_safetensors_raw(&shard);
    let entry = header.as_object_mut().unwrap().remove(&name).unwrap();
    header[format!("{name}_gone")] = entry;
    common::write_safetensors_raw(&shard, &header, &data);
    out.to_path_buf()
}

/// The README's "Load the result in Python" example, loading `dir` instead of its path.
fn readme_example(dir: &Path) -> String {
    let readme = std::fs::read_to_string(common::repo_root().join("README.md")).unwrap();
    let section = readme
        .split("## Load the result in Python")
        .nth(1)
        .expect("README has a `## Load the result in Python` section");
    let code = section
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("that section has a ```python example");
    assert!(
        code.contains(README_PATH),
        "the example loads {README_PATH}"
    );
    code.replace(README_PATH, &format!("{:?}", dir.to_str().unwrap()))
}

/// What Python is asked to load and what the test expects of it.
struct Case {
    name: &'static str,
    dir: PathBuf,
    trust_remote_code: bool,
    /// The class transformers must build, or the text its error must contain.
    expect: Expect,
    /// Directory whose logits (our runtime) the case must reproduce.
    ours: PathBuf,
}

enum Expect {
    Loads { class: String, stored_values: u64 },
    Fails(String),
}

/// Runs the driver once for every case; returns its results and logits.
fn run_python(
    python: &Path,
    work: &Path,
    ids: &Path,
    cases: &[Case],
    snippet: String,
) -> (Value, HashMap<String, Tensor>) {
    let job = json!({
        "input_ids": ids,
        "logits_out": work.join("py-logits.safetensors"),
        "results_out": work.join("py-results.json"),
        "cases": cases.iter().map(|c| json!({
            "name": c.name, "dir": c.dir, "trust_remote_code": c.trust_remote_code,
        })).collect::<Vec<_>>(),
        "snippet": {"code": snippet},
    });
    run_driver(python, work, &job);
    let results = serde_json::from_slice(&std::fs::read(work.join("py-results.json")).unwrap());
    let logits = candle_core::safetensors::load(work.join("py-logits.safetensors"), &Device::Cpu);
    (results.unwrap(), logits.unwrap())
}

/// Runs the driver on `job` (written to `work`), failing with its stderr if it fails.
fn run_driver(python: &Path, work: &Path, job: &Value) {
    let job_path = work.join("job.json");
    std::fs::write(&job_path, serde_json::to_vec(job).unwrap()).unwrap();
    common::run_python_driver(python, "tests/transformers_load.py", &job_path);
}

fn check_case(case: &Case, result: &Value, python_logits: Option<&Tensor>, ids: &Tensor) {
    let name = case.name;
    match &case.expect {
        Expect::Fails(needle) => {
            let error = result["error"].as_str().unwrap_or_default();
            assert!(
                error.contains(needle),
                "{name}: expected an error containing {needle:?}, got {result}"
            );
        }
        Expect::Loads {
            class,
            stored_values,
        } => {
            assert!(result.get("error").is_none(), "{name}: {result}");
            assert_eq!(result["class"], json!(class), "{name}");
            assert_eq!(result["load_report"], json!({}), "{name}: load report");
            assert_eq!(
                result["stored_values"].as_u64(),
                Some(*stored_values),
                "{name}: parameter count"
            );
            let python_logits = python_logits.unwrap();
            let ours = reference_logits(&case.ours, ids);
            let diff = common::max_abs_diff(python_logits, &ours);
            println!("{name}: max |Δlogit| {diff:.2e}, {stored_values} parameters");
            assert!(diff <= TOLERANCE, "{name}: logits differ by {diff}");
            if holds_ggml_blocks(&Checkpoint::open(&case.ours).unwrap()) {
                let runtime =
                    common::max_abs_diff(python_logits, &common::logits_of(&case.ours, ids));
                println!(
                    "{name}: max |Δlogit| {runtime:.2e} against rfid-moe's quantised matmul \
                     (8-bit activations, as llama.cpp)"
                );
            }
            check_int8_residency(case, result);
        }
    }
}

/// The values transformers' state dict holds for `checkpoint`: every stored element but the
/// quantisation scales (a packed matrix counts its bytes, as its `uint8` blocks).
fn stored_values_of(checkpoint: &Checkpoint) -> u64 {
    checkpoint
        .tensor_names()
        .into_iter()
        .filter(|name| !checkpoint.is_quantisation_scale(name))
        .filter_map(|name| checkpoint.info(name))
        .map(|(info, _)| info.numel() as u64)
        .sum()
}

/// Whether `checkpoint` holds any matrix packed in one of ggml's block formats.
fn holds_ggml_blocks(checkpoint: &Checkpoint) -> bool {
    checkpoint
        .tensor_names()
        .into_iter()
        .any(|n| matches!(parse_packed_name(n), Some((_, Scheme::Ggml(_)))))
}

/// rfid-moe's logits of `dir` (f32, CPU). Where it holds ggml blocks, their matrices are
/// dequantised at load (rfid-moe's own dequantiser): the runtime's default multiplies them by
/// activations quantised to 8 bits, as llama.cpp does, which a transformers forward on
/// dequantised weights does not reproduce.
fn reference_logits(dir: &Path, ids: &Tensor) -> Tensor {
    let checkpoint = Checkpoint::open(dir).unwrap();
    if !holds_ggml_blocks(&checkpoint) {
        return common::logits_of(dir, ids);
    }
    let mut model = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let spec = ArchConfig::from_checkpoint(&checkpoint).unwrap().spec();
    let compression = rfid_moe::models::compression_record(&checkpoint).unwrap();
    for (layer, layout) in spec.moe_layers.iter().enumerate() {
        let Some(layout) = layout else { continue };
        let FeedForward::Moe(block) = &mut model.layers[layer].feed_forward else {
            panic!("layer {layer} has no MoE block");
        };
        block.experts = RoutedExperts::load_holding_int8(
            layout,
            &checkpoint,
            layer,
            compression.as_ref(),
            (DType::F32, &Device::Cpu),
            Int8Holding::Dequantised,
        )
        .unwrap();
    }
    model.forward(ids, None).unwrap().logits
}

/// An int8 or packed checkpoint stays so in transformers: every `I8` tensor is a `torch.int8`
/// parameter after `from_pretrained`, every packed matrix `torch.uint8` blocks, and the routed
/// experts' tensors hold exactly their stored bytes (codes, scales and blocks; loaded in the
/// checkpoint's dtype). Float checkpoints report nothing.
fn check_int8_residency(case: &Case, result: &Value) {
    let name = case.name;
    let checkpoint = Checkpoint::open(&case.dir).unwrap();
    let names = checkpoint.tensor_names();
    let count = |pick: &dyn Fn(&str) -> bool| names.iter().filter(|n| pick(n)).count();
    let int8_tensors = count(&|n| checkpoint.is_int8(n));
    let packed_tensors = count(&|n| parse_packed_name(n).is_some());
    if checkpoint.config()["compression"]["factor_storage"].is_null() && packed_tensors == 0 {
        assert!(result.get("resident").is_none(), "{name}: {result}");
        return;
    }
    assert!(
        int8_tensors + packed_tensors > 0,
        "{name}: no int8 or packed tensor"
    );
    if !checkpoint.config()["compression"]["factor_storage"].is_null() {
        assert!(int8_tensors > 0, "{name}: no int8 tensor");
    }
    let resident = &result["resident"];
    let by_dtype = |dtype: &str, n: usize| match n {
        0 => json!({}),
        n => json!({ dtype: n }),
    };
    assert_eq!(
        resident["int8_parameters"],
        by_dtype("torch.int8", int8_tensors),
        "{name}: int8 parameters after from_pretrained"
    );
    assert_eq!(
        resident["packed_blocks"],
        by_dtype("torch.uint8", packed_tensors),
        "{name}: packed blocks after from_pretrained"
    );
    let stored = rfid_moe::sweep::tensor_bytes(&case.dir).unwrap();
    println!(
        "{name}: routed experts hold {} B in transformers, {} B stored",
        resident["routed_bytes"], stored.routed_experts
    );
    assert_eq!(
        resident["routed_bytes"].as_u64(),
        Some(stored.routed_experts),
        "{name}: routed-expert bytes in transformers"
    );
}

/// The transformers class of `family`'s factored checkpoint.
fn factored_class(stem: &str) -> String {
    format!("RfidMoe{stem}ForCausalLM")
}

#[test]
fn transformers_loads_every_compressed_family_with_our_logits() {
    let Some(python) = pinned_python("transformers_loads_every_compressed_family_with_our_logits")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let calibration = token_file(&work.join("calibration.safetensors"), 16, 32, 0x1234);
    let ids_path = token_file(&work.join("ids.safetensors"), 2, 12, 0x5678);
    let mut cases = Vec::new();
    // (case, source, class stem, residual, basis factoriser)
    let families = [
        (
            "mixtral",
            common::fixture("tiny-mixtral"),
            "Mixtral",
            true,
            false,
        ),
        (
            "qwen2_moe",
            common::fixture("tiny-qwen2_moe"),
            "Qwen2Moe",
            false,
            false,
        ),
        (
            "qwen3_moe",
            common::fixture("tiny-qwen3_moe"),
            "Qwen3Moe",
            false,
            true,
        ),
        ("olmoe", common::fixture("tiny-olmoe"), "Olmoe", true, false),
        (
            "deepseek_v2",
            common::fixture("tiny-deepseek_v2"),
            "DeepseekV2",
            false,
            false,
        ),
        (
            "deepseek_v3",
            common::fixture("tiny-deepseek_v3"),
            "DeepseekV3",
            true,
            false,
        ),
        (
            "mini-moe-docs",
            common::mini_model(),
            "Qwen3Moe",
            false,
            false,
        ),
    ];
    for (name, source, stem, residual, basis) in families {
        let out = work.join(name);
        let stored_values = compress(&source, &calibration, &out, |o| {
            common::lowrank_settings(o, |s| {
                s.residual = residual;
                if basis {
                    s.factorizer = FactorizerKind::Basis;
                    s.fit_steps = 20;
                }
            });
        });
        let expect = Expect::Loads {
            class: factored_class(stem),
            stored_values,
        };
        cases.push(Case {
            name,
            dir: out.clone(),
            trust_remote_code: true,
            expect,
            ours: out,
        });
    }
    add_refusal_cases(&mut cases, work);
    add_fused_cases(&mut cases, work, &calibration);
    add_pruned_cases(&mut cases, work, &calibration);
    add_int8_cases(&mut cases, work, &calibration);
    add_down_proj_cases(&mut cases, work, &calibration);
    add_quantised_cases(&mut cases, work, &calibration);
    let snippet = readme_example(&work.join("mini-moe-docs"));
    let (results, logits) = run_python(&python, work, &ids_path, &cases, snippet);
    let ids = candle_core::safetensors::load(&ids_path, &Device::Cpu).unwrap()["input_ids"].clone();
    for case in &cases {
        check_case(case, &results[case.name], logits.get(case.name), &ids);
    }
    let example = &results["snippet"];
    let printed = example["stdout"].as_str().unwrap_or_default();
    assert!(
        printed.starts_with("The pin configuration nodes act as") && printed.len() > 40,
        "README example: {example}"
    );
}

/// Loading without remote code raises; a checkpoint missing a factor is refused.
fn add_refusal_cases(cases: &mut Vec<Case>, work: &Path) {
    let factored = work.join("qwen3_moe");
    cases.push(Case {
        name: "without trust_remote_code",
        dir: factored.clone(),
        trust_remote_code: false,
        expect: Expect::Fails("trust_remote_code=True".into()),
        ours: factored,
    });
    let incomplete = copy_without_a_factor(&work.join("mixtral"), &work.join("incomplete"));
    cases.push(Case {
        name: "missing factor",
        dir: incomplete.clone(),
        trust_remote_code: true,
        expect: Expect::Fails("refusing to initialise them at random".into()),
        ours: incomplete,
    });
}

/// A fused input: its factored output loads with remote code; its dense export keeps the fused
/// names and shapes and loads as the family's own model, with the factored model's logits.
fn add_fused_cases(cases: &mut Vec<Case>, work: &Path, calibration: &Path) {
    let fused = fused_copy(&common::fixture("tiny-olmoe"), &work.join("fused-olmoe"));
    let (factored, dense) = (work.join("fused-factored"), work.join("fused-dense"));
    let stored_values = compress(&fused, calibration, &factored, |o| {
        o.output.export_dense = Some(dense.clone());
    });
    let input = Checkpoint::open(&fused).unwrap();
    let export = Checkpoint::open(&dense).unwrap();
    let mut names = input.tensor_names();
    let mut exported = export.tensor_names();
    names.sort();
    exported.sort();
    assert_eq!(names, exported, "the dense export keeps the input's names");
    assert!(names.iter().any(|n| n.ends_with("experts.gate_up_proj")));
    for name in names {
        assert_eq!(
            input.info(name).unwrap().0.shape,
            export.info(name).unwrap().0.shape,
            "{name}"
        );
    }
    let dense_values = rfid_moe::inspect::parameter_counts(&input).total;
    cases.push(Case {
        name: "fused factored",
        dir: factored.clone(),
        trust_remote_code: true,
        expect: Expect::Loads {
            class: factored_class("Olmoe"),
            stored_values,
        },
        ours: factored.clone(),
    });
    cases.push(Case {
        name: "fused dense export",
        dir: dense,
        trust_remote_code: false,
        expect: Expect::Loads {
            class: "OlmoeForCausalLM".into(),
            stored_values: dense_values,
        },
        ours: factored,
    });
}

/// Expert pruning: a pruned checkpoint is a normal one that the family's own class
/// loads without remote code (a fused input stays fused, cut to the kept experts); pruning plus
/// low-rank loads through our modelling file. Parameter counts are those stored in the output.
fn add_pruned_cases(cases: &mut Vec<Case>, work: &Path, calibration: &Path) {
    let fused = work.join("fused-olmoe");
    let pruned = [
        (
            "pruned qwen3_moe",
            common::fixture("tiny-qwen3_moe"),
            "Qwen3MoeForCausalLM",
        ),
        (
            "pruned deepseek_v3",
            common::fixture("tiny-deepseek_v3"),
            "DeepseekV3ForCausalLM",
        ),
        ("pruned fused olmoe", fused, "OlmoeForCausalLM"),
    ];
    for (name, source, class) in pruned {
        let out = work.join(name.replace(' ', "-"));
        compress(&source, calibration, &out, |o| {
            o.methods = vec!["prune".into(), "keep".into()];
            o.settings.clear();
        });
        let stored = Checkpoint::open(&out).unwrap();
        if name.contains("fused") {
            assert!(stored
                .tensor_names()
                .iter()
                .any(|n| n.ends_with("experts.gate_up_proj")));
        }
        let stored_values = stored_values_of(&stored);
        cases.push(Case {
            name,
            dir: out.clone(),
            trust_remote_code: false,
            expect: Expect::Loads {
                class: class.into(),
                stored_values,
            },
            ours: out,
        });
    }
    let out = work.join("pruned-lowrank-mixtral");
    compress(&common::fixture("tiny-mixtral"), calibration, &out, |o| {
        o.methods = vec!["prune".into(), "lowrank".into(), "keep".into()];
    });
    let stored_values = rfid_moe::inspect::parameter_counts(&Checkpoint::open(&out).unwrap()).total;
    cases.push(Case {
        name: "pruned+lowrank mixtral",
        dir: out.clone(),
        trust_remote_code: true,
        expect: Expect::Loads {
            class: factored_class("Mixtral"),
            stored_values,
        },
        ours: out,
    });
}

/// `--factor-dtype int8`: int8 factors with row-block scales load through our
/// modelling file and stay int8 in memory (dequantised per use, [`check_int8_residency`]), with
/// our logits and the parameter count of the report (the scales are storage, not parameters);
/// Mixtral with a residual (η stays a float); Qwen3-MoE with a SiLU basis (`--factorizer
/// basis`); a missing scale is refused like a missing factor.
fn add_int8_cases(cases: &mut Vec<Case>, work: &Path, calibration: &Path) {
    let int8 = [
        (
            "int8 mini-moe-docs",
            common::mini_model(),
            "Qwen3Moe",
            false,
        ),
        (
            "int8 mixtral residual",
            common::fixture("tiny-mixtral"),
            "Mixtral",
            true,
        ),
        (
            "int8 qwen3_moe basis",
            common::fixture("tiny-qwen3_moe"),
            "Qwen3Moe",
            false,
        ),
    ];
    for (name, source, stem, residual) in int8 {
        let out = work.join(name.replace(' ', "-"));
        let stored_values = compress(&source, calibration, &out, |o| {
            common::lowrank_settings(o, |s| {
                s.factor_dtype = "int8".into();
                s.residual = residual;
                // A SiLU basis, which only exists dequantised (activated per use).
                if stem == "Qwen3Moe" && !name.contains("mini") {
                    s.factorizer = FactorizerKind::Basis;
                    s.fit_steps = 20;
                }
            });
        });
        let stored = Checkpoint::open(&out).unwrap();
        assert!(stored
            .tensor_names()
            .iter()
            .any(|n| n.ends_with(".lowrank_a_scale")));
        cases.push(Case {
            name,
            dir: out.clone(),
            trust_remote_code: true,
            expect: Expect::Loads {
                class: factored_class(stem),
                stored_values,
            },
            ours: out,
        });
    }
    let incomplete = copy_without_a_scale(
        &work.join("int8-mini-moe-docs"),
        &work.join("int8-missing-scale"),
    );
    cases.push(Case {
        name: "int8 missing scale",
        dir: incomplete.clone(),
        trust_remote_code: true,
        expect: Expect::Fails("refusing to initialise them at random".into()),
        ours: incomplete,
    });
}

/// `--matrices gate,up,down`: factored `down_proj` (output-side basis) loads through our
/// modelling file with our logits and the report's parameter count (mini-moe-docs, Mixtral's
/// `w2` naming, a fused input); the fused input's dense export loads as the family's own model.
fn add_down_proj_cases(cases: &mut Vec<Case>, work: &Path, calibration: &Path) {
    let all = |o: &mut CompressOptions| o.budget.matrices = ExpertMatrix::ALL.to_vec();
    let sources = [
        ("mini-moe-docs down", common::mini_model(), "Qwen3Moe"),
        ("mixtral down", common::fixture("tiny-mixtral"), "Mixtral"),
        ("fused olmoe down", work.join("fused-olmoe"), "Olmoe"),
    ];
    for (name, source, stem) in sources {
        let out = work.join(name.replace(' ', "-"));
        let dense = work.join(format!("{}-dense", name.replace(' ', "-")));
        let stored_values = compress(&source, calibration, &out, |o| {
            all(o);
            o.output.export_dense = Some(dense.clone());
        });
        let stored = Checkpoint::open(&out).unwrap();
        assert!(
            stored
                .tensor_names()
                .iter()
                .any(|n| n.ends_with(".lowrank_c")),
            "{name}: no factored down_proj"
        );
        cases.push(Case {
            name,
            dir: out.clone(),
            trust_remote_code: true,
            expect: Expect::Loads {
                class: factored_class(stem),
                stored_values,
            },
            ours: out.clone(),
        });
        if name.starts_with("fused") {
            let input = Checkpoint::open(&source).unwrap();
            cases.push(Case {
                name: "fused olmoe down dense export",
                dir: dense,
                trust_remote_code: false,
                expect: Expect::Loads {
                    class: "OlmoeForCausalLM".into(),
                    stored_values: rfid_moe::inspect::parameter_counts(&input).total,
                },
                ours: out,
            });
        }
    }
    // Pruned and factored on all three matrices, with float and with int8 factors.
    for (name, factor_dtype) in [
        ("pruned mini-moe-docs down", "auto"),
        ("pruned int8 mini-moe-docs down", "int8"),
    ] {
        let out = work.join(name.replace(' ', "-"));
        compress(&common::mini_model(), calibration, &out, |o| {
            all(o);
            o.methods = vec!["prune".into(), "lowrank".into(), "keep".into()];
            common::lowrank_settings(o, |s| s.factor_dtype = factor_dtype.into());
        });
        let stored = Checkpoint::open(&out).unwrap();
        let stored_values = stored_values_of(&stored);
        cases.push(Case {
            name,
            dir: out.clone(),
            trust_remote_code: true,
            expect: Expect::Loads {
                class: factored_class("Qwen3Moe"),
                stored_values,
            },
            ours: out,
        });
    }
    // The default: removal, shared bases, int8 and kept experts mixed by the solver, layer by
    // layer and expert by expert (bf16 mini-moe-docs; f32 fixtures of a fused and a DeepSeek
    // family).
    let sources = [
        ("default mini-moe-docs", common::mini_model(), 0.6),
        ("default mixtral", common::fixture("tiny-mixtral"), 0.5),
        ("default fused olmoe", work.join("fused-olmoe"), 0.8),
        (
            "default deepseek_v3",
            common::fixture("tiny-deepseek_v3"),
            0.8,
        ),
    ];
    for (name, source, ratio) in sources {
        let out = work.join(name.replace(' ', "-"));
        let mut options = common::small_default_options(&source, calibration, &out, ratio);
        options.calibration.samples = 8;
        rfid_moe::compress(&options).unwrap();
        let stored = Checkpoint::open(&out).unwrap();
        let stored_values = stored_values_of(&stored);
        cases.push(Case {
            name,
            dir: out.clone(),
            trust_remote_code: true,
            expect: Expect::Loads {
                class: factored_class(&stem_of(&source)),
                stored_values,
            },
            ours: out,
        });
    }
}

/// The transformers class stem of the family at `source` (`Qwen3Moe`, `Mixtral`, …).
fn stem_of(source: &Path) -> String {
    let config = rfid_moe::checkpoint::read_json(&source.join("config.json")).unwrap();
    match config["model_type"].as_str().unwrap() {
        "qwen3_moe" => "Qwen3Moe",
        "qwen2_moe" => "Qwen2Moe",
        "mixtral" => "Mixtral",
        "olmoe" => "Olmoe",
        "deepseek_v2" => "DeepseekV2",
        "deepseek_v3" => "DeepseekV3",
        other => panic!("no transformers class for {other}"),
    }
    .into()
}

/// One `quantise` output of [`add_quantised_cases`].
struct QuantisedRun {
    name: &'static str,
    source: PathBuf,
    /// The transformers class stem.
    stem: &'static str,
    ratio: f64,
    /// The formats offered.
    offered: &'static [&'static str],
    /// The formats the output must hold, so that the case covers them.
    wanted: &'static [&'static str],
}

/// `quantise`: experts stored in packed block formats load through our modelling file as their
/// uint8 blocks (dequantised per use), with our logits and the stored values of the output
/// (blocks counted as their bytes): integer groups only (against the runtime, which dequantises
/// them per use too), integer groups of several widths mixed with ggml's 32-column kinds on
/// every matrix, Mixtral's `w1`/`w3` under `block_sparse_moe`; a storage name the modelling file
/// does not know is refused, naming the tensor.
fn add_quantised_cases(cases: &mut Vec<Case>, work: &Path, calibration: &Path) {
    let runs = [
        QuantisedRun {
            name: "quantised int mini-moe-docs",
            source: common::mini_model(),
            stem: "Qwen3Moe",
            ratio: 0.6,
            offered: &[
                "int2-g64-asym",
                "int3-g32-sym",
                "int4-g128-asym",
                "int5-g64-asym",
                "int8-g64-sym",
            ],
            wanted: &[
                "int2-g64-asym",
                "int3-g32-sym",
                "int5-g64-asym",
                "int8-g64-sym",
            ],
        },
        QuantisedRun {
            name: "quantised mini-moe-docs",
            source: common::mini_model(),
            stem: "Qwen3Moe",
            ratio: 0.5,
            offered: &[
                "int2-g64-asym",
                "int3-g64-sym",
                "int4-g128-asym",
                "int6-g32-sym",
                "q4_0",
                "q8_0",
            ],
            wanted: &["int4-g128-asym", "int6-g32-sym", "q4_0", "q8_0"],
        },
        // w2 (48 columns) takes no block format and stays f32 beside packed w1 and w3.
        QuantisedRun {
            name: "quantised mixtral",
            source: common::fixture("tiny-mixtral"),
            stem: "Mixtral",
            ratio: 0.4,
            offered: &["int4-g32-sym", "int3-g64-asym", "q4_1", "q5_0", "q8_0"],
            wanted: &["q8_0"],
        },
    ];
    for QuantisedRun {
        name,
        source,
        stem,
        ratio,
        offered,
        wanted,
    } in runs
    {
        let out = work.join(name.replace(' ', "-"));
        let mut options = common::small_default_options(&source, calibration, &out, ratio);
        options.methods = vec!["quantise".into(), "keep".into()];
        options
            .update_settings(|s: &mut QuantiseSettings| {
                s.schemes = offered.iter().map(|n| Scheme::parse(n).unwrap()).collect();
            })
            .unwrap();
        rfid_moe::compress(&options).unwrap();
        let stored = Checkpoint::open(&out).unwrap();
        let held: std::collections::BTreeSet<String> = stored
            .tensor_names()
            .into_iter()
            .filter_map(|n| parse_packed_name(n).map(|(_, s)| s.name()))
            .collect();
        for scheme in wanted {
            assert!(
                held.contains(*scheme),
                "{name}: no {scheme} matrix among {held:?}"
            );
        }
        cases.push(Case {
            name,
            dir: out.clone(),
            trust_remote_code: true,
            expect: Expect::Loads {
                class: factored_class(stem),
                stored_values: stored_values_of(&stored),
            },
            ours: out,
        });
    }
    let unknown = work.join("quantised-unknown-storage");
    common::copy_dir(&work.join("quantised-mini-moe-docs"), &unknown);
    let mut expert = 0;
    common::edit_config(&unknown, |config| {
        let groups = &mut config["compression"]["layers"][0]["matrices"]["up_proj"]["groups"];
        expert = groups[0]["experts"][0].as_u64().unwrap();
        groups[0]["storage"][0] = json!("int7-g64-sym");
    });
    let tensor = format!("model.layers.0.mlp.experts.{expert}.up_proj.weight");
    cases.push(Case {
        name: "quantised unknown storage",
        dir: unknown.clone(),
        trust_remote_code: true,
        expect: Expect::Fails(format!("{tensor}: storage 'int7-g64-sym'")),
        ours: unknown,
    });
}

/// Every block format rfid-moe writes (each integer group, each ggml kind, K-quants included):
/// the modelling file's dequantiser gives exactly rfid-moe's values (and, for ggml's kinds,
/// candle's), bit for bit, on blocks rounded from random matrices, on random bytes (every code
/// and scale pattern) and, for ggml's kinds, on blocks from candle's quantisers; it reads the
/// same storage names as block formats that rfid-moe does.
#[test]
fn transformers_dequantises_every_block_format_as_rfid_moe() {
    let Some(python) = pinned_python("transformers_dequantises_every_block_format_as_rfid_moe")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let mut schemes: Vec<Scheme> = GgmlKind::ALL.into_iter().map(Scheme::Ggml).collect();
    for bits in int::BITS {
        for group in int::GROUPS {
            for symmetric in [true, false] {
                let scheme = IntScheme {
                    bits,
                    group,
                    symmetric,
                };
                schemes.push(Scheme::Int(scheme));
            }
        }
    }
    let (rows, cols) = (6, 512);
    let values = test_matrix(rows, cols, 0x5eed);
    let mut rng = rfid_moe::rng::SplitMix64::new(0xb10c);
    let mut tensors = HashMap::new();
    let mut expected = Vec::new();
    for &scheme in &schemes {
        let row_bytes = scheme.row_bytes(cols);
        let random: Vec<u8> = (0..rows * row_bytes)
            .map(|_| rng.next_u64() as u8)
            .collect();
        let mut sources = vec![
            (
                "nearest",
                scheme.quantise_nearest(&values, cols, None).unwrap(),
            ),
            ("random", random),
        ];
        if let Scheme::Ggml(kind) = scheme {
            let t = Tensor::from_slice(&values, (rows, cols), &Device::Cpu).unwrap();
            let q = candle_core::quantized::QTensor::quantize(&t, kind.to_candle()).unwrap();
            sources.push(("candle", q.data().unwrap().into_owned()));
        }
        for (source, bytes) in sources {
            let key = format!("{source}.{scheme}");
            let ours = scheme.dequantise(&bytes, cols).unwrap();
            let mut readers = vec![("rfid-moe", ours)];
            if let (Scheme::Ggml(kind), false) = (scheme, source == "random") {
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    kind.to_candle(),
                    &bytes,
                    vec![rows, cols],
                    &Device::Cpu,
                )
                .unwrap();
                let theirs = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
                readers.push(("candle", theirs.to_vec1::<f32>().unwrap()));
            }
            for (reader, values) in readers {
                let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
                tensors.insert(format!("{key}.{reader}"), t);
                expected.push(format!("{key}.{reader}"));
            }
            let blocks = Tensor::from_vec(bytes, (rows, row_bytes), &Device::Cpu).unwrap();
            tensors.insert(key, blocks);
        }
    }
    let blocks = work.join("blocks.safetensors");
    candle_core::safetensors::save(&tensors, &blocks).unwrap();
    let modeling = work.join(rfid_moe::pipeline::hf_compat::MODELING_FILE);
    std::fs::write(&modeling, rfid_moe::pipeline::hf_compat::MODELING_SOURCE).unwrap();
    // Every format's name, and names that are none (or are one only in another spelling).
    let mut names: Vec<String> = schemes.iter().map(Scheme::name).collect();
    names.extend(
        [
            "Q4_K",
            "q4_K",
            "int4-g064-sym",
            "int7-g64-sym",
            "int4-g48-sym",
            "int4-g64",
            "int4-g64-sym-x",
            "INT4-G64-SYM",
            "q4_2",
            "q4_k_m",
            "int8-row128",
            "bf16",
            "",
        ]
        .map(String::from),
    );
    let results_out = work.join("py-dequantise.json");
    let job = json!({
        "dequantise": {"modeling": modeling, "blocks": blocks, "names": names},
        "results_out": results_out,
    });
    run_driver(&python, work, &job);
    let results: Value = serde_json::from_slice(&std::fs::read(&results_out).unwrap()).unwrap();
    let checks = results["checks"].as_object().unwrap();
    assert_eq!(checks.len(), expected.len(), "checked: {:?}", checks.keys());
    for key in &expected {
        assert_eq!(
            checks[key]["mismatches"],
            json!(0),
            "{key}: {}",
            checks[key]
        );
    }
    for name in &names {
        let ours = Scheme::parse(name).ok().map(|s| s.name());
        assert_eq!(results["names"][name], json!(ours), "storage name {name:?}");
    }
    println!(
        "{} expectations over {} formats agree bit for bit",
        expected.len(),
        schemes.len()
    );
}

/// A `[rows, cols]` test matrix, row-major: rows of Gaussian values at several scales, a
/// heavy-tailed row, a row of positive values, a constant row and a zero row.
fn test_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = rfid_moe::rng::SplitMix64::new(seed);
    (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (r, c)))
        .map(|(r, _)| {
            let z = rng.normal() as f32;
            match r % 6 {
                0 => 0.02 * z,
                1 => 3.0 * z,
                2 => 0.05 * z * z * z,
                3 => 0.1 + 0.01 * z.abs(),
                4 => 0.25,
                _ => 0.0,
            }
        })
        .collect()
}
