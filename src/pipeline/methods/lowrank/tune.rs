//! Allocation chosen by measurement (`--xi auto`): part of the calibration windows is held out
//! (it feeds neither the Gram matrices nor the routing counts), and for each layer every
//! candidate ξ of the fused score `C_g = ξ·E_g + (1−ξ)·F_g` is allocated, factored and run: the
//! layer's routed experts, with the candidate's reconstructed gate and up projections, are
//! applied to the held-out tokens' MoE inputs, and the ξ whose output is nearest the original
//! layer's (relative Frobenius error of the routed experts' weighted output) is kept.
//!
//! Cost: every group is factored **once**, at the largest rank any candidate gives it, and each
//! candidate's factors are prefixes of that factorisation (the columns of `A = W S V` and the
//! rows of `B = Vᵀ S⁻¹` each depend on one singular vector only); candidates that give a group
//! the same ranks share one evaluation. On top of that, one forward pass of the routed experts
//! over the held-out tokens per distinct allocation. The SVD is the truncated (optionally
//! whitened) SVD of the `svd` factoriser whatever `--factorizer` is, and a residual is not
//! measured (its budget is reserved the same way by every candidate).
//!
//! Memory: the held-out tokens' MoE input (`tokens × d` f32 per layer) and one `tokens × d` f32
//! error accumulator per candidate, plus one group's working set per worker thread.

use std::str::FromStr;

use candle_core::{Device, Tensor};
use faer::Mat;
use rayon::prelude::*;

use super::allocate::{allocate_layer, AllocationSettings, GroupAllocation, RankPlan};
use super::analyse::LayerAnalysis;
use super::factor::{Factorizer, SvdFactorizer};
use crate::checkpoint::experts::ExpertMatrix;
use crate::error::{Error, Result};
use crate::linalg::{tensor_to_mat, LinalgBackend};
use crate::pipeline::calibrate::{HeldOutActivations, LayerStatistics};
use crate::pipeline::experts::LayerExperts;
pub use crate::pipeline::report::{XiCandidate, XiSearch};

/// The candidates `--xi auto` tries unless `xi_candidates` says otherwise.
pub const DEFAULT_XI_CANDIDATES: [f64; 6] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];

/// The fraction of calibration windows held out for `--xi auto` unless told otherwise.
pub const DEFAULT_HOLDOUT_FRACTION: f64 = 0.125;

/// A `--xi` value on the command line: a number in [0, 1], or `auto`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum XiSetting {
    /// This ξ for every layer.
    Fixed(f64),
    /// Chosen per layer by measurement on held-out calibration windows.
    Auto,
}

impl FromStr for XiSetting {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(XiSetting::Auto);
        }
        text.trim()
            .parse::<f64>()
            .map(XiSetting::Fixed)
            .map_err(|_| {
                Error::InvalidArgument(format!(
                    "--xi `{text}`: expected a number in [0, 1] or `auto`"
                ))
            })
    }
}

crate::named_enum! {
    /// How `--xi auto` weighs the held-out tokens' output errors.
    pub enum TuneMetric ("tune metric") {
        /// `‖Ŷ − Y‖_F / ‖Y‖_F`: every token's output error counts as it is.
        Output = "output": "Relative error of the routed experts' output on held-out tokens",
        /// Each token's error divided by the norm of the residual stream it is added to (the
        /// layer's output), as the next layer's RMSNorm sees it: `√(Σ_t ‖ΔY_t‖²/‖r_t‖²  /
        /// Σ_t ‖Y_t‖²/‖r_t‖²)`. The default: it matched or beat ξ = 0.2 in perplexity on both
        /// trained models at ρ = 0.2/0.4/0.6, where `output` lost at ρ = 0.6 (docs/RESULTS.md).
        Residual = "residual":
            "The same, each token's error relative to the residual stream it is added to",
    }
}

// The enum's derives come from `named_enum!`, which has no `Default`.
#[allow(clippy::derivable_impls)]
impl Default for TuneMetric {
    fn default() -> Self {
        TuneMetric::Residual
    }
}

/// Everything the search needs besides the layer's data.
pub struct SearchSettings<'a> {
    /// The allocation (the candidates are tried in place of its `xi`).
    pub allocation: AllocationSettings,
    /// The ξ candidates.
    pub candidates: &'a [f64],
    /// How the held-out tokens' errors are weighed.
    pub metric: TuneMetric,
    /// Whiten by each group's Gram matrix, as the factor stage will.
    pub whiten: bool,
    /// Relative ridge of the whitening Cholesky.
    pub whiten_ridge: f64,
}

/// Allocates the layer once per candidate ξ, measures each plan on the held-out tokens and
/// returns the best plan with the measurements.
pub fn search_xi<B: LinalgBackend>(
    backend: &B,
    experts: &LayerExperts,
    statistics: &LayerStatistics<B::Matrix>,
    analysis: &LayerAnalysis,
    held_out: &HeldOutActivations,
    settings: &SearchSettings,
) -> Result<(RankPlan, XiSearch)> {
    let candidates = settings.candidates;
    let mut plans = candidates
        .iter()
        .map(|&xi| {
            let options = AllocationSettings {
                xi,
                ..settings.allocation
            };
            allocate_layer(analysis, &options)
        })
        .collect::<Result<Vec<_>>>()?;
    let errors = output_errors(
        backend, experts, statistics, analysis, held_out, &plans, settings,
    )?;
    let best = (0..plans.len())
        .min_by(|&a, &b| errors[a].total_cmp(&errors[b]).then(a.cmp(&b)))
        .ok_or_else(|| Error::InvalidArgument("--xi auto has no candidates".into()))?;
    let search = XiSearch {
        chosen: candidates[best],
        held_out_tokens: held_out.tokens() as u64,
        candidates: candidates
            .iter()
            .zip(&errors)
            .map(|(&xi, &output_error)| XiCandidate { xi, output_error })
            .collect(),
    };
    Ok((plans.swap_remove(best), search))
}

/// Per plan, the relative error of the routed experts' output on the held-out tokens. Groups run
/// in parallel a chunk at a time and are summed in group order, so the result does not depend
/// on the number of threads.
fn output_errors<B: LinalgBackend>(
    backend: &B,
    experts: &LayerExperts,
    statistics: &LayerStatistics<B::Matrix>,
    analysis: &LayerAnalysis,
    held_out: &HeldOutActivations,
    plans: &[RankPlan],
    settings: &SearchSettings,
) -> Result<Vec<f64>> {
    let (tokens, hidden) = held_out.inputs.dims2()?;
    let mut original = vec![0f32; tokens * hidden];
    let mut errors = vec![vec![0f32; tokens * hidden]; plans.len()];
    let chunk = rayon::current_num_threads().max(1);
    let groups: Vec<usize> = (0..analysis.groups.len()).collect();
    for slice in groups.chunks(chunk) {
        let outcomes = slice
            .par_iter()
            .map(|&g| {
                let job = GroupJob {
                    group: g,
                    members: &analysis.groups[g],
                    gram: statistics.group_gram.as_ref().map(|grams| &grams[g]),
                };
                evaluate_group(backend, experts, analysis, held_out, plans, &job, settings)
            })
            .collect::<Result<Vec<_>>>()?;
        for outcome in outcomes {
            for rows in &outcome.original {
                rows.add_into(&mut original, hidden);
            }
            for (candidate, &variant) in outcome.variant_of.iter().enumerate() {
                for rows in &outcome.variants[variant] {
                    rows.add_into(&mut errors[candidate], hidden);
                }
            }
        }
    }
    let weight = |t: usize| match settings.metric {
        TuneMetric::Output => 1.0,
        TuneMetric::Residual => 1.0 / (held_out.residual_norms[t] as f64).max(f64::MIN_POSITIVE),
    };
    let norm = |values: &[f32]| {
        values
            .chunks(hidden.max(1))
            .enumerate()
            .map(|(t, row)| weight(t) * row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
            .sum::<f64>()
    };
    let reference = norm(&original);
    Ok(errors
        .iter()
        .map(|e| match reference > 0.0 {
            true => (norm(e) / reference).sqrt(),
            false => 0.0,
        })
        .collect())
}

/// One expert's contribution to the layer output on the tokens routed to it.
struct TokenRows {
    tokens: Vec<u32>,
    rows: Mat<f64>,
}

impl TokenRows {
    /// Adds each row to its token's row of `target` (`tokens × hidden`, row-major).
    fn add_into(&self, target: &mut [f32], hidden: usize) {
        for (i, &t) in self.tokens.iter().enumerate() {
            let row = &mut target[t as usize * hidden..(t as usize + 1) * hidden];
            for (j, value) in row.iter_mut().enumerate() {
                *value += self.rows[(i, j)] as f32;
            }
        }
    }
}

/// A group's outcome: the original output of its experts, and the output error of each distinct
/// allocation the candidates give it.
struct GroupOutcome {
    original: Vec<TokenRows>,
    variants: Vec<Vec<TokenRows>>,
    variant_of: Vec<usize>,
}

struct GroupJob<'a, M> {
    group: usize,
    members: &'a [usize],
    gram: Option<&'a M>,
}

/// How one candidate builds a group's gate and up projections: dense, or a rank prefix of the
/// group's factors.
type Variant = [GroupAllocation; 2];

/// The targeted matrices in the order [`Variant`] holds them.
const GATE_UP: [ExpertMatrix; 2] = [ExpertMatrix::Gate, ExpertMatrix::Up];

fn evaluate_group<B: LinalgBackend>(
    backend: &B,
    experts: &LayerExperts,
    analysis: &LayerAnalysis,
    held_out: &HeldOutActivations,
    plans: &[RankPlan],
    job: &GroupJob<B::Matrix>,
    settings: &SearchSettings,
) -> Result<GroupOutcome> {
    let variant_for = |plan: &RankPlan| -> Variant {
        let mut variant = [GroupAllocation {
            rank: 0,
            dense: true,
        }; 2];
        for (slot, matrix) in GATE_UP.iter().enumerate() {
            if let Some(m) = plan.matrices.iter().find(|m| m.matrix == *matrix) {
                variant[slot] = m.allocations[job.group];
            }
        }
        variant
    };
    let mut variants: Vec<Variant> = Vec::new();
    let mut variant_of = Vec::new();
    for plan in plans {
        let variant = variant_for(plan);
        let index = match variants.iter().position(|v| *v == variant) {
            Some(i) => i,
            None => {
                variants.push(variant);
                variants.len() - 1
            }
        };
        variant_of.push(index);
    }
    let factors = group_factors(backend, experts, analysis, &variants, job, settings)?;
    let mut original = Vec::new();
    let mut outputs: Vec<Vec<TokenRows>> = variants.iter().map(|_| Vec::new()).collect();
    for (slot, &expert) in job.members.iter().enumerate() {
        let routes = &held_out.routes[expert];
        if routes.tokens.is_empty() {
            continue;
        }
        let index = Tensor::from_slice(&routes.tokens, routes.tokens.len(), &Device::Cpu)?;
        let x = tensor_to_mat(&held_out.inputs.index_select(&index, 0)?)?;
        let weights: Vec<f64> = routes.weights.iter().map(|&w| w as f64).collect();
        let expert_run = ExpertRun::new(experts, expert, &x)?;
        original.push(TokenRows {
            tokens: routes.tokens.clone(),
            rows: expert_run.output(&expert_run.hidden, &weights),
        });
        for (v, variant) in variants.iter().enumerate() {
            let projections: [Option<Mat<f64>>; 2] = [0, 1].map(|m| match variant[m].dense {
                true => None,
                false => factors[m]
                    .as_ref()
                    .map(|f| f.project(&x, slot, variant[m].rank)),
            });
            if projections.iter().all(Option::is_none) {
                continue;
            }
            let gate = projections[0].as_ref().unwrap_or(&expert_run.gate);
            let up = projections[1].as_ref().unwrap_or(&expert_run.up);
            let diff = &gated(gate, up) - &expert_run.hidden;
            outputs[v].push(TokenRows {
                tokens: routes.tokens.clone(),
                rows: expert_run.output(&diff, &weights),
            });
        }
    }
    Ok(GroupOutcome {
        original,
        variants: outputs,
        variant_of,
    })
}

/// A group's factors at the largest rank any variant needs, on the host.
struct HostFactors {
    /// `k·p × K_max`.
    coefficients: Mat<f64>,
    /// `K_max × d`.
    basis: Mat<f64>,
    rows_per_expert: usize,
}

impl HostFactors {
    /// `x · (A_slot[:, :rank] · B[:rank, :])ᵀ` computed as `(x · B[:rank]ᵀ) · A_slot[:, :rank]ᵀ`.
    fn project(&self, x: &Mat<f64>, slot: usize, rank: usize) -> Mat<f64> {
        let p = self.rows_per_expert;
        let basis = self.basis.as_ref().subrows(0, rank);
        let coefficients = self.coefficients.as_ref().submatrix(slot * p, 0, p, rank);
        (x * basis.transpose()) * coefficients.transpose()
    }
}

/// Factors the group's gate and up once each, at the largest rank its variants use (none when
/// every variant keeps the matrix dense).
fn group_factors<B: LinalgBackend>(
    backend: &B,
    experts: &LayerExperts,
    analysis: &LayerAnalysis,
    variants: &[Variant],
    job: &GroupJob<B::Matrix>,
    settings: &SearchSettings,
) -> Result<[Option<HostFactors>; 2]> {
    let whitening = match (job.gram, settings.whiten) {
        (Some(gram), true) => Some(backend.whitening_factor(gram, settings.whiten_ridge)?),
        _ => None,
    };
    let mut out: [Option<HostFactors>; 2] = [None, None];
    for (slot, matrix) in GATE_UP.iter().enumerate() {
        let rank = variants
            .iter()
            .filter(|v| !v[slot].dense)
            .map(|v| v[slot].rank)
            .max()
            .unwrap_or(0);
        if rank == 0 {
            continue;
        }
        let rows_per_expert = analysis
            .matrices
            .iter()
            .find(|m| m.matrix == *matrix)
            .map_or(0, |m| m.shapes[job.group].rows_per_expert);
        let stacked = experts.stacked(backend, *matrix, job.members)?;
        let factors =
            Factorizer::<B>::factor(&SvdFactorizer, backend, &stacked, rank, whitening.as_ref())?;
        out[slot] = Some(HostFactors {
            coefficients: backend.to_host(&factors.coefficients)?,
            basis: backend.to_host(&factors.basis)?,
            rows_per_expert,
        });
    }
    Ok(out)
}

/// One expert run on its held-out tokens with its original weights.
struct ExpertRun {
    /// `x Gᵀ` (tokens × p).
    gate: Mat<f64>,
    /// `x Uᵀ` (tokens × p).
    up: Mat<f64>,
    /// `silu(x Gᵀ) ⊙ x Uᵀ`.
    hidden: Mat<f64>,
    /// The down projection `D` (d × p).
    down: Mat<f64>,
}

impl ExpertRun {
    fn new(experts: &LayerExperts, expert: usize, x: &Mat<f64>) -> Result<Self> {
        let load = |matrix| tensor_to_mat(&experts.matrix(expert, matrix)?);
        let gate = x * load(ExpertMatrix::Gate)?.transpose();
        let up = x * load(ExpertMatrix::Up)?.transpose();
        let hidden = gated(&gate, &up);
        Ok(Self {
            gate,
            up,
            hidden,
            down: load(ExpertMatrix::Down)?,
        })
    }

    /// `diag(weights) · hidden · Dᵀ` (tokens × d).
    fn output(&self, hidden: &Mat<f64>, weights: &[f64]) -> Mat<f64> {
        let projected = hidden * self.down.transpose();
        Mat::from_fn(projected.nrows(), projected.ncols(), |i, j| {
            weights[i] * projected[(i, j)]
        })
    }
}

/// `silu(gate) ⊙ up`, elementwise.
fn gated(gate: &Mat<f64>, up: &Mat<f64>) -> Mat<f64> {
    Mat::from_fn(gate.nrows(), gate.ncols(), |i, j| {
        let g = gate[(i, j)];
        g / (1.0 + (-g).exp()) * up[(i, j)]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xi_setting_parses_numbers_and_auto() {
        assert_eq!("auto".parse::<XiSetting>().unwrap(), XiSetting::Auto);
        assert_eq!("AUTO".parse::<XiSetting>().unwrap(), XiSetting::Auto);
        assert_eq!("0.35".parse::<XiSetting>().unwrap(), XiSetting::Fixed(0.35));
        assert!("often".parse::<XiSetting>().is_err());
    }

    #[test]
    fn holdout_is_spread_disjoint_and_leaves_windows_to_calibrate() {
        use crate::pipeline::calibrate::split_holdout;
        let windows: Vec<Vec<u32>> = (0..16u32).map(|w| vec![w, w + 100]).collect();
        let (kept, held) = split_holdout(&windows, 0.125).unwrap();
        assert_eq!((kept.len(), held.len()), (14, 2));
        let held_ids: Vec<u32> = held.iter().map(|w| w[0]).collect();
        assert_eq!(held_ids, vec![4, 12]);
        for w in &held {
            assert!(!kept.contains(w));
        }
        // At least one held out, at least one kept.
        let (kept, held) = split_holdout(&windows[..2], 0.01).unwrap();
        assert_eq!((kept.len(), held.len()), (1, 1));
        let (kept, held) = split_holdout(&windows[..3], 0.99).unwrap();
        assert_eq!((kept.len(), held.len()), (1, 2));
        assert!(split_holdout(&windows[..1], 0.5).is_err());
    }

    #[test]
    fn truncated_factors_are_prefixes_of_the_largest_rank() {
        use crate::linalg::tests::TestRng;
        use crate::linalg::{whitening_factor, CpuBackend};
        let mut rng = TestRng::new(7);
        let (p, d) = (6, 10);
        let w = rng.matrix(2 * p, d);
        let x = rng.matrix(d, 40);
        let s = whitening_factor(&(&x * x.transpose()), 1e-4).unwrap();
        let largest = SvdFactorizer.factor(&CpuBackend, &w, 8, Some(&s)).unwrap();
        let host = HostFactors {
            coefficients: largest.coefficients,
            basis: largest.basis,
            rows_per_expert: p,
        };
        let tokens = rng.matrix(5, d);
        for rank in [1, 3, 8] {
            let direct = SvdFactorizer
                .factor(&CpuBackend, &w, rank, Some(&s))
                .unwrap();
            let w_hat = &direct.coefficients * &direct.basis;
            for slot in 0..2 {
                let expected = &tokens * w_hat.as_ref().subrows(slot * p, p).transpose();
                let got = host.project(&tokens, slot, rank);
                let diff = crate::linalg::frobenius_norm(&(&got - &expected));
                assert!(
                    diff < 1e-9 * crate::linalg::frobenius_norm(&expected),
                    "rank {rank} slot {slot}: {diff}"
                );
            }
        }
    }
}
