//! The estimated output error of a group's shared-basis factorisation at every rank the solver
//! is offered: the truncation error (the tail of the group's spectrum under its output weights
//! and whitening) plus, for int8 factors, the noise of rounding them.
//!
//! Input side (gate/up): with `X = W·S` (the stacked members, whitened) and `D` the rows' output
//! weights, the basis is fitted to `T = D^½·X`; with `V` its right singular vectors, the stored
//! factors are `A = X·V_r` (coefficients, int8 per row in blocks of 128 columns) and
//! `B = V_rᵀ·S⁻¹` (basis, int8 per row in blocks of 128). Rounding a block to int8 adds noise of
//! variance `(absmax/127)²/12` per value; to first order the output error grows by
//! `Σ_i D_i‖ΔA_i‖²` (the basis rows are orthonormal once whitened) plus
//! `Σ_j (Σ_i D_i A_ij²)·Σ_c var(ΔB_jc)·G_cc`.
//!
//! Output side (down): with `T` the stack of `√ω_j·S_jᵀ·W_jᵀ` and `U = V_r`, the stored factors
//! are `U` (int8 per row of `d`, blocks along the rank) and `C_j = Uᵀ·W_j` (int8 per row, blocks
//! along `p`); the noise adds `Σ_k σ_k²·Σ_a var(ΔU_ak)` and `Σ_j ω_j Σ_k Σ_c var(ΔC_jkc)·H_j,cc`.

use faer::Mat;

use crate::checkpoint::int8::{BLOCK, MAX_CODE};
use crate::error::Result;
use crate::linalg::{
    leading_right_singular_pairs_single, single_product, stack_rows, to_double, to_single,
};

/// Variance of rounding values of block maximum `absmax` to int8.
fn rounding_variance(absmax: f64) -> f64 {
    let step = absmax / f64::from(MAX_CODE);
    step * step / 12.0
}

/// Per rank `r` (1-based: entry `r − 1`), `Σ_{c<r} var` of row `row` stored int8 in blocks of
/// 128 of its first `r` values, each value's variance weighted by `weight(c)`.
fn prefix_row_noise(row: &[f64], weight: impl Fn(usize) -> f64, out: &mut [f64], scale: f64) {
    let (mut done, mut absmax, mut block_weight) = (0.0, 0.0f64, 0.0);
    for (c, &value) in row.iter().enumerate() {
        if c % BLOCK == 0 && c > 0 {
            done += rounding_variance(absmax) * block_weight;
            absmax = 0.0;
            block_weight = 0.0;
        }
        absmax = absmax.max(value.abs());
        block_weight += weight(c);
        if let Some(slot) = out.get_mut(c) {
            *slot += scale * (done + rounding_variance(absmax) * block_weight);
        }
    }
}

/// `Σ_c var(x_c)·weight_c` of a whole row stored int8 in blocks of 128.
fn row_noise(row: &[f64], weight: &[f64]) -> f64 {
    row.chunks(BLOCK)
        .zip(weight.chunks(BLOCK))
        .map(|(values, weights)| {
            let absmax = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            rounding_variance(absmax) * weights.iter().sum::<f64>()
        })
        .sum()
}

/// The estimated error at each of `ranks` (ascending, each at most the spectrum's length): the
/// spectrum's tail past the rank (summed from the smallest values, which keeps small tails
/// accurate) plus the factors' noise.
fn at_ranks(squared: &[f64], noise: &[f64], ranks: &[usize]) -> Vec<f64> {
    let mut tails = vec![0.0; squared.len() + 1];
    for r in (0..squared.len()).rev() {
        tails[r] = tails[r + 1] + squared[r];
    }
    ranks
        .iter()
        .map(|&r| {
            let noise = r.checked_sub(1).and_then(|k| noise.get(k)).copied();
            tails[r.min(squared.len())] + noise.unwrap_or(0.0)
        })
        .collect()
}

/// The right singular vectors of `t` (all of them, leading first) and their squared singular
/// values, in single precision: the estimates only rank candidates, and this is the largest
/// computation of the offer.
fn spectrum(t: &Mat<f64>) -> Result<(Mat<f64>, Vec<f64>)> {
    leading_right_singular_pairs_single(t, t.nrows().min(t.ncols()))
}

/// `Σ_k m_ck²` of every row `c` of `m`, each summed in column order.
fn row_energy(m: &Mat<f64>) -> Vec<f64> {
    let mut energy = vec![0.0; m.nrows()];
    for k in 0..m.ncols() {
        for (e, x) in energy.iter_mut().zip(column(m, k)) {
            *e += x * x;
        }
    }
    energy
}

/// Column `j` of `m` as a slice.
fn column(m: &Mat<f64>, j: usize) -> &[f64] {
    m.col_as_slice(j)
}

/// The errors at `ranks` of an input-side group: `x = W·S` (`k·p × d`), `weights` one per row,
/// `whitening` `S` (identity when None), int8 factors or not.
pub fn input_side(
    x: &Mat<f64>,
    weights: &[f64],
    whitening: Option<&Mat<f64>>,
    ranks: &[usize],
    int8: bool,
) -> Result<Vec<f64>> {
    let t = Mat::from_fn(x.nrows(), x.ncols(), |i, j| {
        weights[i].max(0.0).sqrt() * x[(i, j)]
    });
    let (v, squared) = spectrum(&t)?;
    let rank = squared.len();
    let mut noise = vec![0.0; rank];
    if int8 {
        // Transposed, so that each row of A is a contiguous column.
        let a_t = single_product(x.as_ref(), v.as_ref())
            .transpose()
            .to_owned();
        for (i, &d) in weights.iter().enumerate() {
            prefix_row_noise(column(&a_t, i), |_| 1.0, &mut noise, d.max(0.0));
        }
        // Basis rows Bᵀ = S⁻ᵀ V, and the whitened inputs' energy per column G_cc = ‖S_c‖².
        let (basis_t, column_energy) = match whitening {
            Some(s) => {
                let mut b = to_single(v.as_ref());
                to_single(s.as_ref())
                    .transpose()
                    .solve_upper_triangular_in_place(b.as_mut());
                let b = to_double(&b);
                (b, row_energy(s))
            }
            None => (v.clone(), vec![1.0; v.nrows()]),
        };
        let mut running = 0.0;
        for (j, &sigma) in squared.iter().enumerate() {
            let row: Vec<f64> = (0..basis_t.nrows()).map(|c| basis_t[(c, j)]).collect();
            running += sigma * row_noise(&row, &column_energy);
            noise[j] += running;
        }
    }
    Ok(at_ranks(&squared, &noise, ranks))
}

/// One member of an output-side group: its `W_jᵀ` (`p × d`), its whitening `S_j` (`p × p`) and
/// its output weight `ω_j`.
pub struct OutputMember<'a> {
    /// `W_jᵀ`.
    pub transposed: &'a Mat<f64>,
    /// `S_j` (identity when None).
    pub whitening: Option<&'a Mat<f64>>,
    /// `ω_j`.
    pub weight: f64,
}

/// The errors at `ranks` of an output-side (down) group of `members`, int8 factors or not.
pub fn output_side(members: &[OutputMember], ranks: &[usize], int8: bool) -> Result<Vec<f64>> {
    let blocks: Vec<Mat<f64>> = members
        .iter()
        .map(|m| {
            let scale = m.weight.max(0.0).sqrt();
            let whitened = match m.whitening {
                Some(s) => single_product(s.transpose(), m.transposed.as_ref()),
                None => m.transposed.clone(),
            };
            Mat::from_fn(whitened.nrows(), whitened.ncols(), |i, j| {
                scale * whitened[(i, j)]
            })
        })
        .collect();
    let t = stack_rows(&blocks)?;
    let (u, squared) = spectrum(&t)?;
    let rank = squared.len();
    let mut noise = vec![0.0; rank];
    if int8 {
        // The basis U [d, r], rows blocked along the rank, each value weighted by σ_k².
        let u_t = u.transpose().to_owned();
        for a in 0..u.nrows() {
            prefix_row_noise(column(&u_t, a), |k| squared[k], &mut noise, 1.0);
        }
        // The coefficients C_j = Uᵀ W_j: row k is (W_jᵀ u_k)ᵀ, blocked along p.
        let mut running = vec![0.0; rank];
        for member in members {
            let projected = single_product(member.transposed.as_ref(), u.as_ref());
            let energy: Vec<f64> = match member.whitening {
                Some(s) => row_energy(s),
                None => vec![1.0; projected.nrows()],
            };
            for (k, slot) in running.iter_mut().enumerate() {
                let row: Vec<f64> = (0..projected.nrows()).map(|c| projected[(c, k)]).collect();
                *slot += member.weight.max(0.0) * row_noise(&row, &energy);
            }
        }
        let mut prefix = 0.0;
        for (k, value) in running.iter().enumerate() {
            prefix += value;
            noise[k] += prefix;
        }
    }
    Ok(at_ranks(&squared, &noise, ranks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::int8;
    use crate::linalg::leading_right_singular_vectors;
    use crate::linalg::tests::TestRng;

    fn random(rng: &mut TestRng, rows: usize, cols: usize) -> Mat<f64> {
        Mat::from_fn(rows, cols, |_, _| rng.normal())
    }

    /// Quantises a host matrix to int8 and back, row blocks of 128.
    fn round_trip(m: &Mat<f64>) -> Mat<f64> {
        let values: Vec<f32> = (0..m.nrows())
            .flat_map(|i| (0..m.ncols()).map(move |j| (i, j)))
            .map(|(i, j)| m[(i, j)] as f32)
            .collect();
        let q = int8::quantise(&values, m.nrows(), m.ncols());
        let back = int8::dequantise(&q.codes, &q.scales, m.nrows(), m.ncols());
        Mat::from_fn(m.nrows(), m.ncols(), |i, j| back[i * m.ncols() + j] as f64)
    }

    #[test]
    fn without_int8_the_error_is_the_spectral_tail_and_falls_to_zero_at_full_rank() {
        let mut rng = TestRng::new(3);
        let x = random(&mut rng, 24, 10);
        let weights = vec![1.0; 24];
        let errors = input_side(&x, &weights, None, &[1, 5, 10], false).unwrap();
        assert!(errors[0] > errors[1] && errors[1] > errors[2]);
        assert!(errors[2].abs() < 1e-9 * errors[0], "{errors:?}");
    }

    #[test]
    fn single_precision_tails_match_the_double_precision_spectrum() {
        // A spectrum falling over four decades, as whitened expert groups have.
        let mut rng = TestRng::new(5);
        let (rows, cols) = (192, 96);
        let x = Mat::from_fn(rows, cols, |_, j| {
            rng.normal() * 10f64.powf(-4.0 * j as f64 / cols as f64)
        });
        let exact = crate::linalg::singular_values(&x).unwrap();
        let ranks: Vec<usize> = (1..=cols).collect();
        let errors = input_side(&x, &vec![1.0; rows], None, &ranks, false).unwrap();
        let total: f64 = exact.iter().map(|s| s * s).sum();
        for (&r, &error) in ranks.iter().zip(&errors) {
            let tail: f64 = exact[r..].iter().map(|s| s * s).sum();
            // Relative where the tail matters; single precision's rounding of the largest
            // values bounds the rest.
            assert!(
                (error - tail).abs() <= 1e-3 * tail + 1e-6 * total,
                "rank {r}: {error} against {tail} (total {total})"
            );
        }
    }

    #[test]
    fn the_int8_noise_estimate_matches_the_measured_error_of_rounded_factors() {
        let mut rng = TestRng::new(11);
        let (rows, cols) = (64, 40);
        // A lower-triangular whitening factor of a random Gram matrix, and uneven row weights.
        let g = random(&mut rng, cols, 3 * cols);
        let gram = &g * g.transpose();
        let s = crate::linalg::whitening_factor(&gram, 1e-4).unwrap();
        let w = random(&mut rng, rows, cols);
        let weights: Vec<f64> = (0..rows).map(|i| 0.5 + (i % 7) as f64).collect();
        let x = &w * &s;
        for rank in [8, 20, 40] {
            let estimate = input_side(&x, &weights, Some(&s), &[rank], true).unwrap()[0];
            // Measured: fit the weighted basis, round A and B, and weigh the whitened error.
            let t = Mat::from_fn(rows, cols, |i, j| weights[i].sqrt() * x[(i, j)]);
            let v = leading_right_singular_vectors(&t, rank).unwrap();
            let a = &x * &v;
            let mut bt = v.clone();
            s.transpose().solve_upper_triangular_in_place(bt.as_mut());
            let b = bt.transpose().to_owned();
            let rebuilt = round_trip(&a) * round_trip(&b);
            let error = (&w - &rebuilt) * &s;
            let measured: f64 = (0..rows)
                .map(|i| weights[i] * (0..cols).map(|j| error[(i, j)].powi(2)).sum::<f64>())
                .sum();
            let ratio = estimate / measured;
            assert!(
                (0.7..1.4).contains(&ratio),
                "rank {rank}: estimated {estimate}, measured {measured}"
            );
        }
    }
}
