//! `config.json` sizes checked before anything is sized from them: every size key against a sane
//! range (zero heads would divide by zero; an absurd expert count or width would abort on
//! allocation), head and group divisibility, and expert counts against the tensors present.

use std::path::Path;

use super::{deepseek_v2, mixtral, olmoe, qwen2_moe, qwen3_moe, ArchConfig, ModelSpec};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Most decoder layers accepted.
pub const MAX_LAYERS: usize = 1024;
/// Largest width accepted (hidden and intermediate sizes, head dimensions, latent ranks).
pub const MAX_WIDTH: usize = 1 << 18;
/// Largest vocabulary accepted.
pub const MAX_VOCAB: usize = 1 << 22;
/// Most routed or shared experts per layer accepted.
pub const MAX_EXPERTS: usize = 1 << 14;
/// Most attention heads accepted.
pub const MAX_HEADS: usize = 1 << 12;
/// Most positions accepted (the rotary table is sized by it).
pub const MAX_POSITIONS: usize = 1 << 22;

/// One size key of `config.json` with the range it must lie in.
#[derive(Debug, Clone, Copy)]
pub struct SizeKey {
    /// The key.
    pub key: &'static str,
    /// Its value.
    pub value: usize,
    /// Smallest accepted value.
    pub min: usize,
    /// Largest accepted value.
    pub max: usize,
}

fn size(key: &'static str, value: usize, min: usize, max: usize) -> SizeKey {
    SizeKey {
        key,
        value,
        min,
        max,
    }
}

fn width(key: &'static str, value: usize) -> SizeKey {
    size(key, value, 1, MAX_WIDTH)
}

/// The keys every family has, under their common names.
fn common_keys(
    hidden: usize,
    layers: usize,
    heads: usize,
    top_k: usize,
    vocab: usize,
    positions: usize,
) -> Vec<SizeKey> {
    vec![
        width("hidden_size", hidden),
        size("num_hidden_layers", layers, 1, MAX_LAYERS),
        size("num_attention_heads", heads, 1, MAX_HEADS),
        size("num_experts_per_tok", top_k, 1, MAX_EXPERTS),
        size("vocab_size", vocab, 1, MAX_VOCAB),
        size("max_position_embeddings", positions, 1, MAX_POSITIONS),
    ]
}

/// Checks the head layout of grouped-query attention: query heads a multiple of key/value heads,
/// and a head dimension (explicit, or hidden / heads) that is even and at least 2.
fn check_heads(
    path: &Path,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: Option<usize>,
) -> Result<()> {
    let bad = |message: String| {
        Err(Error::Config {
            path: path.to_path_buf(),
            message,
        })
    };
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return bad(format!(
            "num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads} (expected heads shared evenly by key/value heads)"
        ));
    }
    let (dim, source) = match head_dim {
        Some(d) => (d, format!("head_dim = {d}")),
        None => (
            hidden / heads,
            format!("hidden_size / num_attention_heads = {hidden} / {heads}"),
        ),
    };
    if dim < 2 || !dim.is_multiple_of(2) {
        return bad(format!(
            "{source} gives a head dimension of {dim} (expected an even number ≥ 2)"
        ));
    }
    Ok(())
}

impl ArchConfig {
    /// Size keys and their accepted ranges, under this family's key names.
    pub fn size_keys(&self) -> Vec<SizeKey> {
        match self {
            Self::Mixtral(c) => mixtral_keys(c),
            Self::Qwen2Moe(c) => qwen2_keys(c),
            Self::Qwen3Moe(c) => qwen3_keys(c),
            Self::Olmoe(c) => olmoe_keys(c),
            Self::DeepseekV2(c) => deepseek_keys(c),
            Self::DeepseekV3(c) => deepseek_keys(&c.0),
        }
    }

    /// The key that gives the number of routed experts.
    pub fn experts_key(&self) -> &'static str {
        match self {
            Self::Mixtral(_) => "num_local_experts",
            Self::Qwen2Moe(_) | Self::Qwen3Moe(_) => "num_experts (or num_local_experts)",
            Self::Olmoe(_) => "num_experts",
            Self::DeepseekV2(_) | Self::DeepseekV3(_) => "n_routed_experts",
        }
    }

    /// Checks every size key and the head/group layout; runs before [`ArchConfig::spec`], which
    /// divides by head counts.
    pub(super) fn validate_sizes(&self, path: &Path) -> Result<()> {
        for key in self.size_keys() {
            if key.value < key.min || key.value > key.max {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    message: format!(
                        "{} = {} is out of range (expected {} to {})",
                        key.key, key.value, key.min, key.max
                    ),
                });
            }
        }
        match self {
            Self::Mixtral(c) => check_heads(
                path,
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
            ),
            Self::Qwen2Moe(c) => check_heads(
                path,
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                None,
            ),
            Self::Qwen3Moe(c) => check_heads(
                path,
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
            ),
            Self::Olmoe(c) => check_heads(
                path,
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                None,
            ),
            Self::DeepseekV2(c) => check_deepseek_layout(path, c),
            Self::DeepseekV3(c) => check_deepseek_layout(path, &c.0),
        }
    }
}

fn mixtral_keys(c: &mixtral::Config) -> Vec<SizeKey> {
    let mut keys = common_keys(
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_experts_per_tok,
        c.vocab_size,
        c.max_position_embeddings,
    );
    keys.extend([
        width("intermediate_size", c.intermediate_size),
        size("num_key_value_heads", c.num_key_value_heads, 1, MAX_HEADS),
        size("num_local_experts", c.num_local_experts, 1, MAX_EXPERTS),
    ]);
    keys.extend(c.head_dim.map(|d| width("head_dim", d)));
    keys
}

fn qwen2_keys(c: &qwen2_moe::Config) -> Vec<SizeKey> {
    let mut keys = common_keys(
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_experts_per_tok,
        c.vocab_size,
        c.max_position_embeddings,
    );
    keys.extend([
        width("intermediate_size", c.intermediate_size),
        width("moe_intermediate_size", c.moe_intermediate_size),
        size(
            "shared_expert_intermediate_size",
            c.shared_expert_intermediate_size,
            0,
            MAX_WIDTH,
        ),
        size("num_key_value_heads", c.num_key_value_heads, 1, MAX_HEADS),
        size("num_experts", c.num_experts, 0, MAX_EXPERTS),
    ]);
    keys
}

fn qwen3_keys(c: &qwen3_moe::Config) -> Vec<SizeKey> {
    let mut keys = common_keys(
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_experts_per_tok,
        c.vocab_size,
        c.max_position_embeddings,
    );
    keys.extend([
        width("intermediate_size", c.intermediate_size),
        width("moe_intermediate_size", c.moe_intermediate_size),
        size("num_key_value_heads", c.num_key_value_heads, 1, MAX_HEADS),
        size(
            "num_experts (or num_local_experts)",
            c.num_experts,
            0,
            MAX_EXPERTS,
        ),
    ]);
    keys.extend(c.head_dim.map(|d| width("head_dim", d)));
    keys
}

fn olmoe_keys(c: &olmoe::Config) -> Vec<SizeKey> {
    let mut keys = common_keys(
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_experts_per_tok,
        c.vocab_size,
        c.max_position_embeddings,
    );
    keys.extend([
        width("intermediate_size", c.intermediate_size),
        size("num_key_value_heads", c.num_key_value_heads, 1, MAX_HEADS),
        size("num_experts", c.num_experts, 1, MAX_EXPERTS),
    ]);
    keys
}

fn deepseek_keys(c: &deepseek_v2::Config) -> Vec<SizeKey> {
    let mut keys = common_keys(
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_experts_per_tok,
        c.vocab_size,
        c.max_position_embeddings,
    );
    keys.extend([
        width("intermediate_size", c.intermediate_size),
        width("moe_intermediate_size", c.moe_intermediate_size),
        size("n_routed_experts", c.n_routed_experts, 0, MAX_EXPERTS),
        size(
            "n_shared_experts",
            c.n_shared_experts.unwrap_or(0),
            0,
            MAX_EXPERTS,
        ),
        width("kv_lora_rank", c.kv_lora_rank),
        size("qk_nope_head_dim", c.qk_nope_head_dim, 0, MAX_WIDTH),
        width("qk_rope_head_dim", c.qk_rope_head_dim),
        width("v_head_dim", c.v_head_dim),
        size("n_group", c.n_group, 1, MAX_EXPERTS),
        size("topk_group", c.topk_group, 1, c.n_group.max(1)),
    ]);
    keys.extend(c.q_lora_rank.map(|r| width("q_lora_rank", r)));
    keys
}

/// DeepSeek: an even rotary head dimension, and experts split evenly into `n_group` groups.
fn check_deepseek_layout(path: &Path, c: &deepseek_v2::Config) -> Result<()> {
    let bad = |message: String| {
        Err(Error::Config {
            path: path.to_path_buf(),
            message,
        })
    };
    if !c.qk_rope_head_dim.is_multiple_of(2) {
        return bad(format!(
            "qk_rope_head_dim = {} is odd (expected an even rotary dimension)",
            c.qk_rope_head_dim
        ));
    }
    if !c.n_routed_experts.is_multiple_of(c.n_group) {
        return bad(format!(
            "n_routed_experts = {} is not a multiple of n_group = {} (expected equal expert groups)",
            c.n_routed_experts, c.n_group
        ));
    }
    Ok(())
}

/// Checks the float settings that would make every forward pass non-finite: `rms_norm_eps` must
/// not be negative (the family's own parse has checked it is a number).
pub fn check_float_keys(config: &serde_json::Value, path: &Path) -> Result<()> {
    match config.get("rms_norm_eps").and_then(|v| v.as_f64()) {
        Some(eps) if eps < 0.0 => Err(Error::Config {
            path: path.to_path_buf(),
            message: format!("rms_norm_eps = {eps} is negative (expected a number ≥ 0)"),
        }),
        _ => Ok(()),
    }
}

/// Checks that every decoder layer `0..num_hidden_layers` has tensors, so that a config claiming
/// more layers than were stored is blamed on `num_hidden_layers`, not on what a layer lacks.
pub fn check_layer_tensors(checkpoint: &Checkpoint, spec: &ModelSpec) -> Result<()> {
    let names = checkpoint.tensor_names();
    let has_layer = |layer: usize| {
        let prefix = format!("model.layers.{layer}.");
        let at = names.partition_point(|name| *name < prefix.as_str());
        names.get(at).is_some_and(|name| name.starts_with(&prefix))
    };
    let Some(missing) = (0..spec.num_layers).find(|&layer| !has_layer(layer)) else {
        return Ok(());
    };
    let stored = (0..MAX_LAYERS)
        .take_while(|&layer| has_layer(layer))
        .count();
    Err(Error::Config {
        path: checkpoint.config_path(),
        message: format!(
            "num_hidden_layers = {} but the checkpoint has no tensors for layer {missing} \
             (`model.layers.{missing}.*`; it stores {stored} layer(s)); expected the config to \
             match the tensors",
            spec.num_layers
        ),
    })
}

/// Checks that each MoE layer's routed-expert tensors match the configured count: the last
/// expert exists (per-expert keys, or fused tensors whose first dimension is the count) and no
/// expert beyond the count does.
pub fn check_expert_tensors(
    checkpoint: &Checkpoint,
    spec: &ModelSpec,
    experts_key: &str,
) -> Result<()> {
    let names = checkpoint.tensor_names();
    for (layer, layout) in spec.moe_layers.iter().enumerate() {
        let Some(layout) = layout else { continue };
        let n = layout.num_experts;
        let has_expert = |j: usize| {
            let prefix = format!("{}.experts.{j}.", layout.block);
            let at = names.partition_point(|name| *name < prefix.as_str());
            names.get(at).is_some_and(|name| name.starts_with(&prefix))
        };
        let fused = format!("{}.experts.gate_up_proj", layout.block);
        let fused_count = checkpoint
            .info(&fused)
            .and_then(|(i, _)| i.shape.first().copied());
        let bad = |message: String| {
            Err(Error::Config {
                path: checkpoint.config_path(),
                message,
            })
        };
        match fused_count {
            Some(count) if count != n => {
                return bad(format!(
                    "{experts_key} = {n} but `{fused}` holds {count} experts (expected the config to match the tensors)"
                ));
            }
            None if n > 0 && !has_expert(n - 1) => {
                return bad(format!(
                    "{experts_key} = {n} but layer {layer} has no tensors for expert {} (`{}.experts.{}.*`); expected the config to match the tensors",
                    n - 1,
                    layout.block,
                    n - 1
                ));
            }
            _ => {}
        }
        if has_expert(n) {
            return bad(format!(
                "{experts_key} = {n} but layer {layer} also holds expert {n} (`{}.experts.{n}.*`); expected the config to match the tensors",
                layout.block
            ));
        }
    }
    Ok(())
}
