//! The embedding example (`examples/embed_actix_web.rs`) as a child
//! process: its own handlers take `web::Data<ProcessorHandle>` (registered
//! by `redstream::web::configure_with_metrics`), and on SIGTERM
//! (`redstream::web::shutdown_signal`) readiness answers `503` while the
//! processor drains, before the server stops.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{TestContext, eventually};

const GROUP: &str = "order-audit";

/// The example, built with this test binary's features (so the library is
/// not built a second time).
fn binary() -> PathBuf {
    let features: &[&str] = if cfg!(feature = "failpoints") {
        &["--features", "failpoints"]
    } else {
        &[]
    };
    crate::support::examples::build_example("embed_actix_web", features)
}

/// Killed (SIGKILL) if still running when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET`: the status and the JSON body, or `None` when nothing answers.
async fn get(client: &reqwest::Client, url: &str) -> Option<(u16, serde_json::Value)> {
    let response = client.get(url).send().await.ok()?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await.ok()?;
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Some((status, body))
}

#[actix_rt::test]
async fn handlers_take_the_handle_and_readiness_is_off_while_draining_before_the_server_stops() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let binary = binary();
    let stream = ctx.stream("web-orders");
    let instance = format!("embed{}", &ctx.prefix[ctx.prefix.len() - 6..]);
    let base = format!("http://127.0.0.1:{}", free_port());
    let child = Command::new(&binary)
        .env("REDSTREAM__REDIS__URL", &ctx.url)
        .env("REDSTREAM__INSTANCE__NAME", &instance)
        .env("REDSTREAM__CONSUMER__PENDING_CHECK_MS", "100")
        .env("REDSTREAM__SHUTDOWN__DEADLINE_MS", "10000")
        .env("WEB_ORDERS_STREAM", &stream)
        .env("LISTEN_ADDR", base.trim_start_matches("http://"))
        .env("RUST_LOG", "error")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the example");
    let mut child = Proc(child);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    eventually(Duration::from_secs(30), "the example ready", || async {
        matches!(
            get(&client, &format!("{base}/ops/health")).await,
            Some((200, _))
        )
    })
    .await;
    // The application's own handler, through `web::Data<ProcessorHandle>`.
    eventually(Duration::from_secs(10), "both members running", || async {
        match get(&client, &format!("{base}/orders/audit")).await {
            Some((200, body)) => {
                assert_eq!(body["instance"], instance.as_str(), "{body}");
                assert_eq!(body["stopping"], false, "{body}");
                body["members_running"] == 2
            }
            other => panic!("GET /orders/audit: {other:?}"),
        }
    })
    .await;

    // A slow order, so the drain takes long enough to be seen.
    let published = client
        .post(format!("{base}/orders"))
        .header("content-type", "application/json")
        .body(r#"{"order_id": "o-slow", "work_ms": 1500}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(published.status().as_u16(), 202);
    eventually(
        Duration::from_secs(10),
        "the slow order running",
        || async { ctx.pending(&stream, GROUP).await == 1 },
    )
    .await;

    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let signalled = Instant::now();
    // Poll until the server is gone: readiness must answer 503 (stopping)
    // first, and the handle extractor keep working meanwhile.
    let mut unready_at = None;
    let mut stopping_seen_by_handler = false;
    let gone_at = loop {
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "the server did not stop"
        );
        match get(&client, &format!("{base}/ops/health")).await {
            None => break signalled.elapsed(),
            Some((200, _)) => assert!(unready_at.is_none(), "ready again after 503"),
            Some((503, body)) => {
                let processor = body["checks"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["name"] == "processor"))
                    .cloned();
                assert_eq!(
                    processor.as_ref().map(|c| c["detail"].clone()),
                    Some(serde_json::json!("stopping")),
                    "{body}"
                );
                unready_at.get_or_insert(signalled.elapsed());
                if let Some((200, audit)) = get(&client, &format!("{base}/orders/audit")).await {
                    stopping_seen_by_handler |= audit["stopping"] == true;
                }
            }
            other => panic!("GET /ops/health while stopping: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let unready_at = unready_at.expect("readiness answered 503 before the server stopped");
    assert!(unready_at < gone_at);
    assert!(
        stopping_seen_by_handler,
        "a handler read is_stopping() through web::Data<ProcessorHandle>"
    );
    // The slow handler finished before the server went: the drain came first.
    assert!(
        gone_at >= Duration::from_millis(500),
        "the server stopped {gone_at:?} after SIGTERM, before the drain"
    );

    let mut stdout = child.0.stdout.take().unwrap();
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "graceful stop on SIGTERM: {status:?}");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
    assert!(
        out.contains("stopped: 1 orders audited, 0 entries released, all written: true"),
        "{out}"
    );
    assert_eq!(ctx.pending(&stream, GROUP).await, 0);
}
