//! Reads one layer's routed-expert matrices straight from the checkpoint, a group at a time, so
//! the pipeline never holds a second copy of every expert.

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::experts::{ExpertLayout, ExpertMatrix};
use crate::checkpoint::Checkpoint;
use crate::linalg::LinalgBackend;
use crate::Result;

/// A layer's routed experts as the checkpoint stores them.
pub struct LayerExperts<'a> {
    /// Where the experts live and what their matrices are called.
    pub layout: &'a ExpertLayout,
    checkpoint: &'a Checkpoint,
}

impl<'a> LayerExperts<'a> {
    /// The experts of `layout` in `checkpoint`, read on the CPU.
    pub fn new(checkpoint: &'a Checkpoint, layout: &'a ExpertLayout) -> Self {
        Self { layout, checkpoint }
    }

    /// One expert's `matrix` ([p, d] for gate/up, [d, p] for down) as f32 on the CPU.
    pub fn matrix(&self, expert: usize, matrix: ExpertMatrix) -> Result<Tensor> {
        self.layout
            .load_dense(self.checkpoint, expert, matrix, DType::F32, &Device::Cpu)
    }

    /// The group's matrices stacked row-wise (`k·p × d`) in the backend's matrix type.
    pub fn stacked<B: LinalgBackend>(
        &self,
        backend: &B,
        matrix: ExpertMatrix,
        experts: &[usize],
    ) -> Result<B::Matrix> {
        let blocks = experts
            .iter()
            .map(|&e| backend.matrix_from_tensor(&self.matrix(e, matrix)?))
            .collect::<Result<Vec<_>>>()?;
        backend.stack_rows(&blocks)
    }
}
