//! The jail, with a shell in place of a VMM: what the process sees, what it can write, who
//! it is, which descriptors it holds. Needs root (as the whole suite does).

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use kiln_vmm::jail::{spawn, Bind, Jail, Launch, BASIC_DEVICES};

fn pipe() -> (OwnedFd, OwnedFd) {
    kiln_vmm::jail::pipe(false).expect("pipe")
}

/// `program` with no arguments, environment, namespace, cgroup or descriptors.
fn bare(program: &str) -> Launch {
    Launch {
        program: program.into(),
        args: Vec::new(),
        env: Vec::new(),
        netns: None,
        cgroups: Vec::new(),
        fds: Vec::new(),
        stderr: None,
    }
}

/// Runs `script` with `sh` in `jail`; returns what it wrote to descriptor 3 and its status.
fn run(jail: &Jail, script: &str, extra: Vec<(OwnedFd, i32)>) -> (String, i32) {
    let (read, write) = pipe();
    let mut fds = vec![(write, 3)];
    fds.extend(extra);
    let mut child = spawn(
        jail,
        Launch {
            program: "/usr/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            netns: None,
            cgroups: Vec::new(),
            fds,
            stderr: None,
        },
    )
    .expect("spawn");
    let mut out = String::new();
    std::fs::File::from(read)
        .read_to_string(&mut out)
        .expect("read");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    (out, status.code().unwrap_or(-1))
}

#[test]
fn a_jailed_process_sees_only_what_it_was_given() {
    let host = tempfile::tempdir().expect("dir");
    let secret = host.path().join("secret");
    std::fs::write(&secret, "host secret").expect("write");
    let shared = host.path().join("shared");
    std::fs::write(&shared, "shared, read-only").expect("write");
    // Writable by anyone on the host: only the read-only bind keeps the jail from writing.
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .expect("chmod");
    let own = host.path().join("own");
    std::fs::write(&own, "own").expect("write");
    let uid = 2_000_065_000;
    std::os::unix::fs::chown(&own, Some(uid), Some(uid)).expect("chown");
    let root = host.path().join("jail");
    std::fs::create_dir(&root).expect("jail root");
    let jail = Jail {
        root: root.clone(),
        binds: vec![
            Bind::read_only(&shared, "/vm/shared"),
            Bind::writable(&own, "/vm/own"),
        ],
        devices: BASIC_DEVICES.to_vec(),
        run_as: Some((uid, uid)),
    };
    let (extra_read, _extra_write) = pipe();
    let script = format!(
        r#"exec >&3 2>&1
echo "root: $(ls / | tr '\n' ' ')"
echo "vm: $(ls /vm | tr '\n' ' ')"
echo "id: $(id -u) $(id -g) $(id -G)"
echo "pid: $$"
echo "procs: $(ls /proc | grep '^[0-9]' | tr '\n' ' ')"
grep -E '^(CapEff|NoNewPrivs)' /proc/self/status | tr '\t\n' '  '; echo
echo "shared: $(cat /vm/shared)"
echo x >> /vm/shared 2>/dev/null && echo "shared: WRITTEN" || echo "shared: not writable"
echo more >> /vm/own && echo "own: writable"
cat {secret} 2>/dev/null && echo "secret: READ" || echo "secret: unreachable"
ls /var/lib /root /etc/shadow 2>/dev/null && echo "host: VISIBLE" || echo "host: invisible"
touch /usr/x 2>/dev/null && echo "usr: WRITTEN" || echo "usr: read-only"
touch /newfile 2>/dev/null && echo "root: WRITTEN" || echo "root: read-only"
touch /tmp/x && echo "tmp: writable"
echo "fds: $(ls /proc/self/fd | tr '\n' ' ')"
echo "hostname: $(cat /proc/sys/kernel/hostname)"
ulimit -S -f 1000 2>/dev/null && echo "limits: CHANGED" || echo "limits: locked at $(ulimit -f)"
echo "net: $(ls /proc/self/net/dev >/dev/null && tail -n +3 /proc/self/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
"#,
        secret = secret.display()
    );
    let (out, code) = run(&jail, &script, vec![(extra_read, 7)]);
    assert_eq!(code, 0, "{out}");
    let line = |prefix: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in:\n{out}"))
            .to_owned()
    };
    let root_entries = line("root:");
    for expected in ["bin", "dev", "proc", "tmp", "usr", "vm"] {
        assert!(
            root_entries.split_whitespace().any(|e| e == expected),
            "{root_entries}"
        );
    }
    for absent in ["home", "root", "var", "run", "boot", "srv"] {
        assert!(
            !root_entries.split_whitespace().any(|e| e == absent),
            "{absent} is visible: {root_entries}"
        );
    }
    assert_eq!(line("vm:").trim(), "vm: own shared");
    assert_eq!(line("id:"), format!("id: {uid} {uid} {uid}"));
    assert_eq!(line("pid:"), "pid: 1", "PID 1 of its own namespace");
    // Only its own processes (the shell, its subshell and pipeline) are in /proc, by small
    // numbers of its own namespace: none of the host's.
    let procs = line("procs:");
    let pids: Vec<u32> = procs
        .trim_start_matches("procs:")
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect();
    assert!(
        pids.contains(&1) && pids.iter().all(|&p| p < 100),
        "{procs}"
    );
    assert!(line("CapEff").contains("0000000000000000"), "{out}");
    assert!(line("CapEff").contains("NoNewPrivs: 1"), "{out}");
    assert_eq!(line("shared: s"), "shared: shared, read-only");
    assert_eq!(line("shared: n"), "shared: not writable");
    assert_eq!(line("own:"), "own: writable");
    assert_eq!(line("secret:"), "secret: unreachable");
    assert_eq!(line("host:"), "host: invisible");
    assert_eq!(line("usr:"), "usr: read-only");
    assert_eq!(line("root: r"), "root: read-only");
    assert_eq!(line("tmp:"), "tmp: writable");
    // 0-2, the report pipe (3), the extra one (7), and ls's own directory descriptor.
    let fd_line = line("fds:");
    let fds: Vec<&str> = fd_line
        .trim_start_matches("fds:")
        .split_whitespace()
        .collect();
    assert!(fds.contains(&"3") && fds.contains(&"7"), "{fds:?}");
    assert!(fds.len() <= 6, "no inherited descriptors: {fds:?}");
    assert_eq!(line("hostname:"), "hostname: kiln-vmm");
    // The host sets its limits (a VMM's file-size share); it can read them, not change them.
    assert_eq!(line("limits:"), "limits: locked at unlimited");
    assert_eq!(
        line("net:").trim(),
        "net: lo",
        "a network namespace of its own"
    );
    assert_eq!(
        std::fs::read_to_string(&shared).expect("read"),
        "shared, read-only"
    );
    assert_eq!(std::fs::read_to_string(&own).expect("read"), "ownmore\n");
    // The host sees the jail's mount point empty: the jail's mounts are its own.
    assert_eq!(std::fs::read_dir(&root).expect("read").count(), 0);
    assert!(!mounted_under(host.path()), "no mount left on the host");
}

#[test]
fn a_failing_step_is_named() {
    let host = tempfile::tempdir().expect("dir");
    let root = host.path().join("jail");
    std::fs::create_dir(&root).expect("jail root");
    let jail = Jail {
        root,
        binds: Vec::new(),
        devices: Vec::new(),
        run_as: Some((2_000_065_001, 2_000_065_001)),
    };
    let err = spawn(&jail, bare("/vm/no-such-program")).expect_err("no such program");
    let text = err.to_string();
    assert!(
        text.contains("executing the program") && text.contains("No such file"),
        "{text}"
    );
    let missing = Jail {
        binds: vec![Bind::read_only("/nonexistent/file", "/vm/x")],
        ..jail
    };
    let err = spawn(&missing, bare("/usr/bin/true")).expect_err("missing bind source");
    assert!(err.to_string().contains("/nonexistent/file"), "{err}");
}

fn mounted_under(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|m| Path::new(m).starts_with(dir))
        })
}

/// The daemon spawns VMMs from many threads while others allocate and take locks: a child
/// that called into libc after the clone could inherit a lock held by another thread and
/// hang forever (seen once). Many concurrent spawns, each bounded in time.
#[test]
fn concurrent_spawns_from_many_threads_never_hang() {
    let host = tempfile::tempdir().expect("dir");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Threads come and go (glibc's thread-list lock) and memory churns (malloc's).
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let short = std::thread::spawn(|| {
                    let v: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 4096]).collect();
                    std::hint::black_box(v);
                });
                let _ = short.join();
            }
        })
    };
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let root_base = host.path().to_owned();
            std::thread::spawn(move || {
                for i in 0..8 {
                    let root = root_base.join(format!("jail-{t}-{i}"));
                    std::fs::create_dir(&root).expect("jail root");
                    let uid = 2_000_065_200 + t;
                    let mut child = spawn(
                        &Jail {
                            root,
                            binds: Vec::new(),
                            devices: Vec::new(),
                            run_as: Some((uid, uid)),
                        },
                        bare("/usr/bin/true"),
                    )
                    .expect("spawn");
                    let ended = kiln_vmm::pidfd::exited(child.pidfd(), 30_000).expect("poll");
                    if !ended {
                        let _ = child.kill();
                        panic!("a jailed `true` did not end within 30 s");
                    }
                    let status = child.try_wait().expect("wait").expect("ended");
                    assert!(status.success(), "{status}");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().expect("churn");
}
