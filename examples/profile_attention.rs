//! Times the steps of causal attention at a given shape (a quick CPU profile aid).
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};

fn main() -> anyhow::Result<()> {
    let (b, h, s, d) = (4, 8, 512, 32);
    let q = Tensor::randn(0f32, 1., (b, h, s, d), &Device::Cpu)?;
    let k = Tensor::randn(0f32, 1., (b, h, s, d), &Device::Cpu)?;
    let v = Tensor::randn(0f32, 1., (b, h, s, d), &Device::Cpu)?;
    for _ in 0..2 {
        let t = Instant::now();
        let kt = k.t()?.contiguous()?;
        println!("kt {:.4}", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let scores = q.matmul(&kt)?;
        println!("qk {:.4}", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let scores = (scores * 0.17)?;
        println!("scale {:.4}", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mask = rfid_moe::models::common::causal_mask(s, s, DType::F32, &Device::Cpu)?;
        let scores = scores.broadcast_add(&mask)?;
        println!("mask {:.4}", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        println!("softmax {:.4}", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let o = p.matmul(&v)?;
        println!("pv {:.4}", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _ = o.transpose(1, 2)?.reshape((b, s, h * d))?;
        println!("out {:.4}", t.elapsed().as_secs_f64());
        let _ = D::Minus1;
    }
    Ok(())
}
