//! The client against agents that misbehave: garbage instead of HTTP/2, oversized frames,
//! oversized or malformed JSON, silence, stalled transfers, truncated streams and arbitrary
//! bytes, and a million frames of hostile exec streams. Every case must end in an error
//! within the configured time, without a panic or unbounded memory; and a transfer that is
//! slow but keeps moving must not be cut off.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use kiln_agent_client::ClientError;
use kiln_proto::frame::{Frame, FrameKind, MAX_FRAME_PAYLOAD};
use kiln_proto::messages::{
    Command, ExecEvent, ExecRequest, FileReadEvent, FileWriteResponse, FileWriteStart,
};
use kiln_proto::stream::{frame_channel, FrameReader};
use kiln_testinfra::hostile_agent::{fuzz_exec_streams, http, ok, Behaviour, FakeAgent};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

/// The fake agent, started.
async fn start(behaviour: Behaviour) -> FakeAgent {
    FakeAgent::start(behaviour).await.expect("fake agent")
}

fn exec() -> ExecRequest {
    ExecRequest::new(Command::Argv(vec!["true".into()]))
}

/// Bounds every case: a hostile agent must never make the client hang.
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the client must not hang")
}

#[tokio::test]
async fn garbage_instead_of_http2_is_an_error() {
    let agent = start(Behaviour::Raw(vec![0xAB; 100_000])).await;
    let err = within(agent.client().info()).await.expect_err("garbage");
    assert!(
        matches!(
            err,
            ClientError::Disconnected(_) | ClientError::Timeout { .. }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn silence_after_the_handshake_times_out() {
    let agent = start(Behaviour::Raw(Vec::new())).await;
    let err = within(agent.client().info()).await.expect_err("silence");
    assert!(
        matches!(
            err,
            ClientError::Disconnected(_) | ClientError::Timeout { .. }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_agent_that_never_answers_a_call_times_out() {
    let agent = start(http(|_req| std::future::pending())).await;
    let err = within(agent.client().info()).await.expect_err("no answer");
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn oversized_json_is_refused() {
    let agent = start(http(|_req| async {
        let mut json = b"{\"agent_version\":\"".to_vec();
        json.extend(std::iter::repeat_n(b'a', kiln_proto::MAX_JSON_BODY + 10));
        ok(json)
    }))
    .await;
    let err = within(agent.client().info()).await.expect_err("too big");
    assert!(
        matches!(err, ClientError::Protocol(_) | ClientError::Timeout { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn malformed_json_and_error_bodies_are_protocol_errors() {
    let agent = start(http(|req| async move {
        if req.uri().path() == kiln_proto::routes::INFO {
            ok("{not json")
        } else {
            let mut response = ok("<html>oops</html>");
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }))
    .await;
    let client = agent.client();
    assert!(matches!(
        within(client.info()).await,
        Err(ClientError::Protocol(_))
    ));
    assert!(matches!(
        within(client.processes()).await,
        Err(ClientError::Protocol(_))
    ));
}

#[tokio::test]
async fn oversized_frame_declaration_is_refused_without_allocating_it() {
    let agent = start(http(|_req| async {
        let mut bytes = Frame::control(&ExecEvent::Started { pid: 1 })
            .encode()
            .to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 1]);
        ok(bytes)
    }))
    .await;
    let client = agent.client();
    let mut session = within(client.exec(exec())).await.expect("started");
    let err = within(session.next()).await.expect_err("oversized frame");
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn stream_that_ends_without_exit_is_an_error() {
    let agent = start(http(|_req| async {
        ok(Frame::control(&ExecEvent::Started { pid: 1 }).encode())
    }))
    .await;
    let result = within(agent.client().run(exec(), 100)).await;
    assert!(
        matches!(result, Err(ClientError::Protocol(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn unknown_frames_and_bad_first_events_are_errors() {
    let agent = start(http(|req| async move {
        if req.uri().path() == kiln_proto::routes::EXEC {
            ok(Frame::control(&ExecEvent::OutputDropped { bytes: 1 }).encode())
        } else {
            ok(vec![0, 0, 0, 1, 77])
        }
    }))
    .await;
    let client = agent.client();
    assert!(matches!(
        within(client.exec(exec())).await,
        Err(ClientError::Protocol(_))
    ));
    let err = within(client.attach(kiln_proto::messages::ProcessSelector::Pid(1)))
        .await
        .expect_err("bad frame");
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
}

fn write_start() -> FileWriteStart {
    FileWriteStart::new("/x")
}

/// Reads a file write stream to its end frame and returns the data bytes it carried.
async fn consume_upload(req: Request<Incoming>) -> u64 {
    let mut frames = FrameReader::new(req.into_body(), MAX_FRAME_PAYLOAD);
    let mut size = 0;
    let mut controls = 0;
    while let Ok(Some(frame)) = frames.next().await {
        match frame.kind {
            FrameKind::Data => size += frame.payload.len() as u64,
            // The start frame, then the end frame.
            _ => {
                controls += 1;
                if controls == 2 {
                    break;
                }
            }
        }
    }
    size
}

fn timeout_of(err: &ClientError) -> Option<&'static str> {
    match err {
        ClientError::Timeout { what, .. } => Some(what),
        _ => None,
    }
}

#[tokio::test]
async fn a_download_that_stalls_after_its_start_times_out() {
    let agent = start(http(|_req| async {
        let (out, body) = frame_channel(4);
        tokio::spawn(async move {
            let _ = out
                .send(&Frame::control(&FileReadEvent::Opened { size: 10 }))
                .await;
            let _ = out
                .send(&Frame::new(FrameKind::Data, Bytes::from_static(b"12345")))
                .await;
            // Hold the stream open without sending the rest.
            out.closed().await;
        });
        Response::new(body.boxed())
    }))
    .await;
    let started = std::time::Instant::now();
    let err = within(agent.client().read_file("/x", 100))
        .await
        .expect_err("stalled download");
    assert_eq!(timeout_of(&err), Some("file download progress"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_download_past_its_limit_is_refused_before_it_is_kept() {
    // The agent ignores the request's limit and sends without end.
    let agent = start(http(|_req| async {
        let (out, body) = frame_channel(4);
        tokio::spawn(async move {
            let _ = out
                .send(&Frame::control(&FileReadEvent::Opened { size: 10 }))
                .await;
            let piece = Bytes::from(vec![b'x'; 64 << 10]);
            while out
                .send(&Frame::new(FrameKind::Data, piece.clone()))
                .await
                .is_ok()
            {}
        });
        Response::new(body.boxed())
    }))
    .await;
    let err = within(agent.client().read_file("/x", 100))
        .await
        .expect_err("more than asked for");
    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("more than the 101 bytes")),
        "{err:?}"
    );
}

/// Yields `chunks` pieces of `chunk` bytes, one every `every`.
fn throttled_source(chunks: usize, chunk: usize, every: Duration) -> tokio::io::DuplexStream {
    let (mut writer, reader) = tokio::io::duplex(chunk);
    tokio::spawn(async move {
        for _ in 0..chunks {
            if writer.write_all(&vec![b'x'; chunk]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    reader
}

#[tokio::test]
async fn a_slow_upload_that_keeps_moving_outlives_the_call_timeout() {
    let agent = start(http(|req| async move {
        let size = consume_upload(req).await;
        ok(serde_json::to_vec(&FileWriteResponse { size }).expect("serializable"))
    }))
    .await;
    let client = agent.client();
    // 20 pieces 100 ms apart: four times the client's call timeout of 500 ms in all.
    let mut source = throttled_source(20, 16 * 1024, Duration::from_millis(100));
    let started = std::time::Instant::now();
    let sent = within(client.write_file_from(write_start(), &mut source))
        .await
        .expect("an upload that keeps moving is not cut off");
    assert_eq!(sent, 20 * 16 * 1024);
    assert!(started.elapsed() > client.config().call_timeout * 3);
}

#[tokio::test]
async fn a_kill_all_may_answer_after_the_call_timeout() {
    // The agent answers every call three call timeouts late, as a kill-all of a fork bomb
    // does under emulation: a kill-all waits for that answer, other calls do not.
    let agent = start(http(|req| async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if req.uri().path() == kiln_proto::routes::KILL_ALL {
            ok(br#"{"killed":700}"#.to_vec())
        } else {
            ok(b"{}".to_vec())
        }
    }))
    .await;
    let client = agent.client();
    assert_eq!(client.config().call_timeout, Duration::from_millis(500));
    let killed = within(client.kill_all())
        .await
        .expect("a late kill-all answer");
    assert_eq!(killed, 700);
    let err = within(client.info()).await.expect_err("a late info answer");
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn an_upload_the_agent_stops_reading_times_out() {
    let agent = start(http(|req| async move {
        // Keep the request (and so the stream) without reading it, and never answer.
        let _request = req;
        std::future::pending().await
    }))
    .await;
    let mut endless = tokio::io::repeat(b'x');
    let err = within(agent.client().write_file_from(write_start(), &mut endless))
        .await
        .expect_err("stalled upload");
    assert_eq!(timeout_of(&err), Some("file upload progress"), "{err:?}");
}

#[tokio::test]
async fn an_agent_that_takes_an_upload_but_never_answers_times_out() {
    let agent = start(http(|req| async move {
        consume_upload(req).await;
        std::future::pending().await
    }))
    .await;
    let err = within(
        agent
            .client()
            .write_file_from(write_start(), &mut &b"hello"[..]),
    )
    .await
    .expect_err("no answer");
    assert_eq!(timeout_of(&err), Some("file write response"), "{err:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Arbitrary bytes after a valid start event, and arbitrary unary bodies: the client
    /// returns (an error or a value) without panicking or hanging.
    #[test]
    fn arbitrary_response_bodies_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..4096),
                                             unary in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let tail = Bytes::from(tail);
            let unary = Bytes::from(unary);
            let agent = start(http(move |req| {
                let (tail, unary) = (tail.clone(), unary.clone());
                async move {
                    if req.uri().path() == kiln_proto::routes::EXEC {
                        let mut bytes = Frame::control(&ExecEvent::Started { pid: 1 }).encode().to_vec();
                        bytes.extend_from_slice(&tail);
                        ok(bytes)
                    } else {
                        ok(unary)
                    }
                }
            })).await;
            let client = agent.client();
            if let Ok(session) = within(client.exec(exec())).await {
                let _ = within(session.collect(1 << 16)).await;
            }
            let _ = within(client.info()).await;
            let _ = within(client.read_file("/x", 100)).await;
        });
    }
}

/// Frames of the hostile-stream test: `KILN_FUZZ_FRAMES`, 1,000,000 by default (about 2 s
/// in a debug build). `kiln check fuzz` runs the same fuzz against its own build.
fn fuzz_frames() -> u64 {
    std::env::var("KILN_FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_exec_streams_end_in_an_answer_or_an_error_with_memory_bounded() {
    let report = fuzz_exec_streams(fuzz_frames(), 0)
        .await
        .expect("fake agent");
    eprintln!("{report:?}");
    assert!(report.passed(), "{report:?}");
}
