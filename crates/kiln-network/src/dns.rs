//! The resolver every sandbox asks (its namespace sends all DNS to the daemon's service
//! address). A name the sandbox's policy does not allow does not resolve (`REFUSED` for a
//! denied name, `NXDOMAIN` for one outside an allow list); an allowed one is forwarded to the
//! configured upstreams, its answers stripped of addresses no sandbox may reach (so a name
//! cannot be rebound to the host, the metadata service or the LAN), and, where the policy
//! lists names, the addresses answered join the sandbox's set of reachable addresses for
//! their time to live before the answer goes back. AAAA gets an empty answer (sandboxes
//! have no IPv6).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::Network;

/// How long an upstream may take to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Bounds on how long a resolved address stays reachable (a record's TTL, clamped).
const MIN_ALLOW_SECS: u32 = 60;
const MAX_ALLOW_SECS: u32 = 3600;
/// Largest DNS message handled over TCP.
const MAX_TCP_MESSAGE: usize = 65_535;
/// Queries handled at once (the rest wait).
const MAX_IN_FLIGHT: usize = 256;

/// The upstream resolvers of the host: the IPv4 `nameserver` lines of `resolv_conf`.
pub fn host_upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .map(|address| SocketAddr::from((address, 53)))
        .collect()
}

/// Serves DNS on `udp` and `tcp` until the task is dropped.
pub async fn serve(network: Arc<Network>, udp: UdpSocket, tcp: TcpListener) {
    let udp = Arc::new(udp);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let tcp_network = Arc::clone(&network);
    let tcp_limit = Arc::clone(&limit);
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = tcp.accept().await else {
                continue;
            };
            let Ok(permit) = Arc::clone(&tcp_limit).acquire_owned().await else {
                return;
            };
            let network = Arc::clone(&tcp_network);
            tokio::spawn(async move {
                let _permit = permit;
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), serve_tcp(network, stream, peer))
                        .await;
            });
        }
    });
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            break;
        };
        let query = buf[..n].to_vec();
        let (network, udp) = (Arc::clone(&network), Arc::clone(&udp));
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = answer(&network, peer, &query).await {
                let _ = udp.send_to(&reply, peer).await;
            }
        });
    }
    tcp_task.abort();
}

async fn serve_tcp(network: Arc<Network>, mut stream: TcpStream, peer: SocketAddr) {
    loop {
        let Ok(len) = stream.read_u16().await else {
            return;
        };
        let mut query = vec![0u8; usize::from(len)];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        let Some(reply) = answer(&network, peer, &query).await else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        if stream.write_u16(len).await.is_err() || stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

fn reply_with(request: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut reply = Message::error_msg(request.metadata.id, request.metadata.op_code, code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = request.queries.clone();
    reply.to_vec().ok()
}

/// The answer to `query` from the sandbox at `peer` (`None`: not worth answering).
async fn answer(network: &Network, peer: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let SocketAddr::V4(peer) = peer else {
        return None;
    };
    let Some(sandbox) = network.sandbox_at(*peer.ip()) else {
        return reply_with(&request, ResponseCode::Refused);
    };
    if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
        return reply_with(&request, ResponseCode::NotImp);
    }
    let question = &request.queries[0];
    let name = question.name.to_lowercase().to_ascii();
    let name = name.trim_end_matches('.');
    let policy = sandbox.policy();
    if !policy.allows_name(name) {
        let denied = policy.deny_out.iter().any(|d| d.matches_name(name));
        return reply_with(
            &request,
            if denied {
                ResponseCode::Refused
            } else {
                ResponseCode::NXDomain
            },
        );
    }
    if question.query_type == RecordType::AAAA {
        // No IPv6 for sandboxes: an empty answer, so clients use IPv4.
        return reply_with(&request, ResponseCode::NoError);
    }
    let upstream_reply = match network.ask_upstream(query).await {
        Some(reply) => reply,
        None => return reply_with(&request, ResponseCode::ServFail),
    };
    let mut reply = Message::from_vec(&upstream_reply).ok()?;
    // Nothing a sandbox may never reach is answered (no rebinding to the host, the
    // metadata service or the LAN).
    let always = network.always_denied();
    reply.answers.retain(|record| match &record.data {
        RData::A(a) => !always.contains(a.0) && !network.is_local(a.0),
        RData::AAAA(_) => false,
        _ => true,
    });
    reply
        .additionals
        .retain(|r| !matches!(r.data, RData::A(_) | RData::AAAA(_)));
    let addresses: Vec<(Ipv4Addr, u32)> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((a.0, r.ttl)),
            _ => None,
        })
        .collect();
    // Addresses answered for an allowed name become reachable where only listed
    // destinations are (and their names are checked again by the proxy on HTTP and TLS).
    if !policy.internet && !addresses.is_empty() {
        let ttl = addresses
            .iter()
            .map(|(_, ttl)| *ttl)
            .max()
            .unwrap_or(0)
            .clamp(MIN_ALLOW_SECS, MAX_ALLOW_SECS);
        let ips: Vec<Ipv4Addr> = addresses.iter().map(|(ip, _)| *ip).collect();
        if let Err(e) = sandbox.allow_resolved(network, &ips, ttl).await {
            tracing::warn!(error = %e, "letting resolved addresses through");
            return reply_with(&request, ResponseCode::ServFail);
        }
    }
    reply.metadata.id = request.metadata.id;
    reply.to_vec().ok()
}

/// Asks `upstreams` in turn; returns the first reply to `query` (TCP if UDP was truncated).
pub(crate) async fn ask(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    for upstream in upstreams {
        let udp = async {
            let socket = UdpSocket::bind(("0.0.0.0", 0)).await.ok()?;
            socket.connect(upstream).await.ok()?;
            socket.send(query).await.ok()?;
            let mut buf = vec![0u8; 4096];
            loop {
                let n = socket.recv(&mut buf).await.ok()?;
                if buf.get(..2) == Some(id) {
                    buf.truncate(n);
                    return Some(buf);
                }
            }
        };
        let Ok(Some(reply)) = tokio::time::timeout(UPSTREAM_TIMEOUT, udp).await else {
            continue;
        };
        // TC bit: the answer did not fit; ask over TCP.
        if reply.get(2).is_some_and(|flags| flags & 0x02 != 0) {
            let tcp = async {
                let mut stream = TcpStream::connect(upstream).await.ok()?;
                stream
                    .write_u16(u16::try_from(query.len()).ok()?)
                    .await
                    .ok()?;
                stream.write_all(query).await.ok()?;
                let len = usize::from(stream.read_u16().await.ok()?);
                if len > MAX_TCP_MESSAGE {
                    return None;
                }
                let mut buf = vec![0u8; len];
                stream.read_exact(&mut buf).await.ok()?;
                Some(buf)
            };
            if let Ok(Some(reply)) = tokio::time::timeout(UPSTREAM_TIMEOUT, tcp).await {
                return Some(reply);
            }
            continue;
        }
        return Some(reply);
    }
    None
}

/// The IPv4 addresses of `name` from `upstreams`, with their TTLs (for the proxy).
pub(crate) async fn resolve(upstreams: &[SocketAddr], name: &str) -> Vec<(Ipv4Addr, u32)> {
    let Ok(parsed) = Name::from_ascii(name) else {
        return Vec::new();
    };
    let mut message = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.queries.push(Query::query(parsed, RecordType::A));
    let Ok(query) = message.to_vec() else {
        return Vec::new();
    };
    let Some(reply) = ask(upstreams, &query).await else {
        return Vec::new();
    };
    let Ok(reply) = Message::from_vec(&reply) else {
        return Vec::new();
    };
    reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((a.0, r.ttl)),
            _ => None,
        })
        .collect()
}

fn rand_id() -> u16 {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_come_from_resolv_conf() {
        let conf = "# comment\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nsearch example\nnameserver 127.0.0.53\n";
        assert_eq!(
            host_upstreams(conf),
            vec![
                "192.0.2.53:53".parse().expect("addr"),
                "127.0.0.53:53".parse().expect("addr")
            ]
        );
    }
}
