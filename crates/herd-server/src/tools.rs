//! Tool calling: OpenAI `tools` / `tool_choice` / `parallel_tool_calls` mapped onto the call
//! format of the model's family, and the model's calls parsed back into `tool_calls`.
//!
//! Both families herd serves write a call as JSON, `{"name": …, "parameters": {…}}` (Llama 4's
//! template asks for exactly that; Gemma 3's official template has no tool support, so herd
//! describes the tools in the first turn in the same words and feeds tool results back as user
//! turns). Several parallel calls are a JSON array of such objects. With `tool_choice`
//! `required` or a named function, the call is generated under a JSON schema built from the
//! functions' parameter schemas, so the arguments always parse and validate; with `auto` the
//! model writes freely and output that parses as calls to the given tools becomes `tool_calls`.

use serde_json::{Value, json};

use crate::openai::{ApiError, ApiResult};
use crate::request;

#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

#[derive(Clone, Debug)]
pub struct Tools {
    /// The `function` objects as the client sent them (what templates render).
    pub functions: Vec<Value>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

/// A parsed call: function name and its arguments as a JSON string (OpenAI's shape).
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: String,
}

const CALL_FORMAT: &str = "Respond in the format {\"name\": function name, \"parameters\": \
    dictionary of argument name and its value}. Do not use variables.";

/// Read `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tools are given.
pub fn parse(
    tools: Option<Vec<request::Tool>>,
    tool_choice: Option<request::ToolChoice>,
    parallel_tool_calls: Option<bool>,
) -> ApiResult<Option<Tools>> {
    let bad = |m: String, p: &str| Err(ApiError::bad_request(m).param(p));
    let functions: Vec<Value> = tools
        .unwrap_or_default()
        .into_iter()
        .map(|request::Tool::Function { function }| {
            serde_json::to_value(function).unwrap_or_default()
        })
        .collect();
    let choice = match tool_choice {
        None if functions.is_empty() => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(request::ToolChoice::Mode(m)) => match m {
            request::ToolMode::None => ToolChoice::None,
            request::ToolMode::Auto => ToolChoice::Auto,
            request::ToolMode::Required => ToolChoice::Required,
        },
        Some(request::ToolChoice::Named(request::NamedTool::Function { function })) => {
            ToolChoice::Named(function.name)
        }
    };
    let parallel = parallel_tool_calls.unwrap_or(true);
    if functions.is_empty() {
        if matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
            return bad("tool_choice needs 'tools'".into(), "tool_choice");
        }
        return Ok(None);
    }
    if let ToolChoice::Named(n) = &choice
        && !functions.iter().any(|f| f["name"] == n.as_str())
    {
        return bad(
            format!("tool_choice names '{n}', which is not in 'tools'"),
            "tool_choice",
        );
    }
    Ok(Some(Tools {
        functions,
        choice,
        parallel,
    }))
}

impl Tools {
    fn call_schema(f: &Value) -> Value {
        let params = f
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object"}));
        json!({"type": "object", "properties": {"name": {"const": f["name"]}, "parameters": params},
               "required": ["name", "parameters"], "additionalProperties": false})
    }

    /// The schema calls are generated under (`required` or a named function), if any.
    pub fn forced_schema(&self) -> Option<Value> {
        let one = match &self.choice {
            ToolChoice::Required => {
                let all: Vec<Value> = self.functions.iter().map(Self::call_schema).collect();
                if all.len() == 1 {
                    all.into_iter().next().unwrap_or_default()
                } else {
                    json!({"anyOf": all})
                }
            }
            ToolChoice::Named(n) => {
                Self::call_schema(self.functions.iter().find(|f| f["name"] == n.as_str())?)
            }
            _ => return None,
        };
        Some(if self.parallel {
            json!({"type": "array", "items": one, "minItems": 1, "maxItems": 8})
        } else {
            one
        })
    }

    /// Whether tools take part in this request at all (`tool_choice: none` keeps them out).
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The calls in generated text: one call object, or an array of them, naming given tools.
    pub fn parse_calls(&self, text: &str) -> Option<Vec<Call>> {
        let v: Value = serde_json::from_str(text.trim()).ok()?;
        let list = match v {
            Value::Array(a) => a,
            obj @ Value::Object(_) => vec![obj],
            _ => return None,
        };
        // Without parallel calls, at most one: a list of several is the model's text, not calls.
        if list.is_empty() || (!self.parallel && list.len() > 1) {
            return None;
        }
        // A forced list of parallel calls is closed right after the first call that repeats an
        // earlier one (a model going round in a loop): that last call is dropped. Elsewhere
        // identical calls may be meant (two dice rolls) and are kept.
        let mut list = list;
        let forced_list =
            self.parallel && matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_));
        if forced_list && list.len() > 1 && list[..list.len() - 1].contains(&list[list.len() - 1]) {
            list.pop();
        }
        list.into_iter()
            .map(|c| {
                let name = c.get("name")?.as_str()?.to_string();
                if !self.functions.iter().any(|f| f["name"] == name.as_str()) {
                    return None;
                }
                let args = c.get("parameters").or_else(|| c.get("arguments"))?;
                Some(Call {
                    name,
                    arguments: args.to_string(),
                })
            })
            .collect()
    }

    /// Messages for templates that do not know tools (Gemma 3): the tools and the call format
    /// go into the first system (or user) message; assistant calls become their JSON text; tool
    /// results become user turns (consecutive results merged into one, with the user's text
    /// that follows them).
    pub fn adapt_messages(&self, messages: &[Value]) -> Vec<Value> {
        adapt_messages(&self.functions, messages)
    }
}

/// The messages to render for `family` and the tool list its template receives: Llama 4's
/// template renders tools, calls and results itself; other families get them written into the
/// conversation (`adapt_messages`), also when a conversation carries calls or results without
/// offering tools any more.
pub fn for_template(
    family: &str,
    tools: Option<&Tools>,
    messages: &[Value],
) -> (Vec<Value>, Option<Vec<Value>>) {
    let functions = tools.map_or(&[][..], |t| &t.functions[..]);
    if family == "llama4" {
        let listed = tools.map(|t| {
            t.functions
                .iter()
                .map(|f| json!({"type": "function", "function": f}))
                .collect()
        });
        (Tools::template_messages(messages), listed)
    } else {
        (adapt_messages(functions, messages), None)
    }
}

fn adapt_messages(functions: &[Value], messages: &[Value]) -> Vec<Value> {
    let mut intro = String::from(
        "You have access to the following functions. To call a function, respond with JSON \
             for a function call. ",
    );
    intro.push_str(CALL_FORMAT);
    intro.push_str("\n\n");
    for f in functions {
        intro.push_str(&serde_json::to_string_pretty(f).unwrap_or_default());
        intro.push_str("\n\n");
    }
    let mut out: Vec<Value> = Vec::new();
    let mut introduced = false;
    // Whether the last turn written holds function results (a user turn the client did not
    // write, which the user's own text after the results joins, keeping turns alternating).
    let mut results_turn = false;
    for m in messages {
        let role = m["role"].as_str().unwrap_or("");
        let was_results = std::mem::replace(&mut results_turn, role == "tool");
        match role {
            "system" if !introduced && !functions.is_empty() => {
                let text = format!("{intro}{}", text_of(&m["content"]));
                out.push(json!({"role": "system", "content": text}));
                introduced = true;
            }
            "tool" => {
                let piece = format!("Function result: {}", text_of(&m["content"]));
                match out.last_mut() {
                    Some(last) if last["role"] == "user" => {
                        let joined = format!("{}\n{piece}", text_of(&last["content"]));
                        last["content"] = Value::from(joined);
                    }
                    _ => out.push(json!({"role": "user", "content": piece})),
                }
            }
            "assistant" if m.get("tool_calls").is_some_and(|t| !t.is_null()) => {
                let calls: Vec<Value> = m["tool_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        let args = c["function"]["arguments"]
                            .as_str()
                            .and_then(|a| serde_json::from_str(a).ok())
                            .unwrap_or(Value::Null);
                        json!({"name": c["function"]["name"], "parameters": args})
                    })
                    .collect();
                let text = if calls.len() == 1 {
                    calls[0].to_string()
                } else {
                    Value::Array(calls).to_string()
                };
                out.push(json!({"role": "assistant", "content": text}));
            }
            "user" if was_results => {
                if let Some(last) = out.last_mut() {
                    let joined =
                        format!("{}\n{}", text_of(&last["content"]), text_of(&m["content"]));
                    last["content"] = Value::from(joined);
                }
            }
            _ => out.push(m.clone()),
        }
    }
    if !introduced && !functions.is_empty() {
        out.insert(0, json!({"role": "system", "content": intro.trim_end()}));
    }
    out
}

impl Tools {
    /// Messages for templates that render tools themselves (Llama 4): call arguments, a JSON
    /// string in OpenAI's shape, become the object the template writes out.
    pub fn template_messages(messages: &[Value]) -> Vec<Value> {
        messages
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some(Value::Array(calls)) = m.get_mut("tool_calls") {
                    for c in calls {
                        if let Some(a) = c["function"]["arguments"].as_str()
                            && let Ok(v) = serde_json::from_str::<Value>(a)
                        {
                            c["function"]["arguments"] = v;
                        }
                    }
                }
                m
            })
            .collect()
    }
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(choice: Value, parallel: bool) -> Tools {
        let obj = json!({"tools": [
            {"type": "function", "function": {"name": "weather", "parameters": {"type": "object",
             "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "time"}}],
            "tool_choice": choice, "parallel_tool_calls": parallel});
        from_request(obj).unwrap().unwrap()
    }

    /// The tools of a chat request with `fields` (through the whole request parser).
    fn from_request(fields: Value) -> ApiResult<Option<Tools>> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        crate::openai::parse(body.to_string().as_bytes(), crate::openai::Endpoint::Chat)
            .map(|job| job.tools)
    }

    #[test]
    fn choices_schemas_and_parsing() {
        let t = tools(json!("required"), false);
        let s = t.forced_schema().unwrap();
        assert_eq!(s["anyOf"].as_array().unwrap().len(), 2);
        let named = tools(
            json!({"type": "function", "function": {"name": "weather"}}),
            true,
        );
        let s = named.forced_schema().unwrap();
        assert_eq!(s["type"], "array");
        assert_eq!(s["items"]["properties"]["name"]["const"], "weather");
        assert_eq!(tools(json!("auto"), true).forced_schema(), None);
        assert!(!tools(json!("none"), true).active());

        let list = r#" [{"name": "weather", "parameters": {"city": "Oslo"}}, {"name": "time", "parameters": {}}] "#;
        // Without parallel calls, a list of several is not calls.
        assert_eq!(t.parse_calls(list), None);
        let calls = tools(json!("required"), true).parse_calls(list).unwrap();
        assert_eq!(calls[0].arguments, r#"{"city":"Oslo"}"#);
        assert_eq!(calls[1].name, "time");
        assert_eq!(t.parse_calls(r#"{"name": "nope", "parameters": {}}"#), None);
        // A forced parallel list closed right after a repeated call: that call is dropped;
        // under `auto`, identical calls may be meant and are kept.
        let two = r#"[{"name": "time", "parameters": {}}, {"name": "time", "parameters": {}}]"#;
        let forced = tools(json!("required"), true);
        assert_eq!(forced.parse_calls(two).unwrap().len(), 1);
        assert_eq!(
            tools(json!("auto"), true).parse_calls(two).unwrap().len(),
            2
        );
        assert_eq!(t.parse_calls("It is sunny."), None);

        let bad = |v: Value| from_request(v).unwrap_err().param;
        assert_eq!(
            bad(json!({"tools": [{"type": "retrieval"}]})).as_deref(),
            Some("tools")
        );
        assert_eq!(
            bad(json!({"tools": [], "tool_choice": "required"})).as_deref(),
            Some("tool_choice")
        );
        assert_eq!(
            bad(
                json!({"tools": [{"type": "function", "function": {"name": "a"}}],
                       "tool_choice": {"type": "function", "function": {"name": "b"}}})
            )
            .as_deref(),
            Some("tool_choice")
        );
    }

    #[test]
    fn gemma_style_adaptation_keeps_turns_alternating() {
        let t = tools(json!("auto"), true);
        let msgs = vec![
            json!({"role": "user", "content": "Weather in Oslo?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                   "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "12 C"}),
        ];
        let out = t.adapt_messages(&msgs);
        let roles: Vec<&str> = out.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(out[0]["content"].as_str().unwrap().contains("\"weather\""));
        assert_eq!(
            out[2]["content"],
            r#"{"name":"weather","parameters":{"city":"Oslo"}}"#
        );
        assert_eq!(out[3]["content"], "Function result: 12 C");
        // The user's text after the results (Anthropic's tool_result and text in one turn) joins
        // the results' turn.
        let mut more = msgs.clone();
        more.push(json!({"role": "user", "content": "So, a coat?"}));
        let out = t.adapt_messages(&more);
        assert_eq!(out.len(), 4);
        assert_eq!(out[3]["content"], "Function result: 12 C\nSo, a coat?");

        // The same conversation for Llama 4: its template gets the tools and argument objects.
        let (msgs4, listed) = for_template("llama4", Some(&t), &msgs);
        assert_eq!(listed.unwrap()[0]["function"]["name"], "weather");
        assert_eq!(
            msgs4[1]["tool_calls"][0]["function"]["arguments"]["city"],
            "Oslo"
        );
        // Without tools offered any more, Gemma still gets calls and results as plain turns.
        let (plain, listed) = for_template("gemma3", None, &msgs);
        assert!(listed.is_none());
        let roles: Vec<&str> = plain.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
    }
}
