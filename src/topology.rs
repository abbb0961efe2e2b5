//! stub (replaced by the topology module): cpulist parsing and a trivial plan.
use std::io;

/// Parses a kernel cpulist ("0-3,8").
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let bad = || format!("bad CPU list entry '{part}'");
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a.parse().map_err(|_| bad())?;
            let b: usize = b.parse().map_err(|_| bad())?;
            if b < a {
                return Err(bad());
            }
            cpus.extend(a..=b);
        } else {
            cpus.push(part.parse().map_err(|_| bad())?);
        }
    }
    Ok(cpus)
}

/// Where workers and the acceptor go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinPlan {
    /// CPU for worker i.
    pub workers: Vec<usize>,
    /// CPU for the acceptor.
    pub acceptor: Option<usize>,
}

/// Host topology.
pub struct Topology {
    allowed: Vec<usize>,
}

impl Topology {
    /// Reads the running host.
    pub fn detect(allowed: &[usize]) -> io::Result<Topology> {
        Ok(Topology {
            allowed: allowed.to_vec(),
        })
    }

    /// The plan for `workers` workers.
    pub fn plan(&self, workers: usize) -> PinPlan {
        PinPlan {
            workers: (0..workers)
                .map(|i| self.allowed[i % self.allowed.len()])
                .collect(),
            acceptor: self.allowed.last().copied(),
        }
    }

    /// Text report.
    pub fn report(&self, workers: usize) -> String {
        format!("{:?}", self.plan(workers))
    }
}
