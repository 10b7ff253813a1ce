//! The SVG plot of a run: throughput and latency (p50, p99) per second.

use std::path::Path;

use plotters::prelude::*;

use crate::stats::Report;

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

pub(crate) fn register_font() -> Result<(), String> {
    let bytes = FONT_PATHS
        .iter()
        .find_map(|path| std::fs::read(path).ok())
        .ok_or("no TrueType font found (install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| "unreadable font".to_owned())
}

/// One line of a panel: its legend label, colour and points (second, value).
pub(crate) type Series = (String, RGBColor, Vec<(u64, f64)>);

/// Draws the report's timeline into `path` (SVG).
pub fn draw(report: &Report, title: &str, path: &Path) -> Result<(), String> {
    register_font()?;
    let points = &report.timeline;
    if points.is_empty() {
        return Err("no data to plot".into());
    }
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(350);
    let seconds = points.len() as u64;
    panel(
        &top,
        &format!("{title}: throughput"),
        "second",
        "requests/s",
        seconds,
        vec![
            (
                "ok/s".to_owned(),
                BLUE,
                points.iter().map(|p| (p.second, p.ok as f64)).collect(),
            ),
            (
                "errors/s".to_owned(),
                RED,
                points.iter().map(|p| (p.second, p.errors as f64)).collect(),
            ),
        ],
    )?;
    panel(
        &bottom,
        &format!("{title}: latency"),
        "second",
        "ms",
        seconds,
        vec![
            (
                "p50".to_owned(),
                GREEN,
                points
                    .iter()
                    .filter_map(|p| Some((p.second, p.p50_ms?)))
                    .collect(),
            ),
            (
                "p99".to_owned(),
                MAGENTA,
                points
                    .iter()
                    .filter_map(|p| Some((p.second, p.p99_ms?)))
                    .collect(),
            ),
        ],
    )?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// One chart of `series` over `seconds` (x from 0), its y axis up to 10% above the highest point.
pub(crate) fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    seconds: u64,
    series: Vec<Series>,
) -> Result<(), String> {
    let highest = series
        .iter()
        .flat_map(|(_, _, points)| points.iter().map(|(_, value)| *value))
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0u64..seconds, 0f64..highest * 1.1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| e.to_string())?;
    for (label, color, points) in series {
        chart
            .draw_series(LineSeries::new(points, &color))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}
