//! Protocol v1, the plugin side (docs/protocol.md): frames on the plugin socket, the control
//! messages a reader sends, and Arrow IPC messages, one per ARROW frame.
//!
//! A frame is an 8-byte header (kind, three zero bytes, u32 little-endian payload length) and
//! its payload: one JSON object (CONTROL) or one encapsulated Arrow IPC message (ARROW).
//!
//! [`Outbox`] moves the encoding and sending of record batches to a thread of its own, so the
//! next batch is decoded from PostgreSQL while the previous one is on its way.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use arrow_ipc::writer::{
    write_message, DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions,
};
use arrow_schema::Schema;
use serde_json::{json, Value};

use crate::error::ReadError;

const CONTROL: u8 = 1;
const ARROW: u8 = 2;
const MAX_CONTROL: usize = 1 << 20;
/// The Python host keeps error messages to this many characters; so do we.
const MAX_MESSAGE_CHARS: usize = 4000;

/// The connection to the supervisor.
pub struct Conn {
    stream: UnixStream,
}

impl Conn {
    /// Connects to `$DATIVO_SOCKET`, retrying for up to 30 s while it is missing or refuses.
    pub fn connect() -> io::Result<Conn> {
        let path =
            std::env::var("DATIVO_SOCKET").unwrap_or_else(|_| "/run/dativo/plugin.sock".into());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match UnixStream::connect(&path) {
                Ok(stream) => return Ok(Conn { stream }),
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one frame whose payload is `first` then `second`, with as few writes as the
    /// socket allows and no copy of the payload.
    fn send_parts(&mut self, kind: u8, first: &[u8], second: &[u8]) -> io::Result<()> {
        let length = first.len() + second.len();
        let length = u32::try_from(length)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame larger than 4 GiB"))?;
        let mut header = [0u8; 8];
        header[0] = kind;
        header[4..].copy_from_slice(&length.to_le_bytes());
        let mut parts = [&header[..], first, second];
        let mut index = 0;
        while index < parts.len() {
            let slices: Vec<io::IoSlice<'_>> =
                parts[index..].iter().map(|p| io::IoSlice::new(p)).collect();
            let mut written = self.stream.write_vectored(&slices)?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while index < parts.len() && written >= parts[index].len() {
                written -= parts[index].len();
                index += 1;
            }
            if index < parts.len() {
                parts[index] = &parts[index][written..];
            }
        }
        Ok(())
    }

    fn send(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        self.send_parts(kind, payload, &[])
    }

    pub fn send_json(&mut self, message: &Value) -> io::Result<()> {
        self.send(CONTROL, &serde_json::to_vec(message)?)
    }

    /// Reads one CONTROL frame (a reader is never sent anything else).
    pub fn recv_control(&mut self) -> io::Result<Value> {
        let mut header = [0u8; 8];
        self.stream.read_exact(&mut header)?;
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if header[0] != CONTROL || header[1..4] != [0, 0, 0] || len == 0 || len > MAX_CONTROL {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("invalid frame header from the supervisor: {header:02x?}"),
            ));
        }
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload)?;
        serde_json::from_slice(&payload).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("invalid control message: {e}"),
            )
        })
    }
}

/// `hello`: the plugin's first frame.
pub fn hello() -> Value {
    json!({"type": "hello", "protocols": [1], "role": "reader",
           "plugin": "dativo/rust-postgres", "version": env!("CARGO_PKG_VERSION")})
}

/// `log` at `level` (`debug`, `info`, `warning`, `error`).
pub fn log(level: &str, message: &str) -> Value {
    json!({"type": "log", "level": level, "message": message})
}

/// `end`, with the state to save when the run succeeds (`null`: keep the saved one).
pub fn end(state: Option<Value>) -> Value {
    match state {
        Some(state) => json!({"type": "end", "state": state}),
        None => json!({"type": "end"}),
    }
}

/// `error` for a failure: category, one-line message, transient flag.
pub fn error(failure: &ReadError) -> Value {
    let message: String = failure.message.chars().take(MAX_MESSAGE_CHARS).collect();
    let mut value = json!({"type": "error", "category": failure.category.as_str(),
                           "message": message, "transient": failure.transient});
    if let Some(detail) = &failure.detail {
        value["detail"] = Value::String(detail.clone());
    }
    value
}

/// Buffers aligned to 64 bytes (Arrow's recommendation; section 5 asks for 8 at least).
const ALIGNMENT: usize = 64;

/// Metadata V5, 64-byte alignment, no compression: what section 5 asks of producers.
fn ipc_options() -> IpcWriteOptions {
    IpcWriteOptions::try_new(ALIGNMENT, false, arrow_ipc::MetadataVersion::V5)
        .expect("valid IPC options")
}

/// The schema as one encapsulated IPC message (no end-of-stream marker).
pub fn schema_message(schema: &Schema) -> Result<Vec<u8>, ReadError> {
    let options = ipc_options();
    let mut tracker = DictionaryTracker::new(false);
    let encoded = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
        schema,
        &mut tracker,
        &options,
    );
    let mut out = Vec::new();
    write_message(&mut out, encoded, &options).map_err(ReadError::plugin)?;
    Ok(out)
}

/// Encodes record batches as encapsulated IPC messages.
struct BatchEncoder {
    options: IpcWriteOptions,
    context: IpcWriteContext,
}

/// One encoded batch: the continuation prefix, the flatbuffer and its padding (`head`), then
/// the body, which is sent as it is rather than copied after the head.
struct EncodedBatch {
    head: Vec<u8>,
    body: Vec<u8>,
}

impl BatchEncoder {
    fn new() -> Self {
        BatchEncoder {
            options: ipc_options(),
            context: IpcWriteContext::default(),
        }
    }

    /// The same bytes `write_message` would write (checked by a test), in two parts.
    fn encode(&mut self, batch: &RecordBatch) -> Result<EncodedBatch, ReadError> {
        let mut tracker = DictionaryTracker::new(false);
        let (dictionaries, encoded) = IpcDataGenerator::default()
            .encode(batch, &mut tracker, &self.options, &mut self.context)
            .map_err(ReadError::plugin)?;
        if !dictionaries.is_empty() {
            return Err(ReadError::plugin(
                "protocol v1 forbids dictionary-encoded columns",
            ));
        }
        let alignment = ALIGNMENT;
        if encoded.arrow_data.len() % alignment != 0 {
            return Err(ReadError::plugin(
                "arrow-ipc returned an unaligned message body",
            ));
        }
        // FF FF FF FF, the padded flatbuffer length, the flatbuffer, zeros up to the alignment.
        let mask = alignment - 1;
        let padded = (encoded.ipc_message.len() + 8 + mask) & !mask;
        let mut head = Vec::with_capacity(padded);
        head.extend_from_slice(&[0xff; 4]);
        head.extend_from_slice(&((padded - 8) as i32).to_le_bytes());
        head.extend_from_slice(&encoded.ipc_message);
        head.resize(padded, 0);
        Ok(EncodedBatch {
            head,
            body: encoded.arrow_data,
        })
    }
}

/// Encodes a batch and frees its arrays before the (possibly long) send.
fn drop_after_encoding(
    encoder: &mut BatchEncoder,
    batch: RecordBatch,
) -> Result<EncodedBatch, ReadError> {
    encoder.encode(&batch)
}

enum Outgoing {
    /// An encoded IPC message (the schema).
    Arrow(Vec<u8>),
    Batch(RecordBatch),
    Control(Value),
}

/// Sends frames from a thread of its own, a couple of batches behind the decoder.
///
/// The queue holds at most two batches, so memory stays bounded when the supervisor (or the
/// writer behind it) is slower than PostgreSQL. When sending fails, the thread stops and every
/// later call reports that failure.
pub struct Outbox {
    queue: Option<SyncSender<Outgoing>>,
    worker: Option<JoinHandle<(Conn, Result<(), ReadError>)>>,
    stopped: Option<(Option<Conn>, Result<(), ReadError>)>,
}

impl Outbox {
    pub fn start(mut conn: Conn) -> Outbox {
        let (queue, incoming) = sync_channel::<Outgoing>(2);
        let worker = thread::Builder::new()
            .name("outbox".into())
            .spawn(move || {
                let mut encoder = BatchEncoder::new();
                let mut result = Ok(());
                for item in incoming {
                    let sent = match item {
                        Outgoing::Arrow(bytes) => conn.send(ARROW, &bytes).map_err(ReadError::from),
                        Outgoing::Batch(batch) => drop_after_encoding(&mut encoder, batch)
                            .and_then(|encoded| {
                                conn.send_parts(ARROW, &encoded.head, &encoded.body)
                                    .map_err(ReadError::from)
                            }),
                        Outgoing::Control(message) => {
                            conn.send_json(&message).map_err(ReadError::from)
                        }
                    };
                    if let Err(e) = sent {
                        result = Err(e);
                        break; // dropping `incoming` makes the next `push` fail
                    }
                }
                (conn, result)
            })
            .expect("cannot start the outbox thread");
        Outbox {
            queue: Some(queue),
            worker: Some(worker),
            stopped: None,
        }
    }

    fn push(&mut self, item: Outgoing) -> Result<(), ReadError> {
        let delivered = match &self.queue {
            Some(queue) => queue.send(item).is_ok(),
            None => false,
        };
        if delivered {
            return Ok(());
        }
        self.join();
        Err(match &self.stopped {
            Some((_, Err(e))) => e.clone(),
            _ => ReadError::plugin("the outbox thread stopped"),
        })
    }

    fn join(&mut self) {
        self.queue = None;
        if let Some(worker) = self.worker.take() {
            self.stopped = Some(match worker.join() {
                Ok((conn, result)) => (Some(conn), result),
                Err(_) => (None, Err(ReadError::plugin("the outbox thread panicked"))),
            });
        }
    }

    pub fn arrow(&mut self, message: Vec<u8>) -> Result<(), ReadError> {
        self.push(Outgoing::Arrow(message))
    }

    pub fn batch(&mut self, batch: RecordBatch) -> Result<(), ReadError> {
        self.push(Outgoing::Batch(batch))
    }

    pub fn control(&mut self, message: Value) -> Result<(), ReadError> {
        self.push(Outgoing::Control(message))
    }

    /// Waits until everything queued has been sent; gives the connection back.
    pub fn close(&mut self) -> (Option<Conn>, Result<(), ReadError>) {
        self.join();
        self.stopped
            .take()
            .unwrap_or((None, Err(ReadError::plugin("the outbox was closed twice"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, Int32Array, StringArray};
    use arrow_schema::{DataType, Field};
    use std::sync::Arc;

    #[test]
    fn batches_encode_as_write_message_would() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("i", DataType::Int32, true),
            Field::new("s", DataType::Utf8, true),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int32Array::from(vec![Some(1), None, Some(3)])),
            Arc::new(StringArray::from(vec![Some("a"), Some("bc"), None])),
        ];
        let batch = RecordBatch::try_new(schema, columns).unwrap();
        let mut ours = BatchEncoder::new();
        let encoded = ours.encode(&batch).unwrap();
        let mut mine = encoded.head.clone();
        mine.extend_from_slice(&encoded.body);

        let options = ipc_options();
        let mut context = IpcWriteContext::default();
        let mut tracker = DictionaryTracker::new(false);
        let (_, reference) = IpcDataGenerator::default()
            .encode(&batch, &mut tracker, &options, &mut context)
            .unwrap();
        let mut expected = Vec::new();
        write_message(&mut expected, reference, &options).unwrap();
        assert_eq!(mine, expected);
    }

    #[test]
    fn frames_have_the_documented_header() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut conn = Conn { stream: a };
        conn.send_json(&json!({"type": "bye"})).unwrap();
        drop(conn);
        let mut bytes = Vec::new();
        let mut b = b;
        b.read_to_end(&mut bytes).unwrap();
        let mut expected = vec![1, 0, 0, 0, 14, 0, 0, 0];
        expected.extend_from_slice(br#"{"type":"bye"}"#);
        assert_eq!(bytes, expected);
    }
}
