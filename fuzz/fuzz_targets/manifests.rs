//! The manifests source on any text: `Loader::add_text` (YAML documents → k8s-openapi objects
//! → the model, through `k8s::convert`), then the compiler on what it read. Bad input must come
//! out as diagnostics, never as a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use npm_agent::compiler::{IdAllocator, compile};
use npm_agent::source::manifests::Loader;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut loader = Loader::default();
    loader.add_text("fuzz.yaml", text);
    let _ = loader.services();
    let (snapshot, _diagnostics) = loader.finish();
    let _ = compile(&snapshot, &mut IdAllocator::default());
});
