//! Mixtral (`model_type: mixtral`), after transformers' `modeling_mixtral.py`: grouped-query
//! attention, softmax top-k routing with renormalised weights, experts under
//! `block_sparse_moe.experts.{j}.w1/w3/w2`.

use serde::Deserialize;

use super::common::{Attention, AttentionShape, RopeStyle, Weights};
use super::moe::{MoeBlock, RoutedExperts, Router, RoutingRule};
use super::{AttentionBlock, DecoderLayer, Family, FeedForward, ModelSpec, RotarySpec};
use crate::checkpoint::experts::ExpertLayout;
use crate::error::Result;

/// Mixtral's `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Model width.
    pub hidden_size: usize,
    /// Expert intermediate size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Per-head dimension (defaults to hidden / heads).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Routed experts per layer.
    pub num_local_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
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

pub(crate) fn default_eps() -> f64 {
    1e-6
}

pub(crate) fn default_positions() -> usize {
    4096
}

impl Config {
    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Family-independent facts.
    pub fn spec(&self) -> ModelSpec {
        let layout = |i: usize| ExpertLayout {
            block: format!("model.layers.{i}.block_sparse_moe"),
            names: ["w1", "w3", "w2"],
            num_experts: self.num_local_experts,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
        };
        ModelSpec {
            family: Family::Mixtral,
            num_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            top_k: self.num_experts_per_tok,
            moe_layers: (0..self.num_hidden_layers)
                .map(|i| Some(layout(i)))
                .collect(),
            shared_expert_intermediate_size: 0,
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
                qkv_bias: false,
                o_bias: false,
            },
        )?;
        let router = Router {
            weight: w.get(
                &format!("{prefix}.block_sparse_moe.gate.weight"),
                &[self.num_local_experts, h],
            )?,
            rule: RoutingRule::SoftmaxTopK {
                top_k: self.num_experts_per_tok,
                normalize: true,
            },
        };
        DecoderLayer::with_norms(
            w,
            i,
            h,
            self.rms_norm_eps,
            AttentionBlock::Standard(attention),
            FeedForward::Moe(MoeBlock {
                router,
                experts: experts.unwrap_or_default(),
                shared: None,
            }),
        )
    }
}
