//! Weight quantisation: the block formats a matrix can be stored in (rfid-moe's integer groups,
//! [`int`], and ggml's block types, [`ggml`]), their codecs, and GPTQ ([`gptq`]).
//!
//! Every format stores a `[rows, cols]` matrix row by row, each row a run of fixed-size blocks
//! of [`Scheme::block_columns`] columns: the tensor on disk is `U8` `[rows, row_bytes]`. A block
//! holds its grid (scales, offsets) and its codes. Quantising is two steps, so that GPTQ can
//! fix a block's grid and then round columns one at a time with error feedback:
//! [`Scheme::fit`] chooses the grid of one block from its values, and [`Grid::round`] maps a
//! value to the nearest point of that grid. [`Scheme::pack_row`] writes a row's blocks and
//! [`Scheme::dequantise_row`] reads them back, giving exactly [`Grid::round`]'s values.

pub mod ggml;
pub mod gptq;
pub mod int;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use ggml::GgmlKind;
pub use int::IntScheme;

/// A block format a matrix can be stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    /// rfid-moe's integer groups: `bits`-bit codes per group of columns with a bf16 scale
    /// (and a zero point when asymmetric).
    Int(IntScheme),
    /// One of ggml's block types, bytes exactly as ggml lays them out.
    Ggml(GgmlKind),
}

impl Scheme {
    /// The name used in options, reports and the compression record (`int4-g128-sym`, `q4_k`).
    pub fn name(&self) -> String {
        match self {
            Self::Int(s) => s.name(),
            Self::Ggml(k) => k.name().to_string(),
        }
    }

    /// Parses [`Self::name`]'s form.
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(kind) = GgmlKind::parse(text) {
            return Ok(Self::Ggml(kind));
        }
        IntScheme::parse(text).map(Self::Int).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown quantisation scheme `{text}`: expected int<bits>-g<group>-<sym|asym> \
                 (bits 2, 3, 4, 5, 6 or 8; group 32, 64 or 128) or one of {}",
                GgmlKind::ALL
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Code bits per weight (the nominal width, grids excluded).
    pub fn bits(&self) -> u32 {
        match self {
            Self::Int(s) => s.bits,
            Self::Ggml(k) => k.bits(),
        }
    }

    /// Columns per block.
    pub fn block_columns(&self) -> usize {
        match self {
            Self::Int(s) => s.group,
            Self::Ggml(k) => k.block_columns(),
        }
    }

    /// Bytes per block, grid included.
    pub fn block_bytes(&self) -> usize {
        match self {
            Self::Int(s) => s.block_bytes(),
            Self::Ggml(k) => k.block_bytes(),
        }
    }

    /// Whether a matrix with `cols` columns can be stored (whole blocks only).
    pub fn supports(&self, cols: usize) -> bool {
        cols > 0 && cols.is_multiple_of(self.block_columns())
    }

    /// Bytes of one stored row of `cols` columns.
    pub fn row_bytes(&self, cols: usize) -> usize {
        cols / self.block_columns() * self.block_bytes()
    }

    /// Bytes of a stored `[rows, cols]` matrix.
    pub fn stored_bytes(&self, rows: usize, cols: usize) -> u64 {
        (rows * self.row_bytes(cols)) as u64
    }

    /// Stored bits per weight, grids included.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.block_bytes() as f64 / self.block_columns() as f64
    }

    /// Chooses the grid of one block from its values (`block_columns` of them) and, when
    /// given, each column's importance (the diagonal of the input Gram matrix): the grid that
    /// minimises the importance-weighted squared rounding error among the format's candidates.
    pub fn fit(&self, values: &[f32], importance: Option<&[f32]>) -> Grid {
        match self {
            Self::Int(s) => s.fit(values, importance),
            Self::Ggml(k) => k.fit(values, importance),
        }
    }

    /// The format whose round-to-nearest error stands in for this one's when candidate errors
    /// are only estimated: for ggml's K kinds, whose two-level scale search is costly, integer
    /// groups of their sub-block length and bits (their error is then scaled to the K kind's
    /// own by exact runs on a few experts); every other format itself.
    pub fn estimation_proxy(&self) -> Scheme {
        let int = |bits, group, symmetric| {
            Scheme::Int(IntScheme {
                bits,
                group,
                symmetric,
            })
        };
        match self {
            Self::Ggml(GgmlKind::Q2_K) => int(2, 16, false),
            Self::Ggml(GgmlKind::Q3_K) => int(3, 16, true),
            Self::Ggml(GgmlKind::Q4_K) => int(4, 32, false),
            Self::Ggml(GgmlKind::Q5_K) => int(5, 32, false),
            Self::Ggml(GgmlKind::Q6_K) => int(6, 16, true),
            other => *other,
        }
    }

    /// A grid for estimating this format's rounding error: integer groups' quick fit (fewer
    /// clipping ranges), any other format's full fit.
    pub fn fit_for_estimate(&self, values: &[f32], importance: Option<&[f32]>) -> Grid {
        match self {
            Self::Int(s) => s.fit_quick(values, importance),
            Self::Ggml(k) => k.fit(values, importance),
        }
    }

    /// `Σ gain · (value − rounded value)²` of one block rounded to the grid
    /// [`Scheme::fit_for_estimate`] chooses for it.
    pub fn estimate_block_loss(
        &self,
        values: &[f32],
        importance: Option<&[f32]>,
        gain: &[f64],
    ) -> f64 {
        let grid = match self {
            Self::Int(s) => {
                // No grid is built: this runs for every block of every format offered.
                let (step, zero) = s.fit_quick_step(values, importance);
                return s.rounding_loss(values, gain, step, zero);
            }
            Self::Ggml(k) => k.fit(values, importance),
        };
        values
            .iter()
            .zip(gain)
            .enumerate()
            .map(|(i, (&v, g))| {
                let e = v as f64 - grid.round(i, v).1 as f64;
                e * e * g
            })
            .sum::<f64>()
    }

    /// Writes one row: its blocks' grids (one per block) and codes (one per column, as
    /// [`Grid::round`] gave them), appended to `out`.
    pub fn pack_row(&self, grids: &[Grid], codes: &[u8], out: &mut Vec<u8>) {
        match self {
            Self::Int(s) => s.pack_row(grids, codes, out),
            Self::Ggml(k) => k.pack_row(grids, codes, out),
        }
    }

    /// Reads one stored row (`row_bytes(out.len())` bytes) into `out`, its dequantised values.
    pub fn dequantise_row(&self, bytes: &[u8], out: &mut [f32]) -> Result<()> {
        if bytes.len() != self.row_bytes(out.len()) || !self.supports(out.len()) {
            return Err(Error::InvalidArgument(format!(
                "{}: a row of {} columns takes {} bytes, got {}",
                self.name(),
                out.len(),
                self.row_bytes(out.len()),
                bytes.len()
            )));
        }
        match self {
            Self::Int(s) => s.dequantise_row(bytes, out),
            Self::Ggml(k) => k.dequantise_row(bytes, out),
        }
        Ok(())
    }

    /// Quantises a row-major `[rows, cols]` matrix by rounding to nearest on fitted grids.
    pub fn quantise_nearest(
        &self,
        values: &[f32],
        cols: usize,
        importance: Option<&[f32]>,
    ) -> Result<Vec<u8>> {
        if !self.supports(cols) || !values.len().is_multiple_of(cols) {
            return Err(Error::InvalidArgument(format!(
                "{} needs whole blocks of {} columns; the matrix has {} columns",
                self.name(),
                self.block_columns(),
                cols
            )));
        }
        let block = self.block_columns();
        let mut out = Vec::with_capacity(values.len() / cols * self.row_bytes(cols));
        let mut codes = vec![0u8; cols];
        for row in values.chunks(cols) {
            let grids: Vec<Grid> = row
                .chunks(block)
                .enumerate()
                .map(|(b, values)| {
                    let importance = importance.map(|w| &w[b * block..(b + 1) * block]);
                    self.fit(values, importance)
                })
                .collect();
            for (c, &v) in row.iter().enumerate() {
                codes[c] = grids[c / block].round(c % block, v).0;
            }
            self.pack_row(&grids, &codes, &mut out);
        }
        Ok(out)
    }

    /// Dequantises a stored `[rows, cols]` matrix (`rows · row_bytes(cols)` bytes), row-major.
    pub fn dequantise(&self, bytes: &[u8], cols: usize) -> Result<Vec<f32>> {
        let row_bytes = self.row_bytes(cols);
        if row_bytes == 0 || !bytes.len().is_multiple_of(row_bytes) {
            return Err(Error::InvalidArgument(format!(
                "{}: {} bytes are not whole rows of {} columns ({} bytes each)",
                self.name(),
                bytes.len(),
                cols,
                row_bytes
            )));
        }
        let mut out = vec![0f32; bytes.len() / row_bytes * cols];
        for (row, values) in bytes.chunks(row_bytes).zip(out.chunks_mut(cols)) {
            self.dequantise_row(row, values)?;
        }
        Ok(out)
    }
}

/// The code nearest `x` (a position on the code scale), clamped to `0..=max_code`: halves go up.
#[inline]
fn nearest_code(x: f32, max_code: u8) -> u8 {
    // Clamping first keeps the cast exact; `as` truncates, so + 0.5 rounds (NaN gives 0).
    (x.clamp(0.0, max_code as f32) + 0.5) as u8
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for Scheme {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Scheme {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Scheme::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The grid of one block: per sub-block, the step, code bias and offset that map a code to
/// its value (`value = step · (code − bias) + offset`, computed in f32 in that order, which is
/// how every supported format's dequantiser computes it), and the format's own encoding of
/// them for packing.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// Columns per sub-block (the block's length for one-scale formats).
    pub sub_columns: usize,
    /// Per sub-block: the step between adjacent codes.
    pub steps: Vec<f32>,
    /// Per sub-block: the code that stands for the offset (an integer).
    pub biases: Vec<f32>,
    /// Per sub-block: the value of the biased code.
    pub offsets: Vec<f32>,
    /// The largest code.
    pub max_code: u8,
    /// The format's encoding of the grid (scale bits, quantised sub-block scales), for packing.
    pub encoded: Vec<u8>,
}

impl Grid {
    /// The code nearest `value` at column `column` of the block, and the value it stands for.
    pub fn round(&self, column: usize, value: f32) -> (u8, f32) {
        let sub = column / self.sub_columns;
        let (step, bias, offset) = (self.steps[sub], self.biases[sub], self.offsets[sub]);
        let code = match step != 0.0 && step.is_finite() {
            true => nearest_code((value - offset) / step + bias, self.max_code),
            false => bias.clamp(0.0, self.max_code as f32) as u8,
        };
        (code, self.value(column, code))
    }

    /// `Σ importance · (value − grid value)²` of rounding `values` (the block's columns) to
    /// this grid.
    pub fn weighted_error(&self, values: &[f32], importance: Option<&[f32]>) -> f64 {
        let mut total = 0f64;
        for (sub, chunk) in values.chunks(self.sub_columns).enumerate() {
            let (step, bias, offset) = (self.steps[sub], self.biases[sub], self.offsets[sub]);
            let usable = step != 0.0 && step.is_finite();
            let inverse = 1.0 / step;
            let mut sum = 0f32;
            for (i, &v) in chunk.iter().enumerate() {
                let code = match usable {
                    true => nearest_code((v - offset) * inverse + bias, self.max_code),
                    false => bias.clamp(0.0, self.max_code as f32) as u8,
                };
                let d = step * (code as f32 - bias) + offset - v;
                let w = importance.map_or(1.0, |w| w[sub * self.sub_columns + i]);
                sum += w * d * d;
            }
            total += sum as f64;
        }
        total
    }

    /// The distance between neighbouring grid values at column `column` of the block.
    pub fn step(&self, column: usize) -> f32 {
        self.steps[column / self.sub_columns].abs()
    }

    /// The value code `code` stands for at column `column`.
    pub fn value(&self, column: usize, code: u8) -> f32 {
        let sub = column / self.sub_columns;
        self.steps[sub] * (code as f32 - self.biases[sub]) + self.offsets[sub]
    }
}
