//! Pause to disk and resume: a paused sandbox has no VMM process and no RAM; its memory and
//! device state are in a file in its directory, its disk and network namespace stay, and a
//! resume loads it into a new confined VMM with the same id, files, processes and network
//! identity, also after the daemon was restarted or killed.
//!
//! What is on disk, in the sandbox's directory (root's alone):
//! - `sandbox.json`: what the sandbox runs on (its template's directory, its limits), written
//!   by the daemon at create;
//! - `paused.state`: the VM's saved state, written by its VMM through a descriptor the
//!   daemon opened: its device state alone where its RAM is a private mapping of its
//!   template's memory file (every sandbox made by a create or a fork), with
//!   `paused.delta` beside it, the pages the guest changed (read by the daemon, see
//!   [`crate::ramdelta`]); otherwise (a sandbox resumed from an older pause) all of its
//!   RAM included;
//! - `paused.json`: written by the daemon once the state file, the disk and the directory
//!   are on stable storage. Its presence is what "paused" means on disk: without it a pause
//!   was not finished (the VMM, stopped, is taken over and continued); it goes as soon as a
//!   resumed guest runs again (from then on the disk moves on from the saved state).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_proto::messages::PostRestoreRequest;
use kiln_vmm::driver::{DiskFormat, DiskLayer, MemoryBacking, PhaseTimings, Vm};
use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupLimits;
use crate::confine::{confine_again, launch_recorded, VmResources};
use crate::sandbox::{record, Sandbox, SandboxState};
use crate::{lock, persist, BakedTemplate, EngineError, Inner};

const SANDBOX_FILE: &str = "sandbox.json";
const SANDBOX_VERSION: u32 = 1;
const STATE_FILE: &str = "paused.state";
const DELTA_FILE: &str = "paused.delta";
const PAUSED_FILE: &str = "paused.json";
const PAUSED_VERSION: u32 = 1;

/// What a sandbox runs on, recorded at create for a later pause or resume (also by a later
/// run of the daemon).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SandboxFile {
    /// Its template's directory name under `<data_dir>/templates`.
    template_dir: String,
    /// CPU quota in cores.
    cpus: f64,
    /// Memory limit of the VMM process.
    memory_mib: u64,
}

/// A finished pause.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PausedFile {
    /// The VMM (name and version) that wrote the state: another cannot load it.
    vmm: String,
    /// Size of the state file.
    state_bytes: u64,
    /// When, ms since the epoch.
    paused_at_ms: u64,
    /// Size of `paused.delta` where the state is the device state alone (checked, with the
    /// pages' structure, like the state's size); `None`: the state holds all of RAM.
    #[serde(default)]
    delta_bytes: Option<u64>,
}

/// Records what the sandbox in `dir` runs on.
pub(crate) fn write_sandbox_file(
    dir: &Path,
    template: &BakedTemplate,
    limits: CgroupLimits,
) -> Result<(), EngineError> {
    let template_dir = template
        .dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| EngineError::Invalid("the template's directory has no name".into()))?;
    let file = SandboxFile {
        template_dir: template_dir.to_owned(),
        cpus: limits.cpus,
        memory_mib: limits.memory_mib,
    };
    persist::write_unsynced(&dir.join(SANDBOX_FILE), SANDBOX_VERSION, &file)?;
    Ok(())
}

/// What the sandbox in `dir` runs on: its template (opened and checked) and limits.
pub(crate) fn read_sandbox_file(
    engine: &Inner,
    dir: &Path,
) -> Result<(BakedTemplate, CgroupLimits), EngineError> {
    let file: SandboxFile = persist::read(&dir.join(SANDBOX_FILE), SANDBOX_VERSION)?;
    // One plain name: the file is the daemon's, but nothing read back is used as a path as is.
    let name = Path::new(&file.template_dir);
    if name.components().count() != 1 || file.template_dir.starts_with('.') {
        return Err(EngineError::Corrupt(format!(
            "{}: `{}` is not a template directory name",
            dir.display(),
            file.template_dir
        )));
    }
    let template = BakedTemplate::open(&engine.config.data_dir.join("templates").join(name))?;
    Ok((
        template,
        CgroupLimits {
            cpus: file.cpus,
            memory_mib: file.memory_mib,
        },
    ))
}

/// Whether the sandbox in `dir` is paused on disk (a finished pause).
pub(crate) fn is_paused(dir: &Path) -> bool {
    dir.join(PAUSED_FILE).exists()
}

/// Takes back a VM whose pause was cut short (its VMM stopped, the state maybe half written):
/// the partial state goes and the guest runs on.
pub(crate) fn continue_unfinished(dir: &Path, vm: &mut dyn Vm) -> Result<(), EngineError> {
    let state = dir.join(STATE_FILE);
    if state.exists() {
        tracing::info!(dir = %dir.display(), "a pause was cut short: continuing the VM");
        vm.resume()?;
        std::fs::remove_file(&state).map_err(|e| EngineError::io("removing a partial state", e))?;
    }
    let _ = std::fs::remove_file(dir.join(DELTA_FILE));
    Ok(())
}

/// The sandbox's writable disk in `dir`.
fn disk_of(dir: &Path, template: &BakedTemplate) -> PathBuf {
    dir.join(match template.meta.disk_format {
        DiskFormat::Raw => "disk.raw",
        DiskFormat::Qcow2 => "disk.qcow2",
    })
}

fn sync_file(path: &Path) -> Result<(), EngineError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| EngineError::io(&format!("flushing {}", path.display()), e))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Sandbox {
    /// Pauses the sandbox to disk: its VM is stopped, its memory and device state written to
    /// its directory and flushed with its disk to stable storage, and its VMM process ends
    /// (its RAM, cgroup and uid are given back). Its network namespace stays. Pausing a
    /// paused sandbox does nothing; one being resumed is paused once that is done.
    pub async fn pause(&self) -> Result<PhaseTimings, EngineError> {
        let _operation = self.operation.lock().await;
        let engine = self.engine()?;
        let template = self.source_template()?;
        if self.state() == SandboxState::Running {
            // The image holds at most all of the VMM's memory.
            crate::space::admit(&engine, self.limits.memory_mib << 20, "pause the sandbox")?;
        }
        let mut vm = {
            let mut runtime = lock(&self.runtime);
            match runtime.state {
                SandboxState::Running => {}
                SandboxState::Paused => return Ok(PhaseTimings::default()),
                ref other => return Err(self.conflict(other)),
            }
            let Some(vm) = runtime.vm.take() else {
                return Err(self.conflict(&runtime.state));
            };
            runtime.state = SandboxState::Pausing;
            vm
        };
        // The agent session stays open while the state is saved: closing it first would
        // put a "host closed the port" event in flight inside the guest, which the saved
        // state may carry past the next connection (seen as a resumed agent that never
        // answers). A restored agent drops the stale session when the first hello arrives.
        let start = Instant::now();
        crate::space::lift(crate::space::Vmm {
            pid: vm.pid(),
            run_as: self.vm_uid().map(|uid| (uid, uid)),
        });
        let saved = tokio::task::block_in_place(|| self.save(&engine, &template, vm.as_mut()));
        match saved {
            Ok(mut timings) => {
                let mut phase = Instant::now();
                crate::failpoint("pause-recorded");
                if let Err(e) = vm.kill() {
                    tracing::warn!(sandbox = %self.id, error = %e, "ending a paused VMM");
                }
                self.client.disconnect().await;
                let released = {
                    let mut runtime = lock(&self.runtime);
                    runtime.state = SandboxState::Paused;
                    runtime
                        .resources
                        .as_mut()
                        .map_or(Ok(()), VmResources::release_vmm)
                };
                if let Err(e) = released {
                    tracing::warn!(sandbox = %self.id, error = %e, "releasing a paused VMM's cgroup");
                }
                record(&mut timings, "end VMM", &mut phase);
                timings
                    .phases
                    .push(("total".into(), start.elapsed().as_secs_f64() * 1000.0));
                let _ = engine.events.send(crate::SandboxEvent::Paused {
                    id: self.id.clone(),
                });
                Ok(timings)
            }
            Err(e) => {
                // Not paused: the guest runs on where it stopped.
                let _ = std::fs::remove_file(self.dir.join(STATE_FILE));
                let _ = std::fs::remove_file(self.dir.join(PAUSED_FILE));
                let continued = vm.resume();
                let mut runtime = lock(&self.runtime);
                match continued {
                    Ok(()) => {
                        runtime.vm = Some(vm);
                        runtime.state = SandboxState::Running;
                    }
                    Err(resume) => {
                        runtime.vm = Some(vm);
                        runtime.state = SandboxState::Failed {
                            reason: format!(
                                "a pause failed ({}) and the VM could not go on: {resume}",
                                crate::error_chain(&e)
                            ),
                        };
                    }
                }
                Err(e)
            }
        }
    }

    /// Writes the stopped VM's state and makes it durable (blocking).
    fn save(
        &self,
        engine: &Inner,
        template: &BakedTemplate,
        vm: &mut dyn Vm,
    ) -> Result<PhaseTimings, EngineError> {
        let state = self.dir.join(STATE_FILE);
        let delta = self.dir.join(DELTA_FILE);
        let _ = std::fs::remove_file(&state);
        let _ = std::fs::remove_file(&delta);
        let memory = template.memory();
        let changed = crate::ramdelta::maps(vm.pid(), &memory).unwrap_or(false);
        let mut timings;
        let delta_bytes = if changed {
            let ram = u64::from(template.meta.machine.memory_mib) << 20;
            (timings, _) = crate::ramdelta::save_changed(vm, &memory, ram, &state, &delta)?;
            // The delta is synced as it is written; the state is the VMM's, written unsynced.
            sync_file(&state)?;
            Some(
                std::fs::metadata(&delta)
                    .map_err(|e| EngineError::io("reading the changed pages", e))?
                    .len(),
            )
        } else {
            timings = vm.snapshot(&state)?;
            None
        };
        let mut phase = Instant::now();
        // Root disks run with guest flushes ignored (cache=unsafe): what the guest wrote is
        // in the host's page cache, made durable here, with the state file and the directory.
        sync_file(&disk_of(&self.dir, template))?;
        let state_bytes = std::fs::metadata(&state)
            .map_err(|e| EngineError::io("reading the state file", e))?
            .len();
        crate::failpoint("pause-saved");
        persist::write(
            &self.dir.join(PAUSED_FILE),
            PAUSED_VERSION,
            &PausedFile {
                vmm: vmm_version(engine),
                state_bytes,
                paused_at_ms: now_ms(),
                delta_bytes,
            },
        )?;
        record(&mut timings, "flush", &mut phase);
        // What the pause holds on disk: the state and the changed pages.
        timings.phases.push((
            "state bytes".into(),
            (state_bytes + delta_bytes.unwrap_or(0)) as f64,
        ));
        Ok(timings)
    }

    /// Resumes a paused sandbox: a new confined VMM loads its saved state, the guest's clock
    /// is set, and it answers again with the same id, files, processes and network identity.
    /// Resuming a running sandbox does nothing; callers that arrive during a resume wait for
    /// it (one resume, shared).
    pub async fn resume(&self) -> Result<PhaseTimings, EngineError> {
        let _operation = self.operation.lock().await;
        let engine = self.engine()?;
        let template = self.source_template()?;
        let resources = {
            let mut runtime = lock(&self.runtime);
            match runtime.state {
                SandboxState::Paused => {}
                SandboxState::Running => return Ok(PhaseTimings::default()),
                ref other => return Err(self.conflict(other)),
            }
            let Some(resources) = runtime.resources.take() else {
                return Err(self.conflict(&runtime.state));
            };
            runtime.state = SandboxState::Resuming;
            resources
        };
        let start = Instant::now();
        let mut resources = resources;
        let restored =
            tokio::task::block_in_place(|| self.restore(&engine, &template, &mut resources));
        let (vm, mut timings) = match restored {
            Ok(restored) => restored,
            Err(e) => {
                release_vmm(&mut resources);
                let mut runtime = lock(&self.runtime);
                runtime.resources = Some(resources);
                runtime.state = SandboxState::Paused;
                return Err(e);
            }
        };
        let mut phase = Instant::now();
        let pid = vm.pid();
        crate::space::hold(
            &engine,
            crate::space::Vmm {
                pid,
                run_as: resources.run_as(),
            },
            &self.dir,
        );
        let watch = crate::sandbox::exit_watch(pid);
        let answered = self.client.connect().await;
        let outcome = match (watch, answered) {
            (Ok(watch), Ok(_)) => Ok(watch),
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(EngineError::Boot(format!(
                "the resumed agent did not answer: {e}; VMM: {}; console:\n{}",
                vm.diagnostics(),
                vm.console_tail(20)
            ))),
        };
        let watch = match outcome {
            Ok(watch) => watch,
            Err(e) => {
                // The guest ran: its saved state is no longer its past. Failed, saying why.
                let mut runtime = lock(&self.runtime);
                runtime.vm = Some(vm);
                runtime.resources = Some(resources);
                runtime.state = SandboxState::Failed {
                    reason: crate::error_chain(&e),
                };
                return Err(e);
            }
        };
        record(&mut timings, "agent handshake", &mut phase);
        // The clock stood still while it was paused.
        let clock = self
            .client
            .post_restore(&PostRestoreRequest {
                wall_clock_ns: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
                entropy_hex: hex::encode(rand::random::<[u8; 32]>()),
                hostname: None,
                metadata: None,
            })
            .await;
        if let Err(e) = clock {
            tracing::warn!(sandbox = %self.id, error = %e, "setting a resumed guest's clock");
        }
        record(&mut timings, "post-restore", &mut phase);
        {
            let mut runtime = lock(&self.runtime);
            runtime.vm = Some(vm);
            runtime.resources = Some(resources);
            runtime.state = SandboxState::Running;
        }
        tokio::spawn(crate::sandbox::watch_exit(
            self.weak(&engine),
            watch.0,
            watch.1,
        ));
        timings
            .phases
            .push(("total".into(), start.elapsed().as_secs_f64() * 1000.0));
        let _ = engine.events.send(crate::SandboxEvent::Resumed {
            id: self.id.clone(),
        });
        Ok(timings)
    }

    /// Starts a VMM in the sandbox's namespace (`resources`) and loads the saved state into
    /// it (blocking).
    fn restore(
        &self,
        engine: &Arc<Inner>,
        template: &BakedTemplate,
        resources: &mut VmResources,
    ) -> Result<(Box<dyn Vm>, PhaseTimings), EngineError> {
        let mut timings = PhaseTimings::default();
        let mut phase = Instant::now();
        let paused: PausedFile = persist::read(&self.dir.join(PAUSED_FILE), PAUSED_VERSION)?;
        let here = vmm_version(engine);
        if paused.vmm != here {
            return Err(EngineError::Conflict(format!(
                "sandbox `{}` was paused under {} and this host runs {here}: it cannot be resumed here",
                self.id, paused.vmm
            )));
        }
        let state_path = self.dir.join(STATE_FILE);
        // Opened by root, never through a link; its size is what the pause recorded.
        let state = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&state_path)
            .map_err(|e| EngineError::io("opening the saved state", e))?;
        let len = state
            .metadata()
            .map_err(|e| EngineError::io("opening the saved state", e))?
            .len();
        if len != paused.state_bytes {
            return Err(EngineError::Corrupt(format!(
                "{}: {len} bytes, the pause wrote {}",
                state_path.display(),
                paused.state_bytes
            )));
        }
        // The disk chain is named by kiln: whatever the sandbox's own layer says in its
        // header, QEMU reads through to the template's layers only.
        let disk = disk_of(&self.dir, template);
        let mut chain = vec![match template.meta.disk_format {
            DiskFormat::Raw => DiskLayer::raw(&disk),
            DiskFormat::Qcow2 => DiskLayer::qcow2(&disk),
        }];
        if template.meta.disk_format == DiskFormat::Qcow2 {
            chain.extend(template.disk_chain());
        }
        // The changed pages, checked whole, or all of RAM in the state.
        let delta = match paused.delta_bytes {
            Some(expected) => {
                let path = self.dir.join(DELTA_FILE);
                let bytes = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .and_then(|mut file| {
                        let mut bytes = Vec::new();
                        std::io::Read::read_to_end(&mut file, &mut bytes).map(|_| bytes)
                    })
                    .map_err(|e| EngineError::io("reading the changed pages", e))?;
                if bytes.len() as u64 != expected {
                    return Err(EngineError::Corrupt(format!(
                        "{}: {} bytes, the pause wrote {expected}",
                        path.display(),
                        bytes.len()
                    )));
                }
                let ram = u64::from(template.meta.machine.memory_mib) << 20;
                Some(
                    crate::ramdelta::Delta::parse(bytes, ram)
                        .map_err(|e| EngineError::Corrupt(format!("{}: {e}", path.display())))?,
                )
            }
            None => None,
        };
        let memory = match delta {
            Some(_) => MemoryBacking::File {
                path: template.memory(),
                shared: false,
            },
            None => MemoryBacking::Private,
        };
        let mut spec = template
            .meta
            .machine
            .vm_spec(&self.dir.join("run"), chain, memory, true);
        spec.devices_state_only |= delta.is_some();
        let confinement = confine_again(engine, &self.id, self.limits, &[&disk], resources)?;
        record(&mut timings, "confinement", &mut phase);
        let started =
            launch_recorded(engine, spec, confinement, &self.dir, &self.id).and_then(|mut vm| {
                vm.wait_started(Duration::from_secs(30))?;
                Ok(vm)
            });
        let mut vm = started?;
        record(&mut timings, "VMM ready", &mut phase);
        if let Some(delta) = &delta {
            // Before the VMM reads the saved state: it has run nothing but its start-up.
            delta
                .inject(vm.pid(), &template.memory())
                .map_err(|e| EngineError::io("writing the changed pages into the VMM", e))?;
            record(&mut timings, "changed pages", &mut phase);
        }
        vm.load(&state)?;
        record(&mut timings, "load state", &mut phase);
        crate::failpoint("resume-loaded");
        // Once the guest runs, its disk moves on from the saved state, which is then no
        // longer a place to come back to: the record of the pause goes first. A daemon that
        // dies from here on finds the VMM and continues it (`continue_unfinished`).
        let forgotten = std::fs::remove_file(self.dir.join(PAUSED_FILE))
            .and_then(|()| persist::sync_dir(&self.dir));
        forgotten.map_err(|e| EngineError::io("removing the record of the pause", e))?;
        crate::failpoint("resume-forgotten");
        if let Err(e) = vm.resume() {
            // The guest did not run: the saved state still is its present.
            let _ = vm.kill();
            if let Err(e) = persist::write(&self.dir.join(PAUSED_FILE), PAUSED_VERSION, &paused) {
                tracing::warn!(sandbox = %self.id, error = %e, "recording the pause again");
            }
            return Err(e.into());
        }
        let _ = std::fs::remove_file(&state_path);
        let _ = std::fs::remove_file(self.dir.join(DELTA_FILE));
        record(&mut timings, "run", &mut phase);
        Ok((vm, timings))
    }

    fn engine(&self) -> Result<Arc<Inner>, EngineError> {
        self.engine
            .upgrade()
            .ok_or_else(|| EngineError::Invalid("the engine is shutting down".into()))
    }

    pub(crate) fn source_template(&self) -> Result<BakedTemplate, EngineError> {
        self.source.clone().ok_or_else(|| {
            EngineError::Conflict(format!(
                "sandbox `{}`'s template is no longer on this host: it cannot be paused or resumed",
                self.id
            ))
        })
    }

    fn conflict(&self, state: &SandboxState) -> EngineError {
        EngineError::Conflict(format!("sandbox `{}` is {}", self.id, state.name()))
    }

    fn weak(&self, engine: &Inner) -> std::sync::Weak<Sandbox> {
        lock(&engine.sandboxes)
            .get(&self.id)
            .map(Arc::downgrade)
            .unwrap_or_default()
    }
}

/// Gives back what only a VMM needed (its cgroup, its uid); the VMM must be gone.
fn release_vmm(resources: &mut VmResources) {
    if let Err(e) = resources.release_vmm() {
        tracing::warn!(error = %e, "releasing a VMM's cgroup");
    }
}

/// The VMM's name and version, as a saved state records it.
fn vmm_version(engine: &Inner) -> String {
    format!("{} {}", engine.driver.name(), engine.driver.version())
}
