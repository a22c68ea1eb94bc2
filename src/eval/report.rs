//! Self-contained HTML reports with inline SVG plots (no scripts, no network): the run report
//! every `strata train` writes beside its metrics.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

/// One named series of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// A labelled scatter point: `(label, x, (x_lo, x_hi), y, (y_lo, y_hi))`.
pub type Point = (String, f64, (f64, f64), f64, (f64, f64));

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A chart's plot area inside its `w x h` box (margins `l r t b`) and the data ranges it maps.
struct Frame {
    w: f64,
    h: f64,
    l: f64,
    r: f64,
    t: f64,
    b: f64,
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn xs(&self, x: f64) -> f64 {
        self.l + (x - self.x.0) / (self.x.1 - self.x.0).max(1e-12) * (self.w - self.l - self.r)
    }

    fn ys(&self, y: f64) -> f64 {
        self.h - self.b - (y - self.y.0) / (self.y.1 - self.y.0) * (self.h - self.t - self.b)
    }

    /// The border, five ticks on each axis and the axis labels.
    fn draw(&self, svg: &mut String, x_label: &str, y_label: Option<&str>) {
        let (w, h, l, r, t, b) = (self.w, self.h, self.l, self.r, self.t, self.b);
        let _ = write!(
            svg,
            "<rect x='{l}' y='{t}' width='{}' height='{}' fill='none' stroke='#999'/>",
            w - l - r,
            h - t - b
        );
        for k in 0..=4 {
            let x = self.x.0 + (self.x.1 - self.x.0) * k as f64 / 4.0;
            let y = self.y.0 + (self.y.1 - self.y.0) * k as f64 / 4.0;
            let _ = write!(
                svg,
                "<text x='{:.1}' y='{:.1}' text-anchor='middle'>{}</text><text x='{:.1}' y='{:.1}' text-anchor='end'>{}</text>",
                self.xs(x),
                h - b + 14.0,
                fmt_tick(x),
                l - 4.0,
                self.ys(y) + 4.0,
                fmt_tick(y)
            );
        }
        let _ = write!(
            svg,
            "<text x='{:.1}' y='{}' text-anchor='middle'>{}</text>",
            (l + w - r) / 2.0,
            h - 6.0,
            esc(x_label)
        );
        if let Some(y_label) = y_label {
            let mid = (t + h - b) / 2.0;
            let _ = write!(
                svg,
                "<text x='12' y='{mid:.1}' transform='rotate(-90 12 {mid:.1})' text-anchor='middle'>{}</text>",
                esc(y_label)
            );
        }
    }
}

/// A line chart of `series` (empty series are left out) as an SVG element.
pub fn line_chart(title: &str, x_label: &str, series: &[Series]) -> String {
    let (w, h, l, r, t, b) = (560.0, 260.0, 64.0, 16.0, 28.0, 40.0);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='11'>\
         <text x='{l}' y='16' font-size='13' font-weight='bold'>{}</text>",
        esc(title)
    );
    if pts.is_empty() {
        svg += "<text x='70' y='120'>no data</text></svg>";
        return svg;
    }
    let fold = |f: fn(f64, f64) -> f64, init: f64, by: fn(&(f64, f64)) -> f64| pts.iter().map(by).fold(init, f);
    let (x0, x1) = (
        fold(f64::min, f64::INFINITY, |p| p.0),
        fold(f64::max, f64::NEG_INFINITY, |p| p.0),
    );
    let (mut y0, mut y1) = (
        fold(f64::min, f64::INFINITY, |p| p.1),
        fold(f64::max, f64::NEG_INFINITY, |p| p.1),
    );
    if (y1 - y0).abs() < 1e-12 * y1.abs().max(1e-30) {
        y0 -= 0.5 * y0.abs().max(1e-3);
        y1 += 0.5 * y1.abs().max(1e-3);
    }
    let f = Frame {
        w,
        h,
        l,
        r,
        t,
        b,
        x: (x0, x1),
        y: (y0, y1),
    };
    let (xs, ys) = (|x| f.xs(x), |y| f.ys(y));
    f.draw(&mut svg, x_label, None);
    for (i, (name, s)) in series.iter().filter(|s| !s.1.is_empty()).enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", xs(x), ys(y)))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill='none' stroke='{c}' stroke-width='1.5' points='{}'/>",
            path.join(" ")
        );
        if s.len() == 1 {
            let _ = write!(
                svg,
                "<circle cx='{:.1}' cy='{:.1}' r='3' fill='{c}'/>",
                xs(s[0].0),
                ys(s[0].1)
            );
        }
        let _ = write!(
            svg,
            "<text x='{}' y='{}' fill='{c}'>{}</text>",
            l + 8.0,
            t + 14.0 + 13.0 * i as f64,
            esc(name)
        );
    }
    svg + "</svg>"
}

/// A scatter of labelled points with error bars `(label, x, (x_lo, x_hi), y, (y_lo, y_hi))`;
/// each of `lines` joins the points it lists, in its order (a sweep's frontier).
pub fn scatter_chart(title: &str, x_label: &str, y_label: &str, pts: &[Point], lines: &[Vec<usize>]) -> String {
    let (w, h, l, r, t, b) = (560.0, 340.0, 64.0, 16.0, 28.0, 40.0);
    let fin: Vec<_> = pts.iter().filter(|p| p.1.is_finite() && p.3.is_finite()).collect();
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='11'>\
         <text x='{l}' y='16' font-size='13' font-weight='bold'>{}</text>",
        esc(title)
    );
    if fin.is_empty() {
        return svg + "<text x='70' y='120'>no data</text></svg>";
    }
    let span = |lo: f64, hi: f64| {
        let pad = ((hi - lo) * 0.1).max(1e-3);
        (lo - pad, hi + pad)
    };
    let bound = |f: &dyn Fn(&&Point) -> [f64; 3]| {
        let v: Vec<f64> = fin.iter().flat_map(f).filter(|x| x.is_finite()).collect();
        span(
            v.iter().copied().fold(f64::INFINITY, f64::min).min(0.0),
            v.iter().copied().fold(f64::NEG_INFINITY, f64::max).max(0.0),
        )
    };
    let (x0, x1) = bound(&|p| [p.1, p.2 .0, p.2 .1]);
    let (y0, y1) = bound(&|p| [p.3, p.4 .0, p.4 .1]);
    let f = Frame {
        w,
        h,
        l,
        r,
        t,
        b,
        x: (x0, x1),
        y: (y0, y1),
    };
    let (xs, ys) = (|x| f.xs(x), |y| f.ys(y));
    // Zero lines: the scatter's axes always include 0.
    let _ = write!(
        svg,
        "<line x1='{:.1}' y1='{t}' x2='{:.1}' y2='{}' stroke='#ccc'/><line x1='{l}' y1='{:.1}' x2='{}' y2='{:.1}' stroke='#ccc'/>",
        xs(0.0),
        xs(0.0),
        h - b,
        ys(0.0),
        w - r,
        ys(0.0)
    );
    f.draw(&mut svg, x_label, Some(y_label));
    for line in lines {
        let at: Vec<String> = line
            .iter()
            .filter_map(|&i| pts.get(i))
            .filter(|p| p.1.is_finite() && p.3.is_finite())
            .map(|p| format!("{:.1},{:.1}", xs(p.1), ys(p.3)))
            .collect();
        let _ = write!(
            svg,
            "<polyline points='{}' fill='none' stroke='#888' stroke-dasharray='4 3'/>",
            at.join(" ")
        );
    }
    for (i, p) in fin.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let (cx, cy) = (xs(p.1), ys(p.3));
        if p.2 .0.is_finite() && p.2 .1.is_finite() {
            let _ = write!(
                svg,
                "<line x1='{:.1}' y1='{cy:.1}' x2='{:.1}' y2='{cy:.1}' stroke='{c}'/>",
                xs(p.2 .0),
                xs(p.2 .1)
            );
        }
        if p.4 .0.is_finite() && p.4 .1.is_finite() {
            let _ = write!(
                svg,
                "<line x1='{cx:.1}' y1='{:.1}' x2='{cx:.1}' y2='{:.1}' stroke='{c}'/>",
                ys(p.4 .0),
                ys(p.4 .1)
            );
        }
        let _ = write!(
            svg,
            "<circle cx='{cx:.1}' cy='{cy:.1}' r='4' fill='{c}'/><text x='{:.1}' y='{:.1}' fill='{c}'>{}</text>",
            cx + 6.0,
            cy - 6.0,
            esc(&p.0)
        );
    }
    svg + "</svg>"
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
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
    let plots = [
        line_chart(
            "loss",
            "step",
            &[series("train", &field("loss")), evals("eval"), evals("eval_general")],
        ),
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

    #[test]
    fn charts_scale_points_into_the_frame_and_escape_names() {
        let s = line_chart("a<b", "x", &[("s&t".into(), vec![(0.0, 1.0), (10.0, 3.0)])]);
        assert!(s.contains("a&lt;b") && s.contains("s&amp;t"));
        // x 0 -> left edge 64, x 10 -> right edge 544; y 3 (max) -> top 28, y 1 -> bottom 220.
        assert!(s.contains("points='64.0,220.0 544.0,28.0'"), "{s}");
        assert!(line_chart("t", "x", &[]).contains("no data"));
    }
}
