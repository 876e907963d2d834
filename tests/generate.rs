//! Generation: the key/value cache gives the logits of a full forward pass for every family,
//! and greedy decoding reproduces transformers' `generate` token for token
//! (`tests/fixtures/generate/*.json`, written by `scripts/generate_reference.py`).

mod common;

use common::{fixture, max_abs_diff, repo_root};

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use rfid_moe::checkpoint::{self, Checkpoint};
use rfid_moe::generate::{generate, GenerateOptions, Sampling, StopReason};
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
    // A three-token prefill, then one token at a time, then whatever is left as one chunk.
    for (chunk, len) in std::iter::once(3).chain(std::iter::repeat(1)).enumerate() {
        if start >= seq {
            break;
        }
        let len = if chunk == 5 {
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

/// Bytes the key/value cache holds after `positions` tokens of the fixture `name` (f32).
fn cache_bytes_after(name: &str, positions: usize) -> (usize, serde_json::Value) {
    let dir = fixture(name);
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let model = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::zeros((1, positions), DType::U32, &Device::Cpu).unwrap();
    let mut cache = model.new_cache();
    model.forward_cached(&ids, &mut cache).unwrap();
    (cache.stored_bytes().unwrap(), checkpoint.config().clone())
}

#[test]
fn latent_attention_caches_the_latent_and_rotary_key_only() {
    let positions = 7;
    let count = |config: &serde_json::Value, key: &str| config[key].as_u64().unwrap() as usize;
    for name in ["tiny-deepseek_v2", "tiny-deepseek_v3"] {
        let (bytes, config) = cache_bytes_after(name, positions);
        let per_position = count(&config, "kv_lora_rank") + count(&config, "qk_rope_head_dim");
        let expected = count(&config, "num_hidden_layers") * positions * per_position * 4;
        assert_eq!(bytes, expected, "{name}");
        // Every head's key and value would be several times larger.
        let heads = count(&config, "num_attention_heads");
        let per_head = count(&config, "qk_nope_head_dim")
            + count(&config, "qk_rope_head_dim")
            + count(&config, "v_head_dim");
        assert!(heads * per_head > 2 * per_position, "{name}");
    }
    let (bytes, config) = cache_bytes_after("tiny-qwen3_moe", positions);
    let expected = count(&config, "num_hidden_layers")
        * positions
        * 2
        * count(&config, "num_key_value_heads")
        * count(&config, "head_dim")
        * 4;
    assert_eq!(bytes, expected);
}

/// Greedy generation from each case of a reference file written by transformers'
/// `generate(do_sample=False)` (f32, KV cache) equals it token for token, stop included.
fn greedy_matches_transformers(reference: &str, model_dir: &Path) {
    let path = repo_root().join("tests/fixtures/generate").join(reference);
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let checkpoint = Checkpoint::open(model_dir).unwrap();
    let model = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let tokenizer = model_dir
        .join("tokenizer.json")
        .exists()
        .then(|| rfid_moe::text::load_tokenizer(model_dir).unwrap());
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = reference["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let prompt = ids(&case["prompt_ids"]);
        if let (Some(text), Some(tokenizer)) = (case["prompt"].as_str(), &tokenizer) {
            let encoded = tokenizer.encode(text, true).unwrap().get_ids().to_vec();
            assert_eq!(encoded, prompt, "tokenization of {text:?}");
        }
        let options = GenerateOptions {
            max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as usize,
            sampling: Sampling::greedy(),
            stop_tokens: case["eos_token_id"]
                .as_u64()
                .map(|id| vec![id as u32])
                .unwrap_or_default(),
        };
        let mut streamed = Vec::new();
        let generation = generate(&model, &prompt, &options, &mut |t| {
            streamed.push(t);
            Ok(true)
        })
        .unwrap();
        let expected = ids(&case["generated_ids"]);
        assert_eq!(
            generation.tokens,
            expected,
            "{}: prompt {prompt:?}",
            path.display()
        );
        assert_eq!(streamed, expected, "every token reaches the callback");
        let stopped = case["stopped_at_eos"].as_bool().unwrap_or(false);
        assert_eq!(
            generation.stop == StopReason::StopToken,
            stopped,
            "stop reason of {prompt:?}"
        );
    }
}

macro_rules! greedy_test {
    ($test:ident, $reference:literal, $dir:expr) => {
        #[test]
        fn $test() {
            greedy_matches_transformers($reference, &$dir);
        }
    };
}

greedy_test!(
    mini_moe_docs_greedy_matches_transformers,
    "mini-moe-docs.json",
    common::mini_model()
);
greedy_test!(
    mixtral_greedy_matches_transformers,
    "tiny-mixtral.json",
    fixture("tiny-mixtral")
);
greedy_test!(
    qwen2_moe_greedy_matches_transformers,
    "tiny-qwen2_moe.json",
    fixture("tiny-qwen2_moe")
);
greedy_test!(
    qwen3_moe_greedy_matches_transformers,
    "tiny-qwen3_moe.json",
    fixture("tiny-qwen3_moe")
);
greedy_test!(
    olmoe_greedy_matches_transformers,
    "tiny-olmoe.json",
    fixture("tiny-olmoe")
);
greedy_test!(
    deepseek_v2_greedy_matches_transformers,
    "tiny-deepseek_v2.json",
    fixture("tiny-deepseek_v2")
);
greedy_test!(
    deepseek_v3_greedy_matches_transformers,
    "tiny-deepseek_v3.json",
    fixture("tiny-deepseek_v3")
);
greedy_test!(
    deepseek_v2_yarn_greedy_matches_transformers,
    "tiny-deepseek_v2-yarn.json",
    fixture("tiny-deepseek_v2-yarn")
);
greedy_test!(
    deepseek_v3_yarn_greedy_matches_transformers,
    "tiny-deepseek_v3-yarn.json",
    fixture("tiny-deepseek_v3-yarn")
);

/// The larger trained model is not in the repository: run with
/// `RFID_MOE_TINY_MOE_DOCS=/path/to/tiny-moe-docs cargo test --test generate -- --ignored`.
#[test]
#[ignore = "needs RFID_MOE_TINY_MOE_DOCS pointing at the tiny-moe-docs model"]
fn tiny_moe_docs_greedy_matches_transformers() {
    let dir = std::env::var_os("RFID_MOE_TINY_MOE_DOCS").expect("set RFID_MOE_TINY_MOE_DOCS");
    greedy_matches_transformers("tiny-moe-docs.json", Path::new(&dir));
}

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
