//! What a tenant may hold: quotas of live sandboxes, CPU, memory, disk and templates, held
//! while sandboxes are made so concurrent creates cannot pass them together, and the caps on
//! what a tenant's template spec may ask for.

use std::time::Duration;

use kiln_engine::Resources;

use crate::{Control, ControlError, Principal, TenantUsage};

/// What one tenant may hold at once; `None`: no limit. A create, fork, restore or template
/// save past one is refused with [`ControlError::QuotaExceeded`] before anything is made.
#[derive(Debug, Clone, Default)]
pub struct TenantQuotas {
    /// Live (running or paused) sandboxes.
    pub sandboxes: Option<usize>,
    /// CPU quotas of its live sandboxes together, in cores.
    pub cpus: Option<f64>,
    /// Memory limits of its live sandboxes' VMMs together (guest RAM and the VMM's own), in
    /// MiB.
    pub memory_mib: Option<u64>,
    /// Root disk sizes of its live sandboxes together, in MiB.
    pub disk_mib: Option<u64>,
    /// Its own templates.
    pub templates: Option<usize>,
}

/// The most a tenant's own template spec may ask for (the operator's templates are not held
/// to it), and how long building one may take.
#[derive(Debug, Clone)]
pub struct SpecCaps {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, in MiB.
    pub memory_mib: u32,
    /// Root disk, in MiB.
    pub disk_mib: u32,
    /// Longest build of its images (the package installation); a build past it is stopped
    /// and fails.
    pub build_time: Duration,
}

impl Default for SpecCaps {
    fn default() -> SpecCaps {
        SpecCaps {
            vcpus: 8,
            memory_mib: 16 << 10,
            disk_mib: 64 << 10,
            build_time: Duration::from_secs(30 * 60),
        }
    }
}

/// What a tenant's sandboxes being made hold, until they are made and recorded.
#[derive(Debug)]
pub(crate) struct QuotaHold<'a> {
    making: &'a std::sync::Mutex<std::collections::HashMap<String, TenantUsage>>,
    tenant: String,
    held: TenantUsage,
}

impl Drop for QuotaHold<'_> {
    fn drop(&mut self) {
        let mut making = self.making.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(usage) = making.get_mut(&self.tenant) {
            *usage = usage.less(&self.held);
            if usage.sandboxes == 0 {
                making.remove(&self.tenant);
            }
        }
    }
}

impl TenantUsage {
    fn plus(&self, other: &TenantUsage) -> TenantUsage {
        TenantUsage {
            sandboxes: self.sandboxes + other.sandboxes,
            resources: Resources {
                cpus: self.resources.cpus + other.resources.cpus,
                memory_mib: self.resources.memory_mib + other.resources.memory_mib,
                disk_mib: self.resources.disk_mib + other.resources.disk_mib,
            },
        }
    }

    fn less(&self, other: &TenantUsage) -> TenantUsage {
        TenantUsage {
            sandboxes: self.sandboxes.saturating_sub(other.sandboxes),
            resources: Resources {
                cpus: (self.resources.cpus - other.resources.cpus).max(0.0),
                memory_mib: self
                    .resources
                    .memory_mib
                    .saturating_sub(other.resources.memory_mib),
                disk_mib: self
                    .resources
                    .disk_mib
                    .saturating_sub(other.resources.disk_mib),
            },
        }
    }

    /// `count` sandboxes holding `each`.
    fn of(count: usize, each: Resources) -> TenantUsage {
        TenantUsage {
            sandboxes: count,
            resources: Resources {
                cpus: each.cpus * count as f64,
                memory_mib: each.memory_mib.saturating_mul(count as u64),
                disk_mib: each.disk_mib.saturating_mul(count as u64),
            },
        }
    }
}

/// The first of `quotas` that `usage` passes, as a message that says what to do.
fn over_quota(quotas: &TenantQuotas, have: &TenantUsage, asked: &TenantUsage) -> Option<String> {
    let after = have.plus(asked);
    if let Some(max) = quotas.sandboxes {
        if after.sandboxes > max {
            return Some(format!(
                "this tenant has {} live sandboxes (running, paused or being made) of at most \
                 {max}; {} more would pass the limit: destroy some first",
                have.sandboxes, asked.sandboxes
            ));
        }
    }
    // A little slack for sums of fractional cores (0.1 * 3 is not 0.3).
    if let Some(max) = quotas.cpus {
        if after.resources.cpus > max + 1e-9 {
            return Some(format!(
                "this tenant's live sandboxes hold {:.1} cores of CPU quota of at most {max}; \
                 this would add {:.1}: destroy some (paused ones count too), or ask for fewer \
                 `cpus`",
                have.resources.cpus, asked.resources.cpus
            ));
        }
    }
    let mib = [
        (
            "memory",
            quotas.memory_mib,
            have.resources.memory_mib,
            asked.resources.memory_mib,
            "memory_mib",
        ),
        (
            "disk",
            quotas.disk_mib,
            have.resources.disk_mib,
            asked.resources.disk_mib,
            "disk_mib",
        ),
    ];
    for (what, max, have, asked, field) in mib {
        if let Some(max) = max {
            if have.saturating_add(asked) > max {
                return Some(format!(
                    "this tenant's live sandboxes hold {have} MiB of {what} of at most {max} \
                     MiB; this would add {asked} MiB: destroy some, or ask for less `{field}`"
                ));
            }
        }
    }
    None
}

impl Control {
    /// Holds what `count` new sandboxes holding `each` take of the caller's tenant's quotas,
    /// or refuses if that would take it past one.
    pub(crate) fn hold_quota(
        &self,
        who: &Principal,
        count: usize,
        each: Resources,
    ) -> Result<QuotaHold<'_>, ControlError> {
        let asked = TenantUsage::of(count, each);
        let mut making = self.inner.making.lock().unwrap_or_else(|e| e.into_inner());
        let recorded = self.inner.store.tenant_usage(&who.tenant)?;
        let have = recorded.plus(&making.get(&who.tenant).copied().unwrap_or_default());
        if let Some(message) = over_quota(&self.inner.config.quotas, &have, &asked) {
            return Err(ControlError::QuotaExceeded(message));
        }
        let entry = making.entry(who.tenant.clone()).or_default();
        *entry = entry.plus(&asked);
        Ok(QuotaHold {
            making: &self.inner.making,
            tenant: who.tenant.clone(),
            held: asked,
        })
    }
}
