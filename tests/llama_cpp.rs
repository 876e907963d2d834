//! Our GGUF outputs in llama.cpp itself (nobody's code but theirs: `llama-perplexity` built by
//! `scripts/llama-cpp.sh` from the source PyPI's llama-cpp-python vendors): every family's
//! plain conversion, every family pruned and quantised by `compress --format gguf`, and a
//! quantised Qwen3-MoE trained model give llama.cpp the perplexity rfid-moe measures on the same
//! weights, text and windows (`eval --second-half`).
//!
//! Needs the llama.cpp build (made on first use, about 7 CPU-minutes, cached outside the clone)
//! or `RFID_MOE_LLAMA_CPP_BIN=/dir/with/llama-perplexity`; fails when it cannot be had unless
//! `RFID_MOE_SKIP_LLAMA_CPP=1` opts out, loudly.

mod common;
#[path = "gguf_common/mod.rs"]
mod gguf_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::eval::{self, EvalOptions};
use rfid_moe::models::Model;
use rfid_moe::pipeline::OutputFormat;

const SKIP_VAR: &str = "RFID_MOE_SKIP_LLAMA_CPP";
const BIN_VAR: &str = "RFID_MOE_LLAMA_CPP_BIN";

/// The directory with llama.cpp's binaries, or None when the user opted out.
fn llama_cpp(test: &str) -> Option<PathBuf> {
    common::external_tool(
        &common::ExternalTool {
            skip_var: SKIP_VAR,
            path_var: BIN_VAR,
            script: "scripts/llama-cpp.sh",
            unchecked: "llama.cpp running our GGUF outputs",
            usable: |dir| dir.join("llama-perplexity").exists(),
            skip_if_uninstallable: false,
        },
        test,
    )
}

/// llama.cpp's perplexity of `gguf` on `text` in chunks of `ctx` tokens (their second halves
/// scored) and the chunks it covers: its running estimate after the last chunk it printed
/// (the last lines of its log are sometimes not printed, a known upstream logging issue).
fn llama_perplexity(bin: &Path, gguf: &Path, text: &Path, ctx: usize) -> (f64, usize) {
    let output = Command::new(bin.join("llama-perplexity"))
        .args(["-m", &gguf.to_string_lossy(), "-f", &text.to_string_lossy()])
        .args(["-c", &ctx.to_string(), "-b", &ctx.to_string(), "-t", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "llama-perplexity failed on {} ({}):\n{stderr}\n{stdout}",
        gguf.display(),
        output.status
    );
    // Items of the form `[k]estimate`.
    let estimates: Vec<(usize, f64)> = stdout
        .split(',')
        .filter_map(|item| {
            let (k, v) = item.trim().strip_prefix('[')?.split_once(']')?;
            Some((k.parse().ok()?, v.parse().ok()?))
        })
        .collect();
    let &(chunks, estimate) = estimates.last().unwrap_or_else(|| {
        panic!("no per-chunk estimate from llama-perplexity:\n{stdout}\n{stderr}")
    });
    (estimate, chunks)
}

/// rfid-moe's perplexity of the checkpoint at `model` on `tokens`, windows of `ctx` with their
/// second halves scored, over the first `chunks` windows.
fn rfid_perplexity(model: &Path, tokens: &[u32], ctx: usize, chunks: usize) -> f64 {
    let checkpoint = Checkpoint::open(model).unwrap();
    let model = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let options = EvalOptions {
        seq_len: ctx,
        second_half: true,
        max_windows: Some(chunks),
        ..EvalOptions::default()
    };
    let progress = rfid_moe::progress::Silent;
    eval::perplexity(&model, tokens, &options, &progress)
        .unwrap()
        .perplexity
}

/// `text` tokenized as llama.cpp tokenizes a whole file (no document separators, no BOS).
fn tokens_of(model_dir: &Path, text: &str) -> Vec<u32> {
    let tokenizer = rfid_moe::text::load_tokenizer(model_dir).unwrap();
    tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

/// mini-moe-docs' test text as one document (blank lines collapsed), first `chars` characters.
fn one_document(chars: usize) -> String {
    let text = std::fs::read_to_string(common::mini_model().join("test.txt")).unwrap();
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        out.push_str(line);
        out.push('\n');
        if out.len() >= chars {
            break;
        }
    }
    out
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b
}

/// Float weights: both sides compute in f32 and differ only by summation order.
const FLOAT_TOLERANCE: f64 = 2e-4;
/// ggml-block experts: llama.cpp's CPU kernels round each activation row to 8-bit blocks
/// (Q8_0 / Q8_K) before the dot product with 2-6-bit weights, which rfid-moe does not; 0.02%
/// was measured on mini-moe-docs at 30% kept.
const BLOCK_TOLERANCE: f64 = 3e-3;

/// A text (also written at `text_path`) scored in windows of `ctx` tokens.
struct Scored<'a> {
    text_path: &'a Path,
    text: &'a str,
    ctx: usize,
}

/// Asserts that llama.cpp's perplexity of `gguf` and rfid-moe's of `model` on the same windows
/// of `scored` are within `tolerance` (relative) over at least `min_chunks` windows.
fn assert_same_perplexity(
    (bin, gguf, model): (&Path, &Path, &Path),
    scored: &Scored,
    (tolerance, min_chunks): (f64, usize),
    label: &str,
) {
    let (theirs, chunks) = llama_perplexity(bin, gguf, scored.text_path, scored.ctx);
    let ours = rfid_perplexity(model, &tokens_of(model, scored.text), scored.ctx, chunks);
    eprintln!("{label}: llama.cpp {theirs:.6}, rfid-moe {ours:.6} over {chunks} chunks");
    assert!(chunks >= min_chunks, "{label}: {chunks} chunks");
    assert!(
        relative(theirs, ours) < tolerance,
        "{label}: llama.cpp {theirs} vs rfid-moe {ours} over {chunks} chunks"
    );
}

#[test]
fn llama_cpp_gives_every_family_our_perplexity() {
    let Some(bin) = llama_cpp("llama_cpp_gives_every_family_our_perplexity") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let text_path = tmp.path().join("text.txt");
    let text = one_document(6000);
    std::fs::write(&text_path, &text).unwrap();
    // tiny-olmoe's grouped keys and tiny-deepseek_v2's full-rank queries are refused for GGUF
    // (llama.cpp cannot run them; tests/gguf.rs checks the refusals).
    let families = [
        "tiny-mixtral",
        "tiny-qwen2_moe",
        "tiny-qwen3_moe",
        "tiny-deepseek_v3",
    ]
    .iter()
    .chain(&["tiny-deepseek_v3-yarn"]);
    for name in families {
        let (_keep, dir) = common::copy_fixture(name);
        gguf_common::write_byte_tokenizer(&dir);
        let file = dir.join("model.gguf");
        rfid_moe::export::gguf::write(&Checkpoint::open(&dir).unwrap(), &file, Default::default())
            .unwrap();
        let scored = Scored {
            text_path: &text_path,
            text: &text,
            ctx: 128,
        };
        assert_same_perplexity((&bin, &file, &dir), &scored, (FLOAT_TOLERANCE, 10), name);
    }
}

#[test]
fn llama_cpp_gives_a_quantised_qwen3_moe_our_perplexity() {
    let Some(bin) = llama_cpp("llama_cpp_gives_a_quantised_qwen3_moe_our_perplexity") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mini-gguf");
    let model = common::mini_model();
    let mut options =
        common::small_default_options(&model, &model.join("calibration.txt"), &out, 0.7);
    options.calibration.samples = 16;
    options.calibration.seq_len = 128;
    options.calibration.batch_size = 8;
    options.set_format(OutputFormat::Gguf);
    // Attention, embeddings and head as Q8_0 too, as llama-quantize would.
    options.output.other_type = Some(rfid_moe::quant::Scheme::parse("q8_0").unwrap());
    rfid_moe::compress(&options).unwrap();
    let text_path = tmp.path().join("text.txt");
    let text = one_document(30_000);
    std::fs::write(&text_path, &text).unwrap();
    let file = out.join(rfid_moe::checkpoint::gguf::names::GGUF_FILE);
    let scored = Scored {
        text_path: &text_path,
        text: &text,
        ctx: 256,
    };
    assert_same_perplexity(
        (&bin, &file, &out),
        &scored,
        (BLOCK_TOLERANCE, 20),
        "mini-moe-docs GGUF",
    );
}

#[test]
fn llama_cpp_gives_every_family_pruned_and_quantised_our_perplexity() {
    let test = "llama_cpp_gives_every_family_pruned_and_quantised_our_perplexity";
    let Some(bin) = llama_cpp(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let text_path = tmp.path().join("text.txt");
    let text = one_document(6000);
    std::fs::write(&text_path, &text).unwrap();
    for name in [
        "tiny-mixtral",
        "tiny-qwen2_moe",
        "tiny-qwen3_moe",
        "tiny-deepseek_v3",
    ] {
        let (_keep, dir) = common::copy_fixture(name);
        gguf_common::write_byte_tokenizer(&dir);
        let calibration =
            common::random_token_windows(&dir.join("calibration.safetensors"), 256, 16, 32, 3);
        let out = tmp.path().join(format!("{name}-gguf"));
        let mut options = common::small_default_options(&dir, &calibration, &out, 0.6);
        options.methods = vec!["prune".into(), "quantise".into(), "keep".into()];
        options.set_format(OutputFormat::Gguf);
        common::prune_settings(&mut options, |s| s.fraction = Some(0.25));
        options
            .update_settings::<rfid_moe::pipeline::methods::quantise::QuantiseSettings>(|s| {
                s.schemes = ["q8_0", "q4_0"]
                    .iter()
                    .map(|k| rfid_moe::quant::Scheme::parse(k).unwrap())
                    .collect();
            })
            .unwrap();
        rfid_moe::compress(&options).unwrap();
        // A quarter of the experts removed and kept ones stored as ggml blocks.
        let report = common::assert_a_quarter_of_experts_removed(&out, name);
        let choices = serde_json::to_string(&report["layers"]).unwrap();
        assert!(
            choices.contains("quantise q4_0") || choices.contains("quantise q8_0"),
            "{name}: {choices}"
        );
        let file = out.join(rfid_moe::checkpoint::gguf::names::GGUF_FILE);
        let scored = Scored {
            text_path: &text_path,
            text: &text,
            ctx: 128,
        };
        let label = format!("{name} pruned + quantised");
        assert_same_perplexity((&bin, &file, &out), &scored, (BLOCK_TOLERANCE, 10), &label);
    }
}
