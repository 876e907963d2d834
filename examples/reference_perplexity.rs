//! Reproduces a trained model's README perplexity (lm-eval protocol: non-overlapping 512-token
//! windows of `test.txt`). The tests check the bundled `models/mini-moe-docs` (ignored: ~50 s);
//! this example checks larger models that the repository does not hold, such as
//! `tiny-moe-docs` from the project's shared material (`../shared/models/tiny-moe-docs`):
//!
//! ```sh
//! cargo run --release --example reference_perplexity -- ../shared/models/tiny-moe-docs 29.0841
//! ```
//! It exits non-zero when the perplexity is more than 1e-3 (relative) from the expected value.

use std::path::PathBuf;

use candle_core::{DType, Device};
use rfid_moe::eval::{self, EvalModel, EvalOptions};
use rfid_moe::Silent;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, expected] = args.as_slice() else {
        anyhow::bail!("usage: reference_perplexity MODEL_DIR EXPECTED_PERPLEXITY");
    };
    let (dir, expected): (PathBuf, f64) = (dir.into(), expected.parse()?);
    let model = EvalModel::load(&dir, DType::F32, &Device::Cpu)?;
    let stream = model.tokenize_file(&dir.join("test.txt"))?;
    let result = eval::perplexity(&model.model, &stream, &EvalOptions::default(), &Silent)?;
    let relative = (result.perplexity - expected).abs() / expected;
    println!(
        "{}: PPL {:.4} over {} windows, {} tokens (expected {expected}, relative {relative:.1e})",
        dir.display(),
        result.perplexity,
        result.windows,
        result.tokens_scored
    );
    anyhow::ensure!(relative <= 1e-3, "perplexity off by {relative:.1e}");
    Ok(())
}
