//! `rcluster-lb ctl`: the control socket's client. Finds the master's socket (`--control PATH`,
//! `--name NAME`, or the only socket in the control directory), sends one request line, prints
//! the answer (a table, JSON or a sentence) and exits 0 when the master said `ok`, 1 otherwise
//! (also 0 when stdout's reader closed it early: see [`crate::output`]).
//! The protocol is in docs/CONTROL.md.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cli::{CtlArgs, CtlCommand, UsageError};
use crate::master::control::{self, Request};
use crate::master::status::Status;
use crate::output::print;

/// Runs one `ctl` command against a master.
pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let path = socket_path(&args)?;
    let request = match &args.command {
        CtlCommand::Status { .. } => Request::Status,
        CtlCommand::Dump => Request::Dump,
        CtlCommand::Reload => Request::Reload,
        CtlCommand::Scale { workers } => Request::Scale { workers: *workers },
        CtlCommand::Stop { .. } => Request::Stop,
        CtlCommand::Recycle { slot } => Request::Recycle { slot: *slot },
        CtlCommand::Policy { name } => Request::Policy { name: name.clone() },
    };
    let stream = UnixStream::connect(&path)
        .with_context(|| format!("cannot connect to the control socket {}", path.display()))?;
    let mut out = stream.try_clone()?;
    let line = serde_json::to_string(&request)? + "\n";
    out.write_all(line.as_bytes())
        .context("cannot send the request")?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .context("cannot read the answer")?;
    if answer.is_empty() {
        bail!("the master closed the control connection without answering");
    }
    let answer: Value = serde_json::from_str(&answer).context("the answer is not JSON")?;
    if answer["ok"] != Value::Bool(true) {
        bail!(
            "{}",
            answer["error"]
                .as_str()
                .unwrap_or("the master refused the request")
        );
    }
    match &args.command {
        CtlCommand::Status { json } => {
            let status: Status = serde_json::from_value(answer["status"].clone())
                .context("the status answer does not parse")?;
            if *json {
                print(&(serde_json::to_string_pretty(&status)? + "\n"))?;
            } else {
                print(&status.table())?;
            }
        }
        CtlCommand::Dump => print(&(serde_json::to_string_pretty(&answer["dump"])? + "\n"))?,
        CtlCommand::Reload => {
            let pids: Vec<String> = answer["pids"]
                .as_array()
                .map(|a| a.iter().map(|p| p.to_string()).collect())
                .unwrap_or_default();
            print(&format!(
                "reload to generation {} complete; workers: {}\n",
                answer["generation"],
                pids.join(" ")
            ))?;
        }
        CtlCommand::Scale { .. } => print(&format!("running {} workers\n", answer["workers"]))?,
        CtlCommand::Stop { no_wait } => {
            // A closed stdout ends the command here, before the wait, as SIGPIPE would.
            print(&format!("master {} is stopping\n", answer["pid"]))?;
            if !no_wait {
                // The master holds the connection until it exits.
                let mut sink = Vec::new();
                let _ = reader.read_to_end(&mut sink);
                print(&format!("master {} exited\n", answer["pid"]))?;
            }
        }
        CtlCommand::Recycle { slot } => print(&format!(
            "replacing worker {slot} (pid {}) with pid {}\n",
            answer["old_pid"], answer["new_pid"]
        ))?,
        CtlCommand::Policy { .. } => print(&format!(
            "policy {} (was {})\n",
            answer["policy"].as_str().unwrap_or("?"),
            answer["previous"].as_str().unwrap_or("?")
        ))?,
    }
    Ok(())
}

/// `--control`, else `--name`'s path, else the only socket in the control directory.
fn socket_path(args: &CtlArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.control {
        return Ok(p.clone());
    }
    if let Some(name) = &args.name {
        control::check_name(name).map_err(UsageError)?;
        return Ok(control::path_for_name(name));
    }
    let dir = control::default_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".sock").map(str::to_string)
                })
                // A socket nobody accepts on is what a SIGKILLed master left behind.
                .filter(|name| UnixStream::connect(control::path_for_name(name)).is_ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    match names.as_slice() {
        [] => bail!(
            "no master found in {} (is one running as this user? pass --control PATH or --name NAME)",
            dir.display()
        ),
        [one] => Ok(control::path_for_name(one)),
        many => Err(UsageError(format!(
            "several masters in {}: {}; pick one with --name",
            dir.display(),
            many.join(", ")
        ))
        .into()),
    }
}
