//! Server metrics in the Prometheus text format (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Counters and gauges shared by the HTTP handlers and the engine.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    queue_depth: AtomicUsize,
    running: AtomicUsize,
    cancelled: AtomicU64,
    failed: AtomicU64,
    decode_steps: AtomicU64,
    /// Generated tokens per second of the last decode step, as f64 bits.
    step_tokens_per_second: AtomicU64,
    time_to_first_token: Histogram,
    request_latency: Histogram,
}

#[derive(Debug, Default)]
struct Histogram {
    inner: Mutex<HistogramData>,
}

#[derive(Debug, Default)]
struct HistogramData {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&self, seconds: f64) {
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (count, bound) in h.counts.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *count += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (count, bound) in h.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}", h.sum);
        let _ = writeln!(out, "{name}_count {}", h.count);
    }
}

impl Metrics {
    /// Counts one HTTP request to `endpoint` answered with `status`.
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((endpoint.to_owned(), status)).or_default() += 1;
    }

    /// Requests waiting for a batch slot.
    pub fn queue_depth(&self) -> usize {
        self.queue_depth.load(Ordering::SeqCst)
    }

    pub(crate) fn enqueued(&self) {
        self.queue_depth.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn dequeued(&self) {
        let _ = self
            .queue_depth
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                Some(d.saturating_sub(1))
            });
    }

    pub(crate) fn set_running(&self, n: usize) {
        self.running.store(n, Ordering::Relaxed);
    }

    pub(crate) fn prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn generated_tokens(&self, n: usize) {
        self.generated_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn decode_step(&self, rows: usize, took: Duration) {
        self.decode_steps.fetch_add(1, Ordering::Relaxed);
        let rate = rows as f64 / took.as_secs_f64().max(1e-9);
        self.step_tokens_per_second
            .store(rate.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn first_token(&self, after: Duration) {
        self.time_to_first_token.observe(after.as_secs_f64());
    }

    pub(crate) fn completed(&self, after: Duration) {
        self.request_latency.observe(after.as_secs_f64());
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP kiln_requests_total HTTP requests by endpoint and status.\n");
        out.push_str("# TYPE kiln_requests_total counter\n");
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "kiln_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let counters = [
            (
                "kiln_prompt_tokens_total",
                "Prompt tokens processed.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "kiln_generation_tokens_total",
                "Tokens generated.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "kiln_requests_cancelled_total",
                "Generations stopped because the client went away.",
                self.cancelled.load(Ordering::Relaxed),
            ),
            (
                "kiln_requests_failed_total",
                "Generations that ended with an error (timeout, model error).",
                self.failed.load(Ordering::Relaxed),
            ),
            (
                "kiln_decode_steps_total",
                "Batched decode steps run.",
                self.decode_steps.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let gauges = [
            (
                "kiln_queue_depth",
                "Requests waiting for a batch slot.",
                self.queue_depth() as f64,
            ),
            (
                "kiln_running_requests",
                "Requests in the running batch.",
                self.running.load(Ordering::Relaxed) as f64,
            ),
            (
                "kiln_generation_tokens_per_second",
                "Tokens per second generated by the last decode step (all sequences).",
                f64::from_bits(self.step_tokens_per_second.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        self.time_to_first_token.render(
            &mut out,
            "kiln_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
        );
        self.request_latency.render(
            &mut out,
            "kiln_request_duration_seconds",
            "Time from arrival to the last generated token.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 400);
        m.generated_tokens(7);
        m.enqueued();
        m.enqueued();
        m.dequeued();
        m.first_token(Duration::from_millis(30));
        m.first_token(Duration::from_millis(300));
        let text = m.render();
        assert!(
            text.contains("kiln_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2")
        );
        assert!(
            text.contains("kiln_requests_total{endpoint=\"/v1/completions\",status=\"400\"} 1")
        );
        assert!(text.contains("kiln_generation_tokens_total 7"));
        assert!(text.contains("kiln_queue_depth 1"));
        assert!(text.contains("kiln_time_to_first_token_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("kiln_time_to_first_token_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("kiln_time_to_first_token_seconds_bucket{le=\"0.5\"} 2"));
        assert!(text.contains("kiln_time_to_first_token_seconds_count 2"));
        m.dequeued();
        m.dequeued();
        assert_eq!(m.queue_depth(), 0, "the gauge never goes below zero");
    }
}
