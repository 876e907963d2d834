//! The checkpoint side of the experts seam: per-expert and fused on-disk layouts give the same
//! canonical tensors, shapes are checked, and each layout loads in its natural runtime form.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixture, fused_copy, layouts, max_abs_diff, write_checkpoint};
use rfid_moe::checkpoint::experts::ExpertMatrix;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::models::moe::{ExpertsForm, RoutedExperts};
use rfid_moe::models::{FeedForward, Model};
use rfid_moe::Error;

#[test]
fn per_expert_and_fused_layouts_give_the_same_canonical_tensors() {
    let source = fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let per_expert = Checkpoint::open(&source).unwrap();
    let fused = Checkpoint::open(fused_copy(&source, &tmp.path().join("fused"), false)).unwrap();
    let cpu = &Device::Cpu;
    for (_, layout) in layouts(&per_expert) {
        for matrix in ExpertMatrix::ALL {
            assert!(!layout.is_fused(&per_expert, matrix) && layout.is_fused(&fused, matrix));
            let a = layout
                .load_matrix(&per_expert, matrix, DType::F32, cpu)
                .unwrap();
            let b = layout.load_matrix(&fused, matrix, DType::F32, cpu).unwrap();
            assert_eq!(a.len(), layout.num_experts);
            for (e, (a, b)) in a.iter().zip(&b).enumerate() {
                assert_eq!(a.dims(), layout.shape(matrix));
                assert_eq!(max_abs_diff(a, b), 0.0, "{matrix:?} expert {e}");
                let single = layout
                    .load_dense(&fused, e, matrix, DType::F32, cpu)
                    .unwrap();
                assert_eq!(max_abs_diff(&single, a), 0.0);
                let raw = per_expert
                    .load(&layout.dense_name(e, matrix), DType::F32, cpu, "test")
                    .unwrap();
                assert_eq!(max_abs_diff(&raw, a), 0.0);
            }
            let stacked = layout
                .load_stacked(&fused, matrix, DType::F32, cpu)
                .unwrap();
            assert_eq!(max_abs_diff(&stacked, &Tensor::stack(&a, 0).unwrap()), 0.0);
        }
        let error = layout.load_dense(
            &per_expert,
            layout.num_experts,
            ExpertMatrix::Gate,
            DType::F32,
            cpu,
        );
        assert!(matches!(error, Err(Error::InvalidArgument(_))));
    }
}

fn forms(model: &Model) -> Vec<ExpertsForm> {
    model
        .layers
        .iter()
        .filter_map(|l| match &l.feed_forward {
            FeedForward::Moe(block) => Some(block.experts.form()),
            FeedForward::Dense(_) => None,
        })
        .collect()
}

#[test]
fn each_layout_loads_in_its_natural_form_and_forms_agree() {
    let source = fixture("tiny-qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let per_expert = Checkpoint::open(&source).unwrap();
    let fused = Checkpoint::open(fused_copy(&source, &tmp.path().join("fused"), false)).unwrap();
    let dense_model = Model::load(&per_expert, DType::F32, &Device::Cpu).unwrap();
    let mut mixed_model = Model::load(&fused, DType::F32, &Device::Cpu).unwrap();
    assert!(forms(&dense_model).iter().all(|f| *f == ExpertsForm::Dense));
    assert!(forms(&mixed_model)
        .iter()
        .all(|f| *f == ExpertsForm::Stacked));
    // Any form can be asked for explicitly: the per-expert experts as a factored form without
    // groups (every expert dense inside it), swapped into the stacked model.
    for (layer, layout) in layouts(&per_expert) {
        if let FeedForward::Moe(block) = &mut mixed_model.layers[layer].feed_forward {
            block.experts = RoutedExperts::load_as(
                ExpertsForm::Factored,
                &layout,
                &per_expert,
                layer,
                None,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        }
    }
    let ids = Tensor::new(&[[1u32, 5, 9, 2, 7, 3, 3, 11]], &Device::Cpu).unwrap();
    let a = dense_model.forward(&ids, None).unwrap().logits;
    let b = mixed_model.forward(&ids, None).unwrap().logits;
    assert!(max_abs_diff(&a, &b) <= 1e-6);
}

#[test]
fn a_fused_tensor_of_the_wrong_shape_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let broken = Checkpoint::open(fused_copy(
        &fixture("tiny-qwen3_moe"),
        &tmp.path().join("broken"),
        true,
    ))
    .unwrap();
    let (_, layout) = layouts(&broken).remove(0);
    let error = layout
        .load_matrix(&broken, ExpertMatrix::Down, DType::F32, &Device::Cpu)
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::ShapeMismatch { .. }), "{message}");
    assert!(
        message.contains(&layout.fused_name(ExpertMatrix::Down))
            && message.contains(".safetensors"),
        "{message}"
    );
}

/// Writes a bf16 copy of `source` (every tensor rounded to bf16).
fn bf16_copy(source: &Path, out: &Path) -> PathBuf {
    let checkpoint = Checkpoint::open(source).unwrap();
    let tensors: HashMap<String, Tensor> = checkpoint
        .tensor_names()
        .into_iter()
        .map(|name| {
            let t = checkpoint
                .load(name, DType::BF16, &Device::Cpu, "test")
                .unwrap();
            (name.to_string(), t)
        })
        .collect();
    write_checkpoint(&checkpoint, tensors, out)
}

#[test]
fn experts_held_in_bf16_compute_exactly_like_their_f32_widening() {
    // Calibration keeps bf16 experts in bf16 and widens them per use: the products must be the
    // ones an all-f32 load of the same bf16 weights gives, bit for bit.
    for family in ["tiny-qwen3_moe", "tiny-mixtral", "tiny-deepseek_v3"] {
        let tmp = tempfile::tempdir().unwrap();
        let checkpoint =
            Checkpoint::open(bf16_copy(&fixture(family), &tmp.path().join("b"))).unwrap();
        let widened = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
        let mut narrow = Model::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
        for (layer, layout) in layouts(&checkpoint) {
            if let FeedForward::Moe(block) = &mut narrow.layers[layer].feed_forward {
                block.experts = RoutedExperts::load(
                    &layout,
                    &checkpoint,
                    layer,
                    None,
                    DType::BF16,
                    &Device::Cpu,
                )
                .unwrap();
            }
        }
        let ids = Tensor::new(&[[1u32, 5, 9, 2, 7, 3, 3, 11]], &Device::Cpu).unwrap();
        let a = widened.forward(&ids, None).unwrap().logits;
        let b = narrow.forward(&ids, None).unwrap().logits;
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{family}");
    }
}
