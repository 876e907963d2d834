//! Int8 storage of the compressor's own tensors (`--factor-dtype int8`, docs/FORMAT.md "Int8
//! factors"): a matrix `T` [rows, cols] is stored as `T` in `I8` plus `T_scale` in `F32`
//! [rows, ⌈cols/128⌉]: symmetric blocks of 128 columns of one row, `scale = absmax / 127` (1 for
//! an all-zero block, whose codes are all 0, so that every scale is positive), `code = round(x /
//! scale)` clamped to [−127, 127]. The dequantised value is `code · scale` of its block, computed
//! in f32. A scale that is zero, negative, not finite, or so large that the square of `127 ·
//! scale` overflows f32 is refused at load ([`first_bad_scale`]).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Columns per scale block.
pub const BLOCK: usize = 128;
/// Suffix of a tensor's scales: `T` → `T_scale`.
pub const SCALE_SUFFIX: &str = "_scale";
/// The largest code magnitude (the code range is symmetric: −127 is never paired with 128).
pub const MAX_CODE: f32 = 127.0;
/// The name of this storage in `config.json` → `compression.factor_storage`.
pub const STORAGE_NAME: &str = "int8-row128";

/// The scales' name of int8 tensor `name`.
pub fn scale_name(name: &str) -> String {
    format!("{name}{SCALE_SUFFIX}")
}

/// The scales' shape of an int8 matrix of shape `[rows, cols]`: `[rows, ⌈cols/128⌉]`.
pub fn scale_shape(rows: usize, cols: usize) -> [usize; 2] {
    [rows, cols.div_ceil(BLOCK)]
}

/// A row-major matrix in int8 codes with one f32 scale per row block of [`BLOCK`] columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Matrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows × cols` codes in [−127, 127], row-major.
    pub codes: Vec<i8>,
    /// `rows × ⌈cols/128⌉` scales, row-major.
    pub scales: Vec<f32>,
}

/// Quantises the row-major matrix `values` [rows, cols] (finite values).
pub fn quantise(values: &[f32], rows: usize, cols: usize) -> Int8Matrix {
    assert_eq!(
        values.len(),
        rows * cols,
        "quantise: values are not rows × cols"
    );
    let blocks = cols.div_ceil(BLOCK);
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(rows * blocks);
    for row in values.chunks(cols.max(1)).take(rows) {
        for block in row.chunks(BLOCK) {
            let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = match absmax {
                0.0 => ZERO_BLOCK_SCALE,
                _ => absmax / MAX_CODE,
            };
            scales.push(scale);
            codes.extend(block.iter().map(|&v| code(v, scale)));
        }
    }
    Int8Matrix {
        rows,
        cols,
        codes,
        scales,
    }
}

/// The scale of a block whose values are all zero (any positive scale gives codes of 0).
pub const ZERO_BLOCK_SCALE: f32 = 1.0;

/// The code of `value` in a block of scale `scale`.
fn code(value: f32, scale: f32) -> i8 {
    (value / scale).round().clamp(-MAX_CODE, MAX_CODE) as i8
}

/// The largest scale accepted: `127 · scale` squared stays a finite f32. A weight beyond that
/// overflows the products and norms of any computation in f32 or bf16, so no factor of a working
/// model is quantised to it.
pub const MAX_SCALE: f32 = 1.8e19 / MAX_CODE;

/// The index and value of the first scale that no quantiser of a working model writes: zero,
/// negative, NaN, ±Inf, or above [`MAX_SCALE`].
pub fn first_bad_scale(scales: &[f32]) -> Option<(usize, f32)> {
    scales
        .iter()
        .position(|&s| !(s > 0.0 && s <= MAX_SCALE))
        .map(|i| (i, scales[i]))
}

/// Dequantises `codes` [rows, cols] with their block `scales` [rows, ⌈cols/128⌉] to f32.
pub fn dequantise(codes: &[i8], scales: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let blocks = cols.div_ceil(BLOCK);
    assert_eq!(
        codes.len(),
        rows * cols,
        "dequantise: codes are not rows × cols"
    );
    assert_eq!(
        scales.len(),
        rows * blocks,
        "dequantise: scales do not fit the codes"
    );
    codes
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let (row, col) = (i / cols, i % cols);
            f32::from(c) * scales[row * blocks + col / BLOCK]
        })
        .collect()
}

impl Int8Matrix {
    /// Quantises a 2-D float tensor (any float dtype, any device).
    pub fn from_tensor(tensor: &Tensor) -> Result<Self> {
        let (rows, cols) = tensor.dims2()?;
        let values = tensor
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(quantise(&values, rows, cols))
    }

    /// The codes as a `U8` tensor [rows, cols] holding the `I8` bytes (candle has no int8
    /// dtype; the checkpoint writer stores it as `I8` when told so), and the scales as an `F32`
    /// tensor [rows, ⌈cols/128⌉], on the CPU.
    pub fn to_tensors(&self) -> Result<(Tensor, Tensor)> {
        let bytes: Vec<u8> = self.codes.iter().map(|&c| c as u8).collect();
        let codes = Tensor::from_vec(bytes, (self.rows, self.cols), &Device::Cpu)?;
        let scales = Tensor::from_vec(
            self.scales.clone(),
            scale_shape(self.rows, self.cols).to_vec(),
            &Device::Cpu,
        )?;
        Ok((codes, scales))
    }

    /// The dequantised matrix, row-major f32.
    pub fn dequantise(&self) -> Vec<f32> {
        dequantise(&self.codes, &self.scales, self.rows, self.cols)
    }
}

/// Reinterprets stored `I8` bytes as codes.
pub fn codes_from_bytes(bytes: &[u8]) -> Vec<i8> {
    bytes.iter().map(|&b| b as i8).collect()
}

/// What [`offset_codes`] adds to a code so that it fits a `U8` tensor (candle has no int8
/// dtype): `code + 128` in [1, 255].
pub const CODE_OFFSET: f64 = 128.0;

/// Stored `I8` bytes as offset codes `code + 128` (`byte ^ 0x80`), the form in which the runtime
/// keeps int8 tensors resident in a `U8` tensor.
pub fn offset_codes(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().map(|&b| b ^ 0x80).collect()
}

/// Dequantises offset codes `codes` (`U8` [rows, cols], `code + 128`, see [`offset_codes`]) with
/// their block `scales` (`F32` [rows, ⌈cols/128⌉]) to `dtype`, on the tensors' device: `code ·
/// scale` in f32 (the code is exact in f32), then converted, so the result is bit for bit
/// [`dequantise`]'s converted to `dtype`.
pub fn dequantise_tensor(codes: &Tensor, scales: &Tensor, dtype: DType) -> Result<Tensor> {
    let (rows, cols) = codes.dims2()?;
    let blocks = cols.div_ceil(BLOCK);
    let values = (codes.to_dtype(DType::F32)? - CODE_OFFSET)?;
    let scales = scales.to_dtype(DType::F32)?;
    let product = if cols % BLOCK == 0 || blocks == 1 {
        // Whole blocks (or one short block): each row's blocks side by side.
        values
            .reshape((rows, blocks, cols / blocks))?
            .broadcast_mul(&scales.reshape((rows, blocks, 1))?)?
            .reshape((rows, cols))?
    } else {
        // A short last block: each column's scale gathered per row.
        let block_of: Vec<u32> = (0..cols).map(|c| (c / BLOCK) as u32).collect();
        let block_of = Tensor::from_vec(block_of, cols, codes.device())?;
        (values * scales.index_select(&block_of, 1)?)?
    };
    Ok(product.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dequantise_tensor` of the offset codes equals `dequantise`, bit for bit, for whole,
    /// single short and ragged blocks, in f32 and converted to bf16.
    #[test]
    fn tensor_dequantisation_is_the_scalar_one_bit_for_bit() {
        for (rows, cols) in [(3, 5), (2, 128), (4, 256), (3, 130), (2, 300)] {
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 * (1 + i % 3) as f32)
                .collect();
            let q = quantise(&values, rows, cols);
            let bytes: Vec<u8> = q.codes.iter().map(|&c| c as u8).collect();
            let codes = Tensor::from_vec(offset_codes(&bytes), (rows, cols), &Device::Cpu).unwrap();
            let (_, scales) = q.to_tensors().unwrap();
            let want = Tensor::from_vec(q.dequantise(), (rows, cols), &Device::Cpu).unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let got = dequantise_tensor(&codes, &scales, dtype).unwrap();
                let want = want.to_dtype(dtype).unwrap();
                assert_eq!(got.dims(), &[rows, cols]);
                let as_f32 = |t: &Tensor| -> Vec<u32> {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                assert_eq!(as_f32(&got), as_f32(&want), "[{rows}, {cols}] {dtype:?}");
            }
        }
    }

    #[test]
    fn every_written_scale_is_positive_and_bad_ones_are_found() {
        let mut values = vec![0.0f32; 2 * 130];
        values[129] = -3.0;
        let q = quantise(&values, 2, 130);
        assert_eq!(q.scales, vec![ZERO_BLOCK_SCALE, 3.0 / 127.0, 1.0, 1.0]);
        assert_eq!(q.dequantise(), values);
        assert_eq!(first_bad_scale(&q.scales), None);
        assert!(((MAX_SCALE * MAX_CODE) * (MAX_SCALE * MAX_CODE)).is_finite());
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY, 1e30] {
            let found = first_bad_scale(&[1.0, bad]).map(|(i, _)| i);
            assert_eq!(found, Some(1), "{bad}");
        }
    }

    #[test]
    fn scales_are_per_row_block_and_codes_use_the_full_range() {
        let values: Vec<f32> = (0..2 * 130).map(|i| (i as f32 - 100.0) * 0.5).collect();
        let q = quantise(&values, 2, 130);
        assert_eq!(q.scales.len(), 4);
        assert_eq!(scale_shape(2, 130), [2, 2]);
        // Row 0, block 0 holds −50 … 13.5: absmax 50.
        assert_eq!(q.scales[0], 50.0 / 127.0);
        assert_eq!(q.codes[0], -127);
        // Row 0, block 1 holds columns 128, 129: 14 and 14.5.
        assert_eq!(q.scales[1], 14.5 / 127.0);
        assert_eq!(q.codes[129], 127);
        let back = q.dequantise();
        for (i, (&x, &y)) in values.iter().zip(&back).enumerate() {
            let scale = q.scales[(i / 130) * 2 + (i % 130) / BLOCK];
            assert!(
                (x - y).abs() <= scale * 0.5 * (1.0 + 1e-6),
                "{i}: {x} vs {y}"
            );
        }
    }
}
