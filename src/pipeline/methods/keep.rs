//! `keep`: an expert's matrix stays as the input stores it (FP8 with its scales, or the
//! checkpoint's float dtype). Exact, and the largest candidate: what the solver falls back to
//! where the budget leaves room.

use super::{LayerContext, Method, MethodInputs};
use crate::error::Result;
use crate::linalg::LinalgBackend;
use crate::pipeline::plan::{Candidate, StoredTensors, Unit, UnitOutput};

/// The registry name.
pub const NAME: &str = "keep";

/// One line for help texts.
pub const DESCRIPTION: &str = "Keep an expert's matrix as the input stores it";

/// The `keep` method.
pub struct Keep;

/// Builds the method.
pub fn create<B: LinalgBackend>(_inputs: &MethodInputs) -> Result<Box<dyn Method<B>>> {
    Ok(Box::new(Keep))
}

impl<B: LinalgBackend> Method<B> for Keep {
    fn name(&self) -> &'static str {
        NAME
    }

    fn stores_floats(&self) -> bool {
        true
    }

    fn keeps_as_stored(&self) -> bool {
        true
    }

    fn offer(&self, layer: &LayerContext<B>) -> Result<Vec<Candidate>> {
        let experts = layer.experts;
        let mut candidates = Vec::new();
        for &matrix in layer.matrices {
            let [rows, cols] = experts.layout.shape(matrix);
            for expert in 0..experts.layout.num_experts {
                candidates.push(Candidate {
                    method: NAME.into(),
                    unit: Unit::Slot { matrix, expert },
                    variant: 0,
                    label: experts.stored_storage(expert, matrix, layer.stored_dtype),
                    bytes: experts.stored_bytes(expert, matrix)?,
                    parameters: (rows * cols) as u64,
                    error: 0.0,
                    signals: None,
                });
            }
        }
        Ok(candidates)
    }

    fn apply(&self, layer: &LayerContext<B>, chosen: &[Candidate]) -> Result<Vec<UnitOutput>> {
        let experts = layer.experts;
        chosen
            .iter()
            .map(|candidate| {
                let Unit::Slot { matrix, expert } = candidate.unit else {
                    return Err(crate::Error::InvalidArgument(format!(
                        "keep offers expert matrices, not {:?}",
                        candidate.unit
                    )));
                };
                let mut tensors = StoredTensors::default();
                for (name, tensor) in experts.stored_tensors(expert, matrix, layer.stored_dtype)? {
                    tensors.insert(name, tensor);
                }
                let reconstruction = match layer.export_dense {
                    true => vec![experts
                        .matrix(expert, matrix)?
                        .to_dtype(layer.stored_dtype)?],
                    false => Vec::new(),
                };
                Ok(UnitOutput {
                    unit: candidate.unit,
                    tensors,
                    reconstruction,
                    rank: 0,
                    residual_size: 0,
                    storage: candidate.label.clone(),
                    as_stored: true,
                    report: None,
                })
            })
            .collect()
    }
}
