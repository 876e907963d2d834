//! GPTQ (Frantar et al., 2022) on any block format, and round-to-nearest with the same output.
//!
//! GPTQ quantises a `[rows, cols]` matrix one column at a time and feeds each column's rounding
//! error back into the columns not yet quantised, so that the output error over the calibration
//! inputs, `Σ_x ‖(W − Q) x‖² = tr((W − Q) H (W − Q)ᵀ)` with `H = Σ x xᵀ`, stays small. Rows are
//! independent: they share only `U`, the upper Cholesky factor of `H⁻¹` (`H⁻¹ = Uᵀ U`). Quantising
//! column `i` of a row as `q` gives the error `e_i = (w_i − q) / U_ii`, and the later columns
//! `j > i` of the row move by `−e_i · U_ij`. Columns are taken in lazy blocks: inside a block
//! the updates are applied at once, row by row; the later columns receive the block's errors
//! in one matrix product.
//!
//! The grid of each format block is fitted when its first column comes up, from the row's
//! weights as the updates have left them. With `act_order` columns come in descending order of
//! `H_ii` and format blocks are no longer contiguous in time, so every grid is fitted up front
//! from the original weights.

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use rayon::prelude::*;

use super::int::LANES;
use super::{Grid, Scheme};
use crate::error::{Error, Result};

/// GPTQ's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqOptions {
    /// Columns per lazy-update block.
    pub block: usize,
    /// Damping added to the Hessian's diagonal, relative to its mean.
    pub damp: f64,
    /// Quantise columns in descending order of the Hessian's diagonal.
    pub act_order: bool,
    /// Coordinate-descent passes over the codes once GPTQ has chosen them (grids held).
    pub refine_passes: usize,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self {
            block: 128,
            damp: 0.01,
            act_order: false,
            refine_passes: 0,
        }
    }
}

/// A matrix quantised to a scheme.
#[derive(Debug, Clone)]
pub struct Quantised {
    /// The scheme.
    pub scheme: Scheme,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows · scheme.row_bytes(cols)` stored bytes.
    pub bytes: Vec<u8>,
    /// The dequantised matrix, row-major.
    pub dequantised: Vec<f32>,
    /// Per row, `Δw·H·Δwᵀ` under the Hessian used (damping included; after refinement, as
    /// accurate as its single-precision `H·Δw`).
    ///
    /// `H` is the Hessian with the diagonal of dead columns (`H_ii = 0`) set to 1 and the
    /// damping added to the diagonal; `Δw` is the row with its dead columns set to zero (their
    /// value never reaches the output) minus the dequantised row. Without a Hessian
    /// ([`round_to_nearest`] with `None`) it is the plain squared error.
    pub row_loss: Vec<f64>,
}

/// Times the damping is raised tenfold when the damped Hessian is not positive definite.
const DAMP_RETRIES: usize = 3;
/// The relative damping tried first on a retry when `damp` is zero.
const DAMP_FLOOR: f64 = 1e-4;

/// Quantises `w` [rows, cols] (row-major) with GPTQ under `hessian` [cols, cols] (row-major,
/// symmetric positive semi-definite: Σ x xᵀ of the calibration inputs).
pub fn gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f64],
    scheme: Scheme,
    options: &GptqOptions,
) -> Result<Quantised> {
    check_matrix(w, rows, cols, scheme)?;
    GptqHessian::new(hessian, cols, options)?.quantise(w, rows, scheme)
}

/// Quantises `w` [rows, cols] (row-major) by rounding to nearest, on grids weighted by the
/// damped Hessian's diagonal (`options.damp`; `block` and `act_order` play no part).
pub fn round_to_nearest(
    w: &[f32],
    rows: usize,
    cols: usize,
    hessian: Option<&[f64]>,
    scheme: Scheme,
    options: &GptqOptions,
) -> Result<Quantised> {
    check_matrix(w, rows, cols, scheme)?;
    check_options(options)?;
    let prepared = hessian
        .map(|h| {
            let (diagonal, dead) = inspect_hessian(h, cols)?;
            let damping = options.damp * mean(&diagonal);
            let damped: Vec<f64> = diagonal.iter().map(|d| d + damping).collect();
            Ok::<_, Error>((damped, dead))
        })
        .transpose()?;
    let importance: Option<Vec<f32>> = prepared
        .as_ref()
        .map(|(damped, _)| damped.iter().map(|&d| d as f32).collect());
    let base: Vec<f32> = match &prepared {
        Some((_, dead)) => w
            .par_chunks(cols)
            .flat_map_iter(|row| zero_dead(row, dead))
            .collect(),
        None => w.to_vec(),
    };
    let bc = scheme.block_columns();
    let mut codes = vec![0u8; rows * cols];
    let mut dequantised = vec![0f32; rows * cols];
    let grids: Vec<Vec<Grid>> = base
        .par_chunks(cols)
        .zip(codes.par_chunks_mut(cols))
        .zip(dequantised.par_chunks_mut(cols))
        .map(|((row, codes), out)| {
            let grids: Vec<Grid> = row
                .chunks(bc)
                .enumerate()
                .map(|(b, values)| {
                    let importance = importance.as_ref().map(|w| &w[b * bc..(b + 1) * bc]);
                    scheme.fit(values, importance)
                })
                .collect();
            for (c, &v) in row.iter().enumerate() {
                (codes[c], out[c]) = grids[c / bc].round(c % bc, v);
            }
            grids
        })
        .collect();
    let delta: Vec<f64> = base
        .iter()
        .zip(&dequantised)
        .map(|(&v, &q)| v as f64 - q as f64)
        .collect();
    let row_loss = match (hessian, &prepared) {
        (Some(h), Some((damped, _))) => quadratic_forms(&delta, rows, cols, h, damped),
        _ => delta
            .chunks(cols)
            .map(|d| d.iter().map(|x| x * x).sum())
            .collect(),
    };
    Ok(Quantised {
        scheme,
        rows,
        cols,
        bytes: pack(scheme, &grids, &codes, cols),
        dequantised,
        row_loss,
    })
}

/// Quantises `w` [rows, cols] by rounding to nearest on grids fitted to the weights alone (no
/// calibration: the plain round-to-nearest baseline), with `row_loss` measured under the damped
/// `hessian` as [`round_to_nearest`] measures it (dead columns, whose inputs are always zero,
/// cost nothing).
pub fn round_to_nearest_uncalibrated(
    w: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f64],
    scheme: Scheme,
    options: &GptqOptions,
) -> Result<Quantised> {
    let mut quantised = round_to_nearest(w, rows, cols, None, scheme, options)?;
    let (diagonal, dead) = inspect_hessian(hessian, cols)?;
    let damping = options.damp * mean(&diagonal);
    let damped: Vec<f64> = diagonal.iter().map(|d| d + damping).collect();
    let delta: Vec<f64> = w
        .iter()
        .zip(&quantised.dequantised)
        .enumerate()
        .map(|(i, (&v, &q))| match dead[i % cols] {
            true => 0.0,
            false => v as f64 - q as f64,
        })
        .collect();
    quantised.row_loss = quadratic_forms(&delta, rows, cols, hessian, &damped);
    Ok(quantised)
}

/// A Hessian factored for GPTQ, shared by the matrices that read the same inputs and by one
/// matrix quantised in several schemes.
#[derive(Debug, Clone)]
pub struct GptqHessian {
    cols: usize,
    options: GptqOptions,
    dead: Vec<bool>,
    /// The damping added to every diagonal entry (absolute).
    damping: f64,
    /// The damped diagonal, original column order.
    diagonal: Vec<f64>,
    /// Processing position → original column.
    order: Vec<usize>,
    /// `U`, the upper Cholesky factor of the damped inverse Hessian, in processing order.
    u: InverseFactor,
    /// What refining the codes needs, kept where it is asked for.
    refinement: Option<Refinement>,
}

/// The damped Hessian in the two forms code refinement reads, in single precision.
#[derive(Debug, Clone)]
struct Refinement {
    /// `H`, original order, row-major: one row per move.
    hessian: Vec<f32>,
    /// `U⁻ᵀ` in processing order, row-major (lower triangular): GPTQ leaves `Δw = e·U` with
    /// `e` its scaled errors, and `U·H = U⁻ᵀ` since `H⁻¹ = UᵀU`, so `H·Δwᵀ` is `e·U⁻ᵀ` at
    /// half the work of a full product.
    inverse_u_t: Vec<f32>,
}

/// `U` in processing order, whole or its diagonal alone.
#[derive(Debug, Clone)]
enum InverseFactor {
    /// Every entry, row-major (zero below the diagonal): what quantising needs.
    Full(Vec<f64>),
    /// The diagonal: all that estimating needs, without inverting the Cholesky factor.
    Diagonal(Vec<f64>),
}

impl InverseFactor {
    /// Every entry, which quantising needs.
    fn full(&self) -> Result<&[f64]> {
        match self {
            InverseFactor::Full(u) => Ok(u),
            InverseFactor::Diagonal(_) => Err(Error::InvalidArgument(
                "GPTQ: this Hessian was prepared for estimates only".into(),
            )),
        }
    }

    /// `U_pp`.
    fn diagonal(&self, p: usize, n: usize) -> f64 {
        match self {
            InverseFactor::Full(u) => u[p * n + p],
            InverseFactor::Diagonal(d) => d[p],
        }
    }
}

impl GptqHessian {
    /// Prepares `hessian` [cols, cols] (row-major, symmetric positive semi-definite) under
    /// `options`' damping and order.
    pub fn new(hessian: &[f64], cols: usize, options: &GptqOptions) -> Result<Self> {
        Self::prepare(hessian, cols, options, true)
    }

    /// Prepares `hessian` for [`GptqHessian::estimate_row_loss`] and
    /// [`GptqHessian::row_energy`] alone (the same damping and order as
    /// [`GptqHessian::new`], about a third of its work); it cannot quantise.
    pub fn for_estimates(hessian: &[f64], cols: usize, options: &GptqOptions) -> Result<Self> {
        Self::prepare(hessian, cols, options, false)
    }

    fn prepare(hessian: &[f64], cols: usize, options: &GptqOptions, full: bool) -> Result<Self> {
        check_options(options)?;
        let (diagonal, dead) = inspect_hessian(hessian, cols)?;
        let mut order: Vec<usize> = (0..cols).collect();
        if options.act_order {
            // Stable, so columns with equal diagonals keep their original order.
            order.sort_by(|&a, &b| diagonal[b].total_cmp(&diagonal[a]));
        }
        let mean = mean(&diagonal);
        let mut damp = options.damp;
        let mut tried = Vec::new();
        for _ in 0..=DAMP_RETRIES {
            let damping = damp * mean;
            tried.push(damp);
            let refine = full && options.refine_passes > 0;
            if let Some((u, inverse_u_t)) =
                inverse_factor(hessian, &diagonal, &order, damping, full, refine)
            {
                let diagonal: Vec<f64> = diagonal.iter().map(|d| d + damping).collect();
                let refinement = inverse_u_t.map(|inverse_u_t| {
                    let mut h: Vec<f32> = hessian.iter().map(|&v| v as f32).collect();
                    for (i, &d) in diagonal.iter().enumerate() {
                        h[i * cols + i] = d as f32;
                    }
                    Refinement {
                        hessian: h,
                        inverse_u_t,
                    }
                });
                return Ok(Self {
                    cols,
                    options: *options,
                    dead,
                    damping,
                    diagonal,
                    order,
                    u,
                    refinement,
                });
            }
            damp = (damp * 10.0).max(DAMP_FLOOR);
        }
        Err(Error::Numerical(format!(
            "GPTQ: the {cols}×{cols} Hessian is not positive definite even with relative damping \
             {tried:?} of its mean diagonal {mean:e}; it is not a Gram matrix Σ x xᵀ"
        )))
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The damping added to the Hessian's diagonal (absolute, after any retries).
    pub fn damping(&self) -> f64 {
        self.damping
    }

    /// Which columns are dead (zero Hessian diagonal: their inputs are always zero).
    pub fn dead_columns(&self) -> &[bool] {
        &self.dead
    }

    /// Quantises `w` [rows, cols] (row-major) with GPTQ.
    pub fn quantise(&self, w: &[f32], rows: usize, scheme: Scheme) -> Result<Quantised> {
        let n = self.cols;
        check_matrix(w, rows, n, scheme)?;
        let bc = scheme.block_columns();
        // A whole number of format blocks, so that a block's grid is fitted from weights that
        // carry every update from the columns before it.
        let lazy = self.options.block.max(bc).div_ceil(bc) * bc;
        let importance: Vec<f32> = self.diagonal.iter().map(|&d| d as f32).collect();
        let (order, u) = (&self.order, self.u.full()?);

        let mut states: Vec<RowState> = w
            .par_chunks(n)
            .map(|row| self.initial_state(row, scheme, &importance))
            .collect();
        // The working weights, in processing order.
        let mut work = vec![0f64; rows * n];
        work.par_chunks_mut(n)
            .zip(w.par_chunks(n))
            .for_each(|(work, row)| {
                for (x, &c) in work.iter_mut().zip(order) {
                    *x = if self.dead[c] { 0.0 } else { row[c] as f64 };
                }
            });
        let mut errors = vec![0f64; rows * lazy];

        for start in (0..n).step_by(lazy) {
            let end = (start + lazy).min(n);
            work.par_chunks_mut(n)
                .zip(errors.par_chunks_mut(lazy))
                .zip(states.par_iter_mut())
                .with_min_len(4)
                .for_each(|((row, errors), state)| {
                    for p in start..end {
                        let c = order[p];
                        if !self.options.act_order && c.is_multiple_of(bc) {
                            // Without act_order the order is the identity: `p == c`.
                            let values: Vec<f32> =
                                row[c..c + bc].iter().map(|&x| x as f32).collect();
                            state
                                .grids
                                .push(scheme.fit(&values, Some(&importance[c..c + bc])));
                        }
                        let x = row[p];
                        let (code, q) = state.grids[c / bc].round(c % bc, x as f32);
                        state.codes[c] = code;
                        state.dequantised[c] = q;
                        let e = (x - q as f64) / u[p * n + p];
                        state.loss += e * e;
                        errors[p - start] = e;
                        if let Some(kept) = state.errors.get_mut(p) {
                            *kept = e as f32;
                        }
                        for (x, &u) in row[p + 1..end]
                            .iter_mut()
                            .zip(&u[p * n + p + 1..p * n + end])
                        {
                            *x -= e * u;
                        }
                    }
                });
            if end < n && rows > 0 {
                // W[:, end..] −= E · U[start..end, end..]
                // The transpose of a column-major view: faer 0.24's
                // `from_row_major_slice_with_stride_mut` swaps the two strides.
                let dst = MatMut::from_column_major_slice_with_stride_mut(
                    &mut work[end..],
                    n - end,
                    rows,
                    n,
                )
                .transpose_mut();
                let lhs =
                    MatRef::from_row_major_slice_with_stride(&errors, rows, end - start, lazy);
                let rhs = MatRef::from_row_major_slice_with_stride(
                    &u[start * n + end..],
                    end - start,
                    n - end,
                    n,
                );
                matmul(dst, Accum::Add, lhs, rhs, -1.0, Par::rayon(0));
            }
        }

        if let Some(refinement) = &self.refinement {
            // GPTQ's working copies are done with: freed before the refinement's own.
            drop((work, errors));
            self.refine(refinement, &mut states, bc);
        }
        let grids: Vec<Vec<Grid>> = states
            .iter_mut()
            .map(|s| std::mem::take(&mut s.grids))
            .collect();
        let codes: Vec<u8> = states
            .iter()
            .flat_map(|s| s.codes.iter().copied())
            .collect();
        Ok(Quantised {
            scheme,
            rows,
            cols: n,
            bytes: pack(scheme, &grids, &codes, n),
            dequantised: states
                .iter()
                .flat_map(|s| s.dequantised.iter().copied())
                .collect(),
            row_loss: states.iter().map(|s| s.loss).collect(),
        })
    }
}

impl GptqHessian {
    /// A row's state before GPTQ: with act_order every grid is fitted to the original row
    /// first (the columns are not visited block by block).
    fn initial_state(&self, row: &[f32], scheme: Scheme, importance: &[f32]) -> RowState {
        let (n, bc) = (self.cols, scheme.block_columns());
        let grids = match self.options.act_order {
            true => zero_dead(row, &self.dead)
                .chunks(bc)
                .zip(importance.chunks(bc))
                .map(|(values, importance)| scheme.fit(values, Some(importance)))
                .collect(),
            false => Vec::with_capacity(n / bc),
        };
        RowState {
            grids,
            codes: vec![0; n],
            dequantised: vec![0.0; n],
            loss: 0.0,
            errors: match self.refinement {
                Some(_) => vec![0.0; n],
                None => Vec::new(),
            },
        }
    }

    /// Lowers each row's loss `Δw·H·Δwᵀ` by coordinate descent over its codes, grids held:
    /// GPTQ fixes each code once, seeing only the columns before it; a pass moves every code
    /// to the grid value nearest the one that minimises the loss given all the others (the
    /// loss is quadratic in one value, so that grid value is the best of the grid), until a
    /// pass moves none or `refine_passes` have run. Each move's change is added to the row's loss.
    fn refine(&self, refinement: &Refinement, states: &mut [RowState], bc: usize) {
        let n = self.cols;
        let rows = states.len();
        let hessian = &refinement.hessian;
        // G = Δ·H for every row at once, as e·U⁻ᵀ, in single precision: G only steers the
        // moves, and the loss is kept in double.
        let errors: Vec<f32> = states
            .iter_mut()
            .flat_map(|s| std::mem::take(&mut s.errors))
            .collect();
        let mut processing = vec![0f32; rows * n];
        if rows > 0 {
            triangular::matmul(
                MatMut::from_column_major_slice_mut(&mut processing, n, rows).transpose_mut(),
                BlockStructure::Rectangular,
                Accum::Replace,
                MatRef::from_row_major_slice(&errors, rows, n),
                BlockStructure::Rectangular,
                MatRef::from_row_major_slice(&refinement.inverse_u_t, n, n),
                BlockStructure::TriangularLower,
                1.0,
                Par::rayon(0),
            );
        }
        let mut g = vec![0f32; rows * n];
        g.par_chunks_mut(n)
            .zip(processing.par_chunks(n))
            .for_each(|(g, processing)| {
                for (&c, &value) in self.order.iter().zip(processing) {
                    g[c] = value;
                }
            });
        states
            .par_iter_mut()
            .zip(g.par_chunks_mut(n))
            .for_each(|(state, g)| {
                // A code can move only where `|G_c| / H_cc` reaches half its group's step (less
                // a margin for f32 rounding): one comparison rejects every other column.
                let reach: Vec<f32> = (0..n)
                    .map(|c| match self.dead[c] {
                        true => f32::INFINITY,
                        false => {
                            let step = state.grids[c / bc].step(c % bc);
                            (0.45 * f64::from(step) * self.diagonal[c]) as f32
                        }
                    })
                    .collect();
                for _ in 0..self.options.refine_passes {
                    let mut moved = false;
                    for c in 0..n {
                        if g[c].abs() <= reach[c] {
                            continue;
                        }
                        let h_cc = self.diagonal[c];
                        let old = state.dequantised[c];
                        let wanted = f64::from(old) + f64::from(g[c]) / h_cc;
                        let (code, q) = state.grids[c / bc].round(c % bc, wanted as f32);
                        if code == state.codes[c] {
                            continue;
                        }
                        // Δ_c grows by t: the loss changes by 2t·G_c + t²·H_cc.
                        let t = f64::from(old) - f64::from(q);
                        let change = 2.0 * t * f64::from(g[c]) + t * t * h_cc;
                        if change < 0.0 {
                            let t = t as f32;
                            for (g, h) in g.iter_mut().zip(&hessian[c * n..(c + 1) * n]) {
                                *g += t * h;
                            }
                            state.codes[c] = code;
                            state.dequantised[c] = q;
                            state.loss += change;
                            moved = true;
                        }
                    }
                    if !moved {
                        break;
                    }
                }
            });
    }

    /// `1 / U_ii²` by original column: how much a rounding error in each column costs once
    /// GPTQ has fed it forward.
    fn gains(&self) -> Vec<f64> {
        let n = self.cols;
        let mut gain = vec![0f64; n];
        for (p, &c) in self.order.iter().enumerate() {
            let d = self.u.diagonal(p, n);
            gain[c] = 1.0 / (d * d);
        }
        gain
    }

    /// Per row of `w` [rows, cols], `Σ_c gain_c·w_c²` over the live columns: the scale to which
    /// every format's rounding loss of that row is proportional, to first order.
    pub fn row_energy(&self, w: &[f32]) -> Vec<f64> {
        let gain = self.gains();
        w.chunks(self.cols)
            .map(|row| {
                row.iter()
                    .zip(&gain)
                    .zip(&self.dead)
                    .filter(|(_, &dead)| !dead)
                    .map(|((&v, g), _)| g * f64::from(v) * f64::from(v))
                    .sum()
            })
            .collect()
    }

    /// Per row, an estimate of the loss [`GptqHessian::quantise`] would report for `w` in
    /// `scheme`, at the cost of rounding once: each column's rounding error on grids fitted to
    /// the original row (in the scheme's [`Scheme::estimation_proxy`]), divided by `U_ii` as
    /// GPTQ divides the error of the updated weight.
    /// Rounding errors are nearly independent of the small updates GPTQ makes, so the two agree
    /// in expectation wherever the grid covers the updated weights.
    pub fn estimate_row_loss(&self, w: &[f32], rows: usize, scheme: Scheme) -> Result<Vec<f64>> {
        let n = self.cols;
        check_matrix(w, rows, n, scheme)?;
        let scheme = scheme.estimation_proxy();
        let bc = scheme.block_columns();
        let importance: Vec<f32> = self.diagonal.iter().map(|&d| d as f32).collect();
        let gain = self.gains();
        let row_loss = |row: &[f32]| -> f64 {
            zero_dead(row, &self.dead)
                .chunks(bc)
                .zip(importance.chunks(bc))
                .zip(gain.chunks(bc))
                .map(|((values, importance), gain)| {
                    scheme.estimate_block_loss(values, Some(importance), gain)
                })
                .sum()
        };
        let Scheme::Int(int) = scheme else {
            return Ok(w.par_chunks(n).map(row_loss).collect());
        };
        // Integer groups: `LANES` rows at a time, one per lane, each lane's arithmetic that of
        // its row alone.
        let chunks: Vec<Vec<f64>> = w
            .par_chunks(LANES * n)
            .map(|chunk| {
                if chunk.len() < LANES * n {
                    return chunk.chunks(n).map(row_loss).collect();
                }
                let mut block = vec![[0f32; LANES]; bc];
                let mut totals = [0f64; LANES];
                for start in (0..n).step_by(bc) {
                    for (i, lanes) in block.iter_mut().enumerate() {
                        let c = start + i;
                        for (l, x) in lanes.iter_mut().enumerate() {
                            *x = if self.dead[c] { 0.0 } else { chunk[l * n + c] };
                        }
                    }
                    let losses = int.quick_loss_lanes(
                        &block,
                        &importance[start..start + bc],
                        &gain[start..start + bc],
                    );
                    for (t, loss) in totals.iter_mut().zip(losses) {
                        *t += loss;
                    }
                }
                totals.to_vec()
            })
            .collect();
        Ok(chunks.concat())
    }
}

/// One row's grids, codes and values (original column order) and its accumulated loss.
struct RowState {
    grids: Vec<Grid>,
    codes: Vec<u8>,
    dequantised: Vec<f32>,
    loss: f64,
    /// GPTQ's scaled error per column, processing order: kept when the codes are refined.
    errors: Vec<f32>,
}

/// `U`, the upper Cholesky factor of `(P (H + damping·I) Pᵀ)⁻¹` with `P` the column order and
/// the diagonal replaced by `diagonal` + damping, row-major; `None` when that matrix is not
/// (numerically) positive definite.
///
/// If `J` reverses the order and `J H J = L Lᵀ`, then `H = R Rᵀ` with `R = J L J` upper
/// triangular, so `H⁻¹ = R⁻ᵀ R⁻¹` and `U = R⁻¹ = J L⁻¹ J`: one Cholesky factorisation and one
/// triangular inverse; its diagonal alone (`full` false) needs no inverse. With
/// `with_inverse_u_t`, also `U⁻ᵀ = Rᵀ` in single precision (row-major), for refining codes.
fn inverse_factor(
    hessian: &[f64],
    diagonal: &[f64],
    order: &[usize],
    damping: f64,
    full: bool,
    with_inverse_u_t: bool,
) -> Option<(InverseFactor, Option<Vec<f32>>)> {
    let n = order.len();
    let reversed = Mat::from_fn(n, n, |a, b| {
        let (i, j) = (order[n - 1 - a], order[n - 1 - b]);
        match i == j {
            true => diagonal[i] + damping,
            false => hessian[i * n + j],
        }
    });
    let llt = reversed.llt(Side::Lower).ok()?;
    if !full {
        // U = (L⁻¹ reversed), so U_pp = 1 / L at the mirrored position. Positive and finite
        // there is what the full factor's check comes to: a finite L with a positive diagonal
        // has a finite inverse at any damping this reaches.
        let l = llt.L();
        let diagonal: Vec<f64> = (0..n).map(|p| 1.0 / l[(n - 1 - p, n - 1 - p)]).collect();
        let usable = diagonal.iter().all(|&d| d > 0.0 && d.is_finite());
        return usable.then_some((InverseFactor::Diagonal(diagonal), None));
    }
    let mut u = Mat::<f64>::zeros(n, n);
    invert_lower_triangular(
        u.as_mut().reverse_rows_and_cols_mut(),
        llt.L(),
        Par::rayon(0),
    );
    // Row-major, a band of rows at a time and column by column within it, so that the
    // column-major source is read in runs rather than one page per value.
    const BAND: usize = 64;
    let mut rows = vec![0f64; n * n];
    rows.par_chunks_mut(BAND * n)
        .enumerate()
        .for_each(|(band, out)| {
            let first = band * BAND;
            for j in first..n {
                for (r, row) in out.chunks_mut(n).enumerate() {
                    let i = first + r;
                    if j >= i {
                        row[j] = u[(i, j)];
                    }
                }
            }
        });
    let usable = (0..n).all(|i| rows[i * n + i] > 0.0) && rows.iter().all(|x| x.is_finite());
    // U⁻ᵀ = J·Lᵀ·J: entry (a, b) is L's at (n−1−b, n−1−a), lower triangular.
    let inverse_u_t = with_inverse_u_t.then(|| {
        let l = llt.L();
        let mut m = vec![0f32; n * n];
        m.par_chunks_mut(n).enumerate().for_each(|(a, row)| {
            for (b, value) in row.iter_mut().enumerate().take(a + 1) {
                *value = l[(n - 1 - b, n - 1 - a)] as f32;
            }
        });
        m
    });
    usable.then_some((InverseFactor::Full(rows), inverse_u_t))
}

/// Checks `hessian`'s shape and values; returns its diagonal with dead entries (zero) set to 1,
/// and which columns are dead.
fn inspect_hessian(hessian: &[f64], cols: usize) -> Result<(Vec<f64>, Vec<bool>)> {
    if hessian.len() != cols * cols {
        return Err(Error::InvalidArgument(format!(
            "GPTQ: a Hessian for {cols} columns has {} entries, got {}",
            cols * cols,
            hessian.len()
        )));
    }
    if let Some(k) = hessian.iter().position(|x| !x.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "GPTQ: Hessian entry ({}, {}) is {}; the calibration statistics are not finite",
            k / cols,
            k % cols,
            hessian[k]
        )));
    }
    let mut diagonal = Vec::with_capacity(cols);
    let mut dead = Vec::with_capacity(cols);
    for i in 0..cols {
        let d = hessian[i * cols + i];
        if d < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "GPTQ: Hessian diagonal entry {i} is negative ({d}); a Gram matrix Σ x xᵀ has \
                 none"
            )));
        }
        dead.push(d == 0.0);
        diagonal.push(if d == 0.0 { 1.0 } else { d });
    }
    Ok((diagonal, dead))
}

/// Checks the matrix's length, its values and that `scheme` can store its rows.
fn check_matrix(w: &[f32], rows: usize, cols: usize, scheme: Scheme) -> Result<()> {
    if !scheme.supports(cols) {
        return Err(Error::InvalidArgument(format!(
            "{scheme} stores rows in whole blocks of {} columns; the matrix has {cols} columns",
            scheme.block_columns()
        )));
    }
    if w.len() != rows * cols {
        return Err(Error::InvalidArgument(format!(
            "a [{rows}, {cols}] matrix has {} values, got {}",
            rows * cols,
            w.len()
        )));
    }
    if let Some(k) = w.iter().position(|x| !x.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "weight ({}, {}) is {}; only finite weights can be quantised",
            k / cols,
            k % cols,
            w[k]
        )));
    }
    Ok(())
}

fn check_options(options: &GptqOptions) -> Result<()> {
    if options.block == 0 {
        return Err(Error::InvalidArgument(
            "GPTQ: the lazy-update block needs at least one column".into(),
        ));
    }
    if !(options.damp.is_finite() && options.damp >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "GPTQ: damping must be finite and non-negative, got {}",
            options.damp
        )));
    }
    Ok(())
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// `row` with its dead columns set to zero.
fn zero_dead(row: &[f32], dead: &[bool]) -> Vec<f32> {
    row.iter()
        .zip(dead)
        .map(|(&v, &d)| if d { 0.0 } else { v })
        .collect()
}

/// Per row `δ` of `delta` [rows, cols], `δ H δᵀ` with `H` = `hessian` whose diagonal is
/// replaced by `diagonal`.
fn quadratic_forms(
    delta: &[f64],
    rows: usize,
    cols: usize,
    hessian: &[f64],
    diagonal: &[f64],
) -> Vec<f64> {
    let h = Mat::from_fn(cols, cols, |i, j| match i == j {
        true => diagonal[i],
        false => hessian[i * cols + j],
    });
    let mut product = Mat::<f64>::zeros(rows, cols);
    let lhs = MatRef::from_row_major_slice(delta, rows, cols);
    matmul(
        product.as_mut(),
        Accum::Replace,
        lhs,
        h.as_ref(),
        1.0,
        Par::rayon(0),
    );
    (0..rows)
        .map(|r| {
            (0..cols)
                .map(|c| product[(r, c)] * delta[r * cols + c])
                .sum()
        })
        .collect()
}

/// The stored bytes of every row.
fn pack(scheme: Scheme, grids: &[Vec<Grid>], codes: &[u8], cols: usize) -> Vec<u8> {
    let row_bytes = scheme.row_bytes(cols);
    grids
        .par_iter()
        .zip(codes.par_chunks(cols))
        .map(|(grids, codes)| {
            let mut out = Vec::with_capacity(row_bytes);
            scheme.pack_row(grids, codes, &mut out);
            out
        })
        .collect::<Vec<_>>()
        .concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::IntScheme;
    use crate::rng::SplitMix64;

    fn int(bits: u32, group: usize, symmetric: bool) -> Scheme {
        Scheme::Int(IntScheme {
            bits,
            group,
            symmetric,
        })
    }

    fn normal(rng: &mut SplitMix64, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| rng.normal() * scale).collect()
    }

    /// Weights with a few large entries, as trained matrices have.
    fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..rows * cols)
            .map(|_| {
                let x = rng.normal() * 0.02;
                match rng.below(50) {
                    0 => (x * 4.0) as f32,
                    _ => x as f32,
                }
            })
            .collect()
    }

    /// `X = Z·A` [tokens, cols] with random `A` and per-column scales: strongly correlated
    /// inputs whose Gram matrix is far from diagonal.
    fn calibration(tokens: usize, cols: usize, seed: u64) -> Mat<f64> {
        let mut rng = SplitMix64::new(seed);
        let k = cols.min(tokens);
        let z = Mat::from_fn(tokens, k, |_, _| rng.normal());
        let mut a = Mat::from_fn(k, cols, |_, _| rng.normal());
        for c in 0..cols {
            let scale = 0.2 + 2.0 * rng.uniform();
            for r in 0..k {
                a[(r, c)] *= scale;
            }
        }
        // A shared component correlates every pair of columns.
        let shared: Vec<f64> = normal(&mut rng, cols, 1.0);
        let mut x = &z * &a;
        for t in 0..tokens {
            let common = rng.normal() * 2.0;
            for c in 0..cols {
                x[(t, c)] += common * shared[c];
            }
        }
        x
    }

    /// `XᵀX`, row-major.
    fn gram(x: &Mat<f64>) -> Vec<f64> {
        let h = x.transpose() * x;
        let n = h.nrows();
        (0..n * n).map(|k| h[(k / n, k % n)]).collect()
    }

    /// Per row, `Δw H Δwᵀ` with `Δw = a − b`.
    fn forms(a: &[f32], b: &[f32], cols: usize, h: &[f64]) -> Vec<f64> {
        a.chunks(cols)
            .zip(b.chunks(cols))
            .map(|(a, b)| {
                let d: Vec<f64> = a
                    .iter()
                    .zip(b)
                    .map(|(&a, &b)| a as f64 - b as f64)
                    .collect();
                (0..cols)
                    .map(|i| d[i] * (0..cols).map(|j| h[i * cols + j] * d[j]).sum::<f64>())
                    .sum()
            })
            .collect()
    }

    /// `‖(W − Q) Xᵀ‖²` summed over rows, from the undamped Gram matrix.
    fn output_error(w: &[f32], q: &[f32], cols: usize, h: &[f64]) -> f64 {
        forms(w, q, cols, h).iter().sum()
    }

    /// The Hessian GPTQ works with: dead diagonal entries set to 1, plus `damping`.
    fn damped(h: &[f64], cols: usize, damping: f64) -> Vec<f64> {
        let mut d = h.to_vec();
        for i in 0..cols {
            if d[i * cols + i] == 0.0 {
                d[i * cols + i] = 1.0;
            }
            d[i * cols + i] += damping;
        }
        d
    }

    fn zeroed(w: &[f32], cols: usize, dead: &[bool]) -> Vec<f32> {
        w.chunks(cols)
            .flat_map(|row| zero_dead(row, dead))
            .collect()
    }

    fn relative(a: f64, b: f64) -> f64 {
        (a - b).abs() / a.abs().max(b.abs()).max(1e-300)
    }

    #[test]
    fn row_loss_is_the_damped_quadratic_form_of_the_error() {
        let (rows, cols, tokens) = (12, 192, 600);
        let mut x = calibration(tokens, cols, 1);
        // Two dead inputs.
        for t in 0..tokens {
            x[(t, 5)] = 0.0;
            x[(t, 100)] = 0.0;
        }
        let h = gram(&x);
        let w = weights(rows, cols, 2);
        for scheme in [int(4, 32, true), int(3, 64, false), int(2, 64, true)] {
            for (act_order, refine_passes) in [(false, 0), (true, 0), (false, 3), (true, 3)] {
                let options = GptqOptions {
                    block: 64,
                    act_order,
                    refine_passes,
                    ..GptqOptions::default()
                };
                let prepared = GptqHessian::new(&h, cols, &options).unwrap();
                assert_eq!(prepared.dead_columns().iter().filter(|&&d| d).count(), 2);
                let q = prepared.quantise(&w, rows, scheme).unwrap();
                let hd = damped(&h, cols, prepared.damping());
                let base = zeroed(&w, cols, prepared.dead_columns());
                let direct = forms(&base, &q.dequantised, cols, &hd);
                for (r, (&loss, &direct)) in q.row_loss.iter().zip(&direct).enumerate() {
                    assert!(
                        relative(loss, direct) < 1e-6,
                        "{scheme} act_order {act_order} refined {refine_passes} row {r}: \
                         accumulated {loss}, direct {direct}"
                    );
                }
                let rtn = round_to_nearest(&w, rows, cols, Some(&h), scheme, &options).unwrap();
                for (r, (&loss, &direct)) in rtn
                    .row_loss
                    .iter()
                    .zip(&forms(&base, &rtn.dequantised, cols, &hd))
                    .enumerate()
                {
                    assert!(
                        relative(loss, direct) < 1e-9,
                        "{scheme} RTN row {r}: {loss} vs {direct}"
                    );
                }
            }
        }
    }

    #[test]
    fn gptq_beats_round_to_nearest_on_correlated_inputs() {
        let (rows, cols, tokens) = (48, 256, 2048);
        let h = gram(&calibration(tokens, cols, 3));
        let w = weights(rows, cols, 4);
        let mut report = String::new();
        let mut failures = Vec::new();
        for bits in [2, 3, 4] {
            for symmetric in [true, false] {
                for group in [32, 128] {
                    let scheme = int(bits, group, symmetric);
                    let rtn =
                        round_to_nearest(&w, rows, cols, Some(&h), scheme, &GptqOptions::default())
                            .unwrap();
                    let rtn_error = output_error(&w, &rtn.dequantised, cols, &h);
                    for act_order in [false, true] {
                        let options = GptqOptions {
                            act_order,
                            ..GptqOptions::default()
                        };
                        let q = gptq(&w, rows, cols, &h, scheme, &options).unwrap();
                        let error = output_error(&w, &q.dequantised, cols, &h);
                        let ratio = error / rtn_error;
                        report += &format!(
                            "{scheme:>16} act_order {act_order:5}: GPTQ/RTN output error {ratio:.3}\n"
                        );
                        if ratio >= 0.8 {
                            failures.push(format!("{scheme} act_order {act_order}: {ratio:.3}"));
                        }
                    }
                }
            }
        }
        println!("{report}");
        assert!(
            failures.is_empty(),
            "GPTQ not clearly better: {failures:?}\n{report}"
        );
    }

    #[test]
    fn refinement_lowers_every_rows_loss_and_converges() {
        let (rows, cols, tokens) = (32, 256, 2048);
        let h = gram(&calibration(tokens, cols, 31));
        let w = weights(rows, cols, 32);
        let mut report = String::new();
        for scheme in [
            "int2-g64-asym",
            "int3-g32-sym",
            "int4-g128-asym",
            "q2_k",
            "q3_k",
        ] {
            let scheme = Scheme::parse(scheme).unwrap();
            for act_order in [false, true] {
                let options = |refine_passes| GptqOptions {
                    act_order,
                    refine_passes,
                    ..GptqOptions::default()
                };
                let quantise = |passes| {
                    GptqHessian::new(&h, cols, &options(passes))
                        .unwrap()
                        .quantise(&w, rows, scheme)
                        .unwrap()
                };
                let (plain, refined) = (quantise(0), quantise(50));
                let at = format!("{scheme} act_order {act_order}");
                for (r, (a, b)) in refined.row_loss.iter().zip(&plain.row_loss).enumerate() {
                    assert!(
                        *a <= b * (1.0 + 1e-9),
                        "{at} row {r}: refined {a} > GPTQ {b}"
                    );
                }
                let ratio =
                    refined.row_loss.iter().sum::<f64>() / plain.row_loss.iter().sum::<f64>();
                report += &format!("{at}: refined / GPTQ loss {ratio:.4}\n");
                assert!(
                    ratio < 0.95,
                    "{at}: refinement gained too little ({ratio:.4})"
                );
                // Converged: another pass moves no code.
                assert!(
                    quantise(51).bytes == refined.bytes,
                    "{at}: a further pass moved codes"
                );
            }
        }
        println!("{report}");
    }

    #[test]
    fn the_rounding_estimate_tracks_gptqs_loss_across_formats() {
        let (rows, cols, tokens) = (48, 256, 2048);
        let h = gram(&calibration(tokens, cols, 7));
        let w = weights(rows, cols, 8);
        let prepared = GptqHessian::new(
            &h,
            cols,
            &GptqOptions {
                act_order: true,
                ..GptqOptions::default()
            },
        )
        .unwrap();
        let mut ratios = Vec::new();
        let mut exact_losses = Vec::new();
        let mut report = String::new();
        for scheme in [
            int(2, 64, false),
            int(3, 128, false),
            int(4, 64, true),
            int(5, 128, false),
            int(8, 128, true),
        ] {
            let exact: f64 = prepared
                .quantise(&w, rows, scheme)
                .unwrap()
                .row_loss
                .iter()
                .sum();
            let estimate: f64 = prepared
                .estimate_row_loss(&w, rows, scheme)
                .unwrap()
                .iter()
                .sum();
            report += &format!("{scheme:>16}: GPTQ {exact:.4e}, estimate {estimate:.4e}\n");
            ratios.push(exact / estimate);
            exact_losses.push(exact);
        }
        // Within a factor of two of GPTQ's own loss at every width, and the ratio varies
        // little between widths, so scaling by a sampled ratio leaves the order of candidates
        // and their error per byte about right.
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), &r| (l.min(r), h.max(r)));
        assert!(lo > 0.5 && hi < 2.0, "GPTQ / estimate {ratios:?}\n{report}");
        assert!(hi / lo < 1.6, "GPTQ / estimate {ratios:?}\n{report}");
        assert!(exact_losses.windows(2).all(|w| w[0] > w[1]), "{report}");
        // K kinds are estimated through integer groups of their sub-block length: the same
        // order of magnitude, the rest corrected by the sampled scale.
        let cols = 512;
        let h = gram(&calibration(tokens, cols, 9));
        let w = weights(rows, cols, 10);
        let prepared = GptqHessian::new(&h, cols, &GptqOptions::default()).unwrap();
        let mut report = String::new();
        for kind in ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"] {
            let scheme = Scheme::parse(kind).unwrap();
            let exact: f64 = prepared
                .quantise(&w, rows, scheme)
                .unwrap()
                .row_loss
                .iter()
                .sum();
            let estimate: f64 = prepared
                .estimate_row_loss(&w, rows, scheme)
                .unwrap()
                .iter()
                .sum();
            report += &format!("{kind}: GPTQ {exact:.4e}, estimate {estimate:.4e}\n");
            assert!((0.33..3.0).contains(&(exact / estimate)), "{report}");
        }
        println!("{report}");
    }

    #[test]
    fn packed_bytes_read_back_as_the_dequantised_matrix() {
        let (rows, cols) = (10, 256);
        let h = gram(&calibration(400, cols, 5));
        let w = weights(rows, cols, 6);
        for scheme in [
            int(4, 128, true),
            int(3, 32, false),
            int(8, 256, true),
            int(5, 64, false),
        ] {
            for act_order in [false, true] {
                let options = GptqOptions {
                    act_order,
                    ..GptqOptions::default()
                };
                for q in [
                    gptq(&w, rows, cols, &h, scheme, &options).unwrap(),
                    round_to_nearest(&w, rows, cols, Some(&h), scheme, &options).unwrap(),
                    round_to_nearest(&w, rows, cols, None, scheme, &options).unwrap(),
                ] {
                    assert_eq!(q.bytes.len() as u64, scheme.stored_bytes(rows, cols));
                    let back = scheme.dequantise(&q.bytes, cols).unwrap();
                    assert!(back == q.dequantised, "{scheme} act_order {act_order}");
                }
            }
        }
    }

    #[test]
    fn dead_columns_are_zeroed_and_cost_nothing() {
        let (rows, cols, tokens) = (16, 128, 500);
        let mut x = calibration(tokens, cols, 7);
        let dead = [0, 1, 31, 64, 127];
        for t in 0..tokens {
            for &c in &dead {
                x[(t, c)] = 0.0;
            }
        }
        let h = gram(&x);
        let w = weights(rows, cols, 8);
        let scheme = int(4, 32, false);
        for act_order in [false, true] {
            let options = GptqOptions {
                act_order,
                ..GptqOptions::default()
            };
            let q = gptq(&w, rows, cols, &h, scheme, &options).unwrap();
            assert!(q.dequantised.iter().all(|v| v.is_finite()));
            for row in q.dequantised.chunks(cols) {
                for &c in &dead {
                    assert_eq!(row[c], 0.0, "dead column {c}");
                }
            }
            let rtn = round_to_nearest(&w, rows, cols, Some(&h), scheme, &options).unwrap();
            let (e, e_rtn) = (
                output_error(&w, &q.dequantised, cols, &h),
                output_error(&w, &rtn.dequantised, cols, &h),
            );
            assert!(
                e < 0.8 * e_rtn,
                "act_order {act_order}: GPTQ {e} RTN {e_rtn}"
            );
        }
        // Every column dead: nothing reaches the output, everything is zero.
        let q = gptq(
            &w,
            rows,
            cols,
            &vec![0.0; cols * cols],
            scheme,
            &GptqOptions::default(),
        )
        .unwrap();
        assert!(q.dequantised.iter().all(|&v| v == 0.0));
        assert!(q.row_loss.iter().all(|&l| l == 0.0));
    }

    #[test]
    fn a_singular_hessian_is_damped_and_fitted_closely() {
        // Fewer tokens than columns: H has rank 40 of 128.
        let (rows, cols, tokens) = (16, 128, 40);
        let h = gram(&calibration(tokens, cols, 9));
        let w = weights(rows, cols, 10);
        let scheme = int(4, 32, true);
        let q = gptq(&w, rows, cols, &h, scheme, &GptqOptions::default()).unwrap();
        let rtn =
            round_to_nearest(&w, rows, cols, Some(&h), scheme, &GptqOptions::default()).unwrap();
        let (e, e_rtn) = (
            output_error(&w, &q.dequantised, cols, &h),
            output_error(&w, &rtn.dequantised, cols, &h),
        );
        assert!(e < 0.5 * e_rtn, "GPTQ {e} RTN {e_rtn}");
        // Without damping the factorisation fails; the retries add some.
        let undamped = GptqOptions {
            damp: 0.0,
            ..GptqOptions::default()
        };
        let prepared = GptqHessian::new(&h, cols, &undamped).unwrap();
        assert!(prepared.damping() > 0.0);
        assert!(prepared
            .quantise(&w, rows, scheme)
            .unwrap()
            .row_loss
            .iter()
            .all(|l| l.is_finite()));
    }

    #[test]
    fn an_identity_hessian_gives_round_to_nearest() {
        let (rows, cols) = (8, 128);
        let mut h = vec![0.0; cols * cols];
        for i in 0..cols {
            h[i * cols + i] = 3.0;
        }
        let w = weights(rows, cols, 11);
        for scheme in [int(4, 32, true), int(2, 128, false)] {
            for act_order in [false, true] {
                let options = GptqOptions {
                    act_order,
                    ..GptqOptions::default()
                };
                let q = gptq(&w, rows, cols, &h, scheme, &options).unwrap();
                let rtn = round_to_nearest(&w, rows, cols, Some(&h), scheme, &options).unwrap();
                assert_eq!(q.bytes, rtn.bytes, "{scheme} act_order {act_order}");
                for (a, b) in q.row_loss.iter().zip(&rtn.row_loss) {
                    assert!(relative(*a, *b) < 1e-9);
                }
            }
        }
    }

    /// GPTQ as the OBS update, column by column, on an explicit inverse: `e = (w − q) / d`,
    /// later columns `−= e · H⁻¹[p, j]`, then `H⁻¹ −= H⁻¹[:, p] H⁻¹[p, :] / d`. Returns the
    /// codes (original order) and per-row losses.
    fn reference(
        w: &[f32],
        rows: usize,
        cols: usize,
        h: &[f64],
        scheme: Scheme,
        damping: f64,
        act_order: bool,
    ) -> (Vec<u8>, Vec<f64>) {
        let n = cols;
        let hd = damped(h, n, damping);
        let dead: Vec<bool> = (0..n).map(|i| h[i * n + i] == 0.0).collect();
        let mut order: Vec<usize> = (0..n).collect();
        if act_order {
            order.sort_by(|&a, &b| hd[b * n + b].total_cmp(&hd[a * n + a]));
        }
        // Gauss–Jordan inverse of the permuted damped Hessian.
        let mut a: Vec<f64> = (0..n * n)
            .map(|k| hd[order[k / n] * n + order[k % n]])
            .collect();
        let mut inv: Vec<f64> = (0..n * n).map(|k| f64::from(k / n == k % n)).collect();
        for p in 0..n {
            let pivot = a[p * n + p];
            for j in 0..n {
                a[p * n + j] /= pivot;
                inv[p * n + j] /= pivot;
            }
            for i in (0..n).filter(|&i| i != p) {
                let f = a[i * n + p];
                for j in 0..n {
                    a[i * n + j] -= f * a[p * n + j];
                    inv[i * n + j] -= f * inv[p * n + j];
                }
            }
        }
        // The downdated inverse's row p at step p.
        let mut steps = Vec::new();
        for p in 0..n {
            let d = inv[p * n + p];
            steps.push((d, inv[p * n..(p + 1) * n].to_vec()));
            let column: Vec<f64> = (0..n).map(|i| inv[i * n + p]).collect();
            let row = inv[p * n..(p + 1) * n].to_vec();
            for i in 0..n {
                for j in 0..n {
                    inv[i * n + j] -= column[i] * row[j] / d;
                }
            }
        }
        let bc = scheme.block_columns();
        let importance: Vec<f32> = (0..n).map(|i| hd[i * n + i] as f32).collect();
        let mut codes = vec![0u8; rows * n];
        let mut losses = Vec::new();
        for (r, row) in w.chunks(n).enumerate() {
            let original = zero_dead(row, &dead);
            let mut grids: Vec<Option<Grid>> = vec![None; n / bc];
            if act_order {
                for (b, grid) in grids.iter_mut().enumerate() {
                    let cols = b * bc..(b + 1) * bc;
                    *grid = Some(scheme.fit(&original[cols.clone()], Some(&importance[cols])));
                }
            }
            let mut current: Vec<f64> = order.iter().map(|&c| original[c] as f64).collect();
            let mut loss = 0.0;
            for p in 0..n {
                let c = order[p];
                if grids[c / bc].is_none() {
                    let values: Vec<f32> = current[c..c + bc].iter().map(|&x| x as f32).collect();
                    grids[c / bc] = Some(scheme.fit(&values, Some(&importance[c..c + bc])));
                }
                let (code, q) = grids[c / bc]
                    .as_ref()
                    .unwrap()
                    .round(c % bc, current[p] as f32);
                codes[r * n + c] = code;
                let (d, hinv) = &steps[p];
                let e = (current[p] - q as f64) / d;
                loss += e * (current[p] - q as f64);
                for j in p + 1..n {
                    current[j] -= e * hinv[j];
                }
            }
            losses.push(loss);
        }
        (codes, losses)
    }

    /// Codes read back from packed int rows.
    fn codes_of(q: &Quantised) -> Vec<u8> {
        let Scheme::Int(s) = q.scheme else {
            unreachable!()
        };
        let dequantised = &q.dequantised;
        let mut codes = Vec::with_capacity(dequantised.len());
        let row_bytes = q.scheme.row_bytes(q.cols);
        for (bytes, _) in q.bytes.chunks(row_bytes).zip(dequantised.chunks(q.cols)) {
            for block in bytes.chunks(s.block_bytes()) {
                let packed = &block[2 + usize::from(!s.symmetric)..];
                let bits = s.bits as usize;
                for i in 0..s.group {
                    let bit = i * bits;
                    let mut word = packed[bit / 8] as u32;
                    if bit % 8 + bits > 8 {
                        word |= (packed[bit / 8 + 1] as u32) << 8;
                    }
                    codes.push(((word >> (bit % 8)) & ((1 << bits) - 1)) as u8);
                }
            }
        }
        codes
    }

    #[test]
    fn blocked_gptq_matches_a_column_by_column_reference() {
        let (rows, cols, tokens) = (6, 96, 300);
        let mut x = calibration(tokens, cols, 12);
        for t in 0..tokens {
            x[(t, 40)] = 0.0;
        }
        let h = gram(&x);
        let w = weights(rows, cols, 13);
        for scheme in [int(3, 32, true), int(4, 32, false), int(2, 32, false)] {
            for act_order in [false, true] {
                // Lazy blocks of one group, of two groups (48 rounds up), and wider than the matrix.
                for block in [32, 48, 128] {
                    let options = GptqOptions {
                        block,
                        act_order,
                        ..GptqOptions::default()
                    };
                    let prepared = GptqHessian::new(&h, cols, &options).unwrap();
                    let q = prepared.quantise(&w, rows, scheme).unwrap();
                    let (codes, losses) =
                        reference(&w, rows, cols, &h, scheme, prepared.damping(), act_order);
                    let at = format!("{scheme} act_order {act_order} block {block}");
                    assert_eq!(codes_of(&q), codes, "{at}");
                    for (a, b) in q.row_loss.iter().zip(&losses) {
                        assert!(relative(*a, *b) < 1e-8, "{at}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn rows_are_quantised_independently_of_the_other_rows() {
        // What lets the candidate errors measure GPTQ on a sample of a matrix's rows.
        let (rows, cols, tokens) = (40, 256, 600);
        let h = gram(&calibration(tokens, cols, 21));
        let w = weights(rows, cols, 22);
        let picked = [1, 7, 8, 30, 39];
        let sub: Vec<f32> = picked
            .iter()
            .flat_map(|&r| &w[r * cols..(r + 1) * cols])
            .copied()
            .collect();
        for (scheme, refine_passes) in [
            (int(3, 64, false), 0),
            (Scheme::parse("q4_k").unwrap(), 0),
            (int(2, 64, false), 4),
            (Scheme::parse("q3_k").unwrap(), 4),
        ] {
            let options = GptqOptions {
                refine_passes,
                ..GptqOptions::default()
            };
            let prepared = GptqHessian::new(&h, cols, &options).unwrap();
            let all = prepared.quantise(&w, rows, scheme).unwrap();
            let some = prepared.quantise(&sub, picked.len(), scheme).unwrap();
            for (i, &r) in picked.iter().enumerate() {
                let at = format!("{scheme} refined {refine_passes} row {r}");
                let (a, b) = (all.row_loss[r], some.row_loss[i]);
                assert!(relative(a, b) < 1e-9, "{at}: {a} vs {b}");
                assert_eq!(
                    all.dequantised[r * cols..(r + 1) * cols],
                    some.dequantised[i * cols..(i + 1) * cols],
                    "{at}"
                );
            }
        }
    }

    #[test]
    fn bad_inputs_are_refused_with_the_reason() {
        let (rows, cols) = (4, 64);
        let h = gram(&calibration(100, cols, 14));
        let w = weights(rows, cols, 15);
        let scheme = int(4, 32, true);
        let options = GptqOptions::default();
        let message = |r: Result<Quantised>| r.unwrap_err().to_string();

        let m = message(gptq(
            &w[..rows * 48],
            rows,
            48,
            &h[..48 * 48],
            scheme,
            &options,
        ));
        assert!(
            m.contains("whole blocks of 32") && m.contains("48 columns"),
            "{m}"
        );
        let m = message(gptq(
            &w[..rows * cols - 1],
            rows,
            cols,
            &h,
            scheme,
            &options,
        ));
        assert!(m.contains("256 values, got 255"), "{m}");
        let m = message(gptq(&w, rows, cols, &h[1..], scheme, &options));
        assert!(m.contains("Hessian") && m.contains("4096 entries"), "{m}");

        let mut bad = w.clone();
        bad[cols + 3] = f32::NAN;
        let m = message(gptq(&bad, rows, cols, &h, scheme, &options));
        assert!(m.contains("weight (1, 3) is NaN"), "{m}");
        let m = message(round_to_nearest(&bad, rows, cols, None, scheme, &options));
        assert!(m.contains("weight (1, 3) is NaN"), "{m}");

        let mut bad = h.clone();
        bad[2 * cols + 7] = f64::INFINITY;
        let m = message(gptq(&w, rows, cols, &bad, scheme, &options));
        assert!(m.contains("(2, 7) is inf"), "{m}");
        let mut bad = h.clone();
        bad[9 * cols + 9] = -1.0;
        let m = message(gptq(&w, rows, cols, &bad, scheme, &options));
        assert!(m.contains("diagonal entry 9 is negative"), "{m}");

        // Indefinite: no damping within the retries makes it positive definite.
        let mut bad = vec![0.0; cols * cols];
        for i in 0..cols {
            bad[i * cols + i] = 1.0;
        }
        bad[1] = 100.0;
        bad[cols] = 100.0;
        let m = message(gptq(&w, rows, cols, &bad, scheme, &options));
        assert!(m.contains("not positive definite"), "{m}");

        for bad in [
            GptqOptions {
                block: 0,
                ..options
            },
            GptqOptions {
                damp: -0.1,
                ..options
            },
        ] {
            assert!(gptq(&w, rows, cols, &h, scheme, &bad).is_err());
        }
        // A prepared Hessian for other columns.
        let prepared = GptqHessian::new(&h, cols, &options).unwrap();
        let m = message(prepared.quantise(&w[..rows * 32], rows, scheme));
        assert!(m.contains("256 values, got 128"), "{m}");
        // No rows is a valid, empty matrix.
        let q = gptq(&[], 0, cols, &h, scheme, &options).unwrap();
        assert!(q.bytes.is_empty() && q.row_loss.is_empty());
    }

    /// `cargo test --release --lib quant::gptq::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore = "timing; run by hand"]
    fn timing_an_expert_projection() {
        let (rows, cols, tokens) = (768, 2048, 4096);
        let mut rng = SplitMix64::new(16);
        let common = Mat::from_fn(tokens, 64, |_, _| rng.normal());
        let mix = Mat::from_fn(64, cols, |_, _| rng.normal() * 0.5);
        let x = Mat::from_fn(tokens, cols, |_, _| rng.normal()) + &common * &mix;
        let h = gram(&x);
        let w = weights(rows, cols, 17);
        let scheme = int(4, 128, true);
        for (act_order, refine_passes) in [(false, 0), (true, 0), (true, 4)] {
            let options = GptqOptions {
                act_order,
                refine_passes,
                ..GptqOptions::default()
            };
            let t = std::time::Instant::now();
            let prepared = GptqHessian::new(&h, cols, &options).unwrap();
            let factor = t.elapsed();
            let mut quantise = std::time::Duration::MAX;
            let mut q = None;
            for _ in 0..3 {
                let t = std::time::Instant::now();
                q = Some(prepared.quantise(&w, rows, scheme).unwrap());
                quantise = quantise.min(t.elapsed());
            }
            let q = q.unwrap();
            let t = std::time::Instant::now();
            let rtn = round_to_nearest(&w, rows, cols, Some(&h), scheme, &options).unwrap();
            let nearest = t.elapsed();
            println!(
                "{rows}×{cols} {scheme} act_order {act_order} refined {refine_passes}: factor {factor:.2?}, GPTQ {quantise:.2?}, \
                 RTN (with loss) {nearest:.2?}; loss GPTQ/RTN {:.3}",
                q.row_loss.iter().sum::<f64>() / rtn.row_loss.iter().sum::<f64>()
            );
        }
    }

    #[test]
    #[ignore = "timing; run by hand"]
    fn timing_candidate_estimates() {
        let (rows, cols, tokens) = (768, 2048, 1024);
        let mut rng = SplitMix64::new(18);
        let x = Mat::from_fn(tokens, cols, |_, _| rng.normal());
        let h = gram(&x);
        let w = weights(rows, cols, 19);
        let options = GptqOptions {
            act_order: true,
            ..GptqOptions::default()
        };
        let prepared = GptqHessian::new(&h, cols, &options).unwrap();
        let schemes = crate::pipeline::methods::quantise::default_schemes();
        let t = std::time::Instant::now();
        let mut total = 0.0;
        for &scheme in &schemes {
            total += prepared
                .estimate_row_loss(&w, rows, scheme)
                .unwrap()
                .iter()
                .sum::<f64>();
        }
        println!(
            "{rows}×{cols}: estimates in {} formats {:.2?} (total {total:e})",
            schemes.len(),
            t.elapsed()
        );
    }

    #[test]
    fn a_hessian_prepared_for_estimates_estimates_alike_and_cannot_quantise() {
        let (rows, cols) = (16, 256);
        let w = weights(rows, cols, 7);
        let h = gram(&calibration(96, cols, 8));
        let options = GptqOptions::default();
        let full = GptqHessian::new(&h, cols, &options).unwrap();
        let light = GptqHessian::for_estimates(&h, cols, &options).unwrap();
        assert_eq!(light.damping(), full.damping());
        for scheme in [int(2, 64, false), int(4, 128, true)] {
            let (a, b) = (
                full.estimate_row_loss(&w, rows, scheme).unwrap(),
                light.estimate_row_loss(&w, rows, scheme).unwrap(),
            );
            // The full factor's diagonal is the reciprocal of the Cholesky factor's too.
            assert_eq!(a, b);
        }
        assert_eq!(full.row_energy(&w), light.row_energy(&w));
        assert!(light.quantise(&w, rows, int(4, 128, true)).is_err());
    }
}
