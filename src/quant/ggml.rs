//! ggml's block types (`q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q2_k` … `q6_k`) as a codec: blocks
//! laid out byte for byte as ggml (and candle) store them, grids fitted to minimise the
//! importance-weighted squared error, and a reader for blocks written by any ggml quantiser.
//!
//! Every kind's dequantiser is `step · (code − bias) + offset` per sub-block, with the step and
//! offset computed from the stored scales exactly as ggml computes them (a Q4_K step is the f32
//! product `d · sc`, its offset `−(dmin · m)`), so [`Grid::round`]'s values are ggml's values
//! bit for bit. Kinds without a stored offset use −0.0, the one offset that leaves every f32
//! (negative zero included) unchanged.
//!
//! Fitting searches more widely than ggml's quantisers: each scale (and minimum) is chosen from
//! a sweep of ranges refined by weighted least squares, always judged by the exact error after
//! rounding to the stored f16 values; K kinds then choose each sub-block's integer scale (and
//! minimum) among its neighbours by that exact error, and refit the super-block scales to the
//! chosen codes.

use half::f16;

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

/// The most columns a block has (a K super-block).
const MAX_BLOCK: usize = 256;
/// The most sub-blocks a block has.
const MAX_SUBS: usize = 16;
/// The most grid bytes a block has.
const MAX_HEADER: usize = 20;

/// A sweep of ranges tried when fitting a scale: the block's extreme value is mapped to the
/// code range's end times `1 + f`, for `steps + 1` values of `f` spread evenly over
/// `[low, high]` (beyond the end clips the extremes, short of it leaves headroom).
struct Sweep {
    low: f32,
    high: f32,
    steps: usize,
}

impl Sweep {
    fn factors(&self) -> impl Iterator<Item = f32> + '_ {
        (0..=self.steps)
            .map(move |k| 1.0 + self.low + (self.high - self.low) * k as f32 / self.steps as f32)
    }
}

/// Scales of the 4- and 5-bit one-scale kinds.
const BLOCK_SWEEP: Sweep = Sweep {
    low: -0.1,
    high: 0.5,
    steps: 12,
};
/// Q8_0's scale: with 256 codes clipping gains little, so the sweep stays short.
const Q8_SWEEP: Sweep = Sweep {
    low: -0.02,
    high: 0.06,
    steps: 4,
};
/// Sub-block scales (and minimums) of K kinds, before they are quantised.
const SUB_SWEEP: Sweep = Sweep {
    low: -0.1,
    high: 0.4,
    steps: 8,
};
/// Q2_K's sub-block scales and minimums: with four codes, clipping pays further out.
const Q2_SUB_SWEEP: Sweep = Sweep {
    low: -0.1,
    high: 0.7,
    steps: 8,
};
/// Super-block scales of K kinds, quantising the sub-block scales.
const SUPER_SWEEP: Sweep = Sweep {
    low: -0.12,
    high: 0.12,
    steps: 24,
};
/// Float candidates of a sweep refined by least squares.
const FLOAT_CANDIDATES: usize = 3;
/// Candidate super-block scales judged by their exact error.
const SUPER_CANDIDATES: usize = 3;
/// Candidate super-block minimum scales judged by their exact error.
const SUPER_MIN_CANDIDATES: usize = 2;
/// Refits of a K block's super-block scales to its chosen codes.
const REFITS: usize = 2;

/// The layout of a K kind's two-level grid.
struct KSpec {
    /// Columns per sub-block.
    sub: usize,
    /// The largest code.
    max: f32,
    /// The code of value zero (of the offset, when the kind has minimums).
    bias: f32,
    /// The range of a sub-block's integer scale.
    lo: i32,
    hi: i32,
    /// The largest integer minimum (0: the kind has no minimums).
    min_hi: i32,
    /// How far from the nearest integer scale (and minimum) a sub-block's search reaches.
    reach: i32,
    /// Whether a sub-block's search tries every pair of scale and minimum in reach (rather
    /// than the scale, then the minimum).
    every_pair: bool,
    /// The sweep fitting each sub-block's float grid.
    sweep: &'static Sweep,
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

    /// Columns per sub-block (one scale's reach).
    fn sub_columns(&self) -> usize {
        match self {
            Self::Q2_K | Self::Q3_K | Self::Q6_K => 16,
            _ => 32,
        }
    }

    /// The largest code.
    fn max_code(&self) -> u8 {
        match self {
            Self::Q8_0 => 255,
            Self::Q4_0 | Self::Q4_1 | Self::Q4_K => 15,
            Self::Q5_0 | Self::Q5_1 | Self::Q5_K => 31,
            Self::Q2_K => 3,
            Self::Q3_K => 7,
            Self::Q6_K => 63,
        }
    }

    /// The code subtracted before scaling (ggml's signed codes, shifted to start at 0).
    fn bias(&self) -> f32 {
        match self {
            Self::Q8_0 => 128.0,
            Self::Q4_0 => 8.0,
            Self::Q5_0 => 16.0,
            Self::Q3_K => 4.0,
            Self::Q6_K => 32.0,
            Self::Q4_1 | Self::Q5_1 | Self::Q2_K | Self::Q4_K | Self::Q5_K => 0.0,
        }
    }

    /// Where a block's grid bytes lie: `(offset, length)` pieces, in the order
    /// [`Grid::encoded`] holds them.
    fn header(&self) -> &'static [(usize, usize)] {
        match self {
            Self::Q8_0 | Self::Q4_0 | Self::Q5_0 => &[(0, 2)],
            Self::Q4_1 | Self::Q5_1 => &[(0, 4)],
            // scales, then d and dmin after the codes
            Self::Q2_K => &[(0, 16), (80, 4)],
            // scales and d after the high bits and low codes
            Self::Q3_K => &[(96, 14)],
            // d, dmin, scales
            Self::Q4_K | Self::Q5_K => &[(0, 16)],
            // scales and d after the codes
            Self::Q6_K => &[(192, 18)],
        }
    }

    fn k_spec(&self) -> Option<KSpec> {
        let (sub, lo, hi, min_hi, reach) = match self {
            Self::Q2_K => (16, 0, 15, 15, 1),
            Self::Q3_K => (16, -32, 31, 0, 2),
            Self::Q4_K | Self::Q5_K => (32, 0, 63, 63, 1),
            Self::Q6_K => (16, -128, 127, 0, 1),
            _ => return None,
        };
        let q2 = *self == Self::Q2_K;
        Some(KSpec {
            sub,
            max: self.max_code() as f32,
            bias: self.bias(),
            lo,
            hi,
            min_hi,
            reach,
            every_pair: q2,
            sweep: if q2 { &Q2_SUB_SWEEP } else { &SUB_SWEEP },
        })
    }

    /// The grid of one block: the format's scales (and minimums) minimising the
    /// importance-weighted squared rounding error among a wide search of candidates.
    pub fn fit(&self, values: &[f32], importance: Option<&[f32]>) -> Grid {
        let (x, w) = prepare(values, importance);
        let header = match self.k_spec() {
            Some(spec) => self.fit_k(&spec, &x, &w),
            None => self.fit_block(&x, &w),
        };
        self.grid(&header)
    }

    /// Writes one row's blocks.
    pub fn pack_row(&self, grids: &[Grid], codes: &[u8], out: &mut Vec<u8>) {
        let (cols, bytes) = (self.block_columns(), self.block_bytes());
        for (grid, codes) in grids.iter().zip(codes.chunks_exact(cols)) {
            let start = out.len();
            out.resize(start + bytes, 0);
            let block = &mut out[start..];
            let mut encoded = grid.encoded.iter().copied();
            for &(at, len) in self.header() {
                for (byte, value) in block[at..at + len].iter_mut().zip(encoded.by_ref()) {
                    *byte = value;
                }
            }
            self.place(codes, block);
        }
    }

    /// Reads one row's blocks into `out`.
    pub fn dequantise_row(&self, bytes: &[u8], out: &mut [f32]) {
        let (cols, sub, bias) = (self.block_columns(), self.sub_columns(), self.bias());
        let mut header = [0u8; MAX_HEADER];
        let mut codes = [0u8; MAX_BLOCK];
        let (mut steps, mut offsets) = ([0f32; MAX_SUBS], [0f32; MAX_SUBS]);
        for (block, values) in bytes
            .chunks_exact(self.block_bytes())
            .zip(out.chunks_exact_mut(cols))
        {
            let header = self.read_header(block, &mut header);
            self.decode(header, &mut steps, &mut offsets);
            self.extract(block, &mut codes[..cols]);
            for (c, (value, &code)) in values.iter_mut().zip(&codes[..cols]).enumerate() {
                let s = c / sub;
                *value = steps[s] * (code as f32 - bias) + offsets[s];
            }
        }
    }

    /// Gathers a block's grid bytes into `buffer`.
    fn read_header<'a>(&self, block: &[u8], buffer: &'a mut [u8; MAX_HEADER]) -> &'a [u8] {
        let mut n = 0;
        for &(at, len) in self.header() {
            buffer[n..n + len].copy_from_slice(&block[at..at + len]);
            n += len;
        }
        &buffer[..n]
    }

    /// The per-sub-block steps and offsets that grid bytes stand for, computed as ggml's
    /// dequantiser computes them.
    fn decode(&self, header: &[u8], steps: &mut [f32; MAX_SUBS], offsets: &mut [f32; MAX_SUBS]) {
        let half = |at: usize| f16::from_le_bytes([header[at], header[at + 1]]).to_f32();
        match self {
            Self::Q8_0 | Self::Q4_0 | Self::Q5_0 => {
                steps[0] = half(0);
                offsets[0] = -0.0;
            }
            Self::Q4_1 | Self::Q5_1 => {
                steps[0] = half(0);
                offsets[0] = half(2);
            }
            Self::Q2_K => {
                let (d, dmin) = (half(16), half(18));
                for j in 0..16 {
                    let sc = header[j];
                    steps[j] = d * (sc & 0xF) as f32;
                    offsets[j] = -(dmin * (sc >> 4) as f32);
                }
            }
            Self::Q3_K => {
                let d = half(12);
                for j in 0..16 {
                    steps[j] = d * (q3_scale(&header[..12], j) as f32 - 32.0);
                    offsets[j] = -0.0;
                }
            }
            Self::Q4_K | Self::Q5_K => {
                let (d, dmin) = (half(0), half(2));
                for j in 0..8 {
                    let (sc, m) = k4_scale_min(&header[4..16], j);
                    steps[j] = d * sc as f32;
                    offsets[j] = -(dmin * m as f32);
                }
            }
            Self::Q6_K => {
                let d = half(16);
                for j in 0..16 {
                    steps[j] = d * (header[j] as i8) as f32;
                    offsets[j] = -0.0;
                }
            }
        }
    }

    /// The grid that grid bytes stand for.
    fn grid(&self, header: &[u8]) -> Grid {
        let (mut steps, mut offsets) = ([0f32; MAX_SUBS], [0f32; MAX_SUBS]);
        self.decode(header, &mut steps, &mut offsets);
        let subs = self.block_columns() / self.sub_columns();
        Grid {
            sub_columns: self.sub_columns(),
            steps: steps[..subs].to_vec(),
            biases: vec![self.bias(); subs],
            offsets: offsets[..subs].to_vec(),
            max_code: self.max_code(),
            encoded: header.to_vec(),
        }
    }

    /// Writes one block's codes (one per column) into its code bytes.
    fn place(&self, codes: &[u8], block: &mut [u8]) {
        match self {
            // ggml's i8 code plus 128, back to the i8's two's-complement byte
            Self::Q8_0 => {
                for (byte, &code) in block[2..34].iter_mut().zip(codes) {
                    *byte = code ^ 0x80;
                }
            }
            Self::Q4_0 => put_nibbles(codes, &mut block[2..18]),
            Self::Q4_1 => put_nibbles(codes, &mut block[4..20]),
            Self::Q5_0 => {
                put_fifth_bits(codes, &mut block[2..6]);
                put_nibbles(codes, &mut block[6..22]);
            }
            Self::Q5_1 => {
                put_fifth_bits(codes, &mut block[4..8]);
                put_nibbles(codes, &mut block[8..24]);
            }
            Self::Q2_K => put_k_pairs(codes, &mut block[16..80]),
            Self::Q3_K => {
                for (c, &code) in codes.iter().enumerate() {
                    block[c % 32] |= ((code >> 2) & 1) << (c / 32);
                }
                put_k_pairs(codes, &mut block[32..96]);
            }
            Self::Q4_K => put_k_nibbles(codes, &mut block[16..144]),
            Self::Q5_K => {
                for (c, &code) in codes.iter().enumerate() {
                    block[16 + c % 32] |= ((code >> 4) & 1) << (c / 32);
                }
                put_k_nibbles(codes, &mut block[48..176]);
            }
            Self::Q6_K => {
                let (ql, rest) = block.split_at_mut(128);
                for (c, &code) in codes.iter().enumerate() {
                    let (half, k, l) = (c / 128, c % 128 / 32, c % 32);
                    ql[64 * half + 32 * (k & 1) + l] |= (code & 0xF) << (4 * (k >> 1));
                    rest[32 * half + l] |= ((code >> 4) & 3) << (2 * k);
                }
            }
        }
    }

    /// Reads one block's codes (one per column) from its code bytes.
    fn extract(&self, block: &[u8], codes: &mut [u8]) {
        match self {
            Self::Q8_0 => {
                for (code, &byte) in codes.iter_mut().zip(&block[2..34]) {
                    *code = byte ^ 0x80;
                }
            }
            Self::Q4_0 => get_nibbles(&block[2..18], codes),
            Self::Q4_1 => get_nibbles(&block[4..20], codes),
            Self::Q5_0 => {
                get_nibbles(&block[6..22], codes);
                get_fifth_bits(&block[2..6], codes);
            }
            Self::Q5_1 => {
                get_nibbles(&block[8..24], codes);
                get_fifth_bits(&block[4..8], codes);
            }
            Self::Q2_K => get_k_pairs(&block[16..80], codes),
            Self::Q3_K => {
                get_k_pairs(&block[32..96], codes);
                for (c, code) in codes.iter_mut().enumerate() {
                    *code |= ((block[c % 32] >> (c / 32)) & 1) << 2;
                }
            }
            Self::Q4_K => get_k_nibbles(&block[16..144], codes),
            Self::Q5_K => {
                get_k_nibbles(&block[48..176], codes);
                for (c, code) in codes.iter_mut().enumerate() {
                    *code |= ((block[16 + c % 32] >> (c / 32)) & 1) << 4;
                }
            }
            Self::Q6_K => {
                let (ql, qh) = block.split_at(128);
                for (c, code) in codes.iter_mut().enumerate() {
                    let (half, k, l) = (c / 128, c % 128 / 32, c % 32);
                    let low = (ql[64 * half + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 0xF;
                    let high = (qh[32 * half + l] >> (2 * k)) & 3;
                    *code = low | (high << 4);
                }
            }
        }
    }

    /// The grid bytes of a one-scale (legacy) block.
    fn fit_block(&self, x: &[f32], w: &[f32]) -> Vec<u8> {
        let max = self.max_code() as f32;
        match self {
            Self::Q4_1 | Self::Q5_1 => {
                let (d, m) = fit_affine_f16(x, w, max, &BLOCK_SWEEP);
                [d.to_le_bytes(), m.to_le_bytes()].concat()
            }
            _ => {
                let sweep = if *self == Self::Q8_0 {
                    &Q8_SWEEP
                } else {
                    &BLOCK_SWEEP
                };
                fit_scale_f16(x, w, self.bias(), max, sweep)
                    .to_le_bytes()
                    .to_vec()
            }
        }
    }

    /// The grid bytes of a K super-block: a float grid per sub-block, quantised to the
    /// format's integer scales (and minimums) under candidate super-block scales, each
    /// sub-block's integers then chosen among their neighbours by exact error, and the
    /// super-block scales refitted to the chosen codes.
    fn fit_k(&self, spec: &KSpec, x: &[f32], w: &[f32]) -> Vec<u8> {
        let subs = MAX_BLOCK / spec.sub;
        let mins = spec.min_hi > 0;
        let mut scales = [0f32; MAX_SUBS];
        let mut minimums = [0f32; MAX_SUBS];
        // How much each sub-block's error grows with the square of its scale's (minimum's) error.
        let mut scale_weight = [0f32; MAX_SUBS];
        let mut minimum_weight = [0f32; MAX_SUBS];
        for (j, (xs, ws)) in x
            .chunks_exact(spec.sub)
            .zip(w.chunks_exact(spec.sub))
            .enumerate()
        {
            if mins {
                let fit =
                    affine_candidates(xs, ws, spec.max, true, spec.sweep, FLOAT_CANDIDATES)[0];
                scales[j] = fit.step;
                minimums[j] = -fit.offset;
                scale_weight[j] = fit.sums.wq2;
                minimum_weight[j] = fit.sums.w;
            } else {
                let fit =
                    scale_candidates(xs, ws, spec.bias, spec.max, spec.sweep, FLOAT_CANDIDATES)[0];
                scales[j] = fit.step;
                scale_weight[j] = fit.sums.wl2;
            }
        }
        let ds = super_scales(
            &scales[..subs],
            &scale_weight[..subs],
            spec.lo,
            spec.hi,
            SUPER_CANDIDATES,
        );
        let dmins = match mins {
            true => super_scales(
                &minimums[..subs],
                &minimum_weight[..subs],
                0,
                spec.min_hi,
                SUPER_MIN_CANDIDATES,
            ),
            false => vec![f16::ZERO],
        };
        // Every candidate scale at the best minimum scale, then the other minimum scales at
        // the best scale.
        let assign_at = |d: f16, dmin: f16| assign(spec, x, w, &scales, &minimums, d, dmin);
        let mut best = assign_at(ds[0], dmins[0]);
        for &d in &ds[1..] {
            let a = assign_at(d, dmins[0]);
            if a.error < best.error {
                best = a;
            }
        }
        for &dmin in &dmins[1..] {
            let a = assign_at(best.d, dmin);
            if a.error < best.error {
                best = a;
            }
        }
        for _ in 0..REFITS {
            let Some((d, dmin)) = refit(spec, x, w, &best) else {
                break;
            };
            if d == best.d && dmin == best.dmin {
                break;
            }
            let a = assign_at(d, dmin);
            if a.error < best.error {
                best = a;
            } else {
                break;
            }
        }
        self.encode_k(&best)
    }

    /// A K super-block's grid bytes.
    fn encode_k(&self, a: &Assignment) -> Vec<u8> {
        let (d, dmin) = (a.d.to_le_bytes(), a.dmin.to_le_bytes());
        match self {
            Self::Q2_K => {
                let mut h: Vec<u8> = (0..16).map(|j| (a.ls[j] | (a.lm[j] << 4)) as u8).collect();
                h.extend_from_slice(&d);
                h.extend_from_slice(&dmin);
                h
            }
            Self::Q3_K => {
                let mut h = vec![0u8; 14];
                for j in 0..16 {
                    let l = (a.ls[j] + 32) as u8;
                    match j < 8 {
                        true => h[j] |= l & 0xF,
                        false => h[j - 8] |= (l & 0xF) << 4,
                    }
                    h[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
                }
                h[12..14].copy_from_slice(&d);
                h
            }
            Self::Q4_K | Self::Q5_K => {
                let mut h = vec![0u8; 16];
                h[0..2].copy_from_slice(&d);
                h[2..4].copy_from_slice(&dmin);
                let q = &mut h[4..16];
                for j in 0..8 {
                    let (ls, lm) = (a.ls[j] as u8, a.lm[j] as u8);
                    if j < 4 {
                        q[j] = ls;
                        q[j + 4] = lm;
                    } else {
                        q[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                        q[j - 4] |= (ls >> 4) << 6;
                        q[j] |= (lm >> 4) << 6;
                    }
                }
                h
            }
            Self::Q6_K => {
                let mut h: Vec<u8> = (0..16).map(|j| a.ls[j] as i8 as u8).collect();
                h.extend_from_slice(&d);
                h
            }
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 => Vec::new(),
        }
    }
}

/// A Q3_K sub-block's 6-bit scale (stored plus 32).
fn q3_scale(scales: &[u8], j: usize) -> u8 {
    let low = match j < 8 {
        true => scales[j] & 0xF,
        false => scales[j - 8] >> 4,
    };
    low | (((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)
}

/// A Q4_K/Q5_K sub-block's 6-bit scale and minimum.
fn k4_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    match j < 4 {
        true => (scales[j] & 63, scales[j + 4] & 63),
        false => (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        ),
    }
}

/// Legacy 32-column blocks: column `j` in the low nibble of byte `j`, column `j + 16` in the
/// high nibble.
fn put_nibbles(codes: &[u8], qs: &mut [u8]) {
    for (j, byte) in qs.iter_mut().enumerate() {
        *byte = (codes[j] & 0xF) | ((codes[j + 16] & 0xF) << 4);
    }
}

fn get_nibbles(qs: &[u8], codes: &mut [u8]) {
    for (j, &byte) in qs.iter().enumerate() {
        codes[j] = byte & 0xF;
        codes[j + 16] = byte >> 4;
    }
}

/// Q5_0/Q5_1: each column's fifth bit at its own bit of a little-endian u32.
fn put_fifth_bits(codes: &[u8], qh: &mut [u8]) {
    let bits = codes.iter().enumerate().fold(0u32, |bits, (c, &code)| {
        bits | (((code as u32 >> 4) & 1) << c)
    });
    qh.copy_from_slice(&bits.to_le_bytes());
}

fn get_fifth_bits(qh: &[u8], codes: &mut [u8]) {
    let bits = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    for (c, code) in codes.iter_mut().enumerate() {
        *code |= (((bits >> c) & 1) as u8) << 4;
    }
}

/// Q2_K/Q3_K low two bits: each half of 128 columns is 32 bytes, its four runs of 32 columns
/// at shifts 0, 2, 4, 6.
fn put_k_pairs(codes: &[u8], qs: &mut [u8]) {
    for (c, &code) in codes.iter().enumerate() {
        qs[32 * (c / 128) + c % 32] |= (code & 3) << (2 * (c % 128 / 32));
    }
}

fn get_k_pairs(qs: &[u8], codes: &mut [u8]) {
    for (c, code) in codes.iter_mut().enumerate() {
        *code = (qs[32 * (c / 128) + c % 32] >> (2 * (c % 128 / 32))) & 3;
    }
}

/// Q4_K/Q5_K low four bits: each run of 64 columns is 32 bytes, its first 32 columns in the
/// low nibbles.
fn put_k_nibbles(codes: &[u8], qs: &mut [u8]) {
    for (c, &code) in codes.iter().enumerate() {
        qs[32 * (c / 64) + c % 32] |= (code & 0xF) << (4 * (c % 64 / 32));
    }
}

fn get_k_nibbles(qs: &[u8], codes: &mut [u8]) {
    for (c, code) in codes.iter_mut().enumerate() {
        *code = (qs[32 * (c / 64) + c % 32] >> (4 * (c % 64 / 32))) & 0xF;
    }
}

/// The values to fit (non-finite ones as zero) and each column's weight: the importance, with
/// a floor so that every column counts a little and an all-zero importance counts all
/// columns alike.
fn prepare(values: &[f32], importance: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = values
        .iter()
        .map(|&v| if v.is_finite() { v } else { 0.0 })
        .collect();
    let mut w: Vec<f32> = match importance {
        Some(imp) => imp
            .iter()
            .map(|&i| if i.is_finite() && i > 0.0 { i } else { 0.0 })
            .collect(),
        None => vec![1.0; x.len()],
    };
    w.resize(x.len(), 0.0);
    let mean = w.iter().map(|&v| v as f64).sum::<f64>() / w.len().max(1) as f64;
    let floor = match mean > 0.0 && mean.is_finite() {
        true => (mean * 1e-6) as f32,
        false => 1.0,
    };
    w.iter_mut().for_each(|v| *v += floor);
    (x, w)
}

/// `t.round().clamp(0.0, max)` (a NaN giving 0, as the cast to a code does), without a
/// library call: the fits round millions of values.
#[inline]
fn round_code(t: f32, max: f32) -> f32 {
    // Clamping first keeps the integer conversion in range and changes no result.
    let t = t.clamp(-1.0, max + 1.0);
    let whole = t as i32 as f32;
    let fraction = t - whole;
    let rounded = if fraction >= 0.5 {
        whole + 1.0
    } else if fraction <= -0.5 {
        whole - 1.0
    } else {
        whole
    };
    rounded.clamp(0.0, max)
}

/// The code and value of `value` on a grid, exactly as [`Grid::round`] computes them.
#[inline]
fn round_to(value: f32, step: f32, bias: f32, offset: f32, max: f32) -> (f32, f32) {
    let code = match step != 0.0 && step.is_finite() {
        true => round_code((value - offset) / step + bias, max),
        false => bias.clamp(0.0, max),
    };
    (code, step * (code - bias) + offset)
}

/// The exact weighted error of rounding `x` to a grid.
fn exact_error(x: &[f32], w: &[f32], step: f32, bias: f32, offset: f32, max: f32) -> f32 {
    x.iter()
        .zip(w)
        .map(|(&v, &w)| {
            let e = round_to(v, step, bias, offset, max).1 - v;
            w * e * e
        })
        .sum()
}

/// Weighted sums of a symmetric grid `x ≈ s·l` (codes `l` from `−bias` to `max − bias`).
#[derive(Clone, Copy, Default)]
struct ScaleSums {
    err: f32,
    wxl: f32,
    wl2: f32,
}

/// Rounds `x` to the symmetric grid of step `s` (in floating point, for the search).
fn scale_sums(x: &[f32], w: &[f32], s: f32, bias: f32, max: f32) -> ScaleSums {
    let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
    let mut t = ScaleSums::default();
    for (&v, &w) in x.iter().zip(w) {
        let l = round_code(v * inv + bias, max) - bias;
        let e = s * l - v;
        t.err += w * e * e;
        t.wxl += w * v * l;
        t.wl2 += w * l * l;
    }
    t
}

/// A fitted symmetric scale.
#[derive(Clone, Copy)]
struct ScaleFit {
    step: f32,
    sums: ScaleSums,
}

/// Candidate steps of the symmetric grid `x ≈ s·l`, best first: the block's largest
/// magnitude mapped near either end of the code range over a sweep, the best `keep` of them
/// each refined by least squares on its codes.
fn scale_candidates(
    x: &[f32],
    w: &[f32],
    bias: f32,
    max: f32,
    sweep: &Sweep,
    keep: usize,
) -> Vec<ScaleFit> {
    let (mut amax, mut vmax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            vmax = v;
        }
    }
    let zero = ScaleFit {
        step: 0.0,
        sums: scale_sums(x, w, 0.0, bias, max),
    };
    if amax == 0.0 || !amax.is_finite() {
        return vec![zero];
    }
    let mut found = vec![zero];
    for end in [-bias, max - bias] {
        if end == 0.0 {
            continue;
        }
        for f in sweep.factors() {
            let step = vmax / (end * f);
            if step.is_finite() {
                found.push(ScaleFit {
                    step,
                    sums: scale_sums(x, w, step, bias, max),
                });
            }
        }
    }
    found.sort_by(|a, b| a.sums.err.total_cmp(&b.sums.err));
    found.truncate(keep);
    for fit in &mut found {
        for _ in 0..3 {
            if fit.sums.wl2 <= 0.0 {
                break;
            }
            let step = fit.sums.wxl / fit.sums.wl2;
            let sums = scale_sums(x, w, step, bias, max);
            if !(step.is_finite() && sums.err < fit.sums.err) {
                break;
            }
            *fit = ScaleFit { step, sums };
        }
    }
    found.sort_by(|a, b| a.sums.err.total_cmp(&b.sums.err));
    found
}

/// The f16 scale of a one-scale symmetric block (Q8_0, Q4_0, Q5_0): the float search's best
/// candidates rounded to f16 and refined on their exact codes, then the nearest f16 values
/// around the best.
fn fit_scale_f16(x: &[f32], w: &[f32], bias: f32, max: f32, sweep: &Sweep) -> f16 {
    let exact = |d: f16| exact_error(x, w, d.to_f32(), bias, -0.0, max);
    let mut best = (exact(f16::ZERO), f16::ZERO);
    let consider = |d: f16, best: &mut (f32, f16)| {
        if d.is_finite() && d != best.1 {
            let e = exact(d);
            if e < best.0 {
                *best = (e, d);
            }
        }
    };
    for fit in scale_candidates(x, w, bias, max, sweep, FLOAT_CANDIDATES) {
        consider(to_f16(fit.step), &mut best);
    }
    // Least squares on the exact codes of the best f16 scale, rounded again.
    for _ in 0..3 {
        let d = best.1.to_f32();
        let (mut wxl, mut wl2) = (0f32, 0f32);
        for (&v, &w) in x.iter().zip(w) {
            let l = round_to(v, d, bias, -0.0, max).0 - bias;
            wxl += w * v * l;
            wl2 += w * l * l;
        }
        if wl2 <= 0.0 {
            break;
        }
        let before = best.1;
        consider(to_f16(wxl / wl2), &mut best);
        if best.1 == before {
            break;
        }
    }
    let centre = best.1;
    for d in f16_neighbours(centre, 2) {
        consider(d, &mut best);
    }
    best.1
}

/// Weighted sums of an affine grid `x ≈ s·q + o` (codes `q` from 0 to `max`).
#[derive(Clone, Copy, Default)]
struct AffineSums {
    err: f32,
    w: f32,
    wq: f32,
    wq2: f32,
    wx: f32,
    wxq: f32,
}

/// Rounds `x` to the affine grid `(s, o)` (in floating point, for the search).
fn affine_sums(x: &[f32], w: &[f32], s: f32, o: f32, max: f32) -> AffineSums {
    let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
    let mut t = AffineSums::default();
    for (&v, &w) in x.iter().zip(w) {
        let q = round_code((v - o) * inv, max);
        let e = s * q + o - v;
        t.err += w * e * e;
        t.w += w;
        t.wq += w * q;
        t.wq2 += w * q * q;
        t.wx += w * v;
        t.wxq += w * v * q;
    }
    t
}

/// The least-squares `(s, o)` for the codes behind `t`, the offset held at or below zero when
/// `nonpositive` (K kinds store the offset as a minimum to subtract).
fn solve_affine(t: &AffineSums, nonpositive: bool) -> Option<(f32, f32)> {
    let (w, wq, wq2, wx, wxq) = (
        t.w as f64,
        t.wq as f64,
        t.wq2 as f64,
        t.wx as f64,
        t.wxq as f64,
    );
    let det = w * wq2 - wq * wq;
    if det <= 0.0 || wq2 <= 0.0 {
        return None;
    }
    let (mut s, mut o) = ((w * wxq - wx * wq) / det, (wq2 * wx - wq * wxq) / det);
    if nonpositive && o > 0.0 {
        o = 0.0;
        s = wxq / wq2;
    }
    let (s, o) = (s as f32, o as f32);
    (s > 0.0 && s.is_finite() && o.is_finite()).then_some((s, o))
}

/// A fitted affine grid.
#[derive(Clone, Copy)]
struct AffineFit {
    step: f32,
    offset: f32,
    sums: AffineSums,
}

/// Candidate affine grids `x ≈ s·q + o`, best first: the block's range mapped onto the codes
/// over a sweep (anchored at either end, so that the sweep clips one end or the other), the
/// best `keep` of them each refined by least squares on its codes.
fn affine_candidates(
    x: &[f32],
    w: &[f32],
    max: f32,
    nonpositive: bool,
    sweep: &Sweep,
    keep: usize,
) -> Vec<AffineFit> {
    let (mut lo, hi) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if nonpositive {
        lo = lo.min(0.0);
    }
    if hi <= lo || !(hi - lo).is_finite() {
        let offset = if lo.is_finite() { lo } else { 0.0 };
        return vec![AffineFit {
            step: 0.0,
            offset,
            sums: affine_sums(x, w, 0.0, offset, max),
        }];
    }
    let mut found = Vec::with_capacity(2 * (sweep.steps + 1));
    for f in sweep.factors() {
        let step = (hi - lo) / (max * f);
        let top = hi - step * max;
        for offset in [lo, top] {
            if nonpositive && offset > 0.0 {
                continue;
            }
            found.push(AffineFit {
                step,
                offset,
                sums: affine_sums(x, w, step, offset, max),
            });
        }
    }
    found.sort_by(|a, b| a.sums.err.total_cmp(&b.sums.err));
    found.truncate(keep);
    for fit in &mut found {
        for _ in 0..3 {
            let Some((step, offset)) = solve_affine(&fit.sums, nonpositive) else {
                break;
            };
            let sums = affine_sums(x, w, step, offset, max);
            if sums.err >= fit.sums.err {
                break;
            }
            *fit = AffineFit { step, offset, sums };
        }
    }
    found.sort_by(|a, b| a.sums.err.total_cmp(&b.sums.err));
    found
}

/// The f16 scale and minimum of a one-scale affine block (Q4_1, Q5_1): the float search's
/// best candidates rounded to f16 (the minimum also re-solved for the rounded scale) and
/// refined on their exact codes, then the nearest f16 values around the best.
fn fit_affine_f16(x: &[f32], w: &[f32], max: f32, sweep: &Sweep) -> (f16, f16) {
    let exact = |d: f16, m: f16| exact_error(x, w, d.to_f32(), 0.0, m.to_f32(), max);
    let mut best = (f32::INFINITY, f16::ZERO, f16::ZERO);
    let consider = |d: f16, m: f16, best: &mut (f32, f16, f16)| {
        if d.is_finite() && m.is_finite() && (d, m) != (best.1, best.2) {
            let e = exact(d, m);
            if e < best.0 {
                *best = (e, d, m);
            }
        }
    };
    // The offset that best fits the rounded scale's codes.
    let offset_for = |d: f16, o: f32| -> f16 {
        let (s, mut num, mut den) = (d.to_f32(), 0f32, 0f32);
        for (&v, &w) in x.iter().zip(w) {
            let q = round_to(v, s, 0.0, o, max).0;
            num += w * (v - s * q);
            den += w;
        }
        match den > 0.0 {
            true => to_f16(num / den),
            false => to_f16(o),
        }
    };
    for fit in affine_candidates(x, w, max, false, sweep, FLOAT_CANDIDATES) {
        let d = to_f16(fit.step);
        consider(d, to_f16(fit.offset), &mut best);
        consider(d, offset_for(d, fit.offset), &mut best);
    }
    for _ in 0..3 {
        let (d, m) = (best.1.to_f32(), best.2.to_f32());
        let mut sums = AffineSums::default();
        for (&v, &w) in x.iter().zip(w) {
            let q = round_to(v, d, 0.0, m, max).0;
            sums.w += w;
            sums.wq += w * q;
            sums.wq2 += w * q * q;
            sums.wx += w * v;
            sums.wxq += w * v * q;
        }
        let Some((s, o)) = solve_affine(&sums, false) else {
            break;
        };
        let before = (best.1, best.2);
        let d = to_f16(s);
        consider(d, to_f16(o), &mut best);
        consider(d, offset_for(d, o), &mut best);
        if (best.1, best.2) == before {
            break;
        }
    }
    let (d0, m0) = (best.1, best.2);
    for d in f16_neighbours(d0, 1).chain([d0]) {
        for m in f16_neighbours(m0, 1).chain([m0]) {
            consider(d, m, &mut best);
        }
    }
    (best.1, best.2)
}

/// Candidate super-block scales for sub-block values `v` (scales or minimums) quantised to
/// integers in `lo..=hi`: a sweep mapping the largest magnitude near each end, refined by
/// least squares, judged by the squared quantisation error of the values weighted by `wt`
/// (each sub-block's sensitivity) at the f16-rounded scale; the best few distinct ones.
fn super_scales(v: &[f32], wt: &[f32], lo: i32, hi: i32, keep: usize) -> Vec<f16> {
    let (mut amax, mut vmax) = (0f32, 0f32);
    for &s in v {
        if s.abs() > amax {
            amax = s.abs();
            vmax = s;
        }
    }
    if amax == 0.0 || !amax.is_finite() {
        return vec![f16::ZERO];
    }
    let (lof, hif) = (lo as f32, hi as f32);
    let proxy = |d: f16| -> (f32, f32, f32) {
        let d = d.to_f32();
        let (mut err, mut num, mut den) = (0f32, 0f32, 0f32);
        for (&s, &w) in v.iter().zip(wt) {
            let l = match d != 0.0 {
                true => (s / d).round().clamp(lof, hif),
                false => 0.0,
            };
            let e = s - d * l;
            err += w * e * e;
            num += w * s * l;
            den += w * l * l;
        }
        (err, num, den)
    };
    let mut found: Vec<(f32, f16)> = Vec::new();
    let ends: &[f32] = if lo < 0 { &[lof, hif] } else { &[hif] };
    for &end in ends {
        for f in SUPER_SWEEP.factors() {
            let d = to_f16(vmax / (end * f));
            let (err, num, den) = proxy(d);
            found.push((err, d));
            if den > 0.0 {
                let d = to_f16(num / den);
                found.push((proxy(d).0, d));
            }
        }
    }
    found.retain(|(e, d)| e.is_finite() && d.is_finite());
    found.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<f16> = Vec::with_capacity(keep);
    for (_, d) in found {
        if !out.contains(&d) {
            out.push(d);
            if out.len() == keep {
                break;
            }
        }
    }
    if out.is_empty() {
        out.push(f16::ZERO);
    }
    out
}

/// A K super-block's integer grid and its exact error.
struct Assignment {
    d: f16,
    dmin: f16,
    ls: [i32; MAX_SUBS],
    lm: [i32; MAX_SUBS],
    error: f32,
}

/// Each sub-block's integer scale (and minimum) under super-block scales `d` (and `dmin`):
/// the nearest integers to its float grid and their neighbours, whichever round the
/// sub-block's values with the least exact error (the scale searched at the nearest minimum,
/// then the minimum at the chosen scale, or every pair where the spec asks).
fn assign(
    spec: &KSpec,
    x: &[f32],
    w: &[f32],
    scales: &[f32; MAX_SUBS],
    minimums: &[f32; MAX_SUBS],
    d: f16,
    dmin: f16,
) -> Assignment {
    let (df, mf) = (d.to_f32(), dmin.to_f32());
    let mins = spec.min_hi > 0;
    let nearest = |v: f32, scale: f32, lo: i32, hi: i32| -> i32 {
        match scale != 0.0 {
            true => (v / scale).round().clamp(lo as f32, hi as f32) as i32,
            false => 0,
        }
    };
    let mut a = Assignment {
        d,
        dmin,
        ls: [0; MAX_SUBS],
        lm: [0; MAX_SUBS],
        error: 0.0,
    };
    for (j, (xs, ws)) in x
        .chunks_exact(spec.sub)
        .zip(w.chunks_exact(spec.sub))
        .enumerate()
    {
        let error = |ls: i32, lm: i32| {
            let offset = match mins {
                true => -(mf * lm as f32),
                false => -0.0,
            };
            exact_error(xs, ws, df * ls as f32, spec.bias, offset, spec.max)
        };
        let r = nearest(scales[j], df, spec.lo, spec.hi);
        let rm = match mins {
            true => nearest(minimums[j], mf, 0, spec.min_hi),
            false => 0,
        };
        let scale_range = (r - spec.reach).max(spec.lo)..=(r + spec.reach).min(spec.hi);
        let minimum_range = match mins {
            true => (rm - spec.reach).max(0)..=(rm + spec.reach).min(spec.min_hi),
            false => 0..=0,
        };
        let mut best = (error(r, rm), r, rm);
        let try_pair = |ls: i32, lm: i32, best: &mut (f32, i32, i32)| {
            if (ls, lm) != (best.1, best.2) {
                let e = error(ls, lm);
                if e < best.0 {
                    *best = (e, ls, lm);
                }
            }
        };
        if spec.every_pair {
            for ls in scale_range {
                for lm in minimum_range.clone() {
                    try_pair(ls, lm, &mut best);
                }
            }
        } else {
            for ls in scale_range {
                try_pair(ls, rm, &mut best);
            }
            let ls = best.1;
            for lm in minimum_range {
                try_pair(ls, lm, &mut best);
            }
        }
        a.ls[j] = best.1;
        a.lm[j] = best.2;
        a.error += best.0;
    }
    a
}

/// The super-block scales (rounded to f16) that best fit an assignment's own codes by
/// weighted least squares: `x ≈ d·ls·(q − bias) − dmin·lm`.
fn refit(spec: &KSpec, x: &[f32], w: &[f32], a: &Assignment) -> Option<(f16, f16)> {
    let (df, mf) = (a.d.to_f32(), a.dmin.to_f32());
    let mins = spec.min_hi > 0;
    let (mut aa, mut ab, mut bb, mut ax, mut bx) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (j, (xs, ws)) in x
        .chunks_exact(spec.sub)
        .zip(w.chunks_exact(spec.sub))
        .enumerate()
    {
        let step = df * a.ls[j] as f32;
        let offset = match mins {
            true => -(mf * a.lm[j] as f32),
            false => -0.0,
        };
        let b = -(a.lm[j] as f64);
        for (&v, &wv) in xs.iter().zip(ws) {
            let q = round_to(v, step, spec.bias, offset, spec.max).0;
            let p = a.ls[j] as f64 * (q - spec.bias) as f64;
            let (v, wv) = (v as f64, wv as f64);
            aa += wv * p * p;
            ab += wv * p * b;
            bb += wv * b * b;
            ax += wv * p * v;
            bx += wv * b * v;
        }
    }
    if aa <= 0.0 {
        return None;
    }
    let (mut d, mut dmin) = (ax / aa, 0.0);
    if mins {
        let det = aa * bb - ab * ab;
        if det > 0.0 {
            d = (bb * ax - ab * bx) / det;
            dmin = (aa * bx - ab * ax) / det;
            if dmin < 0.0 {
                dmin = 0.0;
                d = ax / aa;
            }
        }
        if d < 0.0 {
            return None;
        }
    }
    let (d, dmin) = (to_f16(d as f32), to_f16(dmin as f32));
    (d.is_finite() && dmin.is_finite()).then_some((d, dmin))
}

/// `v` rounded to f16, saturating at f16's largest finite magnitude.
fn to_f16(v: f32) -> f16 {
    let h = f16::from_f32(v);
    match (h.is_finite(), v.is_nan()) {
        (true, _) => h,
        (false, true) => f16::ZERO,
        (false, false) => match v > 0.0 {
            true => f16::MAX,
            false => f16::MIN,
        },
    }
}

/// The finite f16 values up to `n` steps either side of `h`.
fn f16_neighbours(h: f16, n: u16) -> impl Iterator<Item = f16> {
    let bits = h.to_bits();
    (1..=n)
        .flat_map(move |k| [bits.checked_add(k), bits.checked_sub(k)])
        .flatten()
        .map(f16::from_bits)
        .filter(|d| d.is_finite())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use candle_core::quantized::{QStorage, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::quant::Scheme;

    /// A xorshift stream of uniform values in (0, 1).
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn uniform(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32
        }

        fn normal(&mut self) -> f32 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        }
    }

    /// Gaussian weights of a typical linear layer's scale.
    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| 0.02 * rng.normal()).collect()
    }

    /// Heavy-tailed weights: Student-t with 3 degrees of freedom.
    fn heavy(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| {
                let chi: f32 = (0..3).map(|_| rng.normal().powi(2)).sum();
                0.02 * rng.normal() / (chi / 3.0).sqrt()
            })
            .collect()
    }

    /// Log-normal per-column importance, like the diagonal of an activation Gram matrix.
    fn importance(cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..cols).map(|_| (1.5 * rng.normal()).exp()).collect()
    }

    fn candle_dequantise(bytes: &[u8], kind: GgmlKind, rows: usize, cols: usize) -> Vec<f32> {
        let storage =
            QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, kind.to_candle()).unwrap();
        let q = QTensor::new(storage, (rows, cols)).unwrap();
        q.dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    fn candle_quantise(
        w: &[f32],
        kind: GgmlKind,
        rows: usize,
        cols: usize,
        imatrix: Option<&[f32]>,
    ) -> Vec<u8> {
        let t = Tensor::from_slice(w, (rows, cols), &Device::Cpu).unwrap();
        let q = match imatrix {
            Some(imp) => QTensor::quantize_imatrix(&t, imp, kind.to_candle()).unwrap(),
            None => QTensor::quantize(&t, kind.to_candle()).unwrap(),
        };
        q.data().unwrap().into_owned()
    }

    fn weighted_error(w: &[f32], back: &[f32], cols: usize, imp: Option<&[f32]>) -> f64 {
        w.iter()
            .zip(back)
            .enumerate()
            .map(|(i, (&a, &b))| {
                let d = (a - b) as f64;
                imp.map_or(1.0, |imp| imp[i % cols] as f64) * d * d
            })
            .sum()
    }

    fn shape(kind: GgmlKind) -> (usize, usize) {
        (8, 2 * kind.block_columns().max(64))
    }

    #[test]
    fn packed_bytes_read_back_in_candle_as_the_grid_values() {
        for kind in GgmlKind::ALL {
            let scheme = Scheme::Ggml(kind);
            let (rows, cols) = shape(kind);
            for (data, imp) in [
                (gaussian(rows * cols, 1), None),
                (heavy(rows * cols, 2), Some(importance(cols, 3))),
            ] {
                let imp = imp.as_deref();
                let bytes = scheme.quantise_nearest(&data, cols, imp).unwrap();
                assert_eq!(bytes.len() as u64, scheme.stored_bytes(rows, cols));
                let ours = scheme.dequantise(&bytes, cols).unwrap();
                let theirs = candle_dequantise(&bytes, kind, rows, cols);
                assert_eq!(ours.len(), theirs.len());
                for (i, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{kind:?} value {i}: {a} vs {b}");
                }
                let block = kind.block_columns();
                for (b, (values, back)) in data.chunks(block).zip(ours.chunks(block)).enumerate() {
                    let start = b * block % cols;
                    let grid = kind.fit(values, imp.map(|imp| &imp[start..start + block]));
                    for (c, (&v, &q)) in values.iter().zip(back).enumerate() {
                        let (code, value) = grid.round(c, v);
                        assert!(code <= grid.max_code);
                        assert_eq!(
                            value.to_bits(),
                            q.to_bits(),
                            "{kind:?} block {b} column {c}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn candle_quantised_bytes_read_as_candle_reads_them() {
        for kind in GgmlKind::ALL {
            let (rows, cols) = shape(kind);
            let data = heavy(rows * cols, 5);
            let imp = importance(cols, 6);
            let mut byte_sets = vec![candle_quantise(&data, kind, rows, cols, None)];
            if kind.block_columns() == 256 {
                byte_sets.push(candle_quantise(&data, kind, rows, cols, Some(&imp)));
            }
            for bytes in byte_sets {
                let theirs = candle_dequantise(&bytes, kind, rows, cols);
                let ours = Scheme::Ggml(kind).dequantise(&bytes, cols).unwrap();
                assert_eq!(ours.len(), theirs.len());
                for (i, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{kind:?} value {i}: {a} vs {b}");
                }
            }
        }
    }

    /// Our weighted error over that of the better of candle's quantisers (ggml's): the plain
    /// one and, for K kinds, the importance-aware one (given all-equal importance when the
    /// test has none).
    fn error_ratio(
        kind: GgmlKind,
        data: &[f32],
        rows: usize,
        cols: usize,
        imp: Option<&[f32]>,
    ) -> f64 {
        let scheme = Scheme::Ggml(kind);
        let ours = scheme.quantise_nearest(data, cols, imp).unwrap();
        let ours = weighted_error(data, &scheme.dequantise(&ours, cols).unwrap(), cols, imp);
        let mut theirs = vec![candle_quantise(data, kind, rows, cols, None)];
        if kind.block_columns() == 256 {
            let ones = vec![1f32; cols];
            theirs.push(candle_quantise(
                data,
                kind,
                rows,
                cols,
                Some(imp.unwrap_or(&ones)),
            ));
        }
        let theirs = theirs
            .iter()
            .map(|bytes| {
                let back = candle_dequantise(bytes, kind, rows, cols);
                weighted_error(data, &back, cols, imp)
            })
            .fold(f64::INFINITY, f64::min);
        ours / theirs
    }

    #[test]
    fn fits_are_no_worse_than_ggml_quantisers() {
        let (rows, cols) = (16, 512);
        let imp = importance(cols, 7);
        for kind in GgmlKind::ALL {
            let plain = error_ratio(kind, &gaussian(rows * cols, 8), rows, cols, None);
            let weighted = error_ratio(kind, &gaussian(rows * cols, 9), rows, cols, Some(&imp));
            let heavy_plain = error_ratio(kind, &heavy(rows * cols, 10), rows, cols, None);
            let heavy_weighted = error_ratio(kind, &heavy(rows * cols, 11), rows, cols, Some(&imp));
            eprintln!(
                "{}: gaussian {plain:.3}, gaussian weighted {weighted:.3}, \
                 heavy {heavy_plain:.3}, heavy weighted {heavy_weighted:.3}",
                kind.name()
            );
            for ratio in [plain, weighted, heavy_plain, heavy_weighted] {
                assert!(ratio <= 1.05, "{kind:?}: {ratio}");
            }
        }
    }

    #[test]
    fn names_round_trip_and_zero_blocks_stay_zero() {
        for kind in GgmlKind::ALL {
            assert_eq!(GgmlKind::parse(kind.name()), Some(kind));
            assert_eq!(GgmlKind::parse(&kind.name().to_uppercase()), Some(kind));
            assert_eq!(Scheme::parse(kind.name()).unwrap(), Scheme::Ggml(kind));
            let header: usize = kind.header().iter().map(|&(_, len)| len).sum();
            assert_eq!(
                header,
                kind.fit(&vec![0.5; kind.block_columns()], None)
                    .encoded
                    .len()
            );
            let scheme = Scheme::Ggml(kind);
            let cols = kind.block_columns();
            let zeros = vec![0f32; 2 * cols];
            let bytes = scheme.quantise_nearest(&zeros, cols, None).unwrap();
            let back = scheme.dequantise(&bytes, cols).unwrap();
            assert!(back.iter().all(|&v| v == 0.0), "{kind:?}");
            assert_eq!(candle_dequantise(&bytes, kind, 2, cols), back);
        }
        assert_eq!(GgmlKind::parse("q4_2"), None);
    }

    #[test]
    fn rounding_moved_values_stays_on_the_grid() {
        for kind in GgmlKind::ALL {
            let cols = kind.block_columns();
            let grid = kind.fit(&gaussian(cols, 12), None);
            for (c, v) in [
                (0, 1e3f32),
                (cols - 1, -1e3),
                (cols / 2, 0.0),
                (1, f32::NAN),
            ] {
                let (code, value) = grid.round(c, v);
                assert!(code <= grid.max_code, "{kind:?}");
                assert_eq!(grid.value(c, code).to_bits(), value.to_bits());
            }
        }
    }
}
