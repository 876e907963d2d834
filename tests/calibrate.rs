//! The calibrate stage: per-group statistics are exactly what per-expert statistics summed over
//! each group give (the old design kept one Gram matrix per expert; this one keeps one per group).

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use faer::Mat;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::linalg::{tensor_to_mat, CpuBackend};
use rfid_moe::models::moe::{MoeObserver, MoeTrace};
use rfid_moe::models::Model;
use rfid_moe::pipeline::calibrate::{
    frequency_groups, CalibrationStream, Recording, StatisticsWanted,
};
use rfid_moe::pipeline::{CalibrationOptions, GroupSize};

/// Per-expert routing counts and Gram matrices Σ xxᵀ, collected through the runtime model.
#[derive(Default)]
struct PerExpert {
    counts: BTreeMap<usize, Vec<u64>>,
    grams: BTreeMap<usize, Vec<Mat<f64>>>,
}

impl MoeObserver for PerExpert {
    fn observe(&mut self, trace: &MoeTrace) -> rfid_moe::Result<()> {
        let d = trace.input.dim(1)?;
        let routed = trace
            .routing
            .tokens_per_expert(trace.routing.logits.dim(1)?)?;
        let counts = self
            .counts
            .entry(trace.layer)
            .or_insert_with(|| vec![0; routed.len()]);
        let grams = self
            .grams
            .entry(trace.layer)
            .or_insert_with(|| vec![Mat::zeros(d, d); routed.len()]);
        for (expert, (tokens, _)) in routed.into_iter().enumerate() {
            counts[expert] += tokens.len() as u64;
            if tokens.is_empty() {
                continue;
            }
            let index = Tensor::from_vec(tokens.clone(), tokens.len(), &Device::Cpu)?;
            let x = tensor_to_mat(&trace.input.index_select(&index, 0)?)?;
            grams[expert] += x.transpose() * &x;
        }
        Ok(())
    }
}

#[test]
fn group_statistics_are_the_sums_of_their_experts_gram_matrices() {
    let checkpoint = Checkpoint::open(common::fixture("tiny-qwen3_moe")).unwrap();
    let windows: Vec<Vec<u32>> = (0..6u32)
        .map(|w| (0..16u32).map(|t| (w * 37 + t * 11) % 256).collect())
        .collect();
    let options = CalibrationOptions {
        group_size: GroupSize::Experts(3),
        batch_size: 2,
        ..CalibrationOptions::default()
    };
    let (device, backend) = (Device::Cpu, CpuBackend);
    let recording = Recording {
        inputs: true,
        ..Recording::default()
    };
    let mut stream = CalibrationStream::new(
        &checkpoint,
        &windows,
        &options,
        recording,
        &device,
        &backend,
    )
    .unwrap();
    let wanted = StatisticsWanted {
        group_size: 3,
        group_gram: true,
        expert_statistics: false,
        routed_inputs: false,
    };

    let model = Model::load(&checkpoint, DType::F32, &device).unwrap();
    let mut reference = PerExpert::default();
    for batch in windows.chunks(2) {
        let ids = Tensor::new(batch.to_vec(), &device).unwrap();
        model.forward(&ids, Some(&mut reference)).unwrap();
    }

    let mut checked = 0;
    while let Some(layer) = stream.next_statistics(wanted).unwrap() {
        let (index, Some(statistics)) = (layer.index, layer.statistics) else {
            continue;
        };
        let counts = &reference.counts[&index];
        assert_eq!(&statistics.routing_counts, counts, "layer {index}");
        assert_eq!(statistics.groups, frequency_groups(counts, 3).unwrap());
        assert_eq!(statistics.tokens, 6 * 16);
        let grams = statistics.group_gram.as_ref().unwrap();
        assert_eq!(
            grams.len(),
            statistics.groups.len(),
            "one Gram matrix per group"
        );
        for (group, gram) in statistics.groups.iter().zip(grams) {
            let mut expected = Mat::<f64>::zeros(gram.nrows(), gram.ncols());
            for &expert in group {
                expected += &reference.grams[&index][expert];
            }
            let scale = (0..expected.nrows())
                .map(|i| expected[(i, i)].abs())
                .fold(1e-30, f64::max);
            let worst = (0..gram.nrows())
                .flat_map(|i| (0..gram.ncols()).map(move |j| (i, j)))
                .map(|(i, j)| (gram[(i, j)] - expected[(i, j)]).abs())
                .fold(0.0, f64::max);
            assert!(worst <= 1e-5 * scale, "layer {index}: {worst} vs {scale}");
        }
        checked += 1;
    }
    assert_eq!(checked, 3, "every MoE layer of the fixture");
}

#[test]
fn routing_counts_and_tokens_do_not_depend_on_collecting_gram_matrices() {
    let checkpoint = Checkpoint::open(common::fixture("tiny-mixtral")).unwrap();
    let windows: Vec<Vec<u32>> = (0..3u32)
        .map(|w| (0..8u32).map(|t| (w * 13 + t * 5) % 64).collect())
        .collect();
    let options = CalibrationOptions {
        batch_size: 2,
        ..CalibrationOptions::default()
    };
    let (device, backend) = (Device::Cpu, CpuBackend);
    let collect = |gram: bool| {
        let recording = Recording {
            inputs: gram,
            ..Recording::default()
        };
        let wanted = StatisticsWanted {
            group_size: 2,
            group_gram: gram,
            expert_statistics: false,
            routed_inputs: false,
        };
        let mut stream = CalibrationStream::new(
            &checkpoint,
            &windows,
            &options,
            recording,
            &device,
            &backend,
        )
        .unwrap();
        let mut layers = Vec::new();
        while let Some(layer) = stream.next_statistics(wanted).unwrap() {
            if let Some(s) = layer.statistics {
                assert_eq!(s.group_gram.is_some(), gram);
                layers.push((s.routing_counts, s.tokens, s.groups));
            }
        }
        layers
    };
    let with = collect(true);
    assert!(!with.is_empty());
    assert!(with.iter().all(|(_, tokens, _)| *tokens == 3 * 8));
    assert_eq!(collect(false), with);
}
