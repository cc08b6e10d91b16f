//! Commands that talk to a kiln daemon over its HTTP API: sandboxes, exec, run, files,
//! templates.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use kiln_api::types::{
    BuildTemplateBody, CommandBody, CreateSandboxBody, ErrorBody, ExecBody, ExecEventBody,
    FileListBody, InteractiveInputBody, InteractiveStartBody, KillAllBody, NetworkBody,
    SandboxBody, SandboxList, SandboxMetricsBody, TemplateList, TerminalSize, UpdateSandboxBody,
    WrittenBody,
};
use reqwest::Method;
use serde::de::DeserializeOwned;

/// Where the daemon is and how to authenticate: the options of every command that talks to
/// the daemon (and of its subcommands). The environment is read in [`Client::new`], after
/// both places a flag may be given (`kiln --url U sandbox ls`, `kiln sandbox ls --url U`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// The daemon's URL [env: KILN_URL; default: the CLI config file's, else
    /// http://127.0.0.1:7070].
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// API key [env: KILN_API_KEY; default: the CLI config file's].
    #[arg(long, global = true)]
    pub api_key: Option<String>,
}

impl ClientArgs {
    /// These flags, each falling back to `outer`'s (given before the command's name).
    pub fn or(&self, outer: &ClientArgs) -> ClientArgs {
        ClientArgs {
            url: self.url.clone().or_else(|| outer.url.clone()),
            api_key: self.api_key.clone().or_else(|| outer.api_key.clone()),
        }
    }
}

/// The CLI's own config file (`kiln keys create --save` writes it).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    /// The daemon's URL.
    pub url: Option<String>,
    /// API key.
    pub api_key: Option<String>,
}

/// `$XDG_CONFIG_HOME/kiln/cli.toml` or `~/.config/kiln/cli.toml`.
pub fn cli_config_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .map(|dir| dir.join("kiln").join("cli.toml"))
}

fn read_cli_config() -> Result<CliConfig> {
    let Some(path) = cli_config_path() else {
        return Ok(CliConfig::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CliConfig::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// An API client.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    url: String,
    key: Option<String>,
}

impl Client {
    /// From flags, then `KILN_URL` / `KILN_API_KEY`, then the CLI config file.
    pub fn new(args: &ClientArgs) -> Result<Client> {
        let file = read_cli_config()?;
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let url = args
            .url
            .clone()
            .or_else(|| env("KILN_URL"))
            .or(file.url)
            .unwrap_or_else(|| "http://127.0.0.1:7070".into());
        Ok(Client {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
            key: args
                .api_key
                .clone()
                .or_else(|| env("KILN_API_KEY"))
                .or(file.api_key),
        })
    }

    /// A client of the daemon at `url` acting with API key `key`.
    pub fn with_key(url: &str, key: String) -> Client {
        Client {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
            key: Some(key),
        }
    }

    /// The daemon's URL.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The API key it sends.
    pub(crate) fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Whether it has an API key to send.
    pub(crate) fn has_key(&self) -> bool {
        self.key.is_some()
    }

    pub(crate) fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.url));
        match &self.key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    pub(crate) async fn send(&self, builder: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = builder.send().await.with_context(|| {
            format!(
                "cannot reach the kiln daemon at {} (start it with `kiln serve`, or set --url / KILN_URL)",
                self.url
            )
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(error) if error.code == "unauthenticated" => bail!(
                "{} (set KILN_API_KEY or --api-key; `kiln keys create --save` makes and stores one)",
                error.message
            ),
            // A failure of the daemon's own: its log has the details, under the request id.
            Ok(ErrorBody {
                message,
                code,
                request_id: Some(id),
            }) if status.is_server_error() => bail!(
                "{message} ({code}, HTTP {}; the daemon's log has more under request {id})",
                status.as_u16()
            ),
            Ok(error) => Err(ApiFailure {
                status: status.as_u16(),
                code: error.code,
                message: error.message,
            }
            .into()),
            Err(_) => bail!("HTTP {status}: {}", text.trim()),
        }
    }

    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<T> {
        let response = self.send(builder).await?;
        response.json().await.context("malformed response")
    }
}

fn parse_pairs(pairs: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("{what} `{pair}` is not KEY=VALUE"))
        })
        .collect()
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn when(ms: Option<i64>) -> String {
    let Some(ms) = ms else { return "never".into() };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let secs = (ms - now) / 1000;
    if secs <= 0 {
        "now".into()
    } else if secs < 120 {
        format!("in {secs}s")
    } else {
        format!("in {}m", secs / 60)
    }
}

/// Options of `kiln sandbox create` and `kiln run`.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// Template [default: the daemon's, `python`].
    #[arg(long, short)]
    pub template: Option<String>,
    /// Time to live in seconds [default: the daemon's].
    #[arg(long)]
    pub ttl: Option<u64>,
    /// Metadata KEY=VALUE (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// Environment KEY=VALUE for every command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// CPU quota in cores.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory limit of the VM process in MiB.
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Root disk size in MiB.
    #[arg(long)]
    pub disk_mib: Option<u64>,
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Its ports are reachable by URL without its access token.
    #[arg(long)]
    pub public_ports: bool,
    /// While paused, calls that need it running (exec, files, ports) get an error instead
    /// of resuming it.
    #[arg(long)]
    pub no_auto_resume: bool,
    /// What its time to live running out does: `destroy` it, or `pause` it (kept for the
    /// daemon's paused retention).
    #[arg(long, value_parser = ["destroy", "pause"])]
    pub on_expiry: Option<String>,
    /// Create from this snapshot (id or name) instead of a template.
    #[arg(long, conflicts_with = "template")]
    pub snapshot: Option<String>,
}

/// Egress policy options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NetworkArgs {
    /// No internet: only what --allow-out names is reachable.
    #[arg(long, conflicts_with = "internet")]
    pub no_internet: bool,
    /// Internet on (the daemon's usual default).
    #[arg(long)]
    pub internet: bool,
    /// Reachable even without internet: an IPv4 address, a CIDR, a name (example.com) or
    /// every name below one (*.example.com). Repeatable.
    #[arg(long = "allow-out", value_name = "DEST")]
    pub allow_out: Vec<String>,
    /// Never reachable (wins over --allow-out): an address, a CIDR or a name. Repeatable.
    #[arg(long = "deny-out", value_name = "DEST")]
    pub deny_out: Vec<String>,
    /// Most bandwidth each way, in Mbit/s; 0: no limit.
    #[arg(long, value_name = "MBIT")]
    pub bandwidth_mbit: Option<u32>,
    /// Most connections open at once (new ones past it are refused); 0: no limit.
    #[arg(long, value_name = "COUNT")]
    pub max_connections: Option<u32>,
}

impl NetworkArgs {
    fn given(&self) -> bool {
        self.no_internet
            || self.internet
            || !self.allow_out.is_empty()
            || !self.deny_out.is_empty()
            || self.bandwidth_mbit.is_some()
            || self.max_connections.is_some()
    }

    /// The policy these options make of `base` (lists given replace the base's).
    fn apply_to(&self, mut base: NetworkBody) -> NetworkBody {
        if self.no_internet {
            base.internet = false;
        }
        if self.internet {
            base.internet = true;
        }
        if !self.allow_out.is_empty() {
            base.allow_out = self.allow_out.clone();
        }
        if !self.deny_out.is_empty() {
            base.deny_out = self.deny_out.clone();
        }
        if let Some(mbit) = self.bandwidth_mbit {
            base.bandwidth_mbit = (mbit > 0).then_some(mbit);
        }
        if let Some(count) = self.max_connections {
            base.max_connections = (count > 0).then_some(count);
        }
        base
    }
}

impl CreateArgs {
    fn body(&self) -> Result<CreateSandboxBody> {
        let network = self.network.given().then(|| {
            self.network.apply_to(NetworkBody {
                internet: true,
                allow_out: Vec::new(),
                deny_out: Vec::new(),
                bandwidth_mbit: None,
                max_connections: None,
            })
        });
        Ok(CreateSandboxBody {
            template: self.template.clone(),
            ttl_secs: self.ttl,
            metadata: parse_pairs(&self.metadata, "metadata")?,
            env: parse_pairs(&self.env, "env")?,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
            network,
            ports: self
                .public_ports
                .then_some(kiln_api::types::PortsOptions { public: true }),
            auto_resume: self.no_auto_resume.then_some(false),
            on_expiry: self.on_expiry.as_deref().map(|o| match o {
                "pause" => kiln_api::types::OnExpiryBody::Pause,
                _ => kiln_api::types::OnExpiryBody::Destroy,
            }),
            snapshot: self.snapshot.clone(),
        })
    }
}

/// Creates a sandbox; prints its id (or JSON).
pub async fn create(client: &Client, args: &CreateArgs, json: bool) -> Result<()> {
    let sandbox = create_sandbox(client, args).await?;
    if json {
        print_json(&sandbox)
    } else {
        println!("{}", sandbox.id);
        Ok(())
    }
}

async fn create_sandbox(client: &Client, args: &CreateArgs) -> Result<SandboxBody> {
    // A template that is not baked yet is built first, with its progress shown (the create
    // would otherwise wait silently for minutes).
    if let Some(name) = &args.template {
        let template: kiln_api::types::TemplateBody = client
            .json(client.request(Method::GET, &format!("/v1/templates/{name}")))
            .await?;
        if !template.ready {
            eprintln!("template {name} is not ready yet: building it (minutes the first time)");
            build_progress(
                client,
                BuildTemplateBody {
                    spec: None,
                    name: Some(name.clone()),
                },
                false,
            )
            .await?;
        }
    }
    client
        .json(
            client
                .request(Method::POST, "/v1/sandboxes")
                .json(&args.body()?),
        )
        .await
}

/// Which sandboxes `kiln sandbox ls` lists.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Only `running`, `paused` or `failed` ones.
    #[arg(long)]
    pub state: Option<String>,
    /// Only those with this metadata KEY=VALUE (repeatable: all must match).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// At most this many (the rest is a page away: see --cursor) [default: all].
    #[arg(long)]
    pub limit: Option<usize>,
    /// Start after this point (`next_cursor` of an earlier listing).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Print JSON (the API's shape: `sandboxes` and `next_cursor`).
    #[arg(long)]
    pub json: bool,
}

/// Lists sandboxes, page by page.
pub async fn list(client: &Client, args: &ListArgs) -> Result<()> {
    let filters: Vec<(String, String)> = parse_pairs(&args.metadata, "meta")?
        .into_iter()
        .map(|(key, value)| (format!("metadata.{key}"), value))
        .collect();
    let mut all = Vec::new();
    let mut cursor = args.cursor.clone();
    loop {
        let wanted = args.limit.map_or(500, |limit| (limit - all.len()).min(500));
        let mut query: Vec<(String, String)> = vec![("limit".into(), wanted.to_string())];
        if let Some(state) = &args.state {
            query.push(("state".into(), state.clone()));
        }
        query.extend(filters.iter().cloned());
        if let Some(cursor) = &cursor {
            query.push(("cursor".into(), cursor.clone()));
        }
        let page: SandboxList = client
            .json(client.request(Method::GET, "/v1/sandboxes").query(&query))
            .await?;
        all.extend(page.sandboxes);
        cursor = page.next_cursor;
        if cursor.is_none() || args.limit.is_some_and(|limit| all.len() >= limit) {
            break;
        }
    }
    if args.json {
        return print_json(&SandboxList {
            sandboxes: all,
            next_cursor: cursor,
        });
    }
    println!("{:<16} {:<10} {:<8} EXPIRES", "ID", "TEMPLATE", "STATE");
    for sandbox in all {
        println!(
            "{:<16} {:<10} {:<8} {}",
            sandbox.id,
            sandbox.template,
            sandbox.state,
            when(sandbox.expires_at_ms)
        );
        if let Some(reason) = sandbox.reason {
            println!("  {}", reason.lines().next().unwrap_or_default());
        }
    }
    if let Some(cursor) = cursor {
        eprintln!("[kiln: more sandboxes: --cursor {cursor}]");
    }
    Ok(())
}

/// Shows one sandbox as JSON.
pub async fn get(client: &Client, id: &str) -> Result<()> {
    let sandbox: SandboxBody = client
        .json(client.request(Method::GET, &format!("/v1/sandboxes/{id}")))
        .await?;
    print_json(&sandbox)
}

/// Shows what a sandbox uses, once or (with `watch`, every that many seconds) until
/// interrupted.
pub async fn stats(client: &Client, id: &str, watch: Option<f64>, json: bool) -> Result<()> {
    let path = format!("/v1/sandboxes/{id}/metrics");
    let mut previous: Option<SandboxMetricsBody> = None;
    loop {
        let sample: SandboxMetricsBody = client.json(client.request(Method::GET, &path)).await?;
        let text = if json {
            serde_json::to_string(&sample)? + "\n"
        } else if watch.is_some() {
            // Home and clear, as `top` does.
            format!("\x1b[H\x1b[2J{}", stats_table(&sample, previous.as_ref()))
        } else {
            stats_table(&sample, previous.as_ref())
        };
        let mut stdout = std::io::stdout().lock();
        match stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
        {
            // The reader went away (`| head`): done, not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            written => written?,
        }
        let Some(seconds) = watch else {
            return Ok(());
        };
        previous = Some(sample);
        tokio::time::sleep(std::time::Duration::from_secs_f64(seconds)).await;
    }
}

/// A sample as text; with the one before, the share of one CPU used in between.
fn stats_table(sample: &SandboxMetricsBody, previous: Option<&SandboxMetricsBody>) -> String {
    let state = serde_json::to_value(sample.state).unwrap_or_default();
    let mut out = format!("{}  {}\n", sample.sandbox_id, state.as_str().unwrap_or("?"));
    let share = match (previous, sample.cpu_seconds) {
        (Some(before), Some(now)) => before.cpu_seconds.and_then(|then| {
            let wall = (sample.measured_at_ms - before.measured_at_ms) as f64 / 1000.0;
            (wall > 0.0).then(|| format!("  ({:.1}% of one CPU)", (now - then) / wall * 100.0))
        }),
        _ => None,
    };
    use kiln_image::progress::human_bytes;
    let missing = || "-".to_owned();
    out += &format!(
        "cpu      {}{}\n",
        sample
            .cpu_seconds
            .map_or_else(missing, |s| format!("{s:.2} s")),
        share.unwrap_or_default()
    );
    let memory = match (sample.memory_bytes, sample.memory_limit_bytes) {
        (Some(used), Some(limit)) => format!("{} of {}", human_bytes(used), human_bytes(limit)),
        (Some(used), None) => human_bytes(used),
        _ => missing(),
    };
    out += &format!("memory   {memory}\n");
    out += &format!(
        "disk     {}\n",
        sample.disk_bytes.map_or_else(missing, human_bytes)
    );
    let network = match (sample.network_rx_bytes, sample.network_tx_bytes) {
        (Some(rx), Some(tx)) => format!("rx {}  tx {}", human_bytes(rx), human_bytes(tx)),
        _ => missing(),
    };
    out += &format!("network  {network}\n");
    out
}

/// Shows a sandbox's egress policy, or changes it (options given replace what they name;
/// the rest stays).
pub async fn net(client: &Client, id: &str, args: &NetworkArgs, json: bool) -> Result<()> {
    let path = format!("/v1/sandboxes/{id}");
    let mut sandbox: SandboxBody = client.json(client.request(Method::GET, &path)).await?;
    if args.given() {
        let current = sandbox.network.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "sandbox {id} has no network policy: the daemon runs without sandbox networking"
            )
        })?;
        let body = UpdateSandboxBody {
            network: Some(args.apply_to(current)),
            ..UpdateSandboxBody::default()
        };
        sandbox = client
            .json(client.request(Method::PATCH, &path).json(&body))
            .await?;
    }
    let Some(network) = sandbox.network else {
        anyhow::bail!(
            "sandbox {id} has no network policy: the daemon runs without sandbox networking"
        );
    };
    if json {
        return print_json(&network);
    }
    println!("internet:  {}", if network.internet { "on" } else { "off" });
    let list = |entries: &[String]| {
        if entries.is_empty() {
            "-".to_owned()
        } else {
            entries.join(", ")
        }
    };
    println!("allow out: {}", list(&network.allow_out));
    println!("deny out:  {}", list(&network.deny_out));
    let limit = |value: Option<u32>, unit: &str| {
        value.map_or_else(|| "no limit".to_owned(), |v| format!("{v}{unit}"))
    };
    println!(
        "bandwidth: {}",
        limit(network.bandwidth_mbit, " Mbit/s each way")
    );
    println!(
        "connections: {}",
        limit(network.max_connections, " at once")
    );
    Ok(())
}

/// Prints the URL of port `port` of sandbox `id`, and the token header if it needs one.
pub async fn port(client: &Client, id: &str, port: u16) -> Result<()> {
    if port == 0 {
        anyhow::bail!("ports are 1 to 65535");
    }
    let sandbox: SandboxBody = client
        .json(client.request(Method::GET, &format!("/v1/sandboxes/{id}")))
        .await?;
    let ports = sandbox.ports.ok_or_else(|| {
        anyhow::anyhow!(
            "sandbox {id} has no reachable ports: the daemon runs without sandbox networking"
        )
    })?;
    let url = ports
        .url
        .ok_or_else(|| anyhow::anyhow!("the daemon did not say where ports are served"))?
        .replace("{port}", &port.to_string());
    println!("{url}");
    if !ports.public {
        if let Some(token) = ports.access_token {
            println!("X-Kiln-Access-Token: {token}");
            eprintln!("(or append ?kiln_token={token}; public ports need none: kiln sandbox create --public-ports)");
        }
    }
    Ok(())
}

/// Opens (prints its address), closes (`close`) or, without a port, lists the TCP forwards
/// of sandbox `id`.
pub async fn forward(
    client: &Client,
    id: &str,
    port: Option<u16>,
    close: bool,
    json: bool,
) -> Result<()> {
    let path = format!("/v1/sandboxes/{id}/forwards");
    match (port, close) {
        (Some(port), true) => {
            client
                .send(client.request(Method::DELETE, &format!("{path}/{port}")))
                .await?;
            Ok(())
        }
        (Some(port), false) => {
            let forward: kiln_api::types::ForwardBody = client
                .json(
                    client
                        .request(Method::POST, &path)
                        .json(&kiln_api::types::OpenForwardBody { port }),
                )
                .await?;
            if json {
                return print_json(&forward);
            }
            println!("{}", forward.address);
            eprintln!(
                "(port {port} of {id}: open to anyone who reaches it; close it with `kiln sandbox forward {id} {port} --close`)"
            );
            Ok(())
        }
        (None, _) => {
            let list: kiln_api::types::ForwardListBody =
                client.json(client.request(Method::GET, &path)).await?;
            if json {
                return print_json(&list);
            }
            for forward in list.forwards {
                println!("{}\t{}", forward.port, forward.address);
            }
            Ok(())
        }
    }
}

/// Snapshots sandbox `sandbox` as `name`; prints the snapshot's id (or JSON).
pub async fn snapshot_create(client: &Client, sandbox: &str, name: &str, json: bool) -> Result<()> {
    let snapshot: kiln_api::types::SnapshotBody = client
        .json(
            client
                .request(Method::POST, &format!("/v1/sandboxes/{sandbox}/snapshots"))
                .json(&kiln_api::types::CreateSnapshotBody {
                    name: name.to_owned(),
                }),
        )
        .await?;
    if json {
        print_json(&snapshot)
    } else {
        println!("{}", snapshot.id);
        Ok(())
    }
}

/// Lists snapshots.
pub async fn snapshot_list(client: &Client, json: bool) -> Result<()> {
    let list: kiln_api::types::SnapshotList = client
        .json(client.request(Method::GET, "/v1/snapshots"))
        .await?;
    if json {
        return print_json(&list);
    }
    println!(
        "{:<18} {:<20} {:<16} {:>9}",
        "ID", "NAME", "SANDBOX", "SIZE"
    );
    for s in list.snapshots {
        println!(
            "{:<18} {:<20} {:<16} {:>7.1}Mi",
            s.id,
            s.name,
            s.sandbox_id,
            s.size_bytes as f64 / f64::from(1u32 << 20)
        );
    }
    Ok(())
}

/// Shows one snapshot as JSON.
pub async fn snapshot_get(client: &Client, id: &str) -> Result<()> {
    let snapshot: kiln_api::types::SnapshotBody = client
        .json(client.request(Method::GET, &format!("/v1/snapshots/{id}")))
        .await?;
    print_json(&snapshot)
}

/// Deletes snapshots.
pub async fn snapshot_remove(client: &Client, ids: &[String]) -> Result<()> {
    for id in ids {
        client
            .send(client.request(Method::DELETE, &format!("/v1/snapshots/{id}")))
            .await?;
    }
    Ok(())
}

/// Forks sandbox `id` `count` times; prints the children's ids (or JSON).
pub async fn fork(
    client: &Client,
    id: &str,
    count: usize,
    ttl: Option<u64>,
    metadata: &[String],
    json: bool,
) -> Result<()> {
    let body = kiln_api::types::ForkBody {
        count: Some(count),
        ttl_secs: ttl,
        metadata: parse_pairs(metadata, "metadata")?,
    };
    let forked: kiln_api::types::ForkedBody = client
        .json(
            client
                .request(Method::POST, &format!("/v1/sandboxes/{id}/fork"))
                .json(&body),
        )
        .await?;
    if json {
        return print_json(&forked);
    }
    for child in &forked.sandboxes {
        println!("{}", child.id);
    }
    eprintln!(
        "parent paused {:.0} ms, {:.1} MiB written",
        forked.parent_paused_ms,
        forked.bytes_written as f64 / f64::from(1u32 << 20)
    );
    Ok(())
}

/// Pauses (`pause`) or resumes (`resume`) sandbox `id`; prints its state (or JSON).
pub async fn pause_or_resume(client: &Client, id: &str, verb: &str, json: bool) -> Result<()> {
    let sandbox: SandboxBody = client
        .json(client.request(Method::POST, &format!("/v1/sandboxes/{id}/{verb}")))
        .await?;
    if json {
        print_json(&sandbox)
    } else {
        println!("{} {}", sandbox.id, sandbox.state);
        Ok(())
    }
}

/// `kiln sandbox kill-all`.
pub async fn kill_all(client: &Client, id: &str) -> Result<()> {
    let killed: KillAllBody = client
        .json(client.request(Method::POST, &format!("/v1/sandboxes/{id}/processes/kill")))
        .await?;
    println!("killed {} processes in {id}", killed.killed);
    Ok(())
}

/// Destroys sandboxes.
pub async fn remove(client: &Client, ids: &[String]) -> Result<()> {
    for id in ids {
        client
            .send(client.request(Method::DELETE, &format!("/v1/sandboxes/{id}")))
            .await?;
        println!("{id}");
    }
    Ok(())
}

/// Options of `kiln exec` and `kiln run`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExecArgs {
    /// Run the words as one shell command line (`sh -c`).
    #[arg(long)]
    pub shell: bool,
    /// Working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// User (`name`, `uid` or `uid:gid`).
    #[arg(long)]
    pub user: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Environment KEY=VALUE for this command (repeatable).
    #[arg(long = "exec-env", value_name = "KEY=VALUE")]
    pub exec_env: Vec<String>,
    /// Send this process's stdin (read to the end first) to the command.
    #[arg(long, short = 'i')]
    pub stdin: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

impl ExecArgs {
    fn body(&self) -> Result<ExecBody> {
        let command = if self.shell {
            CommandBody::Shell(self.command.join(" "))
        } else {
            CommandBody::Argv(self.command.clone())
        };
        let stdin = if self.stdin {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("reading stdin (text only; use `kiln fs put` for binary data)")?;
            Some(text)
        } else {
            None
        };
        Ok(ExecBody {
            command,
            env: parse_pairs(&self.exec_env, "env")?,
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            timeout_ms: self.timeout.map(|s| s * 1000),
            stdin,
            max_output_bytes: None,
            background: false,
            tag: None,
            open_stdin: false,
            pty: None,
        })
    }
}

/// Runs a command in a sandbox, streaming its output; returns its exit code (128 + signal
/// when a signal ended it).
pub async fn exec(client: &Client, id: &str, args: &ExecArgs) -> Result<u8> {
    let sent = client
        .send(
            client
                .request(Method::POST, &format!("/v1/sandboxes/{id}/exec/stream"))
                .json(&args.body()?),
        )
        .await;
    let response = match sent {
        Ok(response) => response,
        // As in a shell, a command that does not exist exits 127.
        Err(e) if is_command_not_found(&e) => {
            eprintln!("kiln: {e}");
            return Ok(127);
        }
        Err(e) => return Err(e),
    };
    let code = each_line(response, "the output stream", |event: ExecEventBody, _| {
        print_event(event)
    })
    .await?;
    code.context("the output stream ended before the command exited")
}

/// An error answer of the daemon, kept typed so that a command can act on its code.
#[derive(Debug)]
pub(crate) struct ApiFailure {
    status: u16,
    code: String,
    message: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, HTTP {})", self.message, self.code, self.status)
    }
}

impl std::error::Error for ApiFailure {}

/// Whether the daemon refused an exec because its command does not exist.
fn is_command_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiFailure>()
        .is_some_and(|f| f.code == "not_found" && f.message.starts_with("command `"))
}

/// Options of `kiln code`.
#[derive(Debug, Clone, clap::Args)]
pub struct CodeArgs {
    /// The context to run in (`default` if absent); `--new-context` makes one.
    #[arg(long)]
    pub context: Option<String>,
    /// Make a new context, print its id on stderr and run the code there.
    #[arg(long, conflicts_with = "context")]
    pub new_context: bool,
    /// Interrupt the run after this many seconds (the context keeps its state).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Print the whole outcome as JSON (results by MIME type, error, counts) at the end.
    #[arg(long)]
    pub json: bool,
    /// The code (joined by spaces); read from stdin when absent.
    #[arg(last = true)]
    pub code: Vec<String>,
}

/// A line of `/code/stream`, as the CLI reads it.
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum CodeLine {
    Stdout {
        text: String,
    },
    Stderr {
        text: String,
    },
    Display {
        data: BTreeMap<String, serde_json::Value>,
    },
    Result {
        data: BTreeMap<String, serde_json::Value>,
    },
    Error {
        traceback: String,
    },
    Done {
        timed_out: bool,
    },
    Failure {
        code: String,
        message: String,
    },
}

/// Runs code in a sandbox's interpreter, streaming its output; exit code 1 if it raised.
pub async fn code(client: &Client, id: &str, args: &CodeArgs) -> Result<u8> {
    let code = if args.code.is_empty() {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading code from stdin")?;
        text
    } else {
        args.code.join(" ")
    };
    let context = if args.new_context {
        let made: kiln_api::types::CodeContextBody = client
            .json(client.request(Method::POST, &format!("/v1/sandboxes/{id}/code/contexts")))
            .await?;
        eprintln!("context {}", made.id);
        Some(made.id)
    } else {
        args.context.clone()
    };
    let body = kiln_api::types::RunCodeBody {
        code,
        language: None,
        context,
        env: Default::default(),
        timeout_ms: args.timeout.map(|s| s * 1000),
    };
    if args.json {
        let outcome: kiln_api::types::ExecutionBody = client
            .json(
                client
                    .request(Method::POST, &format!("/v1/sandboxes/{id}/code"))
                    .json(&body),
            )
            .await?;
        println!("{}", serde_json::to_string_pretty(&outcome)?);
        return Ok(u8::from(outcome.error.is_some()));
    }
    let response = client
        .send(
            client
                .request(Method::POST, &format!("/v1/sandboxes/{id}/code/stream"))
                .json(&body),
        )
        .await?;
    let mut raised = false;
    let ended = each_line(
        response,
        "the code's output stream",
        |event: CodeLine, _| {
            match event {
                CodeLine::Stdout { text } => print!("{text}"),
                CodeLine::Stderr { text } => eprint!("{text}"),
                CodeLine::Display { data } => {
                    let kinds: Vec<&str> = data.keys().map(String::as_str).collect();
                    eprintln!("[kiln: displayed {}; --json shows it]", kinds.join(", "));
                }
                CodeLine::Result { data } => match data.get("text/plain") {
                    Some(serde_json::Value::String(text)) => println!("{text}"),
                    Some(other) => println!("{other}"),
                    None => {}
                },
                CodeLine::Error { traceback } => {
                    raised = true;
                    eprint!("{traceback}");
                }
                CodeLine::Done { timed_out } => {
                    if timed_out {
                        eprintln!("[kiln: interrupted after its timeout]");
                    }
                    return Ok(Some(()));
                }
                CodeLine::Failure { code, message } => anyhow::bail!("{message} ({code})"),
            }
            std::io::stdout().flush()?;
            Ok(None)
        },
    )
    .await?;
    ended.context("the code's output stream ended before the run did")?;
    Ok(u8::from(raised))
}

/// Reads a newline-delimited JSON stream from the daemon, handing each event (and its raw
/// line) to `handle` until it returns a result; `None` if the stream ends first.
async fn each_line<T: serde::de::DeserializeOwned, R>(
    response: reqwest::Response,
    what: &str,
    mut handle: impl FnMut(T, &[u8]) -> Result<Option<R>>,
) -> Result<Option<R>> {
    let mut stream = response.bytes_stream();
    let mut pending = Vec::new();
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk.with_context(|| format!("{what} broke"))?);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: T =
                serde_json::from_slice(&line).context("malformed event from the daemon")?;
            if let Some(result) = handle(event, &line)? {
                return Ok(Some(result));
            }
        }
    }
    Ok(None)
}

fn write_data(out: &mut dyn Write, data: Option<String>, data_b64: Option<String>) -> Result<()> {
    use base64::Engine as _;
    if let Some(text) = data {
        out.write_all(text.as_bytes())?;
    } else if let Some(encoded) = data_b64 {
        out.write_all(&base64::engine::general_purpose::STANDARD.decode(encoded)?)?;
    }
    out.flush()?;
    Ok(())
}

/// Prints one event; the exit code once the command ended.
fn print_event(event: ExecEventBody) -> Result<Option<u8>> {
    match event {
        ExecEventBody::Start { .. } => {}
        ExecEventBody::Stdout { data, data_b64 } => {
            write_data(&mut std::io::stdout().lock(), data, data_b64)?;
        }
        ExecEventBody::Stderr { data, data_b64 } => {
            write_data(&mut std::io::stderr().lock(), data, data_b64)?;
        }
        ExecEventBody::Dropped { bytes } => eprintln!("[kiln: {bytes} bytes of output dropped]"),
        ExecEventBody::Exit {
            exit_code,
            signal,
            timed_out,
        } => {
            if timed_out {
                eprintln!("[kiln: killed after its timeout]");
            }
            let code = match (exit_code, signal) {
                (Some(code), _) => code.clamp(0, 255) as u8,
                (None, Some(signal)) => 128u8.saturating_add(signal.clamp(0, 127) as u8),
                (None, None) => 255,
            };
            return Ok(Some(code));
        }
        ExecEventBody::Error { code, message } => bail!("{message} ({code})"),
    }
    Ok(None)
}

/// Creates a sandbox, runs one command in it, destroys it; returns the command's exit code.
pub async fn run(client: &Client, create: &CreateArgs, args: &ExecArgs) -> Result<u8> {
    let sandbox = create_sandbox(client, create).await?;
    let result = exec(client, &sandbox.id, args).await;
    let removed = client
        .send(client.request(Method::DELETE, &format!("/v1/sandboxes/{}", sandbox.id)))
        .await;
    let code = result?;
    removed.with_context(|| format!("destroying {}", sandbox.id))?;
    Ok(code)
}

/// Lists templates.
pub async fn templates(client: &Client, json: bool) -> Result<()> {
    let list: TemplateList = client
        .json(client.request(Method::GET, "/v1/templates"))
        .await?;
    if json {
        return print_json(&list);
    }
    println!(
        "{:<12} {:>5} {:>8} {:>8} {:<6} DESCRIPTION",
        "NAME", "VCPUS", "MEMORY", "DISK", "READY"
    );
    for t in list.templates {
        println!(
            "{:<12} {:>5} {:>6}Mi {:>6}Mi {:<6} {}",
            t.name,
            t.vcpus,
            t.memory_mib,
            t.disk_mib,
            if t.ready { "yes" } else { "no" },
            t.description.unwrap_or_default()
        );
    }
    Ok(())
}

/// `kiln fs ls`.
pub async fn fs_list(client: &Client, id: &str, path: &str, depth: u32, json: bool) -> Result<()> {
    let list: FileListBody = client
        .json(
            client
                .request(Method::GET, &format!("/v1/sandboxes/{id}/files"))
                .query(&[("path", path), ("depth", &depth.to_string())]),
        )
        .await?;
    if json {
        return print_json(&list);
    }
    for entry in list.entries {
        let suffix = if entry.kind == "dir" { "/" } else { "" };
        println!(
            "{:<7} {:>10} {:04o} {}{suffix}",
            entry.kind,
            entry.size,
            entry.mode & 0o7777,
            entry.path
        );
    }
    if list.truncated {
        eprintln!("[kiln: listing truncated]");
    }
    Ok(())
}

/// The last component of `path` (a file's name), for copies into a directory.
fn file_name_of(path: &str) -> Result<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|name| !name.is_empty() && *name != "." && *name != "..")
        .ok_or_else(|| anyhow::anyhow!("`{path}` does not name a file"))
}

/// `kiln fs cat` / `kiln fs get`: streams a file to stdout, or to a local file (into a local
/// directory under the file's own name, as `cp` does) and says how much it wrote.
pub async fn fs_get(client: &Client, id: &str, path: &str, local: Option<&Path>) -> Result<()> {
    let local = match local {
        Some(local) if local.is_dir() => Some(local.join(file_name_of(path)?)),
        other => other.map(Path::to_path_buf),
    };
    let response = client
        .send(
            client
                .request(Method::GET, &format!("/v1/sandboxes/{id}/files/content"))
                .query(&[("path", path)]),
        )
        .await?;
    let mut out: Box<dyn Write> = match &local {
        Some(local) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(local)
                .with_context(|| format!("creating {}", local.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut stream = response.bytes_stream();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the transfer broke: the copy is incomplete")?;
        out.write_all(&chunk)?;
        bytes += chunk.len() as u64;
    }
    out.flush()?;
    if let Some(local) = local {
        println!("{path} -> {bytes} bytes in {}", local.display());
    }
    Ok(())
}

/// `kiln fs put`: streams a local file into the sandbox.
pub async fn fs_put(client: &Client, id: &str, local: &Path, path: &str) -> Result<()> {
    // Into a directory (`DIR/`, or one that exists) under the local file's name, as `cp`.
    let into_dir = path.ends_with('/') || {
        let stat = client
            .send(
                client
                    .request(Method::GET, &format!("/v1/sandboxes/{id}/files/stat"))
                    .query(&[("path", path)]),
            )
            .await;
        match stat {
            Ok(reply) => reply
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|stat| stat["kind"] == "dir"),
            Err(_) => false,
        }
    };
    let target;
    let path = if into_dir {
        let name = local
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow::anyhow!("{} does not name a file", local.display()))?;
        target = format!("{}/{name}", path.trim_end_matches('/'));
        target.as_str()
    } else {
        path
    };
    let file = tokio::fs::File::open(local)
        .await
        .with_context(|| format!("opening {}", local.display()))?;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    let written: WrittenBody = client
        .json(
            client
                .request(Method::PUT, &format!("/v1/sandboxes/{id}/files/content"))
                .query(&[("path", path)])
                .body(body),
        )
        .await?;
    println!(
        "{} -> {} bytes in {}",
        local.display(),
        written.bytes,
        written.path
    );
    Ok(())
}

/// The local terminal's size, if stdin is one.
fn terminal_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills the winsize it is given; fd 0 is stdin.
    let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0).then_some((size.ws_row, size.ws_col))
}

/// Puts the local terminal in raw mode until dropped.
struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw).is_err() {
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// `kiln shell`: an interactive terminal in the sandbox over the API's WebSocket; returns
/// the shell's exit code.
pub async fn shell(client: &Client, id: &str, command: &[String]) -> Result<u8> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let url = format!(
        "{}/v1/sandboxes/{id}/exec/ws",
        client.url.replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request()?;
    if let Some(key) = &client.key {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {key}").parse()?);
    }
    let (socket, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(connected) => connected,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            match serde_json::from_str::<ErrorBody>(&body) {
                Ok(error) => bail!("{} ({})", error.message, error.code),
                Err(_) => bail!("HTTP {}", response.status()),
            }
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot reach the kiln daemon at {}", client.url))
        }
    };
    let (mut tx, mut rx) = socket.split();
    let (rows, cols) = terminal_size().unwrap_or((24, 80));
    let command = if command.is_empty() {
        CommandBody::Shell(
            "if command -v bash >/dev/null; then exec bash -l; else exec sh -l; fi".into(),
        )
    } else {
        CommandBody::Argv(command.to_vec())
    };
    let mut env = BTreeMap::new();
    env.insert(
        "TERM".to_owned(),
        std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
    );
    let start = InteractiveStartBody {
        command: Some(command),
        attach: None,
        pty: Some(TerminalSize { rows, cols }),
        env,
        cwd: None,
        user: None,
        timeout_ms: None,
    };
    tx.send(Message::Text(serde_json::to_string(&start)?))
        .await?;

    let _raw = RawMode::enter();
    // Stdin is read on a thread of its own (blocking reads), forwarded as binary messages.
    let (input_tx, mut input_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut std::io::stdin(), &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut resized =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut stdin_open = true;
    loop {
        tokio::select! {
            input = input_rx.recv(), if stdin_open => match input {
                Some(bytes) => tx.send(Message::Binary(bytes)).await?,
                None => {
                    stdin_open = false;
                    let close = serde_json::to_string(&InteractiveInputBody::CloseStdin)?;
                    tx.send(Message::Text(close)).await?;
                }
            },
            _ = resized.recv() => {
                if let Some((rows, cols)) = terminal_size() {
                    let resize = InteractiveInputBody::Resize { rows, cols };
                    tx.send(Message::Text(serde_json::to_string(&resize)?)).await?;
                }
            }
            message = rx.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let event: ExecEventBody = serde_json::from_str(&text)
                        .context("malformed event from the daemon")?;
                    if let Some(code) = print_event(event)? {
                        return Ok(code);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("the session broke"),
                None => bail!("the session ended before the shell exited"),
            },
        }
    }
}

/// `kiln template create`: sends a spec to the daemon, which stores it as one of this
/// tenant's templates and builds it; progress is printed as it comes.
pub async fn template_create(client: &Client, spec: &Path, json: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(spec).with_context(|| format!("reading {}", spec.display()))?;
    let name = build_progress(
        client,
        BuildTemplateBody {
            spec: Some(text),
            name: None,
        },
        json,
    )
    .await?;
    if !json {
        println!("{name} is ready");
    }
    Ok(())
}

/// Asks the daemon to build a template and shows the progress; returns its name.
async fn build_progress(client: &Client, body: BuildTemplateBody, json: bool) -> Result<String> {
    use kiln_api::types::BuildEventBody;
    use kiln_image::progress::BuildEvent;
    let response = client
        .send(client.request(Method::POST, "/v1/templates").json(&body))
        .await?;
    let name = each_line(
        response,
        "the progress stream",
        |event: BuildEventBody, line| {
            if json {
                println!("{}", String::from_utf8_lossy(line).trim_end());
            }
            let shown = match event {
                BuildEventBody::Step { artefact, name } => BuildEvent::Step { artefact, name },
                BuildEventBody::StepDone {
                    artefact,
                    name,
                    elapsed_ms,
                    detail,
                } => BuildEvent::StepDone {
                    artefact,
                    name,
                    elapsed: std::time::Duration::try_from_secs_f64(elapsed_ms / 1000.0)
                        .unwrap_or_default(),
                    detail,
                },
                // The daemon does not say where its cache is.
                BuildEventBody::Cached { artefact } => {
                    if !json {
                        eprintln!("  [{artefact}] cached");
                    }
                    return Ok(None);
                }
                BuildEventBody::Ready { template } => return Ok(Some(template.name)),
                BuildEventBody::Error { code, message } => bail!("{message} ({code})"),
            };
            if !json {
                eprintln!("{}", shown.line());
            }
            Ok(None)
        },
    )
    .await?;
    name.context("the progress stream ended before the build did")
}

/// `kiln template rm`.
pub async fn template_remove(client: &Client, name: &str) -> Result<()> {
    client
        .send(client.request(Method::DELETE, &format!("/v1/templates/{name}")))
        .await?;
    println!("{name}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cpu: Option<f64>, at_ms: i64) -> SandboxMetricsBody {
        serde_json::from_value(serde_json::json!({
            "sandbox_id": "sb-1", "state": "running", "cpu_seconds": cpu,
            "memory_bytes": 200u64 << 20, "memory_limit_bytes": 768u64 << 20,
            "disk_bytes": 1536, "measured_at_ms": at_ms,
        }))
        .expect("sample")
    }

    #[test]
    fn stats_show_the_cpu_share_between_samples_and_dashes_for_the_unmeasured() {
        let first = stats_table(&sample(Some(10.0), 1_000), None);
        assert_eq!(
            first,
            "sb-1  running\ncpu      10.00 s\nmemory   200.0 MiB of 768.0 MiB\n\
             disk     1.5 KiB\nnetwork  -\n"
        );
        let later = stats_table(&sample(Some(11.0), 3_000), Some(&sample(Some(10.0), 1_000)));
        assert!(
            later.contains("cpu      11.00 s  (50.0% of one CPU)"),
            "{later}"
        );
        let paused = stats_table(&sample(None, 3_000), Some(&sample(Some(10.0), 1_000)));
        assert!(paused.contains("cpu      -\n"), "{paused}");
    }
}
