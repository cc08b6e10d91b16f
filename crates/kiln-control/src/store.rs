//! The daemon's records in SQLite (WAL): tenants, API keys (hashed) and sandboxes.
//!
//! Queries are small and indexed, so they run inline under one connection's lock.

use std::collections::BTreeMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

/// `value` as SQLite stores integers, the largest one if it does not fit.
fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Schema version this build writes; older databases are migrated on open.
const SCHEMA_VERSION: i64 = 9;

/// The current schema, for a new database.
const SCHEMA: &str = "
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    admin INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    template TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    metadata TEXT NOT NULL,
    env TEXT NOT NULL,
    ttl_ms INTEGER,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    network TEXT,
    access_token TEXT,
    public_ports INTEGER NOT NULL DEFAULT 0,
    auto_resume INTEGER NOT NULL DEFAULT 1,
    on_expiry TEXT NOT NULL DEFAULT 'destroy',
    parent_id TEXT,
    cpus REAL NOT NULL DEFAULT 0,
    memory_mib INTEGER NOT NULL DEFAULT 0,
    disk_mib INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX sandboxes_by_tenant ON sandboxes (tenant_id, created_at_ms, id);
CREATE TABLE forwards (
    sandbox_id TEXT NOT NULL,
    port INTEGER NOT NULL,
    host_port INTEGER NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (sandbox_id, port)
);
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    template TEXT NOT NULL,
    dir TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);
";

/// Migrations from each older version to the next: `MIGRATIONS[v - 1]` takes version `v` to
/// `v + 1`.
const MIGRATIONS: &[&str] = &[
    // 1 -> 2: every command of a sandbox gets the env given at create.
    "ALTER TABLE sandboxes ADD COLUMN env TEXT NOT NULL DEFAULT '{}';",
    // 2 -> 3: a sandbox's egress policy (JSON; NULL without networking).
    "ALTER TABLE sandboxes ADD COLUMN network TEXT;",
    // 3 -> 4: ingress: a sandbox's access token for its ports, and whether they are public.
    "ALTER TABLE sandboxes ADD COLUMN access_token TEXT;
     ALTER TABLE sandboxes ADD COLUMN public_ports INTEGER NOT NULL DEFAULT 0;",
    // 4 -> 5: pause: whether a call that needs a paused sandbox running resumes it, and what
    // its time to live running out does.
    "ALTER TABLE sandboxes ADD COLUMN auto_resume INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE sandboxes ADD COLUMN on_expiry TEXT NOT NULL DEFAULT 'destroy';",
    // 5 -> 6: fork: the sandbox a child was forked from.
    "ALTER TABLE sandboxes ADD COLUMN parent_id TEXT;",
    // 6 -> 7: snapshots as objects.
    "CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        name TEXT NOT NULL,
        sandbox_id TEXT NOT NULL,
        template TEXT NOT NULL,
        dir TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        UNIQUE (tenant_id, name)
     );",
    // 7 -> 8: what each sandbox holds of the host, counted against its tenant's quotas
    // (sandboxes recorded before hold 0 until they go).
    "ALTER TABLE sandboxes ADD COLUMN cpus REAL NOT NULL DEFAULT 0;
     ALTER TABLE sandboxes ADD COLUMN memory_mib INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sandboxes ADD COLUMN disk_mib INTEGER NOT NULL DEFAULT 0;",
    // 8 -> 9: plain TCP forwards from host ports to sandbox ports.
    "CREATE TABLE forwards (
        sandbox_id TEXT NOT NULL,
        port INTEGER NOT NULL,
        host_port INTEGER NOT NULL UNIQUE,
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (sandbox_id, port)
     );",
];

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value does not parse.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The database file is damaged or is not a database (it is left as it is).
    #[error(
        "{} is damaged or is not a kiln database ({detail}); it was left untouched: restore it \
         from a backup, or move it aside to start with an empty one (sandboxes still running \
         are then not taken over)",
        path.display()
    )]
    Damaged {
        /// The file.
        path: std::path::PathBuf,
        /// What SQLite said.
        detail: String,
    },
    /// The database is newer than this build.
    #[error(
        "database schema {found} is newer than this kiln (schema {SCHEMA_VERSION}): upgrade kiln"
    )]
    TooNew {
        /// The database's version.
        found: i64,
    },
    /// The database's files could not be made private.
    #[error("making the database root's alone")]
    Io(#[source] std::io::Error),
}

/// An API key as stored (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyRecord {
    /// Public id (`key_…`).
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// A label.
    pub name: String,
    /// May manage keys.
    pub admin: bool,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
    /// Revocation time, if revoked.
    pub revoked_at_ms: Option<i64>,
}

/// What a tenant's live sandboxes hold, together.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TenantUsage {
    /// How many there are.
    pub sandboxes: usize,
    /// Their CPU quotas, memory limits and disk sizes, summed.
    pub resources: kiln_engine::Resources,
}

/// A sandbox as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRecord {
    /// Its id.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its template.
    pub template: String,
    /// `running`, `paused` or `failed` (the transitions between running and paused are the
    /// engine's, not recorded).
    pub state: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// Environment of every command run in it.
    pub env: BTreeMap<String, String>,
    /// Time to live it was created (or last kept alive) with.
    pub ttl_ms: Option<i64>,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
    /// When the engine destroys it.
    pub expires_at_ms: Option<i64>,
    /// Its egress policy (`None` without networking).
    pub network: Option<kiln_network::policy::EgressPolicy>,
    /// The token that opens its ports (`None` without networking).
    pub access_token: Option<String>,
    /// Its ports are reachable without the token.
    pub public_ports: bool,
    /// A call that needs it running resumes it if it is paused.
    pub auto_resume: bool,
    /// What its time to live running out does.
    pub on_expiry: kiln_engine::OnExpiry,
    /// The sandbox it was forked from.
    pub parent_id: Option<String>,
    /// What it holds of the host.
    pub resources: kiln_engine::Resources,
}

/// A plain TCP forward as recorded: connections to `host_port` on the daemon's forwarding
/// address go to port `port` of the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRecord {
    /// The sandbox.
    pub sandbox_id: String,
    /// Its port.
    pub port: u16,
    /// The host's port.
    pub host_port: u16,
    /// When it was opened, ms since the epoch.
    pub created_at_ms: i64,
}

/// A snapshot as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Its id.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its name, unique in its tenant.
    pub name: String,
    /// The sandbox it was taken of.
    pub sandbox_id: String,
    /// That sandbox's template.
    pub template: String,
    /// Its directory's name under the data directory's `templates`.
    pub dir: String,
    /// Its files' size on disk.
    pub size_bytes: i64,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
}

/// A sandbox row with its JSON columns (metadata, env, network) not parsed yet.
type RawSandbox = (SandboxRecord, String, String, Option<String>);

/// Which sandboxes to list.
#[derive(Debug, Clone, Default)]
pub struct SandboxFilter {
    /// Only in this state.
    pub state: Option<String>,
    /// Only those whose metadata has all these pairs.
    pub metadata: BTreeMap<String, String>,
}

/// A page position: list after this (created_at_ms, id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Creation time of the last item seen.
    pub created_at_ms: i64,
    /// Its id.
    pub id: String,
}

impl Cursor {
    /// Opaque text form.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_at_ms, self.id)
    }

    /// Parses [`Cursor::encode`]'s output.
    pub fn decode(text: &str) -> Option<Cursor> {
        let (ms, id) = text.split_once('.')?;
        Some(Cursor {
            created_at_ms: ms.parse().ok()?,
            id: id.to_owned(),
        })
    }
}

/// The database.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    /// Opens (creating or migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_file(path).map_err(|e| match e {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(failure, message))
                if matches!(
                    failure.code,
                    rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
                ) =>
            {
                StoreError::Damaged {
                    path: path.to_owned(),
                    detail: message.unwrap_or_else(|| failure.to_string()),
                }
            }
            other => other,
        })
    }

    fn open_file(path: &Path) -> Result<Store, StoreError> {
        // The daemon and `kiln keys` may open a new database at the same moment: opening
        // (creating the schema, migrating) is done by one process at a time, under a lock
        // on a file next to it.
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(StoreError::Io)?;
        let _opening = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| StoreError::Io(e.into()))?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Every tenant's sandbox records (their env among them) are in here: root's alone,
        // also for a database an earlier version made readable.
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StoreError::Io(e));
                }
                _ => {}
            }
        }
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew { found: version });
        }
        if version == 0 {
            conn.execute_batch(SCHEMA)?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            version = SCHEMA_VERSION;
        }
        for from in version..SCHEMA_VERSION {
            let migration = MIGRATIONS[usize::try_from(from - 1).unwrap_or_default()];
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", from + 1)?;
            tx.commit()?;
            tracing::info!(from, to = from + 1, "database migrated");
        }
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Creates tenant `id` unless it exists.
    pub fn ensure_tenant(&self, id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO tenants (id, created_at_ms) VALUES (?1, ?2)",
            params![id, now_ms()],
        )?;
        Ok(())
    }

    /// Stores a key whose secret hashes to `secret_sha256`.
    pub fn insert_key(&self, key: &KeyRecord, secret_sha256: &str) -> Result<(), StoreError> {
        self.ensure_tenant(&key.tenant)?;
        self.conn().execute(
            "INSERT INTO api_keys (id, tenant_id, name, secret_sha256, admin, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                key.id,
                key.tenant,
                key.name,
                secret_sha256,
                key.admin,
                key.created_at_ms
            ],
        )?;
        Ok(())
    }

    fn key_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
        Ok(KeyRecord {
            id: row.get(0)?,
            tenant: row.get(1)?,
            name: row.get(2)?,
            admin: row.get(3)?,
            created_at_ms: row.get(4)?,
            revoked_at_ms: row.get(5)?,
        })
    }

    /// The unrevoked key whose secret hashes to `secret_sha256`.
    pub fn key_by_secret_hash(&self, secret_sha256: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, tenant_id, name, admin, created_at_ms, revoked_at_ms FROM api_keys
                 WHERE secret_sha256 = ?1 AND revoked_at_ms IS NULL",
                params![secret_sha256],
                Store::key_from_row,
            )
            .optional()?)
    }

    /// Keys, of one tenant or of all.
    pub fn list_keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT id, tenant_id, name, admin, created_at_ms, revoked_at_ms FROM api_keys
             WHERE ?1 IS NULL OR tenant_id = ?1 ORDER BY created_at_ms, id",
        )?;
        let keys = statement
            .query_map(params![tenant], Store::key_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(keys)
    }

    /// Revokes key `id` (of `tenant`, when given); false if there is no such unrevoked key.
    pub fn revoke_key(&self, id: &str, tenant: Option<&str>) -> Result<bool, StoreError> {
        let changed = self.conn().execute(
            "UPDATE api_keys SET revoked_at_ms = ?1
             WHERE id = ?2 AND (?3 IS NULL OR tenant_id = ?3) AND revoked_at_ms IS NULL",
            params![now_ms(), id, tenant],
        )?;
        Ok(changed == 1)
    }

    /// Records a new sandbox.
    pub fn insert_sandbox(&self, record: &SandboxRecord) -> Result<(), StoreError> {
        let metadata = serde_json::to_string(&record.metadata)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let env =
            serde_json::to_string(&record.env).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let network = record
            .network
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "INSERT INTO sandboxes (id, tenant_id, template, state, reason, metadata, ttl_ms,
                                    created_at_ms, expires_at_ms, env, network, access_token,
                                    public_ports, auto_resume, on_expiry, parent_id, cpus,
                                    memory_mib, disk_mib)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                     ?17, ?18, ?19)",
            params![
                record.id,
                record.tenant,
                record.template,
                record.state,
                record.reason,
                metadata,
                record.ttl_ms,
                record.created_at_ms,
                record.expires_at_ms,
                env,
                network,
                record.access_token,
                record.public_ports,
                record.auto_resume,
                on_expiry_name(record.on_expiry),
                record.parent_id,
                record.resources.cpus,
                saturating_i64(record.resources.memory_mib),
                saturating_i64(record.resources.disk_mib)
            ],
        )?;
        Ok(())
    }

    /// Records sandbox `id`'s new egress policy.
    pub fn set_network(
        &self,
        id: &str,
        policy: &kiln_network::policy::EgressPolicy,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(policy).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "UPDATE sandboxes SET network = ?2 WHERE id = ?1",
            params![id, json],
        )?;
        Ok(())
    }

    fn sandbox_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawSandbox> {
        Ok((
            SandboxRecord {
                id: row.get(0)?,
                tenant: row.get(1)?,
                template: row.get(2)?,
                state: row.get(3)?,
                reason: row.get(4)?,
                metadata: BTreeMap::new(),
                env: BTreeMap::new(),
                ttl_ms: row.get(6)?,
                created_at_ms: row.get(7)?,
                expires_at_ms: row.get(8)?,
                network: None,
                access_token: row.get(11)?,
                public_ports: row.get(12)?,
                auto_resume: row.get(13)?,
                on_expiry: match row.get::<_, String>(14)?.as_str() {
                    "pause" => kiln_engine::OnExpiry::Pause,
                    _ => kiln_engine::OnExpiry::Destroy,
                },
                parent_id: row.get(15)?,
                resources: kiln_engine::Resources {
                    cpus: row.get(16)?,
                    memory_mib: row.get::<_, i64>(17)?.max(0).unsigned_abs(),
                    disk_mib: row.get::<_, i64>(18)?.max(0).unsigned_abs(),
                },
            },
            row.get::<_, String>(5)?,
            row.get::<_, String>(9)?,
            row.get::<_, Option<String>>(10)?,
        ))
    }

    fn finish(raw: RawSandbox) -> Result<SandboxRecord, StoreError> {
        let (mut record, metadata, env, network) = raw;
        record.network = network
            .map(|n| serde_json::from_str(&n))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("network of {}: {e}", record.id)))?;
        record.metadata = serde_json::from_str(&metadata)
            .map_err(|e| StoreError::Corrupt(format!("metadata of {}: {e}", record.id)))?;
        record.env = serde_json::from_str(&env)
            .map_err(|e| StoreError::Corrupt(format!("env of {}: {e}", record.id)))?;
        Ok(record)
    }

    const SANDBOX_COLUMNS: &'static str = "id, tenant_id, template, state, reason, metadata, \
                                           ttl_ms, created_at_ms, expires_at_ms, env, network, \
                                           access_token, public_ports, auto_resume, on_expiry, \
                                           parent_id, cpus, memory_mib, disk_mib";

    /// Sandbox `id`, if it belongs to `tenant` (any tenant when `None`).
    pub fn sandbox(
        &self,
        id: &str,
        tenant: Option<&str>,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        let raw = self
            .conn()
            .query_row(
                &format!(
                    "SELECT {} FROM sandboxes WHERE id = ?1 AND (?2 IS NULL OR tenant_id = ?2)",
                    Store::SANDBOX_COLUMNS
                ),
                params![id, tenant],
                Store::sandbox_from_row,
            )
            .optional()?;
        raw.map(Store::finish).transpose()
    }

    /// Up to `limit` sandboxes of `tenant` after `cursor`, oldest first.
    pub fn list_sandboxes(
        &self,
        tenant: &str,
        filter: &SandboxFilter,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!(
            "SELECT {} FROM sandboxes
             WHERE tenant_id = ?1 AND (?2 IS NULL OR state = ?2)
               AND (?3 IS NULL OR (created_at_ms, id) > (?3, ?4))
             ORDER BY created_at_ms, id",
            Store::SANDBOX_COLUMNS
        ))?;
        let rows = statement.query_map(
            params![
                tenant,
                filter.state,
                cursor.map(|c| c.created_at_ms),
                cursor.map(|c| c.id.as_str()).unwrap_or_default()
            ],
            Store::sandbox_from_row,
        )?;
        let mut out = Vec::new();
        for row in rows {
            let record = Store::finish(row?)?;
            let matches = filter
                .metadata
                .iter()
                .all(|(k, v)| record.metadata.get(k) == Some(v));
            if matches {
                out.push(record);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Every sandbox of every tenant (for start-up reconciliation).
    pub fn all_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!(
            "SELECT {} FROM sandboxes ORDER BY created_at_ms, id",
            Store::SANDBOX_COLUMNS
        ))?;
        let rows = statement.query_map([], Store::sandbox_from_row)?;
        rows.map(|row| Store::finish(row?)).collect()
    }

    /// What `tenant`'s live sandboxes (any state but failed) hold, together.
    pub fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage, StoreError> {
        let (sandboxes, cpus, memory_mib, disk_mib): (i64, f64, i64, i64) = self.conn().query_row(
            "SELECT COUNT(*), COALESCE(SUM(cpus), 0), COALESCE(SUM(memory_mib), 0),
                        COALESCE(SUM(disk_mib), 0)
                 FROM sandboxes WHERE tenant_id = ?1 AND state != 'failed'",
            params![tenant],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )?;
        Ok(TenantUsage {
            sandboxes: usize::try_from(sandboxes).unwrap_or(0),
            resources: kiln_engine::Resources {
                cpus,
                memory_mib: memory_mib.max(0).unsigned_abs(),
                disk_mib: disk_mib.max(0).unsigned_abs(),
            },
        })
    }

    /// How many sandboxes there are, by state and template, of all tenants.
    pub fn count_sandboxes(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT state, template, COUNT(*) FROM sandboxes GROUP BY state, template
             ORDER BY state, template",
        )?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks sandbox `id` failed.
    pub fn mark_failed(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = 'failed', reason = ?2 WHERE id = ?1",
            params![id, reason],
        )?;
        Ok(())
    }

    /// Sets the time to live of sandbox `id`.
    pub fn set_expiry(
        &self,
        id: &str,
        ttl_ms: Option<i64>,
        expires_at_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET ttl_ms = ?2, expires_at_ms = ?3 WHERE id = ?1",
            params![id, ttl_ms, expires_at_ms],
        )?;
        Ok(())
    }

    /// Records sandbox `id` as `running` or `paused`; a failed one stays failed.
    pub fn set_state(&self, id: &str, state: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = ?2 WHERE id = ?1 AND state != 'failed'",
            params![id, state],
        )?;
        Ok(())
    }

    /// Records when sandbox `id` is removed, leaving the time to live it runs with (a paused
    /// sandbox's retention).
    pub fn set_expires_at(&self, id: &str, expires_at_ms: Option<i64>) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET expires_at_ms = ?2 WHERE id = ?1",
            params![id, expires_at_ms],
        )?;
        Ok(())
    }

    /// Records sandbox `id`'s pause settings.
    pub fn set_pause_settings(
        &self,
        id: &str,
        auto_resume: bool,
        on_expiry: kiln_engine::OnExpiry,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET auto_resume = ?2, on_expiry = ?3 WHERE id = ?1",
            params![id, auto_resume, on_expiry_name(on_expiry)],
        )?;
        Ok(())
    }

    /// Records a new snapshot; false if its tenant has one of that name.
    pub fn insert_snapshot(&self, record: &SnapshotRecord) -> Result<bool, StoreError> {
        let inserted = self.conn().execute(
            "INSERT OR IGNORE INTO snapshots (id, tenant_id, name, sandbox_id, template, dir,
                                              size_bytes, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                record.id,
                record.tenant,
                record.name,
                record.sandbox_id,
                record.template,
                record.dir,
                record.size_bytes,
                record.created_at_ms
            ],
        )?;
        Ok(inserted == 1)
    }

    /// `tenant`'s snapshots, oldest first.
    pub fn list_snapshots(&self, tenant: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT id, tenant_id, name, sandbox_id, template, dir, size_bytes, created_at_ms
             FROM snapshots WHERE tenant_id = ?1 ORDER BY created_at_ms, id",
        )?;
        let rows = statement.query_map(params![tenant], Store::snapshot_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// `tenant`'s snapshot whose id or name is `key`.
    pub fn snapshot(&self, tenant: &str, key: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, tenant_id, name, sandbox_id, template, dir, size_bytes, created_at_ms
                 FROM snapshots WHERE tenant_id = ?1 AND (id = ?2 OR name = ?2)",
                params![tenant, key],
                Store::snapshot_from_row,
            )
            .optional()?)
    }

    fn snapshot_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotRecord> {
        Ok(SnapshotRecord {
            id: row.get(0)?,
            tenant: row.get(1)?,
            name: row.get(2)?,
            sandbox_id: row.get(3)?,
            template: row.get(4)?,
            dir: row.get(5)?,
            size_bytes: row.get(6)?,
            created_at_ms: row.get(7)?,
        })
    }

    /// Forgets snapshot `id`.
    pub fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Forgets sandbox `id`.
    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        tx.execute("DELETE FROM forwards WHERE sandbox_id = ?1", params![id])?;
        tx.execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
        tx.commit()?;
        Ok(())
    }

    /// Records a TCP forward; false if the sandbox's port or the host port has one already,
    /// or the sandbox is gone or failed.
    pub fn insert_forward(&self, forward: &ForwardRecord) -> Result<bool, StoreError> {
        let inserted = self.conn().execute(
            "INSERT OR IGNORE INTO forwards (sandbox_id, port, host_port, created_at_ms)
             SELECT ?1, ?2, ?3, ?4 WHERE EXISTS
                 (SELECT 1 FROM sandboxes WHERE id = ?1 AND state != 'failed')",
            params![
                forward.sandbox_id,
                forward.port,
                forward.host_port,
                forward.created_at_ms
            ],
        )?;
        Ok(inserted == 1)
    }

    /// Forgets every forward of sandbox `sandbox_id`.
    pub fn delete_forwards(&self, sandbox_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM forwards WHERE sandbox_id = ?1",
            params![sandbox_id],
        )?;
        Ok(())
    }

    /// How many forwards `tenant`'s sandboxes have.
    pub fn count_tenant_forwards(&self, tenant: &str) -> Result<usize, StoreError> {
        let count: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM forwards JOIN sandboxes ON sandboxes.id = forwards.sandbox_id
             WHERE sandboxes.tenant_id = ?1",
            params![tenant],
            |row| row.get(0),
        )?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// Forgets the forward of port `port` of sandbox `sandbox_id`; false if there was none.
    pub fn delete_forward(&self, sandbox_id: &str, port: u16) -> Result<bool, StoreError> {
        let deleted = self.conn().execute(
            "DELETE FROM forwards WHERE sandbox_id = ?1 AND port = ?2",
            params![sandbox_id, port],
        )?;
        Ok(deleted == 1)
    }

    /// The forwards of sandbox `sandbox_id` (all sandboxes' with `None`), by port.
    pub fn forwards(&self, sandbox_id: Option<&str>) -> Result<Vec<ForwardRecord>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT sandbox_id, port, host_port, created_at_ms FROM forwards
             WHERE ?1 IS NULL OR sandbox_id = ?1 ORDER BY sandbox_id, port",
        )?;
        let rows = statement.query_map(params![sandbox_id], |row| {
            Ok(ForwardRecord {
                sandbox_id: row.get(0)?,
                port: row.get(1)?,
                host_port: row.get(2)?,
                created_at_ms: row.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn on_expiry_name(on_expiry: kiln_engine::OnExpiry) -> &'static str {
    match on_expiry {
        kiln_engine::OnExpiry::Destroy => "destroy",
        kiln_engine::OnExpiry::Pause => "pause",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, tenant: &str, at: i64, team: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            tenant: tenant.into(),
            template: "base".into(),
            state: "running".into(),
            reason: None,
            metadata: BTreeMap::from([("team".to_owned(), team.to_owned())]),
            env: BTreeMap::from([("A".to_owned(), "1".to_owned())]),
            ttl_ms: Some(60_000),
            created_at_ms: at,
            expires_at_ms: Some(at + 60_000),
            network: Some(kiln_network::policy::EgressPolicy::open(false)),
            access_token: Some("kiln_at_test".into()),
            public_ports: false,
            auto_resume: true,
            on_expiry: kiln_engine::OnExpiry::Destroy,
            parent_id: None,
            resources: kiln_engine::Resources {
                cpus: 0.5,
                memory_mib: 320,
                disk_mib: 1024,
            },
        }
    }

    #[test]
    fn processes_opening_a_new_database_at_once_all_succeed() {
        // The daemon and `kiln keys create` may open a new database at the same moment:
        // one creates the schema, the others wait for it and find it made.
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("dir");
            let path = dir.path().join("kiln.db");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
            let opened: Vec<_> = (0..6)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        Store::open(&path).map(drop)
                    })
                })
                .collect();
            for handle in opened {
                handle.join().expect("thread").expect("open");
            }
        }
    }

    #[test]
    fn a_damaged_database_is_refused_by_name_and_left_as_it_was() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("kiln.db");
        let garbage: Vec<u8> = (0..8192u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&path, &garbage).expect("write");
        let Err(err) = Store::open(&path) else {
            panic!("a damaged database opened");
        };
        assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("backup"), "{message}");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            garbage,
            "left as it was"
        );
        // Negative control: a good database opens.
        std::fs::remove_file(&path).expect("remove");
        Store::open(&path).expect("a new database");
    }

    #[test]
    fn a_version_1_database_is_migrated() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("kiln.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE tenants (id TEXT PRIMARY KEY, created_at_ms INTEGER NOT NULL);
                 CREATE TABLE api_keys (id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL,
                     name TEXT NOT NULL, secret_sha256 TEXT NOT NULL UNIQUE,
                     admin INTEGER NOT NULL, created_at_ms INTEGER NOT NULL,
                     revoked_at_ms INTEGER);
                 CREATE TABLE sandboxes (id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL,
                     template TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,
                     metadata TEXT NOT NULL, ttl_ms INTEGER, created_at_ms INTEGER NOT NULL,
                     expires_at_ms INTEGER);
                 INSERT INTO tenants VALUES ('a', 1);
                 INSERT INTO sandboxes VALUES ('sb-old', 'a', 'base', 'running', NULL, '{}',
                     NULL, 1, NULL);
                 PRAGMA user_version = 1;",
            )
            .expect("a version 1 database");
        }
        let store = Store::open(&path).expect("migrated");
        let old = store.sandbox("sb-old", None).expect("read").expect("kept");
        assert!(old.env.is_empty());
        store
            .insert_sandbox(&record("sb-new", "a", 2, "red"))
            .expect("insert");
        drop(store);
        let store = Store::open(&path).expect("reopened");
        assert_eq!(store.all_sandboxes().expect("all").len(), 2);
        let conn = Connection::open(&path).expect("open");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn keys_are_found_by_hash_until_revoked() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(&dir.path().join("kiln.db")).expect("open");
        let key = KeyRecord {
            id: "key_1".into(),
            tenant: "acme".into(),
            name: "laptop".into(),
            admin: true,
            created_at_ms: 1,
            revoked_at_ms: None,
        };
        store.insert_key(&key, "hash-1").expect("insert");
        assert_eq!(
            store.key_by_secret_hash("hash-1").expect("query"),
            Some(key)
        );
        assert_eq!(store.key_by_secret_hash("hash-2").expect("query"), None);
        assert!(!store.revoke_key("key_1", Some("other")).expect("revoke"));
        assert!(store.revoke_key("key_1", Some("acme")).expect("revoke"));
        assert!(!store.revoke_key("key_1", None).expect("revoke twice"));
        assert_eq!(store.key_by_secret_hash("hash-1").expect("query"), None);
        assert_eq!(store.list_keys(Some("acme")).expect("list").len(), 1);
    }

    #[test]
    fn sandboxes_are_listed_per_tenant_filtered_and_paged() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("kiln.db");
        let store = Store::open(&path).expect("open");
        for tenant in ["a", "b"] {
            store.ensure_tenant(tenant).expect("tenant");
        }
        for i in 0..5 {
            let team = if i % 2 == 0 { "red" } else { "blue" };
            store
                .insert_sandbox(&record(&format!("sb-a{i}"), "a", 100 + i, team))
                .expect("insert");
        }
        store
            .insert_sandbox(&record("sb-b0", "b", 100, "red"))
            .expect("insert");
        let all = SandboxFilter::default();
        let page = store.list_sandboxes("a", &all, None, 2).expect("list");
        assert_eq!(
            page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["sb-a0", "sb-a1"]
        );
        let cursor = Cursor::decode(
            &Cursor {
                created_at_ms: page[1].created_at_ms,
                id: page[1].id.clone(),
            }
            .encode(),
        )
        .expect("cursor");
        let next = store
            .list_sandboxes("a", &all, Some(&cursor), 10)
            .expect("list");
        assert_eq!(next.len(), 3);
        let red = SandboxFilter {
            metadata: BTreeMap::from([("team".to_owned(), "red".to_owned())]),
            ..SandboxFilter::default()
        };
        assert_eq!(
            store
                .list_sandboxes("a", &red, None, 10)
                .expect("list")
                .len(),
            3
        );
        // Forwards: one per sandbox port and per host port; they go with their sandbox.
        let forward = |sandbox: &str, port, host_port| ForwardRecord {
            sandbox_id: sandbox.into(),
            port,
            host_port,
            created_at_ms: 1,
        };
        assert!(store
            .insert_forward(&forward("sb-a1", 22, 30001))
            .expect("insert"));
        assert!(store
            .insert_forward(&forward("sb-a1", 80, 30002))
            .expect("insert"));
        assert!(!store
            .insert_forward(&forward("sb-a1", 22, 30003))
            .expect("same port"));
        assert!(!store
            .insert_forward(&forward("sb-a2", 22, 30001))
            .expect("same host port"));
        assert!(store
            .insert_forward(&forward("sb-a2", 22, 30004))
            .expect("insert"));
        assert_eq!(store.forwards(Some("sb-a1")).expect("list").len(), 2);
        assert_eq!(store.forwards(None).expect("all").len(), 3);
        assert!(store.delete_forward("sb-a1", 80).expect("delete"));
        assert!(!store.delete_forward("sb-a1", 80).expect("gone"));
        store.delete_sandbox("sb-a2").expect("delete");
        assert_eq!(
            store.forwards(None).expect("all"),
            vec![forward("sb-a1", 22, 30001)]
        );
        store
            .insert_sandbox(&record("sb-a2", "a", 102, "red"))
            .expect("again");
        // What a tenant's live sandboxes hold, summed (read back as written).
        assert_eq!(
            store
                .sandbox("sb-a1", None)
                .expect("get")
                .map(|r| r.resources),
            Some(record("x", "a", 0, "").resources)
        );
        let usage = store.tenant_usage("a").expect("usage");
        assert_eq!(usage.sandboxes, 5);
        assert_eq!(
            (usage.resources.memory_mib, usage.resources.disk_mib),
            (1600, 5120)
        );
        assert!((usage.resources.cpus - 2.5).abs() < 1e-9, "{usage:?}");
        assert_eq!(
            store.tenant_usage("nobody").expect("usage"),
            TenantUsage::default()
        );
        store.mark_failed("sb-a0", "boom").expect("fail");
        // A failed sandbox holds nothing.
        assert_eq!(store.tenant_usage("a").expect("usage").sandboxes, 4);
        let failed = SandboxFilter {
            state: Some("failed".into()),
            ..SandboxFilter::default()
        };
        let failed = store.list_sandboxes("a", &failed, None, 10).expect("list");
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].reason.as_deref(), Some("boom"));
        assert!(
            store.sandbox("sb-b0", Some("a")).expect("get").is_none(),
            "tenant b's"
        );
        assert!(store.sandbox("sb-b0", Some("b")).expect("get").is_some());
        store.delete_sandbox("sb-b0").expect("delete");
        assert!(store.sandbox("sb-b0", None).expect("get").is_none());
        drop(store);
        // Reopening keeps everything and does not re-run the schema.
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.all_sandboxes().expect("all").len(), 5);
    }
}
