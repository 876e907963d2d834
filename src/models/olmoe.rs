//! OLMoE (`model_type: olmoe`), after transformers' `modeling_olmoe.py`: q/k RMSNorm over the
//! full projection width, softmax top-k routing (`norm_topk_prob`), no shared experts.

use serde::Deserialize;

use super::common::{Attention, AttentionShape, QkNorm, RopeStyle, Weights};
use super::mixtral::{default_eps, default_positions};
use super::moe::{MoeBlock, RoutedExperts, Router, RoutingRule};
use super::{AttentionBlock, DecoderLayer, Family, FeedForward, ModelSpec, RotarySpec};
use crate::checkpoint::experts::ExpertLayout;
use crate::error::Result;

/// OLMoE's `config.json`.
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
    /// Routed experts per layer.
    pub num_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Renormalise the top-k weights.
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// Clamp q/k/v to ±clip_qkv (unsupported when set).
    #[serde(default)]
    pub clip_qkv: Option<f64>,
    /// Bias on attention projections.
    #[serde(default)]
    pub attention_bias: bool,
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

impl Config {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Family-independent facts.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            family: Family::Olmoe,
            num_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            top_k: self.num_experts_per_tok,
            moe_layers: (0..self.num_hidden_layers)
                .map(|i| {
                    Some(ExpertLayout::standard(
                        i,
                        self.num_experts,
                        self.hidden_size,
                        self.intermediate_size,
                    ))
                })
                .collect(),
            shared_expert_intermediate_size: 0,
            tie_word_embeddings: self.tie_word_embeddings,
            max_positions: self.max_position_embeddings,
            rotary: RotarySpec {
                dim: self.head_dim(),
                style: RopeStyle::Half,
                default_theta: 1e4,
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
        let (h, hd) = (self.hidden_size, self.head_dim());
        let mut attention = Attention::load(
            w,
            &format!("{prefix}.self_attn"),
            AttentionShape {
                hidden_size: h,
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
                head_dim: hd,
                qkv_bias: self.attention_bias,
                o_bias: self.attention_bias,
            },
        )?;
        attention.qk_norm = QkNorm::FullWidth {
            q: w.rms_norm(
                &format!("{prefix}.self_attn.q_norm"),
                self.num_attention_heads * hd,
                self.rms_norm_eps,
            )?,
            k: w.rms_norm(
                &format!("{prefix}.self_attn.k_norm"),
                self.num_key_value_heads * hd,
                self.rms_norm_eps,
            )?,
        };
        let router = Router {
            weight: w.get(&format!("{prefix}.mlp.gate.weight"), &[self.num_experts, h])?,
            rule: RoutingRule::SoftmaxTopK {
                top_k: self.num_experts_per_tok,
                normalize: self.norm_topk_prob,
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
