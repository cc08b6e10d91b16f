//! Helpers shared by the agent's end-to-end tests: start an agent on the host in private
//! namespaces and build requests tersely.
#![allow(dead_code)]

use std::path::Path;

use kiln_agent_client::local::{LocalAgent, LocalAgentOptions};
use kiln_agent_client::{AgentClient, ExecResult};
use kiln_proto::messages::{Command, ExecRequest};

/// The agent binary built for this test run.
pub fn agent_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kiln-agent"))
}

/// Starts an agent with default options.
pub async fn start() -> (LocalAgent, AgentClient) {
    start_with(LocalAgentOptions::default()).await
}

/// Starts an agent with `options`.
pub async fn start_with(options: LocalAgentOptions) -> (LocalAgent, AgentClient) {
    let agent = LocalAgent::start(agent_binary(), options)
        .await
        .expect("agent starts");
    let client = agent.client();
    (agent, client)
}

/// A foreground `sh -c` request.
pub fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(Command::Shell(script.to_owned()))
}

/// Runs `script` to completion with a 16 MiB output limit.
pub async fn run(client: &AgentClient, script: &str) -> ExecResult {
    client
        .run(sh(script), 16 << 20)
        .await
        .expect("exec succeeds")
}

/// Stdout as text.
pub fn text(result: &ExecResult) -> String {
    String::from_utf8_lossy(&result.stdout).into_owned()
}

/// The agent's error kind of a failed call, if it failed with one.
pub fn kind<T>(
    result: Result<T, kiln_agent_client::ClientError>,
) -> Option<kiln_proto::messages::ErrorKind> {
    result.err().and_then(|e| e.agent_kind())
}
