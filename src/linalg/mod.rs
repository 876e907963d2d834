//! The linear-algebra seam of the compression pipeline.
//!
//! Every dense matrix operation the pipeline needs (Gram accumulation from routed tokens,
//! symmetric eigendecomposition, truncated SVD, Cholesky, triangular solves, products) goes
//! through [`LinalgBackend`], and statistics are held in the backend's own [`LinalgBackend::Matrix`]
//! type. [`CpuBackend`] (faer, `f64`) is today's implementation; a CUDA backend (cuSOLVER) is one
//! more implementation whose matrices stay on the device for a whole layer.

mod cpu;
#[cfg(feature = "lapack")]
pub mod lapack;

pub use cpu::{
    column_dot, frobenius_norm, leading_right_singular_pairs_single,
    leading_right_singular_vectors, mat_to_tensor, single_product, singular_values,
    squared_singular_values, stack_rows, tensor_to_mat, thin_svd, to_double, to_single,
    whitening_factor, CpuBackend, ThinSvd,
};

#[cfg(test)]
pub(crate) use cpu::tests;

use candle_core::{DType, Device, Tensor};
use faer::Mat;

use crate::Result;

/// Dense linear algebra for the pipeline, with matrices held where the backend computes.
///
/// Matrices are real, row-major at every boundary (`(i, j)` of a `[m, n]` tensor is entry
/// `(i, j)` of the `m × n` matrix) and at least `f64`-accurate in what they return, but for
/// the `_single` methods, which may compute in `f32`.
pub trait LinalgBackend: Send + Sync {
    /// A dense real matrix in this backend's memory (host or device).
    type Matrix: Clone + Send + Sync;

    /// Short name (`cpu`, `cuda`), recorded in reports.
    fn name(&self) -> &'static str;

    /// An `rows × cols` matrix of zeros.
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Matrix>;

    /// `(rows, cols)` of `a`.
    fn shape(&self, a: &Self::Matrix) -> (usize, usize);

    /// Copies a 2-D float tensor (any dtype, any device) into a backend matrix.
    fn matrix_from_tensor(&self, tensor: &Tensor) -> Result<Self::Matrix>;

    /// Copies a host `f64` matrix into a backend matrix.
    fn matrix_from_host(&self, a: &Mat<f64>) -> Result<Self::Matrix>;

    /// Copies a backend matrix to the host as `f64`.
    fn to_host(&self, a: &Self::Matrix) -> Result<Mat<f64>>;

    /// Copies rows `start..start + count` of `a` into a tensor of `dtype` on `device`.
    fn rows_to_tensor(
        &self,
        a: &Self::Matrix,
        start: usize,
        count: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor>;

    /// Stacks matrices with equal column counts on top of each other.
    fn stack_rows(&self, blocks: &[Self::Matrix]) -> Result<Self::Matrix>;

    /// `a + b`.
    fn add(&self, a: &Self::Matrix, b: &Self::Matrix) -> Result<Self::Matrix>;

    /// `a − b`.
    fn sub(&self, a: &Self::Matrix, b: &Self::Matrix) -> Result<Self::Matrix>;

    /// `a · b`.
    fn matmul(&self, a: &Self::Matrix, b: &Self::Matrix) -> Result<Self::Matrix>;

    /// [`LinalgBackend::matmul`] in single precision where the backend can: for factors stored
    /// in 8 bits.
    fn matmul_single(&self, a: &Self::Matrix, b: &Self::Matrix) -> Result<Self::Matrix> {
        self.matmul(a, b)
    }

    /// `aᵀ`.
    fn transpose(&self, a: &Self::Matrix) -> Result<Self::Matrix>;

    /// `gram += xᵀ x` for routed token rows `x` [tokens, d] (a tensor on any device).
    fn accumulate_gram(&self, gram: &mut Self::Matrix, rows: &Tensor) -> Result<()>;

    /// Squared singular values of `a`, descending, length `min(m, n)` (symmetric eigenvalues of
    /// the smaller Gram matrix).
    fn squared_singular_values(&self, a: &Self::Matrix) -> Result<Vec<f64>>;

    /// Truncated SVD: the `rank` leading right singular vectors of `a` as columns (`n × rank`).
    fn leading_right_singular_vectors(&self, a: &Self::Matrix, rank: usize)
        -> Result<Self::Matrix>;

    /// [`LinalgBackend::leading_right_singular_vectors`] computed in single precision where the
    /// backend can: for factors stored in 8 bits, whose rounding dwarfs the difference.
    fn leading_right_singular_vectors_single(
        &self,
        a: &Self::Matrix,
        rank: usize,
    ) -> Result<Self::Matrix> {
        self.leading_right_singular_vectors(a, rank)
    }

    /// Cholesky whitening: lower `S` with `S Sᵀ = G + ridge_relative · tr(G)/d · I` (identity
    /// when `tr(G) = 0`).
    fn whitening_factor(&self, gram: &Self::Matrix, ridge_relative: f64) -> Result<Self::Matrix>;

    /// Triangular solve: `X` with `Lᵀ X = B` for lower-triangular `L`.
    fn solve_lower_transposed(
        &self,
        lower: &Self::Matrix,
        b: &Self::Matrix,
    ) -> Result<Self::Matrix>;

    /// `‖a‖_F`.
    fn frobenius_norm(&self, a: &Self::Matrix) -> Result<f64>;

    /// `tr(M G Mᵀ)`: the energy of `M x` over inputs whose Gram matrix is `G`.
    fn quadratic_trace(&self, m: &Self::Matrix, gram: &Self::Matrix) -> Result<f64>;

    /// [`LinalgBackend::quadratic_trace`] in single precision where the backend can: for the
    /// reports of factors stored in 8 bits.
    fn quadratic_trace_single(&self, m: &Self::Matrix, gram: &Self::Matrix) -> Result<f64> {
        self.quadratic_trace(m, gram)
    }

    /// Errors (naming `what`) if `a` has a non-finite entry.
    fn check_finite(&self, a: &Self::Matrix, what: &str) -> Result<()>;
}
