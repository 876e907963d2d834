//! The timing protocol: prefill and decode steps of a model behind [`Decoder`], with the device
//! synchronised before every clock reading.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

/// A model that runs token ids after the positions it already holds (a key/value cache).
pub trait Decoder {
    /// Forgets every position (a new sequence).
    fn reset(&mut self) -> anyhow::Result<()>;
    /// Runs `input_ids` [batch, seq] after the held positions; returns the last position's
    /// logits and keeps the new positions.
    fn step(&mut self, input_ids: &Tensor) -> anyhow::Result<Tensor>;
}

/// rfid-moe's own model with its key/value cache.
pub struct Ours {
    /// The model.
    pub model: rfid_moe::models::Model,
    cache: rfid_moe::models::KvCache,
}

impl Ours {
    /// Wraps `model` with an empty cache.
    pub fn new(model: rfid_moe::models::Model) -> Self {
        let cache = model.new_cache();
        Self { model, cache }
    }

    /// Keeps only the first `layers` decoder layers (0 leaves embedding, final norm and head).
    pub fn truncate(&mut self, layers: usize) {
        self.model.layers.truncate(layers);
        self.cache = self.model.new_cache();
    }
}

impl Decoder for Ours {
    fn reset(&mut self) -> anyhow::Result<()> {
        self.cache = self.model.new_cache();
        Ok(())
    }

    fn step(&mut self, input_ids: &Tensor) -> anyhow::Result<Tensor> {
        Ok(self.model.forward_cached(input_ids, &mut self.cache)?)
    }
}

/// candle-transformers' `qwen3_moe` model (naive per-expert MoE on the CPU, its fused MoE
/// kernel when built with `cuda`), tracking its own position offset.
pub struct Anchor {
    model: candle_transformers::models::qwen3_moe::ModelForCausalLM,
    offset: usize,
}

impl Anchor {
    /// Loads the model described by `config` from `shards` (the same safetensors files our
    /// loader reads), in `dtype` on `device`.
    pub fn load(
        config: &candle_transformers::models::qwen3_moe::Config,
        shards: &[std::path::PathBuf],
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        // SAFETY: the files are memory-mapped read-only and nothing writes them while we run.
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(shards, dtype, device)? };
        let model = candle_transformers::models::qwen3_moe::ModelForCausalLM::new(config, vb)?;
        Ok(Self { model, offset: 0 })
    }
}

impl Decoder for Anchor {
    fn reset(&mut self) -> anyhow::Result<()> {
        self.model.clear_kv_cache();
        self.offset = 0;
        Ok(())
    }

    fn step(&mut self, input_ids: &Tensor) -> anyhow::Result<Tensor> {
        let logits = self.model.forward(input_ids, self.offset)?;
        self.offset += input_ids.dim(1)?;
        Ok(logits)
    }
}

/// How much to measure.
#[derive(Debug, Clone, Serialize)]
pub struct Protocol {
    /// Prompt length of the prefill, which is also the decode context.
    pub context: usize,
    /// Timed prefills at batch 1 (each on a fresh cache; the median is reported).
    pub prefill_repeats: usize,
    /// Batch sizes of the decode measurements.
    pub batches: Vec<usize>,
    /// Untimed decode steps after the prefill.
    pub warmup_steps: usize,
    /// Timed decode steps (the median is reported).
    pub timed_steps: usize,
    /// Vocabulary of the random token ids.
    pub vocab: usize,
}

/// Whole-model figures of one decoder (all its layers plus embedding, final norm and head).
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// Median prefill of `context` tokens at batch 1, ms.
    pub prefill_ms: f64,
    /// Per batch size: median decode step (one new token per sequence) after `context`
    /// positions, ms.
    pub decode_ms: Vec<(usize, f64)>,
}

/// Random token ids [batch, seq] below `vocab`.
fn random_ids(
    batch: usize,
    seq: usize,
    vocab: usize,
    seed: u64,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let ids: Vec<u32> = (0..(batch * seq) as u64)
        .map(|i| (rfid_moe::rng::splitmix64(seed ^ (i << 20)) % vocab as u64) as u32)
        .collect();
    Ok(Tensor::from_vec(ids, (batch, seq), device)?)
}

/// Milliseconds `run` takes, the device synchronised before and after.
fn timed(device: &Device, run: impl FnOnce() -> anyhow::Result<Tensor>) -> anyhow::Result<f64> {
    device.synchronize()?;
    let start = Instant::now();
    let out = run()?;
    device.synchronize()?;
    let elapsed = start.elapsed().as_secs_f64() * 1e3;
    drop(out);
    Ok(elapsed)
}

/// The median of `values` (which must not be empty).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    }
}

/// Runs the protocol on `decoder`: for each batch size, prefill(s) of `context` tokens (timed at
/// batch 1), then warm-up and timed decode steps of one token per sequence.
pub fn measure(
    decoder: &mut dyn Decoder,
    device: &Device,
    protocol: &Protocol,
) -> anyhow::Result<Timings> {
    let mut prefills = Vec::new();
    let mut decode_ms = Vec::new();
    for (b, &batch) in protocol.batches.iter().enumerate() {
        let repeats = if batch == 1 {
            protocol.prefill_repeats.max(1)
        } else {
            1
        };
        for r in 0..repeats {
            decoder.reset()?;
            let prompt = random_ids(
                batch,
                protocol.context,
                protocol.vocab,
                (b * 100 + r) as u64,
                device,
            )?;
            let ms = timed(device, || decoder.step(&prompt))?;
            if batch == 1 {
                prefills.push(ms);
            }
        }
        let mut steps = Vec::with_capacity(protocol.timed_steps);
        for step in 0..protocol.warmup_steps + protocol.timed_steps {
            let token = random_ids(batch, 1, protocol.vocab, 0xdec0de + step as u64, device)?;
            let ms = timed(device, || decoder.step(&token))?;
            if step >= protocol.warmup_steps {
                steps.push(ms);
            }
        }
        decode_ms.push((batch, median(&mut steps)));
    }
    decoder.reset()?;
    Ok(Timings {
        prefill_ms: if prefills.is_empty() {
            f64::NAN
        } else {
            median(&mut prefills)
        },
        decode_ms,
    })
}
