//! What goes wrong between two hosts: sshd stopped, a wrong TLS certificate, an unknown
//! host key, the link cut mid-backup. Each run fails with a message that says what
//! happened, leaves no backup job on the remote domain and no data file that passes for
//! complete, and the next run succeeds; the chain then restores to the truth.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use super::host::Host;
use super::{both_restore_to, check, skip, truths, vmback_backup, vmback_ok};
use crate::common::{names, tempdir};

/// The port of this test's backups (one at a time).
const PORT: u16 = 10830;

/// A run that must fail: its stderr, which must hold every one of `want`.
#[track_caller]
fn fails(out: Output, what: &str, want: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what} succeeded:\n{err}");
    for w in want {
        assert!(err.contains(w), "{what}: no {w:?} in its message:\n{err}");
    }
    eprintln!("{what} failed as it should:\n{err}");
    err
}

/// No job left on `dom`, and no complete data file of the failed run in `set`.
#[track_caller]
fn left_clean(host: &Host, dom: &str, set: &Path, before: &[String]) {
    assert!(!host.has_job(dom), "{dom}: a backup job was left running");
    let new: Vec<String> = names(set).into_iter().filter(|n| !before.contains(n)).collect();
    assert!(new.iter().all(|n| n.ends_with(".partial")), "a failed run left {new:?}");
}

#[test]
fn lost_links_stopped_sshd_wrong_certificates_and_unknown_host_keys_fail_clearly_and_leave_no_job() {
    if skip() {
        return;
    }
    let host = Host::start_alone();
    let dom = "vmb-rt-fault";
    host.domain(dom);
    let work = tempdir(dom);
    let set = work.path().join("set");
    let uri = host.ssh_uri();
    let tcp_uri = host.get("TCP_URI").to_owned();
    let port = PORT.to_string();
    let inc = ["-l", "inc", "-P", &port];
    host.write(dom, "vda", &["write -P 0xe1 0 8M"]);
    host.write(dom, "vdb", &["write -P 0xe2 1M 1M"]);
    vmback_ok(&host, dom, "full", &set, PORT, false);

    // sshd stopped: over qemu+ssh libvirt cannot connect; over qemu+tcp vmback's own ssh
    // (for qemu-img info and the boot files) cannot, and says where it tried
    host.set("sshd", "down");
    let before = names(&set);
    let out = vmback_backup(&host, &[], &uri, dom, &set, &inc);
    fails(out, "inc with sshd stopped (qemu+ssh)", &["cannot connect to libvirt at qemu+ssh://"]);
    let out = vmback_backup(&host, &[], &tcp_uri, dom, &set, &[&inc[..], &["--ssh-user", "root"]].concat());
    fails(out, "inc with sshd stopped (qemu+tcp)", &["ssh to root@10.203.0.2 failed", "Connection refused"]);
    left_clean(&host, dom, &set, &before);
    assert_eq!(host.checkpoints(dom), ["virtnbdbackup.0"], "a refused run changed the checkpoints");
    host.set("sshd", "up");
    host.write(dom, "vda", &["write -P 0xe3 2M 1M"]);
    vmback_ok(&host, dom, "inc", &set, PORT, false);

    // a client certificate of another CA: the TLS handshake fails, the job is ended
    let before = names(&set);
    let wrong = [("REMOTE_CLIENT_PKI", host.get("WRONG_CLIENT_PKI"))];
    let out = vmback_backup(&host, &wrong, &uri, dom, &set, &[&inc[..], &["--tls"]].concat());
    fails(out, "inc with a wrong TLS certificate", &["10.203.0.2:10830 (TLS)"]);
    left_clean(&host, dom, &set, &before);
    host.write(dom, "vdb", &["write -P 0xe4 3M 1M"]);
    vmback_ok(&host, dom, "inc", &set, PORT, true);

    // a known_hosts that does not know the host: ssh refuses it, nothing is started
    let before = names(&set);
    let unknown = [("REMOTE_CLIENT_SSH", host.get("UNKNOWN_HOST_SSH"))];
    let out = vmback_backup(&host, &unknown, &tcp_uri, dom, &set, &inc);
    fails(out, "inc with an unknown host key", &["Host key verification failed", "known_hosts"]);
    left_clean(&host, dom, &set, &before);
    vmback_ok(&host, dom, "inc", &set, PORT, false);

    // the link cut mid-backup: enough new data, sent slowly (rate limit), to cut it while
    // the inc's files are being written; it stays down past the NBD dead-link timeout
    host.write(dom, "vda", &["write -P 0xe5 8M 48M"]);
    host.write(dom, "vdb", &["write -P 0xe6 4M 40M"]);
    host.set("rate", "40");
    let before = names(&set);
    let n = before.iter().filter(|f| f.starts_with("vda.inc.") && f.ends_with(".data")).count() + 1;
    let partial = set.join(format!("vda.inc.virtnbdbackup.{n}.data.partial"));
    let child = host
        .client(env!("CARGO_BIN_EXE_vmback"))
        .args(["backup", "-U", &uri, "-d", dom, "-o"])
        .arg(&set)
        .args(inc)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmback");
    let run = std::thread::spawn(move || child.wait_with_output().expect("wait vmback"));
    // the first MiB: well before the end (88 MiB at 40 Mbit/s take about 18 s)
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::metadata(&partial).is_ok_and(|m| m.len() >= 1 << 20) {
        assert!(Instant::now() < deadline && !run.is_finished(), "{} never grew", partial.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    host.set("link", "down");
    let cut = Instant::now();
    // past the NBD connection's dead-link timeout (30 s) and its keepalive probes
    std::thread::sleep(Duration::from_secs(45));
    host.set("link", "up");
    let out = run.join().expect("vmback thread");
    eprintln!("the cut run ended {:?} after the cut", cut.elapsed());
    fails(out, "inc with the link cut", &["timed out", "the network to it was lost"]);
    left_clean(&host, dom, &set, &before);
    host.set("rate", "off");
    let out = vmback_backup(&host, &[], &uri, dom, &set, &inc);
    let out = check(out, "inc after the cut");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(".partial"), "the next run did not say it removed the cut run's files:\n{log}");
    assert!(names(&set).iter().all(|f| !f.ends_with(".partial")), "{:?}", names(&set));
    let truth = truths(&host, dom, &work.path().join("truth"));
    both_restore_to(&set, None, &truth, work.path());
}
