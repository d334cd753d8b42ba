//! The lab's expectation file parser (`Expectation::parse`) on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use npm_agent::expect::Expectation;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Expectation::parse(text);
});
