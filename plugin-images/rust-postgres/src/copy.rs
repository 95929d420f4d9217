//! PostgreSQL's binary COPY format, decoded straight into Arrow builders.
//!
//! The stream is a header (`PGCOPY\n\xff\r\n\0`, flags, an extension area), then one tuple
//! per row: a 16-bit field count, then per field a 32-bit length (-1 for NULL) and the value
//! in the type's binary send format, all big-endian; a field count of -1 ends it.
//!
//! [`CopyDecoder::feed`] takes the stream in whatever chunks it arrives (PostgreSQL sends one
//! tuple per CopyData message, but nothing here relies on it) and hands a `RecordBatch` to its
//! caller every `batch_size` rows. A tuple is checked to be complete before any of its values
//! is appended, so a tuple cut between two chunks is simply kept for the next one.

use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, StringBuilder,
    Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, ListArray, RecordBatch};
use arrow_buffer::{NullBufferBuilder, OffsetBuffer, ScalarBuffer};
use arrow_schema::{Field, Schema, SchemaRef};

use crate::error::ReadError;
use crate::types::{item_field, ColumnType, Scalar};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Days from 1970-01-01 (Arrow's epoch) to 2000-01-01 (PostgreSQL's).
const PG_EPOCH_DAYS: i32 = 10_957;
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// One result column: its name (for messages) and how it is read.
#[derive(Clone, Debug)]
pub struct ColumnSpec {
    pub name: String,
    pub kind: ColumnType,
    /// As described by the server, for messages and the incremental cursor's type.
    pub type_oid: u32,
    pub typmod: i32,
}

/// The Arrow schema of the columns: every field nullable, no metadata.
pub fn schema(columns: &[ColumnSpec]) -> SchemaRef {
    let fields: Vec<Field> = columns
        .iter()
        .map(|c| Field::new(&c.name, c.kind.data_type(), true))
        .collect();
    Arc::new(Schema::new(fields))
}

// -- reading big-endian values -------------------------------------------------------------

fn be_i16(b: &[u8]) -> i16 {
    i16::from_be_bytes([b[0], b[1]])
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_i64(b: &[u8]) -> i64 {
    i64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// A value that cannot be read as its column's Arrow type; the caller adds the column name.
#[derive(Debug, PartialEq)]
enum Bad {
    /// A value of the wrong size for its type: a corrupt stream.
    Malformed(&'static str),
    /// A legal PostgreSQL value the Arrow type cannot hold (`infinity`, `NaN`, ...).
    Unrepresentable(String),
}

fn want(data: &[u8], len: usize, what: &'static str) -> Result<(), Bad> {
    if data.len() == len {
        Ok(())
    } else {
        Err(Bad::Malformed(what))
    }
}

// -- numeric -------------------------------------------------------------------------------

#[cfg(test)]
const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;

/// A numeric's binary form: base-10000 digits, the weight of the first one, sign, display scale.
struct Numeric<'a> {
    weight: i32,
    sign: u16,
    dscale: i32,
    digits: &'a [u8], // ndigits big-endian i16
}

impl<'a> Numeric<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, Bad> {
        if data.len() < 8 {
            return Err(Bad::Malformed("numeric"));
        }
        let ndigits = be_i16(data) as usize;
        let digits = &data[8..];
        if digits.len() != ndigits * 2 {
            return Err(Bad::Malformed("numeric"));
        }
        Ok(Numeric {
            weight: be_i16(&data[2..]) as i32,
            sign: u16::from_be_bytes([data[4], data[5]]),
            dscale: be_i16(&data[6..]) as i32,
            digits,
        })
    }

    fn digit(&self, i: i32) -> i32 {
        if i < 0 || i as usize * 2 >= self.digits.len() {
            0
        } else {
            be_i16(&self.digits[i as usize * 2..]) as i32
        }
    }

    fn ndigits(&self) -> i32 {
        (self.digits.len() / 2) as i32
    }

    fn special(&self) -> Option<&'static str> {
        match self.sign {
            NUMERIC_NAN => Some("NaN"),
            NUMERIC_PINF => Some("Infinity"),
            NUMERIC_NINF => Some("-Infinity"),
            _ => None,
        }
    }

    /// The value times 10^scale, as decimal128 stores it.
    fn to_i128(&self, scale: i32) -> Result<i128, Bad> {
        if let Some(special) = self.special() {
            return Err(Bad::Unrepresentable(special.to_string()));
        }
        let overflow = || Bad::Unrepresentable("a value too large for decimal128".into());
        let mut value: i128 = 0;
        for i in 0..self.ndigits() {
            let digit = self.digit(i) as i128;
            // Digit i counts 10000^(weight - i); scaled by 10^scale.
            let exponent = 4 * (self.weight - i) + scale;
            let term = if exponent >= 0 {
                pow10(exponent)
                    .and_then(|p| p.checked_mul(digit))
                    .ok_or_else(overflow)?
            } else if exponent > -4 {
                // A digit is below 10000: divide in 32 bits, not 128.
                (self.digit(i) / POW10_I32[(-exponent) as usize]) as i128
            } else {
                0 // beyond the scale (never sent: the server rounds to the column's scale)
            };
            value = value.checked_add(term).ok_or_else(overflow)?;
        }
        Ok(if self.sign == NUMERIC_NEG {
            -value
        } else {
            value
        })
    }

    /// PostgreSQL's own text form (`numeric_out`): every digit, exactly `dscale` decimals.
    fn to_text(&self, out: &mut String) {
        if let Some(special) = self.special() {
            out.push_str(special);
            return;
        }
        if self.sign == NUMERIC_NEG {
            out.push('-');
        }
        if self.weight < 0 {
            out.push('0');
        } else {
            for i in 0..=self.weight {
                let digit = self.digit(i);
                if i == 0 {
                    push_int(out, digit);
                } else {
                    push_4digits(out, digit);
                }
            }
        }
        if self.dscale > 0 {
            out.push('.');
            let mut left = self.dscale;
            let mut i = self.weight + 1;
            while left > 0 {
                let mut chunk = String::with_capacity(4);
                push_4digits(&mut chunk, self.digit(i));
                let take = left.min(4) as usize;
                out.push_str(&chunk[..take]);
                left -= take as i32;
                i += 1;
            }
        }
    }
}

fn push_int(out: &mut String, n: i32) {
    use std::fmt::Write;
    let _ = write!(out, "{n}");
}

fn push_4digits(out: &mut String, n: i32) {
    use std::fmt::Write;
    let _ = write!(out, "{n:04}");
}

/// 10^0 ..= 10^38: every power of ten an i128 holds.
const POW10: [i128; 39] = {
    let mut table = [1i128; 39];
    let mut i = 1;
    while i < 39 {
        table[i] = table[i - 1] * 10;
        i += 1;
    }
    table
};

const POW10_I32: [i32; 4] = [1, 10, 100, 1000];

fn pow10(exponent: i32) -> Option<i128> {
    POW10.get(usize::try_from(exponent).ok()?).copied()
}

// -- builders --------------------------------------------------------------------------------

/// The values of one column (or of one array column's elements), in an Arrow builder.
enum Values {
    Bool(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal(Decimal128Builder, u8, i8),
    /// Text, numeric as text, jsonb (its version byte dropped).
    Utf8(StringBuilder, Scalar),
    Binary(BinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    Timestamp(TimestampMicrosecondBuilder, bool),
}

impl Values {
    /// Builders sized for `n` values, so a batch fills them without reallocating.
    fn new(scalar: Scalar, n: usize) -> Values {
        match scalar {
            Scalar::Bool => Values::Bool(BooleanBuilder::with_capacity(n)),
            Scalar::Int16 => Values::Int16(Int16Builder::with_capacity(n)),
            Scalar::Int32 => Values::Int32(Int32Builder::with_capacity(n)),
            Scalar::Int64 => Values::Int64(Int64Builder::with_capacity(n)),
            Scalar::Float32 => Values::Float32(Float32Builder::with_capacity(n)),
            Scalar::Float64 => Values::Float64(Float64Builder::with_capacity(n)),
            Scalar::Decimal { precision, scale } => {
                Values::Decimal(Decimal128Builder::with_capacity(n), precision, scale)
            }
            Scalar::NumericText | Scalar::Text | Scalar::Jsonb => {
                Values::Utf8(StringBuilder::with_capacity(n, n * 16), scalar)
            }
            Scalar::Bytea => Values::Binary(BinaryBuilder::with_capacity(n, n * 16)),
            Scalar::Date => Values::Date(Date32Builder::with_capacity(n)),
            Scalar::Time => Values::Time(Time64MicrosecondBuilder::with_capacity(n)),
            Scalar::Timestamp => {
                Values::Timestamp(TimestampMicrosecondBuilder::with_capacity(n), false)
            }
            Scalar::TimestampTz => {
                Values::Timestamp(TimestampMicrosecondBuilder::with_capacity(n), true)
            }
        }
    }

    fn append_null(&mut self) {
        match self {
            Values::Bool(b) => b.append_null(),
            Values::Int16(b) => b.append_null(),
            Values::Int32(b) => b.append_null(),
            Values::Int64(b) => b.append_null(),
            Values::Float32(b) => b.append_null(),
            Values::Float64(b) => b.append_null(),
            Values::Decimal(b, ..) => b.append_null(),
            Values::Utf8(b, _) => b.append_null(),
            Values::Binary(b) => b.append_null(),
            Values::Date(b) => b.append_null(),
            Values::Time(b) => b.append_null(),
            Values::Timestamp(b, _) => b.append_null(),
        }
    }

    /// Appends one value in its binary send format. The common fixed-width and text values
    /// take the short path, inlined into the tuple loop; the rest go to `append_other`.
    #[inline(always)]
    fn append(&mut self, data: &[u8], text: &mut String) -> Result<(), Bad> {
        match self {
            Values::Int32(b) if data.len() == 4 => b.append_value(be_i32(data)),
            Values::Int64(b) if data.len() == 8 => b.append_value(be_i64(data)),
            Values::Float64(b) if data.len() == 8 => {
                b.append_value(f64::from_bits(be_i64(data) as u64))
            }
            Values::Utf8(b, Scalar::Text) => match std::str::from_utf8(data) {
                Ok(s) => b.append_value(s),
                Err(_) => return Err(Bad::Malformed("UTF-8 text")),
            },
            _ => return self.append_other(data, text),
        }
        Ok(())
    }

    /// Every other value: the rarer types, and wrong sizes (reported as malformed).
    #[inline(never)]
    fn append_other(&mut self, data: &[u8], text: &mut String) -> Result<(), Bad> {
        match self {
            Values::Bool(b) => {
                want(data, 1, "boolean")?;
                b.append_value(data[0] != 0)
            }
            Values::Int16(b) => {
                want(data, 2, "smallint")?;
                b.append_value(be_i16(data))
            }
            Values::Int32(b) => {
                want(data, 4, "integer")?;
                b.append_value(be_i32(data))
            }
            Values::Int64(b) => {
                want(data, 8, "bigint")?;
                b.append_value(be_i64(data))
            }
            Values::Float32(b) => {
                want(data, 4, "real")?;
                b.append_value(f32::from_bits(be_i32(data) as u32))
            }
            Values::Float64(b) => {
                want(data, 8, "double precision")?;
                b.append_value(f64::from_bits(be_i64(data) as u64))
            }
            Values::Decimal(b, _, scale) => {
                b.append_value(Numeric::parse(data)?.to_i128(*scale as i32)?)
            }
            Values::Utf8(b, Scalar::NumericText) => {
                text.clear();
                Numeric::parse(data)?.to_text(text);
                b.append_value(text.as_str())
            }
            Values::Utf8(b, scalar) => {
                let bytes = if *scalar == Scalar::Jsonb {
                    match data.split_first() {
                        Some((1, rest)) => rest,
                        _ => return Err(Bad::Malformed("jsonb (unknown version)")),
                    }
                } else {
                    data
                };
                let s = std::str::from_utf8(bytes).map_err(|_| Bad::Malformed("UTF-8 text"))?;
                b.append_value(s)
            }
            Values::Binary(b) => b.append_value(data),
            Values::Date(b) => {
                want(data, 4, "date")?;
                match be_i32(data) {
                    i32::MAX => return Err(Bad::Unrepresentable("infinity".into())),
                    i32::MIN => return Err(Bad::Unrepresentable("-infinity".into())),
                    days => b.append_value(
                        days.checked_add(PG_EPOCH_DAYS)
                            .ok_or_else(|| Bad::Unrepresentable("a date out of range".into()))?,
                    ),
                }
            }
            Values::Time(b) => {
                want(data, 8, "time")?;
                b.append_value(be_i64(data))
            }
            Values::Timestamp(b, _) => {
                want(data, 8, "timestamp")?;
                match be_i64(data) {
                    i64::MAX => return Err(Bad::Unrepresentable("infinity".into())),
                    i64::MIN => return Err(Bad::Unrepresentable("-infinity".into())),
                    micros => {
                        b.append_value(micros.checked_add(PG_EPOCH_MICROS).ok_or_else(|| {
                            Bad::Unrepresentable("a timestamp out of range".into())
                        })?)
                    }
                }
            }
        }
        Ok(())
    }

    /// The values so far as an array; the builder is left empty.
    fn finish(&mut self) -> ArrayRef {
        match self {
            Values::Bool(b) => Arc::new(b.finish()),
            Values::Int16(b) => Arc::new(b.finish()),
            Values::Int32(b) => Arc::new(b.finish()),
            Values::Int64(b) => Arc::new(b.finish()),
            Values::Float32(b) => Arc::new(b.finish()),
            Values::Float64(b) => Arc::new(b.finish()),
            Values::Decimal(b, precision, scale) => Arc::new(
                b.finish()
                    .with_precision_and_scale(*precision, *scale)
                    .expect("precision and scale checked by the type mapping"),
            ),
            Values::Utf8(b, _) => Arc::new(b.finish()),
            Values::Binary(b) => Arc::new(b.finish()),
            Values::Date(b) => Arc::new(b.finish()),
            Values::Time(b) => Arc::new(b.finish()),
            Values::Timestamp(b, utc) => {
                let array = b.finish();
                Arc::new(if *utc {
                    array.with_timezone("UTC")
                } else {
                    array
                })
            }
        }
    }
}

/// A list column's offsets and validity; its elements go to a [`Values`].
struct Lists {
    offsets: Vec<i32>,
    nulls: NullBufferBuilder,
}

impl Lists {
    fn new() -> Lists {
        Lists {
            offsets: vec![0],
            nulls: NullBufferBuilder::new(0),
        }
    }
}

struct ColumnBuilder {
    name: String,
    scalar: Scalar,
    values: Values,
    lists: Option<Lists>,
    /// Elements appended to `values` in this batch (list columns).
    elements: i64,
    /// Values expected per batch: the builders are sized for it.
    capacity: usize,
}

impl ColumnBuilder {
    fn new(spec: &ColumnSpec, capacity: usize) -> ColumnBuilder {
        ColumnBuilder {
            name: spec.name.clone(),
            scalar: spec.kind.scalar,
            values: Values::new(spec.kind.scalar, capacity),
            lists: spec.kind.list.then(Lists::new),
            elements: 0,
            capacity,
        }
    }

    fn append_null(&mut self) {
        match &mut self.lists {
            None => self.values.append_null(),
            Some(lists) => {
                lists.offsets.push(self.elements as i32);
                lists.nulls.append_null();
            }
        }
    }

    #[inline(always)]
    fn append(&mut self, data: &[u8], text: &mut String) -> Result<(), ReadError> {
        let result = match self.lists.is_some() {
            false => self.values.append(data, text),
            true => self.append_array(data, text),
        };
        result.map_err(|bad| self.explain(bad))
    }

    /// An array: dimensions, a has-nulls flag, the element OID, (size, lower bound) per
    /// dimension, then every element (length, bytes) in row-major order: flattened.
    fn append_array(&mut self, data: &[u8], text: &mut String) -> Result<(), Bad> {
        let malformed = || Bad::Malformed("array");
        if data.len() < 12 {
            return Err(malformed());
        }
        let ndim = be_i32(data);
        if !(0..=6).contains(&ndim) || data.len() < 12 + 8 * ndim as usize {
            return Err(malformed());
        }
        let mut count: i64 = if ndim == 0 { 0 } else { 1 };
        for d in 0..ndim as usize {
            let size = be_i32(&data[12 + 8 * d..]);
            if size < 0 {
                return Err(malformed());
            }
            count *= size as i64;
        }
        let mut pos = 12 + 8 * ndim as usize;
        for _ in 0..count {
            let len = be_i32(data.get(pos..pos + 4).ok_or_else(malformed)?);
            pos += 4;
            if len < 0 {
                self.values.append_null();
            } else {
                let end = pos + len as usize;
                self.values
                    .append(data.get(pos..end).ok_or_else(malformed)?, text)?;
                pos = end;
            }
        }
        if pos != data.len() {
            return Err(malformed());
        }
        self.elements += count;
        if self.elements > i32::MAX as i64 {
            return Err(Bad::Unrepresentable(
                "more array elements than one batch can hold".into(),
            ));
        }
        let lists = self.lists.as_mut().expect("a list column");
        lists.offsets.push(self.elements as i32);
        lists.nulls.append_non_null();
        Ok(())
    }

    fn explain(&self, bad: Bad) -> ReadError {
        match bad {
            Bad::Malformed(what) => ReadError::source(format!(
                "column \"{}\": malformed {what} value in the COPY stream",
                self.name
            )),
            Bad::Unrepresentable(what) => {
                let arrow = self.scalar.data_type();
                let hint = match self.scalar {
                    Scalar::Decimal { .. } => "filter it out in a query, or cast the column to numeric without a modifier (read as a string)",
                    _ => "filter it out, or cast the column in a query, e.g. to text",
                };
                ReadError::source(format!(
                    "column \"{}\" holds {what}, which the Arrow type {arrow} cannot represent; {hint}",
                    self.name
                ))
            }
        }
    }

    /// This batch's array; the builders start the next one sized as before.
    fn finish(&mut self) -> ArrayRef {
        let values =
            std::mem::replace(&mut self.values, Values::new(self.scalar, self.capacity)).finish();
        match &mut self.lists {
            None => values,
            Some(lists) => {
                let offsets = std::mem::replace(&mut lists.offsets, vec![0]);
                self.elements = 0;
                let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
                Arc::new(ListArray::new(
                    item_field(self.scalar),
                    offsets,
                    values,
                    lists.nulls.finish(),
                ))
            }
        }
    }
}

// -- the stream ------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Header,
    Tuples,
    Done,
}

/// Decodes a binary COPY stream into record batches of at most `batch_size` rows.
pub struct CopyDecoder {
    schema: SchemaRef,
    columns: Vec<ColumnBuilder>,
    batch_size: usize,
    /// A batch is also cut when its tuples reach this many bytes (frames have a size limit).
    batch_bytes: usize,
    stage: Stage,
    /// Bytes of a tuple (or header) cut by a chunk boundary.
    pending: Vec<u8>,
    rows: usize,
    bytes: usize,
    text: String,
    pub total_rows: u64,
}

impl CopyDecoder {
    pub fn new(columns: &[ColumnSpec], batch_size: usize, batch_bytes: usize) -> CopyDecoder {
        CopyDecoder {
            schema: schema(columns),
            // Sized for a full batch, within reason: a huge batch_size grows as it fills.
            columns: columns
                .iter()
                .map(|c| ColumnBuilder::new(c, batch_size.clamp(1, 1 << 20)))
                .collect(),
            batch_size: batch_size.max(1),
            batch_bytes: batch_bytes.max(1),
            stage: Stage::Header,
            pending: Vec::new(),
            rows: 0,
            bytes: 0,
            text: String::new(),
            total_rows: 0,
        }
    }

    /// Decodes one chunk of the stream; `sink` gets each full batch.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        sink: &mut dyn FnMut(RecordBatch) -> Result<(), ReadError>,
    ) -> Result<(), ReadError> {
        if self.pending.is_empty() {
            let used = self.decode(chunk, sink)?;
            self.pending.extend_from_slice(&chunk[used..]);
        } else {
            let mut buffer = std::mem::take(&mut self.pending);
            buffer.extend_from_slice(chunk);
            let used = self.decode(&buffer, sink)?;
            buffer.drain(..used);
            self.pending = buffer;
        }
        Ok(())
    }

    /// The stream has ended: the last (partial) batch, if it has rows.
    pub fn finish(&mut self) -> Result<Option<RecordBatch>, ReadError> {
        if self.stage != Stage::Done || !self.pending.is_empty() {
            return Err(ReadError::source(
                "the COPY stream ended before its trailer",
            ));
        }
        if self.rows == 0 {
            return Ok(None);
        }
        self.take_batch().map(Some)
    }

    /// Decodes the complete tuples at the start of `buf`; returns the bytes used.
    fn decode(
        &mut self,
        buf: &[u8],
        sink: &mut dyn FnMut(RecordBatch) -> Result<(), ReadError>,
    ) -> Result<usize, ReadError> {
        let mut pos = 0;
        if self.stage == Stage::Header {
            match header_len(buf)? {
                Some(len) => {
                    pos = len;
                    self.stage = Stage::Tuples;
                }
                None => return Ok(0),
            }
        }
        while self.stage == Stage::Tuples {
            let rest = &buf[pos..];
            if rest.len() < 2 {
                break;
            }
            let fields = be_i16(rest);
            if fields == -1 {
                self.stage = Stage::Done;
                pos += 2;
                break;
            }
            if fields as usize != self.columns.len() {
                return Err(ReadError::source(format!(
                    "the COPY stream has {fields} fields per row where {} columns were described",
                    self.columns.len()
                )));
            }
            let Some(len) = tuple_len(rest, self.columns.len()) else {
                break;
            };
            self.append_tuple(&rest[2..len])?;
            pos += len;
            self.rows += 1;
            self.bytes += len;
            if self.rows >= self.batch_size || self.bytes >= self.batch_bytes {
                sink(self.take_batch()?)?;
            }
        }
        if self.stage == Stage::Done && pos < buf.len() {
            return Err(ReadError::source("data after the end of the COPY stream"));
        }
        Ok(pos)
    }

    fn append_tuple(&mut self, mut fields: &[u8]) -> Result<(), ReadError> {
        for column in self.columns.iter_mut() {
            let len = be_i32(fields);
            fields = &fields[4..];
            if len < 0 {
                column.append_null();
            } else {
                let (value, rest) = fields.split_at(len as usize);
                column.append(value, &mut self.text)?;
                fields = rest;
            }
        }
        Ok(())
    }

    fn take_batch(&mut self) -> Result<RecordBatch, ReadError> {
        let arrays: Vec<ArrayRef> = self.columns.iter_mut().map(ColumnBuilder::finish).collect();
        self.total_rows += self.rows as u64;
        self.rows = 0;
        self.bytes = 0;
        RecordBatch::try_new(self.schema.clone(), arrays).map_err(ReadError::plugin)
    }
}

/// The header's length, once all of it is in `buf`.
fn header_len(buf: &[u8]) -> Result<Option<usize>, ReadError> {
    if buf.len() < 19 {
        return Ok(None);
    }
    if &buf[..11] != SIGNATURE {
        return Err(ReadError::source(
            "the COPY stream does not start with the binary signature",
        ));
    }
    let extension = be_i32(&buf[15..]);
    if extension < 0 {
        return Err(ReadError::source("malformed COPY header"));
    }
    let len = 19 + extension as usize;
    Ok((buf.len() >= len).then_some(len))
}

/// The length of the tuple at the start of `buf` (field count included), if all of it is there.
fn tuple_len(buf: &[u8], fields: usize) -> Option<usize> {
    let mut pos = 2;
    for _ in 0..fields {
        let len = be_i32(buf.get(pos..pos + 4)?);
        pos += 4;
        if len > 0 {
            pos += len as usize;
        }
    }
    (pos <= buf.len()).then_some(pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{column_type, oid};
    use arrow_array::cast::AsArray;
    use arrow_array::types::{
        Date32Type, Decimal128Type, Int32Type, Int64Type, TimestampMicrosecondType,
    };
    use arrow_array::Array;
    use arrow_schema::DataType;

    /// Builds a binary COPY stream from rows of optional encoded values.
    fn stream(rows: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        for row in rows {
            out.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for value in row {
                match value {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(v) => {
                        out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        out.extend_from_slice(v);
                    }
                }
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn numeric(weight: i16, sign: u16, dscale: i16, digits: &[i16]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
        out.extend_from_slice(&weight.to_be_bytes());
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&dscale.to_be_bytes());
        for d in digits {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out
    }

    fn array(element_oid: i32, dims: &[i32], elements: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(dims.len() as i32).to_be_bytes());
        out.extend_from_slice(&(elements.iter().any(Option::is_none) as i32).to_be_bytes());
        out.extend_from_slice(&element_oid.to_be_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
            out.extend_from_slice(&1i32.to_be_bytes());
        }
        for e in elements {
            match e {
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    out.extend_from_slice(v);
                }
            }
        }
        out
    }

    fn spec(name: &str, type_oid: u32, typmod: i32) -> ColumnSpec {
        ColumnSpec {
            name: name.into(),
            kind: column_type(type_oid, typmod).unwrap(),
            type_oid,
            typmod,
        }
    }

    fn decode_all(
        columns: &[ColumnSpec],
        data: &[u8],
        batch: usize,
        chunk: usize,
    ) -> Result<Vec<RecordBatch>, ReadError> {
        let mut decoder = CopyDecoder::new(columns, batch, usize::MAX);
        let mut out = Vec::new();
        for piece in data.chunks(chunk) {
            decoder.feed(piece, &mut |b| {
                out.push(b);
                Ok(())
            })?;
        }
        out.extend(decoder.finish()?);
        Ok(out)
    }

    fn numeric_text(data: &[u8]) -> String {
        let mut s = String::new();
        Numeric::parse(data).unwrap().to_text(&mut s);
        s
    }

    #[test]
    fn numeric_text_form() {
        assert_eq!(
            numeric_text(&numeric(0, NUMERIC_POS, 2, &[1234])),
            "1234.00"
        );
        // 12345.678 = [1, 2345, 6780], weight 1
        assert_eq!(
            numeric_text(&numeric(1, NUMERIC_NEG, 3, &[1, 2345, 6780])),
            "-12345.678"
        );
        // 0.0001 = [1], weight -1
        assert_eq!(numeric_text(&numeric(-1, NUMERIC_POS, 4, &[1])), "0.0001");
        assert_eq!(numeric_text(&numeric(0, NUMERIC_POS, 0, &[])), "0");
        assert_eq!(numeric_text(&numeric(0, NUMERIC_POS, 3, &[])), "0.000");
        // 1e20 = [1, 0, 0, 0, 0, 0] trimmed to [1], weight 5
        assert_eq!(
            numeric_text(&numeric(5, NUMERIC_POS, 0, &[1])),
            "100000000000000000000"
        );
        assert_eq!(numeric_text(&numeric(0, NUMERIC_NAN, 0, &[])), "NaN");
        assert_eq!(numeric_text(&numeric(0, NUMERIC_PINF, 0, &[])), "Infinity");
        assert_eq!(numeric_text(&numeric(0, NUMERIC_NINF, 0, &[])), "-Infinity");
        // 0.000012 (dscale 6): [12] at weight -2
        assert_eq!(
            numeric_text(&numeric(-2, NUMERIC_POS, 6, &[1200])),
            "0.000012"
        );
    }

    #[test]
    fn numeric_to_decimal() {
        let v = |data: Vec<u8>, scale| Numeric::parse(&data).unwrap().to_i128(scale);
        assert_eq!(
            v(numeric(1, NUMERIC_NEG, 3, &[1, 2345, 6780]), 3),
            Ok(-12_345_678)
        );
        assert_eq!(
            v(numeric(1, NUMERIC_POS, 3, &[1, 2345, 6780]), 4),
            Ok(123_456_780)
        );
        assert_eq!(v(numeric(-1, NUMERIC_POS, 4, &[1]), 4), Ok(1));
        assert_eq!(v(numeric(0, NUMERIC_POS, 0, &[]), 2), Ok(0));
        // 38 nines, scale 0: the largest decimal128(38,0)
        let digits = [99, 9999, 9999, 9999, 9999, 9999, 9999, 9999, 9999, 9999];
        assert_eq!(
            v(numeric(9, NUMERIC_POS, 0, &digits), 0),
            Ok(10i128.pow(38) - 1)
        );
        assert!(matches!(
            v(numeric(0, NUMERIC_NAN, 0, &[]), 2),
            Err(Bad::Unrepresentable(_))
        ));
        assert!(matches!(
            v(numeric(20, NUMERIC_POS, 0, &[1]), 0),
            Err(Bad::Unrepresentable(_))
        ));
    }

    #[test]
    fn scalars_and_nulls_across_chunk_boundaries() {
        let columns = [
            spec("b", oid::BOOL, -1),
            spec("i", oid::INT4, -1),
            spec("l", oid::INT8, -1),
            spec("f", oid::FLOAT8, -1),
            spec("t", oid::TEXT, -1),
            spec("d", oid::DATE, -1),
            spec("ts", oid::TIMESTAMPTZ, -1),
            spec("n", oid::NUMERIC, ((10 << 16) | 2) + 4),
            spec("j", oid::JSONB, -1),
            spec("x", oid::BYTEA, -1),
        ];
        let row = |i: i32| -> Vec<Option<Vec<u8>>> {
            vec![
                Some(vec![(i % 2) as u8]),
                Some(i.to_be_bytes().to_vec()),
                Some((i as i64 * 1_000_000_000_000).to_be_bytes().to_vec()),
                Some((i as f64 / 2.0).to_bits().to_be_bytes().to_vec()),
                Some(format!("row {i} é").into_bytes()),
                Some((i - 10_957).to_be_bytes().to_vec()), // days since 2000 → since 1970 = i
                Some(0i64.to_be_bytes().to_vec()),
                Some(numeric(0, NUMERIC_POS, 2, &[i as i16, 5000])), // i.50
                Some([&[1u8][..], b"{\"a\": 1}"].concat()),
                Some(vec![0, 255, i as u8]),
            ]
        };
        let mut rows: Vec<_> = (0..5).map(row).collect();
        rows.push(vec![None; 10]);
        let data = stream(&rows);
        for chunk in [1, 3, 7, 64, data.len()] {
            let batches = decode_all(&columns, &data, 4, chunk).unwrap();
            assert_eq!(
                batches.iter().map(|b| b.num_rows()).collect::<Vec<_>>(),
                vec![4, 2]
            );
            let b = &batches[0];
            assert_eq!(
                b.column(1).as_primitive::<Int32Type>().values(),
                &[0, 1, 2, 3]
            );
            assert_eq!(
                b.column(2).as_primitive::<Int64Type>().value(3),
                3_000_000_000_000
            );
            assert_eq!(b.column(4).as_string::<i32>().value(2), "row 2 é");
            assert_eq!(b.column(5).as_primitive::<Date32Type>().value(3), 3);
            assert_eq!(
                b.column(6)
                    .as_primitive::<TimestampMicrosecondType>()
                    .value(0),
                946_684_800_000_000
            );
            assert_eq!(
                b.column(6).data_type(),
                &DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, Some("UTC".into()))
            );
            let n = b.column(7).as_primitive::<Decimal128Type>();
            assert_eq!(n.value(3), 350);
            assert_eq!(n.data_type(), &DataType::Decimal128(10, 2));
            assert_eq!(b.column(8).as_string::<i32>().value(0), "{\"a\": 1}");
            assert_eq!(b.column(9).as_binary::<i32>().value(1), &[0, 255, 1]);
            let last = &batches[1];
            for c in last.columns() {
                assert!(c.is_null(1));
                assert_eq!(c.null_count(), 1);
            }
        }
    }

    #[test]
    fn arrays_are_lists_and_multi_dimensional_ones_flattened() {
        let columns = [spec("a", 1007, -1), spec("u", 2951, -1)];
        let int = |v: i32| Some(v.to_be_bytes().to_vec());
        let rows = vec![
            vec![
                Some(array(23, &[3], &[int(1), None, int(3)])),
                Some(array(25, &[1], &[Some(b"x".to_vec())])),
            ],
            vec![
                Some(array(23, &[2, 2], &[int(1), int(2), int(3), int(4)])),
                None,
            ],
            vec![None, Some(array(25, &[], &[]))],
        ];
        let batches = decode_all(&columns, &stream(&rows), 100, 5).unwrap();
        let lists = batches[0].column(0).as_list::<i32>();
        assert_eq!(lists.len(), 3);
        assert_eq!(lists.value_offsets(), &[0, 3, 7, 7]);
        assert!(lists.is_null(2) && !lists.is_null(1));
        let values = lists.values().as_primitive::<Int32Type>();
        assert!(values.is_null(1));
        assert_eq!(values.value(6), 4);
        let texts = batches[0].column(1).as_list::<i32>();
        assert!(texts.is_null(1));
        assert_eq!(texts.value(2).len(), 0);
        assert_eq!(texts.values().as_string::<i32>().value(0), "x");
        match batches[0].schema().field(0).data_type() {
            DataType::List(item) => {
                assert_eq!(item.name(), "item");
                assert!(item.is_nullable());
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn unrepresentable_values_name_the_column() {
        let columns = [spec("d", oid::DATE, -1)];
        let data = stream(&[vec![Some(i32::MAX.to_be_bytes().to_vec())]]);
        let e = decode_all(&columns, &data, 10, 100).unwrap_err();
        assert!(
            e.message.starts_with("column \"d\" holds infinity"),
            "{}",
            e.message
        );
        let columns = [spec("ts", oid::TIMESTAMP, -1)];
        let data = stream(&[vec![Some(i64::MIN.to_be_bytes().to_vec())]]);
        let e = decode_all(&columns, &data, 10, 100).unwrap_err();
        assert!(
            e.message.starts_with("column \"ts\" holds -infinity"),
            "{}",
            e.message
        );
        let columns = [spec("amount", oid::NUMERIC, ((12 << 16) | 2) + 4)];
        let data = stream(&[vec![Some(numeric(0, NUMERIC_NAN, 0, &[]))]]);
        let e = decode_all(&columns, &data, 10, 100).unwrap_err();
        assert!(
            e.message.starts_with("column \"amount\" holds NaN"),
            "{}",
            e.message
        );
        assert_eq!(e.category, crate::error::Category::Source);
    }

    #[test]
    fn truncated_and_malformed_streams_fail() {
        let columns = [spec("i", oid::INT4, -1)];
        let data = stream(&[vec![Some(1i32.to_be_bytes().to_vec())]]);
        let mut decoder = CopyDecoder::new(&columns, 10, usize::MAX);
        decoder
            .feed(&data[..data.len() - 3], &mut |_| Ok(()))
            .unwrap();
        assert!(decoder.finish().is_err());
        let bad = stream(&[vec![Some(vec![1, 2])]]);
        assert!(decode_all(&columns, &bad, 10, 100)
            .unwrap_err()
            .message
            .contains("malformed integer"));
    }

    #[test]
    fn empty_stream_has_no_batch() {
        let columns = [spec("i", oid::INT4, -1)];
        assert!(decode_all(&columns, &stream(&[]), 10, 100)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn batches_are_cut_by_bytes_too() {
        let columns = [spec("t", oid::TEXT, -1)];
        let rows: Vec<_> = (0..10).map(|_| vec![Some(vec![b'x'; 100])]).collect();
        let mut decoder = CopyDecoder::new(&columns, 1000, 250);
        let mut sizes = Vec::new();
        decoder
            .feed(&stream(&rows), &mut |b| {
                sizes.push(b.num_rows());
                Ok(())
            })
            .unwrap();
        sizes.extend(decoder.finish().unwrap().map(|b| b.num_rows()));
        assert_eq!(sizes, vec![3, 3, 3, 1]);
    }
}
