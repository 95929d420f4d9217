//! `dativo/rust-postgres`: a Dativo reader plugin that reads PostgreSQL with binary COPY into
//! Arrow and streams it to the supervisor over protocol v1.
//!
//! The session (docs/protocol.md, section 6): connect to `$DATIVO_SOCKET`, send `hello`, read
//! `init`, send the schema and the record batches, `end {state}`, wait for `shutdown`, send
//! `bye`. Any failure is one `error` message (category, message, transient) and exit status 1.
//!
//! | module       | what it does                                                   |
//! |--------------|----------------------------------------------------------------|
//! | `protocol`   | frames, control messages, Arrow IPC messages, the send thread  |
//! | `config`     | the `config` keys, checked                                     |
//! | `connect`    | the granted Unix socket, TLS over it, login                    |
//! | `sql`        | every statement the reader sends                               |
//! | `types`      | PostgreSQL types to Arrow types                                |
//! | `copy`       | the binary COPY stream decoded into Arrow builders             |
//! | `reader`     | the statements in order, from `BEGIN` to `COMMIT`              |

mod config;
mod connect;
mod copy;
mod error;
mod protocol;
mod reader;
mod sql;
mod types;

use std::process;

use serde_json::Value;

use crate::error::ReadError;
use crate::protocol::{Conn, Outbox};

/// Exit statuses, as the Python plugin host uses them.
const EXIT_OK: i32 = 0;
const EXIT_FAILED: i32 = 1;
const EXIT_HANDSHAKE: i32 = 2;
const EXIT_HUNG_UP: i32 = 3;

fn main() {
    let mut conn = match Conn::connect() {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("dativo-rust-postgres: cannot connect to the supervisor: {e}");
            process::exit(EXIT_FAILED);
        }
    };
    let init = match handshake(&mut conn) {
        Ok(init) => init,
        Err(status) => process::exit(status),
    };
    process::exit(session(conn, &init));
}

/// `hello`, then `init`; anything else ends the session with the handshake status.
fn handshake(conn: &mut Conn) -> Result<Value, i32> {
    let received = conn
        .send_json(&protocol::hello())
        .and_then(|()| conn.recv_control());
    let init = match received {
        Ok(init) => init,
        Err(e) => {
            eprintln!("dativo-rust-postgres: handshake failed: {e}");
            return Err(EXIT_HANDSHAKE);
        }
    };
    if init["type"] == "init" && init["protocol"] == 1 {
        return Ok(init);
    }
    if init["type"] != "error" {
        let refusal = ReadError::protocol("expected `init` for protocol 1 after `hello`");
        let _ = conn.send_json(&protocol::error(&refusal));
    }
    Err(EXIT_HANDSHAKE)
}

/// Everything after `init`; returns the exit status.
fn session(mut conn: Conn, init: &Value) -> i32 {
    let config = match config::parse(&init["config"]) {
        Ok(config) => config,
        Err(e) => {
            let _ = conn.send_json(&protocol::error(&e));
            return EXIT_FAILED;
        }
    };
    let run = reader::Run {
        config: &config,
        state: init.get("state").filter(|s| !s.is_null()),
        batch_size: init["batch_size"].as_u64().unwrap_or(65536).max(1) as usize,
        max_frame_bytes: init["max_frame_bytes"].as_u64().unwrap_or(128 << 20) as usize,
    };
    let mut outbox = Outbox::start(conn);
    let result = read(&run, &mut outbox);
    let last = match &result {
        Ok(state) => protocol::end(state.clone()),
        Err(e) => protocol::error(e),
    };
    // A failure of the outbox itself (the supervisor gone) is the one to report.
    let sent = outbox.control(last);
    let (conn, closed) = outbox.close();
    let failure = result.err().or(sent.err()).or(closed.err());
    match (failure, conn) {
        (None, Some(mut conn)) => finish(&mut conn),
        (Some(e), _) if e.is_hang_up() => EXIT_HUNG_UP,
        (Some(e), _) => {
            eprintln!("dativo-rust-postgres: {e}");
            EXIT_FAILED
        }
        (None, None) => EXIT_FAILED,
    }
}

/// Runs the read on a single-threaded runtime: the database connection and the decoder share
/// one thread, the outbox thread encodes and sends.
fn read(run: &reader::Run<'_>, outbox: &mut Outbox) -> Result<Option<Value>, ReadError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ReadError::plugin)?;
    runtime.block_on(reader::read(run, outbox))
}

/// After `end`: wait for `shutdown` (or anything else: the run is over either way), say `bye`.
fn finish(conn: &mut Conn) -> i32 {
    match conn.recv_control() {
        Ok(_) => {
            let _ = conn.send_json(&serde_json::json!({"type": "bye"}));
            EXIT_OK
        }
        Err(_) => EXIT_HUNG_UP,
    }
}
