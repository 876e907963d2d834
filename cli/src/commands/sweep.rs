//! `rfid-moe sweep`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use rfid_moe::checkpoint::experts::ExpertMatrix;
use rfid_moe::checkpoint::writer;
use rfid_moe::eval::EvalOptions;
use rfid_moe::pipeline::methods::lowrank::allocate::Allocation;
use rfid_moe::pipeline::methods::lowrank::tune::XiSetting;
use rfid_moe::pipeline::methods::lowrank::LowRankSettings;
use rfid_moe::pipeline::{presets, BudgetScope, CompressOptions};

use crate::args::{choice, parse_on_off, parse_xi, DeviceArgs};
use crate::bars;

/// `sweep` flags.
#[derive(Args)]
pub struct SweepArgs {
    /// Model directory, or a Hub id `org/name[@revision]` (an existing local path wins).
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
    /// `reference`: the ten columns of docs/RESULTS.md §1; `full`: every allocation × residual ×
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
    /// Fused-score weight ξ (0.2: our measured default; the reference of docs/RESULTS.md §1 used 0.8), or
    /// `auto` (chosen per layer on held-out calibration windows; statistics are not cached then).
    #[arg(long, value_parser = parse_xi, default_value = "0.2")]
    xi: XiSetting,
    /// Experts per group for the grouped columns (the k=1 column stays per expert).
    #[arg(long, default_value_t = 4)]
    group_size: usize,
    /// Budget per layer, or one budget shared by all layers.
    #[arg(long, value_parser = choice::<BudgetScope>(), default_value = "layer")]
    budget_scope: BudgetScope,
    /// The routed-expert matrices to factor, comma separated; each ratio is the fraction of
    /// their parameters removed (with down, statistics are not cached).
    #[arg(long, value_delimiter = ',', value_parser = choice::<ExpertMatrix>(), default_value = "gate,up")]
    matrices: Vec<ExpertMatrix>,
    /// Keep groups dense where factoring saves nothing: on or off.
    #[arg(long, value_parser = parse_on_off, default_value = "on", action = clap::ArgAction::Set)]
    dense_fallback: bool,
    /// Dtype of the factors: auto, f32, bf16, f16, int8 (row-block scales).
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

/// A sweep column: allocation, experts per group, residual, whitening.
type Column = (Allocation, usize, bool, bool);

/// The columns of `--grid`, with `--group-size` for every grouped column.
fn columns(grid: &str, group_size: usize) -> Result<Vec<Column>> {
    let columns = match grid {
        "reference" => rfid_moe::sweep::reference_columns(),
        "full" => {
            let mut columns = vec![(Allocation::Uniform, 1, false, false)];
            for &allocation in Allocation::ALL {
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
    Ok(columns
        .into_iter()
        .map(|(a, k, r, w)| (a, if k == 1 { 1 } else { group_size }, r, w))
        .collect())
}

/// Runs the sweep, prints the markdown table and writes the reports and chart asked for.
pub fn run(args: &SweepArgs) -> Result<()> {
    let model = crate::hub::resolve_model(&args.model, args.quiet)?;
    rfid_moe::safety::commands::check_sweep_paths(
        &model,
        &args.calibration,
        &args.text,
        &args.work_dir,
        [
            args.markdown.as_deref(),
            args.json.as_deref(),
            args.plot.as_deref(),
        ],
    )?;
    let columns = columns(&args.grid, args.group_size)?;
    let mut base = CompressOptions {
        model,
        device: args.device.device.clone(),
        ..presets::paper()
    };
    base.calibration.data = args.calibration.clone();
    base.calibration.samples = args.samples;
    base.calibration.seq_len = args.seq_len;
    base.calibration.batch_size = args.batch_size;
    base.budget.scope = args.budget_scope;
    base.budget.matrices = args.matrices.clone();
    base.update_settings::<LowRankSettings>(|s| {
        match args.xi {
            XiSetting::Fixed(xi) => s.xi = xi,
            XiSetting::Auto => s.xi_auto = true,
        }
        s.dense_fallback = args.dense_fallback;
        s.factor_dtype = args.factor_dtype.clone();
    })?;
    // The grids compare low-rank allocations at parameter ratios (and share one statistics
    // cache): the paper's preset, without pruning.
    let eval_options = EvalOptions {
        seq_len: args.eval_seq_len,
        batch_size: args.batch_size,
        ..EvalOptions::default()
    };
    let points = rfid_moe::sweep::grid(&args.ratios, &columns);
    let progress = bars::observer(args.quiet);
    let report = rfid_moe::sweep::sweep(
        &base,
        &points,
        &args.text,
        &eval_options,
        &args.work_dir,
        progress.as_ref(),
    )?;
    let markdown = report.markdown();
    println!("{markdown}");
    if let Some(path) = &args.markdown {
        writer::write_atomic(path, markdown.as_bytes())?;
    }
    if let Some(path) = &args.json {
        super::write_json(path, &report)?;
    }
    if let Some(dir) = &args.plot {
        super::plot::write_perplexity_chart(&report, dir)?;
    }
    Ok(())
}
