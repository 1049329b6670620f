//! Chat templates: the Jinja templates models ship (tokenizer_config.json, GGUF
//! `tokenizer.chat_template`) rendered with minijinja plus the Python-compatibility helpers real
//! templates use, and built-in templates for families whose files lack one.

use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use crate::{Error, Result};

/// A chat message as OpenAI clients send it (content a string or a list of parts; assistant
/// `tool_calls`; tool results with `tool_call_id`). Passed to templates as-is.
pub type Message = serde_json::Value;

/// Built-in templates, by model family.
pub fn builtin(family: &str) -> Option<&'static str> {
    match family {
        "llama4" => Some(include_str!("templates/llama4.jinja")),
        "gemma3" => Some(include_str!("templates/gemma3.jinja")),
        _ => None,
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
}

/// Where a model's template came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateSource {
    /// Shipped with the model (tokenizer_config.json or GGUF `tokenizer.chat_template`).
    Model,
    /// herd's built-in template for the model's family (the file has none).
    Builtin,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

/// What a template sees besides the messages.
#[derive(Debug, Default, Serialize)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    pub bos_token: String,
    pub eos_token: String,
    /// Tool definitions (OpenAI `tools`), if any.
    pub tools: Option<Vec<serde_json::Value>>,
}

impl RenderOptions {
    /// Options for a prompt that ends where the assistant's answer begins, with the tokenizer's
    /// BOS and EOS texts.
    pub fn generation(tok: &crate::Tokenizer) -> Self {
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
        Self {
            add_generation_prompt: true,
            bos_token: text(tok.bos),
            eos_token: text(tok.eos),
            tools: None,
        }
    }
}

impl ChatTemplate {
    /// Compile a template; syntax errors are reported here, not at first use.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<JValue, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_now(&fmt)
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Template(describe(&e)))?;
        Ok(Self { env })
    }

    /// The model's own template, or else the built-in one of its `family` (`llama4`, `gemma3`);
    /// never a foreign format: a family without a built-in template is an error.
    pub fn for_model(shipped: Option<&str>, family: &str) -> Result<(Self, TemplateSource)> {
        match (shipped, builtin(family)) {
            (Some(t), _) => Ok((Self::new(t)?, TemplateSource::Model)),
            (None, Some(t)) => Ok((Self::new(t)?, TemplateSource::Builtin)),
            (None, None) => Err(Error::Template(format!(
                "the model has no chat template and herd has no built-in one for the {family:?} family"
            ))),
        }
    }

    /// Render `messages`; an exception raised by the template is an error carrying its message.
    pub fn render(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(describe(&e)))?;
        let mut ctx = serde_json::to_value(opts).map_err(|e| Error::Template(e.to_string()))?;
        ctx["messages"] = serde_json::Value::Array(messages.to_vec());
        if opts.tools.is_none() {
            ctx.as_object_mut().expect("object").remove("tools");
        }
        tmpl.render(JValue::from_serialize(&ctx))
            .map_err(|e| Error::Template(describe(&e)))
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

fn strftime_now(fmt: &str) -> String {
    // Templates ask for dates like "%d %b %Y"; compute today's in UTC without a date crate.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86400) as i64;
    let (y, m, d) = civil_from_days(days);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const LONG: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    fmt.replace("%d", &format!("{d:02}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%Y", &y.to_string())
        .replace("%b", MONTHS[(m - 1) as usize])
        .replace("%B", LONG[(m - 1) as usize])
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `tojson` as transformers defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=indent)` — `", "` and `": "` separators, non-ASCII kept, keys in insertion order.
fn tojson(v: JValue, kwargs: Kwargs) -> std::result::Result<JValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&v, indent, 0, &mut out)?;
    Ok(JValue::from_safe_string(out))
}

fn write_json(
    v: &JValue,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f: f64 = v.clone().try_into()?;
                // Python prints floats with a fractional part or exponent, never bare "1".
                let s = if f.fract() == 0.0 && f.abs() < 1e16 {
                    format!("{f:.1}")
                } else {
                    format!("{f}")
                };
                out.push_str(&s);
            }
        }
        ValueKind::String => write_string(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<JValue> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(it, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<JValue> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_string(&k.to_string(), out);
                out.push_str(": ");
                write_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => write_string(&v.to_string(), out),
    }
    Ok(())
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_style_tojson() {
        let opts = RenderOptions::default();
        let compact =
            ChatTemplate::new("{{ {'b': 1, 'a': [1.5, 'é\"'], 'c': none} | tojson }}").unwrap();
        assert_eq!(
            compact.render(&[], &opts).unwrap(),
            r#"{"b": 1, "a": [1.5, "é\""], "c": null}"#
        );
        let pretty = ChatTemplate::new("{{ {'a': [1, 2]} | tojson(indent=2) }}").unwrap();
        assert_eq!(
            pretty.render(&[], &opts).unwrap(),
            "{\n  \"a\": [\n    1,\n    2\n  ]\n}"
        );
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        let err = t
            .render(
                &[json!({"role": "user", "content": "hi"})],
                &RenderOptions::default(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
        assert!(ChatTemplate::new("{% if %}").is_err());
    }

    #[test]
    fn model_template_first_then_family_builtin() {
        let (_, src) = ChatTemplate::for_model(Some("{{ bos_token }}"), "gemma3").unwrap();
        assert_eq!(src, TemplateSource::Model);
        let (t, src) = ChatTemplate::for_model(None, "gemma3").unwrap();
        assert_eq!(src, TemplateSource::Builtin);
        let out = t
            .render(
                &[json!({"role": "user", "content": "Hi"})],
                &RenderOptions {
                    add_generation_prompt: true,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            out,
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
        assert!(
            ChatTemplate::for_model(None, "falcon")
                .unwrap_err()
                .to_string()
                .contains("no built-in")
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_419), (2025, 11, 27));
    }
}
