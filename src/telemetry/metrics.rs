//! The metrics registry and the metric families meshd exports.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, TextEncoder,
};

/// Which side of the agent a request or connection belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// From local apps, on the outbound listener.
    Outbound,
    /// From peer agents, on the inbound listener.
    Inbound,
    /// The admin API (connections only; its requests are not counted as traffic).
    Admin,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Admin => "admin",
        }
    }
}

/// Latency buckets in seconds, from 1 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// An agent's registry. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: prometheus::Registry,
    pub proxy: ProxyMetrics,
    pub policy: PolicyMetrics,
    pub discovery: DiscoveryMetrics,
    pub upstream: UpstreamMetrics,
    pub tunnels: TunnelMetrics,
    /// `meshd_config_reload_failures_total`
    pub config_reload_failures: prometheus::IntCounter,
    /// `meshd_access_log_dropped_total`: lines dropped because the writer fell behind.
    pub access_log_dropped: prometheus::IntCounter,
    pub tls: TlsMetrics,
    pub gossip: GossipMetrics,
    /// `meshd_trace_spans_dropped_total{reason}`, `meshd_trace_spans_exported_total{exporter}`.
    pub trace: crate::telemetry::trace::TraceMetrics,
}

/// Gossip membership.
#[derive(Clone)]
pub struct GossipMetrics {
    /// `meshd_gossip_members{state}`: alive, suspect, down (as this agent sees them, itself excluded).
    pub members: IntGaugeVec,
    /// `meshd_gossip_packets_total{direction,result}`: `in` by result (ok, or why dropped), `out` ok or error.
    pub packets: IntCounterVec,
    /// `meshd_gossip_bytes_total{direction}`: UDP payload bytes, sealed.
    pub bytes: IntCounterVec,
    /// `meshd_gossip_records_total{result}`: endpoint records received: accepted, stale, invalid.
    pub records: IntCounterVec,
    /// `meshd_gossip_syncs_total{result}`: state syncs this agent started: in-sync, repaired, failed.
    pub syncs: IntCounterVec,
    /// `meshd_gossip_checks_total{result}`: direct checks of suspects: sent, answered, unanswered, received.
    pub checks: IntCounterVec,
    /// `meshd_gossip_suspicions_shortened_total`: suspicion timers brought forward by checkers' votes.
    pub suspicions_shortened: prometheus::IntCounter,
    /// `meshd_gossip_keyring_reload_failures_total`
    pub keyring_reload_failures: prometheus::IntCounter,
}

impl GossipMetrics {
    fn new(reg: &prometheus::Registry) -> GossipMetrics {
        let keyring_reload_failures = prometheus::IntCounter::new(
            "meshd_gossip_keyring_reload_failures_total",
            "Reloads of the gossip keyring refused (unreadable or malformed); the running keys stay",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        register(reg, keyring_reload_failures.clone());
        let suspicions_shortened = prometheus::IntCounter::new(
            "meshd_gossip_suspicions_shortened_total",
            "Suspicion timers of this agent brought forward by other members' direct checks",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        register(reg, suspicions_shortened.clone());
        GossipMetrics {
            members: gauge(
                reg,
                "meshd_gossip_members",
                "Gossip members this agent knows, by state (itself excluded)",
                &["state"],
            ),
            packets: counter(
                reg,
                "meshd_gossip_packets_total",
                "Gossip datagrams by direction and result (why a received one was dropped)",
                &["direction", "result"],
            ),
            bytes: counter(
                reg,
                "meshd_gossip_bytes_total",
                "Gossip bytes sent and received (sealed datagrams)",
                &["direction"],
            ),
            records: counter(
                reg,
                "meshd_gossip_records_total",
                "Endpoint records received by gossip or state sync, by result",
                &["result"],
            ),
            syncs: counter(
                reg,
                "meshd_gossip_syncs_total",
                "State syncs this agent started, by result",
                &["result"],
            ),
            checks: counter(
                reg,
                "meshd_gossip_checks_total",
                "Direct checks of suspected members, by result",
                &["result"],
            ),
            suspicions_shortened,
            keyring_reload_failures,
        }
    }
}

/// Mutual TLS with peer agents.
#[derive(Clone)]
pub struct TlsMetrics {
    /// `meshd_tls_cert_expiry_timestamp_seconds{spiffe_id}`: this host's certificate (only with TLS on).
    pub cert_expiry: prometheus::GaugeVec,
    /// `meshd_tls_handshake_errors_total{direction,reason}`
    pub handshake_errors: IntCounterVec,
    /// `meshd_tls_handshakes_total{direction,kind}`: completed handshakes, `kind` = `full` | `resumed`.
    pub handshakes: IntCounterVec,
    /// `meshd_tls_reload_failures_total`: new certificate files refused (the running ones stay).
    pub reload_failures: prometheus::IntCounter,
}

impl TlsMetrics {
    fn new(reg: &prometheus::Registry) -> TlsMetrics {
        let cert_expiry = prometheus::GaugeVec::new(
            Opts::new(
                "meshd_tls_cert_expiry_timestamp_seconds",
                "When this host's mesh certificate expires (Unix time)",
            ),
            &["spiffe_id"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        register(reg, cert_expiry.clone());
        let reload_failures = prometheus::IntCounter::new(
            "meshd_tls_reload_failures_total",
            "Reloads of the [tls] files refused (unreadable, broken or mismatched); the running certificate stays",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        register(reg, reload_failures.clone());
        TlsMetrics {
            cert_expiry,
            handshake_errors: counter(
                reg,
                "meshd_tls_handshake_errors_total",
                "TLS handshakes with peer agents that failed, by side and reason",
                &["direction", "reason"],
            ),
            handshakes: counter(
                reg,
                "meshd_tls_handshakes_total",
                "TLS handshakes with peer agents that completed, by side and kind (full or resumed)",
                &["direction", "kind"],
            ),
            reload_failures,
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let inner = prometheus::Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new("meshd_build_info", "meshd build information; always 1"),
            &["version"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        register(&inner, build_info.clone());
        let proxy = ProxyMetrics::new(&inner);
        let policy = PolicyMetrics::new(&inner);
        let discovery = DiscoveryMetrics::new(&inner);
        let upstream = UpstreamMetrics::new(&inner);
        let tunnels = TunnelMetrics::new(&inner);
        let config_reload_failures = prometheus::IntCounter::new(
            "meshd_config_reload_failures_total",
            "Reloads refused because the new configuration was invalid or unreadable",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        register(&inner, config_reload_failures.clone());
        let access_log_dropped = prometheus::IntCounter::new(
            "meshd_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind (the data path never waits for it)",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        register(&inner, access_log_dropped.clone());
        let tls = TlsMetrics::new(&inner);
        let gossip = GossipMetrics::new(&inner);
        let trace = crate::telemetry::trace::TraceMetrics::new(&inner)
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        Metrics {
            inner,
            proxy,
            policy,
            discovery,
            upstream,
            tunnels,
            config_reload_failures,
            access_log_dropped,
            tls,
            gossip,
            trace,
        }
    }

    /// The text exposition format 0.0.4.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.inner.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn register<M: prometheus::core::Collector + 'static>(reg: &prometheus::Registry, m: M) {
    // Names are constants and each is registered once per registry: a failure here is a bug.
    if let Err(e) = reg.register(Box::new(m)) {
        unreachable!("metric registered twice: {e}");
    }
}

fn counter(reg: &prometheus::Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("static metric definition {name}: {e}"));
    register(reg, m.clone());
    m
}

fn gauge(reg: &prometheus::Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("static metric definition {name}: {e}"));
    register(reg, m.clone());
    m
}

/// Metrics of the outbound and inbound proxies.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// `meshd_requests_total{direction,service,status_class}`
    pub requests: IntCounterVec,
    /// `meshd_request_duration_seconds{direction,service}`: until the response headers.
    pub duration: HistogramVec,
    /// `meshd_open_connections{direction}`
    pub open_connections: IntGaugeVec,
    /// `meshd_proxy_errors_total{direction,error}`: responses meshd generated itself, by `mesh-error` code.
    pub errors: IntCounterVec,
    /// `meshd_connection_errors_total{direction,reason}`: client connections that ended in a protocol error.
    pub connection_errors: IntCounterVec,
    /// `meshd_connections_evicted_total{direction}`: idle connections closed to make room at the listener's
    /// `max_connections`.
    pub evicted: IntCounterVec,
}

impl ProxyMetrics {
    fn new(reg: &prometheus::Registry) -> Self {
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "meshd_request_duration_seconds",
                "Time from receiving a request to sending its response headers",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["direction", "service"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        register(reg, duration.clone());
        ProxyMetrics {
            requests: counter(
                reg,
                "meshd_requests_total",
                "Requests handled, by the class of the status returned",
                &["direction", "service", "status_class"],
            ),
            duration,
            open_connections: gauge(
                reg,
                "meshd_open_connections",
                "Client connections currently open",
                &["direction"],
            ),
            errors: counter(
                reg,
                "meshd_proxy_errors_total",
                "Responses generated by meshd itself, by mesh-error code",
                &["direction", "error"],
            ),
            connection_errors: counter(
                reg,
                "meshd_connection_errors_total",
                "Client connections closed because of a protocol error or timeout",
                &["direction", "reason"],
            ),
            evicted: counter(
                reg,
                "meshd_connections_evicted_total",
                "Idle client connections closed to make room at the listener's max_connections",
                &["direction"],
            ),
        }
    }

    pub fn record(
        &self,
        dir: Direction,
        service: &str,
        status: http::StatusCode,
        elapsed: std::time::Duration,
    ) {
        self.requests
            .with_label_values(&[dir.as_str(), service, STATUS_CLASSES[class_index(status)]])
            .inc();
        self.duration
            .with_label_values(&[dir.as_str(), service])
            .observe(elapsed.as_secs_f64());
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: http::StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

impl ProxyMetrics {
    /// One service's series, resolved once so the hot path skips the label lookups.
    pub fn for_service(&self, dir: Direction, service: &str) -> ServiceMetrics {
        ServiceMetrics {
            requests: STATUS_CLASSES
                .map(|c| self.requests.with_label_values(&[dir.as_str(), service, c])),
            duration: self.duration.with_label_values(&[dir.as_str(), service]),
        }
    }
}

/// `meshd_requests_total` and `meshd_request_duration_seconds` of one service in one direction.
#[derive(Clone, Debug)]
pub struct ServiceMetrics {
    requests: [prometheus::IntCounter; 5],
    duration: prometheus::Histogram,
}

impl ServiceMetrics {
    pub fn record(&self, status: http::StatusCode, elapsed: std::time::Duration) {
        self.requests[class_index(status)].inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// Metrics of the traffic policies.
#[derive(Clone)]
pub struct PolicyMetrics {
    /// `meshd_retries_total{service,outcome}`: retries sent, by whether the retry succeeded.
    pub retries: IntCounterVec,
    /// `meshd_retry_budget_exhausted_total{service}`: retries wanted but refused by the budget.
    pub budget_exhausted: IntCounterVec,
    /// `meshd_circuit_breaker_open{service,endpoint}`: 1 while the endpoint's breaker is open.
    pub breaker_open: IntGaugeVec,
    /// `meshd_rate_limited_total{service}`
    pub rate_limited: IntCounterVec,
    /// `meshd_faults_injected_total{service,kind}` (`kind` = `delay` or `abort`).
    pub faults: IntCounterVec,
}

impl PolicyMetrics {
    fn new(reg: &prometheus::Registry) -> Self {
        PolicyMetrics {
            retries: counter(
                reg,
                "meshd_retries_total",
                "Retries sent, by outcome",
                &["service", "outcome"],
            ),
            budget_exhausted: counter(
                reg,
                "meshd_retry_budget_exhausted_total",
                "Retries not sent because the retry budget was exhausted",
                &["service"],
            ),
            breaker_open: gauge(
                reg,
                "meshd_circuit_breaker_open",
                "1 while an endpoint's circuit breaker is open",
                &["service", "endpoint"],
            ),
            rate_limited: counter(
                reg,
                "meshd_rate_limited_total",
                "Requests refused by the service's rate limit",
                &["service"],
            ),
            faults: counter(
                reg,
                "meshd_faults_injected_total",
                "Faults injected, by kind",
                &["service", "kind"],
            ),
        }
    }
}

/// Metrics of discovery.
#[derive(Clone)]
pub struct DiscoveryMetrics {
    /// `meshd_discovery_endpoints{source}`
    pub endpoints: IntGaugeVec,
    /// `meshd_discovery_events_total{source,action}`: events received (Docker: a bounded set of actions).
    pub events: IntCounterVec,
    /// `meshd_discovery_skipped_total{source,reason}`: containers refused because of their labels.
    pub skipped: IntCounterVec,
    /// `meshd_discovery_degraded{source}`: 1 while the source is unreachable and its last endpoints are kept.
    pub degraded: IntGaugeVec,
    /// `meshd_discovery_inspect_errors_total{source}`: containers that could not be read (their last state is
    /// kept).
    pub inspect_errors: IntCounterVec,
    /// `meshd_discovery_reconnects_total{source}`: times the source was lost and is being reconnected.
    pub reconnects: IntCounterVec,
}

impl DiscoveryMetrics {
    fn new(reg: &prometheus::Registry) -> Self {
        DiscoveryMetrics {
            endpoints: gauge(
                reg,
                "meshd_discovery_endpoints",
                "Endpoints this host's discovery currently lists",
                &["source"],
            ),
            events: counter(
                reg,
                "meshd_discovery_events_total",
                "Discovery events received, by action",
                &["source", "action"],
            ),
            skipped: counter(
                reg,
                "meshd_discovery_skipped_total",
                "Containers not exposed because of a label problem, by reason",
                &["source", "reason"],
            ),
            degraded: gauge(
                reg,
                "meshd_discovery_degraded",
                "1 while a discovery source is unreachable (its last endpoints are kept), else 0",
                &["source"],
            ),
            inspect_errors: counter(
                reg,
                "meshd_discovery_inspect_errors_total",
                "Containers that could not be inspected; their last known state is kept",
                &["source"],
            ),
            reconnects: counter(
                reg,
                "meshd_discovery_reconnects_total",
                "Attempts to reach a discovery source again after it failed",
                &["source"],
            ),
        }
    }
}

/// Metrics of upgraded connections (WebSocket).
#[derive(Clone)]
pub struct TunnelMetrics {
    /// `meshd_upgrades_total{direction,result}`: upgrade requests (`upgraded`, `declined` by the upstream,
    /// `failed`).
    pub upgrades: IntCounterVec,
    /// `meshd_upgraded_connections{direction}`: upgraded connections open now.
    pub open: IntGaugeVec,
    /// `meshd_upgraded_connection_ends_total{direction,reason}`: why upgraded connections ended (`closed`,
    /// `idle`, `shutdown`, `error`).
    pub ends: IntCounterVec,
}

impl TunnelMetrics {
    fn new(reg: &prometheus::Registry) -> Self {
        TunnelMetrics {
            upgrades: counter(
                reg,
                "meshd_upgrades_total",
                "Connection: Upgrade requests (WebSocket), by result",
                &["direction", "result"],
            ),
            open: gauge(
                reg,
                "meshd_upgraded_connections",
                "Upgraded connections (WebSocket) open now",
                &["direction"],
            ),
            ends: counter(
                reg,
                "meshd_upgraded_connection_ends_total",
                "Upgraded connections that ended, by reason",
                &["direction", "reason"],
            ),
        }
    }

    pub fn attempted(&self, direction: &str, result: &str) {
        self.upgrades.with_label_values(&[direction, result]).inc();
    }

    pub fn ended(&self, direction: &str, reason: &str) {
        self.ends.with_label_values(&[direction, reason]).inc();
    }

    /// Counts an upgraded connection as open until the guard is dropped.
    pub fn open(&self, direction: &str) -> OpenGauge {
        let g = self.open.with_label_values(&[direction]);
        g.inc();
        OpenGauge(g)
    }
}

/// Metrics of the upstream connection pools.
#[derive(Clone)]
pub struct UpstreamMetrics {
    /// `meshd_upstream_connections{protocol}`: upstream connections open now (`http1`, `http2`).
    pub connections: IntGaugeVec,
    /// `meshd_upstream_connects_total{protocol,result}`: connection attempts (`ok`, `refused`, `timeout`,
    /// `handshake`, `error`).
    pub connects: IntCounterVec,
    /// `meshd_upstream_stale_retries_total`: requests sent again on a fresh connection because the reused one
    /// had been closed by the upstream before it answered.
    pub stale_retries: prometheus::IntCounter,
}

/// One open upstream connection, counted in `meshd_upstream_connections` while it lives.
pub struct OpenGauge(prometheus::IntGauge);

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl UpstreamMetrics {
    fn new(reg: &prometheus::Registry) -> Self {
        let stale_retries = prometheus::IntCounter::new(
            "meshd_upstream_stale_retries_total",
            "Requests sent again on a fresh connection after a reused one turned out closed by the upstream",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        register(reg, stale_retries.clone());
        UpstreamMetrics {
            connections: gauge(
                reg,
                "meshd_upstream_connections",
                "Upstream connections open now, by protocol",
                &["protocol"],
            ),
            connects: counter(
                reg,
                "meshd_upstream_connects_total",
                "Upstream connection attempts, by protocol and result",
                &["protocol", "result"],
            ),
            stale_retries,
        }
    }

    pub fn connected(&self, protocol: &str) {
        self.connects.with_label_values(&[protocol, "ok"]).inc();
    }

    pub fn connect_failed(&self, protocol: &str, result: &str) {
        self.connects.with_label_values(&[protocol, result]).inc();
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub fn open(&self, protocol: &str) -> OpenGauge {
        let g = self.connections.with_label_values(&[protocol]);
        g.inc();
        OpenGauge(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_independent() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.proxy.record(
            Direction::Outbound,
            "users",
            http::StatusCode::OK,
            std::time::Duration::from_millis(3),
        );
        assert!(a.encode().contains(
            "meshd_requests_total{direction=\"outbound\",service=\"users\",status_class=\"2xx\"} 1"
        ));
        assert!(!b.encode().contains("service=\"users\""));
        assert!(b.encode().contains("meshd_build_info{version="));
    }
}
