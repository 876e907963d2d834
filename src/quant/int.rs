//! rfid-moe's integer groups (`int<bits>-g<group>-<sym|asym>`): each block of `group` columns
//! of a row is stored as its bf16 scale (2 bytes, little-endian), for asymmetric groups a u8
//! zero point, then `group` codes of `bits` bits each, packed least significant bit first.
//! A code `q` stands for `scale · (q − 2^(bits−1))` (symmetric) or `scale · (q − zero)`
//! (asymmetric): compressed-tensors' integer grid, with scales that bf16 holds exactly.

use half::bf16;

use super::Grid;

/// Code widths the format offers.
pub const BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
/// Group lengths the format offers.
pub const GROUPS: [usize; 4] = [32, 64, 128, 256];

/// Clipping ranges tried when fitting a grid, as fractions of the full range: a coarse pass,
/// then the neighbours of its best at a quarter of its spacing.
const COARSE_CLIPS: [f32; 6] = [1.0, 0.92, 0.84, 0.76, 0.68, 0.6];
const FINE_SPACING: f32 = 0.02;
/// Clipping ranges of the quick fit.
const QUICK_CLIPS: [f32; 3] = [1.0, 0.84, 0.68];

/// One integer-group format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntScheme {
    /// Bits per code.
    pub bits: u32,
    /// Columns per group.
    pub group: usize,
    /// Whether codes are centred on zero (no zero point stored).
    pub symmetric: bool,
}

impl IntScheme {
    /// `int4-g128-sym`.
    pub fn name(&self) -> String {
        let kind = match self.symmetric {
            true => "sym",
            false => "asym",
        };
        format!("int{}-g{}-{kind}", self.bits, self.group)
    }

    /// Parses [`Self::name`]'s form (None when `text` is not one of the offered formats).
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("int")?;
        let mut parts = rest.split('-');
        let bits: u32 = parts.next()?.parse().ok()?;
        let group: usize = parts.next()?.strip_prefix('g')?.parse().ok()?;
        let symmetric = match parts.next()? {
            "sym" => true,
            "asym" => false,
            _ => return None,
        };
        if parts.next().is_some() || !BITS.contains(&bits) || !GROUPS.contains(&group) {
            return None;
        }
        Some(Self {
            bits,
            group,
            symmetric,
        })
    }

    /// Bytes of one block: scale, zero point (asymmetric), codes.
    pub fn block_bytes(&self) -> usize {
        2 + usize::from(!self.symmetric) + self.group * self.bits as usize / 8
    }

    fn max_code(&self) -> u8 {
        ((1u32 << self.bits) - 1) as u8
    }

    /// [`IntScheme::fit`] over [`QUICK_CLIPS`] alone: for estimates that are rescaled by
    /// exact fits elsewhere.
    pub fn fit_quick(&self, values: &[f32], importance: Option<&[f32]>) -> Grid {
        let mut best: Option<(f64, Grid)> = None;
        for clip in QUICK_CLIPS {
            for grid in self.candidates(values, clip) {
                let error = grid.weighted_error(values, importance);
                if best.as_ref().is_none_or(|(e, _)| error < *e) {
                    best = Some((error, grid));
                }
            }
        }
        best.map(|(_, g)| g).unwrap_or_else(|| self.grid(0.0, 0))
    }

    /// The grid of one group minimising the importance-weighted rounding error over clipped
    /// ranges (the full range first, so ties keep it).
    pub fn fit(&self, values: &[f32], importance: Option<&[f32]>) -> Grid {
        let mut best: Option<(f64, f32, Grid)> = None;
        let consider = |clip: f32, best: &mut Option<(f64, f32, Grid)>| {
            for grid in self.candidates(values, clip) {
                let error = grid.weighted_error(values, importance);
                if best.as_ref().is_none_or(|(e, _, _)| error < *e) {
                    *best = Some((error, clip, grid));
                }
            }
        };
        for clip in COARSE_CLIPS {
            consider(clip, &mut best);
        }
        if let Some(centre) = best.as_ref().map(|(_, c, _)| *c) {
            for k in [-3.0, -2.0, -1.0, 1.0, 2.0, 3.0] {
                let clip = centre + k * FINE_SPACING;
                if clip > 0.0 && clip <= 1.0 {
                    consider(clip, &mut best);
                }
            }
        }
        best.map(|(_, _, g)| g).unwrap_or_else(|| self.grid(0.0, 0))
    }

    /// The grids of clipping range `clip` (a fraction of the block's range).
    fn candidates(&self, values: &[f32], clip: f32) -> Vec<Grid> {
        let (lo, hi) = values
            .iter()
            .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let half = (1u32 << (self.bits - 1)) as f32;
        if self.symmetric {
            let centre = half as u8;
            let absmax = lo.abs().max(hi) * clip;
            // The negative end reaches −half·scale, the positive end only (half − 1)·scale: try
            // the scale that fits the block's larger side at each end.
            [absmax / half, absmax / (half - 1.0).max(1.0)]
                .into_iter()
                .map(|s| self.grid(s, centre))
                .collect()
        } else {
            let (lo, hi) = (lo * clip, hi * clip);
            let scale = (hi - lo) / self.max_code() as f32;
            let scale = bf16::from_f32(scale).to_f32();
            if scale <= 0.0 || !scale.is_finite() {
                return vec![self.grid(0.0, 0)];
            }
            let zero = (-lo / scale).round().clamp(0.0, self.max_code() as f32) as u8;
            vec![self.grid(scale, zero)]
        }
    }

    /// The grid of scale `scale` (rounded to bf16) and zero point `zero`.
    fn grid(&self, scale: f32, zero: u8) -> Grid {
        let scale = bf16::from_f32(scale);
        let step = match scale.to_f32().is_finite() {
            true => scale.to_f32(),
            false => 0.0,
        };
        let scale = bf16::from_f32(step);
        let mut encoded = scale.to_le_bytes().to_vec();
        if !self.symmetric {
            encoded.push(zero);
        }
        Grid {
            sub_columns: self.group,
            steps: vec![step],
            biases: vec![zero as f32],
            offsets: vec![0.0],
            max_code: self.max_code(),
            encoded,
        }
    }

    /// Writes one row's blocks.
    pub fn pack_row(&self, grids: &[Grid], codes: &[u8], out: &mut Vec<u8>) {
        let bits = self.bits as usize;
        for (grid, block) in grids.iter().zip(codes.chunks(self.group)) {
            out.extend_from_slice(&grid.encoded);
            let start = out.len();
            out.resize(start + self.group * bits / 8, 0);
            let packed = &mut out[start..];
            for (i, &code) in block.iter().enumerate() {
                let bit = i * bits;
                let word = (code as u32) << (bit % 8);
                packed[bit / 8] |= word as u8;
                if bit % 8 + bits > 8 {
                    packed[bit / 8 + 1] |= (word >> 8) as u8;
                }
            }
        }
    }

    /// Reads one row's blocks into `out`.
    pub fn dequantise_row(&self, bytes: &[u8], out: &mut [f32]) {
        let bits = self.bits as usize;
        let mask = self.max_code() as u32;
        let centre = (1u32 << (self.bits - 1)) as f32;
        for (block, values) in bytes
            .chunks(self.block_bytes())
            .zip(out.chunks_mut(self.group))
        {
            let step = bf16::from_le_bytes([block[0], block[1]]).to_f32();
            let (bias, packed) = match self.symmetric {
                true => (centre, &block[2..]),
                false => (block[2] as f32, &block[3..]),
            };
            for (i, value) in values.iter_mut().enumerate() {
                let bit = i * bits;
                let mut word = packed[bit / 8] as u32;
                if bit % 8 + bits > 8 {
                    word |= (packed[bit / 8 + 1] as u32) << 8;
                }
                let code = (word >> (bit % 8)) & mask;
                *value = step * (code as f32 - bias) + 0.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Scheme;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32 - 0.5) * 0.2
            })
            .collect()
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for bits in BITS {
            for group in GROUPS {
                for symmetric in [true, false] {
                    let s = IntScheme {
                        bits,
                        group,
                        symmetric,
                    };
                    assert_eq!(IntScheme::parse(&s.name()), Some(s));
                }
            }
        }
        for bad in [
            "int7-g128-sym",
            "int4-g100-sym",
            "int4-g128",
            "int4-g128-sym-x",
            "q4",
        ] {
            assert_eq!(IntScheme::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn packed_rows_read_back_as_the_grid_values() {
        for bits in BITS {
            for symmetric in [true, false] {
                let scheme = Scheme::Int(IntScheme {
                    bits,
                    group: 32,
                    symmetric,
                });
                let (rows, cols) = (3, 96);
                let w = values(rows * cols, bits);
                let bytes = scheme.quantise_nearest(&w, cols, None).unwrap();
                assert_eq!(bytes.len() as u64, scheme.stored_bytes(rows, cols));
                let back = scheme.dequantise(&bytes, cols).unwrap();
                for (r, (row, back)) in w.chunks(cols).zip(back.chunks(cols)).enumerate() {
                    for (b, (block, back)) in row.chunks(32).zip(back.chunks(32)).enumerate() {
                        let grid = scheme.fit(block, None);
                        for (c, (&v, &q)) in block.iter().zip(back).enumerate() {
                            assert_eq!(grid.round(c, v).1, q, "{scheme} row {r} block {b} col {c}");
                        }
                    }
                }
                // The rounding error is at most half a step (plus clipping, which the fit only
                // accepts when it lowers the total).
                let err: f64 = w
                    .iter()
                    .zip(&back)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let energy: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum();
                let levels = (1u64 << bits) as f64;
                assert!(
                    err / energy < 4.0 / (levels * levels),
                    "{scheme}: {}",
                    err / energy
                );
            }
        }
    }

    #[test]
    fn scales_are_bf16_and_zero_blocks_stay_zero() {
        let scheme = Scheme::Int(IntScheme {
            bits: 4,
            group: 32,
            symmetric: true,
        });
        let zeros = vec![0f32; 64];
        let bytes = scheme.quantise_nearest(&zeros, 64, None).unwrap();
        assert!(scheme
            .dequantise(&bytes, 64)
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
        let grid = scheme.fit(&values(32, 9), None);
        assert_eq!(bf16::from_f32(grid.steps[0]).to_f32(), grid.steps[0]);
    }

    #[test]
    fn importance_moves_the_error_to_unimportant_columns() {
        let scheme = IntScheme {
            bits: 2,
            group: 32,
            symmetric: false,
        };
        let w = values(32, 4);
        let mut importance = vec![1f32; 32];
        importance[..4].iter_mut().for_each(|x| *x = 1000.0);
        let plain = scheme.fit(&w, None);
        let weighted = scheme.fit(&w, Some(&importance));
        let err = |g: &Grid| g.weighted_error(&w, Some(&importance));
        assert!(err(&weighted) <= err(&plain));
    }
}
