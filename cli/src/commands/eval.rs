//! `rfid-moe eval`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;
use rfid_moe::eval::{evaluate, EvalModel, EvalOptions, EvalPlan};

use crate::args::DeviceArgs;
use crate::bars;

/// `eval` flags.
#[derive(Args)]
pub struct EvalArgs {
    /// Model directory to evaluate (with tokenizer.json), or a Hub id `org/name[@revision]`
    /// (an existing local path wins).
    #[arg(long)]
    model: PathBuf,
    /// Original model to measure divergence against (KL, top-1 agreement); a directory or a Hub
    /// id.
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
    /// Score only the second half of each window, as llama.cpp's llama-perplexity does (with
    /// the same --seq-len as its -c, the two perplexities compare directly).
    #[arg(long, conflicts_with = "stride")]
    second_half: bool,
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

/// Evaluates the model (against the reference if given), prints the report and writes the JSON
/// report and charts asked for.
pub fn run(args: &EvalArgs) -> Result<()> {
    if args.text.is_empty() && args.multiple_choice.is_empty() {
        bail!("nothing to evaluate: give --text and/or --multiple-choice");
    }
    let model = crate::hub::resolve_model(&args.model, args.quiet)?;
    let reference = crate::hub::resolve_optional(args.reference.as_deref(), args.quiet)?;
    rfid_moe::safety::commands::check_eval_paths(
        &model,
        reference.as_deref(),
        &as_paths(&args.text),
        &as_paths(&args.multiple_choice),
        args.json.as_deref(),
        args.plot.as_deref(),
    )?;
    let device = args.device.device()?;
    let candidate = EvalModel::load(&model, DType::F32, &device)?;
    let reference = reference
        .as_ref()
        .map(|r| EvalModel::load(r, DType::F32, &device))
        .transpose()?;
    let plan = EvalPlan {
        texts: args.text.clone(),
        multiple_choice: args.multiple_choice.clone(),
        options: EvalOptions {
            seq_len: args.seq_len,
            stride: args.stride,
            second_half: args.second_half,
            batch_size: args.batch_size,
            max_windows: args.max_windows,
            ..EvalOptions::default()
        },
    };
    let progress = bars::observer(args.quiet);
    let report = evaluate(&candidate, reference.as_ref(), &plan, progress.as_ref())?;
    println!("{report}");
    if let Some(path) = &args.json {
        super::write_json(path, &report)?;
    }
    if let Some(dir) = &args.plot {
        super::plot::plot_compression(&model, dir)?;
    }
    Ok(())
}

fn as_paths(list: &[std::path::PathBuf]) -> Vec<&std::path::Path> {
    list.iter().map(|p| p.as_path()).collect()
}
