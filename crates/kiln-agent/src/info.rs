//! Health and resource figures of the guest, read from `/proc` and `statvfs`.

use kiln_proto::messages::{DiskInfo, MemoryInfo};

/// Seconds since boot.
pub fn uptime_secs() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// 1, 5 and 15 minute load averages.
pub fn load() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    parse_loadavg(&text)
}

fn parse_loadavg(text: &str) -> [f64; 3] {
    let mut fields = text.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        fields.next().unwrap_or(0.0),
        fields.next().unwrap_or(0.0),
        fields.next().unwrap_or(0.0),
    ]
}

/// `MemTotal` and `MemAvailable`.
pub fn memory() -> MemoryInfo {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
}

fn parse_meminfo(text: &str) -> MemoryInfo {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    MemoryInfo {
        total_bytes: field("MemTotal:"),
        available_bytes: field("MemAvailable:"),
    }
}

/// Size and free space of the root filesystem.
pub fn disk() -> DiskInfo {
    match nix::sys::statvfs::statvfs("/") {
        Ok(st) => {
            let frag = st.fragment_size();
            DiskInfo {
                total_bytes: st.blocks() * frag,
                available_bytes: st.blocks_available() * frag,
            }
        }
        Err(_) => DiskInfo::default(),
    }
}

/// The kernel's hostname.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(
            parse_loadavg("0.50 1.25 2.00 1/123 456\n"),
            [0.5, 1.25, 2.0]
        );
        assert_eq!(parse_loadavg("garbage"), [0.0, 0.0, 0.0]);
        let mem =
            parse_meminfo("MemTotal:       2048 kB\nMemFree: 1 kB\nMemAvailable:   1024 kB\n");
        assert_eq!(
            mem,
            MemoryInfo {
                total_bytes: 2048 * 1024,
                available_bytes: 1024 * 1024
            }
        );
    }

    #[test]
    fn reads_live_figures() {
        assert!(uptime_secs() > 0.0);
        assert!(memory().total_bytes > 0);
        assert!(disk().total_bytes > 0);
    }
}
