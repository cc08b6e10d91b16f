//! A DNS client for tests: asks a server from inside a network namespace.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use kiln_net::netns::NetNs;

/// A query for the A records of `name`, with message id `id`.
pub fn query(name: &str, id: u16) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.queries.push(Query::query(
        Name::from_ascii(name).expect("a DNS name"),
        RecordType::A,
    ));
    message.to_vec().expect("a query")
}

/// What a server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The response code (`NoError`, `NXDomain`, `Refused`, ...).
    pub code: String,
    /// The A records.
    pub addresses: Vec<Ipv4Addr>,
}

/// Asks `server` for the A records of `name` over UDP from inside `ns`; `None` if nothing
/// answered within two seconds.
pub fn ask(ns: &NetNs, server: SocketAddr, name: &str) -> Option<Answer> {
    let name = name.to_owned();
    ns.run_in(move || {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send_to(&query(&name, 0x4b1d), server)?;
        let mut buf = [0u8; 4096];
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(_) => return Ok(None),
        };
        let reply = Message::from_vec(&buf[..n]).map_err(std::io::Error::other)?;
        Ok(Some(Answer {
            code: format!("{:?}", reply.metadata.response_code),
            addresses: reply
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect(),
        }))
    })
    .expect("a thread in the namespace")
}
