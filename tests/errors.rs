//! Malformed checkpoints fail with one clear error naming the file and key, never a panic.

mod common;

use candle_core::{DType, Device};
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::models::Model;

fn load_error(dir: &std::path::Path) -> String {
    let result =
        Checkpoint::open(dir).and_then(|c| Model::load(&c, DType::F32, &Device::Cpu).map(|_| ()));
    let message = result
        .expect_err("loading a malformed checkpoint must fail")
        .to_string();
    println!("{message}");
    assert!(
        !message.contains('\n'),
        "error should be one line: {message}"
    );
    message
}

#[test]
fn missing_shard_names_the_file() {
    let (_tmp, dir) = common::copy_fixture("tiny-qwen3_moe");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains("model-00002-of-00002.safetensors"),
        "{message}"
    );
    assert!(message.contains("missing"), "{message}");
}

#[test]
fn truncated_shard_is_reported_as_truncated() {
    let (_tmp, dir) = common::copy_fixture("tiny-mixtral");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let message = load_error(&dir);
    assert!(message.contains("model.safetensors"), "{message}");
    assert!(message.contains("truncated"), "{message}");
}

#[test]
fn header_lying_about_offsets_names_the_tensor() {
    let (_tmp, dir) = common::copy_fixture("tiny-olmoe");
    let path = dir.join("model.safetensors");
    let (mut header, data) = common::read_safetensors_raw(&path);
    header["model.norm.weight"]["data_offsets"][1] = serde_json::json!(
        header["model.norm.weight"]["data_offsets"][1]
            .as_u64()
            .unwrap()
            + 4
    );
    common::write_safetensors_raw(&path, &header, &data);
    let message = load_error(&dir);
    assert!(
        message.contains("model.norm.weight") && message.contains("data_offsets"),
        "{message}"
    );
}

#[test]
fn header_lying_about_dtype_names_the_tensor() {
    let (_tmp, dir) = common::copy_fixture("tiny-olmoe");
    let path = dir.join("model.safetensors");
    let (mut header, data) = common::read_safetensors_raw(&path);
    header["lm_head.weight"]["dtype"] = serde_json::json!("F16");
    common::write_safetensors_raw(&path, &header, &data);
    let message = load_error(&dir);
    assert!(
        message.contains("lm_head.weight") && message.contains("F16"),
        "{message}"
    );
}

#[test]
fn unknown_dtype_is_rejected() {
    let (_tmp, dir) = common::copy_fixture("tiny-olmoe");
    let path = dir.join("model.safetensors");
    let (mut header, data) = common::read_safetensors_raw(&path);
    header["lm_head.weight"]["dtype"] = serde_json::json!("Q4");
    common::write_safetensors_raw(&path, &header, &data);
    let message = load_error(&dir);
    assert!(
        message.contains("lm_head.weight") && message.contains("unsupported dtype `Q4`"),
        "{message}"
    );
}

#[test]
fn tensor_missing_from_index_names_the_key() {
    let (_tmp, dir) = common::copy_fixture("tiny-qwen3_moe");
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let key = "model.layers.1.mlp.experts.3.up_proj.weight";
    index["weight_map"].as_object_mut().unwrap().remove(key);
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains(key) && message.contains("not found"),
        "{message}"
    );
}

#[test]
fn index_listing_a_tensor_the_shard_lacks_is_reported() {
    let (_tmp, dir) = common::copy_fixture("tiny-qwen3_moe");
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.norm.weight"] =
        serde_json::json!("model-00001-of-00002.safetensors");
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains("model.norm.weight") && message.contains("model-00001-of-00002"),
        "{message}"
    );
}

#[test]
fn shape_disagreeing_with_config_names_tensor_and_shapes() {
    let (_tmp, dir) = common::copy_fixture("tiny-qwen2_moe");
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["moe_intermediate_size"] = serde_json::json!(48);
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let message = load_error(&dir);
    assert!(message.contains("experts.0.gate_proj.weight"), "{message}");
    assert!(
        message.contains("[32, 64]") && message.contains("[48, 64]"),
        "{message}"
    );
}

#[test]
fn unsupported_model_type_is_named() {
    let (_tmp, dir) = common::copy_fixture("tiny-mixtral");
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["model_type"] = serde_json::json!("llama");
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains("config.json") && message.contains("unsupported model_type `llama`"),
        "{message}"
    );
}

#[test]
fn missing_config_key_is_named() {
    let (_tmp, dir) = common::copy_fixture("tiny-mixtral");
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("num_local_experts");
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains("config.json") && message.contains("num_local_experts"),
        "{message}"
    );
}

#[test]
fn missing_model_directory_is_named() {
    let message = load_error(std::path::Path::new("/nonexistent/model-dir"));
    assert!(message.contains("/nonexistent/model-dir"), "{message}");
}
