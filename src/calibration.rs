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
    replay: Option<Vec<LayerStatistics>>,
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
            replay: None,
        })
    }

    /// Streams the layers without running them, handing out previously saved statistics instead.
    pub fn replay(
        checkpoint: &'a Checkpoint,
        device: &'a Device,
        statistics: Vec<LayerStatistics>,
    ) -> Result<Self> {
        let config = ArchConfig::from_checkpoint(checkpoint)?;
        let spec = config.spec();
        for layer in spec.moe_layer_indices() {
            let experts = spec.moe_layers[layer].as_ref().map_or(0, |l| l.num_experts);
            let found = statistics.iter().find(|s| s.layer == layer);
            if found.is_none_or(|s| s.routing_counts.len() != experts) {
                return Err(Error::InvalidArgument(format!(
                    "saved calibration statistics do not match {} (layer {layer})",
                    checkpoint.dir().display()
                )));
            }
        }
        let weights = Weights {
            checkpoint,
            device,
            dtype: DType::F32,
            family: spec.family.model_type(),
        };
        let rotary = config.rotary(checkpoint, DType::F32, device)?;
        Ok(Self {
            config,
            spec,
            weights,
            rotary,
            hidden: Vec::new(),
            next_layer: 0,
            collect_gram: false,
            replay: Some(statistics),
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
        if let Some(saved) = &mut self.replay {
            let stats = saved
                .iter()
                .position(|s| s.layer == index)
                .map(|i| saved.swap_remove(i));
            return Ok(Some((layer, stats)));
        }
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

/// Saves per-layer statistics (routing counts and, if present, Gram matrices) with the
/// calibration fingerprint, so that later runs on the same data can skip the forward passes.
pub fn save_statistics(
    path: &std::path::Path,
    statistics: &[LayerStatistics],
    fingerprint: &str,
) -> Result<()> {
    let mut tensors = std::collections::HashMap::new();
    for stats in statistics {
        let counts: Vec<i64> = stats.routing_counts.iter().map(|&c| c as i64).collect();
        let n = counts.len();
        tensors.insert(
            format!("layer.{}.routing_counts", stats.layer),
            Tensor::from_vec(counts, n, &Device::Cpu)?,
        );
        tensors.insert(
            format!("layer.{}.tokens", stats.layer),
            Tensor::new(&[stats.tokens as i64], &Device::Cpu)?,
        );
        if let Some(grams) = &stats.gram {
            let d = grams.first().map_or(0, |g| g.nrows());
            let values: Vec<f64> = grams
                .iter()
                .flat_map(|g| (0..d).flat_map(move |i| (0..d).map(move |j| g[(i, j)])))
                .collect();
            tensors.insert(
                format!("layer.{}.gram", stats.layer),
                Tensor::from_vec(values, (n, d, d), &Device::Cpu)?,
            );
        }
    }
    let fingerprint_bytes: Vec<u8> = fingerprint.bytes().collect();
    let len = fingerprint_bytes.len();
    tensors.insert(
        "fingerprint".into(),
        Tensor::from_vec(fingerprint_bytes, len, &Device::Cpu)?,
    );
    crate::checkpoint::writer::save_safetensors_atomic(path, &tensors)
}

/// Loads statistics saved by [`save_statistics`]; `None` when they were made from other data.
pub fn load_statistics(
    path: &std::path::Path,
    fingerprint: &str,
) -> Result<Option<Vec<LayerStatistics>>> {
    let tensors = crate::checkpoint::load_all(path, &Device::Cpu)?;
    let saved: Vec<u8> = match tensors.get("fingerprint") {
        Some(t) => t.to_vec1()?,
        None => return Ok(None),
    };
    if saved != fingerprint.as_bytes() {
        return Ok(None);
    }
    let mut layers = Vec::new();
    for (name, tensor) in &tensors {
        let Some(layer) = name
            .strip_prefix("layer.")
            .and_then(|r| r.strip_suffix(".routing_counts"))
        else {
            continue;
        };
        let layer: usize = layer.parse().map_err(|_| Error::Safetensors {
            path: path.to_path_buf(),
            message: format!("bad statistics key `{name}`"),
        })?;
        let routing_counts: Vec<u64> = tensor
            .to_vec1::<i64>()?
            .into_iter()
            .map(|c| c as u64)
            .collect();
        let tokens = tensors
            .get(&format!("layer.{layer}.tokens"))
            .map(|t| t.to_vec1::<i64>())
            .transpose()?
            .and_then(|v| v.first().copied())
            .unwrap_or(0) as u64;
        let gram = match tensors.get(&format!("layer.{layer}.gram")) {
            Some(t) => {
                let (n, d, _) = t.dims3()?;
                let values: Vec<f64> = t.flatten_all()?.to_vec1()?;
                Some(
                    (0..n)
                        .map(|e| Mat::from_fn(d, d, |i, j| values[e * d * d + i * d + j]))
                        .collect(),
                )
            }
            None => None,
        };
        layers.push(LayerStatistics {
            layer,
            routing_counts,
            tokens,
            gram,
        });
    }
    layers.sort_by_key(|l| l.layer);
    Ok(Some(layers))
}
