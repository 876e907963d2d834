//! The plain data that methods, the solver and the emitter exchange: the candidates each method
//! offers for the units of a layer, the plan the solver chooses, and the stored tensors a chosen
//! candidate becomes.
//!
//! A *slot* is one expert's matrix (gate, up or down of expert j); a *group unit* is one matrix
//! of every member of an expert group (a shared basis covers them all). The solver chooses, for
//! each group and matrix, either one group candidate or one slot candidate per member.

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::report::{GroupReport, LayerPruning};
use crate::checkpoint::experts::ExpertMatrix;

/// What a candidate covers in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// One expert's matrix (experts numbered after removal).
    Slot {
        /// The matrix.
        matrix: ExpertMatrix,
        /// The expert.
        expert: usize,
    },
    /// One matrix of every member of an expert group.
    Group {
        /// The matrix.
        matrix: ExpertMatrix,
        /// The group's index in the layer's groups.
        group: usize,
    },
}

impl Unit {
    /// The matrix the unit belongs to.
    pub fn matrix(&self) -> ExpertMatrix {
        match *self {
            Unit::Slot { matrix, .. } | Unit::Group { matrix, .. } => matrix,
        }
    }
}

/// The signals of the paper's allocation for one group (reported beside its rank).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct GroupSignals {
    /// Effective rank of the stacked weights.
    pub effective_rank: f64,
    /// Group routing frequency `F_g`.
    pub frequency: f64,
    /// Normalised density `E_g`.
    pub density: f64,
    /// Fused score `C_g`.
    pub score: f64,
    /// Parameters reserved for the sparse residual.
    pub reserved: usize,
}

/// One way a method offers to store one unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The registry name of the method that offers it.
    pub method: String,
    /// What it covers.
    pub unit: Unit,
    /// The method's own description of the choice (a rank, a precision), which it reads back
    /// when applying it.
    pub variant: u64,
    /// A short label for plans and reports (`rank 37`, `int8`, `bf16`).
    pub label: String,
    /// Bytes stored, scales included.
    pub bytes: u64,
    /// Parameters stored (the paper's unit).
    pub parameters: u64,
    /// Estimated output error over the calibration tokens, relative to the layer's output
    /// energy (0 for an exact copy).
    pub error: f64,
    /// The paper's allocation signals, for group candidates of the paper's allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<GroupSignals>,
}

impl Candidate {
    /// The candidate's size in the budget's unit.
    pub fn size(&self, unit: super::options::BudgetUnit) -> f64 {
        match unit {
            super::options::BudgetUnit::Bytes => self.bytes as f64,
            super::options::BudgetUnit::Parameters => self.parameters as f64,
        }
    }
}

/// How much a layer's covered slots may keep, in the budget's unit.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LayerTarget {
    /// The covered slots' size in the input (removed experts included).
    pub before: f64,
    /// What the layer's covered slots may keep (`(1 − ρ)·before`, less what the budget's other
    /// tensors keep).
    pub target: f64,
}

/// Everything the solver needs about one layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerOffer {
    /// Decoder layer index.
    pub layer: usize,
    /// The expert groups (after removal).
    pub groups: Vec<Vec<usize>>,
    /// The matrices under the budget.
    pub matrices: Vec<ExpertMatrix>,
    /// Every method's candidates.
    pub candidates: Vec<Candidate>,
    /// The layer's share of the budget.
    pub target: LayerTarget,
    /// The experts removed before the offer (the same for the plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<LayerPruning>,
}

/// The solver's choice for one layer: one candidate per group unit or per slot, covering every
/// slot of the covered matrices once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    /// Decoder layer index.
    pub layer: usize,
    /// The chosen candidates, in unit order.
    pub chosen: Vec<Candidate>,
    /// The layer's share of the budget.
    pub target: LayerTarget,
    /// The experts removed before the offer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<LayerPruning>,
}

impl LayerPlan {
    /// The plan's size in the budget's unit.
    pub fn size(&self, unit: super::options::BudgetUnit) -> f64 {
        self.chosen.iter().map(|c| c.size(unit)).sum()
    }

    /// The plan's estimated error.
    pub fn error(&self) -> f64 {
        self.chosen.iter().map(|c| c.error).sum()
    }

    /// The chosen candidates of method `name`.
    pub fn of_method(&self, name: &str) -> Vec<Candidate> {
        self.chosen
            .iter()
            .filter(|c| c.method == name)
            .cloned()
            .collect()
    }
}

/// Tensors as they are written: floats in their dtype, int8 codes (`U8` holding the `I8` bytes)
/// named in `int8`.
#[derive(Debug, Default)]
pub struct StoredTensors {
    /// Tensor by name.
    pub tensors: HashMap<String, Tensor>,
    /// Names of the tensors written as `I8`.
    pub int8: HashSet<String>,
}

impl StoredTensors {
    /// Adds a tensor as it is.
    pub fn insert(&mut self, name: String, tensor: Tensor) {
        self.tensors.insert(name, tensor);
    }

    /// Adds int8 codes (`U8` holding the `I8` bytes).
    pub fn insert_int8(&mut self, name: String, codes: Tensor) {
        self.int8.insert(name.clone());
        self.tensors.insert(name, codes);
    }

    /// Moves every tensor of `other` in.
    pub fn extend(&mut self, other: StoredTensors) {
        self.tensors.extend(other.tensors);
        self.int8.extend(other.int8);
    }
}

/// What applying one chosen candidate gives.
#[derive(Debug)]
pub struct UnitOutput {
    /// The unit.
    pub unit: Unit,
    /// Its stored tensors, under their final names.
    pub tensors: StoredTensors,
    /// Per member (one for a slot), the matrix it now stands for, dense `[out, in]`, when the
    /// run also exports a dense checkpoint.
    pub reconstruction: Vec<Tensor>,
    /// The shared basis' rank (0 for members stored on their own).
    pub rank: usize,
    /// Residual coefficients stored (0 = none).
    pub residual_size: usize,
    /// How the unit is stored (`bf16`, `int8-row128`, `fp8`, …), for the record.
    pub storage: String,
    /// Whether the tensors are the input's own, unchanged (a layer whose every unit is kept as
    /// stored is written in the input's layout).
    pub as_stored: bool,
    /// The group's report (group units).
    pub report: Option<GroupReport>,
}
