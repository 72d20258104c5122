//! The environment variables each role reads, declared once: the name constants the config code uses and
//! the table `--help` prints come from the same declaration ([`declare!`]), so the help cannot name a
//! variable that is not read, nor miss one that is (a test in `config` checks both ways).
//!
//! Input: the declarations in [`crate::config`], [`crate::config::waypoint`] and
//! [`crate::cni_agent::config`]. Output: one `&[Var]` table per role, and [`render`] for the help text.

/// One variable: its name, its default (empty when unset means "off" or "none"), and what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var {
    /// The variable's name (for a prefix family, the prefix followed by `*`).
    pub name: &'static str,
    /// The value used when it is unset, as a user would write it; empty when there is none.
    pub default: &'static str,
    /// What it does (the declaration's doc comment).
    pub help: &'static str,
}

/// Declares name constants (each with its doc comment) and a table of them named `$table`:
///
/// ```ignore
/// declare! { PROXY_VARS:
///     /// `shared` or `dedicated`.
///     PROXY_MODE = "shared";
///     /// Proxy metadata.
///     ISTIO_META_PREFIX as "ISTIO_META_" = "";
/// }
/// ```
/// `as "…"` gives the constant a value other than its own name (a prefix family).
macro_rules! declare {
    ($table:ident: $( $(#[doc = $doc:literal])* $name:ident $(as $value:literal)? = $default:literal; )*) => {
        $(
            $(#[doc = $doc])*
            pub const $name: &str = $crate::config::vars::name_of!($($value)? ; $name);
        )*
        /// Every variable of this table, in declaration order (what `--help` prints).
        pub const $table: &[$crate::config::vars::Var] = &[
            $( $crate::config::vars::Var {
                name: $crate::config::vars::help_name!($($value)? ; $name),
                default: $default,
                help: concat!($($doc),*),
            }, )*
        ];
    };
}
pub(crate) use declare;

/// The constant's value: the given literal, else the identifier's own spelling.
macro_rules! name_of {
    ($value:literal ; $name:ident) => {
        $value
    };
    (; $name:ident) => {
        stringify!($name)
    };
}
pub(crate) use name_of;

/// The name shown in help: a prefix family shows as `PREFIX*`.
macro_rules! help_name {
    ($value:literal ; $name:ident) => {
        concat!($value, "*")
    };
    (; $name:ident) => {
        stringify!($name)
    };
}
pub(crate) use help_name;

/// The help text for `tables`: each titled section lists its variables, their defaults and meanings, the
/// meaning wrapped at 100 columns.
pub fn render(tables: &[(&str, &[Var])]) -> String {
    let mut out = String::new();
    for (title, vars) in tables {
        out.push_str(title);
        out.push_str(":\n");
        for v in *vars {
            out.push_str("  ");
            out.push_str(v.name);
            if !v.default.is_empty() {
                out.push_str(" (default ");
                out.push_str(v.default);
                out.push(')');
            }
            out.push('\n');
            let mut line = String::from("     ");
            for word in v.help.split_whitespace() {
                if line.len() + word.len() > 100 && !line.trim_start().is_empty() {
                    out.push_str(&line);
                    out.push('\n');
                    line = String::from("     ");
                }
                line.push(' ');
                line.push_str(word);
            }
            if !line.trim().is_empty() {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out.push('\n');
    }
    out
}

/// Test support: checks a role's table against what its config code really reads.
#[cfg(test)]
pub(crate) mod testing {
    use std::cell::RefCell;
    use std::collections::{BTreeSet, HashMap};

    use super::Var;
    use crate::config::Source;

    /// A [`Source`] that remembers every name asked for.
    struct Recording<'a> {
        inner: &'a dyn Source,
        asked: RefCell<BTreeSet<String>>,
    }

    impl Source for Recording<'_> {
        fn get(&self, key: &str) -> Option<String> {
            self.asked.borrow_mut().insert(key.to_string());
            self.inner.get(key)
        }
        fn all(&self) -> Vec<(String, String)> {
            self.inner.all()
        }
    }

    /// Builds the config once per scenario (each a set of variables) and checks that (1) every variable
    /// read is in `tables`, (2) every variable of `own` (prefix families aside) is read in some scenario,
    /// and (3) setting a variable of `own` to its documented default (a plain value, no spaces) builds
    /// the same config as the first scenario without it. `build` returns the config's `Debug` text.
    pub(crate) fn check(
        tables: &[&[Var]],
        own: &[Var],
        scenarios: &[&[(&str, &str)]],
        build: impl Fn(&dyn Source) -> String,
    ) {
        let known: BTreeSet<&str> = tables
            .iter()
            .flat_map(|t| t.iter().map(|v| v.name))
            .collect();
        let mut asked = BTreeSet::new();
        for scenario in scenarios {
            let map: HashMap<String, String> = scenario
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let rec = Recording {
                inner: &map,
                asked: RefCell::new(BTreeSet::new()),
            };
            let built = build(&rec);
            assert!(!built.starts_with("Err"), "scenario {scenario:?}: {built}");
            asked.extend(rec.asked.into_inner());
        }
        for name in &asked {
            assert!(
                known.contains(name.as_str()),
                "{name} is read but not in the help"
            );
        }
        for v in own.iter().filter(|v| !v.name.ends_with('*')) {
            assert!(
                asked.contains(v.name),
                "{} is in the help but never read",
                v.name
            );
        }
        let base: HashMap<String, String> = scenarios[0]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let unset = build(&base);
        for v in own
            .iter()
            .filter(|v| !v.default.is_empty() && !v.default.contains(' '))
        {
            if base.contains_key(v.name) {
                continue;
            }
            let mut with = base.clone();
            with.insert(v.name.to_string(), v.default.to_string());
            assert_eq!(
                build(&with),
                unset,
                "{}={} is not what unset means",
                v.name,
                v.default
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_each_variable_with_its_default_and_meaning() {
        let text = render(&[("Logging", crate::logging::LOGGING_VARS)]);
        assert!(
            text.starts_with("Logging:\n  RUST_LOG (default info)\n      Log filter:"),
            "{text}"
        );
        assert!(
            text.contains("  LOG_FORMAT (default plain)\n      `json` for one"),
            "{text}"
        );
        assert!(text.lines().all(|l| l.len() <= 110), "{text}");
    }
}
