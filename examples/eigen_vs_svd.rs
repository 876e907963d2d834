//! Compares faer's thin SVD with the Gram-matrix eigendecomposition route at a group shape.
use faer::{Mat, Side};
use std::time::Instant;
fn main() {
    let (m, n) = (3072, 2048);
    let mut state = 1u64;
    let a = Mat::from_fn(m, n, |_, _| {
        state = rfid_moe::rng::splitmix64(state);
        (state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    });
    let t = Instant::now();
    let g = a.transpose() * &a;
    let gram_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let evd = g.self_adjoint_eigen(Side::Lower).unwrap();
    let eig_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let _vals = g.self_adjoint_eigenvalues(Side::Lower).unwrap();
    let eigvals_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let svd = a.thin_svd().unwrap();
    let svd_s = t.elapsed().as_secs_f64();
    let s_max = svd.S().column_vector()[0];
    let l_max = evd.S().column_vector()[n - 1];
    println!("gram {gram_s:.2}s eigen {eig_s:.2}s eigenvalues {eigvals_s:.2}s | thin svd {svd_s:.2}s | σmax² {:.6e} vs λmax {:.6e}", s_max * s_max, l_max);
}
