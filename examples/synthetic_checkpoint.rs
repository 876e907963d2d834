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
//! The shapes and the writer live in `bench/src/synthetic.rs` (shared with the `decode`
//! benchmark, `cargo run --release -p rfid-moe-bench --bin decode`): `qwen3-30b-a3b`,
//! `mixtral-8x7b` and `deepseek-v2-lite`. Weights are uniform with standard deviation 0.02,
//! stored bf16; norms are ones. One shard per decoder layer, so writing never holds more than
//! one layer.

#[path = "../bench/src/synthetic.rs"]
mod synthetic;

use std::path::PathBuf;

use safetensors::tensor::{Dtype, TensorView};
use synthetic::{CheckpointPlan, Shape, SHAPE_NAMES};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, layers, out] = args.as_slice() else {
        anyhow::bail!(
            "usage: synthetic_checkpoint SHAPE LAYERS OUT_DIR (shapes: {})",
            SHAPE_NAMES.join(", ")
        );
    };
    let layers: usize = layers.parse()?;
    let s = Shape::named(name, layers).ok_or_else(|| anyhow::anyhow!("unknown shape `{name}`"))?;
    let out = PathBuf::from(out);
    synthetic::write_checkpoint(
        &s,
        &out,
        CheckpointPlan {
            vocab: s.vocab,
            dense_gate_up: true,
            extend_layer: &mut |_, _| Ok(()),
            extra_config: serde_json::Map::new(),
            verbose: true,
        },
    )?;
    // 128 windows of 512 random token ids, i64.
    let ids: Vec<u8> = (0..128 * 512u64)
        .flat_map(|t| ((rfid_moe::rng::splitmix64(t) % s.vocab as u64) as i64).to_le_bytes())
        .collect();
    let view = TensorView::new(Dtype::I64, vec![128, 512], &ids)?;
    safetensors::serialize_to_file(
        [("input_ids", view)],
        None,
        &out.join("calibration.safetensors"),
    )?;
    println!("wrote {} ({name}, {layers} layers)", out.display());
    Ok(())
}
