//! What calibration learned about one MoE layer: the raw observations of its forward passes
//! ([`LayerObservations`], every expert), and the statistics the methods read once the experts
//! are final ([`LayerStatistics`]: routing counts, frequency-sorted groups, group Gram matrices,
//! each expert's intermediate Gram matrix and output sensitivities).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::record::RoutedBatch;
use crate::checkpoint::experts::ExpertMatrix;
use crate::error::{Error, Result};
use crate::linalg::LinalgBackend;
use crate::pipeline::experts::LayerExperts;
use crate::pipeline::report::LayerPruning;

/// What one expert's routed calibration tokens say about how errors in its matrices reach the
/// layer's output (the error estimates of the budget solver).
///
/// With `g` the routing weight, `a = W_gate·x`, `u = W_up·x`, `h = silu(a) ⊙ u`: an error `ΔW`
/// in gate or up changes channel `i` of `h` by `c_i·(Δw_i·x)` (`c = silu'(a) ⊙ u` for gate,
/// `silu(a)` for up), which `down_proj` carries to the output with the energy of its column
/// `i`; an error in down changes the output by `ΔW·h`. Summed over the routed tokens with the
/// weights `g²`, and with the token terms decoupled from the error's, every matrix's output
/// error becomes `Σ_i row_i Σ_c col_c ΔW_ic²`-like forms of the numbers below.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertStatistics {
    /// Routed tokens `n_j`.
    pub tokens: u64,
    /// `Σ g²` over them.
    pub weight_energy: f64,
    /// Per intermediate channel, `Σ g² (silu'(a_i) u_i)²` [p].
    pub gate_sensitivity: Vec<f64>,
    /// Per intermediate channel, `Σ g² silu(a_i)²` [p].
    pub up_sensitivity: Vec<f64>,
    /// Per input channel, `Σ x_c²` (the diagonal of the expert's input Gram matrix) [d].
    pub input_energy: Vec<f64>,
    /// Per intermediate channel, `Σ h_c²` (the diagonal of its intermediate Gram matrix) [p].
    pub intermediate_energy: Vec<f64>,
    /// Per intermediate channel, the energy of `down_proj`'s column `‖W_down[:, i]‖²` [p].
    pub down_column_energy: Vec<f64>,
}

/// Row and column weights of a matrix's output error: `Σ_i Σ_c rows_i·cols_c·ΔW_ic²` estimates
/// the output energy an error `ΔW` (in the matrix's `[out, in]` orientation) adds over the
/// calibration tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorWeights {
    /// One weight per row of the matrix.
    pub rows: Vec<f64>,
    /// One weight per column.
    pub cols: Vec<f64>,
}

impl ErrorWeights {
    /// The estimated output error of `delta` [rows, cols] (row-major).
    pub fn error(&self, delta: &[f32]) -> f64 {
        let cols = self.cols.len();
        delta
            .chunks(cols.max(1))
            .zip(&self.rows)
            .map(|(row, &r)| {
                r * row
                    .iter()
                    .zip(&self.cols)
                    .map(|(&v, &c)| c * (v as f64) * (v as f64))
                    .sum::<f64>()
            })
            .sum()
    }
}

/// What calibration learned about one MoE layer, over its final experts.
#[derive(Debug, Clone)]
pub struct LayerStatistics<M> {
    /// Decoder layer index.
    pub layer: usize,
    /// Top-k hits per expert; sums to tokens × top_k.
    pub routing_counts: Vec<u64>,
    /// Tokens that passed through the layer.
    pub tokens: u64,
    /// Experts by descending routing count, cut into groups of `group_size`.
    pub groups: Vec<Vec<usize>>,
    /// Per group, Σ xxᵀ over the inputs routed to each of its experts (d×d), when requested.
    pub group_gram: Option<Vec<M>>,
    /// Per expert, Σ h hᵀ of its intermediate activation `h = act(gate·x) ⊙ (up·x)` over the
    /// tokens routed to it (p×p, unweighted like `group_gram`), when requested.
    pub expert_down_gram: Option<Vec<M>>,
    /// Per expert, its output sensitivities, when requested.
    pub experts: Option<Vec<ExpertStatistics>>,
    /// `Σ ‖y‖²` of the layer's output `y` (the residual stream) over the calibration tokens:
    /// what estimated errors are relative to.
    pub output_energy: f64,
    /// With removal: which experts were kept. Everything above then covers the kept experts
    /// only, numbered `0..n'` in the order of `kept`.
    pub pruning: Option<LayerPruning>,
    /// The layer's calibration inputs and their routing, when a method computes its own
    /// statistics from them (one expert at a time, so that memory stays at one expert's).
    pub routed_inputs: Option<RoutedInputs>,
}

/// A layer's calibration inputs and, per expert, the rows routed to it.
#[derive(Clone)]
pub struct RoutedInputs {
    batches: Vec<RoutedBatch>,
}

impl std::fmt::Debug for RoutedInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutedInputs")
            .field("batches", &self.batches.len())
            .finish()
    }
}

impl RoutedInputs {
    /// Expert `expert`'s routed inputs [n, d] (f32, CPU) and routing weights [n] (None when
    /// no calibration token reached it).
    pub fn expert_rows(&self, expert: usize) -> Result<Option<(Tensor, Tensor)>> {
        Self::expert_rows_of(&self.batches, expert)
    }

    fn expert_rows_of(batches: &[RoutedBatch], expert: usize) -> Result<Option<(Tensor, Tensor)>> {
        let (mut rows, mut weights) = (Vec::new(), Vec::new());
        for batch in batches {
            let Some((tokens, w)) = batch.routes.get(expert) else {
                continue;
            };
            let Some(input) = batch.input.as_ref().filter(|_| !tokens.is_empty()) else {
                continue;
            };
            let index = Tensor::from_slice(tokens, tokens.len(), input.device())?;
            rows.push(
                input
                    .index_select(&index, 0)?
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?,
            );
            weights.extend_from_slice(w);
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let n = weights.len();
        Ok(Some((
            Tensor::cat(&rows, 0)?,
            Tensor::from_vec(weights, n, &Device::Cpu)?,
        )))
    }

    /// Tokens routed to expert `expert`.
    pub fn expert_tokens(&self, expert: usize) -> usize {
        self.batches
            .iter()
            .filter_map(|b| b.routes.get(expert))
            .map(|(tokens, _)| tokens.len())
            .sum()
    }

    /// Every calibration input of the layer [tokens, d] (f32, CPU).
    pub fn all_rows(&self) -> Result<Option<Tensor>> {
        let rows = self
            .batches
            .iter()
            .filter_map(|b| b.input.as_ref())
            .map(|t| Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?))
            .collect::<Result<Vec<_>>>()?;
        match rows.is_empty() {
            true => Ok(None),
            false => Ok(Some(Tensor::cat(&rows, 0)?)),
        }
    }
}

impl<M> LayerStatistics<M> {
    /// Experts that no calibration token was routed to.
    pub fn unused_experts(&self) -> Vec<usize> {
        self.routing_counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c == 0)
            .map(|(i, _)| i)
            .collect()
    }

    /// Group routing frequencies `F_g`.
    pub fn group_frequencies(&self) -> Vec<f64> {
        group_frequencies(&self.routing_counts, &self.groups)
    }

    /// The output-error weights of expert `expert`'s `matrix` (None without expert
    /// statistics). Every weight has a floor of 1% of the layer's mean, so an expert that few
    /// or no calibration tokens reached still pays for its errors, as text it was trained for
    /// would make it.
    pub fn error_weights(&self, matrix: ExpertMatrix, expert: usize) -> Option<ErrorWeights> {
        let experts = self.experts.as_ref()?;
        let stats = experts.get(expert)?;
        let per_token = |s: &ExpertStatistics, v: f64| v / s.tokens.max(1) as f64;
        let (rows, cols): (Vec<f64>, Vec<f64>) = match matrix {
            ExpertMatrix::Gate | ExpertMatrix::Up => {
                let rows = |s: &ExpertStatistics| -> Vec<f64> {
                    let sensitivity = match matrix {
                        ExpertMatrix::Gate => &s.gate_sensitivity,
                        _ => &s.up_sensitivity,
                    };
                    sensitivity
                        .iter()
                        .zip(&s.down_column_energy)
                        .map(|(&g, &d)| per_token(s, g * d))
                        .collect()
                };
                let floor_rows = floor(experts.iter().flat_map(rows));
                let floor_cols = floor(experts.iter().flat_map(|s| s.input_energy.clone()));
                (
                    rows(stats).iter().map(|r| r + floor_rows).collect(),
                    stats.input_energy.iter().map(|c| c + floor_cols).collect(),
                )
            }
            ExpertMatrix::Down => {
                let rows = |s: &ExpertStatistics| per_token(s, s.weight_energy);
                let floor_rows = floor(experts.iter().map(rows));
                let floor_cols = floor(experts.iter().flat_map(|s| s.intermediate_energy.clone()));
                let d = self
                    .experts
                    .as_ref()
                    .and_then(|e| e.first())
                    .map_or(0, |s| s.input_energy.len());
                (
                    vec![rows(stats) + floor_rows; d],
                    stats
                        .intermediate_energy
                        .iter()
                        .map(|c| c + floor_cols)
                        .collect(),
                )
            }
        };
        Some(ErrorWeights { rows, cols })
    }
}

impl<M> LayerStatistics<M> {
    /// Output-sensitivity weights for fitting a shared basis to the group `members`' `matrix`
    /// (None without expert statistics): for gate and up one per stacked row (`k·p`), expert
    /// j's row weight of [`Self::error_weights`] times `n_j / n_g`, because the basis is fitted
    /// under the group's Gram matrix (the sum of its members' over `n_g` tokens) where each
    /// member's error is measured under its own (`n_j` tokens); for down one per member.
    pub fn group_weights(&self, matrix: ExpertMatrix, members: &[usize]) -> Option<Vec<f64>> {
        let experts = self.experts.as_ref()?;
        let group_tokens: u64 = members.iter().map(|&e| experts[e].tokens).sum();
        let mut weights = Vec::new();
        for &e in members {
            let rows = self.error_weights(matrix, e)?.rows;
            match matrix {
                ExpertMatrix::Down => weights.push(rows.first().copied().unwrap_or(0.0)),
                ExpertMatrix::Gate | ExpertMatrix::Up => {
                    let share = experts[e].tokens.max(1) as f64 / group_tokens.max(1) as f64;
                    weights.extend(rows.iter().map(|r| r * share));
                }
            }
        }
        Some(weights)
    }
}

/// 1% of the mean of `values` (0 for none).
fn floor(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    match count {
        0 => 0.0,
        _ => 0.01 * sum / count as f64,
    }
}

/// Everything a layer's forward passes recorded, over every expert, before any is removed.
pub struct LayerObservations<M> {
    /// Decoder layer index.
    pub layer: usize,
    /// Top-k hits per expert.
    pub routing_counts: Vec<u64>,
    /// Tokens that passed through the layer.
    pub tokens: u64,
    /// REAP saliency per expert, when asked for.
    pub saliency: Option<Vec<f64>>,
    /// Per expert, the energy its weighted output adds to the layer's (with the saliency).
    pub expert_output_energy: Option<Vec<f64>>,
    /// `Σ ‖y‖²` of the layer's output over the calibration tokens.
    pub output_energy: f64,
    pub(crate) batches: Vec<RoutedBatch>,
    pub(crate) down_grams: Option<Vec<M>>,
}

/// What [`LayerObservations::into_statistics`] computes besides counts and groups.
#[derive(Debug, Clone, Copy)]
pub struct StatisticsWanted {
    /// Experts per frequency-sorted group.
    pub group_size: usize,
    /// Each group's input Gram matrix.
    pub group_gram: bool,
    /// Each expert's output sensitivities.
    pub expert_statistics: bool,
    /// The layer's routed inputs themselves.
    pub routed_inputs: bool,
}

impl<M> LayerObservations<M> {
    /// The statistics of the experts `pruning` keeps (all without it), renumbered `0..n'`.
    pub fn into_statistics<B: LinalgBackend<Matrix = M>>(
        mut self,
        pruning: Option<LayerPruning>,
        experts: &LayerExperts,
        wanted: StatisticsWanted,
        backend: &B,
    ) -> Result<LayerStatistics<M>> {
        if let Some(pruning) = &pruning {
            self.keep_only(&pruning.kept);
        }
        let (routing_counts, tokens) = self.counts();
        let groups = frequency_groups(&routing_counts, wanted.group_size)?;
        let has_inputs = self.batches.iter().all(|b| b.input.is_some());
        let group_gram = match wanted.group_gram && has_inputs {
            true => Some(
                groups
                    .iter()
                    .map(|group| self.group_gram(group, backend))
                    .collect::<Result<Vec<_>>>()?,
            ),
            false => None,
        };
        let expert_statistics = match wanted.expert_statistics && has_inputs {
            true => Some(
                (0..routing_counts.len())
                    .map(|e| self.expert_statistics(e, experts))
                    .collect::<Result<Vec<_>>>()?,
            ),
            false => None,
        };
        let routed_inputs = match wanted.routed_inputs && has_inputs {
            true => Some(RoutedInputs {
                batches: std::mem::take(&mut self.batches),
            }),
            false => None,
        };
        Ok(LayerStatistics {
            layer: self.layer,
            routing_counts,
            tokens,
            groups,
            group_gram,
            expert_down_gram: self.down_grams,
            experts: expert_statistics,
            output_energy: self.output_energy,
            pruning,
            routed_inputs,
        })
    }

    /// Top-k hits per expert and the tokens seen.
    pub(crate) fn counts(&self) -> (Vec<u64>, u64) {
        let experts = self.batches.first().map_or(0, |b| b.routes.len());
        let mut routing_counts = vec![0u64; experts];
        let mut tokens = 0u64;
        for batch in &self.batches {
            tokens += batch.tokens as u64;
            for (expert, (routed, _)) in batch.routes.iter().enumerate() {
                routing_counts[expert] += routed.len() as u64;
            }
        }
        (routing_counts, tokens)
    }

    /// Renumbers the recorded routing (and intermediate Gram matrices) to the `kept` experts.
    fn keep_only(&mut self, kept: &[usize]) {
        for batch in &mut self.batches {
            let mut all = std::mem::take(&mut batch.routes);
            batch.routes = kept.iter().map(|&e| std::mem::take(&mut all[e])).collect();
        }
        if let Some(grams) = self.down_grams.take() {
            let mut all: Vec<Option<M>> = grams.into_iter().map(Some).collect();
            self.down_grams = Some(kept.iter().filter_map(|&e| all[e].take()).collect());
        }
        self.saliency = self
            .saliency
            .take()
            .map(|s| kept.iter().map(|&e| s[e]).collect());
        self.expert_output_energy = self
            .expert_output_energy
            .take()
            .map(|s| kept.iter().map(|&e| s[e]).collect());
    }

    /// Σ over the group's experts of Σ over batches of `XᵀX` of the expert's routed inputs.
    fn group_gram<B: LinalgBackend<Matrix = M>>(&self, group: &[usize], backend: &B) -> Result<M> {
        let d = match self.batches.first().and_then(|b| b.input.as_ref()) {
            Some(input) => input.dim(1)?,
            None => 0,
        };
        let mut sum = backend.zeros(d, d)?;
        for &expert in group {
            let mut expert_gram = backend.zeros(d, d)?;
            for batch in &self.batches {
                let routed = &batch.routes[expert].0;
                let Some(input) = batch.input.as_ref().filter(|_| !routed.is_empty()) else {
                    continue;
                };
                let index = Tensor::from_slice(routed, routed.len(), input.device())?;
                let rows = input.index_select(&index, 0)?;
                backend.accumulate_gram(&mut expert_gram, &rows)?;
            }
            sum = backend.add(&sum, &expert_gram)?;
        }
        Ok(sum)
    }

    /// Expert `expert`'s output sensitivities from its routed calibration tokens.
    fn expert_statistics(&self, expert: usize, experts: &LayerExperts) -> Result<ExpertStatistics> {
        let down = experts.matrix(expert, ExpertMatrix::Down)?;
        let down_column_energy = column_energy(&down)?;
        let p = down_column_energy.len();
        let d = down.dim(0)?;
        let Some((x, g)) = RoutedInputs::expert_rows_of(&self.batches, expert)? else {
            return Ok(ExpertStatistics {
                tokens: 0,
                weight_energy: 0.0,
                gate_sensitivity: vec![0.0; p],
                up_sensitivity: vec![0.0; p],
                input_energy: vec![0.0; d],
                intermediate_energy: vec![0.0; p],
                down_column_energy,
            });
        };
        let gate = experts.matrix(expert, ExpertMatrix::Gate)?;
        let up = experts.matrix(expert, ExpertMatrix::Up)?;
        let a = x.matmul(&gate.t()?)?;
        let u = x.matmul(&up.t()?)?;
        let sigma = candle_nn::ops::sigmoid(&a)?;
        let silu = (&a * &sigma)?;
        // silu'(a) = σ(a)·(1 + a·(1 − σ(a))).
        let silu_derivative = (&sigma * (&a * sigma.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?;
        let g2 = g.sqr()?.unsqueeze(1)?;
        let weighted_sum = |t: &Tensor| -> Result<Vec<f64>> {
            let summed = t.sqr()?.broadcast_mul(&g2)?.sum(0)?;
            Ok(summed
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect())
        };
        let plain_sum = |t: &Tensor| -> Result<Vec<f64>> {
            Ok(t.sqr()?
                .sum(0)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect())
        };
        Ok(ExpertStatistics {
            tokens: g.dim(0)? as u64,
            weight_energy: f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?),
            gate_sensitivity: weighted_sum(&(&silu_derivative * &u)?)?,
            up_sensitivity: weighted_sum(&silu)?,
            input_energy: plain_sum(&x)?,
            intermediate_energy: plain_sum(&(&silu * &u)?)?,
            down_column_energy,
        })
    }
}

/// `‖W[:, i]‖²` of every column of a 2-D tensor.
fn column_energy(w: &Tensor) -> Result<Vec<f64>> {
    Ok(w.to_dtype(DType::F32)?
        .sqr()?
        .sum(0)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn error_weights_multiply_rows_and_columns() {
        let weights = ErrorWeights {
            rows: vec![1.0, 2.0],
            cols: vec![3.0, 4.0],
        };
        // 1·(3·1 + 4·4) + 2·(3·0 + 4·1) = 19 + 8.
        assert_eq!(weights.error(&[1.0, 2.0, 0.0, 1.0]), 27.0);
    }
}
