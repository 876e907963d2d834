//! Guards on what the tool reports or writes: a NaN or an infinity in logits, a perplexity, a
//! divergence, a factor or a scale is an error that names what holds it, never a printed result.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// The first non-finite element of `tensor` (row-major index and value), or `None` when every
/// element is finite (always `None` for integer tensors).
pub fn first_non_finite(tensor: &Tensor) -> Result<Option<(usize, f64)>> {
    if !tensor.dtype().is_float() || tensor.elem_count() == 0 {
        return Ok(None);
    }
    // One reduction on the tensor's device: NaN and ±Inf reach the sum, so a finite sum clears
    // the whole tensor; only a non-finite one needs the element-wise search.
    if sum_is_finite(tensor)? {
        return Ok(None);
    }
    let values = tensor
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(values.into_iter().enumerate().find(|(_, v)| !v.is_finite()))
}

/// Whether the sum of every element of the float tensor `tensor` is finite (a tensor whose sum
/// is finite has no NaN or infinite element).
pub fn sum_is_finite(tensor: &Tensor) -> Result<bool> {
    Ok(match tensor.dtype() {
        DType::F64 => tensor.sum_all()?.to_scalar::<f64>()?.is_finite(),
        _ => tensor
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?
            .is_finite(),
    })
}

/// Refuses a tensor holding NaN or ±Inf; `what` describes it (e.g. "tensor `x` for shard
/// layer-00001.safetensors") and is only evaluated on failure.
pub fn check_tensor(tensor: &Tensor, what: impl FnOnce() -> String) -> Result<()> {
    match first_non_finite(tensor)? {
        None => Ok(()),
        Some((index, value)) => Err(Error::Numerical(format!(
            "{} holds {value} at element {index} (expected finite values)",
            what()
        ))),
    }
}

/// Returns `value` when it is finite; otherwise an error naming `what` it is (e.g. "perplexity of
/// test.txt").
pub fn check_value(value: f64, what: impl FnOnce() -> String) -> Result<f64> {
    match value.is_finite() {
        true => Ok(value),
        false => Err(Error::Numerical(format!(
            "{} is {value} (expected a finite number)",
            what()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_first_non_finite_element_is_found_in_every_float_dtype() {
        let values = [1.0f32, -2.0, f32::NAN, f32::INFINITY];
        let tensor = Tensor::new(&values, &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let found = first_non_finite(&tensor.to_dtype(dtype).unwrap()).unwrap();
            assert_eq!(found.map(|(i, _)| i), Some(2), "{dtype:?}");
        }
        let finite = Tensor::new(&[1.0f32, 3.0e38, 3.0e38], &Device::Cpu).unwrap();
        assert_eq!(
            first_non_finite(&finite).unwrap(),
            None,
            "an overflowing sum"
        );
        let ids = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        assert_eq!(first_non_finite(&ids).unwrap(), None);
    }

    #[test]
    fn non_finite_values_are_named() {
        let message = check_value(f64::NAN, || "perplexity of test.txt".into())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("perplexity of test.txt is NaN"),
            "{message}"
        );
        assert_eq!(check_value(2.5, String::new).unwrap(), 2.5);
    }
}
