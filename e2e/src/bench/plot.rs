//! Simple line charts as standalone SVG text, for benchmark reports (std only, no plotting crate).
//!
//! [`render_svg`] draws one or more [`Chart`] panels side by side, each about 480x320 px: a title, axes
//! with ticks and numeric tick labels, axis labels, one polyline with a circle marker per point for each
//! [`Series`] (distinct color and dash pattern per series), and a legend below the plot area.
//!
//! Axes:
//! - x is linear, or logarithmic when every x is positive and max/min >= 20. Ticks sit at the distinct x
//!   values of the data (at most 12 of them; beyond that, "nice" numbers or powers of ten).
//! - y is linear with "nice" ticks (1, 2, 2.5, 5 times a power of ten; it starts at zero when the data are
//!   non-negative and the minimum is at most half the maximum), or base-10 logarithmic with ticks at powers
//!   of ten when [`Chart::log_y`] is set; points with y <= 0 are then skipped.
//!
//! Tick labels are compact with thousands separators (`10,000`, `0.25`, `1,200`, `1e-6`). All text is
//! XML-escaped. Degenerate input (no charts, empty series, a single point, all-equal values, non-finite
//! values) yields a valid document and never panics.

use std::fmt::Write as _;

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// (x, y) points, any order (sorted by x when drawn); points with a non-finite y are skipped.
    pub points: Vec<(f64, f64)>,
}

/// One chart panel.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Title, drawn centered above the plot area.
    pub title: String,
    /// Label of the horizontal axis.
    pub x_label: String,
    /// Label of the vertical axis.
    pub y_label: String,
    /// Logarithmic y axis (base 10) when true.
    pub log_y: bool,
    /// The lines, drawn in order; each gets its own color and dash pattern.
    pub series: Vec<Series>,
}

/// Width of one panel.
const PANEL_WIDTH: f64 = 480.0;
/// Minimum height of one panel (a legend with many rows makes it taller).
const PANEL_HEIGHT: f64 = 320.0;
/// Top edge of the plot area.
const PLOT_TOP: f64 = 40.0;
/// Bottom edge of the plot area (the x axis).
const PLOT_BOTTOM: f64 = 236.0;
/// Space right of the plot area.
const RIGHT_MARGIN: f64 = 18.0;
/// Horizontal padding inside the plot area, so markers at the extreme x values do not sit on the y axis.
const X_INSET: f64 = 12.0;
/// Baseline of the first legend row.
const LEGEND_TOP: f64 = PLOT_BOTTOM + 58.0;
/// Height of one legend row.
const LEGEND_ROW: f64 = 16.0;
/// Longest legend label drawn in full; longer ones are cut with an ellipsis.
const MAX_LEGEND_CHARS: usize = 60;
/// Most distinct x values that get a tick each.
const MAX_DATA_TICKS: usize = 12;

/// Series colors (cycled).
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
/// Series dash patterns (cycled; 5 is coprime with the 8 colors, so 40 series get distinct styles).
const DASHES: [&str; 5] = ["", "7 4", "2 3", "9 3 2 3", "14 5"];

/// Renders the charts side by side (one row) in one SVG document.
pub fn render_svg(charts: &[Chart]) -> String {
    let panels: Vec<(String, f64)> = charts
        .iter()
        .enumerate()
        .map(|(i, chart)| render_panel(chart, i as f64 * PANEL_WIDTH))
        .collect();
    let width = PANEL_WIDTH * charts.len().max(1) as f64;
    let height = panels.iter().map(|p| p.1).fold(PANEL_HEIGHT, f64::max);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif" font-size="11">"#,
        w = px(width),
        h = px(height)
    );
    let _ = writeln!(
        out,
        r#"<rect x="0" y="0" width="{}" height="{}" fill="white"/>"#,
        px(width),
        px(height)
    );
    for (body, _) in &panels {
        out.push_str(body);
    }
    out.push_str("</svg>\n");
    out
}

/// One axis: its domain, scale type, labeled ticks and unlabeled minor grid lines.
#[derive(Clone, Debug)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    ticks: Vec<f64>,
    minor: Vec<f64>,
}

impl Axis {
    /// Pixel position of `v`, with the domain mapped onto `from..to`.
    fn map(&self, v: f64, from: f64, to: f64) -> f64 {
        let (a, b, v) = if self.log {
            (self.lo.log10(), self.hi.log10(), v.log10())
        } else {
            (self.lo, self.hi, v)
        };
        let span = b - a;
        let t = if span > 0.0 && span.is_finite() {
            (v - a) / span
        } else {
            0.5
        };
        let t = if t.is_finite() { t } else { 0.5 };
        from + t * (to - from)
    }

    /// Whether `v` lies in the domain (with a little slack for rounding).
    fn contains(&self, v: f64) -> bool {
        let slack = if self.log {
            1e-9 * self.lo
        } else {
            1e-9 * (self.hi - self.lo).abs()
        };
        v >= self.lo - slack && v <= self.hi + slack
    }
}

/// The points of a series that can be drawn, sorted by x: finite, and with y > 0 on a log y axis.
fn drawable_points(points: &[(f64, f64)], log_y: bool) -> Vec<(f64, f64)> {
    let mut kept: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!log_y || y > 0.0))
        .collect();
    kept.sort_by(|a, b| a.0.total_cmp(&b.0));
    kept
}

/// Smallest and largest value, or `None` for an empty slice.
fn min_max(values: &[f64]) -> Option<(f64, f64)> {
    let mut it = values.iter().copied();
    let first = it.next()?;
    Some(it.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v))))
}

/// A non-empty range around a single value.
fn pad_equal(v: f64) -> (f64, f64) {
    let d = if v == 0.0 { 1.0 } else { v.abs() * 0.5 };
    (v - d, v + d)
}

/// The "nice" step (1, 2, 2.5 or 5 times a power of ten) closest to `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f < 1.5 {
        1.0
    } else if f < 2.25 {
        2.0
    } else if f < 3.5 {
        2.5
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// About `intervals` nice ticks covering `lo..=hi`, and the domain they span.
fn linear_ticks(lo: f64, hi: f64, intervals: usize) -> (f64, f64, Vec<f64>) {
    let step = nice_step((hi - lo) / intervals.max(1) as f64);
    let start = (lo / step).floor();
    let end = (hi / step).ceil();
    let n = end - start;
    if !n.is_finite() || !(1.0..=100.0).contains(&n) {
        return (lo, hi, vec![lo, hi]);
    }
    let ticks = (0..=n as usize)
        .map(|i| {
            let t = (start + i as f64) * step;
            if t.abs() < step * 1e-9 { 0.0 } else { t }
        })
        .collect();
    (start * step, end * step, ticks)
}

/// Powers of ten covering `lo..=hi` (both positive), the domain they span, and minor grid values
/// (2..9 times each power) when the range is at most three decades.
fn log_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<f64>, Vec<f64>) {
    let mut a = lo.log10().floor();
    let mut b = hi.log10().ceil();
    if !(a.is_finite() && b.is_finite()) || b - a > 700.0 {
        return (lo, hi, vec![lo, hi], Vec::new());
    }
    if b <= a {
        a -= 1.0;
        b += 1.0;
    }
    // Keep every power of ten a finite, normal f64.
    a = a.clamp(-307.0, 307.0);
    b = b.clamp(a + 1.0, 308.0);
    let step = ((b - a) / 6.0).ceil().max(1.0);
    let count = ((b - a) / step).ceil();
    b = a + count * step;
    let ticks: Vec<f64> = (0..=count as usize).map(|i| pow10(a + i as f64 * step)).collect();
    let minor = if step == 1.0 && count <= 3.0 {
        (0..count as usize)
            .flat_map(|i| {
                let base = pow10(a + i as f64);
                (2..=9).map(move |m| f64::from(m) * base)
            })
            .collect()
    } else {
        Vec::new()
    };
    (pow10(a), pow10(b), ticks, minor)
}

/// 10 to an integral power given as f64.
fn pow10(e: f64) -> f64 {
    10f64.powi(e as i32)
}

/// The x axis for the sorted, distinct x values `xs`.
fn x_axis(xs: &[f64]) -> Axis {
    let Some((min, max)) = min_max(xs) else {
        let (lo, hi, ticks) = linear_ticks(0.0, 1.0, 5);
        return Axis {
            lo,
            hi,
            log: false,
            ticks,
            minor: Vec::new(),
        };
    };
    let log = min > 0.0 && max / min >= 20.0;
    let (lo, hi) = if max > min { (min, max) } else { pad_equal(min) };
    let mut axis = Axis {
        lo,
        hi,
        log,
        ticks: Vec::new(),
        minor: Vec::new(),
    };
    axis.ticks = if xs.len() <= MAX_DATA_TICKS {
        xs.to_vec()
    } else {
        let ticks = if log {
            log_ticks(lo, hi).2
        } else {
            linear_ticks(lo, hi, 6).2
        };
        let inside: Vec<f64> = ticks.into_iter().filter(|&t| axis.contains(t)).collect();
        if inside.len() >= 2 { inside } else { vec![lo, hi] }
    };
    axis
}

/// The y axis for the drawable y values `ys`.
fn y_axis(ys: &[f64], log: bool) -> Axis {
    if log {
        let (min, max) = min_max(ys).unwrap_or((1.0, 10.0));
        let (lo, hi, ticks, minor) = log_ticks(min, max);
        return Axis {
            lo,
            hi,
            log,
            ticks,
            minor,
        };
    }
    let (mut min, mut max) = min_max(ys).unwrap_or((0.0, 1.0));
    if min >= 0.0 && min <= max * 0.5 {
        min = 0.0;
    }
    if max <= 0.0 && max >= min * 0.5 {
        max = 0.0;
    }
    if max <= min {
        (min, max) = pad_equal(min);
    }
    let (lo, hi, ticks) = linear_ticks(min, max, 5);
    Axis {
        lo,
        hi,
        log,
        ticks,
        minor: Vec::new(),
    }
}

/// Renders one panel at horizontal offset `offset`; returns its SVG and its height.
fn render_panel(chart: &Chart, offset: f64) -> (String, f64) {
    let lines: Vec<Vec<(f64, f64)>> = chart
        .series
        .iter()
        .map(|s| drawable_points(&s.points, chart.log_y))
        .collect();
    let mut xs: Vec<f64> = lines.iter().flatten().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let ys: Vec<f64> = lines.iter().flatten().map(|p| p.1).collect();
    let xa = x_axis(&xs);
    let ya = y_axis(&ys, chart.log_y);
    let y_labels: Vec<String> = ya.ticks.iter().map(|&t| format_tick(t)).collect();
    let widest = y_labels.iter().map(|l| text_width(l, 10.0)).fold(0.0, f64::max);
    let left = (32.0 + widest).clamp(50.0, 150.0);
    let right = PANEL_WIDTH - RIGHT_MARGIN;
    let xmap = |v: f64| xa.map(v, left + X_INSET, right - X_INSET);
    let ymap = |v: f64| ya.map(v, PLOT_BOTTOM, PLOT_TOP);

    let legend = legend_layout(&chart.series, left, PANEL_WIDTH - 8.0);
    let rows = legend.iter().map(|item| item.row + 1).max().unwrap_or(0);
    let height = PANEL_HEIGHT.max(LEGEND_TOP + rows as f64 * LEGEND_ROW);

    let mut out = String::new();
    let _ = writeln!(out, r#"<g transform="translate({},0)">"#, px(offset));
    let _ = writeln!(
        out,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        px(PANEL_WIDTH / 2.0),
        escape(&chart.title)
    );

    // Grid lines.
    out.push_str("<g stroke=\"#f0f0f0\" stroke-width=\"1\">\n");
    for &v in ya.minor.iter().filter(|&&v| ya.contains(v)) {
        let y = ymap(v);
        let _ = writeln!(
            out,
            r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}"/>"#,
            px(left),
            px(right),
            y = px(y)
        );
    }
    out.push_str("</g>\n<g stroke=\"#dddddd\" stroke-width=\"1\">\n");
    for &v in &ya.ticks {
        let y = ymap(v);
        let _ = writeln!(
            out,
            r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}"/>"#,
            px(left),
            px(right),
            y = px(y)
        );
    }
    for &v in &xa.ticks {
        let x = xmap(v);
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="{}" x2="{x}" y2="{}"/>"#,
            px(PLOT_TOP),
            px(PLOT_BOTTOM),
            x = px(x)
        );
    }
    out.push_str("</g>\n");

    // Axis lines and tick marks.
    out.push_str("<g stroke=\"#333333\" stroke-width=\"1\">\n");
    let _ = writeln!(
        out,
        r#"<line x1="{l}" y1="{t}" x2="{l}" y2="{b}"/>"#,
        l = px(left),
        t = px(PLOT_TOP),
        b = px(PLOT_BOTTOM)
    );
    let _ = writeln!(
        out,
        r#"<line x1="{l}" y1="{b}" x2="{r}" y2="{b}"/>"#,
        l = px(left),
        r = px(right),
        b = px(PLOT_BOTTOM)
    );
    for &v in &ya.ticks {
        let y = px(ymap(v));
        let _ = writeln!(
            out,
            r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}"/>"#,
            px(left - 5.0),
            px(left)
        );
    }
    for &v in &xa.ticks {
        let x = px(xmap(v));
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="{}" x2="{x}" y2="{}"/>"#,
            px(PLOT_BOTTOM),
            px(PLOT_BOTTOM + 5.0)
        );
    }
    out.push_str("</g>\n");

    // Tick labels; x labels that would overlap the previous one are left out.
    out.push_str("<g fill=\"#333333\" font-size=\"10\">\n");
    for (&v, label) in ya.ticks.iter().zip(&y_labels) {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            px(left - 8.0),
            px(ymap(v) + 3.5),
            escape(label)
        );
    }
    let mut last_right = f64::NEG_INFINITY;
    for &v in &xa.ticks {
        let label = format_tick(v);
        let x = xmap(v);
        let half = text_width(&label, 10.0) / 2.0;
        if x - half < last_right + 4.0 {
            continue;
        }
        last_right = x + half;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            px(x),
            px(PLOT_BOTTOM + 18.0),
            escape(&label)
        );
    }
    out.push_str("</g>\n");

    // Axis labels.
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        px((left + right) / 2.0),
        px(PLOT_BOTTOM + 38.0),
        escape(&chart.x_label)
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(14,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        px((PLOT_TOP + PLOT_BOTTOM) / 2.0),
        escape(&chart.y_label)
    );

    // Series.
    for (i, points) in lines.iter().enumerate() {
        if points.is_empty() {
            continue;
        }
        let (color, dash) = style(i);
        let coords: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{},{}", px(xmap(x)), px(ymap(y))))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.8" stroke-linejoin="round"{}/>"#,
            coords.join(" "),
            dash_attr(dash)
        );
        let _ = writeln!(out, r#"<g fill="{color}">"#);
        for &(x, y) in points {
            let _ = writeln!(
                out,
                r#"<circle cx="{}" cy="{}" r="3"/>"#,
                px(xmap(x)),
                px(ymap(y))
            );
        }
        out.push_str("</g>\n");
    }
    if lines.iter().all(Vec::is_empty) {
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#888888">no data</text>"##,
            px((left + right) / 2.0),
            px((PLOT_TOP + PLOT_BOTTOM) / 2.0)
        );
    }

    // Legend.
    if !legend.is_empty() {
        out.push_str("<g font-size=\"11\">\n");
        for (i, item) in legend.iter().enumerate() {
            let (color, dash) = style(i);
            let y = LEGEND_TOP + item.row as f64 * LEGEND_ROW;
            let _ = writeln!(
                out,
                r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="1.8"{}/>"#,
                px(item.x),
                px(item.x + 26.0),
                dash_attr(dash),
                y = px(y - 4.0)
            );
            let _ = writeln!(
                out,
                r#"<circle cx="{}" cy="{}" r="3" fill="{color}"/>"#,
                px(item.x + 13.0),
                px(y - 4.0)
            );
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}">{}</text>"#,
                px(item.x + 32.0),
                px(y),
                escape(&item.label)
            );
        }
        out.push_str("</g>\n");
    }
    out.push_str("</g>\n");
    (out, height)
}

/// Where one legend entry goes.
#[derive(Clone, Debug)]
struct LegendItem {
    row: usize,
    x: f64,
    label: String,
}

/// Lays the legend entries out left to right from `left`, wrapping before `max_x`.
fn legend_layout(series: &[Series], left: f64, max_x: f64) -> Vec<LegendItem> {
    let mut items = Vec::with_capacity(series.len());
    let (mut row, mut x) = (0, left);
    for s in series {
        let label = if s.label.chars().count() > MAX_LEGEND_CHARS {
            let mut cut: String = s.label.chars().take(MAX_LEGEND_CHARS - 1).collect();
            cut.push('…');
            cut
        } else {
            s.label.clone()
        };
        let width = 32.0 + text_width(&label, 11.0) + 16.0;
        if x > left && x + width > max_x {
            row += 1;
            x = left;
        }
        items.push(LegendItem { row, x, label });
        x += width;
    }
    items
}

/// Approximate rendered width of `text` at `font_size` in a Helvetica-like font, for layout.
fn text_width(text: &str, font_size: f64) -> f64 {
    let ems: f64 = text
        .chars()
        .map(|c| match c {
            ',' | '.' | ' ' | ':' | ';' | 'i' | 'j' | 'l' | 'I' | '\'' | '|' | '!' => 0.28,
            'f' | 't' | 'r' | '(' | ')' | '[' | ']' | '-' => 0.36,
            'm' | 'w' | 'M' | 'W' | '@' | '%' => 0.86,
            c if c.is_uppercase() => 0.68,
            _ => 0.56,
        })
        .sum();
    ems * font_size
}

/// Color and dash pattern of the `i`-th series.
fn style(i: usize) -> (&'static str, &'static str) {
    (
        COLORS.get(i % COLORS.len()).copied().unwrap_or("#000000"),
        DASHES.get(i % DASHES.len()).copied().unwrap_or(""),
    )
}

/// The `stroke-dasharray` attribute (with a leading space) for a dash pattern, empty for solid.
fn dash_attr(dash: &str) -> String {
    if dash.is_empty() {
        String::new()
    } else {
        format!(r#" stroke-dasharray="{dash}""#)
    }
}

/// A pixel coordinate with one decimal (non-finite values become 0, so the document stays valid).
fn px(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
}

/// XML-escapes text for element content or attribute values; drops characters XML 1.0 forbids.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Compact tick label: up to 6 significant digits, trailing zeros dropped, thousands separators
/// (`10,000`, `0.25`, `1,200`, `-2.5`); exponent form for very small or very large magnitudes (`1e-6`).
fn format_tick(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".to_owned()
        } else if v > 0.0 {
            "∞".to_owned()
        } else {
            "-∞".to_owned()
        };
    }
    if v == 0.0 {
        return "0".to_owned();
    }
    let magnitude = v.abs().log10().floor();
    if !(-4.0..15.0).contains(&magnitude) {
        let s = format!("{v:.5e}");
        return match s.split_once('e') {
            Some((mantissa, exp)) => {
                let mantissa = if mantissa.contains('.') {
                    mantissa.trim_end_matches('0').trim_end_matches('.')
                } else {
                    mantissa
                };
                format!("{mantissa}e{exp}")
            }
            None => s,
        };
    }
    let decimals = (5.0 - magnitude).clamp(0.0, 10.0) as usize;
    let fixed = format!("{:.*}", decimals, v.abs());
    let fixed = if fixed.contains('.') {
        fixed.trim_end_matches('0').trim_end_matches('.')
    } else {
        &fixed
    };
    let (int, frac) = fixed.split_once('.').unwrap_or((fixed, ""));
    if int == "0" && frac.is_empty() {
        return "0".to_owned();
    }
    let mut out = String::with_capacity(fixed.len() + 8);
    if v < 0.0 {
        out.push('-');
    }
    let digits: Vec<char> = int.chars().collect();
    for (i, d) in digits.iter().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(*d);
    }
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn series(label: &str, points: &[(f64, f64)]) -> Series {
        Series {
            label: label.to_owned(),
            points: points.to_vec(),
        }
    }

    fn chart(log_y: bool, series: Vec<Series>) -> Chart {
        Chart {
            title: "Latency".to_owned(),
            x_label: "Services (N)".to_owned(),
            y_label: "ms".to_owned(),
            log_y,
            series,
        }
    }

    /// Checks the document is well-formed enough: starts and ends right, every opened element is closed
    /// in order (self-closing ones aside), and no coordinate is NaN or infinite.
    fn assert_well_formed(svg: &str) {
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.ends_with("</svg>\n"), "{svg}");
        let opened = svg.matches("<g ").count() + svg.matches("<g>").count();
        assert_eq!(opened, svg.matches("</g>").count(), "{svg}");
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').unwrap() + start;
            let tag = &rest[start + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "{svg}");
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().unwrap();
                stack.push(name.to_owned());
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed {stack:?}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    fn bench_chart(log_y: bool) -> Chart {
        let ns = [10.0, 1000.0, 5000.0, 10000.0];
        chart(
            log_y,
            vec![
                series("iptables", &ns.map(|n| (n, n * 0.02 + 1.0))),
                series("switchyard", &ns.map(|n| (n, 0.5))),
            ],
        )
    }

    #[test]
    fn renders_well_formed_side_by_side_panels() {
        let svg = render_svg(&[bench_chart(false), bench_chart(true)]);
        assert_well_formed(&svg);
        assert!(svg.contains(r#"width="960""#), "{svg}");
        assert_eq!(svg.matches(r#"<g transform="translate("#).count(), 2);
        assert!(svg.contains(">Latency</text>") && svg.contains(">Services (N)</text>"));
        assert!(svg.contains(">iptables</text>") && svg.contains(">switchyard</text>"));
    }

    #[test]
    fn x_ticks_are_the_data_values_on_a_log_scale() {
        let svg = render_svg(&[bench_chart(false)]);
        for label in ["10", "1,000", "5,000", "10,000"] {
            assert!(
                svg.contains(&format!(">{label}</text>")),
                "missing x tick {label}: {svg}"
            );
        }
        let xs = [10.0, 1000.0, 5000.0, 10000.0];
        assert!(x_axis(&xs).log);
        assert_eq!(x_axis(&xs).ticks, xs);
        assert!(!x_axis(&[1.0, 2.0, 3.0]).log);
        assert!(!x_axis(&[-1.0, 100.0]).log);
    }

    #[test]
    fn series_get_distinct_styles() {
        let svg = render_svg(&[bench_chart(false)]);
        let polylines: Vec<&str> = svg.lines().filter(|l| l.starts_with("<polyline")).collect();
        assert_eq!(polylines.len(), 2);
        assert!(!polylines[0].contains("stroke-dasharray"));
        assert!(polylines[1].contains("stroke-dasharray"));
        assert_ne!(style(0), style(1));
        let styles: std::collections::HashSet<_> = (0..40).map(style).collect();
        assert_eq!(styles.len(), 40);
    }

    #[test]
    fn escapes_all_text() {
        let mut c = chart(false, vec![series(r#"a<b & "c">"#, &[(1.0, 2.0)])]);
        c.title = "<script>".to_owned();
        c.x_label = "x & y".to_owned();
        c.y_label = "\"quoted\"".to_owned();
        let svg = render_svg(&[c]);
        assert_well_formed(&svg);
        assert!(svg.contains("a&lt;b &amp; &quot;c&quot;&gt;"), "{svg}");
        assert!(svg.contains("&lt;script&gt;") && !svg.contains("<script>"));
        assert!(svg.contains("x &amp; y") && svg.contains("&quot;quoted&quot;"));
        assert_eq!(escape("a\u{0}b\tc'"), "ab c&apos;");
    }

    #[test]
    fn one_polyline_per_non_empty_series() {
        let c = chart(
            false,
            vec![
                series("four", &[(4.0, 1.0), (1.0, 3.0), (3.0, 2.0), (2.0, 5.0)]),
                series("empty", &[]),
                series("single", &[(2.0, 7.0)]),
                series("not finite", &[(1.0, f64::NAN), (2.0, f64::INFINITY)]),
            ],
        );
        let svg = render_svg(&[c]);
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        // Markers: 4 + 1 on the lines, plus one per legend entry (4).
        assert_eq!(svg.matches("<circle").count(), 9, "{svg}");
        // Points are drawn sorted by x.
        let first = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
        let points = first.split('"').nth(1).unwrap();
        let xs: Vec<f64> = points
            .split(' ')
            .map(|p| p.split(',').next().unwrap().parse().unwrap())
            .collect();
        assert!(xs.windows(2).all(|w| w[0] < w[1]), "{xs:?}");
    }

    #[test]
    fn log_axis_skips_non_positive_points() {
        let c = chart(
            true,
            vec![series(
                "s",
                &[(10.0, 0.0), (100.0, -5.0), (1000.0, 5.0), (10000.0, 50.0)],
            )],
        );
        let svg = render_svg(&[c]);
        assert_well_formed(&svg);
        let line = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
        let points = line.split('"').nth(1).unwrap();
        assert_eq!(points.split(' ').count(), 2, "{line}");
        // Skipped points do not contribute x ticks either (x tick labels are the centered ones).
        assert!(svg.contains(r#"text-anchor="middle">1,000</text>"#), "{svg}");
        assert!(!svg.contains(r#"text-anchor="middle">10</text>"#), "{svg}");
        assert!(!svg.contains(r#"text-anchor="middle">100</text>"#), "{svg}");
        assert!(!svg.contains(">-5</text>") && !svg.contains(">0</text>"), "{svg}");

        let only_bad = chart(true, vec![series("s", &[(1.0, 0.0), (2.0, -1.0)])]);
        let svg = render_svg(&[only_bad]);
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 0);
        assert!(svg.contains(">no data</text>"));
    }

    #[test]
    fn log_y_ticks_are_powers_of_ten() {
        let axis = y_axis(&[3.0, 4500.0], true);
        let labels: Vec<String> = axis.ticks.iter().map(|&t| format_tick(t)).collect();
        assert_eq!(labels, ["1", "10", "100", "1,000", "10,000"]);
        let axis = y_axis(&[0.002, 0.5], true);
        let labels: Vec<String> = axis.ticks.iter().map(|&t| format_tick(t)).collect();
        assert_eq!(labels, ["0.001", "0.01", "0.1", "1"]);
        // A single value gets a decade either side.
        let axis = y_axis(&[100.0], true);
        assert!(axis.lo < 100.0 && axis.hi > 100.0);
        // Many decades: at most ~7 labeled ticks.
        assert!(y_axis(&[1e-3, 1e12], true).ticks.len() <= 8);
    }

    #[test]
    fn linear_y_ticks_are_nice() {
        let axis = y_axis(&[3.0, 97.0], false);
        assert_eq!(axis.ticks, [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let axis = y_axis(&[0.1, 0.3], false);
        let labels: Vec<String> = axis.ticks.iter().map(|&t| format_tick(t)).collect();
        assert_eq!(labels, ["0", "0.05", "0.1", "0.15", "0.2", "0.25", "0.3"]);
        let axis = y_axis(&[-3.0, 4.0], false);
        assert!(axis.ticks.contains(&0.0) && axis.lo <= -3.0 && axis.hi >= 4.0);
        assert_eq!(nice_step(0.23), 0.25);
        assert_eq!(nice_step(1200.0), 1000.0);
        assert_eq!(nice_step(19.4), 20.0);
    }

    #[test]
    fn degenerate_input_does_not_panic() {
        assert_well_formed(&render_svg(&[]));
        for log_y in [false, true] {
            let cases = [
                chart(log_y, vec![]),
                chart(log_y, vec![series("empty", &[])]),
                chart(log_y, vec![series("one", &[(5.0, 5.0)])]),
                chart(log_y, vec![series("flat", &[(1.0, 3.0), (2.0, 3.0), (3.0, 3.0)])]),
                chart(log_y, vec![series("zeros", &[(0.0, 0.0), (1.0, 0.0)])]),
                chart(log_y, vec![series("same x", &[(2.0, 1.0), (2.0, 4.0)])]),
                chart(
                    log_y,
                    vec![series("huge", &[(-f64::MAX, f64::MAX), (f64::MAX, -f64::MAX)])],
                ),
                chart(log_y, vec![series("tiny", &[(1e-300, 1e-300), (2e-300, 3e-300)])]),
                chart(log_y, vec![series("nan x", &[(f64::NAN, 1.0), (1.0, 2.0)])]),
                chart(
                    log_y,
                    vec![series(
                        "many",
                        &(1..200).map(|i| (f64::from(i), f64::from(i))).collect::<Vec<_>>(),
                    )],
                ),
            ];
            for c in cases {
                let svg = render_svg(std::slice::from_ref(&c));
                assert_well_formed(&svg);
            }
        }
        let many: Vec<Series> = (0..30)
            .map(|i| series(&format!("series number {i}"), &[(1.0, 1.0)]))
            .collect();
        let svg = render_svg(&[chart(false, many)]);
        assert_well_formed(&svg);
        assert!(!svg.contains(r#"height="320""#), "a tall legend grows the panel");
    }

    #[test]
    fn tick_formatting() {
        let cases = [
            (10000.0, "10,000"),
            (0.25, "0.25"),
            (1200.0, "1,200"),
            (1000.0, "1,000"),
            (1_000_000.0, "1,000,000"),
            (10.0, "10"),
            (100.0, "100"),
            (2.5, "2.5"),
            (0.1, "0.1"),
            (0.1 + 0.2, "0.3"),
            (0.0, "0"),
            (-0.0, "0"),
            (-1500.0, "-1,500"),
            (12345.678, "12,345.7"),
            (0.001, "0.001"),
            (1e-6, "1e-6"),
            (2.5e-7, "2.5e-7"),
            (1e20, "1e20"),
        ];
        for (v, want) in cases {
            assert_eq!(format_tick(v), want, "format_tick({v})");
        }
        assert_eq!(format_tick(f64::NAN), "NaN");
    }
}
