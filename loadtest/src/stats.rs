//! Measurements: one [`Recorder`] per target (direct mock or gateway) and phase, holding HDR
//! histograms of TTFT, every inter-token gap, end-to-end time and per-request tokens/s (all in
//! microseconds, tokens/s in tokens per second), errors by kind, and a per-second timeline.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest value a histogram tracks: one hour in microseconds.
const MAX_US: u64 = 3_600_000_000;

pub fn histogram() -> Histogram<u64> {
    bounded(3)
}

fn coarse_histogram() -> Histogram<u64> {
    bounded(2)
}

/// 1 µs .. 1 h at `sigfig` significant figures.
#[allow(clippy::expect_used)]
fn bounded(sigfig: u8) -> Histogram<u64> {
    // Cannot fail: the bounds are constants with low ≥ 1, high ≥ 2 × low and sigfig ≤ 5.
    Histogram::new_with_bounds(1, MAX_US, sigfig).expect("constant histogram bounds are valid")
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What one request measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Seconds since the run started, at the (scheduled) start.
    pub started_s: f64,
    pub ttft: Option<Duration>,
    pub e2e: Duration,
    /// Gaps between consecutive content events, µs.
    pub gaps_us: Vec<u64>,
    /// Content events received (stream) or `completion_tokens` (non-stream).
    pub tokens: u64,
    /// `usage.completion_tokens` when the response carried usage.
    pub usage_tokens: Option<u64>,
    /// `None`: success.
    pub error: Option<String>,
    /// `x-tollgate-request-id`, when sent.
    pub request_id: Option<String>,
    /// Started during the phase's warm-up: counted in the totals, not in the histograms.
    pub warmup: bool,
}

/// Every request, warm-up included: what the ledger and the process-cost figures compare with.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub ok: u64,
    pub tokens: u64,
    pub ok_tokens: u64,
    /// Successful streams whose usage chunk disagreed with the content events received.
    pub usage_mismatches: u64,
    /// Requests that never reached the target (connect errors, dropped open-loop starts).
    pub unsent: u64,
}

/// One second of the timeline.
#[derive(Debug)]
pub struct Second {
    pub completed: u64,
    pub errors: u64,
    pub tokens: u64,
    /// TTFT for streams, end-to-end for non-streams.
    pub latency: Histogram<u64>,
}

#[derive(Debug)]
pub struct Recorder {
    pub ttft: Histogram<u64>,
    pub gap: Histogram<u64>,
    pub e2e: Histogram<u64>,
    pub tokens_per_s: Histogram<u64>,
    pub ok: u64,
    pub tokens: u64,
    /// Tokens of the requests that succeeded.
    pub ok_tokens: u64,
    /// Every request including warm-up.
    pub totals: Totals,
    pub errors: BTreeMap<String, u64>,
    pub timeline: Vec<Second>,
    /// Wall time this recorder was running (sum over rounds).
    pub active: Duration,
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder {
            ttft: histogram(),
            gap: histogram(),
            e2e: histogram(),
            tokens_per_s: histogram(),
            ok: 0,
            tokens: 0,
            ok_tokens: 0,
            totals: Totals::default(),
            errors: BTreeMap::new(),
            timeline: Vec::new(),
            active: Duration::ZERO,
        }
    }
}

impl Recorder {
    pub fn record(&mut self, o: &Outcome) {
        let t = &mut self.totals;
        t.requests += 1;
        t.tokens += o.tokens;
        match o.error.as_deref() {
            None => {
                t.ok += 1;
                t.ok_tokens += o.tokens;
                t.usage_mismatches += u64::from(o.usage_tokens.is_some_and(|u| u != o.tokens));
            }
            Some("connect" | "overload") => t.unsent += 1,
            Some(_) => {}
        }
        if o.warmup {
            return;
        }
        let e2e = micros(o.e2e);
        self.e2e.saturating_record(e2e);
        if let Some(t) = o.ttft {
            self.ttft.saturating_record(micros(t));
        }
        for &g in &o.gaps_us {
            self.gap.saturating_record(g.max(1));
        }
        self.tokens += o.tokens;
        match &o.error {
            None => {
                self.ok += 1;
                self.ok_tokens += o.tokens;
                if o.tokens > 1 {
                    // Generation rate after the first token (the first token is TTFT's business).
                    let span = o.e2e.saturating_sub(o.ttft.unwrap_or_default());
                    if !span.is_zero() {
                        let rate = (o.tokens - 1) as f64 / span.as_secs_f64();
                        self.tokens_per_s.saturating_record((rate as u64).max(1));
                    }
                }
            }
            Some(kind) => *self.errors.entry(kind.clone()).or_default() += 1,
        }
        let done_s = o.started_s + o.e2e.as_secs_f64();
        let sec = done_s.max(0.0) as usize;
        while self.timeline.len() <= sec {
            self.timeline.push(Second {
                completed: 0,
                errors: 0,
                tokens: 0,
                latency: coarse_histogram(),
            });
        }
        let slot = &mut self.timeline[sec];
        slot.tokens += o.tokens;
        if o.error.is_some() {
            slot.errors += 1;
        } else {
            slot.completed += 1;
            slot.latency
                .saturating_record(micros(o.ttft.unwrap_or(o.e2e)));
        }
    }

    pub fn requests(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }

    pub fn summary(&self) -> Summary {
        let secs = self.active.as_secs_f64();
        let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        Summary {
            requests: self.requests(),
            ok: self.ok,
            errors: self.errors.clone(),
            tokens: self.tokens,
            active_s: secs,
            requests_per_s: per_s(self.ok),
            tokens_per_s: per_s(self.ok_tokens),
            ttft_us: Percentiles::of(&self.ttft),
            gap_us: Percentiles::of(&self.gap),
            e2e_us: Percentiles::of(&self.e2e),
            stream_tokens_per_s: Percentiles::of(&self.tokens_per_s),
        }
    }
}

/// Percentiles of one histogram (µs for latencies); zeros when empty.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub tokens: u64,
    pub active_s: f64,
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
    pub ttft_us: Percentiles,
    pub gap_us: Percentiles,
    pub e2e_us: Percentiles,
    pub stream_tokens_per_s: Percentiles,
}

/// One timeline point for the report and the chart.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Point {
    pub t_s: u64,
    pub completed: u64,
    pub errors: u64,
    pub tokens: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
}

pub fn timeline_points(r: &Recorder) -> Vec<Point> {
    r.timeline
        .iter()
        .enumerate()
        .filter(|(_, s)| s.completed + s.errors > 0)
        .map(|(t, s)| {
            let p = Percentiles::of(&s.latency);
            Point {
                t_s: t as u64,
                completed: s.completed,
                errors: s.errors,
                tokens: s.tokens,
                p50_us: p.p50,
                p90_us: p.p90,
                p99_us: p.p99,
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn records_outcomes_and_errors() {
        let mut r = Recorder::default();
        for i in 0..100u64 {
            r.record(&Outcome {
                started_s: 0.5,
                ttft: Some(Duration::from_millis(10 + i % 10)),
                e2e: Duration::from_millis(100),
                gaps_us: vec![1000; 9],
                tokens: 10,
                ..Outcome::default()
            });
        }
        r.record(&Outcome {
            started_s: 1.2,
            e2e: Duration::from_millis(5),
            error: Some("http_500".into()),
            ..Outcome::default()
        });
        r.active = Duration::from_secs(2);
        let s = r.summary();
        assert_eq!(s.requests, 101);
        assert_eq!(s.ok, 100);
        assert_eq!(s.errors.get("http_500"), Some(&1));
        assert_eq!(s.gap_us.count, 900);
        assert!((999..=1001).contains(&s.gap_us.p99));
        assert!(
            (13_900..=15_100).contains(&s.ttft_us.p50),
            "{:?}",
            s.ttft_us
        );
        assert_eq!(s.tokens_per_s, 500.0);
        // ~9 tokens over ~90 ms.
        assert!((95..=115).contains(&s.stream_tokens_per_s.p50));
        let points = timeline_points(&r);
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].t_s, 0);
        assert_eq!(points[0].completed, 100);
        assert_eq!(r.timeline[1].errors, 1);
        r.record(&Outcome {
            warmup: true,
            tokens: 3,
            ..Outcome::default()
        });
        assert_eq!(r.requests(), 101);
        assert_eq!(r.totals.requests, 102);
        assert_eq!(r.totals.tokens, 1003);
    }

    #[test]
    fn empty_percentiles_are_zero() {
        assert_eq!(Percentiles::of(&histogram()), Percentiles::default());
    }
}
