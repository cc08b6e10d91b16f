//! What a VMM process writes that the host keeps: the guest console (a socket the daemon
//! connects to) into a size-capped log file, and the VMM's standard error (a pipe) into a
//! bounded in-memory tail. One small thread per VM drains both, so a VMM or guest can never
//! make the daemon hold more than a fixed amount, nor block on them; the console is read at a
//! bounded rate, so a guest flooding it slows only itself.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A console log file is rotated (to `<name>.1`, replacing the older one) at this size, so
/// a sandbox's console never takes more than twice this on disk.
pub const CONSOLE_LOG_CAP: u64 = 1 << 20;

/// Bytes of the VMM's standard error kept (the most recent).
const STDERR_KEPT: usize = 64 << 10;

/// Console bytes read per second at most, after a burst of [`CONSOLE_BURST`].
const CONSOLE_RATE: f64 = 256.0 * 1024.0;
const CONSOLE_BURST: f64 = 1024.0 * 1024.0;

/// The most recent bytes a VMM wrote to its standard error.
#[derive(Debug, Default)]
struct StderrTail {
    bytes: VecDeque<u8>,
}

impl StderrTail {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
        let excess = self.bytes.len().saturating_sub(STDERR_KEPT);
        self.bytes.drain(..excess);
    }
}

/// The thread that drains one VMM's console and standard error, and what it collected.
#[derive(Debug)]
pub struct VmmOutput {
    stderr: Arc<Mutex<StderrTail>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    log: PathBuf,
}

impl VmmOutput {
    /// Connects to the console socket at `console` (a listening socket the VMM holds) and
    /// starts draining it into `log`, and `stderr` (the read end of the VMM's pipe, if this
    /// process has it) into memory.
    pub fn start(console: &Path, log: &Path, stderr: Option<OwnedFd>) -> io::Result<VmmOutput> {
        let console = UnixStream::connect(console)?;
        console.set_nonblocking(true)?;
        if let Some(fd) = &stderr {
            set_nonblocking(fd)?;
        }
        let tail = Arc::new(Mutex::new(StderrTail::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let file = open_log(log)?;
        let written = file.metadata()?.len();
        let mut drain = Drain {
            console: Some(console),
            stderr,
            log: log.to_owned(),
            file: Some(file),
            written,
            tail: Arc::clone(&tail),
            stop: Arc::clone(&stop),
            budget: CONSOLE_BURST,
            refilled: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("vmm-output".into())
            .stack_size(128 << 10)
            .spawn(move || drain.run())?;
        Ok(VmmOutput {
            stderr: tail,
            stop,
            thread: Some(thread),
            log: log.to_owned(),
        })
    }

    /// The last `lines` lines the VMM wrote to its standard error.
    pub fn stderr_tail(&self, lines: usize) -> String {
        let tail = self
            .stderr
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bytes: Vec<u8> = tail.bytes.iter().copied().collect();
        last_lines(&String::from_utf8_lossy(&bytes), lines)
    }

    /// The console log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Waits up to `timeout` for the VMM's side to close (its process ended), so that
    /// everything it wrote is in the log and the tail.
    pub fn wait_closed(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while let Some(thread) = &self.thread {
            if thread.is_finished() {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
                return;
            }
            if Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for VmmOutput {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct Drain {
    console: Option<UnixStream>,
    stderr: Option<OwnedFd>,
    log: PathBuf,
    file: Option<std::fs::File>,
    written: u64,
    tail: Arc<Mutex<StderrTail>>,
    stop: Arc<AtomicBool>,
    /// Console bytes that may be read now (a token bucket).
    budget: f64,
    refilled: Instant,
}

impl Drain {
    fn run(&mut self) {
        let mut buffer = vec![0u8; 16 << 10];
        while (self.console.is_some() || self.stderr.is_some()) && !self.stop.load(Ordering::SeqCst)
        {
            self.refill();
            let read_console = self.console.is_some() && self.budget >= 1.0;
            let mut fds = Vec::with_capacity(2);
            if let (true, Some(console)) = (read_console, &self.console) {
                fds.push(libc::pollfd {
                    fd: console.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            if let Some(stderr) = &self.stderr {
                fds.push(libc::pollfd {
                    fd: stderr.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // Wake up now and then to notice `stop` and a refilled budget.
            // SAFETY: `fds` is a valid array of pollfd for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!(error = %e, "polling a VMM's output");
                return;
            }
            for pollfd in &fds {
                if pollfd.revents == 0 {
                    continue;
                }
                let is_console = self
                    .console
                    .as_ref()
                    .is_some_and(|c| c.as_raw_fd() == pollfd.fd);
                if is_console {
                    self.read_console(&mut buffer);
                } else {
                    self.read_stderr(&mut buffer);
                }
            }
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let earned = (now - self.refilled).as_secs_f64() * CONSOLE_RATE;
        self.budget = (self.budget + earned).min(CONSOLE_BURST);
        self.refilled = now;
    }

    fn read_console(&mut self, buffer: &mut [u8]) {
        let Some(console) = &mut self.console else {
            return;
        };
        let want = buffer.len().min(self.budget as usize).max(1);
        match console.read(&mut buffer[..want]) {
            Ok(0) => self.console = None,
            Ok(n) => {
                self.budget -= n as f64;
                let data = buffer[..n].to_vec();
                if let Err(e) = self.append(&data) {
                    tracing::warn!(log = %self.log.display(), error = %e, "writing a console log");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.console = None,
        }
    }

    fn read_stderr(&mut self, buffer: &mut [u8]) {
        let Some(fd) = &self.stderr else { return };
        // SAFETY: reading into `buffer` from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
        match n {
            0 => self.stderr = None,
            n if n > 0 => self
                .tail
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(&buffer[..n as usize]),
            _ => {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    self.stderr = None;
                }
            }
        }
    }

    /// Appends to the log, rotating it at [`CONSOLE_LOG_CAP`].
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if self.written + data.len() as u64 > CONSOLE_LOG_CAP && self.written > 0 {
            self.file = None;
            std::fs::rename(&self.log, rotated(&self.log))?;
            self.written = 0;
        }
        if self.file.is_none() {
            let file = open_log(&self.log)?;
            self.written = file.metadata()?.len();
            self.file = Some(file);
        }
        if let Some(file) = &mut self.file {
            file.write_all(data)?;
            self.written += data.len() as u64;
        }
        Ok(())
    }
}

/// Opens (or creates, root's alone) a console log for appending; never through a link.
fn open_log(log: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log)
}

/// Where a console log goes when it is rotated.
pub fn rotated(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The last `lines` lines of a console log (its rotated part included), from its last
/// 256 KiB, invalid UTF-8 replaced: bounded whatever the guest wrote.
pub fn console_tail(log: &Path, lines: usize) -> String {
    const WINDOW: u64 = 256 << 10;
    let current = read_tail(log, WINDOW);
    let text = if (current.len() as u64) < WINDOW {
        let mut older = read_tail(&rotated(log), WINDOW - current.len() as u64);
        older.extend_from_slice(&current);
        older
    } else {
        current
    };
    last_lines(&String::from_utf8_lossy(&text), lines)
}

/// The last `max` bytes of `path` (nothing if it cannot be read).
fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    use std::io::{Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(len.saturating_sub(max))).is_ok() {
        let _ = file.take(max).read_to_end(&mut bytes);
    }
    bytes
}

/// The last `lines` lines of `text`, after the first lines of the last panic message of a
/// program (Rust's `panicked at`) when that is above them: the kernel's trace of an init that
/// died fills a tail, and the cause is above it.
fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut kept: Vec<&str> = Vec::new();
    if let Some(at) = all[..start]
        .iter()
        .rposition(|line| line.contains("panicked at"))
    {
        kept.extend(&all[at..(at + 4).min(start)]);
        kept.push("[...]");
    }
    kept.extend(&all[start..]);
    kept.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn tails_keep_the_panic_above_them() {
        let mut text = String::from("boot\nthread 'main' panicked at src/main.rs:1:2:\nwhy\n");
        for i in 0..50 {
            text.push_str(&format!("trace {i}\n"));
        }
        let tail = last_lines(&text, 3);
        assert_eq!(
            tail,
            "thread 'main' panicked at src/main.rs:1:2:\nwhy\ntrace 0\ntrace 1\n[...]\ntrace 47\ntrace 48\ntrace 49"
        );
        assert_eq!(last_lines("a\nb\nc", 2), "b\nc");
    }

    #[test]
    fn tails_are_bounded_and_lossy() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("console.log");
        let mut text = vec![0xffu8; 1 << 20];
        text.extend_from_slice(b"\nlast line\n");
        std::fs::write(&path, &text).expect("write");
        assert_eq!(console_tail(&path, 1), "last line");
        assert!(console_tail(&path, 1000).len() < 1 << 20);
        assert_eq!(console_tail(&dir.path().join("missing"), 5), "");
        std::fs::write(&path, b"new\n").expect("write");
        std::fs::write(rotated(&path), b"old 1\nold 2\n").expect("write");
        assert_eq!(console_tail(&path, 2), "old 2\nnew");
    }

    #[test]
    fn console_is_capped_on_disk_and_stderr_in_memory() {
        let dir = tempfile::tempdir().expect("dir");
        let socket = dir.path().join("console.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let (stderr_read, stderr_write) = {
            let mut fds = [0; 2];
            // SAFETY: pipe fills two descriptors on success.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            use std::os::fd::FromRawFd;
            // SAFETY: fresh descriptors owned by nothing else.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        };
        let log = dir.path().join("console.log");
        let mut output = VmmOutput::start(&socket, &log, Some(stderr_read)).expect("start");
        let (mut guest, _) = listener.accept().expect("accept");
        // 3 MiB through the console: more than the burst, so the rate limit shows.
        let started = Instant::now();
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..48 {
            guest.write_all(&chunk).expect("console write");
        }
        guest.write_all(b"\nthe end\n").expect("console write");
        let mut stderr = std::fs::File::from(stderr_write);
        for i in 0..10_000 {
            writeln!(stderr, "stderr line {i}").expect("stderr write");
        }
        drop(guest);
        drop(stderr);
        output.wait_closed(Duration::from_secs(60));
        assert!(
            started.elapsed() > Duration::from_secs(5),
            "3 MiB at 256 KiB/s after a 1 MiB burst takes about 8 s, not {:?}",
            started.elapsed()
        );
        let current = std::fs::metadata(&log).expect("log").len();
        let older = std::fs::metadata(rotated(&log)).expect("rotated").len();
        assert!(
            current <= CONSOLE_LOG_CAP && older <= CONSOLE_LOG_CAP,
            "{current} {older}"
        );
        assert_eq!(console_tail(&log, 1), "the end");
        assert_eq!(output.stderr_tail(1), "stderr line 9999");
        let kept = output.stderr_tail(usize::MAX);
        assert!(kept.len() <= STDERR_KEPT, "{}", kept.len());
    }
}
