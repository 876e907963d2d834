//! rfid-moe's integer groups (`int<bits>-g<group>-<sym|asym>`): each block of `group` columns
//! of a row is stored as its bf16 scale (2 bytes, little-endian), for asymmetric groups a u8
//! zero point, then `group` codes of `bits` bits each, packed least significant bit first.
//! A code `q` stands for `scale · (q − 2^(bits−1))` (symmetric) or `scale · (q − zero)`
//! (asymmetric): compressed-tensors' integer grid, with scales that bf16 holds exactly.

use half::bf16;

use super::{nearest_code, Grid};

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
        let (step, zero) = self.fit_quick_step(values, importance);
        self.grid(step, zero)
    }

    /// The step and zero code of [`IntScheme::fit_quick`]'s grid.
    pub fn fit_quick_step(&self, values: &[f32], importance: Option<&[f32]>) -> (f32, u8) {
        let range = block_range(values);
        let mut candidates = [Candidate::ZERO; 2 * QUICK_CLIPS.len()];
        let mut count = 0;
        for clip in QUICK_CLIPS {
            count += self.clip_candidates(range, clip, &mut candidates[count..]);
        }
        let errors = self.candidate_errors(values, importance, &candidates[..count]);
        let best = first_smallest(&errors[..count]);
        (candidates[best].step, candidates[best].zero)
    }

    /// The grid of one group minimising the importance-weighted rounding error over clipped
    /// ranges (the full range first, so ties keep it).
    pub fn fit(&self, values: &[f32], importance: Option<&[f32]>) -> Grid {
        let range = block_range(values);
        // Every candidate of the coarse pass, then of the fine pass around its best, scored in
        // one sweep per pass: the choice is the first smallest error in that order.
        let mut candidates = [Candidate::ZERO; 2 * COARSE_CLIPS.len()];
        let mut clips = [0f32; 2 * COARSE_CLIPS.len()];
        let mut count = 0;
        for clip in COARSE_CLIPS {
            let added = self.clip_candidates(range, clip, &mut candidates[count..]);
            clips[count..count + added].fill(clip);
            count += added;
        }
        let errors = self.candidate_errors(values, importance, &candidates[..count]);
        let coarse = first_smallest(&errors[..count]);
        let (mut best, mut best_error) = (candidates[coarse], errors[coarse]);
        let centre = clips[coarse];
        count = 0;
        for k in [-3.0, -2.0, -1.0, 1.0, 2.0, 3.0] {
            let clip = centre + k * FINE_SPACING;
            if clip > 0.0 && clip <= 1.0 {
                count += self.clip_candidates(range, clip, &mut candidates[count..]);
            }
        }
        let errors = self.candidate_errors(values, importance, &candidates[..count]);
        for (candidate, &error) in candidates[..count].iter().zip(&errors[..count]) {
            if error < best_error {
                (best, best_error) = (*candidate, error);
            }
        }
        self.grid(best.step, best.zero)
    }

    /// Writes the candidates of clipping range `clip` (a fraction of the block's range
    /// `range`) to the front of `out`; returns how many.
    fn clip_candidates(&self, (lo, hi): (f32, f32), clip: f32, out: &mut [Candidate]) -> usize {
        let half = (1u32 << (self.bits - 1)) as f32;
        if self.symmetric {
            let centre = half as u8;
            let absmax = lo.abs().max(hi) * clip;
            // The negative end reaches −half·scale, the positive end only (half − 1)·scale: try
            // the scale that fits the block's larger side at each end.
            out[0] = Candidate::new(absmax / half, centre);
            out[1] = Candidate::new(absmax / (half - 1.0).max(1.0), centre);
            2
        } else {
            let (lo, hi) = (lo * clip, hi * clip);
            let scale = (hi - lo) / self.max_code() as f32;
            let scale = bf16::from_f32(scale).to_f32();
            out[0] = match scale <= 0.0 || !scale.is_finite() {
                true => Candidate::ZERO,
                false => {
                    let zero = (-lo / scale).round().clamp(0.0, self.max_code() as f32) as u8;
                    Candidate::new(scale, zero)
                }
            };
            1
        }
    }

    /// Per candidate, [`Grid::weighted_error`] of its grid on `values`, all in one sweep.
    fn candidate_errors(
        &self,
        values: &[f32],
        importance: Option<&[f32]>,
        candidates: &[Candidate],
    ) -> [f64; MAX_CANDIDATES] {
        let max_code = self.max_code();
        let mut errors = [0f64; MAX_CANDIDATES];
        // Three candidates per sweep: independent sums that the core overlaps, each summed in
        // column order as `Grid::weighted_error` sums it.
        for (group, out) in candidates.chunks(3).zip(errors.chunks_mut(3)) {
            let mut store = |sums: &[f32]| {
                for (o, s) in out.iter_mut().zip(sums) {
                    *o = *s as f64;
                }
            };
            match group {
                [a] => store(&sweep(values, importance, [*a], max_code)),
                [a, b] => store(&sweep(values, importance, [*a, *b], max_code)),
                [a, b, c] => store(&sweep(values, importance, [*a, *b, *c], max_code)),
                _ => {}
            }
        }
        errors
    }

    /// Per lane (one row each), `Σ gain · (value − rounded value)²` of one block of
    /// [`LANES`] rows rounded to [`IntScheme::fit_quick`]'s grid, exactly as
    /// [`IntScheme::fit_quick_step`] and [`IntScheme::rounding_loss`] give it row by row:
    /// `values[i]` holds column `i` of the block of every row.
    pub fn quick_loss_lanes(
        &self,
        values: &[[f32; LANES]],
        importance: &[f32],
        gain: &[f64],
    ) -> [f64; LANES] {
        let mut ranges = [(0f32, 0f32); LANES];
        for v in values {
            for (r, &v) in ranges.iter_mut().zip(v) {
                *r = (r.0.min(v), r.1.max(v));
            }
        }
        let mut candidates = [[Candidate::ZERO; LANES]; 2 * QUICK_CLIPS.len()];
        let mut count = 0;
        for clip in QUICK_CLIPS {
            let mut added = 0;
            for (l, &range) in ranges.iter().enumerate() {
                let mut out = [Candidate::ZERO; 2];
                added = self.clip_candidates(range, clip, &mut out);
                for (k, c) in out[..added].iter().enumerate() {
                    candidates[count + k][l] = *c;
                }
            }
            count += added;
        }
        let max_code = self.max_code();
        let mut errors = [[0f32; LANES]; 2 * QUICK_CLIPS.len()];
        for (group, out) in candidates[..count].chunks(3).zip(errors.chunks_mut(3)) {
            match group {
                [a] => out[..1].copy_from_slice(&sweep_lanes(values, importance, [*a], max_code)),
                [a, b] => {
                    out[..2].copy_from_slice(&sweep_lanes(values, importance, [*a, *b], max_code))
                }
                [a, b, c] => out[..3].copy_from_slice(&sweep_lanes(
                    values,
                    importance,
                    [*a, *b, *c],
                    max_code,
                )),
                _ => {}
            }
        }
        // Per lane the first smallest error, as `first_smallest` picks it.
        let mut best = candidates[0];
        let mut best_error = errors[0];
        for k in 1..count {
            for l in 0..LANES {
                if (errors[k][l] as f64) < best_error[l] as f64 {
                    (best[l], best_error[l]) = (candidates[k][l], errors[k][l]);
                }
            }
        }
        rounding_loss_lanes(values, gain, best, max_code)
    }

    /// `Σ gain · (value − rounded value)²` over `values` rounded to the grid of step `step`
    /// and zero code `zero`, each value rounded as [`Grid::round`] rounds it.
    pub fn rounding_loss(&self, values: &[f32], gain: &[f64], step: f32, zero: u8) -> f64 {
        let max_code = self.max_code();
        let bias = zero as f32;
        let usable = step != 0.0 && step.is_finite();
        let fixed = bias.clamp(0.0, max_code as f32) as u8;
        values
            .iter()
            .zip(gain)
            .map(|(&v, g)| {
                let code = match usable {
                    true => nearest_code(v / step + bias, max_code),
                    false => fixed,
                };
                let e = v as f64 - (step * (code as f32 - bias)) as f64;
                e * e * g
            })
            .sum::<f64>()
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

/// The most candidates one pass of [`IntScheme::fit`] scores.
const MAX_CANDIDATES: usize = 2 * COARSE_CLIPS.len();

/// One candidate grid of a group: its step (a bf16 value, or zero) and zero code.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    step: f32,
    zero: u8,
}

impl Candidate {
    /// The degenerate grid (every value rounds to zero).
    const ZERO: Candidate = Candidate { step: 0.0, zero: 0 };

    /// Scale `scale` rounded to bf16 as [`IntScheme::grid`] rounds it.
    fn new(scale: f32, zero: u8) -> Self {
        let step = bf16::from_f32(scale).to_f32();
        let step = if step.is_finite() { step } else { 0.0 };
        Self { step, zero }
    }
}

/// `(min(0, values), max(0, values))`.
fn block_range(values: &[f32]) -> (f32, f32) {
    values
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// The index of the first smallest of `errors`.
fn first_smallest(errors: &[f64]) -> usize {
    let mut best = 0;
    for (i, &e) in errors.iter().enumerate() {
        if e < errors[best] {
            best = i;
        }
    }
    best
}

/// Rows handled together by [`IntScheme::quick_loss_lanes`], one per lane.
pub const LANES: usize = 8;

/// [`sweep`] for one block of [`LANES`] rows at once, each lane's sums in column order.
///
/// Branch-free so that the lanes vectorise: a lane whose step is zero (steps are always finite)
/// gets a zero inverse, which rounds every value to its zero code's clamp, the code
/// `nearest_code` falls back to; `max(0).min(max)` sends NaN to code 0 as the cast does.
#[inline]
fn sweep_lanes<const K: usize>(
    values: &[[f32; LANES]],
    importance: &[f32],
    candidates: [[Candidate; LANES]; K],
    max_code: u8,
) -> [[f32; LANES]; K] {
    let step = candidates.map(|c| c.map(|c| c.step));
    let inverse = step.map(|s| s.map(|s| if s != 0.0 { 1.0 / s } else { 0.0 }));
    let bias = candidates.map(|c| c.map(|c| c.zero as f32));
    let max = max_code as f32;
    let mut sums = [[0f32; LANES]; K];
    for (v, &w) in values.iter().zip(importance) {
        for k in 0..K {
            for l in 0..LANES {
                let x = (v[l] * inverse[k][l] + bias[k][l]).max(0.0).min(max);
                let code = ((x + 0.5) as i32) as f32;
                let d = step[k][l] * (code - bias[k][l]) - v[l];
                sums[k][l] += w * d * d;
            }
        }
    }
    sums
}

/// Per lane, [`IntScheme::rounding_loss`] of one block of [`LANES`] rows on grid `grids`
/// (branch-free as [`sweep_lanes`]: a zero step divides by infinity instead).
#[inline]
fn rounding_loss_lanes(
    values: &[[f32; LANES]],
    gain: &[f64],
    grids: [Candidate; LANES],
    max_code: u8,
) -> [f64; LANES] {
    let step = grids.map(|c| c.step);
    let divisor = step.map(|s| if s != 0.0 { s } else { f32::INFINITY });
    let bias = grids.map(|c| c.zero as f32);
    let max = max_code as f32;
    let mut sums = [0f64; LANES];
    for (v, &g) in values.iter().zip(gain) {
        for l in 0..LANES {
            let x = (v[l] / divisor[l] + bias[l]).max(0.0).min(max);
            let code = ((x + 0.5) as i32) as f32;
            let e = v[l] as f64 - (step[l] * (code - bias[l])) as f64;
            sums[l] += e * e * g;
        }
    }
    sums
}

/// The importance-weighted squared rounding errors of `K` candidate grids on `values`, each
/// computed exactly as [`Grid::weighted_error`] computes it for a one-scale grid.
#[inline]
fn sweep<const K: usize>(
    values: &[f32],
    importance: Option<&[f32]>,
    candidates: [Candidate; K],
    max_code: u8,
) -> [f32; K] {
    match importance {
        Some(w) => sweep_weighted(values, w.iter().copied(), candidates, max_code),
        None => sweep_weighted(values, std::iter::repeat(1.0), candidates, max_code),
    }
}

#[inline]
fn sweep_weighted<const K: usize>(
    values: &[f32],
    importance: impl Iterator<Item = f32>,
    candidates: [Candidate; K],
    max_code: u8,
) -> [f32; K] {
    let usable = candidates.map(|c| c.step != 0.0 && c.step.is_finite());
    let inverse = candidates.map(|c| 1.0 / c.step);
    let bias = candidates.map(|c| c.zero as f32);
    let fixed = bias.map(|b| b.clamp(0.0, max_code as f32) as u8);
    let mut sums = [0f32; K];
    for (&v, w) in values.iter().zip(importance) {
        for k in 0..K {
            let code = match usable[k] {
                true => nearest_code(v * inverse[k] + bias[k], max_code),
                false => fixed[k],
            };
            let d = candidates[k].step * (code as f32 - bias[k]) - v;
            sums[k] += w * d * d;
        }
    }
    sums
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

    /// The grids of clipping range `clip` built one by one, as the search is specified.
    fn reference_candidates(s: &IntScheme, values: &[f32], clip: f32) -> Vec<Grid> {
        let mut out = [Candidate::ZERO; 2];
        let n = s.clip_candidates(block_range(values), clip, &mut out);
        out[..n].iter().map(|c| s.grid(c.step, c.zero)).collect()
    }

    /// The first grid of smallest `Grid::weighted_error` over `clips` in order.
    fn reference_best(s: &IntScheme, values: &[f32], imp: Option<&[f32]>, clips: &[f32]) -> Grid {
        let mut best: Option<(f64, Grid)> = None;
        for &clip in clips {
            for grid in reference_candidates(s, values, clip) {
                let error = grid.weighted_error(values, imp);
                if best.as_ref().is_none_or(|(e, _)| error < *e) {
                    best = Some((error, grid));
                }
            }
        }
        best.map(|(_, g)| g).unwrap()
    }

    #[test]
    fn one_sweep_searches_choose_the_first_smallest_grid_error() {
        for bits in [2, 3, 4, 6, 8] {
            for symmetric in [true, false] {
                let s = IntScheme {
                    bits,
                    group: 32,
                    symmetric,
                };
                for seed in 0..40 {
                    let mut w = values(32, seed + 100 * bits);
                    if seed % 7 == 0 {
                        w.iter_mut().for_each(|v| *v = v.max(0.0));
                    }
                    if seed % 11 == 0 {
                        w.fill(0.0);
                    }
                    let imp: Vec<f32> = values(32, seed + 7).iter().map(|x| x.abs()).collect();
                    for imp in [None, Some(&imp[..])] {
                        let quick = reference_best(&s, &w, imp, &QUICK_CLIPS);
                        assert_eq!(s.fit_quick(&w, imp), quick, "{} {seed}", s.name());
                        // The full fit: the coarse pass, then the neighbours of its best clip.
                        let coarse = reference_best(&s, &w, imp, &COARSE_CLIPS);
                        let centre = COARSE_CLIPS
                            .into_iter()
                            .find(|&c| reference_candidates(&s, &w, c).contains(&coarse))
                            .unwrap();
                        let mut clips = COARSE_CLIPS.to_vec();
                        for k in [-3.0, -2.0, -1.0, 1.0, 2.0, 3.0] {
                            let clip = centre + k * FINE_SPACING;
                            if clip > 0.0 && clip <= 1.0 {
                                clips.push(clip);
                            }
                        }
                        let full = reference_best(&s, &w, imp, &clips);
                        assert_eq!(s.fit(&w, imp), full, "{} {seed}", s.name());
                        let gain: Vec<f64> = imp.map_or(vec![1.0; 32], |i| {
                            i.iter().map(|&x| x as f64 * 3.0).collect()
                        });
                        let by_grid: f64 = w
                            .iter()
                            .zip(&gain)
                            .enumerate()
                            .map(|(i, (&v, g))| (v as f64 - quick.round(i, v).1 as f64).powi(2) * g)
                            .sum();
                        let (step, zero) = s.fit_quick_step(&w, imp);
                        assert_eq!(s.rounding_loss(&w, &gain, step, zero), by_grid);
                    }
                }
            }
        }
    }

    #[test]
    fn lanes_give_each_rows_own_estimate() {
        for bits in [2, 3, 4, 6, 8] {
            for symmetric in [true, false] {
                let s = IntScheme {
                    bits,
                    group: 16,
                    symmetric,
                };
                let mut rows: Vec<Vec<f32>> = (0..LANES as u32)
                    .map(|r| values(16, r + 50 * bits))
                    .collect();
                rows[1].fill(0.0);
                rows[2].iter_mut().for_each(|v| *v = v.max(0.0));
                rows[3][5] = 1e-30;
                let imp: Vec<f32> = values(16, 3).iter().map(|x| x.abs()).collect();
                let gain: Vec<f64> = values(16, 4).iter().map(|x| x.abs() as f64).collect();
                let block: Vec<[f32; LANES]> = (0..16)
                    .map(|i| std::array::from_fn(|l| rows[l][i]))
                    .collect();
                let lanes = s.quick_loss_lanes(&block, &imp, &gain);
                for (row, lane) in rows.iter().zip(lanes) {
                    let (step, zero) = s.fit_quick_step(row, Some(&imp));
                    assert_eq!(
                        lane,
                        s.rounding_loss(row, &gain, step, zero),
                        "{}",
                        s.name()
                    );
                }
            }
        }
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
