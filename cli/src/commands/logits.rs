//! `rfid-moe logits`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use rfid_moe::checkpoint::{self, writer, Checkpoint};
use rfid_moe::models::Model;

use crate::args::DeviceArgs;

/// `logits` arguments.
#[derive(Args)]
pub struct LogitsArgs {
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
}

/// Runs `input_ids` through the model and saves the logits and every MoE layer's router logits.
pub fn run(args: &LogitsArgs) -> Result<()> {
    let device = args.device.device()?;
    let checkpoint = Checkpoint::open(&args.model)?;
    let model = Model::load(&checkpoint, DType::F32, &device)?;
    let tokens = &args.tokens;
    let inputs = checkpoint::load_all(tokens, &device)?;
    let input_ids = inputs.get("input_ids").with_context(|| {
        format!(
            "{}: no tensor `input_ids` (expected i64 [batch, seq])",
            tokens.display()
        )
    })?;
    if input_ids.rank() != 2 {
        bail!(
            "{}: `input_ids` has shape {:?}, expected [batch, seq]",
            tokens.display(),
            input_ids.dims()
        );
    }
    let output = model.forward(input_ids, None)?;
    let mut tensors = HashMap::new();
    tensors.insert("logits".to_string(), output.logits.to_device(&Device::Cpu)?);
    for (layer, logits) in output.router_logits {
        tensors.insert(
            format!("router_logits.{layer}"),
            logits.to_device(&Device::Cpu)?,
        );
    }
    writer::save_safetensors_atomic(&args.out, &tensors)?;
    Ok(())
}
