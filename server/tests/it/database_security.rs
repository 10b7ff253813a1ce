//! The security review's database findings (issue 10, findings 1-3), against a real PostgreSQL
//! with the least-privilege roles of `deploy/postgres/roles.sql`, through real replicas:
//! no server programs or files through the tools, no privileged role accepted silently, no
//! session state carried from one call to the next on a pooled connection, bounded results.

use std::{process::Stdio, time::Duration};

use serde_json::{Value, json};
use shoal_testkit::{
    client::McpClient,
    postgres::PostgresServer,
    topology::{Topology, free_port},
};

use crate::helpers::*;

async fn pg_topology(env: &[(&str, &str)]) -> Topology {
    let mut options = cluster_options(1)
        .env("SHOAL_TOOLSETS", "kv,postgres")
        .env("SHOAL_POSTGRES_ALLOW_WRITES", "true");
    for (key, value) in env {
        options = options.env(key, value);
    }
    options.postgres = true;
    options.balancer = false;
    let topology = start(options).await;
    let db = topology.postgres_client().await.expect("connect");
    db.batch_execute(
        "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);
         INSERT INTO items (name) SELECT 'item-' || n FROM generate_series(1, 25) AS n;",
    )
    .await
    .expect("schema");
    topology
}

fn tool_error(result: &Value) -> String {
    assert_eq!(
        result["isError"],
        json!(true),
        "expected a tool error: {result}"
    );
    text_of(result)
}

/// Asserts how many rows `items` has, read through `pg_query`.
async fn assert_items(client: &McpClient, expected: i64, why: &str) {
    let result = client
        .call_tool(
            "pg_query",
            json!({"sql": "SELECT count(*) AS n FROM items"}),
        )
        .await
        .expect("pg_query");
    assert_eq!(rows(&result)["rows"], json!([{"n": expected}]), "{why}");
}

fn rows(result: &Value) -> &Value {
    assert_ne!(result["isError"], json!(true), "expected rows: {result}");
    &result["structuredContent"]
}

/// Finding 1: a statement PostgreSQL counts as read-only can still run a program or read a file
/// on the database host. Neither the read nor the write tool may.
#[tokio::test]
async fn the_tools_cannot_run_programs_or_read_files_on_the_database_host() {
    let topology = pg_topology(&[]).await;
    let client = McpClient::modern(topology.mcp_url());
    let probe = topology
        .postgres
        .as_ref()
        .expect("postgres")
        .dir()
        .join("probe.txt");
    let program = format!("COPY (SELECT 'x') TO PROGRAM 'id > {}'", probe.display());
    for tool in ["pg_query", "pg_execute"] {
        let result = client
            .call_tool(tool, json!({"sql": program}))
            .await
            .expect(tool);
        let message = tool_error(&result);
        assert!(!message.is_empty(), "{tool}: {result}");
    }
    let result = client
        .call_tool(
            "pg_query",
            json!({"sql": "SELECT pg_read_file('/etc/hostname')"}),
        )
        .await
        .expect("pg_query");
    assert!(
        tool_error(&result).contains("permission denied"),
        "{result}"
    );
    let result = client
        .call_tool(
            "pg_execute",
            // pg_execute takes data-modifying statements only; the role is what refuses this one.
            json!({"sql": "INSERT INTO items (name) SELECT pg_read_file('/etc/hostname')"}),
        )
        .await
        .expect("pg_execute");
    assert!(
        tool_error(&result).contains("permission denied"),
        "{result}"
    );
    assert!(!probe.exists(), "a program ran on the database host");

    // What is not one wrappable query is refused, not run as written.
    for sql in [
        "EXPLAIN SELECT 1",
        "SHOW search_path",
        "WITH gone AS (DELETE FROM items RETURNING *) SELECT * FROM gone",
        "SELECT 1; SELECT 2",
    ] {
        let result = client
            .call_tool("pg_query", json!({"sql": sql}))
            .await
            .expect("pg_query");
        let message = tool_error(&result);
        assert!(
            message.contains("pg_query runs exactly one query")
                || message.contains("cannot insert multiple commands"),
            "{sql}: {message}"
        );
    }
    assert_items(&client, 25, "the refused WITH deleted nothing").await;
}

/// Runs shoal-server alone (no Redis) with the postgres toolset on `database_url`, plus `env`;
/// returns its exit status (None: still running after `wait`) and everything it printed.
async fn run_replica(
    database_url: &str,
    env: &[(&str, &str)],
    wait: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("replica.log");
    let file = std::fs::File::create(&log).expect("log");
    let port = free_port();
    let mut child = tokio::process::Command::new(server_bin())
        .env("SHOAL_LISTEN", format!("127.0.0.1:{port}"))
        .env("SHOAL_TOOLSETS", "postgres")
        .env("SHOAL_DATABASE_URL", database_url)
        .env_remove("SHOAL_REDIS_URL")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .expect("shoal-server starts");
    let status = match tokio::time::timeout(wait, child.wait()).await {
        Ok(status) => Some(status.expect("exit status")),
        Err(_) => {
            // Still running: it must be serving.
            let answer = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
            assert!(
                answer.is_ok_and(|a| a.status().is_success()),
                "running but not serving"
            );
            None
        }
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

/// Finding 1: a replica pointed at a superuser refuses to serve the postgres toolset, unless
/// SHOAL_POSTGRES_ALLOW_PRIVILEGED_ROLE says so, and then warns.
#[tokio::test]
async fn a_privileged_database_role_is_refused_unless_explicitly_allowed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let postgres = PostgresServer::start(dir.path()).await.expect("postgres");

    let (status, output) = run_replica(&postgres.url(), &[], WAIT).await;
    let status = status.expect("the replica exits by itself");
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("\"shoal\"") && output.contains("a superuser"),
        "names the role and why: {output}"
    );
    assert!(
        output.contains("SHOAL_POSTGRES_ALLOW_PRIVILEGED_ROLE"),
        "says how to override: {output}"
    );

    let (status, output) = run_replica(
        &postgres.url(),
        &[("SHOAL_POSTGRES_ALLOW_PRIVILEGED_ROLE", "true")],
        Duration::from_secs(3),
    )
    .await;
    assert!(status.is_none(), "allowed, it serves: {output}");
    assert!(
        output.contains("SHOAL_POSTGRES_ALLOW_PRIVILEGED_ROLE"),
        "and warns: {output}"
    );

    // The least-privilege role starts without a warning.
    let (status, output) = run_replica(&postgres.reader_url(), &[], Duration::from_secs(3)).await;
    assert!(status.is_none(), "{output}");
    assert!(!output.contains("privileged"), "{output}");
}

/// Finding 2: whatever one call leaves on its pooled connection (settings, advisory locks, search
/// path) does not reach the next call; the statement timeout holds in every transaction.
#[tokio::test]
async fn pooled_connections_carry_nothing_from_one_call_to_the_next() {
    // One connection per pool, so the next call gets the same one.
    let topology = pg_topology(&[
        ("SHOAL_POSTGRES_POOL_MAX", "1"),
        ("SHOAL_POSTGRES_STATEMENT_TIMEOUT_MS", "1000"),
        ("SHOAL_TOOL_TIMEOUT_MS", "20000"),
    ])
    .await;
    let client = McpClient::modern(topology.mcp_url());
    let db = topology.postgres_client().await.expect("connect");

    for (tool, sql) in [
        (
            "pg_query",
            "SELECT set_config('statement_timeout', '0', false) AS t",
        ),
        // pg_execute takes data-modifying statements only; one can still call set_config.
        (
            "pg_execute",
            "UPDATE items SET name = name WHERE set_config('statement_timeout', '0', false) IS NOT NULL",
        ),
    ] {
        let result = client
            .call_tool(tool, json!({"sql": sql}))
            .await
            .expect(tool);
        assert_ne!(result["isError"], json!(true), "{tool}: {result}");
        let result = client
            .call_tool("pg_query", json!({"sql": "SELECT pg_sleep(3) AS slept"}))
            .await
            .expect("pg_query");
        assert!(
            tool_error(&result).contains("statement timeout"),
            "after {tool}: {result}"
        );
    }

    let result = client
        .call_tool(
            "pg_query",
            json!({"sql": "SELECT set_config('search_path', 'pg_catalog', false) AS p"}),
        )
        .await
        .expect("pg_query");
    rows(&result);
    assert_items(&client, 25, "search_path was reset").await;

    let advisory = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'";
    for (tool, sql) in [
        ("pg_query", "SELECT pg_advisory_lock(42) AS locked"),
        (
            "pg_execute",
            "UPDATE items SET name = name WHERE id = 1 AND pg_advisory_lock(43) IS NOT NULL",
        ),
    ] {
        let result = client
            .call_tool(tool, json!({"sql": sql}))
            .await
            .expect(tool);
        assert_ne!(result["isError"], json!(true), "{tool}: {result}");
        // The next call on the same connection can only start once it was reset.
        let next = if tool == "pg_query" {
            "SELECT 1 AS one"
        } else {
            "UPDATE items SET name = name WHERE id = 1"
        };
        let result = client
            .call_tool(tool, json!({"sql": next}))
            .await
            .expect(tool);
        assert_ne!(result["isError"], json!(true), "{tool}: {result}");
        let held: i64 = db.query_one(advisory, &[]).await.expect("pg_locks").get(0);
        assert_eq!(held, 0, "{tool} left an advisory lock held");
    }
}

/// Finding 2: a call abandoned by its tool timeout has its query cancelled on the server and its
/// connection closed, not returned to the pool still running.
#[tokio::test]
async fn a_timed_out_call_cancels_its_query_and_drops_its_connection() {
    let topology = pg_topology(&[
        ("SHOAL_POSTGRES_STATEMENT_TIMEOUT_MS", "60000"),
        ("SHOAL_TOOL_TIMEOUTS", "pg_query=1s"),
    ])
    .await;
    let client = McpClient::modern(topology.mcp_url());
    let db = topology.postgres_client().await.expect("connect");
    let result = client
        .call_tool(
            "pg_query",
            json!({"sql": "SELECT pg_sleep(30) AS abandoned"}),
        )
        .await
        .expect("pg_query");
    assert_eq!(result["isError"], json!(true), "{result}");
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30) AS abandoned%' AND pid <> pg_backend_pid()";
    eventually(
        "the abandoned query to be cancelled and its connection closed",
        WAIT,
        async || {
            let n: i64 = db.query_one(running, &[]).await.ok()?.get(0);
            (n == 0).then_some(())
        },
    )
    .await;
    assert_items(&client, 25, "the pool serves again").await;
}

/// Finding 3: results are bounded in bytes while rows stream in, and a trailing comment neither
/// defeats the row cap nor changes what runs.
#[tokio::test]
async fn results_are_bounded_in_rows_and_bytes() {
    let topology = pg_topology(&[
        ("SHOAL_POSTGRES_ROW_CAP", "10"),
        ("SHOAL_POSTGRES_MAX_RESULT_BYTES", "100000"),
    ])
    .await;
    let client = McpClient::modern(topology.mcp_url());

    let exchange = client
        .request("tools/call", json!({"name": "pg_query", "arguments": {"sql": "SELECT repeat('x', 40000000) AS big"}}))
        .await
        .expect("pg_query");
    let result = exchange.result().expect("a result");
    let data = rows(result);
    assert_eq!(data["rows"], json!([]), "a row over the budget is left out");
    assert_eq!(data["truncated"], json!(true));
    assert_eq!(data["truncated_by"], json!("byte_budget"));
    let size: usize = exchange.messages().map(|m| m.to_string().len()).sum();
    assert!(size < 10_000, "a small answer ({size} bytes)");

    // Rows up to the budget come back; the rest is cut.
    let result = client
        .call_tool(
            "pg_query",
            json!({"sql": "SELECT n, repeat('y', 30000) AS pad FROM generate_series(1, 8) AS n"}),
        )
        .await
        .expect("pg_query");
    let data = rows(&result);
    assert_eq!(data["row_count"], json!(3), "{}", data["row_count"]);
    assert_eq!(data["truncated_by"], json!("byte_budget"));

    for sql in [
        "SELECT * FROM items --",
        "SELECT * FROM items -- ) AS x LIMIT ALL",
        "SELECT * FROM items /* c */",
    ] {
        let result = client
            .call_tool("pg_query", json!({"sql": sql}))
            .await
            .expect("pg_query");
        let data = rows(&result);
        assert_eq!(data["row_count"], json!(10), "{sql}");
        assert_eq!(data["truncated_by"], json!("row_cap"), "{sql}");
    }
    let result = client
        .call_tool(
            "pg_query",
            json!({"sql": "SELECT 1 AS one /* unterminated"}),
        )
        .await
        .expect("pg_query");
    tool_error(&result);
}

/// Finding 4: a table resource is one resource whichever spelling the client uses: a
/// subscription to `postgres://table/items` is told of changes (under that URI), as is one to
/// `postgres://table/public.items`; a table that does not exist cannot be subscribed to.
#[tokio::test]
async fn table_resources_notify_every_spelling_and_unknown_tables_are_refused() {
    let topology = pg_topology(&[]).await;
    let url = topology.mcp_url();
    let bare = legacy_client(&url).await;
    let qualified = legacy_client(&url).await;
    for (client, uri) in [
        (&bare, "postgres://table/items"),
        (&qualified, "postgres://table/public.items"),
    ] {
        client
            .request("resources/subscribe", json!({"uri": uri}))
            .await
            .expect("subscribe")
            .result()
            .unwrap_or_else(|e| panic!("subscribed to {uri}: {e:?}"));
    }
    let mut bare_stream = bare.open_get(None).await.expect("GET");
    let mut qualified_stream = qualified.open_get(None).await.expect("GET");
    let writer = McpClient::modern(url.clone());
    let result = writer
        .call_tool(
            "pg_execute",
            json!({"sql": "INSERT INTO items (name) VALUES ('new')"}),
        )
        .await
        .expect("pg_execute");
    assert_ne!(result["isError"], json!(true), "{result}");
    next_matching(&mut bare_stream, "the update under the bare name", |m| {
        is_update_of(m, "postgres://table/items")
    })
    .await;
    next_matching(
        &mut qualified_stream,
        "the update under the qualified name",
        |m| is_update_of(m, "postgres://table/public.items"),
    )
    .await;

    for uri in [
        "postgres://table/nope",
        "postgres://table/public.nope",
        "postgres://table/pg_catalog.pg_authid",
    ] {
        let exchange = bare
            .request("resources/subscribe", json!({"uri": uri}))
            .await
            .expect("subscribe");
        let response = exchange.response().expect("a response");
        assert_eq!(
            response.pointer("/error/code"),
            Some(&json!(-32002)),
            "{uri}: {response}"
        );
    }
    let listener = McpClient::modern(url);
    let exchange = listener
        .request(
            "subscriptions/listen",
            listen_params("postgres://table/nope"),
        )
        .await
        .expect("listen");
    // The 2026-07-28 era's code for a missing resource, with the URI.
    let response = exchange.response().expect("a response");
    assert_eq!(
        response.pointer("/error/code"),
        Some(&json!(-32602)),
        "{response}"
    );
    assert_eq!(
        response.pointer("/error/data/uri"),
        Some(&json!("postgres://table/nope")),
        "{response}"
    );
}

/// Second review, finding 3: the writer may change rows, never itself, the schema or the session.
/// `ALTER ROLE CURRENT_USER SET default_transaction_read_only = on` would lock every replica out of
/// writes once connections recycle; it and every other statement that is not INSERT, UPDATE,
/// DELETE or MERGE is refused with a clear tool error, and the role is left as it was.
#[tokio::test]
async fn pg_execute_runs_data_modifying_statements_only() {
    let topology = pg_topology(&[]).await;
    let client = McpClient::modern(topology.mcp_url());
    let db = topology.postgres_client().await.expect("connect");
    let role_settings = "SELECT rolconfig FROM pg_roles WHERE rolname = 'shoal_writer'";
    let before: Option<Vec<String>> = db
        .query_one(role_settings, &[])
        .await
        .expect("pg_roles")
        .get(0);
    for sql in [
        "ALTER ROLE CURRENT_USER SET default_transaction_read_only = on",
        "ALTER ROLE CURRENT_USER PASSWORD 'taken-over'",
        "SET statement_timeout = 0",
        "CREATE TABLE planted (id int)",
        "TRUNCATE items",
        "SELECT count(*) FROM items",
        "DO $$ BEGIN EXECUTE 'TRUNCATE items'; END $$",
    ] {
        let result = client
            .call_tool("pg_execute", json!({"sql": sql}))
            .await
            .expect("pg_execute");
        let message = tool_error(&result);
        assert!(
            message.contains("pg_execute runs exactly one data-modifying statement"),
            "{sql}: {message}"
        );
    }
    let after: Option<Vec<String>> = db
        .query_one(role_settings, &[])
        .await
        .expect("pg_roles")
        .get(0);
    assert_eq!(after, before, "the writer role's settings are untouched");
    assert_items(&client, 25, "nothing truncated").await;
    let planted: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'planted'",
            &[],
        )
        .await
        .expect("pg_tables")
        .get(0);
    assert_eq!(planted, 0);
    for sql in [
        "INSERT INTO items (name) VALUES ('new')",
        "UPDATE items SET name = 'renamed' WHERE name = 'new'",
        "WITH doomed AS (SELECT id FROM items WHERE name = 'renamed') DELETE FROM items WHERE id IN (SELECT id FROM doomed)",
    ] {
        let result = client
            .call_tool("pg_execute", json!({"sql": sql}))
            .await
            .expect("pg_execute");
        assert_eq!(rows(&result)["rows_affected"], json!(1), "{sql}");
    }
}

/// Second review, finding 2: every principal's calls run as the same database roles, and
/// PostgreSQL lets a role read the statements of, and cancel or terminate, every other session of
/// the same role. Neither works through the tools: a call cannot read another call's running
/// statement (with its literals) nor stop it, whatever pid it names.
#[tokio::test]
async fn one_principal_can_neither_see_nor_stop_another_principals_statements() {
    let topology = pg_topology(&[("SHOAL_POSTGRES_STATEMENT_TIMEOUT_MS", "30000")]).await;
    let db = topology.postgres_client().await.expect("connect");
    let victim = McpClient::modern(topology.mcp_url());
    let spy = McpClient::modern(topology.mcp_url());
    let running = tokio::spawn(async move {
        victim
            .call_tool(
                "pg_query",
                json!({"sql": "SELECT 'secret-literal-42' AS s, pg_sleep(4)::text AS slept"}),
            )
            .await
    });
    let victim_pid: i32 = eventually("the victim's statement to run", WAIT, async || {
        db.query_opt(
            "SELECT pid FROM pg_stat_activity \
             WHERE query LIKE '%secret-literal-42%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .ok()?
        .map(|row| row.get(0))
    })
    .await;
    for sql in [
        "SELECT pid, query FROM pg_stat_activity WHERE usename = current_user",
        "SELECT s.query FROM pg_stat_get_activity(NULL) AS s",
    ] {
        let result = spy
            .call_tool("pg_query", json!({"sql": sql}))
            .await
            .expect("pg_query");
        assert!(
            !result.to_string().contains("secret-literal-42"),
            "{sql} showed another call's statement: {result}"
        );
        assert!(
            tool_error(&result).contains("permission denied"),
            "{result}"
        );
    }
    for (tool, sql) in [
        ("pg_query", "SELECT pg_terminate_backend($1) AS killed"),
        ("pg_query", "SELECT pg_cancel_backend($1) AS cancelled"),
        (
            "pg_query",
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS killed \
             FROM pg_stat_activity WHERE usename = current_user AND pid <> pg_backend_pid()",
        ),
        (
            "pg_execute",
            "UPDATE items SET name = name WHERE id = 1 AND pg_terminate_backend($1)",
        ),
    ] {
        let params = if sql.contains("$1") {
            json!([victim_pid])
        } else {
            json!([])
        };
        let result = spy
            .call_tool(tool, json!({"sql": sql, "params": params}))
            .await
            .expect(tool);
        assert!(
            tool_error(&result).contains("permission denied"),
            "{sql}: {result}"
        );
    }
    let result = running.await.expect("joined").expect("pg_query");
    assert_eq!(
        rows(&result)["rows"],
        json!([{"s": "secret-literal-42", "slept": ""}]),
        "the victim's call ran to its end"
    );
}
