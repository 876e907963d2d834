//! `rfid-moe sweep`: compress one model at several ratios × allocations × residual × whitening
//! settings, evaluate each result, and tabulate perplexity and divergence side by side.

use std::path::PathBuf;

use candle_core::DType;
use serde::{Deserialize, Serialize};

pub use crate::checkpoint::storage::{
    is_routed_expert_tensor, shard_tensor_bytes, tensor_bytes, TensorBytes,
};

use crate::error::{Error, Result};
use crate::eval::{divergence, perplexity, DivergenceResult, EvalModel, EvalOptions};
use crate::pipeline::methods::lowrank::allocate::Allocation;
use crate::pipeline::methods::lowrank::{LowRankSettings, RankAllocation};
use crate::pipeline::{
    compress_with_progress, parse_device, CompressOptions, OutputOptions, Report,
};
use crate::progress::Progress;
use crate::safety::RunPath;

/// One configuration of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// Fraction of targeted parameters removed.
    pub ratio: f64,
    /// Allocation policy.
    pub allocation: Allocation,
    /// Experts per group.
    pub group_size: usize,
    /// Sparse-projection residual.
    pub residual: bool,
    /// Activation-aware factorisation.
    pub whiten: bool,
}

impl SweepPoint {
    /// A short column label such as `rfid + res + whiten` or `uniform, per expert (k=1)`.
    pub fn label(&self) -> String {
        let mut label = self.allocation.to_string();
        if self.group_size == 1 {
            label.push_str(", per expert (k=1)");
        } else if self.group_size != 4 {
            label.push_str(&format!(" (k={})", self.group_size));
        }
        if self.residual {
            label.push_str(" + res");
        }
        if self.whiten {
            label.push_str(" + whiten");
        }
        label
    }
}

/// What one configuration measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepRow {
    /// The configuration.
    pub point: SweepPoint,
    /// Column label.
    pub label: String,
    /// Achieved reduction of the targeted parameters.
    pub targeted_reduction: f64,
    /// Bytes of every tensor of the written checkpoint (headers and JSON files not counted).
    #[serde(default)]
    pub output_bytes: u64,
    /// Bytes of its routed experts' tensors (factors, dense members, `down_proj`).
    #[serde(default)]
    pub routed_expert_bytes: u64,
    /// Perplexity on the evaluation text.
    pub perplexity: f64,
    /// Mean KL(original ‖ compressed) per token.
    pub mean_kl: f64,
    /// Top-1 agreement with the original.
    pub top1_agreement: f64,
    /// Mean relative weight error over factored groups.
    pub mean_relative_error: f64,
    /// Mean residual energy recovered (residual runs only).
    pub residual_energy_recovered: Option<f64>,
    /// Seconds spent compressing.
    pub compress_seconds: f64,
}

impl SweepRow {
    /// The row of `point` from its compression `report` and its divergence from the original.
    fn measured(
        point: &SweepPoint,
        report: &Report,
        measured: &DivergenceResult,
        bytes: TensorBytes,
    ) -> Self {
        let groups: Vec<_> = report
            .layers
            .iter()
            .flat_map(|l| l.matrices.values().flatten())
            .filter(|g| !g.dense)
            .collect();
        let mean = |values: Vec<f64>| {
            if values.is_empty() {
                None
            } else {
                Some(values.iter().sum::<f64>() / values.len() as f64)
            }
        };
        SweepRow {
            point: *point,
            label: point.label(),
            targeted_reduction: report.targeted_reduction,
            output_bytes: bytes.total,
            routed_expert_bytes: bytes.routed_experts,
            perplexity: measured.candidate.perplexity,
            mean_kl: measured.mean_kl,
            top1_agreement: measured.top1_agreement,
            mean_relative_error: mean(groups.iter().map(|g| g.relative_error).collect())
                .unwrap_or(0.0),
            residual_energy_recovered: mean(
                groups
                    .iter()
                    .filter_map(|g| g.residual_energy_recovered)
                    .collect(),
            ),
            compress_seconds: report.seconds,
        }
    }
}

/// The sweep's full result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepReport {
    /// Model swept.
    pub model: PathBuf,
    /// Evaluation text.
    pub text: PathBuf,
    /// Perplexity of the uncompressed model.
    pub original_perplexity: f64,
    /// Tokens scored.
    pub tokens_scored: usize,
    /// One row per configuration.
    pub rows: Vec<SweepRow>,
}

/// The configurations of a full sweep: each point of `ratios` × (`columns`).
pub fn grid(ratios: &[f64], columns: &[(Allocation, usize, bool, bool)]) -> Vec<SweepPoint> {
    ratios
        .iter()
        .flat_map(|&ratio| {
            columns.iter().map(
                move |&(allocation, group_size, residual, whiten)| SweepPoint {
                    ratio,
                    allocation,
                    group_size,
                    residual,
                    whiten,
                },
            )
        })
        .collect()
}

/// The columns of the reference table of docs/RESULTS.md §1 (an independent PyTorch
/// implementation of the paper), in its order.
pub fn reference_columns() -> Vec<(Allocation, usize, bool, bool)> {
    use Allocation::*;
    vec![
        (Uniform, 1, false, false),
        (Uniform, 4, false, false),
        (Uniform, 4, true, false),
        (Frequency, 4, false, false),
        (Density, 4, false, false),
        (Rfid, 4, false, false),
        (Rfid, 4, true, false),
        (Uniform, 4, false, true),
        (Rfid, 4, false, true),
        (Rfid, 4, true, true),
    ]
}

/// The options of sweep point `index`: `base` at the point's settings, written to
/// `work_dir/point-NNN`.
fn point_options(
    base: &CompressOptions,
    point: &SweepPoint,
    work_dir: &std::path::Path,
    index: usize,
) -> CompressOptions {
    let mut options = base.clone();
    options.budget.ratio = point.ratio;
    let table = options.settings.entry("lowrank".into()).or_default();
    let mut settings: LowRankSettings = serde_json::from_value(table.clone()).unwrap_or_default();
    settings.allocation = RankAllocation::from_policy(point.allocation);
    settings.residual = point.residual;
    settings.whiten = point.whiten;
    *table = serde_json::to_value(&settings).unwrap_or_default();
    options.calibration.group_size = crate::pipeline::GroupSize::Experts(point.group_size);
    // The cache holds no down_proj statistics: a run that factors down calibrates afresh.
    let down = crate::checkpoint::experts::ExpertMatrix::Down;
    options.calibration.statistics_cache =
        (!options.budget.covers(down)).then(|| work_dir.join("calibration-statistics.safetensors"));
    options.output = OutputOptions {
        out: Some(work_dir.join(format!("point-{index:03}"))),
        export_dense: None,
        force: true,
        dry_run: false,
        restart: false,
        format: Default::default(),
        other_type: None,
    };
    options
}

/// Compresses `base.model` at every point (into `work_dir`), evaluates each on `text` against the
/// original, and returns the table. Calibration statistics are computed once and reused. Each
/// row's result goes to `progress` as a message of task `sweep`, and `progress` is passed on to
/// every compression and evaluation.
pub fn sweep(
    base: &CompressOptions,
    points: &[SweepPoint],
    text: &std::path::Path,
    eval_options: &EvalOptions,
    work_dir: &std::path::Path,
    progress: &dyn Progress,
) -> Result<SweepReport> {
    crate::safety::check_run_paths(
        &[
            RunPath::new("--model", &base.model),
            RunPath::new("--calibration", &base.calibration.data),
            RunPath::new("--text", text),
        ],
        &[RunPath::new("--work-dir", work_dir)],
    )?;
    // Every point's options are checked before the original model is evaluated, which takes as
    // long as a point.
    for (i, point) in points.iter().enumerate() {
        point_options(base, point, work_dir, i).validate()?;
    }
    let device = parse_device(&base.device)?;
    std::fs::create_dir_all(work_dir).map_err(|e| Error::io(work_dir, e))?;
    let original = EvalModel::load(&base.model, DType::F32, &device)?;
    let tokens = original.tokenize_file(text)?;
    let original_ppl = perplexity(&original.model, &tokens, eval_options, progress)?;
    progress.message(
        "sweep",
        &format!(
            "original: PPL {:.4} over {} tokens",
            original_ppl.perplexity, original_ppl.tokens_scored
        ),
    );
    let mut rows = Vec::new();
    for (i, point) in points.iter().enumerate() {
        let options = point_options(base, point, work_dir, i);
        let out = options.output.out.clone().unwrap_or_default();
        let report = compress_with_progress(&options, progress)?;
        let candidate = EvalModel::load(&out, DType::F32, &device)?;
        let measured = divergence(
            &original.model,
            &candidate.model,
            &tokens,
            eval_options,
            progress,
        )?;
        let bytes = tensor_bytes(&out)?;
        let row = SweepRow::measured(point, &report, &measured, bytes);
        progress.message(
            "sweep",
            &format!(
                "[{}/{}] ρ={} {}: PPL {:.4}, KL {:.4}, reduction {:.4}",
                i + 1,
                points.len(),
                point.ratio,
                row.label,
                row.perplexity,
                row.mean_kl,
                row.targeted_reduction
            ),
        );
        rows.push(row);
        let _ = std::fs::remove_dir_all(&out);
    }
    Ok(SweepReport {
        model: base.model.clone(),
        text: text.to_path_buf(),
        original_perplexity: original_ppl.perplexity,
        tokens_scored: original_ppl.tokens_scored,
        rows,
    })
}

impl SweepReport {
    /// Markdown tables (perplexity, then KL) with one row per ratio and one column per setting.
    pub fn markdown(&self) -> String {
        let mut ratios: Vec<f64> = self.rows.iter().map(|r| r.point.ratio).collect();
        ratios.sort_by(f64::total_cmp);
        ratios.dedup();
        let mut labels: Vec<String> = Vec::new();
        for row in &self.rows {
            if !labels.contains(&row.label) {
                labels.push(row.label.clone());
            }
        }
        let mut out = format!(
            "Original perplexity {:.4} ({} tokens scored).\n\n",
            self.original_perplexity, self.tokens_scored
        );
        for (title, value) in [
            (
                "Perplexity",
                (|r: &SweepRow| format!("{:.2}", r.perplexity)) as fn(&SweepRow) -> String,
            ),
            (
                "Mean KL(original ‖ compressed) per token",
                |r: &SweepRow| format!("{:.4}", r.mean_kl),
            ),
            ("Top-1 agreement with the original", |r: &SweepRow| {
                format!("{:.1}%", 100.0 * r.top1_agreement)
            }),
            (
                "Size in MB (10⁶ bytes) of the output's tensors (of its routed experts)",
                |r: &SweepRow| {
                    format!(
                        "{:.3} ({:.3})",
                        r.output_bytes as f64 / 1e6,
                        r.routed_expert_bytes as f64 / 1e6
                    )
                },
            ),
        ] {
            out.push_str(&format!(
                "**{title}**\n\n| ρ | {} |\n|{}\n",
                labels.join(" | "),
                " --- |".repeat(labels.len() + 1)
            ));
            for ratio in &ratios {
                let cells: Vec<String> = labels
                    .iter()
                    .map(|l| {
                        self.rows
                            .iter()
                            .find(|r| r.point.ratio == *ratio && &r.label == l)
                            .map_or("–".to_string(), value)
                    })
                    .collect();
                out.push_str(&format!("| {ratio} | {} |\n", cells.join(" | ")));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_bytes_are_the_shards_data_and_the_routed_experts_share() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen3_moe");
        let bytes = tensor_bytes(&dir).unwrap();
        // Each shard is an 8-byte header length, the header, then the tensors' data.
        let mut data = 0u64;
        for shard in [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ] {
            let file = std::fs::read(dir.join(shard)).unwrap();
            let header = u64::from_le_bytes(file[..8].try_into().unwrap());
            data += file.len() as u64 - 8 - header;
        }
        assert_eq!(bytes.total, data);
        // Routed experts: 3 matrices of p×d per expert per MoE layer, in the stored dtype.
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let number = |key: &str| config[key].as_u64().unwrap();
        let experts = config["num_experts"]
            .as_u64()
            .or_else(|| config["num_local_experts"].as_u64())
            .unwrap();
        let checkpoint = crate::checkpoint::Checkpoint::open(&dir).unwrap();
        let name = "model.layers.0.mlp.experts.0.gate_proj.weight";
        let element = checkpoint.info(name).unwrap().0.dtype.size_in_bytes() as u64;
        let expected = number("num_hidden_layers")
            * experts
            * 3
            * number("moe_intermediate_size")
            * number("hidden_size")
            * element;
        assert_eq!(bytes.routed_experts, expected);
        assert!(bytes.routed_experts < bytes.total);
    }
}
