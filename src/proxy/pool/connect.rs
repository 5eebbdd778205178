//! Opening TCP connections to upstreams, bounded by the service's `connect_timeout`.
//!
//! Every upstream connection — to a local container or to a peer agent's inbound listener — starts here, so
//! this is where mutual TLS toward peers plugs in: the [`PoolKey`](super::PoolKey) already carries the identity
//! the peer must prove.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// TCP keep-alive probes on upstream connections start after this much silence, so a peer that vanished
/// without closing (a dead host, a dropped NAT entry) is noticed even on an idle pooled connection.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to {addr} within {}", crate::util::duration::format(*.after))]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("could not connect to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connected to {addr}, but {detail}")]
    Tls { addr: SocketAddr, detail: String },
    #[error("connected to {addr}, but the HTTP handshake failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl ConnectError {
    /// The bounded `result` label of `meshd_upstream_connects_total`.
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                "refused"
            }
            ConnectError::Io { .. } => "error",
            ConnectError::Handshake { .. } => "handshake",
            ConnectError::Tls { .. } => "tls",
        }
    }
}

/// Connects to `addr` within `timeout`, with Nagle off and TCP keep-alive on.
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
        Err(_) => {
            return Err(ConnectError::Timeout {
                addr,
                after: timeout,
            });
        }
    };
    // Best effort: a socket that refuses these options still works.
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
    Ok(stream)
}

/// Connects for an HTTP/2 pool: TCP, then, toward a peer agent (`node` set) when `tls` is set, mutual TLS proving
/// that node, all within `timeout`; plaintext otherwise (a local h2c endpoint, or peers without `[tls]`).
pub async fn peer(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&crate::tls::peers::PeerTls>,
    node: Option<&std::sync::Arc<str>>,
) -> Result<crate::tls::stream::Stream, ConnectError> {
    let started = tokio::time::Instant::now();
    let tcp = self::tcp(addr, timeout).await?;
    let (Some(tls), Some(node)) = (tls, node) else {
        return Ok(crate::tls::stream::Stream::Plain(tcp));
    };
    let left = timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(left, tls.connect(tcp, addr, node)).await {
        Ok(Ok(s)) => Ok(crate::tls::stream::Stream::Tls(Box::new(s.into()))),
        Ok(Err(detail)) => Err(ConnectError::Tls { addr, detail }),
        Err(_) => {
            tls.timed_out("outbound", addr);
            Err(ConnectError::Timeout {
                addr,
                after: timeout,
            })
        }
    }
}
