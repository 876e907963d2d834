//! `quantise`: an expert's matrix in a 2–8-bit block format ([`Scheme`]: rfid-moe's integer
//! groups or ggml's block types), codes chosen by GPTQ under the expert's own calibration
//! statistics, one candidate per format, so that the solver picks each expert's bit-width by
//! estimated output error per byte.
//!
//! Statistics. gate and up are quantised under the Gram matrix of the inputs routed to the
//! expert, `H = Σ x xᵀ`; down under the Gram matrix of the expert's intermediate activations
//! `h = act(gate·x) ⊙ (up·x)` on the same tokens (`hessian = "expert"`). Routing frequency is
//! in `H` itself (an expert's Gram sums over its tokens), and information density in what GPTQ
//! can recover inside it. An expert with fewer than `min_tokens` routed tokens (none at all,
//! or too few for a full-rank Gram matrix) is filled in with the layer's: `H` gets
//! `(min_tokens − n)` tokens' worth of the Gram of the layer's calibration inputs (the
//! intermediate activations of the expert on them, for down), and the experts that needed it
//! are reported by name. `hessian = "layer"` quantises every expert under the layer's inputs
//! alone (scaled to the expert's tokens), as calibrating every expert on every token does.
//!
//! Errors. GPTQ's loss per row is exactly `Δw·H·Δwᵀ` over the calibration tokens (damping
//! included); each row is weighted by how its error reaches the layer's output (the experts'
//! routing weights and, for gate and up, the activation and down_proj behind it:
//! [`ErrorWeights`](crate::pipeline::calibrate::ErrorWeights) rows), as every method's
//! estimates are.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{LayerContext, Method, MethodInputs, Needs};
use crate::checkpoint::experts::ExpertMatrix;
use crate::checkpoint::packed::packed_name;
use crate::error::{Error, Result};
use crate::linalg::LinalgBackend;
use crate::pipeline::calibrate::RoutedInputs;
use crate::pipeline::experts::LayerExperts;
use crate::pipeline::options::MethodSettings;
use crate::pipeline::plan::{Candidate, StoredTensors, Unit, UnitOutput};
use crate::pipeline::report::{LayerQuantisation, LayerReport};
use crate::quant::gptq::{round_to_nearest_uncalibrated, GptqHessian, GptqOptions, Quantised};
use crate::quant::Scheme;

/// The registry name.
pub const NAME: &str = "quantise";

/// One line for help texts.
pub const DESCRIPTION: &str =
    "Store an expert's matrix in a 2-8-bit block format, codes chosen by GPTQ";

/// Layer inputs sampled for the fill-in Gram matrices of experts with few tokens.
const PRIOR_ROWS: usize = 4096;

crate::named_enum! {
    /// How codes are chosen.
    pub enum Algorithm ("quantisation algorithm") {
        /// GPTQ.
        Gptq = "gptq": "GPTQ: column by column, each rounding error fed back through the inverse Gram matrix",
        /// Round to nearest, uncalibrated.
        Rtn = "rtn": "Round to nearest on grids fitted to the weights alone (no calibration; the plain baseline)",
    }
}

crate::named_enum! {
    /// Whose calibration inputs an expert is quantised under.
    pub enum HessianSource ("quantisation statistics") {
        /// The expert's own tokens.
        Expert = "expert": "The tokens routed to the expert (filled in with the layer's below min_tokens)",
        /// The layer's tokens.
        Layer = "layer": "Every token of the layer, scaled to the expert's share",
    }
}

crate::named_enum! {
    /// How the error of each candidate format is found before the solver chooses.
    pub enum CandidateErrors ("candidate errors") {
        /// Every candidate quantised by GPTQ.
        Gptq = "gptq": "Every expert matrix quantised by GPTQ in every format (exact, slow)",
        /// Rounding estimates scaled by GPTQ on a few experts.
        Sampled = "sampled": "Each format's rounding error through GPTQ's inverse-Hessian factor, scaled per matrix and format to GPTQ's own on a few experts",
    }
}

/// Experts per layer quantised by GPTQ in every format to scale the other experts' estimates.
pub const SAMPLED_EXPERTS: usize = 4;

/// The formats offered by default: chosen on held-out calibration text (docs/RESULTS.md); the
/// solver picks each of them for some matrices of the trained models at 25.8%, 19.5% or 13.3%
/// of the routed bytes kept.
pub fn default_schemes() -> Vec<Scheme> {
    [
        "int2-g64-asym",
        "int2-g128-asym",
        "int3-g64-asym",
        "int3-g128-asym",
        "int4-g64-asym",
        "int4-g128-asym",
        "int5-g64-asym",
        "int5-g128-asym",
        "int6-g128-asym",
        "int8-g128-sym",
        "q2_k",
        "q3_k",
        "q4_k",
        "q5_k",
    ]
    .iter()
    .filter_map(|s| Scheme::parse(s).ok())
    .collect()
}

/// Coordinate-descent passes after GPTQ by default: on held-out text of both trained models,
/// four passes lowered the perplexity change at every budget measured (docs/RESULTS.md).
pub const DEFAULT_REFINE_PASSES: usize = 4;

/// `[settings.quantise]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantiseSettings {
    /// The formats offered, each where a matrix's columns are whole blocks of it.
    pub schemes: Vec<Scheme>,
    /// How codes are chosen.
    pub algorithm: Algorithm,
    /// GPTQ: columns in descending order of the Gram matrix's diagonal.
    pub act_order: bool,
    /// GPTQ: damping added to the Gram matrix's diagonal, relative to its mean.
    pub damp: f64,
    /// GPTQ: coordinate-descent passes over the codes after GPTQ, each grid held.
    pub refine_passes: usize,
    /// Whose calibration inputs an expert is quantised under.
    pub hessian: HessianSource,
    /// Experts with fewer routed tokens are filled in with the layer's statistics.
    pub min_tokens: usize,
    /// How the candidates' errors are found.
    pub errors: CandidateErrors,
}

impl Default for QuantiseSettings {
    fn default() -> Self {
        Self {
            schemes: default_schemes(),
            algorithm: Algorithm::Gptq,
            act_order: true,
            damp: 0.01,
            refine_passes: DEFAULT_REFINE_PASSES,
            hessian: HessianSource::Expert,
            min_tokens: 128,
            errors: CandidateErrors::Sampled,
        }
    }
}

impl MethodSettings for QuantiseSettings {
    const METHOD: &'static str = NAME;
}

impl QuantiseSettings {
    fn validate(&self) -> Result<()> {
        if self.schemes.is_empty() {
            return Err(Error::InvalidArgument(
                "[settings.quantise] schemes must name at least one format".into(),
            ));
        }
        if !(self.damp >= 0.0 && self.damp.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "[settings.quantise] damp {} must be a finite number ≥ 0",
                self.damp
            )));
        }
        Ok(())
    }

    fn gptq(&self) -> GptqOptions {
        GptqOptions {
            damp: self.damp,
            act_order: self.act_order,
            refine_passes: self.refine_passes,
            ..GptqOptions::default()
        }
    }
}

/// The method's smallest storage: the bytes per parameter of the smallest offered format.
pub fn smallest_storage(options: &crate::pipeline::options::CompressOptions) -> Option<f64> {
    let settings = options.settings_of::<QuantiseSettings>().ok()?;
    settings
        .schemes
        .iter()
        .map(|s| s.bits_per_weight() / 8.0)
        .reduce(f64::min)
}

/// The `quantise` method.
pub struct Quantise {
    settings: QuantiseSettings,
    /// Per layer, the experts whose statistics were filled in (and their tokens).
    filled_in: Mutex<BTreeMap<usize, BTreeMap<usize, usize>>>,
}

/// Builds the method from the run's options.
pub fn create<B: LinalgBackend>(inputs: &MethodInputs) -> Result<Box<dyn Method<B>>> {
    let mut settings = inputs.options.settings_of::<QuantiseSettings>()?;
    let format = inputs.options.output.format;
    if let Some(schemes) = format.default_schemes() {
        if settings.schemes == default_schemes() {
            settings.schemes = schemes;
        }
    }
    if let Some(scheme) = settings.schemes.iter().find(|s| !format.holds_scheme(**s)) {
        return Err(crate::error::Error::InvalidArgument(format!(
            "--format {format} cannot hold quantisation scheme {scheme}"
        )));
    }
    if settings.algorithm == Algorithm::Rtn {
        // The passes refine GPTQ's codes under a Gram matrix; rounding to nearest has neither,
        // and the saved settings state what ran.
        settings.refine_passes = 0;
    }
    settings.validate()?;
    Ok(Box::new(Quantise {
        settings,
        filled_in: Mutex::new(BTreeMap::new()),
    }))
}

/// Per expert, the matrices to quantise and, per matrix, the formats (with variant numbers).
type Wanted = BTreeMap<usize, Vec<(ExpertMatrix, Vec<(u64, Scheme)>)>>;

/// One expert's Gram matrices: of its inputs (gate, up) and of its intermediate activations
/// (down), `[n, n]` row-major.
struct ExpertGrams {
    input: Vec<f64>,
    intermediate: Option<Vec<f64>>,
}

impl Quantise {
    /// Expert `expert`'s Gram matrices under the settings' source.
    fn grams(
        &self,
        experts: &LayerExperts,
        inputs: &RoutedInputs,
        prior: Option<&Prior>,
        expert: usize,
        with_down: bool,
    ) -> Result<ExpertGrams> {
        let tokens = inputs.expert_tokens(expert);
        let own = match self.settings.hessian {
            HessianSource::Expert => inputs.expert_rows(expert)?.map(|(x, _)| x),
            HessianSource::Layer => None,
        };
        // The layer's rows stand for `weight` tokens each.
        let prior_weight = match (self.settings.hessian, prior) {
            (HessianSource::Layer, Some(p)) => tokens.max(1) as f64 / p.rows.dim(0)? as f64,
            (HessianSource::Expert, Some(p)) if tokens < self.settings.min_tokens => {
                (self.settings.min_tokens - tokens) as f64 / p.rows.dim(0)? as f64
            }
            _ => 0.0,
        };
        let intermediate = |x: &Tensor| -> Result<Tensor> {
            let gate = experts.matrix(expert, ExpertMatrix::Gate)?;
            let up = experts.matrix(expert, ExpertMatrix::Up)?;
            let a = x.matmul(&gate.t()?)?;
            let u = x.matmul(&up.t()?)?;
            Ok((candle_nn::ops::silu(&a)? * u)?)
        };
        let mut input = None;
        let mut inter = None;
        if let Some(rows) = own.as_ref() {
            accumulate(&mut input, &gram_product(rows)?, 1.0);
            if with_down {
                accumulate(&mut inter, &gram_product(&intermediate(rows)?)?, 1.0);
            }
        }
        if let Some(prior) = prior.filter(|_| prior_weight > 0.0) {
            let shared;
            let product = match &prior.input_gram {
                Some(g) => g,
                None => {
                    shared = gram_product(&prior.rows)?;
                    &shared
                }
            };
            accumulate(&mut input, product, prior_weight);
            if with_down {
                let product = gram_product(&intermediate(&prior.rows)?)?;
                accumulate(&mut inter, &product, prior_weight);
            }
        }
        let d = experts.layout.hidden_size;
        let p = experts.layout.intermediate_size;
        Ok(ExpertGrams {
            input: input.unwrap_or_else(|| vec![0.0; d * d]),
            intermediate: with_down.then(|| inter.unwrap_or_else(|| vec![0.0; p * p])),
        })
    }

    /// Quantises `w` [rows, cols] in `scheme` under `hessian` (None: round to nearest).
    fn quantise(
        &self,
        w: &[f32],
        rows: usize,
        hessian: &Prepared,
        scheme: Scheme,
    ) -> Result<Quantised> {
        match hessian {
            Prepared::Gptq(h) => h.quantise(w, rows, scheme),
            Prepared::Rtn(gram) => round_to_nearest_uncalibrated(
                w,
                rows,
                w.len() / rows,
                gram,
                scheme,
                &self.settings.gptq(),
            ),
        }
    }

    /// The loss of each row of `picked` of `values` (rows of `cols`) quantised in `scheme`.
    fn quantise_rows(
        &self,
        values: &[f32],
        cols: usize,
        picked: &[usize],
        hessian: &Prepared,
        scheme: Scheme,
    ) -> Result<Vec<f64>> {
        let rows = gather_rows(values, cols, picked);
        Ok(self
            .quantise(&rows, picked.len(), hessian, scheme)?
            .row_loss)
    }

    /// The schemes that can store a matrix of `cols` columns, with their variant numbers.
    fn schemes_for(&self, cols: usize) -> Vec<(u64, Scheme)> {
        self.settings
            .schemes
            .iter()
            .enumerate()
            .filter(|(_, s)| s.supports(cols))
            .map(|(i, s)| (i as u64, *s))
            .collect()
    }

    /// Runs `each` on every (expert, matrix, scheme) the layer's `wanted` slots ask for, one
    /// expert at a time per worker (its Gram matrices are the memory that matters).
    fn for_each_quantised<B: LinalgBackend, T: Send>(
        &self,
        layer: &LayerContext<B>,
        wanted: &Wanted,
        each: impl Fn(usize, ExpertMatrix, u64, &[f32], Quantised) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        self.for_each_prepared(
            layer,
            wanted,
            |_| false,
            |expert, matrix, variant, values, hessian, scheme| {
                let rows = values.len() / layer.experts.layout.shape(matrix)[1];
                each(
                    expert,
                    matrix,
                    variant,
                    values,
                    self.quantise(values, rows, hessian, scheme)?,
                )
            },
        )
    }

    /// Runs `each` on every (expert, matrix, scheme) of `wanted` with the matrix's values and
    /// its prepared Gram matrix (for estimates alone where `estimate_only` says so), one expert
    /// at a time per worker.
    fn for_each_prepared<B: LinalgBackend, T: Send>(
        &self,
        layer: &LayerContext<B>,
        wanted: &Wanted,
        estimate_only: impl Fn(usize) -> bool + Sync,
        each: impl Fn(usize, ExpertMatrix, u64, &[f32], &Prepared, Scheme) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let statistics = layer.statistics;
        let inputs = statistics.routed_inputs.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "quantise needs the layer's calibration inputs (a saved statistics cache has \
                 none)"
                    .into(),
            )
        })?;
        let prior = match prior_rows(inputs)? {
            Some(rows) => {
                let needed = self.settings.hessian == HessianSource::Layer
                    || wanted
                        .keys()
                        .any(|&e| inputs.expert_tokens(e) < self.settings.min_tokens);
                let input_gram = match needed {
                    true => Some(gram_product(&rows)?),
                    false => None,
                };
                Some(Prior { rows, input_gram })
            }
            None => None,
        };
        // Every expert the layer fills in, whichever of them this pass quantises, so that the
        // report does not depend on which candidates were asked for (a resumed run applies a
        // saved plan without offering).
        if self.settings.hessian == HessianSource::Expert && prior.is_some() {
            let filled: BTreeMap<usize, usize> = (0..layer.experts.layout.num_experts)
                .map(|e| (e, inputs.expert_tokens(e)))
                .filter(|&(_, tokens)| tokens < self.settings.min_tokens)
                .collect();
            lock(&self.filled_in)?.insert(statistics.layer, filled);
        }
        let results: Vec<Vec<T>> = wanted
            .par_iter()
            .map(|(&expert, matrices)| {
                let with_down = matrices.iter().any(|(m, _)| *m == ExpertMatrix::Down);
                let grams = self.grams(layer.experts, inputs, prior.as_ref(), expert, with_down)?;
                let mut out = Vec::new();
                let mut input_hessian = None;
                for (matrix, schemes) in matrices {
                    let gram = match matrix {
                        ExpertMatrix::Down => grams.intermediate.as_deref().unwrap_or(&[]),
                        _ => &grams.input,
                    };
                    let own;
                    let hessian = match matrix {
                        ExpertMatrix::Down => {
                            own = self.prepare(gram, estimate_only(expert))?;
                            &own
                        }
                        _ => {
                            if input_hessian.is_none() {
                                input_hessian = Some(self.prepare(gram, estimate_only(expert))?);
                            }
                            input_hessian.as_ref().ok_or_else(|| {
                                Error::InvalidArgument("input Gram matrix missing".into())
                            })?
                        }
                    };
                    let w = layer.experts.matrix(expert, *matrix)?;
                    let values = w.flatten_all()?.to_vec1::<f32>()?;
                    for &(variant, scheme) in schemes {
                        out.push(each(expert, *matrix, variant, &values, hessian, scheme)?);
                    }
                }
                Ok(out)
            })
            .collect::<Result<_>>()?;
        Ok(results.into_iter().flatten().collect())
    }

    /// The Gram matrix made ready for the settings' algorithm (GPTQ's for its estimates alone
    /// where `estimate_only`).
    fn prepare(&self, gram: &[f64], estimate_only: bool) -> Result<Prepared> {
        let cols = (gram.len() as f64).sqrt().round() as usize;
        let options = self.settings.gptq();
        Ok(match self.settings.algorithm {
            Algorithm::Gptq if estimate_only => {
                Prepared::Gptq(GptqHessian::for_estimates(gram, cols, &options)?)
            }
            Algorithm::Gptq => Prepared::Gptq(GptqHessian::new(gram, cols, &options)?),
            Algorithm::Rtn => Prepared::Rtn(gram.to_vec()),
        })
    }
}

/// A Gram matrix ready to quantise under.
enum Prepared {
    Gptq(GptqHessian),
    Rtn(Vec<f64>),
}

/// The layer's calibration inputs that fill in experts' statistics.
struct Prior {
    /// Up to [`PRIOR_ROWS`] of the layer's inputs.
    rows: Tensor,
    /// `rowsᵀ·rows` (f32, row-major) when experts will need it: the same for every expert of
    /// the layer, so it is multiplied once rather than per expert.
    input_gram: Option<Vec<f32>>,
}

/// `rowsᵀ·rows` in f32, row-major.
fn gram_product(rows: &Tensor) -> Result<Vec<f32>> {
    let rows = rows.to_dtype(DType::F32)?;
    let product = rows.t()?.matmul(&rows)?;
    Ok(product.flatten_all()?.to_vec1::<f32>()?)
}

/// Adds `weight · product` to `gram` (created on first use).
fn accumulate(gram: &mut Option<Vec<f64>>, product: &[f32], weight: f64) {
    match gram {
        Some(g) => g
            .iter_mut()
            .zip(product)
            .for_each(|(g, &v)| *g += weight * v as f64),
        None => *gram = Some(product.iter().map(|&v| weight * v as f64).collect()),
    }
}

/// Up to [`PRIOR_ROWS`] of the layer's calibration inputs, evenly spaced.
fn prior_rows(inputs: &RoutedInputs) -> Result<Option<Tensor>> {
    let Some(all) = inputs.all_rows()? else {
        return Ok(None);
    };
    let n = all.dim(0)?;
    if n <= PRIOR_ROWS {
        return Ok(Some(all));
    }
    let index: Vec<u32> = (0..PRIOR_ROWS)
        .map(|i| (i * n / PRIOR_ROWS) as u32)
        .collect();
    let index = Tensor::from_vec(index, PRIOR_ROWS, &Device::Cpu)?;
    Ok(Some(all.index_select(&index, 0)?))
}

fn lock<T>(mutex: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| Error::InvalidArgument("a worker thread panicked".into()))
}

/// `Σ weights[r]·loss` over rows `picked`, one loss per picked row: the output error of those
/// rows, each weighted by how its error reaches the layer's output.
fn weighted_rows(weights: &[f64], picked: &[usize], loss: impl IntoIterator<Item = f64>) -> f64 {
    picked.iter().zip(loss).map(|(&r, l)| weights[r] * l).sum()
}

/// Rows `picked` of `values` (rows of `cols`), borrowed where they are every row.
fn gather_rows<'a>(values: &'a [f32], cols: usize, picked: &[usize]) -> Cow<'a, [f32]> {
    if picked.len() * cols == values.len() {
        debug_assert!(picked.iter().enumerate().all(|(i, &r)| i == r));
        return Cow::Borrowed(values);
    }
    picked
        .iter()
        .flat_map(|&r| &values[r * cols..(r + 1) * cols])
        .copied()
        .collect()
}

/// How a matrix's weighted sum over its sampled rows stands for the sum over every row.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RowCoverage {
    /// Times this ratio: the share of the rows' weighted energy the sampled rows hold, since a
    /// row's rounding loss grows with its energy (1 exactly when every row is sampled).
    Scaled(f64),
    /// Not at all: the sampled rows hold no energy and others do, so every row is estimated.
    EveryRow,
}

impl RowCoverage {
    /// The coverage of rows `sampled` of a matrix with row `weights` and, per row, `energy`.
    fn of(weights: &[f64], sampled: &[usize], energy: impl FnOnce() -> Vec<f64>) -> Self {
        if sampled.len() == weights.len() {
            return RowCoverage::Scaled(1.0);
        }
        let energy = energy();
        let whole: f64 = weights.iter().zip(&energy).map(|(w, e)| w * e).sum();
        let part: f64 = sampled.iter().map(|&r| weights[r] * energy[r]).sum();
        match (part > 0.0, whole > 0.0) {
            (true, _) => RowCoverage::Scaled(whole / part),
            (false, true) => RowCoverage::EveryRow,
            // No row holds energy: every loss is zero, however it is scaled.
            (false, false) => RowCoverage::Scaled(1.0),
        }
    }
}

/// The experts quantised exactly in every format under [`CandidateErrors::Sampled`]: evenly
/// spaced over the layer.
fn sampled_experts(experts: usize) -> Vec<usize> {
    let k = SAMPLED_EXPERTS.min(experts);
    (0..k).map(|i| (2 * i + 1) * experts / (2 * k)).collect()
}

/// How much of an expert matrix the offer quantises by GPTQ to measure its error exactly.
#[derive(Clone, Copy, PartialEq)]
enum Exactly {
    /// Every row: the candidate's error is exact.
    Every,
    /// [`sampled_rows`]: GPTQ quantises rows independently under one factor, so their error is
    /// exact for those rows and scales the estimates of the same matrix and format.
    Sample,
    /// None: the candidate's error is its estimate, scaled.
    None,
}

/// Rows of a matrix its candidates' errors are estimated on (scaled to the whole by the rows'
/// energy), and quantised by GPTQ on a sampled expert to scale the estimates of its format.
pub const SAMPLED_ROWS: usize = 256;

/// Up to [`SAMPLED_ROWS`] of `rows`, evenly spaced.
fn sampled_rows(rows: usize) -> Vec<usize> {
    let k = SAMPLED_ROWS.min(rows);
    (0..k).map(|i| (2 * i + 1) * rows / (2 * k)).collect()
}

/// One candidate as its offer measured it.
struct Measured {
    /// Its error: exact where GPTQ quantised every row, else NaN.
    candidate: Candidate,
    /// The rounding estimate of its error over every row (from [`sampled_rows`]).
    estimate: Option<f64>,
    /// GPTQ's error and the estimate over the same rows, where GPTQ ran.
    sample: Option<(f64, f64)>,
}

/// The candidates with the error of each one that was only estimated (error NaN) filled in:
/// its estimate times Σ exact / Σ estimate over the samples of the same matrix and format.
fn scale_estimates(measured: Vec<Measured>) -> Vec<Candidate> {
    let key = |c: &Candidate| match c.unit {
        Unit::Slot { matrix, .. } => Some((matrix, c.variant)),
        _ => None,
    };
    let mut sums: BTreeMap<(ExpertMatrix, u64), (f64, f64)> = BTreeMap::new();
    for m in &measured {
        if let (Some(k), Some((exact, estimate))) = (key(&m.candidate), m.sample) {
            let sum = sums.entry(k).or_default();
            sum.0 += exact;
            sum.1 += estimate;
        }
    }
    measured
        .into_iter()
        .map(|m| {
            let mut c = m.candidate;
            if let (Some(k), Some(estimate), true) = (key(&c), m.estimate, c.error.is_nan()) {
                let scale = match sums.get(&k) {
                    Some(&(exact, est)) if est > 0.0 => exact / est,
                    _ => 1.0,
                };
                c.error = estimate * scale;
            }
            c
        })
        .collect()
}

impl<B: LinalgBackend> Method<B> for Quantise {
    fn name(&self) -> &'static str {
        NAME
    }

    fn needs(&self) -> Needs {
        Needs {
            expert_statistics: true,
            routed_inputs: true,
            ..Needs::default()
        }
    }

    fn offer(&self, layer: &LayerContext<B>) -> Result<Vec<Candidate>> {
        let layout = layer.experts.layout;
        let mut wanted = Wanted::new();
        for expert in 0..layout.num_experts {
            for &matrix in layer.matrices {
                let [_, cols] = layout.shape(matrix);
                let schemes = self.schemes_for(cols);
                if !schemes.is_empty() {
                    wanted.entry(expert).or_default().push((matrix, schemes));
                }
            }
        }
        let statistics = layer.statistics;
        let sampled = sampled_experts(layout.num_experts);
        let exact_for = |expert: usize| match (self.settings.errors, self.settings.algorithm) {
            (CandidateErrors::Gptq, _) | (_, Algorithm::Rtn) => Exactly::Every,
            (CandidateErrors::Sampled, Algorithm::Gptq) if sampled.contains(&expert) => {
                Exactly::Sample
            }
            (CandidateErrors::Sampled, Algorithm::Gptq) => Exactly::None,
        };
        // Per (expert, matrix): how its sampled rows stand for all of them, the same for
        // every format.
        let coverages: Mutex<BTreeMap<(usize, ExpertMatrix), RowCoverage>> = Mutex::default();
        // Per (expert, matrix, format): the exact error where it was measured on every row,
        // the estimate, and both over a sample of rows.
        let errors = self.for_each_prepared(
            layer,
            &wanted,
            |expert| exact_for(expert) == Exactly::None,
            |expert, matrix, variant, values, hessian, scheme| {
                let [rows, cols] = layout.shape(matrix);
                let weights = statistics.error_weights(matrix, expert).ok_or_else(|| {
                    Error::InvalidArgument("quantise needs the experts' statistics".into())
                })?;
                // The rows every estimate covers, and a sampled expert's GPTQ with them.
                let sampled = sampled_rows(rows);
                // (over the sampled rows, over every row)
                let estimate = match (hessian, self.settings.errors) {
                    (Prepared::Gptq(h), CandidateErrors::Sampled) => {
                        let loss = h.estimate_row_loss(
                            &gather_rows(values, cols, &sampled),
                            sampled.len(),
                            scheme,
                        )?;
                        let part = weighted_rows(&weights.rows, &sampled, loss);
                        // Looked up in a statement of its own: the guard must be released
                        // before the insert takes the lock again.
                        let cached = lock(&coverages)?.get(&(expert, matrix)).copied();
                        let coverage = match cached {
                            Some(coverage) => coverage,
                            None => {
                                let coverage = RowCoverage::of(&weights.rows, &sampled, || {
                                    h.row_energy(values)
                                });
                                lock(&coverages)?.insert((expert, matrix), coverage);
                                coverage
                            }
                        };
                        let whole = match coverage {
                            RowCoverage::Scaled(ratio) => part * ratio,
                            RowCoverage::EveryRow => {
                                let loss = h.estimate_row_loss(values, rows, scheme)?;
                                weights.rows.iter().zip(loss).map(|(w, l)| w * l).sum()
                            }
                        };
                        Some((part, whole))
                    }
                    _ => None,
                };
                let picked = match exact_for(expert) {
                    Exactly::Every => Some((0..rows).collect::<Vec<_>>()),
                    Exactly::Sample => Some(sampled.clone()),
                    Exactly::None => None,
                };
                let (exact, sample) = match picked {
                    None => (None, None),
                    Some(picked) => {
                        let loss = self.quantise_rows(values, cols, &picked, hessian, scheme)?;
                        let exact = weighted_rows(&weights.rows, &picked, loss);
                        let sample = estimate
                            .filter(|_| picked == sampled)
                            .map(|(part, _)| (exact, part));
                        ((picked.len() == rows).then_some(exact), sample)
                    }
                };
                let estimate = estimate.map(|(_, whole)| whole);
                let candidate = Candidate {
                    method: NAME.into(),
                    unit: Unit::Slot { matrix, expert },
                    variant,
                    label: scheme.name(),
                    bytes: scheme.stored_bytes(rows, cols),
                    parameters: (rows * cols) as u64,
                    error: exact.unwrap_or(f64::NAN),
                    signals: None,
                };
                Ok(Measured {
                    candidate,
                    estimate,
                    sample,
                })
            },
        )?;
        Ok(scale_estimates(errors))
    }

    fn apply(&self, layer: &LayerContext<B>, chosen: &[Candidate]) -> Result<Vec<UnitOutput>> {
        let mut wanted = Wanted::new();
        for candidate in chosen {
            let Unit::Slot { matrix, expert } = candidate.unit else {
                return Err(Error::InvalidArgument(format!(
                    "quantise offers expert matrices, not {:?}",
                    candidate.unit
                )));
            };
            let scheme = usize::try_from(candidate.variant)
                .ok()
                .and_then(|i| self.settings.schemes.get(i))
                .copied()
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "quantise has no format number {} ({} offered)",
                        candidate.variant,
                        self.settings.schemes.len()
                    ))
                })?;
            wanted
                .entry(expert)
                .or_default()
                .push((matrix, vec![(candidate.variant, scheme)]));
        }
        let layout = layer.experts.layout;
        self.for_each_quantised(layer, &wanted, |expert, matrix, _, _, q| {
            let name = packed_name(&layout.dense_name(expert, matrix), q.scheme);
            let row_bytes = q.scheme.row_bytes(q.cols);
            let mut tensors = StoredTensors::default();
            let reconstruction = match layer.export_dense {
                true => {
                    vec![
                        Tensor::from_vec(q.dequantised.clone(), (q.rows, q.cols), &Device::Cpu)?
                            .to_dtype(layer.stored_dtype)?,
                    ]
                }
                false => Vec::new(),
            };
            tensors.insert(
                name,
                Tensor::from_vec(q.bytes, (q.rows, row_bytes), &Device::Cpu)?,
            );
            Ok(UnitOutput {
                unit: Unit::Slot { matrix, expert },
                tensors,
                reconstruction,
                rank: 0,
                residual_size: 0,
                storage: q.scheme.name(),
                as_stored: false,
                report: None,
            })
        })
    }

    fn resolved_settings(&self) -> Option<serde_json::Value> {
        serde_json::to_value(&self.settings).ok()
    }

    fn describe_layer(&self, layer: usize, report: &mut LayerReport) {
        if let Ok(mut filled) = lock(&self.filled_in) {
            let experts = filled.remove(&layer).unwrap_or_default();
            report.quantisation = Some(LayerQuantisation {
                hessian: self.settings.hessian.to_string(),
                filled_in: experts.into_iter().collect(),
                min_tokens: self.settings.min_tokens,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(matrix: ExpertMatrix, expert: usize, variant: u64, error: f64) -> Candidate {
        Candidate {
            method: NAME.into(),
            unit: Unit::Slot { matrix, expert },
            variant,
            label: String::new(),
            bytes: 1,
            parameters: 1,
            error,
            signals: None,
        }
    }

    #[test]
    fn sampled_experts_are_spread_over_the_layer() {
        assert_eq!(sampled_experts(128), vec![16, 48, 80, 112]);
        assert_eq!(sampled_experts(16), vec![2, 6, 10, 14]);
        assert_eq!(sampled_experts(3), vec![0, 1, 2]);
    }

    #[test]
    fn estimates_are_scaled_by_the_exact_share_of_their_matrix_and_format() {
        use ExpertMatrix::{Down, Gate};
        let measured = |c, estimate: f64, sample: Option<(f64, f64)>| Measured {
            candidate: c,
            estimate: Some(estimate),
            sample,
        };
        let scaled = scale_estimates(vec![
            // Gate, format 0: exact 3 against estimate 2 over every row: scale 1.5.
            measured(candidate(Gate, 0, 0, 3.0), 2.0, Some((3.0, 2.0))),
            measured(candidate(Gate, 1, 0, f64::NAN), 4.0, None),
            // Gate, format 1: exact 1 against estimate 2 on a sample of rows: scale 0.5, and
            // the sampled expert's own error is its scaled estimate.
            measured(candidate(Gate, 0, 1, f64::NAN), 4.0, Some((1.0, 2.0))),
            measured(candidate(Gate, 1, 1, f64::NAN), 8.0, None),
            // Down, format 0: its own scale.
            measured(candidate(Down, 0, 0, 5.0), 5.0, Some((5.0, 5.0))),
            measured(candidate(Down, 1, 0, f64::NAN), 7.0, None),
        ]);
        let errors: Vec<f64> = scaled.iter().map(|c| c.error).collect();
        assert_eq!(errors, vec![3.0, 6.0, 2.0, 4.0, 5.0, 7.0]);
    }

    #[test]
    fn sampled_rows_stand_for_every_row_by_their_share_of_energy() {
        let weights = [1.0, 2.0, 3.0];
        let energy = || panic!("not needed when every row was sampled");
        assert_eq!(
            RowCoverage::of(&weights, &[0, 1, 2], energy),
            RowCoverage::Scaled(1.0)
        );
        // Rows 0 and 2 hold 1·1 + 3·3 = 10 of the 1·1 + 2·5 + 3·3 = 20 of weighted energy.
        let coverage = RowCoverage::of(&weights, &[0, 2], || vec![1.0, 5.0, 3.0]);
        assert_eq!(coverage, RowCoverage::Scaled(2.0));
        // Sampled rows of no energy cannot stand for rows that have some.
        let coverage = RowCoverage::of(&weights, &[0], || vec![0.0, 5.0, 3.0]);
        assert_eq!(coverage, RowCoverage::EveryRow);
    }

    #[test]
    fn estimates_from_sampled_rows_match_the_estimate_over_every_row() {
        // Rows of very different scales, as a down_proj's output rows are, and a Gram matrix
        // whose columns matter unequally.
        let mut rng = crate::linalg::tests::TestRng::new(17);
        let (rows, cols) = (1536, 256);
        let x = rng.matrix(4 * cols, cols);
        let mut gram = vec![0.0; cols * cols];
        for i in 0..cols {
            for j in 0..cols {
                let scale = (1.0 + i as f64 / 16.0) * (1.0 + j as f64 / 16.0);
                gram[i * cols + j] =
                    scale * (0..x.nrows()).map(|t| x[(t, i)] * x[(t, j)]).sum::<f64>();
            }
        }
        let h = GptqHessian::new(&gram, cols, &GptqOptions::default()).unwrap();
        let values: Vec<f32> = (0..rows * cols)
            .map(|k| {
                let row_scale = if (k / cols) % 97 == 5 {
                    20.0
                } else {
                    1.0 + (k / cols % 7) as f64
                };
                (rng.normal() * row_scale) as f32
            })
            .collect();
        let weights: Vec<f64> = (0..rows).map(|r| 0.5 + (r % 5) as f64).collect();
        let sampled = sampled_rows(rows);
        assert!(sampled.len() < rows);
        for scheme in ["int2-g64-asym", "int4-g128-asym", "q4_k"] {
            let scheme = Scheme::parse(scheme).unwrap();
            assert!(scheme.supports(cols));
            let every = h.estimate_row_loss(&values, rows, scheme).unwrap();
            let all: Vec<usize> = (0..rows).collect();
            let exact = weighted_rows(&weights, &all, every.iter().copied());
            // A row's estimate does not depend on the rows beside it.
            let gathered = gather_rows(&values, cols, &sampled);
            let loss = h
                .estimate_row_loss(&gathered, sampled.len(), scheme)
                .unwrap();
            let same: Vec<f64> = sampled.iter().map(|&r| every[r]).collect();
            assert_eq!(loss, same);
            let part = weighted_rows(&weights, &sampled, loss);
            let RowCoverage::Scaled(ratio) =
                RowCoverage::of(&weights, &sampled, || h.row_energy(&values))
            else {
                panic!("the sampled rows hold energy");
            };
            let whole = part * ratio;
            assert!(
                (whole / exact - 1.0).abs() < 0.05,
                "{}: {whole} from the sample against {exact}",
                scheme.name()
            );
        }
    }

    #[test]
    fn sampled_rows_are_spread_over_the_matrix() {
        assert_eq!(sampled_rows(100), (0..100).collect::<Vec<_>>());
        let rows = sampled_rows(2048);
        assert_eq!(rows.len(), SAMPLED_ROWS);
        assert_eq!((rows[0], rows[255]), (4, 2044));
        assert!(rows.windows(2).all(|w| w[1] - w[0] == 8));
    }
}
