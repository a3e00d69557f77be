//! The `tandem` command line. Every flag also reads a `TANDEM_` environment variable.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Tandem runs Node-RED instances for teams, with high availability first.
#[derive(Debug, Parser)]
#[command(name = "tandem", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run Tandem: the control plane's API and the ingress proxy, with embedded defaults
    /// (SQLite in the data directory, base domain `localhost`).
    Serve(Box<ServeArgs>),
    /// Manage users from the command line.
    #[command(subcommand)]
    User(UserCommand),
    /// Run the ingress proxy alone, serving the instances of a routes file (reloaded when it
    /// changes and on SIGHUP).
    Proxy(Box<ProxyArgs>),
    /// Write the store and the platform key to one file (SQLite stores; consistent while
    /// Tandem runs).
    Backup {
        /// The backup file to write (0600).
        #[arg(long)]
        to: PathBuf,
        /// Data directory (as for `tandem serve`).
        #[arg(long, env = "TANDEM_DATA_DIR", default_value = "./tandem-data")]
        data_dir: PathBuf,
        /// The platform key file, when not `<data-dir>/secret-key`.
        #[arg(long, env = "TANDEM_PLATFORM_KEY_FILE")]
        platform_key_file: Option<PathBuf>,
    },
    /// Restore a backup into an empty data directory.
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// Data directory to restore into (must hold no store yet).
        #[arg(long, env = "TANDEM_DATA_DIR", default_value = "./tandem-data")]
        data_dir: PathBuf,
    },
    /// Internal: runs PROGRAM in a local replica's Landlock sandbox (`SandboxExecArgs`).
    #[command(hide = true)]
    SandboxExec(SandboxExecArgs),
}

/// `tandem sandbox-exec [--rw PATH]... [--ro PATH]... [--require] -- PROGRAM [ARGS...]`: an
/// internal command, hidden from `--help`. The local driver starts each Node-RED replica through
/// it: it restricts itself with Landlock to the given paths
/// ([`tandem_coordinator::sandbox::restrict_self`]) and then executes PROGRAM in its place, which
/// keeps the restriction. The environment, working directory, standard streams and process group
/// are the launcher's, so the driver sets them on it.
///
/// It runs before any tracing or runtime is set up and prints nothing when it succeeds (PROGRAM's
/// output is the replica's log). When it cannot sandbox or execute PROGRAM it prints one line to
/// standard error and exits with status 126. Without Landlock in the kernel it runs PROGRAM
/// unsandboxed after a warning line, unless `--require` is given.
#[derive(Debug, clap::Args)]
pub struct SandboxExecArgs {
    /// Path PROGRAM may read, write, create and remove beneath (repeatable).
    #[arg(long = "rw", value_name = "PATH", allow_hyphen_values = true)]
    pub read_write: Vec<PathBuf>,
    /// Path PROGRAM may read and execute beneath (repeatable).
    #[arg(long = "ro", value_name = "PATH", allow_hyphen_values = true)]
    pub read_only: Vec<PathBuf>,
    /// Fail (status 126) instead of running unsandboxed when the kernel lacks Landlock.
    #[arg(long)]
    pub require: bool,
    /// PROGRAM and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    pub command: Vec<OsString>,
}

impl SandboxExecArgs {
    /// Restricts this process and executes the program; returns only by exiting with 126.
    fn run(self) -> ! {
        use tandem_coordinator::sandbox;
        let rules = sandbox::Rules {
            read_write: self.read_write,
            read_only: self.read_only,
        };
        // clap requires at least one value after `--`.
        let error = match self.command.split_first() {
            Some((program, args)) => sandbox::exec(program, args, &rules, self.require),
            None => sandbox::SandboxError::Exec {
                program: OsString::new(),
                source: std::io::ErrorKind::NotFound.into(),
            },
        };
        eprintln!("tandem sandbox-exec: {error}");
        std::process::exit(126)
    }
}

/// Flags of `tandem proxy`.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Routes file (TOML) with one [[instance]] table per instance. Either this or
    /// `--control-plane`.
    #[arg(
        long,
        env = "TANDEM_ROUTES",
        required_unless_present = "control_plane",
        conflicts_with = "control_plane"
    )]
    pub routes: Option<PathBuf>,
    /// A control plane to take routes from (`http://host:3000`): its route feed, with the
    /// proxy token in `--token-file`. Plain HTTP: keep it on a private network (the routes
    /// carry instances' admin secrets).
    #[arg(long, env = "TANDEM_CONTROL_PLANE", requires = "token_file")]
    pub control_plane: Option<String>,
    /// A file holding the proxy token (`POST /api/v1/proxy-tokens`), one line.
    #[arg(long, env = "TANDEM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Where the last table of the control plane is kept (written 0600: it holds admin
    /// secrets), so a proxy started while its control plane is away still serves.
    #[arg(
        long,
        env = "TANDEM_ROUTE_CACHE",
        default_value = "./tandem-routes.json"
    )]
    pub cache_file: PathBuf,
    /// This proxy's name in the control plane's reports and `GET /api/v1/cluster`; default
    /// `<host name>:<listen address>`.
    #[arg(long, env = "TANDEM_PROXY_ID")]
    pub proxy_id: Option<String>,
    /// Address the proxy listens on.
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address of the metrics listener (/metrics in the Prometheus text format, /healthz),
    /// unauthenticated like any Prometheus exporter: keep it on a private network. Default
    /// 127.0.0.1:9464. Its earlier name `--admin-listen` (`TANDEM_ADMIN_LISTEN`) still works.
    #[arg(long, env = "TANDEM_METRICS_LISTEN", alias = "admin-listen")]
    pub metrics_listen: Option<SocketAddr>,
    /// `TANDEM_ADMIN_LISTEN`, the earlier name of `TANDEM_METRICS_LISTEN`; the flag or
    /// `TANDEM_METRICS_LISTEN` wins over it.
    #[arg(long = "legacy-admin-listen", env = "TANDEM_ADMIN_LISTEN", hide = true)]
    pub legacy_admin_listen: Option<SocketAddr>,
    /// Worker threads; 1 runs everything on one thread.
    #[arg(
        long,
        env = "TANDEM_THREADS",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub threads: usize,
    /// Time to connect to a replica, in milliseconds.
    #[arg(long, env = "TANDEM_CONNECT_TIMEOUT_MS", default_value_t = 1_000)]
    pub connect_timeout_ms: u64,
    /// Time for a replica's response head, in milliseconds; then 504.
    #[arg(long, env = "TANDEM_UPSTREAM_TIMEOUT_MS", default_value_t = 60_000)]
    pub upstream_timeout_ms: u64,
    /// Time for a client to send a request head (also closes idle keep-alive connections), in
    /// milliseconds.
    #[arg(long, env = "TANDEM_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// A WebSocket tunnel with no traffic for this long is closed, in milliseconds.
    #[arg(long, env = "TANDEM_IDLE_TIMEOUT_MS", default_value_t = 300_000)]
    pub idle_timeout_ms: u64,
    /// Longest wait, in milliseconds, of a request to an instance with `hold = true` that finds
    /// no healthy replica; then 503.
    #[arg(long, env = "TANDEM_HOLD_TIMEOUT_MS", default_value_t = 5_000)]
    pub hold_timeout_ms: u64,
    /// Largest request body, in bytes; larger ones get 413.
    #[arg(long, env = "TANDEM_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: u64,
    /// Replicas tried per request, the first included.
    #[arg(long, env = "TANDEM_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Add X-Tandem-Replica to responses.
    #[arg(long, env = "TANDEM_REPLICA_HEADER", default_value_t = true, action = clap::ArgAction::Set)]
    pub replica_header: bool,
    /// Log one line per request (target tandem::access).
    #[arg(long, env = "TANDEM_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,
    /// On SIGTERM, time given to in-flight requests, in milliseconds.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// How often the routes file is checked for changes, in milliseconds.
    #[arg(long, env = "TANDEM_RELOAD_POLL_MS", default_value_t = 1_000)]
    pub reload_poll_ms: u64,
    /// With --control-plane: the MQTT proxy's shared listener (`host:port`), where replicas log
    /// in with their own token (`tandem serve --mqtt-proxy-address`); the tokens' hashes come
    /// with the route feed. Needs --mqtt-upstream.
    #[arg(long, env = "TANDEM_MQTT_LISTEN", requires_all = ["control_plane", "mqtt_upstream"])]
    pub mqtt_listen: Option<SocketAddr>,
    /// With --mqtt-listen: the MQTT broker (`host:port`).
    #[arg(long, env = "TANDEM_MQTT_UPSTREAM", requires = "mqtt_listen")]
    pub mqtt_upstream: Option<String>,
    /// Connect to the MQTT broker with TLS.
    #[arg(long, env = "TANDEM_MQTT_TLS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", requires = "mqtt_upstream")]
    pub mqtt_tls: bool,
    /// With --mqtt-tls: PEM file of the CA certificates to trust (default: Mozilla's roots).
    #[arg(long, env = "TANDEM_MQTT_CA_FILE", requires = "mqtt_tls")]
    pub mqtt_ca_file: Option<PathBuf>,
    /// HTTPS. With a routes file, its `[tls]` section may give the certificates instead.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// HTTPS flags, the same for `tandem proxy` and `tandem serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// Address of the HTTPS listener (HTTP/2 and HTTP/1.1 by ALPN); default 127.0.0.1:8443 when
    /// a certificate is given.
    #[arg(long, env = "TANDEM_HTTPS_LISTEN")]
    pub https_listen: Option<SocketAddr>,
    /// The default certificate (PEM chain, leaf first) of the HTTPS listener, typically
    /// `*.<base-domain>`; served to clients that ask for a name no other certificate covers.
    /// Checked for changes every few seconds and reloaded (a broken rewrite keeps the previous
    /// one serving).
    #[arg(long, env = "TANDEM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TANDEM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Answer every request on the plain HTTP listener with a redirect (308) to the same URL on
    /// HTTPS.
    #[arg(long, env = "TANDEM_HTTPS_REDIRECT", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub https_redirect: bool,
}

/// Where the HTTPS listener listens when a certificate is given without `--https-listen`.
pub const DEFAULT_HTTPS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8443);

impl TlsArgs {
    /// The HTTPS listener's address: `--https-listen`, else [`DEFAULT_HTTPS_LISTEN`] when a
    /// certificate is given; `None` without HTTPS.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_listen
            .or(self.tls_cert.is_some().then_some(DEFAULT_HTTPS_LISTEN))
    }

    /// The default certificate's files.
    pub fn default_files(&self) -> Option<tandem_proxy::tls::FilePair> {
        Some(tandem_proxy::tls::FilePair {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
        })
    }
}

/// Where `tandem proxy` and `tandem serve` serve their metrics unless told otherwise.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

impl ProxyArgs {
    /// The metrics listener's address: `--metrics-listen` (or `--admin-listen`,
    /// `TANDEM_METRICS_LISTEN`), else `TANDEM_ADMIN_LISTEN`, else [`DEFAULT_METRICS_LISTEN`].
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listen
            .or(self.legacy_admin_listen)
            .unwrap_or(DEFAULT_METRICS_LISTEN)
    }
}

/// Flags of `tandem serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Where Tandem keeps its data (SQLite database, admin token, instances).
    #[arg(long, env = "TANDEM_DATA_DIR", default_value = "./tandem-data")]
    pub data_dir: PathBuf,
    /// Address of the REST API.
    #[arg(long, env = "TANDEM_API_LISTEN", default_value = "127.0.0.1:3000")]
    pub api_listen: SocketAddr,
    /// Address where instances are served (by host name).
    #[arg(long, env = "TANDEM_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// The platform key (64 hex digits) instead of `<data-dir>/secret-key`: control planes
    /// that share a database are each given the same key. A key that does not match the
    /// database's is refused at start.
    #[arg(long, env = "TANDEM_PLATFORM_KEY_FILE")]
    pub platform_key_file: Option<PathBuf>,
    /// This control plane's id among those sharing the database; default
    /// `<host name>:<API address>`.
    #[arg(long, env = "TANDEM_CONTROL_PLANE_ID")]
    pub control_plane_id: Option<String>,
    /// Where the other control planes reach this one's API (they forward to the leader);
    /// default the API's address (127.0.0.1 when it listens on every address).
    #[arg(long, env = "TANDEM_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    /// How long the coordinator's lease lasts without renewal, in milliseconds: another
    /// control plane takes over within about this long after the leader stops.
    #[arg(long, env = "TANDEM_LEASE_TTL_MS", default_value_t = 5_000)]
    pub lease_ttl_ms: u64,
    /// Run without the in-process proxy: instances are served by standalone proxies
    /// (`tandem proxy --control-plane`) only, and `--http-listen` is not bound.
    #[arg(long, env = "TANDEM_NO_PROXY")]
    pub no_proxy: bool,
    /// Address of the metrics listener (/metrics in the Prometheus text format, /healthz),
    /// unauthenticated like any Prometheus exporter: keep it on a private network.
    #[arg(long, env = "TANDEM_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
    /// PostgreSQL URL (postgres://user:password@host/db); SQLite in the data directory when absent.
    #[arg(long, env = "TANDEM_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Instances are served at <name>.<base-domain>.
    #[arg(long, env = "TANDEM_BASE_DOMAIN", default_value = "localhost")]
    pub base_domain: String,
    /// Largest HA replica count.
    #[arg(long, env = "TANDEM_MAX_HA_REPLICAS", default_value_t = 8)]
    pub max_ha_replicas: u32,
    /// Largest body, in MiB, of the routes that take whole documents: `PUT
    /// /instances/{id}/flows`, snapshot imports and the replicas' storage API. Real flows carry
    /// images and many tabs; every other route takes 1 MiB.
    #[arg(long, env = "TANDEM_MAX_DOCUMENT_MIB", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_document_mib: u32,
    /// Longest wait, in milliseconds, of a request that finds no replica of its instance ready
    /// while one is expected (a standby taking over, a deploy switching the active, a start);
    /// then 503. 0 answers 503 at once.
    #[arg(long, env = "TANDEM_HOLD_TIMEOUT_MS", default_value_t = 5_000)]
    pub hold_timeout_ms: u64,
    /// The npm registry instances' modules are installed from (a private registry); npm's
    /// default otherwise.
    #[arg(long, env = "TANDEM_NPM_REGISTRY")]
    pub npm_registry: Option<String>,
    /// A file holding the token of the npm registry (`--npm-registry`, or npm's default): one
    /// line. Tandem writes it into a private npm configuration in the data directory (0600),
    /// outside what replicas can read, and never shows or logs it.
    #[arg(long, env = "TANDEM_NPM_TOKEN_FILE")]
    pub npm_token_file: Option<std::path::PathBuf>,
    /// Let modules run their install scripts. Off by default: they run on Tandem's machine, as
    /// Tandem's OS user, outside any replica's sandbox.
    #[arg(long, env = "TANDEM_NPM_ALLOW_INSTALL_SCRIPTS")]
    pub npm_allow_install_scripts: bool,
    /// Delay before restarting a replica that ended, in milliseconds; doubles with each crash
    /// in a row, up to 60 s.
    #[arg(long, env = "TANDEM_RESTART_BACKOFF_MS", default_value_t = 1_000)]
    pub restart_backoff_ms: u64,
    /// Crashes in a row, each within 60 s of its start, after which a replica is held as
    /// `crashed` instead of restarted (until the instance is started or restarted).
    #[arg(long, env = "TANDEM_CRASH_LOOP_RESTARTS", default_value_t = 5)]
    pub crash_loop_restarts: u32,
    /// Time between liveness checks of a running replica (its admin API), in milliseconds.
    #[arg(long, env = "TANDEM_LIVENESS_CHECK_MS", default_value_t = 250)]
    pub liveness_check_ms: u64,
    /// A replica whose admin API has not answered for this long, in milliseconds, is hung: it
    /// leaves the rotation at once, is fenced (SIGKILL of its process group) and restarted; in
    /// standby mode a ready standby takes over. A flow that blocks Node.js's event loop for
    /// longer makes its replica count as hung: raise this for such flows.
    #[arg(long, env = "TANDEM_HANG_AFTER_MS", default_value_t = 1_000)]
    pub hang_after_ms: u64,
    /// Time a new replica gets to be ready (its flows started) before it is killed and counts
    /// as a failed start, in milliseconds.
    #[arg(long, env = "TANDEM_READY_TIMEOUT_MS", default_value_t = 60_000)]
    pub ready_timeout_ms: u64,
    /// Longest wait, in milliseconds, for the requests in flight to a replica taken out of
    /// rotation (scale down, replacement, stop) to finish before it is stopped.
    #[arg(long, env = "TANDEM_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Time between SIGTERM and SIGKILL when a replica is stopped, in milliseconds.
    #[arg(long, env = "TANDEM_STOP_GRACE_MS", default_value_t = 10_000)]
    pub stop_grace_ms: u64,
    /// MQTT broker (`host:port`) for the instances' flows. When set, every replica
    /// gets its own listener of Tandem's MQTT proxy in front of it, as `TANDEM_MQTT_URL` in its
    /// environment; on HA instances the proxy makes client ids unique per replica and shares
    /// subscriptions across replicas.
    #[arg(long, env = "TANDEM_MQTT_UPSTREAM")]
    pub mqtt_upstream: Option<String>,
    /// Connect to the MQTT broker with TLS.
    #[arg(long, env = "TANDEM_MQTT_TLS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub mqtt_tls: bool,
    /// With --mqtt-tls: PEM file of the CA certificates to trust (default: Mozilla's roots).
    #[arg(long, env = "TANDEM_MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,
    /// With --mqtt-upstream: one shared MQTT listener at this address (`host:port`) instead of
    /// one per replica; each replica logs in with its own token, which its `TANDEM_MQTT_URL`
    /// carries. Give a fixed port: the URLs name it, and adopted replicas keep theirs.
    #[arg(long, env = "TANDEM_MQTT_LISTEN")]
    pub mqtt_listen: Option<SocketAddr>,
    /// The MQTT listener of the standalone proxies (`tandem proxy --mqtt-listen`), as replicas
    /// reach it (`host:port`, e.g. the proxies' Service `tandem-proxy:1883`): replicas log in
    /// there with their own token, whose hash the proxies get in the route feed. Instead of
    /// --mqtt-upstream, which the proxies take then.
    #[arg(long, env = "TANDEM_MQTT_PROXY_ADDRESS", conflicts_with_all = ["mqtt_upstream", "mqtt_listen"])]
    pub mqtt_proxy_address: Option<String>,
    /// Where Node-RED stacks are installed (npm); default `<data-dir>/stacks`.
    #[arg(long, env = "TANDEM_STACKS_DIR")]
    pub stacks_dir: Option<PathBuf>,
    /// Stop every Node-RED replica when Tandem exits. By default replicas keep running and the
    /// next `tandem serve` adopts them, so restarting Tandem does not restart instances.
    #[arg(long, env = "TANDEM_STOP_REPLICAS_ON_EXIT", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub stop_replicas_on_exit: bool,
    /// Refuse to start replicas without a sandbox. By default, where the kernel has no Landlock,
    /// replicas start unconfined with a warning in their log and `isolation: none` in the status.
    #[arg(long, env = "TANDEM_REQUIRE_ISOLATION", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub require_isolation: bool,
    /// What runs the instances' replicas: `local` processes on this machine, or `kubernetes`
    /// pods (the cluster of the in-cluster configuration, or of the kubeconfig).
    #[arg(long, env = "TANDEM_DRIVER", value_enum, default_value_t = crate::drivers::DriverKind::Local)]
    pub driver: crate::drivers::DriverKind,
    /// With `--driver kubernetes`: the namespace of the instances' pods, their ConfigMaps and
    /// Secrets; default the namespace of the pod Tandem runs in (`POD_NAMESPACE`), else that of
    /// the kubeconfig's context.
    #[arg(long, env = "TANDEM_KUBE_NAMESPACE")]
    pub kube_namespace: Option<String>,
    /// With `--driver kubernetes`: the Node-RED image repository; a stack's Node-RED version is
    /// its tag.
    #[arg(long, env = "TANDEM_KUBE_IMAGE", default_value = "nodered/node-red")]
    pub kube_image: String,
    /// The base URL replicas reach Tandem's API at, for their flows' storage; default the API's
    /// own address. Pods on a cluster reach it through its Service, e.g.
    /// `http://tandem-api.tandem.svc:3000`.
    #[arg(long, env = "TANDEM_STORAGE_URL")]
    pub storage_url: Option<String>,
    /// Warm Node-RED runtimes kept ready per stack in use (local driver): a new replica whose
    /// instance has no settings or modules of its own starts its flows on one in tens of
    /// milliseconds instead of booting Node-RED. 0 turns the pool off.
    #[arg(long, env = "TANDEM_WARM_RUNTIMES", default_value_t = 1)]
    pub warm_runtimes: usize,
    /// HTTPS for the instances (`https://<name>.<base-domain>:<port>`), with custom hostnames'
    /// own certificates. Needs the in-process proxy.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `tandem user ...`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password is read from the first line of standard input.
    Create {
        /// Username.
        name: String,
        /// Make the user a platform admin.
        #[arg(long)]
        admin: bool,
        /// Email.
        #[arg(long)]
        email: Option<String>,
        /// Data directory (as for `tandem serve`).
        #[arg(long, env = "TANDEM_DATA_DIR", default_value = "./tandem-data")]
        data_dir: PathBuf,
        /// PostgreSQL URL (as for `tandem serve`).
        #[arg(long, env = "TANDEM_DATABASE_URL")]
        database_url: Option<String>,
    },
}

/// Runs the command line: parses the arguments and runs the command.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The sandbox launcher goes first: no tracing (its output is the replica's log) and no
    // runtime threads (Landlock restricts only the calling thread until the exec).
    if let Command::SandboxExec(args) = cli.command {
        args.run()
    }
    crate::init_tracing();
    match cli.command {
        Command::SandboxExec(args) => args.run(),
        Command::Proxy(args) => {
            let mut rt = if args.threads == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                if args.threads > 1 {
                    b.worker_threads(args.threads);
                }
                b
            };
            rt.enable_all()
                .build()?
                .block_on(crate::proxy_cmd::run(*args))
        }
        Command::Serve(args) => {
            tokio::runtime::Runtime::new()?.block_on(crate::serve_cmd::run(*args))
        }
        Command::Backup {
            to,
            data_dir,
            platform_key_file,
        } => {
            tokio::runtime::Runtime::new()?.block_on(crate::backup::backup(
                &data_dir,
                platform_key_file.as_deref(),
                &to,
            ))?;
            println!("backed up {} to {}", data_dir.display(), to.display());
            Ok(())
        }
        Command::Restore { from, data_dir } => {
            tokio::runtime::Runtime::new()?.block_on(crate::backup::restore(&from, &data_dir))?;
            println!("restored {} into {}", from.display(), data_dir.display());
            Ok(())
        }
        Command::User(UserCommand::Create {
            name,
            admin,
            email,
            data_dir,
            database_url,
        }) => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            tokio::runtime::Runtime::new()?.block_on(async {
                let state =
                    crate::serve_cmd::state(&data_dir, database_url.as_deref(), Default::default())
                        .await?;
                let user = crate::api::users::insert_user(
                    &state,
                    None,
                    &name,
                    Some(password),
                    email.as_deref(),
                    admin,
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                println!("created user {} ({})", user.username, user.id);
                Ok(())
            })
        }
    }
}
