//! The GGUF container (version 3): metadata key/value pairs, tensor descriptions, then each
//! tensor's bytes at an aligned offset. Written in one pass with the tensor bytes streamed, so
//! a model larger than memory converts with one tensor in memory at a time.

use std::io::Write;

use crate::quant::GgmlKind;

/// The file's magic number, `GGUF` read as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
/// The container version written.
pub const VERSION: u32 = 3;
/// Alignment of the tensor data section and of every tensor in it (ggml's default).
pub const ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `FLOAT32`.
    F32(f32),
    /// `BOOL`.
    Bool(bool),
    /// `STRING`.
    Str(String),
    /// `ARRAY` of `STRING`.
    Strings(Vec<String>),
    /// `ARRAY` of `INT32`.
    I32s(Vec<i32>),
    /// `ARRAY` of `FLOAT32`.
    F32s(Vec<f32>),
}

const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

impl MetaValue {
    fn type_id(&self) -> u32 {
        match self {
            Self::U32(_) => TYPE_U32,
            Self::I32(_) => TYPE_I32,
            Self::F32(_) => TYPE_F32,
            Self::Bool(_) => TYPE_BOOL,
            Self::Str(_) => TYPE_STRING,
            Self::Strings(_) | Self::I32s(_) | Self::F32s(_) => TYPE_ARRAY,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::Bool(v) => out.push(u8::from(*v)),
            Self::Str(s) => encode_string(s, out),
            Self::Strings(items) => {
                array_header(TYPE_STRING, items.len(), out);
                items.iter().for_each(|s| encode_string(s, out));
            }
            Self::I32s(items) => {
                array_header(TYPE_I32, items.len(), out);
                items
                    .iter()
                    .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            Self::F32s(items) => {
                array_header(TYPE_F32, items.len(), out);
                items
                    .iter()
                    .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
        }
    }
}

fn array_header(item_type: u32, len: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(&item_type.to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
}

fn encode_string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The element type of a GGUF tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    /// 32-bit floats.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16.
    BF16,
    /// One of ggml's block types.
    Block(GgmlKind),
}

impl TensorType {
    /// ggml's type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 30,
            Self::Block(kind) => match kind {
                GgmlKind::Q4_0 => 2,
                GgmlKind::Q4_1 => 3,
                GgmlKind::Q5_0 => 6,
                GgmlKind::Q5_1 => 7,
                GgmlKind::Q8_0 => 8,
                GgmlKind::Q2_K => 10,
                GgmlKind::Q3_K => 11,
                GgmlKind::Q4_K => 12,
                GgmlKind::Q5_K => 13,
                GgmlKind::Q6_K => 14,
            },
        }
    }

    /// The type of ggml id `id` (None for types rfid-moe does not read).
    pub fn from_id(id: u32) -> Option<Self> {
        [Self::F32, Self::F16, Self::BF16]
            .into_iter()
            .chain(GgmlKind::ALL.into_iter().map(Self::Block))
            .find(|t| t.id() == id)
    }

    /// Bytes of one row of `cols` values.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::F32 => 4 * cols,
            Self::F16 | Self::BF16 => 2 * cols,
            Self::Block(kind) => cols / kind.block_columns() * kind.block_bytes(),
        }
    }

    /// The name llama.cpp prints (`F32`, `Q4_K`).
    pub fn name(self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::BF16 => "BF16".into(),
            Self::Block(kind) => kind.name().to_uppercase(),
        }
    }
}

/// One tensor's description: its name, ggml dimensions (innermost first, the reverse of
/// PyTorch's shape) and type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// The GGUF tensor name (`blk.0.ffn_up_exps.weight`).
    pub name: String,
    /// ggml's `ne`: columns first.
    pub dims: Vec<u64>,
    /// Element type.
    pub kind: TensorType,
}

impl TensorEntry {
    /// The entry of a tensor of PyTorch shape `shape` (outermost first).
    pub fn new(name: impl Into<String>, shape: &[usize], kind: TensorType) -> Self {
        Self {
            name: name.into(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            kind,
        }
    }

    /// Bytes of the tensor's data.
    pub fn bytes(&self) -> u64 {
        let cols = self.dims.first().copied().unwrap_or(1) as usize;
        let rows: u64 = self.dims.iter().skip(1).product();
        self.kind.row_bytes(cols) as u64 * rows
    }
}

fn padding(offset: u64) -> u64 {
    (ALIGNMENT - offset % ALIGNMENT) % ALIGNMENT
}

/// Encodes the header (metadata and tensor descriptions, padded to [`ALIGNMENT`]); the tensors'
/// data follow in `tensors`' order, each padded to [`ALIGNMENT`] ([`data_padding`]).
pub fn header(metadata: &[(String, MetaValue)], tensors: &[TensorEntry]) -> Vec<u8> {
    debug_assert!(
        metadata
            .iter()
            .enumerate()
            .all(|(i, (k, _))| metadata[..i].iter().all(|(other, _)| other != k)),
        "GGUF readers refuse a key written twice"
    );
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        encode_string(key, &mut out);
        out.extend_from_slice(&value.type_id().to_le_bytes());
        value.encode(&mut out);
    }
    let mut offset = 0u64;
    for tensor in tensors {
        encode_string(&tensor.name, &mut out);
        out.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
        tensor
            .dims
            .iter()
            .for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
        out.extend_from_slice(&tensor.kind.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += tensor.bytes();
        offset += padding(offset);
    }
    let pad = padding(out.len() as u64) as usize;
    out.resize(out.len() + pad, 0);
    out
}

/// Writes the zero bytes that follow a tensor of `bytes` bytes so the next one is aligned.
pub fn data_padding(w: &mut impl Write, bytes: u64) -> std::io::Result<()> {
    w.write_all(&vec![0u8; padding(bytes) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_reads_what_the_header_describes() {
        let metadata = vec![
            (
                "general.architecture".to_string(),
                MetaValue::Str("qwen3moe".into()),
            ),
            ("qwen3moe.block_count".to_string(), MetaValue::U32(4)),
            ("x.flag".to_string(), MetaValue::Bool(true)),
            ("x.eps".to_string(), MetaValue::F32(1e-6)),
            (
                "x.tokens".to_string(),
                MetaValue::Strings(vec!["a".into(), "bc".into()]),
            ),
            ("x.types".to_string(), MetaValue::I32s(vec![1, 3])),
        ];
        let tensors = vec![
            TensorEntry::new("a", &[3, 5], TensorType::F32),
            TensorEntry::new("b", &[2, 4, 32], TensorType::Block(GgmlKind::Q8_0)),
        ];
        let mut file = header(&metadata, &tensors);
        for t in &tensors {
            let bytes = vec![7u8; t.bytes() as usize];
            file.extend_from_slice(&bytes);
            data_padding(&mut file, t.bytes()).unwrap();
        }
        let mut cursor = std::io::Cursor::new(file);
        let content = candle_core::quantized::gguf_file::Content::read(&mut cursor).unwrap();
        assert_eq!(
            content.metadata["qwen3moe.block_count"].to_u32().unwrap(),
            4
        );
        assert!(content.metadata["x.flag"].to_bool().unwrap());
        assert_eq!(content.metadata["x.tokens"].to_vec().unwrap().len(), 2);
        let b = &content.tensor_infos["b"];
        assert_eq!(b.shape.dims(), &[2, 4, 32]);
        assert_eq!(b.offset, 64, "a's 60 bytes padded to 64");
        assert_eq!(tensors[1].bytes(), 2 * 4 * 34);
    }
}
