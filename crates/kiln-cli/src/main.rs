//! `kiln`: the command line of the kiln sandbox platform.

mod agent_cmd;
mod bench_create;
mod stats;
mod template_cmd;

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
    /// Build and manage templates (kernel, root filesystem, runtime defaults).
    Template {
        #[command(subcommand)]
        command: TemplateCommand,
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
enum TemplateCommand {
    /// Build a template's images into the cache (only what changed is rebuilt).
    ///
    /// TEMPLATE is a spec file, a directory holding template.toml, or the name of a template
    /// under $KILN_TEMPLATES_DIR, ./templates or /usr/share/kiln/templates (`base`, `python`).
    Build {
        /// Template spec, directory or name.
        #[arg(default_value = kiln_image::template::DEFAULT_TEMPLATE)]
        template: String,
        /// Static agent binary to install (default: $KILN_AGENT_BIN or this checkout's build).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Artefact cache directory.
        #[arg(long, env = "KILN_CACHE_DIR", default_value = kiln_image::cache::DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Create latency by snapshot restore (sequential and concurrent), a cold boot of the
    /// same template for comparison, bake time and idle memory per sandbox.
    Create {
        /// Template (spec, directory or name).
        #[arg(long, default_value = "base")]
        template: String,
        /// Sequential creates.
        #[arg(long, default_value_t = 30)]
        iterations: usize,
        /// Creates per concurrent batch.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Concurrent batches.
        #[arg(long, default_value_t = 5)]
        batches: usize,
        /// Cold boots for the comparison.
        #[arg(long, default_value_t = 3)]
        cold_boots: usize,
        /// Sandboxes kept running for the idle-memory figure.
        #[arg(long, default_value_t = 20)]
        idle: usize,
        /// Artefact cache directory.
        #[arg(long, env = "KILN_CACHE_DIR", default_value = kiln_image::cache::DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// Accelerator: auto, kvm or tcg.
        #[arg(long, default_value = "auto")]
        accel: kiln_vmm::accel::AccelChoice,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
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
        Commands::Template {
            command:
                TemplateCommand::Build {
                    template,
                    agent,
                    cache_dir,
                },
        } => tokio::task::spawn_blocking(move || template_cmd::build(&template, agent, &cache_dir))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("template build panicked: {e}"))),
        Commands::Bench {
            command:
                BenchCommand::Create {
                    template,
                    iterations,
                    concurrency,
                    batches,
                    cold_boots,
                    idle,
                    cache_dir,
                    accel,
                    json,
                },
        } => {
            bench_create::run(bench_create::BenchOptions {
                template,
                iterations,
                concurrency,
                batches,
                cold_boots,
                idle,
                cache_dir,
                accel,
                json,
            })
            .await
        }
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
