//! `--xi auto` (pipeline::tune): held-out windows calibrate nothing, their MoE inputs and routing
//! are the runtime model's, and the candidates' output errors (computed from one factorisation
//! per group, truncated per candidate) equal an independent computation: each candidate's plan
//! factored by the factor stage itself, its reconstructed experts run with candle.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use rfid_moe::checkpoint::experts::ExpertMatrix;
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::linalg::CpuBackend;
use rfid_moe::models::moe::{MoeObserver, MoeTrace};
use rfid_moe::models::{ArchConfig, Model};
use rfid_moe::pipeline::calibrate::{
    split_holdout, CalibrationStream, HeldOutActivations, LayerStatistics, Recording,
    StatisticsWanted,
};
use rfid_moe::pipeline::experts::LayerExperts;
use rfid_moe::pipeline::methods::lowrank::allocate::{
    allocate_layer, Allocation, AllocationSettings, RankPlan,
};
use rfid_moe::pipeline::methods::lowrank::analyse::{analyse_layer, LayerAnalysis};
use rfid_moe::pipeline::methods::lowrank::factor::{
    factor_layer, FactorSettings, Precision, SvdFactorizer,
};
use rfid_moe::pipeline::methods::lowrank::tune::{search_xi, SearchSettings, TuneMetric};
use rfid_moe::pipeline::methods::lowrank::DEFAULT_XI_CANDIDATES;
use rfid_moe::pipeline::{CalibrationOptions, GroupSize};

/// Per expert, the tokens routed to it and their weights.
type Routes = Vec<(Vec<u32>, Vec<f32>)>;

/// Each MoE layer's input and per-expert routing, collected through the runtime model.
#[derive(Default)]
struct Traces {
    layers: BTreeMap<usize, Vec<(Tensor, Routes)>>,
}

impl MoeObserver for Traces {
    fn observe(&mut self, trace: &MoeTrace) -> rfid_moe::Result<()> {
        let experts = trace.routing.logits.dim(1)?;
        let routes = trace.routing.tokens_per_expert(experts)?;
        self.layers
            .entry(trace.layer)
            .or_default()
            .push((trace.input.clone(), routes));
        Ok(())
    }
}

fn windows(count: u32, len: u32) -> Vec<Vec<u32>> {
    (0..count)
        .map(|w| (0..len).map(|t| (w * 37 + t * 11 + w * t) % 256).collect())
        .collect()
}

/// ‖Ŷ − Y‖ / ‖Y‖ of the routed experts' weighted output on the held-out tokens, Ŷ with the
/// reconstructed gate and up of `reconstructed` (per expert), computed with candle; with
/// `metric` residual, each token's squared error is divided by its layer output's squared norm.
fn reference_error(
    experts: &LayerExperts,
    held_out: &HeldOutActivations,
    reconstructed: &BTreeMap<(usize, ExpertMatrix), Tensor>,
    metric: TuneMetric,
) -> f64 {
    let inputs = &held_out.inputs;
    let mut original = inputs.zeros_like().unwrap();
    let mut compressed = inputs.zeros_like().unwrap();
    for (expert, routes) in held_out.routes.iter().enumerate() {
        if routes.tokens.is_empty() {
            continue;
        }
        let index = Tensor::new(routes.tokens.as_slice(), &Device::Cpu).unwrap();
        let x = inputs.index_select(&index, 0).unwrap();
        let weights = Tensor::new(routes.weights.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let matrix = |m: ExpertMatrix| experts.matrix(expert, m).unwrap();
        let down = matrix(ExpertMatrix::Down);
        let run = |gate: &Tensor, up: &Tensor| {
            let g = x.matmul(&gate.t().unwrap()).unwrap();
            let u = x.matmul(&up.t().unwrap()).unwrap();
            let h = (candle_nn::ops::silu(&g).unwrap() * u).unwrap();
            h.matmul(&down.t().unwrap())
                .unwrap()
                .broadcast_mul(&weights)
                .unwrap()
        };
        let (gate, up) = (matrix(ExpertMatrix::Gate), matrix(ExpertMatrix::Up));
        let y = run(&gate, &up);
        let pick = |m: ExpertMatrix, dense: &Tensor| {
            reconstructed
                .get(&(expert, m))
                .cloned()
                .unwrap_or_else(|| dense.clone())
        };
        let y_hat = run(
            &pick(ExpertMatrix::Gate, &gate),
            &pick(ExpertMatrix::Up, &up),
        );
        original = original.index_add(&index, &y, 0).unwrap();
        compressed = compressed.index_add(&index, &y_hat, 0).unwrap();
    }
    let tokens = held_out.residual_norms.len();
    let token_weights: Vec<f64> = match metric {
        TuneMetric::Output => vec![1.0; tokens],
        TuneMetric::Residual => held_out
            .residual_norms
            .iter()
            .map(|&n| 1.0 / n as f64)
            .collect(),
    };
    let token_weights = Tensor::from_vec(token_weights, (tokens, 1), &Device::Cpu).unwrap();
    let norm = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .broadcast_mul(&token_weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (norm(&(compressed - &original).unwrap()) / norm(&original)).sqrt()
}

/// Each expert's reconstructed gate/up under `plan`, from the factor stage.
fn reconstruct(
    experts: &LayerExperts,
    statistics: &LayerStatistics<faer::Mat<f64>>,
    analysis: &LayerAnalysis,
    plan: &RankPlan,
) -> BTreeMap<(usize, ExpertMatrix), Tensor> {
    let settings = FactorSettings {
        factorizer: &SvdFactorizer,
        whiten: true,
        whiten_ridge: 1e-4,
        residual_seed: 1,
        factor_dtype: DType::F32,
        precision: Precision::Double,
        stored_dtype: DType::F32,
        factorize: true,
        keep_reconstruction: true,
    };
    let factored =
        factor_layer(&CpuBackend, experts, statistics, analysis, plan, &settings).unwrap();
    let mut out = BTreeMap::new();
    for matrix in &factored.matrices {
        for group in matrix.groups.iter().filter(|g| !g.report.dense) {
            let rebuilt = group.reconstruction.as_ref().unwrap();
            for (&expert, tensor) in group.report.experts.iter().zip(rebuilt) {
                out.insert((expert, matrix.matrix), tensor.clone());
            }
        }
    }
    out
}

/// Runs the search on one layer and checks every candidate's error against
/// [`reference_error`], and that the least error's plan is returned; says whether the
/// candidates' errors differ.
fn check_search(
    (experts, statistics, analysis, held_out): (
        &LayerExperts,
        &LayerStatistics<faer::Mat<f64>>,
        &LayerAnalysis,
        &HeldOutActivations,
    ),
    (allocation, metric): (AllocationSettings, TuneMetric),
    layer: usize,
) -> bool {
    let settings = SearchSettings {
        allocation,
        candidates: &DEFAULT_XI_CANDIDATES,
        metric,
        whiten: true,
        whiten_ridge: 1e-4,
    };
    let (plan, search) = search_xi(
        &CpuBackend,
        experts,
        statistics,
        analysis,
        held_out,
        &settings,
    )
    .unwrap();
    assert_eq!(search.held_out_tokens, 2 * 16);
    assert_eq!(search.candidates.len(), DEFAULT_XI_CANDIDATES.len());
    let mut distinct = Vec::new();
    for candidate in &search.candidates {
        let options = AllocationSettings {
            xi: candidate.xi,
            ..allocation
        };
        let candidate_plan = allocate_layer(analysis, &options).unwrap();
        let rebuilt = reconstruct(experts, statistics, analysis, &candidate_plan);
        let expected = reference_error(experts, held_out, &rebuilt, metric);
        assert!(
            (candidate.output_error - expected).abs() <= 1e-4 * expected + 1e-9,
            "layer {layer} {metric} ξ {}: {} vs {expected}",
            candidate.xi,
            candidate.output_error
        );
        assert!(expected > 0.0, "ratio 0.5 must lose something");
        if !distinct.iter().any(|e: &f64| (e - expected).abs() < 1e-12) {
            distinct.push(expected);
        }
        if candidate.xi == search.chosen {
            let ranks = |p: &RankPlan| -> Vec<_> {
                p.matrices.iter().map(|m| m.allocations.clone()).collect()
            };
            assert_eq!(
                ranks(&plan),
                ranks(&candidate_plan),
                "the chosen plan is kept"
            );
        }
    }
    let best = search
        .candidates
        .iter()
        .map(|c| c.output_error)
        .fold(f64::INFINITY, f64::min);
    let chosen = search.candidates.iter().find(|c| c.xi == search.chosen);
    assert_eq!(chosen.map(|c| c.output_error), Some(best));
    distinct.len() > 1
}

#[test]
fn held_out_windows_calibrate_nothing_and_candidate_errors_match_an_independent_computation() {
    let checkpoint = Checkpoint::open(common::fixture("tiny-qwen3_moe")).unwrap();
    let all = windows(8, 16);
    let (kept, held) = split_holdout(&all, 0.25).unwrap();
    assert_eq!((kept.len(), held.len()), (6, 2));
    let options = CalibrationOptions {
        group_size: GroupSize::Experts(2),
        batch_size: 3,
        ..CalibrationOptions::default()
    };
    let (device, backend) = (Device::Cpu, CpuBackend);
    let recording = Recording {
        inputs: true,
        ..Recording::default()
    };
    let wanted = StatisticsWanted {
        group_size: 2,
        group_gram: true,
        expert_statistics: false,
        routed_inputs: false,
    };
    let mut stream = CalibrationStream::with_held_out(
        &checkpoint,
        [&kept, &held],
        &options,
        recording,
        &device,
        &backend,
    )
    .unwrap();
    let mut plain =
        CalibrationStream::new(&checkpoint, &kept, &options, recording, &device, &backend).unwrap();
    let model = Model::load(&checkpoint, DType::F32, &device).unwrap();
    let mut traces = Traces::default();
    model
        .forward(
            &Tensor::new(held.clone(), &device).unwrap(),
            Some(&mut traces),
        )
        .unwrap();
    let layouts = ArchConfig::from_checkpoint(&checkpoint)
        .unwrap()
        .spec()
        .moe_layers;
    let allocation = AllocationSettings {
        ratio: 0.5,
        xi: 0.2,
        policy: Allocation::Rfid,
        dense_fallback: true,
        residual: false,
        residual_fraction: 0.03,
    };
    let (mut checked, mut differing) = (0, 0);
    while let Some(layer) = stream.next_statistics(wanted).unwrap() {
        let alone = plain.next_statistics(wanted).unwrap().unwrap();
        let (Some(statistics), Some(held_out)) = (layer.statistics, layer.held_out) else {
            assert!(alone.statistics.is_none());
            continue;
        };
        // The held-out windows change no statistic.
        let alone = alone.statistics.unwrap();
        assert_eq!(statistics.routing_counts, alone.routing_counts);
        assert_eq!(statistics.tokens, 6 * 16);
        let (grams, alone_grams) = (
            statistics.group_gram.as_ref().unwrap(),
            alone.group_gram.as_ref().unwrap(),
        );
        for (a, b) in grams.iter().zip(alone_grams) {
            assert_eq!(a, b, "layer {}", layer.index);
        }
        // Their inputs and routing are the runtime model's.
        let (input, routes) = &traces.layers[&layer.index][0];
        let diff = (input - &held_out.inputs).unwrap().abs().unwrap();
        let worst = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            worst < 1e-4,
            "layer {}: inputs differ by {worst}",
            layer.index
        );
        for (expert, (tokens, weights)) in routes.iter().enumerate() {
            assert_eq!(&held_out.routes[expert].tokens, tokens);
            for (a, b) in held_out.routes[expert].weights.iter().zip(weights) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "layer {}: weight {a} vs {b}",
                    layer.index
                );
            }
        }

        assert_eq!(held_out.residual_norms.len(), held_out.tokens());
        assert!(held_out.residual_norms.iter().all(|&n| n > 0.0));
        let layout = layouts[layer.index].clone().unwrap();
        let experts = LayerExperts::new(&checkpoint, &layout);
        let analysis = analyse_layer(&backend, &experts, &statistics).unwrap();
        for &metric in TuneMetric::ALL {
            let layer_data = (&experts, &statistics, &analysis, &held_out);
            differing += usize::from(check_search(layer_data, (allocation, metric), layer.index));
        }
        checked += 1;
    }
    assert_eq!(checked, 3, "every MoE layer of the fixture");
    assert!(differing > 0, "the candidates must differ somewhere");
}
