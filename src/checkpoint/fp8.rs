//! Block-scaled FP8 weights as DeepSeek-V3/R1 and the Qwen3 FP8 releases ship them.
//!
//! A linear weight `W` [out, in] is stored as `F8_E4M3` (`torch.float8_e4m3fn`) next to a
//! companion `{name}_scale_inv` (F32, BF16 in some releases) of shape
//! [⌈out/b₀⌉, ⌈in/b₁⌉], where `[b₀, b₁]` is `config.json`'s
//! `quantization_config.weight_block_size` (`quant_method: "fp8"`, default [128, 128]); the
//! dequantised weight is each FP8 value times the scale of its block. Sources: DeepSeek-V3's
//! `README_WEIGHTS.md` ("FP8 Weight Documentation": `weight_scale_inv`, 128×128 blocks,
//! "(128x128 weight block) * weight_scale_inv", unaligned edges padded) and
//! `inference/fp8_cast_bf16.py` (scale name `f"{weight_name}_scale_inv"`, dequantised with
//! `kernel.weight_dequant`); transformers' `FineGrainedFP8Config` (`weight_block_size` default
//! (128, 128), `modules_to_not_convert`). Norms, embeddings, `lm_head` and router gates are not
//! quantised in those releases, so they carry no scale.
//!
//! Decoding is an exact 256-entry table per format, built from the bit layout (no rounding
//! anywhere): E4M3FN has no infinities and only `S.1111.111` (0x7F/0xFF) is NaN; E5M2 is
//! IEEE-like (exponent 31 is ±Inf or NaN).

use candle_core::DType;
use rayon::prelude::*;

use super::StoredDType;

/// Suffix of the block-scale companion of an FP8 weight (`{weight}_scale_inv`).
pub const SCALE_SUFFIX: &str = "_scale_inv";

/// The block size used when `quantization_config.weight_block_size` is absent.
pub const DEFAULT_BLOCK: [usize; 2] = [128, 128];

/// The name of the block-scale tensor that belongs to FP8 weight `weight`.
pub fn scale_name(weight: &str) -> String {
    format!("{weight}{SCALE_SUFFIX}")
}

/// The FP8 encodings rfid-moe reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Format {
    /// 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, 0x7F/0xFF are NaN.
    E4M3Fn,
    /// 1 sign, 5 exponent (bias 15), 2 mantissa bits; IEEE-style infinities and NaNs.
    E5M2,
}

impl Fp8Format {
    /// The format of a stored dtype, if it is an FP8 one.
    pub fn of(dtype: StoredDType) -> Option<Self> {
        match dtype {
            StoredDType::F8E4M3 => Some(Self::E4M3Fn),
            StoredDType::F8E5M2 => Some(Self::E5M2),
            _ => None,
        }
    }

    /// The exact value of every code, indexed by the byte.
    pub fn table(self) -> &'static [f32; 256] {
        match self {
            Self::E4M3Fn => &E4M3FN_TABLE,
            Self::E5M2 => &E5M2_TABLE,
        }
    }

    /// Whether `code` is NaN or ±Inf in this format.
    pub fn is_non_finite(self, code: u8) -> bool {
        match self {
            Self::E4M3Fn => code & 0x7F == 0x7F,
            Self::E5M2 => code & 0x7C == 0x7C,
        }
    }
}

/// Builds an f32 from sign, unbiased exponent and a mantissa of `mantissa_bits` bits, exactly
/// (every FP8 value, subnormals included, is a normal f32).
const fn f32_from_parts(negative: bool, exponent: i32, mantissa: u32, mantissa_bits: u32) -> f32 {
    let sign = if negative { 0x8000_0000u32 } else { 0 };
    let biased = (exponent + 127) as u32;
    f32::from_bits(sign | (biased << 23) | (mantissa << (23 - mantissa_bits)))
}

/// The value of one code of a sign/exponent/mantissa format with `exponent_bits`,
/// `mantissa_bits` and `bias`; `fn_style` (E4M3FN) gives the all-ones exponent to normal numbers
/// but its all-ones mantissa, which is NaN, instead of IEEE infinities and NaNs.
const fn decode(
    code: u8,
    exponent_bits: u32,
    mantissa_bits: u32,
    bias: i32,
    fn_style: bool,
) -> f32 {
    let negative = code & 0x80 != 0;
    let exponent = ((code as u32) >> mantissa_bits) & ((1 << exponent_bits) - 1);
    let mantissa = (code as u32) & ((1 << mantissa_bits) - 1);
    let all_ones = (1 << exponent_bits) - 1;
    if exponent == all_ones {
        if fn_style {
            // E4M3FN: the top exponent holds normal numbers except S.1111.111, the only NaN.
            if mantissa == (1 << mantissa_bits) - 1 {
                return f32::NAN;
            }
        } else if mantissa == 0 {
            return if negative {
                f32::NEG_INFINITY
            } else {
                f32::INFINITY
            };
        } else {
            return f32::NAN;
        }
    }
    if exponent == 0 {
        if mantissa == 0 {
            return if negative { -0.0 } else { 0.0 };
        }
        // Subnormal: mantissa · 2^(1 − bias − mantissa_bits); normalise the leading one.
        let mut shift = 0;
        while mantissa >> (mantissa_bits - 1 - shift) & 1 == 0 {
            shift += 1;
        }
        let fraction = (mantissa << (shift + 1)) & ((1 << mantissa_bits) - 1);
        return f32_from_parts(
            negative,
            1 - bias - 1 - shift as i32,
            fraction,
            mantissa_bits,
        );
    }
    f32_from_parts(negative, exponent as i32 - bias, mantissa, mantissa_bits)
}

const fn table(exponent_bits: u32, mantissa_bits: u32, bias: i32, fn_style: bool) -> [f32; 256] {
    let mut table = [0.0f32; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = decode(code as u8, exponent_bits, mantissa_bits, bias, fn_style);
        code += 1;
    }
    table
}

/// Every `F8_E4M3` (`float8_e4m3fn`) code's exact value.
pub static E4M3FN_TABLE: [f32; 256] = table(4, 3, 7, true);
/// Every `F8_E5M2` code's exact value.
pub static E5M2_TABLE: [f32; 256] = table(5, 2, 15, false);

/// Parses `quantization_config.weight_block_size` from a model config (the default when there is
/// no `quantization_config` or no block size); `Err` says what is wrong with it.
pub fn block_size(config: &serde_json::Value) -> std::result::Result<[usize; 2], String> {
    let Some(quantization) = config.get("quantization_config") else {
        return Ok(DEFAULT_BLOCK);
    };
    if let Some(method) = quantization.get("quant_method").and_then(|m| m.as_str()) {
        if method != "fp8" {
            return Err(format!(
                "quantization_config.quant_method = `{method}` (expected `fp8`, block-scaled F8_E4M3 weights with `*_scale_inv`)"
            ));
        }
    }
    let Some(block) = quantization.get("weight_block_size") else {
        return Ok(DEFAULT_BLOCK);
    };
    let sizes: Option<Vec<usize>> = block.as_array().and_then(|values| {
        values
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&n| n > 0 && n <= 1 << 20)
                    .map(|n| n as usize)
            })
            .collect()
    });
    match sizes.as_deref() {
        Some(&[rows, cols]) => Ok([rows, cols]),
        _ => Err(format!(
            "quantization_config.weight_block_size = {block} (expected two positive integers, e.g. [128, 128])"
        )),
    }
}

/// The shape the scales of an FP8 tensor of `shape` must have: its leading dimensions, then
/// ⌈rows/b₀⌉ × ⌈cols/b₁⌉ (None for a tensor of fewer than two dimensions).
pub fn scale_shape(shape: &[usize], block: [usize; 2]) -> Option<Vec<usize>> {
    let [.., rows, cols] = shape else {
        return None;
    };
    let mut expected = shape[..shape.len() - 2].to_vec();
    expected.push(rows.div_ceil(block[0]));
    expected.push(cols.div_ceil(block[1]));
    Some(expected)
}

/// Dequantises `codes` (a stack of `[rows, cols]` matrices, row-major) with `scales` (the same
/// stack of `[⌈rows/b₀⌉, ⌈cols/b₁⌉]` block scales): value = table[code] × scale of its block.
/// The caller has checked the lengths against the shapes.
pub fn dequantize(
    format: Fp8Format,
    codes: &[u8],
    [rows, cols]: [usize; 2],
    scales: &[f32],
    block: [usize; 2],
) -> Vec<f32> {
    let table = format.table();
    let scale_cols = cols.div_ceil(block[1]);
    let scale_rows = rows.div_ceil(block[0]);
    let mut out = vec![0f32; codes.len()];
    let fill = |(row, (out_row, code_row)): (usize, (&mut [f32], &[u8]))| {
        let matrix = row / rows;
        let scale_row = matrix * scale_rows + (row % rows) / block[0];
        let scale_line = &scales[scale_row * scale_cols..(scale_row + 1) * scale_cols];
        for (col, (o, &c)) in out_row.iter_mut().zip(code_row).enumerate() {
            *o = table[c as usize] * scale_line[col / block[1]];
        }
    };
    if cols == 0 {
        return out;
    }
    if codes.len() >= 1 << 20 {
        out.par_chunks_mut(cols)
            .zip(codes.par_chunks(cols))
            .enumerate()
            .for_each(fill);
    } else {
        out.chunks_mut(cols)
            .zip(codes.chunks(cols))
            .enumerate()
            .for_each(fill);
    }
    out
}

/// The float dtype an FP8 tensor is handed out in when the caller asks for "as stored".
pub const DEQUANTIZED_STORED: DType = DType::BF16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_decode_exactly() {
        let t = &E4M3FN_TABLE;
        assert_eq!(t[0x00], 0.0);
        assert!(t[0x80] == 0.0 && t[0x80].is_sign_negative());
        assert_eq!(t[0x01], 2f32.powi(-9)); // smallest subnormal
        assert_eq!(t[0x07], 7.0 * 2f32.powi(-9)); // largest subnormal
        assert_eq!(t[0x08], 2f32.powi(-6)); // smallest normal
        assert_eq!(t[0x38], 1.0);
        assert_eq!(t[0x7E], 448.0); // largest finite
        assert_eq!(t[0xFE], -448.0);
        assert!(t[0x7F].is_nan() && t[0xFF].is_nan());
        assert_eq!(t.iter().filter(|v| v.is_nan()).count(), 2);
        let e = &E5M2_TABLE;
        assert_eq!(e[0x3C], 1.0);
        assert_eq!(e[0x7B], 57344.0);
        assert_eq!(e[0x01], 2f32.powi(-16));
        assert!(e[0x7C].is_infinite() && e[0xFC] == f32::NEG_INFINITY);
        assert!(e[0x7D].is_nan());
    }

    #[test]
    fn non_finite_codes_match_the_tables() {
        for format in [Fp8Format::E4M3Fn, Fp8Format::E5M2] {
            for code in 0..=255u8 {
                assert_eq!(
                    format.is_non_finite(code),
                    !format.table()[code as usize].is_finite(),
                    "{format:?} {code:#04x}"
                );
            }
        }
    }

    #[test]
    fn partial_blocks_use_their_own_scale() {
        // 3×5 matrix, blocks of 2×2: scales [2, 3].
        let codes = vec![0x38u8; 15]; // all 1.0
        let scales = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let out = dequantize(Fp8Format::E4M3Fn, &codes, [3, 5], &scales, [2, 2]);
        assert_eq!(&out[0..5], &[1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(&out[10..15], &[4.0, 4.0, 5.0, 5.0, 6.0]);
        assert_eq!(scale_shape(&[3, 5], [2, 2]), Some(vec![2, 3]));
        assert_eq!(scale_shape(&[4, 3, 5], [2, 2]), Some(vec![4, 2, 3]));
    }

    #[test]
    fn block_size_comes_from_the_config() {
        let config = serde_json::json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 32]}});
        assert_eq!(block_size(&config), Ok([16, 32]));
        assert_eq!(block_size(&serde_json::json!({})), Ok(DEFAULT_BLOCK));
        let bad = serde_json::json!({"quantization_config": {"weight_block_size": [0, 32]}});
        assert!(block_size(&bad).unwrap_err().contains("weight_block_size"));
        let other = serde_json::json!({"quantization_config": {"quant_method": "awq"}});
        assert!(block_size(&other).unwrap_err().contains("`awq`"));
    }
}
