//! Text for evaluation and calibration: reading documents, tokenizing them into one token
//! stream, and cutting that stream into windows.
//!
//! The stream protocol is the one the bundled models' READMEs use for their reference
//! perplexities: every document is followed by the end-of-text token (`<|endoftext|>`), the
//! documents are concatenated, and the stream is cut into non-overlapping windows of
//! `seq_len` tokens with the remainder dropped.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// File name of the tokenizer inside a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The end-of-text token that separates documents in the stream.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Seed for [`sample_windows`] meaning "the first `samples` consecutive windows".
pub const FIRST_WINDOWS: u64 = 0;

/// Loads `tokenizer.json` from the model directory `dir`, with truncation and padding off.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    load_tokenizer_file(&dir.join(TOKENIZER_FILE))
}

/// Loads a tokenizer from a `tokenizer.json` file, with truncation and padding off.
pub fn load_tokenizer_file(path: &Path) -> Result<Tokenizer> {
    let bytes =
        crate::safety::read_bounded(path, crate::safety::MAX_JSON_BYTES, "a tokenizer.json")?;
    let mut tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: format!("not a tokenizers `tokenizer.json`: {e}"),
    })?;
    // A tokenizer.json saved with truncation or padding would silently cut or pad documents.
    tokenizer.with_truncation(None).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: format!("cannot disable truncation: {e}"),
    })?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// The id of the end-of-text token: `<|endoftext|>` in the vocabulary, else the config's
/// `eos_token_id` (the first one when it is a list).
pub fn end_of_text_id(tokenizer: &Tokenizer, config: &serde_json::Value) -> Result<u32> {
    if let Some(id) = tokenizer.token_to_id(END_OF_TEXT) {
        return Ok(id);
    }
    let from_config = match config.get("eos_token_id") {
        Some(serde_json::Value::Array(ids)) => ids.first().and_then(|v| v.as_u64()),
        Some(v) => v.as_u64(),
        None => None,
    };
    from_config.and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "the tokenizer has no `{END_OF_TEXT}` token and config.json has no usable `eos_token_id`"
        ))
    })
}

/// Reads the documents of a text file: JSON lines with a `text` field (`.jsonl`/`.json`, or a
/// file whose first non-blank character is `{`), a JSON array of such objects or of strings
/// (`.json` starting with `[`), or plain text whose documents are separated by blank lines.
/// Documents that are empty or whitespace only are dropped.
///
/// Only regular files of at most [`crate::safety::MAX_TEXT_BYTES`] of UTF-8 are read.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let text = crate::safety::read_text_bounded(path, crate::safety::MAX_TEXT_BYTES, "UTF-8 text")?;
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let first = text.chars().find(|c| !c.is_whitespace());
    let documents = if first == Some('[') && extension == "json" {
        json_array_documents(path, &text)?
    } else if extension == "jsonl" || extension == "json" || first == Some('{') {
        json_lines_documents(path, &text)?
    } else {
        plain_text_documents(&text)
    };
    Ok(documents
        .into_iter()
        .filter(|d| !d.trim().is_empty())
        .collect())
}

/// Splits plain text into documents at blank (empty or whitespace-only) lines; lines inside a
/// document are kept as they are, indentation included.
pub fn plain_text_documents(text: &str) -> Vec<String> {
    let mut documents = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in text.split('\n') {
        if line.trim().is_empty() {
            if !current.is_empty() {
                documents.push(current.join("\n"));
                current.clear();
            }
        } else {
            current.push(line);
        }
    }
    if !current.is_empty() {
        documents.push(current.join("\n"));
    }
    documents
}

fn text_field(path: &Path, where_: &str, value: &serde_json::Value) -> Result<String> {
    match value {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Object(map) => match map.get("text") {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(Error::Json {
                path: path.to_path_buf(),
                message: format!("{where_}: `text` is not a string"),
            }),
            None => Err(Error::Json {
                path: path.to_path_buf(),
                message: format!("{where_}: no `text` field"),
            }),
        },
        _ => Err(Error::Json {
            path: path.to_path_buf(),
            message: format!("{where_}: expected an object with a `text` field"),
        }),
    }
}

fn json_lines_documents(path: &Path, text: &str) -> Result<Vec<String>> {
    let mut documents = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = format!("line {}", index + 1);
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: format!("{where_}: {e}"),
        })?;
        if !value.is_object() {
            return Err(Error::Json {
                path: path.to_path_buf(),
                message: format!("{where_}: expected an object with a `text` field"),
            });
        }
        documents.push(text_field(path, &where_, &value)?);
    }
    Ok(documents)
}

fn json_array_documents(path: &Path, text: &str) -> Result<Vec<String>> {
    let values: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: format!("not a JSON array: {e}"),
    })?;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| text_field(path, &format!("element {i}"), v))
        .collect()
}

/// Name of the token-id tensor in a safetensors token file.
pub const INPUT_IDS: &str = "input_ids";

/// Checks a token-id tensor read from `path`: I64 (stored I64 or I32), rank 2, every id in
/// `[0, vocab_size)`; returns its rows. Errors name the file, the tensor and the offending value
/// and position (ids are never wrapped).
pub fn token_ids_from_tensor(
    tensor: &Tensor,
    vocab_size: usize,
    path: &Path,
) -> Result<Vec<Vec<u32>>> {
    let bad = |message: String| Error::InvalidInput {
        path: path.to_path_buf(),
        message,
    };
    if tensor.dtype() != DType::I64 {
        return Err(bad(format!(
            "tensor `{INPUT_IDS}` has dtype {:?} (expected I64 or I32 token ids)",
            tensor.dtype()
        )));
    }
    if tensor.rank() != 2 {
        return Err(bad(format!(
            "tensor `{INPUT_IDS}` has shape {:?} (expected [batch, seq])",
            tensor.dims()
        )));
    }
    let rows: Vec<Vec<i64>> = tensor.to_device(&Device::Cpu)?.to_vec2()?;
    rows.iter()
        .enumerate()
        .map(|(r, row)| {
            row.iter()
                .enumerate()
                .map(|(c, &id)| {
                    u32::try_from(id)
                        .ok()
                        .filter(|&id| (id as usize) < vocab_size)
                        .ok_or_else(|| {
                            bad(format!(
                                "tensor `{INPUT_IDS}` holds token id {id} at [{r}, {c}] (expected ids in [0, {vocab_size}))"
                            ))
                        })
                })
                .collect()
        })
        .collect()
}

/// Reads `input_ids` from the safetensors file `path` (only that tensor is loaded) and checks it
/// with [`token_ids_from_tensor`]; stored dtypes other than I64 and I32 are refused by name.
pub fn read_token_ids(path: &Path, vocab_size: usize) -> Result<Vec<Vec<u32>>> {
    let file = crate::checkpoint::SafetensorsFile::open(path)?;
    let info = file
        .tensors()
        .get(INPUT_IDS)
        .ok_or_else(|| Error::InvalidInput {
            path: path.to_path_buf(),
            message: format!(
                "no tensor `{INPUT_IDS}` (expected I64 or I32 token ids [batch, seq])"
            ),
        })?;
    let stored = info.dtype;
    if !matches!(
        stored,
        crate::checkpoint::StoredDType::I64 | crate::checkpoint::StoredDType::I32
    ) {
        return Err(Error::InvalidInput {
            path: path.to_path_buf(),
            message: format!(
                "tensor `{INPUT_IDS}` has dtype {} (expected I64 or I32 token ids)",
                stored.name()
            ),
        });
    }
    let tensor = file.load(INPUT_IDS, DType::F32, &Device::Cpu)?;
    token_ids_from_tensor(&tensor, vocab_size, path)
}

/// [`read_token_ids`] as a U32 tensor [batch, seq] on `device`, ready for a forward pass.
pub fn load_token_ids(path: &Path, vocab_size: usize, device: &Device) -> Result<Tensor> {
    let rows = read_token_ids(path, vocab_size)?;
    let seq = rows.first().map_or(0, |r| r.len());
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), seq), device)?)
}

/// Tokenizes one string without adding special tokens.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(|e| Error::InvalidArgument(format!("tokenization failed: {e}")))?;
    Ok(encoding.get_ids().to_vec())
}

/// The token stream "document tokens, `eos`, document tokens, `eos`, ...".
///
/// Each document is tokenized on its own (in parallel, no special tokens added) and followed by
/// `eos`. Because `<|endoftext|>` is an added token, which the tokenizer splits on before
/// anything else, this gives the same ids as tokenizing the documents joined with
/// `<|endoftext|>` after each.
pub fn tokenize_documents(
    tokenizer: &Tokenizer,
    documents: &[String],
    eos: u32,
) -> Result<Vec<u32>> {
    let encoded: Vec<Vec<u32>> = documents
        .par_iter()
        .map(|d| encode(tokenizer, d))
        .collect::<Result<Vec<_>>>()?;
    let mut stream = Vec::with_capacity(encoded.iter().map(|d| d.len() + 1).sum());
    for document in encoded {
        stream.extend_from_slice(&document);
        stream.push(eos);
    }
    Ok(stream)
}

/// Reads a text file with [`read_documents`] and tokenizes it with [`tokenize_documents`].
pub fn tokenize_file(tokenizer: &Tokenizer, path: &Path, eos: u32) -> Result<Vec<u32>> {
    let documents = read_documents(path)?;
    if documents.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no documents (the file has no text)",
            path.display()
        )));
    }
    tokenize_documents(tokenizer, &documents, eos)
}

/// Cuts `tokens` into non-overlapping windows of `seq_len` tokens, dropping the remainder
/// (no windows when `seq_len` is 0).
pub fn windows(tokens: &[u32], seq_len: usize) -> Vec<Vec<u32>> {
    if seq_len == 0 {
        return Vec::new();
    }
    tokens.chunks_exact(seq_len).map(|w| w.to_vec()).collect()
}

pub use crate::rng::SplitMix64;

/// Up to `samples` non-overlapping windows of `seq_len` tokens for calibration.
///
/// With `seed` = [`FIRST_WINDOWS`] (0) these are the first `samples` consecutive windows (what
/// the reference of docs/RESULTS.md §1 used: the first 128 windows of 512 tokens of `calibration.txt`);
/// otherwise `samples` distinct windows chosen by a Fisher–Yates shuffle driven by
/// [`SplitMix64`]`(seed)`, returned in stream order. Fewer are returned when the stream has
/// fewer windows.
pub fn sample_windows(tokens: &[u32], seq_len: usize, samples: usize, seed: u64) -> Vec<Vec<u32>> {
    let all = windows(tokens, seq_len);
    if seed == FIRST_WINDOWS || samples >= all.len() {
        return all.into_iter().take(samples).collect();
    }
    let mut order: Vec<usize> = (0..all.len()).collect();
    let mut rng = SplitMix64::new(seed);
    // A partial Fisher–Yates shuffle: the first `samples` slots end up uniformly chosen.
    for i in 0..samples {
        let j = i + rng.below((order.len() - i) as u64) as usize;
        order.swap(i, j);
    }
    let mut chosen = order[..samples].to_vec();
    chosen.sort_unstable();
    let mut all: Vec<Option<Vec<u32>>> = all.into_iter().map(Some).collect();
    chosen.into_iter().filter_map(|i| all[i].take()).collect()
}
