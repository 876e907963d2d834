//! Throughput of the exact per-group route against LAPACK's `gesdd` on the same matrices.
//!
//! Per expert group the pipeline needs every squared singular value (effective rank) and the
//! leading `K` right singular vectors (factors) of the stacked `k·p × d` matrix; `gesdd` gives
//! both in one call. Groups run in parallel, one per rayon thread, as the factor stage runs
//! them; the figure that matters is the ratio of groups per second. With `--features lapack`
//! the route uses OpenBLAS's `dsyevr` and the reference `dgesdd` is measured in the same run;
//! without it the route is faer's and no reference is available.
//!
//! `cargo bench --bench group_svd [--features lapack] -- [GROUPS] [RANK] [ROWS] [COLS]`
//! (defaults: 4 groups of 3072×2048, rank 737 = what ρ = 0.4 gives a group of four
//! Qwen3-30B-A3B experts).

use std::hint::black_box;
use std::time::Instant;

use faer::Mat;
use rayon::prelude::*;
use rfid_moe::linalg::{leading_right_singular_vectors, squared_singular_values};

fn random_matrix(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
    let mut rng = rfid_moe::rng::SplitMix64::new(seed);
    Mat::from_fn(rows, cols, |_, _| rng.normal())
}

/// Seconds to run `f` on every matrix, matrices spread over the rayon threads.
fn throughput(matrices: &[Mat<f64>], f: impl Fn(&Mat<f64>) + Sync) -> f64 {
    let start = Instant::now();
    matrices.par_iter().for_each(&f);
    start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let groups = args.first().copied().unwrap_or(4);
    let rank = args.get(1).copied().unwrap_or(737);
    let rows = args.get(2).copied().unwrap_or(3072);
    let cols = args.get(3).copied().unwrap_or(2048);
    let matrices: Vec<Mat<f64>> = (0..groups)
        .map(|g| random_matrix(rows, cols, 7 + g as u64))
        .collect();
    let route_name = if cfg!(feature = "lapack") {
        "Gram + dsyevr (OpenBLAS)"
    } else {
        "Gram + faer self_adjoint_eigen"
    };
    println!(
        "{groups} groups of {rows}×{cols}, rank {rank}, {} rayon threads",
        rayon::current_num_threads()
    );
    // Warm-up (page faults, thread pools).
    let _ = throughput(&matrices[..1], |a| {
        black_box(squared_singular_values(a).expect("eigenvalues converge"));
    });
    let route = throughput(&matrices, |a| {
        black_box(squared_singular_values(a).expect("eigenvalues converge"));
        black_box(leading_right_singular_vectors(a, rank).expect("eigenvectors converge"));
    });
    println!(
        "exact route ({route_name}): {:.2} s per group, {:.3} groups/s",
        route / groups as f64,
        groups as f64 / route
    );
    #[cfg(feature = "lapack")]
    {
        use rfid_moe::linalg::lapack::gesdd;
        let reference = throughput(&matrices, |a| {
            black_box(gesdd(a).expect("dgesdd converges"));
        });
        let singles: Vec<Mat<f32>> = matrices
            .iter()
            .map(|a| Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] as f32))
            .collect();
        let reference_f32 = {
            let start = Instant::now();
            singles.par_iter().for_each(|a| {
                black_box(gesdd(a).expect("sgesdd converges"));
            });
            start.elapsed().as_secs_f64()
        };
        for (name, seconds) in [("dgesdd f64", reference), ("sgesdd f32", reference_f32)] {
            println!(
                "reference {name} (OpenBLAS): {:.2} s per group, {:.3} groups/s; route / reference throughput = {:.2}",
                seconds / groups as f64,
                groups as f64 / seconds,
                seconds / route
            );
        }
    }
    #[cfg(not(feature = "lapack"))]
    println!("(build with --features lapack to measure LAPACK's dgesdd in the same run)");
}
