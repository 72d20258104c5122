//! The value forms of Istio's AuthorizationPolicy and how each field compares them.
//!
//! Input: policy strings as written (`"*"`, `"x*"`, `"*x"`, exact; path templates `{*}` / `{**}`) and
//! request values. Output: compiled [`Pattern`]s, [`PathPattern`]s and [`Peer`] identities, and `bool`s.
//! Nothing here allocates while matching.

/// One Istio string form, compiled. Istio turns `"*"` into "present" (Envoy `present_match` or the regex
/// `.+`), a leading `*` into a suffix match, a trailing `*` into a prefix match, anything else into an exact
/// match (`StringMatcherWithPrefix`, `HeaderMatcher`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Pattern {
    /// `*`: the value is there (for `.+` fields: there and non-empty, which the caller ensures by passing
    /// `None` for an empty value).
    Present,
    /// Equal.
    Exact(Box<[u8]>),
    /// Starts with.
    Prefix(Box<[u8]>),
    /// Ends with.
    Suffix(Box<[u8]>),
}

impl Pattern {
    /// Compiles one value. `lower` lower-cases it (for the case-insensitive `hosts`). `None` for an empty
    /// value, which Istio's validation refuses.
    pub(super) fn parse(value: &str, lower: bool) -> Option<Pattern> {
        if value.is_empty() {
            return None;
        }
        let bytes = |s: &str| -> Box<[u8]> {
            if lower {
                s.to_ascii_lowercase().into_bytes().into_boxed_slice()
            } else {
                s.as_bytes().into()
            }
        };
        Some(if value == "*" {
            Pattern::Present
        } else if let Some(rest) = value.strip_prefix('*') {
            Pattern::Suffix(bytes(rest))
        } else if let Some(rest) = value.strip_suffix('*') {
            Pattern::Prefix(bytes(rest))
        } else {
            Pattern::Exact(bytes(value))
        })
    }

    /// Whether `value` (`None`: absent) satisfies this pattern, byte for byte.
    pub(super) fn matches(&self, value: Option<&[u8]>) -> bool {
        let Some(v) = value else { return false };
        match self {
            Pattern::Present => true,
            Pattern::Exact(p) => v == &p[..],
            Pattern::Prefix(p) => v.starts_with(p),
            Pattern::Suffix(p) => v.ends_with(p),
        }
    }

    /// As [`Pattern::matches`], ignoring ASCII case (the pattern was compiled lower-case).
    pub(super) fn matches_ignore_case(&self, value: Option<&[u8]>) -> bool {
        let Some(v) = value else { return false };
        match self {
            Pattern::Present => true,
            Pattern::Exact(p) => v.eq_ignore_ascii_case(p),
            Pattern::Prefix(p) => v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p),
            Pattern::Suffix(p) => {
                v.len() >= p.len() && v[v.len() - p.len()..].eq_ignore_ascii_case(p)
            }
        }
    }

    /// Istio's `namespaces` / `source.namespace`: the regex `.*/ns/<value>/.*` on the peer's SPIFFE URI,
    /// where a `*` in the value stands for `.*`. Emulated without a regex engine on `uri`: some `/ns/`
    /// occurrence is followed by the value and then, somewhere later, a `/`.
    pub(super) fn matches_namespace_of(&self, uri: Option<&str>) -> bool {
        let Some(uri) = uri else { return false };
        let b = uri.as_bytes();
        let mut from = 0;
        while let Some(at) = find(&b[from..], b"/ns/") {
            let rest = &b[from + at + 4..];
            let hit = match self {
                // `.*/ns/.*/.*`
                Pattern::Present => rest.contains(&b'/'),
                // `.*/ns/foo/.*`
                Pattern::Exact(p) => rest.starts_with(p) && rest[p.len()..].starts_with(b"/"),
                // `.*/ns/foo.*/.*`
                Pattern::Prefix(p) => rest.starts_with(p) && rest[p.len()..].contains(&b'/'),
                // `.*/ns/.*foo/.*`
                Pattern::Suffix(p) => rest
                    .iter()
                    .enumerate()
                    .any(|(i, &c)| c == b'/' && rest[..i].ends_with(p)),
            };
            if hit {
                return true;
            }
            from += at + 1;
        }
        false
    }
}

/// Index of the first occurrence of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A `paths` entry: an Istio string form, or a path template (Istio ≥ 1.20: `{*}` one segment, `{**}`
/// the rest), which Istio hands to Envoy's `uri_template` matcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PathPattern {
    /// `*`, `x*`, `*x` or exact.
    Plain(Pattern),
    /// A template, as segments after the leading `/`.
    Template(Vec<Segment>),
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    /// Literal text, equal to the whole segment.
    Literal(Box<str>),
    /// `{*}`: one non-empty segment of path characters.
    One,
    /// `<prefix>{**}`, last: the prefix, then zero or more path characters or `/`.
    Rest(Box<str>),
}

/// Characters a template operator may match (RFC 3986 `pchar` minus `*`, as Envoy's `uri_template`
/// and Istio's validation use).
fn is_pchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&c)
}

/// Why a path template is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TemplateError {
    /// Not starting with `/`.
    NotAbsolute,
    /// `{**}` not in the last segment, or an operator inside a segment other than `x{**}`.
    Misplaced,
}

impl PathPattern {
    /// Compiles a `paths` value (non-empty).
    pub(super) fn parse(value: &str) -> Result<Option<PathPattern>, TemplateError> {
        if !(value.contains("{*}") || value.contains("{**}")) {
            return Ok(Pattern::parse(value, false).map(PathPattern::Plain));
        }
        let Some(rest) = value.strip_prefix('/') else {
            return Err(TemplateError::NotAbsolute);
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let segment = if *part == "{*}" {
                Segment::One
            } else if let Some(prefix) = part.strip_suffix("{**}") {
                if !last || prefix.contains(['{', '}']) {
                    return Err(TemplateError::Misplaced);
                }
                Segment::Rest(prefix.into())
            } else if part.contains(['{', '}']) {
                return Err(TemplateError::Misplaced);
            } else {
                Segment::Literal((*part).into())
            };
            segments.push(segment);
        }
        Ok(Some(PathPattern::Template(segments)))
    }

    /// Whether `path` (without query) matches.
    pub(super) fn matches(&self, path: &str) -> bool {
        match self {
            // Envoy's PathMatcher: `*` is the regex `.+`, so an empty path does not match it.
            PathPattern::Plain(p) => p.matches((!path.is_empty()).then_some(path.as_bytes())),
            PathPattern::Template(segments) => template_matches(segments, path),
        }
    }
}

fn template_matches(segments: &[Segment], path: &str) -> bool {
    let Some(mut rest) = path.strip_prefix('/') else {
        return false;
    };
    for (i, segment) in segments.iter().enumerate() {
        if i > 0 {
            // Every segment after the first is preceded by a `/`.
            match rest.strip_prefix('/') {
                Some(r) => rest = r,
                None => return false,
            }
        }
        match segment {
            Segment::Rest(prefix) => {
                return rest
                    .strip_prefix(&**prefix)
                    .is_some_and(|tail| tail.bytes().all(|c| c == b'/' || is_pchar(c)));
            }
            Segment::Literal(lit) => {
                let (head, tail) = split_segment(rest);
                if head != &**lit {
                    return false;
                }
                rest = tail;
            }
            Segment::One => {
                let (head, tail) = split_segment(rest);
                if head.is_empty() || !head.bytes().all(is_pchar) {
                    return false;
                }
                rest = tail;
            }
        }
    }
    rest.is_empty()
}

/// `("a", "/b/c")` from `"a/b/c"`.
fn split_segment(s: &str) -> (&str, &str) {
    match s.find('/') {
        Some(i) => s.split_at(i),
        None => (s, ""),
    }
}

/// The client identity, parsed once per request from its SPIFFE URI. A URI that is not `spiffe://…`
/// counts as no identity.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Peer<'a> {
    /// The whole URI (`spiffe://td/ns/x/sa/y`).
    pub(super) uri: Option<&'a str>,
    /// Without `spiffe://`, as policies write principals.
    pub(super) principal: Option<&'a str>,
    /// Namespace and service account of a standard `td/ns/<ns>/sa/<sa>` identity.
    pub(super) namespace_and_account: Option<(&'a str, &'a str)>,
}

impl<'a> Peer<'a> {
    pub(super) fn parse(uri: Option<&'a str>) -> Peer<'a> {
        let Some(principal) = uri
            .and_then(|u| u.strip_prefix("spiffe://"))
            .filter(|p| !p.is_empty())
        else {
            return Peer::default();
        };
        let mut parts = principal.split('/');
        let namespace_and_account = match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(_td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        };
        Peer {
            uri,
            principal: Some(principal),
            namespace_and_account,
        }
    }
}
