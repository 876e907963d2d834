//! MoE architectures (one file each) and the decoder that runs them.
//!
//! Every architecture turns its `config.json` into a [`ModelSpec`] (the facts the pipeline needs)
//! and loads one [`DecoderLayer`] at a time, which is what lets calibration stream layers.

pub mod common;
pub mod deepseek_v2;
pub mod deepseek_v3;
pub mod experts;
pub mod mixtral;
pub mod moe;
pub mod olmoe;
pub mod qwen2_moe;
pub mod qwen3_moe;
pub mod routing;
pub mod validate;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::checkpoint::experts::ExpertLayout;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::format::{CompressionRecord, COMPRESSION_KEY};
use common::{
    new_layer_cache, Attention, GatedMlp, LayerKvCache, Linear, RmsNorm, RopeStyle, Rotary, Weights,
};
use moe::{MoeBlock, MoeObserver, RoutedExperts};

/// Prefix of the `model_type` of a compressed checkpoint (`rfid_moe_qwen3_moe`), which names
/// our own transformers classes (`pipeline::hf_compat`); the family is what follows it.
pub const COMPRESSED_MODEL_TYPE_PREFIX: &str = "rfid_moe_";

/// The supported model families, by `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// `mixtral`
    Mixtral,
    /// `qwen2_moe`
    Qwen2Moe,
    /// `qwen3_moe`
    Qwen3Moe,
    /// `olmoe`
    Olmoe,
    /// `deepseek_v2`
    DeepseekV2,
    /// `deepseek_v3`
    DeepseekV3,
}

impl Family {
    /// The family named by `model_type` (or by a compressed checkpoint's
    /// `rfid_moe_<model_type>`), if supported.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        let model_type = model_type
            .strip_prefix(COMPRESSED_MODEL_TYPE_PREFIX)
            .unwrap_or(model_type);
        Some(match model_type {
            "mixtral" => Self::Mixtral,
            "qwen2_moe" => Self::Qwen2Moe,
            "qwen3_moe" => Self::Qwen3Moe,
            "olmoe" => Self::Olmoe,
            "deepseek_v2" => Self::DeepseekV2,
            "deepseek_v3" => Self::DeepseekV3,
            _ => return None,
        })
    }

    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Mixtral => "mixtral",
            Self::Qwen2Moe => "qwen2_moe",
            Self::Qwen3Moe => "qwen3_moe",
            Self::Olmoe => "olmoe",
            Self::DeepseekV2 => "deepseek_v2",
            Self::DeepseekV3 => "deepseek_v3",
        }
    }
}

/// Family-independent facts about a model, derived from `config.json`.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The family.
    pub family: Family,
    /// Decoder layers.
    pub num_layers: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// For each layer, where its routed experts live (`None` for dense layers).
    pub moe_layers: Vec<Option<ExpertLayout>>,
    /// Shared-expert intermediate size per MoE layer (0 when there is none).
    pub shared_expert_intermediate_size: usize,
    /// Whether `lm_head` reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Maximum positions the rotary table covers.
    pub max_positions: usize,
    /// How rotary embeddings are laid out.
    pub rotary: RotarySpec,
}

/// The rotary-embedding layout of a family (the base and scaling come from `config.json`).
#[derive(Debug, Clone, Copy)]
pub struct RotarySpec {
    /// Rotary dimensions per head.
    pub dim: usize,
    /// How dimensions are paired.
    pub style: RopeStyle,
    /// Base θ when the config names none.
    pub default_theta: f64,
}

impl ModelSpec {
    /// Indices of the MoE layers.
    pub fn moe_layer_indices(&self) -> Vec<usize> {
        self.moe_layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.as_ref().map(|_| i))
            .collect()
    }
}

/// The attention variant of a layer.
#[derive(Debug, Clone)]
pub enum AttentionBlock {
    /// Grouped-query attention.
    Standard(Attention),
    /// DeepSeek multi-head latent attention.
    Latent(deepseek_v2::LatentAttention),
}

/// The feed-forward variant of a layer.
#[derive(Debug, Clone)]
pub enum FeedForward {
    /// A dense gated MLP.
    Dense(GatedMlp),
    /// A sparse MoE block.
    Moe(MoeBlock),
}

/// One pre-norm decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Layer index.
    pub index: usize,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub attention: AttentionBlock,
    /// Norm before the feed-forward block.
    pub post_attention_layernorm: RmsNorm,
    /// Feed-forward block.
    pub feed_forward: FeedForward,
}

impl DecoderLayer {
    /// Assembles layer `index` from its attention and feed-forward blocks, loading the two norms
    /// `model.layers.{index}.{input,post_attention}_layernorm`.
    pub fn with_norms(
        weights: &Weights,
        index: usize,
        hidden_size: usize,
        eps: f64,
        attention: AttentionBlock,
        feed_forward: FeedForward,
    ) -> Result<Self> {
        let prefix = format!("model.layers.{index}");
        Ok(Self {
            index,
            input_layernorm: weights.rms_norm(
                &format!("{prefix}.input_layernorm"),
                hidden_size,
                eps,
            )?,
            attention,
            post_attention_layernorm: weights.rms_norm(
                &format!("{prefix}.post_attention_layernorm"),
                hidden_size,
                eps,
            )?,
            feed_forward,
        })
    }

    /// Runs the layer on `x` [batch, seq, hidden]; returns the output and, for MoE layers, the
    /// router logits [batch*seq, experts].
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        observer: Option<&mut dyn MoeObserver>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.forward_cached(x, rotary, observer, None)
    }

    /// Runs the layer on `x` [batch, seq, hidden] placed after the positions held in `cache`,
    /// which receives this step's keys and values.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        observer: Option<&mut dyn MoeObserver>,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let normed = self.input_layernorm.forward(x)?;
        let attended = match &self.attention {
            AttentionBlock::Standard(a) => a.forward(&normed, rotary, cache)?,
            AttentionBlock::Latent(a) => a.forward(&normed, rotary, cache)?,
        };
        let x = (x + attended)?;
        let normed = self.post_attention_layernorm.forward(&x)?;
        let (y, router_logits) = match &self.feed_forward {
            FeedForward::Dense(mlp) => (mlp.forward(&normed)?, None),
            FeedForward::Moe(block) => {
                let (y, logits) = block.forward(&normed, self.index, observer)?;
                (y, Some(logits))
            }
        };
        Ok(((x + y)?, router_logits))
    }
}

/// A parsed architecture configuration.
#[derive(Debug, Clone)]
pub enum ArchConfig {
    /// Mixtral.
    Mixtral(mixtral::Config),
    /// Qwen2-MoE.
    Qwen2Moe(qwen2_moe::Config),
    /// Qwen3-MoE.
    Qwen3Moe(qwen3_moe::Config),
    /// OLMoE.
    Olmoe(olmoe::Config),
    /// DeepSeek-V2.
    DeepseekV2(deepseek_v2::Config),
    /// DeepSeek-V3.
    DeepseekV3(deepseek_v3::Config),
}

fn parse_config<T: serde::de::DeserializeOwned>(checkpoint: &Checkpoint) -> Result<T> {
    let config = checkpoint.config();
    serde_json::from_value(config.clone()).map_err(|e| Error::Config {
        path: checkpoint.config_path(),
        message: match culprit_key::<T>(config) {
            Some(key) => format!("key `{key}` = {}: {e}", config[&key]),
            None => format!("does not describe the model as expected: {e}"),
        },
    })
}

/// The top-level key of `config` that makes it fail to parse as `T` (serde's errors for a value
/// of the wrong type do not say which key held it): the one whose removal lets it parse, or
/// turns the error into that key missing.
fn culprit_key<T: serde::de::DeserializeOwned>(config: &serde_json::Value) -> Option<String> {
    let fields = config.as_object()?;
    fields.keys().find_map(|key| {
        let mut without = fields.clone();
        without.remove(key);
        let culprit = match serde_json::from_value::<T>(serde_json::Value::Object(without)) {
            Ok(_) => true,
            Err(e) => e.to_string().starts_with(&format!("missing field `{key}`")),
        };
        culprit.then(|| key.clone())
    })
}

impl ArchConfig {
    /// Parses the checkpoint's `config.json` according to its `model_type`.
    pub fn from_checkpoint(checkpoint: &Checkpoint) -> Result<Self> {
        let path = checkpoint.config_path();
        let model_type = checkpoint
            .config()
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Config {
                path: path.clone(),
                message: "missing key `model_type`".into(),
            })?;
        let family = Family::from_model_type(model_type).ok_or_else(|| Error::Config {
            path: path.clone(),
            message: format!(
                "unsupported model_type `{model_type}` (supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3)"
            ),
        })?;
        let config = match family {
            Family::Mixtral => Self::Mixtral(parse_config(checkpoint)?),
            Family::Qwen2Moe => Self::Qwen2Moe(parse_config(checkpoint)?),
            Family::Qwen3Moe => Self::Qwen3Moe(parse_config(checkpoint)?),
            Family::Olmoe => Self::Olmoe(parse_config(checkpoint)?),
            Family::DeepseekV2 => Self::DeepseekV2(parse_config(checkpoint)?),
            Family::DeepseekV3 => Self::DeepseekV3(parse_config(checkpoint)?),
        };
        config.validate(&path)?;
        validate::check_float_keys(checkpoint.config(), &path)?;
        let spec = config.spec();
        common::rope_parameters(checkpoint.config(), &path, spec.rotary.default_theta)?;
        validate::check_layer_tensors(checkpoint, &spec)?;
        validate::check_expert_tensors(checkpoint, &spec, config.experts_key())?;
        Ok(config)
    }

    fn validate(&self, path: &std::path::Path) -> Result<()> {
        if let Self::Olmoe(olmoe::Config {
            clip_qkv: Some(clip),
            ..
        }) = self
        {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!("clip_qkv = {clip} is not supported yet (only null)"),
            });
        }
        self.validate_sizes(path)?;
        let spec = self.spec();
        let bad = |message: String| {
            Err(Error::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        if spec.num_layers == 0 || spec.hidden_size == 0 || spec.vocab_size == 0 {
            return bad("num_hidden_layers, hidden_size and vocab_size must be positive".into());
        }
        for layout in spec.moe_layers.iter().flatten() {
            if layout.num_experts == 0 || spec.top_k == 0 || spec.top_k > layout.num_experts {
                return bad(format!(
                    "num_experts_per_tok = {} must be between 1 and the number of experts ({})",
                    spec.top_k, layout.num_experts
                ));
            }
        }
        Ok(())
    }

    /// Family-independent facts.
    pub fn spec(&self) -> ModelSpec {
        match self {
            Self::Mixtral(c) => c.spec(),
            Self::Qwen2Moe(c) => c.spec(),
            Self::Qwen3Moe(c) => c.spec(),
            Self::Olmoe(c) => c.spec(),
            Self::DeepseekV2(c) => c.spec(),
            Self::DeepseekV3(c) => c.spec(),
        }
    }

    /// Rotary tables for this model.
    pub fn rotary(&self, checkpoint: &Checkpoint, dtype: DType, device: &Device) -> Result<Rotary> {
        let spec = self.spec();
        let RotarySpec {
            dim,
            style,
            default_theta,
        } = spec.rotary;
        let rope = common::rope_parameters(
            checkpoint.config(),
            &checkpoint.config_path(),
            default_theta,
        )?;
        Rotary::new(dim, &rope, spec.max_positions, style, dtype, device)
    }

    /// Loads decoder layer `index` (its routed experts via `experts`).
    pub fn load_layer(
        &self,
        weights: &Weights,
        index: usize,
        compression: Option<&CompressionRecord>,
    ) -> Result<DecoderLayer> {
        self.load_layer_with_expert_dtype(weights, index, compression, weights.dtype)
    }

    /// Loads decoder layer `index` with its routed experts held in `expert_dtype` (e.g. the
    /// checkpoint's bf16, half the memory of f32); they compute in the activations' dtype, which
    /// gives the same results as experts loaded in that dtype whenever the cast is exact.
    pub fn load_layer_with_expert_dtype(
        &self,
        weights: &Weights,
        index: usize,
        compression: Option<&CompressionRecord>,
        expert_dtype: DType,
    ) -> Result<DecoderLayer> {
        let spec = self.spec();
        let moe = match &spec.moe_layers[index] {
            Some(layout) => Some(RoutedExperts::load(
                layout,
                weights.checkpoint,
                index,
                compression,
                expert_dtype,
                weights.device,
            )?),
            None => None,
        };
        match self {
            Self::Mixtral(c) => c.load_layer(weights, index, moe),
            Self::Qwen2Moe(c) => c.load_layer(weights, index, moe),
            Self::Qwen3Moe(c) => c.load_layer(weights, index, moe),
            Self::Olmoe(c) => c.load_layer(weights, index, moe),
            Self::DeepseekV2(c) => c.load_layer(weights, index, moe),
            Self::DeepseekV3(c) => c.load_layer(weights, index, moe),
        }
    }
}

/// Reads the compression record from a checkpoint's `config.json`, if it has one; a record of
/// another method or an unknown factor storage is refused (its tensors would be misread).
pub fn compression_record(checkpoint: &Checkpoint) -> Result<Option<CompressionRecord>> {
    let bad = |message: String| Error::Config {
        path: checkpoint.config_path(),
        message,
    };
    let record: CompressionRecord = match checkpoint.config().get(COMPRESSION_KEY) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(value) => serde_json::from_value(value.clone())
            .map_err(|e| bad(format!("invalid `{COMPRESSION_KEY}` section: {e}")))?,
    };
    if record.method != crate::format::METHOD {
        return Err(bad(format!(
            "`{COMPRESSION_KEY}.method` is `{}`, a compression this version cannot read \
             (expected `{}`)",
            record.method,
            crate::format::METHOD
        )));
    }
    if let Some(storage) = record
        .factor_storage
        .as_deref()
        .filter(|&s| s != crate::checkpoint::int8::STORAGE_NAME)
    {
        return Err(bad(format!(
            "`{COMPRESSION_KEY}.factor_storage` is `{storage}`, a storage this version cannot \
             read (expected `{}` or none)",
            crate::checkpoint::int8::STORAGE_NAME
        )));
    }
    Ok(Some(record))
}

/// Embedding, final norm and output head: the parts of a model outside the decoder layers.
#[derive(Debug, Clone)]
pub struct ModelEnds {
    /// Token embeddings, [vocab, hidden].
    pub embed_tokens: Tensor,
    /// Final norm.
    pub norm: RmsNorm,
    /// Output head.
    pub lm_head: Linear,
}

impl ModelEnds {
    /// Loads `model.embed_tokens`, `model.norm` and `lm_head` (or the tied embedding).
    pub fn load(weights: &Weights, spec: &ModelSpec, rms_norm_eps: f64) -> Result<Self> {
        let (v, h) = (spec.vocab_size, spec.hidden_size);
        let embed_tokens = weights.get("model.embed_tokens.weight", &[v, h])?;
        let norm = weights.rms_norm("model.norm", h, rms_norm_eps)?;
        let lm_head = if spec.tie_word_embeddings && !weights.contains("lm_head.weight") {
            Linear {
                weight: embed_tokens.clone(),
                bias: None,
            }
        } else {
            weights.linear("lm_head", h, v, false)?
        };
        Ok(Self {
            embed_tokens,
            norm,
            lm_head,
        })
    }

    /// Embeds `input_ids` [batch, seq] (integer) to [batch, seq, hidden].
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if input_ids.dtype() == DType::I64 && b * s > 0 {
            // Ids outside u32 would wrap in the cast below: report them as they are.
            let flat = input_ids.flatten_all()?;
            let vocab = self.embed_tokens.dim(0)? as i64;
            for id in [flat.min(0)?, flat.max(0)?] {
                let id = id.to_scalar::<i64>()?;
                if !(0..vocab).contains(&id) {
                    return Err(Error::InvalidArgument(format!(
                        "token id {id} is out of range for a vocabulary of {vocab} (expected ids in [0, {vocab}))"
                    )));
                }
            }
        }
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let vocab = self.embed_tokens.dim(0)?;
        let max = ids.max(0)?.to_scalar::<u32>()? as usize;
        if max >= vocab {
            return Err(Error::InvalidArgument(format!(
                "token id {max} is out of range for a vocabulary of {vocab}"
            )));
        }
        Ok(self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, s, ()))?)
    }

    /// Final norm and head: [batch, seq, hidden] -> logits [batch, seq, vocab].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(&self.norm.forward(hidden)?)
    }
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct ForwardOutput {
    /// Logits, [batch, seq, vocab].
    pub logits: Tensor,
    /// Router logits of each MoE layer, (layer index, [batch*seq, experts]).
    pub router_logits: Vec<(usize, Tensor)>,
}

/// A whole model held in memory.
#[derive(Debug)]
pub struct Model {
    /// Parsed configuration.
    pub config: ArchConfig,
    /// Family-independent facts.
    pub spec: ModelSpec,
    /// Embedding, final norm and head.
    pub ends: ModelEnds,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Rotary tables.
    pub rotary: Rotary,
}

/// RMSNorm epsilon of a config (all supported families call it `rms_norm_eps`).
pub fn rms_norm_eps(checkpoint: &Checkpoint) -> f64 {
    checkpoint
        .config()
        .get("rms_norm_eps")
        .and_then(|v| v.as_f64())
        .unwrap_or(1e-6)
}

impl Model {
    /// Loads the whole model from a checkpoint onto `device` in `dtype`.
    pub fn load(checkpoint: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let config = ArchConfig::from_checkpoint(checkpoint)?;
        let spec = config.spec();
        let compression = compression_record(checkpoint)?;
        let weights = Weights {
            checkpoint,
            device,
            dtype,
            family: spec.family.model_type(),
        };
        let ends = ModelEnds::load(&weights, &spec, rms_norm_eps(checkpoint))?;
        let layers = (0..spec.num_layers)
            .map(|i| config.load_layer(&weights, i, compression.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let rotary = config.rotary(checkpoint, dtype, device)?;
        Ok(Self {
            config,
            spec,
            ends,
            layers,
            rotary,
        })
    }

    /// Runs `input_ids` [batch, seq] through the model.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        mut observer: Option<&mut dyn MoeObserver>,
    ) -> Result<ForwardOutput> {
        let mut hidden = self.ends.embed(input_ids)?;
        let mut router_logits = Vec::new();
        let mut sums = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let layer_observer: Option<&mut dyn MoeObserver> = match observer.as_mut() {
                Some(o) => Some(&mut **o),
                None => None,
            };
            let (next, logits) = layer.forward(&hidden, &self.rotary, layer_observer)?;
            hidden = next;
            sums.push(hidden_sum(&hidden)?);
            if let Some(logits) = logits {
                router_logits.push((layer.index, logits));
            }
        }
        let logits = self.ends.logits(&hidden)?;
        check_finite_logits(&logits, &sums)?;
        Ok(ForwardOutput {
            logits,
            router_logits,
        })
    }

    /// Runs `input_ids` [batch, seq] after the positions already in `cache` and returns the
    /// logits of the last position, [batch, vocab]; `cache` receives the new keys and values.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "the cache has {} layers but the model has {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        let seq = input_ids.dim(1)?;
        if seq == 0 {
            return Err(Error::InvalidArgument(
                "a forward pass needs at least one token".into(),
            ));
        }
        let mut hidden = self.ends.embed(input_ids)?;
        let mut sums = Vec::with_capacity(self.layers.len());
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            hidden = layer
                .forward_cached(&hidden, &self.rotary, None, Some(layer_cache))?
                .0;
            sums.push(hidden_sum(&hidden)?);
        }
        let last = hidden.narrow(1, seq - 1, 1)?;
        let logits = self.ends.logits(&last)?.squeeze(1)?;
        check_finite_logits(&logits, &sums)?;
        Ok(logits)
    }

    /// Bytes held by the routed experts of every layer ([`RoutedExperts::resident_bytes`]).
    pub fn routed_expert_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|layer| match &layer.feed_forward {
                FeedForward::Moe(block) => block.experts.resident_bytes(),
                FeedForward::Dense(_) => 0,
            })
            .sum()
    }

    /// An empty key/value cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: self.layers.iter().map(|_| new_layer_cache()).collect(),
        }
    }
}

/// The sum of a layer's output in f32, a scalar on its device: finite exactly when the output is
/// (barring an overflow of the sum), and read only when the logits turn out not to be.
fn hidden_sum(hidden: &Tensor) -> Result<Tensor> {
    Ok(hidden.to_dtype(DType::F32)?.sum_all()?)
}

/// Refuses logits holding NaN or ±Inf, naming the first decoder layer whose output was not finite
/// (`sums`: each layer's [`hidden_sum`], in order), or the final norm and head when none was.
fn check_finite_logits(logits: &Tensor, sums: &[Tensor]) -> Result<()> {
    let Some((index, value)) = crate::safety::finite::first_non_finite(logits)? else {
        return Ok(());
    };
    let mut first_bad = None;
    for (layer, sum) in sums.iter().enumerate() {
        if !sum.to_scalar::<f32>()?.is_finite() {
            first_bad = Some(layer);
            break;
        }
    }
    let source = match first_bad {
        Some(layer) => format!(
            "the hidden states first stop being finite at the output of decoder layer {layer} \
             (`model.layers.{layer}.*`): check its weights and scales, and config.json's rotary \
             and norm settings"
        ),
        None => "every decoder layer's output is finite, so the final norm or the head \
                 (`model.norm`, `lm_head`) produced them"
            .to_string(),
    };
    Err(Error::Numerical(format!(
        "the model's logits hold {value} at element {index} (expected finite values); {source}"
    )))
}

/// Keys and values of the positions a model has already processed, one cache per layer (not
/// `Clone`: candle's cache writes in place into a buffer a clone would share).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKvCache>,
}

impl KvCache {
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |c| c.current_seq_len())
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the keys and values held (DeepSeek's latent attention keeps one latent and one
    /// rotary key per position instead of every head's key and value).
    pub fn stored_bytes(&self) -> Result<usize> {
        let mut bytes = 0;
        for layer in &self.layers {
            for tensor in [layer.k()?, layer.v()?].into_iter().flatten() {
                bytes += tensor.elem_count() * tensor.dtype().size_in_bytes();
            }
        }
        Ok(bytes)
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|c| c.reset());
    }
}
