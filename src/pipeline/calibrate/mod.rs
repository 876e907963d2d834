//! The calibrate stage: run the uncompressed model over token windows one decoder layer at a
//! time and record, per MoE layer, what the methods asked for: routing (top-k hits and weights
//! per expert), each batch's MoE input, each expert's intermediate Gram matrix, REAP saliency,
//! and the layer output's energy ([`LayerObservations`]); once a removal method has decided
//! which experts stay, [`LayerObservations::into_statistics`] turns that into the statistics
//! every method reads ([`LayerStatistics`]).
//!
//! Hidden states are carried from layer to layer, so only one layer's weights are resident at a
//! time: the model may be larger than memory. Each batch's MoE input is kept until the layer's
//! statistics are computed (the groups, and so the Gram matrices, depend on every batch), which
//! costs as much memory as the hidden states themselves.

mod record;
mod statistics;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use record::{ExpertRoutes, HeldOutActivations, HeldOutRecorder, SaliencyAccumulator};
pub use statistics::{
    frequency_groups, group_frequencies, routing_frequency, ErrorWeights, ExpertStatistics,
    LayerObservations, LayerStatistics, RoutedInputs, StatisticsWanted,
};

use super::experts::LayerExperts;
use super::options::CalibrationOptions;
use crate::checkpoint::experts::{ExpertLayout, ExpertMatrix};
use crate::checkpoint::{Checkpoint, StoredDType};
use crate::error::{Error, Result};
use crate::linalg::LinalgBackend;
use crate::models::common::{Rotary, Weights};
use crate::models::moe::MoeObserver;
use crate::models::{compression_record, ArchConfig, ModelSpec};
use record::{token_energies, DownGram, RoutingRecorder};

/// What the calibrate stage records for each MoE layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recording {
    /// Keep each batch's MoE input (for Gram matrices and expert statistics).
    pub inputs: bool,
    /// Sum each expert's intermediate Gram matrix.
    pub down_gram: bool,
    /// Sum each expert's REAP saliency.
    pub saliency: bool,
}

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

/// A MoE layer as the calibrate stage hands it on.
pub enum LayerData<M> {
    /// Recorded by this run's forward passes (every expert).
    Observed(LayerObservations<M>),
    /// Statistics read back from the statistics cache.
    Replayed(LayerStatistics<M>),
}

/// One decoder layer as the calibrate stage hands it on.
pub struct CalibratedLayer<M> {
    /// Decoder layer index.
    pub index: usize,
    /// What was recorded for a MoE layer (`None` for dense layers).
    pub data: Option<LayerData<M>>,
    /// The held-out windows' MoE input and routing (MoE layers of a stream with held-out
    /// windows).
    pub held_out: Option<HeldOutActivations>,
}

/// One decoder layer's statistics over every expert ([`CalibrationStream::next_statistics`]).
pub struct LayerOutcome<M> {
    /// Decoder layer index.
    pub index: usize,
    /// Statistics of a MoE layer (`None` for dense layers).
    pub statistics: Option<LayerStatistics<M>>,
    /// The held-out windows' MoE input and routing.
    pub held_out: Option<HeldOutActivations>,
}

/// Streams a checkpoint's decoder layers over calibration windows, one layer at a time.
pub struct CalibrationStream<'a, B: LinalgBackend> {
    config: ArchConfig,
    spec: ModelSpec,
    weights: Weights<'a>,
    rotary: Option<Rotary>,
    hidden: Vec<Tensor>,
    /// Hidden states of the held-out windows, carried like `hidden` but contributing to no
    /// statistic.
    held_out: Vec<Tensor>,
    /// Whether `next_layer` records (not while skipping a layer).
    recording_on: bool,
    next_layer: usize,
    recording: Recording,
    backend: &'a B,
    replay: Option<Vec<LayerStatistics<B::Matrix>>>,
}

impl<'a, B: LinalgBackend> CalibrationStream<'a, B> {
    /// Embeds `windows` (each of equal length) in batches of `batch_size`; MoE layers record
    /// what `recording` says.
    pub fn new(
        checkpoint: &'a Checkpoint,
        windows: &[Vec<u32>],
        options: &CalibrationOptions,
        recording: Recording,
        device: &'a Device,
        backend: &'a B,
    ) -> Result<Self> {
        let no_held_out: &[Vec<u32>] = &[];
        Self::with_held_out(
            checkpoint,
            [windows, no_held_out],
            options,
            recording,
            device,
            backend,
        )
    }

    /// As [`Self::new`] for `[calibrating, held_out]` windows: the held-out windows run through
    /// every layer too, but only their MoE inputs and routing are kept
    /// ([`CalibratedLayer::held_out`]), for measuring candidates.
    pub fn with_held_out(
        checkpoint: &'a Checkpoint,
        [windows, held_out]: [&[Vec<u32>]; 2],
        options: &CalibrationOptions,
        recording: Recording,
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
        let mut stream = Self::open(checkpoint, device, backend)?;
        stream.recording = recording;
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
        let mut stream = Self::open(checkpoint, device, backend)?;
        for layer in stream.spec.moe_layer_indices() {
            let experts = stream.spec.moe_layers[layer]
                .as_ref()
                .map_or(0, |l| l.num_experts);
            let found = statistics.iter().find(|s| s.layer == layer);
            if !found.is_some_and(|s| s.routing_counts.len() == experts && s.pruning.is_none()) {
                return Err(Error::InvalidArgument(format!(
                    "saved calibration statistics do not match {} (layer {layer})",
                    checkpoint.dir().display()
                )));
            }
        }
        stream.replay = Some(statistics);
        Ok(stream)
    }

    fn open(checkpoint: &'a Checkpoint, device: &'a Device, backend: &'a B) -> Result<Self> {
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
            recording_on: true,
            next_layer: 0,
            recording: Recording::default(),
            backend,
            replay: None,
        })
    }

    /// Family-independent facts of the model.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The next layer to run and the hidden states it will see: the calibration batches' and
    /// the held-out windows' (what a unit of a split run starts from).
    pub fn boundary(&self) -> (usize, &[Tensor], &[Tensor]) {
        (self.next_layer, &self.hidden, &self.held_out)
    }

    /// Continues at layer `layer` from hidden states a [`Self::boundary`] gave, which must have
    /// the shapes of this stream's own (the same windows and batches); `what` names their
    /// source in an error.
    pub fn continue_at(
        &mut self,
        layer: usize,
        hidden: Vec<Tensor>,
        held_out: Vec<Tensor>,
        what: &std::path::Path,
    ) -> Result<()> {
        let shapes = |states: &[Tensor]| -> Vec<Vec<usize>> {
            states.iter().map(|t| t.dims().to_vec()).collect()
        };
        let expected = [shapes(&self.hidden), shapes(&self.held_out)];
        let found = [shapes(&hidden), shapes(&held_out)];
        if expected != found || layer > self.spec.num_layers {
            return Err(Error::InvalidArgument(format!(
                "{} holds hidden states of shapes {found:?} for layer {layer}; this run's \
                 calibration has {expected:?} over {} layers",
                what.display(),
                self.spec.num_layers
            )));
        }
        let device = self.hidden.first().map(|t| t.device().clone());
        let to_device = |states: Vec<Tensor>| -> Result<Vec<Tensor>> {
            states
                .into_iter()
                .map(|t| match &device {
                    Some(device) => Ok(t.to_dtype(DType::F32)?.to_device(device)?),
                    None => Ok(t),
                })
                .collect()
        };
        self.hidden = to_device(hidden)?;
        self.held_out = to_device(held_out)?;
        self.next_layer = layer;
        Ok(())
    }

    /// Runs every batch through the next layer without recording (a layer an interrupted run
    /// already compressed), so that the following layer sees the same hidden states; returns
    /// its index, `None` after the last layer.
    pub fn skip_layer(&mut self) -> Result<Option<usize>> {
        let index = self.next_layer;
        self.recording_on = false;
        let skipped = self.next_layer();
        self.recording_on = true;
        Ok(skipped?.map(|layer| layer.index).filter(|&i| i == index))
    }

    /// The recorder of MoE layer `layout` for this stream's recording.
    fn recorder(&self, layout: &ExpertLayout) -> Result<RoutingRecorder<'a, B>> {
        let on = self.recording_on;
        Ok(RoutingRecorder {
            num_experts: layout.num_experts,
            keep_inputs: on && self.recording.inputs,
            batches: Vec::new(),
            saliency: (on && self.recording.saliency)
                .then(|| SaliencyAccumulator::new(layout.num_experts)),
            down_gram: (on && self.recording.down_gram)
                .then(|| DownGram::new(self.backend, layout.num_experts, layout.intermediate_size))
                .transpose()?,
        })
    }

    /// Runs the next layer and turns what it recorded into statistics over every expert (no
    /// removal), with the held-out windows' activations; `None` after the last layer.
    pub fn next_statistics(
        &mut self,
        wanted: StatisticsWanted,
    ) -> Result<Option<LayerOutcome<B::Matrix>>> {
        let Some(layer) = self.next_layer()? else {
            return Ok(None);
        };
        let statistics = match layer.data {
            None => None,
            Some(LayerData::Replayed(statistics)) => Some(statistics),
            Some(LayerData::Observed(observations)) => {
                let layout = self.spec.moe_layers[layer.index].clone().ok_or_else(|| {
                    Error::InvalidArgument(format!("layer {} is not a MoE layer", layer.index))
                })?;
                let experts = LayerExperts::new(self.weights.checkpoint, &layout);
                Some(observations.into_statistics(None, &experts, wanted, self.backend)?)
            }
        };
        Ok(Some(LayerOutcome {
            index: layer.index,
            statistics,
            held_out: layer.held_out,
        }))
    }

    /// Runs every batch through the next layer (recording on MoE layers) and returns what was
    /// recorded; `None` after the last layer. Only this layer's weights are resident meanwhile.
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
                data: statistics.map(LayerData::Replayed),
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
        let mut recorder = self.spec.moe_layers[index]
            .as_ref()
            .map(|layout| self.recorder(layout))
            .transpose()?;
        let mut output_energy = 0.0;
        for hidden in self.hidden.iter_mut() {
            let observer: Option<&mut dyn MoeObserver> = match recorder.as_mut() {
                Some(r) => Some(r),
                None => None,
            };
            let (next, _) = layer.forward(hidden, rotary, observer)?;
            if recorder.is_some() && self.recording_on {
                output_energy += token_energies(&next)?
                    .iter()
                    .map(|&e| f64::from(e))
                    .sum::<f64>();
            }
            *hidden = next;
        }
        // Held-out windows are recorded only when statistics are (not while skipping a layer).
        let mut held_out_recorder = self.spec.moe_layers[index]
            .as_ref()
            .filter(|_| self.recording_on)
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
        let data = recorder.map(|r| {
            let saliency = r.saliency.as_ref().map(SaliencyAccumulator::saliency);
            let energy = r.saliency.as_ref().map(SaliencyAccumulator::output_energy);
            let mut observations = LayerObservations {
                layer: index,
                routing_counts: Vec::new(),
                tokens: 0,
                saliency,
                expert_output_energy: energy,
                output_energy,
                batches: r.batches,
                down_grams: r.down_gram.map(|down| down.grams),
            };
            let (counts, tokens) = observations.counts();
            observations.routing_counts = counts;
            observations.tokens = tokens;
            LayerData::Observed(observations)
        });
        let held_out = match held_out_recorder {
            Some(r) => r.finish()?,
            None => None,
        };
        Ok(Some(CalibratedLayer {
            index,
            data,
            held_out,
        }))
    }
}

/// Calibration windows split into those that calibrate and those held out.
pub type SplitWindows = (Vec<Vec<u32>>, Vec<Vec<u32>>);

/// Splits `windows` into those that calibrate and those held out: `max(1, round(n·fraction))`
/// windows spread evenly over the list (at least one is left to calibrate).
pub fn split_holdout(windows: &[Vec<u32>], fraction: f64) -> Result<SplitWindows> {
    let n = windows.len();
    if n < 2 {
        return Err(Error::InvalidArgument(format!(
            "holding out calibration windows needs at least two, but the calibration data gave \
             only {n}; use more data or a shorter --seq-len"
        )));
    }
    let held = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let mut is_held = vec![false; n];
    for j in 0..held {
        is_held[(2 * j + 1) * n / (2 * held)] = true;
    }
    let (mut kept, mut out) = (Vec::new(), Vec::new());
    for (window, held) in windows.iter().zip(is_held) {
        match held {
            true => out.push(window.clone()),
            false => kept.push(window.clone()),
        }
    }
    Ok((kept, out))
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
            experts: None,
            output_energy: 0.0,
            pruning: None,
            routed_inputs: None,
        });
    }
    layers.sort_by_key(|l| l.layer);
    Ok(Some(layers))
}
