//! The calibrate stage: run the uncompressed model over token windows one decoder layer at a
//! time and collect, per MoE layer, routing counts (top-k hits per expert), the frequency-sorted
//! expert groups and, optionally, each group's input Gram matrix from the tokens routed to its
//! experts, held in the linear-algebra backend's own matrix type.
//!
//! Hidden states are carried from layer to layer, so only one layer's weights are resident at a
//! time: the model may be larger than memory. Each batch's MoE input is kept until the layer's
//! routing is complete (the groups, and so the Gram matrices, depend on every batch), which costs
//! as much memory as the hidden states themselves.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::analyse;
use super::options::CalibrationOptions;
use super::prune::{LayerPruning, PruneRule, SaliencyAccumulator};
use super::tune::{HeldOutActivations, HeldOutRecorder};
use crate::checkpoint::experts::{ExpertLayout, ExpertMatrix};
use crate::checkpoint::{Checkpoint, StoredDType};
use crate::error::{Error, Result};
use crate::linalg::LinalgBackend;
use crate::models::common::{Rotary, Weights};
use crate::models::moe::{MoeObserver, MoeTrace};
use crate::models::{compression_record, ArchConfig, ModelSpec};

/// Loads and windows the calibration data for `checkpoint`.
pub fn calibration_windows(
    options: &CalibrationOptions,
    checkpoint: &Checkpoint,
) -> Result<Vec<Vec<u32>>> {
    let path = &options.data;
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let stream: Vec<u32> = if is_safetensors {
        let vocab = ArchConfig::from_checkpoint(checkpoint)?.spec().vocab_size;
        let rows = crate::text::read_token_ids(path, vocab)?;
        rows.into_iter().flatten().collect()
    } else {
        let tokenizer = crate::text::load_tokenizer(checkpoint.dir())?;
        let documents = crate::text::read_documents(path)?;
        let eos = crate::text::end_of_text_id(&tokenizer, checkpoint.config())?;
        crate::text::tokenize_documents(&tokenizer, &documents, eos)?
    };
    let windows =
        crate::text::sample_windows(&stream, options.seq_len, options.samples, options.seed);
    if windows.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: {} tokens are fewer than one window of --seq-len {}",
            path.display(),
            stream.len(),
            options.seq_len
        )));
    }
    if windows.len() < options.samples {
        return Err(Error::InvalidArgument(format!(
            "{}: {} tokens make {} windows of --seq-len {}, fewer than --samples {} (lower \
             --samples or --seq-len, or give more calibration text)",
            path.display(),
            stream.len(),
            windows.len(),
            options.seq_len,
            options.samples
        )));
    }
    Ok(windows)
}

/// What calibration learned about one MoE layer.
#[derive(Debug, Clone)]
pub struct LayerStatistics<M> {
    /// Decoder layer index.
    pub layer: usize,
    /// Top-k hits per expert; sums to tokens × top_k.
    pub routing_counts: Vec<u64>,
    /// Tokens that passed through the layer.
    pub tokens: u64,
    /// Experts by descending routing count, cut into groups of `group_size` (method.md §1).
    pub groups: Vec<Vec<usize>>,
    /// Per group, Σ xxᵀ over the inputs routed to each of its experts (d×d), when requested.
    pub group_gram: Option<Vec<M>>,
    /// Per expert, Σ h hᵀ of its intermediate activation `h = act(gate·x) ⊙ (up·x)` over the
    /// tokens routed to it (p×p, unweighted like `group_gram`), when `down_proj` is factored.
    pub expert_down_gram: Option<Vec<M>>,
    /// With pruning: which experts were kept. Everything above then covers the kept experts
    /// only, numbered `0..n'` in the order of `kept`.
    pub pruning: Option<LayerPruning>,
}

impl<M> LayerStatistics<M> {
    /// Experts that no calibration token was routed to.
    pub fn unused_experts(&self) -> Vec<usize> {
        self.routing_counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c == 0)
            .map(|(i, _)| i)
            .collect()
    }

    /// Group routing frequencies `F_g`.
    pub fn group_frequencies(&self) -> Vec<f64> {
        analyse::group_frequencies(&self.routing_counts, &self.groups)
    }
}

/// One calibration batch's MoE input and the tokens routed to each expert, kept until the
/// layer's routing counts (and so its groups) are known.
struct RoutedBatch {
    tokens: usize,
    /// The MoE input [tokens, hidden], kept only when Gram statistics are collected.
    input: Option<Tensor>,
    tokens_per_expert: Vec<Vec<u32>>,
}

/// Records each batch's MoE input and routing during a layer's forward passes.
struct RoutingRecorder<'b, B: LinalgBackend> {
    num_experts: usize,
    keep_inputs: bool,
    batches: Vec<RoutedBatch>,
    /// REAP sums, when pruning by REAP.
    saliency: Option<SaliencyAccumulator>,
    /// Per-expert intermediate Gram matrices, accumulated batch by batch, when `down_proj` is
    /// factored.
    down_gram: Option<DownGram<'b, B>>,
}

/// Per-expert Σ h hᵀ of the intermediate activations (the input of `down_proj`).
struct DownGram<'b, B: LinalgBackend> {
    backend: &'b B,
    grams: Vec<B::Matrix>,
}

impl<'b, B: LinalgBackend> DownGram<'b, B> {
    fn new(backend: &'b B, num_experts: usize, intermediate: usize) -> Result<Self> {
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

impl<B: LinalgBackend> MoeObserver for RoutingRecorder<'_, B> {
    fn observe(&mut self, trace: &MoeTrace) -> Result<()> {
        let tokens_per_expert = trace
            .routing
            .tokens_per_expert(self.num_experts)?
            .into_iter()
            .map(|(tokens, _)| tokens)
            .collect();
        self.batches.push(RoutedBatch {
            tokens: trace.input.dim(0)?,
            input: self.keep_inputs.then(|| trace.input.clone()),
            tokens_per_expert,
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

impl<B: LinalgBackend> RoutingRecorder<'_, B> {
    /// Top-k hits per expert and the tokens seen.
    fn routing_counts(&self) -> (Vec<u64>, u64) {
        let mut routing_counts = vec![0u64; self.num_experts];
        let mut tokens = 0u64;
        for batch in &self.batches {
            tokens += batch.tokens as u64;
            for (expert, routed) in batch.tokens_per_expert.iter().enumerate() {
                routing_counts[expert] += routed.len() as u64;
            }
        }
        (routing_counts, tokens)
    }

    /// Chooses the experts `rule` keeps and renumbers the recorded routing to them.
    fn prune(&mut self, rule: &PruneRule) -> Result<LayerPruning> {
        let (counts, _) = self.routing_counts();
        let reap = self.saliency.as_ref().map(SaliencyAccumulator::saliency);
        let pruning = rule.select(&counts, reap)?;
        for batch in &mut self.batches {
            let mut all = std::mem::take(&mut batch.tokens_per_expert);
            batch.tokens_per_expert = pruning
                .kept
                .iter()
                .map(|&e| std::mem::take(&mut all[e]))
                .collect();
        }
        if let Some(down) = self.down_gram.as_mut() {
            let mut all: Vec<Option<B::Matrix>> = std::mem::take(&mut down.grams)
                .into_iter()
                .map(Some)
                .collect();
            down.grams = pruning.kept.iter().filter_map(|&e| all[e].take()).collect();
        }
        self.num_experts = pruning.kept.len();
        Ok(pruning)
    }

    /// Turns the recorded batches into statistics: counts, groups, and (optionally) per-group
    /// Gram matrices summed expert by expert in group order; with a pruning `rule`, over the
    /// experts it keeps.
    fn statistics(
        mut self,
        layer: usize,
        group_size: usize,
        backend: &B,
        rule: Option<&PruneRule>,
    ) -> Result<LayerStatistics<B::Matrix>> {
        let pruning = rule.map(|rule| self.prune(rule)).transpose()?;
        let (routing_counts, tokens) = self.routing_counts();
        let groups = analyse::frequency_groups(&routing_counts, group_size)?;
        let group_gram = if self.keep_inputs {
            Some(
                groups
                    .iter()
                    .map(|group| self.group_gram(group, backend))
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        Ok(LayerStatistics {
            layer,
            routing_counts,
            tokens,
            groups,
            group_gram,
            expert_down_gram: self.down_gram.map(|down| down.grams),
            pruning,
        })
    }

    /// Σ over the group's experts of Σ over batches of `XᵀX` of the expert's routed inputs.
    fn group_gram(&self, group: &[usize], backend: &B) -> Result<B::Matrix> {
        let d = match self.batches.first().and_then(|b| b.input.as_ref()) {
            Some(input) => input.dim(1)?,
            None => 0,
        };
        let mut sum = backend.zeros(d, d)?;
        for &expert in group {
            let mut expert_gram = backend.zeros(d, d)?;
            for batch in &self.batches {
                let routed = &batch.tokens_per_expert[expert];
                let Some(input) = batch.input.as_ref().filter(|_| !routed.is_empty()) else {
                    continue;
                };
                let index = Tensor::from_slice(routed, routed.len(), input.device())?;
                let rows = input.index_select(&index, 0)?;
                backend.accumulate_gram(&mut expert_gram, &rows)?;
            }
            sum = backend.add(&sum, &expert_gram)?;
        }
        Ok(sum)
    }
}

/// The dtype to hold a layer's experts in while calibrating: their stored dtype when all three
/// matrices share one that widens to f32 exactly (bf16, f16), f32 otherwise.
fn expert_dtype(checkpoint: &Checkpoint, layout: &ExpertLayout) -> DType {
    let stored: Vec<Option<StoredDType>> = ExpertMatrix::ALL
        .iter()
        .map(|&m| {
            let name = match layout.is_fused(checkpoint, m) {
                true => layout.fused_name(m),
                false => layout.dense_name(0, m),
            };
            checkpoint.info(&name).map(|(info, _)| info.dtype)
        })
        .collect();
    match stored.as_slice() {
        [Some(StoredDType::BF16), Some(StoredDType::BF16), Some(StoredDType::BF16)] => DType::BF16,
        [Some(StoredDType::F16), Some(StoredDType::F16), Some(StoredDType::F16)] => DType::F16,
        _ => DType::F32,
    }
}

/// One decoder layer as the calibrate stage hands it on.
#[derive(Debug)]
pub struct CalibratedLayer<M> {
    /// Decoder layer index.
    pub index: usize,
    /// Statistics of a MoE layer (`None` for dense layers).
    pub statistics: Option<LayerStatistics<M>>,
    /// The held-out windows' MoE input and routing (MoE layers of a stream with held-out
    /// windows, `--xi auto`).
    pub held_out: Option<HeldOutActivations>,
}

/// Streams a checkpoint's decoder layers over calibration windows, one layer at a time.
pub struct CalibrationStream<'a, B: LinalgBackend> {
    config: ArchConfig,
    spec: ModelSpec,
    weights: Weights<'a>,
    rotary: Option<Rotary>,
    hidden: Vec<Tensor>,
    /// Hidden states of the held-out windows (`--xi auto`), carried like `hidden` but
    /// contributing to no statistic.
    held_out: Vec<Tensor>,
    /// Whether `next_layer` records the held-out windows (not while skipping a layer).
    record_held_out: bool,
    next_layer: usize,
    group_size: usize,
    collect_gram: bool,
    /// Also collect each expert's intermediate Gram matrix (`down_proj` factored).
    collect_down_gram: bool,
    backend: &'a B,
    replay: Option<Vec<LayerStatistics<B::Matrix>>>,
    prune: Option<PruneRule>,
}

impl<'a, B: LinalgBackend> CalibrationStream<'a, B> {
    /// Embeds `windows` (each of equal length) in batches of `batch_size`.
    pub fn new(
        checkpoint: &'a Checkpoint,
        windows: &[Vec<u32>],
        options: &CalibrationOptions,
        collect_gram: bool,
        device: &'a Device,
        backend: &'a B,
    ) -> Result<Self> {
        let no_held_out: &[Vec<u32>] = &[];
        Self::with_held_out(
            checkpoint,
            [windows, no_held_out],
            options,
            collect_gram,
            device,
            backend,
        )
    }

    /// As [`Self::new`] for `[calibrating, held_out]` windows: the held-out windows run through
    /// every layer too, but only their MoE inputs and routing are kept
    /// ([`CalibratedLayer::held_out`]), for measuring candidate allocations (`--xi auto`).
    pub fn with_held_out(
        checkpoint: &'a Checkpoint,
        [windows, held_out]: [&[Vec<u32>]; 2],
        options: &CalibrationOptions,
        collect_gram: bool,
        device: &'a Device,
        backend: &'a B,
    ) -> Result<Self> {
        let seq = windows.first().map_or(0, |w| w.len());
        if seq == 0 || windows.iter().chain(held_out).any(|w| w.len() != seq) {
            return Err(Error::InvalidArgument(
                "calibration windows must all have the same, non-zero length".into(),
            ));
        }
        if compression_record(checkpoint)?.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{} is already compressed; calibrate and compress the original checkpoint",
                checkpoint.dir().display()
            )));
        }
        let mut stream = Self::open(checkpoint, device, backend, options.group_size)?;
        stream.collect_gram = collect_gram;
        let vocab = stream.spec.vocab_size;
        if let Some(id) = windows
            .iter()
            .chain(held_out)
            .flatten()
            .find(|&&id| id as usize >= vocab)
        {
            return Err(Error::InvalidArgument(format!(
                "calibration token id {id} is out of range for the vocabulary of {vocab} in {}",
                checkpoint.config_path().display()
            )));
        }
        // Rows are gathered in the stored dtype and widened afterwards (exact for bf16/f16), so
        // the whole table is never held in f32.
        let name = "model.embed_tokens.weight";
        let embed = checkpoint
            .load_stored(name, "calibration embedding")?
            .to_device(device)?;
        let expected = [vocab, stream.spec.hidden_size];
        if embed.dims() != expected {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                path: checkpoint.info(name).map_or_else(
                    || checkpoint.dir().to_path_buf(),
                    |(_, path)| path.to_path_buf(),
                ),
                expected: expected.to_vec(),
                found: embed.dims().to_vec(),
            });
        }
        let embed_batches = |windows: &[Vec<u32>]| -> Result<Vec<Tensor>> {
            let mut batches = Vec::new();
            for batch in windows.chunks(options.batch_size.max(1)) {
                let flat: Vec<u32> = batch.iter().flatten().copied().collect();
                let ids = Tensor::from_vec(flat, batch.len() * seq, device)?;
                let rows = embed.index_select(&ids, 0)?.to_dtype(DType::F32)?;
                batches.push(rows.reshape((batch.len(), seq, ()))?);
            }
            Ok(batches)
        };
        stream.hidden = embed_batches(windows)?;
        stream.held_out = embed_batches(held_out)?;
        stream.rotary = Some(stream.config.rotary(checkpoint, DType::F32, device)?);
        Ok(stream)
    }

    /// Streams the layers without running them, handing out previously saved statistics instead.
    pub fn replay(
        checkpoint: &'a Checkpoint,
        device: &'a Device,
        backend: &'a B,
        statistics: Vec<LayerStatistics<B::Matrix>>,
    ) -> Result<Self> {
        let group_size = statistics
            .first()
            .and_then(|s| s.groups.first())
            .map_or(1, |g| g.len());
        let mut stream = Self::open(checkpoint, device, backend, group_size)?;
        for layer in stream.spec.moe_layer_indices() {
            let experts = stream.spec.moe_layers[layer]
                .as_ref()
                .map_or(0, |l| l.num_experts);
            let found = statistics.iter().find(|s| s.layer == layer);
            // After pruning, the statistics describe the kept experts.
            let matches = |s: &LayerStatistics<B::Matrix>| match &s.pruning {
                Some(p) => p.original_experts == experts && s.routing_counts.len() == p.kept.len(),
                None => s.routing_counts.len() == experts,
            };
            if !found.is_some_and(matches) {
                return Err(Error::InvalidArgument(format!(
                    "saved calibration statistics do not match {} (layer {layer})",
                    checkpoint.dir().display()
                )));
            }
        }
        stream.replay = Some(statistics);
        Ok(stream)
    }

    fn open(
        checkpoint: &'a Checkpoint,
        device: &'a Device,
        backend: &'a B,
        group_size: usize,
    ) -> Result<Self> {
        let config = ArchConfig::from_checkpoint(checkpoint)?;
        let spec = config.spec();
        let weights = Weights {
            checkpoint,
            device,
            dtype: DType::F32,
            family: spec.family.model_type(),
        };
        Ok(Self {
            config,
            spec,
            weights,
            rotary: None,
            hidden: Vec::new(),
            held_out: Vec::new(),
            record_held_out: true,
            next_layer: 0,
            group_size,
            collect_gram: false,
            collect_down_gram: false,
            backend,
            replay: None,
            prune: None,
        })
    }

    /// Collects each expert's intermediate Gram matrix too (for factoring `down_proj`), on
    /// every MoE layer whose statistics collect Gram matrices.
    pub fn set_down_gram(&mut self, collect: bool) {
        self.collect_down_gram = collect;
    }

    /// Prunes every MoE layer's statistics by `rule` (collecting REAP saliency when it asks).
    pub fn set_pruning(&mut self, rule: Option<PruneRule>) {
        self.prune = rule;
    }

    /// Family-independent facts of the model.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Runs every batch through the next layer without collecting statistics (a layer an
    /// interrupted run already compressed), so that the following layer sees the same hidden
    /// states; returns its index, `None` after the last layer.
    pub fn skip_layer(&mut self) -> Result<Option<usize>> {
        let index = self.next_layer;
        let collect_gram = std::mem::replace(&mut self.collect_gram, false);
        let prune = self.prune.take();
        self.record_held_out = false;
        let skipped = self.next_layer();
        self.collect_gram = collect_gram;
        self.prune = prune;
        self.record_held_out = true;
        Ok(skipped?.map(|layer| layer.index).filter(|&i| i == index))
    }

    /// Runs every batch through the next layer (collecting statistics on MoE layers) and returns
    /// them; `None` after the last layer. Only this layer's weights are resident meanwhile.
    pub fn next_layer(&mut self) -> Result<Option<CalibratedLayer<B::Matrix>>> {
        let index = self.next_layer;
        if index >= self.spec.num_layers {
            return Ok(None);
        }
        self.next_layer += 1;
        if let Some(saved) = &mut self.replay {
            let statistics = saved
                .iter()
                .position(|s| s.layer == index)
                .map(|i| saved.swap_remove(i));
            return Ok(Some(CalibratedLayer {
                index,
                statistics,
                held_out: None,
            }));
        }
        // Experts stay in the checkpoint's dtype (half of f32 for bf16) and are widened per
        // use: the same f32 products, at half the resident layer.
        let expert_dtype = match &self.spec.moe_layers[index] {
            Some(layout) => expert_dtype(self.weights.checkpoint, layout),
            None => DType::F32,
        };
        let layer =
            self.config
                .load_layer_with_expert_dtype(&self.weights, index, None, expert_dtype)?;
        let rotary = self.rotary.as_ref().ok_or_else(|| {
            Error::InvalidArgument("calibration stream has no rotary tables".into())
        })?;
        let collect_down = self.collect_gram && self.collect_down_gram;
        let mut recorder = self.spec.moe_layers[index]
            .as_ref()
            .map(|layout| -> Result<RoutingRecorder<'_, B>> {
                Ok(RoutingRecorder {
                    num_experts: layout.num_experts,
                    keep_inputs: self.collect_gram,
                    batches: Vec::new(),
                    saliency: self
                        .prune
                        .filter(|rule| rule.saliency == super::prune::Saliency::Reap)
                        .map(|_| SaliencyAccumulator::new(layout.num_experts)),
                    down_gram: collect_down
                        .then(|| {
                            DownGram::new(
                                self.backend,
                                layout.num_experts,
                                layout.intermediate_size,
                            )
                        })
                        .transpose()?,
                })
            })
            .transpose()?;
        for hidden in self.hidden.iter_mut() {
            let observer: Option<&mut dyn MoeObserver> = match recorder.as_mut() {
                Some(r) => Some(r),
                None => None,
            };
            let (next, _) = layer.forward(hidden, rotary, observer)?;
            *hidden = next;
        }
        // Held-out windows are recorded only when statistics are (not while skipping a layer).
        let mut held_out_recorder = self.spec.moe_layers[index]
            .as_ref()
            .filter(|_| self.record_held_out)
            .map(|layout| HeldOutRecorder::new(layout.num_experts));
        for hidden in self.held_out.iter_mut() {
            let observer: Option<&mut dyn MoeObserver> = match held_out_recorder.as_mut() {
                Some(r) => Some(r),
                None => None,
            };
            let (next, _) = layer.forward(hidden, rotary, observer)?;
            if let Some(recorder) = held_out_recorder.as_mut() {
                recorder.record_layer_output(&next)?;
            }
            *hidden = next;
        }
        drop(layer);
        let statistics = match recorder {
            Some(r) => {
                Some(r.statistics(index, self.group_size, self.backend, self.prune.as_ref())?)
            }
            None => None,
        };
        let held_out = match held_out_recorder {
            Some(r) => r.finish()?,
            None => None,
        };
        Ok(Some(CalibratedLayer {
            index,
            statistics,
            held_out,
        }))
    }
}

/// A short, stable fingerprint of calibration windows (FNV-1a over the token ids).
pub fn fingerprint(windows: &[Vec<u32>]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for window in windows {
        for &t in window {
            for b in t.to_le_bytes() {
                hash ^= b as u64;
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    format!(
        "{}x{}:{hash:016x}",
        windows.len(),
        windows.first().map_or(0, |w| w.len())
    )
}

/// Saves per-layer statistics (routing counts, groups and, if present, group Gram matrices)
/// under `key`, so that later runs on the same model, windows and grouping skip the forward passes.
pub fn save_statistics<B: LinalgBackend>(
    path: &Path,
    statistics: &[LayerStatistics<B::Matrix>],
    key: &str,
    backend: &B,
) -> Result<()> {
    let mut tensors = std::collections::HashMap::new();
    let as_i64 = |values: Vec<i64>| {
        let n = values.len();
        Tensor::from_vec(values, n, &Device::Cpu)
    };
    for stats in statistics {
        let layer = stats.layer;
        let counts = stats.routing_counts.iter().map(|&c| c as i64).collect();
        tensors.insert(format!("layer.{layer}.routing_counts"), as_i64(counts)?);
        tensors.insert(
            format!("layer.{layer}.tokens"),
            as_i64(vec![stats.tokens as i64])?,
        );
        let sizes = stats.groups.iter().map(|g| g.len() as i64).collect();
        let experts = stats.groups.iter().flatten().map(|&e| e as i64).collect();
        tensors.insert(format!("layer.{layer}.group_sizes"), as_i64(sizes)?);
        tensors.insert(format!("layer.{layer}.group_experts"), as_i64(experts)?);
        if let Some(grams) = &stats.group_gram {
            let host: Vec<faer::Mat<f64>> = grams
                .iter()
                .map(|g| backend.to_host(g))
                .collect::<Result<_>>()?;
            let d = host.first().map_or(0, |g| g.nrows());
            let values: Vec<f64> = host
                .iter()
                .flat_map(|g| (0..d).flat_map(move |i| (0..d).map(move |j| g[(i, j)])))
                .collect();
            tensors.insert(
                format!("layer.{layer}.group_gram"),
                Tensor::from_vec(values, (host.len(), d, d), &Device::Cpu)?,
            );
        }
    }
    let key_bytes: Vec<u8> = key.bytes().collect();
    let len = key_bytes.len();
    tensors.insert(
        "fingerprint".into(),
        Tensor::from_vec(key_bytes, len, &Device::Cpu)?,
    );
    crate::checkpoint::writer::save_safetensors_atomic(path, &tensors)
}

/// Loads statistics saved by [`save_statistics`]; `None` when they were saved under another key.
pub fn load_statistics<B: LinalgBackend>(
    path: &Path,
    key: &str,
    backend: &B,
) -> Result<Option<Vec<LayerStatistics<B::Matrix>>>> {
    let tensors = crate::checkpoint::load_all(path, &Device::Cpu)?;
    let saved: Vec<u8> = match tensors.get("fingerprint") {
        Some(t) => t.to_vec1()?,
        None => return Ok(None),
    };
    if saved != key.as_bytes() {
        return Ok(None);
    }
    let bad = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let get = |name: &str| -> Result<Vec<i64>> {
        tensors
            .get(name)
            .ok_or_else(|| bad(format!("missing `{name}`")))?
            .to_vec1::<i64>()
            .map_err(Error::from)
    };
    let mut layers = Vec::new();
    for name in tensors.keys() {
        let Some(layer) = name
            .strip_prefix("layer.")
            .and_then(|r| r.strip_suffix(".routing_counts"))
        else {
            continue;
        };
        let layer: usize = layer
            .parse()
            .map_err(|_| bad(format!("bad statistics key `{name}`")))?;
        let routing_counts: Vec<u64> = get(name)?.into_iter().map(|c| c as u64).collect();
        let tokens = get(&format!("layer.{layer}.tokens"))?
            .first()
            .copied()
            .unwrap_or(0) as u64;
        let experts = get(&format!("layer.{layer}.group_experts"))?;
        let mut groups = Vec::new();
        let mut offset = 0usize;
        for size in get(&format!("layer.{layer}.group_sizes"))? {
            let end = offset + size.max(0) as usize;
            let members = experts
                .get(offset..end)
                .ok_or_else(|| bad(format!("layer {layer}: group sizes exceed the experts")))?;
            groups.push(members.iter().map(|&e| e as usize).collect());
            offset = end;
        }
        let group_gram = match tensors.get(&format!("layer.{layer}.group_gram")) {
            Some(t) => {
                let (n, d, _) = t.dims3()?;
                Some(
                    (0..n)
                        .map(|g| backend.matrix_from_tensor(&t.get(g)?))
                        .collect::<Result<Vec<_>>>()?,
                )
                .filter(|v: &Vec<_>| v.len() == n && d > 0)
            }
            None => None,
        };
        layers.push(LayerStatistics {
            layer,
            routing_counts,
            tokens,
            groups,
            group_gram,
            expert_down_gram: None,
            pruning: None,
        });
    }
    layers.sort_by_key(|l| l.layer);
    Ok(Some(layers))
}
