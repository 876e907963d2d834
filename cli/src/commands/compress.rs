//! `rfid-moe compress`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use rfid_moe::checkpoint::experts::ExpertMatrix;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::pipeline::methods::lowrank::tune::{TuneMetric, XiSetting};
use rfid_moe::pipeline::methods::lowrank::{self, FactorizerKind, LowRankSettings, RankAllocation};
use rfid_moe::pipeline::methods::prune::{self, PruneSettings, Saliency};
use rfid_moe::pipeline::methods::quantise::{
    self, Algorithm, CandidateErrors, HessianSource, QuantiseSettings,
};
use rfid_moe::pipeline::settings_file::{read_settings_file, SettingsFile};
use rfid_moe::pipeline::split::{self, SplitStep};
use rfid_moe::pipeline::GroupSize;
use rfid_moe::pipeline::OutputFormat;
use rfid_moe::pipeline::{presets, BudgetScope, BudgetUnit, CompressOptions, Granularity};
use rfid_moe::quant::Scheme;

use rfid_moe::safety::commands as path_checks;

use crate::args::{choice, parse_on_off, parse_xi};
use crate::bars;

/// `compress` flags; each overrides the same key of `--config`.
#[derive(Args)]
pub struct CompressArgs {
    /// TOML file with any of the options below (flags given on the command line win); a file
    /// without `version` is read with the meaning it had when it was written.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Start from a named set of options instead of the defaults (flags given on the command
    /// line win): `paper` is the paper's RFID-MoE, low-rank gate and up in the checkpoint's
    /// dtype with --ratio a fraction of their parameters and no pruning.
    #[arg(long, value_parser = presets::NAMES)]
    preset: Option<String>,
    /// Input model directory, or a Hub id `org/name[@revision]` (an existing local path wins).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Calibration data: plain text (blank-line separated documents), JSON lines with `text`, or safetensors with `input_ids`.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Output directory (written atomically; refused if it exists unless --force).
    #[arg(long)]
    out: Option<PathBuf>,
    /// What --out holds: safetensors (rfid-moe's checkpoint, every method), gguf (one
    /// model.gguf for llama.cpp: removal and ggml block types, one per layer and matrix),
    /// compressed-tensors (vLLM/SGLang/transformers: removal and symmetric int4/int8 groups,
    /// one scheme per layer); the solver is offered nothing else.
    #[arg(long, value_parser = choice::<OutputFormat>())]
    format: Option<OutputFormat>,
    /// With --format gguf: the ggml type (q8_0, q6_k, q4_k, ...) of the weight matrices outside
    /// the routed experts (attention, shared experts, embeddings, head), rounded to nearest;
    /// default: as stored. Norms, routers and biases stay F32.
    #[arg(long, value_parser = parse_scheme)]
    other_type: Option<Scheme>,
    /// Fraction of the budget to remove (default 0.4): of the routed experts' stored bytes
    /// (--budget bytes, the default), or of the --matrices' parameters (--budget parameters).
    /// The output stores 1 − ratio of it, whatever the methods.
    #[arg(long)]
    ratio: Option<f64>,
    /// Bits per routed-expert weight the output stores, scales included (as exllamav2/v3 and
    /// llama.cpp users size models), in place of --ratio: 4.5 on a bf16 model is --ratio
    /// 0.71875.
    #[arg(long, conflicts_with = "ratio")]
    bpw: Option<f64>,
    /// What --ratio is a fraction of.
    #[arg(long, value_parser = choice::<BudgetUnit>())]
    budget: Option<BudgetUnit>,
    /// One budget per layer, or one over the model (a planning pass first).
    #[arg(long, value_parser = choice::<BudgetScope>())]
    budget_scope: Option<BudgetScope>,
    /// How finely the solver may mix choices: per expert, per layer and matrix, per layer.
    #[arg(long, value_parser = choice::<Granularity>())]
    granularity: Option<Granularity>,
    /// With --budget-scope model: the fraction of its own share every layer keeps at least
    /// (default 0.75; 0 lets the solver move any amount between layers).
    #[arg(long)]
    layer_floor: Option<f64>,
    /// The routed-expert matrices the budget covers, comma separated (default gate,up,down;
    /// those left out stay as they are stored).
    #[arg(long, value_delimiter = ',', value_parser = choice::<ExpertMatrix>())]
    matrices: Option<Vec<ExpertMatrix>>,
    /// The methods the solver may choose from for each expert, comma separated (default
    /// prune,lowrank,quantise,int8,keep, less those --format cannot hold): prune (remove
    /// experts), lowrank (shared-basis factors), quantise (2-8-bit block formats), int8 (8-bit
    /// experts), keep (as stored).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// The method sets of earlier versions: lowrank (no removal), prune (removal only, the rest
    /// as stored), prune+lowrank (the default set).
    #[arg(long, value_parser = ["lowrank", "prune", "prune+lowrank"], conflicts_with = "methods")]
    method: Option<String>,
    /// quantise: the formats offered, comma separated (int<bits>-g<group>-<sym|asym> with bits
    /// 2, 3, 4, 5, 6, 8 and group 32, 64, 128, 256; ggml's q8_0, q4_0, q4_1, q5_0, q5_1, q2_k,
    /// q3_k, q4_k, q5_k, q6_k); each is offered where a matrix's columns are whole blocks of it.
    #[arg(long, value_delimiter = ',', value_parser = parse_scheme)]
    schemes: Option<Vec<Scheme>>,
    /// quantise: how codes are chosen.
    #[arg(long, value_parser = choice::<Algorithm>())]
    quant_algorithm: Option<Algorithm>,
    /// quantise: GPTQ's column order, descending Gram diagonal (on) or as stored (off).
    #[arg(long, value_parser = parse_on_off)]
    act_order: Option<bool>,
    /// quantise: coordinate-descent passes over GPTQ's codes (each moved to the grid value that
    /// best fits the rest of its row; 0 = GPTQ alone).
    #[arg(long)]
    quant_refine_passes: Option<usize>,
    /// quantise: whose calibration inputs each expert is quantised under.
    #[arg(long, value_parser = choice::<HessianSource>())]
    quant_hessian: Option<HessianSource>,
    /// quantise: experts with fewer routed calibration tokens are filled in with the layer's
    /// statistics.
    #[arg(long)]
    quant_min_tokens: Option<usize>,
    /// quantise: how each format's error is found before the solver chooses.
    #[arg(long, value_parser = choice::<CandidateErrors>())]
    quant_errors: Option<CandidateErrors>,
    /// prune: how experts are ranked.
    #[arg(long, value_parser = choice::<Saliency>())]
    prune_saliency: Option<Saliency>,
    /// prune: fraction of each layer's experts removed (default: a share of the budget, at most
    /// an eighth of the experts).
    #[arg(long)]
    prune_fraction: Option<f64>,
    /// Experts per frequency-sorted group: auto (the default: one per expert where a layer's
    /// per-expert Gram matrices fit in 1 GiB, else 4), 1 = per expert, n = one basis per layer.
    #[arg(long)]
    group_size: Option<GroupSize>,
    /// lowrank: how ranks are chosen: solver (by estimated output error, with every other
    /// method's candidates; the default) or the paper's scores.
    #[arg(long, value_parser = choice::<RankAllocation>())]
    allocation: Option<RankAllocation>,
    /// lowrank (paper's scores): weight of information density in the fused score (1 − ξ goes to
    /// routing frequency), or `auto`: chosen per layer by the layer's output error on held-out
    /// calibration windows.
    #[arg(long, value_parser = parse_xi)]
    xi: Option<XiSetting>,
    /// With `--xi auto`: the candidates to try, comma separated (default 0,0.2,0.4,0.6,0.8,1).
    #[arg(long, value_delimiter = ',')]
    xi_candidates: Option<Vec<f64>>,
    /// With `--xi auto`: how the held-out tokens' errors are weighed.
    #[arg(long, value_parser = choice::<TuneMetric>())]
    xi_metric: Option<TuneMetric>,
    /// With `--xi auto`: fraction of the calibration windows held out (default 0.125, at least
    /// one window); they calibrate nothing.
    #[arg(long)]
    holdout_fraction: Option<f64>,
    /// lowrank: factoriser.
    #[arg(long, value_parser = choice::<FactorizerKind>())]
    factorizer: Option<FactorizerKind>,
    /// lowrank: Adam steps of the basis factoriser.
    #[arg(long)]
    fit_steps: Option<usize>,
    /// lowrank: activation-aware factorisation from routed calibration inputs: on or off.
    #[arg(long, value_parser = parse_on_off)]
    whiten: Option<bool>,
    /// lowrank (paper's scores): sparse-projection residual (paid from the same budget): on or off.
    #[arg(long, value_parser = parse_on_off)]
    residual: Option<bool>,
    /// lowrank: residual size as a fraction of each group's parameters.
    #[arg(long)]
    residual_fraction: Option<f64>,
    /// lowrank (paper's scores): keep groups dense where factoring saves nothing: on or off.
    #[arg(long, value_parser = parse_on_off)]
    dense_fallback: Option<bool>,
    /// lowrank: storage of the factors: int8 (row-block scales; the default), auto (the
    /// checkpoint's dtype), f32, bf16, f16.
    #[arg(long)]
    factor_dtype: Option<String>,
    /// Calibration windows.
    #[arg(long)]
    samples: Option<usize>,
    /// Tokens per calibration window.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Window selection seed (0 = the first windows in order).
    #[arg(long)]
    seed: Option<u64>,
    /// Windows per forward batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Also write the reconstructed dense model here (original tensor names and shapes).
    #[arg(long)]
    export_dense: Option<PathBuf>,
    /// Replace existing output directories.
    #[arg(long)]
    force: bool,
    /// Discard the finished layers of an interrupted run of this output and start over (by
    /// default the same command resumes it).
    #[arg(long)]
    restart: bool,
    /// Plan without writing: print per layer the experts removed, the ranks and precisions
    /// chosen, the bytes and the estimated error.
    #[arg(long)]
    dry_run: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Write the report as JSON to this file as well.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where calibration runs: cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    #[command(flatten)]
    split: SplitArgs,
}

/// The steps of a run split into units that other processes or machines run (every step takes
/// the same compress flags; docs/SCALE-OUT.md).
#[derive(Args)]
#[group(skip)]
pub struct SplitArgs {
    /// Run directory of a split run (shared by every step; default: OUT.run beside --out).
    #[arg(long, value_name = "DIR")]
    run: Option<PathBuf>,
    /// Split run: plan the units and save each unit's input hidden states.
    #[arg(long, group = "split_step")]
    plan: bool,
    /// Units to plan (--plan; at most one per decoder layer; default 4).
    #[arg(long, requires = "plan", value_parser = clap::value_parser!(u64).range(1..))]
    units: Option<u64>,
    /// Split run: run unit N (its offers, or its layers once the plan is solved).
    #[arg(long, value_name = "N", group = "split_step")]
    unit: Option<usize>,
    /// Split run: run the unit named by RFID_MOE_UNIT, SLURM_ARRAY_TASK_ID or
    /// JOB_COMPLETION_INDEX (the first set).
    #[arg(long, group = "split_step")]
    unit_from_env: bool,
    /// Split run: solve the model-wide plan from every unit's offers.
    #[arg(long, group = "split_step")]
    solve: bool,
    /// Split run: assemble the output from the finished units.
    #[arg(long, group = "split_step")]
    merge: bool,
    /// Split run: print where the run stands as JSON (the next step and the units it needs).
    #[arg(long, group = "split_step")]
    status: bool,
}

/// The environment variables that name a unit, in the order they are read.
const UNIT_VARIABLES: [&str; 3] = [
    "RFID_MOE_UNIT",
    "SLURM_ARRAY_TASK_ID",
    "JOB_COMPLETION_INDEX",
];

impl SplitArgs {
    /// The split step asked for, if any.
    fn step(&self) -> Result<Option<SplitStep>> {
        let step = if self.plan {
            SplitStep::Plan {
                units: self.units.map(|u| u as usize),
            }
        } else if let Some(unit) = self.unit {
            SplitStep::Unit(unit)
        } else if self.unit_from_env {
            SplitStep::Unit(unit_from_env()?)
        } else if self.solve {
            SplitStep::Solve
        } else if self.merge {
            SplitStep::Merge
        } else if self.status {
            SplitStep::Status
        } else {
            if self.run.is_some() {
                bail!("--run names a split run: add the step (--plan, --unit N, --unit-from-env, --solve, --merge or --status)");
            }
            return Ok(None);
        };
        Ok(Some(step))
    }
}

/// The unit number from the first of [`UNIT_VARIABLES`] that is set; refused when another one
/// names a different unit (a variable exported by mistake would run one unit everywhere).
fn unit_from_env() -> Result<usize> {
    let mut found: Option<(&str, usize)> = None;
    for name in UNIT_VARIABLES {
        let Ok(value) = std::env::var(name) else {
            continue;
        };
        let unit: usize = value
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={value:?} is not a unit number (0, 1, …)"))?;
        match found {
            None => found = Some((name, unit)),
            Some((first, chosen)) if chosen != unit => bail!(
                "--unit-from-env: {first}={chosen} and {name}={unit} name different units; unset one"
            ),
            Some(_) => {}
        }
    }
    match found {
        Some((_, unit)) => Ok(unit),
        None => bail!(
            "--unit-from-env: none of {} is set",
            UNIT_VARIABLES.join(", ")
        ),
    }
}

fn set<T: Clone>(target: &mut T, flag: &Option<T>) {
    if let Some(value) = flag {
        *target = value.clone();
    }
}

impl CompressArgs {
    /// The options of the run: `--config` (or the preset) with every given flag on top. A
    /// settings file of the old schema is converted against the model it names (or `--model`),
    /// after `resolve_model` turned a Hub id into a local snapshot.
    fn resolve(
        &self,
        resolve_model: impl Fn(&PathBuf) -> Result<PathBuf>,
    ) -> Result<CompressOptions> {
        let mut options = match &self.config {
            Some(path) => match read_settings_file(path)? {
                SettingsFile::Current(options) => *options,
                SettingsFile::Legacy(legacy) => {
                    let model = self.model.clone().unwrap_or_else(|| legacy.model.clone());
                    if model.as_os_str().is_empty() {
                        bail!("--model is required (flag or `model` in --config)");
                    }
                    let checkpoint = Checkpoint::open(resolve_model(&model)?)?;
                    let (options, note) = legacy.convert(&checkpoint)?;
                    eprintln!("{}: {note}", path.display());
                    options
                }
            },
            None => presets::named(self.preset.as_deref().unwrap_or("default"))?,
        };
        set(&mut options.model, &self.model);
        set(&mut options.device, &self.device);
        if let Some(format) = self.format {
            options.set_format(format);
        }
        self.apply_method_flags(&mut options)?;
        let calibration = &mut options.calibration;
        set(&mut calibration.data, &self.calibration);
        set(&mut calibration.samples, &self.samples);
        set(&mut calibration.seq_len, &self.seq_len);
        set(&mut calibration.seed, &self.seed);
        set(&mut calibration.batch_size, &self.batch_size);
        set(&mut calibration.group_size, &self.group_size);
        let budget = &mut options.budget;
        set(&mut budget.matrices, &self.matrices);
        set(&mut budget.unit, &self.budget);
        set(&mut budget.ratio, &self.ratio);
        if self.bpw.is_some() {
            budget.bits_per_weight = self.bpw;
        } else if self.ratio.is_some() {
            budget.bits_per_weight = None;
        }
        set(&mut budget.scope, &self.budget_scope);
        set(&mut budget.granularity, &self.granularity);
        set(&mut budget.layer_floor, &self.layer_floor);
        let output = &mut options.output;
        if self.out.is_some() {
            output.out = self.out.clone();
        }
        if self.export_dense.is_some() {
            output.export_dense = self.export_dense.clone();
        }
        if self.other_type.is_some() {
            output.other_type = self.other_type;
        }
        output.force |= self.force;
        output.restart |= self.restart;
        output.dry_run |= self.dry_run;
        if options.model.as_os_str().is_empty() {
            bail!("--model is required (flag or `model` in --config)");
        }
        // A plain conversion (--ratio 0) needs none; the library says when one is missing.
        if options.calibration.data.as_os_str().is_empty() && options.budget.ratio != 0.0 {
            bail!(
                "--calibration is required (flag or `data` in the [calibration] table of --config)"
            );
        }
        Ok(options)
    }

    /// `--methods` / `--method` and each method's own flags (a flag of a method that is not
    /// enabled is refused by name).
    fn apply_method_flags(&self, options: &mut CompressOptions) -> Result<()> {
        if let Some(methods) = &self.methods {
            options.methods = methods.clone();
        }
        if let Some(method) = &self.method {
            let defaults = CompressOptions::default().methods;
            options.methods = match method.as_str() {
                "lowrank" => defaults.into_iter().filter(|m| m != prune::NAME).collect(),
                "prune" => vec![prune::NAME.into(), "keep".into()],
                _ => defaults,
            };
        }
        let lowrank_flags = [
            ("--allocation", self.allocation.is_some()),
            ("--xi", self.xi.is_some()),
            ("--xi-candidates", self.xi_candidates.is_some()),
            ("--xi-metric", self.xi_metric.is_some()),
            ("--holdout-fraction", self.holdout_fraction.is_some()),
            ("--factorizer", self.factorizer.is_some()),
            ("--fit-steps", self.fit_steps.is_some()),
            ("--whiten", self.whiten.is_some()),
            ("--residual", self.residual.is_some()),
            ("--residual-fraction", self.residual_fraction.is_some()),
            ("--dense-fallback", self.dense_fallback.is_some()),
            ("--factor-dtype", self.factor_dtype.is_some()),
        ];
        let quantise_flags = [
            ("--schemes", self.schemes.is_some()),
            ("--quant-algorithm", self.quant_algorithm.is_some()),
            ("--act-order", self.act_order.is_some()),
            ("--quant-refine-passes", self.quant_refine_passes.is_some()),
            ("--quant-hessian", self.quant_hessian.is_some()),
            ("--quant-min-tokens", self.quant_min_tokens.is_some()),
            ("--quant-errors", self.quant_errors.is_some()),
        ];
        let prune_flags = [
            ("--prune-saliency", self.prune_saliency.is_some()),
            ("--prune-fraction", self.prune_fraction.is_some()),
        ];
        for (method, flags) in [
            (lowrank::NAME, &lowrank_flags[..]),
            (prune::NAME, &prune_flags[..]),
            (quantise::NAME, &quantise_flags[..]),
        ] {
            if let Some((flag, _)) = flags.iter().find(|(_, given)| *given) {
                if !options.uses(method) {
                    bail!(
                        "{flag} is a setting of the {method} method, which is not in --methods ({})",
                        options.methods.join(",")
                    );
                }
            }
        }
        if options.uses(lowrank::NAME) && lowrank_flags.iter().any(|(_, given)| *given) {
            options.update_settings::<LowRankSettings>(|s| {
                set(&mut s.allocation, &self.allocation);
                match self.xi {
                    Some(XiSetting::Fixed(xi)) => {
                        s.xi = xi;
                        s.xi_auto = false;
                    }
                    Some(XiSetting::Auto) => s.xi_auto = true,
                    None => {}
                }
                set(&mut s.xi_candidates, &self.xi_candidates);
                set(&mut s.xi_metric, &self.xi_metric);
                set(&mut s.holdout_fraction, &self.holdout_fraction);
                set(&mut s.factorizer, &self.factorizer);
                set(&mut s.fit_steps, &self.fit_steps);
                set(&mut s.whiten, &self.whiten);
                set(&mut s.residual, &self.residual);
                set(&mut s.residual_fraction, &self.residual_fraction);
                set(&mut s.dense_fallback, &self.dense_fallback);
                set(&mut s.factor_dtype, &self.factor_dtype);
            })?;
        }
        if options.uses(prune::NAME) && prune_flags.iter().any(|(_, given)| *given) {
            options.update_settings::<PruneSettings>(|s| {
                set(&mut s.saliency, &self.prune_saliency);
                if self.prune_fraction.is_some() {
                    s.fraction = self.prune_fraction;
                }
            })?;
        }
        if self.quant_algorithm == Some(Algorithm::Rtn)
            && self.quant_refine_passes.is_some_and(|passes| passes > 0)
        {
            bail!(
                "--quant-refine-passes refines GPTQ's codes: --quant-algorithm rtn has none \
                 (leave it out, or use --quant-algorithm gptq)"
            );
        }
        if options.uses(quantise::NAME) && quantise_flags.iter().any(|(_, given)| *given) {
            options.update_settings::<QuantiseSettings>(|s| {
                set(&mut s.schemes, &self.schemes);
                set(&mut s.algorithm, &self.quant_algorithm);
                set(&mut s.act_order, &self.act_order);
                set(&mut s.refine_passes, &self.quant_refine_passes);
                set(&mut s.hessian, &self.quant_hessian);
                set(&mut s.min_tokens, &self.quant_min_tokens);
                set(&mut s.errors, &self.quant_errors);
            })?;
        }
        // Settings of methods no longer enabled mean nothing: drop them.
        let methods = options.methods.clone();
        options.settings.retain(|name, _| methods.contains(name));
        Ok(())
    }
}

/// A `--schemes` entry.
fn parse_scheme(text: &str) -> std::result::Result<Scheme, String> {
    Scheme::parse(text).map_err(|e| e.to_string())
}

/// Compresses the model, prints the report table and says what was written.
pub fn run(args: &CompressArgs) -> Result<()> {
    let resolve_model = |model: &PathBuf| crate::hub::resolve_model(model, args.quiet);
    let mut options = args.resolve(resolve_model)?;
    options.model = resolve_model(&options.model)?;
    path_checks::check_compress_paths(
        &options.model,
        &options.calibration.data,
        args.config.as_deref(),
        options.output.out.as_deref(),
        options.output.export_dense.as_deref(),
        args.json.as_deref(),
    )?;
    if let Some(step) = args.split.step()? {
        return run_split_step(args, &options, step);
    }
    let observer = bars::observer(args.quiet);
    let outcome = rfid_moe::compress_with_progress(&options, observer.as_ref());
    drop(observer);
    let report = or_exit_interrupted(outcome)?;
    if let (Some(first), Some(last)) = (report.resumed_layers.first(), report.resumed_layers.last())
    {
        println!(
            "resumed at layer {}: layers {first}–{last} were kept from the interrupted run",
            last + 1
        );
    }
    println!("{}", report.table());
    if let Some(path) = &args.json {
        super::write_json(path, &report)?;
    }
    match &report.output {
        Some(out) => println!("wrote {} in {:.1}s", out.display(), report.seconds),
        None => println!("dry run: nothing written ({:.1}s)", report.seconds),
    }
    Ok(())
}

/// Runs one step of a split run and says where the run stands (`--status`: JSON only).
fn run_split_step(args: &CompressArgs, options: &CompressOptions, step: SplitStep) -> Result<()> {
    let run_dir = match (&args.split.run, &options.output.out) {
        (Some(dir), _) => dir.clone(),
        (None, Some(out)) => {
            let mut name = out.file_name().unwrap_or_default().to_os_string();
            name.push(".run");
            out.with_file_name(name)
        }
        (None, None) => bail!("a split run needs --out (and --run DIR, or OUT.run is used)"),
    };
    if args.restart {
        bail!("--restart does not apply to a split run: plan a new run in another --run directory");
    }
    if run_dir.starts_with(&options.model) {
        bail!(
            "the run directory {} is inside the model directory {}: put it elsewhere",
            run_dir.display(),
            options.model.display()
        );
    }
    let observer = bars::observer(args.quiet || step == SplitStep::Status);
    let outcome = split::run_step(options, &run_dir, step, observer.as_ref());
    drop(observer);
    let outcome = or_exit_interrupted(outcome)?;
    if step == SplitStep::Status {
        println!("{}", serde_json::to_string(&outcome.status)?);
        return Ok(());
    }
    if let Some(report) = &outcome.report {
        println!("{}", report.table());
        if let Some(path) = &args.json {
            super::write_json(path, report)?;
        }
    }
    let status = &outcome.status;
    let pending = status
        .pending
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let next = match status.next {
        split::NextStep::Plan => "plan the run (--plan)".to_string(),
        split::NextStep::Offer => format!("units {pending} to save their offers (--unit N)"),
        split::NextStep::Solve => "solve the model-wide plan (--solve)".to_string(),
        split::NextStep::Apply => format!("units {pending} to write their layers (--unit N)"),
        split::NextStep::Merge => "merge (--merge)".to_string(),
        split::NextStep::Done => match &status.output {
            Some(out) => format!("nothing: merged into {}", out.display()),
            None => "nothing: merged".to_string(),
        },
    };
    println!(
        "{}: {} unit(s); next: {next}",
        run_dir.display(),
        status.units
    );
    Ok(())
}

/// The outcome of a run, or the process ends as [`exit_interrupted`] says when a signal
/// stopped the run.
fn or_exit_interrupted<T>(outcome: rfid_moe::Result<T>) -> rfid_moe::Result<T> {
    match outcome {
        Err(rfid_moe::Error::Interrupted {
            signal,
            resume_hint,
        }) => exit_interrupted(signal, &resume_hint),
        other => other,
    }
}

/// Says how a cooperative stop went and how to resume, and exits with 128 + the signal number
/// (130 for SIGINT, 143 for SIGTERM), as a shell expects of a program ended by a signal.
fn exit_interrupted(signal: i32, resume_hint: &str) -> ! {
    let command: Vec<String> = std::env::args().map(|arg| shell_quote(&arg)).collect();
    eprintln!("interrupted: {resume_hint}");
    eprintln!(
        "to resume, run the same command again:\n  {}",
        command.join(" ")
    );
    std::process::exit(128 + signal)
}

/// `arg` as a POSIX shell reads it back (single-quoted unless it is plainly safe).
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}
