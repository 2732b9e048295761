//! What a server process costs, read from /proc: CPU ticks and resident
//! memory of the process and its children (nginx's master and workers).

use std::fs;

/// Clock ticks per second of /proc/PID/stat (USER_HZ; 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

/// The process and its direct children (nginx's workers).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let Ok(dir) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if stat_fields(child).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()))
            == Some(pid)
        {
            pids.push(child);
        }
    }
    pids
}

/// The fields of /proc/PID/stat after the command name, from `state` on
/// (index 0 = state, 1 = ppid, 11 = utime, 12 = stime).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.get(text.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// User + system ticks of the processes.
pub fn ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let f = stat_fields(*p)?;
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Resident memory of the processes, in KiB (VmRSS).
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let status = fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}
