//! PNG charts: routing frequency and allocated rank per expert per layer (heatmaps), and
//! perplexity versus compression ratio across sweep settings.

use std::path::Path;

use plotters::prelude::*;

use rfid_moe::error::{Error, Result};
use rfid_moe::pipeline::LayerReport;
use rfid_moe::sweep::SweepReport;

/// DejaVu Sans (see `assets/DejaVuSans-LICENSE.txt`), bundled so charts render without system fonts.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(
            "could not load the bundled chart font".into(),
        ))
    }
}

fn chart_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{}: could not draw chart: {e}", path.display()))
}

/// A light-yellow → dark-blue ramp for values in [0, 1].
fn ramp(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let stops = [
        (255.0, 255.0, 217.0),
        (65.0, 182.0, 196.0),
        (8.0, 29.0, 88.0),
    ];
    let (a, b, u) = if t < 0.5 {
        (stops[0], stops[1], t * 2.0)
    } else {
        (stops[1], stops[2], (t - 0.5) * 2.0)
    };
    let mix = |x: f64, y: f64| (x + (y - x) * u).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Draws a layer × expert heatmap of `values` (rows = layers) to `path`.
fn heatmap(
    path: &Path,
    title: &str,
    layers: &[usize],
    values: &[Vec<f64>],
    legend: &str,
) -> Result<()> {
    register_font()?;
    let experts = values.iter().map(|r| r.len()).max().unwrap_or(0);
    let max = values
        .iter()
        .flatten()
        .copied()
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let root = BitMapBackend::new(path, (1000, 160 + 40 * layers.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| chart_error(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title} (darkest = {max:.3} {legend}, lightest = 0)"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..experts as f64 - 0.5, -0.5..layers.len() as f64 - 0.5)
        .map_err(|e| chart_error(path, e))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("expert")
        .y_desc("layer")
        .x_labels(experts.min(32))
        .y_labels(layers.len())
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                format!("{}", x.round())
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            let row = y.round();
            if (y - row).abs() < 1e-6 && row >= 0.0 {
                layers
                    .get(row as usize)
                    .map_or(String::new(), |l| l.to_string())
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| chart_error(path, e))?;
    chart
        .draw_series(values.iter().enumerate().flat_map(|(row, cells)| {
            cells.iter().enumerate().map(move |(expert, &v)| {
                let (x, y) = (expert as f64, row as f64);
                Rectangle::new(
                    [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                    ramp(v / max).filled(),
                )
            })
        }))
        .map_err(|e| chart_error(path, e))?;
    root.present().map_err(|e| chart_error(path, e))
}

/// Routing frequency of every expert in every MoE layer.
pub fn routing_frequency_heatmap(path: &Path, layers: &[LayerReport]) -> Result<()> {
    let rows: Vec<Vec<f64>> = layers.iter().map(|l| l.frequencies.clone()).collect();
    let names: Vec<usize> = layers.iter().map(|l| l.layer).collect();
    heatmap(
        path,
        "Routing frequency per expert",
        &names,
        &rows,
        "of top-k slots",
    )
}

/// Allocated rank of the group each expert belongs to, for matrix `matrix` (dense groups shown at
/// their full rank `min(k·p, d)` equivalent, i.e. the maximum).
pub fn allocated_rank_heatmap(path: &Path, layers: &[LayerReport], matrix: &str) -> Result<()> {
    let mut rows = Vec::new();
    for layer in layers {
        let groups = layer.matrices.get(matrix).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no `{matrix}` in the compression report of layer {}",
                layer.layer
            ))
        })?;
        let max_rank = groups.iter().map(|g| g.rank).max().unwrap_or(0);
        let mut row = vec![0.0; layer.routing_counts.len()];
        for group in groups {
            for &e in &group.experts {
                row[e] = if group.dense {
                    max_rank as f64
                } else {
                    group.rank as f64
                };
            }
        }
        rows.push(row);
    }
    let names: Vec<usize> = layers.iter().map(|l| l.layer).collect();
    heatmap(
        path,
        &format!("Allocated rank of each expert's group ({matrix})"),
        &names,
        &rows,
        "rank",
    )
}

/// Perplexity versus ratio, one line per sweep setting.
pub fn perplexity_vs_ratio(path: &Path, report: &SweepReport) -> Result<()> {
    register_font()?;
    let mut labels: Vec<String> = Vec::new();
    for row in &report.rows {
        if !labels.contains(&row.label) {
            labels.push(row.label.clone());
        }
    }
    let ratios: Vec<f64> = report.rows.iter().map(|r| r.point.ratio).collect();
    let (x_min, x_max) = (
        ratios.iter().copied().fold(f64::MAX, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
    );
    let y_max = report
        .rows
        .iter()
        .map(|r| r.perplexity)
        .fold(report.original_perplexity, f64::max);
    let y_min = report.original_perplexity;
    let pad = (y_max - y_min).max(1e-3) * 0.08;
    let root = BitMapBackend::new(path, (1100, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| chart_error(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Perplexity versus compression ratio", ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((x_min - 0.05)..(x_max + 0.05), (y_min - pad)..(y_max + pad))
        .map_err(|e| chart_error(path, e))?;
    chart
        .configure_mesh()
        .x_desc("ratio ρ (fraction of gate/up parameters removed)")
        .y_desc("perplexity")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| chart_error(path, e))?;
    let original = report.original_perplexity;
    chart
        .draw_series(LineSeries::new(
            [(x_min - 0.05, original), (x_max + 0.05, original)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| chart_error(path, e))?
        .label(format!("original ({original:.2})"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    for (i, label) in labels.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut points: Vec<(f64, f64)> = report
            .rows
            .iter()
            .filter(|r| &r.label == label)
            .map(|r| (r.point.ratio, r.perplexity))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| chart_error(path, e))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )
            .map_err(|e| chart_error(path, e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| chart_error(path, e))?;
    root.present().map_err(|e| chart_error(path, e))
}
