//! A hypervisor reached over ssh: the [`Host`] of a remote backup. It runs the system
//! `ssh` binary, so the user's ssh setup applies as it does for libvirt's `qemu+ssh://`
//! (`~/.ssh/config`, keys, agent, `known_hosts`), with `BatchMode` (never a prompt: a
//! missing key or an unknown host key fails at once, with ssh's own words in the error).
//!
//! One connection serves the whole run: a master (`ControlMaster`) whose control socket
//! is in a private temporary folder, and every command a session multiplexed on it. The
//! master's remote command reads its stdin, a pipe from vmback, until EOF: when vmback
//! exits, however it exits, the pipe closes and the master ends, so none outlives the run.
//! [`RemoteChild`] gives the same guarantee to a long-running remote command (an offline
//! disk's `qemu-nbd`).
//!
//! ssh hands the remote command to the login shell there as one string, so every
//! argument is single-quoted on its way (see [`QUOTE_AND_RUN`]): a path with spaces or
//! quotes arrives as the one argument it was, and nothing in it is expanded, here or
//! there. The remote login shell must be a POSIX shell (sh, bash, dash, zsh).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use thiserror::Error;

use super::host::{Host, HostError, partial};

/// Run there with a path as `$1`: writes stdin to `$1.partial`, syncs it and renames it
/// to `$1`; exits [`EXISTS`] without writing when `$1` exists.
const WRITE_NEW: &str = r#"[ -e "$1" ] && exit 17
cat >"$2" && sync -- "$2" && mv -f -- "$2" "$1""#;
/// [`WRITE_NEW`]'s exit status when the file exists (EEXIST's number, for the reader).
const EXISTS: i32 = 17;

/// How long ssh may take to open its TCP connection (`ConnectTimeout`); the same order
/// as the NBD connection's dead-peer timeout.
const CONNECT_TIMEOUT_S: u32 = 15;
/// `ServerAliveInterval` × `ServerAliveCountMax`: a master whose server answered nothing
/// for 30 s is given up (as `nbd::TCP_DEAD_AFTER`), instead of hanging on a cut link.
const ALIVE_INTERVAL_S: u32 = 10;
const ALIVE_COUNT: u32 = 3;

/// A local `sh` that single-quotes each remote argument and runs ssh with them as one
/// command string. `$1` is the number of arguments that are ssh's own (program, options,
/// destination); the rest are the remote command's. An argument is quoted as
/// `'...'` with each `'` written `'\''`; the `x` appended before `sed` and stripped
/// after keeps trailing newlines, which `$(...)` would drop. It only quotes: no argument
/// is expanded or evaluated here.
pub const QUOTE_AND_RUN: &str = r#"n=$1; shift; t=$#; r=
for a do
  if [ "$n" -gt 0 ]; then set -- "$@" "$a"; n=$((n - 1))
  else q=$(printf '%sx' "$a" | sed "s/'/'\\\\''/g"); r="$r '${q%x}'"; fi
done
shift "$t"
exec "$@" "$r""#;

/// Where and as whom ssh connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub host: String,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub key: Option<PathBuf>,
}

impl SshTarget {
    /// `user@host:port`, for messages.
    pub fn name(&self) -> String {
        let user = self.user.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        format!("{user}{}{port}", self.host)
    }
}

/// Why the ssh connection could not be made.
#[derive(Debug, Error)]
pub enum SshError {
    #[error("ssh to {host}: cannot run ssh")]
    Spawn {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ssh to {host} failed: {}{}", stderr.trim(), hint(stderr))]
    Connect { host: String, stderr: String },
    #[error("ssh to {host}: cannot make the control socket's folder")]
    TempDir {
        host: String,
        #[source]
        source: std::io::Error,
    },
}

/// What to do about the failures users meet first.
fn hint(stderr: &str) -> &'static str {
    if stderr.contains("Host key verification failed") || stderr.contains("host key is known") {
        " (the host's key is not in known_hosts: connect once with `ssh` to check and add it)"
    } else if stderr.contains("Permission denied") {
        " (key authentication failed: see --ssh-user and --ssh-private-key)"
    } else if stderr.contains("Connection refused") {
        " (is sshd running there? see --ssh-port)"
    } else {
        ""
    }
}

/// A hypervisor reached over ssh (see the module note).
pub struct SshHost {
    target: SshTarget,
    /// Holds the control socket; removed on drop.
    dir: tempfile::TempDir,
    master: Child,
    /// The master's stdin: dropped (closed) to end it.
    master_in: Option<ChildStdin>,
}

impl SshHost {
    /// Connects (the master) and returns once commands can run; fails with ssh's message.
    pub fn connect(target: SshTarget) -> Result<SshHost, SshError> {
        let host = target.name();
        let dir = tempfile::Builder::new()
            .prefix("vmback-ssh.")
            .tempdir()
            .map_err(|source| SshError::TempDir { host: host.clone(), source })?;
        let master_opts = ["-o", "ControlMaster=yes", "-o", "ControlPersist=no"];
        let mut cmd = ssh(&target, &dir.path().join("control"), &master_opts);
        // The remote command says it runs (so the master is up and authenticated), then
        // reads stdin until vmback closes it (see the module note).
        cmd.arg("echo up; exec cat >/dev/null");
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut master = cmd.spawn().map_err(|source| SshError::Spawn { host: host.clone(), source })?;
        let mut line = String::new();
        let up = master.stdout.take().map(|o| BufReader::new(o).read_line(&mut line));
        if !matches!(up, Some(Ok(_))) || line.trim() != "up" {
            let _ = master.kill();
            let _ = master.wait();
            let mut stderr = String::new();
            if let Some(mut e) = master.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            return Err(SshError::Connect { host, stderr });
        }
        let master_in = master.stdin.take();
        // Nothing more is read from its stderr; ssh writes little there (a warning at
        // most), far below a pipe's buffer.
        Ok(SshHost { target, dir, master, master_in })
    }

    fn control(&self) -> PathBuf {
        self.dir.path().join("control")
    }

    /// The POSIX sh `script` run on the host with `argv` as its `"$@"`, its stdin a pipe
    /// held by the returned child (stdout and stderr piped too): the script learns from
    /// EOF on its stdin that vmback is done (the child killed, or vmback gone).
    pub fn spawn_tied(&self, script: &str, argv: &[String]) -> std::io::Result<Child> {
        let mut c = self.command("sh");
        c.args(["-c", script, "vmback"]).args(argv);
        c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn()
    }
}

/// ssh with vmback's options and `extra` for `target`, its control socket at `control`;
/// the remote command (if any) goes after.
fn ssh(target: &SshTarget, control: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new("ssh");
    c.args(ssh_args(target, control, extra));
    c
}

/// ssh's arguments up to and with the destination (options must precede it).
fn ssh_args(target: &SshTarget, control: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "-T".to_owned(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        format!("ConnectTimeout={CONNECT_TIMEOUT_S}"),
        "-o".into(),
        format!("ServerAliveInterval={ALIVE_INTERVAL_S}"),
        "-o".into(),
        format!("ServerAliveCountMax={ALIVE_COUNT}"),
        "-o".into(),
        format!("ControlPath={}", control.display()),
    ]
    .into();
    if let Some(u) = &target.user {
        a.extend(["-l".into(), u.clone()]);
    }
    if let Some(p) = target.port {
        a.extend(["-p".into(), p.to_string()]);
    }
    if let Some(k) = &target.key {
        a.extend(["-i".into(), k.display().to_string(), "-o".into(), "IdentitiesOnly=yes".into()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a.push(target.host.clone());
    a
}

impl Host for SshHost {
    fn name(&self) -> String {
        self.target.name()
    }

    fn command(&self, program: &str) -> Command {
        let mut ssh = vec!["ssh".to_owned()];
        // A session on the master's connection; never a master of its own.
        ssh.extend(ssh_args(&self.target, &self.control(), &["-o", "ControlMaster=no"]));
        let mut c = Command::new("sh");
        c.args(["-c", QUOTE_AND_RUN, "vmback-ssh"]).arg(ssh.len().to_string()).args(ssh).arg(program);
        c
    }

    fn read(&self, path: &Path, max: u64) -> Result<Vec<u8>, HostError> {
        let err = |source| HostError::Read { host: self.name(), path: path.to_owned(), source };
        let mut child = self
            .command("cat")
            .arg("--")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(err)?;
        let mut data = Vec::new();
        let out = child.stdout.take().expect("piped");
        // One byte past the bound tells a file of exactly `max` bytes from a larger one.
        let read = out.take(max.saturating_add(1)).read_to_end(&mut data);
        if data.len() as u64 > max {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HostError::TooLarge { host: self.name(), path: path.to_owned(), max });
        }
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let status = child.wait().map_err(err)?;
        read.map_err(err)?;
        if !status.success() {
            return Err(err(std::io::Error::other(format!("{status}: {}", stderr.trim()))));
        }
        Ok(data)
    }

    fn write_new(&self, path: &Path, data: &[u8]) -> Result<(), HostError> {
        use std::io::Write;
        let err = |source| HostError::Write { host: self.name(), path: path.to_owned(), source };
        let mut child = self
            .command("sh")
            .args(["-c", WRITE_NEW, "vmback"])
            .arg(path)
            .arg(partial(path))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(err)?;
        // A failed write (the script exited at once) shows in its status and stderr.
        let wrote = child.stdin.take().expect("piped").write_all(data);
        let out = child.wait_with_output().map_err(err)?;
        match out.status.code() {
            Some(0) => wrote.map_err(err),
            Some(EXISTS) => Err(HostError::Exists { host: self.name(), path: path.to_owned() }),
            _ => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                Err(err(std::io::Error::other(format!("{}: {}", out.status, stderr.trim()))))
            }
        }
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        drop(self.master_in.take());
        let _ = ssh(&self.target, &self.control(), &["-O", "exit"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wrapper with a local `sh -c` standing in for ssh: the string that would go to
    /// the remote shell is run by a local one, which prints each argument it got.
    fn through_wrapper(args: &[&str]) -> Vec<String> {
        // "ssh" is `sh -c`; the remote command is `printf '%s\0' ARGS...`
        let out = Command::new("sh")
            .args(["-c", QUOTE_AND_RUN, "t", "2", "sh", "-c", "printf", "%s\\0"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let s = String::from_utf8(out.stdout).unwrap();
        s.split('\0').filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }

    #[test]
    fn remote_arguments_arrive_as_they_were() {
        let odd = ["a b", "it's", "$HOME", "`id`", "*", "line\n", "\"q\"", "", "--", "'"];
        let got = through_wrapper(&odd);
        // an empty argument stays an argument, but `printf %s\0` of it prints nothing
        // to split on: compare without empties
        let want: Vec<String> = odd.iter().filter(|s| !s.is_empty()).map(|s| s.to_string()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn ssh_gets_batch_mode_the_control_socket_and_the_given_user_port_key() {
        let t = SshTarget {
            host: "hv1".into(),
            user: Some("root".into()),
            port: Some(2222),
            key: Some("/k/id".into()),
        };
        let a = ssh_args(&t, Path::new("/tmp/x/control"), &["-O", "exit"]).join(" ");
        for want in [
            "BatchMode=yes",
            "ControlPath=/tmp/x/control",
            "-l root",
            "-p 2222",
            "-i /k/id",
            "IdentitiesOnly=yes",
        ] {
            assert!(a.contains(want), "{want}: {a}");
        }
        assert!(a.ends_with(" -O exit hv1"), "options go before the destination: {a}");
        assert_eq!(t.name(), "root@hv1:2222");
        let bare = SshTarget { host: "hv1".into(), user: None, port: None, key: None };
        assert!(!ssh_args(&bare, Path::new("/c"), &[]).join(" ").contains("-l "));
        assert_eq!(bare.name(), "hv1");
    }

    /// The script a remote write runs there, run by a local sh: writes through the
    /// `.partial`, and never over an existing file.
    #[test]
    fn remote_writes_make_new_files_only() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("vm1_VARS.fd");
        let write = |data: &[u8]| {
            let mut c = Command::new("sh")
                .args(["-c", WRITE_NEW, "t"])
                .arg(&to)
                .arg(partial(&to))
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            let _ = c.stdin.take().unwrap().write_all(data);
            c.wait().unwrap().code()
        };
        assert_eq!(write(b"one"), Some(0));
        assert_eq!(write(b"two"), Some(EXISTS));
        assert_eq!(std::fs::read(&to).unwrap(), b"one");
        assert!(!partial(&to).exists());
    }

    #[test]
    fn hints_name_the_fix() {
        assert!(hint("Host key verification failed.").contains("known_hosts"));
        assert!(hint("root@h: Permission denied (publickey).").contains("--ssh-private-key"));
        assert!(hint("connect to host h port 22: Connection refused").contains("sshd"));
        assert_eq!(hint("something else"), "");
    }
}
