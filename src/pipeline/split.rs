//! One compression run split into units of work that other processes or machines run, sharing
//! one run directory:
//!
//! ```text
//! plan    the manifest, the units (layer ranges), each unit's input hidden states  (sequential)
//! unit    a unit's layers: offers (model-wide budget, first wave), then its shards (journalled)
//! solve   one model-wide plan from every unit's offers                             (once)
//! merge   every unit verified and taken into the output, which is finished as usual (once)
//! ```
//!
//! Layers are independent once their input is known, because calibration runs the original
//! model: a unit starts from the hidden states the plan step saved at its first layer, and its
//! layers equal those of a single-process run, so the merged output is byte for byte that run's.
//! Every step takes the same options; a run directory of other options is refused by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::calibrate::CalibrationStream;
use super::emit::Emitter;
use super::plan::{LayerOffer, LayerPlan};
use super::resume::{self, read_sealed, write_sealed, CommittedLayer, Manifest};
use super::{BudgetScope, CompressOptions, Prepared, Registry, Report, Run};
use crate::checkpoint::writer::{save_safetensors_atomic, JOURNAL_DIR};
use crate::error::{Error, Result};
use crate::linalg::CpuBackend;
use crate::progress::{Progress, Silent};
use crate::safety::{checksum, staging};

/// The run's plan in its directory.
pub const RUN_FILE: &str = "run.json";
/// Written by a finished merge; the run is then done.
pub const MERGED_FILE: &str = "merged.json";
const INPUTS_DIR: &str = "inputs";
const OFFERS_DIR: &str = "offers";
const UNITS_DIR: &str = "units";
const PLANS_FILE: &str = "plans.json";
/// Units a plan makes when none are asked for.
pub const DEFAULT_UNITS: usize = 4;

/// A step of a split run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitStep {
    /// Plans the run in this many units (fewer when the model has fewer layers).
    Plan {
        /// Units asked for (None: [`DEFAULT_UNITS`], or the planned ones for a planned run).
        units: Option<usize>,
    },
    /// Runs one unit's next wave (offers, or its layers).
    Unit(usize),
    /// Solves the model-wide plan from every unit's offers.
    Solve,
    /// Assembles the output from the finished units.
    Merge,
    /// Only reports where the run stands.
    Status,
}

/// One unit of work: a range of decoder layers and the file of its input hidden states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitSpec {
    /// Unit number, from 0.
    pub unit: usize,
    /// Its decoder layers, `[first, end)`.
    pub layers: [usize; 2],
    /// Its input file inside the run directory.
    pub input: String,
    /// Size of the input file in bytes.
    pub input_bytes: u64,
    /// Checksum of the input file.
    pub input_checksum: String,
}

/// What a run directory's `run.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunPlan {
    /// The run's identity: model, resolved options, calibration fingerprint.
    pub manifest: Manifest,
    /// The units, in layer order.
    pub units: Vec<UnitSpec>,
}

/// The step a run needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NextStep {
    /// Nothing planned yet.
    Plan,
    /// The units in `pending` must save their offers.
    Offer,
    /// Every offer is saved: solve the model-wide plan.
    Solve,
    /// The units in `pending` must write their layers.
    Apply,
    /// Every unit is finished: merge.
    Merge,
    /// Merged: the output is in place.
    Done,
}

/// Where a split run stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunStatus {
    /// The run directory.
    pub run: PathBuf,
    /// What to run next.
    pub next: NextStep,
    /// Number of units (0 before the plan).
    pub units: usize,
    /// The units the next wave must run (offer or apply).
    pub pending: Vec<usize>,
    /// `model` or `layer`.
    pub scope: String,
    /// Each unit's decoder layers, `[first, end)`.
    pub unit_layers: Vec<[usize; 2]>,
    /// The output, once merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
}

/// What a step did: where the run stands after it, and the report of a merge.
pub struct StepOutcome {
    /// The run after the step.
    pub status: RunStatus,
    /// The merged output's report (merge only).
    pub report: Option<Report>,
}

/// Runs `step` of the split run of `options` in `run_dir` with the built-in methods.
pub fn run_step(
    options: &CompressOptions,
    run_dir: &Path,
    step: SplitStep,
    progress: &dyn Progress,
) -> Result<StepOutcome> {
    run_step_with(options, &Registry::builtin(), run_dir, step, progress)
}

/// [`run_step`] with the methods of `registry`.
pub fn run_step_with(
    options: &CompressOptions,
    registry: &Registry<CpuBackend>,
    run_dir: &Path,
    step: SplitStep,
    progress: &dyn Progress,
) -> Result<StepOutcome> {
    let started = Instant::now();
    // Only the unit and plan steps run layers; the others must work on a machine without the
    // run's device (a login node).
    let runs_layers = matches!(step, SplitStep::Plan { .. } | SplitStep::Unit(_));
    let (prepared, methods) = Prepared::new(options, registry, runs_layers)?;
    check_splittable(&prepared, &methods)?;
    let (mut run, windows) = prepared.start(methods)?;
    let split = SplitRun {
        dir: run_dir.to_path_buf(),
        id: run_id(&prepared.manifest)?,
        manifest: prepared.manifest.clone(),
        model_scope: prepared.options.budget.scope == BudgetScope::Model,
        moe: run.moe_layers.iter().map(Option::is_some).collect(),
    };
    let _cooperative = staging::InterruptScope::enter();
    let merged = split.merged_output().is_some();
    let streams = UnitStreams {
        windows: &windows,
        device: &prepared.device,
    };
    let outcome = match step {
        SplitStep::Status => Ok(None),
        // A merged run's units, inputs and offers are gone: nothing is left to redo.
        _ if merged => split.read_plan().map(|_| {
            split.remove_unit_files();
            progress.message("run", "the run is merged already; nothing to do");
            None
        }),
        SplitStep::Plan { units } => split
            .plan(&mut run, streams, units, progress)
            .map(|()| None),
        SplitStep::Unit(unit) => split
            .run_unit(&mut run, unit, streams, progress)
            .map(|()| None),
        SplitStep::Solve => split.solve(&run).map(|()| None),
        SplitStep::Merge => split.merge(run, streams, (prepared.calibration_tokens, started)),
    };
    let report = match outcome {
        Err(Error::Interrupted { signal, .. }) => {
            return Err(Error::Interrupted {
                signal,
                resume_hint: format!(
                    "{} keeps every finished layer and offer; run the same step again to \
                     continue",
                    split.dir.display()
                ),
            })
        }
        other => other?,
    };
    let status = split.status()?;
    Ok(StepOutcome { status, report })
}

/// A run's identity in the files its steps write: the checksum of its manifest.
fn run_id(manifest: &Manifest) -> Result<String> {
    let text = serde_json::to_vec(manifest)
        .map_err(|e| Error::InvalidArgument(format!("the run's manifest: {e}")))?;
    Ok(checksum::hex(checksum::fnv1a(&text)))
}

/// A file a step writes for the run it belongs to (offers, plans, the merge's record).
#[derive(Serialize, Deserialize)]
struct Stamped<T> {
    /// The run's id ([`run_id`]).
    run: String,
    /// What the step wrote.
    entry: T,
}

/// What the merge records: where the output went.
#[derive(Serialize, Deserialize)]
struct MergedRecord {
    output: Option<PathBuf>,
}

/// Refuses what a split run cannot do the way a single-process run does.
fn check_splittable(prepared: &Prepared, methods: &super::Methods) -> Result<()> {
    let options = &prepared.options;
    let refuse = |what: &str| Err(Error::InvalidArgument(format!("a split run {what}")));
    if options.output.out.is_none() {
        return refuse("needs --out");
    }
    if options.output.dry_run {
        return refuse("writes its output; preview the plan with a single --dry-run instead");
    }
    if options.output.export_dense.is_some() {
        return refuse("does not write --export-dense");
    }
    if options.calibration.statistics_cache.is_some() {
        return refuse("calibrates in its units and keeps no statistics cache");
    }
    if super::is_plain_conversion(options, methods) {
        return refuse(
            "has nothing to split at --ratio 0: one process converts without calibrating",
        );
    }
    if options.budget.scope == BudgetScope::Model {
        if let Some(method) = methods.iter().find(|m| !m.settles_from_offers()) {
            return refuse(&format!(
                "cannot settle {}'s model-wide choice in its solve step (the method keeps state \
                 between offering and settling); use --budget-scope layer or the solver's \
                 allocation",
                method.name()
            ));
        }
    }
    Ok(())
}

/// The windows and device a unit's calibration stream is built from.
#[derive(Clone, Copy)]
struct UnitStreams<'s> {
    windows: &'s super::calibrate::SplitWindows,
    device: &'s candle_core::Device,
}

/// A split run's directory and the identity every step must share.
struct SplitRun {
    dir: PathBuf,
    /// The run's id, stamped into every file a step writes.
    id: String,
    manifest: Manifest,
    /// Whether the budget is model-wide (units offer first, then a solve, then write).
    model_scope: bool,
    /// Which decoder layers are MoE layers (those that offer).
    moe: Vec<bool>,
}

impl SplitRun {
    /// The run's plan, refused when its manifest differs from this step's.
    fn read_plan(&self) -> Result<RunPlan> {
        self.saved_plan()?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} holds no planned run: run the plan step (--plan) first",
                self.dir.display()
            ))
        })
    }

    /// Writes `entry` to `path`, sealed and stamped with this run's id.
    fn write_stamped<T: Serialize>(&self, path: &Path, entry: T) -> Result<()> {
        let run = self.id.clone();
        write_sealed(path, &Stamped { run, entry })
    }

    /// The entry a step of this run wrote to `path`: `None` when there is none, `Err` (why) when
    /// it cannot be read, was changed, or belongs to another run.
    fn read_stamped<T>(&self, path: &Path) -> Option<std::result::Result<T, String>>
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        Some(
            read_sealed::<Stamped<T>>(path)?.and_then(|stamped| match stamped.run == self.id {
                true => Ok(stamped.entry),
                false => Err(format!(
                    "{} was written by another run (run {}, this run {})",
                    path.display(),
                    stamped.run,
                    self.id
                )),
            }),
        )
    }

    /// The model-wide plan the solve step saved, if any.
    fn solved_plans(&self) -> Result<Option<Vec<LayerPlan>>> {
        let path = self.dir.join(PLANS_FILE);
        match self.read_stamped::<Vec<LayerPlan>>(&path) {
            None => Ok(None),
            Some(Ok(plans)) => Ok(Some(plans)),
            Some(Err(message)) => Err(Error::Json { path, message }),
        }
    }

    /// Where the merge put the output, once the run is merged.
    fn merged_output(&self) -> Option<Option<PathBuf>> {
        match self.read_stamped::<MergedRecord>(&self.dir.join(MERGED_FILE)) {
            Some(Ok(record)) => Some(record.output),
            _ => None,
        }
    }

    /// Removes what only the units and the merge need (inputs, offers, plans, unit files).
    fn remove_unit_files(&self) {
        for name in [INPUTS_DIR, OFFERS_DIR, UNITS_DIR, PLANS_FILE] {
            staging::remove_path(&self.dir.join(name));
        }
    }

    /// The run's plan if there is one, refused when its manifest differs from this step's.
    fn saved_plan(&self) -> Result<Option<RunPlan>> {
        let path = self.dir.join(RUN_FILE);
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(None);
        };
        let plan: RunPlan = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let differences = self.manifest.differences(&plan.manifest);
        if !differences.is_empty() {
            return Err(Error::RunMismatch {
                run: self.dir.clone(),
                differences: differences.join(", "),
            });
        }
        Ok(Some(plan))
    }

    /// Plans the run: the units as even layer ranges and each unit's input hidden states, from
    /// one forward pass without statistics. A run already planned with these options is kept.
    fn plan<'r>(
        &self,
        run: &mut Run<'r, CpuBackend>,
        streams: UnitStreams<'r>,
        units: Option<usize>,
        progress: &dyn Progress,
    ) -> Result<()> {
        if let Some(plan) = self.saved_plan()? {
            if units.is_some_and(|units| units.min(run.num_layers) != plan.units.len()) {
                return Err(Error::InvalidArgument(format!(
                    "{} is planned in {} units already; leave --units out, or plan the new \
                     split in another --run directory",
                    self.dir.display(),
                    plan.units.len()
                )));
            }
            progress.message("plan", "the run is planned already; keeping its plan");
            return Ok(());
        }
        // Without a plan, anything here is left from another run's steps.
        self.remove_unit_files();
        staging::remove_path(&self.dir.join(MERGED_FILE));
        let units = units.unwrap_or(DEFAULT_UNITS);
        let inputs = self.dir.join(INPUTS_DIR);
        std::fs::create_dir_all(&inputs).map_err(|e| Error::io(&inputs, e))?;
        let ranges = layer_ranges(run.num_layers, units);
        let mut stream = run.statistics_stream(streams.windows, streams.device, &Silent)?;
        let task = crate::progress::Task::start(progress, "plan", run.num_layers as u64);
        let mut specs = Vec::new();
        for (unit, range) in ranges.iter().enumerate() {
            while stream.boundary().0 < range[0] {
                super::check_interrupt()?;
                stream.skip_layer()?;
                task.advance(1);
            }
            let file = format!("{INPUTS_DIR}/unit-{unit:04}.safetensors");
            let path = self.dir.join(&file);
            save_boundary(&stream, &path)?;
            let (input_bytes, input_checksum) = checksum::file_checksum(&path)?;
            specs.push(UnitSpec {
                unit,
                layers: *range,
                input: file,
                input_bytes,
                input_checksum,
            });
        }
        let plan = RunPlan {
            manifest: self.manifest.clone(),
            units: specs,
        };
        // Plain JSON (the manifest's file times do not fit a sealed entry): what it guards is
        // checked elsewhere (each input's checksum, each step's manifest).
        let path = self.dir.join(RUN_FILE);
        let text = serde_json::to_vec_pretty(&plan).map_err(|e| Error::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        staging::write_durable(&path, &text)
    }

    /// Runs a unit's next wave: with a model-wide budget and no solved plan yet, its offers
    /// (saved per layer); otherwise its layers, journalled in the unit's own staging directory.
    fn run_unit<'r>(
        &self,
        run: &mut Run<'r, CpuBackend>,
        unit: usize,
        streams: UnitStreams<'r>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let plan = self.read_plan()?;
        let spec = plan.units.get(unit).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} has units 0–{}; there is no unit {unit}",
                self.dir.display(),
                plan.units.len().saturating_sub(1)
            ))
        })?;
        // The unit's writer holds its lock through either wave: one process per unit.
        let mut emitter = Emitter::for_unit(
            run.checkpoint,
            &self.unit_out(spec.unit),
            &self.manifest,
            spec.layers[0],
        )?;
        let model_plans = match self.model_scope {
            true => self.solved_plans()?,
            false => None,
        };
        if self.model_scope && model_plans.is_none() {
            return self.unit_offers(run, spec, streams, progress);
        }
        for note in emitter.resume_notes() {
            progress.message("resume", &format!("unit {}: {note}", spec.unit));
        }
        let finished = emitter.finished_layers();
        if spec.layers[0] + finished.len() >= spec.layers[1] {
            return Ok(());
        }
        let mut stream = self.unit_stream(run, spec, streams)?;
        run.stream_layers(
            &mut emitter,
            &mut stream,
            (&finished, spec.layers[1]),
            model_plans.as_deref(),
            progress,
        )
    }

    /// The offer wave of a unit: each MoE layer's offer saved as it is made (a layer whose offer
    /// is saved already is only run through).
    fn unit_offers<'r>(
        &self,
        run: &mut Run<'r, CpuBackend>,
        spec: &UnitSpec,
        streams: UnitStreams<'r>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let offers_dir = self.dir.join(OFFERS_DIR);
        std::fs::create_dir_all(&offers_dir).map_err(|e| Error::io(&offers_dir, e))?;
        let saved = |layer: usize| self.offer_saved(layer);
        let missing = self.moe_layers_of(spec).any(|layer| !saved(layer));
        if !missing {
            return Ok(());
        }
        let mut stream = self.unit_stream(run, spec, streams)?;
        run.offer_layers(&mut stream, spec.layers[1], &saved, progress, |offer| {
            if let Some(bad) = offer.candidates.iter().find(|c| !c.error.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "layer {}: {}'s candidate `{}` has a non-finite estimated error",
                    offer.layer, bad.method, bad.label
                )));
            }
            self.write_stamped(&self.offer_path(offer.layer), &offer)?;
            staging::fault_point(&format!("offered:{}", offer.layer));
            Ok(())
        })
    }

    /// The solve step: settles and solves every unit's offers into one model-wide plan.
    fn solve(&self, run: &Run<CpuBackend>) -> Result<()> {
        let plan = self.read_plan()?;
        if !self.model_scope {
            return Err(Error::InvalidArgument(format!(
                "{} has a per-layer budget: its units plan their own layers, there is nothing \
                 to solve",
                self.dir.display()
            )));
        }
        let plans_path = self.dir.join(PLANS_FILE);
        if self.solved_plans()?.is_some() {
            return Ok(());
        }
        let mut offers = Vec::new();
        let mut waiting = Vec::new();
        for spec in &plan.units {
            for layer in self.moe_layers_of(spec) {
                match self.read_stamped::<LayerOffer>(&self.offer_path(layer)) {
                    Some(Ok(offer)) if offer.layer == layer => offers.push(offer),
                    _ => {
                        if waiting.last() != Some(&spec.unit) {
                            waiting.push(spec.unit);
                        }
                    }
                }
            }
        }
        if !waiting.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "units {} have not saved their offers: run them (--unit N) before --solve",
                join(&waiting)
            )));
        }
        let plans: Vec<LayerPlan> = run.solve_model(&mut offers)?;
        resume::check_plans_finite(&plans)?;
        self.write_stamped(&plans_path, &plans)
    }

    /// The merge step: checks that every unit finished its layers, takes them into the output's
    /// staging directory in order, and finishes the output as a single-process run does; then
    /// removes the units' inputs and files.
    fn merge<'r>(
        &self,
        mut run: Run<'r, CpuBackend>,
        streams: UnitStreams<'r>,
        (calibration_tokens, started): (usize, Instant),
    ) -> Result<Option<Report>> {
        let plan = self.read_plan()?;
        if self.model_scope && self.solved_plans()?.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{} is not solved yet: run --solve, then every unit again, before --merge",
                self.dir.display()
            )));
        }
        let units = self.finished_units(&run, &plan)?;
        let output = &run.options.output;
        let mut emitter = Emitter::create(run.checkpoint, output, &self.manifest)?;
        let imported: Vec<usize> = emitter.finished_layers().iter().map(|l| l.layer).collect();
        for (staging, layers) in &units {
            for entry in layers.iter().filter(|l| !imported.contains(&l.layer)) {
                emitter.import_layer(staging, entry.clone())?;
            }
        }
        drop(emitter);
        drop(units);
        // Reopened, the output verifies every imported shard as it would a resumed run's.
        let mut emitter = Emitter::create(run.checkpoint, output, &self.manifest)?;
        let finished = emitter.finished_layers().len();
        if finished != run.num_layers {
            let notes = emitter.resume_notes().join("; ");
            return Err(Error::InvalidArgument(format!(
                "the output holds {finished} of {} layers after the merge ({notes}); run the \
                 units again, then --merge",
                run.num_layers
            )));
        }
        run.compress_layers(&mut emitter, streams.windows, streams.device, &Silent)?;
        let report = run.finish(emitter, calibration_tokens, started)?;
        // Recorded before the cleanup: a kill during it leaves a merged run whose next step
        // finishes the cleanup, not a run that looks unfinished with its inputs gone.
        let output = report.output.clone();
        self.write_stamped(&self.dir.join(MERGED_FILE), MergedRecord { output })?;
        staging::fault_point("split-merged");
        self.remove_unit_files();
        Ok(Some(report))
    }

    /// Every unit's finished layers, each unit's journal verified by its own writer (under the
    /// unit's lock, so a unit still running is refused); refuses, naming them, units that are
    /// not finished.
    fn finished_units(
        &self,
        run: &Run<CpuBackend>,
        plan: &RunPlan,
    ) -> Result<Vec<(PathBuf, Vec<CommittedLayer>)>> {
        let mut units = Vec::new();
        let mut unfinished = Vec::new();
        for spec in &plan.units {
            let emitter = Emitter::for_unit(
                run.checkpoint,
                &self.unit_out(spec.unit),
                &self.manifest,
                spec.layers[0],
            )?;
            let layers = emitter.finished_layers();
            if spec.layers[0] + layers.len() < spec.layers[1] {
                let notes = emitter.resume_notes().join("; ");
                unfinished.push(format!(
                    "unit {} (layers {}–{}: {} finished{})",
                    spec.unit,
                    spec.layers[0],
                    spec.layers[1] - 1,
                    layers.len(),
                    if notes.is_empty() {
                        String::new()
                    } else {
                        format!("; {notes}")
                    }
                ));
            }
            let staging = emitter
                .staging_dir()
                .map(Path::to_path_buf)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("unit {} has no staging directory", spec.unit))
                })?;
            units.push((staging, layers));
        }
        if !unfinished.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "cannot merge {}: {} not finished; run those units (--unit N) again",
                self.dir.display(),
                unfinished.join(", ")
            )));
        }
        Ok(units)
    }

    /// Where the run stands, from its files alone (nothing is verified: the unit and merge
    /// steps do that).
    fn status(&self) -> Result<RunStatus> {
        let mut status = RunStatus {
            run: self.dir.clone(),
            next: NextStep::Plan,
            units: 0,
            pending: Vec::new(),
            scope: match self.model_scope {
                true => "model".into(),
                false => "layer".into(),
            },
            unit_layers: Vec::new(),
            output: None,
        };
        let Some(plan) = self.saved_plan()? else {
            return Ok(status);
        };
        status.units = plan.units.len();
        status.unit_layers = plan.units.iter().map(|u| u.layers).collect();
        if let Some(output) = self.merged_output() {
            status.next = NextStep::Done;
            status.output = output;
            return Ok(status);
        }
        let solved = self.solved_plans().ok().flatten().is_some();
        let offering = self.model_scope && !solved;
        status.pending = plan
            .units
            .iter()
            .filter(|spec| match offering {
                true => self.moe_layers_of(spec).any(|l| !self.offer_saved(l)),
                false => (spec.layers[0]..spec.layers[1])
                    .any(|l| !self.unit_journal(spec.unit).join(layer_entry(l)).is_file()),
            })
            .map(|spec| spec.unit)
            .collect();
        status.next = match (offering, status.pending.is_empty()) {
            (true, false) => NextStep::Offer,
            (true, true) => NextStep::Solve,
            (false, false) => NextStep::Apply,
            (false, true) => NextStep::Merge,
        };
        Ok(status)
    }

    /// The MoE layers of a unit: those that make an offer (dense layers have none).
    fn moe_layers_of<'s>(&'s self, spec: &UnitSpec) -> impl Iterator<Item = usize> + 's {
        (spec.layers[0]..spec.layers[1])
            .filter(|&layer| self.moe.get(layer).copied().unwrap_or(false))
    }

    /// The stream of a unit: the run's calibration stream continued at the unit's first layer
    /// from the input the plan step saved (checked against its recorded size and checksum).
    fn unit_stream<'r>(
        &self,
        run: &mut Run<'r, CpuBackend>,
        spec: &UnitSpec,
        streams: UnitStreams<'r>,
    ) -> Result<CalibrationStream<'r, CpuBackend>> {
        let path = self.dir.join(&spec.input);
        let (hidden, held_out) = load_boundary(&path, spec)?;
        let mut stream = run.statistics_stream(streams.windows, streams.device, &Silent)?;
        stream.continue_at(spec.layers[0], hidden, held_out, &path)?;
        Ok(stream)
    }

    fn offer_path(&self, layer: usize) -> PathBuf {
        self.dir.join(OFFERS_DIR).join(layer_entry(layer))
    }

    fn offer_saved(&self, layer: usize) -> bool {
        matches!(
            self.read_stamped::<LayerOffer>(&self.offer_path(layer)),
            Some(Ok(offer)) if offer.layer == layer
        )
    }

    /// The output path a unit's writer is opened for (its staging directory sits beside it and
    /// is never moved into place).
    fn unit_out(&self, unit: usize) -> PathBuf {
        self.dir.join(UNITS_DIR).join(format!("unit-{unit:04}"))
    }

    fn unit_journal(&self, unit: usize) -> PathBuf {
        self.dir
            .join(UNITS_DIR)
            .join(staging::resumable_staging_name(&format!("unit-{unit:04}")))
            .join(JOURNAL_DIR)
    }
}

/// A journal entry's file name for decoder layer `layer`.
fn layer_entry(layer: usize) -> String {
    format!("layer-{layer:05}.json")
}

/// `[first, end)` ranges splitting `num_layers` layers into `units` (at most one per layer),
/// the first ones one layer longer when they do not divide evenly.
pub fn layer_ranges(num_layers: usize, units: usize) -> Vec<[usize; 2]> {
    let units = units.clamp(1, num_layers.max(1));
    let (base, extra) = (num_layers / units, num_layers % units);
    let mut first = 0;
    (0..units)
        .map(|unit| {
            let end = first + base + usize::from(unit < extra);
            let range = [first, end];
            first = end;
            range
        })
        .collect()
}

/// Saves the stream's hidden states at its next layer (`hidden.{i}`, `held_out.{i}`, f32).
fn save_boundary(stream: &CalibrationStream<CpuBackend>, path: &Path) -> Result<()> {
    let (_, hidden, held_out) = stream.boundary();
    let mut tensors = HashMap::new();
    for (prefix, states) in [("hidden", hidden), ("held_out", held_out)] {
        for (i, state) in states.iter().enumerate() {
            tensors.insert(format!("{prefix}.{i}"), state.clone());
        }
    }
    save_safetensors_atomic(path, &tensors)
}

/// The hidden states [`save_boundary`] wrote, in batch order.
/// The file is read once: checked against the size and checksum the plan recorded for `spec`'s
/// unit, then parsed.
fn load_boundary(path: &Path, spec: &UnitSpec) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is only read; a concurrent change shows up as a checksum mismatch.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (bytes, sum) = (map.len() as u64, checksum::hex(checksum::fnv1a_words(&map)));
    if bytes != spec.input_bytes || sum != spec.input_checksum {
        return Err(Error::InvalidArgument(format!(
            "{} is not the input the plan step wrote for unit {} ({bytes} bytes, checksum \
             {sum}; expected {} bytes, {}): plan the run again in a new --run directory",
            path.display(),
            spec.unit,
            spec.input_bytes,
            spec.input_checksum
        )));
    }
    let mut tensors = candle_core::safetensors::load_buffer(&map, &candle_core::Device::Cpu)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    let mut take = |prefix: &str| {
        let mut states = Vec::new();
        while let Some(state) = tensors.remove(&format!("{prefix}.{}", states.len())) {
            states.push(state);
        }
        states
    };
    let hidden = take("hidden");
    let held_out = take("held_out");
    if let Some(stray) = tensors.keys().next() {
        return Err(Error::InvalidArgument(format!(
            "{} holds tensor `{stray}`, which is not a hidden state of the run's batches",
            path.display()
        )));
    }
    Ok((hidden, held_out))
}

fn join(units: &[usize]) -> String {
    units
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ranges_cover_every_layer_once() {
        assert_eq!(layer_ranges(4, 4), vec![[0, 1], [1, 2], [2, 3], [3, 4]]);
        assert_eq!(layer_ranges(5, 2), vec![[0, 3], [3, 5]]);
        assert_eq!(layer_ranges(3, 8), vec![[0, 1], [1, 2], [2, 3]]);
        assert_eq!(layer_ranges(61, 1), vec![[0, 61]]);
        let ranges = layer_ranges(61, 8);
        assert_eq!(ranges.len(), 8);
        assert_eq!(ranges[0][0], 0);
        assert_eq!(ranges[7][1], 61);
        assert!(ranges.windows(2).all(|w| w[0][1] == w[1][0]));
    }
}
