//! Pooled connections to upstreams: keep-alive HTTP/1.1 and multiplexed HTTP/2, one pool per protocol.

use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::errors::MeshError;

/// Idle pooled connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per endpoint.
const POOL_MAX_IDLE_PER_HOST: usize = 64;

/// A request body on its way upstream: streamed from the client, or buffered so it can be sent again.
pub type ReqBody = Either<Incoming, Full<Bytes>>;

type Pool = Client<HttpConnector, ReqBody>;

/// Why an upstream request failed, as far as retries and breakers care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    /// No connection could be made: the request certainly never reached the application.
    Connect,
    /// The HTTP/2 server refused the stream before processing it (REFUSED_STREAM): also never processed.
    RefusedStream,
    /// No response headers in time.
    Timeout,
    /// The connection failed after the request was sent: it may have been processed.
    Other,
}

/// A failed upstream request.
#[derive(Debug)]
pub struct SendError {
    pub kind: FailKind,
    pub detail: String,
}

impl SendError {
    pub fn mesh_error(&self) -> MeshError {
        match self.kind {
            FailKind::Connect => MeshError::ConnectFailed,
            FailKind::Timeout => MeshError::Timeout,
            FailKind::RefusedStream | FailKind::Other => MeshError::UpstreamFailed,
        }
    }
}

/// The upstream connection pools.
#[derive(Clone)]
pub struct Clients {
    h1: Pool,
    h2: Pool,
}

impl Default for Clients {
    fn default() -> Self {
        Self::new()
    }
}

impl Clients {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .timer(TokioTimer::new())
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .build(connector);
        Clients { h1, h2 }
    }

    /// Sends `req` to `uri` as `version`, waiting at most `timeout` for the response headers.
    pub async fn send(
        &self,
        mut req: Request<ReqBody>,
        uri: Uri,
        version: Version,
        timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        // Reference-counted: formatted only if an error needs it.
        let target: Option<Authority> = uri.authority().cloned();
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        let pool = if version == Version::HTTP_2 {
            &self.h2
        } else {
            &self.h1
        };
        let target = || {
            target
                .as_ref()
                .map(|a| a.as_str())
                .unwrap_or("")
                .to_string()
        };
        match tokio::time::timeout(timeout, pool.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err(SendError {
                kind: FailKind::Connect,
                detail: format!("could not connect to {}: {}", target(), root_cause(&e)),
            }),
            Ok(Err(e)) => Err(SendError {
                kind: if refused_stream(&e) {
                    FailKind::RefusedStream
                } else {
                    FailKind::Other
                },
                detail: format!("{} failed before responding: {}", target(), root_cause(&e)),
            }),
            Err(_) => Err(SendError {
                kind: FailKind::Timeout,
                detail: format!(
                    "no response from {} within {}",
                    target(),
                    crate::config::format_duration(Duration::from_millis(
                        timeout.as_millis() as u64
                    ))
                ),
            }),
        }
    }
}

fn refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cur = err.source();
    }
    false
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
