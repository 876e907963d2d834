//! One canonical view of routed-expert weights whatever their on-disk form: per-expert keys
//! (`mlp.experts.{j}.gate_proj`, Mixtral's `block_sparse_moe.experts.{j}.w1`), fused 3-D tensors
//! (`mlp.experts.gate_up_proj` [n, 2p, d], `mlp.experts.down_proj` [n, d, p]) or rfid-moe's
//! compressed factors (`lowrank_a` + shared `basis` + optional residual).
//!
//! Everything here returns plain tensors: dense matrices [out, in], stacks [n, out, in] and
//! [`StoredGroup`]s, whose matrices are [`Weight`]s (int8-stored factors can stay int8 codes,
//! [`Int8Holding`]). How the runtime executes them is `models::experts`' business.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor, D};

use super::weight::{Int8Holding, Weight};
use super::Checkpoint;
use crate::error::{Error, Result};
use crate::format::{self, BasisActivation, CompressionRecord, GroupRecord};
use crate::residual::SparseProjection;

/// The three matrices of a gated expert (`gate`, `up`, `down` in saved settings).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
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

    /// The lowercase name used on the command line and in saved settings.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Gate => "gate",
            Self::Up => "up",
            Self::Down => "down",
        }
    }

    /// One line saying what the matrix is (for help texts).
    pub fn description(&self) -> &'static str {
        match self {
            Self::Gate => "gate_proj (Mixtral: w1), [p, d]: basis shared on the input side",
            Self::Up => "up_proj (Mixtral: w3), [p, d]: basis shared on the input side",
            Self::Down => "down_proj (Mixtral: w2), [d, p]: basis shared on the output side",
        }
    }
}

impl std::fmt::Display for ExpertMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ExpertMatrix {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|m| m.name() == name)
            .copied()
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown expert matrix `{name}`: expected one of gate, up, down"
                ))
            })
    }
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

/// The residual of a factored group as stored: coefficients η and the seed of the sparse
/// projection that expands them.
#[derive(Debug, Clone)]
pub struct StoredResidual {
    /// η, [residual_size].
    pub eta: Tensor,
    /// Seed of the random sparse projection (`compression.residual_seed`).
    pub seed: u64,
}

impl StoredResidual {
    /// Expands η to the dense residual of the whole group: `experts` matrices of `shape`
    /// stacked row-wise, [experts·out, in], in `dtype` on `device`.
    pub fn expand(
        &self,
        experts: usize,
        shape: [usize; 2],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let eta: Vec<f32> = self.eta.to_dtype(DType::F32)?.to_vec1()?;
        let [rows, cols] = shape;
        let entries = experts * rows * cols;
        if eta.is_empty() {
            return Err(Error::InvalidArgument(
                "a stored residual needs at least one coefficient".into(),
            ));
        }
        let projection = SparseProjection::new(self.seed, entries, eta.len());
        Ok(
            Tensor::from_vec(projection.expand(&eta), (experts * rows, cols), device)?
                .to_dtype(dtype)?,
        )
    }
}

/// Which side of a factored group's matrices its shared basis is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasisSide {
    /// Gate/up: the input side, `Ŵ_i = A_i · act(B)` with `A_i` [out, rank] per member and
    /// `B` [rank, in] shared (applied first, once for the group's tokens).
    Input,
    /// Down: the output side, `Ŵ_i = U · C_i` with `U` [out, rank] shared and `C_i`
    /// [rank, in] per member (applied last, once to the members' weighted sum).
    Output,
}

impl BasisSide {
    /// The side `matrix`'s groups share: the output side for down, the input side otherwise.
    pub fn of(matrix: ExpertMatrix) -> Self {
        match matrix {
            ExpertMatrix::Down => Self::Output,
            ExpertMatrix::Gate | ExpertMatrix::Up => Self::Input,
        }
    }
}

/// One factored group of one matrix type as stored: `Ŵ_i = A_i · act(B) (+ R_i)` on the input
/// side, `Ŵ_i = U · C_i` on the output side ([`BasisSide`]).
#[derive(Debug, Clone)]
pub struct StoredGroup {
    /// Expert indices of the group, in the record's order.
    pub experts: Vec<usize>,
    /// Per member of `experts`: `A_i` [out, rank] (input side) or `C_i` [rank, in] (output
    /// side).
    pub coefficients: Vec<Weight>,
    /// The basis as stored: raw `B` [rank, in] (input side; apply `activation` before use) or
    /// `U` [out, rank] (output side).
    pub basis: Weight,
    /// Activation applied to the basis at inference (always the identity on the output side).
    pub activation: BasisActivation,
    /// Optional residual (input side only).
    pub residual: Option<StoredResidual>,
    /// Which side the basis is shared on.
    pub side: BasisSide,
}

impl StoredGroup {
    /// `act(B)`, [rank, in] (input side); `U` as stored (output side). The identity keeps an
    /// int8 basis int8; SiLU needs the basis dense (in the compute dtype).
    pub fn activated_basis(&self) -> Result<Weight> {
        Ok(match (self.side, self.activation) {
            (BasisSide::Output, _) | (_, BasisActivation::Identity) => self.basis.clone(),
            (BasisSide::Input, BasisActivation::Silu) => {
                Weight::Dense(candle_nn::ops::silu(&self.basis.matrix()?)?)
            }
        })
    }

    /// Each member's dense residual [out, in] (expanded from η), or `None` without a residual.
    pub fn member_residuals(&self) -> Result<Option<Vec<Tensor>>> {
        let Some(residual) = &self.residual else {
            return Ok(None);
        };
        let (Some(first), k) = (self.coefficients.first(), self.experts.len()) else {
            return Ok(None);
        };
        let rows = first.dim(0)?;
        let cols = self.basis.dim(1)?;
        let dense = residual.expand(k, [rows, cols], self.basis.dtype(), self.basis.device())?;
        (0..k)
            .map(|slot| Ok(dense.narrow(0, slot * rows, rows)?))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The effective dense matrices `A_i·act(B) + R_i` (or `U·C_i`) of every member, [out, in]
    /// each.
    pub fn reconstruct(&self) -> Result<Vec<Tensor>> {
        let basis = self.activated_basis()?.matrix()?;
        let residuals = self.member_residuals()?;
        self.coefficients
            .iter()
            .enumerate()
            .map(|(slot, c)| {
                let c = c.matrix()?;
                let w = match self.side {
                    BasisSide::Input => c.matmul(&basis)?,
                    BasisSide::Output => basis.matmul(&c)?,
                };
                Ok(match &residuals {
                    Some(r) => (w + &r[slot])?,
                    None => w,
                })
            })
            .collect()
    }
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

    /// Name of the fused 3-D tensor holding `matrix` for all experts (`gate_up_proj` holds gate
    /// and up).
    pub fn fused_name(&self, matrix: ExpertMatrix) -> String {
        match matrix {
            ExpertMatrix::Gate | ExpertMatrix::Up => format!("{}.experts.gate_up_proj", self.block),
            ExpertMatrix::Down => format!("{}.experts.down_proj", self.block),
        }
    }

    /// Whether `matrix` is stored fused ([n, 2p, d] / [n, d, p]) rather than per expert.
    pub fn is_fused(&self, checkpoint: &Checkpoint, matrix: ExpertMatrix) -> bool {
        !checkpoint.contains(&self.dense_name(0, matrix))
            && checkpoint.contains(&self.fused_name(matrix))
    }

    fn expected_by(&self, what: &str) -> String {
        format!("{what} of `{}`", self.block)
    }

    fn check_expert(&self, expert: usize) -> Result<()> {
        if expert >= self.num_experts {
            return Err(Error::InvalidArgument(format!(
                "expert {expert} requested from `{}`, which has {} routed experts",
                self.block, self.num_experts
            )));
        }
        Ok(())
    }

    /// The fused tensor of `matrix`, narrowed to `matrix`: [n, out, in], not necessarily contiguous.
    fn load_fused(
        &self,
        checkpoint: &Checkpoint,
        matrix: ExpertMatrix,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (p, d, n) = (self.intermediate_size, self.hidden_size, self.num_experts);
        let name = self.fused_name(matrix);
        let by = self.expected_by("fused routed experts");
        Ok(match matrix {
            ExpertMatrix::Gate | ExpertMatrix::Up => {
                let all = checkpoint.load_shaped(&name, &[n, 2 * p, d], dtype, device, &by)?;
                let offset = if matrix == ExpertMatrix::Gate { 0 } else { p };
                all.narrow(1, offset, p)?
            }
            ExpertMatrix::Down => checkpoint.load_shaped(&name, &[n, d, p], dtype, device, &by)?,
        })
    }

    fn missing(&self, checkpoint: &Checkpoint, expert: usize, matrix: ExpertMatrix) -> Error {
        Error::MissingTensor {
            name: self.dense_name(expert, matrix),
            dir: checkpoint.dir().to_path_buf(),
            expected_by: format!(
                "routed expert {expert} of `{}` (neither per-expert keys nor fused `{}` found)",
                self.block,
                self.fused_name(matrix)
            ),
        }
    }

    /// Loads the original dense matrix [out, in] of `expert` from per-expert or fused tensors,
    /// checking shapes against the config.
    pub fn load_dense(
        &self,
        checkpoint: &Checkpoint,
        expert: usize,
        matrix: ExpertMatrix,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.check_expert(expert)?;
        let per_expert = self.dense_name(expert, matrix);
        if checkpoint.contains(&per_expert) {
            let by = self.expected_by(&format!("routed expert {expert}"));
            return checkpoint.load_shaped(&per_expert, &self.shape(matrix), dtype, device, &by);
        }
        if checkpoint.contains(&self.fused_name(matrix)) {
            // Only this expert's bytes are read, not the whole fused tensor.
            let (p, d, n) = (self.intermediate_size, self.hidden_size, self.num_experts);
            let name = self.fused_name(matrix);
            let by = self.expected_by("fused routed experts");
            return Ok(match matrix {
                ExpertMatrix::Gate | ExpertMatrix::Up => {
                    let offset = if matrix == ExpertMatrix::Gate { 0 } else { p };
                    checkpoint
                        .load_index(&name, &[n, 2 * p, d], expert, dtype, device, &by)?
                        .narrow(0, offset, p)?
                        .contiguous()?
                }
                ExpertMatrix::Down => {
                    checkpoint.load_index(&name, &[n, d, p], expert, dtype, device, &by)?
                }
            });
        }
        Err(self.missing(checkpoint, expert, matrix))
    }

    /// [`ExpertLayout::load_dense`] as a [`Weight`]: a per-expert matrix stored as int8 (a
    /// member of a factored matrix's dense group) stays int8 codes when `holding` says so.
    pub fn load_dense_weight(
        &self,
        checkpoint: &Checkpoint,
        expert: usize,
        matrix: ExpertMatrix,
        (dtype, device): (DType, &Device),
        holding: Int8Holding,
    ) -> Result<Weight> {
        self.check_expert(expert)?;
        let per_expert = self.dense_name(expert, matrix);
        if checkpoint.is_int8(&per_expert) || checkpoint.packed(&per_expert).is_some() {
            let by = self.expected_by(&format!("routed expert {expert}"));
            let shape = self.shape(matrix);
            return Weight::load(
                checkpoint,
                &per_expert,
                &shape,
                (dtype, device),
                holding,
                &by,
            );
        }
        Ok(Weight::Dense(
            self.load_dense(checkpoint, expert, matrix, dtype, device)?,
        ))
    }

    /// Loads `matrix` of every routed expert, [out, in] each (a fused tensor is read once).
    pub fn load_matrix(
        &self,
        checkpoint: &Checkpoint,
        matrix: ExpertMatrix,
        dtype: DType,
        device: &Device,
    ) -> Result<Vec<Tensor>> {
        if self.is_fused(checkpoint, matrix) {
            let all = self.load_fused(checkpoint, matrix, dtype, device)?;
            return (0..self.num_experts)
                .map(|e| Ok(all.get(e)?.contiguous()?))
                .collect();
        }
        (0..self.num_experts)
            .map(|e| self.load_dense(checkpoint, e, matrix, dtype, device))
            .collect()
    }

    /// Loads `matrix` of every routed expert as one contiguous stack [n, out, in].
    pub fn load_stacked(
        &self,
        checkpoint: &Checkpoint,
        matrix: ExpertMatrix,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if self.is_fused(checkpoint, matrix) {
            return Ok(self
                .load_fused(checkpoint, matrix, dtype, device)?
                .contiguous()?);
        }
        let matrices = self.load_matrix(checkpoint, matrix, dtype, device)?;
        Ok(Tensor::stack(&matrices, 0)?)
    }

    /// The factored groups of `matrix` in `layer` of a compressed checkpoint (groups the record
    /// keeps dense are left out: their experts load through [`ExpertLayout::load_dense_weight`]),
    /// int8-stored factors held as `holding` says. Empty when the record does not cover this
    /// layer or matrix.
    pub fn load_groups(
        &self,
        checkpoint: &Checkpoint,
        compression: &CompressionRecord,
        layer: usize,
        matrix: ExpertMatrix,
        (dtype, device): (DType, &Device),
        holding: Int8Holding,
    ) -> Result<Vec<StoredGroup>> {
        let Some(layer_record) = compression.layer(layer) else {
            return Ok(Vec::new());
        };
        let Some(matrix_record) = layer_record.matrices.get(self.name(matrix)) else {
            return Ok(Vec::new());
        };
        self.check_membership(checkpoint, layer, matrix, &matrix_record.groups)?;
        let loader = GroupLoader {
            layout: self,
            checkpoint,
            compression,
            matrix,
            dtype,
            device,
            holding,
        };
        matrix_record
            .groups
            .iter()
            .enumerate()
            .filter(|(_, group)| !group.dense)
            .map(|(g, group)| loader.load(g, group))
            .collect()
    }

    /// Every expert index in range and in at most one group.
    fn check_membership(
        &self,
        checkpoint: &Checkpoint,
        layer: usize,
        matrix: ExpertMatrix,
        groups: &[GroupRecord],
    ) -> Result<()> {
        let mut seen = BTreeSet::new();
        for &expert in groups.iter().flat_map(|g| &g.experts) {
            let problem = if expert >= self.num_experts {
                format!("but the layer has {}", self.num_experts)
            } else if !seen.insert(expert) {
                "in more than one group".to_string()
            } else {
                continue;
            };
            return Err(Error::Config {
                path: checkpoint.config_path(),
                message: format!(
                    "compression record of layer {layer} ({}) names expert {expert} {problem}",
                    self.name(matrix)
                ),
            });
        }
        Ok(())
    }
}

/// Reads the tensors of factored groups of one matrix type.
struct GroupLoader<'a> {
    layout: &'a ExpertLayout,
    checkpoint: &'a Checkpoint,
    compression: &'a CompressionRecord,
    matrix: ExpertMatrix,
    dtype: DType,
    device: &'a Device,
    holding: Int8Holding,
}

impl GroupLoader<'_> {
    fn by(&self) -> String {
        format!("compressed experts of `{}`", self.layout.block)
    }

    /// A float tensor (residual coefficients).
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.checkpoint
            .load_shaped(name, shape, self.dtype, self.device, &self.by())
    }

    /// A factor matrix, int8 codes kept as `holding` says.
    fn get_weight(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let at = (self.dtype, self.device);
        Weight::load(self.checkpoint, name, shape, at, self.holding, &self.by())
    }

    fn load(&self, index: usize, group: &GroupRecord) -> Result<StoredGroup> {
        if BasisSide::of(self.matrix) == BasisSide::Output {
            return self.load_output_side(index, group);
        }
        let block = &self.layout.block;
        let name = self.layout.name(self.matrix);
        let [rows, cols] = self.layout.shape(self.matrix);
        let basis =
            self.get_weight(&format::basis_name(block, index, name), &[group.rank, cols])?;
        let residual = if group.residual_size > 0 {
            Some(StoredResidual {
                eta: self.get(
                    &format::residual_name(block, index, name),
                    &[group.residual_size],
                )?,
                seed: self.compression.residual_seed,
            })
        } else {
            None
        };
        let coefficients = group
            .experts
            .iter()
            .map(|&expert| {
                self.get_weight(
                    &format::coefficients_name(block, expert, name),
                    &[rows, group.rank],
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StoredGroup {
            experts: group.experts.clone(),
            coefficients,
            basis,
            activation: self.compression.basis_activation,
            residual,
            side: BasisSide::Input,
        })
    }

    /// A down_proj group: `U` [d, rank] (`basis`) and `C_j` [rank, p] (`lowrank_c`).
    fn load_output_side(&self, index: usize, group: &GroupRecord) -> Result<StoredGroup> {
        let block = &self.layout.block;
        let name = self.layout.name(self.matrix);
        if group.residual_size > 0 || self.compression.basis_activation != BasisActivation::Identity
        {
            return Err(Error::Config {
                path: self.checkpoint.config_path(),
                message: format!(
                    "compression record of `{block}` group {index} ({name}): a down_proj group \
                     has a linear basis and no residual (found activation {:?}, residual size {})",
                    self.compression.basis_activation, group.residual_size
                ),
            });
        }
        let [rows, cols] = self.layout.shape(self.matrix);
        let basis =
            self.get_weight(&format::basis_name(block, index, name), &[rows, group.rank])?;
        let coefficients = group
            .experts
            .iter()
            .map(|&expert| {
                self.get_weight(
                    &format::output_coefficients_name(block, expert, name),
                    &[group.rank, cols],
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StoredGroup {
            experts: group.experts.clone(),
            coefficients,
            basis,
            activation: BasisActivation::Identity,
            residual: None,
            side: BasisSide::Output,
        })
    }
}

/// Stacks per-expert matrices row-wise: k × [p, d] -> [k·p, d].
pub fn stack_rows(matrices: &[Tensor]) -> Result<Tensor> {
    Ok(Tensor::cat(matrices, D::Minus2)?)
}
