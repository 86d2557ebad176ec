//! OCI runtime config loading as `nestor` and the agent do it: parse a config.json, then
//! validate it. Invariants: no panic; a config that validates re-serializes to JSON
//! that parses and validates again.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nestor_container::spec::{parse, validate};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("config.json");
    let Ok(spec) = parse(path, data) else { return };
    if validate(path, &spec).is_ok() {
        let again = serde_json::to_vec(&spec).expect("a parsed spec serializes");
        let spec2 = parse(path, &again).expect("a serialized spec parses");
        validate(path, &spec2).expect("a valid spec stays valid after a round trip");
    }
});
