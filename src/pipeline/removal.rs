//! Removed experts, whichever method removed them: a pruned layer's layout, its router cut to
//! the kept experts, its kept experts as stored, and the `config.json` of an output with fewer
//! experts.

use std::collections::HashMap;

use candle_core::Tensor;

use super::experts::LayerExperts;
use super::report::LayerPruning;
use crate::checkpoint::experts::{ExpertLayout, ExpertMatrix};
use crate::checkpoint::{fp8, Checkpoint};
use crate::error::{Error, Result};

/// The layout of a pruned layer: the same names, `kept` experts.
pub fn pruned_layout(layout: &ExpertLayout, kept: usize) -> ExpertLayout {
    ExpertLayout {
        num_experts: kept,
        ..layout.clone()
    }
}

/// Keeps the router rows (and DeepSeek's `e_score_correction_bias` entries) of the kept experts,
/// in their new order, in a layer's tensors as copied from the checkpoint.
pub fn slice_router(
    tensors: &mut HashMap<String, Tensor>,
    block: &str,
    kept: &[usize],
    original_experts: usize,
) -> Result<()> {
    let index = kept_index(kept)?;
    for name in [
        format!("{block}.gate.weight"),
        format!("{block}.gate.e_score_correction_bias"),
    ] {
        if let Some(tensor) = tensors.get_mut(&name) {
            if tensor.dim(0)? != original_experts {
                return Err(Error::InvalidArgument(format!(
                    "`{name}` has {} rows, expected one per expert ({original_experts})",
                    tensor.dim(0)?
                )));
            }
            *tensor = tensor.index_select(&index, 0)?;
        }
    }
    Ok(())
}

/// The kept experts' original indices as a u32 index tensor on the CPU.
fn kept_index(kept: &[usize]) -> Result<Tensor> {
    let values: Vec<u32> = kept.iter().map(|&e| e as u32).collect();
    Ok(Tensor::from_vec(
        values,
        kept.len(),
        &candle_core::Device::Cpu,
    )?)
}

/// The tensors of a pruned layer's kept experts as stored: per-expert tensors (with their FP8
/// scales) copied byte for byte under the new index, fused 3-D tensors cut to the kept experts.
pub fn kept_expert_tensors(
    checkpoint: &Checkpoint,
    experts: &LayerExperts,
) -> Result<HashMap<String, Tensor>> {
    let (source, pruned) = (experts.source_layout(), experts.layout);
    let mut tensors = HashMap::new();
    for matrix in ExpertMatrix::ALL {
        if source.is_fused(checkpoint, matrix) {
            let name = source.fused_name(matrix);
            if tensors.contains_key(&name) {
                continue;
            }
            let kept: Vec<usize> = (0..pruned.num_experts)
                .map(|e| experts.source_index(e))
                .collect();
            let index = kept_index(&kept)?;
            for name in [name.clone(), fp8::scale_name(&name)] {
                if checkpoint.contains(&name) {
                    let stored = checkpoint.load_verbatim(&name, "pruned experts")?;
                    tensors.insert(name, stored.index_select(&index, 0)?);
                }
            }
            continue;
        }
        for expert in 0..pruned.num_experts {
            let from = source.dense_name(experts.source_index(expert), matrix);
            let to = pruned.dense_name(expert, matrix);
            for (from, to) in [
                (from.clone(), to.clone()),
                (fp8::scale_name(&from), fp8::scale_name(&to)),
            ] {
                if checkpoint.contains(&from) {
                    tensors.insert(to, checkpoint.load_verbatim(&from, "pruned experts")?);
                }
            }
        }
    }
    Ok(tensors)
}

/// Keys of `config.json` that hold the routed-expert count, per family.
const EXPERT_COUNT_KEYS: [&str; 3] = ["num_experts", "num_local_experts", "n_routed_experts"];

/// The `config.json` changes of a pruned output.
#[derive(Debug, Clone)]
pub struct PrunedConfig {
    /// Experts per layer after pruning.
    pub kept_experts: usize,
    /// Whether the output also holds compressed experts (keeps its `compression` record).
    pub factored: bool,
    /// The `pruning` section: the saliency, the original count and each layer's kept experts.
    pub summary: serde_json::Value,
}

impl PrunedConfig {
    /// The changes for the layers' `pruning` reports; `factored` when the output also holds
    /// compressed experts. None when no layer removed an expert.
    pub fn new(layers: &[(usize, &LayerPruning)], factored: bool) -> Result<Option<Self>> {
        let Some((_, first)) = layers.first() else {
            return Ok(None);
        };
        if let Some((layer, p)) = layers
            .iter()
            .find(|(_, p)| p.kept.len() != first.kept.len())
        {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} keeps {} experts where another keeps {}: an output holds one \
                 expert count",
                p.kept.len(),
                first.kept.len()
            )));
        }
        let kept: serde_json::Map<String, serde_json::Value> = layers
            .iter()
            .map(|(layer, p)| (layer.to_string(), serde_json::json!(p.kept)))
            .collect();
        Ok(Some(Self {
            kept_experts: first.kept.len(),
            factored,
            summary: serde_json::json!({
                "saliency": first.saliency.name(),
                "original_num_experts": first.original_experts,
                "kept_experts": kept,
            }),
        }))
    }

    /// Sets the expert count under every key the family uses, adds the `pruning` section and,
    /// for a pure pruning, drops the `compression` record (the output is a normal checkpoint).
    pub fn edit(&self, config: &mut serde_json::Value, with_record: bool) {
        let Some(fields) = config.as_object_mut() else {
            return;
        };
        for key in EXPERT_COUNT_KEYS {
            if fields.contains_key(key) {
                fields.insert(key.into(), self.kept_experts.into());
            }
        }
        if !(self.factored && with_record) {
            fields.remove(crate::format::COMPRESSION_KEY);
        }
        fields.insert("pruning".into(), self.summary.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_gets_the_new_count_under_the_family_key_only() {
        let pruning = LayerPruning {
            saliency: crate::pipeline::report::Saliency::Reap,
            original_experts: 16,
            kept: (0..12).collect(),
            removed: vec![12, 13, 14, 15],
            scores: vec![1.0; 16],
            routing_counts: vec![1; 16],
            estimated_error: None,
        };
        let edit = PrunedConfig::new(&[(0, &pruning)], false).unwrap().unwrap();
        let mut config = serde_json::json!({"num_local_experts": 16, "compression": {}});
        edit.edit(&mut config, true);
        assert_eq!(config["num_local_experts"], 12);
        assert!(config.get("num_experts").is_none() && config.get("compression").is_none());
        assert_eq!(config["pruning"]["original_num_experts"], 16);
        let mut other = pruning.clone();
        other.kept.pop();
        assert!(PrunedConfig::new(&[(0, &pruning), (1, &other)], false).is_err());
    }
}
