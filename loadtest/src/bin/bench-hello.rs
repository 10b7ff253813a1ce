//! The physical ceiling for HTTP on a machine: a bare hyper server answering every request with a
//! fixed JSON body, no routing, no parsing. docs/benchmarks.md compares shoal against it
//! (scripts/bench-compare.sh).
//!
//! Usage: bench-hello [ADDR]   (default 127.0.0.1:8091)

use std::convert::Infallible;

use http_body_util::Full;
use hyper::{Response, body::Bytes, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

const BODY: &[u8] =
    br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hello"}]}}"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8091".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("bench-hello: http://{addr}/");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_request| async {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(BODY)))
                        .expect("a valid response"),
                )
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
