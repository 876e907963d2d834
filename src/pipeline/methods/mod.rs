//! Compression methods as plug-ins. Each method is one module behind [`Method`]: it owns its
//! settings (`[settings.NAME]`), says what calibration must collect for it ([`Needs`]), offers
//! candidates for a layer's units (what each stores, its bytes and its estimated error), and
//! turns the candidates the solver chose into stored tensors. The driver and the emitter name
//! no method; [`Registry::builtin`] lists them, one line each.
//!
//! Adding a method: a module with a type implementing [`Method`] (and, if it has settings, a
//! [`MethodSettings`](super::options::MethodSettings) type), one `register` line in
//! [`Registry::builtin`], and a test that the solver chooses it where it should.

pub mod int8;
pub mod keep;
pub mod lowrank;
pub mod prune;
pub mod quantise;

use candle_core::DType;

use super::calibrate::{HeldOutActivations, LayerStatistics};
use super::experts::LayerExperts;
use super::options::CompressOptions;
use super::plan::{Candidate, LayerOffer, LayerTarget, UnitOutput};
use super::report::{LayerPruning, LayerReport};
use crate::checkpoint::experts::ExpertMatrix;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::format::CompressionRecord;
use crate::linalg::LinalgBackend;

/// What calibration must collect for a method.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Needs {
    /// Each group's input Gram matrix (d×d).
    pub group_gram: bool,
    /// Each expert's intermediate Gram matrix (p×p, the input of `down_proj`).
    pub down_gram: bool,
    /// Each expert's routing weights and output sensitivities (the error estimates).
    pub expert_statistics: bool,
    /// Each expert's REAP saliency (its outputs on the calibration tokens).
    pub saliency: bool,
    /// The layer's calibration inputs and their routing themselves (for statistics a method
    /// computes one expert at a time).
    pub routed_inputs: bool,
    /// The fraction of the calibration windows held out from every statistic, whose MoE inputs
    /// are kept for measuring candidates.
    pub held_out: Option<f64>,
}

impl Needs {
    /// What either `self` or `other` needs.
    pub fn union(self, other: Needs) -> Needs {
        Needs {
            group_gram: self.group_gram || other.group_gram,
            down_gram: self.down_gram || other.down_gram,
            expert_statistics: self.expert_statistics || other.expert_statistics,
            saliency: self.saliency || other.saliency,
            routed_inputs: self.routed_inputs || other.routed_inputs,
            held_out: self.held_out.or(other.held_out),
        }
    }
}

/// A calibrated layer before any expert is removed: what a removal method decides from.
#[derive(Debug, Clone, Copy)]
pub struct ObservedLayer<'a> {
    /// Decoder layer index.
    pub layer: usize,
    /// Top-k hits per expert.
    pub routing_counts: &'a [u64],
    /// REAP saliency per expert (when a method asked for it).
    pub saliency: Option<&'a [f64]>,
    /// Per expert, the energy its weighted output adds to the layer's (with the saliency).
    pub expert_output_energy: Option<&'a [f64]>,
    /// `Σ ‖y‖²` of the layer's output over the calibration tokens.
    pub output_energy: f64,
}

/// One layer as the methods see it once its experts are final.
pub struct LayerContext<'a, B: LinalgBackend> {
    /// The linear-algebra backend.
    pub backend: &'a B,
    /// The input checkpoint.
    pub checkpoint: &'a Checkpoint,
    /// The layer's experts (after removal, numbered `0..n'`).
    pub experts: &'a LayerExperts<'a>,
    /// The layer's calibration statistics (over the same experts).
    pub statistics: &'a LayerStatistics<B::Matrix>,
    /// The matrices under the budget.
    pub matrices: &'a [ExpertMatrix],
    /// The held-out windows' activations, when a method asked for them.
    pub held_out: Option<&'a HeldOutActivations>,
    /// The float dtype dense matrices are written in (the checkpoint's).
    pub stored_dtype: DType,
    /// The layer's share of the budget.
    pub target: LayerTarget,
    /// Whether the run also writes a dense export (apply then returns reconstructions).
    pub export_dense: bool,
}

/// A compression method (see the module documentation).
pub trait Method<B: LinalgBackend>: Send + Sync {
    /// The registry name (`--methods`, saved settings, plans).
    fn name(&self) -> &'static str;

    /// What calibration must collect for it.
    fn needs(&self) -> Needs {
        Needs::default()
    }

    /// The experts it removes from a layer, decided before any candidate is offered (removal
    /// changes the experts every other method sees). At most one enabled method removes.
    fn remove(&self, _layer: &ObservedLayer) -> Result<Option<LayerPruning>> {
        Ok(None)
    }

    /// Its candidates for the layer's units (errors over the calibration tokens, in output
    /// energy; the driver divides them by the layer's output energy).
    fn offer(&self, layer: &LayerContext<B>) -> Result<Vec<Candidate>>;

    /// Reconsiders its candidates once every layer the budget covers has offered (all layers,
    /// or the one layer, by budget scope): a method that allocates on its own keeps only the
    /// candidates of its allocation here. A split run settles offers another process made: a
    /// method that reads what its own `offer` kept must say so in
    /// [`Self::settles_from_offers`].
    fn settle(&self, _offers: &mut [LayerOffer]) -> Result<()> {
        Ok(())
    }

    /// Whether its candidates store the unit in the input's floats (a format that cannot mix
    /// float and packed layers offers them only where nothing packed fits).
    fn stores_floats(&self) -> bool {
        false
    }

    /// Whether it changes the model even where the budget removes nothing (`--ratio 0`).
    fn acts_without_budget(&self) -> bool {
        false
    }

    /// Whether it offers every unit exactly as stored. At `--ratio 0` a run with such a method
    /// and none that acts without a budget is a plain conversion: every layer written as
    /// stored, with no calibration pass.
    fn keeps_as_stored(&self) -> bool {
        false
    }

    /// Whether [`Self::settle`] needs only the offers, so that it can settle offers another
    /// process made (a split run's solve step); false when it relies on what its own
    /// [`Self::offer`] kept.
    fn settles_from_offers(&self) -> bool {
        true
    }

    /// The stored tensors of its candidates the solver chose in this layer.
    fn apply(&self, layer: &LayerContext<B>, chosen: &[Candidate]) -> Result<Vec<UnitOutput>>;

    /// Its settings as resolved (every key stated), for the saved options; None without
    /// settings.
    fn resolved_settings(&self) -> Option<serde_json::Value> {
        None
    }

    /// Adds what readers of the output need to know about it to the compression record.
    fn annotate(&self, _record: &mut CompressionRecord) {}

    /// Adds what it decided about layer `layer` beyond its units to the layer's report.
    fn describe_layer(&self, _layer: usize, _report: &mut LayerReport) {}
}

/// Everything a method's constructor may read.
#[derive(Clone, Copy)]
pub struct MethodInputs<'a> {
    /// The run's options (the method reads its own settings table).
    pub options: &'a CompressOptions,
    /// The input checkpoint.
    pub checkpoint: &'a Checkpoint,
    /// The fewest stored bytes per parameter any enabled method can keep an expert's matrix
    /// in (None when none says): what removing experts competes with.
    pub smallest_bytes_per_parameter: Option<f64>,
}

impl<'a> MethodInputs<'a> {
    /// The inputs of a run of `options` on `checkpoint` (the smallest storage unknown until
    /// [`Registry::build`] asks the enabled methods).
    pub fn new(options: &'a CompressOptions, checkpoint: &'a Checkpoint) -> Self {
        Self {
            options,
            checkpoint,
            smallest_bytes_per_parameter: None,
        }
    }
}

/// The fewest stored bytes per parameter a method can keep an expert's matrix in, for the
/// run's options (None: it does not store matrices, or the size varies).
pub type SmallestStorage = fn(&CompressOptions) -> Option<f64>;

/// Builds a method from the run's options.
pub type Constructor<B> = fn(&MethodInputs) -> Result<Box<dyn Method<B>>>;

/// One registered method.
pub struct Registered<B> {
    /// The registry name.
    pub name: &'static str,
    /// One line saying what it does (for help texts).
    pub description: &'static str,
    /// Its constructor.
    pub construct: Constructor<B>,
    /// Its smallest storage, when it stores expert matrices at a fixed size per parameter.
    pub smallest_storage: Option<SmallestStorage>,
}

/// The methods a run can use, by name.
pub struct Registry<B> {
    entries: Vec<Registered<B>>,
}

impl<B: LinalgBackend + 'static> Registry<B> {
    /// No methods.
    pub fn empty() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// The methods this crate ships.
    pub fn builtin() -> Self {
        let mut registry = Self::empty();
        registry.register(prune::NAME, prune::DESCRIPTION, prune::create);
        registry.register(lowrank::NAME, lowrank::DESCRIPTION, lowrank::create);
        registry.register(quantise::NAME, quantise::DESCRIPTION, quantise::create);
        registry.register(int8::NAME, int8::DESCRIPTION, int8::create);
        registry.register(keep::NAME, keep::DESCRIPTION, keep::create);
        registry.set_smallest_storage(lowrank::NAME, lowrank::smallest_storage);
        registry.set_smallest_storage(quantise::NAME, quantise::smallest_storage);
        registry.set_smallest_storage(int8::NAME, int8::smallest_storage);
        registry
    }

    /// Says how small method `name` can store an expert's matrix (what removal competes with).
    pub fn set_smallest_storage(&mut self, name: &str, smallest: SmallestStorage) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.name == name) {
            entry.smallest_storage = Some(smallest);
        }
    }

    /// Adds a method (a later registration of the same name replaces the earlier one).
    pub fn register(
        &mut self,
        name: &'static str,
        description: &'static str,
        construct: Constructor<B>,
    ) {
        self.entries.retain(|e| e.name != name);
        self.entries.push(Registered {
            name,
            description,
            construct,
            smallest_storage: None,
        });
    }

    /// The registered methods.
    pub fn entries(&self) -> &[Registered<B>] {
        &self.entries
    }

    /// The methods `inputs.options.methods` names, in that order; an unknown name is refused
    /// with the known ones listed.
    pub fn build(&self, inputs: &MethodInputs) -> Result<Vec<Box<dyn Method<B>>>> {
        let smallest = self
            .entries
            .iter()
            .filter(|e| inputs.options.methods.iter().any(|m| m == e.name))
            .filter_map(|e| e.smallest_storage.and_then(|f| f(inputs.options)))
            .reduce(f64::min);
        let inputs = &MethodInputs {
            smallest_bytes_per_parameter: smallest,
            ..*inputs
        };
        let mut methods = Vec::new();
        for name in &inputs.options.methods {
            if inputs.options.methods.iter().filter(|m| *m == name).count() > 1 {
                return Err(Error::InvalidArgument(format!(
                    "--methods names `{name}` twice"
                )));
            }
            let entry = self
                .entries
                .iter()
                .find(|e| e.name == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = self.entries.iter().map(|e| e.name).collect();
                    Error::InvalidArgument(format!(
                        "unknown method `{name}` in --methods: expected some of {}",
                        known.join(", ")
                    ))
                })?;
            methods.push((entry.construct)(inputs)?);
        }
        for name in inputs.options.settings.keys() {
            if !inputs.options.methods.contains(name) {
                return Err(Error::InvalidArgument(format!(
                    "[settings.{name}] is given but `{name}` is not in --methods ({})",
                    inputs.options.methods.join(", ")
                )));
            }
        }
        Ok(methods)
    }
}

/// The names of the methods this crate ships (for help texts and option checks).
pub fn builtin_names() -> Vec<&'static str> {
    Registry::<crate::linalg::CpuBackend>::builtin()
        .entries()
        .iter()
        .map(|e| e.name)
        .collect()
}
