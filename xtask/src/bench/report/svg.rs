//! The page's line plots, as SVG: figures against service counts on a log x axis, one
//! line per series, with a legend on the right.

use super::thousands;
use std::fmt::Write as _;

/// Line colours, in series order (repeating past the last).
const COLORS: [&str; 7] = [
    "#888", "#1f77b4", "#2ca02c", "#17becf", "#d62728", "#ff7f0e", "#9467bd",
];

/// The plot's size, margins (left, right for the legend, top, bottom) and the ranges
/// its axes cover.
struct Frame {
    width: f64,
    height: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    /// log10 of the largest x.
    x_max: f64,
    /// The largest finite y, plus 10% room.
    y_max: f64,
}

impl Frame {
    fn new(log_xs: &[f64], series: &[(String, Vec<f64>)]) -> Self {
        let y_max = series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|y| y.is_finite())
            .fold(0.0, f64::max)
            .max(1e-9)
            * 1.1;
        Self {
            width: 680.0,
            height: 360.0,
            left: 64.0,
            right: 230.0,
            top: 20.0,
            bottom: 40.0,
            x_max: log_xs.iter().copied().fold(1.0, f64::max),
            y_max,
        }
    }

    /// Horizontal position of a log10 x.
    fn px(&self, log_x: f64) -> f64 {
        self.left + log_x / self.x_max * (self.width - self.left - self.right)
    }

    /// Vertical position of a y.
    fn py(&self, y: f64) -> f64 {
        self.height - self.bottom - y / self.y_max * (self.height - self.top - self.bottom)
    }
}

/// A line plot of `series` against `xs` (service counts, log scale), for the page.
pub fn plot_svg(x_label: &str, y_label: &str, xs: &[u64], series: &[(String, Vec<f64>)]) -> String {
    let log_xs: Vec<f64> = xs.iter().map(|x| ((*x).max(1) as f64).log10()).collect();
    let frame = Frame::new(&log_xs, series);
    let mut s = String::new();
    axes(&mut s, &frame, xs, &log_xs);
    axis_labels(&mut s, &frame, x_label, y_label);
    for (i, (name, ys)) in series.iter().enumerate() {
        line(&mut s, &frame, &log_xs, i, name, ys);
    }
    s.push_str("</svg>\n");
    s
}

/// The document's start, the background, the axes and their ticks' labels.
fn axes(s: &mut String, frame: &Frame, xs: &[u64], log_xs: &[f64]) {
    let Frame {
        width: w,
        height: h,
        left: l,
        right: r,
        top: t,
        bottom: b,
        y_max,
        ..
    } = *frame;
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r##"<polyline points="{l},{t} {l},{} {},{}" fill="none" stroke="#000"/>"##,
        h - b,
        w - r,
        h - b
    );
    for (x, log_x) in xs.iter().zip(log_xs) {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            frame.px(*log_x),
            h - b + 16.0,
            thousands(*x)
        );
    }
    for i in 0..=4 {
        let y = y_max / 4.0 * i as f64;
        let label = if y_max >= 10.0 {
            format!("{y:.0}")
        } else {
            format!("{y:.2}")
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{label}</text>"#,
            l - 6.0,
            frame.py(y) + 4.0
        );
    }
}

fn axis_labels(s: &mut String, frame: &Frame, x_label: &str, y_label: &str) {
    let Frame {
        width: w,
        height: h,
        left: l,
        right: r,
        ..
    } = *frame;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>"#,
        (l + w - r) / 2.0,
        h - 6.0
    );
    let _ = writeln!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{y_label}</text>"#,
        h / 2.0,
        h / 2.0
    );
}

/// Series `index`: its line through the finite points, a dot on each, and its legend
/// entry.
fn line(s: &mut String, frame: &Frame, log_xs: &[f64], index: usize, name: &str, ys: &[f64]) {
    let points: Vec<String> = log_xs
        .iter()
        .zip(ys)
        .filter(|(_, y)| y.is_finite())
        .map(|(x, y)| format!("{:.1},{:.1}", frame.px(*x), frame.py(*y)))
        .collect();
    let c = COLORS[index % COLORS.len()];
    let _ = writeln!(
        s,
        r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
        points.join(" ")
    );
    for p in &points {
        if let Some((x, y)) = p.split_once(',') {
            let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
        }
    }
    let (w, r) = (frame.width, frame.right);
    let ly = frame.top + 16.0 * index as f64 + 10.0;
    let _ = writeln!(
        s,
        r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
        w - r + 10.0,
        w - r + 30.0,
        w - r + 36.0,
        ly + 4.0
    );
}
