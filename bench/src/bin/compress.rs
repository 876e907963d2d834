//! Compression benchmark: writes (or reuses) a random checkpoint with the exact
//! names and shapes of a real MoE model for N layers, compresses it with `rfid_moe::compress`
//! (SVD factoriser, whitening: the defaults) on random calibration windows, and prints per MoE
//! layer and on average the seconds of each stage, the peak host (and, on CUDA, device)
//! memory, the whole model's time extrapolated from the measured layers, and in the same run
//! LAPACK's `sgesdd` on as many matrices of the same shapes as the factor stage handled.
//!
//! ```sh
//! cargo run --release -p rfid-moe-bench --features lapack --bin compress -- \
//!     --shape qwen3-30b-a3b --layers 2 --ratio 0.4 --samples 4 --seq-len 256
//! cargo run --release -p rfid-moe-bench --features lapack --bin compress -- \
//!     --shape deepseek-v3 --layers 2 --dense-layers 1 --experts 16 --vocab 8192
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use rfid_moe::pipeline::{CompressOptions, OutputOptions, Report};
use rfid_moe_bench::device_memory::{DeviceMemory, DeviceMemorySampler};
use rfid_moe_bench::host_memory;
use rfid_moe_bench::reference::ReferenceTiming;
use rfid_moe_bench::synthetic::{self, CheckpointPlan, Overrides, Shape, SHAPE_NAMES};
use serde::Serialize;

/// Compression benchmark on a random checkpoint with a real model's shapes.
#[derive(Parser, Debug, Serialize)]
#[command(name = "compress")]
struct Args {
    /// The real model whose names and shapes the checkpoint takes.
    #[arg(long, default_value = "qwen3-30b-a3b", value_parser = clap::builder::PossibleValuesParser::new(SHAPE_NAMES))]
    shape: String,
    /// Decoder layers written and compressed.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Routed experts per layer instead of the real model's (a real DeepSeek-V3 layer is
    /// about 11 GB of FP8).
    #[arg(long)]
    experts: Option<usize>,
    /// Leading dense layers instead of the real model's (DeepSeek shapes).
    #[arg(long)]
    dense_layers: Option<usize>,
    /// Vocabulary written instead of the real model's.
    #[arg(long)]
    vocab: Option<usize>,
    /// Also write DeepSeek-V3's multi-token-prediction layer.
    #[arg(long)]
    mtp: bool,
    /// Routed-expert intermediate size instead of the real model's (reduced runs).
    #[arg(long)]
    expert_intermediate: Option<usize>,
    /// What runs: `paper` (the paper's low-rank preset) or `default` (the tool's default
    /// methods under a byte budget).
    #[arg(long, default_value = "paper", value_parser = clap::builder::PossibleValuesParser::new(["paper", "default"]))]
    preset: String,
    /// Fraction ρ removed: of the gate/up expert parameters (`paper`), of the routed experts'
    /// bytes (`default`).
    #[arg(long, default_value_t = 0.4)]
    ratio: f64,
    /// Calibration windows.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Where calibration runs: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Directory for the checkpoint, calibration ids and output (reused when there).
    #[arg(long, default_value = "/tmp/rfid-moe-compressbench")]
    work: PathBuf,
    /// Save the settings and figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Decompose at most this many matrices in the LAPACK reference (its time is scaled up
    /// linearly to all of the factor stage's groups).
    #[arg(long)]
    reference_groups: Option<usize>,
    /// Skip the LAPACK reference.
    #[arg(long)]
    no_reference: bool,
    /// Load the written checkpoint and the compressed one with `rfid_moe::models::Model::load`
    /// (f32, CPU) and run a forward pass of a few tokens through each.
    #[arg(long)]
    check_forward: bool,
}

/// One compressed layer's figures.
#[derive(Debug, Serialize)]
struct LayerFigures {
    layer: usize,
    calibrate: f64,
    /// Statistics and the methods' candidates (the low-rank analysis).
    analyse: f64,
    /// The budget solver (the paper's allocation).
    allocate: f64,
    /// Applying the chosen candidates (factorisation).
    factor: f64,
    emit: f64,
    total: f64,
    /// Groups the factor stage decomposed (not kept dense).
    factored_groups: usize,
}

/// The whole-model extrapolation.
#[derive(Debug, Serialize)]
struct Extrapolation {
    formula: String,
    mean_moe_layer_seconds: f64,
    real_moe_layers: usize,
    rest_seconds: f64,
    whole_model_seconds: f64,
    /// With fewer experts than the real model: the per-layer stages other than calibrate
    /// scaled linearly to the real expert count (a rough estimate).
    scaled_to_real_experts_seconds: Option<f64>,
}

/// Everything the run prints, for `--json`.
#[derive(Debug, Serialize)]
struct Figures {
    settings: Args,
    notes: Vec<String>,
    threads: usize,
    checkpoint: PathBuf,
    checkpoint_seconds: Option<f64>,
    total_seconds: f64,
    layers: Vec<LayerFigures>,
    mean: LayerFigures,
    extrapolation: Extrapolation,
    report_peak_resident_bytes: Option<u64>,
    process_peak_resident_bytes: Option<u64>,
    device_memory: Option<DeviceMemory>,
    reference: Option<ReferenceTiming>,
    factor_over_reference: Option<f64>,
}

/// The checkpoint's directory name: shape and every override.
fn checkpoint_name(args: &Args, s: &Shape, vocab: usize) -> String {
    format!(
        "{}-l{}-e{}-p{}-d{}-v{}{}",
        args.shape,
        args.layers,
        s.experts,
        s.expert_intermediate,
        s.dense_layers,
        vocab,
        if s.mtp { "-mtp" } else { "" }
    )
}

/// Writes the checkpoint unless a complete one (with `config.json`) is there; returns the
/// seconds spent writing.
fn ensure_checkpoint(s: &Shape, vocab: usize, dir: &Path) -> anyhow::Result<Option<f64>> {
    if dir.join("config.json").exists() {
        eprintln!("reusing {}", dir.display());
        return Ok(None);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let started = std::time::Instant::now();
    synthetic::write_checkpoint(
        s,
        dir,
        CheckpointPlan {
            vocab,
            dense_gate_up: true,
            extend_layer: &mut |_, _| Ok(()),
            extra_config: serde_json::Map::new(),
            verbose: true,
        },
    )?;
    Ok(Some(started.elapsed().as_secs_f64()))
}

/// Loads the checkpoint in `dir` with rfid-moe's runtime (f32, CPU), runs 8 tokens through it
/// and checks the logits' shape and that they are finite.
fn check_forward(dir: &Path, vocab: usize) -> anyhow::Result<()> {
    use candle_core::{DType, Device, Tensor};
    let checkpoint = rfid_moe::checkpoint::Checkpoint::open(dir)?;
    let model = rfid_moe::models::Model::load(&checkpoint, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading {}", dir.display()))?;
    let ids: Vec<u32> = (0..8u64)
        .map(|t| (rfid_moe::rng::splitmix64(t) % vocab as u64) as u32)
        .collect();
    let input = Tensor::from_vec(ids, (1, 8), &Device::Cpu)?;
    let logits = model.forward(&input, None)?.logits;
    anyhow::ensure!(
        logits.dims() == [1, 8, vocab],
        "logits {:?}, expected [1, 8, {vocab}]",
        logits.dims()
    );
    let sum = logits.abs()?.sum_all()?.to_scalar::<f32>()?;
    anyhow::ensure!(
        sum.is_finite(),
        "logits of {} are not finite",
        dir.display()
    );
    println!(
        "forward check: {} loads ({} decoder layers) and gives finite logits {:?} (mean |logit| {:.4})",
        dir.display(),
        model.layers.len(),
        logits.dims(),
        sum / (8 * vocab) as f32
    );
    Ok(())
}

/// The compression options of the run: the paper's low-rank preset (SVD, whitening, gate and
/// up at a parameter ratio) or the default methods, with the benchmark's model, calibration,
/// ratio and device.
fn options(args: &Args, model: &Path, calibration: &Path, out: &Path) -> CompressOptions {
    let mut options = match args.preset.as_str() {
        "default" => CompressOptions::default(),
        _ => rfid_moe::pipeline::presets::paper(),
    };
    options.model = model.to_path_buf();
    options.device = args.device.clone();
    // The preset's grouping stays (the paper's four experts, or `auto`).
    options.calibration.data = calibration.to_path_buf();
    options.calibration.samples = args.samples;
    options.calibration.seq_len = args.seq_len;
    options.budget.ratio = args.ratio;
    options.output = OutputOptions {
        out: Some(out.to_path_buf()),
        force: true,
        ..OutputOptions::default()
    };
    options
}

/// Per-layer figures from the report.
fn layer_figures(report: &Report) -> Vec<LayerFigures> {
    report
        .layers
        .iter()
        .map(|layer| {
            let t = layer.stage_seconds;
            LayerFigures {
                layer: layer.layer,
                calibrate: t.calibrate,
                analyse: t.statistics + t.offer,
                allocate: t.solve,
                factor: t.apply,
                emit: t.emit,
                total: t.total(),
                factored_groups: layer
                    .matrices
                    .values()
                    .flatten()
                    .filter(|g| !g.dense)
                    .count(),
            }
        })
        .collect()
}

/// The mean over layers (its `layer` is the count).
fn mean(layers: &[LayerFigures]) -> LayerFigures {
    let n = layers.len().max(1) as f64;
    let avg = |f: fn(&LayerFigures) -> f64| layers.iter().map(f).sum::<f64>() / n;
    LayerFigures {
        layer: layers.len(),
        calibrate: avg(|l| l.calibrate),
        analyse: avg(|l| l.analyse),
        allocate: avg(|l| l.allocate),
        factor: avg(|l| l.factor),
        emit: avg(|l| l.emit),
        total: avg(|l| l.total),
        factored_groups: (layers.iter().map(|l| l.factored_groups).sum::<usize>() as f64 / n)
            .round() as usize,
    }
}

/// The whole model's time from the measured layers.
fn extrapolate(
    s: &Shape,
    real_experts: usize,
    report: &Report,
    layers: &[LayerFigures],
) -> Extrapolation {
    let m = mean(layers);
    let moe_sum: f64 = layers.iter().map(|l| l.total).sum();
    let rest = (report.seconds - moe_sum).max(0.0);
    let real_moe_layers = s.real_moe_layers();
    let scaled = (s.experts != real_experts).then(|| {
        let factor = real_experts as f64 / s.experts as f64;
        let per_layer = m.calibrate + (m.analyse + m.allocate + m.factor + m.emit) * factor;
        per_layer * real_moe_layers as f64 + rest
    });
    Extrapolation {
        formula: "T_model = mean(T_MoE layer) × L_MoE(real) + T_rest, where T_rest = the run's \
                  seconds outside its MoE layers (opening, calibration windows, dense layers, \
                  embedding/head, report), counted once"
            .into(),
        mean_moe_layer_seconds: m.total,
        real_moe_layers,
        rest_seconds: rest,
        whole_model_seconds: m.total * real_moe_layers as f64 + rest,
        scaled_to_real_experts_seconds: scaled,
    }
}

/// The `k·p × d` shapes of the groups layer `layer` factored.
fn factored_shapes(report: &Report, s: &Shape) -> Vec<(usize, usize)> {
    report.layers.first().map_or_else(Vec::new, |layer| {
        layer
            .matrices
            .values()
            .flatten()
            .filter(|g| !g.dense)
            .map(|g| (g.experts.len() * s.expert_intermediate, s.hidden))
            .collect()
    })
}

#[cfg(feature = "lapack")]
fn reference(args: &Args, shapes: &[(usize, usize)]) -> anyhow::Result<Option<ReferenceTiming>> {
    if args.no_reference || shapes.is_empty() {
        return Ok(None);
    }
    eprintln!("LAPACK reference: sgesdd on {} matrices...", shapes.len());
    Ok(Some(rfid_moe_bench::reference::gesdd_reference(
        shapes,
        args.reference_groups,
    )?))
}

#[cfg(not(feature = "lapack"))]
fn reference(_: &Args, _: &[(usize, usize)]) -> anyhow::Result<Option<ReferenceTiming>> {
    Ok(None)
}

fn gib(bytes: Option<u64>) -> String {
    bytes.map_or("not measured".into(), |b| {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    })
}

fn print_figures(f: &Figures, s: &Shape) {
    println!(
        "\nshape {} ({} layers written, {} experts of {}×{}, vocab {}), ratio {}, calibration {}×{} tokens, device {}, {} rayon threads",
        f.settings.shape,
        f.settings.layers,
        s.experts,
        s.expert_intermediate,
        s.hidden,
        f.settings.vocab.unwrap_or(s.vocab),
        f.settings.ratio,
        f.settings.samples,
        f.settings.seq_len,
        f.settings.device,
        f.threads
    );
    for note in &f.notes {
        println!("override: {note}");
    }
    println!("\n| MoE layer | calibrate s | analyse s | allocate s | factor s | emit s | total s | factored groups |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let row = |name: String, l: &LayerFigures| {
        println!(
            "| {name} | {:.2} | {:.2} | {:.3} | {:.2} | {:.2} | {:.2} | {} |",
            l.calibrate, l.analyse, l.allocate, l.factor, l.emit, l.total, l.factored_groups
        )
    };
    for l in &f.layers {
        row(l.layer.to_string(), l);
    }
    row(format!("mean of {}", f.layers.len()), &f.mean);
    let e = &f.extrapolation;
    println!(
        "\nrun total {:.1} s; outside the MoE layers T_rest = {:.1} s",
        f.total_seconds, e.rest_seconds
    );
    println!("{}", e.formula);
    println!(
        "whole model ≈ {:.1} s × {} + {:.1} s = {:.0} s ({:.1} min)",
        e.mean_moe_layer_seconds,
        e.real_moe_layers,
        e.rest_seconds,
        e.whole_model_seconds,
        e.whole_model_seconds / 60.0
    );
    if let Some(scaled) = e.scaled_to_real_experts_seconds {
        println!(
            "  with the real expert count (analyse/allocate/factor/emit × real/written experts, calibrate as measured): ≈ {scaled:.0} s ({:.1} min), a rough estimate",
            scaled / 60.0
        );
    }
    println!(
        "peak host memory: report (anonymous resident, sampled between layers) {}; process VmHWM during compression {}",
        gib(f.report_peak_resident_bytes),
        gib(f.process_peak_resident_bytes)
    );
    match &f.device_memory {
        Some(d) => println!(
            "peak device memory: {} above the {} in use before (peak {} of {})",
            gib(Some(d.peak_above_baseline())),
            gib(Some(d.baseline_used)),
            gib(Some(d.peak_used)),
            gib(Some(d.total))
        ),
        None => println!("peak device memory: not measured (CPU run, or a build without `cuda`)"),
    }
    print_reference(f);
}

fn print_reference(f: &Figures) {
    match (&f.reference, f.factor_over_reference) {
        (Some(r), Some(ratio)) => println!(
            "LAPACK sgesdd (f32) on {} matrices of the first layer's factored group shapes ({} decomposed, {:.1} s, scaled linearly): {:.1} s; factor stage / reference = {:.2} ({:.2}× the reference's throughput)",
            r.groups, r.groups_measured, r.seconds_measured, r.seconds, ratio, 1.0 / ratio
        ),
        _ if cfg!(feature = "lapack") => println!("LAPACK reference skipped"),
        _ => println!("LAPACK reference: not measured; it needs `--features lapack`"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.layers > 0, "--layers must be at least 1");
    let mut s = Shape::named(&args.shape, args.layers).context("unknown shape")?;
    let real_experts = s.experts;
    let mut notes = Overrides {
        experts: args.experts,
        dense_layers: args.dense_layers,
        mtp: args.mtp,
        expert_intermediate: args.expert_intermediate,
    }
    .apply(&mut s)?;
    let vocab = args.vocab.unwrap_or(s.vocab);
    if vocab != s.vocab {
        notes.push(format!(
            "vocabulary: {vocab} (the real model has {})",
            s.vocab
        ));
    }
    let real_layers = s.real_layers;
    notes.push(format!(
        "decoder layers: {} of the real model's {real_layers}",
        args.layers
    ));
    for note in &notes {
        eprintln!("override: {note}");
    }
    std::fs::create_dir_all(&args.work)?;
    let model = args.work.join(checkpoint_name(&args, &s, vocab));
    let checkpoint_seconds = ensure_checkpoint(&s, vocab, &model)?;
    let calibration = args.work.join(format!(
        "calibration-v{vocab}-{}x{}.safetensors",
        args.samples, args.seq_len
    ));
    synthetic::write_token_windows(&calibration, args.samples, args.seq_len, vocab)?;
    if args.check_forward {
        check_forward(&model, vocab)?;
    }
    let out = args
        .work
        .join(format!("{}-rfid", checkpoint_name(&args, &s, vocab)));
    // The peak resident memory from here on is compression's alone.
    let reset = host_memory::reset_peak();
    let sampler = DeviceMemorySampler::start(&args.device)?;
    eprintln!("compressing {} ...", model.display());
    let report = rfid_moe::compress(&options(&args, &model, &calibration, &out))?;
    let device_memory = sampler.stop();
    let process_peak = host_memory::peak_bytes().filter(|_| reset);
    if args.check_forward {
        check_forward(&out, vocab)?;
    }
    let layers = layer_figures(&report);
    anyhow::ensure!(!layers.is_empty(), "no MoE layer was compressed");
    let shapes = factored_shapes(&report, &s);
    let reference = reference(&args, &shapes)?;
    let factor_over_reference = reference
        .as_ref()
        .map(|r| layers[0].factor / r.seconds.max(f64::MIN_POSITIVE));
    let figures = Figures {
        threads: rayon::current_num_threads(),
        checkpoint: model,
        checkpoint_seconds,
        total_seconds: report.seconds,
        mean: mean(&layers),
        extrapolation: extrapolate(&s, real_experts, &report, &layers),
        layers,
        report_peak_resident_bytes: report.peak_resident_bytes,
        process_peak_resident_bytes: process_peak,
        device_memory,
        reference,
        factor_over_reference,
        notes,
        settings: args,
    };
    print_figures(&figures, &s);
    if let Some(path) = &figures.settings.json {
        std::fs::write(path, serde_json::to_string_pretty(&figures)?)?;
    }
    Ok(())
}
