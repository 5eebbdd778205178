//! The backend every target of `bench/run` reaches: a small hyper server that answers HTTP/1.1 and h2c (prior
//! knowledge) on one port.
//!
//! - A request whose `content-type` starts with `application/grpc` is a gRPC unary call: its body is read and
//!   dropped, and the answer is one gRPC message of 1 KiB followed by the trailer `grpc-status: 0`.
//! - Any other request: its body is read and dropped, and the answer is 200 with a 1 KiB body.
//!
//! ```text
//! bench-backend [--listen 127.0.0.1:19080] [--threads 1]
//! ```
//! One thread runs a current-thread runtime (the harness pins it to a core); more run a multi-thread one.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// The size of every answer's payload.
const PAYLOAD: usize = 1024;

type GrpcBody = StreamBody<
    futures_util::stream::Iter<std::array::IntoIter<Result<Frame<Bytes>, Infallible>, 2>>,
>;

fn main() -> std::process::ExitCode {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 19080).into();
    let mut threads = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next();
        let parsed = match (arg.as_str(), value) {
            ("--listen", Some(v)) => v
                .parse()
                .map(|a| listen = a)
                .map_err(|e| format!("--listen: {e}")),
            ("--threads", Some(v)) => match v.parse() {
                Ok(n) if n > 0 => {
                    threads = n;
                    Ok(())
                }
                _ => Err(format!("--threads: {v:?} is not a positive number")),
            },
            _ => Err(format!(
                "usage: bench-backend [--listen ADDR] [--threads N] (at {arg:?})"
            )),
        };
        if let Err(e) = parsed {
            eprintln!("bench-backend: {e}");
            return std::process::ExitCode::from(64);
        }
    }
    let result = meshd::util::runtime::build(threads).and_then(|rt| rt.block_on(serve(listen)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-backend: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let plain = Bytes::from(vec![b'x'; PAYLOAD]);
    let mut framed = BytesMut::with_capacity(PAYLOAD + 5);
    framed.put_u8(0);
    framed.put_u32(PAYLOAD as u32);
    framed.put_slice(&plain);
    let grpc = framed.freeze();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1000);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors and the like: the load generator backs off, so carry on.
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let (builder, plain, grpc) = (builder.clone(), plain.clone(), grpc.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| answer(req, plain.clone(), grpc.clone()));
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    plain: Bytes,
    grpc: Bytes,
) -> Result<Response<Either<Full<Bytes>, GrpcBody>>, Infallible> {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // Read the whole request body (and drop it) before answering, as a real service would.
    let _ = req.into_body().collect().await;
    if !is_grpc {
        return Ok(Response::new(Either::Left(Full::new(plain))));
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = [Ok(Frame::data(grpc)), Ok(Frame::trailers(trailers))];
    let mut response = Response::new(Either::Right(StreamBody::new(futures_util::stream::iter(
        frames,
    ))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}
