//! Constrained decoding on real vocabularies (tests/fixtures/fetch.sh): token bytes that
//! concatenate to the text, grammars that only let valid output through, and clear errors.

use std::path::{Path, PathBuf};

use herd_engine::Tokenizer;
use herd_engine::constraint::{ConstraintCompiler, Grammar, MAX_GRAMMAR_BYTES, MAX_SCHEMA_VALUES};
use herd_formats::GgufFile;
use serde_json::json;

fn downloaded(p: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/downloaded")
        .join(p);
    assert!(
        path.exists(),
        "{} is missing: run tests/fixtures/fetch.sh",
        path.display()
    );
    path
}

fn tokenizers() -> Vec<Tokenizer> {
    vec![
        Tokenizer::from_gguf(&GgufFile::open(&downloaded("gemma-3-270m-q4_k_m.gguf")).unwrap())
            .unwrap(),
        Tokenizer::from_hf_dir(&downloaded("tokenizers/llama3")).unwrap(),
        Tokenizer::from_hf_dir(&downloaded("tokenizers/gemma3")).unwrap(),
    ]
}

#[test]
fn token_bytes_concatenate_to_the_text() {
    for tok in tokenizers() {
        let table = tok.token_bytes();
        assert_eq!(table.len(), tok.vocab_size());
        for text in [
            "Hello, world! {\"a\": [1, 2.5, true]}",
            "naïve café — 日本語 🎉\n\ttabs",
            "  leading spaces and trailing  ",
        ] {
            let ids = tok.encode(text, false).unwrap();
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&i| table[i as usize].0.clone())
                .collect();
            assert_eq!(String::from_utf8_lossy(&bytes), text, "{tok:?}");
            assert!(ids.iter().all(|&i| !table[i as usize].1));
        }
        if let Some(eos) = tok.eos {
            assert!(table[eos as usize].1, "EOS is special");
        }
    }
}

/// Drive a constraint greedily with fixed "logits" (`prefer(token id)`) until it allows only
/// the end, within `limit` tokens: the grammar alone decides what is valid.
fn drive(
    tok: &Tokenizer,
    c: &mut herd_engine::constraint::Constraint,
    prefer: impl Fn(usize) -> f32,
    limit: usize,
) -> String {
    let mut ids = Vec::new();
    while ids.len() < limit {
        let mut logits: Vec<f32> = (0..tok.vocab_size()).map(&prefer).collect();
        c.mask_logits(&mut logits).unwrap();
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        if tok.stop_ids.contains(&next) {
            return tok.decode(&ids, true).unwrap();
        }
        c.commit(next).unwrap();
        ids.push(next);
    }
    panic!("no end within {limit} tokens: {:?}", tok.decode(&ids, true));
}

/// Drive a constraint with "logits" that prefer the highest token id (modulo 97), whatever the
/// text must satisfy the grammar.
fn generate_under(tok: &Tokenizer, g: &Grammar) -> String {
    let compiler = ConstraintCompiler::new(tok).unwrap();
    let mut c = compiler.compile(g).unwrap();
    drive(tok, &mut c, |i| (i % 97) as f32, 200)
}

#[test]
fn grammars_only_let_valid_text_through() {
    let tok = &tokenizers()[0];
    let schema = json!({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 3, "maximum": 7},
        "c": {"enum": ["red", "blue"]}}, "required": ["n", "c"], "additionalProperties": false});
    let text = generate_under(tok, &Grammar::JsonSchema(schema));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let n = v["n"].as_i64().unwrap();
    assert!((3..=7).contains(&n) && ["red", "blue"].contains(&v["c"].as_str().unwrap()));
    assert_eq!(v.as_object().unwrap().len(), 2, "{text}");

    let text = generate_under(tok, &Grammar::Regex("[a-c]{2}-[0-9]".into()));
    assert!(text.len() == 4 && text.as_bytes()[2] == b'-', "{text}");
    let text = generate_under(tok, &Grammar::Lark(r#"start: "yes" | "no""#.into()));
    assert!(text == "yes" || text == "no", "{text}");
}

#[test]
fn unenforceable_or_malformed_grammars_are_errors() {
    let tok = &tokenizers()[0];
    let compiler = ConstraintCompiler::new(tok).unwrap();
    let err = |g: Grammar| compiler.compile(&g).unwrap_err();
    let e = err(Grammar::JsonSchema(
        json!({"type": "array", "uniqueItems": true}),
    ));
    assert!(e.contains("uniqueItems"), "{e}");
    let e = err(Grammar::JsonSchema(json!({"not": {"type": "string"}})));
    assert!(e.contains("not"), "{e}");
    assert!(
        !err(Grammar::JsonSchema(
            json!({"type": "object", "properties": 5})
        ))
        .is_empty()
    );
    assert!(!err(Grammar::JsonSchema(json!(["not", "a", "schema"]))).is_empty());
    assert!(!err(Grammar::Regex("[unclosed".into())).is_empty());
    assert!(!err(Grammar::Lark("start: undefined_rule".into())).is_empty());
}

/// A schema of `n` optional integer properties (as in the report: ~4,500 of them in 59 KB).
fn wide_schema(n: usize) -> serde_json::Value {
    let props: serde_json::Map<String, serde_json::Value> = (0..n)
        .map(|i| (format!("p{i}"), json!({"type": "integer"})))
        .collect();
    json!({"type": "object", "properties": props})
}

/// llguidance's compiler recurses over the grammar: a schema of ~4,500 properties overflowed a
/// 2 MiB async worker's stack and aborted the server. Compilation runs on a thread of its own
/// with a large stack, so even a caller with a small stack compiles a schema up to the limit;
/// beyond it, a clear error before any work.
#[test]
fn large_schemas_compile_off_the_callers_stack_and_oversized_ones_are_errors() {
    let tok = &tokenizers()[0];
    let compiler = ConstraintCompiler::new(tok).unwrap();
    let small_stack = |g: Grammar| {
        let compiler = compiler.clone();
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || compiler.compile(&g).map(|_| ()))
            .unwrap()
            .join()
            .expect("compiling must not overflow the caller's stack")
    };
    small_stack(Grammar::JsonSchema(wide_schema(4_500))).unwrap();

    // 2 values per property (its schema object and its type): over the limit.
    let n = MAX_SCHEMA_VALUES / 2 + 1;
    let e = small_stack(Grammar::JsonSchema(wide_schema(n))).unwrap_err();
    assert!(e.contains("too large") && e.contains("10000"), "{e}");
    let e = small_stack(Grammar::Lark(format!(
        "start: \"{}\"",
        "a".repeat(MAX_GRAMMAR_BYTES)
    )))
    .unwrap_err();
    assert!(e.contains("too large"), "{e}");
}

/// Issue 18 item 5: a grammar whose language is empty (self-references with no way out, left
/// recursion with no base case) fails at its first mask with a message a client can act on
/// (the server answers it 400 before any output); recursive ones that can end give a mask.
/// (Right recursion with no base case, `a: "x" a`, has a first token and runs to `max_tokens`.)
#[test]
fn grammars_that_accept_nothing_fail_at_their_first_mask_with_a_clear_message() {
    let tok = &tokenizers()[0];
    let compiler = ConstraintCompiler::new(tok).unwrap();
    let first_mask = |g: &Grammar| {
        let mut c = compiler.compile(g)?;
        let mut logits = vec![0.0f32; tok.vocab_size()];
        c.mask_logits(&mut logits)?;
        Ok::<usize, String>(logits.iter().filter(|x| x.is_finite()).count())
    };
    for g in [
        Grammar::JsonSchema(json!({"$ref": "#"})),
        Grammar::JsonSchema(json!({"allOf": [{"$ref": "#"}]})),
        Grammar::JsonSchema(json!({"$defs": {"a": {"$ref": "#/$defs/b"},
                                             "b": {"$ref": "#/$defs/a"}},
                                   "$ref": "#/$defs/a"})),
        Grammar::Lark("start: a\na: a".into()),
        Grammar::Lark("start: a\na: a \"x\"".into()),
    ] {
        let e = first_mask(&g).unwrap_err();
        assert!(e.contains("accepts no output"), "{g:?}: {e}");
        assert!(!e.contains("<state>"), "{e}");
    }
    for g in [
        Grammar::JsonSchema(json!({"anyOf": [{"$ref": "#"}, {"type": "integer"}]})),
        Grammar::Lark("start: a\na: a \"x\" | \"y\"".into()),
    ] {
        let allowed = first_mask(&g).unwrap();
        assert!(
            allowed > 0 && allowed < tok.vocab_size(),
            "{g:?}: {allowed}"
        );
    }
}

/// Issue 17 item 6: under a JSON schema, a model that always prefers another digit (as a small
/// model at temperature 0 writes `0.4000000…`) still ends its numbers: at most
/// MAX_INTEGER_DIGITS digits in the integer part, MAX_FRACTION_DIGITS in the fraction, MAX_EXPONENT_DIGITS in
/// the exponent, so the JSON closes and the output ends. Digits inside strings are not bounded.
#[test]
fn json_numbers_end_even_when_the_model_wants_more_digits() {
    use herd_engine::constraint::{MAX_EXPONENT_DIGITS, MAX_FRACTION_DIGITS, MAX_INTEGER_DIGITS};
    for tok in &tokenizers()[..2] {
        let compiler = ConstraintCompiler::new(tok).unwrap();
        let digit_first: Vec<bool> = (0..tok.vocab_size() as u32)
            .map(|id| {
                tok.decode(&[id], false)
                    .unwrap()
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_digit())
            })
            .collect();
        let schema = json!({"type": "object", "properties": {
            "x": {"type": "number"}, "n": {"type": "integer"},
            "tag": {"type": "string", "pattern": "^[0-9]{20}$"}},
            "required": ["x", "n", "tag"], "additionalProperties": false});
        let mut c = compiler.compile(&Grammar::JsonSchema(schema)).unwrap();
        // Digits first, then '.', 'e' and the rest by id.
        let prefer = |i: usize| {
            if digit_first[i] {
                1000.0
            } else {
                (i % 97) as f32
            }
        };
        let text = drive(tok, &mut c, prefer, 400);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["tag"].as_str().unwrap().len(), 20, "{text}");
        let longest_run = |s: &str| {
            s.split(|c: char| !c.is_ascii_digit())
                .map(str::len)
                .max()
                .unwrap_or(0)
        };
        let x = text
            .split("\"x\": ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap();
        let n = text
            .split("\"n\": ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap();
        let mantissa = x.split(['e', 'E']).next().unwrap();
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        assert!(longest_run(int) <= MAX_INTEGER_DIGITS, "{text}");
        assert!(longest_run(frac) <= MAX_FRACTION_DIGITS, "{text}");
        assert!(longest_run(n) <= MAX_INTEGER_DIGITS, "{text}");
        if let Some(exp) = x.split(['e', 'E']).nth(1) {
            assert!(longest_run(exp) <= MAX_EXPONENT_DIGITS, "{text}");
        }
    }
}

/// Issue 17 item 6, forced calls: a model that always prefers to go on (`, ` after every call)
/// and repeats itself has its list closed right after the first repeated call, instead of
/// running to the schema's 8-call cap.
#[test]
fn a_forced_call_list_closes_at_the_first_repeat() {
    let tok = &tokenizers()[0];
    let compiler = ConstraintCompiler::new(tok).unwrap();
    let comma_first: Vec<bool> = (0..tok.vocab_size() as u32)
        .map(|id| tok.decode(&[id], false).unwrap().starts_with(','))
        .collect();
    let call = json!({"type": "object", "properties": {"name": {"const": "time"},
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                       "required": ["zone"], "additionalProperties": false}},
        "required": ["name", "parameters"], "additionalProperties": false});
    let schema = json!({"type": "array", "items": call, "minItems": 1, "maxItems": 8});
    let run = |g: Grammar| {
        let mut c = compiler.compile(&g).unwrap();
        let prefer = |i: usize| {
            if comma_first[i] {
                1000.0
            } else {
                (i % 97) as f32
            }
        };
        let text = drive(tok, &mut c, prefer, 600);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v.as_array().unwrap().clone()
    };
    // As a plain schema the list runs to its cap; as a call list it closes at the repeat.
    assert_eq!(run(Grammar::JsonSchema(schema.clone())).len(), 8);
    let calls = run(Grammar::CallList(schema));
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0], calls[1]);
}
