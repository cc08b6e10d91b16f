//! The host's TSC frequency, which a guest under TCG must be told.
//!
//! Under TCG a guest's TSC counts at the host's rate (QEMU reads the host's TSC). A guest
//! kernel that cannot calibrate it (no HPET or ACPI timer on a microvm, a PIT calibration
//! that can take very long under emulation) and is told a wrong rate finds its clock skewed
//! against the tick, marks the TSC unstable and falls back to `refined-jiffies`: a clock of
//! the tick's resolution (4 ms) and a periodic tick of 250 interrupts a second, even when
//! idle. Told the host's rate and that the TSC is reliable, it keeps the TSC as clocksource,
//! with fine-grained time and a tickless idle.

use std::sync::OnceLock;
use std::time::Duration;

/// The host's TSC frequency in kHz, rounded to whole MHz (so that it is the same number in
/// every run on one host: it is part of a template's bake key), measured once per process
/// against `CLOCK_MONOTONIC_RAW`. `None` where the TSC is not invariant (its rate could
/// change under the guest), where the host's own kernel does not use it as its clock, or
/// off x86_64.
pub fn host_tsc_khz() -> Option<u32> {
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        // The flags can claim an invariant TSC that the host's kernel found unstable (it
        // then keeps another clocksource): trust the TSC only where the host does.
        let host_clock = std::fs::read_to_string(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        )
        .ok()?;
        (invariant_tsc(&cpuinfo) && host_clock.trim() == "tsc")
            .then(measure_khz)
            .flatten()
    })
}

/// Whether `/proc/cpuinfo`'s first processor has a TSC of constant rate that keeps
/// counting in deep idle.
fn invariant_tsc(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags"))
        .and_then(|rest| rest.trim_start().strip_prefix(':'))
        .is_some_and(|flags| {
            let flags = flags.split_whitespace();
            let has = |name: &str| flags.clone().any(|f| f == name);
            has("tsc") && has("constant_tsc") && has("nonstop_tsc")
        })
}

#[cfg(target_arch = "x86_64")]
fn measure_khz() -> Option<u32> {
    fn raw_ns() -> u128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to write.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) };
        ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
    }
    // The TSC read between two clock reads; of a few tries, the one bracketed tightest.
    fn sample() -> (u128, u64) {
        (0..8)
            .map(|_| {
                let before = raw_ns();
                #[allow(unused_unsafe)]
                // SAFETY: RDTSC has no preconditions on x86_64.
                let tsc = unsafe { std::arch::x86_64::_rdtsc() };
                let after = raw_ns();
                (after - before, before + (after - before) / 2, tsc)
            })
            .min_by_key(|(gap, _, _)| *gap)
            .map(|(_, ns, tsc)| (ns, tsc))
            .expect("a non-empty range has a minimum")
    }
    let (ns0, tsc0) = sample();
    std::thread::sleep(Duration::from_millis(50));
    let (ns1, tsc1) = sample();
    khz_from(ns1.checked_sub(ns0)?, tsc1.checked_sub(tsc0)?)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_khz() -> Option<u32> {
    None
}

/// The frequency of `ticks` in `ns`, rounded to whole MHz, if it is a plausible one.
fn khz_from(ns: u128, ticks: u64) -> Option<u32> {
    if ns == 0 {
        return None;
    }
    let mhz = (ticks as f64 * 1000.0 / ns as f64).round();
    (100.0..=20_000.0).contains(&mhz).then(|| mhz as u32 * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frequency_is_rounded_to_whole_mhz() {
        // 50 ms at 2.6 GHz, a little off either way.
        assert_eq!(khz_from(50_000_000, 130_000_000), Some(2_600_000));
        assert_eq!(khz_from(50_000_000, 130_010_000), Some(2_600_000));
        assert_eq!(khz_from(50_000_000, 129_990_000), Some(2_600_000));
        assert_eq!(khz_from(50_000_000, 129_693_000), Some(2_594_000));
        assert_eq!(khz_from(0, 1), None);
        assert_eq!(khz_from(50_000_000, 1_000), None);
    }

    #[test]
    fn only_an_invariant_tsc_counts() {
        let both = "processor\t: 0\nflags\t\t: fpu tsc msr constant_tsc nonstop_tsc\n";
        assert!(invariant_tsc(both));
        assert!(!invariant_tsc("flags\t\t: fpu tsc constant_tsc\n"));
        assert!(!invariant_tsc("processor\t: 0\n"));
    }

    #[test]
    fn this_host_measures_about_the_same_twice() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
        if cfg!(target_arch = "x86_64") && invariant_tsc(&cpuinfo) {
            let first = measure_khz().expect("a frequency");
            let second = measure_khz().expect("a frequency");
            assert!(
                first.abs_diff(second) <= 1000,
                "{first} kHz, then {second} kHz"
            );
            let host_clock = std::fs::read_to_string(
                "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            )
            .unwrap_or_default();
            assert_eq!(host_tsc_khz().is_some(), host_clock.trim() == "tsc");
        }
    }
}
