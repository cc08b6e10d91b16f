//! A daemon of a check's own: `kiln serve` (this binary) on a loopback port the system picks,
//! with a data directory the check chooses, for checks that must kill, restart, starve or
//! re-wire a daemon (`kiln check escape`, `kiln check recovery`). Stopped on drop (its own
//! process, by its pid).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use reqwest::Method;
use serde_json::json;

use crate::client_cmd::Client;

/// Longest a check's daemon may take to stop after SIGINT (it destroys every sandbox).
const STOP_TIMEOUT: Duration = Duration::from_secs(300);

/// Where a check's daemon finds its agent, templates and cache (the check's options).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DaemonInputs {
    /// Guest agent binary for the check's own daemon [default: as `kiln serve`'s].
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Templates directories for the check's own daemon [default: as `kiln serve`'s].
    #[arg(long)]
    pub templates_dir: Vec<PathBuf>,
    /// Cache directory for the check's own daemon (built images are reused from it, and
    /// the check's bakes are kept in its `check-bakes`) [default: as `kiln serve`'s].
    #[arg(long, env = "KILN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// A running `kiln serve`.
pub struct Daemon {
    child: std::process::Child,
    /// Its URL.
    pub url: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `kiln serve` on `data_dir` with `extra` flags, logging to `log`, and waits until
    /// it answers (or fails, with the log's end).
    pub async fn start(
        inputs: &DaemonInputs,
        data_dir: &Path,
        log: &Path,
        extra: &[String],
    ) -> Result<Daemon> {
        let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
        let mut command = std::process::Command::new(exe()?);
        command
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("KILN_CONFIG", "/dev/null");
        if let Some(agent) = &inputs.agent {
            command.arg("--agent").arg(agent);
        }
        for templates in &inputs.templates_dir {
            command.arg("--templates-dir").arg(templates);
        }
        if let Some(cache) = &inputs.cache_dir {
            command.arg("--cache-dir").arg(cache);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("{}", log.display()))?;
        command.stdout(file.try_clone()?).stderr(file);
        let child = command.spawn().context("starting a daemon for the check")?;
        let mut daemon = Daemon {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
            data_dir: data_dir.to_owned(),
            log: log.to_owned(),
        };
        if let Err(e) = daemon.answering().await {
            return Err(e.context(format!("the check's daemon; {}", daemon.log_tail())));
        }
        Ok(daemon)
    }

    async fn answering(&mut self) -> Result<()> {
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("it exited ({status})");
            }
            if http
                .get(format!("{}/v1/health", self.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok()
            {
                return Ok(());
            }
            ensure!(
                started.elapsed() < Duration::from_secs(120),
                "it did not answer in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of its log, to explain a failure.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "its log ({}) ends:\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new API key of `tenant` (made as `kiln keys create` does, in its database).
    pub fn key(&self, tenant: &str) -> Result<String> {
        let output = std::process::Command::new(exe()?)
            .args(["keys", "create", "--tenant", tenant])
            .env("KILN_DATA_DIR", &self.data_dir)
            .env("KILN_CONFIG", "/dev/null")
            .output()?;
        ensure!(
            output.status.success(),
            "kiln keys create: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?.trim().to_owned())
    }

    /// A client of it with `key`.
    pub fn client(&self, key: &str) -> Client {
        Client::with_key(&self.url, key.to_owned())
    }

    /// Bakes `template` (built first if it must be) and waits until it is ready.
    pub async fn bake(&self, client: &Client, template: &str) -> Result<()> {
        // A first build of a template's image can take many minutes.
        let response = client
            .send(
                client
                    .request(Method::POST, "/v1/templates")
                    .json(&json!({"name": template}))
                    .timeout(Duration::from_secs(3600)),
            )
            .await?;
        let text = response.text().await?;
        let last = text.lines().last().unwrap_or_default();
        ensure!(
            last.contains("\"ready\""),
            "baking {template} did not end ready: {last}"
        );
        Ok(())
    }

    /// Kills it with SIGKILL (its sandboxes' VMMs live on, for the next daemon to adopt).
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Stops it (SIGINT: it removes its sandboxes, namespaces, links and tables) and checks
    /// that it ended well within [`STOP_TIMEOUT`] (then it is killed).
    pub fn stop(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                bail!(
                    "the check's daemon did not stop in {} s after SIGINT (killed); {}",
                    STOP_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        ensure!(
            status.success(),
            "the check's daemon ended with {status}; {}",
            self.log_tail()
        );
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Bakes kept between checks' daemons, in `check-bakes` of the cache directory. A bake's
/// directory is named by its inputs (template, images, agent, machine), so one an earlier
/// check's daemon made is the one this check's daemon would make: copied into its data
/// directory before it starts, it is found instead of baked (and, as every template is,
/// verified when that daemon first uses it, re-baked if it fails).
pub struct BakeCache {
    dir: PathBuf,
}

impl BakeCache {
    /// The bakes kept in `inputs`' cache directory (`kiln serve`'s default if none is set).
    pub fn new(inputs: &DaemonInputs) -> BakeCache {
        let cache = inputs
            .cache_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(kiln_image::cache::DEFAULT_CACHE_DIR));
        BakeCache {
            dir: cache.join("check-bakes"),
        }
    }

    /// Copies the kept bakes of `template` into `data_dir` (whose daemon has not started).
    /// Returns how many it copied; one that cannot be copied is said on stderr (the daemon
    /// bakes instead).
    pub fn seed(&self, data_dir: &Path, template: &str) -> usize {
        self.try_seed(data_dir, template).unwrap_or_else(|e| {
            eprintln!("check: {e:#}; the check's daemon bakes {template} instead");
            0
        })
    }

    fn try_seed(&self, data_dir: &Path, template: &str) -> Result<usize> {
        let Some(_lock) = self.lock(FlockArg::LockShared)? else {
            return Ok(0);
        };
        let templates = data_dir.join("templates");
        private_dir(&templates)?;
        let kept = bakes_of(&self.dir, template);
        for baked in &kept {
            baked
                .copy_into(&templates)
                .with_context(|| format!("copying {} for the check", baked.dir.display()))?;
        }
        Ok(kept.len())
    }

    /// Keeps `data_dir`'s bakes of `template` (once its daemon baked it) in place of those
    /// kept before, which are removed (a bake of inputs that have changed is made again if
    /// they come back). One that cannot be kept is said on stderr: the next check bakes it
    /// again.
    pub fn keep(&self, data_dir: &Path, template: &str) {
        if let Err(e) = self.try_keep(data_dir, template) {
            eprintln!("check: {e:#}; the next check bakes {template} again");
        }
    }

    fn try_keep(&self, data_dir: &Path, template: &str) -> Result<()> {
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .with_context(|| format!("making {}", self.dir.display()))?;
        }
        let Some(_lock) = self.lock(FlockArg::LockExclusive)? else {
            bail!("{} was not made", self.dir.display());
        };
        // What a check killed while keeping a bake left (no other check keeps one now).
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".bake-") {
                std::fs::remove_dir_all(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
            }
        }
        let made = bakes_of(&data_dir.join("templates"), template);
        for kept in bakes_of(&self.dir, template) {
            let same = made.iter().any(|baked| {
                baked.dir.file_name() == kept.dir.file_name()
                    && baked.meta.memory_sha256 == kept.meta.memory_sha256
            });
            if !same {
                std::fs::remove_dir_all(&kept.dir)
                    .with_context(|| format!("removing {}", kept.dir.display()))?;
            }
        }
        for baked in made {
            baked
                .copy_into(&self.dir)
                .with_context(|| format!("keeping {} for later checks", baked.dir.display()))?;
        }
        Ok(())
    }

    /// Holds the kept bakes against a concurrent check's keep (`None`: nothing is kept yet).
    /// The directory must be root's alone: what it holds, the daemon trusts.
    fn lock(&self, how: FlockArg) -> Result<Option<Flock<std::fs::File>>> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = match std::fs::symlink_metadata(&self.dir) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("{}", self.dir.display())),
        };
        ensure!(
            meta.is_dir() && meta.uid() == 0 && meta.permissions().mode() & 0o022 == 0,
            "{} is not a directory that root alone may change: its bakes are not used",
            self.dir.display()
        );
        let file = std::fs::File::open(&self.dir)
            .with_context(|| format!("opening {}", self.dir.display()))?;
        Flock::lock(file, how)
            .map(Some)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", self.dir.display()))
    }
}

/// What a check says of the bakes [`BakeCache::seed`] copied: a daemon finds one only if its
/// inputs are still the same.
pub fn kept_note(seeded: usize) -> &'static str {
    if seeded > 0 {
        " (where an earlier check's bake has the same inputs, it is used)"
    } else {
        ""
    }
}

/// The templates (not fork captures) named `template` in `dir`.
fn bakes_of(dir: &Path, template: &str) -> Vec<kiln_engine::bake::BakedTemplate> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|entry| kiln_engine::bake::BakedTemplate::open(&entry.path()).ok())
        .filter(|baked| baked.meta.name == template && baked.meta.capture_of.is_none())
        .collect()
}

/// Makes `dir` (and its parents) and leaves it root's alone (one that exists must be root's
/// already, and not a link).
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("{}", dir.display()))?;
    ensure!(
        meta.is_dir() && meta.uid() == 0,
        "{} is not root's own directory",
        dir.display()
    );
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} root's alone", dir.display()))
}

/// This binary (`kiln`).
pub fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("this binary's path")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn cache_in(dir: &Path) -> BakeCache {
        BakeCache::new(&DaemonInputs {
            cache_dir: Some(dir.to_owned()),
            ..DaemonInputs::default()
        })
    }

    /// Only a directory that root alone may change holds bakes a check's daemon trusts:
    /// one of another user, one others may write to, or a link, is refused and not used.
    #[test]
    fn kept_bakes_are_used_only_from_roots_own_directory() {
        let cache = tempfile::tempdir().expect("a cache directory");
        let bakes = cache_in(cache.path());
        let data = tempfile::tempdir().expect("a data directory");
        // Nothing kept yet: nothing to copy, and no error.
        assert_eq!(bakes.try_seed(data.path(), "base").expect("seeds"), 0);
        // Made by a keep: root's, and closed to others.
        bakes
            .try_keep(data.path(), "base")
            .expect("keeps nothing without error");
        let mode = std::fs::metadata(&bakes.dir)
            .expect("made")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(bakes.try_seed(data.path(), "base").expect("seeds"), 0);

        let refused = |why: &str| {
            let seeded = bakes.try_seed(data.path(), "base");
            let err = seeded.expect_err(why).to_string();
            assert!(
                err.contains("not a directory that root alone may change"),
                "{err}"
            );
            let err = bakes.try_keep(data.path(), "base").expect_err(why);
            assert!(
                format!("{err:#}").contains("not a directory that root alone may change"),
                "{err:#}"
            );
        };
        std::fs::set_permissions(&bakes.dir, std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        refused("others may write to it");
        std::fs::set_permissions(&bakes.dir, std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        std::os::unix::fs::chown(&bakes.dir, Some(65534), None).expect("chown (run as root)");
        refused("another user's");
        std::fs::remove_dir(&bakes.dir).expect("remove");
        let elsewhere = tempfile::tempdir().expect("a directory elsewhere");
        std::os::unix::fs::symlink(elsewhere.path(), &bakes.dir).expect("link");
        refused("a link");
    }
}
