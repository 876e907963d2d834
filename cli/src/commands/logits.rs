//! `rfid-moe logits`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use rfid_moe::checkpoint::{writer, Checkpoint};
use rfid_moe::models::Model;

use crate::args::DeviceArgs;

/// `logits` arguments.
#[derive(Args)]
pub struct LogitsArgs {
    /// Model directory, or a Hub id `org/name[@revision]` (an existing local path wins).
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
    let model_dir = crate::hub::resolve_model(&args.model, false)?;
    rfid_moe::safety::commands::check_logits_paths(&model_dir, &args.tokens, &args.out)?;
    let device = args.device.device()?;
    let checkpoint = Checkpoint::open(&model_dir)?;
    let model = Model::load(&checkpoint, DType::F32, &device)?;
    let input_ids = rfid_moe::text::load_token_ids(&args.tokens, model.spec.vocab_size, &device)?;
    let output = model.forward(&input_ids, None)?;
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
