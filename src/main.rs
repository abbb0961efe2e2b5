//! The `rcluster-lb` binary: parses arguments, owns exit codes (0 ok, 1 runtime failure,
//! 2 usage or configuration error) and prints the error chain as one line. A subcommand whose
//! stdout's reader went away ends with 0 and no message ([`output`]).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rcluster_lb::cli::{Args, Sub, UsageError};
use rcluster_lb::master::activation::Activated;
use rcluster_lb::master::{logs, supervisor};
use rcluster_lb::output::{self, StdoutClosed};
use rcluster_lb::topology;
use rcluster_sys as sys;

mod demo;

/// How long the master waits at exit for its queued log lines to be written.
const LOG_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let args = Args::parse();
    let master = args.subcommand.is_none();
    if master {
        logs::init(args.log_format);
    } else {
        init_logging(matches!(args.subcommand, Some(Sub::DemoWorker)));
    }
    let result = run(args);
    if master {
        // The writer thread may still hold the last lines.
        logs::flush(LOG_FLUSH_TIMEOUT);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.downcast_ref::<UsageError>().is_some() {
                2
            } else {
                1
            };
            // Not eprintln!: it panics when stderr is a closed pipe, and there is nowhere else
            // to say it.
            let _ = writeln!(std::io::stderr().lock(), "rcluster-lb: error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.subcommand {
        Some(Sub::DemoWorker) => return demo::run(),
        Some(Sub::Ctl(ctl)) => return rcluster_lb::ctl::run(ctl),
        Some(Sub::SteerLoad { listeners, command }) => {
            return rcluster_lb::steer::handoff::run(listeners, &command);
        }
        Some(Sub::Topology { workers }) => {
            let allowed = sys::sched_getaffinity()?.cpus();
            let topo = topology::Topology::detect(&allowed)?;
            return output::print(&topo.report(workers.unwrap_or(allowed.len())));
        }
        None => {}
    }
    // Before anything else opens an fd: fds 3.. may be sockets passed by socket activation.
    let activated =
        Activated::from_env().map_err(|e| UsageError(format!("socket activation: {e}")))?;
    let exe = std::env::current_exe()?;
    let config = args.into_config(&exe)?;
    match sys::raise_nofile_limit() {
        Ok(limit) => log::debug!("RLIMIT_NOFILE soft limit is {limit}"),
        Err(e) => log::warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }
    supervisor::run(config, activated)
}

/// Subcommands (the demo worker, `ctl`, `topology`, `steer-load`) log straight to stderr, one
/// line each, `worker[PID]: LEVEL message` (`rcluster-lb[PID]` for the others); `RCLUSTER_LOG`
/// sets the level (default info). The master's logging is [`logs::init`]'s.
fn init_logging(worker: bool) {
    let pid = sys::getpid();
    let name = if worker { "worker" } else { "rcluster-lb" };
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("RCLUSTER_LOG", "info"))
        .format(move |buf, record| {
            writeln!(
                buf,
                "{name}[{pid}]: {} {}",
                record.level().as_str().to_ascii_lowercase(),
                record.args()
            )
        })
        .init();
}
