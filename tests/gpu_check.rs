//! `scripts/gpu-check.sh all --cpu --quick`: every step of the device check (build, pack,
//! unpack, the device checks, the decode and compress benchmarks, the CLI) on the CPU build with
//! tiny shapes, so that the one command a lent GPU runs is known to work before one is lent.
//!
//! The script builds the benchmarks itself (their package is outside the root's build), with the
//! same cargo and target directory as this test: the first run compiles candle-transformers,
//! later ones only this repository's crates.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The steps of a run, in order.
const STEPS: [&str; 9] = [
    "tests",
    "decode-anchor",
    "decode-original",
    "decode-pruned-lowrank",
    "decode-4bit",
    "decode-3bit",
    "decode-int8",
    "compress-bench",
    "cli",
];

/// Prefixes of the variables cargo sets for a test process.
const CARGO_TEST_PREFIXES: [&str; 3] = ["CARGO_PKG_", "CARGO_CRATE_", "CARGO_BIN_"];

/// The other variables cargo sets for a test process.
const CARGO_TEST_VARIABLES: [&str; 5] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "OUT_DIR",
];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The step named `name` of the run.
fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name} in {run:#}"))
}

/// A positive finite number at `value`.
fn positive(value: &Value, what: &str) -> f64 {
    let x = value.as_f64().unwrap_or_else(|| panic!("{what}: {value}"));
    assert!(x.is_finite() && x > 0.0, "{what}: {x}");
    x
}

/// Checks the decode rows: the anchor, our original, and the compressed checkpoints holding
/// fewer expert bytes than the original, every figure measured at batch 1 and 8.
fn check_decode(run: &Value) {
    let rows: Vec<&Value> = STEPS
        .iter()
        .filter(|s| s.starts_with("decode-"))
        .filter_map(|s| step(run, s)["figures"]["rows"].as_array())
        .flatten()
        .collect();
    let labels: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {}", r["runtime"], r["checkpoint"]).replace('"', ""))
        .collect();
    assert_eq!(
        labels,
        [
            "candle-transformers original",
            "rfid-moe original",
            "rfid-moe prune-rho-0.4",
            "rfid-moe q4_k",
            "rfid-moe q3_k",
            "rfid-moe int8"
        ],
    );
    let bytes: Vec<f64> = rows
        .iter()
        .map(|r| positive(&r["expert_bytes_per_layer"], "expert bytes"))
        .collect();
    assert_eq!(
        bytes[0], bytes[1],
        "both runtimes hold the original's experts"
    );
    assert!(bytes[2..].iter().all(|&b| b < bytes[1]), "{bytes:?}");
    // 4.5 and 3.4375 bits per weight of the original's 32 (f32 on the CPU).
    assert!(bytes[3] < bytes[5] && bytes[4] < bytes[3], "{bytes:?}");
    for row in &rows {
        let decode = row["decode_ms_per_layer"].as_array().unwrap();
        let batches: Vec<u64> = decode.iter().map(|d| d[0].as_u64().unwrap()).collect();
        assert_eq!(batches, [1, 8]);
        for d in decode {
            // Per layer is a difference of two medians, so noise may push it below zero on a
            // busy machine: finite is what the run guarantees.
            assert!(d[1].as_f64().is_some_and(f64::is_finite), "{row}");
        }
    }
}

#[test]
fn the_device_check_runs_every_step_on_the_cpu() {
    let root = repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let (pack, out) = (tmp.path().join("pack"), tmp.path().join("out"));
    // The script calls `cargo`: the one running this test.
    let cargo_dir = Path::new(env!("CARGO")).parent().unwrap().to_path_buf();
    let path = std::env::join_paths(
        std::iter::once(cargo_dir).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let mut command = Command::new(root.join("scripts/gpu-check.sh"));
    command
        .args(["all", "--cpu", "--quick", "--dir"])
        .args([&pack, &out])
        .env("PATH", path)
        .env("RFID_MOE_REPO_ROOT", &root);
    // What cargo sets for this test process must not reach the nested cargo: build scripts
    // (ring's) watch `CARGO_PKG_VERSION_*`, so they would rerun here and again in the next
    // `cargo test`.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if CARGO_TEST_PREFIXES.iter().any(|p| key.starts_with(p))
            || CARGO_TEST_VARIABLES.contains(&key.as_ref())
        {
            command.env_remove(key.as_ref());
        }
    }
    let started = std::time::Instant::now();
    let output = command.output().expect("running scripts/gpu-check.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail = |s: &str| {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    assert!(
        output.status.success(),
        "gpu-check failed ({}):\n{}\n--- stderr ---\n{}",
        output.status,
        tail(&stdout),
        tail(&stderr)
    );
    println!(
        "gpu-check --cpu --quick took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert!(stdout.contains("packed "), "the packed size is printed");
    for binary in ["rfid-moe", "test-device", "decode", "compress"] {
        assert!(pack.join(format!("bin/{binary}.xz")).is_file(), "{binary}");
    }
    assert!(pack.join("gpu-check.sh").is_file() && pack.join("manifest.json").is_file());

    let run: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("gpu-check.json")).unwrap())
            .unwrap();
    assert_eq!(
        (&run["mode"], &run["finished"]),
        (&"cpu".into(), &true.into())
    );
    let names: Vec<&str> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, STEPS);
    for name in STEPS {
        let s = step(&run, name);
        assert_eq!(s["status"], "ok", "{s:#}");
        assert!(out.join(s["log"].as_str().unwrap()).is_file(), "{name} log");
    }

    let tests = &step(&run, "tests")["figures"];
    assert!(tests["passed"].as_u64().unwrap() >= 4, "{tests:#}");
    assert_eq!(tests["failed"], 0);
    let checks = tests["checks"].as_array().unwrap();
    assert!(
        checks
            .iter()
            .filter(|c| c.as_str().unwrap().contains("vs transformers"))
            .count()
            == 6,
        "one parity line per family: {checks:#?}"
    );
    check_decode(&run);
    let compress = &step(&run, "compress-bench")["figures"];
    assert_eq!(compress["layers"].as_array().unwrap().len(), 1);
    positive(&compress["mean"]["total"], "compress seconds per layer");
    let cli = &step(&run, "cli")["figures"];
    let (original, compressed) = (
        positive(&cli["ppl_original"], "perplexity"),
        positive(&cli["ppl_compressed"], "perplexity"),
    );
    assert!(compressed < 2.0 * original, "{cli:#}");
    positive(&cli["decode_tokens_per_s"], "generate speed");

    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    for name in STEPS {
        assert!(summary.contains(name), "{name} missing from the summary");
    }
}
