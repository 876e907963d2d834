//! A matrix of the routed experts as the runtime holds it: a float tensor, or int8 codes with
//! their row-block scales (`--factor-dtype int8`, docs/FORMAT.md "Int8 factors") kept resident
//! and dequantised to the compute dtype each time the matrix is used, so that int8 storage
//! saves memory as well as disk, or a packed block-format matrix ([`PackedMatrix`]) kept as its
//! blocks.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::packed::{self, PackedInfo};
use super::{int8, Checkpoint};
use crate::error::{Error, Result};
use crate::quant::Scheme;

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
    /// A matrix in a block format, held as its blocks.
    Packed {
        /// The blocks.
        matrix: PackedMatrix,
        /// The compute dtype.
        dtype: DType,
    },
}

/// A packed matrix as the runtime holds it: ggml blocks as a candle quantised tensor (whose
/// matmul kernels read the blocks as they are, on CPU and CUDA), other formats as their bytes
/// on the CPU, dequantised at each use.
#[derive(Clone)]
pub struct PackedMatrix {
    info: PackedInfo,
    blocks: Blocks,
    device: Device,
}

#[derive(Clone)]
enum Blocks {
    Ggml(Arc<QTensor>),
    Bytes(Arc<Vec<u8>>),
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("info", &self.info)
            .field("bytes", &self.resident_bytes())
            .finish()
    }
}

impl PackedMatrix {
    /// The matrix `info` describes from its stored bytes, for computing on `device`.
    pub fn new(info: &PackedInfo, bytes: &[u8], device: &Device) -> Result<Self> {
        let blocks = match info.scheme {
            Scheme::Ggml(kind) => {
                let tensor = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    kind.to_candle(),
                    bytes,
                    vec![info.rows, info.cols],
                    device,
                )?;
                Blocks::Ggml(Arc::new(tensor))
            }
            Scheme::Int(_) => {
                // Validates the bytes once, so that a use never fails on them.
                packed::dequantise(info, bytes)?;
                Blocks::Bytes(Arc::new(bytes.to_vec()))
            }
        };
        let device = match &blocks {
            Blocks::Ggml(_) => device.clone(),
            Blocks::Bytes(_) => Device::Cpu,
        };
        Ok(Self {
            info: info.clone(),
            blocks,
            device,
        })
    }

    /// Whether the runtime can keep this scheme packed on `device` (ggml blocks anywhere; other
    /// formats on the CPU, where they are dequantised per use).
    pub fn stays_packed(scheme: Scheme, device: &Device) -> bool {
        matches!(scheme, Scheme::Ggml(_)) || device.is_cpu()
    }

    /// What the matrix is stored as.
    pub fn info(&self) -> &PackedInfo {
        &self.info
    }

    /// The matrix dequantised to f32 on the device it lives on.
    pub fn dequantise(&self) -> Result<Tensor> {
        match &self.blocks {
            Blocks::Ggml(q) => Ok(q.dequantize(&q.device())?),
            Blocks::Bytes(bytes) => {
                let values = packed::dequantise(&self.info, bytes)?;
                Ok(Tensor::from_vec(
                    values,
                    (self.info.rows, self.info.cols),
                    &Device::Cpu,
                )?)
            }
        }
    }

    /// `x·Wᵀ` for `x` [n, cols] in any float dtype, in that dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        match &self.blocks {
            Blocks::Ggml(q) => {
                let matmul = QMatMul::from_arc(q.clone())?;
                Ok(matmul.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?)
            }
            Blocks::Bytes(_) => {
                let w = self.dequantise()?.to_device(x.device())?.to_dtype(dtype)?;
                Ok(x.matmul(&w.t()?)?)
            }
        }
    }

    /// Bytes held.
    pub fn resident_bytes(&self) -> u64 {
        match &self.blocks {
            Blocks::Ggml(q) => q.storage_size_in_bytes() as u64,
            Blocks::Bytes(bytes) => bytes.len() as u64,
        }
    }

    /// The device it lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }
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
        if let Some((info, bytes)) = checkpoint.packed_bytes(name) {
            if info.shape() != shape {
                return Err(Error::ShapeMismatch {
                    name: info.stored.clone(),
                    path: checkpoint.dir().to_path_buf(),
                    expected: shape.to_vec(),
                    found: info.shape().to_vec(),
                });
            }
            if holding == Int8Holding::Resident && PackedMatrix::stays_packed(info.scheme, device) {
                return Ok(Self::Packed {
                    matrix: PackedMatrix::new(info, bytes, device)?,
                    dtype,
                });
            }
        }
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
            Self::Packed { matrix, dtype } => Ok(matrix.dequantise()?.to_dtype(*dtype)?),
        }
    }

    /// `x·Wᵀ` for `x` [n, in] (packed ggml blocks through candle's quantised matmul, which
    /// quantises `x` to 8 bits per block as llama.cpp does).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Packed { matrix, .. } => matrix.forward(x),
            _ => Ok(x.matmul(&self.matrix()?.t()?)?),
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
            Self::Packed { matrix, .. } => matrix.resident_bytes(),
        }
    }

    /// Size of dimension `dim` of the matrix.
    pub fn dim(&self, dim: usize) -> Result<usize> {
        Ok(match self {
            Self::Dense(t) => t.dim(dim)?,
            Self::Int8 { codes, .. } => codes.dim(dim)?,
            Self::Packed { matrix, .. } => *matrix.info.shape().get(dim).ok_or_else(|| {
                Error::InvalidArgument(format!("a matrix has no dimension {dim}"))
            })?,
        })
    }

    /// The dtype [`Weight::matrix`] returns.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(t) => t.dtype(),
            Self::Int8 { dtype, .. } | Self::Packed { dtype, .. } => *dtype,
        }
    }

    /// The device the matrix lives on.
    pub fn device(&self) -> &Device {
        match self {
            Self::Dense(t) => t.device(),
            Self::Int8 { codes, .. } => codes.device(),
            Self::Packed { matrix, .. } => matrix.device(),
        }
    }

    /// Whether the matrix is held as int8 codes.
    pub fn is_int8(&self) -> bool {
        matches!(self, Self::Int8 { .. })
    }

    /// Whether the matrix is held as packed blocks.
    pub fn is_packed(&self) -> bool {
        matches!(self, Self::Packed { .. })
    }
}
