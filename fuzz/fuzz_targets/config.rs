//! The config file parser (`FileConfig::parse`, Azure NPM's `azure-npm.json`) on any text,
//! then the layering with empty overrides.
#![no_main]

use libfuzzer_sys::fuzz_target;
use npm_agent::config::{FileConfig, Overrides, resolve};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = FileConfig::parse(text, "fuzz.json") {
        let _ = resolve(Some(&file), &Overrides::default(), &Overrides::default());
    }
});
