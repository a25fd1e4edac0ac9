//! The fleet filter language: which twins a query or a subscription is about.
//!
//! ```text
//! reported.temp > 30 AND attributes.site = "plant-7" AND connected = true
//! NOT (desired.mode IN ("eco", "off") OR delta.firmware EXISTS)
//! shadows.firmware.reported.version >= 2 AND id != "bench-1"
//! telemetry.temp > 30 AND telemetry.gps.lat < 48.5
//! ```
//!
//! Grammar (keywords in any case; `OR` binds weakest, then `AND`, then `NOT`):
//!
//! ```text
//! filter     := or
//! or         := and ("OR" and)*
//! and        := not ("AND" not)*
//! not        := "NOT" not | "(" or ")" | predicate
//! predicate  := field ( op value | "IN" "(" value ("," value)* ")" | "EXISTS" )
//! op         := "=" | "!=" | "<" | "<=" | ">" | ">="
//! value      := JSON string | JSON number | true | false
//! field      := "id" | "connected" | "attributes" path | "telemetry" path
//!             | section path                           (the classic shadow)
//!             | "shadows" "." name ["." section path]  (a named shadow)
//! section    := "desired" | "reported" | "delta"
//! path       := ("." segment)*      segment: [A-Za-z0-9_:-]+ or a JSON string
//! ```
//!
//! Semantics: a comparison with a field that is missing is false (so is `!=`; use
//! `NOT (f = v)` to include twins without the field). Numbers compare as numbers,
//! strings by code point; values of different types are not equal and not ordered. A
//! comparison with an array field holds if it holds for one of its elements (`!=`: for
//! none). `EXISTS` holds for any present value, objects included.
//!
//! [`Filter`]'s `Display` prints a filter that parses back to the same filter.
//!
//! Over 600 lines: the filter language's grammar, parser and evaluator are one unit (660 lines,
//! each part written against the others), followed by its unit tests.

use std::fmt;

use serde_json::{Map, Value};

use crate::id::ShadowName;

/// Longest filter accepted, in characters.
pub const MAX_FILTER_LEN: usize = 4096;
/// Deepest nesting of `NOT` and parentheses accepted.
pub const MAX_FILTER_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    Compare {
        field: Field,
        op: CmpOp,
        value: Literal,
    },
    In {
        field: Field,
        values: Vec<Literal>,
    },
    Exists(Field),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Field {
    Id,
    Connected,
    Attributes(Vec<String>),
    /// A key of the thing's latest telemetry (`telemetry.gps.lat`: the key `gps.lat`).
    Telemetry(Vec<String>),
    /// A path into a section of a shadow (the classic one or a named one).
    Shadow {
        shadow: ShadowName,
        section: Section,
        path: Vec<String>,
    },
    /// A named shadow itself (for `EXISTS`).
    NamedShadow(ShadowName),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Section {
    Desired,
    Reported,
    Delta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    String(String),
    Number(f64),
    Bool(bool),
}

/// A malformed filter. `position` is the 1-based character column of the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid filter at position {position}: {message}")]
pub struct FilterError {
    pub position: usize,
    pub message: String,
}

/// What a filter reads from a twin.
pub trait FilterTarget {
    fn id(&self) -> &str;
    fn connected(&self) -> bool;
    fn attributes(&self) -> Option<&Map<String, Value>>;
    /// Whether the shadow exists.
    fn has_shadow(&self, shadow: &ShadowName) -> bool;
    /// A section (`desired`, `reported` or the computed `delta`) of an existing shadow.
    fn section(&self, shadow: &ShadowName, section: Section) -> Option<&Map<String, Value>>;
    /// The latest telemetry values, nested by their dotted keys.
    fn telemetry(&self) -> Option<&Map<String, Value>> {
        None
    }
}

impl Section {
    fn name(self) -> &'static str {
        match self {
            Self::Desired => "desired",
            Self::Reported => "reported",
            Self::Delta => "delta",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        match word {
            "desired" => Some(Self::Desired),
            "reported" => Some(Self::Reported),
            "delta" => Some(Self::Delta),
            _ => None,
        }
    }
}

impl CmpOp {
    fn symbol(self) -> &'static str {
        match self {
            Self::Eq => "=",
            Self::Ne => "!=",
            Self::Lt => "<",
            Self::Le => "<=",
            Self::Gt => ">",
            Self::Ge => ">=",
        }
    }
}

/// A field's value as found on a twin.
enum Found<'a> {
    Json(&'a Value),
    Bool(bool),
    Str(&'a str),
    /// Present but not comparable (a shadow, a section, the attributes).
    Present,
}

fn walk<'a>(map: &'a Map<String, Value>, path: &[String]) -> Option<Found<'a>> {
    let Some((first, rest)) = path.split_first() else {
        return Some(Found::Present);
    };
    let mut value = map.get(first)?;
    for seg in rest {
        value = value.as_object()?.get(seg)?;
    }
    Some(Found::Json(value))
}

impl Field {
    fn find<'a>(&self, t: &'a impl FilterTarget) -> Option<Found<'a>> {
        match self {
            Self::Id => Some(Found::Str(t.id())),
            Self::Connected => Some(Found::Bool(t.connected())),
            Self::Attributes(path) => walk(t.attributes()?, path),
            Self::Telemetry(path) => walk(t.telemetry()?, path),
            Self::NamedShadow(shadow) => t.has_shadow(shadow).then_some(Found::Present),
            Self::Shadow {
                shadow,
                section,
                path,
            } => walk(t.section(shadow, *section)?, path),
        }
    }
}

impl Literal {
    /// `self` compared with a scalar JSON value, if they are comparable.
    fn cmp_json(&self, v: &Value) -> Option<std::cmp::Ordering> {
        match (self, v) {
            (Self::Number(a), Value::Number(b)) => b.as_f64()?.partial_cmp(a),
            (Self::String(a), Value::String(b)) => Some(b.as_str().cmp(a)),
            (Self::Bool(a), Value::Bool(b)) => Some(b.cmp(a)),
            _ => None,
        }
    }
}

fn holds(op: CmpOp, ord: Option<std::cmp::Ordering>) -> bool {
    use std::cmp::Ordering::*;
    matches!(
        (op, ord),
        (CmpOp::Eq | CmpOp::Le | CmpOp::Ge, Some(Equal))
            | (CmpOp::Lt | CmpOp::Le, Some(Less))
            | (CmpOp::Gt | CmpOp::Ge, Some(Greater))
    )
}

/// `found op literal`, where `op` is not `!=`; arrays match by any element.
fn compare(found: &Found<'_>, op: CmpOp, lit: &Literal) -> bool {
    match found {
        Found::Json(Value::Array(items)) => items.iter().any(|v| holds(op, lit.cmp_json(v))),
        Found::Json(v) => holds(op, lit.cmp_json(v)),
        Found::Bool(b) => holds(op, lit.cmp_json(&Value::Bool(*b))),
        Found::Str(s) => match lit {
            Literal::String(l) => holds(op, Some((*s).cmp(l.as_str()))),
            _ => false,
        },
        Found::Present => false,
    }
}

impl Filter {
    pub fn parse(input: &str) -> Result<Self, FilterError> {
        let chars: Vec<char> = input.chars().collect();
        if chars.len() > MAX_FILTER_LEN {
            return Err(FilterError {
                position: MAX_FILTER_LEN + 1,
                message: format!("the filter is longer than {MAX_FILTER_LEN} characters"),
            });
        }
        let mut p = Parser {
            chars,
            pos: 0,
            depth: 0,
        };
        let filter = p.or()?;
        p.skip_ws();
        if p.pos < p.chars.len() {
            return Err(p.error("expected AND, OR or the end of the filter"));
        }
        Ok(filter)
    }

    pub fn matches(&self, t: &impl FilterTarget) -> bool {
        match self {
            Self::And(a, b) => a.matches(t) && b.matches(t),
            Self::Or(a, b) => a.matches(t) || b.matches(t),
            Self::Not(a) => !a.matches(t),
            Self::Exists(field) => field.find(t).is_some(),
            Self::Compare {
                field,
                op: CmpOp::Ne,
                value,
            } => field
                .find(t)
                .is_some_and(|f| !matches!(f, Found::Present) && !compare(&f, CmpOp::Eq, value)),
            Self::Compare { field, op, value } => {
                field.find(t).is_some_and(|f| compare(&f, *op, value))
            }
            Self::In { field, values } => field
                .find(t)
                .is_some_and(|f| values.iter().any(|v| compare(&f, CmpOp::Eq, v))),
        }
    }

    fn precedence(&self) -> u8 {
        match self {
            Self::Or(..) => 1,
            Self::And(..) => 2,
            Self::Not(_) => 3,
            _ => 4,
        }
    }
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    depth: usize,
}

fn is_bare(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-')
}

impl Parser {
    fn error(&self, message: impl Into<String>) -> FilterError {
        FilterError {
            position: self.pos + 1,
            message: message.into(),
        }
    }

    fn skip_ws(&mut self) {
        while self.chars.get(self.pos).is_some_and(|c| c.is_whitespace()) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_ws();
        self.chars.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// The bare word at the cursor, without consuming it.
    fn word(&mut self) -> String {
        self.skip_ws();
        self.chars[self.pos..]
            .iter()
            .take_while(|c| is_bare(**c))
            .collect()
    }

    /// Consumes `keyword` (any case) if it is the next word.
    fn keyword(&mut self, keyword: &str) -> bool {
        let w = self.word();
        if w.eq_ignore_ascii_case(keyword) {
            self.pos += w.chars().count();
            true
        } else {
            false
        }
    }

    fn nest(&mut self) -> Result<(), FilterError> {
        self.depth += 1;
        if self.depth > MAX_FILTER_DEPTH {
            return Err(self.error(format!(
                "the filter nests deeper than {MAX_FILTER_DEPTH} levels"
            )));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.and()?;
        while self.keyword("OR") {
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.not()?;
        while self.keyword("AND") {
            left = Filter::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Filter, FilterError> {
        if self.keyword("NOT") {
            self.nest()?;
            let inner = self.not()?;
            self.depth -= 1;
            return Ok(Filter::Not(Box::new(inner)));
        }
        if self.eat('(') {
            self.nest()?;
            let inner = self.or()?;
            if !self.eat(')') {
                return Err(self.error("expected ')'"));
            }
            self.depth -= 1;
            return Ok(inner);
        }
        self.predicate()
    }

    fn predicate(&mut self) -> Result<Filter, FilterError> {
        let field = self.field()?;
        if self.keyword("EXISTS") {
            return Ok(Filter::Exists(field));
        }
        if self.keyword("IN") {
            if !self.eat('(') {
                return Err(self.error("expected '(' after IN"));
            }
            let mut values = vec![self.literal()?];
            while self.eat(',') {
                values.push(self.literal()?);
            }
            if !self.eat(')') {
                return Err(self.error("expected ',' or ')' in the IN list"));
            }
            return Ok(Filter::In { field, values });
        }
        let op = self.op()?;
        let value = self.literal()?;
        Ok(Filter::Compare { field, op, value })
    }

    fn op(&mut self) -> Result<CmpOp, FilterError> {
        let c = self.peek();
        let next = self.chars.get(self.pos + 1).copied();
        let (op, len) = match (c, next) {
            (Some('!'), Some('=')) => (CmpOp::Ne, 2),
            (Some('<'), Some('=')) => (CmpOp::Le, 2),
            (Some('>'), Some('=')) => (CmpOp::Ge, 2),
            (Some('='), _) => (CmpOp::Eq, 1),
            (Some('<'), _) => (CmpOp::Lt, 1),
            (Some('>'), _) => (CmpOp::Gt, 1),
            _ => {
                return Err(self
                    .error("expected an operator (= != < <= > >=), IN or EXISTS after the field"));
            }
        };
        self.pos += len;
        Ok(op)
    }

    fn field(&mut self) -> Result<Field, FilterError> {
        let start = self.pos;
        let root = self.word();
        if root.is_empty() {
            return Err(self.error("expected a field (id, connected, attributes.*, telemetry.*, desired.*, reported.*, delta.* or shadows.*) or '(' or NOT"));
        }
        self.pos += root.chars().count();
        let field = match root.as_str() {
            "id" => Field::Id,
            "connected" => Field::Connected,
            "attributes" => Field::Attributes(self.path()?),
            "telemetry" => Field::Telemetry(self.path()?),
            "shadows" => {
                if !self.eat_dot() {
                    return Err(self.error("expected '.' and a shadow name after 'shadows'"));
                }
                let name_at = self.pos;
                let name = self.segment()?;
                let shadow = ShadowName::named(&name).map_err(|e| FilterError {
                    position: name_at + 1,
                    message: e.to_string(),
                })?;
                if self.eat_dot() {
                    let section_at = self.pos;
                    let word = self.word();
                    let section = Section::parse(&word).ok_or(FilterError {
                        position: section_at + 1,
                        message: "expected desired, reported or delta".into(),
                    })?;
                    self.pos += word.chars().count();
                    Field::Shadow {
                        shadow,
                        section,
                        path: self.path()?,
                    }
                } else {
                    Field::NamedShadow(shadow)
                }
            }
            other => match Section::parse(other) {
                Some(section) => Field::Shadow {
                    shadow: ShadowName::classic(),
                    section,
                    path: self.path()?,
                },
                None => {
                    self.pos = start;
                    self.skip_ws();
                    return Err(self.error(format!(
                        "unknown field {other:?}; fields start with id, connected, attributes, telemetry, desired, reported, delta or shadows"
                    )));
                }
            },
        };
        Ok(field)
    }

    /// A dot directly after the previous part (no spaces inside a field).
    fn eat_dot(&mut self) -> bool {
        if self.chars.get(self.pos) == Some(&'.') {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn path(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = Vec::new();
        while self.eat_dot() {
            path.push(self.segment()?);
        }
        Ok(path)
    }

    fn segment(&mut self) -> Result<String, FilterError> {
        if self.chars.get(self.pos) == Some(&'"') {
            return self.string();
        }
        let seg: String = self.chars[self.pos..]
            .iter()
            .take_while(|c| is_bare(**c))
            .collect();
        if seg.is_empty() {
            return Err(self.error("expected a name after '.' (quote names with other characters)"));
        }
        self.pos += seg.chars().count();
        Ok(seg)
    }

    /// A JSON string at the cursor.
    fn string(&mut self) -> Result<String, FilterError> {
        let start = self.pos;
        let mut i = start + 1;
        loop {
            match self.chars.get(i) {
                None => return Err(self.error("unterminated string")),
                Some('\\') => i += 2,
                Some('"') => break,
                Some(_) => i += 1,
            }
        }
        let text: String = self.chars[start..=i].iter().collect();
        let s = serde_json::from_str(&text).map_err(|e| FilterError {
            position: start + 1,
            message: format!("invalid string: {e}"),
        })?;
        self.pos = i + 1;
        Ok(s)
    }

    fn literal(&mut self) -> Result<Literal, FilterError> {
        match self.peek() {
            Some('"') => self.string().map(Literal::String),
            Some(c) if c == '-' || c.is_ascii_digit() => self.number(),
            _ if self.keyword("true") => Ok(Literal::Bool(true)),
            _ if self.keyword("false") => Ok(Literal::Bool(false)),
            _ => Err(self.error("expected a value: a \"string\", a number, true or false")),
        }
    }

    fn number(&mut self) -> Result<Literal, FilterError> {
        let start = self.pos;
        let text: String = self.chars[start..]
            .iter()
            .take_while(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'))
            .collect();
        match text.parse::<f64>() {
            Ok(n) if n.is_finite() && text.bytes().any(|b| b.is_ascii_digit()) => {
                self.pos += text.len();
                Ok(Literal::Number(n))
            }
            _ => Err(self.error(format!("invalid number {text:?}"))),
        }
    }
}

/// Appends `.segment` to a field's printed path, quoted where it must be.
pub fn push_segment(out: &mut String, seg: &str) {
    out.push('.');
    if !seg.is_empty() && seg.chars().all(is_bare) {
        out.push_str(seg);
    } else {
        out.push_str(&Value::String(seg.to_owned()).to_string());
    }
}

fn write_segment(f: &mut fmt::Formatter<'_>, seg: &str) -> fmt::Result {
    let mut s = String::new();
    push_segment(&mut s, seg);
    f.write_str(&s)
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = match self {
            Self::Id => return f.write_str("id"),
            Self::Connected => return f.write_str("connected"),
            Self::Attributes(path) => {
                f.write_str("attributes")?;
                path
            }
            Self::Telemetry(path) => {
                f.write_str("telemetry")?;
                path
            }
            Self::NamedShadow(shadow) => {
                f.write_str("shadows")?;
                return write_segment(f, shadow.key());
            }
            Self::Shadow {
                shadow,
                section,
                path,
            } => {
                if let Some(name) = shadow.name() {
                    f.write_str("shadows")?;
                    write_segment(f, name)?;
                    f.write_str(".")?;
                }
                f.write_str(section.name())?;
                path
            }
        };
        path.iter().try_for_each(|seg| write_segment(f, seg))
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::String(s) => write!(f, "{}", Value::String(s.clone())),
            Self::Number(n) => write!(f, "{n}"),
            Self::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl Filter {
    fn fmt_at(&self, f: &mut fmt::Formatter<'_>, min: u8) -> fmt::Result {
        let parens = self.precedence() < min;
        if parens {
            f.write_str("(")?;
        }
        match self {
            Self::Or(a, b) => {
                a.fmt_at(f, 1)?;
                f.write_str(" OR ")?;
                b.fmt_at(f, 2)?;
            }
            Self::And(a, b) => {
                a.fmt_at(f, 2)?;
                f.write_str(" AND ")?;
                b.fmt_at(f, 3)?;
            }
            Self::Not(a) => {
                f.write_str("NOT ")?;
                a.fmt_at(f, 3)?;
            }
            Self::Compare { field, op, value } => write!(f, "{field} {} {value}", op.symbol())?,
            Self::In { field, values } => {
                write!(f, "{field} IN (")?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str(")")?;
            }
            Self::Exists(field) => write!(f, "{field} EXISTS")?,
        }
        if parens {
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_at(f, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Twin {
        id: &'static str,
        connected: bool,
        attributes: Map<String, Value>,
        reported: Map<String, Value>,
        desired: Map<String, Value>,
        named: Option<(ShadowName, Map<String, Value>)>,
        telemetry: Map<String, Value>,
    }

    impl FilterTarget for Twin {
        fn id(&self) -> &str {
            self.id
        }
        fn connected(&self) -> bool {
            self.connected
        }
        fn attributes(&self) -> Option<&Map<String, Value>> {
            Some(&self.attributes)
        }
        fn telemetry(&self) -> Option<&Map<String, Value>> {
            Some(&self.telemetry)
        }
        fn has_shadow(&self, shadow: &ShadowName) -> bool {
            shadow.name().is_none() || self.named.as_ref().is_some_and(|(n, _)| n == shadow)
        }
        fn section(&self, shadow: &ShadowName, section: Section) -> Option<&Map<String, Value>> {
            if shadow.name().is_some() {
                return self
                    .named
                    .as_ref()
                    .filter(|(n, _)| n == shadow)
                    .map(|(_, v)| v)
                    .filter(|_| section == Section::Reported);
            }
            match section {
                Section::Desired => Some(&self.desired),
                Section::Reported => Some(&self.reported),
                Section::Delta => None,
            }
        }
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn twin() -> Twin {
        Twin {
            id: "press-7",
            connected: true,
            attributes: map(json!({"site": "plant-7", "line": 3})),
            reported: map(json!({"temp": 31.5, "tags": ["hot", "old"], "fw": {"v": "1.2"}})),
            desired: map(json!({"mode": "eco"})),
            named: Some((
                ShadowName::named("firmware").unwrap(),
                map(json!({"version": 2})),
            )),
            telemetry: map(json!({"temp": 41.5, "gps": {"lat": 48.1}})),
        }
    }

    fn check(filter: &str) -> bool {
        Filter::parse(filter)
            .unwrap_or_else(|e| panic!("{filter}: {e}"))
            .matches(&twin())
    }

    #[test]
    fn the_issue_example_matches() {
        assert!(check(
            r#"reported.temp > 30 AND attributes.site = "plant-7" AND connected = true"#
        ));
        assert!(!check(
            r#"reported.temp > 32 AND attributes.site = "plant-7" AND connected = true"#
        ));
    }

    #[test]
    fn operators_compare_by_type() {
        for (filter, expected) in [
            ("reported.temp >= 31.5", true),
            ("reported.temp < 31.5", false),
            ("reported.temp <= 31.5", true),
            ("reported.temp != 31.5", false),
            ("reported.temp = \"31.5\"", false),
            ("reported.temp != \"31.5\"", true),
            ("reported.missing != 1", false),
            ("NOT reported.missing = 1", true),
            ("id = \"press-7\"", true),
            ("id > \"press\"", true),
            ("connected = false", false),
            ("attributes.line IN (1, 2, 3)", true),
            ("desired.mode in (\"off\")", false),
            ("reported.fw EXISTS", true),
            ("attributes EXISTS", true),
            ("attributes = 1", false),
            ("reported.fw.v = \"1.2\"", true),
            ("delta.mode EXISTS", false),
            ("reported.tags = \"old\"", true),
            ("reported.tags != \"old\"", false),
            ("reported.tags != \"new\"", true),
            ("shadows.firmware EXISTS", true),
            ("shadows.other EXISTS", false),
            ("shadows.firmware.reported.version = 2", true),
            (
                "reported.temp > 30 OR reported.temp < 0 AND connected = false",
                true,
            ),
            (
                "(reported.temp > 30 OR reported.temp < 0) AND connected = false",
                false,
            ),
            ("not not connected = true", true),
            ("telemetry.temp > 30", true),
            ("telemetry.temp > 42", false),
            ("telemetry.gps.lat < 48.5", true),
            ("telemetry.hum EXISTS", false),
        ] {
            assert_eq!(check(filter), expected, "{filter}");
        }
    }

    #[test]
    fn errors_say_where() {
        for (filter, position, needle) in [
            ("reported.temp >", 16, "expected a value"),
            ("reported.temp 30", 15, "expected an operator"),
            ("colour = 1", 1, "unknown field"),
            ("(connected = true", 18, "expected ')'"),
            ("id = \"x\" AND", 13, "expected a field"),
            ("id = \"x\" junk", 10, "expected AND, OR"),
            ("reported. = 1", 10, "expected a name"),
            ("id IN (1, 2", 12, "expected ',' or ')'"),
            ("id = \"open", 6, "unterminated string"),
            ("id = 1e999", 6, "invalid number"),
            ("shadows.b@d EXISTS", 10, "expected an operator"),
        ] {
            let err = Filter::parse(filter).expect_err(filter);
            assert_eq!(err.position, position, "{filter}: {err}");
            assert!(err.message.contains(needle), "{filter}: {err}");
        }
        let deep = format!("{}connected = true{}", "(".repeat(40), ")".repeat(40));
        assert!(
            Filter::parse(&deep)
                .unwrap_err()
                .message
                .contains("nests deeper")
        );
        let long = format!("id = \"{}\"", "x".repeat(MAX_FILTER_LEN));
        assert!(
            Filter::parse(&long)
                .unwrap_err()
                .message
                .contains("longer than")
        );
    }

    #[test]
    fn prints_a_filter_that_parses_back() {
        for filter in [
            r#"reported.temp > 30 AND attributes.site = "plant-7" AND connected = true"#,
            r#"NOT (desired.mode IN ("eco", "off") OR delta.firmware EXISTS)"#,
            r#"connected = true AND (id = "a" AND id = "b")"#,
            r#"reported."odd key"."" = "\"q\"" OR shadows."fw.v2".desired EXISTS"#,
        ] {
            let parsed = Filter::parse(filter).unwrap();
            let printed = parsed.to_string();
            assert_eq!(
                Filter::parse(&printed).unwrap(),
                parsed,
                "{filter} -> {printed}"
            );
        }
        let f = Filter::parse("connected = true AND (id = \"a\" AND id = \"b\")").unwrap();
        assert_eq!(
            f.to_string(),
            "connected = true AND (id = \"a\" AND id = \"b\")"
        );
    }
}
