//! Reading a CA's JSON objects through [`serde_json::Value`], which the binary has anyway: one
//! parser for every object instead of a derived `Deserialize` per type (on mipsel the derives
//! cost about as much as the rest of the ACME client's parsing).

use serde_json::Value;

use super::{err, AcmeError};

/// An object a CA sends.
pub trait FromJson: Sized {
    /// Reads it from a parsed reply; `Err` names the field that is missing or of the wrong type.
    fn from_json(v: &Value) -> Result<Self, String>;
}

/// Parses a CA's JSON reply.
pub fn parse<T: FromJson>(what: &str, body: &[u8]) -> Result<T, AcmeError> {
    serde_json::from_slice::<Value>(body)
        .map_err(|e| e.to_string())
        .and_then(|v| T::from_json(&v))
        .map_err(|e| err(format!("malformed {what} from the CA: {e}")))
}

/// A string field that must be there.
pub(super) fn string(v: &Value, key: &str) -> Result<String, String> {
    opt_string(v, key)?.ok_or_else(|| format!("missing field `{key}`"))
}

/// A string field that may be absent (or null).
pub(super) fn opt_string(v: &Value, key: &str) -> Result<Option<String>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("`{key}` is not a string")),
    }
}

/// A list field (absent: empty), each element read by `f`.
pub(super) fn list<T>(
    v: &Value,
    key: &str,
    f: impl Fn(&Value) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let items = opt(v, key, |x| match x {
        Value::Array(items) => items.iter().map(&f).collect(),
        _ => Err(format!("`{key}` is not a list")),
    })?;
    Ok(items.unwrap_or_default())
}

/// An object field that may be absent (or null), read by `f`.
pub(super) fn opt<T>(
    v: &Value,
    key: &str,
    f: impl Fn(&Value) -> Result<T, String>,
) -> Result<Option<T>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => f(x).map(Some),
    }
}

/// A string element of a list.
pub(super) fn as_string(v: &Value) -> Result<String, String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| "a list element is not a string".into())
}
