//! Exec through the real agent on the host: exit codes, streams, stdin, env, users,
//! timeouts, signals, background processes, PTYs, and exit codes under concurrency.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{kind, run, sh, start, text};
use kiln_agent_client::ExecOutput;
use kiln_proto::messages::{Command, ErrorKind, ExecRequest, ExitStatus, ProcessSelector, PtySize};

#[tokio::test]
async fn exit_codes_and_signals_are_reported() {
    let (_agent, client) = start().await;
    assert_eq!(
        run(&client, "true").await.status,
        ExitStatus {
            code: Some(0),
            signal: None
        }
    );
    assert_eq!(run(&client, "exit 7").await.status.code, Some(7));
    let killed = run(&client, "kill -TERM $$").await;
    assert_eq!(
        killed.status,
        ExitStatus {
            code: None,
            signal: Some(libc::SIGTERM)
        }
    );
}

#[tokio::test]
async fn stdout_and_stderr_are_separate_and_ordered() {
    let (_agent, client) = start().await;
    let result = run(
        &client,
        "i=0; while [ $i -lt 2000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done",
    )
    .await;
    let expect = |prefix: &str| {
        (0..2000)
            .map(|i| format!("{prefix}{i}\n"))
            .collect::<String>()
    };
    assert_eq!(text(&result), expect("out"));
    assert_eq!(String::from_utf8_lossy(&result.stderr), expect("err"));
    assert!(!result.truncated);
}

#[tokio::test]
async fn output_limit_truncates_and_says_so() {
    let (_agent, client) = start().await;
    let result = client
        .run(sh("head -c 100000 /dev/zero"), 1000)
        .await
        .expect("runs");
    assert_eq!(result.stdout.len(), 1000);
    assert!(result.truncated);
}

#[tokio::test]
async fn stdin_is_streamed_and_closed() {
    let (_agent, client) = start().await;
    let mut request = sh("wc -c; echo done >&2");
    request.stdin = true;
    let session = client.exec(request).await.expect("starts");
    let input = session.input();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 100_000];
        for _ in 0..20 {
            input.stdin(&chunk).await.expect("stdin accepted");
        }
        input.close_stdin().await.expect("eof sent");
    });
    let result = session.collect(1 << 20).await.expect("completes");
    writer.await.expect("writer finished");
    assert_eq!(String::from_utf8_lossy(&result.stdout).trim(), "2000000");
    assert_eq!(result.stderr, b"done\n");
}

#[tokio::test]
async fn env_cwd_and_user_apply() {
    let (_agent, client) = start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut request = sh("echo $GREETING; pwd; id -u; id -g; echo $HOME");
    request.env.insert("GREETING".into(), "hello".into());
    request.cwd = Some(dir.path().to_string_lossy().into_owned());
    request.user = Some("65534:65533".into());
    let result = client.run(request, 4096).await.expect("runs");
    let lines: Vec<String> = text(&result).lines().map(str::to_owned).collect();
    assert_eq!(lines[0], "hello");
    assert_eq!(lines[1], dir.path().to_string_lossy());
    assert_eq!(lines[2], "65534");
    assert_eq!(lines[3], "65533");
    assert_eq!(
        result.status.code,
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&result.stderr)
    );
}

#[tokio::test]
async fn bad_requests_get_typed_errors() {
    let (_agent, client) = start().await;
    let empty = kiln_proto::messages::ExecRequest::new(kiln_proto::messages::Command::Argv(vec![]));
    assert_eq!(
        kind(client.exec(empty).await.map(drop)),
        Some(ErrorKind::InvalidArgument)
    );
    let missing =
        kiln_proto::messages::ExecRequest::new(kiln_proto::messages::Command::Argv(vec![
            "/no/such/program".into(),
        ]));
    assert_eq!(
        kind(client.exec(missing).await.map(drop)),
        Some(ErrorKind::NotFound)
    );
    let mut bad_cwd = sh("true");
    bad_cwd.cwd = Some("/no/such/dir".into());
    assert_eq!(
        kind(client.exec(bad_cwd).await.map(drop)),
        Some(ErrorKind::NotFound)
    );
    let mut bad_user = sh("true");
    bad_user.user = Some("no-such-user".into());
    assert_eq!(
        kind(client.exec(bad_user).await.map(drop)),
        Some(ErrorKind::NotFound)
    );
    let mut bad_env = sh("true");
    bad_env.env.insert("A=B".into(), "x".into());
    assert_eq!(
        kind(client.exec(bad_env).await.map(drop)),
        Some(ErrorKind::InvalidArgument)
    );
    // The agent is still healthy after all of that.
    assert_eq!(run(&client, "echo ok").await.stdout, b"ok\n");
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let (_agent, client) = start().await;
    let mut request = sh("sleep 30 & sleep 30");
    request.timeout_ms = Some(300);
    let result = client.run(request, 4096).await.expect("runs");
    assert!(result.timed_out);
    assert_eq!(result.status.signal, Some(libc::SIGKILL));
}

#[tokio::test]
async fn signals_reach_the_process() {
    let (_agent, client) = start().await;
    let mut session = client
        .exec(sh(
            "trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 0.05; done",
        ))
        .await
        .expect("starts");
    let mut seen = String::new();
    while !seen.contains("ready") {
        if let Some(ExecOutput::Stdout(b)) = session.next().await.expect("output") {
            seen.push_str(&String::from_utf8_lossy(&b));
        }
    }
    session
        .input()
        .signal(libc::SIGINT)
        .await
        .expect("signal sent");
    let result = session.collect(4096).await.expect("exits");
    assert_eq!(result.status.code, Some(3));
    assert_eq!(text(&result), "got-int\n");
}

#[tokio::test]
async fn dropping_a_foreground_stream_kills_its_process() {
    let (_agent, client) = start().await;
    let session = client.exec(sh("sleep 300")).await.expect("starts");
    let pid = session.pid();
    drop(session);
    let gone = wait_until(Duration::from_secs(10), || async {
        !client
            .processes()
            .await
            .expect("list")
            .iter()
            .any(|p| p.pid == pid)
    })
    .await;
    assert!(gone, "foreground process must not outlive its stream");
    let alive = run(
        &client,
        &format!("kill -0 {pid} 2>/dev/null && echo alive || echo gone"),
    )
    .await;
    assert_eq!(text(&alive), "gone\n");
}

#[tokio::test]
async fn background_processes_are_listed_and_reattached() {
    let (_agent, client) = start().await;
    let mut request = sh("echo started; read line; echo \"got $line\"; echo bye >&2; exit 4");
    request.background = true;
    request.stdin = true;
    request.tag = Some("job".into());
    let session = client.exec(request).await.expect("starts");
    let pid = session.pid();
    drop(session);

    let listed = client.processes().await.expect("list");
    let job = listed
        .iter()
        .find(|p| p.pid == pid)
        .expect("background process listed");
    assert_eq!(job.tag.as_deref(), Some("job"));
    assert!(job.background && job.exit.is_none());

    // A second process with the same tag is refused while the first runs.
    let mut dup = sh("true");
    dup.tag = Some("job".into());
    dup.background = true;
    assert_eq!(
        client.exec(dup).await.err().and_then(|e| e.agent_kind()),
        Some(ErrorKind::AlreadyExists)
    );

    let attached = client
        .attach(ProcessSelector::Tag("job".into()))
        .await
        .expect("attach by tag");
    assert_eq!(attached.pid(), pid);
    attached
        .input()
        .stdin(b"hello\n")
        .await
        .expect("stdin through attach");
    let result = attached.collect(4096).await.expect("runs to the end");
    assert_eq!(
        text(&result),
        "started\ngot hello\n",
        "history is replayed, then live output"
    );
    assert_eq!(result.stderr, b"bye\n");
    assert_eq!(result.status.code, Some(4));

    // Finished background processes stay listed and can be attached by pid for the result.
    let again = client
        .attach(ProcessSelector::Pid(pid))
        .await
        .expect("attach by pid");
    assert_eq!(
        again.collect(4096).await.expect("replay").status.code,
        Some(4)
    );
    let listed = client.processes().await.expect("list");
    assert_eq!(
        listed
            .iter()
            .find(|p| p.pid == pid)
            .and_then(|p| p.exit)
            .and_then(|e| e.code),
        Some(4)
    );

    assert_eq!(
        client
            .attach(ProcessSelector::Tag("nope".into()))
            .await
            .err()
            .and_then(|e| e.agent_kind()),
        Some(ErrorKind::NotFound)
    );
    client
        .signal(ProcessSelector::Pid(pid), libc::SIGTERM)
        .await
        .expect_err("already exited");
}

#[tokio::test]
async fn pty_mode_has_a_terminal_and_resizes() {
    let (_agent, client) = start().await;
    let mut request = sh("tty; stty size; read x; stty size; exit 5");
    request.pty = Some(PtySize { rows: 24, cols: 80 });
    request.stdin = true;
    let mut session = client.exec(request).await.expect("starts");
    let mut seen = String::new();
    while !seen.contains("24 80") {
        match session.next().await.expect("output") {
            Some(ExecOutput::Stdout(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("unexpected {other:?} before the first size (seen {seen:?})"),
        }
    }
    assert!(seen.contains("/dev/pts/"), "stdin is a terminal: {seen:?}");
    let input = session.input();
    input
        .resize(PtySize {
            rows: 50,
            cols: 132,
        })
        .await
        .expect("resize");
    input.stdin(b"go\n").await.expect("stdin");
    let rest = session.collect(1 << 16).await.expect("exits");
    assert!(text(&rest).contains("50 132"), "resized: {:?}", text(&rest));
    assert_eq!(rest.status.code, Some(5));
}

#[tokio::test]
async fn input_reaches_a_process_from_outside_its_stream() {
    let (_agent, client) = start().await;
    let mut request = sh("cat; echo end");
    request.background = true;
    request.stdin = true;
    let pid = client.exec(request).await.expect("starts").pid();
    let process = ProcessSelector::Pid(pid);
    client
        .input(process.clone(), b"one ", false, None)
        .await
        .expect("stdin");
    let big = vec![b'x'; 200_000];
    client
        .input(process.clone(), &big, true, None)
        .await
        .expect("stdin in several frames, then closed");
    let result = client
        .attach(process.clone())
        .await
        .expect("attach")
        .collect(1 << 20)
        .await
        .expect("exits");
    assert_eq!(result.stdout.len(), 4 + big.len() + 4);
    assert!(text(&result).starts_with("one xx") && text(&result).ends_with("xend\n"));
    let refused = |e: kiln_agent_client::ClientError| e.agent_kind();
    assert_eq!(
        client
            .input(process.clone(), b"late", false, None)
            .await
            .err()
            .and_then(refused),
        Some(ErrorKind::InvalidArgument),
        "stdin is closed"
    );
    assert_eq!(
        client
            .input(process, b"", false, Some(PtySize { rows: 1, cols: 1 }))
            .await
            .err()
            .and_then(refused),
        Some(ErrorKind::InvalidArgument),
        "no terminal to resize"
    );
    assert_eq!(
        client
            .input(ProcessSelector::Tag("nope".into()), b"x", false, None)
            .await
            .err()
            .and_then(refused),
        Some(ErrorKind::NotFound)
    );

    // A terminal takes its input and new sizes the same way.
    let mut request = sh("stty size; read x; stty size");
    request.pty = Some(PtySize { rows: 24, cols: 80 });
    request.background = true;
    let pid = client.exec(request).await.expect("starts").pid();
    let process = ProcessSelector::Pid(pid);
    let resize = Some(PtySize { rows: 30, cols: 90 });
    client
        .input(process.clone(), b"", false, resize)
        .await
        .expect("resize");
    client
        .input(process.clone(), b"go\n", false, None)
        .await
        .expect("typed");
    let result = client
        .attach(process)
        .await
        .expect("attach")
        .collect(1 << 16)
        .await
        .expect("exits");
    assert!(text(&result).contains("30 90"), "{:?}", text(&result));
}

/// The PID-1 reaper must never steal the exit status of a process the agent waits for,
/// even while orphans are being reaped all the time. A stolen status leaves its exec waiting
/// forever, so the whole run is bounded in time.
#[tokio::test]
async fn exit_codes_survive_many_concurrent_execs_with_orphans() {
    let (_agent, client) = start().await;
    let client = std::sync::Arc::new(client);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let script = format!(
                "(sleep 0.0$((RANDOM % 5)); true) & (exit 1) ; sleep 0.0{}; exit {i}",
                i % 7
            );
            let result = client.run(sh(&script), 1024).await.expect("runs");
            (i, result.status.code)
        }));
    }
    let all = async {
        for task in tasks {
            let (i, code) = task.await.expect("no panic");
            assert_eq!(code, Some(i), "exec {i} lost its exit code");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("an exec never ended: its exit status was lost");
}

#[tokio::test]
async fn exec_without_permission_is_a_permission_error() {
    let (_agent, client) = start().await;
    // A directory private to root, holding a script without execute bits and one with them.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let script = |name: &str, mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, "#!/bin/sh\necho ran\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path.to_string_lossy().into_owned()
    };
    let not_executable = script("plain.sh", 0o644);
    let executable = script("run.sh", 0o755);
    let argv = |path: &str| ExecRequest::new(Command::Argv(vec![path.to_owned()]));

    assert_eq!(
        kind(client.exec(argv(&not_executable)).await.map(drop)),
        Some(ErrorKind::PermissionDenied),
        "a file without execute bits"
    );
    let mut as_nobody = argv(&executable);
    as_nobody.user = Some("65534:65534".into());
    assert_eq!(
        kind(client.exec(as_nobody).await.map(drop)),
        Some(ErrorKind::PermissionDenied),
        "a program in a directory the user cannot enter"
    );
    let result = client.run(argv(&executable), 1024).await.expect("runs");
    assert_eq!(result.stdout, b"ran\n", "root may run it");
}

async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
