//! `kiln serve`: the daemon. Settings come from flags, `KILN_*` environment variables and a
//! TOML config file, in that order of precedence; all are checked before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_api::linger::{ClientAddr, LingeringListener};
use kiln_control::{Control, ControlConfig};
use kiln_engine::EngineConfig;
use kiln_vmm::accel::AccelChoice;

/// Default config file, read when it exists.
pub const DEFAULT_CONFIG: &str = "/etc/kiln/config.toml";

/// Flags of `kiln serve` (each also settable in the config file under the same name, with
/// `-` written `_`).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Config file (TOML).
    #[arg(long, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long, env = "KILN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Also serve `GET /metrics` here, without a key, for a Prometheus on a network of the
    /// operator's (on --listen it needs an admin key) [default: not served apart].
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// State: database, baked templates, sandboxes [default: /var/lib/kiln].
    #[arg(long, env = "KILN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Image artefact cache [default: /var/cache/kiln].
    #[arg(long, env = "KILN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Directory of template specs (`<name>/template.toml`); repeatable [default:
    /// $KILN_TEMPLATES_DIR, ./templates, /usr/share/kiln/templates].
    #[arg(long)]
    pub templates_dir: Vec<PathBuf>,
    /// The static guest agent [default: $KILN_AGENT_BIN or this checkout's build].
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Accelerator: auto, kvm or tcg [default: auto].
    #[arg(long, env = "KILN_ACCEL")]
    pub accel: Option<AccelChoice>,
    /// Template of creates that name none [default: python].
    #[arg(long)]
    pub default_template: Option<String>,
    /// Time to live of creates that give none, in seconds [default: 1800].
    #[arg(long)]
    pub default_ttl_secs: Option<u64>,
    /// Longest time to live, in seconds [default: 86400].
    #[arg(long)]
    pub max_ttl_secs: Option<u64>,
    /// How long a paused sandbox is kept before it is destroyed, in seconds
    /// [default: 604800, a week].
    #[arg(long)]
    pub paused_retention_secs: Option<u64>,
    /// Most live (running or paused) sandboxes one tenant may have; a create or fork past it
    /// is refused with 429 `quota_exceeded`; 0: no limit [default: 100].
    #[arg(long)]
    pub max_sandboxes_per_tenant: Option<usize>,
    /// Most CPU quota, in cores, one tenant's live sandboxes may hold together (each holds
    /// its `cpus`, its template's vCPUs by default); past it, 429 `quota_exceeded`; 0: no
    /// limit [default: no limit].
    #[arg(long)]
    pub max_cpus_per_tenant: Option<f64>,
    /// Most memory, in MiB, one tenant's live sandboxes may hold together (each holds its
    /// VMM's limit: `memory_mib`, its template's memory plus the VMM's own by default); 0: no
    /// limit [default: no limit].
    #[arg(long)]
    pub max_memory_mib_per_tenant: Option<u64>,
    /// Most root disk, in MiB, one tenant's live sandboxes may hold together (each holds its
    /// disk's size); 0: no limit [default: no limit].
    #[arg(long)]
    pub max_disk_mib_per_tenant: Option<u64>,
    /// Most templates of its own one tenant may have; 0: no limit [default: 50].
    #[arg(long)]
    pub max_templates_per_tenant: Option<usize>,
    /// Most vCPUs a tenant's template may ask for [default: 8].
    #[arg(long)]
    pub max_template_vcpus: Option<u32>,
    /// Most guest memory, in MiB, a tenant's template may ask for [default: 16384].
    #[arg(long)]
    pub max_template_memory_mib: Option<u32>,
    /// Most root disk, in MiB, a tenant's template may ask for [default: 65536].
    #[arg(long)]
    pub max_template_disk_mib: Option<u32>,
    /// Longest build of a tenant's template (its package installation), in seconds; a build
    /// past it is stopped and refused with 429 `quota_exceeded` [default: 1800].
    #[arg(long)]
    pub max_template_build_secs: Option<u64>,
    /// VMMs kept pre-started per template, 0 to 2 [default: 1].
    #[arg(long)]
    pub prestart: Option<usize>,
    /// Whether pre-started VMMs restore their template and run its guest ahead of a create
    /// (`true`: the create and the sandbox's first command are faster, each waiting guest
    /// costs a little idle CPU and memory) or wait for the create to do so [default: true].
    #[arg(long, value_name = "BOOL")]
    pub warm_prestart: Option<bool>,
    /// Largest file upload in bytes [default: 4 GiB].
    #[arg(long)]
    pub max_upload_bytes: Option<u64>,
    /// Free space, in MiB, always left on the data directory's filesystem: creates, forks,
    /// pauses and snapshots that would take it are refused with 507 `insufficient_storage`,
    /// and running sandboxes' disks stop growing before it (their guests get write errors;
    /// their VMs run on) [default: 2% of the filesystem, at least 1 GiB].
    #[arg(long)]
    pub disk_reserve_mib: Option<u64>,
    /// Most disk space, in MiB, all sandboxes may hold on the host (their disks, pause
    /// images, fork captures and snapshots, as allocated), enforced like the reserve
    /// [default: no budget beyond the reserve].
    #[arg(long)]
    pub disk_budget_mib: Option<u64>,
    /// Seconds the daemon waits for a sandbox's agent to answer a call (an exec's start, a
    /// file's stat, a health check) before the call fails with 503; output and transfers
    /// wait on progress instead, and end within it if the agent stops answering pings.
    /// Raise it on a slow host [default: 30].
    #[arg(long)]
    pub agent_call_timeout_secs: Option<u64>,
    /// Sandbox networking: `on` (each sandbox gets a link to the host, NAT egress with a
    /// policy, DNS) or `off` (a namespace and a tap, no way out) [default: on].
    #[arg(long, env = "KILN_NETWORK", value_parser = ["on", "off"])]
    pub network: Option<String>,
    /// Addresses for sandbox links, two per sandbox (a /16 holds 32,767) [default:
    /// 10.251.0.0/16]. Must not overlap the host's routes.
    #[arg(long, env = "KILN_NETWORK_POOL")]
    pub network_pool: Option<ipnet::Ipv4Net>,
    /// Prefix of the names this daemon makes: network namespaces, host interfaces, the
    /// nftables table; at most 9 characters [default: kiln-]. Two daemons on one host need
    /// different prefixes, pools and route tables.
    #[arg(long, env = "KILN_NAME_PREFIX")]
    pub name_prefix: Option<String>,
    /// The interface sandbox traffic leaves by [default: the host's default route's].
    #[arg(long, env = "KILN_EGRESS_INTERFACE")]
    pub egress_interface: Option<String>,
    /// The next hop on --egress-interface [default: directly on the link].
    #[arg(long, env = "KILN_EGRESS_GATEWAY")]
    pub egress_gateway: Option<std::net::Ipv4Addr>,
    /// Routing table (and rule priorities N and N+1) for sandbox traffic [default: 7251].
    #[arg(long)]
    pub route_table: Option<u32>,
    /// Whether sandboxes created without a network policy reach the internet [default: true].
    #[arg(long)]
    pub default_internet: Option<bool>,
    /// Let sandbox policies open RFC 1918 and 100.64.0.0/10 (the operator's LAN); without
    /// it they are always denied.
    #[arg(long)]
    pub allow_private_egress: bool,
    /// A range no sandbox may reach, beyond the built-in ones; repeatable.
    #[arg(long)]
    pub deny_egress: Vec<ipnet::Ipv4Net>,
    /// A resolver (IP:PORT) the sandboxes' resolver forwards to; repeatable [default: the
    /// host's, from /etc/resolv.conf].
    #[arg(long)]
    pub dns_upstream: Vec<SocketAddr>,
    /// The domain sandbox ports are served under: `http://<port>-<sandbox>.<domain>/`
    /// [default: localhost, which browsers resolve to loopback; in production a wildcard DNS
    /// name with TLS in front].
    #[arg(long, env = "KILN_INGRESS_DOMAIN")]
    pub ingress_domain: Option<String>,
    /// The port those URLs name, when a front end serves them on another one than --listen's
    /// [default: the listen port].
    #[arg(long)]
    pub ingress_port: Option<u16>,
    /// Host ports for plain TCP forwards to sandbox ports (`30000-30999`): a sandbox's owner
    /// opens one with `POST /v1/sandboxes/{id}/forwards` (`kiln sandbox forward`), and it is
    /// open to anyone who reaches the forwarding address [default: off].
    #[arg(long, value_name = "FIRST-LAST")]
    pub tcp_forward_ports: Option<String>,
    /// The address TCP forwards listen on [default: --listen's address].
    #[arg(long)]
    pub tcp_forward_address: Option<std::net::IpAddr>,
    /// A browser origin allowed to call the MCP endpoint `/mcp`, with scheme and port
    /// (`https://app.example.com:443`; repeat for more). Requests carrying any other
    /// `Origin` are refused; MCP clients that are not browsers send none [default: none].
    #[arg(long = "mcp-allowed-origin")]
    pub mcp_allowed_origins: Vec<String>,
}

/// The config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    templates_dirs: Option<Vec<PathBuf>>,
    agent: Option<PathBuf>,
    accel: Option<String>,
    default_template: Option<String>,
    default_ttl_secs: Option<u64>,
    max_ttl_secs: Option<u64>,
    paused_retention_secs: Option<u64>,
    max_sandboxes_per_tenant: Option<usize>,
    max_cpus_per_tenant: Option<f64>,
    max_memory_mib_per_tenant: Option<u64>,
    max_disk_mib_per_tenant: Option<u64>,
    max_templates_per_tenant: Option<usize>,
    max_template_vcpus: Option<u32>,
    max_template_memory_mib: Option<u32>,
    max_template_disk_mib: Option<u32>,
    max_template_build_secs: Option<u64>,
    prestart: Option<usize>,
    warm_prestart: Option<bool>,
    max_upload_bytes: Option<u64>,
    disk_reserve_mib: Option<u64>,
    disk_budget_mib: Option<u64>,
    agent_call_timeout_secs: Option<u64>,
    network: Option<String>,
    network_pool: Option<ipnet::Ipv4Net>,
    name_prefix: Option<String>,
    egress_interface: Option<String>,
    egress_gateway: Option<std::net::Ipv4Addr>,
    route_table: Option<u32>,
    default_internet: Option<bool>,
    allow_private_egress: Option<bool>,
    deny_egress: Option<Vec<ipnet::Ipv4Net>>,
    dns_upstreams: Option<Vec<SocketAddr>>,
    ingress_domain: Option<String>,
    ingress_port: Option<u16>,
    mcp_allowed_origins: Option<Vec<String>>,
    tcp_forward_ports: Option<String>,
    tcp_forward_address: Option<std::net::IpAddr>,
}

/// Everything `kiln serve` runs with, checked.
#[derive(Debug)]
pub struct Settings {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where to serve `/metrics` alone, without a key.
    pub metrics_listen: Option<SocketAddr>,
    /// The control plane's configuration.
    pub control: ControlConfig,
    /// The API's.
    pub api: kiln_api::ApiConfig,
}

fn read_file_config(path: &Path, required: bool) -> Result<FileConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml_config(&text).with_context(|| format!("config file {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(e).with_context(|| format!("reading config file {}", path.display())),
    }
}

fn toml_config(text: &str) -> Result<FileConfig> {
    toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))
}

/// Resolves and checks the settings.
pub fn settings(args: ServeArgs) -> Result<Settings> {
    let file = match &args.config {
        Some(path) => read_file_config(path, true)?,
        None => read_file_config(Path::new(DEFAULT_CONFIG), false)?,
    };
    let accel = match (args.accel, file.accel) {
        (Some(accel), _) => accel,
        (None, Some(text)) => text
            .parse()
            .map_err(|e: String| anyhow::anyhow!("config `accel`: {e}"))?,
        (None, None) => AccelChoice::Auto,
    };
    let templates_dirs = if !args.templates_dir.is_empty() {
        args.templates_dir
    } else if let Some(dirs) = file.templates_dirs {
        dirs
    } else {
        crate::template_cmd::templates_dirs()
    };
    let agent = match args.agent.or(file.agent) {
        Some(agent) => agent,
        None => crate::template_cmd::static_agent()?,
    };
    if !agent.is_file() {
        bail!("setting `agent`: {} is not a file", agent.display());
    }
    let default_template = args
        .default_template
        .or(file.default_template)
        .unwrap_or_else(|| kiln_image::template::DEFAULT_TEMPLATE.to_owned());
    if !kiln_control::templates::valid_name(&default_template) {
        bail!("setting `default_template`: `{default_template}` is not a template name");
    }
    let default_ttl = args
        .default_ttl_secs
        .or(file.default_ttl_secs)
        .unwrap_or(1800);
    let max_ttl = args
        .max_ttl_secs
        .or(file.max_ttl_secs)
        .unwrap_or(kiln_control::DEFAULT_MAX_TTL.as_secs());
    if default_ttl == 0 || default_ttl > max_ttl {
        bail!("setting `default_ttl_secs`: must be between 1 and max_ttl_secs ({max_ttl})");
    }
    let paused_retention = args
        .paused_retention_secs
        .or(file.paused_retention_secs)
        .unwrap_or(7 * 86_400);
    if paused_retention == 0 {
        bail!("setting `paused_retention_secs`: must be at least 1");
    }
    let prestart = args.prestart.or(file.prestart).unwrap_or(1);
    if prestart > kiln_engine::MAX_PRESTART {
        bail!(
            "setting `prestart`: at most {} (got {prestart})",
            kiln_engine::MAX_PRESTART
        );
    }
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("/var/lib/kiln"));
    let network = match args.network.or(file.network).as_deref() {
        None | Some("on") => {
            let defaults = kiln_network::NetworkConfig::new();
            Some(kiln_network::NetworkConfig {
                pool: args
                    .network_pool
                    .or(file.network_pool)
                    .unwrap_or(defaults.pool),
                prefix: args
                    .name_prefix
                    .or(file.name_prefix)
                    .unwrap_or(defaults.prefix),
                egress_interface: args.egress_interface.or(file.egress_interface),
                egress_gateway: args.egress_gateway.or(file.egress_gateway),
                route_table: args
                    .route_table
                    .or(file.route_table)
                    .unwrap_or(defaults.route_table),
                default_internet: args
                    .default_internet
                    .or(file.default_internet)
                    .unwrap_or(defaults.default_internet),
                allow_private: args.allow_private_egress
                    || file.allow_private_egress.unwrap_or(false),
                denied: if args.deny_egress.is_empty() {
                    file.deny_egress.unwrap_or_default()
                } else {
                    args.deny_egress
                },
                dns_upstreams: if args.dns_upstream.is_empty() {
                    file.dns_upstreams.unwrap_or_default()
                } else {
                    args.dns_upstream
                },
            })
        }
        Some("off") => None,
        Some(other) => bail!("setting `network`: `{other}` is neither `on` nor `off`"),
    };
    let disk_budget = args.disk_budget_mib.or(file.disk_budget_mib);
    if disk_budget == Some(0) {
        bail!("setting `disk_budget_mib`: must be at least 1 (leave it out for no budget)");
    }
    let agent_call_timeout = args
        .agent_call_timeout_secs
        .or(file.agent_call_timeout_secs)
        .map_or(kiln_engine::DEFAULT_AGENT_CALL_TIMEOUT, Duration::from_secs);
    if agent_call_timeout.is_zero() {
        bail!("setting `agent_call_timeout_secs`: must be at least 1");
    }
    let engine = EngineConfig {
        accel,
        agent_call_timeout,
        guest_log: std::env::var("KILN_GUEST_LOG").ok(),
        prestart,
        warm_prestart: args.warm_prestart.or(file.warm_prestart).unwrap_or(true),
        network,
        disk: kiln_engine::DiskLimits {
            budget: disk_budget.map(|mib| mib.saturating_mul(1 << 20)),
            reserve: args
                .disk_reserve_mib
                .or(file.disk_reserve_mib)
                .map(|mib| mib.saturating_mul(1 << 20)),
        },
        ..EngineConfig::new(&data_dir)
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070)));
    let ingress_domain = args
        .ingress_domain
        .or(file.ingress_domain)
        .unwrap_or_else(|| "localhost".into())
        .to_ascii_lowercase();
    let domain_ok = !ingress_domain.is_empty()
        && ingress_domain
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !domain_ok {
        bail!("setting `ingress_domain`: `{ingress_domain}` is not a domain name");
    }
    let ingress_port = args
        .ingress_port
        .or(file.ingress_port)
        .or(Some(listen.port()));
    let mcp_allowed_origins = if args.mcp_allowed_origins.is_empty() {
        file.mcp_allowed_origins.unwrap_or_default()
    } else {
        args.mcp_allowed_origins
    };
    if let Some(origin) = mcp_allowed_origins
        .iter()
        .find(|o| !(o.starts_with("http://") || o.starts_with("https://")))
    {
        bail!("setting `mcp_allowed_origins`: `{origin}` is not an origin like https://app.example.com:443");
    }
    // 0 (or unset where the default is none) is no limit.
    let cpus = args.max_cpus_per_tenant.or(file.max_cpus_per_tenant);
    if cpus.is_some_and(|cpus| !cpus.is_finite() || cpus < 0.0) {
        bail!("setting `max_cpus_per_tenant`: give a number of cores, or 0 for no limit");
    }
    let quotas = kiln_control::TenantQuotas {
        sandboxes: Some(
            args.max_sandboxes_per_tenant
                .or(file.max_sandboxes_per_tenant)
                .unwrap_or(100),
        )
        .filter(|max| *max > 0),
        cpus: cpus.filter(|max| *max > 0.0),
        memory_mib: args
            .max_memory_mib_per_tenant
            .or(file.max_memory_mib_per_tenant)
            .filter(|max| *max > 0),
        disk_mib: args
            .max_disk_mib_per_tenant
            .or(file.max_disk_mib_per_tenant)
            .filter(|max| *max > 0),
        templates: Some(
            args.max_templates_per_tenant
                .or(file.max_templates_per_tenant)
                .unwrap_or(50),
        )
        .filter(|max| *max > 0),
    };
    let caps = kiln_control::SpecCaps::default();
    let spec_caps = kiln_control::SpecCaps {
        vcpus: args
            .max_template_vcpus
            .or(file.max_template_vcpus)
            .unwrap_or(caps.vcpus),
        memory_mib: args
            .max_template_memory_mib
            .or(file.max_template_memory_mib)
            .unwrap_or(caps.memory_mib),
        disk_mib: args
            .max_template_disk_mib
            .or(file.max_template_disk_mib)
            .unwrap_or(caps.disk_mib),
        build_time: args
            .max_template_build_secs
            .or(file.max_template_build_secs)
            .map_or(caps.build_time, Duration::from_secs),
    };
    if spec_caps.build_time.is_zero() {
        bail!("setting `max_template_build_secs`: give at least 1 s");
    }
    let forwards = match args.tcp_forward_ports.or(file.tcp_forward_ports) {
        None => None,
        Some(range) => Some(kiln_control::ForwardConfig {
            address: args
                .tcp_forward_address
                .or(file.tcp_forward_address)
                .unwrap_or(listen.ip()),
            ports: port_range(&range).with_context(|| {
                format!("setting `tcp_forward_ports`: `{range}` is not a range of ports like 30000-30999")
            })?,
        }),
    };
    let metrics_listen = args.metrics_listen.or(file.metrics_listen);
    if metrics_listen == Some(listen) {
        bail!("setting `metrics_listen`: {listen} is the API's own address (leave it out to scrape /metrics there with an admin key)");
    }
    Ok(Settings {
        listen,
        metrics_listen,
        control: ControlConfig {
            cache_dir: args
                .cache_dir
                .or(file.cache_dir)
                .unwrap_or_else(|| PathBuf::from(kiln_image::cache::DEFAULT_CACHE_DIR)),
            templates_dirs,
            agent_binary: agent,
            engine,
            default_template,
            default_ttl: Duration::from_secs(default_ttl),
            max_ttl: Duration::from_secs(max_ttl),
            paused_retention: Duration::from_secs(paused_retention),
            quotas,
            spec_caps,
            forwards,
        },
        api: kiln_api::ApiConfig {
            max_upload_bytes: args
                .max_upload_bytes
                .or(file.max_upload_bytes)
                .unwrap_or(4 << 30),
            ingress_domain,
            ingress_port: ingress_port.filter(|p| *p != 80),
            mcp_allowed_origins,
        },
    })
}

/// Raises this process's soft limit of open descriptors to its hard limit: the daemon holds
/// several per sandbox (sockets, the tap, pidfds) and two per forwarded connection.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "raising the limit of open files");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "reading the limit of open files"),
    }
}

/// `FIRST-LAST` (or one port) as a range of non-zero ports.
fn port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let (first, last): (u16, u16) = (first.trim().parse()?, last.trim().parse()?);
    if first == 0 || last < first {
        bail!("the first port is 1 or more and the last not below it");
    }
    Ok(first..=last)
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<()> {
    let settings = settings(args)?;
    raise_open_files_limit();
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let control = Control::open(settings.control)
        .await
        .context("starting the control plane")?;
    tracing::info!(
        listen = %settings.listen,
        accel = control.engine().accel().accel.qemu_name(),
        disks = control.engine().disk_strategy(),
        cgroups = control.engine().cgroup_version().unwrap_or("off"),
        "kiln is serving"
    );
    let routers = kiln_api::routers(control.clone(), settings.api);
    let app = routers.api;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(None);
    let signalled = control.clone();
    let signals = tokio::spawn(async move {
        let stop = shutdown_signal().await;
        signalled.begin_shutdown();
        let _ = stop_tx.send(Some(stop));
    });
    if let Some(addr) = settings.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr} for metrics"))?;
        tracing::info!(listen = %addr, "serving /metrics without a key");
        let mut stopped = stop_rx.clone();
        tokio::spawn(async move {
            let served = axum::serve(LingeringListener::new(listener), routers.metrics)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(Option::is_some).await;
                });
            if let Err(e) = served.await {
                tracing::error!(error = %e, "serving metrics failed");
            }
        });
    }
    let mut stopped = stop_rx.clone();
    // The clients' addresses reach handlers (ingress passes them on as X-Forwarded-For).
    let app = app.into_make_service_with_connect_info::<ClientAddr>();
    // Connections close with a linger: a client still sending a body refused early reads
    // the refusal rather than a reset.
    let listener = LingeringListener::new(listener);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stopped.wait_for(Option::is_some).await;
    });
    // Requests in flight get a grace period; long streams (a command's output, an
    // interactive session) do not hold the stop up beyond it.
    let mut stopped = stop_rx.clone();
    let grace = async move {
        let _ = stopped.wait_for(Option::is_some).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server => served.context("serving")?,
        () = grace => tracing::warn!("connections still open after the grace period: closing them"),
    }
    signals.abort();
    let stop = stop_rx.borrow().unwrap_or(Stop::Detach);
    match stop {
        Stop::Detach => {
            tracing::info!("SIGTERM: stopping; sandboxes keep running for the next start");
            control.detach().await;
        }
        Stop::Destroy => {
            tracing::info!("SIGINT: stopping and destroying every sandbox");
            control.shutdown().await;
        }
    }
    Ok(())
}

/// How long requests in flight may take once a stop signal arrived.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How the daemon stops.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// SIGTERM (`systemctl stop`, upgrades): sandboxes keep running and are re-adopted.
    Detach,
    /// SIGINT (Ctrl-C, `scripts/down.sh`): sandboxes are destroyed.
    Destroy,
}

async fn shutdown_signal() -> Stop {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot watch for SIGTERM/SIGINT");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => Stop::Detach,
        _ = int.recv() => Stop::Destroy,
    }
}

/// Sets this process's umask to 077: new files and directories are readable by their owner
/// alone.
pub fn private_umask() {
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_malformed_settings_are_named() {
        let unknown = toml_config("listne = \"127.0.0.1:1\"").expect_err("unknown key");
        assert!(unknown.to_string().contains("listne"), "{unknown}");
        let bad = toml_config("listen = \"not an address\"").expect_err("bad address");
        assert!(bad.to_string().contains("listen"), "{bad}");
        let good = toml_config("listen = \"127.0.0.1:9000\"\nprestart = 2\n").expect("valid");
        assert_eq!(good.prestart, Some(2));
    }

    #[test]
    fn forwarding_ranges_are_checked() {
        assert_eq!(port_range("30000-30999").expect("range"), 30000..=30999);
        assert_eq!(port_range("2222").expect("one port"), 2222..=2222);
        for bad in ["0-10", "10-5", "a-b", "1-70000", ""] {
            assert!(port_range(bad).is_err(), "{bad}");
        }
    }
}
