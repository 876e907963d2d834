//! The residual of the paper's §3.4 (docs/METHOD.md §1): a fixed random one-hot sparse projection `P`
//! (D×a, columns scaled by `1/√n_q` so that `PᵀP = I`) and per-group coefficients `η = Pᵀ vec(R)`.
//! Only the seed and `η` are stored; `P` is regenerated from the seed.

use crate::rng::splitmix64;

/// The random one-hot projection of `entries` matrix entries onto `size` buckets.
#[derive(Debug, Clone)]
pub struct SparseProjection {
    bucket_of_entry: Vec<u32>,
    scale_of_bucket: Vec<f32>,
}

impl SparseProjection {
    /// Builds the projection for a vectorised matrix of `entries` values and `size` buckets.
    pub fn new(seed: u64, entries: usize, size: usize) -> Self {
        assert!(size > 0, "a sparse projection needs at least one bucket");
        let salt = splitmix64(seed);
        let bucket_of_entry: Vec<u32> = (0..entries as u64)
            .map(|t| {
                let h = splitmix64(salt ^ t.wrapping_mul(0xD6E8_FEB8_6659_FD93));
                ((h as u128 * size as u128) >> 64) as u32
            })
            .collect();
        let mut counts = vec![0u32; size];
        for &b in &bucket_of_entry {
            counts[b as usize] += 1;
        }
        let scale_of_bucket = counts
            .iter()
            .map(|&n| if n == 0 { 0.0 } else { 1.0 / (n as f32).sqrt() })
            .collect();
        Self {
            bucket_of_entry,
            scale_of_bucket,
        }
    }

    /// Number of buckets `a`.
    pub fn size(&self) -> usize {
        self.scale_of_bucket.len()
    }

    /// `η = Pᵀ r`: the closed-form optimum for a fixed low-rank part (bucket sums scaled by `1/√n_q`).
    pub fn project(&self, residual: &[f32]) -> Vec<f32> {
        let mut eta = vec![0f64; self.size()];
        for (&b, &r) in self.bucket_of_entry.iter().zip(residual) {
            eta[b as usize] += r as f64;
        }
        eta.iter()
            .zip(&self.scale_of_bucket)
            .map(|(&s, &c)| (s * c as f64) as f32)
            .collect()
    }

    /// `r̂ = P η`: every entry becomes its bucket's coefficient scaled by `1/√n_q`.
    pub fn expand(&self, eta: &[f32]) -> Vec<f32> {
        self.bucket_of_entry
            .iter()
            .map(|&b| eta[b as usize] * self.scale_of_bucket[b as usize])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_form_equals_bucket_means() {
        let entries = 1000;
        let projection = SparseProjection::new(7, entries, 37);
        let residual: Vec<f32> = (0..entries)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0)
            .collect();
        let reconstructed = projection.expand(&projection.project(&residual));
        let mut sums = vec![0f64; 37];
        let mut counts = vec![0usize; 37];
        for (t, &b) in projection.bucket_of_entry.iter().enumerate() {
            sums[b as usize] += residual[t] as f64;
            counts[b as usize] += 1;
        }
        for (t, &b) in projection.bucket_of_entry.iter().enumerate() {
            let mean = sums[b as usize] / counts[b as usize] as f64;
            assert!((reconstructed[t] as f64 - mean).abs() < 1e-4, "entry {t}");
        }
    }

    #[test]
    fn projection_has_orthonormal_columns() {
        // PᵀP = I means expand then project is the identity on η.
        let projection = SparseProjection::new(3, 500, 20);
        let eta: Vec<f32> = (0..20).map(|i| i as f32 - 7.5).collect();
        let back = projection.project(&projection.expand(&eta));
        for (a, b) in eta.iter().zip(&back) {
            assert!((a - b).abs() < 1e-4);
        }
    }

    #[test]
    fn seed_is_reproducible_and_matters() {
        let a = SparseProjection::new(1, 100, 10);
        let b = SparseProjection::new(1, 100, 10);
        let c = SparseProjection::new(2, 100, 10);
        assert_eq!(a.bucket_of_entry, b.bucket_of_entry);
        assert_ne!(a.bucket_of_entry, c.bucket_of_entry);
    }
}
