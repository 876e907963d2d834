//! The `rfid-moe` command line: a thin layer over the library.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use rfid_moe::checkpoint::{writer, Checkpoint};
use rfid_moe::eval::{evaluate, EvalModel, EvalOptions, EvalPlan};
use rfid_moe::models::Model;
use rfid_moe::pipeline::allocate::Allocation;
use rfid_moe::pipeline::{BudgetScope, CompressOptions, FactorizerKind};
use rfid_moe::progress::Progress;
use rfid_moe::safety::commands as path_checks;

#[derive(Parser)]
#[command(
    name = "rfid-moe",
    version,
    about = "Compress and run Mixture-of-Experts checkpoints (RFID-MoE)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a checkpoint: family, layers, experts, parameter counts by role, size on disk.
    Inspect {
        /// Model directory (config.json + safetensors).
        model: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compress a MoE checkpoint with RFID-MoE (or a baseline allocation).
    Compress(Box<CompressArgs>),
    /// Evaluate a model: perplexity, divergence from a reference, zero-shot multiple choice.
    Eval(EvalArgs),
    /// Compress at several ratios and settings, evaluate each, and write one table.
    Sweep(SweepArgs),
    /// Draw charts from sweep reports (perplexity vs ratio) and/or a compressed model (heatmaps).
    Plot {
        /// Sweep JSON reports (from `sweep --json`); rows of several files are merged.
        #[arg(long)]
        sweep: Vec<PathBuf>,
        /// A compressed model directory (routing-frequency and allocated-rank heatmaps).
        #[arg(long)]
        compressed: Option<PathBuf>,
        /// Output directory for the PNG files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a batch of token ids through the model and save logits and router logits.
    Logits {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// safetensors file with `input_ids` (i64 [batch, seq]).
        #[arg(long)]
        tokens: PathBuf,
        /// Output safetensors file (`logits`, `router_logits.{layer}`).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

/// `compress` flags; each overrides the same key of `--config`.
#[derive(Args)]
struct CompressArgs {
    /// TOML file with any of the options below (flags given on the command line win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Input model directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Calibration data: plain text (blank-line separated documents), JSON lines with `text`, or safetensors with `input_ids`.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Output directory (written atomically; refused if it exists unless --force).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fraction of the routed experts' gate/up parameters to remove.
    #[arg(long)]
    ratio: Option<f64>,
    /// Experts per frequency-sorted group (1 = per expert, n = one basis per layer).
    #[arg(long)]
    group_size: Option<usize>,
    /// Weight of information density in the fused score (1 − ξ goes to routing frequency).
    #[arg(long)]
    xi: Option<f64>,
    /// Rank allocation policy.
    #[arg(long, value_enum)]
    allocation: Option<Allocation>,
    /// Budget per layer, or one budget shared by all layers.
    #[arg(long, value_enum)]
    budget_scope: Option<BudgetScope>,
    /// Factoriser.
    #[arg(long, value_enum)]
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
    /// Dtype of written factors: auto, f32, bf16, f16.
    #[arg(long)]
    factor_dtype: Option<String>,
    /// Also write the reconstructed dense model here (original tensor names and shapes).
    #[arg(long)]
    export_dense: Option<PathBuf>,
    /// Replace existing output directories.
    #[arg(long)]
    force: bool,
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

fn parse_on_off(value: &str) -> std::result::Result<bool, String> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        other => Err(format!("expected on or off, got `{other}`")),
    }
}

impl CompressArgs {
    fn resolve(&self) -> Result<CompressOptions> {
        let mut options: CompressOptions = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("{}: invalid compression config", path.display()))?
            }
            None => CompressOptions::default(),
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
        let allocation = &mut options.allocation;
        set(&mut allocation.ratio, &self.ratio);
        set(&mut allocation.xi, &self.xi);
        set(&mut allocation.policy, &self.allocation);
        set(&mut allocation.budget_scope, &self.budget_scope);
        set(&mut allocation.dense_fallback, &self.dense_fallback);
        set(&mut allocation.residual, &self.residual);
        set(&mut allocation.residual_fraction, &self.residual_fraction);
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

/// `sweep` flags.
#[derive(Args)]
struct SweepArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Calibration data (as for compress).
    #[arg(long)]
    calibration: PathBuf,
    /// Evaluation text.
    #[arg(long)]
    text: PathBuf,
    /// Ratios, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "0.2,0.4,0.6")]
    ratios: Vec<f64>,
    /// `reference`: the ten columns of method.md §8; `full`: every allocation × residual ×
    /// whitening, plus k=1; `rfid-whiten`: the default method alone (for tuning ξ and friends).
    #[arg(long, default_value = "reference")]
    grid: String,
    /// Working directory (compressed models are written and deleted here; statistics are cached).
    #[arg(long)]
    work_dir: PathBuf,
    /// Write the markdown table here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    samples: usize,
    /// Calibration window length.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Fused-score weight ξ (0.2: our measured default; method.md §8's reference used 0.8).
    #[arg(long, default_value_t = 0.2)]
    xi: f64,
    /// Experts per group for the grouped columns (the k=1 column stays per expert).
    #[arg(long, default_value_t = 4)]
    group_size: usize,
    /// Budget per layer, or one budget shared by all layers.
    #[arg(long, value_enum, default_value = "layer")]
    budget_scope: BudgetScope,
    /// Keep groups dense where factoring saves nothing: on or off.
    #[arg(long, value_parser = parse_on_off, default_value = "on", action = clap::ArgAction::Set)]
    dense_fallback: bool,
    /// Dtype of the factors: auto, f32, bf16, f16.
    #[arg(long, default_value = "f32")]
    factor_dtype: String,
    /// Evaluation window length.
    #[arg(long, default_value_t = 512)]
    eval_seq_len: usize,
    /// Windows per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Write the perplexity-versus-ratio chart (PNG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// `eval` flags.
#[derive(Args)]
struct EvalArgs {
    /// Model directory to evaluate (with tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Original model to measure divergence against (KL, top-1 agreement).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Text files (documents separated by blank lines, or JSON lines with `text`).
    #[arg(long)]
    text: Vec<PathBuf>,
    /// Multiple-choice JSON lines (`context`, `choices`, `gold`).
    #[arg(long)]
    multiple_choice: Vec<PathBuf>,
    /// Context length of each window.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Sliding-window stride (default: non-overlapping windows).
    #[arg(long)]
    stride: Option<usize>,
    /// Windows per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Evaluate at most this many windows per text.
    #[arg(long)]
    max_windows: Option<usize>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write charts (PNG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// `cpu` or `cuda` / `cuda:N` (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl DeviceArgs {
    fn device(&self) -> Result<Device> {
        Ok(rfid_moe::pipeline::parse_device(&self.device)?)
    }
}

/// Prints progress messages to stderr (bars arrive with the CLI crate).
struct Messages {
    quiet: bool,
}

impl Progress for Messages {
    fn start(&self, _task: &str, _total: u64) {}
    fn advance(&self, _task: &str, _by: u64) {}
    fn message(&self, task: &str, text: &str) {
        if !self.quiet && task == "sweep" {
            eprintln!("{text}");
        }
    }
    fn finish(&self, _task: &str) {}
}

/// Makes glibc serve large buffers with mmap and return them on free. By default glibc raises its
/// mmap threshold after the first large free, after which layer-sized buffers come from the heap
/// and stay resident once freed: peak memory then grows with the number of layers streamed.
fn bound_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator tuning; called before any threads start.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 64 * 1024);
        }
    }
}

/// Writes the routing-frequency and allocated-rank heatmaps of a compressed model into `dir`.
fn plot_compression(model: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    if !model.join("compression_report.json").exists() {
        bail!(
            "--plot: {} has no compression_report.json (charts describe a compressed model)",
            model.display()
        );
    }
    let layers = rfid_moe::pipeline::read_layer_reports(model)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let frequency = dir.join("routing_frequency.png");
    rfid_moe::plot::routing_frequency_heatmap(&frequency, &layers)?;
    println!("wrote {}", frequency.display());
    if let Some(matrix) = layers
        .first()
        .and_then(|l| l.matrices.keys().next())
        .cloned()
    {
        let ranks = dir.join(format!("allocated_rank_{matrix}.png"));
        rfid_moe::plot::allocated_rank_heatmap(&ranks, &layers, &matrix)?;
        println!("wrote {}", ranks.display());
    }
    Ok(())
}

fn main() -> Result<()> {
    bound_allocator_retention();
    rfid_moe::safety::install_signal_cleanup()?;
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect { model, json } => {
            let checkpoint = Checkpoint::open(&model)?;
            let summary = rfid_moe::inspect::summarize(&checkpoint)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!("{summary}");
            }
        }
        Command::Compress(args) => {
            let options = args.resolve()?;
            path_checks::check_compress_paths(
                &options.model,
                &options.calibration.data,
                args.config.as_deref(),
                options.output.out.as_deref(),
                options.output.export_dense.as_deref(),
                args.json.as_deref(),
            )?;
            let report =
                rfid_moe::compress_with_progress(&options, &Messages { quiet: args.quiet })?;
            println!("{}", report.table());
            if let Some(path) = &args.json {
                writer::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
            }
            match &report.output {
                Some(out) => println!("wrote {} in {:.1}s", out.display(), report.seconds),
                None => println!("dry run: nothing written ({:.1}s)", report.seconds),
            }
        }
        Command::Eval(args) => {
            if args.text.is_empty() && args.multiple_choice.is_empty() {
                bail!("nothing to evaluate: give --text and/or --multiple-choice");
            }
            path_checks::check_eval_paths(
                &args.model,
                args.reference.as_deref(),
                &args.text.iter().map(|p| p.as_path()).collect::<Vec<_>>(),
                &args
                    .multiple_choice
                    .iter()
                    .map(|p| p.as_path())
                    .collect::<Vec<_>>(),
                args.json.as_deref(),
                args.plot.as_deref(),
            )?;
            let device = args.device.device()?;
            let candidate = EvalModel::load(&args.model, DType::F32, &device)?;
            let reference = args
                .reference
                .as_ref()
                .map(|r| EvalModel::load(r, DType::F32, &device))
                .transpose()?;
            let plan = EvalPlan {
                texts: args.text.clone(),
                multiple_choice: args.multiple_choice.clone(),
                options: EvalOptions {
                    seq_len: args.seq_len,
                    stride: args.stride,
                    batch_size: args.batch_size,
                    max_windows: args.max_windows,
                    quiet: args.quiet,
                    ..EvalOptions::default()
                },
            };
            let report = evaluate(&candidate, reference.as_ref(), &plan)?;
            println!("{report}");
            if let Some(path) = &args.json {
                writer::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
            }
            if let Some(dir) = &args.plot {
                plot_compression(&args.model, dir)?;
            }
        }
        Command::Sweep(args) => {
            path_checks::check_sweep_paths(
                &args.model,
                &args.calibration,
                &args.text,
                &args.work_dir,
                [
                    args.markdown.as_deref(),
                    args.json.as_deref(),
                    args.plot.as_deref(),
                ],
            )?;
            let columns = match args.grid.as_str() {
                "reference" => rfid_moe::sweep::reference_columns(),
                "full" => {
                    let mut columns = vec![(Allocation::Uniform, 1, false, false)];
                    for allocation in [
                        Allocation::Uniform,
                        Allocation::Frequency,
                        Allocation::Density,
                        Allocation::Rfid,
                    ] {
                        for residual in [false, true] {
                            for whiten in [false, true] {
                                columns.push((allocation, 4, residual, whiten));
                            }
                        }
                    }
                    columns
                }
                "rfid-whiten" => vec![(Allocation::Rfid, 4, false, true)],
                other => bail!("--grid `{other}`: expected reference, full or rfid-whiten"),
            };
            let mut base = CompressOptions {
                model: args.model.clone(),
                device: args.device.device.clone(),
                ..CompressOptions::default()
            };
            base.calibration.data = args.calibration.clone();
            base.calibration.samples = args.samples;
            base.calibration.seq_len = args.seq_len;
            base.calibration.batch_size = args.batch_size;
            base.allocation.xi = args.xi;
            base.allocation.dense_fallback = args.dense_fallback;
            base.allocation.budget_scope = args.budget_scope;
            base.factorization.factor_dtype = args.factor_dtype.clone();
            let eval_options = EvalOptions {
                seq_len: args.eval_seq_len,
                batch_size: args.batch_size,
                quiet: args.quiet,
                ..EvalOptions::default()
            };
            let columns: Vec<_> = columns
                .into_iter()
                .map(|(a, k, r, w)| (a, if k == 1 { 1 } else { args.group_size }, r, w))
                .collect();
            let points = rfid_moe::sweep::grid(&args.ratios, &columns);
            let report = rfid_moe::sweep::sweep(
                &base,
                &points,
                &args.text,
                &eval_options,
                &args.work_dir,
                &Messages { quiet: args.quiet },
            )?;
            let markdown = report.markdown();
            println!("{markdown}");
            if let Some(path) = &args.markdown {
                writer::write_atomic(path, markdown.as_bytes())?;
            }
            if let Some(path) = &args.json {
                writer::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
            }
            if let Some(dir) = &args.plot {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let path = dir.join("perplexity_vs_ratio.png");
                rfid_moe::plot::perplexity_vs_ratio(&path, &report)?;
                println!("wrote {}", path.display());
            }
        }
        Command::Plot {
            sweep,
            compressed,
            out,
        } => {
            path_checks::check_plot_paths(
                &sweep.iter().map(|p| p.as_path()).collect::<Vec<_>>(),
                compressed.as_deref(),
                &out,
            )?;
            if sweep.is_empty() && compressed.is_none() {
                bail!("nothing to plot: give --sweep REPORT.json and/or --compressed MODEL_DIR");
            }
            if let Some(model) = &compressed {
                plot_compression(model, &out)?;
            }
            if !sweep.is_empty() {
                let mut merged: Option<rfid_moe::sweep::SweepReport> = None;
                for path in &sweep {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let report: rfid_moe::sweep::SweepReport = serde_json::from_str(&text)
                        .with_context(|| format!("{}: not a sweep report", path.display()))?;
                    match merged.as_mut() {
                        Some(m) => {
                            // The same setting at the same ratio from another file is another
                            // series: name it after its file.
                            let stem = path
                                .file_stem()
                                .map(|s| s.to_string_lossy().into_owned())
                                .unwrap_or_default();
                            for mut row in report.rows {
                                if m.rows.iter().any(|r| {
                                    r.label == row.label && r.point.ratio == row.point.ratio
                                }) {
                                    row.label = format!("{} [{stem}]", row.label);
                                }
                                m.rows.push(row);
                            }
                        }
                        None => merged = Some(report),
                    }
                }
                if let Some(report) = merged {
                    std::fs::create_dir_all(&out)
                        .with_context(|| format!("creating {}", out.display()))?;
                    let path = out.join("perplexity_vs_ratio.png");
                    rfid_moe::plot::perplexity_vs_ratio(&path, &report)?;
                    println!("wrote {}", path.display());
                }
            }
        }
        Command::Logits {
            model,
            tokens,
            out,
            device,
        } => {
            path_checks::check_logits_paths(&model, &tokens, &out)?;
            let device = device.device()?;
            let checkpoint = Checkpoint::open(&model)?;
            let model = Model::load(&checkpoint, DType::F32, &device)?;
            let input_ids =
                rfid_moe::text::load_token_ids(&tokens, model.spec.vocab_size, &device)?;
            let output = model.forward(&input_ids, None)?;
            let mut tensors = HashMap::new();
            tensors.insert("logits".to_string(), output.logits.to_device(&Device::Cpu)?);
            for (layer, logits) in output.router_logits {
                tensors.insert(
                    format!("router_logits.{layer}"),
                    logits.to_device(&Device::Cpu)?,
                );
            }
            writer::save_safetensors_atomic(&out, &tensors)?;
        }
    }
    Ok(())
}
