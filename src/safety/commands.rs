//! The path check of each command-line command: what it reads and what it writes, by flag name.
//! The CLI calls these before doing anything else.

use std::path::Path;

use super::paths::{check_run_paths, RunPath};
use crate::error::Result;

/// `compress`: `--model`, `--calibration` and `--config` are read; `--out`, `--export-dense` and
/// `--json` are written.
pub fn check_compress_paths(
    model: &Path,
    calibration: &Path,
    config: Option<&Path>,
    out: Option<&Path>,
    export_dense: Option<&Path>,
    json: Option<&Path>,
) -> Result<()> {
    let inputs: Vec<RunPath> = [
        Some(RunPath::new("--model", model)),
        RunPath::unless_empty("--calibration", calibration),
        RunPath::optional("--config", config),
    ]
    .into_iter()
    .flatten()
    .collect();
    let outputs: Vec<RunPath> = [
        RunPath::optional("--out", out),
        RunPath::optional("--export-dense", export_dense),
        RunPath::optional("--json", json),
    ]
    .into_iter()
    .flatten()
    .collect();
    check_run_paths(&inputs, &outputs)
}

/// `eval`: the models and every text and question file are read; `--json` and `--plot` written.
pub fn check_eval_paths(
    model: &Path,
    reference: Option<&Path>,
    texts: &[&Path],
    multiple_choice: &[&Path],
    json: Option<&Path>,
    plot: Option<&Path>,
) -> Result<()> {
    let mut inputs: Vec<RunPath> = [
        Some(RunPath::new("--model", model)),
        RunPath::optional("--reference", reference),
    ]
    .into_iter()
    .flatten()
    .collect();
    inputs.extend(texts.iter().map(|p| RunPath::new("--text", p)));
    inputs.extend(
        multiple_choice
            .iter()
            .map(|p| RunPath::new("--multiple-choice", p)),
    );
    let outputs: Vec<RunPath> = [
        RunPath::optional("--json", json),
        RunPath::optional("--plot", plot),
    ]
    .into_iter()
    .flatten()
    .collect();
    check_run_paths(&inputs, &outputs)
}

/// `sweep`: `--model`, `--calibration` and `--text` are read; `--work-dir`, `--markdown`, `--json`
/// and `--plot` written.
pub fn check_sweep_paths(
    model: &Path,
    calibration: &Path,
    text: &Path,
    work_dir: &Path,
    reports: [Option<&Path>; 3],
) -> Result<()> {
    let [markdown, json, plot] = reports;
    let outputs: Vec<RunPath> = [
        Some(RunPath::new("--work-dir", work_dir)),
        RunPath::optional("--markdown", markdown),
        RunPath::optional("--json", json),
        RunPath::optional("--plot", plot),
    ]
    .into_iter()
    .flatten()
    .collect();
    check_run_paths(
        &[
            RunPath::new("--model", model),
            RunPath::new("--calibration", calibration),
            RunPath::new("--text", text),
        ],
        &outputs,
    )
}

/// `plot`: the `--sweep` reports and `--compressed` model are read; `--out` is written.
pub fn check_plot_paths(sweep: &[&Path], compressed: Option<&Path>, out: &Path) -> Result<()> {
    let mut inputs: Vec<RunPath> = sweep.iter().map(|p| RunPath::new("--sweep", p)).collect();
    inputs.extend(RunPath::optional("--compressed", compressed));
    check_run_paths(&inputs, &[RunPath::new("--out", out)])
}

/// `logits`: `--model` and `--tokens` are read; `--out` is written.
pub fn check_logits_paths(model: &Path, tokens: &Path, out: &Path) -> Result<()> {
    check_run_paths(
        &[
            RunPath::new("--model", model),
            RunPath::new("--tokens", tokens),
        ],
        &[RunPath::new("--out", out)],
    )
}
