//! `kiln`: the command line of the kiln sandbox platform.

mod agent_cmd;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kiln runs untrusted code in hardware-isolated microVMs.
///
/// Today this binary drives the guest agent on this host (self-test, benchmarks); the
/// daemon, sandboxes and templates arrive with the engine and API.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Work with the guest agent directly.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Measure kiln's performance.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Start the agent on this host in private namespaces (needs root) and check exec,
    /// stdin, PTY, background processes, files and health end to end.
    Selftest {
        /// Agent binary (default: $KILN_AGENT_BIN, or kiln-agent next to this binary).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Exec round trip of `true` (p50/p99) and file throughput, against the agent on this
    /// host over a unix socket.
    Agent {
        /// Agent binary (default: $KILN_AGENT_BIN, or kiln-agent next to this binary).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Number of timed execs.
        #[arg(long, default_value_t = 1000)]
        iterations: usize,
        /// Size of the file written and read back, in MiB.
        #[arg(long, default_value_t = 100)]
        file_mib: u64,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Agent {
            command: AgentCommand::Selftest { agent },
        } => agent_cmd::selftest(agent).await,
        Commands::Bench {
            command:
                BenchCommand::Agent {
                    agent,
                    iterations,
                    file_mib,
                    json,
                },
        } => agent_cmd::bench(agent, iterations, file_mib, json).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
