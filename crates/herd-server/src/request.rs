//! OpenAI request bodies as serde types: `POST /v1/chat/completions` and `/v1/completions`.
//!
//! Every object OpenAI's API reference defines as closed is `deny_unknown_fields`, so a field
//! herd does not implement is a 400 naming it, never a quiet 200 that ignored it. Types and
//! integer widths are serde's (`max_tokens: 2^63` does not fit a `u32`); value ranges are
//! checked in [`crate::openai::parse`]. Errors carry their JSON path (`messages[0].images`)
//! through `serde_path_to_error`.
//!
//! Fields a client echoes back from a response (an assistant message's `refusal`, `audio`,
//! `function_call`, `annotations`) are accepted when null or empty, as the official clients send
//! them on a round trip, and refused otherwise.

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde_json::{Map, Value};

/// Both endpoints' fields in one type (the endpoint checks which of its own it got).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub model: String,

    // Chat only.
    pub messages: Option<Vec<ChatMessage>>,
    pub max_completion_tokens: Option<u32>,
    pub top_logprobs: Option<u32>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,

    // Completions only.
    pub prompt: Option<Prompt>,

    // Both.
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// `-1` (vLLM's "disabled") or a count.
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// Token id (a decimal string, as JSON object keys are) to a bias in [-100, 100].
    pub logit_bias: Option<HashMap<String, f64>>,
    pub seed: Option<Seed>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    /// Chat: a boolean; completions: the number of top log-probabilities (0–20).
    pub logprobs: Option<Logprobs>,
    pub user: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub response_format: Option<ResponseFormat>,
    /// Extensions (vLLM's names): generate through end-of-generation tokens; constrain the
    /// output to a regular expression or a Lark grammar.
    pub ignore_eos: Option<bool>,
    pub guided_regex: Option<String>,
    pub guided_grammar: Option<String>,
    /// vLLM's prefix-cache partition: only requests with the same salt (and API key) reuse each
    /// other's cached prompt blocks.
    pub cache_salt: Option<String>,
}

impl Request {
    /// The fields one endpoint does not take that this body set (non-null).
    pub fn foreign_fields(&self, chat: bool) -> Vec<&'static str> {
        let chat_only = [
            ("messages", self.messages.is_some()),
            (
                "max_completion_tokens",
                self.max_completion_tokens.is_some(),
            ),
            ("top_logprobs", self.top_logprobs.is_some()),
            ("tools", self.tools.is_some()),
            ("tool_choice", self.tool_choice.is_some()),
            ("parallel_tool_calls", self.parallel_tool_calls.is_some()),
        ];
        let completions_only = [("prompt", self.prompt.is_some())];
        let foreign: &[(&'static str, bool)] = if chat { &completions_only } else { &chat_only };
        foreign
            .iter()
            .filter(|(_, set)| *set)
            .map(|(k, _)| *k)
            .collect()
    }
}

/// `seed`: any JSON integer that fits 64 bits, signed or not (taken as its two's complement).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged, expecting = "an integer")]
pub enum Seed {
    Signed(i64),
    Unsigned(u64),
}

impl Seed {
    pub fn bits(self) -> u64 {
        match self {
            Self::Signed(s) => s as u64,
            Self::Unsigned(u) => u,
        }
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Chat's `logprobs: true` or completions' `logprobs: N`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(
    untagged,
    expecting = "a boolean (chat) or a non-negative integer (completions)"
)]
pub enum Logprobs {
    On(bool),
    Top(u32),
}

/// A completion prompt: a string, a list of one string, or a list of token ids.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, or a list of token ids (non-negative integers below 2^32)"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// Required by OpenAI, optional here (many hand-written requests omit it); it only names
    /// the format.
    pub name: Option<String>,
    pub description: Option<String>,
    pub schema: Option<Schema>,
    /// herd always enforces the schema; `false` is accepted and still enforced.
    pub strict: Option<bool>,
}

/// A JSON Schema: an object or a boolean.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a JSON Schema (an object or a boolean)")]
pub enum Schema {
    Object(Map<String, Value>),
    Bool(bool),
}

impl Schema {
    pub fn into_value(self) -> Value {
        match self {
            Self::Object(o) => Value::Object(o),
            Self::Bool(b) => Value::Bool(b),
        }
    }
}

/// One entry of `tools`: only functions.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Tool {
    Function { function: FunctionDef },
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionDef {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The arguments' JSON Schema (an object).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or one named function.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}"
)]
pub enum ToolChoice {
    Mode(ToolMode),
    Named(NamedTool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolMode {
    None,
    Auto,
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum NamedTool {
    Function { function: FunctionName },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionName {
    pub name: String,
}

/// One chat message, by role. `name` (a participant's name) is passed to the chat template
/// with the message; the templates herd ships do not render it.
#[derive(Debug, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChatMessage {
    System {
        content: Content,
        name: Option<String>,
    },
    Developer {
        content: Content,
        name: Option<String>,
    },
    User {
        content: Content,
        name: Option<String>,
    },
    Assistant {
        /// Null or absent when the turn is only tool calls.
        content: Option<Content>,
        tool_calls: Option<Vec<ToolCall>>,
        name: Option<String>,
        refusal: Option<Echoed>,
        audio: Option<Echoed>,
        function_call: Option<Echoed>,
        annotations: Option<Echoed>,
        /// The openai SDK's `parse()` result, derived from `content`: the content is what
        /// the template renders.
        parsed: Option<IgnoredAny>,
    },
    Tool {
        content: Content,
        tool_call_id: Option<String>,
        /// Older clients name the function whose result this is.
        name: Option<String>,
    },
}

/// A call the assistant made earlier in the conversation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    /// The call's place in a streamed response (present when a client rebuilt the message from
    /// stream deltas); the call's place in this list says the same.
    pub index: Option<u32>,
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<FunctionKind>,
    pub function: CalledFunction,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FunctionKind {
    Function,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalledFunction {
    pub name: String,
    /// The arguments as a JSON string (OpenAI's shape).
    pub arguments: String,
    /// The openai SDK's parsed copy of `arguments`, echoed back; `arguments` is what counts.
    pub parsed_arguments: Option<IgnoredAny>,
}

/// A string, or a list of `T` (content parts, blocks): how every API herd speaks writes a
/// message's content. Read by hand rather than as an untagged enum so that an element's own
/// error (an `image_url` part, an image block) reaches the client.
#[derive(Debug)]
pub enum TextOr<T> {
    Text(String),
    List(Vec<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for TextOr<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = TextOr<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TextOr<T>, E> {
                Ok(TextOr::Text(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<TextOr<T>, E> {
                Ok(TextOr::Text(s))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<TextOr<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(TextOr::List(items))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// An OpenAI chat message's content: a string or text parts.
pub type Content = TextOr<ContentPart>;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ContentPart {
    Text { text: String },
}

/// A response field a client sent back: accepted when null (`Option`'s `None`) or empty, and
/// refused with a clear error otherwise.
#[derive(Debug)]
pub struct Echoed;

impl<'de> Deserialize<'de> for Echoed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Echoed;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("null or empty (herd does not take this field in requests)")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Echoed, E> {
                if s.is_empty() {
                    Ok(Echoed)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(s), &self))
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Echoed, A::Error> {
                match seq.next_element::<IgnoredAny>()? {
                    None => Ok(Echoed),
                    Some(_) => Err(de::Error::invalid_length(1, &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A request error: the JSON path where it was found (empty at the top level) and serde's
/// message.
#[derive(Debug)]
pub struct ParseError {
    pub path: String,
    pub message: String,
    /// The field name when the error is a field herd does not implement.
    pub unknown_field: Option<String>,
}

/// Read a request body.
pub fn parse(body: &[u8]) -> Result<Request, ParseError> {
    parse_as(body)
}

/// Read a request body into any request type (every API's requests read the same way: errors
/// carry their JSON path, an unknown field is named).
pub fn parse_as<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ParseError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let result: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let request = result.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let unknown_field = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`').map(|(name, _)| name.to_string()));
        ParseError {
            path: if path == "." { String::new() } else { path },
            message,
            unknown_field,
        }
    })?;
    // Trailing characters after the object are an error too (serde_json's `from_slice` checks
    // this; the streaming deserializer needs `end`).
    de.end().map_err(|e| ParseError {
        path: String::new(),
        message: e.to_string(),
        unknown_field: None,
    })?;
    Ok(request)
}
