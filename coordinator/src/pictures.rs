//! The report's pictures, beside `report.md`: `gap.png`, each class's sensory gap before and
//! after distillation with the hard classes marked, and `loss.png`, the distillation loss and
//! its parts over the steps of `metrics.jsonl`. Drawn by plotters into memory and encoded by
//! `png`. Text is DejaVu Sans embedded in the binary: a slim container with no fonts draws the
//! same pictures as a desktop.
//!
//! A picture is a view of numbers `report.json` and `metrics.jsonl` already hold, so one that
//! cannot be drawn is logged with its cause and named in `report.md`; it never fails the run.

use crate::report::Report;
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

pub const GAP_FILE: &str = "gap.png";
pub const LOSS_FILE: &str = "loss.png";
/// Both pictures' width; the gap picture grows in height with its rows.
pub const WIDTH: u32 = 1200;
pub const LOSS_HEIGHT: u32 = 700;
/// Rows the gap picture shows at most (VGGSound has 309 classes): past this it keeps the hard
/// classes and the largest gaps, and says so. `report.md`'s table has every class.
pub const MAX_ROWS: usize = 60;
const ROW_PX: u32 = 26;
/// Title, subtitle and legend above the chart; axis and margin below it.
const GAP_TOP_PX: u32 = 115;
const GAP_BOTTOM_PX: u32 = 80;

const FONT: &str = "sans-serif";
/// Hard classes in oranges, the others in blues; "before" light, "after" dark. The pairs
/// differ in lightness as well as hue, so they stay apart in grey or to a colour-blind reader.
pub const HARD_BEFORE: RGBColor = RGBColor(253, 174, 97);
pub const HARD_AFTER: RGBColor = RGBColor(215, 48, 39);
pub const OTHER_BEFORE: RGBColor = RGBColor(171, 217, 233);
pub const OTHER_AFTER: RGBColor = RGBColor(49, 54, 149);
const GRID: RGBColor = RGBColor(225, 225, 225);
pub const TOTAL_LINE: RGBColor = RGBColor(0, 0, 0);
pub const KL_LINE: RGBColor = RGBColor(215, 48, 39);
pub const CE_LINE: RGBColor = RGBColor(49, 54, 149);

/// An RGB picture in memory, 3 bytes a pixel, rows top to bottom.
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Picture {
    fn blank(width: u32, height: u32) -> Picture {
        Picture {
            width,
            height,
            rgb: vec![255; (width * height * 3) as usize],
        }
    }

    fn area(&mut self) -> DrawingArea<BitMapBackend<'_>, Shift> {
        BitMapBackend::with_buffer(&mut self.rgb, (self.width, self.height)).into_drawing_area()
    }

    pub fn png(&self) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&self.rgb)?;
        writer.finish()?;
        Ok(bytes)
    }
}

/// One picture `write` tried: its file name, what it shows, and why it is missing if it is.
pub struct Drawn {
    pub file: &'static str,
    pub title: &'static str,
    pub error: Option<String>,
}

/// Draws both pictures into `out_dir`. A picture that fails (a drawing error or a panic in the
/// plotting code) is logged and reported in its `Drawn`; the other is still drawn.
pub fn write(out_dir: &Path, report: &Report) -> Vec<Drawn> {
    let metrics = out_dir.join("metrics.jsonl");
    vec![
        write_one(out_dir, GAP_FILE, "Sensory gap per class", || gap(report)),
        write_one(out_dir, LOSS_FILE, "Distillation loss", || {
            let text = std::fs::read_to_string(&metrics)
                .with_context(|| format!("reading {}", metrics.display()))?;
            loss(report, &text)
        }),
    ]
}

fn write_one(
    out_dir: &Path,
    file: &'static str,
    title: &'static str,
    draw: impl FnOnce() -> Result<Picture>,
) -> Drawn {
    let path = out_dir.join(file);
    let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(draw))
        .unwrap_or_else(|_| Err(anyhow!("the plotting code panicked")))
        .and_then(|p| p.png())
        .and_then(|bytes| {
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
        });
    let error = made.err().map(|e| format!("{e:#}"));
    if let Some(e) = &error {
        tracing::error!(picture = file, error = %e, "picture not drawn (report.json and report.md have its numbers)");
    }
    Drawn { file, title, error }
}

/// Registers DejaVu Sans, regular and bold, as plotters' "sans-serif" (once per process).
fn fonts() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            for (style, name, bytes) in [
                (FontStyle::Normal, "regular", dejavu::sans::regular()),
                (FontStyle::Bold, "bold", dejavu::sans::bold()),
            ] {
                plotters::style::register_font(FONT, style, bytes)
                    .map_err(|_| format!("DejaVu Sans {name} is not a font plotters reads"))?;
            }
            Ok(())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

fn text(size: u32, color: RGBColor) -> TextStyle<'static> {
    (FONT, size).into_font().color(&color)
}

fn bold(size: u32, color: RGBColor) -> TextStyle<'static> {
    (FONT, size, FontStyle::Bold).into_font().color(&color)
}

fn drawing<E: std::error::Error + Send + Sync + 'static>(
    r: std::result::Result<(), DrawingAreaErrorKind<E>>,
) -> Result<()> {
    r.map_err(|e| anyhow!("plotters: {e}"))
}

/// One class of the gap picture, gaps in percentage points.
#[derive(Debug, Clone, PartialEq)]
pub struct GapRow {
    pub class: String,
    pub hard: bool,
    pub before: f64,
    pub after: f64,
}

/// Every class's gap before and after, the largest gap before first; at most `MAX_ROWS`,
/// keeping the hard classes first (the largest of them if there are more), then the largest
/// other gaps.
pub fn gap_rows(r: &Report) -> Vec<GapRow> {
    let mut rows: Vec<GapRow> = r
        .teacher
        .per_class
        .iter()
        .map(|(class, t)| GapRow {
            class: class.clone(),
            hard: r.hard_classes.contains(class),
            before: 100.0 * (t - r.student.before.per_class[class]),
            after: 100.0 * (t - r.student.after.per_class[class]),
        })
        .collect();
    let largest_first = |a: &GapRow, b: &GapRow| b.before.total_cmp(&a.before);
    rows.sort_by(|a, b| b.hard.cmp(&a.hard).then(largest_first(a, b)));
    rows.truncate(MAX_ROWS);
    rows.sort_by(largest_first);
    rows
}

pub fn gap_height(rows: usize) -> u32 {
    GAP_TOP_PX + GAP_BOTTOM_PX + ROW_PX * rows.max(1) as u32
}

/// The sensory gap picture: per class, a light bar for the gap before distillation and a dark
/// one for after; hard classes orange with their names in bold, the others blue.
pub fn gap(r: &Report) -> Result<Picture> {
    fonts()?;
    let rows = gap_rows(r);
    if rows.is_empty() {
        bail!("the report has no classes");
    }
    let mut picture = Picture::blank(WIDTH, gap_height(rows.len()));
    {
        let root = picture.area();
        drawing(root.fill(&WHITE))?;
        let (top, chart_area) = root.split_vertically(GAP_TOP_PX);
        gap_titles(&top, r, rows.len())?;
        gap_chart(&chart_area, &rows)?;
        drawing(root.present())?;
    }
    Ok(picture)
}

fn gap_titles(top: &DrawingArea<BitMapBackend<'_>, Shift>, r: &Report, shown: usize) -> Result<()> {
    let title = format!(
        "Sensory gap per class: {} teacher's accuracy minus {} student's",
        r.teacher_modality, r.student_modality
    );
    let hard = r.hard_classes.len();
    let total = r.teacher.per_class.len();
    let mut sub = format!(
        "before and after {} distillation steps; {hard} hard classes (the heuristic's pick) in \
         orange and bold",
        r.steps
    );
    if shown < total {
        sub += &format!("; {shown} of {total} classes shown: the hard ones, then the largest gaps");
    }
    drawing(top.draw(&Text::new(title, (20, 18), bold(24, BLACK))))?;
    drawing(top.draw(&Text::new(sub, (20, 54), text(17, RGBColor(60, 60, 60)))))?;
    // Only the colours the picture uses: no "other" entries when every class is hard.
    let entries: Vec<(RGBColor, &str)> = GAP_SERIES
        .iter()
        .filter(|s| if s.0 { hard > 0 } else { hard < total })
        .map(|s| (s.2, s.3))
        .collect();
    legend(top, 92, &entries, false)
}

/// Class names longer than this are cut with an ellipsis.
const NAME_CHARS: usize = 40;

fn short_name(name: &str) -> String {
    if name.chars().count() <= NAME_CHARS {
        return name.to_string();
    }
    name.chars().take(NAME_CHARS - 1).collect::<String>() + "…"
}

/// The x range in percentage points: from the smallest gap (or 0) to the largest, a little
/// wider so no bar touches the frame.
fn gap_range(rows: &[GapRow]) -> std::ops::Range<f64> {
    let values = rows.iter().flat_map(|r| [r.before, r.after]);
    let (lo, hi) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = ((hi - lo) * 0.05).max(2.0);
    (lo - if lo < 0.0 { pad } else { 0.0 })..(hi + pad)
}

fn gap_chart(area: &DrawingArea<BitMapBackend<'_>, Shift>, rows: &[GapRow]) -> Result<()> {
    let names: Vec<String> = rows.iter().map(|r| short_name(&r.class)).collect();
    let mut name_px = 0;
    for (name, row) in names.iter().zip(rows) {
        let style = if row.hard {
            bold(16, BLACK)
        } else {
            text(16, BLACK)
        };
        let (w, _) = area
            .estimate_text_size(name, &style)
            .map_err(|e| anyhow!("plotters: {e}"))?;
        name_px = name_px.max(w);
    }
    let n = rows.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .margin_right(30)
        .margin_bottom(10)
        .x_label_area_size(60)
        .y_label_area_size(name_px + 24)
        .build_cartesian_2d(gap_range(rows), 0.0..n)
        .map_err(|e| anyhow!("plotters: {e}"))?;
    drawing(
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .bold_line_style(GRID)
            .light_line_style(WHITE)
            .x_desc("teacher accuracy minus student accuracy (percentage points)")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .label_style(text(16, BLACK))
            .axis_desc_style(text(17, BLACK))
            .draw(),
    )?;
    // Row i is drawn at the top for i = 0: its band is [n - i - 1, n - i].
    let band = |i: usize| n - i as f64 - 1.0;
    for (hard, after, color, _) in GAP_SERIES {
        let bars: Vec<_> = rows
            .iter()
            .enumerate()
            .filter(|(_, row)| row.hard == hard)
            .map(|(i, row)| {
                let (value, y0, y1) = if after {
                    (row.after, band(i) + 0.12, band(i) + 0.48)
                } else {
                    (row.before, band(i) + 0.52, band(i) + 0.88)
                };
                Rectangle::new([(0.0, y0), (value, y1)], color.filled())
            })
            .collect();
        drawing(chart.draw_series(bars).map(|_| ()))?;
    }
    drawing(
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, 0.0), (0.0, n)],
                BLACK.stroke_width(1),
            )))
            .map(|_| ()),
    )?;
    let base = area.get_base_pixel();
    for (i, (name, row)) in names.iter().zip(rows).enumerate() {
        // backend_coord is in the whole picture's pixels, `area` starts below the titles.
        let (x, y) = chart.backend_coord(&(chart.x_range().start, band(i) + 0.5));
        let (x, y) = (x - base.0, y - base.1);
        let style = if row.hard {
            bold(16, HARD_AFTER)
        } else {
            text(16, BLACK)
        };
        let style = style.pos(Pos::new(HPos::Right, VPos::Center));
        drawing(area.draw(&Text::new(name.as_str(), (x - 10, y), style)))?;
    }
    Ok(())
}

/// The gap picture's bars: (hard, after, colour, legend).
const GAP_SERIES: [(bool, bool, RGBColor, &str); 4] = [
    (true, false, HARD_BEFORE, "hard class, before distillation"),
    (true, true, HARD_AFTER, "hard class, after"),
    (false, false, OTHER_BEFORE, "other class, before"),
    (false, true, OTHER_AFTER, "other class, after"),
];

/// A legend in one row under the titles, so it never hides a bar or a line: a swatch (or a
/// short line) and a label per entry.
fn legend(
    top: &DrawingArea<BitMapBackend<'_>, Shift>,
    y: i32,
    entries: &[(RGBColor, &str)],
    lines: bool,
) -> Result<()> {
    let mut x = 20;
    for &(color, label) in entries {
        if lines {
            drawing(top.draw(&PathElement::new(
                vec![(x, y), (x + 24, y)],
                color.stroke_width(3),
            )))?;
        } else {
            let swatch = Rectangle::new([(x, y - 7), (x + 24, y + 7)], color.filled());
            drawing(top.draw(&swatch))?;
        }
        let style = text(16, BLACK).pos(Pos::new(HPos::Left, VPos::Center));
        drawing(top.draw(&Text::new(label, (x + 32, y), style.clone())))?;
        let (w, _) = top
            .estimate_text_size(label, &style)
            .map_err(|e| anyhow!("plotters: {e}"))?;
        x += 32 + w as i32 + 36;
    }
    Ok(())
}

/// Rank 0's distillation steps of this run in `metrics.jsonl`: step -> (loss, kl, ce). A step
/// logged twice (a run resumed from a checkpoint repeats the steps after it) keeps its last
/// record; lines of other runs, stages and ranks are skipped, and so are lines that do not
/// parse (a run killed mid-write leaves a partial one), with a warning.
pub fn loss_points(run_id: &str, metrics: &str) -> BTreeMap<u64, [f64; 3]> {
    let mut points = BTreeMap::new();
    let mut unreadable = Vec::new();
    for (n, line) in metrics.lines().enumerate() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            unreadable.push(n + 1);
            continue;
        };
        let is = |k: &str, want: &str| v.get(k).and_then(|x| x.as_str()) == Some(want);
        if !is("run_id", run_id) || !is("stage", "distill") || v["rank"].as_u64() != Some(0) {
            continue;
        }
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
        match (v["step"].as_u64(), num("loss"), num("kl"), num("ce")) {
            (Some(step), Some(loss), Some(kl), Some(ce)) => {
                points.insert(step, [loss, kl, ce]);
            }
            _ => unreadable.push(n + 1),
        }
    }
    if !unreadable.is_empty() {
        tracing::warn!(lines = ?unreadable, "metrics.jsonl lines skipped for the loss picture");
    }
    points
}

/// The y axis of the loss picture: logarithmic when every value is positive and they span
/// more than a factor of 20, linear otherwise.
fn loss_range(points: &BTreeMap<u64, [f64; 3]>) -> (f64, f64, bool) {
    let values = points.values().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > 0.0 && hi / lo > 20.0 {
        (lo / 1.3, hi * 1.3, true)
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-3);
        (
            lo.min(0.0) - if lo < 0.0 { pad } else { 0.0 },
            hi + pad,
            false,
        )
    }
}

/// The loss picture: rank 0's total distillation loss and its two parts over the steps.
pub fn loss(r: &Report, metrics: &str) -> Result<Picture> {
    fonts()?;
    let points = loss_points(&r.run_id, metrics);
    if points.is_empty() {
        bail!(
            "metrics.jsonl has no distillation step of run {} from rank 0",
            r.run_id
        );
    }
    let mut picture = Picture::blank(WIDTH, LOSS_HEIGHT);
    {
        let root = picture.area();
        drawing(root.fill(&WHITE))?;
        let (top, chart_area) = root.split_vertically(GAP_TOP_PX);
        let title = format!(
            "Distillation loss of run {}, rank 0 ({} to {} student)",
            r.run_id, r.teacher_modality, r.student_modality
        );
        let sub = format!(
            "total = {a} × T² × KL to the teacher's answers + {b} × cross-entropy on the \
             labels, temperature T = {t}",
            a = r.alpha,
            b = 1.0 - r.alpha,
            t = r.temperature
        );
        drawing(top.draw(&Text::new(title, (20, 18), bold(24, BLACK))))?;
        drawing(top.draw(&Text::new(sub, (20, 54), text(17, RGBColor(60, 60, 60)))))?;
        let entries = LOSS_LINES.map(|(_, color, label)| (color, label));
        legend(&top, 92, &entries, true)?;
        loss_chart(&chart_area, &points)?;
        drawing(root.present())?;
    }
    Ok(picture)
}

fn loss_chart(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    points: &BTreeMap<u64, [f64; 3]>,
) -> Result<()> {
    let (lo, hi, log) = loss_range(points);
    if log {
        loss_chart_on(area, points, (lo..hi).log_scale(), "loss (log scale)")
    } else {
        loss_chart_on(area, points, lo..hi, "loss")
    }
}

/// The loss chart on a y axis of either kind (`loss_range` picks it).
fn loss_chart_on<Y>(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    points: &BTreeMap<u64, [f64; 3]>,
    y: Y,
    y_desc: &str,
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let first = *points.keys().next().unwrap_or(&0);
    let last = (*points.keys().last().unwrap_or(&0)).max(first + 1);
    let mut chart = ChartBuilder::on(area)
        .margin_right(30)
        .margin_bottom(10)
        .x_label_area_size(60)
        .margin_left(15)
        .y_label_area_size(100)
        .build_cartesian_2d(first as f64..last as f64, y)
        .map_err(|e| anyhow!("plotters: {e}"))?;
    drawing(
        chart
            .configure_mesh()
            .bold_line_style(GRID)
            .light_line_style(WHITE)
            .x_desc("distillation step")
            .y_desc(y_desc)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .label_style(text(16, BLACK))
            .axis_desc_style(text(17, BLACK))
            .draw(),
    )?;
    for (part, color, _) in LOSS_LINES {
        let line = points
            .iter()
            .map(|(s, v)| (*s as f64, v[part]))
            .filter(|(_, v)| v.is_finite());
        let series = chart.draw_series(LineSeries::new(line, color.stroke_width(2)));
        drawing(series.map(|_| ()))?;
    }
    Ok(())
}

/// The loss picture's lines: (part of a `loss_points` value, colour, legend).
const LOSS_LINES: [(usize, RGBColor, &str); 3] = [
    (0, TOTAL_LINE, "total (minimised)"),
    (1, KL_LINE, "KL divergence to the teacher"),
    (2, CE_LINE, "cross-entropy on the labels"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Accuracy, BeforeAfter, Split};
    use std::collections::HashSet;

    /// `n` classes; the ones in `hard` start far behind the teacher and nearly catch up.
    fn report(n: usize, hard: &[usize]) -> Report {
        let name = |i: usize| format!("class number {i}");
        let per = |f: &dyn Fn(usize) -> f64| (0..n).map(|i| (name(i), f(i))).collect();
        let before = |i: usize| {
            if hard.contains(&i) {
                0.1
            } else {
                0.9 - 0.01 * i as f64
            }
        };
        let after = |i: usize| if hard.contains(&i) { 0.8 } else { 0.9 };
        let split = |f: &dyn Fn(usize) -> f64| Split {
            overall: 0.5,
            hard: 0.5,
            other: 0.5,
            per_class: per(f),
        };
        let teacher: BTreeMap<String, f64> = per(&|_| 0.95);
        Report {
            run_id: "pictures-test".into(),
            direction: "visual_to_audio".into(),
            teacher_modality: "visual".into(),
            student_modality: "audio".into(),
            workers: 2,
            steps: 50,
            wall_seconds: 1.0,
            hard_classes: hard.iter().map(|&i| name(i)).collect(),
            distilled_on: "hard".into(),
            taught_classes: hard.iter().map(|&i| name(i)).collect(),
            heuristic_vs_construction: None,
            sensory_gap: teacher
                .iter()
                .map(|(c, t)| (c.clone(), t - before(0)))
                .collect(),
            teacher: Accuracy {
                overall: 0.95,
                per_class: teacher,
            },
            student: BeforeAfter {
                before: split(&before),
                after: split(&after),
            },
            alpha: 0.5,
            temperature: 2.0,
            final_loss: 0.1,
            student_digest: String::new(),
            config_digest: String::new(),
            final_checkpoint: None,
        }
    }

    /// `steps` distillation steps of `run` from ranks 0 and 1, a pretraining stage, another
    /// run and a partial line around them.
    fn metrics(run: &str, steps: u64) -> String {
        let line = |run: &str, stage: &str, rank: u32, step: u64, loss: f64| {
            serde_json::json!({"run_id": run, "stage": stage, "rank": rank, "step": step,
                "loss": loss, "kl": 0.5 * loss, "ce": 1.5 * loss})
            .to_string()
        };
        let mut lines = vec![
            line("older", "distill", 0, 1, 99.0),
            "{\"run_id\": \"".into(),
        ];
        lines.extend((1..=steps).map(|s| line(run, "pretrain_audio", 0, s, 50.0)));
        for s in 1..=steps {
            lines.push(line(run, "distill", 0, s, 4.0 / s as f64));
            lines.push(line(run, "distill", 1, s, 77.0));
        }
        lines.join("\n") + "\n"
    }

    /// The picture's PNG decoded: its size and the set of its colours.
    fn decoded(p: &Picture) -> ((u32, u32), HashSet<[u8; 3]>) {
        let bytes = p.png().unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let colours = buf[..info.buffer_size()]
            .chunks(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect();
        ((info.width, info.height), colours)
    }

    fn has(colours: &HashSet<[u8; 3]>, c: RGBColor) -> bool {
        colours.contains(&[c.0, c.1, c.2])
    }

    #[test]
    fn gap_picture_marks_hard_classes_in_their_own_colours() {
        let ((w, h), colours) = decoded(&gap(&report(6, &[1, 4])).unwrap());
        assert_eq!((w, h), (WIDTH, gap_height(6)));
        for c in [HARD_BEFORE, HARD_AFTER, OTHER_BEFORE, OTHER_AFTER] {
            assert!(has(&colours, c), "no {c:?} in the gap picture");
        }
        // Anti-aliased text: many shades of grey beside the bars' few flat colours.
        assert!(colours.len() > 30, "{} colours: no text?", colours.len());
    }

    #[test]
    fn gap_picture_without_hard_classes_has_no_hard_colour() {
        let (_, colours) = decoded(&gap(&report(4, &[])).unwrap());
        assert!(!has(&colours, HARD_BEFORE) && !has(&colours, HARD_AFTER));
        assert!(has(&colours, OTHER_BEFORE) && has(&colours, OTHER_AFTER));
    }

    #[test]
    fn many_classes_keep_the_hard_ones_and_the_largest_gaps() {
        let hard = [3, 150, 300];
        let rows = gap_rows(&report(309, &hard));
        assert_eq!(rows.len(), MAX_ROWS);
        for i in hard {
            let name = format!("class number {i}");
            assert!(
                rows.iter().any(|r| r.class == name && r.hard),
                "{name} not shown"
            );
        }
        assert!(rows.windows(2).all(|w| w[0].before >= w[1].before));
        // The other classes' gap grows with their number: the largest ones are the last.
        assert!(rows.iter().any(|r| r.class == "class number 308"));
        assert!(!rows.iter().any(|r| r.class == "class number 0"));
        assert_eq!(
            gap(&report(309, &hard)).unwrap().height,
            gap_height(MAX_ROWS)
        );
    }

    #[test]
    fn long_class_names_are_cut() {
        let long = "a".repeat(100);
        assert_eq!(short_name(&long).chars().count(), NAME_CHARS);
        assert_eq!(short_name("dog barking"), "dog barking");
    }

    #[test]
    fn loss_points_are_rank_0_distillation_steps_of_the_run() {
        let points = loss_points("r", &metrics("r", 40));
        assert_eq!(points.len(), 40);
        assert_eq!(points[&2], [2.0, 1.0, 3.0]);
        assert!(loss_points("nobody", &metrics("r", 40)).is_empty());
    }

    #[test]
    fn loss_picture_draws_the_three_parts_on_a_log_axis() {
        let r = report(3, &[0]);
        let points = loss_points(&r.run_id, &metrics(&r.run_id, 200));
        assert!(
            loss_range(&points).2,
            "values over a factor of 300: log axis"
        );
        let ((w, h), colours) = decoded(&loss(&r, &metrics(&r.run_id, 200)).unwrap());
        assert_eq!((w, h), (WIDTH, LOSS_HEIGHT));
        for c in [KL_LINE, CE_LINE] {
            assert!(has(&colours, c), "no {c:?} line");
        }
        assert!(colours.len() > 30, "{} colours: no text?", colours.len());
    }

    #[test]
    fn loss_picture_of_a_run_without_steps_is_an_error() {
        let err = loss(&report(3, &[0]), &metrics("another", 5))
            .err()
            .unwrap();
        assert!(err.to_string().contains("pictures-test"), "{err}");
    }

    #[test]
    fn report_md_links_the_pictures_drawn_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let r = report(5, &[2]);
        // No metrics.jsonl: the loss picture cannot be drawn; the rest of the report is.
        crate::report::write(dir.path(), &r).unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("](gap.png)"), "{md}");
        assert!(!md.contains("](loss.png)"), "{md}");
        assert!(md.contains("(`loss.png`) was not drawn") && md.contains("metrics.jsonl"));
        assert!(md.contains("| class number 2 | yes |"), "{md}");
        assert!(dir.path().join("report.json").is_file());
        assert!(dir.path().join(GAP_FILE).is_file());
        assert!(!dir.path().join(LOSS_FILE).exists());

        std::fs::write(dir.path().join("metrics.jsonl"), metrics(&r.run_id, 10)).unwrap();
        crate::report::write(dir.path(), &r).unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(
            md.contains("](gap.png)") && md.contains("](loss.png)"),
            "{md}"
        );
        assert!(dir.path().join(LOSS_FILE).is_file());
    }
}
