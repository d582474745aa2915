//! Histograms of |x| and the search for an activation's FP8 format and scale.
//!
//! Bins are the top 13 bits of the f32 bit pattern of |x| (8 exponent bits and 5
//! mantissa bits): 32 equal bins per power of two, over the whole f32 range, 8192 in
//! all. Binning is exact integer work on the bit pattern (no `log`, no running range,
//! no re-binning), so a histogram does not depend on the order values arrive in, and
//! merging two is adding counts. 32 bins per octave is 4 bins per E4M3 step and 8 per
//! E5M2 step.
//!
//! The quantization error of a candidate (format, threshold) is the expected squared
//! error of `fake_quantize` (the exact FP8 grid from `sd-fp8`, saturating) over the
//! histogram, each bin represented by [`SUBSAMPLES`] evenly spaced points (the values
//! of a bin taken as uniform within it).

use rayon::prelude::*;
use sd_fp8::Fp8Format;
use serde::{Deserialize, Serialize};

pub const BIN_SHIFT: u32 = 18;
pub const BINS: usize = 1 << (32 - 1 - BIN_SHIFT);
pub const SUBSAMPLES: usize = 4;
/// Candidate clipping thresholds: `amax * 2^(-k / CANDIDATE_STEPS_PER_OCTAVE)`.
pub const CANDIDATE_STEPS_PER_OCTAVE: u32 = 16;
/// `k = 0..CANDIDATES`: down to `amax / 256`.
pub const CANDIDATES: usize = 129;
/// SQNR reported when the error is exactly zero.
pub const SQNR_CAP_DB: f64 = 300.0;

#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub amax: f32,
    /// Finite values counted.
    pub total: u64,
    /// NaN and infinite values seen (not counted in the bins).
    pub non_finite: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BINS],
            amax: 0.0,
            total: 0,
            non_finite: 0,
        }
    }
}

/// Lower edge of bin `i`.
pub fn bin_lo(i: usize) -> f32 {
    f32::from_bits((i as u32) << BIN_SHIFT)
}
/// Upper edge of bin `i`.
pub fn bin_hi(i: usize) -> f32 {
    f32::from_bits(((i as u32) + 1) << BIN_SHIFT)
}

impl Histogram {
    pub fn add_slice(&mut self, data: &[f32]) {
        let part = data
            .par_chunks(1 << 15)
            .map(|c| {
                let mut h = Histogram::default();
                h.add_seq(c);
                h
            })
            .reduce(Histogram::default, |mut a, b| {
                a.merge(&b);
                a
            });
        self.merge(&part);
    }

    fn add_seq(&mut self, data: &[f32]) {
        for &x in data {
            if !x.is_finite() {
                self.non_finite += 1;
                continue;
            }
            let a = x.abs();
            self.counts[(a.to_bits() >> BIN_SHIFT) as usize] += 1;
            if a > self.amax {
                self.amax = a;
            }
            self.total += 1;
        }
    }

    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.amax = self.amax.max(o.amax);
        self.total += o.total;
        self.non_finite += o.non_finite;
    }

    /// Representative points of the non-empty bins, with their weights (count /
    /// SUBSAMPLES); the top bin is capped at the exact amax.
    fn points(&self) -> Vec<(f64, f64)> {
        let mut v = Vec::new();
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let lo = bin_lo(i) as f64;
            let hi = (bin_hi(i) as f64).min(self.amax as f64).max(lo);
            let w = c as f64 / SUBSAMPLES as f64;
            for j in 0..SUBSAMPLES {
                v.push((lo + (hi - lo) * (j as f64 + 0.5) / SUBSAMPLES as f64, w));
            }
        }
        v
    }

    /// Mean of x².
    pub fn mean_square(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.points().iter().map(|(x, w)| x * x * w).sum::<f64>() / self.total as f64
    }

    /// The smallest bin upper edge below which `q` (0..=1) of the values lie, capped
    /// at amax.
    pub fn quantile(&self, q: f64) -> f32 {
        let need = (q * self.total as f64).ceil() as u64;
        let mut acc = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= need && acc > 0 {
                return bin_hi(i).min(self.amax);
            }
        }
        self.amax
    }
}

/// Mean squared error of FP8 fake quantization with `scale` over `points`.
fn mse_points(points: &[(f64, f64)], total: u64, format: Fp8Format, scale: f32) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let mut e = 0.0;
    for &(x, w) in points {
        let q = sd_fp8::fake_quantize(format, x as f32, scale) as f64;
        e += (x - q) * (x - q) * w;
    }
    e / total as f64
}

pub fn sqnr_db(mean_square: f64, mse: f64) -> f64 {
    if mse <= 0.0 {
        return SQNR_CAP_DB;
    }
    if mean_square <= 0.0 {
        return -SQNR_CAP_DB;
    }
    (10.0 * (mean_square / mse).log10()).clamp(-SQNR_CAP_DB, SQNR_CAP_DB)
}

/// The scale that maps `threshold` to the format's largest finite value.
pub fn scale_for(format: Fp8Format, threshold: f32) -> f32 {
    if !(threshold.is_finite() && threshold > 0.0) {
        return 1.0;
    }
    let s = threshold / format.max_finite();
    if s.is_finite() && s > 0.0 { s } else { 1.0 }
}

/// Threshold of candidate `k`.
pub fn candidate_threshold(amax: f32, k: usize) -> f32 {
    (amax as f64 * (-(k as f64) / CANDIDATE_STEPS_PER_OCTAVE as f64).exp2()) as f32
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Mse,
    Max,
    Percentile,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Mse => "mse",
            Method::Max => "max",
            Method::Percentile => "percentile",
        })
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "mse" => Ok(Self::Mse),
            "max" => Ok(Self::Max),
            "percentile" => Ok(Self::Percentile),
            _ => Err(format!(
                "unknown calibration method `{s}` (expected mse, max or percentile)"
            )),
        }
    }
}

/// The outcome of the search for one format.
#[derive(Clone, Debug, PartialEq)]
pub struct FormatChoice {
    pub format: Fp8Format,
    pub threshold: f32,
    pub scale: f32,
    pub mse: f64,
    pub sqnr_db: f64,
    /// MSE of every candidate threshold `k = 0..CANDIDATES`.
    pub candidates: Vec<f64>,
}

/// Everything the selection decided for one tensor, with its evidence.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub chosen: FormatChoice,
    pub per_format: Vec<FormatChoice>,
    pub mean_square: f64,
}

/// Chooses format and threshold for `h`: per allowed format the method's threshold
/// (`mse`: the largest candidate whose error is within `mse_tolerance_db` of the
/// least; `max`: amax; `percentile`: the `percentile` quantile of |x|), then E4M3
/// unless E5M2's error is lower by at least `e5m2_margin_db` decibels.
pub fn select(
    h: &Histogram,
    method: Method,
    percentile: f64,
    formats: &[Fp8Format],
    e5m2_margin_db: f64,
    mse_tolerance_db: f64,
) -> Selection {
    let points = h.points();
    let ms = h.mean_square();
    let per_format: Vec<FormatChoice> = formats
        .iter()
        .map(|&format| {
            let candidates: Vec<f64> = (0..CANDIDATES)
                .map(|k| {
                    let s = scale_for(format, candidate_threshold(h.amax, k));
                    mse_points(&points, h.total, format, s)
                })
                .collect();
            let threshold = match method {
                Method::Max => h.amax,
                Method::Percentile => h.quantile(percentile / 100.0),
                Method::Mse => {
                    // The largest threshold whose error is within `mse_tolerance_db`
                    // of the least: clipping must earn its risk on unseen inputs.
                    let least = candidates.iter().cloned().fold(f64::INFINITY, f64::min);
                    let bound = least * 10f64.powf(mse_tolerance_db / 10.0);
                    let k = candidates.iter().position(|&e| e <= bound).unwrap_or(0);
                    candidate_threshold(h.amax, k)
                }
            };
            let scale = scale_for(format, threshold);
            let mse = mse_points(&points, h.total, format, scale);
            FormatChoice {
                format,
                threshold: scale * format.max_finite(),
                scale,
                mse,
                sqnr_db: sqnr_db(ms, mse),
                candidates,
            }
        })
        .collect();
    let e4 = per_format.iter().find(|c| c.format == Fp8Format::E4M3);
    let e5 = per_format.iter().find(|c| c.format == Fp8Format::E5M2);
    let chosen = match (e4, e5) {
        (Some(a), Some(b)) => {
            if b.mse < a.mse * 10f64.powf(-e5m2_margin_db / 10.0) {
                b.clone()
            } else {
                a.clone()
            }
        }
        (Some(a), None) => a.clone(),
        (None, Some(b)) => b.clone(),
        (None, None) => panic!("select: no format allowed"),
    };
    Selection {
        chosen,
        per_format,
        mean_square: ms,
    }
}

/// Exact SQNR of fake-quantizing `w` in `format` with one scale per row of `row_len`
/// (or one scale for all).
pub fn weight_sqnr_db(w: &[f32], row_len: usize, format: Fp8Format, scales: &[f32]) -> f64 {
    let (mut sig, mut err) = (0.0f64, 0.0f64);
    for (r, row) in w.chunks(row_len.max(1)).enumerate() {
        let s = if scales.len() == 1 {
            scales[0]
        } else {
            scales[r]
        };
        for &x in row {
            let q = sd_fp8::fake_quantize(format, x, s);
            sig += (x as f64) * (x as f64);
            err += ((x - q) as f64) * ((x - q) as f64);
        }
    }
    sqnr_db(sig, err)
}
