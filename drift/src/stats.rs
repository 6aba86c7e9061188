//! Distribution distances and tests on binned counts.
//!
//! Everything takes raw counts (reference and current) over the same cells, so the devices'
//! histograms are the input; nothing needs a raw sample. Cells are the bins plus the
//! underflow, overflow and NaN cells where the caller includes them.
//!
//! - [`psi`]: population stability index, with Jeffreys smoothing (half a count per cell) so
//!   empty cells never give infinities;
//! - [`js_distance`]: Jensen-Shannon distance, base 2, in `[0, 1]`;
//! - [`chi2_two_sample`]: the chi-square test of homogeneity of two binned samples, which
//!   accounts for the finite reference sample as well as the current one;
//! - [`psi_critical`]: the PSI above which a shift is significant at level `alpha` for these
//!   sample sizes and this many cells (Potgieter et al. 2023: under no shift,
//!   `PSI / (1/n + 1/m)` is approximately chi-square with `cells - 1` degrees of freedom). A
//!   fixed cut-off of 0.1 or 0.25 over-alarms on 10-sample windows and under-alarms on large ones;
//! - [`benjamini_hochberg`]: false-discovery-rate control over many tests at once.

/// Smoothing added to every cell before proportions are taken (Jeffreys prior).
pub const SMOOTHING: f64 = 0.5;

/// Smoothed proportions of `counts`.
pub fn proportions(counts: &[u64]) -> Vec<f64> {
    let total: f64 =
        counts.iter().map(|&c| c as f64).sum::<f64>() + SMOOTHING * counts.len() as f64;
    counts
        .iter()
        .map(|&c| (c as f64 + SMOOTHING) / total.max(f64::MIN_POSITIVE))
        .collect()
}

/// Population stability index of `current` against `reference` (same cells).
pub fn psi(reference: &[u64], current: &[u64]) -> f64 {
    let (r, c) = (proportions(reference), proportions(current));
    r.iter()
        .zip(&c)
        .map(|(&r, &c)| (c - r) * (c / r).ln())
        .sum::<f64>()
        .max(0.0)
}

/// Jensen-Shannon distance (square root of the divergence, base 2), in `[0, 1]`.
pub fn js_distance(reference: &[u64], current: &[u64]) -> f64 {
    let (p, q) = (proportions(reference), proportions(current));
    let mut d = 0.0;
    for (&p, &q) in p.iter().zip(&q) {
        let m = 0.5 * (p + q);
        d += 0.5 * p * (p / m).log2() + 0.5 * q * (q / m).log2();
    }
    d.clamp(0.0, 1.0).sqrt()
}

/// The result of a chi-square test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChiSquare {
    pub statistic: f64,
    pub df: u32,
    pub p_value: f64,
}

/// Chi-square test that `reference` and `current` come from the same distribution.
///
/// The two-sample form (Press et al., `chstwo`): `sum (sqrt(m/n) O - sqrt(n/m) R)^2 / (O + R)`
/// over cells where either is non-zero, `cells - 1` degrees of freedom. `None` when either
/// sample is empty or fewer than two cells are occupied.
pub fn chi2_two_sample(reference: &[u64], current: &[u64]) -> Option<ChiSquare> {
    let (statistic, df) = chi2_two_sample_statistic(reference, current)?;
    Some(ChiSquare {
        statistic,
        df,
        p_value: chi2_sf(statistic, f64::from(df)),
    })
}

/// Cells whose expected count (in the smaller sample) is below this are merged with their
/// neighbours before the chi-square test: the chi-square approximation fails on sparse cells
/// (a reference underflow cell of 11 in 40,000 and 2 of 400 in a device window would look like
/// a one-in-a-million event).
pub const MIN_EXPECTED: f64 = 5.0;

/// The statistic and degrees of freedom of [`chi2_two_sample`] without the p-value (which
/// costs an incomplete gamma function: compare with a cached critical value first).
///
/// Cells are taken in order and merged with the following ones until their expected count
/// reaches [`MIN_EXPECTED`]; a sparse remainder joins the last merged cell. Callers order
/// cells so that neighbours are adjacent (underflow, bins, overflow, then NaN).
pub fn chi2_two_sample_statistic(reference: &[u64], current: &[u64]) -> Option<(f64, u32)> {
    let m: f64 = reference.iter().map(|&c| c as f64).sum();
    let n: f64 = current.iter().map(|&c| c as f64).sum();
    if m <= 0.0 || n <= 0.0 {
        return None;
    }
    let (a, b) = ((m / n).sqrt(), (n / m).sqrt());
    let term = |r: f64, o: f64| {
        let d = a * o - b * r;
        d * d / (r + o)
    };
    let scale = n.min(m) / (n + m);
    let mut statistic = 0.0;
    let mut cells = 0u32;
    let (mut r_acc, mut o_acc) = (0.0, 0.0);
    let mut last: Option<(f64, f64)> = None;
    for (&r, &o) in reference.iter().zip(current) {
        r_acc += r as f64;
        o_acc += o as f64;
        if (r_acc + o_acc) * scale >= MIN_EXPECTED {
            statistic += term(r_acc, o_acc);
            cells += 1;
            last = Some((r_acc, o_acc));
            r_acc = 0.0;
            o_acc = 0.0;
        }
    }
    if r_acc + o_acc > 0.0 {
        match last {
            Some((lr, lo)) => {
                statistic += term(lr + r_acc, lo + o_acc) - term(lr, lo);
            }
            None => return None,
        }
    }
    let df = cells.checked_sub(1).filter(|&d| d > 0)?;
    Some((statistic, df))
}

/// The PSI a shift must exceed to be significant at `alpha`, for a current sample of `n`, a
/// reference of `m` and `cells` cells.
pub fn psi_critical(alpha: f64, cells: usize, n: f64, m: f64) -> f64 {
    if n <= 0.0 || m <= 0.0 || cells < 2 {
        return f64::INFINITY;
    }
    chi2_quantile(1.0 - alpha, (cells - 1) as f64) * (1.0 / n + 1.0 / m)
}

/// Survival function of the chi-square distribution: `P(X > x)` with `k` degrees of freedom.
pub fn chi2_sf(x: f64, k: f64) -> f64 {
    if x.is_nan() || k <= 0.0 {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 1.0;
    }
    gamma_q(0.5 * k, 0.5 * x)
}

/// The `p` quantile of the chi-square distribution with `k` degrees of freedom.
pub fn chi2_quantile(p: f64, k: f64) -> f64 {
    if !(0.0..1.0).contains(&p) || k <= 0.0 {
        return f64::NAN;
    }
    // Bracket, then bisect on the survival function (monotone); 100 steps reach f64 precision.
    let (mut lo, mut hi) = (0.0, k.max(1.0));
    while 1.0 - chi2_sf(hi, k) < p {
        hi *= 2.0;
        if hi > 1e12 {
            return f64::INFINITY;
        }
    }
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if 1.0 - chi2_sf(mid, k) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Natural log of the gamma function (Lanczos, g = 7, n = 9), for `x > 0`.
pub fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, &g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Regularised upper incomplete gamma function `Q(a, x)`.
fn gamma_q(a: f64, x: f64) -> f64 {
    if x < a + 1.0 {
        1.0 - gamma_p_series(a, x)
    } else {
        gamma_q_fraction(a, x)
    }
}

fn gamma_p_series(a: f64, x: f64) -> f64 {
    let mut sum = 1.0 / a;
    let mut term = sum;
    let mut ap = a;
    for _ in 0..1000 {
        ap += 1.0;
        term *= x / ap;
        sum += term;
        if term.abs() < sum.abs() * 1e-15 {
            break;
        }
    }
    (sum.ln() - x + a * x.ln() - ln_gamma(a))
        .exp()
        .clamp(0.0, 1.0)
}

fn gamma_q_fraction(a: f64, x: f64) -> f64 {
    // Modified Lentz.
    const TINY: f64 = 1e-300;
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / TINY;
    let mut d = 1.0 / b;
    let mut h = d;
    for i in 1..1000 {
        let an = -(i as f64) * (i as f64 - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < TINY {
            d = TINY;
        }
        c = b + an / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-15 {
            break;
        }
    }
    ((-x + a * x.ln() - ln_gamma(a)).exp() * h).clamp(0.0, 1.0)
}

/// Benjamini-Hochberg: which of `p_values` are discoveries at false-discovery rate `q`.
/// NaN p-values are never discoveries.
pub fn benjamini_hochberg(p_values: &[f64], q: f64) -> Vec<bool> {
    benjamini_hochberg_of(p_values, q, 0)
}

/// [`benjamini_hochberg`] over `total` hypotheses of which only `p_values` are listed (the
/// others are known to exceed `q`, so they can never be discoveries but still count).
pub fn benjamini_hochberg_of(p_values: &[f64], q: f64, total: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..p_values.len())
        .filter(|&i| !p_values[i].is_nan())
        .collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let m = order.len().max(total) as f64;
    let mut cut = None;
    for (rank, &i) in order.iter().enumerate() {
        if p_values[i] <= q * (rank + 1) as f64 / m {
            cut = Some(rank);
        }
    }
    let mut out = vec![false; p_values.len()];
    if let Some(cut) = cut {
        for &i in &order[..=cut] {
            out[i] = true;
        }
    }
    out
}

/// One-sided z-test that an error rate `errors / n` exceeds a reference error rate `p0`
/// (the DDM drift rule of Gama et al. against a known baseline: drift when
/// `p + s > p0 + z s0`). Returns the z score; `None` below `min_n` observations.
pub fn error_rate_z(errors: u64, n: u64, p0: f64, min_n: u64) -> Option<f64> {
    if n < min_n.max(1) {
        return None;
    }
    let n = n as f64;
    let p = errors as f64 / n;
    let p0 = p0.clamp(1e-6, 1.0 - 1e-6);
    let s0 = (p0 * (1.0 - p0) / n).sqrt();
    Some((p - p0) / s0)
}

/// Upper-tail probability of the standard normal.
pub fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function (Numerical Recipes' Chebyshev fit, relative error < 1.2e-7).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-12)
    }

    #[test]
    fn chi_square_matches_tables() {
        // Quantiles from standard tables.
        assert!(close(chi2_quantile(0.95, 1.0), 3.841_459, 1e-5));
        assert!(close(chi2_quantile(0.95, 15.0), 24.995_790, 1e-5));
        assert!(close(chi2_quantile(0.99, 18.0), 34.805_306, 1e-5));
        assert!(close(chi2_sf(3.841_459, 1.0), 0.05, 1e-4));
        assert!(close(chi2_sf(100.0, 10.0), 7.694_598e-17, 1e-3));
        assert_eq!(chi2_sf(0.0, 3.0), 1.0);
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        for (n, f) in [(1.0, 1.0f64), (5.0, 24.0), (11.0, 3_628_800.0)] {
            assert!(close(ln_gamma(n), f.ln(), 1e-10) || f == 1.0 && ln_gamma(n).abs() < 1e-12);
        }
        assert!(close(
            ln_gamma(0.5),
            std::f64::consts::PI.sqrt().ln(),
            1e-10
        ));
    }

    #[test]
    fn identical_distributions_score_zero() {
        let r = [100, 200, 300, 400];
        assert!(psi(&r, &r) < 1e-12);
        assert!(js_distance(&r, &r) < 1e-6);
        let t = chi2_two_sample(&r, &r).unwrap();
        assert!(t.statistic < 1e-12 && close(t.p_value, 1.0, 1e-9));
    }

    #[test]
    fn psi_matches_the_textbook_formula_and_handles_empty_cells() {
        let r = [500u64, 500];
        let c = [800u64, 200];
        let (pr, pc) = (proportions(&r), proportions(&c));
        let want: f64 = (0..2).map(|i| (pc[i] - pr[i]) * (pc[i] / pr[i]).ln()).sum();
        assert!(close(psi(&r, &c), want, 1e-12));
        assert!(psi(&[10, 0], &[0, 10]).is_finite());
        assert!(js_distance(&[10, 0], &[0, 10]) > 0.8);
    }

    #[test]
    fn shifted_counts_are_significant_and_critical_psi_shrinks_with_n() {
        let r = [250u64, 250, 250, 250];
        let t = chi2_two_sample(&r, &[400, 300, 200, 100]).unwrap();
        assert_eq!(t.df, 3);
        // A sparse tail cell joins its neighbour instead of dominating the statistic.
        let sparse = chi2_two_sample(&[2500, 2500, 11], &[25, 23, 2]).unwrap();
        assert_eq!(sparse.df, 1);
        assert!(sparse.p_value > 0.5, "{sparse:?}");
        assert!(t.p_value < 1e-10);
        let small = psi_critical(0.01, 16, 20.0, 10_000.0);
        let large = psi_critical(0.01, 16, 10_000.0, 10_000.0);
        assert!(small > 0.25, "small windows need a big PSI: {small}");
        assert!(large < 0.01, "large windows detect a small PSI: {large}");
    }

    #[test]
    fn benjamini_hochberg_controls_discoveries() {
        let p = [
            0.001,
            0.008,
            0.039,
            0.041,
            0.042,
            0.06,
            0.074,
            0.205,
            f64::NAN,
        ];
        // Classic example: at q = 0.05 the first two are discoveries.
        let d = benjamini_hochberg(&p, 0.05);
        assert_eq!(
            d,
            [true, true, false, false, false, false, false, false, false]
        );
        assert!(benjamini_hochberg(&[], 0.05).is_empty());
    }

    #[test]
    fn error_rate_z_and_normal_tail() {
        assert!(error_rate_z(5, 20, 0.1, 30).is_none());
        let z = error_rate_z(300, 1000, 0.1, 30).unwrap();
        assert!(z > 20.0);
        assert!(close(normal_sf(1.959_964), 0.025, 1e-5));
        assert!(close(normal_sf(-1.959_964), 0.975, 1e-6));
    }
}
