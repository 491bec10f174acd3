//! Label stage: the class of an image, and any other column, from its key.
//!
//! Fruits-360 stores one folder per class (`Training/Apple Red 1/r_3_100.jpg`), so by default the
//! label is the last path segment before the file name ([`LabelRule::Parent`]); a collection laid
//! out as `2026/<field>/<crop>/IMG_0001.jpg` names another folder ([`LabelRule::Folder`]), or a
//! regular expression takes the label and extra columns from any part of the key
//! ([`LabelRule::Pattern`]). Keys use `/` as separator on every store and are relative to the
//! input.

use std::fmt;
use std::str::FromStr;

/// Which part of a key names its label (`--label`, `--label-pattern`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LabelRule {
    /// The folder that holds the file (`parent`).
    #[default]
    Parent,
    /// The N-th folder of the key (`dir:N`): counted from the start when positive (`dir:1` is
    /// the first folder under the input), from the end when negative (`dir:-1` is the parent,
    /// `dir:-2` the one above). A key with fewer folders has no label.
    Folder(i32),
    /// A regular expression's named groups: `label` is the label, every other named group a
    /// string column of the table. A key it does not match has no label and null columns.
    Pattern(LabelPattern),
}

/// The label and extra columns of one key under a [`LabelRule`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyLabels {
    /// The label (`None`: the key has none under the rule).
    pub label: Option<String>,
    /// The extra columns, name and value, in the order of [`LabelRule::columns`].
    pub columns: Vec<(String, Option<String>)>,
}

impl LabelRule {
    /// The label of `key` under this rule, `None` when the key has no such folder (or the
    /// pattern does not match it).
    pub fn label_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        match self {
            LabelRule::Parent => label_of(key),
            LabelRule::Folder(n) => {
                let n = *n;
                let mut folders: Vec<&str> = key.split('/').filter(|s| !s.is_empty()).collect();
                folders.pop()?; // the file
                let index = match n {
                    n if n > 0 => usize::try_from(n - 1).ok()?,
                    n => folders.len().checked_sub(n.unsigned_abs() as usize)?,
                };
                folders.get(index).copied()
            }
            LabelRule::Pattern(pattern) => pattern
                .regex
                .captures(key)?
                .name("label")
                .map(|m| m.as_str()),
        }
    }

    /// The label and extra columns of `key`.
    pub fn apply(&self, key: &str) -> KeyLabels {
        match self {
            LabelRule::Pattern(pattern) => match pattern.regex.captures(key) {
                Some(found) => KeyLabels {
                    label: found.name("label").map(|m| m.as_str().to_string()),
                    columns: pattern
                        .columns
                        .iter()
                        .map(|c| (c.clone(), found.name(c).map(|m| m.as_str().to_string())))
                        .collect(),
                },
                None => KeyLabels {
                    label: None,
                    columns: pattern.columns.iter().map(|c| (c.clone(), None)).collect(),
                },
            },
            rule => KeyLabels {
                label: rule.label_of(key).map(str::to_string),
                columns: Vec::new(),
            },
        }
    }

    /// The extra string columns this rule gives every row (a pattern's named groups other
    /// than `label`, in the pattern's order); none for the folder rules.
    pub fn columns(&self) -> &[String] {
        match self {
            LabelRule::Pattern(pattern) => &pattern.columns,
            _ => &[],
        }
    }
}

/// A `--label-pattern`: a regular expression searched in each key, with a named group `label`
/// and any other named groups (extra columns).
#[derive(Clone, Debug)]
pub struct LabelPattern {
    regex: regex::Regex,
    columns: Vec<String>,
}

impl PartialEq for LabelPattern {
    fn eq(&self, other: &Self) -> bool {
        self.regex.as_str() == other.regex.as_str()
    }
}

impl Eq for LabelPattern {}

/// Columns of the output table a pattern's group may not be named after.
pub const TABLE_COLUMNS: [&str; 12] = [
    "key",
    "label",
    "width",
    "height",
    "embedding",
    "model",
    "etag",
    "epoch",
    "prediction",
    "confidence",
    "stage",
    "reason",
];

/// Why a `--label-pattern` was refused.
#[derive(Debug, thiserror::Error)]
pub enum BadLabelPattern {
    /// Not a regular expression.
    #[error("{pattern:?} is not a regular expression: {reason}")]
    Syntax {
        /// The pattern.
        pattern: String,
        /// The parser's message.
        reason: String,
    },
    /// No group names the label.
    #[error("{0:?} has no group named `label` (write it as `(?P<label>...)`)")]
    NoLabel(String),
    /// A group is named after one of the table's own columns.
    #[error("{pattern:?}: the group `{name}` would shadow the table's own column of that name")]
    Reserved {
        /// The pattern.
        pattern: String,
        /// The group's name.
        name: String,
    },
}

impl FromStr for LabelPattern {
    type Err = BadLabelPattern;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let regex = regex::Regex::new(text).map_err(|e| BadLabelPattern::Syntax {
            pattern: text.to_string(),
            reason: e
                .to_string()
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_string(),
        })?;
        let names: Vec<&str> = regex.capture_names().flatten().collect();
        if !names.contains(&"label") {
            return Err(BadLabelPattern::NoLabel(text.to_string()));
        }
        let mut columns = Vec::new();
        for name in names.into_iter().filter(|&n| n != "label") {
            if TABLE_COLUMNS.contains(&name) {
                return Err(BadLabelPattern::Reserved {
                    pattern: text.to_string(),
                    name: name.to_string(),
                });
            }
            columns.push(name.to_string());
        }
        Ok(LabelPattern { regex, columns })
    }
}

impl fmt::Display for LabelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.regex.as_str())
    }
}

/// Why a `--label` value was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: expected `parent` or `dir:N` (N-th folder from the start, or from the end when negative; N is not 0)")]
pub struct BadLabelRule(String);

impl FromStr for LabelRule {
    type Err = BadLabelRule;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "parent" {
            return Ok(LabelRule::Parent);
        }
        text.strip_prefix("dir:")
            .and_then(|n| n.parse::<i32>().ok())
            .filter(|&n| n != 0)
            .map(LabelRule::Folder)
            .ok_or_else(|| BadLabelRule(text.to_string()))
    }
}

impl fmt::Display for LabelRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelRule::Parent => write!(f, "parent"),
            LabelRule::Folder(n) => write!(f, "dir:{n}"),
            LabelRule::Pattern(p) => write!(f, "pattern:{p}"),
        }
    }
}

/// The label of `key`: its parent folder's name, or `None` for a key at the root of the input.
///
/// ```
/// assert_eq!(verger::label::label_of("Training/Apple Red 1/r_3_100.jpg"), Some("Apple Red 1"));
/// assert_eq!(verger::label::label_of("lonely.jpg"), None);
/// ```
pub fn label_of(key: &str) -> Option<&str> {
    let mut segments = key.rsplit('/').filter(|s| !s.is_empty());
    let _file = segments.next()?;
    segments.next()
}

#[cfg(test)]
mod tests {
    use super::{label_of, LabelRule};
    use proptest::prelude::*;

    #[test]
    fn a_folder_rule_counts_from_the_start_or_the_end() {
        let key = "2026/field7/apple/IMG_0001.jpg";
        let rule = |text: &str| text.parse::<LabelRule>().unwrap();
        assert_eq!(rule("parent").label_of(key), Some("apple"));
        assert_eq!(rule("dir:-1").label_of(key), Some("apple"));
        assert_eq!(rule("dir:-2").label_of(key), Some("field7"));
        assert_eq!(rule("dir:1").label_of(key), Some("2026"));
        assert_eq!(rule("dir:3").label_of(key), Some("apple"));
        assert_eq!(rule("dir:4").label_of(key), None, "the file is no folder");
        assert_eq!(rule("dir:-4").label_of(key), None);
        assert_eq!(rule("dir:2").label_of("root.jpg"), None);
        assert_eq!(rule("dir:-2").to_string(), "dir:-2");
    }

    #[test]
    fn a_pattern_gives_the_label_and_a_column_per_other_named_group() {
        let pattern: super::LabelPattern =
            r"^(?P<year>\d{4})/(?P<field>[^/]+)/(?P<label>[^/]+)/(?:(?P<camera>cam\d)_)?"
                .parse()
                .unwrap();
        let rule = LabelRule::Pattern(pattern);
        assert_eq!(rule.columns(), ["year", "field", "camera"]);
        let got = rule.apply("2026/field7/apple/cam2_0001.jpg");
        assert_eq!(got.label.as_deref(), Some("apple"));
        let values =
            |k: &super::KeyLabels| k.columns.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>();
        assert_eq!(
            values(&got),
            [
                Some("2026".into()),
                Some("field7".into()),
                Some("cam2".into())
            ]
        );
        assert_eq!(got.columns[1].0, "field");
        let no_camera = rule.apply("2025/north/pear/IMG_1.jpg");
        assert_eq!(no_camera.label.as_deref(), Some("pear"));
        assert_eq!(
            no_camera.columns[2].1, None,
            "a group that took no part is null"
        );
        let unmatched = rule.apply("misc/IMG_2.jpg");
        assert_eq!(unmatched.label, None);
        assert_eq!(values(&unmatched), [None, None, None]);
        assert_eq!(rule.label_of("2026/field7/apple/x.jpg"), Some("apple"));
        assert!(LabelRule::Parent.columns().is_empty());
        assert_eq!(
            LabelRule::Parent.apply("a/b.jpg"),
            super::KeyLabels {
                label: Some("a".into()),
                columns: vec![]
            }
        );
    }

    #[test]
    fn a_bad_pattern_is_refused_saying_why() {
        let err = |text: &str| text.parse::<super::LabelPattern>().unwrap_err().to_string();
        assert!(
            err("(?P<label>[").contains("is not a regular expression"),
            "{}",
            err("(?P<label>[")
        );
        assert!(err("(?P<crop>[^/]+)/").contains("has no group named `label`"));
        assert!(err("(?P<label>[^/]+)/(?P<epoch>\\d+)").contains("the group `epoch` would shadow"));
    }

    #[test]
    fn a_bad_label_rule_is_refused_naming_the_forms() {
        for text in ["dir:0", "dir:x", "dir:", "grandparent", ""] {
            let err = text.parse::<LabelRule>().unwrap_err().to_string();
            assert!(
                err.contains("expected `parent` or `dir:N`"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn label_keeps_spaces() {
        assert_eq!(
            label_of("Training/Apple Red 1/r_3_100.jpg"),
            Some("Apple Red 1")
        );
    }

    #[test]
    fn label_keeps_unicode() {
        assert_eq!(
            label_of("Test/Pomme dorée 🍏/ü_1.jpg"),
            Some("Pomme dorée 🍏")
        );
        assert_eq!(label_of("果物/リンゴ/1.jpg"), Some("リンゴ"));
    }

    #[test]
    fn label_is_the_innermost_folder_of_a_nested_prefix() {
        assert_eq!(label_of("a/b/c/d/Banana/x.jpg"), Some("Banana"));
        assert_eq!(
            label_of("bucket-prefix/in/Training/Kiwi/k.jpg"),
            Some("Kiwi")
        );
    }

    #[test]
    fn key_at_the_root_has_no_label() {
        assert_eq!(label_of("image.jpg"), None);
        assert_eq!(label_of("/image.jpg"), None);
        assert_eq!(label_of(""), None);
    }

    #[test]
    fn repeated_separators_are_ignored() {
        assert_eq!(label_of("Training//Lemon//l.jpg"), Some("Lemon"));
    }

    proptest! {
        #[test]
        fn label_is_the_folder_the_key_was_built_from(
            prefix in proptest::collection::vec("[^/]{1,12}", 0..4),
            folder in "[^/]{1,20}",
            file in "[^/]{1,20}",
        ) {
            let mut parts = prefix.clone();
            parts.push(folder.clone());
            parts.push(file);
            let key = parts.join("/");
            prop_assert_eq!(label_of(&key), Some(folder.as_str()));
        }
    }
}
