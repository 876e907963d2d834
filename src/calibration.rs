//! Calibration: run the uncompressed model over token windows one decoder layer at a time and
//! collect, per MoE layer, routing counts (top-k hits per expert) and, optionally, each expert's
//! input Gram matrix from the tokens routed to it.
//!
//! Hidden states are carried from layer to layer, so only one layer's weights and statistics are
//! resident at a time: the model may be larger than memory.

use candle_core::{DType, Device, Tensor};
use faer::Mat;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::models::common::{Rotary, Weights};
use crate::models::moe::{MoeObserver, MoeTrace};
use crate::models::{
    compression_record, rms_norm_eps, ArchConfig, DecoderLayer, ModelEnds, ModelSpec,
};

/// What calibration learned about one MoE layer.
#[derive(Debug, Clone)]
pub struct LayerStatistics {
    /// Decoder layer index.
    pub layer: usize,
    /// Top-k hits per expert; sums to tokens × top_k.
    pub routing_counts: Vec<u64>,
    /// Tokens that passed through the layer.
    pub tokens: u64,
    /// Per expert, Σ xxᵀ over its routed inputs (d×d), when requested.
    pub gram: Option<Vec<Mat<f64>>>,
}

impl LayerStatistics {
    /// Experts that no calibration token was routed to.
    pub fn unused_experts(&self) -> Vec<usize> {
        self.routing_counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c == 0)
            .map(|(i, _)| i)
            .collect()
    }

    /// Sum of the Gram matrices of `experts` (None without Gram statistics).
    pub fn group_gram(&self, experts: &[usize]) -> Option<Mat<f64>> {
        let grams = self.gram.as_ref()?;
        let d = grams.first()?.nrows();
        let mut sum = Mat::<f64>::zeros(d, d);
        for &e in experts {
            sum += &grams[e];
        }
        Some(sum)
    }
}

struct StatisticsCollector {
    stats: LayerStatistics,
}

impl MoeObserver for StatisticsCollector {
    fn observe(&mut self, trace: &MoeTrace) -> Result<()> {
        let num_experts = self.stats.routing_counts.len();
        self.stats.tokens += trace.input.dim(0)? as u64;
        for (expert, (tokens, _)) in trace
            .routing
            .tokens_per_expert(num_experts)
            .into_iter()
            .enumerate()
        {
            self.stats.routing_counts[expert] += tokens.len() as u64;
            if let (Some(grams), false) = (self.stats.gram.as_mut(), tokens.is_empty()) {
                let count = tokens.len();
                let index = Tensor::from_vec(tokens, count, trace.input.device())?;
                let x = trace.input.index_select(&index, 0)?.to_dtype(DType::F32)?;
                let gram = x
                    .t()?
                    .matmul(&x)?
                    .to_dtype(DType::F64)?
                    .to_device(&Device::Cpu)?;
                let rows: Vec<Vec<f64>> = gram.to_vec2()?;
                let target = &mut grams[expert];
                for (i, row) in rows.iter().enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        target[(i, j)] += v;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Streams a checkpoint's decoder layers over calibration windows, one layer at a time.
pub struct LayerStream<'a> {
    config: ArchConfig,
    spec: ModelSpec,
    weights: Weights<'a>,
    rotary: Rotary,
    hidden: Vec<Tensor>,
    next_layer: usize,
    collect_gram: bool,
}

impl<'a> LayerStream<'a> {
    /// Embeds `windows` (each of equal length) in batches of `batch_size`.
    pub fn new(
        checkpoint: &'a Checkpoint,
        windows: &[Vec<u32>],
        batch_size: usize,
        device: &'a Device,
        collect_gram: bool,
    ) -> Result<Self> {
        if windows.is_empty() {
            return Err(Error::InvalidArgument(
                "calibration produced no token windows".into(),
            ));
        }
        let seq = windows[0].len();
        if windows.iter().any(|w| w.len() != seq) || seq == 0 {
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
        let config = ArchConfig::from_checkpoint(checkpoint)?;
        let spec = config.spec();
        let weights = Weights {
            checkpoint,
            device,
            dtype: DType::F32,
            family: spec.family.model_type(),
        };
        let ends = ModelEnds::load(&weights, &spec, rms_norm_eps(checkpoint))?;
        let mut hidden = Vec::new();
        for batch in windows.chunks(batch_size.max(1)) {
            let flat: Vec<u32> = batch.iter().flatten().copied().collect();
            let ids = Tensor::from_vec(flat, (batch.len(), seq), device)?;
            hidden.push(ends.embed(&ids)?);
        }
        let rotary = config.rotary(checkpoint, DType::F32, device)?;
        Ok(Self {
            config,
            spec,
            weights,
            rotary,
            hidden,
            next_layer: 0,
            collect_gram,
        })
    }

    /// Family-independent facts of the model.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Loads the next layer, runs every batch through it (collecting statistics on MoE layers) and
    /// returns the layer and its statistics; `None` after the last layer.
    pub fn next_layer(&mut self) -> Result<Option<(DecoderLayer, Option<LayerStatistics>)>> {
        let index = self.next_layer;
        if index >= self.spec.num_layers {
            return Ok(None);
        }
        self.next_layer += 1;
        let layer = self.config.load_layer(&self.weights, index, None)?;
        let mut collector =
            self.spec.moe_layers[index]
                .as_ref()
                .map(|layout| StatisticsCollector {
                    stats: LayerStatistics {
                        layer: index,
                        routing_counts: vec![0; layout.num_experts],
                        tokens: 0,
                        gram: self.collect_gram.then(|| {
                            (0..layout.num_experts)
                                .map(|_| Mat::zeros(layout.hidden_size, layout.hidden_size))
                                .collect()
                        }),
                    },
                });
        for hidden in self.hidden.iter_mut() {
            let observer: Option<&mut dyn MoeObserver> = match collector.as_mut() {
                Some(c) => Some(c),
                None => None,
            };
            let (next, _) = layer.forward(hidden, &self.rotary, observer)?;
            *hidden = next;
        }
        Ok(Some((layer, collector.map(|c| c.stats))))
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

/// Anonymous resident memory of this process in bytes (Linux; `None` elsewhere).
pub fn resident_anonymous_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
