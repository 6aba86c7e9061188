//! Fixed-capacity sketches of a stream of inferences.
//!
//! Every sketch has its capacity in its type, costs O(1) (O(log B) for a bin search over a fixed
//! `B`) per observation, never allocates, and merges by addition: merging the sketches of two
//! windows gives the sketch of the joined window. Counters saturate at `u32::MAX` instead of
//! wrapping, which keeps merge associative and commutative.

/// Why a sketch configuration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ConfigError {
    /// Bin edges must be finite and strictly increasing.
    EdgesNotIncreasing,
    /// A sketch needs at least one bin.
    NoBins,
}

/// The edges of `B` bins: `lo` and the upper edge of each bin.
///
/// Bin `i` holds `upper[i-1] <= x < upper[i]` (with `upper[-1] = lo`); the last bin is closed
/// (`x == upper[B-1]` falls in it). Values below `lo` count as underflow, above the last edge as
/// overflow, NaN apart. Edges come from the deployed model's monitoring profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Edges<const B: usize> {
    lo: f32,
    upper: [f32; B],
}

/// Where one observation lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    Underflow,
    Bin(usize),
    Overflow,
    Nan,
}

impl<const B: usize> Edges<B> {
    /// Validated edges: `lo < upper[0] < ... < upper[B-1]`, all finite.
    pub fn new(lo: f32, upper: [f32; B]) -> Result<Self, ConfigError> {
        if B == 0 {
            return Err(ConfigError::NoBins);
        }
        let mut prev = lo;
        if !lo.is_finite() {
            return Err(ConfigError::EdgesNotIncreasing);
        }
        for &e in &upper {
            if !e.is_finite() || e <= prev {
                return Err(ConfigError::EdgesNotIncreasing);
            }
            prev = e;
        }
        Ok(Self { lo, upper })
    }

    /// Lower edge of the first bin.
    pub fn lo(&self) -> f32 {
        self.lo
    }

    /// Upper edge of the last bin.
    pub fn hi(&self) -> f32 {
        self.upper[B - 1]
    }

    /// Upper edges of the bins.
    pub fn upper(&self) -> &[f32; B] {
        &self.upper
    }

    /// The cell `x` falls in (binary search over the fixed `B` edges).
    pub fn cell(&self, x: f32) -> Cell {
        if x.is_nan() {
            Cell::Nan
        } else if x < self.lo {
            Cell::Underflow
        } else if x > self.hi() {
            Cell::Overflow
        } else {
            Cell::Bin(self.upper.partition_point(|&u| u <= x).min(B - 1))
        }
    }
}

/// Counts per bin plus underflow, overflow and NaN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Histogram<const B: usize> {
    pub bins: [u32; B],
    pub underflow: u32,
    pub overflow: u32,
    pub nan: u32,
}

impl<const B: usize> Default for Histogram<B> {
    fn default() -> Self {
        Self {
            bins: [0; B],
            underflow: 0,
            overflow: 0,
            nan: 0,
        }
    }
}

impl<const B: usize> Histogram<B> {
    /// Counts one observation in `cell`.
    pub fn add(&mut self, cell: Cell) {
        let slot = match cell {
            Cell::Underflow => &mut self.underflow,
            Cell::Overflow => &mut self.overflow,
            Cell::Nan => &mut self.nan,
            Cell::Bin(i) => match self.bins.get_mut(i) {
                Some(slot) => slot,
                None => &mut self.overflow,
            },
        };
        *slot = slot.saturating_add(1);
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.bins.iter_mut().zip(other.bins.iter()) {
            *a = a.saturating_add(*b);
        }
        self.underflow = self.underflow.saturating_add(other.underflow);
        self.overflow = self.overflow.saturating_add(other.overflow);
        self.nan = self.nan.saturating_add(other.nan);
    }

    /// All observations, NaN included.
    pub fn total(&self) -> u64 {
        self.cells().map(u64::from).sum()
    }

    /// The `B + 3` counters in wire order: bins, underflow, overflow, NaN.
    pub fn cells(&self) -> impl Iterator<Item = u32> + Clone + '_ {
        self.bins
            .iter()
            .copied()
            .chain([self.underflow, self.overflow, self.nan])
    }
}

/// Count, mean and sum of squared deviations of the finite observations (Welford), mergeable
/// with Chan et al.'s pairwise formula.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Moments {
    pub n: u32,
    pub mean: f32,
    /// Sum of squared deviations from the mean; variance is `m2 / n`.
    pub m2: f32,
}

impl Moments {
    /// Adds one finite observation; non-finite values are ignored (the histogram counts them).
    pub fn add(&mut self, x: f32) {
        if !x.is_finite() || self.n == u32::MAX {
            return;
        }
        self.n += 1;
        let delta = x - self.mean;
        self.mean += delta / self.n as f32;
        self.m2 += delta * (x - self.mean);
    }

    /// Adds `other` into `self`. The weighted-sum form is symmetric in its two arguments, so
    /// merging is exactly commutative; associativity holds up to f32 rounding.
    pub fn merge(&mut self, other: &Self) {
        let n = u64::from(self.n) + u64::from(other.n);
        if n == 0 {
            return;
        }
        let (na, nb, nf) = (self.n as f32, other.n as f32, n as f32);
        let delta = other.mean - self.mean;
        let mean = (na * self.mean + nb * other.mean) / nf;
        self.m2 = self.m2 + other.m2 + delta * delta * (na * nb / nf);
        self.mean = mean;
        self.n = u32::try_from(n).unwrap_or(u32::MAX);
    }

    /// Population variance, 0 when empty.
    pub fn variance(&self) -> f32 {
        if self.n == 0 {
            0.0
        } else {
            (self.m2 / self.n as f32).max(0.0)
        }
    }
}

/// One input feature: its histogram against the profile's edges and its moments.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FeatureSketch<const B: usize> {
    pub hist: Histogram<B>,
    pub moments: Moments,
}

impl<const B: usize> FeatureSketch<B> {
    /// Records one value.
    pub fn add(&mut self, edges: &Edges<B>, x: f32) {
        self.hist.add(edges.cell(x));
        self.moments.add(x);
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Self) {
        self.hist.merge(&other.hist);
        self.moments.merge(&other.moments);
    }
}

/// A `R x C` matrix of counters, row-major on the wire. Used for the predicted-class histogram
/// (`1 x C`), the per-class top-1 confidence histogram (`C x K`) and confusion counts (`C x C`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountMatrix<const R: usize, const C: usize> {
    pub counts: [[u32; C]; R],
}

impl<const R: usize, const C: usize> Default for CountMatrix<R, C> {
    fn default() -> Self {
        Self {
            counts: [[0; C]; R],
        }
    }
}

impl<const R: usize, const C: usize> CountMatrix<R, C> {
    /// Counts one event at `(row, col)`; returns `false` (and counts nothing) when out of range.
    pub fn add(&mut self, row: usize, col: usize) -> bool {
        match self.counts.get_mut(row).and_then(|r| r.get_mut(col)) {
            Some(slot) => {
                *slot = slot.saturating_add(1);
                true
            }
            None => false,
        }
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Self) {
        for (ra, rb) in self.counts.iter_mut().zip(other.counts.iter()) {
            for (a, b) in ra.iter_mut().zip(rb.iter()) {
                *a = a.saturating_add(*b);
            }
        }
    }

    /// Sum of all counters.
    pub fn total(&self) -> u64 {
        self.cells().map(u64::from).sum()
    }

    /// Counters in wire (row-major) order.
    pub fn cells(&self) -> impl Iterator<Item = u32> + Clone + '_ {
        self.counts.iter().flat_map(|r| r.iter().copied())
    }
}

/// Index of the confidence bin for a top-1 probability: `K` equal-width bins over `[0, 1]`,
/// values outside clamped into the end bins. `None` for NaN.
pub fn confidence_bin<const K: usize>(confidence: f32) -> Option<usize> {
    if confidence.is_nan() {
        return None;
    }
    let scaled = confidence.clamp(0.0, 1.0) * K as f32;
    // `as` saturates for floats; clamp covers confidence == 1.0.
    Some((scaled as usize).min(K - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn edges_validate() {
        assert!(Edges::new(0.0, [1.0, 2.0]).is_ok());
        assert_eq!(
            Edges::new(0.0, [1.0, 1.0]),
            Err(ConfigError::EdgesNotIncreasing)
        );
        assert_eq!(
            Edges::new(f32::NAN, [1.0]),
            Err(ConfigError::EdgesNotIncreasing)
        );
        assert_eq!(Edges::<0>::new(0.0, []), Err(ConfigError::NoBins));
    }

    #[test]
    fn cells_follow_the_edges() {
        let e = Edges::new(0.0, [1.0, 2.0, 3.0]).unwrap();
        assert_eq!(e.cell(-0.1), Cell::Underflow);
        assert_eq!(e.cell(0.0), Cell::Bin(0));
        assert_eq!(e.cell(0.99), Cell::Bin(0));
        assert_eq!(e.cell(1.0), Cell::Bin(1));
        assert_eq!(e.cell(3.0), Cell::Bin(2));
        assert_eq!(e.cell(3.01), Cell::Overflow);
        assert_eq!(e.cell(f32::INFINITY), Cell::Overflow);
        assert_eq!(e.cell(f32::NAN), Cell::Nan);
    }

    #[test]
    fn moments_match_two_pass() {
        let xs = [1.0f32, 2.0, 4.0, 7.0, 11.0];
        let mut m = Moments::default();
        xs.iter().for_each(|&x| m.add(x));
        let mean = xs.iter().sum::<f32>() / 5.0;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / 5.0;
        assert!((m.mean - mean).abs() < 1e-5);
        assert!((m.variance() - var).abs() < 1e-4);
        m.add(f32::NAN);
        assert_eq!(m.n, 5);
    }

    #[test]
    fn confidence_bins() {
        assert_eq!(confidence_bin::<8>(0.0), Some(0));
        assert_eq!(confidence_bin::<8>(0.124), Some(0));
        assert_eq!(confidence_bin::<8>(0.125), Some(1));
        assert_eq!(confidence_bin::<8>(1.0), Some(7));
        assert_eq!(confidence_bin::<8>(7.0), Some(7));
        assert_eq!(confidence_bin::<8>(-1.0), Some(0));
        assert_eq!(confidence_bin::<8>(f32::NAN), None);
    }

    #[test]
    fn counters_saturate() {
        let mut a = Histogram::<2> {
            bins: [u32::MAX, 1],
            ..Default::default()
        };
        a.add(Cell::Bin(0));
        a.add(Cell::Bin(9)); // out of range bin index goes to overflow, never panics
        assert_eq!(a.bins[0], u32::MAX);
        assert_eq!(a.overflow, 1);
    }

    fn sketch_from(xs: &[f32]) -> FeatureSketch<4> {
        let e = Edges::new(-1.0, [0.0, 1.0, 2.0, 3.0]).unwrap();
        let mut s = FeatureSketch::default();
        xs.iter().for_each(|&x| s.add(&e, x));
        s
    }

    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => -2.0f32..5.0,
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
        ]
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-3 * (1.0 + a.abs().max(b.abs()))
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in proptest::collection::vec(value(), 0..50),
                                b in proptest::collection::vec(value(), 0..50)) {
            let (sa, sb) = (sketch_from(&a), sketch_from(&b));
            let mut ab = sa;
            ab.merge(&sb);
            let mut ba = sb;
            ba.merge(&sa);
            prop_assert_eq!(ab, ba);
        }

        #[test]
        fn merge_is_associative_and_equals_one_pass(
            a in proptest::collection::vec(value(), 0..40),
            b in proptest::collection::vec(value(), 0..40),
            c in proptest::collection::vec(value(), 0..40)) {
            let (sa, sb, sc) = (sketch_from(&a), sketch_from(&b), sketch_from(&c));
            let mut left = sa;
            left.merge(&sb);
            left.merge(&sc);
            let mut bc = sb;
            bc.merge(&sc);
            let mut right = sa;
            right.merge(&bc);
            let all: std::vec::Vec<f32> = a.iter().chain(&b).chain(&c).copied().collect();
            let one = sketch_from(&all);
            // Counts are exact.
            prop_assert_eq!(left.hist, right.hist);
            prop_assert_eq!(left.hist, one.hist);
            prop_assert_eq!(left.moments.n, one.moments.n);
            // Moments agree up to f32 rounding.
            prop_assert!(close(left.moments.mean, right.moments.mean));
            prop_assert!(close(left.moments.variance(), right.moments.variance()));
            prop_assert!(close(left.moments.mean, one.moments.mean));
            prop_assert!(close(left.moments.variance(), one.moments.variance()));
        }

        #[test]
        fn matrix_merge_is_associative_and_commutative(
            a in proptest::collection::vec((0usize..4, 0usize..5), 0..60),
            b in proptest::collection::vec((0usize..4, 0usize..5), 0..60),
            c in proptest::collection::vec((0usize..4, 0usize..5), 0..60)) {
            let m = |ev: &[(usize, usize)]| {
                let mut m = CountMatrix::<3, 4>::default();
                for &(r, c) in ev { m.add(r, c); }
                m
            };
            let (ma, mb, mc) = (m(&a), m(&b), m(&c));
            let mut l = ma; l.merge(&mb); l.merge(&mc);
            let mut bc = mb; bc.merge(&mc);
            let mut r = ma; r.merge(&bc);
            prop_assert_eq!(l, r);
            let mut ab = ma; ab.merge(&mb);
            let mut ba = mb; ba.merge(&ma);
            prop_assert_eq!(ab, ba);
        }
    }
}
