//! The sparse MoE block: a router that picks experts per token, the routed experts (dense or
//! compressed, behind one type), and optional shared experts. Architecture files only choose the
//! routing rule and the weight names; the expert computation lives here.

use candle_core::{DType, Device, Module, Tensor};

use super::common::{matmul_transposed, GatedMlp, Linear};
use crate::error::{Error, Result};

/// How router logits become the top-k experts and their weights.
#[derive(Debug, Clone)]
pub enum RoutingRule {
    /// Softmax over all experts, top-k, optionally renormalised (Mixtral, Qwen2/3-MoE, OLMoE).
    SoftmaxTopK {
        /// Experts per token.
        top_k: usize,
        /// Renormalise the selected weights to sum to one.
        normalize: bool,
    },
    /// DeepSeek-V2: softmax, greedy or group-limited greedy top-k, times a scaling factor.
    SoftmaxGroupLimited {
        /// Experts per token.
        top_k: usize,
        /// Number of expert groups (1 = plain greedy).
        n_group: usize,
        /// Groups a token may use.
        topk_group: usize,
        /// Multiplier on the selected weights.
        scaling: f32,
    },
    /// DeepSeek-V3: sigmoid scores, selection biased by `e_score_correction_bias` within the best
    /// groups (group score = sum of its two best), weights from unbiased scores.
    SigmoidGroupLimited {
        /// Experts per token.
        top_k: usize,
        /// Number of expert groups.
        n_group: usize,
        /// Groups a token may use.
        topk_group: usize,
        /// Renormalise the selected weights.
        normalize: bool,
        /// Multiplier on the selected weights.
        scaling: f32,
        /// Selection bias per expert.
        correction_bias: Vec<f32>,
    },
}

impl RoutingRule {
    /// Experts chosen per token.
    pub fn top_k(&self) -> usize {
        match self {
            Self::SoftmaxTopK { top_k, .. }
            | Self::SoftmaxGroupLimited { top_k, .. }
            | Self::SigmoidGroupLimited { top_k, .. } => *top_k,
        }
    }
}

/// The routing decision for a batch of tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Router logits, f32 [tokens, experts].
    pub logits: Tensor,
    /// Selected experts, row-major [tokens, top_k].
    pub experts: Vec<u32>,
    /// Weights of the selected experts, row-major [tokens, top_k].
    pub weights: Vec<f32>,
    /// Experts per token.
    pub top_k: usize,
}

impl Routing {
    /// For each expert, the (token, weight) pairs routed to it.
    pub fn tokens_per_expert(&self, num_experts: usize) -> Vec<(Vec<u32>, Vec<f32>)> {
        let mut per_expert = vec![(Vec::new(), Vec::new()); num_experts];
        for (slot, (&e, &w)) in self.experts.iter().zip(&self.weights).enumerate() {
            let token = (slot / self.top_k) as u32;
            per_expert[e as usize].0.push(token);
            per_expert[e as usize].1.push(w);
        }
        per_expert
    }
}

/// The gating network of a MoE layer.
#[derive(Debug, Clone)]
pub struct Router {
    /// Gate weight, [experts, hidden].
    pub weight: Tensor,
    /// Routing rule.
    pub rule: RoutingRule,
}

fn top_indices(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Keeps the scores of the `topk_group` best groups (group score by `group_score`), zeroing the rest.
fn mask_to_best_groups(
    scores: &[f32],
    n_group: usize,
    topk_group: usize,
    group_score: impl Fn(&[f32]) -> f32,
) -> Vec<f32> {
    if n_group <= 1 {
        return scores.to_vec();
    }
    let per_group = scores.len() / n_group;
    let group_scores: Vec<f32> = scores.chunks(per_group).map(&group_score).collect();
    let keep = top_indices(&group_scores, topk_group);
    scores
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if keep.contains(&(i / per_group)) {
                s
            } else {
                0.0
            }
        })
        .collect()
}

impl Router {
    /// Routes `x` [tokens, hidden]; logits are computed in f32.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits =
            matmul_transposed(&x.to_dtype(DType::F32)?, &self.weight.to_dtype(DType::F32)?)?;
        let rows: Vec<Vec<f32>> = logits.to_device(&Device::Cpu)?.to_vec2()?;
        let top_k = self.rule.top_k();
        let mut experts = Vec::with_capacity(rows.len() * top_k);
        let mut weights = Vec::with_capacity(rows.len() * top_k);
        for row in &rows {
            let (chosen, mut chosen_weights) = match &self.rule {
                RoutingRule::SoftmaxTopK { top_k, normalize } => {
                    let probs = softmax(row);
                    let chosen = top_indices(&probs, *top_k);
                    let mut w: Vec<f32> = chosen.iter().map(|&e| probs[e]).collect();
                    if *normalize {
                        let sum: f32 = w.iter().sum();
                        w.iter_mut().for_each(|v| *v /= sum);
                    }
                    (chosen, w)
                }
                RoutingRule::SoftmaxGroupLimited {
                    top_k,
                    n_group,
                    topk_group,
                    scaling,
                } => {
                    let probs = softmax(row);
                    let masked = mask_to_best_groups(&probs, *n_group, *topk_group, |g| {
                        g.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                    });
                    let chosen = top_indices(&masked, *top_k);
                    let w = chosen.iter().map(|&e| masked[e] * scaling).collect();
                    (chosen, w)
                }
                RoutingRule::SigmoidGroupLimited {
                    top_k,
                    n_group,
                    topk_group,
                    normalize,
                    scaling,
                    correction_bias,
                } => {
                    let scores: Vec<f32> = row.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
                    let biased: Vec<f32> = scores
                        .iter()
                        .zip(correction_bias)
                        .map(|(s, b)| s + b)
                        .collect();
                    let masked = mask_to_best_groups(&biased, *n_group, *topk_group, |g| {
                        let best = top_indices(g, 2.min(g.len()));
                        best.iter().map(|&i| g[i]).sum()
                    });
                    let chosen = top_indices(&masked, *top_k);
                    let mut w: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
                    if *normalize {
                        let sum: f32 = w.iter().sum::<f32>() + 1e-20;
                        w.iter_mut().for_each(|v| *v /= sum);
                    }
                    w.iter_mut().for_each(|v| *v *= scaling);
                    (chosen, w)
                }
            };
            experts.extend(chosen.iter().map(|&e| e as u32));
            weights.append(&mut chosen_weights);
        }
        Ok(Routing {
            logits,
            experts,
            weights,
            top_k,
        })
    }
}

/// One projection matrix of a routed expert, dense or factored.
#[derive(Debug, Clone)]
pub enum Projection {
    /// The original dense matrix [out, in].
    Dense(Tensor),
    /// `A · basis` with `A` [out, rank] and a (possibly shared) basis [rank, in], plus an optional
    /// dense residual [out, in] expanded from its compact form at load time.
    LowRank {
        /// Per-expert coefficients, [out, rank].
        coefficients: Tensor,
        /// Group basis, already activated, [rank, in].
        basis: Tensor,
        /// Optional dense residual, [out, in].
        residual: Option<Tensor>,
    },
}

impl Projection {
    /// `x Ŵᵀ` for `x` [tokens, in].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => matmul_transposed(x, w),
            Self::LowRank {
                coefficients,
                basis,
                residual,
            } => {
                let projected = matmul_transposed(x, basis)?;
                let y = matmul_transposed(&projected, coefficients)?;
                match residual {
                    Some(r) => Ok((y + matmul_transposed(x, r)?)?),
                    None => Ok(y),
                }
            }
        }
    }

    /// The effective dense matrix [out, in].
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(w.clone()),
            Self::LowRank {
                coefficients,
                basis,
                residual,
            } => {
                let w = coefficients.matmul(basis)?;
                Ok(match residual {
                    Some(r) => (w + r)?,
                    None => w,
                })
            }
        }
    }
}

/// A routed expert: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Expert {
    /// Gate projection, [inter, hidden].
    pub gate: Projection,
    /// Up projection, [inter, hidden].
    pub up: Projection,
    /// Down projection, [hidden, inter].
    pub down: Projection,
}

impl Expert {
    /// Applies the expert to `x` [tokens, hidden].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::Activation::Silu.forward(&self.gate.forward(x)?)?;
        let up = self.up.forward(x)?;
        self.down.forward(&(gate * up)?)
    }
}

/// Shared experts that every token goes through, optionally scaled by a sigmoid gate (Qwen2-MoE).
#[derive(Debug, Clone)]
pub struct SharedExpert {
    /// The MLP.
    pub mlp: GatedMlp,
    /// Optional gate, [1, hidden].
    pub gate: Option<Linear>,
}

/// What a MoE layer saw and decided, handed to an observer (calibration statistics).
pub struct MoeTrace<'a> {
    /// Decoder layer index.
    pub layer: usize,
    /// The layer's MoE input, [tokens, hidden].
    pub input: &'a Tensor,
    /// The routing decision.
    pub routing: &'a Routing,
}

/// Receives each MoE layer's input and routing during a forward pass.
pub trait MoeObserver {
    /// Called once per MoE layer per forward pass.
    fn observe(&mut self, trace: &MoeTrace) -> Result<()>;
}

/// A sparse MoE feed-forward block.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// The router.
    pub router: Router,
    /// Routed experts.
    pub experts: Vec<Expert>,
    /// Optional shared experts.
    pub shared: Option<SharedExpert>,
}

impl MoeBlock {
    /// Runs the block on `x` [batch, seq, hidden]; returns the output and the router logits
    /// [batch*seq, experts].
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        observer: Option<&mut dyn MoeObserver>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, s, h) = x.dims3()?;
        let flat = x.reshape((b * s, h))?;
        let routing = self.router.route(&flat)?;
        if let Some(observer) = observer {
            observer.observe(&MoeTrace {
                layer,
                input: &flat,
                routing: &routing,
            })?;
        }
        let mut out = flat.zeros_like()?;
        for (expert_index, (tokens, weights)) in routing
            .tokens_per_expert(self.experts.len())
            .into_iter()
            .enumerate()
        {
            if tokens.is_empty() {
                continue;
            }
            let expert = self.experts.get(expert_index).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "router of layer {layer} chose expert {expert_index} but the layer has {}",
                    self.experts.len()
                ))
            })?;
            let count = tokens.len();
            let index = Tensor::from_vec(tokens, count, x.device())?;
            let weights = Tensor::from_vec(weights, (count, 1), x.device())?.to_dtype(x.dtype())?;
            let selected = flat.index_select(&index, 0)?;
            let y = expert.forward(&selected)?.broadcast_mul(&weights)?;
            out = out.index_add(&index, &y, 0)?;
        }
        if let Some(shared) = &self.shared {
            let mut y = shared.mlp.forward(&flat)?;
            if let Some(gate) = &shared.gate {
                let g = candle_nn::ops::sigmoid(&gate.forward(&flat)?)?;
                y = y.broadcast_mul(&g)?;
            }
            out = (out + y)?;
        }
        Ok((out.reshape((b, s, h))?, routing.logits))
    }
}
