//! A throwaway PostgreSQL cluster for the fleet tests: `initdb` in a temporary directory, the
//! server on a free loopback port with its unix socket in that directory, one database, and a
//! URL for tollgate's `[store] url_env`. Dropping the cluster stops the server and removes the
//! directory, also when the test panics.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI), `initdb`, `postgres` and
//! `pg_ctl` run as the `postgres` system user (the Debian package creates it) in a directory
//! handed over to that user; as any other user they run as that user.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The role tollgate connects as (the cluster's superuser, trusted on loopback).
pub const PG_USER: &str = "tollgate";
/// The database the fleet shares.
pub const PG_DATABASE: &str = "tollgate_fleet";

/// How `pg_ctl stop` shuts the server down.
#[derive(Clone, Copy, Debug)]
pub enum StopMode {
    /// Waits for nothing: disconnects every client, aborts open transactions, checkpoints.
    Fast,
    /// No checkpoint: like a crash of the database server (recovery runs at the next start).
    Immediate,
}

impl StopMode {
    fn arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

pub struct PgCluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    /// (uid, gid) to run the server tools as, when this process is root.
    run_as: Option<(u32, u32)>,
    pub port: u16,
    running: bool,
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/*/bin`, else wherever `initdb` is on `PATH`.
pub fn find_bindir() -> Option<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_tools(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_tools(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| has_tools(d))
}

/// This process's effective uid (the owner of `/proc/self`).
fn euid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// The uid and gid of a system user, from `/etc/passwd`.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

impl PgCluster {
    /// Creates, starts and fills a new cluster; panics with what went wrong (PostgreSQL not
    /// installed, no `postgres` user while root, a tool failing) and its output.
    pub fn start() -> PgCluster {
        let bindir = find_bindir().expect(
            "PostgreSQL not found (no pg_config --bindir, /usr/lib/postgresql/*/bin or initdb on \
             PATH): install Debian's `postgresql` package, as .ci/run does",
        );
        let run_as = if euid() == 0 {
            Some(user_ids("postgres").expect(
                "running as root, and PostgreSQL refuses root: a `postgres` system user is needed \
                 (Debian's postgresql package creates it)",
            ))
        } else {
            None
        };
        // As root, under /tmp: the `postgres` user must reach the directory, and a TMPDIR
        // under root's home would not let it.
        let base = match run_as {
            Some(_) => PathBuf::from("/tmp"),
            None => std::env::temp_dir(),
        };
        let dir = tempfile::Builder::new()
            .prefix("tollgate-pg-")
            .tempdir_in(base)
            .unwrap();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut pg = PgCluster {
            dir,
            bindir,
            run_as,
            port: 0,
            running: false,
        };
        pg.tool_ok(
            "initdb",
            &[
                "-D",
                &pg.data_dir().display().to_string(),
                "-U",
                PG_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        // Throwaway data: no fsync. A clean stop (`fast`) still checkpoints, so a restart
        // loses nothing either way.
        let conf = pg.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = 200\nfsync = off\nfull_page_writes = off\n",
            pg.dir.path().display()
        ));
        std::fs::write(&conf, text).unwrap();
        // A port found free can be taken before the server binds it: then try another.
        for attempt in 0.. {
            pg.port = super::free_port();
            std::fs::write(
                pg.data_dir().join("postgresql.auto.conf"),
                format!("port = {}\n", pg.port),
            )
            .unwrap();
            match pg.try_start() {
                Ok(()) => break,
                Err(e) if attempt < 4 => eprintln!("postgres did not start, retrying: {e}"),
                Err(e) => panic!("{e}"),
            }
        }
        let out = Command::new(pg.bindir.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", PG_USER])
            .arg(PG_DATABASE)
            .output()
            .unwrap();
        assert!(out.status.success(), "createdb: {}", show(&out));
        pg
    }

    /// `postgres://tollgate@127.0.0.1:PORT/tollgate_fleet`.
    pub fn url(&self) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{PG_DATABASE}", self.port)
    }

    /// The temporary directory (data, socket, log); removed on drop.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A server tool (`initdb`, `pg_ctl`) as the server's user.
    fn tool(&self, name: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.bindir.join(name));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
    }

    fn tool_ok(&self, name: &str, args: &[&str]) {
        let out = self.tool(name, args);
        assert!(out.status.success(), "{name} {args:?}: {}", show(&out));
    }

    fn try_start(&mut self) -> Result<(), String> {
        let data = self.data_dir().display().to_string();
        let log = self.log_path().display().to_string();
        let out = self.tool(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-t", "60", "start"],
        );
        if !out.status.success() {
            return Err(format!("pg_ctl start: {}\n{}", show(&out), self.log()));
        }
        self.running = true;
        Ok(())
    }

    /// Starts the server again on the same port and data (after [`PgCluster::stop`]).
    pub fn restart(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// `pg_ctl stop -m MODE`, waiting until the server is gone.
    pub fn stop(&mut self, mode: StopMode) {
        let data = self.data_dir().display().to_string();
        self.tool_ok(
            "pg_ctl",
            &["-D", &data, "-m", mode.arg(), "-w", "-t", "60", "stop"],
        );
        self.running = false;
    }

    /// Runs one SQL statement with `psql` and returns its unaligned output (`-At`).
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new(self.bindir.join("psql"))
            .args([
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url(),
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql:?}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits until the server accepts connections (after a start), up to `limit`.
    pub fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let out = Command::new(self.bindir.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let data = self.data_dir().display().to_string();
            let _ = self.tool("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        }
        // The TempDir removes the directory (root may remove the postgres user's files; any
        // other user owns them).
    }
}

fn show(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
