//! The compressed-checkpoint format: the `compression` section of `config.json` and the tensor
//! names of factored experts (documented in `docs/FORMAT.md`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The report `compress` writes next to the weights.
pub const REPORT_FILE: &str = "compression_report.json";

/// The resolved options `compress` writes next to the weights.
pub const OPTIONS_FILE: &str = "compress.toml";

/// Tokenizer and generation files copied next to the compressed weights.
pub const AUXILIARY_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// Key of the compression section in `config.json`.
pub const COMPRESSION_KEY: &str = "compression";

/// The `method` of every compression record rfid-moe writes and reads.
pub const METHOD: &str = "rfid-moe";

/// How a group basis is applied at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BasisActivation {
    /// `Ŵ_i = A_i B_g` (SVD factoriser).
    #[default]
    Identity,
    /// `Ŵ_i = A_i SiLU(B_g)` (MoBE-style basis factoriser).
    Silu,
}

/// One group of experts sharing a basis for one matrix type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Expert indices in the group (descending routing frequency).
    pub experts: Vec<usize>,
    /// Rank of the shared basis (0 when kept dense).
    pub rank: usize,
    /// Whether the group was kept dense (factoring would not save parameters).
    pub dense: bool,
    /// Number of residual coefficients η (0 = no residual).
    #[serde(default)]
    pub residual_size: usize,
    /// How the group is stored: one entry for a factored group (its factors), one per member
    /// for a dense group (`bf16`, `f16`, `f32`, `f8_e4m3`, `int8-row128`, …). Absent in records
    /// written before storage was chosen per member: the factors' storage is then the record's
    /// `factor_storage` (float when absent), and dense members are as stored, or int8 with
    /// int8 factors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage: Vec<String>,
}

impl GroupRecord {
    /// Whether member `slot` of this group (or its factors, for a factored group) is stored as
    /// int8 codes, given the record-wide `factor_storage`.
    pub fn is_int8(&self, slot: usize, factor_storage: Option<&str>) -> bool {
        let int8 = crate::checkpoint::int8::STORAGE_NAME;
        match self.storage.as_slice() {
            [] => factor_storage == Some(int8),
            [one] if !self.dense => one == int8,
            members => members.get(slot).is_some_and(|s| s == int8),
        }
    }

    /// Whether member `slot` of this dense group is stored packed in a block format
    /// ([`crate::quant::Scheme`]).
    pub fn is_packed(&self, slot: usize) -> bool {
        self.dense
            && self
                .storage
                .get(slot)
                .is_some_and(|s| crate::quant::Scheme::parse(s).is_ok())
    }
}

/// Compression of one matrix type (e.g. `gate_proj`) in one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixRecord {
    /// The groups, in order; `expert_groups.{g}` tensors follow this order.
    pub groups: Vec<GroupRecord>,
}

/// Compression of one decoder layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Decoder layer index.
    pub layer: usize,
    /// Per matrix type, keyed by the checkpoint's own name (`gate_proj`, `up_proj`, Mixtral's `w1`, `w3`).
    pub matrices: BTreeMap<String, MatrixRecord>,
}

/// The `compression` section of a compressed checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressionRecord {
    /// Always [`METHOD`] (`rfid-moe`); a record of any other method is refused at load.
    pub method: String,
    /// Version of the tool that wrote it.
    pub tool_version: String,
    /// Activation applied to bases at inference.
    #[serde(default)]
    pub basis_activation: BasisActivation,
    /// Seed of the residual's random sparse projection.
    #[serde(default)]
    pub residual_seed: u64,
    /// The resolved settings the checkpoint was made with.
    #[serde(default)]
    pub settings: serde_json::Value,
    /// Fingerprint of the calibration data (hash of the token windows).
    #[serde(default)]
    pub calibration_fingerprint: String,
    /// How the compressor's tensors are stored when not as floats: `int8-row128` (int8 codes
    /// with per-row scales of 128-column blocks, docs/FORMAT.md "Int8 factors"); absent for
    /// float factors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor_storage: Option<String>,
    /// Per compressed layer.
    pub layers: Vec<LayerRecord>,
}

impl CompressionRecord {
    /// The record of `layer`, if that layer was compressed.
    pub fn layer(&self, layer: usize) -> Option<&LayerRecord> {
        self.layers.iter().find(|l| l.layer == layer)
    }

    /// Number of expert matrices whose factored group carries a residual.
    pub fn residual_matrices(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.matrices.values())
            .flat_map(|m| &m.groups)
            .filter(|g| !g.dense && g.residual_size > 0)
            .map(|g| g.experts.len())
            .sum()
    }
}

/// Name of expert `expert`'s coefficient matrix `A_i` [p, rank] for `matrix` under `block` (e.g. `model.layers.3.mlp`).
pub fn coefficients_name(block: &str, expert: usize, matrix: &str) -> String {
    format!("{block}.experts.{expert}.{matrix}.lowrank_a")
}

/// Name of expert `expert`'s output-side coefficients `C_j` [rank, p] for `matrix` (`down_proj`,
/// whose group basis `U_g` [d, rank] is shared on the output side: `Ŵ_j = U_g · C_j`).
pub fn output_coefficients_name(block: &str, expert: usize, matrix: &str) -> String {
    format!("{block}.experts.{expert}.{matrix}.lowrank_c")
}

/// Name of group `group`'s basis: `B_g` [rank, d] (gate/up), `U_g` [d, rank] (down).
pub fn basis_name(block: &str, group: usize, matrix: &str) -> String {
    format!("{block}.expert_groups.{group}.{matrix}.basis")
}

/// Name of group `group`'s residual coefficients η [residual_size].
pub fn residual_name(block: &str, group: usize, matrix: &str) -> String {
    format!("{block}.expert_groups.{group}.{matrix}.residual_eta")
}
