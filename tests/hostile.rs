//! Hostile inputs at the library level, one test per class: inputs destroyed, reads
//! outside the model, inputs accepted silently, panics and aborts, leftovers. Each gives an error
//! that names the culprit and what was expected, writes nothing and leaves the inputs unchanged.
//! (`tests/errors.rs` covers the plainer malformed checkpoints.)

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rfid_moe::checkpoint::writer::CheckpointWriter;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::models::Model;
use rfid_moe::safety::{check_run_paths, RunPath};
use rfid_moe::CompressOptions;

/// Opens and loads the model in `dir`; returns the error message (which must be one line).
fn load_error(dir: &Path) -> String {
    let result =
        Checkpoint::open(dir).and_then(|c| Model::load(&c, DType::F32, &Device::Cpu).map(|_| ()));
    let message = result
        .expect_err("a hostile checkpoint must fail")
        .to_string();
    println!("{message}");
    assert!(!message.contains('\n'), "one line: {message}");
    message
}

/// Token ids for calibration: `windows` rows of `seq` ids below 256.
fn token_file(dir: &Path, windows: usize, seq: usize) -> PathBuf {
    let ids: Vec<i64> = (0..windows * seq).map(|i| (i * 37 % 251) as i64).collect();
    let path = dir.join("tokens.safetensors");
    common::write_input_ids(
        &path,
        Tensor::from_vec(ids, (windows, seq), &Device::Cpu).unwrap(),
    );
    path
}

fn compress_options(model: &Path, calibration: &Path, out: &Path) -> CompressOptions {
    let ratio = rfid_moe::pipeline::presets::paper().budget.ratio;
    let mut options = common::small_compress_options(model, calibration, out, ratio);
    options.calibration.samples = 4;
    options.calibration.seq_len = 16;
    options
}

/// Runs `compress` expecting failure: asserts that every output is as before (absent, or with
/// the same files), that no staging entry is left next to it, and that the model is
/// byte-identical; returns the message.
fn compress_error(options: &CompressOptions) -> String {
    let outputs: Vec<PathBuf> = [
        options.output.out.clone(),
        options.output.export_dense.clone(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let state = |p: &Path| p.exists().then(|| common::snapshot(p));
    let outputs_before: Vec<_> = outputs.iter().map(|p| state(p)).collect();
    let model_before = common::snapshot(&options.model);
    let message = rfid_moe::compress(options)
        .expect_err("a hostile run must fail")
        .to_string();
    println!("{message}");
    assert!(!message.contains('\n'), "one line: {message}");
    for (output, before) in outputs.iter().zip(outputs_before) {
        assert_eq!(state(output), before, "{output:?} was written");
        assert_eq!(common::staging_leftovers(output), Vec::<String>::new());
    }
    assert_eq!(
        common::snapshot(&options.model),
        model_before,
        "the model changed"
    );
    message
}

// ---- 1. inputs destroyed -------------------------------------------------------------------

#[test]
fn out_that_contains_the_model_is_refused_even_with_force() {
    let (tmp, model) = common::copy_fixture("tiny-olmoe");
    let calibration = token_file(tmp.path(), 4, 16);
    let mut options = compress_options(&model, &calibration, tmp.path());
    options.output.force = true;
    let message = compress_error(&options);
    assert!(
        message.contains("--out") && message.contains("contains the input --model"),
        "{message}"
    );
    assert!(model.join("model.safetensors").exists());
}

#[test]
fn export_dense_equal_to_the_model_is_refused_even_with_force() {
    let (tmp, model) = common::copy_fixture("tiny-olmoe");
    let calibration = token_file(tmp.path(), 4, 16);
    let mut options = compress_options(&model, &calibration, &tmp.path().join("out"));
    options.output.export_dense = Some(model.join("."));
    options.output.force = true;
    let message = compress_error(&options);
    assert!(
        message.contains("--export-dense") && message.contains("is the input --model"),
        "{message}"
    );
}

#[test]
fn out_inside_the_model_or_equal_to_the_calibration_file_is_refused() {
    let (tmp, model) = common::copy_fixture("tiny-olmoe");
    let calibration = token_file(tmp.path(), 4, 16);
    let inside = compress_options(&model, &calibration, &model.join("compressed"));
    let message = compress_error(&inside);
    assert!(
        message.contains("sits inside the input --model"),
        "{message}"
    );
    let mut on_calibration = compress_options(&model, &calibration, &tmp.path().join("out"));
    on_calibration.calibration.statistics_cache = Some(calibration.clone());
    let message = compress_error(&on_calibration);
    assert!(
        message.contains("statistics_cache") && message.contains("--calibration"),
        "{message}"
    );
}

#[cfg(unix)]
#[test]
fn outputs_reaching_an_input_through_symlinks_or_hard_links_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, "hello").unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    let hard = tmp.path().join("hard.json");
    std::fs::hard_link(&text, &hard).unwrap();
    let inputs = [
        RunPath::new("--model", &model),
        RunPath::new("--text", &text),
    ];
    let cases: [(&str, PathBuf, &str); 4] = [
        ("--out", link.clone(), "is the input --model"),
        (
            "--out",
            link.join("sub/new"),
            "sits inside the input --model",
        ),
        (
            "--json",
            hard.clone(),
            "is the same file as the input --text",
        ),
        (
            "--json",
            tmp.path().join("missing/../text.txt"),
            "is the input --text",
        ),
    ];
    for (role, output, expected) in cases {
        let message = check_run_paths(&inputs, &[RunPath::new(role, &output)])
            .expect_err("must be refused")
            .to_string();
        assert!(message.contains(expected), "{output:?}: {message}");
    }
    let out = tmp.path().join("out");
    let message = check_run_paths(
        &inputs,
        &[
            RunPath::new("--out", &out),
            RunPath::new("--json", &out.join("report.json")),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains("two outputs"), "{message}");
    check_run_paths(&inputs, &[RunPath::new("--out", &out)]).unwrap();
}

// ---- 2. --force replacement ----------------------------------------------------------------

#[test]
fn force_replacement_swaps_in_the_new_output_and_leaves_no_debris() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old.txt"), "old").unwrap();
    std::fs::write(out.join("config.json"), "{}").unwrap();
    let writer = CheckpointWriter::create(&out, true).unwrap();
    writer.write_file("new.txt", b"new").unwrap();
    // Until finish, the old output is untouched.
    assert_eq!(std::fs::read_to_string(out.join("old.txt")).unwrap(), "old");
    writer.finish().unwrap();
    assert_eq!(std::fs::read_to_string(out.join("new.txt")).unwrap(), "new");
    assert!(!out.join("old.txt").exists());
    assert_eq!(common::hidden_entries(tmp.path()), Vec::<String>::new());
}

#[test]
fn force_never_replaces_a_directory_that_is_not_a_model_or_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let documents = tmp.path().join("documents");
    std::fs::create_dir(&documents).unwrap();
    std::fs::write(documents.join("thesis.tex"), "years of work").unwrap();
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "notes").unwrap();
    let before = common::snapshot(tmp.path());
    for out in [&documents, &file] {
        let error = CheckpointWriter::create(out, true).unwrap_err().to_string();
        assert!(
            error.contains(out.to_str().unwrap()) && error.contains("refusing to replace"),
            "{error}"
        );
    }
    assert_eq!(common::snapshot(tmp.path()), before);
    assert_eq!(common::hidden_entries(tmp.path()), Vec::<String>::new());
}

#[cfg(target_os = "linux")]
#[test]
fn a_replacement_interrupted_between_two_renames_is_restored_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // What the two-rename fallback leaves when killed between its renames: no output, a backup
    // of a dead process.
    let backup = tmp.path().join(".out.old-999999999");
    std::fs::create_dir(&backup).unwrap();
    std::fs::write(backup.join("config.json"), "{}").unwrap();
    let error = CheckpointWriter::create(&out, false)
        .unwrap_err()
        .to_string();
    assert!(error.contains("already exists"), "{error}");
    assert!(out.join("config.json").exists() && !backup.exists());
}

// ---- 3. reads outside the model ------------------------------------------------------------

fn rewrite_index(dir: &Path, edit: impl Fn(&str) -> Option<String>) {
    let path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for value in index["weight_map"].as_object_mut().unwrap().values_mut() {
        if let Some(new) = edit(value.as_str().unwrap()) {
            *value = serde_json::json!(new);
        }
    }
    std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn index_entries_outside_the_model_directory_are_refused() {
    let first = "model-00001-of-00002.safetensors";
    let mut kinds = vec!["absolute", "parent"];
    if cfg!(unix) {
        kinds.push("symlink");
    }
    for kind in kinds {
        let (tmp, dir) = common::copy_fixture("tiny-qwen3_moe");
        let outside = tmp.path().join("outside.safetensors");
        std::fs::copy(dir.join(first), &outside).unwrap();
        let entry = match kind {
            "absolute" => outside.to_str().unwrap().to_string(),
            "parent" => "../outside.safetensors".to_string(),
            _ => {
                #[cfg(unix)]
                std::os::unix::fs::symlink(&outside, dir.join("link.safetensors")).unwrap();
                "link.safetensors".to_string()
            }
        };
        rewrite_index(&dir, |file| (file == first).then(|| entry.clone()));
        let message = load_error(&dir);
        assert!(
            message.contains("model.safetensors.index.json")
                && message.contains("weight_map entry for tensor `")
                && message.contains(&entry),
            "{kind}: {message}"
        );
    }
}

#[cfg(unix)]
#[test]
fn hugging_face_cache_snapshots_linking_into_blobs_still_load() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("models--tiny--qwen3");
    let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots/abc123"));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(common::fixture("tiny-qwen3_moe")).unwrap() {
        let entry = entry.unwrap();
        let blob = blobs.join(format!("blob-{}", entry.file_name().to_string_lossy()));
        std::fs::copy(entry.path(), &blob).unwrap();
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(blob.file_name().unwrap()),
            snapshot.join(entry.file_name()),
        )
        .unwrap();
    }
    let checkpoint = Checkpoint::open(&snapshot).unwrap();
    Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
}

// ---- 4. accepted silently ------------------------------------------------------------------

/// The header of `path` as JSON text with `extra` (a `"name": {...}` entry) appended.
fn append_header_entry(path: &Path, extra: &str, extra_data: &[u8]) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end();
    let header = format!("{},{extra}}}", header.strip_suffix('}').unwrap());
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    out.extend_from_slice(extra_data);
    std::fs::write(path, out).unwrap();
}

fn norm_entry(header: &serde_json::Value) -> String {
    format!(
        "\"model.norm.weight\":{}",
        serde_json::to_string(&header["model.norm.weight"]).unwrap()
    )
}

#[test]
fn duplicate_tensor_names_are_refused() {
    let (_tmp, dir) = common::copy_fixture("tiny-olmoe");
    let path = dir.join("model.safetensors");
    let (header, _) = common::read_safetensors_raw(&path);
    // The same entry twice: a JSON map would silently keep one and the file would look valid.
    append_header_entry(&path, &norm_entry(&header), &[]);
    let message = load_error(&dir);
    assert!(
        message.contains("model.safetensors")
            && message.contains("`model.norm.weight` appears more than once"),
        "{message}"
    );
}

#[test]
fn overlapping_data_ranges_name_both_tensors() {
    let (_tmp, dir) = common::copy_fixture("tiny-olmoe");
    let path = dir.join("model.safetensors");
    append_header_entry(
        &path,
        r#""alias":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}"#,
        &[],
    );
    let message = load_error(&dir);
    assert!(
        message.contains("`alias`")
            && message.contains("`lm_head.weight`")
            && message.contains("overlaps")
            && message.contains("model.safetensors"),
        "{message}"
    );
}

#[test]
fn shapes_whose_byte_size_overflows_are_refused() {
    let (_tmp, dir) = common::copy_fixture("tiny-olmoe");
    let path = dir.join("model.safetensors");
    let data_len = common::read_safetensors_raw(&path).1.len();
    append_header_entry(
        &path,
        &format!(
            r#""huge":{{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[{data_len},{}]}}"#,
            data_len + 4
        ),
        &[0; 4],
    );
    let message = load_error(&dir);
    assert!(
        message.contains("`huge`") && message.contains("overflows"),
        "{message}"
    );
}

#[test]
fn a_tensor_in_two_shards_that_the_index_does_not_place_is_refused() {
    let (_tmp, dir) = common::copy_fixture("tiny-qwen3_moe");
    let (first, second) = (
        dir.join("model-00001-of-00002.safetensors"),
        dir.join("model-00002-of-00002.safetensors"),
    );
    let (header, data) = common::read_safetensors_raw(&first);
    let info = &header["lm_head.weight"];
    let (begin, end) = (
        info["data_offsets"][0].as_u64().unwrap() as usize,
        info["data_offsets"][1].as_u64().unwrap() as usize,
    );
    let second_len = common::read_safetensors_raw(&second).1.len();
    append_header_entry(
        &second,
        &format!(
            r#""lm_head.weight":{{"dtype":"F32","shape":{},"data_offsets":[{second_len},{}]}}"#,
            info["shape"],
            second_len + end - begin
        ),
        &data[begin..end],
    );
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("lm_head.weight");
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains("`lm_head.weight` is stored in both")
            && message.contains("model-00001-of-00002")
            && message.contains("model-00002-of-00002"),
        "{message}"
    );
}

#[test]
fn unsupported_float_formats_are_named() {
    let (_tmp, dir) = common::copy_fixture("tiny-olmoe");
    let path = dir.join("model.safetensors");
    let data_len = common::read_safetensors_raw(&path).1.len();
    append_header_entry(
        &path,
        &format!(
            r#""model.layers.0.mx":{{"dtype":"F8_E8M0","shape":[8],"data_offsets":[{data_len},{}]}}"#,
            data_len + 8
        ),
        &[0; 8],
    );
    let message = load_error(&dir);
    assert!(
        message.contains("unsupported dtype `F8_E8M0` for tensor `model.layers.0.mx`")
            && message.contains("supported: F32, BF16")
            && message.contains("model.safetensors"),
        "{message}"
    );
}

// ---- 5. token ids --------------------------------------------------------------------------

fn calibration_error(ids: Tensor) -> String {
    let (tmp, model) = common::copy_fixture("tiny-olmoe");
    let calibration = tmp.path().join("ids.safetensors");
    common::write_input_ids(&calibration, ids);
    let message = compress_error(&compress_options(
        &model,
        &calibration,
        &tmp.path().join("out"),
    ));
    assert!(
        message.contains("ids.safetensors") && message.contains("input_ids"),
        "{message}"
    );
    message
}

#[test]
fn float_token_ids_are_refused_by_dtype() {
    let ids = Tensor::zeros((4, 16), DType::F32, &Device::Cpu).unwrap();
    let message = calibration_error(ids);
    assert!(message.contains("dtype F32") && message.contains("expected I64 or I32"));
}

#[test]
fn negative_and_out_of_vocabulary_ids_are_reported_with_value_and_position() {
    for (bad, shown) in [
        (-7i64, "token id -7 at [1, 3]"),
        (256, "token id 256 at [1, 3]"),
        ((1i64 << 32) + 5, "token id 4294967301 at [1, 3]"),
    ] {
        let mut ids = vec![1i64; 4 * 16];
        ids[16 + 3] = bad;
        let message = calibration_error(Tensor::from_vec(ids, (4, 16), &Device::Cpu).unwrap());
        assert!(
            message.contains(shown) && message.contains("[0, 256)"),
            "{message}"
        );
    }
}

#[test]
fn token_ids_of_the_wrong_rank_are_refused() {
    let ids = Tensor::zeros((2, 4, 16), DType::I64, &Device::Cpu).unwrap();
    let message = calibration_error(ids);
    assert!(message.contains("[2, 4, 16]") && message.contains("expected [batch, seq]"));
}

#[test]
fn i32_token_ids_are_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ids.safetensors");
    let data: Vec<u8> = [3i32, 255, 0, 7]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    common::write_safetensors_raw(
        &path,
        &serde_json::json!({"input_ids": {"dtype": "I32", "shape": [2, 2], "data_offsets": [0, 16]}}),
        &data,
    );
    assert_eq!(
        rfid_moe::text::read_token_ids(&path, 256).unwrap(),
        vec![vec![3, 255], vec![0, 7]]
    );
}

// ---- 6. non-finite weights -----------------------------------------------------------------

fn poison(dir: &Path, tensor: &str, value: f32, element: usize) {
    let path = dir.join("model.safetensors");
    let (header, mut data) = common::read_safetensors_raw(&path);
    let begin = header[tensor]["data_offsets"][0].as_u64().unwrap() as usize + 4 * element;
    data[begin..begin + 4].copy_from_slice(&value.to_le_bytes());
    common::write_safetensors_raw(&path, &header, &data);
}

#[test]
fn nan_and_infinite_weights_are_named_by_tensor() {
    for (value, shown) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
        let (_tmp, dir) = common::copy_fixture("tiny-olmoe");
        poison(
            &dir,
            "model.layers.1.mlp.experts.3.down_proj.weight",
            value,
            5,
        );
        let message = load_error(&dir);
        assert!(
            message.contains("`model.layers.1.mlp.experts.3.down_proj.weight`")
                && message.contains(&format!("holds {shown} at element 5"))
                && message.contains("expected finite values")
                && message.contains("model.safetensors"),
            "{message}"
        );
    }
}

#[test]
fn half_precision_non_finite_values_are_found() {
    let path = Path::new("w.safetensors");
    use rfid_moe::checkpoint::{check_finite, StoredDType};
    let bf16_inf = half::bf16::INFINITY.to_le_bytes();
    let f16_nan = half::f16::NAN.to_le_bytes();
    let ok = half::bf16::from_f32(65504.0).to_le_bytes();
    check_finite(path, "w", StoredDType::BF16, &[ok, ok].concat()).unwrap();
    let error = check_finite(path, "w", StoredDType::BF16, &[ok, bf16_inf].concat())
        .unwrap_err()
        .to_string();
    assert!(error.contains("inf at element 1"), "{error}");
    let error = check_finite(path, "w", StoredDType::F16, &[f16_nan, ok].concat())
        .unwrap_err()
        .to_string();
    assert!(error.contains("NaN at element 0"), "{error}");
}

#[test]
fn compress_of_a_model_with_nan_weights_fails_and_writes_nothing() {
    let (tmp, model) = common::copy_fixture("tiny-olmoe");
    poison(
        &model,
        "model.layers.0.mlp.experts.0.down_proj.weight",
        f32::NAN,
        0,
    );
    let calibration = token_file(tmp.path(), 4, 16);
    let message = compress_error(&compress_options(
        &model,
        &calibration,
        &tmp.path().join("out"),
    ));
    assert!(
        message.contains("experts.0.down_proj.weight") && message.contains("finite"),
        "{message}"
    );
}

// ---- 7. panics and aborts ------------------------------------------------------------------

#[test]
fn impossible_config_sizes_are_refused_by_key() {
    let cases: [(&str, &str, serde_json::Value, &str); 6] = [
        (
            "tiny-qwen3_moe",
            "num_attention_heads",
            0.into(),
            "num_attention_heads = 0 is out of range",
        ),
        (
            "tiny-qwen3_moe",
            "num_local_experts",
            1_000_000_000_000u64.into(),
            "num_local_experts) = 1000000000000 is out of range",
        ),
        (
            "tiny-qwen3_moe",
            "max_position_embeddings",
            1_000_000_000_000u64.into(),
            "max_position_embeddings = 1000000000000 is out of range",
        ),
        (
            "tiny-mixtral",
            "num_key_value_heads",
            3.into(),
            "not a multiple of num_key_value_heads = 3",
        ),
        (
            "tiny-olmoe",
            "hidden_size",
            0.into(),
            "hidden_size = 0 is out of range",
        ),
        (
            "tiny-deepseek_v3",
            "n_group",
            3.into(),
            "n_routed_experts = 8 is not a multiple of n_group = 3",
        ),
    ];
    for (fixture, key, value, expected) in cases {
        let (_tmp, dir) = common::copy_fixture(fixture);
        common::edit_config(&dir, |c| c[key] = value.clone());
        let message = load_error(&dir);
        assert!(
            message.contains("config.json") && message.contains(expected),
            "{fixture} {key}: {message}"
        );
    }
}

#[test]
fn expert_counts_must_match_the_tensors() {
    for (count, expected) in [
        (17, "no tensors for expert 16"),
        (15, "also holds expert 15"),
    ] {
        let (_tmp, dir) = common::copy_fixture("tiny-qwen3_moe");
        common::edit_config(&dir, |c| c["num_local_experts"] = count.into());
        let message = load_error(&dir);
        assert!(
            message.contains("config.json") && message.contains(expected),
            "{message}"
        );
    }
}

#[test]
fn compress_with_an_absurd_expert_count_fails_before_writing() {
    let (tmp, model) = common::copy_fixture("tiny-olmoe");
    common::edit_config(&model, |c| c["num_experts"] = 1_000_000_000_000u64.into());
    let calibration = token_file(tmp.path(), 4, 16);
    let message = compress_error(&compress_options(
        &model,
        &calibration,
        &tmp.path().join("out"),
    ));
    assert!(message.contains("num_experts = 1000000000000"), "{message}");
}

// ---- 8. silently wrong results --------------------------------------------------------------

#[test]
fn malformed_and_negative_rotary_settings_are_refused_not_defaulted() {
    let cases: [(&str, serde_json::Value, &str); 5] = [
        (
            "rope_parameters",
            5.into(),
            "`rope_parameters` is 5 (expected an object",
        ),
        (
            "rope_parameters",
            serde_json::json!([1, 2, 3]),
            "`rope_parameters` is [1,2,3]",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_theta": "1e6"}),
            "`rope_parameters.rope_theta` is \"1e6\" (expected a number)",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_theta": -5.0, "rope_type": "default"}),
            "`rope_parameters.rope_theta` = -5 is out of range",
        ),
        (
            "rope_theta",
            (-5.0).into(),
            "`rope_theta` = -5 is out of range",
        ),
    ];
    for (key, value, expected) in cases {
        let (_tmp, dir) = common::copy_fixture("tiny-qwen3_moe");
        common::edit_config(&dir, |c| {
            if key == "rope_theta" {
                c.as_object_mut().unwrap().remove("rope_parameters");
            }
            c[key] = value.clone();
        });
        let message = load_error(&dir);
        assert!(
            message.contains("config.json") && message.contains(expected),
            "{key} = {value}: {message}"
        );
    }
}

#[test]
fn a_string_where_a_number_belongs_is_refused_by_key() {
    let (_tmp, dir) = common::copy_fixture("tiny-olmoe");
    common::edit_config(&dir, |c| c["intermediate_size"] = "64".into());
    let message = load_error(&dir);
    assert!(
        message.contains("config.json")
            && message.contains("key `intermediate_size` = \"64\"")
            && message.contains("expected usize"),
        "{message}"
    );
}

#[test]
fn more_configured_layers_than_stored_are_blamed_on_num_hidden_layers() {
    let (_tmp, dir) = common::copy_fixture("tiny-qwen3_moe");
    let stored = common::read_config(&dir)["num_hidden_layers"]
        .as_u64()
        .unwrap();
    common::edit_config(&dir, |c| c["num_hidden_layers"] = (stored + 1).into());
    let message = load_error(&dir);
    assert!(
        message.contains(&format!("num_hidden_layers = {}", stored + 1))
            && message.contains(&format!("no tensors for layer {stored}"))
            && !message.contains("num_experts"),
        "{message}"
    );
}

/// A compressed copy of tiny-olmoe with int8 factors (the default method), in `tmp/out`.
fn int8_output(tmp: &Path, model: &Path) -> PathBuf {
    let calibration = token_file(tmp, 4, 16);
    let out = tmp.join("out");
    let mut options = common::small_default_options(model, &calibration, &out, 0.4);
    options.calibration.samples = 4;
    options.calibration.seq_len = 16;
    rfid_moe::compress(&options).unwrap();
    out
}

#[test]
fn an_unknown_compression_method_or_storage_is_refused() {
    let (tmp, model) = common::copy_fixture("tiny-olmoe");
    let out = int8_output(tmp.path(), &model);
    for (key, value) in [("method", "other-tool"), ("factor_storage", "int4-row64")] {
        let copy = tmp.path().join(format!("copy-{key}"));
        common::copy_dir(&out, &copy);
        common::edit_config(&copy, |c| c["compression"][key] = value.into());
        let message = load_error(&copy);
        assert!(
            message.contains(&format!("`compression.{key}` is `{value}`")),
            "{message}"
        );
    }
}

#[test]
fn zero_negative_and_overflowing_int8_scales_are_refused_at_load_by_name() {
    let (tmp, model) = common::copy_fixture("tiny-olmoe");
    let out = int8_output(tmp.path(), &model);
    let shard = common::shard_holding(&out, |name| name.ends_with("_scale"));
    let (header, _) = common::read_safetensors_raw(&out.join(&shard));
    let name = header
        .as_object()
        .unwrap()
        .keys()
        .find(|n| n.ends_with("_scale"))
        .unwrap()
        .clone();
    for value in [0.0f32, -0.5, 1e30] {
        let copy = tmp.path().join("bad-scales");
        let _ = std::fs::remove_dir_all(&copy);
        common::copy_dir(&out, &copy);
        let path = copy.join(&shard);
        let (header, mut data) = common::read_safetensors_raw(&path);
        let begin = header[&name]["data_offsets"][0].as_u64().unwrap() as usize;
        data[begin..begin + 4].copy_from_slice(&value.to_le_bytes());
        common::write_safetensors_raw(&path, &header, &data);
        let message = load_error(&copy);
        assert!(
            message.contains(&format!("`{name}`"))
                && message.contains(&format!("hold {value} at row 0, block 0"))
                && message.contains("expected positive scales"),
            "{value}: {message}"
        );
    }
}

fn text_calibration_error(calibration: &Path) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = compress_options(&common::mini_model(), calibration, &tmp.path().join("out"));
    options.calibration.seq_len = 32;
    compress_error(&options)
}

#[cfg(unix)]
#[test]
fn devices_as_calibration_text_are_refused_without_reading() {
    let message = text_calibration_error(Path::new("/dev/zero"));
    assert!(
        message.contains("/dev/zero") && message.contains("not a regular file"),
        "{message}"
    );
}

#[test]
fn text_over_the_size_limit_is_refused_without_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("huge.txt");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(rfid_moe::safety::MAX_TEXT_BYTES + 1).unwrap(); // sparse: no disk used
    let message = text_calibration_error(&path);
    assert!(
        message.contains("huge.txt") && message.contains("larger than the 2147483648-byte limit"),
        "{message}"
    );
}

#[test]
fn invalid_utf8_text_is_refused_with_the_byte_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("latin1.txt");
    std::fs::write(&path, b"caf\xe9 au lait\n").unwrap();
    let message = text_calibration_error(&path);
    assert!(
        message.contains("latin1.txt") && message.contains("invalid UTF-8 at byte 3"),
        "{message}"
    );
}

// ---- 8. leftovers --------------------------------------------------------------------------

#[cfg(target_os = "linux")]
#[test]
fn staging_directories_of_dead_runs_are_removed_by_the_next_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let stale = tmp.path().join(".out.partial-999999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("shard-00001.safetensors"), [0u8; 64]).unwrap();
    let other = tmp.path().join(".other.partial-999999999");
    std::fs::create_dir(&other).unwrap();
    let writer = CheckpointWriter::create(&tmp.path().join("out"), false).unwrap();
    assert!(
        !stale.exists(),
        "stale staging of a dead run must be removed"
    );
    assert!(
        other.exists(),
        "staging of another output is not ours to remove"
    );
    drop(writer);
    assert_eq!(
        common::hidden_entries(tmp.path()),
        vec![".other.partial-999999999"]
    );
}

#[test]
fn forward_reports_ids_outside_u32_as_they_are() {
    let checkpoint = Checkpoint::open(common::fixture("tiny-olmoe")).unwrap();
    let model = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    for (bad, shown) in [
        (-7i64, "token id -7"),
        ((1 << 32) + 5, "token id 4294967301"),
    ] {
        let ids = Tensor::new(&[[1i64, bad]], &Device::Cpu).unwrap();
        let message = model.forward(&ids, None).unwrap_err().to_string();
        assert!(
            message.contains(shown) && message.contains("[0, 256)"),
            "{message}"
        );
    }
}

#[cfg(unix)]
#[test]
fn written_files_get_the_permissions_of_any_new_file() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let probe = tmp.path().join("probe");
    std::fs::write(&probe, b"").unwrap();
    let expected = mode(&probe);
    let out = tmp.path().join("out");
    let mut writer = CheckpointWriter::create(&out, false).unwrap();
    let tensor = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    writer
        .write_shard(std::collections::HashMap::from([(
            "t".to_string(),
            tensor.clone(),
        )]))
        .unwrap();
    writer.finish().unwrap();
    let single = tmp.path().join("logits.safetensors");
    rfid_moe::checkpoint::writer::save_safetensors_atomic(
        &single,
        &std::collections::HashMap::from([("t".to_string(), tensor)]),
    )
    .unwrap();
    for path in [out.join("model.safetensors"), single] {
        assert_eq!(mode(&path), expected, "{}", path.display());
    }
}
