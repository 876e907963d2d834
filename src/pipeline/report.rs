//! What a compression run reports: per group, per layer and for the whole run (also written as
//! `compression_report.json`), and the summary table the CLI prints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::calibrate::{routing_frequency, LayerStatistics};
use super::options::{BudgetUnit, CompressOptions};
use crate::checkpoint::storage::TensorBytes;
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
    /// The method that stored the group (absent: the paper's low-rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// How each member is stored when the group has no shared basis, in member order (absent:
    /// as the input stores it, or the run's factor storage).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage: Vec<String>,
    /// The solver's estimate of the group's output error, relative to the layer's output
    /// energy (absent for the paper's allocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_error: Option<f64>,
}

impl GroupReport {
    /// The report of a group of `experts` with routing frequency `frequency`, `before` and
    /// `after` parameters, and nothing measured yet (no rank: members stored on their own).
    pub fn new(experts: Vec<usize>, frequency: f64, (before, after): (u64, u64)) -> Self {
        Self {
            experts,
            frequency,
            effective_rank: 0.0,
            density: 0.0,
            score: 0.0,
            rank: 0,
            dense: true,
            residual_size: 0,
            relative_error: 0.0,
            activation_error: None,
            residual_energy_recovered: None,
            residual_energy_per_parameter: None,
            rank_energy_per_parameter: None,
            parameters_before: before,
            parameters_after: after,
            method: None,
            storage: Vec::new(),
            estimated_error: None,
        }
    }
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
    pub pruning: Option<LayerPruning>,
    /// `--xi auto`: the candidates' held-out output errors and the ξ chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xi_search: Option<XiSearch>,
    /// What the solver planned for the layer (absent for the paper's allocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanSummary>,
    /// `quantise`: whose statistics the experts were quantised under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantisation: Option<LayerQuantisation>,
}

/// Whose calibration statistics `quantise` used in one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerQuantisation {
    /// `expert` (each expert's routed tokens) or `layer` (every token of the layer).
    pub hessian: String,
    /// Experts with fewer routed tokens were filled in with the layer's statistics.
    pub min_tokens: usize,
    /// The experts filled in (numbered as the layer's report numbers them) and their routed
    /// tokens.
    pub filled_in: Vec<(usize, usize)>,
}

/// What the solver planned for one layer, in the budget's unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanSummary {
    /// The covered matrices' size in the input (removed experts included).
    pub before: f64,
    /// The layer's share of the budget.
    pub target: f64,
    /// The chosen candidates' size.
    pub planned: f64,
    /// Their estimated error, relative to the layer's output energy.
    pub estimated_error: f64,
    /// How many units took each kind of candidate (`lowrank rank 12`, `int8`, …), per matrix.
    pub choices: BTreeMap<String, BTreeMap<String, usize>>,
}

crate::named_enum! {
    /// How experts are ranked for removal.
    pub enum Saliency ("saliency") {
        /// REAP: mean over routed tokens of gate value × expert output norm.
        Reap = "reap": "REAP: mean over routed tokens of gate value × expert output norm",
        /// Routing frequency (top-k hits).
        Frequency = "frequency": "Routing frequency (top-k hits on the calibration tokens)",
    }
}

/// What a pruned layer's report records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPruning {
    /// How experts were ranked.
    pub saliency: Saliency,
    /// Experts before pruning.
    pub original_experts: usize,
    /// Original indices of the kept experts; kept expert `i` is written as expert `i`.
    pub kept: Vec<usize>,
    /// Original indices of the removed experts, least salient first.
    pub removed: Vec<usize>,
    /// Saliency of every original expert (REAP score, or routing count for `frequency`).
    pub scores: Vec<f64>,
    /// Top-k hits of every original expert.
    pub routing_counts: Vec<u64>,
    /// The estimated output error of removing them: the energy their weighted outputs added
    /// to the layer's over the calibration tokens, relative to the layer output's (their
    /// tokens' weights are taken up by the next experts, so this bounds it from above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_error: Option<f64>,
}

/// One candidate ξ's measurement (`--xi auto`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct XiCandidate {
    /// The candidate ξ.
    pub xi: f64,
    /// ‖Ŷ − Y‖_F / ‖Y‖_F of the routed experts' weighted output on the held-out tokens, Ŷ with
    /// this candidate's factored gate/up, Y the original layer's.
    pub output_error: f64,
}

/// What `--xi auto` measured and chose for one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XiSearch {
    /// The ξ whose plan the layer was compressed with (least output error; ties: the first).
    pub chosen: f64,
    /// Held-out tokens the errors were measured on.
    pub held_out_tokens: u64,
    /// Every candidate, in the order tried.
    pub candidates: Vec<XiCandidate>,
}

/// Wall-clock seconds one layer spent in each stage of the pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StageSeconds {
    /// Running the layer on the calibration windows and recording it.
    pub calibrate: f64,
    /// Turning the recording into statistics (Gram matrices, sensitivities).
    pub statistics: f64,
    /// The methods' candidates (spectra, quantisation errors, measurements).
    pub offer: f64,
    /// The budget solver (layer scope; a model-wide solve is not per layer).
    pub solve: f64,
    /// The chosen candidates' tensors (factorisation, quantisation).
    pub apply: f64,
    /// Writing the layer's shard.
    pub emit: f64,
}

impl StageSeconds {
    /// The sum over stages.
    pub fn total(&self) -> f64 {
        self.calibrate + self.statistics + self.offer + self.solve + self.apply + self.emit
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
    pub stored_bytes: Option<TensorBytes>,
    /// The budget asked for and what the plan reached.
    pub budget: BudgetReport,
    /// Layers taken from an interrupted run instead of being computed (not written to the
    /// report file, which is the same as an uninterrupted run's).
    #[serde(skip)]
    pub resumed_layers: Vec<usize>,
}

/// The budget asked for and what the solver's plan reached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetReport {
    /// The fraction asked to be removed (`--ratio`).
    pub ratio: f64,
    /// What it is a fraction of.
    pub unit: Option<BudgetUnit>,
    /// The covered matrices' size in the input, in the unit, over every layer (removed experts
    /// and routed experts outside the compressed layers included).
    pub before: f64,
    /// What the covered matrices may keep.
    pub target: f64,
    /// What the plan keeps.
    pub planned: f64,
    /// The plan's summed estimated error (relative output energy, summed over layers).
    pub estimated_error: f64,
    /// The routed experts' stored bytes in the input.
    pub routed_bytes_before: u64,
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

    /// A per-layer table of the plan (the dry-run preview and the end-of-run summary).
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "layer  matrix      groups  ranks (D = members on their own)       params before → after   max rel.err\n",
        );
        for layer in &self.layers {
            layer_rows(&mut out, layer);
        }
        out.push_str(&format!(
            "targeted ({}) parameters {} → {} ({:.2}% removed); routed experts {:.2}%; whole model {:.2}% of {}\n",
            self.options.budget.targeted().iter().map(|m| m.name()).collect::<Vec<_>>().join("+"),
            self.targeted_parameters_before,
            self.targeted_parameters_after,
            100.0 * self.targeted_reduction,
            100.0 * self.routed_expert_reduction,
            100.0 * self.model_reduction,
            self.model_parameters_before
        ));
        let budget = &self.budget;
        if let Some(unit) = budget.unit {
            out.push_str(&format!(
                "budget: remove {:.2}% of the covered {unit} ({:.0}): keep at most {:.0}, the \
                 plan keeps {:.0} ({:.2}% removed), estimated error {:.3e}\n",
                100.0 * budget.ratio,
                budget.before,
                budget.target,
                budget.planned,
                100.0 * (1.0 - budget.planned / budget.before.max(1.0)),
                budget.estimated_error
            ));
        }
        if let Some(kept) = self.routed_bytes_kept() {
            out.push_str(&format!(
                "routed experts stored: {} → {} bytes ({:.2}% removed)\n",
                budget.routed_bytes_before,
                self.stored_bytes.as_ref().map_or(0, |b| b.routed_experts),
                100.0 * (1.0 - kept)
            ));
        }
        out
    }

    /// The fraction of the input's routed-expert bytes the output stores (after writing).
    pub fn routed_bytes_kept(&self) -> Option<f64> {
        let before = self.budget.routed_bytes_before;
        let after = self.stored_bytes.as_ref()?.routed_experts;
        (before > 0).then(|| after as f64 / before as f64)
    }
}

/// One layer's rows of [`Report::table`].
fn layer_rows(out: &mut String, layer: &LayerReport) {
    for (matrix, groups) in &layer.matrices {
        let ranks: Vec<String> = groups
            .iter()
            .map(|g| match g.dense {
                true => "D".to_string(),
                false => g.rank.to_string(),
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
    if let Some(plan) = &layer.plan {
        for (matrix, choices) in &plan.choices {
            let list: Vec<String> = choices.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
            out.push_str(&format!("       {matrix}: {}\n", list.join(", ")));
        }
        out.push_str(&format!(
            "       planned {:.0} of {:.0} ({:.2}% kept, target {:.2}%), estimated error {:.3e}\n",
            plan.planned,
            plan.before,
            100.0 * plan.planned / plan.before.max(1.0),
            100.0 * plan.target / plan.before.max(1.0),
            plan.estimated_error
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
    if let Some(q) = layer
        .quantisation
        .as_ref()
        .filter(|q| !q.filled_in.is_empty())
    {
        let experts: Vec<String> = q
            .filled_in
            .iter()
            .map(|(e, n)| format!("{e} ({n})"))
            .collect();
        out.push_str(&format!(
            "       quantised with the layer's inputs filled in (under {} routed tokens): experts {}\n",
            q.min_tokens,
            experts.join(", ")
        ));
    }
}

/// Running totals of a compression run, turned into its [`Report`] at the end.
#[derive(Debug, Default)]
pub struct Totals {
    /// Parameters of the covered matrices, before and after.
    pub targeted: (u64, u64),
    /// Parameters of every routed expert matrix, before and after.
    pub routed: (u64, u64),
    rank_granularity: f64,
    peak_resident: Option<u64>,
}

impl Totals {
    /// Adds one layer: its covered and all routed parameters, before and after.
    pub fn add_layer(&mut self, targeted: (u64, u64), routed: (u64, u64), granularity: f64) {
        self.targeted.0 += targeted.0;
        self.targeted.1 += targeted.1;
        self.routed.0 += routed.0;
        self.routed.1 += routed.1;
        self.rank_granularity = self.rank_granularity.max(granularity);
    }

    /// Raises the peak to the current anonymous resident memory.
    pub fn sample_memory(&mut self) {
        if let Some(now) = resident_anonymous_bytes() {
            self.peak_resident = Some(self.peak_resident.unwrap_or(0).max(now));
        }
    }

    /// The run's report (`seconds`, `output`, `stored_bytes` and `budget` are filled in by
    /// the caller).
    pub fn report(
        &self,
        options: CompressOptions,
        (calibration_tokens, calibration_fingerprint): (usize, String),
        model_parameters: u64,
        layers: Vec<LayerReport>,
    ) -> Report {
        let saved_targeted = self.targeted.0.saturating_sub(self.targeted.1);
        let saved = self.routed.0.saturating_sub(self.routed.1);
        Report {
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            options,
            calibration_tokens,
            calibration_fingerprint,
            targeted_parameters_before: self.targeted.0,
            targeted_parameters_after: self.targeted.1,
            targeted_reduction: fraction(saved_targeted, self.targeted.0),
            routed_expert_reduction: fraction(saved, self.routed.0),
            model_reduction: fraction(saved, model_parameters),
            model_parameters_before: model_parameters,
            rank_granularity: self.rank_granularity,
            seconds: 0.0,
            peak_resident_bytes: self.peak_resident,
            layers,
            output: None,
            stored_bytes: None,
            budget: BudgetReport::default(),
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
        plan: None,
        quantisation: None,
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
