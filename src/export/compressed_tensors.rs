//! compressed-tensors output (docs/FORMAT.md, "compressed-tensors output"): a Hugging Face
//! checkpoint whose routed experts are stored as compressed-tensors' `pack-quantized` integer
//! groups, which vLLM, SGLang and transformers (with the `compressed-tensors` package) load
//! without our modelling file.
//!
//! A packed expert matrix `X.weight.int<b>-g<G>-sym` becomes three tensors: `X.weight_packed`
//! (I32 `[rows, cols·b/32]`, the codes `q − 2^(b−1)` offset back to `q` and packed least
//! significant bit first along the row, i.e. exactly our code stream), `X.weight_scale`
//! (`[rows, cols/G]` in the model's dtype) and `X.weight_shape` (I64 `[rows, cols]`). Every other
//! tensor is copied unchanged.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::{json, Value};

use crate::checkpoint::packed::{parse_packed_name, PackedInfo};
use crate::checkpoint::{Checkpoint, StoredDType, CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::error::{Error, Result};
use crate::format::{AUXILIARY_FILES, COMPRESSION_KEY};
use crate::models::ArchConfig;
use crate::quant::{IntScheme, Scheme};

/// `quantization_config.quant_method` of a compressed-tensors checkpoint.
pub const QUANT_METHOD: &str = "compressed-tensors";
/// `quantization_config.format` of packed integer groups.
pub const PACK_QUANTIZED: &str = "pack-quantized";
/// Code widths vLLM's WNA16 MoE kernels take (`uint4b8`, `uint8b128`); compressed-tensors'
/// packing of other widths changed between its versions, so they are not written.
pub const BITS: [u32; 2] = [4, 8];
/// Group lengths vLLM's Marlin MoE kernels take.
pub const GROUPS: [usize; 3] = [32, 64, 128];
/// Largest shard [`write`] writes, in bytes of tensor data (what Hugging Face's own writer uses).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;
/// Suffixes of the three tensors standing for one packed matrix `X.weight`.
pub const PACKED_SUFFIX: &str = "weight_packed";
/// Suffix of a packed matrix's group scales.
pub const SCALE_SUFFIX: &str = "weight_scale";
/// Suffix of a packed matrix's `[rows, cols]`.
pub const SHAPE_SUFFIX: &str = "weight_shape";

/// Whether compressed-tensors' `pack-quantized` format can carry `scheme` for vLLM's MoE kernels.
pub fn holds(scheme: Scheme) -> bool {
    matches!(scheme, Scheme::Int(s) if s.symmetric && BITS.contains(&s.bits) && GROUPS.contains(&s.group))
}

/// Every scheme [`holds`] accepts.
pub fn schemes_it_holds() -> Vec<Scheme> {
    BITS.iter()
        .flat_map(|&bits| {
            GROUPS.iter().map(move |&group| {
                Scheme::Int(IntScheme {
                    bits,
                    group,
                    symmetric: true,
                })
            })
        })
        .collect()
}

/// The dtype of the group scales written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleDtype {
    /// The model's own dtype, as compressed-tensors' quantisers write them. compressed-tensors
    /// multiplies code and scale in this dtype, so in an f32 runtime a bf16 model's weights
    /// come out rounded to bf16, where rfid-moe computes the product in f32.
    #[default]
    Model,
    /// f32: every reader gets rfid-moe's values exactly, at 2 more bytes per group.
    F32,
}

/// How [`write_with`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Largest shard in bytes of tensor data (a larger tensor gets a shard of its own).
    pub max_shard_bytes: u64,
    /// Dtype of the group scales.
    pub scales: ScaleDtype,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            max_shard_bytes: DEFAULT_SHARD_BYTES,
            scales: ScaleDtype::Model,
        }
    }
}

/// Writes `source` (a finished rfid-moe checkpoint whose routed experts are floats or packed in
/// schemes [`holds`] accepts, one scheme per layer) into the existing empty directory `out` as a
/// compressed-tensors checkpoint, with [`WriteOptions::default`].
pub fn write(source: &Checkpoint, out: &Path) -> Result<()> {
    write_with(source, out, &WriteOptions::default())
}

/// [`write`] as `options` say. Each file is written to a temporary name and renamed; on error
/// the files already written are removed, and `config.json` is written last.
pub fn write_with(source: &Checkpoint, out: &Path, options: &WriteOptions) -> Result<()> {
    check_output_dir(out)?;
    let plan = Plan::new(source, options.scales)?;
    let mut written = Written::default();
    let result = write_all(source, &plan, out, options.max_shard_bytes, &mut written);
    if result.is_err() {
        written.remove();
    }
    result
}

/// Rewrites the complete rfid-moe checkpoint staged in `dir` as compressed-tensors in the same
/// directory: written beside it first (a subdirectory), then the staged weights and config are
/// replaced by the new ones; the report, settings, card and tokenizer stay.
pub fn convert_staged(dir: &Path) -> Result<()> {
    let beside = dir.join(".compressed-tensors");
    if beside.exists() {
        std::fs::remove_dir_all(&beside).map_err(|e| Error::io(&beside, e))?;
    }
    std::fs::create_dir(&beside).map_err(|e| Error::io(&beside, e))?;
    write(&Checkpoint::open(dir)?, &beside)?;
    crate::safety::staging::fault_point("finish:compressed-tensors-written");
    super::remove_staged_checkpoint(dir)?;
    for entry in std::fs::read_dir(&beside).map_err(|e| Error::io(&beside, e))? {
        let from = entry.map_err(|e| Error::io(&beside, e))?.path();
        let to = dir.join(from.file_name().unwrap_or_default());
        std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
    }
    std::fs::remove_dir(&beside).map_err(|e| Error::io(&beside, e))?;
    crate::safety::staging::sync_parent(&dir.join(CONFIG_FILE))
}

/// The files written so far, removed again when a later step fails.
#[derive(Default)]
struct Written(Vec<PathBuf>);

impl Written {
    fn remove(&self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn write_all(
    source: &Checkpoint,
    plan: &Plan,
    out: &Path,
    max_shard_bytes: u64,
    written: &mut Written,
) -> Result<()> {
    let shards = plan.shards(source, max_shard_bytes);
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (k, names) in shards.iter().enumerate() {
        let file = match count {
            1 => SINGLE_FILE.to_string(),
            _ => format!("model-{:05}-of-{count:05}.safetensors", k + 1),
        };
        let path = out.join(&file);
        let tensors = plan.convert(source, names)?;
        total += tensors
            .iter()
            .map(|(_, t)| t.data.len() as u64)
            .sum::<u64>();
        for (name, _) in &tensors {
            weight_map.insert(name.clone(), file.clone());
        }
        written.0.push(path.clone());
        write_shard(&path, tensors)?;
    }
    if count > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_json(&out.join(INDEX_FILE), &index, written)?;
    }
    copy_auxiliary_files(source, out, written)?;
    let config = output_config(source, plan)?;
    write_json(&out.join(CONFIG_FILE), &config, written)
}

/// Refuses an `out` that is not an existing empty directory.
fn check_output_dir(out: &Path) -> Result<()> {
    let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    if entries.next().is_some() {
        return Err(Error::InvalidArgument(format!(
            "{}: the compressed-tensors output directory must be empty",
            out.display()
        )));
    }
    Ok(())
}

/// What each stored tensor of the source becomes, and the schemes of the quantised layers.
struct Plan {
    /// Packed matrices by stored name, each a routed expert's matrix.
    packed: BTreeMap<String, PackedInfo>,
    /// Per scheme, the `re:` target of each (layer, matrix) it covers.
    targets: BTreeMap<IntScheme, Vec<String>>,
    /// Modules holding floats that vLLM would otherwise look up in the config groups.
    ignore: Vec<String>,
    /// Dtype of the group scales.
    scale_dtype: StoredDType,
}

impl Plan {
    fn new(source: &Checkpoint, scales: ScaleDtype) -> Result<Self> {
        refuse_other_storage(source)?;
        let spec = ArchConfig::from_checkpoint(source)?.spec();
        let mut packed = BTreeMap::new();
        let mut targets: BTreeMap<IntScheme, Vec<String>> = BTreeMap::new();
        let mut experts = BTreeSet::new();
        for (layer, layout) in spec.moe_layers.iter().enumerate() {
            let Some(layout) = layout else { continue };
            let Some(scheme) = layer_scheme(source, layer, layout)? else {
                continue;
            };
            for matrix in crate::checkpoint::experts::ExpertMatrix::ALL {
                for expert in 0..layout.num_experts {
                    let name = layout.dense_name(expert, matrix);
                    if let Some(info) = source.packed(&name) {
                        packed.insert(info.stored.clone(), info.clone());
                        experts.insert(name);
                    }
                }
                let module = format!("{}.experts.", layout.block);
                targets.entry(scheme).or_default().push(format!(
                    "re:^{}\\d+\\.{}$",
                    regex_escape(&module),
                    regex_escape(layout.name(matrix))
                ));
            }
        }
        if let Some(stray) = source
            .tensor_names()
            .into_iter()
            .filter_map(|n| parse_packed_name(n).map(|(m, _)| (n, m)))
            .find(|(_, m)| !experts.contains(*m))
        {
            return Err(Error::InvalidArgument(format!(
                "packed tensor `{}` is not a routed expert's matrix; compressed-tensors output \
                 quantises routed experts only",
                stray.0
            )));
        }
        Ok(Self {
            ignore: ignored_modules(source, &experts),
            packed,
            targets,
            scale_dtype: match scales {
                ScaleDtype::Model => model_dtype(source),
                ScaleDtype::F32 => StoredDType::F32,
            },
        })
    }

    /// Output tensor names with their data sizes, in order, split into shards.
    fn shards(&self, source: &Checkpoint, max_shard_bytes: u64) -> Vec<Vec<String>> {
        let mut shards: Vec<Vec<String>> = vec![Vec::new()];
        let mut bytes = 0u64;
        for name in source.tensor_names() {
            let size = match self.packed.get(name) {
                Some(info) => self.converted_bytes(info),
                None => source.raw_bytes(name).map_or(0, |b| b.len() as u64),
            };
            if bytes > 0 && bytes + size > max_shard_bytes {
                shards.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            if let Some(last) = shards.last_mut() {
                last.push(name.to_string());
            }
        }
        shards
    }

    fn converted_bytes(&self, info: &PackedInfo) -> u64 {
        let groups = info.cols / info.scheme.block_columns();
        let codes = info.cols * info.scheme.bits() as usize / 8;
        (info.rows * (codes + groups * self.scale_dtype.size_in_bytes()) + 16) as u64
    }

    /// The output tensors of the stored tensors `names`.
    fn convert<'a>(
        &self,
        source: &'a Checkpoint,
        names: &[String],
    ) -> Result<Vec<(String, OutTensor<'a>)>> {
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let missing = || Error::MissingTensor {
                name: name.clone(),
                dir: source.dir().to_path_buf(),
                expected_by: "the compressed-tensors writer".into(),
            };
            let bytes = source.raw_bytes(name).ok_or_else(missing)?;
            match self.packed.get(name) {
                Some(info) => out.extend(pack_matrix(info, bytes, self.scale_dtype)?),
                None => {
                    let (info, _) = source.info(name).ok_or_else(missing)?;
                    out.push((
                        name.clone(),
                        OutTensor {
                            dtype: info.dtype,
                            shape: info.shape.clone(),
                            data: Cow::Borrowed(bytes),
                        },
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// Refuses sources the output cannot express: a `quantization_config` of their own (FP8
/// weights), int8 or FP8 tensors, and factored (low-rank) experts.
fn refuse_other_storage(source: &Checkpoint) -> Result<()> {
    if let Some(method) = source.config().get("quantization_config") {
        return Err(Error::Config {
            path: source.config_path(),
            message: format!(
                "has a `quantization_config` ({}); compressed-tensors output is written from \
                 checkpoints whose weights are floats or rfid-moe integer groups",
                method.get("quant_method").unwrap_or(&Value::Null)
            ),
        });
    }
    for name in source.tensor_names() {
        let Some((info, path)) = source.info(name) else {
            continue;
        };
        if matches!(
            info.dtype,
            StoredDType::I8 | StoredDType::F8E4M3 | StoredDType::F8E5M2
        ) {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{name}` is {}; compressed-tensors output holds floats and \
                     pack-quantized integer groups only (compress with other storage)",
                    info.dtype.name()
                ),
            });
        }
    }
    let record = crate::models::compression_record(source)?;
    for layer in record.iter().flat_map(|r| &r.layers) {
        for (matrix, m) in &layer.matrices {
            if m.groups.iter().any(|g| !g.dense) {
                return Err(Error::InvalidArgument(format!(
                    "layer {}: `{matrix}` of its experts is factored (low-rank); \
                     compressed-tensors output holds dense or packed experts only",
                    layer.layer
                )));
            }
        }
    }
    Ok(())
}

/// The one scheme of `layer`'s routed experts, None when they are all floats; mixed storage and
/// schemes compressed-tensors cannot hold are refused.
fn layer_scheme(
    source: &Checkpoint,
    layer: usize,
    layout: &crate::checkpoint::experts::ExpertLayout,
) -> Result<Option<IntScheme>> {
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    let mut scheme = None;
    for matrix in crate::checkpoint::experts::ExpertMatrix::ALL {
        for expert in 0..layout.num_experts {
            let name = layout.dense_name(expert, matrix);
            let storage = match source.packed(&name) {
                Some(info) => {
                    let held = match info.scheme {
                        Scheme::Int(s) if holds(info.scheme) => s,
                        _ => {
                            return Err(Error::InvalidArgument(format!(
                                "tensor `{}` is packed as {}, which compressed-tensors output \
                                 cannot hold (it holds {})",
                                info.stored,
                                info.scheme,
                                schemes_it_holds()
                                    .iter()
                                    .map(|s| s.name())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )))
                        }
                    };
                    scheme = Some(held);
                    info.scheme.name()
                }
                None => "float".to_string(),
            };
            found.entry(storage).or_insert(name);
        }
    }
    if found.len() > 1 {
        let kinds: Vec<String> = found
            .iter()
            .map(|(storage, example)| format!("{storage} (e.g. `{example}`)"))
            .collect();
        return Err(Error::InvalidArgument(format!(
            "layer {layer} (`{}`): its routed experts are stored as {}; compressed-tensors output \
             needs one scheme for all experts of a layer (vLLM runs a layer's experts as one \
             fused kernel)",
            layout.block,
            kinds.join(" and ")
        )));
    }
    Ok(scheme)
}

/// The float modules with a 2-D `.weight` outside the quantised experts (attention, routers,
/// shared experts, dense MLPs), plus `lm_head`: vLLM refuses a linear layer that neither a
/// config group targets nor `ignore` names.
fn ignored_modules(source: &Checkpoint, experts: &BTreeSet<String>) -> Vec<String> {
    let mut ignore: BTreeSet<String> = source
        .tensor_names()
        .into_iter()
        .filter(|n| !experts.contains(*n) && parse_packed_name(n).is_none())
        .filter(|n| source.info(n).is_some_and(|(i, _)| i.shape.len() == 2))
        .filter_map(|n| n.strip_suffix(".weight"))
        .filter(|m| !m.contains("embed"))
        .map(str::to_string)
        .collect();
    ignore.insert("lm_head".into());
    ignore.into_iter().collect()
}

/// The model's float dtype: `dtype` / `torch_dtype` in the config, else that of most of its
/// tensors.
fn model_dtype(source: &Checkpoint) -> StoredDType {
    let named = ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| source.config().get(*k).and_then(Value::as_str));
    match named {
        Some("bfloat16") => StoredDType::BF16,
        Some("float16") => StoredDType::F16,
        Some("float32") => StoredDType::F32,
        _ => match source.dominant_dtype() {
            d @ (StoredDType::BF16 | StoredDType::F16 | StoredDType::F32) => d,
            _ => StoredDType::BF16,
        },
    }
}

/// One tensor of an output shard.
struct OutTensor<'a> {
    dtype: StoredDType,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl safetensors::View for &OutTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self.dtype {
            StoredDType::F32 => safetensors::Dtype::F32,
            StoredDType::BF16 => safetensors::Dtype::BF16,
            StoredDType::F16 => safetensors::Dtype::F16,
            StoredDType::F64 => safetensors::Dtype::F64,
            StoredDType::I64 => safetensors::Dtype::I64,
            StoredDType::I32 => safetensors::Dtype::I32,
            StoredDType::U8 => safetensors::Dtype::U8,
            StoredDType::I8 => safetensors::Dtype::I8,
            StoredDType::F8E4M3 => safetensors::Dtype::F8_E4M3,
            StoredDType::F8E5M2 => safetensors::Dtype::F8_E5M2,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The three compressed-tensors tensors of packed matrix `info` (stored bytes `bytes`), scales
/// in `scale_dtype`.
fn pack_matrix(
    info: &PackedInfo,
    bytes: &[u8],
    scale_dtype: StoredDType,
) -> Result<Vec<(String, OutTensor<'static>)>> {
    let Scheme::Int(scheme) = info.scheme else {
        return Err(Error::InvalidArgument(format!(
            "tensor `{}` is packed as {}, not integer groups",
            info.stored, info.scheme
        )));
    };
    let matrix = info
        .stored
        .strip_suffix(&format!(".{}", info.scheme))
        .and_then(|n| n.strip_suffix("weight"))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "packed tensor `{}` is not named `<module>.weight.{}`",
                info.stored, info.scheme
            ))
        })?;
    let (rows, cols) = (info.rows, info.cols);
    let groups = cols / scheme.group;
    let block_bytes = scheme.block_bytes();
    let code_bytes = scheme.group * scheme.bits as usize / 8;
    if bytes.len() != rows * groups * block_bytes {
        return Err(Error::InvalidArgument(format!(
            "packed tensor `{}` holds {} bytes; [{rows}, {cols}] in {} takes {}",
            info.stored,
            bytes.len(),
            info.scheme,
            rows * groups * block_bytes
        )));
    }
    let mut codes = Vec::with_capacity(rows * groups * code_bytes);
    let mut scales = Vec::with_capacity(rows * groups * scale_dtype.size_in_bytes());
    for block in bytes.chunks_exact(block_bytes) {
        let scale = bf16::from_le_bytes([block[0], block[1]]);
        push_scale(&mut scales, scale, scale_dtype, &info.stored)?;
        codes.extend_from_slice(&block[2..]);
    }
    let shape: Vec<u8> = [rows as i64, cols as i64]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let tensor = |dtype, shape, data: Vec<u8>| OutTensor {
        dtype,
        shape,
        data: Cow::Owned(data),
    };
    Ok(vec![
        (
            format!("{matrix}{PACKED_SUFFIX}"),
            tensor(
                StoredDType::I32,
                vec![rows, cols * scheme.bits as usize / 32],
                codes,
            ),
        ),
        (
            format!("{matrix}{SCALE_SUFFIX}"),
            tensor(scale_dtype, vec![rows, groups], scales),
        ),
        (
            format!("{matrix}{SHAPE_SUFFIX}"),
            tensor(StoredDType::I64, vec![2], shape),
        ),
    ])
}

/// Appends `scale` in `dtype`; a scale f16 cannot hold exactly is refused rather than rounded.
fn push_scale(out: &mut Vec<u8>, scale: bf16, dtype: StoredDType, stored: &str) -> Result<()> {
    match dtype {
        StoredDType::BF16 => out.extend_from_slice(&scale.to_le_bytes()),
        StoredDType::F32 => out.extend_from_slice(&scale.to_f32().to_le_bytes()),
        _ => {
            let half = f16::from_f32(scale.to_f32());
            if half.to_f32() != scale.to_f32() {
                return Err(Error::InvalidArgument(format!(
                    "packed tensor `{stored}` has the scale {scale}, which the model's dtype \
                     (float16) cannot hold exactly"
                )));
            }
            out.extend_from_slice(&half.to_le_bytes());
        }
    }
    Ok(())
}

/// Writes one safetensors shard through a temporary sibling, flushed before the rename.
fn write_shard(path: &Path, tensors: Vec<(String, OutTensor<'_>)>) -> Result<()> {
    let tmp = crate::safety::staging::temporary_sibling(path);
    let views: Vec<(&str, &OutTensor<'_>)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let written = safetensors::serialize_to_file(views, None, &tmp)
        .map_err(|e| match e {
            safetensors::SafeTensorError::IoError(source) => Error::io(path, source),
            other => Error::Safetensors {
                path: path.to_path_buf(),
                message: format!("writing the shard: {other}"),
            },
        })
        .and_then(|()| crate::safety::staging::sync_file(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_json(path: &Path, value: &Value, written: &mut Written) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    written.0.push(path.to_path_buf());
    crate::safety::staging::write_durable(path, text.as_bytes())
}

/// Copies the tokenizer and generation files of the source that exist.
fn copy_auxiliary_files(source: &Checkpoint, out: &Path, written: &mut Written) -> Result<()> {
    let dir = source.dir();
    for name in AUXILIARY_FILES {
        if !dir.join(name).is_file() {
            continue;
        }
        let from = crate::safety::confined_file(dir, name, dir, "auxiliary file")?;
        let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
        let to = out.join(name);
        written.0.push(to.clone());
        crate::safety::staging::write_durable(&to, &bytes)?;
    }
    Ok(())
}

/// The source's config as the family's own (`model_type`, `architectures`), without our
/// compression record and modelling-file hooks, with the `quantization_config` of the plan
/// when anything is quantised.
fn output_config(source: &Checkpoint, plan: &Plan) -> Result<Value> {
    let family = ArchConfig::from_checkpoint(source)?.spec().family;
    let mut config = source.config().clone();
    let Some(object) = config.as_object_mut() else {
        return Err(Error::Config {
            path: source.config_path(),
            message: "is not a JSON object".into(),
        });
    };
    object.remove(COMPRESSION_KEY);
    object.remove("auto_map");
    object.insert("model_type".into(), json!(family.model_type()));
    let architecture = crate::pipeline::hf_compat::family_architecture(family);
    object.insert("architectures".into(), json!([architecture]));
    if !plan.targets.is_empty() {
        object.insert("quantization_config".into(), quantization_config(plan));
    }
    Ok(config)
}

/// compressed-tensors' `QuantizationConfig`: one config group per scheme, targeting its layers'
/// expert modules by `re:` pattern; everything else in floats listed in `ignore`.
fn quantization_config(plan: &Plan) -> Value {
    let groups: serde_json::Map<String, Value> = plan
        .targets
        .iter()
        .enumerate()
        .map(|(k, (scheme, targets))| {
            let weights = json!({
                "num_bits": scheme.bits,
                "type": "int",
                "symmetric": true,
                "group_size": scheme.group,
                "strategy": "group",
                "block_structure": null,
                "dynamic": false,
                "actorder": null,
                "observer": "minmax",
                "observer_kwargs": {},
            });
            let group = json!({
                "targets": targets,
                "weights": weights,
                "input_activations": null,
                "output_activations": null,
                "format": PACK_QUANTIZED,
            });
            (format!("group_{k}"), group)
        })
        .collect();
    json!({
        "quant_method": QUANT_METHOD,
        "format": PACK_QUANTIZED,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": plan.ignore,
        "kv_cache_scheme": null,
        "global_compression_ratio": null,
        "sparsity_config": {},
        "transform_config": {},
    })
}

/// `text` with the characters a Python regular expression treats specially escaped.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_symmetric_int4_and_int8_in_marlin_groups_only() {
        let held: Vec<String> = schemes_it_holds().iter().map(|s| s.name()).collect();
        assert_eq!(held.len(), 6);
        for name in ["int4-g32-sym", "int4-g128-sym", "int8-g64-sym"] {
            assert!(held.contains(&name.to_string()), "{name}");
            assert!(holds(Scheme::parse(name).unwrap()), "{name}");
        }
        for name in ["int4-g32-asym", "int3-g32-sym", "int4-g256-sym", "q4_0"] {
            assert!(!holds(Scheme::parse(name).unwrap()), "{name}");
        }
    }

    #[test]
    fn packed_codes_are_compressed_tensors_int32_words() {
        // Reference values of compressed-tensors' `pack_to_int32` on one row of 32 columns:
        // element i lands at bits 4·(i mod 8) of word i/8 after the offset of +8.
        let scheme = Scheme::parse("int4-g32-sym").unwrap();
        let values: Vec<f32> = (0..32).map(|i| (i % 16) as f32 - 8.0).collect();
        let bytes = scheme.quantise_nearest(&values, 32, None).unwrap();
        let info =
            PackedInfo::new("m.experts.0.up_proj.weight.int4-g32-sym", scheme, &[1, 18]).unwrap();
        let out = pack_matrix(&info, &bytes, StoredDType::F32).unwrap();
        assert_eq!(out[0].0, "m.experts.0.up_proj.weight_packed");
        assert_eq!(out[0].1.shape, vec![1, 4]);
        let words: Vec<i32> = out[0]
            .1
            .data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let expected = |start: usize| -> i32 {
            (0..8).fold(0u32, |w, j| w | (((start + j) % 16) as u32) << (4 * j)) as i32
        };
        assert_eq!(
            words,
            vec![expected(0), expected(8), expected(16), expected(24)]
        );
        let scale = f32::from_le_bytes(out[1].1.data[..4].try_into().unwrap());
        assert_eq!(scale, 1.0);
        assert_eq!(out[2].1.data.len(), 16);
    }

    #[test]
    fn escaped_patterns_match_module_names_literally() {
        assert_eq!(
            regex_escape("model.layers.0.mlp.experts."),
            "model\\.layers\\.0\\.mlp\\.experts\\."
        );
    }
}
