//! Sessions: info, init, post-restore, reconnects after the agent goes away, and init duties
//! exercised inside private namespaces.

mod common;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{agent_binary, run, start, start_with, text};
use kiln_agent_client::local::{LocalAgent, LocalAgentOptions};
use kiln_agent_client::{AgentClient, BoxedTransport, ClientConfig, Connector};
use kiln_proto::messages::{
    Command, DnsConfig, ErrorKind, FileWriteStart, InitRequest, MkdirRequest, NetworkConfig,
    PostRestoreRequest, ProcessSelector, ReadinessCheck, StartCommand,
};

#[tokio::test]
async fn info_reports_health() {
    let (_agent, client) = start().await;
    let welcome = client.connect().await.expect("handshake");
    assert_eq!(welcome.protocol, kiln_proto::PROTOCOL_VERSION);
    let info = client.info().await.expect("info");
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.boot_id, welcome.boot_id);
    assert!(info.uptime_secs > 0.0);
    assert!(info.memory.total_bytes > 0 && info.memory.available_bytes > 0);
    assert!(info.disk.total_bytes > 0);
    assert!(!info.initialized);
    assert!(
        info.load.iter().all(|l| l.is_finite() && *l >= 0.0),
        "{:?}",
        info.load
    );
    assert_eq!(info.running_processes, 0);

    let mut tags = Vec::new();
    for i in 0..3 {
        let mut request = common::sh("exec sleep 300");
        request.background = true;
        request.tag = Some(format!("sleeper-{i}"));
        drop(client.exec(request).await.expect("starts"));
        tags.push(format!("sleeper-{i}"));
        let running = client.info().await.expect("info").running_processes;
        assert_eq!(running, i + 1, "background processes count as running");
    }
    for tag in tags {
        client
            .signal(ProcessSelector::Tag(tag), libc::SIGKILL)
            .await
            .expect("kill");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.info().await.expect("info").running_processes > 0 {
        assert!(Instant::now() < deadline, "killed processes still counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads a host file as bytes, `None` if it does not exist.
fn host_file(path: &str) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// The dns duty writes the resolver configuration and a hosts file naming the guest; in a
/// local agent it writes private files mounted over the host's, which stay untouched.
#[tokio::test]
async fn dns_duty_writes_resolv_conf_and_hosts() {
    let host_resolv = host_file("/etc/resolv.conf");
    let host_hosts = host_file("/etc/hosts");
    let (agent, client) = start_with(LocalAgentOptions {
        enable_duties: vec!["dns".into(), "hostname".into()],
        ..LocalAgentOptions::default()
    })
    .await;
    let request = InitRequest {
        hostname: Some("sandbox-dns".into()),
        dns: Some(DnsConfig {
            nameservers: vec![
                "10.0.0.2".parse().expect("ip"),
                "10.0.0.3".parse().expect("ip"),
            ],
            search: vec!["corp.example".into(), "example.com".into()],
        }),
        ..InitRequest::default()
    };
    let response = client.init(&request).await.expect("init");
    assert_eq!(response.applied, ["hostname", "dns"]);
    let resolv = "nameserver 10.0.0.2\nnameserver 10.0.0.3\nsearch corp.example example.com\n";
    let localhost = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
    let hosts = format!("{localhost}127.0.1.1\tsandbox-dns\n");

    let seen = text(&run(&client, "cat /etc/resolv.conf; echo --; cat /etc/hosts").await);
    assert_eq!(
        seen,
        format!("{resolv}--\n{hosts}"),
        "as the guest sees them"
    );
    let [resolv_file, hosts_file] = agent.resolver_files().expect("private resolver files");
    assert_eq!(std::fs::read_to_string(resolv_file).expect("read"), resolv);
    assert_eq!(std::fs::read_to_string(hosts_file).expect("read"), hosts);

    // Without a hostname or search domains, neither line is written.
    let request = InitRequest {
        dns: Some(DnsConfig {
            nameservers: vec!["10.0.0.9".parse().expect("ip")],
            search: vec![],
        }),
        ..InitRequest::default()
    };
    client.init(&request).await.expect("init");
    let seen = text(&run(&client, "cat /etc/resolv.conf; echo --; cat /etc/hosts").await);
    assert_eq!(seen, format!("nameserver 10.0.0.9\n--\n{localhost}"));

    assert_eq!(
        host_file("/etc/resolv.conf"),
        host_resolv,
        "host file touched"
    );
    assert_eq!(host_file("/etc/hosts"), host_hosts, "host file touched");
    drop(client);
    agent.stop().await.expect("stop");
    assert_eq!(
        host_file("/etc/resolv.conf"),
        host_resolv,
        "host file touched"
    );
    assert_eq!(host_file("/etc/hosts"), host_hosts, "host file touched");
}

/// The init call's user is the default identity of execs and the default owner of files and
/// directories the agent creates; a request's own user still wins.
#[tokio::test]
async fn init_user_is_the_default_for_execs_and_file_owners() {
    let (_agent, client) = start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_string_lossy().into_owned();
    let request = InitRequest {
        user: Some("65534:65534".into()),
        ..InitRequest::default()
    };
    client.init(&request).await.expect("init");

    assert_eq!(text(&run(&client, "id -u; id -g").await), "65534\n65534\n");
    let mut as_root = common::sh("id -u; id -g");
    as_root.user = Some("0:0".into());
    let result = client.run(as_root, 1024).await.expect("runs");
    assert_eq!(
        text(&result),
        "0\n0\n",
        "an explicit user overrides the default"
    );

    client
        .write_file(&format!("{root}/owned.txt"), b"x")
        .await
        .expect("write");
    client
        .mkdir(&MkdirRequest {
            path: format!("{root}/sub/dir"),
            mode: None,
            user: None,
        })
        .await
        .expect("mkdir");
    let start = FileWriteStart {
        path: format!("{root}/made/parents.txt"),
        mode: None,
        user: None,
        create_parents: true,
    };
    client
        .write_file_from(start, &mut &b"y"[..])
        .await
        .expect("write");
    for path in ["owned.txt", "sub", "sub/dir", "made", "made/parents.txt"] {
        let stat = client.stat(&format!("{root}/{path}")).await.expect("stat");
        assert_eq!((stat.uid, stat.gid), (65534, 65534), "{path}");
    }
    let start = FileWriteStart {
        path: format!("{root}/root.txt"),
        mode: None,
        user: Some("0:0".into()),
        create_parents: false,
    };
    client
        .write_file_from(start, &mut &b"z"[..])
        .await
        .expect("write");
    let stat = client
        .stat(&format!("{root}/root.txt"))
        .await
        .expect("stat");
    assert_eq!(
        (stat.uid, stat.gid),
        (0, 0),
        "an explicit owner overrides the default"
    );
}

/// A start command whose readiness is a TCP port: init returns once the port accepts.
#[tokio::test]
async fn init_waits_for_the_start_command_port() {
    let (_agent, client) = start_with(LocalAgentOptions {
        new_netns: true,
        setup: Some("ip link set lo up".into()),
        ..LocalAgentOptions::default()
    })
    .await;
    // The listening socket is kept in `$s`: perl closes a discarded one at once.
    let listen = "sleep 0.5; exec perl -MIO::Socket::INET -e \
        '$s = IO::Socket::INET->new(LocalAddr => \"127.0.0.1:7070\", Listen => 16, ReuseAddr => 1) \
         or die \"listen: $!\"; sleep 600'";
    let request = InitRequest {
        start: Some(StartCommand {
            command: Command::Shell(listen.into()),
            readiness: Some(ReadinessCheck::TcpPort { port: 7070 }),
            timeout_ms: 20_000,
            interval_ms: 20,
        }),
        ..InitRequest::default()
    };
    let started = Instant::now();
    let response = client.init(&request).await.expect("init");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "init returned before the port could accept"
    );
    assert!(response.start_pid.is_some());
    let probe = run(
        &client,
        "bash -c 'exec 3<>/dev/tcp/127.0.0.1/7070' && echo open",
    )
    .await;
    assert_eq!(
        text(&probe),
        "open\n",
        "{:?}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

/// The local agent is PID 1 of its own PID, mount and UTS namespaces, and its hostname duty
/// renames only its own namespace.
#[tokio::test]
async fn local_agent_is_pid_1_of_private_namespaces() {
    let host_hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let (_agent, client) = start_with(LocalAgentOptions {
        enable_duties: vec!["hostname".into()],
        ..LocalAgentOptions::default()
    })
    .await;
    let init = tr_nul(&run(&client, "cat /proc/1/cmdline").await.stdout);
    assert!(
        init.starts_with(&common::agent_binary().to_string_lossy().into_owned()),
        "PID 1 is the agent: {init}"
    );
    for ns in ["pid", "mnt", "uts"] {
        let inside = text(&run(&client, &format!("readlink /proc/self/ns/{ns}")).await);
        let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("readlink");
        assert_ne!(
            inside.trim(),
            host.to_string_lossy(),
            "{ns} namespace is shared"
        );
    }

    client
        .init(&InitRequest {
            hostname: Some("kiln-isolated".into()),
            ..InitRequest::default()
        })
        .await
        .expect("init");
    assert_eq!(text(&run(&client, "hostname").await), "kiln-isolated\n");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname"),
        host_hostname,
        "the host was renamed"
    );
}

fn tr_nul(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', " ")
}

#[tokio::test]
async fn init_sets_defaults_and_waits_for_the_start_command() {
    let (_agent, client) = start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let workdir = dir.path().to_string_lossy().into_owned();
    let marker = dir.path().join("ready");
    let request = InitRequest {
        env: [("APP_MODE".to_owned(), "test".to_owned())].into(),
        workdir: Some(workdir.clone()),
        start: Some(StartCommand {
            command: Command::Shell(format!(
                "sleep 0.3; touch {}; exec sleep 300",
                marker.display()
            )),
            readiness: Some(ReadinessCheck::Exec {
                command: Command::Shell(format!("test -f {}", marker.display())),
            }),
            timeout_ms: 20_000,
            interval_ms: 20,
        }),
        ..InitRequest::default()
    };
    let response = client.init(&request).await.expect("init");
    assert!(
        marker.exists(),
        "init returned before the start command was ready"
    );
    let start_pid = response.start_pid.expect("start pid");
    let listed = client.processes().await.expect("list");
    let start = listed
        .iter()
        .find(|p| p.pid == start_pid)
        .expect("start command listed");
    assert_eq!(start.tag.as_deref(), Some("start"));
    assert!(start.exit.is_none());

    let result = run(&client, "echo $APP_MODE; pwd").await;
    assert_eq!(text(&result), format!("test\n{workdir}\n"));
    assert!(client.info().await.expect("info").initialized);
    // A relative path resolves against the workdir.
    client.write_file("rel.txt", b"x").await.expect("write");
    assert!(dir.path().join("rel.txt").exists());
}

#[tokio::test]
async fn init_fails_when_the_start_command_dies_or_never_gets_ready() {
    let (_agent, client) = start().await;
    let dies = InitRequest {
        start: Some(StartCommand {
            command: Command::Shell("exit 1".into()),
            readiness: Some(ReadinessCheck::TcpPort { port: 1 }),
            timeout_ms: 10_000,
            interval_ms: 20,
        }),
        ..InitRequest::default()
    };
    let err = client.init(&dies).await.expect_err("start command died");
    assert!(
        err.to_string().contains("exited before it was ready"),
        "{err}"
    );
    let never = InitRequest {
        start: Some(StartCommand {
            command: Command::Shell("exec sleep 300".into()),
            readiness: Some(ReadinessCheck::Exec {
                command: Command::Shell("false".into()),
            }),
            timeout_ms: 300,
            interval_ms: 20,
        }),
        ..InitRequest::default()
    };
    assert_eq!(
        client.init(&never).await.err().and_then(|e| e.agent_kind()),
        Some(ErrorKind::Timeout)
    );
    let bad = InitRequest {
        workdir: Some("relative".into()),
        ..InitRequest::default()
    };
    assert_eq!(
        client.init(&bad).await.err().and_then(|e| e.agent_kind()),
        Some(ErrorKind::InvalidArgument)
    );
}

#[tokio::test]
async fn post_restore_without_init_duties_skips_clock_and_rng_but_keeps_metadata() {
    let (_agent, client) = start().await;
    let request = PostRestoreRequest {
        wall_clock_ns: 1,
        entropy_hex: "00".repeat(32),
        hostname: Some("restored".into()),
        metadata: Some([("sandbox".to_owned(), "sb-1".to_owned())].into()),
    };
    let response = client.post_restore(&request).await.expect("post-restore");
    assert_eq!(response.applied, ["metadata"]);
    assert_eq!(response.skipped, ["clock", "rng", "hostname"]);
    assert_eq!(
        client
            .info()
            .await
            .expect("info")
            .metadata
            .get("sandbox")
            .map(String::as_str),
        Some("sb-1")
    );
    let bad = PostRestoreRequest {
        entropy_hex: "xyz".into(),
        ..PostRestoreRequest::default()
    };
    assert_eq!(
        client
            .post_restore(&bad)
            .await
            .err()
            .and_then(|e| e.agent_kind()),
        Some(ErrorKind::InvalidArgument)
    );
}

/// Hostname and network duties run for real, in the agent's own UTS and network namespaces.
#[tokio::test]
async fn hostname_and_network_duties_configure_the_namespace() {
    let options = LocalAgentOptions {
        enable_duties: vec!["hostname".into(), "network".into()],
        new_netns: true,
        setup: Some("ip link add eth0 type veth peer name peer0 && ip link set peer0 up".into()),
        ..LocalAgentOptions::default()
    };
    let (_agent, client) = start_with(options).await;
    let request = InitRequest {
        hostname: Some("sandbox-1".into()),
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: "172.31.0.2".parse().expect("ip"),
            prefix_len: 30,
            gateway: Some("172.31.0.1".parse().expect("ip")),
            mtu: Some(1400),
        }),
        ..InitRequest::default()
    };
    let response = client.init(&request).await.expect("init");
    assert_eq!(response.applied, ["network", "hostname"]);
    let result = run(&client, "hostname; ip -4 -o addr show eth0; ip route show default; cat /sys/class/net/eth0/mtu; ip -o link show lo").await;
    let out = text(&result);
    assert!(out.starts_with("sandbox-1\n"), "{out}");
    assert!(out.contains("inet 172.31.0.2/30"), "{out}");
    assert!(out.contains("default via 172.31.0.1 dev eth0"), "{out}");
    assert!(out.contains("\n1400\n"), "{out}");
    assert!(out.contains("UP"), "lo is up: {out}");

    let bad = InitRequest {
        hostname: Some("bad name".into()),
        ..InitRequest::default()
    };
    assert_eq!(
        client.init(&bad).await.err().and_then(|e| e.agent_kind()),
        Some(ErrorKind::InvalidArgument)
    );
}

/// Without the duties enabled, the same init call changes nothing and says so.
#[tokio::test]
async fn disabled_duties_are_skipped() {
    let (_agent, client) = start_with(LocalAgentOptions {
        new_netns: true,
        ..Default::default()
    })
    .await;
    let before = text(&run(&client, "hostname").await);
    let request = InitRequest {
        hostname: Some("changed".into()),
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: "172.31.0.2".parse().expect("ip"),
            prefix_len: 30,
            gateway: None,
            mtu: None,
        }),
        ..InitRequest::default()
    };
    let response = client.init(&request).await.expect("init");
    assert!(response.applied.is_empty());
    assert_eq!(response.skipped, ["network", "hostname"]);
    assert_eq!(text(&run(&client, "hostname").await), before);
}

/// Connects to whatever socket the test points it at.
#[derive(Debug)]
struct SwitchableConnector(Mutex<PathBuf>);

impl Connector for SwitchableConnector {
    fn connect(
        &self,
    ) -> Pin<Box<dyn std::future::Future<Output = std::io::Result<BoxedTransport>> + Send + '_>>
    {
        let path = self.0.lock().expect("lock").clone();
        Box::pin(async move {
            Ok(Box::pin(tokio::net::UnixStream::connect(path).await?) as BoxedTransport)
        })
    }
}

#[tokio::test]
async fn client_reconnects_after_the_agent_goes_away() {
    let first = LocalAgent::start(agent_binary(), LocalAgentOptions::default())
        .await
        .expect("agent");
    let connector = Arc::new(SwitchableConnector(Mutex::new(first.socket().to_owned())));
    let client = AgentClient::new(connector.clone(), ClientConfig::default());
    let first_boot = client.info().await.expect("info").boot_id;
    first.stop().await.expect("stop");

    let err = client.info().await.expect_err("agent is gone");
    assert!(err.is_connection_error(), "{err:?}");

    let second = LocalAgent::start(agent_binary(), LocalAgentOptions::default())
        .await
        .expect("agent");
    *connector.0.lock().expect("lock") = second.socket().to_owned();
    let info = client.info().await.expect("reconnected");
    assert_ne!(info.boot_id, first_boot);
    let result = client
        .run(common::sh("echo back"), 100)
        .await
        .expect("exec after reconnect");
    assert_eq!(result.stdout, b"back\n");
    drop(second);
}
