//! `rediss://` with an ACL user, against a TLS-only redis-server this test
//! starts with its own CA. Its own binary: it points `SSL_CERT_FILE` (read
//! by the client's native root store) at that CA, a process-global setting.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    unsafe_code
)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redstream::prelude::*;

struct TlsRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_redis() -> TlsRedis {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("server.pem"), cert.pem()).unwrap();
    std::fs::write(path("server.key"), key.serialize_pem()).unwrap();
    // SAFETY: set before any client exists; the only test in this binary.
    unsafe { std::env::set_var("SSL_CERT_FILE", path("ca.pem")) };

    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server.key"),
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.path().display().to_string(),
            "--user",
            "default",
            "off",
            "--user",
            "app",
            "on",
            ">s3cret-pw",
            "~*",
            "&*",
            "+@all",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server on PATH");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "TLS redis did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    TlsRedis {
        child,
        port,
        _dir: dir,
    }
}

#[actix_rt::test]
async fn rediss_with_an_acl_user_processes_events_and_never_shows_the_password() {
    let server = start_tls_redis();
    let mut settings = Settings::default();
    settings.instance.name = "tls-test".into();
    settings.consumer.block_ms = 200;
    settings.redis.url = format!("rediss://app:s3cret-pw@127.0.0.1:{}/0", server.port)
        .parse()
        .unwrap();
    assert!(!format!("{settings:?}").contains("s3cret-pw"));

    let handled = Arc::new(AtomicU32::new(0));
    let count = Arc::clone(&handled);
    let handler = handler_fn(move |_: serde_json::Value, _: Meta| {
        let count = Arc::clone(&count);
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(Outcome::Ack)
        }
    });
    let processor = Processor::builder(settings.clone())
        .group(Group::new("tls-orders", "g", handler))
        .start()
        .await
        .expect("start over TLS as the ACL user");
    for i in 0..5 {
        let event = Event::new("n", &serde_json::json!({ "n": i })).unwrap();
        processor
            .producer()
            .publish("tls-orders", event)
            .await
            .unwrap();
    }
    let start = Instant::now();
    while handled.load(Ordering::SeqCst) < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "events not handled over TLS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    processor.shutdown().await.unwrap();

    // A wrong password is refused, and neither password shows in the error.
    settings.redis.url = format!("rediss://app:wrong-pw@127.0.0.1:{}/0", server.port)
        .parse()
        .unwrap();
    let e = Processor::builder(settings)
        .start()
        .await
        .expect_err("bad password");
    let text = format!("{e} {e:?}");
    assert!(
        !text.contains("wrong-pw") && !text.contains("s3cret-pw"),
        "{text}"
    );
}
