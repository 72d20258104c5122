#![no_main]

libfuzzer_sys::fuzz_target!(init: meshnode_fuzz::init(), |data: &[u8]| {
    let _ = meshnode::fuzzing::agent_enrollment(data);
});
