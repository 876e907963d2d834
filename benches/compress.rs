//! Compression throughput on a synthetic MoE layer at real shapes (experts of 768×2048, as in
//! Qwen3-30B-A3B): expert matrices factored per second and peak memory, for each factoriser.
//! Run with `cargo bench --bench compress [-- EXPERTS [BASIS_STEPS]]`; EXPERTS defaults to 8
//! (two groups of four; a full 128-expert layer takes 16× as long), BASIS_STEPS to 5.

use std::time::Instant;

use faer::Mat;
use rfid_moe::linalg::CpuBackend;
use rfid_moe::linalg::{stack_rows, whitening_factor};
use rfid_moe::pipeline::methods::lowrank::allocate::{
    allocate_ranks, budget_for_ratio, GroupShape,
};
use rfid_moe::pipeline::methods::lowrank::factor::{BasisFactorizer, Factorizer, SvdFactorizer};

const P: usize = 768;
const D: usize = 2048;
const GROUP: usize = 4;

fn random_matrix(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
    let mut state = seed;
    Mat::from_fn(rows, cols, |_, _| {
        state = rfid_moe::rng::splitmix64(state);
        (state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    })
}

fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let experts = args.first().copied().unwrap_or(8);
    let basis_steps = args.get(1).copied().unwrap_or(5);
    let groups = experts.div_ceil(GROUP);
    println!(
        "synthetic layer: {experts} experts of {P}×{D}, groups of {GROUP}, ratio 0.4, {} threads",
        rayon::current_num_threads()
    );
    let stacked: Vec<Mat<f64>> = (0..groups)
        .map(|g| {
            let blocks: Vec<Mat<f64>> = (0..GROUP)
                .map(|i| random_matrix(P, D, (g * GROUP + i) as u64))
                .collect();
            stack_rows(&blocks).expect("same widths")
        })
        .collect();
    let shapes: Vec<GroupShape> = (0..groups)
        .map(|_| GroupShape {
            experts: GROUP,
            rows_per_expert: P,
            cols: D,
        })
        .collect();
    let scores = vec![1.0; groups];
    let ranks = allocate_ranks(&shapes, &scores, budget_for_ratio(&shapes, 0.4), &[], false)
        .expect("budget");
    let inputs = random_matrix(4096, D, 99);
    let gram = inputs.transpose() * &inputs;
    let whitening = whitening_factor(&gram, 1e-4).expect("positive definite");
    let factorizers: Vec<(&str, Box<dyn Factorizer<CpuBackend>>, bool)> = vec![
        ("svd", Box::new(SvdFactorizer), false),
        ("svd + whiten", Box::new(SvdFactorizer), true),
        (
            "basis (A·SiLU(B), Adam)",
            Box::new(BasisFactorizer {
                steps: basis_steps,
                learning_rate: 0.07,
                patience: basis_steps + 1,
            }),
            false,
        ),
    ];
    for (name, factorizer, whiten) in factorizers {
        let started = Instant::now();
        for (g, w) in stacked.iter().enumerate() {
            factorizer
                .factor(&CpuBackend, w, ranks[g].rank, whiten.then_some(&whitening))
                .expect("factorisation");
        }
        let seconds = started.elapsed().as_secs_f64();
        let extra = if name.starts_with("basis") {
            format!(" ({basis_steps} Adam steps)")
        } else {
            String::new()
        };
        println!(
            "{name:<26} {:>8.2} s for {experts} experts → {:>6.2} expert matrices/s{extra}; peak RSS {} MB",
            seconds,
            experts as f64 / seconds,
            peak_rss_mb().map_or("?".into(), |m| m.to_string())
        );
    }
}
