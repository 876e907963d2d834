//! Outputs other engines load as they are: GGUF for llama.cpp ([`gguf`]) and compressed-tensors
//! `pack-quantized` for vLLM, SGLang and transformers ([`compressed_tensors`]).

pub mod compressed_tensors;
pub mod gguf;

use std::path::Path;

use crate::error::{Error, Result};

/// Whether a file of a staged rfid-moe checkpoint is one the other formats replace: its
/// safetensors shards, their index, `config.json` and the modelling file (the report, the
/// settings, the card and the tokenizer stay).
fn replaced_on_conversion(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name == crate::checkpoint::INDEX_FILE
        || name == crate::checkpoint::CONFIG_FILE
        || name.ends_with(".py")
}

/// Removes the staged rfid-moe checkpoint's files from `dir` once a converter has written what
/// replaces them.
fn remove_staged_checkpoint(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if path.is_file() && replaced_on_conversion(&name) {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}
