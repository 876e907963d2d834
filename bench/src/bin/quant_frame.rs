//! Quantisation frame for the quality table: round-trips a checkpoint's routed-expert
//! weights through one of ggml's block quantisers (candle's port: `Q4_0`, `Q4_1`, `Q5_0`,
//! `Q8_0`, `Q4K`, ...; round-to-nearest per block, no calibration) and writes the dequantised
//! weights in the checkpoint's own dtype, so that `rfid-moe eval` measures the quantised model's
//! quality. It prints the bytes the routed experts would take stored in that format, beside
//! their bytes as they are, which is the size to compare at.
//!
//! ```sh
//! cargo run --release -p rfid-moe-bench --bin quant-frame -- \
//!     --model models/mini-moe-docs --out /tmp/mini-q4_0 --format q4_0
//! rfid-moe eval --model /tmp/mini-q4_0 --reference models/mini-moe-docs --text models/mini-moe-docs/test.txt
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use clap::Parser;
use serde::Serialize;

/// Round-trips routed-expert weights through a ggml block quantiser.
#[derive(Parser, Debug)]
#[command(name = "quant-frame")]
struct Args {
    /// Model directory (safetensors, HF layout).
    #[arg(long)]
    model: PathBuf,
    /// Output directory (must not exist; written under a temporary name and renamed).
    #[arg(long)]
    out: PathBuf,
    /// Block format: q4_0, q4_1, q5_0, q5_1, q8_0, q2k, q3k, q4k, q5k, q6k.
    #[arg(long, default_value = "q4_0")]
    format: String,
    /// Which expert matrices to quantise (comma separated: gate, up, down).
    #[arg(long, value_delimiter = ',', default_value = "gate,up,down")]
    matrices: Vec<String>,
    /// Write the byte summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Bytes of the routed experts before and after, per matrix kind.
#[derive(Debug, Default, Serialize)]
struct Summary {
    format: String,
    bits_per_weight: f64,
    quantised_tensors: usize,
    quantised_weights: usize,
    /// Bytes of the quantised tensors as stored in the input.
    bytes_before: usize,
    /// Bytes of the same tensors in the block format.
    bytes_after: usize,
    /// Bytes of every routed-expert tensor (quantised or not) as stored in the input.
    routed_expert_bytes_before: usize,
    /// The same with the quantised tensors counted in the block format.
    routed_expert_bytes_after: usize,
    /// Bytes of all tensors as stored in the input.
    total_bytes_before: usize,
    /// The same with the quantised tensors counted in the block format.
    total_bytes_after: usize,
    /// Mean relative Frobenius error of the quantised tensors.
    mean_relative_error: f64,
}

fn parse_format(name: &str) -> anyhow::Result<GgmlDType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2k" => GgmlDType::Q2K,
        "q3k" => GgmlDType::Q3K,
        "q4k" => GgmlDType::Q4K,
        "q5k" => GgmlDType::Q5K,
        "q6k" => GgmlDType::Q6K,
        other => bail!("unknown --format {other:?} (q4_0, q4_1, q5_0, q5_1, q8_0, q2k..q6k)"),
    })
}

/// The expert matrix kind a routed-expert tensor holds, or `None` for any other tensor.
/// Shared experts (`shared_expert.`, `shared_experts.`) are not routed.
fn routed_matrix(name: &str) -> Option<&'static str> {
    if !name.contains(".experts.") {
        return None;
    }
    let kinds = [
        ("gate_up_proj", "gate+up"),
        ("gate_proj", "gate"),
        ("up_proj", "up"),
        ("down_proj", "down"),
        (".w1.", "gate"),
        (".w3.", "up"),
        (".w2.", "down"),
    ];
    kinds
        .iter()
        .find(|(pattern, _)| name.contains(pattern))
        .map(|(_, kind)| *kind)
}

fn selected(kind: &str, matrices: &[String]) -> bool {
    kind.split('+')
        .all(|part| matrices.iter().any(|m| m == part))
}

/// Quantises `tensor` (last dimension = input features) and returns the dequantised tensor in
/// the input dtype, its bytes in the block format and its relative error.
fn round_trip(
    name: &str,
    tensor: &Tensor,
    format: GgmlDType,
) -> anyhow::Result<(Tensor, usize, f64)> {
    let dims = tensor.dims().to_vec();
    let cols = *dims.last().context("scalar tensor")?;
    if cols % format.block_size() != 0 {
        bail!(
            "{name}: input dimension {cols} is not a multiple of {format:?}'s block of {}",
            format.block_size()
        );
    }
    let matrix = tensor
        .to_dtype(candle_core::DType::F32)?
        .reshape(((), cols))?;
    let quantised = QTensor::quantize(&matrix, format)?;
    let restored = quantised.dequantize(&Device::Cpu)?;
    let error = (&restored - &matrix)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()?;
    let norm = matrix.sqr()?.sum_all()?.to_scalar::<f32>()?;
    let relative = (error / norm.max(f32::MIN_POSITIVE)).sqrt() as f64;
    let restored = restored.reshape(dims)?.to_dtype(tensor.dtype())?;
    Ok((restored, quantised.storage_size_in_bytes(), relative))
}

fn shard_files(model: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(model)
        .with_context(|| format!("reading {}", model.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        bail!("{}: no .safetensors files", model.display());
    }
    Ok(shards)
}

fn quantise_shard(
    shard: &Path,
    staging: &Path,
    args: &Args,
    format: GgmlDType,
    summary: &mut Summary,
    errors: &mut Vec<f64>,
) -> anyhow::Result<()> {
    let tensors = candle_core::safetensors::load(shard, &Device::Cpu)
        .with_context(|| format!("reading {}", shard.display()))?;
    let mut written: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        summary.total_bytes_before += bytes;
        let Some(kind) = routed_matrix(&name) else {
            summary.total_bytes_after += bytes;
            written.insert(name, tensor);
            continue;
        };
        summary.routed_expert_bytes_before += bytes;
        if !selected(kind, &args.matrices) {
            summary.routed_expert_bytes_after += bytes;
            summary.total_bytes_after += bytes;
            written.insert(name, tensor);
            continue;
        }
        let (restored, quantised_bytes, relative) = round_trip(&name, &tensor, format)?;
        summary.quantised_tensors += 1;
        summary.quantised_weights += tensor.elem_count();
        summary.bytes_before += bytes;
        summary.bytes_after += quantised_bytes;
        summary.routed_expert_bytes_after += quantised_bytes;
        summary.total_bytes_after += quantised_bytes;
        errors.push(relative);
        written.insert(name, restored);
    }
    let file_name = shard.file_name().context("shard without a name")?;
    candle_core::safetensors::save(&written, staging.join(file_name))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let format = parse_format(&args.format)?;
    if args.out.exists() {
        bail!(
            "{} exists; choose a new output directory",
            args.out.display()
        );
    }
    let out_name = args
        .out
        .file_name()
        .context("--out has no directory name")?;
    let parent = args.out.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    let staging = parent.join(format!(
        ".{}.partial-{}",
        out_name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::create_dir_all(&staging)?;
    let result = write_output(&args, format, &staging);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    let summary = result?;
    std::fs::rename(&staging, &args.out)?;
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, &text)?;
    }
    Ok(())
}

fn write_output(args: &Args, format: GgmlDType, staging: &Path) -> anyhow::Result<Summary> {
    let mut summary = Summary {
        format: args.format.clone(),
        bits_per_weight: 8.0 * format.type_size() as f64 / format.block_size() as f64,
        ..Summary::default()
    };
    let mut errors = Vec::new();
    for shard in shard_files(&args.model)? {
        quantise_shard(&shard, staging, args, format, &mut summary, &mut errors)?;
    }
    if summary.quantised_tensors == 0 {
        bail!(
            "{}: no routed-expert tensor matched --matrices {:?}",
            args.model.display(),
            args.matrices
        );
    }
    summary.mean_relative_error = errors.iter().sum::<f64>() / errors.len() as f64;
    // Everything that is not a shard (config, tokenizer, index) is copied unchanged.
    for entry in std::fs::read_dir(&args.model)? {
        let path = entry?.path();
        let is_shard = path.extension().is_some_and(|ext| ext == "safetensors");
        if path.is_file() && !is_shard {
            let name = path.file_name().context("file without a name")?;
            std::fs::copy(&path, staging.join(name))?;
        }
    }
    Ok(summary)
}
