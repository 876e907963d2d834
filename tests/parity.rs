//! Every supported family reproduces transformers 5.17's logits and router logits on the tiny
//! fixtures (`tests/fixtures/tiny-*/reference.safetensors`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rfid_moe::checkpoint::{self, Checkpoint};
use rfid_moe::models::Model;

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Runs the fixture and returns (max |Δlogits|, max |Δrouter logits| over layers, router layers compared).
fn parity(name: &str) -> (f32, f32, usize) {
    let dir = fixture(name);
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let model = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let reference = checkpoint::load_all(&dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let output = model.forward(&reference["input_ids"], None).unwrap();
    let logits_diff = max_abs_diff(&output.logits, &reference["logits"]);
    let mut router_diff = 0f32;
    let mut compared = 0;
    for (layer, logits) in &output.router_logits {
        if let Some(expected) = reference.get(&format!("router_logits.{layer}")) {
            router_diff = router_diff.max(max_abs_diff(logits, expected));
            compared += 1;
        }
    }
    println!("{name}: max |Δlogits| = {logits_diff:.3e}, max |Δrouter| = {router_diff:.3e} over {compared} layers");
    (logits_diff, router_diff, compared)
}

macro_rules! parity_test {
    ($test:ident, $fixture:literal, $router_layers:expr) => {
        #[test]
        fn $test() {
            let (logits, router, compared) = parity($fixture);
            assert!(logits <= TOLERANCE, "logits differ by {logits}");
            assert!(router <= TOLERANCE, "router logits differ by {router}");
            assert_eq!(compared, $router_layers, "router-logit layers compared");
        }
    };
}

parity_test!(mixtral_matches_transformers, "tiny-mixtral", 2);
parity_test!(qwen2_moe_matches_transformers, "tiny-qwen2_moe", 2);
parity_test!(qwen3_moe_sharded_matches_transformers, "tiny-qwen3_moe", 3);
parity_test!(olmoe_matches_transformers, "tiny-olmoe", 2);
parity_test!(deepseek_v2_matches_transformers, "tiny-deepseek_v2", 0);
parity_test!(deepseek_v3_matches_transformers, "tiny-deepseek_v3", 0);
