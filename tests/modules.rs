//! The module graph: no two top-level modules of the crate may depend on
//! each other, directly or through others. Read from the source: every
//! `crate::NAME` outside a comment in a file of module A is an arrow from A
//! to NAME. A cycle fails the test, naming the files that close it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `crate::NAME` paths on the lines of `text` that are not comments.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let before = &rest[..at];
            rest = &rest[at + "crate::".len()..];
            // `$crate::` in a macro, or `foo_crate::`, is not this crate.
            if before.ends_with(|c: char| c == '$' || c == '_' || c.is_alphanumeric()) {
                continue;
            }
            let name: String = rest.chars().take_while(|c| *c == '_' || c.is_ascii_alphanumeric()).collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// Arrows between top-level modules, each with a file that draws it.
fn graph() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for to in crate_paths(&text) {
            if to != top {
                g.entry(top.clone()).or_default().entry(to).or_insert_with(|| rel.to_owned());
            }
        }
    }
    g
}

/// A cycle through `node`, if there is one reachable from it.
fn find_cycle(
    g: &BTreeMap<String, BTreeMap<String, PathBuf>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(at) = path.iter().position(|n| n == node) {
        let mut cycle = path[at..].to_vec();
        cycle.push(node.to_owned());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_owned());
    for next in g.get(node).into_iter().flat_map(|m| m.keys()) {
        if let Some(c) = find_cycle(g, next, path, done) {
            return Some(c);
        }
    }
    path.pop();
    done.insert(node.to_owned());
    None
}

#[test]
fn the_top_level_modules_form_no_cycle() {
    let g = graph();
    assert!(g.contains_key("curtail") && g.contains_key("downstream"), "the source was read: {g:?}");
    let mut done = BTreeSet::new();
    for node in g.keys() {
        if let Some(cycle) = find_cycle(&g, node, &mut Vec::new(), &mut done) {
            let arrows: Vec<String> =
                cycle.windows(2).map(|w| format!("{} -> {} ({})", w[0], w[1], g[&w[0]][&w[1]].display())).collect();
            panic!("the modules form a cycle:\n  {}", arrows.join("\n  "));
        }
    }
}

#[test]
fn the_reader_sees_paths_and_skips_comments() {
    let text = "use crate::api::Watts;\n// crate::app is only named\nlet x = crate::units::Seconds::ZERO; // crate::sim\n$crate::stats\n";
    let got: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(got, ["api", "units"]);
    // A cycle is found and named.
    let mut g: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(a.into()).or_default().insert(b.into(), PathBuf::from(format!("{a}.rs")));
    }
    let cycle = find_cycle(&g, "a", &mut Vec::new(), &mut BTreeSet::new()).unwrap();
    assert_eq!(cycle, ["a", "b", "c", "a"]);
    g.get_mut("c").unwrap().remove("a");
    assert_eq!(find_cycle(&g, "a", &mut Vec::new(), &mut BTreeSet::new()), None);
}
