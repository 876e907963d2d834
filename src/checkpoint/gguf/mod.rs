//! Reading a GGUF that rfid-moe wrote (`export::gguf`) back as a checkpoint under Hugging Face
//! names, so `logits`, `eval` and `generate` run it: float tensors and ggml-block experts are
//! read in place from the file's mapping (each expert a slice of its layer's stack, blocks
//! as the packed matrices the runtime already runs); the few tensors llama.cpp's layout
//! rearranges (Mixtral's query/key rows, DeepSeek's split `kv_b_proj`) are rebuilt in memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use memmap2::{Mmap, MmapMut};

pub mod encode;
pub mod names;

use self::encode::TensorType;
use self::names::{unpermute_rows, CONFIG_KEY};
use super::packed::packed_name;
use super::{Checkpoint, SafetensorsFile, StoredDType, TensorInfo};
use crate::error::{Error, Result};
use crate::quant::Scheme;

fn invalid(path: &Path, message: String) -> Error {
    Error::InvalidInput {
        path: path.to_path_buf(),
        message,
    }
}

/// The tensor type of a candle-parsed GGUF tensor.
fn tensor_type(dtype: GgmlDType) -> Option<TensorType> {
    TensorType::from_id(match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::BF16 => 30,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        _ => return None,
    })
}

/// One tensor of the file: its type, PyTorch-order shape and absolute byte range.
struct Stored {
    kind: TensorType,
    shape: Vec<usize>,
    start: usize,
    bytes: usize,
}

/// Tensors being gathered for the checkpoint: slices of the file, and rebuilt ones.
#[derive(Default)]
struct Gathered {
    in_file: BTreeMap<String, TensorInfo>,
    rebuilt: Vec<(String, Tensor)>,
}

impl Gathered {
    fn slice(
        &mut self,
        name: String,
        kind: TensorType,
        shape: Vec<usize>,
        start: usize,
        bytes: usize,
    ) {
        let (name, dtype, shape) = match kind {
            TensorType::F32 => (name, StoredDType::F32, shape),
            TensorType::F16 => (name, StoredDType::F16, shape),
            TensorType::BF16 => (name, StoredDType::BF16, shape),
            TensorType::Block(k) => {
                let rows: usize = shape[..shape.len() - 1].iter().product();
                (
                    packed_name(&name, Scheme::Ggml(k)),
                    StoredDType::U8,
                    vec![rows, bytes / rows.max(1)],
                )
            }
        };
        self.in_file.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                data_range: (start, start + bytes),
            },
        );
    }
}

/// Opens the GGUF file `path` as a checkpoint whose auxiliary files (tokenizer) are in `dir`.
pub fn open(path: &Path, dir: &Path) -> Result<Checkpoint> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only mapping of a file the process does not modify (as for safetensors).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut std::io::Cursor::new(&mmap[..]))
        .map_err(|e| invalid(path, format!("not a readable GGUF file: {e}")))?;
    let config_text = content
        .metadata
        .get(CONFIG_KEY)
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| {
            invalid(
                path,
                format!(
                    "has no `{CONFIG_KEY}`: rfid-moe reads the GGUF files it writes (compress \
                     --format gguf), not GGUF files from other converters"
                ),
            )
        })?;
    let config: serde_json::Value = serde_json::from_str(config_text)
        .map_err(|e| invalid(path, format!("`{CONFIG_KEY}` is not JSON: {e}")))?;
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .map(|t| t.trim_start_matches("rfid_moe_").to_string())
        .unwrap_or_default();
    let naming = Naming {
        mixtral: model_type == "mixtral",
        deepseek: model_type.starts_with("deepseek"),
    };
    let mut gathered = Gathered::default();
    let mut kv_b: BTreeMap<usize, [Option<Tensor>; 2]> = BTreeMap::new();
    for (name, info) in &content.tensor_infos {
        let kind = tensor_type(info.ggml_dtype).ok_or_else(|| {
            invalid(
                path,
                format!(
                    "tensor `{name}` has type {:?}, which rfid-moe does not read",
                    info.ggml_dtype
                ),
            )
        })?;
        let shape = info.shape.dims().to_vec();
        let cols = *shape.last().unwrap_or(&1);
        let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
        let bytes = kind.row_bytes(cols) * rows;
        let start = content.tensor_data_offset as usize + info.offset as usize;
        if start + bytes > mmap.len() {
            return Err(invalid(
                path,
                format!("tensor `{name}` ends past the end of the file"),
            ));
        }
        let stored = Stored {
            kind,
            shape,
            start,
            bytes,
        };
        place(
            path,
            &mmap,
            &config,
            naming,
            name,
            stored,
            &mut gathered,
            &mut kv_b,
        )?;
    }
    for (layer, parts) in kv_b {
        let [Some(k), Some(v)] = parts else {
            return Err(invalid(
                path,
                format!("layer {layer} has one of attn_k_b / attn_v_b without the other"),
            ));
        };
        // k_b [heads, lora, nope] back to [heads, nope, lora]; join with v_b [heads, v, lora].
        let joined = Tensor::cat(&[k.transpose(1, 2)?, v], 1)?;
        let (heads, per_head, lora) = joined.dims3()?;
        gathered.rebuilt.push((
            format!("model.layers.{layer}.{}", names::KV_B_PROJ),
            joined.reshape((heads * per_head, lora))?,
        ));
    }
    let mut shards = vec![SafetensorsFile::from_parts(
        path.to_path_buf(),
        mmap,
        0,
        gathered.in_file,
    )?];
    if !gathered.rebuilt.is_empty() {
        shards.push(rebuilt_file(path, gathered.rebuilt)?);
    }
    Checkpoint::from_parts(dir.to_path_buf(), config, shards)
}

#[allow(clippy::too_many_arguments)]
fn place(
    path: &Path,
    mmap: &Mmap,
    config: &serde_json::Value,
    naming: Naming,
    name: &str,
    stored: Stored,
    gathered: &mut Gathered,
    kv_b: &mut BTreeMap<usize, [Option<Tensor>; 2]>,
) -> Result<()> {
    let Stored {
        kind,
        shape,
        start,
        bytes,
    } = stored;
    if let Some((layer, matrix)) = expert_stack(name) {
        let (block, names) = match naming.mixtral {
            true => ("block_sparse_moe", ["w1", "w3", "w2"]),
            false => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        };
        let &[experts, rows, cols] = shape.as_slice() else {
            return Err(invalid(
                path,
                format!("tensor `{name}` has shape {shape:?}; expected [experts, rows, cols]"),
            ));
        };
        let each = bytes / experts.max(1);
        for e in 0..experts {
            let hf = format!(
                "model.layers.{layer}.{block}.experts.{e}.{}.weight",
                names[matrix]
            );
            gathered.slice(hf, kind, vec![rows, cols], start + e * each, each);
        }
        return Ok(());
    }
    let float = || -> Result<Tensor> { read_f32(path, mmap, name, kind, &shape, start, bytes) };
    let hf = hf_tensor_name(naming, name).ok_or_else(|| {
        invalid(
            path,
            format!("tensor `{name}` is not one rfid-moe maps to a Hugging Face name"),
        )
    })?;
    if let Some((layer, key)) = kv_b_part(name) {
        kv_b.entry(layer).or_default()[usize::from(!key)] = Some(float()?);
        return Ok(());
    }
    let heads = |key: &str| config.get(key).and_then(|v| v.as_u64()).map(|v| v as usize);
    let permuted = match naming.mixtral {
        true if hf.ends_with("self_attn.q_proj.weight") => heads("num_attention_heads"),
        true if hf.ends_with("self_attn.k_proj.weight") => {
            heads("num_key_value_heads").or_else(|| heads("num_attention_heads"))
        }
        _ => None,
    };
    match (permuted, kind) {
        (Some(h), _) => gathered.rebuilt.push((hf, unpermute_rows(&float()?, h)?)),
        (None, TensorType::Block(_)) => gathered.rebuilt.push((hf, float()?)),
        (None, _) => gathered.slice(hf, kind, shape, start, bytes),
    }
    Ok(())
}

/// `blk.N.ffn_{gate,up,down}_exps.weight` → (N, matrix index gate 0 / up 1 / down 2).
fn expert_stack(name: &str) -> Option<(usize, usize)> {
    let (layer, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    let matrix = [
        "ffn_gate_exps.weight",
        "ffn_up_exps.weight",
        "ffn_down_exps.weight",
    ]
    .iter()
    .position(|m| *m == rest)?;
    Some((layer.parse().ok()?, matrix))
}

/// `blk.N.attn_k_b.weight` → (N, true); `attn_v_b` → (N, false).
fn kv_b_part(name: &str) -> Option<(usize, bool)> {
    let (layer, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    let key = match rest {
        "attn_k_b.weight" => true,
        "attn_v_b.weight" => false,
        _ => return None,
    };
    Some((layer.parse().ok()?, key))
}

/// Where a family's Hugging Face names differ from the others' for the same GGUF tensor.
#[derive(Debug, Clone, Copy)]
struct Naming {
    /// Mixtral: experts and router under `block_sparse_moe`, experts' matrices `w1`/`w3`/`w2`.
    mixtral: bool,
    /// DeepSeek: `shared_experts` (Qwen2-MoE says `shared_expert`).
    deepseek: bool,
}

/// The Hugging Face name of a GGUF tensor in the family `naming` describes.
fn hf_tensor_name(naming: Naming, name: &str) -> Option<String> {
    let hf = names::hf_name(name)?;
    Some(if naming.mixtral {
        hf.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
    } else if naming.deepseek {
        hf.replace(".mlp.shared_expert.", ".mlp.shared_experts.")
    } else {
        hf
    })
}

fn read_f32(
    path: &Path,
    mmap: &Mmap,
    name: &str,
    kind: TensorType,
    shape: &[usize],
    start: usize,
    bytes: usize,
) -> Result<Tensor> {
    let data = &mmap[start..start + bytes];
    let values: Vec<f32> = match kind {
        TensorType::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        TensorType::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        TensorType::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        TensorType::Block(k) => Scheme::Ggml(k)
            .dequantise(data, *shape.last().unwrap_or(&1))
            .map_err(|e| invalid(path, format!("tensor `{name}`: {e}")))?,
    };
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// The rebuilt tensors as one f32 file in anonymous memory.
fn rebuilt_file(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<SafetensorsFile> {
    let total: usize = tensors.iter().map(|(_, t)| t.elem_count() * 4).sum();
    let mut buffer = MmapMut::map_anon(total.max(1)).map_err(|e| Error::io(path, e))?;
    let mut infos = BTreeMap::new();
    let mut offset = 0;
    for (name, t) in tensors {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let end = offset + values.len() * 4;
        for (dst, v) in buffer[offset..end].chunks_exact_mut(4).zip(&values) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        infos.insert(
            name,
            TensorInfo {
                dtype: StoredDType::F32,
                shape: t.dims().to_vec(),
                data_range: (offset, end),
            },
        );
        offset = end;
    }
    let mmap = buffer.make_read_only().map_err(|e| Error::io(path, e))?;
    let mut label = PathBuf::from(path);
    label.set_extension("gguf (rearranged tensors)");
    Ok(SafetensorsFile::from_parts(label, mmap, 0, infos)?.in_memory())
}

/// Whether `path` is a GGUF file (by its magic number).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && u32::from_le_bytes(magic) == encode::MAGIC
}
