//! Resource alarms: low disk space and high memory use block publishers.
//!
//! RabbitMQ's answer to a broker running out of a resource is to stop
//! reading from connections that publish (sending them `connection.blocked`)
//! while consumers keep draining queues, and to let them go again
//! (`connection.unblocked`) once the resource recovers. wasmq does the same
//! for two resources, each watched by its own monitor task:
//!
//! * **disk**: free space on the data folder's filesystem below
//!   `store.disk_free_limit_mib`;
//! * **memory**: the process's resident set above `memory.high_watermark`
//!   (a fraction of the machine's or the cgroup's memory) or
//!   `memory.high_watermark_mib`.
//!
//! Publishers stay blocked while *any* alarm is raised, so each resource
//! sets and clears only its own reason in [`Alarms`]; connections watch the
//! combined value.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

/// A resource that can raise an alarm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// Free disk space on the data folder.
    Disk,
    /// The broker's resident memory.
    Memory,
}

impl Resource {
    /// Its name in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Resource::Disk => "disk",
            Resource::Memory => "memory",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The raised alarms, one reason per resource.
#[derive(Debug)]
pub struct Alarms {
    reasons: Mutex<[Option<String>; 2]>,
    combined: watch::Sender<Option<String>>,
}

impl Default for Alarms {
    fn default() -> Self {
        Alarms {
            reasons: Mutex::new([None, None]),
            combined: watch::Sender::new(None),
        }
    }
}

impl Alarms {
    /// The combined alarm: `Some(reasons)` while any is raised.
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.combined.subscribe()
    }

    /// Whether `resource`'s alarm is raised.
    pub fn raised(&self, resource: Resource) -> bool {
        self.reasons.lock()[resource.index()].is_some()
    }

    /// Raise (`Some(reason)`) or clear (`None`) `resource`'s alarm.
    /// Transitions are logged; a raised alarm's reason is not updated (its
    /// figures change every check, and connections need not hear of it).
    pub fn set(&self, resource: Resource, reason: Option<String>) {
        let mut reasons = self.reasons.lock();
        let slot = &mut reasons[resource.index()];
        if slot.is_some() == reason.is_some() {
            return;
        }
        match &reason {
            Some(r) => tracing::warn!(
                resource = resource.as_str(),
                "resource alarm: {r}; publishing connections are blocked"
            ),
            None => tracing::info!(resource = resource.as_str(), "resource alarm cleared"),
        }
        *slot = reason;
        let all: Vec<&str> = reasons.iter().flatten().map(String::as_str).collect();
        let combined = (!all.is_empty()).then(|| all.join("; "));
        if combined.is_none() {
            tracing::info!("no resource alarm left; publishers unblocked");
        }
        self.combined.send_replace(combined);
    }
}

/// How often free disk space is checked.
pub const DISK_CHECK: Duration = Duration::from_secs(1);
/// How often memory use is checked (it can grow faster than disk fills).
pub const MEMORY_CHECK: Duration = Duration::from_millis(250);

/// Free bytes for unprivileged writers on the filesystem holding `dir`.
pub fn disk_free(dir: &std::path::Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// The process's resident set size, bytes (Linux `/proc/self/statm`).
pub fn memory_used() -> std::io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("unexpected /proc/self/statm"))?;
    Ok(pages * rustix::param::page_size() as u64)
}

/// The memory the broker may count on: the cgroup's limit when it has one
/// (a container), else the machine's.
pub fn memory_total() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match (cgroup, machine) {
        (Some(c), Some(m)) => Some(c.min(m)),
        (c, m) => c.or(m),
    }
}

/// Give memory freed by the allocator back to the system, so the resident
/// set reflects what is in use (an alarm would otherwise be slow to clear
/// after a backlog drains). mimalloc ([`crate::Allocator`]) returns free
/// pages by itself after a second; this does it now. glibc's malloc, which
/// a program linking this library without installing the allocator uses,
/// keeps freed small blocks until trimmed.
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers; it frees what mimalloc's own
    // heaps no longer use, and is a cheap no-op where mimalloc holds nothing.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishers_stay_blocked_while_any_resource_is_in_alarm() {
        let alarms = Alarms::default();
        let rx = alarms.subscribe();
        alarms.set(Resource::Disk, Some("disk low".into()));
        alarms.set(Resource::Memory, Some("memory high".into()));
        assert_eq!(rx.borrow().as_deref(), Some("disk low; memory high"));
        alarms.set(Resource::Disk, None);
        assert_eq!(rx.borrow().as_deref(), Some("memory high"));
        assert!(alarms.raised(Resource::Memory) && !alarms.raised(Resource::Disk));
        alarms.set(Resource::Memory, None);
        assert!(rx.borrow().is_none());
    }

    #[test]
    fn the_readings_are_plausible() {
        let used = memory_used().unwrap();
        let total = memory_total().unwrap();
        assert!(used > 1 << 20 && used < total, "{used} of {total}");
        assert!(disk_free(std::path::Path::new(".")).unwrap() > 0);
    }
}
