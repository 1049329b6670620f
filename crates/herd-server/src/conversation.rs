//! A conversation translated from another API, shaped as chat templates accept it.
//!
//! Anthropic's, Ollama's and the Responses API accept what strict chat templates refuse
//! (Gemma 3's raises "Conversation roles must alternate"): system or developer text anywhere,
//! and runs of turns of one role. Their servers join such runs, so herd does too, the same way
//! for every translated API: system texts become one leading system message, and consecutive
//! plain-text turns of one role become one turn, their texts joined by a blank line. Turns with
//! tool calls and tool results are kept as they are (templates render them in sequence).

use serde_json::{Value, json};

use crate::openai::{ApiError, ApiResult};

/// What a conversation may end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// A user turn or tool results: the model answers them.
    Answer,
    /// Anything, the final assistant turn included (counting tokens only).
    Any,
}

/// Shape `messages` (OpenAI-shaped: `role`, `content`, and `tool_calls` on assistant turns) for
/// a chat template, as the module says.
///
/// Errors (400 naming `param`): nothing but system text (no turn to answer), or with
/// [`Ending::Answer`] a final assistant text turn, which would ask the model to continue it: the
/// chat templates herd renders close every turn, so it would be answered instead.
pub(crate) fn shape(messages: Vec<Value>, ending: Ending, param: &str) -> ApiResult<Vec<Value>> {
    let mut system: Vec<String> = Vec::new();
    let mut out: Vec<Value> = Vec::new();
    for m in messages {
        let role = m["role"].as_str().unwrap_or_default();
        if role == "system" {
            if let Some(text) = m["content"].as_str().filter(|t| !t.is_empty()) {
                system.push(text.to_string());
            }
            continue;
        }
        let plain = |v: &Value| v.get("tool_calls").is_none() && v["content"].is_string();
        match out.last_mut() {
            Some(last)
                if (role == "user" || role == "assistant")
                    && last["role"] == role
                    && plain(last)
                    && plain(&m) =>
            {
                let before = last["content"].as_str().unwrap_or_default();
                let text = m["content"].as_str().unwrap_or_default();
                last["content"] = Value::String(match (before.is_empty(), text.is_empty()) {
                    (true, _) => text.to_string(),
                    (_, true) => before.to_string(),
                    _ => format!("{before}\n\n{text}"),
                });
            }
            _ => out.push(m),
        }
    }
    if out.is_empty() {
        return Err(ApiError::bad_request(
            "the conversation has no message to answer: give at least one user message with \
             text",
        )
        .param(param));
    }
    if ending == Ending::Answer
        && out
            .last()
            .is_some_and(|m| m["role"] == "assistant" && m.get("tool_calls").is_none())
    {
        return Err(ApiError::bad_request(
            "a final assistant message (for the model to continue) is not supported: end the \
             conversation with a user message",
        )
        .param(param));
    }
    if !system.is_empty() {
        out.insert(0, json!({"role": "system", "content": system.join("\n\n")}));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(v: &[Value]) -> Vec<&str> {
        v.iter().map(|m| m["role"].as_str().unwrap()).collect()
    }

    #[test]
    fn runs_join_and_system_text_leads() {
        let call = json!({"role": "assistant", "content": null,
                          "tool_calls": [{"type": "function", "function": {"name": "f"}}]});
        let messages = vec![
            json!({"role": "user", "content": "a"}),
            json!({"role": "system", "content": "be brief"}),
            json!({"role": "user", "content": "b"}),
            json!({"role": "assistant", "content": "c"}),
            call.clone(),
            json!({"role": "tool", "content": "1"}),
            json!({"role": "tool", "content": "2"}),
            json!({"role": "user", "content": "d"}),
            json!({"role": "system", "content": "in French"}),
        ];
        let out = shape(messages, Ending::Answer, "messages").unwrap();
        assert_eq!(
            roles(&out),
            [
                "system",
                "user",
                "assistant",
                "assistant",
                "tool",
                "tool",
                "user"
            ]
        );
        assert_eq!(out[0]["content"], "be brief\n\nin French");
        assert_eq!(out[1]["content"], "a\n\nb");
        assert_eq!(out[3], call, "a turn with calls is kept whole");
    }

    #[test]
    fn nothing_to_answer_and_a_final_assistant_turn_are_refused() {
        let only_system = vec![json!({"role": "system", "content": "s"})];
        let e = shape(only_system, Ending::Any, "input").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input"));
        assert!(shape(vec![], Ending::Any, "messages").is_err());
        let prefill = vec![
            json!({"role": "user", "content": "count"}),
            json!({"role": "assistant", "content": "1, 2,"}),
        ];
        let e = shape(prefill.clone(), Ending::Answer, "messages").unwrap_err();
        assert!(
            e.message.contains("final assistant message"),
            "{}",
            e.message
        );
        assert_eq!(shape(prefill, Ending::Any, "messages").unwrap().len(), 2);
    }
}
