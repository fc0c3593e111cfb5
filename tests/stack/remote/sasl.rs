//! `--user`/`--password` against a libvirtd that asks for them: the remote host's TCP
//! listener authenticates by SASL (DIGEST-MD5, a sasldb of one user; see
//! contrib/realstack/remote-host.sh). A full backup over `qemu+tcp://` with the right
//! credentials restores to the truth; a wrong password fails naming the URI and SASL,
//! starts no job and writes nothing; the password is in no log line, even at debug.

use super::host::Host;
use super::{both_restore_to, skip, truths, vmback_backup};
use crate::common::{names, tempdir};

/// The NBD port of this test's backups.
const PORT: u16 = 10850;

#[test]
fn user_and_password_authenticate_to_a_sasl_libvirtd_and_a_wrong_password_fails_clearly() {
    if skip() {
        return;
    }
    let host = Host::start();
    let dom = "vmb-rt-sasl";
    host.domain(dom);
    let work = tempdir(dom);
    let uri = host.get("SASL_URI").to_owned();
    let user = host.get("SASL_USER").to_owned();
    let password_file = host.get("SASL_PASSWORD_FILE");
    let password = std::fs::read_to_string(password_file).expect("the SASL password");
    let password = password.trim_end();
    let port = PORT.to_string();
    host.write(dom, "vda", &["write -P 0x5a 0 4M"]);
    host.write(dom, "vdb", &["write -P 0xa5 2M 1M"]);

    // a wrong password: libvirtd refuses, nothing on the domain or in the set changes
    let bad = work.path().join("bad");
    let wrong = "not-the-password";
    let creds = ["--user", &user, "--password", wrong];
    let out =
        vmback_backup(&host, &[], &uri, dom, &bad, &[&creds[..], &["-l", "full", "-P", &port]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong password was accepted:\n{err}");
    for want in [&format!("cannot connect to libvirt at {uri}"), "SASL", "authentication failed"] {
        assert!(err.contains(want), "no {want:?} in:\n{err}");
    }
    assert!(!err.contains(wrong), "the password is in the message:\n{err}");
    assert!(!host.has_job(dom), "{dom}: a failed login left a job");
    assert!(host.checkpoints(dom).is_empty(), "a failed login made a checkpoint");
    assert!(!bad.exists() || names(&bad).is_empty(), "a failed login wrote {:?}", names(&bad));

    // the right one: a full backup (debug log) that restores to the disks' truth
    let truth = truths(&host, dom, &work.path().join("truth"));
    let set = work.path().join("set");
    let creds = ["--user", &user, "--password", password];
    let args = [&creds[..], &["-l", "full", "-P", &port, "--log-level", "debug"]].concat();
    let out = vmback_backup(&host, &[], &uri, dom, &set, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vmback backup with --user/--password over {uri}:\n{err}");
    assert!(!err.contains(password), "the password is in the debug log:\n{err}");
    let connected = format!("connected to libvirt at {uri} (libvirtd's URI: {uri})");
    assert!(err.contains(&connected), "the debug log does not say {connected:?}:\n{err}");
    both_restore_to(&set, None, &truth, work.path());
}
