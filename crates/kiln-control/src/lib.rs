//! kiln's control plane: the one place where every operation of the daemon exists, as a
//! typed function that takes the caller's [`Principal`]. The HTTP API and the CLI are thin
//! front ends over it; nothing here knows about HTTP.
//!
//! State: the engine owns live VMs; the [`store::Store`] (SQLite) records who owns which
//! sandbox, its metadata and time to live, and API keys (hashed).

pub mod code;
pub mod forwards;
pub mod in_flight;
mod quotas;
pub mod store;
pub mod templates;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent_client::ClientError;
use kiln_engine::{
    CreateOptions, Engine, EngineConfig, EngineError, Resources, Sandbox, SandboxEvent,
};
use kiln_proto::messages::ErrorKind;
use sha2::Digest;

pub use forwards::ForwardConfig;
pub use quotas::{SpecCaps, TenantQuotas};
pub use store::{
    Cursor, ForwardRecord, KeyRecord, SandboxFilter, SandboxRecord, SnapshotRecord, TenantUsage,
};
pub use templates::TemplateInfo;

/// Errors of the control plane, each with a meaning a front end can map (HTTP status codes
/// are chosen in exactly one place, the API crate).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No valid credentials.
    #[error("missing or invalid API key")]
    Unauthenticated,
    /// Valid credentials without the right.
    #[error("{0}")]
    Forbidden(String),
    /// The thing does not exist (or belongs to another tenant).
    #[error("{what} `{id}` not found")]
    NotFound {
        /// Kind of thing.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// Something the request named does not exist in the sandbox (a path, a process, a
    /// command); the message says what.
    #[error("{0}")]
    Missing(String),
    /// The request is malformed or asks for the impossible.
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the current state (e.g. a failed sandbox).
    #[error("{0}")]
    Conflict(String),
    /// Too large.
    #[error("{0}")]
    TooLarge(String),
    /// The sandbox or a resource is unavailable right now.
    #[error("{0}")]
    Unavailable(String),
    /// The tenant is at a limit the operator set (its live sandboxes).
    #[error("{0}")]
    QuotaExceeded(String),
    /// The host's disk space for sandboxes (its reserve or budget) does not allow it.
    #[error("{0}")]
    InsufficientStorage(String),
    /// The operation timed out.
    #[error("{0}")]
    Timeout(String),
    /// The guest could not do what was asked (its own failure, never the host's).
    #[error("{0}")]
    Guest(String),
    /// A bug or a broken host.
    #[error("{0}")]
    Internal(String),
}

impl From<store::StoreError> for ControlError {
    fn from(e: store::StoreError) -> Self {
        use rusqlite::ErrorCode;
        let code = match &e {
            store::StoreError::Sqlite(rusqlite::Error::SqliteFailure(failure, _)) => {
                Some(failure.code)
            }
            _ => None,
        };
        match code {
            // Another process (a backup, a `sqlite3` shell) holds the database past the busy
            // timeout: the request can be tried again; nothing was written.
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                ControlError::Unavailable(format!(
                    "the daemon's database is locked by another process; nothing was changed, \
                     try again ({})",
                    chain(&e)
                ))
            }
            Some(ErrorCode::DiskFull) => ControlError::InsufficientStorage(format!(
                "the daemon's data disk is full: its database cannot be written; nothing was \
                 changed ({})",
                chain(&e)
            )),
            _ => ControlError::Internal(chain(&e)),
        }
    }
}

impl From<EngineError> for ControlError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(message) => ControlError::Invalid(message),
            EngineError::NotFound(id) => ControlError::NotFound {
                what: "sandbox",
                id,
            },
            EngineError::Exhausted(message) => ControlError::Unavailable(message),
            EngineError::Stopping => ControlError::Unavailable(EngineError::Stopping.to_string()),
            EngineError::NoSpace(message) => ControlError::InsufficientStorage(message),
            EngineError::Conflict(message) => ControlError::Conflict(message),
            EngineError::Network(kiln_network::NetworkError::Policy(message)) => {
                ControlError::Invalid(message)
            }
            EngineError::Network(kiln_network::NetworkError::Exhausted(message)) => {
                ControlError::Unavailable(message)
            }
            other => ControlError::Internal(chain(&other)),
        }
    }
}

impl From<ClientError> for ControlError {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::Agent(agent) => match agent.kind {
                ErrorKind::NotFound => ControlError::Missing(agent.message.clone()),
                ErrorKind::InvalidArgument | ErrorKind::InvalidRequest => {
                    ControlError::Invalid(agent.message.clone())
                }
                // What is at the path now decides these: a conflict with the guest's files.
                ErrorKind::IsADirectory
                | ErrorKind::NotADirectory
                | ErrorKind::AlreadyExists
                | ErrorKind::DirectoryNotEmpty => ControlError::Conflict(agent.message.clone()),
                ErrorKind::PermissionDenied => ControlError::Forbidden(agent.message.clone()),
                ErrorKind::NoSpace => ControlError::TooLarge(agent.message.clone()),
                ErrorKind::LimitReached => ControlError::Conflict(agent.message.clone()),
                ErrorKind::Timeout => ControlError::Timeout(agent.message.clone()),
                _ => ControlError::Guest(format!("in the sandbox: {}", agent.message)),
            },
            ClientError::Timeout { .. } => ControlError::Timeout(chain(&e)),
            ClientError::InputClosed => ControlError::Conflict(e.to_string()),
            _ if e.is_connection_error() => in_flight::changed_under_call().unwrap_or_else(|| {
                ControlError::Unavailable(format!("the sandbox does not answer: {}", chain(&e)))
            }),
            // A protocol violation is the guest's doing: the host stays healthy.
            ClientError::Protocol(_) => ControlError::Guest(chain(&e)),
            _ => ControlError::Internal(chain(&e)),
        }
    }
}

/// Whether `a` and `b` are equal, in a time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    kiln_engine::error_chain(e)
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Their tenant: they see its sandboxes and nothing of other tenants.
    pub tenant: String,
    /// The key they used.
    pub key_id: String,
    /// May manage keys.
    pub admin: bool,
}

/// Configuration of the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Image artefact cache (`/var/cache/kiln`).
    pub cache_dir: PathBuf,
    /// Directories with `<name>/template.toml` specs: the global templates.
    pub templates_dirs: Vec<PathBuf>,
    /// The static guest agent built into images.
    pub agent_binary: PathBuf,
    /// The engine's settings; its data directory (`/var/lib/kiln`) holds the control plane's
    /// state too: the database, baked templates, sandboxes, tenants' templates.
    pub engine: EngineConfig,
    /// Template of a create that names none.
    pub default_template: String,
    /// Time to live of a create that gives none.
    pub default_ttl: Duration,
    /// Longest time to live a create or keepalive may ask for.
    pub max_ttl: Duration,
    /// How long a paused sandbox is kept (from its pause) before it is destroyed.
    pub paused_retention: Duration,
    /// What one tenant may hold.
    pub quotas: TenantQuotas,
    /// What a tenant's own template spec may ask for.
    pub spec_caps: SpecCaps,
    /// Plain TCP forwarding (`None`: off).
    pub forwards: Option<ForwardConfig>,
}

/// What a create asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateSandbox {
    /// Template name (the default template if absent).
    pub template: Option<String>,
    /// Time to live (the default if absent).
    pub ttl: Option<Duration>,
    /// Free-form labels to list by.
    pub metadata: BTreeMap<String, String>,
    /// Environment added to every command run in the sandbox.
    pub env: BTreeMap<String, String>,
    /// CPU quota in cores.
    pub cpus: Option<f64>,
    /// Memory limit of the VM process in MiB.
    pub memory_mib: Option<u64>,
    /// Root disk size in MiB.
    pub disk_mib: Option<u64>,
    /// Egress policy (the host's default if absent).
    pub network: Option<kiln_network::policy::EgressPolicy>,
    /// Its ports are reachable by their URLs without its access token.
    pub public_ports: bool,
    /// A call that needs it running resumes it when paused (default true).
    pub auto_resume: Option<bool>,
    /// What its time to live running out does (default: destroy).
    pub on_expiry: Option<kiln_engine::OnExpiry>,
    /// Create from this snapshot (id or name) instead of a template.
    pub snapshot: Option<String>,
}

/// What an update of a sandbox changes (at least one field; the others stay as they are).
#[derive(Debug, Clone, Default)]
pub struct SandboxUpdate {
    /// New time to live, counted from now.
    pub ttl: Option<Duration>,
    /// New egress policy, replacing the old one atomically.
    pub network: Option<kiln_network::policy::EgressPolicy>,
    /// Whether a call that needs it running resumes it when paused.
    pub auto_resume: Option<bool>,
    /// What its time to live running out does.
    pub on_expiry: Option<kiln_engine::OnExpiry>,
}

/// What a fork asks for.
#[derive(Debug, Clone, Default)]
pub struct ForkSandbox {
    /// How many children (1 to 32).
    pub count: usize,
    /// Their time to live (the parent's if absent).
    pub ttl: Option<Duration>,
    /// Labels added to the parent's (a key given here wins).
    pub metadata: BTreeMap<String, String>,
}

/// Lifecycle events buffered per tenant for its subscribers.
pub const EVENTS_PER_TENANT: usize = 1024;

/// Limits on what a create may carry.
/// Most entries of a sandbox's metadata.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// The longest time to live a sandbox may have unless the operator sets another
/// (`kiln serve --max-ttl-secs`).
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(86_400);
/// Longest metadata key, in characters (a key has at least one).
pub const MAX_METADATA_KEY_CHARS: usize = 256;
/// Longest metadata value, in characters.
pub const MAX_METADATA_VALUE_CHARS: usize = 1024;
const MAX_LABEL_BYTES: usize = 256;

/// The control plane; cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ControlConfig,
    engine: Engine,
    store: store::Store,
    /// Snapshots whose files were hashed and found whole by this run.
    verified_snapshots: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Sandboxes a `delete_sandbox` is destroying: it publishes their `destroyed` event
    /// itself, so the engine's is not published again.
    deleting: std::sync::Mutex<std::collections::HashSet<String>>,
    templates: templates::Templates,
    /// Lifecycle events, one buffer per tenant: a noisy tenant fills only its own, and a
    /// subscriber's lag counts only its own tenant's events.
    events: std::sync::Mutex<
        std::collections::HashMap<String, tokio::sync::broadcast::Sender<SandboxEvent>>,
    >,
    /// Set when the daemon stops.
    closing: tokio::sync::watch::Sender<bool>,
    /// What sandboxes being made hold, by tenant: counted against the quotas with the
    /// recorded ones, so concurrent creates cannot pass them together.
    making: std::sync::Mutex<std::collections::HashMap<String, TenantUsage>>,
    /// The TCP forwards listening now.
    forwards: forwards::Forwards,
    /// Held while a forward is opened (one host port is chosen at a time).
    opening_forward: tokio::sync::Mutex<()>,
}

/// The daemon's limit of open descriptors (its soft limit; the daemon raises it to the hard
/// one at start).
fn open_files_limit() -> usize {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| {
            usize::try_from(soft).unwrap_or(usize::MAX)
        })
}

fn sha256_hex(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Opens only the database under `data_dir`: for local administration (`kiln keys`) without a
/// running daemon's engine.
pub fn open_store(data_dir: &std::path::Path) -> Result<store::Store, ControlError> {
    std::fs::create_dir_all(data_dir)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| ControlError::Internal(format!("creating {}: {e}", data_dir.display())))?;
    Ok(store::Store::open(&data_dir.join("kiln.db"))?)
}

/// Mints an API key for `tenant` in `store`; returns the record and the secret (shown once,
/// stored only as a hash).
pub fn mint_key(
    store: &store::Store,
    tenant: &str,
    name: &str,
    admin: bool,
) -> Result<(KeyRecord, String), ControlError> {
    if !templates::valid_name(tenant) {
        return Err(ControlError::Invalid(format!(
            "`{tenant}` is not a tenant name (lowercase letters, digits, `-` and `_`)"
        )));
    }
    if name.len() > MAX_LABEL_BYTES {
        return Err(ControlError::Invalid("key name too long".into()));
    }
    let secret = format!("kiln_{}", hex::encode(rand::random::<[u8; 24]>()));
    let record = KeyRecord {
        id: format!("key_{}", hex::encode(rand::random::<[u8; 6]>())),
        tenant: tenant.to_owned(),
        name: name.to_owned(),
        admin,
        created_at_ms: store::now_ms(),
        revoked_at_ms: None,
    };
    store.insert_key(&record, &sha256_hex(&secret))?;
    Ok((record, secret))
}

impl Control {
    /// Opens the control plane: the database, the engine, the templates. Sandboxes an earlier
    /// run left running are re-adopted (their agents answer again); those that cannot be are
    /// marked failed and what they left is removed. Then the default template is made ready
    /// in the background.
    pub async fn open(config: ControlConfig) -> Result<Control, ControlError> {
        let data_dir = &config.engine.data_dir;
        let store = open_store(data_dir)?;
        let engine = Engine::new(config.engine.clone())?;
        let templates = templates::Templates::new(
            config.templates_dirs.clone(),
            data_dir.join("tenant-templates"),
            kiln_image::cache::Cache::new(&config.cache_dir),
            config.agent_binary.clone(),
            config.spec_caps.clone(),
        );
        let control = Control {
            inner: Arc::new(Inner {
                config,
                engine,
                store,
                verified_snapshots: std::sync::Mutex::new(std::collections::HashSet::new()),
                deleting: std::sync::Mutex::new(std::collections::HashSet::new()),
                templates,
                events: std::sync::Mutex::new(std::collections::HashMap::new()),
                closing: tokio::sync::watch::Sender::new(false),
                making: std::sync::Mutex::new(std::collections::HashMap::new()),
                // Each carried connection holds two descriptors: a quarter of the daemon's
                // for forwards at most.
                forwards: forwards::Forwards::new((open_files_limit() / 8).clamp(16, 4096)),
                opening_forward: tokio::sync::Mutex::new(()),
            }),
        };
        control.follow_engine();
        control.reconcile().await?;
        control.restore_forwards()?;
        let warm = control.clone();
        tokio::spawn(async move {
            let name = warm.inner.config.default_template.clone();
            let baked = warm
                .inner
                .templates
                .baked(&warm.inner.engine, "", &name, None)
                .await;
            if let Err(e) = baked {
                tracing::warn!(template = %name, error = %e, "preparing the default template");
            }
        });
        Ok(control)
    }

    async fn reconcile(&self) -> Result<(), ControlError> {
        let wanted: Vec<kiln_engine::AdoptRequest> = self
            .inner
            .store
            .all_sandboxes()?
            .into_iter()
            .filter(|record| record.state == "running" || record.state == "paused")
            .map(|record| kiln_engine::AdoptRequest {
                id: record.id,
                template: record.template,
                created_at_ms: record.created_at_ms.max(0) as u64,
                expires_at_ms: record.expires_at_ms.map(|ms| ms.max(0) as u64),
                egress: record.network,
                on_expiry: record.on_expiry,
            })
            .collect();
        for (id, result) in self.inner.engine.recover(wanted).await {
            match result {
                Ok(sandbox) => {
                    // What is on disk decides: a pause finished just before the daemon died
                    // is a pause, a resume whose guest ran is a resume.
                    let state = sandbox.state();
                    tracing::info!(sandbox = %id, state = state.name(), "re-adopted after a restart");
                    if matches!(
                        state,
                        kiln_engine::SandboxState::Running | kiln_engine::SandboxState::Paused
                    ) {
                        self.inner.store.set_state(&id, state.name())?;
                    }
                }
                Err(e) => self.inner.store.mark_failed(
                    &id,
                    &format!("lost while the daemon was down: {}", chain(&e)),
                )?,
            }
        }
        Ok(())
    }

    /// Mirrors the engine's lifecycle events (failures, expiries) into the store.
    fn follow_engine(&self) {
        let mut events = self.inner.engine.subscribe();
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let event = events.recv().await;
                let Some(inner) = weak.upgrade() else { return };
                let result = match event {
                    Ok(event) => match &event {
                        SandboxEvent::Failed { id, reason } => {
                            inner.publish(id, event.clone());
                            inner.forwards.stop_sandbox(id);
                            inner
                                .store
                                .delete_forwards(id)
                                .and_then(|()| inner.store.mark_failed(id, reason))
                        }
                        SandboxEvent::Destroyed { id, .. } => {
                            let deleting = inner
                                .deleting
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .contains(id);
                            if !deleting {
                                inner.publish(id, event.clone());
                            }
                            inner.forwards.stop_sandbox(id);
                            inner.store.delete_sandbox(id)
                        }
                        // Published by `create_sandbox` once the owner is recorded.
                        SandboxEvent::Created { .. } => Ok(()),
                        SandboxEvent::Forked { id, .. } => {
                            inner.publish(id, event.clone());
                            Ok(())
                        }
                        SandboxEvent::Paused { id } | SandboxEvent::Resumed { id } => {
                            inner.publish(id, event.clone());
                            inner.record_pause_state(id)
                        }
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "engine events lagged; re-reading the engine");
                        resync(&inner)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "recording a sandbox event");
                }
            }
        });
    }

    /// The engine (for benchmarks and tests).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The configuration.
    pub fn config(&self) -> &ControlConfig {
        &self.inner.config
    }

    /// The principal holding API key `secret`.
    pub fn authenticate(&self, secret: &str) -> Result<Principal, ControlError> {
        if !secret.starts_with("kiln_") || secret.len() > 128 {
            return Err(ControlError::Unauthenticated);
        }
        let key = self
            .inner
            .store
            .key_by_secret_hash(&sha256_hex(secret))?
            .ok_or(ControlError::Unauthenticated)?;
        Ok(Principal {
            tenant: key.tenant,
            key_id: key.id,
            admin: key.admin,
        })
    }

    fn require_admin(who: &Principal) -> Result<(), ControlError> {
        if who.admin {
            Ok(())
        } else {
            Err(ControlError::Forbidden(
                "managing keys needs an admin key".into(),
            ))
        }
    }

    /// Mints a key for `tenant` (admins only).
    pub fn create_key(
        &self,
        who: &Principal,
        tenant: &str,
        name: &str,
        admin: bool,
    ) -> Result<(KeyRecord, String), ControlError> {
        Control::require_admin(who)?;
        if tenant != who.tenant {
            return Err(ControlError::Forbidden(
                "an admin key makes keys for its own tenant only (`kiln keys create` on the \
                 daemon's host makes them for any)"
                    .into(),
            ));
        }
        mint_key(&self.inner.store, tenant, name, admin)
    }

    /// Keys of the caller's tenant (admins only).
    pub fn list_keys(&self, who: &Principal) -> Result<Vec<KeyRecord>, ControlError> {
        Control::require_admin(who)?;
        Ok(self.inner.store.list_keys(Some(&who.tenant))?)
    }

    /// Revokes a key of the caller's tenant (admins only).
    pub fn revoke_key(&self, who: &Principal, id: &str) -> Result<(), ControlError> {
        Control::require_admin(who)?;
        if id == who.key_id {
            // Revoking the key in use could leave a tenant with no admin key at all.
            return Err(ControlError::Conflict(format!(
                "key `{id}` is the key of this request: revoke it with another admin key, or \
                 on the host with `kiln keys revoke {id}`"
            )));
        }
        if self.inner.store.revoke_key(id, Some(&who.tenant))? {
            Ok(())
        } else {
            Err(ControlError::NotFound {
                what: "key",
                id: id.to_owned(),
            })
        }
    }

    /// Templates the caller can use.
    pub fn list_templates(&self, who: &Principal) -> Vec<TemplateInfo> {
        self.inner.templates.list(&who.tenant)
    }

    /// Template `name`.
    pub fn get_template(&self, who: &Principal, name: &str) -> Result<TemplateInfo, ControlError> {
        self.inner.templates.get(&who.tenant, name)
    }

    /// Builds and bakes the template `name` (global or the caller's own; store a new one with
    /// [`Control::save_template`] first); `progress` sees the image build's events (none if it
    /// was built before).
    pub async fn build_template(
        &self,
        who: &Principal,
        name: &str,
        progress: Option<Arc<dyn kiln_image::progress::Progress>>,
    ) -> Result<TemplateInfo, ControlError> {
        self.inner
            .templates
            .baked(&self.inner.engine, &who.tenant, name, progress)
            .await?;
        self.inner.templates.get(&who.tenant, name)
    }

    /// Stores `spec` (TOML) as one of the caller's own templates, without building it.
    pub fn save_template(&self, who: &Principal, spec: &str) -> Result<String, ControlError> {
        Ok(self
            .inner
            .templates
            .save(&who.tenant, spec, self.inner.config.quotas.templates)?
            .name)
    }

    /// Deletes one of the caller's own templates (sandboxes made from it keep running); its
    /// bakes go now, or with the last sandbox of the caller's that uses them.
    pub async fn delete_template(&self, who: &Principal, name: &str) -> Result<(), ControlError> {
        self.inner.templates.delete(&who.tenant, name)?;
        self.inner
            .templates
            .remove_unused_bakes(&self.inner.engine, name, Some(&who.tenant), None)
            .await;
        Ok(())
    }

    fn check_ttl(&self, ttl: Duration) -> Result<(), ControlError> {
        let max = self.inner.config.max_ttl;
        if ttl.is_zero() || ttl > max {
            return Err(ControlError::Invalid(format!(
                "ttl must be between 1 s and {} s (got {} s)",
                max.as_secs(),
                ttl.as_secs()
            )));
        }
        Ok(())
    }

    fn check_labels(map: &BTreeMap<String, String>, what: &str) -> Result<(), ControlError> {
        if map.len() > MAX_METADATA_ENTRIES {
            return Err(ControlError::Invalid(format!(
                "at most {MAX_METADATA_ENTRIES} {what} entries"
            )));
        }
        for (k, v) in map {
            let key_chars = k.chars().count();
            if key_chars == 0
                || key_chars > MAX_METADATA_KEY_CHARS
                || v.chars().count() > MAX_METADATA_VALUE_CHARS
            {
                return Err(ControlError::Invalid(format!(
                    "{what} keys are 1 to {MAX_METADATA_KEY_CHARS} characters and values at \
                     most {MAX_METADATA_VALUE_CHARS}"
                )));
            }
            if k.contains('\0') || v.contains('\0') {
                return Err(ControlError::Invalid(format!("{what} may not contain NUL")));
            }
        }
        Ok(())
    }

    /// Creates a sandbox for the caller.
    pub async fn create_sandbox(
        &self,
        who: &Principal,
        request: CreateSandbox,
    ) -> Result<SandboxRecord, ControlError> {
        let ttl = request.ttl.unwrap_or(self.inner.config.default_ttl);
        self.check_ttl(ttl)?;
        Control::check_labels(&request.metadata, "metadata")?;
        Control::check_labels(&request.env, "env")?;
        if request.env.keys().any(|name| name.contains('=')) {
            return Err(ControlError::Invalid(
                "env names may not contain `=`".into(),
            ));
        }
        // Refused at once when already at the quota of sandboxes, before a template is built.
        drop(self.hold_quota(who, 1, Resources::default())?);
        let name = request
            .template
            .clone()
            .unwrap_or_else(|| self.inner.config.default_template.clone());
        self.inner.store.ensure_tenant(&who.tenant)?;
        let (name, template) = match &request.snapshot {
            Some(key) => {
                if request.template.is_some() {
                    return Err(ControlError::Invalid(
                        "give a template or a snapshot, not both".into(),
                    ));
                }
                let snapshot = self.get_snapshot(who, key)?;
                (
                    snapshot.template.clone(),
                    self.open_snapshot(&snapshot).await?,
                )
            }
            None => {
                let template = self
                    .inner
                    .templates
                    .baked(&self.inner.engine, &who.tenant, &name, None)
                    .await?;
                (name, template)
            }
        };
        let options = CreateOptions {
            metadata: request.metadata.clone(),
            ttl: Some(ttl),
            cpus: request.cpus,
            memory_mib: request.memory_mib,
            disk_mib: request.disk_mib,
            network: request.network,
            on_expiry: request.on_expiry.unwrap_or_default(),
            ..CreateOptions::default()
        };
        let resources = kiln_engine::resources_for(&template, &options)?;
        let _quota = self.hold_quota(who, 1, resources)?;
        let sandbox = self.inner.engine.create(&template, options).await?;
        let info = sandbox.info();
        let record = SandboxRecord {
            id: info.id.clone(),
            tenant: who.tenant.clone(),
            template: name,
            state: "running".into(),
            reason: None,
            metadata: request.metadata,
            env: request.env,
            ttl_ms: Some(ttl.as_millis() as i64),
            created_at_ms: info.created_at_ms as i64,
            expires_at_ms: info.expires_at_ms.map(|ms| ms as i64),
            network: sandbox.egress(),
            access_token: sandbox
                .link()
                .map(|_| format!("kiln_at_{}", hex::encode(rand::random::<[u8; 24]>()))),
            public_ports: request.public_ports,
            auto_resume: request.auto_resume.unwrap_or(true),
            on_expiry: request.on_expiry.unwrap_or_default(),
            parent_id: None,
            resources,
        };
        if let Err(e) = self.inner.store.insert_sandbox(&record) {
            let _ = sandbox.destroy().await;
            return Err(e.into());
        }
        self.inner.publish_to(
            who.tenant.clone(),
            SandboxEvent::Created {
                id: record.id.clone(),
                template: record.template.clone(),
            },
        );
        Ok(record)
    }

    /// The caller's sandboxes, oldest first; returns the page and the cursor of the next.
    pub fn list_sandboxes(
        &self,
        who: &Principal,
        filter: &SandboxFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<SandboxRecord>, Option<String>), ControlError> {
        let limit = limit.clamp(1, 500);
        let cursor = match cursor {
            Some(text) => Some(
                Cursor::decode(text)
                    .ok_or_else(|| ControlError::Invalid("malformed cursor".into()))?,
            ),
            None => None,
        };
        let page = self
            .inner
            .store
            .list_sandboxes(&who.tenant, filter, cursor.as_ref(), limit)?;
        let next = (page.len() == limit).then(|| {
            let last = &page[page.len() - 1];
            Cursor {
                created_at_ms: last.created_at_ms,
                id: last.id.clone(),
            }
            .encode()
        });
        Ok((page, next))
    }

    /// The caller's sandbox `id` (another tenant's is not found).
    pub fn get_sandbox(&self, who: &Principal, id: &str) -> Result<SandboxRecord, ControlError> {
        self.inner
            .store
            .sandbox(id, Some(&who.tenant))?
            .ok_or_else(|| ControlError::NotFound {
                what: "sandbox",
                id: id.to_owned(),
            })
    }

    /// The caller's running sandbox `id`, with its live handle; a paused one is resumed
    /// first unless its `auto_resume` is off (concurrent callers share one resume).
    async fn live(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<(Arc<Sandbox>, SandboxRecord), ControlError> {
        let (sandbox, record) = self.handle(who, id)?;
        match sandbox.state() {
            kiln_engine::SandboxState::Running => {}
            kiln_engine::SandboxState::Paused
            | kiln_engine::SandboxState::Pausing
            | kiln_engine::SandboxState::Resuming
                if record.auto_resume =>
            {
                self.resume(&sandbox).await?;
            }
            state => {
                let hint = if state == kiln_engine::SandboxState::Paused {
                    ": resume it (POST /v1/sandboxes/{id}/resume), or turn auto_resume on"
                } else {
                    ""
                };
                return Err(ControlError::Conflict(format!(
                    "sandbox `{id}` is {}{}",
                    state.name(),
                    hint.replace("{id}", id)
                )));
            }
        }
        in_flight::note(&sandbox);
        Ok((sandbox, record))
    }

    /// The caller's sandbox `id` that is not failed, with its handle, in whatever state.
    fn handle(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<(Arc<Sandbox>, SandboxRecord), ControlError> {
        let record = self.get_sandbox(who, id)?;
        if record.state == "failed" {
            return Err(ControlError::Conflict(format!(
                "sandbox `{id}` is {}: {}",
                record.state,
                record.reason.clone().unwrap_or_default()
            )));
        }
        Ok((self.inner.engine.get(id)?, record))
    }

    /// Pauses the caller's sandbox `id` to disk (its RAM and VMM process are given back; it
    /// is kept for the paused retention, then destroyed).
    pub async fn pause_sandbox(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<SandboxRecord, ControlError> {
        let (sandbox, _) = self.handle(who, id)?;
        Control::to_the_end(&sandbox, |sandbox| async move {
            sandbox.pause().await.map(drop)
        })
        .await?;
        self.inner.record_pause_state(id)?;
        self.get_sandbox(who, id)
    }

    /// Forks the caller's sandbox `id` into `request.count` children, each a sandbox of the
    /// caller's continuing from this moment of the parent (a paused parent is resumed first).
    /// Children inherit the parent's template, env, metadata (merged with the request's),
    /// limits, network policy, port and pause settings; each gets its own id and access
    /// token. All or nothing. Returns the children's records and what the fork cost.
    pub async fn fork_sandbox(
        &self,
        who: &Principal,
        id: &str,
        request: ForkSandbox,
    ) -> Result<(Vec<SandboxRecord>, kiln_engine::ForkReport), ControlError> {
        if !(1..=32).contains(&request.count) {
            return Err(ControlError::Invalid(format!(
                "count must be 1 to 32 (got {})",
                request.count
            )));
        }
        let (parent, record) = self.handle(who, id)?;
        let ttl = request.ttl.unwrap_or_else(|| {
            record.ttl_ms.map_or(self.inner.config.default_ttl, |ms| {
                Duration::from_millis(ms as u64)
            })
        });
        self.check_ttl(ttl)?;
        let mut metadata = record.metadata.clone();
        metadata.extend(request.metadata);
        Control::check_labels(&metadata, "metadata")?;
        let _quota = self.hold_quota(who, request.count, record.resources)?;
        let (children, report) = self
            .inner
            .engine
            .fork(
                &parent,
                request.count,
                CreateOptions {
                    metadata: metadata.clone(),
                    ttl: Some(ttl),
                    on_expiry: record.on_expiry,
                    ..CreateOptions::default()
                },
            )
            .await?;
        let mut records = Vec::new();
        for child in &children {
            let info = child.info();
            let child_record = SandboxRecord {
                id: info.id.clone(),
                tenant: record.tenant.clone(),
                template: record.template.clone(),
                state: "running".into(),
                reason: None,
                metadata: metadata.clone(),
                env: record.env.clone(),
                ttl_ms: Some(ttl.as_millis() as i64),
                created_at_ms: info.created_at_ms as i64,
                expires_at_ms: info.expires_at_ms.map(|ms| ms as i64),
                network: child.egress(),
                access_token: child
                    .link()
                    .map(|_| format!("kiln_at_{}", hex::encode(rand::random::<[u8; 24]>()))),
                public_ports: record.public_ports,
                auto_resume: record.auto_resume,
                on_expiry: record.on_expiry,
                parent_id: Some(id.to_owned()),
                resources: record.resources,
            };
            if let Err(e) = self.inner.store.insert_sandbox(&child_record) {
                for child in &children {
                    let _ = child.destroy().await;
                    let _ = self.inner.store.delete_sandbox(child.id());
                }
                return Err(e.into());
            }
            records.push(child_record);
        }
        for child in &records {
            self.inner.publish_to(
                who.tenant.clone(),
                SandboxEvent::Created {
                    id: child.id.clone(),
                    template: child.template.clone(),
                },
            );
        }
        Ok((records, report))
    }

    /// Snapshots the caller's sandbox `id` as `name` (unique among the tenant's snapshots):
    /// its memory, device state and disk, kept until deleted, also across restarts. The
    /// sandbox stops briefly and runs on; a paused one is resumed first.
    pub async fn create_snapshot(
        &self,
        who: &Principal,
        id: &str,
        name: &str,
    ) -> Result<SnapshotRecord, ControlError> {
        if !templates::valid_name(name) {
            return Err(ControlError::Invalid(format!(
                "`{name}` is not a snapshot name: 1 to 63 of a-z, 0-9, - and _, starting with a letter or digit"
            )));
        }
        if self.inner.store.snapshot(&who.tenant, name)?.is_some() {
            return Err(ControlError::Conflict(format!(
                "a snapshot named `{name}` exists"
            )));
        }
        let (sandbox, record) = self.handle(who, id)?;
        let snapshot = self.inner.engine.snapshot(&sandbox).await?;
        let dir = snapshot
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Its own files: a memory file it shares with its template (a hard link) is the
        // template's cost while that exists.
        let size_bytes = std::fs::read_dir(&snapshot.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| std::os::unix::fs::MetadataExt::nlink(m) == 1)
                    .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                    .sum::<u64>()
            })
            .unwrap_or(0);
        let created = SnapshotRecord {
            id: format!("snap-{}", hex::encode(rand::random::<[u8; 6]>())),
            tenant: who.tenant.clone(),
            name: name.to_owned(),
            sandbox_id: id.to_owned(),
            template: record.template,
            dir,
            size_bytes: size_bytes as i64,
            created_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        };
        if !self.inner.store.insert_snapshot(&created)? {
            let _ = self.inner.engine.remove_snapshot(&snapshot);
            return Err(ControlError::Conflict(format!(
                "a snapshot named `{name}` exists"
            )));
        }
        self.inner
            .verified_snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(created.dir.clone());
        Ok(created)
    }

    /// How many times a template was made ready (built and baked, or its bake found on disk)
    /// since the daemon started, and how many attempts failed.
    pub fn template_preparations(&self) -> (u64, u64) {
        self.inner.templates.preparations()
    }

    /// How many sandboxes there are, by state and template, of all tenants (for the
    /// operator's metrics; nothing names a tenant or a sandbox).
    pub fn sandbox_counts(&self) -> Result<Vec<(String, String, i64)>, ControlError> {
        Ok(self.inner.store.count_sandboxes()?)
    }

    /// The caller's snapshots, oldest first.
    pub fn list_snapshots(&self, who: &Principal) -> Result<Vec<SnapshotRecord>, ControlError> {
        Ok(self.inner.store.list_snapshots(&who.tenant)?)
    }

    /// The caller's snapshot whose id or name is `key`.
    pub fn get_snapshot(&self, who: &Principal, key: &str) -> Result<SnapshotRecord, ControlError> {
        self.inner
            .store
            .snapshot(&who.tenant, key)?
            .ok_or_else(|| ControlError::NotFound {
                what: "snapshot",
                id: key.to_owned(),
            })
    }

    /// Deletes the caller's snapshot `key`; a conflict listing them while sandboxes depend on
    /// its files.
    pub fn delete_snapshot(&self, who: &Principal, key: &str) -> Result<(), ControlError> {
        let record = self.get_snapshot(who, key)?;
        match self.inner.engine.open_snapshot(&record.dir) {
            Ok(snapshot) => self.inner.engine.remove_snapshot(&snapshot)?,
            // Files already gone or unreadable: only the record is left to forget.
            Err(e) => {
                tracing::warn!(snapshot = %record.id, error = %e, "deleting a snapshot whose files are not readable")
            }
        }
        self.inner.store.delete_snapshot(&record.id)?;
        Ok(())
    }

    /// The snapshot's files, checked (hashed once per run of the daemon).
    async fn open_snapshot(
        &self,
        record: &SnapshotRecord,
    ) -> Result<kiln_engine::BakedTemplate, ControlError> {
        let snapshot = self.inner.engine.open_snapshot(&record.dir)?;
        let verified = self
            .inner
            .verified_snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&record.dir);
        if !verified {
            let checked = snapshot.clone();
            tokio::task::spawn_blocking(move || checked.verify())
                .await
                .map_err(|e| ControlError::Internal(format!("snapshot check: {e}")))??;
            self.inner
                .verified_snapshots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(record.dir.clone());
        }
        Ok(snapshot)
    }

    /// Resumes the caller's paused sandbox `id` (its time to live starts again).
    pub async fn resume_sandbox(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<SandboxRecord, ControlError> {
        let (sandbox, _) = self.handle(who, id)?;
        self.resume(&sandbox).await?;
        self.get_sandbox(who, id)
    }

    async fn resume(&self, sandbox: &Arc<Sandbox>) -> Result<(), ControlError> {
        Control::to_the_end(sandbox, |sandbox| async move {
            sandbox.resume().await.map(drop)
        })
        .await?;
        self.inner.record_pause_state(sandbox.id())?;
        Ok(())
    }

    /// Runs `operation` on `sandbox` in a task of its own and waits for it: a pause or resume
    /// cut halfway (its caller gone: a client that hung up, a forward closed, a connection
    /// timed out) would leave the sandbox neither paused nor running.
    async fn to_the_end<F, Fut>(sandbox: &Arc<Sandbox>, operation: F) -> Result<(), ControlError>
    where
        F: FnOnce(Arc<Sandbox>) -> Fut,
        Fut: std::future::Future<Output = Result<(), EngineError>> + Send + 'static,
    {
        tokio::spawn(operation(Arc::clone(sandbox)))
            .await
            .map_err(|e| ControlError::Internal(format!("sandbox operation task: {e}")))?
            .map_err(ControlError::from)
    }

    /// Destroys the caller's sandbox `id`.
    pub async fn delete_sandbox(&self, who: &Principal, id: &str) -> Result<(), ControlError> {
        let record = self.get_sandbox(who, id)?;
        let deleting = || {
            self.inner
                .deleting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        deleting().insert(id.to_owned());
        let result = self.destroy_and_forget(record).await;
        deleting().remove(id);
        result
    }

    /// The rest of [`Control::delete_sandbox`].
    async fn destroy_and_forget(&self, record: SandboxRecord) -> Result<(), ControlError> {
        let id = record.id.as_str();
        match self.inner.engine.get(id) {
            Ok(sandbox) => sandbox.destroy().await?,
            // A failed sandbox of an earlier run: only its record and leftovers remain.
            Err(EngineError::NotFound(_)) if record.state == "failed" => {
                self.inner.engine.remove_leftovers(id)?;
            }
            // Being destroyed right now (a concurrent delete, its time to live): done.
            Err(EngineError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        // Published here (the engine's event is not, while this runs): that event may be
        // handled after the record below is gone, when its owner is no longer known.
        self.inner.publish_to(
            record.tenant.clone(),
            SandboxEvent::Destroyed {
                id: id.to_owned(),
                expired: false,
            },
        );
        self.inner.store.delete_sandbox(id)?;
        if !self
            .inner
            .templates
            .exists(&record.tenant, &record.template)
        {
            // Made from a tenant template since deleted: its bakes go with their last user.
            self.inner
                .templates
                .remove_unused_bakes(
                    &self.inner.engine,
                    &record.template,
                    Some(&record.tenant),
                    None,
                )
                .await;
        }
        Ok(())
    }

    /// Changes the caller's sandbox `id`: its time to live (counted from now) and its egress
    /// policy (replaced atomically; established connections to what it now denies are cut).
    /// Fields not given stay as they are; at least one must be.
    pub async fn update_sandbox(
        &self,
        who: &Principal,
        id: &str,
        update: SandboxUpdate,
    ) -> Result<SandboxRecord, ControlError> {
        if update.ttl.is_none()
            && update.network.is_none()
            && update.auto_resume.is_none()
            && update.on_expiry.is_none()
        {
            return Err(ControlError::Invalid(
                "nothing to change: give ttl_secs, network, auto_resume or on_expiry".into(),
            ));
        }
        if let Some(ttl) = update.ttl {
            self.check_ttl(ttl)?;
        }
        let (sandbox, mut record) = self.handle(who, id)?;
        if let Some(policy) = update.network {
            let applied = Arc::clone(&sandbox);
            tokio::task::spawn_blocking(move || applied.set_egress(policy))
                .await
                .map_err(|e| ControlError::Internal(format!("policy task: {e}")))??;
            record.network = sandbox.egress();
            if let Some(policy) = &record.network {
                self.inner.store.set_network(id, policy)?;
            }
        }
        if update.auto_resume.is_some() || update.on_expiry.is_some() {
            record.auto_resume = update.auto_resume.unwrap_or(record.auto_resume);
            record.on_expiry = update.on_expiry.unwrap_or(record.on_expiry);
            sandbox.set_on_expiry(record.on_expiry);
            self.inner
                .store
                .set_pause_settings(id, record.auto_resume, record.on_expiry)?;
        }
        match update.ttl {
            Some(ttl) => self.apply_ttl(&sandbox, record, ttl),
            None => Ok(record),
        }
    }

    /// Restarts the time to live of the caller's sandbox `id` with its current length.
    pub fn keepalive(&self, who: &Principal, id: &str) -> Result<SandboxRecord, ControlError> {
        let (sandbox, record) = self.handle(who, id)?;
        let ttl = record.ttl_ms.map_or(self.inner.config.default_ttl, |ms| {
            Duration::from_millis(ms as u64)
        });
        self.check_ttl(ttl)?;
        self.apply_ttl(&sandbox, record, ttl)
    }

    /// Gives a running sandbox time to live `ttl` from now, in the engine and the store;
    /// returns its record as updated.
    fn apply_ttl(
        &self,
        sandbox: &Sandbox,
        mut record: SandboxRecord,
        ttl: Duration,
    ) -> Result<SandboxRecord, ControlError> {
        record.ttl_ms = Some(ttl.as_millis() as i64);
        // A paused sandbox keeps its retention; the time to live counts again from its resume.
        if sandbox.state() == kiln_engine::SandboxState::Paused {
            self.inner
                .store
                .set_expiry(&record.id, record.ttl_ms, record.expires_at_ms)?;
            return Ok(record);
        }
        sandbox.set_ttl(Some(ttl));
        record.expires_at_ms = sandbox.info().expires_at_ms.map(|ms| ms as i64);
        self.inner
            .store
            .set_expiry(&record.id, record.ttl_ms, record.expires_at_ms)?;
        Ok(record)
    }

    /// Where the daemon reaches port `port` of the caller's running sandbox `id` (the path
    /// form of ingress, authenticated by API key).
    pub async fn ingress_for(
        &self,
        who: &Principal,
        id: &str,
        port: u16,
    ) -> Result<std::net::SocketAddr, ControlError> {
        let (sandbox, _) = self.live(who, id).await?;
        Control::port_of(&sandbox, port)
    }

    /// Where the daemon reaches port `port` of running sandbox `id` for a request by its
    /// URL (the host form of ingress): its ports must be public, or `token` its access
    /// token. A wrong or missing token is `Unauthenticated`, whether or not `id` exists.
    /// A paused sandbox is resumed first (scale to zero) unless its `auto_resume` is off.
    pub async fn ingress_by_token(
        &self,
        id: &str,
        port: u16,
        token: Option<&str>,
    ) -> Result<std::net::SocketAddr, ControlError> {
        let record = self
            .inner
            .store
            .sandbox(id, None)?
            .ok_or(ControlError::Unauthenticated)?;
        let allowed = record.public_ports
            || matches!(
                (token, record.access_token.as_deref()),
                (Some(given), Some(expected)) if constant_time_eq(given.as_bytes(), expected.as_bytes())
            );
        if !allowed {
            return Err(ControlError::Unauthenticated);
        }
        let (sandbox, _) = self.live(&Control::owner_of(&record), id).await?;
        Control::port_of(&sandbox, port)
    }

    /// The owner of `record`, as a principal (a token or a forward stands for it).
    fn owner_of(record: &SandboxRecord) -> Principal {
        Principal {
            tenant: record.tenant.clone(),
            key_id: String::new(),
            admin: false,
        }
    }

    fn port_of(sandbox: &Sandbox, port: u16) -> Result<std::net::SocketAddr, ControlError> {
        if port == 0 {
            return Err(ControlError::Invalid("ports are 1 to 65535".into()));
        }
        let link = sandbox.link().ok_or_else(|| {
            ControlError::Unavailable(
                "this host runs without sandbox networking: ports cannot be reached".into(),
            )
        })?;
        Ok(std::net::SocketAddr::from((link.sandbox, port)))
    }

    /// What the caller's sandbox `id` uses now, measured on the host (a paused sandbox is
    /// not resumed: it has no CPU or memory figures then).
    pub fn sandbox_usage(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<(SandboxRecord, kiln_engine::ResourceUsage), ControlError> {
        let record = self.get_sandbox(who, id)?;
        let usage = match self.inner.engine.get(id) {
            Ok(sandbox) => sandbox.usage(),
            // A sandbox the engine no longer holds (failed, or gone since) uses nothing.
            Err(_) => kiln_engine::ResourceUsage::default(),
        };
        Ok((record, usage))
    }

    /// The last `lines` lines of the sandbox's guest console.
    pub fn console_log(
        &self,
        who: &Principal,
        id: &str,
        lines: usize,
    ) -> Result<String, ControlError> {
        self.get_sandbox(who, id)?;
        Ok(self.inner.engine.get(id)?.console_tail(lines.min(10_000)))
    }

    /// The agent of the caller's running sandbox `id`, and the environment its commands get.
    pub async fn agent(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<(Arc<Sandbox>, BTreeMap<String, String>), ControlError> {
        let (sandbox, record) = self.live(who, id).await?;
        Ok((sandbox, record.env))
    }

    /// Lifecycle events of the caller's tenant's sandboxes from now on. A subscriber that
    /// falls more than [`EVENTS_PER_TENANT`] events behind gets `Lagged` and should re-list.
    pub fn events(&self, who: &Principal) -> tokio::sync::broadcast::Receiver<SandboxEvent> {
        self.inner.tenant_events(&who.tenant).subscribe()
    }

    /// Ends long-lived event streams (the daemon is stopping).
    pub fn begin_shutdown(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Becomes true when the daemon stops.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }

    /// Stops the daemon's work, leaving its sandboxes running for the next start to re-adopt
    /// (pre-started VMMs are removed).
    pub async fn detach(&self) {
        // Forwards stop listening (they stay recorded: the next run listens again).
        self.inner.forwards.stop_all();
        self.inner.engine.detach_all().await;
    }

    /// Destroys every sandbox and stops pre-started VMMs (a daemon's shutdown that leaves
    /// nothing behind).
    pub async fn shutdown(&self) {
        self.inner.forwards.stop_all();
        self.inner.engine.shutdown_prestarted().await;
        // A create in flight would otherwise register its sandbox after the list below.
        self.inner
            .engine
            .stop_creating(kiln_engine::STOP_WAIT)
            .await;
        for info in self.inner.engine.list() {
            match self.inner.engine.destroy(&info.id).await {
                // Gone meanwhile (its time to live ran out, or its VMM ended).
                Ok(()) | Err(EngineError::NotFound(_)) => {}
                Err(e) => tracing::warn!(sandbox = %info.id, error = %e, "destroying at shutdown"),
            }
        }
        self.inner.engine.close_network();
    }
}

impl Inner {
    /// Records sandbox `id`'s pause state as the engine has it now (events may arrive after a
    /// later change): paused, kept for the paused retention from now; running, its time to
    /// live counted again.
    fn record_pause_state(&self, id: &str) -> Result<(), store::StoreError> {
        let (Ok(sandbox), Some(record)) = (self.engine.get(id), self.store.sandbox(id, None)?)
        else {
            return Ok(());
        };
        let ttl = match sandbox.state() {
            kiln_engine::SandboxState::Paused => {
                if record.state == "paused" {
                    return Ok(());
                }
                self.config.paused_retention
            }
            kiln_engine::SandboxState::Running => {
                if record.state == "running" {
                    return Ok(());
                }
                record.ttl_ms.map_or(self.config.default_ttl, |ms| {
                    Duration::from_millis(ms as u64)
                })
            }
            _ => return Ok(()),
        };
        sandbox.set_ttl(Some(ttl));
        self.store.set_state(id, sandbox.state().name())?;
        self.store
            .set_expires_at(id, sandbox.info().expires_at_ms.map(|ms| ms as i64))
    }

    /// Publishes `event` of sandbox `id` to its tenant (looked up before the record goes).
    fn publish(&self, id: &str, event: SandboxEvent) {
        if let Ok(Some(record)) = self.store.sandbox(id, None) {
            self.publish_to(record.tenant, event);
        }
    }

    /// Publishes `event` to `tenant`'s subscribers (kept only while someone listens).
    fn publish_to(&self, tenant: String, event: SandboxEvent) {
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(sender) = events.get(&tenant) {
            if sender.send(event).is_err() {
                events.remove(&tenant);
            }
        }
    }

    /// `tenant`'s event channel, made on first use.
    fn tenant_events(&self, tenant: &str) -> tokio::sync::broadcast::Sender<SandboxEvent> {
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(tenant.to_owned())
            .or_insert_with(|| tokio::sync::broadcast::Sender::new(EVENTS_PER_TENANT))
            .clone()
    }
}

/// Brings the store in line with the engine after missed events.
fn resync(inner: &Inner) -> Result<(), store::StoreError> {
    let live: BTreeMap<String, kiln_engine::SandboxInfo> = inner
        .engine
        .list()
        .into_iter()
        .map(|info| (info.id.clone(), info))
        .collect();
    for record in inner.store.all_sandboxes()? {
        match live.get(&record.id).map(|info| &info.state) {
            Some(kiln_engine::SandboxState::Failed { reason }) if record.state == "running" => {
                inner.forwards.stop_sandbox(&record.id);
                inner.store.delete_forwards(&record.id)?;
                inner.store.mark_failed(&record.id, reason)?;
            }
            None if record.state == "running" => {
                inner.forwards.stop_sandbox(&record.id);
                inner.store.delete_sandbox(&record.id)?
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(code: i32) -> store::StoreError {
        store::StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    }

    #[test]
    fn a_busy_or_full_database_is_told_apart_from_a_bug() {
        let busy = ControlError::from(sqlite(rusqlite::ffi::SQLITE_BUSY));
        assert!(
            matches!(&busy, ControlError::Unavailable(m) if m.contains("locked by another process")),
            "{busy:?}"
        );
        let locked = ControlError::from(sqlite(rusqlite::ffi::SQLITE_LOCKED));
        assert!(matches!(locked, ControlError::Unavailable(_)), "{locked:?}");
        let full = ControlError::from(sqlite(rusqlite::ffi::SQLITE_FULL));
        assert!(
            matches!(&full, ControlError::InsufficientStorage(m) if m.contains("disk is full")),
            "{full:?}"
        );
        let corrupt = ControlError::from(sqlite(rusqlite::ffi::SQLITE_CORRUPT));
        assert!(matches!(corrupt, ControlError::Internal(_)), "{corrupt:?}");
    }
}
