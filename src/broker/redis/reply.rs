//! Decoding raw replies, one entry at a time: a malformed entry must not
//! fail the batch it arrived in (P17), so nothing here goes through
//! redis-rs's typed stream replies.

use redis::Value;

use crate::error::{Error, Result};
use crate::wire::RawEntry;

/// One field of one group in an `XINFO GROUPS` reply (a list of flat
/// name/value arrays in RESP2, of maps in RESP3).
pub(super) fn group_field(groups: &Value, group: &str, field: &str) -> Option<Value> {
    let Value::Array(groups) = groups else {
        return None;
    };
    groups.iter().find_map(|g| {
        let pairs: Vec<(&Value, &Value)> = match g {
            Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|kv| Some((kv.first()?, kv.get(1)?)))
                .collect(),
            Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
            _ => return None,
        };
        let (_, name) = pairs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some("name"))?;
        if text(name).as_deref() != Some(group) {
            return None;
        }
        pairs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(field))
            .map(|(_, v)| (*v).clone())
    })
}

pub(super) fn major_version(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

pub(super) fn unexpected(command: &'static str, detail: &str) -> Error {
    Error::UnexpectedReply {
        command,
        detail: detail.to_owned(),
    }
}

/// A bulk or simple string as UTF-8 text.
pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

pub(super) fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// Raw bytes of a bulk string, taken out of the value.
pub(super) fn take_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// Field names and values of one entry.
pub(super) type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// An entry's field list: a flat array of name, value, … (RESP2) or a map
/// (RESP3); nil when the payload was deleted.
pub(super) fn parse_fields(v: Value) -> Result<Option<Fields>> {
    match v {
        Value::Nil => Ok(None),
        Value::Array(flat) => {
            if flat.len() % 2 != 0 {
                return Err(unexpected("XREADGROUP", "odd number of field items"));
            }
            let mut fields = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                match (take_bytes(k), take_bytes(v)) {
                    (Some(k), Some(v)) => fields.push((k, v)),
                    _ => return Err(unexpected("XREADGROUP", "field is not a string")),
                }
            }
            Ok(Some(fields))
        }
        Value::Map(pairs) => {
            let mut fields = Vec::with_capacity(pairs.len());
            for (k, v) in pairs {
                match (take_bytes(k), take_bytes(v)) {
                    (Some(k), Some(v)) => fields.push((k, v)),
                    _ => return Err(unexpected("XREADGROUP", "field is not a string")),
                }
            }
            Ok(Some(fields))
        }
        _ => Err(unexpected("XREADGROUP", "fields are neither array nor nil")),
    }
}

/// One `[id, fields]` pair.
pub(super) fn parse_entry(v: Value) -> Result<RawEntry> {
    let Value::Array(mut pair) = v else {
        return Err(unexpected("XREADGROUP", "entry is not an array"));
    };
    if pair.is_empty() {
        return Err(unexpected("XREADGROUP", "empty entry"));
    }
    let fields = match pair.len() {
        1 => None,
        _ => parse_fields(std::mem::take(&mut pair[1]))?,
    };
    let id = text(&pair[0]).ok_or_else(|| unexpected("XREADGROUP", "entry id is not a string"))?;
    Ok(RawEntry { id, fields })
}

pub(super) fn parse_entries(v: Value) -> Result<Vec<RawEntry>> {
    match v {
        Value::Array(items) => items.into_iter().map(parse_entry).collect(),
        Value::Nil => Ok(Vec::new()),
        _ => Err(unexpected("XREADGROUP", "entries are not an array")),
    }
}

/// `XREADGROUP` for one stream: nil on timeout, else `[[stream, entries]]`
/// (RESP2) or `{stream: entries}` (RESP3).
pub(super) fn parse_read_reply(v: Value) -> Result<Vec<RawEntry>> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => {
            let mut out = Vec::new();
            for s in streams {
                let Value::Array(mut pair) = s else {
                    return Err(unexpected("XREADGROUP", "stream reply is not an array"));
                };
                if pair.len() != 2 {
                    return Err(unexpected("XREADGROUP", "stream reply is not a pair"));
                }
                out.extend(parse_entries(pair.pop().unwrap_or(Value::Nil))?);
            }
            Ok(out)
        }
        Value::Map(streams) => {
            let mut out = Vec::new();
            for (_, entries) in streams {
                out.extend(parse_entries(entries)?);
            }
            Ok(out)
        }
        _ => Err(unexpected(
            "XREADGROUP",
            "reply is neither array, map nor nil",
        )),
    }
}

/// `XREADGROUP` for many streams: nil on timeout, else the entries of
/// each stream that had some, by stream name.
pub(super) fn parse_multi_read_reply(v: Value) -> Result<Vec<(String, Vec<RawEntry>)>> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => {
            let mut pairs = Vec::with_capacity(streams.len());
            for s in streams {
                let Value::Array(pair) = s else {
                    return Err(unexpected("XREADGROUP", "stream reply is not an array"));
                };
                let Ok::<[Value; 2], _>([name, entries]) = pair.try_into() else {
                    return Err(unexpected("XREADGROUP", "stream reply is not a pair"));
                };
                pairs.push((name, entries));
            }
            pairs
        }
        Value::Map(streams) => streams,
        _ => {
            return Err(unexpected(
                "XREADGROUP",
                "reply is neither array, map nor nil",
            ));
        }
    };
    pairs
        .into_iter()
        .map(|(name, entries)| {
            let name =
                text(&name).ok_or_else(|| unexpected("XREADGROUP", "stream name is not text"))?;
            Ok((name, parse_entries(entries)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::client_name;
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn read_reply_keeps_bad_entries_apart() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"orders"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk(b"1-0"),
                    Value::Array(vec![bulk(b"\xff"), bulk(b"x")]),
                ]),
                Value::Array(vec![bulk(b"2-0"), Value::Nil]),
                Value::Array(vec![
                    bulk(b"3-0"),
                    Value::Array(vec![bulk(b"a"), bulk(b"1"), bulk(b"a"), bulk(b"2")]),
                ]),
            ]),
        ])]);
        let entries = parse_read_reply(reply).expect("parses");
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[0].fields,
            Some(vec![(b"\xff".to_vec(), b"x".to_vec())])
        );
        assert_eq!(entries[1].fields, None);
        assert_eq!(entries[2].fields.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn timeout_is_empty() {
        assert_eq!(parse_read_reply(Value::Nil).expect("nil"), vec![]);
    }

    #[test]
    fn client_names_have_no_spaces() {
        assert_eq!(
            client_name(&["redstream", "my group", "m-0"]),
            "redstream:my_group:m-0"
        );
    }
}
