//! One run of the load generator from the command line, for scripts that compare servers
//! outside the end-to-end benchmark (`scripts/wait-bench.sh`, `scripts/paired-bench.sh`):
//!
//!     cargo run --release -p rcluster-loadgen --example open_loop -- ADDR RATE SECONDS [MIX]
//!
//! sends `RATE` requests per second to `ADDR` (a loopback address) for `SECONDS`, each on a
//! new connection, drawing each request's query from `MIX` (default: the benchmark's
//! heavy-tailed mix, `98% us=200, 2% us=20000`). `RATE` given as `closed:N` runs a closed loop
//! of `N` clients instead (each starts its next request when a response is in: what the server
//! can serve of that mix, its capacity). Either way it prints one line:
//! `sent … completed … errors … achieved_per_s … p50_ms … p90_ms … p99_ms … p999_ms … max_ms …`.
//! Bad arguments: a one-line error and exit code 2; a run that fails: exit code 1.

use std::process::ExitCode;
use std::time::Duration;

use rcluster_loadgen::{Load, LoadSpec, Mix};

const USAGE: &str = "usage: open_loop ADDR RATE|closed:CLIENTS SECONDS [MIX]";
/// The end-to-end benchmark's heavy-tailed mix (DESIGN.md §6).
const HEAVY_MIX: &str = "98% us=200, 2% us=20000";

fn run() -> Result<String, (u8, String)> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = |what: String| (2, format!("{what} ({USAGE})"));
    if !(3..=4).contains(&args.len()) {
        return Err(usage("expected 3 or 4 arguments".to_owned()));
    }
    let addr: std::net::SocketAddr = args[0]
        .parse()
        .map_err(|e| usage(format!("ADDR {:?}: {e}", args[0])))?;
    let load = match args[1].strip_prefix("closed:") {
        Some(n) => Load::Closed {
            clients: n
                .parse()
                .ok()
                .filter(|&c: &usize| (1..=10_000).contains(&c))
                .ok_or_else(|| {
                    usage(format!(
                        "CLIENTS {n:?} is not a whole number from 1 to 10000"
                    ))
                })?,
        },
        None => Load::Open {
            rate_per_s: args[1]
                .parse()
                .ok()
                .filter(|r: &f64| r.is_finite() && *r > 0.0)
                .ok_or_else(|| usage(format!("RATE {:?} is not a positive number", args[1])))?,
        },
    };
    let secs: f64 = args[2]
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 3600.0)
        .ok_or_else(|| usage(format!("SECONDS {:?} is not in (0, 3600]", args[2])))?;
    let mix_text = args.get(3).map_or(HEAVY_MIX, String::as_str);
    let mix: Mix = mix_text
        .parse()
        .map_err(|e| usage(format!("MIX {mix_text:?}: {e}")))?;
    let mut spec = LoadSpec::new(addr, load);
    spec.mix = mix;
    spec.duration = Duration::from_secs_f64(secs);
    let r = spec
        .run()
        .map_err(|e| (1, format!("the run failed: {e}")))?;
    let ms = |us: u64| us as f64 / 1e3;
    Ok(format!(
        "sent {} completed {} errors {} achieved_per_s {:.1} p50_ms {:.2} p90_ms {:.2} \
         p99_ms {:.2} p999_ms {:.2} max_ms {:.2}",
        r.sent,
        r.completed,
        r.errors.total(),
        r.throughput(),
        ms(r.p50_us()),
        ms(r.p90_us()),
        ms(r.p99_us()),
        ms(r.p999_us()),
        ms(r.max_us()),
    ))
}

fn main() -> ExitCode {
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err((code, msg)) => {
            eprintln!("open_loop: {msg}");
            ExitCode::from(code)
        }
    }
}
