//! `kiln check recovery`: faults that need a daemon of the check's own, on a data directory
//! on a small loop filesystem the check makes:
//!
//! 1. the daemon killed with SIGKILL while N sandboxes live: a new daemon adopts every one
//!    (or marks it failed with a reason), their files are as they were, and after they are
//!    destroyed no VMM process or cgroup of theirs is left;
//! 2. a template artefact tampered with on disk: the next create re-bakes, never restores it;
//! 3. the data disk full: creates are refused (507) and the guest's writes fail with I/O
//!    errors, the running sandbox answers, and once space is freed creates work and the
//!    database passes SQLite's integrity check;
//! 4. the database locked by another process: requests that write end in a clear error
//!    (503, try again) within the busy timeout, not a hang, and work once it is released;
//! 5. the database damaged at start: the daemon refuses it by name and leaves it untouched;
//!    with the good copy back it starts.
//!
//! Needs root (loop devices, cgroups, the VMMs' processes).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures_util::stream::{self, StreamExt};
use kiln_api::types::{SandboxBody, SandboxList};
use reqwest::Method;
use serde::Serialize;

use crate::check_cmd::{create, exec};
use crate::check_daemon::{BakeCache, Daemon, DaemonInputs};
use crate::client_cmd::Client;

/// Options of `kiln check recovery`.
#[derive(Debug, Clone, clap::Args)]
pub struct RecoveryOptions {
    /// Template of the sandboxes.
    #[arg(long, default_value = "base")]
    pub template: String,
    /// Sandboxes alive when the daemon is killed (the quick profile's 10, the full one's 50).
    #[arg(long, default_value_t = 50)]
    pub sandboxes: usize,
    #[command(flatten)]
    pub inputs: DaemonInputs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One fault's outcome: passed, and what was seen.
#[derive(Debug, Clone, Serialize)]
struct Fault {
    fault: String,
    passed: bool,
    figures: Vec<(String, String)>,
}

impl Fault {
    fn new(fault: &str) -> Fault {
        Fault {
            fault: fault.to_owned(),
            passed: true,
            figures: Vec::new(),
        }
    }

    /// Notes a figure; `ok` false fails the fault.
    fn note(&mut self, name: &str, value: impl std::fmt::Display, ok: bool) {
        self.figures.push((
            name.to_owned(),
            format!("{value}{}", if ok { "" } else { "  <- FAILED" }),
        ));
        self.passed &= ok;
    }
}

#[derive(Debug, Serialize)]
struct RecoveryReport {
    faults: Vec<Fault>,
    seconds: f64,
    passed: bool,
}

/// Runs the check. Returns whether it passed.
pub async fn recovery(options: &RecoveryOptions) -> Result<bool> {
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "kiln check recovery makes a loop filesystem and looks at VMM processes: run it as root"
    );
    let started = Instant::now();
    // 2 GiB (sparse): the bake and the sandboxes fit, and filling it is quick.
    let fs = tokio::task::spawn_blocking(|| {
        kiln_testinfra::loopfs::LoopFs::new(2 << 30, &["mkfs.ext4", "-q", "-m", "0"])
    })
    .await?;
    let data_dir = fs.path().join("state");
    let log = std::env::temp_dir().join(format!("kiln-recovery-{}.log", std::process::id()));
    let check = Recovery {
        options,
        data_dir: &data_dir,
        log: &log,
    };
    let mut faults = Vec::new();
    let outcome = check.run(&mut faults).await;
    drop(fs);
    if let Err(e) = &outcome {
        let mut fault = Fault::new("the check itself");
        fault.note("error", format!("{e:#}"), false);
        faults.push(fault);
    }
    let report = RecoveryReport {
        passed: faults.iter().all(|f| f.passed),
        faults,
        seconds: started.elapsed().as_secs_f64(),
    };
    if report.passed {
        let _ = std::fs::remove_file(&log);
    }
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("recovery faults ({:.0} s):", report.seconds);
        for fault in &report.faults {
            println!(
                "{}: {}",
                fault.fault,
                if fault.passed { "passed" } else { "FAILED" }
            );
            for (name, value) in &fault.figures {
                println!("  {name:<44} {value}");
            }
        }
        if !report.passed {
            println!("the daemons' log: {}", log.display());
        }
        println!(
            "result: {}",
            if report.passed { "passed" } else { "FAILED" }
        );
    }
    Ok(report.passed)
}

struct Recovery<'a> {
    options: &'a RecoveryOptions,
    data_dir: &'a Path,
    log: &'a Path,
}

impl Recovery<'_> {
    async fn daemon(&self) -> Result<Daemon> {
        let extra = [
            "--network",
            "off",
            "--default-template",
            &self.options.template,
            "--max-sandboxes-per-tenant",
            &(self.options.sandboxes + 10).to_string(),
        ]
        .map(String::from);
        Daemon::start(&self.options.inputs, self.data_dir, self.log, &extra).await
    }

    async fn run(&self, faults: &mut Vec<Fault>) -> Result<()> {
        let bakes = BakeCache::new(&self.options.inputs);
        let seeded = bakes.seed(self.data_dir, &self.options.template);
        let daemon = self.daemon().await?;
        let key = daemon.key("recovery-check")?;
        let client = daemon.client(&key);
        eprintln!(
            "recovery: baking {}{} ...",
            self.options.template,
            crate::check_daemon::kept_note(seeded)
        );
        daemon.bake(&client, &self.options.template).await?;
        bakes.keep(self.data_dir, &self.options.template);
        let (fault, daemon) = self.killed(daemon, &key).await?;
        faults.push(fault);
        let (fault, daemon) = self.tampered(daemon, &key).await?;
        faults.push(fault);
        faults.push(self.disk_full(&daemon, &key).await?);
        let (fault, daemon) = self.locked(daemon, &key).await?;
        faults.push(fault);
        faults.push(self.damaged(daemon, &key).await?);
        Ok(())
    }

    /// The daemon killed with SIGKILL while sandboxes live.
    async fn killed(&self, daemon: Daemon, key: &str) -> Result<(Fault, Daemon)> {
        let mut fault = Fault::new(&format!(
            "daemon killed (SIGKILL) with {} live sandboxes",
            self.options.sandboxes
        ));
        let client = daemon.client(key);
        eprintln!("recovery: {} sandboxes ...", self.options.sandboxes);
        let ids: Vec<Result<String>> = stream::iter(0..self.options.sandboxes)
            .map(|i| {
                let client = &client;
                async move {
                    let id = create(client, &self.options.template).await?;
                    exec(client, &id, &format!("echo mark-{i} > /root/mark && sync")).await?;
                    Ok(id)
                }
            })
            .buffered(4)
            .collect()
            .await;
        let ids: Vec<String> = ids.into_iter().collect::<Result<_>>()?;
        let vmms: Vec<u32> = ids
            .iter()
            .filter_map(|id| crate::check_cmd::vmm_of(id))
            .collect();
        fault.note("VMMs found before", vmms.len(), vmms.len() == ids.len());
        eprintln!("recovery: killing the daemon (pid {}) ...", daemon.pid());
        daemon.kill()?;
        let alive = vmms.iter().filter(|pid| process_alive(**pid)).count();
        fault.note("VMMs alive without a daemon", alive, alive == ids.len());
        let restarted = Instant::now();
        let daemon = match self.daemon().await {
            Ok(daemon) => daemon,
            Err(e) => {
                // Nobody would own them: the VMMs the killed daemon started go too.
                for pid in &vmms {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Err(e.context("restarting after the kill"));
            }
        };
        let client = daemon.client(key);
        fault.note(
            "new daemon answering after",
            format!("{:.1} s", restarted.elapsed().as_secs_f64()),
            true,
        );
        let listed = list(&client).await?;
        let (mut adopted, mut failed, mut files_kept) = (0, 0, 0);
        for (i, id) in ids.iter().enumerate() {
            match listed.iter().find(|s| &s.id == id) {
                Some(s) if state_of(s) == "running" => {
                    adopted += 1;
                    if exec(&client, id, "cat /root/mark")
                        .await
                        .is_ok_and(|out| out.trim() == format!("mark-{i}"))
                    {
                        files_kept += 1;
                    }
                }
                Some(s) if state_of(s) == "failed" && s.reason.is_some() => failed += 1,
                _ => {}
            }
        }
        // Every VMM was alive: each must be adopted (marking one failed would lose it).
        fault.note(
            "adopted (running) + marked failed with a reason",
            format!("{adopted} + {failed} of {}", ids.len()),
            adopted == ids.len(),
        );
        fault.note(
            "adopted ones with their files",
            format!("{files_kept} of {adopted}"),
            files_kept == adopted,
        );
        fault.note(
            "all listed and each checked with an exec after",
            format!("{:.1} s", restarted.elapsed().as_secs_f64()),
            true,
        );
        let destroyed = stream::iter(ids.iter())
            .map(|id| crate::check_cmd::delete(&client, id))
            .buffered(8)
            .collect::<Vec<_>>()
            .await;
        let errors = destroyed.iter().filter(|r| r.is_err()).count();
        fault.note("destroy errors", errors, errors == 0);
        let mut left = vmms.iter().filter(|pid| process_alive(**pid)).count();
        for _ in 0..50 {
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = vmms.iter().filter(|pid| process_alive(**pid)).count();
        }
        fault.note("VMM processes left", left, left == 0);
        let cgroups = ids.iter().filter(|id| cgroup_left(id)).count();
        fault.note("sandbox cgroups left", cgroups, cgroups == 0);
        let dirs = std::fs::read_dir(self.data_dir.join("sandboxes"))
            .map(|d| d.count())
            .unwrap_or_default();
        // The pre-started VMM of the template has a directory of its own.
        fault.note("sandbox directories left (pool aside)", dirs, dirs <= 2);
        Ok((fault, daemon))
    }

    /// A template artefact tampered with while the daemon is stopped.
    async fn tampered(&self, daemon: Daemon, key: &str) -> Result<(Fault, Daemon)> {
        let mut fault = Fault::new("template memory file tampered with on disk");
        daemon.stop()?;
        let bake = bake_dir(self.data_dir, &self.options.template)?;
        let memory = bake.join("memory");
        let pattern = vec![0xa5u8; 64 << 10];
        let offset = 1u64 << 20;
        write_at(&memory, offset, &pattern)?;
        fault.note(
            "64 KiB overwritten at",
            format!("{} +1 MiB", memory.display()),
            true,
        );
        let log_before = std::fs::metadata(self.log).map(|m| m.len()).unwrap_or(0);
        let daemon = self.daemon().await?;
        let client = daemon.client(key);
        let created = create(&client, &self.options.template).await;
        let works = match &created {
            Ok(id) => exec(&client, id, "echo fine")
                .await
                .is_ok_and(|o| o.trim() == "fine"),
            Err(_) => false,
        };
        fault.note("a create after it runs a command", works, works);
        let log = std::fs::read_to_string(self.log).unwrap_or_default();
        let rebaked = log
            .get(usize::try_from(log_before).unwrap_or(0)..)
            .is_some_and(|l| l.contains("the saved bake failed its check"));
        fault.note("the daemon re-baked (its log says)", rebaked, rebaked);
        let now = bake_dir(self.data_dir, &self.options.template)?.join("memory");
        let still = read_at(&now, offset, pattern.len()).is_ok_and(|b| b == pattern);
        fault.note("the tampered bytes are gone", !still, !still);
        if let Ok(id) = created {
            crate::check_cmd::delete(&client, &id).await?;
        }
        Ok((fault, daemon))
    }

    /// The data directory's filesystem full.
    async fn disk_full(&self, daemon: &Daemon, key: &str) -> Result<Fault> {
        let mut fault = Fault::new("data disk full");
        let client = daemon.client(key);
        let running = create(&client, &self.options.template).await?;
        let filler = self.data_dir.join("filler");
        let free = free_bytes(self.data_dir)?;
        fill(&filler, free)?;
        let left = free_bytes(self.data_dir)?;
        fault.note("bytes free after filling", left, left < 4 << 20);
        let refused = create(&client, &self.options.template).await;
        fault.note(
            "a create",
            refused
                .as_ref()
                .map_or_else(first_line, |id| format!("made {id}")),
            matches!(&refused, Err(e) if format!("{e:#}").contains("HTTP 507")),
        );
        if let Ok(id) = &refused {
            let _ = crate::check_cmd::delete(&client, id).await;
        }
        let write = exec(
            &client,
            &running,
            "dd if=/dev/urandom of=/root/big bs=1M count=64 conv=fsync 2>&1; echo done",
        )
        .await;
        // The guest is told (an I/O error), its VM runs on.
        fault.note(
            "a guest writing 64 MiB",
            write.as_ref().map_or_else(first_line, |o| {
                o.lines().next().unwrap_or_default().to_owned()
            }),
            write.as_ref().is_ok_and(|o| o.contains("error")),
        );
        let answers = exec(&client, &running, "echo fine").await;
        fault.note(
            "the running sandbox answers",
            answers.is_ok(),
            answers.is_ok_and(|o| o.trim() == "fine"),
        );
        let health = client
            .send(client.request(Method::GET, "/v1/health"))
            .await
            .is_ok();
        fault.note("the daemon answers /v1/health", health, health);
        std::fs::remove_file(&filler)?;
        let _ = exec(&client, &running, "rm -f /root/big").await;
        let again = create(&client, &self.options.template).await;
        fault.note("a create once space is freed", again.is_ok(), again.is_ok());
        let integrity = integrity(&self.data_dir.join("kiln.db"));
        fault.note(
            "the database's integrity check",
            integrity.as_deref().unwrap_or("failed to run"),
            integrity.as_deref().is_ok_and(|r| r == "ok"),
        );
        for id in again.iter().chain(std::iter::once(&running)) {
            crate::check_cmd::delete(&client, id).await?;
        }
        Ok(fault)
    }

    /// The database locked by another process while the daemon runs, then released.
    async fn locked(&self, daemon: Daemon, key: &str) -> Result<(Fault, Daemon)> {
        let mut fault = Fault::new("database locked by another process");
        let client = daemon.client(key);
        let db = self.data_dir.join("kiln.db");
        let holder = rusqlite::Connection::open(&db)?;
        holder.execute_batch("BEGIN EXCLUSIVE")?;
        let started = Instant::now();
        let created = tokio::time::timeout(
            Duration::from_secs(60),
            create(&client, &self.options.template),
        )
        .await;
        let took = started.elapsed().as_secs_f64();
        let outcome = match &created {
            Err(_) => "no answer in 60 s".to_owned(),
            Ok(Ok(id)) => format!("made {id}"),
            Ok(Err(e)) => first_line(e),
        };
        // Refused as unavailable (try again), within the database's busy timeout.
        let clear = matches!(&created, Ok(Err(e))
            if format!("{e:#}").contains("HTTP 503") && format!("{e:#}").contains("locked"));
        fault.note(
            &format!("a create while it is held ({took:.1} s)"),
            outcome,
            clear && took < 30.0,
        );
        let health = client
            .send(client.request(Method::GET, "/v1/health"))
            .await
            .is_ok();
        fault.note("the daemon answers /v1/health", health, health);
        holder.execute_batch("ROLLBACK")?;
        drop(holder);
        let again = create(&client, &self.options.template).await;
        fault.note("a create once it is released", again.is_ok(), again.is_ok());
        if let Ok(id) = again {
            crate::check_cmd::delete(&client, &id).await?;
        }
        if let Ok(Ok(id)) = created {
            crate::check_cmd::delete(&client, &id).await?;
        }
        Ok((fault, daemon))
    }

    /// The database damaged while the daemon is stopped.
    async fn damaged(&self, daemon: Daemon, key: &str) -> Result<Fault> {
        let mut fault = Fault::new("database damaged at start");
        daemon.stop()?;
        let db = self.data_dir.join("kiln.db");
        // The stopped daemon's last writes may still be in the write-ahead log, page 1 among
        // them, and SQLite reads a page from the log before the file: damage there would be
        // masked. Everything goes into the file first, so the damage hits what is read.
        rusqlite::Connection::open(&db)
            .and_then(|db| db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())))
            .context("checkpointing the stopped daemon's database")?;
        let good = std::fs::read(&db)?;
        ensure!(
            good.len() >= 100,
            "the database file holds {} bytes: no header to damage",
            good.len()
        );
        let mut bad = good.clone();
        bad[..100].fill(0x5a);
        std::fs::write(&db, &bad)?;
        let log_before = std::fs::metadata(self.log).map(|m| m.len()).unwrap_or(0);
        let refused = self.daemon().await;
        let message = match &refused {
            Ok(_) => "it started".to_owned(),
            Err(e) => {
                let log = std::fs::read_to_string(self.log).unwrap_or_default();
                let log = log
                    .get(usize::try_from(log_before).unwrap_or(0)..)
                    .unwrap_or("");
                log.lines()
                    .rev()
                    .find(|l| l.contains("kiln.db"))
                    .map_or_else(|| first_line(e), str::to_owned)
            }
        };
        let names_it = refused.is_err() && message.contains("kiln.db");
        fault.note("the daemon refuses it, naming it", message, names_it);
        if let Ok(daemon) = refused {
            daemon.stop()?;
        }
        let untouched = std::fs::read(&db)? == bad;
        fault.note("the file left untouched", untouched, untouched);
        std::fs::write(&db, &good)?;
        let daemon = self.daemon().await?;
        let client = daemon.client(key);
        let listed = list(&client).await.is_ok();
        fault.note(
            "with the good copy back it starts and answers",
            listed,
            listed,
        );
        daemon.stop()?;
        Ok(fault)
    }
}

async fn list(client: &Client) -> Result<Vec<SandboxBody>> {
    Ok(client
        .json::<SandboxList>(client.request(Method::GET, "/v1/sandboxes?limit=500"))
        .await?
        .sandboxes)
}

fn state_of(sandbox: &SandboxBody) -> String {
    serde_json::to_value(sandbox.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn first_line(error: &anyhow::Error) -> String {
    let text = format!("{error:#}");
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(240)
        .collect()
}

/// `PRAGMA integrity_check` of the database (read while the daemon runs: WAL).
fn integrity(db: &Path) -> Result<String> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))?)
}

fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Whether a cgroup directory of sandbox `id` is still there (v1 or v2 hierarchies).
fn cgroup_left(id: &str) -> bool {
    let name = std::ffi::OsString::from(id);
    walkdir(Path::new("/sys/fs/cgroup"), 5, &mut |path| {
        path.file_name() == Some(name.as_os_str())
    })
}

/// Whether any directory under `dir` (at most `depth` deep) matches.
fn walkdir(dir: &Path, depth: usize, matches: &mut dyn FnMut(&Path) -> bool) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let path = entry.path();
            if matches(&path) || (depth > 0 && walkdir(&path, depth - 1, matches)) {
                return true;
            }
        }
    }
    false
}

/// The bake directory of `template` (the newest, if several).
fn bake_dir(data_dir: &Path, template: &str) -> Result<PathBuf> {
    let prefix = format!("{template}-");
    std::fs::read_dir(data_dir.join("templates"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .with_context(|| format!("no bake of {template} in {}", data_dir.display()))
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    file.write_all_at(bytes, offset)?;
    file.sync_all()?;
    Ok(())
}

fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn free_bytes(path: &Path) -> Result<u64> {
    let stat = nix::sys::statvfs::statvfs(path)?;
    Ok(stat.blocks_available() * stat.fragment_size())
}

/// Fills the filesystem with a file of `bytes` (allocated, not sparse).
fn fill(path: &Path, bytes: u64) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let mut remaining = bytes;
    // fallocate in steps, down to what still fits.
    let mut step = 256u64 << 20;
    let mut offset = 0u64;
    while remaining > 0 && step >= 4096 {
        let len = step.min(remaining);
        match nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            nix::fcntl::FallocateFlags::empty(),
            offset as i64,
            len as i64,
        ) {
            Ok(()) => {
                offset += len;
                remaining -= len;
            }
            Err(_) => step /= 2,
        }
    }
    Ok(())
}
