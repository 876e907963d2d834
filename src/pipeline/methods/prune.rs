//! Expert removal (`prune`): score every routed expert on the calibration tokens and remove the
//! least salient ones, the same number in every MoE layer (every checkpoint format holds one
//! expert count), before any other method sees the layer. The kept experts are renumbered
//! `0..n'`; the router rows (and DeepSeek's `e_score_correction_bias` entries) of the removed
//! ones are dropped (`pipeline::removal`).
//!
//! Saliency (`saliency`):
//! - `reap` (REAP, Lasby et al. 2025, "REAP the Experts"): `S_j = mean over the tokens routed to
//!   j of g_j(x)·‖f_j(x)‖₂`, with `g_j` the router's gate value before top-k and renormalisation
//!   (the softmax over all experts; DeepSeek-V3's sigmoid score) and `f_j(x)` the expert's
//!   unweighted output, as the reference implementation (CerebrasResearch/reap, `observer.py`,
//!   `renormalize_router_weights = False`). Experts no token reached score 0.
//! - `frequency`: the number of top-k hits.
//!
//! How many: `fraction` of each layer's experts when given. Removing alone (every other expert
//! kept as stored), enough experts to meet the whole budget. Otherwise a share of the budget:
//! with a parameter budget, half of it (`round(ρ·n·t/6)` experts, `t` the covered matrices of
//! 3, as the paper-era `prune+lowrank`); with a byte budget, `round(n·(ρ − 0.5))` experts, what
//! the byte ratio asks beyond what 8-bit storage gives for free from 16-bit weights, or, when a
//! method offers sub-byte storage, an eighth once the budget leaves fewer than
//! [`REMOVAL_BELOW_BITS`] per weight; both at most [`DEFAULT_MAX_PRUNED_FRACTION`] of the
//! experts, and lowered until routing still works.
//!
//! DeepSeek's experts come in `n_group` equal groups (group-limited routing): the same number is
//! removed from every group, so the count is rounded to a multiple of `n_group`; a layer keeps at
//! least `top_k` experts, and with group-limited routing `topk_group` groups must still hold
//! `top_k` experts (DeepSeek-V3 also needs two per group for its group score).

use serde::{Deserialize, Serialize};

use super::{Method, MethodInputs, Needs, ObservedLayer};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::linalg::LinalgBackend;
use crate::pipeline::options::{BudgetUnit, MethodSettings};
use crate::pipeline::plan::{Candidate, UnitOutput};
use crate::pipeline::report::LayerPruning;
pub use crate::pipeline::report::Saliency;

/// The registry name.
pub const NAME: &str = "prune";

/// One line for help texts.
pub const DESCRIPTION: &str =
    "Remove the least salient experts of every layer (REAP or routing frequency)";

/// At most this fraction of each layer's experts is removed unless `fraction` says otherwise:
/// chosen on held-out calibration text, where removing more lost on both trained models
/// (docs/RESULTS.md).
pub const DEFAULT_MAX_PRUNED_FRACTION: f64 = 0.125;

/// With sub-byte quantisation on offer, experts are removed by default only where a byte budget
/// leaves fewer bits than this per routed weight: chosen on held-out calibration text, where
/// removing an eighth of the experts lost at 4.2 bits and won at 3.1 (docs/RESULTS.md).
pub const REMOVAL_BELOW_BITS: f64 = 3.5;

/// `[settings.prune]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PruneSettings {
    /// How experts are ranked.
    pub saliency: Saliency,
    /// Fraction of each layer's experts removed (None: a share of the budget, module docs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
}

impl Default for PruneSettings {
    fn default() -> Self {
        Self {
            saliency: Saliency::Reap,
            fraction: None,
        }
    }
}

impl MethodSettings for PruneSettings {
    const METHOD: &'static str = NAME;
}

/// The per-layer pruning rule, the same for every MoE layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneRule {
    /// How experts are ranked.
    pub saliency: Saliency,
    /// Experts removed from every MoE layer.
    pub remove: usize,
    /// Equal expert groups the removal is spread over (DeepSeek's `n_group`; 1 otherwise).
    pub groups: usize,
}

impl PruneRule {
    /// Chooses the experts to keep from every expert's REAP `reap` score (None for
    /// `frequency`) and routing `counts`.
    pub fn select(&self, counts: &[u64], reap: Option<Vec<f64>>) -> Result<LayerPruning> {
        let n = counts.len();
        let scores = match (self.saliency, reap) {
            (Saliency::Reap, Some(scores)) if scores.len() == n => scores,
            (Saliency::Reap, _) => {
                return Err(Error::InvalidArgument(
                    "REAP pruning needs the experts' outputs on the calibration tokens".into(),
                ))
            }
            (Saliency::Frequency, _) => counts.iter().map(|&c| c as f64).collect(),
        };
        let groups = self.groups.max(1);
        if !n.is_multiple_of(groups) || !self.remove.is_multiple_of(groups) {
            return Err(Error::InvalidArgument(format!(
                "cannot remove {} of {n} experts evenly from {groups} expert groups",
                self.remove
            )));
        }
        let (size, per_group) = (n / groups, self.remove / groups);
        let mut removed = Vec::with_capacity(self.remove);
        for group in 0..groups {
            let mut members: Vec<usize> = (group * size..(group + 1) * size).collect();
            // Least salient first; ties go to the less routed expert, then the higher index.
            members.sort_by(|&a, &b| {
                scores[a]
                    .total_cmp(&scores[b])
                    .then(counts[a].cmp(&counts[b]))
                    .then(b.cmp(&a))
            });
            removed.extend_from_slice(&members[..per_group]);
        }
        removed.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a)));
        let kept = (0..n).filter(|e| !removed.contains(e)).collect();
        Ok(LayerPruning {
            saliency: self.saliency,
            original_experts: n,
            kept,
            removed,
            scores,
            routing_counts: counts.to_vec(),
            estimated_error: None,
        })
    }
}

/// Routing constraints of a checkpoint that pruning must keep valid.
#[derive(Debug, Clone, Copy)]
pub struct RoutingLimits {
    /// Routed experts per layer.
    pub experts: usize,
    top_k: usize,
    groups: usize,
    group_limited: Option<usize>,
    group_score_needs_two: bool,
}

impl RoutingLimits {
    /// The limits of `checkpoint`'s routing.
    pub fn of(checkpoint: &Checkpoint) -> Result<Self> {
        let spec = crate::models::ArchConfig::from_checkpoint(checkpoint)?.spec();
        let experts = spec
            .moe_layers
            .iter()
            .flatten()
            .map(|l| l.num_experts)
            .next()
            .ok_or_else(|| Error::Config {
                path: checkpoint.config_path(),
                message: "has no MoE layer, so there are no experts to prune".into(),
            })?;
        let config = checkpoint.config();
        let number = |key: &str| config.get(key).and_then(|v| v.as_u64()).map(|v| v as usize);
        let deepseek = matches!(
            spec.family,
            crate::models::Family::DeepseekV2 | crate::models::Family::DeepseekV3
        );
        let v3 = matches!(spec.family, crate::models::Family::DeepseekV3);
        let groups = if deepseek {
            number("n_group").unwrap_or(1).max(1)
        } else {
            1
        };
        let method = config.get("topk_method").and_then(|v| v.as_str());
        let group_limited = (v3 || method == Some("group_limited_greedy"))
            .then(|| number("topk_group").unwrap_or(groups));
        Ok(Self {
            experts,
            top_k: spec.top_k,
            groups,
            group_limited,
            group_score_needs_two: v3,
        })
    }

    /// The removal nearest `wanted` (a multiple of the expert groups) that routing allows,
    /// lowered group by group until it is allowed (0 at worst).
    pub fn largest_valid_removal(&self, wanted: f64) -> usize {
        let g = self.groups;
        let mut remove = ((wanted / g as f64).round() as usize) * g;
        while remove > 0 && self.refusal(remove).is_some() {
            remove -= g;
        }
        remove
    }

    /// Rounds `remove` to the nearest multiple of the expert groups and checks that routing
    /// still works with the experts left.
    pub fn checked_removal(&self, remove: f64, checkpoint: &Checkpoint) -> Result<usize> {
        let g = self.groups;
        let remove = ((remove / g as f64).round() as usize) * g;
        match self.refusal(remove) {
            None => Ok(remove),
            Some(why) => Err(Error::InvalidArgument(format!(
                "pruning {remove} of {} experts per layer of {}: {why}",
                self.experts,
                checkpoint.dir().display()
            ))),
        }
    }

    /// Why routing would not work with `remove` experts removed per layer (None: it would).
    fn refusal(&self, remove: usize) -> Option<String> {
        let g = self.groups;
        let kept = self.experts.saturating_sub(remove);
        if kept < self.top_k {
            return Some(format!(
                "{kept} experts would be left, fewer than num_experts_per_tok = {}",
                self.top_k
            ));
        }
        let per_group = kept / g;
        if let Some(topk_group) = self.group_limited {
            if topk_group * per_group < self.top_k {
                return Some(format!(
                    "group-limited routing picks {} experts from topk_group = {topk_group} of \
                     n_group = {g} groups, which would hold {per_group} experts each",
                    self.top_k
                ));
            }
        }
        if self.group_score_needs_two && g > 1 && per_group < 2 {
            return Some(format!(
                "DeepSeek-V3 scores a group by its two best experts, but groups would hold \
                 {per_group}"
            ));
        }
        None
    }

    /// The routing groups experts are removed evenly from.
    pub fn groups(&self) -> usize {
        self.groups
    }
}

/// The experts (before rounding) removed from `experts` when no `fraction` is given: half of a
/// parameter budget `ratio` over `targeted` of the 3 matrices; under a byte budget, the most
/// allowed when sub-byte storage is offered and the budget leaves fewer than
/// [`REMOVAL_BELOW_BITS`] per routed weight, else what it asks beyond the smallest storage the
/// other methods offer (`smallest` bytes per parameter, of weights stored at `input`); at most
/// [`DEFAULT_MAX_PRUNED_FRACTION`] of the experts.
pub fn default_removal(
    unit: BudgetUnit,
    ratio: f64,
    (experts, targeted): (usize, usize),
    (input, smallest): (f64, Option<f64>),
) -> f64 {
    let n = experts as f64;
    let free = smallest.map_or(0.0, |s| (1.0 - s / input).max(0.0));
    let wanted = match unit {
        BudgetUnit::Parameters => ratio * n * targeted as f64 / 6.0,
        BudgetUnit::Bytes => {
            let below_one_byte = smallest.is_some_and(|s| s < 1.0);
            let bits_left = (1.0 - ratio) * input * 8.0;
            if below_one_byte && bits_left < REMOVAL_BELOW_BITS {
                n
            } else {
                (ratio - free).max(0.0) * n
            }
        }
    };
    wanted.min(n * DEFAULT_MAX_PRUNED_FRACTION)
}

/// The rule `options` asks for (None when it removes nothing), checked against the routing.
pub fn rule(inputs: &MethodInputs) -> Result<Option<PruneRule>> {
    let (options, checkpoint) = (inputs.options, inputs.checkpoint);
    let settings = options.settings_of::<PruneSettings>()?;
    let limits = RoutingLimits::of(checkpoint)?;
    let budget = &options.budget;
    let remove = match settings.fraction {
        Some(f) => {
            if !(f > 0.0 && f < 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "--prune-fraction {f} must be in (0, 1)"
                )));
            }
            limits.checked_removal(f * limits.experts as f64, checkpoint)?
        }
        // Alone (every other expert kept as stored), removal pays the whole budget: enough
        // experts that the rest fits.
        None if options.methods.iter().all(|m| m == NAME || m == "keep") => {
            let share = match budget.unit {
                BudgetUnit::Parameters => budget.ratio * budget.targeted().len() as f64 / 3.0,
                BudgetUnit::Bytes => budget.ratio,
            };
            let wanted = (share * limits.experts as f64 - 1e-9).ceil();
            limits.checked_removal(wanted, checkpoint)?
        }
        None => limits.largest_valid_removal(default_removal(
            budget.unit,
            budget.ratio,
            (limits.experts, budget.targeted().len()),
            (
                crate::pipeline::budget::input_bytes_per_parameter(checkpoint)?,
                inputs.smallest_bytes_per_parameter,
            ),
        )),
    };
    Ok((remove > 0).then_some(PruneRule {
        saliency: settings.saliency,
        remove,
        groups: limits.groups(),
    }))
}

/// The `prune` method.
pub struct Prune {
    settings: PruneSettings,
    rule: Option<PruneRule>,
}

/// Builds the method from the run's options.
pub fn create<B: LinalgBackend>(inputs: &MethodInputs) -> Result<Box<dyn Method<B>>> {
    Ok(Box::new(Prune {
        settings: inputs.options.settings_of::<PruneSettings>()?,
        rule: rule(inputs)?,
    }))
}

impl<B: LinalgBackend> Method<B> for Prune {
    fn name(&self) -> &'static str {
        NAME
    }

    fn needs(&self) -> Needs {
        Needs {
            // The experts' outputs give REAP's saliency and the removal's estimated error.
            saliency: self.rule.is_some(),
            ..Needs::default()
        }
    }

    fn acts_without_budget(&self) -> bool {
        // `--prune-fraction` removes its experts whatever the budget.
        self.rule.is_some()
    }

    fn resolved_settings(&self) -> Option<serde_json::Value> {
        serde_json::to_value(&self.settings).ok()
    }

    fn remove(&self, layer: &ObservedLayer) -> Result<Option<LayerPruning>> {
        let Some(rule) = self.rule else {
            return Ok(None);
        };
        let mut pruning = rule.select(layer.routing_counts, layer.saliency.map(<[f64]>::to_vec))?;
        if let (Some(energy), true) = (layer.expert_output_energy, layer.output_energy > 0.0) {
            let removed: f64 = pruning.removed.iter().map(|&e| energy[e]).sum();
            pruning.estimated_error = Some(removed / layer.output_energy);
        }
        Ok(Some(pruning))
    }

    fn offer(&self, _layer: &super::LayerContext<B>) -> Result<Vec<Candidate>> {
        Ok(Vec::new())
    }

    fn apply(
        &self,
        _layer: &super::LayerContext<B>,
        _chosen: &[Candidate],
    ) -> Result<Vec<UnitOutput>> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    fn rule(saliency: Saliency, remove: usize, groups: usize) -> PruneRule {
        PruneRule {
            saliency,
            remove,
            groups,
        }
    }

    #[test]
    fn reap_is_the_mean_of_gate_value_times_output_norm_over_routed_tokens() {
        use crate::models::moe::MoeTrace;
        use crate::models::routing::{ExpertDispatch, Routing, RoutingRule};
        use crate::pipeline::calibrate::SaliencyAccumulator;
        let cpu = Device::Cpu;
        // 3 tokens, 3 experts, top-2; expert 2 gets no token.
        let logits = Tensor::new(
            &[[2.0f32, 1.0, 0.0], [0.5, 1.5, -1.0], [1.0, 1.0, -3.0]],
            &cpu,
        )
        .unwrap();
        let rule = RoutingRule::SoftmaxTopK {
            top_k: 2,
            normalize: true,
        };
        let (experts, weights) = rule.select(&logits).unwrap();
        let routing = Routing {
            logits: logits.clone(),
            experts,
            weights,
            top_k: 2,
        };
        let dispatch = ExpertDispatch::new(&routing, 3).unwrap();
        let input = Tensor::zeros((3, 2), DType::F32, &cpu).unwrap();
        let trace = MoeTrace {
            layer: 0,
            input: &input,
            routing: &routing,
            dispatch: &dispatch,
            rule: &rule,
        };
        // Every token reaches experts 0 and 1; outputs with norms 5, 1, 2 and 3, 4, 0.
        let outputs = vec![
            Some(Tensor::new(&[[3.0f32, 4.0], [0.0, 1.0], [2.0, 0.0]], &cpu).unwrap()),
            Some(Tensor::new(&[[0.0f32, 3.0], [4.0, 0.0], [0.0, 0.0]], &cpu).unwrap()),
            None,
        ];
        let mut accumulator = SaliencyAccumulator::new(3);
        accumulator.add(&trace, &outputs).unwrap();
        let probs: Vec<Vec<f32>> = crate::models::routing::softmax_last_dim(&logits)
            .unwrap()
            .to_vec2()
            .unwrap();
        let expected_0 = (probs[0][0] * 5.0 + probs[1][0] * 1.0 + probs[2][0] * 2.0) / 3.0;
        let expected_1 = (probs[0][1] * 3.0 + probs[1][1] * 4.0 + probs[2][1] * 0.0) / 3.0;
        let saliency = accumulator.saliency();
        assert!(
            (saliency[0] - expected_0 as f64).abs() < 1e-6,
            "{saliency:?}"
        );
        assert!(
            (saliency[1] - expected_1 as f64).abs() < 1e-6,
            "{saliency:?}"
        );
        assert_eq!(saliency[2], 0.0);
    }

    #[test]
    fn the_least_salient_experts_go_and_the_rest_keep_their_order() {
        let counts = [5, 0, 9, 3, 7, 1];
        let reap = vec![0.5, 0.0, 0.1, 0.9, 0.3, 0.2];
        let p = rule(Saliency::Reap, 3, 1)
            .select(&counts, Some(reap))
            .unwrap();
        assert_eq!(p.removed, vec![1, 2, 5]);
        assert_eq!(p.kept, vec![0, 3, 4]);
        let f = rule(Saliency::Frequency, 2, 1)
            .select(&counts, None)
            .unwrap();
        assert_eq!(f.removed, vec![1, 5]);
        assert_eq!(f.kept, vec![0, 2, 3, 4]);
        assert!(rule(Saliency::Reap, 1, 1).select(&counts, None).is_err());
    }

    #[test]
    fn grouped_experts_lose_the_same_number_per_group() {
        let counts = [1, 2, 3, 4, 40, 30, 20, 10];
        let p = rule(Saliency::Frequency, 2, 2)
            .select(&counts, None)
            .unwrap();
        assert_eq!(p.kept, vec![1, 2, 3, 4, 5, 6]);
        assert!(rule(Saliency::Frequency, 3, 2)
            .select(&counts, None)
            .is_err());
    }

    /// bf16 weights, int8 storage enabled.
    const EIGHT_BIT: (f64, Option<f64>) = (2.0, Some(1.0 + 4.0 / 128.0));

    #[test]
    fn the_default_removal_is_a_share_of_the_budget_up_to_an_eighth_of_the_experts() {
        let params = BudgetUnit::Parameters;
        // Half of ρ·n·t/3: 0.24·16·3/6 = 1.92 of 16 (under the cap of 2).
        assert!((default_removal(params, 0.24, (16, 3), EIGHT_BIT) - 1.92).abs() < 1e-12);
        // 0.44·32·3/6 = 7.04 of 32 is capped at 4; gate/up only counts 2 of 3 matrices.
        assert_eq!(default_removal(params, 0.44, (32, 3), EIGHT_BIT), 4.0);
        assert!((default_removal(params, 0.3, (16, 2), EIGHT_BIT) - 1.6).abs() < 1e-12);
        // Bytes of bf16 weights: nothing below what int8 gives (0.484), then what is asked
        // beyond it, capped at an eighth.
        let bytes = BudgetUnit::Bytes;
        assert_eq!(default_removal(bytes, 0.4, (16, 3), EIGHT_BIT), 0.0);
        let free = 1.0 - (1.0 + 4.0 / 128.0) / 2.0;
        assert!(
            (default_removal(bytes, 0.55, (32, 3), EIGHT_BIT) - (0.55 - free) * 32.0).abs() < 1e-9
        );
        assert_eq!(default_removal(bytes, 0.74, (16, 3), EIGHT_BIT), 2.0);
        // With 2-bit storage on offer, nothing is removed while 3.5 bits per weight or more
        // are left (0.78 of bf16 removed), then an eighth.
        let two_bit = (2.0, Some(2.375 / 8.0));
        assert_eq!(default_removal(bytes, 0.74, (16, 3), two_bit), 0.0);
        assert_eq!(default_removal(bytes, 0.78, (16, 3), two_bit), 0.0);
        assert_eq!(default_removal(bytes, 0.79, (16, 3), two_bit), 2.0);
        assert_eq!(default_removal(bytes, 0.88, (64, 3), two_bit), 8.0);
        // FP8 weights gain nothing from 8 bits: removal starts at once.
        assert!(default_removal(bytes, 0.05, (32, 3), (1.0, Some(1.03125))) > 1.0);
    }

    #[test]
    fn the_default_removal_is_lowered_until_routing_can_run() {
        let limits = |experts, top_k, groups, group_limited, group_score_needs_two| RoutingLimits {
            experts,
            top_k,
            groups,
            group_limited,
            group_score_needs_two,
        };
        // 16 experts, top-4: round(0.4·16/3) = 2 is allowed as it is.
        assert_eq!(limits(16, 4, 1, None, false).largest_valid_removal(2.13), 2);
        // Every expert active (top-4 of 4): nothing can go.
        assert_eq!(limits(4, 4, 1, None, false).largest_valid_removal(1.2), 0);
        // 6 experts, top-4: 2 would leave 4, 3 would leave 3: lowered to 2.
        assert_eq!(limits(6, 4, 1, None, false).largest_valid_removal(3.0), 2);
        // DeepSeek-V3-like, 2 groups of 2: one per group would leave one, below its two-best score.
        assert_eq!(limits(4, 2, 2, Some(1), true).largest_valid_removal(1.2), 0);
        // 2 groups of 6, topk_group 1, top-4: 4 per group (8) would leave 2 per group; 2 (4) leaves 4.
        assert_eq!(
            limits(12, 4, 2, Some(1), false).largest_valid_removal(8.0),
            4
        );
    }
}
