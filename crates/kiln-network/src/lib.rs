//! The host side of kiln's sandbox networking.
//!
//! Every sandbox's network namespace (made by `kiln-net`, with the guest's tap) is joined to
//! the host by a veth pair carrying a /31 link from the daemon's address pool
//! ([`pool`]). Inside the namespace the guest's fixed address is translated to the link's,
//! its DNS goes to the daemon's resolver, and its egress policy lives in an nftables table
//! ([`nft`], [`policy`]): all of it survives a daemon crash and goes with the namespace. On
//! the host, one table of the daemon's keeps sandboxes off the host and off each other, and
//! sends their traffic out by the egress interface only, masqueraded, through a routing
//! table of the daemon's own.
//!
//! Wiring happens before a sandbox is asked for (a pre-started VMM's namespace is wired
//! with the default policy); a create only changes the policy if it asks for another.

pub mod cmd;
pub mod dns;
pub mod nft;
pub mod policy;
pub mod pool;
mod proxy;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, RwLock};

use ipnet::Ipv4Net;
use kiln_net::netns::NetNs;

use crate::cmd::Place;
use crate::policy::{AlwaysDenied, EgressPolicy};
use crate::pool::{Slot, SlotPool};

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A setting is wrong; the message says which and how.
    #[error("network configuration: {0}")]
    Config(String),
    /// A policy is refused.
    #[error("{0}")]
    Policy(String),
    /// No address is free.
    #[error("{0}")]
    Exhausted(String),
    /// A tool failed.
    #[error("{command}: {message}")]
    Tool {
        /// The command line.
        command: String,
        /// What it said.
        message: String,
    },
    /// A file or system call failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Name of the namespace's end of the veth pair.
pub const UPLINK: &str = "up0";

/// How the daemon connects sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Addresses for the sandboxes' links, two per sandbox (a /16 holds 32,767).
    pub pool: Ipv4Net,
    /// Prefix of every name the daemon makes: network namespaces (`<prefix><sandbox>`),
    /// host interfaces (`<prefix>v<slot>`) and the nftables table and the service address's
    /// label on `lo` (`<prefix>` without its trailing `-`). At most 9 characters.
    pub prefix: String,
    /// The interface sandbox traffic leaves by; `None`: the one of the host's default route.
    pub egress_interface: Option<String>,
    /// The next hop on it; `None` with an explicit interface: directly on the link.
    pub egress_gateway: Option<Ipv4Addr>,
    /// The routing table (and rule priorities `route_table` and `route_table + 1`) the daemon
    /// routes sandbox traffic with.
    pub route_table: u32,
    /// Policy of a sandbox whose create names none: internet on or off.
    pub default_internet: bool,
    /// Let policies open RFC 1918 and shared address space (the operator's LAN).
    pub allow_private: bool,
    /// Ranges no sandbox may reach, beyond the built-in ones.
    pub denied: Vec<Ipv4Net>,
    /// Resolvers the daemon's resolver forwards to; empty: the host's (`/etc/resolv.conf`).
    pub dns_upstreams: Vec<SocketAddr>,
}

impl NetworkConfig {
    /// The defaults: pool 10.251.0.0/16, prefix `kiln-`, egress by the default route,
    /// internet on.
    pub fn new() -> NetworkConfig {
        NetworkConfig {
            pool: Ipv4Net::new(Ipv4Addr::new(10, 251, 0, 0), 16).unwrap_or_default(),
            prefix: "kiln-".into(),
            egress_interface: None,
            egress_gateway: None,
            route_table: 7251,
            default_internet: true,
            allow_private: false,
            denied: Vec::new(),
            dns_upstreams: Vec::new(),
        }
    }

    /// The nftables table's name.
    pub fn table(&self) -> String {
        let name = self.prefix.trim_end_matches(['-', '_']);
        if name.is_empty() {
            "kiln".into()
        } else {
            name.to_owned()
        }
    }

    fn validate(&self) -> Result<(), NetworkError> {
        let ok = !self.prefix.is_empty()
            && self.prefix.len() <= 9
            && self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(NetworkError::Config(format!(
                "prefix `{}`: 1 to 9 letters, digits, `-` or `_` (interface names are at most 15 characters)",
                self.prefix
            )));
        }
        if self.route_table == 0 || self.route_table >= 250 && self.route_table <= 255 {
            return Err(NetworkError::Config(format!(
                "route table {} is reserved: pick another",
                self.route_table
            )));
        }
        Ok(())
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig::new()
    }
}

/// Where sandbox traffic leaves the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    /// The interface.
    pub interface: String,
    /// The next hop, if any.
    pub gateway: Option<Ipv4Addr>,
}

/// One sandbox's link to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// Its slot.
    pub slot: Slot,
    /// The host's end.
    pub host: Ipv4Addr,
    /// The namespace's end: the sandbox's address as the host (and the internet, before
    /// masquerading) sees it, and where the daemon reaches it.
    pub sandbox: Ipv4Addr,
}

/// The daemon's sandbox networking: host set-up, links and policies.
#[derive(Debug)]
pub struct Network {
    config: NetworkConfig,
    /// The nftables table's name (host and namespaces).
    table: String,
    service: Ipv4Addr,
    egress: Option<Egress>,
    always: AlwaysDenied,
    slots: Mutex<SlotPool>,
    /// Whether this daemon turned on forwarding on the egress interface.
    guarded_egress: bool,
    /// Where the resolver and the proxy resolve names.
    upstreams: Vec<SocketAddr>,
    /// The wired sandboxes, by link (the resolver and the proxy find a sandbox by its
    /// link address).
    sandboxes: RwLock<HashMap<Slot, Arc<SandboxNet>>>,
    /// The resolver's and the proxies' tasks.
    services: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// What the daemon's services know of one wired sandbox.
#[derive(Debug)]
pub struct SandboxNet {
    /// Its namespace, to add resolved addresses to its set.
    ns: OwnedFd,
    policy: Mutex<EgressPolicy>,
    /// Its proxied connections.
    proxied: Mutex<Vec<proxy::Tracked>>,
}

impl SandboxNet {
    /// The policy in force.
    pub fn policy(&self) -> EgressPolicy {
        lock(&self.policy).clone()
    }

    /// Lets `addresses` through the sandbox's firewall for `ttl` seconds.
    async fn allow_resolved(
        &self,
        network: &Network,
        addresses: &[Ipv4Addr],
        ttl: u32,
    ) -> Result<(), NetworkError> {
        let script = nft::resolved_script(&network.table, addresses, ttl);
        let ns = self.ns.try_clone().map_err(|e| NetworkError::Io {
            context: "sharing the sandbox namespace".into(),
            source: e,
        })?;
        tokio::task::spawn_blocking(move || cmd::nft(Place::Namespace(ns.as_fd()), &script))
            .await
            .map_err(|e| NetworkError::Io {
                context: "updating the sandbox's addresses".into(),
                source: std::io::Error::other(e),
            })?
    }

    /// Lists a proxied connection to `name`; `None` if the sandbox has too many.
    fn track(self: &Arc<Self>, name: &str) -> Option<TrackGuard> {
        let mut proxied = lock(&self.proxied);
        if proxied.len() >= proxy::MAX_PER_SANDBOX {
            return None;
        }
        let tracked = proxy::Tracked::new(name);
        let guard = TrackGuard {
            sandbox: Arc::clone(self),
            id: tracked.id,
            cut: Arc::clone(&tracked.cut),
        };
        proxied.push(tracked);
        Some(guard)
    }

    /// Closes the proxied connections whose names `policy` does not allow.
    fn cut_proxied(&self, policy: &EgressPolicy) {
        for tracked in lock(&self.proxied).iter() {
            if !policy.allows_name(&tracked.name) {
                tracked.cut.notify_one();
            }
        }
    }
}

/// A proxied connection's place in its sandbox's list; leaves it when dropped.
#[derive(Debug)]
pub(crate) struct TrackGuard {
    sandbox: Arc<SandboxNet>,
    id: u64,
    cut: Arc<tokio::sync::Notify>,
}

impl TrackGuard {
    /// Resolves when a policy change cuts the connection.
    pub(crate) async fn cut(&self) {
        self.cut.notified().await;
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        lock(&self.sandbox.proxied).retain(|t| t.id != self.id);
    }
}

/// A token bucket of `mbit` Mbit/s for `tc`: bursts of 20 ms at that rate (at least 32 KiB,
/// so a full-size packet always fits), and packets that would wait more than 100 ms dropped.
fn token_bucket(mbit: u32) -> String {
    let bytes_per_second = u64::from(mbit) * 125_000;
    let burst = (bytes_per_second / 50).max(32 << 10);
    format!("tbf rate {mbit}mbit burst {burst} latency 100ms")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The host's IPv4 routes (all tables) as `(destination, device, table)`.
fn host_routes() -> Result<Vec<(Ipv4Net, String, String)>, NetworkError> {
    let out = cmd::run(
        Place::Host,
        "ip",
        &["-j", "-4", "route", "show", "table", "all"],
        "",
    )?;
    let routes: Vec<serde_json::Value> = serde_json::from_str(&out).map_err(|e| {
        NetworkError::Config(format!("reading the host's routes (ip -j route): {e}"))
    })?;
    Ok(routes
        .iter()
        .filter_map(|r| {
            let dst = r["dst"].as_str()?;
            let net = if dst == "default" {
                "0.0.0.0/0".parse().ok()?
            } else if dst.contains('/') {
                dst.parse().ok()?
            } else {
                Ipv4Net::from(dst.parse::<Ipv4Addr>().ok()?)
            };
            Some((
                net,
                r["dev"].as_str().unwrap_or_default().to_owned(),
                r["table"].as_str().unwrap_or("main").to_owned(),
            ))
        })
        .collect())
}

/// The host's default route: interface and gateway.
fn default_egress() -> Result<Option<Egress>, NetworkError> {
    let out = cmd::run(
        Place::Host,
        "ip",
        &["-j", "-4", "route", "show", "default"],
        "",
    )?;
    let routes: Vec<serde_json::Value> = serde_json::from_str(&out)
        .map_err(|e| NetworkError::Config(format!("reading the host's default route: {e}")))?;
    Ok(routes.first().and_then(|r| {
        Some(Egress {
            interface: r["dev"].as_str()?.to_owned(),
            gateway: r["gateway"].as_str().and_then(|g| g.parse().ok()),
        })
    }))
}

/// The address of the namespace's end of its link (`up0`), if it has one.
fn link_address(ns: &NetNs) -> Option<Ipv4Addr> {
    let netns = ns.open().ok()?;
    let out = cmd::run(
        Place::Namespace(netns.as_fd()),
        "ip",
        &["-j", "-4", "addr", "show", "dev", UPLINK],
        "",
    )
    .ok()?;
    let value: serde_json::Value = serde_json::from_str(&out).ok()?;
    value[0]["addr_info"][0]["local"].as_str()?.parse().ok()
}

impl Network {
    /// Sets the host up for `config`: checks the pool against the host's routes, makes the
    /// service interface, the routing table and rules and the host's table, and turns on
    /// forwarding for the egress interface. Everything it makes is named from the prefix,
    /// so daemons with different prefixes and pools run side by side.
    pub fn open(config: NetworkConfig) -> Result<Network, NetworkError> {
        config.validate()?;
        let slots = SlotPool::new(config.pool)?;
        let pool = slots.pool();
        let ours = |dev: &str| dev.starts_with(&config.prefix);
        for (net, dev, table) in host_routes()? {
            let table_ours = table == config.route_table.to_string();
            if net.prefix_len() > 0
                && (net.contains(&pool.network()) || pool.contains(&net.network()))
                && !ours(&dev)
                && !table_ours
                && table != "local"
            {
                return Err(NetworkError::Config(format!(
                    "the address pool {pool} overlaps the host's route to {net} (dev {dev}, table {table}): set another network pool"
                )));
            }
        }
        let egress = match &config.egress_interface {
            Some(interface) => Some(Egress {
                interface: interface.clone(),
                gateway: config.egress_gateway,
            }),
            None => default_egress()?,
        };
        if egress.is_none() {
            tracing::warn!("the host has no default route: sandboxes have no internet");
        }
        let service = pool::service_address(pool);
        let table = config.route_table;
        let mut host = String::new();
        // Replace whatever an earlier run left.
        let _ = cmd::ip(Place::Host, &format!("addr del {service}/32 dev lo\n"));
        for (what, pref) in [
            (format!("to {pool}"), table),
            (format!("from {pool}"), table + 1),
        ] {
            let _ = cmd::ip(Place::Host, &format!("rule del {what} pref {pref}\n"));
        }
        // The service address lives on the loopback interface (every kernel has it; a dummy
        // interface needs a module some hosts lack), labelled with the prefix.
        host.push_str(&format!(
            "addr add {service}/32 dev lo label lo:{}\n",
            config.table()
        ));
        // Traffic to a sandbox goes by its veth (main table); traffic from one leaves by
        // the daemon's table, whose only route is the egress.
        host.push_str(&format!("rule add to {pool} lookup main pref {table}\n"));
        host.push_str(&format!(
            "rule add from {pool} lookup {table} pref {}\n",
            table + 1
        ));
        let _ = cmd::ip(Place::Host, &format!("route flush table {table}\n"));
        if let Some(egress) = &egress {
            match egress.gateway {
                Some(gateway) => host.push_str(&format!(
                    "route add default via {gateway} dev {} table {table}\n",
                    egress.interface
                )),
                None => host.push_str(&format!(
                    "route add default dev {} table {table}\n",
                    egress.interface
                )),
            }
        } else {
            host.push_str(&format!("route add unreachable default table {table}\n"));
        }
        cmd::ip(Place::Host, &host)?;
        let mut guarded_egress = false;
        if let Some(egress) = &egress {
            let key = format!("net.ipv4.conf.{}.forwarding", egress.interface);
            if cmd::read_sysctl(&key)? != "1" {
                cmd::sysctl(&key, "1")?;
                guarded_egress = true;
            }
        }
        let upstreams = if config.dns_upstreams.is_empty() {
            dns::host_upstreams(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
        } else {
            config.dns_upstreams.clone()
        };
        if upstreams.is_empty() {
            tracing::warn!("no DNS upstream (none set, none in /etc/resolv.conf): names do not resolve in sandboxes");
        }
        let network = Network {
            always: AlwaysDenied::new(pool, config.allow_private, &config.denied),
            table: config.table(),
            upstreams,
            sandboxes: RwLock::new(HashMap::new()),
            services: Mutex::new(Vec::new()),
            config,
            service,
            egress,
            slots: Mutex::new(slots),
            guarded_egress,
        };
        cmd::nft(Place::Host, &network.host_table())?;
        tracing::info!(
            pool = %pool,
            egress = network.egress.as_ref().map_or("none", |e| e.interface.as_str()),
            service = %service,
            "sandbox networking ready"
        );
        Ok(network)
    }

    fn host_table(&self) -> String {
        nft::host_table(&nft::HostTable {
            table: &self.table,
            pool: self.config.pool,
            service: self.service,
            egress: self.egress.as_ref().map(|e| e.interface.as_str()),
            guard_egress_forwarding: self.guarded_egress,
        })
    }

    /// Starts the resolver and the egress proxies on the service address, as tasks of the
    /// runtime `runtime`; they run until [`Network::shutdown`].
    pub fn start(self: &Arc<Self>, runtime: &tokio::runtime::Handle) -> Result<(), NetworkError> {
        let bind_error = |what: &str, e: std::io::Error| NetworkError::Io {
            context: format!("listening on {}:{what}", self.service),
            source: e,
        };
        let listen = |port: u16, what: &str| {
            std::net::TcpListener::bind((self.service, port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| bind_error(what, e))
        };
        let udp = std::net::UdpSocket::bind((self.service, nft::DNS_PORT))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .map_err(|e| bind_error("53/udp", e))?;
        let tcp = listen(nft::DNS_PORT, "53/tcp")?;
        let http = listen(nft::HTTP_PROXY_PORT, "80")?;
        let tls = listen(nft::TLS_PROXY_PORT, "443")?;
        let _entered = runtime.enter();
        let io = |e| bind_error("(registering)", e);
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(io)?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(io)?;
        let http = tokio::net::TcpListener::from_std(http).map_err(io)?;
        let tls = tokio::net::TcpListener::from_std(tls).map_err(io)?;
        let mut services = lock(&self.services);
        services.push(runtime.spawn(dns::serve(Arc::clone(self), udp, tcp)));
        services.push(runtime.spawn(proxy::serve(Arc::clone(self), http, proxy::Kind::Http)));
        services.push(runtime.spawn(proxy::serve(Arc::clone(self), tls, proxy::Kind::Tls)));
        Ok(())
    }

    /// The sandbox whose link address is `address`.
    pub fn sandbox_at(&self, address: Ipv4Addr) -> Option<Arc<SandboxNet>> {
        let slot = Slot::of(address, self.config.pool)?;
        (slot.sandbox_address(self.config.pool) == address)
            .then(|| self.sandboxes.read().ok()?.get(&slot).cloned())
            .flatten()
    }

    /// Forwards a DNS query to the upstreams.
    pub(crate) async fn ask_upstream(&self, query: &[u8]) -> Option<Vec<u8>> {
        dns::ask(&self.upstreams, query).await
    }

    /// The upstream resolvers.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Whether `address` is one of the host's own.
    pub fn is_local(&self, address: Ipv4Addr) -> bool {
        nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
            addrs.any(|a| {
                a.address
                    .and_then(|s| s.as_sockaddr_in().map(|sin| sin.ip()))
                    == Some(address)
            })
        })
    }

    fn register(&self, slot: Slot, ns: &NetNs, policy: &EgressPolicy) -> Result<(), NetworkError> {
        let fd = ns.open().map_err(|e| NetworkError::Io {
            context: "opening the sandbox namespace".into(),
            source: e,
        })?;
        let entry = Arc::new(SandboxNet {
            ns: fd,
            policy: Mutex::new(policy.clone()),
            proxied: Mutex::new(Vec::new()),
        });
        if let Ok(mut sandboxes) = self.sandboxes.write() {
            sandboxes.insert(slot, entry);
        }
        Ok(())
    }

    /// Its configuration.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The daemon's service address (resolver, proxies) in the pool.
    pub fn service_address(&self) -> Ipv4Addr {
        self.service
    }

    /// Where sandbox traffic leaves, if anywhere.
    pub fn egress(&self) -> Option<&Egress> {
        self.egress.as_ref()
    }

    /// What no policy opens.
    pub fn always_denied(&self) -> &AlwaysDenied {
        &self.always
    }

    /// The policy of a sandbox whose create names none.
    pub fn default_policy(&self) -> EgressPolicy {
        EgressPolicy::open(self.config.default_internet)
    }

    /// Checks a policy a tenant asks for.
    pub fn check(&self, policy: &EgressPolicy) -> Result<(), NetworkError> {
        self.always.check(policy)
    }

    /// How many links are in use.
    pub fn links_in_use(&self) -> usize {
        lock(&self.slots).in_use()
    }

    /// The link of `slot`.
    pub fn link(&self, slot: Slot) -> Link {
        Link {
            slot,
            host: slot.host_address(self.config.pool),
            sandbox: slot.sandbox_address(self.config.pool),
        }
    }

    /// The host's end of `slot`'s veth pair.
    pub fn host_interface(&self, slot: Slot) -> String {
        format!("{}v{}", self.config.prefix, slot.0)
    }

    /// Joins namespace `ns` (holding the guest's tap) to the host with a new link, and puts
    /// `policy` in force in it.
    pub fn wire(&self, ns: &NetNs, policy: &EgressPolicy) -> Result<Link, NetworkError> {
        self.check(policy)?;
        let slot = lock(&self.slots).take()?;
        match self
            .wire_slot(ns, slot, policy)
            .and_then(|link| self.register(slot, ns, policy).map(|()| link))
        {
            Ok(link) => Ok(link),
            Err(e) => {
                // The namespace goes with its creator; our end with it. Give the slot back.
                let _ = cmd::ip(
                    Place::Host,
                    &format!("link del {}\n", self.host_interface(slot)),
                );
                lock(&self.slots).give_back(slot);
                Err(e)
            }
        }
    }

    fn wire_slot(
        &self,
        ns: &NetNs,
        slot: Slot,
        policy: &EgressPolicy,
    ) -> Result<Link, NetworkError> {
        let link = self.link(slot);
        let host_if = self.host_interface(slot);
        let prefix_len = 31;
        cmd::ip(
            Place::Host,
            &format!(
                "link add {host_if} type veth peer name {UPLINK} netns {}\n\
                 addr add {}/{prefix_len} dev {host_if}\n\
                 link set {host_if} up\n",
                ns.name(),
                link.host
            ),
        )?;
        for (key, value) in [
            (format!("net.ipv4.conf.{host_if}.forwarding"), "1"),
            (format!("net.ipv6.conf.{host_if}.disable_ipv6"), "1"),
        ] {
            cmd::sysctl(&key, value)?;
        }
        ns.run_in(|| {
            for (key, value) in [
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
                ("net.ipv4.conf.all.forwarding", "1"),
                ("net.ipv4.ip_forward", "1"),
            ] {
                cmd::sysctl(key, value).map_err(std::io::Error::other)?;
            }
            Ok(())
        })
        .map_err(|e| NetworkError::Io {
            context: "configuring the sandbox namespace".into(),
            source: e,
        })?;
        let netns = ns.open().map_err(|e| NetworkError::Io {
            context: "opening the sandbox namespace".into(),
            source: e,
        })?;
        use std::os::fd::AsFd;
        cmd::ip(
            Place::Namespace(netns.as_fd()),
            &format!(
                "link set lo up\n\
                 addr add {}/{prefix_len} dev {UPLINK}\n\
                 link set {UPLINK} up\n\
                 route add default via {} dev {UPLINK}\n",
                link.sandbox, link.host
            ),
        )?;
        cmd::nft(
            Place::Namespace(netns.as_fd()),
            &nft::sandbox_table(&self.sandbox_table(link), policy),
        )?;
        self.shape(netns.as_fd(), slot, policy.bandwidth_mbit, None)?;
        Ok(link)
    }

    /// Holds `link` closed (its host end down: nothing goes in or out of its namespace, the
    /// policy in force there stays) or opens it again. One system call each way, in the
    /// daemon's own namespace.
    pub fn hold(&self, link: Link, closed: bool) -> Result<(), NetworkError> {
        let host_if = self.host_interface(link.slot);
        kiln_net::iface::ioctl_socket()
            .and_then(|sock| kiln_net::iface::set_link(&sock, &host_if, !closed))
            .map_err(|e| NetworkError::Io {
                context: format!("setting {host_if} {}", if closed { "down" } else { "up" }),
                source: e,
            })
    }

    /// Limits the link of `slot` to `mbit` each way (or lifts the limit `before` set): the
    /// host's end shapes what goes to the sandbox, the namespace's end what comes from it.
    fn shape(
        &self,
        netns: std::os::fd::BorrowedFd<'_>,
        slot: Slot,
        mbit: Option<u32>,
        before: Option<u32>,
    ) -> Result<(), NetworkError> {
        let host_if = self.host_interface(slot);
        let ends = [
            (Place::Host, host_if.as_str()),
            (Place::Namespace(netns), UPLINK),
        ];
        match mbit {
            Some(mbit) => {
                let qdisc = token_bucket(mbit);
                for (place, device) in ends {
                    cmd::tc(place, &format!("qdisc replace dev {device} root {qdisc}\n"))?;
                }
            }
            None if before.is_some() => {
                for (place, device) in ends {
                    match cmd::tc(place, &format!("qdisc del dev {device} root\n")) {
                        // Gone already (the default has no handle to delete).
                        Err(NetworkError::Tool { message, .. })
                            if message.contains("handle of zero")
                                || message.contains("No such file") => {}
                        result => result?,
                    }
                }
            }
            None => {}
        }
        Ok(())
    }

    fn sandbox_table(&self, link: Link) -> nft::SandboxTable<'_> {
        nft::SandboxTable {
            table: &self.table,
            tap: kiln_net::TAP_NAME,
            uplink: UPLINK,
            guest: kiln_net::GUEST_ADDRESS,
            gateway: kiln_net::GATEWAY_ADDRESS,
            link: link.sandbox,
            service: self.service,
            always: &self.always,
        }
    }

    /// Puts `policy` in force in namespace `ns` (wired by [`Network::wire`]) atomically, and
    /// cuts its established connections to destinations the new policy denies.
    pub fn apply(&self, ns: &NetNs, policy: &EgressPolicy) -> Result<(), NetworkError> {
        self.check(policy)?;
        let netns = ns.open().map_err(|e| NetworkError::Io {
            context: "opening the sandbox namespace".into(),
            source: e,
        })?;
        use std::os::fd::AsFd;
        let slot = self.link_of(ns);
        let entry = slot.and_then(|slot| {
            self.sandboxes
                .read()
                .ok()
                .and_then(|s| s.get(&slot).cloned())
        });
        // Shaped first: a failure leaves the old policy whole. Every wired (or adopted)
        // namespace is registered with the policy it has.
        if let Some(slot) = slot {
            let before = entry
                .as_ref()
                .and_then(|entry| lock(&entry.policy).bandwidth_mbit);
            if policy.bandwidth_mbit != before {
                self.shape(netns.as_fd(), slot, policy.bandwidth_mbit, before)?;
            }
        }
        cmd::nft(
            Place::Namespace(netns.as_fd()),
            &nft::policy_script(&self.table, self.service, policy),
        )?;
        if let Some(entry) = entry {
            *lock(&entry.policy) = policy.clone();
            entry.cut_proxied(policy);
        }
        self.cut_denied(netns.as_fd(), policy)
    }

    /// The slot of wired namespace `ns`.
    fn link_of(&self, ns: &NetNs) -> Option<Slot> {
        Slot::of(link_address(ns)?, self.config.pool)
    }

    /// Deletes the namespace's tracked connections whose destination `policy` denies.
    fn cut_denied(
        &self,
        netns: std::os::fd::BorrowedFd<'_>,
        policy: &EgressPolicy,
    ) -> Result<(), NetworkError> {
        let listed = cmd::run(
            Place::Namespace(netns),
            "conntrack",
            &["-L", "-f", "ipv4"],
            "",
        )?;
        let allow = EgressPolicy::nets(&policy.allow_out);
        let deny = EgressPolicy::nets(&policy.deny_out);
        let mut cut = Vec::new();
        for line in listed.lines() {
            // The original direction's `src=` and `dst=` come first.
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse::<Ipv4Addr>().ok())
            };
            let (Some(src), Some(dst)) = (field("src="), field("dst=")) else {
                continue;
            };
            if src != kiln_net::GUEST_ADDRESS || dst == self.service {
                continue;
            }
            let denied = self.always.contains(dst)
                || deny.iter().any(|n| n.contains(&dst))
                || (!policy.internet && !allow.iter().any(|n| n.contains(&dst)));
            if denied {
                cut.push(dst);
            }
        }
        cut.sort();
        cut.dedup();
        for dst in cut {
            // Exit status 1 means "nothing matched" (it ended meanwhile).
            let _ = cmd::run(
                Place::Namespace(netns),
                "conntrack",
                &[
                    "-D",
                    "-s",
                    &kiln_net::GUEST_ADDRESS.to_string(),
                    "-d",
                    &dst.to_string(),
                ],
                "",
            );
        }
        Ok(())
    }

    /// Takes back the link of a sandbox of an earlier run (found in its namespace) while
    /// adopting it, with the policy its namespace holds (`policy`, as the daemon recorded it).
    pub fn adopt(&self, ns: &NetNs, policy: &EgressPolicy) -> Result<Link, NetworkError> {
        let address = link_address(ns)
            .ok_or_else(|| NetworkError::Config(format!("{} has no link address", ns.name())))?;
        let slot = Slot::of(address, self.config.pool).ok_or_else(|| {
            NetworkError::Config(format!("{address} of {} is not in the pool", ns.name()))
        })?;
        if !lock(&self.slots).claim(slot) {
            return Err(NetworkError::Config(format!(
                "the link of {} ({address}) is taken",
                ns.name()
            )));
        }
        // A namespace an earlier daemon wired may lack rules added since: its guest's
        // packets with another source, or that leave untranslated, are dropped from now on
        // as in a new one.
        let guard = ns
            .open()
            .map_err(|e| NetworkError::Io {
                context: "opening the sandbox namespace".into(),
                source: e,
            })
            .and_then(|netns| {
                use std::os::fd::AsFd;
                let script = nft::guard_chains(&self.sandbox_table(self.link(slot)));
                cmd::nft(Place::Namespace(netns.as_fd()), &script)
            });
        if let Err(e) = guard {
            lock(&self.slots).give_back(slot);
            return Err(e);
        }
        self.register(slot, ns, policy)?;
        Ok(self.link(slot))
    }

    /// Forgets `link` once its namespace is gone (which took both ends of its veth pair and
    /// its table with it): the host's tracked connections of its address are deleted, then
    /// its slot is free again (reused last).
    pub fn release(&self, link: Link) {
        if let Some(entry) = self
            .sandboxes
            .write()
            .ok()
            .and_then(|mut s| s.remove(&link.slot))
        {
            for tracked in lock(&entry.proxied).iter() {
                tracked.cut.notify_one();
            }
        }
        for flag in ["-s", "-d"] {
            let _ = cmd::run(
                Place::Host,
                "conntrack",
                &["-D", flag, &link.sandbox.to_string()],
                "",
            );
        }
        let _ = cmd::ip(
            Place::Host,
            &format!("link del {}\n", self.host_interface(link.slot)),
        );
        lock(&self.slots).give_back(link.slot);
    }

    /// Removes the host's set-up (on a stop that destroys every sandbox): the host table,
    /// routing rules and table, the service address, forwarding on the egress interface if
    /// this daemon turned it on.
    pub fn shutdown(&self) {
        for task in lock(&self.services).drain(..) {
            task.abort();
        }
        let table = &self.table;
        let route_table = self.config.route_table;
        let pool = self.config.pool;
        let _ = cmd::nft(Place::Host, &format!("delete table inet {table}\n"));
        let _ = cmd::ip(
            Place::Host,
            &format!(
                "rule del to {pool} pref {route_table}\n\
                 rule del from {pool} pref {}\n\
                 route flush table {route_table}\n\
                 addr del {}/32 dev lo\n",
                route_table + 1,
                self.service
            ),
        );
        if self.guarded_egress {
            if let Some(egress) = &self.egress {
                let _ = cmd::sysctl(
                    &format!("net.ipv4.conf.{}.forwarding", egress.interface),
                    "0",
                );
            }
        }
    }
}
