//! Captioned image sets for text-to-image training, in the layouts people keep them in:
//!
//! - a folder of images, each with a `.txt` caption of the same stem beside it (any depth);
//! - a JSON Lines file, one `{"file_name": ..., "text": ...}` object per image (`path` / `image`
//!   and `caption` are accepted too), paths relative to the file's folder (Hugging Face's
//!   `metadata.jsonl` layout);
//! - the npm package `emoji-datasource-google` (Apache-2.0 images): its 64 px PNGs captioned with
//!   the Unicode name from `emoji.json`, skin-tone variants included ("waving hand, dark skin
//!   tone").
//!
//! Each becomes an [`ImageFolder`] whose labels index its distinct captions (sorted), so the
//! class-folder machinery (batches, latent extraction, resumable streams) carries captions too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::folder::{is_image, ImageFolder};
use crate::{Error, Result};

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Opens `path` as whichever captioned layout it is, or `None` when it is none of them (then it
/// is a class folder).
pub fn open(path: &Path) -> Result<Option<ImageFolder>> {
    if path.is_file() {
        return match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") => jsonl(path).map(Some),
            _ => Err(Error::Input(format!(
                "{}: a data file must be JSON Lines (.jsonl) of file_name / text pairs",
                path.display()
            ))),
        };
    }
    if path.join("emoji.json").is_file() {
        return emoji(path).map(Some);
    }
    if path.join("metadata.jsonl").is_file() {
        return jsonl(&path.join("metadata.jsonl")).map(Some);
    }
    let pairs = txt_pairs(path)?;
    if pairs.is_empty() {
        return Ok(None);
    }
    build(path, pairs).map(Some)
}

/// Distinct captions sorted; each image labelled with its caption's index.
fn build(root: &Path, pairs: Vec<(PathBuf, String)>) -> Result<ImageFolder> {
    if pairs.is_empty() {
        return Err(Error::Input(format!(
            "{}: no captioned images found",
            root.display()
        )));
    }
    let captions: Vec<String> = pairs
        .iter()
        .map(|(_, c)| c.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let items = pairs
        .into_iter()
        .map(|(p, c)| {
            let label = captions.binary_search(&c).expect("caption was collected");
            (p, label)
        })
        .collect();
    Ok(ImageFolder {
        root: root.to_path_buf(),
        classes: Vec::new(),
        items,
        captions: Some(captions),
    })
}

/// Captions are one line of text: whitespace (newlines included) collapsed.
fn clean(caption: &str) -> String {
    caption.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Images under `root` (recursively, sorted) that have a `.txt` of the same stem.
fn txt_pairs(root: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                dirs.push(p);
            } else if is_image(&p) {
                let txt = p.with_extension("txt");
                if txt.is_file() {
                    let text = std::fs::read_to_string(&txt).map_err(io_err(&txt))?;
                    out.push((p, clean(&text)));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A JSON Lines caption file.
pub fn jsonl(path: &Path) -> Result<ImageFolder> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: &str| Error::Input(format!("{}:{}: {m}", path.display(), i + 1));
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let field = |keys: &[&str]| keys.iter().find_map(|k| v.get(*k)?.as_str());
        let file = field(&["file_name", "path", "image"])
            .ok_or_else(|| bad("no \"file_name\" (or \"path\" / \"image\") string"))?;
        let caption = field(&["text", "caption"])
            .ok_or_else(|| bad("no \"text\" (or \"caption\") string"))?;
        let p = base.join(file);
        if !p.is_file() {
            return Err(bad(&format!("image {} does not exist", p.display())));
        }
        pairs.push((p, clean(caption)));
    }
    build(base, pairs)
}

/// Unicode names of the skin-tone modifiers, by code point.
fn skin_tone(code: &str) -> Option<&'static str> {
    Some(match code.to_ascii_uppercase().as_str() {
        "1F3FB" => "light skin tone",
        "1F3FC" => "medium-light skin tone",
        "1F3FD" => "medium skin tone",
        "1F3FE" => "medium-dark skin tone",
        "1F3FF" => "dark skin tone",
        _ => return None,
    })
}

/// The `emoji-datasource-google` package folder (`node_modules/emoji-datasource-google`).
pub fn emoji(root: &Path) -> Result<ImageFolder> {
    let index = root.join("emoji.json");
    let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
    let bad = |m: String| Error::Input(format!("{}: {m}", index.display()));
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let images = root.join("img/google/64");
    let mut pairs = Vec::new();
    for e in &entries {
        let name = e["name"]
            .as_str()
            .or_else(|| e["short_name"].as_str())
            .ok_or_else(|| bad(format!("an entry without a name: {e}")))?
            .to_lowercase()
            .replace('_', " ");
        let mut add = |v: &serde_json::Value, caption: String| {
            if let Some(file) = v["image"].as_str() {
                let p = images.join(file);
                if v["has_img_google"].as_bool() != Some(false) && p.is_file() {
                    pairs.push((p, caption));
                }
            }
        };
        add(e, name.clone());
        if let Some(vars) = e["skin_variations"].as_object() {
            for (codes, v) in vars {
                let tones: Vec<&str> = codes.split('-').filter_map(skin_tone).collect();
                add(v, format!("{name}, {}", tones.join(", ")));
            }
        }
    }
    build(root, pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dit-captions-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn png(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::new(4, 4).save(path).unwrap();
    }

    #[test]
    fn txt_captions_beside_images_at_any_depth() {
        let d = tmp("txt");
        png(&d.join("a.png"));
        std::fs::write(d.join("a.txt"), "a red\n circle ").unwrap();
        png(&d.join("sub/b.png"));
        std::fs::write(d.join("sub/b.txt"), "a blue square").unwrap();
        png(&d.join("sub/c.png")); // no caption: not in the set
        png(&d.join("d.png"));
        std::fs::write(d.join("d.txt"), "a red circle").unwrap();
        let f = open(&d).unwrap().unwrap();
        assert_eq!(
            f.captions.as_deref().unwrap(),
            ["a blue square", "a red circle"]
        );
        let got: Vec<(String, usize)> = f
            .items
            .iter()
            .map(|(p, l)| (p.strip_prefix(&d).unwrap().display().to_string(), *l))
            .collect();
        assert_eq!(
            got,
            [
                ("a.png".into(), 1),
                ("d.png".into(), 1),
                ("sub/b.png".into(), 0)
            ]
        );
        assert!(f.classes.is_empty());
        // A class folder (no captions) is not a captioned set.
        let c = tmp("classes");
        png(&c.join("cat/0.png"));
        assert!(open(&c).unwrap().is_none());
        std::fs::remove_dir_all(&d).ok();
        std::fs::remove_dir_all(&c).ok();
    }

    #[test]
    fn jsonl_captions_with_line_numbered_errors() {
        let d = tmp("jsonl");
        png(&d.join("img/0.png"));
        png(&d.join("img/1.png"));
        let meta = d.join("metadata.jsonl");
        std::fs::write(
            &meta,
            "{\"file_name\": \"img/0.png\", \"text\": \"zebra\"}\n\n{\"path\": \"img/1.png\", \"caption\": \"ant\"}\n",
        )
        .unwrap();
        for f in [open(&meta).unwrap().unwrap(), open(&d).unwrap().unwrap()] {
            assert_eq!(f.captions.as_deref().unwrap(), ["ant", "zebra"]);
            assert_eq!(f.items[0], (d.join("img/0.png"), 1));
            assert_eq!(f.items[1], (d.join("img/1.png"), 0));
        }
        std::fs::write(&meta, "{\"file_name\": \"img/0.png\", \"text\": \"a\"}\n{\"file_name\": \"img/9.png\", \"text\": \"b\"}\n").unwrap();
        let err = jsonl(&meta).unwrap_err().to_string();
        assert!(
            err.contains("metadata.jsonl:2") && err.contains("9.png"),
            "{err}"
        );
        std::fs::write(&meta, "{\"file_name\": \"img/0.png\"}\n").unwrap();
        let err = jsonl(&meta).unwrap_err().to_string();
        assert!(err.contains(":1") && err.contains("text"), "{err}");
        std::fs::write(&meta, "not json\n").unwrap();
        assert!(jsonl(&meta).unwrap_err().to_string().contains("not JSON"));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn emoji_names_and_skin_tones_become_captions() {
        let d = tmp("emoji");
        let json = r#"[
          {"name": "WAVING HAND SIGN", "image": "1f44b.png", "has_img_google": true,
           "skin_variations": {"1F3FF": {"image": "1f44b-1f3ff.png", "has_img_google": true},
                               "1F3FB-1F3FC": {"image": "1f44b-1f3fb-1f3fc.png", "has_img_google": true}}},
          {"name": "NO GOOGLE IMAGE", "image": "0000.png", "has_img_google": false},
          {"name": null, "short_name": "hash_key", "image": "0023.png"}
        ]"#;
        std::fs::write(d.join("emoji.json"), json).unwrap();
        for f in [
            "1f44b.png",
            "1f44b-1f3ff.png",
            "1f44b-1f3fb-1f3fc.png",
            "0000.png",
            "0023.png",
        ] {
            png(&d.join("img/google/64").join(f));
        }
        let f = open(&d).unwrap().unwrap();
        assert_eq!(
            f.captions.as_deref().unwrap(),
            [
                "hash key",
                "waving hand sign",
                "waving hand sign, dark skin tone",
                "waving hand sign, light skin tone, medium-light skin tone",
            ]
        );
        assert_eq!(f.items.len(), 4);
        std::fs::remove_dir_all(&d).ok();
    }
}
