//! The CPU linear-algebra backend: dense `f64` matrices on top of faer (tensor conversion, Gram
//! accumulation, thin SVD, symmetric eigendecomposition, Cholesky whitening, triangular solves).
//!
//! Everything here uses row-major semantics at the boundary (a candle tensor of shape `[m, n]`
//! becomes an `m × n` faer matrix with the same `(i, j)` entries); faer stores matrices
//! column-major internally, which callers never need to know.

use candle_core::{DType, Device, Tensor};
use faer::{Mat, MatRef, Side};

use super::LinalgBackend;
use crate::{Error, Result};

/// Copy a 2-D candle tensor of any float dtype, on any device, into an `f64` faer matrix.
pub fn tensor_to_mat(t: &Tensor) -> Result<Mat<f64>> {
    let (rows, cols) = match t.dims() {
        [rows, cols] => (*rows, *cols),
        dims => {
            return Err(Error::InvalidArgument(format!(
                "tensor_to_mat expects a 2-D tensor, got shape {dims:?}"
            )))
        }
    };
    if !t.dtype().is_float() {
        return Err(Error::InvalidArgument(format!(
            "tensor_to_mat expects a float tensor, got dtype {:?}",
            t.dtype()
        )));
    }
    let data: Vec<f64> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    Ok(MatRef::from_row_major_slice(&data, rows, cols).to_owned())
}

/// Copy an `f64` faer matrix (`m × n`) into a candle tensor of shape `[m, n]`, `dtype`, `device`.
pub fn mat_to_tensor(m: &Mat<f64>, dtype: DType, device: &Device) -> Result<Tensor> {
    let (rows, cols) = (m.nrows(), m.ncols());
    let mut data = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            data.push(m[(i, j)]);
        }
    }
    // Convert on the CPU first so the transfer to an accelerator moves the narrow dtype.
    let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu)?.to_dtype(dtype)?;
    Ok(t.to_device(device)?)
}

/// Thin singular value decomposition `A = U diag(s) Vᵀ` with `r = min(m, n)`.
#[derive(Debug, Clone)]
pub struct ThinSvd {
    /// Left singular vectors, `m × r`, orthonormal columns.
    pub u: Mat<f64>,
    /// Singular values, length `r`, non-negative and descending.
    pub s: Vec<f64>,
    /// Right singular vectors transposed, `r × n`, orthonormal rows.
    pub vt: Mat<f64>,
}

impl ThinSvd {
    /// Number of singular triplets `r = min(m, n)`.
    pub fn len(&self) -> usize {
        self.s.len()
    }

    /// Whether the decomposition is empty (a matrix with a zero dimension).
    pub fn is_empty(&self) -> bool {
        self.s.is_empty()
    }
}

fn check_finite(a: &Mat<f64>, what: &str) -> Result<()> {
    for j in 0..a.ncols() {
        if let Some(i) = a.col_as_slice(j).iter().position(|x| !x.is_finite()) {
            return Err(Error::Numerical(format!(
                "{what}: {}×{} matrix has a non-finite entry at ({i}, {j})",
                a.nrows(),
                a.ncols()
            )));
        }
    }
    Ok(())
}

/// Thin SVD of an `m × n` matrix (faer, `f64`); errors on non-finite input or no convergence.
pub fn thin_svd(a: &Mat<f64>) -> Result<ThinSvd> {
    check_finite(a, "thin_svd")?;
    let (m, n) = (a.nrows(), a.ncols());
    let r = m.min(n);
    if r == 0 {
        return Ok(ThinSvd {
            u: Mat::zeros(m, 0),
            s: Vec::new(),
            vt: Mat::zeros(0, n),
        });
    }
    let svd = a
        .thin_svd()
        .map_err(|e| Error::Numerical(format!("thin SVD of a {m}×{n} matrix failed: {e:?}")))?;
    let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    Ok(ThinSvd {
        u: svd.U().to_owned(),
        s,
        vt: svd.V().transpose().to_owned(),
    })
}

/// Singular values of an `m × n` matrix, descending, length `min(m, n)` (no vectors computed).
pub fn singular_values(a: &Mat<f64>) -> Result<Vec<f64>> {
    check_finite(a, "singular_values")?;
    let (m, n) = (a.nrows(), a.ncols());
    if m.min(n) == 0 {
        return Ok(Vec::new());
    }
    a.singular_values()
        .map_err(|e| Error::Numerical(format!("singular values of a {m}×{n} matrix failed: {e:?}")))
}

/// Squared singular values of `a` (descending, length `min(m, n)`) from the eigenvalues of its
/// smaller Gram matrix: about 3× faster than [`singular_values`] at expert-group shapes
/// (docs/SVD.md), exact up to `ε·σ_max²` absolute error, which is what the effective rank's
/// energy weights `σ²/Σσ²` need.
pub fn squared_singular_values(a: &Mat<f64>) -> Result<Vec<f64>> {
    check_finite(a, "squared_singular_values")?;
    let (m, n) = (a.nrows(), a.ncols());
    if m.min(n) == 0 {
        return Ok(Vec::new());
    }
    let gram = if m >= n {
        a.transpose() * a
    } else {
        a * a.transpose()
    };
    #[cfg(feature = "lapack")]
    {
        let mut values = super::lapack::symmetric_eigenvalues(&gram)?;
        values.iter_mut().for_each(|v| *v = v.max(0.0));
        return Ok(values);
    }
    #[allow(unreachable_code)]
    let mut values = gram
        .self_adjoint_eigenvalues(faer::Side::Lower)
        .map_err(|e| {
            Error::Numerical(format!(
                "eigenvalues of the {m}×{n} Gram matrix failed: {e:?}"
            ))
        })?;
    values.iter_mut().for_each(|v| *v = v.max(0.0));
    values.reverse();
    Ok(values)
}

/// The `rank` leading right singular vectors of a tall `a` (`m ≥ n`), as columns (`n × rank`),
/// from the eigenvectors of `aᵀa`; falls back to a thin SVD for wide matrices. Directions whose
/// singular values sit below `√ε·σ_max` are not resolved accurately, which truncation discards.
pub fn leading_right_singular_vectors(a: &Mat<f64>, rank: usize) -> Result<Mat<f64>> {
    check_finite(a, "leading_right_singular_vectors")?;
    let (m, n) = check_rank(a, rank)?;
    if m < n {
        let svd = thin_svd(a)?;
        return Ok(svd.vt.as_ref().subrows(0, rank).transpose().to_owned());
    }
    let gram = a.transpose() * a;
    #[cfg(feature = "lapack")]
    {
        return super::lapack::leading_eigenvectors(&gram, rank);
    }
    #[allow(unreachable_code)]
    let evd = gram.self_adjoint_eigen(faer::Side::Lower).map_err(|e| {
        Error::Numerical(format!(
            "eigendecomposition of the {n}×{n} Gram matrix failed: {e:?}"
        ))
    })?;
    // Eigenvalues ascend: the leading directions are the last columns.
    let vectors = evd.U();
    Ok(Mat::from_fn(n, rank, |i, k| vectors[(i, n - 1 - k)]))
}

/// The `rank` leading right singular vectors of `a` (as columns, leading first) and their
/// squared singular values, from the eigendecomposition of `aᵀa` in single precision where `a`
/// is tall (a thin SVD in double precision where it is wide). About twice as fast as
/// [`leading_right_singular_vectors`] without the `lapack` feature; directions whose singular values sit below about
/// `10⁻³·σ_max` are not resolved, so it suits factors stored in 8 bits and estimates that only
/// rank candidates.
pub fn leading_right_singular_pairs_single(
    a: &Mat<f64>,
    rank: usize,
) -> Result<(Mat<f64>, Vec<f64>)> {
    check_finite(a, "leading_right_singular_pairs_single")?;
    let (m, n) = check_rank(a, rank)?;
    if m < n {
        let v = leading_right_singular_vectors(a, rank)?;
        let av = a * &v;
        let squared = (0..rank)
            .map(|k| (0..av.nrows()).map(|i| av[(i, k)] * av[(i, k)]).sum())
            .collect();
        return Ok((v, squared));
    }
    let single = to_single(a.as_ref());
    let gram = single.transpose() * &single;
    let evd = gram.self_adjoint_eigen(Side::Lower).map_err(|e| {
        Error::Numerical(format!(
            "eigendecomposition of the {n}×{n} Gram matrix failed: {e:?}"
        ))
    })?;
    // Eigenvalues ascend: the leading directions are the last columns.
    let (vectors, values) = (evd.U(), evd.S().column_vector());
    let v = Mat::from_fn(n, rank, |i, k| f64::from(vectors[(i, n - 1 - k)]));
    let squared = (0..rank)
        .map(|k| f64::from(values[n - 1 - k]).max(0.0))
        .collect();
    Ok((v, squared))
}

/// `m` rounded to single precision.
pub fn to_single(m: MatRef<'_, f64>) -> Mat<f32> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32)
}

/// `m` widened to double precision.
pub fn to_double(m: &Mat<f32>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| f64::from(m[(i, j)]))
}

/// `a·b` computed in single precision and returned in double.
pub fn single_product(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    to_double(&(to_single(a) * to_single(b)))
}

/// `a`'s shape, or an error if `rank` exceeds its smaller side.
fn check_rank(a: &Mat<f64>, rank: usize) -> Result<(usize, usize)> {
    let (m, n) = (a.nrows(), a.ncols());
    if rank > m.min(n) {
        return Err(Error::InvalidArgument(format!(
            "rank {rank} exceeds min({m}, {n})"
        )));
    }
    Ok((m, n))
}

/// Lower Cholesky factor `S` (`d × d`) with `S Sᵀ = G + ridge_relative · tr(G)/d · I`.
///
/// `gram` is a symmetric positive semi-definite `d × d` input Gram matrix (only its lower
/// triangle is read). When `tr(G) == 0` (no tokens reached the group) the identity is
/// returned, so whitening degrades to the plain factorisation.
pub fn whitening_factor(gram: &Mat<f64>, ridge_relative: f64) -> Result<Mat<f64>> {
    let d = gram.nrows();
    if gram.ncols() != d {
        return Err(Error::InvalidArgument(format!(
            "whitening_factor expects a square Gram matrix, got {}×{}",
            gram.nrows(),
            gram.ncols()
        )));
    }
    if !(ridge_relative.is_finite() && ridge_relative >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "whitening ridge must be finite and non-negative, got {ridge_relative}"
        )));
    }
    check_finite(gram, "whitening_factor")?;
    let trace: f64 = (0..d).map(|i| gram[(i, i)]).sum();
    if d == 0 || trace == 0.0 {
        return Ok(Mat::identity(d, d));
    }
    if trace < 0.0 {
        return Err(Error::Numerical(format!(
            "Gram matrix ({d}×{d}) has negative trace {trace}; it is not positive semi-definite"
        )));
    }
    let ridge = ridge_relative * trace / d as f64;
    let mut regularised = gram.clone();
    for i in 0..d {
        regularised[(i, i)] += ridge;
    }
    let llt = regularised.llt(Side::Lower).map_err(|e| {
        Error::Numerical(format!(
            "Cholesky of the {d}×{d} Gram matrix + ridge {ridge:e} failed ({e:?}); \
             raise the ridge"
        ))
    })?;
    // faer leaves the strict upper triangle of `L()` at zero.
    Ok(llt.L().to_owned())
}

/// Stack matrices with equal column counts on top of each other (`Σ rows_i × cols`).
///
/// An empty slice gives a `0 × 0` matrix; differing column counts are an error.
pub fn stack_rows(blocks: &[Mat<f64>]) -> Result<Mat<f64>> {
    let Some(first) = blocks.first() else {
        return Ok(Mat::zeros(0, 0));
    };
    let cols = first.ncols();
    if let Some((i, b)) = blocks.iter().enumerate().find(|(_, b)| b.ncols() != cols) {
        return Err(Error::InvalidArgument(format!(
            "stack_rows: block {i} has {} columns, block 0 has {cols}",
            b.ncols()
        )));
    }
    let rows: usize = blocks.iter().map(|b| b.nrows()).sum();
    let mut out = Mat::zeros(rows, cols);
    let mut offset = 0;
    for b in blocks {
        out.as_mut()
            .submatrix_mut(offset, 0, b.nrows(), cols)
            .copy_from(b.as_ref());
        offset += b.nrows();
    }
    Ok(out)
}

/// Frobenius norm `‖A‖_F`.
pub fn frobenius_norm(a: &Mat<f64>) -> f64 {
    a.as_ref().norm_l2()
}

/// The faer backend: `f64` host matrices, parallel over the machine's cores.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl LinalgBackend for CpuBackend {
    type Matrix = Mat<f64>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<Mat<f64>> {
        Ok(Mat::zeros(rows, cols))
    }

    fn shape(&self, a: &Mat<f64>) -> (usize, usize) {
        (a.nrows(), a.ncols())
    }

    fn matrix_from_tensor(&self, tensor: &Tensor) -> Result<Mat<f64>> {
        tensor_to_mat(tensor)
    }

    fn matrix_from_host(&self, a: &Mat<f64>) -> Result<Mat<f64>> {
        Ok(a.clone())
    }

    fn to_host(&self, a: &Mat<f64>) -> Result<Mat<f64>> {
        Ok(a.clone())
    }

    fn rows_to_tensor(
        &self,
        a: &Mat<f64>,
        start: usize,
        count: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if start + count > a.nrows() {
            return Err(Error::InvalidArgument(format!(
                "rows {start}..{} of a {}×{} matrix",
                start + count,
                a.nrows(),
                a.ncols()
            )));
        }
        let block = a.as_ref().subrows(start, count).to_owned();
        mat_to_tensor(&block, dtype, device)
    }

    fn stack_rows(&self, blocks: &[Mat<f64>]) -> Result<Mat<f64>> {
        stack_rows(blocks)
    }

    fn add(&self, a: &Mat<f64>, b: &Mat<f64>) -> Result<Mat<f64>> {
        same_shape(a, b, "add")?;
        Ok(a + b)
    }

    fn sub(&self, a: &Mat<f64>, b: &Mat<f64>) -> Result<Mat<f64>> {
        same_shape(a, b, "sub")?;
        Ok(a - b)
    }

    fn matmul(&self, a: &Mat<f64>, b: &Mat<f64>) -> Result<Mat<f64>> {
        check_product(a, b)?;
        Ok(a * b)
    }

    fn matmul_single(&self, a: &Mat<f64>, b: &Mat<f64>) -> Result<Mat<f64>> {
        check_product(a, b)?;
        Ok(single_product(a.as_ref(), b.as_ref()))
    }

    fn transpose(&self, a: &Mat<f64>) -> Result<Mat<f64>> {
        Ok(a.transpose().to_owned())
    }

    fn accumulate_gram(&self, gram: &mut Mat<f64>, rows: &Tensor) -> Result<()> {
        let d = gram.nrows();
        if rows.rank() != 2 || rows.dim(1)? != d || gram.ncols() != d {
            return Err(Error::InvalidArgument(format!(
                "accumulate_gram: rows of shape {:?} into a {}×{} Gram matrix",
                rows.dims(),
                gram.nrows(),
                gram.ncols()
            )));
        }
        // The product runs where the rows are (f32), then accumulates on the host in f64.
        let x = rows.to_dtype(DType::F32)?;
        let product: Vec<f64> = x
            .t()?
            .matmul(&x)?
            .to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        // The product is row-major and the Gram column-major: tiles keep both in cache.
        const TILE: usize = 64;
        for columns in (0..d).step_by(TILE) {
            for rows in (0..d).step_by(TILE) {
                for j in columns..(columns + TILE).min(d) {
                    for i in rows..(rows + TILE).min(d) {
                        gram[(i, j)] += product[i * d + j];
                    }
                }
            }
        }
        Ok(())
    }

    fn squared_singular_values(&self, a: &Mat<f64>) -> Result<Vec<f64>> {
        squared_singular_values(a)
    }

    fn leading_right_singular_vectors(&self, a: &Mat<f64>, rank: usize) -> Result<Mat<f64>> {
        leading_right_singular_vectors(a, rank)
    }

    fn leading_right_singular_vectors_single(&self, a: &Mat<f64>, rank: usize) -> Result<Mat<f64>> {
        Ok(leading_right_singular_pairs_single(a, rank)?.0)
    }

    fn whitening_factor(&self, gram: &Mat<f64>, ridge_relative: f64) -> Result<Mat<f64>> {
        whitening_factor(gram, ridge_relative)
    }

    fn solve_lower_transposed(&self, lower: &Mat<f64>, b: &Mat<f64>) -> Result<Mat<f64>> {
        if lower.nrows() != lower.ncols() || lower.nrows() != b.nrows() {
            return Err(Error::InvalidArgument(format!(
                "triangular solve with a {}×{} factor and a {}×{} right-hand side",
                lower.nrows(),
                lower.ncols(),
                b.nrows(),
                b.ncols()
            )));
        }
        let mut x = b.clone();
        lower
            .transpose()
            .solve_upper_triangular_in_place(x.as_mut());
        Ok(x)
    }

    fn frobenius_norm(&self, a: &Mat<f64>) -> Result<f64> {
        Ok(frobenius_norm(a))
    }

    fn quadratic_trace(&self, m: &Mat<f64>, gram: &Mat<f64>) -> Result<f64> {
        check_quadratic_trace(m, gram)?;
        Ok(column_dot(&(m * gram), m))
    }

    fn quadratic_trace_single(&self, m: &Mat<f64>, gram: &Mat<f64>) -> Result<f64> {
        check_quadratic_trace(m, gram)?;
        Ok(column_dot(&single_product(m.as_ref(), gram.as_ref()), m))
    }

    fn check_finite(&self, a: &Mat<f64>, what: &str) -> Result<()> {
        check_finite(a, what)
    }
}

/// Errors unless `a · b` is defined.
fn check_product(a: &Mat<f64>, b: &Mat<f64>) -> Result<()> {
    if a.ncols() != b.nrows() {
        return Err(Error::InvalidArgument(format!(
            "matmul of {}×{} by {}×{}",
            a.nrows(),
            a.ncols(),
            b.nrows(),
            b.ncols()
        )));
    }
    Ok(())
}

/// Errors unless `tr(M G Mᵀ)` is defined.
fn check_quadratic_trace(m: &Mat<f64>, gram: &Mat<f64>) -> Result<()> {
    if m.ncols() != gram.nrows() || gram.nrows() != gram.ncols() {
        return Err(Error::InvalidArgument(format!(
            "tr(M G Mᵀ) of a {}×{} M and a {}×{} G",
            m.nrows(),
            m.ncols(),
            gram.nrows(),
            gram.ncols()
        )));
    }
    Ok(())
}

/// `Σ_ij a_ij·b_ij`, column by column (both are column-major).
pub fn column_dot(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    (0..a.ncols())
        .map(|j| {
            a.col_as_slice(j)
                .iter()
                .zip(b.col_as_slice(j))
                .map(|(x, y)| x * y)
                .sum::<f64>()
        })
        .sum()
}

fn same_shape(a: &Mat<f64>, b: &Mat<f64>, what: &str) -> Result<()> {
    if (a.nrows(), a.ncols()) != (b.nrows(), b.ncols()) {
        return Err(Error::InvalidArgument(format!(
            "{what} of a {}×{} and a {}×{} matrix",
            a.nrows(),
            a.ncols(),
            b.nrows(),
            b.ncols()
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Test data from the crate's generator.
    pub(crate) struct TestRng(crate::rng::SplitMix64);

    impl TestRng {
        pub(crate) fn new(seed: u64) -> Self {
            TestRng(crate::rng::SplitMix64::new(seed))
        }

        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0.next_u64()
        }

        /// Uniform in [0, 1).
        pub(crate) fn uniform(&mut self) -> f64 {
            self.0.uniform()
        }

        /// Standard normal.
        pub(crate) fn normal(&mut self) -> f64 {
            self.0.normal()
        }

        pub(crate) fn matrix(&mut self, rows: usize, cols: usize) -> Mat<f64> {
            let mut m = Mat::zeros(rows, cols);
            for j in 0..cols {
                for i in 0..rows {
                    m[(i, j)] = self.normal();
                }
            }
            m
        }
    }

    fn max_abs_diff(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
        assert_eq!((a.nrows(), a.ncols()), (b.nrows(), b.ncols()));
        let mut worst = 0.0f64;
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                worst = worst.max((a[(i, j)] - b[(i, j)]).abs());
            }
        }
        worst
    }

    #[test]
    fn tensor_round_trip_keeps_row_major_layout() {
        let data: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let t = Tensor::from_vec(data, (2, 3), &Device::Cpu).unwrap();
        let m = tensor_to_mat(&t).unwrap();
        assert_eq!((m.nrows(), m.ncols()), (2, 3));
        assert_eq!(m[(0, 2)], 2.0);
        assert_eq!(m[(1, 0)], 3.0);
        let back = mat_to_tensor(&m, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(back.dtype(), DType::BF16);
        let back: Vec<Vec<f32>> = back.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        assert_eq!(back, vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]);
    }

    #[test]
    fn tensor_to_mat_rejects_non_matrices() {
        let t = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(tensor_to_mat(&t), Err(Error::InvalidArgument(_))));
        let t = Tensor::zeros((2, 3), DType::U32, &Device::Cpu).unwrap();
        assert!(matches!(tensor_to_mat(&t), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn gram_route_matches_the_svd() {
        let mut rng = TestRng::new(11);
        for (m, n) in [(40, 12), (12, 40), (20, 20)] {
            let a = rng.matrix(m, n);
            let exact = singular_values(&a).unwrap();
            let squared = squared_singular_values(&a).unwrap();
            assert_eq!(exact.len(), squared.len());
            for (s, s2) in exact.iter().zip(&squared) {
                assert!(
                    (s * s - s2).abs() <= 1e-9 * exact[0] * exact[0],
                    "{s}² vs {s2}"
                );
            }
            let rank = 5;
            let v = leading_right_singular_vectors(&a, rank).unwrap();
            let svd = thin_svd(&a).unwrap();
            for k in 0..rank {
                // Same direction up to sign.
                let dot: f64 = (0..n).map(|i| v[(i, k)] * svd.vt[(k, i)]).sum();
                assert!(
                    (dot.abs() - 1.0).abs() < 1e-8,
                    "vector {k}: |cos| = {}",
                    dot.abs()
                );
            }
        }
    }

    #[test]
    fn thin_svd_reconstructs_and_is_orthonormal() {
        let mut rng = TestRng::new(1);
        for (m, n) in [(7, 4), (4, 7), (5, 5)] {
            let a = rng.matrix(m, n);
            let svd = thin_svd(&a).unwrap();
            let r = m.min(n);
            assert_eq!((svd.u.nrows(), svd.u.ncols()), (m, r));
            assert_eq!((svd.vt.nrows(), svd.vt.ncols()), (r, n));
            assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
            assert!(svd.s.iter().all(|&x| x >= 0.0));
            let mut us = svd.u.clone();
            for (k, &s) in svd.s.iter().enumerate() {
                for i in 0..m {
                    us[(i, k)] *= s;
                }
            }
            let rebuilt = &us * &svd.vt;
            assert!(max_abs_diff(&rebuilt, &a) < 1e-12 * 10.0 * frobenius_norm(&a));
            let utu = svd.u.transpose() * &svd.u;
            assert!(max_abs_diff(&utu, &Mat::identity(r, r)) < 1e-12);
            let vvt = &svd.vt * svd.vt.transpose();
            assert!(max_abs_diff(&vvt, &Mat::identity(r, r)) < 1e-12);
            let values = singular_values(&a).unwrap();
            assert_eq!(values.len(), r);
            for (x, y) in values.iter().zip(&svd.s) {
                assert!((x - y).abs() < 1e-12 * svd.s[0]);
            }
        }
    }

    #[test]
    fn svd_rejects_non_finite() {
        let mut a = Mat::<f64>::zeros(3, 3);
        a[(1, 2)] = f64::NAN;
        assert!(matches!(thin_svd(&a), Err(Error::Numerical(_))));
        assert!(matches!(singular_values(&a), Err(Error::Numerical(_))));
    }

    #[test]
    fn whitening_factor_is_lower_and_reproduces_regularised_gram() {
        let mut rng = TestRng::new(2);
        // Rank-deficient Gram (3 tokens in 5 dimensions): only the ridge makes it definite.
        let x = rng.matrix(5, 3);
        let gram = &x * x.transpose();
        let s = whitening_factor(&gram, 1e-4).unwrap();
        let trace: f64 = (0..5).map(|i| gram[(i, i)]).sum();
        let mut expected = gram.clone();
        for i in 0..5 {
            expected[(i, i)] += 1e-4 * trace / 5.0;
        }
        let sst = &s * s.transpose();
        assert!(max_abs_diff(&sst, &expected) < 1e-12 * trace);
        for i in 0..5 {
            for j in i + 1..5 {
                assert_eq!(s[(i, j)], 0.0);
            }
        }
    }

    #[test]
    fn whitening_factor_of_empty_gram_is_identity() {
        let s = whitening_factor(&Mat::zeros(4, 4), 1e-4).unwrap();
        assert_eq!(max_abs_diff(&s, &Mat::identity(4, 4)), 0.0);
        assert!(whitening_factor(&Mat::zeros(3, 4), 1e-4).is_err());
        assert!(whitening_factor(&Mat::identity(3, 3), -1.0).is_err());
    }

    #[test]
    fn stack_rows_concatenates_in_order() {
        let a = Mat::from_fn(2, 3, |i, j| (i * 3 + j) as f64);
        let b = Mat::from_fn(1, 3, |_, j| 100.0 + j as f64);
        let s = stack_rows(&[a.clone(), b]).unwrap();
        assert_eq!((s.nrows(), s.ncols()), (3, 3));
        assert_eq!(s[(1, 2)], 5.0);
        assert_eq!(s[(2, 1)], 101.0);
        assert!(stack_rows(&[a, Mat::zeros(1, 2)]).is_err());
        let empty = stack_rows(&[]).unwrap();
        assert_eq!((empty.nrows(), empty.ncols()), (0, 0));
    }

    #[test]
    fn single_precision_pairs_capture_the_leading_subspace() {
        let mut rng = TestRng::new(21);
        let (m, n, rank) = (150, 60, 12);
        let mut a = rng.matrix(m, n);
        for j in 0..n {
            let scale = 10f64.powf(-3.0 * j as f64 / n as f64);
            for i in 0..m {
                a[(i, j)] *= scale;
            }
        }
        let (v, squared) = leading_right_singular_pairs_single(&a, rank).unwrap();
        let sigma = singular_values(&a).unwrap();
        for (k, (&s2, &s)) in squared.iter().zip(&sigma).enumerate() {
            assert!(
                (s2 / (s * s) - 1.0).abs() < 1e-4,
                "σ²_{k}: {s2} against {}",
                s * s
            );
        }
        // The energy the basis captures is the double-precision basis's.
        let exact = leading_right_singular_vectors(&a, rank).unwrap();
        let captured = |v: &Mat<f64>| frobenius_norm(&(&a * v)).powi(2);
        let (single, double) = (captured(&v), captured(&exact));
        assert!(
            (single / double - 1.0).abs() < 1e-5,
            "{single} against {double}"
        );
        assert!(leading_right_singular_pairs_single(&a, n + 1).is_err());
        // Wide matrices take the double-precision path.
        let wide = a.transpose().to_owned();
        let (_, squared) = leading_right_singular_pairs_single(&wide, rank).unwrap();
        assert!((squared[0] / (sigma[0] * sigma[0]) - 1.0).abs() < 1e-10);
    }

    #[test]
    fn single_precision_quadratic_trace_matches_double() {
        let mut rng = TestRng::new(22);
        let m = rng.matrix(40, 30);
        let x = rng.matrix(90, 30);
        let gram = x.transpose() * &x;
        let double = CpuBackend.quadratic_trace(&m, &gram).unwrap();
        let single = CpuBackend.quadratic_trace_single(&m, &gram).unwrap();
        assert!(
            (single / double - 1.0).abs() < 1e-5,
            "{single} against {double}"
        );
        let expected: f64 = (0..m.nrows())
            .map(|i| {
                let row = m.row(i);
                (0..30)
                    .map(|a| (0..30).map(|b| row[a] * gram[(a, b)] * row[b]).sum::<f64>())
                    .sum::<f64>()
            })
            .sum();
        assert!((double / expected - 1.0).abs() < 1e-12);
        assert!(CpuBackend.quadratic_trace_single(&m, &m).is_err());
    }
}
