//! The second host (contrib/realstack/remote-host.sh) as the tests see it: started once
//! per run and shared (the script locks its state folder, so test binaries may call
//! `start` at the same time), then driven through the script's subcommands. Each test
//! makes its own domain (a name of its own, recreated from nothing) and gives each backup
//! an NBD port of its own, so tests sharing the host never meet.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::fcntl::{Flock, FlockArg};

/// A started host: the script's `KEY=VALUE` lines (VMBACK_REMOTE_*), and the host in use:
/// a shared lock on `use.lock` in its state folder for tests that only use it, an
/// exclusive one for the fault tests, which cut its link and stop its sshd (test binaries
/// and their threads all take it, so no backup of another test runs into a fault).
pub struct Host {
    script: PathBuf,
    env: HashMap<String, String>,
    _in_use: Flock<File>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/realstack/remote-host.sh")
}

/// `out`'s status was success; otherwise fails the test with `what` and both streams.
pub fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Host {
    /// Starts the host, or finds it running; shared with other tests.
    pub fn start() -> Host {
        Host::start_as(FlockArg::LockShared)
    }

    /// As [`Host::start`], with the host to this test alone (faults).
    pub fn start_alone() -> Host {
        Host::start_as(FlockArg::LockExclusive)
    }

    fn start_as(how: FlockArg) -> Host {
        let script = script();
        let lines = |args: &[&str]| -> HashMap<String, String> {
            let what = format!("remote-host.sh {}", args.join(" "));
            let out = check(Command::new(&script).args(args).output().expect("run remote-host.sh"), &what);
            String::from_utf8(out.stdout)
                .expect("env lines are UTF-8")
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        // the lock first (`env` changes nothing): `start` undoes a fault test's cut link
        let state = lines(&["env"]).remove("VMBACK_REMOTE_STATE").expect("VMBACK_REMOTE_STATE");
        std::fs::create_dir_all(&state).expect("state folder");
        let lock = Path::new(&state).join("use.lock");
        let file = File::create(&lock).unwrap_or_else(|e| panic!("{}: {e}", lock.display()));
        let in_use = Flock::lock(file, how).unwrap_or_else(|(_, e)| panic!("flock {}: {e}", lock.display()));
        let env = lines(&["start"]);
        Host { script, env, _in_use: in_use }
    }

    /// The value of `VMBACK_REMOTE_<key>`.
    pub fn get(&self, key: &str) -> &str {
        let k = format!("VMBACK_REMOTE_{key}");
        self.env.get(&k).unwrap_or_else(|| panic!("remote-host.sh start printed no {k}"))
    }

    fn run(&self, args: &[&str]) -> Output {
        let what = format!("remote-host.sh {}", args.join(" "));
        check(Command::new(&self.script).args(args).output().expect("run remote-host.sh"), &what)
    }

    /// (Re)creates domain `name`: new empty disks vda and vdb, fresh NVRAM, paused.
    pub fn domain(&self, name: &str) {
        self.run(&["domain", name]);
    }

    /// Runs qemu-io commands (`write -P 0xab 0 1M`, ...) on a live disk, then flushes.
    pub fn write(&self, name: &str, disk: &str, cmds: &[&str]) {
        let mut args = vec!["write", name, disk];
        args.extend_from_slice(cmds);
        self.run(&args);
    }

    /// The disk's true contents now, as a raw image at `out` (taken on the host).
    pub fn truth(&self, name: &str, disk: &str, out: &Path) {
        self.run(&["truth", name, disk, out.to_str().expect("UTF-8 path")]);
    }

    /// A command run from this side as a backup host of this one: inside the script's
    /// `client` wrapper (root's ~/.ssh and HOME with the client key and known_hosts,
    /// libnbd's client certificates), with `env` for the wrapper (REMOTE_CLIENT_PKI,
    /// REMOTE_CLIENT_SSH: the fault tests' wrong ones).
    pub fn client_with(&self, env: &[(&str, &str)], program: &str) -> Command {
        let mut c = Command::new(&self.script);
        c.args(["client", program]).envs(env.iter().copied());
        c
    }

    pub fn client(&self, program: &str) -> Command {
        self.client_with(&[], program)
    }

    /// libvirt's own URI of the host over ssh, as a user writes it (the wrapper gives
    /// root's ssh the key and known_hosts).
    pub fn ssh_uri(&self) -> String {
        format!("qemu+ssh://root@{}/system", self.get("ADDR"))
    }

    /// `virsh ARGS` on the host itself (its own libvirtd, not over the network).
    pub fn virsh(&self, args: &[&str]) -> String {
        let mut a = vec!["exec", "virsh", "-q", "-c", "qemu:///system"];
        a.extend_from_slice(args);
        String::from_utf8_lossy(&self.run(&a).stdout).into_owned()
    }

    /// `CMD...` on the host itself (its namespaces), which must succeed.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut a = vec!["exec"];
        a.extend_from_slice(args);
        self.run(&a)
    }

    /// Whether `dom` has a job (a backup job left running) on the host.
    pub fn has_job(&self, dom: &str) -> bool {
        let info = self.virsh(&["domjobinfo", dom]);
        !info.lines().any(|l| l.starts_with("Job type:") && l.contains("None"))
    }

    /// The names of `dom`'s checkpoints on the host.
    pub fn checkpoints(&self, dom: &str) -> Vec<String> {
        let mut v: Vec<String> =
            self.virsh(&["checkpoint-list", "--name", dom]).lines().map(str::to_owned).collect();
        v.sort();
        v
    }

    /// `remote-host.sh link|sshd|rate ARG`: the fault switches.
    pub fn set(&self, what: &str, arg: &str) {
        self.run(&[what, arg]);
    }
}
