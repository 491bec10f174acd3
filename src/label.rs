//! Label stage: the class of an image is the name of a folder of its key.
//!
//! Fruits-360 stores one folder per class (`Training/Apple Red 1/r_3_100.jpg`), so by default the
//! label is the last path segment before the file name ([`LabelRule::Parent`]); a collection laid
//! out as `2026/<field>/<crop>/IMG_0001.jpg` names another folder ([`LabelRule::Folder`]). Keys
//! use `/` as separator on every store and are relative to the input.

use std::fmt;
use std::str::FromStr;

/// Which folder of a key names its label (`--label`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LabelRule {
    /// The folder that holds the file (`parent`).
    #[default]
    Parent,
    /// The N-th folder of the key (`dir:N`): counted from the start when positive (`dir:1` is
    /// the first folder under the input), from the end when negative (`dir:-1` is the parent,
    /// `dir:-2` the one above). A key with fewer folders has no label.
    Folder(i32),
}

impl LabelRule {
    /// The label of `key` under this rule, `None` when the key has no such folder.
    pub fn label_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        match *self {
            LabelRule::Parent => label_of(key),
            LabelRule::Folder(n) => {
                let mut folders: Vec<&str> = key.split('/').filter(|s| !s.is_empty()).collect();
                folders.pop()?; // the file
                let index = match n {
                    n if n > 0 => usize::try_from(n - 1).ok()?,
                    n => folders.len().checked_sub(n.unsigned_abs() as usize)?,
                };
                folders.get(index).copied()
            }
        }
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
