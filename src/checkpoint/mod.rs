//! Reading and writing Hugging Face checkpoint directories (`config.json` + safetensors shards).
//!
//! Shards are memory-mapped and every header is validated when the checkpoint is opened, so a
//! truncated file or a header that lies about offsets or dtypes fails early with the file named.
//! Tensors are materialised only when asked for, which is what lets the pipeline hold one layer at
//! a time.

pub mod compressed_tensors;
pub mod experts;
pub mod fp8;
pub mod gguf;
pub mod header;
pub mod int8;
pub mod packed;
pub mod storage;
pub mod weight;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// The file name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The file name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The file name of the model configuration.
pub const CONFIG_FILE: &str = "config.json";

/// Element type of a tensor stored in a safetensors file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDType {
    /// 32-bit float.
    F32,
    /// 16-bit brain float.
    BF16,
    /// 16-bit IEEE float.
    F16,
    /// 64-bit float.
    F64,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 8-bit unsigned integer.
    U8,
    /// 8-bit signed integer (int8 factors, with `_scale` siblings, see [`int8`]).
    I8,
    /// 8-bit float E4M3FN (block-scaled weights, see [`fp8`]).
    F8E4M3,
    /// 8-bit float E5M2 (block-scaled weights, see [`fp8`]).
    F8E5M2,
}

impl StoredDType {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "F32" => Self::F32,
            "BF16" => Self::BF16,
            "F16" => Self::F16,
            "F64" => Self::F64,
            "I64" => Self::I64,
            "I32" => Self::I32,
            "U8" => Self::U8,
            "I8" => Self::I8,
            "F8_E4M3" => Self::F8E4M3,
            "F8_E5M2" => Self::F8E5M2,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            Self::F32 | Self::I32 => 4,
            Self::BF16 | Self::F16 => 2,
            Self::F64 | Self::I64 => 8,
            Self::U8 | Self::I8 | Self::F8E4M3 | Self::F8E5M2 => 1,
        }
    }

    /// The safetensors spelling of this dtype.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::BF16 => "BF16",
            Self::F16 => "F16",
            Self::F64 => "F64",
            Self::I64 => "I64",
            Self::I32 => "I32",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::F8E4M3 => "F8_E4M3",
            Self::F8E5M2 => "F8_E5M2",
        }
    }

    fn candle(self) -> Option<DType> {
        Some(match self {
            Self::F32 => DType::F32,
            Self::BF16 => DType::BF16,
            Self::F16 => DType::F16,
            Self::F64 => DType::F64,
            Self::I64 => DType::I64,
            Self::U8 => DType::U8,
            Self::I32 | Self::I8 | Self::F8E4M3 | Self::F8E5M2 => return None,
        })
    }

    /// Whether this is an FP8 dtype, stored with block scales.
    pub fn is_fp8(self) -> bool {
        fp8::Fp8Format::of(self).is_some()
    }
}

/// Where one tensor lives inside a shard.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Element type on disk.
    pub dtype: StoredDType,
    /// Shape on disk.
    pub shape: Vec<usize>,
    /// Byte range inside the shard's data section.
    pub data_range: (usize, usize),
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One memory-mapped safetensors file with its validated header.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    /// Whether the mapping is anonymous memory, whose pages hold the only copy of its bytes.
    in_memory: bool,
}

impl SafetensorsFile {
    /// Drops this file's mapped pages from the resident set (see [`Checkpoint::release_pages`]);
    /// nothing for an anonymous mapping, whose dropped pages would read back as zeros.
    pub fn release_pages(&self) {
        if self.in_memory {
            return;
        }
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and backed by the file, so MADV_DONTNEED only unmaps
        // clean pages; later reads fault them back in from the file with the same contents.
        unsafe {
            let _ = self
                .mmap
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed);
        }
    }

    /// Memory-maps `path` and validates its header (through the `safetensors` crate, plus
    /// duplicate names) against the file's length.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let metadata = file.metadata().map_err(|e| Error::io(path, e))?;
        if !metadata.is_file() {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                message: "is not a regular file (expected a safetensors file)".into(),
            });
        }
        // SAFETY: the mapping is read-only; we never write through it and the checkpoint files
        // are not expected to change while the process runs.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = header::parse(path, &mmap)?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: header.data_start,
            tensors: header.tensors,
            in_memory: false,
        })
    }

    /// A tensor file assembled in memory or over another file format's mapping: `mmap`'s bytes
    /// from `data_start` on hold `tensors` at their ranges, which the caller has checked lie
    /// inside the mapping. `path` names where the bytes come from in messages.
    pub fn from_parts(
        path: PathBuf,
        mmap: Mmap,
        data_start: usize,
        tensors: BTreeMap<String, TensorInfo>,
    ) -> Result<Self> {
        let available = mmap.len().saturating_sub(data_start);
        if let Some((name, info)) = tensors.iter().find(|(_, info)| {
            info.data_range.0 > info.data_range.1
                || info.data_range.1 > available
                || info.numel() * info.dtype.size_in_bytes()
                    != info.data_range.1 - info.data_range.0
        }) {
            return Err(Error::Safetensors {
                path,
                message: format!(
                    "tensor `{name}` ({:?} {:?}) does not fit its byte range {:?} of {available} \
                     bytes",
                    info.dtype, info.shape, info.data_range
                ),
            });
        }
        Ok(Self {
            path,
            mmap,
            data_start,
            tensors,
            in_memory: false,
        })
    }

    /// Marks the mapping as anonymous memory (`MmapMut::map_anon`), so that
    /// [`Self::release_pages`] leaves it resident.
    pub fn in_memory(mut self) -> Self {
        self.in_memory = true;
        self
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Header entries by tensor name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// Raw bytes of a tensor.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[self.data_start + info.data_range.0..self.data_start + info.data_range.1]
    }

    /// Loads tensor `name` onto `device` (floats converted to `float_dtype`).
    pub fn load(&self, name: &str, float_dtype: DType, device: &Device) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            dir: self.path.clone(),
            expected_by: "caller".into(),
        })?;
        tensor_from_bytes(
            &self.path,
            name,
            info,
            self.bytes(info),
            float_dtype,
            device,
        )
    }
}

fn tensor_from_bytes(
    path: &Path,
    name: &str,
    info: &TensorInfo,
    bytes: &[u8],
    float_dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    check_finite(path, name, info.dtype, bytes)?;
    if info.dtype.is_fp8() {
        return Err(Error::Safetensors {
            path: path.to_path_buf(),
            message: format!(
                "tensor `{name}` is {} and is read only with its block scales `{}` through a checkpoint directory",
                info.dtype.name(),
                fp8::scale_name(name)
            ),
        });
    }
    if info.dtype == StoredDType::I8 {
        return Err(Error::Safetensors {
            path: path.to_path_buf(),
            message: format!(
                "tensor `{name}` is I8 and is read only with its row-block scales `{}` through a checkpoint directory",
                int8::scale_name(name)
            ),
        });
    }
    let tensor = match info.dtype.candle() {
        Some(dtype) => Tensor::from_raw_buffer(bytes, dtype, &info.shape, &Device::Cpu)?,
        None => {
            // I32 has no candle dtype: widen to I64.
            let values: Vec<i64> = bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect();
            Tensor::from_vec(values, info.shape.as_slice(), &Device::Cpu)?
        }
    };
    let tensor = if tensor.dtype().is_float() && tensor.dtype() != float_dtype {
        tensor.to_dtype(float_dtype)?
    } else {
        tensor
    };
    Ok(tensor.to_device(device)?)
}

/// Refuses a floating-point tensor holding NaN or ±Inf, naming the tensor, the file and the first
/// offending element (one pass over the stored bytes, in parallel for large tensors).
pub fn check_finite(path: &Path, name: &str, dtype: StoredDType, bytes: &[u8]) -> Result<()> {
    use rayon::prelude::*;
    if let Some(format) = fp8::Fp8Format::of(dtype) {
        return check_finite_fp8(path, name, format, bytes);
    }
    let width = dtype.size_in_bytes();
    let non_finite = |c: &[u8]| match dtype {
        StoredDType::F32 => !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite(),
        StoredDType::F64 => {
            !f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]).is_finite()
        }
        StoredDType::BF16 => u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80,
        StoredDType::F16 => u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00,
        _ => false,
    };
    if matches!(
        dtype,
        StoredDType::I64 | StoredDType::I32 | StoredDType::U8 | StoredDType::I8
    ) {
        return Ok(());
    }
    let found = if bytes.len() >= 1 << 22 {
        bytes.par_chunks_exact(width).position_first(non_finite)
    } else {
        bytes.chunks_exact(width).position(non_finite)
    };
    let Some(index) = found else {
        return Ok(());
    };
    let chunk = &bytes[index * width..(index + 1) * width];
    let value = match dtype {
        StoredDType::F32 => f64::from(f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])),
        StoredDType::F64 => f64::from_le_bytes(chunk.try_into().unwrap_or([0; 8])),
        StoredDType::BF16 => f64::from(half::bf16::from_le_bytes([chunk[0], chunk[1]])),
        _ => f64::from(half::f16::from_le_bytes([chunk[0], chunk[1]])),
    };
    Err(Error::Safetensors {
        path: path.to_path_buf(),
        message: format!(
            "tensor `{name}` holds {value} at element {index} (expected finite values)"
        ),
    })
}

/// [`check_finite`] for FP8 codes: NaN (and, in E5M2, ±Inf) codes are refused.
fn check_finite_fp8(path: &Path, name: &str, format: fp8::Fp8Format, bytes: &[u8]) -> Result<()> {
    use rayon::prelude::*;
    let non_finite = |&code: &u8| format.is_non_finite(code);
    let found = if bytes.len() >= 1 << 22 {
        bytes.par_iter().position_first(non_finite)
    } else {
        bytes.iter().position(non_finite)
    };
    match found {
        None => Ok(()),
        Some(index) => Err(Error::Safetensors {
            path: path.to_path_buf(),
            message: format!(
                "tensor `{name}` holds {} (code {:#04x}) at element {index} (expected finite values)",
                format.table()[bytes[index] as usize],
                bytes[index]
            ),
        }),
    }
}

/// A model directory as Hugging Face writes it: `config.json` plus one or more safetensors shards.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: serde_json::Value,
    shards: Vec<SafetensorsFile>,
    location: HashMap<String, usize>,
    /// Packed matrices by the name of the matrix they stand for.
    packed: HashMap<String, packed::PackedInfo>,
}

impl Checkpoint {
    /// Opens `dir`, reading `config.json` and validating every shard header (no tensor data is read).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if let Some(file) = gguf_file_of(&dir) {
            return gguf::open(&file, file.parent().unwrap_or(Path::new(".")));
        }
        if !dir.is_dir() {
            return Err(Error::io(
                &dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "model directory does not exist",
                ),
            ));
        }
        let config = read_json(&dir.join(CONFIG_FILE))?;
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (shards, location) = if index_path.exists() {
            open_indexed_shards(&dir, &index_path)?
        } else if single_path.exists() {
            let shard = SafetensorsFile::open(&single_path)?;
            let location = shard.tensors.keys().map(|name| (name.clone(), 0)).collect();
            (vec![shard], location)
        } else {
            return Err(Error::io(
                &dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {SINGLE_FILE} or {INDEX_FILE} in the model directory"),
                ),
            ));
        };
        if compressed_tensors::is_compressed_tensors(&config) {
            return compressed_tensors::open(dir, config, shards, location);
        }
        Self::assemble(dir, config, shards, location)
    }

    /// A checkpoint over tensor files already opened (see [`SafetensorsFile::from_parts`]),
    /// as a reader of another format builds it; `dir` is where its auxiliary files live. A
    /// tensor name may appear in one file only.
    pub fn from_parts(
        dir: PathBuf,
        config: serde_json::Value,
        shards: Vec<SafetensorsFile>,
    ) -> Result<Self> {
        let mut location = HashMap::new();
        for (k, shard) in shards.iter().enumerate() {
            for name in shard.tensors.keys() {
                if let Some(first) = location.insert(name.clone(), k) {
                    return Err(Error::Safetensors {
                        path: shard.path.clone(),
                        message: format!(
                            "tensor `{name}` is also in {}",
                            shards[first].path.display()
                        ),
                    });
                }
            }
        }
        Self::assemble(dir, config, shards, location)
    }

    fn assemble(
        dir: PathBuf,
        config: serde_json::Value,
        shards: Vec<SafetensorsFile>,
        location: HashMap<String, usize>,
    ) -> Result<Self> {
        let packed = packed_matrices(&shards, &location)?;
        Ok(Self {
            dir,
            config,
            shards,
            location,
            packed,
        })
    }

    /// The packed matrix standing for `name` (None when `name` is not stored packed).
    pub fn packed(&self, name: &str) -> Option<&packed::PackedInfo> {
        self.packed.get(name)
    }

    /// The packed matrix standing for `name` and its stored bytes.
    pub fn packed_bytes(&self, name: &str) -> Option<(&packed::PackedInfo, &[u8])> {
        let info = self.packed.get(name)?;
        Some((info, self.raw_bytes(&info.stored)?))
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Path of `config.json`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.location.keys().map(|s| s.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// Whether the checkpoint holds `name` (stored as it is, or packed).
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name) || self.packed.contains_key(name)
    }

    /// Header entry of `name` and the shard file holding it.
    pub fn info(&self, name: &str) -> Option<(&TensorInfo, &Path)> {
        let shard = &self.shards[*self.location.get(name)?];
        Some((&shard.tensors[name], shard.path()))
    }

    /// The shard files of this checkpoint.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path()).collect()
    }

    /// Total bytes of the shard files on disk.
    pub fn bytes_on_disk(&self) -> u64 {
        self.shards.iter().map(|s| s.mmap.len() as u64).sum()
    }

    /// Drops every mapped page of the shards from this process's resident set (they stay in
    /// the page cache and are read back on the next access), so streaming a model larger than
    /// memory keeps resident memory at one layer.
    pub fn release_pages(&self) {
        for shard in &self.shards {
            shard.release_pages();
        }
    }

    /// Loads tensor `name` (floats as `dtype`) onto `device`; `expected_by` names the caller in errors.
    pub fn load(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
        expected_by: &str,
    ) -> Result<Tensor> {
        if let Some((info, bytes)) = self.packed_bytes(name) {
            let values = packed::dequantise(info, bytes)?;
            return Ok(
                Tensor::from_vec(values, (info.rows, info.cols), &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(device)?,
            );
        }
        let shard = self
            .location
            .get(name)
            .map(|&s| &self.shards[s])
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
                expected_by: expected_by.to_string(),
            })?;
        let info = &shard.tensors[name];
        if info.dtype.is_fp8() {
            return self.load_fp8(shard, name, None, dtype, device, expected_by);
        }
        if info.dtype == StoredDType::I8 {
            return self.load_int8(shard, name, dtype, device, expected_by);
        }
        tensor_from_bytes(&shard.path, name, info, shard.bytes(info), dtype, device)
    }

    /// Loads tensor `name` on the CPU in the dtype it is stored in (an FP8 tensor dequantised
    /// with its block scales to bf16).
    pub fn load_stored(&self, name: &str, expected_by: &str) -> Result<Tensor> {
        let dtype = self
            .info(name)
            .map(|(info, _)| match info.dtype.is_fp8() {
                true => fp8::DEQUANTIZED_STORED,
                false => info_float(info),
            })
            .unwrap_or(DType::F32);
        self.load(name, dtype, &Device::Cpu, expected_by)
    }

    /// Loads tensor `name` on the CPU exactly as stored, for copying it into another checkpoint:
    /// an `F8_E4M3` tensor stays FP8 (its scales are a tensor of their own). NaN/Inf are refused.
    pub fn load_verbatim(&self, name: &str, expected_by: &str) -> Result<Tensor> {
        let Some((info, path)) = self.info(name) else {
            return self.load_stored(name, expected_by);
        };
        match info.dtype {
            StoredDType::F8E4M3 => {
                let bytes = self.raw_bytes(name).unwrap_or_default();
                check_finite(path, name, info.dtype, bytes)?;
                Ok(Tensor::from_raw_buffer(
                    bytes,
                    DType::F8E4M3,
                    &info.shape,
                    &Device::Cpu,
                )?)
            }
            StoredDType::F8E5M2 => Err(Error::Safetensors {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{name}` is F8_E5M2, which rfid-moe reads but cannot copy through unchanged (candle has no E5M2 dtype)"
                ),
            }),
            _ => self.load_stored(name, expected_by),
        }
    }

    /// The bytes of tensor `name` as stored in its shard (None if the checkpoint lacks it).
    pub fn raw_bytes(&self, name: &str) -> Option<&[u8]> {
        let shard = &self.shards[*self.location.get(name)?];
        Some(shard.bytes(&shard.tensors[name]))
    }

    /// Whether `name` is the block-scale companion (`*_scale_inv`) of an FP8 tensor of this
    /// checkpoint: part of that tensor's storage, not parameters of their own.
    pub fn is_fp8_scale(&self, name: &str) -> bool {
        name.strip_suffix(fp8::SCALE_SUFFIX)
            .and_then(|weight| self.info(weight))
            .is_some_and(|(info, _)| info.dtype.is_fp8())
    }

    /// Whether `name` is the row-block scales (`*_scale`) of an int8 tensor of this checkpoint.
    pub fn is_int8_scale(&self, name: &str) -> bool {
        name.strip_suffix(int8::SCALE_SUFFIX)
            .and_then(|tensor| self.info(tensor))
            .is_some_and(|(info, _)| info.dtype == StoredDType::I8)
    }

    /// Whether `name` holds the scales of a quantised tensor (FP8 block scales or int8 row-block
    /// scales): part of that tensor's storage, not parameters of their own.
    pub fn is_quantisation_scale(&self, name: &str) -> bool {
        self.is_fp8_scale(name) || self.is_int8_scale(name)
    }

    /// Dequantises int8 tensor `name` [rows, cols] with its scales `{name}_scale`
    /// [rows, ⌈cols/128⌉] (F32) to `dtype` on `device`.
    fn load_int8(
        &self,
        shard: &SafetensorsFile,
        name: &str,
        dtype: DType,
        device: &Device,
        expected_by: &str,
    ) -> Result<Tensor> {
        let ([rows, cols], scales) = self.int8_scales(shard, name, expected_by)?;
        let scales = scales.flatten_all()?.to_vec1::<f32>()?;
        let codes = int8::codes_from_bytes(shard.bytes(&shard.tensors[name]));
        let values = int8::dequantise(&codes, &scales, rows, cols);
        Ok(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }

    /// Whether `name` is stored as int8 codes (`I8`, with a `{name}_scale` sibling).
    pub fn is_int8(&self, name: &str) -> bool {
        self.info(name)
            .is_some_and(|(info, _)| info.dtype == StoredDType::I8)
    }

    /// Loads int8 tensor `name` [rows, cols] without dequantising it: its codes as a `U8` tensor
    /// of offset codes `code + 128` ([`int8::offset_codes`]) and its scales `{name}_scale` as
    /// `F32` [rows, ⌈cols/128⌉], both on `device` (checked as [`Checkpoint::load`] checks them;
    /// [`int8::dequantise_tensor`] gives what `load` would). An error if `name` is not `I8`.
    pub fn load_int8_codes(
        &self,
        name: &str,
        device: &Device,
        expected_by: &str,
    ) -> Result<(Tensor, Tensor)> {
        let (info, path) = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
            expected_by: expected_by.to_string(),
        })?;
        if info.dtype != StoredDType::I8 {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{name}` is {}, not I8 int8 codes (needed by {expected_by})",
                    info.dtype.name()
                ),
            });
        }
        let shard = &self.shards[self.location[name]];
        let ([rows, cols], scales) = self.int8_scales(shard, name, expected_by)?;
        let codes = int8::offset_codes(shard.bytes(info));
        Ok((
            Tensor::from_vec(codes, (rows, cols), &Device::Cpu)?.to_device(device)?,
            scales.to_device(device)?,
        ))
    }

    /// The shape [rows, cols] of int8 tensor `name` in `shard` and its row-block scales
    /// `{name}_scale` (F32 [rows, ⌈cols/128⌉], on the CPU), after checking that the tensor is a
    /// matrix and that the scales exist with that dtype and shape.
    fn int8_scales(
        &self,
        shard: &SafetensorsFile,
        name: &str,
        expected_by: &str,
    ) -> Result<([usize; 2], Tensor)> {
        let info = &shard.tensors[name];
        let &[rows, cols] = info.shape.as_slice() else {
            return Err(Error::Safetensors {
                path: shard.path.clone(),
                message: format!(
                    "I8 tensor `{name}` has shape {:?} (expected a matrix [rows, cols], the only int8 storage rfid-moe writes)",
                    info.shape
                ),
            });
        };
        let scale_name = int8::scale_name(name);
        let Some((scale_info, scale_path)) = self.info(&scale_name) else {
            return Err(Error::MissingTensor {
                name: scale_name,
                dir: self.dir.clone(),
                expected_by: format!(
                    "I8 tensor `{name}` in {} as its row-block scales (F32 {:?}; needed by {expected_by})",
                    shard.path.display(),
                    int8::scale_shape(rows, cols)
                ),
            });
        };
        let expected = int8::scale_shape(rows, cols);
        if scale_info.shape != expected || scale_info.dtype != StoredDType::F32 {
            return Err(Error::Safetensors {
                path: scale_path.to_path_buf(),
                message: format!(
                    "row-block scales `{scale_name}` are {} {:?}, but I8 tensor `{name}` of shape {:?} in blocks of {} columns needs F32 {expected:?}",
                    scale_info.dtype.name(),
                    scale_info.shape,
                    info.shape,
                    int8::BLOCK
                ),
            });
        }
        let scales = self.load(
            &scale_name,
            DType::F32,
            &Device::Cpu,
            &format!("I8 tensor `{name}`"),
        )?;
        let values = scales.flatten_all()?.to_vec1::<f32>()?;
        if let Some((index, value)) = int8::first_bad_scale(&values) {
            let blocks = expected[1].max(1);
            return Err(Error::Safetensors {
                path: scale_path.to_path_buf(),
                message: format!(
                    "row-block scales `{scale_name}` of I8 tensor `{name}` hold {value} at row {}, \
                     block {} (expected positive scales `absmax / 127` of at most {:e})",
                    index / blocks,
                    index % blocks,
                    int8::MAX_SCALE
                ),
            });
        }
        Ok(([rows, cols], scales))
    }

    /// Dequantises FP8 tensor `name` (or its entry `entry` along the first dimension) with its
    /// block scales `{name}_scale_inv`, to `dtype` on `device`; the scales' shape is checked
    /// against `quantization_config.weight_block_size`.
    fn load_fp8(
        &self,
        shard: &SafetensorsFile,
        name: &str,
        entry: Option<usize>,
        dtype: DType,
        device: &Device,
        expected_by: &str,
    ) -> Result<Tensor> {
        let info = &shard.tensors[name];
        let format = fp8::Fp8Format::of(info.dtype).ok_or_else(|| {
            Error::InvalidArgument(format!("tensor `{name}` is not an FP8 tensor"))
        })?;
        let needed_rank = if entry.is_some() { 3 } else { 2 };
        if info.shape.len() < needed_rank {
            return Err(Error::Safetensors {
                path: shard.path.clone(),
                message: format!(
                    "FP8 tensor `{name}` has shape {:?}: block-scaled FP8 needs a matrix{}",
                    info.shape,
                    if entry.is_some() {
                        " per expert, i.e. a [experts, out, in] stack"
                    } else {
                        ""
                    }
                ),
            });
        }
        let scales = self.fp8_scales(shard, name, expected_by)?;
        let (shape, begin, end) = match entry {
            None => (info.shape.clone(), info.data_range.0, info.data_range.1),
            Some(index) => {
                let width = (info.data_range.1 - info.data_range.0) / info.shape[0].max(1);
                let begin = info.data_range.0 + index * width;
                (info.shape[1..].to_vec(), begin, begin + width)
            }
        };
        let codes = &shard.mmap[shard.data_start + begin..shard.data_start + end];
        check_finite(&shard.path, name, info.dtype, codes)?;
        let block = scales.block;
        let scales = match entry {
            None => &scales.values[..],
            Some(index) => {
                let per_entry = scales.values.len() / info.shape[0].max(1);
                &scales.values[index * per_entry..(index + 1) * per_entry]
            }
        };
        let [rows, cols] = [shape[shape.len() - 2], shape[shape.len() - 1]];
        let values = fp8::dequantize(format, codes, [rows, cols], scales, block);
        Ok(Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }

    /// The block scales of FP8 tensor `name` as f32, after checking that they exist, are floats
    /// and have the shape the tensor and the block size imply.
    fn fp8_scales(
        &self,
        shard: &SafetensorsFile,
        name: &str,
        expected_by: &str,
    ) -> Result<BlockScales> {
        let info = &shard.tensors[name];
        let block = fp8::block_size(&self.config).map_err(|message| Error::Config {
            path: self.config_path(),
            message: format!("{message}; needed to read FP8 tensor `{name}`"),
        })?;
        let scale_name = fp8::scale_name(name);
        let Some((scale_info, scale_path)) = self.info(&scale_name) else {
            return Err(Error::MissingTensor {
                name: scale_name,
                dir: self.dir.clone(),
                expected_by: format!(
                    "{} tensor `{name}` as its block scales (needed by {expected_by})",
                    info.dtype.name()
                ),
            });
        };
        let expected = fp8::scale_shape(&info.shape, block).ok_or_else(|| Error::Safetensors {
            path: shard.path.clone(),
            message: format!(
                "FP8 tensor `{name}` has shape {:?} (expected a matrix or a stack of matrices, to which block scales apply)",
                info.shape
            ),
        })?;
        let is_float = matches!(
            scale_info.dtype,
            StoredDType::F32 | StoredDType::BF16 | StoredDType::F16 | StoredDType::F64
        );
        if scale_info.shape != expected || !is_float {
            return Err(Error::Safetensors {
                path: scale_path.to_path_buf(),
                message: format!(
                    "block scales `{scale_name}` are {} {:?}, but FP8 tensor `{name}` of shape {:?} in blocks of {block:?} (quantization_config.weight_block_size) needs F32 or BF16 {expected:?}",
                    scale_info.dtype.name(),
                    scale_info.shape,
                    info.shape
                ),
            });
        }
        let scales = self.load(
            &scale_name,
            DType::F32,
            &Device::Cpu,
            &format!("FP8 tensor `{name}`"),
        )?;
        Ok(BlockScales {
            values: scales.flatten_all()?.to_vec1::<f32>()?,
            block,
        })
    }

    /// Like [`Checkpoint::load`], but first checks the shape against `expected` (from the config).
    pub fn load_shaped(
        &self,
        name: &str,
        expected: &[usize],
        dtype: DType,
        device: &Device,
        expected_by: &str,
    ) -> Result<Tensor> {
        if let Some(packed) = self.packed(name) {
            if packed.shape() != expected {
                return Err(Error::ShapeMismatch {
                    name: packed.stored.clone(),
                    path: self
                        .info(&packed.stored)
                        .map_or_else(|| self.dir.clone(), |(_, p)| p.to_path_buf()),
                    expected: expected.to_vec(),
                    found: packed.shape().to_vec(),
                });
            }
        } else if let Some((info, path)) = self.info(name) {
            if info.shape != expected {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    path: path.to_path_buf(),
                    expected: expected.to_vec(),
                    found: info.shape.clone(),
                });
            }
        }
        self.load(name, dtype, device, expected_by)
    }

    /// Loads entry `index` along the first dimension of `name` (whose full shape must be
    /// `expected`), reading only that entry's bytes: one expert of a fused 3-D expert tensor.
    pub fn load_index(
        &self,
        name: &str,
        expected: &[usize],
        index: usize,
        dtype: DType,
        device: &Device,
        expected_by: &str,
    ) -> Result<Tensor> {
        let (info, path) = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
            expected_by: expected_by.to_string(),
        })?;
        if info.shape != expected || expected.is_empty() {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                path: path.to_path_buf(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        if index >= expected[0] {
            return Err(Error::InvalidArgument(format!(
                "entry {index} of `{name}` in {}: the first dimension has {} entries",
                path.display(),
                expected[0]
            )));
        }
        let shard = &self.shards[self.location[name]];
        if info.dtype.is_fp8() {
            return self.load_fp8(shard, name, Some(index), dtype, device, expected_by);
        }
        if info.dtype == StoredDType::I8 {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                message: format!(
                    "I8 tensor `{name}` has shape {:?}: int8 storage is read per matrix, not as a stack of experts",
                    info.shape
                ),
            });
        }
        let entry_bytes = (info.data_range.1 - info.data_range.0) / expected[0];
        let begin = info.data_range.0 + index * entry_bytes;
        let entry = TensorInfo {
            dtype: info.dtype,
            shape: expected[1..].to_vec(),
            data_range: (begin, begin + entry_bytes),
        };
        tensor_from_bytes(path, name, &entry, shard.bytes(&entry), dtype, device)
    }

    /// The dtype most floating-point tensors are stored in (int8 factors, which stand for
    /// floats of the compute dtype, are not counted).
    pub fn dominant_dtype(&self) -> StoredDType {
        let mut counts: HashMap<&'static str, (usize, StoredDType)> = HashMap::new();
        for shard in &self.shards {
            for info in shard
                .tensors
                .values()
                .filter(|i| i.dtype != StoredDType::I8)
            {
                let entry = counts.entry(info.dtype.name()).or_insert((0, info.dtype));
                entry.0 += info.numel();
            }
        }
        counts
            .into_values()
            .max_by_key(|(n, _)| *n)
            .map(|(_, d)| d)
            .unwrap_or(StoredDType::F32)
    }
}

/// The block scales of one FP8 tensor, as f32 in stored order, with the block size they cover.
struct BlockScales {
    values: Vec<f32>,
    block: [usize; 2],
}

/// Shards and tensor locations of a sharded checkpoint: every `weight_map` entry must name a file
/// inside `dir` that holds the tensor, and a tensor stored in several shards must be listed.
/// The packed matrices among the stored tensors, by the name of the matrix each stands for.
/// The GGUF file to read for `path`: `path` itself when it is one, or the
/// [`gguf::names::GGUF_FILE`] of a directory without `config.json`.
fn gguf_file_of(path: &Path) -> Option<PathBuf> {
    if path.is_file() && gguf::is_gguf(path) {
        return Some(path.to_path_buf());
    }
    let inside = path.join(gguf::names::GGUF_FILE);
    (!path.join(CONFIG_FILE).exists() && inside.is_file()).then_some(inside)
}

fn packed_matrices(
    shards: &[SafetensorsFile],
    location: &HashMap<String, usize>,
) -> Result<HashMap<String, packed::PackedInfo>> {
    let mut packed = HashMap::new();
    for (stored, &shard) in location {
        let Some((name, scheme)) = packed::parse_packed_name(stored) else {
            continue;
        };
        let shard = &shards[shard];
        let info = &shard.tensors[stored];
        let bad = |message: String| Error::Safetensors {
            path: shard.path.clone(),
            message,
        };
        if info.dtype != StoredDType::U8 {
            return Err(bad(format!(
                "tensor `{stored}` is named as a {scheme} matrix but is {}, not U8 blocks",
                info.dtype.name()
            )));
        }
        let matrix = packed::PackedInfo::new(stored, scheme, &info.shape).map_err(bad)?;
        if location.contains_key(name) {
            return Err(bad(format!(
                "`{name}` is stored both as it is and packed as `{stored}`"
            )));
        }
        if let Some(other) = packed.insert(name.to_string(), matrix) {
            return Err(bad(format!(
                "`{name}` is packed twice: `{}` and `{stored}`",
                other.stored
            )));
        }
    }
    Ok(packed)
}

fn open_indexed_shards(
    dir: &Path,
    index_path: &Path,
) -> Result<(Vec<SafetensorsFile>, HashMap<String, usize>)> {
    let weight_map = index_weight_map(index_path)?;
    let mut shards: Vec<SafetensorsFile> = Vec::new();
    let mut shard_of_file: HashMap<&str, usize> = HashMap::new();
    let mut location = HashMap::new();
    for (name, file) in &weight_map {
        let file = file.as_str().ok_or_else(|| Error::Json {
            path: index_path.to_path_buf(),
            message: format!("weight_map entry `{name}` is not a file name"),
        })?;
        let shard = match shard_of_file.get(file) {
            Some(&shard) => shard,
            None => {
                let what = format!("weight_map entry for tensor `{name}`");
                let path = crate::safety::confined_file(dir, file, index_path, &what)?;
                if !path.exists() {
                    return Err(Error::Safetensors {
                        path,
                        message: format!("shard listed in {INDEX_FILE} is missing"),
                    });
                }
                shards.push(SafetensorsFile::open(&path)?);
                shard_of_file.insert(file, shards.len() - 1);
                shards.len() - 1
            }
        };
        if !shards[shard].tensors.contains_key(name) {
            return Err(Error::Safetensors {
                path: shards[shard].path.clone(),
                message: format!(
                    "tensor `{name}` is listed in {INDEX_FILE} for this shard but the shard does not contain it"
                ),
            });
        }
        location.insert(name.clone(), shard);
    }
    refuse_ambiguous_tensors(&shards, &location, index_path)?;
    Ok((shards, location))
}

/// Refuses a tensor that several shards hold when the index does not say which one to use.
fn refuse_ambiguous_tensors(
    shards: &[SafetensorsFile],
    location: &HashMap<String, usize>,
    index_path: &Path,
) -> Result<()> {
    let mut holder: HashMap<&str, usize> = HashMap::new();
    for (k, shard) in shards.iter().enumerate() {
        for name in shard.tensors.keys() {
            if let Some(&first) = holder.get(name.as_str()) {
                if !location.contains_key(name) {
                    return Err(Error::Safetensors {
                        path: index_path.to_path_buf(),
                        message: format!(
                            "tensor `{name}` is stored in both {} and {} and the index does not say which to use (expected one weight_map entry for it)",
                            shards[first].path.display(),
                            shard.path.display()
                        ),
                    });
                }
            } else {
                holder.insert(name, k);
            }
        }
    }
    Ok(())
}

/// Reads and parses a JSON file, naming it in errors.
/// The `weight_map` object (tensor name → shard file) of a `model.safetensors.index.json`.
pub(crate) fn index_weight_map(
    index_path: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    match read_json(index_path)?
        .get_mut("weight_map")
        .map(serde_json::Value::take)
    {
        Some(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(Error::Json {
            path: index_path.to_path_buf(),
            message: "missing object `weight_map`".into(),
        }),
    }
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        crate::safety::read_text_bounded(path, crate::safety::MAX_JSON_BYTES, "a UTF-8 JSON file")?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })
}

/// Loads every tensor of a single safetensors file (used for small files such as token batches).
pub fn load_all(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = SafetensorsFile::open(path)?;
    let mut out = HashMap::new();
    for name in file.tensors.keys() {
        let info = &file.tensors[name];
        let tensor =
            tensor_from_bytes(path, name, info, file.bytes(info), info_float(info), device)?;
        out.insert(name.clone(), tensor);
    }
    Ok(out)
}

fn info_float(info: &TensorInfo) -> DType {
    info.dtype
        .candle()
        .filter(|d| d.is_float())
        .unwrap_or(DType::F32)
}
