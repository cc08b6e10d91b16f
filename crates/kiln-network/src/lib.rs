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
pub mod nft;
pub mod policy;
pub mod pool;

use std::net::Ipv4Addr;
use std::sync::Mutex;

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
        let network = Network {
            always: AlwaysDenied::new(pool, config.allow_private, &config.denied),
            table: config.table(),
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
        match self.wire_slot(ns, slot, policy) {
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
        Ok(link)
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
        cmd::nft(
            Place::Namespace(netns.as_fd()),
            &nft::policy_script(&self.table, self.service, policy),
        )?;
        self.cut_denied(netns.as_fd(), policy)
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
    /// adopting it.
    pub fn adopt(&self, ns: &NetNs) -> Result<Link, NetworkError> {
        let netns = ns.open().map_err(|e| NetworkError::Io {
            context: "opening the sandbox namespace".into(),
            source: e,
        })?;
        use std::os::fd::AsFd;
        let out = cmd::run(
            Place::Namespace(netns.as_fd()),
            "ip",
            &["-j", "-4", "addr", "show", "dev", UPLINK],
            "",
        )?;
        let address = serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| {
                v[0]["addr_info"][0]["local"]
                    .as_str()
                    .and_then(|a| a.parse::<Ipv4Addr>().ok())
            })
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
        Ok(self.link(slot))
    }

    /// Forgets `link` once its namespace is gone (which took both ends of its veth pair and
    /// its table with it): the host's tracked connections of its address are deleted, then
    /// its slot is free again (reused last).
    pub fn release(&self, link: Link) {
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
