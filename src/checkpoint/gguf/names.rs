//! llama.cpp's names for Hugging Face tensors (the layout its converter writes), and the
//! rearrangements it makes to two of them, shared by the GGUF writer and reader.

use candle_core::Tensor;

use crate::checkpoint::experts::ExpertMatrix;

use crate::error::{Error, Result};

/// The file name of the GGUF in an output directory.
pub const GGUF_FILE: &str = "model.gguf";
/// Metadata key holding the Hugging Face `config.json` text (llama.cpp ignores it).
pub const CONFIG_KEY: &str = "rfid_moe.config";

/// Hugging Face names outside the layers and their GGUF names.
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Hugging Face names inside layer `N` (after `model.layers.N.`) and their GGUF names (after
/// `blk.N.`), every family together: no name means two things in two families.
const LAYER_NAMES: [(&str, &str); 31] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("self_attn.q_a_proj.weight", "attn_q_a.weight"),
    ("self_attn.q_a_layernorm.weight", "attn_q_a_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn_q_b.weight"),
    (
        "self_attn.kv_a_proj_with_mqa.weight",
        "attn_kv_a_mqa.weight",
    ),
    ("self_attn.kv_a_layernorm.weight", "attn_kv_a_norm.weight"),
    ("mlp.gate.weight", "ffn_gate_inp.weight"),
    ("block_sparse_moe.gate.weight", "ffn_gate_inp.weight"),
    ("mlp.gate.e_score_correction_bias", "exp_probs_b.bias"),
    (
        "mlp.shared_expert.gate_proj.weight",
        "ffn_gate_shexp.weight",
    ),
    ("mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight"),
    (
        "mlp.shared_expert.down_proj.weight",
        "ffn_down_shexp.weight",
    ),
    ("mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight"),
    (
        "mlp.shared_experts.gate_proj.weight",
        "ffn_gate_shexp.weight",
    ),
    ("mlp.shared_experts.up_proj.weight", "ffn_up_shexp.weight"),
    (
        "mlp.shared_experts.down_proj.weight",
        "ffn_down_shexp.weight",
    ),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    // DeepSeek's latent attention: `kv_b_proj` is split per head into these two (see
    // [`KV_B_PROJ`]); listed so that reading maps both back to it.
    ("self_attn.kv_b_proj.weight", "attn_k_b.weight"),
    ("self_attn.kv_b_proj.weight", "attn_v_b.weight"),
];

/// The HF name split into two GGUF tensors (DeepSeek's `kv_b_proj`).
pub const KV_B_PROJ: &str = "self_attn.kv_b_proj.weight";

/// The GGUF name of a routed-expert stack of `matrix` in layer `layer`.
pub fn experts_name(layer: usize, matrix: ExpertMatrix) -> String {
    let kind = match matrix {
        ExpertMatrix::Gate => "gate",
        ExpertMatrix::Up => "up",
        ExpertMatrix::Down => "down",
    };
    format!("blk.{layer}.ffn_{kind}_exps.weight")
}

/// A tensor name split into its layer (None outside the layers) and the rest.
pub fn split_layer<'a>(name: &'a str, prefix: &str) -> Option<(Option<usize>, &'a str)> {
    match name.strip_prefix(prefix) {
        Some(rest) => {
            let (layer, rest) = rest.split_once('.')?;
            Some((Some(layer.parse().ok()?), rest))
        }
        None => Some((None, name)),
    }
}

/// The GGUF name of a non-expert Hugging Face tensor (None when llama.cpp has no such tensor).
pub fn gguf_name(hf: &str) -> Option<String> {
    match split_layer(hf, "model.layers.")? {
        (None, name) => GLOBAL_NAMES
            .iter()
            .find(|(h, _)| *h == name)
            .map(|(_, g)| g.to_string()),
        (Some(layer), rest) => LAYER_NAMES
            .iter()
            .find(|(h, _)| *h == rest)
            .map(|(_, g)| format!("blk.{layer}.{g}")),
    }
}

/// The Hugging Face name of a non-expert GGUF tensor (None when unknown).
pub fn hf_name(gguf: &str) -> Option<String> {
    match split_layer(gguf, "blk.")? {
        (None, name) => GLOBAL_NAMES
            .iter()
            .find(|(_, g)| *g == name)
            .map(|(h, _)| h.to_string()),
        (Some(layer), rest) => LAYER_NAMES
            .iter()
            .find(|(_, g)| *g == rest)
            .map(|(h, _)| format!("model.layers.{layer}.{h}")),
    }
}

/// Heads, `qk_nope_head_dim` and `v_head_dim` of a `kv_b_proj` of `shape`, checked.
pub fn kv_b_dims(
    config: &serde_json::Value,
    name: &str,
    shape: &[usize],
) -> Result<(usize, usize, usize)> {
    let get = |k: &str| config.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    match (
        get("num_attention_heads"),
        get("qk_nope_head_dim"),
        get("v_head_dim"),
        shape,
    ) {
        (Some(h), Some(nope), Some(v), [rows, _]) if *rows == h * (nope + v) => Ok((h, nope, v)),
        _ => Err(Error::InvalidArgument(format!(
            "tensor `{name}` of shape {shape:?} is not [num_attention_heads·(qk_nope_head_dim + \
             v_head_dim), kv_lora_rank] for this config"
        ))),
    }
}

/// Rows of a query or key projection [heads·head_dim, d] reordered from Hugging Face's
/// rotate-half pairing to llama.cpp's adjacent pairs (what its converter's `permute` does).
pub fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    Ok(t.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The inverse of [`permute_rows`].
pub fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    Ok(t.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (hf, gguf) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            (
                "model.layers.3.self_attn.q_norm.weight",
                "blk.3.attn_q_norm.weight",
            ),
            (
                "model.layers.0.mlp.shared_expert_gate.weight",
                "blk.0.ffn_gate_inp_shexp.weight",
            ),
            (
                "model.layers.12.mlp.gate.e_score_correction_bias",
                "blk.12.exp_probs_b.bias",
            ),
        ] {
            assert_eq!(gguf_name(hf).as_deref(), Some(gguf));
            assert_eq!(hf_name(gguf).as_deref(), Some(hf));
        }
        assert_eq!(
            gguf_name("model.layers.0.mlp.experts.0.up_proj.weight"),
            None
        );
        assert_eq!(
            experts_name(2, ExpertMatrix::Down),
            "blk.2.ffn_down_exps.weight"
        );
    }
}
