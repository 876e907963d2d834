//! The real-shape generator: FP8 encoding, DeepSeek-V3's tensor names, dtypes and shapes, and
//! the overrides' checks.

use rfid_moe::checkpoint::fp8::Fp8Format;
use rfid_moe_bench::synthetic::{
    e4m3_code, layer_shard, mtp_shard, random_fp8, Overrides, Shape, Stored,
};
use safetensors::Dtype;

#[test]
fn e4m3_code_inverts_the_decoding_table_and_rounds_to_nearest() {
    let table = Fp8Format::E4M3Fn.table();
    for code in 0u8..=0xFE {
        if code == 0x7F || code == 0x80 {
            continue; // NaN, and −0 (encoded as +0)
        }
        assert_eq!(e4m3_code(table[code as usize]), code, "code {code:#04x}");
    }
    assert_eq!(e4m3_code(1000.0), 0x7E, "saturates at +448");
    assert_eq!(e4m3_code(-1000.0), 0xFE, "saturates at −448");
    // 1.0 is 0x38 and the next code 1.125 is 0x39: 1.1 is nearer the latter, 1.05 the former.
    assert_eq!(e4m3_code(1.1), 0x39);
    assert_eq!(e4m3_code(1.05), 0x38);
}

#[test]
fn random_fp8_dequantises_to_the_requested_deviation() {
    let (codes, scale) = random_fp8(1 << 18, 7, 0.02);
    let table = Fp8Format::E4M3Fn.table();
    let n = codes.len() as f64;
    let values = codes
        .iter()
        .map(|&c| table[c as usize] as f64 * scale as f64);
    let (sum, squares) = values.fold((0.0, 0.0), |(s, q), v| (s + v, q + v * v));
    let std = (squares / n - (sum / n).powi(2)).sqrt();
    assert!((std - 0.02).abs() < 0.0005, "std {std}");
    assert!((sum / n).abs() < 0.0005, "mean {}", sum / n);
}

fn expect(
    shard: &std::collections::BTreeMap<String, Stored>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) {
    let t = shard.get(name).unwrap_or_else(|| panic!("missing {name}"));
    assert_eq!(t.dtype, dtype, "{name}");
    assert_eq!(t.shape, shape, "{name}");
    let width = match dtype {
        Dtype::F8_E4M3 => 1,
        Dtype::BF16 => 2,
        _ => 4,
    };
    assert_eq!(
        t.bytes.len(),
        shape.iter().product::<usize>() * width,
        "{name}"
    );
}

/// An FP8 linear weight [out, in] and its 128×128 block scales.
fn expect_fp8(
    shard: &std::collections::BTreeMap<String, Stored>,
    name: &str,
    out: usize,
    inputs: usize,
) {
    expect(shard, name, Dtype::F8_E4M3, &[out, inputs]);
    let scale = format!("{name}_scale_inv");
    expect(
        shard,
        &scale,
        Dtype::F32,
        &[out.div_ceil(128), inputs.div_ceil(128)],
    );
}

#[test]
fn deepseek_v3_layers_have_the_release_names_dtypes_and_shapes() {
    let mut s = Shape::named("deepseek-v3", 2).unwrap();
    let notes = Overrides {
        experts: Some(16),
        dense_layers: Some(1),
        mtp: true,
        ..Overrides::default()
    }
    .apply(&mut s)
    .unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert_eq!(s.config["n_routed_experts"], 16);
    assert_eq!(s.config["first_k_dense_replace"], 1);
    assert_eq!(s.config["num_nextn_predict_layers"], 1);
    assert_eq!(s.config["quantization_config"]["weight_block_size"][0], 128);
    assert_eq!(s.real_moe_layers(), 58);

    // The MTP layer (index 2 here, 61 in the release) is a MoE layer plus its own tensors.
    let shard = mtp_shard(&s, 2, 64);
    let a = "model.layers.2.self_attn";
    expect_fp8(&shard, &format!("{a}.q_a_proj.weight"), 1536, 7168);
    expect(
        &shard,
        &format!("{a}.q_a_layernorm.weight"),
        Dtype::BF16,
        &[1536],
    );
    expect_fp8(&shard, &format!("{a}.q_b_proj.weight"), 128 * 192, 1536);
    expect_fp8(&shard, &format!("{a}.kv_a_proj_with_mqa.weight"), 576, 7168);
    expect(
        &shard,
        &format!("{a}.kv_a_layernorm.weight"),
        Dtype::BF16,
        &[512],
    );
    expect_fp8(&shard, &format!("{a}.kv_b_proj.weight"), 128 * 256, 512);
    expect_fp8(&shard, &format!("{a}.o_proj.weight"), 7168, 128 * 128);
    let m = "model.layers.2.mlp";
    expect(
        &shard,
        &format!("{m}.gate.weight"),
        Dtype::BF16,
        &[16, 7168],
    );
    expect(
        &shard,
        &format!("{m}.gate.e_score_correction_bias"),
        Dtype::F32,
        &[16],
    );
    for e in ["experts.15", "shared_experts"] {
        expect_fp8(&shard, &format!("{m}.{e}.gate_proj.weight"), 2048, 7168);
        expect_fp8(&shard, &format!("{m}.{e}.up_proj.weight"), 2048, 7168);
        expect_fp8(&shard, &format!("{m}.{e}.down_proj.weight"), 7168, 2048);
    }
    let p = "model.layers.2";
    expect(
        &shard,
        &format!("{p}.eh_proj.weight"),
        Dtype::BF16,
        &[7168, 2 * 7168],
    );
    for norm in [
        "enorm",
        "hnorm",
        "shared_head.norm",
        "input_layernorm",
        "post_attention_layernorm",
    ] {
        expect(&shard, &format!("{p}.{norm}.weight"), Dtype::BF16, &[7168]);
    }
    expect(
        &shard,
        &format!("{p}.embed_tokens.weight"),
        Dtype::BF16,
        &[64, 7168],
    );
    expect(
        &shard,
        &format!("{p}.shared_head.head.weight"),
        Dtype::BF16,
        &[64, 7168],
    );
    // 2 layer norms; attention 5 weights with scales + 2 norms; shared experts 3 weights with
    // scales; router weight and bias; 16 experts × 3 weights with scales; MTP 6.
    let names: Vec<_> = shard.keys().collect();
    assert_eq!(
        shard.len(),
        2 + (5 * 2 + 2) + 3 * 2 + 2 + 16 * 3 * 2 + 6,
        "{names:?}"
    );
}

#[test]
fn deepseek_v3_dense_layer_has_the_dense_mlp() {
    let mut s = Shape::named("deepseek-v3", 1).unwrap();
    Overrides::default().apply(&mut s).unwrap();
    assert_eq!(
        s.config["num_nextn_predict_layers"], 0,
        "no MTP layer written"
    );
    // Only the names: a dense layer is 0.6 GB, so check a shrunk copy of the MLP width.
    s.dense_intermediate = 256;
    let shard = layer_shard(&s, 0, true);
    expect_fp8(&shard, "model.layers.0.mlp.gate_proj.weight", 256, 7168);
    expect_fp8(&shard, "model.layers.0.mlp.down_proj.weight", 7168, 256);
    assert!(!shard
        .keys()
        .any(|k| k.contains("experts") || k.contains(".gate.")));
}

#[test]
fn overrides_refuse_expert_counts_the_router_cannot_use() {
    // 8 experts in 8 groups leave 4 candidates for top-8; 12 is no multiple of 8.
    for experts in [4, 8, 12] {
        let mut s = Shape::named("deepseek-v3", 1).unwrap();
        let overrides = Overrides {
            experts: Some(experts),
            ..Overrides::default()
        };
        let message = overrides.apply(&mut s).unwrap_err().to_string();
        assert!(
            message.contains(&format!("--experts {experts}")),
            "{message}"
        );
    }
    let mut qwen = Shape::named("qwen3-30b-a3b", 1).unwrap();
    let mtp = Overrides {
        mtp: true,
        ..Overrides::default()
    };
    assert!(mtp.apply(&mut qwen).is_err(), "Qwen3 has no MTP layer");
    let mut qwen = Shape::named("qwen3-30b-a3b", 1).unwrap();
    let notes = Overrides {
        experts: Some(16),
        ..Overrides::default()
    }
    .apply(&mut qwen)
    .unwrap();
    assert_eq!(qwen.config["num_experts"], 16);
    assert_eq!(notes.len(), 1);
}

#[test]
fn a_narrower_expert_width_reaches_the_config_the_tensors_and_the_shared_experts() {
    let narrow = Overrides {
        expert_intermediate: Some(64),
        ..Overrides::default()
    };
    let mut qwen = Shape::named("qwen3-30b-a3b", 1).unwrap();
    let notes = narrow.apply(&mut qwen).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(qwen.config["moe_intermediate_size"], 64);
    assert_eq!(
        qwen.config["intermediate_size"], 6144,
        "the dense width stays"
    );
    let shard = layer_shard(&qwen, 0, true);
    let expert = "model.layers.0.mlp.experts.127";
    expect(
        &shard,
        &format!("{expert}.gate_proj.weight"),
        Dtype::BF16,
        &[64, 2048],
    );
    expect(
        &shard,
        &format!("{expert}.down_proj.weight"),
        Dtype::BF16,
        &[2048, 64],
    );
    // Mixtral's experts are `intermediate_size` wide; DeepSeek's two shared experts follow.
    let mut mixtral = Shape::named("mixtral-8x7b", 1).unwrap();
    narrow.apply(&mut mixtral).unwrap();
    assert_eq!(mixtral.config["intermediate_size"], 64);
    let mut lite = Shape::named("deepseek-v2-lite", 1).unwrap();
    narrow.apply(&mut lite).unwrap();
    assert_eq!(
        (lite.expert_intermediate, lite.shared_intermediate),
        (64, 128)
    );
}
