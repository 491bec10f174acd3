//! Label stage: the class of an image is the name of the folder that holds it.
//!
//! Fruits-360 stores one folder per class (`Training/Apple Red 1/r_3_100.jpg`), so the label is
//! the last path segment before the file name. Keys use `/` as separator on every store.

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
    use super::label_of;
    use proptest::prelude::*;

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
