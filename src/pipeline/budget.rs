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
//! A pruned expert frees its untargeted matrices at `b_in`, so with pruning and `t < 3` the output
//! is a little smaller than asked as well; with `t = 3` the arithmetic is exact up to int8 scales
//! of narrow factors (up to `4·⌈K/128⌉` bytes per row of rank K), which the report's measured
//! `stored_bytes` shows.

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::options::{BudgetUnit, CompressOptions};
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
    /// Stored bytes per parameter of the targeted matrices in the output (nominal for int8).
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
    let (routed_bytes_before, routed_parameters) = routed_expert_storage(checkpoint);
    if routed_parameters == 0 {
        return Err(Error::InvalidArgument(format!(
            "--budget bytes: {} has no routed expert tensors (names with `.experts.`) to size",
            checkpoint.dir().display()
        )));
    }
    let input_bytes_per_parameter = routed_bytes_before as f64 / routed_parameters as f64;
    let output_bytes_per_parameter = match options.pruning.method.factors() {
        true => factor_bytes_per_parameter(&options.factorization.factor_dtype, checkpoint)?,
        false => input_bytes_per_parameter,
    };
    let byte_ratio = options.allocation.ratio;
    let parameter_ratio = parameter_ratio(
        byte_ratio,
        options.allocation.targeted().len(),
        input_bytes_per_parameter / output_bytes_per_parameter,
    )?;
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

/// The parameter ratio of `targeted` of 3 matrices that removes `byte_ratio` of the routed bytes
/// when a kept parameter costs `1 / shrink` of its input bytes (module docs).
pub fn parameter_ratio(byte_ratio: f64, targeted: usize, shrink: f64) -> Result<f64> {
    if !(0.0..1.0).contains(&byte_ratio) {
        return Err(Error::InvalidArgument(format!(
            "--ratio {byte_ratio} must be in [0, 1)"
        )));
    }
    let t = targeted as f64;
    let untargeted_share = (3.0 - t) / 3.0;
    let targeted_kept = ((1.0 - byte_ratio) * 3.0 - (3.0 - t)) * shrink / t;
    if targeted_kept <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "--ratio {byte_ratio} of the routed experts' bytes cannot be met: the matrices left out \
             of --matrices alone keep {untargeted_share:.3} of them; add down to --matrices or \
             lower --ratio"
        )));
    }
    Ok((1.0 - targeted_kept).max(0.0))
}

/// Stored bytes per parameter of the factors `factor_dtype` writes (int8: codes plus one f32
/// scale per 128 columns).
fn factor_bytes_per_parameter(factor_dtype: &str, checkpoint: &Checkpoint) -> Result<f64> {
    if factor_dtype == super::INT8_FACTORS {
        return Ok(1.0 + DType::F32.size_in_bytes() as f64 / int8::BLOCK as f64);
    }
    Ok(super::factor_dtype(factor_dtype, checkpoint)?.size_in_bytes() as f64)
}

/// The routed experts' stored bytes (quantisation scales included) and parameters (scales
/// excluded) in `checkpoint`.
pub fn routed_expert_storage(checkpoint: &Checkpoint) -> (u64, u64) {
    let (mut bytes, mut parameters) = (0u64, 0u64);
    for name in checkpoint.tensor_names() {
        if !crate::sweep::is_routed_expert_tensor(name) {
            continue;
        }
        let Some((info, _)) = checkpoint.info(name) else {
            continue;
        };
        bytes += (info.data_range.1 - info.data_range.0) as u64;
        if !checkpoint.is_quantisation_scale(name) {
            parameters += info.numel() as u64;
        }
    }
    (bytes, parameters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_alone_meets_a_small_byte_budget() {
        // bf16 in, int8 out: 0.4 of the bytes is met by int8 storage alone.
        let shrink = 2.0 / (1.0 + 4.0 / 128.0);
        assert_eq!(parameter_ratio(0.4, 3, shrink).unwrap(), 0.0);
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
        // down alone cannot remove half of the bytes.
        let error = parameter_ratio(0.5, 1, 1.0).unwrap_err().to_string();
        assert!(error.contains("add down to --matrices"), "{error}");
        assert!(parameter_ratio(1.0, 3, 1.0).is_err());
    }
}
