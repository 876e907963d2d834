//! The paper's allocation (arXiv 2602.09316 §3.3): importance scores and ranks under a
//! parameter budget,
//! from a layer's [`LayerAnalysis`] (or every layer's, with a model-wide budget) to a [`RankPlan`].
//!
//! A group of `k` experts, each a `p × d` matrix, factored at rank `K` stores `k` coefficient
//! blocks `A_i` (`p × K`) and one basis `B_g` (`K × d`): `K·(k·p + d)` parameters against
//! `k·p·d` dense. Ranks are spent in proportion to a per-group score, clamped to
//! `[1, min(k·p, d)]`, and rounded by largest remainder so the budget is met to within one
//! rank's cost.

use serde::{Deserialize, Serialize};

pub use super::analyse::GroupShape;
use super::analyse::{normalize, LayerAnalysis};
use crate::checkpoint::experts::ExpertMatrix;
use crate::{Error, Result};

/// What the paper's allocation reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AllocationSettings {
    /// Fraction ρ of the groups' parameters removed.
    pub ratio: f64,
    /// Weight ξ of information density in the fused score.
    pub xi: f64,
    /// The score.
    pub policy: Allocation,
    /// Keep a group dense when factoring it would not save parameters.
    pub dense_fallback: bool,
    /// Reserve part of each group's budget for the sparse-projection residual.
    pub residual: bool,
    /// Residual size as a fraction of each group's dense parameters.
    pub residual_fraction: f64,
}

/// The ranks of one matrix type's groups in one layer, with the signals that chose them.
#[derive(Debug, Clone)]
pub struct MatrixPlan {
    /// The matrix type.
    pub matrix: ExpertMatrix,
    /// Normalised density `E_g` the scores used.
    pub density: Vec<f64>,
    /// Fused score `C_g`.
    pub scores: Vec<f64>,
    /// Residual parameters reserved per group (0 without a residual).
    pub reserved: Vec<usize>,
    /// Rank or dense, per group.
    pub allocations: Vec<GroupAllocation>,
}

/// The allocate stage's output for one layer.
#[derive(Debug, Clone)]
pub struct RankPlan {
    /// Decoder layer index.
    pub layer: usize,
    /// Per targeted matrix type, in the analysis' order.
    pub matrices: Vec<MatrixPlan>,
}

fn reserved_residual(options: &AllocationSettings, shapes: &[GroupShape]) -> Vec<usize> {
    shapes
        .iter()
        .map(|s| {
            if options.residual {
                ((s.dense_params() as f64) * options.residual_fraction)
                    .round()
                    .max(1.0) as usize
            } else {
                0
            }
        })
        .collect()
}

/// Scores and ranks for groups whose signals are already gathered (one layer, or the model).
fn plan_groups(
    options: &AllocationSettings,
    matrix: ExpertMatrix,
    effective_ranks: &[f64],
    frequency: &[f64],
    shapes: &[GroupShape],
) -> Result<MatrixPlan> {
    let density = normalize(effective_ranks);
    let scores = importance_scores(options.policy, &density, frequency, options.xi);
    let reserved = reserved_residual(options, shapes);
    let budget = budget_for_ratio(shapes, options.ratio);
    let allocations = allocate_ranks(shapes, &scores, budget, &reserved, options.dense_fallback)?;
    Ok(MatrixPlan {
        matrix,
        density,
        scores,
        reserved,
        allocations,
    })
}

/// Allocates one layer's budget: each matrix type keeps `(1−ρ)` of its own parameters.
pub fn allocate_layer(analysis: &LayerAnalysis, options: &AllocationSettings) -> Result<RankPlan> {
    let matrices = analysis
        .matrices
        .iter()
        .map(|m| {
            plan_groups(
                options,
                m.matrix,
                &m.effective_ranks,
                &analysis.group_frequency,
                &m.shapes,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RankPlan {
        layer: analysis.layer,
        matrices,
    })
}

/// Allocates one budget per matrix type over all layers (`--budget-scope model`): densities are
/// normalised over every group of the model and frequencies divided by the number of layers, so
/// layers compete for `(1−ρ)` of all their parameters.
pub fn allocate_model(
    analyses: &[LayerAnalysis],
    options: &AllocationSettings,
) -> Result<Vec<RankPlan>> {
    let layers = analyses.len().max(1) as f64;
    let mut plans: Vec<RankPlan> = analyses
        .iter()
        .map(|a| RankPlan {
            layer: a.layer,
            matrices: Vec::new(),
        })
        .collect();
    let Some(first) = analyses.first() else {
        return Ok(plans);
    };
    for (slot, matrix) in first.matrices.iter().map(|m| m.matrix).enumerate() {
        let (mut effective, mut frequency, mut shapes) = (Vec::new(), Vec::new(), Vec::new());
        for analysis in analyses {
            let m = &analysis.matrices[slot];
            effective.extend_from_slice(&m.effective_ranks);
            frequency.extend(analysis.group_frequency.iter().map(|f| f / layers));
            shapes.extend_from_slice(&m.shapes);
        }
        let whole = plan_groups(options, matrix, &effective, &frequency, &shapes)?;
        let mut offset = 0;
        for (plan, analysis) in plans.iter_mut().zip(analyses) {
            let n = analysis.matrices[slot].shapes.len();
            let range = offset..offset + n;
            plan.matrices.push(MatrixPlan {
                matrix,
                density: whole.density[range.clone()].to_vec(),
                scores: whole.scores[range.clone()].to_vec(),
                reserved: whole.reserved[range.clone()].to_vec(),
                allocations: whole.allocations[range].to_vec(),
            });
            offset += n;
        }
    }
    Ok(plans)
}

crate::named_enum! {
    /// Which signal drives the paper's per-group rank allocation.
    pub enum Allocation ("allocation") {
        /// Every group gets the same score (equal ranks for equal shapes).
        Uniform = "uniform": "Every group gets the same score (equal ranks for equal shapes)",
        /// Group routing frequency `F_g` alone.
        Frequency = "frequency": "Group routing frequency `F_g` alone",
        /// Normalised effective rank `E_g` alone.
        Density = "density": "Normalised effective rank `E_g` alone",
        /// The fused RFID score `ξ·E_g + (1−ξ)·F_g`.
        Rfid = "rfid": "The fused RFID score `ξ·E_g + (1−ξ)·F_g`",
    }
}

/// Per-group importance score `C_g` under `policy`, one per group.
///
/// `density` is the normalised effective rank `E_g`, `frequency` the group frequency `F_g`,
/// `xi` the density weight ξ of the fused score. Uniform gives `1/m` everywhere. When the two
/// slices differ in length the shorter is read as zero-padded.
pub fn importance_scores(
    policy: Allocation,
    density: &[f64],
    frequency: &[f64],
    xi: f64,
) -> Vec<f64> {
    let m = density.len().max(frequency.len());
    let at = |v: &[f64], g: usize| v.get(g).copied().unwrap_or(0.0);
    (0..m)
        .map(|g| match policy {
            Allocation::Uniform => 1.0 / m as f64,
            Allocation::Frequency => at(frequency, g),
            Allocation::Density => at(density, g),
            Allocation::Rfid => xi * at(density, g) + (1.0 - xi) * at(frequency, g),
        })
        .collect()
}

/// Allocation for one group: a factored rank, or the dense original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupAllocation {
    /// Rank of the shared basis (0 when `dense`).
    pub rank: usize,
    /// Whether the group is kept dense because factoring would not save parameters.
    pub dense: bool,
}

impl GroupAllocation {
    /// Parameters this allocation stores for a group of `shape` (residual not included).
    pub fn params(&self, shape: &GroupShape) -> usize {
        if self.dense {
            shape.dense_params()
        } else {
            self.rank * shape.rank_cost()
        }
    }
}

/// Parameter budget `(1−ρ)·Σ k·p·d` for removing the fraction `ratio` = ρ of the groups' parameters.
pub fn budget_for_ratio(groups: &[GroupShape], ratio: f64) -> f64 {
    let dense: usize = groups.iter().map(GroupShape::dense_params).sum();
    (1.0 - ratio) * dense as f64
}

/// Allocate ranks to groups under a parameter `budget` (docs/METHOD.md §1).
///
/// `scores` (one per group, finite, ≥ 0) set the proportions: `K_g = t·C_g`, clamped to
/// `[1, max_rank]`, with `t` chosen so the clamped ranks spend `budget − Σ reserved`
/// (`reserved` holds per-group residual parameters; an empty slice means none). Ranks are then
/// floored and the leftover handed out one rank at a time by largest fractional remainder while
/// it fits; finally one more rank is added when overshooting by it lands nearer the budget than
/// stopping short, so the total is within half a rank's cost of the available budget unless
/// every group is at its maximum rank. Zero-score groups keep rank 1 and only receive budget once every
/// positive-score group is at its maximum; if all scores are zero they are treated as equal.
///
/// With `dense_fallback`, a group whose rank exceeds its break-even rank, or whose share of the
/// budget before rounding would pay for the dense matrix, is kept dense (rank 0, `k·p·d`
/// parameters) and the parameters this frees are re-spread over the other groups, repeating
/// until no further group switches.
///
/// Errors when the lengths disagree, a score or the budget is not finite or a score negative,
/// a shape has a zero dimension, or the budget cannot pay rank 1 in every group.
pub fn allocate_ranks(
    groups: &[GroupShape],
    scores: &[f64],
    budget: f64,
    reserved: &[usize],
    dense_fallback: bool,
) -> Result<Vec<GroupAllocation>> {
    let n = groups.len();
    if scores.len() != n {
        return Err(Error::InvalidArgument(format!(
            "allocate_ranks: {} scores for {n} groups",
            scores.len()
        )));
    }
    if !reserved.is_empty() && reserved.len() != n {
        return Err(Error::InvalidArgument(format!(
            "allocate_ranks: {} reserved sizes for {n} groups",
            reserved.len()
        )));
    }
    if !budget.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "allocate_ranks: budget must be finite, got {budget}"
        )));
    }
    if let Some((g, s)) = scores
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s >= 0.0))
    {
        return Err(Error::InvalidArgument(format!(
            "allocate_ranks: score of group {g} must be finite and non-negative, got {s}"
        )));
    }
    if let Some((g, shape)) = groups
        .iter()
        .enumerate()
        .find(|(_, s)| s.experts == 0 || s.rows_per_expert == 0 || s.cols == 0)
    {
        return Err(Error::InvalidArgument(format!(
            "allocate_ranks: group {g} has an empty shape {shape:?}"
        )));
    }
    let available = budget - reserved.iter().sum::<usize>() as f64;
    let floor_cost: usize = groups.iter().map(GroupShape::rank_cost).sum();
    if available < floor_cost as f64 {
        return Err(Error::InvalidArgument(format!(
            "allocate_ranks: budget {budget:.0} minus residual {} leaves {available:.0} \
             parameters, less than the {floor_cost} that rank 1 in all {n} groups costs",
            reserved.iter().sum::<usize>()
        )));
    }

    let mut dense = vec![false; n];
    loop {
        let active: Vec<usize> = (0..n).filter(|&g| !dense[g]).collect();
        let dense_cost: usize = (0..n)
            .filter(|&g| dense[g])
            .map(|g| groups[g].dense_params())
            .sum();
        let shapes: Vec<GroupShape> = active.iter().map(|&g| groups[g]).collect();
        let active_scores: Vec<f64> = active.iter().map(|&g| scores[g]).collect();
        let (ranks, target) = round_ranks(&shapes, &active_scores, available - dense_cost as f64);

        let mut switched = false;
        if dense_fallback {
            for (i, &g) in active.iter().enumerate() {
                let shape = &groups[g];
                let share = target[i] * shape.rank_cost() as f64;
                if ranks[i] > shape.break_even_rank() || share >= shape.dense_params() as f64 {
                    dense[g] = true;
                    switched = true;
                }
            }
        }
        if !switched {
            let mut out = vec![
                GroupAllocation {
                    rank: 0,
                    dense: true
                };
                n
            ];
            for (&g, &rank) in active.iter().zip(&ranks) {
                out[g] = GroupAllocation { rank, dense: false };
            }
            return Ok(out);
        }
    }
}

/// Continuous ranks in `[1, max_rank]` spending `available` (see [`allocate_ranks`]).
fn continuous_ranks(shapes: &[GroupShape], scores: &[f64], available: f64) -> Vec<f64> {
    let n = shapes.len();
    let mut ranks = vec![1.0; n];
    let positive: Vec<usize> = (0..n).filter(|&g| scores[g] > 0.0).collect();
    let zero: Vec<usize> = (0..n).filter(|&g| scores[g] <= 0.0).collect();
    if positive.is_empty() {
        let equal = vec![1.0; n];
        let all: Vec<usize> = (0..n).collect();
        water_fill(shapes, &equal, &all, available, &mut ranks);
        return ranks;
    }
    let zero_cost: f64 = zero.iter().map(|&g| shapes[g].rank_cost() as f64).sum();
    let leftover = water_fill(shapes, scores, &positive, available - zero_cost, &mut ranks);
    if leftover > 0.0 && !zero.is_empty() {
        // Every positive-score group is saturated: spend the rest evenly on the others.
        let equal = vec![1.0; n];
        water_fill(shapes, &equal, &zero, zero_cost + leftover, &mut ranks);
    }
    ranks
}

/// Set `ranks[g] = clamp(t·scores[g], 1, max_rank)` for `g ∈ members`, with `t` spending
/// `available` on them; returns what could not be spent (all members at maximum rank).
fn water_fill(
    shapes: &[GroupShape],
    scores: &[f64],
    members: &[usize],
    available: f64,
    ranks: &mut [f64],
) -> f64 {
    let spend = |t: f64| -> f64 {
        members
            .iter()
            .map(|&g| {
                let s = &shapes[g];
                (t * scores[g]).clamp(1.0, s.max_rank() as f64) * s.rank_cost() as f64
            })
            .sum()
    };
    // Beyond `hi` every member is clamped at its maximum.
    let hi_t = members
        .iter()
        .map(|&g| shapes[g].max_rank() as f64 / scores[g])
        .fold(0.0, f64::max);
    let full = spend(hi_t);
    let t = if full <= available {
        hi_t
    } else {
        // The spend is continuous and non-decreasing in t; bisect to machine precision.
        let (mut lo, mut hi) = (0.0, hi_t);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if mid <= lo || mid >= hi {
                break;
            }
            if spend(mid) <= available {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    };
    for &g in members {
        ranks[g] = (t * scores[g]).clamp(1.0, shapes[g].max_rank() as f64);
    }
    (available - spend(t)).max(0.0)
}

/// Integer ranks from the continuous ones: floor, then largest remainder while it fits.
///
/// Returns the integer ranks and the continuous targets they were rounded from.
fn round_ranks(shapes: &[GroupShape], scores: &[f64], available: f64) -> (Vec<usize>, Vec<f64>) {
    let n = shapes.len();
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    let target = continuous_ranks(shapes, scores, available);
    let mut ranks: Vec<usize> = (0..n)
        .map(|g| (target[g].floor() as usize).clamp(1, shapes[g].max_rank()))
        .collect();
    let spent: usize = (0..n).map(|g| ranks[g] * shapes[g].rank_cost()).sum();
    let mut leftover = available - spent as f64;

    // Largest remainder first; ties to the higher score, then the lower index.
    let by_deficit = |ranks: &[usize], a: usize, b: usize| {
        let da = target[a] - ranks[a] as f64;
        let db = target[b] - ranks[b] as f64;
        db.total_cmp(&da)
            .then(scores[b].total_cmp(&scores[a]))
            .then(a.cmp(&b))
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| by_deficit(&ranks, a, b));
    for &g in &order {
        let cost = shapes[g].rank_cost() as f64;
        if ranks[g] < shapes[g].max_rank() && cost <= leftover {
            ranks[g] += 1;
            leftover -= cost;
        }
    }
    // With unequal shapes a cheaper group may still fit after one pass.
    loop {
        let best = (0..n)
            .filter(|&g| {
                ranks[g] < shapes[g].max_rank() && shapes[g].rank_cost() as f64 <= leftover
            })
            .min_by(|&a, &b| by_deficit(&ranks, a, b));
        match best {
            Some(g) => {
                ranks[g] += 1;
                leftover -= shapes[g].rank_cost() as f64;
            }
            None => break,
        }
    }
    // Round to the nearest total: one more rank when overshooting by it misses the budget by less
    // than stopping short does (so the budget is met to within half a rank's cost).
    let nearest = (0..n)
        .filter(|&g| {
            ranks[g] < shapes[g].max_rank() && (shapes[g].rank_cost() as f64) - leftover < leftover
        })
        .min_by(|&a, &b| by_deficit(&ranks, a, b));
    if let Some(g) = nearest {
        ranks[g] += 1;
    }
    (ranks, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(k: usize, p: usize, d: usize) -> GroupShape {
        GroupShape {
            experts: k,
            rows_per_expert: p,
            cols: d,
        }
    }

    /// `FromStr` accepts exactly the names `Display` and serde write, and refuses anything else
    /// with a message listing the valid names.
    fn assert_names_round_trip<T>(values: &[T], valid: &str)
    where
        T: std::str::FromStr<Err = Error>
            + std::fmt::Display
            + Serialize
            + PartialEq
            + std::fmt::Debug,
    {
        for value in values {
            let name = value.to_string();
            assert_eq!(&name.parse::<T>().unwrap(), value);
            assert_eq!(serde_json::to_string(value).unwrap(), format!("\"{name}\""));
            assert!(
                name.to_uppercase().parse::<T>().is_err(),
                "{name} in capitals"
            );
        }
        let message = "nonsense".parse::<T>().unwrap_err().to_string();
        assert!(
            message.contains("`nonsense`") && message.ends_with(valid),
            "{message}"
        );
    }

    #[test]
    fn option_enums_parse_their_lowercase_names() {
        use crate::pipeline::methods::lowrank::{FactorizerKind, RankAllocation};
        use crate::pipeline::BudgetScope;
        assert_names_round_trip(Allocation::ALL, "uniform, frequency, density, rfid");
        assert_names_round_trip(
            RankAllocation::ALL,
            "solver, uniform, frequency, density, rfid",
        );
        assert_names_round_trip(FactorizerKind::ALL, "svd, basis");
        assert_names_round_trip(BudgetScope::ALL, "layer, model");
    }

    fn total(groups: &[GroupShape], alloc: &[GroupAllocation]) -> usize {
        groups.iter().zip(alloc).map(|(s, a)| a.params(s)).sum()
    }

    /// The total is the nearest reachable one: over budget by less than half the dearest rank,
    /// and what is left unspent cannot buy one more rank anywhere.
    fn assert_budget_met(groups: &[GroupShape], alloc: &[GroupAllocation], available: f64) {
        let spent = total(groups, alloc) as f64;
        let dearest = groups
            .iter()
            .zip(alloc)
            .filter(|(_, a)| !a.dense)
            .map(|(s, _)| s.rank_cost())
            .max()
            .unwrap_or(0) as f64;
        assert!(
            spent <= available + dearest / 2.0 + 1e-6,
            "spent {spent} overshoots available {available} by more than half a rank ({dearest})"
        );
        let cheapest_open = groups
            .iter()
            .zip(alloc)
            .filter(|(s, a)| !a.dense && a.rank < s.max_rank())
            .map(|(s, _)| s.rank_cost())
            .min();
        if let Some(cost) = cheapest_open {
            assert!(
                available - spent < cost as f64,
                "left {} unspent, one rank costs {cost}",
                available - spent
            );
        }
    }

    #[test]
    fn shape_arithmetic() {
        let s = shape(4, 768, 2048);
        assert_eq!(s.dense_params(), 4 * 768 * 2048);
        assert_eq!(s.rank_cost(), 4 * 768 + 2048);
        assert_eq!(s.max_rank(), 2048);
        let k = s.break_even_rank();
        assert!(k * s.rank_cost() < s.dense_params());
        assert!((k + 1) * s.rank_cost() >= s.dense_params());
        // 2·(2+2) = 8 = 2·2·2: rank 2 saves nothing, so break-even is 1.
        assert_eq!(shape(1, 2, 2).break_even_rank(), 0);
        assert_eq!(shape(2, 2, 2).break_even_rank(), 1);
    }

    #[test]
    fn importance_scores_follow_policy() {
        let e = [0.5, 0.3, 0.2];
        let f = [0.1, 0.1, 0.8];
        assert_eq!(
            importance_scores(Allocation::Uniform, &e, &f, 0.8),
            vec![1.0 / 3.0; 3]
        );
        assert_eq!(
            importance_scores(Allocation::Frequency, &e, &f, 0.8),
            f.to_vec()
        );
        assert_eq!(
            importance_scores(Allocation::Density, &e, &f, 0.8),
            e.to_vec()
        );
        let c = importance_scores(Allocation::Rfid, &e, &f, 0.8);
        for g in 0..3 {
            assert!((c[g] - (0.8 * e[g] + 0.2 * f[g])).abs() < 1e-15);
        }
        assert_eq!(importance_scores(Allocation::Rfid, &e, &f, 1.0), e.to_vec());
    }

    #[test]
    fn allocation_names_round_trip_through_serde() {
        let json = serde_json::to_string(&Allocation::Rfid).unwrap();
        assert_eq!(json, "\"rfid\"");
        let back: Allocation = serde_json::from_str("\"density\"").unwrap();
        assert_eq!(back, Allocation::Density);
        assert_eq!(Allocation::Frequency.to_string(), "frequency");
    }

    #[test]
    fn budget_is_met_within_one_rank_and_ranks_in_range() {
        let groups: Vec<GroupShape> = (0..8).map(|_| shape(4, 96, 128)).collect();
        let scores = [0.3, 0.05, 0.2, 0.1, 0.0, 0.15, 0.12, 0.08];
        for ratio in [0.2, 0.4, 0.6, 0.9] {
            let budget = budget_for_ratio(&groups, ratio);
            let alloc = allocate_ranks(&groups, &scores, budget, &[], false).unwrap();
            assert_budget_met(&groups, &alloc, budget);
            for (s, a) in groups.iter().zip(&alloc) {
                assert!(!a.dense);
                assert!(a.rank >= 1 && a.rank <= s.max_rank());
            }
        }
    }

    #[test]
    fn budget_met_with_unequal_shapes_and_reserved() {
        let groups = vec![
            shape(4, 64, 100),
            shape(2, 64, 100),
            shape(3, 50, 70),
            shape(1, 30, 200),
        ];
        let scores = [0.4, 0.1, 0.3, 0.2];
        let reserved = [500, 200, 300, 100];
        let budget = budget_for_ratio(&groups, 0.5);
        let alloc = allocate_ranks(&groups, &scores, budget, &reserved, false).unwrap();
        assert_budget_met(&groups, &alloc, budget - 1100.0);
    }

    #[test]
    fn ranks_are_monotone_in_score_for_equal_shapes() {
        let groups: Vec<GroupShape> = (0..10).map(|_| shape(4, 32, 64)).collect();
        let scores: Vec<f64> = (0..10)
            .map(|i| ((i * 7) % 10) as f64 * 0.013 + 0.001)
            .collect();
        for ratio in [0.3, 0.5, 0.7, 0.8] {
            let budget = budget_for_ratio(&groups, ratio);
            let alloc = allocate_ranks(&groups, &scores, budget, &[], false).unwrap();
            for a in 0..10 {
                for b in 0..10 {
                    if scores[a] > scores[b] {
                        assert!(alloc[a].rank >= alloc[b].rank, "ratio {ratio}: {alloc:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn uniform_scores_give_equal_ranks() {
        let groups: Vec<GroupShape> = (0..7).map(|_| shape(4, 48, 80)).collect();
        let scores = importance_scores(Allocation::Uniform, &[0.0; 7], &[0.0; 7], 0.8);
        let budget = budget_for_ratio(&groups, 0.55);
        let alloc = allocate_ranks(&groups, &scores, budget, &[], false).unwrap();
        let lo = alloc.iter().map(|a| a.rank).min().unwrap();
        let hi = alloc.iter().map(|a| a.rank).max().unwrap();
        assert!(hi - lo <= 1, "{alloc:?}");
        assert_budget_met(&groups, &alloc, budget);
        // All-zero scores are treated as equal, not as "nothing to spend".
        let zero = allocate_ranks(&groups, &[0.0; 7], budget, &[], false).unwrap();
        assert_eq!(zero, alloc);
    }

    #[test]
    fn dominant_group_is_clamped_and_surplus_re_spread() {
        let groups: Vec<GroupShape> = (0..4).map(|_| shape(2, 16, 40)).collect();
        // max_rank = 32; a proportional share would give group 0 far more.
        let scores = [100.0, 1.0, 1.0, 2.0];
        let budget = budget_for_ratio(&groups, 0.3);
        let alloc = allocate_ranks(&groups, &scores, budget, &[], false).unwrap();
        assert_eq!(alloc[0].rank, 32);
        assert!(alloc[3].rank >= alloc[1].rank);
        assert_budget_met(&groups, &alloc, budget);
        // The freed budget went to the others: proportional ratios hold among them (±1).
        let r1 = alloc[1].rank as f64;
        let r3 = alloc[3].rank as f64;
        assert!((r3 - 2.0 * r1).abs() <= 2.0, "{alloc:?}");
    }

    #[test]
    fn zero_score_groups_still_get_rank_one() {
        let groups: Vec<GroupShape> = (0..5).map(|_| shape(4, 64, 64)).collect();
        let scores = [0.5, 0.5, 0.0, 0.0, 0.0];
        let budget = budget_for_ratio(&groups, 0.8);
        let alloc = allocate_ranks(&groups, &scores, budget, &[], false).unwrap();
        for a in &alloc[2..] {
            assert_eq!(a.rank, 1);
        }
        assert!(alloc[0].rank > 1);
        assert_budget_met(&groups, &alloc, budget);
    }

    #[test]
    fn saturated_positive_groups_leave_the_rest_to_zero_score_groups() {
        let groups: Vec<GroupShape> = (0..3).map(|_| shape(1, 8, 8)).collect();
        let budget = budget_for_ratio(&groups, 0.0);
        let alloc = allocate_ranks(&groups, &[1.0, 0.0, 0.0], budget, &[], false).unwrap();
        assert_eq!(alloc[0].rank, 8);
        assert_eq!(alloc[1].rank, alloc[2].rank);
        assert!(alloc[1].rank > 1);
        assert_budget_met(&groups, &alloc, budget);
    }

    #[test]
    fn dense_fallback_keeps_groups_dense_near_zero_ratio() {
        let groups: Vec<GroupShape> = (0..4).map(|_| shape(4, 32, 64)).collect();
        let scores = [0.4, 0.3, 0.2, 0.1];
        let budget = budget_for_ratio(&groups, 0.0);
        let alloc = allocate_ranks(&groups, &scores, budget, &[], true).unwrap();
        assert!(alloc.iter().all(|a| a.dense && a.rank == 0), "{alloc:?}");
        assert_eq!(total(&groups, &alloc) as f64, budget);
        // Without the fallback the same budget buys the maximum rank, which costs more than dense.
        let plain = allocate_ranks(&groups, &scores, budget, &[], false).unwrap();
        assert!(plain.iter().all(|a| !a.dense));

        // At a small ratio only the high-score groups pass break-even; their savings go to the rest.
        let budget = budget_for_ratio(&groups, 0.1);
        let plain = allocate_ranks(&groups, &scores, budget, &[], false).unwrap();
        let alloc = allocate_ranks(&groups, &scores, budget, &[], true).unwrap();
        assert!(alloc[0].dense);
        for (g, (a, p)) in alloc.iter().zip(&plain).enumerate() {
            if !a.dense {
                assert!(a.rank <= groups[g].break_even_rank());
                assert!(a.rank >= p.rank);
            }
        }
        let dearest = groups.iter().map(GroupShape::rank_cost).max().unwrap() as f64;
        assert!(total(&groups, &alloc) as f64 <= budget + dearest / 2.0);
    }

    #[test]
    fn random_problems_respect_budget_and_bounds() {
        let mut rng = crate::linalg::tests::TestRng::new(7);
        for case in 0..300 {
            let n = 1 + (rng.next_u64() % 12) as usize;
            let d = 8 + (rng.next_u64() % 120) as usize;
            let p = 4 + (rng.next_u64() % 100) as usize;
            let groups: Vec<GroupShape> = (0..n)
                .map(|_| shape(1 + (rng.next_u64() % 4) as usize, p, d))
                .collect();
            let scores: Vec<f64> = (0..n)
                .map(|_| {
                    if rng.uniform() < 0.2 {
                        0.0
                    } else {
                        rng.uniform()
                    }
                })
                .collect();
            let reserved: Vec<usize> = groups.iter().map(|s| s.dense_params() / 50).collect();
            let ratio = rng.uniform();
            let budget = budget_for_ratio(&groups, ratio);
            let available = budget - reserved.iter().sum::<usize>() as f64;
            let floor: usize = groups.iter().map(GroupShape::rank_cost).sum();
            for fallback in [false, true] {
                let result = allocate_ranks(&groups, &scores, budget, &reserved, fallback);
                if available < floor as f64 {
                    assert!(result.is_err(), "case {case}");
                    continue;
                }
                let alloc = result.unwrap();
                assert_budget_met(&groups, &alloc, available);
                for (s, a) in groups.iter().zip(&alloc) {
                    if a.dense {
                        assert!(fallback && a.rank == 0);
                    } else {
                        assert!(a.rank >= 1 && a.rank <= s.max_rank(), "case {case}: {a:?}");
                        if fallback {
                            assert!(a.rank <= s.break_even_rank(), "case {case}: {a:?} {s:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_budgets_below_rank_one_and_bad_input() {
        let groups: Vec<GroupShape> = (0..3).map(|_| shape(2, 10, 10)).collect();
        let floor = 3.0 * 30.0;
        assert!(allocate_ranks(&groups, &[1.0; 3], floor, &[], false).is_ok());
        assert!(matches!(
            allocate_ranks(&groups, &[1.0; 3], floor - 1.0, &[], false),
            Err(Error::InvalidArgument(_))
        ));
        assert!(allocate_ranks(&groups, &[1.0; 3], floor + 10.0, &[5, 5, 5], false).is_err());
        assert!(allocate_ranks(&groups, &[1.0; 2], 1e6, &[], false).is_err());
        assert!(allocate_ranks(&groups, &[1.0, -1.0, 1.0], 1e6, &[], false).is_err());
        assert!(allocate_ranks(&groups, &[1.0, f64::NAN, 1.0], 1e6, &[], false).is_err());
        assert!(allocate_ranks(&[], &[], 0.0, &[], true).unwrap().is_empty());
    }
}
