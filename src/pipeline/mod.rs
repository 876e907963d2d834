//! The compression pipeline as stages, each a module with a plain data type in and out:
//!
//! ```text
//! calibrate  windows → LayerObservations   (routing, inputs, Gram sums, saliency)
//!            removal (a method's `remove`) → LayerStatistics (groups, Grams, sensitivities)
//! offer      each method's candidates per unit → LayerOffer
//! solve      LayerOffer(s) → LayerPlan       (one candidate per unit, under the byte budget)
//! apply      each method's chosen candidates → UnitOutput (stored tensors)
//! assemble   UnitOutputs → AssembledLayer     (record, reports, tensors)
//! emit       AssembledLayer → a layer's shard (+ journal entry)
//! ```
//!
//! Layers are streamed: each decoder layer is calibrated on the hidden states the previous one
//! produced, planned, applied and written as its own shard before the next is read. With a
//! model-wide budget, a planning pass over every layer comes first (its plans are journalled).
//! The driver below only wires the stages and names no method: the methods come from a
//! [`Registry`]. `docs/ARCHITECTURE.md` draws the whole picture.

pub mod assemble;
pub mod budget;
pub mod calibrate;
pub mod emit;
pub mod experts;
pub mod hf_compat;
pub mod legacy;
pub mod methods;
pub mod options;
pub mod plan;
pub mod presets;
pub mod removal;
pub mod report;
pub mod resume;
pub mod settings_file;
pub mod solver;
pub mod split;

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device};

use crate::checkpoint::experts::ExpertLayout;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::format::{CompressionRecord, LayerRecord};
use crate::linalg::{CpuBackend, LinalgBackend};
use crate::progress::{Progress, Silent, Task};
use crate::safety::staging;
use budget::Budget;
use calibrate::{
    CalibrationStream, LayerData, LayerStatistics, Recording, SplitWindows, StatisticsWanted,
};
use emit::{Emitter, RunFiles};
use experts::LayerExperts;
pub use methods::Registry;
use methods::{LayerContext, Method, MethodInputs, Needs, ObservedLayer};
pub use options::{
    parse_device, BudgetOptions, BudgetScope, BudgetUnit, CalibrationOptions, CompressOptions,
    Granularity, GroupSize, OutputFormat, OutputOptions,
};
use plan::{LayerOffer, LayerPlan};
pub use report::{read_layer_reports, GroupReport, LayerReport, Report};
use report::{BudgetReport, LayerPruning, PlanSummary, StageSeconds};

/// Runs the whole pipeline described by `options`, reporting nothing.
pub fn compress(options: &CompressOptions) -> Result<Report> {
    compress_with_progress(options, &Silent)
}

/// Runs the whole pipeline described by `options`, telling `progress` how far it is.
///
/// The run resumes the layers an interrupted run of the same output, model, options and
/// calibration data finished (see `docs/safe-io.md`, "Resume"); a different interrupted run is
/// refused with [`Error::ResumeMismatch`]. A SIGINT/SIGTERM (with the handler of
/// [`crate::safety::install_signal_cleanup`]) stops the run at the next safe point with
/// [`Error::Interrupted`], keeping the finished layers.
pub fn compress_with_progress(
    options: &CompressOptions,
    progress: &dyn Progress,
) -> Result<Report> {
    compress_with(options, &Registry::builtin(), progress)
}

/// As [`compress_with_progress`], with the methods of `registry` (the built-in ones and any the
/// caller added).
pub fn compress_with(
    options: &CompressOptions,
    registry: &Registry<CpuBackend>,
    progress: &dyn Progress,
) -> Result<Report> {
    let started = Instant::now();
    let (prepared, methods) = Prepared::new(options, registry, true)?;
    let (mut run, windows) = prepared.start(methods)?;
    let options = &prepared.options;
    // A signal now only asks the run to stop at its next safe point.
    let _cooperative = (!options.output.dry_run).then(staging::InterruptScope::enter);
    // Outputs are claimed before any long work, so a refused output fails at once.
    let mut emitter = Emitter::create(&prepared.checkpoint, &options.output, &prepared.manifest)?;
    for note in emitter.resume_notes() {
        progress.message("resume", note);
    }
    if let Err(error) = run.compress_layers(&mut emitter, &windows, &prepared.device, progress) {
        return Err(stopped(emitter, error));
    }
    run.save_statistics()?;
    run.finish(emitter, prepared.calibration_tokens, started)
}

/// The enabled methods of a run, as the registry built them.
type Methods = Vec<Box<dyn Method<CpuBackend>>>;

/// What every run needs before its first layer: the checkpoint, the options as resolved (with
/// every method's settings), the calibration windows and the resume manifest.
struct Prepared {
    checkpoint: Checkpoint,
    options: CompressOptions,
    windows: Vec<Vec<u32>>,
    fingerprint: String,
    calibration_tokens: usize,
    manifest: resume::Manifest,
    device: Device,
}

impl Prepared {
    /// Everything `options` needs before its first layer, and its methods; `open_device: false`
    /// (steps that run no layer) leaves the device unopened and uses the CPU.
    fn new(
        options: &CompressOptions,
        registry: &Registry<CpuBackend>,
        open_device: bool,
    ) -> Result<(Self, Methods)> {
        options.validate()?;
        let device = match open_device {
            true => parse_device(&options.device)?,
            false => Device::Cpu,
        };
        let checkpoint = Checkpoint::open(&options.model)?;
        let mut options = options.clone();
        let spec = crate::models::ArchConfig::from_checkpoint(&checkpoint)?.spec();
        let shapes = spec.moe_layers.iter().flatten();
        let group_size = options
            .calibration
            .group_size
            .resolve(shapes.map(|l| (l.num_experts, l.hidden_size)));
        options.calibration.group_size = GroupSize::Experts(group_size);
        if options.budget.bits_per_weight.is_some() {
            let bytes_per_parameter = budget::input_bytes_per_parameter(&checkpoint)?;
            options.budget = options.budget.resolve_bits(bytes_per_parameter)?;
        }
        let inputs = MethodInputs::new(&options, &checkpoint);
        let methods = registry.build(&inputs)?;
        // What is saved (settings file, report, resume manifest) states every method's settings.
        for method in &methods {
            if let Some(settings) = method.resolved_settings() {
                options.settings.insert(method.name().to_string(), settings);
            }
        }
        let windows = match (
            is_plain_conversion(&options, &methods),
            options.calibration.data.as_os_str().is_empty(),
        ) {
            (true, _) => Vec::new(),
            (false, true) => {
                return Err(Error::InvalidArgument(format!(
                    "--calibration is required: this run calibrates (--ratio {}, --methods {}); \
                     only --ratio 0 with `keep` among the methods converts without calibration \
                     data, and not with --prune-fraction, the paper's allocation, a statistics \
                     cache or --dry-run",
                    options.budget.ratio,
                    options.methods.join(",")
                )))
            }
            (false, false) => calibrate::calibration_windows(&options.calibration, &checkpoint)?,
        };
        let fingerprint = calibrate::fingerprint(&windows);
        let calibration_tokens = windows.iter().map(Vec::len).sum();
        let manifest = resume::Manifest::new(&options, &checkpoint, &fingerprint)?;
        let prepared = Self {
            checkpoint,
            options,
            windows,
            fingerprint,
            calibration_tokens,
            manifest,
            device,
        };
        Ok((prepared, methods))
    }

    /// The run of these options with `methods`, and its calibration windows split into those
    /// that calibrate and those held out.
    fn start(&self, methods: Methods) -> Result<(Run<'_, CpuBackend>, SplitWindows)> {
        let run = Run::new(
            &self.options,
            &self.checkpoint,
            &CpuBackend,
            &self.fingerprint,
            methods,
        )?;
        let windows = run.split_windows(&self.windows)?;
        Ok((run, windows))
    }
}

/// Ends a run that stopped early: keeps the staging directory when it holds finished work and
/// the same command can get further (an interruption, an I/O error such as a full disk), and says
/// so in an interruption's hint; removes it otherwise (an input error would only recur).
fn stopped(emitter: Emitter, error: Error) -> Error {
    let finished = emitter.finished_layers().len();
    let plans_saved = emitter.saved_plans().ok().flatten().is_some();
    let staging = emitter.staging_dir().map(std::path::Path::to_path_buf);
    let resumable = matches!(error, Error::Interrupted { .. } | Error::Io { .. });
    let kept = match staging {
        Some(dir) if resumable && (finished > 0 || plans_saved) => Some(dir),
        _ => {
            emitter.discard();
            None
        }
    };
    let Error::Interrupted { signal, .. } = error else {
        return error;
    };
    let resume_hint = match kept {
        Some(dir) => format!(
            "{finished} finished layer(s){} kept in {}; run the same command again to continue \
             from layer {finished}, or add --restart to start over",
            if plans_saved {
                " and the model-wide plan"
            } else {
                ""
            },
            dir.display()
        ),
        None => "no layer was finished, so nothing was kept; run the command again to start over"
            .to_string(),
    };
    Error::Interrupted {
        signal,
        resume_hint,
    }
}

/// Whether `options` with `methods` leave the model as it is (`--ratio 0`, a method that keeps
/// units as stored, and none that acts without a budget): a plain conversion into the output
/// format, with no calibration.
fn is_plain_conversion<B: LinalgBackend>(
    options: &CompressOptions,
    methods: &[Box<dyn Method<B>>],
) -> bool {
    options.budget.ratio == 0.0
        && !options.output.dry_run
        // A run with a statistics cache fills or replays it as before.
        && options.calibration.statistics_cache.is_none()
        && methods.iter().any(|m| m.keeps_as_stored())
        && !methods.iter().any(|m| m.acts_without_budget())
}

/// Stops with [`Error::Interrupted`] when a SIGINT/SIGTERM asked the run to stop.
fn check_interrupt() -> Result<()> {
    match staging::interrupted() {
        Some(signal) => Err(Error::Interrupted {
            signal,
            resume_hint: String::new(),
        }),
        None => Ok(()),
    }
}

/// The state of one compression run between stages.
struct Run<'a, B: LinalgBackend> {
    options: &'a CompressOptions,
    checkpoint: &'a Checkpoint,
    backend: &'a B,
    fingerprint: &'a str,
    methods: Vec<Box<dyn Method<B>>>,
    needs: Needs,
    budget: Budget,
    stored_dtype: DType,
    statistics_key: String,
    moe_layers: Vec<Option<ExpertLayout>>,
    num_layers: usize,
    replaying: bool,
    statistics_to_save: Vec<LayerStatistics<B::Matrix>>,
    totals: report::Totals,
    budget_report: BudgetReport,
    records: Vec<LayerRecord>,
    layer_reports: Vec<LayerReport>,
    resumed_layers: Vec<usize>,
}

impl<'a, B: LinalgBackend> Run<'a, B> {
    fn new(
        options: &'a CompressOptions,
        checkpoint: &'a Checkpoint,
        backend: &'a B,
        fingerprint: &'a str,
        methods: Vec<Box<dyn Method<B>>>,
    ) -> Result<Self> {
        let needs = methods
            .iter()
            .fold(Needs::default(), |n, m| n.union(m.needs()));
        let spec = crate::models::ArchConfig::from_checkpoint(checkpoint)?.spec();
        let (moe_layers, num_layers) = (spec.moe_layers, spec.num_layers);
        let budget = Budget::resolve(&options.budget, checkpoint)?;
        if options.calibration.statistics_cache.is_some()
            && (needs.expert_statistics
                || needs.saliency
                || needs.down_gram
                || needs.held_out.is_some())
        {
            return Err(Error::InvalidArgument(format!(
                "the calibration statistics cache holds group Gram matrices only, and --methods \
                 {} need per-expert statistics: leave `statistics_cache` out (or use --preset \
                 paper)",
                options.methods.join(",")
            )));
        }
        // Statistics belong to one model, one set of windows and one grouping.
        let model_dir = checkpoint
            .dir()
            .canonicalize()
            .unwrap_or_else(|_| checkpoint.dir().to_path_buf());
        let statistics_key = format!(
            "{fingerprint}@{}#k{}",
            model_dir.display(),
            options.calibration.group_size
        );
        let budget_report = BudgetReport {
            ratio: budget.ratio,
            unit: Some(budget.unit),
            routed_bytes_before: budget.storage.bytes,
            ..BudgetReport::default()
        };
        Ok(Self {
            options,
            checkpoint,
            backend,
            fingerprint,
            methods,
            needs,
            budget,
            stored_dtype: methods::lowrank::stored_dtype_of(checkpoint.dominant_dtype()),
            statistics_key,
            moe_layers,
            num_layers,
            replaying: false,
            statistics_to_save: Vec::new(),
            totals: report::Totals::default(),
            budget_report,
            records: Vec::new(),
            layer_reports: Vec::new(),
            resumed_layers: Vec::new(),
        })
    }

    /// The calibration windows split into those that calibrate and those held out (none unless
    /// a method measures candidates on held-out windows).
    fn split_windows(&self, windows: &[Vec<u32>]) -> Result<SplitWindows> {
        if windows.is_empty() {
            // A plain conversion reads no calibration data.
            return Ok((Vec::new(), Vec::new()));
        }
        match self.needs.held_out {
            Some(fraction) => calibrate::split_holdout(windows, fraction),
            None => Ok((windows.to_vec(), Vec::new())),
        }
    }

    /// Streams every layer through the stages, after adopting the `finished` ones (whose hidden
    /// states are recomputed by a forward pass, without statistics).
    fn compress_layers(
        &mut self,
        emitter: &mut Emitter,
        windows: &SplitWindows,
        device: &'a Device,
        progress: &dyn Progress,
    ) -> Result<()> {
        let finished = emitter.finished_layers();
        if is_plain_conversion(self.options, &self.methods) {
            return self.copy_layers(emitter, &finished, progress);
        }
        // Every layer done (a merged split run, or a run stopped while finishing): nothing to
        // calibrate.
        if finished.len() == self.num_layers {
            for entry in &finished {
                self.adopt_layer(entry)?;
            }
            return Ok(());
        }
        let model_plans = match self.options.budget.scope {
            BudgetScope::Model => Some(self.model_plans(emitter, windows, device, progress)?),
            BudgetScope::Layer => None,
        };
        let mut stream = self.statistics_stream(windows, device, progress)?;
        let end = self.num_layers;
        self.stream_layers(
            emitter,
            &mut stream,
            (&finished, end),
            model_plans.as_deref(),
            progress,
        )
    }

    /// Runs the stream's layers up to `end` (exclusive) through the stages and the emitter, after
    /// skipping the `finished` ones at its start (a forward pass without statistics) and taking
    /// them from the journal; with a model-wide budget the plans are given.
    fn stream_layers(
        &mut self,
        emitter: &mut Emitter,
        stream: &mut CalibrationStream<'a, B>,
        (finished, end): (&[resume::CommittedLayer], usize),
        model_plans: Option<&[LayerPlan]>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let first = stream.boundary().0;
        let task = Task::start(progress, "layers", end.saturating_sub(first) as u64);
        if !finished.is_empty() {
            task.message(&format!(
                "resuming at layer {}: {} finished layer(s) kept",
                first + finished.len(),
                finished.len()
            ));
        }
        for entry in finished {
            check_interrupt()?;
            if stream.skip_layer()? != Some(entry.layer) {
                return Err(Error::InvalidArgument(format!(
                    "the resume journal's layer {} is not the model's next layer",
                    entry.layer
                )));
            }
            self.adopt_layer(entry)?;
            task.advance(1);
        }
        while stream.boundary().0 < end {
            check_interrupt()?;
            let calibration_started = Instant::now();
            let Some(layer) = stream.next_layer()? else {
                break;
            };
            let calibrate_seconds = calibration_started.elapsed().as_secs_f64();
            staging::fault_point(&format!("calibrated:{}", layer.index));
            task.message(&format!("layer {}", layer.index));
            match layer.data {
                Some(data) => {
                    let plan =
                        model_plans.and_then(|plans| plans.iter().find(|p| p.layer == layer.index));
                    let held_out = layer.held_out.as_ref();
                    self.compress_layer(emitter, (data, held_out), plan, calibrate_seconds)?;
                }
                None => emitter.copy_layer(layer.index)?,
            }
            self.totals.sample_memory();
            self.checkpoint.release_pages();
            task.advance(1);
        }
        Ok(())
    }

    /// A plain conversion: every layer not `finished` written as stored, nothing calibrated.
    fn copy_layers(
        &mut self,
        emitter: &mut Emitter,
        finished: &[resume::CommittedLayer],
        progress: &dyn Progress,
    ) -> Result<()> {
        for entry in finished {
            self.adopt_layer(entry)?;
        }
        let task = Task::start(
            progress,
            "layers",
            self.num_layers.saturating_sub(finished.len()) as u64,
        );
        for index in finished.len()..self.num_layers {
            check_interrupt()?;
            emitter.copy_layer(index)?;
            task.advance(1);
        }
        // Every MoE layer as it was: its parameters and bytes kept.
        let (mut covered, mut routed) = (0, 0);
        for layout in self.moe_layers.iter().flatten() {
            let matrix = (layout.intermediate_size * layout.hidden_size) as u64;
            let experts = layout.num_experts as u64;
            let layer_covered = self.budget.matrices.len() as u64 * matrix * experts;
            let layer_routed = 3 * matrix * experts;
            self.totals.add_layer(
                (layer_covered, layer_covered),
                (layer_routed, layer_routed),
                0.0,
            );
            (covered, routed) = (covered + layer_covered, routed + layer_routed);
        }
        // What the budget covers, in its unit; a plain checkpoint stores its expert matrices in
        // one type, so the covered matrices hold their parameters' share of the bytes.
        let before = match self.budget.unit {
            BudgetUnit::Parameters => covered as f64,
            BudgetUnit::Bytes => {
                self.budget.storage.compressed_bytes as f64 * covered as f64 / routed.max(1) as f64
            }
        };
        (self.budget_report.before, self.budget_report.target) = (before, before);
        self.budget_report.planned = before;
        Ok(())
    }

    /// Takes a layer an interrupted run finished into the record, the report and the totals.
    fn adopt_layer(&mut self, entry: &resume::CommittedLayer) -> Result<()> {
        if let Some(report) = &entry.report {
            self.account_layer(report)?;
            self.layer_reports.push(report.clone());
        }
        if let (Some(record), Some(_)) = (&entry.record, &entry.report) {
            self.records.push(record.clone());
        }
        self.resumed_layers.push(entry.layer);
        Ok(())
    }

    /// Adds a finished layer's parameters and planned budget to the totals.
    fn account_layer(&mut self, report: &LayerReport) -> Result<()> {
        let layout = self.layout(report.layer)?;
        let matrix = (layout.intermediate_size * layout.hidden_size) as u64;
        let original = report
            .pruning
            .as_ref()
            .map_or(layout.num_experts, |p| p.original_experts) as u64;
        let kept = report.routing_counts.len() as u64;
        let covered = self.budget.matrices.len() as u64;
        let after: u64 = report
            .matrices
            .values()
            .flatten()
            .map(|g| g.parameters_after)
            .sum();
        let uncovered_kept = (3 - covered) * matrix * kept;
        self.totals.add_layer(
            (covered * matrix * original, after),
            (3 * matrix * original, after + uncovered_kept),
            0.0,
        );
        if let Some(plan) = &report.plan {
            self.budget_report.before += plan.before;
            self.budget_report.target += plan.target;
            self.budget_report.planned += plan.planned;
            self.budget_report.estimated_error += plan.estimated_error;
        }
        Ok(())
    }

    /// `--budget-scope model`: the plans an interrupted run saved, or those of a planning pass
    /// over every layer (saved in the journal before any layer is compressed).
    fn model_plans(
        &mut self,
        emitter: &Emitter,
        windows: &SplitWindows,
        device: &'a Device,
        progress: &dyn Progress,
    ) -> Result<Vec<LayerPlan>> {
        if let Some(plans) = emitter.saved_plans()? {
            progress.message("planning", "reusing the interrupted run's model-wide plan");
            return Ok(plans);
        }
        let mut stream = self.statistics_stream(windows, device, progress)?;
        let mut offers = Vec::new();
        self.offer_layers(
            &mut stream,
            self.num_layers,
            &|_| false,
            progress,
            |offer| {
                offers.push(offer);
                Ok(())
            },
        )?;
        let plans = self.solve_model(&mut offers)?;
        emitter.save_plans(&plans)?;
        Ok(plans)
    }

    /// The planning pass of a model-wide budget over the stream's layers up to `end`
    /// (exclusive): each MoE layer's offer, handed to `each` as it is made; layers `done` says
    /// were offered before are only run through.
    fn offer_layers(
        &mut self,
        stream: &mut CalibrationStream<'a, B>,
        end: usize,
        done: &dyn Fn(usize) -> bool,
        progress: &dyn Progress,
        mut each: impl FnMut(LayerOffer) -> Result<()>,
    ) -> Result<()> {
        let first = stream.boundary().0;
        let task = Task::start(progress, "planning", end.saturating_sub(first) as u64);
        while stream.boundary().0 < end {
            check_interrupt()?;
            if done(stream.boundary().0) {
                stream.skip_layer()?;
                task.advance(1);
                continue;
            }
            let Some(layer) = stream.next_layer()? else {
                break;
            };
            task.advance(1);
            let Some(data) = layer.data else {
                continue;
            };
            let (statistics, pruning) = self.statistics_of(data)?;
            let held_out = layer.held_out.as_ref();
            each(
                self.with_experts(statistics.layer, pruning.as_ref(), |experts| {
                    let context = self.context(experts, &statistics, held_out)?;
                    self.offer(&context)
                })?,
            )?;
            self.checkpoint.release_pages();
        }
        Ok(())
    }

    /// One model-wide plan from every layer's offer (in layer order): each method settles, then
    /// the solver spends the budget over all layers.
    fn solve_model(&self, offers: &mut [LayerOffer]) -> Result<Vec<LayerPlan>> {
        for method in &self.methods {
            method.settle(offers)?;
        }
        let before: f64 = offers.iter().map(|o| o.target.before).sum();
        let spending = solver::Spending {
            unit: self.budget.unit,
            granularity: self.options.budget.granularity,
            tolerance: tolerance(before),
            layer_floor: self.options.budget.layer_floor,
        };
        let (plans, _) = solver::solve(offers, spending)?;
        Ok(plans)
    }

    /// The calibrate stage's stream: replayed from the statistics cache when it matches,
    /// otherwise run over the windows.
    fn statistics_stream(
        &mut self,
        (windows, held_out): &SplitWindows,
        device: &'a Device,
        progress: &dyn Progress,
    ) -> Result<CalibrationStream<'a, B>> {
        let needs = self.needs;
        let want_gram = needs.group_gram || self.options.calibration.activation_statistics;
        let cached = match self.options.calibration.statistics_cache.as_deref() {
            // A replay has no routed inputs to give a method that computes its own statistics.
            Some(path) if path.exists() && !needs.routed_inputs => {
                calibrate::load_statistics(path, &self.statistics_key, self.backend)?
                    .filter(|layers| !want_gram || layers.iter().all(|l| l.group_gram.is_some()))
            }
            _ => None,
        };
        self.replaying = cached.is_some();
        match cached {
            Some(statistics) => {
                progress.message("calibration", "reusing saved calibration statistics");
                CalibrationStream::replay(self.checkpoint, device, self.backend, statistics)
            }
            None => CalibrationStream::with_held_out(
                self.checkpoint,
                [windows, held_out],
                &self.options.calibration,
                Recording {
                    inputs: want_gram || needs.expert_statistics || needs.routed_inputs,
                    down_gram: needs.down_gram && (want_gram || needs.expert_statistics),
                    saliency: needs.saliency,
                },
                device,
                self.backend,
            ),
        }
    }

    /// A calibrated layer's statistics, after the removal method (if any) chose the experts to
    /// keep.
    fn statistics_of(
        &self,
        data: LayerData<B::Matrix>,
    ) -> Result<(LayerStatistics<B::Matrix>, Option<LayerPruning>)> {
        let observations = match data {
            LayerData::Replayed(statistics) => return Ok((statistics, None)),
            LayerData::Observed(observations) => observations,
        };
        let observed = ObservedLayer {
            layer: observations.layer,
            routing_counts: &observations.routing_counts,
            saliency: observations.saliency.as_deref(),
            expert_output_energy: observations.expert_output_energy.as_deref(),
            output_energy: observations.output_energy,
        };
        let mut pruning = None;
        for method in &self.methods {
            if let Some(decided) = method.remove(&observed)? {
                if pruning.is_some() {
                    return Err(Error::InvalidArgument(format!(
                        "two methods remove experts from layer {}: enable one",
                        observations.layer
                    )));
                }
                pruning = Some(decided);
            }
        }
        let wanted = StatisticsWanted {
            group_size: self.options.calibration.group_size.resolved()?,
            group_gram: self.needs.group_gram || self.options.calibration.activation_statistics,
            expert_statistics: self.needs.expert_statistics,
            routed_inputs: self.needs.routed_inputs,
        };
        let layer = observations.layer;
        let statistics = self.with_experts(layer, pruning.as_ref(), |experts| {
            observations.into_statistics(pruning.clone(), experts, wanted, self.backend)
        })?;
        Ok((statistics, pruning))
    }

    /// The layer as the methods see it.
    fn context<'c>(
        &'c self,
        experts: &'c LayerExperts<'c>,
        statistics: &'c LayerStatistics<B::Matrix>,
        held_out: Option<&'c calibrate::HeldOutActivations>,
    ) -> Result<LayerContext<'c, B>> {
        Ok(LayerContext {
            backend: self.backend,
            checkpoint: self.checkpoint,
            experts,
            statistics,
            matrices: &self.budget.matrices,
            held_out,
            stored_dtype: self.stored_dtype,
            target: self.budget.layer_target(experts)?,
            export_dense: self.options.output.export_dense.is_some(),
        })
    }

    /// Every method's candidates for the layer, errors relative to its output energy.
    fn offer(&self, context: &LayerContext<B>) -> Result<LayerOffer> {
        let statistics = context.statistics;
        let mut candidates = Vec::new();
        for method in &self.methods {
            candidates.extend(method.offer(context)?);
        }
        let energy = statistics.output_energy;
        if energy > 0.0 {
            for candidate in &mut candidates {
                candidate.error /= energy;
            }
        }
        let format = self.options.output.format;
        if !format.mixes_float_and_packed() && self.budget.ratio > 0.0 {
            self.drop_floats_where_packed_fits(&mut candidates);
        }
        Ok(LayerOffer {
            layer: statistics.layer,
            groups: statistics.groups.clone(),
            matrices: self.budget.matrices.clone(),
            candidates,
            target: context.target,
            pruning: statistics.pruning.clone(),
        })
    }

    /// Removes the layer's candidates that store a unit in floats when every unit of the layer
    /// has another, so that a format which cannot mix float and packed layers (one storage
    /// per layer) gets every layer packed that can be (a budget that leaves room is spent on
    /// finer formats instead).
    fn drop_floats_where_packed_fits(&self, candidates: &mut Vec<plan::Candidate>) {
        let floats: Vec<&str> = self
            .methods
            .iter()
            .filter(|m| m.stores_floats())
            .map(|m| m.name())
            .collect();
        let is_float = |c: &plan::Candidate| floats.contains(&c.method.as_str());
        let units: std::collections::HashSet<plan::Unit> =
            candidates.iter().map(|c| c.unit).collect();
        let packed_units: std::collections::HashSet<plan::Unit> = candidates
            .iter()
            .filter(|c| !is_float(c))
            .map(|c| c.unit)
            .collect();
        if packed_units == units {
            candidates.retain(|c| !is_float(c));
        }
    }

    /// Calls `f` with the layer's experts as the stages see them: after removal, the kept ones
    /// numbered `0..n'`.
    fn with_experts<R>(
        &self,
        layer: usize,
        pruning: Option<&LayerPruning>,
        f: impl FnOnce(&LayerExperts) -> Result<R>,
    ) -> Result<R> {
        let layout = self.layout(layer)?;
        match pruning {
            Some(pruning) => {
                let pruned = removal::pruned_layout(&layout, pruning.kept.len());
                f(&LayerExperts::pruned(
                    self.checkpoint,
                    &layout,
                    &pruned,
                    &pruning.kept,
                ))
            }
            None => f(&LayerExperts::new(self.checkpoint, &layout)),
        }
    }

    fn layout(&self, index: usize) -> Result<ExpertLayout> {
        self.moe_layers
            .get(index)
            .cloned()
            .flatten()
            .ok_or_else(|| Error::InvalidArgument(format!("layer {index} is not a MoE layer")))
    }

    /// removal → statistics → offer → solve → apply → assemble → emit for one MoE layer
    /// (whose calibration took `calibrate_seconds`); with a model-wide budget the plan is given.
    fn compress_layer(
        &mut self,
        emitter: &mut Emitter,
        (data, held_out): (LayerData<B::Matrix>, Option<&calibrate::HeldOutActivations>),
        model_plan: Option<&LayerPlan>,
        calibrate_seconds: f64,
    ) -> Result<()> {
        let mut seconds = StageSeconds {
            calibrate: calibrate_seconds,
            ..Default::default()
        };
        check_interrupt()?;
        let clock = Instant::now();
        let (statistics, pruning) = self.statistics_of(data)?;
        seconds.statistics = clock.elapsed().as_secs_f64();
        if let Some(plan) = model_plan {
            if plan.pruning != pruning {
                return Err(Error::InvalidArgument(format!(
                    "layer {}: the experts removed differ from the model-wide plan's; rerun \
                     with --restart",
                    statistics.layer
                )));
            }
        }
        let (record, layer_report) =
            self.with_experts(statistics.layer, pruning.as_ref(), |experts| {
                let context = self.context(experts, &statistics, held_out)?;
                self.plan_and_write(emitter, &context, model_plan, &mut seconds)
            })?;
        self.totals.sample_memory();
        self.account_layer(&layer_report)?;
        emitter.commit_layer(statistics.layer, record.clone(), Some(layer_report.clone()))?;
        self.records.extend(record);
        self.layer_reports.push(layer_report);
        if self.options.calibration.statistics_cache.is_some() && !self.replaying {
            self.statistics_to_save.push(statistics);
        }
        Ok(())
    }

    /// offer → solve (unless the model-wide plan is given) → apply → assemble → emit of one
    /// layer; returns its record and report.
    fn plan_and_write(
        &self,
        emitter: &mut Emitter,
        context: &LayerContext<B>,
        model_plan: Option<&LayerPlan>,
        seconds: &mut StageSeconds,
    ) -> Result<(Option<LayerRecord>, LayerReport)> {
        let mut clock = Instant::now();
        let mut lap = || {
            let elapsed = clock.elapsed().as_secs_f64();
            clock = Instant::now();
            elapsed
        };
        let plan = match model_plan {
            Some(plan) => plan.clone(),
            None => {
                let mut offers = vec![self.offer(context)?];
                seconds.offer = lap();
                for method in &self.methods {
                    method.settle(&mut offers)?;
                }
                let spending = solver::Spending {
                    unit: self.budget.unit,
                    granularity: self.options.budget.granularity,
                    tolerance: tolerance(context.target.before),
                    layer_floor: 0.0,
                };
                let (mut plans, _) = solver::solve(&offers, spending)?;
                seconds.solve = lap();
                plans.remove(0)
            }
        };
        let statistics = context.statistics;
        let summary = plan_summary(&plan, self.budget.unit);
        let parts = assemble::LayerParts {
            experts: context.experts,
            statistics,
            plan: &plan,
            matrices: &self.budget.matrices,
            stored_dtype: self.stored_dtype,
            export_dense: context.export_dense,
        };
        let (record, matrices) = match self.options.output.dry_run {
            true => (None, assemble::planned_reports(&parts)),
            false => {
                let mut outputs = Vec::new();
                for method in &self.methods {
                    outputs.extend(method.apply(context, &plan.of_method(method.name()))?);
                }
                seconds.apply = lap();
                staging::fault_point(&format!("factored:{}", statistics.layer));
                check_interrupt()?;
                let layer = assemble::assemble(&parts, outputs)?;
                let (record, reports) = (layer.record.clone(), layer.reports.clone());
                emitter.write_layer(context.experts, layer)?;
                seconds.emit = lap();
                (record, reports)
            }
        };
        let mut layer_report = report::layer_report(statistics, matrices, *seconds);
        layer_report.plan = Some(summary);
        for method in &self.methods {
            method.describe_layer(statistics.layer, &mut layer_report);
        }
        Ok((record, layer_report))
    }

    /// Saves the statistics cache, unless it was replayed or this run resumed finished layers
    /// (whose statistics it never collected).
    fn save_statistics(&self) -> Result<()> {
        let complete = self.resumed_layers.is_empty();
        match (
            self.options.calibration.statistics_cache.as_deref(),
            self.replaying,
        ) {
            (Some(path), false) if complete => calibrate::save_statistics(
                path,
                &self.statistics_to_save,
                &self.statistics_key,
                self.backend,
            ),
            _ => Ok(()),
        }
    }

    /// Assembles the report and the record, and lets the emitter finish the outputs.
    fn finish(
        self,
        emitter: Emitter,
        calibration_tokens: usize,
        started: Instant,
    ) -> Result<Report> {
        let model_parameters = self
            .checkpoint
            .tensor_names()
            .into_iter()
            .filter(|name| !self.checkpoint.is_quantisation_scale(name))
            .filter_map(|name| self.checkpoint.info(name))
            .map(|(info, _)| info.numel() as u64)
            .sum();
        let mut report = self.totals.report(
            self.options.clone(),
            (calibration_tokens, self.fingerprint.to_string()),
            model_parameters,
            self.layer_reports,
        );
        report.seconds = started.elapsed().as_secs_f64();
        report.resumed_layers = self.resumed_layers;
        report.stored_bytes = emitter.stored_bytes()?;
        report.budget = self.budget_report;
        let mut record = CompressionRecord {
            method: "rfid-moe".into(),
            tool_version: report.tool_version.clone(),
            basis_activation: Default::default(),
            residual_seed: 0,
            settings: serde_json::to_value(self.options).unwrap_or_default(),
            calibration_fingerprint: self.fingerprint.to_string(),
            factor_storage: None,
            layers: self.records,
        };
        for method in &self.methods {
            method.annotate(&mut record);
        }
        let report_json = report.checkpoint_json()?;
        let pruned_layers: Vec<(usize, &LayerPruning)> = report
            .layers
            .iter()
            .filter_map(|l| l.pruning.as_ref().map(|p| (l.layer, p)))
            .collect();
        let compressed = !record.layers.is_empty();
        let pruned_config = removal::PrunedConfig::new(&pruned_layers, compressed)?;
        let options_toml = self.options.to_toml()?;
        report.output = emitter.finish(&RunFiles {
            record: compressed.then_some(&record),
            report_json: &report_json,
            options_toml: &options_toml,
            pruning: pruned_config.as_ref(),
            model_card: Some(crate::model_card::render_output_card),
        })?;
        Ok(report)
    }
}

/// How far the smallest plan may exceed a budget of `before` (half a point of it): the step of
/// methods that cannot meet a budget exactly (a whole expert removed).
fn tolerance(before: f64) -> f64 {
    0.005 * before
}

/// What a layer's plan chose, counted per matrix and kind, for the report.
fn plan_summary(plan: &LayerPlan, unit: BudgetUnit) -> PlanSummary {
    let mut choices: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for c in &plan.chosen {
        let kind = match c.method == c.label {
            true => c.method.clone(),
            false => format!("{} {}", c.method, c.label),
        };
        *choices
            .entry(c.unit.matrix().name().to_string())
            .or_default()
            .entry(kind)
            .or_default() += 1;
    }
    let removal = plan
        .pruning
        .as_ref()
        .and_then(|p| p.estimated_error)
        .unwrap_or(0.0);
    PlanSummary {
        before: plan.target.before,
        target: plan.target.target,
        planned: plan.size(unit),
        estimated_error: plan.error() + removal,
        choices,
    }
}
