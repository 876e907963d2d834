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
pub mod calibrate;
pub mod emit;
pub mod experts;
pub mod factor;
pub mod hf_compat;
pub mod options;
pub mod report;

use std::time::Instant;

use candle_core::{DType, Device};

use crate::checkpoint::experts::ExpertLayout;
use crate::checkpoint::{Checkpoint, StoredDType};
use crate::error::{Error, Result};
use crate::format::CompressionRecord;
use crate::linalg::{CpuBackend, LinalgBackend};
use crate::progress::{Progress, Silent, Task};
use allocate::RankPlan;
use calibrate::{CalibrationStream, LayerStatistics};
use emit::{Emitter, RunFiles};
use experts::LayerExperts;
use factor::{BasisFactorizer, FactorSettings, Factorizer, SvdFactorizer};
pub use options::{
    parse_device, AllocationOptions, BudgetScope, CalibrationOptions, CompressOptions,
    FactorizationOptions, FactorizerKind, OutputOptions,
};
pub use report::{read_layer_reports, GroupReport, LayerReport, Report};

/// Runs the whole pipeline described by `options`, reporting nothing.
pub fn compress(options: &CompressOptions) -> Result<Report> {
    compress_with_progress(options, &Silent)
}

/// Runs the whole pipeline described by `options`, telling `progress` how far it is.
pub fn compress_with_progress(
    options: &CompressOptions,
    progress: &dyn Progress,
) -> Result<Report> {
    options.validate()?;
    let started = Instant::now();
    let device = parse_device(&options.device)?;
    let checkpoint = Checkpoint::open(&options.model)?;
    let backend = CpuBackend;
    let windows = calibrate::calibration_windows(&options.calibration, &checkpoint)?;
    let fingerprint = calibrate::fingerprint(&windows);
    let mut run = Run::new(options, &checkpoint, &backend, &fingerprint)?;
    // Outputs are claimed before any long work, so a refused output fails at once.
    let mut emitter = Emitter::create(&checkpoint, &options.output)?;
    let mut stream = run.statistics_stream(&windows, &device, progress)?;
    let model_plans = match options.allocation.budget_scope {
        BudgetScope::Model => Some(run.plan_whole_model(&mut stream, &device, progress)?),
        BudgetScope::Layer => None,
    };
    let task = Task::start(progress, "layers", stream.spec().num_layers as u64);
    loop {
        let calibration_started = Instant::now();
        let Some(layer) = stream.next_layer()? else {
            break;
        };
        let calibrate_seconds = calibration_started.elapsed().as_secs_f64();
        task.message(&format!("layer {}", layer.index));
        match layer.statistics {
            Some(statistics) => {
                let plan = model_plans
                    .as_ref()
                    .and_then(|plans| plans.iter().find(|p| p.layer == layer.index));
                run.compress_layer(&mut emitter, statistics, plan, calibrate_seconds)?;
            }
            None => emitter.copy_layer(layer.index)?,
        }
        run.sample_memory();
        checkpoint.release_pages();
        task.advance(1);
    }
    drop(task);
    run.save_statistics()?;
    run.finish(emitter, windows.iter().map(Vec::len).sum(), started)
}

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
    replaying: bool,
    statistics_to_save: Vec<LayerStatistics<B::Matrix>>,
    totals: report::Totals,
    records: Vec<crate::format::LayerRecord>,
    layer_reports: Vec<LayerReport>,
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
            replaying: false,
            statistics_to_save: Vec::new(),
            totals: report::Totals::default(),
            records: Vec::new(),
            layer_reports: Vec::new(),
        })
    }

    /// The calibrate stage's stream: replayed from the statistics cache when it matches,
    /// otherwise run over the windows.
    fn statistics_stream(
        &mut self,
        windows: &[Vec<u32>],
        device: &'a Device,
        progress: &dyn Progress,
    ) -> Result<CalibrationStream<'a, B>> {
        let calibration = &self.options.calibration;
        let want_gram = self.options.wants_gram();
        let cached = match &calibration.statistics_cache {
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
            None => CalibrationStream::new(
                self.checkpoint,
                windows,
                calibration,
                want_gram,
                device,
                self.backend,
            ),
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
            task.advance(1);
            let Some(statistics) = layer.statistics else {
                continue;
            };
            let layout = self.layout(layer.index)?;
            let experts = LayerExperts::new(self.checkpoint, &layout);
            analyses.push(analyse::analyse_layer(self.backend, &experts, &statistics)?);
            kept.push(statistics);
        }
        drop(task);
        *stream = CalibrationStream::replay(self.checkpoint, device, self.backend, kept)?;
        allocate::allocate_model(&analyses, &self.options.allocation)
    }

    fn layout(&self, index: usize) -> Result<ExpertLayout> {
        self.moe_layers
            .get(index)
            .cloned()
            .flatten()
            .ok_or_else(|| Error::InvalidArgument(format!("layer {index} is not a MoE layer")))
    }

    /// analyse → allocate → factor → emit for one MoE layer (whose calibration took
    /// `calibrate_seconds`).
    fn compress_layer(
        &mut self,
        emitter: &mut Emitter,
        statistics: LayerStatistics<B::Matrix>,
        model_plan: Option<&RankPlan>,
        calibrate_seconds: f64,
    ) -> Result<()> {
        let mut seconds = report::StageSeconds {
            calibrate: calibrate_seconds,
            ..Default::default()
        };
        let mut clock = Instant::now();
        let mut lap = || {
            let elapsed = clock.elapsed().as_secs_f64();
            clock = Instant::now();
            elapsed
        };
        let layout = self.layout(statistics.layer)?;
        let experts = LayerExperts::new(self.checkpoint, &layout);
        let analysis = analyse::analyse_layer(self.backend, &experts, &statistics)?;
        seconds.analyse = lap();
        let plan = match model_plan {
            Some(plan) => plan.clone(),
            None => allocate::allocate_layer(&analysis, &self.options.allocation)?,
        };
        seconds.allocate = lap();
        self.sample_memory();
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
            &experts,
            &statistics,
            &analysis,
            &plan,
            &settings,
        )?;
        seconds.factor = lap();
        self.sample_memory();
        let (record, matrices) = emitter.write_layer(&experts, factored, self.stored_dtype)?;
        seconds.emit = lap();
        self.totals.add_layer(&layout, &matrices);
        self.records.push(record);
        self.layer_reports
            .push(report::layer_report(&statistics, matrices, seconds));
        if self.options.calibration.statistics_cache.is_some() && !self.replaying {
            self.statistics_to_save.push(statistics);
        }
        Ok(())
    }

    fn sample_memory(&mut self) {
        self.totals.sample_memory();
    }

    fn save_statistics(&self) -> Result<()> {
        match (&self.options.calibration.statistics_cache, self.replaying) {
            (Some(path), false) => calibrate::save_statistics(
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
            .filter(|name| !self.checkpoint.is_fp8_scale(name))
            .filter_map(|name| self.checkpoint.info(name))
            .map(|(info, _)| info.numel() as u64)
            .sum();
        let mut report = self.totals.report(
            self.options.clone(),
            calibration_tokens,
            self.fingerprint.to_string(),
            model_parameters,
            self.layer_reports,
        );
        report.seconds = started.elapsed().as_secs_f64();
        let record = CompressionRecord {
            method: "rfid-moe".into(),
            tool_version: report.tool_version.clone(),
            basis_activation: self.factorizer.activation(),
            residual_seed: self.options.factorization.residual_seed,
            settings: serde_json::to_value(self.options).unwrap_or_default(),
            calibration_fingerprint: self.fingerprint.to_string(),
            layers: self.records,
        };
        let report_json = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::InvalidArgument(format!("report: {e}")))?;
        let options_toml = toml::to_string(self.options)
            .map_err(|e| Error::InvalidArgument(format!("compress.toml: {e}")))?;
        report.output = emitter.finish(&RunFiles {
            record: &record,
            report_json: &report_json,
            options_toml: &options_toml,
        })?;
        Ok(report)
    }
}

/// The dtype of written factors: `auto` follows the checkpoint's dominant float dtype.
fn factor_dtype(name: &str, checkpoint: &Checkpoint) -> Result<DType> {
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
        other => {
            return Err(Error::InvalidArgument(format!(
                "--factor-dtype `{other}` (expected auto, f32, bf16 or f16)"
            )))
        }
    })
}
