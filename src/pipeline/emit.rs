//! The emit stage: an [`AssembledLayer`] becomes one shard of the compressed checkpoint (and,
//! with `--export-dense`, one shard of the reconstructed dense checkpoint); layers that are not
//! compressed are copied through; the run ends with `config.json` (with its compression record),
//! the report and the resolved options, written atomically. Every finished step (the ends, each
//! layer) is recorded in the resume journal ([`super::resume`]) after its shards are durable, and
//! a later run adopts the steps an interrupted one finished.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use candle_core::Tensor;

use super::assemble::AssembledLayer;
use super::experts::LayerExperts;
use super::options::OutputFormat;
use super::options::OutputOptions;
use super::plan::LayerPlan;
use super::report::LayerReport;
use super::resume::{CommittedLayer, CommittedShards, Journal, Manifest};
use crate::checkpoint::writer::{CheckpointWriter, StagingMode};
use crate::checkpoint::{Checkpoint, CONFIG_FILE};
use crate::error::{Error, Result};
use crate::format::{self, LayerRecord};

use crate::format::AUXILIARY_FILES;

/// What the finished run adds next to the weights.
pub struct RunFiles<'a> {
    /// The compression section of `config.json` (None when no layer holds compressed experts:
    /// the output is then a normal checkpoint).
    pub record: Option<&'a format::CompressionRecord>,
    /// `compression_report.json`.
    pub report_json: &'a str,
    /// `compress.toml`: the resolved options.
    pub options_toml: &'a str,
    /// With experts removed: the expert count and `pruning` section of `config.json`.
    pub pruning: Option<&'a super::removal::PrunedConfig>,
    /// Renders the model card (`README.md`) of an output with a compression record from its
    /// staged files; written before the output is moved into place. `None`: no card.
    pub model_card: Option<fn(&std::path::Path) -> Result<String>>,
}

/// The writers of one run: the compressed checkpoint and, optionally, the dense export, with the
/// resume journal of the compressed checkpoint's staging directory.
pub struct Emitter<'a> {
    checkpoint: &'a Checkpoint,
    format: super::options::OutputFormat,
    gguf: crate::export::gguf::GgufOptions,
    compressed: Option<CheckpointWriter>,
    dense: Option<CheckpointWriter>,
    journal: Option<Journal>,
    pending: CommittedShards,
}

impl<'a> Emitter<'a> {
    /// Opens the writers `options` asks for (none for a dry run), resumes the journal of an
    /// interrupted run with the same `manifest` (refusing one with another, unless
    /// `options.restart`) and writes the embedding, final norm, head and any layer past
    /// `num_hidden_layers` (DeepSeek-V3's multi-token prediction layer `model.layers.61.*`)
    /// unchanged, unless the interrupted run did.
    pub fn create(
        checkpoint: &'a Checkpoint,
        options: &OutputOptions,
        manifest: &Manifest,
    ) -> Result<Self> {
        let mode = match options.restart {
            true => StagingMode::Restart,
            false => StagingMode::Resume,
        };
        let open = |path: &Option<PathBuf>| match (path, options.dry_run) {
            (Some(out), false) => CheckpointWriter::open(out, options.force, mode).map(Some),
            _ => Ok(None),
        };
        let mut emitter = Self {
            checkpoint,
            format: options.format,
            gguf: crate::export::gguf::GgufOptions {
                other_type: match options.other_type {
                    Some(crate::quant::Scheme::Ggml(kind)) => Some(kind),
                    _ => None,
                },
            },
            compressed: open(&options.out)?,
            dense: None,
            journal: None,
            pending: CommittedShards::default(),
        };
        emitter.dense = open(&options.export_dense)?;
        match emitter.prepare(manifest) {
            Ok(()) => Ok(emitter),
            // An interrupted run of another setup is left as it is, for its own command.
            Err(error @ Error::ResumeMismatch { .. }) => Err(error),
            Err(error) => {
                if emitter.finished_layers().is_empty() {
                    emitter.discard();
                }
                Err(error)
            }
        }
    }

    /// The writer of one unit of a split run: its layers' shards and journal in the staging
    /// directory of `unit_out` (never moved into place), from `first_layer` on, without the
    /// ends; resumes what an interrupted attempt of the unit finished.
    pub fn for_unit(
        checkpoint: &'a Checkpoint,
        unit_out: &std::path::Path,
        manifest: &Manifest,
        first_layer: usize,
    ) -> Result<Self> {
        let writer = CheckpointWriter::open(unit_out, false, StagingMode::Resume)?;
        let journal = Journal::open_unit(
            &writer.journal_dir(),
            writer.staging_dir(),
            manifest,
            first_layer,
        )?;
        let mut emitter = Self {
            checkpoint,
            format: OutputFormat::Safetensors,
            gguf: Default::default(),
            compressed: Some(writer),
            dense: None,
            journal: Some(journal),
            pending: CommittedShards::default(),
        };
        emitter.adopt_finished_steps()?;
        Ok(emitter)
    }

    /// Takes layer `entry.layer`, finished by a unit of a split run in `unit_staging`, into this
    /// output: its shard is linked (or copied) into the staging directory and the layer
    /// committed. The next [`Self::create`] of the output verifies it as any finished layer.
    pub fn import_layer(
        &mut self,
        unit_staging: &std::path::Path,
        entry: CommittedLayer,
    ) -> Result<()> {
        let Some(writer) = self.compressed.as_mut() else {
            return Ok(());
        };
        if let Some(shard) = &entry.shards.compressed {
            // The name comes from a file on shared storage: only a plain name inside the
            // staging directory is ever replaced.
            let plain = std::path::Path::new(&shard.file)
                .file_name()
                .is_some_and(|name| name == shard.file.as_str() && shard.file != "..");
            if !plain {
                return Err(Error::InvalidArgument(format!(
                    "{}: layer {}'s journal entry names shard `{}`, which is not a file name",
                    unit_staging.display(),
                    entry.layer,
                    shard.file
                )));
            }
            let from = unit_staging.join(&shard.file);
            let to = writer.staging_dir().join(&shard.file);
            crate::safety::staging::remove_path(&to);
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
                crate::safety::staging::sync_file(&to)?;
            }
            writer.adopt_shard(shard);
        }
        if let Some(journal) = self.journal.as_mut() {
            journal.commit_layer(entry)?;
        }
        Ok(())
    }

    /// Opens the journal, adopts what an interrupted run finished and writes the ends.
    fn prepare(&mut self, manifest: &Manifest) -> Result<()> {
        if let Some(w) = &self.compressed {
            self.journal = Some(Journal::open(&w.journal_dir(), w.staging_dir(), manifest)?);
        }
        self.adopt_finished_steps()?;
        let ends_done = self.journal.as_ref().is_some_and(|j| j.ends().is_some());
        if !self.is_writing() || ends_done {
            return Ok(());
        }
        let num_layers = crate::models::ArchConfig::from_checkpoint(self.checkpoint)?
            .spec()
            .num_layers;
        let ends = self.copy_tensors("", |n| {
            decoder_layer_index(n).is_some_and(|layer| layer < num_layers)
        })?;
        self.write_both("ends", (ends.clone(), HashSet::new()), ends)?;
        let shards = std::mem::take(&mut self.pending);
        if let Some(journal) = self.journal.as_mut() {
            journal.commit_ends(shards)?;
        }
        self.checkpoint.release_pages();
        Ok(())
    }

    /// Counts the shards of the steps the journal holds as written once they pass its checks (a
    /// damaged step is dropped with every later one), then removes whatever else the staging
    /// directories hold (steps an interrupted run did not finish or that were dropped).
    fn adopt_finished_steps(&mut self) -> Result<()> {
        let Some(journal) = self.journal.as_mut() else {
            return Ok(());
        };
        journal.adopt_verified(
            self.checkpoint,
            self.compressed.as_mut(),
            self.dense.as_mut(),
        )?;
        for writer in self.compressed.iter().chain(self.dense.iter()) {
            writer.retain_adopted()?;
        }
        Ok(())
    }

    /// What was found wrong with an interrupted run's work and is recomputed, one line each.
    pub fn resume_notes(&self) -> &[String] {
        self.journal.as_ref().map_or(&[], |j| j.notes())
    }

    /// The layers an interrupted run finished (an unbroken run from layer 0), in order.
    pub fn finished_layers(&self) -> Vec<CommittedLayer> {
        self.journal
            .as_ref()
            .map(|j| j.layers().cloned().collect())
            .unwrap_or_default()
    }

    /// The bytes of the tensors written to the compressed checkpoint so far (every shard in its
    /// staging directory), in all and for routed experts; None for a dry run.
    pub fn stored_bytes(&self) -> Result<Option<crate::checkpoint::storage::TensorBytes>> {
        let Some(dir) = self.staging_dir() else {
            return Ok(None);
        };
        let mut shards = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                shards.push(path);
            }
        }
        crate::checkpoint::storage::shard_tensor_bytes(&shards).map(Some)
    }

    /// The staging directory of the compressed checkpoint (None for a dry run).
    pub fn staging_dir(&self) -> Option<&std::path::Path> {
        self.compressed.as_ref().map(|w| w.staging_dir())
    }

    /// The model-wide plans an interrupted run saved (`--budget-scope model`).
    pub fn saved_plans(&self) -> Result<Option<Vec<LayerPlan>>> {
        match &self.journal {
            Some(journal) => journal.plans(),
            None => Ok(None),
        }
    }

    /// Saves the model-wide plans in the journal (no-op for a dry run).
    pub fn save_plans(&self, plans: &[LayerPlan]) -> Result<()> {
        match &self.journal {
            Some(journal) => journal.save_plans(plans),
            None => Ok(()),
        }
    }

    /// Records layer `layer` (whose shards the last `write_layer`/`copy_layer` wrote) as finished,
    /// with its record and report; after this a kill no longer loses it.
    pub fn commit_layer(
        &mut self,
        layer: usize,
        record: Option<LayerRecord>,
        report: Option<LayerReport>,
    ) -> Result<()> {
        let shards = std::mem::take(&mut self.pending);
        if let Some(journal) = self.journal.as_mut() {
            journal.commit_layer(CommittedLayer {
                layer,
                shards,
                record,
                report,
            })?;
        }
        crate::safety::staging::fault_point(&format!("layer-committed:{layer}"));
        Ok(())
    }

    /// Gives up the run: removes the staging directories (nothing in them is worth resuming).
    pub fn discard(self) {
        for writer in self.compressed.into_iter().chain(self.dense) {
            writer.discard();
        }
    }

    fn is_writing(&self) -> bool {
        self.compressed.is_some() || self.dense.is_some()
    }

    /// Writes the step's shard `STEP.safetensors` to each writer, durably, and keeps their
    /// entries for the next commit.
    fn write_both(
        &mut self,
        step: &str,
        (compressed, int8_names): (HashMap<String, Tensor>, HashSet<String>),
        dense: HashMap<String, Tensor>,
    ) -> Result<()> {
        let file = format!("{step}.safetensors");
        if let Some(w) = self.compressed.as_mut() {
            self.pending.compressed = w.write_shard_with_int8(&file, compressed, &int8_names)?;
        }
        if let Some(w) = self.dense.as_mut() {
            self.pending.dense = w.write_shard_as(&file, dense)?;
        }
        Ok(())
    }

    /// Every stored tensor whose name starts with `prefix`, except those `skip` rejects, exactly
    /// as stored (FP8 weights stay FP8, next to their `_scale_inv` scales).
    fn copy_tensors(
        &self,
        prefix: &str,
        skip: impl Fn(&str) -> bool,
    ) -> Result<HashMap<String, Tensor>> {
        let mut tensors = HashMap::new();
        if !self.is_writing() {
            return Ok(tensors);
        }
        for name in self.checkpoint.tensor_names() {
            if name.starts_with(prefix) && !skip(name) {
                let tensor = self.checkpoint.load_verbatim(name, "copy")?;
                tensors.insert(name.to_string(), tensor);
            }
        }
        Ok(tensors)
    }

    /// Copies decoder layer `index` unchanged (dense layers) and commits it.
    pub fn copy_layer(&mut self, index: usize) -> Result<()> {
        let tensors = self.copy_tensors(&format!("model.layers.{index}."), |_| false)?;
        self.write_both(
            &layer_step(index),
            (tensors.clone(), HashSet::new()),
            tensors,
        )?;
        self.commit_layer(index, None, None)
    }

    /// Writes a MoE layer: its assembled routed experts with the layer's other tensors (the
    /// router cut to the kept experts); a layer whose experts are all kept as stored is written
    /// in the input's layout. [`Self::commit_layer`] then records it as finished.
    pub fn write_layer(&mut self, experts: &LayerExperts, layer: AssembledLayer) -> Result<()> {
        if !self.is_writing() {
            return Ok(());
        }
        let layout = experts.layout;
        let index = layer.layer;
        let experts_prefix = format!("{}.experts.", layout.block);
        let mut rest = self.copy_tensors(&format!("model.layers.{index}."), |n| {
            n.starts_with(&experts_prefix)
        })?;
        if let Some(kept) = experts.kept() {
            let original = experts.source_layout().num_experts;
            super::removal::slice_router(&mut rest, &layout.block, kept, original)?;
        }
        if layer.record.is_none() {
            let mut tensors = super::removal::kept_expert_tensors(self.checkpoint, experts)?;
            tensors.extend(rest);
            return self.write_both(
                &layer_step(index),
                (tensors.clone(), HashSet::new()),
                tensors,
            );
        }
        let (mut compressed, int8) = (layer.compressed.tensors, layer.compressed.int8);
        let mut dense = layer.dense;
        compressed.extend(rest.clone());
        dense.extend(rest);
        // The dense export keeps the input's expert layout (fused 3-D tensors if fused).
        if self.dense.is_some() {
            super::hf_compat::fuse_like_input(self.checkpoint, layout, &mut dense)?;
        }
        self.write_both(&layer_step(index), (compressed, int8), dense)
    }

    /// Writes `config.json` (with the compression record), the report, the options, the model
    /// card and the tokenizer files, and moves the outputs into place; returns where the
    /// compressed checkpoint went (None for a dry run).
    pub fn finish(self, files: &RunFiles) -> Result<Option<PathBuf>> {
        let mut output = None;
        if let Some(w) = self.compressed {
            let mut config = self.checkpoint.config().clone();
            if let Some(record) = files.record {
                config[format::COMPRESSION_KEY] =
                    serde_json::to_value(record).map_err(|e| Error::Json {
                        path: w.staging_dir().join(CONFIG_FILE),
                        message: e.to_string(),
                    })?;
            }
            if let Some(pruning) = files.pruning {
                pruning.edit(&mut config, true);
            }
            // transformers loads a factored output through our modelling file
            // (trust_remote_code); a pruned-only output is a normal checkpoint.
            if config.get(format::COMPRESSION_KEY).is_some() {
                super::hf_compat::add_transformers_loader(&w, self.checkpoint, &mut config)?;
            }
            super::hf_compat::name_architectures(&mut config);
            write_common_files(&w, self.checkpoint, &config)?;
            w.write_file("compression_report.json", files.report_json.as_bytes())?;
            w.write_file("compress.toml", files.options_toml.as_bytes())?;
            let card = files
                .model_card
                .filter(|_| config.get(format::COMPRESSION_KEY).is_some());
            if let Some(render) = card {
                crate::safety::staging::fault_point("finish:card");
                let text = render(w.staging_dir())?;
                w.write_file(crate::model_card::CARD_FILE, text.as_bytes())?;
            }
            output = Some(match self.format {
                OutputFormat::Safetensors => w.finish()?,
                OutputFormat::CompressedTensors => {
                    w.finish_with(crate::export::compressed_tensors::convert_staged)?
                }
                OutputFormat::Gguf => w.finish_with(|dir| {
                    crate::export::gguf::convert_staged(dir, self.gguf).map(|_| ())
                })?,
            });
        }
        if let Some(w) = self.dense {
            let mut config = self.checkpoint.config().clone();
            if let Some(pruning) = files.pruning {
                pruning.edit(&mut config, false);
            }
            super::hf_compat::name_architectures(&mut config);
            write_common_files(&w, self.checkpoint, &config)?;
            w.finish()?;
        }
        Ok(output)
    }
}

/// The shard name stem of decoder layer `index` in the staging directory.
fn layer_step(index: usize) -> String {
    format!("layer-{index:05}")
}

/// The decoder layer a tensor name belongs to (`model.layers.{i}.…`).
fn decoder_layer_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

fn write_common_files(
    writer: &CheckpointWriter,
    checkpoint: &Checkpoint,
    config: &serde_json::Value,
) -> Result<()> {
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Json {
        path: writer.staging_dir().join(CONFIG_FILE),
        message: e.to_string(),
    })?;
    writer.write_file(CONFIG_FILE, text.as_bytes())?;
    for name in AUXILIARY_FILES {
        let path = checkpoint.dir().join(name);
        if path.exists() {
            writer.copy_file(&path)?;
        }
    }
    Ok(())
}
