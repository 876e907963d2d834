//! Evaluation: perplexity, divergence from a reference model, and zero-shot multiple choice.
//!
//! - Perplexity follows lm-evaluation-harness's fixed-context protocol by default
//!   (non-overlapping windows of `seq_len`, remainder dropped, every token after the first in
//!   a window scored), or Hugging Face's sliding-window protocol ("Perplexity of fixed-length
//!   models") when a stride is given.
//! - Divergence runs a reference and a candidate model on the same windows and reports the
//!   per-token KL(reference ‖ candidate) (mean, median, 99th percentile, max) and top-1
//!   agreement, as llama.cpp's `--kl-divergence` does.
//! - Multiple choice scores each choice by its log-likelihood given the context, the way
//!   lm-evaluation-harness's `multiple_choice` tasks do (`acc` and length-normalised
//!   `acc_norm`).
//!
//! Log-probabilities are computed in f32 on the model's device and summed in f64.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::models::Model;
use crate::progress::{Progress, Task};
use crate::text;

/// Settings shared by every evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalOptions {
    /// Window length in tokens (perplexity and divergence).
    pub seq_len: usize,
    /// `None`: lm-eval's non-overlapping windows with the remainder dropped; `Some(s)`: Hugging
    /// Face sliding windows that advance by `s` tokens (1 ≤ s ≤ `seq_len`) and score only the
    /// tokens no earlier window scored.
    pub stride: Option<usize>,
    /// Score only the second half of each non-overlapping window (each of those tokens sees at
    /// least half a window of context), as llama.cpp's `llama-perplexity` does.
    pub second_half: bool,
    /// Windows (or multiple-choice continuations) run per forward pass.
    pub batch_size: usize,
    /// Evaluate only the first this many windows of each text (quick runs).
    pub max_windows: Option<usize>,
    /// Inserted between a multiple-choice context and each choice (lm-eval's
    /// `target_delimiter`, a space by default).
    pub target_delimiter: String,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            seq_len: 512,
            stride: None,
            second_half: false,
            batch_size: 4,
            max_windows: None,
            target_delimiter: " ".into(),
        }
    }
}

impl EvalOptions {
    fn validate(&self, max_positions: usize) -> Result<()> {
        if self.seq_len < 2 {
            return Err(Error::InvalidArgument(format!(
                "seq_len must be at least 2, got {}",
                self.seq_len
            )));
        }
        if self.seq_len > max_positions {
            return Err(Error::InvalidArgument(format!(
                "seq_len {} exceeds the model's {max_positions} positions",
                self.seq_len
            )));
        }
        if self.batch_size == 0 {
            return Err(Error::InvalidArgument(
                "batch_size must be at least 1".into(),
            ));
        }
        if self.second_half && self.stride.is_some() {
            return Err(Error::InvalidArgument(
                "scoring the second half of each window needs non-overlapping windows (no stride)"
                    .into(),
            ));
        }
        if let Some(stride) = self.stride {
            if stride == 0 || stride > self.seq_len {
                return Err(Error::InvalidArgument(format!(
                    "stride must be between 1 and seq_len ({}), got {stride}",
                    self.seq_len
                )));
            }
        }
        Ok(())
    }
}

/// One forward pass over `tokens[start..start + len]` that scores the tokens at window
/// positions `first_scored..len` (each predicted from the tokens before it in the window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Offset of the window's first token in the stream.
    pub start: usize,
    /// Tokens in the window.
    pub len: usize,
    /// First scored position inside the window (at least 1).
    pub first_scored: usize,
}

impl Window {
    /// Number of tokens the window scores.
    pub fn scored(&self) -> usize {
        self.len - self.first_scored
    }
}

/// The windows for a stream of `num_tokens` tokens: non-overlapping windows of `seq_len` with
/// the remainder dropped (`stride` = `None`), or sliding windows advancing by `stride` that
/// together score every token but the first exactly once (the last window may be shorter).
pub fn plan_windows(num_tokens: usize, seq_len: usize, stride: Option<usize>) -> Vec<Window> {
    if seq_len < 2 {
        return Vec::new();
    }
    let Some(stride) = stride else {
        return (0..num_tokens / seq_len)
            .map(|i| Window {
                start: i * seq_len,
                len: seq_len,
                first_scored: 1,
            })
            .collect();
    };
    let stride = stride.max(1);
    let mut windows = Vec::new();
    let (mut begin, mut previous_end) = (0, 0);
    while begin < num_tokens {
        let end = (begin + seq_len).min(num_tokens);
        let len = end - begin;
        let first_scored = (len - (end - previous_end)).max(1);
        if first_scored < len {
            windows.push(Window {
                start: begin,
                len,
                first_scored,
            });
        }
        previous_end = end;
        if end == num_tokens {
            break;
        }
        begin += stride;
    }
    windows
}

/// Perplexity of a model on a token stream.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PerplexityResult {
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens scored.
    pub tokens_scored: usize,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct NllSum {
    nll: f64,
    tokens: usize,
}

impl NllSum {
    /// The result over `windows` windows; a non-finite mean or perplexity is an error naming
    /// `what` was measured.
    fn result(self, windows: usize, what: &str) -> Result<PerplexityResult> {
        let mean_nll = if self.tokens == 0 {
            f64::NAN
        } else {
            self.nll / self.tokens as f64
        };
        use crate::safety::finite::check_value as check;
        Ok(PerplexityResult {
            windows,
            tokens_scored: self.tokens,
            mean_nll: check(mean_nll, || {
                format!("the mean negative log-likelihood ({what})")
            })?,
            perplexity: check(mean_nll.exp(), || format!("the perplexity ({what})"))?,
        })
    }
}

fn model_device(model: &Model) -> &Device {
    model.ends.embed_tokens.device()
}

/// Inputs and next-token targets, both [batch, longest] (u32), for a batch of windows. Shorter
/// windows are right-padded, which a causal model never looks at; the last position of each
/// window has no target and gets a dummy one.
fn batch_tensors(tokens: &[u32], windows: &[Window]) -> (Vec<u32>, Vec<u32>, usize) {
    let longest = windows.iter().map(|w| w.len).max().unwrap_or(0);
    let mut inputs = Vec::with_capacity(windows.len() * longest);
    let mut targets = Vec::with_capacity(windows.len() * longest);
    for w in windows {
        let slice = &tokens[w.start..w.start + w.len];
        let pad = slice[0];
        inputs.extend_from_slice(slice);
        inputs.extend(std::iter::repeat_n(pad, longest - w.len));
        targets.extend_from_slice(&slice[1..]);
        targets.extend(std::iter::repeat_n(pad, longest + 1 - w.len));
    }
    (inputs, targets, longest)
}

/// Runs the model on `inputs` [batch, seq] and returns f32 logits [batch, seq, vocab].
fn logits_of(model: &Model, inputs: &[u32], batch: usize, seq: usize) -> Result<Tensor> {
    let input = Tensor::from_slice(inputs, (batch, seq), model_device(model))?;
    Ok(model.forward(&input, None)?.logits.to_dtype(DType::F32)?)
}

/// Natural-log probability of each target: logits [b, s, v], targets [b, s, 1] -> [b, s].
fn target_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let log_sum_exp = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let target_logits = logits.gather(targets, D::Minus1)?;
    Ok((target_logits - log_sum_exp)?.squeeze(D::Minus1)?)
}

/// Perplexity of `model` on `tokens` under `options` (windows, stride, batching); reports the
/// windows done to `progress` as task `perplexity`.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    options: &EvalOptions,
    progress: &dyn Progress,
) -> Result<PerplexityResult> {
    perplexity_labelled(model, tokens, options, "perplexity", progress)
}

fn limited_windows(num_tokens: usize, options: &EvalOptions) -> Result<Vec<Window>> {
    let mut windows = plan_windows(num_tokens, options.seq_len, options.stride);
    if options.second_half {
        // llama-perplexity scores the predictions made from positions n/2 .. n-2.
        windows
            .iter_mut()
            .for_each(|w| w.first_scored = options.seq_len / 2 + 1);
    }
    if let Some(max) = options.max_windows {
        windows.truncate(max);
    }
    if windows.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the text has {num_tokens} tokens, not enough for one window of {}",
            options.seq_len
        )));
    }
    Ok(windows)
}

fn perplexity_labelled(
    model: &Model,
    tokens: &[u32],
    options: &EvalOptions,
    label: &str,
    progress: &dyn Progress,
) -> Result<PerplexityResult> {
    options.validate(model.spec.max_positions)?;
    let windows = limited_windows(tokens.len(), options)?;
    let task = Task::start(progress, label, windows.len() as u64);
    let mut sum = NllSum::default();
    for batch in windows.chunks(options.batch_size) {
        let (inputs, targets, longest) = batch_tensors(tokens, batch);
        let logits = logits_of(model, &inputs, batch.len(), longest)?;
        let targets = Tensor::from_vec(targets, (batch.len(), longest, 1), logits.device())?;
        let log_probs = target_log_probs(&logits, &targets)?.to_vec2::<f32>()?;
        for (w, row) in batch.iter().zip(&log_probs) {
            // Position p predicts the window's token p + 1.
            for &lp in &row[w.first_scored - 1..w.len - 1] {
                sum.nll -= lp as f64;
            }
            sum.tokens += w.scored();
        }
        task.advance(batch.len() as u64);
    }
    sum.result(windows.len(), label)
}

/// How far a candidate model's next-token distributions are from a reference's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DivergenceResult {
    /// Windows evaluated.
    pub windows: usize,
    /// Token positions compared (the scored positions of the perplexity protocol).
    pub tokens: usize,
    /// Mean per-token KL(reference ‖ candidate), in nats.
    pub mean_kl: f64,
    /// Median per-token KL, in nats.
    pub median_kl: f64,
    /// 99th percentile of the per-token KL, in nats (linear interpolation).
    pub p99_kl: f64,
    /// Largest per-token KL, in nats.
    pub max_kl: f64,
    /// Fraction of positions where both models' most likely next token is the same.
    pub top1_agreement: f64,
    /// The reference model's perplexity on the same windows.
    pub reference: PerplexityResult,
    /// The candidate model's perplexity on the same windows.
    pub candidate: PerplexityResult,
}

/// The `q`-quantile (0 ≤ q ≤ 1) of sorted values, interpolating linearly between ranks.
fn quantile(sorted: &[f32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = q * (sorted.len() - 1) as f64;
    let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
    let fraction = rank - low as f64;
    sorted[low] as f64 * (1.0 - fraction) + sorted[high] as f64 * fraction
}

/// Runs `reference` and `candidate` on the same windows of `tokens`, one batch at a time, and
/// compares their next-token distributions at every scored position; reports the windows done to
/// `progress` as task `divergence`.
pub fn divergence(
    reference: &Model,
    candidate: &Model,
    tokens: &[u32],
    options: &EvalOptions,
    progress: &dyn Progress,
) -> Result<DivergenceResult> {
    options.validate(
        reference
            .spec
            .max_positions
            .min(candidate.spec.max_positions),
    )?;
    if reference.spec.vocab_size != candidate.spec.vocab_size {
        return Err(Error::InvalidArgument(format!(
            "the reference has a vocabulary of {} and the candidate of {}; they cannot be compared",
            reference.spec.vocab_size, candidate.spec.vocab_size
        )));
    }
    let windows = limited_windows(tokens.len(), options)?;
    let task = Task::start(progress, "divergence", windows.len() as u64);
    let (mut reference_sum, mut candidate_sum) = (NllSum::default(), NllSum::default());
    let mut kls: Vec<f32> = Vec::with_capacity(windows.iter().map(|w| w.scored()).sum());
    let (mut kl_sum, mut agreements) = (0f64, 0usize);
    for batch in windows.chunks(options.batch_size) {
        let (inputs, targets, longest) = batch_tensors(tokens, batch);
        let candidate_logits = logits_of(candidate, &inputs, batch.len(), longest)?;
        let device = candidate_logits.device().clone();
        let reference_logits =
            logits_of(reference, &inputs, batch.len(), longest)?.to_device(&device)?;
        let targets = Tensor::from_vec(targets, (batch.len(), longest, 1), &device)?;

        let reference_log_probs = candle_nn::ops::log_softmax(&reference_logits, D::Minus1)?;
        let candidate_log_probs = candle_nn::ops::log_softmax(&candidate_logits, D::Minus1)?;
        let kl = (reference_log_probs.exp()? * (&reference_log_probs - &candidate_log_probs)?)?
            .sum(D::Minus1)?
            .to_vec2::<f32>()?;
        let same_top = reference_logits
            .argmax(D::Minus1)?
            .eq(&candidate_logits.argmax(D::Minus1)?)?
            .to_vec2::<u8>()?;
        let reference_nll = reference_log_probs
            .gather(&targets, D::Minus1)?
            .squeeze(D::Minus1)?
            .to_vec2::<f32>()?;
        let candidate_nll = candidate_log_probs
            .gather(&targets, D::Minus1)?
            .squeeze(D::Minus1)?
            .to_vec2::<f32>()?;

        for (i, w) in batch.iter().enumerate() {
            let positions = w.first_scored - 1..w.len - 1;
            for p in positions {
                kl_sum += kl[i][p] as f64;
                kls.push(kl[i][p]);
                agreements += same_top[i][p] as usize;
                reference_sum.nll -= reference_nll[i][p] as f64;
                candidate_sum.nll -= candidate_nll[i][p] as f64;
            }
            reference_sum.tokens += w.scored();
            candidate_sum.tokens += w.scored();
        }
        task.advance(batch.len() as u64);
    }
    kls.sort_unstable_by(f32::total_cmp);
    let tokens_compared = kls.len();
    let check = |value: f64, what: &str| {
        crate::safety::finite::check_value(value, || {
            format!("the {what} of the candidate from the reference")
        })
    };
    Ok(DivergenceResult {
        windows: windows.len(),
        tokens: tokens_compared,
        mean_kl: check(kl_sum / tokens_compared as f64, "mean KL divergence")?,
        median_kl: check(quantile(&kls, 0.5), "median KL divergence")?,
        p99_kl: check(quantile(&kls, 0.99), "99th-percentile KL divergence")?,
        max_kl: check(
            kls.last().map_or(f64::NAN, |&k| k as f64),
            "largest KL divergence",
        )?,
        top1_agreement: agreements as f64 / tokens_compared as f64,
        reference: reference_sum.result(windows.len(), "reference model")?,
        candidate: candidate_sum.result(windows.len(), "candidate model")?,
    })
}

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MultipleChoiceItem {
    /// The context (prompt) every choice continues.
    pub context: String,
    /// The candidate continuations.
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub gold: usize,
}

fn parse_item(path: &Path, line: usize, value: &serde_json::Value) -> Result<MultipleChoiceItem> {
    let bad = |message: String| Error::Json {
        path: path.to_path_buf(),
        message: format!("line {line}: {message}"),
    };
    let object = value
        .as_object()
        .ok_or_else(|| bad("expected a JSON object".into()))?;
    let field = |names: &[&str]| names.iter().find_map(|n| object.get(*n));
    let context = match field(&["context", "query", "question"]) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err(bad("`context` is not a string".into())),
        None => return Err(bad("no `context` (or `query`, `question`) field".into())),
    };
    let choices: Vec<String> = match field(&["choices"]) {
        Some(serde_json::Value::Array(values)) => values
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`choices` must be a list of strings".into()))?,
        Some(_) => return Err(bad("`choices` must be a list of strings".into())),
        None => return Err(bad("no `choices` field".into())),
    };
    if choices.is_empty() {
        return Err(bad("`choices` is empty".into()));
    }
    let gold = match field(&["gold", "label", "answer"]) {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|g| g as usize),
        // Some datasets (HellaSwag) store the label as a string.
        Some(serde_json::Value::String(s)) => s.trim().parse::<usize>().ok(),
        Some(_) => None,
        None => return Err(bad("no `gold` (or `label`, `answer`) field".into())),
    }
    .ok_or_else(|| bad("`gold` must be a non-negative integer".into()))?;
    if gold >= choices.len() {
        return Err(bad(format!(
            "`gold` is {gold} but there are only {} choices",
            choices.len()
        )));
    }
    Ok(MultipleChoiceItem {
        context,
        choices,
        gold,
    })
}

/// Reads multiple-choice questions from JSON lines `{"context": str, "choices": [str], "gold":
/// int}` (`query`/`question` are accepted for `context`, `label`/`answer` for `gold`).
pub fn read_multiple_choice(path: &Path) -> Result<Vec<MultipleChoiceItem>> {
    let text =
        crate::safety::read_text_bounded(path, crate::safety::MAX_TEXT_BYTES, "UTF-8 JSON lines")?;
    let mut items = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: format!("line {}: {e}", index + 1),
        })?;
        items.push(parse_item(path, index + 1, &value)?);
    }
    if items.is_empty() {
        return Err(Error::Json {
            path: path.to_path_buf(),
            message: "no questions in the file".into(),
        });
    }
    Ok(items)
}

/// Context and continuation tokens of one (context, continuation) pair, as lm-eval encodes them:
/// trailing whitespace of the context moves to the continuation, the continuation is whatever
/// `encode(context + continuation)` has beyond `encode(context)`, and an empty context becomes
/// the end-of-text token.
pub fn encode_pair(
    tokenizer: &Tokenizer,
    context: &str,
    continuation: &str,
    eos: u32,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let continuation = format!("{}{continuation}", &context[trimmed.len()..]);
    let context = trimmed;
    if context.is_empty() {
        return Ok((vec![eos], text::encode(tokenizer, &continuation)?));
    }
    let whole = text::encode(tokenizer, &format!("{context}{continuation}"))?;
    let context_tokens = text::encode(tokenizer, context)?;
    let continuation_tokens = whole.get(context_tokens.len()..).unwrap_or(&[]).to_vec();
    Ok((context_tokens, continuation_tokens))
}

/// The scores of one question.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChoiceScores {
    /// Summed log-likelihood of each choice's continuation tokens, in nats.
    pub logliks: Vec<f64>,
    /// Continuation tokens of each choice.
    pub tokens: Vec<usize>,
    /// Choice with the highest log-likelihood (first on ties).
    pub predicted: usize,
    /// Choice with the highest log-likelihood per character of the choice (first on ties).
    pub predicted_norm: usize,
    /// The correct choice.
    pub gold: usize,
}

/// Zero-shot multiple-choice accuracy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MultipleChoiceResult {
    /// Questions evaluated.
    pub count: usize,
    /// Fraction whose highest-log-likelihood choice is the gold one.
    pub acc: f64,
    /// Standard error of `acc` (sample standard deviation / √n, as lm-eval reports it).
    pub acc_stderr: f64,
    /// Fraction whose highest log-likelihood per character of the choice string is the gold one
    /// (lm-eval's `acc_norm`, which divides by `len(choice)` in characters).
    pub acc_norm: f64,
    /// Standard error of `acc_norm`.
    pub acc_norm_stderr: f64,
    /// Per-question scores, in input order.
    #[serde(skip)]
    pub items: Vec<ChoiceScores>,
}

/// Index of the largest value, the first one on ties (numpy's `argmax`).
fn first_argmax(values: impl IntoIterator<Item = f64>) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, v) in values.into_iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i)
}

fn mean_and_stderr(hits: impl Iterator<Item = bool>) -> (f64, f64) {
    let values: Vec<f64> = hits.map(|h| h as u8 as f64).collect();
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, f64::NAN);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (variance / n).sqrt())
}

/// A continuation to score: the model input and how many of its final tokens to sum.
struct Request {
    item: usize,
    choice: usize,
    /// Context and continuation tokens, left-truncated to the model's window plus one.
    sequence: Vec<u32>,
    continuation: usize,
}

/// Summed log-likelihood of each choice of each question (`eos` stands in for empty contexts);
/// reports the continuations scored to `progress` as task `multiple choice`.
pub fn choice_log_likelihoods(
    model: &Model,
    tokenizer: &Tokenizer,
    eos: u32,
    items: &[MultipleChoiceItem],
    options: &EvalOptions,
    progress: &dyn Progress,
) -> Result<Vec<Vec<(f64, usize)>>> {
    if options.batch_size == 0 {
        return Err(Error::InvalidArgument(
            "batch_size must be at least 1".into(),
        ));
    }
    let max_length = model.spec.max_positions;
    let mut requests = Vec::new();
    for (i, item) in items.iter().enumerate() {
        for (j, choice) in item.choices.iter().enumerate() {
            let continuation = format!("{}{choice}", options.target_delimiter);
            let (context_tokens, continuation_tokens) =
                encode_pair(tokenizer, &item.context, &continuation, eos)?;
            if continuation_tokens.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "question {}: choice {j} ({choice:?}) has no tokens beyond the context",
                    i + 1
                )));
            }
            if continuation_tokens.len() > max_length {
                return Err(Error::InvalidArgument(format!(
                    "question {}: choice {j} has {} tokens, more than the model's {max_length} positions",
                    i + 1,
                    continuation_tokens.len()
                )));
            }
            let mut sequence = context_tokens;
            sequence.extend_from_slice(&continuation_tokens);
            // lm-eval keeps the last max_length + 1 tokens and feeds all but the last.
            let keep = sequence.len().min(max_length + 1);
            let sequence = sequence.split_off(sequence.len() - keep);
            requests.push(Request {
                item: i,
                choice: j,
                sequence,
                continuation: continuation_tokens.len(),
            });
        }
    }
    // Longest first, so padding stays small and the first batch shows the worst memory use.
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&r| std::cmp::Reverse(requests[r].sequence.len()));

    let mut scores: Vec<Vec<(f64, usize)>> = items
        .iter()
        .map(|it| vec![(0.0, 0); it.choices.len()])
        .collect();
    let task = Task::start(progress, "multiple choice", requests.len() as u64);
    let device = model_device(model).clone();
    for batch in order.chunks(options.batch_size) {
        let longest = batch
            .iter()
            .map(|&r| requests[r].sequence.len() - 1)
            .max()
            .unwrap_or(1);
        let mut inputs = Vec::with_capacity(batch.len() * longest);
        let mut targets = Vec::with_capacity(batch.len() * longest);
        for &r in batch {
            let sequence = &requests[r].sequence;
            let n = sequence.len() - 1;
            inputs.extend_from_slice(&sequence[..n]);
            inputs.extend(std::iter::repeat_n(eos, longest - n));
            targets.extend_from_slice(&sequence[1..]);
            targets.extend(std::iter::repeat_n(eos, longest - n));
        }
        let logits = logits_of(model, &inputs, batch.len(), longest)?;
        let targets = Tensor::from_vec(targets, (batch.len(), longest, 1), &device)?;
        let log_probs = target_log_probs(&logits, &targets)?.to_vec2::<f32>()?;
        for (&r, row) in batch.iter().zip(&log_probs) {
            let request = &requests[r];
            let n = request.sequence.len() - 1;
            let loglik: f64 = row[n - request.continuation..n]
                .iter()
                .map(|&lp| lp as f64)
                .sum();
            scores[request.item][request.choice] = (loglik, request.continuation);
        }
        task.advance(batch.len() as u64);
    }
    Ok(scores)
}

/// Zero-shot multiple-choice accuracy (`acc`, `acc_norm`) of `model` on `items`.
pub fn multiple_choice(
    model: &Model,
    tokenizer: &Tokenizer,
    eos: u32,
    items: &[MultipleChoiceItem],
    options: &EvalOptions,
    progress: &dyn Progress,
) -> Result<MultipleChoiceResult> {
    if items.is_empty() {
        return Err(Error::InvalidArgument(
            "no multiple-choice questions to evaluate".into(),
        ));
    }
    let scores = choice_log_likelihoods(model, tokenizer, eos, items, options, progress)?;
    let items: Vec<ChoiceScores> = items
        .iter()
        .zip(scores)
        .map(|(item, scores)| {
            let logliks: Vec<f64> = scores.iter().map(|s| s.0).collect();
            let predicted = first_argmax(logliks.iter().copied());
            let predicted_norm = first_argmax(
                logliks
                    .iter()
                    .zip(&item.choices)
                    .map(|(ll, choice)| ll / choice.chars().count().max(1) as f64),
            );
            ChoiceScores {
                tokens: scores.iter().map(|s| s.1).collect(),
                logliks,
                predicted,
                predicted_norm,
                gold: item.gold,
            }
        })
        .collect();
    let (acc, acc_stderr) = mean_and_stderr(items.iter().map(|s| s.predicted == s.gold));
    let (acc_norm, acc_norm_stderr) =
        mean_and_stderr(items.iter().map(|s| s.predicted_norm == s.gold));
    Ok(MultipleChoiceResult {
        count: items.len(),
        acc,
        acc_stderr,
        acc_norm,
        acc_norm_stderr,
        items,
    })
}

/// A model ready to evaluate: weights, tokenizer and end-of-text id.
#[derive(Debug)]
pub struct EvalModel {
    /// How the model is named in reports (its directory).
    pub name: String,
    /// The model.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The end-of-text id that separates documents.
    pub eos: u32,
}

impl EvalModel {
    /// Loads the checkpoint in `dir` (weights in `dtype` on `device`) with its `tokenizer.json`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let checkpoint = Checkpoint::open(dir)?;
        let tokenizer = text::load_tokenizer(dir)?;
        let eos = text::end_of_text_id(&tokenizer, checkpoint.config())?;
        let model = Model::load(&checkpoint, dtype, device)?;
        Ok(Self {
            name: dir.display().to_string(),
            model,
            tokenizer,
            eos,
        })
    }

    /// Reads and tokenizes a text file into the evaluation stream.
    pub fn tokenize_file(&self, path: &Path) -> Result<Vec<u32>> {
        text::tokenize_file(&self.tokenizer, path, self.eos)
    }
}

/// What one [`evaluate`] run does.
#[derive(Debug, Clone, Default)]
pub struct EvalPlan {
    /// Text files to measure perplexity on (and divergence, when there is a reference).
    pub texts: Vec<PathBuf>,
    /// JSON-lines multiple-choice files.
    pub multiple_choice: Vec<PathBuf>,
    /// Settings.
    pub options: EvalOptions,
}

/// A result labelled with the file it was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Labelled<T> {
    /// The file.
    pub dataset: String,
    /// The result.
    #[serde(flatten)]
    pub result: T,
}

/// Everything one [`evaluate`] run measured.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The evaluated model.
    pub model: String,
    /// The reference model, when divergence was measured.
    pub reference: Option<String>,
    /// The settings used.
    pub options: EvalOptions,
    /// Perplexity of the model on each text.
    pub perplexity: Vec<Labelled<PerplexityResult>>,
    /// Divergence from the reference on each text (empty without a reference).
    pub divergence: Vec<Labelled<DivergenceResult>>,
    /// Multiple-choice accuracy on each question file.
    pub multiple_choice: Vec<Labelled<MultipleChoiceResult>>,
    /// Wall-clock time of the whole run, in seconds.
    pub seconds: f64,
}

/// Runs every evaluation of `plan` on `candidate`; with a `reference`, each text is also run
/// through the reference (in the same pass) to measure divergence. Progress goes to `progress`.
pub fn evaluate(
    candidate: &EvalModel,
    reference: Option<&EvalModel>,
    plan: &EvalPlan,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    let started = Instant::now();
    let options = &plan.options;
    if let Some(reference) = reference {
        let (r, c) = (
            reference.tokenizer.get_vocab_size(true),
            candidate.tokenizer.get_vocab_size(true),
        );
        if r != c {
            return Err(Error::InvalidArgument(format!(
                "the reference tokenizer has {r} tokens and the candidate's {c}; they cannot be compared"
            )));
        }
    }
    let mut report = EvalReport {
        model: candidate.name.clone(),
        reference: reference.map(|r| r.name.clone()),
        options: options.clone(),
        perplexity: Vec::new(),
        divergence: Vec::new(),
        multiple_choice: Vec::new(),
        seconds: 0.0,
    };
    for path in &plan.texts {
        let dataset = path.display().to_string();
        let tokens = candidate.tokenize_file(path)?;
        match reference {
            Some(reference) => {
                let result = divergence(
                    &reference.model,
                    &candidate.model,
                    &tokens,
                    options,
                    progress,
                )?;
                report.perplexity.push(Labelled {
                    dataset: dataset.clone(),
                    result: result.candidate,
                });
                report.divergence.push(Labelled { dataset, result });
            }
            None => {
                let label = format!("perplexity {}", file_label(path));
                let result =
                    perplexity_labelled(&candidate.model, &tokens, options, &label, progress)?;
                report.perplexity.push(Labelled { dataset, result });
            }
        }
    }
    for path in &plan.multiple_choice {
        let items = read_multiple_choice(path)?;
        let result = multiple_choice(
            &candidate.model,
            &candidate.tokenizer,
            candidate.eos,
            &items,
            options,
            progress,
        )?;
        report.multiple_choice.push(Labelled {
            dataset: path.display().to_string(),
            result,
        });
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn file_label(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model: {}", self.model)?;
        if let Some(reference) = &self.reference {
            writeln!(f, "reference: {reference}")?;
        }
        let width = self
            .perplexity
            .iter()
            .map(|l| l.dataset.len())
            .chain(self.multiple_choice.iter().map(|l| l.dataset.len()))
            .chain(std::iter::once(7))
            .max()
            .unwrap_or(7);
        if !self.perplexity.is_empty() {
            let protocol = match self.options.stride {
                None if self.options.second_half => {
                    "non-overlapping, second halves scored".to_string()
                }
                None => "non-overlapping".to_string(),
                Some(s) => format!("stride {s}"),
            };
            writeln!(
                f,
                "\nperplexity (windows of {}, {protocol})",
                self.options.seq_len
            )?;
            writeln!(
                f,
                "{:<width$}  {:>8}  {:>10}  {:>9}  {:>10}",
                "dataset", "windows", "tokens", "mean NLL", "PPL"
            )?;
            for l in &self.perplexity {
                let r = &l.result;
                writeln!(
                    f,
                    "{:<width$}  {:>8}  {:>10}  {:>9.5}  {:>10.4}",
                    l.dataset, r.windows, r.tokens_scored, r.mean_nll, r.perplexity
                )?;
            }
        }
        if !self.divergence.is_empty() {
            writeln!(f, "\ndivergence from the reference (KL in nats per token)")?;
            writeln!(
                f,
                "{:<width$}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>7}  {:>10}",
                "dataset", "ref PPL", "mean KL", "median KL", "p99 KL", "max KL", "top-1", "tokens"
            )?;
            for l in &self.divergence {
                let r = &l.result;
                writeln!(
                    f,
                    "{:<width$}  {:>10.4}  {:>10.6}  {:>10.6}  {:>10.6}  {:>10.4}  {:>6.2}%  {:>10}",
                    l.dataset,
                    r.reference.perplexity,
                    r.mean_kl,
                    r.median_kl,
                    r.p99_kl,
                    r.max_kl,
                    100.0 * r.top1_agreement,
                    r.tokens
                )?;
            }
        }
        if !self.multiple_choice.is_empty() {
            writeln!(f, "\nmultiple choice (zero-shot)")?;
            writeln!(
                f,
                "{:<width$}  {:>8}  {:>16}  {:>16}",
                "dataset", "count", "acc", "acc_norm"
            )?;
            for l in &self.multiple_choice {
                let r = &l.result;
                writeln!(
                    f,
                    "{:<width$}  {:>8}  {:>7.4} ± {:<6.4}  {:>7.4} ± {:<6.4}",
                    l.dataset, r.count, r.acc, r.acc_stderr, r.acc_norm, r.acc_norm_stderr
                )?;
            }
        }
        write!(f, "\n{:.1} s", self.seconds)
    }
}
