//! `rfid-moe compress`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use rfid_moe::checkpoint::experts::ExpertMatrix;
use rfid_moe::pipeline::allocate::Allocation;
use rfid_moe::pipeline::{
    BudgetScope, BudgetUnit, CompressMethod, CompressOptions, FactorizerKind, Saliency,
};

use rfid_moe::safety::commands as path_checks;

use crate::args::{choice, parse_on_off, parse_xi};
use crate::bars;
use rfid_moe::pipeline::tune::{TuneMetric, XiSetting};

/// `compress` flags; each overrides the same key of `--config`.
#[derive(Args)]
pub struct CompressArgs {
    /// TOML file with any of the options below (flags given on the command line win).
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Start from a named set of options instead of the defaults (flags given on the command
    /// line win): `paper` is the paper's RFID-MoE, low-rank gate and up in the checkpoint's
    /// dtype with --ratio a fraction of their parameters and no pruning.
    #[arg(long, value_parser = ["default", "paper"])]
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
    /// Fraction of the budget to remove (default 0.4): of the routed experts' stored bytes
    /// (--budget bytes, the default), or of the --matrices' parameters (--budget parameters).
    /// Every --method removes this much, so equal ratios give equal sizes.
    #[arg(long)]
    ratio: Option<f64>,
    /// What --ratio is a fraction of.
    #[arg(long, value_parser = choice::<BudgetUnit>())]
    budget: Option<BudgetUnit>,
    /// The routed-expert matrices to factor, comma separated (default gate,up,down; those left
    /// out stay as they are stored).
    #[arg(long, value_delimiter = ',', value_parser = choice::<ExpertMatrix>())]
    matrices: Option<Vec<ExpertMatrix>>,
    /// What is done to the routed experts.
    #[arg(long, value_parser = choice::<CompressMethod>())]
    method: Option<CompressMethod>,
    /// How experts are ranked for pruning.
    #[arg(long, value_parser = choice::<Saliency>())]
    prune_saliency: Option<Saliency>,
    /// --method prune+lowrank: fraction of each layer's experts removed; the rest of the --ratio
    /// budget factors the kept experts (default: half of the budget goes to pruning, at most an
    /// eighth of the experts).
    #[arg(long)]
    prune_fraction: Option<f64>,
    /// Experts per frequency-sorted group (1 = per expert, n = one basis per layer).
    #[arg(long)]
    group_size: Option<usize>,
    /// Weight of information density in the fused score (1 − ξ goes to routing frequency), or
    /// `auto`: chosen per layer by the layer's output error on held-out calibration windows.
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
    /// Rank allocation policy.
    #[arg(long, value_parser = choice::<Allocation>())]
    allocation: Option<Allocation>,
    /// Budget per layer, or one budget shared by all layers.
    #[arg(long, value_parser = choice::<BudgetScope>())]
    budget_scope: Option<BudgetScope>,
    /// Factoriser.
    #[arg(long, value_parser = choice::<FactorizerKind>())]
    factorizer: Option<FactorizerKind>,
    /// Adam steps of the basis factoriser.
    #[arg(long)]
    fit_steps: Option<usize>,
    /// Activation-aware factorisation from routed calibration inputs: on or off.
    #[arg(long, value_parser = parse_on_off)]
    whiten: Option<bool>,
    /// Sparse-projection residual (paid from the same budget): on or off.
    #[arg(long, value_parser = parse_on_off)]
    residual: Option<bool>,
    /// Residual size as a fraction of each group's parameters.
    #[arg(long)]
    residual_fraction: Option<f64>,
    /// Keep groups dense where factoring saves nothing: on or off.
    #[arg(long, value_parser = parse_on_off)]
    dense_fallback: Option<bool>,
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
    /// Dtype of written factors: int8 (row-block scales; the default), auto (the checkpoint's),
    /// f32, bf16, f16.
    #[arg(long)]
    factor_dtype: Option<String>,
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
    /// Preview ranks and sizes without factorising or writing anything.
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
}

impl CompressArgs {
    /// The options of the run: `--config` (or the defaults) with every given flag on top.
    fn resolve(&self) -> Result<CompressOptions> {
        let mut options: CompressOptions = match &self.config {
            Some(path) => {
                let text = rfid_moe::safety::read_text_bounded(
                    path,
                    rfid_moe::safety::MAX_JSON_BYTES,
                    "a UTF-8 TOML file",
                )?;
                toml::from_str(&text).with_context(|| {
                    format!(
                        "{}: invalid compression config (expected `model`, `device` and the \
                         tables [calibration], [allocation], [factorization], [output], as in \
                         the compress.toml written next to every output)",
                        path.display()
                    )
                })?
            }
            None => match self.preset.as_deref() {
                Some("paper") => CompressOptions::paper(),
                _ => CompressOptions::default(),
            },
        };
        fn set<T: Clone>(target: &mut T, flag: &Option<T>) {
            if let Some(value) = flag {
                *target = value.clone();
            }
        }
        set(&mut options.model, &self.model);
        set(&mut options.device, &self.device);
        let calibration = &mut options.calibration;
        set(&mut calibration.data, &self.calibration);
        set(&mut calibration.samples, &self.samples);
        set(&mut calibration.seq_len, &self.seq_len);
        set(&mut calibration.seed, &self.seed);
        set(&mut calibration.batch_size, &self.batch_size);
        set(&mut calibration.group_size, &self.group_size);
        set(&mut calibration.holdout_fraction, &self.holdout_fraction);
        let allocation = &mut options.allocation;
        set(&mut allocation.matrices, &self.matrices);
        set(&mut allocation.budget, &self.budget);
        set(&mut allocation.ratio, &self.ratio);
        if let Some(xi) = &self.xi {
            xi.apply(allocation);
        }
        set(&mut allocation.xi_candidates, &self.xi_candidates);
        set(&mut allocation.xi_metric, &self.xi_metric);
        set(&mut allocation.policy, &self.allocation);
        set(&mut allocation.budget_scope, &self.budget_scope);
        set(&mut allocation.dense_fallback, &self.dense_fallback);
        set(&mut allocation.residual, &self.residual);
        set(&mut allocation.residual_fraction, &self.residual_fraction);
        let pruning = &mut options.pruning;
        set(&mut pruning.method, &self.method);
        set(&mut pruning.saliency, &self.prune_saliency);
        if self.prune_fraction.is_some() {
            pruning.fraction = self.prune_fraction;
        }
        let factorization = &mut options.factorization;
        set(&mut factorization.factorizer, &self.factorizer);
        set(&mut factorization.fit_steps, &self.fit_steps);
        set(&mut factorization.whiten, &self.whiten);
        set(&mut factorization.factor_dtype, &self.factor_dtype);
        let output = &mut options.output;
        if self.out.is_some() {
            output.out = self.out.clone();
        }
        if self.export_dense.is_some() {
            output.export_dense = self.export_dense.clone();
        }
        output.force |= self.force;
        output.restart |= self.restart;
        output.dry_run |= self.dry_run;
        if options.model.as_os_str().is_empty() {
            bail!("--model is required (flag or `model` in --config)");
        }
        if options.calibration.data.as_os_str().is_empty() {
            bail!(
                "--calibration is required (flag or `data` in the [calibration] table of --config)"
            );
        }
        Ok(options)
    }
}

/// Compresses the model, prints the report table and says what was written.
pub fn run(args: &CompressArgs) -> Result<()> {
    let mut options = args.resolve()?;
    options.model = crate::hub::resolve_model(&options.model, args.quiet)?;
    path_checks::check_compress_paths(
        &options.model,
        &options.calibration.data,
        args.config.as_deref(),
        options.output.out.as_deref(),
        options.output.export_dense.as_deref(),
        args.json.as_deref(),
    )?;
    let observer = bars::observer(args.quiet);
    let outcome = rfid_moe::compress_with_progress(&options, observer.as_ref());
    drop(observer);
    let report = match outcome {
        Err(rfid_moe::Error::Interrupted {
            signal,
            resume_hint,
        }) => exit_interrupted(signal, &resume_hint),
        other => other?,
    };
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
