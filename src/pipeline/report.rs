//! What a compression run reports: per group, per layer and for the whole run (also written as
//! `compression_report.json`), and the summary table the CLI prints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::analyse::routing_frequency;
use super::calibrate::LayerStatistics;
use super::options::CompressOptions;
use crate::checkpoint::experts::ExpertLayout;
use crate::error::{Error, Result};

/// One group's outcome for one matrix type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    /// Experts (descending frequency).
    pub experts: Vec<usize>,
    /// Group routing frequency F_g.
    pub frequency: f64,
    /// Effective rank of the stacked raw weights.
    pub effective_rank: f64,
    /// Normalised density E_g.
    pub density: f64,
    /// Fused score C_g.
    pub score: f64,
    /// Allocated rank (0 when dense).
    pub rank: usize,
    /// Kept dense.
    pub dense: bool,
    /// Residual coefficients.
    pub residual_size: usize,
    /// ‖W−Ŵ‖_F / ‖W‖_F.
    pub relative_error: f64,
    /// ‖(W−Ŵ)X‖_F / ‖WX‖_F over the routed calibration inputs (when Gram statistics exist).
    pub activation_error: Option<f64>,
    /// Fraction of the low-rank residual's energy the sparse residual recovered.
    pub residual_energy_recovered: Option<f64>,
    /// Residual runs: (fraction of the truncation residual's energy recovered) per stored η
    /// coefficient.
    pub residual_energy_per_parameter: Option<f64>,
    /// Residual runs: the same measure for spending parameters on one more rank instead
    /// (σ_K² over the energy of the SVD tail Σ_{j≥K} σ_j², per k·p + d parameters; from the
    /// unwhitened spectrum).
    pub rank_energy_per_parameter: Option<f64>,
    /// Parameters before.
    pub parameters_before: u64,
    /// Parameters after.
    pub parameters_after: u64,
}

/// One layer's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerReport {
    /// Decoder layer index.
    pub layer: usize,
    /// Routing counts per expert.
    pub routing_counts: Vec<u64>,
    /// Routing frequency per expert.
    pub frequencies: Vec<f64>,
    /// Experts no calibration token reached.
    pub unused_experts: Vec<usize>,
    /// Per matrix type (checkpoint name), per group.
    pub matrices: BTreeMap<String, Vec<GroupReport>>,
    /// Wall-clock seconds this layer spent in each stage.
    #[serde(default)]
    pub stage_seconds: StageSeconds,
    /// Expert pruning: the kept and removed experts (original indices) and their saliency;
    /// `routing_counts` and `matrices` above then number the kept experts `0..n'`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<super::prune::LayerPruning>,
    /// `--xi auto`: the candidates' held-out output errors and the ξ chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xi_search: Option<super::tune::XiSearch>,
}

/// Wall-clock seconds one layer spent in each stage of the pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageSeconds {
    /// Running the layer on the calibration windows and collecting its statistics.
    pub calibrate: f64,
    /// Effective ranks of the groups.
    pub analyse: f64,
    /// Rank allocation.
    pub allocate: f64,
    /// `--xi auto`: factoring and measuring the candidates on the held-out tokens.
    #[serde(default)]
    pub tune: f64,
    /// Factorisation.
    pub factor: f64,
    /// Writing the layer's shard.
    pub emit: f64,
}

impl StageSeconds {
    /// The sum over stages.
    pub fn total(&self) -> f64 {
        self.calibrate + self.analyse + self.allocate + self.tune + self.factor + self.emit
    }
}

/// The outcome of a compression run (also written as `compression_report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Tool version.
    pub tool_version: String,
    /// The resolved options.
    pub options: CompressOptions,
    /// Calibration tokens.
    pub calibration_tokens: usize,
    /// Calibration fingerprint.
    pub calibration_fingerprint: String,
    /// Targeted parameters (of the factored matrices, `--matrices`: all three by default) before.
    pub targeted_parameters_before: u64,
    /// Targeted parameters after.
    pub targeted_parameters_after: u64,
    /// Achieved reduction of the targeted parameters.
    pub targeted_reduction: f64,
    /// Reduction over all routed-expert parameters (gate, up and down).
    pub routed_expert_reduction: f64,
    /// Reduction over the whole model.
    pub model_reduction: f64,
    /// Whole-model parameters before.
    pub model_parameters_before: u64,
    /// Budget granularity: half of one rank's cost as a fraction of a layer's matrix (the
    /// largest over layers), the precision to which a ratio can be met.
    pub rank_granularity: f64,
    /// Seconds spent.
    pub seconds: f64,
    /// Peak anonymous resident memory observed between layers (bytes, Linux only).
    pub peak_resident_bytes: Option<u64>,
    /// Per layer.
    pub layers: Vec<LayerReport>,
    /// Where the checkpoint was written (None for dry runs).
    pub output: Option<PathBuf>,
    /// Bytes of the output's tensors as stored, in all and for the routed experts (int8 codes
    /// with their scales, any dtype); None for dry runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<crate::checkpoint::storage::TensorBytes>,
    /// With `--budget bytes`: the byte ratio asked for and the parameter ratio it became.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byte_budget: Option<super::budget::ByteBudget>,
    /// Layers taken from an interrupted run instead of being computed (not written to the
    /// report file, which is the same as an uninterrupted run's).
    #[serde(skip)]
    pub resumed_layers: Vec<usize>,
}

/// Reads the per-layer part of a `compression_report.json` written by [`compress`].
pub fn read_layer_reports(model_dir: &Path) -> Result<Vec<LayerReport>> {
    let path = model_dir.join("compression_report.json");
    let value = crate::checkpoint::read_json(&path)?;
    let layers = value.get("layers").cloned().ok_or_else(|| Error::Json {
        path: path.clone(),
        message: "missing `layers`".into(),
    })?;
    serde_json::from_value(layers).map_err(|e| Error::Json {
        path,
        message: format!("invalid `layers`: {e}"),
    })
}

/// Fields of [`Report`] that measure one run (wall clock, memory) rather than describe the
/// checkpoint: left out of the output's `compression_report.json`, so that two runs with the same
/// inputs (or an interrupted run and its resumption) write identical files.
const RUN_MEASUREMENTS: [&str; 2] = ["seconds", "peak_resident_bytes"];

/// Per-layer measurements of one run, left out of the output's report like [`RUN_MEASUREMENTS`].
const LAYER_MEASUREMENTS: [&str; 1] = ["stage_seconds"];

impl Report {
    /// The text of the output's `compression_report.json`: the whole report without the run's
    /// measurements (time per stage, peak memory), which `compress --json` keeps.
    pub fn checkpoint_json(&self) -> Result<String> {
        let mut value = serde_json::to_value(self)
            .map_err(|e| Error::InvalidArgument(format!("report: {e}")))?;
        if let Some(fields) = value.as_object_mut() {
            for key in RUN_MEASUREMENTS {
                fields.remove(key);
            }
            if let Some(layers) = fields.get_mut("layers").and_then(|l| l.as_array_mut()) {
                for layer in layers.iter_mut().filter_map(|l| l.as_object_mut()) {
                    for key in LAYER_MEASUREMENTS {
                        layer.remove(key);
                    }
                }
            }
        }
        serde_json::to_string_pretty(&value)
            .map_err(|e| Error::InvalidArgument(format!("report: {e}")))
    }

    /// A per-layer table of ranks and sizes (the dry-run preview and the end-of-run summary).
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str("layer  matrix      groups  ranks (dense = D)                     params before → after   max rel.err\n");
        for layer in &self.layers {
            for (matrix, groups) in &layer.matrices {
                let ranks: Vec<String> = groups
                    .iter()
                    .map(|g| {
                        if g.dense {
                            "D".to_string()
                        } else {
                            g.rank.to_string()
                        }
                    })
                    .collect();
                let before: u64 = groups.iter().map(|g| g.parameters_before).sum();
                let after: u64 = groups.iter().map(|g| g.parameters_after).sum();
                let err = groups.iter().map(|g| g.relative_error).fold(0.0, f64::max);
                out.push_str(&format!(
                    "{:>5}  {:<10}  {:>6}  {:<36}  {:>10} → {:<10}  {:.4}\n",
                    layer.layer,
                    matrix,
                    groups.len(),
                    ranks.join(","),
                    before,
                    after,
                    err
                ));
            }
            if let Some(p) = &layer.pruning {
                out.push_str(&format!(
                    "{:>5}  pruned by {}: {} of {} experts removed {:?}, kept {:?}\n",
                    layer.layer,
                    p.saliency,
                    p.removed.len(),
                    p.original_experts,
                    p.removed,
                    p.kept
                ));
            }
            if let Some(search) = &layer.xi_search {
                let errors: Vec<String> = search
                    .candidates
                    .iter()
                    .map(|c| format!("{}: {:.4}", c.xi, c.output_error))
                    .collect();
                out.push_str(&format!(
                    "       ξ = {} chosen by held-out output error ({})\n",
                    search.chosen,
                    errors.join(", ")
                ));
            }
            if !layer.unused_experts.is_empty() {
                out.push_str(&format!(
                    "       experts with no calibration tokens: {:?}\n",
                    layer.unused_experts
                ));
            }
        }
        let targeted: Vec<&str> = self
            .options
            .allocation
            .targeted()
            .iter()
            .map(|m| m.name())
            .collect();
        out.push_str(&format!(
            "targeted ({}) parameters {} → {} ({:.2}% removed); routed experts {:.2}%; whole model {:.2}% of {}\n",
            targeted.join("+"),
            self.targeted_parameters_before,
            self.targeted_parameters_after,
            100.0 * self.targeted_reduction,
            100.0 * self.routed_expert_reduction,
            100.0 * self.model_reduction,
            self.model_parameters_before
        ));
        if let Some(budget) = &self.byte_budget {
            out.push_str(&format!(
                "byte budget: remove {:.2}% of the routed experts' {} bytes ({:.3} bytes per \
                 parameter in, {:.3} out) → {:.2}% of the targeted parameters\n",
                100.0 * budget.byte_ratio,
                budget.routed_bytes_before,
                budget.input_bytes_per_parameter,
                budget.output_bytes_per_parameter,
                100.0 * budget.parameter_ratio
            ));
            if let Some(kept) = self.routed_bytes_kept() {
                out.push_str(&format!(
                    "routed experts stored: {} → {} bytes ({:.2}% removed)\n",
                    budget.routed_bytes_before,
                    self.stored_bytes.as_ref().map_or(0, |b| b.routed_experts),
                    100.0 * (1.0 - kept)
                ));
            }
        }
        out
    }

    /// The fraction of the input's routed-expert bytes the output stores (with a byte budget,
    /// after writing).
    pub fn routed_bytes_kept(&self) -> Option<f64> {
        let before = self.byte_budget.as_ref()?.routed_bytes_before;
        let after = self.stored_bytes.as_ref()?.routed_experts;
        (before > 0).then(|| after as f64 / before as f64)
    }
}

/// Running totals of a compression run, turned into its [`Report`] at the end.
#[derive(Debug, Default)]
pub struct Totals {
    targeted_before: u64,
    targeted_after: u64,
    down_parameters: u64,
    down_removed: u64,
    rank_granularity: f64,
    peak_resident: Option<u64>,
}

impl Totals {
    /// Adds one compressed layer's groups (and its dense `down_proj`).
    pub fn add_layer(
        &mut self,
        layout: &ExpertLayout,
        matrices: &BTreeMap<String, Vec<GroupReport>>,
    ) {
        let (p, d) = (layout.intermediate_size, layout.hidden_size);
        // A factored down_proj counts among the targeted matrices (its groups below).
        if !matrices.contains_key(layout.name(crate::checkpoint::experts::ExpertMatrix::Down)) {
            self.down_parameters += (layout.num_experts * p * d) as u64;
        }
        for groups in matrices.values() {
            let before: u64 = groups.iter().map(|g| g.parameters_before).sum();
            self.targeted_before += before;
            self.targeted_after += groups.iter().map(|g| g.parameters_after).sum::<u64>();
            let largest_rank_cost = groups
                .iter()
                .map(|g| g.experts.len() * p + d)
                .max()
                .unwrap_or(0);
            self.rank_granularity = self
                .rank_granularity
                .max(0.5 * largest_rank_cost as f64 / before.max(1) as f64);
        }
    }

    /// Adds a pruned layer's experts: `removed` experts count as removed entirely (gate, up,
    /// down; down among the targeted matrices when `down_targeted`); the kept ones' gate/up and
    /// down as unchanged unless `factored` (then [`Self::add_layer`] counts them from their
    /// groups).
    pub fn add_pruned(
        &mut self,
        layout: &ExpertLayout,
        (kept, removed): (usize, usize),
        factored: bool,
        down_targeted: bool,
    ) {
        let matrix = (layout.intermediate_size * layout.hidden_size) as u64;
        self.targeted_before += 2 * matrix * removed as u64;
        if down_targeted {
            self.targeted_before += matrix * removed as u64;
        } else {
            self.down_parameters += matrix * removed as u64;
            self.down_removed += matrix * removed as u64;
        }
        if !factored {
            let targeted = if down_targeted { 3 } else { 2 };
            self.targeted_before += targeted * matrix * kept as u64;
            self.targeted_after += targeted * matrix * kept as u64;
            if !down_targeted {
                self.down_parameters += matrix * kept as u64;
            }
        }
    }

    /// Raises the peak to the current anonymous resident memory.
    pub fn sample_memory(&mut self) {
        if let Some(now) = resident_anonymous_bytes() {
            self.peak_resident = Some(self.peak_resident.unwrap_or(0).max(now));
        }
    }

    /// The run's report (`seconds` and `output` are filled in by the caller).
    pub fn report(
        &self,
        options: CompressOptions,
        calibration_tokens: usize,
        calibration_fingerprint: String,
        model_parameters: u64,
        layers: Vec<LayerReport>,
    ) -> Report {
        let saved_targeted = self.targeted_before.saturating_sub(self.targeted_after);
        let saved = saved_targeted + self.down_removed;
        let routed_before = self.targeted_before + self.down_parameters;
        Report {
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            options,
            calibration_tokens,
            calibration_fingerprint,
            targeted_parameters_before: self.targeted_before,
            targeted_parameters_after: self.targeted_after,
            targeted_reduction: fraction(saved_targeted, self.targeted_before),
            routed_expert_reduction: fraction(saved, routed_before),
            model_reduction: fraction(saved, model_parameters),
            model_parameters_before: model_parameters,
            rank_granularity: self.rank_granularity,
            seconds: 0.0,
            peak_resident_bytes: self.peak_resident,
            layers,
            output: None,
            stored_bytes: None,
            byte_budget: None,
            resumed_layers: Vec::new(),
        }
    }
}

/// One layer's report from its statistics and its groups' reports.
pub fn layer_report<M>(
    statistics: &LayerStatistics<M>,
    matrices: BTreeMap<String, Vec<GroupReport>>,
    stage_seconds: StageSeconds,
) -> LayerReport {
    LayerReport {
        layer: statistics.layer,
        routing_counts: statistics.routing_counts.clone(),
        frequencies: routing_frequency(&statistics.routing_counts),
        unused_experts: statistics.unused_experts(),
        matrices,
        stage_seconds,
        pruning: statistics.pruning.clone(),
        xi_search: None,
    }
}

fn fraction(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Anonymous resident memory of this process in bytes (Linux; `None` elsewhere).
pub fn resident_anonymous_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
