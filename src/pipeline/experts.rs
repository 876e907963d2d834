//! Reads one layer's routed-expert matrices straight from the checkpoint, a group at a time, so
//! the pipeline never holds a second copy of every expert.

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::experts::{ExpertLayout, ExpertMatrix};
use crate::checkpoint::Checkpoint;
use crate::linalg::LinalgBackend;
use crate::Result;

/// A layer's routed experts as the checkpoint stores them (after pruning: the kept ones,
/// numbered `0..n'`).
pub struct LayerExperts<'a> {
    /// Where the experts live and what their matrices are called (the output's numbering).
    pub layout: &'a ExpertLayout,
    /// The checkpoint's layout, which `kept` indexes.
    source: &'a ExpertLayout,
    /// Original index of each expert, when the layer was pruned.
    kept: Option<&'a [usize]>,
    checkpoint: &'a Checkpoint,
}

impl<'a> LayerExperts<'a> {
    /// The experts of `layout` in `checkpoint`, read on the CPU.
    pub fn new(checkpoint: &'a Checkpoint, layout: &'a ExpertLayout) -> Self {
        Self {
            layout,
            source: layout,
            kept: None,
            checkpoint,
        }
    }

    /// The `kept` experts of `source` (original indices), seen as `pruned` (the same names,
    /// `kept.len()` experts numbered `0..n'`).
    pub fn pruned(
        checkpoint: &'a Checkpoint,
        source: &'a ExpertLayout,
        pruned: &'a ExpertLayout,
        kept: &'a [usize],
    ) -> Self {
        Self {
            layout: pruned,
            source,
            kept: Some(kept),
            checkpoint,
        }
    }

    /// The checkpoint's layout of the layer (all original experts).
    pub fn source_layout(&self) -> &ExpertLayout {
        self.source
    }

    /// The original index of `expert`.
    pub fn source_index(&self, expert: usize) -> usize {
        self.kept
            .and_then(|kept| kept.get(expert).copied())
            .unwrap_or(expert)
    }

    /// Original indices of the kept experts, when the layer was pruned.
    pub fn kept(&self) -> Option<&[usize]> {
        self.kept
    }

    /// One expert's `matrix` ([p, d] for gate/up, [d, p] for down) as f32 on the CPU.
    pub fn matrix(&self, expert: usize, matrix: ExpertMatrix) -> Result<Tensor> {
        if expert >= self.layout.num_experts {
            return Err(crate::Error::InvalidArgument(format!(
                "expert {expert} requested from `{}`, which has {} routed experts",
                self.layout.block, self.layout.num_experts
            )));
        }
        self.source.load_dense(
            self.checkpoint,
            self.source_index(expert),
            matrix,
            DType::F32,
            &Device::Cpu,
        )
    }

    /// One expert's `matrix` in the factor stage's orientation, `[p, d]` (the side its group
    /// shares is the columns): gate/up as stored, down transposed (its basis is shared on the
    /// output side, `d`), as f32 on the CPU.
    pub fn oriented(&self, expert: usize, matrix: ExpertMatrix) -> Result<Tensor> {
        let w = self.matrix(expert, matrix)?;
        Ok(match matrix {
            ExpertMatrix::Down => w.t()?.contiguous()?,
            ExpertMatrix::Gate | ExpertMatrix::Up => w,
        })
    }

    /// The group's [`Self::oriented`] matrices stacked row-wise (`k·p × d`) in the backend's
    /// matrix type (for down: `[W_1ᵀ; …; W_kᵀ]`, whose singular values are those of the
    /// side-by-side `[W_1, …, W_k]`).
    pub fn stacked<B: LinalgBackend>(
        &self,
        backend: &B,
        matrix: ExpertMatrix,
        experts: &[usize],
    ) -> Result<B::Matrix> {
        let blocks = self.oriented_blocks(backend, matrix, experts)?;
        backend.stack_rows(&blocks)
    }

    /// The group's [`Self::oriented`] matrices, one backend matrix per member.
    pub fn oriented_blocks<B: LinalgBackend>(
        &self,
        backend: &B,
        matrix: ExpertMatrix,
        experts: &[usize],
    ) -> Result<Vec<B::Matrix>> {
        experts
            .iter()
            .map(|&e| backend.matrix_from_tensor(&self.oriented(e, matrix)?))
            .collect()
    }
}

/// The shape `[rows per expert, shared columns]` of `matrix` in the factor stage's orientation:
/// `[p, d]` for all three (down is handled as its transpose).
pub fn oriented_shape(layout: &ExpertLayout, matrix: ExpertMatrix) -> [usize; 2] {
    match matrix {
        ExpertMatrix::Down => {
            let [d, p] = layout.shape(matrix);
            [p, d]
        }
        ExpertMatrix::Gate | ExpertMatrix::Up => layout.shape(matrix),
    }
}
