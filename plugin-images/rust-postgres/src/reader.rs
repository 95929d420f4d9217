//! One read, statement by statement (docs/postgres.md, "What is read"):
//!
//! 1. `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY`: one snapshot for everything below;
//! 2. a `table` that does not exist is reported as such (`to_regclass`);
//! 3. describe the source (prepared, never run) and map each column to Arrow;
//! 4. with `incremental`, the upper bound `hi` of this run's window;
//! 5. `COPY (...) TO STDOUT (FORMAT binary)`, decoded into record batches as it arrives;
//! 6. `COMMIT`; the new cursor goes back in `end.state`.

use std::time::Instant;

use bytes::Bytes;
use futures_util::{pin_mut, TryStreamExt};
use serde_json::{json, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::config::{Config, Incremental, Source};
use crate::copy::{ColumnSpec, CopyDecoder};
use crate::error::ReadError;
use crate::protocol::{self, Outbox};
use crate::{connect, sql, types};

/// What the run was given besides its config.
pub struct Run<'a> {
    pub config: &'a Config,
    pub state: Option<&'a Value>,
    pub batch_size: usize,
    pub max_frame_bytes: usize,
}

/// Reads everything, sending the schema and batches to `outbox`; returns the state for `end`.
pub async fn read(run: &Run<'_>, outbox: &mut Outbox) -> Result<Option<Value>, ReadError> {
    let config = run.config;
    let started = Instant::now();
    let client = connect::connect(config).await?;
    execute(&client, sql::BEGIN, config).await?;
    if let Source::Table {
        name,
        schema,
        table,
        ..
    } = &config.source
    {
        let qualified = sql::qualified(schema.as_deref(), table);
        check_table_exists(&client, config, name, &qualified).await?;
    }
    let source = sql::source(&config.source);
    let columns = describe(&client, config, &source).await?;
    let bounds = match &config.incremental {
        None => None,
        Some(incremental) => {
            Some(bounds(&client, config, incremental, &source, &columns, run.state).await?)
        }
    };
    outbox.arrow(protocol::schema_message(&crate::copy::schema(&columns))?)?;

    let (window, state) = match &bounds {
        None => (None, None),
        Some(Bounds::Nothing) => {
            // Nothing above the saved cursor: the schema, no rows, the saved cursor kept.
            execute(&client, sql::COMMIT, config).await?;
            outbox.control(protocol::log("info", "no rows above the saved cursor"))?;
            return Ok(None);
        }
        Some(Bounds::Window { type_name, lo, hi }) => {
            let incremental = config.incremental.as_ref().expect("incremental");
            let window = sql::Window {
                column: &incremental.column,
                type_name,
                inclusive: incremental.inclusive,
                lo: lo.as_deref(),
                hi: Some(hi),
            };
            (
                Some(window),
                Some(json!({"column": incremental.column, "value": hi})),
            )
        }
    };
    let copy = sql::copy(&source, &columns, window.as_ref());
    let (rows, batches) = copy_out(&client, config, &copy, &columns, run, outbox).await?;
    execute(&client, sql::COMMIT, config).await?;
    let seconds = started.elapsed().as_secs_f64();
    outbox.control(protocol::log(
        "info",
        &format!(
            "read {rows} rows in {batches} batches from {} in {seconds:.2} s",
            config.destination()
        ),
    ))?;
    Ok(state)
}

/// Runs the COPY and streams its rows, decoded, to `outbox`; returns (rows, batches).
async fn copy_out(
    client: &Client,
    config: &Config,
    copy: &str,
    columns: &[ColumnSpec],
    run: &Run<'_>,
    outbox: &mut Outbox,
) -> Result<(u64, u64), ReadError> {
    // Cut a batch well before the frame limit: its Arrow form is about as large as its tuples.
    let mut decoder = CopyDecoder::new(columns, run.batch_size, run.max_frame_bytes / 2);
    let mut batches = 0u64;
    let mut send = |batch| {
        batches += 1;
        outbox.batch(batch)
    };
    let stream = client
        .copy_out(copy)
        .await
        .map_err(|e| server_error(config, e, true))?;
    pin_mut!(stream);
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| server_error(config, e, true))?
    {
        let chunk: Bytes = chunk;
        decoder.feed(&chunk, &mut send)?;
    }
    if let Some(last) = decoder.finish()? {
        send(last)?;
    }
    Ok((decoder.total_rows, batches))
}

/// Runs a statement that returns nothing; a failure is the server's message.
async fn execute(client: &Client, statement: &str, config: &Config) -> Result<(), ReadError> {
    client
        .batch_execute(statement)
        .await
        .map_err(|e| server_error(config, e, false))
}

/// A failed statement: the server's own message (with "in `query`" when it is the user's SQL).
fn server_error(config: &Config, e: tokio_postgres::Error, user_sql: bool) -> ReadError {
    let destination = config.destination();
    match e.as_db_error() {
        Some(db) => {
            let mut message = db.message().to_string();
            if let Some(detail) = db.detail() {
                message.push_str(&format!(" ({detail})"));
            }
            if user_sql && matches!(config.source, Source::Query(_)) {
                message.push_str(" in `query`");
            }
            let transient =
                db.code().code().starts_with("40") || db.code().code().starts_with("57");
            let error = ReadError::source(format!("PostgreSQL at {destination}: {message}"));
            if transient {
                error.transient()
            } else {
                error
            }
        }
        None => ReadError::source(format!(
            "lost the connection to PostgreSQL at {destination}: {e}"
        ))
        .transient(),
    }
}

async fn check_table_exists(
    client: &Client,
    config: &Config,
    name: &str,
    qualified: &str,
) -> Result<(), ReadError> {
    let row = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
        .await
        .map_err(|e| server_error(config, e, false))?;
    if row.get::<_, bool>(0) {
        return Ok(());
    }
    Err(ReadError::source(format!(
        "table \"{name}\" does not exist in database \"{}\" (or user \"{}\" cannot see it)",
        config.database, config.user
    )))
}

/// The source's columns and how each is read; refuses duplicate names and unknown types.
async fn describe(
    client: &Client,
    config: &Config,
    source: &str,
) -> Result<Vec<ColumnSpec>, ReadError> {
    let statement = client
        .prepare(&sql::describe(source))
        .await
        .map_err(|e| server_error(config, e, true))?;
    let mut columns: Vec<ColumnSpec> = Vec::new();
    for column in statement.columns() {
        let name = column.name().to_string();
        if columns.iter().any(|c| c.name == name) {
            return Err(ReadError::config(format!(
                "the source has two columns named \"{name}\"; alias one of them in a `query`"
            )));
        }
        let (type_oid, typmod) = (column.type_().oid(), column.type_modifier());
        let Some(kind) = types::column_type(type_oid, typmod) else {
            let type_name = format_type(client, config, type_oid, typmod).await?;
            return Err(ReadError::source(format!(
                "column \"{name}\" has type {type_name}, which the postgres reader cannot read; \
                 cast it in a query, for example {}::text",
                sql::ident(&name)
            )));
        };
        columns.push(ColumnSpec {
            name,
            kind,
            type_oid,
            typmod,
        });
    }
    if columns.is_empty() {
        return Err(ReadError::config("the source has no columns"));
    }
    Ok(columns)
}

/// `format_type(oid, typmod)`: the type as SQL writes it (`numeric(12,2)`, `integer[]`).
async fn format_type(
    client: &Client,
    config: &Config,
    type_oid: u32,
    typmod: i32,
) -> Result<String, ReadError> {
    let row = client
        .query_one(
            "SELECT format_type($1::oid, $2::int4)",
            &[&type_oid, &typmod],
        )
        .await
        .map_err(|e| server_error(config, e, false))?;
    Ok(row
        .get::<_, Option<String>>(0)
        .unwrap_or_else(|| format!("oid {type_oid}")))
}

enum Bounds {
    /// Nothing above the saved cursor.
    Nothing,
    Window {
        type_name: String,
        lo: Option<String>,
        hi: String,
    },
}

/// Step 4: the cursor column's type, the saved cursor (`lo`) and this run's maximum (`hi`).
async fn bounds(
    client: &Client,
    config: &Config,
    incremental: &Incremental,
    source: &str,
    columns: &[ColumnSpec],
    state: Option<&Value>,
) -> Result<Bounds, ReadError> {
    let column = &incremental.column;
    if !columns.iter().any(|c| &c.name == column) {
        return Err(ReadError::config(format!(
            "`incremental.column` \"{column}\" is not a column of the source"
        )));
    }
    let lo = saved_cursor(column, state)?.or_else(|| incremental.start.clone());
    let cursor = columns
        .iter()
        .find(|c| &c.name == column)
        .expect("checked above");
    let type_name = format_type(client, config, cursor.type_oid, cursor.typmod).await?;
    let window = sql::Window {
        column,
        type_name: &type_name,
        inclusive: incremental.inclusive,
        lo: lo.as_deref(),
        hi: None,
    };
    let messages = client
        .simple_query(&sql::upper_bound(source, &window))
        .await
        .map_err(|e| server_error(config, e, true))?;
    let hi = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_string)),
        _ => None,
    });
    Ok(match hi.flatten() {
        None => Bounds::Nothing,
        Some(hi) => Bounds::Window { type_name, lo, hi },
    })
}

/// The saved cursor's value, refusing a state saved for another cursor column.
fn saved_cursor(column: &str, state: Option<&Value>) -> Result<Option<String>, ReadError> {
    let Some(state) = state.filter(|s| s.as_object().is_some_and(|o| !o.is_empty())) else {
        return Ok(None);
    };
    match (state.get("column").and_then(Value::as_str), state.get("value")) {
        (Some(saved), Some(Value::String(value))) if saved == column => Ok(Some(value.clone())),
        (Some(saved), _) if saved != column => Err(ReadError::config(format!(
            "`incremental.column` is \"{column}\" but the saved cursor belongs to \"{saved}\"; \
             run `dativo state reset JOB` to start over"
        ))),
        _ => Err(ReadError::config(
            "the saved state is not a cursor of this reader; run `dativo state reset JOB` to start over",
        )),
    }
}
