//! What a checkpoint stores, in bytes: all of its tensors and its routed experts' (the figure a
//! byte budget is a fraction of).

use serde::Serialize;

use crate::error::Result;

/// Sizes of a checkpoint's tensors in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TensorBytes {
    /// Every tensor.
    pub total: u64,
    /// The routed experts' tensors (names with `.experts.` or `.expert_groups.`; shared experts
    /// are not routed).
    pub routed_experts: u64,
}

/// Whether tensor `name` belongs to the routed experts (`.experts.` or `.expert_groups.`; shared
/// experts are not routed).
pub fn is_routed_expert_tensor(name: &str) -> bool {
    name.contains(".experts.") || name.contains(".expert_groups.")
}

/// The bytes of the tensors stored in the checkpoint at `dir`, in all and for routed experts.
pub fn tensor_bytes(dir: &std::path::Path) -> Result<TensorBytes> {
    let checkpoint = super::Checkpoint::open(dir)?;
    let mut bytes = TensorBytes::default();
    for name in checkpoint.tensor_names() {
        let Some((info, _)) = checkpoint.info(name) else {
            continue;
        };
        let size = (info.data_range.1 - info.data_range.0) as u64;
        bytes.total += size;
        if is_routed_expert_tensor(name) {
            bytes.routed_experts += size;
        }
    }
    Ok(bytes)
}

/// The bytes of the tensors stored in the safetensors files `shards` (their headers only), in
/// all and for routed experts; for a checkpoint still being written (no index yet).
pub fn shard_tensor_bytes(shards: &[std::path::PathBuf]) -> Result<TensorBytes> {
    let mut bytes = TensorBytes::default();
    for path in shards {
        let file = super::SafetensorsFile::open(path)?;
        for (name, info) in file.tensors() {
            let size = (info.data_range.1 - info.data_range.0) as u64;
            bytes.total += size;
            if is_routed_expert_tensor(name) {
                bytes.routed_experts += size;
            }
        }
        file.release_pages();
    }
    Ok(bytes)
}
