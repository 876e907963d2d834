//! ggml's block types (STUB: interface only; the codec is being written).

use super::Grid;

/// One of ggml's block types.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlKind {
    /// 8-bit, blocks of 32, f16 scale.
    Q8_0,
    /// 4-bit, blocks of 32, f16 scale, codes centred on 8.
    Q4_0,
    /// 4-bit, blocks of 32, f16 scale and minimum.
    Q4_1,
    /// 5-bit, blocks of 32, f16 scale, codes centred on 16.
    Q5_0,
    /// 5-bit, blocks of 32, f16 scale and minimum.
    Q5_1,
    /// 2-bit K-quant, super-blocks of 256.
    Q2_K,
    /// 3-bit K-quant, super-blocks of 256.
    Q3_K,
    /// 4-bit K-quant, super-blocks of 256.
    Q4_K,
    /// 5-bit K-quant, super-blocks of 256.
    Q5_K,
    /// 6-bit K-quant, super-blocks of 256.
    Q6_K,
}

impl GgmlKind {
    /// Every kind.
    pub const ALL: [GgmlKind; 10] = [
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    /// ggml's lower-case name (`q4_k`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q2_K => "q2_k",
            Self::Q3_K => "q3_k",
            Self::Q4_K => "q4_k",
            Self::Q5_K => "q5_k",
            Self::Q6_K => "q6_k",
        }
    }

    /// Parses [`Self::name`] (case-insensitive).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(text))
    }

    /// Nominal code bits.
    pub fn bits(&self) -> u32 {
        match self {
            Self::Q8_0 => 8,
            Self::Q4_0 | Self::Q4_1 | Self::Q4_K => 4,
            Self::Q5_0 | Self::Q5_1 | Self::Q5_K => 5,
            Self::Q2_K => 2,
            Self::Q3_K => 3,
            Self::Q6_K => 6,
        }
    }

    /// Columns per block.
    pub fn block_columns(&self) -> usize {
        match self {
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(&self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// candle's type of the same blocks.
    pub fn to_candle(&self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match self {
            Self::Q8_0 => G::Q8_0,
            Self::Q4_0 => G::Q4_0,
            Self::Q4_1 => G::Q4_1,
            Self::Q5_0 => G::Q5_0,
            Self::Q5_1 => G::Q5_1,
            Self::Q2_K => G::Q2K,
            Self::Q3_K => G::Q3K,
            Self::Q4_K => G::Q4K,
            Self::Q5_K => G::Q5K,
            Self::Q6_K => G::Q6K,
        }
    }

    /// The grid of one block.
    pub fn fit(&self, _values: &[f32], _importance: Option<&[f32]>) -> Grid {
        unimplemented!("ggml codec stub")
    }

    /// Writes one row's blocks.
    pub fn pack_row(&self, _grids: &[Grid], _codes: &[u8], _out: &mut Vec<u8>) {
        unimplemented!("ggml codec stub")
    }

    /// Reads one row's blocks into `out`.
    pub fn dequantise_row(&self, _bytes: &[u8], _out: &mut [f32]) {
        unimplemented!("ggml codec stub")
    }
}
