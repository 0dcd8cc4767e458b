//! A redis-server owned by one test: free loopback port, its own temporary
//! directory, AOF `always` by default, restartable on the same data, killed
//! on drop. Faults that hit every client run only against these.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

/// How to stop the server before a restart.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// SHUTDOWN (writes what it has).
    Clean,
    /// SIGKILL.
    Kill9,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl RedisServer {
    /// Starts a server with AOF `always`.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `--name value` arguments (which override
    /// the defaults).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = RedisServer {
            port: free_port(),
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn spawn(&mut self) {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--enable-debug-command",
            "local",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "no",
            "--dir",
            &self.dir.path().display().to_string(),
            "--logfile",
            "redis.log",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra.iter().cloned());
        let binary = server_binary();
        let child = Command::new(&binary)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let client = redis::Client::open(self.url()).expect("url");
        let start = Instant::now();
        loop {
            let ok = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok();
            if ok {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "test redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server.
    pub fn stop(&mut self, how: Stop) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        match how {
            Stop::Kill9 => {
                let _ = child.kill();
            }
            Stop::Clean => {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
        }
        let _ = child.wait();
    }

    /// Stops and starts again on the same port and data directory.
    pub fn restart(&mut self, how: Stop) {
        self.stop(how);
        self.spawn();
    }

    /// A simulated OS crash under `appendfsync everysec`: SIGKILL, then cut
    /// the last `k` bytes off the newest incremental AOF file
    /// (`appendonlydir/*.incr.aof`, Redis 7 multi-part AOF), standing in for
    /// the page cache the kernel never wrote, then start again on the same
    /// directory. Returns (file, bytes cut, its length before).
    pub fn crash_truncating_aof(&mut self, k: u64) -> (PathBuf, u64, u64) {
        self.stop(Stop::Kill9);
        let file = self.newest_incr_aof();
        let len = std::fs::metadata(&file).expect("incr AOF metadata").len();
        let cut = k.min(len);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_len(len - cut))
            .expect("truncate the incr AOF");
        self.spawn();
        (file, cut, len)
    }

    /// The incremental AOF file Redis appends to now: the highest sequence
    /// number among `appendonlydir/<name>.<seq>.incr.aof`.
    fn newest_incr_aof(&self) -> PathBuf {
        let dir = self.dir.path().join("appendonlydir");
        std::fs::read_dir(&dir)
            .expect("appendonlydir (AOF on?)")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let name = p.file_name()?.to_str()?.to_owned();
                let seq: u64 = name
                    .strip_suffix(".incr.aof")?
                    .rsplit('.')
                    .next()?
                    .parse()
                    .ok()?;
                Some((seq, p))
            })
            .max_by_key(|(seq, _)| *seq)
            .map(|(_, p)| p)
            .expect("an incr AOF file")
    }

    /// The server's log (`redis.log` in its directory).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Sends a signal (e.g. "STOP", "CONT") to the server process.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status();
        }
    }

    /// Runs a command on the server (faults: CLIENT KILL, DEBUG, CONFIG…).
    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        run_command(&self.url(), args).expect("command on test redis")
    }
}

/// Runs one command (`args[0]` and its arguments) on a connection of its
/// own to `url`, which must connect within 2 s; the command's reply.
pub fn run_command(url: &str, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(url).expect("url");
    let mut c = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut c)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop(Stop::Kill9);
    }
}

/// The server binary tests start: `REDSTREAM_TEST_REDIS_SERVER` (a path to
/// a `redis-server` or `valkey-server`, e.g. Redis 8.2 or Valkey 9), else
/// `redis-server` on `PATH`.
pub fn server_binary() -> String {
    std::env::var("REDSTREAM_TEST_REDIS_SERVER")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "redis-server".to_owned())
}
