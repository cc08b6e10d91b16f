//! The wire protocol spoken between kiln's host side and the guest agent.
//!
//! A session runs over one byte stream (a virtio-serial port, a vsock connection or a
//! unix socket) in three layers:
//!
//! 1. [`handshake`]: line-based hello/welcome exchange that carries the protocol version and
//!    a per-session nonce, and resynchronises after a snapshot restore (stale or garbled
//!    bytes before a valid hello are skipped).
//! 2. HTTP/2 (host is the client, agent the server): many concurrent streams, flow control
//!    and cancellation over the single byte stream. Routes are listed in [`routes`].
//! 3. Inside a streaming request or response body, [`frame`]s: length-prefixed records that
//!    carry JSON control messages ([`messages`]) or raw stdout/stderr/stdin/file bytes.
//!
//! Everything the host decodes from the guest is bounded: lines, frames and JSON bodies all
//! have maximum sizes, and decoders return errors instead of panicking.

pub mod frame;
pub mod handshake;
pub mod messages;
pub mod stream;

/// Current protocol version. A host accepts this and the previous version, if there is one
/// (see [`FIRST_PROTOCOL_VERSION`]).
pub const PROTOCOL_VERSION: u32 = 1;

/// The first version of the protocol: no peer speaks an older one, so none is accepted.
pub const FIRST_PROTOCOL_VERSION: u32 = 1;

/// The agent versions a host speaking `host` can talk to, oldest first: the same version, or
/// the one before it (an agent in a template or snapshot made before the host was upgraded),
/// as long as that version exists.
pub fn versions_accepted_by(host: u32) -> std::ops::RangeInclusive<u32> {
    host.saturating_sub(1).max(FIRST_PROTOCOL_VERSION)..=host
}

/// Whether a host speaking `host` can talk to an agent speaking `agent`.
pub fn accepts_version(host: u32, agent: u32) -> bool {
    versions_accepted_by(host).contains(&agent)
}

/// The versions a host speaking [`PROTOCOL_VERSION`] accepts, oldest first.
pub fn accepted_versions() -> std::ops::RangeInclusive<u32> {
    versions_accepted_by(PROTOCOL_VERSION)
}

/// Whether a host speaking [`PROTOCOL_VERSION`] can talk to an agent speaking `version`.
pub fn host_accepts_version(version: u32) -> bool {
    accepted_versions().contains(&version)
}

/// Largest JSON body (request or unary response) either side accepts.
pub const MAX_JSON_BODY: usize = 4 << 20;

/// The longest a kill-all waits for the killed processes to be gone before it answers. It
/// waits while they keep exiting: thousands of a fork bomb's processes leave one at a time
/// (each tears down its memory map under locks the others wait for), a second on KVM and
/// up to a minute under emulation. A host waits this long, plus its usual call timeout, for
/// the answer.
pub const KILL_ALL_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// HTTP/2 routes served by the agent. All are `POST` with a JSON or framed body.
pub mod routes {
    /// Agent version, uptime, load, memory and disk use.
    pub const INFO: &str = "/v1/info";
    /// First call after a cold boot: network, identity, environment, start command.
    pub const INIT: &str = "/v1/init";
    /// Called after every snapshot restore: clock, RNG reseed, identity.
    pub const POST_RESTORE: &str = "/v1/post-restore";
    /// Clean power-off or reboot of the guest.
    pub const SHUTDOWN: &str = "/v1/shutdown";
    /// Start a process (framed, bidirectional).
    pub const EXEC: &str = "/v1/exec";
    /// Re-attach to a running or finished process (framed, bidirectional).
    pub const ATTACH: &str = "/v1/processes/attach";
    /// List processes started through the agent.
    pub const PROCESSES: &str = "/v1/processes";
    /// Send a signal to a process group.
    pub const SIGNAL: &str = "/v1/processes/signal";
    /// Kill every user process of the guest (everything but the agent).
    pub const KILL_ALL: &str = "/v1/processes/kill-all";
    /// Stdin, end of stdin, resizes and signals for a process started earlier, from outside
    /// its own stream (framed request: `Attach` first; a unary reply once all are applied).
    pub const INPUT: &str = "/v1/processes/input";
    /// A byte stream to a socket inside the guest (framed, bidirectional).
    pub const CONNECT: &str = "/v1/connect";
    /// Stream a file's contents out (framed response).
    pub const FILE_READ: &str = "/v1/files/read";
    /// Stream a file's contents in (framed request), atomically replacing the target.
    pub const FILE_WRITE: &str = "/v1/files/write";
    /// List a directory, optionally recursively.
    pub const FILE_LIST: &str = "/v1/files/list";
    /// Stat one path.
    pub const FILE_STAT: &str = "/v1/files/stat";
    /// Whether a path exists.
    pub const FILE_EXISTS: &str = "/v1/files/exists";
    /// `mkdir -p`.
    pub const FILE_MKDIR: &str = "/v1/files/mkdir";
    /// Remove a file or (recursively) a directory.
    pub const FILE_REMOVE: &str = "/v1/files/remove";
    /// Rename a path.
    pub const FILE_RENAME: &str = "/v1/files/rename";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_current_and_previous_version_only() {
        assert!(host_accepts_version(PROTOCOL_VERSION));
        assert!(!host_accepts_version(PROTOCOL_VERSION + 1));
        assert!(!host_accepts_version(u32::MAX));
        assert!(!host_accepts_version(0), "version 0 never existed");
        assert_eq!(
            host_accepts_version(PROTOCOL_VERSION - 1),
            PROTOCOL_VERSION > FIRST_PROTOCOL_VERSION
        );
        if PROTOCOL_VERSION >= 2 {
            assert!(!host_accepts_version(PROTOCOL_VERSION - 2));
        }
        for version in 0..PROTOCOL_VERSION + 3 {
            assert_eq!(
                host_accepts_version(version),
                accepted_versions().contains(&version),
                "{version}"
            );
        }
    }

    /// The rule itself, for host versions that have a predecessor (the current version may
    /// not have one yet).
    #[test]
    fn a_host_accepts_its_own_version_and_the_one_before() {
        let host = FIRST_PROTOCOL_VERSION + 4;
        assert!(accepts_version(host, host));
        assert!(accepts_version(host, host - 1));
        assert!(!accepts_version(host, host - 2));
        assert!(!accepts_version(host, host + 1));
        assert!(accepts_version(
            FIRST_PROTOCOL_VERSION + 1,
            FIRST_PROTOCOL_VERSION
        ));
        assert!(!accepts_version(
            FIRST_PROTOCOL_VERSION,
            FIRST_PROTOCOL_VERSION - 1
        ));
        assert!(!accepts_version(u32::MAX, u32::MAX - 2));
        assert!(accepts_version(u32::MAX, u32::MAX - 1));
    }
}
