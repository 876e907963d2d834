//! Outputs other engines load as they are: GGUF for llama.cpp ([`gguf`]) and compressed-tensors
//! `pack-quantized` for vLLM, SGLang and transformers ([`compressed_tensors`]).

pub mod compressed_tensors;
pub mod gguf;
