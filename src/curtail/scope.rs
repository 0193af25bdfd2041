//! What a budget applies to: the site, a group of the config, or the
//! miners whose worker names match a glob.

use wildmatch::WildMatch;

#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    Site,
    Group(String),
    Workers(Glob),
}

/// A worker glob, compiled once (it is matched against every miner at
/// every plan and every admission).
#[derive(Debug, Clone)]
pub struct Glob {
    text: String,
    glob: WildMatch,
}

impl From<&str> for Glob {
    fn from(s: &str) -> Glob {
        Glob { text: s.to_owned(), glob: WildMatch::new(s) }
    }
}

impl PartialEq for Glob {
    fn eq(&self, o: &Glob) -> bool {
        self.text == o.text
    }
}

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, String> {
        if s == "site" {
            Ok(Scope::Site)
        } else if let Some(g) = s.strip_prefix("group:") {
            Ok(Scope::Group(g.to_owned()))
        } else if let Some(p) = s.strip_prefix("workers:") {
            Ok(Scope::Workers(p.into()))
        } else {
            Err(format!("scope {s:?}: use site, group:NAME or workers:PATTERN"))
        }
    }

    /// Does a miner of this group, under this worker name, fall in it?
    pub fn contains(&self, group: &str, worker: &str) -> bool {
        match self {
            Scope::Site => true,
            Scope::Group(g) => g == group,
            Scope::Workers(p) => p.glob.matches(worker),
        }
    }

    /// As `parse` reads it.
    pub fn name(&self) -> String {
        match self {
            Scope::Site => "site".into(),
            Scope::Group(g) => format!("group:{g}"),
            Scope::Workers(p) => format!("workers:{}", p.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_name_and_match() {
        // (text, group, worker, contains)
        let rows = [
            ("site", "default", "any.1", true),
            ("group:hall-a", "hall-a", "x", true),
            ("group:hall-a", "hall-b", "x", false),
            ("workers:s19*", "default", "s19jpro.7", true),
            ("workers:s19*", "default", "s21.1", false),
        ];
        for (text, group, worker, want) in rows {
            let s = Scope::parse(text).unwrap();
            assert_eq!(s.name(), text);
            assert_eq!(s.contains(group, worker), want, "{text} {group} {worker}");
        }
        assert!(Scope::parse("hall-a").unwrap_err().contains("site, group:NAME or workers:PATTERN"));
    }
}
