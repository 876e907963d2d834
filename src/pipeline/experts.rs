//! Reads one layer's routed-expert matrices straight from the checkpoint, a group at a time, so
//! the pipeline never holds a second copy of every expert.

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::experts::{ExpertLayout, ExpertMatrix};
use crate::checkpoint::{fp8, Checkpoint};
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

    /// The bytes the input stores for original expert `expert`'s `matrix` (with its FP8 scales;
    /// a fused tensor's share of it).
    pub fn source_stored_bytes(&self, expert: usize, matrix: ExpertMatrix) -> Result<u64> {
        let source = self.source;
        let name = match source.is_fused(self.checkpoint, matrix) {
            true => source.fused_name(matrix),
            false => source.dense_name(expert, matrix),
        };
        let mut bytes = 0u64;
        let mut elements = 0u64;
        for tensor in [name.clone(), fp8::scale_name(&name)] {
            if let Some((info, _)) = self.checkpoint.info(&tensor) {
                bytes += (info.data_range.1 - info.data_range.0) as u64;
                if tensor == name {
                    elements = info.numel() as u64;
                }
            }
        }
        let [rows, cols] = source.shape(matrix);
        let share = (rows * cols) as u64;
        if elements == 0 {
            return Err(crate::Error::InvalidArgument(format!(
                "`{name}` is missing or empty: expected expert {expert}'s {matrix} of `{}`",
                source.block
            )));
        }
        // A per-expert tensor is all of it; a fused one holds every expert (and gate with up).
        Ok(bytes * share / elements)
    }

    /// The bytes the input stores for expert `expert`'s `matrix`.
    pub fn stored_bytes(&self, expert: usize, matrix: ExpertMatrix) -> Result<u64> {
        self.source_stored_bytes(self.source_index(expert), matrix)
    }

    /// Expert `expert`'s `matrix` as it is written when kept: a per-expert FP8 weight is copied
    /// as stored with its block scales; anything else is the canonical `[out, in]` view in
    /// `stored_dtype`, under the per-expert name.
    pub fn stored_tensors(
        &self,
        expert: usize,
        matrix: ExpertMatrix,
        stored_dtype: DType,
    ) -> Result<Vec<(String, Tensor)>> {
        let key = self.layout.dense_name(expert, matrix);
        let source = self.source.dense_name(self.source_index(expert), matrix);
        let stored_fp8 = self
            .checkpoint
            .info(&source)
            .is_some_and(|(info, _)| info.dtype.is_fp8());
        if !stored_fp8 {
            return Ok(vec![(
                key,
                self.matrix(expert, matrix)?.to_dtype(stored_dtype)?,
            )]);
        }
        Ok(vec![
            (
                fp8::scale_name(&key),
                self.checkpoint
                    .load_verbatim(&fp8::scale_name(&source), "copy")?,
            ),
            (key, self.checkpoint.load_verbatim(&source, "copy")?),
        ])
    }

    /// Whether the input stores expert `expert`'s `matrix` in FP8 per expert (then it is
    /// copied as stored when kept).
    pub fn is_stored_fp8(&self, expert: usize, matrix: ExpertMatrix) -> bool {
        let source = self.source.dense_name(self.source_index(expert), matrix);
        self.checkpoint
            .info(&source)
            .is_some_and(|(info, _)| info.dtype.is_fp8())
    }

    /// The name of the storage [`Self::stored_tensors`] writes (`fp8` or the float dtype).
    pub fn stored_storage(
        &self,
        expert: usize,
        matrix: ExpertMatrix,
        stored_dtype: DType,
    ) -> String {
        let source = self.source.dense_name(self.source_index(expert), matrix);
        match self.checkpoint.info(&source) {
            Some((info, _)) if info.dtype.is_fp8() => info.dtype.name().to_lowercase(),
            _ => format!("{stored_dtype:?}").to_lowercase(),
        }
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
