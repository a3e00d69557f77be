//! Tests of the editor policy's path check, with the attack spellings and property tests of
//! the canonical form.

use proptest::prelude::*;

use super::{canonical_path, first_segment, is_editor_path};

#[test]
fn blocks_admin_and_its_disguises() {
    for p in [
        "/admin",
        "/admin/",
        "/admin/flows",
        "/ADMIN/flows",
        "/Admin/",
        "/admin//flows",
        "//admin/flows",
        "///Admin",
        "/admin/comms",
        "/./admin/flows",
        "/x/../admin/flows",
        "/%61dmin/flows",
        "/%2561dmin",
        "/%2Fadmin",
        "/\\admin",
        // Nested deeper than any fixed number of decoding rounds.
        "/%252525252525252561dmin",
        "/%2%2561dmin/../admin",
        "/%%32%35%36%31dmin",
    ] {
        assert!(is_editor_path(p), "{p} must be blocked");
    }
}

#[test]
fn leaves_flows_alone() {
    for p in [
        "/",
        "/api/orders",
        "/administrator",
        "/admin.json",
        "/adminx/flows",
        "/orders/admin",
        "/ui/",
        "/../x",
        "/%zz",
        "/a%",
        "/%",
        "/%2",
    ] {
        assert!(!is_editor_path(p), "{p} must reach the flows");
    }
}

#[test]
fn canonical_forms() {
    for (p, c) in [
        ("", "/"),
        ("/", "/"),
        ("//./", "/"),
        ("/A/b/../C", "/a/c"),
        ("/../../x", "/x"),
        ("\\Admin\\flows", "/admin/flows"),
        ("/%2525%34%31", "/a"),
        ("/%41%2f%42", "/a/b"),
        ("/%zz/%4", "/%zz/%4"),
    ] {
        assert_eq!(
            String::from_utf8_lossy(&canonical_path(p.as_bytes())),
            c,
            "{p}"
        );
    }
}

/// Paths built from the pieces that attacks on the policy are made of.
fn tricky_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/"),
        Just("\\"),
        Just("."),
        Just(".."),
        Just("admin"),
        Just("ADMIN"),
        Just("Admin"),
        Just("a"),
        Just("dmin"),
        Just("%"),
        Just("%2"),
        Just("%25"),
        Just("%2F"),
        Just("%2e"),
        Just("%5C"),
        Just("%61"),
        Just("%41"),
        Just("6"),
        Just("1"),
        Just("%00"),
        Just("%e9"),
        Just("é"),
        Just("x"),
    ];
    proptest::collection::vec(piece, 0..16).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Canonical forms are fixed points, and the fast path agrees with the canonical form.
    #[test]
    fn canonical_path_is_idempotent(p in prop_oneof![tricky_path(), any::<String>()]) {
        let once = canonical_path(p.as_bytes());
        prop_assert_eq!(&canonical_path(&once), &once);
        prop_assert!(once.starts_with(b"/"));
        prop_assert_eq!(is_editor_path(&p), first_segment(&once) == b"admin");
        // Blocking depends on the canonical form only.
        if let Ok(text) = std::str::from_utf8(&once) {
            prop_assert_eq!(is_editor_path(text), is_editor_path(&p));
        }
    }

    /// Any bytes: no panic, and the same fixed point.
    #[test]
    fn canonical_path_takes_any_bytes(p in proptest::collection::vec(any::<u8>(), 0..64)) {
        let once = canonical_path(&p);
        prop_assert_eq!(canonical_path(&once), once);
    }
}
