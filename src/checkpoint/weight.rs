//! A matrix of the routed experts as the runtime holds it: a float tensor, or int8 codes with
//! their row-block scales (`--factor-dtype int8`, docs/FORMAT.md "Int8 factors") kept resident
//! and dequantised to the compute dtype each time the matrix is used, so that int8 storage
//! saves memory as well as disk.

use candle_core::{DType, Device, Tensor};

use super::{int8, Checkpoint};
use crate::error::{Error, Result};

/// How int8-stored expert tensors are held once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Int8Holding {
    /// Codes and scales stay resident; the matrix is dequantised at each use.
    #[default]
    Resident,
    /// Dequantised to the compute dtype at load ([`Checkpoint::load`]), as float weights are.
    Dequantised,
}

/// One matrix of the routed experts, dense or int8.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A float tensor, used as it is.
    Dense(Tensor),
    /// Int8 codes with per-row scales of 128-column blocks.
    Int8 {
        /// Offset codes `code + 128`, `U8` [rows, cols] ([`int8::offset_codes`]).
        codes: Tensor,
        /// Scales, `F32` [rows, ⌈cols/128⌉].
        scales: Tensor,
        /// The compute dtype the matrix is dequantised to.
        dtype: DType,
    },
}

impl From<Tensor> for Weight {
    fn from(tensor: Tensor) -> Self {
        Self::Dense(tensor)
    }
}

impl Weight {
    /// Loads matrix `name` (whose shape must be `shape`) for computing in `dtype` on `device`:
    /// an `I8` tensor as [`Weight::Int8`] when `holding` keeps it resident, anything else
    /// through [`Checkpoint::load_shaped`] (which dequantises int8).
    pub fn load(
        checkpoint: &Checkpoint,
        name: &str,
        shape: &[usize],
        (dtype, device): (DType, &Device),
        holding: Int8Holding,
        expected_by: &str,
    ) -> Result<Self> {
        if holding == Int8Holding::Dequantised || !checkpoint.is_int8(name) {
            return Ok(Self::Dense(checkpoint.load_shaped(
                name,
                shape,
                dtype,
                device,
                expected_by,
            )?));
        }
        if let Some((info, path)) = checkpoint.info(name) {
            if info.shape != shape {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    path: path.to_path_buf(),
                    expected: shape.to_vec(),
                    found: info.shape.clone(),
                });
            }
        }
        let (codes, scales) = checkpoint.load_int8_codes(name, device, expected_by)?;
        Ok(Self::Int8 {
            codes,
            scales,
            dtype,
        })
    }

    /// The matrix in the compute dtype: the tensor itself, or the int8 codes dequantised (bit
    /// for bit what [`Checkpoint::load`] gives).
    pub fn matrix(&self) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Int8 {
                codes,
                scales,
                dtype,
            } => int8::dequantise_tensor(codes, scales, *dtype),
        }
    }

    /// This matrix with int8 codes dequantised once: always [`Weight::Dense`].
    pub fn dequantised(&self) -> Result<Self> {
        Ok(Self::Dense(self.matrix()?))
    }

    /// Bytes the tensors of this matrix hold (codes and scales for int8).
    pub fn resident_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        match self {
            Self::Dense(t) => bytes(t),
            Self::Int8 { codes, scales, .. } => bytes(codes) + bytes(scales),
        }
    }

    /// Size of dimension `dim` of the matrix.
    pub fn dim(&self, dim: usize) -> Result<usize> {
        Ok(match self {
            Self::Dense(t) => t.dim(dim)?,
            Self::Int8 { codes, .. } => codes.dim(dim)?,
        })
    }

    /// The dtype [`Weight::matrix`] returns.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(t) => t.dtype(),
            Self::Int8 { dtype, .. } => *dtype,
        }
    }

    /// The device the matrix lives on.
    pub fn device(&self) -> &Device {
        match self {
            Self::Dense(t) => t.device(),
            Self::Int8 { codes, .. } => codes.device(),
        }
    }

    /// Whether the matrix is held as int8 codes.
    pub fn is_int8(&self) -> bool {
        matches!(self, Self::Int8 { .. })
    }
}
