//! The SVG plot of a run: throughput and latency (p50, p99) per second.

use std::path::Path;

use plotters::prelude::*;

use crate::stats::Report;

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> Result<(), String> {
    let bytes = FONT_PATHS
        .iter()
        .find_map(|path| std::fs::read(path).ok())
        .ok_or("no TrueType font found (install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| "unreadable font".to_owned())
}

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

    let max_rate = points
        .iter()
        .map(|p| p.ok + p.errors)
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(format!("{title}: throughput"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0u64..seconds, 0f64..max_rate)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("second")
        .y_desc("requests/s")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.second, p.ok as f64)),
            &BLUE,
        ))
        .map_err(|e| e.to_string())?
        .label("ok/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.second, p.errors as f64)),
            &RED,
        ))
        .map_err(|e| e.to_string())?
        .label("errors/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;

    let max_latency = points
        .iter()
        .filter_map(|p| p.p99_ms)
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(format!("{title}: latency"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0u64..seconds, 0f64..max_latency)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("second")
        .y_desc("ms")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            points.iter().filter_map(|p| Some((p.second, p.p50_ms?))),
            &GREEN,
        ))
        .map_err(|e| e.to_string())?
        .label("p50")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    chart
        .draw_series(LineSeries::new(
            points.iter().filter_map(|p| Some((p.second, p.p99_ms?))),
            &MAGENTA,
        ))
        .map_err(|e| e.to_string())?
        .label("p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
