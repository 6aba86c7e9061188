//! The statistics the gates use: normal and Student t quantiles, Wilson score bounds for a
//! rate, and Welch's unequal-variance comparison of two groups of per-device values.
//!
//! Everything is closed-form (no iteration that could fail to converge) and returns finite
//! numbers for every input, so gate reports can be serialised as JSON.

/// The standard normal quantile (inverse CDF) for `p` in (0, 1), by Acklam's rational
/// approximation (relative error below 1.2e-9). `p` is clamped to [1e-12, 1 - 1e-12].
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = if p.is_nan() {
        0.5
    } else {
        p.clamp(1e-12, 1.0 - 1e-12)
    };
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.024_25 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.024_25 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The Student t quantile for `p` in [0.5, 1) and `df` degrees of freedom, by the
/// Cornish-Fisher expansion around the normal quantile (Hill 1970, four terms). For `df >= 3`
/// it is within 0.3 % of the exact value at the confidences the gates use; `df` below 1 is
/// treated as 1 (conservatively wide).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    let z = normal_quantile(p);
    let v = if df.is_finite() { df.max(1.0) } else { 1e9 };
    if v > 1e7 {
        return z;
    }
    let z2 = z * z;
    let g1 = (z2 + 1.0) * z / 4.0;
    let g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0;
    let g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0;
    let g4 = ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0;
    z + g1 / v + g2 / (v * v) + g3 / (v * v * v) + g4 / (v * v * v * v)
}

/// An estimate with a confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Interval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

/// Wilson score interval of the rate `x / n` with `z` standard errors on each side
/// (`z = normal_quantile(confidence)` makes each side a one-sided bound at `confidence`).
/// Unlike the textbook `p +- z sqrt(p(1-p)/n)`, it is sensible at 0 and `n` and for small `n`.
/// `None` when `n == 0`.
pub fn wilson(x: u64, n: u64, z: f64) -> Option<Interval> {
    if n == 0 {
        return None;
    }
    let n_f = n as f64;
    let p = x.min(n) as f64 / n_f;
    let z2 = z * z;
    let denom = 1.0 + z2 / n_f;
    let center = (p + z2 / (2.0 * n_f)) / denom;
    let half = z / denom * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt();
    Some(Interval {
        estimate: p,
        low: (center - half).max(0.0),
        high: (center + half).min(1.0),
    })
}

/// Mean and sample variance of a group of per-device values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moments {
    pub n: usize,
    pub mean: f64,
    pub var: f64,
}

impl Moments {
    /// `None` for an empty group; the variance of a single value is 0.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Some(Self { n, mean, var })
    }

    /// Squared standard error of the mean, with the standard deviation floored at `sd_floor`.
    pub fn se2(&self, sd_floor: f64) -> f64 {
        self.var.max(sd_floor * sd_floor) / self.n as f64
    }
}

/// Welch-Satterthwaite degrees of freedom for two squared standard errors.
pub fn welch_df(se2_a: f64, n_a: usize, se2_b: f64, n_b: usize) -> f64 {
    let num = (se2_a + se2_b) * (se2_a + se2_b);
    let term = |se2: f64, n: usize| {
        if n > 1 {
            se2 * se2 / (n - 1) as f64
        } else {
            f64::INFINITY
        }
    };
    let den = term(se2_a, n_a) + term(se2_b, n_b);
    if den > 0.0 && den.is_finite() && num > 0.0 {
        (num / den).max(1.0)
    } else {
        1.0
    }
}

/// Interval for `mean(b) - mean(a)` by Welch's t with `confidence` on each side.
pub fn welch_difference(a: &Moments, b: &Moments, sd_floor: f64, confidence: f64) -> Interval {
    let (sa, sb) = (a.se2(sd_floor), b.se2(sd_floor));
    let t = t_quantile(confidence, welch_df(sa, a.n, sb, b.n));
    let d = b.mean - a.mean;
    let half = t * (sa + sb).sqrt();
    Interval {
        estimate: d,
        low: d - half,
        high: d + half,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn normal_quantiles_match_tables() {
        assert!(close(normal_quantile(0.5), 0.0, 1e-9));
        assert!(close(normal_quantile(0.95), 1.644_853_6, 1e-6));
        assert!(close(normal_quantile(0.975), 1.959_964, 1e-6));
        assert!(close(normal_quantile(0.999), 3.090_232, 1e-5));
        assert!(close(normal_quantile(0.01), -2.326_348, 1e-5));
        assert!(normal_quantile(f64::NAN).is_finite() && normal_quantile(1.0).is_finite());
    }

    #[test]
    fn t_quantiles_match_tables() {
        // Two-sided 90 % (one-sided 95 %) critical values.
        for (df, t) in [(3.0, 2.353), (5.0, 2.015), (10.0, 1.812), (30.0, 1.697)] {
            let got = t_quantile(0.95, df);
            assert!(close(got, t, 0.006 * t), "df {df}: {got} vs {t}");
        }
        assert!(close(t_quantile(0.975, 20.0), 2.086, 0.005));
        assert!(close(t_quantile(0.95, 1e9), 1.6449, 1e-3));
        assert!(t_quantile(0.95, 0.2).is_finite() && t_quantile(0.95, 0.2) > 2.0);
    }

    #[test]
    fn wilson_bounds() {
        let z = normal_quantile(0.95);
        // 3 failures of 10: confidently above 5 %.
        let i = wilson(3, 10, z).unwrap();
        assert!(close(i.low, 0.1269, 1e-3), "{i:?}");
        assert!(i.low > 0.05);
        // The bound alone would call 1 of 3 above 5 % (lower bound 7.8 %): the gates' minimum
        // number of devices done is what keeps three devices from deciding.
        assert!(wilson(1, 3, z).is_some_and(|i| close(i.low, 0.0783, 1e-3)));
        // 0 of 20 still allows ~12 %.
        assert!(wilson(0, 20, z).is_some_and(|i| i.low == 0.0 && close(i.high, 0.1192, 1e-3)));
        assert!(wilson(0, 0, z).is_none());
        assert!(wilson(5, 5, z).is_some_and(|i| i.high == 1.0 && i.low > 0.5));
    }

    #[test]
    fn welch_interval_covers_the_difference() {
        let a = Moments::of(&[0.90, 0.91, 0.89, 0.90, 0.92, 0.88]).unwrap();
        let b = Moments::of(&[0.80, 0.81, 0.79, 0.80, 0.82, 0.78]).unwrap();
        let i = welch_difference(&a, &b, 0.0, 0.95);
        assert!(close(i.estimate, -0.10, 1e-9));
        assert!(i.low < -0.10 && i.high > -0.10 && i.high < -0.08, "{i:?}");
        assert!(close(welch_df(1.0, 11, 1.0, 11), 20.0, 1e-9));
        assert_eq!(Moments::of(&[]), None);
        let one = Moments::of(&[1.0]).unwrap();
        assert_eq!(one.var, 0.0);
        assert!(close(one.se2(0.1), 0.01, 1e-12));
    }
}
