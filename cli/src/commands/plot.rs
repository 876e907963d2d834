//! `rfid-moe plot`, and the compressed-model charts `eval --plot` draws too.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use rfid_moe::sweep::SweepReport;

use crate::plot;

/// `plot` arguments.
#[derive(Args)]
pub struct PlotArgs {
    /// Sweep JSON reports (from `sweep --json`); rows of several files are merged.
    #[arg(long)]
    sweep: Vec<PathBuf>,
    /// A compressed model directory or Hub id (routing-frequency and allocated-rank heatmaps).
    #[arg(long)]
    compressed: Option<PathBuf>,
    /// Output directory for the PNG files.
    #[arg(long)]
    out: PathBuf,
}

/// Draws the charts of the compressed model and/or of the merged sweep reports into `--out`.
pub fn run(args: &PlotArgs) -> Result<()> {
    let compressed = crate::hub::resolve_optional(args.compressed.as_deref(), false)?;
    rfid_moe::safety::commands::check_plot_paths(
        &args.sweep.iter().map(|p| p.as_path()).collect::<Vec<_>>(),
        compressed.as_deref(),
        &args.out,
    )?;
    if args.sweep.is_empty() && args.compressed.is_none() {
        bail!("nothing to plot: give --sweep REPORT.json and/or --compressed MODEL_DIR");
    }
    if let Some(model) = &compressed {
        plot_compression(model, &args.out)?;
    }
    if let Some(report) = merge_sweep_reports(&args.sweep)? {
        write_perplexity_chart(&report, &args.out)?;
    }
    Ok(())
}

/// Reads sweep reports and merges their rows into the first; `None` when `paths` is empty.
fn merge_sweep_reports(paths: &[PathBuf]) -> Result<Option<SweepReport>> {
    let mut merged: Option<SweepReport> = None;
    for path in paths {
        let text = rfid_moe::safety::read_text_bounded(
            path,
            rfid_moe::safety::MAX_JSON_BYTES,
            "a sweep report (JSON)",
        )?;
        let report: SweepReport = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a sweep report", path.display()))?;
        let Some(m) = merged.as_mut() else {
            merged = Some(report);
            continue;
        };
        // The same setting at the same ratio from another file is another series: name it after
        // its file.
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        for mut row in report.rows {
            if m.rows
                .iter()
                .any(|r| r.label == row.label && r.point.ratio == row.point.ratio)
            {
                row.label = format!("{} [{stem}]", row.label);
            }
            m.rows.push(row);
        }
    }
    Ok(merged)
}

/// Writes `perplexity_vs_ratio.png` of `report` into `dir`.
pub fn write_perplexity_chart(report: &SweepReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("perplexity_vs_ratio.png");
    plot::perplexity_vs_ratio(&path, report)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Writes the routing-frequency and allocated-rank heatmaps of a compressed model into `dir`.
pub fn plot_compression(model: &Path, dir: &Path) -> Result<()> {
    if !model.join("compression_report.json").exists() {
        bail!(
            "--plot: {} has no compression_report.json (charts describe a compressed model)",
            model.display()
        );
    }
    let layers = rfid_moe::pipeline::read_layer_reports(model)?;
    let checkpoint = rfid_moe::checkpoint::Checkpoint::open(model)?;
    rfid_moe::inspect::check_layer_reports(&checkpoint, &layers)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let frequency = dir.join("routing_frequency.png");
    plot::routing_frequency_heatmap(&frequency, &layers)?;
    println!("wrote {}", frequency.display());
    if let Some(matrix) = layers
        .first()
        .and_then(|l| l.matrices.keys().next())
        .cloned()
    {
        let ranks = dir.join(format!("allocated_rank_{matrix}.png"));
        plot::allocated_rank_heatmap(&ranks, &layers, &matrix)?;
        println!("wrote {}", ranks.display());
    }
    Ok(())
}
