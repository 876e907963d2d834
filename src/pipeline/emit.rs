//! The emit stage: a [`FactoredLayer`] becomes one shard of the compressed checkpoint (and, with
//! `--export-dense`, one shard of the reconstructed dense checkpoint); layers that are not
//! compressed are copied through; the run ends with `config.json` (with its compression record),
//! the report and the resolved options, written atomically. Every finished step (the ends, each
//! layer) is recorded in the resume journal ([`super::resume`]) after its shards are durable, and
//! a later run adopts the steps an interrupted one finished.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use candle_core::{DType, Tensor};

use super::experts::LayerExperts;
use super::factor::FactoredLayer;
use super::options::OutputOptions;
use super::report::{GroupReport, LayerReport};
use super::resume::{CommittedLayer, CommittedShards, Journal, Manifest};
use crate::checkpoint::experts::ExpertMatrix;
use crate::checkpoint::writer::{CheckpointWriter, StagingMode};
use crate::checkpoint::{fp8, int8};
use crate::checkpoint::{Checkpoint, CONFIG_FILE};
use crate::error::{Error, Result};
use crate::format::{self, GroupRecord, LayerRecord, MatrixRecord};

/// Tokenizer and generation files copied next to the compressed weights.
pub(crate) const AUXILIARY_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// What the finished run adds next to the weights.
pub struct RunFiles<'a> {
    /// The compression section of `config.json`.
    pub record: &'a format::CompressionRecord,
    /// `compression_report.json`.
    pub report_json: &'a str,
    /// `compress.toml`: the resolved options.
    pub options_toml: &'a str,
    /// With expert pruning: the expert count and `pruning` section of `config.json`.
    pub pruning: Option<&'a super::prune::PrunedConfig>,
    /// Renders the model card (`README.md`) of an output with a compression record from its
    /// staged files; written before the output is moved into place. `None`: no card.
    pub model_card: Option<fn(&std::path::Path) -> Result<String>>,
}

/// The writers of one run: the compressed checkpoint and, optionally, the dense export, with the
/// resume journal of the compressed checkpoint's staging directory.
pub struct Emitter<'a> {
    checkpoint: &'a Checkpoint,
    compressed: Option<CheckpointWriter>,
    dense: Option<CheckpointWriter>,
    journal: Option<Journal>,
    pending: CommittedShards,
    /// Store the compressor's tensors as int8 with row-block scales (`--factor-dtype int8`).
    int8_factors: bool,
    /// The int8 tensors of the shard being assembled (written as `I8`).
    int8_names: HashSet<String>,
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
            compressed: open(&options.out)?,
            dense: None,
            journal: None,
            pending: CommittedShards::default(),
            int8_factors: false,
            int8_names: HashSet::new(),
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
        self.write_both("ends", ends.clone(), ends)?;
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

    /// Stores the compressor's tensors of every following layer (`lowrank_a`, `basis`, the
    /// gate/up members of dense groups) as int8 with row-block scales (`--factor-dtype int8`,
    /// [`int8`]); residual coefficients and the dense export stay in the stored float dtype.
    pub fn store_factors_as_int8(&mut self) {
        self.int8_factors = true;
    }

    /// Inserts a tensor the compressor wrote under `key`: as it is, or with int8 factors as
    /// `key` (I8 codes) and `key_scale` (F32). FP8 tensors copied as stored are never quantised.
    fn insert_factor(
        &mut self,
        tensors: &mut HashMap<String, Tensor>,
        key: String,
        tensor: Tensor,
    ) -> Result<()> {
        let is_float = matches!(
            tensor.dtype(),
            DType::F32 | DType::BF16 | DType::F16 | DType::F64
        );
        if !self.int8_factors || !is_float {
            tensors.insert(key, tensor);
            return Ok(());
        }
        let (codes, scales) = int8::Int8Matrix::from_tensor(&tensor)?.to_tensors()?;
        tensors.insert(int8::scale_name(&key), scales);
        self.int8_names.insert(key.clone());
        tensors.insert(key, codes);
        Ok(())
    }

    /// The bytes of the tensors written to the compressed checkpoint so far (every shard in its
    /// staging directory), in all and for routed experts; None for a dry run.
    pub fn stored_bytes(&self) -> Result<Option<crate::sweep::TensorBytes>> {
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
        crate::sweep::shard_tensor_bytes(&shards).map(Some)
    }

    /// The staging directory of the compressed checkpoint (None for a dry run).
    pub fn staging_dir(&self) -> Option<&std::path::Path> {
        self.compressed.as_ref().map(|w| w.staging_dir())
    }

    /// The model-wide rank plans an interrupted run saved (`--budget-scope model`).
    pub fn saved_plans(&self) -> Result<Option<Vec<super::allocate::RankPlan>>> {
        match &self.journal {
            Some(journal) => journal.plans(),
            None => Ok(None),
        }
    }

    /// Saves the model-wide rank plans in the journal (no-op for a dry run).
    pub fn save_plans(&self, plans: &[super::allocate::RankPlan]) -> Result<()> {
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
        compressed: HashMap<String, Tensor>,
        dense: HashMap<String, Tensor>,
    ) -> Result<()> {
        let file = format!("{step}.safetensors");
        let int8_names = std::mem::take(&mut self.int8_names);
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
        self.write_both(&layer_step(index), tensors.clone(), tensors)?;
        self.commit_layer(index, None, None)
    }

    /// Writes a factored MoE layer (factors, dense groups, the matrices not factored and the
    /// layer's other tensors) and returns its record and its per-matrix group reports; [`Self::commit_layer`]
    /// then records it as finished.
    pub fn write_layer(
        &mut self,
        experts: &LayerExperts,
        factored: FactoredLayer,
        stored_dtype: DType,
    ) -> Result<(LayerRecord, BTreeMap<String, Vec<GroupReport>>)> {
        let layout = experts.layout;
        let (mut compressed, mut dense) = (HashMap::new(), HashMap::new());
        let mut records = BTreeMap::new();
        let mut reports = BTreeMap::new();
        let unfactored: Vec<ExpertMatrix> = ExpertMatrix::ALL
            .into_iter()
            .filter(|&m| factored.matrices.iter().all(|f| f.matrix != m))
            .collect();
        for matrix in factored.matrices {
            let name = layout.name(matrix.matrix);
            // down_proj shares its basis on the output side: `C_j` is `lowrank_c` [K, p].
            let coefficients_name = match matrix.matrix {
                ExpertMatrix::Down => format::output_coefficients_name,
                ExpertMatrix::Gate | ExpertMatrix::Up => format::coefficients_name,
            };
            let mut groups = Vec::new();
            let mut group_reports = Vec::new();
            for (g, group) in matrix.groups.into_iter().enumerate() {
                for (slot, &expert) in group.report.experts.iter().enumerate() {
                    let tensor = group.expert_tensors[slot].clone();
                    match group.basis {
                        Some(_) => {
                            let key = coefficients_name(&layout.block, expert, name);
                            self.insert_factor(&mut compressed, key, tensor)?;
                        }
                        None => {
                            let kept =
                                self.kept_expert(experts, expert, matrix.matrix, || Ok(tensor))?;
                            // One tensor is the compressor's; an FP8 weight with its scales is
                            // a copy as stored.
                            match <[_; 1]>::try_from(kept) {
                                Ok([(key, tensor)]) => {
                                    self.insert_factor(&mut compressed, key, tensor)?
                                }
                                Err(stored) => compressed.extend(stored),
                            }
                        }
                    }
                    if let Some(rebuilt) = &group.reconstruction {
                        dense.insert(
                            layout.dense_name(expert, matrix.matrix),
                            self.float_dtype(&rebuilt[slot], stored_dtype)?,
                        );
                    }
                }
                if let Some(basis) = group.basis {
                    let key = format::basis_name(&layout.block, g, name);
                    self.insert_factor(&mut compressed, key, basis)?;
                }
                if let Some(eta) = group.residual_eta {
                    compressed.insert(
                        format::residual_name(&layout.block, g, name),
                        self.float_dtype(&eta, stored_dtype)?,
                    );
                }
                groups.push(GroupRecord {
                    experts: group.report.experts.clone(),
                    rank: group.report.rank,
                    dense: group.report.dense,
                    residual_size: group.report.residual_size,
                });
                group_reports.push(group.report);
            }
            records.insert(name.to_string(), MatrixRecord { groups });
            reports.insert(name.to_string(), group_reports);
        }
        if self.is_writing() {
            // Matrices not factored (down_proj by default) stay dense, written per expert from
            // the canonical view.
            for &matrix in &unfactored {
                for expert in 0..layout.num_experts {
                    let kept = self.kept_expert(experts, expert, matrix, || {
                        Ok(experts.matrix(expert, matrix)?.to_dtype(stored_dtype)?)
                    })?;
                    compressed.extend(kept.clone());
                    dense.extend(kept);
                }
            }
            let experts_prefix = format!("{}.experts.", layout.block);
            let mut rest = self
                .copy_tensors(&format!("model.layers.{}.", factored.layer), |n| {
                    n.starts_with(&experts_prefix)
                })?;
            if let Some(kept) = experts.kept() {
                let original = experts.source_layout().num_experts;
                super::prune::slice_router(&mut rest, &layout.block, kept, original)?;
            }
            compressed.extend(rest.clone());
            dense.extend(rest);
            // The dense export keeps the input's expert layout (fused 3-D tensors if fused).
            if self.dense.is_some() {
                super::hf_compat::fuse_like_input(self.checkpoint, layout, &mut dense)?;
            }
            self.write_both(&layer_step(factored.layer), compressed, dense)?;
        }
        let record = LayerRecord {
            layer: factored.layer,
            matrices: records,
        };
        Ok((record, reports))
    }

    /// `tensor` as written: unchanged, or in the stored dtype with int8 factors (which the factor
    /// stage hands over in f32, the precision they are quantised from).
    fn float_dtype(&self, tensor: &Tensor, stored_dtype: DType) -> Result<Tensor> {
        Ok(match self.int8_factors {
            true => tensor.to_dtype(stored_dtype)?,
            false => tensor.clone(),
        })
    }

    /// The tensors of an expert matrix that stays dense: a per-expert FP8 weight is copied as
    /// stored with its block scales (so `quantization_config` stays true for it); anything else
    /// is `rebuilt()` (the canonical view in the output dtype) under the per-expert name.
    fn kept_expert(
        &self,
        experts: &LayerExperts,
        expert: usize,
        matrix: ExpertMatrix,
        rebuilt: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Vec<(String, Tensor)>> {
        let key = experts.layout.dense_name(expert, matrix);
        let source = experts
            .source_layout()
            .dense_name(experts.source_index(expert), matrix);
        let stored_fp8 = self
            .checkpoint
            .info(&source)
            .is_some_and(|(info, _)| info.dtype.is_fp8());
        if !stored_fp8 {
            return Ok(vec![(key, rebuilt()?)]);
        }
        Ok(vec![
            (
                fp8::scale_name(&key),
                self.checkpoint
                    .load_verbatim(&fp8::scale_name(&source), "copy")?,
            ),
            (key, self.checkpoint.load_verbatim(&source, "copy")?),
        ])
    }

    /// Writes a pruned layer without factoring (`--method prune`): the kept experts as stored,
    /// renumbered, the router cut to their rows, the layer's other tensors unchanged.
    pub fn write_pruned_layer(&mut self, experts: &LayerExperts, layer: usize) -> Result<()> {
        if !self.is_writing() {
            return Ok(());
        }
        let layout = experts.layout;
        let mut tensors = super::prune::kept_expert_tensors(self.checkpoint, experts)?;
        let experts_prefix = format!("{}.experts.", layout.block);
        let mut rest = self.copy_tensors(&format!("model.layers.{layer}."), |n| {
            n.starts_with(&experts_prefix)
        })?;
        let kept: Vec<usize> = (0..layout.num_experts)
            .map(|e| experts.source_index(e))
            .collect();
        let original = experts.source_layout().num_experts;
        super::prune::slice_router(&mut rest, &layout.block, &kept, original)?;
        tensors.extend(rest);
        self.write_both(&layer_step(layer), tensors.clone(), tensors)
    }

    /// Writes `config.json` (with the compression record), the report, the options, the model
    /// card and the tokenizer files, and moves the outputs into place; returns where the
    /// compressed checkpoint went (None for a dry run).
    pub fn finish(self, files: &RunFiles) -> Result<Option<PathBuf>> {
        let mut output = None;
        if let Some(w) = self.compressed {
            let mut config = self.checkpoint.config().clone();
            config[format::COMPRESSION_KEY] =
                serde_json::to_value(files.record).map_err(|e| Error::Json {
                    path: w.staging_dir().join(CONFIG_FILE),
                    message: e.to_string(),
                })?;
            if let Some(pruning) = files.pruning {
                pruning.edit(&mut config, true);
            }
            // transformers loads a factored output through our modelling file
            // (trust_remote_code); a pruned-only output is a normal checkpoint.
            if config.get(format::COMPRESSION_KEY).is_some() {
                super::hf_compat::add_transformers_loader(&w, self.checkpoint, &mut config)?;
            }
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
            output = Some(w.finish()?);
        }
        if let Some(w) = self.dense {
            let mut config = self.checkpoint.config().clone();
            if let Some(pruning) = files.pruning {
                pruning.edit(&mut config, false);
            }
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
