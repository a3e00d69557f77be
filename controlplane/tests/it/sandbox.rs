//! `tandem sandbox-exec`, the launcher of sandboxed replicas, attacked from inside: a shell and
//! Node.js in a replica's sandbox try to reach the rest of a data directory and other processes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tandem_coordinator::sandbox::{self, Isolation, Rules};

use crate::api::support::TempDir;

/// A data directory as `tandem serve` lays it out, with one replica's userDir to sandbox.
struct DataDir {
    _tmp: TempDir,
    root: PathBuf,
    /// `instances/a/r0`: the sandboxed replica's userDir.
    user_dir: PathBuf,
    /// `instances/b/r0/flows.json`: a neighbour's flows.
    neighbour: PathBuf,
    /// A private temp dir for the replica, outside the data dir.
    tmp: PathBuf,
}

impl DataDir {
    fn new() -> Self {
        let tmp = TempDir::new("tandem-sandbox");
        let root = tmp.path().join("data");
        let user_dir = root.join("instances/a/r0");
        let neighbour = root.join("instances/b/r0/flows.json");
        std::fs::create_dir_all(&user_dir).unwrap();
        std::fs::create_dir_all(neighbour.parent().unwrap()).unwrap();
        std::fs::write(root.join("secret-key"), "platform-key").unwrap();
        std::fs::write(root.join("admin-token"), "admin-token").unwrap();
        std::fs::write(root.join("tandem.db"), "SQLite format 3").unwrap();
        std::fs::write(&neighbour, r#"[{"id":"neighbour"}]"#).unwrap();
        let private_tmp = tmp.path().join("tmp-a");
        std::fs::create_dir_all(&private_tmp).unwrap();
        Self {
            _tmp: tmp,
            root,
            user_dir,
            neighbour,
            tmp: private_tmp,
        }
    }

    /// What the local driver grants a replica: the system, its userDir and its temp dir.
    fn rules(&self) -> Rules {
        let mut rules = Rules::system();
        rules.read_write.push(self.user_dir.clone());
        rules.read_write.push(self.tmp.clone());
        rules
    }
}

/// Whether this kernel enforces Landlock; prints why the test is skipped when it does not.
fn landlock(test: &str) -> Option<u32> {
    match sandbox::probe() {
        Isolation::Landlock { abi } => Some(abi),
        Isolation::None { reason } => {
            eprintln!("SKIPPED {test}: this kernel does not enforce Landlock: {reason}");
            None
        }
    }
}

/// Runs `program args` through `tandem sandbox-exec --require` with `rules`, in `cwd`.
fn sandboxed(rules: &Rules, cwd: &Path, program: &str, args: &[&str]) -> Output {
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(sandbox::launcher_args(rules, true, program.as_ref(), &args))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn sh(rules: &Rules, cwd: &Path, script: &str) -> Output {
    sandboxed(rules, cwd, "/bin/sh", &["-c", script])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): stdout {:?}, stderr {:?}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[track_caller]
fn assert_denied(out: &Output, what: &str) {
    assert!(
        !out.status.success() && text(&out.stderr).contains("Permission denied"),
        "{what} was not refused ({}): stdout {:?}, stderr {:?}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn a_shell_in_the_sandbox_keeps_its_user_dir_and_loses_the_rest_of_the_data_dir() {
    if landlock("sandbox shell").is_none() {
        return;
    }
    let data = DataDir::new();
    let rules = data.rules();
    let user_dir = data.user_dir.display().to_string();
    let root = data.root.display().to_string();

    // Its own userDir: create, write, read, list, remove.
    let out = sh(
        &rules,
        &data.user_dir,
        "mkdir -p lib/x && echo hello > lib/x/note && cat lib/x/note && ls lib/x \
         && rm -r lib && echo '[]' > flows.json && cat flows.json",
    );
    assert_eq!(assert_ok(&out, "using the userDir"), "hello\nnote\n[]\n");
    assert!(
        out.stderr.is_empty(),
        "the launcher printed {:?}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(data.user_dir.join("flows.json")).unwrap(),
        "[]\n"
    );

    // The platform's secrets, the database, a neighbour, the data dir itself.
    for file in ["secret-key", "admin-token", "tandem.db"] {
        assert_denied(
            &sh(&rules, &data.user_dir, &format!("cat {root}/{file}")),
            file,
        );
    }
    assert_denied(
        &sh(
            &rules,
            &data.user_dir,
            &format!("cat {}", data.neighbour.display()),
        ),
        "reading a neighbour's flows.json",
    );
    assert_denied(
        &sh(&rules, &data.user_dir, &format!("ls {root}")),
        "listing the data dir",
    );
    assert_denied(
        &sh(&rules, &data.user_dir, &format!("ls {root}/instances")),
        "listing the instances",
    );
    assert_denied(
        &sh(&rules, &data.user_dir, &format!("echo x > {root}/evil")),
        "writing into the data dir",
    );
    assert_denied(
        &sh(
            &rules,
            &data.user_dir,
            &format!("echo '[]' > {}", data.neighbour.display()),
        ),
        "overwriting a neighbour's flows",
    );
    assert_denied(
        &sh(
            &rules,
            &data.user_dir,
            &format!("mv {user_dir}/flows.json {root}/"),
        ),
        "moving a file out of the userDir",
    );
    assert!(!data.root.join("evil").exists());
    assert!(data.root.join("secret-key").exists());
    // Beyond the data dir: the system's /tmp and (run as root) /etc/shadow.
    assert_denied(&sh(&rules, &data.user_dir, "ls /tmp"), "listing /tmp");
    if Path::new("/etc/shadow").exists() {
        assert_denied(
            &sh(&rules, &data.user_dir, "cat /etc/shadow"),
            "reading /etc/shadow",
        );
    }

    // The system still works: a shell, coreutils, devices, certificates, the private temp dir.
    let out = sh(
        &rules,
        &data.user_dir,
        &format!(
            "echo discarded > /dev/null && head -c 8 /dev/urandom | wc -c \
             && ls /etc/ssl/certs | grep -c . >/dev/null && echo certs \
             && echo t > {tmp}/t && cat {tmp}/t",
            tmp = data.tmp.display()
        ),
    );
    assert_eq!(assert_ok(&out, "using the system"), "8\ncerts\nt\n");
}

#[test]
fn a_sandboxed_process_cannot_read_or_signal_processes_outside_it() {
    let Some(abi) = landlock("sandbox /proc") else {
        return;
    };
    let data = DataDir::new();
    let rules = data.rules();
    let marker = format!("marker-{}", std::process::id());
    // A process outside the sandbox with a secret in its environment (as a replica's parent,
    // Tandem, or a neighbour replica has).
    let mut outside = Command::new("sleep")
        .arg("60")
        .env("TANDEM_TEST_SECRET", &marker)
        .spawn()
        .unwrap();
    let pid = outside.id();
    // Control: readable from outside the sandbox, once `sleep` has exec'd (until then the
    // child's environment is the test's own).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text(&std::fs::read(format!("/proc/{pid}/environ")).unwrap()).contains(&marker) {
        assert!(
            Instant::now() < deadline,
            "control: the marker never showed in /proc/{pid}/environ"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    for target in [pid, std::process::id()] {
        let out = sh(
            &rules,
            &data.user_dir,
            &format!("cat /proc/{target}/environ"),
        );
        assert!(
            !text(&out.stdout).contains(&marker),
            "the marker leaked from /proc/{target}/environ"
        );
        assert_denied(&out, &format!("reading /proc/{target}/environ"));
        // The other entries behind the same ptrace check: memory maps (the bypass for
        // CAP_PERFMON holds for these too), and the links to its files.
        for file in ["maps", "auxv", "mem"] {
            let out = sh(
                &rules,
                &data.user_dir,
                &format!("cat /proc/{target}/{file}"),
            );
            assert_denied(&out, &format!("reading /proc/{target}/{file}"));
        }
        for link in ["cwd", "root", "exe", "fd/0"] {
            let out = sh(
                &rules,
                &data.user_dir,
                &format!("readlink -v /proc/{target}/{link}"),
            );
            assert_denied(&out, &format!("following /proc/{target}/{link}"));
        }
    }
    // No capabilities are left that would pass over those checks (CAP_SYS_ADMIN and CAP_PERFMON
    // read any process's environ whatever its Landlock domain), even when the tests run as root.
    let out = sh(&rules, &data.user_dir, "grep ^Cap /proc/self/status");
    let status = assert_ok(&out, "reading its capabilities");
    let kept = sandbox::KEPT_CAPABILITIES.bits();
    for line in status.lines() {
        let (name, hex) = line.split_once(':').unwrap();
        let caps = u64::from_str_radix(hex.trim(), 16).unwrap();
        assert_eq!(caps & !kept, 0, "{name} still holds {caps:#x}");
    }

    // Its own process stays readable to it: the sandbox does not hide a replica's own
    // environment, so secrets must not travel there.
    let out = sh(
        &rules,
        &data.user_dir,
        "cat /proc/self/environ >/dev/null && echo own",
    );
    assert_eq!(assert_ok(&out, "reading its own environ"), "own\n");

    // Signals out of the sandbox are scoped from ABI 6 on.
    if abi >= 6 {
        let out = sh(&rules, &data.user_dir, &format!("kill -0 {pid}"));
        assert!(
            !out.status.success(),
            "signalling a process outside the sandbox worked: {:?}",
            text(&out.stderr)
        );
    }
    assert!(
        outside.try_wait().unwrap().is_none(),
        "the outside process survived"
    );
    outside.kill().unwrap();
    outside.wait().unwrap();
}

/// `node` as the driver finds it through `PATH`.
fn node() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("node"))
        .find(|p| p.is_file())
}

#[test]
fn node_runs_in_the_sandbox_with_the_system_rules() {
    if landlock("sandbox node").is_none() {
        return;
    }
    let Some(node) = node() else {
        eprintln!("SKIPPED sandbox node: no `node` on PATH");
        return;
    };
    let data = DataDir::new();
    let mut rules = data.rules();
    // The runtime's own directory, as the driver adds it (`/usr` for the system's node).
    let real = std::fs::canonicalize(&node).unwrap();
    rules
        .read_only
        .push(real.parent().unwrap().parent().unwrap().to_path_buf());

    let script = r#"
const fs = require('fs'), os = require('os'), path = require('path'), cp = require('child_process');
const [userDir, secret, neighbour] = process.argv.slice(1);
const denied = (f) => { try { fs.readFileSync(f); return 'READ'; } catch (e) { return e.code; } };
const out = {
  random: require('crypto').randomBytes(8).length,
  cpus: os.cpus().length > 0,
  user: os.userInfo().username.length > 0,
  roots: require('tls').rootCertificates.length > 0,
  tmpdir: os.tmpdir(),
  exec: cp.execSync('echo hi; echo gone > /dev/null').toString().trim(),
  ignore: cp.spawnSync('true', { stdio: 'ignore' }).status,
  secret: denied(secret),
  neighbour: denied(neighbour),
};
fs.writeFileSync(path.join(userDir, 'flows.json'), '[]');
out.userDir = fs.readFileSync(path.join(userDir, 'flows.json'), 'utf8');
fs.writeFileSync(path.join(os.tmpdir(), 'upload'), 'x');
out.tmp = fs.readFileSync(path.join(os.tmpdir(), 'upload'), 'utf8');
new (require('worker_threads').Worker)('require("worker_threads").parentPort.postMessage(1)', { eval: true })
  .on('message', (worker) => {
    out.worker = worker;
    require('dns').lookup('localhost', (err, address) => {
      out.dns = err ? err.code : 'ok';
      const server = require('http').createServer((q, r) => r.end('pong')).listen(0, '127.0.0.1', () => {
        require('http').get({ host: '127.0.0.1', port: server.address().port }, (r) => {
          let body = '';
          r.on('data', (d) => body += d).on('end', () => {
            out.http = body;
            server.close();
            console.log(JSON.stringify(out));
          });
        });
      });
    });
  });
"#;
    let args: Vec<OsString> = [
        "-e".into(),
        script.into(),
        data.user_dir.clone().into_os_string(),
        data.root.join("secret-key").into_os_string(),
        data.neighbour.clone().into_os_string(),
    ]
    .into();
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(sandbox::launcher_args(
            &rules,
            true,
            node.as_os_str(),
            &args,
        ))
        .current_dir(&data.user_dir)
        // As the driver does: only a few variables, the private temp dir as TMPDIR.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("HOME", &data.user_dir)
        .env("TMPDIR", &data.tmp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = assert_ok(&out, "node");
    assert!(
        out.stderr.is_empty(),
        "node printed {:?}",
        text(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        got,
        serde_json::json!({
            "random": 8, "cpus": true, "user": true, "roots": true,
            "tmpdir": data.tmp.display().to_string(),
            "exec": "hi", "ignore": 0,
            "secret": "EACCES", "neighbour": "EACCES",
            "userDir": "[]", "tmp": "x", "worker": 1, "dns": "ok", "http": "pong",
        })
    );
}

#[test]
fn the_launcher_fails_with_126_and_one_line() {
    if landlock("sandbox launcher errors").is_none() {
        return;
    }
    let data = DataDir::new();
    let out = sandboxed(&data.rules(), &data.user_dir, "/nonexistent/node", &[]);
    assert_eq!(out.status.code(), Some(126));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "stderr: {stderr:?}");
    assert!(
        stderr.starts_with("tandem sandbox-exec: cannot execute /nonexistent/node"),
        "stderr: {stderr:?}"
    );

    // A program outside every rule is refused by the sandbox itself.
    let script = data.root.join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho ran\n").unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    let out = sandboxed(&data.rules(), &data.user_dir, script.to_str().unwrap(), &[]);
    assert_eq!(out.status.code(), Some(126));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "stderr: {:?}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}
