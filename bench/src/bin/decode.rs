//! Decode benchmark: prefill and per-token decode time per layer, and routed-expert
//! memory, of rfid-moe's runtime on an original and compressed random checkpoints with
//! Qwen3-30B-A3B's layer shapes, against candle-transformers' `qwen3_moe` on the same weights.
//!
//! ```sh
//! cargo run --release -p rfid-moe-bench --bin decode -- --layers 2 --device cpu --dtype f32
//! cargo run --release -p rfid-moe-bench --features cuda --bin decode -- --device cuda --dtype bf16
//! cargo run --release -p rfid-moe-bench --bin decode -- --variants original,prune-lowrank:0.4,method:int8
//! ```
//!
//! The checkpoints are `--variants` ([`rfid_moe_bench::variants`]); `--work DIR` keeps them, so
//! one run per variant (as `scripts/gpu-check.sh` does) writes the original once.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};
use clap::Parser;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::models::{FeedForward, Model};
use rfid_moe_bench::compressed::{
    expert_params, write_compressed, write_pruned_compressed, ExpertParams, UniformPlan,
};
use rfid_moe_bench::measure::{measure, Anchor, Ours, Protocol, Timings};
use rfid_moe_bench::report::{table, Row};
use rfid_moe_bench::synthetic::{self, CheckpointPlan, Overrides, Shape};
use rfid_moe_bench::variants::{self, PrunePlan, VariantSpec};

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
    /// Routed experts per layer instead of the real model's 128 (reduced runs).
    #[arg(long)]
    experts: Option<usize>,
    /// Routed-expert intermediate size instead of the real model's 768 (reduced runs).
    #[arg(long)]
    expert_intermediate: Option<usize>,
    /// The checkpoints and runtimes measured, in order: anchor (candle-transformers on the
    /// original), original, lowrank:ρ, prune-lowrank:ρ, method:NAME[:ρ] (ρ as `compress
    /// --ratio`), quantise:SCHEME (every expert matrix in one block format); see
    /// `rfid_moe_bench::variants`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "anchor,original,lowrank:0.4,lowrank:0.6"
    )]
    variants: Vec<VariantSpec>,
    /// Print the compression methods this build registers (name, tab, description) and exit.
    #[arg(long)]
    list_methods: bool,
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
#[derive(Clone)]
struct Variant {
    label: String,
    dir: PathBuf,
    params: ExpertParams,
}

/// Qwen3-30B-A3B's shape for `args.layers` layers with the reduced-run overrides and `experts`
/// routed experts (the real 128 unless given); also the lines saying what changed.
fn shape(args: &Args, experts: Option<usize>) -> anyhow::Result<(Shape, Vec<String>)> {
    let mut s = Shape::named(SHAPE, args.layers).context("unknown shape")?;
    let notes = Overrides {
        experts,
        expert_intermediate: args.expert_intermediate,
        ..Overrides::default()
    }
    .apply(&mut s)?;
    Ok((s, notes))
}

/// Runs `write` unless `dir` holds a complete checkpoint (one with `config.json`); a partial one
/// (a run stopped while writing) is removed first.
fn ensure_written(dir: &Path, write: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    if dir.join("config.json").exists() {
        eprintln!("reusing {}", dir.display());
        return Ok(());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    eprintln!("writing {}", dir.display());
    write()
}

/// Writes (or reuses) the original under `work` and checks its expert parameter count.
fn prepare_original(args: &Args, s: &Shape, work: &Path) -> anyhow::Result<Variant> {
    let dir = work.join("original");
    ensure_written(&dir, || {
        synthetic::write_checkpoint(
            s,
            &dir,
            CheckpointPlan {
                vocab: args.vocab,
                dense_gate_up: true,
                extend_layer: &mut |_, _| Ok(()),
                extra_config: serde_json::Map::new(),
                verbose: false,
            },
        )
    })?;
    let params = expert_params(&Checkpoint::open(&dir)?, s, args.layers);
    anyhow::ensure!(
        params.total() == args.layers * 3 * s.experts * s.expert_intermediate * s.hidden,
        "{}: unexpected expert parameter count {} (a checkpoint of another shape?)",
        dir.display(),
        params.total()
    );
    Ok(Variant {
        label: "original".into(),
        dir,
        params,
    })
}

/// Checks that a factored checkpoint keeps `expected` expert parameters within the allocation's
/// rounding (one rank of the largest group per matrix and layer) and `down` down parameters.
fn check_params(
    variant: &Variant,
    (expected, down): (f64, usize),
    plan: &UniformPlan,
    layers: usize,
    original: &ExpertParams,
) -> anyhow::Result<()> {
    let params = &variant.params;
    let tolerance = (layers * 2 * plan.largest_rank_cost()) as f64;
    anyhow::ensure!(
        (params.total() as f64 - expected).abs() <= tolerance && params.down == down,
        "{}: {} expert parameters ({} down), expected {expected:.0} within {tolerance} ({down} down)",
        variant.dir.display(),
        params.total(),
        params.down
    );
    eprintln!(
        "  gate/up parameters {:.4}× the original's, all experts {:.4}×",
        params.gate_up as f64 / original.gate_up as f64,
        params.total() as f64 / original.total() as f64
    );
    Ok(())
}

/// Writes (or reuses) the checkpoint of `spec` under `work` and checks its size.
fn prepare(
    spec: &VariantSpec,
    args: &Args,
    (s, work): (&Shape, &Path),
    original: &Variant,
) -> anyhow::Result<Variant> {
    let label = spec.label();
    let dir = work.join(&label);
    let opened = |dir: &Path, s: &Shape| -> anyhow::Result<ExpertParams> {
        Ok(expert_params(&Checkpoint::open(dir)?, s, args.layers))
    };
    let o = &original.params;
    match spec {
        VariantSpec::Anchor | VariantSpec::Original => Ok(original.clone()),
        VariantSpec::LowRank(ratio) => {
            let plan = UniformPlan::new(s, *ratio, s.experts)?;
            eprintln!("  ranks {:?}, groups of {}", plan.ranks(), plan.group_size);
            ensure_written(&dir, || write_compressed(s, &plan, args.vocab, &dir))?;
            let params = opened(&dir, s)?;
            let variant = Variant { label, dir, params };
            let expected = (1.0 - ratio) * o.gate_up as f64 + o.down as f64;
            check_params(&variant, (expected, o.down), &plan, args.layers, o)?;
            Ok(variant)
        }
        VariantSpec::PrunedLowRank(ratio) => {
            let prune = PrunePlan::new(&Checkpoint::open(&original.dir)?, *ratio)?;
            let (kept, _) = shape(args, Some(prune.kept()))?;
            let plan = UniformPlan::new(&kept, prune.lowrank_ratio, s.experts)?;
            eprintln!(
                "  {} of {} experts removed, the rest factored at ρ' = {:.4}: ranks {:?}",
                prune.removed,
                prune.experts,
                prune.lowrank_ratio,
                plan.ranks()
            );
            ensure_written(&dir, || {
                write_pruned_compressed(&kept, &plan, &prune, args.vocab, &dir)
            })?;
            let params = opened(&dir, &kept)?;
            let variant = Variant { label, dir, params };
            let expected = (1.0 - ratio) * o.gate_up as f64 + o.down as f64;
            let down = o.down / prune.experts * prune.kept();
            check_params(&variant, (expected, down), &plan, args.layers, o)?;
            Ok(variant)
        }
        VariantSpec::Method { .. } | VariantSpec::Quantised(_) => {
            let (name, ratio, scheme) = match spec {
                VariantSpec::Quantised(scheme) => ("quantise", 0.0, Some(scheme.as_str())),
                VariantSpec::Method { name, ratio } => (name.as_str(), *ratio, None),
                _ => unreachable!("matched above"),
            };
            let calibration = work.join("calibration.safetensors");
            ensure_written(&dir, || {
                variants::compress_with_method(
                    &original.dir,
                    (name, ratio, scheme),
                    &calibration,
                    &args.device,
                    &dir,
                )
            })?;
            let checkpoint = Checkpoint::open(&dir)?;
            let experts = rfid_moe::pipeline::methods::prune::RoutingLimits::of(&checkpoint)?;
            let (s, _) = shape(args, Some(experts.experts))?;
            let params = opened(&dir, &s)?;
            Ok(Variant { label, dir, params })
        }
    }
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
                "  layer {}: {} experts loaded as {:?}",
                layer.index,
                block.experts.len(),
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

/// Measures `spec` (writing its checkpoint first when needed) and returns its row.
fn measure_variant(
    spec: &VariantSpec,
    args: &Args,
    (s, work): (&Shape, &Path),
    original: &Variant,
    (at, protocol): ((DType, &Device), &Protocol),
) -> anyhow::Result<Row> {
    if *spec == VariantSpec::Anchor {
        eprintln!("measuring candle-transformers on original");
        let (full, ends) = measure_anchor(original, args, at, protocol)?;
        let bytes = (original.params.total() * at.0.size_in_bytes() / args.layers) as u64;
        return Ok(Row::new(
            "candle-transformers",
            "original",
            bytes,
            args.layers,
            full,
            ends,
        ));
    }
    let variant = prepare(spec, args, (s, work), original)?;
    eprintln!("measuring rfid-moe on {}", variant.label);
    let (full, ends, bytes) = measure_ours(&variant, args, at, protocol)?;
    Ok(Row::new(
        "rfid-moe",
        &variant.label,
        bytes,
        args.layers,
        full,
        ends,
    ))
}

/// Saves the settings and the rows measured so far as JSON (after every row, so that a run
/// stopped early keeps what it measured).
fn save_json(
    path: &Path,
    args: &Args,
    (s, notes): (&Shape, &[String]),
    protocol: &Protocol,
    rows: &[Row],
) -> anyhow::Result<()> {
    let json = serde_json::json!({
        "shape": SHAPE, "layers": args.layers, "vocab": args.vocab,
        "experts": s.experts, "expert_intermediate": s.expert_intermediate, "overrides": notes,
        "device": args.device, "dtype": args.dtype, "protocol": protocol,
        "variants": args.variants.iter().map(VariantSpec::label).collect::<Vec<_>>(),
        "cpu_threads": candle_core::utils::get_num_threads(),
        "per_layer": "(T(all layers) - T(no layer)) / layers, both medians, same runtime",
        "rows": rows,
    });
    std::fs::write(path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.list_methods {
        for (name, description) in variants::registered_methods() {
            println!("{name}\t{description}");
        }
        return Ok(());
    }
    anyhow::ensure!(args.layers > 0, "--layers must be at least 1");
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    anyhow::ensure!(args.context > 0, "--context must be at least 1");
    anyhow::ensure!(!args.variants.is_empty(), "--variants names nothing");
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let (s, notes) = shape(&args, args.experts)?;
    anyhow::ensure!(
        args.vocab > 0 && args.vocab <= s.vocab,
        "--vocab must be in [1, {}]",
        s.vocab
    );
    for note in &notes {
        eprintln!("override: {note}");
    }
    let temporary = tempfile::tempdir()?;
    let work = args.work.clone().unwrap_or_else(|| temporary.path().into());
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let original = prepare_original(&args, &s, &work)?;
    let protocol = Protocol {
        context: args.context,
        prefill_repeats: args.prefill_repeats,
        batches: args.batches.clone(),
        warmup_steps: args.warmup,
        timed_steps: args.steps,
        vocab: args.vocab,
    };
    let mut rows = Vec::new();
    for spec in &args.variants {
        let at = ((dtype, &device), &protocol);
        let row = measure_variant(spec, &args, (&s, &work), &original, at)
            .with_context(|| format!("variant `{}`", spec.label()))?;
        rows.push(row);
        if let Some(path) = &args.json {
            save_json(path, &args, (&s, &notes), &protocol, &rows)?;
        }
    }
    print_report(&args, &s, &rows, &device);
    Ok(())
}

fn print_report(args: &Args, s: &Shape, rows: &[Row], device: &Device) {
    println!(
        "Decode benchmark: {} random layers with {SHAPE}'s shapes (hidden 2048, {} experts of \
         {}, top-8, 32/4 heads of 128; the real model has 128 experts of 768), vocabulary cut \
         to {} (real: 151936); device {:?}, dtype {}, {} CPU threads.",
        args.layers,
        s.experts,
        s.expert_intermediate,
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
