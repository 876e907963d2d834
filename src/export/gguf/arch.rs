//! What llama.cpp calls each family and its tensors, and the hyper-parameters it reads: the
//! layout llama.cpp's own converter (`convert_hf_to_gguf.py`) writes for `qwen3moe`,
//! `qwen2moe`, `olmoe`, `llama` (Mixtral) and `deepseek2` (DeepSeek-V2/V3).

use serde_json::Value;

use crate::checkpoint::gguf::encode::MetaValue;
use crate::error::{Error, Result};
use crate::models::Family;

/// llama.cpp's architecture name of `family`.
pub fn architecture(family: Family) -> &'static str {
    match family {
        Family::Qwen3Moe => "qwen3moe",
        Family::Qwen2Moe => "qwen2moe",
        Family::Olmoe => "olmoe",
        Family::Mixtral => "llama",
        Family::DeepseekV2 | Family::DeepseekV3 => "deepseek2",
    }
}

/// Reads `config.json` values by the first of several keys that is present.
struct Hparams<'a> {
    config: &'a Value,
    family: Family,
}

impl Hparams<'_> {
    fn find(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter()
            .find_map(|k| self.config.get(*k).filter(|v| !v.is_null()))
    }

    fn bad(&self, key: &str, expected: &str) -> Error {
        Error::InvalidArgument(format!(
            "GGUF export of {}: config key `{key}` = {} is not {expected}",
            self.family.model_type(),
            self.config.get(key).unwrap_or(&Value::Null)
        ))
    }

    fn u32(&self, keys: &[&str]) -> Result<Option<u32>> {
        match self.find(keys) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| self.bad(keys[0], "a non-negative integer")),
        }
    }

    fn required_u32(&self, keys: &[&str]) -> Result<u32> {
        self.u32(keys)?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "GGUF export of {}: config.json lacks `{}`",
                self.family.model_type(),
                keys[0]
            ))
        })
    }

    fn f32(&self, keys: &[&str]) -> Result<Option<f32>> {
        match self.find(keys) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|v| Some(v as f32))
                .ok_or_else(|| self.bad(keys[0], "a number")),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.find(&[key]) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(key, "true or false")),
        }
    }

    /// The rotary settings, from `rope_parameters` or the older `rope_theta` + `rope_scaling`.
    fn rope(&self) -> serde_json::Map<String, Value> {
        if let Some(Value::Object(p)) = self.config.get("rope_parameters") {
            return p.clone();
        }
        let mut p = match self.config.get("rope_scaling") {
            Some(Value::Object(s)) => s.clone(),
            _ => serde_json::Map::new(),
        };
        if let Some(kind) = p.get("type").cloned() {
            p.entry("rope_type").or_insert(kind);
        }
        if let Some(theta) = self.config.get("rope_theta") {
            p.insert("rope_theta".into(), theta.clone());
        }
        p
    }
}

/// llama.cpp's expert-gating function ids.
const GATING_SOFTMAX: u32 = 1;
const GATING_SIGMOID: u32 = 2;
/// llama.cpp's rope-scaling type names.
const ROPE_SCALING: [(&str, &str); 2] = [("linear", "linear"), ("yarn", "yarn")];

/// The `{arch}.*` hyper-parameters llama.cpp reads for `family`, from `config.json`; refuses a
/// configuration llama.cpp's graph for the family would run differently, saying which key.
pub fn hyperparameters(family: Family, config: &Value) -> Result<Vec<(String, MetaValue)>> {
    let h = Hparams { config, family };
    let arch = architecture(family);
    let mut out: Vec<(String, MetaValue)> = Vec::new();
    let mut put = |key: &str, value: MetaValue| out.push((format!("{arch}.{key}"), value));
    let u = MetaValue::U32;
    check_routing(&h)?;
    put("block_count", u(h.required_u32(&["num_hidden_layers"])?));
    if let Some(n) = h.u32(&["max_position_embeddings"])? {
        put("context_length", u(n));
    }
    put("embedding_length", u(h.required_u32(&["hidden_size"])?));
    if let Some(n) = h.u32(&["intermediate_size"])? {
        put("feed_forward_length", u(n));
    }
    put(
        "attention.head_count",
        u(h.required_u32(&["num_attention_heads"])?),
    );
    let kv_heads = match family {
        // The latent attention is one shared key/value head as llama.cpp runs it.
        Family::DeepseekV2 | Family::DeepseekV3 => Some(1),
        _ => h.u32(&["num_key_value_heads"])?,
    };
    if let Some(n) = kv_heads {
        put("attention.head_count_kv", u(n));
    }
    let rope = h.rope();
    if let Some(theta) = rope.get("rope_theta").and_then(Value::as_f64) {
        put("rope.freq_base", MetaValue::F32(theta as f32));
    }
    rope_scaling(&h, &rope, &mut put)?;
    if let Some(eps) = h.f32(&["rms_norm_eps"])? {
        put("attention.layer_norm_rms_epsilon", MetaValue::F32(eps));
    }
    if let Some(n) = h.u32(&["num_local_experts", "num_experts", "n_routed_experts"])? {
        put("expert_count", u(n));
    }
    put(
        "expert_used_count",
        u(h.required_u32(&["num_experts_per_tok"])?),
    );
    if let Some(n) = h.u32(&["n_group"])? {
        put("expert_group_count", u(n));
    }
    if let Some(n) = h.u32(&["topk_group"])? {
        put("expert_group_used_count", u(n));
    }
    if let Some(d) = h.u32(&["head_dim"])? {
        put("attention.key_length", u(d));
        put("attention.value_length", u(d));
    }
    family_hyperparameters(&h, &mut put)?;
    Ok(last_value_per_key(out))
}

/// The pairs with each key once, at its first place, holding its last value (a family's own
/// setting overrides the generic one: DeepSeek's key length is not its `head_dim`).
fn last_value_per_key(pairs: Vec<(String, MetaValue)>) -> Vec<(String, MetaValue)> {
    let mut out: Vec<(String, MetaValue)> = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => out.push((key, value)),
        }
    }
    out
}

fn rope_scaling(
    h: &Hparams,
    rope: &serde_json::Map<String, Value>,
    put: &mut impl FnMut(&str, MetaValue),
) -> Result<()> {
    let kind = rope
        .get("rope_type")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = rope.get("factor").and_then(Value::as_f64);
    match (kind, factor) {
        ("default", _) => {}
        (kind, Some(factor)) if ROPE_SCALING.iter().any(|(k, _)| *k == kind) => {
            put("rope.scaling.type", MetaValue::Str(kind.into()));
            put("rope.scaling.factor", MetaValue::F32(factor as f32));
            if kind == "yarn" {
                let number = |k: &str| rope.get(k).and_then(Value::as_f64);
                if let Some(n) = rope
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                {
                    put(
                        "rope.scaling.original_context_length",
                        MetaValue::U32(n as u32),
                    );
                }
                for (hf, gguf) in [
                    ("extrapolation_factor", "rope.scaling.yarn_ext_factor"),
                    ("beta_fast", "rope.scaling.yarn_beta_fast"),
                    ("beta_slow", "rope.scaling.yarn_beta_slow"),
                ] {
                    if let Some(v) = number(hf) {
                        put(gguf, MetaValue::F32(v as f32));
                    }
                }
                if let Some(v) = number("attention_factor").or_else(|| number("attn_factor")) {
                    put("rope.scaling.yarn_attn_factor", MetaValue::F32(v as f32));
                }
                if let Some(m) = number("mscale_all_dim") {
                    put(
                        "rope.scaling.yarn_log_multiplier",
                        MetaValue::F32((0.1 * m) as f32),
                    );
                }
            }
        }
        (kind, _) => {
            return Err(Error::InvalidArgument(format!(
                "GGUF export of {}: rotary scaling `{kind}` (factor {factor:?}) is not one \
                 llama.cpp reads from a GGUF (default, linear or yarn with a factor)",
                h.family.model_type()
            )))
        }
    }
    Ok(())
}

/// llama.cpp fixes per architecture whether the chosen experts' weights are renormalised
/// (qwen3moe and llama: yes; qwen2moe and olmoe: no) and runs every layer as MoE; a config
/// that differs would load and run wrong, so it is refused here.
fn check_routing(h: &Hparams) -> Result<()> {
    let fixed_norm = match h.family {
        Family::Qwen3Moe | Family::Mixtral => Some(true),
        Family::Qwen2Moe | Family::Olmoe => Some(false),
        Family::DeepseekV2 | Family::DeepseekV3 => None,
    };
    let norm = h.flag("norm_topk_prob")?;
    if let (Some(fixed), Some(norm)) = (fixed_norm, norm) {
        if fixed != norm {
            return Err(Error::InvalidArgument(format!(
                "GGUF export of {}: `norm_topk_prob` is {norm}, but llama.cpp's `{}` always \
                 runs it as {fixed}; the GGUF would compute something else",
                h.family.model_type(),
                architecture(h.family)
            )));
        }
    }
    if h.family == Family::Olmoe {
        let heads = h.required_u32(&["num_attention_heads"])?;
        let kv_heads = h.u32(&["num_key_value_heads"])?.unwrap_or(heads);
        if heads != kv_heads {
            return Err(Error::InvalidArgument(format!(
                "GGUF export of olmoe: llama.cpp's `olmoe` normalises keys over the width of \
                 all {heads} heads, so it needs `num_key_value_heads` ({kv_heads}) equal to \
                 `num_attention_heads`"
            )));
        }
    }
    let sparse_step = h.u32(&["decoder_sparse_step"])?.unwrap_or(1);
    let dense_layers = h
        .find(&["mlp_only_layers"])
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if matches!(h.family, Family::Qwen2Moe | Family::Qwen3Moe) && (sparse_step != 1 || dense_layers)
    {
        return Err(Error::InvalidArgument(format!(
            "GGUF export of {}: dense layers (`decoder_sparse_step` {sparse_step}, \
             `mlp_only_layers`) are not something llama.cpp's `{}` runs",
            h.family.model_type(),
            architecture(h.family)
        )));
    }
    Ok(())
}

fn family_hyperparameters(h: &Hparams, put: &mut impl FnMut(&str, MetaValue)) -> Result<()> {
    let u = MetaValue::U32;
    match h.family {
        Family::Qwen3Moe | Family::Qwen2Moe => {
            if let Some(n) = h.u32(&["moe_intermediate_size"])? {
                put("expert_feed_forward_length", u(n));
            }
            if let Some(n) = h.u32(&["shared_expert_intermediate_size"])? {
                put("expert_shared_feed_forward_length", u(n));
            }
        }
        Family::Olmoe => {}
        Family::Mixtral => {
            put("vocab_size", u(h.required_u32(&["vocab_size"])?));
            let heads = h.required_u32(&["num_attention_heads"])?;
            let head_dim = match h.u32(&["head_dim"])? {
                Some(d) => d,
                None => h.required_u32(&["hidden_size"])? / heads.max(1),
            };
            put("rope.dimension_count", u(head_dim));
        }
        Family::DeepseekV2 | Family::DeepseekV3 => deepseek_hyperparameters(h, put)?,
    }
    Ok(())
}

fn deepseek_hyperparameters(h: &Hparams, put: &mut impl FnMut(&str, MetaValue)) -> Result<()> {
    let u = MetaValue::U32;
    let layers = h.required_u32(&["num_hidden_layers"])?;
    let dense = h.u32(&["first_k_dense_replace"])?.unwrap_or(0).min(layers);
    put("leading_dense_block_count", u(dense));
    put("vocab_size", u(h.required_u32(&["vocab_size"])?));
    match h.u32(&["q_lora_rank"])? {
        Some(r) => put("attention.q_lora_rank", u(r)),
        // llama.cpp tells a model without the query's low-rank projection by its depth alone
        // (DeepSeek-V2-Lite's 26 or 27 layers, and one 48-layer model), so any other depth
        // would be read as having one.
        None if !matches!(layers, 26 | 27) => {
            return Err(Error::InvalidArgument(format!(
                "GGUF export of {}: `q_lora_rank` is null (full-rank query projections), which \
                 llama.cpp's `deepseek2` accepts only at DeepSeek-V2-Lite's depth of 26 or 27 \
                 layers, not {layers}",
                h.family.model_type()
            )))
        }
        None => {}
    }
    let kv_lora = h.required_u32(&["kv_lora_rank"])?;
    let rope = h.required_u32(&["qk_rope_head_dim"])?;
    let nope = h.required_u32(&["qk_nope_head_dim"])?;
    let v_head = h.required_u32(&["v_head_dim"])?;
    put("attention.kv_lora_rank", u(kv_lora));
    put("attention.key_length", u(kv_lora + rope));
    put("attention.value_length", u(kv_lora));
    put("attention.key_length_mla", u(nope + rope));
    put("attention.value_length_mla", u(v_head));
    put(
        "expert_feed_forward_length",
        u(h.required_u32(&["moe_intermediate_size"])?),
    );
    put(
        "expert_shared_count",
        u(h.u32(&["n_shared_experts"])?.unwrap_or(0)),
    );
    if let Some(s) = h.f32(&["routed_scaling_factor"])? {
        put("expert_weights_scale", MetaValue::F32(s));
    }
    if h.flag("norm_topk_prob")?.unwrap_or(false) {
        put("expert_weights_norm", MetaValue::Bool(true));
    }
    // Written even where the config leaves it implicit: llama.cpp defaults to softmax, which
    // is wrong for DeepSeek-V3.
    let scoring = match h.find(&["scoring_func"]).and_then(Value::as_str) {
        Some(s) => s,
        None if h.family == Family::DeepseekV3 => "sigmoid",
        None => "softmax",
    };
    let gating = match scoring {
        "sigmoid" => GATING_SIGMOID,
        "softmax" => GATING_SOFTMAX,
        other => {
            return Err(Error::InvalidArgument(format!(
                "GGUF export of {}: `scoring_func` = `{other}` is not sigmoid or softmax",
                h.family.model_type()
            )))
        }
    };
    put("expert_gating_func", u(gating));
    put("rope.dimension_count", u(rope));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routing_llama_cpp_would_run_differently_is_refused() {
        let config = serde_json::json!({
            "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "num_experts_per_tok": 2, "norm_topk_prob": false
        });
        let e = hyperparameters(Family::Qwen3Moe, &config)
            .unwrap_err()
            .to_string();
        assert!(e.contains("norm_topk_prob"), "{e}");
        assert!(hyperparameters(Family::Qwen2Moe, &config).is_ok());
    }
}
