//! Random checkpoints with the exact tensor names and shapes of real MoE models, for memory and
//! speed measurements at real scale.
//!
//! Shared by the `decode` benchmark (this crate) and the root package's
//! `examples/synthetic_checkpoint.rs`, which includes this file as a module; it therefore uses
//! only crates both depend on (`rfid-moe`, `rayon`, `safetensors`, `serde_json`, `half`,
//! `anyhow`).
//!
//! Shapes: `qwen3-30b-a3b` (Qwen/Qwen3-30B-A3B: 128 experts of 768×2048, top-8),
//! `mixtral-8x7b` (mistralai/Mixtral-8x7B-v0.1: 8 experts of 14336×4096, top-2) and
//! `deepseek-v2-lite` (deepseek-ai/DeepSeek-V2-Lite: latent attention, one dense first layer,
//! 64 routed experts of 1408×2048 plus 2 shared, top-6). Weights are uniform with standard
//! deviation 0.02 unless asked otherwise, stored bf16; norms are ones. One shard per decoder
//! layer, so writing never holds more than one layer.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

/// The shape names [`Shape::named`] knows.
pub const SHAPE_NAMES: [&str; 3] = ["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite"];

/// Standard deviation of the random weights.
pub const WEIGHT_STD: f32 = 0.02;

/// The dimensions that decide every tensor's shape.
pub struct Shape {
    /// The `config.json` written with the checkpoint (its `vocab_size` follows the vocabulary
    /// actually written).
    pub config: serde_json::Value,
    /// Model width.
    pub hidden: usize,
    /// The real model's vocabulary size.
    pub vocab: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Routed experts per MoE layer.
    pub experts: usize,
    /// Routed expert intermediate size.
    pub expert_intermediate: usize,
    /// Mixtral's `block_sparse_moe.experts.{j}.w1/w3/w2` instead of `mlp.experts.{j}.*_proj`.
    pub mixtral_names: bool,
    /// Per-head RMS norms of queries and keys (Qwen3).
    pub qk_norm: bool,
    /// DeepSeek multi-head latent attention: (kv_lora_rank, qk_nope, qk_rope, v_head_dim).
    pub latent: Option<(usize, usize, usize, usize)>,
    /// Shared-expert intermediate size (0 = none), at `mlp.shared_experts`.
    pub shared_intermediate: usize,
    /// Leading dense layers.
    pub dense_layers: usize,
    /// The dense layers' MLP width.
    pub dense_intermediate: usize,
}

impl Shape {
    /// The shape called `name` (one of [`SHAPE_NAMES`]) with `layers` decoder layers.
    pub fn named(name: &str, layers: usize) -> Option<Shape> {
        Some(match name {
            "qwen3-30b-a3b" => qwen3_30b_a3b(layers),
            "mixtral-8x7b" => mixtral_8x7b(layers),
            "deepseek-v2-lite" => deepseek_v2_lite(layers),
            _ => return None,
        })
    }

    /// The MoE block prefix of `layer` (`model.layers.{layer}.mlp` or `.block_sparse_moe`).
    pub fn moe_block(&self, layer: usize) -> String {
        let block = if self.mixtral_names {
            "block_sparse_moe"
        } else {
            "mlp"
        };
        format!("model.layers.{layer}.{block}")
    }

    /// Checkpoint names of the gate, up and down expert matrices.
    pub fn expert_matrix_names(&self) -> [&'static str; 3] {
        if self.mixtral_names {
            ["w1", "w3", "w2"]
        } else {
            ["gate_proj", "up_proj", "down_proj"]
        }
    }
}

fn qwen3_30b_a3b(layers: usize) -> Shape {
    Shape {
        // The keys after `torch_dtype` are in the real config too; candle-transformers'
        // `qwen3_moe::Config` requires them.
        config: json!({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
            "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4,
            "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
            "attention_bias": false, "hidden_act": "silu", "max_window_layers": 48,
            "sliding_window": null, "use_sliding_window": false
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
    }
}

fn mixtral_8x7b(layers: usize) -> Shape {
    Shape {
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
    }
}

fn deepseek_v2_lite(layers: usize) -> Shape {
    Shape {
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
    }
}

/// Random bf16 bytes, uniform with standard deviation `std` (splitmix64 per element).
pub fn random_bf16(elements: usize, seed: u64, std: f32) -> Vec<u8> {
    let mut bytes = vec![0u8; elements * 2];
    let half_width = std * 3f32.sqrt();
    bytes
        .par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(chunk, out)| {
            let base = seed ^ ((chunk as u64) << 32);
            for (i, pair) in out.chunks_exact_mut(2).enumerate() {
                let bits = rfid_moe::rng::splitmix64(base.wrapping_add(i as u64));
                let unit = (bits >> 11) as f32 / (1u64 << 53) as f32;
                let value = (unit * 2.0 - 1.0) * half_width;
                pair.copy_from_slice(&half::bf16::from_f32(value).to_le_bytes());
            }
        });
    bytes
}

/// `elements` bf16 ones.
pub fn ones_bf16(elements: usize) -> Vec<u8> {
    half::bf16::ONE.to_le_bytes().repeat(elements)
}

/// Tensor name → (shape, bf16 bytes) of one shard.
pub type Shard = BTreeMap<String, (Vec<usize>, Vec<u8>)>;

/// Writes `shard` as one bf16 safetensors file.
pub fn write_shard(path: &Path, shard: &Shard) -> anyhow::Result<()> {
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

/// A source of random tensors with consecutive seeds from a base.
pub struct RandomTensors {
    seed: u64,
    next: u64,
}

impl RandomTensors {
    /// Tensors seeded from `seed` on.
    pub fn new(seed: u64) -> Self {
        Self { seed, next: 0 }
    }

    /// The next random tensor of `shape`, standard deviation `std`.
    pub fn with_std(&mut self, shape: Vec<usize>, std: f32) -> (Vec<usize>, Vec<u8>) {
        self.next += 1;
        let n = shape.iter().product();
        (shape, random_bf16(n, self.seed + self.next, std))
    }

    /// The next random tensor of `shape`, standard deviation [`WEIGHT_STD`].
    pub fn weight(&mut self, shape: Vec<usize>) -> (Vec<usize>, Vec<u8>) {
        self.with_std(shape, WEIGHT_STD)
    }
}

fn attention_tensors(s: &Shape, p: &str, random: &mut RandomTensors, shard: &mut Shard) {
    let (h, q, kv) = (s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let a = format!("{p}.self_attn");
    match s.latent {
        None => {
            shard.insert(format!("{a}.q_proj.weight"), random.weight(vec![q, h]));
            shard.insert(format!("{a}.k_proj.weight"), random.weight(vec![kv, h]));
            shard.insert(format!("{a}.v_proj.weight"), random.weight(vec![kv, h]));
            shard.insert(format!("{a}.o_proj.weight"), random.weight(vec![h, q]));
        }
        Some((kv_lora, nope, rope, v)) => {
            let heads = s.heads;
            shard.insert(
                format!("{a}.q_proj.weight"),
                random.weight(vec![heads * (nope + rope), h]),
            );
            shard.insert(
                format!("{a}.kv_a_proj_with_mqa.weight"),
                random.weight(vec![kv_lora + rope, h]),
            );
            shard.insert(
                format!("{a}.kv_a_layernorm.weight"),
                (vec![kv_lora], ones_bf16(kv_lora)),
            );
            shard.insert(
                format!("{a}.kv_b_proj.weight"),
                random.weight(vec![heads * (nope + v), kv_lora]),
            );
            shard.insert(
                format!("{a}.o_proj.weight"),
                random.weight(vec![h, heads * v]),
            );
        }
    }
}

/// Every tensor of decoder layer `layer`; with `dense_gate_up` false the routed experts' gate
/// and up matrices are left out (a compressed checkpoint stores factors in their place).
pub fn layer_shard(s: &Shape, layer: usize, dense_gate_up: bool) -> Shard {
    let mut shard = Shard::new();
    let mut random = RandomTensors::new(0x5eed_0000 + layer as u64 * 1_000);
    let p = format!("model.layers.{layer}");
    let h = s.hidden;
    for norm in ["input_layernorm", "post_attention_layernorm"] {
        shard.insert(format!("{p}.{norm}.weight"), (vec![h], ones_bf16(h)));
    }
    attention_tensors(s, &p, &mut random, &mut shard);
    if layer < s.dense_layers {
        let m = s.dense_intermediate;
        shard.insert(
            format!("{p}.mlp.gate_proj.weight"),
            random.weight(vec![m, h]),
        );
        shard.insert(format!("{p}.mlp.up_proj.weight"), random.weight(vec![m, h]));
        shard.insert(
            format!("{p}.mlp.down_proj.weight"),
            random.weight(vec![h, m]),
        );
        return shard;
    }
    if s.shared_intermediate > 0 {
        let (m, prefix) = (s.shared_intermediate, format!("{p}.mlp.shared_experts"));
        shard.insert(
            format!("{prefix}.gate_proj.weight"),
            random.weight(vec![m, h]),
        );
        shard.insert(
            format!("{prefix}.up_proj.weight"),
            random.weight(vec![m, h]),
        );
        shard.insert(
            format!("{prefix}.down_proj.weight"),
            random.weight(vec![h, m]),
        );
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
    let block = s.moe_block(layer);
    let names = s.expert_matrix_names();
    shard.insert(
        format!("{block}.gate.weight"),
        random.weight(vec![s.experts, h]),
    );
    let i = s.expert_intermediate;
    for e in 0..s.experts {
        let prefix = format!("{block}.experts.{e}");
        // Drawn even when left out, so down projections are the same in every variant.
        let gate = random.weight(vec![i, h]);
        let up = random.weight(vec![i, h]);
        if dense_gate_up {
            shard.insert(format!("{prefix}.{}.weight", names[0]), gate);
            shard.insert(format!("{prefix}.{}.weight", names[1]), up);
        }
        shard.insert(
            format!("{prefix}.{}.weight", names[2]),
            random.weight(vec![h, i]),
        );
    }
    shard
}

/// Embedding, head and final norm with a vocabulary of `vocab`.
pub fn ends_shard(s: &Shape, vocab: usize) -> Shard {
    let mut ends = Shard::new();
    ends.insert(
        "model.embed_tokens.weight".into(),
        (
            vec![vocab, s.hidden],
            random_bf16(vocab * s.hidden, 1, WEIGHT_STD),
        ),
    );
    ends.insert(
        "lm_head.weight".into(),
        (
            vec![vocab, s.hidden],
            random_bf16(vocab * s.hidden, 2, WEIGHT_STD),
        ),
    );
    ends.insert(
        "model.norm.weight".into(),
        (vec![s.hidden], ones_bf16(s.hidden)),
    );
    ends
}

/// How [`write_checkpoint`] writes a checkpoint.
pub struct CheckpointPlan<'a> {
    /// Vocabulary written (the real model's, or fewer to save memory and time).
    pub vocab: usize,
    /// Whether routed experts' gate and up matrices are written dense.
    pub dense_gate_up: bool,
    /// Adds tensors to layer `layer`'s shard (e.g. factors) before it is written.
    pub extend_layer: &'a mut dyn FnMut(usize, &mut Shard) -> anyhow::Result<()>,
    /// Extra top-level `config.json` keys (e.g. `compression`).
    pub extra_config: serde_json::Map<String, serde_json::Value>,
    /// Report each written shard on stderr.
    pub verbose: bool,
}

/// Writes a checkpoint of `shape` into the new directory `out`: one shard for the ends, one per
/// decoder layer, the shard index and `config.json`.
pub fn write_checkpoint(s: &Shape, out: &Path, plan: CheckpointPlan) -> anyhow::Result<()> {
    anyhow::ensure!(
        !out.exists(),
        "{} exists; choose a new directory",
        out.display()
    );
    std::fs::create_dir_all(out)?;
    let layers = s.config["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    let files = layers + 1;
    let file_name = |k: usize| format!("model-{:05}-of-{files:05}.safetensors", k + 1);
    let mut weight_map = BTreeMap::new();
    let mut record = |k: usize, shard: &Shard| -> anyhow::Result<()> {
        write_shard(&out.join(file_name(k)), shard)?;
        for tensor in shard.keys() {
            weight_map.insert(tensor.clone(), file_name(k));
        }
        if plan.verbose {
            eprintln!("wrote {}", out.join(file_name(k)).display());
        }
        Ok(())
    };
    record(0, &ends_shard(s, plan.vocab))?;
    for layer in 0..layers {
        let mut shard = layer_shard(s, layer, plan.dense_gate_up);
        (plan.extend_layer)(layer, &mut shard)?;
        record(layer + 1, &shard)?;
    }
    let index = json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    let mut config = s.config.clone();
    if let Some(fields) = config.as_object_mut() {
        fields.insert("vocab_size".into(), json!(plan.vocab));
        fields.extend(plan.extra_config);
    }
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}
