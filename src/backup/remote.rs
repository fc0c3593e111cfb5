//! A backup of a domain on another host (virtnbdbackup's remote options): which host the
//! libvirt URI names, the libvirt connection with its credentials (`--user`,
//! `--password`), and the [`Host`] the backup reaches the hypervisor's files and commands
//! through.
//!
//! A URI that names a host (`qemu+ssh://root@hv1/system`, `qemu+tcp://hv1/system`,
//! `qemu+tls://hv1/system`) is remote; one without (`qemu:///system`,
//! `qemu+unix:///system?socket=...`) is this machine. A remote backup always talks ssh to
//! the hypervisor as well (as virtnbdbackup does: `qemu-img info`, boot files, an offline
//! disk's `qemu-nbd`), whatever transport libvirt uses; the job's NBD server listens on
//! TCP there (`--nbd-ip`, `--nbd-port`, `--tls`).
//!
//! Defaults that differ from virtnbdbackup 1.9.15, each because it names the host the way
//! the user reached it rather than the name libvirtd reports (on Debian a host's own name
//! resolves to 127.0.1.1 there, so a server bound to it is unreachable): the NBD address
//! is `--nbd-ip`, else the URI's host; ssh goes to the URI's host, as `--ssh-user`, else
//! the URI's user, else ssh's default, on `--ssh-port`, else the URI's port for an ssh
//! transport, with `--ssh-private-key`, else the URI's `keyfile=`.
//!
//! Invariants: a password is held only for the libvirt callback and never logged; the
//! ssh connection is made before anything on the hypervisor changes, so an ssh failure
//! leaves the domain's checkpoints and jobs as they were.

use std::path::PathBuf;
use std::sync::Mutex;

use virt::connect::{Connect, ConnectAuth, ConnectCredential, ConnectCredentialType};

use super::host::{Host, LocalHost};
use super::ssh::{SshError, SshHost, SshTarget};
use super::{BackupError, BackupOptions};

/// virtnbdbackup's remote options (see the CLI for each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOptions {
    pub ssh_user: Option<String>,
    pub ssh_port: Option<u16>,
    pub ssh_private_key: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub nbd_ip: Option<String>,
    pub nbd_port: u16,
    pub tls: bool,
    /// On the hypervisor: the x509 folder of an offline disk's qemu-nbd (`--tls-cert`).
    pub tls_cert: PathBuf,
}

/// virtnbdbackup's `--nbd-port` default: the NBD port (IANA).
pub const NBD_PORT: u16 = 10809;

impl Default for RemoteOptions {
    fn default() -> RemoteOptions {
        RemoteOptions {
            ssh_user: None,
            ssh_port: None,
            ssh_private_key: None,
            user: None,
            password: None,
            nbd_ip: None,
            nbd_port: NBD_PORT,
            tls: false,
            tls_cert: PathBuf::from("/etc/pki/qemu/"),
        }
    }
}

/// The parts of a libvirt URI that say where the hypervisor is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriHost {
    /// `ssh`, `libssh`, `tcp`, `tls`... (`qemu+ssh`), empty for none.
    pub transport: String,
    pub user: Option<String>,
    /// Without IPv6 brackets.
    pub host: String,
    pub port: Option<u16>,
    /// The `keyfile=` query parameter (libvirt's, for its ssh transports).
    pub keyfile: Option<PathBuf>,
}

impl UriHost {
    /// The host part of `uri`, or `None` for a URI of this machine.
    pub fn parse(uri: &str) -> Option<UriHost> {
        let (scheme, rest) = uri.split_once("://")?;
        let transport = scheme.split_once('+').map_or("", |(_, t)| t).to_owned();
        let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_owned()).filter(|u| !u.is_empty()), h),
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']')?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return None;
        }
        let keyfile = tail
            .split_once('?')
            .into_iter()
            .flat_map(|(_, q)| q.split('&'))
            .find_map(|kv| kv.strip_prefix("keyfile="))
            .map(PathBuf::from);
        Some(UriHost {
            transport,
            user,
            host: host.to_owned(),
            port: port.and_then(|p| p.parse().ok()),
            keyfile,
        })
    }

    /// Where ssh goes for this host (see the module note for the defaults).
    pub fn ssh_target(&self, o: &RemoteOptions) -> SshTarget {
        let ssh_transport = matches!(self.transport.as_str(), "ssh" | "libssh" | "libssh2");
        SshTarget {
            host: self.host.clone(),
            user: o.ssh_user.clone().or_else(|| self.user.clone()),
            port: o.ssh_port.or(self.port.filter(|_| ssh_transport)),
            key: o.ssh_private_key.clone().or_else(|| self.keyfile.clone()),
        }
    }

    /// The address the job's NBD server listens on and vmback connects to.
    pub fn nbd_address<'a>(&'a self, o: &'a RemoteOptions) -> &'a str {
        o.nbd_ip.as_deref().unwrap_or(&self.host)
    }
}

/// `--user` and `--password` for the libvirt callback: a plain `fn` (all the `virt`
/// crate takes), so they are handed over here, for the one connection being opened.
static CREDENTIALS: Mutex<(Option<String>, Option<String>)> = Mutex::new((None, None));

fn give_credentials(creds: &mut [ConnectCredential]) {
    let held = CREDENTIALS.lock().unwrap_or_else(|e| e.into_inner());
    // what libvirtd's mechanism asks for (types only, never an answer)
    let asked: Vec<ConnectCredentialType> = creds.iter().map(|c| c.typed).collect();
    tracing::debug!("libvirt asks for credentials {asked:?}");
    for c in creds.iter_mut() {
        c.result = match c.typed {
            ConnectCredentialType::AuthName | ConnectCredentialType::UserName => held.0.clone(),
            ConnectCredentialType::Passphrase => held.1.clone(),
            _ => None,
        };
    }
}

/// Opens `uri`; when libvirtd asks for credentials (SASL), answers with `--user` and
/// `--password`, as virtnbdbackup's `openAuth` does.
pub fn connect(uri: &str, o: &RemoteOptions) -> Result<Connect, BackupError> {
    // libvirt prints every error to stderr by default; ours are reported with context.
    virt::error::clear_error_callback();
    let mut guard = CREDENTIALS.lock().unwrap_or_else(|e| e.into_inner());
    *guard = (o.user.clone(), o.password.clone());
    drop(guard);
    let mut auth = ConnectAuth::new(
        vec![ConnectCredentialType::AuthName, ConnectCredentialType::Passphrase],
        // `virt` takes a `fn(&mut Vec<_>)`; a closure that captures nothing is one
        |c: &mut Vec<ConnectCredential>| give_credentials(c),
    );
    let r = Connect::open_auth(Some(uri), &mut auth, 0);
    *CREDENTIALS.lock().unwrap_or_else(|e| e.into_inner()) = (None, None);
    let conn = r.map_err(|source| BackupError::Connect { uri: uri.to_owned(), source })?;
    // which libvirtd answered (a lookup that fails on a URI that connects is then
    // told apart from one that reached another daemon); never the credentials
    let answered = conn.uri().unwrap_or_else(|e| format!("unknown: {e}"));
    tracing::debug!("connected to libvirt at {uri} (libvirtd's URI: {answered})");
    Ok(conn)
}

/// How the hypervisor's files and commands are reached.
pub enum Reach {
    Local(LocalHost),
    Ssh(SshHost),
}

impl Reach {
    /// For `opts.uri`: this machine, or the URI's host over ssh (connected now).
    pub fn new(opts: &BackupOptions) -> Result<Reach, SshError> {
        match UriHost::parse(&opts.uri) {
            None => Ok(Reach::Local(LocalHost)),
            Some(h) => Ok(Reach::Ssh(SshHost::connect(h.ssh_target(&opts.remote))?)),
        }
    }

    pub fn host(&self) -> &dyn Host {
        match self {
            Reach::Local(h) => h,
            Reach::Ssh(h) => h,
        }
    }

    /// The ssh connection, for what runs there beyond one command (qemu-nbd).
    pub fn ssh(&self) -> Option<&SshHost> {
        match self {
            Reach::Local(_) => None,
            Reach::Ssh(h) => Some(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_of_this_machine_name_no_host() {
        for uri in ["qemu:///system", "qemu:///session", "qemu+unix:///system?socket=/run/x.sock", "test"] {
            assert_eq!(UriHost::parse(uri), None, "{uri}");
        }
    }

    #[test]
    fn remote_uris_give_user_host_port_and_keyfile() {
        let h = UriHost::parse("qemu+ssh://root@hv1:2222/system?keyfile=/k/id&no_verify=1").unwrap();
        assert_eq!(
            h,
            UriHost {
                transport: "ssh".into(),
                user: Some("root".into()),
                host: "hv1".into(),
                port: Some(2222),
                keyfile: Some("/k/id".into())
            }
        );
        let h = UriHost::parse("qemu+tls://[fd00::2]:16514/system?pkipath=/p").unwrap();
        assert_eq!((h.transport.as_str(), h.host.as_str(), h.port), ("tls", "fd00::2", Some(16514)));
        let h = UriHost::parse("qemu+tcp://10.0.0.2/system").unwrap();
        assert_eq!((h.user, h.host.as_str(), h.port), (None, "10.0.0.2", None));
    }

    #[test]
    fn ssh_and_nbd_defaults_come_from_the_uri_and_flags_win() {
        let mut o = RemoteOptions::default();
        let h = UriHost::parse("qemu+ssh://admin@hv1:2222/system?keyfile=/k/id").unwrap();
        let t = h.ssh_target(&o);
        assert_eq!(
            (t.user.as_deref(), t.port, t.key.clone()),
            (Some("admin"), Some(2222), Some("/k/id".into()))
        );
        assert_eq!(h.nbd_address(&o), "hv1");
        o.ssh_user = Some("root".into());
        o.ssh_port = Some(22);
        o.ssh_private_key = Some("/other".into());
        o.nbd_ip = Some("192.168.7.2".into());
        let t = h.ssh_target(&o);
        assert_eq!((t.user.as_deref(), t.port, t.key), (Some("root"), Some(22), Some("/other".into())));
        assert_eq!(h.nbd_address(&o), "192.168.7.2");
        // libvirtd's TCP port is not sshd's
        let h = UriHost::parse("qemu+tcp://hv1:16509/system").unwrap();
        assert_eq!(h.ssh_target(&RemoteOptions::default()).port, None);
    }

    #[test]
    fn the_callback_answers_with_the_given_credentials() {
        let cred = |typed| ConnectCredential {
            typed,
            prompt: String::new(),
            challenge: String::new(),
            def_result: String::new(),
            result: None,
        };
        *CREDENTIALS.lock().unwrap() = (Some("backup".into()), Some("s3cret".into()));
        let mut creds = vec![
            cred(ConnectCredentialType::AuthName),
            cred(ConnectCredentialType::Passphrase),
            cred(ConnectCredentialType::Realm),
        ];
        give_credentials(&mut creds);
        *CREDENTIALS.lock().unwrap() = (None, None);
        let got: Vec<Option<&str>> = creds.iter().map(|c| c.result.as_deref()).collect();
        assert_eq!(got, [Some("backup"), Some("s3cret"), None]);
    }
}
