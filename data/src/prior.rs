//! The heuristic's human prior: per class, how often people perceive it with the student's
//! sense. `heuristic.prior_csv` is a `class,prior` CSV (a header line allowed); `xkd data prior`
//! makes one from VGGSounder's labels.
//!
//! VGGSounder (PyPI `vggsounder`, `vggsounder/data/vggsounder.csv`) re-annotates VGGSound's
//! test set: one row per clip and label a person found in it, with `modality` saying whether
//! the label was heard (`A`), seen (`V`) or both (`AV`). A class's prior for an audio student
//! is the share of its rows that were heard (`A` or `AV`); for a visual student, the share that
//! were seen (`V` or `AV`). Every CSV here goes through the `csv` crate (quoted class names hold
//! commas: "bird chirping, tweeting").

use anyhow::{bail, Context as _, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use xkd_config::Modality;

/// One class's prior and the VGGSounder rows it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassPrior {
    pub class: String,
    pub prior: f64,
    pub rows: u64,
}

/// The priors for a `student` of one modality from VGGSounder's label file, by class name.
/// Errors name the file, and the line of a row whose modality is not `A`, `V` or `AV`.
pub fn vggsounder_priors(path: &Path, student: Modality) -> Result<Vec<ClassPrior>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("opening VGGSounder labels {}", path.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("reading the header of {}", path.display()))?
        .clone();
    let column = |name: &str| {
        headers.iter().position(|h| h == name).with_context(|| {
            format!(
                "{} has no `{name}` column (VGGSounder's vggsounder.csv has label and modality)",
                path.display()
            )
        })
    };
    let (label, modality) = (column("label")?, column("modality")?);
    // class -> (rows, rows perceived by the student's sense)
    let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("reading {}", path.display()))?;
        let line = record.position().map_or(0, |p| p.line());
        let (Some(class), Some(sense)) = (record.get(label), record.get(modality)) else {
            bail!("{}:{line}: the row is missing a field", path.display());
        };
        let (heard, seen) = match sense {
            "A" => (true, false),
            "V" => (false, true),
            "AV" => (true, true),
            other => bail!(
                "{}:{line}: modality `{other}` is none of A, V, AV",
                path.display()
            ),
        };
        let perceived = match student {
            Modality::Audio => heard,
            Modality::Visual => seen,
        };
        let entry = counts.entry(class.to_string()).or_default();
        entry.0 += 1;
        entry.1 += u64::from(perceived);
    }
    if counts.is_empty() {
        bail!("{} has no label rows", path.display());
    }
    Ok(counts
        .into_iter()
        .map(|(class, (rows, perceived))| ClassPrior {
            class,
            prior: perceived as f64 / rows as f64,
            rows,
        })
        .collect())
}

/// Writes `class,prior` with a header: what `heuristic.prior_csv` reads.
pub fn write_priors(path: &Path, priors: &[ClassPrior]) -> Result<()> {
    let mut writer =
        csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    writer.write_record(["class", "prior"])?;
    for p in priors {
        writer.write_record([p.class.as_str(), &format!("{:.6}", p.prior)])?;
    }
    writer
        .flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// The prior of each of `classes` from a `class,prior` CSV at `path` (empty path: none given,
/// 0.5 for every class; a class the file does not list: 0.5; values clamped to [0, 1]). A
/// first line whose prior is not a number is a header; any later one is an error naming its
/// line.
pub fn read_priors(path: &str, classes: &[String]) -> Result<Vec<f64>> {
    let mut priors = vec![0.5; classes.len()];
    if path.is_empty() {
        return Ok(priors);
    }
    let index: HashMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .with_context(|| format!("reading heuristic.prior_csv {path}"))?;
    for (n, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("reading heuristic.prior_csv {path}"))?;
        let line = record.position().map_or(n as u64 + 1, |p| p.line());
        let [name, value] = [record.get(0), record.get(1)];
        let (Some(name), Some(value), 2) = (name, value, record.len()) else {
            bail!("{path}:{line}: expected two fields, class and prior");
        };
        let Ok(value) = value.parse::<f64>() else {
            if n == 0 {
                continue; // the header
            }
            bail!("{path}:{line}: prior `{value}` is not a number");
        };
        if !value.is_finite() {
            bail!("{path}:{line}: prior `{value}` is not a finite number");
        }
        if let Some(&i) = index.get(name) {
            priors[i] = value.clamp(0.0, 1.0);
        }
    }
    Ok(priors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_class_prior_is_the_share_of_its_rows_the_students_sense_perceived() {
        let dir = tempfile::tempdir().unwrap();
        let labels = file(
            &dir,
            "vggsounder.csv",
            "video_id,label,modality,background_music\n\
             a_000000,\"bird chirping, tweeting\",A,False\n\
             b_000010,\"bird chirping, tweeting\",AV,False\n\
             c_000020,\"bird chirping, tweeting\",V,True\n\
             c_000020,sailing,V,True\n",
        );
        let audio = vggsounder_priors(&labels, Modality::Audio).unwrap();
        let visual = vggsounder_priors(&labels, Modality::Visual).unwrap();
        let get = |v: &[ClassPrior], c: &str| v.iter().find(|p| p.class == c).unwrap().clone();
        assert_eq!(get(&audio, "bird chirping, tweeting").rows, 3);
        assert!((get(&audio, "bird chirping, tweeting").prior - 2.0 / 3.0).abs() < 1e-12);
        assert!((get(&visual, "bird chirping, tweeting").prior - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(get(&audio, "sailing").prior, 0.0);
        assert_eq!(get(&visual, "sailing").prior, 1.0);

        // Written and read back through heuristic.prior_csv's reader, commas and all.
        let out = dir.path().join("prior.csv");
        write_priors(&out, &audio).unwrap();
        let classes = ["sailing", "bird chirping, tweeting", "dog barking"].map(String::from);
        let read = read_priors(out.to_str().unwrap(), &classes).unwrap();
        assert_eq!(read[0], 0.0);
        assert!((read[1] - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(read[2], 0.5, "a class the file does not list");
    }

    #[test]
    fn bad_rows_are_named_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let labels = file(&dir, "l.csv", "label,modality\nsailing,AV\nsailing,X\n");
        let err = vggsounder_priors(&labels, Modality::Audio).unwrap_err();
        assert!(
            format!("{err:#}").contains("l.csv:3: modality `X`"),
            "{err:#}"
        );
        let labels = file(&dir, "m.csv", "label,sense\nsailing,AV\n");
        let err = vggsounder_priors(&labels, Modality::Audio).unwrap_err();
        assert!(
            format!("{err:#}").contains("no `modality` column"),
            "{err:#}"
        );

        let classes = ["sailing".to_string()];
        let prior = file(&dir, "p.csv", "class,prior\nsailing,0.9\nsailing,high\n");
        let err = read_priors(prior.to_str().unwrap(), &classes).unwrap_err();
        assert!(
            format!("{err:#}").contains("p.csv:3: prior `high`"),
            "{err:#}"
        );
        let prior = file(&dir, "q.csv", "sailing,0.9,1\n");
        let err = read_priors(prior.to_str().unwrap(), &classes).unwrap_err();
        assert!(
            format!("{err:#}").contains("q.csv:1: expected two fields"),
            "{err:#}"
        );
        let prior = file(&dir, "r.csv", "sailing,NaN\n");
        assert!(read_priors(prior.to_str().unwrap(), &classes).is_err());
        let missing = dir.path().join("none.csv");
        let err = read_priors(missing.to_str().unwrap(), &classes).unwrap_err();
        assert!(
            format!("{err:#}").contains("heuristic.prior_csv"),
            "{err:#}"
        );
    }
}
