//! What confines a VMM: its network namespace (with the guest's tap and, for sandboxes, its
//! link to the host with its egress policy), its cgroup and its unprivileged uid; released
//! together when the VM is gone.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use kiln_network::policy::EgressPolicy;
use kiln_network::{Link, Network};
use kiln_vmm::driver::{Confinement, Vm};

use crate::bake::MachineShape;
use crate::cgroup::{CgroupLimits, SandboxCgroup};
use crate::{EngineError, Inner, VmUid};

/// Memory the VMM process may use beyond the guest's RAM (its own heap, device buffers and,
/// under TCG, translated code).
pub(crate) const VMM_OVERHEAD_MIB: u64 = 256;

/// Host resources a VMM runs in; released on drop (best effort) or by [`VmResources::release`].
#[derive(Debug)]
pub(crate) struct VmResources {
    pub(crate) netns: Option<kiln_net::netns::NetNs>,
    /// The namespace's link to the host (sandboxes only), released after the namespace.
    pub(crate) link: Option<(Arc<Network>, Link)>,
    pub(crate) cgroup: Option<SandboxCgroup>,
    pub(crate) uid: Option<VmUid>,
}

impl VmResources {
    /// The resources that VM `name` of an earlier run left (its namespace and cgroup, if they
    /// exist), with the uid it runs as, if known.
    pub(crate) fn existing(engine: &Inner, name: &str, uid: Option<VmUid>) -> VmResources {
        VmResources {
            netns: kiln_net::netns::NetNs::existing(&engine.netns_name(name)),
            link: None,
            cgroup: engine.cgroups.as_ref().and_then(|c| c.existing(name)),
            uid,
        }
    }

    /// Takes back the link of an adopted sandbox's namespace, whose table holds `policy`.
    pub(crate) fn adopt_link(
        &mut self,
        network: &Arc<Network>,
        policy: &EgressPolicy,
    ) -> Result<(), EngineError> {
        if let Some(ns) = &self.netns {
            let link = network.adopt(ns, policy)?;
            self.link = Some((Arc::clone(network), link));
        }
        Ok(())
    }

    /// Hands `paths` to the VMM's user, readable and writable by it alone: the files it
    /// writes (its own disk; a bake's memory file). It runs unprivileged from its first
    /// instruction, so it opens them with its own rights.
    pub(crate) fn grant(&self, paths: &[&Path]) -> Result<(), EngineError> {
        use std::os::unix::fs::PermissionsExt;
        for path in paths {
            let owner = self.uid.as_ref().map(|uid| uid.id);
            std::os::unix::fs::chown(path, owner, owner)
                .and_then(|()| {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                })
                .map_err(|e| {
                    EngineError::io(&format!("handing {} to the VMM user", path.display()), e)
                })?;
        }
        Ok(())
    }

    /// The user and group its processes run as, if not root.
    pub(crate) fn run_as(&self) -> Option<(u32, u32)> {
        self.uid.as_ref().map(|uid| (uid.id, uid.id))
    }

    /// Its cgroups' `cgroup.procs` files, for another process to join.
    pub(crate) fn cgroup_procs(&self) -> Result<Vec<OwnedFd>, EngineError> {
        Ok(match &self.cgroup {
            Some(cgroup) => cgroup.procs_files()?,
            None => Vec::new(),
        })
    }

    /// Removes the network namespace and the cgroup, and gives the uid back. The VMM process
    /// must be gone.
    pub(crate) fn release(mut self) -> Result<(), EngineError> {
        self.release_now()
    }

    /// Gives back what only a running VMM needs (its cgroup and uid), keeping the network
    /// namespace and its link (a paused sandbox's identity). The VMM process must be gone.
    pub(crate) fn release_vmm(&mut self) -> Result<(), EngineError> {
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.remove()?;
        }
        self.uid = None;
        Ok(())
    }

    /// Leaves the namespace and cgroup in place for a later run of the daemon.
    pub(crate) fn detach(mut self) {
        if let Some(netns) = self.netns.take() {
            netns.detach();
        }
        self.link = None;
        self.cgroup = None;
    }

    fn release_now(&mut self) -> Result<(), EngineError> {
        let mut first_error = None;
        if let Some(netns) = self.netns.take() {
            if let Err(e) = netns.remove() {
                first_error.get_or_insert(EngineError::io("removing the network namespace", e));
            }
        }
        // The namespace took both ends of the link's veth pair and its rules with it.
        if let Some((network, link)) = self.link.take() {
            network.release(link);
        }
        if let Some(cgroup) = self.cgroup.take() {
            if let Err(e) = cgroup.remove() {
                first_error.get_or_insert(e.into());
            }
        }
        self.uid = None;
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for VmResources {
    fn drop(&mut self) {
        if let Err(e) = self.release_now() {
            tracing::warn!(error = %e, "releasing a VM's resources");
        }
    }
}

/// The limits a template's VM gets unless a create asks for less.
pub(crate) fn default_limits(shape: &MachineShape) -> CgroupLimits {
    CgroupLimits {
        cpus: f64::from(shape.vcpus),
        memory_mib: u64::from(shape.memory_mib) + VMM_OVERHEAD_MIB,
    }
}

/// Makes the network namespace (with the guest's tap and, given `egress`, its link to the
/// host with that policy in force), the cgroup and the uid of VM `name`, and the confinement
/// that hands them to the driver.
pub(crate) fn confine(
    engine: &Arc<Inner>,
    name: &str,
    limits: CgroupLimits,
    writable: &[&Path],
    egress: Option<&EgressPolicy>,
) -> Result<(Confinement, VmResources), EngineError> {
    let mut resources = VmResources {
        netns: None,
        link: None,
        cgroup: None,
        uid: None,
    };
    let ns = kiln_net::netns::NetNs::create(&engine.netns_name(name))
        .map_err(|e| EngineError::io("creating the network namespace", e))?;
    if let (Some(network), Some(policy)) = (&engine.network, egress) {
        let link = network.wire(&ns, policy)?;
        resources.link = Some((Arc::clone(network), link));
    }
    resources.netns = Some(ns);
    let confinement = confine_again(engine, name, limits, writable, &mut resources)?;
    Ok((confinement, resources))
}

/// The confinement of a new VMM for VM `name` whose namespace (and link) `resources`
/// already hold, e.g. a paused sandbox's: a new tap in it, a new cgroup and uid.
pub(crate) fn confine_again(
    engine: &Arc<Inner>,
    name: &str,
    limits: CgroupLimits,
    writable: &[&Path],
    resources: &mut VmResources,
) -> Result<Confinement, EngineError> {
    resources.uid = engine.take_uid()?;
    let ns = resources
        .netns
        .as_ref()
        .ok_or_else(|| EngineError::Invalid(format!("`{name}` has no network namespace")))?;
    let tap = kiln_net::tap::create_tap(ns).map_err(|e| EngineError::io("creating the tap", e))?;
    let netns = ns
        .open()
        .map_err(|e| EngineError::io("opening the network namespace", e))?;
    let mut cgroups = Vec::new();
    if let Some(hierarchy) = &engine.cgroups {
        let cgroup = hierarchy.create(name, limits)?;
        cgroups = cgroup.procs_files()?;
        resources.cgroup = Some(cgroup);
    }
    resources.grant(writable)?;
    Ok(Confinement {
        netns: Some(netns),
        tap: Some(tap),
        cgroups,
        run_as: resources.uid.as_ref().map(|uid| (uid.id, uid.id)),
        seccomp: engine.config.confinement.seccomp,
    })
}

/// Removes `dir` and everything in it; one that is already gone is fine.
pub(crate) fn remove_dir_if_present(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Launches a VMM and records it (pid, start time, name) in `dir`, so that a later run finds
/// it whatever happens to this one.
pub(crate) fn launch_recorded(
    engine: &Arc<Inner>,
    spec: kiln_vmm::driver::VmSpec,
    confinement: Confinement,
    dir: &Path,
    name: &str,
) -> Result<Box<dyn Vm>, EngineError> {
    let vm = engine.driver.launch(spec, confinement)?;
    crate::leftovers::write_pid_file(dir, vm.pid(), name)
        .map_err(|e| EngineError::io("recording the VMM", e))?;
    Ok(vm)
}
