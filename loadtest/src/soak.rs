//! The soak's plot and flatness check: `scripts/soak.sh` samples every replica's resident memory
//! and live tasks, Redis's memory and key count once a minute (`minute,series,value` lines); this
//! draws them and checks that none grew: the mean over the last quarter of the run must stay
//! within `max_growth` × the mean over the second quarter. The first quarter is the warm-up, in
//! which bounded buffers fill up to their bounds (event logs to `SHOAL_EVENT_LOG_MAX_LEN`, the
//! allocator's arenas); minute 0, before the load, is left out.

use std::{collections::BTreeMap, path::Path, process::ExitCode};

use plotters::prelude::*;

use crate::plot::{Series, panel, register_font};

/// Samples by series name: (minute, value).
type Samples = BTreeMap<String, Vec<(u64, f64)>>;

fn read(csv: &Path) -> Result<Samples, String> {
    let text =
        std::fs::read_to_string(csv).map_err(|e| format!("reading {}: {e}", csv.display()))?;
    let mut samples = Samples::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split(',');
        let (Some(minute), Some(series), Some(value)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("bad line {line:?}"));
        };
        let minute = minute
            .parse()
            .map_err(|_| format!("bad minute in {line:?}"))?;
        // A sample a replica could not give (it was busy) is left out, not zero.
        if let Ok(value) = value.trim().parse::<f64>() {
            samples
                .entry(series.to_owned())
                .or_default()
                .push((minute, value));
        }
    }
    Ok(samples)
}

/// The ratio of the last quarter's mean to the second quarter's (after minute 0), when there are
/// enough samples to tell (eight minutes).
fn growth(points: &[(u64, f64)]) -> Option<f64> {
    let loaded: Vec<f64> = points
        .iter()
        .filter(|(m, _)| *m > 0)
        .map(|(_, v)| *v)
        .collect();
    if loaded.len() < 8 {
        return None;
    }
    let quarter = loaded.len() / 4;
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
    let first = mean(&loaded[quarter..2 * quarter]);
    let last = mean(&loaded[loaded.len() - quarter..]);
    Some(if first > 0.0 { last / first } else { 1.0 })
}

/// Draws `csv` into `svg`; exit status 1 when a series grew beyond `max_growth`.
pub fn plot(csv: &Path, svg: &Path, max_growth: f64) -> Result<ExitCode, String> {
    let samples = read(csv)?;
    let mut grew = Vec::new();
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>8}",
        "series", "first", "last", "max", "growth"
    );
    for (name, points) in &samples {
        let growth = growth(points);
        let max = points.iter().map(|(_, v)| *v).fold(f64::MIN, f64::max);
        println!(
            "{:<20} {:>10.1} {:>10.1} {:>10.1} {:>8}",
            name,
            points.first().map_or(0.0, |p| p.1),
            points.last().map_or(0.0, |p| p.1),
            max,
            growth.map_or("-".to_owned(), |g| format!("{g:.3}"))
        );
        if growth.is_some_and(|g| g > max_growth) {
            grew.push(format!("{name} ×{:.2}", growth.unwrap_or_default()));
        }
    }
    draw(&samples, svg)?;
    if grew.is_empty() {
        println!("flat: no series grew beyond ×{max_growth}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("GREW: {}", grew.join(", "));
        Ok(ExitCode::from(1))
    }
}

const COLOURS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];

fn draw(samples: &Samples, svg: &Path) -> Result<(), String> {
    register_font()?;
    let minutes = samples
        .values()
        .flat_map(|points| points.iter().map(|(m, _)| *m))
        .max()
        .unwrap_or(0)
        .max(1);
    let group = |prefix: &str| -> Vec<Series> {
        samples
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .zip(COLOURS.iter().cycle())
            .map(|((name, points), colour)| (name.clone(), *colour, points.clone()))
            .collect()
    };
    let root = SVGBackend::new(svg, (1000, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let areas = root.split_evenly((4, 1));
    let panels = [
        ("replica resident memory", "MiB", group("rss_mib_")),
        ("replica live async tasks", "tasks", group("tasks_")),
        ("Redis memory", "MiB", group("redis_used_mib")),
        ("Redis keys", "keys", group("redis_keys")),
    ];
    for (area, (caption, unit, series)) in areas.iter().zip(panels) {
        panel(
            area,
            &format!("soak: {caption}"),
            "minute",
            unit,
            minutes,
            series,
        )?;
    }
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_compares_the_last_quarter_with_the_second_after_minute_zero() {
        // Fills up in the first quarter, then stays: flat.
        let filling: Vec<(u64, f64)> = (0..=16)
            .map(|m| (m, if m < 4 { m as f64 } else { 10.0 }))
            .collect();
        assert_eq!(growth(&filling), Some(1.0));
        let leak: Vec<(u64, f64)> = (0..=16).map(|m| (m, m as f64 * 10.0)).collect();
        assert!(growth(&leak).expect("enough samples") > 1.5);
        assert_eq!(growth(&filling[..5]), None);
    }
}
