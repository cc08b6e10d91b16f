//! The nftables rules kiln owns, as scripts for `nft -f -` (each applied atomically).
//!
//! Host: one `inet` table per daemon instance (never any other table): sandboxes reach the
//! daemon's service address on its service ports and nothing else of the host; their
//! traffic leaves only by the egress interface, masqueraded; nothing enters a sandbox that it
//! did not start, except the daemon's own connections (only root may connect to the pool).
//!
//! Sandbox namespace: a table of the same name holds its policy, so it lives and dies with
//! the namespace and survives a daemon crash: DNS to the daemon's resolver, the guest's
//! address translated to its link's, ingress from the daemon to the guest, and the egress
//! policy (always-denied ranges, deny list, allow list or internet) in chain `egress`.

use std::fmt::Write;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::policy::{AlwaysDenied, EgressPolicy};

/// Ports of the daemon's services on its service address.
pub const DNS_PORT: u16 = 53;
/// Plain HTTP egress proxy (by Host header).
pub const HTTP_PROXY_PORT: u16 = 80;
/// TLS egress proxy (by SNI).
pub const TLS_PROXY_PORT: u16 = 443;

/// Everything the host table needs.
#[derive(Debug, Clone)]
pub struct HostTable<'a> {
    /// Table name.
    pub table: &'a str,
    /// The pool.
    pub pool: Ipv4Net,
    /// The daemon's service address.
    pub service: Ipv4Addr,
    /// The only interface sandbox traffic may leave by.
    pub egress: Option<&'a str>,
    /// Drop forwarding from the egress interface to anything but the pool (kiln turned
    /// forwarding on for that interface: nothing else may ride on it).
    pub guard_egress_forwarding: bool,
}

fn set_elements(nets: &[Ipv4Net]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The host table, created or replaced as a whole.
pub fn host_table(t: &HostTable<'_>) -> String {
    let HostTable {
        table,
        pool,
        service,
        ..
    } = *t;
    let mut s = String::new();
    // `add` then `delete` then the definition: replaces an older version atomically.
    let _ = writeln!(s, "add table inet {table}");
    let _ = writeln!(s, "delete table inet {table}");
    let _ = writeln!(s, "table inet {table} {{");
    let _ = writeln!(
        s,
        "  set pool {{ type ipv4_addr; flags interval; elements = {{ {pool} }} }}"
    );
    let _ = writeln!(s, "  chain deny {{");
    let _ = writeln!(s, "    meta l4proto tcp reject with tcp reset");
    let _ = writeln!(s, "    reject with icmpx admin-prohibited");
    let _ = writeln!(s, "  }}");
    // Sandboxes reach the host only at the service address, on the service ports.
    let _ = writeln!(s, "  chain from_sandbox {{");
    let _ = writeln!(s, "    ct state established,related accept");
    let _ = writeln!(s, "    ip daddr {service} udp dport {DNS_PORT} accept");
    let _ = writeln!(
        s,
        "    ip daddr {service} tcp dport {{ {DNS_PORT}, {HTTP_PROXY_PORT}, {TLS_PROXY_PORT} }} accept"
    );
    let _ = writeln!(s, "    goto deny");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain input {{");
    let _ = writeln!(
        s,
        "    type filter hook input priority filter - 5; policy accept;"
    );
    let _ = writeln!(s, "    ip saddr @pool jump from_sandbox");
    // The service address answers sandboxes only (and the host itself); replies to the
    // proxy's own connections come back to it.
    let _ = writeln!(
        s,
        "    ip daddr {service} ct state established,related accept"
    );
    let _ = writeln!(s, "    ip daddr {service} iifname != \"lo\" drop");
    let _ = writeln!(s, "  }}");
    // Out of a sandbox: only by the egress interface, never to another sandbox; back in:
    // only what a sandbox started.
    let _ = writeln!(s, "  chain forward {{");
    let _ = writeln!(
        s,
        "    type filter hook forward priority filter - 5; policy accept;"
    );
    let _ = writeln!(s, "    ip saddr @pool jump out_of_sandbox");
    let _ = writeln!(s, "    ip daddr @pool jump into_sandbox");
    if t.guard_egress_forwarding {
        if let Some(egress) = t.egress {
            let _ = writeln!(s, "    iifname \"{egress}\" drop");
        }
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain out_of_sandbox {{");
    let _ = writeln!(s, "    ip daddr @pool drop");
    match t.egress {
        Some(egress) => {
            let _ = writeln!(s, "    oifname != \"{egress}\" drop");
            let _ = writeln!(s, "    accept");
        }
        // No egress route: nothing leaves.
        None => {
            let _ = writeln!(s, "    drop");
        }
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain into_sandbox {{");
    let _ = writeln!(s, "    ct state established,related accept");
    let _ = writeln!(s, "    drop");
    let _ = writeln!(s, "  }}");
    // Only the daemon (root) connects to sandboxes (ingress); no local user does.
    let _ = writeln!(s, "  chain output {{");
    let _ = writeln!(
        s,
        "    type filter hook output priority filter - 5; policy accept;"
    );
    let _ = writeln!(s, "    ip daddr @pool meta skuid != 0 goto deny");
    let _ = writeln!(s, "  }}");
    if let Some(egress) = t.egress {
        let _ = writeln!(s, "  chain postrouting {{");
        let _ = writeln!(
            s,
            "    type nat hook postrouting priority srcnat - 5; policy accept;"
        );
        let _ = writeln!(s, "    ip saddr @pool oifname \"{egress}\" masquerade");
        let _ = writeln!(s, "  }}");
    }
    let _ = writeln!(s, "}}");
    s
}

/// Names and addresses of one sandbox namespace's wiring.
#[derive(Debug, Clone)]
pub struct SandboxTable<'a> {
    /// Table name.
    pub table: &'a str,
    /// The guest's tap.
    pub tap: &'a str,
    /// The namespace's end of the veth pair.
    pub uplink: &'a str,
    /// The guest's (fixed) address.
    pub guest: Ipv4Addr,
    /// The guest's gateway, which is also its DNS server.
    pub gateway: Ipv4Addr,
    /// The namespace's end of the link (what the guest's traffic leaves with).
    pub link: Ipv4Addr,
    /// The daemon's service address.
    pub service: Ipv4Addr,
    /// What no policy opens.
    pub always: &'a AlwaysDenied,
}

/// The hook of chain `spoofed`: before conntrack and NAT.
const SPOOFED_HOOK: &str = "type filter hook prerouting priority raw; policy accept;";

/// The rule of chain `spoofed`: what comes from the guest with another source is dropped.
fn spoofed_rule(tap: &str, guest: Ipv4Addr) -> String {
    format!("iifname \"{tap}\" ip saddr != {guest} drop")
}

/// The hook of chain `untranslated`: after source NAT (`srcnat`, 100).
const UNTRANSLATED_HOOK: &str = "type filter hook postrouting priority 110; policy accept;";

/// The rule of chain `untranslated`: what leaves the link untranslated is dropped.
fn untranslated_rule(uplink: &str, link: Ipv4Addr) -> String {
    format!("oifname \"{uplink}\" ip saddr != {link} counter drop")
}

/// Puts chains `spoofed` and `untranslated` (as [`sandbox_table`] makes them) into a
/// sandbox's table that may lack them: a namespace wired by an earlier daemon, adopted.
/// Running it again changes nothing.
pub fn guard_chains(t: &SandboxTable<'_>) -> String {
    let table = t.table;
    let mut s = String::new();
    for (chain, hook, rule) in [
        ("spoofed", SPOOFED_HOOK, spoofed_rule(t.tap, t.guest)),
        (
            "untranslated",
            UNTRANSLATED_HOOK,
            untranslated_rule(t.uplink, t.link),
        ),
    ] {
        let _ = writeln!(s, "add chain inet {table} {chain} {{ {hook} }}");
        let _ = writeln!(s, "flush chain inet {table} {chain}");
        let _ = writeln!(s, "add rule inet {table} {chain} {rule}");
    }
    s
}

/// The sandbox namespace's table (in a fresh namespace), with `policy` in force.
pub fn sandbox_table(t: &SandboxTable<'_>, policy: &EgressPolicy) -> String {
    let SandboxTable {
        table,
        tap,
        uplink,
        guest,
        gateway,
        link,
        service,
        always,
    } = *t;
    let mut s = String::new();
    let _ = writeln!(s, "table inet {table} {{");
    let _ = writeln!(
        s,
        "  set always {{ type ipv4_addr; flags interval; elements = {{ {} }} }}",
        set_elements(&always.nets)
    );
    let _ = writeln!(s, "  set allow {{ type ipv4_addr; flags interval; }}");
    let _ = writeln!(s, "  set deny {{ type ipv4_addr; flags interval; }}");
    // Addresses kiln's resolver answered for allowed names, for their time to live.
    let _ = writeln!(s, "  set resolved {{ type ipv4_addr; flags timeout; }}");
    let _ = writeln!(s, "  chain deny {{");
    let _ = writeln!(s, "    meta l4proto tcp reject with tcp reset");
    let _ = writeln!(s, "    reject with icmpx admin-prohibited");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain proxy {{");
    let _ = writeln!(s, "  }}");
    // A guest sends only from its own address: anything else (another sandbox's, the LAN's,
    // the host's) is dropped before conntrack or NAT sees it, so it can neither leave
    // unmasqueraded nor draw replies to someone else.
    let _ = writeln!(s, "  chain spoofed {{");
    let _ = writeln!(s, "    {SPOOFED_HOOK}");
    let _ = writeln!(s, "    {}", spoofed_rule(tap, guest));
    let _ = writeln!(s, "  }}");
    // What conntrack finds invalid (an echo reply or a TCP segment of no connection) skips
    // source NAT: after it, anything leaving the link with another source than the link's
    // is dropped (and counted).
    let _ = writeln!(s, "  chain untranslated {{");
    let _ = writeln!(s, "    {UNTRANSLATED_HOOK}");
    let _ = writeln!(s, "    {}", untranslated_rule(uplink, link));
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain prerouting {{");
    let _ = writeln!(
        s,
        "    type nat hook prerouting priority dstnat; policy accept;"
    );
    // All DNS goes to kiln's resolver, whatever server the guest asks.
    for proto in ["udp", "tcp"] {
        let _ = writeln!(
            s,
            "    iifname \"{tap}\" {proto} dport {DNS_PORT} dnat ip to {service}:{DNS_PORT}"
        );
    }
    let _ = writeln!(s, "    iifname \"{tap}\" jump proxy");
    // The daemon's connections to the link's address reach the guest.
    let _ = writeln!(
        s,
        "    iifname \"{uplink}\" ip daddr {link} dnat ip to {guest}"
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain postrouting {{");
    let _ = writeln!(
        s,
        "    type nat hook postrouting priority srcnat; policy accept;"
    );
    let _ = writeln!(
        s,
        "    oifname \"{uplink}\" ip saddr {guest} snat ip to {link}"
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain forward {{");
    let _ = writeln!(
        s,
        "    type filter hook forward priority filter; policy drop;"
    );
    let _ = writeln!(s, "    ct state established,related accept");
    let _ = writeln!(
        s,
        "    iifname \"{uplink}\" oifname \"{tap}\" ct status dnat accept"
    );
    let _ = writeln!(s, "    iifname \"{tap}\" oifname \"{uplink}\" jump egress");
    let _ = writeln!(s, "    goto deny");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain egress {{");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain input {{");
    let _ = writeln!(
        s,
        "    type filter hook input priority filter; policy drop;"
    );
    let _ = writeln!(s, "    iifname \"lo\" accept");
    let _ = writeln!(s, "    ct state established,related accept");
    // The guest's gateway answers pings, nothing else.
    let _ = writeln!(
        s,
        "    iifname \"{tap}\" ip daddr {gateway} icmp type echo-request accept"
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    s.push_str(&policy_script(table, service, policy));
    s
}

/// Puts `policy` in force in a sandbox namespace's table, atomically: its sets and its
/// `egress` and `proxy` chains are replaced in one transaction.
pub fn policy_script(table: &str, service: Ipv4Addr, policy: &EgressPolicy) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "flush set inet {table} allow");
    let _ = writeln!(s, "flush set inet {table} deny");
    let _ = writeln!(s, "flush chain inet {table} egress");
    let _ = writeln!(s, "flush chain inet {table} proxy");
    let allow = EgressPolicy::nets(&policy.allow_out);
    let deny = EgressPolicy::nets(&policy.deny_out);
    if !allow.is_empty() {
        let _ = writeln!(
            s,
            "add element inet {table} allow {{ {} }}",
            set_elements(&Ipv4Net::aggregate(&allow))
        );
    }
    if !deny.is_empty() {
        let _ = writeln!(
            s,
            "add element inet {table} deny {{ {} }}",
            set_elements(&Ipv4Net::aggregate(&deny))
        );
    }
    let rule = |s: &mut String, chain: &str, text: &str| {
        let _ = writeln!(s, "add rule inet {table} {chain} {text}");
    };
    rule(&mut s, "egress", "meta nfproto ipv6 goto deny");
    // DNS is the daemon's, and not counted as a connection.
    rule(
        &mut s,
        "egress",
        &format!("ip daddr {service} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} accept"),
    );
    if let Some(max) = policy.max_connections {
        // Flows this sandbox has open (proxied ones included), refused past the limit.
        rule(
            &mut s,
            "egress",
            &format!("ct state new ct count over {max} goto deny"),
        );
    }
    // The proxies (after their translation) are the daemon's.
    rule(&mut s, "egress", &format!("ip daddr {service} accept"));
    // DNS over TLS would bypass the resolver.
    rule(&mut s, "egress", "tcp dport 853 goto deny");
    rule(&mut s, "egress", "ip daddr @always goto deny");
    rule(&mut s, "egress", "ip daddr @deny goto deny");
    if policy.has_names() {
        // Names are checked on HTTP and TLS by the proxy, which connects to what it
        // resolved itself; QUIC, which it cannot read, is refused.
        rule(&mut s, "egress", "udp dport 443 goto deny");
        for (port, proxy) in [(80, HTTP_PROXY_PORT), (443, TLS_PROXY_PORT)] {
            rule(
                &mut s,
                "proxy",
                &format!("tcp dport {port} ip daddr != @allow dnat ip to {service}:{proxy}"),
            );
        }
    }
    if policy.internet {
        rule(&mut s, "egress", "accept");
    } else {
        rule(&mut s, "egress", "ip daddr @allow accept");
        rule(&mut s, "egress", "ip daddr @resolved accept");
        rule(&mut s, "egress", "goto deny");
    }
    s
}

/// Lets `addresses` (answers of kiln's resolver for an allowed name) through for `ttl`
/// seconds.
pub fn resolved_script(table: &str, addresses: &[Ipv4Addr], ttl: u32) -> String {
    let elements: Vec<String> = addresses
        .iter()
        .map(|a| format!("{a} timeout {ttl}s"))
        .collect();
    format!(
        "add element inet {table} resolved {{ {} }}\n",
        elements.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Destination;

    fn table<'a>(always: &'a AlwaysDenied) -> SandboxTable<'a> {
        SandboxTable {
            table: "kiln",
            tap: "tap0",
            uplink: "up0",
            guest: Ipv4Addr::new(172, 31, 255, 2),
            gateway: Ipv4Addr::new(172, 31, 255, 1),
            link: Ipv4Addr::new(10, 251, 0, 3),
            service: Ipv4Addr::new(10, 251, 0, 1),
            always,
        }
    }

    #[test]
    fn internet_off_allows_only_what_is_listed() {
        let always = AlwaysDenied::new("10.251.0.0/16".parse().expect("net"), false, &[]);
        let policy = EgressPolicy {
            internet: false,
            allow_out: vec![Destination::parse("203.0.113.0/24").expect("net")],
            deny_out: vec![Destination::parse("203.0.113.7").expect("net")],
            bandwidth_mbit: None,
            max_connections: None,
        };
        let script = sandbox_table(&table(&always), &policy);
        assert!(script.contains("add element inet kiln allow { 203.0.113.0/24 }"));
        assert!(script.contains("add element inet kiln deny { 203.0.113.7/32 }"));
        let egress: Vec<&str> = script
            .lines()
            .filter(|l| l.starts_with("add rule inet kiln egress"))
            .collect();
        let deny_at = egress
            .iter()
            .position(|l| l.contains("@deny"))
            .expect("deny");
        let allow_at = egress
            .iter()
            .position(|l| l.contains("@allow accept"))
            .expect("allow");
        assert!(deny_at < allow_at, "deny wins: {egress:?}");
        assert!(egress.last().expect("rules").ends_with("goto deny"));
        assert!(!script.contains("udp dport 443"), "no names, no QUIC rule");
        assert!(script.contains("snat ip to 10.251.0.3"));
        assert!(script.contains("dnat ip to 10.251.0.1:53"));
    }

    #[test]
    fn a_guest_sends_only_from_its_own_address() {
        let always = AlwaysDenied::new("10.251.0.0/16".parse().expect("pool"), false, &[]);
        let table = sandbox_table(&table(&always), &EgressPolicy::open(true));
        let chain = table
            .split("chain spoofed {")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .expect("a spoofed chain");
        assert!(chain.contains("hook prerouting priority raw"), "{chain}");
        assert!(
            chain.contains("iifname \"tap0\" ip saddr != 172.31.255.2 drop"),
            "{chain}"
        );
        let chain = table
            .split("chain untranslated {")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .expect("an untranslated chain");
        assert!(chain.contains("hook postrouting priority 110"), "{chain}");
        assert!(
            chain.contains("oifname \"up0\" ip saddr != 10.251.0.3 counter drop"),
            "{chain}"
        );
    }

    #[test]
    fn the_guard_chains_of_an_adopted_namespace_are_put_in_whole_and_once() {
        let always = AlwaysDenied::new("10.251.0.0/16".parse().expect("pool"), false, &[]);
        let script = guard_chains(&table(&always));
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines.len(), 6, "{script}");
        assert!(lines[0].starts_with(
            "add chain inet kiln spoofed { type filter hook prerouting priority raw;"
        ));
        assert_eq!(
            lines[1], "flush chain inet kiln spoofed",
            "run again, it replaces"
        );
        assert_eq!(
            lines[2],
            "add rule inet kiln spoofed iifname \"tap0\" ip saddr != 172.31.255.2 drop"
        );
        assert!(lines[3].starts_with(
            "add chain inet kiln untranslated { type filter hook postrouting priority 110;"
        ));
        assert_eq!(lines[4], "flush chain inet kiln untranslated");
        assert_eq!(
            lines[5],
            "add rule inet kiln untranslated oifname \"up0\" ip saddr != 10.251.0.3 counter drop"
        );
    }

    #[test]
    fn names_send_http_and_tls_to_the_proxy_and_refuse_quic() {
        let policy = EgressPolicy {
            internet: true,
            allow_out: Vec::new(),
            deny_out: vec![Destination::parse("bad.example.test").expect("name")],
            bandwidth_mbit: None,
            max_connections: None,
        };
        let script = policy_script("kiln", Ipv4Addr::new(10, 251, 0, 1), &policy);
        assert!(script.contains("udp dport 443 goto deny"));
        assert!(script.contains("tcp dport 443 ip daddr != @allow dnat ip to 10.251.0.1:443"));
        assert!(script
            .lines()
            .any(|l| l == "add rule inet kiln egress accept"));
        let resolved = resolved_script("kiln", &[Ipv4Addr::new(203, 0, 113, 5)], 30);
        assert_eq!(
            resolved,
            "add element inet kiln resolved { 203.0.113.5 timeout 30s }\n"
        );
    }

    #[test]
    fn a_connection_limit_counts_all_but_dns() {
        let service = Ipv4Addr::new(10, 251, 0, 1);
        let unlimited = policy_script("kiln", service, &EgressPolicy::open(true));
        assert!(!unlimited.contains("ct count"));
        let limited = policy_script(
            "kiln",
            service,
            &EgressPolicy {
                max_connections: Some(64),
                ..EgressPolicy::open(true)
            },
        );
        let egress: Vec<&str> = limited
            .lines()
            .filter(|l| l.starts_with("add rule inet kiln egress"))
            .collect();
        let at = |needle: &str| {
            egress
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle}: {egress:?}"))
        };
        assert!(at("th dport 53 accept") < at("ct count over 64 goto deny"));
        assert!(
            at("ct count over 64") < at("ip daddr 10.251.0.1 accept"),
            "proxied flows count"
        );
        assert!(at("ct count over 64") < at("egress accept"));
    }

    #[test]
    fn the_host_table_guards_the_host_and_other_sandboxes() {
        let script = host_table(&HostTable {
            table: "kiln",
            pool: "10.251.0.0/16".parse().expect("net"),
            service: Ipv4Addr::new(10, 251, 0, 1),
            egress: Some("eth0"),
            guard_egress_forwarding: true,
        });
        for expected in [
            "ip saddr @pool jump from_sandbox",
            "ip daddr 10.251.0.1 udp dport 53 accept",
            "oifname != \"eth0\" drop",
            "ip daddr @pool meta skuid != 0 goto deny",
            "ip saddr @pool oifname \"eth0\" masquerade",
            "iifname \"eth0\" drop",
        ] {
            assert!(script.contains(expected), "missing {expected}:\n{script}");
        }
        let closed = host_table(&HostTable {
            table: "kiln",
            pool: "10.251.0.0/16".parse().expect("net"),
            service: Ipv4Addr::new(10, 251, 0, 1),
            egress: None,
            guard_egress_forwarding: false,
        });
        assert!(!closed.contains("masquerade") && closed.contains("    drop\n"));
    }
}
