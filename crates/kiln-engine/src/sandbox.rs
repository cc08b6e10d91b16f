//! Sandboxes: created by restoring a baked template into a new QEMU process, with a
//! copy-on-write disk, then reseeded and re-clocked through the agent.

use std::collections::BTreeMap;
use std::io::{Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_agent_client::{AgentClient, ClientConfig, UnixConnector};
use kiln_proto::messages::PostRestoreRequest;
use kiln_vmm::qemu::{DiskFormat, MemoryBacking, PhaseTimings, QemuProcess};

use crate::{BakedTemplate, Engine, EngineError};

/// Options of a create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Metadata handed to the guest.
    pub metadata: BTreeMap<String, String>,
    /// Run the post-restore call (clock, RNG reseed, identity). Only tests turn this off, to
    /// show what goes wrong without it.
    pub post_restore: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            metadata: BTreeMap::new(),
            post_restore: true,
        }
    }
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    dir: PathBuf,
    qemu: QemuProcess,
    client: AgentClient,
    timings: PhaseTimings,
    netns: Option<kiln_net::netns::NetNs>,
}

impl Sandbox {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its agent.
    pub fn agent(&self) -> &AgentClient {
        &self.client
    }

    /// Pid of its QEMU process.
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// Its directory (disk, sockets, logs).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// How long each phase of its creation took.
    pub fn timings(&self) -> &PhaseTimings {
        &self.timings
    }

    /// Name of its network namespace.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_ref().map(kiln_net::netns::NetNs::name)
    }

    /// Stops the VM and removes everything the sandbox had: its QEMU process, its network
    /// namespace and its files.
    pub async fn destroy(mut self) -> Result<(), EngineError> {
        self.client.disconnect().await;
        self.qemu
            .kill()
            .map_err(|e| EngineError::io("stopping QEMU", e))?;
        if let Some(netns) = self.netns.take() {
            netns
                .remove()
                .map_err(|e| EngineError::io("removing the network namespace", e))?;
        }
        std::fs::remove_dir_all(&self.dir)
            .map_err(|e| EngineError::io("removing the sandbox directory", e))
    }
}

fn new_id() -> String {
    let bytes: [u8; 6] = rand::random();
    format!("sb-{}", hex::encode(bytes))
}

/// Restores `template` into a new sandbox.
pub(crate) async fn create(
    engine: &Engine,
    template: &BakedTemplate,
    options: CreateOptions,
) -> Result<Sandbox, EngineError> {
    let started = Instant::now();
    let mut timings = PhaseTimings::default();
    let id = new_id();
    let dir = engine.data_dir().join("sandboxes").join(&id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| EngineError::io("creating the sandbox directory", e))?;
    let cleanup = scopeguard(&dir);

    let mut phase = Instant::now();
    let disk = dir.join("disk.qcow2");
    crate::disk::qcow2_overlay(&template.disk(), template.meta.disk_format, &disk)?;
    // The verified bytes go to QEMU through an anonymous file: what was checked is what loads.
    let state = template.read_state()?;
    let mut state_file =
        tempfile::tempfile_in(&dir).map_err(|e| EngineError::io("staging the device state", e))?;
    state_file
        .write_all(&state)
        .and_then(|()| state_file.rewind())
        .map_err(|e| EngineError::io("staging the device state", e))?;
    record(&mut timings, "disk and state", &mut phase);

    let memory = MemoryBacking::File {
        path: template.memory(),
        shared: false,
    };
    let mut config = template.meta.machine.boot_config(
        template.meta.accel,
        &dir.join("run"),
        &disk,
        DiskFormat::Qcow2,
        memory,
        true,
    );
    let (netns, attachments) = crate::bake::sandbox_network(&format!("kiln-{id}"), &mut config)?;
    let mut qemu = QemuProcess::spawn_with(engine.qemu(), config, attachments)
        .map_err(|e| EngineError::io("starting QEMU", e))?;
    record(&mut timings, "spawn", &mut phase);
    let restore = tokio::task::block_in_place(|| qemu.restore_from(&state_file))?;
    timings.phases.extend(restore.phases);
    phase = Instant::now();

    let client = AgentClient::new(
        Arc::new(UnixConnector::new(qemu.config().agent_socket())),
        ClientConfig {
            hello_interval: Duration::from_millis(20),
            handshake_timeout: Duration::from_secs(30),
            ..ClientConfig::default()
        },
    );
    if let Err(e) = client.connect().await {
        return Err(EngineError::Boot(format!(
            "restored agent did not answer: {e}; QEMU: {}; console:\n{}",
            qemu.stderr_tail(),
            qemu.console_tail(20)
        )));
    }
    record(&mut timings, "agent handshake", &mut phase);
    if options.post_restore {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut entropy = [0u8; 64];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut entropy);
        client
            .post_restore(&PostRestoreRequest {
                wall_clock_ns: now,
                entropy_hex: hex::encode(entropy),
                hostname: Some(id.clone()),
                metadata: Some(options.metadata),
            })
            .await?;
        record(&mut timings, "post-restore", &mut phase);
    }
    timings
        .phases
        .push(("total".into(), started.elapsed().as_secs_f64() * 1000.0));
    cleanup.disarm();
    Ok(Sandbox {
        netns: Some(netns),
        id,
        dir,
        qemu,
        client,
        timings,
    })
}

fn record(timings: &mut PhaseTimings, name: &str, since: &mut Instant) {
    timings
        .phases
        .push((name.to_owned(), since.elapsed().as_secs_f64() * 1000.0));
    *since = Instant::now();
}

/// Removes a half-created sandbox directory unless disarmed.
struct DirGuard(Option<PathBuf>);

fn scopeguard(dir: &std::path::Path) -> DirGuard {
    DirGuard(Some(dir.to_owned()))
}

impl DirGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
