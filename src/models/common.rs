//! Building blocks shared by the architectures: weight access, RMSNorm, rotary embeddings,
//! grouped-query attention and the gated MLP, each matching transformers' numerics.

use candle_core::{DType, Device, Module, Tensor, D};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Reads named weights from a checkpoint with shape checks, on one device and dtype.
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    /// The checkpoint.
    pub checkpoint: &'a Checkpoint,
    /// Where tensors go.
    pub device: &'a Device,
    /// Floating-point dtype tensors are converted to.
    pub dtype: DType,
    /// Architecture name, used in error messages.
    pub family: &'static str,
}

impl<'a> Weights<'a> {
    /// Loads `name`, which config.json says must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.checkpoint
            .load_shaped(name, shape, self.dtype, self.device, self.family)
    }

    /// Loads `name` if present.
    pub fn get_optional(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.checkpoint.contains(name) {
            Ok(Some(self.get(name, shape)?))
        } else {
            Ok(None)
        }
    }

    /// Whether `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.checkpoint.contains(name)
    }

    /// A linear layer `prefix.weight` [out, in] with an optional `prefix.bias` [out].
    pub fn linear(
        &self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let weight = self.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(self.get(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// An RMSNorm `prefix.weight` [dim].
    pub fn rms_norm(&self, prefix: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.get(&format!("{prefix}.weight"), &[dim])?,
            eps,
        })
    }
}

/// `y = x Wᵀ + b` over the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight, [out, in].
    pub weight: Tensor,
    /// Optional bias, [out].
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Applies the layer to `x` [..., in].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = matmul_transposed(x, &self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `x Wᵀ` for `x` [..., in] and `w` [out, in].
pub fn matmul_transposed(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// Root-mean-square layer norm, computed in f32 as transformers does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Scale, [dim].
    pub weight: Tensor,
    /// Variance epsilon.
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let variance = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf
            .broadcast_div(&(variance + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// First half with second half (`rotate_half`, Llama/Qwen/Mixtral).
    Half,
    /// Adjacent pairs (complex multiplication, DeepSeek's MLA).
    Interleaved,
}

/// Rotary-embedding settings from `config.json`: `rope_parameters` (transformers 5) or the
/// top-level `rope_theta` with an optional `rope_scaling` object (transformers 4).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParameters {
    /// The base θ.
    pub theta: f64,
    /// YaRN context extension, when `rope_type` is `yarn`.
    pub yarn: Option<Yarn>,
}

/// YaRN parameters (transformers' `_compute_yarn_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    /// Context extension factor.
    pub factor: f64,
    /// Context length the model was trained with.
    pub original_max_position_embeddings: f64,
    /// High-frequency boundary, in rotations.
    pub beta_fast: f64,
    /// Low-frequency boundary, in rotations.
    pub beta_slow: f64,
    /// `mscale` (scales cos/sin together with `mscale_all_dim`).
    pub mscale: Option<f64>,
    /// `mscale_all_dim` (DeepSeek also scales the softmax by its square).
    pub mscale_all_dim: Option<f64>,
    /// Explicit cos/sin scaling, overriding the mscale rule.
    pub attention_factor: Option<f64>,
    /// Round the correction range to whole dimensions.
    pub truncate: bool,
}

/// YaRN's magnitude correction `0.1·m·ln(s) + 1` (1 for s ≤ 1).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl Yarn {
    /// The factor cos/sin are multiplied by.
    pub fn attention_factor(&self) -> f64 {
        if let Some(f) = self.attention_factor {
            return f;
        }
        match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                yarn_mscale(self.factor, m) / yarn_mscale(self.factor, all)
            }
            _ => yarn_mscale(self.factor, 1.0),
        }
    }

    /// Blends interpolated and extrapolated inverse frequencies for `dim` rotary dimensions.
    fn inverse_frequencies(&self, theta: f64, dim: usize) -> Vec<f64> {
        let correction_dim = |rotations: f64| {
            (dim as f64
                * (self.original_max_position_embeddings
                    / (rotations * 2.0 * std::f64::consts::PI))
                    .ln())
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (
            correction_dim(self.beta_fast),
            correction_dim(self.beta_slow),
        );
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min(dim as f64 - 1.0);
        let span = if high == low { 0.001 } else { high - low };
        (0..dim / 2)
            .map(|i| {
                let position_frequency = theta.powf((2 * i) as f64 / dim as f64);
                let extrapolation = 1.0 / position_frequency;
                let interpolation = 1.0 / (self.factor * position_frequency);
                let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                let extrapolation_weight = 1.0 - ramp;
                interpolation * (1.0 - extrapolation_weight) + extrapolation * extrapolation_weight
            })
            .collect()
    }
}

impl RopeParameters {
    /// Parses the rope settings of `config` (a `config.json`), with `default_theta` when no
    /// `rope_theta` is given. Malformed settings are refused with the key named, never replaced
    /// by defaults: `rope_parameters`/`rope_scaling` that are not objects (or null), numbers given
    /// as strings, a base θ not above 1, YaRN lengths, factors and boundaries not above 0.
    pub fn from_config(
        config: &serde_json::Value,
        path: &std::path::Path,
        default_theta: f64,
    ) -> Result<Self> {
        let read = RopeKeys { path };
        let params = read.object(config, "rope_parameters")?;
        let scaling = read.object(config, "rope_scaling")?;
        let from_params = match params {
            Some(p) => read.number(p, "rope_parameters", "rope_theta")?,
            None => None,
        };
        let theta = match from_params {
            Some(theta) => read.above(theta, "rope_parameters.rope_theta", 1.0)?,
            None => match read.number(config, "", "rope_theta")? {
                Some(theta) => read.above(theta, "rope_theta", 1.0)?,
                None => default_theta,
            },
        };
        let mut yarn = None;
        for (p, name) in [(params, "rope_parameters"), (scaling, "rope_scaling")] {
            let Some(p) = p else { continue };
            let kind = match p.get("rope_type").or_else(|| p.get("type")) {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(kind)) => Some(kind.as_str()),
                Some(other) => {
                    return Err(read.bad(format!(
                        "`{name}.rope_type` is {other} (expected a string such as \"default\" or \
                         \"yarn\")"
                    )))
                }
            };
            match kind {
                None | Some("default") => {}
                Some("yarn") => yarn = Some(read.yarn(config, p, name)?),
                Some(other) => {
                    return Err(read.bad(format!(
                        "rope type `{other}` is not supported yet (implemented: default, yarn)"
                    )))
                }
            }
        }
        Ok(Self { theta, yarn })
    }

    /// DeepSeek's extra softmax scale under YaRN: `mscale(factor, mscale_all_dim)²` (1 otherwise).
    pub fn softmax_scale_multiplier(&self) -> f64 {
        match &self.yarn {
            Some(y) => match y.mscale_all_dim {
                Some(all) if all != 0.0 => yarn_mscale(y.factor, all).powi(2),
                _ => 1.0,
            },
            None => 1.0,
        }
    }
}

/// Reads the rotary keys of one `config.json`, naming the key and the file in every error.
struct RopeKeys<'a> {
    path: &'a std::path::Path,
}

/// A rotary settings object, quoted in errors.
const ROPE_EXAMPLE: &str = r#"{"rope_type": "default", "rope_theta": 10000.0}"#;

impl RopeKeys<'_> {
    fn bad(&self, message: String) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            message,
        }
    }

    /// The object under `key` of `config`; `None` when absent or null.
    fn object<'v>(
        &self,
        config: &'v serde_json::Value,
        key: &str,
    ) -> Result<Option<&'v serde_json::Value>> {
        match config.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(value @ serde_json::Value::Object(_)) => Ok(Some(value)),
            Some(other) => Err(self.bad(format!(
                "`{key}` is {other} (expected an object such as {ROPE_EXAMPLE}, or null)"
            ))),
        }
    }

    /// The finite number under `key` of `object` (named `parent.key` in errors); `None` when
    /// absent or null.
    fn number(&self, object: &serde_json::Value, parent: &str, key: &str) -> Result<Option<f64>> {
        let name = match parent {
            "" => key.to_string(),
            _ => format!("{parent}.{key}"),
        };
        match object.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Number(n)) => match n.as_f64().filter(|v| v.is_finite()) {
                Some(value) => Ok(Some(value)),
                None => Err(self.bad(format!("`{name}` = {n} is not a finite number"))),
            },
            Some(other) => Err(self.bad(format!("`{name}` is {other} (expected a number)"))),
        }
    }

    /// `value` of key `name` when it is greater than `floor`.
    fn above(&self, value: f64, name: &str, floor: f64) -> Result<f64> {
        match value > floor {
            true => Ok(value),
            false => Err(self.bad(format!(
                "`{name}` = {value} is out of range (expected a number greater than {floor})"
            ))),
        }
    }

    /// The YaRN settings of the rope object `p` (named `name`) of `config`.
    fn yarn(&self, config: &serde_json::Value, p: &serde_json::Value, name: &str) -> Result<Yarn> {
        let number = |key: &str| self.number(p, name, key);
        let positive = |key: &str| -> Result<Option<f64>> {
            number(key)?
                .map(|v| self.above(v, &format!("{name}.{key}"), 0.0))
                .transpose()
        };
        let factor = positive("factor")?.ok_or_else(|| {
            self.bad(format!(
                "yarn rope scaling needs `{name}.factor` (a number above 0)"
            ))
        })?;
        let max_positions = self
            .number(config, "", "max_position_embeddings")?
            .filter(|&v| v > 0.0);
        let truncate = match p.get("truncate") {
            None | Some(serde_json::Value::Null) => true,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => {
                return Err(self.bad(format!(
                    "`{name}.truncate` is {other} (expected true or false)"
                )))
            }
        };
        Ok(Yarn {
            factor,
            original_max_position_embeddings: positive("original_max_position_embeddings")?
                .or(max_positions)
                .unwrap_or(4096.0),
            beta_fast: positive("beta_fast")?.unwrap_or(32.0),
            beta_slow: positive("beta_slow")?.unwrap_or(1.0),
            mscale: number("mscale")?,
            mscale_all_dim: number("mscale_all_dim")?,
            attention_factor: positive("attention_factor")?,
            truncate,
        })
    }
}

/// Parses the rope settings of a `config.json` (see [`RopeParameters::from_config`]).
pub fn rope_parameters(
    config: &serde_json::Value,
    path: &std::path::Path,
    default_theta: f64,
) -> Result<RopeParameters> {
    RopeParameters::from_config(config, path, default_theta)
}

/// Precomputed rotary cos/sin tables.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl Rotary {
    /// Tables for `dim` rotary dimensions, positions `0..max_positions`.
    pub fn new(
        dim: usize,
        rope: &RopeParameters,
        max_positions: usize,
        style: RopeStyle,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let theta = rope.theta;
        // transformers computes inv_freq and the angles in f32.
        let inv_freq: Vec<f32> = match &rope.yarn {
            None => (0..dim / 2)
                .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / dim as f32))
                .collect(),
            Some(yarn) => yarn
                .inverse_frequencies(theta, dim)
                .into_iter()
                .map(|f| f as f32)
                .collect(),
        };
        let attention_factor = rope.yarn.as_ref().map_or(1.0, |y| y.attention_factor());
        let mut angles = Vec::with_capacity(max_positions * dim / 2);
        for pos in 0..max_positions {
            for f in &inv_freq {
                angles.push(pos as f32 * f);
            }
        }
        let angles = Tensor::from_vec(angles, (max_positions, dim / 2), device)?;
        Ok(Self {
            cos: (angles.cos()? * attention_factor)?.to_dtype(dtype)?,
            sin: (angles.sin()? * attention_factor)?.to_dtype(dtype)?,
            style,
        })
    }

    /// Rotates `x` [batch, heads, seq, dim] for positions `0..seq`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.apply_at(x, 0)
    }

    /// Rotates `x` [batch, heads, seq, dim] for positions `offset..offset + seq`.
    pub fn apply_at(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let positions = self.cos.dim(0)?;
        if offset + seq > positions {
            return Err(Error::InvalidArgument(format!(
                "position {} is beyond the rotary table ({positions} positions, the model's max_position_embeddings)",
                offset + seq
            )));
        }
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        let x = x.contiguous()?;
        Ok(match self.style {
            RopeStyle::Half => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
        })
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }
}

/// Keys and values of the positions one attention layer has already seen, [batch, heads, seq, dim].
pub type LayerKvCache = candle_nn::kv_cache::KvCache;

/// A new, empty cache for one attention layer.
pub fn new_layer_cache() -> LayerKvCache {
    // Grown 256 positions at a time; keys and values are concatenated along the sequence axis.
    LayerKvCache::new(2, 256)
}

/// Appends this step's keys and values to `cache` (if any) and returns all of them.
fn with_cache(
    cache: Option<&mut LayerKvCache>,
    key: Tensor,
    value: Tensor,
) -> Result<(Tensor, Tensor)> {
    match cache {
        Some(cache) => {
            let (k, v) = cache.append(&key.contiguous()?, &value.contiguous()?)?;
            Ok((k, v))
        }
        // Attention multiplies by `value` as a batch of matrices: give it one layout.
        None => Ok((key, value.contiguous()?)),
    }
}

/// Position of the first new token: how many positions `cache` already holds.
pub fn cache_offset(cache: &Option<&mut LayerKvCache>) -> usize {
    cache.as_ref().map_or(0, |c| c.current_seq_len())
}

/// Appends to the cache and attends: the shared tail of every attention variant.
pub fn cached_attention(
    cache: Option<&mut LayerKvCache>,
    query: &Tensor,
    key: Tensor,
    value: Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (key, value) = with_cache(cache, key, value)?;
    causal_attention(query, &key, &value, scale)
}

/// Additive causal mask [queries, keys] for queries at the last `queries` of `keys` positions
/// (0 where a query may attend, -inf on later keys).
pub fn causal_mask(queries: usize, keys: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let offset = keys.saturating_sub(queries);
    let mask: Vec<f32> = (0..queries)
        .flat_map(|i| {
            (0..keys).map(move |j| {
                if j <= i + offset {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (queries, keys), device)?.to_dtype(dtype)?)
}

/// Scaled dot-product attention with a causal mask; q [b, h, sq, dq], k [b, kv, sk, dq],
/// v [b, kv, sk, dv] with `h` a multiple of `kv` (query head `i` reads key/value head
/// `i / (h / kv)`), the queries being the last `sq` of the `sk` positions.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, heads, queries, dq) = q.dims4()?;
    let (kv_heads, keys) = (k.dim(1)?, k.dim(2)?);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::InvalidArgument(format!(
            "{heads} query heads cannot share {kv_heads} key/value heads"
        )));
    }
    let n_rep = heads / kv_heads;
    // The query heads that share a key/value head attend as one block of n_rep·sq rows, so keys
    // and values are never copied per query head. Scaling q (seq × head_dim) is cheaper than
    // scaling the scores (seq × seq).
    let q = (q * scale)?
        .contiguous()?
        .reshape((b, kv_heads, n_rep * queries, dq))?;
    let mut scores = q.matmul(&k.t()?)?;
    // A single query sees every key: its mask would be all zeros.
    if queries > 1 {
        let mask = causal_mask(queries, keys, scores.dtype(), q.device())?;
        scores = scores
            .reshape((b, kv_heads, n_rep, queries, keys))?
            .broadcast_add(&mask)?
            .reshape((b, kv_heads, n_rep * queries, keys))?;
    }
    let dtype = scores.dtype();
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    let out = probs.matmul(v)?;
    Ok(out.reshape((b, heads, queries, v.dim(3)?))?)
}

/// Where query/key normalisation sits, if anywhere.
#[derive(Debug, Clone)]
pub enum QkNorm {
    /// No normalisation (Mixtral, Qwen2-MoE).
    None,
    /// RMSNorm over each head's `head_dim` (Qwen3-MoE).
    PerHead {
        /// Query norm, [head_dim].
        q: RmsNorm,
        /// Key norm, [head_dim].
        k: RmsNorm,
    },
    /// RMSNorm over the whole projection before splitting heads (OLMoE).
    FullWidth {
        /// Query norm, [heads * head_dim].
        q: RmsNorm,
        /// Key norm, [kv_heads * head_dim].
        k: RmsNorm,
    },
}

/// Multi-head attention with grouped key/value heads and rotary positions.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    /// Optional query/key normalisation.
    pub qk_norm: QkNorm,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads.
    pub num_kv_heads: usize,
    /// Dimension per head.
    pub head_dim: usize,
}

/// Shape parameters of a standard attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Model width.
    pub hidden_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Whether q/k/v carry a bias.
    pub qkv_bias: bool,
    /// Whether o_proj carries a bias.
    pub o_bias: bool,
}

impl Attention {
    /// Loads `{prefix}.{q,k,v,o}_proj` with the given shape; `qk_norm` is attached by the caller.
    pub fn load(weights: &Weights, prefix: &str, shape: AttentionShape) -> Result<Self> {
        let AttentionShape {
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            qkv_bias,
            o_bias,
        } = shape;
        Ok(Self {
            q_proj: weights.linear(
                &format!("{prefix}.q_proj"),
                hidden_size,
                num_heads * head_dim,
                qkv_bias,
            )?,
            k_proj: weights.linear(
                &format!("{prefix}.k_proj"),
                hidden_size,
                num_kv_heads * head_dim,
                qkv_bias,
            )?,
            v_proj: weights.linear(
                &format!("{prefix}.v_proj"),
                hidden_size,
                num_kv_heads * head_dim,
                qkv_bias,
            )?,
            o_proj: weights.linear(
                &format!("{prefix}.o_proj"),
                num_heads * head_dim,
                hidden_size,
                o_bias,
            )?,
            qk_norm: QkNorm::None,
            num_heads,
            num_kv_heads,
            head_dim,
        })
    }

    /// Self-attention over `x` [batch, seq, hidden] with causal masking, after the positions in
    /// `cache` (which receives this step's keys and values).
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let offset = cache_offset(&cache);
        let mut q = self.q_proj.forward(x)?;
        let mut k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        if let QkNorm::FullWidth { q: qn, k: kn } = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let mut q = q
            .reshape((b, s, self.num_heads, self.head_dim))?
            .transpose(1, 2)?;
        let mut k = k
            .reshape((b, s, self.num_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b, s, self.num_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        if let QkNorm::PerHead { q: qn, k: kn } = &self.qk_norm {
            q = qn.forward(&q.contiguous()?)?;
            k = kn.forward(&k.contiguous()?)?;
        }
        let q = rotary.apply_at(&q, offset)?;
        let k = rotary.apply_at(&k, offset)?;
        let out = cached_attention(cache, &q, k, v, 1.0 / (self.head_dim as f64).sqrt())?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, s, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

/// The SiLU-gated MLP `down(silu(gate(x)) * up(x))` used by dense layers and shared experts.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    /// Gate projection, [inter, hidden].
    pub gate_proj: Linear,
    /// Up projection, [inter, hidden].
    pub up_proj: Linear,
    /// Down projection, [hidden, inter].
    pub down_proj: Linear,
}

impl GatedMlp {
    /// Loads `{prefix}.{gate,up,down}_proj`.
    pub fn load(weights: &Weights, prefix: &str, hidden: usize, inter: usize) -> Result<Self> {
        Ok(Self {
            gate_proj: weights.linear(&format!("{prefix}.gate_proj"), hidden, inter, false)?,
            up_proj: weights.linear(&format!("{prefix}.up_proj"), hidden, inter, false)?,
            down_proj: weights.linear(&format!("{prefix}.down_proj"), inter, hidden, false)?,
        })
    }

    /// Applies the MLP to `x` [..., hidden].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::Activation::Silu.forward(&self.gate_proj.forward(x)?)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&(gate * up)?)
    }
}

/// Parses a required config key, naming config.json in the error.
pub fn config_value<T: serde::de::DeserializeOwned>(
    config: &serde_json::Value,
    path: &std::path::Path,
    key: &str,
) -> Result<T> {
    let value = config.get(key).ok_or_else(|| Error::Config {
        path: path.to_path_buf(),
        message: format!("missing key `{key}`"),
    })?;
    serde_json::from_value(value.clone()).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("key `{key}`: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yarn(mscale: Option<f64>, mscale_all_dim: Option<f64>) -> Yarn {
        Yarn {
            factor: 4.0,
            original_max_position_embeddings: 64.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale,
            mscale_all_dim,
            attention_factor: None,
            truncate: true,
        }
    }

    #[test]
    fn yarn_attention_factor_follows_transformers_rules() {
        // Without mscale: 0.1·ln(factor) + 1 (Qwen-style YaRN).
        assert!((yarn(None, None).attention_factor() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
        // DeepSeek: the ratio of the two corrections, 1 when they are equal.
        assert!((yarn(Some(0.707), Some(0.707)).attention_factor() - 1.0).abs() < 1e-12);
        let expected = yarn_mscale(4.0, 1.0) / yarn_mscale(4.0, 0.5);
        assert!((yarn(Some(1.0), Some(0.5)).attention_factor() - expected).abs() < 1e-12);
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let plain: Vec<f64> = (0..32)
            .map(|i| 1.0 / 10000f64.powf((2 * i) as f64 / 64.0))
            .collect();
        let scaled = yarn(None, None).inverse_frequencies(10000.0, 64);
        assert!(
            (scaled[0] - plain[0]).abs() < 1e-12,
            "fastest rotation unchanged"
        );
        assert!(
            (scaled[31] - plain[31] / 4.0).abs() < 1e-12,
            "slowest rotation divided by the factor"
        );
        assert!(scaled
            .iter()
            .zip(&plain)
            .all(|(s, p)| *s <= *p + 1e-15 && *s >= p / 4.0 - 1e-15));
    }

    #[test]
    fn malformed_rotary_settings_are_refused_with_the_key_named() {
        let cases = [
            (
                serde_json::json!({"rope_parameters": 5}),
                "`rope_parameters` is 5",
            ),
            (
                serde_json::json!({"rope_parameters": [1, 2, 3]}),
                "`rope_parameters` is [1,2,3]",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_theta": "1e6"}}),
                "`rope_parameters.rope_theta` is \"1e6\" (expected a number)",
            ),
            (
                serde_json::json!({"rope_theta": -5.0}),
                "`rope_theta` = -5 is out of range",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_theta": 0.0}}),
                "`rope_parameters.rope_theta` = 0 is out of range",
            ),
            (
                serde_json::json!({"rope_scaling": "yarn"}),
                "`rope_scaling` is \"yarn\"",
            ),
            (
                serde_json::json!({"rope_scaling": {"type": "yarn", "factor": "4"}}),
                "`rope_scaling.factor` is \"4\"",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "yarn", "factor": -4.0}}),
                "`rope_parameters.factor` = -4 is out of range",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": 3}}),
                "`rope_parameters.rope_type` is 3",
            ),
        ];
        for (config, expected) in cases {
            let error =
                RopeParameters::from_config(&config, std::path::Path::new("config.json"), 1e4)
                    .unwrap_err()
                    .to_string();
            assert!(error.contains(expected), "{config}: {error}");
        }
        let absent = serde_json::json!({"rope_scaling": null});
        let rope =
            RopeParameters::from_config(&absent, std::path::Path::new("c.json"), 1e4).unwrap();
        assert_eq!((rope.theta, rope.yarn), (1e4, None));
    }

    #[test]
    fn unknown_rope_types_are_refused() {
        let config = serde_json::json!({"rope_scaling": {"type": "longrope", "factor": 2.0}});
        let error = RopeParameters::from_config(&config, std::path::Path::new("config.json"), 1e4)
            .unwrap_err();
        assert!(error.to_string().contains("longrope"));
    }
}
