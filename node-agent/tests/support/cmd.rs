//! Running commands with errors that say what ran and what it printed, and child processes that are
//! killed when their guard drops.

use std::fmt;
use std::io::Write;
use std::process::{Child, Command, Output, Stdio};

/// A command that could not start or exited non-zero.
#[derive(Debug)]
pub struct CmdError {
    /// The command line.
    pub command: String,
    /// Exit code (None: not started, or killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error, or why the command could not start.
    pub stderr: String,
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "`{}` exited with {code}", self.command)?,
            None => write!(f, "`{}` failed", self.command)?,
        }
        if !self.stderr.trim().is_empty() {
            write!(f, ": {}", self.stderr.trim())?;
        }
        if !self.stdout.trim().is_empty() {
            write!(f, " (stdout: {})", self.stdout.trim())?;
        }
        Ok(())
    }
}

impl std::error::Error for CmdError {}

pub(crate) fn describe(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

pub(crate) fn not_started(command: &Command, err: &std::io::Error) -> CmdError {
    CmdError {
        command: describe(command),
        code: None,
        stdout: String::new(),
        stderr: err.to_string(),
    }
}

/// Runs `command` to completion; its stdout when it succeeded.
pub(crate) fn finish(mut command: Command, input: Option<&str>) -> Result<String, CmdError> {
    let output = output_of(&mut command, input)?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(CmdError {
            command: describe(&command),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Runs `command` to completion and returns its output whatever the exit status.
pub(crate) fn output_of(command: &mut Command, input: Option<&str>) -> Result<Output, CmdError> {
    command.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|err| not_started(command, &err))?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        // Inputs here are small; a command that exits early makes the write fail, its status tells why.
        let _ = stdin.write_all(input.as_bytes());
    }
    child.wait_with_output().map_err(|err| not_started(command, &err))
}

/// Runs `argv` in the test's own namespace (for `ip netns …` itself); stdout on success.
pub fn run(argv: &[&str]) -> Result<String, CmdError> {
    let (program, args) = argv.split_first().ok_or_else(|| CmdError {
        command: String::new(),
        code: None,
        stdout: String::new(),
        stderr: "empty command".into(),
    })?;
    let mut command = Command::new(program);
    command.args(args);
    finish(command, None)
}

/// [`run`] with `input` on stdin.
pub fn run_with_input(argv: &[&str], input: &str) -> Result<String, CmdError> {
    let (program, args) = argv.split_first().ok_or_else(|| CmdError {
        command: String::new(),
        code: None,
        stdout: String::new(),
        stderr: "empty command".into(),
    })?;
    let mut command = Command::new(program);
    command.args(args);
    finish(command, Some(input))
}

/// A background process started by a test; killed (by its id) and reaped on drop.
#[derive(Debug)]
pub struct Process {
    child: Child,
    command: String,
}

impl Process {
    pub(crate) fn spawn(mut command: Command) -> Result<Self, CmdError> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = command.spawn().map_err(|err| not_started(&command, &err))?;
        Ok(Self {
            child,
            command: describe(&command),
        })
    }

    /// Process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the process's stderr if it has already exited.
    pub fn check_running(&mut self) -> Result<(), CmdError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                Err(CmdError {
                    command: self.command.clone(),
                    code: status.code(),
                    stdout: String::new(),
                    stderr,
                })
            }
            Err(err) => Err(CmdError {
                command: self.command.clone(),
                code: None,
                stdout: String::new(),
                stderr: err.to_string(),
            }),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
