//! The loss curve of a run as a small hand-written SVG: axes with tick labels, the
//! training loss as a polyline and the evaluation loss as points joined by a line.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// Round tick positions covering [lo, hi], about `n` of them.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(t);
        t += step;
    }
    out
}

fn label(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 0.01 && v.abs() < 1e5) {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" { "0".into() } else { s.into() }
    } else {
        format!("{v:.1e}")
    }
}

/// The SVG text of a loss curve. Points are (step, loss); non-finite losses are left
/// out. `title` is shown above the plot.
pub fn loss_curve_svg(train: &[(u64, f64)], eval: &[(u64, f64)], title: &str) -> String {
    let finite = |v: &[(u64, f64)]| -> Vec<(f64, f64)> {
        v.iter()
            .filter(|p| p.1.is_finite())
            .map(|&(s, l)| (s as f64, l))
            .collect()
    };
    let (tr, ev) = (finite(train), finite(eval));
    let all: Vec<&(f64, f64)> = tr.iter().chain(&ev).collect();
    let (mut x0, mut x1) = (0.0f64, 1.0f64);
    let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
    for &&(x, y) in &all {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if all.is_empty() {
        (y0, y1) = (0.0, 1.0);
    }
    if y1 - y0 < 1e-9 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = 0.05 * (y1 - y0);
    (y0, y1) = (y0 - pad, y1 + pad);
    x0 = x0.min(x1);
    let px = |x: f64| LEFT + (x - x0) / (x1 - x0).max(1e-12) * (W - LEFT - RIGHT);
    let py = |y: f64| TOP + (y1 - y) / (y1 - y0) * (H - TOP - BOTTOM);
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    // axes
    let (ax0, ax1, ay0, ay1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    let _ = writeln!(
        s,
        r#"<path d="M{ax0} {ay0} V{ay1} H{ax1}" stroke="black" fill="none"/>"#
    );
    for t in ticks(y0, y1, 5) {
        let y = py(t);
        let _ = writeln!(
            s,
            r##"<line x1="{ax0}" y1="{y:.1}" x2="{ax1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            ax0 - 6.0,
            y + 4.0,
            label(t)
        );
    }
    for t in ticks(x0, x1, 6) {
        let x = px(t);
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{ay1}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
            ay1 + 5.0,
            ay1 + 18.0,
            label(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#,
        (ax0 + ax1) / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">loss</text>"#,
        (ay0 + ay1) / 2.0,
        (ay0 + ay1) / 2.0
    );
    let poly = |pts: &[(f64, f64)]| -> String {
        pts.iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if !tr.is_empty() {
        let _ = writeln!(
            s,
            r##"<polyline class="train" points="{}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>"##,
            poly(&tr)
        );
    }
    if !ev.is_empty() {
        let _ = writeln!(
            s,
            r##"<polyline class="eval" points="{}" fill="none" stroke="#ff7f0e" stroke-width="1.5"/>"##,
            poly(&ev)
        );
        for &(x, y) in &ev {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#ff7f0e"/>"##,
                px(x),
                py(y)
            );
        }
    }
    // legend
    let lx = ax1 - 150.0;
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="#1f77b4" stroke-width="2"/><text x="{}" y="{}">training loss</text>"##,
        TOP + 10.0,
        lx + 20.0,
        TOP + 10.0,
        lx + 26.0,
        TOP + 14.0
    );
    if !ev.is_empty() {
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="#ff7f0e" stroke-width="2"/><text x="{}" y="{}">eval loss</text>"##,
            TOP + 28.0,
            lx + 20.0,
            TOP + 28.0,
            lx + 26.0,
            TOP + 32.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(svg: &str, class: &str) -> Vec<(f64, f64)> {
        let key = format!(r#"class="{class}" points=""#);
        let Some(start) = svg.find(&key) else {
            return Vec::new();
        };
        let rest = &svg[start + key.len()..];
        let end = rest.find('"').unwrap();
        rest[..end]
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn curve_maps_steps_right_and_loss_up() {
        let train: Vec<(u64, f64)> = (1..=50).map(|s| (s, 5.0 / s as f64)).collect();
        let eval = vec![(10, 1.0), (20, 0.6), (30, f64::NAN)];
        let svg = loss_curve_svg(&train, &eval, "a <run>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;run&gt;"));
        let t = points(&svg, "train");
        assert_eq!(t.len(), 50);
        for w in t.windows(2) {
            assert!(w[1].0 > w[0].0, "x must grow with the step");
            assert!(
                w[1].1 > w[0].1,
                "a falling loss must go down the picture (y grows)"
            );
        }
        for &(x, y) in &t {
            assert!((LEFT..=W - RIGHT).contains(&x) && (TOP..=H - BOTTOM).contains(&y));
        }
        assert_eq!(points(&svg, "eval").len(), 2, "NaN is left out");
        assert!(svg.contains(">eval loss<"));
    }

    #[test]
    fn degenerate_inputs_still_draw() {
        for (tr, ev) in [
            (vec![], vec![]),
            (vec![(1, 2.0)], vec![]),
            (vec![(1, 2.0), (2, 2.0)], vec![]),
        ] {
            let svg = loss_curve_svg(&tr, &ev, "x");
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
            assert_eq!(points(&svg, "train").len(), tr.len());
        }
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let t = ticks(0.13, 4.9, 5);
        assert_eq!(t, vec![1.0, 2.0, 3.0, 4.0]);
        let t = ticks(0.0, 100.0, 6);
        assert_eq!(t.first(), Some(&0.0));
        assert_eq!(t.last(), Some(&100.0));
        assert_eq!(label(2.5), "2.5");
        assert_eq!(label(3.0), "3");
    }
}
