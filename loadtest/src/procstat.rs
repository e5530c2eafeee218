//! Cost of the process (or fleet of processes) under test, read from `/proc/PID`: CPU time (utime + stime from `stat`,
//! in clock ticks, assumed 100 per second — the Linux `USER_HZ` on every mainstream build; we
//! avoid libc to stay free of `unsafe`) and resident memory (`VmRSS`, `VmHWM` from `status`).

use std::time::Duration;

/// Linux `USER_HZ` (`getconf CLK_TCK`), fixed at 100 on x86-64 and arm64 kernels.
pub const CLOCK_TICKS_PER_S: u64 = 100;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcSample {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl ProcSample {
    pub fn cpu(&self) -> Duration {
        Duration::from_millis(self.cpu_ticks * 1000 / CLOCK_TICKS_PER_S)
    }
}

pub fn sample(pid: u32) -> Result<ProcSample, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let cpu_ticks =
        parse_cpu_ticks(&stat).ok_or_else(|| format!("/proc/{pid}/stat: unparsable"))?;
    Ok(ProcSample {
        cpu_ticks,
        rss_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
        hwm_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
    })
}

/// The sum over several processes (the instances of a fleet): CPU, RSS and VmHWM added up.
pub fn sample_all(pids: &[u32]) -> Result<ProcSample, String> {
    let mut sum = ProcSample::default();
    for pid in pids {
        let s = sample(*pid)?;
        sum.cpu_ticks += s.cpu_ticks;
        sum.rss_kib += s.rss_kib;
        sum.hwm_kib += s.hwm_kib;
    }
    Ok(sum)
}

/// Fields 14 (utime) and 15 (stime) of `/proc/PID/stat`; `comm` (field 2) may hold spaces and
/// parentheses, so count from the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After `)`: field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let stat = "1234 (tollgate (a) b) S 1 1234 1234 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0 100 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn reads_own_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0);
        assert!(s.hwm_kib >= s.rss_kib);
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(1024));
    }
}
