//! What transformers needs to load our outputs (docs/FORMAT.md, "Loading in transformers"):
//! the compressed checkpoint names its own model type and architecture and ships the modelling
//! file `python/modeling_rfid_moe.py` (loaded with `trust_remote_code=True`, factored experts
//! and no dense copy); the dense export keeps the expert layout of its input (fused 3-D
//! `gate_up_proj`/`down_proj` when the input was fused), so it loads without remote code.

use std::collections::HashMap;

use candle_core::Tensor;
use serde_json::{json, Value};

use crate::checkpoint::experts::{ExpertLayout, ExpertMatrix};
use crate::checkpoint::writer::CheckpointWriter;
use crate::checkpoint::{Checkpoint, CONFIG_FILE};
use crate::error::{Error, Result};
use crate::format::COMPRESSION_KEY;
use crate::models::{Family, COMPRESSED_MODEL_TYPE_PREFIX};

/// File name of the modelling code written next to the compressed weights.
pub const MODELING_FILE: &str = "modeling_rfid_moe.py";

/// The modelling code itself (`python/modeling_rfid_moe.py`).
pub const MODELING_SOURCE: &str = include_str!("../../python/modeling_rfid_moe.py");

/// Key of the `compression` section that keeps the family's own `model_type`.
pub const BASE_MODEL_TYPE_KEY: &str = "base_model_type";

/// The transformers class-name stem of `family` (`Qwen3Moe` for `Qwen3MoeForCausalLM`).
fn class_stem(family: Family) -> &'static str {
    match family {
        Family::Mixtral => "Mixtral",
        Family::Qwen2Moe => "Qwen2Moe",
        Family::Qwen3Moe => "Qwen3Moe",
        Family::Olmoe => "Olmoe",
        Family::DeepseekV2 => "DeepseekV2",
        Family::DeepseekV3 => "DeepseekV3",
    }
}

/// The family's own transformers class (`Qwen3MoeForCausalLM`).
pub(crate) fn family_architecture(family: Family) -> String {
    format!("{}ForCausalLM", class_stem(family))
}

/// Names the family's transformers class in `config`'s `architectures` when it names none (the
/// reference converters, llama.cpp's and vLLM's, pick the model by it); a config that names
/// one, or of no supported family, is left as it is.
pub fn name_architectures(config: &mut Value) {
    let named = config
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    let family = config
        .get("model_type")
        .and_then(Value::as_str)
        .and_then(Family::from_model_type);
    if let (false, Some(family)) = (named, family) {
        config["architectures"] = json!([family_architecture(family)]);
    }
}

/// Rewrites a compressed checkpoint's `config` (which already holds its `compression` section)
/// so that transformers builds our factored model from [`MODELING_FILE`]: `model_type`
/// `rfid_moe_<family>` (so that loading without remote code fails instead of building the
/// family's dense experts at random), `architectures`, `auto_map`, and the family's own
/// `model_type` kept as `compression.base_model_type`.
pub fn mark_factored_config(config: &mut Value, family: Family) -> Result<()> {
    let stem = class_stem(family);
    let base = family.model_type();
    let Some(object) = config.as_object_mut() else {
        return Err(Error::InvalidArgument(format!(
            "{CONFIG_FILE} of the output is not a JSON object"
        )));
    };
    let Some(compression) = object
        .get_mut(COMPRESSION_KEY)
        .and_then(Value::as_object_mut)
    else {
        return Err(Error::InvalidArgument(format!(
            "{CONFIG_FILE} of the output has no `{COMPRESSION_KEY}` section to mark"
        )));
    };
    compression.insert(BASE_MODEL_TYPE_KEY.into(), json!(base));
    object.insert(
        "model_type".into(),
        json!(format!("{COMPRESSED_MODEL_TYPE_PREFIX}{base}")),
    );
    object.insert(
        "architectures".into(),
        json!([format!("RfidMoe{stem}ForCausalLM")]),
    );
    object.insert(
        "auto_map".into(),
        json!({
            "AutoConfig": format!("modeling_rfid_moe.RfidMoe{stem}Config"),
            "AutoModelForCausalLM": format!("modeling_rfid_moe.RfidMoe{stem}ForCausalLM"),
        }),
    );
    Ok(())
}

/// Marks the compressed output's `config` for transformers ([`mark_factored_config`], family
/// read from `checkpoint`) and writes [`MODELING_FILE`] next to the weights.
pub fn add_transformers_loader(
    writer: &CheckpointWriter,
    checkpoint: &Checkpoint,
    config: &mut Value,
) -> Result<()> {
    let family = crate::models::ArchConfig::from_checkpoint(checkpoint)?
        .spec()
        .family;
    mark_factored_config(config, family)?;
    writer.write_file(MODELING_FILE, MODELING_SOURCE.as_bytes())
}

/// Replaces the per-expert gate/up/down tensors of `layout` in `tensors` by the fused 3-D
/// tensors the input stored (`experts.gate_up_proj` [n, 2p, d], `experts.down_proj` [n, d, p]),
/// for each matrix that `checkpoint` stores fused; matrices stored per expert are left alone.
pub fn fuse_like_input(
    checkpoint: &Checkpoint,
    layout: &ExpertLayout,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<()> {
    let mut take = |matrix: ExpertMatrix| -> Result<Vec<Tensor>> {
        (0..layout.num_experts)
            .map(|expert| {
                let name = layout.dense_name(expert, matrix);
                tensors.remove(&name).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "dense export: `{name}` was not produced, cannot fuse `{}`",
                        layout.fused_name(matrix)
                    ))
                })
            })
            .collect()
    };
    let mut fused = Vec::new();
    if layout.is_fused(checkpoint, ExpertMatrix::Gate) {
        let (gate, up) = (take(ExpertMatrix::Gate)?, take(ExpertMatrix::Up)?);
        let gate_up = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| Tensor::cat(&[g, u], 0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        fused.push((ExpertMatrix::Gate, Tensor::stack(&gate_up, 0)?));
    }
    if layout.is_fused(checkpoint, ExpertMatrix::Down) {
        fused.push((
            ExpertMatrix::Down,
            Tensor::stack(&take(ExpertMatrix::Down)?, 0)?,
        ));
    }
    for (matrix, tensor) in fused {
        tensors.insert(layout.fused_name(matrix), tensor);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_without_architectures_gets_the_family_class() {
        let mut config = json!({"model_type": "qwen3_moe"});
        name_architectures(&mut config);
        assert_eq!(config["architectures"], json!(["Qwen3MoeForCausalLM"]));
        let mut named = json!({"model_type": "mixtral", "architectures": ["Custom"]});
        name_architectures(&mut named);
        assert_eq!(named["architectures"], json!(["Custom"]));
        let mut unknown = json!({"model_type": "llama"});
        name_architectures(&mut unknown);
        assert!(unknown.get("architectures").is_none());
    }

    #[test]
    fn factored_config_names_our_classes_and_keeps_the_family() {
        let mut config = json!({"model_type": "qwen3_moe", "compression": {"method": "rfid-moe"}});
        mark_factored_config(&mut config, Family::Qwen3Moe).unwrap();
        assert_eq!(config["model_type"], "rfid_moe_qwen3_moe");
        assert_eq!(
            config["architectures"],
            json!(["RfidMoeQwen3MoeForCausalLM"])
        );
        assert_eq!(
            config["auto_map"]["AutoModelForCausalLM"],
            "modeling_rfid_moe.RfidMoeQwen3MoeForCausalLM"
        );
        assert_eq!(config["compression"]["base_model_type"], "qwen3_moe");
        assert_eq!(
            Family::from_model_type(config["model_type"].as_str().unwrap()),
            Some(Family::Qwen3Moe)
        );
    }

    #[test]
    fn modeling_file_defines_every_class_the_config_can_name() {
        for family in [
            Family::Mixtral,
            Family::Qwen2Moe,
            Family::Qwen3Moe,
            Family::Olmoe,
            Family::DeepseekV2,
            Family::DeepseekV3,
        ] {
            let mut config = json!({"compression": {}});
            mark_factored_config(&mut config, family).unwrap();
            for class in config["auto_map"].as_object().unwrap().values() {
                let name = class
                    .as_str()
                    .unwrap()
                    .trim_start_matches("modeling_rfid_moe.");
                assert!(
                    MODELING_SOURCE.contains(&format!("class {name}(")),
                    "{name} missing from {MODELING_FILE}"
                );
            }
            let model_type = format!(
                "model_type = \"{}\"",
                config["model_type"].as_str().unwrap()
            );
            assert!(MODELING_SOURCE.contains(&model_type), "{model_type}");
        }
    }

    #[test]
    fn a_config_without_compression_section_is_refused() {
        let mut config = json!({"model_type": "mixtral"});
        let err = mark_factored_config(&mut config, Family::Mixtral).unwrap_err();
        assert!(err.to_string().contains("compression"), "{err}");
    }
}
