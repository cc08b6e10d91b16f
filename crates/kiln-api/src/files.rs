//! Files in a sandbox: streamed downloads and uploads (an interrupted upload changes
//! nothing: the agent writes a temporary file and renames it), listings and changes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use kiln_agent_client::ClientError;
use kiln_proto::messages::{
    ErrorKind, FileReadRequest, FileStat, FileType, FileWriteStart, MkdirRequest,
};

use crate::types::{ErrorBody, FileBody, FileListBody, MkdirBody, RenameBody, WrittenBody};
use crate::{ApiError, AppState, Caller, Json, Path, Query};
use kiln_control::ControlError;

/// Longest path accepted, in characters (as the OpenAPI document's `maxLength` counts):
/// Linux's `PATH_MAX` (4096 bytes) counts the terminating NUL.
const MAX_PATH: usize = 4095;

/// Longest name in a path, in characters.
const MAX_NAME: usize = 255;

/// A path in the guest: absolute, no NUL, bounded.
fn guest_path(path: &str) -> Result<String, ApiError> {
    if !path.starts_with('/')
        || path.chars().count() > MAX_PATH
        || path.contains('\0')
        || path.split('/').any(|name| name.chars().count() > MAX_NAME)
    {
        return Err(ApiError::invalid(format!(
            "path must be absolute, without NUL, at most {MAX_PATH} characters, and each name \
             in it at most {MAX_NAME}"
        )));
    }
    Ok(path.to_owned())
}

/// Whether `path` (absolute) names the root directory.
fn is_root(path: &str) -> bool {
    path.bytes().all(|b| b == b'/')
}

fn file_body(stat: FileStat) -> FileBody {
    FileBody {
        path: stat.path,
        kind: match stat.file_type {
            FileType::File => "file",
            FileType::Dir => "dir",
            FileType::Symlink => "symlink",
            FileType::Other => "other",
        }
        .into(),
        size: stat.size,
        mode: stat.mode,
        modified_ms: stat.modified_ms,
    }
}

/// `?path=…`
#[derive(Debug, serde::Deserialize)]
pub(crate) struct PathQuery {
    path: String,
}

/// Downloads a file as a byte stream.
#[utoipa::path(get, operation_id = "read_file", path = "/v1/sandboxes/{id}/files/content", tag = "files",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("path" = String, Query, description = "Absolute path in the sandbox", min_length = 1, max_length = 4095, pattern = "^(/[^/\\u0000]{0,255})+$")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>,
               headers(("x-kiln-file-size" = u64, description = "The file's size when it was opened"))),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "The path names a directory, or a component of it is not one", body = ErrorBody),
              (status = 422, description = "The file opened but could not be read (`guest_error`)", body = ErrorBody)))]
pub(crate) async fn read(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Query(query): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let path = guest_path(&query.path)?;
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    // Opened before the response starts, so a missing file or a directory (also one reached
    // through a symbolic link) is an error status, not a stream cut after a 200.
    let request = FileReadRequest {
        path: path.clone(),
        offset: 0,
        limit: None,
    };
    let download = match sandbox.agent().open_file(request).await {
        Err(ClientError::Agent(e)) if e.kind == ErrorKind::IsADirectory => {
            return Err(ControlError::Conflict(format!(
                "{path} is a directory: list it with GET /v1/sandboxes/{id}/files?path=…"
            ))
            .into())
        }
        other => other?,
    };
    let size = download.size();
    let (mut writer, reader) = tokio::io::duplex(256 << 10);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        // The sandbox is held until the copy ends.
        let _sandbox = sandbox;
        let result = download.copy_to(&mut writer).await;
        let _ = done_tx.send(result.map(drop));
    });
    // The first bytes (or the end) before the response starts, so a file that opens but
    // cannot be read (`/proc/self/mem`, an I/O error) is an error status too.
    let mut reader = tokio::io::BufReader::with_capacity(64 << 10, reader);
    let nothing_yet = tokio::io::AsyncBufReadExt::fill_buf(&mut reader)
        .await
        .map_err(|e| ControlError::Internal(format!("reading the download: {e}")))?
        .is_empty();
    let under_way = if nothing_yet {
        match done_rx.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(ControlError::Internal("the transfer task ended".into()).into()),
        }
    } else {
        Some(done_rx)
    };
    // The data, then an error if the transfer broke: the connection is then cut instead of
    // ending as if the file were complete.
    let tail = futures_util::stream::once(async move {
        match under_way?.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(Err(std::io::Error::other(e.to_string()))),
            Err(_) => Some(Err(std::io::Error::other("transfer task ended"))),
        }
    })
    .filter_map(|item| async move { item });
    let stream = tokio_util::io::ReaderStream::new(reader).chain(tail);
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_owned(),
            ),
            (
                axum::http::HeaderName::from_static("x-kiln-file-size"),
                size.to_string(),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Uploads a file (the request body is its content; missing parent directories are made).
/// The file appears whole or not at all.
#[utoipa::path(put, operation_id = "write_file", path = "/v1/sandboxes/{id}/files/content", tag = "files",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("path" = String, Query, description = "Absolute path in the sandbox", min_length = 1, max_length = 4095, pattern = "^(/[^/\\u0000]{0,255})+$")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = WrittenBody), (status = 400, body = ErrorBody),
              (status = 413, body = ErrorBody)))]
pub(crate) async fn write(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Query(query): Query<PathQuery>,
    body: Body,
) -> Result<(StatusCode, Json<WrittenBody>), ApiError> {
    let path = guest_path(&query.path)?;
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    let max = state.config.max_upload_bytes;
    let too_large = Arc::new(AtomicBool::new(false));
    let flag = too_large.clone();
    let mut seen = 0u64;
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen += chunk.len() as u64;
        if seen > max {
            flag.store(true, Ordering::SeqCst);
            return Err(std::io::Error::other("upload too large"));
        }
        Ok(chunk)
    });
    let mut reader = tokio_util::io::StreamReader::new(stream);
    let start = FileWriteStart {
        path: path.clone(),
        mode: None,
        user: None,
        create_parents: true,
    };
    match sandbox.agent().write_file_from(start, &mut reader).await {
        Ok(bytes) => Ok((StatusCode::CREATED, Json(WrittenBody { path, bytes }))),
        Err(_) if too_large.load(Ordering::SeqCst) => Err(kiln_control::ControlError::TooLarge(
            format!("uploads are at most {max} bytes; nothing was written"),
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// `?path=…&depth=…`
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ListQuery {
    path: String,
    #[serde(default = "one")]
    depth: u32,
}

fn one() -> u32 {
    1
}

/// Lists a directory (`depth` levels, default 1).
#[utoipa::path(get, operation_id = "list_files", path = "/v1/sandboxes/{id}/files", tag = "files", security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("path" = String, Query, description = "Absolute path in the sandbox", min_length = 1, max_length = 4095, pattern = "^(/[^/\\u0000]{0,255})+$"),
           ("depth" = Option<u32>, Query, description = "Levels (default 1, at most 16)", minimum = 1, maximum = 16)),
    responses((status = 200, body = FileListBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<FileListBody>, ApiError> {
    let path = guest_path(&query.path)?;
    if query.depth == 0 || query.depth > 16 {
        return Err(ApiError::invalid("depth is between 1 and 16"));
    }
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    let listing = sandbox.agent().list(&path, query.depth).await?;
    Ok(Json(FileListBody {
        entries: listing.entries.into_iter().map(file_body).collect(),
        truncated: listing.truncated,
    }))
}

/// Metadata of a path.
#[utoipa::path(get, operation_id = "stat_file", path = "/v1/sandboxes/{id}/files/stat", tag = "files",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("path" = String, Query, description = "Absolute path in the sandbox", min_length = 1, max_length = 4095, pattern = "^(/[^/\\u0000]{0,255})+$")),
    responses((status = 200, body = FileBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn stat(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Query(query): Query<PathQuery>,
) -> Result<Json<FileBody>, ApiError> {
    let path = guest_path(&query.path)?;
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    Ok(Json(file_body(sandbox.agent().stat(&path).await?)))
}

/// Makes a directory and its missing parents.
#[utoipa::path(post, operation_id = "make_dir", path = "/v1/sandboxes/{id}/files/mkdir", tag = "files",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = MkdirBody,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn mkdir(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Json(body): Json<MkdirBody>,
) -> Result<StatusCode, ApiError> {
    let path = guest_path(&body.path)?;
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    sandbox
        .agent()
        .mkdir(&MkdirRequest {
            path,
            mode: None,
            user: None,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `?path=…&recursive=…`
#[derive(Debug, serde::Deserialize)]
pub(crate) struct RemoveQuery {
    path: String,
    #[serde(default)]
    recursive: bool,
}

/// Removes a file, or a directory (`recursive=true` for a non-empty one).
#[utoipa::path(delete, operation_id = "remove_file", path = "/v1/sandboxes/{id}/files", tag = "files",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("path" = String, Query, description = "Absolute path in the sandbox, not `/`", min_length = 2, max_length = 4095, pattern = "^(/[^/\\u0000]{0,255})*/[^/\\u0000]{1,255}(/[^/\\u0000]{0,255})*$"),
           ("recursive" = Option<bool>, Query, description = "Remove a directory tree")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn remove(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Query(query): Query<RemoveQuery>,
) -> Result<StatusCode, ApiError> {
    let path = guest_path(&query.path)?;
    if is_root(&path) {
        return Err(ApiError::invalid("refusing to remove /"));
    }
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    sandbox.agent().remove(&path, query.recursive).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Renames (moves) a file or directory.
#[utoipa::path(post, operation_id = "rename_file", path = "/v1/sandboxes/{id}/files/rename", tag = "files",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = RenameBody,
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn rename(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Json(body): Json<RenameBody>,
) -> Result<StatusCode, ApiError> {
    let (from, to) = (guest_path(&body.from)?, guest_path(&body.to)?);
    if is_root(&from) || is_root(&to) {
        return Err(ApiError::invalid("refusing to move / or to replace it"));
    }
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    sandbox.agent().rename(&from, &to).await?;
    Ok(StatusCode::NO_CONTENT)
}
