//! Per-sandbox networking: every sandbox gets its own network namespace holding the tap its
//! guest's NIC is attached to. The same guest address is used in every clone: namespaces
//! keep them apart. NAT egress, policy and ingress build on this (networking issue).

pub mod iface;
pub mod netns;
pub mod tap;

use std::net::Ipv4Addr;

/// The guest's address, the same in every sandbox.
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 2);
/// The host side of the guest's link (the tap), the guest's gateway.
pub const GATEWAY_ADDRESS: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 1);
/// Prefix length of the guest's link.
pub const PREFIX_LEN: u8 = 30;
/// The guest NIC's MAC address, the same in every sandbox (locally administered).
pub const GUEST_MAC: &str = "02:6b:69:6c:6e:01";
/// The gateway's (the tap's) MAC address, the same in every sandbox: a guest restored or
/// forked with the gateway in its neighbour cache reaches it in its new namespace at once.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x6b, 0x69, 0x6c, 0x6e, 0x02];
/// Name of the tap in each sandbox namespace.
pub const TAP_NAME: &str = "tap0";
