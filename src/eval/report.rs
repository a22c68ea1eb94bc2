//! Self-contained HTML reports with inline SVG plots drawn by plotters' SVG backend (no
//! scripts, no network): the run report every `strata train` writes beside its metrics.

use anyhow::{Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

/// One named series of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// A labelled scatter point: `(label, x, (x_lo, x_hi), y, (y_lo, y_hi))`.
pub type Point = (String, f64, (f64, f64), f64, (f64, f64));

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Series colours (matplotlib's first six).
const COLORS: [(u8, u8, u8); 6] = [
    (0x1f, 0x77, 0xb4),
    (0xd6, 0x27, 0x28),
    (0x2c, 0xa0, 0x2c),
    (0xff, 0x7f, 0x0e),
    (0x94, 0x67, 0xbd),
    (0x8c, 0x56, 0x4b),
];

fn color(i: usize) -> RGBColor {
    let (r, g, b) = COLORS[i % COLORS.len()];
    RGBColor(r, g, b)
}

/// A chart's SVG, or a one-line SVG saying why it could not be drawn.
fn svg_or_note(w: u32, h: u32, draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), String>) -> String {
    let mut svg = String::new();
    let outcome = {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        draw(&root).and_then(|_| root.present().map_err(msg))
    };
    match outcome {
        Ok(()) => svg,
        Err(e) => format!(
            "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='40'><text x='8' y='20'>chart not drawn: {}</text></svg>",
            esc(&e)
        ),
    }
}

/// A plotters error as the note a chart shows instead.
fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// `lo..hi` widened when empty or degenerate, so an axis always has a span.
fn span(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if (hi - lo).abs() <= 1e-12 * hi.abs().max(1e-30) {
        let pad = 0.5 * lo.abs().max(1e-3);
        return (lo - pad, hi + pad);
    }
    (lo, hi)
}

/// A white chart titled `title` over `x` and `y`, its axes ticked at round values and labelled.
fn axes<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
    x: (f64, f64),
    y: (f64, f64),
    x_label: &str,
    y_label: Option<&str>,
) -> Result<ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>, String> {
    root.fill(&WHITE).map_err(msg)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(58)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)
        .map_err(msg)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_label)
        .x_labels(6)
        .y_labels(5)
        .x_label_formatter(&|v| fmt_tick(*v))
        .y_label_formatter(&|v| fmt_tick(*v))
        .light_line_style(RGBColor(238, 238, 238));
    if let Some(y_label) = y_label {
        mesh.y_desc(y_label);
    }
    mesh.draw().map_err(msg)?;
    Ok(chart)
}

/// A line chart of `series` (empty series are left out) as an SVG element, drawn with
/// plotters; ticks at round values (whole steps on a step axis).
pub fn line_chart(title: &str, x_label: &str, series: &[Series]) -> String {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let min = |f: fn(&(f64, f64)) -> f64| pts.iter().map(f).fold(f64::INFINITY, f64::min);
    let max = |f: fn(&(f64, f64)) -> f64| pts.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
    let (x0, x1) = span(min(|p| p.0), max(|p| p.0));
    let (y0, y1) = span(min(|p| p.1), max(|p| p.1));
    svg_or_note(560, 260, |root| {
        let mut chart = axes(root, title, (x0, x1), (y0, y1), x_label, None)?;
        if pts.is_empty() {
            return root
                .draw(&Text::new("no data", (70, 120), ("sans-serif", 12)))
                .map_err(msg);
        }
        for (i, (name, s)) in series.iter().filter(|s| !s.1.is_empty()).enumerate() {
            let c = color(i);
            let points = s.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite());
            let drawn = if s.len() == 1 {
                chart.draw_series(points.map(|p| Circle::new(p, 3, c.filled())))
            } else {
                chart.draw_series(LineSeries::new(points, c.stroke_width(2)))
            };
            drawn
                .map_err(msg)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(msg)
    })
}

/// A scatter of labelled points with error bars `(label, x, (x_lo, x_hi), y, (y_lo, y_hi))`;
/// each of `lines` joins the points it lists, in its order (a sweep's frontier, drawn grey).
pub fn scatter_chart(title: &str, x_label: &str, y_label: &str, pts: &[Point], lines: &[Vec<usize>]) -> String {
    let fin: Vec<&Point> = pts.iter().filter(|p| p.1.is_finite() && p.3.is_finite()).collect();
    // The scatter's axes always include 0, padded by a tenth of the span.
    let bound = |f: &dyn Fn(&&Point) -> [f64; 3]| {
        let v: Vec<f64> = fin.iter().flat_map(f).filter(|x| x.is_finite()).collect();
        let lo = v.iter().copied().fold(0.0, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        let pad = ((hi - lo) * 0.1).max(1e-3);
        (lo - pad, hi + pad)
    };
    let (x0, x1) = bound(&|p| [p.1, p.2 .0, p.2 .1]);
    let (y0, y1) = bound(&|p| [p.3, p.4 .0, p.4 .1]);
    svg_or_note(560, 340, |root| {
        let mut chart = axes(root, title, (x0, x1), (y0, y1), x_label, Some(y_label))?;
        if fin.is_empty() {
            return root
                .draw(&Text::new("no data", (70, 120), ("sans-serif", 12)))
                .map_err(msg);
        }
        let zero = RGBColor(190, 190, 190);
        chart
            .draw_series([
                PathElement::new(vec![(0.0, y0), (0.0, y1)], zero),
                PathElement::new(vec![(x0, 0.0), (x1, 0.0)], zero),
            ])
            .map_err(msg)?;
        for line in lines {
            let at: Vec<(f64, f64)> = line
                .iter()
                .filter_map(|&i| pts.get(i))
                .filter(|p| p.1.is_finite() && p.3.is_finite())
                .map(|p| (p.1, p.3))
                .collect();
            chart
                .draw_series(LineSeries::new(at, FRONTIER.stroke_width(1)))
                .map_err(msg)?;
        }
        for (i, p) in fin.iter().enumerate() {
            let c = color(i);
            let mut bars = Vec::new();
            if p.2 .0.is_finite() && p.2 .1.is_finite() {
                bars.push(PathElement::new(vec![(p.2 .0, p.3), (p.2 .1, p.3)], c));
            }
            if p.4 .0.is_finite() && p.4 .1.is_finite() {
                bars.push(PathElement::new(vec![(p.1, p.4 .0), (p.1, p.4 .1)], c));
            }
            chart.draw_series(bars).map_err(msg)?;
            chart
                .draw_series([EmptyElement::at((p.1, p.3))
                    + Circle::new((0, 0), 4, c.filled())
                    + Text::new(p.0.clone(), (6, -14), ("sans-serif", 11).into_font().color(&c))])
                .map_err(msg)?;
        }
        Ok(())
    })
}

/// The grey of a sweep's frontier line (tests count its lines by it).
pub const FRONTIER: RGBColor = RGBColor(0x88, 0x88, 0x88);

/// A tick label: whole numbers as such (steps), small and large values in e-notation, the rest
/// with up to four significant decimals and no trailing zeros.
fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if v == v.round() && a < 1e6 {
        format!("{v:.0}")
    } else if a != 0.0 && !(1e-2..1e6).contains(&a) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Wraps sections (heading, HTML) into a page.
pub fn page(title: &str, sections: &[(String, String)]) -> String {
    let mut s = format!(
        "<!doctype html><html><head><meta charset='utf-8'><title>{0}</title>\
         <style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}\
         .plots{{display:flex;flex-wrap:wrap;gap:8px}} table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body><h1>{0}</h1>",
        esc(title)
    );
    for (h, body) in sections {
        let _ = write!(s, "<h2>{}</h2>{body}", esc(h));
    }
    s + "</body></html>"
}

/// `report.html` for a training run: loss, learning rate per group, domain share (scheduled and
/// realised), micro-batch and memory over the steps, from its `metrics.jsonl`.
pub fn write_run_report(out: &Path) -> Result<()> {
    let path = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let steps: Vec<&Value> = lines.iter().filter(|v| v.get("micro_batch").is_some()).collect();
    let series = |name: &str, f: &dyn Fn(&Value) -> Option<f64>| -> Series {
        let pts = steps
            .iter()
            .filter_map(|v| Some((v["step"].as_f64()?, f(v)?)))
            .collect();
        (name.to_string(), pts)
    };
    let field = |k: &'static str| move |v: &Value| v.get(k)?.as_f64();
    let evals = |key: &'static str| -> Series {
        let pts = lines
            .iter()
            .filter_map(|v| Some((v["step"].as_f64()?, v.get(key)?.get("loss")?.as_f64()?)))
            .collect();
        (format!("held-out {key}"), pts)
    };
    let mut groups: Vec<String> = steps
        .first()
        .and_then(|v| v["lr"].as_object())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    groups.sort();
    let lrs: Vec<Series> = groups
        .iter()
        .map(|g| series(g, &|v: &Value| v["lr"].get(g)?.as_f64()))
        .collect();
    let gb = |k: &'static str| move |v: &Value| Some(v.get(k)?.as_f64()? / 1e9);
    // Each term of the loss a run adds to cross-entropy, where it is not zero throughout.
    let terms: Vec<Series> = ["ce", "ewc", "contrastive", "distill"]
        .iter()
        .map(|&k| series(k, &move |v: &Value| v.get(k)?.as_f64()))
        .filter(|s| s.0 != "ce" && s.1.iter().any(|p| p.1 != 0.0))
        .collect();
    let mut losses = vec![series("train", &field("loss")), evals("eval"), evals("eval_general")];
    if !terms.is_empty() {
        losses.insert(1, series("cross-entropy", &field("ce")));
    }
    let mut plots = vec![
        line_chart("loss", "step", &losses),
        line_chart("learning rate by group", "step", &lrs),
        line_chart(
            "domain share of the rows",
            "step",
            &[
                series("scheduled", &field("domain_share")),
                series("realised (cumulative)", &field("domain_share_realised")),
            ],
        ),
        line_chart(
            "micro-batch (rows per forward)",
            "step",
            &[series("micro-batch", &field("micro_batch"))],
        ),
        line_chart(
            "memory (GB)",
            "step",
            &[
                series("peak RSS", &gb("peak_rss")),
                series("RSS", &gb("rss")),
                series("peak on the device", &gb("peak_device")),
                series("device in use", &gb("device_used")),
            ],
        ),
        line_chart("throughput (tok/s)", "step", &[series("tok/s", &field("tok_per_s"))]),
    ];
    if !terms.is_empty() {
        plots.insert(1, line_chart("loss terms added to cross-entropy", "step", &terms));
    }
    let html = page(
        &format!("strata run: {}", out.display()),
        &[(
            "Over the run".into(),
            format!("<div class='plots'>{}</div>", plots.join("")),
        )],
    );
    crate::util::write_atomic(&out.join("report.html"), html.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Titles and names are escaped, a step axis is labelled in whole steps (never `10.000`),
    /// a learning rate in e-notation, and an empty chart says so.
    #[test]
    fn charts_escape_names_and_label_ticks_readably() {
        let steps: Vec<(f64, f64)> = (0..=40).map(|i| (i as f64, 3.0 - i as f64 * 0.02)).collect();
        // The text of every <text> element.
        let texts = |svg: &str| -> Vec<String> {
            svg.split("</text>")
                .filter_map(|t| t.rsplit_once('>').map(|(_, x)| x.trim().to_string()))
                .collect()
        };
        let s = line_chart("a<b", "step", &[("s&t".into(), steps)]);
        let t = texts(&s);
        assert!(t.contains(&"a&lt;b".into()) && t.contains(&"s&amp;t".into()), "{t:?}");
        assert!(t.contains(&"10".into()) && t.contains(&"20".into()), "{t:?}");
        assert!(!t.iter().any(|x| x.ends_with(".000")), "{t:?}");
        assert!(s.contains("<polyline"), "{s}");
        let lr: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 2e-4 * (1.0 + i as f64))).collect();
        let t = texts(&line_chart("lr", "step", &[("lr".into(), lr)]));
        assert!(t.iter().any(|x| x.ends_with("e-4") || x.ends_with("e-3")), "{t:?}");
        assert!(line_chart("t", "x", &[]).contains("no data"));
        assert_eq!(
            (fmt_tick(10.0), fmt_tick(0.25), fmt_tick(2e-5), fmt_tick(2.71234)),
            ("10".into(), "0.25".into(), "2.0e-5".into(), "2.7123".into())
        );
        let sc = scatter_chart(
            "x",
            "f",
            "g",
            &[("run".into(), 1.0, (0.5, 1.5), -2.0, (-3.0, -1.0))],
            &[vec![0]],
        );
        assert!(texts(&sc).contains(&"run".into()) && sc.contains("<circle"), "{sc}");
    }
}
