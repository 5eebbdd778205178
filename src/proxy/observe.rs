//! What happens after an upstream answers: the attempt's outcome reaches its endpoint's circuit breaker — at
//! once for HTTP, or when a gRPC response's trailers arrive — and the connection goes back to its pool when the
//! response body ends.
//!
//! A breaker's permit is never left unaccounted for: a [`Report`] dropped before it recorded an outcome (the
//! client went away, the attempt was abandoned) gives its permit back, so a cancelled probe makes room for
//! exactly one new one.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::pool::{Lease, UpBody};
use super::spans::PendingSpan;
use crate::config::Config;
use crate::policy::breaker::{Permit, Transition};
use crate::routing::Service;

/// The pending outcome of one attempt.
pub struct Report {
    /// The service whose endpoint was tried, and which one.
    service: Arc<Service>,
    idx: usize,
    permit: Permit,
    config: Arc<Config>,
    /// The service whose policy applies.
    logical: Arc<str>,
    gauge: prometheus::IntGaugeVec,
    done: bool,
}

impl Report {
    pub fn new(
        service: Arc<Service>,
        idx: usize,
        permit: Permit,
        config: Arc<Config>,
        logical: Arc<str>,
        gauge: prometheus::IntGaugeVec,
    ) -> Self {
        Report {
            service,
            idx,
            permit,
            config,
            logical,
            gauge,
            done: false,
        }
    }

    pub fn finish(mut self, ok: bool) {
        self.record(ok);
    }

    /// The attempt says nothing about the endpoint (the client's fault, a stale connection): give the permit
    /// back without an outcome.
    pub fn abandon(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if !self.done {
            self.done = true;
            self.service.endpoints[self.idx]
                .state
                .breaker_release(Instant::now(), self.permit);
        }
    }

    fn record(&mut self, ok: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let policy = self.config.policy_for(&self.logical);
        let cfg = &policy.circuit_breaker.config;
        let endpoint = &self.service.endpoints[self.idx];
        let now = Instant::now();
        let opened = match endpoint
            .state
            .breaker_record(cfg, now, self.permit, ok, fastrand::f64())
        {
            None => return,
            Some(Transition::Closed) => {
                tracing::info!(service = %self.service.name, endpoint = %endpoint.addr, "circuit breaker closed");
                false
            }
            Some(Transition::Reopened) => return,
            Some(Transition::Tripped) => {
                // Eject only while the service stays within max_ejection_percent. The lock makes the count and
                // the ejection one step, so two endpoints tripping together cannot both take the last place.
                let _guard = self
                    .service
                    .state
                    .ejection
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let limit = self.service.ejection_limit(policy.max_ejection_percent);
                if self.service.ejected() >= limit {
                    tracing::debug!(service = %self.service.name, endpoint = %endpoint.addr, limit,
                        "circuit breaker tripped, but max_ejection_percent keeps the endpoint in rotation");
                    return;
                }
                if !endpoint.state.breaker_eject(cfg, now, fastrand::f64()) {
                    return;
                }
                tracing::warn!(service = %self.service.name, endpoint = %endpoint.addr, "circuit breaker opened");
                true
            }
        };
        self.gauge
            .with_label_values(&[&*self.service.name, &endpoint.addr.to_string()])
            .set(i64::from(opened));
    }

    fn grpc(&mut self, code: Option<u8>) {
        let failed = code.is_some_and(|c| {
            self.config
                .policy_for(&self.logical)
                .circuit_breaker
                .failure_on
                .grpc_status(c)
        });
        self.record(!failed);
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        // The caller went away before the outcome was known: let another request probe instead.
        self.release();
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body, passed through unchanged. It reports a gRPC status found in its trailers to
    /// the endpoint's breaker, and hands the connection back to its pool as soon as the body ends.
    pub struct Observed {
        #[pin]
        inner: UpBody,
        report: Option<Report>,
        lease: Option<Lease>,
        // Boxed: a response body is moved around, and most carry no span.
        span: Option<Box<PendingSpan>>,
    }
}

impl Observed {
    pub fn new(inner: UpBody, report: Option<Report>, lease: Option<Lease>) -> Self {
        Observed {
            inner,
            report,
            lease,
            span: None,
        }
    }

    /// Ends `span` with this body, which gives it the gRPC status of the trailers.
    pub fn end_span_with_body(&mut self, span: Box<PendingSpan>) {
        self.span = Some(span);
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(span), Some(data)) = (this.span.as_mut(), frame.data_ref()) {
                    span.data(data.len());
                }
                if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers
                        .get(crate::proxy::headers::GRPC_STATUS)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u8>().ok());
                    if let Some(report) = this.report.as_mut() {
                        report.grpc(code);
                    }
                    if let Some(span) = this.span.as_mut() {
                        span.trailers(code.map(i32::from));
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(report) = this.report.as_mut() {
                    report.grpc(None);
                }
                if let Some(span) = this.span.as_mut() {
                    span.end();
                }
                // The connection is free for the next request now, not when hyper drops the body.
                this.lease.take();
            }
            // A stream broken mid-way is the endpoint failing.
            Poll::Ready(Some(Err(_))) => {
                if let Some(report) = this.report.as_mut() {
                    report.record(false);
                }
                if let Some(span) = this.span.as_mut() {
                    span.failed();
                    span.end();
                }
                this.lease.take();
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
