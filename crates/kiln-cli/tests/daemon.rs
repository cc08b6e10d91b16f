//! The real daemon and the real CLI, as a user runs them: `kiln serve` as a process, a key
//! from `kiln keys create`, then `kiln run`, `kiln sandbox`, `kiln exec`, `kiln fs`; then the
//! daemon killed with SIGKILL while a sandbox runs and started again (the sandbox is
//! re-adopted), stopped with SIGTERM (the sandbox keeps running, adopted again), restarted
//! after the sandbox's VMM died (marked failed, nothing left), and stopped with SIGINT
//! (everything destroyed, nothing left). And a paused sandbox across a daemon killed between
//! pause and resume, and at each step of a pause and of a resume (failpoints): never lost;
//! then forked by the CLI, and snapshotted (the snapshot outlives a daemon kill).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// The daemon and everything it made; killed and cleaned on drop, also when a test fails.
struct Daemon {
    child: Option<Child>,
    data: tempfile::TempDir,
    url: String,
    port: u16,
    sandboxes: Vec<String>,
    /// `KILN_FAILPOINTS` of the next start.
    failpoints: String,
    /// More arguments of `kiln serve`.
    args: Vec<&'static str>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Daemon {
    /// A daemon started with `args` added to its command line.
    fn with_args(args: Vec<&'static str>) -> Daemon {
        let port = free_port();
        let mut daemon = Daemon {
            child: None,
            data: tempfile::tempdir().expect("data dir"),
            url: format!("http://127.0.0.1:{port}"),
            port,
            sandboxes: Vec::new(),
            failpoints: String::new(),
            args,
        };
        daemon.start();
        daemon
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("daemon.log"))
            .expect("log file");
        let child = Command::new(KILN)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.data.path().join("state"))
            .arg("--cache-dir")
            .arg(kiln_testinfra::cache().root())
            .arg("--templates-dir")
            .arg(kiln_testinfra::repo_root().join("templates"))
            .arg("--agent")
            .arg(kiln_testinfra::static_agent())
            .args(["--default-template", "base"])
            .args(&self.args)
            .env("KILN_CONFIG", self.config_file())
            .env("KILN_FAILPOINTS", &self.failpoints)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("kiln serve starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("kiln serve exited ({status}):\n{}", self.log());
            }
            if self.healthy() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("kiln serve did not listen:\n{}", self.log());
    }

    /// Whether the daemon answers its health call. A bare TCP connect is not enough: a
    /// connect to a port nobody listens on may meet itself (the kernel may pick the port as
    /// the connection's own source port), and it succeeds.
    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut answer = String::new();
        stream
            .write_all(b"GET /v1/health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .and_then(|()| stream.read_to_string(&mut answer))
            .is_ok()
            && answer.starts_with("HTTP/1.")
            && answer.split_whitespace().nth(1) == Some("200")
    }

    /// An empty config file, so that no host config (`/etc/kiln/config.toml`) applies.
    fn config_file(&self) -> PathBuf {
        let path = self.data.path().join("config.toml");
        std::fs::write(&path, "# defaults and flags only\n").expect("config file");
        path
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("daemon.log")).unwrap_or_default()
    }

    /// Runs the CLI against this daemon.
    fn kiln(&self, key: Option<&str>, args: &[&str]) -> Output {
        self.kiln_command(key, args).output().expect("kiln runs")
    }

    /// The CLI against this daemon, to run.
    fn kiln_command(&self, key: Option<&str>, args: &[&str]) -> Command {
        let mut command = Command::new(KILN);
        command
            .args(args)
            .env("KILN_URL", &self.url)
            .env("KILN_DATA_DIR", self.data.path().join("state"))
            .env("HOME", self.data.path())
            .env_remove("KILN_API_KEY");
        if let Some(key) = key {
            command.env("KILN_API_KEY", key);
        }
        command
    }

    fn kiln_ok(&self, key: Option<&str>, args: &[&str]) -> String {
        let output = self.kiln(key, args);
        assert!(
            output.status.success(),
            "kiln {args:?} failed ({}): {}\ndaemon log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Pids of the live VMMs this daemon started (whoever their parent is now), from the
    /// `vmm.pid` record each VM directory holds (pid and start time: a reused pid is not
    /// counted). A VMM's command line names only paths inside its jail.
    fn vmm_pids(&self) -> Vec<u32> {
        self.vm_dirs()
            .iter()
            .filter_map(|dir| recorded_vmm(dir))
            .collect()
    }

    /// Every VM directory of this daemon (sandboxes, pre-started VMMs, bakes).
    fn vm_dirs(&self) -> Vec<PathBuf> {
        let state = self.data.path().join("state");
        ["sandboxes", "templates"]
            .iter()
            .filter_map(|dir| std::fs::read_dir(state.join(dir)).ok())
            .flat_map(|entries| entries.flatten().map(|e| e.path()))
            .collect()
    }

    /// Waits for the daemon to end by itself (a failpoint), and reaps it.
    fn wait_daemon_gone(&mut self) {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().ok().flatten().is_none() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop at its failpoint"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop_daemon(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill takes a pid and a signal; the pid is our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().expect("daemon exits")
    }

    fn state_of(&self, key: Option<&str>, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.kiln_ok(key, &["sandbox", "get", id])).expect("JSON")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_daemon();
        let names = self.recorded_names();
        for pid in self.vmm_pids() {
            // SAFETY: as above; these VMMs were started by this test's daemon.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(200));
        for name in names.iter().chain(&self.sandboxes) {
            let netns = Path::new("/run/netns").join(format!("kiln-{name}"));
            if netns.exists() {
                let _ = Command::new("ip")
                    .args(["netns", "del", &format!("kiln-{name}")])
                    .status();
            }
            for dir in cgroup_dirs(name) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

impl Daemon {
    /// The resource names (namespace, cgroup) of every VM this daemon recorded: sandboxes,
    /// pre-started VMMs and bakes.
    fn recorded_names(&self) -> Vec<String> {
        self.vm_dirs()
            .iter()
            .filter_map(|dir| std::fs::read_to_string(dir.join("vmm.pid")).ok())
            .filter_map(|record| record.split_whitespace().nth(2).map(str::to_owned))
            .collect()
    }
}

/// The live VMM recorded in VM directory `dir` (`vmm.pid`: pid, start ticks, name), if it
/// still is the process that was recorded.
fn recorded_vmm(dir: &Path) -> Option<u32> {
    let record = std::fs::read_to_string(dir.join("vmm.pid")).ok()?;
    let mut words = record.split_whitespace();
    let pid: u32 = words.next()?.parse().ok()?;
    let ticks: u64 = words.next()?.parse().ok()?;
    (kiln_vmm::process_start_ticks(pid) == Some(ticks)).then_some(pid)
}

/// Where sandbox `id`'s cgroups would be (v1 cpu and memory, or v2).
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut dirs = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let base = match controllers {
            "" => PathBuf::from("/sys/fs/cgroup"),
            c if c.split(',').any(|c| c == "cpu") => PathBuf::from("/sys/fs/cgroup/cpu"),
            c if c.split(',').any(|c| c == "memory") => PathBuf::from("/sys/fs/cgroup/memory"),
            _ => continue,
        };
        dirs.push(
            base.join(path.trim_start_matches('/'))
                .join("kiln")
                .join(id),
        );
    }
    dirs
}

fn assert_no_leftovers(daemon: &Daemon, ids: &[String]) {
    assert!(
        daemon.vmm_pids().is_empty(),
        "VMMs left: {:?}",
        daemon.vmm_pids()
    );
    for id in ids {
        assert!(
            !Path::new("/run/netns").join(format!("kiln-{id}")).exists(),
            "network namespace of {id} left"
        );
        for dir in cgroup_dirs(id) {
            assert!(!dir.exists(), "cgroup {} left", dir.display());
        }
        assert!(
            !daemon.data.path().join("state/sandboxes").join(id).exists(),
            "files of {id} left"
        );
    }
}

#[test]
fn serve_use_crash_restart_and_stop() {
    let mut daemon = Daemon::with_args(vec!["--tcp-forward-ports", "42000-42999"]);

    // Without a key the CLI says what to do.
    let refused = daemon.kiln(None, &["sandbox", "ls"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("kiln keys create"),
        "{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&refused.stderr),
        daemon.log()
    );
    let key = daemon.kiln_ok(None, &["keys", "create", "--tenant", "e2e"]);
    assert!(key.starts_with("kiln_"), "{key}");
    let key = Some(key.as_str());

    // `kiln run`: create, exec, destroy; the exit code is the command's.
    let run = daemon.kiln(
        key,
        &[
            "run",
            "--template",
            "base",
            "--",
            "sh",
            "-c",
            "echo hi; echo err >&2; exit 7",
        ],
    );
    assert_eq!(
        run.status.code(),
        Some(7),
        "{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&run.stderr),
        daemon.log()
    );
    assert_eq!(String::from_utf8_lossy(&run.stdout), "hi\n");
    assert!(String::from_utf8_lossy(&run.stderr).contains("err"));
    let listed: serde_json::Value =
        serde_json::from_str(&daemon.kiln_ok(key, &["sandbox", "ls", "--json"])).expect("JSON");
    assert_eq!(
        listed,
        serde_json::json!({"sandboxes": [], "next_cursor": null}),
        "kiln run leaves no sandbox"
    );
    let vmms_before = daemon.vmm_pids();

    // A sandbox used step by step.
    let id = daemon.kiln_ok(key, &["sandbox", "create", "--meta", "who=e2e"]);
    daemon.sandboxes.push(id.clone());
    assert_eq!(daemon.kiln_ok(key, &["exec", &id, "--", "hostname"]), id);
    // As in a shell: a command that does not exist exits 127, saying so.
    let missing = daemon.kiln(key, &["exec", &id, "--", "nosuchcmd"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("command `nosuchcmd` not found"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    assert_eq!(
        daemon.kiln_ok(
            key,
            &["exec", &id, "-e", "WHO=e2e", "--shell", "--", "echo $WHO"]
        ),
        "e2e"
    );
    let local = daemon.data.path().join("upload.txt");
    std::fs::write(&local, "payload\n").expect("write");
    daemon.kiln_ok(
        key,
        &[
            "fs",
            "put",
            &id,
            local.to_str().expect("utf-8"),
            "/root/upload.txt",
        ],
    );
    assert_eq!(
        daemon.kiln_ok(key, &["fs", "cat", &id, "/root/upload.txt"]),
        "payload"
    );
    // Into a directory, as `cp` does, both ways; listings say what each entry is.
    daemon.kiln_ok(
        key,
        &["fs", "put", &id, local.to_str().expect("utf-8"), "/tmp/"],
    );
    let listing = daemon.kiln_ok(key, &["fs", "ls", &id, "/tmp"]);
    assert!(
        listing
            .lines()
            .any(|line| line.starts_with("file ") && line.ends_with("/tmp/upload.txt")),
        "{listing}"
    );
    let back = daemon.data.path().join("back");
    std::fs::create_dir(&back).expect("dir");
    let got = daemon.kiln_ok(
        key,
        &[
            "fs",
            "get",
            &id,
            "/tmp/upload.txt",
            back.to_str().expect("utf-8"),
        ],
    );
    assert!(got.contains("8 bytes"), "{got}");
    assert_eq!(
        std::fs::read_to_string(back.join("upload.txt")).expect("copied"),
        "payload\n"
    );
    // `kiln shell` over the WebSocket (stdin is not a terminal here: it ends at once).
    let shell = daemon.kiln(
        key,
        &["shell", &id, "--", "sh", "-c", "echo from-shell; exit 4"],
    );
    assert_eq!(
        shell.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&shell.stderr)
    );
    assert!(String::from_utf8_lossy(&shell.stdout).contains("from-shell"));
    let templates = daemon.kiln_ok(key, &["template", "ls"]);
    assert!(templates.contains("base"), "{templates}");
    let ls: serde_json::Value = serde_json::from_str(
        &daemon.kiln_ok(key, &["sandbox", "ls", "--meta", "who=e2e", "--json"]),
    )
    .expect("JSON");
    assert_eq!(ls["sandboxes"][0]["id"], id.as_str());
    assert_eq!(ls["sandboxes"][0]["metadata"]["who"], "e2e");
    let none: serde_json::Value = serde_json::from_str(
        &daemon.kiln_ok(key, &["sandbox", "ls", "--meta", "who=nobody", "--json"]),
    )
    .expect("JSON");
    assert_eq!(none["sandboxes"], serde_json::json!([]));
    assert!(
        daemon.vmm_pids().len() > vmms_before.len().saturating_sub(1),
        "the sandbox's VMM runs"
    );

    // SIGKILL the daemon: its VMMs outlive it, and the next start re-adopts the sandbox: the
    // same VM (same process, same files), answering again.
    let vmm_of = |daemon: &Daemon, id: &str| -> Vec<u32> {
        recorded_vmm(&daemon.data.path().join("state/sandboxes").join(id))
            .into_iter()
            .collect()
    };
    let vmm = vmm_of(&daemon, &id);
    assert_eq!(vmm.len(), 1, "one VMM for {id}: {vmm:?}");
    // A TCP forward listens on the host; it is the daemon's, and comes back with it.
    let forwarded = daemon.kiln_ok(key, &["sandbox", "forward", &id, "7777"]);
    let address: std::net::SocketAddr = forwarded.parse().expect("an address");
    let listens = || std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok();
    assert!(listens(), "{address}");
    daemon.kill_daemon();
    assert!(
        Path::new(&format!("/proc/{}", vmm[0])).exists(),
        "the VMM outlived the daemon"
    );
    assert!(!listens(), "the forward went with the daemon");
    daemon.start();
    assert_eq!(
        daemon.kiln_ok(key, &["sandbox", "forward", &id]),
        format!("7777\t{address}")
    );
    assert!(listens(), "the forward is back on {address}");
    let got = daemon.state_of(key, &id);
    assert_eq!(got["state"], "running", "{got}\n{}", daemon.log());
    assert_eq!(vmm_of(&daemon, &id), vmm, "the same VMM process");
    assert_eq!(
        daemon.kiln_ok(key, &["fs", "cat", &id, "/root/upload.txt"]),
        "payload"
    );
    assert_eq!(daemon.kiln_ok(key, &["exec", &id, "--", "hostname"]), id);

    // SIGTERM stops the daemon and leaves the sandbox running; the next start adopts it.
    let status = daemon.stop_daemon(libc::SIGTERM);
    assert!(status.success(), "daemon exit: {status}\n{}", daemon.log());
    assert_eq!(vmm_of(&daemon, &id), vmm, "still running after SIGTERM");
    daemon.start();
    assert_eq!(daemon.state_of(key, &id)["state"], "running");
    assert_eq!(
        daemon.kiln_ok(key, &["exec", &id, "--", "cat", "/root/upload.txt"]),
        "payload"
    );

    // A sandbox whose VMM dies while the daemon is down is marked failed, and what it left
    // is removed.
    daemon.kill_daemon();
    // SAFETY: kill takes a pid and a signal; this VMM was started by this test's daemon.
    unsafe { libc::kill(vmm[0] as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{}", vmm[0])).exists() {
        assert!(Instant::now() < deadline, "VMM {} did not die", vmm[0]);
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.start();
    let got = daemon.state_of(key, &id);
    assert_eq!(got["state"], "failed", "{got}");
    assert!(!listens(), "a failed sandbox's forward is dropped");
    assert_eq!(daemon.kiln_ok(key, &["sandbox", "forward", &id]), "");
    assert!(
        got["reason"]
            .as_str()
            .is_some_and(|r| r.contains("daemon was down")),
        "{got}"
    );
    assert_no_leftovers(&daemon, std::slice::from_ref(&id));
    let exec = daemon.kiln(key, &["exec", &id, "--", "true"]);
    assert!(!exec.status.success());
    assert!(String::from_utf8_lossy(&exec.stderr).contains("failed"));
    daemon.kiln_ok(key, &["sandbox", "rm", &id]);

    // SIGINT (Ctrl-C, scripts/down.sh) stops the daemon and destroys what runs, a sandbox
    // whose create is in flight included: the daemon waits for the create, then destroys it.
    let second = daemon.kiln_ok(key, &["sandbox", "create"]);
    daemon.sandboxes.push(second.clone());
    let in_flight = daemon
        .kiln_command(key, &["sandbox", "create"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln runs");
    std::thread::sleep(Duration::from_millis(300));
    let status = daemon.stop_daemon(libc::SIGINT);
    assert!(status.success(), "daemon exit: {status}\n{}", daemon.log());
    let created = in_flight.wait_with_output().expect("kiln ends");
    if created.status.success() {
        daemon
            .sandboxes
            .push(String::from_utf8_lossy(&created.stdout).trim().to_owned());
    }
    let ids = daemon.sandboxes.clone();
    assert_no_leftovers(&daemon, &ids);
    let left: Vec<_> = std::fs::read_dir(daemon.data.path().join("state/sandboxes"))
        .expect("sandboxes directory")
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    assert!(left.is_empty(), "sandbox directories left: {left:?}");

    // A bake damaged on disk while the daemon was down fails its check at the next start's
    // first use, and is made again.
    let templates = daemon.data.path().join("state/templates");
    let baked = std::fs::read_dir(&templates)
        .expect("templates")
        .flatten()
        .map(|entry| entry.path())
        .find(|dir| {
            dir.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("base-"))
        })
        .expect("the base template's bake");
    let disk = ["disk.qcow2", "disk.raw"]
        .iter()
        .map(|name| baked.join(name))
        .find(|path| path.exists())
        .expect("the template disk");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .expect("open the template disk");
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, 4096).expect("read");
        file.write_all_at(&[byte[0] ^ 0x5a], 4096).expect("damage");
    }
    daemon.start();
    assert_eq!(
        daemon.kiln_ok(key, &["run", "--template", "base", "--", "echo", "again"]),
        "again",
        "{}",
        daemon.log()
    );
    assert!(
        daemon
            .log()
            .contains("re-baking: the saved bake failed its check"),
        "{}",
        daemon.log()
    );
    let status = daemon.stop_daemon(libc::SIGINT);
    assert!(status.success(), "daemon exit: {status}\n{}", daemon.log());
}

#[test]
fn pause_survives_the_daemon_killed_at_every_step() {
    // Without sandbox networking: a second daemon with the default network settings would
    // collide with the other test's (two daemons on a host need their own).
    let mut daemon = Daemon::with_args(vec!["--network", "off"]);
    let key = daemon.kiln_ok(None, &["keys", "create", "--tenant", "e2e"]);
    let key = Some(key.as_str());
    let id = daemon.kiln_ok(key, &["sandbox", "create"]);
    daemon.sandboxes.push(id.clone());
    // A file on its disk and one in a tmpfs (only in guest RAM).
    daemon.kiln_ok(
        key,
        &[
            "exec", &id, "--", "sh", "-c",
            "echo disk > /root/kept && mkdir -p /mnt/ram && mount -t tmpfs ram /mnt/ram && echo ram > /mnt/ram/kept",
        ],
    );
    let intact = |daemon: &Daemon| {
        assert_eq!(
            daemon.kiln_ok(
                key,
                &["exec", &id, "--", "cat", "/root/kept", "/mnt/ram/kept"]
            ),
            "disk\nram",
            "{}",
            daemon.log()
        );
    };

    // Killed between a pause and a resume: paused after the restart, then resumed.
    let paused = daemon.kiln_ok(key, &["sandbox", "pause", &id]);
    assert_eq!(paused, format!("{id} paused"));
    daemon.kill_daemon();
    daemon.start();
    assert_eq!(
        daemon.state_of(key, &id)["state"],
        "paused",
        "{}",
        daemon.log()
    );
    assert_eq!(
        daemon.kiln_ok(key, &["sandbox", "resume", &id]),
        format!("{id} running")
    );
    intact(&daemon);

    // Killed at each step of a pause (state written; recorded, VMM not yet ended) and of a
    // resume (state loaded, guest not yet running; the pause's record gone): afterwards the
    // sandbox is running or paused, and whole.
    for (failpoint, verb, expected) in [
        ("pause-saved", "pause", "running"),
        ("pause-recorded", "pause", "paused"),
        ("resume-loaded", "resume", "paused"),
        ("resume-forgotten", "resume", "running"),
    ] {
        if verb == "resume" && daemon.state_of(key, &id)["state"] != "paused" {
            daemon.kiln_ok(key, &["sandbox", "pause", &id]);
        }
        daemon.kill_daemon();
        daemon.failpoints = failpoint.to_owned();
        daemon.start();
        let cut = daemon.kiln(key, &["sandbox", verb, &id]);
        assert!(
            !cut.status.success(),
            "{failpoint}: the daemon should have stopped"
        );
        daemon.wait_daemon_gone();
        daemon.failpoints.clear();
        daemon.start();
        let got = daemon.state_of(key, &id);
        assert_eq!(
            got["state"],
            expected,
            "after {failpoint}: {got}\n{}",
            daemon.log()
        );
        // Exec resumes a paused sandbox on its own.
        intact(&daemon);
        assert_eq!(daemon.state_of(key, &id)["state"], "running");
    }

    // `kiln sandbox fork`: the children's ids, each with the parent's files.
    let forked = daemon.kiln_ok(key, &["sandbox", "fork", &id, "-n", "2"]);
    let children: Vec<String> = forked.lines().map(str::to_owned).collect();
    assert_eq!(children.len(), 2, "{forked}");
    daemon.sandboxes.extend(children.iter().cloned());
    for child in &children {
        assert_eq!(
            daemon.kiln_ok(
                key,
                &["exec", child, "--", "cat", "/root/kept", "/mnt/ram/kept"]
            ),
            "disk\nram"
        );
        assert_eq!(daemon.state_of(key, child)["parent_id"], id.as_str());
    }
    // A snapshot survives the daemon killed; a sandbox made from it after the restart has the
    // files of the moment it was taken.
    let snapshot = daemon.kiln_ok(key, &["snapshot", "create", &id, "--name", "kept"]);
    daemon.kill_daemon();
    daemon.start();
    let listed = daemon.kiln_ok(key, &["snapshot", "ls", "--json"]);
    assert!(listed.contains(&snapshot), "{listed}\n{}", daemon.log());
    let restored = daemon.kiln_ok(key, &["sandbox", "create", "--snapshot", "kept"]);
    daemon.sandboxes.push(restored.clone());
    assert_eq!(
        daemon.kiln_ok(
            key,
            &[
                "exec",
                &restored,
                "--",
                "cat",
                "/root/kept",
                "/mnt/ram/kept"
            ]
        ),
        "disk\nram"
    );
    let mut all = children.clone();
    all.push(id.clone());
    all.push(restored);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    daemon.kiln_ok(key, &[&["sandbox", "rm"][..], &all].concat());
    daemon.kiln_ok(key, &["snapshot", "rm", "kept"]);
    let ids = daemon.sandboxes.clone();
    let status = daemon.stop_daemon(libc::SIGINT);
    assert!(status.success(), "daemon exit: {status}\n{}", daemon.log());
    assert_no_leftovers(&daemon, &ids);
}
