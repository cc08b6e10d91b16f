//! `kiln-agent`: the guest agent binary. As PID 1 it is the guest's init (and, from an
//! initramfs, switches to the root disk first); elsewhere it serves on the address given.

use std::process::ExitCode;

use clap::Parser;
use kiln_agent::duties::{self, Duties, Duty};
use kiln_agent::transport::{find_serial_port, ListenAddr};
use kiln_agent::{Agent, AgentConfig};

/// kiln's guest agent: exec, files and health for the host over one byte stream.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Where to serve: `unix:PATH` or `serial:DEVICE`. As PID 1 the default is the
    /// virtio-serial port named by `--port-name`.
    #[arg(long)]
    listen: Option<ListenAddr>,

    /// Name of the virtio-serial port to serve on when no `--listen` is given.
    #[arg(long, default_value = "kiln.agent")]
    port_name: String,

    /// Disable every init duty (mounts, modules, hostname, network, DNS, clock, RNG,
    /// power-off): for running on a host, in tests and development.
    #[arg(long)]
    no_init: bool,

    /// With `--no-init`, re-enable one duty. Only safe for `hostname` and `network` inside
    /// fresh UTS and network namespaces, and for `dns` with private files bind-mounted over
    /// /etc/resolv.conf and /etc/hosts in a private mount namespace.
    #[arg(long, value_enum, requires = "no_init")]
    enable_duty: Vec<Duty>,

    /// Log filter (tracing's env-filter syntax).
    #[arg(long, env = "KILN_AGENT_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    // As PID 1 the kernel passes unknown command-line words to init as arguments; an agent
    // that exited over them would panic the kernel, so it runs with its defaults instead.
    let args = if std::process::id() == 1 {
        Args::try_parse().unwrap_or_else(|e| {
            // Not eprintln!: it panics when the console cannot be written, and init must not.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "kiln-agent: ignoring arguments: {e}");
            Args::parse_from(["kiln-agent"])
        })
    } else {
        Args::parse()
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        // A log line the console cannot take is dropped: reporting it with eprintln! would
        // panic, and as init the agent's panic takes the guest down.
        .log_internal_errors(false)
        .init();
    let duties = if args.no_init {
        Duties::only(&args.enable_duty)
    } else {
        Duties::all()
    };
    if duties.has(Duty::Mounts) {
        duties::mount_pseudo_filesystems();
    }
    if duties.has(Duty::Modules) {
        if let Err(e) = duties::switch_root_if_needed() {
            tracing::error!(error = %e, "cannot switch to the root disk");
        }
        if duties.has(Duty::Mounts) {
            duties::mount_pseudo_filesystems();
        }
        // Kernel-wide settings: only as the guest's init, never for an agent on a host.
        if std::process::id() == 1 {
            duties::quiet_idle();
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let listen = match args.listen {
            Some(listen) => listen,
            None => ListenAddr::Serial(find_serial_port(&args.port_name)?),
        };
        let agent = Agent::new(AgentConfig { listen, duties })?;
        agent.run().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent stopped");
            // As PID 1, exiting panics the kernel; park instead so the console keeps the log.
            if std::process::id() == 1 {
                loop {
                    std::thread::park();
                }
            }
            ExitCode::FAILURE
        }
    }
}
