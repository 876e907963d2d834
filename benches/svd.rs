//! Thin-SVD timings with faer at expert shapes: one 768×2048 expert matrix and a group of four
//! stacked (3072×2048), in `f64` and `f32`, with vectors (factorisation) and values only
//! (effective rank). Run with `cargo bench --bench svd [-- REPS]` (needs `harness = false`).

use std::hint::black_box;
use std::time::Instant;

use faer::Mat;

/// Deterministic pseudo-random matrix entries in [-1, 1) (SplitMix64), no `rand` dependency.
fn random_matrix(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
    let mut state = seed;
    Mat::from_fn(rows, cols, |_, _| {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    })
}

/// Time `f` `reps` times after one warm-up call; returns seconds per call.
fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f();
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    start.elapsed().as_secs_f64() / reps as f64
}

fn report(label: &str, seconds: f64) {
    println!(
        "{label:<44} {:>10.1} ms/matrix {:>8.2} matrices/s",
        seconds * 1e3,
        1.0 / seconds
    );
}

fn main() {
    let reps: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    println!(
        "faer thin SVD, {reps} reps after one warm-up, {} rayon threads",
        rayon::current_num_threads()
    );
    for (rows, cols, what) in [
        (768, 2048, "one expert"),
        (3072, 2048, "group of 4 experts"),
    ] {
        let a64 = random_matrix(rows, cols, 42);
        let a32: Mat<f32> = Mat::from_fn(rows, cols, |i, j| a64[(i, j)] as f32);

        let t = time(reps, || {
            black_box(a64.thin_svd().expect("f64 thin SVD converges"));
        });
        report(&format!("{rows}x{cols} ({what}) f64 thin_svd"), t);
        let t = time(reps, || {
            black_box(a64.singular_values().expect("f64 singular values converge"));
        });
        report(&format!("{rows}x{cols} ({what}) f64 singular_values"), t);
        let t = time(reps, || {
            black_box(a32.thin_svd().expect("f32 thin SVD converges"));
        });
        report(&format!("{rows}x{cols} ({what}) f32 thin_svd"), t);
        let t = time(reps, || {
            black_box(a32.singular_values().expect("f32 singular values converge"));
        });
        report(&format!("{rows}x{cols} ({what}) f32 singular_values"), t);
    }
}
