//! Summary statistics of repeated measurements: the median and spread of a sample
//! ([`Summary`]) and of per-round ratios with the confidence interval of their median
//! ([`Ratio`]), which is what the verdicts are decided on.

use super::{lenient_float, lenient_pair, missing_float};
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// Median and spread of a set of samples. A figure missing from an older result file (or
/// written as `null` because it was not finite) reads as NaN, which the page prints as such.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Summary {
    #[serde(deserialize_with = "lenient_float")]
    pub p10: f64,
    #[serde(deserialize_with = "lenient_float")]
    pub p50: f64,
    #[serde(deserialize_with = "lenient_float")]
    pub p90: f64,
    #[serde(deserialize_with = "lenient_float")]
    pub p99: f64,
    #[serde(deserialize_with = "lenient_float")]
    pub min: f64,
    #[serde(deserialize_with = "lenient_float")]
    pub max: f64,
    pub n: usize,
}

impl Default for Summary {
    /// A summary that was not measured: every figure NaN.
    fn default() -> Self {
        let nan = missing_float();
        Self {
            p10: nan,
            p50: nan,
            p90: nan,
            p99: nan,
            min: nan,
            max: nan,
            n: 0,
        }
    }
}

impl Summary {
    pub fn of(samples: &[f64]) -> Result<Self> {
        ensure!(!samples.is_empty(), "no samples");
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        // Nearest-rank percentile: always one of the measured values.
        let percentile = |p: f64| {
            let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1]
        };
        Ok(Self {
            p10: percentile(10.0),
            p50: percentile(50.0),
            p90: percentile(90.0),
            p99: percentile(99.0),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            n: sorted.len(),
        })
    }
}

/// A distribution-free confidence interval of the median of `samples` with at least 95%
/// coverage: the order statistics x(k) and x(n+1-k) with the largest k for which
/// P(Binomial(n, 1/2) < k) ≤ 2.5% (the sign test's interval). It says how well the median
/// is known and narrows as 1/√n with more runs, where the spread of single runs (p10–p90)
/// does not. Below 6 samples no k qualifies and it is the whole range (coverage
/// 1 − 2^(1−n), under 95%).
pub fn median_ci(samples: &[f64]) -> Result<[f64; 2]> {
    ensure!(!samples.is_empty(), "no samples");
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    // In logs, so that 0.5^n does not underflow for many samples.
    let mut ln_pmf = n as f64 * 0.5f64.ln();
    let (mut cdf, mut k) = (0.0, 1);
    for j in 0..n {
        cdf += ln_pmf.exp();
        if cdf > 0.025 {
            break;
        }
        k = j + 1;
        ln_pmf += ((n - j) as f64 / (j + 1) as f64).ln();
    }
    let k = k.min(n.div_ceil(2));
    Ok([sorted[k - 1], sorted[n - k]])
}

/// Per-round ratios: their spread over rounds (`p10`…`p90`, flattened into the same JSON
/// object as before) for the reader, and the ~95% confidence interval of their median
/// ([`median_ci`]), which is what verdicts are decided on. Result files written before the
/// interval was recorded have no `ci_95`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Ratio {
    #[serde(flatten)]
    pub spread: Summary,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_pair"
    )]
    pub ci_95: Option<[f64; 2]>,
}

/// Per-round ratios `a[r] / b[r]` (both measured in the same round), summarised.
pub fn ratio_per_round(a: &[f64], b: &[f64]) -> Result<Summary> {
    Ok(ratio_with_ci(a, b)?.spread)
}

/// Per-round ratios `a[r] / b[r]`, summarised with the CI of their median.
pub fn ratio_with_ci(a: &[f64], b: &[f64]) -> Result<Ratio> {
    ensure!(
        a.len() == b.len(),
        "{} rounds against {} rounds",
        a.len(),
        b.len()
    );
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    Ratio::of(&ratios)
}

impl Ratio {
    /// Of ratios already taken per round.
    pub fn of(ratios: &[f64]) -> Result<Self> {
        Ok(Self {
            spread: Summary::of(ratios)?,
            ci_95: Some(median_ci(ratios)?),
        })
    }

    /// The ~95% CI of the median (`ci_95`), or for result files written before it was
    /// recorded, the p10–p90 spread those were judged on.
    pub fn interval(&self) -> (f64, f64) {
        match self.ci_95 {
            Some([low, high]) => (low, high),
            None => (self.spread.p10, self.spread.p90),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{median_ci, ratio_per_round, ratio_with_ci};

    #[test]
    fn median_ci_narrows_with_more_runs_and_covers_the_median() {
        // n = 21: x(6)..x(16), P(Bin(21, 1/2) <= 5) = 1.3% a side (x(7) would be 3.9%).
        let v: Vec<f64> = (1..=21).map(f64::from).collect();
        assert_eq!(median_ci(&v).ok(), Some([6.0, 16.0]));
        // n = 31: x(10)..x(22) (P(Bin(31, 1/2) <= 9) = 1.5%, <= 10 is 3.5%).
        let v: Vec<f64> = (1..=31).map(f64::from).collect();
        assert_eq!(median_ci(&v).ok(), Some([10.0, 22.0]));
        // Too few samples for 95%: the whole range.
        assert_eq!(median_ci(&[3.0, 1.0, 2.0]).ok(), Some([1.0, 3.0]));
        assert_eq!(median_ci(&[4.0]).ok(), Some([4.0, 4.0]));
        // Many samples: no underflow, and close to the normal approximation n/2 ± 0.98·√n.
        let v: Vec<f64> = (1..=10_000).map(f64::from).collect();
        let [lo, hi] = median_ci(&v).unwrap_or([0.0, 0.0]);
        assert!(
            (4_895.0..=4_905.0).contains(&lo) && (5_095.0..=5_105.0).contains(&hi),
            "{lo}..{hi}"
        );
        // Seven rounds: as wide as the samples (what the tcp suite's spread shows too).
        let v: Vec<f64> = (1..=7).map(f64::from).collect();
        assert_eq!(median_ci(&v).ok(), Some([1.0, 7.0]));
        let v: Vec<f64> = (1..=201).map(f64::from).collect();
        let [lo, hi] = median_ci(&v).unwrap_or([0.0, 0.0]);
        assert!(lo < 101.0 && hi > 101.0 && hi - lo < 30.0, "{lo}..{hi}");
        assert!(median_ci(&[]).is_err());
    }

    #[test]
    fn ratios_are_taken_within_each_round() {
        let r = ratio_per_round(&[2.0, 3.0], &[1.0, 2.0]).map(|s| (s.min, s.max));
        assert_eq!(r.ok(), Some((1.5, 2.0)));
        let r = ratio_with_ci(&[2.0, 3.0, 4.0], &[1.0, 2.0, 1.0]).map(|s| s.ci_95);
        assert_eq!(r.ok(), Some(Some([1.5, 4.0])));
        assert!(ratio_per_round(&[1.0], &[1.0, 2.0]).is_err());
    }
}
