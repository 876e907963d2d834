//! The paper's analysis (arXiv 2602.09316 §3.1–3.2): per layer, the group routing frequencies
//! and information density (the effective rank of each group's stacked weights), as a
//! [`LayerAnalysis`] for the paper's allocation.

use rayon::prelude::*;

use crate::checkpoint::experts::ExpertMatrix;
use crate::linalg::LinalgBackend;
use crate::pipeline::calibrate::LayerStatistics;
use crate::pipeline::experts::{oriented_shape, LayerExperts};
use crate::Result;
use serde::{Deserialize, Serialize};

/// The matrix types the paper's RFID-MoE factors (gate and up; `--matrices` can add down).
pub const TARGETED: [ExpertMatrix; 2] = crate::pipeline::options::PAPER_MATRICES;

/// Shape of one group of experts for one matrix type: `k` experts of `p × d` each.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct GroupShape {
    /// Number of experts `k` in the group.
    pub experts: usize,
    /// Rows per expert matrix `p` (expert intermediate size for gate/up).
    pub rows_per_expert: usize,
    /// Columns `d` (hidden size for gate/up).
    pub cols: usize,
}

impl GroupShape {
    /// Parameters of the dense group, `k·p·d`.
    pub fn dense_params(&self) -> usize {
        self.experts * self.rows_per_expert * self.cols
    }

    /// Parameters one unit of rank costs, `k·p + d`.
    pub fn rank_cost(&self) -> usize {
        self.experts * self.rows_per_expert + self.cols
    }

    /// Largest meaningful rank, `min(k·p, d)`.
    pub fn max_rank(&self) -> usize {
        (self.experts * self.rows_per_expert).min(self.cols)
    }

    /// Largest rank `K` whose factored size `K·(k·p + d)` is strictly below `k·p·d` (may be 0).
    pub fn break_even_rank(&self) -> usize {
        let cost = self.rank_cost();
        if cost == 0 {
            return 0;
        }
        self.dense_params().saturating_sub(1) / cost
    }
}

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
    fn normalize_divides_by_sum_or_goes_uniform() {
        assert_eq!(normalize(&[1.0, 3.0]), vec![0.25, 0.75]);
        assert_eq!(normalize(&[0.0, 0.0, 0.0, 0.0]), vec![0.25; 4]);
        assert!(normalize(&[]).is_empty());
    }
}
