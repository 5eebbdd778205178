//! Reporting an attempt's outcome to its endpoint's circuit breaker — at once for HTTP, or when a gRPC
//! response's trailers arrive — and never leaving a breaker's single probe unaccounted for.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::config::Config;
use crate::policy::breaker::Transition;
use crate::routing::EndpointState;

/// The pending outcome of one attempt.
pub struct Report {
    state: Arc<EndpointState>,
    config: Arc<Config>,
    /// The service whose policy applies.
    logical: Arc<str>,
    /// The service and endpoint for the breaker gauge.
    target: Arc<str>,
    addr: SocketAddr,
    gauge: prometheus::IntGaugeVec,
    done: bool,
}

impl Report {
    pub fn new(
        state: Arc<EndpointState>,
        config: Arc<Config>,
        logical: Arc<str>,
        target: Arc<str>,
        addr: SocketAddr,
        gauge: prometheus::IntGaugeVec,
    ) -> Self {
        Report {
            state,
            config,
            logical,
            target,
            addr,
            gauge,
            done: false,
        }
    }

    pub fn finish(mut self, ok: bool) {
        self.record(ok);
    }

    fn record(&mut self, ok: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let cfg = &self.config.policy_for(&self.logical).circuit_breaker.config;
        let transition = self
            .state
            .breaker_record(cfg, Instant::now(), ok, fastrand::f64());
        let value = match transition {
            Some(Transition::Opened) => {
                tracing::warn!(service = %self.target, endpoint = %self.addr, "circuit breaker opened");
                1
            }
            Some(Transition::Closed) => {
                tracing::info!(service = %self.target, endpoint = %self.addr, "circuit breaker closed");
                0
            }
            None => return,
        };
        self.gauge
            .with_label_values(&[&*self.target, &self.addr.to_string()])
            .set(value);
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
        if !self.done {
            // The caller went away before the outcome was known: let another request probe instead.
            self.state.breaker_release(Instant::now());
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body, passed through unchanged, that reports a gRPC status found in its
    /// trailers to the endpoint's breaker.
    pub struct Observed {
        #[pin]
        inner: Incoming,
        report: Option<Report>,
    }
}

impl Observed {
    pub fn new(inner: Incoming, report: Option<Report>) -> Self {
        Observed { inner, report }
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        if let Some(report) = this.report.as_mut() {
            match &res {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        let code = trailers
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u8>().ok());
                        report.grpc(code);
                    }
                }
                Poll::Ready(None) => report.grpc(None),
                // A stream broken mid-way is the endpoint failing.
                Poll::Ready(Some(Err(_))) => report.record(false),
                Poll::Pending => {}
            }
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
