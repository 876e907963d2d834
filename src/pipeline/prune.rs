//! Expert pruning (`--method prune` and `prune+lowrank`): score every routed expert on the
//! calibration tokens, remove the least salient ones (the same number in every MoE layer, so the
//! output is a normal checkpoint with one expert count), renumber the rest `0..n'` and drop the
//! router rows (and DeepSeek's `e_score_correction_bias` entries) of the removed ones.
//!
//! Saliency (`--prune-saliency`):
//! - `reap` (REAP, Lasby et al. 2025, "REAP the Experts"): `S_j = mean over the tokens routed to
//!   j of g_j(x)·‖f_j(x)‖₂`, with `g_j` the router's gate value before top-k and renormalisation
//!   (the softmax over all experts; DeepSeek-V3's sigmoid score) and `f_j(x)` the expert's
//!   unweighted output, as the reference implementation (CerebrasResearch/reap, `observer.py`,
//!   `renormalize_router_weights = False`). Experts no token reached score 0.
//! - `frequency`: the number of top-k hits.
//!
//! Budget: the (parameter) ratio ρ keeps its meaning for every method, the fraction of the
//! targeted matrices' parameters removed (`--matrices` names them: all three by default, gate/up
//! in the paper's preset; a byte budget is turned into ρ first, `pipeline::budget`), so that
//! outputs of equal ρ have equal size. An expert holds 3 matrices of `p·d`, `t` of which are
//! targeted, so `prune` removes `round(ρ·n·t/3)` experts per layer (`round(ρ·n)` for all three,
//! `round(ρ·n·2/3)` for gate/up).
//! `prune+lowrank` removes `round(F·n)` experts (`--prune-fraction F`; by default half of the
//! budget goes to pruning: `round(ρ·n·t/6)`, at most `n/8` ([`DEFAULT_MAX_PRUNED_FRACTION`]),
//! lowered if routing cannot run without them) and
//! factors the kept experts' targeted matrices at `ρ' = (ρ·n − (3/t)·m)/(n − m)`, so the total
//! stays `ρ·n·t·p·d` per layer.
//!
//! DeepSeek's experts come in `n_group` equal groups (group-limited routing, and our config
//! validation): the same number is removed from every group, so the removal count is rounded
//! to a multiple of `n_group`; a layer must keep at least `top_k` experts, and with group-limited
//! routing `topk_group` groups must still hold `top_k` experts (DeepSeek-V3 also needs two per
//! group for its group score).

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::experts::LayerExperts;
use super::options::CompressOptions;
use crate::checkpoint::experts::{ExpertLayout, ExpertMatrix};
use crate::checkpoint::{fp8, Checkpoint};
use crate::error::{Error, Result};
use crate::models::moe::MoeTrace;

/// What `compress` does to the routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompressMethod {
    /// Low-rank factorisation of gate/up (RFID-MoE).
    #[serde(rename = "lowrank")]
    LowRank,
    /// Remove the least salient experts; a normal checkpoint with fewer experts.
    #[serde(rename = "prune")]
    Prune,
    /// Remove the least salient experts, then factor the rest, at the same budget.
    #[serde(rename = "prune+lowrank")]
    PruneLowRank,
}

impl CompressMethod {
    /// Every method, in the order the command line lists them.
    pub const ALL: [CompressMethod; 3] = [Self::LowRank, Self::Prune, Self::PruneLowRank];

    /// The name used on the command line and in saved settings.
    pub fn name(&self) -> &'static str {
        match self {
            Self::LowRank => "lowrank",
            Self::Prune => "prune",
            Self::PruneLowRank => "prune+lowrank",
        }
    }

    /// One line saying what the method does (for help texts).
    pub fn description(&self) -> &'static str {
        match self {
            Self::LowRank => "Low-rank factorisation of the experts' gate/up (RFID-MoE)",
            Self::Prune => {
                "Remove the least salient experts (a normal checkpoint with fewer experts)"
            }
            Self::PruneLowRank => {
                "Remove the least salient experts, then factor the rest, at the same budget"
            }
        }
    }

    /// Whether experts are removed.
    pub fn prunes(&self) -> bool {
        !matches!(self, Self::LowRank)
    }

    /// Whether gate/up are factored.
    pub fn factors(&self) -> bool {
        !matches!(self, Self::Prune)
    }
}

impl std::fmt::Display for CompressMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CompressMethod {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        super::allocate::parse_named("method", name, &Self::ALL, Self::name)
    }
}

/// How experts are ranked for pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Saliency {
    /// REAP: mean over routed tokens of gate value × expert output norm.
    Reap,
    /// Routing frequency (top-k hits).
    Frequency,
}

impl Saliency {
    /// Every saliency, in the order the command line lists them.
    pub const ALL: [Saliency; 2] = [Self::Reap, Self::Frequency];

    /// The lowercase name used on the command line and in saved settings.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Reap => "reap",
            Self::Frequency => "frequency",
        }
    }

    /// One line saying what the saliency measures (for help texts).
    pub fn description(&self) -> &'static str {
        match self {
            Self::Reap => "REAP: mean over routed tokens of gate value × expert output norm",
            Self::Frequency => "Routing frequency (top-k hits on the calibration tokens)",
        }
    }
}

impl std::fmt::Display for Saliency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Saliency {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        super::allocate::parse_named("saliency", name, &Self::ALL, Self::name)
    }
}

/// The `[pruning]` table of `compress.toml`: the method and, when experts are removed, how (a
/// key left out means [`PruningOptions::low_rank_only`]'s value, as for the whole table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default = "PruningOptions::low_rank_only", deny_unknown_fields)]
pub struct PruningOptions {
    /// What is done to the routed experts.
    pub method: CompressMethod,
    /// How experts are ranked.
    pub saliency: Saliency,
    /// `prune+lowrank`: fraction of each layer's experts removed (None: half of the budget, at
    /// most an eighth of the experts).
    pub fraction: Option<f64>,
}

impl Default for PruningOptions {
    fn default() -> Self {
        Self {
            method: CompressMethod::PruneLowRank,
            ..Self::low_rank_only()
        }
    }
}

impl PruningOptions {
    /// Plain low-rank, no pruning: what a saved `compress.toml` without `[pruning]` means.
    pub fn low_rank_only() -> Self {
        Self {
            method: CompressMethod::LowRank,
            saliency: Saliency::Reap,
            fraction: None,
        }
    }

    /// Whether these are [`Self::low_rank_only`] (then `compress.toml` and the record leave
    /// them out, so outputs of low-rank runs are unchanged).
    pub fn is_low_rank_only(&self) -> bool {
        *self == Self::low_rank_only()
    }

    /// Checks the fraction's range and that it goes with `prune+lowrank`.
    pub fn validate(&self) -> Result<()> {
        if let Some(f) = self.fraction {
            if self.method != CompressMethod::PruneLowRank {
                return Err(Error::InvalidArgument(format!(
                    "--prune-fraction {f} applies to --method prune+lowrank only (--method \
                     prune removes the experts --ratio pays for)"
                )));
            }
            if !(f > 0.0 && f < 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "--prune-fraction {f} must be in (0, 1)"
                )));
            }
        }
        Ok(())
    }
}

/// Per expert, the sum of `g_j(x)·‖f_j(x)‖₂` and the number of routed tokens (REAP).
#[derive(Debug, Clone)]
pub struct SaliencyAccumulator {
    weighted_norms: Vec<f64>,
    routed: Vec<u64>,
}

impl SaliencyAccumulator {
    /// An empty accumulator for `num_experts` experts.
    pub fn new(num_experts: usize) -> Self {
        Self {
            weighted_norms: vec![0.0; num_experts],
            routed: vec![0; num_experts],
        }
    }

    /// Adds one forward pass: `outputs[j]` is expert j's unweighted output on its routed tokens.
    pub fn add(&mut self, trace: &MoeTrace, outputs: &[Option<Tensor>]) -> Result<()> {
        let gates = trace.rule.gate_scores(&trace.routing.logits)?;
        for (expert, output) in outputs.iter().enumerate() {
            let (Some(output), Some(route)) = (output, trace.dispatch.route(expert)) else {
                continue;
            };
            let norms = output.to_dtype(DType::F32)?.sqr()?.sum_keepdim(1)?.sqrt()?;
            let gate = gates.index_select(&route.tokens, 0)?.narrow(1, expert, 1)?;
            let sum: f32 = (norms * gate)?.sum_all()?.to_scalar()?;
            let slot = self.weighted_norms.get_mut(expert).ok_or_else(|| {
                Error::InvalidArgument(format!("expert {expert} outside the saliency table"))
            })?;
            *slot += sum as f64;
            self.routed[expert] += route.count as u64;
        }
        Ok(())
    }

    /// `S_j`: the mean over routed tokens (0 for experts without tokens).
    pub fn saliency(&self) -> Vec<f64> {
        self.weighted_norms
            .iter()
            .zip(&self.routed)
            .map(|(&sum, &n)| if n == 0 { 0.0 } else { sum / n as f64 })
            .collect()
    }
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

/// What a pruned layer's report records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPruning {
    /// How experts were ranked.
    pub saliency: Saliency,
    /// Experts before pruning.
    pub original_experts: usize,
    /// Original indices of the kept experts; kept expert `i` is written as expert `i`.
    pub kept: Vec<usize>,
    /// Original indices of the removed experts, least salient first.
    pub removed: Vec<usize>,
    /// Saliency of every original expert (REAP score, or routing count for `frequency`).
    pub scores: Vec<f64>,
    /// Top-k hits of every original expert.
    pub routing_counts: Vec<u64>,
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
        })
    }
}

/// A run's pruning: the rule, the experts per layer after it and the low-rank ratio of the kept
/// experts (`prune+lowrank`).
#[derive(Debug, Clone, PartialEq)]
pub struct PrunePlan {
    /// What every MoE layer does.
    pub rule: PruneRule,
    /// Experts per layer before.
    pub original_experts: usize,
    /// Experts per layer after.
    pub kept_experts: usize,
    /// `prune`: None; `prune+lowrank`: the ratio ρ' at which the kept experts are factored.
    pub lowrank_ratio: Option<f64>,
}

/// Routing constraints of a checkpoint that pruning must keep valid.
#[derive(Debug, Clone, Copy)]
struct RoutingLimits {
    experts: usize,
    top_k: usize,
    groups: usize,
    group_limited: Option<usize>,
    group_score_needs_two: bool,
}

impl RoutingLimits {
    fn of(checkpoint: &Checkpoint) -> Result<Self> {
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
    fn largest_valid_removal(&self, wanted: f64) -> usize {
        let g = self.groups;
        let mut remove = ((wanted / g as f64).round() as usize) * g;
        while remove > 0 && self.refusal(remove).is_some() {
            remove -= g;
        }
        remove
    }

    /// Rounds `remove` to the nearest multiple of the expert groups and checks that routing
    /// still works with the experts left.
    fn checked_removal(&self, remove: f64, checkpoint: &Checkpoint) -> Result<usize> {
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
}

/// The default `prune+lowrank` split prunes at most this fraction of each layer's experts (the
/// rest of the budget goes to low-rank): chosen on held-out calibration text, where pruning more
/// lost on both trained models (docs/RESULTS.md §9).
pub const DEFAULT_MAX_PRUNED_FRACTION: f64 = 0.125;

/// The experts (before rounding) the default `prune+lowrank` split removes of `experts` at the
/// parameter ratio `ratio` with `targeted` of the 3 matrices counted: half of the budget, at most
/// [`DEFAULT_MAX_PRUNED_FRACTION`] of the experts.
pub fn default_split_removal(ratio: f64, experts: usize, targeted: usize) -> f64 {
    let n = experts as f64;
    (ratio * n * targeted as f64 / 6.0).min(n * DEFAULT_MAX_PRUNED_FRACTION)
}

impl PrunePlan {
    /// The plan `options` asks for (None for `lowrank`), checked against the checkpoint's
    /// routing.
    pub fn new(options: &CompressOptions, checkpoint: &Checkpoint) -> Result<Option<Self>> {
        let pruning = &options.pruning;
        if !pruning.method.prunes() {
            return Ok(None);
        }
        let limits = RoutingLimits::of(checkpoint)?;
        let (n, ratio) = (limits.experts as f64, options.allocation.ratio);
        let targeted = options.allocation.targeted().len();
        // An expert holds 3 matrices, `targeted` of which the ratio counts.
        let worth = targeted as f64 / 3.0;
        let wanted = match (pruning.method, pruning.fraction) {
            (CompressMethod::PruneLowRank, Some(f)) => f * n,
            (CompressMethod::PruneLowRank, None) => {
                default_split_removal(ratio, limits.experts, targeted)
            }
            _ => ratio * n * worth,
        };
        let remove = match (pruning.method, pruning.fraction) {
            // The default split prunes what routing allows and factors the rest.
            (CompressMethod::PruneLowRank, None) => limits.largest_valid_removal(wanted),
            _ => limits.checked_removal(wanted, checkpoint)?,
        };
        if remove == 0 && pruning.method == CompressMethod::PruneLowRank {
            return Ok(None);
        }
        let kept = limits.experts - remove;
        let lowrank_ratio = match pruning.method {
            CompressMethod::PruneLowRank => Some(lowrank_ratio_after(
                ratio,
                limits.experts,
                remove,
                targeted,
            )?),
            _ => None,
        };
        Ok(Some(Self {
            rule: PruneRule {
                saliency: pruning.saliency,
                remove,
                groups: limits.groups,
            },
            original_experts: limits.experts,
            kept_experts: kept,
            lowrank_ratio,
        }))
    }
}

/// The ratio at which the `n − m` kept experts' targeted matrices are factored so that pruning
/// `m` of `n` and factoring remove `ρ·n` experts' worth of the `t` targeted matrices in all:
/// `ρ' = (ρ·n − (3/t)·m)/(n − m)` (a pruned expert removes all 3 of its matrices; for gate/up,
/// `t = 2`, that is `1.5·m`).
pub fn lowrank_ratio_after(
    ratio: f64,
    experts: usize,
    removed: usize,
    targeted: usize,
) -> Result<f64> {
    let (n, m) = (experts as f64, removed as f64);
    let per_pruned = 3.0 / targeted.max(1) as f64;
    let rest = (ratio * n - per_pruned * m) / (n - m);
    if rest < 0.0 {
        return Err(Error::InvalidArgument(format!(
            "--prune-fraction removes {removed} of {experts} experts, more than --ratio {ratio} \
             pays for ({:.2} experts' worth): lower --prune-fraction or use --method prune",
            ratio * n / per_pruned
        )));
    }
    Ok(rest)
}

/// The layout of a pruned layer: the same names, `kept` experts.
pub fn pruned_layout(layout: &ExpertLayout, kept: usize) -> ExpertLayout {
    ExpertLayout {
        num_experts: kept,
        ..layout.clone()
    }
}

/// Keeps the router rows (and DeepSeek's `e_score_correction_bias` entries) of the kept experts,
/// in their new order, in a layer's tensors as copied from the checkpoint.
pub fn slice_router(
    tensors: &mut HashMap<String, Tensor>,
    block: &str,
    kept: &[usize],
    original_experts: usize,
) -> Result<()> {
    let index = kept_index(kept)?;
    for name in [
        format!("{block}.gate.weight"),
        format!("{block}.gate.e_score_correction_bias"),
    ] {
        if let Some(tensor) = tensors.get_mut(&name) {
            if tensor.dim(0)? != original_experts {
                return Err(Error::InvalidArgument(format!(
                    "`{name}` has {} rows, expected one per expert ({original_experts})",
                    tensor.dim(0)?
                )));
            }
            *tensor = tensor.index_select(&index, 0)?;
        }
    }
    Ok(())
}

/// The kept experts' original indices as a u32 index tensor on the CPU.
fn kept_index(kept: &[usize]) -> Result<Tensor> {
    let values: Vec<u32> = kept.iter().map(|&e| e as u32).collect();
    Ok(Tensor::from_vec(
        values,
        kept.len(),
        &candle_core::Device::Cpu,
    )?)
}

/// The tensors of a pruned layer's kept experts as stored: per-expert tensors (with their FP8
/// scales) copied byte for byte under the new index, fused 3-D tensors cut to the kept experts.
pub fn kept_expert_tensors(
    checkpoint: &Checkpoint,
    experts: &LayerExperts,
) -> Result<HashMap<String, Tensor>> {
    let (source, pruned) = (experts.source_layout(), experts.layout);
    let mut tensors = HashMap::new();
    for matrix in ExpertMatrix::ALL {
        if source.is_fused(checkpoint, matrix) {
            let name = source.fused_name(matrix);
            if tensors.contains_key(&name) {
                continue;
            }
            let kept: Vec<usize> = (0..pruned.num_experts)
                .map(|e| experts.source_index(e))
                .collect();
            let index = kept_index(&kept)?;
            for name in [name.clone(), fp8::scale_name(&name)] {
                if checkpoint.contains(&name) {
                    let stored = checkpoint.load_verbatim(&name, "pruned experts")?;
                    tensors.insert(name, stored.index_select(&index, 0)?);
                }
            }
            continue;
        }
        for expert in 0..pruned.num_experts {
            let from = source.dense_name(experts.source_index(expert), matrix);
            let to = pruned.dense_name(expert, matrix);
            for (from, to) in [
                (from.clone(), to.clone()),
                (fp8::scale_name(&from), fp8::scale_name(&to)),
            ] {
                if checkpoint.contains(&from) {
                    tensors.insert(to, checkpoint.load_verbatim(&from, "pruned experts")?);
                }
            }
        }
    }
    Ok(tensors)
}

/// Keys of `config.json` that hold the routed-expert count, per family.
const EXPERT_COUNT_KEYS: [&str; 3] = ["num_experts", "num_local_experts", "n_routed_experts"];

/// The `config.json` changes of a pruned output.
#[derive(Debug, Clone)]
pub struct PrunedConfig {
    /// Experts per layer after pruning.
    pub kept_experts: usize,
    /// Whether the output also holds factors (keeps its `compression` record).
    pub factored: bool,
    /// The `pruning` section: the saliency, the original count and each layer's kept experts.
    pub summary: serde_json::Value,
}

impl PrunedConfig {
    /// The changes for `plan` with the layers' `pruning` reports.
    pub fn new(plan: &PrunePlan, layers: &[(usize, &LayerPruning)]) -> Self {
        let kept: serde_json::Map<String, serde_json::Value> = layers
            .iter()
            .map(|(layer, p)| (layer.to_string(), serde_json::json!(p.kept)))
            .collect();
        Self {
            kept_experts: plan.kept_experts,
            factored: plan.lowrank_ratio.is_some(),
            summary: serde_json::json!({
                "saliency": plan.rule.saliency.name(),
                "original_num_experts": plan.original_experts,
                "kept_experts": kept,
            }),
        }
    }

    /// Sets the expert count under every key the family uses, adds the `pruning` section and,
    /// for a pure pruning, drops the `compression` record (the output is a normal checkpoint).
    pub fn edit(&self, config: &mut serde_json::Value, with_record: bool) {
        let Some(fields) = config.as_object_mut() else {
            return;
        };
        for key in EXPERT_COUNT_KEYS {
            if fields.contains_key(key) {
                fields.insert(key.into(), self.kept_experts.into());
            }
        }
        if !(self.factored && with_record) {
            fields.remove(crate::format::COMPRESSION_KEY);
        }
        fields.insert("pruning".into(), self.summary.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(saliency: Saliency, remove: usize, groups: usize) -> PruneRule {
        PruneRule {
            saliency,
            remove,
            groups,
        }
    }

    #[test]
    fn reap_is_the_mean_of_gate_value_times_output_norm_over_routed_tokens() {
        use crate::models::routing::{ExpertDispatch, Routing, RoutingRule};
        use candle_core::Device;
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

    #[test]
    fn the_default_split_prunes_half_the_budget_up_to_an_eighth_of_the_experts() {
        // Half of ρ·n·t/3: 0.24·16·3/6 = 1.92 of 16 (under the cap of 2).
        assert!((default_split_removal(0.24, 16, 3) - 1.92).abs() < 1e-12);
        // 0.44·32·3/6 = 7.04 of 32 is capped at 4; gate/up only counts 2 of 3 matrices.
        assert_eq!(default_split_removal(0.44, 32, 3), 4.0);
        assert!((default_split_removal(0.3, 16, 2) - 1.6).abs() < 1e-12);
        assert_eq!(default_split_removal(0.9, 8, 3), 1.0);
    }

    #[test]
    fn the_default_split_lowers_a_removal_routing_cannot_run() {
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

    #[test]
    fn the_lowrank_ratio_after_pruning_keeps_the_budget() {
        // 16 experts of 3·p·d; ρ = 0.4 removes 0.4·16·2 = 12.8 gate/up matrices' worth.
        let rest = lowrank_ratio_after(0.4, 16, 2, 2).unwrap();
        let removed = 2.0 * 3.0 + rest * 14.0 * 2.0;
        assert!((removed - 12.8).abs() < 1e-9, "{removed}");
        assert!(lowrank_ratio_after(0.2, 16, 4, 2).is_err());
        // gate, up and down targeted: ρ = 0.4 removes 0.4·16·3 = 19.2 matrices' worth.
        let rest = lowrank_ratio_after(0.4, 16, 3, 3).unwrap();
        let removed = 3.0 * 3.0 + rest * 13.0 * 3.0;
        assert!((removed - 19.2).abs() < 1e-9, "{removed}");
    }

    #[test]
    fn the_config_gets_the_new_count_under_the_family_key_only() {
        let plan = PrunePlan {
            rule: rule(Saliency::Reap, 4, 1),
            original_experts: 16,
            kept_experts: 12,
            lowrank_ratio: None,
        };
        let mut config = serde_json::json!({"num_local_experts": 16, "compression": {}});
        PrunedConfig::new(&plan, &[]).edit(&mut config, true);
        assert_eq!(config["num_local_experts"], 12);
        assert!(config.get("num_experts").is_none() && config.get("compression").is_none());
        assert_eq!(config["pruning"]["original_num_experts"], 16);
    }
}
