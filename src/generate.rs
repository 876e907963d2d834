//! Text generation with a key/value cache: greedy or sampled decoding (temperature, top-k,
//! top-p, seeded), stop tokens, and each new token handed to a callback as it is chosen.
//!
//! Greedy decoding follows transformers' `generate(do_sample=False)`: the first highest logit
//! wins. Sampling applies temperature, then top-k, then top-p, as transformers' warpers do, and
//! draws from [`SplitMix64`], so a seed reproduces a run on every machine.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::models::Model;
use crate::rng::SplitMix64;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f64>,
    /// Seed of the random draws.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks the settings are meaningful.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::InvalidArgument(message));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be 0 (greedy) or positive, got {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return bad("top-k must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top-p must be in (0, 1], got {p}"));
            }
        }
        Ok(())
    }
}

/// Chooses tokens from logits according to a [`Sampling`].
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler with its random stream seeded from `sampling.seed`.
    pub fn new(sampling: Sampling) -> Result<Self> {
        sampling.validate()?;
        let rng = SplitMix64::new(sampling.seed);
        Ok(Self { sampling, rng })
    }

    /// The next token for `logits` [vocab].
    pub fn next_token(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if let Some(position) = logits.iter().position(|l| l.is_nan()) {
            return Err(Error::InvalidArgument(format!(
                "the model produced a NaN logit (token {position}): the weights or activations overflowed"
            )));
        }
        if self.sampling.is_greedy() {
            return argmax(&logits);
        }
        let candidates = self.candidates(&logits);
        let total: f64 = candidates.iter().map(|&(_, p)| p).sum();
        let mut target = self.rng.uniform() * total;
        for &(token, p) in &candidates {
            if target < p {
                return Ok(token);
            }
            target -= p;
        }
        // Rounding can leave `target` just above the last weight.
        candidates.last().map(|&(token, _)| token).ok_or_else(|| {
            Error::InvalidArgument(
                "no token has a finite probability (every logit is -inf, or one is +inf)".into(),
            )
        })
    }

    /// The tokens left after temperature, top-k and top-p, most likely first, with their
    /// unnormalised probabilities.
    fn candidates(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let inverse_temperature = 1.0 / self.sampling.temperature;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        // Stable: equal logits keep the lower id first.
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        if let Some(k) = self.sampling.top_k {
            // As transformers: every token whose logit ties the k-th one stays.
            if let Some(&kth) = order.get(k.max(1) - 1) {
                let threshold = logits[kth as usize];
                order.retain(|&t| logits[t as usize] >= threshold);
            }
        }
        let max = order
            .first()
            .map_or(0.0, |&t| logits[t as usize] as f64 * inverse_temperature);
        let mut candidates: Vec<(u32, f64)> = order
            .into_iter()
            .map(|t| {
                let scaled = logits[t as usize] as f64 * inverse_temperature;
                (t, (scaled - max).exp())
            })
            .filter(|&(_, p)| p > 0.0)
            .collect();
        if let Some(top_p) = self.sampling.top_p {
            let total: f64 = candidates.iter().map(|&(_, p)| p).sum();
            let mut cumulative = 0.0;
            let mut keep = 0;
            for &(_, p) in &candidates {
                keep += 1;
                cumulative += p / total;
                if cumulative >= top_p {
                    break;
                }
            }
            candidates.truncate(keep.max(1));
        }
        candidates
    }
}

/// The id of the first highest logit.
fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
        .ok_or_else(|| Error::InvalidArgument("empty vocabulary".into()))
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The most tokens to add after the prompt.
    pub max_new_tokens: usize,
    /// How tokens are chosen.
    pub sampling: Sampling,
    /// Tokens that end generation (kept as the last generated token, as transformers does).
    pub stop_tokens: Vec<u32>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop token was generated.
    StopToken,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The model's maximum number of positions was reached.
    ContextFull,
    /// The caller's token callback asked to stop.
    Cancelled,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Tokens generated after the prompt.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Time to process the prompt and choose the first token.
    pub prefill: Duration,
    /// Time for every later token.
    pub decode: Duration,
    /// Bytes of the key/value cache at the end.
    pub kv_cache_bytes: usize,
    /// Bytes held by the model's routed experts ([`Model::routed_expert_bytes`]: int8 factors
    /// as codes and scales).
    pub routed_expert_bytes: u64,
}

impl Generation {
    /// Decode speed: tokens after the first per second (0 when there were none).
    pub fn decode_tokens_per_second(&self) -> f64 {
        let later = self.tokens.len().saturating_sub(1);
        let seconds = self.decode.as_secs_f64();
        if later == 0 || seconds == 0.0 {
            0.0
        } else {
            later as f64 / seconds
        }
    }

    /// Prompt speed: prompt tokens per second of prefill.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        let seconds = self.prefill.as_secs_f64();
        if seconds == 0.0 {
            0.0
        } else {
            self.prompt_tokens as f64 / seconds
        }
    }
}

/// Continues `prompt` with `model`, calling `on_token` with each new token as soon as it is
/// chosen; `on_token` returns whether to go on.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    options: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt is empty: generation needs at least one token".into(),
        ));
    }
    let positions = model.rotary.max_positions();
    if prompt.len() >= positions {
        return Err(Error::InvalidArgument(format!(
            "the prompt has {} tokens but the model supports {positions} positions",
            prompt.len()
        )));
    }
    let mut sampler = Sampler::new(options.sampling.clone())?;
    let device = model.ends.embed_tokens.device();
    let mut cache = model.new_cache();
    let start = Instant::now();
    let mut prefill = Duration::ZERO;
    let mut input = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let mut tokens = Vec::new();
    let stop = loop {
        if tokens.len() == options.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if prompt.len() + tokens.len() >= positions {
            break StopReason::ContextFull;
        }
        let logits = model.forward_cached(&input, &mut cache)?;
        let token = sampler.next_token(&logits.squeeze(0)?)?;
        if tokens.is_empty() {
            prefill = start.elapsed();
        }
        tokens.push(token);
        if !on_token(token)? {
            break StopReason::Cancelled;
        }
        if options.stop_tokens.contains(&token) {
            break StopReason::StopToken;
        }
        input = Tensor::new(&[token], device)?.unsqueeze(0)?;
    };
    Ok(Generation {
        tokens,
        stop,
        prompt_tokens: prompt.len(),
        prefill,
        decode: start.elapsed().saturating_sub(prefill),
        kv_cache_bytes: cache.stored_bytes()?,
        routed_expert_bytes: model.routed_expert_bytes(),
    })
}

/// Turns generated tokens into text as they arrive, holding back bytes that do not yet form
/// whole characters.
pub struct TextStream<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    tokens: Vec<u32>,
    emitted: String,
}

impl<'a> TextStream<'a> {
    /// An empty stream decoding with `tokenizer`.
    pub fn new(tokenizer: &'a tokenizers::Tokenizer) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            emitted: String::new(),
        }
    }

    fn text(&self) -> Result<String> {
        self.tokenizer
            .decode(&self.tokens, true)
            .map_err(|e| Error::InvalidArgument(format!("cannot decode generated tokens: {e}")))
    }

    /// Adds `token`; returns the text it completes, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>> {
        self.tokens.push(token);
        let text = self.text()?;
        // A partial UTF-8 sequence decodes to U+FFFD: wait for the token that completes it.
        // If decoding the new token changed earlier text (rare merges), emit nothing now.
        if text.ends_with('\u{FFFD}') || !text.starts_with(&self.emitted) {
            return Ok(None);
        }
        let new = text[self.emitted.len()..].to_owned();
        if new.is_empty() {
            return Ok(None);
        }
        self.emitted = text;
        Ok(Some(new))
    }

    /// The text not yet returned by [`Self::push`] (empty when earlier text was rewritten).
    pub fn finish(&mut self) -> Result<String> {
        let text = self.text()?;
        let rest = text
            .strip_prefix(self.emitted.as_str())
            .unwrap_or_default()
            .to_owned();
        self.emitted = text;
        Ok(rest)
    }
}

/// The ids that end generation for the model in `dir`: `eos_token_id` of
/// `generation_config.json` when present, else of `config.json` (a number or a list).
pub fn stop_token_ids(dir: &Path) -> Result<Vec<u32>> {
    for name in ["generation_config.json", "config.json"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let text = crate::safety::read_text_bounded(
            &path,
            crate::safety::MAX_JSON_BYTES,
            "a JSON configuration",
        )?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
        let ids = match value.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::Array(items)) => items.iter().collect::<Vec<_>>(),
            Some(single) => vec![single],
        };
        return ids
            .into_iter()
            .map(|id| {
                id.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| Error::Json {
                        path: path.clone(),
                        message: format!("`eos_token_id` holds {id}, expected token ids"),
                    })
            })
            .collect();
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    fn sampled(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Sampler {
        Sampler::new(Sampling {
            temperature,
            top_k,
            top_p,
            seed: 7,
        })
        .unwrap()
    }

    #[test]
    fn greedy_takes_the_first_highest_logit() {
        let mut sampler = Sampler::new(Sampling::greedy()).unwrap();
        let t = sampler.next_token(&logits(&[0.5, 2.0, -1.0, 2.0])).unwrap();
        assert_eq!(t, 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut sampler = sampled(5.0, Some(1), None);
        for _ in 0..50 {
            assert_eq!(sampler.next_token(&logits(&[0.1, 0.3, 0.2])).unwrap(), 1);
        }
    }

    #[test]
    fn top_k_keeps_ties_with_the_kth_logit() {
        let sampler = sampled(1.0, Some(2), None);
        let kept: Vec<u32> = sampler
            .candidates(&[3.0, 1.0, 2.0, 2.0, 0.0])
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(kept, vec![0, 2, 3]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities ≈ 0.665, 0.245, 0.090: p = 0.7 keeps the first two, never the third.
        let sampler = sampled(1.0, None, Some(0.7));
        let kept: Vec<u32> = sampler
            .candidates(&[2.0, 1.0, 0.0])
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(kept, vec![0, 1]);
        let mut sampler = sampled(1.0, None, Some(0.7));
        for _ in 0..200 {
            assert_ne!(sampler.next_token(&logits(&[2.0, 1.0, 0.0])).unwrap(), 2);
        }
    }

    #[test]
    fn sampling_follows_the_softmax_and_is_reproducible() {
        let values = [1.0f32, 0.0, -1.0, 0.5];
        let mut sampler = sampled(1.0, None, None);
        let mut counts = [0usize; 4];
        let draws = 20_000;
        let first: Vec<u32> = (0..draws)
            .map(|_| sampler.next_token(&logits(&values)).unwrap())
            .collect();
        for &t in &first {
            counts[t as usize] += 1;
        }
        let z: f64 = values.iter().map(|&v| (v as f64).exp()).sum();
        for (t, &count) in counts.iter().enumerate() {
            let expected = (values[t] as f64).exp() / z;
            let observed = count as f64 / draws as f64;
            assert!(
                (observed - expected).abs() < 0.015,
                "token {t}: observed {observed}, expected {expected}"
            );
        }
        let mut again = sampled(1.0, None, None);
        let second: Vec<u32> = (0..draws)
            .map(|_| again.next_token(&logits(&values)).unwrap())
            .collect();
        assert_eq!(first, second, "the same seed gives the same draws");
    }

    #[test]
    fn bad_settings_and_nan_logits_are_refused() {
        for sampling in [
            Sampling {
                temperature: -1.0,
                ..Sampling::greedy()
            },
            Sampling {
                top_k: Some(0),
                ..Sampling::greedy()
            },
            Sampling {
                top_p: Some(1.5),
                ..Sampling::greedy()
            },
        ] {
            assert!(Sampler::new(sampling).is_err());
        }
        let mut sampler = Sampler::new(Sampling::greedy()).unwrap();
        let error = sampler
            .next_token(&logits(&[0.0, f32::NAN]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("NaN") && error.contains("token 1"),
            "{error}"
        );
    }

    #[test]
    fn stop_tokens_come_from_generation_config_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"eos_token_id": 5}"#).unwrap();
        assert_eq!(stop_token_ids(dir.path()).unwrap(), vec![5]);
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [7, 9]}"#,
        )
        .unwrap();
        assert_eq!(stop_token_ids(dir.path()).unwrap(), vec![7, 9]);
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": "x"}"#,
        )
        .unwrap();
        let error = stop_token_ids(dir.path()).unwrap_err().to_string();
        assert!(error.contains("generation_config.json") && error.contains("eos_token_id"));
    }
}
