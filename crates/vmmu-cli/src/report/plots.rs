//! Drawing charts as SVG text with plotters: line charts (log or linear axes) and grouped
//! bar charts, each with its legend in a panel on the right so that it never covers data.
//! What to draw is decided in `figures`; this file only draws.

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Chart size in pixels, legend panel included.
const WIDTH: u32 = 1080;
const HEIGHT: u32 = 440;
/// Width of the legend panel.
const LEGEND: u32 = 330;
const FONT: &str = "sans-serif";

/// Tableau 10: distinguishable, and readable in grey.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0x79, 0x70, 0x6e),
];

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Look {
    /// Palette colour `n`, solid: a vmmu variant.
    Solid(usize),
    /// Palette colour `n`, dashed: a reference (the host's KVM, a seed's own figure).
    Dashed(usize),
    /// Black, dashed: the floor.
    Floor,
}

impl Look {
    fn color(self) -> RGBColor {
        match self {
            Look::Solid(i) | Look::Dashed(i) => PALETTE[i % PALETTE.len()],
            Look::Floor => RGBColor(0x22, 0x22, 0x22),
        }
    }

    fn dashed(self) -> bool {
        !matches!(self, Look::Solid(_))
    }
}

/// One line of a line chart.
#[derive(Clone, Debug)]
pub struct Line {
    /// Legend text.
    pub label: String,
    /// Points, sorted by x.
    pub points: Vec<(f64, f64)>,
    /// How it is drawn.
    pub look: Look,
}

/// A line chart.
#[derive(Clone, Debug)]
pub struct LineChart {
    /// Caption above the chart.
    pub title: String,
    /// X axis label, with unit.
    pub x_desc: String,
    /// Y axis label, with unit.
    pub y_desc: String,
    /// Logarithmic x axis.
    pub x_log: bool,
    /// Logarithmic y axis.
    pub y_log: bool,
    /// The lines; points with a non-positive coordinate on a log axis are left out.
    pub lines: Vec<Line>,
}

/// One bar series of a bar chart: a value per group (`None`: no bar).
#[derive(Clone, Debug)]
pub struct Bars {
    /// Legend text.
    pub label: String,
    /// One value per group.
    pub values: Vec<Option<f64>>,
    /// How it is drawn (dashed looks are drawn hatched: outlined, lighter).
    pub look: Look,
}

/// A grouped bar chart.
#[derive(Clone, Debug)]
pub struct BarChart {
    /// Caption above the chart.
    pub title: String,
    /// X axis label.
    pub x_desc: String,
    /// Y axis label, with unit.
    pub y_desc: String,
    /// Group names along the x axis.
    pub groups: Vec<String>,
    /// Logarithmic y axis.
    pub y_log: bool,
    /// The series, drawn side by side within each group.
    pub series: Vec<Bars>,
}

/// Whether values spread over more than a factor of 30: then a log axis shows them all.
pub fn spans_decades(values: impl IntoIterator<Item = f64>) -> bool {
    let (lo, hi) = values
        .into_iter()
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    hi > 0.0 && hi / lo > 30.0
}

/// Axis tick labels: plain numbers, as short as their magnitude allows.
pub fn tick(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{:.0}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1.0 {
        let s = format!("{v:.1}");
        s.trim_end_matches(".0").to_owned()
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').to_owned()
    }
}

/// The power of ten at or below `v` (> 0).
fn decade_below(v: f64) -> f64 {
    10f64.powf(v.log10().floor())
}

/// The power of ten at or above `v` (> 0).
fn decade_above(v: f64) -> f64 {
    10f64.powf(v.log10().ceil())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn err(e: impl std::fmt::Display) -> String {
    format!("drawing a chart: {e}")
}

/// Range of `values` for an axis: from zero for linear, a little padding on log.
fn range(values: &[f64], log: bool) -> (f64, f64) {
    let vals: Vec<f64> = values
        .iter()
        .copied()
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if vals.is_empty() {
        return if log { (0.1, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        let (lo, hi) = if lo == hi {
            (lo / 2.0, hi * 2.0)
        } else {
            (lo, hi)
        };
        (lo / 1.6, hi * 1.6)
    } else {
        let lo = lo.min(0.0);
        let hi = if hi <= lo { lo + 1.0 } else { hi };
        (lo, hi * 1.08)
    }
}

/// Splits the canvas into the chart and the legend panel, and writes the caption.
fn canvas<'a>(root: &Area<'a>, title: &str) -> Result<(Area<'a>, Area<'a>), String> {
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(title, (FONT, 19).into_font().color(&BLACK))
        .map_err(err)?;
    let (w, _) = root.dim_in_pixel();
    Ok(root.split_horizontally(w - LEGEND))
}

/// The legend: one entry a line, a sample of the series' look and its label.
fn legend(area: &Area<'_>, entries: &[(String, Look, bool)]) -> Result<(), String> {
    let style = (FONT, 15).into_font().color(&BLACK);
    for (i, (label, look, bar)) in entries.iter().enumerate() {
        let y = 26 + 24 * i as i32;
        let c = look.color();
        if *bar {
            let fill = if look.dashed() {
                c.mix(0.35).filled()
            } else {
                c.filled()
            };
            area.draw(&Rectangle::new([(8, y - 6), (30, y + 6)], fill))
                .map_err(err)?;
            if look.dashed() {
                area.draw(&Rectangle::new(
                    [(8, y - 6), (30, y + 6)],
                    c.stroke_width(1),
                ))
                .map_err(err)?;
            }
        } else if look.dashed() {
            for s in 0..3 {
                let x = 6 + s * 9;
                area.draw(&PathElement::new(
                    vec![(x, y), (x + 5, y)],
                    c.stroke_width(2),
                ))
                .map_err(err)?;
            }
        } else {
            area.draw(&PathElement::new(vec![(6, y), (30, y)], c.stroke_width(2)))
                .map_err(err)?;
            area.draw(&Circle::new((18, y), 3, c.filled()))
                .map_err(err)?;
        }
        area.draw(&Text::new(label.clone(), (38, y - 8), style.clone()))
            .map_err(err)?;
    }
    Ok(())
}

/// Draws `chart` as a standalone SVG document.
pub fn line_chart(chart: &LineChart) -> Result<String, String> {
    let ok = |p: &(f64, f64)| {
        p.0.is_finite()
            && p.1.is_finite()
            && (!chart.x_log || p.0 > 0.0)
            && (!chart.y_log || p.1 > 0.0)
    };
    let lines: Vec<Line> = chart
        .lines
        .iter()
        .map(|l| Line {
            points: l.points.iter().copied().filter(ok).collect(),
            ..l.clone()
        })
        .filter(|l| !l.points.is_empty())
        .collect();
    let xs: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .collect();
    let ys: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .collect();
    let (x0, x1) = range(&xs, chart.x_log);
    let (x0, x1) = if chart.x_log {
        (x0 * 1.2, x1 / 1.2) // tighter: x values are the workload's, not noise
    } else {
        (
            xs.iter().copied().fold(f64::INFINITY, f64::min).min(x0),
            x1 / 1.08,
        )
    };
    let (y0, y1) = range(&ys, chart.y_log);
    // A log y axis spans whole decades, so its ends carry labels.
    let (y0, y1) = if chart.y_log {
        (decade_below(y0 * 1.6), decade_above(y1 / 1.6))
    } else {
        (y0, y1)
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        let (plot, key) = canvas(&root, &chart.title)?;
        match (chart.x_log, chart.y_log) {
            (true, true) => lines_on(
                &plot,
                chart,
                &lines,
                (x0..x1).log_scale(),
                (y0..y1).log_scale(),
            ),
            (true, false) => lines_on(&plot, chart, &lines, (x0..x1).log_scale(), y0..y1),
            (false, true) => lines_on(&plot, chart, &lines, x0..x1, (y0..y1).log_scale()),
            (false, false) => lines_on(&plot, chart, &lines, x0..x1, y0..y1),
        }?;
        let entries: Vec<(String, Look, bool)> = lines
            .iter()
            .map(|l| (l.label.clone(), l.look, false))
            .collect();
        legend(&key, &entries)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn lines_on<X, Y>(
    area: &Area<'_>,
    chart: &LineChart,
    lines: &[Line],
    x: X,
    y: Y,
) -> Result<(), String>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut c = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc(chart.x_desc.as_str())
        .y_desc(chart.y_desc.as_str())
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .bold_line_style(RGBColor(0xd0, 0xd0, 0xd0))
        .draw()
        .map_err(err)?;
    for l in lines {
        let color = l.look.color();
        let style = color.stroke_width(2);
        if l.look.dashed() {
            c.draw_series(DashedLineSeries::new(l.points.iter().copied(), 8, 5, style))
                .map_err(err)?;
        } else {
            c.draw_series(LineSeries::new(l.points.iter().copied(), style))
                .map_err(err)?;
        }
        c.draw_series(l.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
    }
    Ok(())
}

/// Draws `chart` as a standalone SVG document.
pub fn bar_chart(chart: &BarChart) -> Result<String, String> {
    let vals: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied())
        .collect();
    let (y0, y1) = range(&vals, chart.y_log);
    // Bars on a log axis start at the decade below the smallest, so heights compare.
    let y0 = if chart.y_log {
        decade_below(y0 * 1.6)
    } else {
        y0
    };
    let n = chart.groups.len().max(1) as f64;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        let (plot, key) = canvas(&root, &chart.title)?;
        if chart.y_log {
            bars_on(&plot, chart, -0.5..n - 0.5, (y0..y1).log_scale(), y0)?;
        } else {
            bars_on(&plot, chart, -0.5..n - 0.5, y0..y1, y0)?;
        }
        let entries: Vec<(String, Look, bool)> = chart
            .series
            .iter()
            .map(|s| (s.label.clone(), s.look, true))
            .collect();
        legend(&key, &entries)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn bars_on<Y>(
    area: &Area<'_>,
    chart: &BarChart,
    x: std::ops::Range<f64>,
    y: Y,
    base: f64,
) -> Result<(), String>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let groups = chart.groups.clone();
    let label = move |v: &f64| {
        let i = v.round();
        if (v - i).abs() < 1e-6 && i >= 0.0 {
            groups.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut c = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(chart.groups.len().max(1))
        .x_desc(chart.x_desc.as_str())
        .y_desc(chart.y_desc.as_str())
        .x_label_formatter(&label)
        .y_label_formatter(&|v| tick(*v))
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .bold_line_style(RGBColor(0xd0, 0xd0, 0xd0))
        .draw()
        .map_err(err)?;
    let k = chart.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (j, s) in chart.series.iter().enumerate() {
        let color = s.look.color();
        for (g, v) in s.values.iter().enumerate() {
            let Some(v) = v.filter(|v| v.is_finite() && *v > 0.0) else {
                continue;
            };
            let x0 = g as f64 - 0.4 + j as f64 * width;
            let corners = [(x0 + 0.1 * width, base), (x0 + 0.9 * width, v)];
            if s.look.dashed() {
                c.draw_series([Rectangle::new(corners, color.mix(0.35).filled())])
                    .map_err(err)?;
                c.draw_series([Rectangle::new(corners, color.stroke_width(1))])
                    .map_err(err)?;
            } else {
                c.draw_series([Rectangle::new(corners, color.filled())])
                    .map_err(err)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(1000.0), "1000");
        assert_eq!(tick(20000.0), "20k");
        assert_eq!(tick(0.001), "0.001");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(3e6), "3M");
    }

    #[test]
    fn decades_decide_log_axes() {
        assert!(spans_decades([1.0, 100.0]));
        assert!(!spans_decades([1.0, 20.0, 0.0]));
    }

    #[test]
    fn charts_are_svg_with_axis_labels_and_legend() {
        let svg = line_chart(&LineChart {
            title: "t".into(),
            x_desc: "list length (SPTEs)".into(),
            y_desc: "ns per SPTE".into(),
            x_log: true,
            y_log: true,
            lines: vec![
                Line {
                    label: "iterator".into(),
                    points: vec![(1.0, 9.0), (1024.0, 15.0)],
                    look: Look::Solid(0),
                },
                Line {
                    label: "floor".into(),
                    points: vec![(0.0, 1.0), (1.0, 1.0), (1024.0, 1.0)],
                    look: Look::Floor,
                },
            ],
        })
        .unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for text in ["list length (SPTEs)", "ns per SPTE", "iterator", "floor"] {
            assert!(svg.contains(text), "{text}");
        }
        let svg = bar_chart(&BarChart {
            title: "b".into(),
            x_desc: "mode".into(),
            y_desc: "loops".into(),
            groups: vec!["scan-all".into(), "used-entries".into()],
            y_log: true,
            series: vec![Bars {
                label: "loops".into(),
                values: vec![Some(7168.0), None],
                look: Look::Solid(1),
            }],
        })
        .unwrap();
        assert!(svg.contains("scan-all") && svg.contains("<rect"));
    }
}
