//! Building a pprof profile (`crate::proto::profile`): the string table, functions and locations
//! deduplicated, samples appended. Shared by the CPU ([`super::profile`]) and heap ([`super::heap`])
//! profiles, which differ only in where their stacks come from.
//!
//! Input: frames (name, system name, file, line) grouped by location, and samples of location ids with
//! their values. Output: a [`pb::Profile`] whose every reference resolves and whose string 0 is empty, as
//! the format requires.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::proto::profile as pb;

/// One function at one line, as a location lists it (inlined functions first).
pub(crate) struct Frame<'a> {
    /// Function name (demangled).
    pub name: &'a str,
    /// Its system (mangled) name; the name again when unknown.
    pub system_name: &'a str,
    /// Source file, empty when unknown.
    pub file: &'a str,
    /// Line, 0 when unknown.
    pub line: i64,
}

/// A profile being built.
pub(crate) struct Builder {
    strings: HashMap<String, i64>,
    table: Vec<String>,
    functions: HashMap<(i64, i64, i64), u64>,
    function_list: Vec<pb::Function>,
    locations: HashMap<Vec<(u64, i64)>, u64>,
    location_list: Vec<pb::Location>,
    samples: Vec<pb::Sample>,
}

impl Builder {
    pub(crate) fn new() -> Builder {
        let mut b = Builder {
            strings: HashMap::new(),
            table: Vec::new(),
            functions: HashMap::new(),
            function_list: Vec::new(),
            locations: HashMap::new(),
            location_list: Vec::new(),
            samples: Vec::new(),
        };
        b.string("");
        b
    }

    /// The string table index of `s`, added if new.
    pub(crate) fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    /// The id of the location at `address` holding `frames` (innermost first); one location per distinct
    /// list of (function, line).
    pub(crate) fn location<'a>(
        &mut self,
        address: u64,
        frames: impl IntoIterator<Item = Frame<'a>>,
    ) -> u64 {
        let lines: Vec<(u64, i64)> = frames
            .into_iter()
            .map(|f| {
                let key = (
                    self.string(f.name),
                    self.string(f.system_name),
                    self.string(f.file),
                );
                let next = self.function_list.len() as u64 + 1;
                let list = &mut self.function_list;
                let id = *self.functions.entry(key).or_insert_with(|| {
                    list.push(pb::Function {
                        id: next,
                        name: key.0,
                        system_name: key.1,
                        filename: key.2,
                    });
                    next
                });
                (id, f.line)
            })
            .collect();
        if let Some(&id) = self.locations.get(&lines) {
            return id;
        }
        let id = self.location_list.len() as u64 + 1;
        self.location_list.push(pb::Location {
            id,
            address,
            line: lines
                .iter()
                .map(|&(function_id, line)| pb::Line { function_id, line })
                .collect(),
        });
        self.locations.insert(lines, id);
        id
    }

    /// Appends a sample: its stack (location ids, innermost first), one value per sample type, and
    /// string labels.
    pub(crate) fn sample(
        &mut self,
        location_id: Vec<u64>,
        value: Vec<i64>,
        labels: &[(&str, &str)],
    ) {
        let label = labels
            .iter()
            .map(|(k, v)| pb::Label {
                key: self.string(k),
                str: self.string(v),
            })
            .collect();
        self.samples.push(pb::Sample {
            location_id,
            value,
            label,
        });
    }

    /// The profile: `sample_types` and `period_type` as (type, unit) pairs.
    pub(crate) fn finish(
        mut self,
        sample_types: &[(&str, &str)],
        period_type: (&str, &str),
        period: i64,
        start: SystemTime,
        duration_nanos: i64,
    ) -> pb::Profile {
        let mut value_type = |(t, u): (&str, &str)| pb::ValueType {
            r#type: self.string(t),
            unit: self.string(u),
        };
        let sample_type = sample_types.iter().map(|&p| value_type(p)).collect();
        let period_type = Some(value_type(period_type));
        pb::Profile {
            sample_type,
            sample: self.samples,
            location: self.location_list,
            function: self.function_list,
            string_table: self.table,
            time_nanos: start
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64),
            duration_nanos,
            period_type,
            period,
        }
    }
}
