//! The `rfid-moe` command line: a thin layer over the `rfid_moe` library. Parses the arguments
//! and hands each command to its module under `commands/`.

mod args;
mod bars;
mod commands;
mod hub;
mod plot;

use anyhow::Result;
use clap::{Parser, Subcommand};

use commands::{compress, eval, generate, inspect, logits, plot as plot_command, sweep, upload};

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
    Inspect(inspect::InspectArgs),
    /// Compress a MoE checkpoint with RFID-MoE (or a baseline allocation).
    Compress(Box<compress::CompressArgs>),
    /// Evaluate a model: perplexity, divergence from a reference, zero-shot multiple choice.
    Eval(eval::EvalArgs),
    /// Compress at several ratios and settings, evaluate each, and write one table.
    Sweep(sweep::SweepArgs),
    /// Draw charts from sweep reports (perplexity vs ratio) and/or a compressed model (heatmaps).
    Plot(plot_command::PlotArgs),
    /// Generate text from a prompt (original or compressed model), streamed as it is decoded.
    Generate(generate::GenerateArgs),
    /// Run a batch of token ids through the model and save logits and router logits.
    Logits(logits::LogitsArgs),
    /// Upload a compressed output to a Hugging Face Hub repository, with a generated model card.
    Upload(upload::UploadArgs),
}

/// Makes glibc serve large buffers with mmap and return them on free. By default glibc raises its
/// mmap threshold after the first large free, after which layer-sized buffers come from the heap
/// and stay resident once freed: peak memory then grows with the number of layers streamed.
fn bound_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator tuning; called before any threads start.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 64 * 1024);
        }
    }
}

fn main() -> Result<()> {
    bound_allocator_retention();
    rfid_moe::safety::install_signal_cleanup()?;
    match Cli::parse().command {
        Command::Inspect(args) => inspect::run(&args),
        Command::Compress(args) => compress::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Sweep(args) => sweep::run(&args),
        Command::Plot(args) => plot_command::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Logits(args) => logits::run(&args),
        Command::Upload(args) => upload::run(&args),
    }
}
