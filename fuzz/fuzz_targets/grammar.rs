//! The grammar compiler entry (`ConstraintCompiler::compile`, as the server calls it) on
//! arbitrary JSON schemas (also as call lists), Lark grammars and regular expressions, then a
//! few constrained steps (with the number bound and the call-list scan):
//! every input compiles or is refused with a message, and no step panics or hangs. Over the
//! 128-token vocabulary of the tiny Llama 4 fixture, so that masks are cheap.
#![no_main]

use std::sync::LazyLock;

use herd_engine::Tokenizer;
use herd_engine::constraint::{ConstraintCompiler, Grammar, check_size};
use libfuzzer_sys::fuzz_target;

static COMPILER: LazyLock<(ConstraintCompiler, usize)> = LazyLock::new(|| {
    // llguidance catches its own panics and reports them as errors: the hook that
    // libfuzzer-sys installed would abort on those. Panics are printed instead; one that
    // escapes still aborts the run (libfuzzer-sys checks each input for an unwound panic).
    std::panic::set_hook(Box::new(|info| eprintln!("panic (caught or not): {info}")));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/llama4_gguf/tiny-f32.gguf");
    let gguf = herd_formats::GgufFile::open(std::path::Path::new(path)).expect("fixture");
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    (ConstraintCompiler::new(&tok).expect("compiler"), tok.vocab_size())
});

fuzz_target!(|data: &[u8]| {
    let Some((&kind, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let grammar = match kind % 4 {
        0 | 3 => match serde_json::from_str(text) {
            Ok(schema) if kind % 4 == 0 => Grammar::JsonSchema(schema),
            Ok(schema) => Grammar::CallList(schema),
            Err(_) => return,
        },
        1 => Grammar::Lark(text.to_string()),
        _ => Grammar::Regex(text.to_string()),
    };
    if check_size(&grammar).is_err() {
        return;
    }
    let (compiler, vocab) = &*COMPILER;
    let Ok(mut c) = compiler.compile(&grammar) else {
        return;
    };
    for _ in 0..8 {
        let mut logits: Vec<f32> = (0..*vocab).map(|i| (i % 7) as f32).collect();
        if c.mask_logits(&mut logits).is_err() {
            return;
        }
        let Some((best, _)) = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .max_by(|a, b| a.1.total_cmp(b.1))
        else {
            return;
        };
        if c.commit(best as u32).is_err() {
            return;
        }
    }
});
