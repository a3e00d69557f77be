//! The sandbox a local replica runs in: Landlock filesystem rules that let a Node-RED process
//! read and write its own userDir and a private temp dir, read the Node.js runtime, the stack
//! and the system's libraries and certificates, and nothing else (in particular nothing else of
//! Tandem's data directory: not `secret-key`, `admin-token`, `tandem.db`, nor other instances).
//!
//! The workspace forbids `unsafe`, so the sandbox cannot be applied between `fork` and `exec`
//! (`CommandExt::pre_exec` is unsafe). Instead the `tandem` binary re-executes itself as a small
//! launcher, `tandem sandbox-exec --rw P... --ro P... [--require] -- PROGRAM ARGS...`, which
//! calls [`exec`]: it restricts itself with [`restrict_self`] and then `exec`s the program, which
//! inherits the restriction (Landlock domains survive `execve` and pass to every child).
//!
//! What the rules do not cover:
//! - The network: TCP and UDP stay unrestricted (flows listen with `tcp in` nodes and call out).
//! - Signals and abstract Unix sockets are scoped (Landlock ABI 6+): a replica cannot signal a
//!   process outside its sandbox (Tandem, another replica) nor connect to an abstract socket one
//!   created, while Tandem can still signal the replica.
//! - `/proc` is readable, so a replica sees other processes' command lines; their
//!   `/proc/<pid>/environ`, `maps`, `cwd`, `mem`... are refused because Landlock only lets a
//!   sandboxed process ptrace-read (`PTRACE_MODE_READ`) processes inside its own domain. Its own
//!   process's environment stays readable to it: secrets must not be passed in the environment.
//!
//! Capabilities: the kernel lets a process with `CAP_PERFMON` or `CAP_SYS_ADMIN` read another
//! process's `environ`, `maps` and `auxv` whatever its Landlock domain (`mm_access`), and a
//! process with `CAP_SYS_MODULE`, `CAP_NET_RAW`... can leave any filesystem sandbox. So the
//! launcher drops every capability (all sets, the bounding set included, and `no_new_privs`)
//! before it restricts itself, except `CAP_NET_BIND_SERVICE` (see [`KEPT_CAPABILITIES`]). A
//! replica started by root then runs as uid 0 without privileges: it still owns root's files, so
//! the Landlock rules are what keeps it in.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use landlock::{
    Access, AccessFs, BitFlags, LandlockStatus, PathBeneath, PathFd, PathFdError, RestrictSelf,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use rustix::io::Errno;
use rustix::thread::{CapabilitySet, CapabilitySets};
use serde::Serialize;

/// The newest Landlock ABI whose rights the rules handle. The crate drops, best effort, the
/// rights an older kernel lacks, so one ruleset serves every kernel; it is a constant rather than
/// the kernel's own ABI so that a newer kernel does not silently restrict something untested.
const HANDLED_ABI: ABI = ABI::V10;

/// The only capability a replica keeps when it is started with it (by root): binding ports below
/// 1024, so that a flow's `tcp in` node on a well-known port (Modbus on 502) works as it did
/// unsandboxed. It reaches nothing another port does not. Not `CAP_NET_RAW`: a raw socket could
/// capture loopback traffic between Tandem's proxy and other replicas.
pub const KEPT_CAPABILITIES: CapabilitySet = CapabilitySet::NET_BIND_SERVICE;

/// Device files a Node.js process opens for reading and writing. Only these files, not `/dev`:
/// a replica run as root could otherwise write raw disks, and `/dev/shm` is shared between all
/// processes of the machine.
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
];

/// System hierarchies read (and executed) by Node.js, the shells and tools a flow's `exec` node
/// runs, and the dynamic loader. On merged-/usr systems `/lib`, `/bin`... are links to `/usr`.
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin",
    // Node.js reads `/proc/self/*` (its executable, limits, mount info) and libuv reads the
    // cgroup files under `/sys/fs/cgroup` and CPU topology under `/sys/devices/system/cpu`.
    // Other processes' private entries stay closed (see the module docs).
    "/proc", "/sys",
];

/// The parts of `/etc` a Node.js process and ordinary tools need: the loader's cache, name
/// resolution, users and groups, time zone, TLS trust and OpenSSL's configuration. Not the whole
/// of `/etc`: run as root, a replica could otherwise read `/etc/shadow`, SSH host keys and
/// `/etc/ssl/private`.
const ETC_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/networks",
    "/etc/passwd",
    "/etc/group",
    "/etc/localtime",
    "/etc/locale.alias",
    "/etc/timezone",
    "/etc/mime.types",
    "/etc/os-release",
    "/etc/alternatives",
    // Bash reads it when its stdin is a socket, as in a flow's `exec` node.
    "/etc/bash.bashrc",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/pki/tls/certs",
    "/etc/pki/tls/openssl.cnf",
    "/etc/pki/ca-trust",
    "/etc/crypto-policies",
    // With systemd-resolved `/etc/resolv.conf` links here, and Landlock checks the target.
    "/run/systemd/resolve",
];

/// Whether replicas run sandboxed, as the status shows it: `{"mode":"landlock","abi":7}` or
/// `{"mode":"none","reason":"..."}`; [`Isolation::label`] gives the one-word form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Isolation {
    /// Landlock restricts the replica's filesystem access.
    Landlock {
        /// The Landlock ABI version in use: the kernel's, capped at the newest this build knows.
        abi: u32,
    },
    /// The replica runs without a sandbox.
    None {
        /// Why, and what would enable it.
        reason: String,
    },
}

/// Paths a sandboxed process may use; everything else of the filesystem is refused. A path is
/// granted with everything beneath it; paths that do not exist are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Read, write, create, remove and execute (the userDir, the private temp dir).
    pub read_write: Vec<PathBuf>,
    /// Read and execute (the stack, the Node.js runtime, the system).
    pub read_only: Vec<PathBuf>,
}

/// Why a process could not be sandboxed or started.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The sandbox was required but the kernel does not enforce Landlock.
    #[error(
        "the sandbox is required but this kernel does not enforce Landlock: {reason}; \
         run on Linux 5.13 or later with Landlock enabled, or do not require the sandbox"
    )]
    Unavailable {
        /// What the kernel lacks.
        reason: String,
    },
    /// A path of the rules exists but could not be opened to make a rule of it.
    #[error("cannot open {} for a sandbox rule: {source}", path.display())]
    Path {
        /// The path.
        path: PathBuf,
        /// Why it could not be opened.
        source: io::Error,
    },
    /// The kernel refused the ruleset.
    #[error("cannot apply the Landlock ruleset: {0}")]
    Ruleset(#[from] landlock::RulesetError),
    /// The launcher could not give up its privileges.
    #[error("cannot {what}: {source}")]
    Privileges {
        /// What failed, e.g. `drop capabilities`.
        what: &'static str,
        /// The system call's error.
        source: io::Error,
    },
    /// The sandboxed program could not be executed.
    #[error("cannot execute {}: {source}", program.to_string_lossy())]
    Exec {
        /// The program.
        program: OsString,
        /// Why `execve` failed.
        source: io::Error,
    },
}

/// Whether this kernel enforces Landlock, without restricting anything.
pub fn probe() -> Isolation {
    // A `RestrictSelf` with no flags only asks the kernel for its Landlock ABI version; without
    // `no_new_privs` it calls nothing else, so the calling process is left as it was.
    match RestrictSelf::default().no_new_privs(false).apply() {
        Ok(status) => Isolation::from(status.landlock),
        Err(e) => Isolation::None {
            reason: format!("the Landlock version query failed: {e}"),
        },
    }
}

/// The system paths a Node.js process needs read-only that exist on this machine (see the
/// module docs for what is left out and why). The Node.js runtime's own directory is not
/// included when it lies elsewhere (a stack's `node` package, `~/.nvm`): the caller adds it.
pub fn system_read_only() -> Vec<PathBuf> {
    existing(&[SYSTEM_DIRS, ETC_FILES])
}

/// The device files a Node.js process opens read-write (`/dev/null`, `/dev/urandom`...) that
/// exist on this machine.
pub fn system_read_write() -> Vec<PathBuf> {
    existing(&[DEVICES])
}

/// Restricts the calling thread, and every program it executes afterwards, to `rules`.
///
/// Handles every filesystem right of the newest Landlock ABI the kernel has, so anything not
/// granted by a rule is refused. Call it from a single-threaded process (the launcher): other
/// threads stay unrestricted until the process `exec`s. Where the kernel has no Landlock,
/// returns [`SandboxError::Unavailable`] when `required`, else [`Isolation::None`] having
/// restricted nothing.
pub fn restrict_self(rules: &Rules, required: bool) -> Result<Isolation, SandboxError> {
    let isolation = probe();
    if let Isolation::None { reason } = isolation {
        return if required {
            Err(SandboxError::Unavailable { reason })
        } else {
            Ok(Isolation::None { reason })
        };
    }
    let mut ruleset = landlock::Ruleset::default()
        .handle_access(AccessFs::from_all(HANDLED_ABI))?
        .scope(Scope::from_all(HANDLED_ABI))?
        .create()?;
    let grants = [
        (&rules.read_only, AccessFs::from_read(HANDLED_ABI)),
        (&rules.read_write, AccessFs::from_all(HANDLED_ABI)),
    ];
    for (paths, access) in grants {
        for path in paths {
            if let Some(rule) = path_beneath(path, access)? {
                ruleset = ruleset.add_rule(rule)?;
            }
        }
    }
    let status = ruleset.restrict_self()?;
    match status.ruleset {
        RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced => Ok(isolation),
        RulesetStatus::NotEnforced => {
            let reason = "the kernel did not enforce the Landlock ruleset".to_owned();
            if required {
                Err(SandboxError::Unavailable { reason })
            } else {
                Ok(Isolation::None { reason })
            }
        }
    }
}

/// Drops the calling process's privileges ([`drop_privileges`]), restricts it to `rules`
/// ([`restrict_self`]) and replaces it with `program` and `args`. The environment, working
/// directory, standard streams, process group and file descriptors not marked close-on-exec pass
/// from the caller to the program unchanged.
///
/// Only returns on failure. When the kernel has no Landlock and the sandbox is not `required`,
/// prints one warning line to standard error (the replica's log) and runs the program unsandboxed
/// (still without privileges).
pub fn exec(program: &OsStr, args: &[OsString], rules: &Rules, required: bool) -> SandboxError {
    if let Err(e) = drop_privileges() {
        return e;
    }
    match restrict_self(rules, required) {
        Ok(Isolation::Landlock { .. }) => {}
        Ok(Isolation::None { reason }) => {
            eprintln!("tandem sandbox-exec: warning: running without a sandbox: {reason}");
        }
        Err(e) => return e,
    }
    let source = Command::new(program).args(args).exec();
    SandboxError::Exec {
        program: program.to_owned(),
        source,
    }
}

/// Gives up the calling thread's privileges for good, for it and every program it executes:
/// sets `no_new_privs` (no setuid or file capabilities on exec), empties the ambient, inheritable,
/// permitted and effective capability sets and the bounding set (so that root does not regain
/// them on exec), all but [`KEPT_CAPABILITIES`]. Call it from a single-threaded process (the
/// launcher): capabilities are per thread.
pub fn drop_privileges() -> Result<(), SandboxError> {
    let fail = |what: &'static str| {
        move |e: Errno| SandboxError::Privileges {
            what,
            source: e.into(),
        }
    };
    rustix::thread::set_no_new_privs(true).map_err(fail("set no_new_privs"))?;
    let caps = rustix::thread::capabilities(None).map_err(fail("read capabilities"))?;
    // Only a process with CAP_SETPCAP may shrink its bounding set. Without it the process has no
    // capabilities to regain on exec either: `no_new_privs` stops setuid and file capabilities.
    if caps.effective.contains(CapabilitySet::SETPCAP) {
        for bit in 0..u64::BITS {
            let cap = CapabilitySet::from_bits_retain(1 << bit);
            if KEPT_CAPABILITIES.contains(cap) {
                continue;
            }
            match rustix::thread::remove_capability_from_bounding_set(cap) {
                Ok(()) => {}
                // Past the kernel's last capability.
                Err(Errno::INVAL) => break,
                Err(e) => return Err(fail("drop capabilities from the bounding set")(e)),
            }
        }
    }
    match rustix::thread::clear_ambient_capability_set() {
        // EINVAL: a kernel before 4.3, without ambient capabilities.
        Ok(()) | Err(Errno::INVAL) => {}
        Err(e) => return Err(fail("clear the ambient capabilities")(e)),
    }
    let kept = caps.permitted & KEPT_CAPABILITIES;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: caps.effective & kept,
            permitted: kept,
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(fail("drop capabilities"))
}

// === impl SandboxError ===

impl SandboxError {
    /// A short stable name of the kind of failure, for logs and metric labels.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } => "unavailable",
            Self::Path { .. } => "path",
            Self::Ruleset(_) => "ruleset",
            Self::Privileges { .. } => "privileges",
            Self::Exec { .. } => "exec",
        }
    }
}

// === impl Isolation ===

impl Isolation {
    /// `landlock` or `none`: the one-word form for status fields and metric labels.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Landlock { .. } => "landlock",
            Self::None { .. } => "none",
        }
    }

    /// Whether the sandbox is enforced.
    pub fn is_enforced(&self) -> bool {
        matches!(self, Self::Landlock { .. })
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Landlock { abi } => write!(f, "landlock (ABI {abi})"),
            Self::None { reason } => write!(f, "none ({reason})"),
        }
    }
}

impl From<LandlockStatus> for Isolation {
    fn from(status: LandlockStatus) -> Self {
        match status {
            LandlockStatus::Available { effective_abi, .. } => Self::Landlock {
                abi: effective_abi as u32,
            },
            LandlockStatus::NotEnabled => Self::None {
                reason: "Landlock is built into this kernel but not enabled (add `landlock` to \
                         the `lsm=` boot parameter)"
                    .to_owned(),
            },
            LandlockStatus::NotImplemented => Self::None {
                reason: "this kernel is not built with Landlock (CONFIG_SECURITY_LANDLOCK)"
                    .to_owned(),
            },
        }
    }
}

// === impl Rules ===

impl Rules {
    /// The system's paths: [`system_read_only`] and [`system_read_write`]. The caller adds the
    /// replica's own paths.
    pub fn system() -> Self {
        Self {
            read_write: system_read_write(),
            read_only: system_read_only(),
        }
    }

    /// The rules as `tandem sandbox-exec` flags: `--rw P` for each read-write path, then
    /// `--ro P` for each read-only one.
    pub fn to_args(&self) -> Vec<OsString> {
        let pairs = |flag: &'static str, paths: &[PathBuf]| {
            paths
                .iter()
                .flat_map(move |p| [OsString::from(flag), p.clone().into_os_string()])
                .collect::<Vec<_>>()
        };
        let mut args = pairs("--rw", &self.read_write);
        args.extend(pairs("--ro", &self.read_only));
        args
    }
}

/// The full argument list of the launcher, after the `tandem` executable: `sandbox-exec`, the
/// rules, `--require` when `required`, `--`, then `program` and `args`.
pub fn launcher_args(
    rules: &Rules,
    required: bool,
    program: &OsStr,
    args: &[OsString],
) -> Vec<OsString> {
    let mut out = vec![OsString::from("sandbox-exec")];
    out.extend(rules.to_args());
    if required {
        out.push("--require".into());
    }
    out.push("--".into());
    out.push(program.to_owned());
    out.extend(args.iter().cloned());
    out
}

/// A rule granting `access` beneath `path`, narrowed to the rights a file can have when it is
/// not a directory; `None` when the path does not exist.
fn path_beneath(
    path: &Path,
    access: BitFlags<AccessFs>,
) -> Result<Option<PathBeneath<PathFd>>, SandboxError> {
    let fd = match PathFd::new(path) {
        Ok(fd) => fd,
        Err(PathFdError::OpenCall { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(PathFdError::OpenCall { source, .. }) => {
            return Err(SandboxError::Path {
                path: path.to_owned(),
                source,
            })
        }
        // `PathFdError` is non-exhaustive: keep any future variant's message.
        Err(e) => {
            return Err(SandboxError::Path {
                path: path.to_owned(),
                source: io::Error::other(e),
            })
        }
    };
    // The kernel refuses directory rights (list, create, remove) on a file. `fstat` on the
    // opened descriptor (it works on `O_PATH` ones) decides for the very file the rule is about.
    let is_dir = fd
        .as_fd()
        .try_clone_to_owned()
        .and_then(|owned| File::from(owned).metadata())
        .map_err(|source| SandboxError::Path {
            path: path.to_owned(),
            source,
        })?
        .is_dir();
    let access = if is_dir {
        access
    } else {
        access & AccessFs::from_file(HANDLED_ABI)
    };
    Ok(Some(PathBeneath::new(fd, access)))
}

fn existing(lists: &[&[&str]]) -> Vec<PathBuf> {
    lists
        .iter()
        .flat_map(|list| list.iter())
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_become_launcher_flags() {
        let rules = Rules {
            read_write: vec!["/data/instances/a/r0".into(), "/tmp/a".into()],
            read_only: vec!["/usr".into()],
        };
        assert_eq!(
            rules.to_args(),
            [
                "--rw",
                "/data/instances/a/r0",
                "--rw",
                "/tmp/a",
                "--ro",
                "/usr"
            ]
            .map(OsString::from)
            .to_vec()
        );
        assert_eq!(
            launcher_args(&rules, true, OsStr::new("node"), &["-e".into(), "1".into()]),
            [
                "sandbox-exec",
                "--rw",
                "/data/instances/a/r0",
                "--rw",
                "/tmp/a",
                "--ro",
                "/usr",
                "--require",
                "--",
                "node",
                "-e",
                "1"
            ]
            .map(OsString::from)
            .to_vec()
        );
    }

    #[test]
    fn isolation_serializes_as_the_status_shows_it() {
        let on = Isolation::Landlock { abi: 7 };
        assert_eq!(on.label(), "landlock");
        assert_eq!(
            serde_json::to_value(&on).unwrap(),
            serde_json::json!({"mode": "landlock", "abi": 7})
        );
        let off = Isolation::None {
            reason: "no Landlock".into(),
        };
        assert_eq!(off.label(), "none");
        assert_eq!(
            serde_json::to_value(&off).unwrap(),
            serde_json::json!({"mode": "none", "reason": "no Landlock"})
        );
    }

    #[test]
    fn system_paths_exist_and_leave_secrets_out() {
        let ro = system_read_only();
        assert!(ro.iter().all(|p| p.exists()));
        assert!(ro.contains(&PathBuf::from("/usr")));
        for secret in [
            "/etc",
            "/etc/shadow",
            "/etc/ssl/private",
            "/etc/ssh",
            "/root",
            "/tmp",
        ] {
            assert!(!ro.contains(&PathBuf::from(secret)), "{secret} is granted");
        }
        let rw = system_read_write();
        assert!(rw.contains(&PathBuf::from("/dev/null")));
        assert!(!rw.contains(&PathBuf::from("/dev")));
    }

    #[test]
    fn probe_restricts_nothing() {
        let _ = probe();
        // Still unrestricted: a path no rule would grant can be read.
        assert!(std::fs::read_dir("/").is_ok());
    }
}
