//! Least privilege: the order example and the CLI run as the restricted
//! Redis users of README's "Least privilege" section (the `ACL SETUSER`
//! lines are read from README, so the documentation is what is tested), on
//! a redis-server of this test's own, and the workers as a PostgreSQL role
//! without DDL rights. What redstream does works; `FLUSHALL`, `CONFIG SET`,
//! keys of another prefix and DDL are refused.

use std::process::{Command, Output};

use redstream::Store;
use sea_orm::{ConnectionTrait, Database};

use crate::orders::domain;
use crate::support::RedisServer;
use crate::support::db::{TestDb, admin_cleanup, postgres_admin_url};
use crate::support::examples::build_example;
use crate::support::redis_server::run_command;

const ORDERS: &str = "app:orders";
const EVENTS: &str = "app:order-events";

/// The `ACL SETUSER` lines of README's "Least privilege" section.
fn readme_acl() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let lines: Vec<Vec<String>> = readme
        .lines()
        .filter(|l| l.starts_with("ACL SETUSER "))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(lines.len(), 3, "worker, producer and CLI users in README");
    lines
}

fn user_url(server: &RedisServer, user: &str, password: &str) -> String {
    format!("redis://{user}:{password}@127.0.0.1:{}", server.port)
}

/// One command as a user; the error code if refused.
fn as_user(url: &str, args: &[&str]) -> Result<redis::Value, String> {
    run_command(url, args).map_err(|e| e.code().unwrap_or("?").to_owned())
}

fn run(binary: &std::path::Path, env: &[(&str, String)], args: &[&str]) -> Output {
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run")
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Two PostgreSQL roles on a fresh database, dropped with it.
struct Roles {
    owner: String,
    worker: String,
}

impl Drop for Roles {
    fn drop(&mut self) {
        admin_cleanup(format!(
            "DROP ROLE IF EXISTS {}; DROP ROLE IF EXISTS {}",
            self.worker, self.owner
        ));
    }
}

/// The database URL as `role` (password = role name; tests use trust auth).
fn role_url(db_url: &str, role: &str) -> String {
    let scheme_end = db_url.find("://").map(|i| i + 3).unwrap_or(0);
    let host_start = db_url.find('@').map(|i| i + 1).unwrap_or(scheme_end);
    format!(
        "{}{role}:{role}@{}",
        &db_url[..scheme_end],
        &db_url[host_start..]
    )
}

/// Sets up the owner and worker roles on `db`: the owner owns the
/// database, runs the migrations and the example's table, and grants the
/// worker DML only. Returns (roles, owner URL, worker URL).
async fn pg_roles(db: &TestDb) -> (Roles, String, String) {
    let name = db.pg_name().expect("a PostgreSQL database");
    let suffix = &name[name.len() - 8..];
    let roles = Roles {
        owner: format!("rs_owner_{suffix}"),
        worker: format!("rs_worker_{suffix}"),
    };
    let admin = Database::connect(postgres_admin_url().as_str())
        .await
        .expect("admin connection");
    for role in [&roles.owner, &roles.worker] {
        admin
            .execute_unprepared(&format!("CREATE ROLE {role} LOGIN PASSWORD '{role}'"))
            .await
            .expect("CREATE ROLE");
    }
    admin
        .execute_unprepared(&format!("ALTER DATABASE {name} OWNER TO {}", roles.owner))
        .await
        .expect("ALTER DATABASE OWNER");
    let _ = admin.close().await;
    let url = db.settings.url.expose().to_owned();
    let owner_url = role_url(&url, &roles.owner);
    let worker_url = role_url(&url, &roles.worker);

    // The owner: migrations, the example's table, the grants.
    let mut settings = db.settings.clone();
    settings.url = owner_url.parse().unwrap();
    let store = Store::connect(&settings).await.expect("the owner migrates");
    domain::create_tables(store.connection())
        .await
        .expect("the owner creates `orders`");
    let w = &roles.worker;
    store
        .connection()
        .execute_unprepared(&format!(
            "GRANT USAGE ON SCHEMA public TO {w};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {w};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {w};"
        ))
        .await
        .expect("grants");
    store.connection().clone().close().await.ok();
    (roles, owner_url, worker_url)
}

#[actix_rt::test]
async fn the_order_example_and_the_cli_run_as_restricted_users() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let started = std::time::Instant::now();
    let server = RedisServer::start();
    for line in readme_acl() {
        let args: Vec<&str> = line.iter().map(String::as_str).collect();
        server.cmd(&args);
    }
    // Another application's stream on the same server.
    server.cmd(&["XADD", "other:orders", "*", "data", "{}"]);
    let worker = user_url(&server, "redstream-worker", "worker-secret");
    let producer = user_url(&server, "redstream-producer", "producer-secret");
    let cli = user_url(&server, "redstream-cli", "cli-secret");

    let (_roles, owner_url, worker_url) = pg_roles(&db).await;

    // The database: the worker role may not run DDL, nor migrate.
    let as_worker = Database::connect(worker_url.as_str())
        .await
        .expect("worker role connects");
    for ddl in [
        "CREATE TABLE intruder (id int)",
        "DROP TABLE orders",
        "ALTER TABLE processed_events ADD COLUMN x int",
    ] {
        let refused = as_worker.execute_unprepared(ddl).await.expect_err(ddl);
        let text = refused.to_string();
        assert!(
            text.contains("permission denied") || text.contains("must be owner"),
            "{ddl}: {text}"
        );
    }
    let _ = as_worker.close().await;
    let mut migrating = db.settings.clone();
    migrating.url = worker_url.parse().unwrap();
    let refused = Store::connect(&migrating)
        .await
        .expect_err("a role without DDL rights cannot migrate");
    assert!(
        refused.to_string().contains("database.migrate"),
        "the error names the setting: {refused}"
    );

    // The order example's demo as the worker, on Redis and PostgreSQL.
    let binary = build_example("order_processing", &[]);
    let env = |redis: &str, database: &str| {
        vec![
            ("REDSTREAM__REDIS__URL", redis.to_owned()),
            ("REDSTREAM__DATABASE__URL", database.to_owned()),
            ("REDSTREAM__DATABASE__MIGRATE", "false".to_owned()),
            ("REDSTREAM__INSTANCE__NAME", "privilege".to_owned()),
            ("REDSTREAM__SHUTDOWN__DEADLINE_MS", "5000".to_owned()),
            ("ORDERS_STREAM", ORDERS.to_owned()),
            ("ORDER_EVENTS_STREAM", EVENTS.to_owned()),
        ]
    };
    let demo = run(&binary, &env(&worker, &worker_url), &[]);
    assert!(demo.status.success(), "demo as the worker: {}", show(&demo));
    let stdout = String::from_utf8_lossy(&demo.stdout);
    assert!(
        stdout.contains("orders processed (rows in `orders`): 300"),
        "{stdout}"
    );
    // The worker may not read the dead-letter stream by range: the summary
    // gives the count, and says why not the reasons.
    assert!(
        stdout.contains("dead-lettered:                       30 ")
            && stdout.contains("(not read back: ")
            && stdout.contains("no permissions to run the 'xrevrange' command"),
        "{stdout}"
    );
    assert!(
        show(&demo).contains("CONFIG GET: NOPERM"),
        "CONFIG refused: a warning, not a failure: {}",
        show(&demo)
    );
    let owner_db = Database::connect(owner_url.as_str()).await.unwrap();
    let count = |sql: &'static str| {
        let owner_db = owner_db.clone();
        async move {
            let row = owner_db
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    sql,
                ))
                .await
                .unwrap()
                .unwrap();
            row.try_get_by_index::<i64>(0).unwrap()
        }
    };
    assert_eq!(count("SELECT COUNT(*) FROM orders").await, 300);
    assert_eq!(
        count("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await,
        0,
        "every confirmation relayed by the worker"
    );
    let xlen = |key: &str| match server.cmd(&["XLEN", key]) {
        redis::Value::Int(n) => n,
        other => panic!("XLEN {key}: {other:?}"),
    };
    assert_eq!(
        xlen("app:orders:dlq"),
        30,
        "the invalid orders dead-lettered"
    );
    assert_eq!(xlen(EVENTS), 300);
    let _ = owner_db.close().await;

    // `produce` as the producer-only user.
    let before = xlen(ORDERS);
    let produce = run(
        &binary,
        &env(&producer, &worker_url),
        &["produce", "--count", "50"],
    );
    assert!(produce.status.success(), "produce: {}", show(&produce));
    assert_eq!(xlen(ORDERS), before + 50);

    // The CLI as its user.
    let redstream = assert_cmd::cargo::cargo_bin("redstream");
    let cli_run = |args: &[&str]| {
        let mut all = vec!["--redis-url", cli.as_str()];
        all.extend_from_slice(args);
        run(&redstream, &[], &all)
    };
    let status = cli_run(&["status"]);
    assert!(status.status.success(), "status: {}", show(&status));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(ORDERS) && !text.contains("other:orders"),
        "{text}"
    );
    assert!(
        String::from_utf8_lossy(&status.stderr).contains("1 stream(s) skipped"),
        "{}",
        show(&status)
    );
    let list = cli_run(&["--json", "dlq", "list", ORDERS]);
    assert!(list.status.success(), "dlq list: {}", show(&list));
    let letters: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(letters.as_array().map(Vec::len), Some(30), "{letters}");
    let pending = cli_run(&["pending", ORDERS, domain::GROUP]);
    assert!(pending.status.success(), "pending: {}", show(&pending));
    let trim = cli_run(&["trim", ORDERS, "--dry-run"]);
    assert!(trim.status.success(), "trim --dry-run: {}", show(&trim));
    let delete = cli_run(&["dlq", "delete", ORDERS, "--all", "--dry-run"]);
    assert!(
        delete.status.success(),
        "dlq delete --dry-run: {}",
        show(&delete)
    );
    // The retry-now script runs under the CLI's user: nothing waits, so
    // "not found" (3), not "refused" (5).
    let now = cli_run(&["retries", ORDERS, domain::GROUP, "--now", "1-1"]);
    assert_eq!(now.status.code(), Some(3), "retries --now: {}", show(&now));
    let other = cli_run(&["dlq", "list", "other:orders"]);
    assert!(!other.status.success(), "another prefix: {}", show(&other));
    assert!(
        // Redis 7.0 says "no permissions to access one of the keys", 8.2
        // "No permissions to access a key".
        String::from_utf8_lossy(&other.stderr)
            .to_lowercase()
            .contains("no permissions"),
        "{}",
        show(&other)
    );

    // What is outside each user's ACL is refused by Redis.
    for url in [&worker, &producer, &cli] {
        assert_eq!(as_user(url, &["FLUSHALL"]).unwrap_err(), "NOPERM");
        assert_eq!(as_user(url, &["FLUSHDB"]).unwrap_err(), "NOPERM");
        assert_eq!(
            as_user(url, &["CONFIG", "SET", "appendonly", "no"]).unwrap_err(),
            "NOPERM"
        );
        assert_eq!(as_user(url, &["KEYS", "*"]).unwrap_err(), "NOPERM");
        assert_eq!(
            as_user(url, &["XADD", "other:orders", "*", "a", "b"]).unwrap_err(),
            "NOPERM",
            "a key of another prefix"
        );
    }
    assert_eq!(
        as_user(&worker, &["SET", "other:x", "1"]).unwrap_err(),
        "NOPERM"
    );
    assert_eq!(
        as_user(&worker, &["EVAL", "return 1", "0"]).unwrap_err(),
        "NOPERM"
    );
    assert_eq!(
        as_user(&worker, &["XSETID", ORDERS, "99999999999999-0"]).unwrap_err(),
        "NOPERM"
    );
    assert_eq!(
        as_user(
            &producer,
            &[
                "XREADGROUP",
                "GROUP",
                domain::GROUP,
                "x",
                "STREAMS",
                ORDERS,
                ">"
            ]
        )
        .unwrap_err(),
        "NOPERM",
        "the producer does not consume"
    );
    // A script may not reach past the key patterns either.
    let sha = match server.cmd(&["SCRIPT", "LOAD", "return redis.call('GET', KEYS[1])"]) {
        redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        as_user(&worker, &["EVALSHA", &sha, "1", "other:x"]).unwrap_err(),
        "NOPERM"
    );
    assert!(as_user(&worker, &["EVALSHA", &sha, "1", "app:x"]).is_ok());
    eprintln!("least privilege: {:?}", started.elapsed());
}
