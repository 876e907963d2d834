//! The budget in one place: what `--ratio` is a fraction of, and each MoE layer's share of it.
//!
//! `--budget bytes` (the default): the output stores `1 − ρ` of the routed experts' stored bytes
//! (gate, up and down of every routed expert, scales included). The matrices left out of
//! `--matrices` are written as stored, and routed experts outside the compressed layers
//! (DeepSeek-V3's multi-token-prediction layer) are copied, so the covered matrices of the
//! compressed layers give up the whole budget: each layer may keep `(1 − ρ_c)` of its routed
//! bytes less what its uncovered matrices keep, with `ρ_c` the ratio the compressed layers must
//! meet for the whole to meet `ρ`. A removed expert frees all of its bytes.
//!
//! `--budget parameters` (the paper's): the covered matrices keep `1 − ρ` of their parameters,
//! layer by layer; a removed expert's uncovered matrices count among what is removed, so that
//! equal ratios give equal sizes whichever methods remove them.
//!
//! The solver (`pipeline::solver`) spends each layer's share, or all of them as one budget with
//! `--budget-scope model`.

use serde::{Deserialize, Serialize};

use super::experts::LayerExperts;
use super::options::{BudgetOptions, BudgetUnit};
use super::plan::LayerTarget;
use crate::checkpoint::experts::ExpertMatrix;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// The routed experts' stored bytes in a checkpoint: in all, and in (with the parameters of) the
/// MoE layers the pipeline compresses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutedStorage {
    /// Bytes of every routed-expert tensor (quantisation scales included).
    pub bytes: u64,
    /// Bytes of those in the compressed MoE layers.
    pub compressed_bytes: u64,
    /// Parameters of those in the compressed MoE layers (scales excluded).
    pub compressed_parameters: u64,
}

/// The routed experts' storage of `checkpoint`, `blocks` being the compressed MoE blocks'
/// name prefixes (`model.layers.3.mlp.`).
pub fn routed_expert_storage(checkpoint: &Checkpoint, blocks: &[String]) -> RoutedStorage {
    let mut storage = RoutedStorage::default();
    for name in checkpoint.tensor_names() {
        if !crate::checkpoint::storage::is_routed_expert_tensor(name) {
            continue;
        }
        let Some((info, _)) = checkpoint.info(name) else {
            continue;
        };
        let bytes = (info.data_range.1 - info.data_range.0) as u64;
        storage.bytes += bytes;
        if blocks.iter().any(|block| name.starts_with(block.as_str())) {
            storage.compressed_bytes += bytes;
            if !checkpoint.is_quantisation_scale(name) {
                storage.compressed_parameters += info.numel() as u64;
            }
        }
    }
    storage
}

/// The compressed MoE blocks' name prefixes of `checkpoint` (`model.layers.3.mlp.`).
fn moe_blocks(checkpoint: &Checkpoint) -> Result<Vec<String>> {
    let spec = crate::models::ArchConfig::from_checkpoint(checkpoint)?.spec();
    Ok(spec
        .moe_layers
        .iter()
        .flatten()
        .map(|layout| format!("{}.", layout.block))
        .collect())
}

/// Stored bytes per routed-expert parameter of the compressed layers (scales included).
pub fn input_bytes_per_parameter(checkpoint: &Checkpoint) -> Result<f64> {
    let storage = routed_expert_storage(checkpoint, &moe_blocks(checkpoint)?);
    if storage.compressed_parameters == 0 {
        return Err(no_routed_experts(checkpoint));
    }
    Ok(storage.compressed_bytes as f64 / storage.compressed_parameters as f64)
}

fn no_routed_experts(checkpoint: &Checkpoint) -> Error {
    Error::InvalidArgument(format!(
        "{} has no routed expert tensors (names with `.experts.`) in its MoE layers to size",
        checkpoint.dir().display()
    ))
}

/// A run's budget, resolved against its checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// What the ratio is a fraction of.
    pub unit: BudgetUnit,
    /// The fraction removed (`--ratio`).
    pub ratio: f64,
    /// The covered matrices.
    pub matrices: Vec<ExpertMatrix>,
    /// The fraction the compressed layers' routed experts must remove for the whole to remove
    /// `ratio` (bytes; equal to `ratio` for parameters).
    pub compressed_ratio: f64,
    /// The input's routed-expert storage.
    pub storage: RoutedStorage,
}

impl Budget {
    /// Resolves `options` against `checkpoint`.
    pub fn resolve(options: &BudgetOptions, checkpoint: &Checkpoint) -> Result<Self> {
        let storage = routed_expert_storage(checkpoint, &moe_blocks(checkpoint)?);
        if storage.compressed_parameters == 0 {
            return Err(no_routed_experts(checkpoint));
        }
        let ratio = options.ratio;
        let compressed_ratio = match options.unit {
            BudgetUnit::Parameters => ratio,
            BudgetUnit::Bytes => {
                let outside = (storage.bytes - storage.compressed_bytes) as f64;
                let kept = ((1.0 - ratio) * storage.bytes as f64 - outside)
                    / storage.compressed_bytes as f64;
                if !(0.0..1.0).contains(&ratio) || kept <= 0.0 {
                    return Err(Error::InvalidArgument(format!(
                        "--ratio {ratio} of the routed experts' bytes cannot be met: it must be \
                         in [0, 1), and the routed experts outside the compressed layers keep \
                         {outside} of their {} bytes",
                        storage.bytes
                    )));
                }
                1.0 - kept
            }
        };
        Ok(Self {
            unit: options.unit,
            ratio,
            matrices: options.targeted(),
            compressed_ratio,
            storage,
        })
    }

    /// The share of layer `experts` (whose removed experts' matrices are in `source`'s layout)
    /// that its covered matrices may keep, in the budget's unit.
    pub fn layer_target(&self, experts: &LayerExperts) -> Result<LayerTarget> {
        let source = experts.source_layout();
        let kept: Vec<usize> = (0..experts.layout.num_experts)
            .map(|e| experts.source_index(e))
            .collect();
        let (mut covered, mut uncovered, mut uncovered_kept) = (0.0, 0.0, 0.0);
        for expert in 0..source.num_experts {
            for matrix in ExpertMatrix::ALL {
                let size = match self.unit {
                    BudgetUnit::Bytes => experts.source_stored_bytes(expert, matrix)? as f64,
                    BudgetUnit::Parameters => {
                        let [rows, cols] = source.shape(matrix);
                        (rows * cols) as f64
                    }
                };
                if self.matrices.contains(&matrix) {
                    covered += size;
                } else {
                    uncovered += size;
                    if kept.contains(&expert) {
                        uncovered_kept += size;
                    }
                }
            }
        }
        let target = match self.unit {
            BudgetUnit::Bytes => {
                (1.0 - self.compressed_ratio) * (covered + uncovered) - uncovered_kept
            }
            // The covered matrices keep `1 − ρ` of theirs; a removed expert's uncovered
            // matrices count as removed too (equal ratios give equal sizes whatever removes).
            BudgetUnit::Parameters => (1.0 - self.ratio) * covered + uncovered - uncovered_kept,
        };
        if target < 0.0 {
            let missing: Vec<&str> = ExpertMatrix::ALL
                .iter()
                .filter(|m| !self.matrices.contains(m))
                .map(|m| m.name())
                .collect();
            return Err(Error::InvalidArgument(format!(
                "--ratio {} of the routed experts' bytes cannot be met: the matrices left out of \
                 --matrices ({}) alone keep {:.3} of them; add them to --matrices or lower \
                 --ratio",
                self.ratio,
                missing.join(", "),
                uncovered_kept / (covered + uncovered).max(1.0)
            )));
        }
        Ok(LayerTarget {
            before: covered,
            target,
        })
    }
}
