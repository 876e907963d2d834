//! `int8`: an expert's matrix as int8 codes with one f32 scale per row and 128 columns
//! (round to nearest, symmetric; `checkpoint::int8`, docs/FORMAT.md "Int8 factors"). About 1.03
//! bytes per parameter; its error is estimated from the calibration statistics.

use rayon::prelude::*;

use super::{LayerContext, Method, MethodInputs, Needs};
use crate::checkpoint::int8::{self, Int8Matrix};
use crate::error::{Error, Result};
use crate::linalg::LinalgBackend;
use crate::pipeline::plan::{Candidate, StoredTensors, Unit, UnitOutput};

/// The registry name.
pub const NAME: &str = "int8";

/// One line for help texts.
pub const DESCRIPTION: &str =
    "Store an expert's matrix as int8 codes with one f32 scale per row and 128 columns";

/// The `int8` method.
pub struct Int8;

/// Builds the method.
pub fn create<B: LinalgBackend>(_inputs: &MethodInputs) -> Result<Box<dyn Method<B>>> {
    Ok(Box::new(Int8))
}

/// The method's smallest storage: about 1.03 bytes per parameter.
pub fn smallest_storage(_options: &crate::pipeline::options::CompressOptions) -> Option<f64> {
    Some(1.0 + 4.0 / int8::BLOCK as f64)
}

/// The stored bytes of a `[rows, cols]` matrix in int8 with its scales.
pub fn stored_bytes(rows: usize, cols: usize) -> u64 {
    let [scale_rows, scale_cols] = int8::scale_shape(rows, cols);
    (rows * cols + 4 * scale_rows * scale_cols) as u64
}

impl<B: LinalgBackend> Method<B> for Int8 {
    fn name(&self) -> &'static str {
        NAME
    }

    fn needs(&self) -> Needs {
        Needs {
            expert_statistics: true,
            ..Needs::default()
        }
    }

    fn offer(&self, layer: &LayerContext<B>) -> Result<Vec<Candidate>> {
        let experts = layer.experts;
        let slots: Vec<_> = layer
            .matrices
            .iter()
            .flat_map(|&m| (0..experts.layout.num_experts).map(move |e| (m, e)))
            .collect();
        slots
            .par_iter()
            .map(|&(matrix, expert)| {
                let weights = layer
                    .statistics
                    .error_weights(matrix, expert)
                    .ok_or_else(|| {
                        Error::InvalidArgument("int8 needs the experts' statistics".into())
                    })?;
                let w = experts.matrix(expert, matrix)?;
                let (rows, cols) = w.dims2()?;
                let values = w.flatten_all()?.to_vec1::<f32>()?;
                let q = int8::quantise(&values, rows, cols);
                let back = int8::dequantise(&q.codes, &q.scales, rows, cols);
                let delta: Vec<f32> = back.iter().zip(&values).map(|(a, b)| a - b).collect();
                Ok(Candidate {
                    method: NAME.into(),
                    unit: Unit::Slot { matrix, expert },
                    variant: 0,
                    label: int8::STORAGE_NAME.into(),
                    bytes: stored_bytes(rows, cols),
                    parameters: (rows * cols) as u64,
                    error: weights.error(&delta),
                    signals: None,
                })
            })
            .collect()
    }

    fn apply(&self, layer: &LayerContext<B>, chosen: &[Candidate]) -> Result<Vec<UnitOutput>> {
        let experts = layer.experts;
        chosen
            .par_iter()
            .map(|candidate| {
                let Unit::Slot { matrix, expert } = candidate.unit else {
                    return Err(Error::InvalidArgument(format!(
                        "int8 offers expert matrices, not {:?}",
                        candidate.unit
                    )));
                };
                let w = experts.matrix(expert, matrix)?;
                let quantised = Int8Matrix::from_tensor(&w)?;
                let (codes, scales) = quantised.to_tensors()?;
                let name = experts.layout.dense_name(expert, matrix);
                let mut tensors = StoredTensors::default();
                tensors.insert(int8::scale_name(&name), scales);
                tensors.insert_int8(name, codes);
                let reconstruction = match layer.export_dense {
                    true => {
                        let back = int8::dequantise(
                            &quantised.codes,
                            &quantised.scales,
                            quantised.rows,
                            quantised.cols,
                        );
                        let dense = candle_core::Tensor::from_vec(
                            back,
                            (quantised.rows, quantised.cols),
                            &candle_core::Device::Cpu,
                        )?;
                        vec![dense.to_dtype(layer.stored_dtype)?]
                    }
                    false => Vec::new(),
                };
                Ok(UnitOutput {
                    unit: candidate.unit,
                    tensors,
                    reconstruction,
                    rank: 0,
                    residual_size: 0,
                    storage: int8::STORAGE_NAME.into(),
                    as_stored: false,
                    report: None,
                })
            })
            .collect()
    }
}
