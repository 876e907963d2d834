//! DeepSeek-V3 (`model_type: deepseek_v3`), after transformers' `modeling_deepseek_v3.py`: the
//! MLA attention and layer layout of DeepSeek-V2 (low-rank queries), with sigmoid router scores,
//! selection biased by `e_score_correction_bias` inside the best `topk_group` of `n_group` groups,
//! optional renormalisation and `routed_scaling_factor`.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::common::Weights;
use super::moe::{RoutedExperts, RoutingRule};
use super::{deepseek_v2, DecoderLayer, Family, ModelSpec};
use crate::error::Result;

/// DeepSeek-V3's `config.json` (the DeepSeek-V2 fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct Config(pub deepseek_v2::Config);

impl Config {
    /// Family-independent facts.
    pub fn spec(&self) -> ModelSpec {
        self.0.spec_for(Family::DeepseekV3)
    }

    /// Loads decoder layer `i` around its already-loaded routed experts.
    pub fn load_layer(
        &self,
        w: &Weights,
        i: usize,
        experts: Option<RoutedExperts>,
    ) -> Result<DecoderLayer> {
        let c = &self.0;
        self.0.load_layer_with(w, i, experts, |w, block| {
            let bias_name = format!("{block}.gate.e_score_correction_bias");
            let correction_bias = match w.get_optional(&bias_name, &[c.n_routed_experts])? {
                Some(t) => t.to_dtype(DType::F32)?,
                None => Tensor::zeros(c.n_routed_experts, DType::F32, w.device)?,
            };
            Ok(RoutingRule::SigmoidGroupLimited {
                top_k: c.num_experts_per_tok,
                n_group: c.n_group,
                topk_group: c.topk_group,
                normalize: c.norm_topk_prob,
                scaling: c.routed_scaling_factor as f32,
                correction_bias,
            })
        })
    }
}
