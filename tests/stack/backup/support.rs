//! Helpers for the `vmback backup` tests: a libvirt domain of our own with qcow2 disks and
//! no guest OS, writes into its disks through HMP qemu-io (checked in the domain log),
//! the disks' true contents after each backup, running vmback and the upstream tools, and
//! comparing restored images with the truth.
//!
//! Every domain is named by its test (`vmback-t-...`), lives in a temp folder of its own
//! and is destroyed (and undefined, with its checkpoint metadata) when dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const VMBACK: &str = env!("CARGO_BIN_EXE_vmback");
pub const URI: &str = "qemu:///system";
pub const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// The stack.

/// Starts libvirtd (once per test binary) with contrib/realstack/libvirtd-up.sh. `false`
/// (after printing "skipping: ...") when libvirt cannot be started here.
pub fn stack() -> bool {
    static UP: OnceLock<Result<(), String>> = OnceLock::new();
    let up = UP.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/realstack/libvirtd-up.sh");
        match Command::new("bash").arg(&script).output() {
            Ok(o) if o.status.success() => {
                for tool in ["virtnbdbackup", "virtnbdrestore", "qemu-img", "qemu-io"] {
                    if !Command::new("sh")
                        .arg("-c")
                        .arg(format!("command -v {tool}"))
                        .stdout(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                    {
                        return Err(format!("{tool} is not installed"));
                    }
                }
                Ok(())
            }
            Ok(o) => Err(format!(
                "libvirtd-up.sh failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run {}: {e}", script.display())),
        }
    });
    match up {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipping: libvirt cannot be started here: {e}");
            false
        }
    }
}

/// `virsh -q -c qemu:///system ARGS`.
pub fn virsh(args: &[&str]) -> Output {
    Command::new("virsh").arg("-q").arg("-c").arg(URI).args(args).output().expect("run virsh")
}

pub fn virsh_ok(args: &[&str]) -> String {
    let o = virsh(args);
    assert!(o.status.success(), "virsh {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------
// Domains.

/// One disk of a test domain.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub target: &'static str,
    pub size: u64,
    /// qcow2 `compat=`: 1.1 (v3, can hold bitmaps) or 0.10 (v2, cannot).
    pub compat: &'static str,
}

pub fn disk(target: &'static str, size: u64) -> DiskSpec {
    DiskSpec { target, size, compat: "1.1" }
}

/// The true contents of each disk at one moment: disk -> sparse raw image.
pub type Truth = BTreeMap<String, PathBuf>;

/// A libvirt domain with no guest OS (started paused), qcow2 disks in a temp folder.
pub struct Dom {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub disks: Vec<DiskSpec>,
    persistent: bool,
    running: bool,
    qom: BTreeMap<String, String>,
    log: PathBuf,
    truths: usize,
    xml_file: PathBuf,
}

/// The domain type that starts here: kvm when /dev/kvm works, else qemu (TCG).
fn domain_types() -> Vec<&'static str> {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if kvm { vec!["kvm", "qemu"] } else { vec!["qemu"] }
}

/// Destroys and undefines a domain of this name, whatever state it is in.
fn remove_domain(name: &str) {
    if virsh(&["dominfo", name]).status.success() {
        let _ = virsh(&["destroy", name]);
        if virsh(&["dominfo", name]).status.success() {
            let o = virsh(&["undefine", "--checkpoints-metadata", name]);
            if !o.status.success() {
                let _ = virsh(&["undefine", name]);
            }
        }
    }
}

impl Dom {
    /// Creates the disks and starts the domain paused: transient (`virsh create`) or
    /// persistent (`virsh define` + `virsh start`).
    pub fn new(name: &str, disks: Vec<DiskSpec>, persistent: bool) -> Dom {
        remove_domain(name);
        let dir = tempdir(name);
        for sub in ["disks", "truth", "src"] {
            std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        for d in &disks {
            let img = dir.path().join("disks").join(format!("{}.qcow2", d.target));
            run_ok(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("compat={}", d.compat),
                    path_str(&img),
                    &d.size.to_string(),
                ],
            );
        }
        let mut dom = Dom {
            name: name.to_owned(),
            dir,
            disks,
            persistent,
            running: false,
            qom: BTreeMap::new(),
            log: PathBuf::from(format!("/var/log/libvirt/qemu/{name}.log")),
            truths: 0,
            xml_file: PathBuf::new(),
        };
        let mut last_err = String::new();
        for t in domain_types() {
            let xml = dom.dir.path().join(format!("domain-{t}.xml"));
            std::fs::write(&xml, dom.xml(t)).expect("write domain xml");
            let o = if persistent {
                let o = virsh(&["define", path_str(&xml)]);
                if !o.status.success() {
                    last_err = String::from_utf8_lossy(&o.stderr).into_owned();
                    continue;
                }
                let o = virsh(&["start", "--paused", name]);
                if !o.status.success() {
                    let _ = virsh(&["undefine", "--checkpoints-metadata", name]);
                }
                o
            } else {
                virsh(&["create", path_str(&xml), "--paused"])
            };
            if o.status.success() {
                dom.running = true;
                dom.xml_file = xml;
                dom.find_qom();
                return dom;
            }
            last_err = String::from_utf8_lossy(&o.stderr).into_owned();
        }
        panic!("cannot start domain {name}: {last_err}");
    }

    fn xml(&self, typ: &str) -> String {
        // A fixed uuid (from the name): a transient domain created again is the same domain,
        // and libvirt redefines checkpoints only for the domain uuid they were made on.
        let h = self
            .name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let mut x = format!(
            "<domain type='{typ}'><name>{}</name><uuid>5eed0000-0000-4000-8000-{:012x}</uuid>\
             <memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type></os><devices>",
            self.name,
            h & 0xffff_ffff_ffff
        );
        for d in &self.disks {
            x.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>\
                 <source file='{}'/><target dev='{}' bus='virtio'/></disk>",
                self.image(d.target).display(),
                d.target
            ));
        }
        x.push_str("<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>");
        x
    }

    /// The QOM path of each disk's virtio backend, from `info block` ("Attached to:").
    fn find_qom(&mut self) {
        let info = virsh_ok(&["qemu-monitor-command", &self.name, "--hmp", "info block"]);
        self.qom.clear();
        for d in &self.disks {
            let img = self.image(d.target);
            let key = format!("{} (", img.display());
            let mut hit = false;
            for line in info.lines() {
                if line.contains(&key) {
                    hit = true;
                } else if hit && line.trim_start().starts_with("Attached to:") {
                    let path = line.split_whitespace().nth(2).expect("Attached to: PATH");
                    self.qom.insert(d.target.to_owned(), path.to_owned());
                    break;
                }
            }
            assert!(self.qom.contains_key(d.target), "no 'Attached to:' for {} in:\n{info}", d.target);
        }
    }

    pub fn image(&self, target: &str) -> PathBuf {
        self.dir.path().join("disks").join(format!("{target}.qcow2"))
    }

    pub fn size(&self, target: &str) -> u64 {
        self.disks.iter().find(|d| d.target == target).expect("disk of the domain").size
    }

    pub fn targets(&self) -> Vec<&'static str> {
        self.disks.iter().map(|d| d.target).collect()
    }

    /// Destroys a transient domain and creates it again from the same XML: libvirt forgets
    /// its checkpoints, the images keep their bitmaps.
    pub fn recreate(&mut self) {
        assert!(!self.persistent && self.running);
        for d in self.targets() {
            self.qio(d, "flush");
        }
        virsh_ok(&["destroy", &self.name]);
        let xml = self.xml_file.clone();
        virsh_ok(&["create", path_str(&xml), "--paused"]);
        self.find_qom();
    }

    /// Starts a shut-off persistent domain again (paused).
    pub fn start(&mut self) {
        assert!(!self.running);
        virsh_ok(&["start", "--paused", &self.name]);
        self.running = true;
        self.find_qom();
    }

    /// Shuts the (persistent) domain off; qemu stores the bitmaps in the images on exit.
    pub fn shut_off(&mut self) {
        assert!(self.persistent, "a transient domain disappears when shut off");
        for d in self.targets() {
            self.qio(d, "flush");
        }
        virsh_ok(&["destroy", &self.name]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while virsh_ok(&["domstate", &self.name]).trim() != "shut off" {
            assert!(Instant::now() < deadline, "{} did not shut off", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
        self.running = false;
    }

    /// Runs one qemu-io command on a disk: through HMP while the domain runs (qemu-io
    /// prints into the domain log, not the reply, so the log is checked for the I/O),
    /// on the image itself while it is shut off.
    pub fn qio(&self, target: &str, cmd: &str) {
        if !self.running {
            let img = self.image(target);
            let o = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", cmd, path_str(&img)])
                .output()
                .expect("run qemu-io");
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && (cmd == "flush" || out.contains("wrote ") || out.contains("discard ")),
                "qemu-io {cmd} on {}: {out}{}",
                img.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(!out.contains("failed"), "qemu-io {cmd}: {out}");
            return;
        }
        let before = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let hmp = format!("qemu-io -d {} \"{cmd}\"", self.qom[target]);
        let reply = virsh_ok(&["qemu-monitor-command", &self.name, "--hmp", &hmp]);
        assert!(reply.trim().is_empty(), "qemu-io on {target}: {cmd}: unexpected reply: {reply}");
        if cmd == "flush" {
            return;
        }
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let (off, len) = (words[words.len() - 2], words[words.len() - 1]);
        let want = [
            format!("wrote {len}/{len} bytes at offset {off}"),
            format!("discard {len}/{len} bytes at offset {off}"),
        ];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut f = File::open(&self.log).expect("domain log");
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(before)).expect("seek domain log");
            let mut all = Vec::new();
            f.read_to_end(&mut all).expect("read domain log");
            let new = String::from_utf8_lossy(&all).into_owned();
            if new.lines().any(|l| want.iter().any(|w| l == w)) {
                return;
            }
            let lower = new.to_lowercase();
            if lower.contains("error") || lower.contains("failed") || lower.contains("invalid") {
                panic!("qemu-io on {target}: {cmd}: the domain log says: {new}");
            }
            assert!(Instant::now() < deadline, "qemu-io on {target} did not confirm {cmd:?}; log: {new}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs qemu-io commands on one disk, then flushes it.
    pub fn writes(&self, target: &str, cmds: &[String]) {
        for c in cmds {
            self.qio(target, c);
        }
        self.qio(target, "flush");
    }

    /// Records every disk's true contents now (sparse raw images).
    pub fn truth(&mut self) -> Truth {
        self.truths += 1;
        let mut t = Truth::new();
        for d in self.targets() {
            if self.running {
                self.qio(d, "flush");
            }
            let raw = self.dir.path().join("truth").join(format!("{:02}-{d}.raw", self.truths));
            run_ok("qemu-img", &["convert", "-U", "-O", "raw", path_str(&self.image(d)), path_str(&raw)]);
            t.insert(d.to_owned(), raw);
        }
        t
    }

    /// The domain's checkpoints, by name.
    pub fn checkpoints(&self) -> BTreeSet<String> {
        virsh_ok(&["checkpoint-list", "--name", &self.name])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Whether the domain has a job (a backup job left by a killed run).
    pub fn has_job(&self) -> bool {
        let o = virsh_ok(&["domjobinfo", &self.name]);
        o.lines().any(|l| l.starts_with("Job type:") && !l.contains("None"))
    }

    /// Whether the domain has no job, at the latest a few seconds from now: libvirt may
    /// still be winding a just-ended job down when vmback exits (seen on a busy machine).
    pub fn no_job(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        let start = Instant::now();
        while self.has_job() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if start.elapsed() > Duration::from_millis(100) {
            eprintln!("note: {}: the job took {:?} to end after vmback exited", self.name, start.elapsed());
        }
        true
    }

    /// A file of `len` bytes of 16-byte numbered lines `TAG:nnnnnnnnnnn\n` (TAG: 3
    /// characters), so every 16 bytes of a written range are distinct.
    pub fn src(&self, tag: &str, len: u64) -> String {
        assert_eq!(tag.len(), 3);
        let path = self.dir.path().join("src").join(format!("{tag}.bin"));
        let mut w = std::io::BufWriter::new(File::create(&path).expect("src file"));
        let mut left = len;
        let mut i = 0u64;
        while left > 0 {
            let line = format!("{tag}:{i:011}\n");
            let n = left.min(16) as usize;
            w.write_all(&line.as_bytes()[..n]).expect("write src");
            left -= n as u64;
            i += 1;
        }
        w.flush().expect("flush src");
        path_str(&path).to_owned()
    }

    /// A file of `len` pseudo-random (incompressible) bytes.
    pub fn noise(&self, tag: &str, len: u64, seed: u64) -> String {
        let path = self.dir.path().join("src").join(format!("{tag}.noise"));
        write_noise(&path, len, seed);
        path_str(&path).to_owned()
    }
}

impl Drop for Dom {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        if self.persistent {
            let _ = virsh(&["undefine", "--checkpoints-metadata", &self.name]);
        }
    }
}

/// `len` pseudo-random bytes (xorshift64*) into `path`.
pub fn write_noise(path: &Path, len: u64, seed: u64) {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, File::create(path).expect("noise file"));
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = len;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        for c in buf.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            c.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n]).expect("write noise");
        left -= n as u64;
    }
    w.flush().expect("flush noise");
}

// ---------------------------------------------------------------------------------------
// Running the tools.

pub use crate::common::cli::{run_ok, vmback};

/// `vmback ARGS`, which must succeed; returns its stdout.
pub fn vmback_ok(args: &[&str]) -> String {
    let o = vmback(args);
    crate::common::cli::assert_success("vmback", args, &o);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `vmback ARGS`, which must fail cleanly (exit 1, a message, no panic); returns stderr.
pub fn vmback_fails(args: &[&str]) -> String {
    let o = vmback(args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "vmback {args:?} should fail; stdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(o.status.code(), Some(1), "vmback {args:?}: exit status; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "vmback {args:?} panicked:\n{stderr}");
    assert!(stderr.contains("vmback: "), "vmback {args:?}: no error message:\n{stderr}");
    stderr
}

/// Which tool takes a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Vmback,
    Virtnbdbackup,
}

/// One backup run and what it saved.
#[derive(Debug, Clone)]
pub struct Step {
    pub tool: Tool,
    pub level: String,
    pub set: PathBuf,
    /// disk -> the data file this run wrote (file name in `set`).
    pub files: BTreeMap<String, String>,
    /// The disks' contents right after the run.
    pub truth: Truth,
}

/// `NAME.partial` beside `NAME`.
pub fn partial_of(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Data file names of `disk` in `dir` (final names only).
pub fn data_files(dir: &Path, disk: &str) -> BTreeSet<String> {
    names(dir).into_iter().filter(|n| n.starts_with(&format!("{disk}.")) && n.ends_with(".data")).collect()
}

impl Dom {
    /// Takes a backup with `tool` and records the files it wrote and the truth after it.
    pub fn backup(&mut self, tool: Tool, level: &str, set: &Path, extra: &[&str]) -> Step {
        let all = self.targets();
        self.backup_of(&all, tool, level, set, extra)
    }

    /// [`Dom::backup`] of a run that saves only `disks` (checked: no file for the others).
    pub fn backup_of(&mut self, disks: &[&str], tool: Tool, level: &str, set: &Path, extra: &[&str]) -> Step {
        let stamp = |d: &str| -> BTreeSet<(String, std::time::SystemTime)> {
            data_files(set, d)
                .into_iter()
                .map(|f| {
                    let t = std::fs::metadata(set.join(&f)).and_then(|m| m.modified()).expect("mtime");
                    (f, t)
                })
                .collect()
        };
        let before: BTreeMap<&str, BTreeSet<(String, std::time::SystemTime)>> =
            self.targets().into_iter().map(|d| (d, stamp(d))).collect();
        let out = path_str(set);
        match tool {
            Tool::Vmback => {
                let mut args = vec!["backup", "-d", &self.name, "-l", level, "-o", out];
                args.extend_from_slice(extra);
                vmback_ok(&args);
            }
            Tool::Virtnbdbackup => {
                let mut args = vec!["-d", &self.name, "-l", level, "-o", out, "-n"];
                args.extend_from_slice(extra);
                run_ok("virtnbdbackup", &args);
            }
        }
        let mut files = BTreeMap::new();
        for d in self.targets().into_iter().filter(|d| !disks.contains(d)) {
            assert!(stamp(d) == before[d], "{tool:?} {level}: wrote a file of {d}, which it should not save");
        }
        for d in disks.iter().copied() {
            // New files, or files rewritten by this run.
            let new: Vec<String> = stamp(d).difference(&before[d]).map(|(f, _)| f.clone()).collect();
            assert_eq!(
                new.len(),
                1,
                "{tool:?} {level}: expected one new {d} data file in {}, got {new:?}",
                set.display()
            );
            files.insert(d.to_owned(), new[0].clone());
        }
        let mut truth = self.truth();
        truth.retain(|d, _| disks.contains(&d.as_str()));
        Step { tool, level: level.to_owned(), set: set.to_owned(), files, truth }
    }
}

// ---------------------------------------------------------------------------------------
// Looking at sets.

/// Names in a folder (files and folders), sorted.
/// Every regular file under `dir` (relative path -> contents).
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read_dir").map(|e| e.expect("entry")) {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("under root").to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// Regular files anywhere under `dir`.
pub fn regular_files(dir: &Path) -> Vec<String> {
    if !dir.exists() {
        return Vec::new();
    }
    snapshot(dir).into_keys().collect()
}

/// `<domain>.cpt` of a set.
pub fn cpt_list(set: &Path, domain: &str) -> Vec<String> {
    let text = std::fs::read_to_string(set.join(format!("{domain}.cpt"))).expect("read .cpt");
    serde_json::from_str(&text).expect(".cpt is a JSON list")
}

/// The metadata JSON of a stream file.
pub fn stream_meta(path: &Path) -> Value {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut hdr = [0u8; 40];
    f.read_exact(&mut hdr).expect("header");
    let hdr = std::str::from_utf8(&hdr).expect("ASCII header");
    assert!(
        hdr.starts_with("meta 0000000000000000 ") && hdr.ends_with("\r\n"),
        "{}: {hdr:?}",
        path.display()
    );
    let len = u64::from_str_radix(&hdr[22..38], 16).expect("hex length");
    let mut json = vec![0u8; len as usize];
    f.read_exact(&mut json).expect("meta JSON");
    serde_json::from_slice(&json).expect("meta JSON parses")
}

/// Adler-32 (zlib) of a whole file, computed here independently of vmback.
pub fn adler32(path: &Path) -> u32 {
    const MOD: u32 = 65521;
    let (mut a, mut b) = (1u32, 0u32);
    let mut f = File::open(path).expect("open for adler32");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return (b << 16) | a;
        }
        for chunk in buf[..n].chunks(5552) {
            for &x in chunk {
                a += u32::from(x);
                b += a;
            }
            a %= MOD;
            b %= MOD;
        }
    }
}

/// The checks every set gets: `vmback verify` passes; every `.chksum` sidecar holds the
/// file's Adler-32 in decimal; every stream file vmback wrote has one.
pub fn check_set(set: &Path, steps: &[Step]) {
    let o = vmback(&["verify", path_str(set)]);
    assert!(
        o.status.success(),
        "vmback verify {} failed:\n{}{}",
        set.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    for n in names(set).into_iter().filter(|n| n.ends_with(".data")) {
        let side = set.join(format!("{n}.chksum"));
        if let Ok(text) = std::fs::read_to_string(&side) {
            assert!(
                !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()),
                "{}: {text:?}",
                side.display()
            );
            let want: u32 = text.parse().expect("decimal");
            assert_eq!(
                adler32(&set.join(&n)),
                want,
                "{}: Adler-32 does not match its sidecar",
                set.join(&n).display()
            );
        }
    }
    for s in steps.iter().filter(|s| s.tool == Tool::Vmback && s.set == set) {
        for f in s.files.values() {
            let is_stream = std::fs::read(set.join(f)).is_ok_and(|b| b.starts_with(b"meta "));
            if is_stream {
                assert!(set.join(format!("{f}.chksum")).exists(), "{f}: no .chksum sidecar");
            }
        }
    }
}

/// The `<domain>/<point>` of `set` whose chain for `disk` ends in `data_file`.
pub fn point_of(ls: &Value, set: &Path, disk: &str, data_file: &str) -> Option<String> {
    for d in ls["domains"].as_array()? {
        for p in d["points"].as_array()? {
            if Path::new(p["set"].as_str()?) != set {
                continue;
            }
            for dk in p["disks"].as_array()? {
                if dk["disk"] == disk && dk["files"].as_array()?.last()? == data_file {
                    return Some(format!("{}/{}", d["name"].as_str()?, p["name"].as_str()?));
                }
            }
        }
    }
    None
}

/// The `<domain>/<point>` of `step` (the same for all its disks).
pub fn point_name(ls: &Value, step: &Step) -> String {
    let mut found = BTreeSet::new();
    for (disk, f) in &step.files {
        let p = point_of(ls, &step.set, disk, f)
            .unwrap_or_else(|| panic!("no restore point of {} ends in {f}:\n{ls:#}", step.set.display()));
        found.insert(p);
    }
    assert_eq!(found.len(), 1, "{:?}: the disks' files are in different points: {found:?}", step.files);
    found.into_iter().next().expect("one")
}

// ---------------------------------------------------------------------------------------
// Comparing images.

pub use crate::common::compare::{assert_same, first_difference, to_raw};
pub use crate::common::{ls_json, names, path_str, tempdir};

/// Runs jobs on up to `n` threads; a panic in any is re-raised.
pub fn parallel(n: usize, jobs: Vec<Box<dyn FnOnce() + Send + '_>>) {
    let queue = Mutex::new(jobs);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    loop {
                        let job = queue.lock().expect("queue").pop();
                        match job {
                            Some(j) => j(),
                            None => break,
                        }
                    }
                })
            })
            .collect();
        let mut failed = None;
        for h in handles {
            if let Err(e) = h.join() {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            std::panic::resume_unwind(e);
        }
    });
}

/// `virtnbdrestore -i SET -o OUT ARGS` into a fresh folder; returns the folder. (It exits
/// 0 even when a file fails to apply, so callers compare the result with the truth.)
/// Retried when it gave up on its own qemu-nbd: 1.9.15 connects once, one second after
/// starting it, and fails if the socket is not there yet (which happens on a busy machine).
pub fn virtnbdrestore(set: &Path, args: &[&str]) -> tempfile::TempDir {
    for attempt in 1.. {
        let out = tempdir("virtnbdrestore");
        let target = out.path().join("out");
        let log = out.path().join("virtnbdrestore.log");
        let mut all = vec!["-n", "-L", path_str(&log), "-i", path_str(set), "-o", path_str(&target)];
        all.extend_from_slice(args);
        let o = Command::new("virtnbdrestore").args(&all).output().expect("run virtnbdrestore");
        let stderr = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            return out;
        }
        assert!(
            attempt < 4 && stderr.contains("Unable to connect nbd server"),
            "virtnbdrestore {all:?} failed ({}):\n{stderr}",
            o.status
        );
    }
    unreachable!()
}

/// The image virtnbdrestore wrote for `disk` in `out/out`: `<basename of the source>`
/// (whole chain, --until) or `<disk>` (--sequence).
pub fn restored_image(out: &Path, disk: &str) -> PathBuf {
    let dir = out.join("out");
    for n in [format!("{disk}.qcow2"), disk.to_owned()] {
        if dir.join(&n).exists() {
            return dir.join(n);
        }
    }
    panic!("virtnbdrestore wrote no image of {disk} in {}: {:?}", dir.display(), names(&dir));
}

/// Restores with virtnbdrestore and compares every restored disk of `want` with it.
pub fn check_virtnbdrestore(set: &Path, args: &[&str], want: &Truth, what: &str) {
    let out = virtnbdrestore(set, args);
    for (disk, truth) in want {
        let img = restored_image(out.path(), disk);
        let raw = out.path().join(format!("{disk}.raw"));
        to_raw(&img, &raw);
        assert_same(&raw, truth, &format!("virtnbdrestore {args:?} ({what}), disk {disk}"));
    }
}

pub use crate::common::quick_mount::Mount;

/// A real FUSE mount of `vmback mount SOURCE MNT` (vmback's stderr discarded), unmounted
/// when dropped.
pub fn mount(source: &Path) -> Mount {
    crate::common::quick_mount::mount_on(source, tempdir("mnt"), Stdio::null())
}
