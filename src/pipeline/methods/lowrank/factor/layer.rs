//! Factoring a layer's groups: each group of a targeted matrix type is read from the checkpoint,
//! factored at its rank (whitened by its Gram matrix when asked, its rows or members weighted by
//! their output sensitivity when the solver chose the rank), optionally given a sparse
//! residual, measured, and turned into tensors of the output dtype. Groups run in parallel and
//! each group's `f64` working set is dropped as soon as its tensors exist.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::super::allocate::{GroupAllocation, GroupShape, MatrixPlan, RankPlan};
use super::super::analyse::{LayerAnalysis, MatrixAnalysis};
use super::{relative_error, Factorizer};
use crate::checkpoint::experts::ExpertMatrix;
use crate::linalg::LinalgBackend;
use crate::pipeline::calibrate::LayerStatistics;
use crate::pipeline::experts::LayerExperts;
use crate::pipeline::report::GroupReport;
use crate::residual::SparseProjection;
use crate::Result;

/// How the factor stage runs, resolved from the options and the checkpoint.
pub struct FactorSettings<'a, B: LinalgBackend> {
    /// The factoriser.
    pub factorizer: &'a dyn Factorizer<B>,
    /// Whiten by each group's input Gram matrix (when statistics have one).
    pub whiten: bool,
    /// Relative ridge of the whitening Cholesky.
    pub whiten_ridge: f64,
    /// Seed of the residual's sparse projection.
    pub residual_seed: u64,
    /// Dtype of written factors.
    pub factor_dtype: DType,
    /// The arithmetic of the singular vectors (single where factors are stored in 8 bits).
    pub precision: super::Precision,
    /// Dtype of matrices kept dense.
    pub stored_dtype: DType,
    /// Factor at all (false for a dry run: only reports are filled).
    pub factorize: bool,
    /// Keep each expert's reconstructed dense matrix (for `--export-dense`).
    pub keep_reconstruction: bool,
}

/// One group's outcome: its report and its tensors.
#[derive(Debug)]
pub struct FactoredGroup {
    /// What the report says about it (experts, rank, errors).
    pub report: GroupReport,
    /// Per expert in group order: coefficients `A_i` [p, K] (factor dtype), or the original
    /// matrix [p, d] (stored dtype) when the group is dense.
    pub expert_tensors: Vec<Tensor>,
    /// The raw shared basis [K, d] (factor dtype), for factored groups.
    pub basis: Option<Tensor>,
    /// Residual coefficients η (factor dtype), when the group has a residual.
    pub residual_eta: Option<Tensor>,
    /// Per expert, the reconstructed dense matrix (factor dtype), when asked for.
    pub reconstruction: Option<Vec<Tensor>>,
}

/// One matrix type's groups.
#[derive(Debug)]
pub struct FactoredMatrix {
    /// The matrix type.
    pub matrix: ExpertMatrix,
    /// Its groups, in plan order.
    pub groups: Vec<FactoredGroup>,
}

/// The factor stage's output for one layer.
#[derive(Debug)]
pub struct FactoredLayer {
    /// Decoder layer index.
    pub layer: usize,
    /// Per targeted matrix type.
    pub matrices: Vec<FactoredMatrix>,
}

/// Factors every group of one layer according to the paper's `plan`.
pub fn factor_layer<B: LinalgBackend>(
    backend: &B,
    experts: &LayerExperts,
    statistics: &LayerStatistics<B::Matrix>,
    analysis: &LayerAnalysis,
    plan: &RankPlan,
    settings: &FactorSettings<B>,
) -> Result<FactoredLayer> {
    let matrices = analysis
        .matrices
        .iter()
        .zip(&plan.matrices)
        .map(|(matrix_analysis, matrix_plan)| {
            let jobs = (0..analysis.groups.len())
                .map(|g| GroupJob::planned(statistics, analysis, (matrix_analysis, matrix_plan), g))
                .collect();
            Ok(FactoredMatrix {
                matrix: matrix_analysis.matrix,
                groups: factor_groups(backend, experts, jobs, settings)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(FactoredLayer {
        layer: plan.layer,
        matrices,
    })
}

/// Factors `jobs` in parallel, in their order.
pub fn factor_groups<B: LinalgBackend>(
    backend: &B,
    experts: &LayerExperts,
    jobs: Vec<GroupJob<B::Matrix>>,
    settings: &FactorSettings<B>,
) -> Result<Vec<FactoredGroup>> {
    jobs.into_par_iter()
        .map(|job| factor_group(backend, experts, &job, settings))
        .collect()
}

/// Everything known about one group before factoring it.
pub struct GroupJob<'a, M> {
    /// The matrix type.
    pub matrix: ExpertMatrix,
    /// The group's members, in group order.
    pub experts: &'a [usize],
    /// The group's shape in the factor stage's orientation.
    pub shape: GroupShape,
    /// Its rank, or dense.
    pub allocation: GroupAllocation,
    /// Residual coefficients reserved (0 = none).
    pub residual_size: usize,
    /// The report as far as the allocation decides it (errors are filled in after factoring).
    pub report: GroupReport,
    /// The group's input Gram matrix (gate/up).
    pub gram: Option<&'a M>,
    /// Each member's intermediate Gram matrix, in group order (down).
    pub member_grams: Option<Vec<&'a M>>,
    /// Output-sensitivity weights the basis is fitted under: one per stacked row for gate/up
    /// (`k·p`), one per member for down (`k`).
    pub weights: Option<Vec<f64>>,
}

impl<'a, M> GroupJob<'a, M> {
    /// The job of group `g` of a matrix the paper's allocation planned.
    pub fn planned(
        statistics: &'a LayerStatistics<M>,
        analysis: &'a LayerAnalysis,
        (matrix_analysis, plan): (&MatrixAnalysis, &MatrixPlan),
        g: usize,
    ) -> Self {
        let members = &analysis.groups[g];
        let shape = matrix_analysis.shapes[g];
        let GroupAllocation { rank, dense } = plan.allocations[g];
        let residual_size = if dense { 0 } else { plan.reserved[g] };
        let report = GroupReport {
            experts: members.to_vec(),
            frequency: analysis.group_frequency[g],
            effective_rank: matrix_analysis.effective_ranks[g],
            density: plan.density[g],
            score: plan.scores[g],
            rank: if dense { 0 } else { rank },
            dense,
            residual_size,
            relative_error: 0.0,
            activation_error: None,
            residual_energy_recovered: None,
            residual_energy_per_parameter: None,
            rank_energy_per_parameter: None,
            parameters_before: shape.dense_params() as u64,
            parameters_after: if dense {
                shape.dense_params() as u64
            } else {
                (rank * shape.rank_cost() + residual_size) as u64
            },
            method: None,
            storage: Vec::new(),
            estimated_error: None,
        };
        Self {
            matrix: matrix_analysis.matrix,
            experts: members,
            shape,
            allocation: plan.allocations[g],
            residual_size,
            report,
            gram: input_gram(statistics, matrix_analysis.matrix, g),
            member_grams: member_grams(statistics, matrix_analysis.matrix, members),
            weights: None,
        }
    }
}

/// Group `g`'s input Gram matrix, for a matrix whose basis is on the input side (gate, up).
pub fn input_gram<M>(
    statistics: &LayerStatistics<M>,
    matrix: ExpertMatrix,
    g: usize,
) -> Option<&M> {
    match matrix {
        ExpertMatrix::Down => None,
        ExpertMatrix::Gate | ExpertMatrix::Up => {
            statistics.group_gram.as_ref().map(|grams| &grams[g])
        }
    }
}

/// Each member's intermediate Gram matrix, for `down_proj` (its basis on the output side).
pub fn member_grams<'a, M>(
    statistics: &'a LayerStatistics<M>,
    matrix: ExpertMatrix,
    members: &[usize],
) -> Option<Vec<&'a M>> {
    match matrix {
        ExpertMatrix::Down => statistics
            .expert_down_gram
            .as_ref()
            .map(|grams| members.iter().map(|&e| &grams[e]).collect()),
        ExpertMatrix::Gate | ExpertMatrix::Up => None,
    }
}

fn factor_group<B: LinalgBackend>(
    backend: &B,
    experts: &LayerExperts,
    job: &GroupJob<B::Matrix>,
    settings: &FactorSettings<B>,
) -> Result<FactoredGroup> {
    let mut report = job.report.clone();
    let matrix = job.matrix;
    let rows = job.shape.rows_per_expert;
    if report.dense || !settings.factorize {
        let originals = job
            .experts
            .iter()
            .map(|&e| experts.matrix(e, matrix))
            .collect::<Result<Vec<_>>>()?;
        let reconstruction = match settings.keep_reconstruction && settings.factorize {
            true => Some(
                originals
                    .iter()
                    .map(|t| t.to_dtype(settings.factor_dtype))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            ),
            false => None,
        };
        let expert_tensors = originals
            .iter()
            .map(|t| t.to_dtype(settings.stored_dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        return Ok(FactoredGroup {
            report,
            expert_tensors,
            basis: None,
            residual_eta: None,
            reconstruction,
        });
    }
    if matrix == ExpertMatrix::Down {
        return factor_down_group(backend, experts, job, settings, report);
    }
    let w = experts.stacked(backend, matrix, job.experts)?;
    let whitening = match (job.gram, settings.whiten) {
        (Some(gram), true) => Some(backend.whitening_factor(gram, settings.whiten_ridge)?),
        _ => None,
    };
    let factors = match &job.weights {
        Some(weights) => super::weighted_truncated_svd(
            backend,
            &w,
            report.rank,
            whitening.as_ref(),
            weights,
            settings.precision,
        )?,
        None => settings
            .factorizer
            .factor(backend, &w, report.rank, whitening.as_ref())?,
    };
    let mut reconstruction = factors.reconstruct_with(backend, settings.factorizer.activation())?;
    let residual_eta = if report.residual_size > 0 {
        let rank_cost = job.shape.rank_cost();
        let (eta, with_residual) = add_residual(
            backend,
            &w,
            &reconstruction,
            rank_cost,
            &mut report,
            settings,
        )?;
        reconstruction = with_residual;
        Some(
            Tensor::from_vec(eta.clone(), eta.len(), &Device::Cpu)?
                .to_dtype(settings.factor_dtype)?,
        )
    } else {
        None
    };
    let (w_host, reconstruction_host) = (backend.to_host(&w)?, backend.to_host(&reconstruction)?);
    report.relative_error = relative_error(&w_host, &reconstruction_host);
    if let Some(gram) = job.gram {
        report.activation_error = Some(activation_error(
            backend,
            &w,
            &reconstruction,
            gram,
            settings.precision,
        )?);
    }
    let per_expert = |m: &B::Matrix, dtype: DType| -> Result<Vec<Tensor>> {
        (0..job.experts.len())
            .map(|slot| backend.rows_to_tensor(m, slot * rows, rows, dtype, &Device::Cpu))
            .collect()
    };
    let basis_rows = backend.shape(&factors.basis).0;
    Ok(FactoredGroup {
        expert_tensors: per_expert(&factors.coefficients, settings.factor_dtype)?,
        basis: Some(backend.rows_to_tensor(
            &factors.basis,
            0,
            basis_rows,
            settings.factor_dtype,
            &Device::Cpu,
        )?),
        residual_eta,
        reconstruction: match settings.keep_reconstruction {
            true => Some(per_expert(&reconstruction, settings.factor_dtype)?),
            false => None,
        },
        report,
    })
}

/// Factors a group of `down_proj` matrices with the output-side SVD
/// ([`super::factor_output_shared`], whitened by each member's intermediate Gram matrix) and
/// returns its tensors in the format's orientation: `C_j` [K, p] per member, `U_g` [d, K], and
/// reconstructions [d, p].
fn factor_down_group<B: LinalgBackend>(
    backend: &B,
    experts: &LayerExperts,
    job: &GroupJob<B::Matrix>,
    settings: &FactorSettings<B>,
    mut report: GroupReport,
) -> Result<FactoredGroup> {
    let blocks = experts.oriented_blocks(backend, ExpertMatrix::Down, job.experts)?;
    let whitening = match (&job.member_grams, settings.whiten) {
        (Some(grams), true) => Some(
            grams
                .iter()
                .map(|g| backend.whitening_factor(g, settings.whiten_ridge))
                .collect::<Result<Vec<_>>>()?,
        ),
        _ => None,
    };
    // Members weighted by their output sensitivity: `√ω_j S_j` in place of `S_j`.
    let whitening = match (&job.weights, whitening) {
        (Some(weights), factors) => {
            let p = job.shape.rows_per_expert;
            let factors = match factors {
                Some(factors) => factors,
                None => (0..weights.len())
                    .map(|_| backend.matrix_from_host(&faer::Mat::<f64>::identity(p, p)))
                    .collect::<Result<Vec<_>>>()?,
            };
            Some(
                factors
                    .iter()
                    .zip(weights)
                    .map(|(s, &w)| super::scaled(backend, s, w.sqrt()))
                    .collect::<Result<Vec<_>>>()?,
            )
        }
        (None, factors) => factors,
    };
    let factors = super::factor_output_shared(
        backend,
        &blocks,
        report.rank,
        whitening.as_deref(),
        settings.precision,
    )?;
    let w = backend.stack_rows(&blocks)?;
    let reconstruction = backend.matmul(&factors.coefficients, &factors.basis)?;
    report.relative_error =
        relative_error(&backend.to_host(&w)?, &backend.to_host(&reconstruction)?);
    if let Some(grams) = &job.member_grams {
        report.activation_error = Some(member_activation_error(
            backend,
            &blocks,
            &factors.basis,
            grams,
            settings.precision,
        )?);
    }
    let rows = job.shape.rows_per_expert;
    let transposed = |m: &B::Matrix, slot: usize| -> Result<Tensor> {
        let block =
            backend.rows_to_tensor(m, slot * rows, rows, settings.factor_dtype, &Device::Cpu)?;
        Ok(block.t()?.contiguous()?)
    };
    let members = 0..job.experts.len();
    let rank = backend.shape(&factors.basis).0;
    Ok(FactoredGroup {
        expert_tensors: members
            .clone()
            .map(|slot| transposed(&factors.coefficients, slot))
            .collect::<Result<_>>()?,
        basis: Some(
            backend
                .rows_to_tensor(&factors.basis, 0, rank, settings.factor_dtype, &Device::Cpu)?
                .t()?
                .contiguous()?,
        ),
        residual_eta: None,
        reconstruction: match settings.keep_reconstruction {
            true => Some(
                members
                    .map(|slot| transposed(&reconstruction, slot))
                    .collect::<Result<_>>()?,
            ),
            false => None,
        },
        report,
    })
}

/// `sqrt(Σ_j tr(E_j G_j E_jᵀ) / Σ_j tr(W_j G_j W_jᵀ))` for members `W_jᵀ` (`blocks`, [p, d]),
/// their projections `Ŵ_jᵀ = W_jᵀ U_g U_gᵀ` onto the rows of `basis` (`U_gᵀ`, [K, d]) and their
/// intermediate Gram matrices `G_j`: the relative output error of the group's down
/// projections over the routed calibration activations.
fn member_activation_error<B: LinalgBackend>(
    backend: &B,
    blocks: &[B::Matrix],
    basis: &B::Matrix,
    grams: &[&B::Matrix],
    precision: super::Precision,
) -> Result<f64> {
    let basis_t = backend.transpose(basis)?;
    let (mut error, mut energy) = (0.0, 0.0);
    for (w, gram) in blocks.iter().zip(grams) {
        let projected = backend.matmul(&backend.matmul(w, &basis_t)?, basis)?;
        let residual = backend.sub(w, &projected)?;
        error += quadratic_trace(backend, &backend.transpose(&residual)?, gram, precision)?;
        energy += quadratic_trace(backend, &backend.transpose(w)?, gram, precision)?;
    }
    if energy <= 0.0 {
        return Ok(0.0);
    }
    Ok((error / energy).max(0.0).sqrt())
}

/// Fits the sparse-projection residual of `w − reconstruction`, fills the residual fields of
/// `report`, and returns η with the reconstruction plus the expanded residual.
fn add_residual<B: LinalgBackend>(
    backend: &B,
    w: &B::Matrix,
    reconstruction: &B::Matrix,
    rank_cost: usize,
    report: &mut GroupReport,
    settings: &FactorSettings<B>,
) -> Result<(Vec<f32>, B::Matrix)> {
    let residual = backend.to_host(&backend.sub(w, reconstruction)?)?;
    let mut rebuilt = backend.to_host(reconstruction)?;
    let cols = residual.ncols();
    let flat: Vec<f32> = (0..residual.nrows())
        .flat_map(|i| (0..cols).map(move |j| (i, j)))
        .map(|(i, j)| residual[(i, j)] as f32)
        .collect();
    let projection =
        SparseProjection::new(settings.residual_seed, flat.len(), report.residual_size);
    let eta = projection.project(&flat);
    let expanded = projection.expand(&eta);
    let energy: f64 = flat.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let mut recovered = 0.0;
    for (t, &v) in expanded.iter().enumerate() {
        rebuilt[(t / cols, t % cols)] += v as f64;
        recovered += (v as f64) * (v as f64);
    }
    let recovered_fraction = if energy > 0.0 {
        recovered / energy
    } else {
        0.0
    };
    report.residual_energy_recovered = Some(recovered_fraction);
    report.residual_energy_per_parameter = Some(recovered_fraction / report.residual_size as f64);
    let spectrum = backend.squared_singular_values(w)?;
    let tail: f64 = spectrum.iter().skip(report.rank).sum();
    let next = spectrum.get(report.rank).copied().unwrap_or(0.0);
    report.rank_energy_per_parameter = Some(if tail > 0.0 {
        next / tail / rank_cost as f64
    } else {
        0.0
    });
    Ok((eta, backend.matrix_from_host(&rebuilt)?))
}

/// `tr(M G Mᵀ)` in `precision`.
fn quadratic_trace<B: LinalgBackend>(
    backend: &B,
    m: &B::Matrix,
    gram: &B::Matrix,
    precision: super::Precision,
) -> Result<f64> {
    match precision {
        super::Precision::Double => backend.quadratic_trace(m, gram),
        super::Precision::Single => backend.quadratic_trace_single(m, gram),
    }
}

/// ‖(W−Ŵ)X‖_F / ‖WX‖_F from the input Gram G = XXᵀ: sqrt(tr(E G Eᵀ) / tr(W G Wᵀ)).
fn activation_error<B: LinalgBackend>(
    backend: &B,
    w: &B::Matrix,
    w_hat: &B::Matrix,
    gram: &B::Matrix,
    precision: super::Precision,
) -> Result<f64> {
    let denominator = quadratic_trace(backend, w, gram, precision)?;
    if denominator <= 0.0 {
        return Ok(0.0);
    }
    let error = backend.sub(w, w_hat)?;
    Ok(
        (quadratic_trace(backend, &error, gram, precision)? / denominator)
            .max(0.0)
            .sqrt(),
    )
}
