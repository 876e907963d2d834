//! GGUF output for llama.cpp (and Ollama, LM Studio): one `.gguf` file in the layout
//! llama.cpp's converter writes for the family, routed experts stacked per layer and matrix
//! with one ggml type each (blocks copied from the compressed checkpoint as they are), the
//! other tensors in the input's precision, the tokenizer as `tokenizer.ggml.*`, and the
//! Hugging Face configuration so rfid-moe reads the file back (`checkpoint::gguf`).

pub mod arch;
pub mod vocab;

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::experts::{ExpertLayout, ExpertMatrix};
use crate::checkpoint::gguf::encode::{self, MetaValue, TensorEntry, TensorType};
use crate::checkpoint::gguf::names::{self, kv_b_dims, permute_rows, CONFIG_KEY};
use crate::checkpoint::{Checkpoint, StoredDType};
use crate::error::{Error, Result};
use crate::models::{ArchConfig, Family};
use crate::quant::Scheme;

/// `general.quantization_version`: the ggml block layouts of this version.
const QUANTIZATION_VERSION: u32 = 2;

/// Choices of a GGUF output beyond what the compressed checkpoint holds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GgufOptions {
    /// The ggml type of the 2-D weights outside the routed experts (attention, shared experts,
    /// embeddings, head), rounded to nearest; None keeps the input's precision. Norms, routers
    /// and biases stay F32, and a matrix whose rows are not whole blocks of the type stays as
    /// stored.
    pub other_type: Option<crate::quant::GgmlKind>,
}

/// What [`write`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufSummary {
    /// Tensors in the file.
    pub tensors: usize,
    /// The file's bytes.
    pub file_bytes: u64,
    /// Routed-expert tensors by their type name (`Q4_K`: 12).
    pub expert_types: BTreeMap<String, usize>,
}

/// Where a tensor's bytes come from.
#[derive(Debug, Clone)]
enum Source {
    /// A tensor copied as stored (its dtype is the GGUF type).
    Copy(String),
    /// A tensor converted to another float type.
    Convert(String),
    /// A float tensor rounded to a ggml block type.
    Rounded(String),
    /// Mixtral's query or key rows in llama.cpp's rotary order ([`permute_rows`]).
    Permuted { name: String, heads: usize },
    /// DeepSeek's `kv_b_proj` split per head: the key part (transposed) or the value part.
    KvB { name: String, key: bool },
    /// A layer's routed experts of one matrix, stacked.
    Experts {
        layout: ExpertLayout,
        matrix: ExpertMatrix,
    },
}

struct Planned {
    entry: TensorEntry,
    source: Source,
}

/// Writes `source` (a Hugging Face or rfid-moe checkpoint whose routed experts are ggml blocks
/// or floats, one type per layer and matrix) to `path` as GGUF. The file appears complete or
/// not at all (a temporary sibling renamed into place).
pub fn write(source: &Checkpoint, path: &Path, options: GgufOptions) -> Result<GgufSummary> {
    let arch = ArchConfig::from_checkpoint(source)?;
    let spec = arch.spec();
    refuse_factored(source)?;
    let plan = plan_tensors(source, &arch, options)?;
    let metadata = metadata(source, spec.family, spec.vocab_size, &plan)?;
    let entries: Vec<TensorEntry> = plan.iter().map(|p| p.entry.clone()).collect();
    let header = encode::header(&metadata, &entries);
    let tmp = crate::safety::staging::temporary_sibling(path);
    let written = write_file(source, &tmp, &header, &plan);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let file_bytes = written?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    crate::safety::staging::sync_parent(path)?;
    let mut expert_types = BTreeMap::new();
    for p in plan
        .iter()
        .filter(|p| matches!(p.source, Source::Experts { .. }))
    {
        *expert_types.entry(p.entry.kind.name()).or_insert(0) += 1;
    }
    Ok(GgufSummary {
        tensors: plan.len(),
        file_bytes,
        expert_types,
    })
}

fn write_file(source: &Checkpoint, tmp: &Path, header: &[u8], plan: &[Planned]) -> Result<u64> {
    let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e: std::io::Error| Error::io(tmp, e);
    w.write_all(header).map_err(io)?;
    let mut total = header.len() as u64;
    for planned in plan {
        let mut written = 0u64;
        write_tensor(source, planned, &mut |bytes: &[u8]| {
            written += bytes.len() as u64;
            w.write_all(bytes).map_err(io)
        })?;
        if written != planned.entry.bytes() {
            return Err(Error::InvalidArgument(format!(
                "GGUF tensor `{}`: {written} bytes produced, {} expected for {:?} {}",
                planned.entry.name,
                planned.entry.bytes(),
                planned.entry.dims,
                planned.entry.kind.name()
            )));
        }
        encode::data_padding(&mut w, written).map_err(io)?;
        total += written;
        total += (encode::ALIGNMENT - total % encode::ALIGNMENT) % encode::ALIGNMENT;
        source.release_pages();
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(total)
}

/// Rewrites the complete rfid-moe checkpoint staged in `dir` as [`names::GGUF_FILE`] in the same
/// directory, then removes the staged checkpoint it replaces.
pub fn convert_staged(dir: &Path, options: GgufOptions) -> Result<GgufSummary> {
    let summary = {
        let staged = Checkpoint::open(dir)?;
        write(&staged, &dir.join(names::GGUF_FILE), options)?
    };
    crate::safety::staging::fault_point("finish:gguf-written");
    super::remove_staged_checkpoint(dir)?;
    crate::safety::staging::sync_parent(&dir.join(names::GGUF_FILE))?;
    Ok(summary)
}

/// Low-rank factors have no place in GGUF: llama.cpp runs one matrix per expert.
fn refuse_factored(source: &Checkpoint) -> Result<()> {
    let Some(record) = crate::models::compression_record(source)? else {
        return Ok(());
    };
    for entry in &record.layers {
        for (matrix, matrix_record) in &entry.matrices {
            if let Some(group) = matrix_record.groups.iter().find(|g| !g.dense) {
                let layer = entry.layer;
                return Err(Error::InvalidArgument(format!(
                    "{}: layer {layer}'s {matrix} experts {:?} are stored as low-rank factors, \
                     which GGUF cannot hold (compress with --format gguf, which offers only \
                     what GGUF holds)",
                    source.dir().display(),
                    group.experts
                )));
            }
        }
    }
    Ok(())
}

/// The GGUF float type of a stored tensor: as stored, FP8 widened to bf16, and F32 where
/// llama.cpp's converter keeps F32 (vectors, norms, routers, biases).
fn float_type(stored: StoredDType, gguf_name: &str, rank: usize) -> TensorType {
    match stored {
        _ if stays_f32(gguf_name, rank) => TensorType::F32,
        StoredDType::F16 => TensorType::F16,
        StoredDType::F32 => TensorType::F32,
        _ => TensorType::BF16,
    }
}

/// Whether llama.cpp's converter keeps a tensor in F32 whatever the rest: vectors, norms,
/// routers and biases.
fn stays_f32(gguf_name: &str, rank: usize) -> bool {
    rank <= 1
        || gguf_name.ends_with("_norm.weight")
        || gguf_name.contains(".ffn_gate_inp")
        || !gguf_name.ends_with(".weight")
}

fn plan_tensors(
    source: &Checkpoint,
    arch: &ArchConfig,
    options: GgufOptions,
) -> Result<Vec<Planned>> {
    let spec = arch.spec();
    let expert_prefixes: Vec<String> = spec
        .moe_layers
        .iter()
        .flatten()
        .map(|l| format!("{}.experts.", l.block))
        .collect();
    let mut plan = Vec::new();
    for (layer, layout) in spec.moe_layers.iter().enumerate() {
        if let Some(layout) = layout {
            for matrix in ExpertMatrix::ALL {
                plan.push(plan_experts(source, layer, layout, matrix)?);
            }
        }
    }
    let heads = source
        .config()
        .get("num_attention_heads")
        .and_then(|v| v.as_u64())
        .unwrap_or(1) as usize;
    let kv_heads = source
        .config()
        .get("num_key_value_heads")
        .and_then(|v| v.as_u64())
        .map_or(heads, |v| v as usize);
    for name in source.tensor_names() {
        if expert_prefixes.iter().any(|p| name.starts_with(p.as_str()))
            || source.is_quantisation_scale(name)
            || beyond_layers(name, spec.num_layers)
            || (name == "lm_head.weight" && spec.tie_word_embeddings)
        {
            continue;
        }
        let mut planned = plan_tensor(source, spec.family, name, heads, kv_heads)?;
        if let Some(kind) = options.other_type {
            planned.iter_mut().for_each(|p| round_to(p, kind));
        }
        plan.extend(planned);
    }
    Ok(plan)
}

/// Plans a float weight matrix as `kind` where llama.cpp would quantise it and its rows are
/// whole blocks (the rearranged ones, rebuilt in memory, stay float).
fn round_to(planned: &mut Planned, kind: crate::quant::GgmlKind) {
    let entry = &planned.entry;
    let cols = entry.dims.first().copied().unwrap_or(0) as usize;
    let matrix = entry.dims.len() == 2 && !stays_f32(&entry.name, 2);
    let name = match &planned.source {
        Source::Copy(n) | Source::Convert(n) => n.clone(),
        _ => return,
    };
    if matrix && cols.is_multiple_of(kind.block_columns()) {
        planned.entry.kind = TensorType::Block(kind);
        planned.source = Source::Rounded(name);
    }
}

/// Layers past `num_hidden_layers` (DeepSeek-V3's multi-token-prediction layer), which
/// llama.cpp's converter leaves out as well.
fn beyond_layers(name: &str, layers: usize) -> bool {
    matches!(names::split_layer(name, "model.layers."), Some((Some(l), _)) if l >= layers)
}

fn plan_tensor(
    source: &Checkpoint,
    family: Family,
    name: &str,
    heads: usize,
    kv_heads: usize,
) -> Result<Vec<Planned>> {
    let Some((info, _)) = source.info(name) else {
        return Err(Error::InvalidArgument(format!(
            "{}: tensor `{name}` is stored in a form GGUF cannot hold",
            source.dir().display()
        )));
    };
    let shape = info.shape.clone();
    let gguf = names::gguf_name(name).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{}: tensor `{name}` has no counterpart in llama.cpp's `{}` layout",
            source.dir().display(),
            arch::architecture(family)
        ))
    })?;
    let kind = float_type(info.dtype, &gguf, shape.len());
    if name.ends_with(names::KV_B_PROJ) {
        return plan_kv_b(source, name, &shape, kind);
    }
    let rows_permuted = match (family, name) {
        (Family::Mixtral, n) if n.ends_with("self_attn.q_proj.weight") => Some(heads),
        (Family::Mixtral, n) if n.ends_with("self_attn.k_proj.weight") => Some(kv_heads),
        _ => None,
    };
    let source_kind = match rows_permuted {
        Some(heads) => Source::Permuted {
            name: name.into(),
            heads,
        },
        None if stored_float_type(info.dtype) == Some(kind) => Source::Copy(name.into()),
        None => Source::Convert(name.into()),
    };
    Ok(vec![Planned {
        entry: TensorEntry::new(gguf, &shape, kind),
        source: source_kind,
    }])
}

/// The GGUF type whose bytes equal a tensor stored as `dtype` (None for non-floats and FP8).
fn stored_float_type(dtype: StoredDType) -> Option<TensorType> {
    match dtype {
        StoredDType::F32 => Some(TensorType::F32),
        StoredDType::F16 => Some(TensorType::F16),
        StoredDType::BF16 => Some(TensorType::BF16),
        _ => None,
    }
}

/// DeepSeek's `kv_b_proj` [heads·(nope + v), kv_lora] as llama.cpp's two per-head tensors:
/// `attn_k_b` [heads, kv_lora, nope] (transposed) and `attn_v_b` [heads, v, kv_lora].
fn plan_kv_b(
    source: &Checkpoint,
    name: &str,
    shape: &[usize],
    kind: TensorType,
) -> Result<Vec<Planned>> {
    let (heads, nope, v) = kv_b_dims(source.config(), name, shape)?;
    let lora = shape[1];
    let layer_prefix = match names::split_layer(name, "model.layers.") {
        Some((Some(layer), _)) => format!("blk.{layer}"),
        _ => {
            return Err(Error::InvalidArgument(format!(
                "tensor `{name}` is not inside a decoder layer"
            )))
        }
    };
    Ok(vec![
        Planned {
            entry: TensorEntry::new(
                format!("{layer_prefix}.attn_k_b.weight"),
                &[heads, lora, nope],
                kind,
            ),
            source: Source::KvB {
                name: name.into(),
                key: true,
            },
        },
        Planned {
            entry: TensorEntry::new(
                format!("{layer_prefix}.attn_v_b.weight"),
                &[heads, v, lora],
                kind,
            ),
            source: Source::KvB {
                name: name.into(),
                key: false,
            },
        },
    ])
}

fn plan_experts(
    source: &Checkpoint,
    layer: usize,
    layout: &ExpertLayout,
    matrix: ExpertMatrix,
) -> Result<Planned> {
    let mut kinds = BTreeMap::new();
    for expert in 0..layout.num_experts {
        let name = layout.dense_name(expert, matrix);
        let kind = match source.packed(&name) {
            Some(info) => match info.scheme {
                Scheme::Ggml(kind) => TensorType::Block(kind),
                Scheme::Int(_) => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: `{}` is stored as {}, which GGUF cannot hold (ggml block types and \
                         floats only)",
                        source.dir().display(),
                        info.stored,
                        info.scheme
                    )))
                }
            },
            None => {
                let stored = stored_dtype(source, layout, expert, matrix)?;
                float_type(stored, "experts.weight", 3)
            }
        };
        kinds
            .entry(kind.name())
            .or_insert((kind, Vec::new()))
            .1
            .push(expert);
    }
    if kinds.len() != 1 {
        let listed: Vec<String> = kinds
            .iter()
            .map(|(k, (_, experts))| format!("{k}: experts {experts:?}"))
            .collect();
        return Err(Error::InvalidArgument(format!(
            "{}: layer {layer}'s {matrix} experts are stored in {} types ({}); GGUF holds one \
             type per layer and matrix (compress with --format gguf)",
            source.dir().display(),
            kinds.len(),
            listed.join("; ")
        )));
    }
    let kind = kinds
        .into_values()
        .next()
        .map(|(k, _)| k)
        .unwrap_or(TensorType::F32);
    let [rows, cols] = layout.shape(matrix);
    Ok(Planned {
        entry: TensorEntry::new(
            names::experts_name(layer, matrix),
            &[layout.num_experts, rows, cols],
            kind,
        ),
        source: Source::Experts {
            layout: layout.clone(),
            matrix,
        },
    })
}

/// The stored dtype of a float expert matrix (per-expert or fused).
fn stored_dtype(
    source: &Checkpoint,
    layout: &ExpertLayout,
    expert: usize,
    matrix: ExpertMatrix,
) -> Result<StoredDType> {
    let name = match layout.is_fused(source, matrix) {
        true => layout.fused_name(matrix),
        false => layout.dense_name(expert, matrix),
    };
    source
        .info(&name)
        .map(|(info, _)| info.dtype)
        .ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            dir: source.dir().to_path_buf(),
            expected_by: format!("routed expert {expert} of `{}`", layout.block),
        })
}

fn tensor_bytes(source: &Checkpoint, planned: &Planned) -> Result<Vec<u8>> {
    let kind = planned.entry.kind;
    let by = "the GGUF export";
    match &planned.source {
        Source::Copy(name) => Ok(source.raw_bytes(name).unwrap_or_default().to_vec()),
        Source::Convert(name) => {
            float_bytes(&source.load(name, DType::F32, &Device::Cpu, by)?, kind)
        }
        Source::Rounded(name) => {
            let TensorType::Block(block) = kind else {
                return Err(Error::InvalidArgument(format!(
                    "internal: `{name}` planned as a float type to round to"
                )));
            };
            let values = source.load(name, DType::F32, &Device::Cpu, by)?;
            let cols = values.dim(1)?;
            let values = values.flatten_all()?.to_vec1::<f32>()?;
            Scheme::Ggml(block).quantise_nearest(&values, cols, None)
        }
        Source::Permuted { name, heads } => {
            let t = source.load(name, DType::F32, &Device::Cpu, by)?;
            float_bytes(&permute_rows(&t, *heads)?, kind)
        }
        Source::KvB { name, key } => {
            let t = source.load(name, DType::F32, &Device::Cpu, by)?;
            let (heads, nope, v) = kv_b_dims(source.config(), name, t.dims())?;
            let per_head = t.reshape((heads, nope + v, t.dim(1)?))?;
            let part = match key {
                true => per_head.narrow(1, 0, nope)?.transpose(1, 2)?,
                false => per_head.narrow(1, nope, v)?,
            };
            float_bytes(&part.contiguous()?, kind)
        }
        Source::Experts { .. } => Err(Error::InvalidArgument(
            "internal: expert stacks are written one expert at a time".into(),
        )),
    }
}

/// Hands the tensor's bytes to `write` in order: a routed-expert stack one expert at a time (a
/// DeepSeek-V3 layer's stack is gigabytes), any other tensor whole.
fn write_tensor(
    source: &Checkpoint,
    planned: &Planned,
    write: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let Source::Experts { layout, matrix } = &planned.source else {
        return write(&tensor_bytes(source, planned)?);
    };
    for expert in 0..layout.num_experts {
        let name = layout.dense_name(expert, *matrix);
        match source.packed_bytes(&name) {
            Some((_, bytes)) => write(bytes)?,
            None => {
                let t = layout.load_dense(source, expert, *matrix, DType::F32, &Device::Cpu)?;
                write(&float_bytes(&t, planned.entry.kind)?)?;
            }
        }
    }
    Ok(())
}

/// A float tensor's values as `kind`'s little-endian bytes.
fn float_bytes(t: &Tensor, kind: TensorType) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match kind {
        TensorType::F32 => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        TensorType::F16 => flat
            .to_dtype(DType::F16)?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        TensorType::BF16 => flat
            .to_dtype(DType::BF16)?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        TensorType::Block(k) => {
            return Err(Error::InvalidArgument(format!(
                "internal: float tensor planned as {}",
                k.name()
            )))
        }
    })
}

/// ggml's `general.file_type` of the routed experts' most common type (what llama.cpp prints).
fn file_type(plan: &[Planned]) -> u32 {
    let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
    for p in plan
        .iter()
        .filter(|p| matches!(p.source, Source::Experts { .. }))
    {
        *counts.entry(p.entry.kind.id()).or_insert(0) += p.entry.bytes();
    }
    let dominant = counts.into_iter().max_by_key(|(_, b)| *b).map(|(id, _)| id);
    // ggml type id → llama_ftype (the _M mixes for K-quants).
    match dominant {
        Some(0) | None => 0,
        Some(1) => 1,
        Some(30) => 32,
        Some(2) => 2,
        Some(3) => 3,
        Some(8) => 7,
        Some(6) => 8,
        Some(7) => 9,
        Some(10) => 10,
        Some(11) => 12,
        Some(12) => 15,
        Some(13) => 17,
        Some(14) => 18,
        Some(other) => other,
    }
}

fn metadata(
    source: &Checkpoint,
    family: Family,
    vocab_size: usize,
    plan: &[Planned],
) -> Result<Vec<(String, MetaValue)>> {
    let config = source.config();
    let name = config
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| family.model_type().to_string());
    let mut out = vec![
        (
            "general.architecture".to_string(),
            MetaValue::Str(arch::architecture(family).into()),
        ),
        ("general.type".into(), MetaValue::Str("model".into())),
        ("general.name".into(), MetaValue::Str(name)),
        ("general.file_type".into(), MetaValue::U32(file_type(plan))),
        (
            "general.quantization_version".into(),
            MetaValue::U32(QUANTIZATION_VERSION),
        ),
    ];
    out.extend(arch::hyperparameters(family, config)?);
    out.extend(vocab::tokenizer_metadata(source.dir(), vocab_size, config)?);
    out.push((CONFIG_KEY.into(), MetaValue::Str(config.to_string())));
    Ok(out)
}
