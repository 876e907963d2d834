//! The `rfid-moe` binary: `inspect` counts and the `logits` contract.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::process::Command;

use candle_core::Device;
use rfid_moe::checkpoint;

fn rfid_moe(args: &[&str]) -> std::process::Output {
    let output = Command::new(env!("CARGO_BIN_EXE_rfid-moe"))
        .args(args)
        .output()
        .unwrap();
    if !output.status.success() {
        panic!(
            "rfid-moe {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// Expected (routed, shared) parameter counts from the config alone.
fn expected_expert_params(config: &serde_json::Value, moe_layers: u64) -> (u64, u64) {
    let get = |k: &str| config.get(k).and_then(|v| v.as_u64());
    let d = get("hidden_size").unwrap();
    let model_type = config["model_type"].as_str().unwrap();
    let (n, p) = match model_type {
        "mixtral" => (
            get("num_local_experts").unwrap(),
            get("intermediate_size").unwrap(),
        ),
        "olmoe" => (
            get("num_experts").unwrap(),
            get("intermediate_size").unwrap(),
        ),
        "deepseek_v2" | "deepseek_v3" => (
            get("n_routed_experts").unwrap(),
            get("moe_intermediate_size").unwrap(),
        ),
        _ => (
            get("num_experts")
                .or_else(|| get("num_local_experts"))
                .unwrap(),
            get("moe_intermediate_size").unwrap(),
        ),
    };
    let shared = match model_type {
        "qwen2_moe" => 3 * get("shared_expert_intermediate_size").unwrap() * d + d,
        "deepseek_v2" | "deepseek_v3" => {
            3 * get("n_shared_experts").unwrap() * get("moe_intermediate_size").unwrap() * d
        }
        _ => 0,
    };
    (moe_layers * n * 3 * p * d, moe_layers * shared)
}

#[test]
fn inspect_counts_match_the_tensors_for_every_fixture() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(common::fixture("fixtures.json")).unwrap()).unwrap();
    for (family, facts) in manifest["families"].as_object().unwrap() {
        let dir = common::fixture(&format!("tiny-{family}"));
        let out = rfid_moe(&["inspect", dir.to_str().unwrap(), "--json"]);
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let moe_layers = summary["moe_layers"].as_array().unwrap().len() as u64;
        let dense_layers = summary["dense_layers"].as_array().unwrap().len() as u64;
        assert_eq!(
            moe_layers + dense_layers,
            config["num_hidden_layers"].as_u64().unwrap()
        );
        let expected_dense = config
            .get("first_k_dense_replace")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        assert_eq!(dense_layers, expected_dense, "{family}: dense layers");
        let (routed, shared) = expected_expert_params(&config, moe_layers);
        let params = &summary["parameters"];
        assert_eq!(
            params["total"].as_u64().unwrap(),
            facts["params"].as_u64().unwrap(),
            "{family}: total"
        );
        assert_eq!(
            params["routed_experts"].as_u64().unwrap(),
            routed,
            "{family}: routed"
        );
        assert_eq!(
            params["shared_experts"].as_u64().unwrap(),
            shared,
            "{family}: shared"
        );
        assert_eq!(
            params["other"].as_u64().unwrap() + routed + shared,
            params["total"].as_u64().unwrap(),
            "{family}: parts add up"
        );
        assert_eq!(
            summary["family"].as_str().unwrap(),
            config["model_type"].as_str().unwrap()
        );
        assert_eq!(summary["top_k"], config["num_experts_per_tok"]);
        let on_disk: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("model") && name.ends_with(".safetensors")
            })
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert_eq!(
            summary["bytes_on_disk"].as_u64().unwrap(),
            on_disk,
            "{family}: bytes"
        );
        assert_eq!(summary["dtype"], "F32");
    }
}

#[test]
fn inspect_prints_a_readable_table() {
    let out = rfid_moe(&[
        "inspect",
        common::fixture("tiny-deepseek_v3").to_str().unwrap(),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    println!("{text}");
    assert!(
        text.contains("deepseek_v3")
            && text.contains("routed experts")
            && text.contains("dense: [0]")
    );
}

#[test]
fn logits_command_reproduces_reference() {
    let dir = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("out.safetensors");
    rfid_moe(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        dir.join("reference.safetensors").to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    let got = checkpoint::load_all(&out_path, &Device::Cpu).unwrap();
    let reference = checkpoint::load_all(&dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    for name in [
        "logits",
        "router_logits.0",
        "router_logits.1",
        "router_logits.2",
    ] {
        assert!(
            common::max_abs_diff(&got[name], &reference[name]) <= 1e-4,
            "{name}"
        );
    }
}

#[test]
fn logits_command_rejects_tokens_file_without_input_ids() {
    let dir = common::fixture("tiny-mixtral");
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rfid-moe"))
        .args([
            "logits",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            dir.join("model.safetensors").to_str().unwrap(),
            "--out",
            tmp.path().join("o.safetensors").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("input_ids"), "{stderr}");
    assert!(!tmp.path().join("o.safetensors").exists());
}

#[test]
fn plot_writes_png_charts_from_sweep_reports_and_compressed_models() {
    let tmp = tempfile::tempdir().unwrap();
    let results = common::repo_root().join("docs/results");
    let out = tmp.path().join("charts");
    rfid_moe(&[
        "plot",
        "--sweep",
        results.join("ref-0204.json").to_str().unwrap(),
        "--sweep",
        results.join("ref-06.json").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let png = std::fs::read(out.join("perplexity_vs_ratio.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        png.len() > 10_000,
        "chart suspiciously small: {} bytes",
        png.len()
    );

    // Heatmaps need a compression report: make one quickly on a fixture.
    let fixture = common::fixture("tiny-qwen3_moe");
    let ids: Vec<i64> = (0..8 * 16).map(|i| (i * 31 % 256) as i64).collect();
    let calibration = tmp.path().join("calibration.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "input_ids".to_string(),
            candle_core::Tensor::from_vec(ids, (8, 16), &Device::Cpu).unwrap(),
        )]),
        &calibration,
    )
    .unwrap();
    let compressed = tmp.path().join("compressed");
    rfid_moe(&[
        "compress",
        "--quiet",
        "--preset",
        "paper",
        "--samples",
        "8",
        "--seq-len",
        "16",
        "--model",
        fixture.to_str().unwrap(),
        "--calibration",
        calibration.to_str().unwrap(),
        "--out",
        compressed.to_str().unwrap(),
    ]);
    rfid_moe(&[
        "plot",
        "--compressed",
        compressed.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    for name in ["routing_frequency.png", "allocated_rank_gate_proj.png"] {
        let png = std::fs::read(out.join(name)).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}");
    }
}

#[test]
fn compress_reads_a_config_file_and_flags_win() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("compress.toml");
    let model = common::mini_model();
    std::fs::write(
        &config,
        format!(
            "version = 2\nmodel = {:?}\nmethods = [\"lowrank\", \"keep\"]\n[calibration]\ndata = {:?}\ngroup_size = 2\nsamples = 4\nseq_len = 64\n[budget]\nratio = 0.3\nunit = \"parameters\"\nmatrices = [\"gate\", \"up\"]\nscope = \"layer\"\n[settings.lowrank]\nallocation = \"rfid\"\nwhiten = false\n",
            model.to_str().unwrap(),
            model.join("calibration.txt").to_str().unwrap()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let report = tmp.path().join("report.json");
    rfid_moe(&[
        "compress",
        "--quiet",
        "--config",
        config.to_str().unwrap(),
        "--ratio",
        "0.5",
        "--out",
        out.to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
    ]);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let options = &report["options"];
    assert_eq!(
        options["budget"]["ratio"], 0.5,
        "the flag wins over the file"
    );
    assert_eq!(
        options["calibration"]["group_size"], 2,
        "the file's value is kept"
    );
    assert_eq!(options["settings"]["lowrank"]["whiten"], false);
    // Keys the file leaves out are the defaults, stated in full in what is saved.
    assert_eq!(options["settings"]["lowrank"]["factor_dtype"], "int8");
    let groups = report["layers"][0]["matrices"]["gate_proj"]
        .as_array()
        .unwrap();
    assert_eq!(groups.len(), 8, "16 experts in groups of 2");
    // The resolved configuration is saved with the output and reads back as the same options.
    let saved = std::fs::read_to_string(out.join("compress.toml")).unwrap();
    let saved: toml::Value = toml::from_str(&saved).unwrap();
    assert_eq!(saved["budget"]["ratio"].as_float(), Some(0.5), "{saved}");
    assert_eq!(saved["version"].as_integer(), Some(2), "{saved}");
    assert_eq!(saved["calibration"]["group_size"].as_integer(), Some(2));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["compression"]["method"], "rfid-moe");
    assert!(out.join("tokenizer.json").exists());
}

#[test]
fn a_config_file_with_only_the_ratio_writes_what_the_flag_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::mini_model();
    let calibration = model.join("calibration.txt");
    let config = tmp.path().join("only-ratio.toml");
    std::fs::write(&config, "[budget]\nratio = 0.55\n").unwrap();
    let common_args = |out: &std::path::Path| -> Vec<String> {
        [
            "compress",
            "--quiet",
            "--model",
            model.to_str().unwrap(),
            "--calibration",
            calibration.to_str().unwrap(),
            "--samples",
            "8",
            "--seq-len",
            "64",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (from_file, from_flag) = (tmp.path().join("file"), tmp.path().join("flag"));
    let mut args = common_args(&from_file);
    args.extend(["--config".to_string(), config.to_str().unwrap().to_string()]);
    rfid_moe(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut args = common_args(&from_flag);
    args.extend(["--ratio".to_string(), "0.55".to_string()]);
    rfid_moe(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let shards = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut shards: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        shards.sort();
        shards
    };
    let (a, b) = (shards(&from_file), shards(&from_flag));
    assert!(!a.is_empty());
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            "{a:?}"
        );
    }
    // The saved settings differ only in where the output went.
    let settings = |dir: &std::path::Path| {
        let text = std::fs::read_to_string(dir.join("compress.toml")).unwrap();
        let mut value: toml::Value = toml::from_str(&text).unwrap();
        value["output"].as_table_mut().unwrap().remove("out");
        value
    };
    assert_eq!(settings(&from_file), settings(&from_flag));
}

#[test]
fn an_old_config_file_keeps_its_meaning_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("old.toml");
    let model = common::mini_model();
    std::fs::write(
        &config,
        format!(
            "model = {:?}\n[calibration]\ndata = {:?}\nsamples = 4\nseq_len = 64\n[allocation]\nratio = 0.3\n",
            model.to_str().unwrap(),
            model.join("calibration.txt").to_str().unwrap()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let output = rfid_moe(&[
        "compress",
        "--quiet",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("without `version`") && stderr.contains("--methods lowrank,keep"),
        "{stderr}"
    );
    // The paper's meaning: gate and up lose 30% of their parameters, down is untouched.
    let saved: toml::Value =
        toml::from_str(&std::fs::read_to_string(out.join("compress.toml")).unwrap()).unwrap();
    assert_eq!(saved["budget"]["unit"].as_str(), Some("parameters"));
    assert_eq!(
        saved["settings"]["lowrank"]["allocation"].as_str(),
        Some("rfid")
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("compression_report.json")).unwrap())
            .unwrap();
    let reduction = report["targeted_reduction"].as_f64().unwrap();
    assert!((reduction - 0.3).abs() < 0.01, "{reduction}");
}

#[test]
fn compress_xi_auto_dry_run_prints_each_layers_choice() {
    let model = common::mini_model();
    let calibration = model.join("calibration.txt");
    let out = Command::new(env!("CARGO_BIN_EXE_rfid-moe"))
        .args([
            "compress",
            "--quiet",
            "--dry-run",
            "--preset",
            "paper",
            "--xi",
            "auto",
        ])
        .args(["--samples", "8", "--seq-len", "64", "--model"])
        .arg(&model)
        .arg("--calibration")
        .arg(&calibration)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let choices = stdout
        .lines()
        .filter(|l| l.contains("chosen by held-out output error (0: "))
        .count();
    assert_eq!(choices, 4, "one line per MoE layer:\n{stdout}");
}

#[test]
fn compress_rejects_bad_options_with_clear_messages() {
    let model = common::mini_model();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rfid-moe"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let calibration = model.join("calibration.txt");
    let base = [
        "compress",
        "--model",
        model.to_str().unwrap(),
        "--calibration",
        calibration.to_str().unwrap(),
    ];
    let stderr = run(&[&base[..], &["--ratio", "1.5", "--dry-run"]].concat());
    assert!(stderr.contains("--ratio 1.5"), "{stderr}");
    let stderr = run(&[&base[..], &["--ratio", "0.4"]].concat());
    assert!(stderr.contains("--out is required"), "{stderr}");
    let stderr = run(&[&base[..], &["--xi", "often", "--dry-run"]].concat());
    assert!(stderr.contains("--xi `often`"), "{stderr}");
    // The default allocation is the solver's, which --xi auto does not tune: one message says
    // how to ask for what it does.
    let stderr = run(&[&base[..], &["--xi", "auto", "--dry-run"]].concat());
    assert!(
        stderr.contains("--allocation solver") && stderr.contains("--preset paper"),
        "{stderr}"
    );
    let model_scope = [
        "--preset",
        "paper",
        "--xi",
        "auto",
        "--budget-scope",
        "model",
        "--dry-run",
    ];
    let stderr = run(&[&base[..], &model_scope].concat());
    assert!(stderr.contains("--budget-scope layer"), "{stderr}");
    let holdout = [
        "--preset",
        "paper",
        "--xi",
        "auto",
        "--holdout-fraction",
        "1",
        "--dry-run",
    ];
    let stderr = run(&[&base[..], &holdout].concat());
    assert!(stderr.contains("--holdout-fraction 1"), "{stderr}");
    let rtn = [
        "--quant-algorithm",
        "rtn",
        "--quant-refine-passes",
        "2",
        "--dry-run",
    ];
    let stderr = run(&[&base[..], &rtn].concat());
    assert!(
        stderr.contains("--quant-algorithm rtn has none"),
        "{stderr}"
    );
    let stderr = run(&[&base[..], &["--group-size", "four", "--dry-run"]].concat());
    assert!(
        stderr.contains("expected `auto` or a whole number"),
        "{stderr}"
    );
    let stderr = run(&[
        "compress",
        "--model",
        model.to_str().unwrap(),
        "--calibration",
        "/nonexistent.txt",
        "--dry-run",
    ]);
    assert!(stderr.contains("/nonexistent.txt"), "{stderr}");
}

#[test]
fn ratio_zero_converts_without_calibration_and_other_ratios_ask_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::mini_model();
    let out = tmp.path().join("gguf");
    let model_arg = model.to_str().unwrap();
    rfid_moe(&[
        "compress",
        "--model",
        model_arg,
        "--format",
        "gguf",
        "--ratio",
        "0",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.join("model.gguf").is_file());
    let refused = Command::new(env!("CARGO_BIN_EXE_rfid-moe"))
        .args(["compress", "--model", model_arg, "--ratio", "0.5", "--out"])
        .arg(tmp.path().join("other"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("--calibration is required"), "{stderr}");
    assert!(!tmp.path().join("other").exists());
}
