//! Times one forward pass of a model over a batch of windows (a quick CPU profile aid).
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::models::Model;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/mini-moe-docs".into());
    let batch: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let checkpoint = Checkpoint::open(&dir)?;
    let model = Model::load(&checkpoint, DType::F32, &Device::Cpu)?;
    let ids: Vec<u32> = (0..batch * 512).map(|i| (i * 7919 % 4000) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, 512), &Device::Cpu)?;
    for _ in 0..2 {
        let t = Instant::now();
        model.forward(&ids, None)?;
        println!("forward {batch}x512: {:.3}s", t.elapsed().as_secs_f64());
    }
    let x = model.ends.embed(&ids)?;
    let layer = &model.layers[0];
    let normed = layer.input_layernorm.forward(&x)?;
    let t = Instant::now();
    if let rfid_moe::models::AttentionBlock::Standard(a) = &layer.attention {
        a.forward(&normed, &model.rotary, None)?;
    }
    println!("attention layer 0: {:.3}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    if let rfid_moe::models::FeedForward::Moe(m) = &layer.feed_forward {
        m.forward(&normed, 0, None)?;
    }
    println!("moe layer 0: {:.3}s", t.elapsed().as_secs_f64());
    Ok(())
}
