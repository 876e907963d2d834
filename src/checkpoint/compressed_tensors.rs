//! Reading compressed-tensors checkpoints (docs/FORMAT.md, "compressed-tensors output"): a
//! `pack-quantized` matrix stored as `X.weight_packed` / `X.weight_scale` / `X.weight_shape`
//! (symmetric integer groups) is presented as rfid-moe's packed matrix
//! `X.weight.int<b>-g<G>-sym`, repacked in memory, so the runtime holds and runs it as it runs
//! our own quantised experts. Group scales that bf16 cannot hold exactly are dequantised to a
//! dense f32 `X.weight` instead, with compressed-tensors' rounding of the product to the
//! scales' dtype. Every other compressed-tensors layout is refused by the config key that
//! names it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use half::{bf16, f16};
use serde_json::Value;

use super::packed::packed_name;
use super::{Checkpoint, SafetensorsFile, StoredDType, TensorInfo, CONFIG_FILE};
use crate::error::{Error, Result};
use crate::format::{CompressionRecord, GroupRecord, LayerRecord, MatrixRecord, COMPRESSION_KEY};
use crate::quant::{IntScheme, Scheme};

/// `quantization_config.quant_method` of a compressed-tensors checkpoint.
pub const QUANT_METHOD: &str = "compressed-tensors";
/// The compressed-tensors format read: integer groups packed into int32 words.
pub const PACK_QUANTIZED: &str = "pack-quantized";
/// Code widths read (those whose int32 packing every compressed-tensors version agrees on).
pub const BITS: [u32; 2] = [4, 8];

/// Whether `config` (a `config.json`) describes a compressed-tensors checkpoint.
pub fn is_compressed_tensors(config: &Value) -> bool {
    config
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(Value::as_str)
        == Some(QUANT_METHOD)
}

/// The checkpoint of `dir` over its opened `shards` (tensor `name` in shard `location[name]`)
/// with every packed triple presented as rfid-moe's packed matrix, `quantization_config`
/// replaced by the compression record rfid-moe's quantised checkpoints carry.
pub(super) fn open(
    dir: PathBuf,
    mut config: Value,
    mut shards: Vec<SafetensorsFile>,
    location: HashMap<String, usize>,
) -> Result<Checkpoint> {
    let config_path = dir.join(CONFIG_FILE);
    let schemes = accepted_schemes(&config, &config_path)?;
    let mut triples = Vec::new();
    for name in location.keys() {
        if let Some(module) = name.strip_suffix(".weight_packed") {
            triples.push(Triple::read(&shards, &location, module, &schemes)?);
        }
    }
    triples.sort_by(|a, b| a.module.cmp(&b.module));
    let presented = present(&dir, &shards, &triples)?;
    for (k, shard) in shards.iter_mut().enumerate() {
        shard.tensors.retain(|name, _| {
            location.get(name) == Some(&k) && !triples.iter().any(|t| t.owns(name))
        });
    }
    shards.push(presented);
    if let Some(object) = config.as_object_mut() {
        object.remove("quantization_config");
    }
    let mut checkpoint = Checkpoint::from_parts(dir, config, shards)?;
    if let Some(record) = compression_record(&checkpoint)? {
        let value = serde_json::to_value(record).map_err(|e| Error::Json {
            path: config_path,
            message: e.to_string(),
        })?;
        if let Some(object) = checkpoint.config.as_object_mut() {
            object.insert(COMPRESSION_KEY.into(), value);
        }
    }
    Ok(checkpoint)
}

/// The (bits, group) pairs of the config groups, after refusing anything but symmetric integer
/// groups in `pack-quantized` form with no activation quantisation.
fn accepted_schemes(config: &Value, path: &std::path::Path) -> Result<Vec<IntScheme>> {
    let refuse = |key: &str, value: &Value, expected: &str| Error::Config {
        path: path.to_path_buf(),
        message: format!(
            "`quantization_config.{key}` is {value}; rfid-moe reads compressed-tensors \
             checkpoints with {expected}"
        ),
    };
    let q = &config["quantization_config"];
    let format = &q["format"];
    if format.as_str() != Some(PACK_QUANTIZED) {
        return Err(refuse("format", format, "format `pack-quantized` only"));
    }
    let status = &q["quantization_status"];
    if status.as_str().is_some_and(|s| s != "compressed") {
        return Err(refuse(
            "quantization_status",
            status,
            "quantization_status `compressed` (weights stored packed)",
        ));
    }
    for key in ["kv_cache_scheme", "sparsity_config", "transform_config"] {
        let value = &q[key];
        let empty = value.is_null() || value.as_object().is_some_and(|o| o.is_empty());
        if !empty {
            return Err(refuse(
                key,
                value,
                "no KV-cache, sparsity or transform scheme",
            ));
        }
    }
    let Some(groups) = q["config_groups"].as_object().filter(|g| !g.is_empty()) else {
        return Err(refuse(
            "config_groups",
            &q["config_groups"],
            "at least one config group",
        ));
    };
    groups
        .iter()
        .map(|(name, group)| group_scheme(name, group, &refuse))
        .collect()
}

/// The scheme of config group `name`, or the error naming the key that rfid-moe cannot read.
fn group_scheme(
    name: &str,
    group: &Value,
    refuse: &dyn Fn(&str, &Value, &str) -> Error,
) -> Result<IntScheme> {
    let key = |k: &str| format!("config_groups.{name}.{k}");
    for k in ["input_activations", "output_activations"] {
        if !group[k].is_null() {
            return Err(refuse(&key(k), &group[k], "weight-only quantisation"));
        }
    }
    if let Some(format) = group.get("format").filter(|f| !f.is_null()) {
        if format.as_str() != Some(PACK_QUANTIZED) {
            return Err(refuse(
                &key("format"),
                format,
                "format `pack-quantized` only",
            ));
        }
    }
    let w = &group["weights"];
    let expect = |k: &str, ok: bool, what: &str| match ok {
        true => Ok(()),
        false => Err(refuse(&key(&format!("weights.{k}")), &w[k], what)),
    };
    expect("type", w["type"] == "int", "integer weights (`type` `int`)")?;
    expect("symmetric", w["symmetric"] == true, "symmetric weights")?;
    expect("strategy", w["strategy"] == "group", "the `group` strategy")?;
    let actorder_ok = w["actorder"].is_null() || w["actorder"] == "weight";
    expect("actorder", actorder_ok, "no activation-order group indices")?;
    let bits = w["num_bits"].as_u64().unwrap_or(0) as u32;
    expect("num_bits", BITS.contains(&bits), "4 or 8 bits")?;
    let group_size = w["group_size"].as_u64().unwrap_or(0) as usize;
    let groups = crate::quant::int::GROUPS;
    expect(
        "group_size",
        groups.contains(&group_size),
        "groups of 32, 64, 128 or 256 columns",
    )?;
    Ok(IntScheme {
        bits,
        group: group_size,
        symmetric: true,
    })
}

/// One stored `pack-quantized` matrix.
struct Triple {
    /// The module name (`X` of `X.weight_packed`).
    module: String,
    scheme: IntScheme,
    rows: usize,
    cols: usize,
    /// Shard and entry of `weight_packed` and `weight_scale`.
    packed: (usize, TensorInfo),
    scale: (usize, TensorInfo),
}

impl Triple {
    /// Reads and checks the triple of `module` against the accepted schemes.
    fn read(
        shards: &[SafetensorsFile],
        location: &HashMap<String, usize>,
        module: &str,
        schemes: &[IntScheme],
    ) -> Result<Self> {
        let get = |suffix: &str| {
            let name = format!("{module}.{suffix}");
            location
                .get(&name)
                .map(|&k| (k, shards[k].tensors[&name].clone()))
        };
        let bad = |k: usize, message: String| Error::Safetensors {
            path: shards[k].path.clone(),
            message,
        };
        let packed = get("weight_packed").ok_or_else(|| missing(module, "weight_packed"))?;
        for other in ["weight_zero_point", "weight_g_idx"] {
            if let Some((k, _)) = get(other) {
                return Err(bad(
                    k,
                    format!(
                        "`{module}.{other}` is present: rfid-moe reads symmetric groups without \
                         activation-order indices only"
                    ),
                ));
            }
        }
        let scale = get("weight_scale").ok_or_else(|| missing(module, "weight_scale"))?;
        let (shape_shard, shape) =
            get("weight_shape").ok_or_else(|| missing(module, "weight_shape"))?;
        let [rows, cols] = stored_shape(&shards[shape_shard], module, &shape)?;
        let (k, info) = &packed;
        let words = match (info.dtype, info.shape.as_slice()) {
            (StoredDType::I32, &[r, w]) if r == rows => w,
            _ => {
                return Err(bad(
                    *k,
                    format!(
                        "`{module}.weight_packed` is {} {:?}; a [{rows}, {cols}] matrix packs \
                         into I32 [{rows}, cols·bits/32]",
                        info.dtype.name(),
                        info.shape
                    ),
                ))
            }
        };
        let (sk, sinfo) = &scale;
        let groups = match (sinfo.dtype, sinfo.shape.as_slice()) {
            (StoredDType::BF16 | StoredDType::F16 | StoredDType::F32, &[r, g])
                if r == rows && g > 0 =>
            {
                g
            }
            _ => {
                return Err(bad(
                    *sk,
                    format!(
                        "`{module}.weight_scale` is {} {:?}; expected BF16, F16 or F32 \
                         [{rows}, groups]",
                        sinfo.dtype.name(),
                        sinfo.shape
                    ),
                ))
            }
        };
        let scheme =
            schemes
                .iter()
                .find(|s| words * 32 == cols * s.bits as usize && groups * s.group == cols)
                .copied()
                .ok_or_else(|| {
                    bad(
                        *k,
                        format!(
                        "`{module}`: {words} int32 words and {groups} scales per row of {cols} \
                         columns match none of the config groups' schemes ({})",
                        schemes.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
                    ),
                    )
                })?;
        Ok(Self {
            module: module.to_string(),
            scheme,
            rows,
            cols,
            packed,
            scale,
        })
    }

    /// Whether stored tensor `name` is part of this triple.
    fn owns(&self, name: &str) -> bool {
        name.strip_prefix(self.module.as_str()).is_some_and(|rest| {
            matches!(rest, ".weight_packed" | ".weight_scale" | ".weight_shape")
        })
    }

    /// The group scales as f32 and whether bf16 holds every one exactly.
    fn scales(&self, shards: &[SafetensorsFile]) -> Result<(Vec<f32>, bool)> {
        let (k, info) = &self.scale;
        let bytes = shards[*k].bytes(info);
        let name = format!("{}.weight_scale", self.module);
        super::check_finite(&shards[*k].path, &name, info.dtype, bytes)?;
        let values: Vec<f32> = match info.dtype {
            StoredDType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StoredDType::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        };
        let exact = values.iter().all(|&v| bf16::from_f32(v).to_f32() == v);
        Ok((values, exact))
    }
}

fn missing(module: &str, suffix: &str) -> Error {
    Error::InvalidArgument(format!(
        "compressed-tensors matrix `{module}` has no `{module}.{suffix}` (a pack-quantized \
         matrix is stored as weight_packed, weight_scale and weight_shape)"
    ))
}

/// `[rows, cols]` from a `weight_shape` tensor (I64 or I32, two entries).
fn stored_shape(shard: &SafetensorsFile, module: &str, info: &TensorInfo) -> Result<[usize; 2]> {
    let bytes = shard.bytes(info);
    let values: Vec<i64> = match (info.dtype, info.numel()) {
        (StoredDType::I64, 2) => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        (StoredDType::I32, 2) => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        _ => vec![],
    };
    match values.as_slice() {
        &[rows, cols] if rows > 0 && cols > 0 => Ok([rows as usize, cols as usize]),
        _ => Err(Error::Safetensors {
            path: shard.path.clone(),
            message: format!(
                "`{module}.weight_shape` is {} {:?} holding {values:?}; expected two positive \
                 I64 values [rows, cols]",
                info.dtype.name(),
                info.shape
            ),
        }),
    }
}

/// An in-memory tensor file holding every triple in rfid-moe's layout.
fn present(
    dir: &std::path::Path,
    shards: &[SafetensorsFile],
    triples: &[Triple],
) -> Result<SafetensorsFile> {
    let mut entries: Vec<(String, StoredDType, Vec<usize>, Vec<u8>)> = Vec::new();
    for triple in triples {
        let (scales, exact) = triple.scales(shards)?;
        let (k, info) = &triple.packed;
        let codes = shards[*k].bytes(info);
        let weight = format!("{}.weight", triple.module);
        let scheme = Scheme::Int(triple.scheme);
        if exact {
            let bytes = repack(triple, codes, &scales);
            let row_bytes = scheme.row_bytes(triple.cols);
            entries.push((
                packed_name(&weight, scheme),
                StoredDType::U8,
                vec![triple.rows, row_bytes],
                bytes,
            ));
        } else {
            let values = dequantise(triple, codes, &scales, triple.scale.1.dtype)?;
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            entries.push((
                weight,
                StoredDType::F32,
                vec![triple.rows, triple.cols],
                bytes,
            ));
        }
    }
    let total: usize = entries.iter().map(|e| e.3.len()).sum();
    let mut map = memmap2::MmapMut::map_anon(total.max(1))
        .map_err(|e| Error::io(dir.join("<repacked compressed-tensors matrices>"), e))?;
    let mut tensors = BTreeMap::new();
    let mut at = 0;
    for (name, dtype, shape, bytes) in entries {
        map[at..at + bytes.len()].copy_from_slice(&bytes);
        let data_range = (at, at + bytes.len());
        at += bytes.len();
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                data_range,
            },
        );
    }
    let path = dir.join("<repacked compressed-tensors matrices>");
    let mmap = map.make_read_only().map_err(|e| Error::io(&path, e))?;
    Ok(SafetensorsFile::from_parts(path, mmap, 0, tensors)?.in_memory())
}

/// rfid-moe's blocks (bf16 scale, then the group's codes) of a triple whose scales bf16 holds.
fn repack(triple: &Triple, codes: &[u8], scales: &[f32]) -> Vec<u8> {
    let group = triple.scheme.group;
    let code_bytes = group * triple.scheme.bits as usize / 8;
    let mut out = Vec::with_capacity(scales.len() * (2 + code_bytes));
    for (block, &scale) in codes.chunks_exact(code_bytes).zip(scales) {
        out.extend_from_slice(&bf16::from_f32(scale).to_le_bytes());
        out.extend_from_slice(block);
    }
    out
}

/// The matrix's values as compressed-tensors computes them: `(q − 2^(bits−1)) · scale`
/// rounded to the scales' dtype.
fn dequantise(
    triple: &Triple,
    codes: &[u8],
    scales: &[f32],
    dtype: StoredDType,
) -> Result<Vec<f32>> {
    let scheme = Scheme::Int(IntScheme {
        bits: triple.scheme.bits,
        group: triple.scheme.group,
        symmetric: true,
    });
    let unit = repack(triple, codes, &vec![1.0; scales.len()]);
    let mut values = scheme.dequantise(&unit, triple.cols)?;
    for (chunk, &scale) in values.chunks_mut(triple.scheme.group).zip(scales) {
        for v in chunk {
            let exact = *v * scale;
            *v = match dtype {
                StoredDType::F16 => f16::from_f32(exact).to_f32(),
                _ => exact,
            };
        }
    }
    Ok(values)
}

/// The compression record of a quantised rfid-moe checkpoint for the MoE layers whose experts
/// are all packed (one dense group per matrix), so that the runtime holds them as blocks.
fn compression_record(checkpoint: &Checkpoint) -> Result<Option<CompressionRecord>> {
    let spec = crate::models::ArchConfig::from_checkpoint(checkpoint)?.spec();
    let mut layers = Vec::new();
    for (layer, layout) in spec.moe_layers.iter().enumerate() {
        let Some(layout) = layout else { continue };
        let mut matrices = BTreeMap::new();
        for matrix in crate::checkpoint::experts::ExpertMatrix::ALL {
            let storage: Option<Vec<String>> = (0..layout.num_experts)
                .map(|e| {
                    checkpoint
                        .packed(&layout.dense_name(e, matrix))
                        .map(|p| p.scheme.name())
                })
                .collect();
            if let Some(storage) = storage {
                let group = GroupRecord {
                    experts: (0..layout.num_experts).collect(),
                    rank: 0,
                    dense: true,
                    residual_size: 0,
                    storage,
                };
                matrices.insert(
                    layout.name(matrix).to_string(),
                    MatrixRecord {
                        groups: vec![group],
                    },
                );
            }
        }
        if !matrices.is_empty() {
            layers.push(LayerRecord { layer, matrices });
        }
    }
    if layers.is_empty() {
        return Ok(None);
    }
    Ok(Some(CompressionRecord {
        method: crate::format::METHOD.to_string(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        basis_activation: Default::default(),
        residual_seed: 0,
        settings: Value::Null,
        calibration_fingerprint: String::new(),
        factor_storage: None,
        layers,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(weights: Value) -> Value {
        json!({"quantization_config": {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"g": {"targets": ["Linear"], "weights": weights,
                                    "input_activations": null, "output_activations": null}},
        }})
    }

    fn weights() -> Value {
        json!({"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
               "group_size": 128, "actorder": null})
    }

    #[test]
    fn symmetric_integer_groups_are_read_and_anything_else_is_refused_by_key() {
        let path = std::path::Path::new("config.json");
        let schemes = accepted_schemes(&config(weights()), path).unwrap();
        assert_eq!(schemes[0].name(), "int4-g128-sym");
        assert!(is_compressed_tensors(&config(weights())));
        let refused = |edit: &dyn Fn(&mut Value)| {
            let mut c = config(weights());
            edit(&mut c["quantization_config"]);
            accepted_schemes(&c, path).unwrap_err().to_string()
        };
        let cases: [(&str, &dyn Fn(&mut Value)); 4] = [
            (
                "`quantization_config.format` is \"float-quantized\"",
                &|q| q["format"] = json!("float-quantized"),
            ),
            ("config_groups.g.weights.type", &|q| {
                q["config_groups"]["g"]["weights"]["type"] = json!("float")
            }),
            ("config_groups.g.weights.actorder", &|q| {
                q["config_groups"]["g"]["weights"]["actorder"] = json!("group")
            }),
            ("quantization_config.kv_cache_scheme", &|q| {
                q["kv_cache_scheme"] = json!({"num_bits": 8})
            }),
        ];
        for (needle, edit) in cases {
            let error = refused(edit);
            assert!(error.contains(needle), "{needle}: {error}");
        }
    }
}
