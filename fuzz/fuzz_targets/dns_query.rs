#![no_main]

libfuzzer_sys::fuzz_target!(init: meshnode_fuzz::init(), |data: &[u8]| {
    meshnode::fuzzing::dns_query(data);
});
