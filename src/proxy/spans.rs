//! Tracing on the data path: each request's trace context ([`Hop`]), a server span per request this agent
//! receives, a client span per attempt it sends, and the headers that carry the context on.
//!
//! With tracing off (no collector configured) nothing here runs: no header is read or written and no span is
//! built, so requests pass their trace headers through untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::config::TracingConfig;
use crate::telemetry::trace::{
    Format, Span, SpanIds, SpanKind, TraceContext, TraceSink, context, decide, extract, inject,
};

/// `mesh-sample: 1` forces a request's trace to be sampled.
pub const MESH_SAMPLE: http::HeaderName = http::HeaderName::from_static("mesh-sample");

/// What the agent needs to trace requests. Cheap to clone.
#[derive(Clone)]
pub struct Tracer {
    sink: TraceSink,
    sample_rate: f64,
    record_headers: Arc<[http::HeaderName]>,
    node: Arc<str>,
}

/// One request's trace: the ids of its server span and how the context travels on.
#[derive(Debug)]
pub struct Hop {
    pub ids: SpanIds,
    pub sampled: bool,
    format: Format,
    tracestate: Option<String>,
    start: SystemTime,
    /// The request arrived without any trace header, so its copies need no clean-up before the context is
    /// written.
    clean: bool,
    /// Values of `tracing.record_headers`, only when sampled.
    extra: Vec<(String, String)>,
}

/// What a finished attempt or request says about itself.
#[derive(Default)]
pub struct Outcome<'a> {
    pub service: Option<Arc<str>>,
    pub endpoint: Option<SocketAddr>,
    pub peer_node: Option<&'a str>,
    pub method: Option<&'a http::Method>,
    pub status: Option<u16>,
    pub grpc_status: Option<i32>,
    pub attempt: Option<u32>,
    pub mesh_error: Option<&'static str>,
    pub breaker: Option<&'static str>,
    pub fault: Option<&'static str>,
    pub request_bytes: Option<u64>,
    pub response_bytes: Option<u64>,
}

impl Tracer {
    pub fn new(sink: TraceSink, config: &TracingConfig, node: &str) -> Tracer {
        Tracer {
            sink,
            sample_rate: config.sample_rate,
            record_headers: config
                .record_headers
                .iter()
                .filter_map(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            node: Arc::from(node),
        }
    }

    pub fn disabled() -> Tracer {
        Tracer {
            sink: TraceSink::disabled(),
            sample_rate: 0.0,
            record_headers: Arc::from([]),
            node: Arc::from(""),
        }
    }

    /// The trace of a request just received: a child of the context it carries (W3C, then B3), or a new root
    /// (malformed headers start a new root too). `None` while tracing is off.
    ///
    /// Boxed: the request's context and future carry it, and with tracing off they should stay as small as
    /// before tracing existed (moving a larger future costs every request a copy).
    pub fn start(&self, headers: &HeaderMap) -> Option<Box<Hop>> {
        if !self.sink.is_enabled() {
            return None;
        }
        // One pass over the names: a request without any trace header — every new root — skips the lookups.
        let (mut traced, mut forced) = (false, false);
        for name in headers.keys() {
            traced |= context::is_trace_header(name);
            forced |= name == MESH_SAMPLE;
        }
        let incoming: Option<TraceContext> = if traced { extract(headers) } else { None };
        let force = forced
            && headers.get(MESH_SAMPLE).is_some_and(|v| {
                v.as_bytes() == b"1" || v.as_bytes().eq_ignore_ascii_case(b"true")
            });
        let sampled = decide(incoming.as_ref(), force, self.sample_rate);
        let extra = if sampled {
            self.record_headers
                .iter()
                .filter_map(|name| {
                    let v = headers.get(name)?.to_str().ok()?;
                    Some((format!("http.request.header.{name}"), v.to_string()))
                })
                .collect()
        } else {
            Vec::new()
        };
        Some(Box::new(Hop {
            ids: context::child(incoming.as_ref()),
            sampled,
            format: incoming.as_ref().map_or(Format::W3c, |c| c.format),
            tracestate: incoming.and_then(|c| c.tracestate),
            start: SystemTime::now(),
            clean: !traced,
            extra,
        }))
    }

    /// Records the server span of a finished request (when sampled). `direction` starts its name.
    pub fn server(
        &self,
        hop: Option<&Hop>,
        direction: &'static str,
        duration: Duration,
        o: Outcome<'_>,
    ) {
        let Some(hop) = hop.filter(|h| h.sampled) else {
            return;
        };
        let span = self.span(
            &hop.ids,
            SpanKind::Server,
            direction,
            hop.start,
            duration,
            hop.extra.clone(),
            o,
        );
        self.sink.record(span);
    }

    /// The client span of one attempt of a gRPC call whose status comes in the trailers, to be recorded when
    /// the response body ends (`None` when not sampled).
    pub fn client_pending(
        &self,
        hop: &Hop,
        ids: &SpanIds,
        start: SystemTime,
        o: Outcome<'_>,
    ) -> Option<Box<PendingSpan>> {
        hop.sampled.then(|| {
            Box::new(PendingSpan {
                body_bytes: 0,
                status_seen: false,
                span: Some(self.span(
                    ids,
                    SpanKind::Client,
                    "",
                    start,
                    Duration::ZERO,
                    Vec::new(),
                    o,
                )),
                sink: self.sink.clone(),
            })
        })
    }

    /// Records the client span of one attempt (when sampled).
    pub fn client(
        &self,
        hop: &Hop,
        ids: &SpanIds,
        start: SystemTime,
        duration: Duration,
        o: Outcome<'_>,
    ) {
        if !hop.sampled {
            return;
        }
        let span = self.span(ids, SpanKind::Client, "", start, duration, Vec::new(), o);
        self.sink.record(span);
    }

    #[allow(clippy::too_many_arguments)]
    fn span(
        &self,
        ids: &SpanIds,
        kind: SpanKind,
        name_prefix: &'static str,
        start: SystemTime,
        duration: Duration,
        extra: Vec<(String, String)>,
        o: Outcome<'_>,
    ) -> Span {
        Span {
            trace_id: ids.trace_id,
            span_id: ids.span_id,
            parent_id: ids.parent_id,
            name_prefix,
            kind,
            start,
            duration,
            local_node: self.node.clone(),
            service: o.service,
            endpoint: o.endpoint,
            peer_node: o.peer_node.map(Arc::from),
            method: o.method.cloned(),
            status: o.status,
            grpc_status: o.grpc_status,
            attempt: o.attempt,
            mesh_error: o.mesh_error,
            breaker: o.breaker,
            fault: o.fault,
            request_bytes: o.request_bytes,
            response_bytes: o.response_bytes,
            error: false,
            extra,
        }
    }
}

/// A client span that ends with its response body: it takes the gRPC status from the trailers and is recorded
/// when the body ends, fails or is dropped, with the duration up to then.
pub struct PendingSpan {
    span: Option<Span>,
    sink: TraceSink,
    /// Response body bytes seen so far (the size when the head declared none).
    body_bytes: u64,
    /// The trailers carried a `grpc-status`; a call that ends without one failed (gRPC's rule).
    status_seen: bool,
}

impl PendingSpan {
    /// A data frame of `n` bytes passed.
    pub fn data(&mut self, n: usize) {
        self.body_bytes = self
            .body_bytes
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// The trailers arrived, with this `grpc-status` (or none).
    pub fn trailers(&mut self, grpc_status: Option<i32>) {
        if let Some(span) = &mut self.span {
            span.grpc_status = grpc_status;
        }
        self.status_seen |= grpc_status.is_some();
    }

    /// The body broke mid-way.
    pub fn failed(&mut self) {
        if let Some(span) = &mut self.span {
            span.error = true;
        }
    }

    /// Records the span now (once).
    pub fn end(&mut self) {
        if let Some(mut span) = self.span.take() {
            // No status: the stream ended without one, or the body was dropped before its end (the caller
            // went away) — either way not a success.
            span.error |= !self.status_seen;
            span.duration = span.start.elapsed().unwrap_or_default();
            span.response_bytes = span.response_bytes.or(Some(self.body_bytes));
            self.sink.record(span);
        }
    }
}

impl Drop for PendingSpan {
    fn drop(&mut self) {
        // The body was dropped before its end (the caller went away): the span ends here.
        self.end();
    }
}

impl Hop {
    /// A client span for one attempt: its ids, written into the attempt's headers in the format received.
    pub fn attempt(&self, headers: &mut HeaderMap) -> SpanIds {
        let ids = self.ids.child();
        self.write(headers, &ids);
        ids
    }

    /// Writes `ids` as the context of an outgoing request.
    pub fn write(&self, headers: &mut HeaderMap, ids: &SpanIds) {
        let write = if self.clean {
            context::inject_clean
        } else {
            inject
        };
        write(
            headers,
            self.format,
            ids,
            self.sampled,
            self.tracestate.as_deref(),
            &[],
        );
    }

    /// The trace id as 32 hex digits (for logs).
    pub fn trace_id(&self) -> String {
        crate::telemetry::trace::context::hex(&self.ids.trace_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer() -> (Tracer, impl Fn() -> Vec<Span>) {
        let (sink, recorded) = TraceSink::capturing();
        let config = TracingConfig {
            sample_rate: 1.0,
            zipkin: None,
            otlp: None,
            record_headers: Vec::new(),
        };
        (Tracer::new(sink, &config, "node-a"), recorded)
    }

    fn pending(tracer: &Tracer) -> Box<PendingSpan> {
        let hop = tracer.start(&HeaderMap::new()).unwrap();
        let ids = hop.ids.child();
        tracer
            .client_pending(&hop, &ids, SystemTime::now(), Outcome::default())
            .unwrap()
    }

    #[test]
    fn a_pending_span_takes_the_trailers_status_and_counts_the_body() {
        let (tracer, recorded) = tracer();
        let mut span = pending(&tracer);
        span.data(5);
        span.data(12);
        span.trailers(Some(0));
        span.end();
        drop(span);
        let spans = recorded();
        assert_eq!(spans.len(), 1, "recorded once, not again when dropped");
        assert_eq!(spans[0].grpc_status, Some(0));
        assert_eq!(spans[0].response_bytes, Some(17));
        assert!(!spans[0].is_error());
    }

    #[test]
    fn a_pending_span_without_a_status_is_an_error() {
        let (tracer, recorded) = tracer();
        // The stream ended without a grpc-status.
        let mut span = pending(&tracer);
        span.trailers(None);
        span.end();
        // The body was dropped before its end (the caller went away).
        drop(pending(&tracer));
        let spans = recorded();
        assert_eq!(spans.len(), 2);
        assert!(spans.iter().all(Span::is_error), "{spans:?}");
    }
}
