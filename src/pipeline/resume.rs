//! Resume of an interrupted `compress`: a journal inside the staging directory
//! (`.OUT.partial/.resume/`) records every finished layer (its shards, its `LayerRecord` and its
//! `LayerReport`), each entry written durably after the layer's shards, so an entry exists only
//! for a layer whose shards are complete. The manifest says which run the journal belongs to: the
//! input model's identity (names, sizes and modification times of its files, contents of its JSON
//! files), the resolved options and the calibration fingerprint. A later run with the same
//! manifest adopts the finished layers; any difference is refused by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::options::CompressOptions;
use super::plan::LayerPlan;
use super::report::LayerReport;
use crate::checkpoint::writer::{CheckpointWriter, ShardEntry};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::format::LayerRecord;
use crate::safety::{checksum, staging};

/// The journal's manifest file.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Version of the journal layout; a journal of another version is not resumed.
const JOURNAL_VERSION: u32 = 1;

/// JSON files of a model up to this size are identified by their contents, others by size and
/// modification time.
const HASHED_JSON_BYTES: u64 = 64 << 20;

/// One file of the input model as the journal identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// Size in bytes.
    pub bytes: u64,
    /// Modification time in nanoseconds since the epoch (None for hashed files).
    pub modified_ns: Option<u128>,
    /// FNV-1a hash of the contents (small JSON files only).
    pub hash: Option<String>,
}

/// The input model's identity: cheap to compute (no weight is read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// The model directory, canonicalised.
    pub dir: PathBuf,
    /// Its weight, JSON and tokenizer files by name.
    pub files: BTreeMap<String, FileStamp>,
}

/// What a journal belongs to; a run resumes a journal only when all of it is equal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Journal layout version.
    pub journal_version: u32,
    /// The version of rfid-moe that wrote it.
    pub tool_version: String,
    /// The input model.
    pub model: ModelIdentity,
    /// The resolved options (without `output.force`, which does not change the output).
    pub options: serde_json::Value,
    /// The calibration fingerprint (windows and their tokens).
    pub calibration_fingerprint: String,
}

impl Manifest {
    /// The manifest of a run of `options` over `checkpoint` with these calibration windows.
    pub fn new(
        options: &CompressOptions,
        checkpoint: &Checkpoint,
        calibration_fingerprint: &str,
    ) -> Result<Self> {
        let mut options = serde_json::to_value(options)
            .map_err(|e| Error::InvalidArgument(format!("options: {e}")))?;
        if let Some(output) = options.get_mut("output").and_then(|o| o.as_object_mut()) {
            output.remove("force");
        }
        Ok(Self {
            journal_version: JOURNAL_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            model: model_identity(checkpoint.dir())?,
            options,
            calibration_fingerprint: calibration_fingerprint.to_string(),
        })
    }

    /// What differs from `other` (the interrupted run's manifest), one phrase per difference.
    pub fn differences(&self, interrupted: &Manifest) -> Vec<String> {
        let mut out = Vec::new();
        if self.journal_version != interrupted.journal_version
            || self.tool_version != interrupted.tool_version
        {
            out.push(format!(
                "rfid-moe version ({} → {})",
                interrupted.tool_version, self.tool_version
            ));
        }
        out.extend(model_differences(&interrupted.model, &self.model));
        let (mut old, mut new) = (BTreeMap::new(), BTreeMap::new());
        flatten("", &interrupted.options, &mut old);
        flatten("", &self.options, &mut new);
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        for key in keys {
            let (a, b) = (old.get(key), new.get(key));
            if a != b {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "unset".into());
                out.push(format!("option `{key}` ({} → {})", show(a), show(b)));
            }
        }
        if self.calibration_fingerprint != interrupted.calibration_fingerprint {
            out.push(format!(
                "calibration data (fingerprint {} → {})",
                interrupted.calibration_fingerprint, self.calibration_fingerprint
            ));
        }
        out
    }
}

/// Flattens a JSON value into `dotted.key → compact value` pairs.
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                let key = match prefix {
                    "" => key.clone(),
                    _ => format!("{prefix}.{key}"),
                };
                flatten(&key, value, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn model_differences(old: &ModelIdentity, new: &ModelIdentity) -> Vec<String> {
    if old.dir != new.dir {
        return vec![format!(
            "model directory ({} → {})",
            old.dir.display(),
            new.dir.display()
        )];
    }
    let names: std::collections::BTreeSet<&String> =
        old.files.keys().chain(new.files.keys()).collect();
    let mut out = Vec::new();
    for name in names {
        let what = match (old.files.get(name), new.files.get(name)) {
            (Some(_), None) => "removed".to_string(),
            (None, Some(_)) => "added".to_string(),
            (Some(a), Some(b)) if a.bytes != b.bytes => {
                format!("size {} → {} bytes", a.bytes, b.bytes)
            }
            (Some(a), Some(b)) if a.hash != b.hash => "contents changed".to_string(),
            (Some(a), Some(b)) if a.modified_ns != b.modified_ns => {
                "modification time changed".to_string()
            }
            _ => continue,
        };
        out.push(format!("model file `{name}` ({what})"));
    }
    out
}

/// Whether a file of a model directory is part of its identity: weights, JSON (config, index,
/// tokenizer, generation config) and tokenizer files.
fn identifies_model(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".json")
        || crate::format::AUXILIARY_FILES.contains(&name)
}

/// The identity of the model in `dir`; reads only the (small) JSON files.
pub fn model_identity(dir: &Path) -> Result<ModelIdentity> {
    let canonical = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&canonical).map_err(|e| Error::io(&canonical, e))? {
        let entry = entry.map_err(|e| Error::io(&canonical, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        // Hugging Face cache snapshots hold symlinks into blobs/: follow them.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() || !identifies_model(&name) {
            continue;
        }
        let hashed = name.ends_with(".json") && meta.len() <= HASHED_JSON_BYTES;
        let stamp = if hashed {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            FileStamp {
                bytes: meta.len(),
                modified_ns: None,
                hash: Some(checksum::hex(checksum::fnv1a(&bytes))),
            }
        } else {
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos());
            FileStamp {
                bytes: meta.len(),
                modified_ns: modified,
                hash: None,
            }
        };
        files.insert(name, stamp);
    }
    Ok(ModelIdentity {
        dir: canonical,
        files,
    })
}

/// The shards one step wrote: into the compressed checkpoint and into the dense export.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommittedShards {
    /// The compressed checkpoint's shard.
    pub compressed: Option<ShardEntry>,
    /// The dense export's shard (`--export-dense`).
    pub dense: Option<ShardEntry>,
}

/// A finished decoder layer as the journal keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommittedLayer {
    /// Decoder layer index.
    pub layer: usize,
    /// Its shards.
    pub shards: CommittedShards,
    /// Its compression record (MoE layers).
    pub record: Option<LayerRecord>,
    /// Its report (MoE layers), timings as measured by the run that computed it.
    pub report: Option<LayerReport>,
}

/// The journal of one output's staging directory, or of one unit of a split run (which holds
/// layers from its first one on and no ends).
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// The first layer it records; the ends belong to a journal from layer 0 only.
    first_layer: usize,
    /// Whether it records the ends (embedding, final norm, head).
    with_ends: bool,
    ends: Option<CommittedShards>,
    layers: BTreeMap<usize, CommittedLayer>,
    /// What was found wrong with the interrupted run's work and is recomputed, one line each.
    notes: Vec<String>,
}

/// The file of the ends' entry (embedding, final norm, head, layers past `num_hidden_layers`).
const ENDS_FILE: &str = "ends.json";

/// The file of the model-wide rank plans (`--budget-scope model`).
const PLANS_FILE: &str = "plans.json";

/// The journal file of decoder layer `layer`.
fn layer_file(layer: usize) -> String {
    format!("layer-{layer:05}.json")
}

/// The decoder layer of a journal file name `layer-NNNNN.json`.
fn layer_of_file(name: &str) -> Option<usize> {
    name.strip_prefix("layer-")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// A journal entry as stored: its fields and a checksum over them, so that an entry that was
/// edited, torn or written by another layout is recognised instead of trusted.
#[derive(Serialize)]
struct SealedRef<'a, T> {
    #[serde(flatten)]
    entry: &'a T,
    entry_checksum: String,
}

/// [`SealedRef`] as read back.
#[derive(Deserialize)]
struct Sealed<T> {
    #[serde(flatten)]
    entry: T,
    entry_checksum: String,
}

/// The checksum of an entry: FNV-1a over its JSON serialisation.
fn entry_checksum<T: Serialize>(entry: &T) -> std::result::Result<String, serde_json::Error> {
    Ok(checksum::hex(checksum::fnv1a(&serde_json::to_vec(entry)?)))
}

/// The sealed entry in `path`: `None` when there is none, `Err` (why) when it cannot be read or
/// its checksum does not match its contents.
pub fn read_sealed<T>(path: &Path) -> Option<std::result::Result<T, String>>
where
    T: Serialize + serde::de::DeserializeOwned,
{
    let bytes = std::fs::read(path).ok()?;
    let file = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let sealed = match serde_json::from_slice::<Sealed<T>>(&bytes) {
        Ok(sealed) => sealed,
        Err(e) => return Some(Err(format!("its journal entry {file} is unreadable: {e}"))),
    };
    Some(match entry_checksum(&sealed.entry) {
        Ok(sum) if sum == sealed.entry_checksum => Ok(sealed.entry),
        Ok(sum) => Err(format!(
            "its journal entry {file} was changed after it was written (checksum {sum}, \
             expected {})",
            sealed.entry_checksum
        )),
        Err(e) => Err(format!("its journal entry {file} is unreadable: {e}")),
    })
}

/// Writes `entry` to `path` durably, sealed by a checksum of its contents.
pub fn write_sealed<T: Serialize>(path: &Path, entry: &T) -> Result<()> {
    let json_error = |e: serde_json::Error| Error::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let sealed = SealedRef {
        entry,
        entry_checksum: entry_checksum(entry).map_err(json_error)?,
    };
    let text = serde_json::to_vec(&sealed).map_err(json_error)?;
    staging::write_durable(path, &text)
}

/// The model-wide plans as the journal stores them.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedPlans {
    plans: Vec<LayerPlan>,
}

/// A finished step of the journal: the ends, or a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Ends,
    Layer(usize),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Ends => write!(f, "the embedding, final norm and head (ends)"),
            Step::Layer(layer) => write!(f, "finished layer {layer}"),
        }
    }
}

impl Journal {
    /// Opens the journal at `dir` for `manifest`. A journal with another manifest is refused with
    /// what differs ([`Error::ResumeMismatch`], naming `staging`); one without a readable
    /// manifest (the run died before writing it) is started afresh, as is a missing one. Entries
    /// that cannot be read or whose checksum fails are dropped with every later one (see
    /// [`Self::notes`]).
    pub fn open(dir: &Path, staging: &Path, manifest: &Manifest) -> Result<Self> {
        Self::open_from(dir, staging, manifest, None)
    }

    /// [`Self::open`] for one unit of a split run: the layers from `first_layer` on, no ends.
    pub fn open_unit(
        dir: &Path,
        staging: &Path,
        manifest: &Manifest,
        first_layer: usize,
    ) -> Result<Self> {
        Self::open_from(dir, staging, manifest, Some(first_layer))
    }

    fn open_from(
        dir: &Path,
        staging: &Path,
        manifest: &Manifest,
        unit_start: Option<usize>,
    ) -> Result<Self> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let saved = std::fs::read(&manifest_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Manifest>(&bytes).ok());
        let mut journal = Self {
            dir: dir.to_path_buf(),
            first_layer: unit_start.unwrap_or(0),
            with_ends: unit_start.is_none(),
            ends: None,
            layers: BTreeMap::new(),
            notes: Vec::new(),
        };
        match saved {
            Some(saved) => {
                let differences = manifest.differences(&saved);
                if !differences.is_empty() {
                    return Err(Error::ResumeMismatch {
                        staging: staging.to_path_buf(),
                        differences: differences.join(", "),
                    });
                }
                journal.load();
            }
            None => {
                staging::remove_path(dir);
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                let text = serde_json::to_string_pretty(manifest).map_err(|e| Error::Json {
                    path: manifest_path.clone(),
                    message: e.to_string(),
                })?;
                staging::write_durable(&manifest_path, text.as_bytes())?;
            }
        }
        Ok(journal)
    }

    /// Reads the entries: the ends and the layers `0..k` that form an unbroken run (a layer is
    /// only ever committed after all earlier ones). The first entry that cannot be trusted ends
    /// the run and is dropped with everything after it.
    fn load(&mut self) {
        if self.with_ends {
            match self.read_entry::<CommittedShards>(ENDS_FILE) {
                None => return self.drop_from(Step::Ends, None),
                Some(Ok(ends)) => self.ends = Some(ends),
                Some(Err(reason)) => return self.drop_from(Step::Ends, Some(reason)),
            }
        }
        if let Some(Err(reason)) = self.read_entry::<SavedPlans>(PLANS_FILE) {
            // Every finished layer was factored by that plan.
            staging::remove_path(&self.dir.join(PLANS_FILE));
            self.drop_from(Step::Layer(self.first_layer), None);
            return self.notes.push(format!(
                "resume: the interrupted run's model-wide rank plan cannot be trusted ({reason}); \
                 it is computed again and every layer recomputed"
            ));
        }
        for layer in self.first_layer.. {
            match self.read_entry::<CommittedLayer>(&layer_file(layer)) {
                Some(Ok(entry)) if entry.layer == layer => {
                    self.layers.insert(layer, entry);
                }
                Some(Ok(entry)) => {
                    let reason = format!("its entry describes layer {}", entry.layer);
                    return self.drop_from(Step::Layer(layer), Some(reason));
                }
                Some(Err(reason)) => return self.drop_from(Step::Layer(layer), Some(reason)),
                None => return self.drop_from(Step::Layer(layer), None),
            }
        }
    }

    /// Forgets `step` and every later step and removes their entries; `reason` (what was wrong)
    /// becomes a note, while a step that was simply never finished needs none.
    fn drop_from(&mut self, step: Step, reason: Option<String>) {
        let first_layer = match step {
            Step::Ends => {
                self.ends = None;
                staging::remove_path(&self.dir.join(ENDS_FILE));
                self.first_layer
            }
            Step::Layer(layer) => layer,
        };
        let mut dropped: std::collections::BTreeSet<usize> =
            self.layers.range(first_layer..).map(|(&l, _)| l).collect();
        self.layers.retain(|&layer, _| layer < first_layer);
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let stale = name.to_str().and_then(layer_of_file);
                if let Some(layer) = stale.filter(|&layer| layer >= first_layer) {
                    staging::remove_path(&entry.path());
                    dropped.insert(layer);
                }
            }
        }
        let Some(reason) = reason else {
            return;
        };
        if let Step::Layer(layer) = step {
            dropped.remove(&layer);
        }
        let also = match (dropped.first(), dropped.last()) {
            (Some(first), Some(last)) if first == last => format!(" with finished layer {first}"),
            (Some(first), Some(last)) => format!(" with finished layers {first}–{last}"),
            _ => String::new(),
        };
        self.notes.push(format!(
            "resume: {step} of the interrupted run cannot be trusted ({reason}); it is recomputed{also}"
        ));
    }

    /// The entry in `file`: `None` when there is none, `Err` (why) when it cannot be read or its
    /// checksum does not match its contents.
    fn read_entry<T>(&self, file: &str) -> Option<std::result::Result<T, String>>
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        read_sealed(&self.dir.join(file))
    }

    fn write_entry<T: Serialize>(&self, file: &str, entry: &T) -> Result<()> {
        write_sealed(&self.dir.join(file), entry)
    }

    /// Checks every finished step before anything of it is used: its entry names only tensors of
    /// its own step and every tensor it copies unchanged from `checkpoint`, and each of its shards
    /// is in the staging directory as written ([`CheckpointWriter::check_staged_shard`]). Adopts
    /// the shards of the steps that pass into the writers, in order; the first step that fails is
    /// dropped with every later one and recomputed, with a note saying which and why.
    pub fn adopt_verified(
        &mut self,
        checkpoint: &Checkpoint,
        mut compressed: Option<&mut CheckpointWriter>,
        mut dense: Option<&mut CheckpointWriter>,
    ) -> Result<()> {
        let num_layers = crate::models::ArchConfig::from_checkpoint(checkpoint)?
            .spec()
            .num_layers;
        let steps: Vec<(Step, CommittedShards)> = self
            .ends
            .iter()
            .map(|shards| (Step::Ends, shards.clone()))
            .chain(
                self.layers
                    .values()
                    .map(|l| (Step::Layer(l.layer), l.shards.clone())),
            )
            .collect();
        let count = |pick: fn(&CommittedShards) -> &Option<ShardEntry>| {
            steps.iter().filter(|(_, s)| pick(s).is_some()).count()
        };
        let counts = [count(|s| &s.compressed), count(|s| &s.dense)];
        let mut positions = [0, 0];
        let mut failure = None;
        'steps: for (step, shards) in &steps {
            let pairs = [
                (compressed.as_deref(), &shards.compressed),
                (dense.as_deref(), &shards.dense),
            ];
            for (which, (writer, entry)) in pairs.into_iter().enumerate() {
                let Some(entry) = entry else { continue };
                let checked = match writer {
                    Some(w) => step_tensor_problem(checkpoint, num_layers, *step, entry)
                        .map_or(Ok(()), Err)
                        .and_then(|()| {
                            w.check_staged_shard(entry, positions[which], counts[which])
                        }),
                    None => Err(format!("it names shard {} of no output", entry.file)),
                };
                if let Err(reason) = checked {
                    failure = Some((*step, reason));
                    break 'steps;
                }
                positions[which] += 1;
            }
        }
        if let Some((step, reason)) = failure {
            self.drop_from(step, Some(reason));
        }
        let kept = self
            .ends
            .iter()
            .chain(self.layers.values().map(|l| &l.shards));
        for shards in kept {
            if let (Some(w), Some(entry)) = (compressed.as_deref_mut(), &shards.compressed) {
                w.adopt_shard(entry);
            }
            if let (Some(w), Some(entry)) = (dense.as_deref_mut(), &shards.dense) {
                w.adopt_shard(entry);
            }
        }
        Ok(())
    }

    /// What was found wrong with the interrupted run's work (and is recomputed), one line each.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The ends' shards, when an earlier run finished them.
    pub fn ends(&self) -> Option<&CommittedShards> {
        self.ends.as_ref()
    }

    /// The finished layers, in order.
    pub fn layers(&self) -> impl Iterator<Item = &CommittedLayer> {
        self.layers.values()
    }

    /// Records the ends' shards as finished.
    pub fn commit_ends(&mut self, shards: CommittedShards) -> Result<()> {
        self.write_entry(ENDS_FILE, &shards)?;
        self.ends = Some(shards);
        Ok(())
    }

    /// Records a layer as finished (its shards are already durable).
    pub fn commit_layer(&mut self, entry: CommittedLayer) -> Result<()> {
        self.write_entry(&layer_file(entry.layer), &entry)?;
        self.layers.insert(entry.layer, entry);
        Ok(())
    }

    /// The model-wide plans an earlier run saved (`--budget-scope model`).
    pub fn plans(&self) -> Result<Option<Vec<LayerPlan>>> {
        read_plans(&self.dir.join(PLANS_FILE))
    }

    /// Saves the model-wide plans, so that a resumed run needs no planning pass.
    pub fn save_plans(&self, plans: &[LayerPlan]) -> Result<()> {
        write_plans(&self.dir.join(PLANS_FILE), plans)
    }
}

/// The model-wide plans saved in `path`, if any.
pub fn read_plans(path: &Path) -> Result<Option<Vec<LayerPlan>>> {
    match read_sealed::<SavedPlans>(path) {
        None => Ok(None),
        Some(Ok(saved)) => Ok(Some(saved.plans)),
        Some(Err(message)) => Err(Error::Json {
            path: path.to_path_buf(),
            message,
        }),
    }
}

/// Saves model-wide plans in `path`. Every number in them is finite (JSON has no other), and
/// serde_json's round trip is exact.
pub fn write_plans(path: &Path, plans: &[LayerPlan]) -> Result<()> {
    check_plans_finite(plans)?;
    let plans = plans.to_vec();
    write_sealed(path, &SavedPlans { plans })
}

/// Refuses plans holding a non-finite number (JSON has none, so they could not be saved).
pub fn check_plans_finite(plans: &[LayerPlan]) -> Result<()> {
    let finite = plans.iter().flat_map(|p| &p.chosen).all(|c| {
        c.error.is_finite()
            && c.signals.is_none_or(|s| {
                [s.effective_rank, s.frequency, s.density, s.score]
                    .iter()
                    .all(|v| v.is_finite())
            })
    });
    if !finite {
        return Err(Error::InvalidArgument(
            "a plan holds a non-finite number and cannot be saved for resuming".into(),
        ));
    }
    Ok(())
}

/// What is wrong with the tensor names a step's shard `entry` lists, if anything: each must belong
/// to the step (a decoder layer's own prefix; for the ends, no decoder layer below `num_layers`),
/// and every tensor the step copies unchanged from `checkpoint` must be there (all of the ends';
/// a layer's, except its routed experts, which the step rewrites).
fn step_tensor_problem(
    checkpoint: &Checkpoint,
    num_layers: usize,
    step: Step,
    entry: &ShardEntry,
) -> Option<String> {
    let layer_of = |name: &str| -> Option<usize> {
        name.strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    };
    let belongs = |name: &str| match step {
        Step::Ends => layer_of(name).is_none_or(|layer| layer >= num_layers),
        Step::Layer(layer) => layer_of(name) == Some(layer),
    };
    if let Some(stray) = entry.names.iter().find(|n| !belongs(n)) {
        return Some(format!(
            "its journal entry lists tensor `{stray}`, which is not part of it"
        ));
    }
    let copied = |name: &str| match step {
        Step::Ends => belongs(name),
        Step::Layer(_) => belongs(name) && !name.contains(".experts."),
    };
    let missing = checkpoint.tensor_names().into_iter().find(|name| {
        copied(name)
            && entry
                .names
                .binary_search_by(|n| n.as_str().cmp(name))
                .is_err()
    });
    missing.map(|name| {
        format!("its journal entry lacks tensor `{name}`, which is copied from the model unchanged")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let mut files = BTreeMap::new();
        files.insert(
            "config.json".to_string(),
            FileStamp {
                bytes: 10,
                modified_ns: None,
                hash: Some("01".into()),
            },
        );
        Manifest {
            journal_version: JOURNAL_VERSION,
            tool_version: "0.1.0".into(),
            model: ModelIdentity {
                dir: "/models/a".into(),
                files,
            },
            options: serde_json::json!({"allocation": {"ratio": 0.4}, "device": "cpu"}),
            calibration_fingerprint: "4x64:00".into(),
        }
    }

    #[test]
    fn equal_manifests_have_no_differences() {
        assert_eq!(manifest().differences(&manifest()), Vec::<String>::new());
    }

    #[test]
    fn differences_name_the_option_the_file_and_the_data() {
        let old = manifest();
        let mut new = manifest();
        new.options["allocation"]["ratio"] = serde_json::json!(0.5);
        new.model.files.get_mut("config.json").unwrap().hash = Some("02".into());
        new.calibration_fingerprint = "4x64:01".into();
        let found = new.differences(&old);
        assert_eq!(
            found,
            vec![
                "model file `config.json` (contents changed)".to_string(),
                "option `allocation.ratio` (0.4 → 0.5)".to_string(),
                "calibration data (fingerprint 4x64:00 → 4x64:01)".to_string(),
            ]
        );
    }

    #[test]
    fn saved_plans_round_trip_exactly() {
        use crate::checkpoint::experts::ExpertMatrix;
        use crate::pipeline::plan::{Candidate, GroupSignals, LayerTarget, Unit};
        let plan = LayerPlan {
            layer: 3,
            chosen: vec![Candidate {
                method: "lowrank".into(),
                unit: Unit::Group {
                    matrix: ExpertMatrix::Up,
                    group: 2,
                },
                variant: 5,
                label: "rank 5".into(),
                bytes: 1234,
                parameters: 999,
                error: 1.0 / 3.0,
                signals: Some(GroupSignals {
                    effective_rank: 2.5e-300,
                    frequency: 0.1,
                    density: -0.0,
                    score: 7.0 / 9.0,
                    reserved: 7,
                }),
            }],
            target: LayerTarget {
                before: 1e9 / 7.0,
                target: 0.1,
            },
            pruning: None,
        };
        let text = serde_json::to_string(&vec![plan.clone()]).unwrap();
        let back: Vec<LayerPlan> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, vec![plan]);
        let bits = |p: &LayerPlan| p.chosen[0].signals.map(|s| s.effective_rank.to_bits());
        assert_eq!(bits(&back[0]), Some(2.5e-300f64.to_bits()));
    }
}
