//! A stock rmcp 3.11 Streamable HTTP server: `LocalSessionManager`, rmcp's default settings, one
//! trivial tool (`echo {text}`), served by hyper. It is what shoal is compared against in
//! docs/benchmarks.md (scripts/bench-compare.sh): the same SDK without shared state.
//!
//! Usage: bench-rmcp-stock [ADDR] [--json-response]   (default 127.0.0.1:8090; the endpoint is any
//! path). `--json-response` answers POSTs with plain JSON instead of an SSE stream (rmcp's
//! JSON-response mode, which shoal also uses), for the 2026-07-28 comparison of
//! `scripts/bench-wrk.sh`.

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rmcp::{
    ServerHandler,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{ServerCapabilities, ServerConfig},
    schemars, tool, tool_handler, tool_router,
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    },
};

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct EchoParams {
    /// Text to send back.
    text: String,
}

#[derive(Debug, Clone)]
struct Echo {
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Echo {
    #[tool(description = "Send the text back.")]
    fn echo(&self, Parameters(EchoParams { text }): Parameters<EchoParams>) -> String {
        text
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Echo {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json_response = args.iter().any(|arg| arg == "--json-response");
    let addr = args
        .iter()
        .find(|arg| !arg.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:8090".to_owned());
    let service: StreamableHttpService<Echo, LocalSessionManager> = StreamableHttpService::new(
        || {
            Ok(Echo {
                tool_router: Echo::tool_router(),
            })
        },
        Default::default(),
        StreamableHttpServerConfig::default().with_json_response(json_response),
    );
    let service = TowerToHyperService::new(service);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("bench-rmcp-stock: http://{addr}/mcp");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
