//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The six fixture families (`tests/fixtures/tiny-*`), one per supported architecture.
pub const FAMILIES: [&str; 6] = [
    "tiny-mixtral",
    "tiny-qwen2_moe",
    "tiny-qwen3_moe",
    "tiny-olmoe",
    "tiny-deepseek_v2",
    "tiny-deepseek_v3",
];

/// Compression options for the fixtures' small calibration files: 16 windows of 32 tokens in
/// batches of 4, `ratio` of the parameters, writing `out`; everything else the paper's preset
/// (low-rank gate and up, whose properties most tests check; [`small_default_options`] for the
/// defaults).
pub fn small_compress_options(
    model: &Path,
    calibration: &Path,
    out: &Path,
    ratio: f64,
) -> rfid_moe::pipeline::CompressOptions {
    small_options(
        rfid_moe::pipeline::presets::paper(),
        (model, calibration, out),
        ratio,
    )
}

/// [`small_compress_options`] with every other setting the defaults (`ratio` of the bytes).
pub fn small_default_options(
    model: &Path,
    calibration: &Path,
    out: &Path,
    ratio: f64,
) -> rfid_moe::pipeline::CompressOptions {
    small_options(Default::default(), (model, calibration, out), ratio)
}

/// `base` with the small calibration, `ratio`, and the (model, calibration, output) paths.
fn small_options(
    base: rfid_moe::pipeline::CompressOptions,
    (model, calibration, out): (&Path, &Path, &Path),
    ratio: f64,
) -> rfid_moe::pipeline::CompressOptions {
    let mut options = rfid_moe::pipeline::CompressOptions {
        model: model.to_path_buf(),
        ..base
    };
    options.calibration.data = calibration.to_path_buf();
    options.calibration.samples = 16;
    options.calibration.seq_len = 32;
    options.calibration.batch_size = 4;
    options.budget.ratio = ratio;
    options.output.out = Some(out.to_path_buf());
    options
}

/// Changes the low-rank method's settings of `options`.
pub fn lowrank_settings(
    options: &mut rfid_moe::pipeline::CompressOptions,
    change: impl FnOnce(&mut rfid_moe::pipeline::methods::lowrank::LowRankSettings),
) {
    options.update_settings(change).unwrap();
}

/// Changes the prune method's settings of `options`.
pub fn prune_settings(
    options: &mut rfid_moe::pipeline::CompressOptions,
    change: impl FnOnce(&mut rfid_moe::pipeline::methods::prune::PruneSettings),
) {
    options.update_settings(change).unwrap();
}

/// The repository root: `RFID_MOE_REPO_ROOT` when set (test binaries carried to another
/// machine, e.g. a GPU machine), else the library package's directory, which the CLI package's
/// tests (in `cli/`) reach as their package's parent.
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("RFID_MOE_REPO_ROOT") {
        return PathBuf::from(root);
    }
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    match package.parent() {
        Some(parent) if !package.join("tests/fixtures").is_dir() => parent.to_path_buf(),
        _ => package.to_path_buf(),
    }
}

/// The device the device checks (`tests/device.rs`) run on, with its name:
/// `RFID_MOE_TEST_DEVICE` (`cpu`, `cuda` or `cuda:N`), the CPU when unset. A device that cannot
/// be opened (a build without `cuda`, no GPU) fails the calling test with the reason, so a check
/// asked to run on a GPU never passes on another device.
pub fn test_device() -> (String, candle_core::Device) {
    let name = std::env::var("RFID_MOE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let device = rfid_moe::pipeline::options::parse_device(&name)
        .unwrap_or_else(|e| panic!("RFID_MOE_TEST_DEVICE={name}: {e}"));
    (name, device)
}

/// A fixture directory under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// The bundled mini model.
pub fn mini_model() -> PathBuf {
    repo_root().join("models/mini-moe-docs")
}

/// Copies a fixture into a fresh temporary directory (writable) and returns both.
pub fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        std::fs::copy(entry.path(), &to).unwrap();
        let mut perms = std::fs::metadata(&to).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&to, perms).unwrap();
    }
    (tmp, dst)
}

/// Splits a safetensors file into (header JSON, data bytes).
pub fn read_safetensors_raw(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Writes a safetensors file from a header JSON and data bytes (no validation: for malformed files).
pub fn write_safetensors_raw(path: &Path, header: &serde_json::Value, data: &[u8]) {
    let header = serde_json::to_vec(header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// The f32 CPU logits of the checkpoint in `dir` on `input_ids`.
#[allow(dead_code)]
pub fn logits_of(dir: &Path, input_ids: &candle_core::Tensor) -> candle_core::Tensor {
    let checkpoint = rfid_moe::checkpoint::Checkpoint::open(dir).unwrap();
    rfid_moe::models::Model::load(
        &checkpoint,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .forward(input_ids, None)
    .unwrap()
    .logits
}

/// The compressed checkpoint `out` holds exactly the report's saved parameters fewer than
/// `source`, all of them in the routed experts.
pub fn assert_routed_parameters_saved(source: &Path, out: &Path, saved: u64, what: &str) {
    let open = |dir: &Path| rfid_moe::checkpoint::Checkpoint::open(dir).unwrap();
    let before = rfid_moe::inspect::parameter_counts(&open(source));
    let after = rfid_moe::inspect::parameter_counts(&open(out));
    assert_eq!(before.other, after.other, "{what}");
    assert_eq!(before.shared_experts, after.shared_experts, "{what}");
    assert_eq!(
        before.routed_experts - after.routed_experts,
        saved,
        "{what}: saved parameters"
    );
}

/// Mean absolute difference of two tensors of the same shape.
pub fn mean_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute elementwise difference of two same-shaped f32 tensors.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Every file under `root` (recursively) with a hash of its bytes, to show that nothing changed.
pub fn snapshot(root: &Path) -> std::collections::BTreeMap<PathBuf, u64> {
    use std::hash::{Hash, Hasher};
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        } else if meta.is_file() {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(&path).unwrap().hash(&mut hasher);
            out.insert(path, hasher.finish());
        }
    }
    out
}

/// Rewrites `dir/config.json` through `edit`.
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

/// `dir/config.json` as JSON.
pub fn read_config(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

/// A writable copy of the bundled model (with its calibration text) in a temporary directory,
/// and an output path beside it.
pub struct ModelCopy {
    _tmp: tempfile::TempDir,
    /// The temporary directory.
    pub root: PathBuf,
    /// The copied model.
    pub model: PathBuf,
    /// `root/out`, not created.
    pub out: PathBuf,
}

impl ModelCopy {
    /// Copies the bundled model.
    pub fn bundled() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let model = root.join("mini");
        copy_dir(&mini_model(), &model);
        Self {
            out: root.join("out"),
            model,
            root,
            _tmp: tmp,
        }
    }
}

/// Copies the files of directory `from` (not recursively) into a new directory `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The safetensors file of checkpoint `dir` holding a tensor whose name satisfies `pick`.
pub fn shard_holding(dir: &Path, pick: impl Fn(&str) -> bool) -> String {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    files
        .into_iter()
        .find(|file| {
            let (header, _) = read_safetensors_raw(&dir.join(file));
            header.as_object().unwrap().keys().any(|name| pick(name))
        })
        .expect("a shard holding the tensor")
}

/// Writes a safetensors file holding one tensor `input_ids`.
pub fn write_input_ids(path: &Path, ids: candle_core::Tensor) {
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("input_ids".to_string(), ids)]),
        path,
    )
    .unwrap();
}

/// Names of the entries of `dir` that start with a dot (staging and backup leftovers).
pub fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// Staging or backup entries (`.NAME.*`) left next to the output `out`.
pub fn staging_leftovers(out: &Path) -> Vec<String> {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else {
        return Vec::new();
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    match std::fs::read_dir(parent) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A progress observer that records what a library call reports: per task, its total, the steps
/// advanced and whether it finished, in the order the tasks started.
#[derive(Default)]
pub struct ProgressRecorder(std::sync::Mutex<Vec<(String, u64, u64, bool)>>);

impl rfid_moe::progress::Progress for ProgressRecorder {
    fn start(&self, task: &str, total: u64) {
        self.0
            .lock()
            .unwrap()
            .push((task.to_string(), total, 0, false));
    }
    fn advance(&self, task: &str, by: u64) {
        let mut tasks = self.0.lock().unwrap();
        let entry = tasks.iter_mut().rev().find(|t| t.0 == task).unwrap();
        assert!(!entry.3, "{task} advanced after it finished");
        entry.2 += by;
    }
    fn message(&self, _task: &str, _text: &str) {}
    fn finish(&self, task: &str) {
        let mut tasks = self.0.lock().unwrap();
        tasks.iter_mut().rev().find(|t| t.0 == task).unwrap().3 = true;
    }
}

impl ProgressRecorder {
    /// The tasks reported so far, each checked to have finished after all its steps.
    pub fn completed_tasks(&self) -> Vec<(String, u64)> {
        let tasks = std::mem::take(&mut *self.0.lock().unwrap());
        for (task, total, advanced, finished) in &tasks {
            assert!(*finished, "{task} never finished");
            assert_eq!(
                advanced, total,
                "{task} advanced {advanced} of {total} steps"
            );
        }
        tasks.into_iter().map(|t| (t.0, t.1)).collect()
    }
}

/// Deterministic pseudo-random token windows (an LCG from `seed`, ids below `vocab`) written to
/// `path` as `input_ids` (i64 [windows, seq]); returns `path`.
pub fn random_token_windows(
    path: &Path,
    vocab: u32,
    windows: usize,
    seq: usize,
    seed: u64,
) -> PathBuf {
    let mut state = seed;
    let ids: Vec<i64> = (0..windows * seq)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as i64
        })
        .collect();
    write_input_ids(
        path,
        candle_core::Tensor::from_vec(ids, (windows, seq), &candle_core::Device::Cpu)
            .expect("token ids tensor"),
    );
    path.to_path_buf()
}

/// The routed experts' share of stored bytes the output at `out` keeps, measured on its files.
pub fn kept_share(source: &Path, out: &Path) -> f64 {
    let before = rfid_moe::sweep::tensor_bytes(source)
        .unwrap()
        .routed_experts;
    let after = rfid_moe::sweep::tensor_bytes(out).unwrap().routed_experts;
    after as f64 / before as f64
}

/// Four windows of 128 tokens of mini-moe-docs' test text as `input_ids` [4, 128].
pub fn mini_ids() -> candle_core::Tensor {
    let model = mini_model();
    let tokenizer = rfid_moe::text::load_tokenizer(&model).unwrap();
    let documents = rfid_moe::text::read_documents(&model.join("test.txt")).unwrap();
    let config = rfid_moe::checkpoint::read_json(&model.join("config.json")).unwrap();
    let eos = rfid_moe::text::end_of_text_id(&tokenizer, &config).unwrap();
    let stream = rfid_moe::text::tokenize_documents(&tokenizer, &documents, eos).unwrap();
    let ids: Vec<i64> = stream[..4 * 128].iter().map(|&t| t as i64).collect();
    candle_core::Tensor::from_vec(ids, (4, 128), &candle_core::Device::Cpu).unwrap()
}

/// An installation a test needs from outside the repository (a pinned Python environment, a
/// llama.cpp build), made by a script on first use.
pub struct ExternalTool {
    /// Set to `1`, the test is skipped, loudly.
    pub skip_var: &'static str,
    /// Names an existing installation to use instead of the script's.
    pub path_var: &'static str,
    /// The script (relative to the repository) that installs it and prints its path last.
    pub script: &'static str,
    /// What a skip leaves unchecked, for the warning.
    pub unchecked: &'static str,
    /// Whether a path the script printed is a usable installation.
    pub usable: fn(&Path) -> bool,
    /// Whether an installation that fails (no network, no wheel for this platform) skips the
    /// test loudly instead of failing it.
    pub skip_if_uninstallable: bool,
}

/// The installation's path, or None when the user opted out (`test` names the test skipped);
/// fails the test when it cannot be installed, unless the tool skips then (loudly).
pub fn external_tool(tool: &ExternalTool, test: &str) -> Option<PathBuf> {
    if std::env::var(tool.skip_var).is_ok_and(|v| v == "1") {
        // Written to the process's stderr directly: the harness hides `eprintln!` of passing tests.
        let warning = format!(
            "\n!!! {}=1: SKIPPING `{test}`; {} was NOT checked !!!\n",
            tool.skip_var, tool.unchecked
        );
        std::io::Write::write_all(&mut std::io::stderr(), warning.as_bytes()).unwrap();
        return None;
    }
    if let Some(path) = std::env::var_os(tool.path_var) {
        return Some(PathBuf::from(path));
    }
    let script = repo_root().join(tool.script);
    let output = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = PathBuf::from(stdout.lines().last().map(str::trim).unwrap_or_default());
    let installed = output.status.success() && (tool.usable)(&path);
    if !installed && tool.skip_if_uninstallable {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr.lines().rev().take(8).collect::<Vec<_>>().join("\n");
        let warning = format!(
            "\n!!! {} could not install ({}): SKIPPING `{test}`; {} was NOT checked !!!\n{tail}\n",
            script.display(),
            output.status,
            tool.unchecked
        );
        std::io::Write::write_all(&mut std::io::stderr(), warning.as_bytes()).unwrap();
        return None;
    }
    assert!(
        output.status.success() && (tool.usable)(&path),
        "could not install with {} ({}):\n{}\nSet {}=PATH to use another installation, or {}=1 \
         to skip this test.",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr),
        tool.path_var,
        tool.skip_var
    );
    Some(path)
}

/// Runs the Python test driver `driver` (relative to the repository) on the job file
/// `job_path` with the Hub offline, failing with its stderr if it fails; returns its output.
pub fn run_python_driver(python: &Path, driver: &str, job_path: &Path) -> std::process::Output {
    let driver = repo_root().join(driver);
    let work = job_path.parent().unwrap_or(Path::new("."));
    let output = std::process::Command::new(python)
        .arg(&driver)
        .arg(job_path)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_MODULES_CACHE", work.join("hf-modules"))
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} failed:\n{}",
        driver.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The MoE layers of `checkpoint` with their expert layouts.
pub fn layouts(
    checkpoint: &rfid_moe::checkpoint::Checkpoint,
) -> Vec<(usize, rfid_moe::checkpoint::experts::ExpertLayout)> {
    let spec = rfid_moe::models::ArchConfig::from_checkpoint(checkpoint)
        .unwrap()
        .spec();
    spec.moe_layers
        .into_iter()
        .enumerate()
        .filter_map(|(i, l)| l.map(|l| (i, l)))
        .collect()
}

/// Writes `tensors` with `checkpoint`'s config as a one-shard checkpoint at `out`.
pub fn write_checkpoint(
    checkpoint: &rfid_moe::checkpoint::Checkpoint,
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
    out: &Path,
) -> PathBuf {
    let mut writer = rfid_moe::checkpoint::writer::CheckpointWriter::create(out, false).unwrap();
    writer.write_shard(tensors).unwrap();
    let config = serde_json::to_string(checkpoint.config()).unwrap();
    writer.write_file("config.json", config.as_bytes()).unwrap();
    writer.finish().unwrap();
    out.to_path_buf()
}

/// Writes a copy of `source` whose experts are fused 3-D tensors; `break_down` gives layer 0's
/// `down_proj` one expert too few.
pub fn fused_copy(source: &Path, out: &Path, break_down: bool) -> PathBuf {
    let checkpoint = rfid_moe::checkpoint::Checkpoint::open(source).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for name in checkpoint.tensor_names() {
        if !name.contains(".experts.") {
            let t = checkpoint
                .load(
                    name,
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                    "test",
                )
                .unwrap();
            tensors.insert(name.to_string(), t);
        }
    }
    for (layer, layout) in layouts(&checkpoint) {
        let load = |m| {
            layout
                .load_matrix(
                    &checkpoint,
                    m,
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap()
        };
        let (gate, up, mut down) = (
            load(rfid_moe::checkpoint::experts::ExpertMatrix::Gate),
            load(rfid_moe::checkpoint::experts::ExpertMatrix::Up),
            load(rfid_moe::checkpoint::experts::ExpertMatrix::Down),
        );
        let gate_up: Vec<candle_core::Tensor> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| candle_core::Tensor::cat(&[g, u], 0).unwrap())
            .collect();
        if break_down && layer == layouts(&checkpoint)[0].0 {
            down.pop();
        }
        tensors.insert(
            layout.fused_name(rfid_moe::checkpoint::experts::ExpertMatrix::Gate),
            candle_core::Tensor::stack(&gate_up, 0).unwrap(),
        );
        tensors.insert(
            layout.fused_name(rfid_moe::checkpoint::experts::ExpertMatrix::Down),
            candle_core::Tensor::stack(&down, 0).unwrap(),
        );
    }
    write_checkpoint(&checkpoint, tensors, out)
}

/// Every file under `dir` (relative path → bytes).
pub fn file_tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path.strip_prefix(dir).unwrap().to_path_buf(), bytes);
            }
        }
    }
    files
}

/// Every file of `out` equals `reference`'s byte for byte, and there are no others.
pub fn assert_same_files(reference: &Path, out: &Path) {
    let (expected, found) = (file_tree(reference), file_tree(out));
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        found.keys().collect::<Vec<_>>(),
        "{} holds other files than {}",
        out.display(),
        reference.display()
    );
    for (name, bytes) in &expected {
        assert!(
            found[name] == *bytes,
            "{} differs from {}'s",
            name.display(),
            reference.display()
        );
    }
}

/// Asserts that every MoE layer of the output at `out` removed a quarter of its experts (its
/// compression report says; `what` names the case); returns the report.
pub fn assert_a_quarter_of_experts_removed(out: &Path, what: &str) -> serde_json::Value {
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("compression_report.json")).unwrap())
            .unwrap();
    for layer in report["layers"].as_array().unwrap() {
        let pruning = &layer["pruning"];
        let kept = pruning["kept"].as_array().unwrap().len();
        let original = pruning["original_experts"].as_u64().unwrap() as usize;
        assert_eq!(
            kept * 4,
            original * 3,
            "{what}: a quarter of the experts removed"
        );
    }
    report
}
