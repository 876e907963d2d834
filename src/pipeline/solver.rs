//! The budget solver: given every layer's candidates (what each stores and its estimated error),
//! choose one candidate per unit so that the total size stays within the budget and the total
//! estimated error is least: a multiple-choice knapsack, solved by its Lagrangian relaxation.
//!
//! For a price λ, every unit independently takes the candidate of least `error + λ·size`; the
//! total size falls as λ rises, and the λ where it meets the budget is found by bisection (in
//! log space). The Lagrangian choice at that λ is optimal for the size it reaches; the gap to
//! the budget is then filled greedily with the moves between the two last prices of the
//! bisection, best error saved per byte first, so the result lands within one move of the
//! budget.
//!
//! Structure: per layer, matrix and expert group, the solver takes either one group candidate
//! (a shared basis over the members) or one slot candidate per member. With a coarser
//! [`Granularity`], every slot of a layer's matrix (or of the whole layer) takes the same kind of
//! candidate (same method and variant), as formats with one type per tensor need; group
//! candidates are then not used.

use std::collections::BTreeMap;

use super::options::{BudgetUnit, Granularity};
use super::plan::{LayerOffer, LayerPlan, Unit};
use crate::checkpoint::experts::ExpertMatrix;
use crate::error::{Error, Result};

/// One way to decide a unit: the candidates it takes, with their summed error and size.
#[derive(Debug, Clone)]
struct Option_ {
    error: f64,
    size: f64,
    /// `(layer, candidate index)` pairs.
    picks: Vec<(usize, usize)>,
}

/// A decision the solver makes independently of the others.
#[derive(Debug, Clone)]
enum Decision {
    /// Take one of these options.
    Choice(Vec<Option_>),
    /// One of the group options, or every member choosing among its own options.
    Block {
        group: Vec<Option_>,
        members: Vec<Vec<Option_>>,
    },
}

/// Where a decision landed at one price.
#[derive(Debug, Clone, PartialEq)]
enum Pick {
    Option(usize),
    Members(Vec<usize>),
}

fn best(options: &[Option_], price: f64) -> usize {
    let mut best = 0;
    for (i, o) in options.iter().enumerate().skip(1) {
        let (a, b) = (o.error + price * o.size, &options[best]);
        let current = b.error + price * b.size;
        if a < current || (a == current && o.size < b.size) {
            best = i;
        }
    }
    best
}

/// Cost terms `(error, size)` of a pick.
fn totals(decision: &Decision, pick: &Pick) -> (f64, f64) {
    match (decision, pick) {
        (Decision::Choice(options), Pick::Option(i))
        | (Decision::Block { group: options, .. }, Pick::Option(i)) => {
            (options[*i].error, options[*i].size)
        }
        (Decision::Block { members, .. }, Pick::Members(picks)) => members
            .iter()
            .zip(picks)
            .fold((0.0, 0.0), |(e, s), (options, &i)| {
                (e + options[i].error, s + options[i].size)
            }),
        (Decision::Choice(_), Pick::Members(_)) => (f64::INFINITY, f64::INFINITY),
    }
}

fn decide(decision: &Decision, price: f64) -> Pick {
    match decision {
        Decision::Choice(options) => Pick::Option(best(options, price)),
        Decision::Block { group, members } => {
            // No members (some member has no slot candidate): only the group options.
            let member_picks: Option<Vec<usize>> = members
                .iter()
                .map(|options| (!options.is_empty()).then(|| best(options, price)))
                .collect();
            let members_pick = member_picks
                .filter(|picks| !picks.is_empty())
                .map(Pick::Members);
            let group_pick = (!group.is_empty()).then(|| Pick::Option(best(group, price)));
            match (group_pick, members_pick) {
                (Some(g), Some(m)) => {
                    let (ge, gs) = totals(decision, &g);
                    let (me, ms) = totals(decision, &m);
                    let (gc, mc) = (ge + price * gs, me + price * ms);
                    if gc < mc || (gc == mc && gs < ms) {
                        g
                    } else {
                        m
                    }
                }
                (Some(g), None) => g,
                (None, Some(m)) => m,
                (None, None) => Pick::Members(Vec::new()),
            }
        }
    }
}

/// Every decision's choice at `price`, each capped at its own `caps` entry (a layer held at its
/// floor stops getting cheaper), and their total size.
fn size_at(decisions: &[Decision], caps: &[f64], price: f64) -> (f64, Vec<Pick>) {
    let picks: Vec<Pick> = decisions
        .iter()
        .zip(caps)
        .map(|(d, &cap)| decide(d, price.min(cap)))
        .collect();
    let size = decisions
        .iter()
        .zip(&picks)
        .map(|(d, p)| totals(d, p).1)
        .sum();
    (size, picks)
}

/// A move from the feasible choice towards the infeasible one: `gain` error saved for `cost`
/// more size.
struct Move {
    decision: usize,
    member: Option<usize>,
    to: usize,
    to_members: Option<Vec<usize>>,
    gain: f64,
    cost: f64,
}

fn moves(decisions: &[Decision], feasible: &[Pick], infeasible: &[Pick]) -> Vec<Move> {
    let mut out = Vec::new();
    for (d, ((decision, hi), lo)) in decisions.iter().zip(feasible).zip(infeasible).enumerate() {
        if hi == lo {
            continue;
        }
        match (decision, hi, lo) {
            (Decision::Block { members, .. }, Pick::Members(a), Pick::Members(b)) => {
                for (m, ((options, &from), &to)) in members.iter().zip(a).zip(b).enumerate() {
                    if from != to {
                        out.push(Move {
                            decision: d,
                            member: Some(m),
                            to,
                            to_members: None,
                            gain: options[from].error - options[to].error,
                            cost: options[to].size - options[from].size,
                        });
                    }
                }
            }
            _ => {
                let (he, hs) = totals(decision, hi);
                let (le, ls) = totals(decision, lo);
                let (to, to_members) = match lo {
                    Pick::Option(i) => (*i, None),
                    Pick::Members(m) => (0, Some(m.clone())),
                };
                out.push(Move {
                    decision: d,
                    member: None,
                    to,
                    to_members,
                    gain: he - le,
                    cost: ls - hs,
                });
            }
        }
    }
    out
}

/// The candidates of one layer arranged into decisions.
fn layer_decisions(
    layer: usize,
    offer: &LayerOffer,
    unit: BudgetUnit,
    granularity: Granularity,
) -> Result<Vec<Decision>> {
    let option = |index: usize| {
        let c = &offer.candidates[index];
        Option_ {
            error: c.error,
            size: c.size(unit),
            picks: vec![(layer, index)],
        }
    };
    let mut slots: BTreeMap<(ExpertMatrix, usize), Vec<usize>> = BTreeMap::new();
    let mut groups: BTreeMap<(ExpertMatrix, usize), Vec<usize>> = BTreeMap::new();
    for (i, c) in offer.candidates.iter().enumerate() {
        if !(c.error.is_finite() && c.error >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "layer {}: method `{}` estimated a non-finite or negative error ({}) for {} {:?}",
                offer.layer, c.method, c.error, c.label, c.unit
            )));
        }
        match c.unit {
            Unit::Slot { matrix, expert } => slots.entry((matrix, expert)).or_default().push(i),
            Unit::Group { matrix, group } => groups.entry((matrix, group)).or_default().push(i),
        }
    }
    let missing = |matrix: ExpertMatrix, expert: usize| {
        Error::InvalidArgument(format!(
            "layer {}: no enabled method offers a way to store expert {expert}'s {matrix} \
             (add `keep` to --methods)",
            offer.layer
        ))
    };
    if granularity != Granularity::Expert {
        return tied_decisions(offer, &slots, granularity, &option, &missing);
    }
    let mut decisions = Vec::new();
    for &matrix in &offer.matrices {
        for (g, members) in offer.groups.iter().enumerate() {
            let group: Vec<Option_> = groups
                .get(&(matrix, g))
                .map(|list| list.iter().map(|&i| option(i)).collect())
                .unwrap_or_default();
            let member_options: Vec<Vec<Option_>> = members
                .iter()
                .map(|&e| {
                    slots
                        .get(&(matrix, e))
                        .map(|list| list.iter().map(|&i| option(i)).collect())
                        .unwrap_or_default()
                })
                .collect();
            let complete = member_options.iter().all(|o| !o.is_empty());
            if group.is_empty() && !complete {
                let e = members[member_options
                    .iter()
                    .position(|o| o.is_empty())
                    .unwrap_or(0)];
                return Err(missing(matrix, e));
            }
            decisions.push(Decision::Block {
                group,
                members: if complete { member_options } else { Vec::new() },
            });
        }
    }
    Ok(decisions)
}

/// Decisions where every slot of a layer's matrix (or of the layer) takes the same kind of
/// candidate.
fn tied_decisions(
    offer: &LayerOffer,
    slots: &BTreeMap<(ExpertMatrix, usize), Vec<usize>>,
    granularity: Granularity,
    option: &dyn Fn(usize) -> Option_,
    missing: &dyn Fn(ExpertMatrix, usize) -> Error,
) -> Result<Vec<Decision>> {
    let sets: Vec<Vec<ExpertMatrix>> = match granularity {
        Granularity::Layer => vec![offer.matrices.clone()],
        _ => offer.matrices.iter().map(|&m| vec![m]).collect(),
    };
    let experts: Vec<usize> = offer.groups.iter().flatten().copied().collect();
    let mut decisions = Vec::new();
    for set in sets {
        // Kind → the candidate of that kind for every slot of the set, in slot order.
        let mut kinds: BTreeMap<(String, u64), Vec<usize>> = BTreeMap::new();
        let mut slot_count = 0;
        for &matrix in &set {
            for &e in &experts {
                let list = slots.get(&(matrix, e)).ok_or_else(|| missing(matrix, e))?;
                for &i in list {
                    let c = &offer.candidates[i];
                    kinds
                        .entry((c.method.clone(), c.variant))
                        .or_default()
                        .push(i);
                }
                slot_count += 1;
            }
        }
        let options: Vec<Option_> = kinds
            .into_values()
            .filter(|list| list.len() == slot_count)
            .map(|list| {
                list.iter().fold(
                    Option_ {
                        error: 0.0,
                        size: 0.0,
                        picks: Vec::new(),
                    },
                    |mut acc, &i| {
                        let o = option(i);
                        acc.error += o.error;
                        acc.size += o.size;
                        acc.picks.extend(o.picks);
                        acc
                    },
                )
            })
            .collect();
        if options.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "layer {}: --granularity {granularity} needs one kind of candidate that every \
                 expert of {:?} can take, and the enabled methods offer none",
                offer.layer, set
            )));
        }
        decisions.push(Decision::Choice(options));
    }
    Ok(decisions)
}

/// The candidates `pick` takes in `decision`.
fn picked(decision: &Decision, pick: &Pick) -> Vec<(usize, usize)> {
    match (decision, pick) {
        (Decision::Choice(options), Pick::Option(i))
        | (Decision::Block { group: options, .. }, Pick::Option(i)) => options[*i].picks.clone(),
        (Decision::Block { members, .. }, Pick::Members(picks)) => members
            .iter()
            .zip(picks)
            .flat_map(|(options, &i)| options[i].picks.clone())
            .collect(),
        (Decision::Choice(_), Pick::Members(_)) => Vec::new(),
    }
}

/// What the solver reached, beside the plans.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Solution {
    /// The size of the plans, in the budget's unit.
    pub size: f64,
    /// The budget they had to fit.
    pub target: f64,
    /// Their summed estimated error.
    pub error: f64,
    /// The final price λ (0 when the least-error choice fits).
    pub price: f64,
}

/// How the solver spends a budget over several layers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spending {
    /// What the budget is counted in.
    pub unit: BudgetUnit,
    /// How finely choices may mix.
    pub granularity: Granularity,
    /// How far the smallest choice may exceed the budget (the methods' step, e.g. a whole
    /// expert removed); beyond it the budget is refused as unreachable.
    pub tolerance: f64,
    /// Each layer keeps at least this fraction of its own target, whatever the others save
    /// (0: no floor).
    pub layer_floor: f64,
}

/// Chooses one candidate per unit of every layer of `offers` so that their total size fits the
/// sum of the layers' targets with the least summed error.
pub fn solve(offers: &[LayerOffer], spending: Spending) -> Result<(Vec<LayerPlan>, Solution)> {
    let Spending {
        unit,
        granularity,
        tolerance,
        layer_floor,
    } = spending;
    let mut decisions = Vec::new();
    let mut layer_of = Vec::new();
    for (layer, offer) in offers.iter().enumerate() {
        let layer_decisions = layer_decisions(layer, offer, unit, granularity)?;
        layer_of.extend(std::iter::repeat_n(layer, layer_decisions.len()));
        decisions.extend(layer_decisions);
    }
    let target: f64 = offers.iter().map(|o| o.target.target).sum();
    let layer_caps = floor_prices(offers, &decisions, &layer_of, layer_floor);
    let mut caps: Vec<f64> = layer_of.iter().map(|&l| layer_caps[l]).collect();
    // The floors are a preference: where honouring them cannot meet the budget, they go.
    if size_at(&decisions, &caps, f64::MAX / 1e10).0 > target {
        caps = vec![f64::INFINITY; decisions.len()];
    }
    let (free_size, free) = size_at(&decisions, &caps, 0.0);
    let (picks, price) = if free_size <= target {
        (free, 0.0)
    } else {
        let (least_size, least) = size_at(&decisions, &caps, f64::MAX / 1e10);
        if least_size > target + tolerance {
            let before: f64 = offers.iter().map(|o| o.target.before).sum();
            return Err(Error::InvalidArgument(format!(
                "the budget cannot be met: the smallest output the enabled methods offer keeps \
                 {:.2}% of the budget's {} against {:.2}% asked; enable more methods (--methods) \
                 or lower --ratio",
                100.0 * least_size / before.max(1.0),
                unit,
                100.0 * target / before.max(1.0)
            )));
        }
        bisect(&decisions, &caps, target).unwrap_or((least, f64::MAX / 1e10))
    };
    let mut plans: Vec<LayerPlan> = offers
        .iter()
        .map(|o| LayerPlan {
            layer: o.layer,
            chosen: Vec::new(),
            target: o.target,
            pruning: o.pruning.clone(),
        })
        .collect();
    for (decision, pick) in decisions.iter().zip(&picks) {
        for (layer, index) in picked(decision, pick) {
            plans[layer]
                .chosen
                .push(offers[layer].candidates[index].clone());
        }
    }
    for plan in &mut plans {
        plan.chosen.sort_by_key(|c| c.unit);
    }
    let size = plans.iter().map(|p| p.size(unit)).sum();
    let error = plans.iter().map(LayerPlan::error).sum();
    let solution = Solution {
        size,
        target,
        error,
        price,
    };
    Ok((plans, solution))
}

/// Per layer, the highest price at which it still keeps `floor` of its target (infinite when
/// it does at any price, or without a floor): past it the layer's price stops rising.
fn floor_prices(
    offers: &[LayerOffer],
    decisions: &[Decision],
    layer_of: &[usize],
    floor: f64,
) -> Vec<f64> {
    offers
        .iter()
        .enumerate()
        .map(|(layer, offer)| {
            let own: Vec<Decision> = decisions
                .iter()
                .zip(layer_of)
                .filter(|(_, &l)| l == layer)
                .map(|(d, _)| d.clone())
                .collect();
            let uncapped = vec![f64::INFINITY; own.len()];
            let minimum = floor * offer.target.target;
            let size = |price: f64| size_at(&own, &uncapped, price).0;
            if floor <= 0.0 || size(f64::MAX / 1e10) >= minimum {
                return f64::INFINITY;
            }
            if size(0.0) < minimum {
                return 0.0;
            }
            let (mut low, mut high) = (0.0f64, 1e-30f64);
            while size(high) >= minimum && high < 1e30 {
                low = high;
                high *= 10.0;
            }
            for _ in 0..100 {
                let middle = match low > 0.0 {
                    true => (low * high).sqrt(),
                    false => high / 2.0,
                };
                if middle <= low || middle >= high {
                    break;
                }
                match size(middle) >= minimum {
                    true => low = middle,
                    false => high = middle,
                }
            }
            low
        })
        .collect()
}

/// Bisects the price between an infeasible and a feasible one and fills the gap; None when no
/// finite price is feasible.
fn bisect(decisions: &[Decision], caps: &[f64], target: f64) -> Option<(Vec<Pick>, f64)> {
    let mut high = 1e-30;
    let mut low = 0.0;
    loop {
        if size_at(decisions, caps, high).0 <= target {
            break;
        }
        low = high;
        high *= 10.0;
        if high > 1e30 {
            return None;
        }
    }
    for _ in 0..100 {
        let middle = match low > 0.0 {
            true => (low * high).sqrt(),
            false => high / 2.0,
        };
        if middle <= low || middle >= high {
            break;
        }
        match size_at(decisions, caps, middle).0 <= target {
            true => high = middle,
            false => low = middle,
        }
    }
    let (mut size, mut picks) = size_at(decisions, caps, high);
    let (_, infeasible) = size_at(decisions, caps, low);
    let mut candidates = moves(decisions, &picks, &infeasible);
    candidates.sort_by(|a, b| {
        let ratio = |m: &Move| match m.cost > 0.0 {
            true => m.gain / m.cost,
            false => f64::INFINITY,
        };
        ratio(b)
            .total_cmp(&ratio(a))
            .then(a.decision.cmp(&b.decision))
            .then(a.member.cmp(&b.member))
    });
    for m in candidates {
        if m.gain <= 0.0 || size + m.cost > target {
            continue;
        }
        size += m.cost;
        apply_move(&mut picks, m);
    }
    improve(decisions, &mut picks, target);
    Some((picks, high))
}

/// Spends what the budget has left: repeatedly takes the single change of one option (or one
/// member's option) that saves the most error per unit of size and still fits. Bounded, because
/// after the bisection the slack is at most a few options' steps.
fn improve(decisions: &[Decision], picks: &mut [Pick], target: f64) {
    const ROUNDS: usize = 64;
    let mut size: f64 = decisions
        .iter()
        .zip(picks.iter())
        .map(|(d, p)| totals(d, p).1)
        .sum();
    for _ in 0..ROUNDS {
        let slack = target - size;
        let mut best: Option<(f64, Move)> = None;
        let mut consider = |m: Move| {
            if m.gain <= 0.0 || m.cost > slack {
                return;
            }
            let ratio = match m.cost > 0.0 {
                true => m.gain / m.cost,
                false => f64::INFINITY,
            };
            if best.as_ref().is_none_or(|(r, _)| ratio > *r) {
                best = Some((ratio, m));
            }
        };
        for (d, (decision, pick)) in decisions.iter().zip(picks.iter()).enumerate() {
            match (decision, pick) {
                (Decision::Block { members, .. }, Pick::Members(current)) => {
                    for (m, (options, &from)) in members.iter().zip(current).enumerate() {
                        for (to, o) in options.iter().enumerate() {
                            consider(Move {
                                decision: d,
                                member: Some(m),
                                to,
                                to_members: None,
                                gain: options[from].error - o.error,
                                cost: o.size - options[from].size,
                            });
                        }
                    }
                }
                (Decision::Choice(options), Pick::Option(from))
                | (Decision::Block { group: options, .. }, Pick::Option(from)) => {
                    for (to, o) in options.iter().enumerate() {
                        consider(Move {
                            decision: d,
                            member: None,
                            to,
                            to_members: None,
                            gain: options[*from].error - o.error,
                            cost: o.size - options[*from].size,
                        });
                    }
                }
                _ => {}
            }
        }
        let Some((_, m)) = best else {
            break;
        };
        size += m.cost;
        apply_move(picks, m);
    }
}

fn apply_move(picks: &mut [Pick], m: Move) {
    match (&mut picks[m.decision], m.member) {
        (Pick::Members(members), Some(member)) => members[member] = m.to,
        (pick, _) => {
            *pick = match m.to_members {
                Some(members) => Pick::Members(members),
                None => Pick::Option(m.to),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::plan::Candidate;
    use crate::pipeline::plan::LayerTarget;

    fn slot(
        matrix: ExpertMatrix,
        expert: usize,
        method: &str,
        bytes: u64,
        error: f64,
    ) -> Candidate {
        Candidate {
            method: method.into(),
            unit: Unit::Slot { matrix, expert },
            variant: 0,
            label: method.into(),
            bytes,
            parameters: 10,
            error,
            signals: None,
        }
    }

    fn group(matrix: ExpertMatrix, group: usize, rank: u64, bytes: u64, error: f64) -> Candidate {
        Candidate {
            method: "lowrank".into(),
            unit: Unit::Group { matrix, group },
            variant: rank,
            label: format!("rank {rank}"),
            bytes,
            parameters: 10,
            error,
            signals: None,
        }
    }

    /// Two experts in one group, one matrix; keep (100 bytes, no error) or int8 (50, error e_j).
    fn offer(target: f64, errors: [f64; 2], groups: Vec<Candidate>) -> LayerOffer {
        let gate = ExpertMatrix::Gate;
        let mut candidates = vec![
            slot(gate, 0, "keep", 100, 0.0),
            slot(gate, 0, "int8", 50, errors[0]),
            slot(gate, 1, "keep", 100, 0.0),
            slot(gate, 1, "int8", 50, errors[1]),
        ];
        candidates.extend(groups);
        LayerOffer {
            layer: 0,
            groups: vec![vec![0, 1]],
            matrices: vec![gate],
            candidates,
            target: LayerTarget {
                before: 200.0,
                target,
            },
            pruning: None,
        }
    }

    fn spend(granularity: Granularity, tolerance: f64) -> Spending {
        Spending {
            unit: BudgetUnit::Bytes,
            granularity,
            tolerance,
            layer_floor: 0.0,
        }
    }

    fn labels(plan: &LayerPlan) -> Vec<String> {
        plan.chosen.iter().map(|c| c.label.clone()).collect()
    }

    #[test]
    fn an_ample_budget_keeps_everything_and_a_tight_one_quantises_the_cheaper_loss_first() {
        let g = spend(Granularity::Expert, 0.0);
        let (plans, s) = solve(&[offer(200.0, [1.0, 2.0], vec![])], g).unwrap();
        assert_eq!(labels(&plans[0]), ["keep", "keep"]);
        assert_eq!((s.size, s.error, s.price), (200.0, 0.0, 0.0));
        // 150 bytes: one expert goes int8, the one that loses less.
        let (plans, s) = solve(&[offer(150.0, [1.0, 2.0], vec![])], g).unwrap();
        assert_eq!(labels(&plans[0]), ["int8", "keep"]);
        assert_eq!((s.size, s.error), (150.0, 1.0));
        let (plans, _) = solve(&[offer(150.0, [3.0, 2.0], vec![])], g).unwrap();
        assert_eq!(labels(&plans[0]), ["keep", "int8"]);
    }

    #[test]
    fn a_group_candidate_wins_when_it_is_better_per_byte_and_the_budget_is_kept() {
        let gate = ExpertMatrix::Gate;
        let ranks = vec![group(gate, 0, 4, 60, 0.5), group(gate, 0, 8, 120, 0.1)];
        // 120 bytes: int8 both costs 100 bytes and 3.0 error; rank 8 fits with 0.1.
        let (plans, s) = solve(
            &[offer(120.0, [1.0, 2.0], ranks.clone())],
            spend(Granularity::Expert, 0.0),
        )
        .unwrap();
        assert_eq!(labels(&plans[0]), ["rank 8"]);
        assert!(s.size <= 120.0 && (s.error - 0.1).abs() < 1e-12);
        // 70 bytes: only rank 4 fits.
        let (plans, _) = solve(
            &[offer(70.0, [1.0, 2.0], ranks)],
            spend(Granularity::Expert, 0.0),
        )
        .unwrap();
        assert_eq!(labels(&plans[0]), ["rank 4"]);
    }

    #[test]
    fn an_unreachable_budget_is_refused_with_the_smallest_size_offered() {
        let error = solve(
            &[offer(60.0, [1.0, 2.0], vec![])],
            spend(Granularity::Expert, 0.0),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("50.00%") && error.contains("30.00%"),
            "{error}"
        );
        // Within the tolerance, the smallest choice is taken.
        let (plans, _) = solve(
            &[offer(95.0, [1.0, 2.0], vec![])],
            spend(Granularity::Expert, 10.0),
        )
        .unwrap();
        assert_eq!(labels(&plans[0]), ["int8", "int8"]);
    }

    #[test]
    fn one_budget_over_layers_spends_where_the_error_is_larger() {
        // Layer 0's int8 costs 10× more error than layer 1's: with room for two int8 slots,
        // both go to layer 1.
        let mut a = offer(200.0, [10.0, 10.0], vec![]);
        let mut b = offer(100.0, [1.0, 1.0], vec![]);
        b.layer = 1;
        a.target.target = 150.0;
        b.target.target = 150.0;
        let (plans, s) = solve(&[a, b], spend(Granularity::Expert, 0.0)).unwrap();
        assert_eq!(labels(&plans[0]), ["keep", "keep"]);
        assert_eq!(labels(&plans[1]), ["int8", "int8"]);
        assert_eq!(s.size, 300.0);
    }

    #[test]
    fn a_layer_floor_keeps_a_layer_from_giving_up_more_than_its_share() {
        // As above, but each layer must keep at least 90% of its own 150 bytes: layer 1 may
        // quantise only one slot, so layer 0 quantises one too, though it loses more.
        let mut a = offer(200.0, [10.0, 12.0], vec![]);
        let mut b = offer(100.0, [1.0, 1.5], vec![]);
        b.layer = 1;
        a.target.target = 150.0;
        b.target.target = 150.0;
        let floored = Spending {
            layer_floor: 0.9,
            ..spend(Granularity::Expert, 0.0)
        };
        let (plans, s) = solve(&[a.clone(), b.clone()], floored).unwrap();
        assert_eq!(
            plans[1].size(BudgetUnit::Bytes),
            150.0,
            "{:?}",
            labels(&plans[1])
        );
        assert_eq!(
            plans[0].size(BudgetUnit::Bytes),
            150.0,
            "{:?}",
            labels(&plans[0])
        );
        assert_eq!((s.size, s.error), (300.0, 11.0));
        assert_eq!(labels(&plans[0]), ["int8", "keep"]);
        // Without the floor layer 0 gives up nothing and layer 1 everything.
        let (plans, _) = solve(&[a, b], spend(Granularity::Expert, 0.0)).unwrap();
        assert_eq!(labels(&plans[0]), ["keep", "keep"]);
    }

    #[test]
    fn a_matrix_granularity_gives_every_expert_the_same_kind() {
        let (plans, _) = solve(
            &[offer(150.0, [1.0, 2.0], vec![])],
            spend(Granularity::Matrix, 0.0),
        )
        .unwrap();
        assert_eq!(labels(&plans[0]), ["int8", "int8"]);
    }

    /// The exact optimum of slots each choosing one of its (size, error) options under an
    /// integer `capacity`, by dynamic programming.
    fn exact_optimum(slots: &[Vec<(usize, f64)>], capacity: usize) -> f64 {
        let mut best = vec![f64::INFINITY; capacity + 1];
        best[0] = 0.0;
        for options in slots {
            let mut next = vec![f64::INFINITY; capacity + 1];
            for (used, &error) in best.iter().enumerate() {
                if error.is_infinite() {
                    continue;
                }
                for &(size, e) in options {
                    if used + size <= capacity {
                        next[used + size] = next[used + size].min(error + e);
                    }
                }
            }
            best = next;
        }
        best.into_iter().fold(f64::INFINITY, f64::min)
    }

    #[test]
    fn the_solution_is_near_the_exact_optimum_on_random_problems() {
        let gate = ExpertMatrix::Gate;
        let mut rng = crate::rng::SplitMix64::new(7);
        let (mut solved, mut optimal, mut gap, mut total) = (0usize, 0usize, 0.0, 0.0);
        for round in 0..60 {
            let slots_count = if round % 2 == 0 { 3 } else { 24 };
            let mut candidates = Vec::new();
            let mut slots = Vec::new();
            for e in 0..slots_count {
                let mut options = Vec::new();
                for k in 0..4 {
                    let bytes = 10 + (rng.next_u64() % 90);
                    let error = (rng.next_u64() % 1000) as f64 / 100.0;
                    let mut c = slot(gate, e, "m", bytes, error);
                    c.variant = k;
                    candidates.push(c);
                    options.push((bytes as usize, error));
                }
                slots.push(options);
            }
            let target =
                (slots_count * 20 + (rng.next_u64() % (slots_count as u64 * 50)) as usize) as f64;
            let offer = LayerOffer {
                layer: 0,
                groups: vec![(0..slots_count).collect()],
                matrices: vec![gate],
                candidates,
                target: LayerTarget {
                    before: 100.0 * slots_count as f64,
                    target,
                },
                pruning: None,
            };
            let best = exact_optimum(&slots, target as usize);
            match solve(&[offer], spend(Granularity::Expert, 0.0)) {
                Ok((_, s)) => {
                    assert!(s.size <= target, "{} > {target}", s.size);
                    assert!(
                        s.error >= best - 1e-9,
                        "{} beats the optimum {best}",
                        s.error
                    );
                    solved += 1;
                    optimal += usize::from(s.error <= best + 1e-9);
                    gap += s.error - best;
                    total += best;
                }
                Err(_) => assert!(best.is_infinite()),
            }
        }
        // The Lagrangian relaxation with the fill is not exact on a knapsack; on these
        // problems it finds the optimum in most cases and loses under 2% of the optimal error
        // over all of them.
        assert!(
            optimal * 10 >= solved * 7,
            "optimal in {optimal} of {solved}"
        );
        assert!(gap <= 0.02 * total, "gap {gap} of {total}");
    }
}
