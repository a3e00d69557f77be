//! API request metrics: counts and latency by route and status, in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Latency buckets, seconds.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

#[derive(Debug, Default)]
struct Series {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

/// Counters keyed by (method, route template, status), and deploys by how they ended.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    series: Mutex<BTreeMap<(String, String, u16), Series>>,
    /// Ended deploys: succeeded, failed, rolled back.
    deploys: [std::sync::atomic::AtomicU64; 3],
}

/// How a deploy ended, for `tandem_deployments_total{status}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployEnd {
    /// Every replica runs the new content.
    Succeeded,
    /// It stopped short.
    Failed,
    /// The health gate refused it; the old content is back.
    RolledBack,
}

impl DeployEnd {
    const ALL: [Self; 3] = [Self::Succeeded, Self::Failed, Self::RolledBack];

    fn label(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }
}

impl ApiMetrics {
    /// Records one request. `route` is the matched route template, so ids do not explode labels.
    pub fn record(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let s = map
            .entry((method.to_string(), route.to_string(), status))
            .or_default();
        s.count += 1;
        s.sum += secs;
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                s.buckets[i] += 1;
            }
        }
    }

    /// Counts a deploy that ended.
    pub fn deploy_ended(&self, end: DeployEnd) {
        self.deploys[end as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Renders every series.
    pub fn render(&self) -> String {
        let map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        // Every status from 0, so alerts on a rate see the series before the first failure.
        out.push_str("# HELP tandem_deployments_total Deploys (flows, modules, rollbacks, pipelines) this control plane watched to their end, by how they ended.\n# TYPE tandem_deployments_total counter\n");
        for end in DeployEnd::ALL {
            let _ = writeln!(
                out,
                "tandem_deployments_total{{status=\"{}\"}} {}",
                end.label(),
                self.deploys[end as usize].load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        out.push_str("# HELP tandem_api_requests_total API requests by method, route and status.\n# TYPE tandem_api_requests_total counter\n");
        for ((m, r, s), v) in map.iter() {
            let _ = writeln!(
                out,
                "tandem_api_requests_total{{method=\"{m}\",route=\"{r}\",status=\"{s}\"}} {}",
                v.count
            );
        }
        out.push_str("# HELP tandem_api_request_duration_seconds API latency by method and route.\n# TYPE tandem_api_request_duration_seconds histogram\n");
        let mut by_route: BTreeMap<(&str, &str), Series> = BTreeMap::new();
        for ((m, r, _), v) in map.iter() {
            let e = by_route.entry((m, r)).or_default();
            e.count += v.count;
            e.sum += v.sum;
            for i in 0..BUCKETS.len() {
                e.buckets[i] += v.buckets[i];
            }
        }
        for ((m, r), v) in by_route {
            let l = format!("method=\"{m}\",route=\"{r}\"");
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "tandem_api_request_duration_seconds_bucket{{{l},le=\"{b}\"}} {}",
                    v.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "tandem_api_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
                v.count
            );
            let _ = writeln!(
                out,
                "tandem_api_request_duration_seconds_sum{{{l}}} {}",
                v.sum
            );
            let _ = writeln!(
                out,
                "tandem_api_request_duration_seconds_count{{{l}}} {}",
                v.count
            );
        }
        out
    }
}
