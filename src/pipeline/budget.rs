//! `--budget bytes`: turns a fraction of the routed experts' stored bytes into the parameter
//! ratio that pruning and allocation enforce, for the storage the run writes.
//!
//! Every routed expert holds three matrices of `p·d` parameters (gate, up, down); `t` of them are
//! targeted (`--matrices`). Stored at `b_in` bytes per parameter in the input and, once
//! compressed, at `b_out` (the factors' storage: 2 for bf16, about 1.03 for int8 with its scales),
//! removing the fraction ρ of the routed bytes keeps `(1−ρ)·3·b_in` per expert and `p·d`, of
//! which the untargeted matrices take `(3−t)·b_in`, so the targeted matrices keep the parameter
//! fraction `1−ρ' = ((1−ρ)·3 − (3−t))·b_in / (t·b_out)`. When that exceeds 1 the storage alone
//! meets the budget and nothing is factored away (ρ' = 0): the output is then smaller than asked.
//! Not counted by the estimate: a `--residual on` run's η (stored in the checkpoint's dtype, a few
//! percent of a group), and FP8 groups kept dense, which are copied as FP8 (about 1 byte per
//! parameter, not int8's 1.03): the output then differs from the budget by that much, and the
//! report's `stored_bytes` says by how much.
//! Routed experts outside the compressed layers (DeepSeek-V3's multi-token-prediction layer) are
//! copied, so the compressed layers give up the whole budget. A pruned expert frees its
//! untargeted matrices at `b_in`, so with pruning and `t < 3` the output
//! is a little smaller than asked as well; with `t = 3` the arithmetic is exact up to the int8
//! scales of narrow factors (`4·⌈K/128⌉` bytes per row of rank K), estimated at the rank every
//! group would get; the report's measured `stored_bytes` shows what was written.

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::options::{BudgetUnit, CompressOptions};
use crate::checkpoint::experts::ExpertMatrix;
use crate::checkpoint::{int8, Checkpoint};
use crate::error::{Error, Result};

/// How a byte budget became a parameter ratio (in the report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ByteBudget {
    /// The fraction of the routed experts' stored bytes asked to be removed (`--ratio`).
    pub byte_ratio: f64,
    /// The fraction of the targeted matrices' parameters removed to meet it.
    pub parameter_ratio: f64,
    /// Stored bytes per routed-expert parameter in the input (scales included).
    pub input_bytes_per_parameter: f64,
    /// Stored bytes per parameter of the targeted matrices in the output (for int8, estimated
    /// with the scales of the ranks the parameter ratio gives).
    pub output_bytes_per_parameter: f64,
    /// The routed experts' stored bytes in the input.
    pub routed_bytes_before: u64,
}

/// The options the stages run with: with `--budget bytes`, `ratio` becomes the parameter ratio
/// of the storage written (and `budget` parameters), alongside how it was derived.
pub fn resolve(
    options: &CompressOptions,
    checkpoint: &Checkpoint,
) -> Result<(CompressOptions, Option<ByteBudget>)> {
    if options.allocation.budget == BudgetUnit::Parameters {
        return Ok((options.clone(), None));
    }
    let spec = crate::models::ArchConfig::from_checkpoint(checkpoint)?.spec();
    let blocks: Vec<String> = spec
        .moe_layers
        .iter()
        .flatten()
        .map(|layout| format!("{}.", layout.block))
        .collect();
    let storage = routed_expert_storage(checkpoint, &blocks);
    let first_layout = spec.moe_layers.iter().flatten().next();
    let (Some(layout), false) = (first_layout, storage.compressed_parameters == 0) else {
        return Err(Error::InvalidArgument(format!(
            "--budget bytes: {} has no routed expert tensors (names with `.experts.`) in its MoE \
             layers to size",
            checkpoint.dir().display()
        )));
    };
    let routed_bytes_before = storage.bytes;
    let input_bytes_per_parameter =
        storage.compressed_bytes as f64 / storage.compressed_parameters as f64;
    let byte_ratio = options.allocation.ratio;
    // Routed experts outside the compressed layers (DeepSeek-V3's multi-token-prediction layer)
    // are copied: the compressed layers give up the whole budget.
    let kept_of_compressed = ((1.0 - byte_ratio) * storage.bytes as f64
        - (storage.bytes - storage.compressed_bytes) as f64)
        / storage.compressed_bytes as f64;
    let compressed_byte_ratio = 1.0 - kept_of_compressed;
    if !(0.0..1.0).contains(&byte_ratio) || kept_of_compressed <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "--ratio {byte_ratio} of the routed experts' bytes cannot be met: it must be in [0, 1), \
             and the routed experts outside the compressed layers keep {} of their {} bytes",
            storage.bytes - storage.compressed_bytes,
            storage.bytes
        )));
    }
    let targeted = options.allocation.targeted();
    let storage = match options.pruning.method.factors() {
        false => FactorStorage::Plain(input_bytes_per_parameter),
        true if options.factorization.factor_dtype == super::INT8_FACTORS => FactorStorage::Int8 {
            group: GroupDims {
                experts: options
                    .calibration
                    .group_size
                    .min(layout.num_experts)
                    .max(1),
                intermediate: layout.intermediate_size,
                hidden: layout.hidden_size,
            },
            down: targeted.contains(&ExpertMatrix::Down),
            targeted: targeted.len(),
        },
        true => FactorStorage::Plain(
            super::factor_dtype(&options.factorization.factor_dtype, checkpoint)?.size_in_bytes()
                as f64,
        ),
    };
    // The int8 scales' share depends on the ranks, which depend on the ratio: a fixed point
    // (the scales are a step function of the rank, so it may stop at the iteration cap, with
    // the pair last used).
    let mut output_bytes_per_parameter = storage.bytes_per_parameter(0.0);
    let mut parameter_ratio = 0.0;
    for iteration in 0..32 {
        parameter_ratio = self::parameter_ratio(
            compressed_byte_ratio,
            targeted.len(),
            input_bytes_per_parameter / output_bytes_per_parameter,
        )
        .ok_or_else(|| unreachable_budget(byte_ratio, &targeted))?;
        let next = storage.bytes_per_parameter(parameter_ratio);
        if (next - output_bytes_per_parameter).abs() < 1e-12 || iteration == 31 {
            break;
        }
        output_bytes_per_parameter = next;
    }
    let mut resolved = options.clone();
    resolved.allocation.budget = BudgetUnit::Parameters;
    resolved.allocation.ratio = parameter_ratio;
    let budget = ByteBudget {
        byte_ratio,
        parameter_ratio,
        input_bytes_per_parameter,
        output_bytes_per_parameter,
        routed_bytes_before,
    };
    Ok((resolved, Some(budget)))
}

/// The parameter ratio of `targeted` of 3 matrices that removes `byte_ratio` (in [0, 1)) of the
/// routed bytes when a kept parameter costs `1 / shrink` of its input bytes (module docs); None
/// when the untargeted matrices alone keep more than `1 − byte_ratio`.
pub fn parameter_ratio(byte_ratio: f64, targeted: usize, shrink: f64) -> Option<f64> {
    let t = targeted as f64;
    let targeted_kept = ((1.0 - byte_ratio) * 3.0 - (3.0 - t)) * shrink / t;
    (targeted_kept > 0.0).then(|| (1.0 - targeted_kept).max(0.0))
}

/// `error` of a stage that saw the parameter ratio, with how `--ratio` became it when a byte
/// budget did (its messages name the ratio they saw).
pub fn in_requested_terms(error: Error, budget: Option<&ByteBudget>) -> Error {
    match (error, budget) {
        (Error::InvalidArgument(message), Some(budget)) => Error::InvalidArgument(format!(
            "{message} (here the ratio is the parameter ratio {:.4} that --ratio {} of the routed \
             experts' bytes comes to at {:.3} bytes per stored parameter; --budget parameters \
             gives --ratio that meaning)",
            budget.parameter_ratio, budget.byte_ratio, budget.output_bytes_per_parameter
        )),
        (error, _) => error,
    }
}

/// Why `--ratio byte_ratio` cannot be met with only `targeted` factored.
fn unreachable_budget(byte_ratio: f64, targeted: &[ExpertMatrix]) -> Error {
    let missing: Vec<&str> = ExpertMatrix::ALL
        .iter()
        .filter(|m| !targeted.contains(m))
        .map(|m| m.name())
        .collect();
    Error::InvalidArgument(format!(
        "--ratio {byte_ratio} of the routed experts' bytes cannot be met: the matrices left out \
         of --matrices ({}) alone keep {:.3} of them; add them to --matrices or lower --ratio",
        missing.join(", "),
        missing.len() as f64 / 3.0
    ))
}

/// Stored bytes per int8 parameter of a matrix with `cols` columns (one f32 scale per row and
/// 128 columns).
fn int8_bytes_per_parameter(cols: f64) -> f64 {
    1.0 + DType::F32.size_in_bytes() as f64 * (cols / int8::BLOCK as f64).ceil() / cols
}

/// The shape of one expert group: `experts` members of [intermediate, hidden] matrices.
#[derive(Debug, Clone, Copy)]
struct GroupDims {
    experts: usize,
    intermediate: usize,
    hidden: usize,
}

/// How the targeted matrices are written.
#[derive(Debug, Clone, Copy)]
enum FactorStorage {
    /// A fixed number of bytes per parameter.
    Plain(f64),
    /// int8 factors of groups of `group`'s shape; `targeted` matrices, down among them or not.
    Int8 {
        group: GroupDims,
        down: bool,
        targeted: usize,
    },
}

impl FactorStorage {
    /// Bytes per kept parameter when the fraction `ratio` of the parameters is removed.
    fn bytes_per_parameter(self, ratio: f64) -> f64 {
        match self {
            FactorStorage::Plain(bytes) => bytes,
            FactorStorage::Int8 {
                group,
                down,
                targeted,
            } => {
                let (input_side, output_side) = group.int8_bytes_per_parameter(ratio);
                match down {
                    true => ((targeted - 1) as f64 * input_side + output_side) / targeted as f64,
                    false => input_side,
                }
            }
        }
    }
}

impl GroupDims {
    /// Bytes per kept int8 parameter of an input-side (gate/up) and an output-side (down) group
    /// at the rank every group of this shape gets when `ratio` of the parameters is removed.
    fn int8_bytes_per_parameter(self, ratio: f64) -> (f64, f64) {
        let (k, p, d) = (
            self.experts as f64,
            self.intermediate as f64,
            self.hidden as f64,
        );
        let rank = (1.0 - ratio) * k * p * d / (k * p + d);
        if rank < 1.0 || rank * (k * p + d) >= k * p * d {
            // Kept dense: members [p, d] (gate/up) and [d, p] (down).
            return (int8_bytes_per_parameter(d), int8_bytes_per_parameter(p));
        }
        let per_rank = rank * (d + k * p);
        // gate/up: basis [rank, d] and coefficients [p, rank]; down: basis [d, rank] and
        // coefficients [rank, p].
        let input_side = (rank * d * int8_bytes_per_parameter(d)
            + k * p * rank * int8_bytes_per_parameter(rank))
            / per_rank;
        let output_side = (d * rank * int8_bytes_per_parameter(rank)
            + k * rank * p * int8_bytes_per_parameter(p))
            / per_rank;
        (input_side, output_side)
    }
}

/// The routed experts' stored bytes in a checkpoint: in all, and in (with the parameters of) the
/// MoE layers the pipeline compresses.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoutedStorage {
    /// Bytes of every routed-expert tensor (quantisation scales included).
    pub bytes: u64,
    /// Bytes of those in the compressed MoE layers.
    pub compressed_bytes: u64,
    /// Parameters of those in the compressed MoE layers (scales excluded).
    pub compressed_parameters: u64,
}

/// The routed experts' storage of `checkpoint`, `blocks` being the compressed MoE blocks'
/// name prefixes (`model.layers.3.mlp.`).
pub fn routed_expert_storage(checkpoint: &Checkpoint, blocks: &[String]) -> RoutedStorage {
    let mut storage = RoutedStorage::default();
    for name in checkpoint.tensor_names() {
        if !crate::checkpoint::storage::is_routed_expert_tensor(name) {
            continue;
        }
        let Some((info, _)) = checkpoint.info(name) else {
            continue;
        };
        let bytes = (info.data_range.1 - info.data_range.0) as u64;
        storage.bytes += bytes;
        if blocks.iter().any(|block| name.starts_with(block.as_str())) {
            storage.compressed_bytes += bytes;
            if !checkpoint.is_quantisation_scale(name) {
                storage.compressed_parameters += info.numel() as u64;
            }
        }
    }
    storage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_alone_meets_a_small_byte_budget() {
        // bf16 in, int8 out: 0.4 of the bytes is met by int8 storage alone.
        let shrink = 2.0 / (1.0 + 4.0 / 128.0);
        assert_eq!(parameter_ratio(0.4, 3, shrink), Some(0.0));
        // 0.6 of the bytes: the kept parameters times their bytes give 0.4 of the input bytes.
        let rho = parameter_ratio(0.6, 3, shrink).unwrap();
        assert!(((1.0 - rho) / shrink - 0.4).abs() < 1e-12, "{rho}");
    }

    #[test]
    fn same_storage_with_all_matrices_keeps_the_ratio() {
        for ratio in [0.0, 0.2, 0.4, 0.6, 0.9] {
            let rho = parameter_ratio(ratio, 3, 1.0).unwrap();
            assert!((rho - ratio).abs() < 1e-12, "{ratio} → {rho}");
        }
    }

    #[test]
    fn untargeted_matrices_count_in_the_bytes() {
        // gate and up in bf16: 0.4 of all routed bytes is 0.6 of gate and up.
        let rho = parameter_ratio(0.4, 2, 1.0).unwrap();
        assert!((rho - 0.6).abs() < 1e-12, "{rho}");
        // down alone cannot remove half of the bytes, and the message names what is missing.
        assert_eq!(parameter_ratio(0.5, 1, 1.0), None);
        let error = unreachable_budget(0.5, &[ExpertMatrix::Down]).to_string();
        assert!(error.contains("(gate, up)"), "{error}");
    }
}
