//! Databases for tests: a SQLite file in a temporary directory, or a fresh
//! PostgreSQL database per test (dropped afterwards).

use redstream::Store;
use redstream::settings::DatabaseSettings;
use sea_orm::ConnectionTrait;

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/test".to_owned())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestDb {
    pub backend: Backend,
    pub settings: DatabaseSettings,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

fn replace_db_name(url: &str, name: &str) -> String {
    match url.rfind('/') {
        Some(i) => {
            let rest = &url[i + 1..];
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{}/{name}{query}", &url[..i])
        }
        None => url.to_owned(),
    }
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = DatabaseSettings::default();
        settings.url = format!("sqlite://{}/test.db?mode=rwc", dir.path().display())
            .parse()
            .expect("sqlite url");
        TestDb {
            backend: Backend::Sqlite,
            settings,
            _dir: Some(dir),
            pg_name: None,
        }
    }

    /// A SQLite file `test.db` in `dir`, which the caller owns (e.g. a
    /// filesystem it mounted).
    pub fn sqlite_in(dir: &std::path::Path) -> TestDb {
        let mut settings = DatabaseSettings::default();
        settings.url = format!("sqlite://{}/test.db?mode=rwc", dir.display())
            .parse()
            .expect("sqlite url");
        TestDb {
            backend: Backend::Sqlite,
            settings,
            _dir: None,
            pg_name: None,
        }
    }

    /// A fresh database; `None` (skipped, with a reason) when PostgreSQL does
    /// not answer outside CI.
    pub async fn postgres() -> Option<TestDb> {
        let admin = postgres_admin_url();
        let conn = match sea_orm::Database::connect(admin.as_str()).await {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    !super::in_ci(),
                    "PostgreSQL does not answer ({e}), and CI=true"
                );
                eprintln!("SKIPPED: PostgreSQL does not answer ({e}); run scripts/test.sh");
                return None;
            }
        };
        let name = format!("rstest_{}", ulid::Ulid::new().to_string().to_lowercase());
        conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        let _ = conn.close().await;
        let mut settings = DatabaseSettings::default();
        settings.url = replace_db_name(&admin, &name).parse().expect("pg url");
        Some(TestDb {
            backend: Backend::Postgres,
            settings,
            _dir: None,
            pg_name: Some(name),
        })
    }

    /// Both backends (PostgreSQL only when it answers).
    pub async fn both() -> Vec<TestDb> {
        let mut dbs = vec![TestDb::sqlite()];
        if let Some(pg) = TestDb::postgres().await {
            dbs.push(pg);
        }
        dbs
    }

    pub async fn store(&self) -> Store {
        Store::connect(&self.settings)
            .await
            .expect("store connects and migrates")
    }

    /// The database name (PostgreSQL).
    pub fn pg_name(&self) -> Option<&str> {
        self.pg_name.as_deref()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        admin_cleanup(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    }
}

/// Runs `sql` as the PostgreSQL admin and waits for it, on a thread and a
/// runtime of its own: a `Drop` may run inside a runtime it must not
/// block. Errors are ignored (a cleanup).
pub fn admin_cleanup(sql: String) {
    let admin = postgres_admin_url();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if let Ok(conn) = sea_orm::Database::connect(admin.as_str()).await {
                let _ = conn.execute_unprepared(&sql).await;
                let _ = conn.close().await;
            }
        });
    })
    .join();
}
