//! The postgres toolset against a real PostgreSQL started by the test, through real replicas.

use std::time::Duration;

use serde_json::{Value, json};
use shoal_testkit::{client::McpClient, topology::Topology};

use crate::helpers::*;

async fn pg_topology(replicas: usize, balancer: bool, env: &[(&str, &str)]) -> Topology {
    let mut options = cluster_options(replicas)
        .env("SHOAL_TOOLSETS", "kv,postgres")
        .env("SHOAL_POSTGRES_ALLOW_WRITES", "true")
        .env("SHOAL_POSTGRES_POLL_MS", 200);
    for (key, value) in env {
        options = options.env(key, value);
    }
    options.postgres = true;
    options.balancer = balancer;
    let topology = start(options).await;
    let db = topology.postgres_client().await.expect("connect");
    db.batch_execute(
        "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, qty integer NOT NULL DEFAULT 0);
         INSERT INTO items (name, qty) SELECT 'item-' || n, n FROM generate_series(1, 25) AS n;",
    )
    .await
    .expect("schema");
    topology
}

/// Waits until PostgreSQL runs `statement`, seen from the test's own connection `db` (the pool's
/// in-use gauge cannot tell a test's query from the change poller's).
async fn running(db: &tokio_postgres::Client, statement: &str) {
    eventually(statement, WAIT, async || {
        let rows = db
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE state = 'active' \
                 AND pid <> pg_backend_pid() AND strpos(query, $1) > 0",
                &[&statement],
            )
            .await
            .ok()?;
        (!rows.is_empty()).then_some(())
    })
    .await;
}

fn structured(result: &Value) -> &Value {
    result.get("structuredContent").unwrap_or(&Value::Null)
}

fn error_text(result: &Value) -> String {
    assert_eq!(
        result["isError"],
        json!(true),
        "expected a tool error: {result}"
    );
    text_of(result)
}

#[tokio::test]
async fn query_describe_and_list() {
    let topology = pg_topology(1, false, &[("SHOAL_POSTGRES_ROW_CAP", "10")]).await;
    let client = McpClient::modern(topology.mcp_url());

    let result = client
        .call_tool(
            "pg_query",
            json!({"sql": "SELECT id, name FROM items WHERE qty > $1 ORDER BY id", "params": [20]}),
        )
        .await
        .expect("pg_query");
    let data = structured(&result);
    assert_eq!(
        data["columns"],
        json!([{"name": "id", "type": "int4"}, {"name": "name", "type": "text"}])
    );
    assert_eq!(data["rows"][0], json!({"id": 21, "name": "item-21"}));
    assert_eq!(data["row_count"], json!(5));
    assert_eq!(data["truncated"], json!(false));

    // Row cap: 25 rows exist, 10 come back, marked truncated.
    let result = client
        .call_tool("pg_query", json!({"sql": "SELECT * FROM items"}))
        .await
        .expect("pg_query");
    assert_eq!(structured(&result)["row_count"], json!(10));
    assert_eq!(structured(&result)["truncated"], json!(true));

    let result = client
        .call_tool("pg_describe_table", json!({"table": "items"}))
        .await
        .expect("describe");
    let info = structured(&result);
    assert_eq!(info["table"], json!("public.items"));
    assert_eq!(info["row_count"], json!(25));
    assert_eq!(info["primary_key"], json!(["id"]));
    assert_eq!(info["columns"][1]["name"], json!("name"));

    let result = client
        .call_tool("pg_list_tables", json!({}))
        .await
        .expect("list");
    assert_eq!(structured(&result)["tables"], json!(["public.items"]));

    // Read-only enforcement: a write through the query tool fails, and nothing changed.
    let result = client
        .call_tool(
            "pg_query",
            json!({"sql": "INSERT INTO items (name) VALUES ('sneaky') RETURNING id"}),
        )
        .await
        .expect("pg_query");
    assert!(error_text(&result).contains("only reads"), "{result}");
    let result = client
        .call_tool(
            "pg_query",
            json!({"sql": "SELECT count(*) AS n FROM items WHERE name = 'sneaky'"}),
        )
        .await
        .expect("pg_query");
    assert_eq!(structured(&result)["rows"][0]["n"], json!(0));

    // Bad input is a clear tool error.
    let result = client
        .call_tool("pg_query", json!({"sql": "SELEC 1"}))
        .await
        .expect("pg_query");
    assert!(error_text(&result).contains("syntax"), "{result}");
    let result = client
        .call_tool(
            "pg_query",
            json!({"sql": "SELECT $1::int", "params": ["x"]}),
        )
        .await
        .expect("pg_query");
    assert!(error_text(&result).contains("parameter $1"), "{result}");
    let result = client
        .call_tool("pg_describe_table", json!({"table": "nope"}))
        .await
        .expect("describe");
    assert!(error_text(&result).contains("no table"), "{result}");
}

#[tokio::test]
async fn statement_timeout_and_pool_exhaustion_give_clear_errors() {
    let topology = pg_topology(
        1,
        false,
        &[
            ("SHOAL_POSTGRES_POOL_MAX", "1"),
            ("SHOAL_POSTGRES_ACQUIRE_TIMEOUT_MS", "1000"),
            ("SHOAL_POSTGRES_STATEMENT_TIMEOUT_MS", "4000"),
        ],
    )
    .await;
    let url = topology.mcp_url();
    let base = topology.replicas[0].base_url();
    let client = McpClient::modern(&url);
    let db = topology.postgres_client().await.expect("connect");
    let running = async |statement: &'static str| running(&db, statement).await;

    let result = client
        .call_tool("pg_query", json!({"sql": "SELECT pg_sleep(10)"}))
        .await
        .expect("pg_query");
    assert!(
        error_text(&result).contains("statement timeout"),
        "{result}"
    );

    // Queued: the second query waits for the only connection and then runs.
    let first = McpClient::modern(&url);
    let holder = tokio::spawn(async move {
        first
            .call_tool("pg_query", json!({"sql": "SELECT pg_sleep(0.5) AS slept"}))
            .await
    });
    running("SELECT pg_sleep(0.5) AS slept").await;
    let queued = client
        .call_tool("pg_query", json!({"sql": "SELECT 1 AS one"}))
        .await
        .expect("pg_query");
    assert_eq!(
        structured(&queued)["rows"][0]["one"],
        json!(1),
        "the queued call ran: {queued}"
    );
    assert_ne!(
        holder.await.expect("join").expect("pg_query")["isError"],
        json!(true)
    );
    assert!(
        metric(&base, "shoal_db_pool_wait_seconds_sum").await > 0.05,
        "it did wait for the connection"
    );

    // Exhausted: the connection is held longer than the acquire timeout.
    let first = McpClient::modern(&url);
    let holder = tokio::spawn(async move {
        first
            .call_tool("pg_query", json!({"sql": "SELECT pg_sleep(3)"}))
            .await
    });
    running("SELECT pg_sleep(3)").await;
    let refused = client
        .call_tool("pg_query", json!({"sql": "SELECT 2"}))
        .await
        .expect("pg_query");
    assert!(
        error_text(&refused).contains("database is busy"),
        "{refused}"
    );
    assert_ne!(
        holder.await.expect("join").expect("pg_query")["isError"],
        json!(true)
    );
}

#[tokio::test]
async fn writes_and_outside_changes_notify_subscribers_on_other_replicas() {
    let topology = pg_topology(3, true, &[]).await;
    let url = topology.mcp_url();
    let subscriber = legacy_client(&url).await;
    subscribe(&subscriber, "postgres://table/public.items").await;
    let mut stream = subscriber.open_get(None).await.expect("GET");
    let holder = replica_of(&stream.headers);

    // A write through shoal, on another replica.
    let writer = McpClient::modern(&url);
    let mut written_on = holder.clone();
    for n in 0..6 {
        let exchange = call_ok(&writer, "pg_execute", json!({"sql": "INSERT INTO items (name, qty) VALUES ($1, $2)", "params": [format!("new-{n}"), n]})).await;
        let result = exchange.result().expect("result");
        assert_eq!(
            structured(result)["changed_tables"],
            json!(["public.items"])
        );
        written_on = replica_of(&exchange.headers);
        if written_on != holder {
            break;
        }
    }
    assert_ne!(written_on, holder);
    next_matching(&mut stream, "the write's notification", |m| {
        is_update_of(m, "postgres://table/public.items")
    })
    .await;

    // Drain what the writes (and the poller seeing them) raised, then change the table from outside.
    while let Ok(Some(_)) = stream.next_message(Duration::from_millis(1500)).await {}
    let db = topology.postgres_client().await.expect("connect");
    db.execute("INSERT INTO items (name) VALUES ('from-psql')", &[])
        .await
        .expect("outside insert");
    drop(db); // a finished backend flushes its statistics
    next_matching(&mut stream, "the outside change's notification", |m| {
        is_update_of(m, "postgres://table/public.items")
    })
    .await;

    // The resource shows the new row count.
    let exchange = subscriber
        .request(
            "resources/read",
            json!({"uri": "postgres://table/public.items"}),
        )
        .await
        .expect("read");
    let text = exchange.result().expect("result")["contents"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let info: Value = serde_json::from_str(&text).expect("json");
    assert!(
        info["row_count"].as_i64().unwrap_or_default() >= 27,
        "{info}"
    );
}

#[tokio::test]
async fn cancellation_cancels_the_query_on_the_server() {
    let topology = pg_topology(
        1,
        false,
        &[("SHOAL_POSTGRES_STATEMENT_TIMEOUT_MS", "60000")],
    )
    .await;
    let client = legacy_client(&topology.mcp_url()).await;
    let (id, mut stream) = client
        .open_request(
            "tools/call",
            json!({"name": "pg_query", "arguments": {"sql": "SELECT pg_sleep(30) AS cancel_me"}}),
        )
        .await
        .expect("pg_query");
    let db = topology.postgres_client().await.expect("connect");
    let running = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%cancel_me%' AND pid <> pg_backend_pid()";
    eventually("the query to run on the server", WAIT, async || {
        let n: i64 = db.query_one(running, &[]).await.ok()?.get(0);
        (n == 1).then_some(())
    })
    .await;
    let status = client
        .notify(
            "notifications/cancelled",
            json!({"requestId": id, "reason": "test"}),
        )
        .await
        .expect("cancel");
    assert_eq!(status, 202);
    eventually(
        "the query to be cancelled on the server",
        WAIT,
        async || {
            let n: i64 = db.query_one(running, &[]).await.ok()?.get(0);
            (n == 0).then_some(())
        },
    )
    .await;
    // The cancelled request ends without a result.
    loop {
        match stream.next_message(WAIT).await {
            Ok(Some(event)) => {
                let message = event.message.expect("message");
                assert!(
                    message.get("result").is_none(),
                    "a cancelled request gets no result: {message}"
                );
            }
            Ok(None) => break,
            Err(()) => panic!("the cancelled request's stream stayed open"),
        }
    }
}

/// A `subscriptions/listen` naming a table is checked against the database *before* rmcp
/// acknowledges it (a listen that will be refused is never acknowledged first), and its listener
/// is registered just before the acknowledgment, so an update raised as soon as the client reads
/// the acknowledgment reaches the stream. Here the replica's only database connection is held
/// for 2 s: the acknowledgment waits for it (the held statement has ended when it arrives).
#[tokio::test]
async fn a_listen_is_checked_before_its_acknowledgment_and_misses_nothing_after_it() {
    let topology = pg_topology(
        1,
        false,
        &[
            ("SHOAL_POSTGRES_POOL_MAX", "1"),
            ("SHOAL_POSTGRES_ACQUIRE_TIMEOUT_MS", "10000"),
        ],
    )
    .await;
    let url = topology.mcp_url();
    let db = topology.postgres_client().await.expect("connect");
    let first = McpClient::modern(&url);
    let holder = tokio::spawn(async move {
        first
            .call_tool("pg_query", json!({"sql": "SELECT pg_sleep(2) AS held"}))
            .await
    });
    running(&db, "SELECT pg_sleep(2) AS held").await;

    let listener = McpClient::modern(&url);
    let (_, mut listen) = listener
        .open_request(
            "subscriptions/listen",
            json!({"notifications": {
                "resourceSubscriptions": ["postgres://table/items", "kv://early"]
            }}),
        )
        .await
        .expect("listen");
    acknowledged(&mut listen).await;
    let still_held: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
             AND pid <> pg_backend_pid() AND strpos(query, 'pg_sleep(2) AS held') > 0",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert_eq!(still_held, 0, "acknowledged before the tables were checked");
    let writer = McpClient::modern(&url);
    call_ok(&writer, "kv_set", json!({"key": "early", "value": "1"})).await;
    next_matching(
        &mut listen,
        "the update raised right after the acknowledgment",
        |m| is_update_of(m, "kv://early"),
    )
    .await;
    assert_ne!(
        holder.await.expect("join").expect("pg_query")["isError"],
        json!(true)
    );
}

/// PostgreSQL stopped and started under a client: while it is down, calls fail within the
/// acquire timeout with a tool error that says the database is unavailable (not "busy"); when it
/// is back the pools recover with no restart of any replica, and the change poller picks up an
/// outside change again, notifying a subscriber that stayed connected throughout.
#[tokio::test]
async fn a_database_restart_fails_fast_then_recovers_by_itself() {
    let mut topology = pg_topology(2, true, &[("SHOAL_POSTGRES_ACQUIRE_TIMEOUT_MS", "1000")]).await;
    let url = topology.mcp_url();
    let client = McpClient::modern(&url);
    // A different statement each time: a cached result must not stand in for the database.
    let attempt = std::sync::atomic::AtomicU32::new(0);
    let count = || {
        let n = attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        json!({"sql": format!("SELECT count(*) AS n, {n} AS attempt FROM items")})
    };
    let before = client
        .call_tool("pg_query", count())
        .await
        .expect("pg_query");
    assert_eq!(structured(&before)["rows"][0]["n"], json!(25), "{before}");
    let subscriber = legacy_client(&url).await;
    subscribe(&subscriber, "postgres://table/public.items").await;
    let mut stream = subscriber.open_get(None).await.expect("GET");
    assert_eq!(stream.status, 200);

    topology.postgres.as_mut().expect("postgres").stop().await;
    for _ in 0..4 {
        let sent = std::time::Instant::now();
        let result = client
            .call_tool("pg_query", count())
            .await
            .expect("pg_query");
        let took = sent.elapsed();
        assert!(
            error_text(&result).contains("unavailable"),
            "a clear error while the database is down: {result}"
        );
        assert!(took < Duration::from_secs(3), "failed fast: {took:?}");
    }

    topology
        .postgres
        .as_mut()
        .expect("postgres")
        .start_again()
        .await
        .expect("postgres back");
    eventually("the pools to recover", WAIT, async || {
        let result = client.call_tool("pg_query", count()).await.ok()?;
        (result.get("isError") != Some(&json!(true))).then_some(())
    })
    .await;
    // Drain what the restart raised, then change the table from outside: the poller notices.
    while let Ok(Some(_)) = stream.next_message(Duration::from_millis(1500)).await {}
    let db = topology.postgres_client().await.expect("connect");
    db.execute("INSERT INTO items (name) VALUES ('after-restart')", &[])
        .await
        .expect("outside insert");
    drop(db);
    next_matching(&mut stream, "the outside change after the restart", |m| {
        is_update_of(m, "postgres://table/public.items")
    })
    .await;
}
