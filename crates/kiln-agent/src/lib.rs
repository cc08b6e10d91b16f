//! kiln's guest agent.
//!
//! Runs as PID 1 in every sandbox (or, for tests and development, as an ordinary process on
//! the host with its init duties disabled) and serves the host over one byte stream: see
//! [`kiln_proto`] for the protocol.

pub mod cgroups;
pub mod duties;
pub mod files;
pub mod info;
pub mod output;
pub mod process;
pub mod reaper;
pub mod server;
pub mod session;
pub mod transport;
pub mod users;

pub use server::{Agent, AgentConfig};
