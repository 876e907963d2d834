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
use crate::checkpoint::writer::ShardEntry;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::format::LayerRecord;
use crate::safety::staging;

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
                hash: Some(format!("{:016x}", fnv1a(&bytes))),
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

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &b| {
        (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3)
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

/// The journal of one output's staging directory.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    ends: Option<CommittedShards>,
    layers: BTreeMap<usize, CommittedLayer>,
}

/// The file of the ends' entry (embedding, final norm, head, layers past `num_hidden_layers`).
const ENDS_FILE: &str = "ends.json";

/// The file of the model-wide rank plans (`--budget-scope model`).
const PLANS_FILE: &str = "plans.json";

/// The journal file of decoder layer `layer`.
fn layer_file(layer: usize) -> String {
    format!("layer-{layer:05}.json")
}

impl Journal {
    /// Opens the journal at `dir` for `manifest`. A journal with another manifest is refused with
    /// what differs ([`Error::ResumeMismatch`], naming `staging`); one without a readable
    /// manifest (the run died before writing it) is started afresh, as is a missing one.
    pub fn open(dir: &Path, staging: &Path, manifest: &Manifest) -> Result<Self> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let saved = std::fs::read(&manifest_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Manifest>(&bytes).ok());
        let mut journal = Self {
            dir: dir.to_path_buf(),
            ends: None,
            layers: BTreeMap::new(),
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
                journal.load()?;
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
    /// only ever committed after all earlier ones).
    fn load(&mut self) -> Result<()> {
        self.ends = self.read_entry(ENDS_FILE)?;
        if self.ends.is_none() {
            return Ok(());
        }
        for layer in 0.. {
            match self.read_entry::<CommittedLayer>(&layer_file(layer))? {
                Some(entry) if entry.layer == layer => {
                    self.layers.insert(layer, entry);
                }
                _ => break,
            }
        }
        Ok(())
    }

    fn read_entry<T: serde::de::DeserializeOwned>(&self, file: &str) -> Result<Option<T>> {
        let path = self.dir.join(file);
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Json {
                path,
                message: format!("unreadable resume journal entry ({e}); pass --restart"),
            })
    }

    fn write_entry<T: Serialize>(&self, file: &str, entry: &T) -> Result<()> {
        let path = self.dir.join(file);
        let text = serde_json::to_vec(entry).map_err(|e| Error::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        staging::write_durable(&path, &text)
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
        self.read_entry::<Vec<LayerPlan>>(PLANS_FILE)
    }

    /// Saves the model-wide plans, so that a resumed run needs no planning pass. Every number
    /// in them is finite (JSON has no other), and serde_json's round trip is exact.
    pub fn save_plans(&self, plans: &[LayerPlan]) -> Result<()> {
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
        self.write_entry(PLANS_FILE, &plans)
    }
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
