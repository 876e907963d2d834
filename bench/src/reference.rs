//! The LAPACK reference of the factor stage: `sgesdd` (f32) on as many random matrices of the
//! same `k·p × d` shapes as the stage factored, groups in parallel over the rayon threads as the
//! factor stage runs them. Needs the `lapack` feature (the system OpenBLAS).

use serde::Serialize;

/// What the reference measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReferenceTiming {
    /// Groups the figure stands for.
    pub groups: usize,
    /// Groups actually decomposed (fewer when capped; the time is scaled up linearly).
    pub groups_measured: usize,
    /// Wall-clock seconds of the measured groups (matrix generation excluded).
    pub seconds_measured: f64,
    /// Seconds for all `groups` (measured × groups / measured groups).
    pub seconds: f64,
}

/// Times `sgesdd` on random f32 matrices of `shapes` (rows, cols), at most `limit` of them,
/// one batch of as many matrices as rayon has threads at a time (generated outside the clock).
#[cfg(feature = "lapack")]
pub fn gesdd_reference(
    shapes: &[(usize, usize)],
    limit: Option<usize>,
) -> anyhow::Result<ReferenceTiming> {
    use faer::Mat;
    use rayon::prelude::*;

    let measured = limit.map_or(shapes.len(), |l| l.min(shapes.len()));
    let threads = rayon::current_num_threads().max(1);
    let mut seconds_measured = 0.0;
    for (batch, chunk) in shapes[..measured].chunks(threads).enumerate() {
        let matrices: Vec<Mat<f32>> = chunk
            .par_iter()
            .enumerate()
            .map(|(i, &(rows, cols))| {
                let seed = ((batch * threads + i) as u64) << 40;
                Mat::from_fn(rows, cols, |r, c| {
                    let bits = rfid_moe::rng::splitmix64(seed ^ ((r * cols + c) as u64));
                    (bits >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
            })
            .collect();
        let started = std::time::Instant::now();
        matrices
            .par_iter()
            .map(|a| rfid_moe::linalg::lapack::gesdd(a).map(|_| ()))
            .collect::<Result<Vec<()>, _>>()?;
        seconds_measured += started.elapsed().as_secs_f64();
    }
    let scale = shapes.len() as f64 / measured.max(1) as f64;
    Ok(ReferenceTiming {
        groups: shapes.len(),
        groups_measured: measured,
        seconds_measured,
        seconds: seconds_measured * scale,
    })
}
