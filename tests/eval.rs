//! Evaluation reproduces the reference perplexities of the bundled models' READMEs, measures
//! zero divergence of a model from itself, and scores multiple choice as lm-eval does.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rfid_moe::eval::{self, EvalModel, EvalOptions, EvalPlan, MultipleChoiceItem};
use rfid_moe::progress::Silent;
use rfid_moe::text;

const MINI: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/mini-moe-docs");

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn load(dir: &str) -> EvalModel {
    EvalModel::load(Path::new(dir), DType::F32, &Device::Cpu).unwrap()
}

fn assert_relative(found: f64, expected: f64, tolerance: f64, what: &str) {
    let relative = (found - expected).abs() / expected.abs();
    assert!(
        relative <= tolerance,
        "{what}: {found} vs {expected} (relative {relative:.2e} > {tolerance:.0e})"
    );
}

/// Runs the README protocol on `dir/test.txt` and checks windows, scored tokens and perplexity.
fn reproduces_readme(dir: &str, windows: usize, tokens: usize, perplexity: f64) {
    let started = Instant::now();
    let model = load(dir);
    let stream = model
        .tokenize_file(&Path::new(dir).join("test.txt"))
        .unwrap();
    assert_eq!(text::windows(&stream, 512).len(), windows);
    let result = eval::perplexity(&model.model, &stream, &EvalOptions::default(), &Silent).unwrap();
    println!(
        "{dir}: {result:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(result.windows, windows);
    assert_eq!(result.tokens_scored, tokens);
    assert_relative(result.perplexity, perplexity, 1e-3, "perplexity");
}

#[test]
#[ignore = "about 50 s on 2 cores; run with `cargo test --test eval -- --ignored`"]
fn mini_moe_docs_reproduces_reference_perplexity() {
    reproduces_readme(MINI, 274, 140_014, 32.7354);
}

#[test]
fn joined_and_per_document_tokenization_agree() {
    let tokenizer = text::load_tokenizer(Path::new(MINI)).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(MINI).join("config.json")).unwrap(),
    )
    .unwrap();
    let eos = text::end_of_text_id(&tokenizer, &config).unwrap();
    assert_eq!(
        tokenizer.id_to_token(eos).as_deref(),
        Some(text::END_OF_TEXT)
    );
    let documents = text::read_documents(&Path::new(MINI).join("test.txt")).unwrap();
    assert!(documents.len() > 100, "{} documents", documents.len());
    let stream = text::tokenize_documents(&tokenizer, &documents, eos).unwrap();
    let joined: String = documents
        .iter()
        .map(|d| format!("{d}{}", text::END_OF_TEXT))
        .collect();
    assert_eq!(text::encode(&tokenizer, &joined).unwrap(), stream);
    assert_eq!(
        stream.iter().filter(|&&t| t == eos).count(),
        documents.len()
    );
}

#[test]
fn plain_text_and_json_lines_read_the_same_documents() {
    let plain = text::read_documents(&data("documents.txt")).unwrap();
    let lines = text::read_documents(&data("documents.jsonl")).unwrap();
    assert_eq!(plain.len(), 3);
    assert_eq!(
        plain[0],
        "First document, line one.\n\tAn indented second line."
    );
    assert_eq!(plain, lines);
    assert!(text::read_documents(&data("missing.txt")).is_err());
}

#[test]
fn window_sampling_is_reproducible() {
    let tokens: Vec<u32> = (0..10_000).collect();
    let first = text::sample_windows(&tokens, 100, 5, text::FIRST_WINDOWS);
    assert_eq!(first, text::windows(&tokens, 100)[..5].to_vec());
    let a = text::sample_windows(&tokens, 100, 20, 42);
    assert_eq!(a, text::sample_windows(&tokens, 100, 20, 42));
    assert_ne!(a, text::sample_windows(&tokens, 100, 20, 43));
    let starts: Vec<u32> = a.iter().map(|w| w[0]).collect();
    assert!(
        starts.windows(2).all(|p| p[0] < p[1]),
        "distinct windows in stream order"
    );
    assert!(starts.iter().all(|s| s % 100 == 0));
    assert_eq!(text::sample_windows(&tokens, 100, 500, 7).len(), 100);
}

#[test]
fn sliding_windows_score_every_token_once() {
    for (n, seq_len, stride) in [
        (1000, 128, 64),
        (1000, 128, 128),
        (1000, 128, 1),
        (100, 128, 32),
        (1000, 128, 100),
    ] {
        let windows = eval::plan_windows(n, seq_len, Some(stride));
        let mut scored = vec![0u8; n];
        for w in &windows {
            assert!(w.len <= seq_len && w.first_scored >= 1);
            for count in &mut scored[w.start + w.first_scored..w.start + w.len] {
                *count += 1;
            }
        }
        let once = if stride == seq_len {
            n - windows.len()
        } else {
            n - 1
        };
        assert_eq!(
            scored.iter().filter(|&&s| s == 1).count(),
            once,
            "n {n}, seq {seq_len}, stride {stride}"
        );
        assert!(scored.iter().all(|&s| s <= 1));
    }
    assert_eq!(eval::plan_windows(1000, 128, None).len(), 7);
}

#[test]
fn sliding_window_perplexity_is_lower_than_fixed_context() {
    let started = Instant::now();
    let model = load(MINI);
    let stream = model
        .tokenize_file(&Path::new(MINI).join("test.txt"))
        .unwrap();
    let stream = &stream[..2048];
    let fixed = eval::perplexity(
        &model.model,
        stream,
        &EvalOptions {
            seq_len: 256,
            ..EvalOptions::default()
        },
        &Silent,
    )
    .unwrap();
    let sliding = eval::perplexity(
        &model.model,
        stream,
        &EvalOptions {
            seq_len: 256,
            stride: Some(128),
            ..EvalOptions::default()
        },
        &Silent,
    )
    .unwrap();
    println!(
        "fixed {fixed:?}, sliding {sliding:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(fixed.tokens_scored, 8 * 255);
    assert_eq!(sliding.tokens_scored, 2047);
    assert!(sliding.perplexity < fixed.perplexity);
}

#[test]
fn divergence_of_a_model_from_itself_is_zero() {
    let started = Instant::now();
    let model = load(MINI);
    let stream = model
        .tokenize_file(&Path::new(MINI).join("test.txt"))
        .unwrap();
    let options = EvalOptions {
        max_windows: Some(6),
        batch_size: 3,
        ..EvalOptions::default()
    };
    let result = eval::divergence(&model.model, &model.model, &stream, &options, &Silent).unwrap();
    let ppl = eval::perplexity(&model.model, &stream, &options, &Silent).unwrap();
    println!("{result:?} in {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(result.windows, 6);
    assert_eq!(result.tokens, 6 * 511);
    assert!(
        result.mean_kl.abs() <= 1e-6 && result.max_kl.abs() <= 1e-6,
        "KL {result:?}"
    );
    assert_eq!(result.top1_agreement, 1.0);
    assert_eq!(result.reference, result.candidate);
    assert_relative(
        result.candidate.perplexity,
        ppl.perplexity,
        1e-6,
        "perplexity in divergence",
    );
}

#[test]
fn bf16_weights_diverge_a_little() {
    let model = load(MINI);
    let bf16 = EvalModel::load(Path::new(MINI), DType::BF16, &Device::Cpu).unwrap();
    let stream = model
        .tokenize_file(&Path::new(MINI).join("test.txt"))
        .unwrap();
    let options = EvalOptions {
        max_windows: Some(2),
        batch_size: 2,
        ..EvalOptions::default()
    };
    let result = eval::divergence(&model.model, &bf16.model, &stream, &options, &Silent).unwrap();
    println!("{result:?}");
    assert!(
        result.mean_kl > 0.0 && result.mean_kl < 0.05,
        "KL {result:?}"
    );
    assert!(result.top1_agreement > 0.8 && result.top1_agreement < 1.0);
    assert!(result.median_kl <= result.p99_kl && result.p99_kl <= result.max_kl);
}

/// log p(continuation | context) computed directly from one unbatched forward pass.
fn reference_log_likelihood(model: &EvalModel, context: &str, choice: &str) -> (f64, usize) {
    let encode = |s: &str| model.tokenizer.encode(s, false).unwrap().get_ids().to_vec();
    let context_tokens = encode(context);
    let whole = encode(&format!("{context} {choice}"));
    assert_eq!(
        whole[..context_tokens.len()],
        context_tokens[..],
        "context tokens are a prefix here"
    );
    let continuation = &whole[context_tokens.len()..];
    let input = Tensor::new(&whole[..whole.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .model
        .forward(&input, None)
        .unwrap()
        .logits
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut total = 0f64;
    for (k, &token) in continuation.iter().enumerate() {
        let row = &logits[context_tokens.len() - 1 + k];
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let log_sum_exp = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        total += row[token as usize] as f64 - log_sum_exp;
    }
    (total, continuation.len())
}

fn argmax(values: &[f64]) -> usize {
    (0..values.len()).fold(0, |best, i| if values[i] > values[best] { i } else { best })
}

#[test]
fn multiple_choice_matches_hand_computed_log_likelihoods() {
    let started = Instant::now();
    let model = load(MINI);
    let items = eval::read_multiple_choice(&data("multiple_choice.jsonl")).unwrap();
    assert_eq!(items.len(), 6);
    assert_eq!(items[1].gold, 2, "`label` is read as gold");
    assert_eq!(items[2].gold, 0, "a string `answer` is read as gold");
    assert!(
        items[2].context.starts_with("Each process"),
        "`question` is read as context"
    );

    let options = EvalOptions {
        batch_size: 4,
        ..EvalOptions::default()
    };
    let result = eval::multiple_choice(
        &model.model,
        &model.tokenizer,
        model.eos,
        &items,
        &options,
        &Silent,
    )
    .unwrap();
    let (mut acc, mut acc_norm, mut disagreements) = (0usize, 0usize, 0usize);
    for (item, scores) in items.iter().zip(&result.items) {
        let expected: Vec<(f64, usize)> = item
            .choices
            .iter()
            .map(|c| reference_log_likelihood(&model, &item.context, c))
            .collect();
        for (found, (loglik, _)) in scores.logliks.iter().zip(&expected) {
            assert!(
                (found - loglik).abs() <= 1e-3,
                "loglik {found} vs {loglik} for {item:?}"
            );
        }
        assert_eq!(
            scores.tokens,
            expected.iter().map(|e| e.1).collect::<Vec<_>>()
        );
        let logliks: Vec<f64> = expected.iter().map(|e| e.0).collect();
        let normalized: Vec<f64> = logliks
            .iter()
            .zip(&item.choices)
            .map(|(ll, c)| ll / c.chars().count() as f64)
            .collect();
        let (predicted, predicted_norm) = (argmax(&logliks), argmax(&normalized));
        println!(
            "{:?} -> {logliks:.2?}, per char {normalized:.3?}",
            item.choices
        );
        assert_eq!(scores.predicted, predicted);
        assert_eq!(scores.predicted_norm, predicted_norm);
        acc += (predicted == item.gold) as usize;
        acc_norm += (predicted_norm == item.gold) as usize;
        disagreements += (predicted != predicted_norm) as usize;
    }
    println!("{result:?} in {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        disagreements > 0,
        "some question must rank differently once normalised by length"
    );
    assert_eq!(result.count, 6);
    assert_eq!(result.acc, acc as f64 / 6.0);
    assert_eq!(result.acc_norm, acc_norm as f64 / 6.0);
    assert_ne!(result.acc, result.acc_norm);
}

#[test]
fn multiple_choice_follows_lm_eval_encoding() {
    let model = load(MINI);
    // Trailing whitespace of the context moves into the continuation.
    let (context, continuation) =
        eval::encode_pair(&model.tokenizer, "The value is ", "42", model.eos).unwrap();
    assert_eq!(
        context,
        text::encode(&model.tokenizer, "The value is").unwrap()
    );
    let whole = text::encode(&model.tokenizer, "The value is 42").unwrap();
    assert_eq!([context.clone(), continuation].concat(), whole);
    // An empty context is the end-of-text token.
    let (context, _) = eval::encode_pair(&model.tokenizer, "", " hello", model.eos).unwrap();
    assert_eq!(context, vec![model.eos]);
    let bad = MultipleChoiceItem {
        context: "x".into(),
        choices: vec!["".into()],
        gold: 0,
    };
    let options = EvalOptions {
        target_delimiter: String::new(),
        ..EvalOptions::default()
    };
    assert!(eval::multiple_choice(
        &model.model,
        &model.tokenizer,
        model.eos,
        &[bad],
        &options,
        &Silent
    )
    .is_err());
}

#[test]
fn evaluate_runs_everything_and_prints_a_table() {
    let started = Instant::now();
    let model = load(MINI);
    let reference = load(MINI);
    let plan = EvalPlan {
        texts: vec![Path::new(MINI).join("test.txt")],
        multiple_choice: vec![data("multiple_choice.jsonl")],
        options: EvalOptions {
            max_windows: Some(2),
            ..EvalOptions::default()
        },
    };
    let recorder = common::ProgressRecorder::default();
    let report = eval::evaluate(&model, Some(&reference), &plan, &recorder).unwrap();
    let continuations: usize = eval::read_multiple_choice(&data("multiple_choice.jsonl"))
        .unwrap()
        .iter()
        .map(|item| item.choices.len())
        .sum();
    assert_eq!(
        recorder.completed_tasks(),
        [
            ("divergence".to_string(), 2),
            ("multiple choice".to_string(), continuations as u64)
        ]
    );
    println!("{report}\n({:.1} s)", started.elapsed().as_secs_f64());
    assert_eq!(report.perplexity.len(), 1);
    assert_eq!(report.divergence.len(), 1);
    assert_eq!(report.multiple_choice.len(), 1);
    assert_eq!(report.perplexity[0].result.tokens_scored, 2 * 511);
    let table = report.to_string();
    assert!(table.contains("PPL") && table.contains("acc_norm") && table.contains("mean KL"));
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["perplexity"][0]["windows"], 2);
    assert!(json["multiple_choice"][0]["acc"].is_number());
    let without_reference = eval::evaluate(
        &model,
        None,
        &EvalPlan {
            multiple_choice: vec![],
            ..plan
        },
        &recorder,
    )
    .unwrap();
    assert_eq!(
        recorder.completed_tasks(),
        [("perplexity test.txt".to_string(), 2)]
    );
    assert!(without_reference.divergence.is_empty());
    let (alone, with_reference) = (
        &without_reference.perplexity[0].result,
        &report.perplexity[0].result,
    );
    assert_eq!(alone.tokens_scored, with_reference.tokens_scored);
    assert_relative(
        alone.perplexity,
        with_reference.perplexity,
        1e-6,
        "perplexity with and without a reference",
    );
}
