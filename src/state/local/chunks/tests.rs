use super::*;
use crate::state::local::LocalConfig;

/// A file of `n` workloads and `n / 2` services in the shapes people write: comments between and
/// inside items, quoted values holding `- ` and `: `, both waypoint spellings, a free-form value with a
/// block scalar, the services list indented under its key, and an inline `policies: []`.
fn varied(n: usize) -> String {
    let mut f = String::from("# generated\n\nworkloads:\n");
    for i in 0..n {
        if i % 7 == 0 {
            f.push_str("# a comment between items\n\n");
        }
        f.push_str(&format!(
            "- uid: \"cluster1//v1/Pod/ns{ns}/pod-{i}\"\n  name: 'pod- {i}: x'\n  namespace: ns{ns}\n  \
             # a comment inside an item\n  serviceAccount: sa{sa}\n  workloadIps: [\"10.1.{hi}.{lo}\"]\n  \
             protocol: HBONE\n  node: node{node}\n  services:\n    \"ns{ns}/svc{svc}.ns{ns}.svc.cluster.local\":\n      \
             80: 8080\n      443: 8443\n",
            ns = i % 5,
            sa = i % 3,
            hi = i / 250,
            lo = i % 250,
            node = i % 4,
            svc = i % 9,
        ));
        if i % 5 == 1 {
            f.push_str("  waypoint:\n    destination: ns1/wp.ns1.svc.cluster.local\n    hboneMtlsPort: 15008\n");
        }
        if i % 5 == 2 {
            f.push_str(
                "  waypoint:\n    destination: {namespace: ns2, hostname: wp2}\n    hboneMtlsPort: 15008\n",
            );
        }
        if i % 11 == 3 {
            f.push_str("  canonicalRevision: |\n    - uid: not an item\n    services:\n  locality: {region: r, zone: z}\n");
        }
    }
    f.push_str("services:\n");
    for j in 0..n / 2 {
        f.push_str(&format!(
            "  - name: svc{j}\n    namespace: ns{ns}\n    hostname: svc{j}.ns{ns}.svc.cluster.local\n    \
             vips: [\"/10.200.{hi}.{lo}\"]\n    ports:\n      80: 8080\n",
            ns = j % 5,
            hi = j / 250,
            lo = j % 250,
        ));
    }
    f.push_str("policies: []\n");
    f
}

/// A state as text: its workloads, services and policies in order (`Debug`), or the error.
fn dump(st: Result<crate::state::State, crate::state::local::Error>) -> Result<String, String> {
    st.map(|st| {
        format!(
            "{:?}\n{:?}\n{:?}",
            st.workloads().collect::<Vec<_>>(),
            st.services().collect::<Vec<_>>(),
            st.policies().iter().collect::<Vec<_>>()
        )
    })
    .map_err(|e| e.to_string())
}

/// The whole-file parse and conversion.
fn whole(text: &str) -> Result<String, String> {
    dump(LocalConfig::parse(text).and_then(LocalConfig::into_state))
}

/// In pieces, as far as they go.
fn in_pieces(text: &str, limits: Limits) -> Result<String, String> {
    dump(crate::state::local::state_with(text, limits))
}

fn kinds(text: &str, limits: Limits) -> Vec<Kind> {
    let mut kinds: Vec<Kind> = pieces(text, limits)
        .expect("plain shape")
        .iter()
        .map(|p| p.kind)
        .collect();
    kinds.dedup();
    kinds
}

#[test]
fn a_large_file_loaded_in_pieces_equals_the_whole_file_load() {
    let text = varied(400);
    let cut = pieces(&text, Limits::tiny()).expect("plain shape");
    assert!(cut.len() > 20, "{} pieces", cut.len());
    assert_eq!(
        kinds(&text, Limits::tiny()),
        [Kind::Workloads, Kind::Services, Kind::Whole]
    );
    let st = crate::state::local::state_with(&text, Limits::tiny()).unwrap();
    assert_eq!(st.workload_count(), 400);
    assert_eq!(st.service_count(), 200);
    assert_eq!(in_pieces(&text, Limits::tiny()), whole(&text));
    // And the load the proxy uses gives the same.
    assert_eq!(
        dump(crate::state::local::state_from_text(&text)),
        whole(&text)
    );
}

#[test]
fn windows_line_endings_and_one_thread_give_the_same_result() {
    let text = varied(60).replace('\n', "\r\n");
    let one = Limits {
        threads: 1,
        ..Limits::tiny()
    };
    assert!(pieces(&text, one).is_some_and(|p| p.len() > 5));
    assert_eq!(in_pieces(&text, one), whole(&text));
}

#[test]
fn policies_listed_in_pieces_keep_their_order() {
    let mut text = varied(10);
    text = text.replace("policies: []\n", "policies:\n");
    for k in 0..20 {
        text.push_str(&format!(
            "- name: p{k}\n  namespace: ns1\n  scope: Namespace\n  action: Deny\n  rules: [[[{{destinationPorts: [{port}]}}]]]\n",
            port = 9000 + k
        ));
    }
    assert_eq!(
        kinds(&text, Limits::tiny()),
        [Kind::Workloads, Kind::Services, Kind::Policies]
    );
    let st = crate::state::local::state_with(&text, Limits::tiny()).unwrap();
    assert_eq!(st.policies().iter().nth(7).unwrap().name, "p7");
    assert_eq!(in_pieces(&text, Limits::tiny()), whole(&text));
}

/// Texts the cut must not be trusted with: each is loaded whole, with the whole load's result or error.
#[test]
fn files_of_another_shape_are_loaded_whole_with_the_same_result_or_error() {
    let base = varied(30);
    let cut = |text: &str| pieces(text, Limits::tiny()).is_some();
    let cases: Vec<(&str, String, bool)> = vec![
        (
            "an unknown top-level key",
            format!("{base}extra: 1\n"),
            false,
        ),
        ("a key given twice", format!("{base}workloads: []\n"), false),
        ("a document marker", format!("---\n{base}"), false),
        (
            "tabs for indentation",
            base.replacen("  name:", "\tname:", 1),
            false,
        ),
        (
            "an alias to an anchor in another piece",
            base.replacen("  protocol: HBONE", "  protocol: &p HBONE", 1)
                .replace(
                    "  protocol: HBONE\n  node: node3",
                    "  protocol: *p\n  node: node3",
                ),
            true,
        ),
        (
            "a quoted value running onto a line that looks like an item",
            base.replacen("  node: node1\n", "  node: \"node1\n- uid: x\"\n", 1),
            true,
        ),
        (
            "a flow list running over lines",
            base.replacen(
                "  workloadIps: [\"10.1.0.5\"]\n",
                "  workloadIps: [\n\"10.1.0.5\"]\n",
                1,
            ),
            false,
        ),
        (
            "an unknown key in an item",
            base.replacen("  node: node2\n", "  nodes: node2\n", 1),
            true,
        ),
        (
            "an invalid value in an item",
            base.replacen("  serviceAccount: sa1\n", "  serviceAccount: \"a/b\"\n", 1),
            true,
        ),
        (
            "a list item less indented than the list",
            base.replacen("  - name: svc3\n", " - name: svc3\n", 1),
            false,
        ),
        ("text before the first key", format!("oops\n{base}"), false),
        ("a root list", "- a\n- b\n".repeat(20), false),
    ];
    for (what, text, plain) in cases {
        // Whether the text is cut at all; where it is, a piece fails and the whole load decides.
        assert_eq!(cut(&text), plain, "{what}: cut");
        assert_eq!(in_pieces(&text, Limits::tiny()), whole(&text), "{what}");
    }
}

#[test]
fn an_error_in_a_large_file_names_its_line_in_the_whole_file() {
    let text = varied(400).replacen("  node: node3\n", "  node: [node3\n", 1);
    let err = in_pieces(&text, Limits::tiny()).unwrap_err();
    let line = text
        .lines()
        .position(|l| l == "  node: [node3")
        .expect("edited line")
        + 1;
    assert!(
        (line..line + 3).any(|l| err.contains(&format!("line {l} "))),
        "{err} (edited line {line})"
    );
    assert_eq!(Err(err), whole(&text));
}

#[test]
fn small_or_empty_lists_are_loaded_whole() {
    let text = "workloads:\nservices:\n# nothing\npolicies:\n";
    assert_eq!(kinds(text, Limits::tiny()), [Kind::Whole]);
    assert_eq!(in_pieces(text, Limits::tiny()), whole(text));
    // Below the size limit nothing is cut.
    assert!(pieces(&varied(30), Limits::here()).is_none());
}
