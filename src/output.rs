//! What the subcommands (`ctl`, `topology`) print on stdout, written without panicking.
//!
//! `print!` panics when the write fails, and stdout is often a pipe whose reader stops early
//! (`rcluster-lb ctl status --json | head -1`). Every line a subcommand prints goes through
//! [`print()`] instead, which returns the failure:
//!
//! - The reader closed the pipe (`EPIPE`): [`StdoutClosed`]; the binary then exits 0 without a
//!   word, as a reader that stopped reading asked for nothing more (what `git` does when its
//!   pager quits early, and what keeps `set -o pipefail` pipelines ending in `head` green).
//! - Any other failure (a full disk, `EIO`): an error for the binary's usual one line on stderr
//!   and exit code 1.
//!
//! Why not `SIGPIPE` back to `SIG_DFL` for the subcommands: the process would die silently
//! with status 141 instead, a failure to `set -o pipefail`; and the disposition is inherited
//! across `exec`, which `steer-load` does, while the master must keep ignoring `SIGPIPE` (a
//! client that goes away must not kill it). An error value needs no signal state at all.

use std::io::{self, Write};

/// Stdout's reader went away (`EPIPE`): the command ends quietly, with exit code 0.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed by its reader")]
pub struct StdoutClosed;

/// Writes `text` to stdout and flushes it (stdout is line-buffered: a last line without a
/// newline would otherwise fail unseen at exit).
pub fn print(text: &str) -> anyhow::Result<()> {
    write_to(&mut io::stdout().lock(), text)
}

/// [`print()`] on any writer.
fn write_to(out: &mut impl Write, text: &str) -> anyhow::Result<()> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that fails with one error kind.
    struct Failing(io::ErrorKind);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(self.0))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_is_stdout_closed_and_other_errors_say_what_failed() {
        let e = write_to(&mut Failing(io::ErrorKind::BrokenPipe), "x\n").unwrap_err();
        assert!(e.downcast_ref::<StdoutClosed>().is_some(), "{e:#}");
        let e = write_to(&mut Failing(io::ErrorKind::StorageFull), "x\n").unwrap_err();
        assert!(e.downcast_ref::<StdoutClosed>().is_none());
        assert!(
            format!("{e:#}").starts_with("cannot write to stdout: "),
            "{e:#}"
        );
        let mut buf = Vec::new();
        write_to(&mut buf, "a\nb").unwrap();
        assert_eq!(buf, b"a\nb");
    }
}
