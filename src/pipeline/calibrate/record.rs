//! The observers the calibrate stage hangs on a MoE layer during its forward passes: one that
//! keeps each batch's MoE input and routing (and, when asked, each expert's intermediate Gram
//! matrix and REAP saliency), and one that keeps the held-out windows' inputs and routing.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::linalg::LinalgBackend;
use crate::models::moe::{MoeObserver, MoeTrace};

/// One calibration batch's MoE input and the tokens routed to each expert, kept until the
/// layer's routing is complete (the groups, and so the Gram matrices, depend on every batch).
#[derive(Clone)]
pub(crate) struct RoutedBatch {
    /// Tokens in the batch.
    pub tokens: usize,
    /// The MoE input [tokens, hidden], kept only when statistics need it.
    pub input: Option<Tensor>,
    /// Per expert, the batch's token rows routed to it and their routing weights.
    pub routes: Vec<(Vec<u32>, Vec<f32>)>,
}

/// Per expert, the sum of `g_j(x)·‖f_j(x)‖₂` and the number of routed tokens (REAP), and the
/// energy `Σ ‖w_j(x)·f_j(x)‖²` its weighted output adds to the layer's (`w_j` the routing weight
/// the layer combines with): the output error of removing it.
#[derive(Debug, Clone)]
pub struct SaliencyAccumulator {
    weighted_norms: Vec<f64>,
    routed: Vec<u64>,
    output_energy: Vec<f64>,
}

impl SaliencyAccumulator {
    /// An empty accumulator for `num_experts` experts.
    pub fn new(num_experts: usize) -> Self {
        Self {
            weighted_norms: vec![0.0; num_experts],
            routed: vec![0; num_experts],
            output_energy: vec![0.0; num_experts],
        }
    }

    /// Adds one forward pass: `outputs[j]` is expert j's unweighted output on its routed tokens.
    pub fn add(&mut self, trace: &MoeTrace, outputs: &[Option<Tensor>]) -> Result<()> {
        let gates = trace.rule.gate_scores(&trace.routing.logits)?;
        for (expert, output) in outputs.iter().enumerate() {
            let (Some(output), Some(route)) = (output, trace.dispatch.route(expert)) else {
                continue;
            };
            let squared = output.to_dtype(DType::F32)?.sqr()?.sum_keepdim(1)?;
            let weights = route.weights.to_dtype(DType::F32)?.reshape(((), 1))?;
            let energy: f32 = (&squared * weights.sqr()?)?.sum_all()?.to_scalar()?;
            let norms = squared.sqrt()?;
            let gate = gates.index_select(&route.tokens, 0)?.narrow(1, expert, 1)?;
            let sum: f32 = (norms * gate)?.sum_all()?.to_scalar()?;
            self.output_energy[expert] += f64::from(energy);
            let slot = self.weighted_norms.get_mut(expert).ok_or_else(|| {
                Error::InvalidArgument(format!("expert {expert} outside the saliency table"))
            })?;
            *slot += sum as f64;
            self.routed[expert] += route.count as u64;
        }
        Ok(())
    }

    /// Per expert, `Σ ‖w_j(x)·f_j(x)‖²` over its routed tokens.
    pub fn output_energy(&self) -> Vec<f64> {
        self.output_energy.clone()
    }

    /// `S_j`: the mean over routed tokens (0 for experts without tokens).
    pub fn saliency(&self) -> Vec<f64> {
        self.weighted_norms
            .iter()
            .zip(&self.routed)
            .map(|(&sum, &n)| if n == 0 { 0.0 } else { sum / n as f64 })
            .collect()
    }
}

/// Per-expert Σ h hᵀ of the intermediate activations (the input of `down_proj`).
pub(crate) struct DownGram<'b, B: LinalgBackend> {
    backend: &'b B,
    pub grams: Vec<B::Matrix>,
}

impl<'b, B: LinalgBackend> DownGram<'b, B> {
    pub fn new(backend: &'b B, num_experts: usize, intermediate: usize) -> Result<Self> {
        let grams = (0..num_experts)
            .map(|_| backend.zeros(intermediate, intermediate))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { backend, grams })
    }

    /// Adds each expert's intermediate rows [count, p] (`None`: no token routed to it).
    fn add(&mut self, intermediates: &[Option<Tensor>]) -> Result<()> {
        if intermediates.len() != self.grams.len() {
            return Err(Error::InvalidArgument(format!(
                "{} experts' intermediate activations for {} down_proj Gram matrices",
                intermediates.len(),
                self.grams.len()
            )));
        }
        for (gram, rows) in self.grams.iter_mut().zip(intermediates) {
            if let Some(rows) = rows {
                self.backend
                    .accumulate_gram(gram, &rows.to_dtype(DType::F32)?)?;
            }
        }
        Ok(())
    }
}

/// Records each batch's MoE input and routing during a layer's forward passes.
pub(crate) struct RoutingRecorder<'b, B: LinalgBackend> {
    pub num_experts: usize,
    pub keep_inputs: bool,
    pub batches: Vec<RoutedBatch>,
    /// REAP sums, when a method asked for saliency.
    pub saliency: Option<SaliencyAccumulator>,
    /// Per-expert intermediate Gram matrices, accumulated batch by batch, when asked for.
    pub down_gram: Option<DownGram<'b, B>>,
}

impl<B: LinalgBackend> MoeObserver for RoutingRecorder<'_, B> {
    fn observe(&mut self, trace: &MoeTrace) -> Result<()> {
        let routes = trace.routing.tokens_per_expert(self.num_experts)?;
        self.batches.push(RoutedBatch {
            tokens: trace.input.dim(0)?,
            input: self.keep_inputs.then(|| trace.input.clone()),
            routes,
        });
        Ok(())
    }

    fn wants_expert_outputs(&self) -> bool {
        self.saliency.is_some()
    }

    fn wants_expert_intermediates(&self) -> bool {
        self.down_gram.is_some()
    }

    fn observe_expert_intermediates(
        &mut self,
        _trace: &MoeTrace,
        intermediates: &[Option<Tensor>],
    ) -> Result<()> {
        match self.down_gram.as_mut() {
            Some(down) => down.add(intermediates),
            None => Ok(()),
        }
    }

    fn observe_expert_outputs(
        &mut self,
        trace: &MoeTrace,
        outputs: &[Option<Tensor>],
    ) -> Result<()> {
        match self.saliency.as_mut() {
            Some(saliency) => saliency.add(trace, outputs),
            None => Ok(()),
        }
    }
}

/// The held-out tokens routed to one expert, with their routing weights.
#[derive(Debug, Clone, Default)]
pub struct ExpertRoutes {
    /// Row indices into [`HeldOutActivations::inputs`].
    pub tokens: Vec<u32>,
    /// The routing weight of each of those tokens for this expert.
    pub weights: Vec<f32>,
}

/// One MoE layer's inputs and routing on the held-out windows.
#[derive(Debug, Clone)]
pub struct HeldOutActivations {
    /// The MoE block's input [tokens, hidden] (f32, CPU).
    pub inputs: Tensor,
    /// Per expert, the tokens routed to it.
    pub routes: Vec<ExpertRoutes>,
    /// Per token, the squared norm of the layer's output (the residual stream the MoE output
    /// is added to).
    pub residual_norms: Vec<f32>,
}

impl HeldOutActivations {
    /// Number of held-out tokens.
    pub fn tokens(&self) -> usize {
        self.inputs.dims().first().copied().unwrap_or(0)
    }
}

/// Records the MoE input and routing of each held-out batch of a layer.
pub struct HeldOutRecorder {
    routes: Vec<ExpertRoutes>,
    inputs: Vec<Tensor>,
    tokens: usize,
    residual_norms: Vec<f32>,
}

impl HeldOutRecorder {
    /// A recorder for a layer of `num_experts` routed experts.
    pub fn new(num_experts: usize) -> Self {
        Self {
            routes: vec![ExpertRoutes::default(); num_experts],
            inputs: Vec::new(),
            tokens: 0,
            residual_norms: Vec::new(),
        }
    }

    /// Records the squared norm of each token of a held-out batch's layer output
    /// [batch, seq, hidden] (after the batch went through the layer).
    pub fn record_layer_output(&mut self, output: &Tensor) -> Result<()> {
        self.residual_norms.extend(token_energies(output)?);
        Ok(())
    }

    /// The recorded batches as one set of activations (`None` if nothing was recorded).
    pub fn finish(self) -> Result<Option<HeldOutActivations>> {
        if self.inputs.is_empty() {
            return Ok(None);
        }
        let inputs = Tensor::cat(&self.inputs, 0)?;
        if self.residual_norms.len() != inputs.dim(0)? {
            return Err(Error::InvalidArgument(format!(
                "held-out activations: {} layer-output norms for {} tokens",
                self.residual_norms.len(),
                inputs.dim(0)?
            )));
        }
        Ok(Some(HeldOutActivations {
            inputs,
            routes: self.routes,
            residual_norms: self.residual_norms,
        }))
    }
}

impl MoeObserver for HeldOutRecorder {
    fn observe(&mut self, trace: &MoeTrace) -> Result<()> {
        let offset = self.tokens as u32;
        let per_expert = trace.routing.tokens_per_expert(self.routes.len())?;
        for (routes, (tokens, weights)) in self.routes.iter_mut().zip(per_expert) {
            routes.tokens.extend(tokens.iter().map(|t| t + offset));
            routes.weights.extend(weights);
        }
        let input = trace.input.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        self.tokens += input.dim(0)?;
        self.inputs.push(input);
        Ok(())
    }
}

/// The squared norm of every token of a layer output [batch, seq, hidden].
pub(crate) fn token_energies(output: &Tensor) -> Result<Vec<f32>> {
    let hidden = output.dims().last().copied().unwrap_or(0);
    Ok(output
        .to_dtype(DType::F32)?
        .reshape(((), hidden))?
        .sqr()?
        .sum(1)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?)
}
