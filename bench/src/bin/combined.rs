//! Whether candidates that combine quantisation and low rank would earn their bytes.
//!
//! On a checkpoint's own calibration statistics, every routed-expert matrix gets the error the
//! quantise method's candidates are judged by (`Σ_i w_i·Δw_i·H·Δw_iᵀ` over its routed inputs,
//! relative to the layer's output energy) for:
//! - GPTQ (act order, refined codes) in each of the quantise method's default formats;
//! - the same with a rank-r correction of its error, the best one under that error (from the
//!   SVD of `D^½·ΔW·L`, `H = L·Lᵀ`), its factors in bf16, int8 or int4;
//! - low rank alone (the same SVD of `D^½·W·L`), its factors in bf16, int8 or int4, and with
//!   int4 factors measured: the input-side factor quantised by GPTQ (int4, groups of 32), the
//!   output-side one refitted to it by least squares and stored in int8;
//! - removal and keeping.
//!
//! Except where measured, quantised factors are counted at their stored bytes but as if they
//! lost nothing, which favours every candidate with factors. A byte budget is then allocated
//! over every matrix (per matrix the candidate minimising error + λ·bytes, λ set to meet the
//! budget, the error at the exact budget read off the hull between the two allocations that
//! bracket it) with the plain candidates alone and with each family of combined candidates
//! added.
//!
//! ```sh
//! cargo run --release -p rfid-moe-bench --bin combined -- --model models/mini-moe-docs
//! ```

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::Parser;
use faer::linalg::solvers::{Llt, Solve};
use faer::Mat;
use rayon::prelude::*;
use rfid_moe::checkpoint::experts::ExpertMatrix;
use rfid_moe::linalg::{singular_values, thin_svd, CpuBackend};
use rfid_moe::pipeline::methods::quantise::{default_schemes, QuantiseSettings};
use rfid_moe::pipeline::methods::{int8, keep, LayerContext, Method, Needs};
use rfid_moe::pipeline::plan::{Candidate, UnitOutput};
use rfid_moe::pipeline::{CompressOptions, Registry};
use rfid_moe::quant::gptq::{GptqHessian, GptqOptions};
use rfid_moe::quant::Scheme;
use serde::Serialize;

/// Measures combined quantise + low-rank candidates against the plain ones.
#[derive(Parser, Debug)]
#[command(name = "combined")]
struct Args {
    /// Model directory (safetensors, HF layout, with tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// Calibration text (default: the model's calibration.txt).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Ranks of the corrections and of the low-rank candidates.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    ranks: Vec<usize>,
    /// Fractions of the routed experts' bytes kept.
    #[arg(long, value_delimiter = ',', default_value = "0.258,0.195,0.133")]
    kept: Vec<f64>,
    /// Write every matrix's candidates and the allocations as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What a candidate is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
enum Kind {
    /// Removed.
    Remove,
    /// Kept in bf16.
    Keep,
    /// GPTQ in a format.
    Quantised,
    /// GPTQ plus a rank-r correction of its error.
    Corrected,
    /// Rank-r factors alone.
    LowRank,
    /// Rank-r factors alone, quantised and measured: the input-side factor by GPTQ in int4 (group
    /// 32) under the Gram, the output-side one refitted to it by least squares and stored int8.
    LowRankInt4Measured,
}

/// Stored precision of low-rank factors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
enum Factors {
    Bf16,
    Int8,
    Int4,
}

impl Factors {
    const ALL: [Factors; 3] = [Factors::Bf16, Factors::Int8, Factors::Int4];

    /// Bytes of rank-`rank` factors `[rows, rank]·[rank, cols]`, scales included: int8 as the
    /// low-rank method stores it (an f32 scale per row and 128 columns), int4 with a bf16
    /// scale per 32 values.
    fn bytes(self, rank: usize, rows: usize, cols: usize) -> f64 {
        let values = rank * (rows + cols);
        match self {
            Factors::Bf16 => 2.0 * values as f64,
            Factors::Int8 => {
                (int8::stored_bytes(rows, rank) + int8::stored_bytes(rank, cols)) as f64
            }
            Factors::Int4 => values as f64 / 2.0 + 2.0 * (values as f64 / 32.0).ceil(),
        }
    }
}

/// One candidate for one matrix.
#[derive(Debug, Clone, Serialize)]
struct Point {
    kind: Kind,
    scheme: Option<String>,
    rank: usize,
    factors: Option<Factors>,
    bytes: f64,
    error: f64,
}

/// One matrix's candidates.
#[derive(Debug, Clone, Serialize)]
struct MatrixPoints {
    layer: usize,
    expert: usize,
    matrix: String,
    rows: usize,
    cols: usize,
    tokens: usize,
    points: Vec<Point>,
}

/// What the measuring method records: every matrix's candidates.
struct Probe {
    ranks: Vec<usize>,
    schemes: Vec<Scheme>,
    gptq: GptqOptions,
    min_tokens: usize,
    recorded: Mutex<Vec<MatrixPoints>>,
}

/// `xᵀ·x` of `x` [n, d] (f32) as a d×d f64 matrix.
fn gram(x: &Tensor) -> anyhow::Result<Mat<f64>> {
    let (n, d) = x.dims2()?;
    let values = x.flatten_all()?.to_vec1::<f32>()?;
    let x = Mat::<f64>::from_fn(n, d, |i, j| values[i * d + j] as f64);
    Ok(x.transpose() * &x)
}

/// `D^½·A·L` for `a` [rows, cols] row-major.
fn whitened(a: &[f32], rows: usize, row_weights: &[f64], l: &Mat<f64>) -> Mat<f64> {
    let cols = l.nrows();
    let a = Mat::<f64>::from_fn(rows, cols, |i, j| {
        row_weights[i].max(0.0).sqrt() * a[i * cols + j] as f64
    });
    a * l
}

/// Σ of the squares beyond the first `rank` of `s` (descending singular values).
fn tail(s: &[f64], rank: usize) -> f64 {
    s.iter().skip(rank).map(|v| v * v).sum()
}

impl Probe {
    /// Every candidate of one matrix: `w` [rows, cols] under the Gram `h` (undamped).
    fn points(
        &self,
        w: &[f32],
        rows: usize,
        h: &Mat<f64>,
        row_weights: &[f64],
        energy: f64,
    ) -> anyhow::Result<Vec<Point>> {
        let cols = h.nrows();
        let flat: Vec<f64> = (0..cols * cols).map(|k| h[(k / cols, k % cols)]).collect();
        let hessian = GptqHessian::new(&flat, cols, &self.gptq)?;
        // The damped Hessian GPTQ's row losses are under, so that every error here is too.
        let damped = Mat::<f64>::from_fn(cols, cols, |i, j| {
            let dead = h[(i, i)] == 0.0;
            match (i == j, dead) {
                (true, true) => 1.0 + hessian.damping(),
                (true, false) => h[(i, i)] + hessian.damping(),
                _ => h[(i, j)],
            }
        });
        let llt = damped
            .llt(faer::Side::Lower)
            .map_err(|e| anyhow::anyhow!("Cholesky of the damped Gram failed: {e:?}"))?;
        let l = llt.L().to_owned();
        let mut points = Vec::new();
        let whole = singular_values(&whitened(w, rows, row_weights, &l))?;
        points.push(Point {
            kind: Kind::Remove,
            scheme: None,
            rank: 0,
            factors: None,
            bytes: 0.0,
            error: tail(&whole, 0) / energy,
        });
        points.push(Point {
            kind: Kind::Keep,
            scheme: None,
            rank: 0,
            factors: None,
            bytes: 2.0 * (rows * cols) as f64,
            error: 0.0,
        });
        for &rank in self.ranks.iter().filter(|&&r| r < rows.min(cols)) {
            for factors in Factors::ALL {
                points.push(Point {
                    kind: Kind::LowRank,
                    scheme: None,
                    rank,
                    factors: Some(factors),
                    bytes: factors.bytes(rank, rows, cols),
                    error: tail(&whole, rank) / energy,
                });
            }
        }
        points.extend(self.quantised_low_rank(w, rows, row_weights, &damped, &llt, energy)?);
        for scheme in self.schemes.iter().filter(|s| s.supports(cols)) {
            let quantised = hessian.quantise(w, rows, *scheme)?;
            let delta: Vec<f32> = w
                .iter()
                .zip(&quantised.dequantised)
                .map(|(a, b)| a - b)
                .collect();
            let s = singular_values(&whitened(&delta, rows, row_weights, &l))?;
            let bytes = scheme.stored_bytes(rows, cols) as f64;
            points.push(Point {
                kind: Kind::Quantised,
                scheme: Some(scheme.name()),
                rank: 0,
                factors: None,
                bytes,
                error: tail(&s, 0) / energy,
            });
            for &rank in self.ranks.iter().filter(|&&r| r < rows.min(cols)) {
                for factors in Factors::ALL {
                    points.push(Point {
                        kind: Kind::Corrected,
                        scheme: Some(scheme.name()),
                        rank,
                        factors: Some(factors),
                        bytes: bytes + factors.bytes(rank, rows, cols),
                        error: tail(&s, rank) / energy,
                    });
                }
            }
        }
        Ok(points)
    }

    /// Low rank with quantised factors, measured: `W ≈ A·B` from the weighted SVD, `B` (rank ×
    /// cols) by GPTQ in int4-g32 under `damped`, `A` refitted to the quantised `B` by least
    /// squares under the same Gram and rounded to int8 with a scale per row.
    fn quantised_low_rank(
        &self,
        w: &[f32],
        rows: usize,
        row_weights: &[f64],
        damped: &Mat<f64>,
        llt: &Llt<f64>,
        energy: f64,
    ) -> anyhow::Result<Vec<Point>> {
        let l = &llt.L().to_owned();
        let cols = damped.nrows();
        let scheme = Scheme::parse("int4-g32-asym")?;
        if !scheme.supports(cols) {
            return Ok(Vec::new());
        }
        let svd = thin_svd(&whitened(w, rows, row_weights, l))?;
        let flat: Vec<f64> = (0..cols * cols)
            .map(|k| damped[(k / cols, k % cols)])
            .collect();
        let hessian = GptqHessian::new(
            &flat,
            cols,
            &GptqOptions {
                damp: 0.0,
                ..self.gptq
            },
        )?;
        let w_mat = Mat::<f64>::from_fn(rows, cols, |i, j| w[i * cols + j] as f64);
        let mut points = Vec::new();
        for &rank in self.ranks.iter().filter(|&&r| r < rows.min(cols)) {
            // B = Σ^½·Vᵀ·L⁻¹, so that its rows' errors weigh σ_j each under the Gram.
            let y = Mat::<f64>::from_fn(rank, cols, |j, c| svd.s[j].sqrt() * svd.vt[(j, c)]);
            let b_t = llt.solve(l * y.transpose());
            let b: Vec<f32> = (0..rank * cols)
                .map(|k| b_t[(k % cols, k / cols)] as f32)
                .collect();
            let quantised = hessian.quantise(&b, rank, scheme)?;
            let b_hat = Mat::<f64>::from_fn(rank, cols, |j, c| {
                quantised.dequantised[j * cols + c] as f64
            });
            // A = W·H·B̂ᵀ·(B̂·H·B̂ᵀ)⁻¹.
            let hb_t = damped * b_hat.transpose();
            let mut g = &b_hat * &hb_t;
            let ridge = 1e-12
                * (0..rank)
                    .map(|j| g[(j, j)])
                    .sum::<f64>()
                    .max(f64::MIN_POSITIVE);
            for j in 0..rank {
                g[(j, j)] += ridge;
            }
            let a_t = g
                .llt(faer::Side::Lower)
                .map_err(|e| anyhow::anyhow!("Cholesky of B̂·H·B̂ᵀ failed: {e:?}"))?
                .solve((&w_mat * &hb_t).transpose());
            let mut a = Mat::<f64>::zeros(rows, rank);
            for i in 0..rows {
                let scale = (0..rank).map(|j| a_t[(j, i)].abs()).fold(0.0, f64::max) / 127.0;
                let scale = scale as f32 as f64;
                for j in 0..rank {
                    a[(i, j)] = match scale > 0.0 {
                        true => (a_t[(j, i)] / scale).round().clamp(-127.0, 127.0) * scale,
                        false => 0.0,
                    };
                }
            }
            let approx = &a * &b_hat;
            let delta: Vec<f32> = (0..rows * cols)
                .map(|k| (w_mat[(k / cols, k % cols)] - approx[(k / cols, k % cols)]) as f32)
                .collect();
            let error = tail(
                &singular_values(&whitened(&delta, rows, row_weights, l))?,
                0,
            );
            points.push(Point {
                kind: Kind::LowRankInt4Measured,
                scheme: Some(scheme.name()),
                rank,
                factors: Some(Factors::Int4),
                bytes: (int8::stored_bytes(rows, rank) + scheme.stored_bytes(rank, cols)) as f64,
                error: error / energy,
            });
        }
        Ok(points)
    }

    /// Every candidate of every matrix of expert `expert` in `layer`.
    fn expert(
        &self,
        layer: &LayerContext<CpuBackend>,
        expert: usize,
        prior: Option<&Tensor>,
    ) -> anyhow::Result<Vec<MatrixPoints>> {
        let statistics = layer.statistics;
        let inputs = statistics
            .routed_inputs
            .as_ref()
            .context("no routed inputs")?;
        let tokens = inputs.expert_tokens(expert);
        let mut rows = Vec::new();
        if let Some((x, _)) = inputs.expert_rows(expert)? {
            rows.push((x, 1.0));
        }
        // As the quantise method does: too few tokens filled in with the layer's inputs.
        if let (Some(prior), true) = (prior, tokens < self.min_tokens) {
            let weight = (self.min_tokens - tokens) as f64 / prior.dim(0)? as f64;
            rows.push((prior.clone(), weight));
        }
        let gate = layer.experts.matrix(expert, ExpertMatrix::Gate)?;
        let up = layer.experts.matrix(expert, ExpertMatrix::Up)?;
        let (mut input, mut intermediate): (Option<Mat<f64>>, Option<Mat<f64>>) = (None, None);
        for (x, weight) in &rows {
            let h = (candle_nn::ops::silu(&x.matmul(&gate.t()?)?)? * x.matmul(&up.t()?)?)?;
            for (sum, part) in [(&mut input, gram(x)?), (&mut intermediate, gram(&h)?)] {
                let part = part * faer::Scale(*weight);
                *sum = Some(match sum.take() {
                    Some(s) => s + part,
                    None => part,
                });
            }
        }
        let (Some(input), Some(intermediate)) = (input, intermediate) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for &matrix in layer.matrices {
            let h = match matrix {
                ExpertMatrix::Down => &intermediate,
                _ => &input,
            };
            let [rows, cols] = layer.experts.layout.shape(matrix);
            let w = layer
                .experts
                .matrix(expert, matrix)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let weights = statistics
                .error_weights(matrix, expert)
                .context("no error weights")?;
            let points = self.points(&w, rows, h, &weights.rows, statistics.output_energy)?;
            out.push(MatrixPoints {
                layer: statistics.layer,
                expert,
                matrix: format!("{matrix:?}").to_lowercase(),
                rows,
                cols,
                tokens,
                points,
            });
        }
        Ok(out)
    }
}

impl Probe {
    /// Records the candidates of every matrix of `layer`.
    fn measure_layer(&self, layer: &LayerContext<CpuBackend>) -> rfid_moe::Result<()> {
        let failed = |e: anyhow::Error| rfid_moe::Error::Numerical(format!("{e:#}"));
        let prior = match layer.statistics.routed_inputs.as_ref() {
            Some(inputs) => inputs.all_rows()?,
            None => None,
        };
        let measured: Vec<Vec<MatrixPoints>> = (0..layer.experts.layout.num_experts)
            .into_par_iter()
            .map(|e| self.expert(layer, e, prior.as_ref()).map_err(failed))
            .collect::<rfid_moe::Result<_>>()?;
        let mut recorded = self
            .recorded
            .lock()
            .map_err(|_| rfid_moe::Error::Numerical("a worker panicked".into()))?;
        recorded.extend(measured.into_iter().flatten());
        eprintln!("layer {} measured", layer.statistics.layer);
        Ok(())
    }
}

/// Which candidates an allocation may choose from.
#[derive(Debug, Clone, Copy, Serialize)]
enum Family {
    /// Remove, keep, GPTQ in the default formats, low rank in bf16 and int8 (what the default
    /// methods offer).
    Plain,
    /// The plain ones and GPTQ plus a correction with factors of `Factors`.
    PlusCorrection(Factors),
    /// The plain ones and low rank with int4 factors counted as lossless.
    PlusInt4LowRank,
    /// The plain ones and low rank with int4 input-side factors, measured.
    PlusInt4LowRankMeasured,
}

impl Family {
    fn admits(self, p: &Point) -> bool {
        let plain = match p.kind {
            Kind::Remove | Kind::Keep | Kind::Quantised => true,
            Kind::LowRank => p.factors != Some(Factors::Int4),
            Kind::Corrected | Kind::LowRankInt4Measured => false,
        };
        plain
            || match self {
                Family::Plain => false,
                Family::PlusCorrection(f) => p.kind == Kind::Corrected && p.factors == Some(f),
                Family::PlusInt4LowRank => p.kind == Kind::LowRank,
                Family::PlusInt4LowRankMeasured => p.kind == Kind::LowRankInt4Measured,
            }
    }
}

/// One allocation at a budget.
#[derive(Debug, Clone, Serialize)]
struct Allocation {
    family: Family,
    kept: f64,
    /// Σ error at exactly the budget (on the hull between the two bracketing allocations).
    error: f64,
    /// Matrices whose choice (at the allocation within the budget) is of each kind.
    chosen: Vec<(String, usize)>,
}

/// Per matrix, its chosen point at `lambda`.
fn choose(matrices: &[MatrixPoints], family: Family, lambda: f64) -> Vec<&Point> {
    matrices
        .iter()
        .filter_map(|m| {
            m.points.iter().filter(|p| family.admits(p)).min_by(|a, b| {
                (a.error + lambda * a.bytes).total_cmp(&(b.error + lambda * b.bytes))
            })
        })
        .collect()
}

fn totals(chosen: &[&Point]) -> (f64, f64) {
    chosen
        .iter()
        .fold((0.0, 0.0), |(b, e), p| (b + p.bytes, e + p.error))
}

/// Allocates `budget` bytes over `matrices` from `family`.
fn allocate(matrices: &[MatrixPoints], family: Family, budget: f64, kept: f64) -> Allocation {
    // Larger λ: fewer bytes. Bisect log λ for the smallest λ within the budget.
    let (mut lo, mut hi) = (-40.0f64, 20.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        let (bytes, _) = totals(&choose(matrices, family, 10f64.powf(mid)));
        if bytes > budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let within = choose(matrices, family, 10f64.powf(hi));
    let over = choose(matrices, family, 10f64.powf(lo));
    let (bytes_in, error_in) = totals(&within);
    let (bytes_over, error_over) = totals(&over);
    let error = match bytes_over > bytes_in {
        true => {
            let t = ((budget - bytes_in) / (bytes_over - bytes_in)).clamp(0.0, 1.0);
            error_in + t * (error_over - error_in)
        }
        false => error_in,
    };
    let mut chosen: Vec<(String, usize)> = Vec::new();
    for p in &within {
        let name = match (p.kind, p.factors) {
            (Kind::Corrected, Some(f)) => format!("corrected ({f:?} factors)"),
            (Kind::LowRank, Some(f)) => format!("low rank ({f:?} factors)"),
            (Kind::LowRankInt4Measured, _) => "low rank (int4 measured)".into(),
            (kind, _) => format!("{kind:?}").to_lowercase(),
        };
        match chosen.iter_mut().find(|(n, _)| *n == name) {
            Some((_, count)) => *count += 1,
            None => chosen.push((name, 1)),
        }
    }
    Allocation {
        family,
        kept,
        error,
        chosen,
    }
}

#[derive(Serialize)]
struct Output {
    model: PathBuf,
    matrices: Vec<MatrixPoints>,
    allocations: Vec<Allocation>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = QuantiseSettings::default();
    let probe = Probe {
        ranks: args.ranks.clone(),
        schemes: default_schemes(),
        gptq: GptqOptions {
            damp: settings.damp,
            act_order: settings.act_order,
            refine_passes: settings.refine_passes,
            ..GptqOptions::default()
        },
        min_tokens: settings.min_tokens,
        recorded: Mutex::new(Vec::new()),
    };
    let out = tempfile::tempdir()?;
    let mut options = CompressOptions {
        model: args.model.clone(),
        methods: vec!["probe".into(), keep::NAME.into()],
        ..CompressOptions::default()
    };
    options.calibration.data = args
        .calibration
        .clone()
        .unwrap_or_else(|| args.model.join("calibration.txt"));
    options.output.out = Some(out.path().join("out"));
    options.output.dry_run = true;
    // The probe offers nothing: every matrix is kept, so the run only calibrates and measures.
    options.budget.ratio = 0.0;
    PROBE.set(probe).ok().context("probe set twice")?;
    let mut registry = Registry::<CpuBackend>::builtin();
    registry.register("probe", "measures combined candidates", |_| {
        Ok(Box::new(SharedProbe))
    });
    rfid_moe::pipeline::compress_with(&options, &registry, &rfid_moe::Silent)?;
    let probe = PROBE.get().context("the probe is set above")?;
    let matrices = std::mem::take(&mut *probe.recorded.lock().expect("no worker panicked"));
    let full: f64 = matrices
        .iter()
        .map(|m| 2.0 * (m.rows * m.cols) as f64)
        .sum();
    let families = [
        Family::Plain,
        Family::PlusCorrection(Factors::Bf16),
        Family::PlusCorrection(Factors::Int8),
        Family::PlusCorrection(Factors::Int4),
        Family::PlusInt4LowRank,
        Family::PlusInt4LowRankMeasured,
    ];
    let mut allocations = Vec::new();
    println!(
        "{} matrices of {}; Σ error at each share of the routed bytes kept (relative to the plain candidates)",
        matrices.len(),
        args.model.display()
    );
    for &kept in &args.kept {
        let plain = allocate(&matrices, Family::Plain, kept * full, kept);
        for family in families {
            let a = allocate(&matrices, family, kept * full, kept);
            println!(
                "kept {:5.1}%  {:32}  error {:.5e}  ({:+.2}%)  chosen {:?}",
                100.0 * kept,
                format!("{family:?}"),
                a.error,
                100.0 * (a.error / plain.error - 1.0),
                a.chosen
            );
            allocations.push(a);
        }
    }
    if let Some(path) = &args.json {
        let output = Output {
            model: args.model.clone(),
            matrices,
            allocations,
        };
        std::fs::write(path, serde_json::to_vec_pretty(&output)?)?;
    }
    Ok(())
}

/// The probe the registry's constructor hands out (constructors are plain functions).
static PROBE: std::sync::OnceLock<Probe> = std::sync::OnceLock::new();

/// A handle on [`PROBE`] as a method.
struct SharedProbe;

impl SharedProbe {
    fn probe(&self) -> &Probe {
        PROBE.get().expect("the probe is set before the run")
    }
}

impl Method<CpuBackend> for SharedProbe {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn needs(&self) -> Needs {
        Needs {
            expert_statistics: true,
            routed_inputs: true,
            ..Needs::default()
        }
    }

    fn acts_without_budget(&self) -> bool {
        true
    }

    /// Offers nothing (every matrix is then kept as stored): it only records.
    fn offer(&self, layer: &LayerContext<CpuBackend>) -> rfid_moe::Result<Vec<Candidate>> {
        self.probe().measure_layer(layer)?;
        Ok(Vec::new())
    }

    fn apply(
        &self,
        _layer: &LayerContext<CpuBackend>,
        _chosen: &[Candidate],
    ) -> rfid_moe::Result<Vec<UnitOutput>> {
        Ok(Vec::new())
    }
}
