//! Set-up shared by the API's tests.

use std::path::Path;
use std::time::Duration;

use kiln_control::ControlConfig;

/// A control plane on `data` with the repository's templates (`base` the default).
pub fn control_config(data: &Path) -> ControlConfig {
    ControlConfig {
        cache_dir: kiln_testinfra::cache().root().to_owned(),
        templates_dirs: vec![kiln_testinfra::repo_root().join("templates")],
        agent_binary: kiln_testinfra::static_agent(),
        engine: kiln_engine::EngineConfig::new(data),
        default_template: "base".into(),
        default_ttl: Duration::from_secs(600),
        max_ttl: Duration::from_secs(3600),
        paused_retention: Duration::from_secs(3600),
        quotas: kiln_control::TenantQuotas::default(),
        spec_caps: kiln_control::SpecCaps::default(),
        forwards: None,
    }
}
