//! The options of a compression run, grouped by the stage that reads them; also the schema of
//! `compress.toml` (one table per group).

use std::path::PathBuf;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::allocate::Allocation;
pub use super::prune::{CompressMethod, PruningOptions, Saliency};
use crate::checkpoint::experts::ExpertMatrix;
use crate::error::{Error, Result};

/// Which factoriser turns a group into coefficients and a basis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FactorizerKind {
    /// Truncated SVD (closed form), optionally activation-aware.
    Svd,
    /// MoBE-style `A·SiLU(B)` fitted with Adam from the SVD.
    Basis,
}

impl FactorizerKind {
    /// Every factoriser, in the order the command line lists them.
    pub const ALL: [FactorizerKind; 2] = [FactorizerKind::Svd, FactorizerKind::Basis];

    /// The lowercase name used on the command line and in saved settings.
    pub fn name(&self) -> &'static str {
        match self {
            FactorizerKind::Svd => "svd",
            FactorizerKind::Basis => "basis",
        }
    }

    /// One line saying what the factoriser does (for help texts).
    pub fn description(&self) -> &'static str {
        match self {
            FactorizerKind::Svd => "Truncated SVD (closed form), optionally activation-aware",
            FactorizerKind::Basis => "MoBE-style `A·SiLU(B)` fitted with Adam from the SVD",
        }
    }
}

impl std::fmt::Display for FactorizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for FactorizerKind {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        super::allocate::parse_named("factorizer", name, &Self::ALL, Self::name)
    }
}

/// Where the parameter budget is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetScope {
    /// Each layer and matrix type gets `(1−ρ)` of its own parameters.
    Layer,
    /// All layers share one budget per matrix type (holds every layer's statistics in memory).
    Model,
}

impl BudgetScope {
    /// Every scope, in the order the command line lists them.
    pub const ALL: [BudgetScope; 2] = [BudgetScope::Layer, BudgetScope::Model];

    /// The lowercase name used on the command line and in saved settings.
    pub fn name(&self) -> &'static str {
        match self {
            BudgetScope::Layer => "layer",
            BudgetScope::Model => "model",
        }
    }

    /// One line saying what the scope means (for help texts).
    pub fn description(&self) -> &'static str {
        match self {
            BudgetScope::Layer => "Each layer and matrix type gets `(1−ρ)` of its own parameters",
            BudgetScope::Model => {
                "All layers share one budget per matrix type (holds every layer's statistics in memory)"
            }
        }
    }
}

impl std::fmt::Display for BudgetScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BudgetScope {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        super::allocate::parse_named("budget scope", name, &Self::ALL, Self::name)
    }
}

/// What `--ratio` is a fraction of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetUnit {
    /// The routed experts' stored bytes (all three matrices, as the input stores them); the run
    /// turns it into a parameter ratio for the storage it writes (see `pipeline::budget`).
    Bytes,
    /// The parameters of the matrices `--matrices` names (the paper's ratio).
    Parameters,
}

impl BudgetUnit {
    /// Every unit, in the order the command line lists them.
    pub const ALL: [BudgetUnit; 2] = [BudgetUnit::Bytes, BudgetUnit::Parameters];

    /// The lowercase name used on the command line and in saved settings.
    pub fn name(&self) -> &'static str {
        match self {
            BudgetUnit::Bytes => "bytes",
            BudgetUnit::Parameters => "parameters",
        }
    }

    /// One line saying what the unit means (for help texts).
    pub fn description(&self) -> &'static str {
        match self {
            BudgetUnit::Bytes => {
                "--ratio is the fraction of the routed experts' stored bytes removed"
            }
            BudgetUnit::Parameters => {
                "--ratio is the fraction of the --matrices' parameters removed (the paper's ratio)"
            }
        }
    }
}

impl std::fmt::Display for BudgetUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BudgetUnit {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        super::allocate::parse_named("budget", name, &Self::ALL, Self::name)
    }
}

/// What the calibrate stage reads: the data, its windows, and which statistics to collect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CalibrationOptions {
    /// Calibration data: text, JSON lines with `text`, or safetensors with `input_ids`.
    pub data: PathBuf,
    /// Calibration windows.
    pub samples: usize,
    /// Tokens per calibration window.
    pub seq_len: usize,
    /// Window selection seed (0 = the first `samples` consecutive windows).
    pub seed: u64,
    /// Windows per forward batch.
    pub batch_size: usize,
    /// Experts per frequency-sorted group (k); statistics are kept per group.
    pub group_size: usize,
    /// Collect per-group input Gram matrices even without whitening, to report activation
    /// errors (d×d doubles per group).
    pub activation_statistics: bool,
    /// Save calibration statistics here, or reuse them if the file holds statistics of the same
    /// model, windows and grouping (skips the forward passes; holds all layers in memory).
    /// Not used with `--xi auto`, which needs the held-out windows' activations.
    pub statistics_cache: Option<PathBuf>,
    /// `--xi auto`: fraction of the windows held out (at least one) to measure the candidates
    /// on; they contribute neither to the Gram matrices nor to the routing counts.
    pub holdout_fraction: f64,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        Self {
            data: PathBuf::new(),
            samples: 128,
            seq_len: 512,
            seed: 0,
            batch_size: 8,
            group_size: 4,
            activation_statistics: true,
            statistics_cache: None,
            holdout_fraction: super::tune::DEFAULT_HOLDOUT_FRACTION,
        }
    }
}

/// The matrices factored by default: gate, up and down.
pub const DEFAULT_MATRICES: [ExpertMatrix; 3] =
    [ExpertMatrix::Gate, ExpertMatrix::Up, ExpertMatrix::Down];

/// The matrices the paper factors: gate and up (`down_proj` stays dense).
pub const PAPER_MATRICES: [ExpertMatrix; 2] = [ExpertMatrix::Gate, ExpertMatrix::Up];

/// What the allocate stage reads: the budget and how it is shared between groups. In a config
/// file, a key left out takes the paper preset's value ([`AllocationOptions::paper`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default = "AllocationOptions::paper", deny_unknown_fields)]
pub struct AllocationOptions {
    /// The routed-expert matrices that are factored (`--matrices`; default gate, up and down,
    /// the others stay dense). `down` shares its basis on the output side (docs/FORMAT.md).
    pub matrices: Vec<ExpertMatrix>,
    /// What `ratio` is a fraction of: the routed experts' stored bytes (default) or the
    /// targeted matrices' parameters.
    pub budget: BudgetUnit,
    /// Fraction ρ of the budget's unit to remove.
    pub ratio: f64,
    /// Weight ξ of information density in the fused score.
    pub xi: f64,
    /// `--xi auto`: choose ξ per layer among `xi_candidates` by the layer's output error on
    /// held-out calibration windows (`xi` is then unused; see `pipeline::tune`).
    pub xi_auto: bool,
    /// The ξ values `--xi auto` tries.
    pub xi_candidates: Vec<f64>,
    /// How `--xi auto` weighs the held-out tokens' errors.
    pub xi_metric: super::tune::TuneMetric,
    /// Rank allocation policy.
    pub policy: Allocation,
    /// Budget scope.
    pub budget_scope: BudgetScope,
    /// Keep a group dense when factoring it would not save parameters.
    pub dense_fallback: bool,
    /// Reserve part of each group's budget for the sparse-projection residual.
    pub residual: bool,
    /// Residual size as a fraction of each group's dense parameters.
    pub residual_fraction: f64,
}

impl Default for AllocationOptions {
    fn default() -> Self {
        Self {
            matrices: DEFAULT_MATRICES.to_vec(),
            budget: BudgetUnit::Bytes,
            ratio: 0.4,
            xi: 0.2,
            xi_auto: false,
            xi_candidates: super::tune::DEFAULT_XI_CANDIDATES.to_vec(),
            xi_metric: super::tune::TuneMetric::Residual,
            policy: Allocation::Rfid,
            budget_scope: BudgetScope::Layer,
            dense_fallback: true,
            residual: false,
            residual_fraction: 0.03,
        }
    }
}

/// What the factor stage reads: the factoriser and the form of the written factors. In a config
/// file, a key left out takes the paper preset's value ([`FactorizationOptions::paper`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default = "FactorizationOptions::paper", deny_unknown_fields)]
pub struct FactorizationOptions {
    /// Factoriser.
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
    /// Dtype of the written factors: `auto` (the checkpoint's), `f32`, `bf16`, `f16` or `int8`
    /// (int8 codes with per-row scales of 128-column blocks).
    pub factor_dtype: String,
}

impl Default for FactorizationOptions {
    fn default() -> Self {
        Self {
            factorizer: FactorizerKind::Svd,
            fit_steps: 500,
            learning_rate: 0.07,
            whiten: true,
            whiten_ridge: 1e-4,
            residual_seed: 0x5eed,
            factor_dtype: "int8".into(),
        }
    }
}

impl FactorizationOptions {
    /// The paper's factor storage: the checkpoint's dtype.
    pub fn paper() -> Self {
        Self {
            factor_dtype: "auto".into(),
            ..Self::default()
        }
    }
}

/// What the emit stage reads: where the checkpoint goes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputOptions {
    /// Output directory (required unless `dry_run`).
    pub out: Option<PathBuf>,
    /// Also write the reconstructed dense weights here, in the original layout.
    pub export_dense: Option<PathBuf>,
    /// Replace an existing output directory.
    pub force: bool,
    /// Only compute the allocation (no factorisation, nothing written).
    pub dry_run: bool,
    /// Discard the finished layers an interrupted run of the same output left and start over
    /// (not saved: it does not change the output).
    #[serde(skip)]
    pub restart: bool,
}

/// Every setting of a compression run, one group per stage. `Default` is the recommended method;
/// a config file (`compress.toml`) that leaves a key out means the paper preset's value
/// ([`CompressOptions::paper`]), which is also what files written before byte budgets meant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default = "CompressOptions::paper", deny_unknown_fields)]
pub struct CompressOptions {
    /// Input checkpoint directory.
    pub model: PathBuf,
    /// Where calibration runs: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Calibration stage.
    pub calibration: CalibrationOptions,
    /// Allocate stage.
    pub allocation: AllocationOptions,
    /// Factor stage.
    pub factorization: FactorizationOptions,
    /// Emit stage.
    pub output: OutputOptions,
    /// Expert pruning and the method (`--method`); left out of saved settings for plain
    /// low-rank runs, so a file without it means `lowrank`.
    #[serde(skip_serializing_if = "PruningOptions::is_low_rank_only")]
    pub pruning: PruningOptions,
}

impl Default for CompressOptions {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            device: "cpu".into(),
            calibration: CalibrationOptions::default(),
            allocation: AllocationOptions::default(),
            factorization: FactorizationOptions::default(),
            output: OutputOptions::default(),
            pruning: PruningOptions::default(),
        }
    }
}

fn invalid<T>(message: String) -> Result<T> {
    Err(Error::InvalidArgument(message))
}

impl CompressOptions {
    /// The paper's method (`--preset paper`): low-rank factors of gate and up in the
    /// checkpoint's dtype, `ratio` a fraction of their parameters, no pruning.
    pub fn paper() -> Self {
        Self {
            allocation: AllocationOptions::paper(),
            factorization: FactorizationOptions::paper(),
            pruning: PruningOptions::low_rank_only(),
            ..Self::default()
        }
    }

    /// Checks every group; the message names the offending option and its valid range.
    pub fn validate(&self) -> Result<()> {
        self.calibration.validate()?;
        self.allocation.validate()?;
        self.pruning.validate()?;
        super::tune::validate(self)?;
        self.validate_down_proj()?;
        if self.pruning.method.prunes() && self.calibration.statistics_cache.is_some() {
            return invalid(format!(
                "--method {} does not use the calibration statistics cache (its statistics \
                 depend on the experts removed): leave `statistics_cache` out",
                self.pruning.method
            ));
        }
        let output = &self.output;
        if !output.dry_run && output.out.is_none() {
            return invalid("--out is required (or use --dry-run)".into());
        }
        use crate::safety::{check_run_paths, RunPath};
        check_run_paths(
            &[
                RunPath::new("--model", &self.model),
                RunPath::new("--calibration", &self.calibration.data),
            ],
            &[
                RunPath::optional("--out", output.out.as_deref()),
                RunPath::optional("--export-dense", output.export_dense.as_deref()),
                RunPath::optional(
                    "statistics_cache",
                    self.calibration.statistics_cache.as_deref(),
                ),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        )
    }

    /// Whether calibration must collect Gram statistics (whitening or activation reports).
    pub fn wants_gram(&self) -> bool {
        self.factorization.whiten || self.calibration.activation_statistics
    }

    /// Whether calibration must also collect each expert's intermediate Gram matrix
    /// (`down_proj` factored, with whitening or activation reports).
    pub fn wants_down_gram(&self) -> bool {
        self.allocation.factors(ExpertMatrix::Down) && self.wants_gram()
    }

    /// Refuses the options `down_proj` factoring does not support yet.
    fn validate_down_proj(&self) -> Result<()> {
        if !self.allocation.factors(ExpertMatrix::Down) {
            return Ok(());
        }
        let unsupported = if self.factorization.factorizer != FactorizerKind::Svd {
            "--factorizer basis (its SiLU basis is fitted on the input side)"
        } else if self.allocation.residual {
            "--residual on"
        } else if self.allocation.xi_auto {
            "--xi auto (its search runs the original down_proj)"
        } else if self.calibration.statistics_cache.is_some() {
            "the calibration statistics cache (it holds no down_proj statistics)"
        } else {
            return Ok(());
        };
        invalid(format!(
            "--matrices with down (the default is gate,up,down) does not combine with \
             {unsupported} yet: pass --matrices gate,up"
        ))
    }
}

impl CalibrationOptions {
    fn validate(&self) -> Result<()> {
        if self.samples == 0 || self.seq_len < 2 {
            return invalid("--samples must be ≥ 1 and --seq-len ≥ 2".into());
        }
        if self.group_size == 0 {
            return invalid("--group-size must be at least 1".into());
        }
        if self.batch_size == 0 {
            return invalid("--batch-size must be at least 1".into());
        }
        Ok(())
    }
}

impl AllocationOptions {
    /// The paper's allocation: gate and up, `ratio` a fraction of their parameters.
    pub fn paper() -> Self {
        Self {
            matrices: PAPER_MATRICES.to_vec(),
            budget: BudgetUnit::Parameters,
            ..Self::default()
        }
    }

    /// Whether `matrix` is factored.
    pub fn factors(&self, matrix: ExpertMatrix) -> bool {
        self.matrices.contains(&matrix)
    }

    /// The factored matrices in gate, up, down order.
    pub fn targeted(&self) -> Vec<ExpertMatrix> {
        ExpertMatrix::ALL
            .into_iter()
            .filter(|&m| self.factors(m))
            .collect()
    }

    fn validate(&self) -> Result<()> {
        if self.matrices.is_empty() {
            return invalid("--matrices must name at least one of gate, up, down".into());
        }
        if self.targeted().len() != self.matrices.len() {
            return invalid(format!(
                "--matrices names a matrix twice: {:?}",
                self.matrices
            ));
        }
        if !(0.0..1.0).contains(&self.ratio) {
            return invalid(format!("--ratio {} must be in [0, 1)", self.ratio));
        }
        if !(0.0..=1.0).contains(&self.xi) {
            return invalid(format!("--xi {} must be in [0, 1]", self.xi));
        }
        if self.residual && !(self.residual_fraction > 0.0 && self.residual_fraction < 1.0) {
            return invalid(format!(
                "--residual-fraction {} must be in (0, 1)",
                self.residual_fraction
            ));
        }
        Ok(())
    }
}

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| Error::InvalidArgument(format!("bad CUDA ordinal in `{s}`")))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return invalid(format!(
                    "device `{s}`: this build has no CUDA support (build with `--features cuda`)"
                ));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => invalid(format!(
            "unknown device `{other}` (expected cpu, cuda or cuda:N)"
        )),
    }
}
