//! Envoy's path normalization, for the caller to apply before routing and authorization.

use std::borrow::Cow;

/// Envoy's `normalize_path` (Istio's default path normalization, `BASE`): the path's dot segments
/// resolved as RFC 3986 §5.2.4 says, `%2e` counting as `.` in them; other bytes, empty segments (no
/// slash merging) and the query are left alone. `None` for a path that does not start with `/` (Envoy
/// answers 400). Borrowed when nothing changes. Apply it to the request before routing and authorizing,
/// and forward the result, as Envoy does.
pub fn normalize_path(path_and_query: &str) -> Option<Cow<'_, str>> {
    if !path_and_query.starts_with('/') {
        return None;
    }
    let end = path_and_query
        .find(['?', '#'])
        .unwrap_or(path_and_query.len());
    let (path, rest) = path_and_query.split_at(end);
    let is_dot = |s: &str| s == "." || s.eq_ignore_ascii_case("%2e");
    let is_dot_dot = |s: &str| {
        s.len() >= 2
            && matches!(
                s.to_ascii_lowercase().as_str(),
                ".." | ".%2e" | "%2e." | "%2e%2e"
            )
    };
    let segments: Vec<&str> = path[1..].split('/').collect();
    if !segments.iter().any(|s| is_dot(s) || is_dot_dot(s)) {
        return Some(Cow::Borrowed(path_and_query));
    }
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let last = segments.len() - 1;
    for (i, s) in segments.iter().enumerate() {
        if is_dot(s) || is_dot_dot(s) {
            if is_dot_dot(s) {
                out.pop();
            }
            // A trailing dot segment leaves the directory: `/a/b/..` → `/a/`.
            if i == last {
                out.push("");
            }
        } else {
            out.push(s);
        }
    }
    let mut normalized = String::with_capacity(path_and_query.len());
    for s in &out {
        normalized.push('/');
        normalized.push_str(s);
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    normalized.push_str(rest);
    Some(Cow::Owned(normalized))
}
