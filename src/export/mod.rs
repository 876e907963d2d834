//! Outputs other engines load as they are: GGUF for llama.cpp ([`gguf`]).

pub mod gguf;
