//! Writers of checkpoint formats other than rfid-moe's own.

pub mod compressed_tensors;
