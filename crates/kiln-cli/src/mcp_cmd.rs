//! `kiln mcp`: kiln's MCP tools over stdio, for agents that start their MCP servers as
//! processes. The tools are the daemon's (`kiln_api::mcp`); their API calls go to the daemon
//! over HTTP with this command's key, so stdio and the daemon's `/mcp` behave alike.

use std::sync::Arc;

use anyhow::{Context, Result};
use futures_util::future::BoxFuture;
use kiln_api::mcp::{read_limited, ApiBackend, ApiCall, ApiReply, KilnMcp};
use rmcp::ServiceExt;

use crate::client_cmd::Client;

/// The daemon over HTTP.
#[derive(Debug)]
struct Remote {
    client: Client,
}

impl ApiBackend for Remote {
    fn call(&self, call: ApiCall) -> BoxFuture<'_, Result<ApiReply, String>> {
        Box::pin(async move {
            // This command's own key, never one a message carries.
            let mut request = self.client.request(call.method, &call.uri);
            if let Some((content_type, body)) = call.body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .body(body);
            }
            let response = request.send().await.map_err(|e| {
                format!(
                    "cannot reach the kiln daemon at {} ({e}); start it with `kiln serve`, or set \
                     KILN_URL",
                    self.client.url()
                )
            })?;
            let status = response.status();
            let body = http_body_util::StreamBody::new(futures_util::StreamExt::map(
                response.bytes_stream(),
                |chunk| chunk.map(http_body::Frame::data),
            ));
            let (body, truncated) = read_limited(body, call.limit).await?;
            Ok(ApiReply {
                status,
                body,
                truncated,
            })
        })
    }
}

/// Serves the tools on stdin/stdout until the client closes stdin.
pub async fn serve(client: Client) -> Result<()> {
    if !client.has_key() {
        eprintln!(
            "kiln mcp: no API key (set KILN_API_KEY or run `kiln keys create --save`); every \
             tool call will fail until there is one"
        );
    }
    let tools = KilnMcp::new(Arc::new(Remote { client }));
    let running = tools
        .serve(rmcp::transport::stdio())
        .await
        .context("starting MCP over stdio")?;
    running.waiting().await.context("serving MCP over stdio")?;
    Ok(())
}
