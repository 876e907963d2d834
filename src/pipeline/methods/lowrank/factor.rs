//! Factoring (arXiv 2602.09316 §3.4): a stacked group `W_g` (`k·p × d`) becomes per-expert
//! coefficients `A` (`k·p × K`) and one shared basis `B` (`K × d`), through the linear-algebra
//! backend; [`factor_layer`] turns a layer's [`RankPlan`](super::allocate::RankPlan) into a
//! [`FactoredLayer`] of tensors ready to write.
//!
//! Two factorisers share the [`Factorizer`] trait: [`SvdFactorizer`] (closed-form truncated
//! SVD, optionally activation-aware) and [`BasisFactorizer`] (MoBE-style `Ŵ = A·SiLU(B)`
//! fitted with Adam from an SVD initialisation, on the host).

use faer::Mat;

pub use crate::format::BasisActivation;
use crate::linalg::{frobenius_norm, CpuBackend, LinalgBackend};
use crate::{Error, Result};

mod layer;

pub use layer::{
    factor_groups, factor_layer, input_gram, member_grams, FactorSettings, FactoredGroup,
    FactoredLayer, FactoredMatrix, GroupJob,
};

/// Factors of one group: `Ŵ_g = coefficients · act(basis)`, in a backend's matrix type.
#[derive(Debug, Clone)]
pub struct GroupFactors<M = Mat<f64>> {
    /// `(k·p) × K`; the rows of expert `i` (in group order) are `i·p .. (i+1)·p`.
    pub coefficients: M,
    /// `K × d`, stored raw (before the activation); for the basis factoriser `Ŵ = A·SiLU(B)`.
    pub basis: M,
}

impl GroupFactors<Mat<f64>> {
    /// Rank `K` of the factorisation.
    pub fn rank(&self) -> usize {
        self.basis.nrows()
    }

    /// The approximation `Ŵ_g = A · act(B)` (`k·p × d`).
    pub fn reconstruct(&self, activation: BasisActivation) -> Mat<f64> {
        match activation {
            BasisActivation::Identity => &self.coefficients * &self.basis,
            BasisActivation::Silu => &self.coefficients * silu_mat(&self.basis),
        }
    }
}

impl<M> GroupFactors<M> {
    /// The approximation `Ŵ_g = A · act(B)` computed by `backend`.
    pub fn reconstruct_with<B: LinalgBackend<Matrix = M>>(
        &self,
        backend: &B,
        activation: BasisActivation,
    ) -> Result<M> {
        match activation {
            BasisActivation::Identity => backend.matmul(&self.coefficients, &self.basis),
            BasisActivation::Silu => {
                let basis = backend.matrix_from_host(&silu_mat(&backend.to_host(&self.basis)?))?;
                backend.matmul(&self.coefficients, &basis)
            }
        }
    }
}

/// A way to factor a stacked group at a given rank, with matrices of backend `B`.
pub trait Factorizer<B: LinalgBackend>: Send + Sync {
    /// Short name used on the command line and in saved settings (`svd`, `basis`).
    fn name(&self) -> &'static str;

    /// Activation applied to the basis at inference.
    fn activation(&self) -> BasisActivation;

    /// Factor `stacked` (`k·p × d`) at `rank`; `whitening` is the lower factor `S` (`d × d`,
    /// `S Sᵀ` = input Gram + ridge) under whose metric `‖(W − Ŵ) S‖_F` is minimised.
    fn factor(
        &self,
        backend: &B,
        stacked: &B::Matrix,
        rank: usize,
        whitening: Option<&B::Matrix>,
    ) -> Result<GroupFactors<B::Matrix>>;
}

/// Relative Frobenius error `‖W − Ŵ‖_F / ‖W‖_F`.
///
/// When `‖W‖_F = 0` it is 0 if `Ŵ` is zero too and `+∞` otherwise; mismatched shapes give NaN.
pub fn relative_error(w: &Mat<f64>, w_hat: &Mat<f64>) -> f64 {
    if (w.nrows(), w.ncols()) != (w_hat.nrows(), w_hat.ncols()) {
        return f64::NAN;
    }
    let diff = frobenius_norm(&(w - w_hat));
    let norm = frobenius_norm(w);
    if norm == 0.0 {
        return if diff == 0.0 { 0.0 } else { f64::INFINITY };
    }
    diff / norm
}

fn check_inputs(
    shape: (usize, usize),
    rank: usize,
    whitening: Option<(usize, usize)>,
) -> Result<()> {
    let (m, d) = shape;
    let max_rank = m.min(d);
    if rank == 0 || rank > max_rank {
        return Err(Error::InvalidArgument(format!(
            "rank {rank} is outside [1, {max_rank}] for a {m}×{d} group"
        )));
    }
    if let Some((rows, cols)) = whitening {
        if (rows, cols) != (d, d) {
            return Err(Error::InvalidArgument(format!(
                "whitening factor is {rows}×{cols}, expected {d}×{d} for a {m}×{d} group"
            )));
        }
    }
    Ok(())
}

/// Truncated SVD `W ≈ U_K Σ_K V_Kᵀ` as `A = U_K Σ_K`, `B = V_Kᵀ` (linear basis).
///
/// With a whitening factor `S`, the SVD is of `W S` and `B = V_Kᵀ S⁻¹` (a triangular solve),
/// which minimises `‖(W − A B) S‖_F` over rank-`K` products (SVD-LLM).
fn truncated_svd<B: LinalgBackend>(
    backend: &B,
    stacked: &B::Matrix,
    rank: usize,
    whitening: Option<&B::Matrix>,
) -> Result<(B::Matrix, B::Matrix)> {
    let target = match whitening {
        Some(s) => backend.matmul(stacked, s)?,
        None => stacked.clone(),
    };
    // A = U_K Σ_K = target · V_K, so only the leading right singular vectors are needed.
    let v = backend.leading_right_singular_vectors(&target, rank)?;
    let coefficients = backend.matmul(&target, &v)?;
    let basis = match whitening {
        None => backend.transpose(&v)?,
        // Bᵀ = S⁻ᵀ V_K: solve the upper-triangular system Sᵀ Bᵀ = V_K.
        Some(s) => backend.transpose(&backend.solve_lower_transposed(s, &v)?)?,
    };
    backend.check_finite(
        &basis,
        "SVD basis has non-finite entries; is the whitening factor singular?",
    )?;
    Ok((coefficients, basis))
}

/// `a · factor` in the backend.
pub(crate) fn scaled<B: LinalgBackend>(
    backend: &B,
    a: &B::Matrix,
    factor: f64,
) -> Result<B::Matrix> {
    let mut host = backend.to_host(a)?;
    host *= faer::Scale(factor);
    backend.matrix_from_host(&host)
}

/// The arithmetic a factorisation's singular vectors are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Double precision.
    Double,
    /// Single precision where the backend can: for factors stored in 8 bits.
    Single,
}

/// The `rank` leading right singular vectors of `a` in `precision`.
fn leading_vectors<B: LinalgBackend>(
    backend: &B,
    a: &B::Matrix,
    rank: usize,
    precision: Precision,
) -> Result<B::Matrix> {
    match precision {
        Precision::Double => backend.leading_right_singular_vectors(a, rank),
        Precision::Single => backend.leading_right_singular_vectors_single(a, rank),
    }
}

/// `a · b` in `precision`.
fn product<B: LinalgBackend>(
    backend: &B,
    a: &B::Matrix,
    b: &B::Matrix,
    precision: Precision,
) -> Result<B::Matrix> {
    match precision {
        Precision::Double => backend.matmul(a, b),
        Precision::Single => backend.matmul_single(a, b),
    }
}

/// Truncated SVD of a stacked group under output-sensitivity row weights `w` (one per row of
/// `stacked`): the basis is fitted to `diag(√w) · W · S` (S the whitening factor, identity
/// without), which minimises `Σ_i w_i ‖(W_i − Ŵ_i) S‖²` over rank-`rank` products with a
/// shared basis; each row's coefficients are then its own projection, `A = W S V`, whatever
/// its weight (a row's best coefficients for a fixed basis do not depend on its weight), and
/// `B = Vᵀ S⁻¹`.
pub fn weighted_truncated_svd<B: LinalgBackend>(
    backend: &B,
    stacked: &B::Matrix,
    rank: usize,
    whitening: Option<&B::Matrix>,
    weights: &[f64],
    precision: Precision,
) -> Result<GroupFactors<B::Matrix>> {
    let (rows, cols) = backend.shape(stacked);
    check_inputs((rows, cols), rank, whitening.map(|s| backend.shape(s)))?;
    if weights.len() != rows {
        return Err(Error::InvalidArgument(format!(
            "{} row weights for a group of {rows} rows",
            weights.len()
        )));
    }
    let target = match whitening {
        Some(s) => product(backend, stacked, s, precision)?,
        None => stacked.clone(),
    };
    let mut weighted = backend.to_host(&target)?;
    for (i, &w) in weights.iter().enumerate() {
        let scale = w.max(0.0).sqrt();
        for j in 0..cols {
            weighted[(i, j)] *= scale;
        }
    }
    let v = leading_vectors(
        backend,
        &backend.matrix_from_host(&weighted)?,
        rank,
        precision,
    )?;
    let coefficients = product(backend, &target, &v, precision)?;
    let basis = match whitening {
        None => backend.transpose(&v)?,
        Some(s) => backend.transpose(&backend.solve_lower_transposed(s, &v)?)?,
    };
    backend.check_finite(
        &basis,
        "SVD basis has non-finite entries; is the whitening factor singular?",
    )?;
    Ok(GroupFactors {
        coefficients,
        basis,
    })
}

/// Output-side truncated SVD of a group of `down_proj` matrices (docs/FORMAT.md, "down_proj").
///
/// `members` are the experts' `W_jᵀ` (`p × d` each: the factor stage's orientation, in which the
/// shared output side `d` is the columns) and `whitening` their lower factors `S_j` (`p × p`,
/// `S_j S_jᵀ` = expert j's intermediate Gram + ridge). The shared basis `U_g` (`d × K`) is the
/// `K` leading left singular vectors of `[W_1 S_1, …, W_k S_k]`, found as the leading right
/// singular vectors of its transpose (the row stack of `S_jᵀ W_jᵀ`), and `C_j = U_gᵀ W_j`.
/// The factors come back transposed like every group's: coefficients `[C_1ᵀ; …; C_kᵀ]`
/// (`k·p × K`) and basis `U_gᵀ` (`K × d`), so `coefficients · basis` stacks `Ŵ_jᵀ = W_jᵀ U_g U_gᵀ`.
/// Over all `U_g` with orthonormal columns and all `C_j`, this minimises
/// `Σ_j ‖(W_j − U_g C_j) S_j‖²_F`, which then equals the sum of the squared singular values
/// of `[W_1 S_1, …, W_k S_k]` past `K`.
pub fn factor_output_shared<B: LinalgBackend>(
    backend: &B,
    members: &[B::Matrix],
    rank: usize,
    whitening: Option<&[B::Matrix]>,
    precision: Precision,
) -> Result<GroupFactors<B::Matrix>> {
    let Some(first) = members.first() else {
        return Err(Error::InvalidArgument(
            "an output-side group needs at least one member".into(),
        ));
    };
    let (p, d) = backend.shape(first);
    if members.iter().any(|m| backend.shape(m) != (p, d)) {
        return Err(Error::InvalidArgument(format!(
            "output-side group members differ in shape (expected {p}×{d} each)"
        )));
    }
    check_inputs((members.len() * p, d), rank, None)?;
    let stacked = backend.stack_rows(members)?;
    let target = match whitening {
        None => stacked.clone(),
        Some(factors) => {
            if factors.len() != members.len() || factors.iter().any(|s| backend.shape(s) != (p, p))
            {
                return Err(Error::InvalidArgument(format!(
                    "{} whitening factors for {} members of {p}×{d}: expected one {p}×{p} each",
                    factors.len(),
                    members.len()
                )));
            }
            let blocks = members
                .iter()
                .zip(factors)
                .map(|(w, s)| backend.matmul(&backend.transpose(s)?, w))
                .collect::<Result<Vec<_>>>()?;
            backend.stack_rows(&blocks)?
        }
    };
    let v = leading_vectors(backend, &target, rank, precision)?;
    let coefficients = product(backend, &stacked, &v, precision)?;
    let basis = backend.transpose(&v)?;
    backend.check_finite(
        &coefficients,
        "output-side coefficients have non-finite entries",
    )?;
    Ok(GroupFactors {
        coefficients,
        basis,
    })
}

/// Closed-form truncated SVD factoriser (`Ŵ_i = A_i B_g`), optionally activation-aware.
#[derive(Debug, Clone, Copy, Default)]
pub struct SvdFactorizer;

impl<B: LinalgBackend> Factorizer<B> for SvdFactorizer {
    fn name(&self) -> &'static str {
        "svd"
    }

    fn activation(&self) -> BasisActivation {
        BasisActivation::Identity
    }

    fn factor(
        &self,
        backend: &B,
        stacked: &B::Matrix,
        rank: usize,
        whitening: Option<&B::Matrix>,
    ) -> Result<GroupFactors<B::Matrix>> {
        check_inputs(
            backend.shape(stacked),
            rank,
            whitening.map(|s| backend.shape(s)),
        )?;
        let (coefficients, basis) = truncated_svd(backend, stacked, rank, whitening)?;
        Ok(GroupFactors {
            coefficients,
            basis,
        })
    }
}

/// MoBE-style factoriser `Ŵ_i = A_i · SiLU(B_g)` fitted with Adam (docs/METHOD.md §1, `basis`).
///
/// Gradients are hand-coded in `f64` on top of faer matmuls (no autograd): with
/// `R = A·SiLU(B) − W` the loss is `‖R‖²_F` (or `‖R S‖²_F` with whitening, computed as
/// `⟨R, R·S Sᵀ⟩`), `∇_A = 2 R' SiLU(B)ᵀ` and `∇_B = 2 (Aᵀ R') ⊙ SiLU'(B)` with `R' = R`
/// (or `R S Sᵀ`). Targets are divided by the std of `W` and `A` is rescaled at the end.
///
/// Initialisation: the truncated SVD (whitened when `S` is given) gives `A = U_K Σ_K` and a
/// linear basis `V`; each basis row whose largest magnitude exceeds 0.25 is scaled down to it
/// (the scale moves into `A`), so every entry lies inside SiLU's range (min ≈ −0.278), and
/// `B = SiLU⁻¹(V)` is found elementwise by Newton's method on SiLU's increasing branch
/// (x > −1.278). The initial loss therefore equals the SVD's to rounding. The best state seen
/// is kept, so the result is never worse than that initialisation.
///
/// Caveat (measured, see tests): with one basis per group, `A·SiLU(B)` spans exactly the
/// matrices of rank ≤ K (SiLU maps onto [−0.278, ∞) and `A` absorbs per-row scales), so by
/// Eckart–Young no fit can beat the (whitened) SVD initialisation on this loss; Adam only
/// matters when the start is not already optimal.
#[derive(Debug, Clone, Copy)]
pub struct BasisFactorizer {
    /// Maximum number of full-batch Adam steps (MoBE: up to 30,000).
    pub steps: usize,
    /// Adam learning rate (MoBE: 0.07; on std-scaled targets).
    pub learning_rate: f64,
    /// Stop after this many steps without a 1e-4 relative improvement of the best loss (0 = never).
    pub patience: usize,
}

impl Default for BasisFactorizer {
    fn default() -> Self {
        BasisFactorizer {
            steps: 30_000,
            learning_rate: 0.07,
            patience: 200,
        }
    }
}

/// What one basis fit did; losses are `‖(W − Ŵ)·S‖²_F / ‖W·S‖²_F` (`S = I` unless whitened).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BasisFitReport {
    /// Relative squared error of the SVD initialisation.
    pub initial_loss: f64,
    /// Relative squared error of the returned (best) state.
    pub best_loss: f64,
    /// Adam steps taken.
    pub steps_run: usize,
    /// Step at which the best state was seen (0 = the initialisation).
    pub best_step: usize,
}

impl<B: LinalgBackend> Factorizer<B> for BasisFactorizer {
    fn name(&self) -> &'static str {
        "basis"
    }

    fn activation(&self) -> BasisActivation {
        BasisActivation::Silu
    }

    fn factor(
        &self,
        backend: &B,
        stacked: &B::Matrix,
        rank: usize,
        whitening: Option<&B::Matrix>,
    ) -> Result<GroupFactors<B::Matrix>> {
        // The Adam fit runs on the host in f64.
        let stacked = backend.to_host(stacked)?;
        let whitening = whitening.map(|s| backend.to_host(s)).transpose()?;
        let (factors, _) = self.fit(&stacked, rank, whitening.as_ref())?;
        Ok(GroupFactors {
            coefficients: backend.matrix_from_host(&factors.coefficients)?,
            basis: backend.matrix_from_host(&factors.basis)?,
        })
    }
}

/// Largest magnitude a linear basis entry may have before SiLU inversion (SiLU ≥ −0.2785).
const SILU_INVERT_LIMIT: f64 = 0.25;
/// Where SiLU has its minimum; the increasing branch starts here.
const SILU_ARGMIN: f64 = -1.278_464_542_761_074;
/// Adam's moment decay rates and denominator guard.
const ADAM_BETA1: f64 = 0.9;
const ADAM_BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;
/// Relative improvement that resets the patience counter.
const IMPROVEMENT: f64 = 1e-4;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

fn silu_derivative(x: f64) -> f64 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// `x ≥ SILU_ARGMIN` with `SiLU(x) = y` (Newton); `y` below SiLU's minimum maps to the argmin.
fn silu_inverse(y: f64) -> f64 {
    if y <= silu(SILU_ARGMIN) {
        return SILU_ARGMIN;
    }
    // Near 0, SiLU(x) ≈ x/2; far right, SiLU(x) ≈ x.
    let mut x = if y > 0.0 {
        2.0 * y.min(1.0) + (y - 1.0).max(0.0)
    } else {
        2.0 * y
    };
    for _ in 0..60 {
        let f = silu(x) - y;
        if f.abs() <= 1e-15 * (1.0 + y.abs()) {
            break;
        }
        let step = f / silu_derivative(x).max(1e-12);
        x = (x - step).max(SILU_ARGMIN);
    }
    x
}

fn map_mat(a: &Mat<f64>, f: impl Fn(f64) -> f64) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), a.ncols());
    for j in 0..a.ncols() {
        for (o, &x) in out.col_as_slice_mut(j).iter_mut().zip(a.col_as_slice(j)) {
            *o = f(x);
        }
    }
    out
}

fn silu_mat(a: &Mat<f64>) -> Mat<f64> {
    map_mat(a, silu)
}

/// `Σ a ⊙ b` over all entries.
fn dot(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    crate::linalg::column_dot(a, b)
}

/// Adam state of one parameter matrix.
struct Adam {
    first: Mat<f64>,
    second: Mat<f64>,
}

impl Adam {
    fn new(rows: usize, cols: usize) -> Self {
        Adam {
            first: Mat::zeros(rows, cols),
            second: Mat::zeros(rows, cols),
        }
    }

    /// One Adam update of `param` with `grad` at (1-based) step `t`.
    fn step(&mut self, param: &mut Mat<f64>, grad: &Mat<f64>, lr: f64, t: usize) {
        let c1 = 1.0 - ADAM_BETA1.powi(t as i32);
        let c2 = 1.0 - ADAM_BETA2.powi(t as i32);
        for j in 0..param.ncols() {
            let g = grad.col_as_slice(j);
            let m = self.first.col_as_slice_mut(j);
            let v = self.second.col_as_slice_mut(j);
            let p = param.col_as_slice_mut(j);
            for i in 0..p.len() {
                m[i] = ADAM_BETA1 * m[i] + (1.0 - ADAM_BETA1) * g[i];
                v[i] = ADAM_BETA2 * v[i] + (1.0 - ADAM_BETA2) * g[i] * g[i];
                p[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + ADAM_EPS);
            }
        }
    }
}

/// Loss `‖R‖²` or `‖R S‖²` and the metric-weighted residual `R'` (`R` or `R S Sᵀ`).
struct Objective<'a> {
    target: &'a Mat<f64>,
    /// `(S Sᵀ, W S Sᵀ)` when whitened.
    metric: Option<(Mat<f64>, Mat<f64>)>,
}

impl Objective<'_> {
    fn evaluate(&self, a: &Mat<f64>, z: &Mat<f64>) -> (f64, Mat<f64>) {
        let residual = a * z - self.target;
        match &self.metric {
            None => (dot(&residual, &residual), residual),
            Some((m, wm)) => {
                // R M = A (Z M) − W M costs K·d² + k·p·K·d instead of k·p·d².
                let zm = z * m;
                let weighted = a * &zm - wm;
                (dot(&residual, &weighted), weighted)
            }
        }
    }

    /// Loss at `(A, B)` and its gradients with respect to `A` and `B`.
    fn loss_and_gradients(&self, a: &Mat<f64>, b: &Mat<f64>) -> (f64, Mat<f64>, Mat<f64>) {
        let z = silu_mat(b);
        let (loss, weighted) = self.evaluate(a, &z);
        let grad_a = map_mat(&(&weighted * z.transpose()), |g| 2.0 * g);
        let grad_z = a.transpose() * &weighted;
        let mut grad_b = Mat::zeros(b.nrows(), b.ncols());
        for j in 0..b.ncols() {
            let out = grad_b.col_as_slice_mut(j);
            for ((o, &gz), &x) in out
                .iter_mut()
                .zip(grad_z.col_as_slice(j))
                .zip(b.col_as_slice(j))
            {
                *o = 2.0 * gz * silu_derivative(x);
            }
        }
        (loss, grad_a, grad_b)
    }
}

impl BasisFactorizer {
    /// Fit `Ŵ = A·SiLU(B)` to `stacked` (`k·p × d`) at `rank`, returning the factors and a report.
    ///
    /// With `whitening` (`S`, `d × d` lower) the loss is `‖(W − Ŵ) S‖²_F` and the
    /// initialisation is the whitened SVD.
    pub fn fit(
        &self,
        stacked: &Mat<f64>,
        rank: usize,
        whitening: Option<&Mat<f64>>,
    ) -> Result<(GroupFactors, BasisFitReport)> {
        check_inputs(
            (stacked.nrows(), stacked.ncols()),
            rank,
            whitening.map(|s| (s.nrows(), s.ncols())),
        )?;
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "basis learning rate must be positive, got {}",
                self.learning_rate
            )));
        }
        let count = (stacked.nrows() * stacked.ncols()) as f64;
        let mean = (0..stacked.ncols())
            .map(|j| stacked.col_as_slice(j).iter().sum::<f64>())
            .sum::<f64>()
            / count;
        let variance = dot(stacked, stacked) / count - mean * mean;
        let scale = if variance > 0.0 && variance.is_finite() {
            variance.sqrt()
        } else {
            1.0
        };
        let target = map_mat(stacked, |x| x / scale);

        let (mut a, linear) = truncated_svd(&CpuBackend, &target, rank, whitening)?;
        let mut linear = linear;
        for k in 0..rank {
            let peak = (0..linear.ncols())
                .map(|j| linear[(k, j)].abs())
                .fold(0.0, f64::max);
            if peak > SILU_INVERT_LIMIT {
                let c = peak / SILU_INVERT_LIMIT;
                for j in 0..linear.ncols() {
                    linear[(k, j)] /= c;
                }
                for i in 0..a.nrows() {
                    a[(i, k)] *= c;
                }
            }
        }
        let b = map_mat(&linear, silu_inverse);

        let metric = whitening.map(|s| {
            let m = s * s.transpose();
            let wm = &target * &m;
            (m, wm)
        });
        let objective = Objective {
            target: &target,
            metric,
        };
        let reference = match &objective.metric {
            None => dot(&target, &target),
            Some((_, wm)) => dot(&target, wm),
        };
        let reference = if reference > 0.0 { reference } else { 1.0 };

        let fit = self.optimise(&objective, a, b);
        if !fit.initial_loss.is_finite() {
            return Err(Error::Numerical(format!(
                "basis fit of a {}×{} group at rank {rank}: initial loss is {}",
                stacked.nrows(),
                stacked.ncols(),
                fit.initial_loss
            )));
        }
        let report = BasisFitReport {
            initial_loss: fit.initial_loss / reference,
            best_loss: fit.best_loss / reference,
            steps_run: fit.steps_run,
            best_step: fit.best_step,
        };
        let (mut coefficients, basis) = (fit.a, fit.b);
        for j in 0..coefficients.ncols() {
            for x in coefficients.col_as_slice_mut(j) {
                *x *= scale;
            }
        }
        Ok((
            GroupFactors {
                coefficients,
                basis,
            },
            report,
        ))
    }

    /// Adam from `(a, b)` on `objective`, keeping the best state (unscaled losses).
    fn optimise(&self, objective: &Objective<'_>, mut a: Mat<f64>, mut b: Mat<f64>) -> Optimised {
        let mut adam_a = Adam::new(a.nrows(), a.ncols());
        let mut adam_b = Adam::new(b.nrows(), b.ncols());
        let mut best = (a.clone(), b.clone());
        let mut best_loss = f64::INFINITY;
        let mut best_step = 0;
        let mut initial_loss = f64::NAN;
        let mut reference_loss = f64::INFINITY;
        let mut stale = 0;
        let mut steps_run = 0;
        // Iteration t evaluates the state after t updates; the last one only evaluates.
        for t in 0..=self.steps {
            let (loss, grad_a, grad_b) = objective.loss_and_gradients(&a, &b);
            if t == 0 {
                initial_loss = loss;
            }
            if !loss.is_finite() {
                break;
            }
            if loss < best_loss {
                best_loss = loss;
                best_step = t;
                best = (a.clone(), b.clone());
            }
            if loss < reference_loss * (1.0 - IMPROVEMENT) {
                reference_loss = loss;
                stale = 0;
            } else {
                stale += 1;
                if self.patience > 0 && stale >= self.patience {
                    break;
                }
            }
            if t == self.steps {
                break;
            }
            adam_a.step(&mut a, &grad_a, self.learning_rate, t + 1);
            adam_b.step(&mut b, &grad_b, self.learning_rate, t + 1);
            steps_run = t + 1;
        }
        Optimised {
            a: best.0,
            b: best.1,
            initial_loss,
            best_loss,
            steps_run,
            best_step,
        }
    }
}

/// Result of [`BasisFactorizer::optimise`].
struct Optimised {
    a: Mat<f64>,
    b: Mat<f64>,
    initial_loss: f64,
    best_loss: f64,
    steps_run: usize,
    best_step: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::tests::TestRng;
    use crate::linalg::whitening_factor;
    use crate::linalg::{frobenius_norm, singular_values, stack_rows};

    /// A `m × n` matrix with a decaying spectrum (product of two Gaussian factors plus noise).
    fn structured(rng: &mut TestRng, m: usize, n: usize, inner: usize) -> Mat<f64> {
        let left = rng.matrix(m, inner);
        let mut right = rng.matrix(inner, n);
        for k in 0..inner {
            let decay = 1.0 / (1.0 + k as f64);
            for j in 0..n {
                right[(k, j)] *= decay;
            }
        }
        let noise = map_mat(&rng.matrix(m, n), |x| 0.01 * x);
        &left * &right + noise
    }

    #[test]
    fn single_precision_fits_err_as_little_as_double_precision() {
        let mut rng = TestRng::new(31);
        let (rows, cols, rank) = (96, 40, 8);
        let w = structured(&mut rng, rows, cols, 20);
        let x = rng.matrix(3 * cols, cols);
        let s = whitening_factor(&(x.transpose() * &x), 1e-4).unwrap();
        let weights: Vec<f64> = (0..rows).map(|i| 0.5 + (i % 5) as f64).collect();
        // Σ_i w_i ‖(W_i − Ŵ_i) S‖², the error the fit minimises.
        let weighted_error = |f: &GroupFactors<Mat<f64>>| {
            let e = (&w - f.reconstruct(BasisActivation::Identity)) * &s;
            (0..rows)
                .map(|i| weights[i] * (0..cols).map(|j| e[(i, j)].powi(2)).sum::<f64>())
                .sum::<f64>()
        };
        let fit = |precision| {
            weighted_truncated_svd(&CpuBackend, &w, rank, Some(&s), &weights, precision).unwrap()
        };
        let (double, single) = (
            weighted_error(&fit(Precision::Double)),
            weighted_error(&fit(Precision::Single)),
        );
        assert!(
            (single / double - 1.0).abs() < 1e-4,
            "{single} against {double}"
        );
        // The output side likewise: its error is the tail of the whitened stack's spectrum.
        let members: Vec<Mat<f64>> = (0..3).map(|_| structured(&mut rng, 12, cols, 6)).collect();
        let tail = |precision| {
            let f = factor_output_shared(&CpuBackend, &members, rank, None, precision).unwrap();
            let stacked = stack_rows(&members).unwrap();
            frobenius_norm(&(&stacked - f.reconstruct(BasisActivation::Identity))).powi(2)
        };
        let (double, single) = (tail(Precision::Double), tail(Precision::Single));
        assert!(
            (single / double - 1.0).abs() < 1e-4,
            "{single} against {double}"
        );
    }

    #[test]
    fn svd_full_rank_reconstructs_exactly() {
        let mut rng = TestRng::new(11);
        let w = rng.matrix(12, 8);
        let f = SvdFactorizer.factor(&CpuBackend, &w, 8, None).unwrap();
        assert_eq!((f.coefficients.nrows(), f.coefficients.ncols()), (12, 8));
        assert_eq!((f.basis.nrows(), f.basis.ncols()), (8, 8));
        assert!(relative_error(&w, &f.reconstruct(BasisActivation::Identity)) < 1e-9);

        // Whitened, full rank: B = Vᵀ S⁻¹ undoes S exactly.
        let x = rng.matrix(8, 40);
        let s = whitening_factor(&(&x * x.transpose()), 1e-4).unwrap();
        let f = SvdFactorizer.factor(&CpuBackend, &w, 8, Some(&s)).unwrap();
        assert!(relative_error(&w, &f.reconstruct(BasisActivation::Identity)) < 1e-9);
    }

    #[test]
    fn svd_truncation_error_matches_eckart_young() {
        let mut rng = TestRng::new(12);
        let w = structured(&mut rng, 24, 16, 16);
        let sigma = singular_values(&w).unwrap();
        for rank in [1, 4, 9, 15] {
            let f = SvdFactorizer.factor(&CpuBackend, &w, rank, None).unwrap();
            assert_eq!(f.rank(), rank);
            let err = frobenius_norm(&(&w - f.reconstruct(BasisActivation::Identity)));
            let dropped: f64 = sigma[rank..].iter().map(|s| s * s).sum::<f64>().sqrt();
            assert!(
                (err - dropped).abs() < 1e-9 * frobenius_norm(&w),
                "rank {rank}: {err} vs {dropped}"
            );
        }
    }

    #[test]
    fn whitened_svd_beats_plain_on_activation_error() {
        let mut rng = TestRng::new(13);
        let (m, d, tokens) = (32, 20, 200);
        let w = rng.matrix(m, d);
        // Anisotropic, correlated inputs: a few directions carry most of the energy.
        let mut x = rng.matrix(d, tokens);
        for i in 0..d {
            let scale = 10f64.powf(1.0 - 3.0 * i as f64 / d as f64);
            for t in 0..tokens {
                x[(i, t)] *= scale;
            }
        }
        let mix = &Mat::<f64>::identity(d, d) + map_mat(&rng.matrix(d, d), |v| 0.3 * v);
        let x = &mix * &x;
        let s = whitening_factor(&(&x * x.transpose()), 1e-6).unwrap();
        for rank in [2, 5, 10] {
            let plain = SvdFactorizer.factor(&CpuBackend, &w, rank, None).unwrap();
            let white = SvdFactorizer
                .factor(&CpuBackend, &w, rank, Some(&s))
                .unwrap();
            let err = |f: &GroupFactors| {
                frobenius_norm(&((&w - f.reconstruct(BasisActivation::Identity)) * &x))
            };
            let (ep, ew) = (err(&plain), err(&white));
            assert!(ew < 0.95 * ep, "rank {rank}: whitened {ew} vs plain {ep}");
            // The weight-space error goes the other way (plain SVD is optimal there).
            assert!(
                relative_error(&w, &plain.reconstruct(BasisActivation::Identity))
                    <= relative_error(&w, &white.reconstruct(BasisActivation::Identity)) + 1e-12
            );
        }
    }

    /// Down projections `W_j` [d, p] of a group sharing most of their output space, with
    /// anisotropic intermediate activations `H_j` [p, tokens] per expert.
    fn down_group(rng: &mut TestRng, k: usize, d: usize, p: usize) -> Vec<(Mat<f64>, Mat<f64>)> {
        let shared = structured(rng, d, 6, 6);
        (0..k)
            .map(|_| {
                let w = &shared * rng.matrix(6, p) + map_mat(&rng.matrix(d, p), |x| 0.05 * x);
                let mut h = rng.matrix(p, 3 * p);
                for i in 0..p {
                    let scale = 10f64.powf(1.0 - 2.0 * i as f64 / p as f64);
                    for t in 0..3 * p {
                        h[(i, t)] *= scale;
                    }
                }
                (w, h)
            })
            .collect()
    }

    #[test]
    fn output_shared_factors_are_the_whitened_left_singular_subspace() {
        let mut rng = TestRng::new(21);
        let (k, d, p) = (3, 10, 4);
        let group = down_group(&mut rng, k, d, p);
        let members: Vec<Mat<f64>> = group
            .iter()
            .map(|(w, _)| w.transpose().to_owned())
            .collect();
        let grams: Vec<Mat<f64>> = group.iter().map(|(_, h)| h * h.transpose()).collect();
        let whitening: Vec<Mat<f64>> = grams
            .iter()
            .map(|g| whitening_factor(g, 1e-6).unwrap())
            .collect();
        // The matrix whose left singular vectors the basis is: [W_1 S_1, …, W_k S_k] (d × k·p).
        let mut side_by_side = Mat::<f64>::zeros(d, k * p);
        for (j, ((w, _), s)) in group.iter().zip(&whitening).enumerate() {
            let ws = w * s;
            for r in 0..d {
                for c in 0..p {
                    side_by_side[(r, j * p + c)] = ws[(r, c)];
                }
            }
        }
        let sigma = singular_values(&side_by_side).unwrap();
        for rank in [1, 3, 6, 10] {
            let f = factor_output_shared(
                &CpuBackend,
                &members,
                rank,
                Some(&whitening),
                Precision::Double,
            )
            .unwrap();
            assert_eq!(
                (f.coefficients.nrows(), f.coefficients.ncols()),
                (k * p, rank)
            );
            assert_eq!((f.basis.nrows(), f.basis.ncols()), (rank, d));
            // U_g = basisᵀ has orthonormal columns.
            let gram = &f.basis * f.basis.transpose();
            assert!(relative_error(&Mat::identity(rank, rank), &gram) < 1e-9);
            let u = f.basis.transpose().to_owned();
            let mut whitened_error = 0.0;
            for (j, ((w, _), s)) in group.iter().zip(&whitening).enumerate() {
                // C_j = U_gᵀ W_j, and the coefficients hold C_jᵀ in expert j's rows.
                let c = u.transpose() * w;
                let stored = f
                    .coefficients
                    .as_ref()
                    .submatrix(j * p, 0, p, rank)
                    .transpose()
                    .to_owned();
                assert!(
                    relative_error(&c, &stored) < 1e-9,
                    "rank {rank}, expert {j}"
                );
                let w_hat = &u * &c;
                whitened_error += frobenius_norm(&((w - &w_hat) * s)).powi(2);
            }
            // Σ_j ‖(W_j − U C_j) S_j‖² is the energy of the singular values past the rank.
            let tail: f64 = sigma[rank.min(sigma.len())..].iter().map(|s| s * s).sum();
            let energy: f64 = sigma.iter().map(|s| s * s).sum();
            assert!(
                (whitened_error - tail).abs() <= 1e-9 * energy,
                "rank {rank}: whitened error {whitened_error} vs tail {tail}"
            );
            // coefficients · basis stacks Ŵ_jᵀ.
            let w_hat_t = f.reconstruct(BasisActivation::Identity);
            for (j, (w, _)) in group.iter().enumerate() {
                let block = w_hat_t
                    .as_ref()
                    .submatrix(j * p, 0, p, d)
                    .transpose()
                    .to_owned();
                assert!(relative_error(&(&u * (u.transpose() * w)), &block) < 1e-9);
            }
        }
        // Full rank (d ≤ k·p) reconstructs every member exactly.
        let f = factor_output_shared(
            &CpuBackend,
            &members,
            d,
            Some(&whitening),
            Precision::Double,
        )
        .unwrap();
        let stacked = CpuBackend.stack_rows(&members).unwrap();
        assert!(relative_error(&stacked, &f.reconstruct(BasisActivation::Identity)) < 1e-9);
    }

    #[test]
    fn output_shared_whitening_lowers_the_output_error() {
        let mut rng = TestRng::new(22);
        let (k, d, p) = (4, 16, 6);
        let group = down_group(&mut rng, k, d, p);
        let members: Vec<Mat<f64>> = group
            .iter()
            .map(|(w, _)| w.transpose().to_owned())
            .collect();
        let whitening: Vec<Mat<f64>> = group
            .iter()
            .map(|(_, h)| whitening_factor(&(h * h.transpose()), 1e-6).unwrap())
            .collect();
        // Σ_j ‖(W_j − Ŵ_j) H_j‖: what the routed tokens see.
        let output_error = |f: &GroupFactors| -> f64 {
            let u = f.basis.transpose().to_owned();
            group
                .iter()
                .map(|(w, h)| frobenius_norm(&((w - &u * (u.transpose() * w)) * h)).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        for rank in [2, 4, 8] {
            let plain =
                factor_output_shared(&CpuBackend, &members, rank, None, Precision::Double).unwrap();
            let white = factor_output_shared(
                &CpuBackend,
                &members,
                rank,
                Some(&whitening),
                Precision::Double,
            )
            .unwrap();
            let (ep, ew) = (output_error(&plain), output_error(&white));
            assert!(ew < 0.95 * ep, "rank {rank}: whitened {ew} vs plain {ep}");
        }
        assert!(factor_output_shared(&CpuBackend, &members, 0, None, Precision::Double).is_err());
        assert!(
            factor_output_shared(&CpuBackend, &members, d + 1, None, Precision::Double).is_err()
        );
        assert!(factor_output_shared(
            &CpuBackend,
            &members,
            2,
            Some(&whitening[..2]),
            Precision::Double
        )
        .is_err());
        assert!(
            factor_output_shared::<CpuBackend>(&CpuBackend, &[], 1, None, Precision::Double)
                .is_err()
        );
    }

    #[test]
    fn factor_rejects_bad_rank_and_whitening_shape() {
        let w = Mat::<f64>::identity(6, 4);
        assert!(matches!(
            SvdFactorizer.factor(&CpuBackend, &w, 0, None),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            SvdFactorizer.factor(&CpuBackend, &w, 5, None),
            Err(Error::InvalidArgument(_))
        ));
        let s = Mat::<f64>::identity(6, 6);
        assert!(SvdFactorizer.factor(&CpuBackend, &w, 2, Some(&s)).is_err());
        let basis = BasisFactorizer::default();
        assert!(basis.factor(&CpuBackend, &w, 5, None).is_err());
    }

    #[test]
    fn silu_inverse_inverts_on_increasing_branch() {
        for &y in &[
            -0.27, -0.25, -0.1, -1e-6, 0.0, 1e-6, 0.02, 0.25, 1.0, 3.0, 10.0,
        ] {
            let x = silu_inverse(y);
            assert!(x >= SILU_ARGMIN);
            assert!(
                (silu(x) - y).abs() < 1e-12,
                "y = {y}: SiLU({x}) = {}",
                silu(x)
            );
        }
        assert_eq!(silu_inverse(-0.5), SILU_ARGMIN);
        assert!(silu_derivative(SILU_ARGMIN).abs() < 1e-9);
    }

    #[test]
    fn basis_fit_is_never_worse_than_its_svd_initialisation() {
        let mut rng = TestRng::new(14);
        let w = structured(&mut rng, 4 * 12, 24, 24);
        let rank = 6;
        let fitter = BasisFactorizer {
            steps: 300,
            learning_rate: 1e-3,
            patience: 50,
        };
        let (f, report) = fitter.fit(&w, rank, None).unwrap();
        assert_eq!((f.coefficients.nrows(), f.coefficients.ncols()), (48, rank));
        assert_eq!((f.basis.nrows(), f.basis.ncols()), (rank, 24));
        let w_hat = f.reconstruct(BasisActivation::Silu);
        assert_eq!((w_hat.nrows(), w_hat.ncols()), (48, 24));
        assert!(report.best_loss <= report.initial_loss, "{report:?}");
        // The report's loss is the relative squared error of what is returned.
        let rel = relative_error(&w, &w_hat);
        assert!(
            (rel * rel - report.best_loss).abs() < 1e-9,
            "{rel} vs {report:?}"
        );
        // The initialisation reproduces the truncated SVD, and A·SiLU(B) has rank ≤ K, so
        // Eckart–Young bounds the fit from below as well.
        let svd = SvdFactorizer.factor(&CpuBackend, &w, rank, None).unwrap();
        let svd_rel = relative_error(&w, &svd.reconstruct(BasisActivation::Identity));
        assert!((svd_rel * svd_rel - report.initial_loss).abs() < 1e-9);
        assert!(report.best_loss >= svd_rel * svd_rel * (1.0 - 1e-9));
        assert_eq!(
            Factorizer::<CpuBackend>::activation(&fitter),
            BasisActivation::Silu
        );
        assert_eq!(Factorizer::<CpuBackend>::name(&fitter), "basis");
    }

    /// Central finite differences of the loss against the hand-coded gradients.
    fn check_gradients(objective: &Objective<'_>, a: &Mat<f64>, b: &Mat<f64>) {
        let (_, grad_a, grad_b) = objective.loss_and_gradients(a, b);
        let h = 1e-6;
        let loss_at = |a: &Mat<f64>, b: &Mat<f64>| objective.loss_and_gradients(a, b).0;
        for (i, j) in [(0, 0), (3, 1), (a.nrows() - 1, a.ncols() - 1)] {
            let (mut plus, mut minus) = (a.clone(), a.clone());
            plus[(i, j)] += h;
            minus[(i, j)] -= h;
            let numeric = (loss_at(&plus, b) - loss_at(&minus, b)) / (2.0 * h);
            assert!(
                (numeric - grad_a[(i, j)]).abs() < 1e-5 * (1.0 + numeric.abs()),
                "dA({i},{j}): {numeric} vs {}",
                grad_a[(i, j)]
            );
        }
        for (i, j) in [(0, 0), (1, 4), (b.nrows() - 1, b.ncols() - 1)] {
            let (mut plus, mut minus) = (b.clone(), b.clone());
            plus[(i, j)] += h;
            minus[(i, j)] -= h;
            let numeric = (loss_at(a, &plus) - loss_at(a, &minus)) / (2.0 * h);
            assert!(
                (numeric - grad_b[(i, j)]).abs() < 1e-5 * (1.0 + numeric.abs()),
                "dB({i},{j}): {numeric} vs {}",
                grad_b[(i, j)]
            );
        }
    }

    #[test]
    fn basis_gradients_match_finite_differences() {
        let mut rng = TestRng::new(18);
        let w = rng.matrix(10, 7);
        let a = rng.matrix(10, 3);
        let b = rng.matrix(3, 7);
        let plain = Objective {
            target: &w,
            metric: None,
        };
        check_gradients(&plain, &a, &b);
        let x = rng.matrix(7, 20);
        let s = whitening_factor(&(&x * x.transpose()), 1e-4).unwrap();
        let m = &s * s.transpose();
        let wm = &w * &m;
        let whitened = Objective {
            target: &w,
            metric: Some((m, wm)),
        };
        check_gradients(&whitened, &a, &b);
        // The whitened loss is ‖(W − A·SiLU(B)) S‖².
        let (loss, _, _) = whitened.loss_and_gradients(&a, &b);
        let direct = frobenius_norm(&((&a * silu_mat(&b) - &w) * &s)).powi(2);
        assert!((loss - direct).abs() < 1e-9 * direct);
    }

    #[test]
    fn basis_adam_descends_from_a_perturbed_start() {
        let mut rng = TestRng::new(19);
        let w = structured(&mut rng, 32, 16, 16);
        let rank = 4;
        let (a, linear) = truncated_svd(&CpuBackend, &w, rank, None).unwrap();
        let optimum = frobenius_norm(&(&w - &a * &linear)).powi(2);
        let b = map_mat(&linear, silu_inverse);
        let noisy_b = &b + map_mat(&rng.matrix(rank, 16), |x| 0.1 * x);
        let objective = Objective {
            target: &w,
            metric: None,
        };
        let fitter = BasisFactorizer {
            steps: 2000,
            learning_rate: 3e-3,
            patience: 0,
        };
        let fit = fitter.optimise(&objective, a, noisy_b);
        assert!(
            fit.initial_loss > 2.0 * optimum,
            "{} vs {optimum}",
            fit.initial_loss
        );
        assert!(
            fit.best_loss < optimum + 0.2 * (fit.initial_loss - optimum),
            "{} → {} (optimum {optimum})",
            fit.initial_loss,
            fit.best_loss
        );
        assert!(fit.best_loss >= optimum * (1.0 - 1e-9));
        assert!(fit.best_step > 0 && fit.steps_run == 2000);
    }

    #[test]
    fn basis_fit_with_zero_steps_is_the_svd() {
        let mut rng = TestRng::new(15);
        let w = structured(&mut rng, 20, 16, 16);
        let fitter = BasisFactorizer {
            steps: 0,
            learning_rate: 0.07,
            patience: 0,
        };
        let (f, report) = fitter.fit(&w, 5, None).unwrap();
        assert_eq!(report.steps_run, 0);
        assert_eq!(report.best_loss, report.initial_loss);
        let svd = SvdFactorizer.factor(&CpuBackend, &w, 5, None).unwrap();
        let a = f.reconstruct(BasisActivation::Silu);
        let b = svd.reconstruct(BasisActivation::Identity);
        assert!(relative_error(&b, &a) < 1e-9);
    }

    #[test]
    fn whitened_basis_fit_starts_at_the_whitened_svd() {
        let mut rng = TestRng::new(16);
        let w = structured(&mut rng, 24, 12, 12);
        let mut x = rng.matrix(12, 60);
        for i in 0..12 {
            for t in 0..60 {
                x[(i, t)] *= 1.0 + i as f64;
            }
        }
        let s = whitening_factor(&(&x * x.transpose()), 1e-4).unwrap();
        let fitter = BasisFactorizer {
            steps: 100,
            learning_rate: 1e-3,
            patience: 20,
        };
        let (f, report) = fitter.fit(&w, 4, Some(&s)).unwrap();
        assert!(report.best_loss <= report.initial_loss, "{report:?}");
        let svd = SvdFactorizer.factor(&CpuBackend, &w, 4, Some(&s)).unwrap();
        let err = |w_hat: Mat<f64>| frobenius_norm(&((&w - w_hat) * &s)).powi(2);
        let reference = frobenius_norm(&(&w * &s)).powi(2);
        let svd_loss = err(svd.reconstruct(BasisActivation::Identity)) / reference;
        assert!(
            (report.initial_loss - svd_loss).abs() < 1e-9,
            "{report:?} vs {svd_loss}"
        );
        let fit_loss = err(f.reconstruct(BasisActivation::Silu)) / reference;
        assert!((fit_loss - report.best_loss).abs() < 1e-9);
    }

    #[test]
    fn relative_error_edge_cases() {
        let w = Mat::<f64>::identity(3, 3);
        assert_eq!(relative_error(&w, &w), 0.0);
        assert!((relative_error(&w, &Mat::zeros(3, 3)) - 1.0).abs() < 1e-15);
        assert_eq!(relative_error(&Mat::zeros(2, 2), &Mat::zeros(2, 2)), 0.0);
        assert!(relative_error(&Mat::zeros(2, 2), &Mat::identity(2, 2)).is_infinite());
        assert!(relative_error(&w, &Mat::zeros(2, 3)).is_nan());
    }

    /// Best loss against learning rate on a small group; run with `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn basis_learning_rate_sweep() {
        let mut rng = TestRng::new(14);
        let w = structured(&mut rng, 4 * 12, 24, 24);
        let w2 = map_mat(&rng.matrix(4 * 64, 128), |x| 0.02 * x);
        for (name, w, rank) in [("structured 48x24", &w, 6), ("gaussian 256x128", &w2, 32)] {
            for lr in [0.07, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5] {
                let fitter = BasisFactorizer {
                    steps: 2000,
                    learning_rate: lr,
                    patience: 0,
                };
                let (_, r) = fitter.fit(w, rank, None).unwrap();
                println!(
                    "{name} lr {lr:e}: init {:.5} best {:.5} at step {}",
                    r.initial_loss, r.best_loss, r.best_step
                );
            }
        }
    }

    /// Wall time per Adam step at a realistic group shape; run with `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn basis_step_timing() {
        let mut rng = TestRng::new(17);
        let (m, d, rank) = (4 * 768, 2048, 512);
        let w = rng.matrix(m, d);
        let a = map_mat(&rng.matrix(m, rank), |x| 0.1 * x);
        let mut b = map_mat(&rng.matrix(rank, d), |x| 0.1 * x);
        let metric = Mat::<f64>::identity(d, d);
        let wm = &w * &metric;
        for whitened in [false, true] {
            let objective = Objective {
                target: &w,
                metric: whitened.then(|| (metric.clone(), wm.clone())),
            };
            let mut adam = Adam::new(rank, d);
            let reps = 3;
            let t0 = std::time::Instant::now();
            for t in 1..=reps {
                let (_, _, grad_b) = objective.loss_and_gradients(&a, &b);
                adam.step(&mut b, &grad_b, 1e-3, t);
            }
            let per_step = t0.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{m}x{d} rank {rank} whitened={whitened}: {:.0} ms/step",
                per_step * 1e3
            );
        }
    }
}
