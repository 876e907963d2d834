//! Writes a random checkpoint with the exact tensor names and shapes of a real MoE model, for
//! memory and speed measurements at real scale, plus random calibration token ids.
//!
//! ```sh
//! cargo run --release --example synthetic_checkpoint -- qwen3-30b-a3b 2 /tmp/qwen3-30b-2l
//! cargo run --release -- compress --model /tmp/qwen3-30b-2l \
//!     --calibration /tmp/qwen3-30b-2l/calibration.safetensors --samples 16 --seq-len 512 \
//!     --ratio 0.4 --out /tmp/qwen3-30b-2l-rfid
//! ```
//!
//! Shapes: `qwen3-30b-a3b` (Qwen/Qwen3-30B-A3B: 128 experts of 768×2048, top-8),
//! `mixtral-8x7b` (mistralai/Mixtral-8x7B-v0.1: 8 experts of 14336×4096, top-2) and
//! `deepseek-v2-lite` (deepseek-ai/DeepSeek-V2-Lite: latent attention, one dense first layer,
//! 64 routed experts of 1408×2048 plus 2 shared, top-6). Weights are
//! uniform in ±0.02·√3 (std 0.02), stored bf16; norms are ones. One shard per decoder layer, so
//! writing never holds more than one layer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

/// The dimensions that decide every tensor's shape.
struct Shape {
    config: serde_json::Value,
    hidden: usize,
    vocab: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    experts: usize,
    expert_intermediate: usize,
    /// Mixtral's `block_sparse_moe.experts.{j}.w1/w3/w2` instead of `mlp.experts.{j}.*_proj`.
    mixtral_names: bool,
    qk_norm: bool,
    /// DeepSeek multi-head latent attention: (kv_lora_rank, qk_nope, qk_rope, v_head_dim).
    latent: Option<(usize, usize, usize, usize)>,
    /// Shared-expert intermediate size (0 = none), at `mlp.shared_experts`.
    shared_intermediate: usize,
    /// Leading dense layers and their MLP width.
    dense_layers: usize,
    dense_intermediate: usize,
}

fn shape(name: &str, layers: usize) -> Option<Shape> {
    Some(match name {
        "qwen3-30b-a3b" => Shape {
            config: json!({
                "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4,
                "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16"
            }),
            hidden: 2048,
            vocab: 151936,
            heads: 32,
            kv_heads: 4,
            head_dim: 128,
            experts: 128,
            expert_intermediate: 768,
            mixtral_names: false,
            qk_norm: true,
            latent: None,
            shared_intermediate: 0,
            dense_layers: 0,
            dense_intermediate: 0,
        },
        "mixtral-8x7b" => Shape {
            config: json!({
                "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": layers,
                "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "tie_word_embeddings": false,
                "torch_dtype": "bfloat16"
            }),
            hidden: 4096,
            vocab: 32000,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            experts: 8,
            expert_intermediate: 14336,
            mixtral_names: true,
            qk_norm: false,
            latent: None,
            shared_intermediate: 0,
            dense_layers: 0,
            dense_intermediate: 0,
        },
        "deepseek-v2-lite" => Shape {
            config: json!({
                "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16,
                "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
                "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512,
                "q_lora_rank": null, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                "v_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                "routed_scaling_factor": 1.0, "norm_topk_prob": false, "vocab_size": 102400,
                "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                    "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
                "attention_bias": false, "tie_word_embeddings": false, "torch_dtype": "bfloat16"
            }),
            hidden: 2048,
            vocab: 102400,
            heads: 16,
            kv_heads: 16,
            head_dim: 192,
            experts: 64,
            expert_intermediate: 1408,
            mixtral_names: false,
            qk_norm: false,
            latent: Some((512, 128, 64, 128)),
            shared_intermediate: 2 * 1408,
            dense_layers: 1,
            dense_intermediate: 10944,
        },
        _ => return None,
    })
}

/// Random bf16 bytes, uniform with standard deviation 0.02 (splitmix64 per element).
fn random_bf16(elements: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; elements * 2];
    bytes
        .par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(chunk, out)| {
            let base = seed ^ ((chunk as u64) << 32);
            for (i, pair) in out.chunks_exact_mut(2).enumerate() {
                let bits = rfid_moe::rng::splitmix64(base.wrapping_add(i as u64));
                let unit = (bits >> 11) as f32 / (1u64 << 53) as f32;
                let value = (unit * 2.0 - 1.0) * 0.02 * 3f32.sqrt();
                pair.copy_from_slice(&half::bf16::from_f32(value).to_le_bytes());
            }
        });
    bytes
}

fn ones_bf16(elements: usize) -> Vec<u8> {
    half::bf16::ONE.to_le_bytes().repeat(elements)
}

/// Tensor name → (shape, bytes) of one shard.
type Shard = BTreeMap<String, (Vec<usize>, Vec<u8>)>;

fn write_shard(path: &Path, shard: &Shard) -> anyhow::Result<()> {
    let views = shard
        .iter()
        .map(|(name, (shape, bytes))| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::BF16, shape.clone(), bytes)?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)?;
    Ok(())
}

fn layer_shard(s: &Shape, layer: usize) -> Shard {
    let mut shard = Shard::new();
    let seed = 0x5eed_0000 + layer as u64 * 1_000;
    let mut next = 0u64;
    let mut random = |shape: Vec<usize>| {
        next += 1;
        let n = shape.iter().product();
        (shape, random_bf16(n, seed + next))
    };
    let p = format!("model.layers.{layer}");
    let (h, q, kv) = (s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    shard.insert(
        format!("{p}.input_layernorm.weight"),
        (vec![h], ones_bf16(h)),
    );
    shard.insert(
        format!("{p}.post_attention_layernorm.weight"),
        (vec![h], ones_bf16(h)),
    );
    match s.latent {
        None => {
            shard.insert(format!("{p}.self_attn.q_proj.weight"), random(vec![q, h]));
            shard.insert(format!("{p}.self_attn.k_proj.weight"), random(vec![kv, h]));
            shard.insert(format!("{p}.self_attn.v_proj.weight"), random(vec![kv, h]));
            shard.insert(format!("{p}.self_attn.o_proj.weight"), random(vec![h, q]));
        }
        Some((kv_lora, nope, rope, v)) => {
            let a = format!("{p}.self_attn");
            shard.insert(
                format!("{a}.q_proj.weight"),
                random(vec![s.heads * (nope + rope), h]),
            );
            shard.insert(
                format!("{a}.kv_a_proj_with_mqa.weight"),
                random(vec![kv_lora + rope, h]),
            );
            shard.insert(
                format!("{a}.kv_a_layernorm.weight"),
                (vec![kv_lora], ones_bf16(kv_lora)),
            );
            shard.insert(
                format!("{a}.kv_b_proj.weight"),
                random(vec![s.heads * (nope + v), kv_lora]),
            );
            shard.insert(format!("{a}.o_proj.weight"), random(vec![h, s.heads * v]));
        }
    }
    if layer < s.dense_layers {
        let m = s.dense_intermediate;
        shard.insert(format!("{p}.mlp.gate_proj.weight"), random(vec![m, h]));
        shard.insert(format!("{p}.mlp.up_proj.weight"), random(vec![m, h]));
        shard.insert(format!("{p}.mlp.down_proj.weight"), random(vec![h, m]));
        return shard;
    }
    if s.shared_intermediate > 0 {
        let (m, prefix) = (s.shared_intermediate, format!("{p}.mlp.shared_experts"));
        shard.insert(format!("{prefix}.gate_proj.weight"), random(vec![m, h]));
        shard.insert(format!("{prefix}.up_proj.weight"), random(vec![m, h]));
        shard.insert(format!("{prefix}.down_proj.weight"), random(vec![h, m]));
    }
    if s.qk_norm {
        for norm in ["q_norm", "k_norm"] {
            let d = s.head_dim;
            shard.insert(
                format!("{p}.self_attn.{norm}.weight"),
                (vec![d], ones_bf16(d)),
            );
        }
    }
    let (block, names) = match s.mixtral_names {
        true => ("block_sparse_moe", ["w1", "w3", "w2"]),
        false => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
    };
    shard.insert(
        format!("{p}.{block}.gate.weight"),
        random(vec![s.experts, h]),
    );
    let i = s.expert_intermediate;
    for e in 0..s.experts {
        let prefix = format!("{p}.{block}.experts.{e}");
        shard.insert(format!("{prefix}.{}.weight", names[0]), random(vec![i, h]));
        shard.insert(format!("{prefix}.{}.weight", names[1]), random(vec![i, h]));
        shard.insert(format!("{prefix}.{}.weight", names[2]), random(vec![h, i]));
    }
    shard
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, layers, out] = args.as_slice() else {
        anyhow::bail!(
            "usage: synthetic_checkpoint SHAPE LAYERS OUT_DIR \
             (shapes: qwen3-30b-a3b, mixtral-8x7b, deepseek-v2-lite)"
        );
    };
    let layers: usize = layers.parse()?;
    let s = shape(name, layers).ok_or_else(|| anyhow::anyhow!("unknown shape `{name}`"))?;
    let out = PathBuf::from(out);
    anyhow::ensure!(
        !out.exists(),
        "{} exists; choose a new directory",
        out.display()
    );
    std::fs::create_dir_all(&out)?;
    let files = layers + 1;
    let file_name = |k: usize| format!("model-{:05}-of-{files:05}.safetensors", k + 1);
    let mut weight_map = BTreeMap::new();
    let mut ends = Shard::new();
    ends.insert(
        "model.embed_tokens.weight".into(),
        (vec![s.vocab, s.hidden], random_bf16(s.vocab * s.hidden, 1)),
    );
    ends.insert(
        "lm_head.weight".into(),
        (vec![s.vocab, s.hidden], random_bf16(s.vocab * s.hidden, 2)),
    );
    ends.insert(
        "model.norm.weight".into(),
        (vec![s.hidden], ones_bf16(s.hidden)),
    );
    for (k, shard) in std::iter::once(ends)
        .chain((0..layers).map(|l| layer_shard(&s, l)))
        .enumerate()
    {
        write_shard(&out.join(file_name(k)), &shard)?;
        for tensor in shard.keys() {
            weight_map.insert(tensor.clone(), file_name(k));
        }
        eprintln!("wrote {}", file_name(k));
    }
    let index = json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&s.config)?,
    )?;
    // 128 windows of 512 random token ids, i64.
    let ids: Vec<u8> = (0..128 * 512u64)
        .flat_map(|t| ((rfid_moe::rng::splitmix64(t) % s.vocab as u64) as i64).to_le_bytes())
        .collect();
    let view = TensorView::new(Dtype::I64, vec![128, 512], &ids)?;
    safetensors::serialize_to_file(
        [("input_ids", view)],
        None,
        &out.join("calibration.safetensors"),
    )?;
    println!("wrote {} ({name}, {layers} layers)", out.display());
    Ok(())
}
