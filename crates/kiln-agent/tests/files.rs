//! File operations through the real agent on the host.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{kind, start};
use kiln_agent::files::{MAX_LIST_BYTES, MAX_LIST_ENTRIES};
use kiln_agent_client::local::LocalAgentOptions;
use kiln_agent_client::ClientConfig;
use kiln_proto::messages::{ErrorKind, FileReadRequest, FileType, FileWriteStart, MkdirRequest};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn write_read_stat_list_rename_remove() {
    let (_agent, client) = start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_string_lossy().into_owned();
    let file = format!("{root}/a/b/data.bin");

    let start = FileWriteStart {
        path: file.clone(),
        mode: Some(0o600),
        user: None,
        create_parents: true,
    };
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        client
            .write_file_from(start, &mut &data[..])
            .await
            .expect("write"),
        data.len() as u64
    );
    assert_eq!(client.read_file(&file, 1 << 20).await.expect("read"), data);

    let partial = FileReadRequest {
        path: file.clone(),
        offset: 1000,
        limit: Some(10),
    };
    let mut sink = Vec::new();
    assert_eq!(
        client
            .read_file_to(partial, &mut sink)
            .await
            .expect("ranged read"),
        10
    );
    assert_eq!(sink, &data[1000..1010]);

    let stat = client.stat(&file).await.expect("stat");
    assert_eq!(
        (stat.file_type, stat.size, stat.mode),
        (FileType::File, 300_000, 0o600)
    );

    client
        .mkdir(&MkdirRequest {
            path: format!("{root}/a/c/d"),
            mode: None,
            user: None,
        })
        .await
        .expect("mkdir -p");
    let listing = client.list(&format!("{root}/a"), 2).await.expect("list");
    let names: Vec<&str> = listing
        .entries
        .iter()
        .map(|e| e.path.strip_prefix(&root).expect("under root"))
        .collect();
    assert_eq!(names, ["/a/b", "/a/b/data.bin", "/a/c", "/a/c/d"]);
    assert!(!listing.truncated);

    client
        .rename(&file, &format!("{root}/a/moved.bin"))
        .await
        .expect("rename");
    assert!(!client.exists(&file).await.expect("exists"));
    assert!(client
        .exists(&format!("{root}/a/moved.bin"))
        .await
        .expect("exists"));

    assert_eq!(
        kind(client.remove(&format!("{root}/a"), false).await),
        Some(ErrorKind::DirectoryNotEmpty)
    );
    client
        .remove(&format!("{root}/a"), true)
        .await
        .expect("rm -r");
    assert!(!client.exists(&format!("{root}/a")).await.expect("exists"));
}

#[tokio::test]
async fn errors_are_typed() {
    let (_agent, client) = start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_string_lossy().into_owned();
    assert_eq!(
        kind(client.read_file(&format!("{root}/missing"), 10).await),
        Some(ErrorKind::NotFound)
    );
    assert_eq!(
        kind(client.read_file(&root, 10).await),
        Some(ErrorKind::IsADirectory)
    );
    assert_eq!(
        kind(client.write_file(&root, b"x").await),
        Some(ErrorKind::IsADirectory)
    );
    for directory in ["/", "/.", &format!("{root}/..")] {
        assert_eq!(
            kind(client.write_file(directory, b"x").await),
            Some(ErrorKind::IsADirectory),
            "{directory}"
        );
    }
    assert_eq!(
        kind(client.write_file(&format!("{root}/no/parent"), b"x").await),
        Some(ErrorKind::NotFound)
    );
    assert_eq!(
        kind(client.stat(&format!("{root}/missing")).await),
        Some(ErrorKind::NotFound)
    );
    assert_eq!(
        kind(client.list(&format!("{root}/missing"), 1).await),
        Some(ErrorKind::NotFound)
    );
    assert_eq!(
        kind(
            client
                .rename(&format!("{root}/missing"), &format!("{root}/x"))
                .await
        ),
        Some(ErrorKind::NotFound)
    );
    assert_eq!(
        kind(client.stat("").await),
        Some(ErrorKind::InvalidArgument)
    );
    std::fs::write(dir.path().join("big"), vec![0u8; 5000]).expect("write");
    assert_eq!(
        kind(client.read_file(&format!("{root}/big"), 4999).await),
        Some(ErrorKind::InvalidArgument)
    );
}

/// A write that fails part-way leaves the old content in place and no temporary file.
#[tokio::test]
async fn interrupted_write_changes_nothing() {
    let (_agent, client) = start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("keep.txt");
    std::fs::write(&path, b"original").expect("write");

    struct FailingReader(usize);
    impl tokio::io::AsyncRead for FailingReader {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.0 == 0 {
                return std::task::Poll::Ready(Err(std::io::Error::other("source failed")));
            }
            self.0 -= 1;
            buf.put_slice(&[b'x'; 1000]);
            std::task::Poll::Ready(Ok(()))
        }
    }
    let start = FileWriteStart::new(path.to_string_lossy().into_owned());
    let err = client
        .write_file_from(start, &mut FailingReader(50))
        .await
        .expect_err("source fails");
    assert!(
        matches!(
            err,
            kiln_agent_client::ClientError::LocalIo(_) | kiln_agent_client::ClientError::Agent(_)
        ),
        "{err:?}"
    );
    // The agent cleans up once it sees the stream end without its end frame.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        if names.len() == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "temporary file left behind: {names:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(std::fs::read(&path).expect("read"), b"original");
    // And the file is still writable through the agent afterwards.
    client
        .write_file(&path.to_string_lossy(), b"new")
        .await
        .expect("write");
    assert_eq!(std::fs::read(&path).expect("read"), b"new");
}

/// The agent answers a write only once the whole file is on disk, so an upload that lasts
/// longer than the client's call timeout must succeed as long as it keeps moving.
#[tokio::test]
async fn a_slow_upload_outlives_the_call_timeout() {
    let (agent, _) = start().await;
    let call_timeout = Duration::from_secs(2);
    let client = agent.client_with(ClientConfig {
        call_timeout,
        ..ClientConfig::default()
    });
    // On tmpfs, so the agent's final sync cannot wait behind a busy disk.
    let dir = tempfile::Builder::new()
        .tempdir_in("/dev/shm")
        .expect("temp dir");
    let path = dir.path().join("slow.bin");
    let (mut writer, mut source) = tokio::io::duplex(64 * 1024);
    let feeder = tokio::spawn(async move {
        for i in 0..12u8 {
            writer.write_all(&[i; 64 * 1024]).await.expect("feed");
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    });
    let started = Instant::now();
    let start = FileWriteStart::new(path.to_string_lossy().into_owned());
    let sent = client
        .write_file_from(start, &mut source)
        .await
        .expect("a slow upload is not cut off");
    feeder.await.expect("feeder finished");
    assert!(started.elapsed() > 2 * call_timeout);
    assert_eq!(sent, 12 * 64 * 1024);
    let expected: Vec<u8> = (0..12u8).flat_map(|i| [i; 64 * 1024]).collect();
    assert_eq!(std::fs::read(&path).expect("read"), expected);
}

/// Creates `count` empty files named by `name` in `dir`.
fn create_files(dir: &std::path::Path, count: usize, name: impl Fn(usize) -> String) {
    for i in 0..count {
        std::fs::File::create(dir.join(name(i))).expect("create");
    }
}

#[tokio::test]
async fn a_listing_stops_at_the_entry_limit_and_says_so() {
    let (_agent, client) = start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_string_lossy().into_owned();
    create_files(dir.path(), MAX_LIST_ENTRIES, |i| format!("f{i:05}"));
    let full = client.list(&root, 1).await.expect("list");
    assert_eq!(full.entries.len(), MAX_LIST_ENTRIES);
    assert!(!full.truncated, "exactly the limit leaves nothing out");

    std::fs::File::create(dir.path().join("z-one-more")).expect("create");
    let cut = client.list(&root, 1).await.expect("list");
    assert_eq!(cut.entries.len(), MAX_LIST_ENTRIES);
    assert!(cut.truncated);
    assert!(
        cut.entries
            .last()
            .expect("entries")
            .path
            .ends_with("f09999"),
        "sorted, and cut at the end"
    );
}

/// Entries with long paths would make a full listing larger than the host accepts; the
/// listing comes back truncated instead of failing.
#[tokio::test]
async fn a_listing_of_long_paths_is_cut_to_fit_the_response_limit() {
    let (_agent, client) = start().await;
    let top = tempfile::tempdir().expect("temp dir");
    // A deep directory of long names: every entry's path is about 1.7 KB.
    let mut dir = top.path().to_owned();
    for level in 0..6 {
        dir.push(format!("{level}{}", "d".repeat(239)));
    }
    std::fs::create_dir_all(&dir).expect("mkdir");
    let count = 3000;
    create_files(&dir, count, |i| format!("{i:05}{}", "f".repeat(200)));
    let path = dir.to_string_lossy().into_owned();

    let listing = client
        .list(&path, 1)
        .await
        .expect("a listing too large for one response comes back truncated");
    assert!(listing.truncated);
    assert!(!listing.entries.is_empty() && listing.entries.len() < count);
    let encoded = serde_json::to_vec(&listing).expect("serializable").len();
    assert!(encoded <= MAX_LIST_BYTES + 1024, "{encoded} bytes");
    for (i, entry) in listing.entries.iter().enumerate() {
        assert_eq!(
            entry.path,
            dir.join(format!("{i:05}{}", "f".repeat(200)))
                .to_string_lossy(),
            "the first entries in order"
        );
    }
    // A deep listing from the top is cut the same way.
    let root = top.path().to_string_lossy().into_owned();
    let deep = client.list(&root, 8).await.expect("deep listing");
    assert!(deep.truncated && deep.entries.len() < count + 6);
}

#[tokio::test]
async fn write_keeps_the_replaced_mode_and_applies_explicit_mode_and_owner() {
    let (_agent, client) = start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_string_lossy().into_owned();
    let existing = dir.path().join("existing");
    std::fs::write(&existing, b"old").expect("write");
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let existing = existing.to_string_lossy().into_owned();

    client.write_file(&existing, b"new").await.expect("write");
    let stat = client.stat(&existing).await.expect("stat");
    assert_eq!(
        (stat.mode, stat.size),
        (0o640, 3),
        "the replaced file's mode is kept"
    );
    let fresh = format!("{root}/fresh");
    client.write_file(&fresh, b"x").await.expect("write");
    assert_eq!(client.stat(&fresh).await.expect("stat").mode, 0o644);

    let start = FileWriteStart {
        path: existing.clone(),
        mode: Some(0o600),
        user: Some("65534:65533".into()),
        create_parents: false,
    };
    client
        .write_file_from(start, &mut &b"owned"[..])
        .await
        .expect("write");
    let stat = client.stat(&existing).await.expect("stat");
    assert_eq!((stat.mode, stat.uid, stat.gid), (0o600, 65534, 65533));
    let setuid = FileWriteStart {
        path: format!("{root}/setuid-tool"),
        mode: Some(0o4755),
        user: Some("65534:65533".into()),
        create_parents: false,
    };
    client
        .write_file_from(setuid, &mut &b"#!/bin/sh\n"[..])
        .await
        .expect("write");
    let stat = client
        .stat(&format!("{root}/setuid-tool"))
        .await
        .expect("stat");
    assert_eq!(
        (stat.mode, stat.uid),
        (0o4755, 65534),
        "set-id bits survive the change of owner"
    );

    std::fs::create_dir(dir.path().join("pre")).expect("mkdir");
    client
        .mkdir(&MkdirRequest {
            path: format!("{root}/pre/a/b"),
            mode: Some(0o710),
            user: Some("65534:65533".into()),
        })
        .await
        .expect("mkdir -p");
    for created in ["pre/a", "pre/a/b"] {
        let stat = client
            .stat(&format!("{root}/{created}"))
            .await
            .expect("stat");
        assert_eq!(
            (stat.mode, stat.uid, stat.gid),
            (0o710, 65534, 65533),
            "{created}"
        );
    }
    let pre = client.stat(&format!("{root}/pre")).await.expect("stat");
    assert_eq!(
        (pre.uid, pre.gid),
        (0, 0),
        "an existing directory is left alone"
    );
}

/// Writes into a read-only filesystem fail with a typed permission error, and change nothing.
#[tokio::test]
async fn writes_to_a_read_only_mount_are_permission_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).expect("mkdir");
    std::fs::write(ro.join("existing"), b"old").expect("write");
    let ro = ro.to_string_lossy().into_owned();
    // Read-only in the agent's mount namespace only.
    let (_agent, client) = common::start_with(LocalAgentOptions {
        setup: Some(format!(
            "mount --bind '{ro}' '{ro}' && mount -o remount,bind,ro '{ro}'"
        )),
        ..LocalAgentOptions::default()
    })
    .await;

    assert_eq!(
        kind(client.write_file(&format!("{ro}/new"), b"x").await),
        Some(ErrorKind::PermissionDenied)
    );
    assert_eq!(
        kind(client.write_file(&format!("{ro}/existing"), b"x").await),
        Some(ErrorKind::PermissionDenied)
    );
    let mkdir = MkdirRequest {
        path: format!("{ro}/sub"),
        mode: None,
        user: None,
    };
    assert_eq!(
        kind(client.mkdir(&mkdir).await),
        Some(ErrorKind::PermissionDenied)
    );
    assert_eq!(
        kind(client.remove(&format!("{ro}/existing"), false).await),
        Some(ErrorKind::PermissionDenied)
    );
    assert_eq!(
        client
            .read_file(&format!("{ro}/existing"), 100)
            .await
            .expect("reads still work"),
        b"old"
    );
    assert_eq!(
        std::fs::read(format!("{ro}/existing")).expect("read"),
        b"old"
    );
}

/// Deterministic bytes that differ with `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// FNV-1a, enough to tell the transferred files apart.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Uploads, downloads and execs at the same time over one session: every transfer arrives
/// intact and every exec gets its own output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_and_execs_share_one_session() {
    const FILES: u64 = 8;
    let size = |i: u64| (3 << 20) + i as usize * 4099;
    let (_agent, client) = start().await;
    let client = std::sync::Arc::new(client);
    let session = client.connect().await.expect("handshake").nonce;
    let dir = tempfile::tempdir().expect("temp dir");
    for i in 0..FILES {
        std::fs::write(
            dir.path().join(format!("down-{i}")),
            pattern(100 + i, size(i)),
        )
        .expect("write");
    }

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..FILES {
        let (uploader, path) = (client.clone(), dir.path().join(format!("up-{i}")));
        tasks.spawn(async move {
            let data = pattern(i, size(i));
            let path = path.to_string_lossy().into_owned();
            uploader.write_file(&path, &data).await.expect("upload");
            let stored = std::fs::read(&path).expect("read");
            assert_eq!(digest(&stored), digest(&data), "upload {i}");
            assert_eq!(stored.len(), data.len(), "upload {i}");
        });
        let (downloader, path) = (client.clone(), dir.path().join(format!("down-{i}")));
        tasks.spawn(async move {
            let path = path.to_string_lossy().into_owned();
            let data = downloader
                .read_file(&path, 8 << 20)
                .await
                .expect("download");
            let expected = pattern(100 + i, size(i));
            assert_eq!(digest(&data), digest(&expected), "download {i}");
            assert_eq!(data.len(), expected.len(), "download {i}");
        });
    }
    for i in 0..24 {
        let client = client.clone();
        tasks.spawn(async move {
            let script = format!("echo exec-{i}; head -c 200000 /dev/zero | wc -c; exit {i}");
            let result = client.run(common::sh(&script), 4096).await.expect("runs");
            assert_eq!(
                String::from_utf8_lossy(&result.stdout),
                format!("exec-{i}\n200000\n")
            );
            assert_eq!(result.status.code, Some(i));
        });
    }
    let all = async {
        while let Some(done) = tasks.join_next().await {
            done.expect("task succeeded");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("everything finished");
    assert_eq!(
        client.connect().await.expect("session").nonce,
        session,
        "all of it went over the first session"
    );
}

/// A target path of the longest length Linux takes (4095 bytes): the temporary file beside
/// it has a longer path, so it is made, renamed and removed relative to its directory.
#[tokio::test]
async fn a_write_to_the_longest_path_succeeds_and_leaves_nothing_beside_it() {
    let (_agent, client) = start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut parent = dir.path().to_string_lossy().into_owned();
    // Names of the longest length too (255 bytes), as far as they fit.
    while parent.len() + 1 + 255 + 1 + 20 < 4095 {
        parent.push('/');
        parent.push_str(&"d".repeat(255));
    }
    let name = "f".repeat(4095 - parent.len() - 1);
    let file = format!("{parent}/{name}");
    assert_eq!(file.len(), 4095);
    let start = FileWriteStart {
        path: file.clone(),
        mode: None,
        user: None,
        create_parents: true,
    };
    let data = b"at the limit".to_vec();
    for _ in 0..2 {
        let written = client
            .write_file_from(start.clone(), &mut &data[..])
            .await
            .expect("write (new, then replaced)");
        assert_eq!(written, data.len() as u64);
    }
    assert_eq!(client.read_file(&file, 1 << 10).await.expect("read"), data);
    let listed = client.list(&parent, 1).await.expect("list");
    let names: Vec<&str> = listed.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, [file.as_str()], "nothing but the file beside it");
}
