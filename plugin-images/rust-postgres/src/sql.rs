//! The SQL the reader sends, built in one place (docs/postgres.md, "What is read").

use crate::config::Source;
use crate::copy::ColumnSpec;

pub const BEGIN: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
pub const COMMIT: &str = "COMMIT";

/// `"name"`, with embedded quotes doubled.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An SQL string literal, as libpq's `PQescapeLiteral` writes it: quotes doubled, and
/// backslashes doubled inside an `E'...'` literal.
pub fn literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if value.contains('\\') {
        format!(" E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// `"schema"."table"` (or `"table"`): each part quoted as given.
pub fn qualified(schema: Option<&str>, table: &str) -> String {
    match schema {
        Some(schema) => format!("{}.{}", ident(schema), ident(table)),
        None => ident(table),
    }
}

/// The source `S`, parenthesised for `FROM S AS dativo_src`.
pub fn source(source: &Source) -> String {
    match source {
        Source::Table {
            schema,
            table,
            columns,
            ..
        } => {
            let list = match columns {
                None => "*".to_string(),
                Some(columns) => columns
                    .iter()
                    .map(|c| ident(c))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            format!(
                "(SELECT {list} FROM {})",
                qualified(schema.as_deref(), table)
            )
        }
        Source::Query(query) => format!("({query})"),
    }
}

/// Prepared only, never run: its row description names and types the columns.
pub fn describe(source: &str) -> String {
    format!("SELECT * FROM {source} AS dativo_src LIMIT 0")
}

/// The incremental window: above the saved cursor `lo` (if any), up to `hi` (if any).
pub struct Window<'a> {
    pub column: &'a str,
    pub type_name: &'a str,
    pub inclusive: bool,
    pub lo: Option<&'a str>,
    pub hi: Option<&'a str>,
}

impl Window<'_> {
    fn lower(&self) -> Option<String> {
        let op = if self.inclusive { ">=" } else { ">" };
        self.lo.map(|lo| {
            format!(
                "{} {op} {}::{}",
                ident(self.column),
                literal(lo),
                self.type_name
            )
        })
    }

    fn where_clause(&self) -> String {
        let upper = self.hi.map(|hi| {
            format!(
                "{} <= {}::{}",
                ident(self.column),
                literal(hi),
                self.type_name
            )
        });
        let parts: Vec<String> = self.lower().into_iter().chain(upper).collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", parts.join(" AND "))
        }
    }
}

/// `SELECT max("c")::text FROM S AS dativo_src [WHERE "c" > 'lo'::T]`.
pub fn upper_bound(source: &str, window: &Window<'_>) -> String {
    let lower = window
        .lower()
        .map(|l| format!(" WHERE {l}"))
        .unwrap_or_default();
    format!(
        "SELECT max({})::text FROM {source} AS dativo_src{lower}",
        ident(window.column)
    )
}

/// `COPY (SELECT <list> FROM S AS dativo_src [WHERE ...]) TO STDOUT (FORMAT binary)`.
pub fn copy(source: &str, columns: &[ColumnSpec], window: Option<&Window<'_>>) -> String {
    let list: Vec<String> = columns
        .iter()
        .map(|c| {
            let column = format!("dativo_src.{}", ident(&c.name));
            match (c.kind.as_text, c.kind.list) {
                (false, _) => column,
                (true, false) => format!("{column}::text AS {}", ident(&c.name)),
                (true, true) => format!("{column}::text[] AS {}", ident(&c.name)),
            }
        })
        .collect();
    let filter = window.map(Window::where_clause).unwrap_or_default();
    format!(
        "COPY (SELECT {} FROM {source} AS dativo_src{filter}) TO STDOUT (FORMAT binary)",
        list.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{column_type, oid};

    fn table(columns: Option<Vec<&str>>) -> Source {
        Source::Table {
            name: "public.orders".into(),
            schema: Some("public".into()),
            table: "orders".into(),
            columns: columns.map(|c| c.into_iter().map(String::from).collect()),
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("a\\b"), " E'a\\\\b'");
        assert_eq!(qualified(None, "Orders"), "\"Orders\"");
    }

    #[test]
    fn statements() {
        let s = source(&table(None));
        assert_eq!(s, "(SELECT * FROM \"public\".\"orders\")");
        assert_eq!(
            source(&table(Some(vec!["b", "a"]))),
            "(SELECT \"b\", \"a\" FROM \"public\".\"orders\")"
        );
        assert_eq!(source(&Source::Query("VALUES (1)".into())), "(VALUES (1))");
        assert_eq!(
            describe(&s),
            "SELECT * FROM (SELECT * FROM \"public\".\"orders\") AS dativo_src LIMIT 0"
        );

        let w = Window {
            column: "ts",
            type_name: "timestamp without time zone",
            inclusive: false,
            lo: Some("2024-01-01"),
            hi: None,
        };
        assert_eq!(
            upper_bound("(S)", &w),
            "SELECT max(\"ts\")::text FROM (S) AS dativo_src WHERE \"ts\" > '2024-01-01'::timestamp without time zone"
        );
        let first = Window { lo: None, ..w };
        assert_eq!(
            upper_bound("(S)", &first),
            "SELECT max(\"ts\")::text FROM (S) AS dativo_src"
        );

        let columns = vec![
            ColumnSpec {
                name: "id".into(),
                kind: column_type(oid::INT4, -1).unwrap(),
                type_oid: oid::INT4,
                typmod: -1,
            },
            ColumnSpec {
                name: "u".into(),
                kind: column_type(oid::UUID, -1).unwrap(),
                type_oid: oid::UUID,
                typmod: -1,
            },
            ColumnSpec {
                name: "us".into(),
                kind: column_type(2951, -1).unwrap(),
                type_oid: 2951,
                typmod: -1,
            },
        ];
        let w = Window {
            column: "id",
            type_name: "integer",
            inclusive: true,
            lo: Some("5"),
            hi: Some("9"),
        };
        assert_eq!(
            copy("(S)", &columns, Some(&w)),
            "COPY (SELECT dativo_src.\"id\", dativo_src.\"u\"::text AS \"u\", dativo_src.\"us\"::text[] AS \"us\" \
             FROM (S) AS dativo_src WHERE \"id\" >= '5'::integer AND \"id\" <= '9'::integer) TO STDOUT (FORMAT binary)"
        );
        assert_eq!(
            copy("(S)", &columns[..1], None),
            "COPY (SELECT dativo_src.\"id\" FROM (S) AS dativo_src) TO STDOUT (FORMAT binary)"
        );
    }
}
