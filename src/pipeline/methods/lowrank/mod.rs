//! `lowrank`: RFID-MoE's shared-basis factorisation (arXiv 2602.09316). The experts of a
//! frequency-sorted group share one basis per matrix: `Ŵ_j = A_j·B_g` for gate and up (basis on
//! the input side), `Ŵ_j = U_g·C_j` for down (on the output side), fitted by the whitened
//! truncated SVD (or the MoBE-style SiLU basis) and stored as floats or int8.
//!
//! Two ways to choose ranks (`allocation`):
//! - `solver` (the default): the method offers every group a grid of ranks, each with its stored
//!   bytes and its estimated output error (the tail of the group's spectrum under the output
//!   sensitivities of its members, `calibrate::ExpertStatistics`), and the budget solver chooses
//!   among them and every other method's candidates. The basis is then fitted under the same
//!   weights ([`factor::weighted_truncated_svd`]).
//! - the paper's score policies (`rfid`, `uniform`, `frequency`, `density`): the method
//!   allocates the ranks itself from the fused score of routing frequency and information
//!   density ([`allocate`]; `--xi auto` chooses ξ by measurement, [`tune`]) under a parameter
//!   budget, and offers exactly that allocation (a rank or the dense members per group), which
//!   the solver then takes.

pub mod allocate;
pub mod analyse;
pub mod estimate;
pub mod factor;
pub mod tune;

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{LayerContext, Method, MethodInputs, Needs};
use crate::checkpoint::experts::{ExpertLayout, ExpertMatrix};
use crate::checkpoint::int8::{self, Int8Matrix};
use crate::checkpoint::StoredDType;
use crate::error::{Error, Result};
use crate::format::{self, CompressionRecord};
use crate::linalg::LinalgBackend;
use crate::pipeline::experts::oriented_shape;
use crate::pipeline::options::{BudgetScope, BudgetUnit, MethodSettings};
use crate::pipeline::plan::{Candidate, GroupSignals, LayerOffer, StoredTensors, Unit, UnitOutput};
use crate::pipeline::report::{GroupReport, LayerReport, XiSearch};
use allocate::{
    allocate_layer, allocate_model, Allocation, AllocationSettings, GroupAllocation, GroupShape,
    MatrixPlan, RankPlan,
};
use analyse::{LayerAnalysis, MatrixAnalysis};
use factor::{BasisFactorizer, FactorSettings, FactoredGroup, Factorizer, GroupJob, SvdFactorizer};
use tune::TuneMetric;

/// The registry name.
pub const NAME: &str = "lowrank";

/// One line for help texts.
pub const DESCRIPTION: &str =
    "Factor each expert group's matrices with one shared low-rank basis (RFID-MoE)";

/// The candidates `--xi auto` tries unless `xi_candidates` says otherwise.
pub const DEFAULT_XI_CANDIDATES: [f64; 6] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];

/// The fraction of calibration windows held out for `--xi auto` unless told otherwise.
pub const DEFAULT_HOLDOUT_FRACTION: f64 = 0.125;

/// The variant of a group kept dense by the paper's allocation.
const DENSE: u64 = u64::MAX;

crate::named_enum! {
    /// How the method chooses each group's rank.
    pub enum RankAllocation ("allocation") {
        /// The budget solver, from each rank's estimated output error.
        Solver = "solver":
            "The budget solver chooses each group's rank from its estimated output error",
        /// The paper's allocation with equal scores.
        Uniform = "uniform": "Every group gets the same score (equal ranks for equal shapes)",
        /// The paper's allocation by routing frequency.
        Frequency = "frequency": "Group routing frequency `F_g` alone",
        /// The paper's allocation by information density.
        Density = "density": "Normalised effective rank `E_g` alone",
        /// The paper's fused score.
        Rfid = "rfid": "The fused RFID score `ξ·E_g + (1−ξ)·F_g`",
    }
}

impl RankAllocation {
    /// The allocation by the paper's score `policy`.
    pub fn from_policy(policy: Allocation) -> Self {
        match policy {
            Allocation::Uniform => RankAllocation::Uniform,
            Allocation::Frequency => RankAllocation::Frequency,
            Allocation::Density => RankAllocation::Density,
            Allocation::Rfid => RankAllocation::Rfid,
        }
    }

    /// The paper's score policy, None for the solver.
    pub fn policy(self) -> Option<Allocation> {
        match self {
            RankAllocation::Solver => None,
            RankAllocation::Uniform => Some(Allocation::Uniform),
            RankAllocation::Frequency => Some(Allocation::Frequency),
            RankAllocation::Density => Some(Allocation::Density),
            RankAllocation::Rfid => Some(Allocation::Rfid),
        }
    }
}

crate::named_enum! {
    /// Which factoriser turns a group into coefficients and a basis.
    pub enum FactorizerKind ("factorizer") {
        /// Truncated SVD (closed form), optionally activation-aware.
        Svd = "svd": "Truncated SVD (closed form), optionally activation-aware",
        /// MoBE-style `A·SiLU(B)` fitted with Adam from the SVD.
        Basis = "basis": "MoBE-style `A·SiLU(B)` fitted with Adam from the SVD",
    }
}

/// `[settings.lowrank]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LowRankSettings {
    /// How each group's rank is chosen.
    pub allocation: RankAllocation,
    /// Weight ξ of information density in the fused score (`rfid`).
    pub xi: f64,
    /// `--xi auto`: choose ξ per layer among `xi_candidates` by the layer's output error on
    /// held-out calibration windows (`xi` is then unused).
    pub xi_auto: bool,
    /// The ξ values `--xi auto` tries.
    pub xi_candidates: Vec<f64>,
    /// How `--xi auto` weighs the held-out tokens' errors.
    pub xi_metric: TuneMetric,
    /// `--xi auto`: fraction of the windows held out (at least one); they contribute neither
    /// to the Gram matrices nor to the routing counts.
    pub holdout_fraction: f64,
    /// The paper's allocation: keep a group dense when factoring it would not save parameters.
    pub dense_fallback: bool,
    /// The paper's allocation: reserve part of each group's budget for the sparse-projection
    /// residual.
    pub residual: bool,
    /// Residual size as a fraction of each group's dense parameters.
    pub residual_fraction: f64,
    /// The factoriser.
    pub factorizer: FactorizerKind,
    /// Adam steps for the basis factoriser.
    pub fit_steps: usize,
    /// Adam learning rate for the basis factoriser.
    pub learning_rate: f64,
    /// Activation-aware (whitened) factorisation.
    pub whiten: bool,
    /// Relative ridge added to each Gram matrix before its Cholesky factor (× tr/d).
    pub whiten_ridge: f64,
    /// Seed of the residual's random projection.
    pub residual_seed: u64,
    /// Storage of the factors: `int8` (codes with per-row scales of 128-column blocks), `auto`
    /// (the checkpoint's float dtype), `f32`, `bf16` or `f16`.
    pub factor_dtype: String,
}

impl Default for LowRankSettings {
    fn default() -> Self {
        Self {
            allocation: RankAllocation::Solver,
            xi: 0.2,
            xi_auto: false,
            xi_candidates: DEFAULT_XI_CANDIDATES.to_vec(),
            xi_metric: TuneMetric::Residual,
            holdout_fraction: DEFAULT_HOLDOUT_FRACTION,
            dense_fallback: true,
            residual: false,
            residual_fraction: 0.03,
            factorizer: FactorizerKind::Svd,
            fit_steps: 500,
            learning_rate: 0.07,
            whiten: true,
            whiten_ridge: 1e-4,
            residual_seed: 0x5eed,
            factor_dtype: INT8_FACTORS.into(),
        }
    }
}

impl MethodSettings for LowRankSettings {
    const METHOD: &'static str = NAME;
}

/// The method's smallest storage: with int8 factors, dense members and factors take about 1.03
/// bytes per parameter (None with float factors, whose size follows the checkpoint).
pub fn smallest_storage(options: &crate::pipeline::options::CompressOptions) -> Option<f64> {
    let settings = options.settings_of::<LowRankSettings>().ok()?;
    (settings.factor_dtype == INT8_FACTORS).then_some(1.0 + 4.0 / 128.0)
}

/// `factor_dtype` of int8 factors.
pub const INT8_FACTORS: &str = "int8";

impl LowRankSettings {
    /// The paper's RFID-MoE: the fused score, factors in the checkpoint's dtype.
    pub fn paper() -> Self {
        Self {
            allocation: RankAllocation::Rfid,
            factor_dtype: "auto".into(),
            ..Self::default()
        }
    }

    fn validate(&self, options: &crate::pipeline::options::CompressOptions) -> Result<()> {
        let invalid = |message: String| Err(Error::InvalidArgument(message));
        if !(0.0..=1.0).contains(&self.xi) {
            return invalid(format!("--xi {} must be in [0, 1]", self.xi));
        }
        if self.residual && !(self.residual_fraction > 0.0 && self.residual_fraction < 1.0) {
            return invalid(format!(
                "--residual-fraction {} must be in (0, 1)",
                self.residual_fraction
            ));
        }
        let budget = &options.budget;
        let down = budget.covers(ExpertMatrix::Down);
        match self.allocation.policy() {
            None => {
                let unsupported = if self.residual {
                    Some("--residual on (its budget is reserved by the paper's allocation)")
                } else if self.xi_auto {
                    Some("--xi auto (it tunes the paper's fused score)")
                } else if self.factorizer != FactorizerKind::Svd {
                    Some("--factorizer basis (the solver's ranks are fitted by the weighted SVD)")
                } else {
                    None
                };
                if let Some(what) = unsupported {
                    return invalid(format!(
                        "--allocation solver (the default) does not combine with {what}: add \
                         --allocation rfid, or --preset paper"
                    ));
                }
            }
            Some(policy) => {
                if budget.unit != BudgetUnit::Parameters {
                    return invalid(format!(
                        "--allocation {} allocates a fraction of the parameters: it needs \
                         --budget parameters (or --preset paper)",
                        self.allocation
                    ));
                }
                if self.xi_auto {
                    self.validate_xi_auto(options, policy)?;
                }
            }
        }
        if down {
            let unsupported = if self.factorizer != FactorizerKind::Svd {
                Some("--factorizer basis (its SiLU basis is fitted on the input side)")
            } else if self.residual {
                Some("--residual on")
            } else if self.xi_auto {
                Some("--xi auto (its search runs the original down_proj)")
            } else if options.calibration.statistics_cache.is_some() {
                Some("the calibration statistics cache (it holds no down_proj statistics)")
            } else {
                None
            };
            if let Some(what) = unsupported {
                return invalid(format!(
                    "--matrices with down (the default is gate,up,down) does not combine with \
                     {what} yet: pass --matrices gate,up"
                ));
            }
        }
        factor_dtype_of(&self.factor_dtype, StoredDType::BF16).map(|_| ())
    }

    fn validate_xi_auto(
        &self,
        options: &crate::pipeline::options::CompressOptions,
        policy: Allocation,
    ) -> Result<()> {
        let invalid = |message: String| Err(Error::InvalidArgument(message));
        if policy != Allocation::Rfid {
            return invalid(format!(
                "--xi auto tunes the fused score of --allocation rfid, not `{policy}`"
            ));
        }
        if options
            .methods
            .iter()
            .any(|m| m != NAME && m != super::keep::NAME)
        {
            return invalid(format!(
                "--xi auto measures the low-rank allocation of every expert's gate and up; it \
                 does not combine with other methods (--methods {}): add --preset paper",
                options.methods.join(",")
            ));
        }
        if options.budget.scope != BudgetScope::Layer {
            return invalid("--xi auto chooses ξ per layer: it needs --budget-scope layer".into());
        }
        if self.xi_candidates.is_empty()
            || self
                .xi_candidates
                .iter()
                .any(|xi| !(0.0..=1.0).contains(xi))
        {
            return invalid(format!(
                "xi_candidates {:?} must be non-empty and each in [0, 1]",
                self.xi_candidates
            ));
        }
        let fraction = self.holdout_fraction;
        if !(fraction > 0.0 && fraction < 1.0) {
            return invalid(format!("--holdout-fraction {fraction} must be in (0, 1)"));
        }
        if options.calibration.samples < 2 {
            return invalid(
                "--xi auto holds out calibration windows: it needs --samples of at least 2".into(),
            );
        }
        Ok(())
    }
}

/// The dtype factors are handed over in for storage `name` (int8 factors are quantised from
/// f32; `auto` follows the checkpoint's `dominant` float dtype, bf16 for FP8 weights).
pub fn factor_dtype_of(name: &str, dominant: StoredDType) -> Result<DType> {
    Ok(match name {
        "auto" => stored_dtype_of(dominant),
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        INT8_FACTORS => DType::F32,
        other => {
            return Err(Error::InvalidArgument(format!(
                "--factor-dtype `{other}` (expected auto, f32, bf16, f16 or int8)"
            )))
        }
    })
}

/// The float dtype a checkpoint whose weights are mostly `dominant` is written in (FP8 weights
/// are never written as such: their factors are bf16).
pub fn stored_dtype_of(dominant: StoredDType) -> DType {
    match dominant {
        StoredDType::BF16 | StoredDType::F8E4M3 | StoredDType::F8E5M2 => DType::BF16,
        StoredDType::F16 => DType::F16,
        _ => DType::F32,
    }
}

/// What the paper's allocation needs of a layer between offering and settling.
struct ScoredLayer {
    analysis: LayerAnalysis,
    /// Per matrix (analysis order), per group: the bytes of the group kept dense.
    dense_bytes: Vec<Vec<u64>>,
    /// The parameter ratio the layer's covered experts must meet.
    ratio: f64,
}

/// The `lowrank` method.
pub struct LowRank<B: LinalgBackend> {
    settings: LowRankSettings,
    factorizer: Box<dyn Factorizer<B>>,
    factor_dtype: DType,
    int8: bool,
    ratio: f64,
    /// Whether `down_proj` is under the budget (its factors need intermediate Gram matrices).
    down: bool,
    scored: Mutex<BTreeMap<usize, ScoredLayer>>,
    searches: Mutex<BTreeMap<usize, XiSearch>>,
}

/// Builds the method from the run's options.
pub fn create<B: LinalgBackend + 'static>(inputs: &MethodInputs) -> Result<Box<dyn Method<B>>> {
    let settings = inputs.options.settings_of::<LowRankSettings>()?;
    settings.validate(inputs.options)?;
    let factorizer: Box<dyn Factorizer<B>> = match settings.factorizer {
        FactorizerKind::Svd => Box::new(SvdFactorizer),
        FactorizerKind::Basis => Box::new(BasisFactorizer {
            steps: settings.fit_steps,
            learning_rate: settings.learning_rate,
            patience: 50,
        }),
    };
    let dominant = inputs.checkpoint.dominant_dtype();
    Ok(Box::new(LowRank {
        factor_dtype: factor_dtype_of(&settings.factor_dtype, dominant)?,
        int8: settings.factor_dtype == INT8_FACTORS,
        ratio: inputs.options.budget.ratio,
        down: inputs.options.budget.covers(ExpertMatrix::Down),
        settings,
        factorizer,
        scored: Mutex::new(BTreeMap::new()),
        searches: Mutex::new(BTreeMap::new()),
    }))
}

/// How a group's factors at rank `r` are stored, in bytes.
fn factored_bytes(shape: GroupShape, matrix: ExpertMatrix, rank: usize, storage: Storage) -> u64 {
    let (k, p, d) = (shape.experts, shape.rows_per_expert, shape.cols);
    match storage {
        Storage::Float(size) => ((rank * (k * p + d)) * size) as u64,
        Storage::Int8 => match matrix {
            // Basis [r, d], coefficients [p, r] per member.
            ExpertMatrix::Gate | ExpertMatrix::Up => {
                super::int8::stored_bytes(rank, d) + k as u64 * super::int8::stored_bytes(p, rank)
            }
            // Basis [d, r], coefficients [r, p] per member.
            ExpertMatrix::Down => {
                super::int8::stored_bytes(d, rank) + k as u64 * super::int8::stored_bytes(rank, p)
            }
        },
    }
}

/// How factors are stored.
#[derive(Debug, Clone, Copy)]
enum Storage {
    /// Floats of this many bytes.
    Float(usize),
    /// int8 codes with row-block scales.
    Int8,
}

/// Ranks offered to the solver: every rank up to 32, then about 3% apart.
fn rank_grid(max_rank: usize) -> Vec<usize> {
    let mut ranks = Vec::new();
    let mut rank = 1usize;
    while rank <= max_rank {
        ranks.push(rank);
        rank = match rank < 32 {
            true => rank + 1,
            false => (rank + (rank as f64 * 0.03).ceil() as usize).min(max_rank.max(rank + 1)),
        };
    }
    if ranks.last() != Some(&max_rank) && max_rank > 0 {
        ranks.push(max_rank);
    }
    ranks
}

impl<B: LinalgBackend> LowRank<B> {
    fn storage(&self) -> Storage {
        match self.int8 {
            true => Storage::Int8,
            false => Storage::Float(self.factor_dtype.size_in_bytes()),
        }
    }

    fn settings_for(&self, ratio: f64) -> Result<AllocationSettings> {
        let policy = self.settings.allocation.policy().ok_or_else(|| {
            Error::InvalidArgument("the solver's allocation has no score policy".into())
        })?;
        Ok(AllocationSettings {
            ratio,
            xi: self.settings.xi,
            policy,
            dense_fallback: self.settings.dense_fallback,
            residual: self.settings.residual,
            residual_fraction: self.settings.residual_fraction,
        })
    }

    /// The parameter ratio layer `layer`'s kept experts must meet: the run's ratio, or after
    /// removal what keeps the layer's share (a removed expert frees its covered parameters).
    fn layer_ratio(&self, layer: &LayerContext<B>) -> Result<f64> {
        let Some(pruning) = &layer.statistics.pruning else {
            return Ok(self.ratio);
        };
        let kept: f64 = layer
            .matrices
            .iter()
            .map(|&m| {
                let [rows, cols] = layer.experts.layout.shape(m);
                (rows * cols * layer.experts.layout.num_experts) as f64
            })
            .sum();
        let ratio = 1.0 - layer.target.target / kept;
        if ratio < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "removing {} of {} experts per layer removes more than --ratio {} pays for: \
                 lower --prune-fraction or let removal alone meet the budget (--methods \
                 prune,keep)",
                pruning.removed.len(),
                pruning.original_experts,
                self.ratio
            )));
        }
        Ok(ratio)
    }

    /// The paper's allocation: analyse the layer, allocate (per layer now, or for the whole
    /// model when the budget is model-wide, in `settle`), and offer the allocation.
    fn offer_scored(&self, layer: &LayerContext<B>) -> Result<Vec<Candidate>> {
        let analysis = analyse::analyse_matrices(
            layer.backend,
            layer.experts,
            layer.statistics,
            layer.matrices,
        )?;
        let dense_bytes = analysis
            .matrices
            .iter()
            .map(|m| {
                analysis
                    .groups
                    .iter()
                    .map(|members| self.dense_group_bytes(layer, m.matrix, members))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let ratio = self.layer_ratio(layer)?;
        let mut scored = ScoredLayer {
            analysis,
            dense_bytes,
            ratio,
        };
        let plan = match (layer.held_out, self.settings.xi_auto) {
            (Some(held_out), true) => {
                let search = tune::SearchSettings {
                    allocation: self.settings_for(ratio)?,
                    candidates: &self.settings.xi_candidates,
                    metric: self.settings.xi_metric,
                    whiten: self.settings.whiten,
                    whiten_ridge: self.settings.whiten_ridge,
                };
                let (plan, found) = tune::search_xi(
                    layer.backend,
                    layer.experts,
                    layer.statistics,
                    &scored.analysis,
                    held_out,
                    &search,
                )?;
                lock(&self.searches)?.insert(layer.statistics.layer, found);
                plan
            }
            _ => allocate_layer(&scored.analysis, &self.settings_for(ratio)?)?,
        };
        let candidates = planned_candidates(&scored, &plan, self.storage());
        scored.analysis.layer = layer.statistics.layer;
        lock(&self.scored)?.insert(layer.statistics.layer, scored);
        Ok(candidates)
    }

    /// The bytes of a group kept dense: int8 members with int8 factors, else as stored.
    fn dense_group_bytes(
        &self,
        layer: &LayerContext<B>,
        matrix: ExpertMatrix,
        members: &[usize],
    ) -> Result<u64> {
        let [rows, cols] = layer.experts.layout.shape(matrix);
        members
            .iter()
            .map(
                |&e| match self.int8 && !layer.experts.is_stored_fp8(e, matrix) {
                    true => Ok(super::int8::stored_bytes(rows, cols)),
                    false => layer.experts.stored_bytes(e, matrix),
                },
            )
            .sum()
    }

    /// The solver's allocation: every group a grid of ranks with their bytes and estimated
    /// output errors.
    fn offer_ranks(&self, layer: &LayerContext<B>) -> Result<Vec<Candidate>> {
        let statistics = layer.statistics;
        let layout = layer.experts.layout;
        let jobs: Vec<(ExpertMatrix, usize)> = layer
            .matrices
            .iter()
            .flat_map(|&m| (0..statistics.groups.len()).map(move |g| (m, g)))
            .collect();
        let offers = jobs
            .par_iter()
            .map(|&(matrix, g)| {
                let members = &statistics.groups[g];
                let shape = group_shape(layout, matrix, members.len());
                let keep_bytes: u64 = members
                    .iter()
                    .map(|&e| layer.experts.stored_bytes(e, matrix))
                    .sum::<Result<u64>>()?;
                let ranks: Vec<(usize, u64)> = rank_grid(shape.max_rank())
                    .into_iter()
                    .map(|rank| (rank, factored_bytes(shape, matrix, rank, self.storage())))
                    .take_while(|&(_, bytes)| bytes < keep_bytes)
                    .collect();
                let only: Vec<usize> = ranks.iter().map(|&(rank, _)| rank).collect();
                let errors = match only.is_empty() {
                    true => Vec::new(),
                    false => self.rank_errors(layer, matrix, g, &only)?,
                };
                Ok(ranks
                    .into_iter()
                    .zip(errors)
                    .map(|((rank, bytes), error)| Candidate {
                        method: NAME.into(),
                        unit: Unit::Group { matrix, group: g },
                        variant: rank as u64,
                        label: format!("rank {rank}"),
                        bytes,
                        parameters: (rank * shape.rank_cost()) as u64,
                        error,
                        signals: None,
                    })
                    .collect::<Vec<_>>())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(offers.into_iter().flatten().collect())
    }

    /// The estimated output error of group `g`'s `matrix` at each of `ranks` (truncation under
    /// the members' output weights, plus int8 rounding of the factors; [`estimate`]).
    fn rank_errors(
        &self,
        layer: &LayerContext<B>,
        matrix: ExpertMatrix,
        g: usize,
        ranks: &[usize],
    ) -> Result<Vec<f64>> {
        let (backend, statistics) = (layer.backend, layer.statistics);
        let members = &statistics.groups[g];
        let weights = statistics.group_weights(matrix, members).ok_or_else(|| {
            Error::InvalidArgument("lowrank needs the experts' statistics".into())
        })?;
        let ridge = self.settings.whiten_ridge;
        match matrix {
            ExpertMatrix::Gate | ExpertMatrix::Up => {
                let w = backend.to_host(&layer.experts.stacked(backend, matrix, members)?)?;
                let whitening = match (self.settings.whiten, statistics.group_gram.as_ref()) {
                    (true, Some(grams)) => {
                        Some(backend.to_host(&backend.whitening_factor(&grams[g], ridge)?)?)
                    }
                    (true, None) => {
                        return Err(Error::InvalidArgument(
                            "lowrank needs the groups' Gram matrices".into(),
                        ))
                    }
                    (false, _) => None,
                };
                // The spectrum is taken in single precision, so the product may be too.
                let x = match &whitening {
                    Some(s) => crate::linalg::single_product(w.as_ref(), s.as_ref()),
                    None => w,
                };
                estimate::input_side(&x, &weights, whitening.as_ref(), ranks, self.int8)
            }
            ExpertMatrix::Down => {
                let grams = statistics.expert_down_gram.as_ref().ok_or_else(|| {
                    Error::InvalidArgument("lowrank needs the experts' down_proj Grams".into())
                })?;
                let blocks = layer.experts.oriented_blocks(backend, matrix, members)?;
                let host: Vec<faer::Mat<f64>> = blocks
                    .iter()
                    .map(|b| backend.to_host(b))
                    .collect::<Result<_>>()?;
                let whitening: Vec<Option<faer::Mat<f64>>> = members
                    .iter()
                    .map(|&e| match self.settings.whiten {
                        true => backend
                            .whitening_factor(&grams[e], ridge)
                            .and_then(|s| backend.to_host(&s))
                            .map(Some),
                        false => Ok(None),
                    })
                    .collect::<Result<_>>()?;
                let members: Vec<estimate::OutputMember> = host
                    .iter()
                    .zip(&whitening)
                    .zip(&weights)
                    .map(
                        |((transposed, whitening), &weight)| estimate::OutputMember {
                            transposed,
                            whitening: whitening.as_ref(),
                            weight,
                        },
                    )
                    .collect();
                estimate::output_side(&members, ranks, self.int8)
            }
        }
    }

    fn factor_settings<'s>(&'s self, layer: &LayerContext<B>) -> FactorSettings<'s, B> {
        FactorSettings {
            factorizer: self.factorizer.as_ref(),
            whiten: self.settings.whiten,
            whiten_ridge: self.settings.whiten_ridge,
            residual_seed: self.settings.residual_seed,
            factor_dtype: self.factor_dtype,
            // int8 rounding of the factors dwarfs single precision's.
            precision: match self.int8 {
                true => factor::Precision::Single,
                false => factor::Precision::Double,
            },
            stored_dtype: layer.stored_dtype,
            factorize: true,
            keep_reconstruction: layer.export_dense,
        }
    }

    /// The factor jobs of the solver's chosen ranks.
    fn solver_jobs<'a>(
        &self,
        layer: &'a LayerContext<B>,
        chosen: &[Candidate],
    ) -> Result<Vec<GroupJob<'a, B::Matrix>>> {
        let statistics = layer.statistics;
        let frequencies = statistics.group_frequencies();
        chosen
            .iter()
            .map(|c| {
                let Unit::Group { matrix, group } = c.unit else {
                    return Err(Error::InvalidArgument(format!(
                        "lowrank offers group units, not {:?}",
                        c.unit
                    )));
                };
                let members = &statistics.groups[group];
                let shape = group_shape(layer.experts.layout, matrix, members.len());
                let rank = c.variant as usize;
                let report = GroupReport {
                    rank,
                    dense: false,
                    method: Some(NAME.into()),
                    storage: vec![self.storage_name()],
                    estimated_error: Some(c.error),
                    ..GroupReport::new(
                        members.clone(),
                        frequencies[group],
                        (shape.dense_params() as u64, c.parameters),
                    )
                };
                Ok(GroupJob {
                    matrix,
                    experts: members,
                    shape,
                    allocation: GroupAllocation { rank, dense: false },
                    residual_size: 0,
                    report,
                    gram: factor::input_gram(statistics, matrix, group),
                    member_grams: factor::member_grams(statistics, matrix, members),
                    weights: statistics.group_weights(matrix, members),
                })
            })
            .collect()
    }

    fn storage_name(&self) -> String {
        match self.int8 {
            true => int8::STORAGE_NAME.into(),
            false => format!("{:?}", self.factor_dtype).to_lowercase(),
        }
    }

    /// A factored or dense group as stored tensors under the format's names.
    fn group_output(
        &self,
        layer: &LayerContext<B>,
        matrix: ExpertMatrix,
        index: usize,
        group: FactoredGroup,
    ) -> Result<UnitOutput> {
        let layout = layer.experts.layout;
        let name = layout.name(matrix);
        let mut tensors = StoredTensors::default();
        let coefficients_name = match matrix {
            ExpertMatrix::Down => format::output_coefficients_name,
            ExpertMatrix::Gate | ExpertMatrix::Up => format::coefficients_name,
        };
        let dense = group.basis.is_none();
        for (slot, &expert) in group.report.experts.iter().enumerate() {
            let tensor = group.expert_tensors[slot].clone();
            match dense {
                false => {
                    let key = coefficients_name(&layout.block, expert, name);
                    self.insert_factor(&mut tensors, key, tensor)?;
                }
                true => {
                    let stored =
                        layer
                            .experts
                            .stored_tensors(expert, matrix, layer.stored_dtype)?;
                    // One tensor is the compressor's (a canonical view); an FP8 weight with its
                    // scales is a copy as stored.
                    match <[_; 1]>::try_from(stored) {
                        Ok([(key, _)]) => self.insert_factor(&mut tensors, key, tensor)?,
                        Err(stored) => {
                            for (key, t) in stored {
                                tensors.insert(key, t);
                            }
                        }
                    }
                }
            }
        }
        if let Some(basis) = group.basis {
            let key = format::basis_name(&layout.block, index, name);
            self.insert_factor(&mut tensors, key, basis)?;
        }
        if let Some(eta) = group.residual_eta {
            tensors.insert(
                format::residual_name(&layout.block, index, name),
                self.float_dtype(&eta, layer.stored_dtype)?,
            );
        }
        let reconstruction = match group.reconstruction {
            Some(rebuilt) => rebuilt
                .iter()
                .map(|t| self.float_dtype(t, layer.stored_dtype))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let mut report = group.report;
        report.storage = vec![self.storage_name()];
        Ok(UnitOutput {
            unit: Unit::Group {
                matrix,
                group: index,
            },
            tensors,
            reconstruction,
            rank: report.rank,
            residual_size: report.residual_size,
            storage: self.storage_name(),
            as_stored: false,
            report: Some(report),
        })
    }

    /// Adds a tensor the factoriser wrote: as it is, or as int8 codes with their scales.
    fn insert_factor(
        &self,
        tensors: &mut StoredTensors,
        key: String,
        tensor: Tensor,
    ) -> Result<()> {
        let is_float = matches!(
            tensor.dtype(),
            DType::F32 | DType::BF16 | DType::F16 | DType::F64
        );
        if !self.int8 || !is_float {
            tensors.insert(key, tensor);
            return Ok(());
        }
        let (codes, scales) = Int8Matrix::from_tensor(&tensor)?.to_tensors()?;
        tensors.insert(int8::scale_name(&key), scales);
        tensors.insert_int8(key, codes);
        Ok(())
    }

    /// `tensor` as written: unchanged, or in the stored dtype with int8 factors (which the factor
    /// stage hands over in f32, the precision they are quantised from).
    fn float_dtype(&self, tensor: &Tensor, stored_dtype: DType) -> Result<Tensor> {
        Ok(match self.int8 {
            true => tensor.to_dtype(stored_dtype)?,
            false => tensor.clone(),
        })
    }
}

/// `matrix`'s group of `experts` members in the factor stage's orientation.
fn group_shape(layout: &ExpertLayout, matrix: ExpertMatrix, experts: usize) -> GroupShape {
    let [rows_per_expert, cols] = oriented_shape(layout, matrix);
    GroupShape {
        experts,
        rows_per_expert,
        cols,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| Error::InvalidArgument("a worker thread panicked".into()))
}

/// One candidate per group of `plan`: its rank or the dense members, with the allocation's
/// signals.
fn planned_candidates(scored: &ScoredLayer, plan: &RankPlan, storage: Storage) -> Vec<Candidate> {
    let analysis = &scored.analysis;
    let mut candidates = Vec::new();
    for ((m, matrix_plan), dense_bytes) in analysis
        .matrices
        .iter()
        .zip(&plan.matrices)
        .zip(&scored.dense_bytes)
    {
        for (g, allocation) in matrix_plan.allocations.iter().enumerate() {
            let shape = m.shapes[g];
            let reserved = match allocation.dense {
                true => 0,
                false => matrix_plan.reserved[g],
            };
            let (variant, label, bytes, parameters) = match allocation.dense {
                true => (
                    DENSE,
                    "dense".to_string(),
                    dense_bytes[g],
                    shape.dense_params(),
                ),
                false => {
                    let rank = allocation.rank;
                    let residual_bytes = match storage {
                        Storage::Float(size) => (reserved * size) as u64,
                        Storage::Int8 => (reserved * 2) as u64,
                    };
                    (
                        rank as u64,
                        format!("rank {rank}"),
                        factored_bytes(shape, m.matrix, rank, storage) + residual_bytes,
                        rank * shape.rank_cost() + reserved,
                    )
                }
            };
            candidates.push(Candidate {
                method: NAME.into(),
                unit: Unit::Group {
                    matrix: m.matrix,
                    group: g,
                },
                variant,
                label,
                bytes,
                parameters: parameters as u64,
                error: 0.0,
                signals: Some(GroupSignals {
                    effective_rank: m.effective_ranks[g],
                    frequency: analysis.group_frequency[g],
                    density: matrix_plan.density[g],
                    score: matrix_plan.scores[g],
                    reserved,
                }),
            });
        }
    }
    candidates
}

/// The analysis and the paper's plan of a layer, from its chosen candidates' signals.
fn rebuild_plan<B: LinalgBackend>(
    layer: &LayerContext<B>,
    chosen: &[Candidate],
) -> Result<(LayerAnalysis, RankPlan)> {
    let statistics = layer.statistics;
    let groups = statistics.groups.clone();
    let mut matrices = Vec::new();
    let mut plans = Vec::new();
    for &matrix in layer.matrices {
        let mut by_group: Vec<Option<&Candidate>> = vec![None; groups.len()];
        for c in chosen {
            if let Unit::Group { matrix: m, group } = c.unit {
                if m == matrix && group < groups.len() {
                    by_group[group] = Some(c);
                }
            }
        }
        let found: Vec<&Candidate> = by_group.iter().flatten().copied().collect();
        if found.is_empty() {
            continue;
        }
        if found.len() != groups.len() {
            return Err(Error::InvalidArgument(format!(
                "layer {}: the paper's allocation covers every group of {matrix}, but the plan \
                 holds {} of {}",
                statistics.layer,
                found.len(),
                groups.len()
            )));
        }
        let signals: Vec<GroupSignals> = found
            .iter()
            .map(|c| c.signals.unwrap_or_default())
            .collect();
        matrices.push(MatrixAnalysis {
            matrix,
            effective_ranks: signals.iter().map(|s| s.effective_rank).collect(),
            shapes: groups
                .iter()
                .map(|g| group_shape(layer.experts.layout, matrix, g.len()))
                .collect(),
        });
        plans.push(MatrixPlan {
            matrix,
            density: signals.iter().map(|s| s.density).collect(),
            scores: signals.iter().map(|s| s.score).collect(),
            reserved: signals.iter().map(|s| s.reserved).collect(),
            allocations: found
                .iter()
                .map(|c| GroupAllocation {
                    rank: if c.variant == DENSE {
                        0
                    } else {
                        c.variant as usize
                    },
                    dense: c.variant == DENSE,
                })
                .collect(),
        });
    }
    let analysis = LayerAnalysis {
        layer: statistics.layer,
        group_frequency: statistics.group_frequencies(),
        groups,
        matrices,
    };
    let plan = RankPlan {
        layer: statistics.layer,
        matrices: plans,
    };
    Ok((analysis, plan))
}

impl<B: LinalgBackend> Method<B> for LowRank<B> {
    fn name(&self) -> &'static str {
        NAME
    }

    fn acts_without_budget(&self) -> bool {
        // The paper's allocation decides which groups it factors (and stores dense groups as
        // int8 with int8 factors) by its own rule, not by the budget solver's.
        self.settings.allocation.policy().is_some()
    }

    fn needs(&self) -> Needs {
        let solver = self.settings.allocation.policy().is_none();
        Needs {
            group_gram: self.settings.whiten || solver,
            down_gram: self.down,
            expert_statistics: solver,
            saliency: false,
            routed_inputs: false,
            held_out: self
                .settings
                .xi_auto
                .then_some(self.settings.holdout_fraction),
        }
    }

    fn offer(&self, layer: &LayerContext<B>) -> Result<Vec<Candidate>> {
        match self.settings.allocation.policy() {
            None => self.offer_ranks(layer),
            Some(_) => self.offer_scored(layer),
        }
    }

    fn settles_from_offers(&self) -> bool {
        // The paper's model-wide allocation re-reads each layer's analysis its offer kept.
        self.settings.allocation.policy().is_none()
    }

    fn settle(&self, offers: &mut [LayerOffer]) -> Result<()> {
        if self.settings.allocation.policy().is_none() {
            return Ok(());
        }
        let scored = lock(&self.scored)?;
        // One budget over several layers: the paper's model-wide allocation replaces the
        // per-layer one the offers hold.
        if offers.len() > 1 && !self.settings.xi_auto {
            let layers: Vec<&ScoredLayer> =
                offers.iter().filter_map(|o| scored.get(&o.layer)).collect();
            let analyses: Vec<LayerAnalysis> = layers.iter().map(|l| l.analysis.clone()).collect();
            let ratio = layers.first().map_or(self.ratio, |l| l.ratio);
            let plans = allocate_model(&analyses, &self.settings_for(ratio)?)?;
            for (offer, (plan, layer)) in offers.iter_mut().zip(plans.iter().zip(&layers)) {
                offer.candidates.retain(|c| c.method != NAME);
                offer
                    .candidates
                    .extend(planned_candidates(layer, plan, self.storage()));
            }
        }
        // The allocation decides every group of the covered matrices.
        for offer in offers.iter_mut() {
            let covered: Vec<ExpertMatrix> = offer
                .candidates
                .iter()
                .filter(|c| c.method == NAME)
                .map(|c| c.unit.matrix())
                .collect();
            offer
                .candidates
                .retain(|c| c.method == NAME || !covered.contains(&c.unit.matrix()));
        }
        Ok(())
    }

    fn apply(&self, layer: &LayerContext<B>, chosen: &[Candidate]) -> Result<Vec<UnitOutput>> {
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let settings = self.factor_settings(layer);
        let groups: Vec<(ExpertMatrix, usize, FactoredGroup)> =
            match self.settings.allocation.policy() {
                None => {
                    let jobs = self.solver_jobs(layer, chosen)?;
                    let units: Vec<(ExpertMatrix, usize)> = chosen
                        .iter()
                        .filter_map(|c| match c.unit {
                            Unit::Group { matrix, group } => Some((matrix, group)),
                            Unit::Slot { .. } => None,
                        })
                        .collect();
                    let factored =
                        factor::factor_groups(layer.backend, layer.experts, jobs, &settings)?;
                    units
                        .into_iter()
                        .zip(factored)
                        .map(|((m, g), f)| (m, g, f))
                        .collect()
                }
                Some(_) => {
                    let (analysis, plan) = rebuild_plan(layer, chosen)?;
                    let factored = factor::factor_layer(
                        layer.backend,
                        layer.experts,
                        layer.statistics,
                        &analysis,
                        &plan,
                        &settings,
                    )?;
                    factored
                        .matrices
                        .into_iter()
                        .flat_map(|m| {
                            let matrix = m.matrix;
                            m.groups
                                .into_iter()
                                .enumerate()
                                .map(move |(g, f)| (matrix, g, f))
                        })
                        .collect()
                }
            };
        groups
            .into_iter()
            .map(|(matrix, index, group)| self.group_output(layer, matrix, index, group))
            .collect()
    }

    fn resolved_settings(&self) -> Option<serde_json::Value> {
        serde_json::to_value(&self.settings).ok()
    }

    fn annotate(&self, record: &mut CompressionRecord) {
        record.basis_activation = self.factorizer.activation();
        record.residual_seed = self.settings.residual_seed;
        if self.int8 {
            record.factor_storage = Some(int8::STORAGE_NAME.into());
        }
    }

    fn describe_layer(&self, layer: usize, report: &mut LayerReport) {
        if let Ok(mut searches) = lock(&self.searches) {
            report.xi_search = searches.remove(&layer);
        }
    }
}
