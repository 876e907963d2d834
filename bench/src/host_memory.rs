//! Peak resident memory of this process (Linux `/proc/self/status` `VmHWM`), with a reset so a
//! measurement can leave out what came before it.

/// Resets the peak resident memory to the current resident memory (`/proc/self/clear_refs`,
/// value 5; Linux ≥ 4.0). Returns whether it worked.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak resident memory (`VmHWM`) in bytes, when the kernel reports it.
pub fn peak_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
