//! Settings files written before methods became plug-ins (no `version` key), read with their
//! old meaning: the schema of that time ([`LegacyOptions`], where a key left out meant the
//! paper's preset) and its conversion to this build's options, done against the checkpoint
//! because the old byte budget was turned into a parameter ratio for the storage the run wrote.
//!
//! The conversion keeps the old outputs: `method = "lowrank"` is `--methods lowrank,keep` with
//! the paper's allocation; `prune` removes the experts the old ratio paid for
//! (`round(ρ·n·t/3)`) and keeps the rest as stored; `prune+lowrank` removes what the old split
//! removed and factors the kept experts at the old parameter ratio (the budget counts a removed
//! expert's uncovered matrices as the old split did); a byte
//! budget becomes the parameter ratio the old run computed (int8 scales estimated at the ranks
//! that ratio gives, routed experts outside the compressed layers kept).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::budget::routed_expert_storage;
use super::methods::lowrank::{
    self, allocate::Allocation, tune::TuneMetric, FactorizerKind, LowRankSettings, RankAllocation,
};
use super::methods::prune::{PruneSettings, RoutingLimits, Saliency};
use super::options::{
    BudgetOptions, BudgetScope, BudgetUnit, CalibrationOptions, CompressOptions, Granularity,
    OutputOptions,
};
use crate::checkpoint::experts::ExpertMatrix;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// What the old `compress` did to the routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LegacyMethod {
    /// Low-rank factorisation.
    #[serde(rename = "lowrank")]
    LowRank,
    /// Expert pruning.
    #[serde(rename = "prune")]
    Prune,
    /// Pruning, then low-rank at the same budget.
    #[serde(rename = "prune+lowrank")]
    PruneLowRank,
}

/// The old `[calibration]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LegacyCalibration {
    /// Calibration data.
    pub data: PathBuf,
    /// Windows.
    pub samples: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Window selection seed.
    pub seed: u64,
    /// Windows per batch.
    pub batch_size: usize,
    /// Experts per group.
    pub group_size: usize,
    /// Collect Gram matrices for reports.
    pub activation_statistics: bool,
    /// The statistics cache.
    pub statistics_cache: Option<PathBuf>,
    /// `--xi auto`'s held-out fraction.
    pub holdout_fraction: f64,
}

impl Default for LegacyCalibration {
    fn default() -> Self {
        let current = CalibrationOptions::default();
        Self {
            data: current.data,
            samples: current.samples,
            seq_len: current.seq_len,
            seed: current.seed,
            batch_size: current.batch_size,
            // The default when files without `version` were written.
            group_size: 4,
            activation_statistics: current.activation_statistics,
            statistics_cache: None,
            holdout_fraction: lowrank::DEFAULT_HOLDOUT_FRACTION,
        }
    }
}

/// The old `[allocation]` table (a key left out meant the paper's value).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LegacyAllocation {
    /// Factored matrices.
    pub matrices: Vec<ExpertMatrix>,
    /// What the ratio is a fraction of.
    pub budget: BudgetUnit,
    /// The ratio.
    pub ratio: f64,
    /// ξ.
    pub xi: f64,
    /// `--xi auto`.
    pub xi_auto: bool,
    /// Its candidates.
    pub xi_candidates: Vec<f64>,
    /// Its metric.
    pub xi_metric: TuneMetric,
    /// The score.
    pub policy: Allocation,
    /// Budget scope.
    pub budget_scope: BudgetScope,
    /// Dense fallback.
    pub dense_fallback: bool,
    /// Sparse residual.
    pub residual: bool,
    /// Its fraction.
    pub residual_fraction: f64,
}

impl Default for LegacyAllocation {
    fn default() -> Self {
        let paper = LowRankSettings::paper();
        Self {
            matrices: super::options::PAPER_MATRICES.to_vec(),
            budget: BudgetUnit::Parameters,
            ratio: 0.4,
            xi: paper.xi,
            xi_auto: false,
            xi_candidates: paper.xi_candidates,
            xi_metric: paper.xi_metric,
            policy: Allocation::Rfid,
            budget_scope: BudgetScope::Layer,
            dense_fallback: true,
            residual: false,
            residual_fraction: paper.residual_fraction,
        }
    }
}

/// The old `[factorization]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LegacyFactorization {
    /// Factoriser.
    pub factorizer: FactorizerKind,
    /// Adam steps.
    pub fit_steps: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Whitening.
    pub whiten: bool,
    /// Whitening ridge.
    pub whiten_ridge: f64,
    /// Residual seed.
    pub residual_seed: u64,
    /// Factor dtype.
    pub factor_dtype: String,
}

impl Default for LegacyFactorization {
    fn default() -> Self {
        let paper = LowRankSettings::paper();
        Self {
            factorizer: paper.factorizer,
            fit_steps: paper.fit_steps,
            learning_rate: paper.learning_rate,
            whiten: paper.whiten,
            whiten_ridge: paper.whiten_ridge,
            residual_seed: paper.residual_seed,
            factor_dtype: paper.factor_dtype,
        }
    }
}

/// The old `[pruning]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LegacyPruning {
    /// The method.
    pub method: LegacyMethod,
    /// Saliency.
    pub saliency: Saliency,
    /// `prune+lowrank`'s fraction.
    pub fraction: Option<f64>,
}

impl Default for LegacyPruning {
    fn default() -> Self {
        Self {
            method: LegacyMethod::LowRank,
            saliency: Saliency::Reap,
            fraction: None,
        }
    }
}

/// A settings file of the old schema.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LegacyOptions {
    /// Input model.
    pub model: PathBuf,
    /// Device.
    pub device: Option<String>,
    /// Calibration.
    pub calibration: LegacyCalibration,
    /// Allocation.
    pub allocation: LegacyAllocation,
    /// Factorisation.
    pub factorization: LegacyFactorization,
    /// Output.
    pub output: OutputOptions,
    /// Pruning.
    pub pruning: LegacyPruning,
}

impl LegacyOptions {
    /// This build's options with the file's old meaning on `checkpoint`, and one sentence
    /// saying how they were read.
    pub fn convert(&self, checkpoint: &Checkpoint) -> Result<(CompressOptions, String)> {
        let allocation = &self.allocation;
        let targeted: Vec<ExpertMatrix> = ExpertMatrix::ALL
            .into_iter()
            .filter(|m| allocation.matrices.contains(m))
            .collect();
        let parameter_ratio = match allocation.budget {
            BudgetUnit::Parameters => allocation.ratio,
            BudgetUnit::Bytes => self.old_parameter_ratio(checkpoint, &targeted)?,
        };
        let limits = RoutingLimits::of(checkpoint)?;
        let n = limits.experts as f64;
        let t = targeted.len() as f64;
        let (methods, prune_fraction, ratio) = match self.pruning.method {
            LegacyMethod::LowRank => (vec!["lowrank", "keep"], None, parameter_ratio),
            LegacyMethod::Prune => {
                // The experts the old ratio paid for; the budget is what removing them removes.
                let m = limits.checked_removal(parameter_ratio * n * t / 3.0, checkpoint)?;
                let f = m as f64 / n;
                (vec!["prune", "keep"], Some(f), 3.0 * f / t)
            }
            LegacyMethod::PruneLowRank => {
                let wanted = match self.pruning.fraction {
                    Some(f) => limits.checked_removal(f * n, checkpoint)?,
                    None => limits.largest_valid_removal(
                        (parameter_ratio * n * t / 6.0)
                            .min(n * super::methods::prune::DEFAULT_MAX_PRUNED_FRACTION),
                    ),
                };
                let methods = match wanted {
                    0 => vec!["lowrank", "keep"],
                    _ => vec!["prune", "lowrank", "keep"],
                };
                (
                    methods,
                    (wanted > 0).then_some(wanted as f64 / n),
                    parameter_ratio,
                )
            }
        };
        let matrices = targeted;
        let mut options = CompressOptions {
            model: self.model.clone(),
            device: self.device.clone().unwrap_or_else(|| "cpu".into()),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            calibration: CalibrationOptions {
                data: self.calibration.data.clone(),
                samples: self.calibration.samples,
                seq_len: self.calibration.seq_len,
                seed: self.calibration.seed,
                batch_size: self.calibration.batch_size,
                group_size: crate::pipeline::GroupSize::Experts(self.calibration.group_size),
                activation_statistics: self.calibration.activation_statistics,
                statistics_cache: self.calibration.statistics_cache.clone(),
            },
            budget: BudgetOptions {
                ratio,
                unit: BudgetUnit::Parameters,
                matrices,
                scope: allocation.budget_scope,
                granularity: Granularity::Expert,
                layer_floor: 0.0,
                bits_per_weight: None,
            },
            output: self.output.clone(),
            ..CompressOptions::default()
        };
        if methods.contains(&"lowrank") {
            options.set_settings(&self.low_rank_settings())?;
        }
        if methods.contains(&"prune") {
            options.set_settings(&PruneSettings {
                saliency: self.pruning.saliency,
                fraction: prune_fraction,
            })?;
        }
        let note = format!(
            "a settings file without `version` is read with its old meaning: --method {} at {}              {} of {}, converted to --methods {} at {ratio:.6} of the {} parameters",
            match self.pruning.method {
                LegacyMethod::LowRank => "lowrank",
                LegacyMethod::Prune => "prune",
                LegacyMethod::PruneLowRank => "prune+lowrank",
            },
            allocation.ratio,
            allocation.budget,
            allocation
                .matrices
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(","),
            options.methods.join(","),
            options
                .budget
                .matrices
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(","),
        );
        Ok((options, note))
    }

    fn low_rank_settings(&self) -> LowRankSettings {
        let (a, f) = (&self.allocation, &self.factorization);
        LowRankSettings {
            allocation: RankAllocation::from_policy(a.policy),
            xi: a.xi,
            xi_auto: a.xi_auto,
            xi_candidates: a.xi_candidates.clone(),
            xi_metric: a.xi_metric,
            holdout_fraction: self.calibration.holdout_fraction,
            dense_fallback: a.dense_fallback,
            residual: a.residual,
            residual_fraction: a.residual_fraction,
            factorizer: f.factorizer,
            fit_steps: f.fit_steps,
            learning_rate: f.learning_rate,
            whiten: f.whiten,
            whiten_ridge: f.whiten_ridge,
            residual_seed: f.residual_seed,
            factor_dtype: f.factor_dtype.clone(),
        }
    }

    /// The parameter ratio the old byte budget came to.
    fn old_parameter_ratio(
        &self,
        checkpoint: &Checkpoint,
        targeted: &[ExpertMatrix],
    ) -> Result<f64> {
        let spec = crate::models::ArchConfig::from_checkpoint(checkpoint)?.spec();
        let blocks: Vec<String> = spec
            .moe_layers
            .iter()
            .flatten()
            .map(|layout| format!("{}.", layout.block))
            .collect();
        let storage = routed_expert_storage(checkpoint, &blocks);
        let Some(layout) = spec.moe_layers.iter().flatten().next() else {
            return Err(Error::InvalidArgument(format!(
                "{} has no MoE layer",
                checkpoint.dir().display()
            )));
        };
        if storage.compressed_parameters == 0 {
            return Err(Error::InvalidArgument(format!(
                "{} has no routed expert tensors to size",
                checkpoint.dir().display()
            )));
        }
        let input = storage.compressed_bytes as f64 / storage.compressed_parameters as f64;
        let byte_ratio = self.allocation.ratio;
        let kept_of_compressed = ((1.0 - byte_ratio) * storage.bytes as f64
            - (storage.bytes - storage.compressed_bytes) as f64)
            / storage.compressed_bytes as f64;
        let factors = self.pruning.method != LegacyMethod::Prune;
        let int8 = self.factorization.factor_dtype == lowrank::INT8_FACTORS;
        let output = match (factors, int8) {
            (false, _) => FactorStorage::Plain(input),
            (true, true) => FactorStorage::Int8 {
                group: GroupDims {
                    experts: self.calibration.group_size.min(layout.num_experts).max(1),
                    intermediate: layout.intermediate_size,
                    hidden: layout.hidden_size,
                },
                down: targeted.contains(&ExpertMatrix::Down),
                targeted: targeted.len(),
            },
            (true, false) => FactorStorage::Plain(
                lowrank::factor_dtype_of(
                    &self.factorization.factor_dtype,
                    checkpoint.dominant_dtype(),
                )?
                .size_in_bytes() as f64,
            ),
        };
        let mut bytes_per_parameter = output.bytes_per_parameter(0.0);
        let mut ratio = 0.0;
        for iteration in 0..32 {
            ratio = parameter_ratio(
                1.0 - kept_of_compressed,
                targeted.len(),
                input / bytes_per_parameter,
            )
            .ok_or_else(|| unreachable_budget(byte_ratio, targeted))?;
            let next = output.bytes_per_parameter(ratio);
            if (next - bytes_per_parameter).abs() < 1e-12 || iteration == 31 {
                break;
            }
            bytes_per_parameter = next;
        }
        Ok(ratio)
    }
}

/// The parameter ratio of `targeted` of 3 matrices that removes `byte_ratio` (in [0, 1)) of the
/// routed bytes when a kept parameter costs `1 / shrink` of its input bytes (module docs); None
/// when the untargeted matrices alone keep more than `1 − byte_ratio`.
pub fn parameter_ratio(byte_ratio: f64, targeted: usize, shrink: f64) -> Option<f64> {
    let t = targeted as f64;
    let targeted_kept = ((1.0 - byte_ratio) * 3.0 - (3.0 - t)) * shrink / t;
    (targeted_kept > 0.0).then(|| (1.0 - targeted_kept).max(0.0))
}

/// Why `--ratio byte_ratio` cannot be met with only `targeted` factored.
fn unreachable_budget(byte_ratio: f64, targeted: &[ExpertMatrix]) -> Error {
    let missing: Vec<&str> = ExpertMatrix::ALL
        .iter()
        .filter(|m| !targeted.contains(m))
        .map(|m| m.name())
        .collect();
    Error::InvalidArgument(format!(
        "--ratio {byte_ratio} of the routed experts' bytes cannot be met: the matrices left out \
         of --matrices ({}) alone keep {:.3} of them; add them to --matrices or lower --ratio",
        missing.join(", "),
        missing.len() as f64 / 3.0
    ))
}

/// Stored bytes per int8 parameter of a matrix with `cols` columns (one f32 scale per row and
/// 128 columns).
fn int8_bytes_per_parameter(cols: f64) -> f64 {
    1.0 + candle_core::DType::F32.size_in_bytes() as f64
        * (cols / crate::checkpoint::int8::BLOCK as f64).ceil()
        / cols
}

/// The shape of one expert group: `experts` members of [intermediate, hidden] matrices.
#[derive(Debug, Clone, Copy)]
struct GroupDims {
    experts: usize,
    intermediate: usize,
    hidden: usize,
}

/// How the targeted matrices are written.
#[derive(Debug, Clone, Copy)]
enum FactorStorage {
    /// A fixed number of bytes per parameter.
    Plain(f64),
    /// int8 factors of groups of `group`'s shape; `targeted` matrices, down among them or not.
    Int8 {
        group: GroupDims,
        down: bool,
        targeted: usize,
    },
}

impl FactorStorage {
    /// Bytes per kept parameter when the fraction `ratio` of the parameters is removed.
    fn bytes_per_parameter(self, ratio: f64) -> f64 {
        match self {
            FactorStorage::Plain(bytes) => bytes,
            FactorStorage::Int8 {
                group,
                down,
                targeted,
            } => {
                let (input_side, output_side) = group.int8_bytes_per_parameter(ratio);
                match down {
                    true => ((targeted - 1) as f64 * input_side + output_side) / targeted as f64,
                    false => input_side,
                }
            }
        }
    }
}

impl GroupDims {
    /// Bytes per kept int8 parameter of an input-side (gate/up) and an output-side (down) group
    /// at the rank every group of this shape gets when `ratio` of the parameters is removed.
    fn int8_bytes_per_parameter(self, ratio: f64) -> (f64, f64) {
        let (k, p, d) = (
            self.experts as f64,
            self.intermediate as f64,
            self.hidden as f64,
        );
        let rank = (1.0 - ratio) * k * p * d / (k * p + d);
        if rank < 1.0 || rank * (k * p + d) >= k * p * d {
            // Kept dense: members [p, d] (gate/up) and [d, p] (down).
            return (int8_bytes_per_parameter(d), int8_bytes_per_parameter(p));
        }
        let per_rank = rank * (d + k * p);
        // gate/up: basis [rank, d] and coefficients [p, rank]; down: basis [d, rank] and
        // coefficients [rank, p].
        let input_side = (rank * d * int8_bytes_per_parameter(d)
            + k * p * rank * int8_bytes_per_parameter(rank))
            / per_rank;
        let output_side = (d * rank * int8_bytes_per_parameter(rank)
            + k * rank * p * int8_bytes_per_parameter(p))
            / per_rank;
        (input_side, output_side)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_alone_meets_a_small_byte_budget() {
        // bf16 in, int8 out: 0.4 of the bytes is met by int8 storage alone.
        let shrink = 2.0 / (1.0 + 4.0 / 128.0);
        assert_eq!(parameter_ratio(0.4, 3, shrink), Some(0.0));
        let rho = parameter_ratio(0.6, 3, shrink).unwrap();
        assert!(((1.0 - rho) / shrink - 0.4).abs() < 1e-12, "{rho}");
    }

    #[test]
    fn an_old_file_parses_with_the_paper_meaning_of_missing_keys() {
        let legacy: LegacyOptions = toml::from_str("[allocation]\nratio = 0.3\n").unwrap();
        assert_eq!(legacy.allocation.budget, BudgetUnit::Parameters);
        assert_eq!(
            legacy.allocation.matrices,
            super::super::options::PAPER_MATRICES.to_vec()
        );
        assert_eq!(legacy.factorization.factor_dtype, "auto");
        assert_eq!(legacy.pruning.method, LegacyMethod::LowRank);
    }
}
