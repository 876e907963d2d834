//! The RFID-MoE pipeline, end to end: calibrate → analyse → allocate → factor → residual → write.
//!
//! Layers are streamed: each decoder layer is loaded, calibrated on the hidden states the previous
//! layer produced, compressed and written as its own shard before the next is loaded.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use faer::Mat;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::allocation::{self, Allocation, GroupAllocation, GroupShape};
use crate::analysis;
use crate::calibration::{self, LayerStatistics, LayerStream};
use crate::checkpoint::experts::ExpertMatrix;
use crate::checkpoint::writer::CheckpointWriter;
use crate::checkpoint::{Checkpoint, CONFIG_FILE};
use crate::error::{Error, Result};
use crate::factorize::{self, BasisFactorizer, Factorizer, SvdFactorizer};
use crate::format::{self, CompressionRecord, GroupRecord, LayerRecord, MatrixRecord};
use crate::linalg;
use crate::models::moe::Projection;
use crate::models::{DecoderLayer, FeedForward};
use crate::residual::SparseProjection;

/// Which factoriser turns a group into coefficients and a basis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FactorizerKind {
    /// Truncated SVD (closed form), optionally activation-aware.
    Svd,
    /// MoBE-style `A·SiLU(B)` fitted with Adam from the SVD.
    Basis,
}

/// Where the parameter budget is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BudgetScope {
    /// Each layer and matrix type gets `(1−ρ)` of its own parameters.
    Layer,
    /// All layers share one budget per matrix type (holds every layer's statistics in memory).
    Model,
}

/// Every setting of a compression run; also the schema of `--config compress.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressOptions {
    /// Input checkpoint directory.
    pub model: PathBuf,
    /// Calibration data: text, JSON lines with `text`, or safetensors with `input_ids`.
    pub calibration: PathBuf,
    /// Output directory (required unless `dry_run`).
    pub out: Option<PathBuf>,
    /// Fraction ρ of the targeted matrices' parameters to remove.
    pub ratio: f64,
    /// Experts per group (k).
    pub group_size: usize,
    /// Weight ξ of information density in the fused score.
    pub xi: f64,
    /// Rank allocation policy.
    pub allocation: Allocation,
    /// Budget scope.
    pub budget_scope: BudgetScope,
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
    /// Sparse-projection residual.
    pub residual: bool,
    /// Residual size as a fraction of each group's dense parameters.
    pub residual_fraction: f64,
    /// Seed of the residual's random projection.
    pub residual_seed: u64,
    /// Keep a group dense when factoring it would not save parameters.
    pub dense_fallback: bool,
    /// Calibration windows.
    pub samples: usize,
    /// Tokens per calibration window.
    pub seq_len: usize,
    /// Window selection seed (0 = the first `samples` consecutive windows).
    pub seed: u64,
    /// Windows per forward batch.
    pub batch_size: usize,
    /// Dtype of the written factors: `auto` (the checkpoint's), `f32`, `bf16` or `f16`.
    pub factor_dtype: String,
    /// Also write the reconstructed dense weights here, in the original layout.
    pub export_dense: Option<PathBuf>,
    /// Replace an existing output directory.
    pub force: bool,
    /// Only print the allocation (no factorisation, nothing written).
    pub dry_run: bool,
    /// Hide progress bars.
    pub quiet: bool,
    /// Where calibration runs: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Save calibration statistics here, or reuse them if the file holds statistics of the same
    /// calibration windows (skips the forward passes; holds all layers' statistics in memory).
    pub statistics_cache: Option<PathBuf>,
    /// Collect per-expert input Gram matrices even without whitening, to report activation errors
    /// (d×d doubles per expert: large for big models).
    pub activation_statistics: bool,
}

impl Default for CompressOptions {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            calibration: PathBuf::new(),
            out: None,
            ratio: 0.4,
            group_size: 4,
            xi: 0.2,
            allocation: Allocation::Rfid,
            budget_scope: BudgetScope::Layer,
            factorizer: FactorizerKind::Svd,
            fit_steps: 500,
            learning_rate: 0.07,
            whiten: true,
            whiten_ridge: 1e-4,
            residual: false,
            residual_fraction: 0.03,
            residual_seed: 0x5eed,
            dense_fallback: true,
            samples: 128,
            seq_len: 512,
            seed: 0,
            batch_size: 8,
            factor_dtype: "auto".into(),
            export_dense: None,
            force: false,
            dry_run: false,
            quiet: false,
            activation_statistics: true,
            device: "cpu".into(),
            statistics_cache: None,
        }
    }
}

impl CompressOptions {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !(0.0..1.0).contains(&self.ratio) {
            return bad(format!("--ratio {} must be in [0, 1)", self.ratio));
        }
        if self.group_size == 0 {
            return bad("--group-size must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.xi) {
            return bad(format!("--xi {} must be in [0, 1]", self.xi));
        }
        if self.residual && !(self.residual_fraction > 0.0 && self.residual_fraction < 1.0) {
            return bad(format!(
                "--residual-fraction {} must be in (0, 1)",
                self.residual_fraction
            ));
        }
        if self.samples == 0 || self.seq_len < 2 {
            return bad("--samples must be ≥ 1 and --seq-len ≥ 2".into());
        }
        if !self.dry_run && self.out.is_none() {
            return bad("--out is required (or use --dry-run)".into());
        }
        if let Some(out) = &self.out {
            if same_path(out, &self.model) {
                return bad(format!(
                    "--out {} would overwrite the input model",
                    out.display()
                ));
            }
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
                return Err(Error::InvalidArgument(format!(
                    "device `{s}`: this build has no CUDA support (build with `--features cuda`)"
                )));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown device `{other}` (expected cpu, cuda or cuda:N)"
        ))),
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// One group's outcome for one matrix type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    /// Experts (descending frequency).
    pub experts: Vec<usize>,
    /// Group routing frequency F_g.
    pub frequency: f64,
    /// Effective rank of the stacked raw weights.
    pub effective_rank: f64,
    /// Normalised density E_g.
    pub density: f64,
    /// Fused score C_g.
    pub score: f64,
    /// Allocated rank (0 when dense).
    pub rank: usize,
    /// Kept dense.
    pub dense: bool,
    /// Residual coefficients.
    pub residual_size: usize,
    /// ‖W−Ŵ‖_F / ‖W‖_F.
    pub relative_error: f64,
    /// ‖(W−Ŵ)X‖_F / ‖WX‖_F over the routed calibration inputs (when Gram statistics exist).
    pub activation_error: Option<f64>,
    /// Fraction of the low-rank residual's energy the sparse residual recovered.
    pub residual_energy_recovered: Option<f64>,
    /// Residual runs: (fraction of the truncation residual's energy recovered) per stored η
    /// coefficient.
    pub residual_energy_per_parameter: Option<f64>,
    /// Residual runs: the same measure for spending parameters on one more rank instead
    /// (σ_K² over the energy of the SVD tail Σ_{j≥K} σ_j², per k·p + d parameters; from the
    /// unwhitened spectrum).
    pub rank_energy_per_parameter: Option<f64>,
    /// Parameters before.
    pub parameters_before: u64,
    /// Parameters after.
    pub parameters_after: u64,
}

/// One layer's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerReport {
    /// Decoder layer index.
    pub layer: usize,
    /// Routing counts per expert.
    pub routing_counts: Vec<u64>,
    /// Routing frequency per expert.
    pub frequencies: Vec<f64>,
    /// Experts no calibration token reached.
    pub unused_experts: Vec<usize>,
    /// Per matrix type (checkpoint name), per group.
    pub matrices: BTreeMap<String, Vec<GroupReport>>,
}

/// The outcome of a compression run (also written as `compression_report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Tool version.
    pub tool_version: String,
    /// The resolved options.
    pub options: CompressOptions,
    /// Calibration tokens.
    pub calibration_tokens: usize,
    /// Calibration fingerprint.
    pub calibration_fingerprint: String,
    /// Targeted (gate/up) parameters before.
    pub targeted_parameters_before: u64,
    /// Targeted parameters after.
    pub targeted_parameters_after: u64,
    /// Achieved reduction of the targeted parameters.
    pub targeted_reduction: f64,
    /// Reduction over all routed-expert parameters (gate, up and down).
    pub routed_expert_reduction: f64,
    /// Reduction over the whole model.
    pub model_reduction: f64,
    /// Whole-model parameters before.
    pub model_parameters_before: u64,
    /// Budget granularity: half of one rank's cost as a fraction of a layer's matrix (the
    /// largest over layers), the precision to which a ratio can be met.
    pub rank_granularity: f64,
    /// Seconds spent.
    pub seconds: f64,
    /// Peak anonymous resident memory observed between layers (bytes, Linux only).
    pub peak_resident_bytes: Option<u64>,
    /// Per layer.
    pub layers: Vec<LayerReport>,
    /// Where the checkpoint was written (None for dry runs).
    pub output: Option<PathBuf>,
}

/// Loads and windows the calibration data for `checkpoint`.
pub fn calibration_windows(
    options: &CompressOptions,
    checkpoint: &Checkpoint,
) -> Result<Vec<Vec<u32>>> {
    let path = &options.calibration;
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let stream: Vec<u32> = if is_safetensors {
        let tensors = crate::checkpoint::load_all(path, &Device::Cpu)?;
        let ids = tensors.get("input_ids").ok_or_else(|| Error::Safetensors {
            path: path.clone(),
            message: "no tensor `input_ids` (expected i64 [n, seq])".into(),
        })?;
        if ids.rank() != 2 {
            return Err(Error::Safetensors {
                path: path.clone(),
                message: format!("`input_ids` has shape {:?}, expected [n, seq]", ids.dims()),
            });
        }
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        rows.into_iter().flatten().collect()
    } else {
        let tokenizer = crate::text::load_tokenizer(checkpoint.dir())?;
        let documents = crate::text::read_documents(path)?;
        let eos = crate::text::end_of_text_id(&tokenizer, checkpoint.config())?;
        crate::text::tokenize_documents(&tokenizer, &documents, eos)?
    };
    let stream = &stream;
    let windows =
        crate::text::sample_windows(stream, options.seq_len, options.samples, options.seed);
    if windows.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: {} tokens are fewer than one window of --seq-len {}",
            path.display(),
            stream.len(),
            options.seq_len
        )));
    }
    Ok(windows)
}

fn progress(quiet: bool, len: u64, message: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

fn factor_dtype(options: &CompressOptions, checkpoint: &Checkpoint) -> Result<DType> {
    factor_dtype_named(&options.factor_dtype, checkpoint)
}

fn factor_dtype_named(name: &str, checkpoint: &Checkpoint) -> Result<DType> {
    Ok(match name {
        "auto" => match checkpoint.dominant_dtype() {
            crate::checkpoint::StoredDType::BF16 => DType::BF16,
            crate::checkpoint::StoredDType::F16 => DType::F16,
            _ => DType::F32,
        },
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => {
            return Err(Error::InvalidArgument(format!(
                "--factor-dtype `{other}` (expected auto, f32, bf16 or f16)"
            )))
        }
    })
}

/// The factored form of one group, ready to write.
struct FactoredGroup {
    record: GroupRecord,
    report: GroupReport,
    coefficients: Option<Mat<f64>>,
    basis: Option<Mat<f64>>,
    residual_eta: Option<Vec<f32>>,
    reconstruction: Mat<f64>,
}

struct LayerPlan {
    groups: Vec<Vec<usize>>,
    group_frequency: Vec<f64>,
}

fn plan_groups(stats: &LayerStatistics, group_size: usize) -> Result<LayerPlan> {
    let groups = analysis::frequency_groups(&stats.routing_counts, group_size)?;
    let group_frequency = analysis::group_frequencies(&stats.routing_counts, &groups);
    Ok(LayerPlan {
        groups,
        group_frequency,
    })
}

/// Everything about one layer's groups for one matrix type that decides their ranks.
#[derive(Debug, Clone)]
struct MatrixPlan {
    effective_ranks: Vec<f64>,
    density: Vec<f64>,
    scores: Vec<f64>,
    shapes: Vec<GroupShape>,
    reserved: Vec<usize>,
    allocations: Vec<GroupAllocation>,
}

fn stack_groups(plan: &LayerPlan, dense: &[Mat<f64>]) -> Result<Vec<Mat<f64>>> {
    plan.groups
        .iter()
        .map(|g| linalg::stack_rows(&g.iter().map(|&e| dense[e].clone()).collect::<Vec<_>>()))
        .collect()
}

/// Effective ranks, scores and the layer-scope allocation of one matrix type's groups.
fn analyse_groups(
    options: &CompressOptions,
    plan: &LayerPlan,
    stacked: &[Mat<f64>],
) -> Result<MatrixPlan> {
    let (p, d) = (
        stacked[0].nrows() / plan.groups[0].len(),
        stacked[0].ncols(),
    );
    let effective_ranks: Vec<f64> = stacked
        .par_iter()
        .map(|w| {
            linalg::squared_singular_values(w).map(|s2| {
                analysis::effective_rank(&s2.iter().map(|v| v.sqrt()).collect::<Vec<_>>())
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let density = analysis::normalize(&effective_ranks);
    let scores = allocation::importance_scores(
        options.allocation,
        &density,
        &plan.group_frequency,
        options.xi,
    );
    let shapes: Vec<GroupShape> = plan
        .groups
        .iter()
        .map(|g| GroupShape {
            experts: g.len(),
            rows_per_expert: p,
            cols: d,
        })
        .collect();
    let reserved: Vec<usize> = shapes
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
        .collect();
    let budget = allocation::budget_for_ratio(&shapes, options.ratio);
    let allocations =
        allocation::allocate_ranks(&shapes, &scores, budget, &reserved, options.dense_fallback)?;
    Ok(MatrixPlan {
        effective_ranks,
        density,
        scores,
        shapes,
        reserved,
        allocations,
    })
}

/// Re-allocates ranks over all layers at once (`--budget-scope model`): densities are normalised
/// over every group of the model and frequencies divided by the number of layers, so layers
/// compete for one budget of `(1−ρ)` of all their parameters.
fn allocate_model_scope(
    options: &CompressOptions,
    plans: &mut [(&LayerPlan, &mut MatrixPlan)],
) -> Result<()> {
    let layers = plans.len().max(1) as f64;
    let effective: Vec<f64> = plans
        .iter()
        .flat_map(|(_, m)| m.effective_ranks.clone())
        .collect();
    let density = analysis::normalize(&effective);
    let frequency: Vec<f64> = plans
        .iter()
        .flat_map(|(l, _)| l.group_frequency.iter().map(|f| f / layers))
        .collect();
    let scores =
        allocation::importance_scores(options.allocation, &density, &frequency, options.xi);
    let shapes: Vec<GroupShape> = plans.iter().flat_map(|(_, m)| m.shapes.clone()).collect();
    let reserved: Vec<usize> = plans.iter().flat_map(|(_, m)| m.reserved.clone()).collect();
    let budget = allocation::budget_for_ratio(&shapes, options.ratio);
    let allocations =
        allocation::allocate_ranks(&shapes, &scores, budget, &reserved, options.dense_fallback)?;
    let mut offset = 0;
    for (_, plan) in plans.iter_mut() {
        let n = plan.shapes.len();
        plan.density = density[offset..offset + n].to_vec();
        plan.scores = scores[offset..offset + n].to_vec();
        plan.allocations = allocations[offset..offset + n].to_vec();
        offset += n;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn compress_matrix(
    options: &CompressOptions,
    factorizer: &dyn Factorizer,
    stats: &LayerStatistics,
    plan: &LayerPlan,
    dense: &[Mat<f64>],
    factorize_groups: bool,
    given: Option<&MatrixPlan>,
) -> Result<Vec<FactoredGroup>> {
    let stacked = stack_groups(plan, dense)?;
    let matrix_plan = match given {
        Some(m) => m.clone(),
        None => analyse_groups(options, plan, &stacked)?,
    };
    let MatrixPlan {
        effective_ranks,
        density,
        scores,
        shapes,
        reserved,
        allocations,
    } = matrix_plan;
    (0..plan.groups.len())
        .into_par_iter()
        .map(|g| {
            let GroupAllocation {
                rank,
                dense: keep_dense,
            } = allocations[g];
            let shape = shapes[g];
            let w = &stacked[g];
            let gram = stats.group_gram(&plan.groups[g]);
            let mut report = GroupReport {
                experts: plan.groups[g].clone(),
                frequency: plan.group_frequency[g],
                effective_rank: effective_ranks[g],
                density: density[g],
                score: scores[g],
                rank: if keep_dense { 0 } else { rank },
                dense: keep_dense,
                residual_size: if keep_dense { 0 } else { reserved[g] },
                relative_error: 0.0,
                activation_error: None,
                residual_energy_recovered: None,
                residual_energy_per_parameter: None,
                rank_energy_per_parameter: None,
                parameters_before: shape.dense_params() as u64,
                parameters_after: if keep_dense {
                    shape.dense_params() as u64
                } else {
                    (rank * shape.rank_cost() + reserved[g]) as u64
                },
            };
            let record = GroupRecord {
                experts: plan.groups[g].clone(),
                rank: report.rank,
                dense: keep_dense,
                residual_size: report.residual_size,
            };
            if keep_dense || !factorize_groups {
                return Ok(FactoredGroup {
                    record,
                    report,
                    coefficients: None,
                    basis: None,
                    residual_eta: None,
                    reconstruction: w.clone(),
                });
            }
            let whitening = match (&gram, options.whiten) {
                (Some(gram), true) => Some(linalg::whitening_factor(gram, options.whiten_ridge)?),
                _ => None,
            };
            let factors = factorizer.factor(w, rank, whitening.as_ref())?;
            let mut reconstruction = factors.reconstruct(factorizer.activation());
            let mut residual_eta = None;
            if report.residual_size > 0 {
                let residual = w - &reconstruction;
                let flat: Vec<f32> = (0..residual.nrows())
                    .flat_map(|i| (0..residual.ncols()).map(move |j| (i, j)))
                    .map(|(i, j)| residual[(i, j)] as f32)
                    .collect();
                let projection =
                    SparseProjection::new(options.residual_seed, flat.len(), report.residual_size);
                let eta = projection.project(&flat);
                let expanded = projection.expand(&eta);
                let energy: f64 = flat.iter().map(|&v| (v as f64) * (v as f64)).sum();
                let cols = residual.ncols();
                let mut recovered = 0.0;
                for (t, &v) in expanded.iter().enumerate() {
                    reconstruction[(t / cols, t % cols)] += v as f64;
                    recovered += (v as f64) * (v as f64);
                }
                let recovered_fraction = if energy > 0.0 {
                    recovered / energy
                } else {
                    0.0
                };
                report.residual_energy_recovered = Some(recovered_fraction);
                report.residual_energy_per_parameter =
                    Some(recovered_fraction / report.residual_size as f64);
                let spectrum = linalg::squared_singular_values(w)?;
                let tail: f64 = spectrum.iter().skip(rank).sum();
                let next = spectrum.get(rank).copied().unwrap_or(0.0);
                report.rank_energy_per_parameter = Some(if tail > 0.0 {
                    next / tail / shape.rank_cost() as f64
                } else {
                    0.0
                });
                residual_eta = Some(eta);
            }
            report.relative_error = factorize::relative_error(w, &reconstruction);
            if let Some(gram) = &gram {
                report.activation_error = Some(activation_error(w, &reconstruction, gram));
            }
            Ok(FactoredGroup {
                record,
                report,
                coefficients: Some(factors.coefficients),
                basis: Some(factors.basis),
                residual_eta,
                reconstruction,
            })
        })
        .collect()
}

/// ‖(W−Ŵ)X‖_F / ‖WX‖_F from the input Gram G = XXᵀ: sqrt(tr(E G Eᵀ) / tr(W G Wᵀ)).
fn activation_error(w: &Mat<f64>, w_hat: &Mat<f64>, gram: &Mat<f64>) -> f64 {
    let error = w - w_hat;
    let quad = |m: &Mat<f64>| -> f64 {
        let mg = m * gram;
        let mut sum = 0.0;
        for i in 0..m.nrows() {
            for j in 0..m.ncols() {
                sum += mg[(i, j)] * m[(i, j)];
            }
        }
        sum
    };
    let denominator = quad(w);
    if denominator <= 0.0 {
        return 0.0;
    }
    (quad(&error) / denominator).max(0.0).sqrt()
}

fn dense_matrices(layer: &DecoderLayer, matrix: ExpertMatrix) -> Result<Vec<Mat<f64>>> {
    let FeedForward::Moe(block) = &layer.feed_forward else {
        return Err(Error::InvalidArgument(format!(
            "layer {} is not a MoE layer",
            layer.index
        )));
    };
    block
        .experts
        .iter()
        .map(|e| {
            let projection = match matrix {
                ExpertMatrix::Gate => &e.gate,
                ExpertMatrix::Up => &e.up,
                ExpertMatrix::Down => &e.down,
            };
            match projection {
                Projection::Dense(w) => linalg::tensor_to_mat(w),
                other => linalg::tensor_to_mat(&other.to_dense()?),
            }
        })
        .collect()
}

fn rows(m: &Mat<f64>, start: usize, count: usize) -> Mat<f64> {
    Mat::from_fn(count, m.ncols(), |i, j| m[(start + i, j)])
}

/// Copies every stored tensor whose name starts with `prefix`, except those `skip` rejects, in its stored dtype.
fn copy_tensors(
    checkpoint: &Checkpoint,
    prefix: &str,
    skip: impl Fn(&str) -> bool,
    into: &mut HashMap<String, Tensor>,
) -> Result<()> {
    for name in checkpoint.tensor_names() {
        if name.starts_with(prefix) && !skip(name) {
            into.insert(name.to_string(), checkpoint.load_stored(name, "copy")?);
        }
    }
    Ok(())
}

/// Reads the per-layer part of a `compression_report.json` written by [`compress`].
pub fn read_layer_reports(model_dir: &Path) -> Result<Vec<LayerReport>> {
    let path = model_dir.join("compression_report.json");
    let value = crate::checkpoint::read_json(&path)?;
    let layers = value.get("layers").cloned().ok_or_else(|| Error::Json {
        path: path.clone(),
        message: "missing `layers`".into(),
    })?;
    serde_json::from_value(layers).map_err(|e| Error::Json {
        path,
        message: format!("invalid `layers`: {e}"),
    })
}

/// Tokenizer and generation files copied next to the compressed weights.
const AUXILIARY_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// Runs the whole pipeline described by `options`.
pub fn compress(options: &CompressOptions) -> Result<Report> {
    options.validate()?;
    let started = Instant::now();
    let device = parse_device(&options.device)?;
    let checkpoint = Checkpoint::open(&options.model)?;
    let windows = calibration_windows(options, &checkpoint)?;
    let calibration_tokens = windows.iter().map(|w| w.len()).sum();
    let fingerprint = calibration::fingerprint(&windows);
    let want_gram = options.whiten || options.activation_statistics;
    // Statistics belong to one model and one set of windows.
    let model_dir = checkpoint
        .dir()
        .canonicalize()
        .unwrap_or_else(|_| checkpoint.dir().to_path_buf());
    let cache_key = format!("{fingerprint}@{}", model_dir.display());
    let cached = match &options.statistics_cache {
        Some(path) if path.exists() => calibration::load_statistics(path, &cache_key)?
            .filter(|layers| !want_gram || layers.iter().all(|l| l.gram.is_some())),
        _ => None,
    };
    let replaying = cached.is_some();
    let mut stream = match cached {
        Some(statistics) => LayerStream::replay(&checkpoint, &device, statistics)?,
        None => LayerStream::new(
            &checkpoint,
            &windows,
            options.batch_size,
            &device,
            want_gram,
        )?,
    };
    let mut statistics_to_save = Vec::new();
    let spec = stream.spec().clone();
    // --budget-scope model: a first pass analyses every layer, ranks are allocated over the whole
    // model, and a second pass replays the statistics to factor with those ranks.
    let mut global_plans: HashMap<(usize, ExpertMatrix), MatrixPlan> = HashMap::new();
    if options.budget_scope == BudgetScope::Model {
        let mut all_statistics = Vec::new();
        let mut layer_plans: HashMap<usize, LayerPlan> = HashMap::new();
        let bar = progress(options.quiet, spec.num_layers as u64, "analysing");
        while let Some((layer, stats)) = stream.next_layer()? {
            bar.inc(1);
            let Some(stats) = stats else { continue };
            let plan = plan_groups(&stats, options.group_size)?;
            for matrix in [ExpertMatrix::Gate, ExpertMatrix::Up] {
                let stacked = stack_groups(&plan, &dense_matrices(&layer, matrix)?)?;
                global_plans.insert(
                    (layer.index, matrix),
                    analyse_groups(options, &plan, &stacked)?,
                );
            }
            layer_plans.insert(layer.index, plan);
            all_statistics.push(stats);
        }
        bar.finish_and_clear();
        for matrix in [ExpertMatrix::Gate, ExpertMatrix::Up] {
            let mut entries: Vec<(usize, &mut MatrixPlan)> = global_plans
                .iter_mut()
                .filter(|((_, m), _)| *m == matrix)
                .map(|((layer, _), plan)| (*layer, plan))
                .collect();
            entries.sort_by_key(|(layer, _)| *layer);
            let mut pairs: Vec<(&LayerPlan, &mut MatrixPlan)> = entries
                .into_iter()
                .map(|(layer, plan)| (&layer_plans[&layer], plan))
                .collect();
            allocate_model_scope(options, &mut pairs)?;
        }
        stream = LayerStream::replay(&checkpoint, &device, all_statistics)?;
    }
    let factor_dtype = factor_dtype(options, &checkpoint)?;
    // Uncompressed expert matrices keep the checkpoint's own dtype.
    let stored_dtype = factor_dtype_named("auto", &checkpoint)?;
    let factorizer: Box<dyn Factorizer> = match options.factorizer {
        FactorizerKind::Svd => Box::new(SvdFactorizer),
        FactorizerKind::Basis => Box::new(BasisFactorizer {
            steps: options.fit_steps,
            learning_rate: options.learning_rate,
            patience: 50,
        }),
    };
    let activation = factorizer.activation();
    let mut writer = match (&options.out, options.dry_run) {
        (Some(out), false) => Some(CheckpointWriter::create(out, options.force)?),
        _ => None,
    };
    let mut dense_writer = match (&options.export_dense, options.dry_run) {
        (Some(out), false) => Some(CheckpointWriter::create(out, options.force)?),
        _ => None,
    };
    // Embedding, final norm and head go into the first shard unchanged.
    if writer.is_some() || dense_writer.is_some() {
        let mut ends = HashMap::new();
        copy_tensors(
            &checkpoint,
            "",
            |n| n.starts_with("model.layers."),
            &mut ends,
        )?;
        for w in [writer.as_mut(), dense_writer.as_mut()]
            .into_iter()
            .flatten()
        {
            w.write_shard(ends.clone())?;
        }
    }

    let bar = progress(options.quiet, spec.num_layers as u64, "layers");
    let mut layer_reports = Vec::new();
    let mut layer_records = Vec::new();
    let mut peak_resident = calibration::resident_anonymous_bytes();
    let (mut targeted_before, mut targeted_after, mut down_params) = (0u64, 0u64, 0u64);
    let mut rank_granularity = 0f64;
    while let Some((layer, stats)) = stream.next_layer()? {
        let index = layer.index;
        bar.set_message(format!("layer {index}"));
        sample_peak(&mut peak_resident);
        let layer_prefix = format!("model.layers.{index}.");
        let (Some(stats), Some(layout)) = (stats, spec.moe_layers[index].clone()) else {
            for w in [writer.as_mut(), dense_writer.as_mut()]
                .into_iter()
                .flatten()
            {
                let mut tensors = HashMap::new();
                copy_tensors(&checkpoint, &layer_prefix, |_| false, &mut tensors)?;
                w.write_shard(tensors)?;
            }
            bar.inc(1);
            continue;
        };
        let plan = plan_groups(&stats, options.group_size)?;
        if options.statistics_cache.is_some() && !replaying {
            statistics_to_save.push(stats.clone());
        }
        let mut matrices = BTreeMap::new();
        let mut records = BTreeMap::new();
        let mut out_tensors = HashMap::new();
        let mut dense_tensors = HashMap::new();
        let experts_prefix = format!("{}.experts.", layout.block);
        let factorize_groups = !options.dry_run;
        for matrix in [ExpertMatrix::Gate, ExpertMatrix::Up] {
            let name = layout.name(matrix);
            let dense = dense_matrices(&layer, matrix)?;
            let groups = compress_matrix(
                options,
                factorizer.as_ref(),
                &stats,
                &plan,
                &dense,
                factorize_groups,
                global_plans.get(&(index, matrix)),
            )?;
            sample_peak(&mut peak_resident);
            let p = layout.intermediate_size;
            let matrix_params: u64 = groups.iter().map(|g| g.report.parameters_before).sum();
            let largest_rank_cost = plan
                .groups
                .iter()
                .map(|g| g.len() * p + layout.hidden_size)
                .max()
                .unwrap_or(0);
            rank_granularity =
                rank_granularity.max(0.5 * largest_rank_cost as f64 / matrix_params.max(1) as f64);
            for (g, group) in groups.iter().enumerate() {
                targeted_before += group.report.parameters_before;
                targeted_after += group.report.parameters_after;
                for (slot, &expert) in group.record.experts.iter().enumerate() {
                    let reconstructed = rows(&group.reconstruction, slot * p, p);
                    dense_tensors.insert(
                        layout.dense_name(expert, matrix),
                        linalg::mat_to_tensor(&reconstructed, factor_dtype, &Device::Cpu)?,
                    );
                    match &group.coefficients {
                        Some(a) => {
                            out_tensors.insert(
                                format::coefficients_name(&layout.block, expert, name),
                                linalg::mat_to_tensor(
                                    &rows(a, slot * p, p),
                                    factor_dtype,
                                    &device,
                                )?,
                            );
                        }
                        None => {
                            out_tensors.insert(
                                layout.dense_name(expert, matrix),
                                linalg::mat_to_tensor(&dense[expert], stored_dtype, &Device::Cpu)?,
                            );
                        }
                    }
                }
                if let Some(basis) = &group.basis {
                    out_tensors.insert(
                        format::basis_name(&layout.block, g, name),
                        linalg::mat_to_tensor(basis, factor_dtype, &Device::Cpu)?,
                    );
                }
                if let Some(eta) = &group.residual_eta {
                    out_tensors.insert(
                        format::residual_name(&layout.block, g, name),
                        Tensor::from_vec(eta.clone(), eta.len(), &Device::Cpu)?
                            .to_dtype(factor_dtype)?,
                    );
                }
            }
            records.insert(
                name.to_string(),
                MatrixRecord {
                    groups: groups.iter().map(|g| g.record.clone()).collect(),
                },
            );
            matrices.insert(
                name.to_string(),
                groups.into_iter().map(|g| g.report).collect::<Vec<_>>(),
            );
        }
        // down_proj stays dense, written per expert from the canonical view.
        let down = dense_matrices(&layer, ExpertMatrix::Down)?;
        for (expert, w) in down.iter().enumerate() {
            down_params += (w.nrows() * w.ncols()) as u64;
            let tensor = linalg::mat_to_tensor(w, stored_dtype, &Device::Cpu)?;
            out_tensors.insert(
                layout.dense_name(expert, ExpertMatrix::Down),
                tensor.clone(),
            );
            dense_tensors.insert(layout.dense_name(expert, ExpertMatrix::Down), tensor);
        }
        sample_peak(&mut peak_resident);
        if let Some(w) = writer.as_mut() {
            copy_tensors(
                &checkpoint,
                &layer_prefix,
                |n| n.starts_with(&experts_prefix),
                &mut out_tensors,
            )?;
            w.write_shard(out_tensors)?;
        }
        if let Some(w) = dense_writer.as_mut() {
            copy_tensors(
                &checkpoint,
                &layer_prefix,
                |n| n.starts_with(&experts_prefix),
                &mut dense_tensors,
            )?;
            w.write_shard(dense_tensors)?;
        }
        layer_records.push(LayerRecord {
            layer: index,
            matrices: records,
        });
        layer_reports.push(LayerReport {
            layer: index,
            frequencies: analysis::routing_frequency(&stats.routing_counts),
            unused_experts: stats.unused_experts(),
            routing_counts: stats.routing_counts.clone(),
            matrices,
        });
        drop(layer);
        if let (Some(now), Some(peak)) = (
            calibration::resident_anonymous_bytes(),
            peak_resident.as_mut(),
        ) {
            *peak = (*peak).max(now);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let (Some(path), false) = (&options.statistics_cache, replaying) {
        calibration::save_statistics(path, &statistics_to_save, &cache_key)?;
    }

    let counts = crate::inspect::parameter_counts(&checkpoint);
    let saved = targeted_before.saturating_sub(targeted_after);
    let routed_before = targeted_before + down_params;
    let mut report = Report {
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        options: options.clone(),
        calibration_tokens,
        calibration_fingerprint: fingerprint.clone(),
        targeted_parameters_before: targeted_before,
        targeted_parameters_after: targeted_after,
        targeted_reduction: ratio(saved, targeted_before),
        routed_expert_reduction: ratio(saved, routed_before),
        model_reduction: ratio(saved, counts.total),
        model_parameters_before: counts.total,
        rank_granularity,
        seconds: 0.0,
        peak_resident_bytes: peak_resident,
        layers: layer_reports,
        output: None,
    };
    report.seconds = started.elapsed().as_secs_f64();
    let record = CompressionRecord {
        method: "rfid-moe".into(),
        tool_version: report.tool_version.clone(),
        basis_activation: activation,
        residual_seed: options.residual_seed,
        settings: serde_json::to_value(options).unwrap_or_default(),
        calibration_fingerprint: fingerprint,
        layers: layer_records,
    };
    let report_json =
        serde_json::to_string_pretty(&report).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    if let Some(w) = writer {
        let mut config = checkpoint.config().clone();
        config[format::COMPRESSION_KEY] =
            serde_json::to_value(&record).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        write_common_files(&w, &checkpoint, &config)?;
        w.write_file("compression_report.json", report_json.as_bytes())?;
        let toml = toml::to_string(options).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        w.write_file("compress.toml", toml.as_bytes())?;
        report.output = Some(w.finish()?);
        let _ = &mut report;
    }
    if let Some(w) = dense_writer {
        write_common_files(&w, &checkpoint, checkpoint.config())?;
        w.finish()?;
    }
    Ok(report)
}

/// Raises `peak` to the current anonymous resident memory.
fn sample_peak(peak: &mut Option<u64>) {
    if let (Some(now), Some(peak)) = (calibration::resident_anonymous_bytes(), peak.as_mut()) {
        *peak = (*peak).max(now);
    }
}

fn write_common_files(
    writer: &CheckpointWriter,
    checkpoint: &Checkpoint,
    config: &serde_json::Value,
) -> Result<()> {
    let text =
        serde_json::to_string_pretty(config).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    writer.write_file(CONFIG_FILE, text.as_bytes())?;
    for name in AUXILIARY_FILES {
        let path = checkpoint.dir().join(name);
        if path.exists() {
            writer.copy_file(&path)?;
        }
    }
    Ok(())
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl Report {
    /// A per-layer table of ranks and sizes (the dry-run preview and the end-of-run summary).
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str("layer  matrix      groups  ranks (dense = D)                     params before → after   max rel.err\n");
        for layer in &self.layers {
            for (matrix, groups) in &layer.matrices {
                let ranks: Vec<String> = groups
                    .iter()
                    .map(|g| {
                        if g.dense {
                            "D".to_string()
                        } else {
                            g.rank.to_string()
                        }
                    })
                    .collect();
                let before: u64 = groups.iter().map(|g| g.parameters_before).sum();
                let after: u64 = groups.iter().map(|g| g.parameters_after).sum();
                let err = groups.iter().map(|g| g.relative_error).fold(0.0, f64::max);
                out.push_str(&format!(
                    "{:>5}  {:<10}  {:>6}  {:<36}  {:>10} → {:<10}  {:.4}\n",
                    layer.layer,
                    matrix,
                    groups.len(),
                    ranks.join(","),
                    before,
                    after,
                    err
                ));
            }
            if !layer.unused_experts.is_empty() {
                out.push_str(&format!(
                    "       experts with no calibration tokens: {:?}\n",
                    layer.unused_experts
                ));
            }
        }
        out.push_str(&format!(
            "targeted (gate+up) parameters {} → {} ({:.2}% removed); routed experts {:.2}%; whole model {:.2}% of {}\n",
            self.targeted_parameters_before,
            self.targeted_parameters_after,
            100.0 * self.targeted_reduction,
            100.0 * self.routed_expert_reduction,
            100.0 * self.model_reduction,
            self.model_parameters_before
        ));
        out
    }
}
