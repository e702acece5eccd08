//! Two small hand-written SVG charts: lines over categories and grouped bars.

use std::fmt::Write as _;

const W: f64 = 720.0;
const H: f64 = 420.0;
const L: f64 = 80.0;
const R: f64 = 180.0;
const T: f64 = 50.0;
const B: f64 = 60.0;
pub const COLORS: [&str; 6] = [
    "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn nice_max(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn frame(title: &str, y_label: &str, x_label: &str, ymax: f64) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"25\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        (L + W - R) / 2.0,
        esc(title)
    );
    let ph = H - T - B;
    for k in 0..=5 {
        let v = ymax * k as f64 / 5.0;
        let y = T + ph - ph * k as f64 / 5.0;
        let _ = writeln!(
            s,
            "<line x1=\"{L}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - R,
            L - 6.0,
            y + 4.0,
            trim(v)
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{L}\" x2=\"{L}\" y1=\"{T}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{L}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        H - B,
        W - R,
        H - B,
        H - B
    );
    let _ = writeln!(
        s,
        "<text transform=\"translate(20,{}) rotate(-90)\" text-anchor=\"middle\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        T + ph / 2.0,
        esc(y_label),
        (L + W - R) / 2.0,
        H - 15.0,
        esc(x_label)
    );
    s
}

fn trim(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn legend(s: &mut String, names: &[String], dashed: &[bool]) {
    for (i, n) in names.iter().enumerate() {
        let y = T + 10.0 + 20.0 * i as f64;
        let x = W - R + 15.0;
        let dash = if dashed.get(i).copied().unwrap_or(false) {
            " stroke-dasharray=\"5,3\""
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "<line x1=\"{x}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"{}\" stroke-width=\"3\"{dash}/><text x=\"{}\" y=\"{}\">{}</text>",
            x + 20.0,
            COLORS[i % COLORS.len()],
            x + 26.0,
            y + 4.0,
            esc(n)
        );
    }
}

/// Lines over categorical x values. `series`: (name, dashed, values).
pub fn lines(
    title: &str,
    y_label: &str,
    x_label: &str,
    xs: &[String],
    series: &[(String, bool, Vec<f64>)],
) -> String {
    let ymax = nice_max(
        series
            .iter()
            .flat_map(|s| s.2.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * 1.05,
    );
    let mut s = frame(title, y_label, x_label, ymax);
    let pw = W - L - R;
    let ph = H - T - B;
    let xpos = |i: usize| L + pw * (i as f64 + 0.5) / xs.len() as f64;
    for (i, x) in xs.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            xpos(i),
            H - B + 18.0,
            esc(x)
        );
    }
    for (k, (_, dashed, vals)) in series.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let pts: Vec<String> = vals
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| format!("{:.1},{:.1}", xpos(i), T + ph - ph * v / ymax))
            .collect();
        let dash = if *dashed {
            " stroke-dasharray=\"5,3\""
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2.5\"{dash} points=\"{}\"/>",
            pts.join(" ")
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap();
            let _ = writeln!(s, "<circle cx=\"{x}\" cy=\"{y}\" r=\"4\" fill=\"{c}\"/>");
        }
        for (i, v) in vals.iter().enumerate().filter(|(_, v)| v.is_finite()) {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"{c}\">{}</text>",
                xpos(i) + 6.0,
                T + ph - ph * v / ymax - 6.0,
                trim(*v)
            );
        }
    }
    let names: Vec<String> = series.iter().map(|s| s.0.clone()).collect();
    let dashed: Vec<bool> = series.iter().map(|s| s.1).collect();
    legend(&mut s, &names, &dashed);
    s.push_str("</svg>\n");
    s
}

/// Grouped bars: one group per category, one bar per series.
pub fn bars(title: &str, y_label: &str, cats: &[String], series: &[(String, Vec<f64>)]) -> String {
    let ymax = nice_max(
        series
            .iter()
            .flat_map(|s| s.1.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * 1.1,
    );
    let mut s = frame(title, y_label, "", ymax);
    let pw = W - L - R;
    let ph = H - T - B;
    let gw = pw / cats.len() as f64;
    let bw = gw * 0.8 / series.len() as f64;
    for (i, c) in cats.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            L + gw * (i as f64 + 0.5),
            H - B + 18.0,
            esc(c)
        );
        for (k, (_, vals)) in series.iter().enumerate() {
            let v = vals.get(i).copied().unwrap_or(f64::NAN);
            if !v.is_finite() {
                continue;
            }
            let x = L + gw * i as f64 + gw * 0.1 + bw * k as f64;
            let h = ph * v / ymax;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
                T + ph - h,
                bw * 0.95,
                COLORS[k % COLORS.len()],
                x + bw / 2.0,
                T + ph - h - 3.0,
                trim(v)
            );
        }
    }
    let names: Vec<String> = series.iter().map(|s| s.0.clone()).collect();
    legend(&mut s, &names, &[]);
    s.push_str("</svg>\n");
    s
}
