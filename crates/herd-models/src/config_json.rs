//! Typed reads from a `config.json` object, with Hugging Face's defaults for absent keys and
//! errors that name the key.

use serde_json::{Map, Value};

use crate::{Error, Result};

pub type Object = Map<String, Value>;

/// The `model_type` of a config: the one key every architecture needs.
pub fn model_type(config: &Value) -> Result<String> {
    match config.get("model_type") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(Error::Config(format!(
            "model_type must be a string, got {other}"
        ))),
        None => Err(Error::Config("required key model_type is missing".into())),
    }
}

pub fn as_object<'a>(value: &'a Value, what: &str) -> Result<&'a Object> {
    value
        .as_object()
        .ok_or_else(|| Error::Config(format!("{what} must be a JSON object")))
}

fn wrong(key: &str, want: &str, got: &Value) -> Error {
    Error::Config(format!("key {key} must be {want}, got {got}"))
}

/// A present, non-null value.
fn present<'a>(obj: &'a Object, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

pub fn usize_or(obj: &Object, key: &str, default: usize) -> Result<usize> {
    match present(obj, key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| wrong(key, "a non-negative integer", v)),
    }
}

pub fn opt_usize(obj: &Object, key: &str) -> Result<Option<usize>> {
    present(obj, key).map(|_| usize_or(obj, key, 0)).transpose()
}

pub fn f64_or(obj: &Object, key: &str, default: f64) -> Result<f64> {
    match present(obj, key) {
        None => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| wrong(key, "a number", v)),
    }
}

/// A flag that older configs wrote as an integer (e.g. Scout's `"attn_temperature_tuning": 4`):
/// any non-zero number counts as true.
pub fn flag_or(obj: &Object, key: &str, default: bool) -> Result<bool> {
    match present(obj, key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => v
            .as_f64()
            .map(|n| n != 0.0)
            .ok_or_else(|| wrong(key, "a boolean", v)),
    }
}

pub fn opt_usize_list(obj: &Object, key: &str) -> Result<Option<Vec<usize>>> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| wrong(key, "a list of non-negative integers", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(v) => Err(wrong(key, "a list", v)),
    }
}

pub fn opt_string_list(obj: &Object, key: &str) -> Result<Option<Vec<String>>> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| wrong(key, "a list of strings", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(v) => Err(wrong(key, "a list", v)),
    }
}

/// Token ids that may be written as one integer or a list (`eos_token_id`).
pub fn token_ids(obj: &Object, key: &str) -> Result<Vec<u32>> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| wrong(key, "a token id", v))
    };
    match present(obj, key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}
