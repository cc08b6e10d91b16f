//! Errors of the agent client.

use std::io;
use std::time::Duration;

use kiln_proto::messages::{AgentError, ErrorKind};

/// What can go wrong talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The transport could not be opened.
    #[error("cannot connect to the agent")]
    Connect(#[source] io::Error),
    /// The session handshake failed.
    #[error("agent handshake failed: {0}")]
    Handshake(String),
    /// The agent speaks a protocol version this host does not accept.
    #[error(
        "agent speaks protocol version {agent}, this host accepts {}",
        accepted_versions()
    )]
    IncompatibleVersion {
        /// The agent's version.
        agent: u32,
    },
    /// An operation did not finish in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The process takes no more input: it has ended (its input stream is closed). Its
    /// output and exit status still arrive on its session.
    #[error("the process takes no more input: it has ended")]
    InputClosed,
    /// The session broke.
    #[error("connection to the agent lost: {0}")]
    Disconnected(String),
    /// The agent sent something that violates the protocol.
    #[error("protocol violation by the agent: {0}")]
    Protocol(String),
    /// The agent refused or failed the operation.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Reading or writing the host-side end of a transfer failed.
    #[error("local I/O failed")]
    LocalIo(#[source] io::Error),
}

impl ClientError {
    /// The agent's error kind, if the agent reported the error.
    pub fn agent_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Agent(e) => Some(e.kind),
            _ => None,
        }
    }

    /// Whether a new session might succeed where this one failed.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            ClientError::Connect(_) | ClientError::Disconnected(_) | ClientError::Handshake(_)
        )
    }
}

/// The versions this host accepts, for messages: `only 1`, or `1 and 2`.
fn accepted_versions() -> String {
    let versions = kiln_proto::accepted_versions();
    if versions.start() == versions.end() {
        format!("only {}", versions.end())
    } else {
        format!("{} and {}", versions.start(), versions.end())
    }
}

impl From<hyper::Error> for ClientError {
    fn from(e: hyper::Error) -> Self {
        // hyper's own message names only the kind ("http2 error"); what happened (a keep-alive
        // ping unanswered, a reset, a broken pipe) is in its sources.
        ClientError::Disconnected(with_causes(&e))
    }
}

/// `error` and each of its sources, joined by ": " (a source whose text the message already
/// ends with is left out).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

impl From<kiln_proto::stream::StreamClosed> for ClientError {
    fn from(e: kiln_proto::stream::StreamClosed) -> Self {
        ClientError::Disconnected(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_says_why() {
        #[derive(Debug, thiserror::Error)]
        #[error("http2 error")]
        struct Outer(#[source] io::Error);
        let cause = io::Error::new(io::ErrorKind::TimedOut, "keep-alive timed out");
        assert_eq!(
            with_causes(&Outer(cause)),
            "http2 error: keep-alive timed out"
        );
        // A source already in the message is not said twice.
        #[derive(Debug, thiserror::Error)]
        #[error("broken pipe")]
        struct Same(#[source] io::Error);
        let cause = io::Error::new(io::ErrorKind::BrokenPipe, "broken pipe");
        assert_eq!(with_causes(&Same(cause)), "broken pipe");
    }

    #[test]
    fn version_error_names_only_versions_that_exist() {
        let message = ClientError::IncompatibleVersion { agent: 9 }.to_string();
        assert!(
            message.contains(&kiln_proto::PROTOCOL_VERSION.to_string()),
            "{message}"
        );
        assert!(
            !message.contains(" 0"),
            "version 0 never existed: {message}"
        );
    }
}
