//! GGUF output (`compress --format gguf`, `export::gguf`): every family converts to llama.cpp's
//! layout and reads back with the same logits bit for bit; a quantised output holds the same
//! weights as the same run written as safetensors; what GGUF cannot hold is refused by name.
//! (llama.cpp itself runs these files in `tests/llama_cpp.rs`.)

mod common;
#[path = "gguf_common/mod.rs"]
mod gguf_common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use rfid_moe::checkpoint::gguf::encode::{self, MetaValue, TensorEntry, TensorType};
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::export::gguf;
use rfid_moe::pipeline::methods::quantise::QuantiseSettings;
use rfid_moe::pipeline::OutputFormat;
use rfid_moe::pipeline::{CompressOptions, Granularity};
use rfid_moe::quant::{GgmlKind, Scheme};

/// A writable copy of fixture `name` with a byte-level tokenizer.
fn fixture_with_tokenizer(name: &str) -> (tempfile::TempDir, PathBuf) {
    let (tmp, dir) = common::copy_fixture(name);
    gguf_common::write_byte_tokenizer(&dir);
    (tmp, dir)
}

fn reference_ids(dir: &Path) -> Tensor {
    let reference =
        rfid_moe::checkpoint::load_all(&dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    reference["input_ids"].clone()
}

fn read_content(path: &Path) -> Content {
    Content::read(&mut std::fs::File::open(path).unwrap()).unwrap()
}

#[test]
fn every_family_converts_to_gguf_and_reads_back_with_the_same_logits() {
    let families = common::FAMILIES
        .iter()
        .chain(&["tiny-deepseek_v2-yarn", "tiny-deepseek_v3-yarn"]);
    for name in families {
        let (tmp, dir) = fixture_with_tokenizer(name);
        let file = tmp.path().join("out.gguf");
        let source = Checkpoint::open(&dir).unwrap();
        // What llama.cpp's graph for the family cannot run is refused: grouped keys in olmoe
        // (2 of 4 heads), full-rank queries in deepseek2 below DeepSeek-V2-Lite's depth.
        let refused = match *name {
            "tiny-olmoe" => Some("num_key_value_heads"),
            "tiny-deepseek_v2" | "tiny-deepseek_v2-yarn" => Some("q_lora_rank"),
            _ => None,
        };
        if let Some(key) = refused {
            let e = gguf::write(&source, &file, Default::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{name}: {e}");
            assert!(!file.exists());
            continue;
        }
        let summary = gguf::write(&source, &file, Default::default()).unwrap();
        assert_eq!(
            summary.file_bytes,
            std::fs::metadata(&file).unwrap().len(),
            "{name}"
        );
        let content = read_content(&file);
        let layers = source.config()["num_hidden_layers"].as_u64().unwrap() as usize;
        let arch = content.metadata["general.architecture"]
            .to_string()
            .unwrap()
            .clone();
        let stacks: Vec<&String> = content
            .tensor_infos
            .keys()
            .filter(|n| n.ends_with("_exps.weight"))
            .collect();
        let moe_layers = (0..layers)
            .filter(|l| {
                content
                    .tensor_infos
                    .contains_key(&format!("blk.{l}.ffn_up_exps.weight"))
            })
            .count();
        assert_eq!(
            stacks.len(),
            3 * moe_layers,
            "{name}: three expert stacks per MoE layer"
        );
        assert!(moe_layers > 0, "{name}");
        let ids = reference_ids(&dir);
        let original = common::logits_of(&dir, &ids);
        let read_back = common::logits_of(&file, &ids);
        assert_eq!(
            common::max_abs_diff(&original, &read_back),
            0.0,
            "{name} ({arch}): the GGUF read back must give the original's logits exactly"
        );
    }
}

#[test]
fn mixtral_queries_and_keys_are_in_llama_cpp_rotary_order() {
    let (tmp, dir) = fixture_with_tokenizer("tiny-mixtral");
    let file = tmp.path().join("m.gguf");
    let source = Checkpoint::open(&dir).unwrap();
    gguf::write(&source, &file, Default::default()).unwrap();
    let q = source
        .load_stored("model.layers.0.self_attn.q_proj.weight", "test")
        .unwrap();
    let heads = source.config()["num_attention_heads"].as_u64().unwrap() as usize;
    let expected = rfid_moe::checkpoint::gguf::names::permute_rows(&q, heads).unwrap();
    let content = read_content(&file);
    let info = &content.tensor_infos["blk.0.attn_q.weight"];
    let stored = info
        .read(
            &mut std::fs::File::open(&file).unwrap(),
            content.tensor_data_offset,
            &Device::Cpu,
        )
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap();
    assert_eq!(common::max_abs_diff(&expected, &stored), 0.0);
    assert!(
        common::max_abs_diff(&q, &stored) > 0.0,
        "the permutation moves rows"
    );
}

/// Mini-moe-docs options writing `out` at `ratio` with enough calibration for GPTQ.
fn mini_options(out: &Path, ratio: f64) -> CompressOptions {
    let model = common::mini_model();
    let mut options =
        common::small_default_options(&model, &model.join("calibration.txt"), out, ratio);
    options.calibration.samples = 16;
    options.calibration.seq_len = 128;
    options.calibration.batch_size = 8;
    options
}

#[test]
fn a_quantised_gguf_output_holds_the_weights_of_the_same_run_in_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let as_gguf = tmp.path().join("gguf");
    let mut options = mini_options(&as_gguf, 0.7);
    options.set_format(OutputFormat::Gguf);
    assert_eq!(options.methods, ["prune", "quantise", "keep"]);
    assert_eq!(options.budget.granularity, Granularity::Matrix);
    rfid_moe::compress(&options).unwrap();

    let as_safetensors = tmp.path().join("st");
    let mut same = mini_options(&as_safetensors, 0.7);
    same.methods = options.methods.clone();
    same.budget.granularity = Granularity::Matrix;
    same.update_settings::<QuantiseSettings>(|s| {
        s.schemes = GgmlKind::ALL.into_iter().map(Scheme::Ggml).collect();
    })
    .unwrap();
    rfid_moe::compress(&same).unwrap();

    let mut names: Vec<String> = std::fs::read_dir(&as_gguf)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "README.md",
            "compress.toml",
            "compression_report.json",
            "model.gguf",
            "tokenizer.json"
        ]
    );
    let content = read_content(&as_gguf.join(rfid_moe::checkpoint::gguf::names::GGUF_FILE));
    let block_stacks = content
        .tensor_infos
        .iter()
        .filter(|(n, i)| {
            n.ends_with("_exps.weight")
                && !matches!(
                    format!("{:?}", i.ggml_dtype).as_str(),
                    "F32" | "F16" | "BF16"
                )
        })
        .count();
    assert!(
        block_stacks > 0,
        "some expert stacks are ggml blocks at 30% kept"
    );
    let ids = common::mini_ids();
    let a = common::logits_of(&as_gguf, &ids);
    let b = common::logits_of(&as_safetensors, &ids);
    assert_eq!(
        common::max_abs_diff(&a, &b),
        0.0,
        "same weights, same logits"
    );
}

#[test]
fn other_weights_are_rounded_to_the_chosen_type_and_read_back() {
    let (tmp, dir) = fixture_with_tokenizer("tiny-qwen2_moe");
    let file = tmp.path().join("q8.gguf");
    let source = Checkpoint::open(&dir).unwrap();
    let options = gguf::GgufOptions {
        other_type: Some(GgmlKind::Q8_0),
    };
    gguf::write(&source, &file, options).unwrap();
    let content = read_content(&file);
    let kind = |name: &str| format!("{:?}", content.tensor_infos[name].ggml_dtype);
    assert_eq!(kind("blk.0.attn_q.weight"), "Q8_0");
    assert_eq!(kind("token_embd.weight"), "Q8_0");
    assert_eq!(kind("blk.0.ffn_gate_shexp.weight"), "Q8_0");
    // Norms, routers, biases and the routed experts keep their types.
    assert_eq!(kind("blk.0.attn_norm.weight"), "F32");
    assert_eq!(kind("blk.0.ffn_gate_inp.weight"), "F32");
    assert_eq!(kind("blk.0.attn_q.bias"), "F32");
    assert_eq!(kind("blk.0.ffn_up_exps.weight"), "F32");
    // Read back, every rounded matrix is exactly the Q8_0 round trip of the original.
    let read = Checkpoint::open(&file).unwrap();
    let q8 = Scheme::Ggml(GgmlKind::Q8_0);
    let mut rounded = 0;
    for name in source.tensor_names() {
        let Some(gguf_name) = rfid_moe::checkpoint::gguf::names::gguf_name(name) else {
            continue;
        };
        if kind(&gguf_name) != "Q8_0" {
            continue;
        }
        let original = source.load_stored(name, "test").unwrap();
        let cols = original.dim(1).unwrap();
        let values = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let expected = q8
            .dequantise(&q8.quantise_nearest(&values, cols, None).unwrap(), cols)
            .unwrap();
        let got = read.load_stored(name, "test").unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, expected, "{name}");
        rounded += 1;
    }
    assert!(rounded >= 10, "{rounded} matrices rounded");
}

#[test]
fn what_gguf_cannot_hold_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = mini_options(&tmp.path().join("x"), 0.5);
    options.set_format(OutputFormat::Gguf);
    options.methods = vec!["lowrank".into(), "keep".into()];
    let e = options.validate().unwrap_err().to_string();
    assert!(e.contains("lowrank") && e.contains("gguf"), "{e}");

    let mut options = mini_options(&tmp.path().join("y"), 0.5);
    options.set_format(OutputFormat::Gguf);
    options.budget.granularity = Granularity::Expert;
    let e = options.validate().unwrap_err().to_string();
    assert!(e.contains("granularity"), "{e}");

    let mut options = mini_options(&tmp.path().join("w"), 0.5);
    options.output.other_type = Some(Scheme::parse("q8_0").unwrap());
    let e = options.validate().unwrap_err().to_string();
    assert!(
        e.contains("--other-type") && e.contains("--format gguf"),
        "{e}"
    );
    options.set_format(OutputFormat::Gguf);
    options.validate().unwrap();
    options.output.other_type = Some(Scheme::parse("int8-g128-sym").unwrap());
    assert!(options.validate().is_err());

    let mut options = mini_options(&tmp.path().join("z"), 0.5);
    options.set_format(OutputFormat::Gguf);
    options
        .update_settings::<QuantiseSettings>(|s| {
            s.schemes = vec![Scheme::parse("int4-g64-sym").unwrap()]
        })
        .unwrap();
    let e = rfid_moe::compress(&options).unwrap_err().to_string();
    assert!(e.contains("int4-g64-sym"), "{e}");
    assert!(!tmp.path().join("z").exists());

    // Low-rank factors in a checkpoint written as safetensors cannot be converted.
    let lowrank = tmp.path().join("lowrank");
    let (fixture_tmp, dir) = fixture_with_tokenizer("tiny-qwen2_moe");
    let calibration =
        common::random_token_windows(&tmp.path().join("c.safetensors"), 256, 16, 32, 7);
    let options = common::small_compress_options(&dir, &calibration, &lowrank, 0.5);
    rfid_moe::compress(&options).unwrap();
    std::fs::copy(dir.join("tokenizer.json"), lowrank.join("tokenizer.json")).unwrap();
    let e = gguf::write(
        &Checkpoint::open(&lowrank).unwrap(),
        &tmp.path().join("l.gguf"),
        Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("low-rank") && e.contains("layer"), "{e}");
    assert!(!tmp.path().join("l.gguf").exists() && !tmp.path().join("l.gguf.tmp").exists());
    drop(fixture_tmp);
}

#[test]
fn configurations_and_tokenizers_llama_cpp_would_run_differently_are_refused() {
    let (tmp, dir) = fixture_with_tokenizer("tiny-qwen3_moe");
    common::edit_config(&dir, |c| c["norm_topk_prob"] = false.into());
    let e = gguf::write(
        &Checkpoint::open(&dir).unwrap(),
        &tmp.path().join("a.gguf"),
        Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("norm_topk_prob"), "{e}");

    let (tmp, dir) = fixture_with_tokenizer("tiny-qwen2_moe");
    let path = dir.join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tokenizer["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "▁"});
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let e = gguf::write(
        &Checkpoint::open(&dir).unwrap(),
        &tmp.path().join("b.gguf"),
        Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("Metaspace"),
        "{e}"
    );
    std::fs::remove_file(&path).unwrap();
    let e = gguf::write(
        &Checkpoint::open(&dir).unwrap(),
        &tmp.path().join("c.gguf"),
        Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
}

#[test]
fn a_gguf_from_another_converter_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("other.gguf");
    let metadata = vec![(
        "general.architecture".to_string(),
        MetaValue::Str("llama".into()),
    )];
    let tensors = vec![TensorEntry::new(
        "token_embd.weight",
        &[4, 8],
        TensorType::F32,
    )];
    let mut bytes = encode::header(&metadata, &tensors);
    bytes.extend(vec![0u8; 128]);
    std::fs::write(&path, bytes).unwrap();
    let e = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(
        e.contains("other.gguf") && e.contains("rfid_moe.config"),
        "{e}"
    );
}
