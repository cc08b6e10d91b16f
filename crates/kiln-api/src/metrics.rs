//! `GET /metrics`: the daemon's figures in the Prometheus text format (0.0.4), for an admin
//! key. Names start with `kiln_` and are in base units; no label holds a sandbox id, so the
//! number of series stays bounded whatever the load.
//!
//! Request figures are counted as requests are answered (by route template, method and
//! status); everything else (sandboxes by state and template, the pre-started VMMs, the data
//! disk, the daemon process) is read when scraped.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::{ApiError, AppState, Caller};

/// The error code an [`ApiError`] response carries, for the error counter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ErrorCode(pub &'static str);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    code: String,
}

/// Totals kept elsewhere, as far as the counters already count them.
#[derive(Debug, Default)]
struct Counted {
    cpu_seconds: f64,
    templates_ready: u64,
    templates_failed: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabels {
    state: String,
    template: String,
}

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    errors: Family<ErrorLabels, Counter>,
    sandboxes: Family<SandboxLabels, Gauge>,
    templates: Family<OutcomeLabels, Counter>,
    prestarted: Gauge,
    disk_size: Gauge,
    disk_available: Gauge,
    disk_reserve: Gauge,
    sandbox_disk_used: Gauge,
    sandbox_disk_budget: Gauge,
    sandbox_disk_headroom: Gauge,
    resident: Gauge,
    open_fds: Gauge,
    threads: Gauge,
    cpu: Counter<f64, AtomicU64>,
    /// What the counters read at scrape time already counted (held by the scrape in
    /// progress: one at a time).
    counted: Mutex<Counted>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registered and zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kiln");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "API requests answered, by route template, method and status",
            requests.clone(),
        );
        let durations = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            // 1 ms to about 65 s.
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        registry.register_with_unit(
            "http_request_duration",
            "Time to answer an API request (to the response's head; a streamed body runs on), \
             by route template and method: sandbox creates are POST /v1/sandboxes, execs \
             POST /v1/sandboxes/{id}/exec, forks POST /v1/sandboxes/{id}/fork",
            Unit::Seconds,
            durations.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "api_errors",
            "API errors answered, by error code (as in the error body)",
            errors.clone(),
        );
        let sandboxes = Family::<SandboxLabels, Gauge>::default();
        registry.register(
            "sandboxes",
            "Sandboxes by state and template, all tenants",
            sandboxes.clone(),
        );
        let templates = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "template_preparations",
            "Times a template was made ready (built and baked, or its bake found on disk) since \
             the daemon started, and failed attempts, by outcome (ready, failed)",
            templates.clone(),
        );
        let prestarted = Gauge::default();
        registry.register(
            "prestarted_vmms",
            "VMMs started ahead of creates, waiting for a sandbox",
            prestarted.clone(),
        );
        let disk_size = Gauge::default();
        registry.register_with_unit(
            "data_disk_size",
            "Size of the file system holding the data directory",
            Unit::Bytes,
            disk_size.clone(),
        );
        let disk_available = Gauge::default();
        registry.register_with_unit(
            "data_disk_available",
            "Space left for the daemon on the file system holding the data directory",
            Unit::Bytes,
            disk_available.clone(),
        );
        let disk_reserve = Gauge::default();
        registry.register_with_unit(
            "data_disk_reserve",
            "Free space kept for the host on the file system holding the data directory \
             (--disk-reserve-mib)",
            Unit::Bytes,
            disk_reserve.clone(),
        );
        let sandbox_disk_used = Gauge::default();
        registry.register_with_unit(
            "sandbox_disk_used",
            "Disk space sandboxes hold on the host (allocated): disks, pause images, fork \
             captures, snapshots",
            Unit::Bytes,
            sandbox_disk_used.clone(),
        );
        let sandbox_disk_budget = Gauge::default();
        registry.register_with_unit(
            "sandbox_disk_budget",
            "Most disk space sandboxes may hold (--disk-budget-mib); 0 when no budget is set",
            Unit::Bytes,
            sandbox_disk_budget.clone(),
        );
        let sandbox_disk_headroom = Gauge::default();
        registry.register_with_unit(
            "sandbox_disk_headroom",
            "Disk space sandboxes may still take before the reserve or the budget; at 0 their \
             disks stop growing and creates, forks, pauses and snapshots are refused",
            Unit::Bytes,
            sandbox_disk_headroom.clone(),
        );
        let resident = Gauge::default();
        registry.register_with_unit(
            "process_resident_memory",
            "The daemon's resident memory",
            Unit::Bytes,
            resident.clone(),
        );
        let open_fds = Gauge::default();
        registry.register(
            "process_open_fds",
            "The daemon's open file descriptors",
            open_fds.clone(),
        );
        let threads = Gauge::default();
        registry.register("process_threads", "The daemon's threads", threads.clone());
        let cpu = Counter::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "process_cpu",
            "CPU time the daemon used (user and system)",
            Unit::Seconds,
            cpu.clone(),
        );
        Metrics {
            registry,
            requests,
            durations,
            errors,
            sandboxes,
            templates,
            prestarted,
            disk_size,
            disk_available,
            disk_reserve,
            sandbox_disk_used,
            sandbox_disk_budget,
            sandbox_disk_headroom,
            resident,
            open_fds,
            threads,
            cpu,
            counted: Mutex::new(Counted::default()),
        }
    }

    /// Counts an answered request.
    fn observe(&self, method: &str, route: &str, status: StatusCode, seconds: f64) {
        let route = route.to_owned();
        let method = method.to_owned();
        self.requests
            .get_or_create(&RequestLabels {
                method: method.clone(),
                route: route.clone(),
                status: status.as_u16(),
            })
            .inc();
        self.durations
            .get_or_create(&RouteLabels { method, route })
            .observe(seconds);
    }

    /// The text exposition, with the scrape-time figures read now.
    fn render(
        &self,
        state: &AppState,
        space: Option<kiln_engine::DiskSpace>,
    ) -> Result<String, ApiError> {
        let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        self.sandboxes.clear();
        for (state, template, count) in state.control.sandbox_counts()? {
            self.sandboxes
                .get_or_create(&SandboxLabels { state, template })
                .set(count);
        }
        let (ready, failed) = state.control.template_preparations();
        let counted = &mut *counted;
        for (outcome, total, seen) in [
            ("ready", ready, &mut counted.templates_ready),
            ("failed", failed, &mut counted.templates_failed),
        ] {
            self.templates
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(total.saturating_sub(*seen));
            *seen = total.max(*seen);
        }
        let engine = state.control.engine();
        self.prestarted
            .set(gauge(engine.prestarted_pids().len() as u64));
        if let Some(space) = space {
            self.disk_size.set(gauge(space.filesystem_bytes));
            self.disk_available.set(gauge(space.available_bytes));
            self.disk_reserve.set(gauge(space.reserve_bytes));
            self.sandbox_disk_used.set(gauge(space.used_bytes));
            self.sandbox_disk_budget
                .set(gauge(space.budget_bytes.unwrap_or(0)));
            self.sandbox_disk_headroom.set(gauge(space.headroom()));
        }
        let process = kiln_engine::procstat::read(None).unwrap_or_default();
        self.resident.set(gauge(process.resident_bytes));
        self.threads.set(gauge(process.threads));
        if process.cpu_seconds > counted.cpu_seconds {
            self.cpu.inc_by(process.cpu_seconds - counted.cpu_seconds);
            counted.cpu_seconds = process.cpu_seconds;
        }
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count());
        self.open_fds.set(gauge(open_fds as u64));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .map_err(|e| ApiError::from(kiln_control::ControlError::Internal(e.to_string())))?;
        Ok(text)
    }
}

/// A count or size as a gauge's value (saturating).
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Times and counts every request the router answers.
pub(crate) async fn observe(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics.observe(
        &method,
        &route,
        response.status(),
        started.elapsed().as_secs_f64(),
    );
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        metrics
            .errors
            .get_or_create(&ErrorLabels {
                code: (*code).to_owned(),
            })
            .inc();
    }
    response
}

/// The daemon's metrics in the Prometheus text format (admin keys only).
pub(crate) async fn scrape(
    State(state): State<AppState>,
    Caller(who): Caller,
) -> Result<Response, ApiError> {
    if !who.admin {
        return Err(ApiError::from(kiln_control::ControlError::Forbidden(
            "metrics are for admin keys (`kiln keys create --admin`), or on --metrics-listen"
                .into(),
        )));
    }
    exposition(&state).await
}

/// The same without a key: served only on the operator's own listen address.
pub(crate) async fn scrape_open(State(state): State<AppState>) -> Result<Response, ApiError> {
    exposition(&state).await
}

async fn exposition(state: &AppState) -> Result<Response, ApiError> {
    // Measuring the sandboxes' disk space walks their files: off the async workers.
    let engine = state.control.engine().clone();
    let space = tokio::task::spawn_blocking(move || engine.disk_space().ok())
        .await
        .ok()
        .flatten();
    let text = state.metrics.render(state, space)?;
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_is_prometheus_text_with_kiln_names() {
        let metrics = Metrics::new();
        metrics.observe("POST", "/v1/sandboxes", StatusCode::CREATED, 0.2);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &metrics.registry)
            .expect("encode");
        assert!(text.contains(
            "kiln_http_requests_total{method=\"POST\",route=\"/v1/sandboxes\",status=\"201\"} 1"
        ), "{text}");
        assert!(
            text.contains("# TYPE kiln_http_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE kiln_process_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }
}
