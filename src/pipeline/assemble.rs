//! Assembling a layer from the tensors of its chosen candidates: the compression record and the
//! per-group reports of every covered matrix (a group is either one shared-basis unit or its
//! members stored on their own), the uncovered matrices as stored, and the dense export.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor};

use super::calibrate::LayerStatistics;
use super::experts::LayerExperts;
use super::plan::{LayerPlan, StoredTensors, Unit, UnitOutput};
use super::report::GroupReport;
use crate::checkpoint::experts::ExpertMatrix;
use crate::error::{Error, Result};
use crate::format::{GroupRecord, LayerRecord, MatrixRecord};

/// One layer ready to write.
#[derive(Debug, Default)]
pub struct AssembledLayer {
    /// Decoder layer index.
    pub layer: usize,
    /// The layer's compression record (None when every expert is kept as stored: the layer is
    /// then written in the input's layout).
    pub record: Option<LayerRecord>,
    /// Per matrix name, per group.
    pub reports: BTreeMap<String, Vec<GroupReport>>,
    /// The routed experts' stored tensors.
    pub compressed: StoredTensors,
    /// The routed experts of the dense export (when asked for).
    pub dense: HashMap<String, Tensor>,
}

/// What [`assemble`] reads besides the outputs.
pub struct LayerParts<'a, M> {
    /// The layer's experts (after removal).
    pub experts: &'a LayerExperts<'a>,
    /// Its statistics (groups, frequencies).
    pub statistics: &'a LayerStatistics<M>,
    /// The solver's plan.
    pub plan: &'a LayerPlan,
    /// The covered matrices.
    pub matrices: &'a [ExpertMatrix],
    /// The float dtype matrices are written in.
    pub stored_dtype: DType,
    /// Whether a dense export is written.
    pub export_dense: bool,
}

/// Puts the chosen units' `outputs` together into one layer.
pub fn assemble<M>(parts: &LayerParts<M>, outputs: Vec<UnitOutput>) -> Result<AssembledLayer> {
    let experts = parts.experts;
    let layout = experts.layout;
    let as_stored = outputs.iter().all(|o| o.as_stored);
    let mut groups_of: HashMap<(ExpertMatrix, usize), UnitOutput> = HashMap::new();
    let mut slots_of: HashMap<(ExpertMatrix, usize), UnitOutput> = HashMap::new();
    for output in outputs {
        match output.unit {
            Unit::Group { matrix, group } => groups_of.insert((matrix, group), output),
            Unit::Slot { matrix, expert } => slots_of.insert((matrix, expert), output),
        };
    }
    let mut layer = AssembledLayer {
        layer: parts.statistics.layer,
        ..AssembledLayer::default()
    };
    let mut records = BTreeMap::new();
    let frequencies = parts.statistics.group_frequencies();
    for &matrix in parts.matrices {
        let name = layout.name(matrix);
        let mut group_records = Vec::new();
        let mut group_reports = Vec::new();
        for (g, members) in parts.statistics.groups.iter().enumerate() {
            let (record, report) = match groups_of.remove(&(matrix, g)) {
                Some(unit) => group_unit(&mut layer, members, unit, parts)?,
                None => {
                    let mut units = Vec::new();
                    for &e in members {
                        let unit = slots_of.remove(&(matrix, e)).ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "layer {}: the plan stores neither group {g} nor expert {e} of \
                                 {matrix}",
                                layer.layer
                            ))
                        })?;
                        units.push(unit);
                    }
                    member_units(&mut layer, (matrix, members), units, parts, frequencies[g])?
                }
            };
            group_records.push(record);
            group_reports.push(report);
        }
        records.insert(
            name.to_string(),
            MatrixRecord {
                groups: group_records,
            },
        );
        layer.reports.insert(name.to_string(), group_reports);
    }
    // Matrices outside the budget stay dense, written per expert from the canonical view.
    for matrix in ExpertMatrix::ALL {
        if parts.matrices.contains(&matrix) {
            continue;
        }
        for expert in 0..layout.num_experts {
            for (key, tensor) in experts.stored_tensors(expert, matrix, parts.stored_dtype)? {
                if parts.export_dense {
                    layer.dense.insert(key.clone(), tensor.clone());
                }
                layer.compressed.insert(key, tensor);
            }
        }
    }
    if !as_stored {
        layer.record = Some(LayerRecord {
            layer: layer.layer,
            matrices: records,
        });
    }
    Ok(layer)
}

/// A group stored as one unit (a shared basis, or the paper's dense group).
fn group_unit<M>(
    layer: &mut AssembledLayer,
    members: &[usize],
    unit: UnitOutput,
    parts: &LayerParts<M>,
) -> Result<(GroupRecord, GroupReport)> {
    let layout = parts.experts.layout;
    let matrix = unit.unit.matrix();
    let report = unit.report.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "layer {}: a group unit of {matrix} came without its report",
            layer.layer
        ))
    })?;
    if parts.export_dense {
        for (slot, &expert) in members.iter().enumerate() {
            let rebuilt = unit.reconstruction.get(slot).ok_or_else(|| {
                Error::InvalidArgument("a group unit came without its reconstruction".into())
            })?;
            layer
                .dense
                .insert(layout.dense_name(expert, matrix), rebuilt.clone());
        }
    }
    layer.compressed.extend(unit.tensors);
    let record = GroupRecord {
        experts: members.to_vec(),
        rank: report.rank,
        dense: report.dense,
        residual_size: unit.residual_size,
        storage: match report.dense {
            true => vec![unit.storage; members.len()],
            false => vec![unit.storage],
        },
    };
    Ok((record, report))
}

/// A group whose members are stored on their own.
fn member_units<M>(
    layer: &mut AssembledLayer,
    (matrix, members): (ExpertMatrix, &[usize]),
    units: Vec<UnitOutput>,
    parts: &LayerParts<M>,
    frequency: f64,
) -> Result<(GroupRecord, GroupReport)> {
    let layout = parts.experts.layout;
    let [rows, cols] = layout.shape(matrix);
    let chosen: Vec<_> = members
        .iter()
        .filter_map(|&e| {
            parts
                .plan
                .chosen
                .iter()
                .find(|c| c.unit == (Unit::Slot { matrix, expert: e }))
        })
        .collect();
    let mut storage = Vec::new();
    for (unit, &expert) in units.into_iter().zip(members) {
        if parts.export_dense {
            if let Some(rebuilt) = unit.reconstruction.into_iter().next() {
                layer
                    .dense
                    .insert(layout.dense_name(expert, matrix), rebuilt);
            }
        }
        storage.push(unit.storage);
        layer.compressed.extend(unit.tensors);
    }
    let methods: Vec<&str> = chosen.iter().map(|c| c.method.as_str()).collect();
    let after = chosen.iter().map(|c| c.parameters).sum();
    let report = GroupReport {
        method: Some(methods.join(",")),
        storage: storage.clone(),
        estimated_error: Some(chosen.iter().map(|c| c.error).sum()),
        ..GroupReport::new(
            members.to_vec(),
            frequency,
            ((members.len() * rows * cols) as u64, after),
        )
    };
    let record = GroupRecord {
        experts: members.to_vec(),
        rank: 0,
        dense: true,
        residual_size: 0,
        storage,
    };
    Ok((record, report))
}

/// The per-group reports of a plan that is not applied (a dry run): each group's rank, or its
/// members' choices.
pub fn planned_reports<M>(parts: &LayerParts<M>) -> BTreeMap<String, Vec<GroupReport>> {
    let layout = parts.experts.layout;
    let frequencies = parts.statistics.group_frequencies();
    let mut reports = BTreeMap::new();
    for &matrix in parts.matrices {
        let [rows, cols] = layout.shape(matrix);
        let mut groups = Vec::new();
        for (g, members) in parts.statistics.groups.iter().enumerate() {
            let unit = Unit::Group { matrix, group: g };
            let chosen: Vec<_> = match parts.plan.chosen.iter().find(|c| c.unit == unit) {
                Some(c) => vec![c],
                None => members
                    .iter()
                    .filter_map(|&e| {
                        let slot = Unit::Slot { matrix, expert: e };
                        parts.plan.chosen.iter().find(|c| c.unit == slot)
                    })
                    .collect(),
            };
            let group = chosen.len() == 1 && matches!(chosen[0].unit, Unit::Group { .. });
            let signals = chosen.first().and_then(|c| c.signals).unwrap_or_default();
            let rank = match group {
                true if chosen[0].label != "dense" => chosen[0].variant as usize,
                _ => 0,
            };
            let before = (members.len() * rows * cols) as u64;
            let after = chosen.iter().map(|c| c.parameters).sum();
            let methods: Vec<&str> = chosen.iter().map(|c| c.method.as_str()).collect();
            groups.push(GroupReport {
                effective_rank: signals.effective_rank,
                density: signals.density,
                score: signals.score,
                rank,
                dense: rank == 0,
                residual_size: signals.reserved,
                method: Some(methods.join(",")),
                storage: chosen.iter().map(|c| c.label.clone()).collect(),
                estimated_error: Some(chosen.iter().map(|c| c.error).sum()),
                ..GroupReport::new(members.clone(), frequencies[g], (before, after))
            });
        }
        reports.insert(layout.name(matrix).to_string(), groups);
    }
    reports
}
