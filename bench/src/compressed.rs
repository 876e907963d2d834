//! Compressed checkpoints written directly in rfid-moe's format (docs/FORMAT.md) with random
//! factors, at the ranks `rfid-moe compress --ratio ρ --allocation uniform` would choose for the
//! default group size. The runtime's speed and memory depend only on these shapes, and running
//! the real `compress` at real shapes takes about ten minutes per layer on a small CPU.
//!
//! Groups are consecutive expert indices (`compress` groups by descending routing frequency,
//! which on random weights is an arbitrary order; every group has the same shape either way).

use std::collections::BTreeMap;
use std::path::Path;

use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::format::{
    basis_name, coefficients_name, CompressionRecord, GroupRecord, LayerRecord, MatrixRecord,
};
use rfid_moe::pipeline::methods::lowrank::allocate::{
    allocate_ranks, budget_for_ratio, importance_scores, Allocation, GroupAllocation, GroupShape,
};
use rfid_moe::pipeline::methods::lowrank::LowRankSettings;
use rfid_moe::pipeline::options::CalibrationOptions;
use serde_json::json;

use crate::synthetic::{self, CheckpointPlan, RandomTensors, Shape};
use crate::variants::PrunePlan;

/// The groups and ranks of one compressed matrix type (the same in every layer).
#[derive(Debug, Clone)]
pub struct UniformPlan {
    /// Fraction ρ of the gate and up parameters removed.
    pub ratio: f64,
    /// Experts per group.
    pub group_size: usize,
    /// Member experts of each group.
    pub groups: Vec<Vec<usize>>,
    /// Each group's shape.
    pub shapes: Vec<GroupShape>,
    /// Each group's rank (or dense).
    pub allocations: Vec<GroupAllocation>,
}

impl UniformPlan {
    /// The plan `compress` makes at `ratio` with the uniform allocation, the default group size
    /// (resolved, as `compress` does, against the checkpoint's `experts_before` experts, which
    /// removal may since have cut to those of `s`) and the default dense fallback.
    pub fn new(s: &Shape, ratio: f64, experts_before: usize) -> anyhow::Result<Self> {
        let group_size = CalibrationOptions::default()
            .group_size
            .resolve([(experts_before, s.hidden)]);
        let experts: Vec<usize> = (0..s.experts).collect();
        let groups: Vec<Vec<usize>> = experts.chunks(group_size).map(<[_]>::to_vec).collect();
        let shapes: Vec<GroupShape> = groups
            .iter()
            .map(|g| GroupShape {
                experts: g.len(),
                rows_per_expert: s.expert_intermediate,
                cols: s.hidden,
            })
            .collect();
        let scores = importance_scores(Allocation::Uniform, &vec![0.0; shapes.len()], &[], 0.0);
        let budget = budget_for_ratio(&shapes, ratio);
        let dense_fallback = LowRankSettings::paper().dense_fallback;
        let allocations = allocate_ranks(&shapes, &scores, budget, &[], dense_fallback)?;
        Ok(Self {
            ratio,
            group_size,
            groups,
            shapes,
            allocations,
        })
    }

    /// Parameters kept per matrix type and layer.
    pub fn kept_params(&self) -> usize {
        self.allocations
            .iter()
            .zip(&self.shapes)
            .map(|(a, s)| a.params(s))
            .sum()
    }

    /// Parameters of the dense matrix type per layer.
    pub fn dense_params(&self) -> usize {
        self.shapes.iter().map(GroupShape::dense_params).sum()
    }

    /// The largest cost of one rank over the groups (the allocation's rounding step).
    pub fn largest_rank_cost(&self) -> usize {
        self.shapes
            .iter()
            .map(GroupShape::rank_cost)
            .max()
            .unwrap_or(0)
    }

    /// The distinct ranks of factored groups, ascending.
    pub fn ranks(&self) -> Vec<usize> {
        let mut ranks: Vec<usize> = self
            .allocations
            .iter()
            .filter(|a| !a.dense)
            .map(|a| a.rank)
            .collect();
        ranks.sort_unstable();
        ranks.dedup();
        ranks
    }

    fn matrix_record(&self) -> MatrixRecord {
        MatrixRecord {
            groups: self
                .groups
                .iter()
                .zip(&self.allocations)
                .map(|(experts, a)| GroupRecord {
                    experts: experts.clone(),
                    rank: a.rank,
                    dense: a.dense,
                    residual_size: 0,
                    storage: Vec::new(),
                })
                .collect(),
        }
    }

    /// The `compression` section of `config.json` for `layers` layers of `s`.
    pub fn record(&self, s: &Shape, layers: usize) -> CompressionRecord {
        let [gate, up, _] = s.expert_matrix_names();
        CompressionRecord {
            method: "rfid-moe".into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            basis_activation: Default::default(),
            residual_seed: 0,
            settings: json!({
                "synthetic": "random factors written by rfid-moe-bench (not a compress run)",
                "allocation": { "ratio": self.ratio, "policy": "uniform" },
                "calibration": { "group_size": self.group_size },
            }),
            calibration_fingerprint: String::new(),
            factor_storage: None,
            layers: (0..layers)
                .map(|layer| LayerRecord {
                    layer,
                    matrices: BTreeMap::from([
                        (gate.to_string(), self.matrix_record()),
                        (up.to_string(), self.matrix_record()),
                    ]),
                })
                .collect(),
        }
    }

    /// Adds random factors (or dense matrices for dense groups) of gate and up to `shard`:
    /// bases with standard deviation [`synthetic::WEIGHT_STD`], coefficients `1/√K`, so that the product
    /// has the dense weights' scale.
    fn add_factors(&self, s: &Shape, layer: usize, shard: &mut synthetic::Shard) {
        let block = s.moe_block(layer);
        let [gate, up, _] = s.expert_matrix_names();
        let mut random = RandomTensors::new(0xfac7_0000 + layer as u64 * 1_000);
        let (p, d) = (s.expert_intermediate, s.hidden);
        for matrix in [gate, up] {
            for (g, (experts, a)) in self.groups.iter().zip(&self.allocations).enumerate() {
                if a.dense {
                    for &e in experts {
                        let name = format!("{block}.experts.{e}.{matrix}.weight");
                        shard.insert(name, random.weight(vec![p, d]));
                    }
                    continue;
                }
                let k = a.rank;
                shard.insert(basis_name(&block, g, matrix), random.weight(vec![k, d]));
                for &e in experts {
                    let coefficients = random.with_std(vec![p, k], 1.0 / (k as f32).sqrt());
                    shard.insert(coefficients_name(&block, e, matrix), coefficients);
                }
            }
        }
    }
}

/// Writes the compressed checkpoint of `plan` for `s` into the new directory `out`; its
/// attention, router, norms, down projections and ends are those of the original written by
/// [`synthetic::write_checkpoint`] with the same shape.
pub fn write_compressed(
    s: &Shape,
    plan: &UniformPlan,
    vocab: usize,
    out: &Path,
) -> anyhow::Result<()> {
    write_with_config(s, plan, vocab, out, serde_json::Map::new())
}

/// Writes the pruned and compressed checkpoint of `prune` and `plan` into the new directory
/// `out`: `kept` is the original shape with `prune.kept()` experts per layer (its router has
/// that many rows), `plan` its factors, and `config.json` the `pruning` section of a
/// `prune+lowrank` output (docs/FORMAT.md, "Pruned outputs"). With random weights no expert is
/// more salient than another, so the first `prune.kept()` are the kept ones.
pub fn write_pruned_compressed(
    kept: &Shape,
    plan: &UniformPlan,
    prune: &PrunePlan,
    vocab: usize,
    out: &Path,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        kept.experts == prune.kept(),
        "the pruned shape has {} experts, the plan keeps {}",
        kept.experts,
        prune.kept()
    );
    let kept_experts: serde_json::Map<String, serde_json::Value> = (0..kept.layers())
        .map(|layer| {
            (
                layer.to_string(),
                json!((0..prune.kept()).collect::<Vec<_>>()),
            )
        })
        .collect();
    let mut config = serde_json::Map::new();
    config.insert(
        "pruning".into(),
        json!({
            "saliency": "reap",
            "original_num_experts": prune.experts,
            "kept_experts": kept_experts,
        }),
    );
    write_with_config(kept, plan, vocab, out, config)
}

/// [`write_compressed`] with `extra_config` added to `config.json`.
fn write_with_config(
    s: &Shape,
    plan: &UniformPlan,
    vocab: usize,
    out: &Path,
    mut extra_config: serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let layers = s.layers();
    extra_config.insert(
        rfid_moe::format::COMPRESSION_KEY.into(),
        serde_json::to_value(plan.record(s, layers))?,
    );
    synthetic::write_checkpoint(
        s,
        out,
        CheckpointPlan {
            vocab,
            dense_gate_up: false,
            extend_layer: &mut |layer, shard| {
                plan.add_factors(s, layer, shard);
                Ok(())
            },
            extra_config,
            verbose: false,
        },
    )
}

/// Routed-expert parameters of a checkpoint, summed over layers, read from its tensor headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExpertParams {
    /// Gate and up (what `compress` targets): dense weights, bases and coefficients.
    pub gate_up: usize,
    /// Down projections.
    pub down: usize,
}

impl ExpertParams {
    /// Gate, up and down together.
    pub fn total(&self) -> usize {
        self.gate_up + self.down
    }
}

/// Counts the routed-expert parameters of `checkpoint` (tensors under `{block}.experts.` and
/// `{block}.expert_groups.` of every layer of `s`).
pub fn expert_params(checkpoint: &Checkpoint, s: &Shape, layers: usize) -> ExpertParams {
    let [gate, up, down] = s.expert_matrix_names();
    let mut params = ExpertParams::default();
    for layer in 0..layers {
        let block = s.moe_block(layer);
        let prefixes = [
            format!("{block}.experts."),
            format!("{block}.expert_groups."),
        ];
        for name in checkpoint.tensor_names() {
            if !prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                continue;
            }
            let Some((info, _)) = checkpoint.info(name) else {
                continue;
            };
            // A packed matrix (`….{matrix}.weight.{scheme}`) stands for `rows × cols`.
            let (name, elements) =
                rfid_moe::checkpoint::packed::packed_parameters(name, &info.shape)
                    .unwrap_or((name, info.shape.iter().product()));
            // `….{matrix}.weight`, `….{matrix}.lowrank_a`, `….{matrix}.basis`.
            let matrix = name.rsplit('.').nth(1).unwrap_or_default();
            if matrix == gate || matrix == up {
                params.gate_up += elements;
            } else if matrix == down {
                params.down += elements;
            }
        }
    }
    params
}
