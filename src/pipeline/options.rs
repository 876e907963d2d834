//! The options of a compression run, and the schema of `compress.toml`: the input, the
//! calibration, the byte budget, the methods the solver may choose from (each with its own
//! settings table, `[settings.NAME]`, read by the method itself) and the output.
//!
//! Settings files carry `version`; `settings_file` tells the two schemas apart and `legacy` reads
//! files written before methods became plug-ins with their old meaning.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Device;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::checkpoint::experts::ExpertMatrix;
use crate::error::{Error, Result};
use crate::quant::{GgmlKind, Scheme};

/// The version of the settings-file schema this build writes.
pub const SETTINGS_VERSION: u32 = 2;

crate::named_enum! {
    /// What `--ratio` is a fraction of.
    pub enum BudgetUnit ("budget unit") {
        /// The routed experts' stored bytes.
        Bytes = "bytes": "--ratio is the fraction of the routed experts' stored bytes removed",
        /// The parameters of the budget's matrices.
        Parameters = "parameters":
            "--ratio is the fraction of the --matrices' parameters removed (the paper's ratio)",
    }
}

crate::named_enum! {
    /// Which layers share one budget.
    pub enum BudgetScope ("budget scope") {
        /// Every layer keeps its own share.
        Layer = "layer": "Every MoE layer keeps (1 − ratio) of its own routed experts",
        /// One budget over the model (a planning pass over every layer first).
        Model = "model":
            "One budget over all MoE layers: a planning pass first, then layers that matter \
             more keep more",
    }
}

crate::named_enum! {
    /// How finely the solver may mix per-expert choices.
    pub enum Granularity ("granularity") {
        /// Every expert's matrix chooses on its own.
        Expert = "expert": "Every expert's matrix takes its own candidate",
        /// Every (layer, matrix) takes one kind of candidate for all its experts.
        Matrix = "matrix": "All experts of a layer's matrix take the same kind of candidate",
        /// Every layer takes one kind of candidate for all its experts and matrices.
        Layer = "layer": "All experts and matrices of a layer take the same kind of candidate",
    }
}

crate::named_enum! {
    /// The file format `compress` writes.
    pub enum OutputFormat ("output format") {
        /// rfid-moe's checkpoint.
        Safetensors = "safetensors": "rfid-moe's safetensors checkpoint: every method (runs in rfid-moe, and in transformers with our modelling file)",
        /// One `.gguf` for llama.cpp.
        Gguf = "gguf": "One .gguf for llama.cpp, Ollama, LM Studio: removed experts and ggml block types, one type per layer and matrix",
        /// compressed-tensors `pack-quantized` for vLLM, SGLang and transformers.
        CompressedTensors = "compressed-tensors": "A Hugging Face checkpoint vLLM, SGLang and transformers load without remote code: removed experts and symmetric int4/int8 groups of 32/64/128, one scheme per layer",
    }
}

// `named_enum!` writes the enum and its derives, so the default is stated here.
#[allow(clippy::derivable_impls)]
impl Default for OutputFormat {
    fn default() -> Self {
        Self::Safetensors
    }
}

/// Methods a restricted format's output can hold (removal, block formats, the input's floats).
const BLOCK_FORMAT_METHODS: [&str; 3] = ["prune", "quantise", "keep"];

impl OutputFormat {
    /// Whether this is the default format (rfid-moe's checkpoint).
    pub fn is_default(&self) -> bool {
        *self == Self::Safetensors
    }

    /// Whether the output can hold what method `name` stores.
    pub fn holds_method(self, name: &str) -> bool {
        match self {
            Self::Safetensors => true,
            Self::Gguf | Self::CompressedTensors => BLOCK_FORMAT_METHODS.contains(&name),
        }
    }

    /// Whether the output can hold matrices stored as `scheme`.
    pub fn holds_scheme(self, scheme: Scheme) -> bool {
        match self {
            Self::Safetensors => true,
            Self::Gguf => matches!(scheme, Scheme::Ggml(_)),
            Self::CompressedTensors => crate::export::compressed_tensors::holds(scheme),
        }
    }

    /// The block formats the quantise method offers by default for this output (None: its own
    /// default list).
    pub fn default_schemes(self) -> Option<Vec<Scheme>> {
        match self {
            Self::Safetensors => None,
            Self::Gguf => Some(GgmlKind::ALL.into_iter().map(Scheme::Ggml).collect()),
            Self::CompressedTensors => Some(crate::export::compressed_tensors::schemes_it_holds()),
        }
    }

    /// Whether the output can keep some layers' experts in floats beside packed ones.
    /// compressed-tensors cannot: transformers' loader reads a compressed model's experts only
    /// in packed form, so a float layer among packed ones does not load there.
    pub fn mixes_float_and_packed(self) -> bool {
        !matches!(self, Self::CompressedTensors)
    }

    /// The finest granularity at which the output can mix choices (one tensor type per
    /// layer and matrix for GGUF).
    pub fn finest_granularity(self) -> Granularity {
        match self {
            Self::Safetensors => Granularity::Expert,
            Self::Gguf => Granularity::Matrix,
            // vLLM's fused MoE runs one scheme for gate, up and down of a layer's experts.
            Self::CompressedTensors => Granularity::Layer,
        }
    }
}

/// A layer's per-expert input Gram matrices (`experts × hidden² × 8` bytes) that
/// [`GroupSize::Auto`] still gives one group per expert: 1 GiB.
pub const PER_EXPERT_GRAM_LIMIT: u64 = 1 << 30;

/// Experts per group where per-expert groups would hold more than [`PER_EXPERT_GRAM_LIMIT`] of
/// Gram matrices (the paper's k).
pub const SHARED_GROUP_SIZE: usize = 4;

/// Experts per frequency-sorted group: `auto`, or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSize {
    /// One expert per group where every MoE layer's per-expert input Gram matrices fit in
    /// [`PER_EXPERT_GRAM_LIMIT`], else [`SHARED_GROUP_SIZE`]: per-expert whitening and bases
    /// measured better on held-out text (docs/RESULTS.md §11), and memory stays as bounded as
    /// with shared groups where they would not fit.
    Auto,
    /// This many experts per group.
    Experts(usize),
}

impl GroupSize {
    /// The number of experts per group for MoE layers of `(experts, hidden)` shapes.
    pub fn resolve(self, layers: impl IntoIterator<Item = (usize, usize)>) -> usize {
        match self {
            GroupSize::Experts(k) => k,
            GroupSize::Auto => {
                let gram_bytes = |(experts, hidden): (usize, usize)| {
                    (experts as u64)
                        .saturating_mul(hidden as u64)
                        .saturating_mul(hidden as u64)
                        .saturating_mul(8)
                };
                match layers.into_iter().map(gram_bytes).max().unwrap_or(0) {
                    bytes if bytes <= PER_EXPERT_GRAM_LIMIT => 1,
                    _ => SHARED_GROUP_SIZE,
                }
            }
        }
    }

    /// The number of experts per group of options resolved against their model.
    pub fn resolved(self) -> Result<usize> {
        match self {
            GroupSize::Experts(k) => Ok(k),
            GroupSize::Auto => invalid(
                "the group size `auto` is resolved against the model before calibration".into(),
            ),
        }
    }
}

impl std::fmt::Display for GroupSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupSize::Auto => f.write_str("auto"),
            GroupSize::Experts(k) => write!(f, "{k}"),
        }
    }
}

impl std::str::FromStr for GroupSize {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim() {
            "auto" => Ok(GroupSize::Auto),
            number => match number.parse::<usize>() {
                Ok(k) if k > 0 => Ok(GroupSize::Experts(k)),
                _ => invalid(format!(
                    "group size `{text}`: expected `auto` or a whole number of experts ≥ 1"
                )),
            },
        }
    }
}

impl Serialize for GroupSize {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match self {
            GroupSize::Auto => serializer.serialize_str("auto"),
            GroupSize::Experts(k) => serializer.serialize_u64(*k as u64),
        }
    }
}

impl<'de> Deserialize<'de> for GroupSize {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Written;
        impl serde::de::Visitor<'_> for Written {
            type Value = GroupSize;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`auto` or a whole number of experts ≥ 1")
            }

            fn visit_u64<E: serde::de::Error>(self, k: u64) -> std::result::Result<GroupSize, E> {
                usize::try_from(k)
                    .map(GroupSize::Experts)
                    .map_err(|_| E::custom(format!("group size {k} is too large")))
            }

            fn visit_i64<E: serde::de::Error>(self, k: i64) -> std::result::Result<GroupSize, E> {
                match u64::try_from(k) {
                    Ok(k) => self.visit_u64(k),
                    Err(_) => Err(E::custom(format!(
                        "group size {k}: expected `auto` or a whole number of experts ≥ 1"
                    ))),
                }
            }

            fn visit_str<E: serde::de::Error>(
                self,
                text: &str,
            ) -> std::result::Result<GroupSize, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Written)
    }
}

/// What the calibrate stage reads: the data, its windows and how experts are grouped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CalibrationOptions {
    /// Calibration data: text, JSON lines with `text`, or safetensors with `input_ids`.
    pub data: PathBuf,
    /// Calibration windows.
    pub samples: usize,
    /// Tokens per calibration window.
    pub seq_len: usize,
    /// Window selection seed (0 = the first `samples` consecutive windows).
    pub seed: u64,
    /// Windows per forward batch.
    pub batch_size: usize,
    /// Experts per frequency-sorted group (k); shared bases and statistics are per group.
    pub group_size: GroupSize,
    /// Collect per-group input Gram matrices even when no method needs them, to report
    /// activation errors (d×d doubles per group).
    pub activation_statistics: bool,
    /// Save calibration statistics here, or reuse them if the file holds statistics of the same
    /// model, windows and grouping (skips the forward passes; holds all layers in memory, with
    /// per-expert groups one Gram matrix per expert of every layer).
    /// Only for runs that remove no expert and collect nothing per expert.
    pub statistics_cache: Option<PathBuf>,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        Self {
            data: PathBuf::new(),
            samples: 128,
            seq_len: 512,
            seed: 0,
            batch_size: 8,
            group_size: GroupSize::Auto,
            activation_statistics: true,
            statistics_cache: None,
        }
    }
}

/// The matrices the budget covers by default: gate, up and down.
pub const DEFAULT_MATRICES: [ExpertMatrix; 3] =
    [ExpertMatrix::Gate, ExpertMatrix::Up, ExpertMatrix::Down];

/// The matrices the paper compresses: gate and up (`down_proj` stays as stored).
pub const PAPER_MATRICES: [ExpertMatrix; 2] = [ExpertMatrix::Gate, ExpertMatrix::Up];

/// The share of its own budget every layer keeps under a model-wide budget by default: the
/// value held-out text chose among 0, 0.5 and 0.75 (docs/RESULTS.md, "One budget over every
/// method").
pub const DEFAULT_LAYER_FLOOR: f64 = 0.75;

/// The budget: how much of what is removed, over which matrices and layers, and how finely the
/// solver may mix choices.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetOptions {
    /// Fraction ρ of the unit removed.
    pub ratio: f64,
    /// What `ratio` is a fraction of.
    pub unit: BudgetUnit,
    /// The routed-expert matrices the methods may change (`--matrices`); the others are
    /// written as stored.
    pub matrices: Vec<ExpertMatrix>,
    /// Which layers share one budget.
    pub scope: BudgetScope,
    /// How finely the solver may mix per-expert choices.
    pub granularity: Granularity,
    /// With a model-wide budget, the fraction of its own share each layer keeps at least.
    pub layer_floor: f64,
    /// Bits per routed-expert weight the output stores, scales included (`--bpw`), in place of
    /// `ratio` (which a run derives from it: [`BudgetOptions::resolve_bits`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_weight: Option<f64>,
}

impl Default for BudgetOptions {
    fn default() -> Self {
        Self {
            ratio: 0.4,
            unit: BudgetUnit::Bytes,
            matrices: DEFAULT_MATRICES.to_vec(),
            scope: BudgetScope::Model,
            granularity: Granularity::Expert,
            layer_floor: DEFAULT_LAYER_FLOOR,
            bits_per_weight: None,
        }
    }
}

impl BudgetOptions {
    /// The paper's budget: a fraction of gate's and up's parameters, per layer.
    pub fn paper() -> Self {
        Self {
            unit: BudgetUnit::Parameters,
            matrices: PAPER_MATRICES.to_vec(),
            scope: BudgetScope::Layer,
            ..Self::default()
        }
    }

    /// These options with `ratio` derived from `bits_per_weight` for an input that stores
    /// `input_bytes_per_parameter` bytes per routed-expert parameter (unchanged without it).
    pub fn resolve_bits(&self, input_bytes_per_parameter: f64) -> Result<Self> {
        let Some(bits) = self.bits_per_weight else {
            return Ok(self.clone());
        };
        if self.unit != BudgetUnit::Bytes {
            return invalid("--bpw sizes the stored bytes: it needs --budget bytes".into());
        }
        let input_bits = 8.0 * input_bytes_per_parameter;
        if !(bits > 0.0 && bits < input_bits) {
            return invalid(format!(
                "--bpw {bits} must be above 0 and below the input's {input_bits:.3} bits per weight"
            ));
        }
        Ok(Self {
            ratio: 1.0 - bits / input_bits,
            ..self.clone()
        })
    }

    /// Whether `matrix` is under the budget.
    pub fn covers(&self, matrix: ExpertMatrix) -> bool {
        self.matrices.contains(&matrix)
    }

    /// The covered matrices in gate, up, down order.
    pub fn targeted(&self) -> Vec<ExpertMatrix> {
        ExpertMatrix::ALL
            .into_iter()
            .filter(|&m| self.covers(m))
            .collect()
    }

    fn validate(&self) -> Result<()> {
        if self.matrices.is_empty() {
            return invalid("--matrices must name at least one of gate, up, down".into());
        }
        if self.targeted().len() != self.matrices.len() {
            return invalid(format!(
                "--matrices names a matrix twice: {:?}",
                self.matrices
            ));
        }
        if !(0.0..1.0).contains(&self.ratio) {
            return invalid(format!("--ratio {} must be in [0, 1)", self.ratio));
        }
        if !(0.0..=1.0).contains(&self.layer_floor) {
            return invalid(format!(
                "--layer-floor {} must be in [0, 1]",
                self.layer_floor
            ));
        }
        Ok(())
    }
}

/// What the emit stage reads: where the checkpoint goes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputOptions {
    /// Output directory (required unless `dry_run`).
    pub out: Option<PathBuf>,
    /// Also write the reconstructed dense weights here, in the original layout.
    pub export_dense: Option<PathBuf>,
    /// Replace an existing output directory.
    pub force: bool,
    /// Only plan: print the choices, sizes and estimated errors, write nothing.
    pub dry_run: bool,
    /// The file format of the output (left out of saved settings when it is the default, so
    /// they read as before).
    #[serde(skip_serializing_if = "OutputFormat::is_default")]
    pub format: OutputFormat,
    /// GGUF: the ggml type of the weight matrices outside the routed experts (None: as stored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_type: Option<crate::quant::Scheme>,
    /// Discard the finished layers an interrupted run of the same output left and start over
    /// (not saved: it does not change the output).
    #[serde(skip)]
    pub restart: bool,
}

/// A method's settings table (`[settings.NAME]` of `compress.toml`), read by the method.
pub trait MethodSettings: Serialize + DeserializeOwned + Default {
    /// The registry name of the method these settings belong to.
    const METHOD: &'static str;
}

/// The methods the default run lets the solver choose from.
pub const DEFAULT_METHODS: [&str; 5] = ["prune", "lowrank", "quantise", "int8", "keep"];

/// Every setting of a compression run. `Default` is the recommended method, and a key a
/// settings file leaves out means its default too.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressOptions {
    /// The settings-file schema ([`SETTINGS_VERSION`]).
    pub version: u32,
    /// Input checkpoint directory.
    pub model: PathBuf,
    /// Where calibration runs: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The methods (registry names) the solver may choose from for each expert.
    pub methods: Vec<String>,
    /// The calibration stage.
    pub calibration: CalibrationOptions,
    /// The budget.
    pub budget: BudgetOptions,
    /// Each method's settings, by method name; a method left out takes its defaults.
    pub settings: BTreeMap<String, serde_json::Value>,
    /// The emit stage.
    pub output: OutputOptions,
}

impl Default for CompressOptions {
    fn default() -> Self {
        Self {
            version: SETTINGS_VERSION,
            model: PathBuf::new(),
            device: "cpu".into(),
            methods: DEFAULT_METHODS.iter().map(|m| m.to_string()).collect(),
            calibration: CalibrationOptions::default(),
            budget: BudgetOptions::default(),
            settings: BTreeMap::new(),
            output: OutputOptions::default(),
        }
    }
}

fn invalid<T>(message: String) -> Result<T> {
    Err(Error::InvalidArgument(message))
}

impl CompressOptions {
    /// Whether method `name` is enabled.
    pub fn uses(&self, name: &str) -> bool {
        self.methods.iter().any(|m| m == name)
    }

    /// Writes `format`: the default methods become those the format can hold, and the budget's
    /// granularity no finer than the format mixes tensor types (what was set explicitly and
    /// does not fit is refused by [`Self::validate`]).
    pub fn set_format(&mut self, format: OutputFormat) {
        self.output.format = format;
        if self.methods == DEFAULT_METHODS {
            self.methods.retain(|m| format.holds_method(m));
        }
        if self.budget.granularity == Granularity::Expert {
            self.budget.granularity = format.finest_granularity();
        }
    }

    fn validate_format(&self) -> Result<()> {
        let format = self.output.format;
        if let Some(method) = self.methods.iter().find(|m| !format.holds_method(m)) {
            return invalid(format!(
                "--format {format} cannot hold what method `{method}` stores; methods for it: \
                 {}",
                self.methods
                    .iter()
                    .filter(|m| format.holds_method(m))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        match (self.output.other_type, format) {
            (None, _) | (Some(crate::quant::Scheme::Ggml(_)), OutputFormat::Gguf) => {}
            (Some(other), _) => {
                return invalid(format!(
                    "--other-type {other} needs --format gguf and one of ggml's block types \
                     (q8_0, q4_k, ...)"
                ))
            }
        }
        let finest = format.finest_granularity();
        let rank = |g: Granularity| Granularity::ALL.iter().position(|x| *x == g);
        if rank(self.budget.granularity) < rank(finest) {
            return invalid(format!(
                "--format {format} holds one tensor type per {}: --granularity {} is finer",
                match finest {
                    Granularity::Layer => "layer",
                    _ => "layer and matrix",
                },
                self.budget.granularity
            ));
        }
        Ok(())
    }

    /// The settings of method `T::METHOD`: its table, keys left out taking their defaults.
    pub fn settings_of<T: MethodSettings>(&self) -> Result<T> {
        match self.settings.get(T::METHOD) {
            None => Ok(T::default()),
            Some(table) => serde_json::from_value(table.clone())
                .map_err(|e| Error::InvalidArgument(format!("[settings.{}]: {e}", T::METHOD))),
        }
    }

    /// Replaces the settings table of method `T::METHOD`.
    pub fn set_settings<T: MethodSettings>(&mut self, settings: &T) -> Result<()> {
        let table = serde_json::to_value(settings)
            .map_err(|e| Error::InvalidArgument(format!("[settings.{}]: {e}", T::METHOD)))?;
        self.settings.insert(T::METHOD.to_string(), table);
        Ok(())
    }

    /// Changes the settings of method `T::METHOD` in place.
    pub fn update_settings<T: MethodSettings>(
        &mut self,
        change: impl FnOnce(&mut T),
    ) -> Result<()> {
        let mut settings = self.settings_of::<T>()?;
        change(&mut settings);
        self.set_settings(&settings)
    }

    /// Checks the groups every run reads (methods check their own settings when the registry
    /// builds them); the message names the offending option and its valid range.
    pub fn validate(&self) -> Result<()> {
        if self.version != SETTINGS_VERSION {
            return invalid(format!(
                "settings version {} is not this build's ({SETTINGS_VERSION}); settings files \
                 without `version` are read with their old meaning",
                self.version
            ));
        }
        if self.methods.is_empty() {
            return invalid("--methods must name at least one method".into());
        }
        self.validate_format()?;
        self.calibration.validate()?;
        self.budget.validate()?;
        let output = &self.output;
        if !output.dry_run && output.out.is_none() {
            return invalid("--out is required (or use --dry-run)".into());
        }
        use crate::safety::{check_run_paths, RunPath};
        check_run_paths(
            &[
                Some(RunPath::new("--model", &self.model)),
                // Empty in a plain conversion (`--ratio 0`), which reads no calibration data.
                RunPath::unless_empty("--calibration", &self.calibration.data),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
            &[
                RunPath::optional("--out", output.out.as_deref()),
                RunPath::optional("--export-dense", output.export_dense.as_deref()),
                RunPath::optional(
                    "statistics_cache",
                    self.calibration.statistics_cache.as_deref(),
                ),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        )
    }

    /// The settings as `compress.toml` text.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::InvalidArgument(format!("compress.toml: {e}")))
    }
}

impl CalibrationOptions {
    fn validate(&self) -> Result<()> {
        if self.samples == 0 || self.seq_len < 2 {
            return invalid("--samples must be ≥ 1 and --seq-len ≥ 2".into());
        }
        if self.batch_size == 0 {
            return invalid("--batch-size must be at least 1".into());
        }
        if self.group_size == GroupSize::Experts(0) {
            return invalid("--group-size must be at least 1 (or `auto`)".into());
        }
        if self.batch_size == 0 {
            return invalid("--batch-size must be at least 1".into());
        }
        Ok(())
    }
}

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| Error::InvalidArgument(format!("bad CUDA ordinal in `{s}`")))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return invalid(format!(
                    "device `{s}`: this build has no CUDA support (build with `--features cuda`)"
                ));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => invalid(format!(
            "unknown device `{other}` (expected cpu, cuda or cuda:N)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_group_size_is_one_expert_while_the_layers_grams_fit() {
        // tiny-moe-docs: 32 experts of hidden 256 (16 MiB of Grams).
        assert_eq!(GroupSize::Auto.resolve([(32, 256)]), 1);
        // Mixtral: 8 × 4096² doubles, exactly the limit.
        assert_eq!(GroupSize::Auto.resolve([(8, 4096)]), 1);
        // Qwen3-30B-A3B: 128 × 2048² doubles = 4 GiB; the largest layer decides.
        assert_eq!(
            GroupSize::Auto.resolve([(32, 256), (128, 2048)]),
            SHARED_GROUP_SIZE
        );
        assert_eq!(GroupSize::Auto.resolve([(256, 7168)]), SHARED_GROUP_SIZE);
        assert_eq!(GroupSize::Experts(3).resolve([(128, 2048)]), 3);
        assert!(GroupSize::Auto.resolved().is_err());
        assert_eq!(GroupSize::Experts(2).resolved().unwrap(), 2);
    }

    #[test]
    fn group_size_reads_and_writes_auto_or_a_number() {
        let options: CalibrationOptions = toml::from_str("group_size = \"auto\"").unwrap();
        assert_eq!(options.group_size, GroupSize::Auto);
        let options: CalibrationOptions = toml::from_str("group_size = 3").unwrap();
        assert_eq!(options.group_size, GroupSize::Experts(3));
        let written = toml::to_string(&options).unwrap();
        assert!(written.contains("group_size = 3\n"), "{written}");
        let json = serde_json::to_value(CalibrationOptions::default()).unwrap();
        assert_eq!(json["group_size"], "auto");
        let refused = toml::from_str::<CalibrationOptions>("group_size = \"four\"").unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("expected `auto` or a whole number"),
            "{refused}"
        );
        assert_eq!("auto".parse::<GroupSize>().unwrap(), GroupSize::Auto);
        assert_eq!(" 2 ".parse::<GroupSize>().unwrap(), GroupSize::Experts(2));
        assert!("0".parse::<GroupSize>().is_err());
        let zero: CalibrationOptions = toml::from_str("group_size = 0").unwrap();
        let message = zero.validate().unwrap_err().to_string();
        assert!(
            message.contains("--group-size must be at least 1"),
            "{message}"
        );
    }
}
