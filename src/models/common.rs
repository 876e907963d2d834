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

/// Reads the rotary base from either `rope_parameters.rope_theta` (transformers 5) or the
/// top-level `rope_theta` (transformers 4), and refuses scaling types we do not implement.
pub fn rope_theta(config: &serde_json::Value, path: &std::path::Path, default: f64) -> Result<f64> {
    let params = config.get("rope_parameters").filter(|v| v.is_object());
    let scaling = config.get("rope_scaling").filter(|v| v.is_object());
    for p in [params, scaling].into_iter().flatten() {
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(|v| v.as_str());
        if let Some(kind) = kind {
            if kind != "default" {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    message: format!(
                        "rope type `{kind}` is not supported yet (only `default` rotary embeddings are implemented)"
                    ),
                });
            }
        }
    }
    Ok(params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| config.get("rope_theta"))
        .and_then(|v| v.as_f64())
        .unwrap_or(default))
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
        theta: f64,
        max_positions: usize,
        style: RopeStyle,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // transformers computes inv_freq and the angles in f32.
        let inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        let mut angles = Vec::with_capacity(max_positions * dim / 2);
        for pos in 0..max_positions {
            for f in &inv_freq {
                angles.push(pos as f32 * f);
            }
        }
        let angles = Tensor::from_vec(angles, (max_positions, dim / 2), device)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
            style,
        })
    }

    /// Rotates `x` [batch, heads, seq, dim] for positions `0..seq`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let seq = x.dim(2)?;
        if seq > self.cos.dim(0)? {
            return Err(Error::InvalidArgument(format!(
                "sequence of {seq} tokens is longer than the rotary table ({} positions)",
                self.cos.dim(0)?
            )));
        }
        let cos = self.cos.narrow(0, 0, seq)?;
        let sin = self.sin.narrow(0, 0, seq)?;
        let x = x.contiguous()?;
        Ok(match self.style {
            RopeStyle::Half => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
        })
    }
}

/// Additive causal mask [seq, seq] (0 on and below the diagonal, -inf above).
pub fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)?)
}

/// Scaled dot-product attention with a causal mask; q [b, h, s, dq], k [b, h, s, dq], v [b, h, s, dv].
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let seq = q.dim(2)?;
    // Scaling q (seq × head_dim) is cheaper than scaling the scores (seq × seq).
    let scores = (q * scale)?.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let mask = causal_mask(seq, scores.dtype(), q.device())?;
    let scores = scores.broadcast_add(&mask)?;
    let dtype = scores.dtype();
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// Repeats key/value heads `n_rep` times: [b, kv, s, d] -> [b, kv*n_rep, s, d].
pub fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kv, n_rep, s, d))?
        .reshape((b, kv * n_rep, s, d))?)
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

    /// Self-attention over `x` [batch, seq, hidden] with causal masking.
    pub fn forward(&self, x: &Tensor, rotary: &Rotary) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
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
        let q = rotary.apply(&q)?;
        let k = rotary.apply(&k)?;
        let n_rep = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(k, n_rep)?;
        let v = repeat_kv(v, n_rep)?;
        let out = causal_attention(&q, &k, &v, 1.0 / (self.head_dim as f64).sqrt())?;
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
