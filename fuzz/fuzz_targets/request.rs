//! The OpenAI request parser on arbitrary bodies: every input is a `Job` or an `ApiError`,
//! never a panic, a hang or unbounded memory.
#![no_main]

use herd_server::openai::{Endpoint, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        match parse(body, endpoint) {
            Ok(job) => assert!(job.n >= 1 && job.n <= 16),
            Err(e) => assert!(!e.message.is_empty() && e.status.is_client_error()),
        }
    }
});
