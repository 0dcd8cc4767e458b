//! A loopback TCP proxy that injects network faults between a worker and
//! Redis or PostgreSQL: latency, a blackhole, resets and a cut after some
//! bytes (the Toxiproxy model, without root or `tc`).
//!
//! ```ignore
//! let proxy = Proxy::start(redis.port).await;
//! // point the worker at 127.0.0.1:{proxy.port} …
//! proxy.set(Mode::Blackhole);            // connections hang
//! proxy.set(Mode::Pass);                 // and recover
//! ```

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward each chunk after this delay.
    Latency(Duration),
    /// Accept connections and read what arrives, but forward nothing, in
    /// either direction (a partition that does not close connections).
    Blackhole,
    /// Reset (RST) every open connection, and each new one at once.
    Reset,
    /// Forward client → server bytes until this many more have passed on a
    /// connection, then cut it (an ambiguous write: the request may have
    /// reached the server, its answer never returns).
    SeverAfter(u64),
    /// Forward everything, but cut a connection right after forwarding a
    /// client → server chunk that contains these bytes (`b"COMMIT"`: the
    /// server gets the commit, the client never hears whether it held).
    SeverOn(&'static [u8]),
}

/// A proxy on a free loopback port, forwarding to `127.0.0.1:<upstream>`.
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    mode: watch::Sender<Mode>,
    /// Connections cut by `SeverAfter` or `SeverOn`.
    severed: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Starts forwarding to `127.0.0.1:upstream`, in `Mode::Pass`.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let upstream: SocketAddr = ([127, 0, 0, 1], upstream).into();
        let (mode, watcher) = watch::channel(Mode::Pass);
        let accepted = Arc::new(AtomicU64::new(0));
        let severed = Arc::new(AtomicU64::new(0));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let task = tokio::spawn({
            let accepted = Arc::clone(&accepted);
            let connections = Arc::clone(&connections);
            let severed = Arc::clone(&severed);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let handle = tokio::spawn(serve(
                        client,
                        upstream,
                        watcher.clone(),
                        Arc::clone(&severed),
                    ));
                    if let Ok(mut c) = connections.lock() {
                        c.retain(|h| !h.is_finished());
                        c.push(handle);
                    }
                }
            }
        });
        Proxy {
            port,
            mode,
            severed,
            accepted,
            task,
            connections,
        }
    }

    /// Changes the mode for open and new connections.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Connections accepted so far (reconnects show here).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections cut by `SeverAfter` or `SeverOn` so far.
    pub fn severed(&self) -> u64 {
        self.severed.load(Ordering::Relaxed)
    }

    /// A URL like `base` with its port replaced by the proxy's.
    pub fn url(&self, scheme_and_auth: &str, path: &str) -> String {
        format!("{scheme_and_auth}127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(c) = self.connections.lock() {
            for h in c.iter() {
                h.abort();
            }
        }
    }
}

/// Ends a connection with RST rather than FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    severed: Arc<AtomicU64>,
) {
    let initial = *mode.borrow();
    match initial {
        Mode::Reset => return reset(client),
        Mode::Blackhole => return swallow(client, mode.clone()).await,
        _ => {}
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];
    // Bytes still allowed client → server under `SeverAfter`.
    let mut budget: Option<u64> = None;
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Mode::Reset => {
                if let (Ok(c), Ok(s)) = (
                    client_read.reunite(client_write),
                    server_read.reunite(server_write),
                ) {
                    reset(c);
                    reset(s);
                }
                return;
            }
            Mode::SeverAfter(n) if budget.is_none() => budget = Some(n),
            Mode::SeverAfter(_) => {}
            _ => budget = None,
        }
        let forward = !matches!(current, Mode::Blackhole);
        tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            n = client_read.read(&mut up) => {
                let Ok(n) = n else { return };
                if n == 0 {
                    let _ = server_write.shutdown().await;
                    return;
                }
                if !forward {
                    continue;
                }
                if let Mode::Latency(d) = current {
                    tokio::time::sleep(d).await;
                }
                let take = match budget {
                    Some(b) => (n as u64).min(b) as usize,
                    None => n,
                };
                if server_write.write_all(&up[..take]).await.is_err() {
                    return;
                }
                let spent = budget.as_mut().is_some_and(|b| {
                    *b -= take as u64;
                    *b == 0
                });
                let matched = match current {
                    Mode::SeverOn(pattern) => up[..n].windows(pattern.len()).any(|w| w == pattern),
                    _ => false,
                };
                if spent || matched {
                    // Cut: the server got the bytes; the client never
                    // hears back.
                    severed.fetch_add(1, Ordering::Relaxed);
                    if let (Ok(c), Ok(s)) = (
                        client_read.reunite(client_write),
                        server_read.reunite(server_write),
                    ) {
                        reset(c);
                        drop(s);
                    }
                    return;
                }
            }
            n = server_read.read(&mut down) => {
                let Ok(n) = n else { return };
                if n == 0 {
                    let _ = client_write.shutdown().await;
                    return;
                }
                if !forward {
                    continue;
                }
                if let Mode::Latency(d) = current {
                    tokio::time::sleep(d).await;
                }
                if client_write.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Holds a connection open and discards what it sends, until the mode
/// changes away from `Blackhole` (then the connection is reset: the client
/// reconnects through the proxy).
async fn swallow(mut client: TcpStream, mut mode: watch::Receiver<Mode>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() != Mode::Blackhole {
                    return reset(client);
                }
            }
            n = client.read(&mut buf) => {
                if matches!(n, Ok(0) | Err(_)) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port.
    async fn echo() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    async fn round_trip(port: u16, within: Duration) -> Option<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(within, s.read_exact(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(buf.to_vec())
    }

    #[tokio::test]
    async fn modes_do_what_they_say() {
        let proxy = Proxy::start(echo().await).await;
        let quick = Duration::from_millis(500);
        assert_eq!(
            round_trip(proxy.port, quick).await.as_deref(),
            Some(&b"ping"[..])
        );

        proxy.set(Mode::Latency(Duration::from_millis(200)));
        let started = std::time::Instant::now();
        assert!(
            round_trip(proxy.port, Duration::from_secs(2))
                .await
                .is_some()
        );
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "both directions delayed"
        );

        proxy.set(Mode::Blackhole);
        assert_eq!(
            round_trip(proxy.port, quick).await,
            None,
            "nothing comes back"
        );

        proxy.set(Mode::Reset);
        assert_eq!(round_trip(proxy.port, quick).await, None, "reset at once");

        proxy.set(Mode::SeverAfter(2));
        assert_eq!(
            round_trip(proxy.port, quick).await,
            None,
            "cut after 2 bytes"
        );

        proxy.set(Mode::SeverOn(b"ng"));
        assert_eq!(
            round_trip(proxy.port, quick).await,
            None,
            "cut after the chunk with the pattern"
        );
        assert_eq!(proxy.severed(), 2);

        proxy.set(Mode::Pass);
        assert!(round_trip(proxy.port, quick).await.is_some(), "recovers");
        assert!(proxy.accepted() >= 7);
    }
}
