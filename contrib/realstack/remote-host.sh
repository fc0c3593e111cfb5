#!/usr/bin/env bash
# remote-host.sh: a second "hypervisor host" on this machine for the remote-backup tests.
#
#   remote-host.sh start            make it (or find it running) and print its env lines
#   remote-host.sh stop             tear it down (keys, certificates and domains are kept)
#   remote-host.sh status           exit 0 and print the env lines if it answers, else 1
#   remote-host.sh env              print the env lines (KEY=VALUE, for tests and shells)
#   remote-host.sh domain NAME [MIB]  (re)create domain NAME from nothing: two new qcow2
#                                   disks vda/vdb of MIB MiB (default 64), UEFI NVRAM,
#                                   started paused
#   remote-host.sh write NAME DISK QEMU-IO-CMD...   run qemu-io commands on a live disk
#                                   through HMP, then flush (as make-corpus.sh does)
#   remote-host.sh truth NAME DISK OUT.raw   the disk's true contents, taken on the host
#   remote-host.sh exec CMD...      run CMD on the host (its network, mount, UTS namespace)
#   remote-host.sh link up|down     the veth link, from this side (fault tests: a cut
#                                   network); `start` brings it up again
#   remote-host.sh sshd up|down     the host's sshd (fault tests); `start` restarts it
#   remote-host.sh rate MBIT|off    limit what the host sends us to MBIT Mbit/s (a token
#                                   bucket on its veth end: a backup long enough to cut
#                                   mid-way); `start` lifts it
#   remote-host.sh client CMD...    run CMD here as a backup host set up for this one:
#                                   the client certificates where libnbd run as root looks
#                                   (/etc/pki/libnbd, a private overlay on /etc), root's
#                                   ~/.ssh holding the client key and known_hosts (ssh
#                                   reads the passwd home; a private overlay on it), and
#                                   HOME holding them too (paramiko reads only $HOME/.ssh).
#                                   REMOTE_CLIENT_PKI=DIR and REMOTE_CLIENT_SSH=DIR give
#                                   other ones (fault tests: `env` names a wrong
#                                   certificate and an ssh folder that knows no host key)
#
# The host (see shared/docs/real-stack.md, "A second host on this machine"):
#  - network namespace vmback-hv1 joined by a veth pair: 10.203.0.1 here, 10.203.0.2 there
#    (a /30 of our own; no route inside, so its traffic stays on these two and loopback);
#  - one anchor process (setsid ip netns exec ... unshare --mount --uts) holds its mount
#    and UTS namespaces: hostname 10.203.0.2 (libvirt hands the hostname out as the NBD
#    address and virtnbdbackup takes a host as remote only when the names differ), a tmpfs
#    on /run, an overlay on /etc (upper in that tmpfs) carrying libvirt's /etc/pki layout,
#    and bind mounts of private folders over /etc/libvirt, /var/lib/libvirt,
#    /var/log/libvirt and /var/cache/libvirt: the local libvirtd never sees any of it;
#  - in there: its own sshd (key auth only, port 22 on 10.203.0.2) and its own libvirtd
#    (unix socket in the private /run, TCP 16509 and TLS 16514 on 10.203.0.2);
#  - TLS: one CA; a server certificate for 10.203.0.2 used by libvirtd and by qemu's NBD
#    server of backup jobs (backup_tls_x509_cert_dir, client certificates verified); a
#    client certificate for this side, laid out for libvirt (pkipath=) and for libnbd;
#  - URIs (see `env`): qemu+ssh:// (through an ssh wrapper with its own ssh_config: key,
#    known_hosts, StrictHostKeyChecking yes), qemu+libssh:// and qemu+libssh2:// (key and
#    known_hosts in the URI), qemu+tcp:// and qemu+tls:// (client certificate);
#  - SASL on the TCP listener (auth_tcp = "sasl", DIGEST-MD5: libvirtd refuses a plain-TCP
#    mechanism without a security layer, so not PLAIN or SCRAM), one user in a sasldb in
#    the host's private /etc/libvirt, password made once; TCP_URI carries an auth file
#    (?authfile=) with them, SASL_URI is the same listener without (the --user/--password
#    test gives them itself).
# Tests sharing the host use domain names and NBD ports of their own (see `domain`).
# Everything lives under one state folder, $VMBACK_REMOTE_STATE (default
# /var/tmp/vmback-remote); keys and certificates are made once and reused. Every
# subcommand that changes the host takes a lock on that folder, so test binaries running
# at the same time can all call `start`: the first one builds the host, the others find
# it running and reuse it. Nothing stops it but `stop` (CI: once, at the end of the run).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
state=${VMBACK_REMOTE_STATE:-/var/tmp/vmback-remote}
ns=vmback-hv1
# veth ends: interface names are at most 15 characters
if_here=vmbhv1-here
if_there=vmbhv1-there
addr_here=10.203.0.1
addr=10.203.0.2
default_domain=vmback-remote
disk_mib=64
ovmf_code=/usr/share/OVMF/OVMF_CODE_4M.fd
ovmf_vars=/usr/share/OVMF/OVMF_VARS_4M.fd
# how long start waits for sshd and libvirtd to answer (first libvirtd start probes qemu's
# capabilities: about 8 s here; later ones take well under a second)
wait_s=${REMOTE_HOST_WAIT:-60}

ssh_dir=$state/ssh
pki=$state/pki
run=$state/run
host=$state/host
home=$state/client-home
log=$state/log
sasl=$state/sasl
sasl_user=vmback

die() { echo "remote-host: $*" >&2; exit 1; }

# alive PID: running and not a zombie (nothing here reaps quickly)
alive() {
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  case "$st" in Z*) return 1 ;; *) return 0 ;; esac
}

# pid_in FILE: the live process FILE names (else fails)
pid_in() {
  local p
  [ -s "$1" ] || return 1
  p=$(cat "$1")
  alive "$p" || return 1
  echo "$p"
}
anchor_pid() { pid_in "$run/anchor.pid"; }

ssh_uri="qemu+ssh://root@$addr/system?command=$ssh_dir/ssh"
sasl_uri="qemu+tcp://$addr/system"
tcp_uri="$sasl_uri?authfile=$sasl/auth.conf"
tls_uri="qemu+tls://$addr/system?pkipath=$pki/libvirt-client"
# libvirt's built-in ssh clients take the key and known_hosts from the URI itself (the
# ssh binary behind qemu+ssh:// would check /root/.ssh/known_hosts: hence the wrapper)
libssh_q="keyfile=$ssh_dir/client_key&known_hosts=$ssh_dir/known_hosts&known_hosts_verify=normal&sshauth=privkey"
libssh_uri="qemu+libssh://root@$addr/system?$libssh_q"
libssh2_uri="qemu+libssh2://root@$addr/system?$libssh_q"

print_env() {
  cat <<EOF
VMBACK_REMOTE_STATE=$state
VMBACK_REMOTE_ADDR=$addr
VMBACK_REMOTE_LOCAL_ADDR=$addr_here
VMBACK_REMOTE_LINK=$if_here
VMBACK_REMOTE_NETNS=$ns
VMBACK_REMOTE_SSH_URI=$ssh_uri
VMBACK_REMOTE_TCP_URI=$tcp_uri
VMBACK_REMOTE_TLS_URI=$tls_uri
VMBACK_REMOTE_SASL_URI=$sasl_uri
VMBACK_REMOTE_SASL_USER=$sasl_user
VMBACK_REMOTE_SASL_PASSWORD_FILE=$sasl/password
VMBACK_REMOTE_LIBSSH_URI=$libssh_uri
VMBACK_REMOTE_LIBSSH2_URI=$libssh2_uri
VMBACK_REMOTE_SSH=$ssh_dir/ssh
VMBACK_REMOTE_SSH_KEY=$ssh_dir/client_key
VMBACK_REMOTE_KNOWN_HOSTS=$ssh_dir/known_hosts
VMBACK_REMOTE_HOME=$home
VMBACK_REMOTE_NBD_CLIENT_PKI=$pki/nbd-client
VMBACK_REMOTE_WRONG_CLIENT_PKI=$pki/wrong-client
VMBACK_REMOTE_UNKNOWN_HOST_SSH=$ssh_dir/unknown-host
VMBACK_REMOTE_LIBVIRT_CLIENT_PKI=$pki/libvirt-client
VMBACK_REMOTE_SERVER_PKI=$pki/qemu
VMBACK_REMOTE_DOMAIN=$default_domain
EOF
}

# on_host CMD...: run CMD in the host's namespaces (network, mount, UTS)
on_host() {
  local p
  p=$(anchor_pid) || die "not running (remote-host.sh start)"
  nsenter -t "$p" -n -m -u -- "$@"
}
virsh_host() { on_host virsh -q -c qemu:///system "$@"; }

answers() {
  anchor_pid >/dev/null && timeout 15 virsh -q -c "$ssh_uri" list --all >/dev/null 2>&1
}

sshd_pid() { pid_in "$run/sshd.pid"; }

sshd_ctl() {
  local p
  case "$1" in
    up) sshd_pid >/dev/null || on_host /usr/sbin/sshd -f "$ssh_dir/sshd_config" -E "$log/sshd.log" ;;
    down)
      if p=$(sshd_pid); then
        kill "$p"
        for _ in $(seq 1 50); do alive "$p" || break; sleep 0.1; done
      fi ;;
    *) die "usage: sshd up|down" ;;
  esac
}

rate_ctl() {
  case "$1" in
    off) on_host tc qdisc del dev "$if_there" root 2>/dev/null || true ;;
    *[!0-9]* | "") die "usage: rate MBIT|off" ;;
    # burst: 64 KiB, a few packets (a bigger one lets the first megabytes through at
    # full speed); latency: how long a packet may queue before it is dropped
    *) on_host tc qdisc replace dev "$if_there" root tbf rate "${1}mbit" burst 64kb latency 400ms ;;
  esac
}

lock() {
  mkdir -p "$state"
  exec 9>"$state/lock"
  flock 9
}

# --- keys and certificates (made once) ----------------------------------------------
make_keys() {
  mkdir -p "$ssh_dir" "$home/.ssh"
  [ -s "$ssh_dir/client_key" ] || ssh-keygen -q -t ed25519 -N '' -C vmback-remote-client -f "$ssh_dir/client_key"
  [ -s "$ssh_dir/host_key" ] || ssh-keygen -q -t ed25519 -N '' -C vmback-remote-host -f "$ssh_dir/host_key"
  cp "$ssh_dir/client_key.pub" "$ssh_dir/authorized_keys"
  echo "$addr $(cut -d' ' -f1,2 "$ssh_dir/host_key.pub")" >"$ssh_dir/known_hosts"
  install -m 600 "$ssh_dir/client_key" "$home/.ssh/id_ed25519"
  cp "$ssh_dir/known_hosts" "$home/.ssh/known_hosts"
  # the same key, but a known_hosts without the host: ssh must refuse the host
  mkdir -p "$ssh_dir/unknown-host"
  install -m 600 "$ssh_dir/client_key" "$ssh_dir/unknown-host/id_ed25519"
  : >"$ssh_dir/unknown-host/known_hosts"
  cat >"$ssh_dir/sshd_config" <<EOF
ListenAddress $addr
Port 22
HostKey $ssh_dir/host_key
PidFile $run/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile $ssh_dir/authorized_keys
UsePAM no
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
  cat >"$ssh_dir/ssh_config" <<EOF
Host $addr
  User root
  IdentityFile $ssh_dir/client_key
  IdentitiesOnly yes
  UserKnownHostsFile $ssh_dir/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 5
EOF
  printf '#!/bin/sh\nexec ssh -F %s "$@"\n' "$ssh_dir/ssh_config" >"$ssh_dir/ssh"
  chmod 755 "$ssh_dir/ssh"
}

make_certs() {
  local t=$pki/templates
  mkdir -p "$t" "$pki/qemu" "$pki/libvirt-client" "$pki/nbd-client"
  # ten years: the state folder outlives many runs; no test depends on expiry
  cat >"$t/ca.info" <<EOF
cn = vmback remote test CA
ca
cert_signing_key
expiration_days = 3650
EOF
  cat >"$t/server.info" <<EOF
organization = vmback
cn = $addr
ip_address = $addr
tls_www_server
encryption_key
signing_key
expiration_days = 3650
EOF
  cat >"$t/client.info" <<EOF
organization = vmback
cn = vmback-client
tls_www_client
encryption_key
signing_key
expiration_days = 3650
EOF
  if [ ! -s "$pki/ca-cert.pem" ]; then
    certtool --generate-privkey --outfile "$pki/ca-key.pem" 2>/dev/null
    certtool --generate-self-signed --load-privkey "$pki/ca-key.pem" --template "$t/ca.info" \
      --outfile "$pki/ca-cert.pem" 2>/dev/null
  fi
  local who
  for who in server client; do
    [ -s "$pki/$who-cert.pem" ] && continue
    certtool --generate-privkey --outfile "$pki/$who-key.pem" 2>/dev/null
    certtool --generate-certificate --load-privkey "$pki/$who-key.pem" \
      --load-ca-certificate "$pki/ca-cert.pem" --load-ca-privkey "$pki/ca-key.pem" \
      --template "$t/$who.info" --outfile "$pki/$who-cert.pem" 2>/dev/null
  done
  # qemu's layout (x509 dir of the NBD server): ca-cert, server-cert, server-key
  cp "$pki/ca-cert.pem" "$pki/server-cert.pem" "$pki/server-key.pem" "$pki/qemu/"
  # libvirt's client layout (pkipath=): cacert, clientcert, clientkey
  cp "$pki/ca-cert.pem" "$pki/libvirt-client/cacert.pem"
  cp "$pki/client-cert.pem" "$pki/libvirt-client/clientcert.pem"
  cp "$pki/client-key.pem" "$pki/libvirt-client/clientkey.pem"
  # libnbd's and qemu's client layout: ca-cert, client-cert, client-key
  cp "$pki/ca-cert.pem" "$pki/client-cert.pem" "$pki/client-key.pem" "$pki/nbd-client/"
  # a wrong one: CA and client certificate of another authority, which the host's NBD
  # servers do not trust (and whose CA does not sign their certificate)
  local w=$pki/wrong-client
  mkdir -p "$w"
  if [ ! -s "$w/client-cert.pem" ]; then
    certtool --generate-privkey --outfile "$w/ca-key.pem" 2>/dev/null
    certtool --generate-self-signed --load-privkey "$w/ca-key.pem" --template "$t/ca.info" \
      --outfile "$w/ca-cert.pem" 2>/dev/null
    certtool --generate-privkey --outfile "$w/client-key.pem" 2>/dev/null
    certtool --generate-certificate --load-privkey "$w/client-key.pem" \
      --load-ca-certificate "$w/ca-cert.pem" --load-ca-privkey "$w/ca-key.pem" \
      --template "$t/client.info" --outfile "$w/client-cert.pem" 2>/dev/null
    rm -f "$w/ca-key.pem"
  fi
}

# --- the host's private configuration -----------------------------------------------
make_host_dirs() {
  mkdir -p "$host"/{etc-libvirt,var-lib-libvirt,var-log-libvirt,var-cache-libvirt,disks,nvram} "$run" "$log"
  # qemu's capabilities cache from the local daemon, if any: saves the ~8 s probe
  if [ ! -e "$host/var-cache-libvirt/qemu" ] && [ -d /var/cache/libvirt/qemu ]; then
    cp -a /var/cache/libvirt/qemu "$host/var-cache-libvirt/" 2>/dev/null || true
  fi
  cat >"$host/etc-libvirt/qemu.conf" <<EOF
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
backup_tls_x509_cert_dir = "/etc/pki/qemu"
backup_tls_x509_verify = 1
EOF
  cat >"$host/etc-libvirt/libvirtd.conf" <<EOF
listen_tls = 1
listen_tcp = 1
listen_addr = "$addr"
auth_tcp = "sasl"
auth_tls = "none"
EOF
  # the SASL user (made once: its password is reused across restarts)
  mkdir -p "$sasl"
  [ -s "$sasl/password" ] || (umask 077; head -c 12 /dev/urandom | base64 >"$sasl/password")
  saslpasswd2 -a libvirt -f "$host/etc-libvirt/passwd.db" -u "$addr" -c -p "$sasl_user" <"$sasl/password"
  (umask 077; printf '[credentials-vmback]\nauthname=%s\npassword=%s\n\n[auth-libvirt-%s]\ncredentials=vmback\n' \
    "$sasl_user" "$(cat "$sasl/password")" "$addr" >"$sasl/auth.conf")
  cat >"$run/anchor.sh" <<EOF
#!/bin/bash
# Runs inside the host's network, mount and UTS namespaces; see remote-host.sh.
set -euo pipefail
# no descriptor of the caller lives on in the host's daemons (a lock held by a
# \`flock LOCK remote-host.sh start\` would be held until the host stops)
for fd in \$(ls /proc/\$\$/fd); do [ "\$fd" -le 2 ] || eval "exec \$fd>&-" 2>/dev/null || true; done
echo \$\$ >"$run/anchor.pid"
hostname "$addr"
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd /run/lock /run/libvirt /run/etc/upper /run/etc/work
mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/etc/upper,workdir=/run/etc/work /etc
mkdir -p /etc/pki/CA /etc/pki/libvirt/private /etc/pki/qemu
cp "$pki/ca-cert.pem" /etc/pki/CA/cacert.pem
cp "$pki/server-cert.pem" /etc/pki/libvirt/servercert.pem
cp "$pki/server-key.pem" /etc/pki/libvirt/private/serverkey.pem
cp "$pki/qemu/"* /etc/pki/qemu/
mkdir -p /etc/sasl2
printf 'mech_list: digest-md5\\nsasldb_path: /etc/libvirt/passwd.db\\n' >/etc/sasl2/libvirt.conf
mount --bind "$host/etc-libvirt" /etc/libvirt
mount --bind "$host/var-lib-libvirt" /var/lib/libvirt
mount --bind "$host/var-log-libvirt" /var/log/libvirt
mount --bind "$host/var-cache-libvirt" /var/cache/libvirt
ip link set lo up
libvirtd -d --listen -p "$run/libvirtd.pid"
/usr/sbin/sshd -f "$ssh_dir/sshd_config" -E "$log/sshd.log"
exec sleep infinity
EOF
}

make_net() {
  ip netns add "$ns"
  ip link add "$if_here" type veth peer name "$if_there"
  ip link set "$if_there" netns "$ns"
  ip addr add "$addr_here/30" dev "$if_here"
  ip link set "$if_here" up
  ip -n "$ns" addr add "$addr/30" dev "$if_there"
  ip -n "$ns" link set "$if_there" up
}

stop_host() {
  local p pids
  if anchor_pid >/dev/null; then
    # shut the running domains down through their libvirtd, so it records them shut off
    for d in $(virsh_host list --name 2>/dev/null); do virsh_host destroy "$d" >/dev/null 2>&1 || true; done
  fi
  if ip netns list | grep -qw "$ns"; then
    # every process in the namespace is one this script started (or its children)
    pids=$(ip netns pids "$ns" || true)
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
      pids=$(ip netns pids "$ns" || true)
      [ -z "$pids" ] && break
      sleep 0.1
    done
    for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns"
  fi
  ip link del "$if_here" 2>/dev/null || true
  rm -f "$run/anchor.pid" "$run/libvirtd.pid" "$run/sshd.pid"
}

start_host() {
  # undo what fault tests may have left: a link cut, sshd stopped, a rate limit
  if anchor_pid >/dev/null; then
    ip link set "$if_here" up 2>/dev/null || true
    sshd_ctl up
    rate_ctl off
  fi
  # a host started by an older version of this script (without SASL) is made again
  if answers && grep -qx 'auth_tcp = "sasl"' "$host/etc-libvirt/libvirtd.conf"; then
    echo "remote-host: already running" >&2
  else
    local t0=$SECONDS
    bash "$here/../install-deps.sh"
    stop_host
    make_keys
    make_certs
    make_host_dirs
    make_net
    setsid ip netns exec "$ns" unshare --mount --uts --propagation private \
      bash "$run/anchor.sh" </dev/null >"$log/anchor.log" 2>&1 9>&- &
    local deadline=$((SECONDS + wait_s))
    until answers; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        die "the host did not answer on $ssh_uri within ${wait_s}s; see $log/ (anchor.log: $(tail -n 5 "$log/anchor.log" 2>/dev/null))"
      fi
      sleep 0.3
    done
    echo "remote-host: started in $((SECONDS - t0)) s" >&2
  fi
  if [ -e "$host/etc-libvirt/qemu/$default_domain.xml" ]; then
    # defined before: a libvirtd that has just started may list it a moment after it
    # answers, and making it again would wipe its disks
    local listed_by=$((SECONDS + wait_s))
    until virsh_host dominfo "$default_domain" >/dev/null 2>&1; do
      [ "$SECONDS" -lt "$listed_by" ] || die "$default_domain is defined but libvirtd does not list it"
      sleep 0.3
    done
  else
    make_domain "$default_domain"
  fi
  [ "$(virsh_host domstate "$default_domain")" != "shut off" ] ||
    virsh_host start --paused "$default_domain" >/dev/null
  print_env | tee "$state/env"
}

# --- domains -------------------------------------------------------------------------
check_name() {
  case "$1" in
    "" | *[!A-Za-z0-9_.-]*) die "bad domain name '$1' (letters, digits, _ . - only)" ;;
  esac
}

domain_xml() { # NAME TYPE
  local d
  cat <<EOF
<domain type='$2'>
  <name>$1</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>$ovmf_code</loader>
    <nvram template='$ovmf_vars'>$host/nvram/$1_VARS.fd</nvram>
  </os>
  <features><acpi/></features>
  <devices>
EOF
  for d in vda vdb; do
    cat <<EOF
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='$host/disks/$1-$d.qcow2'/>
      <target dev='$d' bus='virtio'/>
    </disk>
EOF
  done
  cat <<EOF
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

make_domain() {
  local name=$1 mib=${2:-$disk_mib} t
  check_name "$name"
  case "$mib" in "" | *[!0-9]*) die "bad disk size '$mib' (MiB)" ;; esac
  if virsh_host dominfo "$name" >/dev/null 2>&1; then
    virsh_host destroy "$name" >/dev/null 2>&1 || true
    virsh_host undefine --nvram --checkpoints-metadata "$name" >/dev/null
  fi
  rm -f "$host/disks/$name-vda.qcow2" "$host/disks/$name-vdb.qcow2" "$host/nvram/${name}_VARS.fd"
  for t in vda vdb; do
    qemu-img create -q -f qcow2 -o compat=1.1 "$host/disks/$name-$t.qcow2" "${mib}M"
  done
  t=qemu
  if on_host test -w /dev/kvm; then t=kvm; fi
  domain_xml "$name" "$t" >"$host/$name.xml"
  virsh_host define "$host/$name.xml" >/dev/null
  virsh_host start --paused "$name" >/dev/null
}

# QOM path of DISK's virtio backend in domain NAME ("Attached to:" in `info block`)
qom_of() {
  local info q
  info=$(virsh_host qemu-monitor-command "$1" --hmp 'info block')
  q=$(awk -v f="$host/disks/$1-$2.qcow2" 'index($0, f " (") { hit = 1; next }
    hit && /Attached to:/ { print $3; exit }' <<<"$info")
  [ -n "$q" ] || die "no 'Attached to:' for $1 $2 in info block:"$'\n'"$info"
  echo "$q"
}

# write NAME DISK CMD...: qemu-io prints into the domain log, not the HMP reply; each
# command must add a "wrote"/"discard" line there, else it failed
write_disk() {
  local name=$1 disk=$2 q c before reply new i
  shift 2
  local domlog=$host/var-log-libvirt/qemu/$name.log
  q=$(qom_of "$name" "$disk")
  for c in "$@" flush; do
    before=$(stat -c %s "$domlog")
    reply=$(virsh_host qemu-monitor-command "$name" --hmp "qemu-io -d $q \"$c\"")
    [ -z "$reply" ] || die "qemu-io on $name $disk: $c: unexpected reply: $reply"
    [ "$c" = flush ] && break
    for i in $(seq 1 50); do
      new=$(tail -c +"$((before + 1))" "$domlog")
      if grep -Eq '^(wrote|discard) ' <<<"$new"; then break; fi
      if grep -Eqi 'error|failed|invalid' <<<"$new" || [ "$i" = 50 ]; then
        die "qemu-io on $name $disk did not confirm '$c'; domain log says: $new"
      fi
      sleep 0.1
    done
  done
}

truth() {
  local name=$1 disk=$2 out=$3
  # a live disk is flushed first; a shut-off one has nothing in flight
  [ "$(virsh_host domstate "$name")" = "shut off" ] || write_disk "$name" "$disk"
  on_host qemu-img convert -U -O raw "$host/disks/$name-$disk.qcow2" "$out"
}

# client CMD...: libnbd (as root) takes its client certificates from /etc/pki/libnbd
# only, and ssh its key and known_hosts from root's passwd home: give them ours in private
# overlays on /etc and that home, so this machine's own files are not touched
client() {
  local root_home
  root_home=$(getent passwd root | cut -d: -f6)
  exec unshare --mount --propagation private bash -c '
    set -e
    home=$0 st=$1 certs=$2 sshd=$3 rhome=$4
    shift 4
    t=$st/client-etc
    mkdir -p "$t"
    mount -t tmpfs tmpfs "$t"
    mkdir -p "$t/upper/pki/libnbd" "$t/work" "$t/home-upper" "$t/home-work" "$t/ssh"
    cp "$certs"/* "$t/upper/pki/libnbd/"
    mount -t overlay overlay -o "lowerdir=/etc,upperdir=$t/upper,workdir=$t/work" /etc
    cp "$sshd/id_ed25519" "$sshd/known_hosts" "$t/ssh/"
    chmod 700 "$t/ssh"
    chmod 600 "$t/ssh/id_ed25519"
    mount -t overlay overlay -o "lowerdir=$rhome,upperdir=$t/home-upper,workdir=$t/home-work" "$rhome"
    mkdir -p "$rhome/.ssh"
    mount --bind "$t/ssh" "$rhome/.ssh"
    HOME=$home exec "$@"' "$home" "$state" "${REMOTE_CLIENT_PKI:-$pki/nbd-client}" \
    "${REMOTE_CLIENT_SSH:-$home/.ssh}" "$root_home" "$@"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  start) lock; start_host ;;
  stop) lock; stop_host; echo "remote-host: stopped" >&2 ;;
  status) if answers; then print_env; else echo "remote-host: not running or not answering on $ssh_uri" >&2; exit 1; fi ;;
  env) print_env ;;
  domain) [ $# = 1 ] || [ $# = 2 ] || die "usage: domain NAME [MIB]"; lock; make_domain "$@" ;;
  write) [ $# -ge 3 ] || die "usage: write NAME DISK QEMU-IO-CMD..."; write_disk "$@" ;;
  truth) [ $# = 3 ] || die "usage: truth NAME DISK OUT.raw"; truth "$@" ;;
  exec) [ $# -ge 1 ] || die "usage: exec CMD..."; on_host "$@" ;;
  client) [ $# -ge 1 ] || die "usage: client CMD..."; client "$@" ;;
  link)
    case "${1:-}" in up | down) ip link set "$if_here" "$1" ;; *) die "usage: link up|down" ;; esac ;;
  sshd) [ $# = 1 ] || die "usage: sshd up|down"; lock; sshd_ctl "$1" ;;
  rate) [ $# = 1 ] || die "usage: rate MBIT|off"; rate_ctl "$1" ;;
  *) echo "usage: $0 start|stop|status|env|domain NAME [MIB]|write NAME DISK CMD...|truth NAME DISK OUT|exec CMD...|client CMD...|link up|down|sshd up|down|rate MBIT|off" >&2
     exit 2 ;;
esac
