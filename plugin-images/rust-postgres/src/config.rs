//! The reader's `config` (docs/postgres.md, "Config keys"), checked key by key.
//!
//! Every problem is a `config` error naming the key, so the user knows what to change in the
//! job file. Unknown keys are refused with the list of valid ones. `config.schema.json` beside
//! `Cargo.toml` is the same contract as a JSON Schema (the image's manifest carries it); a test
//! below keeps the two in step.

use serde_json::{Map, Value};

use crate::error::ReadError;

pub const KEYS: &[&str] = &[
    "application_name",
    "columns",
    "connect_timeout",
    "database",
    "host",
    "incremental",
    "parallel",
    "password",
    "port",
    "query",
    "sslmode",
    "table",
    "user",
];
pub const INCREMENTAL_KEYS: &[&str] = &["column", "mode", "start"];
pub const PARALLEL_KEYS: &[&str] = &["by", "workers"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
}

/// What to read: a table (optionally some of its columns) or a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Table {
        /// As written in the config, for messages.
        name: String,
        schema: Option<String>,
        table: String,
        columns: Option<Vec<String>>,
    },
    Query(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incremental {
    pub column: String,
    pub inclusive: bool,
    pub start: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
    pub sslmode: SslMode,
    pub connect_timeout: u64,
    pub source: Source,
    pub incremental: Option<Incremental>,
    pub application_name: String,
}

impl Config {
    /// `host:port` as the job grants it (an IPv6 address in brackets).
    pub fn destination(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses and checks `init.config`.
pub fn parse(config: &Value) -> Result<Config, ReadError> {
    let map = config
        .as_object()
        .ok_or_else(|| ReadError::config("`config` must be a mapping of the keys below"))?;
    refuse_unknown(map, KEYS, "")?;

    let source = match (map.get("table"), map.get("query")) {
        (Some(_), Some(_)) => {
            return Err(ReadError::config(
                "set one of `table` and `query`, not both",
            ))
        }
        (None, None) => return Err(ReadError::config("set `table` or `query`: what to read")),
        (Some(_), None) => table_source(map)?,
        (None, Some(_)) => {
            if map.contains_key("columns") {
                return Err(ReadError::config(
                    "`columns` goes with `table` only; with `query`, list the columns in the query",
                ));
            }
            Source::Query(non_empty_string(map, "query")?.expect("present"))
        }
    };
    check_parallel(map.get("parallel"))?;

    Ok(Config {
        host: required_string(map, "host")?,
        port: integer(map, "port", 1, 65535)?.unwrap_or(5432) as u16,
        database: required_string(map, "database")?,
        user: required_string(map, "user")?,
        password: string(map, "password")?,
        sslmode: match string(map, "sslmode")?.as_deref() {
            None | Some("prefer") => SslMode::Prefer,
            Some("disable") => SslMode::Disable,
            Some("require") => SslMode::Require,
            Some(_) => {
                return Err(ReadError::config(
                    "`sslmode` must be `disable`, `prefer` or `require`",
                ))
            }
        },
        connect_timeout: integer(map, "connect_timeout", 1, 300)?.unwrap_or(10) as u64,
        source,
        incremental: incremental(map.get("incremental"))?,
        application_name: string(map, "application_name")?.unwrap_or_else(|| "dativo".into()),
    })
}

fn table_source(map: &Map<String, Value>) -> Result<Source, ReadError> {
    let name = non_empty_string(map, "table")?.expect("present");
    // Split at the first `.`; each part is quoted as given.
    let (schema, table) = match name.split_once('.') {
        Some((schema, table)) => (Some(schema.to_string()), table.to_string()),
        None => (None, name.clone()),
    };
    if table.is_empty() || schema.as_deref() == Some("") {
        return Err(ReadError::config(
            "`table` must be `table` or `schema.table`",
        ));
    }
    let columns = match map.get("columns") {
        None => None,
        Some(Value::Array(items)) if !items.is_empty() => Some(
            items
                .iter()
                .map(|item| match item {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    _ => Err(ReadError::config(
                        "`columns` must be a list of column names",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => {
            return Err(ReadError::config(
                "`columns` must be a non-empty list of column names",
            ))
        }
    };
    Ok(Source::Table {
        name,
        schema,
        table,
        columns,
    })
}

fn incremental(value: Option<&Value>) -> Result<Option<Incremental>, ReadError> {
    let Some(value) = value else { return Ok(None) };
    let map = value.as_object().ok_or_else(|| {
        ReadError::config("`incremental` must be a mapping such as `{column: updated_at}`")
    })?;
    refuse_unknown(map, INCREMENTAL_KEYS, "incremental.")?;
    let column = non_empty_string(map, "column")
        .map_err(|_| ReadError::config("`incremental.column` must be a column name"))?
        .ok_or_else(|| ReadError::config("`incremental.column` is required: the cursor column"))?;
    let inclusive = match map.get("mode").map(|v| v.as_str()) {
        None | Some(Some("exclusive")) => false,
        Some(Some("inclusive")) => true,
        Some(_) => {
            return Err(ReadError::config(
                "`incremental.mode` must be `exclusive` or `inclusive`",
            ))
        }
    };
    let start = match map.get("start") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(ReadError::config(
                "`incremental.start` must be a string in PostgreSQL's text form, e.g. `2024-01-01 00:00:00`",
            ))
        }
    };
    Ok(Some(Incremental {
        column,
        inclusive,
        start,
    }))
}

/// `parallel.workers` above 1 is the built-in reader's business; this one reads on one
/// connection.
fn check_parallel(value: Option<&Value>) -> Result<(), ReadError> {
    let Some(value) = value else { return Ok(()) };
    let map = value
        .as_object()
        .ok_or_else(|| ReadError::config("`parallel` must be a mapping such as `{workers: 1}`"))?;
    refuse_unknown(map, PARALLEL_KEYS, "parallel.")?;
    let workers = integer(map, "workers", 1, 16)
        .map_err(|_| ReadError::config("`parallel.workers` must be an integer from 1 to 16"))?;
    if workers.unwrap_or(1) > 1 {
        return Err(ReadError::config(
            "`parallel.workers` above 1 is not supported by dativo/rust-postgres, which reads on \
             one connection; set `parallel.workers: 1`, or use the built-in `postgres` reader \
             for parallel reads",
        ));
    }
    if string(map, "by")
        .map_err(|_| ReadError::config("`parallel.by` must be `ctid` or a column name"))?
        .is_some_and(|s| s.is_empty())
    {
        return Err(ReadError::config(
            "`parallel.by` must be `ctid` or a column name",
        ));
    }
    Ok(())
}

fn refuse_unknown(map: &Map<String, Value>, valid: &[&str], prefix: &str) -> Result<(), ReadError> {
    let mut unknown: Vec<&str> = map
        .keys()
        .map(String::as_str)
        .filter(|k| !valid.contains(k))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort_unstable();
    let names: Vec<String> = unknown.iter().map(|k| format!("`{prefix}{k}`")).collect();
    let valid: Vec<String> = valid.iter().map(|k| format!("{prefix}{k}")).collect();
    Err(ReadError::config(format!(
        "unknown config key{} {}; valid keys: {}",
        if unknown.len() > 1 { "s" } else { "" },
        names.join(", "),
        valid.join(", ")
    )))
}

fn string(map: &Map<String, Value>, key: &str) -> Result<Option<String>, ReadError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ReadError::config(format!("`{key}` must be a string"))),
    }
}

fn non_empty_string(map: &Map<String, Value>, key: &str) -> Result<Option<String>, ReadError> {
    match string(map, key)? {
        Some(s) if s.trim().is_empty() => {
            Err(ReadError::config(format!("`{key}` must not be empty")))
        }
        other => Ok(other),
    }
}

fn required_string(map: &Map<String, Value>, key: &str) -> Result<String, ReadError> {
    non_empty_string(map, key)?.ok_or_else(|| ReadError::config(format!("`{key}` is required")))
}

fn integer(
    map: &Map<String, Value>,
    key: &str,
    min: i64,
    max: i64,
) -> Result<Option<i64>, ReadError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ReadError::config(format!(
                "`{key}` must be an integer from {min} to {max}"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"host": "db", "database": "shop", "user": "loader", "table": "public.orders"})
    }

    fn with(extra: Value) -> Value {
        let mut config = base();
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        config
    }

    fn message(config: Value) -> String {
        let e = parse(&config).unwrap_err();
        assert_eq!(e.category, crate::error::Category::Config);
        e.message
    }

    #[test]
    fn defaults() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.port, 5432);
        assert_eq!(c.sslmode, SslMode::Prefer);
        assert_eq!(c.connect_timeout, 10);
        assert_eq!(c.application_name, "dativo");
        assert_eq!(c.destination(), "db:5432");
        assert_eq!(
            c.source,
            Source::Table {
                name: "public.orders".into(),
                schema: Some("public".into()),
                table: "orders".into(),
                columns: None
            }
        );
    }

    #[test]
    fn unknown_keys_list_the_valid_ones() {
        let m = message(with(json!({"hots": "x"})));
        assert!(m.contains("`hots`"), "{m}");
        assert!(
            m.contains("valid keys: application_name, columns, connect_timeout"),
            "{m}"
        );
        let m = message(with(json!({"incremental": {"column": "c", "colum": "d"}})));
        assert!(
            m.contains("`incremental.colum`") && m.contains("incremental.start"),
            "{m}"
        );
    }

    #[test]
    fn exactly_one_of_table_and_query() {
        assert!(message(with(json!({"query": "SELECT 1"}))).contains("not both"));
        let mut c = base();
        c.as_object_mut().unwrap().remove("table");
        assert!(message(c.clone()).contains("`table` or `query`"));
        c["query"] = json!("SELECT 1");
        c["columns"] = json!(["a"]);
        assert!(message(c).contains("`columns` goes with `table` only"));
    }

    #[test]
    fn parallel_workers_above_one_refused() {
        let m = message(with(json!({"parallel": {"workers": 4}})));
        assert!(
            m.contains("`parallel.workers` above 1 is not supported"),
            "{m}"
        );
        assert!(parse(&with(json!({"parallel": {"workers": 1, "by": "ctid"}}))).is_ok());
    }

    #[test]
    fn ranges_and_enums() {
        assert!(
            message(with(json!({"port": 0}))).contains("`port` must be an integer from 1 to 65535")
        );
        assert!(message(with(json!({"connect_timeout": 301}))).contains("1 to 300"));
        assert!(message(with(json!({"sslmode": "verify-full"}))).contains("`sslmode`"));
        assert!(
            message(with(json!({"incremental": {"column": "c", "mode": "x"}}))).contains("mode")
        );
    }

    #[test]
    fn incremental_and_columns() {
        let c = parse(&with(json!({"columns": ["b", "a"],
            "incremental": {"column": "c", "mode": "inclusive", "start": "2024-01-01"}})))
        .unwrap();
        assert_eq!(
            c.incremental,
            Some(Incremental {
                column: "c".into(),
                inclusive: true,
                start: Some("2024-01-01".into())
            })
        );
        match c.source {
            Source::Table {
                columns, schema, ..
            } => {
                assert_eq!(columns, Some(vec!["b".to_string(), "a".to_string()]));
                assert_eq!(schema.as_deref(), Some("public"));
            }
            _ => panic!(),
        }
        let c = parse(&with(json!({"table": "orders"}))).unwrap();
        assert!(matches!(c.source, Source::Table { schema: None, .. }));
    }

    #[test]
    fn json_schema_names_the_same_keys() {
        let schema: Value = serde_json::from_str(include_str!("../config.schema.json")).unwrap();
        let keys = |v: &Value| -> Vec<String> {
            let mut k: Vec<String> = v["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            k.sort();
            k
        };
        assert_eq!(keys(&schema), KEYS);
        assert_eq!(keys(&schema["properties"]["incremental"]), INCREMENTAL_KEYS);
        assert_eq!(keys(&schema["properties"]["parallel"]), PARALLEL_KEYS);
        assert_eq!(schema["additionalProperties"], json!(false));
    }
}
