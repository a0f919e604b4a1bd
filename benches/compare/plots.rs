//! The plots BENCHMARKS.md shows beside its table, drawn as SVG with plotters from the same
//! rows: connections per second by client count for each contender (phase 1), and the memory
//! each held session costs (phase 3).

use std::path::Path;

use plotters::prelude::*;

use crate::report::Row;

/// One plot written: its file name (beside BENCHMARKS.md) and what it shows.
pub struct Plot {
    pub file: &'static str,
    pub title: &'static str,
}

/// Draws every plot the rows allow into `dir`; returns those written.
pub fn draw(rows: &[Row], dir: &Path) -> Vec<Plot> {
    let mut plots = Vec::new();
    let rate = Plot {
        file: "BENCHMARKS-connections.svg",
        title: "Connections per second by number of clients (phase 1)",
    };
    match connections_plot(rows, &dir.join(rate.file)) {
        Ok(true) => plots.push(rate),
        Ok(false) => {}
        Err(e) => eprintln!("note: cannot draw {}: {e}", rate.file),
    }
    let memory = Plot {
        file: "BENCHMARKS-memory.svg",
        title: "Memory per held session, the kernel's share included (phase 3)",
    };
    match memory_plot(rows, &dir.join(memory.file)) {
        Ok(true) => plots.push(memory),
        Ok(false) => {}
        Err(e) => eprintln!("note: cannot draw {}: {e}", memory.file),
    }
    plots
}

/// The contenders in table order, each with the (x, value) points whose metric `point_of`
/// recognises.
fn series(
    rows: &[Row],
    point_of: impl Fn(&str) -> Option<f64>,
) -> Vec<(&'static str, Vec<(f64, f64)>)> {
    let mut out: Vec<(&'static str, Vec<(f64, f64)>)> = Vec::new();
    for row in rows.iter().filter(|r| !r.value.is_nan()) {
        let Some(x) = point_of(&row.metric) else {
            continue;
        };
        match out.iter_mut().find(|(name, _)| *name == row.contender) {
            Some((_, points)) => points.push((x, row.value)),
            None => out.push((row.contender, vec![(x, row.value)])),
        }
    }
    out
}

/// Lines of connections/s against clients (1, 4, 16), one per contender. Ok(false): no data.
fn connections_plot(rows: &[Row], path: &Path) -> Result<bool, Box<dyn std::error::Error>> {
    // Evenly spaced, whatever the counts: 1, 4, 16 clients at x = 0, 1, 2.
    let counts = [1.0, 4.0, 16.0];
    let clients = |metric: &str| {
        let n = metric
            .strip_prefix("conn/s, ")?
            .strip_suffix(" client(s)")?
            .parse::<f64>()
            .ok()?;
        counts.iter().position(|&c| c == n).map(|i| i as f64)
    };
    let lines = series(rows, clients);
    if lines.is_empty() {
        return Ok(false);
    }
    let top = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(0.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "connections/s (connect → banner → 64-byte echo → close)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.2f64..2.2f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("clients at once")
        .y_desc("connections/s")
        .x_labels(3)
        .x_label_formatter(&|x| match counts.get(x.round() as usize) {
            Some(c) if (x - x.round()).abs() < 0.01 => format!("{c:.0}"),
            _ => String::new(),
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (i, (name, points)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(true)
}

/// Bars of KiB per held session, one per contender. Ok(false): no data.
fn memory_plot(rows: &[Row], path: &Path) -> Result<bool, Box<dyn std::error::Error>> {
    let bars: Vec<(&str, f64)> = rows
        .iter()
        .filter(|r| r.metric.starts_with("memory per session") && !r.value.is_nan())
        .map(|r| (r.contender, r.value))
        .collect();
    if bars.is_empty() {
        return Ok(false);
    }
    let top = bars.iter().map(|b| b.1).fold(0.0, f64::max) * 1.15;
    let root = SVGBackend::new(path, (760, 60 + 44 * bars.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "KiB of memory per held session (available memory's drop)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(200)
        .build_cartesian_2d(0f64..top, (0..bars.len()).into_segmented())?;
    let names: Vec<String> = bars.iter().map(|b| b.0.to_string()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("KiB per session, both ends and the kernel's share")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, &(_, kib))| {
        let color = Palette99::pick(i).to_rgba();
        Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (kib, SegmentValue::Exact(i + 1)),
            ],
            color.filled(),
        )
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, &(_, kib))| {
        Text::new(
            format!("{kib:.0}"),
            (kib, SegmentValue::CenterOf(i)),
            ("sans-serif", 14),
        )
    }))?;
    root.present()?;
    Ok(true)
}
