//! A hub update in parts: a snapshot of a large clusterset (100,000 imports are ~6 MB encoded)
//! goes to a cluster that said `Hello.update_parts` as messages of at most
//! [`IMPORTS_PER_PART`] imports. gRPC keeps each stream's encode and decode buffers at the size
//! of the largest message it carried, so one whole snapshot per stream would cost the hub (and
//! each control plane) that much memory for as long as the stream lasts.

use fedmesh_api::pb::federation as pb;

/// The most imports in one part: ~30 KiB encoded.
pub const IMPORTS_PER_PART: usize = 500;

/// `u` in parts of at most `per_part` imports (one part when it is small): the first carries
/// everything but the rest of the imports, each but the last says `more`, all share its version.
pub fn split(mut u: pb::Update, per_part: usize) -> Vec<pb::Update> {
    let per_part = per_part.max(1);
    if u.imports.len() <= per_part {
        return vec![u];
    }
    let rest = u.imports.split_off(per_part);
    let version = u.version;
    let mut parts = vec![u];
    let mut rest = rest.into_iter().peekable();
    while rest.peek().is_some() {
        parts.push(pb::Update {
            version,
            imports: rest.by_ref().take(per_part).collect(),
            ..Default::default()
        });
    }
    let last = parts.len() - 1;
    for p in &mut parts[..last] {
        p.more = true;
    }
    parts
}

/// Gathers an update's parts: the whole update once its last part is in, else `None` (the parts
/// so far wait in `pending`). A part of another version than those waiting starts over from it
/// (the hub never interleaves updates, so only a broken stream does that).
pub fn gather(pending: &mut Option<pb::Update>, part: pb::Update) -> Option<pb::Update> {
    let whole = match pending.take() {
        Some(mut u) if u.version == part.version && !part.snapshot => {
            u.imports.extend(part.imports);
            u.more = part.more;
            u
        }
        _ => part,
    };
    if whole.more {
        *pending = Some(whole);
        None
    } else {
        Some(whole)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn import(n: usize) -> pb::Import {
        pb::Import {
            service: format!("shop/s{n}"),
            ..Default::default()
        }
    }

    #[test]
    fn a_large_update_goes_in_parts_and_comes_back_whole() {
        let u = pb::Update {
            version: 7,
            snapshot: true,
            imports: (0..1_234).map(import).collect(),
            removed_imports: vec!["shop/gone".into()],
            bundles: vec![pb::Bundle::default()],
            ..Default::default()
        };
        let parts = split(u.clone(), 500);
        let sizes: Vec<usize> = parts.iter().map(|p| p.imports.len()).collect();
        assert_eq!(sizes, [500, 500, 234]);
        assert!(parts.iter().all(|p| p.version == 7));
        assert_eq!(
            parts.iter().map(|p| p.more).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert!(parts[0].snapshot && !parts[1].snapshot);
        assert_eq!(parts[0].removed_imports, ["shop/gone"]);
        assert!(parts[1].bundles.is_empty() && parts[2].removed_imports.is_empty());
        let mut pending = None;
        let mut out = None;
        for p in parts {
            assert!(out.is_none(), "nothing is whole before the last part");
            out = gather(&mut pending, p);
        }
        assert_eq!(out, Some(u));
        assert!(pending.is_none());
        // A small one goes as it is.
        let small = pb::Update {
            version: 8,
            imports: vec![import(1)],
            ..Default::default()
        };
        assert_eq!(split(small.clone(), 500), vec![small.clone()]);
        assert_eq!(gather(&mut pending, small.clone()), Some(small));
    }

    #[test]
    fn a_new_update_in_the_middle_of_parts_starts_over() {
        let mut pending = None;
        let mut first = split(
            pb::Update {
                version: 1,
                snapshot: true,
                imports: (0..3).map(import).collect(),
                ..Default::default()
            },
            2,
        );
        assert!(gather(&mut pending, first.remove(0)).is_none());
        let next = pb::Update {
            version: 2,
            snapshot: true,
            imports: vec![import(9)],
            ..Default::default()
        };
        assert_eq!(gather(&mut pending, next.clone()), Some(next));
    }
}
