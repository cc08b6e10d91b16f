//! A process's figures from `/proc/<pid>/stat`, as the kernel counts them.

/// What `/proc/<pid>/stat` says of a process (all its threads).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStat {
    /// Resident memory, in bytes.
    pub resident_bytes: u64,
    /// Threads.
    pub threads: u64,
    /// User and system CPU time, in seconds.
    pub cpu_seconds: f64,
}

/// The figures of process `pid` (`None`: this process), if it exists.
pub fn read(pid: Option<u32>) -> Option<ProcStat> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    parse(&text, ticks.max(1) as f64, page.max(1) as u64)
}

/// Parses a `stat` line; `None` if it is not one.
pub fn parse(stat: &str, ticks_per_second: f64, page_size: u64) -> Option<ProcStat> {
    // The command name (field 2) may hold spaces and parentheses: fields restart after its
    // last `)`, with field 3 (state) first.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(ProcStat {
        resident_bytes: field(24)?.saturating_mul(page_size),
        threads: field(20)?,
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks_per_second,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_read_past_a_hostile_command_name() {
        // After the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime(14) stime(15) cutime cstime priority nice threads(20) itrealvalue
        // starttime vsize rss(24) ...
        let stat = "4242 (kiln) serve (x)) S 1 1 1 0 -1 0 0 0 0 0 250 50 0 0 20 0 7 0 100 \
                    1000000 300 18446744073709551615";
        assert_eq!(
            parse(stat, 100.0, 4096),
            Some(ProcStat {
                resident_bytes: 300 * 4096,
                threads: 7,
                cpu_seconds: 3.0,
            })
        );
        assert_eq!(parse("garbage", 100.0, 4096), None);
        assert_eq!(parse("1 (x) S 1 2", 100.0, 4096), None);
        let own = read(None).expect("this process");
        assert!(own.threads >= 1 && own.resident_bytes > 0);
    }
}
