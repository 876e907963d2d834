//! Peak memory of `compress` does not grow with the number of layers: layers are streamed.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use rfid_moe::checkpoint::writer::CheckpointWriter;

const HIDDEN: usize = 128;
const EXPERTS: usize = 16;
const EXPERT_INTERMEDIATE: usize = 512;
const VOCAB: usize = 256;

/// Bytes of one layer's routed experts in f32.
fn layer_expert_bytes() -> u64 {
    (EXPERTS * 3 * EXPERT_INTERMEDIATE * HIDDEN * 4) as u64
}

/// Writes a random Qwen3-MoE checkpoint with `layers` layers.
fn synthetic_model(dir: &Path, layers: usize) {
    let config = serde_json::json!({
        "model_type": "qwen3_moe", "hidden_size": HIDDEN, "intermediate_size": 256,
        "moe_intermediate_size": EXPERT_INTERMEDIATE, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "num_experts": EXPERTS, "num_experts_per_tok": 2, "norm_topk_prob": true,
        "vocab_size": VOCAB, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}
    });
    let randn = |shape: &[usize]| Tensor::randn(0f32, 0.05, shape, &Device::Cpu).unwrap();
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut writer = CheckpointWriter::create(dir, false).unwrap();
    writer
        .write_shard(HashMap::from([
            (
                "model.embed_tokens.weight".to_string(),
                randn(&[VOCAB, HIDDEN]),
            ),
            ("lm_head.weight".to_string(), randn(&[VOCAB, HIDDEN])),
            ("model.norm.weight".to_string(), ones(HIDDEN)),
        ]))
        .unwrap();
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let mut t = HashMap::new();
        t.insert(format!("{p}.input_layernorm.weight"), ones(HIDDEN));
        t.insert(format!("{p}.post_attention_layernorm.weight"), ones(HIDDEN));
        t.insert(
            format!("{p}.self_attn.q_proj.weight"),
            randn(&[128, HIDDEN]),
        );
        t.insert(format!("{p}.self_attn.k_proj.weight"), randn(&[64, HIDDEN]));
        t.insert(format!("{p}.self_attn.v_proj.weight"), randn(&[64, HIDDEN]));
        t.insert(
            format!("{p}.self_attn.o_proj.weight"),
            randn(&[HIDDEN, 128]),
        );
        t.insert(format!("{p}.self_attn.q_norm.weight"), ones(32));
        t.insert(format!("{p}.self_attn.k_norm.weight"), ones(32));
        t.insert(format!("{p}.mlp.gate.weight"), randn(&[EXPERTS, HIDDEN]));
        for j in 0..EXPERTS {
            t.insert(
                format!("{p}.mlp.experts.{j}.gate_proj.weight"),
                randn(&[EXPERT_INTERMEDIATE, HIDDEN]),
            );
            t.insert(
                format!("{p}.mlp.experts.{j}.up_proj.weight"),
                randn(&[EXPERT_INTERMEDIATE, HIDDEN]),
            );
            t.insert(
                format!("{p}.mlp.experts.{j}.down_proj.weight"),
                randn(&[HIDDEN, EXPERT_INTERMEDIATE]),
            );
        }
        writer.write_shard(t).unwrap();
    }
    writer
        .write_file("config.json", config.to_string().as_bytes())
        .unwrap();
    writer.finish().unwrap();
}

fn peak_resident_bytes(model: &Path, calibration: &Path, work: &Path) -> u64 {
    let report = work.join("report.json");
    let status = Command::new(env!("CARGO_BIN_EXE_rfid-moe"))
        .args([
            "compress",
            "--quiet",
            "--samples",
            "8",
            "--seq-len",
            "32",
            // f32 experts: 92% removed leaves 2.6 bits per weight, so the run removes experts
            // and quantises or factors the rest, the work whose memory is measured.
            "--ratio",
            "0.92",
        ])
        .arg("--model")
        .arg(model)
        .arg("--calibration")
        .arg(calibration)
        .arg("--out")
        .arg(work.join("out"))
        .arg("--json")
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    for layer in report["layers"].as_array().unwrap() {
        assert!(
            !layer["pruning"]["removed"].as_array().unwrap().is_empty(),
            "layer {} removed no expert",
            layer["layer"]
        );
        // Each matrix's choices, as "method detail" → count.
        let compressed = layer["plan"]["choices"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|choices| choices.as_object().unwrap().keys())
            .filter(|choice| choice.starts_with("quantise") || choice.starts_with("lowrank"))
            .count();
        assert!(
            compressed > 0,
            "layer {} quantised and factored nothing",
            layer["layer"]
        );
    }
    report["peak_resident_bytes"]
        .as_u64()
        .expect("peak_resident_bytes is reported on Linux")
}

#[test]
fn peak_memory_does_not_grow_with_layers() {
    if !Path::new("/proc/self/status").exists() {
        eprintln!("skipped: no /proc on this platform");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ids: Vec<i64> = (0..8 * 32).map(|i| (i * 37 % VOCAB) as i64).collect();
    let calibration = tmp.path().join("calibration.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([(
            "input_ids".to_string(),
            Tensor::from_vec(ids, (8, 32), &Device::Cpu).unwrap(),
        )]),
        &calibration,
    )
    .unwrap();
    let mut peaks = Vec::new();
    for layers in [2usize, 8] {
        let work = tmp.path().join(format!("l{layers}"));
        std::fs::create_dir_all(&work).unwrap();
        let model = work.join("model");
        synthetic_model(&model, layers);
        peaks.push(peak_resident_bytes(&model, &calibration, &work));
    }
    let growth = peaks[1] as i64 - peaks[0] as i64;
    println!(
        "peak anonymous RSS: 2 layers {} MB, 8 layers {} MB; one layer's experts {} MB",
        peaks[0] >> 20,
        peaks[1] >> 20,
        layer_expert_bytes() >> 20
    );
    // Holding all layers would add 6 layers' experts (~75 MB); streaming adds noise only.
    assert!(
        growth < layer_expert_bytes() as i64,
        "peak grew by {growth} bytes from 2 to 8 layers"
    );
}
