//! Every supported family reproduces transformers 5.17's logits and router logits on the tiny
//! fixtures (`tests/fixtures/tiny-*/reference.safetensors`).

mod common;

use common::{fixture, max_abs_diff};

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rfid_moe::checkpoint::{self, Checkpoint};
use rfid_moe::models::Model;

const TOLERANCE: f32 = 1e-4;

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

/// The fused 3-D expert layout (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) that
/// transformers 5 uses in memory loads behind the same canonical view and gives the same logits.
#[test]
fn fused_expert_tensors_give_the_same_logits() {
    use std::collections::HashMap;
    let source = fixture("tiny-qwen3_moe");
    let checkpoint = Checkpoint::open(&source).unwrap();
    let config = checkpoint.config().clone();
    let (n, layers) = (16usize, 3usize);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in checkpoint.tensor_names() {
        if !name.contains(".experts.") {
            tensors.insert(
                name.to_string(),
                checkpoint
                    .load(name, DType::F32, &Device::Cpu, "test")
                    .unwrap(),
            );
        }
    }
    for layer in 0..layers {
        let get = |j: usize, m: &str| {
            checkpoint
                .load(
                    &format!("model.layers.{layer}.mlp.experts.{j}.{m}.weight"),
                    DType::F32,
                    &Device::Cpu,
                    "test",
                )
                .unwrap()
        };
        let gate_up: Vec<Tensor> = (0..n)
            .map(|j| Tensor::cat(&[get(j, "gate_proj"), get(j, "up_proj")], 0).unwrap())
            .collect();
        let down: Vec<Tensor> = (0..n).map(|j| get(j, "down_proj")).collect();
        tensors.insert(
            format!("model.layers.{layer}.mlp.experts.gate_up_proj"),
            Tensor::stack(&gate_up, 0).unwrap(),
        );
        tensors.insert(
            format!("model.layers.{layer}.mlp.experts.down_proj"),
            Tensor::stack(&down, 0).unwrap(),
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fused");
    let mut writer = rfid_moe::checkpoint::writer::CheckpointWriter::create(&out, false).unwrap();
    writer.write_shard(tensors).unwrap();
    writer
        .write_file(
            "config.json",
            serde_json::to_string(&config).unwrap().as_bytes(),
        )
        .unwrap();
    writer.finish().unwrap();

    let fused = Checkpoint::open(&out).unwrap();
    assert!(fused.contains("model.layers.0.mlp.experts.gate_up_proj"));
    assert!(!fused.contains("model.layers.0.mlp.experts.0.gate_proj.weight"));
    let model = Model::load(&fused, DType::F32, &Device::Cpu).unwrap();
    let reference =
        checkpoint::load_all(&source.join("reference.safetensors"), &Device::Cpu).unwrap();
    let output = model.forward(&reference["input_ids"], None).unwrap();
    assert!(max_abs_diff(&output.logits, &reference["logits"]) <= TOLERANCE);
}

/// bf16 weights load, converted to the requested dtype, and give finite logits of the right shape.
#[test]
fn bf16_checkpoint_loads_and_runs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mini-moe-docs");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    assert_eq!(
        checkpoint.dominant_dtype(),
        rfid_moe::checkpoint::StoredDType::BF16
    );
    let model = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 50, 200, 7, 99, 1000, 3, 4]], &Device::Cpu).unwrap();
    let out = model.forward(&ids, None).unwrap();
    assert_eq!(out.logits.dims(), &[1, 8, 4096]);
    assert_eq!(out.router_logits.len(), 4);
    let finite = out
        .logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite());
    assert!(finite);
}

// YaRN rope scaling (factor 4, mscale = mscale_all_dim = 0.707: cos/sin unscaled, softmax scaled
// by mscale²), fixtures written by transformers 5.17 with `scripts/make-yarn-fixtures.py`.
parity_test!(
    deepseek_v2_yarn_matches_transformers,
    "tiny-deepseek_v2-yarn",
    0
);
parity_test!(
    deepseek_v3_yarn_matches_transformers,
    "tiny-deepseek_v3-yarn",
    0
);
