//! One canonical view of routed-expert weights whatever their on-disk form: per-expert keys
//! (`mlp.experts.{j}.gate_proj`, Mixtral's `block_sparse_moe.experts.{j}.w1`), fused 3-D tensors
//! (`mlp.experts.gate_up_proj` [n, 2p, d], `mlp.experts.down_proj` [n, d, p]) or rfid-moe's
//! compressed factors (`lowrank_a` + shared `basis` + optional residual).

use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::format::{self, BasisActivation, CompressionRecord, GroupRecord};
use crate::models::common::Weights;
use crate::models::moe::{Expert, Projection};
use crate::residual::SparseProjection;

/// The three matrices of a gated expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExpertMatrix {
    /// `gate_proj` / `w1`, [p, d].
    Gate,
    /// `up_proj` / `w3`, [p, d].
    Up,
    /// `down_proj` / `w2`, [d, p].
    Down,
}

impl ExpertMatrix {
    /// All three, in gate, up, down order.
    pub const ALL: [ExpertMatrix; 3] = [Self::Gate, Self::Up, Self::Down];
}

/// Where a layer's routed experts live and what their matrices are called.
#[derive(Debug, Clone)]
pub struct ExpertLayout {
    /// The MoE block prefix, e.g. `model.layers.3.mlp` or `model.layers.3.block_sparse_moe`.
    pub block: String,
    /// Checkpoint names of gate, up and down (`gate_proj`/`up_proj`/`down_proj` or `w1`/`w3`/`w2`).
    pub names: [&'static str; 3],
    /// Number of routed experts.
    pub num_experts: usize,
    /// Hidden size `d`.
    pub hidden_size: usize,
    /// Expert intermediate size `p`.
    pub intermediate_size: usize,
}

impl ExpertLayout {
    /// The common layout: `model.layers.{layer}.mlp.experts.{j}.{gate,up,down}_proj`.
    pub fn standard(
        layer: usize,
        num_experts: usize,
        hidden_size: usize,
        intermediate_size: usize,
    ) -> Self {
        Self {
            block: format!("model.layers.{layer}.mlp"),
            names: ["gate_proj", "up_proj", "down_proj"],
            num_experts,
            hidden_size,
            intermediate_size,
        }
    }

    /// The checkpoint's name for `matrix`.
    pub fn name(&self, matrix: ExpertMatrix) -> &'static str {
        self.names[matrix as usize]
    }

    /// Shape of `matrix` for one expert.
    pub fn shape(&self, matrix: ExpertMatrix) -> [usize; 2] {
        match matrix {
            ExpertMatrix::Gate | ExpertMatrix::Up => [self.intermediate_size, self.hidden_size],
            ExpertMatrix::Down => [self.hidden_size, self.intermediate_size],
        }
    }

    /// Per-expert key of `matrix` for `expert`.
    pub fn dense_name(&self, expert: usize, matrix: ExpertMatrix) -> String {
        format!(
            "{}.experts.{expert}.{}.weight",
            self.block,
            self.name(matrix)
        )
    }

    /// Loads the original dense matrix of `expert` from per-expert or fused tensors.
    pub fn load_dense(
        &self,
        weights: &Weights,
        expert: usize,
        matrix: ExpertMatrix,
    ) -> Result<Tensor> {
        let shape = self.shape(matrix);
        let per_expert = self.dense_name(expert, matrix);
        if weights.contains(&per_expert) {
            return weights.get(&per_expert, &shape);
        }
        let (p, d, n) = (self.intermediate_size, self.hidden_size, self.num_experts);
        match matrix {
            ExpertMatrix::Gate | ExpertMatrix::Up => {
                let fused = format!("{}.experts.gate_up_proj", self.block);
                if weights.contains(&fused) {
                    let all = weights.get(&fused, &[n, 2 * p, d])?;
                    let offset = if matrix == ExpertMatrix::Gate { 0 } else { p };
                    return Ok(all.get(expert)?.narrow(0, offset, p)?.contiguous()?);
                }
            }
            ExpertMatrix::Down => {
                let fused = format!("{}.experts.down_proj", self.block);
                if weights.contains(&fused) {
                    return Ok(weights.get(&fused, &[n, d, p])?.get(expert)?.contiguous()?);
                }
            }
        }
        Err(Error::MissingTensor {
            name: per_expert,
            dir: weights.checkpoint.dir().to_path_buf(),
            expected_by: format!(
                "{} routed expert {expert} (neither per-expert keys nor fused `{}.experts.gate_up_proj`/`down_proj` found)",
                weights.family, self.block
            ),
        })
    }

    /// Loads all routed experts, honouring a compression record when the checkpoint has one.
    pub fn load_experts(
        &self,
        weights: &Weights,
        layer: usize,
        compression: Option<&CompressionRecord>,
    ) -> Result<Vec<Expert>> {
        let mut projections: Vec<[Option<Projection>; 3]> =
            (0..self.num_experts).map(|_| [None, None, None]).collect();
        if let Some(record) = compression.and_then(|c| c.layer(layer).map(|l| (c, l))) {
            let (compression, layer_record) = record;
            for matrix in ExpertMatrix::ALL {
                let Some(matrix_record) = layer_record.matrices.get(self.name(matrix)) else {
                    continue;
                };
                for (g, group) in matrix_record.groups.iter().enumerate() {
                    if group.dense {
                        continue;
                    }
                    let factored = self.load_group(weights, compression, matrix, g, group)?;
                    for (expert, projection) in group.experts.iter().zip(factored) {
                        let slot = projections.get_mut(*expert).ok_or_else(|| Error::Config {
                            path: weights.checkpoint.config_path(),
                            message: format!(
                                "compression record of layer {layer} names expert {expert}, but the layer has {}",
                                self.num_experts
                            ),
                        })?;
                        slot[matrix as usize] = Some(projection);
                    }
                }
            }
        }
        projections
            .into_iter()
            .enumerate()
            .map(|(expert, mut slots)| {
                let mut take = |matrix: ExpertMatrix| -> Result<Projection> {
                    match slots[matrix as usize].take() {
                        Some(p) => Ok(p),
                        None => Ok(Projection::Dense(self.load_dense(weights, expert, matrix)?)),
                    }
                };
                Ok(Expert {
                    gate: take(ExpertMatrix::Gate)?,
                    up: take(ExpertMatrix::Up)?,
                    down: take(ExpertMatrix::Down)?,
                })
            })
            .collect()
    }

    fn load_group(
        &self,
        weights: &Weights,
        compression: &CompressionRecord,
        matrix: ExpertMatrix,
        group_index: usize,
        group: &GroupRecord,
    ) -> Result<Vec<Projection>> {
        let name = self.name(matrix);
        let [rows, cols] = self.shape(matrix);
        let raw_basis = weights.get(
            &format::basis_name(&self.block, group_index, name),
            &[group.rank, cols],
        )?;
        let basis = match compression.basis_activation {
            BasisActivation::Identity => raw_basis,
            BasisActivation::Silu => candle_nn::ops::silu(&raw_basis)?,
        };
        let residual_rows = if group.residual_size > 0 {
            let eta = weights.get(
                &format::residual_name(&self.block, group_index, name),
                &[group.residual_size],
            )?;
            let eta: Vec<f32> = eta.to_dtype(candle_core::DType::F32)?.to_vec1()?;
            let entries = group.experts.len() * rows * cols;
            let projection =
                SparseProjection::new(compression.residual_seed, entries, group.residual_size);
            let dense = Tensor::from_vec(
                projection.expand(&eta),
                (group.experts.len() * rows, cols),
                weights.device,
            )?
            .to_dtype(weights.dtype)?;
            Some(dense)
        } else {
            None
        };
        group
            .experts
            .iter()
            .enumerate()
            .map(|(slot, &expert)| {
                let coefficients = weights.get(
                    &format::coefficients_name(&self.block, expert, name),
                    &[rows, group.rank],
                )?;
                let residual = match &residual_rows {
                    Some(r) => Some(r.narrow(0, slot * rows, rows)?),
                    None => None,
                };
                Ok(Projection::LowRank {
                    coefficients,
                    basis: basis.clone(),
                    residual,
                })
            })
            .collect()
    }
}

/// Stacks per-expert matrices row-wise: k × [p, d] -> [k·p, d].
pub fn stack_rows(matrices: &[Tensor]) -> Result<Tensor> {
    Ok(Tensor::cat(matrices, D::Minus2)?)
}
