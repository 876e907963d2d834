//! The router of a MoE layer: scores, group masking and top-k, all as tensor operations on the
//! device of the input, and the per-expert dispatch that follows.
//!
//! Top-k is an exact selection rather than `arg_sort`: candle documents its sorts as unstable
//! (CUDA's is a bitonic sort), while transformers' and our parity fixtures rely on ties going to
//! the lower expert index. Each of the `k` steps takes the row maximum, the lowest index holding
//! it, and masks that entry out, so the result is the same on every backend.

use candle_core::{DType, Device, Tensor, D};

use super::common::matmul_transposed;
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
        /// Selection bias per expert, f32 [experts], on the router's device.
        correction_bias: Tensor,
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

    /// Every expert's gate value before top-k and renormalisation, f32 [tokens, experts]: the
    /// softmax over all experts (sigmoid scores for DeepSeek-V3), as REAP weighs expert outputs.
    pub fn gate_scores(&self, logits: &Tensor) -> Result<Tensor> {
        match self {
            Self::SoftmaxTopK { .. } | Self::SoftmaxGroupLimited { .. } => softmax_last_dim(logits),
            Self::SigmoidGroupLimited { .. } => {
                Ok(logits.neg()?.exp()?.affine(1.0, 1.0)?.recip()?)
            }
        }
    }

    /// Selected experts (u32 [tokens, top_k], best first, ties to the lower index) and their
    /// weights (f32 [tokens, top_k]) for f32 router `logits` [tokens, experts].
    pub fn select(&self, logits: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            Self::SoftmaxTopK { top_k, normalize } => {
                let probs = softmax_last_dim(logits)?;
                let (weights, experts) = top_k_last_dim(&probs, *top_k)?;
                let weights = if *normalize {
                    weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?
                } else {
                    weights
                };
                Ok((experts, weights))
            }
            Self::SoftmaxGroupLimited {
                top_k,
                n_group,
                topk_group,
                scaling,
            } => {
                let probs = softmax_last_dim(logits)?;
                let masked = mask_to_best_groups(&probs, *n_group, *topk_group, |g| {
                    Ok(g.max_keepdim(D::Minus1)?)
                })?;
                let (weights, experts) = top_k_last_dim(&masked, *top_k)?;
                Ok((experts, (weights * *scaling as f64)?))
            }
            Self::SigmoidGroupLimited {
                top_k,
                n_group,
                topk_group,
                normalize,
                scaling,
                correction_bias,
            } => {
                let scores = logits.neg()?.exp()?.affine(1.0, 1.0)?.recip()?;
                let biased = scores.broadcast_add(correction_bias)?;
                let masked = mask_to_best_groups(&biased, *n_group, *topk_group, |g| {
                    let best = 2.min(g.dim(D::Minus1)?);
                    Ok(top_k_last_dim(g, best)?.0.sum_keepdim(D::Minus1)?)
                })?;
                let (_, experts) = top_k_last_dim(&masked, *top_k)?;
                let mut weights = scores.gather(&experts, D::Minus1)?;
                if *normalize {
                    let sum = weights.sum_keepdim(D::Minus1)?.affine(1.0, 1e-20)?;
                    weights = weights.broadcast_div(&sum)?;
                }
                Ok((experts, (weights * *scaling as f64)?))
            }
        }
    }
}

/// `softmax` over the last dimension as `exp(x - max) / Σ exp(x - max)`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let exps = x.broadcast_sub(&max)?.exp()?;
    Ok(exps.broadcast_div(&exps.sum_keepdim(D::Minus1)?)?)
}

/// The `k` largest values along the last dimension of f32 `scores` and their indices (u32),
/// best first, equal values in increasing index order. Computed with tensor operations on the
/// device of `scores`.
pub fn top_k_last_dim(scores: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let n = scores.dim(D::Minus1)?;
    if k == 0 || k > n {
        return Err(Error::InvalidArgument(format!(
            "top-{k} requested over {n} scores"
        )));
    }
    let device = scores.device();
    // Exact in f32 for any realistic expert count (< 2^24).
    let positions = Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)?;
    let countdown = positions.affine(-1.0, n as f64)?; // n - i: larger for lower indices
    let excluded = Tensor::full(f32::NEG_INFINITY, scores.shape(), device)?;
    let mut remaining = scores.to_dtype(DType::F32)?;
    let (mut values, mut indices) = (Vec::with_capacity(k), Vec::with_capacity(k));
    for step in 0..k {
        let best = remaining.max_keepdim(D::Minus1)?;
        let holds_best = remaining.broadcast_eq(&best)?.to_dtype(DType::F32)?;
        let lowest = holds_best
            .broadcast_mul(&countdown)?
            .max_keepdim(D::Minus1)?;
        // A row without a match (NaN scores) would give index n: keep it in range.
        let index = lowest.affine(-1.0, n as f64)?.clamp(0f32, (n - 1) as f32)?;
        if step + 1 < k {
            let chosen = positions.broadcast_eq(&index)?;
            remaining = chosen.where_cond(&excluded, &remaining)?;
        }
        values.push(best);
        indices.push(index);
    }
    let values = Tensor::cat(&values, D::Minus1)?;
    let indices = Tensor::cat(&indices, D::Minus1)?.to_dtype(DType::U32)?;
    Ok((values, indices))
}

/// Keeps the scores [tokens, experts] of each token's `topk_group` best groups (scored by
/// `group_score`, [.., per_group] -> [.., 1]) and sets the rest to zero.
fn mask_to_best_groups(
    scores: &Tensor,
    n_group: usize,
    topk_group: usize,
    group_score: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if n_group <= 1 {
        return Ok(scores.clone());
    }
    let (tokens, experts) = scores.dims2()?;
    if !experts.is_multiple_of(n_group) || topk_group == 0 || topk_group > n_group {
        return Err(Error::InvalidArgument(format!(
            "group-limited routing needs the {experts} experts to split evenly into n_group = {n_group} groups and 1 ≤ topk_group = {topk_group} ≤ n_group"
        )));
    }
    let per_group = experts / n_group;
    let grouped = scores.reshape((tokens, n_group, per_group))?;
    let group_scores = group_score(&grouped)?.squeeze(D::Minus1)?;
    let (_, best_groups) = top_k_last_dim(&group_scores, topk_group)?;
    let group_ids =
        Tensor::arange(0u32, n_group as u32, scores.device())?.reshape((1, 1, n_group))?;
    let keep_group = best_groups
        .unsqueeze(D::Minus1)?
        .broadcast_eq(&group_ids)?
        .to_dtype(DType::F32)?
        .sum(1)?; // [tokens, n_group], 1 where kept
    let keep = keep_group
        .unsqueeze(D::Minus1)?
        .broadcast_as((tokens, n_group, per_group))?
        .reshape((tokens, experts))?
        .ne(0f32)?;
    Ok(keep.where_cond(scores, &scores.zeros_like()?)?)
}

/// The routing decision for a batch of tokens, held on the device of the input.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Router logits, f32 [tokens, experts].
    pub logits: Tensor,
    /// Selected experts, u32 [tokens, top_k], best first.
    pub experts: Tensor,
    /// Weights of the selected experts, f32 [tokens, top_k].
    pub weights: Tensor,
    /// Experts per token.
    pub top_k: usize,
}

impl Routing {
    /// For each expert, the (token, weight) pairs routed to it, tokens ascending (copies the
    /// selection to the host).
    pub fn tokens_per_expert(&self, num_experts: usize) -> Result<Vec<(Vec<u32>, Vec<f32>)>> {
        let experts: Vec<u32> = self.experts.flatten_all()?.to_vec1()?;
        let weights: Vec<f32> = self.weights.flatten_all()?.to_vec1()?;
        let mut per_expert = vec![(Vec::new(), Vec::new()); num_experts];
        for (slot, (&e, &w)) in experts.iter().zip(&weights).enumerate() {
            let target = per_expert.get_mut(e as usize).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "routing chose expert {e} but the layer has {num_experts}"
                ))
            })?;
            target.0.push((slot / self.top_k) as u32);
            target.1.push(w);
        }
        Ok(per_expert)
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

impl Router {
    /// Routes `x` [tokens, hidden]; logits are computed in f32, selection stays on `x`'s device.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits =
            matmul_transposed(&x.to_dtype(DType::F32)?, &self.weight.to_dtype(DType::F32)?)?;
        let (experts, weights) = self.rule.select(&logits)?;
        Ok(Routing {
            logits,
            experts,
            weights,
            top_k: self.rule.top_k(),
        })
    }
}

/// The tokens routed to one expert, on the device.
#[derive(Debug, Clone)]
pub struct ExpertRoute {
    /// Token indices, u32 [count], ascending.
    pub tokens: Tensor,
    /// Routing weights of those tokens, f32 [count, 1].
    pub weights: Tensor,
    /// Number of tokens.
    pub count: usize,
}

/// The tokens that reach any expert of a group, and where each member's tokens sit among them.
#[derive(Debug, Clone)]
pub struct GroupRoute {
    /// Token indices routed to at least one member, u32 [union], ascending.
    pub tokens: Tensor,
    /// Per member (in the order given): positions of its tokens within `tokens`, u32 [count],
    /// aligned with that member's [`ExpertRoute::tokens`]; `None` when it has no token.
    pub positions: Vec<Option<Tensor>>,
}

/// A routing decision split per expert: built once per layer from one host copy of the
/// selected-expert indices (u32 [tokens, top_k]); token lists and weights stay on the device.
#[derive(Debug, Clone)]
pub struct ExpertDispatch {
    routes: Vec<Option<ExpertRoute>>,
    selected: Vec<u32>,
    top_k: usize,
    device: Device,
}

impl ExpertDispatch {
    /// Splits `routing` over `num_experts` experts (a counting pass over the index tensor).
    pub fn new(routing: &Routing, num_experts: usize) -> Result<Self> {
        let device = routing.experts.device().clone();
        let top_k = routing.top_k;
        let selected: Vec<u32> = routing.experts.flatten_all()?.to_vec1()?;
        let mut counts = vec![0usize; num_experts];
        for &e in &selected {
            *counts.get_mut(e as usize).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "router chose expert {e} but the layer has {num_experts}"
                ))
            })? += 1;
        }
        let mut starts = Vec::with_capacity(num_experts);
        let mut next = 0;
        for &c in &counts {
            starts.push(next);
            next += c;
        }
        let mut fill = starts.clone();
        let (mut slots, mut tokens) = (vec![0u32; selected.len()], vec![0u32; selected.len()]);
        for (slot, &e) in selected.iter().enumerate() {
            let at = &mut fill[e as usize];
            slots[*at] = slot as u32;
            tokens[*at] = (slot / top_k) as u32;
            *at += 1;
        }
        let total = selected.len();
        let slots = Tensor::from_vec(slots, total, &device)?;
        let tokens = Tensor::from_vec(tokens, total, &device)?;
        let weights = routing
            .weights
            .flatten_all()?
            .index_select(&slots, 0)?
            .reshape((total, 1))?;
        let routes = counts
            .iter()
            .zip(&starts)
            .map(|(&count, &start)| -> Result<Option<ExpertRoute>> {
                if count == 0 {
                    return Ok(None);
                }
                Ok(Some(ExpertRoute {
                    tokens: tokens.narrow(0, start, count)?,
                    weights: weights.narrow(0, start, count)?,
                    count,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            routes,
            selected,
            top_k,
            device,
        })
    }

    /// Number of experts the dispatch covers.
    pub fn num_experts(&self) -> usize {
        self.routes.len()
    }

    /// The tokens routed to `expert`, if any.
    pub fn route(&self, expert: usize) -> Option<&ExpertRoute> {
        self.routes.get(expert).and_then(Option::as_ref)
    }

    /// The union of the tokens of `members` and each member's positions in it; `None` when no
    /// member has a token.
    pub fn group_route(&self, members: &[usize]) -> Result<Option<GroupRoute>> {
        let mut member_slot = vec![None; self.routes.len()];
        for (slot, &e) in members.iter().enumerate() {
            *member_slot.get_mut(e).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "group member {e} is not one of the {} experts",
                    self.routes.len()
                ))
            })? = Some(slot);
        }
        let mut union: Vec<u32> = Vec::new();
        let mut positions: Vec<Vec<u32>> = vec![Vec::new(); members.len()];
        for (token, row) in self.selected.chunks(self.top_k).enumerate() {
            let mut at = None;
            for &e in row {
                if let Some(slot) = member_slot[e as usize] {
                    let p = *at.get_or_insert_with(|| {
                        union.push(token as u32);
                        union.len() as u32 - 1
                    });
                    positions[slot].push(p);
                }
            }
        }
        if union.is_empty() {
            return Ok(None);
        }
        let positions = positions
            .into_iter()
            .map(|p| {
                let count = p.len();
                (count > 0)
                    .then(|| Tensor::from_vec(p, count, &self.device))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let count = union.len();
        Ok(Some(GroupRoute {
            tokens: Tensor::from_vec(union, count, &self.device)?,
            positions,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Deterministic values in [-4, 4): continuous, or on a grid of 9 values (many exact ties).
    fn values(seed: u64, count: usize, tied: bool) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..count)
            .map(|_| {
                if tied {
                    rng.below(9) as f32 - 4.0
                } else {
                    (rng.uniform() * 8.0 - 4.0) as f32
                }
            })
            .collect()
    }

    // The host implementation routing used before it moved to the device, kept as the reference.
    fn host_top(scores: &[f32], k: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        order.truncate(k);
        order
    }

    fn host_softmax(row: &[f32]) -> Vec<f32> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    }

    fn host_mask(
        scores: &[f32],
        n_group: usize,
        keep: usize,
        score: impl Fn(&[f32]) -> f32,
    ) -> Vec<f32> {
        if n_group <= 1 {
            return scores.to_vec();
        }
        let per_group = scores.len() / n_group;
        let group_scores: Vec<f32> = scores.chunks(per_group).map(&score).collect();
        let kept = host_top(&group_scores, keep);
        let keep_entry = |i: usize| kept.contains(&(i / per_group));
        scores
            .iter()
            .enumerate()
            .map(|(i, &s)| if keep_entry(i) { s } else { 0.0 })
            .collect()
    }

    fn host_route(rule: &RoutingRule, bias: &[f32], row: &[f32]) -> (Vec<usize>, Vec<f32>) {
        match rule {
            RoutingRule::SoftmaxTopK { top_k, normalize } => {
                let probs = host_softmax(row);
                let chosen = host_top(&probs, *top_k);
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
                let probs = host_softmax(row);
                let masked = host_mask(&probs, *n_group, *topk_group, |g| {
                    g.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                });
                let chosen = host_top(&masked, *top_k);
                let w = chosen.iter().map(|&e| masked[e] * scaling).collect();
                (chosen, w)
            }
            RoutingRule::SigmoidGroupLimited {
                top_k,
                n_group,
                topk_group,
                normalize,
                scaling,
                ..
            } => {
                let scores: Vec<f32> = row.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
                let biased: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
                let masked = host_mask(&biased, *n_group, *topk_group, |g| {
                    host_top(g, 2.min(g.len())).iter().map(|&i| g[i]).sum()
                });
                let chosen = host_top(&masked, *top_k);
                let mut w: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
                if *normalize {
                    let sum: f32 = w.iter().sum::<f32>() + 1e-20;
                    w.iter_mut().for_each(|v| *v /= sum);
                }
                w.iter_mut().for_each(|v| *v *= scaling);
                (chosen, w)
            }
        }
    }

    const TOKENS: usize = 97;
    const EXPERTS: usize = 16;

    fn rules(bias: &Tensor) -> Vec<RoutingRule> {
        let sigmoid = |normalize, n_group, topk_group| RoutingRule::SigmoidGroupLimited {
            top_k: 4,
            n_group,
            topk_group,
            normalize,
            scaling: 2.5,
            correction_bias: bias.clone(),
        };
        vec![
            RoutingRule::SoftmaxTopK {
                top_k: 2,
                normalize: true,
            },
            RoutingRule::SoftmaxTopK {
                top_k: 5,
                normalize: false,
            },
            RoutingRule::SoftmaxGroupLimited {
                top_k: 3,
                n_group: 1,
                topk_group: 1,
                scaling: 1.0,
            },
            RoutingRule::SoftmaxGroupLimited {
                top_k: 3,
                n_group: 4,
                topk_group: 2,
                scaling: 16.0,
            },
            sigmoid(true, 4, 2),
            sigmoid(false, 8, 3),
            sigmoid(true, 1, 1),
        ]
    }

    #[test]
    fn device_top_k_matches_the_host_implementation_including_ties() {
        let mut compared_ties = 0;
        for (seed, tied) in [(1, false), (2, true), (3, true), (4, false)] {
            let logits = values(seed, TOKENS * EXPERTS, tied);
            // Coarse biases make biased scores tie too; fine ones keep them distinct.
            let bias: Vec<f32> = values(seed + 100, EXPERTS, tied)
                .iter()
                .map(|b| b / 8.0)
                .collect();
            let bias_tensor = Tensor::new(bias.as_slice(), &Device::Cpu).unwrap();
            let logits_tensor =
                Tensor::from_vec(logits.clone(), (TOKENS, EXPERTS), &Device::Cpu).unwrap();
            for rule in rules(&bias_tensor) {
                let (experts, weights) = rule.select(&logits_tensor).unwrap();
                let experts: Vec<Vec<u32>> = experts.to_vec2().unwrap();
                let weights: Vec<Vec<f32>> = weights.to_vec2().unwrap();
                for (t, row) in logits.chunks(EXPERTS).enumerate() {
                    let (want_experts, want_weights) = host_route(&rule, &bias, row);
                    let got: Vec<usize> = experts[t].iter().map(|&e| e as usize).collect();
                    assert_eq!(got, want_experts, "{rule:?}, token {t}, logits {row:?}");
                    for (g, w) in weights[t].iter().zip(&want_weights) {
                        assert!(
                            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                            "{rule:?}, token {t}: {g} vs {w}"
                        );
                    }
                    let chosen: Vec<f32> = want_experts.iter().map(|&e| row[e]).collect();
                    if chosen.windows(2).any(|p| p[0] == p[1]) {
                        compared_ties += 1;
                    }
                }
            }
        }
        assert!(
            compared_ties > 100,
            "only {compared_ties} rows with tied picks were compared"
        );
    }

    #[test]
    fn top_k_prefers_the_lower_index_among_equal_scores() {
        let scores = Tensor::new(
            &[[1f32, 3., 3., 2., 3.], [0., 0., 0., 0., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let (values, indices) = top_k_last_dim(&scores, 4).unwrap();
        assert_eq!(
            indices.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 4, 3], vec![0, 1, 2, 3]]
        );
        assert_eq!(values.to_vec2::<f32>().unwrap()[0], vec![3., 3., 3., 2.]);
        assert!(top_k_last_dim(&scores, 6).is_err());
    }

    #[test]
    fn dispatch_splits_routing_per_expert_and_group() {
        let logits = Tensor::from_vec(
            values(9, TOKENS * EXPERTS, false),
            (TOKENS, EXPERTS),
            &Device::Cpu,
        )
        .unwrap();
        let rule = RoutingRule::SoftmaxTopK {
            top_k: 3,
            normalize: true,
        };
        let (experts, weights) = rule.select(&logits).unwrap();
        let routing = Routing {
            logits,
            experts,
            weights,
            top_k: 3,
        };
        let dispatch = ExpertDispatch::new(&routing, EXPERTS).unwrap();
        let host = routing.tokens_per_expert(EXPERTS).unwrap();
        let mut total = 0;
        for (e, (tokens, weights)) in host.iter().enumerate() {
            match dispatch.route(e) {
                None => assert!(tokens.is_empty()),
                Some(route) => {
                    assert_eq!(&route.tokens.to_vec1::<u32>().unwrap(), tokens);
                    assert_eq!(
                        &route
                            .weights
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                        weights
                    );
                    total += route.count;
                }
            }
        }
        assert_eq!(total, TOKENS * 3);
        let members = [5, 2, 11];
        let group = dispatch.group_route(&members).unwrap().unwrap();
        let union: Vec<u32> = group.tokens.to_vec1().unwrap();
        assert!(
            union.windows(2).all(|p| p[0] < p[1]),
            "union ascending and unique"
        );
        for (slot, &e) in members.iter().enumerate() {
            let positions: Vec<u32> = group.positions[slot].as_ref().unwrap().to_vec1().unwrap();
            let tokens: Vec<u32> = positions.iter().map(|&p| union[p as usize]).collect();
            assert_eq!(tokens, host[e].0, "member {e}");
        }
        let expected: std::collections::BTreeSet<u32> =
            members.iter().flat_map(|&e| host[e].0.clone()).collect();
        assert_eq!(union, expected.into_iter().collect::<Vec<_>>());
        assert!(
            ExpertDispatch::new(&routing, 4).is_err(),
            "expert index beyond the layer"
        );
    }
}
