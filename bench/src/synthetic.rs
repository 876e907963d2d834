//! Random checkpoints with the exact tensor names and shapes of real MoE models, for memory and
//! speed measurements at real scale.
//!
//! Shared by the `decode` and `compress` benchmarks (this crate) and the root package's
//! `examples/synthetic_checkpoint.rs`, which includes this file as a module; it therefore uses
//! only crates both depend on (`rfid-moe`, `rayon`, `safetensors`, `serde_json`, `half`,
//! `anyhow`).
//!
//! Shapes: `qwen3-30b-a3b` (Qwen/Qwen3-30B-A3B: 128 experts of 768×2048, top-8),
//! `mixtral-8x7b` (mistralai/Mixtral-8x7B-v0.1: 8 experts of 14336×4096, top-2),
//! `deepseek-v2-lite` (deepseek-ai/DeepSeek-V2-Lite: latent attention, one dense first layer,
//! 64 routed experts of 1408×2048 plus 2 shared, top-6) and `deepseek-v3`
//! (deepseek-ai/DeepSeek-V3: latent attention with low-rank queries, three dense first layers,
//! 256 routed experts of 2048×7168 plus 1 shared, top-8 of 4 of 8 groups with sigmoid scores
//! and `e_score_correction_bias`, every linear weight FP8 E4M3 with 128×128 `weight_scale_inv`
//! block scales, optionally its multi-token-prediction layer). Weights are uniform with
//! standard deviation 0.02 unless asked otherwise, stored bf16 (or FP8 where the real model is);
//! norms are ones. One shard per decoder layer, so writing never holds more than one layer.
//! [`Overrides`] shrink a shape (fewer experts, dense layers) where a real layer is too big.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use rfid_moe::checkpoint::fp8::{self, Fp8Format};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

/// The shape names [`Shape::named`] knows.
pub const SHAPE_NAMES: [&str; 4] = [
    "qwen3-30b-a3b",
    "mixtral-8x7b",
    "deepseek-v2-lite",
    "deepseek-v3",
];

/// Standard deviation of the random weights.
pub const WEIGHT_STD: f32 = 0.02;

/// The dimensions that decide every tensor's shape.
#[derive(Default)]
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
    /// Low-rank queries of latent attention (`q_a_proj`, `q_a_layernorm`, `q_b_proj`).
    pub q_lora_rank: Option<usize>,
    /// Shared-expert intermediate size (0 = none), at `mlp.shared_experts`.
    pub shared_intermediate: usize,
    /// Leading dense layers.
    pub dense_layers: usize,
    /// The dense layers' MLP width.
    pub dense_intermediate: usize,
    /// The router's `gate.e_score_correction_bias` (F32, DeepSeek-V3).
    pub router_bias: bool,
    /// Linear weights stored `F8_E4M3` with `weight_scale_inv` blocks of this size (the
    /// embedding, head, norms and router stay bf16).
    pub fp8_block: Option<[usize; 2]>,
    /// Writes the multi-token-prediction layer `model.layers.{layers}` (DeepSeek-V3).
    pub mtp: bool,
    /// Decoder layers of the real model (for extrapolations).
    pub real_layers: usize,
    /// Leading dense layers of the real model (for extrapolations).
    pub real_dense_layers: usize,
}

impl Shape {
    /// The shape called `name` (one of [`SHAPE_NAMES`]) with `layers` decoder layers.
    pub fn named(name: &str, layers: usize) -> Option<Shape> {
        Some(match name {
            "qwen3-30b-a3b" => qwen3_30b_a3b(layers),
            "mixtral-8x7b" => mixtral_8x7b(layers),
            "deepseek-v2-lite" => deepseek_v2_lite(layers),
            "deepseek-v3" => deepseek_v3(layers),
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

    /// Decoder layers written (`num_hidden_layers`, the MTP layer not counted).
    pub fn layers(&self) -> usize {
        self.config["num_hidden_layers"].as_u64().unwrap_or(0) as usize
    }

    /// MoE layers of the real model.
    pub fn real_moe_layers(&self) -> usize {
        self.real_layers - self.real_dense_layers
    }
}

/// Changes to a real shape, for checkpoints a machine can hold; each one is reported.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Routed experts per MoE layer.
    pub experts: Option<usize>,
    /// Leading dense layers (DeepSeek `first_k_dense_replace`).
    pub dense_layers: Option<usize>,
    /// Write the multi-token-prediction layer (DeepSeek-V3 only).
    pub mtp: bool,
    /// Routed-expert intermediate size (shared experts scale with it), for reduced runs that
    /// keep every other dimension real.
    pub expert_intermediate: Option<usize>,
}

/// The config key holding the routed expert count in each family.
const EXPERT_COUNT_KEYS: [&str; 3] = ["num_experts", "num_local_experts", "n_routed_experts"];

impl Overrides {
    /// Applies the overrides to `s`; returns one line per change from the real model.
    pub fn apply(&self, s: &mut Shape) -> anyhow::Result<Vec<String>> {
        let mut notes = Vec::new();
        let config = s
            .config
            .as_object_mut()
            .ok_or_else(|| anyhow::anyhow!("shape config is not an object"))?;
        if let Some(experts) = self.experts.filter(|&n| n != s.experts) {
            let top_k = config["num_experts_per_tok"].as_u64().unwrap_or(1) as usize;
            anyhow::ensure!(
                experts >= top_k,
                "--experts {experts}: fewer than the {top_k} experts each token is routed to"
            );
            if let (Some(groups), Some(chosen)) = (
                config.get("n_group").and_then(|v| v.as_u64()),
                config.get("topk_group").and_then(|v| v.as_u64()),
            ) {
                let (groups, chosen) = (groups as usize, chosen as usize);
                anyhow::ensure!(
                    experts % groups == 0 && experts / groups * chosen >= top_k,
                    "--experts {experts}: must be a multiple of n_group {groups} with \
                     topk_group {chosen} groups holding at least top-{top_k} experts"
                );
            }
            for key in EXPERT_COUNT_KEYS {
                if config.contains_key(key) {
                    config.insert(key.into(), json!(experts));
                }
            }
            notes.push(format!(
                "routed experts per layer: {experts} (the real model has {})",
                s.experts
            ));
            s.experts = experts;
        }
        if let Some(dense) = self.dense_layers.filter(|&n| n != s.dense_layers) {
            anyhow::ensure!(
                config.contains_key("first_k_dense_replace"),
                "--dense-layers: this shape has no leading dense layers to change"
            );
            config.insert("first_k_dense_replace".into(), json!(dense));
            notes.push(format!(
                "leading dense layers: {dense} (the real model has {})",
                s.dense_layers
            ));
            s.dense_layers = dense;
        }
        if let Some(width) = self
            .expert_intermediate
            .filter(|&w| w != s.expert_intermediate)
        {
            anyhow::ensure!(width > 0, "--expert-intermediate must be at least 1");
            // Mixtral has no separate MoE width: its experts are `intermediate_size` wide.
            let key = if config.contains_key("moe_intermediate_size") {
                "moe_intermediate_size"
            } else {
                "intermediate_size"
            };
            config.insert(key.into(), json!(width));
            notes.push(format!(
                "routed expert intermediate size: {width} (the real model has {})",
                s.expert_intermediate
            ));
            s.shared_intermediate = s.shared_intermediate / s.expert_intermediate * width;
            s.expert_intermediate = width;
        }
        if self.mtp {
            anyhow::ensure!(
                config.contains_key("num_nextn_predict_layers"),
                "--mtp: this shape has no multi-token-prediction layer"
            );
            config.insert("num_nextn_predict_layers".into(), json!(1));
            s.mtp = true;
        } else if config.contains_key("num_nextn_predict_layers") {
            config.insert("num_nextn_predict_layers".into(), json!(0));
            notes.push("multi-token-prediction layer left out (the real model has 1)".into());
        }
        Ok(notes)
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
        real_layers: 48,
        ..Shape::default()
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
        real_layers: 32,
        ..Shape::default()
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
        real_layers: 27,
        real_dense_layers: 1,
        ..Shape::default()
    }
}

/// deepseek-ai/DeepSeek-V3's `config.json` (`auto_map` and training-only keys left out);
/// `num_nextn_predict_layers` follows whether the MTP layer is written ([`Overrides`]).
fn deepseek_v3_config(layers: usize) -> serde_json::Value {
    let mut config = json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": layers, "num_nextn_predict_layers": 1,
        "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": true,
        "vocab_size": 129280, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "attention_bias": false, "attention_dropout": 0.0,
        "hidden_act": "silu", "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "bos_token_id": 0, "eos_token_id": 1
    });
    if let Some(fields) = config.as_object_mut() {
        fields.insert(
            "rope_scaling".into(),
            json!({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
        );
        fields.insert(
            "quantization_config".into(),
            json!({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [128, 128]}),
        );
    }
    config
}

fn deepseek_v3(layers: usize) -> Shape {
    Shape {
        config: deepseek_v3_config(layers),
        hidden: 7168,
        vocab: 129280,
        heads: 128,
        kv_heads: 128,
        head_dim: 192,
        experts: 256,
        expert_intermediate: 2048,
        latent: Some((512, 128, 64, 128)),
        q_lora_rank: Some(1536),
        shared_intermediate: 2048,
        dense_layers: 3,
        dense_intermediate: 18432,
        router_bias: true,
        fp8_block: Some(fp8::DEFAULT_BLOCK),
        real_layers: 61,
        real_dense_layers: 3,
        ..Shape::default()
    }
}

/// Uniform values in [−1, 1) from splitmix64, written by `write` into the `width`-byte elements
/// of `out` in parallel 1 MiB chunks (deterministic for a seed, whatever the thread count).
fn fill_uniform(out: &mut [u8], width: usize, seed: u64, write: impl Fn(f32, &mut [u8]) + Sync) {
    out.par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(chunk, out)| {
            let base = seed ^ ((chunk as u64) << 32);
            for (i, element) in out.chunks_exact_mut(width).enumerate() {
                let bits = rfid_moe::rng::splitmix64(base.wrapping_add(i as u64));
                let unit = (bits >> 11) as f32 / (1u64 << 53) as f32;
                write(unit * 2.0 - 1.0, element);
            }
        });
}

/// Random bf16 bytes, uniform with standard deviation `std` (splitmix64 per element).
pub fn random_bf16(elements: usize, seed: u64, std: f32) -> Vec<u8> {
    let mut bytes = vec![0u8; elements * 2];
    let half_width = std * 3f32.sqrt();
    fill_uniform(&mut bytes, 2, seed, |u, pair| {
        pair.copy_from_slice(&half::bf16::from_f32(u * half_width).to_le_bytes());
    });
    bytes
}

/// The largest finite `F8_E4M3` (E4M3FN) value.
pub const E4M3_MAX: f32 = 448.0;

/// The `F8_E4M3` (E4M3FN) code nearest to `value` (ties to the smaller magnitude; saturates at
/// ±448, never NaN).
pub fn e4m3_code(value: f32) -> u8 {
    // Codes 0x00..=0x7E are the non-negative finite values in increasing order.
    let positive = &Fp8Format::E4M3Fn.table()[..0x7F];
    let magnitude = value.abs().min(E4M3_MAX);
    let above = positive.partition_point(|&v| v < magnitude);
    let code = if above == 0 {
        0
    } else if above == positive.len()
        || magnitude - positive[above - 1] <= positive[above] - magnitude
    {
        above - 1
    } else {
        above
    };
    let sign = if value.is_sign_negative() && code != 0 {
        0x80
    } else {
        0
    };
    code as u8 | sign
}

/// Random `F8_E4M3` codes whose dequantised values (code × the returned scale) are uniform with
/// standard deviation `std`: the weights' largest magnitude maps to 448, as DeepSeek's
/// block quantisation does.
pub fn random_fp8(elements: usize, seed: u64, std: f32) -> (Vec<u8>, f32) {
    let mut codes = vec![0u8; elements];
    fill_uniform(&mut codes, 1, seed, |u, code| {
        code[0] = e4m3_code(u * E4M3_MAX)
    });
    (codes, std * 3f32.sqrt() / E4M3_MAX)
}

/// `elements` bf16 ones.
pub fn ones_bf16(elements: usize) -> Vec<u8> {
    half::bf16::ONE.to_le_bytes().repeat(elements)
}

/// One tensor to write: its shape, safetensors dtype and little-endian bytes.
pub struct Stored {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: Dtype,
    /// Raw little-endian bytes.
    pub bytes: Vec<u8>,
}

impl Stored {
    /// A bf16 tensor.
    pub fn bf16(shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        Self {
            shape,
            dtype: Dtype::BF16,
            bytes,
        }
    }

    /// An F32 tensor of `shape` filled with `value`.
    pub fn f32_filled(shape: Vec<usize>, value: f32) -> Self {
        let n: usize = shape.iter().product();
        Self {
            shape,
            dtype: Dtype::F32,
            bytes: value.to_le_bytes().repeat(n),
        }
    }
}

/// Tensor name → tensor of one shard.
pub type Shard = BTreeMap<String, Stored>;

/// Writes `shard` as one safetensors file.
pub fn write_shard(path: &Path, shard: &Shard) -> anyhow::Result<()> {
    let views = shard
        .iter()
        .map(|(name, t)| {
            Ok((
                name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes)?,
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

    /// The next random bf16 tensor of `shape`, standard deviation `std`.
    pub fn with_std(&mut self, shape: Vec<usize>, std: f32) -> Stored {
        self.next += 1;
        let n = shape.iter().product();
        Stored::bf16(shape, random_bf16(n, self.seed + self.next, std))
    }

    /// The next random bf16 tensor of `shape`, standard deviation [`WEIGHT_STD`].
    pub fn weight(&mut self, shape: Vec<usize>) -> Stored {
        self.with_std(shape, WEIGHT_STD)
    }

    /// The next random `F8_E4M3` matrix of `shape` and its block scales (`[⌈rows/b₀⌉,
    /// ⌈cols/b₁⌉]`, F32, one value), standard deviation [`WEIGHT_STD`] once dequantised.
    pub fn fp8_weight(&mut self, shape: Vec<usize>, block: [usize; 2]) -> (Stored, Stored) {
        self.next += 1;
        let n = shape.iter().product();
        let (codes, scale) = random_fp8(n, self.seed + self.next, WEIGHT_STD);
        let scale_shape = fp8::scale_shape(&shape, block).unwrap_or_else(|| vec![1]);
        let weight = Stored {
            shape,
            dtype: Dtype::F8_E4M3,
            bytes: codes,
        };
        (weight, Stored::f32_filled(scale_shape, scale))
    }
}

/// The tensors of one decoder layer as they are drawn.
struct LayerTensors<'a> {
    s: &'a Shape,
    random: RandomTensors,
    shard: Shard,
}

impl LayerTensors<'_> {
    /// A linear weight `name` [out, in]: bf16, or FP8 with its `_scale_inv` when the shape is
    /// FP8; `keep` false draws it without keeping it.
    fn linear(&mut self, name: String, out: usize, inputs: usize, keep: bool) {
        match self.s.fp8_block {
            Some(block) => {
                let (weight, scale) = self.random.fp8_weight(vec![out, inputs], block);
                if keep {
                    self.shard.insert(fp8::scale_name(&name), scale);
                    self.shard.insert(name, weight);
                }
            }
            None => {
                let weight = self.random.weight(vec![out, inputs]);
                if keep {
                    self.shard.insert(name, weight);
                }
            }
        }
    }

    /// A norm weight of ones.
    fn norm(&mut self, name: String, n: usize) {
        self.shard.insert(name, Stored::bf16(vec![n], ones_bf16(n)));
    }

    /// Gate, up and down projections of a SwiGLU MLP at `prefix`.
    fn mlp(&mut self, prefix: &str, intermediate: usize) {
        let h = self.s.hidden;
        self.linear(format!("{prefix}.gate_proj.weight"), intermediate, h, true);
        self.linear(format!("{prefix}.up_proj.weight"), intermediate, h, true);
        self.linear(format!("{prefix}.down_proj.weight"), h, intermediate, true);
    }

    fn attention(&mut self, p: &str) {
        let s = self.s;
        let (h, q, kv) = (s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let a = format!("{p}.self_attn");
        let Some((kv_lora, nope, rope, v)) = s.latent else {
            self.linear(format!("{a}.q_proj.weight"), q, h, true);
            self.linear(format!("{a}.k_proj.weight"), kv, h, true);
            self.linear(format!("{a}.v_proj.weight"), kv, h, true);
            self.linear(format!("{a}.o_proj.weight"), h, q, true);
            return;
        };
        let heads = s.heads;
        match s.q_lora_rank {
            None => self.linear(format!("{a}.q_proj.weight"), heads * (nope + rope), h, true),
            Some(r) => {
                self.linear(format!("{a}.q_a_proj.weight"), r, h, true);
                self.norm(format!("{a}.q_a_layernorm.weight"), r);
                self.linear(
                    format!("{a}.q_b_proj.weight"),
                    heads * (nope + rope),
                    r,
                    true,
                );
            }
        }
        self.linear(
            format!("{a}.kv_a_proj_with_mqa.weight"),
            kv_lora + rope,
            h,
            true,
        );
        self.norm(format!("{a}.kv_a_layernorm.weight"), kv_lora);
        self.linear(
            format!("{a}.kv_b_proj.weight"),
            heads * (nope + v),
            kv_lora,
            true,
        );
        self.linear(format!("{a}.o_proj.weight"), h, heads * v, true);
    }

    /// Router, shared experts and routed experts of MoE layer `layer`.
    fn moe(&mut self, layer: usize, dense_gate_up: bool) {
        let s = self.s;
        let (h, i) = (s.hidden, s.expert_intermediate);
        if s.shared_intermediate > 0 {
            let prefix = format!("model.layers.{layer}.mlp.shared_experts");
            self.mlp(&prefix, s.shared_intermediate);
        }
        let block = s.moe_block(layer);
        let names = s.expert_matrix_names();
        let gate = self.random.weight(vec![s.experts, h]);
        self.shard.insert(format!("{block}.gate.weight"), gate);
        if s.router_bias {
            self.shard.insert(
                format!("{block}.gate.e_score_correction_bias"),
                Stored::f32_filled(vec![s.experts], 0.0),
            );
        }
        for e in 0..s.experts {
            let prefix = format!("{block}.experts.{e}");
            // Drawn even when left out, so down projections are the same in every variant.
            self.linear(format!("{prefix}.{}.weight", names[0]), i, h, dense_gate_up);
            self.linear(format!("{prefix}.{}.weight", names[1]), i, h, dense_gate_up);
            self.linear(format!("{prefix}.{}.weight", names[2]), h, i, true);
        }
    }
}

/// Every tensor of decoder layer `layer`; with `dense_gate_up` false the routed experts' gate
/// and up matrices are left out (a compressed checkpoint stores factors in their place).
pub fn layer_shard(s: &Shape, layer: usize, dense_gate_up: bool) -> Shard {
    let mut tensors = LayerTensors {
        s,
        random: RandomTensors::new(0x5eed_0000 + layer as u64 * 1_000),
        shard: Shard::new(),
    };
    let p = format!("model.layers.{layer}");
    for norm in ["input_layernorm", "post_attention_layernorm"] {
        tensors.norm(format!("{p}.{norm}.weight"), s.hidden);
    }
    tensors.attention(&p);
    if layer < s.dense_layers {
        tensors.mlp(&format!("{p}.mlp"), s.dense_intermediate);
        return tensors.shard;
    }
    if s.qk_norm {
        for norm in ["q_norm", "k_norm"] {
            tensors.norm(format!("{p}.self_attn.{norm}.weight"), s.head_dim);
        }
    }
    tensors.moe(layer, dense_gate_up);
    tensors.shard
}

/// DeepSeek-V3's multi-token-prediction layer `model.layers.{layer}`: a decoder layer plus
/// `eh_proj` [h, 2h] (bf16, as in the release), `enorm`, `hnorm`, and its own copies of the
/// embedding and head (`embed_tokens`, `shared_head.head`, `shared_head.norm`).
pub fn mtp_shard(s: &Shape, layer: usize, vocab: usize) -> Shard {
    let mut shard = layer_shard(s, layer, true);
    let (p, h) = (format!("model.layers.{layer}"), s.hidden);
    let mut random = RandomTensors::new(0x0a7b_0000);
    shard.insert(format!("{p}.eh_proj.weight"), random.weight(vec![h, 2 * h]));
    for norm in ["enorm", "hnorm", "shared_head.norm"] {
        shard.insert(
            format!("{p}.{norm}.weight"),
            Stored::bf16(vec![h], ones_bf16(h)),
        );
    }
    let ends = ends_shard(s, vocab);
    for (from, to) in [
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("lm_head.weight", "shared_head.head.weight"),
    ] {
        if let Some(t) = ends.get(from) {
            let copy = Stored::bf16(t.shape.clone(), t.bytes.clone());
            shard.insert(format!("{p}.{to}"), copy);
        }
    }
    shard
}

/// Embedding, head and final norm with a vocabulary of `vocab`.
pub fn ends_shard(s: &Shape, vocab: usize) -> Shard {
    let mut ends = Shard::new();
    let (h, n) = (s.hidden, vocab * s.hidden);
    ends.insert(
        "model.embed_tokens.weight".into(),
        Stored::bf16(vec![vocab, h], random_bf16(n, 1, WEIGHT_STD)),
    );
    ends.insert(
        "lm_head.weight".into(),
        Stored::bf16(vec![vocab, h], random_bf16(n, 2, WEIGHT_STD)),
    );
    ends.insert(
        "model.norm.weight".into(),
        Stored::bf16(vec![h], ones_bf16(h)),
    );
    ends
}

/// Writes `samples` windows of `seq_len` random token ids below `vocab` as `input_ids` (I64),
/// the calibration file format `rfid_moe::compress` reads.
pub fn write_token_windows(
    path: &Path,
    samples: usize,
    seq_len: usize,
    vocab: usize,
) -> anyhow::Result<()> {
    let ids: Vec<u8> = (0..(samples * seq_len) as u64)
        .flat_map(|t| {
            let id = rfid_moe::rng::splitmix64(t ^ 0xca11_b4a7) % vocab as u64;
            (id as i64).to_le_bytes()
        })
        .collect();
    let view = TensorView::new(Dtype::I64, vec![samples, seq_len], &ids)?;
    safetensors::serialize_to_file([("input_ids", view)], None, path)?;
    Ok(())
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
/// decoder layer (and the MTP layer when the shape has it), the shard index and, last,
/// `config.json` (so a directory with a `config.json` is complete).
pub fn write_checkpoint(s: &Shape, out: &Path, plan: CheckpointPlan) -> anyhow::Result<()> {
    anyhow::ensure!(
        !out.exists(),
        "{} exists; choose a new directory",
        out.display()
    );
    std::fs::create_dir_all(out)?;
    let layers = s.layers();
    let files = layers + 1 + usize::from(s.mtp);
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
    if s.mtp {
        record(layers + 1, &mtp_shard(s, layers, plan.vocab))?;
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
