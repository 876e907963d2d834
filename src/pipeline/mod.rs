//! The RFID-MoE pipeline as stages, each a module with a plain data type in and out:
//!
//! ```text
//! calibrate  windows → LayerStatistics   (routing counts, groups, group Gram matrices)
//! analyse    LayerStatistics → LayerAnalysis   (group frequency, effective ranks, shapes)
//! allocate   LayerAnalysis → RankPlan   (scores, ranks under the budget)
//! factor     RankPlan → FactoredLayer   (SVD / basis factors, residual, tensors)
//! emit       FactoredLayer → a layer's shard (+ record and report)
//! ```
//!
//! Layers are streamed: each decoder layer is calibrated on the hidden states the previous one
//! produced, analysed, allocated, factored and written as its own shard before the next is read.
//! The driver below only wires the stages; `docs/ARCHITECTURE.md` draws the whole picture.

pub mod allocate;
pub mod analyse;
pub mod budget;
pub mod calibrate;
pub mod emit;
pub mod experts;
pub mod factor;
pub mod hf_compat;
pub mod options;
pub mod prune;
pub mod report;
pub mod resume;
pub mod tune;

use std::time::Instant;

use candle_core::{DType, Device};

use crate::checkpoint::experts::ExpertLayout;
use crate::checkpoint::{int8, Checkpoint, StoredDType};
use crate::error::{Error, Result};
use crate::format::CompressionRecord;
use crate::linalg::{CpuBackend, LinalgBackend};
use crate::progress::{Progress, Silent, Task};
use crate::safety::staging;
use allocate::RankPlan;
use calibrate::{CalibrationStream, LayerStatistics};
use emit::{Emitter, RunFiles};
use experts::LayerExperts;
use factor::{BasisFactorizer, FactorSettings, Factorizer, SvdFactorizer};
pub use options::{
    parse_device, AllocationOptions, BudgetScope, BudgetUnit, CalibrationOptions, CompressMethod,
    CompressOptions, FactorizationOptions, FactorizerKind, OutputOptions, PruningOptions, Saliency,
};
pub use report::{read_layer_reports, GroupReport, LayerReport, Report};

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
    options.validate()?;
    let started = Instant::now();
    let device = parse_device(&options.device)?;
    let checkpoint = Checkpoint::open(&options.model)?;
    // The stages see the parameter ratio a byte budget comes to; what is saved (settings,
    // resume manifest) is what was asked for.
    let requested = options;
    let (resolved, byte_budget) = budget::resolve(requested, &checkpoint)?;
    let options = &resolved;
    let backend = CpuBackend;
    let windows = calibrate::calibration_windows(&options.calibration, &checkpoint)?;
    let fingerprint = calibrate::fingerprint(&windows);
    let calibration_tokens = windows.iter().map(Vec::len).sum();
    // `--xi auto` measures candidates on held-out windows, which calibrate nothing.
    let windows = match options.allocation.xi_auto {
        true => tune::split_holdout(&windows, options.calibration.holdout_fraction)?,
        false => (windows, Vec::new()),
    };
    let mut run = Run::new(options, &checkpoint, &backend, &fingerprint)
        .map_err(|error| budget::in_requested_terms(error, byte_budget.as_ref()))?;
    let manifest = resume::Manifest::new(requested, &checkpoint, &fingerprint)?;
    // A signal now only asks the run to stop at its next safe point.
    let _cooperative = (!options.output.dry_run).then(staging::InterruptScope::enter);
    // Outputs are claimed before any long work, so a refused output fails at once.
    let mut emitter = Emitter::create(&checkpoint, &options.output, &manifest)?;
    if int8_factors(options) {
        emitter.store_factors_as_int8();
    }
    for note in emitter.resume_notes() {
        progress.message("resume", note);
    }
    let finished = emitter.finished_layers();
    if let Err(error) = run.compress_layers(&mut emitter, &windows, &device, progress, &finished) {
        return Err(stopped(emitter, error));
    }
    run.save_statistics()?;
    run.finish(
        emitter,
        calibration_tokens,
        started,
        (requested, byte_budget),
    )
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
    let resume_hint =
        match kept {
            Some(dir) => format!(
            "{finished} finished layer(s){} kept in {}; run the same command again to continue \
             from layer {finished}, or add --restart to start over",
            if plans_saved { " and the model-wide rank plan" } else { "" },
            dir.display()
        ),
            None => "no layer was finished, so nothing was kept; run the command again to start \
                 over"
                .to_string(),
        };
    Error::Interrupted {
        signal,
        resume_hint,
    }
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

/// A written layer's record (None when nothing was factored) and per-matrix group reports.
type WrittenLayer = (
    Option<crate::format::LayerRecord>,
    std::collections::BTreeMap<String, Vec<GroupReport>>,
);

/// The state of one compression run between stages.
struct Run<'a, B: LinalgBackend> {
    options: &'a CompressOptions,
    checkpoint: &'a Checkpoint,
    backend: &'a B,
    fingerprint: &'a str,
    factorizer: Box<dyn Factorizer<B>>,
    factor_dtype: DType,
    stored_dtype: DType,
    statistics_key: String,
    moe_layers: Vec<Option<ExpertLayout>>,
    /// Expert pruning, when the method asks for it.
    prune_plan: Option<prune::PrunePlan>,
    /// The allocation options, at the kept experts' ratio after pruning.
    allocation: AllocationOptions,
    replaying: bool,
    statistics_to_save: Vec<LayerStatistics<B::Matrix>>,
    totals: report::Totals,
    records: Vec<crate::format::LayerRecord>,
    layer_reports: Vec<LayerReport>,
    resumed_layers: Vec<usize>,
}

impl<'a, B: LinalgBackend> Run<'a, B> {
    fn new(
        options: &'a CompressOptions,
        checkpoint: &'a Checkpoint,
        backend: &'a B,
        fingerprint: &'a str,
    ) -> Result<Self> {
        let factorization = &options.factorization;
        let factorizer: Box<dyn Factorizer<B>> = match factorization.factorizer {
            FactorizerKind::Svd => Box::new(SvdFactorizer),
            FactorizerKind::Basis => Box::new(BasisFactorizer {
                steps: factorization.fit_steps,
                learning_rate: factorization.learning_rate,
                patience: 50,
            }),
        };
        let moe_layers = crate::models::ArchConfig::from_checkpoint(checkpoint)?
            .spec()
            .moe_layers;
        let prune_plan = prune::PrunePlan::new(options, checkpoint)?;
        let mut allocation = options.allocation.clone();
        if let Some(ratio) = prune_plan.as_ref().and_then(|p| p.lowrank_ratio) {
            allocation.ratio = ratio;
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
        Ok(Self {
            options,
            checkpoint,
            backend,
            fingerprint,
            factorizer,
            factor_dtype: factor_dtype(&factorization.factor_dtype, checkpoint)?,
            stored_dtype: factor_dtype("auto", checkpoint)?,
            statistics_key,
            moe_layers,
            prune_plan,
            allocation,
            replaying: false,
            statistics_to_save: Vec::new(),
            totals: report::Totals::default(),
            records: Vec::new(),
            layer_reports: Vec::new(),
            resumed_layers: Vec::new(),
        })
    }

    /// Streams every layer through the stages, after adopting the `finished` ones (whose hidden
    /// states are recomputed by a forward pass, without statistics).
    fn compress_layers(
        &mut self,
        emitter: &mut Emitter,
        windows: &tune::SplitWindows,
        device: &'a Device,
        progress: &dyn Progress,
        finished: &[resume::CommittedLayer],
    ) -> Result<()> {
        let mut stream = self.statistics_stream(windows, device, progress)?;
        let factors = self.options.pruning.method.factors();
        let model_plans = match self.options.allocation.budget_scope {
            BudgetScope::Model if factors => {
                Some(self.model_plans(&mut stream, emitter, device, progress)?)
            }
            _ => None,
        };
        let task = Task::start(progress, "layers", stream.spec().num_layers as u64);
        if !finished.is_empty() {
            task.message(&format!(
                "resuming at layer {}: {} finished layer(s) kept",
                finished.len(),
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
        loop {
            check_interrupt()?;
            let calibration_started = Instant::now();
            let Some(layer) = stream.next_layer()? else {
                break;
            };
            let calibrate_seconds = calibration_started.elapsed().as_secs_f64();
            staging::fault_point(&format!("calibrated:{}", layer.index));
            task.message(&format!("layer {}", layer.index));
            match layer.statistics {
                Some(statistics) => {
                    let plan = model_plans
                        .as_ref()
                        .and_then(|plans| plans.iter().find(|p| p.layer == layer.index));
                    let calibrated = (statistics, layer.held_out);
                    self.compress_layer(emitter, calibrated, plan, calibrate_seconds)?;
                }
                None => emitter.copy_layer(layer.index)?,
            }
            self.sample_memory();
            self.checkpoint.release_pages();
            task.advance(1);
        }
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

    /// Adds a finished layer's parameters to the totals (a pruned layer's removed experts too).
    fn account_layer(&mut self, report: &LayerReport) -> Result<()> {
        let layout = self.layout(report.layer)?;
        match &report.pruning {
            Some(p) => {
                let factored = self.options.pruning.method.factors();
                let kept = p.kept.len();
                let down_targeted = self
                    .options
                    .allocation
                    .factors(crate::checkpoint::experts::ExpertMatrix::Down);
                self.totals
                    .add_pruned(&layout, (kept, p.removed.len()), factored, down_targeted);
                if factored {
                    let pruned = prune::pruned_layout(&layout, kept);
                    self.totals.add_layer(&pruned, &report.matrices);
                }
            }
            None => self.totals.add_layer(&layout, &report.matrices),
        }
        Ok(())
    }

    /// `--budget-scope model`: the plans an interrupted run saved, or those of a new analysis
    /// pass (saved in the journal before any layer is compressed).
    fn model_plans(
        &mut self,
        stream: &mut CalibrationStream<'a, B>,
        emitter: &Emitter,
        device: &'a Device,
        progress: &dyn Progress,
    ) -> Result<Vec<RankPlan>> {
        if let Some(plans) = emitter.saved_plans()? {
            progress.message(
                "analysing",
                "reusing the interrupted run's model-wide rank plan",
            );
            return Ok(plans);
        }
        let plans = self.plan_whole_model(stream, device, progress)?;
        emitter.save_plans(&plans)?;
        Ok(plans)
    }

    /// The calibrate stage's stream: replayed from the statistics cache when it matches,
    /// otherwise run over the windows.
    fn statistics_stream(
        &mut self,
        (windows, held_out): &tune::SplitWindows,
        device: &'a Device,
        progress: &dyn Progress,
    ) -> Result<CalibrationStream<'a, B>> {
        let calibration = &self.options.calibration;
        let want_gram = self.options.wants_gram();
        let cached = match self.statistics_cache() {
            Some(path) if path.exists() => {
                calibrate::load_statistics(path, &self.statistics_key, self.backend)?
                    .filter(|layers| !want_gram || layers.iter().all(|l| l.group_gram.is_some()))
            }
            _ => None,
        };
        self.replaying = cached.is_some();
        if self.replaying {
            progress.message("calibration", "reusing saved calibration statistics");
        }
        match cached {
            Some(statistics) => {
                CalibrationStream::replay(self.checkpoint, device, self.backend, statistics)
            }
            None => {
                let mut stream = CalibrationStream::with_held_out(
                    self.checkpoint,
                    [windows, held_out],
                    calibration,
                    want_gram && self.options.pruning.method.factors(),
                    device,
                    self.backend,
                )?;
                stream.set_pruning(self.prune_plan.as_ref().map(|plan| plan.rule));
                stream.set_down_gram(self.options.wants_down_gram());
                Ok(stream)
            }
        }
    }

    /// `--budget-scope model`: a first pass analyses every layer (keeping its statistics), ranks
    /// are allocated over the whole model, and `stream` is replaced by a replay of the
    /// statistics for the factoring pass.
    fn plan_whole_model(
        &mut self,
        stream: &mut CalibrationStream<'a, B>,
        device: &'a Device,
        progress: &dyn Progress,
    ) -> Result<Vec<RankPlan>> {
        let task = Task::start(progress, "analysing", stream.spec().num_layers as u64);
        let (mut analyses, mut kept) = (Vec::new(), Vec::new());
        while let Some(layer) = stream.next_layer()? {
            check_interrupt()?;
            task.advance(1);
            let Some(statistics) = layer.statistics else {
                continue;
            };
            let analysis = self.with_experts(&statistics, |experts| {
                let targeted = self.allocation.targeted();
                analyse::analyse_matrices(self.backend, experts, &statistics, &targeted)
            })?;
            analyses.push(analysis);
            kept.push(statistics);
        }
        drop(task);
        *stream = CalibrationStream::replay(self.checkpoint, device, self.backend, kept)?;
        allocate::allocate_model(&analyses, &self.allocation)
    }

    /// Calls `f` with the layer's experts as the stages see them: after pruning, the kept ones
    /// numbered `0..n'`.
    fn with_experts<R>(
        &self,
        statistics: &LayerStatistics<B::Matrix>,
        f: impl FnOnce(&LayerExperts) -> Result<R>,
    ) -> Result<R> {
        let layout = self.layout(statistics.layer)?;
        match &statistics.pruning {
            Some(pruning) => {
                let pruned = prune::pruned_layout(&layout, pruning.kept.len());
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

    /// The statistics cache, unless `--xi auto` needs the held-out activations it lacks.
    fn statistics_cache(&self) -> Option<&'a std::path::Path> {
        let options = self.options;
        match options.allocation.xi_auto {
            true => None,
            false => options.calibration.statistics_cache.as_deref(),
        }
    }

    /// analyse → allocate (→ tune) → factor → emit for one MoE layer (whose calibration took
    /// `calibrate_seconds`); with `--method prune`, only emit of the kept experts.
    fn compress_layer(
        &mut self,
        emitter: &mut Emitter,
        (statistics, held_out): (LayerStatistics<B::Matrix>, Option<tune::HeldOutActivations>),
        model_plan: Option<&RankPlan>,
        calibrate_seconds: f64,
    ) -> Result<()> {
        let mut seconds = report::StageSeconds {
            calibrate: calibrate_seconds,
            ..Default::default()
        };
        check_interrupt()?;
        let mut xi_search = None;
        let (record, matrices) = match self.options.pruning.method.factors() {
            true => {
                let (written, search) = self.with_experts(&statistics, |experts| {
                    let layer = (experts, &statistics, held_out.as_ref());
                    self.factor_and_write(emitter, layer, model_plan, &mut seconds)
                })?;
                xi_search = search;
                written
            }
            false => {
                let clock = Instant::now();
                self.with_experts(&statistics, |experts| {
                    emitter.write_pruned_layer(experts, statistics.layer)
                })?;
                seconds.emit = clock.elapsed().as_secs_f64();
                (None, Default::default())
            }
        };
        self.sample_memory();
        let mut layer_report = report::layer_report(&statistics, matrices, seconds);
        layer_report.xi_search = xi_search;
        self.account_layer(&layer_report)?;
        emitter.commit_layer(statistics.layer, record.clone(), Some(layer_report.clone()))?;
        self.records.extend(record);
        self.layer_reports.push(layer_report);
        if self.statistics_cache().is_some() && !self.replaying {
            self.statistics_to_save.push(statistics);
        }
        Ok(())
    }

    /// analyse → allocate (→ tune, with held-out activations) → factor → emit of `experts`;
    /// returns the layer's record and its per-matrix group reports with the `--xi auto` search,
    /// and the time of each stage in `seconds`.
    fn factor_and_write(
        &self,
        emitter: &mut Emitter,
        (experts, statistics, held_out): (
            &LayerExperts,
            &LayerStatistics<B::Matrix>,
            Option<&tune::HeldOutActivations>,
        ),
        model_plan: Option<&RankPlan>,
        seconds: &mut report::StageSeconds,
    ) -> Result<(WrittenLayer, Option<tune::XiSearch>)> {
        let mut clock = Instant::now();
        let mut lap = || {
            let elapsed = clock.elapsed().as_secs_f64();
            clock = Instant::now();
            elapsed
        };
        let targeted = self.allocation.targeted();
        let analysis = analyse::analyse_matrices(self.backend, experts, statistics, &targeted)?;
        seconds.analyse = lap();
        let (plan, xi_search) = match (model_plan, held_out) {
            (Some(plan), _) => (plan.clone(), None),
            (None, Some(held_out)) if self.allocation.xi_auto => {
                let search = tune::SearchSettings {
                    allocation: &self.allocation,
                    whiten: self.options.factorization.whiten,
                    whiten_ridge: self.options.factorization.whiten_ridge,
                };
                let (plan, found) = tune::search_xi(
                    self.backend,
                    experts,
                    statistics,
                    &analysis,
                    held_out,
                    &search,
                )?;
                seconds.tune = lap();
                (plan, Some(found))
            }
            (None, _) => (allocate::allocate_layer(&analysis, &self.allocation)?, None),
        };
        seconds.allocate = lap();
        let settings = FactorSettings {
            factorizer: self.factorizer.as_ref(),
            whiten: self.options.factorization.whiten,
            whiten_ridge: self.options.factorization.whiten_ridge,
            residual_seed: self.options.factorization.residual_seed,
            factor_dtype: self.factor_dtype,
            stored_dtype: self.stored_dtype,
            factorize: !self.options.output.dry_run,
            keep_reconstruction: self.options.output.export_dense.is_some(),
        };
        let factored = factor::factor_layer(
            self.backend,
            experts,
            statistics,
            &analysis,
            &plan,
            &settings,
        )?;
        seconds.factor = lap();
        staging::fault_point(&format!("factored:{}", statistics.layer));
        check_interrupt()?;
        let (record, matrices) = emitter.write_layer(experts, factored, self.stored_dtype)?;
        seconds.emit = lap();
        Ok(((Some(record), matrices), xi_search))
    }

    fn sample_memory(&mut self) {
        self.totals.sample_memory();
    }

    /// Saves the statistics cache, unless it was replayed or this run resumed finished layers
    /// (whose statistics it never collected).
    fn save_statistics(&self) -> Result<()> {
        let complete = self.resumed_layers.is_empty();
        match (self.statistics_cache(), self.replaying) {
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
        (requested, byte_budget): (&CompressOptions, Option<budget::ByteBudget>),
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
            requested.clone(),
            calibration_tokens,
            self.fingerprint.to_string(),
            model_parameters,
            self.layer_reports,
        );
        report.seconds = started.elapsed().as_secs_f64();
        report.resumed_layers = self.resumed_layers;
        report.stored_bytes = emitter.stored_bytes()?;
        report.byte_budget = byte_budget;
        let record = CompressionRecord {
            method: "rfid-moe".into(),
            tool_version: report.tool_version.clone(),
            basis_activation: self.factorizer.activation(),
            residual_seed: self.options.factorization.residual_seed,
            settings: serde_json::to_value(requested).unwrap_or_default(),
            calibration_fingerprint: self.fingerprint.to_string(),
            factor_storage: int8_factors(self.options).then(|| int8::STORAGE_NAME.to_string()),
            layers: self.records,
        };
        let report_json = report.checkpoint_json()?;
        let pruned_layers: Vec<(usize, &prune::LayerPruning)> = report
            .layers
            .iter()
            .filter_map(|l| l.pruning.as_ref().map(|p| (l.layer, p)))
            .collect();
        let pruned_config = self
            .prune_plan
            .as_ref()
            .map(|plan| prune::PrunedConfig::new(plan, &pruned_layers));
        let options_toml = toml::to_string(requested)
            .map_err(|e| Error::InvalidArgument(format!("compress.toml: {e}")))?;
        report.output = emitter.finish(&RunFiles {
            record: &record,
            report_json: &report_json,
            options_toml: &options_toml,
            pruning: pruned_config.as_ref(),
            model_card: Some(crate::model_card::render_output_card),
        })?;
        Ok(report)
    }
}

/// `--factor-dtype int8`: the compressor's tensors are stored as int8 with row-block scales.
pub(crate) const INT8_FACTORS: &str = "int8";

/// Whether the run stores its factors as int8 ([`int8`]).
fn int8_factors(options: &CompressOptions) -> bool {
    options.factorization.factor_dtype == INT8_FACTORS
}

/// The dtype of factors as the factor stage hands them over: `auto` follows the checkpoint's
/// dominant float dtype; int8 factors are quantised from f32.
pub(crate) fn factor_dtype(name: &str, checkpoint: &Checkpoint) -> Result<DType> {
    Ok(match name {
        "auto" => match checkpoint.dominant_dtype() {
            StoredDType::BF16 => DType::BF16,
            StoredDType::F16 => DType::F16,
            // FP8 weights are never written: factors of an FP8 checkpoint are bf16.
            StoredDType::F8E4M3 | StoredDType::F8E5M2 => DType::BF16,
            _ => DType::F32,
        },
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        INT8_FACTORS => DType::F32,
        other => {
            return Err(Error::InvalidArgument(format!(
                "--factor-dtype `{other}` (expected auto, f32, bf16, f16 or int8)"
            )))
        }
    })
}
