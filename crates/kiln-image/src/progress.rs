//! Progress reporting for long builds.

use std::time::Duration;

/// What a build reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildEvent {
    /// A step started.
    Step {
        /// What is being built (`kernel`, `rootfs python`, ...).
        artefact: String,
        /// Step name.
        name: String,
    },
    /// The step finished.
    StepDone {
        /// What is being built.
        artefact: String,
        /// Step name.
        name: String,
        /// How long it took.
        elapsed: Duration,
        /// Result detail (a size, a count).
        detail: Option<String>,
    },
    /// An artefact was found in the cache.
    Cached {
        /// What.
        artefact: String,
        /// Where.
        path: String,
    },
}

/// Receives build events.
pub trait Progress: Send + Sync {
    /// Called for every event.
    fn event(&self, event: BuildEvent);
}

/// Prints events as lines on stderr.
#[derive(Debug, Default)]
pub struct PrintProgress;

impl Progress for PrintProgress {
    fn event(&self, event: BuildEvent) {
        eprintln!("{}", event.line());
    }
}

impl BuildEvent {
    /// The event as one line for people: artefact, step, and when done the time it took
    /// and its result.
    pub fn line(&self) -> String {
        match self {
            BuildEvent::Step { artefact, name } => format!("  [{artefact}] {name} ..."),
            BuildEvent::StepDone {
                artefact,
                name,
                elapsed,
                detail,
            } => {
                let detail = detail
                    .as_ref()
                    .map(|d| format!(", {d}"))
                    .unwrap_or_default();
                format!(
                    "  [{artefact}] {name}: done in {:.1} s{detail}",
                    elapsed.as_secs_f64()
                )
            }
            BuildEvent::Cached { artefact, path } => format!("  [{artefact}] cached at {path}"),
        }
    }
}

/// Discards events.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _event: BuildEvent) {}
}

/// Runs `f` as a named step, reporting start and end.
pub fn step<T, E>(
    progress: &dyn Progress,
    artefact: &str,
    name: &str,
    f: impl FnOnce() -> Result<(T, Option<String>), E>,
) -> Result<T, E> {
    progress.event(BuildEvent::Step {
        artefact: artefact.to_owned(),
        name: name.to_owned(),
    });
    let started = std::time::Instant::now();
    let (value, detail) = f()?;
    progress.event(BuildEvent::StepDone {
        artefact: artefact.to_owned(),
        name: name.to_owned(),
        elapsed: started.elapsed(),
        detail,
    });
    Ok(value)
}

/// Formats a byte count for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_report_their_time_and_result() {
        struct Lines(std::sync::Mutex<Vec<String>>);
        impl Progress for Lines {
            fn event(&self, event: BuildEvent) {
                self.0.lock().expect("not poisoned").push(event.line());
            }
        }
        let lines = Lines(std::sync::Mutex::new(Vec::new()));
        let value = step(&lines, "rootfs base", "make ext4 image", || {
            Ok::<_, ()>((7, Some("1.5 MiB of files".to_owned())))
        });
        assert_eq!(value, Ok(7));
        let failed = step(&lines, "kernel", "fetch", || Err::<((), _), _>("offline"));
        assert_eq!(failed, Err("offline"));
        let lines = lines.0.into_inner().expect("not poisoned");
        assert_eq!(lines[0], "  [rootfs base] make ext4 image ...");
        assert!(
            lines[1].starts_with("  [rootfs base] make ext4 image: done in ")
                && lines[1].ends_with(" s, 1.5 MiB of files"),
            "{}",
            lines[1]
        );
        assert_eq!(lines[2], "  [kernel] fetch ...");
        assert_eq!(lines.len(), 3, "a failed step reports no completion");
        assert_eq!(
            BuildEvent::StepDone {
                artefact: "kernel".into(),
                name: "download".into(),
                elapsed: Duration::from_millis(1260),
                detail: Some("67.0 MiB".into()),
            }
            .line(),
            "  [kernel] download: done in 1.3 s, 67.0 MiB"
        );
        assert_eq!(
            BuildEvent::Cached {
                artefact: "kernel".into(),
                path: "/var/cache/kiln/kernel/ab".into()
            }
            .line(),
            "  [kernel] cached at /var/cache/kiln/kernel/ab"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(200 << 20), "200.0 MiB");
        assert_eq!(human_bytes(5 << 40), "5.0 TiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }
}
