//! Byte streams from the host to sockets inside the guest, through the real agent.

mod common;

use common::start;
use kiln_proto::messages::{ConnectTarget, ErrorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_connection_carries_bytes_both_ways_and_closes_with_either_side() {
    let (_agent, client) = start().await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("echo.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let server = tokio::spawn(async move {
        // Echoes upper-cased until the host shuts its write side, then says bye and closes.
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 4096];
        loop {
            let n = socket.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            socket
                .write_all(&buf[..n].to_ascii_uppercase())
                .await
                .expect("write");
        }
        socket.write_all(b"bye").await.expect("bye");
    });
    let target = ConnectTarget::Unix(path.to_string_lossy().into_owned());
    let mut connection = client.connect_to(target).await.expect("connects");
    let big = vec![b'a'; 300_000];
    connection.write(&big).await.expect("write");
    let mut echoed = Vec::new();
    while echoed.len() < big.len() {
        echoed.extend_from_slice(&connection.read().await.expect("read").expect("open"));
    }
    assert!(echoed.iter().all(|&b| b == b'A'));
    connection.close_write().await.expect("shutdown");
    let mut rest = Vec::new();
    while let Some(bytes) = connection.read().await.expect("read") {
        rest.extend_from_slice(&bytes);
    }
    assert_eq!(rest, b"bye", "the guest's side closed after its last bytes");
    server.await.expect("server");

    // The host dropping its connection closes the guest's socket (the interpreter stops a
    // cell whose caller went away this way).
    let listener = tokio::net::UnixListener::bind(dir.path().join("drop.sock")).expect("bind");
    let target = ConnectTarget::Unix(dir.path().join("drop.sock").to_string_lossy().into_owned());
    let connection = client.connect_to(target).await.expect("connects");
    let (mut socket, _) = listener.accept().await.expect("accept");
    drop(connection);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), socket.read(&mut buf))
        .await
        .expect("the guest's side sees the close");
    assert_eq!(read.expect("read"), 0);

    // Nothing listening: a typed error, and the session goes on.
    let missing = ConnectTarget::Unix(dir.path().join("none.sock").to_string_lossy().into_owned());
    assert_eq!(
        client
            .connect_to(missing)
            .await
            .err()
            .and_then(|e| e.agent_kind()),
        Some(ErrorKind::NotFound)
    );
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a port");
    assert_eq!(
        client
            .connect_to(ConnectTarget::Tcp(closed_port))
            .await
            .err()
            .and_then(|e| e.agent_kind()),
        Some(ErrorKind::NotFound)
    );
    assert!(client.processes().await.is_ok());
}
