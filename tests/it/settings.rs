//! Bad settings stop start-up with an error naming the key.

use redstream::Error;
use redstream::prelude::*;

use crate::support::TestContext;

fn key_of(e: &Error) -> String {
    match e {
        Error::Settings { key, .. } => key.clone(),
        other => panic!("expected a settings error, got {other}"),
    }
}

#[actix_rt::test]
async fn processor_refuses_bad_settings_and_names_the_key() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let mut s = ctx.settings();
    s.consumer.in_flight = 0;
    let e = Processor::builder(s)
        .start()
        .await
        .expect_err("in_flight 0");
    assert_eq!(key_of(&e), "consumer.in_flight");

    let mut s = ctx.settings();
    s.retry.jitter = 3.0;
    let e = Processor::builder(s).start().await.expect_err("jitter 3");
    assert_eq!(key_of(&e), "retry.jitter");
    assert!(e.to_string().contains("between 0.0 and 1.0"), "{e}");

    // Readiness may not turn false before a restart could have come.
    let mut s = ctx.settings();
    s.supervision.unready_after_ms = s.supervision.restart_max_ms;
    let e = Processor::builder(s)
        .start()
        .await
        .expect_err("unready_after_ms at restart_max_ms");
    assert_eq!(key_of(&e), "supervision.unready_after_ms");
    assert!(e.to_string().contains("restart_max_ms"), "{e}");

    let stream = ctx.stream("s");
    let noop = || handler_fn(|_: serde_json::Value, _: Meta| async { Ok(Outcome::Ack) });
    let e = Processor::builder(ctx.settings())
        .group(Group::new(&stream, "g", noop()).with_members(0))
        .start()
        .await
        .expect_err("0 members");
    assert!(key_of(&e).contains("members"), "{e}");

    let e = Processor::builder(ctx.settings())
        .group(Group::new(&stream, "g", noop()))
        .group(Group::new(&stream, "g", noop()))
        .start()
        .await
        .expect_err("twice");
    assert_eq!(key_of(&e), "groups");
}

#[actix_rt::test]
async fn an_unreachable_redis_is_an_error_without_credentials() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let mut s = ctx.settings();
    // Nothing listens on port 1.
    s.redis.url = "redis://app:hunter2@127.0.0.1:1".parse().unwrap();
    s.redis.connect_timeout_ms = 200;
    let e = Processor::builder(s)
        .start()
        .await
        .expect_err("unreachable");
    let text = format!("{e} {e:?}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(matches!(e, Error::Redis(_)), "{e:?}");
}
