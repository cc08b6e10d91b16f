//! `kiln`: the command line of the kiln sandbox platform.

mod agent_cmd;
mod bench_api;
mod bench_code;
mod bench_create;
mod bench_fork;
mod bench_idle;
mod bench_images;
mod bench_net;
mod bench_pause;
mod bench_tti;
mod check_abuse;
mod check_cmd;
mod check_daemon;
mod check_escape;
mod check_fuzz;
mod check_recovery;
mod client_cmd;
mod escape_witness;
mod keys_cmd;
mod mcp_cmd;
mod serve_cmd;
mod stats;
mod template_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kiln runs untrusted code in hardware-isolated microVMs.
///
/// Start the daemon with `kiln serve`, make an API key with `kiln keys create --save`, then
/// `kiln run -- python3 -c 'print(1)'`. Commands that talk to the daemon use --url /
/// KILN_URL and --api-key / KILN_API_KEY, else the file `kiln keys create --save` wrote.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    client: LeadingClientArgs,
    #[command(subcommand)]
    command: Commands,
}

/// `--url` and `--api-key` given before the command's name (`kiln --url U run ...`), for the
/// commands that talk to the daemon; they take them after their name too.
#[derive(Debug, Clone, clap::Args)]
struct LeadingClientArgs {
    /// The daemon's URL, for commands that talk to it [env: KILN_URL; default: the CLI
    /// config file's, else http://127.0.0.1:7070].
    #[arg(long)]
    url: Option<String>,
    /// API key, for commands that talk to the daemon [env: KILN_API_KEY; default: the CLI
    /// config file's].
    #[arg(long)]
    api_key: Option<String>,
}

impl From<LeadingClientArgs> for client_cmd::ClientArgs {
    fn from(args: LeadingClientArgs) -> Self {
        client_cmd::ClientArgs {
            url: args.url,
            api_key: args.api_key,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run the daemon: the REST API over the engine, state in SQLite. SIGTERM stops it and
    /// leaves its sandboxes running (the next start re-adopts them); SIGINT (Ctrl-C) stops it
    /// and destroys them.
    Serve(Box<serve_cmd::ServeArgs>),
    /// Create, list, inspect and destroy sandboxes.
    Sandbox {
        #[command(flatten)]
        client: client_cmd::ClientArgs,
        #[command(subcommand)]
        command: SandboxCommand,
    },
    /// Snapshots: a sandbox's memory, device state and disk kept, to make sandboxes from
    /// (`kiln sandbox create --snapshot NAME`).
    Snapshot {
        #[command(flatten)]
        client: client_cmd::ClientArgs,
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Run a command in a sandbox, streaming its output; exits with the command's code.
    ///
    /// Example: kiln exec sb-1234 -- ls -la /
    Exec {
        /// Sandbox id.
        id: String,
        /// Environment KEY=VALUE for this command (repeatable; the same as --exec-env).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[command(flatten)]
        exec: client_cmd::ExecArgs,
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
    /// Run Python code in a sandbox's code interpreter (variables and imports persist between
    /// runs); prints its output and the value of its last expression; exits 1 if it raised.
    ///
    /// Example: kiln code sb-1234 -- 'import math; x = math.pi'   then   kiln code sb-1234 -- 'x * 2'
    ///
    /// The code comes from the words after `--`, or from stdin when there are none. Figures
    /// and other rich results are listed; `--json` prints them (base64 for images).
    Code {
        /// Sandbox id.
        id: String,
        #[command(flatten)]
        code: client_cmd::CodeArgs,
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
    /// Create a sandbox, run one command in it and destroy it; exits with the command's code.
    ///
    /// Example: kiln run --template python -- python3 -c 'print(6 * 7)'
    Run {
        #[command(flatten)]
        create: client_cmd::CreateArgs,
        #[command(flatten)]
        exec: client_cmd::ExecArgs,
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
    /// An interactive terminal in a sandbox (a login shell unless a command is given).
    ///
    /// Example: kiln shell sb-1234    or    kiln shell sb-1234 -- python3
    Shell {
        /// Sandbox id.
        id: String,
        /// The command to run in the terminal.
        #[arg(last = true)]
        command: Vec<String>,
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
    /// Files in a sandbox.
    Fs {
        #[command(flatten)]
        client: client_cmd::ClientArgs,
        #[command(subcommand)]
        command: FsCommand,
    },
    /// API keys in this host's daemon database (root); the first key is made here.
    Keys {
        #[command(flatten)]
        store: keys_cmd::StoreArgs,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Work with the guest agent directly.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Templates: build locally into the cache (`build`), or list, create and delete them on
    /// the daemon (`ls`, `create`, `rm`).
    Template {
        #[command(subcommand)]
        command: TemplateCommand,
    },
    /// Serve kiln's tools over the Model Context Protocol on stdin/stdout, for AI agents
    /// (create sandboxes, run code and commands, read and write files, fork, snapshot).
    ///
    /// The tools call the daemon at --url / KILN_URL with --api-key / KILN_API_KEY. Agents
    /// that speak streamable HTTP can use the daemon's own endpoint, `<url>/mcp`, instead.
    ///
    /// Example client entry: {"command": "kiln", "args": ["mcp"], "env": {"KILN_API_KEY": "…"}}
    Mcp {
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
    /// Check a running daemon's reliability and isolation (the reliability suite: escape
    /// probes, soak, a fault, abuses).
    ///
    /// Example: kiln check suite --profile quick --daemon-pid "$(pidof kiln)"
    Check {
        #[command(subcommand)]
        command: CheckCommand,
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
    /// Measure kiln's performance.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CheckCommand {
    /// A steady mixed load (create, exec, upload and download compared, fork, pause and
    /// resume, destroy) for a while: every error counted, the daemon's memory, descriptors
    /// and threads sampled, nothing left after. Exit status 1 on any error or leftover.
    Soak(check_cmd::SoakOptions),
    /// A sandbox's VMM killed with SIGKILL: it is marked failed with a reason, refuses work,
    /// can be destroyed, and a neighbour is not affected. Run as root on the daemon's host.
    Faults(check_cmd::FaultOptions),
    /// One sandbox at a time abuses its guest (fork bomb, memory bomb, every vCPU busy, disk
    /// filled, output without end, descriptors exhausted) while a neighbour's exec latency is
    /// measured against its baseline and the abuser's agent is timed; each abuser is then
    /// destroyed. Exit status 1 on a failed exec or destroy, or a leftover.
    Abuse(check_abuse::AbuseOptions),
    /// Escape probes from inside guests (host services and addresses, the daemon's port,
    /// cloud metadata, a LAN, other sandboxes, DNS rebinding, spoofing, device pokes, a
    /// guest that hangs, crashes or answers garbage), each as root and as an unprivileged
    /// user, each with a negative control; decoys record whatever arrives. Runs a daemon of
    /// its own whose only uplink is a decoy namespace it makes. Run as root.
    Escape(check_escape::EscapeOptions),
    /// Faults on a daemon of the check's own, its data directory on a small loop filesystem:
    /// the daemon killed with SIGKILL while sandboxes live (a new one adopts them all,
    /// nothing leaks), a template artefact tampered with (re-baked), the data disk full,
    /// the database locked by another process and damaged at start (clear errors, nothing
    /// lost). Run as root.
    Recovery(check_recovery::RecoveryOptions),
    /// Requests generated from the daemon's OpenAPI document (valid, valid with one part
    /// broken, random JSON, bytes that are not JSON, hostile ids, paths, queries and keys):
    /// no 5xx, every error the API's JSON with its request id, the daemon healthy after and
    /// nothing the fuzz made left. Then hostile exec streams from a fake agent against the
    /// host's agent client: no panic or hang, memory bounded. Use a tenant's key: the fuzz
    /// does whatever that key may (it never names what existed before it started).
    Fuzz(check_fuzz::FuzzOptions),
    /// The checks above in one run: `--profile quick` (CI: each escape probe as root, a
    /// 2-minute soak, goals reported) or `--profile full` (escape probes also as an
    /// unprivileged user, a 30-minute soak, the abuses' goals enforced). Exit status 1 if any
    /// check fails. Run as root on the daemon's host (the fault check kills a VMM; the escape
    /// probes run a daemon of their own).
    Suite(check_cmd::SuiteOptions),
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
enum SandboxCommand {
    /// Create a sandbox and print its id.
    Create {
        #[command(flatten)]
        create: client_cmd::CreateArgs,
        /// Print the sandbox as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List sandboxes.
    ///
    /// Example: kiln sandbox ls --state running --meta project=demo --limit 20
    Ls {
        #[command(flatten)]
        list: client_cmd::ListArgs,
    },
    /// Show a sandbox as JSON.
    Get {
        /// Sandbox id.
        id: String,
    },
    /// Show what a sandbox uses: CPU time (and share of one CPU between samples), memory,
    /// disk and network bytes, measured on the host.
    ///
    /// Example: kiln sandbox stats sb-1234 --watch
    Stats {
        /// Sandbox id.
        id: String,
        /// Refresh until interrupted (Ctrl-C), like `top`.
        #[arg(long, short)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 2.0, value_parser = positive_seconds)]
        interval: f64,
        /// Print JSON (one line per sample with --watch).
        #[arg(long)]
        json: bool,
    },
    /// Kill every process in a sandbox but its agent (what you started, what that started,
    /// the template's start command; a fork bomb too). The sandbox stays usable.
    ///
    /// Example: kiln sandbox kill-all sb-1234
    KillAll {
        /// Sandbox id.
        id: String,
    },
    /// Pause a sandbox to disk: its memory and device state are saved and its VM process
    /// ends (its RAM is given back); files, processes and network identity come back on
    /// resume, also after a daemon restart. Exec, files and ports resume it on their own
    /// unless it was created with --no-auto-resume.
    ///
    /// Example: kiln sandbox pause sb-1234
    Pause {
        /// Sandbox id.
        id: String,
        /// Print the sandbox as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fork a sandbox: each child continues from this moment of it (processes, memory,
    /// files) with its own id; the parent runs on. Prints the children's ids.
    ///
    /// Example: kiln sandbox fork sb-1234 -n 3
    Fork {
        /// Sandbox id.
        id: String,
        /// How many children (1 to 32).
        #[arg(short = 'n', long, default_value_t = 1)]
        count: usize,
        /// The children's time to live in seconds [default: the parent's].
        #[arg(long)]
        ttl: Option<u64>,
        /// Metadata KEY=VALUE added to the parent's (repeatable).
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        /// Print the children and the fork's cost as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused sandbox.
    ///
    /// Example: kiln sandbox resume sb-1234
    Resume {
        /// Sandbox id.
        id: String,
        /// Print the sandbox as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Destroy sandboxes.
    Rm {
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Print the URL of a port of a sandbox (and, unless its ports are public, the header
    /// that opens it).
    ///
    /// Example: kiln sandbox port sb-1234 8000
    Port {
        /// Sandbox id.
        id: String,
        /// The port the guest listens on.
        port: u16,
    },
    /// Forward a port of the host to a port of a sandbox, for what is not HTTP (a database,
    /// SSH): prints the host's address and port, open to anyone who reaches it. Without a
    /// port, lists the sandbox's forwards; with --close, closes one. The daemon's operator
    /// turns forwarding on with `kiln serve --tcp-forward-ports`.
    ///
    /// Example: kiln sandbox forward sb-1234 5432
    Forward {
        /// Sandbox id.
        id: String,
        /// The port the guest listens on.
        port: Option<u16>,
        /// Close the forward of PORT instead.
        #[arg(long, requires = "port")]
        close: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a sandbox's egress policy, or change it while it runs (new connections follow
    /// the new policy at once; established ones to what it denies are cut).
    ///
    /// Example: kiln sandbox net sb-1234 --no-internet --allow-out '*.pypi.org'
    Net {
        /// Sandbox id.
        id: String,
        #[command(flatten)]
        network: client_cmd::NetworkArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Snapshot a sandbox (it stops briefly, then runs on) and print the snapshot's id.
    ///
    /// Example: kiln snapshot create sb-1234 --name before-upgrade
    Create {
        /// Sandbox id.
        sandbox: String,
        /// Its name, unique among your snapshots.
        #[arg(long)]
        name: String,
        /// Print the snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List snapshots.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a snapshot (by id or name) as JSON.
    Get {
        /// Snapshot id or name.
        id: String,
    },
    /// Delete snapshots (refused while sandboxes made from them exist).
    Rm {
        /// Snapshot ids or names.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum FsCommand {
    /// List a directory.
    Ls {
        /// Sandbox id.
        id: String,
        /// Absolute path.
        #[arg(default_value = "/")]
        path: String,
        /// Levels to descend.
        #[arg(long, default_value_t = 1)]
        depth: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a file.
    Cat {
        /// Sandbox id.
        id: String,
        /// Absolute path.
        path: String,
    },
    /// Copy a file out of a sandbox.
    Get {
        /// Sandbox id.
        id: String,
        /// Absolute path in the sandbox.
        remote: String,
        /// Local file, or a directory to copy into under the file's name.
        local: PathBuf,
    },
    /// Copy a file into a sandbox (atomically: whole or not at all).
    ///
    /// Example: kiln fs put sb-1234 ./data.csv /root/    (into /root/data.csv)
    Put {
        /// Sandbox id.
        id: String,
        /// Local file.
        local: PathBuf,
        /// Absolute path in the sandbox: the file to write, or a directory (an existing one,
        /// or any path ending in `/`) to copy into under the local file's name.
        remote: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Make an API key and print its secret (shown only once).
    Create {
        /// Tenant the key acts for.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// A label.
        #[arg(long, default_value = "")]
        name: String,
        /// The key may manage keys through the API.
        #[arg(long)]
        admin: bool,
        /// Also save the key and the daemon's URL as this user's CLI config.
        #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "http://127.0.0.1:7070")]
        save: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key.
    Revoke {
        /// Key id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// List the daemon's templates.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
    /// Send a template spec to the daemon: stored as one of your templates and built there
    /// (progress is shown; a build from nothing takes minutes).
    Create {
        /// The spec (TOML; see templates/*/template.toml; no `files` or `base.image`).
        spec: PathBuf,
        /// Print the progress events as JSON lines.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
    /// Delete one of your templates from the daemon.
    Rm {
        /// Template name.
        name: String,
        #[command(flatten)]
        client: client_cmd::ClientArgs,
    },
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
    Create(bench_create::BenchOptions),
    /// The daemon through its HTTP API (started in this process on a loopback port): create
    /// latency sequential and with concurrent clients, exec round trip, sustained creates and
    /// destroys, memory after.
    Api(bench_api::ApiBenchOptions),
    /// Stateful code execution through the API: create, first and later `run_code`, warm
    /// and cold imports (a template with the code interpreter; python by default).
    Code(bench_code::CodeBenchOptions),
    /// Time to interactive through the HTTP API: create, then the output of `echo ok`
    /// received (sequential and with concurrent clients), with a per-phase breakdown.
    Tti(bench_tti::TtiBenchOptions),
    /// What idle sandboxes cost: their VMMs' CPU time (pre-started ones included) and
    /// memory, and create and exec latency on the empty host against the full one.
    Idle(bench_idle::IdleBenchOptions),
    /// Template images: build time from nothing (into an empty cache, downloads included)
    /// and from the cache, sizes, and cold boot to the first exec (p50/p99).
    Images(bench_images::ImagesBenchOptions),
    /// What networking costs: create latency with and without it, a guest's upload, the
    /// namespace path's throughput (iperf3) and connect latency, and the egress and ingress
    /// proxies' overhead, all against a namespace this benchmark makes (never the uplink).
    Net(bench_net::NetBenchOptions),
    /// Pause to disk and resume: latency by guest size and dirtied memory, the first exec
    /// after a resume, the saved state's size.
    Pause(bench_pause::PauseBenchOptions),
    /// Fork a running sandbox into N children: the parent's stop, bytes a capture writes,
    /// time until the first and every child answers, idle children's PSS.
    Fork(bench_fork::ForkBenchOptions),
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

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

impl Commands {
    /// The daemon's URL and key as given after the command's name, for commands that talk
    /// to the daemon.
    fn client(&self) -> Option<client_cmd::ClientArgs> {
        match self {
            Commands::Sandbox { client, .. }
            | Commands::Snapshot { client, .. }
            | Commands::Exec { client, .. }
            | Commands::Code { client, .. }
            | Commands::Run { client, .. }
            | Commands::Shell { client, .. }
            | Commands::Fs { client, .. }
            | Commands::Mcp { client }
            | Commands::Check { client, .. }
            | Commands::Template {
                command:
                    TemplateCommand::Ls { client, .. }
                    | TemplateCommand::Create { client, .. }
                    | TemplateCommand::Rm { client, .. },
            } => Some(client.clone()),
            _ => None,
        }
    }
}

/// Runs a command that talks to the daemon.
async fn client_command(leading: &client_cmd::ClientArgs, command: Commands) -> anyhow::Result<u8> {
    let client = client_cmd::Client::new(&command.client().unwrap_or_default().or(leading))?;
    match command {
        Commands::Sandbox { command, .. } => match command {
            SandboxCommand::Create { create, json } => {
                client_cmd::create(&client, &create, json).await?
            }
            SandboxCommand::Ls { list } => client_cmd::list(&client, &list).await?,
            SandboxCommand::Get { id } => client_cmd::get(&client, &id).await?,
            SandboxCommand::Stats {
                id,
                watch,
                interval,
                json,
            } => client_cmd::stats(&client, &id, watch.then_some(interval), json).await?,
            SandboxCommand::Rm { ids } => client_cmd::remove(&client, &ids).await?,
            SandboxCommand::KillAll { id } => client_cmd::kill_all(&client, &id).await?,
            SandboxCommand::Fork {
                id,
                count,
                ttl,
                metadata,
                json,
            } => client_cmd::fork(&client, &id, count, ttl, &metadata, json).await?,
            SandboxCommand::Pause { id, json } => {
                client_cmd::pause_or_resume(&client, &id, "pause", json).await?
            }
            SandboxCommand::Resume { id, json } => {
                client_cmd::pause_or_resume(&client, &id, "resume", json).await?
            }
            SandboxCommand::Port { id, port } => client_cmd::port(&client, &id, port).await?,
            SandboxCommand::Forward {
                id,
                port,
                close,
                json,
            } => client_cmd::forward(&client, &id, port, close, json).await?,
            SandboxCommand::Net { id, network, json } => {
                client_cmd::net(&client, &id, &network, json).await?
            }
        },
        Commands::Exec {
            id, env, mut exec, ..
        } => {
            exec.exec_env.extend(env);
            return client_cmd::exec(&client, &id, &exec).await;
        }
        Commands::Code { id, code, .. } => return client_cmd::code(&client, &id, &code).await,
        Commands::Shell { id, command, .. } => {
            return client_cmd::shell(&client, &id, &command).await
        }
        Commands::Run { create, exec, .. } => {
            return client_cmd::run(&client, &create, &exec).await
        }
        Commands::Fs { command, .. } => match command {
            FsCommand::Ls {
                id,
                path,
                depth,
                json,
            } => client_cmd::fs_list(&client, &id, &path, depth, json).await?,
            FsCommand::Cat { id, path } => client_cmd::fs_get(&client, &id, &path, None).await?,
            FsCommand::Get { id, remote, local } => {
                client_cmd::fs_get(&client, &id, &remote, Some(&local)).await?
            }
            FsCommand::Put { id, local, remote } => {
                client_cmd::fs_put(&client, &id, &local, &remote).await?
            }
        },
        Commands::Snapshot { command, .. } => match command {
            SnapshotCommand::Create {
                sandbox,
                name,
                json,
            } => client_cmd::snapshot_create(&client, &sandbox, &name, json).await?,
            SnapshotCommand::Ls { json } => client_cmd::snapshot_list(&client, json).await?,
            SnapshotCommand::Get { id } => client_cmd::snapshot_get(&client, &id).await?,
            SnapshotCommand::Rm { ids } => client_cmd::snapshot_remove(&client, &ids).await?,
        },
        Commands::Template {
            command: TemplateCommand::Ls { json, .. },
        } => client_cmd::templates(&client, json).await?,
        Commands::Template {
            command: TemplateCommand::Create { spec, json, .. },
        } => client_cmd::template_create(&client, &spec, json).await?,
        Commands::Template {
            command: TemplateCommand::Rm { name, .. },
        } => client_cmd::template_remove(&client, &name).await?,
        Commands::Check { command, .. } => {
            let passed = match command {
                CheckCommand::Soak(options) => check_cmd::soak(&client, &options).await?,
                CheckCommand::Faults(options) => check_cmd::faults(&client, &options).await?,
                CheckCommand::Abuse(options) => check_abuse::abuse(&client, &options).await?,
                CheckCommand::Escape(options) => check_escape::escape(&options).await?,
                CheckCommand::Recovery(options) => check_recovery::recovery(&options).await?,
                CheckCommand::Fuzz(options) => check_fuzz::fuzz(&client, &options).await?,
                CheckCommand::Suite(options) => check_cmd::suite(&client, &options).await?,
            };
            return Ok(if passed { 0 } else { 1 });
        }
        // Handled by `main` itself.
        Commands::Serve(_)
        | Commands::Keys { .. }
        | Commands::Agent { .. }
        | Commands::Mcp { .. }
        | Commands::Bench { .. }
        | Commands::Template {
            command: TemplateCommand::Build { .. },
        } => anyhow::bail!("not a client command"),
    }
    Ok(0)
}

/// A number of seconds above zero and at most a day.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds <= 86_400.0 => Ok(seconds),
        _ => Err(format!("`{text}` is not a number of seconds above 0")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let leading = client_cmd::ClientArgs::from(cli.client);
    // The commands that keep state on this host (the daemon, keys in its database, template
    // artefacts, benchmark sandboxes) make it root's alone; client commands (`fs get`) keep
    // the user's umask.
    if matches!(
        cli.command,
        Commands::Serve(_)
            | Commands::Keys { .. }
            | Commands::Bench { .. }
            | Commands::Template {
                command: TemplateCommand::Build { .. }
            }
    ) {
        serve_cmd::private_umask();
    }
    let result = match cli.command {
        Commands::Serve(args) => {
            init_logging();
            match serve_cmd::serve(*args).await {
                // Sandboxes are detached or destroyed by now; a template build still running
                // on a blocking thread must not keep the process alive.
                Ok(()) => std::process::exit(0),
                Err(e) => Err(e),
            }
        }
        Commands::Keys { store, command } => match command {
            KeysCommand::Create {
                tenant,
                name,
                admin,
                save,
                json,
            } => keys_cmd::create(&store, &tenant, &name, admin, save.as_deref(), json),
            KeysCommand::Ls { json } => keys_cmd::list(&store, json),
            KeysCommand::Revoke { id } => keys_cmd::revoke(&store, &id),
        },
        Commands::Agent {
            command: AgentCommand::Selftest { agent },
        } => agent_cmd::selftest(agent).await,
        Commands::Mcp { client } => match client_cmd::Client::new(&client.or(&leading)) {
            Ok(client) => mcp_cmd::serve(client).await,
            Err(e) => Err(e),
        },
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
            command: BenchCommand::Create(options),
        } => bench_create::run(options).await,
        Commands::Bench {
            command: BenchCommand::Api(options),
        } => bench_api::run(options).await,
        Commands::Bench {
            command: BenchCommand::Code(options),
        } => bench_code::run(options).await,
        Commands::Bench {
            command: BenchCommand::Tti(options),
        } => bench_tti::run(options).await,
        Commands::Bench {
            command: BenchCommand::Idle(options),
        } => bench_idle::run(options).await,
        Commands::Bench {
            command: BenchCommand::Images(options),
        } => bench_images::run(options).await,
        Commands::Bench {
            command: BenchCommand::Net(options),
        } => bench_net::run(options).await,
        Commands::Bench {
            command: BenchCommand::Pause(options),
        } => bench_pause::run(options).await,
        Commands::Bench {
            command: BenchCommand::Fork(options),
        } => bench_fork::run(options).await,
        Commands::Bench {
            command:
                BenchCommand::Agent {
                    agent,
                    iterations,
                    file_mib,
                    json,
                },
        } => agent_cmd::bench(agent, iterations, file_mib, json).await,
        // Everything else talks to the daemon.
        command => {
            return match client_command(&leading, command).await {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn daemon_options_are_on_the_commands_that_use_them() {
        let mut cli = <Cli as clap::CommandFactory>::command();
        cli.build();
        let has_url = |path: &[&str]| {
            let mut command = &cli;
            for name in path {
                command = command.find_subcommand(name).expect("subcommand");
            }
            command.get_arguments().any(|a| a.get_id() == "url")
        };
        for path in [
            &["serve"][..],
            &["keys", "ls"],
            &["bench", "create"],
            &["agent", "selftest"],
        ] {
            assert!(!has_url(path), "{path:?} lists --url");
        }
        for path in [
            &["sandbox", "ls"][..],
            &["run"],
            &["exec"],
            &["mcp"],
            &["template", "ls"],
            &["check", "soak"],
            &["check", "faults"],
            &["sandbox", "forward"],
        ] {
            assert!(has_url(path), "{path:?} lacks --url");
        }
        // After the command's name, or before it as always; the later one wins.
        let url = |args: &[&str]| {
            let parsed = Cli::try_parse_from(args).expect("parses");
            let leading = client_cmd::ClientArgs::from(parsed.client);
            parsed.command.client().unwrap_or_default().or(&leading).url
        };
        assert_eq!(
            url(&["kiln", "--url", "http://a", "sandbox", "ls"]).as_deref(),
            Some("http://a"),
            "before the command"
        );
        assert_eq!(
            url(&["kiln", "--url", "http://a", "sandbox", "ls", "--url", "http://b"]).as_deref(),
            Some("http://b"),
            "after the command"
        );
        assert!(Cli::try_parse_from(["kiln", "serve", "--url", "http://a"]).is_err());
    }

    #[test]
    fn the_tti_and_idle_benchmarks_take_their_options() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).expect("parses").command;
        let Commands::Bench {
            command: BenchCommand::Tti(tti),
        } = parse(&[
            "kiln",
            "bench",
            "tti",
            "--iterations",
            "3",
            "--clients",
            "0",
            "--no-network",
            "--json",
        ])
        else {
            panic!("not bench tti");
        };
        assert_eq!((tti.iterations, tti.clients, tti.rounds), (3, 0, 3));
        assert!(tti.no_network && tti.daemon.json);
        assert_eq!(tti.template, kiln_image::template::DEFAULT_TEMPLATE);
        let Commands::Bench {
            command: BenchCommand::Idle(idle),
        } = parse(&[
            "kiln",
            "bench",
            "idle",
            "--sandboxes",
            "200",
            "--measure-secs",
            "60",
        ])
        else {
            panic!("not bench idle");
        };
        assert_eq!(
            (idle.sandboxes, idle.measure_secs, idle.settle_secs),
            (200, 60, 20)
        );
        assert_eq!(idle.template, "base");
        assert!(!idle.engine.json);
    }
}
