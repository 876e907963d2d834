//! `rfid-moe inspect`: what a checkpoint is, and where its parameters are.

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::models::{compression_record, ArchConfig, Family};

/// Parameter counts split by role.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ParameterCounts {
    /// Routed experts (dense or factored, residuals included).
    pub routed_experts: u64,
    /// Shared experts and their gates.
    pub shared_experts: u64,
    /// Everything else: attention, routers, norms, embeddings, head.
    pub other: u64,
    /// The sum.
    pub total: u64,
}

/// The role of a tensor, judged from its Hugging Face name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// Part of a routed expert.
    RoutedExpert,
    /// Part of a shared expert.
    SharedExpert,
    /// Anything else.
    Other,
}

/// Classifies a tensor name.
pub fn tensor_role(name: &str) -> TensorRole {
    if name.contains(".shared_expert") {
        TensorRole::SharedExpert
    } else if name.contains(".experts.") || name.contains(".expert_groups.") {
        TensorRole::RoutedExpert
    } else {
        TensorRole::Other
    }
}

/// Counts a checkpoint's parameters by role from the shard headers (no data is read); the
/// block scales of an FP8 weight are part of its storage, not parameters, and a packed matrix
/// counts the parameters it stands for.
pub fn parameter_counts(checkpoint: &Checkpoint) -> ParameterCounts {
    let mut counts = ParameterCounts::default();
    for name in checkpoint.tensor_names() {
        if checkpoint.is_quantisation_scale(name) {
            continue;
        }
        let Some((info, _)) = checkpoint.info(name) else {
            continue;
        };
        // A packed matrix's bytes stand for `rows × cols` parameters.
        let n = crate::checkpoint::packed::packed_parameters(name, &info.shape)
            .map_or(info.numel(), |(_, parameters)| parameters) as u64;
        match tensor_role(name) {
            TensorRole::RoutedExpert => counts.routed_experts += n,
            TensorRole::SharedExpert => counts.shared_experts += n,
            TensorRole::Other => counts.other += n,
        }
        counts.total += n;
    }
    counts
}

/// What `inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    /// Checkpoint directory.
    pub path: String,
    /// Architecture family.
    pub family: Family,
    /// Decoder layers.
    pub num_layers: usize,
    /// Indices of MoE layers.
    pub moe_layers: Vec<usize>,
    /// Indices of dense layers.
    pub dense_layers: Vec<usize>,
    /// Routed experts per MoE layer.
    pub experts_per_layer: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Shared-expert intermediate size per MoE layer (0 = none).
    pub shared_expert_intermediate_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Routed expert intermediate size.
    pub expert_intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Dominant storage dtype.
    pub dtype: String,
    /// Parameters by role.
    pub parameters: ParameterCounts,
    /// Bytes of the safetensors files.
    pub bytes_on_disk: u64,
    /// Number of shard files.
    pub shards: usize,
    /// Whether the checkpoint was written by `rfid-moe compress`.
    pub compressed: bool,
    /// How a compressed checkpoint stores its factors (`int8-row128`), when not as `dtype`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub factor_storage: Option<String>,
}

/// Summarises the checkpoint at `checkpoint`.
pub fn summarize(checkpoint: &Checkpoint) -> Result<ModelSummary> {
    let config = ArchConfig::from_checkpoint(checkpoint)?;
    let spec = config.spec();
    let moe_layers = spec.moe_layer_indices();
    let first = spec.moe_layers.iter().flatten().next();
    let record = compression_record(checkpoint)?;
    Ok(ModelSummary {
        path: checkpoint.dir().display().to_string(),
        family: spec.family,
        num_layers: spec.num_layers,
        dense_layers: (0..spec.num_layers)
            .filter(|i| !moe_layers.contains(i))
            .collect(),
        moe_layers,
        experts_per_layer: first.map_or(0, |l| l.num_experts),
        top_k: spec.top_k,
        shared_expert_intermediate_size: spec.shared_expert_intermediate_size,
        hidden_size: spec.hidden_size,
        expert_intermediate_size: first.map_or(0, |l| l.intermediate_size),
        vocab_size: spec.vocab_size,
        dtype: checkpoint.dominant_dtype().name().to_string(),
        parameters: parameter_counts(checkpoint),
        bytes_on_disk: checkpoint.bytes_on_disk(),
        shards: checkpoint.shard_paths().len(),
        compressed: record.is_some(),
        factor_storage: record.and_then(|r| r.factor_storage),
    })
}

impl std::fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.parameters;
        let pct = |n: u64| {
            if p.total == 0 {
                0.0
            } else {
                100.0 * n as f64 / p.total as f64
            }
        };
        writeln!(f, "model            {}", self.path)?;
        writeln!(
            f,
            "family           {}{}",
            self.family.model_type(),
            if self.compressed {
                " (rfid-moe compressed)"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "layers           {} ({} MoE, {} dense: {:?})",
            self.num_layers,
            self.moe_layers.len(),
            self.dense_layers.len(),
            self.dense_layers
        )?;
        writeln!(
            f,
            "experts/layer    {} routed, top-{}",
            self.experts_per_layer, self.top_k
        )?;
        writeln!(
            f,
            "shared experts   {}",
            if self.shared_expert_intermediate_size > 0 {
                format!("intermediate {}", self.shared_expert_intermediate_size)
            } else {
                "none".into()
            }
        )?;
        writeln!(
            f,
            "sizes            hidden {}, expert intermediate {}, vocab {}",
            self.hidden_size, self.expert_intermediate_size, self.vocab_size
        )?;
        match &self.factor_storage {
            Some(storage) => writeln!(f, "dtype            {} (factors {storage})", self.dtype)?,
            None => writeln!(f, "dtype            {}", self.dtype)?,
        }
        writeln!(f, "parameters       {} total", p.total)?;
        writeln!(
            f,
            "  routed experts {:>12} ({:.1}%)",
            p.routed_experts,
            pct(p.routed_experts)
        )?;
        writeln!(
            f,
            "  shared experts {:>12} ({:.1}%)",
            p.shared_experts,
            pct(p.shared_experts)
        )?;
        writeln!(f, "  other          {:>12} ({:.1}%)", p.other, pct(p.other))?;
        write!(
            f,
            "on disk          {} bytes in {} file(s)",
            self.bytes_on_disk, self.shards
        )
    }
}

/// Checks the per-layer reports of the compressed output in `checkpoint` (its
/// `compression_report.json`) against what the output holds, so that charts never show ranks the
/// weights do not have: every group's experts, rank and dense flag must be those of the
/// compression record in `config.json`, and the basis of every factored group must be stored at
/// that rank.
pub fn check_layer_reports(
    checkpoint: &Checkpoint,
    layers: &[crate::pipeline::LayerReport],
) -> Result<()> {
    let config = checkpoint.config_path();
    let report = checkpoint.dir().join(crate::model_card::REPORT_FILE);
    let contradiction = |message: String| Error::Json {
        path: report.clone(),
        message: format!("{message}; the report contradicts the weights"),
    };
    if layers.iter().all(|l| l.matrices.is_empty()) {
        return Ok(());
    }
    let record = compression_record(checkpoint)?.ok_or_else(|| Error::Config {
        path: config.clone(),
        message: "no `compression` record, but compression_report.json reports factored groups"
            .into(),
    })?;
    let spec = ArchConfig::from_checkpoint(checkpoint)?.spec();
    for layer in layers.iter().filter(|l| !l.matrices.is_empty()) {
        let index = layer.layer;
        let layout = spec
            .moe_layers
            .get(index)
            .cloned()
            .flatten()
            .ok_or_else(|| {
                contradiction(format!(
                    "layer {index} is reported, but it is not a MoE layer"
                ))
            })?;
        let recorded = record.layer(index).ok_or_else(|| {
            contradiction(format!(
                "layer {index} is reported, but config.json has no record of it"
            ))
        })?;
        for (matrix, groups) in &layer.matrices {
            let Some(stored) = recorded.matrices.get(matrix) else {
                return Err(contradiction(format!(
                    "layer {index} `{matrix}` is reported, but config.json has no record of it"
                )));
            };
            if stored.groups.len() != groups.len() {
                return Err(contradiction(format!(
                    "layer {index} `{matrix}` has {} groups, config.json {}",
                    groups.len(),
                    stored.groups.len()
                )));
            }
            let output_side = layout.name(crate::checkpoint::experts::ExpertMatrix::Down) == matrix;
            for (g, (reported, stored)) in groups.iter().zip(&stored.groups).enumerate() {
                if (&reported.experts, reported.rank, reported.dense)
                    != (&stored.experts, stored.rank, stored.dense)
                {
                    return Err(contradiction(format!(
                        "layer {index} `{matrix}` group {g} is reported with rank {} (dense: {}, \
                         experts {:?}), but config.json records rank {} (dense: {}, experts {:?})",
                        reported.rank,
                        reported.dense,
                        reported.experts,
                        stored.rank,
                        stored.dense,
                        stored.experts
                    )));
                }
                if !stored.dense {
                    check_basis_rank(
                        checkpoint,
                        &layout.block,
                        (g, matrix),
                        stored.rank,
                        output_side,
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// Checks that group `g`'s basis of `matrix` under `block` is stored at rank `rank`: `[rank, d]`,
/// or `[d, rank]` when shared on the output side.
fn check_basis_rank(
    checkpoint: &Checkpoint,
    block: &str,
    (g, matrix): (usize, &str),
    rank: usize,
    output_side: bool,
) -> Result<()> {
    let name = crate::format::basis_name(block, g, matrix);
    let Some((info, path)) = checkpoint.info(&name) else {
        return Err(Error::MissingTensor {
            name,
            dir: checkpoint.dir().to_path_buf(),
            expected_by: format!("the compression record (group {g} of `{matrix}` at rank {rank})"),
        });
    };
    let stored = match (output_side, info.shape.as_slice()) {
        (false, [rows, _]) => Some(*rows),
        (true, [_, cols]) => Some(*cols),
        _ => None,
    };
    if stored == Some(rank) {
        return Ok(());
    }
    Err(Error::Safetensors {
        path: path.to_path_buf(),
        message: format!(
            "basis `{name}` has shape {:?}, but the compression record and the report give it \
             rank {rank}",
            info.shape
        ),
    })
}
