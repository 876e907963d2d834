//! DeepSeek-V2 (`model_type: deepseek_v2`), after transformers' `modeling_deepseek_v2.py`:
//! multi-head latent attention (MLA) with interleaved rotary dimensions, `first_k_dense_replace`
//! dense layers, shared experts, softmax greedy (or group-limited greedy) top-k scaled by
//! `routed_scaling_factor`. DeepSeek-V3 reuses the attention and config defined here.

use candle_core::Tensor;
use serde::Deserialize;

use super::common::{
    cache_offset, cached_attention, causal_attention, matmul_transposed, rope_parameters, GatedMlp,
    LayerKvCache, Linear, RmsNorm, RopeStyle, Rotary, Weights,
};
use super::mixtral::{default_eps, default_positions};
use super::moe::{MoeBlock, RoutedExperts, Router, RoutingRule, SharedExpert};
use super::qwen3_moe::one;
use super::{AttentionBlock, DecoderLayer, Family, FeedForward, ModelSpec, RotarySpec};
use crate::checkpoint::experts::ExpertLayout;
use crate::error::Result;

/// DeepSeek-V2/V3 `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Model width.
    pub hidden_size: usize,
    /// Dense-layer MLP intermediate size.
    pub intermediate_size: usize,
    /// Expert intermediate size.
    pub moe_intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Routed experts per layer.
    pub n_routed_experts: usize,
    /// Shared experts per MoE layer (fused into one MLP of `n × moe_intermediate_size`).
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Leading dense layers.
    #[serde(default)]
    pub first_k_dense_replace: usize,
    /// Every `moe_layer_freq`-th layer past the dense ones is MoE.
    #[serde(default = "one")]
    pub moe_layer_freq: usize,
    /// Rank of the query compression (None = plain q_proj).
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value compression.
    pub kv_lora_rank: usize,
    /// Non-rotary part of each query/key head.
    pub qk_nope_head_dim: usize,
    /// Rotary part of each query/key head.
    pub qk_rope_head_dim: usize,
    /// Value head dimension.
    pub v_head_dim: usize,
    /// Bias on attention projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// `greedy` or `group_limited_greedy` (V2); V3 ignores it.
    #[serde(default)]
    pub topk_method: Option<String>,
    /// Expert groups.
    #[serde(default = "one")]
    pub n_group: usize,
    /// Groups a token may use.
    #[serde(default = "one")]
    pub topk_group: usize,
    /// Multiplier on routing weights.
    #[serde(default = "unit")]
    pub routed_scaling_factor: f64,
    /// Renormalise top-k weights (V3 only; V2's transformers code ignores it).
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Maximum positions.
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// Tie lm_head to the embeddings.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn unit() -> f64 {
    1.0
}

impl Config {
    fn is_moe(&self, i: usize) -> bool {
        self.n_routed_experts > 0
            && i >= self.first_k_dense_replace
            && self.moe_layer_freq > 0
            && i.is_multiple_of(self.moe_layer_freq)
    }

    fn shared_size(&self) -> usize {
        self.n_shared_experts.unwrap_or(0) * self.moe_intermediate_size
    }

    /// Family-independent facts for `family` (V2 or V3 share this config).
    pub fn spec_for(&self, family: Family) -> ModelSpec {
        ModelSpec {
            family,
            num_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            top_k: self.num_experts_per_tok,
            moe_layers: (0..self.num_hidden_layers)
                .map(|i| {
                    self.is_moe(i).then(|| {
                        ExpertLayout::standard(
                            i,
                            self.n_routed_experts,
                            self.hidden_size,
                            self.moe_intermediate_size,
                        )
                    })
                })
                .collect(),
            shared_expert_intermediate_size: self.shared_size(),
            tie_word_embeddings: self.tie_word_embeddings,
            max_positions: self.max_position_embeddings,
            rotary: RotarySpec {
                dim: self.qk_rope_head_dim,
                style: RopeStyle::Interleaved,
                default_theta: 1e4,
            },
        }
    }

    /// Family-independent facts.
    pub fn spec(&self) -> ModelSpec {
        self.spec_for(Family::DeepseekV2)
    }

    /// Loads decoder layer `i`, with `rule` routing its experts.
    pub fn load_layer_with(
        &self,
        w: &Weights,
        i: usize,
        experts: Option<RoutedExperts>,
        rule: impl FnOnce(&Weights, &str) -> Result<RoutingRule>,
    ) -> Result<DecoderLayer> {
        let prefix = format!("model.layers.{i}");
        let h = self.hidden_size;
        let attention = LatentAttention::load(w, &format!("{prefix}.self_attn"), self)?;
        let feed_forward = match experts {
            Some(experts) => {
                let block = format!("{prefix}.mlp");
                let shared = (self.shared_size() > 0)
                    .then(|| -> Result<SharedExpert> {
                        Ok(SharedExpert {
                            mlp: GatedMlp::load(
                                w,
                                &format!("{block}.shared_experts"),
                                h,
                                self.shared_size(),
                            )?,
                            gate: None,
                        })
                    })
                    .transpose()?;
                FeedForward::Moe(MoeBlock {
                    router: Router {
                        weight: w
                            .get(&format!("{block}.gate.weight"), &[self.n_routed_experts, h])?,
                        rule: rule(w, &block)?,
                    },
                    experts,
                    shared,
                })
            }
            None => FeedForward::Dense(GatedMlp::load(
                w,
                &format!("{prefix}.mlp"),
                h,
                self.intermediate_size,
            )?),
        };
        DecoderLayer::with_norms(
            w,
            i,
            h,
            self.rms_norm_eps,
            AttentionBlock::Latent(attention),
            feed_forward,
        )
    }

    /// Loads decoder layer `i` around its already-loaded routed experts.
    pub fn load_layer(
        &self,
        w: &Weights,
        i: usize,
        experts: Option<RoutedExperts>,
    ) -> Result<DecoderLayer> {
        let n_group = match self.topk_method.as_deref() {
            Some("group_limited_greedy") => self.n_group,
            _ => 1,
        };
        self.load_layer_with(w, i, experts, |_, _| {
            Ok(RoutingRule::SoftmaxGroupLimited {
                top_k: self.num_experts_per_tok,
                n_group,
                topk_group: self.topk_group,
                scaling: self.routed_scaling_factor as f32,
            })
        })
    }
}

/// How queries are produced in MLA.
#[derive(Debug, Clone)]
pub enum QueryProjection {
    /// One projection (V2-Lite style, `q_lora_rank: null`).
    Direct(Linear),
    /// Low-rank: `q_b(norm(q_a(x)))`.
    LowRank {
        /// Down projection.
        q_a_proj: Linear,
        /// Norm on the compressed query.
        q_a_layernorm: RmsNorm,
        /// Up projection.
        q_b_proj: Linear,
    },
}

/// Multi-head latent attention.
#[derive(Debug, Clone)]
pub struct LatentAttention {
    /// Query path.
    pub query: QueryProjection,
    /// Compressed key/value plus the shared rotary key, [kv_lora + rope, hidden].
    pub kv_a_proj_with_mqa: Linear,
    /// Norm on the compressed key/value.
    pub kv_a_layernorm: RmsNorm,
    /// `kv_b_proj`'s key rows per head, [heads, qk_nope_head_dim, kv_lora_rank].
    pub key_up: Tensor,
    /// `kv_b_proj`'s value rows per head, [heads, v_head_dim, kv_lora_rank].
    pub value_up: Tensor,
    /// Output projection.
    pub o_proj: Linear,
    num_heads: usize,
    nope: usize,
    rope: usize,
    v_dim: usize,
    kv_lora: usize,
    softmax_scale: f64,
}

impl LatentAttention {
    /// Loads `{prefix}.*` for the shapes in `c`.
    pub fn load(w: &Weights, prefix: &str, c: &Config) -> Result<Self> {
        let h = c.hidden_size;
        let qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
        let heads = c.num_attention_heads;
        let query = match c.q_lora_rank {
            None => QueryProjection::Direct(w.linear(
                &format!("{prefix}.q_proj"),
                h,
                heads * qk,
                false,
            )?),
            Some(r) => QueryProjection::LowRank {
                q_a_proj: w.linear(&format!("{prefix}.q_a_proj"), h, r, c.attention_bias)?,
                q_a_layernorm: w.rms_norm(&format!("{prefix}.q_a_layernorm"), r, c.rms_norm_eps)?,
                q_b_proj: w.linear(&format!("{prefix}.q_b_proj"), r, heads * qk, false)?,
            },
        };
        // Split once at load: the latent path reads it per head, the expanded path per half.
        let per_head = w
            .linear(
                &format!("{prefix}.kv_b_proj"),
                c.kv_lora_rank,
                heads * (c.qk_nope_head_dim + c.v_head_dim),
                false,
            )?
            .weight
            .reshape((heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank))?;
        Ok(Self {
            query,
            kv_a_proj_with_mqa: w.linear(
                &format!("{prefix}.kv_a_proj_with_mqa"),
                h,
                c.kv_lora_rank + c.qk_rope_head_dim,
                c.attention_bias,
            )?,
            kv_a_layernorm: w.rms_norm(
                &format!("{prefix}.kv_a_layernorm"),
                c.kv_lora_rank,
                c.rms_norm_eps,
            )?,
            key_up: per_head.narrow(1, 0, c.qk_nope_head_dim)?.contiguous()?,
            value_up: per_head
                .narrow(1, c.qk_nope_head_dim, c.v_head_dim)?
                .contiguous()?,
            o_proj: w.linear(
                &format!("{prefix}.o_proj"),
                heads * c.v_head_dim,
                h,
                c.attention_bias,
            )?,
            num_heads: heads,
            nope: c.qk_nope_head_dim,
            rope: c.qk_rope_head_dim,
            v_dim: c.v_head_dim,
            kv_lora: c.kv_lora_rank,
            // YaRN checkpoints also scale the softmax by mscale(factor, mscale_all_dim)².
            softmax_scale: rope_parameters(
                w.checkpoint.config(),
                &w.checkpoint.config_path(),
                1e4,
            )?
            .softmax_scale_multiplier()
                / ((c.qk_nope_head_dim + c.qk_rope_head_dim) as f64).sqrt(),
        })
    }

    /// Self-attention over `x` [batch, seq, hidden] after the positions in `cache`. With a
    /// cache, only the normalised latent and the rotated shared key of each position are kept
    /// (`kv_lora_rank + qk_rope_head_dim` values instead of every head's key and value) and
    /// attention runs in the latent space.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let offset = cache_offset(&cache);
        let q = match &self.query {
            QueryProjection::Direct(p) => p.forward(x)?,
            QueryProjection::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => q_b_proj.forward(&q_a_layernorm.forward(&q_a_proj.forward(x)?)?)?,
        };
        let q = q
            .reshape((b, s, self.num_heads, self.nope + self.rope))?
            .transpose(1, 2)?;
        let q_nope = q.narrow(3, 0, self.nope)?;
        let q_pe = rotary.apply_at(&q.narrow(3, self.nope, self.rope)?, offset)?;

        let compressed = self.kv_a_proj_with_mqa.forward(x)?;
        let latent = self
            .kv_a_layernorm
            .forward(&compressed.narrow(2, 0, self.kv_lora)?.contiguous()?)?;
        let k_pe = compressed
            .narrow(2, self.kv_lora, self.rope)?
            .reshape((b, 1, s, self.rope))?;
        let k_pe = rotary.apply_at(&k_pe, offset)?;
        let out = match cache {
            Some(cache) => self.latent_attention(cache, &q_nope, &q_pe, &latent, &k_pe)?,
            None => self.expanded_attention(&q_nope, &q_pe, &latent, &k_pe)?,
        };
        let out = out
            .transpose(1, 2)?
            .reshape((b, s, self.num_heads * self.v_dim))?;
        self.o_proj.forward(&out)
    }

    /// Attention with every head's key and value expanded from the latent (transformers' form;
    /// used without a cache). Returns [batch, heads, seq, v_head_dim].
    fn expanded_attention(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        latent: &Tensor,
        k_pe: &Tensor,
    ) -> Result<Tensor> {
        let (b, heads, s, _) = q_nope.dims4()?;
        let up = |weight: &Tensor, dim: usize| -> Result<Tensor> {
            let flat = weight.reshape((heads * dim, self.kv_lora))?;
            Ok(matmul_transposed(latent, &flat)?
                .reshape((b, s, heads, dim))?
                .transpose(1, 2)?)
        };
        let k_nope = up(&self.key_up, self.nope)?;
        let value = up(&self.value_up, self.v_dim)?;
        let k_pe = k_pe.broadcast_as((b, self.num_heads, s, self.rope))?;
        let query = Tensor::cat(&[&q_nope.contiguous()?, q_pe], 3)?;
        let key = Tensor::cat(&[&k_nope.contiguous()?, &k_pe.contiguous()?], 3)?;
        cached_attention(None, &query, key, value.contiguous()?, self.softmax_scale)
    }

    /// Attention in the latent space (DeepSeek's weight absorption): the key up-projection is
    /// folded into the query (`q_nope · W_UK` per head), every head attends over the cached
    /// latents and shared rotary keys (one key/value head), and the value up-projection
    /// `W_UV` is applied to the attended latent. `cache` receives this step's latent (as keys)
    /// and rotary key (as values). Returns [batch, heads, seq, v_head_dim].
    fn latent_attention(
        &self,
        cache: &mut LayerKvCache,
        q_nope: &Tensor,
        q_pe: &Tensor,
        latent: &Tensor,
        k_pe: &Tensor,
    ) -> Result<Tensor> {
        let (b, heads, s, _) = q_nope.dims4()?;
        let latent = latent.reshape((b, 1, s, self.kv_lora))?;
        let (latents, rotary_keys) = cache.append(&latent.contiguous()?, &k_pe.contiguous()?)?;
        // [b, h, s, nope] → [h, b·s, nope] · [h, nope, kv_lora] → [b, h, s, kv_lora].
        let q_latent = q_nope
            .transpose(0, 1)?
            .contiguous()?
            .reshape((heads, b * s, self.nope))?
            .matmul(&self.key_up)?
            .reshape((heads, b, s, self.kv_lora))?
            .transpose(0, 1)?;
        let query = Tensor::cat(&[&q_latent.contiguous()?, &q_pe.contiguous()?], 3)?;
        let key = Tensor::cat(&[&latents, &rotary_keys], 3)?;
        let attended = causal_attention(&query, &key, &latents, self.softmax_scale)?;
        // [b, h, s, kv_lora] → [h, b·s, kv_lora] · [h, kv_lora, v] → [b, h, s, v].
        Ok(attended
            .transpose(0, 1)?
            .contiguous()?
            .reshape((heads, b * s, self.kv_lora))?
            .matmul(&self.value_up.transpose(1, 2)?)?
            .reshape((heads, b, s, self.v_dim))?
            .transpose(0, 1)?)
    }
}
