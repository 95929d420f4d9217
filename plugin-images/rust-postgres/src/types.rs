//! PostgreSQL types and the Arrow types they are read as (docs/postgres.md, "Types").
//!
//! A column is known by the type OID and type modifier of the result column, as the server
//! describes the source. Anything not listed is refused before a row is read.

use std::sync::Arc;

use arrow_schema::{DataType, Field, TimeUnit};

/// Type OIDs (`pg_type.oid`), fixed since PostgreSQL 8.x.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// How one value is decoded from the binary COPY stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scalar {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    /// `numeric(p,s)` with p <= 38 and 0 <= s <= p.
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// `numeric` without a usable modifier: PostgreSQL's exact text form.
    NumericText,
    /// text, varchar, char, name, json; uuid (cast to text by the COPY's select list).
    Text,
    /// jsonb: a version byte (1), then the text form.
    Jsonb,
    Bytea,
    Date,
    Time,
    Timestamp,
    TimestampTz,
}

/// A column's decoding: a scalar, or a (flattened) array of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnType {
    pub scalar: Scalar,
    pub list: bool,
    /// Selected as `::text` (`::text[]`): uuid columns.
    pub as_text: bool,
}

const DECIMAL128_MAX_PRECISION: i32 = 38;

/// The element type of the array types read, by the array type's OID.
fn array_element(array_oid: u32) -> Option<u32> {
    Some(match array_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1003 => oid::NAME,
        1016 => oid::INT8,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1009 => oid::TEXT,
        199 => oid::JSON,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1014 => oid::BPCHAR,
        1015 => oid::VARCHAR,
        1182 => oid::DATE,
        1183 => oid::TIME,
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        1231 => oid::NUMERIC,
        2951 => oid::UUID,
        3807 => oid::JSONB,
        _ => return None,
    })
}

/// `numeric(p,s)` from a type modifier: `((p << 16) | (s & 0x7ff)) + 4`, s signed on 11 bits
/// (PostgreSQL 15 allows negative scales and scales above the precision).
pub fn numeric_precision_scale(typmod: i32) -> Option<(i32, i32)> {
    if typmod < 4 {
        return None;
    }
    let t = typmod - 4;
    let precision = (t >> 16) & 0xffff;
    let scale = ((t & 0x7ff) ^ 1024) - 1024;
    Some((precision, scale))
}

fn numeric_scalar(typmod: i32) -> Scalar {
    match numeric_precision_scale(typmod) {
        Some((p, s)) if p <= DECIMAL128_MAX_PRECISION && (0..=p).contains(&s) && p >= 1 => {
            Scalar::Decimal {
                precision: p as u8,
                scale: s as i8,
            }
        }
        _ => Scalar::NumericText,
    }
}

fn scalar(type_oid: u32, typmod: i32) -> Option<(Scalar, bool)> {
    Some(match type_oid {
        oid::BOOL => (Scalar::Bool, false),
        oid::INT2 => (Scalar::Int16, false),
        oid::INT4 => (Scalar::Int32, false),
        oid::INT8 => (Scalar::Int64, false),
        oid::FLOAT4 => (Scalar::Float32, false),
        oid::FLOAT8 => (Scalar::Float64, false),
        oid::NUMERIC => (numeric_scalar(typmod), false),
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::JSON => (Scalar::Text, false),
        oid::JSONB => (Scalar::Jsonb, false),
        oid::UUID => (Scalar::Text, true),
        oid::BYTEA => (Scalar::Bytea, false),
        oid::DATE => (Scalar::Date, false),
        oid::TIME => (Scalar::Time, false),
        oid::TIMESTAMP => (Scalar::Timestamp, false),
        oid::TIMESTAMPTZ => (Scalar::TimestampTz, false),
        _ => return None,
    })
}

/// How a result column of type `type_oid` with modifier `typmod` is read; `None`: refused.
/// (An array column's modifier is its element's: `numeric(12,2)[]` reports `(12,2)`.)
pub fn column_type(type_oid: u32, typmod: i32) -> Option<ColumnType> {
    if let Some((scalar, as_text)) = scalar(type_oid, typmod) {
        return Some(ColumnType {
            scalar,
            list: false,
            as_text,
        });
    }
    let element = array_element(type_oid)?;
    let (scalar, as_text) = scalar(element, typmod)?;
    Some(ColumnType {
        scalar,
        list: true,
        as_text,
    })
}

impl Scalar {
    pub fn data_type(self) -> DataType {
        match self {
            Scalar::Bool => DataType::Boolean,
            Scalar::Int16 => DataType::Int16,
            Scalar::Int32 => DataType::Int32,
            Scalar::Int64 => DataType::Int64,
            Scalar::Float32 => DataType::Float32,
            Scalar::Float64 => DataType::Float64,
            Scalar::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
            Scalar::NumericText | Scalar::Text | Scalar::Jsonb => DataType::Utf8,
            Scalar::Bytea => DataType::Binary,
            Scalar::Date => DataType::Date32,
            Scalar::Time => DataType::Time64(TimeUnit::Microsecond),
            Scalar::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Scalar::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        }
    }
}

/// The list item field: named `item`, nullable, no metadata.
pub fn item_field(scalar: Scalar) -> Arc<Field> {
    Arc::new(Field::new("item", scalar.data_type(), true))
}

impl ColumnType {
    pub fn data_type(self) -> DataType {
        if self.list {
            DataType::List(item_field(self.scalar))
        } else {
            self.scalar.data_type()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typmod(p: i32, s: i32) -> i32 {
        ((p << 16) | (s & 0x7ff)) + 4
    }

    #[test]
    fn numeric_modifiers() {
        assert_eq!(numeric_precision_scale(typmod(12, 2)), Some((12, 2)));
        assert_eq!(numeric_precision_scale(typmod(5, -2)), Some((5, -2)));
        assert_eq!(numeric_precision_scale(-1), None);
        let t = |p, s| column_type(oid::NUMERIC, typmod(p, s)).unwrap().scalar;
        assert_eq!(
            t(12, 2),
            Scalar::Decimal {
                precision: 12,
                scale: 2
            }
        );
        assert_eq!(
            t(38, 38),
            Scalar::Decimal {
                precision: 38,
                scale: 38
            }
        );
        assert_eq!(t(39, 2), Scalar::NumericText);
        assert_eq!(t(5, -2), Scalar::NumericText);
        assert_eq!(t(3, 5), Scalar::NumericText);
        assert_eq!(
            column_type(oid::NUMERIC, -1).unwrap().scalar,
            Scalar::NumericText
        );
    }

    #[test]
    fn arrow_types() {
        let dt = |o, m| column_type(o, m).unwrap().data_type();
        assert_eq!(dt(oid::BOOL, -1), DataType::Boolean);
        assert_eq!(dt(oid::INT2, -1), DataType::Int16);
        assert_eq!(dt(oid::BPCHAR, 14), DataType::Utf8);
        assert_eq!(dt(oid::UUID, -1), DataType::Utf8);
        assert_eq!(dt(oid::BYTEA, -1), DataType::Binary);
        assert_eq!(dt(oid::TIME, -1), DataType::Time64(TimeUnit::Microsecond));
        assert_eq!(
            dt(oid::TIMESTAMPTZ, -1),
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(
            dt(1007, -1),
            DataType::List(Arc::new(Field::new("item", DataType::Int32, true)))
        );
        assert_eq!(
            dt(1231, typmod(10, 3)),
            DataType::List(Arc::new(Field::new(
                "item",
                DataType::Decimal128(10, 3),
                true
            )))
        );
        let uuids = column_type(2951, -1).unwrap();
        assert!(uuids.list && uuids.as_text);
    }

    #[test]
    fn refused_types() {
        for o in [
            1186, /* interval */
            1266, /* timetz */
            869,  /* inet */
            790,  /* money */
            3904, /* int4range */
            1187, /* interval[] */
            600,  /* point */
        ] {
            assert_eq!(column_type(o, -1), None, "oid {o}");
        }
    }
}
