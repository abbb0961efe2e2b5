//! The CPU quota of this process's cgroup, for `--workers 0`: a container limited to 1.5 CPUs
//! (`docker --cpus 1.5`, a Kubernetes CPU limit) still sees every host CPU in its affinity
//! mask, and one worker per visible CPU would only make them share the quota.
//!
//! cgroup v2: `cpu.max` (`QUOTA PERIOD` or `max PERIOD`) of the process's cgroup and of every
//! ancestor up to the mount; v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` of the `cpu`
//! controller's hierarchy. The tightest limit applies, rounded up to whole CPUs. Read once at
//! start by the CLI; no fds kept.

use std::fs;
use std::path::{Path, PathBuf};

/// A CPU limit found in a cgroup.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuQuota {
    /// Whole CPUs the quota allows (quota / period, rounded up, at least 1).
    pub cpus: usize,
    /// Where it was read, for the log: `cgroup v2 cpu.max 150000 100000 in /sys/fs/cgroup/x`.
    pub source: String,
}

/// This process's CPU quota, if any (`/proc/self/cgroup` and `/sys/fs/cgroup`).
pub fn cpu_quota() -> Option<CpuQuota> {
    let membership = fs::read_to_string("/proc/self/cgroup").ok()?;
    cpu_quota_in(&membership, Path::new("/sys/fs/cgroup"))
}

/// The CPU quota for the cgroup membership `membership` (the text of `/proc/PID/cgroup`) with
/// cgroup file systems mounted under `root`.
pub fn cpu_quota_in(membership: &str, root: &Path) -> Option<CpuQuota> {
    let mut best: Option<CpuQuota> = None;
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let found = if controllers.is_empty() {
            // v2: the unified hierarchy is mounted at root itself.
            walk(root, rel, read_v2)
        } else if controllers.split(',').any(|c| c == "cpu") {
            // v1: mounted at root/<controllers> (e.g. cpu,cpuacct), often also at root/cpu.
            [root.join(controllers), root.join("cpu")]
                .into_iter()
                .find_map(|mount| walk(&mount, rel, read_v1))
        } else {
            None
        };
        if let Some(q) = found
            && best.as_ref().is_none_or(|b| q.cpus < b.cpus)
        {
            best = Some(q);
        }
    }
    best
}

/// The tightest limit `read` finds in `mount/rel` and each directory above it up to `mount`.
/// Inside a container the membership names a host path the container's mount does not have:
/// then only the mount itself (the container's own cgroup) is read.
fn walk(mount: &Path, rel: &str, read: impl Fn(&Path) -> Option<CpuQuota>) -> Option<CpuQuota> {
    if !mount.is_dir() {
        return None;
    }
    let mut dir: PathBuf = mount.join(rel);
    if !dir.is_dir() {
        dir = mount.to_path_buf();
    }
    let mut best: Option<CpuQuota> = None;
    loop {
        if let Some(q) = read(&dir)
            && best.as_ref().is_none_or(|b| q.cpus < b.cpus)
        {
            best = Some(q);
        }
        if dir == mount || !dir.pop() || !dir.starts_with(mount) {
            return best;
        }
    }
}

fn read_v2(dir: &Path) -> Option<CpuQuota> {
    let file = dir.join("cpu.max");
    let text = fs::read_to_string(&file).ok()?;
    let mut fields = text.split_whitespace();
    let quota: u64 = fields.next()?.parse().ok()?; // "max" = no limit: None
    let period: u64 = fields
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(100_000);
    Some(CpuQuota {
        cpus: whole_cpus(quota, period)?,
        source: format!("cgroup v2 cpu.max {quota} {period} in {}", dir.display()),
    })
}

fn read_v1(dir: &Path) -> Option<CpuQuota> {
    let read = |name: &str| -> Option<i64> {
        fs::read_to_string(dir.join(name)).ok()?.trim().parse().ok()
    };
    let quota = read("cpu.cfs_quota_us")?; // -1 = no limit
    let period = read("cpu.cfs_period_us")?;
    let (quota, period) = (u64::try_from(quota).ok()?, u64::try_from(period).ok()?);
    Some(CpuQuota {
        cpus: whole_cpus(quota, period)?,
        source: format!(
            "cgroup v1 cpu.cfs_quota_us {quota} / cpu.cfs_period_us {period} in {}",
            dir.display()
        ),
    })
}

/// quota / period rounded up, at least 1; `None` for a zero period or quota.
fn whole_cpus(quota: u64, period: u64) -> Option<usize> {
    if quota == 0 || period == 0 {
        return None;
    }
    usize::try_from(quota.div_ceil(period))
        .ok()
        .map(|n| n.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture(PathBuf);

    impl Fixture {
        fn new(name: &str) -> Fixture {
            let dir =
                std::env::temp_dir().join(format!("rcluster-cgroup-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Fixture(dir)
        }

        fn write(&self, rel: &str, text: &str) {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn v2_cpu_max_rounds_up_and_the_tightest_ancestor_wins() {
        let f = Fixture::new("v2");
        f.write("kubepods/pod1/cpu.max", "150000 100000\n");
        f.write("kubepods/pod1/app/cpu.max", "max 100000\n");
        let q = cpu_quota_in("0::/kubepods/pod1/app\n", &f.0).unwrap();
        assert_eq!(q.cpus, 2);
        assert!(
            q.source.contains("cgroup v2 cpu.max 150000 100000"),
            "{}",
            q.source
        );
        f.write("kubepods/cpu.max", "50000 100000\n");
        assert_eq!(
            cpu_quota_in("0::/kubepods/pod1/app\n", &f.0).unwrap().cpus,
            1
        );
    }

    #[test]
    fn v2_unlimited_or_missing_is_no_quota() {
        let f = Fixture::new("v2max");
        f.write("a/cpu.max", "max 100000\n");
        assert_eq!(cpu_quota_in("0::/a\n", &f.0), None);
        assert_eq!(cpu_quota_in("0::/nowhere\n", &f.0), None);
        assert_eq!(cpu_quota_in("", &f.0), None);
    }

    #[test]
    fn v2_in_a_container_reads_its_own_mount() {
        // The membership names a host path; the container sees its cgroup at the mount.
        let f = Fixture::new("v2ns");
        f.write("cpu.max", "100000 100000\n");
        assert_eq!(
            cpu_quota_in("0::/system.slice/docker-abc.scope\n", &f.0)
                .unwrap()
                .cpus,
            1
        );
    }

    #[test]
    fn v1_cfs_quota() {
        let f = Fixture::new("v1");
        f.write("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "250000\n");
        f.write("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n");
        let membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n";
        let q = cpu_quota_in(membership, &f.0).unwrap();
        assert_eq!(q.cpus, 3);
        assert!(q.source.contains("cgroup v1"), "{}", q.source);
        f.write("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n");
        assert_eq!(cpu_quota_in(membership, &f.0), None);
    }
}
