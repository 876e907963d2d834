//! GPTQ (STUB: interface only; being written).

use super::Scheme;
use crate::error::Result;

/// GPTQ's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqOptions {
    /// Columns per lazy-update block.
    pub block: usize,
    /// Damping added to the Hessian's diagonal, relative to its mean.
    pub damp: f64,
    /// Quantise columns in descending order of the Hessian's diagonal.
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self {
            block: 128,
            damp: 0.01,
            act_order: false,
        }
    }
}

/// A matrix quantised to a scheme.
#[derive(Debug, Clone)]
pub struct Quantised {
    /// The scheme.
    pub scheme: Scheme,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows · scheme.row_bytes(cols)` stored bytes.
    pub bytes: Vec<u8>,
    /// The dequantised matrix, row-major.
    pub dequantised: Vec<f32>,
    /// Per row, `Δw·H·Δwᵀ` under the Hessian used (damping included).
    pub row_loss: Vec<f64>,
}

/// Quantises `w` [rows, cols] (row-major) with GPTQ under `hessian` [cols, cols] (row-major,
/// symmetric positive semi-definite: Σ x xᵀ of the calibration inputs).
pub fn gptq(
    _w: &[f32],
    _rows: usize,
    _cols: usize,
    _hessian: &[f64],
    _scheme: Scheme,
    _options: &GptqOptions,
) -> Result<Quantised> {
    unimplemented!("gptq stub")
}
