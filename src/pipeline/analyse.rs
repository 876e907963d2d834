//! The analyse stage (method.md §1–2): per layer, routing frequency, frequency-sorted expert
//! groups and information density (the effective rank of each group's stacked weights), as a
//! [`LayerAnalysis`] for the allocate stage.

use rayon::prelude::*;

use super::allocate::GroupShape;
use super::calibrate::LayerStatistics;
use super::experts::{oriented_shape, LayerExperts};
use crate::checkpoint::experts::ExpertMatrix;
use crate::linalg::LinalgBackend;
use crate::{Error, Result};

/// The matrix types the paper's RFID-MoE factors (gate and up; `--matrices` can add down).
pub const TARGETED: [ExpertMatrix; 2] = super::options::PAPER_MATRICES;

/// One matrix type's groups in one layer: what decides their ranks.
#[derive(Debug, Clone)]
pub struct MatrixAnalysis {
    /// The matrix type.
    pub matrix: ExpertMatrix,
    /// Effective rank of each group's stacked weights.
    pub effective_ranks: Vec<f64>,
    /// Each group's shape.
    pub shapes: Vec<GroupShape>,
}

/// What the analyse stage learned about one MoE layer.
#[derive(Debug, Clone)]
pub struct LayerAnalysis {
    /// Decoder layer index.
    pub layer: usize,
    /// The expert groups (from calibration).
    pub groups: Vec<Vec<usize>>,
    /// Group routing frequencies `F_g`.
    pub group_frequency: Vec<f64>,
    /// Per targeted matrix type.
    pub matrices: Vec<MatrixAnalysis>,
}

/// Analyses one layer for the paper's matrix types ([`TARGETED`]); see [`analyse_matrices`].
pub fn analyse_layer<B: LinalgBackend>(
    backend: &B,
    experts: &LayerExperts,
    statistics: &LayerStatistics<B::Matrix>,
) -> Result<LayerAnalysis> {
    analyse_matrices(backend, experts, statistics, &TARGETED)
}

/// Analyses one layer: effective ranks of every group of each of `targeted`, reading the
/// weights a group at a time. Shapes are in the factor stage's orientation
/// ([`oriented_shape`]: `k` experts of `p × d`, `d` shared), so a down group (shared output
/// side) is allocated exactly like a gate/up group (shared input side).
pub fn analyse_matrices<B: LinalgBackend>(
    backend: &B,
    experts: &LayerExperts,
    statistics: &LayerStatistics<B::Matrix>,
    targeted: &[ExpertMatrix],
) -> Result<LayerAnalysis> {
    let layout = experts.layout;
    let matrices = targeted
        .iter()
        .map(|&matrix| {
            let [rows_per_expert, cols] = oriented_shape(layout, matrix);
            let effective_ranks = statistics
                .groups
                .par_iter()
                .map(|group| {
                    let stacked = experts.stacked(backend, matrix, group)?;
                    let squared = backend.squared_singular_values(&stacked)?;
                    let singular: Vec<f64> = squared.iter().map(|v| v.sqrt()).collect();
                    Ok(effective_rank(&singular))
                })
                .collect::<Result<Vec<_>>>()?;
            let shapes = statistics
                .groups
                .iter()
                .map(|g| GroupShape {
                    experts: g.len(),
                    rows_per_expert,
                    cols,
                })
                .collect();
            Ok(MatrixAnalysis {
                matrix,
                effective_ranks,
                shapes,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(LayerAnalysis {
        layer: statistics.layer,
        groups: statistics.groups.clone(),
        group_frequency: statistics.group_frequencies(),
        matrices,
    })
}

/// Effective rank `exp(H)` of a spectrum, with `q_j = σ_j²/Σσ²` and `H = −Σ q_j ln q_j`.
///
/// 1 for a rank-one matrix, `r` for `r` equal singular values. Zero singular values are
/// skipped (`0 ln 0 = 0`). An all-zero (or empty) spectrum has effective rank **0**: a zero
/// matrix carries no information, and 0 keeps it below every non-zero group when normalised.
pub fn effective_rank(singular_values: &[f64]) -> f64 {
    let energy: f64 = singular_values.iter().map(|s| s * s).sum();
    if energy <= 0.0 || !energy.is_finite() {
        return 0.0;
    }
    let entropy: f64 = singular_values
        .iter()
        .map(|s| s * s / energy)
        .filter(|&q| q > 0.0)
        .map(|q| -q * q.ln())
        .sum();
    entropy.exp()
}

/// Routing frequency `F_i = z_i / Σ z` of each expert from its top-K hit counts.
///
/// When no token was routed at all (Σ z = 0) every frequency is 0.
pub fn routing_frequency(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return vec![0.0; counts.len()];
    }
    counts.iter().map(|&z| z as f64 / total as f64).collect()
}

/// Expert indices sorted by count descending (ties: lower index first), cut into groups of
/// `group_size` consecutive experts; the last group may be smaller.
pub fn frequency_groups(counts: &[u64], group_size: usize) -> Result<Vec<Vec<usize>>> {
    if group_size == 0 {
        return Err(Error::InvalidArgument(
            "group size must be at least 1".to_string(),
        ));
    }
    let mut order: Vec<usize> = (0..counts.len()).collect();
    // Stable sort keeps lower indices first among equal counts.
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]));
    Ok(order.chunks(group_size).map(|c| c.to_vec()).collect())
}

/// Group frequency `F_g = Σ_{i∈g} z_i / Σ z` for each group of expert indices.
///
/// Σ z runs over all experts in `counts`; indices outside `counts` contribute nothing.
/// When no token was routed every group frequency is 0.
pub fn group_frequencies(counts: &[u64], groups: &[Vec<usize>]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    groups
        .iter()
        .map(|g| {
            if total == 0 {
                return 0.0;
            }
            let hits: u64 = g.iter().filter_map(|&i| counts.get(i)).sum();
            hits as f64 / total as f64
        })
        .collect()
}

/// Divide each value by their sum; a zero (or non-finite) sum gives the uniform `1/n`.
pub fn normalize(values: &[f64]) -> Vec<f64> {
    let sum: f64 = values.iter().sum();
    if sum == 0.0 || !sum.is_finite() {
        let n = values.len() as f64;
        return vec![1.0 / n; values.len()];
    }
    values.iter().map(|v| v / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_rank_of_rank_one_is_one() {
        assert!((effective_rank(&[3.0, 0.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!((effective_rank(&[0.5]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn effective_rank_of_flat_spectrum_is_its_length() {
        for r in [2usize, 5, 64] {
            let s = vec![0.7; r];
            assert!((effective_rank(&s) - r as f64).abs() < 1e-9 * r as f64);
            // Trailing zeros do not count.
            let mut padded = s.clone();
            padded.extend([0.0; 10]);
            assert!((effective_rank(&padded) - r as f64).abs() < 1e-9 * r as f64);
        }
    }

    #[test]
    fn effective_rank_is_between_one_and_length_and_scale_free() {
        let s = [5.0, 2.0, 1.0, 0.1];
        let e = effective_rank(&s);
        assert!(e > 1.0 && e < 4.0);
        let scaled: Vec<f64> = s.iter().map(|x| x * 1000.0).collect();
        assert!((effective_rank(&scaled) - e).abs() < 1e-12);
        // Energy weighting: σ = (2, 1) gives q = (0.8, 0.2).
        let h: f64 = -(0.8f64 * 0.8f64.ln() + 0.2 * 0.2f64.ln());
        assert!((effective_rank(&[2.0, 1.0]) - h.exp()).abs() < 1e-12);
    }

    #[test]
    fn effective_rank_of_zero_spectrum_is_zero() {
        assert_eq!(effective_rank(&[0.0, 0.0]), 0.0);
        assert_eq!(effective_rank(&[]), 0.0);
    }

    #[test]
    fn routing_frequency_sums_to_one() {
        let f = routing_frequency(&[3, 1, 0, 4]);
        assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert_eq!(f[3], 0.5);
        assert_eq!(routing_frequency(&[0, 0, 0]), vec![0.0; 3]);
    }

    #[test]
    fn frequency_groups_sort_descending_with_stable_ties() {
        let counts = [5, 9, 5, 0, 9, 1, 7];
        let groups = frequency_groups(&counts, 3).unwrap();
        assert_eq!(groups, vec![vec![1, 4, 6], vec![0, 2, 5], vec![3]]);
        let singles = frequency_groups(&counts, 1).unwrap();
        assert_eq!(singles.len(), 7);
        let one = frequency_groups(&counts, 100).unwrap();
        assert_eq!(one, vec![vec![1, 4, 6, 0, 2, 5, 3]]);
        assert!(frequency_groups(&counts, 0).is_err());
        assert!(frequency_groups(&[], 4).unwrap().is_empty());
    }

    #[test]
    fn group_frequencies_add_member_counts() {
        let counts = [5, 9, 5, 0, 9, 1, 7];
        let groups = frequency_groups(&counts, 3).unwrap();
        let f = group_frequencies(&counts, &groups);
        assert!((f[0] - 25.0 / 36.0).abs() < 1e-15);
        assert!((f[1] - 11.0 / 36.0).abs() < 1e-15);
        assert_eq!(f[2], 0.0);
        assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert_eq!(group_frequencies(&[0, 0], &[vec![0, 1]]), vec![0.0]);
    }

    #[test]
    fn normalize_divides_by_sum_or_goes_uniform() {
        assert_eq!(normalize(&[1.0, 3.0]), vec![0.25, 0.75]);
        assert_eq!(normalize(&[0.0, 0.0, 0.0, 0.0]), vec![0.25; 4]);
        assert!(normalize(&[]).is_empty());
    }
}
