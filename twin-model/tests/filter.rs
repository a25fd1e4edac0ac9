//! Properties of the fleet filter language that must hold for any input.

use proptest::prelude::*;
use twin_model::ShadowName;
use twin_model::filter::{CmpOp, Field, Filter, Literal, Section};

fn segment() -> impl Strategy<Value = String> {
    // Bare names, and names that must be quoted (spaces, dots, quotes, unicode, empty).
    prop_oneof!["[a-z_][a-z0-9_:-]{0,6}", "[0-9]{1,3}", ".{0,6}"]
}

fn path() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(segment(), 0..3)
}

fn field() -> impl Strategy<Value = Field> {
    let shadow = prop_oneof![
        Just(ShadowName::classic()),
        "[A-Za-z0-9:_.-]{1,10}".prop_map(|n| ShadowName::named(&n).unwrap()),
    ];
    let section = prop_oneof![
        Just(Section::Desired),
        Just(Section::Reported),
        Just(Section::Delta)
    ];
    prop_oneof![
        Just(Field::Id),
        Just(Field::Connected),
        path().prop_map(Field::Attributes),
        (shadow, section, path()).prop_map(|(shadow, section, path)| Field::Shadow {
            shadow,
            section,
            path
        }),
        "[A-Za-z0-9:_.-]{1,10}".prop_map(|n| Field::NamedShadow(ShadowName::named(&n).unwrap())),
    ]
}

fn literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        ".{0,8}".prop_map(Literal::String),
        (-1e9f64..1e9).prop_map(Literal::Number),
        (-1000i64..1000).prop_map(|n| Literal::Number(n as f64)),
        any::<bool>().prop_map(Literal::Bool),
    ]
}

fn op() -> impl Strategy<Value = CmpOp> {
    prop_oneof![
        Just(CmpOp::Eq),
        Just(CmpOp::Ne),
        Just(CmpOp::Lt),
        Just(CmpOp::Le),
        Just(CmpOp::Gt),
        Just(CmpOp::Ge),
    ]
}

fn filter() -> impl Strategy<Value = Filter> {
    let leaf = prop_oneof![
        (field(), op(), literal()).prop_map(|(field, op, value)| Filter::Compare {
            field,
            op,
            value
        }),
        (field(), prop::collection::vec(literal(), 1..4))
            .prop_map(|(field, values)| Filter::In { field, values }),
        field().prop_map(Filter::Exists),
    ];
    leaf.prop_recursive(5, 24, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Filter::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Filter::Or(Box::new(a), Box::new(b))),
            inner.prop_map(|a| Filter::Not(Box::new(a))),
        ]
    })
}

/// Text that looks like filters: keywords, fields, operators and values in any order.
fn filterish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("AND "),
        Just("or "),
        Just("NOT "),
        Just("("),
        Just(")"),
        Just("reported.temp"),
        Just("shadows.fw.delta.a"),
        Just("attributes.\"x"),
        Just("connected"),
        Just("id"),
        Just(" = "),
        Just("!="),
        Just("<="),
        Just(">"),
        Just(" IN ("),
        Just(","),
        Just(" EXISTS"),
        Just("\"s\\u12\""),
        Just("-1.5e3"),
        Just("1e"),
        Just("true"),
        Just("."),
        Just("é"),
    ];
    prop::collection::vec(token, 0..14).prop_map(|t| t.concat())
}

proptest! {
    #[test]
    fn printing_a_filter_and_parsing_it_gives_the_same_filter(f in filter()) {
        let printed = f.to_string();
        let parsed = Filter::parse(&printed);
        prop_assert_eq!(parsed.as_ref(), Ok(&f), "printed as {}", printed);
    }

    #[test]
    fn no_text_makes_the_parser_panic(s in ".{0,64}") {
        if let Err(e) = Filter::parse(&s) {
            prop_assert!(e.position >= 1 && e.position <= s.chars().count() + 1, "{e} for {s:?}");
        }
    }

    #[test]
    fn no_filter_like_text_makes_the_parser_panic(s in filterish()) {
        match Filter::parse(&s) {
            // Whatever parses prints back to itself.
            Ok(f) => prop_assert_eq!(Filter::parse(&f.to_string()), Ok(f)),
            Err(e) => prop_assert!(e.position >= 1 && e.position <= s.chars().count() + 1, "{e} for {s:?}"),
        }
    }
}
