//! `vmback restore`, `dump` and `verify`: the restore flags (turned into the library's
//! [`RestoreOptions`] and a [`What`]), the action they ask for, choosing what to restore
//! (the restore plan: a restore point of the catalog, or a `--sequence` of files),
//! progress, summaries.
//!
//! The action follows virtnbdrestore: `-a dump|restore|verify`, and an output named
//! `dump` or `verify` with the default action means that action (its `-o dump`), so a
//! restore never writes into a folder of either name.
//!
//! So do the rest of the flags: `-r/--raw` (raw-format disks are copied as they are, and
//! only with it), `-c` (the domain XML written is adjusted to the restored VM), `-D`
//! (defined in libvirt at `-U`; implies `-c`), `-N` (its name), `-C` (the name of the
//! XML file written), `-A` and `--compress`; `--sequence` turns `-c`/`-D` off, as
//! upstream does. Images are named as upstream names them (`restore::rebuild`).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::Result;
use super::cores;
use super::ls::{human, status_words};
use crate::cache::ReadCache;
use tracing::{info, warn};

use crate::backup::domxml::{DomDisk, disks};
use crate::backup::host::{Host, LocalHost};
use crate::backup::remote::RemoteOptions;
use crate::catalog::{BootFile, Catalog, Status};
use crate::chain::{ImageReader, Layer, StreamIndex};
use crate::restore::rebuild::{define, image_name, qcow2_options, restore_boot_files};
use crate::restore::remote::RemoteTarget;
use crate::restore::vmconfig::{Adjust, RestoredDisk, adjust};
use crate::restore::{Format, RestoreOptions, Sparse, restore_image, verify::verify as verify_catalog};
use crate::source::SourcePath;

/// What `vmback restore` does (virtnbdrestore's `-a`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Action {
    /// Print the metadata of every stream file as JSON.
    Dump,
    /// Rebuild disk images into the output.
    Restore,
    /// Read every stream file and check its `.chksum`; exits 1 on damage.
    Verify,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// What to do: restore, dump (metadata as JSON) or verify (as `vmback verify`).
    #[arg(short = 'a', long = "action", value_enum, default_value = "restore")]
    pub action: Action,
    /// The backup set (or a folder tree of sets; then --domain may be needed).
    #[arg(short = 'i', long = "input")]
    pub input: PathBuf,
    /// Output folder (created if missing) or a block device (with -d); `dump` or `verify`
    /// instead ask for that action, as with virtnbdrestore. Not needed by -a dump|verify.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// The restore point, named as `vmback ls` and the mount show it (a bare checkpoint
    /// name such as virtnbdbackup.2 works when it is unique).
    #[arg(short = 'u', long)]
    pub until: Option<String>,
    /// Restore only this disk (e.g. sda).
    #[arg(short = 'd', long = "disk")]
    pub disk: Option<String>,
    /// Apply exactly these stream files (relative to -i), in this order.
    #[arg(short = 's', long, value_delimiter = ',')]
    pub sequence: Vec<PathBuf>,
    /// Output image format [default: the disk's own, as virtnbdrestore writes it: qcow2
    /// for a qcow2 disk]; the image's name then says the format written.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Leave holes (always), or write zeros over them (never: for block devices).
    #[arg(long, value_enum, default_value = "always")]
    pub sparse: Sparse,
    /// The domain, when the input holds several.
    #[arg(long)]
    pub domain: Option<String>,
    /// Worker threads per disk [default: one per core].
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bars (there are none anyway when stderr is not a terminal).
    #[arg(short = 'n', long = "noprogress")]
    pub no_progress: bool,
    /// Log debug lines too (as --log-level debug; --log-level wins).
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
    /// virtnbdrestore's -L: the log into FILE (as the global --log-file/--logfile).
    #[arg(short = 'L', value_name = "FILE")]
    pub restore_log: Option<PathBuf>,
    /// Accepted for virtnbdrestore's scripts: its local qemu-nbd socket. vmback writes
    /// local images directly and serves no NBD socket, so there is nothing to name.
    #[arg(short = 'f', long = "socketfile", value_name = "PATH")]
    pub socketfile: Option<PathBuf>,
    /// Restore raw-format disks too, copied as they are (and keep them in the adjusted
    /// domain XML); without it they are left out, as virtnbdrestore leaves them.
    #[arg(short = 'r', long)]
    pub raw: bool,
    /// Adjust the domain XML written to the output: new name, no UUID, disks and boot
    /// files at their restored paths, no backing chains, no cdrom/floppy/lun.
    #[arg(short = 'c', long = "adjust-config")]
    pub adjust_config: bool,
    /// Define the restored VM in libvirt (implies -c).
    #[arg(short = 'D', long)]
    pub define: bool,
    /// The restored VM's name [default: restore_<name>].
    #[arg(short = 'N', long)]
    pub name: Option<String>,
    /// The name of the domain XML file written into the output.
    #[arg(short = 'C', long = "config-file", default_value = "vmconfig.xml")]
    pub config_file: String,
    /// libvirt URI the VM is defined at (-D).
    #[arg(short = 'U', long, default_value = "qemu:///system")]
    pub uri: String,
    /// Preallocate the images (qcow2 preallocation=full; raw: every block allocated).
    #[arg(short = 'A', long)]
    pub preallocate: bool,
    /// Write qcow2 with compressed clusters (qemu-img's compression).
    #[arg(long)]
    pub compress: bool,
    /// With a -U naming another host, the images, boot files and XML are written there.
    #[command(flatten)]
    pub remote: super::backup::RemoteArgs,
}

impl RestoreArgs {
    /// The action asked for: `-a`, or with the default action an output named `dump` or
    /// `verify` (virtnbdrestore's rule).
    pub fn action(&self) -> Action {
        match (self.action, self.output.as_deref().and_then(Path::to_str)) {
            (Action::Restore, Some("dump")) => Action::Dump,
            (Action::Restore, Some("verify")) => Action::Verify,
            (action, _) => action,
        }
    }
}

impl From<&RestoreArgs> for RestoreOptions {
    fn from(a: &RestoreArgs) -> RestoreOptions {
        RestoreOptions {
            format: a.format.unwrap_or(Format::Qcow2),
            sparse: a.sparse,
            threads: a.threads.unwrap_or_else(cores),
            compress: a.compress,
            preallocate: a.preallocate,
            qcow2_options: Vec::new(),
        }
    }
}

impl From<&RestoreArgs> for What {
    fn from(a: &RestoreArgs) -> What {
        What {
            until: a.until.clone(),
            disk: a.disk.clone(),
            sequence: a.sequence.clone(),
            domain: a.domain.clone(),
            format: a.format,
            raw: a.raw,
        }
    }
}

/// What becomes of the VM beyond its disks.
pub struct Machine {
    pub adjust: bool,
    pub define: bool,
    pub name: Option<String>,
    pub config_file: String,
    pub uri: String,
    pub raw: bool,
    /// How the host of a remote `uri` is reached (restored onto).
    pub remote: RemoteOptions,
}

impl From<&RestoreArgs> for Machine {
    fn from(a: &RestoreArgs) -> Machine {
        let sequence = !a.sequence.is_empty();
        Machine {
            adjust: (a.adjust_config || a.define) && !sequence,
            define: a.define && !sequence,
            name: a.name.clone(),
            config_file: a.config_file.clone(),
            uri: a.uri.clone(),
            raw: a.raw,
            remote: RemoteOptions::from(&a.remote),
        }
    }
}

/// Runs `vmback restore` with the action it asks for.
pub fn run(a: &RestoreArgs) -> Result<ExitCode> {
    match (a.action(), &a.output) {
        (Action::Dump, _) => dump(&a.input),
        (Action::Verify, _) => verify(&a.input, false, a.threads.unwrap_or_else(cores)),
        (Action::Restore, Some(output)) => {
            let progress = !a.no_progress && std::io::stderr().is_terminal();
            if !a.sequence.is_empty() && (a.adjust_config || a.define) {
                warn!("--sequence: -c and -D are ignored, as virtnbdrestore ignores them");
            }
            let (what, opts, vm) = (What::from(a), RestoreOptions::from(a), Machine::from(a));
            restore(&a.input, output, &what, &opts, &vm, progress)
        }
        (Action::Restore, None) => Err("restore needs an output: -o FOLDER (or a block device)".into()),
    }
}

/// Cache for decoded frames during a restore: a few 32 MiB frames per worker, so two
/// workers inside one frame share its decode.
const RESTORE_CACHE: usize = 256 << 20;

/// Which images to restore.
pub struct What {
    pub until: Option<String>,
    pub disk: Option<String>,
    pub sequence: Vec<PathBuf>,
    pub domain: Option<String>,
    /// `--format`; `None`: each disk's own.
    pub format: Option<Format>,
    /// `--raw`: raw-format disks too, as they are.
    pub raw: bool,
}

/// One image to write: its disk name, chain, file name, format and qcow2 options.
struct Job {
    disk: String,
    layers: Vec<Layer>,
    name: String,
    format: Format,
    qcow2_options: Vec<String>,
}

/// What a restore point gives besides its disks.
#[derive(Default)]
struct Extras {
    vmconfig: Option<SourcePath>,
    boot_files: Vec<BootFile>,
    /// Upstream's `autostart.<ident>` was saved with the point.
    autostart: bool,
}

/// Restores the images `what` names into `output`, with progress bars when `progress`,
/// and then what `vm` asks for of the VM. When `vm.uri` names another host, `output` is
/// a folder there and everything is written there (`restore::remote`).
pub fn restore(
    input: &Path,
    output: &Path,
    what: &What,
    opts: &RestoreOptions,
    vm: &Machine,
    progress: bool,
) -> Result<ExitCode> {
    let (jobs, extras) = if what.sequence.is_empty() {
        from_catalog(input, what)?
    } else {
        (from_sequence(input, &what.sequence, what.format)?, Extras::default())
    };
    let remote = RemoteTarget::connect(&vm.uri, &vm.remote)?;
    let host: &dyn Host = remote.as_ref().map_or(&LocalHost, |r| r.host());
    let device = remote.is_none()
        && std::fs::metadata(output)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
    if device && jobs.len() != 1 {
        return Err(format!("{}: a block device takes one disk; choose it with -d", output.display()).into());
    }
    let output = match &remote {
        Some(r) => {
            r.make_dir(output)?;
            output.to_owned()
        }
        None => {
            if !device {
                std::fs::create_dir_all(output).map_err(|e| format!("{}: {e}", output.display()))?;
            }
            // The domain XML names files by absolute paths.
            std::path::absolute(output).map_err(|e| format!("{}: {e}", output.display()))?
        }
    };
    let output = &output;
    let cache = Arc::new(ReadCache::new(RESTORE_CACHE));
    let bars = MultiProgress::new();
    let mut failed = 0;
    let mut restored = HashMap::new();
    for job in jobs {
        let reader = ImageReader::new(job.layers, cache.clone());
        let target = if device { output.to_owned() } else { output.join(&job.name) };
        let bar = if progress {
            bars.add(ProgressBar::new(reader.map().data_bytes()))
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(job.disk.clone());
        let opts = RestoreOptions { format: job.format, qcow2_options: job.qcow2_options, ..opts.clone() };
        let done = |n| bar.inc(n);
        let result = match &remote {
            Some(r) => r.restore_image(&reader, &target, &opts, &done).map_err(|e| crate::error_chain(&e)),
            None => restore_image(&reader, &target, &opts, &done).map_err(|e| crate::error_chain(&e)),
        };
        match result {
            Ok(r) => {
                bar.finish();
                let secs = r.elapsed.as_secs_f64().max(1e-6);
                outln!(
                    "{}: {}{} ({} virtual, {} written, {} zeros left as holes) in {secs:.1} s, {}/s",
                    job.disk,
                    remote.as_ref().map_or_else(String::new, |_| format!("{}:", host.name())),
                    r.target.display(),
                    human(r.size),
                    human(r.stats.written),
                    human(r.stats.zero_skipped),
                    human(((r.stats.written + r.stats.zero_skipped) as f64 / secs) as u64),
                );
                let path = r.target.display().to_string();
                restored.insert(job.disk, RestoredDisk { path, format: job.format.extension().to_owned() });
            }
            Err(e) => {
                bar.abandon();
                eprintln!("{}: restore failed: {e}", job.disk);
                failed += 1;
            }
        }
    }
    if device {
        return Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    let boot = restore_boot_files(host, &extras.boot_files, output)?;
    if let Some(cfg) = &extras.vmconfig {
        let xml = cfg.source.read_whole(&cfg.path, crate::catalog::MAX_CONFIG)?;
        let xml = String::from_utf8(xml).map_err(|_| format!("{}: not UTF-8", cfg.shown().display()))?;
        let config_name = crate::catalog::naming::safe_component(&vm.config_file);
        let to = output.join(&config_name);
        let adjusted = if vm.adjust {
            let adj = Adjust {
                name: vm.name.clone(),
                disks: restored,
                keep_raw: vm.raw,
                boot_files: boot.into_iter().map(|(el, p)| (el, p.display().to_string())).collect(),
            };
            let a = adjust(&xml, &adj)?;
            for c in &a.changes {
                info!("domain XML: {c}");
            }
            Some(a)
        } else {
            None
        };
        host.write_new(&to, adjusted.as_ref().map_or(xml.as_bytes(), |a| a.xml.as_bytes()))?;
        outln!("domain XML: {}:{}", host.name(), to.display());
        if let Some(a) = adjusted.filter(|_| vm.define) {
            if failed > 0 {
                return Err(format!("{failed} disks failed; domain {} not defined", a.name).into());
            }
            define(&vm.uri, &vm.remote, &a.name, &a.xml, extras.autostart)?;
            outln!("defined domain {} ({})", a.name, vm.uri);
        }
    } else if vm.adjust {
        warn!("no domain XML was saved with this restore point; nothing to adjust or define");
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The disks of the chosen restore point, and what was saved with it.
fn from_catalog(input: &Path, what: &What) -> Result<(Vec<Job>, Extras)> {
    let catalog = Catalog::discover(input)?;
    let domain = catalog.domain(what.domain.as_deref())?;
    let point = match &what.until {
        Some(name) => domain.find_point(name).ok_or_else(|| {
            let names: Vec<&str> = domain.points.iter().map(|p| p.name.as_str()).collect();
            format!("no restore point {name:?} in {}; there are: {}", domain.name, names.join(", "))
        })?,
        None => domain.latest().ok_or_else(|| format!("{}: no restore point can be rebuilt", domain.name))?,
    };
    if let Status::Broken(reason) = point.status() {
        return Err(format!("{}: cannot be rebuilt: {reason}", point.name).into());
    }
    // The disks as the domain XML saved with the point has them: file and format.
    let dom_disks: HashMap<String, DomDisk> = match &point.vmconfig {
        Some(cfg) => {
            let xml = cfg.source.read_whole(&cfg.path, crate::catalog::MAX_CONFIG)?;
            disks(&String::from_utf8_lossy(&xml))
                .map_err(|e| format!("{}: {e}", cfg.shown().display()))?
                .into_iter()
                .map(|d| (d.target.clone(), d))
                .collect()
        }
        None => HashMap::new(),
    };
    let mut jobs = Vec::new();
    for d in point.disks.iter().filter(|d| what.disk.as_ref().is_none_or(|w| *w == d.disk)) {
        let dom = dom_disks.get(&d.disk);
        let meta_format = d.layers.first().map(|l| match l.index.format {
            crate::chain::Format::Raw => "raw".to_owned(),
            _ => l.index.meta.disk_format.clone().unwrap_or_else(|| "raw".to_owned()),
        });
        let original =
            Format::of_disk(dom.map(|x| x.format.clone()).or(meta_format).as_deref().unwrap_or("raw"));
        let raw_disk = dom.is_some_and(|x| x.format == "raw");
        if raw_disk && !what.raw {
            warn!("{}: raw-format disk left out (restore it with --raw)", d.disk);
            continue;
        }
        // A raw disk is copied as it is: raw, whatever --format says.
        let format = if raw_disk { Format::Raw } else { what.format.unwrap_or(original) };
        let name = image_name(dom.and_then(|x| x.source.as_deref()), &d.disk, original, format);
        // The image info saved with the point: `<disk>.<ident>.qcow.json` beside its XML.
        let qcow2_options = point
            .vmconfig
            .as_ref()
            .and_then(|cfg| {
                let json = cfg.path.with_file_name(format!("{}.{}.qcow.json", d.disk, ident_of(cfg)));
                cfg.source.read_whole(&json, crate::catalog::MAX_CONFIG).ok()
            })
            .map(|j| qcow2_options(&j))
            .unwrap_or_default();
        jobs.push(Job { disk: d.disk.clone(), layers: d.layers.clone(), name, format, qcow2_options });
    }
    if jobs.is_empty() {
        return Err(
            format!("{}: no disk {:?} to restore", point.name, what.disk.as_deref().unwrap_or("")).into()
        );
    }
    let mut names = std::collections::HashSet::new();
    for j in &mut jobs {
        // Two disks from files of one name in different folders: keep them apart.
        if !names.insert(j.name.clone()) {
            j.name = format!("{}-{}", j.disk, j.name);
            names.insert(j.name.clone());
        }
    }
    let autostart = point.vmconfig.as_ref().is_some_and(|cfg| {
        cfg.source.stat(&cfg.path.with_file_name(format!("autostart.{}", ident_of(cfg)))).is_ok()
    });
    Ok((jobs, Extras { vmconfig: point.vmconfig.clone(), boot_files: point.boot_files.clone(), autostart }))
}

/// The `<ident>` of a `vmconfig.<ident>.xml`, which names the files saved beside it.
fn ident_of(cfg: &SourcePath) -> String {
    let name = cfg.path.file_name().unwrap_or_default().to_string_lossy();
    crate::catalog::naming::config_ident(&name).unwrap_or_default().to_owned()
}

/// Exactly the listed files, in order (virtnbdrestore's `--sequence`): one image, named
/// after its disk as upstream names it, in the disk's format unless `format` says.
fn from_sequence(input: &Path, files: &[PathBuf], format: Option<Format>) -> Result<Vec<Job>> {
    let mut layers = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let path = input.join(f);
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if i == 0 && !(name.contains("full") || name.contains("copy")) {
            return Err(format!("{name}: a sequence starts with a full or copy backup").into());
        }
        let disk = name.split('.').next().unwrap_or_default().to_owned();
        let index = if i == 0 { StreamIndex::open(&path, &disk)? } else { StreamIndex::open_stream(&path)? };
        if let Some(d) = &index.damage {
            return Err(format!("damaged: {}", d.error).into());
        }
        layers.push(Layer { id: i as u32 + 1, index: Arc::new(index) });
    }
    let meta = &layers.last().ok_or("--sequence names no file")?.index.meta;
    let disk = crate::catalog::naming::safe_component(&meta.disk_name);
    let original = Format::of_disk(meta.disk_format.as_deref().unwrap_or("raw"));
    let format = format.unwrap_or(original);
    let name = image_name(None, &disk, original, format);
    Ok(vec![Job { disk, layers, name, format, qcow2_options: Vec::new() }])
}

/// Prints each stream file's metadata, as `virtnbdrestore -o dump` does.
pub fn dump(input: &Path) -> Result<ExitCode> {
    let catalog = Catalog::discover(input)?;
    let mut seen = std::collections::BTreeMap::new();
    for l in catalog.domains.iter().flat_map(|d| &d.points).flat_map(|p| &p.disks).flat_map(|d| &d.layers) {
        seen.entry(l.index.path.clone()).or_insert_with(|| l.index.clone());
    }
    let list: Vec<serde_json::Value> = seen
        .into_iter()
        .map(|(path, index)| {
            let mut v: serde_json::Value = serde_json::from_str(&index.meta.to_json()).expect("our own JSON");
            v["file"] = path.display().to_string().into();
            v
        })
        .collect();
    outln!("{}", serde_json::to_string_pretty(&list)?);
    Ok(ExitCode::SUCCESS)
}

pub fn verify(source: &Path, json: bool, threads: usize) -> Result<ExitCode> {
    let catalog = Catalog::discover(source)?;
    let report = verify_catalog(&catalog, threads);
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for f in &report.findings {
            let at = f.offset.map_or_else(String::new, |o| format!(" at offset {o}"));
            let range = f
                .disk_range
                .as_ref()
                .map_or_else(String::new, |r| format!("; disk bytes {}..{}", r.start, r.end));
            outln!("DAMAGED {}{at}: {}{range}; affects {}", f.file.display(), f.problem, f.points.join(", "));
        }
        let points = catalog.domains.iter().map(|d| d.points.len()).sum::<usize>();
        let bad: usize = catalog
            .domains
            .iter()
            .flat_map(|d| &d.points)
            .filter(|p| status_words(&p.status()).0 != "complete")
            .count();
        outln!(
            "{} files, {} of data read, {points} restore points ({bad} not complete), {} problems",
            report.files,
            human(report.data_bytes),
            report.findings.len()
        );
    }
    Ok(if report.findings.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn restore_args(args: &[&str]) -> RestoreArgs {
        let cli = Cli::try_parse_from(["vmback", "restore"].iter().chain(args)).expect("parses");
        let Command::Restore(a) = cli.command else { panic!("not a restore: {:?}", cli.command) };
        *a
    }

    /// virtnbdrestore's short flags work as its scripts write them.
    #[test]
    fn virtnbdrestore_short_flags() {
        let a =
            restore_args(&["-i", "in", "-o", "out", "-u", "virtnbdbackup.2", "-s", "a.full.data,b", "-n"]);
        assert_eq!(a.until.as_deref(), Some("virtnbdbackup.2"));
        assert_eq!(a.sequence, [PathBuf::from("a.full.data"), PathBuf::from("b")]);
        assert!(a.no_progress);
        assert_eq!(a.action(), Action::Restore);
    }

    /// virtnbdrestore's VM flags: -D implies -c, --sequence turns both off.
    #[test]
    fn vm_flags_follow_virtnbdrestore() {
        let a = restore_args(&[
            "-i",
            "in",
            "-o",
            "out",
            "-D",
            "-N",
            "copy",
            "-C",
            "vm.xml",
            "-r",
            "-A",
            "--compress",
        ]);
        let vm = Machine::from(&a);
        assert!(vm.adjust && vm.define && vm.raw, "-D implies -c");
        assert_eq!(
            (vm.name.as_deref(), vm.config_file.as_str(), vm.uri.as_str()),
            (Some("copy"), "vm.xml", "qemu:///system")
        );
        let o = RestoreOptions::from(&a);
        assert!(o.preallocate && o.compress);
        assert_eq!(a.format, None, "the disk's own format unless --format says");
        let a = restore_args(&["-i", "in", "-o", "out", "-cD", "-s", "sda.full.data"]);
        let vm = Machine::from(&a);
        assert!(!vm.adjust && !vm.define, "--sequence disables -c and -D");
        assert_eq!(Machine::from(&restore_args(&["-i", "in", "-o", "out"])).config_file, "vmconfig.xml");
        // a remote restore takes virtnbdbackup's remote options, as a backup does
        let a = restore_args(&[
            "-i",
            "in",
            "-o",
            "/out",
            "-U",
            "qemu+ssh://root@hv1/system",
            "--ssh-user",
            "admin",
            "-I",
            "10.0.0.2",
            "-P",
            "10850",
            "--tls",
        ]);
        let r = Machine::from(&a).remote;
        assert_eq!(
            (r.ssh_user.as_deref(), r.nbd_ip.as_deref(), r.nbd_port),
            (Some("admin"), Some("10.0.0.2"), 10850)
        );
        assert!(r.tls);
    }

    /// `-a` chooses the action; with the default action, an output named `dump` or
    /// `verify` does (virtnbdrestore's `-o dump`); any other output is a folder.
    #[test]
    fn the_action_follows_virtnbdrestore() {
        let action = |args: &[&str]| restore_args(args).action();
        assert_eq!(action(&["-i", "in", "-o", "dump"]), Action::Dump);
        assert_eq!(action(&["-i", "in", "-o", "verify"]), Action::Verify);
        assert_eq!(action(&["-i", "in", "-o", "./verify"]), Action::Restore);
        assert_eq!(action(&["-i", "in", "-a", "verify"]), Action::Verify);
        assert_eq!(action(&["-i", "in", "-a", "dump", "-o", "out"]), Action::Dump);
        assert_eq!(action(&["-i", "in", "--action", "restore", "-o", "verify"]), Action::Verify);
    }
}
