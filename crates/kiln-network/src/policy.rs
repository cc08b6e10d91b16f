//! A sandbox's egress policy: whether it may reach the internet, what it may reach anyway
//! (`allow_out`), what it may never reach (`deny_out`, which wins), and the ranges no policy
//! can open.
//!
//! Entries are CIDRs (`203.0.113.0/24`, or an address for a /32), domain names
//! (`example.test`) or wildcards (`*.example.test`, which matches every name below
//! `example.test` but **not** `example.test` itself: list both to allow both).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::NetworkError;

/// Most entries in `allow_out` or `deny_out`.
pub const MAX_ENTRIES: usize = 256;

/// Longest entry, in bytes (a domain name's longest presentation form).
pub const MAX_ENTRY_LEN: usize = 253;

/// What [`Destination::parse`] accepts, as an ECMA-262 (and Python) pattern for the API's
/// document, together with [`MAX_ENTRY_LEN`]: an IPv4 address or CIDR (decimal octets
/// without leading zeros), or a name or wildcard of labels of letters, digits, `_` and
/// inner `-` (1 to 63 each) with at most one trailing dot. A property test holds the two
/// to each other.
pub const ENTRY_PATTERN: &str = concat!(
    "^(",
    "((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])",
    "(/(3[0-2]|[12]?[0-9]))?",
    "|(\\*\\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?",
    "(\\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\\.?",
    ")$"
);

/// Where a sandbox may (or may not) connect to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// Addresses.
    Net(Ipv4Net),
    /// One domain name, exactly.
    Domain(String),
    /// Every name below a domain (`*.example.test`: `a.example.test`, `b.a.example.test`).
    Below(String),
}

impl Destination {
    /// Parses an entry, exactly as given (no spaces around it).
    pub fn parse(entry: &str) -> Result<Destination, String> {
        if entry.len() > MAX_ENTRY_LEN {
            return Err(format!(
                "`{entry}` is longer than {MAX_ENTRY_LEN} bytes, the longest a name may be"
            ));
        }
        if entry.contains(':') {
            return Err(format!(
                "`{entry}`: IPv6 is disabled for sandboxes; only IPv4 addresses and names"
            ));
        }
        if let Some((address, prefix)) = entry.split_once('/') {
            // Decimal, without leading zeros (`/08` is refused, as the document says).
            return match (address.parse(), prefix.parse::<u8>()) {
                (Ok(address), Ok(len)) if prefix == len.to_string() => Ipv4Net::new(address, len)
                    .map(|net| Destination::Net(net.trunc()))
                    .map_err(|_| format!("`{entry}`: a prefix length is 0 to 32")),
                _ => Err(format!(
                    "`{entry}` is not a CIDR (an IPv4 address, `/` and a prefix length of 0 to 32)"
                )),
            };
        }
        if let Ok(address) = entry.parse::<Ipv4Addr>() {
            return Ok(Destination::Net(Ipv4Net::from(address)));
        }
        if let Some(domain) = entry.strip_prefix("*.") {
            return valid_name(domain).map(Destination::Below);
        }
        valid_name(entry).map(Destination::Domain)
    }

    /// Whether `name` (lowercase, no trailing dot) is this entry's.
    pub fn matches_name(&self, name: &str) -> bool {
        match self {
            Destination::Net(_) => false,
            Destination::Domain(domain) => name == domain,
            Destination::Below(domain) => name
                .strip_suffix(domain.as_str())
                .is_some_and(|prefix| prefix.ends_with('.') && prefix.len() > 1),
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Net(net) if net.prefix_len() == 32 => write!(f, "{}", net.addr()),
            Destination::Net(net) => write!(f, "{net}"),
            Destination::Domain(name) => write!(f, "{name}"),
            Destination::Below(name) => write!(f, "*.{name}"),
        }
    }
}

impl serde::Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Destination::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A domain name as kiln compares them: lowercase, no trailing dot, labels of letters,
/// digits and hyphens.
fn valid_name(name: &str) -> Result<String, String> {
    let lower = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let ok = !lower.is_empty()
        && lower.len() <= 253
        && lower.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(lower)
    } else {
        Err(format!(
            "`{name}` is neither an IPv4 address or CIDR nor a domain name (`example.test`, `*.example.test`)"
        ))
    }
}

/// A sandbox's egress policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EgressPolicy {
    /// Everything not denied is reachable; `false`: only what `allow_out` names.
    pub internet: bool,
    /// Reachable even without internet.
    #[serde(default)]
    pub allow_out: Vec<Destination>,
    /// Never reachable (wins over `allow_out`).
    #[serde(default)]
    pub deny_out: Vec<Destination>,
    /// Most bandwidth each way (to the sandbox and from it), in Mbit/s; `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbit: Option<u32>,
    /// Most connections (TCP, UDP and other flows, DNS to kiln's resolver aside) the
    /// sandbox may have open at once; a new one past it is refused. `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// The largest bandwidth limit, in Mbit/s.
pub const MAX_BANDWIDTH_MBIT: u32 = 100_000;

/// The largest connection limit.
pub const MAX_CONNECTIONS: u32 = 1_000_000;

impl EgressPolicy {
    /// Internet on or off, nothing listed.
    pub fn open(internet: bool) -> EgressPolicy {
        EgressPolicy {
            internet,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
            bandwidth_mbit: None,
            max_connections: None,
        }
    }

    /// Whether any entry is a name: then DNS answers and HTTP(S) names are checked.
    pub fn has_names(&self) -> bool {
        self.allow_out
            .iter()
            .chain(&self.deny_out)
            .any(|d| !matches!(d, Destination::Net(_)))
    }

    /// The CIDRs of `allow_out` (or `deny_out`).
    pub fn nets(list: &[Destination]) -> Vec<Ipv4Net> {
        list.iter()
            .filter_map(|d| match d {
                Destination::Net(net) => Some(*net),
                _ => None,
            })
            .collect()
    }

    /// Whether `name` may be resolved and connected to by name: not denied, and allowed
    /// (by internet or by a listed name).
    pub fn allows_name(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if self.deny_out.iter().any(|d| d.matches_name(&name)) {
            return false;
        }
        self.internet || self.allow_out.iter().any(|d| d.matches_name(&name))
    }
}

/// What no policy can open: kiln's own ranges and the host's (checked separately, by the
/// host's table), and those the operator set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlwaysDenied {
    /// The ranges.
    pub nets: Vec<Ipv4Net>,
}

impl AlwaysDenied {
    /// This-network, loopback, link-local (cloud metadata), multicast and reserved; the
    /// daemon's pool (other sandboxes); by default (unless `allow_private`) RFC 1918 and
    /// shared address space (an operator's LAN); and `extra`.
    pub fn new(pool: Ipv4Net, allow_private: bool, extra: &[Ipv4Net]) -> AlwaysDenied {
        let mut nets: Vec<Ipv4Net> = [
            "0.0.0.0/8",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "224.0.0.0/4",
            "240.0.0.0/4",
        ]
        .iter()
        .map(|n| n.parse().unwrap_or_else(|_| Ipv4Net::default()))
        .collect();
        if !allow_private {
            for n in [
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
            ] {
                nets.push(n.parse().unwrap_or_else(|_| Ipv4Net::default()));
            }
        }
        nets.push(pool);
        nets.extend(extra);
        AlwaysDenied {
            nets: Ipv4Net::aggregate(&nets),
        }
    }

    /// Whether `address` is in one of the ranges.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        self.nets.iter().any(|net| net.contains(&address))
    }

    /// Checks a policy: a CIDR it allows must not overlap what is always denied.
    pub fn check(&self, policy: &EgressPolicy) -> Result<(), NetworkError> {
        if policy
            .bandwidth_mbit
            .is_some_and(|mbit| !(1..=MAX_BANDWIDTH_MBIT).contains(&mbit))
        {
            return Err(NetworkError::Policy(format!(
                "bandwidth_mbit is 1 to {MAX_BANDWIDTH_MBIT}"
            )));
        }
        if policy
            .max_connections
            .is_some_and(|count| !(1..=MAX_CONNECTIONS).contains(&count))
        {
            return Err(NetworkError::Policy(format!(
                "max_connections is 1 to {MAX_CONNECTIONS}"
            )));
        }
        for list in [&policy.allow_out, &policy.deny_out] {
            if list.len() > MAX_ENTRIES {
                return Err(NetworkError::Policy(format!(
                    "at most {MAX_ENTRIES} entries in allow_out and in deny_out"
                )));
            }
        }
        for net in EgressPolicy::nets(&policy.allow_out) {
            if let Some(denied) = self
                .nets
                .iter()
                .find(|d| d.contains(&net) || net.contains(*d))
            {
                return Err(NetworkError::Policy(format!(
                    "allow_out `{net}` is inside {denied}, which is always denied (loopback, link-local and metadata, private ranges unless the operator opens them, other sandboxes)"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dest(text: &str) -> Destination {
        Destination::parse(text).expect(text)
    }

    fn documented(entry: &str) -> bool {
        static PATTERN: std::sync::LazyLock<regex::Regex> =
            std::sync::LazyLock::new(|| regex::Regex::new(ENTRY_PATTERN).expect("pattern"));
        entry.len() <= MAX_ENTRY_LEN && PATTERN.is_match(entry)
    }

    #[test]
    fn the_documented_pattern_is_what_parses() {
        for (entry, ok) in [
            ("203.0.113.7", true),
            ("203.0.113.0/24", true),
            ("0.0.0.0/0", true),
            ("example.test", true),
            ("Example.TEST.", true),
            ("*.example.test", true),
            ("1.2.3.4.", true),
            ("010.0.0.1", true),
            ("_dmarc.example.test", true),
            ("1.2.3.4/33", false),
            ("10.0.0.0/08", false),
            ("10.0.0.0/024", false),
            ("1.2.3.4/", false),
            ("example.test..", false),
            (" example.test", false),
            ("-a.test", false),
            ("a-.test", false),
            ("*.", false),
            ("", false),
            ("::1", false),
            ("a..b", false),
        ] {
            assert_eq!(Destination::parse(entry).is_ok(), ok, "{entry:?}");
            assert_eq!(documented(entry), ok, "{entry:?}");
        }
        let label = "a".repeat(63);
        let long = [label.as_str(); 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(Destination::parse(&long).is_err() && !documented(&long));
        assert!(Destination::parse(&long[2..]).is_ok() && documented(&long[2..]));
        let wide = format!("{}.test", "a".repeat(64));
        assert!(Destination::parse(&wide).is_err() && !documented(&wide));
    }

    proptest! {
        /// Whatever the document's pattern allows parses, and whatever parses the pattern
        /// allows: the API's contract is exact both ways.
        #[test]
        fn pattern_and_parser_agree_on_generated_entries(
            entry in prop_oneof![
                "(((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(/[0-9]{1,3})?)",
                "(\\*\\.)?[A-Za-z0-9_-]{0,70}(\\.[A-Za-z0-9_-]{0,8}){0,4}\\.{0,2}",
                "[0-9a-zA-Z.*/_: -]{0,24}",
            ]
        ) {
            prop_assert_eq!(Destination::parse(&entry).is_ok(), documented(&entry), "{:?}", entry);
        }
    }

    #[test]
    fn entries_parse_and_print_back() {
        for (text, shown) in [
            ("203.0.113.0/24", "203.0.113.0/24"),
            ("203.0.113.9/24", "203.0.113.0/24"),
            ("198.51.100.7", "198.51.100.7"),
            ("Example.TEST.", "example.test"),
            ("*.example.test", "*.example.test"),
        ] {
            assert_eq!(dest(text).to_string(), shown);
        }
        for bad in [
            "",
            "*.",
            "a..b",
            "-a.test",
            "2001:db8::/32",
            "::1",
            "exa mple.test",
            "*.*.x",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
        let json = serde_json::json!({"internet": false, "allow_out": ["*.example.test", "203.0.113.0/24"]});
        let policy: EgressPolicy = serde_json::from_value(json.clone()).expect("policy");
        assert_eq!(
            serde_json::to_value(&policy).expect("json")["allow_out"],
            json["allow_out"]
        );
        assert!(serde_json::from_value::<EgressPolicy>(
            serde_json::json!({"internet": true, "allow_out": ["fe80::/10"]})
        )
        .is_err());
    }

    #[test]
    fn wildcards_match_below_not_the_apex_and_deny_wins() {
        let below = dest("*.example.test");
        assert!(below.matches_name("a.example.test"));
        assert!(below.matches_name("b.a.example.test"));
        assert!(!below.matches_name("example.test"), "not the apex");
        assert!(!below.matches_name("badexample.test"));
        let policy = EgressPolicy {
            internet: false,
            allow_out: vec![dest("*.example.test"), dest("example.test")],
            deny_out: vec![dest("bad.example.test")],
            bandwidth_mbit: None,
            max_connections: None,
        };
        assert!(policy.allows_name("Example.Test."));
        assert!(policy.allows_name("ok.example.test"));
        assert!(!policy.allows_name("bad.example.test"), "deny wins");
        assert!(!policy.allows_name("other.test"));
        assert!(EgressPolicy::open(true).allows_name("other.test"));
        assert!(policy.has_names() && !EgressPolicy::open(true).has_names());
    }

    #[test]
    fn allowing_what_is_always_denied_is_refused() {
        let pool: Ipv4Net = "10.251.0.0/16".parse().expect("net");
        let always = AlwaysDenied::new(pool, false, &["192.0.2.128/25".parse().expect("net")]);
        assert!(always.contains(Ipv4Addr::new(169, 254, 169, 254)));
        assert!(always.contains(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(always.contains(Ipv4Addr::new(192, 0, 2, 200)));
        assert!(!always.contains(Ipv4Addr::new(203, 0, 113, 5)));
        for bad in [
            "169.254.169.254",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "192.0.2.129",
            "10.251.0.3",
        ] {
            let policy = EgressPolicy {
                internet: false,
                allow_out: vec![dest(bad)],
                deny_out: Vec::new(),
                bandwidth_mbit: None,
                max_connections: None,
            };
            let err = always.check(&policy).expect_err(bad);
            assert!(
                matches!(&err, NetworkError::Policy(m) if m.contains("always denied")),
                "{err}"
            );
        }
        let fine = EgressPolicy {
            internet: false,
            allow_out: vec![dest("203.0.113.0/24")],
            deny_out: vec![dest("10.0.0.0/8")],
            bandwidth_mbit: None,
            max_connections: None,
        };
        always.check(&fine).expect("allowed");
        // The operator can open private ranges (but never the pool).
        let open = AlwaysDenied::new(pool, true, &[]);
        assert!(!open.contains(Ipv4Addr::new(192, 168, 1, 1)));
        assert!(open.contains(Ipv4Addr::new(10, 251, 3, 3)));
    }
}
