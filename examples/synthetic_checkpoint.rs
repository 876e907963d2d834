//! Writes a random checkpoint with the exact tensor names and shapes of a real MoE model, for
//! memory and speed measurements at real scale, plus random calibration token ids.
//!
//! ```sh
//! cargo run --release --example synthetic_checkpoint -- qwen3-30b-a3b 2 /tmp/qwen3-30b-2l
//! cargo run --release -- compress --model /tmp/qwen3-30b-2l \
//!     --calibration /tmp/qwen3-30b-2l/calibration.safetensors --samples 16 --seq-len 512 \
//!     --ratio 0.4 --out /tmp/qwen3-30b-2l-rfid
//! ```
//!
//! The shapes and the writer live in `bench/src/synthetic.rs` (shared with the `decode` and
//! `compress` benchmarks, `cargo run --release -p rfid-moe-bench --bin compress`):
//! `qwen3-30b-a3b`, `mixtral-8x7b`, `deepseek-v2-lite` and `deepseek-v3` (FP8 E4M3 with
//! 128×128 `weight_scale_inv` blocks). Weights are uniform with standard deviation 0.02, stored
//! bf16 (FP8 where the real model is); norms are ones. One shard per decoder layer, so writing
//! never holds more than one layer. A real DeepSeek-V3 layer is about 11 GB, so optional flags
//! after the three arguments shrink the shape (each change is printed):
//!
//! ```sh
//! cargo run --release --example synthetic_checkpoint -- deepseek-v3 2 /tmp/dsv3-2l \
//!     --experts 16 --dense-layers 1 --vocab 8192 --mtp
//! ```

#[path = "../bench/src/synthetic.rs"]
mod synthetic;

use std::path::PathBuf;

use synthetic::{CheckpointPlan, Overrides, Shape, SHAPE_NAMES};

/// The optional flags after the three arguments: overrides and the vocabulary.
fn parse_flags(flags: &[String]) -> anyhow::Result<(Overrides, Option<usize>)> {
    let (mut overrides, mut vocab) = (Overrides::default(), None);
    let mut rest = flags.iter();
    while let Some(flag) = rest.next() {
        let mut number = || -> anyhow::Result<usize> {
            let value = rest
                .next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a number"))?;
            Ok(value.parse()?)
        };
        match flag.as_str() {
            "--experts" => overrides.experts = Some(number()?),
            "--dense-layers" => overrides.dense_layers = Some(number()?),
            "--expert-intermediate" => overrides.expert_intermediate = Some(number()?),
            "--vocab" => vocab = Some(number()?),
            "--mtp" => overrides.mtp = true,
            other => anyhow::bail!("unknown flag `{other}`"),
        }
    }
    Ok((overrides, vocab))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, layers, out, flags @ ..] = args.as_slice() else {
        anyhow::bail!(
            "usage: synthetic_checkpoint SHAPE LAYERS OUT_DIR [--experts N] [--dense-layers N] \
             [--expert-intermediate N] [--vocab N] [--mtp] (shapes: {})",
            SHAPE_NAMES.join(", ")
        );
    };
    let layers: usize = layers.parse()?;
    let mut s =
        Shape::named(name, layers).ok_or_else(|| anyhow::anyhow!("unknown shape `{name}`"))?;
    let (overrides, vocab) = parse_flags(flags)?;
    let mut notes = overrides.apply(&mut s)?;
    let vocab = vocab.unwrap_or(s.vocab);
    if vocab != s.vocab {
        notes.push(format!(
            "vocabulary: {vocab} (the real model has {})",
            s.vocab
        ));
    }
    for note in &notes {
        println!("override: {note}");
    }
    let out = PathBuf::from(out);
    synthetic::write_checkpoint(
        &s,
        &out,
        CheckpointPlan {
            vocab,
            dense_gate_up: true,
            extend_layer: &mut |_, _| Ok(()),
            extra_config: serde_json::Map::new(),
            verbose: true,
        },
    )?;
    synthetic::write_token_windows(&out.join("calibration.safetensors"), 128, 512, vocab)?;
    println!(
        "wrote {} ({name}, {layers} of the real model's {} layers, {} of them MoE)",
        out.display(),
        s.real_layers,
        s.real_moe_layers()
    );
    Ok(())
}
