//! A compression method is one module and one registry line: a method written here, outside the
//! crate (an expert's matrix kept in bf16), is registered beside the built-in ones, offered to
//! the solver with its bytes and estimated error, and chosen where it is the better deal.

mod common;

use candle_core::{DType, Device, Tensor};
use rfid_moe::linalg::{CpuBackend, LinalgBackend};
use rfid_moe::pipeline::methods::{LayerContext, Method, MethodInputs, Needs, Registry};
use rfid_moe::pipeline::plan::{Candidate, StoredTensors, Unit, UnitOutput};
use rfid_moe::pipeline::CompressOptions;
use rfid_moe::Result;

/// `bf16`: an expert's matrix rounded to bf16 (2 bytes per parameter).
struct KeepBf16;

/// The method's constructor, as the registry calls it.
fn create<B: LinalgBackend>(_inputs: &MethodInputs) -> Result<Box<dyn Method<B>>> {
    Ok(Box::new(KeepBf16))
}

impl<B: LinalgBackend> Method<B> for KeepBf16 {
    fn name(&self) -> &'static str {
        "bf16"
    }

    fn needs(&self) -> Needs {
        Needs {
            expert_statistics: true,
            ..Needs::default()
        }
    }

    fn offer(&self, layer: &LayerContext<B>) -> Result<Vec<Candidate>> {
        let mut candidates = Vec::new();
        for &matrix in layer.matrices {
            for expert in 0..layer.experts.layout.num_experts {
                let w = layer.experts.matrix(expert, matrix)?;
                let rounded = w.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
                let delta = (rounded - &w)?.flatten_all()?.to_vec1::<f32>()?;
                let weights = layer.statistics.error_weights(matrix, expert).unwrap();
                let (rows, cols) = w.dims2()?;
                candidates.push(Candidate {
                    method: "bf16".into(),
                    unit: Unit::Slot { matrix, expert },
                    variant: 0,
                    label: "bf16".into(),
                    bytes: (2 * rows * cols) as u64,
                    parameters: (rows * cols) as u64,
                    error: weights.error(&delta),
                    signals: None,
                });
            }
        }
        Ok(candidates)
    }

    fn apply(&self, layer: &LayerContext<B>, chosen: &[Candidate]) -> Result<Vec<UnitOutput>> {
        chosen
            .iter()
            .map(|candidate| {
                let Unit::Slot { matrix, expert } = candidate.unit else {
                    unreachable!("bf16 offers expert matrices only");
                };
                let mut tensors = StoredTensors::default();
                let w = layer
                    .experts
                    .matrix(expert, matrix)?
                    .to_dtype(DType::BF16)?;
                tensors.insert(layer.experts.layout.dense_name(expert, matrix), w);
                Ok(UnitOutput {
                    unit: candidate.unit,
                    tensors,
                    reconstruction: Vec::new(),
                    rank: 0,
                    residual_size: 0,
                    storage: "bf16".into(),
                    as_stored: false,
                    report: None,
                })
            })
            .collect()
    }
}

#[test]
fn a_method_from_outside_the_crate_is_offered_and_chosen_where_it_is_the_better_deal() {
    let source = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let calibration = common::random_token_windows(
        &tmp.path().join("calibration.safetensors"),
        256,
        16,
        32,
        0x5eed,
    );
    let ids = Tensor::new(&[[3i64, 17, 9, 120, 42, 7, 64, 200]], &Device::Cpu).unwrap();
    let original = common::logits_of(&source, &ids);
    let mut registry = Registry::<CpuBackend>::builtin();
    registry.register("bf16", "An expert's matrix in bf16", create);
    // f32 experts at 40% fewer bytes: int8 everywhere would keep a quarter; bf16 keeps half of
    // each matrix it stores at a far smaller error, so the solver spends the budget on it.
    let run = |name: &str, methods: &[&str]| {
        let out = tmp.path().join(name);
        let mut options: CompressOptions =
            common::small_default_options(&source, &calibration, &out, 0.4);
        options.methods = methods.iter().map(|m| m.to_string()).collect();
        let report =
            rfid_moe::pipeline::compress_with(&options, &registry, &rfid_moe::Silent).unwrap();
        let error = common::mean_abs_diff(&common::logits_of(&out, &ids), &original);
        (report, out, error)
    };
    let (report, out, with_bf16) = run("bf16", &["bf16", "int8", "keep"]);
    let chosen: usize = report
        .layers
        .iter()
        .flat_map(|l| l.plan.as_ref().unwrap().choices.values())
        .flat_map(|kinds| kinds.iter())
        .filter(|(kind, _)| kind.as_str() == "bf16")
        .map(|(_, count)| count)
        .sum();
    assert!(
        chosen > 0,
        "the solver never chose bf16: {:?}",
        report.layers[0].plan
    );
    // Its tensors are written as it stored them, and the record says so.
    let checkpoint = rfid_moe::checkpoint::Checkpoint::open(&out).unwrap();
    let bf16_tensors = checkpoint
        .tensor_names()
        .iter()
        .filter(|n| {
            n.contains(".experts.")
                && checkpoint.info(n).unwrap().0.dtype == rfid_moe::checkpoint::StoredDType::BF16
        })
        .count();
    assert_eq!(bf16_tensors, chosen);
    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(text.contains("\"bf16\""), "the record names the storage");
    // The budget holds, and the new method made the output better than without it.
    let kept = report.routed_bytes_kept().unwrap();
    assert!(kept <= 0.6 + 0.005, "kept {kept}");
    let (_, _, without) = run("int8", &["int8", "keep"]);
    eprintln!("mean |Δ logit| with bf16 {with_bf16}, without {without}; {chosen} bf16 matrices");
    assert!(
        with_bf16 < without,
        "with bf16 {with_bf16}, without {without}"
    );
}

#[test]
fn an_unknown_method_is_refused_with_the_known_ones_listed() {
    let source = common::fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let mut options =
        common::small_default_options(&source, &source.join("x"), &tmp.path().join("o"), 0.4);
    options.methods = vec!["lowrank".into(), "gptq9".into()];
    let message = rfid_moe::compress(&options).unwrap_err().to_string();
    assert!(
        message.contains("gptq9") && message.contains("prune, lowrank, quantise, int8, keep"),
        "{message}"
    );
}
