//! The `rfid-moe` command line: a thin layer over the library.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use rfid_moe::checkpoint::{self, writer, Checkpoint};
use rfid_moe::models::Model;

#[derive(Parser)]
#[command(
    name = "rfid-moe",
    version,
    about = "Compress and run Mixture-of-Experts checkpoints (RFID-MoE)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a checkpoint: family, layers, experts, parameter counts by role, size on disk.
    Inspect {
        /// Model directory (config.json + safetensors).
        model: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a batch of token ids through the model and save logits and router logits.
    Logits {
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
    },
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// `cpu` or `cuda` / `cuda:N` (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl DeviceArgs {
    fn device(&self) -> Result<Device> {
        match self.device.as_str() {
            "cpu" => Ok(Device::Cpu),
            s if s == "cuda" || s.starts_with("cuda:") => {
                let ordinal = s
                    .strip_prefix("cuda:")
                    .map(str::parse::<usize>)
                    .transpose()
                    .context("bad CUDA ordinal")?
                    .unwrap_or(0);
                if !candle_core::utils::cuda_is_available() {
                    bail!("--device {s}: this binary was built without the `cuda` feature (cargo build --features cuda)");
                }
                Ok(Device::new_cuda(ordinal)?)
            }
            other => bail!("unknown --device `{other}` (expected cpu, cuda or cuda:N)"),
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect { model, json } => {
            let checkpoint = Checkpoint::open(&model)?;
            let summary = rfid_moe::inspect::summarize(&checkpoint)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!("{summary}");
            }
        }
        Command::Logits {
            model,
            tokens,
            out,
            device,
        } => {
            let device = device.device()?;
            let checkpoint = Checkpoint::open(&model)?;
            let model = Model::load(&checkpoint, DType::F32, &device)?;
            let inputs = checkpoint::load_all(&tokens, &device)?;
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
            writer::save_safetensors_atomic(&out, &tensors)?;
        }
    }
    Ok(())
}
