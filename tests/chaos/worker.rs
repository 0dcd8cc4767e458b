//! Worker child processes (`examples/chaos_worker.rs`): spawn with a
//! configuration, read their JSON lines, SIGKILL / SIGTERM / SIGSTOP them,
//! and read their peak RSS (`VmHWM`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The worker binary, built if needed (the test binary's sibling
/// `examples/` directory).
pub fn worker_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let mut extra = vec!["--features", "failpoints"];
            // The same profile as this test binary: the path is its
            // sibling directory.
            if !cfg!(debug_assertions) {
                extra.push("--release");
            }
            crate::support::examples::build_example("chaos_worker", &extra)
        })
        .clone()
}

/// Peak resident set size of a live process, in kB (`VmHWM`).
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Sends a signal by name ("TERM", "STOP", "CONT", "KILL") to a process.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// One worker process.
pub struct Worker {
    pub instance: String,
    child: Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    peak_kb: Arc<Mutex<u64>>,
}

impl Worker {
    /// Spawns a worker; stderr goes to `<log_dir>/<instance>.log` (appended).
    pub fn spawn(env: &[(String, String)], instance: &str, log_dir: &Path) -> Worker {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("{instance}.log")))
            .expect("worker log file");
        let mut child = Command::new(worker_binary())
            .envs(env.iter().cloned())
            .env("CHAOS_INSTANCE", instance)
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_WORKER_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn the chaos worker");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(v);
                }
            }
        });
        Worker {
            instance: instance.to_owned(),
            child,
            lines,
            peak_kb: Arc::new(Mutex::new(0)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Samples the peak RSS (call often; lost once the process is gone).
    pub fn sample_rss(&self) -> u64 {
        let mut peak = self.peak_kb.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kb) = peak_rss_kb(self.pid()) {
            *peak = (*peak).max(kb);
        }
        *peak
    }

    /// The JSON lines printed so far with `"event" == kind`.
    pub fn events(&self, kind: &str) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|v| v["event"] == kind)
            .cloned()
            .collect()
    }

    /// Whether it printed `started`.
    pub fn started(&self) -> bool {
        !self.events("started").is_empty()
    }

    /// Waits until it printed `started`; false if it exited or timed out.
    pub async fn wait_started(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.started() {
                return true;
            }
            if !self.alive() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        self.sample_rss();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for a graceful exit (SIGKILL
    /// after that). Returns how long the stop took and whether it was clean.
    pub async fn terminate(&mut self, timeout: Duration) -> (Duration, bool) {
        self.sample_rss();
        let start = Instant::now();
        signal(self.pid(), "TERM");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (start.elapsed(), status.success());
            }
            if start.elapsed() > timeout {
                self.kill9();
                return (start.elapsed(), false);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The exit status, if it exited.
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }

    /// Its last stderr lines (for failure messages).
    pub fn log_tail(log_dir: &Path, instance: &str, lines: usize) -> String {
        let text =
            std::fs::read_to_string(log_dir.join(format!("{instance}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
