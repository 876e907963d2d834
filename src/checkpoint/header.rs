//! Safetensors headers, parsed by the `safetensors` crate (checked arithmetic, contiguous
//! non-overlapping data that covers the file) plus what it does not check (duplicate tensor names),
//! with errors that name the file and the tensor.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

use super::{StoredDType, TensorInfo};
use crate::error::{Error, Result};

/// The dtypes rfid-moe reads, as listed in errors.
const SUPPORTED: &str = "F32, BF16, F16, F64, I64, I32, U8, I8, F8_E4M3, F8_E5M2";

/// A validated header: where the data section starts and every tensor's entry by name.
#[derive(Debug)]
pub struct Header {
    /// Byte offset of the data section in the file.
    pub data_start: usize,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// Parses and validates the header of the safetensors file `bytes` (read from `path`).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    let bad = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let header_bytes = header_bytes(bytes).map_err(bad)?;
    if let Some(name) = first_duplicate_key(header_bytes) {
        return Err(bad(format!(
            "tensor `{name}` appears more than once in the header (expected unique tensor names)"
        )));
    }
    let metadata = match SafeTensors::read_metadata(bytes) {
        Ok((_, metadata)) => metadata,
        Err(error) => {
            let data_len = bytes.len() - 8 - header_bytes.len();
            return Err(bad(diagnose(header_bytes, data_len)
                .unwrap_or_else(|| format!("invalid safetensors header: {error}"))));
        }
    };
    let mut tensors = BTreeMap::new();
    for (name, info) in metadata.tensors() {
        let dtype = stored_dtype(info.dtype).ok_or_else(|| {
            bad(format!(
                "unsupported dtype `{}` for tensor `{name}` (supported: {SUPPORTED})",
                info.dtype
            ))
        })?;
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape: info.shape.clone(),
                data_range: info.data_offsets,
            },
        );
    }
    Ok(Header {
        data_start: 8 + header_bytes.len(),
        tensors,
    })
}

/// The JSON header of a safetensors file, after checking the length prefix against the file.
fn header_bytes(bytes: &[u8]) -> std::result::Result<&[u8], String> {
    let Some(prefix) = bytes.first_chunk::<8>() else {
        return Err(format!(
            "file is {} bytes, too short for a safetensors header (truncated?)",
            bytes.len()
        ));
    };
    let claimed = u64::from_le_bytes(*prefix);
    let available = (bytes.len() - 8) as u64;
    if claimed > available {
        return Err(format!(
            "header claims {claimed} bytes but the file has only {available} after the length prefix (truncated?)"
        ));
    }
    Ok(&bytes[8..8 + claimed as usize])
}

fn stored_dtype(dtype: Dtype) -> Option<StoredDType> {
    Some(match dtype {
        Dtype::F32 => StoredDType::F32,
        Dtype::BF16 => StoredDType::BF16,
        Dtype::F16 => StoredDType::F16,
        Dtype::F64 => StoredDType::F64,
        Dtype::I64 => StoredDType::I64,
        Dtype::I32 => StoredDType::I32,
        Dtype::U8 => StoredDType::U8,
        Dtype::I8 => StoredDType::I8,
        Dtype::F8_E4M3 => StoredDType::F8E4M3,
        Dtype::F8_E5M2 => StoredDType::F8E5M2,
        _ => return None,
    })
}

/// The first key that occurs twice at the top level of the header (serde maps keep only one).
fn first_duplicate_key(header: &[u8]) -> Option<String> {
    struct FirstDuplicate(Option<String>);
    impl<'de> serde::Deserialize<'de> for FirstDuplicate {
        fn deserialize<D: Deserializer<'de>>(
            deserializer: D,
        ) -> std::result::Result<Self, D::Error> {
            deserializer.deserialize_map(KeyVisitor)
        }
    }
    struct KeyVisitor;
    impl<'de> Visitor<'de> for KeyVisitor {
        type Value = FirstDuplicate;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = HashSet::new();
            let mut duplicate = None;
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(key.clone()) && duplicate.is_none() {
                    duplicate = Some(key);
                }
            }
            Ok(FirstDuplicate(duplicate))
        }
    }
    // Malformed JSON is reported by the full parse.
    serde_json::from_slice::<FirstDuplicate>(header)
        .ok()
        .and_then(|d| d.0)
}

/// One header entry as written, before any validation.
struct RawEntry {
    name: String,
    begin: u64,
    end: u64,
}

/// Explains why the `safetensors` crate refused a header, naming the tensor (None if no rule
/// below applies, in which case the crate's own message is used).
fn diagnose(header: &[u8], data_len: usize) -> Option<String> {
    let map: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(header) {
        Ok(map) => map,
        Err(e) => return Some(format!("header is not valid JSON: {e}")),
    };
    let mut entries = Vec::new();
    for (name, entry) in map {
        if name == "__metadata__" {
            continue;
        }
        match raw_entry(&name, &entry, data_len) {
            Ok(raw) => entries.push(raw),
            Err(message) => return Some(message),
        }
    }
    entries.sort_by_key(|e| (e.begin, e.end));
    let mut covered = 0u64;
    let mut previous: Option<&RawEntry> = None;
    for entry in &entries {
        if entry.begin < covered {
            let other = previous.map_or(String::new(), |p| p.name.clone());
            return Some(format!(
                "tensor `{}` (data_offsets [{}, {}]) overlaps tensor `{other}` (which ends at {covered}); expected each byte to belong to one tensor",
                entry.name, entry.begin, entry.end
            ));
        }
        if entry.begin > covered {
            return Some(format!(
                "data bytes {covered}..{} before tensor `{}` belong to no tensor (expected contiguous data)",
                entry.begin, entry.name
            ));
        }
        covered = entry.end;
        previous = Some(entry);
    }
    (covered != data_len as u64).then(|| {
        format!(
            "the tensors cover {covered} data bytes but the file holds {data_len} (expected the data section to be exactly the tensors)"
        )
    })
}

/// Reads one header entry and checks it on its own: dtype, shape, offsets, size, bounds.
fn raw_entry(
    name: &str,
    entry: &serde_json::Value,
    data_len: usize,
) -> std::result::Result<RawEntry, String> {
    let dtype = entry
        .get("dtype")
        .and_then(|v| v.as_str())
        .unwrap_or("<missing>")
        .to_string();
    let dtype_bytes = match StoredDType::parse(&dtype) {
        Some(d) => d.size_in_bytes() as u64,
        None => {
            return Err(format!(
                "unsupported dtype `{dtype}` for tensor `{name}` (supported: {SUPPORTED})"
            ))
        }
    };
    let shape: Vec<u64> = entry
        .get("shape")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .ok_or_else(|| format!("tensor `{name}` has no valid `shape` in the header"))?;
    let offsets: Vec<u64> = entry
        .get("data_offsets")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .filter(|v: &Vec<u64>| v.len() == 2)
        .ok_or_else(|| {
            format!("tensor `{name}` has no valid `data_offsets` [begin, end] in the header")
        })?;
    let (begin, end) = (offsets[0], offsets[1]);
    let needed = shape
        .iter()
        .try_fold(dtype_bytes, |acc, &d| acc.checked_mul(d))
        .filter(|&n| usize::try_from(n).is_ok())
        .ok_or_else(|| {
            format!(
                "tensor `{name}`: shape {shape:?} of {dtype} has a byte size that overflows (expected a shape that fits in memory)"
            )
        })?;
    if end < begin || end - begin != needed {
        return Err(format!(
            "tensor `{name}`: data_offsets [{begin}, {end}] span {} bytes but shape {shape:?} of {dtype} needs {needed}",
            end.saturating_sub(begin)
        ));
    }
    if end > data_len as u64 {
        return Err(format!(
            "tensor `{name}` ends at data byte {end} but the file holds only {data_len} data bytes (truncated?)"
        ));
    }
    Ok(RawEntry {
        name: name.to_string(),
        begin,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data_len));
        bytes
    }

    fn error(header: &str, data_len: usize) -> String {
        parse(Path::new("x.safetensors"), &file(header, data_len))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_valid_header_parses() {
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I32","shape":[1],"data_offsets":[8,12]}}"#;
        let parsed = parse(Path::new("x"), &file(header, 12)).unwrap();
        assert_eq!(parsed.tensors["b"].data_range, (8, 12));
        assert_eq!(parsed.data_start, 8 + header.len());
    }

    #[test]
    fn duplicate_names_are_refused() {
        let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let message = error(header, 4);
        assert!(message.contains("`a` appears more than once"), "{message}");
    }

    #[test]
    fn overlapping_ranges_name_both_tensors() {
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let message = error(header, 8);
        assert!(
            message.contains("overlaps") && message.contains("`a`") && message.contains("`b`"),
            "{message}"
        );
    }

    #[test]
    fn overflowing_shapes_are_refused() {
        let header =
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#;
        let message = error(header, 4);
        assert!(
            message.contains("`a`") && message.contains("overflows"),
            "{message}"
        );
    }

    #[test]
    fn fp8_parses_and_other_small_floats_are_named_as_unsupported() {
        let header = r#"{"w":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[0,4]},"v":{"dtype":"F8_E5M2","shape":[2],"data_offsets":[4,6]}}"#;
        let parsed = parse(Path::new("x"), &file(header, 6)).unwrap();
        assert_eq!(parsed.tensors["w"].dtype, StoredDType::F8E4M3);
        assert_eq!(parsed.tensors["v"].dtype, StoredDType::F8E5M2);
        let header = r#"{"w":{"dtype":"F8_E8M0","shape":[4],"data_offsets":[0,4]}}"#;
        let message = error(header, 4);
        assert!(
            message.contains("unsupported dtype `F8_E8M0` for tensor `w`")
                && message.contains("F8_E4M3"),
            "{message}"
        );
    }
}
