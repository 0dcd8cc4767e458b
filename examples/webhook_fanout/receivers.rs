//! Webhook receivers on loopback for the demo and the tests: actix-web
//! servers on free ports that record every request and answer as their
//! behaviour says (per webhook id and how many times that id came).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};

/// How a receiver answers one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Answer with this status at once.
    Status(u16),
    /// Answer with this status and `Retry-After: <secs>`.
    RetryAfter(u16, u64),
    /// Wait, then answer with this status (longer than the client's timeout:
    /// a timeout).
    Slow(Duration, u16),
}

/// What a receiver got.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) webhook_id: String,
    pub(crate) timestamp: String,
    pub(crate) signature: String,
    pub(crate) event_type: String,
    pub(crate) body: Vec<u8>,
    /// The how-many-th request for this webhook id, from 1.
    pub(crate) nth: u32,
    pub(crate) reply: Reply,
    /// When it arrived (the tests measure retry delays with it).
    #[allow(dead_code)]
    pub(crate) at: Instant,
}

/// Chooses the reply to a request (its webhook id, the how-many-th for that
/// id, headers and body are in `Received`).
pub(crate) type Behaviour = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

struct Shared {
    behaviour: Behaviour,
    log: Mutex<Vec<Received>>,
    seen: Mutex<HashMap<String, u32>>,
}

/// A running receiver.
pub(crate) struct Receiver {
    pub(crate) url: String,
    shared: Arc<Shared>,
    handle: actix_web::dev::ServerHandle,
}

impl Receiver {
    /// Starts a receiver on a free loopback port.
    pub(crate) async fn start(behaviour: Behaviour) -> std::io::Result<Receiver> {
        let shared = Arc::new(Shared {
            behaviour,
            log: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
        });
        let data = web::Data::from(Arc::clone(&shared));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(1 << 20))
                .default_service(web::to(receive))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(("127.0.0.1", 0))?;
        let port = server
            .addrs()
            .first()
            .map(|a| a.port())
            .ok_or_else(|| std::io::Error::other("receiver bound no address"))?;
        let server = server.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Ok(Receiver {
            url: format!("http://127.0.0.1:{port}/hook"),
            shared,
            handle,
        })
    }

    /// Every request so far, in arrival order.
    pub(crate) fn received(&self) -> Vec<Received> {
        self.shared
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Stops the server without waiting for requests in progress.
    pub(crate) async fn stop(&self) {
        self.handle.stop(false).await;
    }
}

fn header(req: &HttpRequest, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn receive(req: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let webhook_id = header(&req, "webhook-id");
    let nth = match shared.seen.lock() {
        Ok(mut seen) => {
            let n = seen.entry(webhook_id.clone()).or_insert(0);
            *n += 1;
            *n
        }
        Err(_) => 1,
    };
    let mut got = Received {
        webhook_id,
        timestamp: header(&req, "webhook-timestamp"),
        signature: header(&req, "webhook-signature"),
        event_type: header(&req, "webhook-event-type"),
        body: body.to_vec(),
        nth,
        reply: Reply::Status(0),
        at: Instant::now(),
    };
    let reply = (shared.behaviour)(&got);
    got.reply = reply.clone();
    if let Ok(mut log) = shared.log.lock() {
        log.push(got);
    }
    let status = |s: u16| {
        actix_web::http::StatusCode::from_u16(s)
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR)
    };
    match reply {
        Reply::Status(s) => HttpResponse::build(status(s)).finish(),
        Reply::RetryAfter(s, secs) => HttpResponse::build(status(s))
            .insert_header(("retry-after", secs.to_string()))
            .finish(),
        Reply::Slow(wait, s) => {
            actix_rt::time::sleep(wait).await;
            HttpResponse::build(status(s)).finish()
        }
    }
}

/// A number from a seed and a webhook id and attempt, the same on every run:
/// the flaky receiver's dice.
pub(crate) fn dice(seed: u64, webhook_id: &str, nth: u32) -> u64 {
    // FNV-1a over the id, then splitmix64 with the seed and the attempt.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in webhook_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(nth);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
