//! Qwen2-MoE (`model_type: qwen2_moe`), after transformers' `modeling_qwen2_moe.py`: q/k/v bias,
//! softmax top-k routing (`norm_topk_prob`), one shared expert scaled by a sigmoid gate.

use serde::Deserialize;

use super::common::{Attention, AttentionShape, GatedMlp, RopeStyle, Weights};
use super::mixtral::{default_eps, default_positions};
use super::moe::{MoeBlock, RoutedExperts, Router, RoutingRule, SharedExpert};
use super::qwen3_moe::{is_sparse, one};
use super::{AttentionBlock, DecoderLayer, Family, FeedForward, ModelSpec, RotarySpec};
use crate::checkpoint::experts::ExpertLayout;
use crate::error::Result;

/// Qwen2-MoE's `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Model width.
    pub hidden_size: usize,
    /// Dense-layer MLP intermediate size.
    pub intermediate_size: usize,
    /// Expert intermediate size.
    pub moe_intermediate_size: usize,
    /// Shared expert intermediate size.
    #[serde(default)]
    pub shared_expert_intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Routed experts per layer.
    #[serde(alias = "num_local_experts")]
    pub num_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Renormalise the top-k weights.
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is sparse.
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    /// Layers that use a dense MLP.
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    /// Bias on q/k/v (Qwen2 always had it; transformers 5 spells it out).
    #[serde(default = "yes")]
    pub qkv_bias: bool,
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

fn yes() -> bool {
    true
}

impl Config {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn sparse(&self, i: usize) -> bool {
        is_sparse(
            i,
            self.num_experts,
            self.decoder_sparse_step,
            &self.mlp_only_layers,
        )
    }

    /// Family-independent facts.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            family: Family::Qwen2Moe,
            num_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            top_k: self.num_experts_per_tok,
            moe_layers: (0..self.num_hidden_layers)
                .map(|i| {
                    self.sparse(i).then(|| {
                        ExpertLayout::standard(
                            i,
                            self.num_experts,
                            self.hidden_size,
                            self.moe_intermediate_size,
                        )
                    })
                })
                .collect(),
            shared_expert_intermediate_size: self.shared_expert_intermediate_size,
            tie_word_embeddings: self.tie_word_embeddings,
            max_positions: self.max_position_embeddings,
            rotary: RotarySpec {
                dim: self.head_dim(),
                style: RopeStyle::Half,
                default_theta: 1e6,
            },
        }
    }

    /// Loads decoder layer `i` around its already-loaded routed experts.
    pub fn load_layer(
        &self,
        w: &Weights,
        i: usize,
        experts: Option<RoutedExperts>,
    ) -> Result<DecoderLayer> {
        let prefix = format!("model.layers.{i}");
        let h = self.hidden_size;
        let attention = Attention::load(
            w,
            &format!("{prefix}.self_attn"),
            AttentionShape {
                hidden_size: h,
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
                head_dim: self.head_dim(),
                qkv_bias: self.qkv_bias,
                o_bias: false,
            },
        )?;
        let feed_forward = match experts {
            Some(experts) => {
                let shared = if self.shared_expert_intermediate_size > 0 {
                    Some(SharedExpert {
                        mlp: GatedMlp::load(
                            w,
                            &format!("{prefix}.mlp.shared_expert"),
                            h,
                            self.shared_expert_intermediate_size,
                        )?,
                        gate: Some(w.linear(
                            &format!("{prefix}.mlp.shared_expert_gate"),
                            h,
                            1,
                            false,
                        )?),
                    })
                } else {
                    None
                };
                FeedForward::Moe(MoeBlock {
                    router: Router {
                        weight: w
                            .get(&format!("{prefix}.mlp.gate.weight"), &[self.num_experts, h])?,
                        rule: RoutingRule::SoftmaxTopK {
                            top_k: self.num_experts_per_tok,
                            normalize: self.norm_topk_prob,
                        },
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
            AttentionBlock::Standard(attention),
            feed_forward,
        )
    }
}
