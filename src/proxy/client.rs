//! Pooled connections to upstreams: keep-alive HTTP/1.1 and multiplexed HTTP/2, one pool per protocol.

use std::time::Duration;

use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::errors::MeshError;

/// Idle pooled connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per endpoint.
const POOL_MAX_IDLE_PER_HOST: usize = 64;

type Pool = Client<HttpConnector, Incoming>;

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
        mut req: Request<Incoming>,
        uri: Uri,
        version: Version,
        timeout: Duration,
    ) -> Result<Response<Incoming>, (MeshError, String)> {
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        let target = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let pool = if version == Version::HTTP_2 {
            &self.h2
        } else {
            &self.h1
        };
        match tokio::time::timeout(timeout, pool.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err((
                MeshError::ConnectFailed,
                format!("could not connect to {target}: {}", root_cause(&e)),
            )),
            Ok(Err(e)) => Err((
                MeshError::UpstreamFailed,
                format!("{target} failed before responding: {}", root_cause(&e)),
            )),
            Err(_) => Err((
                MeshError::Timeout,
                format!(
                    "no response from {target} within {}",
                    crate::config::format_duration(timeout)
                ),
            )),
        }
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
