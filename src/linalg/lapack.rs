//! Symmetric eigensolvers and the SVD from the system LAPACK (OpenBLAS), behind the `lapack`
//! cargo feature: `dsyevr` for the Gram route (all eigenvalues, or only the leading
//! eigenvectors), `dgesdd` as the reference the benchmarks compare against.
//!
//! Each call runs on one OpenBLAS thread: the pipeline already factors groups in parallel.

use std::ffi::c_char;
use std::sync::Once;

use faer::Mat;

use crate::error::{Error, Result};

#[link(name = "openblas")]
extern "C" {
    fn openblas_set_num_threads(threads: i32);
    fn dsyevr_(
        jobz: *const c_char,
        range: *const c_char,
        uplo: *const c_char,
        n: *const i32,
        a: *mut f64,
        lda: *const i32,
        vl: *const f64,
        vu: *const f64,
        il: *const i32,
        iu: *const i32,
        abstol: *const f64,
        m: *mut i32,
        w: *mut f64,
        z: *mut f64,
        ldz: *const i32,
        isuppz: *mut i32,
        work: *mut f64,
        lwork: *const i32,
        iwork: *mut i32,
        liwork: *const i32,
        info: *mut i32,
        jobz_len: usize,
        range_len: usize,
        uplo_len: usize,
    );
    fn dgesdd_(
        jobz: *const c_char,
        m: *const i32,
        n: *const i32,
        a: *mut f64,
        lda: *const i32,
        s: *mut f64,
        u: *mut f64,
        ldu: *const i32,
        vt: *mut f64,
        ldvt: *const i32,
        work: *mut f64,
        lwork: *const i32,
        iwork: *mut i32,
        info: *mut i32,
        jobz_len: usize,
    );
    fn sgesdd_(
        jobz: *const c_char,
        m: *const i32,
        n: *const i32,
        a: *mut f32,
        lda: *const i32,
        s: *mut f32,
        u: *mut f32,
        ldu: *const i32,
        vt: *mut f32,
        ldvt: *const i32,
        work: *mut f32,
        lwork: *const i32,
        iwork: *mut i32,
        info: *mut i32,
        jobz_len: usize,
    );
}

/// A floating-point type LAPACK's divide-and-conquer SVD runs in (`dgesdd` / `sgesdd`).
pub trait GesddScalar: faer::traits::RealField + Copy + Default {
    /// The `?gesdd` routine for this type.
    ///
    /// # Safety
    /// The pointers must satisfy `?gesdd`'s documented buffer sizes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gesdd_raw(
        jobz: *const c_char,
        m: *const i32,
        n: *const i32,
        a: *mut Self,
        lda: *const i32,
        s: *mut Self,
        u: *mut Self,
        ldu: *const i32,
        vt: *mut Self,
        ldvt: *const i32,
        work: *mut Self,
        lwork: *const i32,
        iwork: *mut i32,
        info: *mut i32,
    );
    /// The workspace size LAPACK reported.
    fn to_len(self) -> usize;
}

macro_rules! gesdd_scalar {
    ($t:ty, $routine:ident) => {
        impl GesddScalar for $t {
            unsafe fn gesdd_raw(
                jobz: *const c_char,
                m: *const i32,
                n: *const i32,
                a: *mut Self,
                lda: *const i32,
                s: *mut Self,
                u: *mut Self,
                ldu: *const i32,
                vt: *mut Self,
                ldvt: *const i32,
                work: *mut Self,
                lwork: *const i32,
                iwork: *mut i32,
                info: *mut i32,
            ) {
                $routine(
                    jobz, m, n, a, lda, s, u, ldu, vt, ldvt, work, lwork, iwork, info, 1,
                )
            }
            fn to_len(self) -> usize {
                // An f32 workspace size above 2^24 may have been rounded down: round up.
                (self as f64 * (1.0 + <$t>::EPSILON as f64)).ceil() as usize
            }
        }
    };
}

gesdd_scalar!(f64, dgesdd_);
gesdd_scalar!(f32, sgesdd_);

static SINGLE_THREADED: Once = Once::new();

fn single_threaded() {
    // SAFETY: sets OpenBLAS's thread count; no other state is touched.
    SINGLE_THREADED.call_once(|| unsafe { openblas_set_num_threads(1) });
}

/// A dimension as LAPACK's `i32`.
fn dim(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| Error::InvalidArgument(format!("{what} = {n} is too large for LAPACK (i32)")))
}

/// Column-major copy of `a` with leading dimension = rows (what LAPACK overwrites).
fn packed<T: Copy>(a: &Mat<T>) -> Vec<T> {
    let (m, n) = (a.nrows(), a.ncols());
    let mut out = Vec::with_capacity(m * n);
    for j in 0..n {
        out.extend((0..m).map(|i| a[(i, j)]));
    }
    out
}

fn failed(routine: &str, info: i32, shape: (usize, usize)) -> Error {
    Error::Numerical(format!(
        "LAPACK {routine} failed on a {}×{} matrix (info = {info})",
        shape.0, shape.1
    ))
}

/// Eigenvalues `il..=iu` (1-based, ascending) of the symmetric `gram` (lower triangle read) and,
/// when `vectors`, their eigenvectors as columns.
fn syevr(
    gram: &Mat<f64>,
    range: Option<(i32, i32)>,
    vectors: bool,
) -> Result<(Vec<f64>, Mat<f64>)> {
    single_threaded();
    let n = gram.nrows();
    let ni = dim(n, "matrix size")?;
    let mut a = packed(gram);
    let (range_code, il, iu) = match range {
        Some((il, iu)) => (b'I', il, iu),
        None => (b'A', 1, ni),
    };
    let count = (iu - il + 1).max(0) as usize;
    let jobz = if vectors { b'V' } else { b'N' } as c_char;
    let (range_code, uplo) = (range_code as c_char, b'L' as c_char);
    let (vl, vu, abstol) = (0.0f64, 0.0f64, 0.0f64);
    let mut found = 0i32;
    let mut w = vec![0f64; n.max(1)];
    let ldz = ni.max(1);
    let mut z = vec![0f64; if vectors { n * count.max(1) } else { 1 }];
    let mut isuppz = vec![0i32; 2 * n.max(1)];
    let mut info = 0i32;
    let (mut work_size, mut iwork_size) = (0f64, 0i32);
    let call = |work: &mut [f64],
                lwork: i32,
                iwork: &mut [i32],
                liwork: i32,
                a: &mut [f64],
                w: &mut [f64],
                z: &mut [f64],
                isuppz: &mut [i32],
                found: &mut i32,
                info: &mut i32| {
        // SAFETY: every buffer has the size LAPACK's dsyevr documentation requires for these
        // arguments (a: lda·n, w: n, z: ldz·count, isuppz: 2n, work/iwork as queried).
        unsafe {
            dsyevr_(
                &jobz,
                &range_code,
                &uplo,
                &ni,
                a.as_mut_ptr(),
                &ni.max(1),
                &vl,
                &vu,
                &il,
                &iu,
                &abstol,
                found,
                w.as_mut_ptr(),
                z.as_mut_ptr(),
                &ldz,
                isuppz.as_mut_ptr(),
                work.as_mut_ptr(),
                &lwork,
                iwork.as_mut_ptr(),
                &liwork,
                info,
                1,
                1,
                1,
            )
        }
    };
    call(
        std::slice::from_mut(&mut work_size),
        -1,
        std::slice::from_mut(&mut iwork_size),
        -1,
        &mut a,
        &mut w,
        &mut z,
        &mut isuppz,
        &mut found,
        &mut info,
    );
    if info != 0 {
        return Err(failed("dsyevr (workspace query)", info, (n, n)));
    }
    let lwork = work_size as i32;
    let mut work = vec![0f64; lwork.max(1) as usize];
    let mut iwork = vec![0i32; iwork_size.max(1) as usize];
    call(
        &mut work,
        lwork,
        &mut iwork,
        iwork_size,
        &mut a,
        &mut w,
        &mut z,
        &mut isuppz,
        &mut found,
        &mut info,
    );
    if info != 0 {
        return Err(failed("dsyevr", info, (n, n)));
    }
    let found = found as usize;
    w.truncate(found);
    let vectors = if vectors {
        Mat::from_fn(n, found, |i, k| z[k * n + i])
    } else {
        Mat::zeros(0, 0)
    };
    Ok((w, vectors))
}

/// All eigenvalues of the symmetric `gram`, descending.
pub fn symmetric_eigenvalues(gram: &Mat<f64>) -> Result<Vec<f64>> {
    let (mut values, _) = syevr(gram, None, false)?;
    values.reverse();
    Ok(values)
}

/// The `rank` eigenvectors of the symmetric `gram` with the largest eigenvalues, as columns in
/// descending order of eigenvalue.
pub fn leading_eigenvectors(gram: &Mat<f64>, rank: usize) -> Result<Mat<f64>> {
    let n = gram.nrows();
    if rank == 0 {
        return Ok(Mat::zeros(n, 0));
    }
    let (il, iu) = (
        dim(n - rank + 1, "first eigenvalue index")?,
        dim(n, "matrix size")?,
    );
    let (_, ascending) = syevr(gram, Some((il, iu)), true)?;
    let k = ascending.ncols();
    Ok(Mat::from_fn(n, k, |i, j| ascending[(i, k - 1 - j)]))
}

/// Singular values (descending) and the thin `Vᵀ` of `a` by LAPACK's divide-and-conquer SVD
/// (`dgesdd` / `sgesdd`): the reference the benchmarks measure against.
pub fn gesdd<T: GesddScalar>(a: &Mat<T>) -> Result<(Vec<T>, Mat<T>)> {
    single_threaded();
    let (m, n) = (a.nrows(), a.ncols());
    let (mi, ni) = (dim(m, "rows")?, dim(n, "columns")?);
    let k = m.min(n);
    let mut data = packed(a);
    let mut s = vec![T::default(); k.max(1)];
    let mut u = vec![T::default(); m * k.max(1)];
    let mut vt = vec![T::default(); k * n.max(1)];
    let mut iwork = vec![0i32; 8 * k.max(1)];
    let (jobz, ldu, ldvt) = (b'S' as c_char, mi.max(1), dim(k, "rank")?.max(1));
    let mut info = 0i32;
    let mut work_size = T::default();
    let mut call = |work: &mut [T], lwork: i32, data: &mut [T], info: &mut i32| {
        // SAFETY: buffers sized per ?gesdd's documentation for JOBZ = 'S' (u: ldu·k,
        // vt: ldvt·n, iwork: 8k, work as queried).
        unsafe {
            T::gesdd_raw(
                &jobz,
                &mi,
                &ni,
                data.as_mut_ptr(),
                &mi.max(1),
                s.as_mut_ptr(),
                u.as_mut_ptr(),
                &ldu,
                vt.as_mut_ptr(),
                &ldvt,
                work.as_mut_ptr(),
                &lwork,
                iwork.as_mut_ptr(),
                info,
            )
        }
    };
    call(
        std::slice::from_mut(&mut work_size),
        -1,
        &mut data,
        &mut info,
    );
    if info != 0 {
        return Err(failed("gesdd (workspace query)", info, (m, n)));
    }
    let lwork = work_size.to_len().max(1);
    let mut work = vec![T::default(); lwork];
    call(&mut work, dim(lwork, "workspace")?, &mut data, &mut info);
    if info != 0 {
        return Err(failed("gesdd", info, (m, n)));
    }
    Ok((s, Mat::from_fn(k, n, |i, j| vt[j * k + i])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        Mat::from_fn(rows, cols, |_, _| rng.normal())
    }

    #[test]
    fn lapack_eigen_route_matches_faer_and_gesdd() {
        let a = matrix(90, 40, 3);
        let gram = a.transpose() * &a;
        let values = symmetric_eigenvalues(&gram).unwrap();
        let mut faer_values = gram.self_adjoint_eigenvalues(faer::Side::Lower).unwrap();
        faer_values.reverse();
        for (x, y) in values.iter().zip(&faer_values) {
            assert!((x - y).abs() <= 1e-9 * faer_values[0], "{x} vs {y}");
        }
        let (singular, vt) = gesdd(&a).unwrap();
        for (s, v) in singular.iter().zip(&values) {
            assert!((s * s - v).abs() <= 1e-9 * values[0], "{s}² vs {v}");
        }
        let vectors = leading_eigenvectors(&gram, 5).unwrap();
        assert_eq!((vectors.nrows(), vectors.ncols()), (40, 5));
        for k in 0..5 {
            // Same direction up to sign.
            let dot: f64 = (0..40).map(|i| vectors[(i, k)] * vt[(k, i)]).sum();
            assert!(
                (dot.abs() - 1.0).abs() < 1e-8,
                "vector {k}: |cos| = {}",
                dot.abs()
            );
        }
    }
}
