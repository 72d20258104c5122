//! ztunnel's two log shapes, as tracing-subscriber event and field formatters.
//!
//! Input: tracing events (and the fields of the spans around them). Output: one line per event.
//! - [`Text`]: `time<TAB>level<TAB>scope<TAB>message<TAB>key=value key=value`. The time is RFC 3339 UTC
//!   with microseconds, the level lower case (`info`, `warn`), the scope the event's target without the
//!   `meshnode::` prefix, followed by `:span{fields}` for each span it is in, outermost first. Values are
//!   written as `Debug` shows them: strings quoted and escaped (`src.workload="web-1"`), numbers, and
//!   `%`-captured values (addresses) bare. The message ends with a tab; a line with no field at all ends
//!   right after the scope. Fields named `log.*` (the `log` crate's metadata) are left out.
//! - [`Json`]: one flat object per line, `level`, `time`, `scope` (the full target, as ztunnel writes it),
//!   then every field at the top level under its own name (`"src.addr"`, `"message"`), numbers and booleans
//!   as JSON numbers and booleans, everything else as a string; a span's fields as an object under the
//!   span's name.
//!
//! Neither allocates per event beyond what tracing-subscriber's own buffer does: values are written
//! straight into the line, JSON strings through an escaping adapter.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Left off the start of targets in the text shape, as ztunnel leaves off `ztunnel::`.
const CRATE_PREFIX: &str = "meshnode::";

/// The plain text shape (`LOG_FORMAT` unset or anything but `json`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Text;

/// The JSON shape (`LOG_FORMAT=json`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// Writes the fields of an event or span in the text shape.
struct TextFields<'w> {
    out: Writer<'w>,
    /// No `key=value` written yet (the first one gets no leading space).
    first: bool,
    res: fmt::Result,
}

impl TextFields<'_> {
    fn message(&mut self, message: fmt::Arguments<'_>) {
        if self.res.is_ok() {
            self.res = write!(self.out, "{message}\t");
        }
    }

    fn pair(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.res.is_err() || field.name().starts_with("log.") {
            return;
        }
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.res = write!(self.out, "{sep}{}={value:?}", field.name());
    }
}

impl Visit for TextFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message(format_args!("{value}"));
        } else {
            self.pair(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message(format_args!("{value:?}"));
        } else {
            self.pair(field, value);
        }
    }
}

impl<'w> FormatFields<'w> for Text {
    fn format_fields<R: RecordFields>(&self, out: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = TextFields {
            out,
            first: true,
            res: Ok(()),
        };
        fields.record(&mut v);
        v.res
    }
}

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut out: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        SystemTime.format_time(&mut out)?;
        write!(out, "\t{}\t", level_name(meta.level()))?;
        let target = meta.target();
        out.write_str(target.strip_prefix(CRATE_PREFIX).unwrap_or(target))?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(out, ":{}", span.name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(out, "{{{fields}}}")?;
                    }
                }
            }
        }
        if event.fields().next().is_some() {
            out.write_char('\t')?;
        }
        ctx.format_fields(out.by_ref(), event)?;
        writeln!(out)
    }
}

/// A `fmt::Write` that escapes what goes through it as the inside of a JSON string.
struct Escaped<'a, W: fmt::Write + ?Sized>(&'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut clean = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[clean..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            clean = i + 1;
        }
        self.0.write_str(&s[clean..])
    }
}

/// Writes fields as `"name":value` members of a JSON object (the braces are the caller's).
struct JsonFields<'a, 'w> {
    out: &'a mut Writer<'w>,
    /// No member written yet by this visitor and none before it (no leading comma).
    first: bool,
    res: fmt::Result,
}

impl JsonFields<'_, '_> {
    /// The member's name and colon; the value follows.
    fn key(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.out.write_char(',')?;
        }
        self.out.write_char('"')?;
        Escaped(&mut *self.out).write_str(field.name())?;
        self.out.write_str("\":")
    }

    fn raw(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.res.is_ok() {
            self.res = self.key(field).and_then(|()| self.out.write_fmt(value));
        }
    }

    fn string(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.res.is_ok() {
            self.res = self.key(field).and_then(|()| {
                self.out.write_char('"')?;
                Escaped(&mut *self.out).write_fmt(value)?;
                self.out.write_char('"')
            });
        }
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.raw(field, format_args!("{value}"));
        } else {
            self.raw(field, format_args!("null"));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.string(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.string(field, format_args!("{value:?}"));
    }
}

impl<'w> FormatFields<'w> for Json {
    /// A span's fields, as a JSON object (stored with the span, written into each event inside it).
    fn format_fields<R: RecordFields>(&self, mut out: Writer<'w>, fields: R) -> fmt::Result {
        out.write_char('{')?;
        let mut v = JsonFields {
            out: &mut out,
            first: true,
            res: Ok(()),
        };
        fields.record(&mut v);
        v.res?;
        out.write_char('}')
    }
}

impl<S, N> FormatEvent<S, N> for Json
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut out: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        write!(
            out,
            "{{\"level\":\"{}\",\"time\":\"",
            level_name(meta.level())
        )?;
        SystemTime.format_time(&mut out)?;
        out.write_str("\",\"scope\":\"")?;
        Escaped(&mut out).write_str(meta.target())?;
        out.write_char('"')?;
        let mut v = JsonFields {
            out: &mut out,
            first: false,
            res: Ok(()),
        };
        event.record(&mut v);
        v.res?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let fields = ext
                    .get::<FormattedFields<N>>()
                    .map_or("{}", |f| f.fields.as_str());
                out.write_str(",\"")?;
                Escaped(&mut out).write_str(span.name())?;
                write!(out, "\":{}", if fields.is_empty() { "{}" } else { fields })?;
            }
        }
        out.write_str("}\n")
    }
}
