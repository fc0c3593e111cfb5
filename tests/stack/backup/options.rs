//! The options of `vmback backup` that change how the domain and its job are handled and
//! how the run reports (upstream's names): `-S`, `--pause`, `-e`, `-F`, `-s`/`-k`/`-f`,
//! `-q`, `-n`, `-v`, `--quiet`, `--logfile`, `-L`, `--no-sparse-detection`. Each test
//! shows the option's effect on a real domain.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::support::{
    self, Dom, MIB, Tool, VMBACK, check_set, cpt_list, disk, names, path_str, stack, tempdir, virsh_ok,
    vmback_ok,
};
use super::{chain, pat, some_writes};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `vmback backup -d DOMAIN -l LEVEL -o SET ARGS...`.
fn backup(dom: &Dom, level: &str, set: &Path, args: &[&str]) -> Output {
    Command::new(VMBACK)
        .args(["backup", "-d", &dom.name, "-l", level, "-o", path_str(set)])
        .args(args)
        .output()
        .expect("run vmback")
}

fn state(dom: &Dom) -> String {
    virsh_ok(&["domstate", &dom.name]).trim().to_owned()
}

/// Lets the (OS-less) domain run: it is started paused.
fn resume(dom: &Dom) {
    virsh_ok(&["resume", &dom.name]);
    assert_eq!(state(dom), "running");
}

#[test]
fn strict_exits_2_on_the_guest_agent_warning_and_freeze_mountpoint_warns_the_same() {
    if !stack() {
        return;
    }
    let name = "vmback-t-strict";
    let dom = Dom::new(name, vec![disk("vda", 64 * MIB)], false);
    dom.writes("vda", &[pat(0x11, MIB, MIB)]);
    let root = tempdir(name);

    // Paused: no freeze is tried (a paused guest cannot answer), so no warning.
    let o = backup(&dom, "copy", &root.path().join("paused"), &["-e"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("not freezing"), "{}", text(&o.stderr));

    // Running with no guest agent: the warning, and with -e exit 2 after a whole backup.
    resume(&dom);
    for (sub, extra) in
        [("plain", &[][..]), ("strict", &["-e"][..]), ("mounts", &["--strict", "-F", "/mnt,/var"][..])]
    {
        let set = root.path().join(sub);
        let o = backup(&dom, "copy", &set, extra);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(if extra.is_empty() { 0 } else { 2 }), "{sub}: {err}");
        assert!(err.contains("WARN") && err.contains("guest agent"), "{sub}: {err}");
        assert!(names(&set).contains(&"vda.copy.data".to_owned()), "{sub}: {:?}", names(&set));
        if !extra.is_empty() {
            assert!(err.contains("exit code 2 (--strict)"), "{err}");
        }
        check_set(&set, &[]);
    }
    // A failed run is exit 1 with or without -e.
    let o = backup(&dom, "inc", &root.path().join("nochain"), &["-e"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
}

#[test]
fn pause_pauses_a_running_domain_while_the_job_starts_and_resumes_it() {
    if !stack() {
        return;
    }
    let name = "vmback-t-pause";
    let mut dom = Dom::new(name, vec![disk("vda", 64 * MIB)], false);
    dom.writes("vda", &[pat(0x21, 3 * MIB, MIB)]);
    resume(&dom);
    let root = tempdir(name);
    let set = root.path().join("set");
    let o = backup(&dom, "full", &set, &["--pause"]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    let paused = err.find("paused while the backup job starts").unwrap_or_else(|| panic!("{err}"));
    let resumed = err.find("resumed").unwrap_or_else(|| panic!("{err}"));
    assert!(paused < resumed, "{err}");
    // Paused: no freeze is tried, so no warning.
    assert!(!err.contains("WARN"), "{err}");
    assert_eq!(state(&dom), "running", "--pause left the domain paused");
    // A domain that is paused already stays paused.
    virsh_ok(&["suspend", name]);
    let step = dom.backup(Tool::Vmback, "inc", &set, &["--pause"]);
    assert_eq!(state(&dom), "paused");
    let full = support::Step {
        tool: Tool::Vmback,
        level: "full".into(),
        set: set.clone(),
        files: [("vda".to_owned(), "vda.full.data".to_owned())].into(),
        truth: step.truth.clone(),
    };
    check_set(&set, &[full, step.clone()]);
    chain::check_vmback_restore(&[step]);
}

#[test]
fn start_domain_takes_a_full_with_a_checkpoint_and_leaves_the_domain_shut_off() {
    if !stack() {
        return;
    }
    let name = "vmback-t-startdom";
    let mut dom = Dom::new(name, vec![disk("vda", 64 * MIB), disk("vdb", 64 * MIB)], true);
    dom.shut_off();
    some_writes(&dom, 0);
    let root = tempdir(name);
    let set = root.path().join("set");
    // -s needs a running domain: refused, also with -S.
    for extra in [&["-s"][..], &["-s", "-S"][..]] {
        let err = support::vmback_fails(
            &["backup", "-d", name, "-l", "full", "-o", path_str(&set)]
                .into_iter()
                .chain(extra.iter().copied())
                .collect::<Vec<_>>(),
        );
        assert!(err.contains("-s"), "{err}");
    }
    let mut steps = vec![dom.backup(Tool::Vmback, "full", &set, &["-S"])];
    assert_eq!(state(&dom), "shut off", "-S left the domain running");
    assert_eq!(steps[0].files["vda"], "vda.full.data", "a full, not a copy");
    assert_eq!(cpt_list(&set, name), ["virtnbdbackup.0"]);
    assert_eq!(dom.checkpoints(), ["virtnbdbackup.0".to_owned()].into());
    // The chain goes on: offline from the checkpoint's bitmap, and again through -S.
    some_writes(&dom, 1);
    steps.push(dom.backup(Tool::Vmback, "inc", &set, &[]));
    some_writes(&dom, 2);
    steps.push(dom.backup(Tool::Vmback, "inc", &set, &["-S"]));
    assert_eq!(state(&dom), "shut off");
    assert_eq!(steps[2].files["vda"], "vda.inc.virtnbdbackup.1.data");
    assert_eq!(cpt_list(&set, name), ["virtnbdbackup.0", "virtnbdbackup.1"]);
    check_set(&set, &steps);
    chain::check_upstream(&set, name, &steps);
    chain::check_vmback_restore(&steps);
}

#[test]
fn startonly_leaves_a_job_for_other_tools_a_second_run_is_refused_and_killonly_ends_it() {
    if !stack() {
        return;
    }
    let name = "vmback-t-startonly";
    let mut dom = Dom::new(name, vec![disk("vda", 64 * MIB)], false);
    dom.writes("vda", &[pat(0x31, 0, MIB), pat(0x32, 40 * MIB, 5 * MIB + 512)]);
    let truth = dom.truth();
    let root = tempdir(name);
    let socket = root.path().join("nbd.sock");
    let out = vmback_ok(&[
        "backup",
        "-d",
        name,
        "-l",
        "copy",
        "-o",
        path_str(&root.path().join("s")),
        "-s",
        "-f",
        path_str(&socket),
    ]);
    let uri = format!("nbd+unix:///vda?socket={}", socket.display());
    assert_eq!(out.trim(), format!("vda: {uri}"));
    assert!(dom.has_job(), "-s left no job");

    // Other tools read the export.
    let size = support::run_ok("nbdinfo", &["--size", &uri]);
    assert_eq!(size.trim(), (64 * MIB).to_string());
    let raw = root.path().join("vda.raw");
    support::run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, path_str(&raw)]);
    crate::common::compare::assert_same(&raw, &truth["vda"], "qemu-img convert of the -s export");

    // A second run while the job is active: exit 1, naming the job; nothing is ended.
    let err =
        support::vmback_fails(&["backup", "-d", name, "-l", "copy", "-o", path_str(&root.path().join("t"))]);
    assert!(err.contains("active backup job") && err.contains(path_str(&socket)), "{err}");
    assert!(err.contains("-k"), "{err}");
    assert!(dom.has_job(), "the refused run ended the job");

    // -k ends it; again there is nothing to end.
    let kdir = root.path().join("k");
    let k = ["backup", "-d", name, "-o", path_str(&kdir), "-k"];
    assert_eq!(vmback_ok(&k).trim(), format!("{name}: backup job ended"));
    assert!(dom.no_job(), "-k left the job running");
    assert_eq!(vmback_ok(&k).trim(), format!("{name}: no backup job"));
    let step = dom.backup(Tool::Vmback, "copy", &root.path().join("t"), &[]);
    check_set(&root.path().join("t"), std::slice::from_ref(&step));
    chain::check_vmback_restore(&[step]);
}

/// A stream file's bytes after its metadata, and the metadata without its date.
fn body_and_meta(path: &Path) -> (Vec<u8>, serde_json::Value) {
    let bytes = std::fs::read(path).expect("read stream");
    let len = usize::from_str_radix(std::str::from_utf8(&bytes[22..38]).expect("header"), 16).expect("hex");
    let mut meta = support::stream_meta(path);
    meta.as_object_mut().expect("object").remove("date");
    (bytes[40 + len..].to_vec(), meta)
}

#[test]
fn qemu_extents_give_the_same_bytes_online_and_offline() {
    if !stack() {
        return;
    }
    let name = "vmback-t-qemu";
    let mut dom = Dom::new(name, vec![disk("vda", 64 * MIB), disk("vdb", 64 * MIB)], true);
    some_writes(&dom, 0);
    let root = tempdir(name);
    let set = root.path().join("set");
    let mut steps = vec![dom.backup(Tool::Vmback, "full", &set, &["-q"])];
    some_writes(&dom, 1);
    steps.push(dom.backup(Tool::Vmback, "inc", &set, &["-q", "--no-sparse-detection"]));
    dom.shut_off();
    some_writes(&dom, 2);
    // -f: the offline disks' qemu-nbd listen on PATH.<disk>.
    let sock = root.path().join("off.sock");
    steps.push(dom.backup(Tool::Vmback, "inc", &set, &["--qemu", "-f", path_str(&sock)]));
    // Copies with and without -q, online (started again) and offline: the same streams.
    for (i, running) in [false, true].into_iter().enumerate() {
        if running {
            dom.start();
        }
        let (a, b) = (root.path().join(format!("a{i}")), root.path().join(format!("b{i}")));
        steps.push(dom.backup(Tool::Vmback, "copy", &a, &[]));
        steps.push(dom.backup(Tool::Vmback, "copy", &b, &["-q"]));
        for d in ["vda", "vdb"] {
            let f = format!("{d}.copy.data");
            assert_eq!(body_and_meta(&a.join(&f)), body_and_meta(&b.join(&f)), "{f}, running: {running}");
        }
    }
    check_set(&set, &steps);
    chain::check_vmback_restore(&steps);
}

/// A syslog of the test's own: a datagram socket at /dev/log while `run` runs (when the
/// machine has no /dev/log), or bound over it in a mount namespace of `run`'s own (when
/// it has one: `run` gets the path to bind). Returns the messages it received.
fn with_syslog(dir: &Path, run: impl FnOnce(Option<&Path>)) -> Vec<String> {
    let dev_log = Path::new("/dev/log");
    let (sock_path, own_dev_log) =
        if dev_log.exists() { (dir.join("log.sock"), false) } else { (dev_log.to_path_buf(), true) };
    let sock = UnixDatagram::bind(&sock_path).expect("bind the syslog socket");
    sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    run((!own_dev_log).then_some(sock_path.as_path()));
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(text(&buf[..n]));
    }
    if own_dev_log {
        let _ = std::fs::remove_file(dev_log);
    }
    got
}

/// `vmback ARGS`, with `/dev/log` bound to `bind` in a mount namespace of its own if given.
fn vmback_with_dev_log(bind: Option<&Path>, args: &[&str]) -> Output {
    match bind {
        None => Command::new(VMBACK).args(args).output().expect("run vmback"),
        Some(sock) => Command::new("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount --bind \"$0\" /dev/log && exec \"$@\"",
            ])
            .arg(sock)
            .arg(VMBACK)
            .args(args)
            .output()
            .expect("run unshare"),
    }
}

#[test]
fn logfile_syslog_quiet_verbose_and_noprogress() {
    if !stack() {
        return;
    }
    let name = "vmback-t-logs";
    let dom = Dom::new(name, vec![disk("vda", 64 * MIB)], false);
    dom.writes("vda", &[pat(0x41, MIB, 2 * MIB)]);
    resume(&dom);
    let root = tempdir(name);
    let set = |s: &str| -> PathBuf { root.path().join(s) };

    // --logfile (upstream's name; --log-file too) gets the lines, stderr none of them.
    let log = root.path().join("backup.log");
    let o = backup(&dom, "copy", &set("file"), &["--logfile", path_str(&log)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(o.stderr.is_empty(), "{}", text(&o.stderr));
    let lines = std::fs::read_to_string(&log).expect("log file");
    assert!(lines.contains("WARN") && lines.contains("guest agent"), "{lines}");

    // --quiet: nothing on stderr, and the warning still counts for -e.
    let o = backup(&dom, "copy", &set("quiet"), &["--quiet", "-e"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stderr.is_empty(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("Copy backup of"), "{}", text(&o.stdout));

    // -v: debug lines (the job's XML).
    let o = backup(&dom, "copy", &set("verbose"), &["-v"]);
    assert!(
        o.status.success() && text(&o.stderr).contains("DEBUG") && text(&o.stderr).contains("<domainbackup")
    );
    let o = backup(&dom, "copy", &set("plain"), &[]);
    assert!(o.status.success() && !text(&o.stderr).contains("DEBUG"), "{}", text(&o.stderr));

    // -L: the lines reach syslog (/dev/log), with vmback's name and PID.
    let out = set("syslog");
    let got = with_syslog(root.path(), |bind| {
        let args = ["backup", "-d", name, "-l", "copy", "-o", path_str(&out), "-L", "--quiet"];
        let o = vmback_with_dev_log(bind, &args);
        assert!(o.status.success(), "{}", text(&o.stderr));
    });
    let ours: Vec<&String> = got.iter().filter(|m| m.contains("vmback[")).collect();
    assert!(ours.iter().any(|m| m.contains("guest agent") && m.starts_with("<12>")), "{got:?}");

    // -n: no progress bars on a terminal (script(1) gives vmback one; stdout goes away).
    let bars = |extra: &str, sub: &str| -> String {
        let cmd = format!(
            "{VMBACK} backup -d {name} -l copy -o {} --log-level off {extra} >/dev/null",
            path_str(&set(sub))
        );
        support::run_ok("script", &["-qec", &cmd, "/dev/null"])
    };
    let with = bars("", "bars");
    assert!(with.contains("vda"), "no progress bar on a terminal: {with:?}");
    assert_eq!(bars("-n", "nobars").trim(), "", "-n still drew progress bars");
}
