//! Decode benchmark: prefill and per-token decode time per layer, and routed-expert
//! memory, of rfid-moe's runtime on an original and compressed random checkpoints with
//! Qwen3-30B-A3B's layer shapes, against candle-transformers' `qwen3_moe` on the same weights.
//!
//! ```sh
//! cargo run --release -p rfid-moe-bench --bin decode -- --layers 2 --device cpu --dtype f32
//! cargo run --release -p rfid-moe-bench --features cuda --bin decode -- --device cuda --dtype bf16
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};
use clap::Parser;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::models::{FeedForward, Model};
use rfid_moe_bench::compressed::{expert_params, write_compressed, ExpertParams, UniformPlan};
use rfid_moe_bench::measure::{measure, Anchor, Ours, Protocol, Timings};
use rfid_moe_bench::report::{table, Row};
use rfid_moe_bench::synthetic::{self, CheckpointPlan, Shape};

/// The real model whose layer shapes the checkpoints take.
const SHAPE: &str = "qwen3-30b-a3b";

/// Decode benchmark on random checkpoints with Qwen3-30B-A3B's layer shapes.
#[derive(Parser, Debug)]
#[command(name = "decode")]
struct Args {
    /// Decoder layers per checkpoint.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Vocabulary written (the real model has 151936; embedding and head are outside the
    /// per-layer figures either way).
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    /// Compression ratios ρ (fraction of the gate/up expert parameters removed, as
    /// `compress --ratio`).
    #[arg(long, value_delimiter = ',', default_value = "0.4,0.6")]
    ratios: Vec<f64>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype (experts are held in it too): `f32` or `bf16`.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Keep the checkpoints in DIR (reused when already there) instead of a temporary directory.
    #[arg(long)]
    work: Option<PathBuf>,
    /// Prompt length of the prefill and context of the decode steps.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Timed prefills at batch 1 (median reported).
    #[arg(long, default_value_t = 3)]
    prefill_repeats: usize,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    /// Untimed decode steps after each prefill.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed decode steps (median reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Skip candle-transformers.
    #[arg(long)]
    no_anchor: bool,
    /// Save the settings and figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => Ok(Device::new_cuda(ordinal)?),
            _ => anyhow::bail!("--device `{name}`: expected cpu, cuda or cuda:N"),
        },
    }
}

fn parse_dtype(name: &str) -> anyhow::Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        _ => anyhow::bail!("--dtype `{name}`: expected f32 or bf16"),
    }
}

/// A checkpoint to measure: its label, directory and expert parameters.
struct Variant {
    label: String,
    dir: PathBuf,
    params: ExpertParams,
}

/// Writes the original (unless `dir` already holds a checkpoint).
fn ensure_original(s: &Shape, vocab: usize, dir: &Path) -> anyhow::Result<()> {
    if dir.join("config.json").exists() {
        eprintln!("reusing {}", dir.display());
        return Ok(());
    }
    eprintln!("writing {}", dir.display());
    synthetic::write_checkpoint(
        s,
        dir,
        CheckpointPlan {
            vocab,
            dense_gate_up: true,
            extend_layer: &mut |_, _| Ok(()),
            extra_config: serde_json::Map::new(),
            verbose: false,
        },
    )
}

/// Writes the compressed checkpoint at `plan.ratio` (unless there) and checks that its gate/up
/// parameters are `(1−ρ)×` the original's within the allocation's rounding, and down unchanged.
fn ensure_compressed(
    s: &Shape,
    plan: &UniformPlan,
    args: &Args,
    original: &ExpertParams,
    dir: &Path,
) -> anyhow::Result<ExpertParams> {
    if dir.join("config.json").exists() {
        eprintln!("reusing {}", dir.display());
    } else {
        eprintln!(
            "writing {} (ranks {:?}, groups of {})",
            dir.display(),
            plan.ranks(),
            plan.group_size
        );
        write_compressed(s, plan, args.vocab, dir)?;
    }
    let params = expert_params(&Checkpoint::open(dir)?, s, args.layers);
    let target = (1.0 - plan.ratio) * original.gate_up as f64;
    let tolerance = (args.layers * 2 * plan.largest_rank_cost()) as f64;
    anyhow::ensure!(
        (params.gate_up as f64 - target).abs() <= tolerance && params.down == original.down,
        "{}: {} gate/up parameters, expected (1−{})·{} = {target:.0} within {tolerance} \
         (and {} down parameters, found {})",
        dir.display(),
        params.gate_up,
        plan.ratio,
        original.gate_up,
        original.down,
        params.down
    );
    eprintln!(
        "  gate/up parameters {:.4}× the original (target {:.4}), all experts {:.4}×",
        params.gate_up as f64 / original.gate_up as f64,
        1.0 - plan.ratio,
        params.total() as f64 / original.total() as f64
    );
    Ok(params)
}

/// Writes (or reuses) every checkpoint under `work` and returns them, original first.
fn prepare(args: &Args, s: &Shape, work: &Path) -> anyhow::Result<Vec<Variant>> {
    let original_dir = work.join("original");
    ensure_original(s, args.vocab, &original_dir)?;
    let original = expert_params(&Checkpoint::open(&original_dir)?, s, args.layers);
    anyhow::ensure!(
        original.total() == args.layers * 3 * s.experts * s.expert_intermediate * s.hidden,
        "{}: unexpected expert parameter count {}",
        original_dir.display(),
        original.total()
    );
    let mut variants = vec![Variant {
        label: "original".into(),
        dir: original_dir,
        params: original,
    }];
    for &ratio in &args.ratios {
        let plan = UniformPlan::new(s, ratio)?;
        let label = format!("rho-{ratio}");
        let dir = work.join(&label);
        let params = ensure_compressed(s, &plan, args, &original, &dir)?;
        variants.push(Variant { label, dir, params });
    }
    Ok(variants)
}

/// Loads `variant` with our runtime, checks its layers and expert form, and times it with all
/// layers and with none; also returns the bytes its routed experts hold per layer.
fn measure_ours(
    variant: &Variant,
    args: &Args,
    (dtype, device): (DType, &Device),
    protocol: &Protocol,
) -> anyhow::Result<(Timings, Timings, u64)> {
    let checkpoint = Checkpoint::open(&variant.dir)?;
    let model = Model::load(&checkpoint, dtype, device)
        .with_context(|| format!("loading {}", variant.dir.display()))?;
    anyhow::ensure!(model.layers.len() == args.layers, "unexpected layer count");
    for layer in &model.layers {
        if let FeedForward::Moe(block) = &layer.feed_forward {
            eprintln!(
                "  layer {}: experts loaded as {:?}",
                layer.index,
                block.experts.form()
            );
        }
    }
    let bytes_per_layer = model.routed_expert_bytes() / args.layers as u64;
    let mut ours = Ours::new(model);
    let with_layers = measure(&mut ours, device, protocol)?;
    ours.truncate(0);
    let without_layers = measure(&mut ours, device, protocol)?;
    Ok((with_layers, without_layers, bytes_per_layer))
}

/// Times candle-transformers on the original's shards with all layers and with none.
fn measure_anchor(
    original: &Variant,
    args: &Args,
    (dtype, device): (DType, &Device),
    protocol: &Protocol,
) -> anyhow::Result<(Timings, Timings)> {
    let checkpoint = Checkpoint::open(&original.dir)?;
    let mut config: candle_transformers::models::qwen3_moe::Config =
        serde_json::from_value(checkpoint.config().clone())
            .context("config.json as candle-transformers' qwen3_moe::Config")?;
    let shards: Vec<PathBuf> = checkpoint
        .shard_paths()
        .into_iter()
        .map(Path::to_path_buf)
        .collect();
    let mut timings = Vec::new();
    for layers in [args.layers, 0] {
        config.num_hidden_layers = layers;
        let mut anchor = Anchor::load(&config, &shards, dtype, device)?;
        timings.push(measure(&mut anchor, device, protocol)?);
    }
    let without_layers = timings.pop().context("no timing without layers")?;
    let with_layers = timings.pop().context("no timing with layers")?;
    Ok((with_layers, without_layers))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.layers > 0, "--layers must be at least 1");
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    anyhow::ensure!(args.context > 0, "--context must be at least 1");
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let s = Shape::named(SHAPE, args.layers).context("unknown shape")?;
    anyhow::ensure!(
        args.vocab > 0 && args.vocab <= s.vocab,
        "--vocab must be in [1, {}]",
        s.vocab
    );
    let temporary = tempfile::tempdir()?;
    let work = args.work.clone().unwrap_or_else(|| temporary.path().into());
    let variants = prepare(&args, &s, &work)?;
    let protocol = Protocol {
        context: args.context,
        prefill_repeats: args.prefill_repeats,
        batches: args.batches.clone(),
        warmup_steps: args.warmup,
        timed_steps: args.steps,
        vocab: args.vocab,
    };
    let bytes_per_layer =
        |p: &ExpertParams| (p.total() * dtype.size_in_bytes()) as u64 / args.layers as u64;
    let mut rows = Vec::new();
    if !args.no_anchor {
        eprintln!("measuring candle-transformers on original");
        let (full, ends) = measure_anchor(&variants[0], &args, (dtype, &device), &protocol)?;
        let bytes = bytes_per_layer(&variants[0].params);
        rows.push(Row::new(
            "candle-transformers",
            "original",
            bytes,
            args.layers,
            full,
            ends,
        ));
    }
    for variant in &variants {
        eprintln!("measuring rfid-moe on {}", variant.label);
        let (full, ends, bytes) = measure_ours(variant, &args, (dtype, &device), &protocol)?;
        rows.push(Row::new(
            "rfid-moe",
            &variant.label,
            bytes,
            args.layers,
            full,
            ends,
        ));
    }
    print_report(&args, &rows, &device);
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "shape": SHAPE, "layers": args.layers, "vocab": args.vocab,
            "device": args.device, "dtype": args.dtype, "protocol": protocol,
            "cpu_threads": candle_core::utils::get_num_threads(),
            "per_layer": "(T(all layers) - T(no layer)) / layers, both medians, same runtime",
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_report(args: &Args, rows: &[Row], device: &Device) {
    println!(
        "Decode benchmark: {} random layers with {SHAPE}'s shapes (hidden 2048, 128 experts of \
         768, top-8, 32/4 heads of 128), vocabulary cut to {} (real: 151936); device {:?}, \
         dtype {}, {} CPU threads.",
        args.layers,
        args.vocab,
        device,
        args.dtype,
        candle_core::utils::get_num_threads()
    );
    println!(
        "Per layer = (T(all {} layers) − T(no layer: embedding, norm, head)) / {}, medians of the \
         same runtime. Prefill: {} tokens at batch 1, median of {}. Decode: one step (one new \
         token per sequence) after a {}-token prefill, median of {} steps after {} warm-up. \
         Speed-ups are reference time / this time. Experts: bytes of the routed-expert tensors \
         held in memory (candle-transformers: elements × dtype size).",
        args.layers,
        args.layers,
        args.context,
        args.prefill_repeats.max(1),
        args.context,
        args.steps,
        args.warmup
    );
    println!();
    print!("{}", table(rows, &args.batches, args.context));
}
