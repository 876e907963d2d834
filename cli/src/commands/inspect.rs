//! `rfid-moe inspect`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use rfid_moe::checkpoint::Checkpoint;

/// `inspect` arguments.
#[derive(Args)]
pub struct InspectArgs {
    /// Model directory (config.json + safetensors), or a Hub id `org/name[@revision]` (an
    /// existing local path wins).
    model: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Prints the summary of a checkpoint, as a table or as JSON.
pub fn run(args: &InspectArgs) -> Result<()> {
    let model = crate::hub::resolve_model(&args.model, false)?;
    let checkpoint = Checkpoint::open(&model)?;
    let summary = rfid_moe::inspect::summarize(&checkpoint)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{summary}");
    }
    Ok(())
}
