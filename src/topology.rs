//! The host's CPU topology (CPUs, SMT siblings, cores, packages, NUMA nodes, NICs and the CPUs
//! serving their interrupts, read from sysfs and procfs) and the `--pin auto` plan built on it.
//!
//! Pure logic over files: nothing here owns an fd past the read of one file, and no thread of
//! its own runs it. The master calls [`Topology::detect`] once at start-up on the main thread
//! (before any worker is spawned) and hands the resulting [`PinPlan`] to the supervisor; the
//! `rcluster-lb topology` subcommand prints [`Topology::report`].
//!
//! Everything is read relative to two roots ([`Topology::from_sysfs`]) so tests point them at
//! the fixture trees under `tests/fixtures/topology/`. A missing file never fails detection: it
//! only makes the picture coarser (no topology dir → each CPU is its own core in package 0; no
//! node dir → one node 0; no `/proc/interrupts` → interrupt CPUs "not visible").

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Largest CPU id a cpulist may name, plus one: Linux's `NR_CPUS` ceiling (`CONFIG_MAXSMP`
/// on x86-64). It keeps a typo like `0-4000000000` from allocating a huge list.
pub const MAX_CPUS: usize = 8192;

/// Why a cpulist ("0-3,8,10-11", cpuset(7) "List format") did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cpu list entry {token:?}: {reason}")]
pub struct CpuListError {
    /// The offending comma-separated entry, trimmed.
    pub token: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses a kernel cpulist (cpuset(7) "List format": comma-separated CPU ids and inclusive
/// `a-b` ranges, as in `/sys/devices/system/cpu/online` or `--pin 0-3,8`).
///
/// Returns the CPUs ascending and deduplicated. An empty or all-whitespace string is the empty
/// list (that is how sysfs writes an empty `offline` file); a trailing newline is ignored;
/// whitespace around entries is allowed. The stride form `a-b:s/g` (boot parameters only, never
/// printed by sysfs) is not accepted.
///
/// ```
/// use rcluster_lb::topology::parse_cpu_list;
/// assert_eq!(parse_cpu_list("0-3,8").unwrap(), vec![0, 1, 2, 3, 8]);
/// assert!(parse_cpu_list("0-3,x").unwrap_err().to_string().contains("\"x\""));
/// ```
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, CpuListError> {
    let list = list.trim();
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let mut cpus = BTreeSet::new();
    for token in list.split(',') {
        let token = token.trim();
        let error = |reason| CpuListError {
            token: token.to_owned(),
            reason,
        };
        if token.is_empty() {
            return Err(error("empty entry"));
        }
        let (first, last) = match token.split_once('-') {
            Some((a, b)) => (
                parse_cpu_id(a.trim()).map_err(error)?,
                parse_cpu_id(b.trim()).map_err(error)?,
            ),
            None => {
                let cpu = parse_cpu_id(token).map_err(error)?;
                (cpu, cpu)
            }
        };
        if first > last {
            return Err(error("range runs backwards"));
        }
        cpus.extend(first..=last);
    }
    Ok(cpus.into_iter().collect())
}

fn parse_cpu_id(text: &str) -> Result<usize, &'static str> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a cpu number or a-b range");
    }
    match text.parse::<usize>() {
        Ok(cpu) if cpu < MAX_CPUS => Ok(cpu),
        _ => Err("cpu number too large"),
    }
}

/// Formats CPUs as a kernel cpulist: ascending, deduplicated, runs of two or more consecutive
/// ids as `a-b` (`[0, 1, 2, 3, 8]` → `"0-3,8"`). The empty list is the empty string.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let sorted: BTreeSet<usize> = cpus.iter().copied().collect();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for cpu in sorted {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == cpu => *last = cpu,
            _ => runs.push((cpu, cpu)),
        }
    }
    runs.iter()
        .map(|&(first, last)| {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One logical CPU (a hardware thread) as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    /// Kernel CPU number.
    pub id: usize,
    /// Listed in `devices/system/cpu/online`.
    pub online: bool,
    /// In the affinity set the topology was detected with (`sched_getaffinity(2)`).
    pub allowed: bool,
    /// The physical core, named by the lowest CPU id among its SMT siblings. A CPU without
    /// topology files (offline, or a bare sysfs) is its own core.
    pub core: usize,
    /// `physical_package_id` (socket); 0 when unknown.
    pub package: usize,
    /// NUMA node whose `cpulist` holds this CPU; 0 when unknown.
    pub node: usize,
    /// Interrupts from NIC lines of `/proc/interrupts` this CPU has served since boot.
    pub nic_interrupts: u64,
}

impl Cpu {
    /// Online and allowed: the only CPUs a plan may use.
    pub fn is_usable(&self) -> bool {
        self.online && self.allowed
    }
}

/// A NUMA node and its CPUs (`devices/system/node/nodeN/cpulist`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// Node number.
    pub id: usize,
    /// CPUs on the node, ascending.
    pub cpus: Vec<usize>,
}

/// A network interface backed by a device (`class/net/<name>/device` exists; `lo`, bridges,
/// bonds and other virtual interfaces have none and are left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Interface name (`eth0`).
    pub name: String,
    /// The device's `numa_node`; `None` when absent or `-1` (no affinity, or a single node).
    pub node: Option<usize>,
    /// The device's `local_cpulist`; `None` when absent.
    pub local_cpus: Option<Vec<usize>>,
    /// Kernel name of the device the interface sits on (`virtio2`, `0000:3b:00.0`), when
    /// `device` is a symlink: queue interrupts are often named after it rather than the
    /// interface (`virtio2-input.0`, `mlx5_comp0@pci:0000:3b:00.0`).
    pub device: Option<String>,
}

/// Where each worker process and the acceptor thread are pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinPlan {
    /// `workers[i]` is the CPU of worker `i`. Empty when no CPU is both online and allowed.
    pub workers: Vec<usize>,
    /// The acceptor thread's CPU; `None` leaves it unpinned.
    pub acceptor: Option<usize>,
}

/// The host's CPUs, cores, packages, NUMA nodes and NICs, as far as sysfs and procfs show them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Every CPU sysfs knows of (possible ∪ online ∪ offline), ascending by id.
    cpus: Vec<Cpu>,
    /// NUMA nodes ascending; a single node 0 holding every online CPU when sysfs has none.
    nodes: Vec<NumaNode>,
    /// NICs ascending by name.
    nics: Vec<Nic>,
    /// `/proc/interrupts` could be read, so `Cpu::nic_interrupts` means something.
    interrupts_visible: bool,
}

/// Why the acceptor got its CPU, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptorPlacement {
    /// No usable CPU at all; the acceptor stays unpinned.
    Unpinned,
    /// A core no worker uses.
    IdleCore,
    /// An SMT thread no worker uses, on a core a worker uses.
    IdleSibling,
    /// Every usable CPU runs a worker: shares the least loaded one.
    SharedWithWorkers(usize),
}

/// A physical core seen by the planner: only its usable threads.
#[derive(Debug)]
struct CoreSlot {
    /// Usable threads, ascending.
    threads: Vec<usize>,
    node: usize,
    nic_interrupts: u64,
}

impl Topology {
    /// Detects the running host from `/sys` and `/proc`. `allowed` is normally
    /// `sys::sched_getaffinity()?.cpus()`, so taskset and cgroup cpusets are respected.
    pub fn detect(allowed: &[usize]) -> io::Result<Topology> {
        Topology::from_sysfs(Path::new("/sys"), Path::new("/proc"), allowed)
    }

    /// Reads the topology from a sysfs tree at `sys_root` and a procfs tree at `proc_root`.
    ///
    /// Missing files degrade the picture (see the module docs); a file that exists but cannot
    /// be read or parsed is an error naming it, except `/proc/interrupts`, whose per-arch
    /// layout varies and which only informs the plan: lines that do not parse are skipped and
    /// an unreadable file makes interrupts "not visible".
    ///
    /// An allowed CPU that sysfs does not list at all (a partial or virtualised `/sys` in a
    /// container) is taken as online, on its own core: `sched_getaffinity(2)` only reports
    /// active CPUs, so the kernel has vouched for it. This keeps the plan non-empty whenever
    /// `allowed` is. A CPU sysfs lists as not online stays unused even if allowed.
    pub fn from_sysfs(
        sys_root: &Path,
        proc_root: &Path,
        allowed: &[usize],
    ) -> io::Result<Topology> {
        let cpu_dir = sys_root.join("devices/system/cpu");
        let read_list = |name: &str| read_cpu_list(&cpu_dir.join(name));
        let offline: BTreeSet<usize> = read_list("offline")?
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut online: BTreeSet<usize> = match read_list("online")? {
            Some(cpus) => cpus.into_iter().collect(),
            None => {
                // No `online` file: trust the cpuN directories.
                let dirs = numbered_entries(&cpu_dir, "cpu")?;
                dirs.into_keys().filter(|c| !offline.contains(c)).collect()
            }
        };
        let possible = read_list("possible")?.unwrap_or_default();
        let mut all: BTreeSet<usize> = online
            .iter()
            .chain(&offline)
            .chain(&possible)
            .copied()
            .collect();
        for &cpu in allowed {
            if all.insert(cpu) {
                online.insert(cpu);
            }
        }
        if all.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no cpus listed under {}", cpu_dir.display()),
            ));
        }
        let allowed: BTreeSet<usize> = allowed.iter().copied().collect();

        let nodes = read_nodes(sys_root, &online)?;
        let node_of: BTreeMap<usize, usize> = nodes
            .iter()
            .flat_map(|n| n.cpus.iter().map(move |&c| (c, n.id)))
            .collect();

        let mut cpus = Vec::with_capacity(all.len());
        let mut first_of_core: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        for &id in &all {
            let is_online = online.contains(&id);
            let mut cpu = Cpu {
                id,
                online: is_online,
                allowed: allowed.contains(&id),
                core: id,
                package: 0,
                node: node_of.get(&id).copied().unwrap_or(0),
                nic_interrupts: 0,
            };
            if is_online {
                let dir = cpu_dir.join(format!("cpu{id}/topology"));
                if let Some(package) = read_number(&dir.join("physical_package_id"))? {
                    cpu.package = package;
                }
                let siblings = match read_cpu_list(&dir.join("core_cpus_list"))? {
                    Some(list) => Some(list),
                    None => read_cpu_list(&dir.join("thread_siblings_list"))?,
                };
                if let Some(siblings) = siblings {
                    cpu.core = siblings.iter().copied().chain([id]).min().unwrap_or(id);
                } else if let Some(core_id) = read_number(&dir.join("core_id"))? {
                    // No sibling list: threads sharing (package, core_id) share a core.
                    // CPUs come in ascending order, so the first one seen names the core.
                    cpu.core = *first_of_core.entry((cpu.package, core_id)).or_insert(id);
                }
            }
            cpus.push(cpu);
        }

        let nics = read_nics(sys_root)?;
        let interrupts = read_nic_interrupts(&proc_root.join("interrupts"), &nics);
        if let Some(per_cpu) = &interrupts {
            for cpu in &mut cpus {
                cpu.nic_interrupts = per_cpu.get(&cpu.id).copied().unwrap_or(0);
            }
        }
        Ok(Topology {
            cpus,
            nodes,
            nics,
            interrupts_visible: interrupts.is_some(),
        })
    }

    /// Every CPU sysfs knows of, online or not, ascending by id.
    pub fn cpus(&self) -> &[Cpu] {
        &self.cpus
    }

    /// NUMA nodes ascending by id (at least node 0).
    pub fn nodes(&self) -> &[NumaNode] {
        &self.nodes
    }

    /// NICs with a backing device, ascending by name.
    pub fn nics(&self) -> &[Nic] {
        &self.nics
    }

    /// Whether `/proc/interrupts` was readable, i.e. whether [`Cpu::nic_interrupts`] is real.
    pub fn interrupts_visible(&self) -> bool {
        self.interrupts_visible
    }

    /// CPUs that are online and allowed, ascending: the only ones a plan uses.
    pub fn usable_cpus(&self) -> Vec<usize> {
        self.cpus
            .iter()
            .filter(|c| c.is_usable())
            .map(|c| c.id)
            .collect()
    }

    /// The NUMA node the NICs sit on, when sysfs says: the node most NICs report (ties to the
    /// lowest), where a NIC without `numa_node` counts for the node holding its
    /// `local_cpulist` if that list is narrower than all online CPUs.
    pub fn nic_node(&self) -> Option<usize> {
        let online: Vec<usize> = self
            .cpus
            .iter()
            .filter(|c| c.online)
            .map(|c| c.id)
            .collect();
        let mut votes: BTreeMap<usize, usize> = BTreeMap::new();
        for nic in &self.nics {
            let node = nic.node.or_else(|| {
                let local = nic.local_cpus.as_ref()?;
                let narrower = online.iter().any(|c| !local.contains(c));
                let first = local.iter().find(|c| online.contains(c))?;
                narrower.then(|| self.cpu(*first).map(|c| c.node)).flatten()
            });
            if let Some(node) = node {
                *votes.entry(node).or_default() += 1;
            }
        }
        let most = votes.values().copied().max()?;
        votes
            .into_iter()
            .find(|&(_, n)| n == most)
            .map(|(node, _)| node)
    }

    fn cpu(&self, id: usize) -> Option<&Cpu> {
        self.cpus.iter().find(|c| c.id == id)
    }

    /// The `--pin auto` plan for `workers` worker processes. Deterministic for a given
    /// topology.
    ///
    /// Workers, in order:
    /// 1. One worker per physical core before any core gets a second: SMT siblings share
    ///    execution units and L1/L2, so two busy workers on one core each run markedly slower
    ///    than on two cores.
    /// 2. Cores on the NIC's NUMA node ([`Topology::nic_node`]) first, then the other nodes in
    ///    ascending order: the NIC DMAs packets into memory on its node, and a worker there
    ///    reads socket buffers without crossing the interconnect. Within a node, cores not
    ///    serving NIC interrupts come first (softirq work would steal their cycles), then by
    ///    core id.
    /// 3. Once every core has a worker, the second thread of each core in the same core order,
    ///    then the third…; past the last usable CPU, wrap around to the first again.
    ///
    /// The acceptor thread (accepts every connection and hands it on, so it wants to be near
    /// the NIC and never wait behind a worker):
    /// 1. If there are more usable cores than workers, one whole core is kept for it, taken
    ///    out before the workers are placed: the core serving the most NIC interrupts (the
    ///    SYN/accept path runs in softirq there, so the accept queue is cache-hot), else the
    ///    last core of the NIC's node, else the last core in the order above (the one workers
    ///    would have taken last). Its thread serving the most NIC interrupts, else its lowest.
    /// 2. Otherwise, if some usable CPU has no worker (an SMT sibling), that CPU, chosen by the
    ///    same preferences: sharing a core's execution units costs a worker less than
    ///    time-sharing its CPU, where the acceptor would queue behind it in the run queue.
    /// 3. Otherwise it shares the CPU with the fewest workers, the latest one in placement
    ///    order on ties: with `workers` a multiple of the CPUs that is the last worker's CPU,
    ///    the one a wrap-around reaches last, so it adds the least load.
    ///
    /// With no usable CPU the plan is empty and the acceptor unpinned.
    pub fn plan(&self, workers: usize) -> PinPlan {
        self.place(workers).0
    }

    fn place(&self, workers: usize) -> (PinPlan, AcceptorPlacement) {
        let nic_node = self.nic_node();
        let mut cores = self.ordered_cores(nic_node);
        if cores.is_empty() {
            let plan = PinPlan {
                workers: Vec::new(),
                acceptor: None,
            };
            return (plan, AcceptorPlacement::Unpinned);
        }
        let interrupts_of = |cpu: usize| self.cpu(cpu).map_or(0, |c| c.nic_interrupts);

        if cores.len() > workers {
            let kept = best_position(&cores, |core| {
                (core.nic_interrupts, Some(core.node) == nic_node)
            });
            let core = cores.remove(kept);
            let acceptor = core
                .threads
                .iter()
                .copied()
                .max_by_key(|&t| (interrupts_of(t), std::cmp::Reverse(t)))
                .unwrap_or(core.threads[0]);
            let plan = PinPlan {
                workers: cores.iter().take(workers).map(|c| c.threads[0]).collect(),
                acceptor: Some(acceptor),
            };
            return (plan, AcceptorPlacement::IdleCore);
        }

        let depth = cores.iter().map(|c| c.threads.len()).max().unwrap_or(0);
        let slots: Vec<usize> = (0..depth)
            .flat_map(|round| {
                cores
                    .iter()
                    .filter_map(move |c| c.threads.get(round).copied())
            })
            .collect();
        let placed: Vec<usize> = (0..workers).map(|i| slots[i % slots.len()]).collect();

        if workers < slots.len() {
            let idle = &slots[workers..];
            let pick = best_position(idle, |&cpu| {
                let node = self.cpu(cpu).map(|c| c.node);
                (interrupts_of(cpu), node.is_some() && node == nic_node)
            });
            let plan = PinPlan {
                workers: placed,
                acceptor: Some(idle[pick]),
            };
            return (plan, AcceptorPlacement::IdleSibling);
        }

        let count = |cpu: usize| placed.iter().filter(|&&c| c == cpu).count();
        let fewest = slots.iter().map(|&c| count(c)).min().unwrap_or(0);
        let acceptor = slots.iter().rev().copied().find(|&c| count(c) == fewest);
        let plan = PinPlan {
            workers: placed,
            acceptor,
        };
        (plan, AcceptorPlacement::SharedWithWorkers(fewest))
    }

    /// Usable cores in worker placement order (see [`Topology::plan`]).
    fn ordered_cores(&self, nic_node: Option<usize>) -> Vec<CoreSlot> {
        let mut by_core: BTreeMap<usize, CoreSlot> = BTreeMap::new();
        for cpu in self.cpus.iter().filter(|c| c.is_usable()) {
            let slot = by_core.entry(cpu.core).or_insert(CoreSlot {
                threads: Vec::new(),
                node: cpu.node,
                nic_interrupts: 0,
            });
            slot.threads.push(cpu.id);
            slot.nic_interrupts += cpu.nic_interrupts;
        }
        let mut cores: Vec<(usize, CoreSlot)> = by_core.into_iter().collect();
        cores.sort_by_key(|(core, slot)| {
            (
                nic_node.is_some_and(|n| n != slot.node),
                slot.node,
                slot.nic_interrupts > 0,
                *core,
            )
        });
        cores.into_iter().map(|(_, slot)| slot).collect()
    }

    /// Human-readable description for `rcluster-lb topology`: CPUs, SMT groups, cores,
    /// packages, NUMA nodes, NICs, the CPUs serving NIC interrupts, and the plan for `workers`
    /// workers. One fact per line, `label: value`, indented detail lines under a label.
    pub fn report(&self, workers: usize) -> String {
        let online: Vec<&Cpu> = self.cpus.iter().filter(|c| c.online).collect();
        let mut lines = Vec::new();

        lines.push(format!("online cpus: {}", listed(online.iter().copied())));
        lines.push(format!(
            "offline cpus: {}",
            listed(self.cpus.iter().filter(|c| !c.online))
        ));
        lines.push(format!(
            "allowed cpus: {}",
            listed(online.iter().copied().filter(|c| c.allowed))
        ));
        lines.push(format!(
            "not allowed cpus: {}",
            listed(online.iter().copied().filter(|c| !c.allowed))
        ));

        let mut cores: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        let mut packages: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        for cpu in &online {
            cores.entry(cpu.core).or_default().push(cpu.id);
            packages.entry(cpu.package).or_default().insert(cpu.core);
        }
        let groups: Vec<String> = cores
            .values()
            .filter(|threads| threads.len() > 1)
            .map(|threads| format_cpu_list(threads))
            .collect();
        lines.push(format!(
            "smt sibling groups: {}",
            if groups.is_empty() {
                "none (one thread per core)".to_owned()
            } else {
                groups.join(" ")
            }
        ));
        lines.push(format!("cores: {}", cores.len()));
        lines.push(format!("packages: {}", packages.len()));
        for (package, package_cores) in &packages {
            let cpus = listed(online.iter().copied().filter(|c| c.package == *package));
            lines.push(format!(
                "  package {package}: {} cores, cpus {cpus}",
                package_cores.len()
            ));
        }
        lines.push(format!("numa nodes: {}", self.nodes.len()));
        for node in &self.nodes {
            lines.push(format!(
                "  node {}: cpus {}",
                node.id,
                or_none(format_cpu_list(&node.cpus))
            ));
        }

        if self.nics.is_empty() {
            lines.push("nics: none with a device".to_owned());
        } else {
            lines.push(format!("nics: {}", self.nics.len()));
        }
        for nic in &self.nics {
            let node = nic.node.map_or("unknown".to_owned(), |n| n.to_string());
            let local = nic
                .local_cpus
                .as_ref()
                .map_or("unknown".to_owned(), |l| or_none(format_cpu_list(l)));
            lines.push(format!(
                "  {}: numa node {node}, local cpus {local}",
                nic.name
            ));
        }
        let serving: Vec<&Cpu> = self.cpus.iter().filter(|c| c.nic_interrupts > 0).collect();
        if !self.interrupts_visible {
            lines.push("nic interrupt cpus: not visible".to_owned());
        } else if serving.is_empty() {
            lines.push("nic interrupt cpus: none found".to_owned());
        } else {
            lines.push(format!(
                "nic interrupt cpus: {}",
                listed(serving.iter().copied())
            ));
            for cpu in &serving {
                lines.push(format!(
                    "  cpu {}: {} interrupts",
                    cpu.id, cpu.nic_interrupts
                ));
            }
        }

        let nic_node = self.nic_node();
        let (plan, placement) = self.place(workers);
        lines.push(format!(
            "plan for {workers} workers (nic node {}):",
            nic_node.map_or("unknown".to_owned(), |n| n.to_string())
        ));
        for (i, &cpu) in plan.workers.iter().enumerate() {
            lines.push(format!("  worker {i}: {}", self.describe(cpu)));
        }
        let acceptor = match (plan.acceptor, placement) {
            (Some(cpu), AcceptorPlacement::IdleCore) => {
                format!("{}; idle core", self.describe(cpu))
            }
            (Some(cpu), AcceptorPlacement::IdleSibling) => {
                format!(
                    "{}; idle smt sibling, no idle core left",
                    self.describe(cpu)
                )
            }
            (Some(cpu), AcceptorPlacement::SharedWithWorkers(n)) => {
                format!(
                    "{}; shared with {n} worker(s), no idle cpu left",
                    self.describe(cpu)
                )
            }
            _ => "unpinned; no cpu is both online and allowed".to_owned(),
        };
        lines.push(format!("  acceptor: {acceptor}"));
        lines.push(String::new());
        lines.join("\n")
    }

    /// `cpu 5 (core 5, node 1, nic irqs)` for the plan lines of the report.
    fn describe(&self, id: usize) -> String {
        match self.cpu(id) {
            Some(cpu) => {
                let irqs = if cpu.nic_interrupts > 0 {
                    ", nic irqs"
                } else {
                    ""
                };
                format!("cpu {id} (core {}, node {}{irqs})", cpu.core, cpu.node)
            }
            None => format!("cpu {id}"),
        }
    }
}

/// A cpulist of `cpus`, or `none`.
fn listed<'a>(cpus: impl Iterator<Item = &'a Cpu>) -> String {
    or_none(format_cpu_list(&cpus.map(|c| c.id).collect::<Vec<_>>()))
}

fn or_none(list: String) -> String {
    if list.is_empty() {
        "none".to_owned()
    } else {
        list
    }
}

/// Index of the item with the greatest key, the last one on ties (so callers that list their
/// preferred items first give away the least preferred).
fn best_position<T, K: Ord>(items: &[T], key: impl Fn(&T) -> K) -> usize {
    let mut best = 0;
    for (i, item) in items.iter().enumerate().skip(1) {
        if key(item) >= key(&items[best]) {
            best = i;
        }
    }
    best
}

/// Reads a file that may legitimately be absent: `Ok(None)` on `ENOENT`.
fn read_optional(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("failed to read {}: {e}", path.display()),
        )),
    }
}

fn read_cpu_list(path: &Path) -> io::Result<Option<Vec<usize>>> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    parse_cpu_list(&text).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// A file holding one integer; negative values (`numa_node` = -1: no affinity) are `None`.
fn read_number(path: &Path) -> io::Result<Option<usize>> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let text = text.trim();
    match text.parse::<i64>() {
        Ok(n) => Ok(usize::try_from(n).ok()),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: expected a number, found {text:?}", path.display()),
        )),
    }
}

/// Entries of `dir` named `<prefix><number>` (`cpu3`, `node1`) by number; empty when `dir` is
/// absent.
fn numbered_entries(dir: &Path, prefix: &str) -> io::Result<BTreeMap<usize, PathBuf>> {
    let mut found = BTreeMap::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("failed to list {}: {e}", dir.display()),
            ));
        }
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let number = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(number) = number {
            found.insert(number, entry.path());
        }
    }
    Ok(found)
}

/// NUMA nodes from `devices/system/node/nodeN/cpulist`; one node 0 with every online CPU when
/// the kernel has no NUMA support or the tree lacks it.
fn read_nodes(sys_root: &Path, online: &BTreeSet<usize>) -> io::Result<Vec<NumaNode>> {
    let mut nodes = Vec::new();
    for (id, dir) in numbered_entries(&sys_root.join("devices/system/node"), "node")? {
        let cpus = read_cpu_list(&dir.join("cpulist"))?.unwrap_or_default();
        nodes.push(NumaNode { id, cpus });
    }
    if nodes.is_empty() {
        nodes.push(NumaNode {
            id: 0,
            cpus: online.iter().copied().collect(),
        });
    }
    Ok(nodes)
}

/// Interfaces under `class/net` that have a `device`. For a device that is not itself the bus
/// device (virtio-net's `virtio2` hangs under its PCI function), `numa_node` and
/// `local_cpulist` are taken from its parent when it lacks them.
fn read_nics(sys_root: &Path) -> io::Result<Vec<Nic>> {
    let class = sys_root.join("class/net");
    let entries = match fs::read_dir(&class) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("failed to list {}: {e}", class.display()),
            ));
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name != "lo")
        .collect();
    names.sort();

    let mut nics = Vec::new();
    for name in names {
        let device = class.join(&name).join("device");
        if !device.exists() {
            continue;
        }
        // Only a symlinked `device` (as in real sysfs) names a kernel device and has a parent.
        let link = fs::read_link(&device).ok();
        let device_name = link
            .as_ref()
            .and_then(|l| l.file_name()?.to_str().map(str::to_owned));
        let parent = link
            .and_then(|_| fs::canonicalize(&device).ok())
            .and_then(|real| real.parent().map(Path::to_path_buf));
        let numa_path = existing_or_parent(&device, parent.as_deref(), "numa_node");
        let local_path = existing_or_parent(&device, parent.as_deref(), "local_cpulist");
        nics.push(Nic {
            node: read_number(&numa_path)?,
            local_cpus: read_cpu_list(&local_path)?,
            device: device_name,
            name,
        });
    }
    Ok(nics)
}

fn existing_or_parent(device: &Path, parent: Option<&Path>, file: &str) -> PathBuf {
    let own = device.join(file);
    match parent {
        Some(parent) if !own.exists() => parent.join(file),
        _ => own,
    }
}

/// Per-CPU totals of the NIC lines of `/proc/interrupts` (proc(5)); `None` when the file
/// cannot be read. The header names the CPU of each count column (`CPU0 CPU1 …`, online CPUs
/// only); only numbered IRQ lines are considered, and a line is a NIC line when
/// [`is_nic_interrupt`] says so.
fn read_nic_interrupts(path: &Path, nics: &[Nic]) -> Option<BTreeMap<usize, u64>> {
    let text = fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let columns: Vec<usize> = lines
        .next()?
        .split_whitespace()
        .filter_map(|t| t.strip_prefix("CPU")?.parse().ok())
        .collect();
    let mut totals = BTreeMap::new();
    for line in lines {
        let mut tokens = line.split_whitespace();
        let Some(label) = tokens.next().and_then(|t| t.strip_suffix(':')) else {
            continue;
        };
        if label.is_empty() || !label.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let counts: Vec<u64> = tokens
            .by_ref()
            .take(columns.len())
            .map_while(|t| t.parse().ok())
            .collect();
        let description: Vec<&str> = tokens.collect();
        if counts.len() != columns.len() || !is_nic_interrupt(&description.join(" "), nics) {
            continue;
        }
        for (&cpu, &count) in columns.iter().zip(&counts) {
            if count > 0 {
                *totals.entry(cpu).or_insert(0) += count;
            }
        }
    }
    Some(totals)
}

/// Whether an interrupt's description (chip, hwirq and name columns) belongs to a NIC: it
/// names a known interface (`eth0-TxRx-0`, `i40e-eth0-TxRx-1`) or its device (`virtio2-input.0`,
/// `mlx5_comp0@pci:0000:3b:00.0`), or it has a common queue-name shape (`*-TxRx-*`, `*-rx-*`,
/// `*-tx-*`, `virtioN-input.Q`, `virtioN-output.Q`).
fn is_nic_interrupt(description: &str, nics: &[Nic]) -> bool {
    let named = nics.iter().any(|nic| {
        mentions(description, &nic.name)
            || nic
                .device
                .as_deref()
                .is_some_and(|d| mentions(description, d))
    });
    named
        || description.split_whitespace().any(|name| {
            let lower = name.to_ascii_lowercase();
            lower.contains("-txrx-")
                || lower.contains("-rx-")
                || lower.contains("-tx-")
                || is_virtio_net_queue(&lower)
        })
}

/// `virtio<N>-input.<Q>` or `virtio<N>-output.<Q>`: virtio-net's queue vectors (virtio-input
/// devices use `virtio<N>-input` with no queue number, vsock `virtio<N>-rx`).
fn is_virtio_net_queue(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("virtio") else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return false;
    }
    let queue = rest[digits..]
        .strip_prefix("-input.")
        .or_else(|| rest[digits..].strip_prefix("-output."));
    queue.is_some_and(|q| !q.is_empty() && q.bytes().all(|b| b.is_ascii_digit()))
}

/// `haystack` contains `word` not glued to other letters or digits (`eth0` is in `eth0-TxRx-0`
/// but not in `veth0` or `eth01`).
fn mentions(haystack: &str, word: &str) -> bool {
    if word.is_empty() {
        return false;
    }
    haystack.match_indices(word).any(|(at, _)| {
        let before = haystack[..at].chars().next_back();
        let after = haystack[at + word.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric())
            && !after.is_some_and(|c| c.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL8: &[usize] = &[0, 1, 2, 3, 4, 5, 6, 7];

    fn fixture(name: &str, allowed: &[usize]) -> Topology {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/topology")
            .join(name);
        Topology::from_sysfs(&root.join("sys"), &root.join("proc"), allowed)
            .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
    }

    fn plan(workers: &[usize], acceptor: usize) -> PinPlan {
        PinPlan {
            workers: workers.to_vec(),
            acceptor: Some(acceptor),
        }
    }

    #[test]
    fn cpu_list_parses_ranges_singles_and_whitespace() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list(" 0 - 1 , 5 ").unwrap(), vec![0, 1, 5]);
        assert_eq!(parse_cpu_list("3,1,1,0-2").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_cpu_list("7").unwrap(), vec![7]);
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("\n").unwrap(), Vec::<usize>::new());
    }

    #[test]
    fn cpu_list_errors_name_the_bad_token() {
        let cases = [
            ("0-3,x", "x", "not a cpu number"),
            ("0-3,", "", "empty entry"),
            ("3-1", "3-1", "backwards"),
            ("1-2-3", "1-2-3", "not a cpu number"),
            ("-1", "-1", "not a cpu number"),
            ("0-3:2/4", "0-3:2/4", "not a cpu number"),
            ("99999", "99999", "too large"),
        ];
        for (list, token, reason) in cases {
            let err = parse_cpu_list(list).unwrap_err();
            assert_eq!(err.token, token, "{list}");
            assert!(err.reason.contains(reason), "{list}: {err}");
            assert!(err.to_string().contains(&format!("{token:?}")), "{err}");
        }
    }

    #[test]
    fn cpu_list_formats_runs_and_round_trips() {
        assert_eq!(format_cpu_list(&[]), "");
        assert_eq!(format_cpu_list(&[4]), "4");
        assert_eq!(format_cpu_list(&[0, 1]), "0-1");
        assert_eq!(format_cpu_list(&[10, 3, 1, 2, 7, 9, 2]), "1-3,7,9-10");
        for list in ["0-3,8,10-11", "0,2,4,6", "5-63"] {
            assert_eq!(format_cpu_list(&parse_cpu_list(list).unwrap()), list);
        }
    }

    #[test]
    fn smt_host_reads_cores_and_siblings() {
        let topo = fixture("smt-4c8t", ALL8);
        let cores: Vec<usize> = topo.cpus().iter().map(|c| c.core).collect();
        assert_eq!(cores, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        assert!(
            topo.cpus()
                .iter()
                .all(|c| c.online && c.package == 0 && c.node == 0)
        );
        assert!(topo.nics().is_empty(), "lo and docker0 have no device");
        assert!(topo.interrupts_visible());
        assert!(topo.cpus().iter().all(|c| c.nic_interrupts == 0));
    }

    #[test]
    fn smt_host_plans_one_worker_per_core_before_siblings() {
        let topo = fixture("smt-4c8t", ALL8);
        // Fewer workers than cores: the last core is kept whole for the acceptor.
        assert_eq!(topo.plan(3), plan(&[0, 1, 2, 3][..3], 3));
        assert_eq!(topo.plan(1), plan(&[0], 3));
        // Every core busy: the acceptor takes an idle sibling, the last in order.
        assert_eq!(topo.plan(4), plan(&[0, 1, 2, 3], 7));
        assert_eq!(topo.plan(6), plan(&[0, 1, 2, 3, 4, 5], 7));
        // Every CPU busy: the acceptor shares the last one.
        assert_eq!(topo.plan(8), plan(&[0, 1, 2, 3, 4, 5, 6, 7], 7));
        // Wrap-around: CPUs 0 and 1 carry two workers, so the acceptor goes on 7 (one).
        assert_eq!(topo.plan(10), plan(&[0, 1, 2, 3, 4, 5, 6, 7, 0, 1], 7));
        assert_eq!(topo.plan(0), plan(&[], 3));
    }

    #[test]
    fn smt_host_with_four_workers_uses_four_distinct_cores() {
        let topo = fixture("smt-4c8t", ALL8);
        let workers = topo.plan(4).workers;
        let cores: BTreeSet<usize> = workers.iter().map(|&w| topo.cpus()[w].core).collect();
        assert_eq!(cores.len(), 4);
        // With six, only the last two workers are siblings of earlier ones.
        let workers = topo.plan(6).workers;
        let first_four: BTreeSet<usize> =
            workers[..4].iter().map(|&w| topo.cpus()[w].core).collect();
        assert_eq!(first_four.len(), 4);
        assert_eq!(topo.cpus()[workers[4]].core, 0);
        assert_eq!(topo.cpus()[workers[5]].core, 1);
    }

    #[test]
    fn smt_host_respects_the_affinity_mask() {
        // taskset -c 0,1,4,5: two cores, two threads each.
        let topo = fixture("smt-4c8t", &[0, 1, 4, 5]);
        assert_eq!(topo.usable_cpus(), vec![0, 1, 4, 5]);
        assert_eq!(topo.plan(1), plan(&[0], 1));
        assert_eq!(topo.plan(2), plan(&[0, 1], 5));
        assert_eq!(topo.plan(5), plan(&[0, 1, 4, 5, 0], 5));
    }

    #[test]
    fn numa_host_reads_nodes_nic_and_interrupts() {
        let topo = fixture("numa-2n8c-nic", ALL8);
        assert_eq!(
            topo.nodes(),
            &[
                NumaNode {
                    id: 0,
                    cpus: vec![0, 1, 2, 3]
                },
                NumaNode {
                    id: 1,
                    cpus: vec![4, 5, 6, 7]
                },
            ]
        );
        assert_eq!(
            topo.nics(),
            &[Nic {
                name: "eth0".to_owned(),
                node: Some(1),
                local_cpus: Some(vec![4, 5, 6, 7]),
                device: None,
            }]
        );
        assert_eq!(topo.nic_node(), Some(1));
        let irqs: Vec<(usize, u64)> = topo
            .cpus()
            .iter()
            .filter(|c| c.nic_interrupts > 0)
            .map(|c| (c.id, c.nic_interrupts))
            .collect();
        // eth0 + eth0-TxRx-0 + eth0-TxRx-1; the nvme0q1 line on CPU 1 is not a NIC's.
        assert_eq!(irqs, vec![(5, 16002)]);
        let packages: Vec<usize> = topo.cpus().iter().map(|c| c.package).collect();
        assert_eq!(packages, vec![0, 0, 0, 0, 1, 1, 1, 1]);
        // core_id repeats across packages; the sibling list keeps the cores apart.
        let cores: BTreeSet<usize> = topo.cpus().iter().map(|c| c.core).collect();
        assert_eq!(cores.len(), 8);
    }

    #[test]
    fn numa_host_prefers_the_nic_node_and_gives_the_irq_core_to_the_acceptor() {
        let topo = fixture("numa-2n8c-nic", ALL8);
        assert_eq!(topo.plan(2), plan(&[4, 6], 5));
        assert_eq!(topo.plan(4), plan(&[4, 6, 7, 0], 5));
        assert_eq!(topo.plan(7), plan(&[4, 6, 7, 0, 1, 2, 3], 5));
        // No spare CPU: the IRQ core is the NIC node's last, the acceptor shares the very last.
        assert_eq!(topo.plan(8), plan(&[4, 6, 7, 5, 0, 1, 2, 3], 3));
        assert_eq!(topo.plan(10), plan(&[4, 6, 7, 5, 0, 1, 2, 3, 4, 6], 3));
    }

    #[test]
    fn numa_host_confined_off_the_nic_node_still_plans() {
        let topo = fixture("numa-2n8c-nic", &[0, 1, 2, 3]);
        assert_eq!(topo.plan(2), plan(&[0, 1], 3));
        assert_eq!(topo.plan(4), plan(&[0, 1, 2, 3], 3));
    }

    #[test]
    fn offline_and_disallowed_cpus_are_never_planned() {
        let topo = fixture("offline-cpu2", &[0, 1, 2, 3]);
        let cpu2 = &topo.cpus()[2];
        assert_eq!((cpu2.id, cpu2.online, cpu2.core), (2, false, 2));
        assert_eq!(topo.usable_cpus(), vec![0, 1, 3]);
        assert_eq!(topo.plan(2), plan(&[0, 1], 3));
        assert_eq!(topo.plan(4), plan(&[0, 1, 3, 0], 3));

        let narrow = fixture("offline-cpu2", &[0, 2, 3]);
        assert_eq!(narrow.plan(3), plan(&[0, 3, 0], 3));
        for topo in [&topo, &narrow] {
            for workers in 0..12 {
                let plan = topo.plan(workers);
                assert_eq!(plan.workers.len(), workers);
                for cpu in plan.workers.iter().chain(&plan.acceptor) {
                    assert!(
                        topo.usable_cpus().contains(cpu),
                        "{workers} workers: cpu {cpu}"
                    );
                }
            }
        }
        assert_eq!(topo.plan(1).acceptor, Some(3));
    }

    #[test]
    fn bare_tree_degrades_to_one_core_per_cpu() {
        let topo = fixture("bare", &[0, 1, 2, 3]);
        let cores: Vec<(usize, usize, usize, usize)> = topo
            .cpus()
            .iter()
            .map(|c| (c.id, c.core, c.package, c.node))
            .collect();
        assert_eq!(
            cores,
            vec![(0, 0, 0, 0), (1, 1, 0, 0), (2, 2, 0, 0), (3, 3, 0, 0)]
        );
        assert_eq!(
            topo.nodes(),
            &[NumaNode {
                id: 0,
                cpus: vec![0, 1, 2, 3]
            }]
        );
        assert!(topo.nics().is_empty());
        assert!(!topo.interrupts_visible());
        assert_eq!(topo.nic_node(), None);
        assert_eq!(topo.plan(2), plan(&[0, 1], 3));
        assert_eq!(topo.plan(4), plan(&[0, 1, 2, 3], 3));
    }

    #[test]
    fn allowed_cpus_unknown_to_sysfs_are_taken_as_online() {
        let topo = fixture("bare", &[2, 3, 4, 5]);
        assert_eq!(topo.usable_cpus(), vec![2, 3, 4, 5]);
        assert_eq!(topo.cpus().len(), 6);
        assert_eq!(topo.plan(2), plan(&[2, 3], 5));
        // Listed but not online is different: sysfs has said no.
        let topo = fixture("offline-cpu2", &[2]);
        assert!(topo.usable_cpus().is_empty());
    }

    #[test]
    fn no_usable_cpu_gives_an_empty_plan() {
        let topo = fixture("bare", &[]);
        assert_eq!(
            topo.plan(3),
            PinPlan {
                workers: vec![],
                acceptor: None,
            }
        );
        assert!(topo.report(3).contains("acceptor: unpinned"));
    }

    #[test]
    fn virtio_nic_is_found_through_its_device_name() {
        let topo = fixture("vm-virtio", &[0, 1]);
        assert_eq!(
            topo.nics(),
            &[Nic {
                name: "eth0".to_owned(),
                node: None,
                local_cpus: Some(vec![0, 1]),
                device: Some("virtio2".to_owned()),
            }]
        );
        let irqs: Vec<u64> = topo.cpus().iter().map(|c| c.nic_interrupts).collect();
        // virtio2-output.0 and virtio2-input.0; not vsock (virtio3-rx) nor virtio4-input.
        assert_eq!(irqs, vec![2463, 2948]);
        assert_eq!(topo.nic_node(), None);
        assert_eq!(topo.plan(1), plan(&[0], 1));
        assert_eq!(topo.plan(2), plan(&[0, 1], 1));
    }

    #[test]
    fn nic_interrupts_are_recognised_by_name() {
        let nics = [Nic {
            name: "eth0".to_owned(),
            node: None,
            local_cpus: None,
            device: Some("0000:3b:00.0".to_owned()),
        }];
        for yes in [
            "PCI-MSI 1-edge eth0",
            "PCI-MSI 1-edge i40e-eth0-TxRx-3",
            "PCI-MSI 1-edge mlx5_comp0@pci:0000:3b:00.0",
            "PCI-MSI 1-edge enp5s0-TxRx-0",
            "PCI-MSI 1-edge ens1f0-rx-0",
            "PCI-MSIX-0000:00:03.0 1-edge virtio7-input.0",
        ] {
            assert!(is_nic_interrupt(yes, &nics), "{yes}");
        }
        for no in [
            "PCI-MSI 1-edge veth0",
            "PCI-MSI 1-edge eth01",
            "PCI-MSI 1-edge nvme0q1",
            "PCI-MSIX-0000:00:05.0 1-edge virtio4-input",
            "PCI-MSIX-0000:00:04.0 1-edge virtio3-rx",
            "IO-APIC 2-edge timer",
        ] {
            assert!(!is_nic_interrupt(no, &nics), "{no}");
        }
    }

    #[test]
    fn malformed_sysfs_file_is_an_error_naming_it() {
        let root = std::env::temp_dir().join(format!("rcluster-topology-{}", std::process::id()));
        let cpu_dir = root.join("devices/system/cpu");
        fs::create_dir_all(&cpu_dir).unwrap();
        fs::write(cpu_dir.join("online"), "0-3,z\n").unwrap();
        let err = Topology::from_sysfs(&root, &root, &[0]).unwrap_err();
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let msg = err.to_string();
        assert!(
            msg.contains("devices/system/cpu/online") && msg.contains("\"z\""),
            "{msg}"
        );
    }

    #[test]
    fn empty_tree_falls_back_to_the_affinity_mask() {
        let missing = Path::new("/nonexistent/rcluster-topology");
        let topo = Topology::from_sysfs(missing, missing, &[2, 3]).unwrap();
        assert_eq!(topo.usable_cpus(), vec![2, 3]);
        assert_eq!(topo.plan(1), plan(&[2], 3));
        assert!(Topology::from_sysfs(missing, missing, &[]).is_err());
    }

    #[test]
    fn report_shows_the_key_facts_and_the_plan() {
        let report = fixture("numa-2n8c-nic", ALL8).report(4);
        for line in [
            "online cpus: 0-7",
            "offline cpus: none",
            "allowed cpus: 0-7",
            "not allowed cpus: none",
            "smt sibling groups: none (one thread per core)",
            "cores: 8",
            "packages: 2",
            "  package 1: 4 cores, cpus 4-7",
            "numa nodes: 2",
            "  node 1: cpus 4-7",
            "nics: 1",
            "  eth0: numa node 1, local cpus 4-7",
            "nic interrupt cpus: 5",
            "  cpu 5: 16002 interrupts",
            "plan for 4 workers (nic node 1):",
            "  worker 0: cpu 4 (core 4, node 1)",
            "  worker 3: cpu 0 (core 0, node 0)",
            "  acceptor: cpu 5 (core 5, node 1, nic irqs); idle core",
        ] {
            assert!(
                report.lines().any(|l| l == line),
                "missing {line:?} in\n{report}"
            );
        }

        let report = fixture("smt-4c8t", &[0, 1, 2, 3, 4, 5]).report(6);
        for line in [
            "allowed cpus: 0-5",
            "not allowed cpus: 6-7",
            "smt sibling groups: 0,4 1,5 2,6 3,7",
            "cores: 4",
            "nics: none with a device",
            "nic interrupt cpus: none found",
            "  worker 5: cpu 5 (core 1, node 0)",
            "  acceptor: cpu 5 (core 1, node 0); shared with 1 worker(s), no idle cpu left",
        ] {
            assert!(
                report.lines().any(|l| l == line),
                "missing {line:?} in\n{report}"
            );
        }

        let report = fixture("offline-cpu2", &[0, 1, 2, 3]).report(2);
        assert!(
            report.contains("\nonline cpus: 0-1,3\n") || report.starts_with("online cpus: 0-1,3\n")
        );
        assert!(report.contains("\noffline cpus: 2\n"), "{report}");
        let report = fixture("bare", &[0, 1, 2, 3]).report(2);
        assert!(
            report.contains("\nnic interrupt cpus: not visible\n"),
            "{report}"
        );
    }

    #[test]
    fn detect_works_on_this_machine() {
        let allowed = crate::sys::sched_getaffinity().unwrap().cpus();
        let topo = Topology::detect(&allowed).unwrap();
        let usable = topo.usable_cpus();
        assert!(!usable.is_empty());
        assert!(usable.iter().all(|c| allowed.contains(c)));
        let plan = topo.plan(usable.len() + 1);
        assert_eq!(plan.workers.len(), usable.len() + 1);
        assert!(
            plan.workers
                .iter()
                .chain(&plan.acceptor)
                .all(|c| usable.contains(c))
        );
        assert!(topo.report(2).contains("plan for 2 workers"));
    }
}
