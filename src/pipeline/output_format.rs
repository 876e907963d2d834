//! The file formats `compress` writes and what each can hold, so the solver is offered nothing
//! else: rfid-moe's checkpoint holds every method; GGUF (`export::gguf`) holds removed
//! experts and ggml block types, one per layer and matrix.

use super::options::Granularity;
use crate::quant::{GgmlKind, Scheme};

crate::named_enum! {
    /// The file format `compress` writes.
    pub enum OutputFormat ("output format") {
        /// rfid-moe's checkpoint.
        Safetensors = "safetensors": "rfid-moe's safetensors checkpoint: every method (runs in rfid-moe, and in transformers with our modelling file)",
        /// One `.gguf` for llama.cpp.
        Gguf = "gguf": "One .gguf for llama.cpp, Ollama, LM Studio: removed experts and ggml block types, one type per layer and matrix",
    }
}

impl Default for OutputFormat {
    fn default() -> Self {
        Self::Safetensors
    }
}

/// Methods a restricted format's output can hold (removal, block formats, the input's floats).
const BLOCK_FORMAT_METHODS: [&str; 3] = ["prune", "quantise", "keep"];

impl OutputFormat {
    /// Whether this is the default format (rfid-moe's checkpoint).
    pub fn is_default(&self) -> bool {
        *self == Self::Safetensors
    }

    /// Whether the output can hold what method `name` stores.
    pub fn holds_method(self, name: &str) -> bool {
        match self {
            Self::Safetensors => true,
            Self::Gguf => BLOCK_FORMAT_METHODS.contains(&name),
        }
    }

    /// Whether the output can hold matrices stored as `scheme`.
    pub fn holds_scheme(self, scheme: Scheme) -> bool {
        match self {
            Self::Safetensors => true,
            Self::Gguf => matches!(scheme, Scheme::Ggml(_)),
        }
    }

    /// The block formats the quantise method offers by default for this output (None: its own
    /// default list).
    pub fn default_schemes(self) -> Option<Vec<Scheme>> {
        match self {
            Self::Safetensors => None,
            Self::Gguf => Some(GgmlKind::ALL.into_iter().map(Scheme::Ggml).collect()),
        }
    }

    /// The finest granularity at which the output can mix choices (one tensor type per
    /// layer and matrix for GGUF).
    pub fn finest_granularity(self) -> Granularity {
        match self {
            Self::Safetensors => Granularity::Expert,
            Self::Gguf => Granularity::Matrix,
        }
    }
}
