//! The sparse MoE block: a router that picks experts per token (`routing`), the routed experts
//! in their runtime form (`experts`), and optional shared experts. Architecture files only choose
//! the routing rule and the weight names.

use candle_core::Tensor;

use super::common::{GatedMlp, Linear};
pub use super::experts::{combine_outputs, ExpertsForm, RoutedExperts};
pub use super::routing::{ExpertDispatch, Router, Routing, RoutingRule};
use crate::checkpoint::experts::ExpertMatrix;
use crate::error::Result;

/// Shared experts that every token goes through, optionally scaled by a sigmoid gate (Qwen2-MoE).
#[derive(Debug, Clone)]
pub struct SharedExpert {
    /// The MLP.
    pub mlp: GatedMlp,
    /// Optional gate, [1, hidden].
    pub gate: Option<Linear>,
}

/// What a MoE layer saw and decided, handed to an observer (calibration statistics).
pub struct MoeTrace<'a> {
    /// Decoder layer index.
    pub layer: usize,
    /// The layer's MoE input, [tokens, hidden].
    pub input: &'a Tensor,
    /// The routing decision.
    pub routing: &'a Routing,
    /// The same decision split per expert (token indices and weights on the device).
    pub dispatch: &'a ExpertDispatch,
    /// The rule that turned the router logits into the decision.
    pub rule: &'a RoutingRule,
}

/// Receives each MoE layer's input and routing during a forward pass.
pub trait MoeObserver {
    /// Called once per MoE layer per forward pass.
    fn observe(&mut self, trace: &MoeTrace) -> Result<()>;

    /// Whether [`Self::observe_expert_outputs`] is wanted (the block then computes each
    /// expert's output separately before combining them, at no extra cost).
    fn wants_expert_outputs(&self) -> bool {
        false
    }

    /// Called after [`Self::observe`] with each expert's unweighted output on its routed tokens
    /// (`None` for experts without tokens), when [`Self::wants_expert_outputs`] says so.
    fn observe_expert_outputs(
        &mut self,
        _trace: &MoeTrace,
        _outputs: &[Option<Tensor>],
    ) -> Result<()> {
        Ok(())
    }

    /// Whether [`Self::observe_expert_intermediates`] is wanted (the block then computes each
    /// expert's intermediate activation separately before its `down_proj`, at no extra cost).
    fn wants_expert_intermediates(&self) -> bool {
        false
    }

    /// Called after [`Self::observe`] with each expert's intermediate activation
    /// `act(gate·x) ⊙ (up·x)` on its routed tokens ([count, p], `None` for experts without
    /// tokens), when [`Self::wants_expert_intermediates`] says so.
    fn observe_expert_intermediates(
        &mut self,
        _trace: &MoeTrace,
        _intermediates: &[Option<Tensor>],
    ) -> Result<()> {
        Ok(())
    }
}

/// A sparse MoE feed-forward block.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// The router.
    pub router: Router,
    /// Routed experts.
    pub experts: RoutedExperts,
    /// Optional shared experts.
    pub shared: Option<SharedExpert>,
}

impl MoeBlock {
    /// The effective dense matrix [out, in] of `matrix` for routed expert `expert`.
    pub fn dense_matrix(&self, expert: usize, matrix: ExpertMatrix) -> Result<Tensor> {
        self.experts.dense_matrix(expert, matrix)
    }

    /// Runs the block on `x` [batch, seq, hidden]; returns the output and the router logits
    /// [batch*seq, experts].
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        observer: Option<&mut dyn MoeObserver>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, s, h) = x.dims3()?;
        let flat = x.reshape((b * s, h))?;
        let routing = self.router.route(&flat)?;
        let fused = match observer {
            // An observer needs the per-expert dispatch, which the fused kernel never builds.
            Some(_) => None,
            None => self.experts.forward_fused(&flat, &routing)?,
        };
        let mut out = match fused {
            Some(out) => out,
            None => {
                let dispatch = ExpertDispatch::new(&routing, self.experts.len())?;
                match observer {
                    Some(observer) => {
                        let trace = MoeTrace {
                            layer,
                            input: &flat,
                            routing: &routing,
                            dispatch: &dispatch,
                            rule: &self.router.rule,
                        };
                        observer.observe(&trace)?;
                        let wants_outputs = observer.wants_expert_outputs();
                        if wants_outputs || observer.wants_expert_intermediates() {
                            let hidden = self.experts.expert_intermediates(&flat, &dispatch)?;
                            observer.observe_expert_intermediates(&trace, &hidden)?;
                            let outputs = self.experts.down_outputs(hidden)?;
                            if wants_outputs {
                                observer.observe_expert_outputs(&trace, &outputs)?;
                            }
                            combine_outputs(&flat, outputs, &dispatch)?
                        } else {
                            self.experts.forward(&flat, &dispatch)?
                        }
                    }
                    None => self.experts.forward(&flat, &dispatch)?,
                }
            }
        };
        if let Some(shared) = &self.shared {
            let mut y = shared.mlp.forward(&flat)?;
            if let Some(gate) = &shared.gate {
                let g = candle_nn::ops::sigmoid(&gate.forward(&flat)?)?;
                y = y.broadcast_mul(&g)?;
            }
            out = (out + y)?;
        }
        Ok((out.reshape((b, s, h))?, routing.logits))
    }
}
